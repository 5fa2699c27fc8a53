"""The `attnsync` command: `attnsync demo [--json]`, `attnsync verify` and `attnsync --version`.

`attnsync verify` (the equivalence matrix) lives in `attnsync.verify`; `main` hands it its
arguments untouched.

`attnsync demo` builds one embedded, realistic serving step (`demo_batch`) with every
registered backend and lowers it to every framework this environment has: numpy (the host
metadata itself), torch on the CPU and on CUDA, JAX on the CPU and on the GPU. For each
lowering it prints every field (name, shape, dtype, device, values), how many host-to-device
copies the lowering issued and, on a GPU, how many synchronisations it caused (measured under
`attnsync.testing.no_sync()`). Whatever is missing is reported as skipped, with the reason.

Frameworks are imported only inside `demo`, never by `attnsync --version`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import __version__, _accel
from ._batch import REGION_NAMES, Batch
from ._build import build
from ._validate import SpecError
from .backends import BACKENDS, available_backends, backend_module

FRAMEWORKS = ("numpy", "torch-cpu", "torch-cuda", "jax-cpu", "jax-gpu")
NO_DEVICE = "n/a (no device)"
TEXT_VALUES = 12  # values shown per field in the text output; --json shows all of them

# The demo step: 5 decodes (contexts from about 100 to 3000 tokens), a chunked-prefill
# continuation (512 tokens cached, the next 32-token chunk) and a fresh 20-token prompt, in
# decode-first order. (kind, query_len, seq_len, is_prefilling); seq_len counts this step's tokens.
DEMO_ROWS = (
    ("decode", 1, 117, False),
    ("decode", 1, 530, False),
    ("decode", 1, 1024, False),
    ("decode", 1, 2047, False),
    ("decode", 1, 2999, False),
    ("chunked prefill", 32, 544, True),
    ("fresh prefill", 20, 20, True),
)
DEMO_BLOCK_SIZE = 16
DEMO_TABLE_WIDTH = 192  # >= ceil(2999 / 16) = 188 pages, rounded up as a fixed-width table would be
DEMO_CACHE_PAGES = 1024
DEMO_PADDED_REQS = 8  # a CUDA-graph / jit bucket of 8 rows ...
DEMO_PADDED_TOKENS = 64  # ... and 64 tokens (the step has 57)
# Model shape handed to a backend whose build requires it (Qwen3-0.6B-like, as in GPU.md).
DEMO_MODEL = {
    "num_qo_heads": 16,
    "num_q_heads": 16,
    "num_heads": 16,
    "num_kv_heads": 8,
    "head_dim": 128,
}
# Options a backend takes with a default that cannot serve the demo (Mamba2 needs the model's
# scan chunk size; 256 is Mamba2's usual one).
DEMO_BACKEND_OPTIONS = {"mamba": {"chunk_size": 256}}


def demo_batch() -> Batch:
    """The embedded demo step (see `DEMO_ROWS`); page ids are a fixed shuffle, 0 is the null page."""
    query_lens = [row[1] for row in DEMO_ROWS]
    seq_lens = [row[2] for row in DEMO_ROWS]
    pages = np.random.default_rng(2024).permutation(np.arange(1, DEMO_CACHE_PAGES, dtype=np.int32))
    table = np.zeros((len(DEMO_ROWS), DEMO_TABLE_WIDTH), dtype=np.int32)
    used = 0
    for r, seq_len in enumerate(seq_lens):
        need = -(-seq_len // DEMO_BLOCK_SIZE)
        table[r, :need] = pages[used : used + need]
        used += need
    return Batch(
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_table=table,
        block_size=DEMO_BLOCK_SIZE,
        is_prefilling=[row[3] for row in DEMO_ROWS],
        padded_num_reqs=DEMO_PADDED_REQS,
        padded_num_tokens=DEMO_PADDED_TOKENS,
        num_cache_pages=DEMO_CACHE_PAGES,
    )


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Frameworks


@dataclasses.dataclass
class _Framework:
    """One lowering target: how to lower, what it reports, or why it is skipped."""

    name: str
    status: str  # "ok" or "skipped"
    detail: str  # version when ok, reason when skipped
    lower: Callable[[Any], tuple[Any, dict[str, Any]]] | None = None


def _probe_frameworks(wanted: Sequence[str]) -> dict[str, _Framework]:
    """Import what is installed (only what `wanted` names) and say what each target can do."""
    out = {"numpy": _Framework("numpy", "ok", f"numpy {np.__version__}", _lower_numpy)}
    if any(name.startswith("torch") for name in wanted):
        out.update(_probe_torch())
    if any(name.startswith("jax") for name in wanted):
        out.update(_probe_jax())
    return {name: out[name] for name in wanted}


def _probe_torch() -> dict[str, _Framework]:
    try:
        import torch

        from .adapters import torch as torch_adapter
    except Exception as exc:
        reason = f"torch is not importable ({_error_text(exc)}); install attnsync[torch]"
        return {name: _Framework(name, "skipped", reason) for name in ("torch-cpu", "torch-cuda")}
    version = f"torch {torch.__version__}"
    out = {"torch-cpu": _Framework("torch-cpu", "ok", version, _torch_lowering(torch_adapter, "cpu"))}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        out["torch-cuda"] = _Framework(
            "torch-cuda", "ok", f"{version} on {name}", _torch_lowering(torch_adapter, "cuda")
        )
    elif torch.version.cuda is None:
        out["torch-cuda"] = _Framework("torch-cuda", "skipped", f"{version} is a CPU-only build (no CUDA)")
    else:
        out["torch-cuda"] = _Framework(
            "torch-cuda", "skipped", f"{version} sees no CUDA device (torch.cuda.is_available() is False)"
        )
    return out


def _probe_jax() -> dict[str, _Framework]:
    # JAX would take 75 % of GPU memory at import, next to torch in this process (GPU.md).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax

        from .adapters import jax as jax_adapter
    except Exception as exc:
        reason = f"jax is not importable ({_error_text(exc)}); install attnsync[jax]"
        return {name: _Framework(name, "skipped", reason) for name in ("jax-cpu", "jax-gpu")}
    version = f"jax {jax.__version__}"
    out = {}
    for name, platform_name in (("jax-cpu", "cpu"), ("jax-gpu", "gpu")):
        try:
            device = jax.devices(platform_name)[0]
        except RuntimeError:
            reason = f"{version} has no {platform_name.upper()} platform"
            if platform_name == "gpu":
                reason += " (install attnsync[jax-cuda12] or attnsync[jax-cuda13] on a GPU host)"
            out[name] = _Framework(name, "skipped", reason)
            continue
        out[name] = _Framework(name, "ok", f"{version} on {device}", _jax_lowering(jax_adapter, device))
    return out


def _lower_numpy(md: Any) -> tuple[Any, dict[str, Any]]:
    return md, {"path": "host metadata (numpy), nothing lowered", "h2d_copies": 0, "syncs": NO_DEVICE}


def _torch_lowering(torch_adapter: Any, device: str) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    def lower(md: Any) -> tuple[Any, dict[str, Any]]:
        stager = torch_adapter.default_stager(device)
        before = stager.stats.copies
        if device == "cpu":
            lowered = torch_adapter.lower(md, device=device)
            path = "CPU tensors viewing one packed host buffer (no copy)"
            syncs: Any = NO_DEVICE
        else:
            lowered, syncs = _guarded(lambda: torch_adapter.lower(md, device=device))
            path = "one packed pinned buffer, one non_blocking H2D copy"
        return lowered, {"path": path, "h2d_copies": stager.stats.copies - before, "syncs": syncs}

    return lower


def _jax_lowering(jax_adapter: Any, device: Any) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    def lower(md: Any) -> tuple[Any, dict[str, Any]]:
        if device.platform == "cpu":
            lowered = jax_adapter.lower(md, device)
            return lowered, {
                "path": "one packed int32 buffer, one jax.device_put",
                "h2d_copies": 1,  # the adapter's single device_put
                "syncs": NO_DEVICE,
            }
        stager = _torch_stager_for(device)
        before = stager.stats.copies if stager is not None else 0
        lowered, syncs = _guarded(lambda: jax_adapter.lower(md, device))
        copies = stager.stats.copies - before if stager is not None else 0
        if copies:
            path = "torch pinned staging (one non_blocking copy), fields imported over DLPack"
        else:
            path, copies = "one packed int32 buffer, one jax.device_put", 1
        return lowered, {"path": path, "h2d_copies": copies, "syncs": syncs}

    return lower


def _torch_stager_for(jax_device: Any) -> Any:
    """The torch stager the JAX adapter uses for `jax_device` on a GPU, if torch has CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    from .adapters import torch as torch_adapter

    index = jax_device.local_hardware_id if jax_device.local_hardware_id is not None else jax_device.id
    return torch_adapter.default_stager(torch.device("cuda", index))


