#!/usr/bin/env bash
# Run attnsync's GPU suite on a GPU host and collect the results in OUTDIR.
#
#   scripts/gpu-suite.sh OUTDIR [tests|bench|verify|all]   (default all; each part alone fits one 10-minute call)
#
# The host is prepared as /work/shared/GPU.md says: python3 with torch, jax (CUDA plugin),
# triton, numpy, pytest, hypothesis; FlashInfer comes as wheels in .whl/ and is installed here
# into /tmp/site when it is not importable. Steps, each with its own timeout, in this order:
#   env          card (nvidia-smi), versions, date
#   gpu-tests    python -m pytest tests -m "gpu or multigpu" -rA
#   demo         python -m attnsync demo --json
#   bench_common bench/bench_common.py --out ...      (--quick when time is short)
#   bench_native, decode_loop, graph_decode_loop, bench_turboquant, bench_flex, bench_tree, bench_mamba
#                bench/NAME.py --out ...   (ATTNSYNC_BENCHES picks and orders them; set but empty: none)
#   rest-tests   python -m pytest tests -m "not gpu and not multigpu" -rA
# A failing or timed-out step is recorded and the suite goes on. The whole run keeps within
# SUITE_BUDGET_S seconds (default 530: the device tool stops a command at 600).
# OUTDIR gets at most 8 files, none in sub-folders (the device tool returns 8):
#   report.json summary.md pytest.log junit.xml demo.json steps.log bench_common.json decode_loop.json
# Exit status: 0 when every step passed, 1 otherwise, 2 on bad usage.
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "$1" ]; then
  echo "usage: scripts/gpu-suite.sh OUTDIR [tests|bench|verify|all]" >&2
  exit 2
fi
PART=${2:-all}
case "$PART" in tests|bench|verify|all) ;; *) echo "part must be tests, bench, verify or all" >&2; exit 2 ;; esac
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
SITE=${ATTNSYNC_SITE:-/tmp/site}
BUDGET=${SUITE_BUDGET_S:-530}
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$OUT/steps.log"
: >"$OUT/pytest.log"
printf 'step\trc\tseconds\ttimeout_s\tnote\n' >"$WORK/steps.tsv"

export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX next to torch on one GPU (GPU.md)
export PYTHONUNBUFFERED=1

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# run_step NAME CAP RESERVE LOG CMD...: run CMD with a timeout of min(CAP, remaining - RESERVE)
# seconds (RESERVE is kept for the steps after it), append its output to LOG, record the result.
run_step() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local limit
  limit=$(( $(remaining) - reserve ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    printf '%s\t-1\t0\t0\tnot run: out of time budget\n' "$name" >>"$WORK/steps.tsv"
    echo "[gpu-suite] $name: not run (out of time budget)"
    return 0
  fi
  echo "=== $name (timeout ${limit}s): $*" >>"$log"
  local t0 rc note=""
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="timed out after ${limit}s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$note" >>"$WORK/steps.tsv"
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s ${note}" >>"$log"
  echo "[gpu-suite] $name: exit $rc after $(( $(date +%s) - t0 ))s ${note}"
}

# FlashInfer from the wheels in .whl/, unless it is importable already.
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("flashinfer") is None)' 2>/dev/null; then
  run_step install-flashinfer 120 0 "$OUT/steps.log" \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi

# attnsync's compiled twin of its hot numpy steps (attnsync/_accel.py), unless built already; a
# failed build leaves the numpy forms running, as env.json's "attnsync_native" then shows.
if ! "$PY" -W error -c 'import sys; from attnsync import _accel; sys.exit(_accel.native is None)' 2>/dev/null; then
  run_step build-native 120 0 "$OUT/steps.log" "$PY" -m attnsync._native_build
fi

# Card, versions, date.
{
  date -u +%Y-%m-%dT%H:%M:%SZ >"$WORK/date.txt"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/card.txt" 2>&1
  else
    echo "no nvidia-smi on this host" >"$WORK/card.txt"
  fi
}
run_step env 60 0 "$OUT/steps.log" "$PY" - "$WORK/env.json" <<'PY'
import importlib, json, platform, sys

out = {"python": platform.python_version(), "executable": sys.executable}
for name in ("numpy", "torch", "jax", "jaxlib", "triton", "flashinfer", "attnsync", "pytest", "hypothesis"):
    try:
        module = importlib.import_module(name)
        out[name] = str(getattr(module, "__version__", "unknown"))
    except Exception as exc:
        out[name] = f"not importable ({type(exc).__name__}: {str(exc)[:160]})"
try:
    from attnsync import _accel
    out["attnsync_native"] = _accel.native is not None
