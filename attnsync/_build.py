"""`attnsync.build`: the one entry point from a batch to a backend's host metadata."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, overload

from ._batch import Batch
from ._validate import SpecError
from .backends import BACKENDS, backend_module, missing_options_error

if TYPE_CHECKING:  # (at run time a backend's module is imported the first time it is built)
    from ._spec import CommonMetadata
    from .backends.flashinfer import FlashInferMetadata
    from .backends.flex import FlexMetadata
    from .backends.mamba import MambaMetadata
    from .backends.tree import TreeMetadata
    from .backends.triton import TritonMetadata
    from .backends.turboquant import TurboQuantMetadata


# The metadata class each backend name builds, for type checkers; a name only known at run
# time (a `str`) gives `Any`.
@overload
def build(batch: Batch, /, backend: Literal["common"] = "common", **options: Any) -> CommonMetadata: ...
@overload
def build(batch: Batch, /, backend: Literal["flashinfer"], **options: Any) -> FlashInferMetadata: ...
@overload
def build(batch: Batch, /, backend: Literal["flex"], **options: Any) -> FlexMetadata: ...
@overload
def build(batch: Batch, /, backend: Literal["mamba"], **options: Any) -> MambaMetadata: ...
@overload
def build(batch: Batch, /, backend: Literal["tree"], **options: Any) -> TreeMetadata: ...
@overload
def build(batch: Batch, /, backend: Literal["triton"], **options: Any) -> TritonMetadata: ...
@overload
def build(batch: Batch, /, backend: Literal["turboquant"], **options: Any) -> TurboQuantMetadata: ...
@overload
def build(batch: Batch, /, backend: str, **options: Any) -> Any: ...


def build(batch: Batch, /, backend: str = "common", **options: Any) -> Any:
    """Build `backend`'s metadata for `batch` on the host (numpy only; the "plan" phase).

    Never touches a device and never imports a framework. The result is a frozen dataclass
    of read-only numpy arrays and host scalars, lowered to a framework by
    `attnsync.adapters.torch.lower` or `attnsync.adapters.jax.lower`.

    Args:
        batch: the validated step description.
        backend: one of `attnsync.available_backends()`.
        **options: keyword options of that backend (its module docstring lists them).

    Example:
        >>> import attnsync
        >>> batch = attnsync.Batch(query_lens=[1, 3], seq_lens=[17, 3], block_table=[[4, 9], [2, 0]],
        ...                        block_size=16)
        >>> md = attnsync.build(batch)
        >>> md.query_start_loc.tolist(), md.max_seq_len, md.num_decodes
        ([0, 1, 4], 17, 1)
    """
    if not isinstance(batch, Batch):
        raise TypeError(
            f"build: expected an attnsync.Batch as the first argument, received "
            f"{type(batch).__name__}. Fix: attnsync.build(attnsync.Batch(...), backend=...)."
        )
    try:
        path, builder, accepted, required = _DISPATCH[backend]
        if BACKENDS.get(backend) != path:  # the registry changed since (tests register backends)
            raise KeyError(backend)
    except (KeyError, TypeError):  # first use (imports the module), or not a backend name
        module = backend_module(backend)
        path, builder, accepted, required = _DISPATCH[backend] = (
            BACKENDS[backend], module.build, _options_of(module.build), _required_of(module.build))
    if options and not accepted.issuperset(options):
        unknown = sorted(set(options) - accepted)
        raise SpecError(
            f"build: backend {backend!r} has no option(s) {unknown}; its options are {sorted(accepted)}."
        )
    if required and not required.issubset(options):  # (Python's own message names no backend)
        raise missing_options_error(backend, [name for name in sorted(required) if name not in options])
    return builder(batch, **options)


# backend name -> (its build function, its option names): `importlib.import_module` costs
# microseconds a step even for a module already imported.
_DISPATCH: dict[str, tuple[str, Callable[..., Any], frozenset[str], frozenset[str]]] = {}


@functools.cache
def _options_of(builder: Any) -> frozenset[str]:
    """Keyword-only option names of a backend's `build` (cached: inspect is slow per step)."""
    return frozenset(
        p.name for p in inspect.signature(builder).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    )


@functools.cache
def _required_of(builder: Any) -> frozenset[str]:
    """Keyword-only option names of a backend's `build` that have no default."""
    return frozenset(
        p.name for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    )
