"""A Qwen3-0.6B-shaped decode loop: naive vs attnsync vs planned-once metadata, side by side.

    python bench/decode_loop.py --out DIR [--steps N] [--repeats N] [--quick]

The model shape is Qwen3-0.6B's attention: 28 layers, 16 query heads, 8 KV heads, head dim
128, bf16, KV pages of 16 tokens. A batch of 32 requests starts at random contexts of 200 to
2000 tokens and decodes one token per step, so every step has new lengths and, now and then,
a new page. q is random (the values do not matter for timing). Three ways to produce each
step's metadata, in one process, interleaved per repeat (medians of the repeats):

- `naive`: what engines did before: Python lists -> `torch.tensor(list, device="cuda")` per
  field, `.item()` for the maxima, and FlashInfer's `plan()` handed CUDA indptr/last_page_len,
  which it copies back to the host (a blocking device-to-host copy, i.e. a sync per step);
- `attnsync`: `attnsync.Batch` -> `attnsync.build` -> `attnsync.adapters.torch.lower` through
  the loop's own `Stager("cuda")` (a ring of two slots: one pinned non_blocking copy) ->
  `attnsync.integrations.flashinfer.plan` with host arrays;
- `once`: the metadata of step 0 built and planned before the loop; the loop only launches
  kernels. The upper limit: what the loop would run at with free metadata.

Two kernels consume the metadata: FlashInfer's decode wrapper (`run` per layer) and attnsync's
Triton kernel `unified_paged_attention` (per layer; it needs no plan, so `naive` is device lists
+ `.item()` and `attnsync` is build + lower of the common metadata). For the attnsync FlashInfer
mode the host time of each step is split into batch+build, lower, plan and the 28 launches
(medians over steps). A micro-benchmark times FlashInfer build+lower alone for 32 decode
requests (target: under 30 microseconds of host time).

Writes DIR/decode_loop.json and prints markdown tables. Without CUDA or flashinfer it says so,
writes {"status": "skipped", "reason": ...} and exits 0. Steps/s only compare within one run
(GPU hosts differ by 15 % or more).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
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

LAYERS, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE = 28, 16, 8, 128, 16
BATCH, CONTEXT = 32, (200, 2000)
SCALE = 1.0 / math.sqrt(HEAD_DIM)
MODES = ("naive", "attnsync", "once")
MICRO_TARGET_US = 30.0


# ---------------------------------------------------------------------------------------------
# Environment.


def _unavailable() -> str | None:
    """Why this benchmark cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (this benchmark times GPU decode steps)"
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing at import
        return f"flashinfer is not importable ({type(exc).__name__}: {exc})"
    return None


def _environment() -> dict[str, Any]:
    import flashinfer
    import torch

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "flashinfer_version": getattr(flashinfer, "__version__", "?"),
        "python": platform.python_version(),
        "host": platform.node(),
        "attnsync_native": _accel.native is not None,  # the compiled twin of hot numpy steps
    }


# ---------------------------------------------------------------------------------------------
# The workload.


