"""`attnsync verify`: the equivalence matrix, run on whatever this machine has.

Every backend x every framework x a corpus of batches (`attnsync._corpus`: hand-written edge
cases plus seeded realistic steps). Frameworks: ``numpy`` (the host metadata itself, checked
against per-row brute-force oracles), ``torch-cpu``, ``torch-cuda``, ``jax-cpu``, ``jax-gpu``.
Checks (columns of the matrix):

- ``metadata``: every lowered field read back to numpy equals the numpy metadata bit for bit,
  dtype included (torch: the numpy dtype except `slot_mapping`, int64 on the device; JAX:
  int32 everywhere, float32 for float fields), on the right device, scalars equal. For the
  numpy row: every field equals an independent per-row oracle and every array is read-only.
  Batches with inexact rows are lowered to torch with exact *device* lengths (a draw of the
  true lengths below the host bound); the fields the adapter recomputes from them must equal
  the metadata of the exact twin batch.
- ``kernel``: the backend's consumer on a small random cache against its float64 reference
  (batches under a size limit only).
- ``fake_tensor``: the torch side's device code (the adapter's slot-mapping recompute, Flex's
  device builders, the tree and Mamba consumers) run on fake tensors (a data-dependent read
  raises) and under a dispatch spy that records syncing aten ops; the real result must equal
  the host metadata. CPU-side detection for CI; on CUDA the next three columns are the ground
  truth.
- ``syncs`` (CUDA, and JAX's transfer guard on any JAX platform): build and lowering under
  torch's sync debug mode ("warn", counted) and `jax.transfer_guard("disallow")`.
- ``stall`` (CUDA): host time of build + lowering while a sleep kernel occupies the stream,
  against the same call on an idle GPU; a sync costs the rest of the sleep.
- ``h2d`` (CUDA): host-to-device copies per lowering seen by the torch profiler (must be 1).
- ``jax_recompiles`` (JAX): after warm-up, lowering the same batch again and feeding it to a
  jitted consumer must trace and compile nothing.

A cell passes when every case passed or was skipped for a stated reason (at least one passed),
fails on any failing case (the first differing field and index are shown), and is skipped
(with the reason) when no case could run. A refusal the backend documents (FlashInfer and
inexact rows, say) is a skip; any other refusal is a failure. `main` exits non-zero on any
failure.

The package, one job a module: `report` (the report model and its printing), `frameworks`
(the framework probe, shared with `attnsync demo`), `oracles` (the numpy row), `lowering`
(lowering and the metadata column), `kernels` (the kernel column), `checks` (the sync
columns), `runner` (the matrix), `cli` (the command line) and `registry` with `backends/`:
everything specific to one backend is its `BackendCheck` record there.

Frameworks are imported only inside functions: `import attnsync.verify` imports numpy only.
"""

from __future__ import annotations

from .cli import main
from .compare import compare_arrays
from .frameworks import FRAMEWORKS, Framework, environment, probe_frameworks
from .kernels import check_kernel
from .lowering import Case, check_lowered, expected_lower_refusal
from .oracles import (
    brute_force_fields,
    build_options,
    check_numpy,
    exact_twin,
    expected_build_refusal,
    prepare_batch,
    true_seq_lens,
)
from .registry import KERNELS, BackendCheck, backend_check, register, unregister
from .report import FAIL, PASS, SKIP, CaseResult, Cell, Fail, Report, Skip, format_text, merge_reports, write_report
from .runner import CHECKS, run_matrix

# The names the exceptions had when verify was one module (the GPU tests use them).
_Skip, _Fail = Skip, Fail

__all__ = [
    "CHECKS",
    "FAIL",
    "FRAMEWORKS",
    "KERNELS",
    "PASS",
    "SKIP",
    "BackendCheck",
    "Case",
    "CaseResult",
    "Cell",
    "Fail",
    "Framework",
    "Report",
    "Skip",
    "backend_check",
    "brute_force_fields",
    "build_options",
    "check_kernel",
    "check_lowered",
    "check_numpy",
    "compare_arrays",
    "environment",
    "exact_twin",
    "expected_build_refusal",
    "expected_lower_refusal",
    "format_text",
    "main",
    "merge_reports",
    "prepare_batch",
    "probe_frameworks",
    "register",
    "run_matrix",
    "true_seq_lens",
    "unregister",
    "write_report",
]
