"""Session 3: where the reused CUDA lowering's host time goes, op by op, on the GPU host."""
import sys, time, gc, statistics, json, os, pathlib
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
from bench_common import all_decode_inputs, batch_inputs
dev = torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu')
def med(fn, n=400, drain=True):
    for _ in range(30): fn()
    torch.cuda.synchronize()
    ts = []
    gc.disable()
    for _ in range(n):
        t = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t)
        if drain: torch.cuda.synchronize()
    gc.enable()
    return round(statistics.median(ts) / 1e3, 2)
rng = np.random.default_rng(0)
out = {}
def mkfi(n, W, hi):
    s = rng.integers(200, hi, n).astype(np.int32); pages = -(-s // 16)
    bt = np.where(np.arange(W) < pages[:, None], rng.integers(1, 1 << 20, (n, W)), 0).astype(np.int32)
    return dict(query_lens=np.ones(n, np.int32), seq_lens=s, block_table=bt, block_size=16)
cases = [('common all-decode 256x512', 'common', all_decode_inputs(256, rng)),
         ('common decode-heavy 256x512', 'common', batch_inputs(256, rng)),
         ('common decode 32x128', 'common', mkfi(32, 128, 2000)),
         ('flashinfer decode 32x128', 'flashinfer', mkfi(32, 128, 2000))]
for label, backend, kw in cases:
    b = attnsync.Batch(**kw); md = attnsync.build(b, backend=backend)
    r = {'batch': med(lambda: attnsync.Batch(**kw)), 'build': med(lambda: attnsync.build(b, backend=backend)),
         'lower': med(lambda: at.lower(md, dev)), 'lower no drain': med(lambda: at.lower(md, dev), drain=False),
         'build+lower': med(lambda: at.lower(attnsync.build(b, backend=backend), dev)),
         'build+lower no drain': med(lambda: at.lower(attnsync.build(b, backend=backend), dev), drain=False)}
    # the pieces of the reused path
    plan = at._plan_of(md); stager, _ = at._stager_for(dev, None); values = md.__dict__
    arrays = [values[f] for f in plan.array_fields]
    key = (plan, tuple([a.shape for a in arrays]), tuple([a.dtype for a in arrays]), torch._C._cuda_getCurrentStream(0))
    entry = stager._reusable[key][1]
    stream = torch._C._cuda_getCurrentStream(0); so = stager._stream_object(stream)
    arrays = [values[f] for f in plan.array_fields]
    r['pieces'] = {
        'plan_of': med(lambda: at._plan_of(md)),
        'stager_for': med(lambda: at._stager_for('cuda', None)),
        'key': med(lambda: (plan, tuple([a.shape for a in [values[f] for f in plan.array_fields]]), tuple([a.dtype for a in arrays]), torch._C._cuda_getCurrentStream(0))),
        'users': med(lambda: entry.users()),
        'event query': med(lambda: at._event_query(entry.event)),
        'pack': med(lambda: [np.copyto(t, values[n], casting='unsafe') for n, t in entry.targets]),
        'copy_': med(lambda: entry.device_buffer.copy_(entry.pinned, non_blocking=True)),
        'event record': med(lambda: at._event_record(entry.event, so)),
        'mirrors': med(lambda: [np.copyto(t, values[n], casting='unsafe') for n, t in entry.mirror_targets]),
        'scalars': med(lambda: entry.lowered.__dict__.update(zip(plan.scalar_names, plan.scalars_of(values)))),
        'nbytes staged': entry.layout.nbytes,
    }
    out[label] = r
    print(label, json.dumps(r), flush=True)
pathlib.Path(os.environ['OUT'], 'prof4.json').write_text(json.dumps(out, indent=1))
