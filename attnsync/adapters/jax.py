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

Two variants, by keyword: `bucket=` (fixed shapes and a static part that is the same for
every step of a bucket, so jitted consumers compile once per bucket; per-step counts become
0-d data leaves) and `sharding=` (the metadata replicated over a mesh, one copy per device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._buckets import Bucket, scalar_roles
from .._spec import array_fields, check_lowerable, scalar_fields
from .._staging import PackedLayout, pack, plan_layout
from .._validate import INT32_MAX, INT32_MIN, SpecError

JAX_DTYPE = np.int32  # JAX gets int32 only: with x64 off it silently wraps wider values (A3)
# The one exception: float32 fields (tree attention's additive bias) stay float32. They ride
# in the int32 packed buffer as a bitcast view (same bits, no conversion: -inf survives) and
# are bitcast back after the split or the DLPack import.
_BITCAST_FLOAT = np.float32
# Name of the packed int32 vector that carries a bucketed lowering's per-step scalars.
_STEP_VALUES = "_step_values"


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


@functools.lru_cache(maxsize=None)
def _bucketed_class(md_class: type) -> tuple[type, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The bucketed pytree class of `md_class`: (class, array names, step names, meta names).

    Data leaves: the device arrays, then every per-step host scalar as a 0-d int32 array.
    Meta (static) fields: the bucket's bounds and the build options, equal for every step of
    a bucket, so a jitted consumer compiles once per bucket.
    """
    arrays = tuple(f.name for f in array_fields(md_class) if f.metadata["place"] in ("device", "both"))
    bound, step, static = scalar_roles(md_class)
    meta = bound + static
    cls = dataclasses.make_dataclass(
        "JaxBucketed" + md_class.__name__,
        [(name, "jax.Array") for name in arrays + step] + [(name, "int") for name in meta],
        frozen=True,
        kw_only=True,
        eq=False,
        namespace={
            "__doc__": f"Bucketed JAX lowering of `{md_class.__name__}`: int32 arrays and the "
            f"per-step counts {list(step)} (0-d int32 arrays) as pytree data; the bucket's bounds "
            f"{list(bound)} and the build options as static meta fields.",
        },
    )
    jax.tree_util.register_dataclass(cls, data_fields=[*arrays, *step], meta_fields=list(meta))
    return cls, arrays, step, meta


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
    the fields named in `floats` are bitcast back to float32, and the per-step vector
    `_STEP_VALUES` (a bucketed lowering's scalars) comes out as one 0-d array per value, after
    the other fields."""

    def split(buffer: jax.Array) -> tuple[jax.Array, ...]:
        parts = [buffer[e.offset // 4 : e.offset // 4 + e.nbytes // 4].reshape(e.shape) for e in layout.entries]
        out, scalars = [], []
        for e, part in zip(layout.entries, parts, strict=True):
            if e.name == _STEP_VALUES:
                scalars = [part[i] for i in range(e.shape[0])]
            else:
                out.append(jax.lax.bitcast_convert_type(part, jnp.float32) if e.name in floats else part)
        return (*out, *scalars)

    return jax.jit(split)


@functools.lru_cache(maxsize=64)
def _unstacker(count: int):
    """A jitted function turning an int32 [count] vector into `count` 0-d arrays."""
    return jax.jit(lambda vector: tuple(vector[i] for i in range(count)))


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


def lower(
    md: Any,
    device: Any = None,
    *,
    stager: Any = None,
    bucket: Bucket | None = None,
    sharding: Any = None,
    alias: bool = True,
) -> Any:
    """Lower host metadata `md` (from `attnsync.build`) to int32 JAX arrays on `device`.

    Args:
        md: a metadata dataclass from `attnsync.build`.
        device: a `jax.Device` (default: `jax.devices()[0]`). Arrays are committed to it, so
            warm jitted consumers up with arrays from this function (reference A7).
        stager: on GPU, an optional `attnsync.adapters.torch.Stager` for the torch staging
            (persistent addresses, or a stager per bucket).
        bucket: a `Bucket` of an `attnsync._buckets.BucketLadder`; `md` must be built from
            `ladder.pad(batch, bucket)`. The lowering then has a static part that is the same
            for every step of the bucket: the bucket's bounds replace `num_reqs`,
            `num_actual_tokens`, `max_query_len` and `max_seq_len` (`Bucket.bound`), and the
            per-step counts and flags (`num_decodes`, `all_exact`, ...; see
            `attnsync._buckets.STEP_SCALARS`) become 0-d int32 data leaves. A jitted consumer
            of the pytree compiles once per bucket. Use the per-step values inside jit as
            values only (masks, `jnp.where`), never as shapes.
        sharding: a fully replicated `jax.sharding.Sharding` (for example
            `NamedSharding(mesh, PartitionSpec())`) instead of `device`: the metadata of a
            tensor-parallel server, the same on every device of the mesh. One host-to-device
            copy per device: on GPUs one torch staging and one DLPack import per device, then
            `jax.make_array_from_single_device_arrays`; elsewhere one `jax.device_put`.
        alias: on a GPU (DLPack from the torch staging), True (default) imports every field
            as its own zero-copy view of the staged buffer, one DLPack import per field.
            False imports the staged buffer once and splits it with one jitted function
            (device-to-device copies on the GPU, no sync, still one H2D copy): arrays that own
            their memory, so they may be donated and no later staging into the same memory
            (a persistent stager) can change them. Host time is about the same either way
            (703 against 731 us for 256 requests on an H100 host:
            results/2026-11-27-h100/run12-bench-common-quick.json). Elsewhere the fields are
            always split from one `jax.device_put`, and `alias` changes nothing.

    Returns:
        A frozen pytree dataclass `Jax<MetadataClass>` (with `bucket`:
        `JaxBucketed<MetadataClass>`): device fields as int32 arrays (data; float32 fields,
        such as the tree bias, stay float32 bit for bit), host ints as static meta fields.

    Example:
        >>> import attnsync, jax
        >>> md = attnsync.build(attnsync.Batch(query_lens=[1, 2], seq_lens=[9, 2],
        ...                                    block_table=[[3], [4]], block_size=16))
        >>> jmd = lower(md, jax.devices("cpu")[0])
        >>> jmd.slot_mapping.tolist(), jmd.max_seq_len
        ([56, 64, 65], 9)
    """
    if not dataclasses.is_dataclass(md) or isinstance(md, type) or not array_fields(md):
        raise TypeError(f"lower: expected metadata from attnsync.build(...), received {type(md).__name__}.")
    if not isinstance(alias, bool):
        raise TypeError(f"alias: expected True or False, received {alias!r}.")
    check_lowerable(md)  # fields edited by hand (dataclasses.replace) are refused, naming the field
    if getattr(md, "slot_mapping_exact", True) is False:
        raise SpecError(
            "slot_mapping: the batch has inexact rows (seq_lens_exact=False), so the host does not "
            "know where their new tokens go. Fix: lower an exact batch to JAX (exact device "
            "lengths are supported by the torch adapter's seq_lens= option)."
        )
    if bucket is not None:
        if not isinstance(bucket, Bucket):
            raise TypeError(f"bucket: expected a Bucket from BucketLadder.bucket_for, received {bucket!r}.")
        md = bucket.bound(md)  # refuses metadata of other shapes before any transfer
    if sharding is not None:
        if device is not None or stager is not None:
            raise SpecError(
                "sharding: pass either device= (and stager=) or sharding=, not both; with a "
                "sharding every device of the mesh gets its own staging."
            )
        if not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(f"sharding: expected a jax.sharding.Sharding, received {sharding!r}.")
        if not sharding.is_fully_replicated:
            raise SpecError(
                f"sharding: metadata is replicated, every device reads all of it; received "
                f"{sharding}. Fix: NamedSharding(mesh, PartitionSpec()) (an empty spec)."
            )
    else:
        device = device if device is not None else jax.devices()[0]
        if not isinstance(device, jax.Device):
            raise TypeError(f"device: expected a jax.Device (e.g. jax.devices()[0]), received {device!r}.")
    if bucket is None:
        cls, data_names, meta_names = _lowered_class(type(md))
        step_names: tuple[str, ...] = ()
    else:
        cls, data_names, step_names, meta_names = _bucketed_class(type(md))
    floats = frozenset(name for name in data_names if getattr(md, name).dtype == _BITCAST_FLOAT)
    arrays = _int32_fields(md, data_names)
    fields = [(name, arrays[name].shape) for name in data_names]
    if step_names:
        arrays[_STEP_VALUES] = _step_vector(md, step_names)
        fields.append((_STEP_VALUES, (len(step_names),)))
    layout = _layout(tuple(fields))
    if sharding is None:
        leaves = _to_device(layout, arrays, floats, device, stager, alias=alias)
    else:
        leaves = _to_sharding(layout, arrays, floats, sharding)
    values = dict(zip(data_names + step_names, leaves, strict=True))
    return cls(**values, **{name: getattr(md, name) for name in meta_names})


def _step_vector(md: Any, names: tuple[str, ...]) -> np.ndarray:
    """The per-step host scalars of `md` as one int32 vector (bools as 0/1)."""
    values = []
    for name in names:
        value = getattr(md, name)
        if not isinstance(value, int | np.integer):  # bool is an int
            raise TypeError(f"{name}: a per-step scalar must be an int or bool, received {value!r}.")
        if not INT32_MIN <= int(value) <= INT32_MAX:
            raise SpecError(f"{name}: value {int(value)} does not fit int32, and JAX would wrap it.")
        values.append(int(value))
    return np.array(values, dtype=np.int32)


def _to_device(
    layout: PackedLayout, arrays: dict[str, np.ndarray], floats: frozenset[str], device: Any, stager: Any,
    *, alias: bool = True,
) -> tuple[jax.Array, ...]:
    """Every field on one device, in layout order, per-step scalars (if any) last."""
    torch_device = _torch_device_for(device)
    if torch_device is None:
        host = np.empty(layout.nbytes, dtype=np.uint8)
        pack(layout, arrays, host)
        packed = jax.device_put(host.view(np.int32), device)
        return _splitter(layout, floats)(packed)
    from . import torch as torch_adapter

    torch_stager = stager if stager is not None else torch_adapter.default_stager(torch_device)
    buffer = torch_stager.stage(layout, arrays)
    int32 = torch_adapter.TORCH_DTYPES["int32"]
    if not alias:  # one import of the whole staging, one jitted split (device copies)
        with _exporting_from(torch_device):
            packed = jax.dlpack.from_dlpack(buffer[: layout.nbytes].view(int32))
        return _splitter(layout, floats)(packed)
    leaves, scalars = [], ()
    with _exporting_from(torch_device):
        for e in layout.entries:
            view = buffer[e.offset : e.offset + e.nbytes].view(int32).view(e.shape)
            if e.name in floats:
                view = view.view(torch_adapter.TORCH_DTYPES["float32"])  # bitcast, zero-copy
            assert view.data_ptr() % 16 == 0, "JAX on GPU needs 16-byte aligned buffers"
            if e.name == _STEP_VALUES:
                # One import and one small jitted split, rather than one import per scalar.
                scalars = _unstacker(e.shape[0])(jax.dlpack.from_dlpack(view))
            else:
                leaves.append(jax.dlpack.from_dlpack(view))
    return (*leaves, *scalars)


def _exporting_from(torch_device: Any) -> Any:
    """A context in which torch's current CUDA device is `torch_device`, for DLPack exports.

    torch exports a CUDA tensor over DLPack only while its device is the current one (else
    `BufferError: Can't export tensors on a different CUDA device index`), and the current
    device is not always what the caller set: on the two-GPU H100 host (results/2026-11-27-h100,
    run 5) torch's current device read 1 in processes where JAX had initialised both GPUs.
    Entering the device costs a few microseconds, so only when it differs.
    """
    import torch

    if torch.cuda.current_device() == torch_device.index:
        return contextlib.nullcontext()
    return torch.cuda.device(torch_device)


def _to_sharding(
    layout: PackedLayout, arrays: dict[str, np.ndarray], floats: frozenset[str], sharding: Any
) -> tuple[jax.Array, ...]:
    """Every field replicated over `sharding`: one copy per device, then one jitted split."""
    devices = sorted(sharding.addressable_devices, key=lambda d: d.id)
    torch_devices = [_torch_device_for(d) for d in devices]
    if all(t is not None for t in torch_devices):
        from . import torch as torch_adapter

        int32 = torch_adapter.TORCH_DTYPES["int32"]
        parts = []
        for jax_device, torch_device in zip(devices, torch_devices, strict=True):
            buffer = torch_adapter.default_stager(torch_device).stage(layout, arrays)
            with _exporting_from(torch_device):
                part = jax.dlpack.from_dlpack(buffer[: layout.nbytes].view(int32))
            if part.devices() != {jax_device}:
                raise SpecError(
                    f"sharding: torch's {torch_device} imported as JAX {part.devices()}, not "
                    f"{jax_device}. Fix: make torch and JAX number the GPUs alike (same "
                    f"CUDA_VISIBLE_DEVICES)."
                )
            parts.append(part)
        packed = jax.make_array_from_single_device_arrays((layout.nbytes // 4,), sharding, parts)
    else:
        host = np.empty(layout.nbytes, dtype=np.uint8)
        pack(layout, arrays, host)
        packed = jax.device_put(host.view(np.int32), sharding)
    return _splitter(layout, floats)(packed)


def zeros_like_lowered(lowered: Any) -> Any:
    """A lowered object of the same class with zero arrays (for warm-up shapes in tests)."""
    return jax.tree_util.tree_map(jnp.zeros_like, lowered)
