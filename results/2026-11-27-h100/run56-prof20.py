"""Session 6: the whole step a serving loop pays (Batch + build + lower), compiled twin on and
off in one process, alternating 100-call blocks, GPU drained before each call."""
import sys, time, gc, statistics, json, itertools
sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync import _accel
from attnsync.adapters import torch as at
from bench_common import all_decode_inputs
NATIVE = _accel.native
sync = torch.cuda.synchronize
def block(fn, n=100):
    for _ in range(5): fn()
    ts = []
    for _ in range(n):
        sync(); t = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t)
    return statistics.median(ts) / 1e3
rng = np.random.default_rng(1)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-(seq.max() + 400) // 16))
table = rng.integers(0, 1 << 16, (32, width)).astype(np.int32)
ones = np.ones(32, np.int32)
count = itertools.count()
inp = all_decode_inputs(256, rng)
cases = {
    'Batch, 32 decodes': lambda: attnsync.Batch(query_lens=ones, seq_lens=seq, block_table=table, block_size=16),
    'Batch + FlashInfer build + lower, 32 decode steps': lambda: at.lower(attnsync.build(attnsync.Batch(
        query_lens=ones, seq_lens=seq + (next(count) % 400), block_table=table, block_size=16), backend='flashinfer'), 'cuda'),
    'Batch, 256 decodes': lambda: attnsync.Batch(**inp),
    'Batch + build + torch, 256 decodes': lambda: at.lower(attnsync.build(attnsync.Batch(**inp)), 'cuda'),
}
small = np.arange(256, dtype=np.int32)
gc.disable()
res = {k: {'native': [], 'numpy': []} for k in cases}
probe = []
for _ in range(8):
    probe.append(block(lambda: small + 1))
    for k, fn in cases.items():
        for mode in ('native', 'numpy'):
            _accel.native = NATIVE if mode == 'native' else None
            res[k][mode].append(block(fn))
_accel.native = NATIVE
out = {k: {m: round(statistics.median(v), 2) for m, v in r.items()} for k, r in res.items()}
out['probe np add 256'] = round(statistics.median(probe), 2)
print('PROF20 ' + json.dumps(out))
