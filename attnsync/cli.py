"""The `attnsync` command: `attnsync demo [--fields] [--json]`, `attnsync verify` and `attnsync --version`.

`attnsync verify` (the equivalence matrix) lives in `attnsync.verify`; `main` hands it its
arguments untouched. The demo probes frameworks with verify's probe
(`attnsync.verify.frameworks.probe_frameworks`), so both commands agree on what is here.

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

from . import Batch, SpecError, __version__, _accel, build
from ._batch import REGION_NAMES
from .backends import BACKENDS, available_backends, backend_module
from .verify.frameworks import FRAMEWORKS, probe_frameworks
from .verify.report import error_text

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
# Model shape handed to a backend whose build requires it (Qwen3-0.6B-like).
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


# ---------------------------------------------------------------------------------------------
# Frameworks


@dataclasses.dataclass
class _Target:
    """One lowering target: how to lower, what it reports, or why it is skipped."""

    name: str
    status: str  # "ok" or "skipped"
    detail: str  # version when ok, reason when skipped
    lower: Callable[[Any], tuple[Any, dict[str, Any]]] | None = None


def _targets(wanted: Sequence[str]) -> dict[str, _Target]:
    """The frameworks `wanted` names, probed by `attnsync verify`'s probe, with their lowerings."""
    out = {}
    for name, fw in probe_frameworks(wanted).items():
        if not fw.available:
            out[name] = _Target(name, "skipped", fw.detail)
        elif name == "numpy":
            out[name] = _Target(name, "ok", fw.detail, _lower_numpy)
        elif name.startswith("torch"):
            out[name] = _Target(name, "ok", fw.detail, _torch_lowering(fw.device))
        else:
            out[name] = _Target(name, "ok", fw.detail, _jax_lowering(fw.device))
    return out


def _lower_numpy(md: Any) -> tuple[Any, dict[str, Any]]:
    return md, {"path": "host metadata (numpy), nothing lowered", "h2d_copies": 0, "syncs": NO_DEVICE}


def _torch_lowering(device: Any) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    from .adapters import torch as torch_adapter

    def lower(md: Any) -> tuple[Any, dict[str, Any]]:
        stager = torch_adapter.default_stager(device)
        before = stager.stats.copies
        if device.type == "cpu":
            lowered = torch_adapter.lower(md, device=device)
            path = "CPU tensors viewing one packed host buffer (no copy)"
            syncs: Any = NO_DEVICE
        else:
            lowered, syncs = _guarded(lambda: torch_adapter.lower(md, device=device))
            path = "one packed pinned buffer, one non_blocking H2D copy"
        return lowered, {"path": path, "h2d_copies": stager.stats.copies - before, "syncs": syncs}

    return lower


def _jax_lowering(device: Any) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    from .adapters import jax as jax_adapter

    def lower(md: Any) -> tuple[Any, dict[str, Any]]:
        info = {"path": "one packed int32 buffer, one jax.device_put", "h2d_copies": 1}  # the adapter's one put
        if device.platform == "cpu":
            return jax_adapter.lower(md, device), {**info, "syncs": NO_DEVICE}
        lowered, syncs = _guarded(lambda: jax_adapter.lower(md, device))
        return lowered, {**info, "syncs": syncs}

    return lower


def _guarded(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """Run a device lowering under `no_sync()`; (result, 0) or, if it synced, (result, error)."""
    from .testing import no_sync

    try:
        with no_sync():
            return fn(), 0
    except RuntimeError as exc:
        # The guard raised: lower again unguarded so the fields can still be shown.
        return fn(), f"error: {error_text(exc)}"


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
            reason = f"import failed ({error_text(exc)})"
        return None, {**report, "status": "skipped", "reason": reason}
    except Exception as exc:
        return None, {**report, "status": "skipped", "reason": f"import failed ({error_text(exc)})"}
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
        return None, {**report, "status": "error", "reason": f"build failed: {error_text(exc)}"}
    return md, {**report, "status": "ok", "metadata_class": type(md).__name__, "options": options}


def run_demo(*, backends: Sequence[str], frameworks: Sequence[str]) -> dict[str, Any]:
    """Build the demo batch with `backends`, lower to `frameworks`; the report as a JSON-able dict."""
    batch = demo_batch()
    probed = _targets(frameworks)
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
                    report["lowerings"][fw.name] = {"status": "error", "reason": error_text(exc)}
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


def format_text(doc: dict[str, Any], *, fields: bool = False) -> str:
    """The demo report as aligned plain text: one summary line per backend and framework, and
    with `fields` every lowered field's shape, dtype, device and first values too."""
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
    built = [name for name, rep in doc["backends"].items() if rep["status"] == "ok"]
    if not fields and len(built) == len(doc["backends"]):  # (the summary fits a screen)
        lines += ["", f"backends: all {len(built)} built ({', '.join(built)})"]
    else:
        lines += ["", "backends:"]
        lines += _table(
            ["name", "status", "detail"],
            [[name, rep["status"], rep.get("metadata_class") or rep.get("reason")]
             for name, rep in doc["backends"].items()],
        )
    if not fields:
        # A framework skipped above is skipped for every backend: said once, not once a backend.
        ran = {name for name, fw in doc["frameworks"].items() if fw["status"] == "ok"}
        lines += ["", "lowerings to the frameworks available (--fields lists every field; --json "
                  "gives all values):"]
        lines += _table(
            ["backend", "framework", "status", "fields", "H2D copies", "syncs", "path or reason"],
            [[name, fw_name, low["status"], len(low.get("fields", {})) if low["status"] == "ok" else "-",
              low.get("h2d_copies", "-"), low.get("syncs", "-"),
              low["path"] if low["status"] == "ok" else low.get("reason")]
             for name, rep in doc["backends"].items() for fw_name, low in rep.get("lowerings", {}).items()
             if fw_name in ran or low["status"] != "skipped"],
        )
        return "\n".join(lines)
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
    demo.add_argument("--fields", action="store_true",
                      help="list every lowered field (shape, dtype, device, first values) of each lowering")
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


# Exit status when the reader of stdout went away (`attnsync demo | head`): 128 + SIGPIPE, what
# a shell reports for a command that signal ended.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `attnsync` command line; returns the exit status."""
    try:
        try:
            return _main(list(sys.argv[1:] if argv is None else argv))
        finally:  # also on argparse's exit after --help: output still in the buffer meets the pipe here
            sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE


def _drop_stdout() -> None:
    """Point stdout at the null device: the interpreter's exit flush would hit the closed pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in a test)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["verify"]:
        from .verify import main as verify_main

        return verify_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        backends = list(dict.fromkeys(args.backend or available_backends()))
        frameworks = list(dict.fromkeys(args.framework or FRAMEWORKS))
        doc = run_demo(backends=backends, frameworks=frameworks)
        print(format_json(doc) if args.json else format_text(doc, fields=args.fields))
        return 1 if _failed(doc) else 0
    raise AssertionError(args.command)  # argparse refuses unknown commands before this
