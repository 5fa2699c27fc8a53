"""Host time of the common backend, build and lowerings, against batch size; vs the naive way.

    python bench/bench_common.py --out DIR [--quick]

For decode-heavy batches of 1 to 1024 requests (one 32-token prefill chunk per 32 requests,
contexts 100 to 8192 tokens, a block table 512 pages wide) it measures the host microseconds of

- `batch`:       `attnsync.Batch(...)` from the scheduler's numpy arrays (validation);
- `build`:       `attnsync.build(batch)` (numpy only);
- `build+torch`: build, then `attnsync.adapters.torch.lower` through one engine-owned
  `Stager(device)` (a ring of two slots; one pinned non_blocking copy);
- `build+jax`:   build, then `attnsync.adapters.jax.lower` (one packed int32 vector, one device_put);
- `naive`:       `attnsync.testing.naive_common_torch` (device lists, `.item()` maxima), the
  way metadata is built before attnsync, syncs included.

Batches are made as a serving loop makes them, with `table_memory=stager.table_memory` where
the stager has pinned table memory (CUDA), so large tables lie in pinned blocks; the 256-decode
target is also measured side by side with batches made without it (the table in numpy memory,
packed by the lowering). Each number is the median over many calls after a warm-up, with the
device queue drained between calls (so the pinned ring never waits). On a CUDA host everything
targets the GPU; on a CPU-only host it still runs (device "cpu") and the results are labelled
CPU-only: there the lowerings copy nothing and `.item()` does not wait, so only the GPU
numbers count.
Writes DIR/bench_common.json and prints markdown tables. Target (the issue's): build + torch
lower for 256 decode requests under 50 microseconds of host time on an H100.
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

# JAX would take 75 % of GPU memory at import, next to torch in this process (docs/jax.md).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync
from attnsync import _accel
from attnsync.testing import naive_common_torch

SIZES = (1, 8, 32, 128, 256, 512, 1024)
BLOCK_SIZE = 16
WIDTH = 512  # block-table columns: a max_model_len of 8192 tokens at 16 tokens a page
MAX_CONTEXT = WIDTH * BLOCK_SIZE
PREFILL_EVERY = 32  # one chunked-prefill row per 32 requests: decode-heavy
CHUNK = 32  # tokens of each prefill chunk
TARGET_REQS, TARGET_US = 256, 50.0
VARIANTS = ("batch", "build", "build+torch", "build+jax", "naive")


def batch_inputs(num_reqs: int, rng: np.random.Generator) -> dict[str, Any]:
    """Keyword arguments of `attnsync.Batch` for one decode-heavy step, decode rows first."""
    num_prefills = num_reqs // PREFILL_EVERY
    num_decodes = num_reqs - num_prefills
    query_lens = np.concatenate([np.ones(num_decodes), np.full(num_prefills, CHUNK)]).astype(np.int32)
    seq_lens = rng.integers(100, MAX_CONTEXT + 1, size=num_reqs).astype(np.int32)
    seq_lens = np.maximum(seq_lens, query_lens + 1)  # every chunk continues a cached prefix
    pages_needed = -(-seq_lens // BLOCK_SIZE)
    pages = rng.integers(1, 1 << 20, size=(num_reqs, WIDTH), dtype=np.int32)
    block_table = np.where(np.arange(WIDTH) < pages_needed[:, None], pages, 0).astype(np.int32)
    is_prefilling = np.arange(num_reqs) >= num_decodes
    return dict(query_lens=query_lens, seq_lens=seq_lens, block_table=block_table,
                block_size=BLOCK_SIZE, is_prefilling=is_prefilling)


def all_decode_inputs(num_reqs: int, rng: np.random.Generator) -> dict[str, Any]:
    """The issue's literal target case: `num_reqs` decode requests (one new token each), same
    contexts and 512-wide table as `batch_inputs`."""
    inputs = batch_inputs(num_reqs, rng)
    inputs["query_lens"] = np.ones(num_reqs, dtype=np.int32)
    inputs["is_prefilling"] = np.zeros(num_reqs, dtype=bool)
    return inputs


def measure(fn: Callable[[], Any], drain: Callable[[], None], *, reps: int, warmup: int,
            budget_s: float) -> dict[str, float]:
    """Median and p90 host microseconds of `fn()`; fewer reps when one call is slow."""
    for _ in range(warmup):
        fn()
        drain()
    start = time.perf_counter()
    fn()
    drain()
    estimate = time.perf_counter() - start
    reps = max(10, min(reps, int(budget_s / max(estimate, 1e-9))))
    samples = []
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside one timed call would dominate microsecond timings
    try:
        for _ in range(reps):
            drain()
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        if gc_enabled:
            gc.enable()
    samples.sort()
    return {"median": statistics.median(samples), "p90": samples[int(0.9 * (len(samples) - 1))],
            "reps": reps}


def side_by_side(fns: dict[str, Callable[[], Any]], drain: Callable[[], None], *, rounds: int,
                 calls: int) -> dict[str, float]:
    """Median host us of each of `fns` over `rounds` rounds of one warm block each (3 untimed
    calls, then `calls` timed ones, drained before each), the blocks alternating within a round
    and their order reversed every other round. Readings taken this way compare with each other
    even where the host's speed drifts from minute to minute (the numpy-add probe has been seen
    to nearly double on one GPU host within ten minutes)."""
    from bench_native import block  # one warm timed block, the device drained before each call

    names = list(fns)
    blocks: dict[str, list[float]] = {name: [] for name in names}
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                blocks[name].append(block(fns[name], drain, calls=calls, warmup=3))
    finally:
        if gc_enabled:
            gc.enable()
    return {name: statistics.median(values) for name, values in blocks.items()}


def _warm_process(fns: dict[str, Callable[[], Any] | None], drain: Callable[[], None], *,
                  seconds: float) -> None:
    """Run every variant for a while first: the first size would otherwise pay for clock ramp-up,
    lazy imports and allocator growth, which per-measurement warm-up calls do not absorb."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for fn in fns.values():
            if fn is not None:
                fn()
                drain()


