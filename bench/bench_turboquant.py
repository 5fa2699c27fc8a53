"""TurboQuant serving loop: per-layer host reads (vLLM before its PR 41434) vs attnsync, side by side.

    python bench/bench_turboquant.py --out DIR [--quick]

Writes ``DIR/bench_turboquant.json`` and ``DIR/bench_turboquant.md``. Without CUDA it writes a
"skipped" JSON and exits 0.

The loop is shaped like the benchmark of vLLM's sync-removal PR (vllm-project/vllm#41434:
Qwen3-0.6B, TurboQuant k8v4, concurrency 32): 28 attention layers with Qwen3-0.6B's shapes
(hidden 1024, 16 q heads, 8 kv heads, head dim 128, page 16), random bf16 weights (QKV and
output projections, residual stream; no MLP, no RoPE), a quantized paged cache per layer, 32
concurrent requests with prompts of 128..384 tokens prefilled in chunks of up to 128 (at most
two prefilling rows per step, so most steps mix decodes with fresh or continuation prefills)
and random output lengths. Every step ends with a small device-to-host copy of "sampled"
values, and the host waits for the previous step's copy before building the next one: one step
of lookahead, as an engine with async scheduling has.

Both modes run the same schedule, the same metadata build and staging (`attnsync.build` +
`attnsync.adapters.torch.lower`, one pinned copy per step) and the same kernels; they differ
only in the per-layer host code, which is what that PR changed:

* ``naive``: `TurboQuantAttention.forward_naive`: every layer with prefills reads
  ``query_start_loc.tolist()`` and ``seq_lens.tolist()`` from the device (plus
  ``max(seq_lens[nd:].tolist())`` on mixed batches), allocates ``torch.zeros(2)`` per request and
  stores ``cu[1] = q_len`` (a blocking copy);
* ``attnsync``: `TurboQuantAttention.forward`: host ints from the metadata, cached cu_seqlens
  buffers written with ``fill_``, nothing read back.

Modes alternate (naive, attnsync, naive, ...) after one warm-up pass of each (Triton compiles);
the result is the median over repeats of output tokens per second, and the ratio
attnsync / naive. The PR reported +4.84 % output throughput for its change.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import attnsync  # noqa: E402

SEED_RATIO = 1.0484  # vllm-project/vllm#41434: 7441.51 -> 7801.99 output tok/s on TurboQuant


@dataclass(frozen=True)
class Config:
    """Workload and model shape."""

    num_layers: int = 28
    hidden: int = 1024
    num_q_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    concurrency: int = 32
    num_requests: int = 192
    prompt_min: int = 128
    prompt_max: int = 384
    output_min: int = 64
    output_max: int = 128
    prefill_chunk: int = 128
    max_prefill_rows: int = 2
    repeats: int = 5
    seed: int = 0


QUICK = dict(num_requests=48, output_min=16, output_max=32, repeats=3)
DRY_RUN = dict(num_layers=2, hidden=64, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4, concurrency=4,
               num_requests=6, prompt_min=6, prompt_max=20, output_min=2, output_max=4, prefill_chunk=8, repeats=1)


class Step:
    """One step of the schedule: host arrays only."""

    __slots__ = ("block_table", "num_output_tokens", "query_lens", "seq_lens")

    def __init__(self, query_lens, seq_lens, block_table, num_output_tokens):
        self.query_lens = query_lens
        self.seq_lens = seq_lens
        self.block_table = block_table
        self.num_output_tokens = num_output_tokens


def make_schedule(cfg: Config) -> tuple[list[Step], int]:
    """A deterministic continuous-batching schedule (decode rows first) and the pages it needs."""
    rng = np.random.default_rng(cfg.seed)
    pending = collections.deque(
        (int(rng.integers(cfg.prompt_min, cfg.prompt_max + 1)), int(rng.integers(cfg.output_min, cfg.output_max + 1)))
        for _ in range(cfg.num_requests)
    )
    width = -(-(cfg.prompt_max + cfg.output_max) // cfg.block_size) + 1
    num_pages = cfg.concurrency * width + 1
    free = list(range(num_pages - 1, 0, -1))  # page 0 is the null page
    active: list[dict[str, Any]] = []
    steps = []
    while pending or active:
        while len(active) < cfg.concurrency and pending:
            prompt, output = pending.popleft()
            active.append(dict(prompt=prompt, output=output, computed=0, generated=0, pages=[]))
        decodes = [r for r in active if r["computed"] >= r["prompt"]]
        prefills = [r for r in active if r["computed"] < r["prompt"]][: cfg.max_prefill_rows]
        rows = [(r, 1) for r in decodes] + [(r, min(cfg.prefill_chunk, r["prompt"] - r["computed"])) for r in prefills]
        q = np.array([n for _, n in rows], dtype=np.int32)
        s = np.array([r["computed"] + n for r, n in rows], dtype=np.int32)
        table = np.zeros((len(rows), width), dtype=np.int32)
        outputs = 0
        for i, (r, n) in enumerate(rows):
            while len(r["pages"]) * cfg.block_size < r["computed"] + n:
                r["pages"].append(free.pop())
            table[i, : len(r["pages"])] = r["pages"]
            r["computed"] += n
            if i < len(decodes) or r["computed"] == r["prompt"]:
                r["generated"] += 1  # a decode samples a token; so does a prompt's last chunk
                outputs += 1
        steps.append(Step(q, s, table, outputs))
        for r in [r for r in active if r["generated"] >= r["output"]]:
            free.extend(r["pages"])
        active = [r for r in active if r["generated"] < r["output"]]
    return steps, num_pages


class Model:
    """28 attention layers with random weights and one TurboQuant cache each."""

    def __init__(self, cfg: Config, num_pages: int, max_tokens: int, device: Any, dtype: Any) -> None:
        import torch

        from attnsync.kernels.turboquant import TurboQuantAttention, allocate_cache

        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.device = torch.device(device)
        qkv_width = (cfg.num_q_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.cfg = cfg
        self.w_qkv = [
            (torch.randn(cfg.hidden, qkv_width, generator=gen, device=device) * cfg.hidden**-0.5).to(dtype)
            for _ in range(cfg.num_layers)
        ]
        self.w_o = [
            (torch.randn(cfg.num_q_heads * cfg.head_dim, cfg.hidden, generator=gen, device=device)
             * (cfg.num_q_heads * cfg.head_dim) ** -0.5).to(dtype)
            for _ in range(cfg.num_layers)
        ]
        self.layers = [
            TurboQuantAttention(cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, device=device, dtype=dtype)
            for _ in range(cfg.num_layers)
        ]
        self.caches = [
            allocate_cache(num_pages, cfg.num_kv_heads, cfg.block_size, cfg.head_dim, device=device)
            for _ in range(cfg.num_layers)
        ]
        self.inputs = torch.randn(max_tokens, cfg.hidden, generator=gen, device=device).to(dtype)

    def step(self, tmd: Any, *, naive: bool, layers: int | None = None):
        cfg = self.cfg
        t = tmd.num_actual_tokens
        x = self.inputs[:t]
        hq, hkv, d = cfg.num_q_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        for i in range(cfg.num_layers if layers is None else layers):
            qkv = x @ self.w_qkv[i]
            q = qkv[:, :hq].view(t, cfg.num_q_heads, d)
            k = qkv[:, hq : hq + hkv].view(t, cfg.num_kv_heads, d)
            v = qkv[:, hq + hkv :].view(t, cfg.num_kv_heads, d)
            layer = self.layers[i]
            o = (layer.forward_naive if naive else layer.forward)(q, k, v, self.caches[i], tmd)
            x = x + o.reshape(t, hq) @ self.w_o[i]
        return x


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pass(model: Model, steps: list[Step], cfg: Config, *, naive: bool) -> dict[str, float]:
    """One pass over the schedule; returns wall time, tokens/s and steps/s."""
    import torch

    from attnsync.adapters import torch as ast

    device = model.device
    cuda = device.type == "cuda"
    for cache in model.caches:
        cache.zero_()
    samples = [torch.empty(cfg.concurrency, dtype=torch.float32, pin_memory=cuda) for _ in range(2)]
    previous = None
    tokens = 0
    _synchronize(device)
    start = time.perf_counter()
    for n, step in enumerate(steps):
        batch = attnsync.Batch(query_lens=step.query_lens, seq_lens=step.seq_lens, block_table=step.block_table,
                               block_size=cfg.block_size)
        tmd = ast.lower(attnsync.build(batch, backend="turboquant"), device=device)
        x = model.step(tmd, naive=naive)
        # "sampling": one value per row from its last token, copied to pinned memory
        last = (tmd.query_start_loc[1:] - 1).to(torch.int64)
        rows = batch.num_reqs
        samples[n % 2][:rows].copy_(x.index_select(0, last).float().sum(dim=-1), non_blocking=cuda)
        if cuda:
            event = torch.cuda.Event()
            event.record()
            if previous is not None:
                previous.synchronize()  # wait for step n-1's sample only: one step of lookahead
            previous = event
        tokens += step.num_output_tokens
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return dict(seconds=elapsed, tokens_per_s=tokens / elapsed, steps_per_s=len(steps) / elapsed, tokens=tokens)


def count_syncs(model: Model, step: Step, cfg: Config, *, naive: bool) -> int:
    """Host syncs torch's sync debug mode reports for one full step (28 layers)."""
    import torch

    from attnsync.adapters import torch as ast

    batch = attnsync.Batch(query_lens=step.query_lens, seq_lens=step.seq_lens, block_table=step.block_table,
                           block_size=cfg.block_size)
    md = attnsync.build(batch, backend="turboquant")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model.step(ast.lower(md, device="cuda"), naive=naive)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def outputs_match(model: Model, step: Step, cfg: Config) -> bool:
    """One mixed step through layer 0 in both modes, from identical caches: equal outputs."""
    import torch

    from attnsync.adapters import torch as ast

    batch = attnsync.Batch(query_lens=step.query_lens, seq_lens=step.seq_lens, block_table=step.block_table,
                           block_size=cfg.block_size)
    tmd = ast.lower(attnsync.build(batch, backend="turboquant"), device=model.device)
    saved = model.caches[0].clone()
    a = model.step(tmd, naive=False, layers=1)
    after_a = model.caches[0].clone()
    model.caches[0].copy_(saved)
    b = model.step(tmd, naive=True, layers=1)
    return bool(torch.equal(a, b) and torch.equal(after_a, model.caches[0]))


