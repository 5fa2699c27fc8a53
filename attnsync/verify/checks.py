"""The sync columns: fake tensors and a dispatch spy (CPU), sync counting, the stall probe and
host-to-device copies (CUDA), and recompiles after warm-up (JAX).

Each check takes a prepared `Case` and a `Framework`, returns a detail (or (detail, value))
and raises `Fail` or `Skip`.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import build
from .compare import compare_arrays
from .frameworks import Framework
from .lowering import Case, device_lengths, lower, torch_lower
from .report import Fail, Skip, error_text

__all__ = ["STALL_SLEEP_MS", "check_fake_tensor", "check_h2d", "check_jax_recompiles", "check_stall",
           "check_syncs"]

STALL_SLEEP_MS = 50.0

# A device path of the fake-tensor column: (name, device function, real CPU inputs, expected
# numpy result or None).
Path = tuple[str, Callable[..., Any], dict[str, Any], Any]

_SYNCING_OPS = frozenset({
    "aten._local_scalar_dense.default",  # .item(), int(t), bool(t), .tolist()
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.bincount.default",
    "aten.repeat_interleave.Tensor",  # only without output_size
})


def _spy_class() -> type:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncSpy(TorchDispatchMode):
        """Records dispatched aten ops whose output needs a device value on the host."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            sized = name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is not None
            if name in _SYNCING_OPS and not sized:
                self.seen.append(name)
            if name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                if i is not None
            ):
                self.seen.append(name + " (bool mask)")
            return func(*args, **kwargs)

    return SyncSpy


def _run_fake(fn: Callable[..., Any], **inputs: Any) -> Any:
    """`fn(**inputs)` on fake copies of every tensor (also inside lowered metadata objects):
    a data-dependent host read raises."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        def fake(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return mode.from_tensor(value)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                tensors = {f.name: mode.from_tensor(getattr(value, f.name)) for f in dataclasses.fields(value)
                           if isinstance(getattr(value, f.name), torch.Tensor)}
                return dataclasses.replace(value, **tensors)
            return value

        return fn(**{k: fake(v) for k, v in inputs.items()})


def _slot_mapping_path(case: Case) -> list[Path]:
    """The torch adapter's slot-mapping recompute, for metadata that has a slot mapping."""
    md = case.md
    if not (hasattr(md, "slot_mapping") and hasattr(md, "seq_lens") and hasattr(md, "block_table")):
        return []
    import torch

    # The torch adapter's own slot recompute, checked on fake tensors.
    from ..adapters import torch as torch_adapter

    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731 - writable copies of read-only arrays
    rows, back = torch_adapter.token_rows_and_back(md.query_start_loc, md.num_actual_tokens)
    inputs = dict(seq_lens=t(case.lengths), block_table=t(md.block_table), rows=t(rows), back=t(back))
    want = (case.twin_md if case.inexact else md).slot_mapping

    def slots(**x: Any) -> Any:
        return torch_adapter.slots_from_device_lengths(**x, block_size=md.block_size)

    return [("slot_mapping recompute (torch adapter)", slots, inputs, want)]


def check_fake_tensor(case: Case, fw: Framework) -> str:
    """Device-side torch code on fake tensors, under the spy, and its value against the host."""
    try:
        importlib.import_module("torch._subclasses.fake_tensor")
    except Exception as exc:
        raise Skip("torch FakeTensorMode is not importable", error_text(exc)) from None
    paths = _slot_mapping_path(case)
    own = case.check.fake_paths
    why = None
    if own is not None:
        try:
            paths += own(case)
        except Skip as exc:  # the backend's code cannot run on this case; the generic paths still do
            why = exc
    if not paths:
        raise why or Skip("no device-side torch code for this backend's metadata")
    spy_class = _spy_class()
    for name, fn, inputs, want in paths:
        try:
            _run_fake(fn, **inputs)
        except Exception as exc:
            raise Fail(f"{name}: failed on fake tensors (a data-dependent read?): {error_text(exc)}") from None
        with spy_class() as spy:
            got = fn(**inputs)
        if spy.seen:
            raise Fail(f"{name}: dispatched syncing op(s) {sorted(set(spy.seen))}")
        if want is not None:
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                compare_arrays(f"{name} output {i}", g.numpy(), w)
    # and the whole lowering with device lengths, under the spy
    if hasattr(case.md, "slot_mapping_exact"):
        import torch

        spy = spy_class()
        with spy:
            torch_lower(case.backend)(case.md, "cpu", seq_lens=torch.from_numpy(np.array(case.lengths)))
        if spy.seen:
            raise Fail(f"lower(md, seq_lens=...): dispatched syncing op(s) {sorted(set(spy.seen))}")
    return f"{len(paths)} device path(s): no data-dependent read, no syncing op, values equal the host"


# ---------------------------------------------------------------------------------------------
# Device checks: syncs, stall, H2D copies, JAX recompiles


def _count_torch_syncs(fn: Callable[[], Any]) -> tuple[int, str, Any]:
    """Run `fn` under torch's sync debug mode "warn"; (syncs seen, first message, result)."""
    import torch

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    # Arming the mode warns once that it "is a prototype feature": that is not a sync.
    syncs = [
        str(w.message) for w in caught
        if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)
    ]
    return len(syncs), (syncs[0].splitlines()[0] if syncs else ""), result


def _step(case: Case, fw: Framework) -> Callable[[], Any]:
    """Build and lower the case: one serving step's metadata work."""
    seq_lens = device_lengths(fw, case.lengths) if (fw.name.startswith("torch") and case.inexact) else None

    def step() -> Any:
        md = build(case.batch, backend=case.backend, **case.options)
        return lower(case.backend, fw, md, seq_lens)

    return step


