"""The Qwen3-0.6B-shaped decode loop in CUDA-graph mode: attnsync per step vs metadata planned once.

    python bench/graph_decode_loop.py --out DIR [--steps N] [--repeats N] [--quick]

The workload of bench/decode_loop.py (28 layers, 16 query heads, 8 KV heads, head dim 128, bf16,
pages of 16 tokens, 32 requests at contexts 200-2000 decoding one token per step), with every
step's attention (all 28 layers) captured once as a CUDA graph for its bucket
(`attnsync.integrations.graphs`) and replayed. Two kernels, three modes each, interleaved per repeat
(medians of the repeats):

- `attnsync`: every step `attnsync.Batch` -> `BucketLadder.pad` -> `attnsync.build` -> one
  pinned non_blocking copy (Triton: into the bucket's fixed buffers, a persistent stager's;
  FlashInfer: through the loop's own `Stager` ring, the page ids then copied by `plan()` into
  the wrapper's fixed buffers) -> FlashInfer only: `plan()` of every bucket row ->
  `graph.replay()`;
- `overlapped`: the same per-step work through `attnsync.integrations.graphs.OverlappedSteps`:
  two captures of the step used in turn, each step's copy and plan uploads on a side stream
  while the other capture replays, so they no longer sit between replays on one stream;
- `once`: the metadata of the loop's middle step built, lowered and planned before the loop;
  the loop only replays. The limit: the same kernels and GPU work with free metadata. (The
  middle step, not step 0: contexts grow by one token a step, so step 0's metadata would do
  ~9 % less attention work than the loop's average and flatter the limit.)

Target: attnsync (either mode) at least 0.97 of `once` (steps/s) for each kernel, in one run. What is left is
named from measurements of the same run: host time per part of the attnsync step (median us),
the GPU time of one replay and of one step's copies and plan uploads (CUDA events), and the host
time of one attnsync step while a 50 ms kernel occupies the stream (a step that waits for the
GPU anywhere takes ~50 ms there, so this tells host-bound from GPU-bound).

Writes DIR/graph_decode_loop.json and prints markdown tables. Without CUDA it writes
{"status": "skipped", "reason": ...} and exits 0; without FlashInfer the FlashInfer half is
skipped (with its reason) and Triton still runs. Steps/s only compare within one run.
"""

from __future__ import annotations

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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_loop's workload
try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync

TARGET = 0.97
MODES = ("attnsync", "once")
MAX_MODEL_LEN = 4096  # the engine's limit: a 256-page block table, the bucket's max_seq_len


def _unavailable() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (this benchmark replays CUDA graphs)"
    return None


def _flashinfer_missing() -> str | None:
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing at import
        return f"flashinfer is not importable ({type(exc).__name__}: {exc})"
    return None


def _environment() -> dict[str, Any]:
    import torch

    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "python": platform.python_version(), "host": platform.node()}
    try:
        import flashinfer

        out["flashinfer_version"] = getattr(flashinfer, "__version__", "?")
    except Exception:
        out["flashinfer_version"] = None
    return out


