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
  device builders) run on fake tensors (a data-dependent read raises) and under a dispatch spy
  that records syncing aten ops; the real result must equal the host metadata. CPU-side
  detection for CI; on CUDA the next three columns are the ground truth.
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

Frameworks are imported only inside functions: `import attnsync.verify` imports numpy only.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from . import __version__
from ._batch import Batch, reorder
from ._build import build
from ._corpus import corpus
from ._spec import array_fields, scalar_fields
from ._validate import INT32_MAX, SpecError
from .backends import BACKENDS, available_backends, backend_module

FRAMEWORKS = ("numpy", "torch-cpu", "torch-cuda", "jax-cpu", "jax-gpu")
CHECKS = ("metadata", "kernel", "fake_tensor", "syncs", "stall", "h2d", "jax_recompiles")
PASS, FAIL, SKIP = "pass", "fail", "skip"

# Build options of each backend for the corpus. Model shapes are small so that the kernel
# check runs in seconds on a CPU (Triton through its interpreter there).
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16
TREE = "[(0,), (1,), (0, 0)]"  # three drafted nodes + the root: L = 4, the tree's decode threshold
TREE_SIZE = 4
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "common": {},
    "flashinfer": {},
    # num_cache_pages is added per batch (largest page id + 1, see `build_options`)
    "flex": {"q_block_size": 16},
    "mamba": {"variant": "mamba2", "chunk_size": 64},
    "tree": {"speculative_token_tree": TREE},
    # split_kv_min_seq_len 0: small decode-only batches take the split-KV path too, so the
    # kernel check covers both launch shapes on the corpus
    "triton": {"num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
               "split_kv_min_seq_len": 0},
    "turboquant": {},
}
# Decode threshold each backend's builder needs the batch ordered by (the corpus is ordered
# for threshold 1; tree attention counts rows of up to L tokens as decodes).
REORDER_THRESHOLD = {"tree": TREE_SIZE}

# Kernel checks run only on batches under these limits: the references are dense and slow.
KERNEL_MAX_TOKENS = 512
KERNEL_MAX_GATHER = 1 << 20  # T x W x block_size: keys gathered per token by the JAX references
KERNEL_MAX_SLOTS = 1 << 18  # cache slots (pages x block_size) allocated for the random cache
KERNEL_MAX_DENSE = 1 << 22  # T x cache slots: the dense mask of the Flex references
SCALE = 1.0 / math.sqrt(HEAD_DIM)
STALL_SLEEP_MS = 50.0


# ---------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class CaseResult:
    """One check of one corpus case: status, a short reason (skips) and details."""

    case: str
    status: str
    reason: str = ""
    detail: str = ""
    value: Any = None


@dataclasses.dataclass
class Cell:
    """One (backend, framework, check) cell of the matrix, aggregated over the corpus."""

    backend: str
    framework: str
    check: str
    status: str
    detail: str
    applicable: bool = True
    cases: list[CaseResult] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.framework}/{self.check}"


@dataclasses.dataclass
class Report:
    """What `run_matrix` found: the cells, the environment and the run's configuration."""

    cells: list[Cell]
    environment: dict[str, Any]
    config: dict[str, Any]
    elapsed_s: float = 0.0

    @property
    def failed(self) -> bool:
        """True when any cell failed."""
        return any(cell.status == FAIL for cell in self.cells)

    @property
    def summary(self) -> dict[str, int]:
        """Cells per status (not-applicable cells counted apart)."""
        counts = collections.Counter(
            cell.status if cell.applicable else "n/a" for cell in self.cells
        )
        return {key: counts.get(key, 0) for key in (PASS, FAIL, SKIP, "n/a")}

    def cell(self, backend: str, framework: str, check: str) -> Cell:
        """The cell of `backend` x `framework` x `check`."""
        for cell in self.cells:
            if (cell.backend, cell.framework, cell.check) == (backend, framework, check):
                return cell
        raise KeyError((backend, framework, check))

    def to_dict(self) -> dict[str, Any]:
        """The whole report as JSON-able data."""
        return {
            "attnsync": __version__,
            "environment": self.environment,
            "config": self.config,
            "elapsed_s": round(self.elapsed_s, 3),
            "summary": self.summary,
            "failed": self.failed,
            "cells": [
                {**{k: v for k, v in dataclasses.asdict(cell).items() if k != "cases"},
                 "cases": [dataclasses.asdict(c) for c in cell.cases]}
                for cell in self.cells
            ],
        }


    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report `to_dict` wrote (for example a saved `--out` file)."""
        cells = [
            Cell(**{k: v for k, v in cell.items() if k != "cases"},
                 cases=[CaseResult(**case) for case in cell.get("cases", [])])
            for cell in data["cells"]
        ]
        return cls(cells=cells, environment=data["environment"], config=data["config"],
                   elapsed_s=float(data.get("elapsed_s", 0.0)))


def merge_reports(reports: Sequence[Report]) -> Report:
    """One report from runs over disjoint sets of backends (one process per backend, say).

    The runs must share the corpus (seed, cases, request limit), frameworks and checks; a
    backend in two runs, or differing settings, raise `SpecError`. The merged run's time is
    the longest of the parts (they ran side by side); it is stopped early if any part was.
    """
    if not reports:
        raise SpecError("merge: expected at least one report.")
    first = reports[0].config
    same = ("seed", "cases", "max_reqs", "frameworks", "checks")
    backends: list[str] = []
    for report in reports:
        differs = [key for key in same if report.config.get(key) != first.get(key)]
        if differs:
            raise SpecError(f"merge: the reports differ in {differs}; merge only runs of the same corpus and columns.")
        twice = sorted(set(backends) & set(report.config["backends"]))
        if twice:
            raise SpecError(f"merge: backend(s) {twice} appear in two reports; run each backend once.")
        backends.extend(report.config["backends"])
    order = [b for b in BACKENDS if b in backends] + [b for b in backends if b not in BACKENDS]
    stopped = "; ".join(r.config["stopped"] for r in reports if r.config.get("stopped"))
    config = {**first, "backends": order, "merged_from": len(reports)}
    config.pop("stopped", None)
    if stopped:
        config["stopped"] = stopped
    cells = [cell for backend in order for report in reports for cell in report.cells if cell.backend == backend]
    return Report(cells=cells, environment=reports[0].environment, config=config,
                  elapsed_s=max(r.elapsed_s for r in reports))


class _Skip(Exception):
    """A case that cannot run here: `reason` (groupable) and `detail` (specific)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class _Fail(Exception):
    """A failed check; the message names the field and index where it applies."""


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


# ---------------------------------------------------------------------------------------------
# Comparisons


def compare_arrays(name: str, got: Any, want: Any, *, dtype: Any = None) -> None:
    """Raise `_Fail` naming `name` and the first differing index unless `got` equals `want`.

    `got` and `want` are numpy arrays (or array-likes); `dtype`, when given, is the dtype `got`
    must have. Floats compare bit for bit except that NaN equals NaN (-inf equals -inf anyway).
    """
    got = np.asarray(got)
    want = np.asarray(want)
    if dtype is not None and got.dtype != np.dtype(dtype):
        raise _Fail(f"{name}: dtype {got.dtype}, expected {np.dtype(dtype)}")
    if got.shape != want.shape:
        raise _Fail(f"{name}: shape {got.shape}, expected {want.shape}")
    if got.size == 0:
        return
    if got.dtype.kind == "f" or want.dtype.kind == "f":
        g, w = got.astype(np.float64), want.astype(np.float64)
        differ = (g != w) & ~(np.isnan(g) & np.isnan(w))
    else:
        differ = got.astype(np.int64) != want.astype(np.int64)
    if differ.any():
        index = tuple(int(i) for i in np.argwhere(differ)[0])
        where = index[0] if len(index) == 1 else index
        raise _Fail(
            f"{name}[{where}]: got {got[index].item()!r}, expected {want[index].item()!r} "
            f"({int(differ.sum())} of {got.size} values differ)"
        )


def _compare_scalar(name: str, got: Any, want: Any) -> None:
    if type(got) is not type(want) and not (isinstance(got, int) and isinstance(want, int)):
        raise _Fail(f"{name}: got {got!r} ({type(got).__name__}), expected {want!r} ({type(want).__name__})")
    if got != want:
        raise _Fail(f"{name}: got {got!r}, expected {want!r}")


# ---------------------------------------------------------------------------------------------
# Per-backend preparation and expected refusals


def prepare_batch(backend: str, batch: Batch) -> Batch:
    """The corpus batch in the order `backend` needs (tree attention: decode rows of <= L)."""
    threshold = REORDER_THRESHOLD.get(backend)
    return batch if threshold is None else reorder(batch, decode_threshold=threshold)[1]


def build_options(backend: str, batch: Batch) -> dict[str, Any]:
    """Build options of `backend` for `batch` (`DEFAULT_OPTIONS` plus per-batch values)."""
    options = dict(DEFAULT_OPTIONS.get(backend, {}))
    if backend == "flex" and batch.num_cache_pages is None:
        options["num_cache_pages"] = int(batch.block_table.max(initial=0)) + 1
    return options


def expected_build_refusal(backend: str, batch: Batch, options: dict[str, Any]) -> str | None:
    """Why `backend` documents refusing `batch`, or None when it must accept it."""
    inexact = ~batch.seq_lens_exact
    if backend == "flashinfer" and inexact.any():
        return ("flashinfer needs exact lengths for every row (plan() derives KV lengths from "
                "paged_kv_indptr and last_page_len; attnsync.backends.flashinfer)")
    if backend == "mamba":
        threshold = options.get("decode_threshold") or 1
        if (inexact & (batch.query_lens > threshold)).any():
            return ("mamba runs an inexact row of more than decode_threshold tokens on the prefill "
                    "path, which needs exact lengths (attnsync.backends.mamba)")
    if backend == "flex":
        pages = options.get("num_cache_pages") or batch.num_cache_pages or 1
        if pages * batch.block_size > INT32_MAX:
            return "flex indexes the whole cache as one int32 KV sequence (attnsync.backends.flex)"
    return None


