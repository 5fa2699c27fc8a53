"""One process of prof15: FlashInfer 32 decodes (one batch; successive decode steps) and common
256 all-decode, build + lower to cuda, with the attnsync found first on sys.path."""
import sys, time, gc, statistics, json, itertools
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
sync = torch.cuda.synchronize
def blocks(fn, rounds=6, n=100):
    meds = []
    for _ in range(rounds):
        for _ in range(5): fn()
        ts = []
        for _ in range(n):
            sync(); t = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t)
        meds.append(statistics.median(ts) / 1e3)
    return round(statistics.median(meds), 2)
rng = np.random.default_rng(1)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-(seq.max() + 400) // 16))
table = rng.integers(0, 1 << 16, (32, width)).astype(np.int32)
fi = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=16)
steps = [attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq + k, block_table=table, block_size=16) for k in range(400)]
count = itertools.count()
wide = rng.integers(100, 8193, 256).astype(np.int32)
wt = np.where(np.arange(512) < (-(-wide // 16))[:, None], rng.integers(1, 1 << 20, (256, 512)), 0).astype(np.int32)
common = attnsync.Batch(query_lens=np.ones(256, np.int32), seq_lens=wide, block_table=wt, block_size=16)
gc.disable()
small = np.arange(256, dtype=np.int32)
out = {'code': attnsync.__file__, 'probe np add 256': blocks(lambda: small + 1),
       'flashinfer 32 b+l': blocks(lambda: at.lower(attnsync.build(fi, backend='flashinfer'), 'cuda')),
       'flashinfer 32 b+l, decode steps': blocks(lambda: at.lower(attnsync.build(steps[next(count) % 400], backend='flashinfer'), 'cuda')),
       'common 256 b+l': blocks(lambda: at.lower(attnsync.build(common), 'cuda'))}
print('ONE ' + json.dumps(out), flush=True)
