"""Session 6: does a live JAX GPU runtime in the process slow torch build+lower? And the
drained vs back-to-back measure. Same calls before and after `import jax` + one GPU array."""
import sys, time, gc, statistics, json
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
from bench_common import all_decode_inputs
sync = torch.cuda.synchronize
def block(fn, n, drain=True):
    ts = []
    for i in range(n):
        if drain or i % 50 == 0: sync()
        t = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t)
    sync()
    return statistics.median(ts) / 1e3
rng = np.random.default_rng(1)
b = attnsync.Batch(**all_decode_inputs(256, rng))
seq = rng.integers(200, 2001, 32).astype(np.int32); width = int(-(-seq.max() // 16))
fi = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=rng.integers(0, 1 << 16, (32, width)).astype(np.int32), block_size=16)
small = np.arange(256, dtype=np.int32)
fns = {'np add 256': lambda: small + 1,
       'common 256 b+l': lambda: at.lower(attnsync.build(b), 'cuda'),
       'flashinfer 32 b+l': lambda: at.lower(attnsync.build(fi, backend='flashinfer'), 'cuda')}
def measure(tag):
    r = {k: {'drained': [], 'back to back': []} for k in fns}
    for _ in range(8):
        for k, fn in fns.items():
            for _ in range(5): fn()
            r[k]['drained'].append(block(fn, 100))
            r[k]['back to back'].append(block(fn, 100, drain=False))
    out[tag] = {k: {m: round(statistics.median(v), 2) for m, v in d.items()} for k, d in r.items()}
    print(tag, out[tag], flush=True)
out = {}
gc.disable()
measure('torch only')
import jax, jax.numpy as jnp
x = jnp.ones(8, device=jax.devices('gpu')[0]); x.block_until_ready()
measure('after import jax + one GPU array')
from attnsync.adapters import jax as aj
for _ in range(20): aj.lower(attnsync.build(b), jax.devices('gpu')[0])
measure('after 20 JAX lowerings')
print('PROF13 ' + json.dumps(out))