def host_calibration(drain: Callable[[], None], *, reps: int, warmup: int) -> dict[str, float]:
    """Median host microseconds of three probes that say how fast this machine's CPU is.

    The GPU hosts' CPUs differ by up to 4x between machines, and build + lower is a few dozen
    such calls: numbers from two runs compare only next to these.
    """
    small = np.arange(256, dtype=np.int32)
    table = np.arange(TARGET_REQS * WIDTH, dtype=np.int32).reshape(TARGET_REQS, WIDTH)  # the target's table
    target = np.empty_like(table)
    probes = {
        "empty python call": lambda: None,
        "numpy add, 256 int32": lambda: small + 1,
        "numpy copyto, 512 KB": lambda: np.copyto(target, table),
    }
    return {name: measure(fn, drain, reps=reps, warmup=warmup, budget_s=0.25)["median"]
            for name, fn in probes.items()}


def _frameworks() -> dict[str, Any]:
    """What this host can run: torch (and its device), JAX (and its device), versions."""
    env: dict[str, Any] = {"torch": None, "jax": None, "device": "cpu", "card": None}
    try:
        import torch

        from attnsync.adapters import torch as torch_adapter

        env["torch"] = (torch, torch_adapter)
        env["versions_torch"] = torch.__version__
        if torch.cuda.is_available():
            env["device"] = "cuda"
            env["card"] = torch.cuda.get_device_name()
    except ImportError as exc:
        env["torch_missing"] = str(exc)
    try:
        import jax

        from attnsync.adapters import jax as jax_adapter

        try:
            jax_device = jax.devices("gpu")[0]
        except RuntimeError:
            jax_device = jax.devices("cpu")[0]
        env["jax"] = (jax, jax_adapter, jax_device)
        env["versions_jax"] = jax.__version__
    except ImportError as exc:
        env["jax_missing"] = str(exc)
    return env


def _agrees(batch: attnsync.Batch, lowered: Any, naive: dict[str, Any]) -> bool:
    """Same values from attnsync and the naive builder (read back once, outside the timing)."""
    pairs = [("query_start_loc", "query_start_loc"), ("seq_lens", "seq_lens"),
             ("block_table_tensor", "block_table_tensor"), ("slot_mapping", "slot_mapping")]
    same = all(
        np.array_equal(getattr(lowered, ours).cpu().numpy(), naive[theirs].cpu().numpy())
        for ours, theirs in pairs
    )
    return same and lowered.max_seq_len == naive["max_seq_len"] and lowered.max_query_len == naive["max_query_len"]


