"""Session 5: does draining the GPU before every call (the benches' way) change a call's host
time? Each path timed (A) with a sync before every call, (B) back to back with a sync every 50
calls only, as a serving loop runs; and (C) its build and lower timed apart inside one call."""
import sys, time, gc, statistics, json, os, pathlib
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from torch.nn.attention.flex_attention import create_block_mask
from attnsync.adapters import torch as at, flex_torch as ft
dev = torch.device('cuda', 0)
OUT = pathlib.Path(os.environ['OUT'])
sync = torch.cuda.synchronize
def timed(f, n, every):
    ts = []
    for i in range(n):
        if i % every == 0: sync()
        t = time.perf_counter_ns(); f(); ts.append(time.perf_counter_ns() - t)
    sync()
    return statistics.median(ts) / 1e3
def split(build, lower, n):
    a, b = [], []
    for _ in range(n):
        sync()
        t0 = time.perf_counter_ns(); md = build(); t1 = time.perf_counter_ns(); lower(md); t2 = time.perf_counter_ns()
        a.append(t1 - t0); b.append(t2 - t1)
    return round(statistics.median(a) / 1e3, 2), round(statistics.median(b) / 1e3, 2)
def compare(name, build, lower, rounds=10, n=100):
    both = lambda: lower(build())
    for _ in range(50): both()
    sync(); gc.collect(); gc.disable()
    r = {'A sync each': [], 'B back to back': [], 'C build': [], 'C lower': [], 'build alone': [], 'lower alone': []}
    md = build()
    for k in range(rounds):
        r['A sync each'].append(timed(both, n, 1))
        r['B back to back'].append(timed(both, n, 50))
        cb, cl = split(build, lower, n); r['C build'].append(cb); r['C lower'].append(cl)
        r['build alone'].append(timed(build, n, 1))
        r['lower alone'].append(timed(lambda: lower(md), n, 1))
    gc.enable()
    out[name] = {k: round(statistics.median(v), 2) for k, v in r.items()}
    print(name, out[name], flush=True)
out = {'cpu': open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0]}
small = np.arange(256, dtype=np.int32)
out['calib np add 256'] = round(timed(lambda: small + 1, 2000, 1), 2)
from bench_common import all_decode_inputs
rng = np.random.default_rng(1)
b = attnsync.Batch(**all_decode_inputs(256, rng))
compare('common 256', lambda: attnsync.build(b), lambda md: at.lower(md, dev))
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-seq.max() // 16))
fi = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq,
                    block_table=rng.integers(0, 1 << 16, (32, width)).astype(np.int32), block_size=16)
compare('flashinfer 32', lambda: attnsync.build(fi, backend="flashinfer"), lambda md: at.lower(md, dev))
from bench_flex import decode_batch, Q_BLOCK, PAGE, CONTEXT
n = 256
num_pages = 1 + n * -(-CONTEXT[1] // PAGE) + n
fb = decode_batch(n, num_pages, shared_prefix_pages=0, seed=n)
opts = dict(q_block_size=Q_BLOCK, inverse_table="device", block_sparse="device")
opts["max_kv_blocks"] = attnsync.build(fb, backend="flex", **opts).max_kv_blocks
cap = ft.CapturedBlockLists(attnsync.build(fb, backend="flex", **opts), dev)
compare('flex 256 captured', lambda: attnsync.build(fb, backend="flex", **opts), cap.step)
# the compiled baseline, both ways
hmd = attnsync.build(fb, backend="flex", q_block_size=Q_BLOCK)
tmd = ft.lower(hmd, dev); mask_mod = ft.paged_mask_mod(tmd)
cbm = torch.compile(create_block_mask)
base = lambda: cbm(mask_mod, None, None, hmd.num_actual_tokens, num_pages * PAGE, device=dev, BLOCK_SIZE=(Q_BLOCK, PAGE))
for _ in range(30): base()
sync(); gc.disable()
out['create_block_mask compiled 256'] = {
    'A sync each': round(statistics.median([timed(base, 40, 1) for _ in range(5)]), 2),
    'B back to back': round(statistics.median([timed(base, 40, 50) for _ in range(5)]), 2)}
gc.enable()
print(json.dumps(out, indent=1), flush=True)
(OUT / 'prof11.json').write_text(json.dumps(out, indent=1))