class Loop:
    """The workload, with the engine's host block table as wide as max_model_len."""

    def __init__(self, steps: int) -> None:
        import decode_loop as dl

        from attnsync import BucketLadder

        self.dl = dl
        self.w = dl.Workload(steps)
        self.steps = steps
        width = -(-MAX_MODEL_LEN // dl.PAGE)
        self.table = np.zeros((dl.BATCH, width), dtype=np.int32)
        self.table[:, : self.w.block_table.shape[1]] = self.w.block_table
        # One width rung: every step of the loop lands in one bucket (contexts cross 128 pages).
        self.ladder = BucketLadder(max_num_reqs=64, max_num_tokens=64, max_model_len=MAX_MODEL_LEN,
                                   block_size=dl.PAGE, width_sizes=(width,))
        self.bucket = self.ladder.bucket_for(self.batch(0))
        assert all(self.ladder.bucket_for(self.batch(s)) == self.bucket for s in (0, steps - 1))
        self.kv = list(zip(self.w.k, self.w.v, strict=True))
        self.scale = 1.0 / math.sqrt(dl.HEAD_DIM)

    def batch(self, step: int, stager: Any = None) -> attnsync.Batch:
        """Step `step`'s batch; with `stager`, its table goes to the stager's pinned table memory
        where it has one (as in decode_loop.py)."""
        memory = getattr(stager, "table_memory", None)
        return attnsync.Batch(query_lens=self.w.query_lens, seq_lens=self.w.seq_lens(step),
                              block_table=self.table, block_size=self.dl.PAGE,
                              **({} if memory is None else {"table_memory": memory}))


def _parts() -> dict[str, list[float]]:
    return {k: [] for k in ("batch", "pad", "build", "lower", "plan", "replay")}


def _overlapped_mode(loop: Loop, make: Callable[[], Any]) -> Callable[[int], None]:
    """The `overlapped` mode: `OverlappedSteps` over two captures made by `make`."""
    from attnsync.integrations.graphs import OverlappedSteps

    overlapped = OverlappedSteps(make)

    def step(step: int) -> None:
        overlapped.step(loop.batch(step))

    return step


def triton_modes(loop: Loop, split: dict[str, list[float]]) -> tuple[dict[str, Callable[[int], None]], dict]:
    from attnsync.integrations.graphs import TritonGraph

    dl = loop.dl

    def make() -> TritonGraph:
        # Split-KV, as bench/decode_loop.py: 2-D programs per (row, kv head) leave SMs idle.
        g = TritonGraph(loop.ladder, loop.bucket, kv_caches=loop.kv, num_q_heads=dl.NUM_QO_HEADS,
                        scale=loop.scale, use_split_kv=True)
        g.q.copy_(loop.w.q)
        return g

    graphs = {m: make() for m in MODES}
    g = graphs["attnsync"]

    def sync_free(step: int) -> None:
        t0 = time.perf_counter()
        batch = loop.batch(step)
        t1 = time.perf_counter()
        padded = loop.ladder.pad(batch, g.bucket)
        t2 = time.perf_counter()
        md = attnsync.build(padded)
        t3 = time.perf_counter()
        g.last = g.lowering.lower(md)
        t4 = time.perf_counter()
        g.replay()
        t5 = time.perf_counter()
        for key, value in zip(("batch", "pad", "build", "lower", "replay"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
                              strict=True):
            split[key].append(value)

    once = graphs["once"]
    once.step(loop.batch(loop.steps // 2))

    def limit(step: int) -> None:
        once.replay()

    return {"attnsync": sync_free, "once": limit, "overlapped": _overlapped_mode(loop, make)}, {
        "graph": g, "stats": lambda: {"copies": g.lowering.stats.copies, "event_waits": g.lowering.stats.event_waits},
        "prepare": lambda step: g.prepare(loop.batch(step)), "path": "split-kv" if g.use_split_kv else "2d",
    }


def flashinfer_modes(loop: Loop, split: dict[str, list[float]]) -> tuple[dict[str, Callable[[int], None]], dict]:
    import torch

    from attnsync.adapters import torch as ast
    from attnsync.integrations.flashinfer import _ROTATIONS
    from attnsync.integrations.graphs import FlashInferDecodeGraph, plan_padded_decode

    dl = loop.dl

    def make() -> FlashInferDecodeGraph:
        g = FlashInferDecodeGraph(loop.ladder, loop.bucket, kv_caches=loop.kv, num_qo_heads=dl.NUM_QO_HEADS,
                                  q_data_type=torch.bfloat16, sm_scale=loop.scale)
        g.q[: dl.BATCH].copy_(loop.w.q)
        return g

    graphs = {m: make() for m in MODES}
    g = graphs["attnsync"]
    # The loop's own ring: plan() copies the page ids into the wrapper's buffers, so the staged
    # metadata need not sit at fixed addresses, and each lowering is used before the next.
    stager = ast.Stager(g.device)

    def sync_free(step: int) -> None:
        t0 = time.perf_counter()
        batch = loop.batch(step, stager)
        t1 = time.perf_counter()
        padded = loop.ladder.pad(batch, g.bucket)
        t2 = time.perf_counter()
        md = attnsync.build(padded, backend="flashinfer")
        t3 = time.perf_counter()
        tmd = ast.lower(md, g.device, stager=stager)
        t4 = time.perf_counter()
        plan_padded_decode(tmd, g.wrapper, **g.plan_args)
        t5 = time.perf_counter()
        g.replay()
        t6 = time.perf_counter()
        for key, value in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
            split[key].append(value)

    once = graphs["once"]
    once.step(loop.batch(loop.steps // 2))

    def limit(step: int) -> None:
        once.replay()

    def stats() -> dict[str, int]:
        rotation = _ROTATIONS.get(g.wrapper)
        return {"copies": stager.stats.copies, "event_waits": stager.stats.event_waits,
                "plan_buffer_waits": rotation.waits if rotation is not None else 0}

    return {"attnsync": sync_free, "once": limit, "overlapped": _overlapped_mode(loop, make)}, {
        "graph": g, "stats": stats, "prepare": lambda step: g.prepare(loop.batch(step)), "path": "decode wrapper",
    }


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


def compare_modes(modes: dict[str, Callable[[int], None]], *, steps: int, repeats: int, warmup: int):
    for fn in modes.values():
        time_loop(fn, warmup)
    runs: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode, fn in modes.items():
            runs[mode].append(time_loop(fn, steps))
    return {m: {"steps_per_s": statistics.median(v), "runs": v} for m, v in runs.items()}


def gpu_times(extra: dict, loop: Loop, reps: int) -> dict[str, float]:
    """GPU ms of one replay, and GPU us of one step's metadata work (copies, plan uploads)."""
    import torch

    g = extra["graph"]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays, prepares = [], []
    for i in range(reps):
        torch.cuda.synchronize()
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        replays.append(start.elapsed_time(end))
        # The metadata's own stream work (the staging copy; for FlashInfer also plan()'s
        # uploads) bracketed by events on an idle GPU. The GPU may also wait for the host
        # between those copies, so this is an upper bound on their GPU time.
        torch.cuda.synchronize()
        start.record()
        extra["prepare"](i % loop.steps)
        end.record()
        end.synchronize()
        prepares.append(start.elapsed_time(end))
    return {"replay_ms": statistics.median(replays), "prepare_stream_us_upper_bound": statistics.median(prepares) * 1e3}


def stall_probe(step_fn: Callable[[int], None], attempts: int = 3) -> dict[str, float]:
    """Host ms of one attnsync step while a 50 ms kernel occupies the stream (min of attempts)."""
    from attnsync.testing import host_time_under_busy_gpu

    samples = [host_time_under_busy_gpu(lambda: step_fn(0), sleep_ms=50.0)[0] for _ in range(attempts)]
    return {"host_ms_under_busy_gpu": min(samples), "stall_free": min(samples) < 5.0}


def _median_us(values: list[float]) -> float | None:
    return statistics.median(values) * 1e6 if values else None


def run_kernel(name: str, make_modes, loop: Loop, *, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    split = _parts()
    modes, extra = make_modes(loop, split)
    result = compare_modes(modes, steps=steps, repeats=repeats, warmup=warmup)
    host = {k: _median_us(v) for k, v in split.items() if v}
    host_total = sum(v for v in host.values() if v is not None)
    rates = {m: result[m]["steps_per_s"] for m in MODES}
    ratio = rates["attnsync"] / rates["once"]
    overlapped_ratio = result["overlapped"]["steps_per_s"] / rates["once"] if "overlapped" in result else None
    gpu = gpu_times(extra, loop, reps=20)
    probe = stall_probe(modes["attnsync"])
    step_ms = {m: 1e3 / rates[m] for m in MODES}
    left_us = (step_ms["attnsync"] - step_ms["once"]) * 1e3
    # Name what is left: host-bound when the host's own time per step is above the GPU's.
    if not probe["stall_free"]:
        verdict = "the attnsync step waits for the GPU somewhere (stall probe): the host is on the critical path"
    elif host_total * 1e-3 > step_ms["once"]:
        verdict = "host-bound: host time per step exceeds the replay's GPU time"
    else:
        verdict = ("GPU-side: the host runs ahead; what is left is the step's stream work (the metadata "
                   "copy and, for FlashInfer, plan()'s uploads) serialised with the replays")
    return {
        "path": extra["path"],
        "modes": result,
        "ratio_attnsync_over_once": ratio,
        "meets_target": ratio >= TARGET,
        "ratio_overlapped_over_once": overlapped_ratio,
        "overlapped_meets_target": overlapped_ratio is not None and overlapped_ratio >= TARGET,
        "host_us": host,
        "host_total_us": host_total,
        "gpu": gpu,
        "step_ms": step_ms,
        "left_us_per_step": left_us,
        "stall_probe": probe,
        "staging": extra["stats"](),
        "verdict": verdict,
    }


def run(*, steps: int, repeats: int, quick: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"status": "ok", **_environment()}
    loop = Loop(steps)
    dl = loop.dl
    report["config"] = dict(
        layers=dl.LAYERS, num_qo_heads=dl.NUM_QO_HEADS, num_kv_heads=dl.NUM_KV_HEADS, head_dim=dl.HEAD_DIM,
        page=dl.PAGE, dtype="bfloat16", batch=dl.BATCH, context=list(dl.CONTEXT), steps=steps, repeats=repeats,
        quick=quick, bucket=str(loop.bucket), max_model_len=MAX_MODEL_LEN, target=TARGET,
    )
    warmup = min(3 if quick else 10, steps)
    for name, make in (("triton", triton_modes), ("flashinfer", flashinfer_modes)):
        missing = _flashinfer_missing() if name == "flashinfer" else None
        if missing:
            report[name] = {"status": "skipped", "reason": missing}
            continue
        try:
            report[name] = {"status": "ok", **run_kernel(name, make, loop, steps=steps, repeats=repeats,
                                                          warmup=warmup)}
        except Exception as exc:  # report, and let the other kernel run
            report[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return report


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"GPU: {report['gpu']} (torch {report['torch']}, flashinfer {report.get('flashinfer_version')})",
        f"Graph decode loop: {cfg['layers']} layers, Hq {cfg['num_qo_heads']}, Hkv {cfg['num_kv_heads']}, "
        f"D {cfg['head_dim']}, page {cfg['page']}, bf16, batch {cfg['batch']}, contexts "
        f"{cfg['context'][0]}-{cfg['context'][1]}, {cfg['steps']} steps, median of {cfg['repeats']}; "
        f"bucket {cfg['bucket']}",
        "",
        "| kernel | attnsync steps/s | overlapped steps/s | once steps/s | attnsync/once | overlapped/once | "
        "target 0.97 | left us/step | replay GPU ms | stall-free |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kernel in ("triton", "flashinfer"):
        part = report.get(kernel, {})
        if part.get("status") != "ok":
            lines.append(f"| {kernel} | {part.get('status')}: {str(part.get('reason', '?')).splitlines()[0]} "
                         f"| | | | | | | | |")
            continue
        rate = {m: part["modes"][m]["steps_per_s"] for m in part["modes"]}
        met = part["meets_target"] or part.get("overlapped_meets_target")
        lines.append(
            f"| {kernel} ({part['path']}) | {_cell(rate['attnsync'])} | {_cell(rate.get('overlapped'))} | "
            f"{_cell(rate['once'])} | {_cell(part['ratio_attnsync_over_once'], 3)} | "
            f"{_cell(part.get('ratio_overlapped_over_once'), 3)} | {'met' if met else 'missed'} | "
            f"{_cell(part['left_us_per_step'])} | {_cell(part['gpu']['replay_ms'], 3)} | "
            f"{part['stall_probe']['stall_free']} ({_cell(part['stall_probe']['host_ms_under_busy_gpu'], 2)} ms) |"
        )
    lines += ["", "Host time per attnsync step (median us):", "",
              "| kernel | batch | pad | build | lower | plan | replay | total |", "|---|---|---|---|---|---|---|---|"]
    for kernel in ("triton", "flashinfer"):
        part = report.get(kernel, {})
        if part.get("status") == "ok":
            h = part["host_us"]
            lines.append(f"| {kernel} | " + " | ".join(_cell(h.get(k)) for k in
                         ("batch", "pad", "build", "lower", "plan", "replay")) + f" | {_cell(part['host_total_us'])} |")
    lines.append("")
    for kernel in ("triton", "flashinfer"):
        part = report.get(kernel, {})
        if part.get("status") == "ok":
            lines.append(f"- {kernel}: {part['verdict']}; metadata stream work <= "
                         f"{_cell(part['gpu']['prepare_stream_us_upper_bound'])} us/step; staging {part['staging']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import decode_loop

    return decode_loop.loop_cli(argv, name="graph_decode_loop", doc=__doc__, quick_steps=30, min_steps=2,
                                run=run, markdown=markdown, unavailable=_unavailable)


if __name__ == "__main__":
    raise SystemExit(main())
