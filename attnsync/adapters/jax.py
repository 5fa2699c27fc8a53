"""Lower attnsync host metadata to JAX: one packed int32 vector, one `jax.device_put` per device.

Importing this module imports jax (the user's choice of framework) and nothing else: no torch,
on any platform.

What a lowering is. `lower(md, device)` packs every device field of `md` into one fresh int32
numpy vector, moves it with one `jax.device_put`, and returns a pytree `Jax<MetadataClass>`
whose only data leaf is that device vector (`jmd.packed`). Everything else is static aux data,
the `Layout`: where each field lies in the vector (offset, shape, dtype) and the host scalars
(plain Python ints, bools, tuples, as `attnsync.build` made them). A field is read as an
attribute, with the name and values of the numpy metadata:

- inside a jitted function, `jmd.slot_mapping` is a static slice and reshape of the traced
  vector (a bitcast back to float32 for float32 fields, such as the tree bias): XLA fuses it
  into its consumer, so the fields cost nothing there;
- outside jit, the first field read splits the vector once with one cached jitted function and
  keeps every field on the object (later reads are attribute lookups).

Bool fields arrive as int32 0/1 (JAX gets int32 only: with x64 off it would silently wrap wider
values, so an integer field whose values do not fit int32 is refused, never narrowed with loss).

The zero-dispatch form. `pack(md) -> (vector, layout)` does the host half only, and
`unpack(vector, layout)`, called inside the user's jitted step, makes the same object around the
traced vector. Passing the numpy vector as a jit argument lets its transfer ride in the step's
own dispatch (no separate `device_put`); JAX counts that transfer as implicit, so under
`jax.transfer_guard("disallow")` wrap that call in `jax.transfer_guard_host_to_device("allow")`.
`layout` is hashable: make it a static argument (`static_argnames`).

Buckets. With `bucket=` (`attnsync._buckets.BucketLadder`) every step of a bucket has the same
shapes and the same static part: the bucket's bounds replace `num_reqs`, `num_actual_tokens`,
`max_query_len` and `max_seq_len`, and the per-step counts and flags (`num_decodes`,
`all_exact`, ...; `attnsync._buckets.STEP_SCALARS`) ride in the packed vector and read as 0-d
int32 arrays. A jitted consumer then compiles once per bucket.

Several devices. `sharding=` a fully replicated `jax.sharding.Sharding` (for example
`NamedSharding(mesh, PartitionSpec())`) gives one replicated vector, one transfer per device;
`lower_replicated(md, devices)` gives one lowering per device (as the torch adapter's verb
does), from one packed host vector.

Aliasing and donation:

- Every lowering packs into its own fresh host vector, never reused, so no later lowering can
  write memory an earlier lowering (or a transfer still in flight) reads. On the CPU,
  `device_put` may alias that host vector instead of copying it; nothing else holds it, so the
  alias is safe. Several CPU devices of one `lower_replicated` get their own copies.
- Field arrays read outside jit are new arrays made by the one split (they own their memory);
  inside jit they are slices XLA fuses. Nothing aliases memory of another lowering.
- The packed vector may be donated: pass the lowering to a jitted function with
  `donate_argnums` and its vector is consumed (XLA may reuse it for an output; on the CPU it
  does not write into host memory it aliases). After that, fields not read outside jit before
  are gone (reading one raises a RuntimeError saying so); fields already read stay valid. A
  lowering used in several steps must not be donated.

Everything here runs under `jax.transfer_guard("disallow")`: the only transfers are the
explicit `device_put`s.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import jax
import jax.numpy as jnp
import numpy as np

from .._buckets import Bucket, scalar_roles
from .._plan import BUILT_MARK, check_lowerable, plan_of
from .._validate import INT32_MAX, INT32_MIN, SpecError
from ..backends.flashinfer import DEVICE_INDICES_MARK as _DEVICE_INDICES_MARK
from ._jax_base import JaxLowering
from ._jax_lowered import DECLARED as _DECLARED
from ._jax_lowered import (
    JaxBucketedCommonMetadata,
    JaxBucketedFlashInferMetadata,
    JaxBucketedFlexMetadata,
    JaxBucketedMambaMetadata,
    JaxBucketedTreeMetadata,
    JaxBucketedTritonMetadata,
    JaxBucketedTurboQuantMetadata,
    JaxCommonMetadata,
    JaxFlashInferMetadata,
    JaxFlexMetadata,
    JaxMambaMetadata,
    JaxTreeMetadata,
    JaxTritonMetadata,
    JaxTurboQuantMetadata,
)

if TYPE_CHECKING:  # (the metadata classes, for `lower`'s overloads only)
    from .._spec import CommonMetadata
    from ..backends.flashinfer import FlashInferMetadata
    from ..backends.flex import FlexMetadata
    from ..backends.mamba import MambaMetadata
    from ..backends.tree import TreeMetadata
    from ..backends.triton import TritonMetadata
    from ..backends.turboquant import TurboQuantMetadata

__all__ = [
    "JaxBucketedCommonMetadata", "JaxBucketedFlashInferMetadata", "JaxBucketedFlexMetadata",
    "JaxBucketedMambaMetadata", "JaxBucketedTreeMetadata", "JaxBucketedTritonMetadata",
    "JaxBucketedTurboQuantMetadata", "JaxCommonMetadata", "JaxFlashInferMetadata", "JaxFlexMetadata",
    "JaxLowering", "JaxMambaMetadata", "JaxTreeMetadata", "JaxTritonMetadata", "JaxTurboQuantMetadata",
    "Layout", "lower", "lower_replicated", "pack", "unpack", "zeros_like_lowered",
]

_L = TypeVar("_L", bound=JaxLowering)

JAX_DTYPE = np.int32  # the packed vector's dtype: JAX gets int32 only (x64 off wraps wider values)
_INT32 = np.dtype(np.int32)
_FLOAT32 = np.dtype(np.float32)  # float32 fields ride bit for bit (a bitcast, -inf survives)
# Host scalar types kept as they are; numpy scalars (edited metadata) become Python ones.
_PLAIN_SCALARS = frozenset({int, bool, str, float, tuple, type(None)})
# Layouts kept per lowering variant: varying unbucketed shapes must not grow memory forever.
_LAYOUT_CACHE = 512
_RESERVED = ("packed", "layout")  # attributes of a lowered object itself
# Vectors of at least this many int32 words bound for a CPU device start 64-byte aligned.
_ALIGN_FROM, _ALIGN_WORDS = 1 << 14, 16
_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")
_setattr = object.__setattr__
_NO_DICT: dict[str, Any] = {}


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A function returning the tuple of the attributes `names` (one C call for any count)."""
    if not names:
        return lambda obj: ()
    if len(names) == 1:
        one = operator.attrgetter(names[0])
        return lambda obj: (one(obj),)
    return operator.attrgetter(*names)


