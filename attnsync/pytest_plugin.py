"""attnsync's sync-freedom kit as a pytest plugin, for testing your own metadata builders.

Installed with attnsync (the `pytest11` entry point ``attnsync``), so its fixtures are there in
every pytest run once attnsync is installed; ``-p no:attnsync`` turns it off, and
``-p attnsync.pytest_plugin`` loads it from a checkout that is not installed. docs/testing-kit.md
walks through a worked example.

Fixtures (each imports its framework when a test asks for it, and skips the test with a reason
where the framework or the GPU it needs is missing):

- `torch_sync_guard`: torch's ``set_sync_debug_mode("error")`` around the test body (CUDA only:
  there are no syncs to report without it), the previous mode restored after.
- `stall_probe`: ``stall_probe(fn)`` runs `fn` while a sleep kernel keeps the GPU busy and fails
  unless the host returned within a budget, the ground truth for any kind of host wait (CUDA).
- `pageable_copy_detector`: watches ``Tensor.to``, ``Tensor.cuda`` and ``Tensor.copy_`` for the
  test; a ``non_blocking=True`` host-to-device copy whose source is pageable or not dense fails
  the test, naming the call. torch gives no warning for it, yet the host waits for it.
- `jax_transfer_guard`: ``jax.transfer_guard("disallow")`` around the test body.
- `compile_counter`: wraps functions in ``jax.jit`` or ``torch.compile`` and counts their
  traces, for "no recompiles after warm-up" assertions.

Markers: ``@pytest.mark.attnsync_no_sync`` runs the test body inside `attnsync.testing.no_sync()`
(torch's debug mode where CUDA is in use, JAX's transfer guard where JAX is imported), and
``@pytest.mark.attnsync_no_pageable_copy`` arms the pageable-copy detector.

Guards are armed around the test body only (the ``pytest_runtest_call`` hook), not during
fixture setup, so fixtures that build inputs may sync as they like.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

import pytest

from attnsync import testing as _testing

__all__ = ["CompileCounter", "JaxTransferGuard", "PageableCopy", "PageableCopyDetector", "StallProbe",
           "TorchSyncGuard"]

# The guards a test's fixtures (and markers) asked for; the call hook arms them around the body.
_GUARDS = pytest.StashKey[list[Any]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "attnsync_no_sync: run the test body inside attnsync.testing.no_sync() (torch's sync debug "
        "mode where CUDA is available, jax.transfer_guard('disallow') where JAX is imported)")
    config.addinivalue_line(
        "markers", "attnsync_no_pageable_copy: fail the test on a non_blocking host-to-device copy from "
        "pageable or non-dense memory (the pageable_copy_detector fixture)")


_G = TypeVar("_G")


def _register(request: pytest.FixtureRequest, guard: _G) -> _G:
    request.node.stash.setdefault(_GUARDS, []).append(guard)
    return guard


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    registered: list[Any] = item.stash.get(_GUARDS, [])
    guards = list(registered)
    if item.get_closest_marker("attnsync_no_pageable_copy") and not any(
            isinstance(g, PageableCopyDetector) for g in guards) and _torch_or_none() is not None:
        guards.append(PageableCopyDetector())
    with contextlib.ExitStack() as stack:
        if item.get_closest_marker("attnsync_no_sync"):
            stack.enter_context(_testing.no_sync())
        for guard in guards:
            stack.enter_context(guard.armed())
        result = yield
    for guard in guards:
        guard.check()
    return result


def _torch_or_none() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _import_or_skip(name: str, why: str) -> Any:
    return pytest.importorskip(name, reason=f"{name} is not installed: {why}")


def _cuda_torch(fixture: str) -> Any:
    torch = _import_or_skip("torch", f"{fixture} needs torch with a CUDA GPU")
    if not torch.cuda.is_available():
        pytest.skip(f"{fixture} needs a CUDA GPU (torch sees none): skipped, not passed")
    return torch


# --------------------------------------------------------------------------------------------
# torch's sync debug mode


class TorchSyncGuard:
    """``torch.cuda.set_sync_debug_mode("error")`` while armed: an op that syncs raises a
    RuntimeError naming itself. `paused()` lifts it for a block (warm-up, reading results)."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        cuda = self._torch.cuda
        previous = cuda.get_sync_debug_mode()
        cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            cuda.set_sync_debug_mode(previous)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        cuda = self._torch.cuda
        previous = cuda.get_sync_debug_mode()
        cuda.set_sync_debug_mode("default")
        try:
            yield
        finally:
            cuda.set_sync_debug_mode(previous)

    def check(self) -> None:
        """Nothing to check afterwards: a sync raised where it happened."""


