"""Session 7: the 256-decode common lowering's compiled step, in parts, on a GPU host: the whole
step, its pack alone (the same targets and sources), and the 512 KB cudaMemcpyAsync alone."""
import time, statistics, json, gc, ctypes
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
from attnsync import _accel
perf = time.perf_counter_ns
def drained(fn, n=1000):
    for _ in range(50): fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        s = perf(); fn(); ts.append(perf() - s)
    return round(statistics.median(ts) / 1e3, 2)
torch.zeros(1, device='cuda'); torch.cuda.synchronize()
rng = np.random.default_rng(0); PAGE = 16
wide = rng.integers(100, 8193, 256).astype(np.int32)
wt = np.where(np.arange(512) < (-(-wide // PAGE))[:, None], rng.integers(1, 1 << 20, (256, 512)), 0).astype(np.int32)
common = attnsync.Batch(query_lens=np.ones(256, np.int32), seq_lens=wide, block_table=wt, block_size=PAGE)
md = attnsync.build(common)
at.lower(md, 'cuda'); at.lower(md, 'cuda'); torch.cuda.synchronize()
stager, _ = at._stager_for('cuda', None)
plan = at._plan_of(md)
key = (plan, tuple(a.shape for a in plan.arrays_of(md.__dict__)), None, at._current_stream_key(stager._device_index))
entries = stager._reusable[key][1:3]
native = _accel.native
values = md.__dict__
names = [n for n, _ in entries[0].pack_pairs]
it = [0]
def turn():
    it[0] ^= 1
    return entries[it[0]]
direct = stager._direct
gc.disable()
out = {}
for rnd in range(3):
    r = {
        'probe': drained(lambda s=np.arange(256, dtype=np.int32): s + 1),
        'lower (whole)': drained(lambda: at.lower(md, 'cuda')),
        'lower_step, entries in turn': drained(lambda: native.lower_step(turn().fast, values)),
        'pack alone, entries in turn': drained(lambda: (lambda e: native.pack(e.pack_targets, e.pack_sources(values)))(turn())),
        'pack + memcpyAsync, in turn': drained(lambda: (lambda e: (native.pack(e.pack_targets, e.pack_sources(values)), direct.copy_to_device(*e.copy_args)))(turn())),
        'memcpyAsync 512K alone (ctypes)': drained(lambda: direct.copy_to_device(*turn().copy_args)),
        'pack alone, one entry (hot)': drained(lambda e=entries[0]: native.pack(e.pack_targets, e.pack_sources(values))),
    }
    out[f'round {rnd}'] = r
    print(rnd, r, flush=True)
print('PROF26 ' + json.dumps({'device': torch.cuda.get_device_name(), **out}))