class Workload:
    """Caches, block table and per-step lengths shared by every mode."""

    def __init__(self, steps: int, seed: int = 0) -> None:
        import torch

        rng = np.random.default_rng(seed)
        # Step i's sequence length includes its new token: context + i + 1 ... so every row
        # crosses a page boundary about every 16 steps.
        self.start = rng.integers(CONTEXT[0], CONTEXT[1] + 1, BATCH).astype(np.int32)
        self.steps = steps
        final = self.start + steps
        pages = -(-final // PAGE)
        width = int(pages.max())
        total = int(pages.sum())
        ids = rng.permutation(total).astype(np.int32)
        table = np.zeros((BATCH, width), dtype=np.int32)
        offset = 0
        for r in range(BATCH):  # set-up only, not timed
            table[r, : pages[r]] = ids[offset : offset + pages[r]]
            offset += pages[r]
        self.block_table = table
        self.block_table_list = table.tolist()  # the naive scheduler's Python state
        self.query_lens = np.ones(BATCH, dtype=np.int32)
        self.num_pages = total
        gen = torch.Generator(device="cuda").manual_seed(seed)
        shape = (total, PAGE, NUM_KV_HEADS, HEAD_DIM)
        self.k = [torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        self.v = [torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        self.q = torch.randn(BATCH, NUM_QO_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty_like(self.q)

    def seq_lens(self, step: int) -> np.ndarray:
        return self.start + np.int32(step + 1)

    def batch(self, step: int, stager: Any = None) -> attnsync.Batch:
        """Step `step`'s batch; with `stager`, its table goes to the stager's pinned table memory
        where it has one (CUDA stagers of trees that offer it; this loop's table is below the
        size it takes, so the batch keeps numpy memory, as a serving loop's would)."""
        memory = getattr(stager, "table_memory", None)
        return attnsync.Batch(
            query_lens=self.query_lens, seq_lens=self.seq_lens(step),
            block_table=self.block_table, block_size=PAGE,
            **({} if memory is None else {"table_memory": memory}),
        )


def _naive_common(w: Workload, step: int) -> dict[str, Any]:
    """The common fields the pre-attnsync way: device lists, `.item()` maxima (syncs)."""
    import torch

    seq = [int(x) for x in w.seq_lens(step)]
    qsl = list(range(BATCH + 1))
    slots = [w.block_table_list[r][(s - 1) // PAGE] * PAGE + (s - 1) % PAGE for r, s in enumerate(seq)]
    qsl_d = torch.tensor(qsl, dtype=torch.int32, device="cuda")
    seq_d = torch.tensor(seq, dtype=torch.int32, device="cuda")
    return dict(
        query_start_loc=qsl_d,
        seq_lens=seq_d,
        block_table=torch.tensor(w.block_table_list, dtype=torch.int32, device="cuda"),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
        max_query_len=int((qsl_d[1:] - qsl_d[:-1]).max().item()),
        max_seq_len=int(seq_d.max().item()),
        seq=seq,
    )


# ---------------------------------------------------------------------------------------------
# FlashInfer modes. Each returns a step function; the loop times it.


def flashinfer_modes(w: Workload, split: dict[str, list[float]], stager: Any) -> dict[str, Callable[[int], None]]:
    import flashinfer
    import torch

    from attnsync.adapters import torch as ast
    from attnsync.integrations.flashinfer import plan, workspace_buffer

    # One wrapper per mode, so no mode inherits another's plan state.
    wrappers = {m: flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace_buffer("cuda"), "NHD") for m in MODES}
    shape = dict(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM)
    plan_kw = dict(**shape, q_data_type=torch.bfloat16, sm_scale=SCALE)
    q, out = w.q, w.out

    def launch(wrapper) -> None:
        for layer in range(LAYERS):
            wrapper.run(q, (w.k[layer], w.v[layer]), out=out)

    def naive(step: int) -> None:
        common = _naive_common(w, step)
        indptr, indices, last = [0], [], []
        for r, s in enumerate(common["seq"]):
            pages = (s + PAGE - 1) // PAGE
            indptr.append(indptr[-1] + pages)
            indices.extend(w.block_table_list[r][:pages])
            last.append(s - (pages - 1) * PAGE)
        wrapper = wrappers["naive"]
        wrapper.plan(
            torch.tensor(indptr, dtype=torch.int32, device="cuda"),
            torch.tensor(indices, dtype=torch.int32, device="cuda"),
            torch.tensor(last, dtype=torch.int32, device="cuda"),
            page_size=PAGE, **plan_kw,
        )
        launch(wrapper)

    def sync_free(step: int) -> None:
        t0 = time.perf_counter()
        md = attnsync.build(w.batch(step, stager), backend="flashinfer")
        t1 = time.perf_counter()
        tmd = ast.lower(md, device="cuda", stager=stager)
        t2 = time.perf_counter()
        plan(tmd, decode_wrapper=wrappers["attnsync"], **plan_kw)
        t3 = time.perf_counter()
        launch(wrappers["attnsync"])
        t4 = time.perf_counter()
        split["batch+build"].append(t1 - t0)
        split["lower"].append(t2 - t1)
        split["plan"].append(t3 - t2)
        split["launches"].append(t4 - t3)

    once_md = attnsync.build(w.batch(0), backend="flashinfer")
    plan(ast.lower(once_md, device="cuda"), decode_wrapper=wrappers["once"], **plan_kw)

    def once(step: int) -> None:
        launch(wrappers["once"])

    return {"naive": naive, "attnsync": sync_free, "once": once}


# ---------------------------------------------------------------------------------------------
# Triton modes.


def triton_modes(w: Workload, split: dict[str, list[float]],
                 stager: Any) -> tuple[dict[str, Callable[[int], None]], str]:
    import torch

    from attnsync.adapters import torch as ast
    from attnsync.kernels import triton_attention as ta

    q, out = w.q, w.out
    extra: dict[str, Any] = {}
    path = "2d"
    scratch_fn = getattr(ta, "split_kv_scratch", None)
    if scratch_fn is not None:
        # Decode-only batches take the split-KV path when the kernel module offers it: one
        # 2-D program per (row, kv head) leaves most SMs idle with 32 long rows.
        segm_output, segm_max, segm_expsum = scratch_fn(BATCH, NUM_QO_HEADS, HEAD_DIM, device="cuda")
        extra = dict(use_split_kv=True, segm_output=segm_output, segm_max=segm_max, segm_expsum=segm_expsum)
        path = "split-kv"

    def launch(qsl, seq, table, max_q, max_s) -> None:
        for layer in range(LAYERS):
            ta.unified_paged_attention(
                q, w.k[layer], w.v[layer], out, query_start_loc=qsl, seq_lens=seq,
                block_table=table, max_query_len=max_q, max_seq_len=max_s, num_reqs=BATCH,
                scale=SCALE, **extra,
            )

    def naive(step: int) -> None:
        c = _naive_common(w, step)
        launch(c["query_start_loc"], c["seq_lens"], c["block_table"], c["max_query_len"], c["max_seq_len"])

    def sync_free(step: int) -> None:
        t0 = time.perf_counter()
        md = attnsync.build(w.batch(step, stager))
        t1 = time.perf_counter()
        tmd = ast.lower(md, device="cuda", stager=stager)
        t2 = time.perf_counter()
        launch(tmd.query_start_loc, tmd.seq_lens, tmd.block_table_tensor, tmd.max_query_len, tmd.max_seq_len)
        t3 = time.perf_counter()
        split["batch+build"].append(t1 - t0)
        split["lower"].append(t2 - t1)
        split["launches"].append(t3 - t2)

    once_tmd = ast.lower(attnsync.build(w.batch(0)), device="cuda")  # fresh memory: held for the whole loop
    # Bounds for every step of the loop: correctness never depends on them (kernel contract).
    once_max = int(w.seq_lens(w.steps - 1).max())

    def once(step: int) -> None:
        launch(once_tmd.query_start_loc, once_tmd.seq_lens, once_tmd.block_table_tensor, 1, once_max)

    torch.cuda.synchronize()
    return {"naive": naive, "attnsync": sync_free, "once": once}, path


# ---------------------------------------------------------------------------------------------
# Timing.


def time_loop(step_fn: Callable[[int], None], steps: int) -> float:
    """Steps per second of `steps` calls, from an idle GPU to an idle GPU."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        step_fn(step)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def compare_modes(modes: dict[str, Callable[[int], None]], *, steps: int, repeats: int,
                  warmup: int) -> dict[str, Any]:
    """Median steps/s per mode; the modes are interleaved within each repeat."""
    for fn in modes.values():  # JIT, pinned buffers, allocator pools
        time_loop(fn, warmup)
    runs: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode, fn in modes.items():
            runs[mode].append(time_loop(fn, steps))
    return {m: {"steps_per_s": statistics.median(v), "runs": v} for m, v in runs.items()}


def micro_build_lower(reps: int) -> dict[str, float]:
    """Host us of FlashInfer build (+lower) for 32 decode requests, of one batch again and again
    and of successive decode steps; the GPU drained between reps. Lowerings go through one
    `Stager("cuda")`, as a serving loop's; "build+lower, fresh memory" is `lower` without one."""
    import torch

    from attnsync.adapters import torch as ast

    stager = _loop_stager()
    table_memory = getattr(stager, "table_memory", None)
    memory = {} if table_memory is None else {"table_memory": table_memory}
    w_rng = np.random.default_rng(1)
    seq = w_rng.integers(CONTEXT[0], CONTEXT[1] + 1, BATCH).astype(np.int32)
    width = int(-(-seq.max() // PAGE))
    table = w_rng.integers(0, 1 << 16, (BATCH, width)).astype(np.int32)
    kwargs = dict(query_lens=np.ones(BATCH, np.int32), seq_lens=seq, block_table=table, block_size=PAGE)
    batch = attnsync.Batch(**kwargs)
    md = attnsync.build(batch, backend="flashinfer")
    # A decode loop's steps: every context one longer than the step before, so the page list
    # changes length whenever a row crosses a page boundary (what a serving loop lowers; the
    # fixed batch above repeats one step's shapes). The table has room for 400 more tokens.
    drift_width = int(-(-(seq.max() + 400) // PAGE))
    drift_table = w_rng.integers(0, 1 << 16, (BATCH, drift_width)).astype(np.int32)
    drifting = [attnsync.Batch(query_lens=np.ones(BATCH, np.int32), seq_lens=seq + step,
                               block_table=drift_table, block_size=PAGE) for step in range(400)]
    step_of = itertools.count()
    variants = {
        "batch": lambda: attnsync.Batch(**kwargs, **memory),
        "build": lambda: attnsync.build(batch, backend="flashinfer"),
        "lower": lambda: ast.lower(md, device="cuda", stager=stager),
        "build+lower": lambda: ast.lower(attnsync.build(batch, backend="flashinfer"), device="cuda", stager=stager),
        "batch+build+lower": lambda: ast.lower(
            attnsync.build(attnsync.Batch(**kwargs, **memory), backend="flashinfer"), device="cuda", stager=stager
        ),
        "build+lower, decode steps": lambda: ast.lower(
            attnsync.build(drifting[next(step_of) % len(drifting)], backend="flashinfer"), device="cuda",
            stager=stager,
        ),
        "build+lower, fresh memory": lambda: ast.lower(attnsync.build(batch, backend="flashinfer"), device="cuda"),
    }
    result = {}
    for name, fn in variants.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
            torch.cuda.synchronize()  # outside the timed part: the staging ring never waits
        result[name] = statistics.median(samples) * 1e6
    return result


def _loop_stager() -> Any:
    """The stager the attnsync modes lower through, as a serving loop owns one: a ring of two
    slots (each lowering valid until the next but one)."""
    from attnsync.adapters import torch as ast

    return ast.Stager("cuda")


def _staging_delta(stats: Any, before: tuple[int, int]) -> dict[str, Any]:
    """Copies and event waits since `before`: a wait means the host was two steps ahead of
    the GPU, so its "lower" time includes waiting for the GPU (back-pressure), not work."""
    copies, waits = stats.copies - before[0], stats.event_waits - before[1]
    return {"copies": copies, "event_waits": waits, "waits_per_copy": waits / copies if copies else None}


def _median_us(values: list[float]) -> float | None:
    return statistics.median(values) * 1e6 if values else None


def run(*, steps: int, repeats: int, quick: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"status": "ok", **_environment()}
    report["config"] = dict(
        layers=LAYERS, num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
        page=PAGE, dtype="bfloat16", batch=BATCH, context=list(CONTEXT), steps=steps,
        repeats=repeats, quick=quick,
    )
    w = Workload(steps)
    warmup = min(3 if quick else 10, steps)  # warm-up steps reuse the loop's lengths (pages sized for them)
    fi_split: dict[str, list[float]] = {k: [] for k in ("batch+build", "lower", "plan", "launches")}
    stager = _loop_stager()
    stats = stager.stats
    before = (stats.copies, stats.event_waits)
    fi = compare_modes(flashinfer_modes(w, fi_split, stager), steps=steps, repeats=repeats, warmup=warmup)
    report["flashinfer"] = {"modes": fi, "host_split_us": {k: _median_us(v) for k, v in fi_split.items()},
                            "staging": _staging_delta(stats, before)}
    try:
        tr_split: dict[str, list[float]] = {k: [] for k in ("batch+build", "lower", "launches")}
        tr_modes, path = triton_modes(w, tr_split, stager)
        before = (stats.copies, stats.event_waits)
        tr = compare_modes(tr_modes, steps=steps, repeats=repeats, warmup=warmup)
        report["triton"] = {
            "path": path, "modes": tr, "host_split_us": {k: _median_us(v) for k, v in tr_split.items()},
            "staging": _staging_delta(stats, before),
        }
    except Exception as exc:  # the kernel module is optional; say why it did not run
        report["triton"] = {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
    for kernel in ("flashinfer", "triton"):
        modes = report[kernel].get("modes")
        if modes:
            rate = {m: modes[m]["steps_per_s"] for m in MODES}
            report[kernel]["ratios"] = {
                "attnsync/naive": rate["attnsync"] / rate["naive"],
                "attnsync/once": rate["attnsync"] / rate["once"],
            }
    micro = micro_build_lower(300 if quick else 3000)
    report["micro_us"] = micro
    report["micro_target_us"] = MICRO_TARGET_US
    report["micro_meets_target"] = micro["build+lower"] < MICRO_TARGET_US
    return report


# ---------------------------------------------------------------------------------------------
# Output.


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"GPU: {report['gpu']} (torch {report['torch']}, flashinfer {report['flashinfer_version']})",
        f"Decode loop: {LAYERS} layers, Hq {NUM_QO_HEADS}, Hkv {NUM_KV_HEADS}, D {HEAD_DIM}, page {PAGE}, "
        f"bf16, batch {BATCH}, contexts {CONTEXT[0]}-{CONTEXT[1]}, {report['config']['steps']} steps, "
        f"median of {report['config']['repeats']}",
        "",
        "| kernel | naive steps/s | attnsync steps/s | once steps/s | attnsync/naive | attnsync/once |",
        "|---|---|---|---|---|---|",
    ]
    for kernel in ("flashinfer", "triton"):
        part = report.get(kernel, {})
        if "modes" not in part:
            reason = str(part.get("reason", "?")).splitlines()[0]
            lines.append(f"| {kernel} | skipped: {reason} | | | | |")
            continue
        rate = {m: part["modes"][m]["steps_per_s"] for m in MODES}
        label = kernel if kernel == "flashinfer" else f"triton ({part['path']})"
        lines.append(
            f"| {label} | {_cell(rate['naive'])} | {_cell(rate['attnsync'])} | {_cell(rate['once'])} | "
            f"{_cell(part['ratios']['attnsync/naive'], 3)} | {_cell(part['ratios']['attnsync/once'], 3)} |"
        )
    lines += ["", "Host time per step, attnsync mode (median us; 'lower' includes waiting for the GPU "
              "whenever the host ran two steps ahead: the waits column counts those steps):", "",
              "| kernel | batch+build | lower | plan | launches | lowerings that waited |",
              "|---|---|---|---|---|---|"]
    for kernel in ("flashinfer", "triton"):
        split = report.get(kernel, {}).get("host_split_us")
        if split:
            staging = report[kernel].get("staging") or {}
            waited = (f"{staging['event_waits']} of {staging['copies']}" if staging.get("copies") else "-")
            lines.append(
                f"| {kernel} | {_cell(split.get('batch+build'))} | {_cell(split.get('lower'))} | "
                f"{_cell(split.get('plan'))} | {_cell(split.get('launches'))} | {waited} |"
            )
    micro = report["micro_us"]
    lines += [
        "", f"FlashInfer metadata for {BATCH} decode requests, host us (median; target build+lower < "
        f"{MICRO_TARGET_US:.0f}: {'met' if report['micro_meets_target'] else 'missed'}):", "",
        "| " + " | ".join(micro) + " |", "|" + "---|" * len(micro),
        "| " + " | ".join(_cell(v) for v in micro.values()) + " |",
    ]
    return "\n".join(lines)


def loop_cli(argv: list[str] | None, *, name: str, doc: str, quick_steps: int, min_steps: int,
             run: Callable[..., dict[str, Any]], markdown: Callable[[dict[str, Any]], str],
             unavailable: Callable[[], str | None]) -> int:
    """The command line of a decode-loop benchmark (this one and graph_decode_loop.py):
    --out DIR, --steps, --repeats, --quick; a "skipped" JSON where `unavailable()` says why."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help=f"folder for {name}.json")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per timed loop (200)")
    parser.add_argument("--repeats", type=int, default=None, help="timed loops per mode (5)")
    parser.add_argument("--quick", action="store_true", help=f"a short smoke run ({quick_steps} steps, 2 repeats)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (quick_steps if args.quick else 200)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if steps < min_steps or repeats < 1:
        parser.error(f"--steps must be >= {min_steps} and --repeats >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    reason = unavailable()
    if reason is not None:
        print(f"{name}: skipped: {reason}")
        path.write_text(json.dumps({"status": "skipped", "reason": reason}, indent=1) + "\n")
        return 0
    report = run(steps=steps, repeats=repeats, quick=args.quick)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return loop_cli(argv, name="decode_loop", doc=__doc__, quick_steps=20, min_steps=1, run=run,
                    markdown=markdown, unavailable=_unavailable)


if __name__ == "__main__":
    raise SystemExit(main())
