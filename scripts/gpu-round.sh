#!/usr/bin/env bash
# One GPU call for this round's evidence (device time is scarce): old code against new side by side,
# the core GPU tests, and the demo.    scripts/gpu-round.sh OUTDIR OLD_CHECKOUT
#   1. FlashInfer from .whl/ into /tmp/site, the compiled twin built in both checkouts;
#   2. bench/compare_commits.py: bench/hot_path_cases.py under OLD and this checkout, alternating blocks;
#   3. each checkout's bench/decode_loop.py --quick once (steps/s of naive, attnsync, planned once);
#   4. the torch-adapter GPU tests (ring, checking, persistent, pinned tables, stalls, equivalence);
#   5. attnsync demo --json (one H2D copy and no sync on every CUDA row).
# Each step has a timeout; OUTDIR gets cmp.json, decode_old.json, decode_new.json, pytest.log, demo.json.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=$1 OLD=$2
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=/tmp/site XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 ATTNSYNC_SITE=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
ls .whl/*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
(cd "$OLD" && "$PY" -m attnsync._native_build >/dev/null) && "$PY" -m attnsync._native_build >/dev/null
echo "== compare"; timeout 100 "$PY" bench/compare_commits.py --old "$OLD" --blocks 4 --iters 1000 --json "$OUT/cmp.json" 2>&1 | tail -8
for side in old new; do
  tree=$PWD; [ "$side" = old ] && tree=$(cd "$OLD" && pwd)
  mkdir -p "/tmp/dl-$side"
  # each side runs its own tree's decode_loop.py (the old one predates the integrations layer)
  echo "== decode_loop $side"; PYTHONPATH="$tree:/tmp/site" timeout 70 "$PY" "$tree/bench/decode_loop.py" --quick --out "/tmp/dl-$side" 2>&1 | grep -iE "steps/s|attnsync|naive|once|error|skipped|\\|" | head -14
  cp "/tmp/dl-$side/decode_loop.json" "$OUT/decode_$side.json" 2>/dev/null
done
echo "== gpu tests"; PYTHONPATH="$PWD:/tmp/site" timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or multigpu" \
  tests/gpu/test_core_gpu.py tests/gpu/test_pinned_tables_gpu.py tests/adapters/test_table_lowering_torch.py tests/adapters/test_block_table_torch.py tests/gpu/test_equivalence_gpu.py -k "not flashinfer" >"$OUT/pytest.log" 2>&1
tail -15 "$OUT/pytest.log"
echo "== demo"; PYTHONPATH="$PWD:/tmp/site" timeout 40 "$PY" -m attnsync demo --json >"$OUT/demo.json" 2>"$OUT/demo.err"; echo "demo exit $?"
"$PY" - "$OUT/demo.json" <<'PY'
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except Exception as exc:
    print("demo json unreadable:", exc); raise SystemExit(0)
def walk(x, path=""):
    if isinstance(x, dict):
        if "h2d_copies" in x and "syncs" in x:
            print(f"{path}: h2d {x['h2d_copies']} syncs {x['syncs']}")
        for k, v in x.items():
            walk(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            walk(v, f"{path}[{i}]")
walk(doc)
PY