def _guarded(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """Run a device lowering under `no_sync()`; (result, 0) or, if it synced, (result, error)."""
    from .testing import no_sync

    try:
        with no_sync():
            return fn(), 0
    except RuntimeError as exc:
        # The guard raised: lower again unguarded so the fields can still be shown.
        return fn(), f"error: {_error_text(exc)}"


# ---------------------------------------------------------------------------------------------
# Fields


def _field(value: Any) -> dict[str, Any]:
    """Name-less description of one field: shape, dtype, device and all values (host lists).

    Runs after the lowering and outside the sync guard: reading device values back is the
    demo's own doing, not the lowering's.
    """
    if isinstance(value, np.ndarray):
        return {"shape": list(value.shape), "dtype": str(value.dtype), "device": "host",
                "values": value.reshape(-1).tolist()}
    if hasattr(value, "detach"):  # torch.Tensor
        host = value.detach().reshape(-1).cpu()
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "device": str(value.device), "values": host.tolist()}
    if hasattr(value, "devices") and hasattr(value, "shape"):  # jax.Array
        devices = sorted(str(d) for d in value.devices())
        return {"shape": list(value.shape), "dtype": str(value.dtype), "device": ",".join(devices),
                "values": np.asarray(value).reshape(-1).tolist()}
    return {"shape": [], "dtype": type(value).__name__, "device": "host", "values": [value]}


