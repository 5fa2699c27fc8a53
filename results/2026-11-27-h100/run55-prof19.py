"""Session 6: the CUDA-side primitives of a reused lowering, alone (no profiler), back to back
and with the GPU drained before each call."""
import time, statistics, json
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
def t(fn, n=20000, drain=False):
    for _ in range(200): fn()
    ts = []
    for _ in range(n):
        if drain: torch.cuda.synchronize()
        s = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - s)
    return round(statistics.median(ts) / 1e3, 3)
torch.zeros(1, device='cuda'); torch.cuda.synchronize()
small = np.arange(256, dtype=np.int32)
rng = np.random.default_rng(1)
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-seq.max() // 16))
fi = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=rng.integers(0, 1 << 16, (32, width)).astype(np.int32), block_size=16)
md = attnsync.build(fi, backend='flashinfer')
ev = torch.cuda.Event(); ev.record()
out = {}
for drain in (False, True):
    tag = 'drained' if drain else 'back to back'
    out[tag] = {
        'np add 256': t(lambda: small + 1, drain=drain, n=3000),
        'empty lambda': t(lambda: None, drain=drain, n=3000),
        '_cuda_getDevice': t(torch._C._cuda_getDevice, drain=drain, n=3000),
        '_cuda_getCurrentStream(0)': t(lambda: torch._C._cuda_getCurrentStream(0), drain=drain, n=3000),
        '_stager_for(cuda)': t(lambda: at._stager_for('cuda', None), drain=drain, n=3000),
        'event query': t(lambda: at._event_query(ev), drain=drain, n=3000),
        'fi build': t(lambda: attnsync.build(fi, backend='flashinfer'), drain=drain, n=3000),
        'fi lower': t(lambda: at.lower(md, 'cuda'), drain=drain, n=3000),
        'fi lower, device object': t(lambda d=torch.device('cuda', 0): at.lower(md, d), drain=drain, n=3000),
        'fi build+lower': t(lambda: at.lower(attnsync.build(fi, backend='flashinfer'), 'cuda'), drain=drain, n=3000),
    }
    print(tag, out[tag], flush=True)
print('PROF19 ' + json.dumps(out))