# ---------------------------------------------------------------------------------------------
# Static structure: field positions in the packed vector, and the layout (aux data).


class _Fields:
    """Where each data field lies in a packed int32 vector: static, compared by value.

    `entries[name] = (start, stop, shape, is_float)` in int32 words. The packing recipe beside
    it (which inputs to flatten, bitcast or range-check) depends on the input dtypes too, but
    two recipes that give the same vector give equal `_Fields`.
    """

    __slots__ = ("_hash", "_key", "_split", "entries", "floats", "names", "ravel", "size", "wide")

    def __init__(self, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], dtypes: tuple[Any, ...],
                 steps: int) -> None:
        entries, start = {}, 0
        ravel, floats, wide = [], [], []
        for i, (name, shape, dtype) in enumerate(zip(names[: len(shapes)], shapes, dtypes, strict=True)):
            count = int(np.prod(shape, dtype=np.int64))
            is_float = dtype == _FLOAT32
            entries[name] = (start, start + count, tuple(int(s) for s in shape), is_float)
            start += count
            if len(shape) != 1:
                ravel.append(i)
            if is_float:
                floats.append(i)
            elif dtype != _INT32 and dtype.kind in "iu":
                wide.append(i)
        for j, name in enumerate(names[len(shapes):]):  # per-step scalars, after the arrays
            entries[name] = (start + j, start + j + 1, (), False)
        self.names = names
        self.entries = entries
        self.size = start + steps
        self.ravel, self.floats, self.wide = tuple(ravel), tuple(floats), tuple(wide)
        self._key = tuple(entries.items())
        self._hash = hash(self._key)
        self._split: Callable[[Any], tuple[Any, ...]] | None = None

    def __eq__(self, other: object) -> bool:
        return self is other or (type(other) is _Fields and self._hash == other._hash and self._key == other._key)

    def __hash__(self) -> int:
        return self._hash

    def take(self, vector: Any, name: str) -> Any:
        """Field `name` of a traced (or device) vector: a static slice, reshape, maybe bitcast."""
        start, stop, shape, is_float = self.entries[name]
        part = jax.lax.slice(vector, (start,), (stop,)).reshape(shape)
        return jax.lax.bitcast_convert_type(part, jnp.float32) if is_float else part

    def take_numpy(self, vector: np.ndarray, name: str) -> np.ndarray:
        """Field `name` of a host vector (a numpy view; float fields viewed as float32)."""
        start, stop, shape, is_float = self.entries[name]
        part = vector[start:stop].reshape(shape)
        return part.view(np.float32) if is_float else part

    def split(self, vector: Any) -> tuple[Any, ...]:
        """Every field of a device vector, with one cached jitted function (one dispatch)."""
        if self._split is None:
            names = self.names
            self._split = jax.jit(lambda v: tuple(self.take(v, name) for name in names))
        return self._split(vector)