except Exception as exc:
    out["attnsync_native"] = f"unknown ({type(exc).__name__})"
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["torch_gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as exc:
    out["torch_gpus"] = f"unavailable ({type(exc).__name__})"
try:
    import jax
    out["jax_devices"] = [str(d) for d in jax.devices()]
except Exception as exc:
    out["jax_devices"] = f"unavailable ({type(exc).__name__}: {str(exc)[:160]})"
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps(out, indent=1))
PY

PYTEST=("$PY" -m pytest tests -rA -v -o junit_family=xunit1)
# Several test processes share the GPU when pytest-xdist is there (one file per worker: the
# FlashInfer and Triton JIT caches are per process), and a per-test timeout keeps one slow
# compile from eating the whole budget.
"$PY" -c 'import xdist' 2>/dev/null && PYTEST+=(-n "${ATTNSYNC_WORKERS:-4}" --dist loadfile)
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout "${ATTNSYNC_TEST_TIMEOUT:-240}")
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  run_step gpu-tests "${ATTNSYNC_GPU_TESTS_CAP:-420}" 60 "$WORK/pytest-gpu.log" \
    "${PYTEST[@]}" -m "gpu or multigpu" --junitxml="$WORK/junit-gpu.xml"
  cat "$WORK/pytest-gpu.log" >>"$OUT/pytest.log" 2>/dev/null
fi

if [ "$PART" = bench ] || [ "$PART" = all ]; then
BENCHES=()
for name in ${ATTNSYNC_BENCHES-bench_native decode_loop graph_decode_loop bench_turboquant bench_flex bench_tree bench_mamba}; do
  [ -f "bench/$name.py" ] && BENCHES+=("$name")