def _fields(lowered: Any) -> dict[str, dict[str, Any]]:
    names = ([f.name for f in dataclasses.fields(lowered)] if dataclasses.is_dataclass(lowered)
             else lowered.layout.names)  # a JAX lowering: one packed vector and its static layout
    return {name: _field(getattr(lowered, name)) for name in names}


# ---------------------------------------------------------------------------------------------
# The demo


def _build_for(name: str, batch: Batch) -> tuple[Any, dict[str, Any]]:
    """Build backend `name`; (metadata, report) or (None, report saying why it was skipped)."""
    report: dict[str, Any] = {"module": BACKENDS[name]}
    try:
        module = backend_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == BACKENDS[name]:
            reason = f"registered, but module {BACKENDS[name]} does not exist yet"
        else:
            reason = f"import failed ({_error_text(exc)})"
        return None, {**report, "status": "skipped", "reason": reason}
    except Exception as exc:
        return None, {**report, "status": "skipped", "reason": f"import failed ({_error_text(exc)})"}
    required = [
        p.name for p in inspect.signature(module.build).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    unknown = [option for option in required if option not in DEMO_MODEL]
    if unknown:
        reason = f"its build needs option(s) {unknown} that the demo cannot choose"
        return None, {**report, "status": "skipped", "reason": reason}
    options = {option: DEMO_MODEL[option] for option in required}
    options.update(DEMO_BACKEND_OPTIONS.get(name, {}))
    try:
        md = build(batch, backend=name, **options)
    except SpecError as exc:
        return None, {**report, "status": "skipped", "reason": f"refuses this batch: {exc}"}
    except Exception as exc:
        return None, {**report, "status": "error", "reason": f"build failed: {_error_text(exc)}"}
    return md, {**report, "status": "ok", "metadata_class": type(md).__name__, "options": options}


def run_demo(*, backends: Sequence[str], frameworks: Sequence[str]) -> dict[str, Any]:
    """Build the demo batch with `backends`, lower to `frameworks`; the report as a JSON-able dict."""
    batch = demo_batch()
    probed = _probe_frameworks(frameworks)
    doc: dict[str, Any] = {
        "attnsync": __version__,
        "python": platform.python_version(),
        # whether the compiled twin of the hot numpy steps ran (attnsync/_accel.py)
        "native": _accel.native is not None,
        "batch": _batch_report(batch),
        "frameworks": {
            name: {"status": fw.status, ("version" if fw.status == "ok" else "reason"): fw.detail}
            for name, fw in probed.items()
        },
        "backends": {},
    }
    for name in backends:
        md, report = _build_for(name, batch)
        if md is not None:
            report["lowerings"] = {}
            for fw in probed.values():
                if fw.lower is None:
                    report["lowerings"][fw.name] = {"status": "skipped", "reason": fw.detail}
                    continue
                try:
                    lowered, info = fw.lower(md)
                except SpecError as exc:
                    report["lowerings"][fw.name] = {"status": "skipped", "reason": f"refused: {exc}"}
                    continue
                except Exception as exc:
                    report["lowerings"][fw.name] = {"status": "error", "reason": _error_text(exc)}
                    continue
                report["lowerings"][fw.name] = {"status": "ok", **info, "fields": _fields(lowered)}
        doc["backends"][name] = report
    return doc


def _batch_report(batch: Batch) -> dict[str, Any]:
    regions = batch.regions()
    return {
        "num_reqs": batch.num_reqs,
        "num_tokens": batch.num_tokens,
        "padded_num_reqs": batch.padded_num_reqs,
        "padded_num_tokens": batch.padded_num_tokens,
        "block_size": batch.block_size,
        "block_table_shape": list(batch.block_table.shape),
        "num_cache_pages": batch.num_cache_pages,
        "rows": [
            {
                "kind": DEMO_ROWS[r][0],
                "region": REGION_NAMES[int(regions[r])],
                "query_len": int(batch.query_lens[r]),
                "seq_len": int(batch.seq_lens[r]),
                "is_prefilling": bool(batch.is_prefilling[r]),
            }
            for r in range(batch.num_reqs)
        ],
    }


def _failed(doc: dict[str, Any]) -> bool:
    """True when a backend or a lowering failed (not merely skipped)."""
    for report in doc["backends"].values():
        if report["status"] == "error":
            return True
        for lowering in report.get("lowerings", {}).values():
            if lowering["status"] == "error" or str(lowering.get("syncs", "")).startswith("error"):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Text output


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)] + [row[-1]]
        lines.append((indent + "  ".join(padded)).rstrip())
    return lines


