#!/usr/bin/env bash
# Run `attnsync verify` with one process per backend, side by side, and merge the parts.
#
#   scripts/verify-parallel.sh OUTDIR [attnsync verify options...]
#
# The matrix's cells are independent per backend, and on a GPU host most of the time goes to
# each backend's kernel compiles and stall probes, so the backends run in parallel processes
# (each with the given options plus --backend NAME --out PART.json) and
# `attnsync verify --merge` joins them into one matrix. Writes OUTDIR/verify.json (the merged
# report) and OUTDIR/verify.txt (the printed matrix), plus OUTDIR/parts/ with each part's
# report and stderr. Exit status: that of the merge (0 pass, 1 a failure, 3 stopped early),
# 2 when a part left no report.
set -uo pipefail
if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: scripts/verify-parallel.sh OUTDIR [attnsync verify options...]" >&2
  exit 2
fi
OUT=$1
shift
PY=${PYTHON:-python3}
mkdir -p "$OUT/parts" || exit 2
backends=$("$PY" -c 'import attnsync; print(" ".join(attnsync.available_backends()))') || exit 2
pids=()
for backend in $backends; do
  "$PY" -m attnsync verify "$@" --no-progress --backend "$backend" --out "$OUT/parts/$backend.json" \
    >"$OUT/parts/$backend.txt" 2>"$OUT/parts/$backend.err" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
parts=()
for backend in $backends; do
  if [ ! -s "$OUT/parts/$backend.json" ]; then
    echo "verify-parallel: backend $backend left no report (see $OUT/parts/$backend.err)" >&2
    tail -5 "$OUT/parts/$backend.err" >&2
    exit 2
  fi
  parts+=("$OUT/parts/$backend.json")
done
"$PY" -m attnsync verify --merge "${parts[@]}" --out "$OUT/verify.json" >"$OUT/verify.txt"
status=$?
cat "$OUT/verify.txt"
exit $status