def _block(fw: Framework, value: Any) -> None:
    if fw.name.startswith("jax"):
        import jax

        jax.block_until_ready(value)


def _cuda_host(fw: Framework) -> Any:
    """torch when it is imported with CUDA and `fw` is a GPU row, else None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or fw.name not in ("torch-cuda", "jax-gpu"):
        return None
    return torch


def check_syncs(case: Case, fw: Framework) -> tuple[str, int]:
    """Build + lower under torch's sync debug mode (CUDA) and JAX's transfer guard (JAX)."""
    step = _step(case, fw)
    if fw.name.startswith("jax"):
        import jax

        inner = step

        def step() -> Any:  # the guarded form of the same step
            with jax.transfer_guard("disallow"):
                return inner()

    _block(fw, step())  # warm-up: first calls compile or allocate
    guarded = []
    if _cuda_host(fw) is not None:
        try:
            count, first, result = _count_torch_syncs(step)
        except Exception as exc:
            raise Fail(f"lowering raised under the guards: {error_text(exc)}") from None
        _block(fw, result)
        if count:
            raise Fail(f"{count} sync(s) flagged by torch's sync debug mode; first: {first}")
        guarded.append("torch sync debug mode: 0 syncs")
    elif fw.name.startswith("jax"):
        try:
            _block(fw, step())
        except Exception as exc:
            raise Fail(f"implicit transfer under jax.transfer_guard('disallow'): {error_text(exc)}") from None
    else:
        raise Skip("needs CUDA (torch's sync debug mode); see the fake_tensor column for CPU")
    if fw.name.startswith("jax"):
        guarded.append("jax.transfer_guard('disallow'): no implicit transfer")
    return "; ".join(guarded), 0


def check_stall(case: Case, fw: Framework) -> tuple[str, float]:
    """Host time of build + lowering with a sleep kernel queued, against an idle GPU."""
    torch = _cuda_host(fw)
    if torch is None:
        raise Skip("needs CUDA (the stall probe queues a sleep kernel)")
    from ..testing import host_time_under_busy_gpu

    step = _step(case, fw)
    _block(fw, step())  # warm-up (the syncs column warmed the same step up already)
    torch.cuda.synchronize()
    idle = []
    for _ in range(2):
        start = time.perf_counter()
        _block(fw, step())
        idle.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    t_idle = min(idle)
    sleep_ms = max(STALL_SLEEP_MS, 4 * t_idle)
    for _ in range(3):  # a stall costs every attempt the rest of the sleep, host noise only one
        elapsed, result = host_time_under_busy_gpu(step, sleep_ms=sleep_ms)
        _block(fw, result)
        extra = elapsed - t_idle
        if extra <= sleep_ms / 2:
            break
    detail = f"{elapsed:.3f} ms with a {sleep_ms:.0f} ms kernel queued, {t_idle:.3f} ms on an idle GPU"
    if extra > sleep_ms / 2:
        raise Fail(f"host stalled: {detail}")
    return detail, round(extra, 4)


def check_h2d(case: Case, fw: Framework) -> tuple[str, int]:
    """Host-to-device copies of one lowering (profiler), which must be exactly 1."""
    if _cuda_host(fw) is None:
        raise Skip("needs CUDA (the torch profiler counts CUDA memcpy activities)")
    from ..testing import count_h2d_copies

    seq_lens = device_lengths(fw, case.lengths) if (fw.name.startswith("torch") and case.inexact) else None
    _block(fw, lower(case.backend, fw, case.md, seq_lens))  # warm-up: pinned slots allocated
    count, _ = count_h2d_copies(lambda: _block(fw, lower(case.backend, fw, case.md, seq_lens)))
    if count != 1:
        raise Fail(f"{count} host-to-device copies in one lowering, expected 1")
    return "1 host-to-device copy per lowering", count


class _CompileCounter:
    """Counts XLA backend compiles while active (one listener for the process)."""

    _registered = False
    count = 0
    active = False

    @classmethod
    def install(cls) -> None:
        if cls._registered:
            return
        import jax

        def listener(event: str, *args: Any, **kwargs: Any) -> None:
            if cls.active and event == "/jax/core/compile/backend_compile_duration":
                cls.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._registered = True


_TRACES: collections.Counter = collections.Counter()
_CONSUMER: list[Any] = []  # the jitted consumer, made once per process


def _consumer() -> Any:
    import jax
    import jax.numpy as jnp

    if not _CONSUMER:
        def consume(tree: Any) -> Any:
            _TRACES["consumer"] += 1  # runs at trace time only
            leaves = jax.tree_util.tree_leaves(tree)
            return sum((jnp.sum(leaf.astype(jnp.float32)) for leaf in leaves), jnp.float32(0))

        _CONSUMER.append(jax.jit(consume))
    return _CONSUMER[0]


def check_jax_recompiles(case: Case, fw: Framework) -> tuple[str, int]:
    """After warm-up, lower the same batch again and consume it: no trace, no compile."""
    import jax

    _CompileCounter.install()
    consume = _consumer()
    jax.block_until_ready(consume(lower(case.backend, fw, case.md)))  # warm-up
    traces = _TRACES["consumer"]
    _CompileCounter.count = 0
    _CompileCounter.active = True
    try:
        with jax.transfer_guard("disallow"):
            lowered = lower(case.backend, fw, case.md)
        jax.block_until_ready(consume(lowered))
    finally:
        _CompileCounter.active = False
    retraced = _TRACES["consumer"] - traces
    compiles = _CompileCounter.count
    if retraced or compiles:
        raise Fail(f"after warm-up: {retraced} retrace(s) of the consumer, {compiles} XLA compile(s)")
    return "0 retraces, 0 compiles after warm-up", 0