def expected_lower_refusal(framework: str, md: Any) -> str | None:
    """Why the `framework` adapter documents refusing `md`, or None."""
    if framework.startswith("jax") and getattr(md, "slot_mapping_exact", True) is False:
        return ("the JAX adapter lowers exact batches only: it has no device-length recompute "
                "(attnsync.adapters.jax)")
    return None


def true_seq_lens(batch: Batch, rng: np.random.Generator) -> np.ndarray:
    """A draw of exact lengths below the host bound: inexact rows lose up to k rejected drafts.

    A row with 1 + k new tokens carries k drafts; the bound assumes all were accepted, so the
    true length is the bound minus 0..k (and never below the row's query length plus one
    token of context). Padded rows are 0. Shape [padded_num_reqs], int32.
    """
    q = batch.query_lens.astype(np.int64)
    s = batch.seq_lens.astype(np.int64)
    most = np.minimum(np.maximum(q - 1, 0), np.maximum(s - q - 1, 0))
    rejected = np.where(batch.seq_lens_exact, 0, np.floor(rng.random(len(q)) * (most + 1)).astype(np.int64))
    out = np.zeros(batch.padded_num_reqs, dtype=np.int32)
    out[: batch.num_reqs] = s - rejected
    return out


def exact_twin(batch: Batch, lengths: np.ndarray) -> Batch:
    """`batch` with exact `lengths` ([padded_num_reqs]) for every row."""
    return Batch(
        query_lens=batch.query_lens, seq_lens=lengths[: batch.num_reqs], block_table=batch.block_table,
        block_size=batch.block_size, is_prefilling=batch.is_prefilling,
        padded_num_reqs=batch.padded_num_reqs, padded_num_tokens=batch.padded_num_tokens,
        num_cache_pages=batch.num_cache_pages,
    )


# Fields a torch lowering recomputes on the device from exact device lengths.
_DEVICE_RECOMPUTED = {
    "flex": ("seq_lens", "slot_mapping", "decode_offset", "num_blocks_per_seq", "physical_to_logical"),
}
_DEVICE_RECOMPUTED_DEFAULT = ("seq_lens", "slot_mapping")
_SCALAR_OVERRIDES = {"flex": {"all_exact": True}}


# ---------------------------------------------------------------------------------------------
# Oracles for the numpy row: per-row Python, no numpy cleverness


def _pages(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def brute_force_fields(backend: str, batch: Batch, md: Any) -> dict[str, Any]:
    """Expected values of `md`'s fields computed row by row from `batch` (what can be)."""
    from .testing import brute_force_common

    threshold = getattr(md, "decode_threshold", None) or 1
    common = brute_force_common(batch, decode_threshold=threshold if backend == "common" else 1)
    shared = ("query_start_loc", "seq_lens", "block_table", "slot_mapping", "num_reqs",
              "num_actual_tokens", "max_query_len", "max_seq_len")
    if backend == "common":
        want = dict(common)
        want["decode_threshold"] = threshold
        want["block_size"] = batch.block_size
        want["slot_mapping_exact"] = bool(batch.seq_lens_exact.all())
    else:
        want = {k: common[k] for k in shared}
    qsl = [int(x) for x in common["query_start_loc"]]
    lens = [int(x) for x in common["seq_lens"]]
    rows, bs = len(lens), batch.block_size
    table = common["block_table"]
    nd = getattr(md, "num_decodes", 0)
    if backend == "flashinfer":
        indptr, indices, last = [0], [], []
        for r in range(rows):
            n = _pages(lens[r], bs)
            indptr.append(indptr[-1] + n)
            indices.extend(int(x) for x in table[r, :n])
            last.append(0 if lens[r] == 0 else (lens[r] % bs or bs))
        npre = md.num_prefills
        want.update(
            paged_kv_indptr=np.array(indptr, np.int32), paged_kv_indices=np.array(indices, np.int32),
            paged_kv_last_page_len=np.array(last, np.int32),
            prefill_qo_indptr=np.array([qsl[r] - qsl[nd] for r in range(nd, nd + npre + 1)], np.int32),
            prefill_paged_kv_indptr=np.array([indptr[r] - indptr[nd] for r in range(nd, nd + npre + 1)], np.int32),
            num_decode_pages=indptr[nd], num_pages=indptr[-1],
        )
    elif backend == "flex":
        doc = [r for r in range(rows) for _ in range(qsl[r + 1] - qsl[r])]
        doc += [max(rows - 1, 0)] * (md.num_actual_tokens - len(doc))
        offset = [lens[r] - (qsl[r + 1] - qsl[r]) for r in range(rows)]
        want.update(doc_ids=np.array(doc, np.int32), decode_offset=np.array(offset, np.int32),
                    num_blocks_per_seq=np.array([_pages(s, bs) for s in lens], np.int32))
        if not md.inverse_table_on_device:  # pair 20: the dictionary form of the inverse table
            p2l = [[-1] * md.num_cache_pages for _ in range(rows)]
            for r in range(rows):
                for c in range(_pages(lens[r], bs)):
                    page = int(table[r, c])
                    p2l[r][page] = max(p2l[r][page], c)
                if md.num_cache_pages:
                    p2l[r][0] = -1
            want["physical_to_logical"] = np.array(p2l, np.int32).reshape(rows, md.num_cache_pages)
    elif backend == "mamba":
        npre = md.num_prefills
        pre_rows = range(nd, nd + npre)
        computed = [lens[r] - (qsl[r + 1] - qsl[r]) for r in pre_rows]
        want.pop("slot_mapping")
        want.pop("block_table")
        want.pop("query_start_loc")
        base = qsl[nd]
        want.update(
            query_start_loc_p=np.array([qsl[r] - base for r in range(nd, nd + npre + 1)], np.int32),
            num_computed_tokens_p=np.array(computed, np.int32),
            has_initial_states_p=np.array([c > 0 for c in computed], bool),
            prep_initial_states=any(c > 0 for c in computed),
        )
        if md.has_chunk_metadata:  # pair 14: walk the tokens, cut at request and chunk boundaries
            chunk = md.chunk_size
            cu, seq_idx, last, run = [0], [], [], 0
            for i, r in enumerate(pre_rows):
                n = qsl[r + 1] - qsl[r]
                for t in range(n):
                    if t == 0 or (computed[i] + t) % chunk == 0:
                        if t:
                            cu.append(cu[-1] + run)
                        seq_idx.append(i)
                        run = 0
                    run += 1
                if n:
                    cu.append(cu[-1] + run)
                last.append(len(cu) - 2)
            want.update(cu_chunk_seqlen_p=np.array(cu, np.int32), seq_idx_p=np.array(seq_idx, np.int32),
                        last_chunk_indices_p=np.array(last, np.int32), num_chunks=len(seq_idx))
    elif backend == "tree":
        q = [qsl[r + 1] - qsl[r] for r in range(rows)]
        dec, pre = range(nd), range(nd, nd + md.num_prefills)
        want.update(  # pair 8: the four sub-batch maxima from host arrays
            max_decode_query_len=max((q[r] for r in dec), default=0),
            max_decode_seq_len=max((lens[r] for r in dec), default=0),
            max_prefill_query_len=max((q[r] for r in pre), default=0),
            max_prefill_seq_len=max((lens[r] for r in pre), default=0),
            prefill_query_start_loc=np.array([qsl[r] - qsl[nd] for r in range(nd, rows + 1)], np.int32),
        )
    elif backend == "turboquant":
        npre = md.num_prefills
        owners = [r for r in range(rows) for _ in range(qsl[r + 1] - qsl[r])]
        owners += [rows] * (md.num_actual_tokens - len(owners))
        want.update(
            token_to_req=np.array(owners, np.int32),
            prefill_query_start_loc=np.array([qsl[r] - qsl[nd] for r in range(nd, nd + npre + 1)], np.int32),
            prefill_seq_lens=np.array(lens[nd : nd + npre], np.int32),
        )
    elif backend == "triton":
        want["prefix_ranges"] = np.zeros((rows, 0, 2), np.int32)
    return want


def check_numpy(backend: str, batch: Batch, md: Any) -> str:
    """The numpy row's metadata check: dtypes, read-only arrays, brute-force values."""
    for f in array_fields(md):
        value = getattr(md, f.name)
        if not isinstance(value, np.ndarray):
            raise _Fail(f"{f.name}: expected a numpy array, got {type(value).__name__}")
        if value.dtype not in (np.int32, np.bool_, np.float32):
            raise _Fail(f"{f.name}: dtype {value.dtype}, expected int32 (bool/float32 where documented)")
        if value.flags.writeable:
            raise _Fail(f"{f.name}: the array is writeable; built metadata must be read-only")
    want = brute_force_fields(backend, batch, md)
    checked = 0
    for name, value in want.items():
        if not hasattr(md, name):
            continue
        got = getattr(md, name)
        if isinstance(got, np.ndarray):
            compare_arrays(name, got, value, dtype=got.dtype if name == "block_table" else np.asarray(value).dtype)
        else:
            _compare_scalar(name, got, value)
        checked += 1
    return f"{checked} fields equal the brute-force oracle"


# ---------------------------------------------------------------------------------------------
# Frameworks


@dataclasses.dataclass
class _Framework:
    name: str
    available: bool
    detail: str  # version when available, reason otherwise
    device: Any = None  # torch.device or jax.Device


def _prepare_process() -> None:
    """Environment that must be set before the frameworks are imported."""
    # JAX would take 75 % of GPU memory at import, next to torch in this process (GPU.md).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import torch
    except Exception:
        return
    if not torch.cuda.is_available():
        # Without CUDA the Triton kernels run through the interpreter, which is read when the
        # kernels are decorated, i.e. before attnsync.kernels.triton_attention is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")


def probe_frameworks(wanted: Sequence[str]) -> dict[str, _Framework]:
    """Which of `wanted` this process can run, with versions or reasons."""
    out = {"numpy": _Framework("numpy", True, f"numpy {np.__version__}")}
    if any(name.startswith("torch") for name in wanted):
        try:
            import torch

            importlib.import_module("attnsync.adapters.torch")
        except Exception as exc:
            reason = f"torch is not importable ({_error_text(exc)}); install attnsync[torch]"
            out["torch-cpu"] = _Framework("torch-cpu", False, reason)
            out["torch-cuda"] = _Framework("torch-cuda", False, reason)
        else:
            version = f"torch {torch.__version__}"
            out["torch-cpu"] = _Framework("torch-cpu", True, version, torch.device("cpu"))
            if torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
                out["torch-cuda"] = _Framework(
                    "torch-cuda", True, f"{version} on {torch.cuda.get_device_name(device)}", device)
            else:
                why = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
                out["torch-cuda"] = _Framework("torch-cuda", False, f"no CUDA: {version} is {why}")
    if any(name.startswith("jax") for name in wanted):
        try:
            import jax

            importlib.import_module("attnsync.adapters.jax")
        except Exception as exc:
            reason = f"jax is not importable ({_error_text(exc)}); install attnsync[jax]"
            out["jax-cpu"] = _Framework("jax-cpu", False, reason)
            out["jax-gpu"] = _Framework("jax-gpu", False, reason)
        else:
            for name, platform_name in (("jax-cpu", "cpu"), ("jax-gpu", "gpu")):
                try:
                    device = jax.devices(platform_name)[0]
                except RuntimeError:
                    out[name] = _Framework(name, False, f"jax {jax.__version__} has no {platform_name.upper()} platform")
                else:
                    out[name] = _Framework(name, True, f"jax {jax.__version__} on {device}", device)
    return {name: out[name] for name in wanted}


def _torch_lower(backend: str) -> Callable[..., Any]:
    if backend == "flex":
        from .integrations import flex_torch

        return flex_torch.lower
    from .adapters import torch as torch_adapter

    return torch_adapter.lower


def _lower(backend: str, fw: _Framework, md: Any, seq_lens: Any = None) -> Any:
    """Lower `md` to `fw` (torch: with exact device lengths when given)."""
    if fw.name.startswith("torch"):
        return _torch_lower(backend)(md, fw.device, seq_lens=seq_lens)
    from .adapters import jax as jax_adapter

    return jax_adapter.lower(md, fw.device)


def _device_lengths(fw: _Framework, lengths: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int32)).to(fw.device)


