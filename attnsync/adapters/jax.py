"""Lower attnsync host metadata to JAX int32 arrays: DLPack on GPU, one device_put on CPU.

Importing this module imports jax: that import is the user's choice of framework.

`lower(md)` returns a pytree-registered frozen dataclass: the device fields of `md` are its
data leaves (int32 JAX arrays), its host scalars are static meta fields (part of a jit cache
key), host-only arrays stay in `md`. Two paths, both one host-to-device copy in total:

- a GPU device with torch installed: the torch adapter stages an all-int32 packed buffer
  (pinned ring, one non_blocking copy) and each field is imported with
  `jax.dlpack.from_dlpack` (zero-copy; every field starts on a 64-byte boundary, and JAX on
  GPU needs 16, reference A2). The JAX arrays alias torch memory: never donate them.
- otherwise: the fields are packed into one fresh int32 numpy buffer, moved with one
  `jax.device_put` and split by one jitted function (static slices, cached per layout). A
  fresh buffer per call, because `device_put` on CPU aliases aligned numpy memory
  (reference B2) and a reused buffer would rewrite earlier results.

Everything runs under `jax.transfer_guard("disallow")`: the only transfers are explicit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._spec import array_fields, scalar_fields
from .._staging import PackedLayout, pack, plan_layout
from .._validate import INT32_MAX, INT32_MIN, SpecError

JAX_DTYPE = np.int32  # JAX gets int32 only: with x64 off it silently wraps wider values (A3)
# The one exception: float32 fields (tree attention's additive bias) stay float32. They ride
# in the int32 packed buffer as a bitcast view (same bits, no conversion: -inf survives) and
# are bitcast back after the split or the DLPack import.
_BITCAST_FLOAT = np.float32


@functools.lru_cache(maxsize=None)
def _lowered_class(md_class: type) -> tuple[type, tuple[str, ...], tuple[str, ...]]:
    data = tuple(f.name for f in array_fields(md_class) if f.metadata["place"] in ("device", "both"))
    meta = tuple(f.name for f in scalar_fields(md_class))
    cls = dataclasses.make_dataclass(
        "Jax" + md_class.__name__,
        [(name, "jax.Array") for name in data] + [(name, "int") for name in meta],
        frozen=True,
        kw_only=True,
        eq=False,
        namespace={
            "__doc__": f"JAX lowering of `{md_class.__name__}`: int32 arrays as pytree data, "
            "host scalars as static meta fields.",
        },
    )
    jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
    return cls, data, meta


def _int32_fields(md: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The device fields of `md` as int32, refusing values that would wrap (never let JAX)."""
    out = {}
    for name in names:
        value = np.asarray(getattr(md, name))
        if value.dtype.kind == "b":
            value = value.astype(np.int32)
        elif value.dtype == _BITCAST_FLOAT:
            value = np.ascontiguousarray(value).view(np.int32)
        elif value.dtype != np.int32:
            if value.size and (int(value.max()) > INT32_MAX or int(value.min()) < INT32_MIN):
                bad = int(value.max()) if int(value.max()) > INT32_MAX else int(value.min())
                raise SpecError(
                    f"{name}: value {bad} does not fit int32, and JAX (x64 off) would silently wrap "
                    f"it. Fix: keep every count, page id and slot id below 2**31."
                )
            value = value.astype(np.int32)
        out[name] = value
    return out


@functools.lru_cache(maxsize=256)
def _layout(fields: tuple[tuple[str, tuple[int, ...]], ...]) -> PackedLayout:
    return plan_layout([(name, shape, JAX_DTYPE) for name, shape in fields])


@functools.lru_cache(maxsize=256)
def _splitter(layout: PackedLayout, floats: frozenset[str] = frozenset()):
    """One jitted function splitting a packed int32 buffer into every field (static slices);
    the fields named in `floats` are bitcast back to float32."""

    def split(buffer: jax.Array) -> tuple[jax.Array, ...]:
        parts = [buffer[e.offset // 4 : e.offset // 4 + e.nbytes // 4].reshape(e.shape) for e in layout.entries]
        return tuple(
            jax.lax.bitcast_convert_type(part, jnp.float32) if e.name in floats else part
            for e, part in zip(layout.entries, parts, strict=True)
        )

    return jax.jit(split)


def _torch_device_for(device: Any):
    """The torch CUDA device of a JAX GPU device, or None when DLPack staging does not apply."""
    if device.platform not in ("gpu", "cuda"):
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", device.local_hardware_id if device.local_hardware_id is not None else device.id)


def lower(md: Any, device: Any = None, *, stager: Any = None) -> Any:
    """Lower host metadata `md` (from `attnsync.build`) to int32 JAX arrays on `device`.

    Args:
        md: a metadata dataclass from `attnsync.build`.
        device: a `jax.Device` (default: `jax.devices()[0]`). Arrays are committed to it, so
            warm jitted consumers up with arrays from this function (reference A7).
        stager: on GPU, an optional `attnsync.adapters.torch.Stager` for the torch staging
            (persistent addresses, or a stager per bucket).

    Returns:
        A frozen pytree dataclass `Jax<MetadataClass>`: device fields as int32 arrays (data;
        float32 fields, such as the tree bias, stay float32 bit for bit), host ints as static
        meta fields.
    """
    if not dataclasses.is_dataclass(md) or isinstance(md, type) or not array_fields(md):
        raise TypeError(f"lower: expected metadata from attnsync.build(...), received {type(md).__name__}.")
    if getattr(md, "slot_mapping_exact", True) is False:
        raise SpecError(
            "slot_mapping: the batch has inexact rows (seq_lens_exact=False), so the host does not "
            "know where their new tokens go. Fix: lower an exact batch to JAX (exact device "
            "lengths are supported by the torch adapter's seq_lens= option)."
        )
    device = device if device is not None else jax.devices()[0]
    if not isinstance(device, jax.Device):
        raise TypeError(f"device: expected a jax.Device (e.g. jax.devices()[0]), received {device!r}.")
    cls, data_names, meta_names = _lowered_class(type(md))
    floats = frozenset(name for name in data_names if getattr(md, name).dtype == _BITCAST_FLOAT)
    arrays = _int32_fields(md, data_names)
    layout = _layout(tuple((name, arrays[name].shape) for name in data_names))
    torch_device = _torch_device_for(device)
    if torch_device is not None:
        from . import torch as torch_adapter

        torch_stager = stager if stager is not None else torch_adapter.default_stager(torch_device)
        buffer = torch_stager.stage(layout, arrays)
        leaves = {}
        for e in layout.entries:
            view = buffer[e.offset : e.offset + e.nbytes].view(torch_adapter.TORCH_DTYPES["int32"]).view(e.shape)
            if e.name in floats:
                view = view.view(torch_adapter.TORCH_DTYPES["float32"])  # bitcast, zero-copy
            assert view.data_ptr() % 16 == 0, "JAX on GPU needs 16-byte aligned buffers"
            leaves[e.name] = jax.dlpack.from_dlpack(view)
    else:
        host = np.empty(layout.nbytes, dtype=np.uint8)
        pack(layout, arrays, host)
        packed = jax.device_put(host.view(np.int32), device)
        leaves = dict(zip(data_names, _splitter(layout, floats)(packed), strict=True))
    return cls(**leaves, **{name: getattr(md, name) for name in meta_names})


def zeros_like_lowered(lowered: Any) -> Any:
    """A lowered object of the same class with zero arrays (for warm-up shapes in tests)."""
    return jax.tree_util.tree_map(jnp.zeros_like, lowered)