@pytest.fixture
def torch_sync_guard(request: pytest.FixtureRequest) -> TorchSyncGuard:
    """Torch's sync debug mode set to "error" around the test body (restored after)."""
    return _register(request, TorchSyncGuard(_cuda_torch("torch_sync_guard")))


# --------------------------------------------------------------------------------------------
# The busy-GPU stall probe


class StallProbe:
    """``probe(fn)``: run `fn` while a `sleep_ms` kernel keeps the GPU busy; fail unless the host
    returned within `budget_ms` (`attempts` tries: a real stall fails every one, host noise one).
    Returns `fn`'s result. Warm `fn` up first: a first call may compile or allocate."""

    def __init__(self, torch: Any, *, budget_ms: float = 1.0, sleep_ms: float = 50.0, attempts: int = 3,
                 warmup: int = 1) -> None:
        self._torch = torch
        self.budget_ms, self.sleep_ms, self.attempts, self.warmup = budget_ms, sleep_ms, attempts, warmup

    def __call__(self, fn: Callable[[], Any], *, budget_ms: float | None = None, sleep_ms: float | None = None,
                 attempts: int | None = None, warmup: int | None = None) -> Any:
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self._torch.cuda.synchronize()
        return _testing.assert_no_host_stall(
            fn, budget_ms=self.budget_ms if budget_ms is None else budget_ms,
            sleep_ms=self.sleep_ms if sleep_ms is None else sleep_ms,
            attempts=self.attempts if attempts is None else attempts)

    def host_ms(self, fn: Callable[[], Any], *, sleep_ms: float | None = None) -> float:
        """The host time of one `fn` call while the GPU is busy (no budget: for reports)."""
        elapsed, _ = _testing.host_time_under_busy_gpu(fn, sleep_ms=self.sleep_ms if sleep_ms is None else sleep_ms)
        return elapsed


@pytest.fixture
def stall_probe() -> StallProbe:
    """A `StallProbe`: ``stall_probe(fn, budget_ms=1.0)`` fails if `fn` waited for the GPU."""
    return StallProbe(_cuda_torch("stall_probe"))


# --------------------------------------------------------------------------------------------
# The pageable-copy detector


@dataclasses.dataclass(frozen=True)
class PageableCopy:
    """One non_blocking host-to-device copy the host waits for: the call, why, and where."""

    call: str
    reason: str
    where: str

    def __str__(self) -> str:
        return f"{self.call} at {self.where}: {self.reason}"


def _dense(t: Any) -> bool:
    """Non-overlapping and dense: the copy engine can move the storage as one block."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _describe(t: Any) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def _caller() -> str:
    """The first frame outside torch and this module: the user's line that made the copy."""
    here = os.path.abspath(__file__)
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != here and f"{os.sep}torch{os.sep}" not in path:
            return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "<unknown>"