def run(cfg: Config, *, device: str = "cuda") -> dict[str, Any]:
    import torch

    steps, num_pages = make_schedule(cfg)
    max_tokens = max(int(s.query_lens.sum()) for s in steps)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = Model(cfg, num_pages, max_tokens, dev, torch.bfloat16 if cuda else torch.float32)
    mixed = [s for s in steps if (s.query_lens > 1).any() and (s.query_lens == 1).any()]
    continuation = next(
        (s for s in mixed if ((s.seq_lens > s.query_lens) & (s.query_lens > 1)).any()), mixed[0] if mixed else steps[0]
    )
    for naive in (True, False):  # warm-up: Triton compiles, allocator grows
        run_pass(model, steps, cfg, naive=naive)
    match = outputs_match(model, continuation, cfg)
    syncs = {
        name: count_syncs(model, continuation, cfg, naive=naive) if cuda else None
        for name, naive in (("naive", True), ("attnsync", False))
    }
    runs: dict[str, list[dict[str, float]]] = {"naive": [], "attnsync": []}
    for _ in range(cfg.repeats):
        for name, naive in (("naive", True), ("attnsync", False)):
            runs[name].append(run_pass(model, steps, cfg, naive=naive))
    modes = {}
    for name, passes in runs.items():
        modes[name] = dict(
            tokens_per_s_median=statistics.median(p["tokens_per_s"] for p in passes),
            steps_per_s_median=statistics.median(p["steps_per_s"] for p in passes),
            tokens_per_s=[round(p["tokens_per_s"], 1) for p in passes],
            seconds=[round(p["seconds"], 4) for p in passes],
            syncs_in_one_mixed_step=syncs[name],
        )
    ratio = modes["attnsync"]["tokens_per_s_median"] / modes["naive"]["tokens_per_s_median"]
    return dict(
        benchmark="turboquant",
        status="ok" if cuda else "dry-run",
        device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter, tiny shapes)",
        torch=torch.__version__,
        python=platform.python_version(),
        config=asdict(cfg),
        schedule=dict(
            steps=len(steps),
            mixed_steps=len(mixed),
            decode_only_steps=sum(1 for s in steps if (s.query_lens == 1).all()),
            output_tokens=runs["naive"][0]["tokens"],
            mean_rows=round(float(np.mean([len(s.query_lens) for s in steps])), 2),
            mean_tokens=round(float(np.mean([int(s.query_lens.sum()) for s in steps])), 2),
        ),
        modes=modes,
        ratio=ratio,
        seed_ratio=SEED_RATIO,
        meets_seed_ratio=ratio >= SEED_RATIO,
        outputs_match=match,
    )


