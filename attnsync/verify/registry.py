"""Per-backend knowledge of `attnsync verify`, one `BackendCheck` record per backend.

Everything the generic modules need to know about a backend lives in its record: how the
corpus batch is prepared for it, its build options, the refusals it documents, its
brute-force oracle, which fields a torch lowering recomputes on the device, its torch lowering
and its kernel consumer. The records of the shipped backends are in `attnsync.verify.backends`
(one module each); a new backend adds one module there, or calls `register` itself.

A backend of `attnsync.backends.BACKENDS` without a record is still verified with the generic
checks: the fields every backend shares against the oracle, the lowering, the device columns;
its kernel column is skipped ("no consumer wired").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from .. import Batch, SpecError

__all__ = ["DEFAULT_DEVICE_RECOMPUTED", "KERNELS", "REGISTRY", "BackendCheck", "backend_check", "register",
           "unregister"]

# Fields the torch adapter recomputes on the device from exact device lengths (every backend).
DEFAULT_DEVICE_RECOMPUTED = ("seq_lens", "slot_mapping")


@dataclasses.dataclass(frozen=True)
class BackendCheck:
    """What `attnsync verify` needs to know about one backend.

    Attributes:
        name: the backend's name in `attnsync.backends.BACKENDS`.
        options: build options for every corpus batch (recorded in the report's config).
        batch_options: `f(batch) -> dict` of options that depend on the batch, added to `options`.
        prepare: `f(batch) -> batch` putting a corpus batch (ordered for decode threshold 1) in
            the order the backend's builder needs; None: used as it comes.
        build_refusal: `f(batch, options) -> str | None`: why the backend documents refusing
            the batch (a skip), or None when a refusal is a failure.
        oracle: `f(batch, md) -> {field: expected value}` computed row by row in plain Python;
            None: the fields every backend shares (`attnsync.verify.oracles.shared_fields`).
        device_recomputed: fields a torch lowering with exact device lengths recomputes on the
            device; they are compared with the exact twin batch's metadata.
        scalar_overrides: lowered scalars that differ from the host metadata after a lowering
            with exact device lengths, with their expected values.
        device_built: `f(md) -> {field: host builder's value}` for fields the torch lowering
            builds on the device that the host metadata leaves empty.
        torch_lower: `f(md, device, *, seq_lens=None)` lowering to torch; None: the torch
            adapter's `lower`.
        kernel: `f(case, framework, lowered) -> (relative error, tolerance)`: the backend's
            consumer against its float64 reference; raises `Skip` where it cannot run.
        fake_paths: `f(case) -> [(name, fn, inputs, expected or None)]`: the backend's own
            device-side torch code for the fake-tensor column (besides the slot-mapping
            recompute every backend with a slot mapping has); raising `Skip` says why it has
            none for this case.
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batch_options: Callable[[Batch], dict[str, Any]] | None = None
    prepare: Callable[[Batch], Batch] | None = None
    build_refusal: Callable[[Batch, dict[str, Any]], str | None] | None = None
    oracle: Callable[[Batch, Any], dict[str, Any]] | None = None
    device_recomputed: tuple[str, ...] = DEFAULT_DEVICE_RECOMPUTED
    scalar_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    device_built: Callable[[Any], dict[str, Any]] | None = None
    torch_lower: Callable[..., Any] | None = None
    kernel: Callable[[Any, Any, Any], tuple[float, float]] | None = None
    fake_paths: Callable[[Any], list[tuple[str, Callable[..., Any], dict[str, Any], Any]]] | None = None


# backend name -> its record, in registration order
REGISTRY: dict[str, BackendCheck] = {}


def register(check: BackendCheck, *, replace: bool = False) -> BackendCheck:
    """Add `check` to the registry (a second record of a name needs ``replace=True``)."""
    if not isinstance(check, BackendCheck):
        raise TypeError(f"register: expected a BackendCheck, received {type(check).__name__}.")
    if check.name in REGISTRY and not replace:
        raise SpecError(f"register: backend {check.name!r} already has a verify record; pass replace=True "
                        "to replace it.")
    REGISTRY[check.name] = check
    return check


def unregister(name: str) -> BackendCheck:
    """Remove and return the record of `name`."""
    try:
        return REGISTRY.pop(name)
    except KeyError:
        raise SpecError(f"unregister: backend {name!r} has no verify record; registered: {list(REGISTRY)}.") from None


def backend_check(name: str) -> BackendCheck:
    """The record of backend `name`, or the generic one when it registered none."""
    return REGISTRY.get(name) or BackendCheck(name)


class _Kernels(MutableMapping):
    """backend -> kernel consumer, read from and written to the registry's records.

    Setting an item replaces the backend's record with one holding the new consumer (tests
    swap a consumer this way); the record stays the only place the consumer lives.
    """

    def __getitem__(self, name: str) -> Callable[[Any, Any, Any], tuple[float, float]]:
        kernel = REGISTRY[name].kernel
        if kernel is None:
            raise KeyError(name)
        return kernel

    def __setitem__(self, name: str, kernel: Callable[[Any, Any, Any], tuple[float, float]]) -> None:
        REGISTRY[name] = dataclasses.replace(backend_check(name), kernel=kernel)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        REGISTRY[name] = dataclasses.replace(REGISTRY[name], kernel=None)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, check in REGISTRY.items() if check.kernel is not None])

    def __len__(self) -> int:
        return sum(check.kernel is not None for check in REGISTRY.values())


KERNELS: MutableMapping[str, Callable[[Any, Any, Any], tuple[float, float]]] = _Kernels()