class Layout:
    """The static half of a lowering: the lowered class, field positions and host scalars.

    Hashable and compared by value, so it is the pytree's aux data (part of every jit cache
    key) and a valid static argument. `pack(md)` returns it beside the host vector;
    `unpack(vector, layout)` rebuilds the lowering from both.

    Attributes:
        cls: the lowered pytree class (`Jax<MetadataClass>` or `JaxBucketed<MetadataClass>`).
        size: int32 words of the packed vector.
        entries: `(name, offset, shape, dtype)` of every data field, in packing order (offsets
            in int32 words; dtype "int32" or "float32").
        scalars: the static host scalars, `{name: value}`.
        names: every field the lowering reads as an attribute: the data fields (packing
            order, per-step scalars of a bucketed lowering last), then the static scalars.
    """

    __slots__ = ("_hash", "cls", "fields", "values")

    def __init__(self, cls: type[JaxLowering], fields: _Fields, values: tuple[Any, ...]) -> None:
        self.cls = cls
        self.fields = fields
        self.values = values
        self._hash: int | None = None

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self.cls, self.fields, self.values))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return (type(other) is Layout and self.cls is other.cls and hash(self) == hash(other)
                and self.fields == other.fields and self.values == other.values)

    @property
    def size(self) -> int:
        return self.fields.size

    @property
    def entries(self) -> tuple[tuple[str, int, tuple[int, ...], str], ...]:
        return tuple((name, start, shape, "float32" if is_float else "int32")
                     for name, (start, _, shape, is_float) in self.fields.entries.items())

    @property
    def scalars(self) -> dict[str, Any]:
        return dict(zip(self.cls._static_names, self.values, strict=True))

    @property
    def names(self) -> tuple[str, ...]:
        return self.cls._data_names + self.cls._static_names

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}@{o}{list(s)}" + ("f32" if d == "float32" else "") for n, o, s, d in self.entries)
        return f"Layout({self.cls.__name__}, int32[{self.size}]: {fields})"


# ---------------------------------------------------------------------------------------------
# The lowered pytree classes.


def _new(cls: type[_L], packed: Any, layout: Layout) -> _L:
    obj = object.__new__(cls)
    _setattr(obj, "packed", packed)
    _setattr(obj, "layout", layout)
    _setattr(obj, "_cache", None)
    return obj


def _make_class(name: str, doc: str, data: tuple[str, ...], static: tuple[str, ...],
                declared: type[JaxLowering] | None = None) -> type[JaxLowering]:
    """The lowered class: `declared` (the importable class of a built-in backend, whose
    annotations name exactly these fields) given its properties, else a new class."""
    clash = set(_RESERVED) & set(data + static)
    assert not clash, f"metadata field(s) {sorted(clash)} shadow the lowered object's own attributes"
    namespace: dict[str, Any] = {"__slots__": (), "__doc__": doc, "_data_names": data, "_static_names": static}
    for field in data:
        namespace[field] = property(lambda self, f=field: self._data(f), doc=f"{field} (data: a slice of `packed`).")  # type: ignore[misc]
    for i, field in enumerate(static):
        namespace[field] = property(lambda self, i=i: self.layout.values[i], doc=f"{field} (static host scalar).")  # type: ignore[misc]
    if declared is not None and declared.__name__ == name and tuple(declared.__annotations__) == data + static:
        cls = declared
        for key, value in namespace.items():
            if key != "__slots__":
                setattr(cls, key, value)
    else:  # a backend registered at run time (or declarations out of date: tests/test_typing.py)
        cls = type(name, (JaxLowering,), namespace)
    cls.__module__ = __name__
    jax.tree_util.register_pytree_with_keys(
        cls,
        lambda obj: (((jax.tree_util.GetAttrKey("packed"), obj.packed),), obj.layout),
        lambda layout, leaves: _new(cls, leaves[0], layout),  # type: ignore[index]  # (a sequence)
        lambda obj: ((obj.packed,), obj.layout),
    )
    return cls


