"""Session 7: session 6's last code (b2e7e48, renamed attnsync_s6 in .gpu/s6pkg, its own
compiled module) against this session's, in ONE process, alternating 100-call blocks, GPU
drained before every call (as run48-prof17.py did for sessions 5 and 6)."""
import sys, time, gc, statistics, json, itertools, os
sys.path.insert(0, os.path.abspath('.gpu/s6pkg'))
import numpy as np, torch
import attnsync, attnsync_s6
from attnsync.adapters import torch as at_new
from attnsync_s6.adapters import torch as at_old
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
ROUNDS = int(os.environ.get('ROUNDS', '10'))
def block(fn, n=100):
    for _ in range(5): fn()
    ts = []
    for _ in range(n):
        sync(); t = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t)
    return statistics.median(ts) / 1e3
rng = np.random.default_rng(1)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-(seq.max() + 400) // 16))
table = rng.integers(0, 1 << 16, (32, width)).astype(np.int32)
wide = rng.integers(100, 8193, 256).astype(np.int32)
wt = np.where(np.arange(512) < (-(-wide // 16))[:, None], rng.integers(1, 1 << 20, (256, 512)), 0).astype(np.int32)
cases = {}
for tag, pkg, at in (('old', attnsync_s6, at_old), ('new', attnsync, at_new)):
    fi = pkg.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=16)
    steps = [pkg.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq + k, block_table=table, block_size=16) for k in range(400)]
    common = pkg.Batch(query_lens=np.ones(256, np.int32), seq_lens=wide, block_table=wt, block_size=16)
    count = itertools.count()
    cases[tag] = {
        'flashinfer 32 b+l': (lambda pkg=pkg, at=at, fi=fi: at.lower(pkg.build(fi, backend='flashinfer'), dev)),
        'flashinfer 32 b+l, decode steps': (lambda pkg=pkg, at=at, steps=steps, count=count: at.lower(pkg.build(steps[next(count) % 400], backend='flashinfer'), dev)),
        'common 256 b+l': (lambda pkg=pkg, at=at, b=common: at.lower(pkg.build(b), dev)),
    }
# same values first
for name in cases['new']:
    a, b = cases['old'][name](), cases['new'][name]()
    for f, v in a.__dict__.items():
        w = b.__dict__[f]
        assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), (name, f)
small = np.arange(256, dtype=np.int32)
gc.disable()
res = {k: {'old': [], 'new': [], 'probe': []} for k in cases['new']}
for r in range(ROUNDS):
    for name in res:
        res[name]['probe'].append(block(lambda: small + 1))
        for tag in (('old', 'new') if r % 2 == 0 else ('new', 'old')):
            res[name][tag].append(block(cases[tag][name]))
out = {name: {'session 6 us': round(statistics.median(r['old']), 2), 'session 7 us': round(statistics.median(r['new']), 2),
              'min session 6 / 7 blocks': [round(min(r['old']), 2), round(min(r['new']), 2)],
              's6/s7, median of paired blocks': round(statistics.median([o / n for o, n in zip(r['old'], r['new'])]), 2),
              'probe np add 256 us': round(statistics.median(r['probe']), 2)} for name, r in res.items()}
out['native'] = [attnsync._accel.native is not None, attnsync_s6._accel.native is not None]
out['device'] = torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'
print('PROF23 ' + json.dumps(out, indent=1))
