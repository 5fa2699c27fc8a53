"""Bytes uploaded and host time of a decode step's block table: delta records against the full table.

    python bench/bench_block_table.py [--out DIR] [--json FILE] [--quick] [--device cpu|cuda]

The decode step: every request gets one token, and one request in sixteen crosses a page
boundary (a new page per such row). Two ways to get the step's block table to the device:

- `full`: what a lowering does today: pack the whole [num_reqs, width] table into the step's
  staging buffer (and, for the apply column, copy it into the device tensor);
- `delta`: the scheduler's verb (`BlockTableState.append_many` of the crossing rows), then
  `take_updates()` and packing the record's flat vector into the staging buffer; the apply
  column is `TorchBlockTable.apply` of the staged vector (indexed writes).

Both run in ONE process, in alternating blocks (delta, full, full, delta, ...): a host's speed
drifts, so only blocks taken side by side compare. Each value is the median over blocks of the
per-call median; the ratio is full / delta. Sizes: 256, 1,024 and 4,096 requests by 512 and 2,048
pages. On a CPU-only machine the apply runs on CPU tensors (`--device cpu`, the default there);
with `--device cuda` the apply and the full copy are queued on the GPU (host enqueue time; the
queue is drained between calls, outside the timing).

The whole step (`--whole`, on by default): scheduler verb, `Batch`, `attnsync.build` (common
metadata) and `lower` through a depth-2 `Stager`, both ways: `delta` is
`Batch(block_table=state.view(n))` lowered with `block_table=`, `table_updates=`, `table_view=`
(the record rides in the step's one copy; `block_table_tensor` is the device table's prefix);
`full` is `Batch(block_table=state.as_batch_table(n))` lowered plainly (on CUDA through the
stager's pinned table memory, the plain path's fastest form). Bytes are the staged layout's.

Targets (an H100 host, 4,096 x 2,048): delta uploads <= 64 KB, takes <= 150 us of host time, and
>= 20x less host time than the full table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    import attnsync  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnsync._block_table import BlockTableState  # noqa: E402 - after the checkout fallback

SIZES = [(256, 512), (256, 2048), (1024, 512), (1024, 2048), (4096, 512), (4096, 2048)]
CROSSING_EVERY = 16


class Case:
    """One size: a populated state, its device table, and the two step functions."""

    def __init__(self, num_reqs: int, width: int, device: str, rng: np.random.Generator) -> None:
        import torch

        from attnsync.adapters.torch_block_table import TorchBlockTable

        self.torch = torch
        self.device = device
        self.num_reqs, self.width = num_reqs, width
        pages = 1 << 22
        self.state = state = BlockTableState(num_reqs, width, pages)
        # rows between an eighth and a half full, so thousands of steps fit in the width
        lengths = rng.integers(width // 8, width // 2 + 1, num_reqs)
        for row, length in enumerate(lengths):
            state.add(row, rng.integers(1, pages, int(length)))
        state.take_updates()
        self.table = TorchBlockTable(state, device)
        self.rng = rng
        self.step = 0
        self.last_nbytes = 0
        self.last_padded_nbytes = 0
        # one staging buffer, as a lowering's pinned slot; room for the full table
        pin = device == "cuda"
        self.staging_t = torch.empty(num_reqs * width * 4 + 4096, dtype=torch.uint8, pin_memory=pin)
        self.staging = self.staging_t.numpy()
        self.full_view = self.staging[: num_reqs * width * 4].view(np.int32).reshape(num_reqs, width)
        self.full_src = state.as_batch_table(num_reqs)
        self.full_device = torch.empty((num_reqs, width), dtype=torch.int32, device=device)
        self.full_staged = self.staging_t[: num_reqs * width * 4].view(torch.int32).view(num_reqs, width)

    def next_crossing(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows crossing a page boundary this step (one in sixteen, rotating) and their pages."""
        rows = np.arange(self.step % CROSSING_EVERY, self.num_reqs, CROSSING_EVERY, dtype=np.int32)
        self.step += 1
        if int(self.state._len[rows].max()) >= self.width:  # (never within a run's steps)
            raise RuntimeError("a row filled its width; use fewer steps")
        return rows, self.rng.integers(1, 1 << 22, rows.shape[0]).astype(np.int32)

    # host half ---------------------------------------------------------------------------

    def delta_verb(self, rows: np.ndarray, pages: np.ndarray) -> None:
        self.state.append_many(rows, pages)

    def delta_take_pack(self, pad: bool = False) -> Any:
        updates = self.state.take_updates(pad=pad)
        flat = updates.flat
        self.staging[: flat.nbytes].view(np.int32)[:] = flat
        self.last_nbytes = flat.nbytes
        return updates

    def full_pack(self) -> None:
        np.copyto(self.full_view, self.full_src)

    # device half (apply) -----------------------------------------------------------------

    def delta_apply(self, updates: Any) -> None:
        flat = self.staging_t[: updates.nbytes].view(self.torch.int32)
        if self.device == "cuda":
            flat = flat.to("cuda", non_blocking=True)
        self.table.apply(updates.header, flat)

    def full_apply(self) -> None:
        self.full_device.copy_(self.full_staged, non_blocking=True)

    def drain(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1e6, out


def measure(case: Case, *, rounds: int, calls: int) -> dict[str, Any]:
    """Alternating blocks of delta and full steps; per-call host microseconds."""
    blocks: dict[str, list[float]] = {k: [] for k in
                                      ("delta_verb", "delta_take_pack", "delta_host", "delta_apply",
                                       "full_pack", "full_apply", "delta_padded_take_pack")}
    padded_bytes = 0

    def delta_block() -> None:
        nonlocal padded_bytes
        verb, take, host, apply, take_padded = [], [], [], [], []
        for i in range(calls + 3):
            rows, pages = case.next_crossing()
            case.drain()
            pad = i % 2 == 1  # every other step takes a padded record (a CUDA-graph / jit apply)
            t_verb, _ = _timed(lambda: case.delta_verb(rows, pages))
            t_take, updates = _timed(lambda: case.delta_take_pack(pad))
            t_apply, _ = _timed(lambda: case.delta_apply(updates))
            if i < 3:
                continue  # warm-up
            (take_padded if pad else take).append(t_take)
            if pad:
                padded_bytes = updates.nbytes
            else:
                verb.append(t_verb)
                host.append(t_verb + t_take)
                apply.append(t_apply)
        for key, values in (("delta_verb", verb), ("delta_take_pack", take), ("delta_host", host),
                            ("delta_apply", apply), ("delta_padded_take_pack", take_padded)):
            blocks[key].append(statistics.median(values))

    def full_block() -> None:
        pack, apply = [], []
        for i in range(calls // 2 + 3):
            case.drain()
            t_pack, _ = _timed(case.full_pack)
            t_apply, _ = _timed(case.full_apply)
            if i >= 3:
                pack.append(t_pack)
                apply.append(t_apply)
        blocks["full_pack"].append(statistics.median(pack))
        blocks["full_apply"].append(statistics.median(apply))

    gc.disable()
    try:
        for r in range(rounds):
            order = (delta_block, full_block) if r % 2 == 0 else (full_block, delta_block)
            for block in order:
                block()
    finally:
        gc.enable()
    case.drain()
    assert np.array_equal(case.table.storage.cpu().numpy(), case.state.mirror), "device table diverged"
    out = {key: statistics.median(values) for key, values in blocks.items()}
    out["delta_bytes"] = case.last_nbytes
    out["delta_padded_bytes"] = padded_bytes
    out["full_bytes"] = case.num_reqs * case.width * 4
    out["host_ratio"] = out["full_pack"] / out["delta_host"]
    out["host_ratio_take_pack"] = out["full_pack"] / out["delta_take_pack"]
    out["apply_ratio"] = out["full_apply"] / out["delta_apply"]
    return out


BLOCK_SIZE = 16


def measure_whole(case: Case, *, rounds: int, calls: int) -> dict[str, Any]:
    """The whole decode step, delta against full, in alternating blocks; host microseconds."""
    import attnsync
    from attnsync._plan import plan_of
    from attnsync.adapters import _torch_table_lowering
    from attnsync.adapters.torch import _WIDE, Stager, lower

    state, n = case.state, case.num_reqs
    stager = Stager(case.device, depth=2)
    memory = stager.table_memory
    query = np.ones(n, dtype=np.int32)
    times: dict[str, list[float]] = {"whole_delta": [], "whole_full": []}
    sizes: dict[str, int] = {}

    def seq_lens() -> np.ndarray:
        return (state._len[:n] * BLOCK_SIZE - 3).astype(np.int32)  # every row inside its last page

    def delta_step() -> Any:
        rows, pages = case.next_crossing()
        state.append_many(rows, pages)
        updates = state.take_updates(pad=True)
        view = state.view(n)
        md = attnsync.build(attnsync.Batch(query_lens=query, seq_lens=seq_lens(), block_table=view,
                                           block_size=BLOCK_SIZE))
        out = lower(md, case.device, stager=stager, block_table=case.table, table_updates=updates, table_view=view)
        sizes["delta"] = _torch_table_lowering._derived_plan(plan_of(type(md)), True, False, False).layouts(
            {**md.__dict__, "_block_table_updates": np.zeros(max(64, updates.flat.shape[0]), np.int32)},
            _WIDE).staged.nbytes
        return out

    def full_step() -> Any:
        rows, pages = case.next_crossing()
        state.append_many(rows, pages)
        case.table.apply_record(state.take_updates(pad=True))  # (keeps the device table in step, untimed below)
        md = attnsync.build(attnsync.Batch(query_lens=query, seq_lens=seq_lens(), block_table=state.as_batch_table(n),
                                           block_size=BLOCK_SIZE, table_memory=memory))
        out = lower(md, case.device, stager=stager)
        sizes["full"] = plan_of(type(md)).layouts(md.__dict__, _WIDE).staged.nbytes
        return out

    def block(kind: str) -> None:
        fn, spent = (delta_step, []) if kind == "whole_delta" else (full_step, [])
        for i in range(calls + 3):
            case.drain()
            start = time.perf_counter()
            if kind == "whole_delta":
                fn()
            else:  # time everything but the device table's own upkeep
                rows, pages = case.next_crossing()
                state.append_many(rows, pages)
                t0 = time.perf_counter()
                case.table.apply_record(state.take_updates(pad=True))
                upkeep = time.perf_counter() - t0
                md = attnsync.build(attnsync.Batch(
                    query_lens=query, seq_lens=seq_lens(), block_table=state.as_batch_table(n),
                    block_size=BLOCK_SIZE, table_memory=memory))
                lower(md, case.device, stager=stager)
                start += upkeep
            if i >= 3:
                spent.append((time.perf_counter() - start) * 1e6)
        times[kind].append(statistics.median(spent))

    full_step()
    delta_step()
    gc.disable()
    try:
        for r in range(rounds):
            for kind in (("whole_delta", "whole_full") if r % 2 == 0 else ("whole_full", "whole_delta")):
                block(kind)
    finally:
        gc.enable()
    case.drain()
    assert np.array_equal(case.table.storage.cpu().numpy(), state.mirror), "device table diverged"
    out = {key: statistics.median(values) for key, values in times.items()}
    out["whole_delta_bytes"], out["whole_full_bytes"] = sizes["delta"], sizes["full"]
    out["whole_ratio"] = out["whole_full"] / out["whole_delta"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write DIR/bench_block_table.json")
    parser.add_argument("--json", type=Path, help="write the JSON to this file")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls (a smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the apply runs (default: cuda when available, else cpu)")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-step comparison")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # one intra-op thread: on a shared CPU host torch's thread pool made single large copies
    # jump by milliseconds, and both paths are single-threaded numpy on the host side anyway
    torch.set_num_threads(1)
    rounds, calls = (3, 20) if args.quick else (8, 60)
    rng = np.random.default_rng(0)
    results = []
    for num_reqs, width in SIZES:
        case = Case(num_reqs, width, device, rng)
        row = {"num_reqs": num_reqs, "width": width, **measure(case, rounds=rounds, calls=calls)}
        if not args.no_whole:
            row.update(measure_whole(case, rounds=rounds, calls=calls // 2))
        results.append(row)
        del case
        gc.collect()
    report = {
        "script": "bench_block_table.py",
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu_only": device != "cuda",
        "host": platform.node(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "rounds": rounds,
        "calls_per_block": calls,
        "crossing_every": CROSSING_EVERY,
        "results": results,
        "targets_4096x2048": _targets(results),
    }
    print(_table(report))
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_block_table.json").write_text(text)
    if args.json:
        args.json.write_text(text)
    return report


def _targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    big = next(r for r in results if (r["num_reqs"], r["width"]) == (4096, 2048))
    out = {
        "delta_bytes": big["delta_bytes"], "bytes_ok": big["delta_bytes"] <= 64 * 1024,
        "delta_host_us": big["delta_host"], "host_ok": big["delta_host"] <= 150,
        "host_ratio": big["host_ratio"], "ratio_ok": big["host_ratio"] >= 20,
        "note": "targets are for an H100 host; a CPU-only run is indicative only",
    }
    if "whole_delta" in big:
        small = next(r for r in results if (r["num_reqs"], r["width"]) == (256, 512))
        out.update({
            "whole_delta_bytes": big["whole_delta_bytes"], "whole_bytes_ok": big["whole_delta_bytes"] <= 64 * 1024,
            "whole_delta_us": big["whole_delta"], "whole_host_ok": big["whole_delta"] <= 150,
            "whole_ratio": big["whole_ratio"], "whole_ratio_ok": big["whole_ratio"] >= 20,
            "small_whole_ratio": small["whole_ratio"], "small_no_slower": small["whole_ratio"] >= 1.0,
        })
    return out


def _table(report: dict[str, Any]) -> str:
    head = (f"block table per decode step ({report['device']}{', CPU-only' if report['cpu_only'] else ''}; "
            f"host us, medians over {report['rounds']} alternating rounds; 1 row in "
            f"{report['crossing_every']} crosses a page)\n")
    cols = ("| reqs x pages | delta bytes | padded bytes | full bytes | verb | take+pack | delta host | "
            "full pack | full/delta | delta apply | full apply |")
    lines = [head, cols, "|" + "---|" * (cols.count("|") - 1)]
    for r in report["results"]:
        lines.append(
            f"| {r['num_reqs']} x {r['width']} | {r['delta_bytes']:,} | {r['delta_padded_bytes']:,} | "
            f"{r['full_bytes']:,} | {r['delta_verb']:.1f} | {r['delta_take_pack']:.1f} | {r['delta_host']:.1f} | "
            f"{r['full_pack']:.1f} | {r['host_ratio']:.1f}x | {r['delta_apply']:.1f} | {r['full_apply']:.1f} |")
    t = report["targets_4096x2048"]
    lines.append(f"\n4096 x 2048: {t['delta_bytes']:,} bytes (<= 65,536: {t['bytes_ok']}), delta host "
                 f"{t['delta_host_us']:.1f} us (<= 150: {t['host_ok']}), full/delta {t['host_ratio']:.1f}x "
                 f"(>= 20: {t['ratio_ok']}); {t['note']}")
    if "whole_delta_us" in t:
        lines += ["\nwhole step (verb + Batch + build + lower, common metadata, depth-2 stager)\n",
                  "| reqs x pages | delta bytes | full bytes | delta us | full us | full/delta |", "|---|---|---|---|---|---|"]
        for r in report["results"]:
            lines.append(f"| {r['num_reqs']} x {r['width']} | {r['whole_delta_bytes']:,} | {r['whole_full_bytes']:,} | "
                         f"{r['whole_delta']:.1f} | {r['whole_full']:.1f} | {r['whole_ratio']:.1f}x |")
        lines.append(f"\nwhole step 4096 x 2048: {t['whole_delta_bytes']:,} bytes (<= 65,536: {t['whole_bytes_ok']}), "
                     f"{t['whole_delta_us']:.1f} us (<= 150: {t['whole_host_ok']}), full/delta {t['whole_ratio']:.1f}x "
                     f"(>= 20: {t['whole_ratio_ok']}); 256 x 512 full/delta {t['small_whole_ratio']:.2f}x "
                     f"(no slower: {t['small_no_slower']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
