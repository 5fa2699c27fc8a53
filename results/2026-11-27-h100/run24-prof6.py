"""Session 4: host calibration + the three target paths' pieces, interleaved, on the GPU host."""
import sys, time, gc, statistics, json, os, pathlib
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
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
out = {'threads': torch.get_num_threads(), 'cpu': open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0]}
rng = np.random.default_rng(1)
src = rng.integers(0, 1 << 20, (256, 512)).astype(np.int32)
pinned = torch.empty(src.nbytes, dtype=torch.uint8, pin_memory=True)
pv = pinned.numpy().view(np.int32).reshape(256, 512)
tsrc = torch.from_numpy(src); tpin = pinned.view(torch.int32).view(256, 512)
small = np.arange(32, dtype=np.int32)
dbuf = torch.empty_like(pinned, device=dev)
ev = torch.cuda.Event()
def tcopy(): tpin.copy_(torch.from_numpy(src))
out['calib'] = interleaved({
    'empty call': lambda: None,
    'np small add': lambda: small + 1,
    'np copyto 512KB pinned': lambda: np.copyto(pv, src),
    'torch copy_ 512KB pinned (from_numpy each)': tcopy,
    'torch copy_ 512KB pinned': lambda: tpin.copy_(tsrc),
    'h2d 512KB nb': lambda: dbuf.copy_(pinned, non_blocking=True),
    'event record': lambda: ev.record(),
})
for nt in (1, 4):
    torch.set_num_threads(nt)
    out[f'calib threads={nt}'] = interleaved({'torch copy_ 512KB pinned': lambda: tpin.copy_(tsrc)})
torch.set_num_threads(out['threads'])
print(out, flush=True)
from bench_common import all_decode_inputs
b = attnsync.Batch(**all_decode_inputs(256, rng)); md = attnsync.build(b)
out['common 256 all-decode'] = interleaved({
    'build': lambda: attnsync.build(b),
    'lower': lambda: at.lower(md, 'cuda'),
    'build+lower': lambda: at.lower(attnsync.build(b), 'cuda'),
})
print(out, flush=True)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-seq.max() // 16))
table = rng.integers(0, 1 << 16, (32, width)).astype(np.int32)
kw = dict(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=16)
fb = attnsync.Batch(**kw); fmd = attnsync.build(fb, backend="flashinfer")
out['flashinfer 32'] = interleaved({
    'build': lambda: attnsync.build(fb, backend="flashinfer"),
    'build common': lambda: attnsync.build(fb),
    'lower': lambda: at.lower(fmd, "cuda"),
    'build+lower': lambda: at.lower(attnsync.build(fb, backend="flashinfer"), "cuda"),
})
print(out, flush=True)
from attnsync.adapters import flex_torch as ft
from bench_flex import decode_batch, Q_BLOCK, PAGE, CONTEXT
n = 256
num_pages = 1 + n * -(-CONTEXT[1] // PAGE) + n
fbat = decode_batch(n, num_pages, shared_prefix_pages=0, seed=n)
opts = dict(q_block_size=Q_BLOCK, inverse_table="device", block_sparse="device")
first = attnsync.build(fbat, backend="flex", **opts); opts["max_kv_blocks"] = first.max_kv_blocks
cap = ft.CapturedBlockLists(first, dev)
xmd = attnsync.build(fbat, backend="flex", **opts)
from torch.nn.attention.flex_attention import create_block_mask
compiled = torch.compile(create_block_mask)
mm = ft.paged_mask_mod(ft.lower(xmd, dev))
base = lambda: compiled(mm, None, None, xmd.num_actual_tokens, num_pages * PAGE, device=dev, BLOCK_SIZE=(Q_BLOCK, PAGE))
for _ in range(5): base()
out['flex 256'] = interleaved({
    'build': lambda: attnsync.build(fbat, backend="flex", **opts),
    'step': lambda: cap.step(xmd),
    'lower persistent': lambda: at.lower(xmd, cap.stager.device, stager=cap.stager),
    'replay': lambda: cap.graph.replay(),
    'build+step': lambda: cap.step(attnsync.build(fbat, backend="flex", **opts)),
    'create_block_mask compiled': base,
})
out['flex 256']['ratio'] = round(out['flex 256']['create_block_mask compiled'] / out['flex 256']['build+step'], 2)
print(out, flush=True)
pathlib.Path(os.environ['OUT'], 'prof6.json').write_text(json.dumps(out, indent=1))
