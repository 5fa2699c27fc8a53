"""Session 5: 512 KB host copy paths (numpy copyto, libc memmove, torch copy_) into pinned memory,
and the lowering with the bulk memmove on and off, paired alternating blocks, on the GPU host."""
import sys, time, gc, statistics, json, os, pathlib, ctypes, io
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
dev = torch.device('cuda', 0)
OUT = pathlib.Path(os.environ['OUT'])
def block(f, n, sync=True):
    ts = []
    for _ in range(n):
        t = time.perf_counter_ns(); f(); ts.append(time.perf_counter_ns() - t)
        if sync: torch.cuda.synchronize()
    return statistics.median(ts) / 1e3
def multi(fns, rounds=12, n=100, sync=True):
    for _ in range(30):
        for f in fns.values(): f()
    torch.cuda.synchronize(); gc.disable()
    res = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 else names[::-1]
        for k in order: res[k].append(block(fns[k], n, sync))
    gc.enable()
    return {k: round(statistics.median(v), 2) for k, v in res.items()}
out = {'cpu': open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0], 'threads': torch.get_num_threads(),
       'numpy': np.__version__}
rng = np.random.default_rng(1)
src = rng.integers(0, 1 << 20, (256, 512)).astype(np.int32)
pinned = torch.empty(src.nbytes, dtype=torch.uint8, pin_memory=True)
pv = pinned.numpy().view(np.int32).reshape(256, 512)
plain = np.empty_like(src)
tsrc = torch.from_numpy(src); tpin = pinned.view(torch.int32).view(256, 512)
mm = ctypes.memmove; dp, sp = pv.ctypes.data, src.ctypes.data
def tcopy1():
    tpin.copy_(tsrc)
fns = {
    'np.copyto -> pinned': lambda: np.copyto(pv, src, casting='unsafe'),
    'memmove -> pinned': lambda: mm(dp, sp, src.nbytes),
    'memmove (with pointer lookup) -> pinned': lambda: mm(dp, src.__array_interface__['data'][0], src.nbytes),
    'np.copyto -> pageable': lambda: np.copyto(plain, src, casting='unsafe'),
    'memmove -> pageable': lambda: mm(plain.ctypes.data, sp, src.nbytes),
    'torch copy_ -> pinned': tcopy1,
}
out['512KB copies, sync between'] = multi(fns)
out['512KB copies, no sync'] = multi(fns, sync=False)
torch.set_num_threads(1)
out['512KB torch copy_ 1 thread'] = multi({'torch copy_ -> pinned': tcopy1})
torch.set_num_threads(out['threads'])
print(json.dumps(out, indent=1), flush=True)
from bench_common import all_decode_inputs
b = attnsync.Batch(**all_decode_inputs(256, rng))
md = attnsync.build(b)
def stager(bulk):
    at._BULK_COPY_BYTES = bulk
    s = at.Stager(dev); at.lower(md, dev, stager=s)  # makes both entries of the pool? one; the next makes the other
    at.lower(md, dev, stager=s)
    at._BULK_COPY_BYTES = 32 * 1024
    return s
sb, sn = stager(32 * 1024), stager(None)
assert any(e.bulk_targets for p in sb._reusable.values() for e in p[1:] if e)
assert not any(e.bulk_targets for p in sn._reusable.values() for e in p[1:] if e)
out['common 256 build+lower'] = multi({'bulk memmove': lambda: at.lower(attnsync.build(b), dev, stager=sb),
                                       'np.copyto': lambda: at.lower(attnsync.build(b), dev, stager=sn)}, rounds=16)
out['common 256 lower only'] = multi({'bulk memmove': lambda: at.lower(md, dev, stager=sb),
                                      'np.copyto': lambda: at.lower(md, dev, stager=sn)}, rounds=16)
out['common 256 build only'] = multi({'build': lambda: attnsync.build(b)}, rounds=4)
t = at.lower(md, dev, stager=sb); torch.cuda.synchronize()
out['values agree'] = bool(np.array_equal(t.block_table_tensor.cpu().numpy(), b.block_table)); del t
print(json.dumps(out, indent=1), flush=True)
try:
    from line_profiler import LineProfiler
    import attnsync._spec as spm
    texts = []
    for bulk, s in (('bulk', sb), ('copyto', sn)):
        lp = LineProfiler(); lp.add_function(at._lower_reusing); lp.add_function(spm.build_common); lp.add_function(spm._decode_slots)
        w = lp(lambda: at.lower(attnsync.build(b), dev, stager=s))
        for _ in range(2000): w(); torch.cuda.synchronize()
        buf = io.StringIO(); lp.print_stats(stream=buf, output_unit=1e-6, stripzeros=True)
        texts.append(f'==== {bulk} ====\n' + buf.getvalue())
    (OUT / 'prof9-lineprof.txt').write_text('\n'.join(texts))
except Exception as e:
    out['lineprof error'] = repr(e)
(OUT / 'prof9.json').write_text(json.dumps(out, indent=1))
