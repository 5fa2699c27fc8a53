"""Session 3 host-time profile on the GPU host: reuse path, primitives, line profile."""
import sys, time, gc, statistics, json, os, pathlib
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
dev = torch.device('cuda', 0)
def med(fn, n=400, drain=True):
    for _ in range(30): fn()
    torch.cuda.synchronize()
    ts = []
    gc.disable()
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        if drain: torch.cuda.synchronize()
    gc.enable()
    return round(statistics.median(ts) * 1e6, 1)
rng = np.random.default_rng(0)
def mk(n, W, hi, mix=False):
    from bench_common import batch_inputs
    if mix: return batch_inputs(n, rng)
    s = rng.integers(200, hi, n).astype(np.int32); pages = -(-s // 16)
    bt = np.where(np.arange(W) < pages[:, None], rng.integers(1, 1 << 20, (n, W)), 0).astype(np.int32)
    return dict(query_lens=np.ones(n, np.int32), seq_lens=s, block_table=bt, block_size=16)
out = {}
held = []
for label, backend, kw in [('common decode 256x512', 'common', mk(256, 512, 8000)),
                           ('common mix 256x512', 'common', mk(256, 512, 8000, mix=True)),
                           ('common decode 32x128', 'common', mk(32, 128, 2000)),
                           ('flashinfer decode 32x128', 'flashinfer', mk(32, 128, 2000))]:
    b = attnsync.Batch(**kw); md = attnsync.build(b, backend=backend)
    def lower_held():  # every lowering kept for two steps: never reused (the pre-reuse cost)
        held.append(at.lower(md, dev)); 
        if len(held) > 3: held.pop(0)
    r = {
        'batch': med(lambda: attnsync.Batch(**kw)),
        'build': med(lambda: attnsync.build(b, backend=backend)),
        'lower (reused)': med(lambda: at.lower(md, dev)),
        'lower (held, fresh)': med(lower_held),
        'build+lower': med(lambda: at.lower(attnsync.build(b, backend=backend), dev)),
        'batch+build+lower': med(lambda: at.lower(attnsync.build(attnsync.Batch(**kw), backend=backend), dev)),
        'build+lower no drain': med(lambda: at.lower(attnsync.build(b, backend=backend), dev), drain=False),
    }
    held.clear()
    out[label] = r
    print(label, r, flush=True)
# primitives
bt = mk(256, 512, 8000)['block_table']
pinned = torch.empty(bt.nbytes, dtype=torch.uint8, pin_memory=True); pn = pinned.numpy().view(np.int32).reshape(bt.shape)
plain = np.empty_like(bt)
d = torch.empty(bt.nbytes, dtype=torch.uint8, device=dev)
prim = {
  'copyto 512KB -> pinned': med(lambda: np.copyto(pn, bt)),
  'copyto 512KB -> plain': med(lambda: np.copyto(plain, bt)),
  'u32 max 512KB': med(lambda: bt.view(np.uint32).max()),
  'copy_ 512KB pinned non_blocking': med(lambda: d.copy_(pinned, non_blocking=True)),
  'copy_ 4KB pinned non_blocking': med(lambda: d[:4096].copy_(pinned[:4096], non_blocking=True)),
  'storage use count': med(lambda: torch._C._storage_Use_Count(d.untyped_storage()._cdata)),
  'getrefcount': med(lambda: sys.getrefcount(d)),
}
out['primitives'] = prim; print(prim, flush=True)
try:
    from line_profiler import LineProfiler
    import io
    kw = mk(256, 512, 8000); b = attnsync.Batch(**kw)
    lp = LineProfiler(at.lower, at._lower_reusing, at.Stager._fill, at.Stager._copy_to, at._Reusable.counts,
                      attnsync._spec.build_common, type(at.default_stager(dev)._ring).acquire)
    f = lp(lambda: at.lower(attnsync.build(b), dev))
    for _ in range(2000):
        f(); torch.cuda.synchronize()
    s = io.StringIO(); lp.print_stats(stream=s, output_unit=1e-6)
    pathlib.Path(os.environ['OUT'], 'lineprof.txt').write_text(s.getvalue())
except Exception as e:
    print('line profile failed', e)
pathlib.Path(os.environ['OUT'], 'prof3.json').write_text(json.dumps(out, indent=1))
