"""Session 6: is host speed a property of the core a process runs on? The numpy-add probe in
one process pinned to each CPU in turn, twice; then prof15's old/new pair pinned to one CPU."""
import json, os, subprocess, sys, statistics, time
import numpy as np
small = np.arange(256, dtype=np.int32)
def probe():
    ts = []
    for _ in range(3000):
        t = time.perf_counter_ns(); small + 1; ts.append(time.perf_counter_ns() - t)
    return round(statistics.median(ts) / 1e3, 3)
cpus = sorted(os.sched_getaffinity(0))
per_cpu = {}
for rnd in range(2):
    for c in cpus:
        os.sched_setaffinity(0, {c})
        time.sleep(0.01)
        per_cpu.setdefault(c, []).append(probe())
os.sched_setaffinity(0, set(cpus))
print('per cpu', per_cpu, flush=True)
best = min(cpus, key=lambda c: statistics.median(per_cpu[c]))
res = {}
for _ in range(2):
    for tag, path in (('old (b101bdd)', '.gpu/old'), ('new', '.')):
        env = {**os.environ, 'PYTHONPATH': f"{os.path.abspath(path)}:/tmp/site"}
        p = subprocess.run(['taskset', '-c', str(best), sys.executable, '.gpu/prof15_one.py'], env=env, capture_output=True, text=True, timeout=120)
        line = [l for l in p.stdout.splitlines() if l.startswith('ONE ')]
        res.setdefault(tag, []).append(json.loads(line[0][4:]) if line else {'error': p.stderr[-300:]})
        print(tag, res[tag][-1], flush=True)
print('PROF16 ' + json.dumps({'per_cpu': per_cpu, 'pinned_to': best, 'runs': res}))
