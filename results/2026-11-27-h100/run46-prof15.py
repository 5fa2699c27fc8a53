"""Session 6, before/after on one host: session 5's last code (b101bdd, in .gpu/old) and this
session's, one process each, alternating, three times."""
import json, os, subprocess, sys, statistics
res = {'old (b101bdd)': [], 'new': []}
for _ in range(3):
    for tag, path in (('old (b101bdd)', '.gpu/old'), ('new', '.')):
        env = {**os.environ, 'PYTHONPATH': f"{os.path.abspath(path)}:/tmp/site"}
        p = subprocess.run([sys.executable, '.gpu/prof15_one.py'], env=env, capture_output=True, text=True, timeout=120)
        line = [l for l in p.stdout.splitlines() if l.startswith('ONE ')]
        res[tag].append(json.loads(line[0][4:]) if line else {'error': p.stderr[-500:]})
        print(tag, res[tag][-1], flush=True)
summary = {tag: {k: statistics.median([r[k] for r in runs if k in r]) for k in runs[0] if k != 'code' and k != 'error'} for tag, runs in res.items()}
print('PROF15 ' + json.dumps(summary))
