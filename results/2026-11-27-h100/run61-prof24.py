"""Session 7: the new step's pieces on a GPU host (loops and drained single calls)."""
import time, statistics, json, sys, gc, os
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
from attnsync import _accel
perf = time.perf_counter_ns
def loop(fn, n=3000, rounds=7):
    for _ in range(300): fn()
    r = []
    for _ in range(rounds):
        s = perf()
        for _ in range(n): fn()
        r.append((perf() - s) / n / 1e3)
    return round(statistics.median(r), 3)
def drained(fn, n=2000):
    for _ in range(50): fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        s = perf(); fn(); ts.append(perf() - s)
    return round(statistics.median(ts) / 1e3, 3)
torch.zeros(1, device='cuda'); torch.cuda.synchronize()
rng = np.random.default_rng(0); PAGE = 16
seq = rng.integers(200, 2001, 32).astype(np.int32)
table = rng.integers(0, 1 << 16, (32, int(-(-(seq.max() + 400) // PAGE)))).astype(np.int32)
fixed = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=PAGE)
wide = rng.integers(100, 8193, 256).astype(np.int32)
wide_table = np.where(np.arange(512) < (-(-wide // PAGE))[:, None], rng.integers(1, 1 << 20, (256, 512)), 0).astype(np.int32)
common = attnsync.Batch(query_lens=np.ones(256, np.int32), seq_lens=wide, block_table=wide_table, block_size=PAGE)
small = np.arange(256, dtype=np.int32)
gc.disable()
out = {}
mdf = attnsync.build(fixed, backend='flashinfer'); mdc = attnsync.build(common)
def entry_of(md):
    at.lower(md, 'cuda'); at.lower(md, 'cuda'); torch.cuda.synchronize()
    stager, _ = at._stager_for('cuda', None)
    plan = at._plan_of(md)
    shapes = tuple(a.shape for a in plan.arrays_of(md.__dict__))
    key = (plan, shapes, None, at._current_stream_key(stager._device_index))
    pool = stager._reusable[key]
    return pool[1], pool[2]
ef = entry_of(mdf); ec = entry_of(mdc)
native = _accel.native
src512 = wide_table.copy(); pin = torch.empty(wide_table.nbytes, dtype=torch.uint8, pin_memory=True).numpy().view(np.int32).reshape(256, 512)
cases = {
    'probe np add 256': lambda: small + 1,
    'fi build': lambda: attnsync.build(fixed, backend='flashinfer'),
    'fi lower': lambda: at.lower(mdf, 'cuda'),
    'fi b+l': lambda: at.lower(attnsync.build(fixed, backend='flashinfer'), 'cuda'),
    'fi lower_step alone (two entries in turn)': (lambda it=[0]: native.lower_step(ef[it.__setitem__(0, 1 - it[0]) or it[0]].fast, mdf.__dict__)),
    'fi lower_users alone': lambda: native.lower_users(ef[0].fast),
    '_plan_of': lambda: at._plan_of(mdf),
    "_stager_for('cuda')": lambda: at._stager_for('cuda', None),
    'common build': lambda: attnsync.build(common),
    'common lower': lambda: at.lower(mdc, 'cuda'),
    'common b+l': lambda: at.lower(attnsync.build(common), 'cuda'),
    'common lower_step alone': (lambda it=[0]: native.lower_step(ec[it.__setitem__(0, 1 - it[0]) or it[0]].fast, mdc.__dict__)),
    'copyto 512K -> pinned': lambda: np.copyto(pin, src512),
    'Batch 32': lambda: attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=PAGE),
}
for rnd in range(2):
    for name, fn in cases.items():
        r = {'loop': loop(fn), 'drained': drained(fn)}
        out.setdefault(name, []).append(r)
        print(rnd, name, r, flush=True)
print('PROF24 ' + json.dumps({'device': torch.cuda.get_device_name(), **out}))
