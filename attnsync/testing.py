"""Tools to prove metadata code sync-free and correct: guards, the stall probe, naive builders.

Frameworks are imported inside each function, so importing this module stays cheap.

- `no_sync()`: torch `set_sync_debug_mode("error")` (attribution: names the op that synced)
  plus `jax.transfer_guard("disallow")` (implicit JAX transfers), for what is installed.
- `assert_no_host_stall(fn)`: the ground truth. It queues a ~50 ms sleep kernel, runs `fn`
  and requires the host to return long before the kernel ends. It catches every host block,
  including those the debug mode misses (`Event.synchronize`, `torch.cuda.synchronize`,
  pageable device-to-host copies, syncs inside FlashInfer or JAX; see docs/sync-free.md).
- `count_h2d_copies(fn)`: host-to-device copies `fn` made, from the torch profiler.
- `naive_common_torch(batch, device)`: the sync-ful way (device lists, `.item()` maxima), the
  baseline of the equivalence tests and benchmarks.

The same checks as pytest fixtures, for an engine's own builders: `attnsync.pytest_plugin`
(docs/testing-kit.md).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._batch import Batch


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    """Fail on torch host syncs and implicit JAX transfers inside the block.

    Only frameworks that are already imported are armed, so the guard never imports one.
    """
    with contextlib.ExitStack() as stack:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        jax = sys.modules.get("jax")
        if jax is not None:
            stack.enter_context(jax.transfer_guard("disallow"))
        yield


def _calibrated_cycles(torch: Any, milliseconds: float) -> int:
    """Cycles of `torch.cuda._sleep` that take about `milliseconds` (rate measured once, the
    fastest of three tries: other processes on the GPU only make a try look slower)."""
    cached = getattr(_calibrated_cycles, "cache", None)
    if cached is None:
        rates = []
        for _ in range(3):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cycles = 10_000_000
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            rates.append(cycles / max(start.elapsed_time(end), 1e-3))  # cycles per ms
        cached = max(rates)
        _calibrated_cycles.cache = cached
    return int(cached * milliseconds)


def host_time_under_busy_gpu(fn: Callable[[], Any], *, sleep_ms: float = 50.0) -> tuple[float, Any]:
    """Run `fn` while a `sleep_ms` kernel occupies the current stream; return (host ms, result).

    The sleep kernel's length is timed with CUDA events. If it ran short (its rate was
    calibrated while other processes shared the GPU, a "50 ms" sleep can last a fraction of
    that), the rate is corrected from that measurement and `fn` runs again
    (at most three runs), so a waiting `fn` is not mistaken for one that returned early.
    """
    import torch

    for attempt in range(3):
        cycles = _calibrated_cycles(torch, sleep_ms)
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.cuda._sleep(cycles)
        end.record()
        start = time.perf_counter()
        result = fn()
        elapsed = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        slept = begin.elapsed_time(end)
        if slept >= 0.8 * sleep_ms or attempt == 2:
            return elapsed, result
        _calibrated_cycles.cache = cycles / max(slept, 1e-3)
    raise AssertionError("unreachable")  # pragma: no cover


def assert_no_host_stall(fn: Callable[[], Any], *, budget_ms: float = 1.0, sleep_ms: float = 50.0,
                         attempts: int = 1) -> Any:
    """Assert `fn` returns within `budget_ms` of host time while the GPU is busy for `sleep_ms`.

    A call that waits for the GPU in any way takes about `sleep_ms`, far above the budget.
    With `attempts` > 1 the probe is retried: a real stall fails every attempt, host noise
    (a preempted thread) only one. Returns `fn`'s result. Warm `fn` up first: first calls may
    compile or allocate.
    """
    for _ in range(max(1, attempts)):
        elapsed, result = host_time_under_busy_gpu(fn, sleep_ms=sleep_ms)
        if elapsed <= budget_ms:
            return result
    tries = f" in each of {attempts} attempts" if attempts > 1 else ""
    raise AssertionError(
        f"host stalled: the call took {elapsed:.2f} ms of host time while a {sleep_ms:.0f} ms "
        f"kernel was queued (budget {budget_ms} ms){tries}. Something waited for the GPU."
    )


def count_h2d_copies(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run `fn` under the torch profiler and count host-to-device memcpy activities."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    count = sum(1 for event in prof.events() if "Memcpy HtoD" in event.name)
    return count, result


def naive_common_torch(batch: Batch, device: Any) -> dict[str, Any]:
    """The sync-ful way to build the common fields: one device list per field, `.item()` maxima.

    This is the "before" of every equivalence pair and the baseline of `bench/`. It must give
    the same values as `attnsync.build(batch)` lowered with the torch adapter.
    """
    import torch

    q = [int(x) for x in batch.query_lens]
    s = [int(x) for x in batch.seq_lens]
    qsl = [0]
    for n in q:
        qsl.append(qsl[-1] + n)
    out: dict[str, Any] = {}
    out["query_start_loc"] = torch.tensor(qsl, dtype=torch.int32, device=device)
    out["seq_lens"] = torch.tensor(s, dtype=torch.int32, device=device)
    out["block_table_tensor"] = torch.tensor(batch.block_table.tolist(), dtype=torch.int32, device=device)
    slots = []
    for r in range(batch.num_reqs):
        for i in range(q[r]):
            pos = s[r] - q[r] + i
            slots.append(int(batch.block_table[r, pos // batch.block_size]) * batch.block_size + pos % batch.block_size)
    out["slot_mapping"] = torch.tensor(slots, dtype=torch.int64, device=device)
    lens = out["query_start_loc"][1:] - out["query_start_loc"][:-1]
    out["max_query_len"] = int(lens.max().item()) if batch.num_reqs else 0
    out["max_seq_len"] = int(out["seq_lens"].max().item()) if batch.num_reqs else 0
    return out


def brute_force_common(batch: Batch, *, decode_threshold: int = 1) -> dict[str, Any]:
    """Per-row Python reference of every common field (no numpy vectorisation, no cleverness)."""
    n = batch.num_reqs
    r_pad, t_pad, bs = batch.padded_num_reqs, batch.padded_num_tokens, batch.block_size
    q = [int(x) for x in batch.query_lens] + [0] * (r_pad - n)
    s = [int(x) for x in batch.seq_lens] + [0] * (r_pad - n)
    exact = [bool(x) for x in batch.seq_lens_exact] + [True] * (r_pad - n)
    pre = ([bool(x) for x in batch.is_prefilling] if batch.is_prefilling is not None else [False] * n)
    pre += [False] * (r_pad - n)
    qsl = [0]
    for r in range(r_pad):
        qsl.append(qsl[-1] + q[r])
    width = batch.block_table.shape[1]
    table = [[int(x) for x in row] for row in batch.block_table] + [[0] * width for _ in range(r_pad - n)]
    slots, owners = [], []
    for r in range(n):
        for i in range(q[r]):
            pos = s[r] - q[r] + i
            slots.append(table[r][pos // bs] * bs + pos % bs if exact[r] else -1)
            owners.append(r)
    slots += [-1] * (t_pad - len(slots))
    owners += [r_pad] * (t_pad - len(owners))
    kinds = []
    for r in range(n):
        if q[r] <= decode_threshold:
            kinds.append("extend" if pre[r] else "decode")
        else:
            kinds.append("extend" if s[r] - q[r] > 0 else "prefill")
    counts = {}
    for kind in ("decode", "extend", "prefill"):
        rows = [r for r in range(n) if kinds[r] == kind]
        counts[f"num_{kind}s"] = len(rows)
        counts[f"num_{kind}_tokens"] = sum(q[r] for r in rows)
    return dict(
        query_start_loc=np.array(qsl, dtype=np.int32),
        query_lens=np.array(q, dtype=np.int32),
        seq_lens=np.array(s, dtype=np.int32),
        seq_lens_exact=np.array(exact, dtype=bool),
        num_computed_tokens=np.array([s[r] - q[r] for r in range(r_pad)], dtype=np.int32),
        is_prefilling=np.array(pre, dtype=bool),
        block_table=np.array(table, dtype=np.int32).reshape(r_pad, width),
        slot_mapping=np.array(slots, dtype=np.int32),
        token_to_req=np.array(owners, dtype=np.int32),
        num_reqs=r_pad,
        num_actual_tokens=t_pad,
        num_scheduled_reqs=n,
        num_scheduled_tokens=sum(q[:n]),
        max_query_len=max(q[:n], default=0),
        max_seq_len=max(s[:n], default=0),
        is_decode_first=all(
            not (kinds[a] != "decode" and kinds[b] == "decode") for a in range(n) for b in range(a + 1, n)
        ),
        all_exact=all(exact[:n]),
        **counts,
    )
