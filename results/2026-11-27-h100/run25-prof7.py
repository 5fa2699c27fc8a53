"""Session 4: A/B of the direct runtime calls against torch's, interleaved, on the GPU host."""
import sys, time, gc, statistics, json, os, pathlib
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
dev = torch.device('cuda', 0)
def interleaved(fns, n=400):
    for f in fns.values():
        for _ in range(30): f()
    torch.cuda.synchronize()
    ts = {k: [] for k in fns}
    gc.disable()
    for _ in range(n):
        for k, f in fns.items():
            t = time.perf_counter_ns(); f(); ts[k].append(time.perf_counter_ns() - t)
            torch.cuda.synchronize()
    gc.enable()
    return {k: round(statistics.median(v) / 1e3, 2) for k, v in ts.items()}
def stagers():
    at._USE_DIRECT_CALLS = True; d = at.Stager(dev)
    at._USE_DIRECT_CALLS = False; t = at.Stager(dev)
    at._USE_DIRECT_CALLS = True
    assert d._direct is not None and t._direct is None
    return d, t
out = {}
rng = np.random.default_rng(1)
from bench_common import all_decode_inputs
b = attnsync.Batch(**all_decode_inputs(256, rng)); md = attnsync.build(b)
d, t = stagers()
out['common 256 all-decode'] = interleaved({
    'build': lambda: attnsync.build(b),
    'lower direct': lambda: at.lower(md, dev, stager=d),
    'lower torch': lambda: at.lower(md, dev, stager=t),
    'build+lower direct': lambda: at.lower(attnsync.build(b), dev, stager=d),
    'build+lower torch': lambda: at.lower(attnsync.build(b), dev, stager=t),
    'build+lower default': lambda: at.lower(attnsync.build(b), 'cuda'),
})
print(out, flush=True)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-seq.max() // 16))
table = rng.integers(0, 1 << 16, (32, width)).astype(np.int32)
kw = dict(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=16)
fb = attnsync.Batch(**kw); fmd = attnsync.build(fb, backend="flashinfer")
d, t = stagers()
out['flashinfer 32'] = interleaved({
    'build': lambda: attnsync.build(fb, backend="flashinfer"),
    'lower direct': lambda: at.lower(fmd, dev, stager=d),
    'lower torch': lambda: at.lower(fmd, dev, stager=t),
    'build+lower direct': lambda: at.lower(attnsync.build(fb, backend="flashinfer"), dev, stager=d),
    'build+lower torch': lambda: at.lower(attnsync.build(fb, backend="flashinfer"), dev, stager=t),
    'empty': lambda: None,
})
print(out, flush=True)
from attnsync.adapters import flex_torch as ft
from bench_flex import decode_batch, Q_BLOCK, PAGE, CONTEXT
n = 256
num_pages = 1 + n * -(-CONTEXT[1] // PAGE) + n
fbat = decode_batch(n, num_pages, shared_prefix_pages=0, seed=n)
opts = dict(q_block_size=Q_BLOCK, inverse_table="device", block_sparse="device")
first = attnsync.build(fbat, backend="flex", **opts); opts["max_kv_blocks"] = first.max_kv_blocks
at._USE_DIRECT_CALLS = False; cap_t = ft.CapturedBlockLists(first, dev)
at._USE_DIRECT_CALLS = True; cap_d = ft.CapturedBlockLists(first, dev)
assert cap_d.stager._direct is not None and cap_t.stager._direct is None
xmd = attnsync.build(fbat, backend="flex", **opts)
from torch.nn.attention.flex_attention import create_block_mask
compiled = torch.compile(create_block_mask)
mm = ft.paged_mask_mod(ft.lower(xmd, dev))
base = lambda: compiled(mm, None, None, xmd.num_actual_tokens, num_pages * PAGE, device=dev, BLOCK_SIZE=(Q_BLOCK, PAGE))
for _ in range(5): base()
r = out['flex 256'] = interleaved({
    'build+step direct': lambda: cap_d.step(attnsync.build(fbat, backend="flex", **opts)),
    'build+step torch': lambda: cap_t.step(attnsync.build(fbat, backend="flex", **opts)),
    'create_block_mask compiled': base,
})
r['ratio direct'] = round(r['create_block_mask compiled'] / r['build+step direct'], 2)
r['ratio torch'] = round(r['create_block_mask compiled'] / r['build+step torch'], 2)
r2 = out['flex 256 no interleave'] = {}
for k, f in (('build+step direct', lambda: cap_d.step(attnsync.build(fbat, backend="flex", **opts))), ('create_block_mask compiled', base)):
    r2.update(interleaved({k: f}, n=300))
r2['ratio'] = round(r2['create_block_mask compiled'] / r2['build+step direct'], 2)
print(out, flush=True)
pathlib.Path(os.environ['OUT'], 'prof7.json').write_text(json.dumps(out, indent=1))