done
# Reserves scale with the benches still to come (30 s each, enough for a quick run), so a short
# budget drops the later benches before the demo and bench_common (the core target), not after.
LATER=$((30 * ${#BENCHES[@]}))
run_step demo 90 $((LATER + 40)) "$WORK/demo.err" sh -c '"$1" -m attnsync demo --json >"$2"' sh "$PY" "$OUT/demo.json"
cat "$WORK/demo.err" >>"$OUT/steps.log" 2>/dev/null

quick=()
[ "$(remaining)" -lt 300 ] && quick=(--quick)
run_step bench_common 120 "$LATER" "$WORK/bench_common.out" \
  "$PY" bench/bench_common.py --out "$WORK/bench_common" ${quick[@]+"${quick[@]}"}
cat "$WORK/bench_common.out" >>"$OUT/steps.log" 2>/dev/null

for name in ${BENCHES[@]+"${BENCHES[@]}"}; do
  quick=()
  [ "$(remaining)" -lt 240 ] && quick=(--quick)
  # its full serving loop outlasts the step's 150 s cap (run 30: timed out, nothing written)
  [ "$name" = bench_turboquant ] && quick=(--quick)
  run_step "$name" 150 30 "$WORK/$name.out" \
    "$PY" "bench/$name.py" --out "$WORK/$name" ${quick[@]+"${quick[@]}"}
  cat "$WORK/$name.out" >>"$OUT/steps.log" 2>/dev/null
done
fi
if [ "$PART" = verify ] || { [ "$PART" = all ] && [ "${ATTNSYNC_VERIFY:-1}" != 0 ]; }; then
  # One process per backend side by side, merged into one matrix (scripts/verify-parallel.sh).
  mkdir -p "$WORK/verify"
  run_step verify "${ATTNSYNC_VERIFY_CAP:-300}" 20 "$WORK/verify.err" \
    env PYTHON="$PY" scripts/verify-parallel.sh "$WORK/verify" --cases 1 --time-budget "${ATTNSYNC_VERIFY_BUDGET_S:-200}"
  cat "$WORK/verify.err" >>"$OUT/steps.log" 2>/dev/null
fi

# ATTNSYNC_REST_TESTS=0 leaves the CPU tests to CI when device time is short.
if { [ "$PART" = tests ] || [ "$PART" = all ]; } && [ "${ATTNSYNC_REST_TESTS:-1}" != 0 ]; then
  run_step rest-tests 240 20 "$WORK/pytest-rest.log" \
    "${PYTEST[@]}" -m "not gpu and not multigpu" --junitxml="$WORK/junit-rest.xml"
  cat "$WORK/pytest-rest.log" >>"$OUT/pytest.log" 2>/dev/null
fi

# report.json, summary.md, merged junit.xml, bench JSON copies.
"$PY" - "$OUT" "$WORK" "$BUDGET" "$START" <<'PY'
import glob, json, os, re, shutil, sys, time
import xml.etree.ElementTree as ET

out, work, budget, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
MAX_FILES = 8


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return {"error": f"{os.path.basename(path)}: {type(exc).__name__}: {exc}"}


def test_file(case):
    """tests/x.py of a junit testcase (xunit1 has `file`; else walk the dotted classname)."""
    if case.get("file"):
        return case.get("file")
    parts = case.get("classname", "").split(".")
    for n in range(len(parts), 0, -1):
        path = "/".join(parts[:n]) + ".py"
        if os.path.exists(path):
            return path
    return case.get("classname", "?")


def parse_junit(xml_path, log_path):
    """Per-file pass/fail/skip counts from junit XML, or from the -v log if pytest was killed."""
    files, failures, measured = {}, [], []
    if os.path.exists(xml_path):
        root = ET.parse(xml_path).getroot()
        for case in root.iter("testcase"):
            name = f"{test_file(case)}::{case.get('name')}"
            kind = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    kind = "failed"
                    failures.append({"test": name, "message": (child.get("message") or "")[:300]})
                    break
                if child.tag == "skipped":
                    kind = "skipped"
            counts = files.setdefault(test_file(case), {"passed": 0, "failed": 0, "skipped": 0})
            counts[kind] += 1
            for prop in case.iter("property"):  # record_property: JIT times, errors per dtype, stall times
                measured.append({"test": name, "name": prop.get("name"), "value": prop.get("value")})
        source = "junit"
    else:
        # "path::test STATUS" (plain -v) or "[gw0] [ 7%] STATUS path::test" (pytest-xdist)
        plain = re.compile(r"^(tests/\S+?\.py)::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
        xdist = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+?\.py)::(\S+)")
        seen = set()
        for line in read(log_path).splitlines():
            m = plain.match(line)
            if m:
                path, name, status = m.group(1), m.group(2), m.group(3)
            else:
                m = xdist.match(line)
                if not m:
                    continue
                status, path, name = m.group(1), m.group(2), m.group(3)
            if (path, name) in seen:
                continue
            seen.add((path, name))
            kind = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed"}.get(
                status, "skipped")
            if kind == "failed":
                failures.append({"test": f"{path}::{name}", "message": "see pytest.log"})
            counts = files.setdefault(path, {"passed": 0, "failed": 0, "skipped": 0})
            counts[kind] += 1
        source = "log (no junit XML: pytest did not finish)" if files else "none"
    totals = {k: sum(c[k] for c in files.values()) for k in ("passed", "failed", "skipped")}
    return {"source": source, "totals": totals, "per_file": dict(sorted(files.items())), "failures": failures,
            "measured": measured}


steps = []
for line in read(os.path.join(work, "steps.tsv")).splitlines()[1:]:
    name, rc, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
    status = "ok" if rc == "0" else ("not run" if rc == "-1" else "failed")
    steps.append({"step": name, "status": status, "exit": int(rc), "seconds": int(seconds),
                  "timeout_s": int(limit), "note": note})
# pytest exit 5 = no test selected (no GPU test exists yet): not a failure of the suite.
for step in steps:
    if step["step"].endswith("-tests") and step["exit"] == 5:
        step["status"], step["note"] = "ok", (step["note"] + " no tests selected").strip()

tests = {run: parse_junit(os.path.join(work, f"junit-{run}.xml"), os.path.join(work, f"pytest-{run}.log"))
         for run in ("gpu", "rest")}

# One junit.xml with both runs.
merged = ET.Element("testsuites")
for run in ("gpu", "rest"):
    path = os.path.join(work, f"junit-{run}.xml")
    if os.path.exists(path):
        root = ET.parse(path).getroot()
        for suite in ([root] if root.tag == "testsuite" else list(root)):
            suite.set("name", f"{suite.get('name', 'pytest')}-{run}")
            merged.append(suite)
ET.ElementTree(merged).write(os.path.join(out, "junit.xml"), encoding="utf-8", xml_declaration=True)

demo_doc = load_json(os.path.join(out, "demo.json"))
demo = {}
for backend, rep in (demo_doc.get("backends") or {}).items():
    if rep.get("status") != "ok":
        demo[backend] = {"status": rep.get("status"), "reason": rep.get("reason")}
        continue
    demo[backend] = {
        fw: {k: low.get(k) for k in ("status", "reason", "path", "h2d_copies", "syncs") if k in low}
        for fw, low in rep.get("lowerings", {}).items()
    }

bench = {}
# (the order JSON copies are kept in while OUTDIR has room, and summary.md's order)
BENCHES = ("bench_common", "decode_loop", "bench_native", "graph_decode_loop", "bench_turboquant",
           "bench_flex", "bench_tree", "bench_mamba", "verify")
for name in BENCHES:
    folder = os.path.join(work, name)
    if not os.path.isdir(folder):
        continue
    docs = {os.path.basename(p): load_json(p) for p in sorted(glob.glob(os.path.join(folder, "*.json")))}
    others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")) if not p.endswith(".json"))
    bench[name] = docs if len(docs) != 1 else next(iter(docs.values()))
    if others:
        bench[name + "_files_not_kept"] = others
    # Keep one JSON copy per bench while OUTDIR stays within MAX_FILES (report.json and
    # summary.md are still to come); report.json holds every bench anyway.
    for path in sorted(glob.glob(os.path.join(folder, "*.json")))[:1]:
        if len(os.listdir(out)) + 2 < MAX_FILES:
            shutil.copy(path, os.path.join(out, f"{name}.json"))

env = load_json(os.path.join(work, "env.json"))
report = {
    "date": read(os.path.join(work, "date.txt")).strip(),
    "card": read(os.path.join(work, "card.txt")).strip(),
    "versions": env,
    "budget_s": budget,
    "elapsed_s": int(time.time()) - start,
    "steps": steps,
    "tests": tests,
    "demo": demo,
    "bench": bench,
}
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1)

md = [f"# attnsync GPU suite, {report['date']}", "",
      f"- card: {report['card'] or 'unknown'}",
      "- versions: " + ", ".join(f"{k} {env.get(k)}" for k in ("python", "torch", "jax", "triton", "flashinfer", "numpy")),
      f"- torch CUDA {env.get('torch_cuda')}, GPUs {env.get('torch_gpus')}; JAX devices {env.get('jax_devices')}",
      f"- elapsed {report['elapsed_s']} s of a {budget} s budget", "",
      "## Steps", "", "| step | status | exit | seconds | timeout | note |", "|---|---|---:|---:|---:|---|"]
md += [f"| {s['step']} | {s['status']} | {s['exit']} | {s['seconds']} | {s['timeout_s']} | {s['note']} |" for s in steps]
for run, res in tests.items():
    t = res["totals"]
    md += ["", f"## Tests: {run} ({res['source']})", "",
           f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped", "",
           "| file | passed | failed | skipped |", "|---|---:|---:|---:|"]
    md += [f"| {path} | {c['passed']} | {c['failed']} | {c['skipped']} |" for path, c in res["per_file"].items()]
    if res["failures"]:
        md += ["", "Failures:"] + [f"- `{x['test']}`: {x['message'].splitlines()[0] if x['message'] else ''}"
                                   for x in res["failures"][:40]]
    if res.get("measured"):
        md += ["", "Measured by the tests (record_property: first-use JIT seconds, relative errors per dtype, host ms while a sleep kernel keeps the GPU busy):", "",
               "| test | quantity | value |", "|---|---|---:|"]
        md += [f"| `{x['test']}` | {x['name']} | {x['value']} |" for x in res["measured"]]
demo_ran = os.path.exists(os.path.join(out, "demo.json"))  # the tests-only part runs no demo
md += ["", "## Demo (attnsync demo --json)", ""]
md += (["| backend | framework | status | H2D copies | syncs |", "|---|---|---|---:|---|"] if demo_ran
       else ["not part of this run"])
for backend, fws in demo.items():
    if "status" in fws and not isinstance(fws.get("status"), dict):
        md.append(f"| {backend} | - | {fws['status']} | - | {fws.get('reason')} |")
        continue
    for fw, low in fws.items():
        md.append(f"| {backend} | {fw} | {low.get('status')} | {low.get('h2d_copies', '-')} | "
                  f"{low.get('syncs', low.get('reason', '-'))} |")
if demo_ran and "error" in demo_doc:
    md.append(f"demo.json unreadable: {demo_doc['error']}")
for name in BENCHES:
    text = read(os.path.join(work, f"{name}.out"))
    if name == "verify":  # the merged matrix as printed (scripts/verify-parallel.sh)
        text = read(os.path.join(work, "verify", "verify.txt"))
    if text:
        lines = [l for l in text.splitlines() if not l.startswith("===")]
        md += ["", f"## {name}", ""] + (["```"] + lines[-150:] + ["```"] if name == "verify" else lines[-80:])
md += ["", "Files: report.json (all of the above as data), pytest.log, junit.xml, demo.json, steps.log, "
       "bench JSON copies."]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print("\n".join(md[:12 + len(steps)]))
for run, res in tests.items():
    print(f"tests {run}: {res['totals']}")
PY
report_rc=$?

ls -1 "$OUT"
failed=$(awk -F'\t' 'NR > 1 && $2 != 0 && !($1 ~ /-tests$/ && $2 == 5) {n++} END {print n + 0}' "$WORK/steps.tsv")
echo "[gpu-suite] done in $(( $(date +%s) - START ))s; failed steps: $failed; results in $OUT"
[ "$failed" -eq 0 ] && [ "$report_rc" -eq 0 ]