def _short(values: list[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:TEXT_VALUES])
    more = len(values) - TEXT_VALUES
    return f"[{shown}, ... (+{more} more)]" if more > 0 else f"[{shown}]"


def _shape_text(shape: list[int]) -> str:
    return "()" if not shape else "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def format_text(doc: dict[str, Any]) -> str:
    """The demo report as aligned plain text."""
    b = doc["batch"]
    lines = [
        f"attnsync {doc['attnsync']} demo (python {doc['python']}): one mixed serving step, built on the "
        "host in numpy, lowered to every framework available here",
        "compiled twin of the hot numpy steps (attnsync._native): "
        + ("in use" if doc.get("native") else "not in use: the numpy forms ran (same values; "
           "python -m attnsync._native_build builds it)"),
        "",
        f"batch: {b['num_reqs']} requests padded to {b['padded_num_reqs']} rows, {b['num_tokens']} tokens "
        f"padded to {b['padded_num_tokens']}, block_size {b['block_size']}, block_table "
        f"{b['block_table_shape'][0]} x {b['block_table_shape'][1]} pages",
    ]
    lines += _table(
        ["row", "kind", "region", "query_len", "seq_len", "is_prefilling"],
        [[i, r["kind"], r["region"], r["query_len"], r["seq_len"], r["is_prefilling"]]
         for i, r in enumerate(b["rows"])],
    )
    lines += ["", "frameworks:"]
    lines += _table(
        ["name", "status", "detail"],
        [[name, fw["status"], fw.get("version") or fw.get("reason")] for name, fw in doc["frameworks"].items()],
    )
    lines += ["", "backends:"]
    lines += _table(
        ["name", "status", "detail"],
        [[name, rep["status"], rep.get("metadata_class") or rep.get("reason")]
         for name, rep in doc["backends"].items()],
    )
    for name, rep in doc["backends"].items():
        for fw_name, low in rep.get("lowerings", {}).items():
            lines.append("")
            if low["status"] != "ok":
                lines.append(f"== {name} -> {fw_name}: {low['status']}: {low['reason']}")
                continue
            lines.append(
                f"== {name} -> {fw_name}: {low['path']}; H2D copies: {low['h2d_copies']}; "
                f"syncs: {low['syncs']}"
            )
            lines += _table(
                ["field", "shape", "dtype", "device", "values"],
                [[field, _shape_text(f["shape"]), f["dtype"], f["device"],
                  _short(f["values"]) if f["shape"] else f["values"][0]]
                 for field, f in low["fields"].items()],
            )
    return "\n".join(lines)