class _Variant:
    """One lowered form (plain or bucketed) of a metadata class and its cached field layouts."""

    __slots__ = ("cls", "data", "get_static", "layouts", "static", "steps")

    def __init__(self, cls: type[JaxLowering], data: tuple[str, ...], static: tuple[str, ...], steps: int) -> None:
        self.cls, self.data, self.static, self.steps = cls, data, static, steps
        self.get_static = _getter(static)
        self.layouts: dict[Any, _Fields] = {}

    def fields_for(self, key: tuple[tuple[Any, ...], tuple[Any, ...]]) -> _Fields:
        fields = self.layouts.get(key)
        if fields is None:
            if len(self.layouts) >= _LAYOUT_CACHE:
                self.layouts.clear()
            fields = self.layouts[key] = _Fields(self.data, key[0], key[1], self.steps)
        return fields


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    arrays: tuple[str, ...]
    step: tuple[str, ...]
    get_arrays: Callable[[Any], tuple[Any, ...]]
    get_step: Callable[[Any], tuple[Any, ...]]
    plain: _Variant
    bucketed: _Variant


@functools.cache
def _plan(md_class: type) -> _Plan:
    """How `md_class` lowers: its device arrays, its host scalars by role, the two classes.

    The one place this module reads the metadata declarations (`array_field(place=...)`).
    Raises TypeError for anything that is not a metadata class (not cached).
    """
    try:
        shared = plan_of(md_class)  # the lowering plan both adapters read (attnsync._plan)
    except TypeError:
        shared = None
    if shared is None or not (shared.staged or shared.mirrors):
        raise TypeError(f"lower: expected metadata from attnsync.build(...), received {md_class.__name__}.")
    declared = [f.name for f in dataclasses.fields(md_class)]
    arrays = tuple(sorted(shared.staged_fields, key=declared.index))  # (JAX has no pinned table to lead)
    scalars = tuple(sorted(shared.host_values, key=declared.index))
    bound, step, static = scalar_roles(md_class)
    base = md_class.__name__
    qualified = f"{md_class.__module__}.{md_class.__qualname__}"
    plain_cls = _make_class(
        "Jax" + base,
        f"JAX lowering of `{base}`: one packed int32 vector (`packed`, the only pytree leaf) and a "
        f"static `Layout`; fields {list(arrays)} read as slices of it, host scalars as static ints.",
        arrays, scalars, _DECLARED.get((qualified, False)),
    )
    bucketed_cls = _make_class(
        "JaxBucketed" + base,
        f"Bucketed JAX lowering of `{base}`: one packed int32 vector holding the arrays and the "
        f"per-step counts {list(step)} (0-d int32 arrays); the bucket's bounds {list(bound)} and "
        f"the build options are static.",
        arrays + step, bound + static, _DECLARED.get((qualified, True)),
    )
    return _Plan(
        arrays=arrays, step=step, get_arrays=_getter(arrays), get_step=_getter(step),
        plain=_Variant(plain_cls, arrays, scalars, 0),
        bucketed=_Variant(bucketed_cls, arrays + step, bound + static, len(step)),
    )


# ---------------------------------------------------------------------------------------------
# Host side: checks and packing.


def _prepare(md: Any, bucket: Bucket | None) -> tuple[_Plan, Any, bool]:
    """The plan of `md` after every refusal that needs no device (bucket bounds applied), and
    whether `md` is unedited output of `attnsync.build`."""
    plan = _plan(type(md))  # type: ignore[arg-type]  # (mypy finds type[Any] unhashable)
    built = bool(getattr(md, "__dict__", _NO_DICT).get(BUILT_MARK))
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
    return plan, md, built


