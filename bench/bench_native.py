"""Host time of a serving step with attnsync's compiled twin on and off, side by side.

    python bench/bench_native.py --out DIR [--quick]

`attnsync/_native.c` (see `attnsync/_accel.py`) stands in for attnsync's hot numpy steps. This script
times the paths it touches in ONE process, switching `attnsync._accel.native` between the
module and None (the numpy forms) block by block: the GPU hosts' speed drifts from second to
second, so only blocks taken side by side compare. Per round and
case, one warm block of calls per mode (5 untimed, then `calls` timed, the device drained before
each timed call), the modes in alternating order; the report gives each mode's median over the
rounds and the median of the per-round ratios numpy / native.

Cases (host microseconds, lowerings to CUDA when there is a GPU, else to the CPU):

- `Batch, 32 decodes` / `Batch, 256 decodes`: `attnsync.Batch(...)` from int32 arrays;
- `FlashInfer build + lower, 32 decodes`: one batch again and again;
- `FlashInfer build + lower, 32 decode steps`: successive steps, contexts one token longer
  each time (the page list changes length as rows cross page boundaries);
- `common build + lower, 256 decodes`: 512-page-wide table (the core issue's target case); on
  CUDA the batch's table lies in a pinned block of the stager (`Batch(table_memory=...)`,
  attnsync/adapters/_pinned_tables.py), which the lowering copies from;
- `Batch + FlashInfer build + lower, 32 decode steps`: what a decode loop pays per step.

Every lowering goes through one engine-owned `Stager(device)` (a ring of two slots), as a
serving loop's would.

Writes DIR/bench_native.json and prints a markdown table. Without the compiled module (not
built, or ATTNSYNC_PURE_NUMPY=1) it writes a "skipped" JSON saying so.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX next to torch: docs/jax.md
try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync
from attnsync import _accel  # noqa: E402 - after the checkout fallback above

PAGE = 16
MODES = ("native", "numpy")


def cases(device: str, rng: np.random.Generator) -> dict[str, Callable[[], Any]]:
    """The timed calls, each a zero-argument function (lowering to `device` through one stager)."""
    from attnsync.adapters import torch as ast

    stager = ast.Stager(device)
    # The stager's pinned table memory where it has one (a CUDA stager of a tree that offers
    # it): the 256-decode case's table then lies in a pinned block.
    table_memory = getattr(stager, "table_memory", None)
    memory = {} if table_memory is None else {"table_memory": table_memory}

    seq = rng.integers(200, 2001, 32).astype(np.int32)
    table = rng.integers(0, 1 << 16, (32, int(-(-(seq.max() + 400) // PAGE)))).astype(np.int32)
    ones = np.ones(32, np.int32)
    fixed = attnsync.Batch(query_lens=ones, seq_lens=seq, block_table=table, block_size=PAGE)
    steps = [attnsync.Batch(query_lens=ones, seq_lens=seq + k, block_table=table, block_size=PAGE)
             for k in range(400)]
    step = itertools.count()
    wide = rng.integers(100, 8193, 256).astype(np.int32)
    wide_table = np.where(np.arange(512) < (-(-wide // PAGE))[:, None],
                          rng.integers(1, 1 << 20, (256, 512)), 0).astype(np.int32)
    ones256 = np.ones(256, np.int32)
    common = attnsync.Batch(query_lens=ones256, seq_lens=wide, block_table=wide_table, block_size=PAGE, **memory)
    return {
        "Batch, 32 decodes": lambda: attnsync.Batch(query_lens=ones, seq_lens=seq, block_table=table,
                                                    block_size=PAGE, **memory),
        "Batch, 256 decodes": lambda: attnsync.Batch(query_lens=ones256, seq_lens=wide,
                                                     block_table=wide_table, block_size=PAGE, **memory),
        "FlashInfer build + lower, 32 decodes": lambda: ast.lower(
            attnsync.build(fixed, backend="flashinfer"), device, stager=stager),
        "FlashInfer build + lower, 32 decode steps": lambda: ast.lower(
            attnsync.build(steps[next(step) % len(steps)], backend="flashinfer"), device, stager=stager),
        "common build + lower, 256 decodes": lambda: ast.lower(attnsync.build(common), device, stager=stager),
        "Batch + FlashInfer build + lower, 32 decode steps": lambda: ast.lower(attnsync.build(
            attnsync.Batch(query_lens=ones, seq_lens=seq + next(step) % 400, block_table=table,
                           block_size=PAGE, **memory), backend="flashinfer"), device, stager=stager),
    }


def block(fn: Callable[[], Any], drain: Callable[[], None], *, calls: int, warmup: int = 5) -> float:
    """Median host us of `calls` timed calls after `warmup` untimed ones, drained before each."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        drain()
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(samples)


def run(*, quick: bool) -> dict[str, Any]:
    """Every case, both modes, alternating blocks; the report as a JSON-able dict."""
    import torch

    native = _accel.native
    device = "cuda" if torch.cuda.is_available() else "cpu"
    drain = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rounds, calls = (3, 30) if quick else (10, 100)
    timed = cases(device, np.random.default_rng(0))
    small = np.arange(256, dtype=np.int32)
    results: dict[str, dict[str, list[float]]] = {name: {m: [] for m in MODES} for name in timed}
    probe = []
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside one timed call would dominate microsecond timings
    try:
        for r in range(rounds):
            probe.append(block(lambda: small + 1, drain, calls=calls))
            for name, fn in timed.items():
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    _accel.native = native if mode == "native" else None
                    results[name][mode].append(block(fn, drain, calls=calls))
    finally:
        _accel.native = native
        if gc_enabled:
            gc.enable()
    rows = {
        name: {
            "native_us": statistics.median(r["native"]),
            "numpy_us": statistics.median(r["numpy"]),
            "numpy_over_native": statistics.median([b / a for a, b in zip(r["native"], r["numpy"])]),
        }
        for name, r in results.items()
    }
    return {
        "bench": "bench_native",
        "status": "ok",
        "device": device,
        "card": (torch.cuda.get_device_name() if device == "cuda"
                 else platform.processor() or platform.machine()),
        "cpu_only": device != "cuda",
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "attnsync": attnsync.__version__, "native_module": getattr(native, "__file__", None)},
        "config": {"rounds": rounds, "calls_per_block": calls, "warmup_per_block": 5, "quick": quick},
        "probe_numpy_add_256_us": statistics.median(probe),
        "results": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"bench_native on {report['card']} ({report['device']}; numpy-add probe "
        f"{report['probe_numpy_add_256_us']:.2f} us): host us, median over {report['config']['rounds']} "
        f"rounds of alternating blocks",
        "",
        "| case | compiled twin | numpy forms | numpy / compiled (paired) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in report["results"].items():
        lines.append(f"| {name} | {row['native_us']:.1f} | {row['numpy_us']:.1f} | "
                     f"{row['numpy_over_native']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for bench_native.json")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 30-call blocks (a smoke run)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_native.json"
    if _accel.native is None:
        reason = ("ATTNSYNC_PURE_NUMPY is set" if os.environ.get("ATTNSYNC_PURE_NUMPY", "0") not in ("", "0")
                  else "attnsync._native is not built here (python -m attnsync._native_build)")
        print(f"bench_native: skipped: {reason}")
        skipped = {"bench": "bench_native", "status": "skipped", "reason": reason}
        path.write_text(json.dumps(skipped, indent=1) + "\n")
        return 0
    report = run(quick=args.quick)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
