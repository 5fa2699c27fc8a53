"""Host time of the field derivations, two attnsync trees side by side (old against new).

    python bench/bench_fields.py --old PATH [--new PATH] [--rounds N] [--calls N] [--pure-numpy]
                                 [--out DIR]

Each tree (a folder holding an `attnsync` package, its compiled twin built in place) runs in a
worker process of its own; the parent asks them in turn for one warm timed block of each case,
alternating which goes first, so both see the same moments of a noisy host. A block is 5
untimed calls, then `calls` timed ones (the garbage collector off); its value is the median.
The report gives each tree's median over the rounds and the median of the per-round ratios
new / old.

Cases (host microseconds, numpy only: no adapter, no device):

- `common build, 256 decodes x 512 pages`: `attnsync.build(batch)` of one batch, again;
- `FlashInfer build, 32 decodes`: `attnsync.build(batch, "flashinfer")`;
- `Batch + common build, 256 decodes`: the validated batch made from int32 arrays, then built;
- `common build, mixed 256`: 248 decodes and 8 prefill chunks of 32 tokens (decode-first);
- `FlashInfer build, mixed 256`: the same batch;
- `common build, 256 decodes padded to 264`: a CUDA-graph bucket's padding.

`--pure-numpy` sets ATTNSYNC_PURE_NUMPY=1 in both workers (the numpy forms against each other).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PAGE = 16


def cases() -> dict[str, Callable[[], Any]]:
    """The timed calls of the attnsync found on sys.path, each a zero-argument function."""
    import numpy as np

    import attnsync

    rng = np.random.default_rng(0)
    seq = rng.integers(100, 8193, 256).astype(np.int32)
    table = np.where(np.arange(512) < (-(-seq // PAGE))[:, None],
                     rng.integers(1, 1 << 20, (256, 512)), 0).astype(np.int32)
    ones = np.ones(256, np.int32)
    decode = attnsync.Batch(query_lens=ones, seq_lens=seq, block_table=table, block_size=PAGE)
    padded = attnsync.Batch(query_lens=ones, seq_lens=seq, block_table=table, block_size=PAGE,
                            padded_num_reqs=264, padded_num_tokens=264)

    seq32 = rng.integers(200, 2001, 32).astype(np.int32)
    table32 = rng.integers(0, 1 << 16, (32, int(-(-(seq32.max() + 400) // PAGE)))).astype(np.int32)
    fi32 = attnsync.Batch(query_lens=np.ones(32, np.int32), seq_lens=seq32, block_table=table32, block_size=PAGE)

    q_mixed = ones.copy()
    q_mixed[-8:] = 32  # eight prefill chunks after the decodes (decode-first already)
    prefilling = np.zeros(256, bool)
    prefilling[-8:] = True
    mixed = attnsync.Batch(query_lens=q_mixed, seq_lens=np.maximum(seq, q_mixed), block_table=table,
                           block_size=PAGE, is_prefilling=prefilling)
    return {
        "common build, 256 decodes x 512 pages": lambda: attnsync.build(decode),
        "FlashInfer build, 32 decodes": lambda: attnsync.build(fi32, "flashinfer"),
        "Batch + common build, 256 decodes": lambda: attnsync.build(attnsync.Batch(
            query_lens=ones, seq_lens=seq, block_table=table, block_size=PAGE)),
        "common build, mixed 256": lambda: attnsync.build(mixed),
        "FlashInfer build, mixed 256": lambda: attnsync.build(mixed, "flashinfer"),
        "common build, 256 decodes padded to 264": lambda: attnsync.build(padded),
    }


def block(fn: Callable[[], Any], calls: int, warmup: int = 5) -> float:
    """Median host us of `calls` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(samples)


def worker(tree: str) -> None:
    """Serve blocks: read a case name and a call count a line, answer the block's median."""
    sys.path.insert(0, tree)
    import attnsync
    from attnsync import _accel

    assert Path(attnsync.__file__).resolve().is_relative_to(Path(tree).resolve()), attnsync.__file__
    timed = cases()
    print(json.dumps({"names": list(timed), "native": _accel.native is not None}), flush=True)
    gc.disable()  # a collection inside one timed call would dominate microsecond timings
    for line in sys.stdin:
        name, calls = json.loads(line)
        print(json.dumps(block(timed[name], calls)), flush=True)


class Worker:
    def __init__(self, tree: str, pure_numpy: bool) -> None:
        env = {**os.environ, "ATTNSYNC_PURE_NUMPY": "1" if pure_numpy else "0"}
        env.pop("PYTHONPATH", None)  # the tree given, nothing else
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", tree], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
        self.hello = json.loads(self.process.stdout.readline())

    def block(self, name: str, calls: int) -> float:
        self.process.stdin.write(json.dumps([name, calls]) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--old", help="folder holding the old attnsync package")
    parser.add_argument("--new", default=str(Path(__file__).resolve().parents[1]),
                        help="folder holding the new attnsync package (default: this checkout)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--pure-numpy", action="store_true", help="both trees without the compiled twin")
    parser.add_argument("--out", type=Path, help="folder for bench_fields.json")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if not args.old:
        parser.error("--old is required")
    old, new = Worker(args.old, args.pure_numpy), Worker(args.new, args.pure_numpy)
    names = new.hello["names"]
    assert old.hello["names"] == names
    times: dict[str, dict[str, list[float]]] = {name: {"old": [], "new": []} for name in names}
    try:
        for r in range(args.rounds):
            for name in names:
                order = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
                for label, w in order:
                    times[name][label].append(w.block(name, args.calls))
    finally:
        old.close()
        new.close()
    rows = {name: {"old_us": statistics.median(t["old"]), "new_us": statistics.median(t["new"]),
                   "new_over_old": statistics.median([b / a for a, b in zip(t["old"], t["new"])])}
            for name, t in times.items()}
    print(f"bench_fields: compiled twin old {old.hello['native']}, new {new.hello['native']}; "
          f"median of {args.rounds} rounds of {args.calls}-call blocks, host us")
    print("| case | old | new | new / old (paired) |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['old_us']:.1f} | {row['new_us']:.1f} | {row['new_over_old']:.2f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_fields.json").write_text(json.dumps({
            "bench": "bench_fields", "native": {"old": old.hello["native"], "new": new.hello["native"]},
            "config": {"rounds": args.rounds, "calls": args.calls, "pure_numpy": args.pure_numpy},
            "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