def format_json(doc: Any, indent: str = "") -> str:
    """`doc` as JSON: objects one key a line, lists of plain values on one line."""
    inner = indent + " "
    if isinstance(doc, dict) and doc:
        items = (f"{inner}{json.dumps(str(k))}: {format_json(v, inner)}" for k, v in doc.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(doc, list | tuple) and any(isinstance(v, dict) for v in doc):
        return "[\n" + ",\n".join(inner + format_json(v, inner) for v in doc) + "\n" + indent + "]"
    return json.dumps(doc)


# ---------------------------------------------------------------------------------------------
# Entry point


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnsync",
        description="LLM-serving attention metadata built on the host with zero GPU<->CPU syncs.",
    )
    parser.add_argument("--version", action="version", version=f"attnsync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="build an embedded mixed batch with every backend and lower it to every framework",
        description="Build an embedded mixed batch (5 decodes, a chunked prefill, a fresh prefill) "
        "with every backend and lower it to every available framework, printing each field, the "
        "H2D copies issued and the syncs seen (on a GPU).",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON document (arrays as full lists)")
    demo.add_argument(
        "--backend", action="append", choices=available_backends(), metavar="NAME",
        help=f"only this backend (repeatable; default all: {', '.join(available_backends())})",
    )
    demo.add_argument(
        "--framework", action="append", choices=FRAMEWORKS, metavar="NAME",
        help=f"only this framework (repeatable; default all: {', '.join(FRAMEWORKS)})",
    )
    # Parsed by attnsync.verify.main (see main below); listed here so --help shows it.
    commands.add_parser(
        "verify", add_help=False,
        help="run the equivalence matrix (backends x frameworks x a corpus); see `attnsync verify --help`",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `attnsync` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        from .verify import main as verify_main

        return verify_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        backends = list(dict.fromkeys(args.backend or available_backends()))
        frameworks = list(dict.fromkeys(args.framework or FRAMEWORKS))
        doc = run_demo(backends=backends, frameworks=frameworks)
        print(format_json(doc) if args.json else format_text(doc))
        return 1 if _failed(doc) else 0
    raise AssertionError(args.command)  # argparse refuses unknown commands before this