class PageableCopyDetector:
    """Records every ``non_blocking=True`` copy from host memory to a device whose source is not
    pinned or not dense (torch stages such a source through a pageable buffer, and the host
    waits), made through ``Tensor.to``, ``Tensor.cuda`` or ``Tensor.copy_`` while armed.

    `host_as_device`: count a copy onto the CPU as one onto a device. On by default where no CUDA
    device exists, so a builder tested with ``device="cpu"`` is checked for the same pattern it
    would run on a GPU (its source's `is_pinned()` is False there unless it was pinned).
    `calls` lists what was recorded; the test fails after its body unless `clear()` was called.
    Copies that attnsync makes through the CUDA runtime directly are not torch calls and are
    not seen: the stall probe covers every kind of wait.
    """

    _METHODS = ("to", "cuda", "copy_")

    def __init__(self, *, host_as_device: bool | None = None) -> None:
        self._torch = _torch_or_none()
        if self._torch is None:
            raise RuntimeError("PageableCopyDetector needs torch")
        if host_as_device is None:
            host_as_device = not self._torch.cuda.is_available()
        self.host_as_device = host_as_device
        self.calls: list[PageableCopy] = []
        self.watched = 0  # non_blocking host-to-device copies seen, good or bad
        self._paused = 0

    def _is_target(self, device: Any) -> bool:
        return device is not None and (device.type != "cpu" or self.host_as_device)

    def _record(self, call: str, reasons: list[str]) -> None:
        self.watched += 1
        if reasons:
            self.calls.append(PageableCopy(call, "; ".join(reasons), _caller()))

    def _source_reasons(self, src: Any) -> list[str]:
        reasons = []
        if not src.is_pinned():
            reasons.append("the source is pageable (not pinned): torch copies it through a staging "
                           "buffer and the host waits; pack into a pinned buffer (pin_memory=True) first")
        if not _dense(src):
            reasons.append(f"the source is not dense (strides {list(src.stride())}): torch first makes a "
                           f"contiguous copy in pageable memory; make it contiguous in pinned memory first")
        return reasons

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        torch = self._torch
        detector = self

        if name == "copy_":
            @functools.wraps(original)
            def copy_(dst: Any, src: Any, non_blocking: bool = False, **kwargs: Any) -> Any:
                if (non_blocking and not detector._paused and isinstance(src, torch.Tensor)
                        and src.device.type == "cpu" and detector._is_target(dst.device)):
                    reasons = detector._source_reasons(src)
                    if tuple(src.shape) != tuple(dst.shape):
                        reasons.append(f"the source {_describe(src)} is broadcast to {_describe(dst)}: torch "
                                       f"expands it into a pageable temporary first")
                    elif _dense(src) and not src.is_contiguous() and src.stride() != dst.stride():
                        reasons.append("the source's strides differ from the destination's: torch makes a "
                                       "contiguous pageable copy first")
                    detector._record(f"Tensor.copy_({_describe(src)} -> {dst.device}, non_blocking=True)", reasons)
                return original(dst, src, non_blocking, **kwargs)
            return copy_

        if name == "cuda":
            @functools.wraps(original)
            def cuda(self: Any, *args: Any, **kwargs: Any) -> Any:
                non_blocking = kwargs.get("non_blocking", args[1] if len(args) > 1 else False)
                if non_blocking and not detector._paused and self.device.type == "cpu":
                    detector._record(f"Tensor.cuda({_describe(self)}, non_blocking=True)",
                                     detector._source_reasons(self))
                return original(self, *args, **kwargs)
            return cuda

        @functools.wraps(original)
        def to(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not detector._paused and self.device.type == "cpu":
                try:
                    device, _dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
                except Exception:  # let torch report its own argument errors
                    device, non_blocking = None, False
                if non_blocking and detector._is_target(device):
                    reasons = detector._source_reasons(self)
                    if memory_format == torch.contiguous_format and not self.is_contiguous() and _dense(self):
                        reasons.append("memory_format=torch.contiguous_format on a non-contiguous source: torch "
                                       "makes a contiguous pageable copy first")
                    detector._record(f"Tensor.to({_describe(self)} -> {device}, non_blocking=True)", reasons)
            return original(self, *args, **kwargs)
        return to

    @contextlib.contextmanager
    def armed(self) -> Iterator[PageableCopyDetector]:
        tensor = self._torch.Tensor
        saved = {name: tensor.__dict__.get(name) for name in self._METHODS}
        for name in self._METHODS:
            setattr(tensor, name, self._wrap(name, getattr(tensor, name)))
        try:
            yield self
        finally:
            for name, value in saved.items():
                if value is None:  # inherited from torch's C base class: drop the override
                    delattr(tensor, name)
                else:
                    setattr(tensor, name, value)

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """Copies in this block are not recorded (set-up code that need not be sync-free)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def clear(self) -> list[PageableCopy]:
        """Forget (and return) what was recorded: for tests that expect a pageable copy."""
        calls, self.calls = self.calls, []
        return calls

    def check(self) -> None:
        if self.calls:
            lines = "\n".join(f"  {call}" for call in self.calls)
            pytest.fail(
                f"pageable_copy_detector: {len(self.calls)} non_blocking host-to-device cop"
                f"{'y' if len(self.calls) == 1 else 'ies'} from pageable or non-dense memory (each makes "
                f"the host wait for the GPU, without any warning from torch):\n{lines}", pytrace=False)


@pytest.fixture
def pageable_copy_detector(request: pytest.FixtureRequest) -> PageableCopyDetector:
    """A `PageableCopyDetector` armed around the test body; a recorded copy fails the test."""
    _import_or_skip("torch", "pageable_copy_detector watches torch's copies")
    return _register(request, PageableCopyDetector())


# --------------------------------------------------------------------------------------------
# JAX's transfer guard


class JaxTransferGuard:
    """``jax.transfer_guard("disallow")`` while armed: an implicit transfer raises.
    `allowed()` lifts it for a block."""

    def __init__(self, jax: Any) -> None:
        self._jax = jax

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        with self._jax.transfer_guard("disallow"):
            yield

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        with self._jax.transfer_guard("allow"):
            yield

    def check(self) -> None:
        """Nothing to check afterwards: a transfer raised where it happened."""


@pytest.fixture
def jax_transfer_guard(request: pytest.FixtureRequest) -> JaxTransferGuard:
    """``jax.transfer_guard("disallow")`` around the test body (CPU or GPU)."""
    return _register(request, JaxTransferGuard(_import_or_skip("jax", "jax_transfer_guard guards JAX")))


# --------------------------------------------------------------------------------------------
# The compile counter


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Shapes and dtypes of the arguments a trace saw (what a retrace was keyed on)."""
    parts = []
    for value in (*args, *kwargs.values()):
        shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
        if shape is not None and dtype is not None:
            parts.append(f"{str(dtype).replace('torch.', '')}{list(shape)}")
        else:
            parts.append(type(value).__name__)
    return "(" + ", ".join(parts) + ")"


class CompileCounter:
    """Counts traces of the functions it wraps.

    - ``f = counter.jit(fn, **jit_kwargs)``: ``jax.jit`` of `fn`; a trace is counted each time JAX
      traces it (a new shape, dtype, static value or pytree structure).
    - ``f = counter.torch_compile(fn, backend="eager", **kwargs)``: ``torch.compile`` of `fn`; each
      graph handed to the backend is counted (a recompile, or a graph break's extra graph).
    - ``counter.count(f)`` (one function) or ``counter.total``; ``with counter.frozen(): ...``
      fails if anything wrapped compiles again inside the block (after warm-up).
    """

    def __init__(self) -> None:
        self._traces: dict[str, list[str]] = {}  # key -> the signature of each trace
        self._keys: dict[int, tuple[Any, str]] = {}  # id(wrapped) -> (wrapped, key)

    def _key(self, fn: Callable[..., Any]) -> str:
        name = getattr(fn, "__qualname__", None) or repr(fn)
        key, n = name, 2
        while key in self._traces:
            key, n = f"{name}#{n}", n + 1
        self._traces[key] = []
        return key

    def jit(self, fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
        jax = _import_or_skip("jax", "compile_counter.jit wraps jax.jit")
        key = self._key(fn)

        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            self._traces[key].append(_signature(args, kwargs))  # runs only while JAX traces
            return fn(*args, **kwargs)

        wrapped: Callable[..., Any] = jax.jit(traced, **jit_kwargs)
        self._name_of(wrapped, key)
        return wrapped

    def torch_compile(self, fn: Callable[..., Any], *, backend: Any = "eager", **compile_kwargs: Any) -> Callable[..., Any]:
        torch = _import_or_skip("torch", "compile_counter.torch_compile wraps torch.compile")
        key = self._key(fn)
        inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

        def counting(graph: Any, example_inputs: list[Any]) -> Any:
            self._traces[key].append(_signature(tuple(example_inputs), {}))
            return inner(graph, example_inputs)

        wrapped: Callable[..., Any] = torch.compile(fn, backend=counting, **compile_kwargs)
        self._name_of(wrapped, key)
        return wrapped

    def _name_of(self, wrapped: Any, key: str) -> None:
        self._keys[id(wrapped)] = (wrapped, key)

    def count(self, wrapped: Callable[..., Any]) -> int:
        """Traces of one function this counter wrapped."""
        entry = self._keys.get(id(wrapped))
        if entry is None or entry[0] is not wrapped:
            raise KeyError(f"compile_counter.count: {wrapped!r} was not wrapped by this counter "
                           f"(use compile_counter.jit or compile_counter.torch_compile)")
        return len(self._traces[entry[1]])

    @property
    def total(self) -> int:
        return sum(len(v) for v in self._traces.values())

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Fail if a wrapped function traces again inside the block."""
        before = {key: len(v) for key, v in self._traces.items()}
        yield
        new = {key: v[before.get(key, 0):] for key, v in self._traces.items() if len(v) > before.get(key, 0)}
        if new:
            lines = "\n".join(f"  {key}: {len(sigs)} more, with {', '.join(dict.fromkeys(sigs))}"
                              for key, sigs in new.items())
            raise AssertionError(f"compile_counter: traced again after warm-up (each trace is a compile):\n{lines}")

    def armed(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def check(self) -> None:
        """Nothing to check afterwards: assertions are the test's (`count`, `frozen`)."""


@pytest.fixture
def compile_counter() -> CompileCounter:
    """A `CompileCounter`: wrap functions with `.jit` / `.torch_compile`, then assert on counts."""
    return CompileCounter()
