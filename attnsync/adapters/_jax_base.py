"""The base class of every JAX lowering (`attnsync.adapters.jax.JaxLowering`).

Its own module so that the declared lowering classes (`_jax_lowered`) can subclass it while the
adapter imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from .jax import Layout

__all__ = ["JaxLowering"]

_setattr = object.__setattr__


class JaxLowering:
    """Base of every JAX lowering (`lower`'s result): one packed vector (`packed`, the only
    pytree leaf) and its static `Layout`; `isinstance(jmd, JaxLowering)`."""

    __slots__ = ("_cache", "layout", "packed")
    packed: Any
    layout: Layout
    _cache: dict[str, Any] | None
    _data_names: tuple[str, ...] = ()
    _static_names: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: lower new metadata instead of setting {name!r}.")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: {name!r} cannot be deleted.")

    def _data(self, name: str) -> Any:
        cache = self._cache
        if cache is not None:
            return cache[name]
        packed, fields = self.packed, self.layout.fields
        if isinstance(packed, jax.core.Tracer):
            return fields.take(packed, name)  # inside a trace: a static slice, nothing kept
        if isinstance(packed, np.ndarray):
            return fields.take_numpy(packed, name)  # `unpack` of a host vector: numpy views
        if packed.is_deleted():
            raise RuntimeError(
                f"{name}: this lowering's packed vector was donated (or deleted) before the field was "
                f"read. Fix: read the fields needed outside jit before donating the lowering, or do "
                f"not donate a lowering that is read later."
            )
        parts = fields.split(packed)
        out = dict(zip(fields.names, parts, strict=True))
        # Inside some other trace (a lowering closed over by a jitted function) the parts are
        # tracers: keeping them would leak them past their trace.
        if not parts or not isinstance(parts[0], jax.core.Tracer):
            _setattr(self, "_cache", out)
        return out[name]

    def __repr__(self) -> str:
        packed = self.packed
        where = ""
        if isinstance(packed, jax.Array) and not isinstance(packed, jax.core.Tracer):
            where = " on " + ", ".join(sorted(str(d) for d in packed.devices()))
        scalars = ", ".join(f"{k}={v!r}" for k, v in self.layout.scalars.items())
        return f"{type(self).__name__}(packed=int32[{self.layout.size}]{where}; {scalars})"
