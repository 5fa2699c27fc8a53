"""The common host metadata every backend builds on (vLLM's CommonAttentionMetadata).

Also the one place that says how a metadata field travels: every array field of a metadata
dataclass is declared with `array_field(place=...)`:

- ``"device"``: staged to the device by the adapters (one packed copy per lowering);
- ``"host"``: stays on the host (numpy, or a CPU tensor in the torch adapter);
- ``"both"``: a device copy plus a host mirror (vLLM's ``x`` / ``x_cpu`` pairs);
- ``"numpy"``: stays in the numpy metadata only; the adapters do not carry it (host-side
  helpers such as per-token row ids, which no framework consumer needs, cost nothing then).

Plain int/bool fields are host scalars (torch: attributes; JAX: static pytree fields).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _accel
from ._batch import DECODE, LONG_EXTEND, PREFILL, SHORT_EXTEND, Batch
from ._validate import INT32_MAX, INT32_MIN, SpecError, as_int, freeze

PAD_SLOT_ID = -1  # slot of a padding token; cache-write kernels skip it (vLLM convention)


def array_field(*, place: str, device_name: str | None = None, host_name: str | None = None) -> Any:
    """Declare an array field and how it travels (see the module docstring).

    `device_name` / `host_name` rename the field in lowered objects (vLLM's names); by default
    the device copy keeps the field name and a host mirror of a "both" field gets `_cpu`.
    """
    assert place in ("device", "host", "both", "numpy"), place
    return field(metadata={"place": place, "device_name": device_name, "host_name": host_name})


def array_fields(md: Any) -> list[dataclasses.Field]:
    """The array fields of a metadata dataclass, in declaration order."""
    return [f for f in dataclasses.fields(md) if "place" in f.metadata]


def scalar_fields(md: Any) -> list[dataclasses.Field]:
    """The host scalar fields (int, bool, str) of a metadata dataclass."""
    return [f for f in dataclasses.fields(md) if "place" not in f.metadata]


# Array dtypes a built metadata object holds (attnsync speaks int32; bool masks; the float32
# tree bias). Anything else reaching an adapter was put there by hand (dataclasses.replace).
_LOWERABLE_KINDS = {"i", "u", "b"}
_INT32 = np.dtype(np.int32)
# Shape rules every backend's metadata follows when it has these fields (vLLM's meanings).
_LENGTHS = {"query_start_loc": ("num_reqs", 1), "seq_lens": ("num_reqs", 0), "slot_mapping": ("num_actual_tokens", 0)}


@functools.lru_cache(maxsize=None)
def _lowerable_plan(cls: type) -> tuple[tuple[tuple[str, str | None, int], ...], tuple[tuple[str, str], ...]]:
    names = {f.name for f in dataclasses.fields(cls)}
    arrays = []
    for f in array_fields(cls):
        # (field, scalar its length follows, offset); "table": rows follow num_reqs
        rule = _LENGTHS.get(f.name)
        if rule is not None and rule[0] in names:
            arrays.append((f.name, rule[0], rule[1]))
        elif f.name == "block_table" and "num_reqs" in names:
            arrays.append((f.name, "table", 0))
        else:
            arrays.append((f.name, None, 0))
    scalars = tuple((f.name, f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
                    for f in scalar_fields(cls))
    return tuple(arrays), tuple((name, kind) for name, kind in scalars if kind in ("int", "bool"))


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
    arrays, scalars = _lowerable_plan(type(md))
    for name, kind in scalars:
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
    for name, length_of, plus in arrays:
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


@dataclass(frozen=True, kw_only=True, eq=False)
class CommonMetadata:
    """Metadata shared by every backend, built on the host in numpy (the "plan" phase).

    R is `num_reqs` (padded request rows), T is `num_actual_tokens` (padded tokens). Arrays are
    read-only. Padded rows follow vLLM: `query_start_loc` repeats its last value, `seq_lens` 0,
    block-table rows 0, `slot_mapping` -1.

    Attributes:
        query_start_loc: [R+1] int32, [0] == 0, non-decreasing; row r's tokens are
            `[query_start_loc[r], query_start_loc[r+1])`. Always exact. Device and host.
        query_lens: [R] int32, `diff(query_start_loc)`. Numpy only.
        seq_lens: [R] int32, context including this step's tokens; exact where
            `seq_lens_exact`, else an upper bound. Device (`seq_lens`) and host
            (`seq_lens_cpu_upper_bound`).
        seq_lens_exact: [R] bool, True for exact rows (padded rows True). Numpy only.
        num_computed_tokens: [R] int32, `seq_lens - query_lens` (a bound where inexact). Host.
        is_prefilling: [R] bool, from the batch (all False when not given). Host.
        block_table: [R, W] int32 page ids, padded rows 0. Device (`block_table_tensor`).
        slot_mapping: [T] int32 cache slot of each new token, `page * block_size + offset`;
            padding tokens -1. Rows that are not exact get -1 too (the host cannot know where
            their tokens go) and `slot_mapping_exact` is False: the adapters then require exact
            device `seq_lens` and recompute the slots on the device. Device (int64 in torch).
        token_to_req: [T] int32 row of each token (padding tokens: R, one past the last row).
            Numpy only.
        num_reqs, num_actual_tokens: R and T (padded sizes, vLLM's meaning).
        num_scheduled_reqs, num_scheduled_tokens: the real request and token counts.
        max_query_len: longest query (exact). max_seq_len: longest `seq_lens` (a bound).
        block_size: tokens per page.
        decode_threshold: rows with at most this many tokens count as decodes.
        num_decodes, num_decode_tokens, num_extends, num_extend_tokens, num_prefills,
        num_prefill_tokens: the split of the real rows (extends: short and long extends).
        is_decode_first: True when decode rows come before all others.
        all_exact: True when every row's length is exact.
        slot_mapping_exact: True when every real token's slot is known on the host.
    """

    query_start_loc: np.ndarray = array_field(place="both")
    query_lens: np.ndarray = array_field(place="numpy")
    seq_lens: np.ndarray = array_field(place="both", host_name="seq_lens_cpu_upper_bound")
    seq_lens_exact: np.ndarray = array_field(place="numpy")
    num_computed_tokens: np.ndarray = array_field(place="host", host_name="num_computed_tokens_cpu")
    is_prefilling: np.ndarray = array_field(place="host")
    block_table: np.ndarray = array_field(place="device", device_name="block_table_tensor")
    slot_mapping: np.ndarray = array_field(place="device")
    token_to_req: np.ndarray = array_field(place="numpy")
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    decode_threshold: int
    num_decodes: int
    num_decode_tokens: int
    num_extends: int
    num_extend_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    is_decode_first: bool
    all_exact: bool
    slot_mapping_exact: bool


def _pad(values: np.ndarray, length: int, fill: int | bool) -> np.ndarray:
    """`values` padded with `fill` rows to `length` rows; the (read-only) input when no padding."""
    if values.shape[0] == length:
        return values
    out = np.full((length,) + values.shape[1:], fill, dtype=values.dtype)
    out[: values.shape[0]] = values
    return out


BUILT_MARK = "_attnsync_built"


def construct(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the frozen metadata dataclass `cls` holding `values`, one per field.

    Builders call this instead of `cls(**values)`: a frozen dataclass's generated `__init__`
    sets each field through `object.__setattr__`, about 5 us for 24 fields on the CPU host
    against 0.2 us for one `__dict__.update` (`bench/host_primitives.py`), and builders run
    once per step. Metadata classes have no `__post_init__` to skip; the field names are
    checked, so a builder that forgets a field fails here, not at a later attribute read.
    Only builders call this, with arrays derived from a validated `Batch`. The caller hands
    `values` over: it becomes the instance's attribute dict (no copy), so pass a dict nothing
    else keeps.
    """
    names = _field_names(cls)
    # A forgotten field makes the count differ (a full key comparison costs 2.5 us a step on
    # the H100 host; builders' tests read every field, so a swapped name fails there too).
    if len(values) != len(names):
        missing, extra = sorted(names - values.keys()), sorted(values.keys() - names)
        raise AssertionError(f"{cls.__name__}: fields missing {missing}, unknown {extra}")
    md = object.__new__(cls)
    # Trusted by the adapters' `check_lowerable`: `dataclasses.replace` and hand-made instances
    # go through `__init__` and carry no mark, so edited metadata is still checked.
    values[BUILT_MARK] = True
    object.__setattr__(md, "__dict__", values)  # (past the frozen class's own __setattr__)
    return md


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def inherit(common: CommonMetadata, cls: type, /, **own: Any) -> Any:
    """Build backend metadata `cls` whose fields shared with `CommonMetadata` come from `common`.

    Every field of `cls` that `CommonMetadata` also has is taken from `common` (the same
    read-only arrays, no copies), so its derivation stays in one place: `build_common`. `own`
    gives the backend's other fields and may override a shared one.
    """
    return inherit_fields(common.__dict__, cls, **own)


def inherit_fields(common: dict[str, Any], cls: type, /, **own: Any) -> Any:
    """`inherit` from the common fields as a dict (`common_fields`'s result)."""
    names, fetch = _shared_names(cls)
    values = dict(zip(names, fetch(common)))
    values.update(own)
    return construct(cls, values)


@functools.lru_cache(maxsize=None)
def _shared_names(cls: type) -> tuple[tuple[str, ...], Any]:
    mine = {f.name for f in dataclasses.fields(cls)}
    names = tuple(f.name for f in dataclasses.fields(CommonMetadata) if f.name in mine)
    return names, fields_getter(names)


def fields_getter(names: tuple[str, ...]) -> Any:
    """`getter(mapping)` -> the values of `names` in order, always a tuple, in one C call for
    two or more names (`operator.itemgetter`; per-name lookups in a Python loop cost about a
    microsecond a step more on the H100 host for a metadata class's 10-25 fields)."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    return lambda mapping: tuple(mapping[name] for name in names)


# Read-only [0, 1, 2, ...] shared by every build: a one-token-per-row batch's query_start_loc
# and token_to_req are prefixes of it (views, no allocation). Grown by replacement, never
# written, so views handed out earlier stay valid.
_ARANGE = freeze(np.arange(4097, dtype=np.int32))


def _decode_slots(block_table: np.ndarray, position: np.ndarray, page: int) -> np.ndarray:
    """Slot of one token per row: `block_table[r, position[r] // page] * page + position % page`.

    A flat `take` at `r * W + column` instead of a two-array fancy index, and shifts for a
    power-of-two page: 2.9 us against 4.3 us at 256 x 512 on the CPU host, which build_common
    pays every decode step. int32 is safe: `Batch` refused page ids whose slots do not fit.
    """
    rows, width = block_table.shape
    native = _accel.native
    if native is not None and block_table.flags.c_contiguous and position.flags.c_contiguous:
        # one compiled call for the five numpy calls below (attnsync/_accel.py)
        slots = np.empty(rows, dtype=np.int32)
        native.decode_slots(block_table, position, page, slots)
        return slots
    shift = page.bit_length() - 1
    if page == 1 << shift:  # positions are >= 0, so shifts and masks are // and %
        index = position >> shift
        offset = position & (page - 1)
    else:
        index, offset = np.divmod(position, page)
    starts = _row_starts(rows, width)
    if starts.dtype == index.dtype:
        index += starts
    else:  # a table of more than 2**31 entries
        index = index + starts
    slots = block_table.ravel().take(index)  # ravel: a view of the (C-contiguous) table
    slots *= page
    slots += offset
    return slots


@functools.lru_cache(maxsize=64)
def _row_starts(rows: int, width: int) -> np.ndarray:
    """`r * width` for each row r: flat offsets of a C-contiguous [rows, width] table."""
    dtype = np.int32 if rows * width <= INT32_MAX else np.int64
    return freeze(np.arange(rows, dtype=dtype) * dtype(width))


@functools.lru_cache(maxsize=64)
def frozen_zeros(shape: tuple[int, ...], dtype: Any = np.int32) -> np.ndarray:
    """A read-only zeros array of `shape` and `dtype`, shared by every build that asks for it.

    For fields whose value depends only on a batch's sizes (an absent `is_prefilling`, the
    placeholders of fields left to the device, FlashInfer's `[0]` offsets of no prefill rows):
    a read-only array cannot be changed by any holder, so one per shape serves every step, as
    the shared arange below does for `query_start_loc`.
    """
    return freeze(np.zeros(shape, dtype=dtype))


# Row-prefix masks (row i True in its first counts[i] columns) come from a cached [W+1, W]
# table whose row p is True in its first p columns: `table.take(counts, axis=0)` copies R rows
# where the broadcast compare `arange(W) < counts[:, None]` computes them, 0.48 us against
# 1.70 us at 32 x 128 on the CPU host (1.4 against 13 us at 32 x 2048). The table costs
# (W+1)*W bytes, kept once per width (`_prefix_masks` keeps the last 4: a server meets one
# block-table width and one flex list width): tables up to this width, 4 MiB, use it; wider
# ones compare.
_PREFIX_MASK_MAX_WIDTH = 2048


def prefix_mask(counts: np.ndarray, width: int) -> np.ndarray:
    """[len(counts), width] bool, row i True in its first `counts[i]` columns (0 <= counts <= width).

    Read row-major as a mask over a [R, width] table, it selects every row's first counts[i]
    entries in order: FlashInfer's page indices, flex's decode candidates and left-packed lists.
    """
    if width <= _PREFIX_MASK_MAX_WIDTH:
        return _prefix_masks(width).take(counts, axis=0)
    return _arange(width) < counts[:, None]


@functools.lru_cache(maxsize=4)
def _prefix_masks(width: int) -> np.ndarray:
    """Read-only [width+1, width] bool: row p is True in columns [0, p), False after."""
    columns = np.arange(width, dtype=np.int32)
    return freeze(columns[None, :] < np.arange(width + 1, dtype=np.int32)[:, None])


def _arange(length: int) -> np.ndarray:
    """A read-only view of `[0, length)` as int32."""
    global _ARANGE
    if length > _ARANGE.shape[0]:
        _ARANGE = freeze(np.arange(max(length, 2 * _ARANGE.shape[0]), dtype=np.int32))
    return _ARANGE[:length]


def _split(batch: Batch, threshold: int, query_start_loc: np.ndarray) -> tuple[Any, Any, bool]:
    """Rows and tokens per region (decode, short extend, long extend, prefill) and whether the
    decodes come first; host numpy (bincount and tolist read no device).

    A batch already in region order (what `reorder` makes, and what every backend that needs
    decode-first order gets) has each region as one run of rows, so its tokens are differences
    of `query_start_loc`: no weighted bincount (float weights, 2.6 us at 256 rows on the CPU
    host, a third of the split's cost). With attnsync's compiled twin, one pass in C
    (`split_regions`) gives the same values; the numpy form below is the reference.
    """
    native = _accel.native
    if native is not None:  # the same in one compiled pass (tests/test_native.py compares them)
        return native.split_regions(batch.query_lens, batch.seq_lens, batch.is_prefilling, threshold)
    region = batch.regions(threshold)  # numpy on the host: no .tolist() below reads a device
    rows = np.bincount(region, minlength=4).tolist()
    n = batch.num_reqs
    if n < 2 or (region[1:] >= region[:-1]).all():
        ends = [0, rows[0], rows[0] + rows[1], rows[0] + rows[1] + rows[2], n]
        starts = query_start_loc[ends].tolist()  # host numpy, four values
        return rows, [starts[k + 1] - starts[k] for k in range(4)], True
    tokens = np.bincount(region, weights=batch.query_lens, minlength=4).astype(np.int64).tolist()
    is_decode = region == DECODE
    return rows, tokens, not bool((is_decode[1:] > is_decode[:-1]).any())


def build_common(batch: Batch, *, decode_threshold: int = 1, slots: bool = True) -> CommonMetadata:
    """Build the common metadata of `batch` (host only, numpy).

    Args:
        batch: the validated batch.
        decode_threshold: rows with at most this many new tokens count as decodes in the split.
        slots: compute `slot_mapping`. False (internal: for a consumer that derives the slots
            on the device and never reads the host ones, flex's captured step) leaves it a
            shared read-only array of zeros of the right shape, and skips the five to seven
            numpy calls that make it.
    """
    if not isinstance(batch, Batch):
        raise TypeError(
            f"batch: expected an attnsync.Batch, received {type(batch).__name__}. "
            f"Fix: wrap your arrays in attnsync.Batch(query_lens=..., seq_lens=..., ...)."
        )
    threshold = as_int(decode_threshold, "decode_threshold", minimum=1)
    return construct(CommonMetadata, common_fields(batch, threshold, slots))


def common_fields(batch: Batch, threshold: int, slots: bool = True) -> dict[str, Any]:
    """`build_common`'s fields as a dict, its arguments already checked (`threshold` an int
    >= 1): for a backend that takes the common fields into its own metadata (`inherit`)
    without making the `CommonMetadata` object in between."""
    n, r_pad, t_pad = batch.num_reqs, batch.padded_num_reqs, batch.padded_num_tokens
    t = batch.num_tokens
    q = batch.query_lens
    page = batch.block_size
    all_exact = batch.all_exact
    max_query_len = batch.max_query_len
    # Unpadded batches reuse the batch's read-only arrays: no copy is needed (and no _pad
    # calls: five of them cost 2 us a step on the CPU host, a tenth of the decode build).
    # Arrays made here are frozen at the end (`made`); the batch's own and the cached ones
    # already are (setflags took 1.3 us a call on the H100 host under the line profiler:
    # results/2026-11-27-h100/run13-lineprof.txt).
    prefilling = batch.is_prefilling
    if r_pad == n:
        query_lens, seq_lens, exact, block_table = q, batch.seq_lens, batch.seq_lens_exact, batch.block_table
        made = []
    else:
        query_lens = _pad(q, r_pad, 0)
        seq_lens = _pad(batch.seq_lens, r_pad, 0)
        exact = _pad(batch.seq_lens_exact, r_pad, True)
        block_table = _pad(batch.block_table, r_pad, 0)
        made = [query_lens, seq_lens, exact, block_table]
        if prefilling is not None:
            prefilling = _pad(prefilling, r_pad, False)
            made.append(prefilling)
    if prefilling is None:
        prefilling = frozen_zeros((r_pad,), bool)
    native = _accel.native
    if (native is not None and slots and n and t == n == r_pad == t_pad and max_query_len == 1
            and block_table.flags.c_contiguous):
        # One token per row and no padding (decode steps, the hot path): both per-row arrays
        # in one compiled call, as halves of one array (two numpy allocations, a subtraction
        # and two read-only flags fewer: the same values as the general path below, which
        # tests/test_native.py checks).
        rows = np.empty(2 * n, dtype=np.int32)
        native.decode_rows(block_table, seq_lens, page, rows)
        if not all_exact:
            rows[n:][~batch.seq_lens_exact] = PAD_SLOT_ID
        rows.setflags(write=False)  # (its halves below are read-only views)
        num_computed, slot_mapping, fused = rows[:n], rows[n:], True
    else:
        num_computed, fused = seq_lens - query_lens, False
        made.append(num_computed)
        if not slots:
            slot_mapping = frozen_zeros((t_pad,))  # never read (see the docstring)
        elif t_pad > t:
            slot_mapping = np.full(t_pad, PAD_SLOT_ID, dtype=np.int32)
            made.append(slot_mapping)
        else:
            slot_mapping = None  # the slots computed below, made here

    if n and t == n and max_query_len == 1:
        # One token per row (decode steps, the hot path): token i belongs to row i, its
        # position is seq_len - 1, and the offsets are 0, 1, ..., n. No repeat, no cumsum.
        counting = _arange(n + 1)
        if r_pad == n:
            query_start_loc = counting
        else:
            query_start_loc = np.full(r_pad + 1, n, dtype=np.int32)
            query_start_loc[: n + 1] = counting
            made.append(query_start_loc)
        if t_pad == t:
            token_to_req = counting[:n]
        else:
            token_to_req = np.full(t_pad, r_pad, dtype=np.int32)
            token_to_req[:n] = _arange(n)
            made.append(token_to_req)
        if slots and not fused:
            token_slots = _decode_slots(block_table[:n], num_computed[:n], page)
            if not all_exact:
                token_slots[~batch.seq_lens_exact] = PAD_SLOT_ID
    else:
        query_start_loc = np.zeros(r_pad + 1, dtype=np.int32)
        np.add.accumulate(query_lens, out=query_start_loc[1:])
        made.append(query_start_loc)
        # Per-token arrays with one repeat each; padding tokens map to row R (one past the
        # last). Position of token i of row r is num_computed[r] + i
        # = arange(t) + (num_computed - qsl)[r].
        token_to_req = np.full(t_pad, r_pad, dtype=np.int32)
        made.append(token_to_req)
        if slots and native is not None and block_table.flags.c_contiguous:
            # both per-token arrays in one compiled call (the numpy form below: two repeats, a
            # divmod, a gather and the arithmetic), inexact rows' slots -1 as below
            token_slots = np.empty(t, dtype=np.int32)
            native.token_slots(q, num_computed[:n], block_table, page,
                               None if all_exact else batch.seq_lens_exact, token_to_req[:t], token_slots)
        else:
            token_to_req[:t] = np.repeat(_arange(n), q)
            if slots:
                positions = np.repeat(num_computed[:n] - query_start_loc[:n], q)
                positions += _arange(t)
                column, offset = np.divmod(positions, page)
                token_slots = block_table[token_to_req[:t], column] if t else positions
                token_slots *= page
                token_slots += offset
                if not all_exact:
                    token_slots[~np.repeat(batch.seq_lens_exact, q)] = PAD_SLOT_ID
    if slot_mapping is None:
        slot_mapping = token_slots
        made.append(slot_mapping)
    elif slots and not fused:
        slot_mapping[:t] = token_slots

    if max_query_len <= threshold and not batch.any_prefilling:
        rows_per_region = (n, 0, 0, 0)  # every row is a decode
        tokens_per_region = (t, 0, 0, 0)
        decode_first = True
    else:
        rows_per_region, tokens_per_region, decode_first = _split(batch, threshold, query_start_loc)
    for value in made:
        value.setflags(write=False)
    # (a literal: dict(**keywords) of these 26 entries costs 0.7 us more on an H200 host, run 57)
    return {
        "query_start_loc": query_start_loc,
        "query_lens": query_lens,
        "seq_lens": seq_lens,
        "seq_lens_exact": exact,
        "num_computed_tokens": num_computed,
        "is_prefilling": prefilling,
        "block_table": block_table,
        "slot_mapping": slot_mapping,
        "token_to_req": token_to_req,
        "num_reqs": r_pad,
        "num_actual_tokens": t_pad,
        "num_scheduled_reqs": n,
        "num_scheduled_tokens": t,
        "max_query_len": max_query_len,
        "max_seq_len": batch.max_seq_len,
        "block_size": page,
        "decode_threshold": threshold,
        "num_decodes": rows_per_region[DECODE],
        "num_decode_tokens": tokens_per_region[DECODE],
        "num_extends": rows_per_region[SHORT_EXTEND] + rows_per_region[LONG_EXTEND],
        "num_extend_tokens": tokens_per_region[SHORT_EXTEND] + tokens_per_region[LONG_EXTEND],
        "num_prefills": rows_per_region[PREFILL],
        "num_prefill_tokens": tokens_per_region[PREFILL],
        "is_decode_first": decode_first,
        "all_exact": all_exact,
        "slot_mapping_exact": all_exact,
    }


def require_exact(common: CommonMetadata, *, backend: str, reason: str) -> None:
    """Refuse a batch with inexact rows for a builder that needs exact host lengths."""
    if not common.all_exact:
        row = int(np.argmin(common.seq_lens_exact))
        raise SpecError(
            f"batch: backend {backend!r} needs exact sequence lengths for every row ({reason}), but "
            f"row {row} is marked inexact (seq_lens_exact=False). Fix: pass exact seq_lens (wait "
            f"for the previous step's accepted-draft counts), or use an option of this backend "
            f"that reads exact lengths on the device, if it has one."
        )