# Documented dtype tables of the adapters (attnsync.adapters.torch / .jax module docs).
_TORCH_WIDER = {"slot_mapping": np.int64}


def check_lowered(backend: str, fw: _Framework, md: Any, lowered: Any, *,
                  overrides: dict[str, np.ndarray] | None = None,
                  scalar_overrides: dict[str, Any] | None = None) -> str:
    """Compare every lowered field with `md` (or `overrides` for device-recomputed fields)."""
    overrides = overrides or {}
    scalar_overrides = scalar_overrides or {}
    count = 0
    if fw.name.startswith("torch"):
        import torch

        for f in array_fields(md):
            place = f.metadata["place"]
            value = getattr(md, f.name)
            if place in ("device", "both"):
                name = f.metadata["device_name"] or f.name
                tensor = _attr(lowered, name)
                if not isinstance(tensor, torch.Tensor):
                    raise _Fail(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
                if tensor.device.type != fw.device.type:
                    raise _Fail(f"{name}: on {tensor.device}, expected {fw.device}")
                want = overrides.get(f.name, value)
                compare_arrays(name, tensor.detach().cpu().numpy(), want,
                               dtype=_TORCH_WIDER.get(f.name, value.dtype))
                count += 1
            if place in ("host", "both"):
                name = f.metadata["host_name"] or (f.name if place == "host" else f"{f.name}_cpu")
                tensor = _attr(lowered, name)
                if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                    raise _Fail(f"{name}: expected a CPU torch.Tensor (host mirror), got {_describe(tensor)}")
                compare_arrays(name, tensor.numpy(), value, dtype=value.dtype)
                count += 1
    else:
        import jax

        for f in array_fields(md):
            if f.metadata["place"] not in ("device", "both"):
                continue
            value = getattr(md, f.name)
            leaf = _attr(lowered, f.name)
            if not isinstance(leaf, jax.Array):
                raise _Fail(f"{f.name}: expected a jax.Array, got {type(leaf).__name__}")
            if leaf.devices() != {fw.device}:
                raise _Fail(f"{f.name}: on {sorted(map(str, leaf.devices()))}, expected {fw.device}")
            dtype = np.float32 if value.dtype == np.float32 else np.int32
            compare_arrays(f.name, np.asarray(leaf), overrides.get(f.name, value), dtype=dtype)
            count += 1
    for f in scalar_fields(md):
        _compare_scalar(f.name, _attr(lowered, f.name), scalar_overrides.get(f.name, getattr(md, f.name)))
        count += 1
    return f"{count} fields equal"


def _attr(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        raise _Fail(f"{name}: missing from the lowered {type(obj).__name__}")
    return getattr(obj, name)


def _describe(value: Any) -> str:
    device = getattr(value, "device", None)
    return f"{type(value).__name__}" + (f" on {device}" if device is not None else "")


# ---------------------------------------------------------------------------------------------
# One case: what every framework's checks need


@dataclasses.dataclass
class _Case:
    """A corpus batch prepared for one backend, built, with its exact twin when inexact."""

    name: str
    index: int
    backend: str
    batch: Batch
    options: dict[str, Any]
    md: Any
    lengths: np.ndarray  # exact lengths (a draw below the bound for inexact rows), [R]
    twin_md: Any  # metadata of the exact twin batch, or None when the batch is exact
    seed: int

    @property
    def inexact(self) -> bool:
        return getattr(self.md, "slot_mapping_exact", True) is False


def _lower_case(case: _Case, fw: _Framework) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """Lower a case to `fw`; (lowered, field overrides, scalar overrides) for the comparison."""
    if fw.name.startswith("torch") and case.inexact:
        lowered = _lower(case.backend, fw, case.md, _device_lengths(fw, case.lengths))
        fields = _DEVICE_RECOMPUTED.get(case.backend, _DEVICE_RECOMPUTED_DEFAULT)
        overrides = {name: getattr(case.twin_md, name) for name in fields if hasattr(case.md, name)}
        overrides.update(_torch_device_built(case.backend, case.twin_md))
        return lowered, overrides, dict(_SCALAR_OVERRIDES.get(case.backend, {}))
    if fw.name.startswith("torch"):
        return _lower(case.backend, fw, case.md), _torch_device_built(case.backend, case.md), {}
    return _lower(case.backend, fw, case.md), {}, {}


def _torch_device_built(backend: str, md: Any) -> dict[str, np.ndarray]:
    """Fields the torch lowering builds on the device that the host metadata leaves empty, with
    the host builder's values for them: flex's inverse table (``inverse_table="device"``, which
    "auto" picks for large caches) comes back [R, num_cache_pages], not [R, 0]."""
    if backend != "flex" or not md.inverse_table_on_device:
        return {}
    from .backends.flex import inverse_block_table

    return {"physical_to_logical": inverse_block_table(md.block_table, md.seq_lens, md.block_size,
                                                       md.num_cache_pages)}


# ---------------------------------------------------------------------------------------------
# Kernels: each backend's consumer against its float64 reference


def _kernel_gate(case: _Case) -> None:
    md = case.md
    if case.batch.num_tokens == 0:
        raise _Skip("no tokens to attend")
    if md.num_actual_tokens > KERNEL_MAX_TOKENS:
        raise _Skip(f"batch too large for the kernel check (> {KERNEL_MAX_TOKENS} tokens)",
                    f"{md.num_actual_tokens} tokens")
    batch = case.batch
    slots = (int(batch.block_table.max(initial=0)) + 1) * batch.block_size
    if slots > KERNEL_MAX_SLOTS:
        raise _Skip(f"batch too large for the kernel check (> {KERNEL_MAX_SLOTS} cache slots)",
                    f"{slots} slots")
    gather = md.num_actual_tokens * batch.block_table.shape[1] * batch.block_size
    if gather > KERNEL_MAX_GATHER:
        raise _Skip(f"batch too large for the kernel check (T x W x block_size > {KERNEL_MAX_GATHER})",
                    f"{gather}")


def _attention_inputs(case: _Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    pages = int(case.batch.block_table.max(initial=0)) + 1
    q = rng.standard_normal((case.md.num_actual_tokens, NUM_Q_HEADS, HEAD_DIM)).astype(np.float32)
    shape = (pages, case.batch.block_size, NUM_KV_HEADS, HEAD_DIM)
    return q, rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _reference(case: _Case, q, k, v) -> np.ndarray:
    from .kernels.reference import paged_attention_reference

    md = case.md
    return paged_attention_reference(q, k, v, query_start_loc=md.query_start_loc, seq_lens=case.lengths,
                                      block_table=md.block_table, scale=SCALE, num_reqs=md.num_reqs)


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    from .kernels.reference import relative_error

    return relative_error(out, ref)


def _to_torch(fw: _Framework, *arrays: np.ndarray) -> list[Any]:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a)).to(fw.device) for a in arrays]


