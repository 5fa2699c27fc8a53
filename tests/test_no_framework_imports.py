"""`import attnsync` and the numpy paths never load a framework (DESIGN.md section 3).

Each check runs in a fresh interpreter: in this process pytest has long imported torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "jaxlib", "triton", "flashinfer")

NUMPY_ONLY = """
import attnsync
batch = attnsync.Batch(query_lens=[1, 3], seq_lens=[17, 3], block_table=[[4, 9], [2, 0]], block_size=16,
                       padded_num_reqs=4, padded_num_tokens=8)
md = attnsync.build(batch)
assert md.slot_mapping.tolist() == [144, 32, 33, 34, -1, -1, -1, -1]
perm, ordered = attnsync.reorder(batch)
attnsync.build(ordered, backend="common")
import attnsync.testing
attnsync.testing.brute_force_common(batch)
import attnsync.backends.common
import attnsync.adapters
"""


def loaded_frameworks(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_core_imports_no_framework():
    assert loaded_frameworks(NUMPY_ONLY) == []


def test_probe_sees_a_framework_when_one_is_loaded():
    """The same probe reports torch once the torch adapter is imported (so it can fail)."""
    pytest.importorskip("torch")
    assert "torch" in loaded_frameworks(NUMPY_ONLY + "from attnsync.adapters import torch as ast\n")
