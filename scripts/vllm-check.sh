#!/usr/bin/env bash
# Compare attnsync with vLLM 0.33.0's own code on this machine (a CPU is enough):
#
#   scripts/vllm-check.sh                 # makes .vllm-venv/ once, then runs pytest -m vllm tests/vllm/
#   scripts/vllm-check.sh -k reorder      # extra arguments go to pytest
#
# The virtual environment (.vllm-venv/, git-ignored) gets vllm==0.33.0 with the torch it pins
# (vLLM 0.33 pins torch==2.14.0; the CUDA build runs on a CPU too), attnsync installed editable
# without its dependencies, and numpy, pytest and hypothesis. Environment:
#   ATTNSYNC_VLLM_VENV  where the environment lives (default .vllm-venv)
#   PYTHON              the interpreter that makes it (default: the first of python3.12, python3.11,
#                       python3.13, python3 that runs and is 3.11-3.14, as vLLM 0.33 requires)
#   VLLM_WHEEL          a local vllm-0.33.0 wheel to install instead of downloading one
# Nothing is downloaded at test time: the tests write a tiny model config locally and run
# with HF_HUB_OFFLINE=1; Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${ATTNSYNC_VLLM_VENV:-.vllm-venv}"
VLLM_VERSION="0.33.0"

if [[ -z "${PYTHON:-}" ]]; then
  # vLLM 0.33 needs Python 3.11 to 3.14; a shim that is on PATH may still not run (pyenv).
  for candidate in python3.12 python3.11 python3.13 python3; do
    if "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 15))' >/dev/null 2>&1; then
      PYTHON="$candidate"; break
    fi
  done
  if [[ -z "${PYTHON:-}" ]]; then
    echo "vllm-check: no Python 3.11-3.14 found; set PYTHON=/path/to/python3.x" >&2; exit 1
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "vllm-check: making $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

installed="$("$PY" - <<'EOF' 2>/dev/null || true
from importlib.metadata import version
print(version("vllm"))
EOF
)"
if [[ "$installed" != "$VLLM_VERSION" ]]; then
  echo "vllm-check: installing vllm==$VLLM_VERSION (and the torch it pins) into $VENV"
  "$PY" -m pip install --upgrade pip >/dev/null
  if [[ -n "${VLLM_WHEEL:-}" ]]; then
    "$PY" -m pip install "$VLLM_WHEEL"
  else
    "$PY" -m pip install "vllm==$VLLM_VERSION"
  fi
fi
"$PY" -m pip install --quiet --no-deps -e .
"$PY" -m pip install --quiet numpy pytest hypothesis

"$PY" - <<'EOF'
import torch, vllm
print(f"vllm-check: vllm {vllm.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
EOF

export HF_HUB_OFFLINE=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1  # vLLM's slot-mapping kernel runs on CPU tensors through the interpreter
fi
exec "$PY" -m pytest -m vllm tests/vllm/ -p no:cacheprovider -q -rs "$@"