def _to_jax(fw: _Framework, *arrays: np.ndarray) -> list[Any]:
    import jax

    return [jax.device_put(np.ascontiguousarray(a), fw.device) for a in arrays]


def _need_triton(fw: _Framework) -> Any:
    try:
        from .kernels import triton_attention
    except Exception as exc:
        raise _Skip("triton is not importable", _error_text(exc)) from None
    if fw.device.type == "cpu" and "Interpret" not in type(triton_attention._paged_attention_kernel).__name__:
        raise _Skip("triton kernels were imported before TRITON_INTERPRET=1 was set; run verify in a "
                    "fresh process")
    return triton_attention


def _kernel_paged(case: _Case, fw: _Framework, lowered: Any) -> tuple[float, float]:
    """common and triton: the Triton kernel (torch) or the JAX reference against float64."""
    q, k, v = _attention_inputs(case)
    ref = _reference(case, q, k, v)
    if fw.name.startswith("torch"):
        import torch

        ta = _need_triton(fw)
        qt, kt, vt = _to_torch(fw, q, k, v)
        out = torch.full_like(qt, float("nan"))
        if case.backend == "triton":
            ta.paged_attention_from_metadata(qt, kt, vt, out, lowered, scale=SCALE)
        else:
            ta.unified_paged_attention(
                qt, kt, vt, out, query_start_loc=lowered.query_start_loc, seq_lens=lowered.seq_lens,
                block_table=lowered.block_table_tensor, max_query_len=lowered.max_query_len,
                max_seq_len=lowered.max_seq_len, num_reqs=lowered.num_reqs, scale=SCALE,
            )
        got = out.cpu().numpy()
        return _relative_error(got, ref), TOL_ATTENTION
    from .kernels import jax_attention

    qj, kj, vj = _to_jax(fw, q, k, v)
    if case.backend == "triton":
        out = jax_attention.paged_attention_jax_from_metadata(qj, kj, vj, lowered, scale=SCALE)
    else:
        out = jax_attention.paged_attention_jax(qj, kj, vj, lowered.query_start_loc, lowered.seq_lens,
                                                lowered.block_table, scale=SCALE)
    return _relative_error(np.asarray(out), ref), TOL_ATTENTION


def _kernel_tree(case: _Case, fw: _Framework, lowered: Any) -> tuple[float, float]:
    from .kernels.tree_reference import tree_paged_attention_reference

    md = case.md
    q, k, v = _attention_inputs(case)
    ref = tree_paged_attention_reference(
        q, k, v, query_start_loc=md.query_start_loc, seq_lens=case.lengths, block_table=md.block_table,
        tree_attn_bias=md.tree_attn_bias, num_decodes=md.num_decodes, scale=SCALE, num_reqs=md.num_reqs,
    )
    if fw.name.startswith("torch"):
        import torch

        from .kernels.tree_reference import tree_paged_attention_torch

        qt, kt, vt = _to_torch(fw, q, k, v)
        out = tree_paged_attention_torch(qt, kt, vt, lowered, scale=SCALE, out=torch.full_like(qt, float("nan")))
        return _relative_error(out.cpu().numpy(), ref), TOL_ATTENTION
    from .kernels.tree_jax import tree_paged_attention_jax

    out = tree_paged_attention_jax(*_to_jax(fw, q, k, v), lowered, scale=SCALE)
    return _relative_error(np.asarray(out), ref), TOL_ATTENTION


def _kernel_flex(case: _Case, fw: _Framework, lowered: Any) -> tuple[float, float]:
    md = case.md
    dense = md.num_actual_tokens * md.total_cache_tokens
    if dense > KERNEL_MAX_DENSE:
        raise _Skip(f"batch too large for the dense Flex references (T x cache slots > {KERNEL_MAX_DENSE})",
                    f"{dense}")
    q, k, v = _attention_inputs(case)
    ref = _reference(case, q, k, v)
    if fw.name.startswith("torch"):
        from .integrations import flex_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            out = flex_torch.flex_paged_attention(*_to_torch(fw, q, k, v), lowered, scale=SCALE)
        return _relative_error(out.float().cpu().numpy(), ref), TOL_ATTENTION
    from .kernels import flex_jax

    out = flex_jax.flex_attention_jax(*_to_jax(fw, q, k, v), lowered, scale=SCALE)
    return _relative_error(np.asarray(out), ref), TOL_ATTENTION


# Tolerances of the kernel check (max |out - ref| / max |ref|): float32 attention; the TurboQuant
# cache is quantized but the reference reads the same bytes; Mamba's scan accumulates over chunks
# (the GPU tests use 2e-4 and 2e-3 for these two); FlashInfer runs in bf16.
TOL_ATTENTION, TOL_TURBOQUANT, TOL_MAMBA, TOL_BF16 = 2e-4, 5e-4, 3e-3, 1e-2

# Mamba2 layer shape of the kernel check: heads, head dim, groups, state size, conv width.
_MAMBA = dict(num_heads=2, head_dim=4, num_groups=1, state_size=4, width=4)


def _kernel_mamba(case: _Case, fw: _Framework, lowered: Any) -> tuple[float, float]:
    from .kernels.mamba_reference import sequential_mixer

    md, batch = case.md, case.batch
    h, g, n = _MAMBA["num_heads"], _MAMBA["num_groups"], _MAMBA["state_size"]
    params = _mamba_params(case)
    shape = dict(num_heads=h, num_groups=g, state_size=n)
    want = sequential_mixer(batch, **{k: v.astype(np.float64) for k, v in params.items()}, **shape,
                            cache_mode=md.cache_mode, decode_threshold=md.decode_threshold)
    return _mamba_compare(case, fw, lowered, params, shape, want)


def _mamba_params(case: _Case) -> dict[str, np.ndarray]:
    """Random float32 inputs of one Mamba2 layer for the case (state slots from the table)."""
    md, batch = case.md, case.batch
    h, p, g, n, width = (_MAMBA[k] for k in ("num_heads", "head_dim", "num_groups", "state_size", "width"))
    rng = np.random.default_rng(case.seed)
    channels = h * p + 2 * g * n
    slots = int(batch.block_table.max(initial=0)) + 1
    tokens = md.num_actual_tokens
    f32 = np.float32
    return dict(
        xbc=rng.standard_normal((tokens, channels)).astype(f32),
        dt_raw=rng.standard_normal((tokens, h)).astype(f32),
        conv_weight=(rng.standard_normal((channels, width)) * 0.5).astype(f32),
        conv_bias=(rng.standard_normal(channels) * 0.1).astype(f32),
        dt_bias=(rng.standard_normal(h) * 0.1).astype(f32),
        A_log=(rng.standard_normal(h) * 0.3).astype(f32),
        D=rng.standard_normal(h).astype(f32),
        conv_state=rng.standard_normal((slots, channels, width - 1)).astype(f32),
        ssm_state=rng.standard_normal((slots, h, p, n)).astype(f32),
    )


def _mamba_compare(case: _Case, fw: _Framework, lowered: Any, params: dict[str, np.ndarray],
                   shape: dict[str, int], want: Any) -> tuple[float, float]:
    md = case.md
    if fw.name.startswith("torch"):
        from .kernels.mamba_reference import mamba2_mixer

        t = dict(zip(params, _to_torch(fw, *params.values()), strict=True))
        got = mamba2_mixer(t.pop("xbc"), t.pop("dt_raw"), **t, md=lowered, **shape)
        got = [x.cpu().numpy() for x in got]
    else:
        import jax

        from .kernels.mamba_jax import mamba2_mixer_jax

        layer = _CACHE.get("mamba_jax")
        if layer is None:
            def mixer(p: dict[str, Any], m: Any) -> Any:
                rest = {k: v for k, v in p.items() if k not in ("xbc", "dt_raw")}
                return mamba2_mixer_jax(p["xbc"], p["dt_raw"], **rest, md=m, **shape)

            layer = _CACHE["mamba_jax"] = jax.jit(mixer)  # the metadata's host ints are static
        j = dict(zip(params, _to_jax(fw, *params.values()), strict=True))
        with jax.transfer_guard("disallow"):
            got = layer(j, lowered)
        got = [np.asarray(x) for x in got]
    real = md.num_scheduled_tokens
    errors = [_relative_error(got[0][:real], want[0][:real])]
    errors += [_relative_error(a, b) for a, b in zip(got[1:], want[1:], strict=True)]
    return max(errors), TOL_MAMBA


