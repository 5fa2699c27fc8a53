"""Does draining the device before every timed call change what a build + lower costs?

    python bench/drain_effect.py --out DIR [--quick] [--every N]

The other benchmarks drain the device queue before every timed call, so the pinned ring never
waits and only host time is measured. A serving loop does not drain: its calls run back to
back while the GPU works. This script measures, side by side in one process, how much that
choice moves the numbers, and how much a step's two halves cost inside one call against in
loops of their own (each half finds its caches and branch history as the other half left them,
so pieces timed alone are lower bounds).

Cases (host microseconds; lowerings to CUDA when there is a GPU, else to the CPU):

- `common, 256 decodes`: `attnsync.build(batch)` + `attnsync.adapters.torch.lower`, a table 512
  pages wide;
- `flashinfer, 32 decodes`: `attnsync.build(batch, backend="flashinfer")` + the torch lowering.

Measurements, per case and round (the order of the modes reversed every other round):

- `drained`: the device synchronised before every call, as the other benches time;
- `back to back`: synchronised only every `--every` calls (50), as a serving loop runs;
- `build, in the call` / `lower, in the call`: the two halves timed apart inside one drained call;
- `build, alone` / `lower, alone`: each half in a loop of its own (the lowering of one built
  metadata again and again).

Reported ratios (medians of the per-round ratios, so a host whose speed drifts cannot bias
them): `back_to_back_over_drained` and `in_call_over_alone` (sum of the halves inside the call
over the sum of the halves alone). On a CPU-only host draining is a no-op and the results are
labelled CPU-only; only GPU numbers say anything about the drain. Writes DIR/drain_effect.json
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
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

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX next to torch: see docs/jax.md
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common's batch shapes
try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync

PAGE = 16
MODES = ("drained", "back to back", "build, in the call", "lower, in the call", "build, alone", "lower, alone")


def timed_calls(fn: Callable[[], Any], drain: Callable[[], None], *, calls: int, every: int) -> float:
    """Median host us of `calls` calls of `fn`, the device drained before every `every`-th."""
    samples = []
    for i in range(calls):
        if i % every == 0:
            drain()
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    drain()
    return statistics.median(samples)


def split_calls(build: Callable[[], Any], lower: Callable[[Any], Any], drain: Callable[[], None], *,
                calls: int) -> tuple[float, float]:
    """Median host us of the build and of the lowering, timed apart inside drained calls."""
    built, lowered = [], []
    for _ in range(calls):
        drain()
        t0 = time.perf_counter_ns()
        md = build()
        t1 = time.perf_counter_ns()
        lower(md)
        t2 = time.perf_counter_ns()
        built.append((t1 - t0) / 1e3)
        lowered.append((t2 - t1) / 1e3)
    return statistics.median(built), statistics.median(lowered)


def cases(device: str, rng: np.random.Generator) -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]]:
    """(build, lower) of each case."""
    from bench_common import all_decode_inputs

    from attnsync.adapters import torch as ast

    common = attnsync.Batch(**all_decode_inputs(256, rng))
    seq = rng.integers(200, 2001, 32).astype(np.int32)
    table = rng.integers(0, 1 << 16, (32, int(-(-seq.max() // PAGE)))).astype(np.int32)
    flashinfer = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq, block_table=table,
                                block_size=PAGE)
    lower = lambda md: ast.lower(md, device)  # noqa: E731 - one shared lowering call
    return {
        "common, 256 decodes": (lambda: attnsync.build(common), lower),
        "flashinfer, 32 decodes": (lambda: attnsync.build(flashinfer, backend="flashinfer"), lower),
    }


def measure_case(build: Callable[[], Any], lower: Callable[[Any], Any], drain: Callable[[], None], *,
                 rounds: int, calls: int, every: int) -> dict[str, Any]:
    both = lambda: lower(build())  # noqa: E731
    for _ in range(20):  # warm: first calls allocate the lowering's pools
        both()
    drain()
    md = build()
    steps: list[Callable[[], dict[str, float]]] = [
        lambda: {"drained": timed_calls(both, drain, calls=calls, every=1)},
        lambda: {"back to back": timed_calls(both, drain, calls=calls, every=every)},
        lambda: dict(zip(("build, in the call", "lower, in the call"),
                         split_calls(build, lower, drain, calls=calls))),
        lambda: {"build, alone": timed_calls(build, drain, calls=calls, every=1)},
        lambda: {"lower, alone": timed_calls(lambda: lower(md), drain, calls=calls, every=1)},
    ]
    per_round: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for step in (steps if r % 2 == 0 else steps[::-1]):
            for mode, value in step().items():
                per_round[mode].append(value)
    medians = {mode: statistics.median(values) for mode, values in per_round.items()}
    ratios = {
        "back_to_back_over_drained": statistics.median(
            b / a for a, b in zip(per_round["drained"], per_round["back to back"])),
        "in_call_over_alone": statistics.median(
            (bi + li) / (ba + la) for bi, li, ba, la in zip(
                per_round["build, in the call"], per_round["lower, in the call"],
                per_round["build, alone"], per_round["lower, alone"])),
    }
    return {"us": medians, "ratios": ratios}


def run(*, quick: bool, every: int) -> dict[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    drain = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rounds, calls = (3, 30) if quick else (10, 100)
    small = np.arange(256, dtype=np.int32)
    results = {}
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside one timed call would dominate microsecond timings
    try:
        probe = timed_calls(lambda: small + 1, drain, calls=2000, every=1)
        for name, (build, lower) in cases(device, np.random.default_rng(1)).items():
            results[name] = measure_case(build, lower, drain, rounds=rounds, calls=calls, every=every)
    finally:
        if gc_enabled:
            gc.enable()
    return {
        "bench": "drain_effect",
        "device": device,
        "card": (torch.cuda.get_device_name() if device == "cuda"
                 else platform.processor() or platform.machine()),
        "cpu_only": device != "cuda",
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "attnsync": attnsync.__version__},
        "config": {"rounds": rounds, "calls_per_block": calls, "drain_every": every, "quick": quick},
        "probe_numpy_add_256_us": probe,
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    label = " (CPU-only: draining is a no-op here)" if report["cpu_only"] else ""
    lines = [
        f"drain_effect on {report['card']} ({report['device']}{label}; numpy-add probe "
        f"{report['probe_numpy_add_256_us']:.2f} us): host us, median over {report['config']['rounds']} "
        f"rounds; back to back drains every {report['config']['drain_every']} calls",
        "",
        "| case | " + " | ".join(MODES) + " | back to back / drained | in the call / alone |",
        "|---|" + "---:|" * (len(MODES) + 2),
    ]
    for name, row in report["results"].items():
        cells = " | ".join(f"{row['us'][mode]:.1f}" for mode in MODES)
        lines.append(f"| {name} | {cells} | {row['ratios']['back_to_back_over_drained']:.2f} | "
                     f"{row['ratios']['in_call_over_alone']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for drain_effect.json")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 30-call blocks (a smoke run)")
    parser.add_argument("--every", type=int, default=50,
                        help="back-to-back mode drains the device every this many calls (default 50)")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(quick=args.quick, every=args.every)
    (args.out / "drain_effect.json").write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
