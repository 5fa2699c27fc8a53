"""Run 6: host-time profile of Batch, build and lower pieces on the GPU host (kept to reproduce run6-lower-profile.json)."""
import sys, time, gc, statistics, json
sys.path.insert(0, '.')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
from attnsync.adapters.torch import views_of, _plan_of, _layout_of
dev = torch.device('cuda', 0)
def med(fn, n=300):
    for _ in range(30): fn()
    torch.cuda.synchronize()
    ts = []
    gc.disable()
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    gc.enable()
    return round(statistics.median(ts) * 1e6, 1)
rng = np.random.default_rng(0)
def mk(n, W, hi):
    s = rng.integers(200, hi, n).astype(np.int32); pages = -(-s // 16)
    bt = np.where(np.arange(W) < pages[:, None], rng.integers(1, 1 << 20, (n, W)), 0).astype(np.int32)
    return dict(query_lens=np.ones(n, np.int32), seq_lens=s, block_table=bt, block_size=16)
out = {}
for backend, n, W, hi in [('common', 256, 512, 8000), ('common', 32, 128, 2000), ('flashinfer', 32, 128, 2000), ('flashinfer', 256, 512, 8000)]:
    kw = mk(n, W, hi); b = attnsync.Batch(**kw)
    md = attnsync.build(b, backend=backend)
    tmd = at.lower(md, dev)
    plan = _plan_of(md)
    staged = {f: md.__dict__[f] for f in plan.device_fields}
    layout = _layout_of(plan, staged)
    stager = at.default_stager(dev)
    buf = stager.stage(layout, staged)
    r = {
        'batch': med(lambda: attnsync.Batch(**kw)),
        'build': med(lambda: attnsync.build(b, backend=backend)),
        'lower': med(lambda: at.lower(md, dev)),
        'build+lower': med(lambda: at.lower(attnsync.build(b, backend=backend), dev)),
        'stage': med(lambda: stager.stage(layout, staged)),
        'views_of': med(lambda: views_of(buf, layout)),
        'torch.empty': med(lambda: torch.empty(layout.nbytes, dtype=torch.uint8, device=dev)),
    }
    out[f'{backend} {n}x{W}'] = r
    print(backend, n, W, r, flush=True)
import pathlib, os
pathlib.Path(os.environ.get('OUT', '/tmp')).joinpath('prof_lower.json').write_text(json.dumps(out, indent=1))
