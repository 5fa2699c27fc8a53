"""Session 6: why does bench_common's all-decode build+torch read higher than a standalone
loop on the same host? Measure it (bench's `measure` and prof12-style blocks) before and after
bench_common's sweep, in one process."""
import sys, time, gc, statistics, json
sys.path.insert(0, '.'); sys.path.insert(0, 'bench')
import numpy as np, torch, attnsync
from attnsync.adapters import torch as at
import bench_common as bc
sync = torch.cuda.synchronize
rng = np.random.default_rng(7)
inputs = bc.all_decode_inputs(256, rng)
b = attnsync.Batch(**inputs)
fn = lambda: at.lower(attnsync.build(b), 'cuda')
def blocks():
    meds = []
    gc.disable()
    for _ in range(8):
        for _ in range(5): fn()
        ts = []
        for _ in range(100):
            sync(); t = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t)
        meds.append(statistics.median(ts) / 1e3)
    gc.enable()
    return round(statistics.median(meds), 2)
out = {}
def point(tag):
    out[tag] = {'bench measure': round(bc.measure(fn, sync, reps=200, warmup=20, budget_s=2.0)['median'], 2),
                'blocks': blocks()}
    st = at.default_stager(at._as_device('cuda'))
    out[tag]['pools'] = len(st._pools)
    print(tag, out[tag], flush=True)
point('fresh process')
report = bc.run(quick=True)
out['sweep all-decode build+torch'] = round(report['target_all_decode']['measured_us'], 2)
point('after the sweep')
st = at.default_stager(at._as_device('cuda'))
st._forget_lowerings()
point('after the sweep, pools forgotten')
print('PROF14 ' + json.dumps(out))