def markdown(result: dict[str, Any]) -> str:
    if result["status"] == "skipped":
        return f"# TurboQuant serving loop\n\nskipped: {result['reason']}\n"
    cfg, sched, modes = result["config"], result["schedule"], result["modes"]
    lines = [
        "# TurboQuant serving loop: per-layer host reads vs attnsync",
        "",
        f"{result['device']}, torch {result['torch']}. {cfg['num_layers']} layers, {cfg['num_q_heads']} q / "
        f"{cfg['num_kv_heads']} kv heads, head dim {cfg['head_dim']}, page {cfg['block_size']}, concurrency "
        f"{cfg['concurrency']}, {cfg['num_requests']} requests; {sched['steps']} steps ({sched['mixed_steps']} mixed, "
        f"{sched['decode_only_steps']} decode-only), {sched['output_tokens']} output tokens per pass. "
        f"Medians of {cfg['repeats']} alternating passes.",
        "",
        "| mode | output tokens/s (median) | steps/s (median) | syncs in one mixed step | passes (tokens/s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, label in (("naive", "naive per-layer host reads (vLLM before PR 41434)"),
                        ("attnsync", "attnsync")):
        m = modes[name]
        lines.append(
            f"| {label} | {m['tokens_per_s_median']:.1f} | {m['steps_per_s_median']:.1f} | "
            f"{m['syncs_in_one_mixed_step']} | {', '.join(f'{x:.0f}' for x in m['tokens_per_s'])} |"
        )
    lines += [
        "",
        f"ratio attnsync / naive: **{result['ratio']:.4f}** (vLLM PR 41434: {result['seed_ratio']:.4f}; "
        f"{'meets' if result['meets_seed_ratio'] else 'below'} it). Outputs of one mixed step equal: "
        f"{result['outputs_match']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for bench_turboquant.json / .md")
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter outputs, 3 repeats")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script on the CPU: tiny shapes, Triton interpreter, timings meaningless")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import torch
    except ImportError:
        torch = None
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        result = run(Config(**DRY_RUN), device="cpu")
    elif torch is None or not torch.cuda.is_available():
        result: dict[str, Any] = dict(benchmark="turboquant", status="skipped", reason="needs a CUDA GPU (torch.cuda is not available)")
    else:
        cfg = Config(**QUICK) if args.quick else Config()
        result = run(cfg)
    (args.out / "bench_turboquant.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_turboquant.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