def _kernel_turboquant(case: _Case, fw: _Framework, lowered: Any) -> tuple[float, float]:
    from .backends import turboquant as tqb

    md, batch = case.md, case.batch
    rng = np.random.default_rng(case.seed)
    pages = int(batch.block_table.max(initial=0)) + 1
    bs = batch.block_size
    rotation = tqb.rotation_matrix(HEAD_DIM)
    # every byte 0xFF, whose float fields read as NaN: reading a slot that was never written shows
    cache = np.full((pages, NUM_KV_HEADS, bs, tqb.slot_layout(HEAD_DIM).slot_bytes), 0xFF, np.uint8)
    for r in range(batch.num_reqs):
        context = int(case.lengths[r]) - int(batch.query_lens[r])
        if context > 0:
            pos = np.arange(context)
            kk = rng.standard_normal((context, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
            vv = rng.standard_normal((context, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
            slots = batch.block_table[r, pos // bs].astype(np.int64) * bs + pos % bs
            tqb.write_slots(cache, tqb.quantize(kk @ rotation, vv @ rotation), slots)
    t = md.num_actual_tokens
    q = rng.standard_normal((t, NUM_Q_HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((t, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((t, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    if fw.name.startswith("torch"):
        from .kernels import turboquant as tqk

        impl = "triton" if fw.device.type == "cuda" else "torch"  # the interpreter is too slow here
        qt, kt, vt, ct = _to_torch(fw, q, k, v, cache)
        layer = tqk.TurboQuantAttention(NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, device=fw.device, scale=SCALE,
                                        rotation=rotation, impl=impl)
        out = layer.forward(qt, kt, vt, ct, lowered).float().cpu().numpy()
        cache_after = ct.cpu().numpy()
    else:
        from .kernels import turboquant_jax as tqj

        qj, kj, vj, cj, rj = _to_jax(fw, q, k, v, cache, rotation)
        out, cache_after = tqj.forward(qj, kj, vj, cj, lowered, rj, scale=SCALE)
        out, cache_after = np.asarray(out), np.asarray(cache_after)
    ref = tqb.reference_attention(q, k, v, cache_after, md, rotation=rotation, scale=SCALE, seq_lens=case.lengths)
    real = md.num_scheduled_tokens
    return _relative_error(out[:real], ref[:real]), TOL_TURBOQUANT


def _kernel_flashinfer(case: _Case, fw: _Framework, lowered: Any) -> tuple[float, float]:
    if not fw.name == "torch-cuda":
        raise _Skip("FlashInfer runs on CUDA through torch only")
    try:
        import flashinfer
    except Exception as exc:
        raise _Skip("flashinfer is not installed", _error_text(exc)) from None
    import torch

    from .integrations.flashinfer import plan, run, workspace_buffer

    md = case.md
    if md.num_decode_tokens != md.num_decodes:
        # FlashInfer's decode wrapper plans one query token per request; plan() refuses a real
        # decode row without a token, with that reason (found by this matrix on an H100).
        raise _Skip("a real decode row has no new tokens; FlashInfer's decode wrapper plans one per request")

    # bf16 with grouped-query heads and head dim 128: the configuration the GPU tests compile
    # (FlashInfer JIT-compiles per configuration; first use costs ~10 s decode, ~75 s prefill)
    hq, hkv, dim, dtype = 16, 8, 128, torch.bfloat16
    key = ("flashinfer", fw.device)
    wrappers = _CACHE.get(key)
    if wrappers is None:
        wrappers = _CACHE[key] = (
            flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace_buffer(fw.device), "NHD"),
            flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace_buffer(fw.device), "NHD"),
        )
    rng = np.random.default_rng(case.seed)
    pages = int(case.batch.block_table.max(initial=0)) + 1
    shape = (pages, case.batch.block_size, hkv, dim)
    q = torch.from_numpy(rng.standard_normal((case.md.num_actual_tokens, hq, dim), np.float32)).to(fw.device, dtype)
    k = torch.from_numpy(rng.standard_normal(shape, np.float32)).to(fw.device, dtype)
    v = torch.from_numpy(rng.standard_normal(shape, np.float32)).to(fw.device, dtype)
    scale = 1.0 / math.sqrt(dim)
    plan(lowered, decode_wrapper=wrappers[0], prefill_wrapper=wrappers[1], num_qo_heads=hq, num_kv_heads=hkv,
         head_dim=dim, q_data_type=dtype, sm_scale=scale)
    out = torch.full_like(q, float("nan"))
    run(lowered, q, (k, v), decode_wrapper=wrappers[0], prefill_wrapper=wrappers[1], out=out)
    from .kernels.reference import paged_attention_reference

    as_np = [x.float().cpu().numpy() for x in (q, k, v, out)]
    ref = paged_attention_reference(*as_np[:3], query_start_loc=case.md.query_start_loc, seq_lens=case.lengths,
                                    block_table=case.md.block_table, scale=scale, num_reqs=case.md.num_reqs)
    return _relative_error(as_np[3], ref), TOL_BF16  # bf16 output rounding is ~4e-3


# backend -> consumer check(case, framework, lowered) -> (relative error, tolerance)
KERNELS: dict[str, Callable[[_Case, _Framework, Any], tuple[float, float]]] = {
    "common": _kernel_paged,
    "triton": _kernel_paged,
    "tree": _kernel_tree,
    "flex": _kernel_flex,
    "mamba": _kernel_mamba,
    "turboquant": _kernel_turboquant,
    "flashinfer": _kernel_flashinfer,
}
_CACHE: dict[Any, Any] = {}


def check_kernel(case: _Case, fw: _Framework, lowered: Any) -> tuple[str, float]:
    """Run the backend's consumer; (detail, relative error) or raise `_Fail` / `_Skip`."""
    consumer = KERNELS.get(case.backend)
    if consumer is None:
        raise _Skip("no consumer wired for this backend")
    _kernel_gate(case)
    try:
        error, tolerance = consumer(case, fw, lowered)
    except (_Skip, _Fail):
        raise
    except ImportError as exc:
        raise _Skip("the backend's consumer is not importable", _error_text(exc)) from None
    if not error < tolerance:
        raise _Fail(f"output: relative error {error:.3g} >= tolerance {tolerance:g} against the float64 reference")
    return f"relative error {error:.2g} (tolerance {tolerance:g})", error


# ---------------------------------------------------------------------------------------------
# CPU-side sync detection: fake tensors and a dispatch spy


_SYNCING_OPS = frozenset({
    "aten._local_scalar_dense.default",  # .item(), int(t), bool(t), .tolist()
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.bincount.default",
    "aten.repeat_interleave.Tensor",  # only without output_size
})


def _spy_class() -> type:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncSpy(TorchDispatchMode):
        """Records dispatched aten ops whose output needs a device value on the host."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            sized = name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is not None
            if name in _SYNCING_OPS and not sized:
                self.seen.append(name)
            if name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                if i is not None
            ):
                self.seen.append(name + " (bool mask)")
            return func(*args, **kwargs)

    return SyncSpy


def _run_fake(fn: Callable[..., Any], **inputs: Any) -> Any:
    """`fn(**inputs)` on fake copies of every tensor (also inside lowered metadata objects):
    a data-dependent host read raises."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        def fake(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return mode.from_tensor(value)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                tensors = {f.name: mode.from_tensor(getattr(value, f.name)) for f in dataclasses.fields(value)
                           if isinstance(getattr(value, f.name), torch.Tensor)}
                return dataclasses.replace(value, **tensors)
            return value

        return fn(**{k: fake(v) for k, v in inputs.items()})


def _fake_paths(case: _Case) -> list[tuple[str, Callable[..., Any], dict[str, Any], Any]]:
    """(name, device function, real CPU inputs, expected numpy result or None) per device path."""
    import torch

    from .adapters import torch as torch_adapter

    md = case.md
    paths: list[tuple[str, Callable[..., Any], dict[str, Any], Any]] = []
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731 - writable copies of read-only arrays
    if hasattr(md, "slot_mapping") and hasattr(md, "seq_lens") and hasattr(md, "block_table"):
        extra = torch_adapter._slot_mapping_inputs(md)
        inputs = dict(seq_lens=t(case.lengths), block_table=t(md.block_table), req=t(extra["_token_req"]),
                      back=t(extra["_token_back"]))
        want = (case.twin_md if case.inexact else md).slot_mapping

        def slots(**x: Any) -> Any:
            return torch_adapter._device_slot_mapping(**x, block_size=md.block_size)

        paths.append(("slot_mapping recompute (torch adapter)", slots, inputs, want))
    if case.backend == "flex":
        from .integrations import flex_torch

        exact = case.twin_md if case.inexact else md
        total = md.num_scheduled_tokens
        paths.append(("doc_ids_device (flex)", lambda query_start_loc: flex_torch.doc_ids_device(
            query_start_loc, total, padded_tokens=md.num_actual_tokens), dict(query_start_loc=t(md.query_start_loc)),
            md.doc_ids))
        paths.append(("doc_ids_static_device (flex)", lambda query_start_loc: flex_torch.doc_ids_static_device(
            query_start_loc, md.num_actual_tokens), dict(query_start_loc=t(md.query_start_loc)), md.doc_ids))
        paths.append(("physical_to_logical_device (flex)", lambda block_table, seq_lens:
                      flex_torch.physical_to_logical_device(block_table, seq_lens, md.block_size, md.num_cache_pages),
                      dict(block_table=t(md.block_table), seq_lens=t(case.lengths)),
                      None if md.inverse_table_on_device else exact.physical_to_logical))
        if not case.inexact:
            def kv_blocks(doc_ids: Any, query_start_loc: Any, decode_offset: Any, block_table: Any) -> Any:
                return flex_torch.kv_blocks_device(
                    doc_ids, query_start_loc, decode_offset, block_table, block_size=md.block_size,
                    q_block_size=md.q_block_size, max_pages=md.max_pages_per_seq, num_pages=md.num_cache_pages,
                    width=md.max_kv_blocks)

            paths.append(("kv_blocks_device (flex)", kv_blocks,
                          dict(doc_ids=t(md.doc_ids), query_start_loc=t(md.query_start_loc),
                               decode_offset=t(md.decode_offset), block_table=t(md.block_table)),
                          (md.kv_num_blocks, md.kv_indices)))
    paths.extend(_fake_consumers(case))
    return paths


def _fake_consumers(case: _Case) -> list[tuple[str, Callable[..., Any], dict[str, Any], Any]]:
    """The backend's torch consumer (torch implementation) as a device path, on small batches."""
    if case.backend not in ("tree", "mamba"):
        return []
    try:
        _kernel_gate(case)
    except _Skip:
        return []
    import torch

    fw = _Framework("torch-cpu", True, "", torch.device("cpu"))
    lowered, _, _ = _lower_case(case, fw)
    if case.backend == "tree":
        from .kernels.tree_reference import tree_paged_attention_torch

        q, k, v = (torch.from_numpy(a) for a in _attention_inputs(case))
        return [("tree_paged_attention_torch (consumer)",
                 lambda q, k, v, md: tree_paged_attention_torch(q, k, v, md, scale=SCALE),
                 dict(q=q, k=k, v=v, md=lowered), None)]
    from .kernels.mamba_reference import mamba2_mixer

    h, g, n = _MAMBA["num_heads"], _MAMBA["num_groups"], _MAMBA["state_size"]
    params = {name: torch.from_numpy(a) for name, a in _mamba_params(case).items()}
    return [("mamba2_mixer (consumer)",
             lambda md, **p: mamba2_mixer(p.pop("xbc"), p.pop("dt_raw"), **p, md=md, num_heads=h, num_groups=g,
                                          state_size=n),
             dict(params, md=lowered), None)]


def check_fake_tensor(case: _Case, fw: _Framework) -> str:
    """Device-side torch code on fake tensors, under the spy, and its value against the host."""
    try:
        importlib.import_module("torch._subclasses.fake_tensor")
    except Exception as exc:
        raise _Skip("torch FakeTensorMode is not importable", _error_text(exc)) from None
    paths = _fake_paths(case)
    if not paths:
        if case.backend in ("tree", "mamba"):
            _kernel_gate(case)  # the consumer is the device code here: say why it did not run
        raise _Skip("no device-side torch code for this backend's metadata")
    spy_class = _spy_class()
    for name, fn, inputs, want in paths:
        try:
            _run_fake(fn, **inputs)
        except Exception as exc:
            raise _Fail(f"{name}: failed on fake tensors (a data-dependent read?): {_error_text(exc)}") from None
        with spy_class() as spy:
            got = fn(**inputs)
        if spy.seen:
            raise _Fail(f"{name}: dispatched syncing op(s) {sorted(set(spy.seen))}")
        if want is not None:
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                compare_arrays(f"{name} output {i}", g.numpy(), w)
    # and the whole lowering with device lengths, under the spy
    if hasattr(case.md, "slot_mapping_exact") or case.backend == "flex":
        import torch

        spy = spy_class()
        with spy:
            _torch_lower(case.backend)(case.md, "cpu", seq_lens=torch.from_numpy(np.array(case.lengths)))
        if spy.seen:
            raise _Fail(f"lower(md, seq_lens=...): dispatched syncing op(s) {sorted(set(spy.seen))}")
    return f"{len(paths)} device path(s): no data-dependent read, no syncing op, values equal the host"


# ---------------------------------------------------------------------------------------------
# Device checks: syncs, stall, H2D copies, JAX recompiles


def _count_torch_syncs(fn: Callable[[], Any]) -> tuple[int, str, Any]:
    """Run `fn` under torch's sync debug mode "warn"; (syncs seen, first message, result)."""
    import torch

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    # Arming the mode warns once that it "is a prototype feature": that is not a sync.
    syncs = [
        str(w.message) for w in caught
        if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)
    ]
    return len(syncs), (syncs[0].splitlines()[0] if syncs else ""), result


def _step(case: _Case, fw: _Framework) -> Callable[[], Any]:
    """Build and lower the case: one serving step's metadata work."""
    seq_lens = _device_lengths(fw, case.lengths) if (fw.name.startswith("torch") and case.inexact) else None

    def step() -> Any:
        md = build(case.batch, backend=case.backend, **case.options)
        return _lower(case.backend, fw, md, seq_lens)

    return step


def _block(fw: _Framework, value: Any) -> None:
    if fw.name.startswith("jax"):
        import jax

        jax.block_until_ready(value)


def check_syncs(case: _Case, fw: _Framework) -> tuple[str, int]:
    """Build + lower under torch's sync debug mode (CUDA) and JAX's transfer guard (JAX)."""
    step = _step(case, fw)
    if fw.name.startswith("jax"):
        import jax

        inner = step

        def step() -> Any:  # the guarded form of the same step
            with jax.transfer_guard("disallow"):
                return inner()

    _block(fw, step())  # warm-up: first calls compile or allocate
    torch = sys.modules.get("torch")
    guarded = []
    if torch is not None and torch.cuda.is_available() and fw.name in ("torch-cuda", "jax-gpu"):
        try:
            count, first, result = _count_torch_syncs(step)
        except Exception as exc:
            raise _Fail(f"lowering raised under the guards: {_error_text(exc)}") from None
        _block(fw, result)
        if count:
            raise _Fail(f"{count} sync(s) flagged by torch's sync debug mode; first: {first}")
        guarded.append("torch sync debug mode: 0 syncs")
    elif fw.name.startswith("jax"):
        try:
            _block(fw, step())
        except Exception as exc:
            raise _Fail(f"implicit transfer under jax.transfer_guard('disallow'): {_error_text(exc)}") from None
    else:
        raise _Skip("needs CUDA (torch's sync debug mode); see the fake_tensor column for CPU")
    if fw.name.startswith("jax"):
        guarded.append("jax.transfer_guard('disallow'): no implicit transfer")
    return "; ".join(guarded), 0


def check_stall(case: _Case, fw: _Framework) -> tuple[str, float]:
    """Host time of build + lowering with a sleep kernel queued, against an idle GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or fw.name not in ("torch-cuda", "jax-gpu"):
        raise _Skip("needs CUDA (the stall probe queues a sleep kernel)")
    from .testing import host_time_under_busy_gpu

    step = _step(case, fw)
    _block(fw, step())  # warm-up (the syncs column warmed the same step up already)
    torch.cuda.synchronize()
    idle = []
    for _ in range(2):
        start = time.perf_counter()
        _block(fw, step())
        idle.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    t_idle = min(idle)
    sleep_ms = max(STALL_SLEEP_MS, 4 * t_idle)
    for _ in range(3):  # a stall costs every attempt the rest of the sleep, host noise only one
        elapsed, result = host_time_under_busy_gpu(step, sleep_ms=sleep_ms)
        _block(fw, result)
        extra = elapsed - t_idle
        if extra <= sleep_ms / 2:
            break
    detail = f"{elapsed:.3f} ms with a {sleep_ms:.0f} ms kernel queued, {t_idle:.3f} ms on an idle GPU"
    if extra > sleep_ms / 2:
        raise _Fail(f"host stalled: {detail}")
    return detail, round(extra, 4)


def check_h2d(case: _Case, fw: _Framework) -> tuple[str, int]:
    """Host-to-device copies of one lowering (profiler), which must be exactly 1."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or fw.name not in ("torch-cuda", "jax-gpu"):
        raise _Skip("needs CUDA (the torch profiler counts CUDA memcpy activities)")
    from .testing import count_h2d_copies

    seq_lens = _device_lengths(fw, case.lengths) if (fw.name.startswith("torch") and case.inexact) else None
    _block(fw, _lower(case.backend, fw, case.md, seq_lens))  # warm-up: pinned slots allocated
    count, _ = count_h2d_copies(lambda: _block(fw, _lower(case.backend, fw, case.md, seq_lens)))
    if count != 1:
        raise _Fail(f"{count} host-to-device copies in one lowering, expected 1")
    return "1 host-to-device copy per lowering", count


class _CompileCounter:
    """Counts XLA backend compiles while active (one listener for the process)."""

    _registered = False
    count = 0
    active = False

    @classmethod
    def install(cls) -> None:
        if cls._registered:
            return
        import jax

        def listener(event: str, *args: Any, **kwargs: Any) -> None:
            if cls.active and event == "/jax/core/compile/backend_compile_duration":
                cls.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._registered = True


_TRACES = collections.Counter()


def _consumer() -> Any:
    import jax
    import jax.numpy as jnp

    cached = _CACHE.get("jax_consumer")
    if cached is None:
        def consume(tree: Any) -> Any:
            _TRACES["consumer"] += 1  # runs at trace time only
            leaves = jax.tree_util.tree_leaves(tree)
            return sum((jnp.sum(leaf.astype(jnp.float32)) for leaf in leaves), jnp.float32(0))

        cached = _CACHE["jax_consumer"] = jax.jit(consume)
    return cached


def check_jax_recompiles(case: _Case, fw: _Framework) -> tuple[str, int]:
    """After warm-up, lower the same batch again and consume it: no trace, no compile."""
    import jax

    _CompileCounter.install()
    consume = _consumer()
    jax.block_until_ready(consume(_lower(case.backend, fw, case.md)))  # warm-up
    traces = _TRACES["consumer"]
    _CompileCounter.count = 0
    _CompileCounter.active = True
    try:
        with jax.transfer_guard("disallow"):
            lowered = _lower(case.backend, fw, case.md)
        jax.block_until_ready(consume(lowered))
    finally:
        _CompileCounter.active = False
    retraced = _TRACES["consumer"] - traces
    compiles = _CompileCounter.count
    if retraced or compiles:
        raise _Fail(f"after warm-up: {retraced} retrace(s) of the consumer, {compiles} XLA compile(s)")
    return "0 retraces, 0 compiles after warm-up", 0


# ---------------------------------------------------------------------------------------------
# The matrix


def _applicable(check: str, framework: str) -> str | None:
    """None when `check` applies to `framework`, else why not."""
    if framework == "numpy":
        return None if check == "metadata" else "n/a: numpy is the host reference (nothing is lowered)"
    if check == "fake_tensor" and framework != "torch-cpu":
        if framework == "torch-cuda":
            return "n/a: CPU-side check (torch-cpu row); on CUDA the syncs/stall/h2d columns apply"
        return "n/a: torch only"
    if check == "jax_recompiles" and not framework.startswith("jax"):
        return "n/a: JAX only"
    if check in ("stall", "h2d") and framework in ("torch-cpu", "jax-cpu"):
        return "n/a: needs CUDA"
    if check == "syncs" and framework == "torch-cpu":
        return "n/a: needs CUDA (see the fake_tensor column)"
    return None


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar if tqdm is installed, else a simple stderr counter (nothing when disabled)."""

    class Null:
        def update(self, n: int = 1) -> None: ...
        def set_postfix_str(self, text: str) -> None: ...
        def close(self) -> None: ...

    if not enabled:
        return Null()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="attnsync verify", unit="case", file=sys.stderr, leave=False)
    except ImportError:
        pass

    class Counter(Null):
        def __init__(self) -> None:
            self.done, self.text = 0, ""
            self.tty = sys.stderr.isatty()
            self.every = 1 if self.tty else max(1, total // 10)  # a log gets about ten lines

        def update(self, n: int = 1) -> None:
            self.done += n
            if self.done % self.every and self.done != total:
                return
            if self.tty:
                sys.stderr.write(f"\rattnsync verify: {self.done}/{total} {self.text[:60]:<60}")
            else:
                sys.stderr.write(f"attnsync verify: {self.done}/{total} ({self.text})\n")
            sys.stderr.flush()

        def set_postfix_str(self, text: str) -> None:
            self.text = text

        def close(self) -> None:
            if self.tty:
                sys.stderr.write("\n")
                sys.stderr.flush()

    return Counter()


def environment(frameworks: dict[str, _Framework]) -> dict[str, Any]:
    """Versions, card and date of this run (for reports kept next to GPU results)."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "attnsync": __version__,
        "numpy": np.__version__,
    }
    for module in ("torch", "jax", "jaxlib", "triton", "flashinfer", "hypothesis"):
        mod = sys.modules.get(module)
        if mod is None and module in ("triton", "flashinfer"):
            try:
                from importlib import metadata

                env[module] = metadata.version("flashinfer-python" if module == "flashinfer" else module)
            except Exception:
                env[module] = None
            continue
        env[module] = getattr(mod, "__version__", None) if mod is not None else None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["card"] = None
    env["frameworks"] = {name: {"available": fw.available, "detail": fw.detail} for name, fw in frameworks.items()}
    return env


def run_matrix(
    *,
    backends: Sequence[str] | None = None,
    frameworks: Sequence[str] | None = None,
    seed: int = 0,
    cases: int = 4,
    max_reqs: int = 256,
    progress: bool = True,
    checks: Sequence[str] | None = None,
    only_cases: Sequence[str] | None = None,
    time_budget_s: float | None = None,
) -> Report:
    """Run the equivalence matrix on this machine and return the `Report`.

    Args:
        backends: backend names (default: every registered backend).
        frameworks: from `FRAMEWORKS` (default: all; missing ones are skipped with the reason).
        seed: seed of the random corpus batches, the exact-length draws and the kernel inputs.
        cases: random batches after the hand-written edge cases: `cases` realistic ones of up to
            `max_reqs` requests, and `cases` small ones that the kernel check can afford.
        max_reqs: most requests in a random batch.
        progress: show a progress bar (tqdm if installed, else a stderr counter).
        checks: columns to run (default: all of `CHECKS`).
        only_cases: run only the corpus batches of these names (to rerun a failing case).
        time_budget_s: start no new (backend, case) after this many seconds; what did not run
            is left out of the cells and `config["stopped"]` says why. A KeyboardInterrupt
            (or SIGTERM under `main`) stops the run the same way, with a partial report.
    """
    started = time.perf_counter()
    backends = list(dict.fromkeys(backends or available_backends()))
    frameworks = list(dict.fromkeys(frameworks or FRAMEWORKS))
    checks = list(dict.fromkeys(checks or CHECKS))
    for name in backends:
        if name not in BACKENDS:
            raise SpecError(f"backend: unknown backend {name!r}; expected one of {list(available_backends())}.")
    for name in frameworks:
        if name not in FRAMEWORKS:
            raise SpecError(f"framework: unknown framework {name!r}; expected one of {list(FRAMEWORKS)}.")
    for name in checks:
        if name not in CHECKS:
            raise SpecError(f"check: unknown check {name!r}; expected one of {list(CHECKS)}.")
    _prepare_process()
    fws = probe_frameworks(frameworks)
    batches = list(corpus(seed=seed, cases=cases, max_reqs=max_reqs, small_cases=cases))
    if only_cases is not None:
        names = [name for name, _ in batches]
        unknown = sorted(set(only_cases) - set(names))
        if unknown:
            raise SpecError(f"case: unknown corpus case(s) {unknown}; this corpus has {names}.")
        batches = [(name, batch) for name, batch in batches if name in set(only_cases)]
    results: dict[tuple[str, str, str], list[CaseResult]] = collections.defaultdict(list)
    whole: dict[tuple[str, str, str], tuple[str, str]] = {}  # cells decided without running cases
    bar = _progress(len(backends) * len(batches), progress)
    stopped = None
    try:
        for backend in backends:
            if stopped:
                break
            try:
                backend_module(backend)
            except ModuleNotFoundError as exc:
                reason = (f"module {BACKENDS[backend]} does not exist yet" if exc.name == BACKENDS[backend]
                          else f"import failed ({_error_text(exc)})")
                for fw in frameworks:
                    for check in checks:
                        whole[(backend, fw, check)] = (SKIP, reason)
                bar.update(len(batches))
                continue
            except Exception as exc:
                for fw in frameworks:
                    for check in checks:
                        whole[(backend, fw, check)] = (FAIL, f"import failed: {_error_text(exc)}")
                bar.update(len(batches))
                continue
            for index, (case_name, raw) in enumerate(batches):
                if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                    stopped = f"time budget of {time_budget_s:g} s reached before {backend}: {case_name}"
                    break
                bar.set_postfix_str(f"{backend}: {case_name}")
                _run_case(backend, index, case_name, raw, fws, checks, seed, results)
                bar.update()
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
    cells = []
    for backend in backends:
        for fw in frameworks:
            for check in checks:
                cells.append(_aggregate(backend, fw, check, fws[fw], results, whole))
    config = dict(seed=seed, cases=cases, max_reqs=max_reqs, backends=backends, frameworks=frameworks,
                  checks=checks, corpus=[name for name, _ in batches], options=DEFAULT_OPTIONS)
    if only_cases is not None:
        config["only_cases"] = list(only_cases)
    if stopped:
        config["stopped"] = stopped
    return Report(cells=cells, environment=environment(fws), config=config,
                  elapsed_s=time.perf_counter() - started)


def _aggregate(backend: str, framework: str, check: str, fw: _Framework,
               results: dict[tuple[str, str, str], list[CaseResult]],
               whole: dict[tuple[str, str, str], tuple[str, str]]) -> Cell:
    not_applicable = _applicable(check, framework)
    if not_applicable is not None:
        return Cell(backend, framework, check, SKIP, not_applicable, applicable=False)
    if (backend, framework, check) in whole:
        status, detail = whole[(backend, framework, check)]
        return Cell(backend, framework, check, status, detail)
    if not fw.available:
        return Cell(backend, framework, check, SKIP, fw.detail)
    cases = results.get((backend, framework, check), [])
    failed = [c for c in cases if c.status == FAIL]
    passed = [c for c in cases if c.status == PASS]
    skipped = [c for c in cases if c.status == SKIP]
    if failed:
        first = failed[0]
        detail = f"{len(failed)}/{len(cases)} case(s) failed; first: {first.case!r}: {first.detail}"
        return Cell(backend, framework, check, FAIL, detail, cases=cases)
    if passed:
        detail = f"{len(passed)}/{len(cases)} case(s) passed" + (f", {len(skipped)} skipped" if skipped else "")
        return Cell(backend, framework, check, PASS, detail, cases=cases)
    reasons = collections.Counter(c.reason for c in skipped)
    reason = reasons.most_common(1)[0][0] if reasons else "no case ran"
    return Cell(backend, framework, check, SKIP, reason, cases=cases)


def _record(results: dict, key: tuple[str, str, str], case: str, fn: Callable[[], Any]) -> Any:
    """Run one check of one case and record its outcome; returns fn's value on success."""
    try:
        out = fn()
    except _Skip as exc:
        results[key].append(CaseResult(case, SKIP, exc.reason, exc.detail))
        return None
    except _Fail as exc:
        results[key].append(CaseResult(case, FAIL, "", str(exc)))
        return None
    except Exception as exc:  # a crash of the code under test is a failure, not a skip
        results[key].append(CaseResult(case, FAIL, "", f"raised {_error_text(exc)}"))
        return None
    detail, value = out if isinstance(out, tuple) else (out, None)
    results[key].append(CaseResult(case, PASS, "", detail, value))
    return out


def _run_case(backend: str, index: int, case_name: str, raw: Batch, fws: dict[str, _Framework],
              checks: Sequence[str], seed: int, results: dict) -> None:
    batch = prepare_batch(backend, raw)
    options = build_options(backend, batch)
    runnable = [(name, fw) for name, fw in fws.items() if fw.available]

    def everywhere(status: str, reason: str, detail: str) -> None:
        for name, _ in runnable:
            for check in checks:
                if _applicable(check, name) is None:
                    results[(backend, name, check)].append(CaseResult(case_name, status, reason, detail))

    try:
        md = build(batch, backend=backend, **options)
    except SpecError as exc:
        reason = expected_build_refusal(backend, batch, options)
        if reason is not None:
            everywhere(SKIP, f"build refuses the batch: {reason}", _error_text(exc))
        else:
            everywhere(FAIL, "", f"unexpected refusal by build: {_error_text(exc)}")
        return
    except Exception as exc:
        everywhere(FAIL, "", f"build raised {_error_text(exc)}")
        return
    rng = np.random.default_rng([seed, index])
    lengths = true_seq_lens(batch, rng)
    twin_md = None
    if getattr(md, "slot_mapping_exact", True) is False or not batch.seq_lens_exact.all():
        try:
            twin_md = build(exact_twin(batch, lengths), backend=backend, **options)
        except Exception as exc:
            everywhere(FAIL, "", f"build of the exact twin batch raised {_error_text(exc)}")
            return
    case = _Case(case_name, index, backend, batch, options, md, lengths, twin_md, seed * 100_003 + index)

    for name, fw in runnable:
        _run_framework(case, name, fw, checks, results)


def _run_framework(case: _Case, name: str, fw: _Framework, checks: Sequence[str], results: dict) -> None:
    """Every applicable check of one case on one framework."""
    wanted = [check for check in checks if _applicable(check, name) is None]
    backend, md = case.backend, case.md
    if name == "numpy":
        if "metadata" in wanted:
            _record(results, (backend, name, "metadata"), case.name, lambda: check_numpy(backend, case.batch, md))
        return
    try:
        lowered, overrides, scalars = _lower_case(case, fw)
    except SpecError as exc:
        refusal = expected_lower_refusal(name, md)
        for check in wanted:
            if refusal is not None:
                outcome = CaseResult(case.name, SKIP, f"lowering refuses the batch: {refusal}", _error_text(exc))
            else:
                outcome = CaseResult(case.name, FAIL, "", f"unexpected refusal by lower: {_error_text(exc)}")
            results[(backend, name, check)].append(outcome)
        return
    except Exception as exc:
        for check in wanted:
            results[(backend, name, check)].append(CaseResult(case.name, FAIL, "", f"lower raised {_error_text(exc)}"))
        return
    runs = {
        "metadata": lambda: check_lowered(backend, fw, md, lowered, overrides=overrides, scalar_overrides=scalars),
        "kernel": lambda: check_kernel(case, fw, lowered),
        "fake_tensor": lambda: check_fake_tensor(case, fw),
        "syncs": lambda: check_syncs(case, fw),
        "stall": lambda: check_stall(case, fw),
        "h2d": lambda: check_h2d(case, fw),
        "jax_recompiles": lambda: check_jax_recompiles(case, fw),
    }
    for check in CHECKS:  # the columns' order: the syncs check warms the stall probe's step up
        if check in wanted:
            _record(results, (backend, name, check), case.name, runs[check])


# ---------------------------------------------------------------------------------------------
# Output


_MARK = {PASS: "PASS", FAIL: "FAIL", SKIP: "SKIP"}


def format_text(report: Report, *, max_cases: int = 3) -> str:
    """The matrix as a compact table, then failures and skips with their reasons."""
    cfg, env = report.config, report.environment
    lines = [
        f"attnsync {__version__} verify: seed {cfg['seed']}, {len(cfg['corpus'])} batches "
        f"({cfg['cases']} + {cfg['cases']} small random, max {cfg['max_reqs']} requests), {len(cfg['backends'])} backend(s) x "
        f"{len(cfg['frameworks'])} framework(s); {report.elapsed_s:.1f} s",
        f"date {env['date']}, python {env['python']}, numpy {env['numpy']}, torch {env.get('torch')}, "
        f"jax {env.get('jax')}, triton {env.get('triton')}, flashinfer {env.get('flashinfer')}, "
        f"card {env.get('card') or 'none'}",
        "",
    ]
    header = ["backend", "framework", *cfg["checks"]]
    rows = []
    for backend in cfg["backends"]:
        for fw in cfg["frameworks"]:
            row = [backend, fw]
            for check in cfg["checks"]:
                cell = report.cell(backend, fw, check)
                row.append("n/a" if not cell.applicable else _MARK[cell.status])
            rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    summary = report.summary
    if cfg.get("stopped"):
        lines += ["", f"STOPPED EARLY ({cfg['stopped']}): cells cover only the cases that ran"]
    lines += ["", f"{summary[PASS]} passed, {summary[FAIL]} failed, {summary[SKIP]} skipped, "
                  f"{summary['n/a']} not applicable (n/a: reasons in --json)"]
    failed = [c for c in report.cells if c.status == FAIL]
    if failed:
        lines += ["", "failures:"]
        for cell in failed:
            lines.append(f"  FAIL {cell.name}: {cell.detail if not cell.cases else ''}".rstrip())
            bad = [c for c in cell.cases if c.status == FAIL]
            for c in bad[:max_cases]:
                lines.append(f"       case {c.case!r}: {c.detail}")
            if len(bad) > max_cases:
                lines.append(f"       ... and {len(bad) - max_cases} more case(s)")
    skipped = collections.defaultdict(list)
    for cell in report.cells:
        if cell.applicable and cell.status == SKIP:
            skipped[cell.detail].append(cell.name)
    if skipped:
        lines += ["", "skipped cells:"]
        for reason, names in skipped.items():
            lines.append(f"  SKIP {reason}")
            lines.append(f"       {_compact(names)}")
    partial = collections.defaultdict(set)
    for cell in report.cells:
        if cell.status == PASS:
            for c in cell.cases:
                if c.status == SKIP:
                    partial[c.reason].add((cell.name, c.case))
    if partial:
        lines += ["", "skipped cases inside passing cells:"]
        for reason, items in partial.items():
            names = sorted({name for name, _ in items})
            case_names = sorted({case for _, case in items})
            lines.append(f"  {reason}")
            lines.append(f"       {len(items)} case(s) of {_compact(names)}; cases: {_compact(case_names, 6)}")
    return "\n".join(lines)


def _compact(names: Sequence[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnsync verify",
        description="Run the equivalence matrix (every backend x every framework present x a corpus of "
        "batches) and print pass/fail/skip per cell. Exit status: 0 all ran and passed, 1 a failure, "
        "2 bad arguments, 3 stopped early (--time-budget or SIGTERM; the partial report is printed).",
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random corpus batches (default 0)")
    parser.add_argument("--cases", type=int, default=4,
                        help="random batches after the edge cases: N realistic and N small ones (default 4)")
    parser.add_argument("--max-reqs", type=int, default=256, help="most requests in a random batch (default 256)")
    parser.add_argument("--backend", action="append", choices=available_backends(), metavar="NAME",
                        help=f"only this backend (repeatable; default all: {', '.join(available_backends())})")
    parser.add_argument("--framework", action="append", choices=FRAMEWORKS, metavar="NAME",
                        help=f"only this framework (repeatable; default all: {', '.join(FRAMEWORKS)})")
    parser.add_argument("--check", action="append", choices=CHECKS, metavar="NAME",
                        help=f"only this column (repeatable; default all: {', '.join(CHECKS)})")
    parser.add_argument("--case", action="append", metavar="NAME",
                        help="only the corpus batch of this name (repeatable; names are in --json's config)")
    parser.add_argument("--out", metavar="PATH",
                        help="also write the JSON report there (a directory gets attnsync-verify-<date>.json)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no new case after this many seconds (a partial report, marked as stopped)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="run nothing: merge saved JSON reports of disjoint backends (one process "
                        "per backend, say) into one matrix, printed (and written with --out)")
    return parser


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def write_report(report: Report, path: str) -> str:
    """Write the JSON report to `path` (a directory, or a path ending in '/', gets a dated name)."""
    if path.endswith(os.sep) or os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        stamp = report.environment["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
        path = os.path.join(path, f"attnsync-verify-{stamp}.json")
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report.to_dict(), handle, indent=1, default=str)
        handle.write("\n")
    return path


def main(argv: Iterable[str] | None = None) -> int:
    """`attnsync verify [--json] [--seed N] [--cases N] [--backend NAME ...] [--framework NAME ...]
    [--max-reqs N] [--out PATH] ...`; returns the exit status: 0 all ran and nothing failed, 1 a
    failure, 2 bad arguments, 3 stopped early (time budget or SIGTERM) without a failure."""
    args = _parser().parse_args(None if argv is None else list(argv))
    if args.merge:
        try:
            parts = []
            for path in args.merge:
                with open(path, encoding="utf-8") as handle:
                    parts.append(Report.from_dict(json.load(handle)))
            report = merge_reports(parts)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"attnsync verify --merge: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        if args.out:
            print(f"attnsync verify: report written to {write_report(report, args.out)}", file=sys.stderr)
        print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else format_text(report))
        return 1 if report.failed else (3 if report.config.get("stopped") else 0)
    if args.cases < 0 or args.max_reqs < 1:
        _parser().error("--cases must be >= 0 and --max-reqs >= 1")
    # `timeout` (the GPU suite's step limit) sends SIGTERM: stop and print what ran so far.
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_matrix(backends=args.backend, frameworks=args.framework, seed=args.seed, cases=args.cases,
                            max_reqs=args.max_reqs, progress=not args.no_progress and not args.json,
                            checks=args.check, only_cases=args.case, time_budget_s=args.time_budget)
    except SpecError as exc:
        print(f"attnsync verify: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.out:
        written = write_report(report, args.out)
        print(f"attnsync verify: report written to {written}", file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else format_text(report))
    if report.failed:
        return 1
    return 3 if report.config.get("stopped") else 0