def _host_values(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Host scalars as plain Python values (numpy scalars of edited metadata converted)."""
    if set(map(type, values)) <= _PLAIN_SCALARS:
        return values
    return tuple(bool(v) if isinstance(v, np.bool_) else int(v) if isinstance(v, np.integer) else v for v in values)


def _step_vector(plan: _Plan, md: Any) -> np.ndarray:
    """The per-step host scalars of `md` as one int32 vector (bools as 0/1)."""
    values = plan.get_step(md)
    for name, value in zip(plan.step, values, strict=True):
        if not isinstance(value, int | np.integer):  # bool is an int
            raise TypeError(f"{name}: a per-step scalar must be an int or bool, received {value!r}.")
        if not INT32_MIN <= int(value) <= INT32_MAX:
            raise SpecError(f"{name}: value {int(value)} does not fit int32, and JAX would wrap it.")
    return np.array(values, dtype=np.int32)


def _refuse_wide(name: str, value: np.ndarray) -> None:
    if value.size:
        hi, lo = int(value.max()), int(value.min())
        if hi > INT32_MAX or lo < INT32_MIN:
            raise SpecError(
                f"{name}: value {hi if hi > INT32_MAX else lo} does not fit int32, and JAX (x64 off) would "
                f"silently wrap it. Fix: keep every count, page id and slot id below 2**31."
            )


def _fresh_vector(size: int, aligned: bool) -> np.ndarray | None:
    """New int32 host memory for a packed vector; 64-byte aligned where asked and large.

    JAX on the CPU aliases 64-byte aligned host memory instead of copying it. numpy aligns
    small arrays so, but places large ones just past a page boundary: those get an aligned
    start by hand (None: let numpy allocate).
    """
    if not aligned or size < _ALIGN_FROM:
        return None
    raw = np.empty(size + _ALIGN_WORDS, dtype=np.int32)
    start = (-raw.ctypes.data % (4 * _ALIGN_WORDS)) // 4
    return raw[start : start + size]


def _pack(plan: _Plan, md: Any, bucketed: bool, *, built: bool = False,
          aligned: bool = False) -> tuple[np.ndarray, Layout]:
    """One fresh int32 host vector holding every data field of `md`, and its layout.

    `built`: `md` came from `attnsync.build` unedited (its scalars are plain Python values).
    `aligned`: the vector goes to a CPU device, which may then alias it rather than copy.
    """
    variant = plan.bucketed if bucketed else plan.plain
    values = plan.get_arrays(md)
    fields = variant.fields_for((tuple(map(_SHAPE, values)), tuple(map(_DTYPE, values))))
    parts = list(values)
    for i in fields.wide:
        _refuse_wide(plan.arrays[i], parts[i])
    for i in fields.ravel:
        parts[i] = parts[i].reshape(-1)
    for i in fields.floats:
        parts[i] = parts[i].view(np.int32)  # the same bits: the device side bitcasts back
    if bucketed:
        parts.append(_step_vector(plan, md))
    # One C call for every field, into new memory never shared with a lowering before or
    # after (see "Aliasing and donation").
    vector = _fresh_vector(fields.size, aligned)
    if vector is None:
        vector = np.concatenate(parts, dtype=np.int32, casting="unsafe")
    else:
        np.concatenate(parts, out=vector, casting="unsafe")
    static = variant.get_static(md)
    return vector, Layout(variant.cls, fields, static if built else _host_values(static))


# ---------------------------------------------------------------------------------------------
# Public verbs.

_REMOVED = {
    "stager": "the JAX adapter no longer stages through torch: it packs one int32 vector and "
              "moves it with one jax.device_put. Fix: drop stager= (a bucket keeps the shapes "
              "fixed; see attnsync.adapters.jax's module docs).",
    "alias": "every JAX lowering now owns one packed device vector and its fields are slices of "
             "it (no DLPack views to choose between). Fix: drop alias=; the lowering may be "
             "donated whole (see attnsync.adapters.jax's module docs).",
}


def _refuse_keywords(extra: dict[str, Any]) -> None:
    for name in extra:
        if name in _REMOVED:
            raise TypeError(f"{name}=: removed, {_REMOVED[name]}")
    raise TypeError(f"lower() got an unexpected keyword argument {next(iter(extra))!r}.")


def _target(device: Any, sharding: Any) -> Any:
    if sharding is not None:
        if device is not None:
            raise SpecError(
                "sharding: pass either device= or sharding=, not both; with a sharding every device "
                "of the mesh gets its own copy."
            )
        if not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(f"sharding: expected a jax.sharding.Sharding, received {sharding!r}.")
        if not sharding.is_fully_replicated:
            raise SpecError(
                f"sharding: metadata is replicated, every device reads all of it; received "
                f"{sharding}. Fix: NamedSharding(mesh, PartitionSpec()) (an empty spec)."
            )
        return sharding
    if device is None:
        return jax.devices()[0]
    if not isinstance(device, jax.Device):
        raise TypeError(f"device: expected a jax.Device (e.g. jax.devices()[0]), received {device!r}.")
    return device


# --- typed overloads of lower: generated by `python tests/test_typing.py --write`; do not edit ---
@overload
def lower(md: CommonMetadata, device: Any = None, *, bucket: None = None, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxCommonMetadata: ...
@overload
def lower(md: CommonMetadata, device: Any = None, *, bucket: Bucket, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxBucketedCommonMetadata: ...
@overload
def lower(md: FlashInferMetadata, device: Any = None, *, bucket: None = None, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxFlashInferMetadata: ...
@overload
def lower(md: FlashInferMetadata, device: Any = None, *, bucket: Bucket, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxBucketedFlashInferMetadata: ...
@overload
def lower(md: FlexMetadata, device: Any = None, *, bucket: None = None, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxFlexMetadata: ...
@overload
def lower(md: FlexMetadata, device: Any = None, *, bucket: Bucket, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxBucketedFlexMetadata: ...
@overload
def lower(md: MambaMetadata, device: Any = None, *, bucket: None = None, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxMambaMetadata: ...
@overload
def lower(md: MambaMetadata, device: Any = None, *, bucket: Bucket, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxBucketedMambaMetadata: ...
@overload
def lower(md: TreeMetadata, device: Any = None, *, bucket: None = None, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxTreeMetadata: ...
@overload
def lower(md: TreeMetadata, device: Any = None, *, bucket: Bucket, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxBucketedTreeMetadata: ...
@overload
def lower(md: TritonMetadata, device: Any = None, *, bucket: None = None, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxTritonMetadata: ...
@overload
def lower(md: TritonMetadata, device: Any = None, *, bucket: Bucket, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxBucketedTritonMetadata: ...
@overload
def lower(md: TurboQuantMetadata, device: Any = None, *, bucket: None = None, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxTurboQuantMetadata: ...
@overload
def lower(md: TurboQuantMetadata, device: Any = None, *, bucket: Bucket, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxBucketedTurboQuantMetadata: ...
@overload
def lower(md: Any, device: Any = None, *, bucket: Bucket | None = None, sharding: Any = None, block_table: Any = None,
          table_updates: Any = None, table_view: Any = None, **removed: Any) -> JaxLowering: ...
# --- end of generated overloads of lower ---
def lower(md: Any, device: Any = None, *, bucket: Bucket | None = None, sharding: Any = None,
          block_table: Any = None, table_updates: Any = None, table_view: Any = None, **removed: Any) -> Any:
    """Lower host metadata `md` (from `attnsync.build`) to JAX: one int32 `device_put`.

    Args:
        md: a metadata dataclass from `attnsync.build`.
        device: a `jax.Device` (default: `jax.devices()[0]`). The vector is committed to it, so
            warm jitted consumers up with lowerings from this function.
        bucket: a `Bucket` of an `attnsync._buckets.BucketLadder`; `md` must be built from
            `ladder.pad(batch, bucket)`. The static part is then the same for every step of
            the bucket: the bucket's bounds replace `num_reqs`, `num_actual_tokens`,
            `max_query_len` and `max_seq_len` (`Bucket.bound`), and the per-step counts and
            flags (`attnsync._buckets.STEP_SCALARS`) read as 0-d int32 arrays. Use those inside
            jit as values only (masks, `jnp.where`), never as shapes.
        sharding: a fully replicated `jax.sharding.Sharding` (for example
            `NamedSharding(mesh, PartitionSpec())`) instead of `device`: the metadata of a
            tensor-parallel server, the same on every device of the mesh; one transfer per
            device.
        block_table: a `JaxBlockTable` (attnsync.adapters.jax_block_table) holding the block
            table on `device`: the table is then not uploaded. `table_updates` (the step's
            `take_updates()` record, None when already applied) rides in the same `device_put`
            and is applied to the donated table inside one jitted function, which gathers the
            block table (and FlashInfer's `paged_kv_indices`) into the packed vector; the
            result equals the plain lowering. Needs `table_view`, the `BlockTableView` the
            step's `Batch` was made from. docs/block_table.md describes the path.
        table_updates, table_view: see `block_table`.

    Returns:
        A `Jax<MetadataClass>` (with `bucket`: `JaxBucketed<MetadataClass>`) pytree: its one
        data leaf is the packed int32 vector, its aux data the static `Layout`; device fields
        read as attributes (int32, float32 fields bit for bit), host scalars as Python values.

    Raises:
        TypeError: `md` is not metadata, a wrong argument type, or a removed keyword
            (`stager=`, `alias=`).
        SpecError: edited metadata (`attnsync._spec.check_lowerable`), values beyond int32,
            inexact slot mappings, metadata outside `bucket`, a sharding that is not replicated.

    Example:
        >>> import attnsync, jax
        >>> md = attnsync.build(attnsync.Batch(query_lens=[1, 2], seq_lens=[9, 2],
        ...                                    block_table=[[3], [4]], block_size=16))
        >>> jmd = lower(md, jax.devices("cpu")[0])
        >>> jmd.slot_mapping.tolist(), jmd.max_seq_len
        ([56, 64, 65], 9)
    """
    if removed:
        _refuse_keywords(removed)
    if block_table is not None or table_updates is not None or table_view is not None:
        if block_table is None or table_view is None or sharding is not None:
            raise SpecError("block_table, table_view: a device-table lowering needs both the JaxBlockTable "
                            "(block_table=) and the step's BlockTableView (table_view=), and one device "
                            "(no sharding=).")
        from . import _jax_table_lowering  # (it imports this module)

        return _jax_table_lowering.lower_with_table(md, device, bucket, block_table, table_updates, table_view)
    if getattr(md, "__dict__", _NO_DICT).get(_DEVICE_INDICES_MARK):
        raise SpecError(
            "paged_kv_indices: this metadata was built with device_indices=True, so its host "
            "paged_kv_indices is a placeholder and only a device block table can supply the real one. "
            "Fix: lower(md, device, block_table=device_table, table_updates=record, table_view=view).")
    plan, md, built = _prepare(md, bucket)
    target = _target(device, sharding)
    on_cpu = sharding is None and target.platform == "cpu"
    vector, layout = _pack(plan, md, bucket is not None, built=built, aligned=on_cpu)
    return _new(layout.cls, jax.device_put(vector, target), layout)


# --- typed overloads of lower_replicated: generated by `python tests/test_typing.py --write`; do not edit ---
@overload
def lower_replicated(md: CommonMetadata, devices: Iterable[Any], *,
                     bucket: None = None) -> tuple[JaxCommonMetadata, ...]: ...
@overload
def lower_replicated(md: CommonMetadata, devices: Iterable[Any], *,
                     bucket: Bucket) -> tuple[JaxBucketedCommonMetadata, ...]: ...
@overload
def lower_replicated(md: FlashInferMetadata, devices: Iterable[Any], *,
                     bucket: None = None) -> tuple[JaxFlashInferMetadata, ...]: ...
@overload
def lower_replicated(md: FlashInferMetadata, devices: Iterable[Any], *,
                     bucket: Bucket) -> tuple[JaxBucketedFlashInferMetadata, ...]: ...
@overload
def lower_replicated(md: FlexMetadata, devices: Iterable[Any], *,
                     bucket: None = None) -> tuple[JaxFlexMetadata, ...]: ...
@overload
def lower_replicated(md: FlexMetadata, devices: Iterable[Any], *,
                     bucket: Bucket) -> tuple[JaxBucketedFlexMetadata, ...]: ...
@overload
def lower_replicated(md: MambaMetadata, devices: Iterable[Any], *,
                     bucket: None = None) -> tuple[JaxMambaMetadata, ...]: ...
@overload
def lower_replicated(md: MambaMetadata, devices: Iterable[Any], *,
                     bucket: Bucket) -> tuple[JaxBucketedMambaMetadata, ...]: ...
@overload
def lower_replicated(md: TreeMetadata, devices: Iterable[Any], *,
                     bucket: None = None) -> tuple[JaxTreeMetadata, ...]: ...
@overload
def lower_replicated(md: TreeMetadata, devices: Iterable[Any], *,
                     bucket: Bucket) -> tuple[JaxBucketedTreeMetadata, ...]: ...
@overload
def lower_replicated(md: TritonMetadata, devices: Iterable[Any], *,
                     bucket: None = None) -> tuple[JaxTritonMetadata, ...]: ...
@overload
def lower_replicated(md: TritonMetadata, devices: Iterable[Any], *,
                     bucket: Bucket) -> tuple[JaxBucketedTritonMetadata, ...]: ...
@overload
def lower_replicated(md: TurboQuantMetadata, devices: Iterable[Any], *,
                     bucket: None = None) -> tuple[JaxTurboQuantMetadata, ...]: ...
@overload
def lower_replicated(md: TurboQuantMetadata, devices: Iterable[Any], *,
                     bucket: Bucket) -> tuple[JaxBucketedTurboQuantMetadata, ...]: ...
@overload
def lower_replicated(md: Any, devices: Iterable[Any], *,
                     bucket: Bucket | None = None) -> tuple[JaxLowering, ...]: ...
# --- end of generated overloads of lower_replicated ---
def lower_replicated(md: Any, devices: Iterable[Any], *, bucket: Bucket | None = None) -> tuple[Any, ...]:
    """Lower one host metadata `md` to several devices: one lowering per device.

    For tensor-parallel engines whose ranks each hold a device: pack once on the host, then one
    `jax.device_put` per device (issued in one call). Returns one lowering per device, in the
    order of `devices`, each committed to its device and owning its own device vector, so each
    may be donated independently. (For one array replicated over a mesh, use
    `lower(md, sharding=NamedSharding(mesh, PartitionSpec()))`.)

    Args:
        md: a metadata dataclass from `attnsync.build`.
        devices: distinct `jax.Device`s.
        bucket: as in `lower`.

    Example:
        >>> import attnsync, jax
        >>> md = attnsync.build(attnsync.Batch(query_lens=[1], seq_lens=[3], block_table=[[2]],
        ...                                    block_size=4))
        >>> [j.slot_mapping.tolist() for j in lower_replicated(md, jax.devices("cpu")[:1])]
        [[10]]
    """
    plan, md, built = _prepare(md, bucket)
    if isinstance(devices, jax.Device) or not isinstance(devices, Iterable):
        raise TypeError(f"devices: expected a sequence of jax.Device, received {devices!r}.")
    targets = list(devices)
    if not targets:
        raise SpecError("devices: expected at least one device, received none.")
    for d in targets:
        if not isinstance(d, jax.Device):
            raise TypeError(f"devices: expected jax.Device entries (e.g. jax.devices()), received {d!r}.")
    if len(set(targets)) != len(targets):
        raise SpecError(f"devices: expected distinct devices, received {[str(d) for d in targets]}.")
    on_cpu = [d.platform == "cpu" for d in targets]
    vector, layout = _pack(plan, md, bucket is not None, built=built, aligned=on_cpu[0])
    # A CPU device may alias the host vector it is given: each gets its own, so a donation on
    # one device can never reach another's values.
    hosts = [vector if i == 0 or not cpu else _copy(vector) for i, cpu in enumerate(on_cpu)]
    return tuple(_new(layout.cls, buffer, layout) for buffer in jax.device_put(hosts, targets))


def _copy(vector: np.ndarray) -> np.ndarray:
    out = _fresh_vector(vector.size, True)
    if out is None:
        copied: np.ndarray = vector.copy()
        return copied
    np.copyto(out, vector)
    return out


def pack(md: Any, *, bucket: Bucket | None = None) -> tuple[np.ndarray, Layout]:
    """The host half of `lower`: `(int32 numpy vector, Layout)`, with the same refusals.

    Hand the vector to a jitted step (its transfer rides in that dispatch) with the layout as a
    static argument, and call `unpack(vector, layout)` inside. The vector is fresh memory:
    nothing else writes it.

    Example:
        >>> import attnsync, jax
        >>> md = attnsync.build(attnsync.Batch(query_lens=[1, 2], seq_lens=[9, 2],
        ...                                    block_table=[[3], [4]], block_size=16))
        >>> vector, layout = pack(md)
        >>> step = jax.jit(lambda v, layout: unpack(v, layout).slot_mapping * 2, static_argnums=1)
        >>> step(vector, layout).tolist()
        [112, 128, 130]
    """
    plan, md, built = _prepare(md, bucket)
    return _pack(plan, md, bucket is not None, built=built)


def unpack(vector: Any, layout: Layout) -> JaxLowering:
    """The lowering around `vector` (traced, a device array, or the numpy vector of `pack`).

    Inside jit its fields are static slices of the traced vector; on a numpy vector they are
    numpy views (for inspection on the host).
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"layout: expected the Layout that pack() returned, received {type(layout).__name__}.")
    shape, dtype = getattr(vector, "shape", None), getattr(vector, "dtype", None)
    if shape != (layout.size,) or dtype != _INT32:
        raise SpecError(
            f"vector: expected an int32 vector of shape ({layout.size},) for this layout, received "
            f"{type(vector).__name__} of shape {shape} and dtype {dtype}. Fix: pass the vector pack() "
            f"returned with this layout."
        )
    return _new(layout.cls, vector, layout)


def zeros_like_lowered(lowered: _L) -> _L:
    """A lowering of the same class and layout with a zero vector (warm-up shapes in tests)."""
    zeros: _L = jax.tree_util.tree_map(jnp.zeros_like, lowered)
    return zeros
