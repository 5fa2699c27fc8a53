"""Tree attention: host time of the per-step build against batch size, and the four sub-batch
maxima computed on the host against vLLM's per-step `.max().item()` reads.

    python bench/bench_tree.py --out DIR [--quick]

Batches are decode-heavy speculative-decoding steps: every decode row verifies the whole tree
(L = 8 tokens: the root and 7 drafted nodes), one 32-token prefill chunk per 32 requests,
contexts 100 to 8192 tokens, a block table 512 pages wide. For 1 to 1024 requests it measures
the median host microseconds (device queue drained between calls) of

- `build`:          `attnsync.build(batch, backend="tree", ...)` (numpy only);
- `build+torch`:    build, then `attnsync.adapters.torch.lower` (one pinned non_blocking copy);
- `maxima/host`:    the four maxima from the host arrays, as the builder computes them;
- `maxima/naive`:   the four `.max().item()` reads on the device tensors (vLLM's tree backend);
- `naive`:          the sync-ful step: `attnsync.testing.naive_common_torch` (device lists,
  `.item()` maxima), the prefill `query_start_loc` rebased on the device, and the four
  sub-batch `.item()` maxima (the bias is built once, at start-up, in both forms).

Then, on a GPU, the host milliseconds of `build+torch`, `maxima/naive` and `naive` while a
50 ms kernel occupies the stream (`attnsync.testing.host_time_under_busy_gpu`): a form that
reads a device value waits for the kernel, the host build does not.

On a CPU-only host everything still runs (device "cpu"), labelled CPU-only: `.item()` waits
for nothing there, so only the GPU numbers count. Writes DIR/bench_tree.json and
DIR/bench_tree.md and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync
from attnsync.testing import host_time_under_busy_gpu, naive_common_torch
from bench_common import measure  # the one timing helper of bench/ (same folder)

TREE = "[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]"  # 7 drafted nodes: L = 8
TREE_SIZE = 8
SIZES = (1, 8, 32, 128, 256, 512, 1024)
BLOCK_SIZE = 16
WIDTH = 512  # block-table columns: 8192 tokens at 16 a page
PREFILL_EVERY = 32
CHUNK = 32  # > L, so a prefill row
SLEEP_MS = 50.0
VARIANTS = ("build", "build+torch", "maxima/host", "maxima/naive", "naive")
BUSY_VARIANTS = ("build+torch", "maxima/naive", "naive")


def batch_inputs(num_reqs: int, rng: np.random.Generator) -> dict[str, Any]:
    """Keyword arguments of `attnsync.Batch` for one step, decode rows first."""
    num_prefills = num_reqs // PREFILL_EVERY
    num_decodes = num_reqs - num_prefills
    query_lens = np.concatenate([np.full(num_decodes, TREE_SIZE), np.full(num_prefills, CHUNK)]).astype(np.int32)
    seq_lens = np.maximum(rng.integers(100, WIDTH * BLOCK_SIZE + 1, size=num_reqs), query_lens + 1).astype(np.int32)
    pages_needed = -(-seq_lens // BLOCK_SIZE)
    pages = rng.integers(1, 1 << 20, size=(num_reqs, WIDTH), dtype=np.int32)
    block_table = np.where(np.arange(WIDTH) < pages_needed[:, None], pages, 0).astype(np.int32)
    return dict(query_lens=query_lens, seq_lens=seq_lens, block_table=block_table, block_size=BLOCK_SIZE,
                is_prefilling=np.arange(num_reqs) >= num_decodes)


def host_maxima(query_lens: np.ndarray, seq_lens: np.ndarray, nd: int) -> tuple[int, int, int, int]:
    """The four maxima from host arrays (what the builder does)."""
    def top(values: np.ndarray) -> int:
        return int(values.max()) if values.size else 0

    return top(query_lens[:nd]), top(seq_lens[:nd]), top(query_lens[nd:]), top(seq_lens[nd:])


def naive_maxima(torch: Any, qsl: Any, seq_lens: Any, nd: int) -> tuple[int, int, int, int]:
    """vLLM's four per-step reads on device tensors (each `.item()` waits for the device)."""
    prefill_qsl = qsl[nd:] - qsl[nd : nd + 1]
    return (
        int(torch.diff(qsl[: nd + 1]).max().item()) if nd else 0,
        int(seq_lens[:nd].max().item()) if nd else 0,
        int(torch.diff(prefill_qsl).max().item()) if prefill_qsl.shape[0] > 1 else 0,
        int(seq_lens[nd:].max().item()) if seq_lens.shape[0] > nd else 0,
    )


def naive_step(torch: Any, batch: attnsync.Batch, device: Any, nd: int) -> dict[str, Any]:
    """The sync-ful per-step build: device lists, `.item()` maxima, device rebase."""
    out = naive_common_torch(batch, device)
    qsl = out["query_start_loc"]
    out["prefill_query_start_loc"] = qsl[nd:] - qsl[nd : nd + 1]
    out["maxima"] = naive_maxima(torch, qsl, out["seq_lens"], nd)
    return out


