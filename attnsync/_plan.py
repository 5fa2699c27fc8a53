"""One lowering plan per metadata class: what is staged, where, as what, and what stays on the host.

Both framework adapters lower a metadata dataclass the same way: the array fields declared
`array_field(place="device" | "both")` go into one packed buffer, copied to the device at once;
the `"host" | "both"` fields get a host mirror; int and bool fields stay host scalars. This
module works that out once per class (`plan_of`, cached like a compiled pattern) and, per shape
signature of a step, the packed layout (`LoweringPlan.layout`, cached), so neither adapter
derives it again.

The block table is the first staged field of every layout, at offset 0: a caller whose table
already lies at the start of a pinned buffer can then have the other fields packed after it.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._staging import ALIGN_BYTES, PackedLayout, plan_layout
from ._validate import INT32_MAX, INT32_MIN, SpecError

__all__ = ["BUILT_MARK", "LoweringPlan", "StepLayout", "check_lowerable", "plan_of"]

# The instance-dict key `attnsync._spec.construct` sets on metadata a builder made: its dtypes
# are the ones its class declares, and its values were validated once, at `Batch`.
BUILT_MARK = "_attnsync_built"

# Array dtypes a built metadata object holds (attnsync speaks int32; bool masks; the float32
# tree bias). Anything else reaching an adapter was put there by hand (dataclasses.replace).
_LOWERABLE_KINDS = {"i", "u", "b"}
_INT32 = np.dtype(np.int32)

# Shape rules a metadata class follows when it has these fields (vLLM's meanings): the field's
# length is that scalar plus the offset; "table" rows follow num_reqs.
_LENGTH_RULES = {"query_start_loc": ("num_reqs", 1), "seq_lens": ("num_reqs", 0),
                 "slot_mapping": ("num_actual_tokens", 0)}


def _getter(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """`getter(mapping)` -> the values of `names` in order, always a tuple (one C call)."""
    if len(names) == 1:
        name = names[0]
        return lambda mapping: (mapping[name],)
    if not names:
        return lambda mapping: ()
    return operator.itemgetter(*names)


@dataclass(frozen=True, eq=False)
class LoweringPlan:
    """How one metadata class lowers (made once per class by `plan_of`).

    Attributes:
        md_class: the metadata dataclass.
        staged: (field, lowered name) of every device field, the block table first.
        mirrors: (field, lowered name) of every host mirror ("host" fields keep their name,
            "both" fields get `_cpu` unless they declare `host_name`).
        scalars: names of the int and bool fields (host scalars in every framework).
        scalar_kinds: (name, "int" | "bool") of each of them, for `check_lowerable`.
        statics: names of the other non-array fields (str options), carried as they are.
        host_values: `scalars + statics`, what every lowering carries unchanged.
        arrays: every array field a lowering reads (staged, then mirror-only), in that order.
        length_rules: (field, scalar, offset) for the fields whose length follows a scalar
            (`"table"`: rows follow num_reqs), checked by `attnsync._spec.check_lowerable`.
        has_slot_mapping: the class has `slot_mapping` (device slot recomputation applies).
        exact_slots_flag: the class has `slot_mapping_exact` (inexact batches need device lengths).
    """

    md_class: type
    staged: tuple[tuple[str, str], ...]
    mirrors: tuple[tuple[str, str], ...]
    scalars: tuple[str, ...]
    scalar_kinds: tuple[tuple[str, str], ...]
    statics: tuple[str, ...]
    arrays: tuple[str, ...]
    length_rules: tuple[tuple[str, str | None, int], ...]
    has_slot_mapping: bool
    exact_slots_flag: bool
    staged_of: Callable[[Mapping[str, Any]], tuple[np.ndarray, ...]] = field(repr=False)
    mirrors_of: Callable[[Mapping[str, Any]], tuple[np.ndarray, ...]] = field(repr=False)
    scalars_of: Callable[[Mapping[str, Any]], tuple[Any, ...]] = field(repr=False)
    host_values: tuple[str, ...]
    host_values_of: Callable[[Mapping[str, Any]], tuple[Any, ...]] = field(repr=False)
    arrays_of: Callable[[Mapping[str, Any]], tuple[np.ndarray, ...]] = field(repr=False)
    _layouts: dict[tuple[Any, ...], StepLayout] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def staged_fields(self) -> tuple[str, ...]:
        """The metadata field names of the staged arrays, in layout order."""
        return tuple(name for name, _ in self.staged)

    @functools.cached_property
    def mirror_fields(self) -> tuple[str, ...]:
        """The metadata field names of the host mirrors, in mirror-layout order."""
        return tuple(name for name, _ in self.mirrors)

    def layouts(self, values: Mapping[str, Any], wide: tuple[tuple[str, Any], ...] = ()) -> StepLayout:
        """The packed layouts of one step (`values`: a metadata instance dict), cached per shapes.

        Integer fields are staged as int32 (attnsync speaks int32; `check_lowerable` refused
        values that do not fit), bool and float32 fields as they are, except the fields named in
        `wide` (field, numpy dtype), which the caller's framework wants wider (torch's int64 slot
        ids). Every field starts at a 64-byte aligned offset. Built metadata has the same dtypes
        every step (its class fixes them), so only the shapes key the cache; edited metadata
        adds its dtypes to the key.
        """
        arrays = self.arrays_of(values)
        key: tuple[Any, ...] = tuple([a.shape for a in arrays])
        if not values.get(BUILT_MARK):
            key += tuple([a.dtype.str for a in arrays])
        step = self._layouts.get((key, wide))
        if step is None:
            if len(self._layouts) > 1024:  # a server meets a few shapes; a fuzzer meets many
                self._layouts.clear()
            widened = dict(wide)

            def layout(names: tuple[str, ...]) -> PackedLayout:
                return plan_layout([
                    (name, values[name].shape,
                     widened.get(name, np.int32 if values[name].dtype.kind in "iu" else values[name].dtype))
                    for name in names])

            step = self._layouts[(key, wide)] = StepLayout(layout(self.staged_fields), layout(self.mirror_fields))
        return step


@dataclass(frozen=True, eq=False)  # made once per shape signature: identity is equality
class StepLayout:
    """The two packed layouts of one step: the staged (device) fields and the host mirrors.

    A reusing stager keeps both in one host buffer, the mirrors from `mirror_offset` on.
    """

    staged: PackedLayout
    mirrors: PackedLayout
    mirror_offset: int = field(init=False)
    nbytes: int = field(init=False)  # the host buffer both need

    def __post_init__(self) -> None:
        offset = -(-self.staged.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        object.__setattr__(self, "mirror_offset", offset)
        object.__setattr__(self, "nbytes", offset + self.mirrors.nbytes)


@functools.cache
def plan_of(md_class: type) -> LoweringPlan:
    """The lowering plan of a metadata dataclass (cached: one per class)."""
    if not dataclasses.is_dataclass(md_class):
        raise TypeError(f"{md_class!r} is not a metadata dataclass")
    fields = dataclasses.fields(md_class)
    names = {f.name for f in fields}
    staged: list[tuple[str, str]] = []
    mirrors: list[tuple[str, str]] = []
    rules: list[tuple[str, str | None, int]] = []
    for f in fields:
        place = f.metadata.get("place")
        if place is None:
            continue
        if place in ("device", "both"):
            staged.append((f.name, f.metadata["device_name"] or f.name))
        if place in ("host", "both"):
            mirrors.append((f.name, f.metadata["host_name"] or (f.name if place == "host" else f"{f.name}_cpu")))
        rule = _LENGTH_RULES.get(f.name)
        if rule is not None and rule[0] in names:
            rules.append((f.name, rule[0], rule[1]))
        elif f.name == "block_table" and "num_reqs" in names:
            rules.append((f.name, "table", 0))
        else:
            rules.append((f.name, None, 0))
    staged.sort(key=lambda pair: pair[0] != "block_table")  # the table first (module docstring)
    scalars: list[str] = []
    kinds: list[tuple[str, str]] = []
    statics: list[str] = []
    for f in fields:
        if "place" in f.metadata:
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        (scalars if kind in ("int", "bool") else statics).append(f.name)
        if kind in ("int", "bool"):
            kinds.append((f.name, kind))
    staged_names = tuple(name for name, _ in staged)
    arrays = staged_names + tuple(name for name, _ in mirrors if name not in staged_names)
    return LoweringPlan(
        md_class=md_class,
        staged=tuple(staged),
        mirrors=tuple(mirrors),
        scalars=tuple(scalars),
        scalar_kinds=tuple(kinds),
        statics=tuple(statics),
        arrays=arrays,
        length_rules=tuple(rules),
        has_slot_mapping="slot_mapping" in names,
        exact_slots_flag="slot_mapping_exact" in names,
        staged_of=_getter(staged_names),
        mirrors_of=_getter(tuple(name for name, _ in mirrors)),
        scalars_of=_getter(tuple(scalars)),
        host_values=tuple(scalars + statics),
        host_values_of=_getter(tuple(scalars + statics)),
        arrays_of=_getter(arrays),
    )


def check_lowerable(md: Any) -> None:
    """Refuse metadata whose fields are not what `attnsync.build` makes (adapters call this).

    Built metadata is trusted: its values were validated once, at `Batch`, and `construct`
    marks what a builder made (`BUILT_MARK`), so it is not checked again. This is the cheap
    structural check at the adapters' boundary against objects edited by hand (for example
    with `dataclasses.replace`): every array field a numpy array of int32, bool or float32
    (other integer dtypes only with values that fit int32), the common fields' lengths
    consistent with `num_reqs` / `num_actual_tokens`, and int / bool scalars of those types,
    ints >= 0. Raises `TypeError` or `SpecError` naming the field; O(number of fields) for
    built metadata (value ranges are read only for non-int32 integer arrays).
    """
    if getattr(md, "__dict__", {}).get(BUILT_MARK):
        return  # made by `construct` from a validated Batch; an edited copy has no mark
    cls: type = type(md)  # (typed: mypy finds type[Any] unhashable for the cache)
    plan = plan_of(cls)
    for name, kind in plan.scalar_kinds:
        value = getattr(md, name)
        if type(value) is (bool if kind == "bool" else int) and (kind == "bool" or value >= 0):
            continue  # the common case, without the slower abstract-class checks below
        if kind == "bool":
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"{name}: expected a bool, received {value!r} ({type(value).__name__}). "
                                f"Fix: lower the metadata attnsync.build returned, unedited.")
        elif isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name}: expected an int, received {value!r} ({type(value).__name__}). "
                            f"Fix: lower the metadata attnsync.build returned, unedited.")
        elif value < 0:
            raise SpecError(f"{name}: expected an int >= 0, received {value}. "
                            f"Fix: lower the metadata attnsync.build returned, unedited.")
    for name, length_of, plus in plan.length_rules:
        value = getattr(md, name)
        if type(value) is not np.ndarray and not isinstance(value, np.ndarray):
            raise TypeError(
                f"{name}: expected a numpy array (as attnsync.build makes it), received "
                f"{type(value).__name__}. Fix: build the metadata with attnsync.build; adapters lower "
                f"host metadata, not framework tensors or lists."
            )
        dtype = value.dtype
        if dtype != _INT32:
            if dtype.kind not in _LOWERABLE_KINDS and dtype != np.float32:
                raise TypeError(
                    f"{name}: expected an int32 (or bool / float32) array, received dtype {dtype}. "
                    f"Fix: metadata arrays are int32; build them with attnsync.build."
                )
            if dtype.kind in "iu" and value.size:
                hi, lo = int(value.max()), int(value.min())
                if hi > INT32_MAX or lo < INT32_MIN:
                    raise SpecError(
                        f"{name}: value {hi if hi > INT32_MAX else lo} does not fit int32; every metadata "
                        f"array is int32 (JAX, with x64 off, would silently wrap it). Fix: keep every count, "
                        f"page id and slot id below 2**31."
                    )
        if length_of is None:
            continue
        if length_of == "table":
            if value.ndim != 2 or value.shape[0] != md.num_reqs:
                raise SpecError(f"{name}: expected shape ({md.num_reqs}, W), received {value.shape}. "
                                f"Fix: lower the metadata attnsync.build returned.")
        elif value.shape != (getattr(md, length_of) + plus,):
            raise SpecError(f"{name}: expected shape ({getattr(md, length_of) + plus},) ({length_of} = "
                            f"{getattr(md, length_of)}), received {value.shape}. Fix: lower the metadata "
                            f"attnsync.build returned.")
