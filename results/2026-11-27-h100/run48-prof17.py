"""Session 6: session 5's last code (b101bdd, renamed attnsync_old in .gpu/oldpkg) against this
session's, in ONE process, alternating blocks (host speed drifts from second to second on these
machines, so separate processes do not compare). GPU drained before every call."""
import sys, time, gc, statistics, json, itertools, os
sys.path.insert(0, os.path.abspath('.gpu/oldpkg'))
import numpy as np, torch
import attnsync, attnsync_old
from attnsync.adapters import torch as at_new
from attnsync_old.adapters import torch as at_old
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
wide = rng.integers(100, 8193, 256).astype(np.int32)
wt = np.where(np.arange(512) < (-(-wide // 16))[:, None], rng.integers(1, 1 << 20, (256, 512)), 0).astype(np.int32)
cases = {}
for tag, pkg, at in (('old', attnsync_old, at_old), ('new', attnsync, at_new)):
    fi = pkg.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=16)
    steps = [pkg.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq + k, block_table=table, block_size=16) for k in range(400)]
    common = pkg.Batch(query_lens=np.ones(256, np.int32), seq_lens=wide, block_table=wt, block_size=16)
    count = itertools.count()
    cases[tag] = {
        'flashinfer 32 b+l': (lambda pkg=pkg, at=at, fi=fi: at.lower(pkg.build(fi, backend='flashinfer'), 'cuda')),
        'flashinfer 32 b+l, decode steps': (lambda pkg=pkg, at=at, steps=steps, count=count: at.lower(pkg.build(steps[next(count) % 400], backend='flashinfer'), 'cuda')),
        'common 256 b+l': (lambda pkg=pkg, at=at, b=common: at.lower(pkg.build(b), 'cuda')),
    }
small = np.arange(256, dtype=np.int32)
gc.disable()
res = {k: {'old': [], 'new': [], 'probe': []} for k in cases['new']}
for _ in range(10):
    for name in res:
        res[name]['probe'].append(block(lambda: small + 1))
        for tag in ('old', 'new'):
            res[name][tag].append(block(cases[tag][name]))
out = {name: {'old us': round(statistics.median(r['old']), 2), 'new us': round(statistics.median(r['new']), 2),
              'old/new, median of paired blocks': round(statistics.median([o / n for o, n in zip(r['old'], r['new'])]), 2),
              'probe np add 256 us': round(statistics.median(r['probe']), 2)} for name, r in res.items()}
out['native'] = attnsync._accel.native is not None
print('PROF17 ' + json.dumps(out))
