"""Session 4: paired A/B of direct runtime calls vs torch calls, alternating blocks, GPU host."""
import sys, time, gc, statistics, json, os, pathlib
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at, _cudart
dev = torch.device('cuda', 0)
def block(f, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter_ns(); f(); ts.append(time.perf_counter_ns() - t)
        torch.cuda.synchronize()
    return statistics.median(ts) / 1e3
def ab(fa, fb, rounds=15, n=100):
    for _ in range(50): fa(); fb()
    torch.cuda.synchronize(); gc.disable()
    a, b = [], []
    for r in range(rounds):
        if r % 2: a.append(block(fa, n)); b.append(block(fb, n))
        else: b.append(block(fb, n)); a.append(block(fa, n))
    gc.enable()
    return {'direct': round(statistics.median(a), 2), 'torch': round(statistics.median(b), 2),
            'torch-direct paired median': round(statistics.median([y - x for x, y in zip(a, b)]), 2)}
def stagers():
    at._USE_DIRECT_CALLS = True; d = at.Stager(dev)
    at._USE_DIRECT_CALLS = False; t = at.Stager(dev)
    at._USE_DIRECT_CALLS = True
    assert d._direct is not None and t._direct is None
    return d, t
out = {}
rt = _cudart.runtime()
buf = torch.empty(1 << 16, dtype=torch.uint8, device=dev); pin = torch.empty(1 << 16, dtype=torch.uint8, pin_memory=True)
s = torch.cuda.current_stream(dev); ev = torch.cuda.Event(); ev.record(s)
args = (buf.data_ptr(), pin.data_ptr(), 4096, s.cuda_stream); rargs = (ev.cuda_event, s.cuda_stream)
hb, hp = buf[:4096], pin[:4096]
out['copy 4KB'] = ab(lambda: rt.copy_to_device(*args), lambda: hb.copy_(hp, non_blocking=True))
out['event record'] = ab(lambda: rt.record(*rargs), lambda: at._event_record(ev, s))
out['event query'] = ab(lambda: rt.is_done(rargs[0]), lambda: at._event_query(ev))
print(out, flush=True)
rng = np.random.default_rng(1)
from bench_common import all_decode_inputs
b = attnsync.Batch(**all_decode_inputs(256, rng))
d, t = stagers()
out['common 256 all-decode build+lower'] = ab(lambda: at.lower(attnsync.build(b), dev, stager=d), lambda: at.lower(attnsync.build(b), dev, stager=t))
print(out, flush=True)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-seq.max() // 16))
table = rng.integers(0, 1 << 16, (32, width)).astype(np.int32)
fb = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=16)
d, t = stagers()
out['flashinfer 32 build+lower'] = ab(lambda: at.lower(attnsync.build(fb, backend="flashinfer"), dev, stager=d),
                                      lambda: at.lower(attnsync.build(fb, backend="flashinfer"), dev, stager=t))
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
out['flex 256 build+step'] = ab(lambda: cap_d.step(attnsync.build(fbat, backend="flex", **opts)),
                                lambda: cap_t.step(attnsync.build(fbat, backend="flex", **opts)))
print(out, flush=True)
pathlib.Path(os.environ['OUT'], 'prof8.json').write_text(json.dumps(out, indent=1))
