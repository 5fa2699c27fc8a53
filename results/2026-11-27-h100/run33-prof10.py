"""Session 5: where a flex captured step's host time goes (and the common / FlashInfer paths'
pieces), each piece timed in interleaved rounds on the GPU host, GPU drained between calls."""
import sys, time, gc, statistics, json, os, pathlib
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at, flex_torch as ft
dev = torch.device('cuda', 0)
OUT = pathlib.Path(os.environ['OUT'])
def multi(fns, rounds=12, n=100):
    for _ in range(30):
        for f in fns.values(): f()
    torch.cuda.synchronize(); gc.collect(); gc.disable()
    res = {k: [] for k in fns}; names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 else names[::-1]):
            f = fns[k]
            for _ in range(5): f()
            torch.cuda.synchronize()
            ts = []
            for _ in range(n):
                t = time.perf_counter_ns(); f(); ts.append(time.perf_counter_ns() - t)
                torch.cuda.synchronize()
            res[k].append(statistics.median(ts) / 1e3)
    gc.enable()
    return {k: round(statistics.median(v), 2) for k, v in res.items()}
out = {'cpu': open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0]}
small = np.arange(256, dtype=np.int32)
out['calib'] = multi({'empty': lambda: None, 'np add 256': lambda: small + 1}, rounds=4)
from bench_flex import decode_batch, Q_BLOCK, PAGE, CONTEXT
n = 256
num_pages = 1 + n * -(-CONTEXT[1] // PAGE) + n
fb = decode_batch(n, num_pages, shared_prefix_pages=0, seed=n)
opts = dict(q_block_size=Q_BLOCK, inverse_table="device", block_sparse="device")
opts["max_kv_blocks"] = attnsync.build(fb, backend="flex", **opts).max_kv_blocks
md = attnsync.build(fb, backend="flex", **opts)
cap = ft.CapturedBlockLists(md, dev)
sizes = ft._CAPTURED_SIZES
stream = torch.cuda.current_stream(dev)
ev = torch.cuda.Event()
out['flex 256 captured pieces'] = multi({
    'build (device lists)': lambda: attnsync.build(fb, backend="flex", **opts),
    'lower into the persistent stager': lambda: at.lower(md, dev, stager=cap.stager),
    'graph.replay': lambda: cap.graph.replay(),
    'sizes check': lambda: sizes(md) != cap._sizes,
    'step (lower + replay)': lambda: cap.step(md),
    'build + step': lambda: cap.step(attnsync.build(fb, backend="flex", **opts)),
    'event record': lambda: ev.record(stream),
})
print(json.dumps(out, indent=1), flush=True)
from bench_common import all_decode_inputs
rng = np.random.default_rng(1)
b = attnsync.Batch(**all_decode_inputs(256, rng)); cm = attnsync.build(b)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-seq.max() // 16))
fi = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq,
                    block_table=rng.integers(0, 1 << 16, (32, width)).astype(np.int32), block_size=16)
fim = attnsync.build(fi, backend="flashinfer")
out['common 256 / flashinfer 32 pieces'] = multi({
    'common build': lambda: attnsync.build(b),
    'common lower': lambda: at.lower(cm, dev),
    'common build+lower': lambda: at.lower(attnsync.build(b), dev),
    'flashinfer build': lambda: attnsync.build(fi, backend="flashinfer"),
    'flashinfer lower': lambda: at.lower(fim, dev),
    'flashinfer build+lower': lambda: at.lower(attnsync.build(fi, backend="flashinfer"), dev),
})
print(json.dumps(out, indent=1), flush=True)
(OUT / 'prof10.json').write_text(json.dumps(out, indent=1))