def run(*, quick: bool) -> dict[str, Any]:
    """Every variant at every size; the report as a JSON-able dict."""
    import torch

    from attnsync.adapters import torch as torch_adapter

    reps, warmup, budget_s, busy_reps = (30, 5, 0.2, 1) if quick else (200, 20, 1.5, 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    drain = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    rows = []
    for num_reqs in SIZES:
        inputs = batch_inputs(num_reqs, rng)
        batch = attnsync.Batch(**inputs)
        md = attnsync.build(batch, backend="tree", speculative_token_tree=TREE)
        nd = md.num_decodes
        tmd = torch_adapter.lower(md, device)
        q_host, s_host = batch.query_lens, batch.seq_lens
        fns: dict[str, Callable[[], Any]] = {
            "build": lambda b=batch: attnsync.build(b, backend="tree", speculative_token_tree=TREE),
            "build+torch": lambda b=batch: torch_adapter.lower(
                attnsync.build(b, backend="tree", speculative_token_tree=TREE), device),
            "maxima/host": lambda q=q_host, s=s_host, n=nd: host_maxima(q, s, n),
            "maxima/naive": lambda t=tmd, n=nd: naive_maxima(torch, t.query_start_loc, t.seq_lens, n),
            "naive": lambda b=batch, n=nd: naive_step(torch, b, device, n),
        }
        ours = (md.max_decode_query_len, md.max_decode_seq_len, md.max_prefill_query_len, md.max_prefill_seq_len)
        agrees = ours == fns["maxima/naive"]() == fns["naive"]()["maxima"] == fns["maxima/host"]()
        if num_reqs == SIZES[0]:
            for _ in range(3 if quick else 20):  # warm clocks, lazy imports and the allocator once
                for fn in fns.values():
                    fn()
                    drain()
        stats = {name: measure(fn, drain, reps=reps, warmup=warmup, budget_s=budget_s) for name, fn in fns.items()}
        busy = None
        if device == "cuda":
            busy = {name: min(host_time_under_busy_gpu(fns[name], sleep_ms=SLEEP_MS)[0] for _ in range(busy_reps))
                    for name in BUSY_VARIANTS}
        rows.append({
            "num_reqs": num_reqs,
            "num_tokens": batch.num_tokens,
            "num_decodes": nd,
            "num_prefills": md.num_prefills,
            "median_us": {name: stats[name]["median"] for name in VARIANTS},
            "p90_us": {name: stats[name]["p90"] for name in VARIANTS},
            "reps": {name: stats[name]["reps"] for name in VARIANTS},
            "naive_over_build_torch": stats["naive"]["median"] / stats["build+torch"]["median"],
            "busy_gpu_host_ms": busy,
            "maxima_agree": bool(agrees),
        })
    cpu_only = device != "cuda"
    return {
        "bench": "bench_tree",
        "device": device,
        "cpu_only": cpu_only,
        "card": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "note": ("CPU-only run: the lowering copies nothing and .item() waits for nothing here; absolute "
                 "times only count on the GPU") if cpu_only else "all variants target the GPU",
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "attnsync": attnsync.__version__},
        "config": {"tree": TREE, "tree_size": TREE_SIZE, "sizes": list(SIZES), "block_size": BLOCK_SIZE,
                   "block_table_width": WIDTH, "prefill_every": PREFILL_EVERY, "chunk": CHUNK,
                   "sleep_ms": SLEEP_MS, "reps": reps, "warmup": warmup, "budget_s_per_measurement": budget_s,
                   "busy_reps": busy_reps, "quick": quick},
        "results": rows,
    }


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    label = " (CPU-only: absolute times only count on the GPU)" if report["cpu_only"] else ""
    lines = [
        f"### bench_tree on {report['device']} ({report['card']}){label}",
        "",
        f"Tree {report['config']['tree']} (L = {report['config']['tree_size']}). Median host "
        "microseconds per step, device idle.",
        "",
        "| reqs | tokens | " + " | ".join(VARIANTS) + " | naive / build+torch | maxima agree |",
        "|---:|---:|" + "---:|" * (len(VARIANTS) + 1) + ":---:|",
    ]
    for row in report["results"]:
        cells = [_cell(row["median_us"][name]) for name in VARIANTS]
        lines.append(f"| {row['num_reqs']} | {row['num_tokens']} | " + " | ".join(cells)
                     + f" | {_cell(row['naive_over_build_torch'], 2)}x | {'yes' if row['maxima_agree'] else 'NO'} |")
    if report["cpu_only"]:
        lines += ["", "Busy-GPU host times: not measured (no GPU)."]
    else:
        lines += ["", f"Host milliseconds with a {report['config']['sleep_ms']:.0f} ms kernel queued "
                  "(a form that reads a device value waits for it):", "",
                  "| reqs | " + " | ".join(BUSY_VARIANTS) + " |", "|---:|" + "---:|" * len(BUSY_VARIANTS)]
        for row in report["results"]:
            busy = row["busy_gpu_host_ms"]
            lines.append(f"| {row['num_reqs']} | " + " | ".join(_cell(busy[name], 3) for name in BUSY_VARIANTS) + " |")
    if not all(row["maxima_agree"] for row in report["results"]):
        lines.append("WARNING: host and naive maxima differ.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for bench_tree.json and bench_tree.md")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args(argv)
    report = run(quick=args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (args.out / "bench_tree.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "bench_tree.md").write_text(text + "\n")
    print(text)
    return 0 if all(row["maxima_agree"] for row in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