def run(*, quick: bool) -> dict[str, Any]:
    """Measure every variant at every size; the report as a JSON-able dict."""
    reps, warmup, budget_s = (30, 5, 0.25) if quick else (200, 20, 2.0)
    env = _frameworks()
    device = env["device"]
    torch_pair, jax_triple = env["torch"], env["jax"]
    drain = (lambda: torch_pair[0].cuda.synchronize()) if device == "cuda" else (lambda: None)
    torch_adapter = torch_pair[1] if torch_pair is not None else None
    jax_adapter, jax_device = (jax_triple[1], jax_triple[2]) if jax_triple is not None else (None, None)
    rng = np.random.default_rng(0)
    calibration = host_calibration(drain, reps=reps, warmup=warmup)
    # The serving loop's own stager; its pinned table memory where it has one (CUDA; trees
    # without `Stager.table_memory` pass nothing).
    stager = torch_adapter.Stager(device) if torch_adapter is not None else None
    table_memory = getattr(stager, "table_memory", None)
    memory = {} if table_memory is None else {"table_memory": table_memory}
    rows = []
    for num_reqs in SIZES:
        inputs = batch_inputs(num_reqs, rng)
        batch = attnsync.Batch(**inputs, **memory)
        fns: dict[str, Callable[[], Any] | None] = {
            "batch": lambda inputs=inputs: attnsync.Batch(**inputs, **memory),
            "build": lambda batch=batch: attnsync.build(batch),
            "build+torch": None,
            "build+jax": None,
            "naive": None,
        }
        agree = None
        if torch_adapter is not None:
            fns["build+torch"] = lambda b=batch: torch_adapter.lower(attnsync.build(b), device, stager=stager)
            fns["naive"] = lambda b=batch: naive_common_torch(b, device)
            agree = _agrees(batch, fns["build+torch"](), fns["naive"]())
        if jax_adapter is not None:
            fns["build+jax"] = lambda b=batch: jax_adapter.lower(attnsync.build(b), jax_device)
        if num_reqs == SIZES[0]:
            _warm_process(fns, drain, seconds=0.1 if quick else 0.5)
        stats = {name: measure(fn, drain, reps=reps, warmup=warmup, budget_s=budget_s)
                 for name, fn in fns.items() if fn is not None}
        median = {name: (stats[name]["median"] if name in stats else None) for name in VARIANTS}
        rows.append({
            "num_reqs": num_reqs,
            "num_tokens": batch.num_tokens,
            "block_table_width": WIDTH,
            "median_us": median,
            "p90_us": {name: (stats[name]["p90"] if name in stats else None) for name in VARIANTS},
            "reps": {name: stats[name]["reps"] for name in stats},
            "naive_over_build_torch": _ratio(median["naive"], median["build+torch"]),
            "naive_over_build_jax": _ratio(median["naive"], median["build+jax"]),
            "naive_agrees": agree,
        })
    all_decode = None
    if torch_adapter is not None:
        # the literal case: 256 decode requests (no prefill chunks), same table width
        decode_inputs = all_decode_inputs(TARGET_REQS, rng)
        decode_batch = attnsync.Batch(**decode_inputs, **memory)

        def lowered(b: attnsync.Batch) -> Any:
            return torch_adapter.lower(attnsync.build(b), device, stager=stager)

        decode_fns = {
            "batch": lambda: attnsync.Batch(**decode_inputs, **memory),
            "build": lambda: attnsync.build(decode_batch),
            "build+torch": lambda: lowered(decode_batch),
        }
        all_decode = {name: measure(fn, drain, reps=reps, warmup=warmup, budget_s=budget_s)["median"]
                      for name, fn in decode_fns.items()}
        # the same target again, in blocks alternating with the host-speed probe, so the report
        # says how fast the host was while the target was measured; next to it the same step
        # from a batch made without table_memory (its table in numpy memory: the lowering packs
        # it), and the whole step from the scheduler's arrays both ways
        small = np.arange(256, dtype=np.int32)
        numpy_batch = attnsync.Batch(**decode_inputs)
        probed = side_by_side({"numpy add, 256 int32": lambda: small + 1,
                               "build+torch": decode_fns["build+torch"],
                               "build+torch, table in numpy memory": lambda: lowered(numpy_batch),
                               "batch+build+torch": lambda: lowered(attnsync.Batch(**decode_inputs, **memory)),
                               "batch+build+torch, table in numpy memory":
                                   lambda: lowered(attnsync.Batch(**decode_inputs))},
                              drain, rounds=4 if quick else 10, calls=30 if quick else 100)
        drain()  # the pool reports a block only once its last copy has run
        table_pinned = (None if table_memory is None
                        else table_memory.block_of(decode_batch.block_table, 0) is not None)
    by_size = {row["num_reqs"]: row["median_us"] for row in rows}
    growth = {name: _ratio(by_size[1024][name], by_size[256][name]) for name in VARIANTS}
    at_target = by_size[TARGET_REQS]["build+torch"]
    cpu_only = device != "cuda"
    return {
        "bench": "bench_common",
        "device": device,
        "cpu_only": cpu_only,
        "card": env["card"] or platform.processor() or platform.machine(),
        "note": ("CPU-only run: the lowerings copy nothing and .item() waits for nothing here; "
                 "absolute times only count on the GPU") if cpu_only else "all variants target the GPU",
        "jax_device": str(jax_triple[2]) if jax_triple else None,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "attnsync": attnsync.__version__,
                     "attnsync_native": _accel.native is not None, "torch": env.get("versions_torch"),
                     "jax": env.get("versions_jax")},
        "config": {"sizes": list(SIZES), "block_size": BLOCK_SIZE, "block_table_width": WIDTH,
                   "prefill_every": PREFILL_EVERY, "chunk": CHUNK, "reps": reps, "warmup": warmup,
                   "budget_s_per_measurement": budget_s, "quick": quick},
        "host_calibration_us": calibration,
        "results": rows,
        "growth_1024_over_256": growth,
        "target": {
            "what": f"build+torch for {TARGET_REQS} decode-heavy requests, host us, on an H100",
            "limit_us": TARGET_US,
            "measured_us": at_target,
            "met": None if cpu_only or at_target is None else at_target < TARGET_US,
        },
        "target_all_decode": None if all_decode is None else {
            "what": f"build+torch for {TARGET_REQS} decode requests (the issue's wording), host us, on an H100",
            "limit_us": TARGET_US,
            "median_us": all_decode,
            "measured_us": all_decode["build+torch"],
            "met": None if cpu_only else all_decode["build+torch"] < TARGET_US,
            "side_by_side_with_probe_us": probed,
            "table_in_pinned_block": table_pinned,
        },
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    label = " (CPU-only: absolute times only count on the GPU)" if report["cpu_only"] else ""
    probes = ", ".join(f"{name} {value:.2f}" for name, value in report["host_calibration_us"].items())
    lines = [
        f"### bench_common on {report['device']} ({report['card']}){label}",
        "",
        "Median host microseconds per call. This host's speed (compare runs only next to it): "
        f"{probes} us.",
        "",
        "| reqs | tokens | " + " | ".join(VARIANTS) + " | naive / build+torch | naive / build+jax |",
        "|---:|---:|" + "---:|" * (len(VARIANTS) + 2),
    ]
    for row in report["results"]:
        cells = [_cell(row["median_us"][name]) for name in VARIANTS]
        lines.append(
            f"| {row['num_reqs']} | {row['num_tokens']} | " + " | ".join(cells)
            + f" | {_cell(row['naive_over_build_torch'], 2)}x | {_cell(row['naive_over_build_jax'], 2)}x |"
        )
    lines += ["", "Growth from 256 to 1024 requests (linear would be 4.00x):", "",
              "| variant | t(1024) / t(256) |", "|---|---:|"]
    lines += [f"| {name} | {_cell(value, 2)}x |" for name, value in report["growth_1024_over_256"].items()]
    target = report["target"]
    verdict = {True: "met", False: "NOT met", None: "not judged (CPU-only run)"}[target["met"]]
    lines += ["", f"Target: {target['what']} < {target['limit_us']:.0f} us: measured "
              f"{_cell(target['measured_us'])} us, {verdict}."]
    decode = report.get("target_all_decode")
    if decode is not None:
        verdict = {True: "met", False: "NOT met", None: "not judged (CPU-only run)"}[decode["met"]]
        parts = ", ".join(f"{name} {_cell(value)}" for name, value in decode["median_us"].items())
        where = {True: "the batch's table in a pinned block", False: "the batch's table in numpy memory",
                 None: "no pinned table memory here"}[decode.get("table_in_pinned_block")]
        lines += [f"Target: {decode['what']} < {decode['limit_us']:.0f} us: measured "
                  f"{_cell(decode['measured_us'])} us, {verdict} ({parts}; {where})."]
        probed = decode.get("side_by_side_with_probe_us")
        if probed:
            lines.append("Measured again in blocks alternating with the host probe: " + ", ".join(
                f"{name} {_cell(value, 2)} us" for name, value in probed.items()) + ".")
    disagree = [row["num_reqs"] for row in report["results"] if row["naive_agrees"] is False]
    if disagree:
        lines.append(f"WARNING: naive and attnsync values differ at sizes {disagree}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for bench_common.json")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args(argv)
    report = run(quick=args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_common.json").write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 1 if any(row["naive_agrees"] is False for row in report["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
