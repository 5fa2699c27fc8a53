"""Host time of the hot path's cases, for the attnsync importable in this process.

    python bench/hot_path_cases.py [--device cuda] [--iters 2000] [--json]

Written against the API both this tree and earlier ones offer (`attnsync.Batch`, `attnsync.build`,
`attnsync.adapters.torch.lower` with an engine-owned `Stager`), so `bench/compare_commits.py` can
run it under two checkouts in alternating blocks and report new / old. Cases (median host us of
the timed calls; the device queue is drained between calls, outside the timer):

- `common_256`: common build + torch lower of 256 decodes with a 512-page table;
- `flashinfer_32`: FlashInfer build + torch lower of 32 decodes (contexts 200-2,000, page 16);
- `steps_256`: `Batch` + common build + lower of successive decode steps (256 requests, a
  512-page table, contexts growing by one token a step, one row in sixteen gaining a page);
- `fresh_256`: `common_256` without a stager (fresh memory per lowering).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync
import torch

from attnsync.adapters import torch as ast

BLOCK_SIZE = 16


def _table_memory(stager) -> dict:
    """`Batch(table_memory=...)` where the stager owns pinned table memory (newer trees); older
    trees pinned tables process-wide once a CUDA stager existed, so nothing is passed there."""
    memory = getattr(stager, "table_memory", None)
    accepted = "table_memory" in inspect.signature(attnsync.Batch).parameters
    return {"table_memory": memory} if memory is not None and accepted else {}


def _decode_inputs(rows: int, width: int, low: int, high: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    seq = rng.integers(low, high + 1, rows).astype(np.int32)
    pages = -(-seq // BLOCK_SIZE)
    table = rng.integers(1, 1 << 20, (rows, width), dtype=np.int32)
    table = np.where(np.arange(width) < pages[:, None] + 1, table, 0).astype(np.int32)
    return dict(query_lens=np.ones(rows, np.int32), seq_lens=seq, block_table=table, block_size=BLOCK_SIZE)


def _timed(step, sync, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
        del out
        sync()
    return statistics.median(times[iters // 10:]) * 1e6


def run(device: str, iters: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stager = ast.Stager(device)
    memory = _table_memory(stager)
    out: dict[str, float] = {}

    batch = attnsync.Batch(**_decode_inputs(256, 512, 100, 512 * BLOCK_SIZE - BLOCK_SIZE, 0), **memory)
    out["common_256"] = _timed(lambda: ast.lower(attnsync.build(batch), device, stager=stager), sync, iters)
    out["fresh_256"] = _timed(lambda: ast.lower(attnsync.build(batch), device), sync, iters)

    small = attnsync.Batch(**_decode_inputs(32, 128, 200, 2000, 1))
    out["flashinfer_32"] = _timed(
        lambda: ast.lower(attnsync.build(small, backend="flashinfer"), device, stager=stager), sync, iters)

    inputs = _decode_inputs(256, 512, 100, 512 * BLOCK_SIZE - 64 * BLOCK_SIZE, 2)
    seq, table = inputs["seq_lens"].copy(), inputs["block_table"].copy()
    rng = np.random.default_rng(3)

    def step():
        seq[:] += 1
        crossing = np.flatnonzero((seq - 1) % BLOCK_SIZE == 0)  # about one row in sixteen a step
        table[crossing, (seq[crossing] - 1) // BLOCK_SIZE] = rng.integers(1, 1 << 20, crossing.size, dtype=np.int32)
        step_batch = attnsync.Batch(query_lens=inputs["query_lens"], seq_lens=seq, block_table=table,
                                    block_size=BLOCK_SIZE, **memory)
        return ast.lower(attnsync.build(step_batch), device, stager=stager)

    out["steps_256"] = _timed(step, sync, min(iters, 60 * BLOCK_SIZE))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=2000, help="timed calls per case (default 2000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(args.device, args.iters)
    if args.json:
        print(json.dumps({"attnsync": str(Path(attnsync.__file__).parent), "device": args.device, "us": result}))
    else:
        for name, value in result.items():
            print(f"{name:>14}: {value:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
