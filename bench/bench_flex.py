"""Flex: host time per step of the block-sparse metadata + BlockMask vs compiled create_block_mask.

    python bench/bench_flex.py --out DIR [--quick] [--reqs 32 64 128 256] [--iters 100]

Workload: a decode step of R requests (one new token each, contexts uniform in [200, 2000),
page 16, q block 16), pages drawn without replacement from a cache of fixed size (big enough
for the largest R at the longest context), optionally a shared prefix. Per R, side by side in
one process:

- ``attnsync (inverse on device)``: ``attnsync.build(batch, backend="flex",
  inverse_table="device")`` + ``flex_torch.lower`` (one pinned copy; the inverse table is one
  scatter on the device) + ``flex_torch.block_mask`` (``BlockMask.from_kv_blocks``);
- ``attnsync (inverse on host)``: the same with the [R, num_cache_pages] inverse table built in
  numpy and staged (its bytes grow with the cache);
- ``attnsync (lists on device)``: ``block_sparse="device"`` and ``inverse_table="device"``:
  the host builds only the per-row and per-token fields and a width bound; ``flex_torch.lower``
  builds the page lists (``kv_blocks_device``) and the inverse table on the device;
- ``attnsync (lists captured)``: the same, with the device half replayed from one CUDA graph
  (``flex_torch.CapturedBlockLists``: a persistent lowering, then one replay per step) and the
  ``BlockMask`` built once at capture over the fixed tensors (``captured.block_mask``);
- ``attnsync (lists captured, from the batch)``: the same through ``captured.step_batch(batch)``,
  which skips the host fields the graph derives (slot mapping, page counts);
- ``create_block_mask (compiled)``: ``torch.compile(create_block_mask)`` on the same paged
  mask_mod over [T, num_cache_pages * page] (dense mask evaluation on the device). Its device
  inputs (doc ids, inverse table, ...) are prepared once and not timed, which favours it.

Host time = wall time of the call on the host, the GPU drained before each sample (median of
``--iters`` calls after a quarter as many warm-up calls, garbage collector paused). "Step" =
the same plus ``torch.cuda.synchronize()``: the whole cost when the step waits for the result.
On CUDA both captured steps' ratios to the compiled baseline are also measured in alternating
blocks (``paired_ratio``), which a host drifting in speed during the run cannot bias.
Targets (issue): attnsync >= 10x faster in host time at 256 requests, and linear growth in R.
Absolute numbers only count on the GPU host.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402

import attnsync  # noqa: E402
from attnsync.integrations import flex_torch as ft  # noqa: E402

PAGE = 16
Q_BLOCK = 16
CONTEXT = (200, 2000)


def decode_batch(num_reqs: int, num_pages: int, *, shared_prefix_pages: int, seed: int) -> attnsync.Batch:
    rng = np.random.default_rng(seed)
    context = rng.integers(*CONTEXT, size=num_reqs)
    seq_lens = context + 1
    pages_needed = -(-seq_lens // PAGE)
    width = -(-(CONTEXT[1] + 1) // PAGE)
    table = np.zeros((num_reqs, width), dtype=np.int64)
    pool = rng.permutation(np.arange(1 + shared_prefix_pages, num_pages))
    shared = np.arange(1, 1 + shared_prefix_pages)
    start = 0
    for r in range(num_reqs):  # setup only; never timed
        own = pages_needed[r] - min(shared_prefix_pages, pages_needed[r])
        row = np.concatenate([shared[: pages_needed[r]], pool[start : start + own]])
        table[r, : pages_needed[r]] = row
        start += own
    return attnsync.Batch(query_lens=np.ones(num_reqs, dtype=np.int64), seq_lens=seq_lens, block_table=table,
                          block_size=PAGE, num_cache_pages=num_pages)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, iters: int, warmup: int | None = None) -> dict[str, float]:
    """Median host and step milliseconds of `fn` over `iters` calls, after `warmup` calls
    (default a quarter of `iters`, at least 5: every variant, baseline included, is timed
    warm) with the garbage collector paused while timing (a collection landing in one
    variant's samples and not another's is noise, not cost)."""
    for _ in range(max(5, iters // 4) if warmup is None else warmup):
        fn()
    _sync(device)
    host, step = [], []
    gc.collect()
    gc.disable()
    try:
        for _ in range(iters):
            _sync(device)
            start = time.perf_counter()
            fn()
            host.append(time.perf_counter() - start)
            _sync(device)
            step.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {"host_ms": statistics.median(host) * 1e3, "step_ms": statistics.median(step) * 1e3}


def paired_ratio(numerator, denominator, device: torch.device, *, rounds: int = 8, calls: int = 20,
                 warmup: int = 5) -> dict[str, float]:
    """Host time of `numerator` over `denominator`, measured in alternating blocks.

    Each round times `calls` calls of one then the other (the order alternates), each block
    after `warmup` untimed calls of its own function, and takes the ratio of the two blocks'
    medians; the result is the median over rounds. A host whose speed drifts during the run
    (other tenants, clocks) then shifts both sides of a ratio alike, where two measurements
    taken one after the other can catch it in only one.

    The per-block warm-up keeps the comparison between warm functions, as `measure` does: with
    one warm-up call per block the captured step's block median read about three times its
    warm measurement on the same host, because every block starts just after the other side's
    calls and `measure`'s `gc.collect()`, with cold caches.
    """
    def block(fn) -> float:
        return measure(fn, device, calls, warmup=warmup)["host_ms"]

    ratios, tops, bottoms = [], [], []
    for index in range(rounds):
        if index % 2:
            bottom, top = block(denominator), block(numerator)
        else:
            top, bottom = block(numerator), block(denominator)
        ratios.append(top / bottom)
        tops.append(top)
        bottoms.append(bottom)
    return {"ratio": statistics.median(ratios), "numerator_host_ms": statistics.median(tops),
            "denominator_host_ms": statistics.median(bottoms), "rounds": rounds, "calls": calls}


def _check_lists(lists, host_md, device: torch.device) -> None:
    """Device lists (a lowering or a BlockMask) equal the host build's, -1 beyond its width."""
    _sync(device)
    counts = lists.kv_num_blocks.reshape(-1).cpu().numpy()
    indices = lists.kv_indices.reshape(host_md.num_q_blocks, -1).cpu().numpy()
    width = host_md.kv_indices.shape[1]
    assert (counts == host_md.kv_num_blocks).all()
    assert (indices[:, :width] == host_md.kv_indices).all() and (indices[:, width:] == -1).all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reqs", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--shared-prefix-pages", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--baseline", choices=["auto", "on", "off"], default="auto",
                        help="run compiled create_block_mask (auto: on CUDA only; its CPU compile is slow)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_flex.json")
    parser.add_argument("--quick", action="store_true", help="two sizes (32 and 256), 40 iterations")
    args = parser.parse_args(argv)
    if args.quick:
        # 40 samples, not fewer: at 15 the captured step's median moved 2x between hosts
        args.reqs, args.iters = [32, 256], min(args.iters, 40)
    device = torch.device(args.device)
    run_baseline = args.baseline == "on" or (args.baseline == "auto" and device.type == "cuda")
    max_reqs = max(args.reqs)
    num_pages = 1 + args.shared_prefix_pages + max_reqs * -(-CONTEXT[1] // PAGE) + max_reqs
    compiled_create = torch.compile(create_block_mask) if run_baseline else None
    rows = []
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, cache {num_pages} pages of {PAGE}, q block {Q_BLOCK}")
    for num_reqs in args.reqs:
        batch = decode_batch(num_reqs, num_pages, shared_prefix_pages=args.shared_prefix_pages, seed=num_reqs)
        result: dict[str, object] = {"num_reqs": num_reqs, "num_tokens": batch.num_tokens}
        for inverse in ("device", "host"):
            def step(inverse=inverse):
                md = attnsync.build(batch, backend="flex", q_block_size=Q_BLOCK, inverse_table=inverse)
                tmd = ft.lower(md, device)
                return ft.block_mask(tmd)

            result[f"attnsync_inverse_{inverse}"] = measure(step, device, args.iters)

        def lists_on_device():
            md = attnsync.build(batch, backend="flex", q_block_size=Q_BLOCK, inverse_table="device",
                                block_sparse="device")
            return ft.block_mask(ft.lower(md, device))

        result["attnsync_lists_on_device"] = measure(lists_on_device, device, args.iters)
        if device.type == "cuda":
            # the same, with the device half captured once (CUDA graph) and replayed per step
            graph_options = dict(q_block_size=Q_BLOCK, inverse_table="device", block_sparse="device")
            first = attnsync.build(batch, backend="flex", **graph_options)
            # another batch of the same shape (other contexts and pages), for the check below
            other = decode_batch(num_reqs, num_pages, shared_prefix_pages=args.shared_prefix_pages,
                                 seed=num_reqs + 1)
            graph_options["max_kv_blocks"] = max(
                first.max_kv_blocks, attnsync.build(other, backend="flex", **graph_options).max_kv_blocks)
            first = attnsync.build(batch, backend="flex", **graph_options)
            captured = ft.CapturedBlockLists(first, device)

            def lists_captured():
                md = attnsync.build(batch, backend="flex", **graph_options)
                captured.step(md)
                return captured.block_mask  # built once at capture, rewritten by each replay

            def lists_captured_from_batch():
                captured.step_batch(batch)  # the build without the fields the graph derives
                return captured.block_mask

            result["attnsync_lists_captured"] = measure(lists_captured, device, args.iters)
            result["attnsync_lists_captured_from_batch"] = measure(lists_captured_from_batch, device,
                                                                   args.iters)
            # The cached mask follows the replays: after a step of the other batch it holds that
            # batch's lists, then this one's again; through step and through step_batch.
            for check in (other, batch, other, batch):
                if check is other:
                    captured.step(attnsync.build(check, backend="flex", **graph_options))
                else:
                    captured.step_batch(check)
                _check_lists(captured.block_mask, attnsync.build(check, backend="flex", q_block_size=Q_BLOCK), device)
        # same lists as the host build, the device ones padded with -1 to their (bound) width
        host_md = attnsync.build(batch, backend="flex", q_block_size=Q_BLOCK)
        dev_tmd = ft.lower(attnsync.build(batch, backend="flex", q_block_size=Q_BLOCK, block_sparse="device"), device)
        _check_lists(dev_tmd, host_md, device)
        md = attnsync.build(batch, backend="flex", q_block_size=Q_BLOCK)
        result["kv_indices_shape"] = list(md.kv_indices.shape)
        # the build alone (numpy), for the linear-growth check
        result["build_only"] = measure(
            lambda: attnsync.build(batch, backend="flex", q_block_size=Q_BLOCK, inverse_table="device"),
            torch.device("cpu"), args.iters)
        # the build of the captured path alone (device lists: no page lists on the host)
        device_lists = dict(q_block_size=Q_BLOCK, inverse_table="device", block_sparse="device")
        device_lists["max_kv_blocks"] = attnsync.build(batch, backend="flex", **device_lists).max_kv_blocks
        result["build_device_lists"] = measure(lambda: attnsync.build(batch, backend="flex", **device_lists),
                                               torch.device("cpu"), args.iters)
        if run_baseline:
            tmd = ft.lower(md, device)
            mask_mod = ft.paged_mask_mod(tmd)
            kv_len = num_pages * PAGE

            def baseline():
                return compiled_create(mask_mod, None, None, md.num_actual_tokens, kv_len, device=device,
                                       BLOCK_SIZE=(Q_BLOCK, PAGE))

            result["create_block_mask_compiled"] = measure(baseline, device, args.iters)
            if "attnsync_lists_captured" in result:  # the target's ratio, also from alternating blocks
                result["compiled_over_captured_paired"] = paired_ratio(
                    baseline, lists_captured, device, rounds=8 if args.quick else 16)
                result["compiled_over_captured_from_batch_paired"] = paired_ratio(
                    baseline, lists_captured_from_batch, device, rounds=8 if args.quick else 16)
            # same sparsity: the dense route must find every page the host listed
            dense = baseline()
            _sync(device)
            got = dense.kv_num_blocks.reshape(-1)
            if dense.full_kv_num_blocks is not None:  # create_block_mask splits off full blocks
                got = got + dense.full_kv_num_blocks.reshape(-1)
            got = got.cpu().numpy()
            assert (got == md.kv_num_blocks).all(), (got, md.kv_num_blocks)
        rows.append(result)
        line = [f"R={num_reqs:4d}"]
        for key in ("attnsync_inverse_device", "attnsync_inverse_host", "attnsync_lists_on_device",
                    "attnsync_lists_captured", "attnsync_lists_captured_from_batch", "create_block_mask_compiled"):
            if key in result:
                line.append(f"{key}: host {result[key]['host_ms']:.3f} ms, step {result[key]['step_ms']:.3f} ms")
        line.append(f"build {result['build_only']['host_ms']:.3f} ms, "
                    f"device lists {result['build_device_lists']['host_ms']:.3f} ms")
        print(" | ".join(line), flush=True)
    summary: dict[str, object] = {}
    first, last = rows[0], rows[-1]
    growth = last["num_reqs"] / first["num_reqs"]
    for key in ("attnsync_inverse_device", "attnsync_inverse_host", "attnsync_lists_on_device",
                "attnsync_lists_captured", "attnsync_lists_captured_from_batch", "build_only", "build_device_lists"):
        if key in first and key in last:
            summary[f"{key}_growth"] = last[key]["host_ms"] / first[key]["host_ms"]
    summary["request_growth"] = growth
    if run_baseline:
        for key in ("attnsync_inverse_device", "attnsync_inverse_host", "attnsync_lists_on_device",
                    "attnsync_lists_captured", "attnsync_lists_captured_from_batch"):
            if key not in last:
                continue
            summary[f"speedup_{key}_at_{last['num_reqs']}"] = (
                last["create_block_mask_compiled"]["host_ms"] / last[key]["host_ms"])
            summary[f"step_speedup_{key}_at_{last['num_reqs']}"] = (
                last["create_block_mask_compiled"]["step_ms"] / last[key]["step_ms"])
        if "compiled_over_captured_paired" in last:
            summary[f"paired_speedup_attnsync_lists_captured_at_{last['num_reqs']}"] = (
                last["compiled_over_captured_paired"]["ratio"])
            summary[f"paired_speedup_attnsync_lists_captured_from_batch_at_{last['num_reqs']}"] = (
                last["compiled_over_captured_from_batch_paired"]["ratio"])
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_flex.json").write_text(json.dumps({
            "quick": args.quick, "iters": args.iters, "device": str(device), "torch": torch.__version__,
            "num_cache_pages": num_pages, "rows": rows, "summary": summary,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
