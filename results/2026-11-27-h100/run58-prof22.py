"""Session 7: where the FlashInfer 32-decode build + lower goes on a GPU host: loops against
drained single calls, lowering to cuda against cpu, and the reused CUDA lowering in segments."""
import time, statistics, json, sys, gc
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
from attnsync import _accel
perf = time.perf_counter_ns
def loop(fn, n=3000, rounds=7):
    for _ in range(300): fn()
    r = []
    for _ in range(rounds):
        s = perf()
        for _ in range(n): fn()
        r.append((perf() - s) / n / 1e3)
    return round(statistics.median(r), 3)
def drained(fn, n=2000):
    for _ in range(50): fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        s = perf(); fn(); ts.append(perf() - s)
    return round(statistics.median(ts) / 1e3, 3)
torch.zeros(1, device='cuda'); torch.cuda.synchronize()
rng = np.random.default_rng(0); PAGE = 16
seq = rng.integers(200, 2001, 32).astype(np.int32)
table = rng.integers(0, 1 << 16, (32, int(-(-(seq.max() + 400) // PAGE)))).astype(np.int32)
fixed = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table, block_size=PAGE)
wide = rng.integers(100, 8193, 256).astype(np.int32)
wide_table = np.where(np.arange(512) < (-(-wide // PAGE))[:, None], rng.integers(1, 1 << 20, (256, 512)), 0).astype(np.int32)
common = attnsync.Batch(query_lens=np.ones(256, np.int32), seq_lens=wide, block_table=wide_table, block_size=PAGE)
small = np.arange(256, dtype=np.int32)
gc.disable()
out = {}
mdf = attnsync.build(fixed, backend='flashinfer'); mdc = attnsync.build(common)
cases = {
    'probe np add 256': lambda: small + 1,
    'empty lambda': lambda: None,
    'fi build': lambda: attnsync.build(fixed, backend='flashinfer'),
    'fi lower cuda': lambda: at.lower(mdf, 'cuda'),
    'fi lower cpu': lambda: at.lower(mdf, 'cpu'),
    'fi b+l cuda': lambda: at.lower(attnsync.build(fixed, backend='flashinfer'), 'cuda'),
    'common build': lambda: attnsync.build(common),
    'common lower cuda': lambda: at.lower(mdc, 'cuda'),
    'common lower cpu': lambda: at.lower(mdc, 'cpu'),
    'common b+l cuda': lambda: at.lower(attnsync.build(common), 'cuda'),
}
for name, fn in cases.items():
    out[name] = {'loop': loop(fn), 'drained': drained(fn)}
    print(name, out[name], flush=True)
# segments of the reused CUDA lowering (a replica of _lower_reusing's steps, timed between)
def segments(md, drain, n=2000):
    plan = at._plan_of(md); stager, _ = at._stager_for('cuda', None)
    at.lower(md, 'cuda'); at.lower(md, 'cuda')
    acc = {}
    values = md.__dict__
    for i in range(n + 50):
        if drain: torch.cuda.synchronize()
        t = [perf()]
        plan2 = at._plan_of(md); stager, target = at._stager_for('cuda', None); t.append(perf())
        arrays = plan.arrays_of(values); stream = at._current_stream_key(stager._device_index)
        shapes = tuple([a.shape for a in arrays]); key = (plan, shapes, None, stream); t.append(perf())
        with stager._lock:
            pool = stager._reusable.get(key); turn = pool[0] = 3 - pool[0]; entry = pool[turn]; t.append(perf())
            ok = entry.users() == entry.baseline; t.append(perf())
            q = at._event_query(entry.event); t.append(perf())
            done = _accel.native.pack(entry.pack_targets, entry.pack_sources(values)); t.append(perf())
            cur = at._current_cuda_device() == stager._device_index; t.append(perf())
            stager._direct.copy_to_device(*entry.copy_args); t.append(perf())
            at._event_record(entry.event, entry.stream); t.append(perf())
            lowered = entry.lowered; lowered.__dict__.update(zip(plan.scalar_names, plan.scalars_of(values))); t.append(perf())
        assert ok and done == len(entry.pack_pairs)
        if i >= 50:
            for k, lab in enumerate(['plan+stager', 'arrays,stream,key', 'lock,pool', 'users()', 'event query', 'pack', 'cur device', 'memcpyAsync', 'event record', 'scalars']):
                acc.setdefault(lab, []).append(t[k + 1] - t[k])
            acc.setdefault('total', []).append(t[-1] - t[0])
    return {k: round(statistics.median(v) / 1e3, 3) for k, v in acc.items()}
for drain in (False, True):
    for name, md in (('fi', mdf), ('common', mdc)):
        tag = f'{name} lower segments, {"drained" if drain else "back to back"}'
        out[tag] = segments(md, drain); print(tag, out[tag], flush=True)
print('PROF22 ' + json.dumps(out))
