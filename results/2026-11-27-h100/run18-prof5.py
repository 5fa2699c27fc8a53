"""Session 3: flex captured step pieces, FlashInfer 32-decode pieces, interleaved; on the GPU host."""
import sys, time, gc, statistics, json, os, pathlib
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at, flex_torch as ft
from bench_flex import decode_batch, Q_BLOCK, PAGE, CONTEXT
dev = torch.device('cuda', 0)
def interleaved(fns, n=300):
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
out = {}
n = 256
num_pages = 1 + n * -(-CONTEXT[1] // PAGE) + n
b = decode_batch(n, num_pages, shared_prefix_pages=0, seed=n)
opts = dict(q_block_size=Q_BLOCK, inverse_table="device", block_sparse="device")
first = attnsync.build(b, backend="flex", **opts); opts["max_kv_blocks"] = first.max_kv_blocks
cap = ft.CapturedBlockLists(first, dev)
md = attnsync.build(b, backend="flex", **opts)
from torch.nn.attention.flex_attention import create_block_mask
compiled = torch.compile(create_block_mask)
tmd0 = ft.lower(md, dev); mm = ft.paged_mask_mod(tmd0)
base = lambda: compiled(mm, None, None, md.num_actual_tokens, num_pages * PAGE, device=dev, BLOCK_SIZE=(Q_BLOCK, PAGE))
for _ in range(5): base()
out['flex 256'] = interleaved({
    'build': lambda: attnsync.build(b, backend="flex", **opts),
    'build_common': lambda: attnsync.build(b),
    'step': lambda: cap.step(md),
    'lower persistent': lambda: at.lower(md, cap.stager.device, stager=cap.stager),
    'replay': lambda: cap.graph.replay(),
    'build+step': lambda: cap.step(attnsync.build(b, backend="flex", **opts)),
    'create_block_mask compiled': base,
})
print(out, flush=True)
rng = np.random.default_rng(1)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-seq.max() // 16))
table = rng.integers(0, 1 << 16, (32, width)).astype(np.int32)
kw = dict(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=16)
fb = attnsync.Batch(**kw); fmd = attnsync.build(fb, backend="flashinfer")
out['flashinfer 32'] = interleaved({
    'batch': lambda: attnsync.Batch(**kw),
    'build': lambda: attnsync.build(fb, backend="flashinfer"),
    'build common': lambda: attnsync.build(fb),
    'lower': lambda: at.lower(fmd, "cuda"),
    'build+lower': lambda: at.lower(attnsync.build(fb, backend="flashinfer"), "cuda"),
    'lower common': lambda: at.lower(attnsync.build(fb), "cuda"),
    'empty python call': lambda: None,
})
print(out, flush=True)
pathlib.Path(os.environ['OUT'], 'prof5.json').write_text(json.dumps(out, indent=1))
