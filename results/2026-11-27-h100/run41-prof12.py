"""Session 6: the compiled twin on and off, side by side (alternating blocks), on the GPU host.
FlashInfer 32 decodes (one batch again and again; successive decode steps) and common 256
all-decode, build + lower to cuda; GPU drained before every call, as the benches do."""
import sys, time, gc, statistics, json, itertools
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync import _accel
from attnsync.adapters import torch as at
from bench_common import all_decode_inputs
DEV = 'cuda' if torch.cuda.is_available() else 'cpu'
sync = torch.cuda.synchronize if DEV == 'cuda' else (lambda: None)
NATIVE = _accel.native
def block(fn, n):
    ts = []
    for _ in range(n):
        sync(); t = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t)
    return statistics.median(ts) / 1e3
def paired(fn, rounds=12, n=100):
    r = {'native': [], 'numpy': []}
    for _ in range(rounds):
        for mode in r:
            _accel.native = NATIVE if mode == 'native' else None
            for _ in range(5): fn()
            r[mode].append(block(fn, n))
    _accel.native = NATIVE
    return {k: round(statistics.median(v), 2) for k, v in r.items()}
out = {'cpu': open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0].strip(' :\t'),
       'native_built': NATIVE is not None}
small = np.arange(256, dtype=np.int32)
out['calib np add 256'] = round(block(lambda: small + 1, 2000), 2)
rng = np.random.default_rng(1)
b = attnsync.Batch(**all_decode_inputs(256, rng))
gc.disable()
out['common 256 build+lower'] = paired(lambda: at.lower(attnsync.build(b), DEV))
out['common 256 build'] = paired(lambda: attnsync.build(b))
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-(seq.max() + 400) // 16))
table = rng.integers(0, 1 << 16, (32, width)).astype(np.int32)
fi = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=16)
out['flashinfer 32 build+lower'] = paired(lambda: at.lower(attnsync.build(fi, backend='flashinfer'), DEV))
out['flashinfer 32 build'] = paired(lambda: attnsync.build(fi, backend='flashinfer'))
steps = [attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq + k, block_table=table, block_size=16) for k in range(400)]
counter = itertools.count()
out['flashinfer 32 build+lower, decode steps'] = paired(lambda: at.lower(attnsync.build(steps[next(counter) % 400], backend='flashinfer'), DEV))
gc.enable()
print('PROF12 ' + json.dumps(out))
