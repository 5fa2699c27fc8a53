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
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import _fields
from ._batch import Batch
from ._fields import DECODE, LONG_EXTEND, PAD_SLOT_ID, PREFILL, SHORT_EXTEND, frozen_zeros, prefix_mask
from ._plan import BUILT_MARK, check_lowerable
from ._validate import SpecError, as_int

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "BUILT_MARK", "PAD_SLOT_ID", "CommonMetadata", "array_field", "array_fields", "build_common",
    "check_lowerable", "common_fields", "construct", "fields_getter", "frozen_zeros", "inexact_error",
    "inherit", "inherit_fields", "prefix_mask", "scalar_fields",
]

_M = TypeVar("_M", bound="DataclassInstance")  # a metadata dataclass


def array_field(*, place: str, device_name: str | None = None, host_name: str | None = None) -> Any:
    """Declare an array field and how it travels (see the module docstring).

    `device_name` / `host_name` rename the field in lowered objects (vLLM's names); by default
    the device copy keeps the field name and a host mirror of a "both" field gets `_cpu`.
    """
    assert place in ("device", "host", "both", "numpy"), place
    return field(metadata={"place": place, "device_name": device_name, "host_name": host_name})


def array_fields(md: Any) -> list[dataclasses.Field[Any]]:
    """The array fields of a metadata dataclass, in declaration order."""
    return [f for f in dataclasses.fields(md) if "place" in f.metadata]


def scalar_fields(md: Any) -> list[dataclasses.Field[Any]]:
    """The host scalar fields (int, bool, str) of a metadata dataclass."""
    return [f for f in dataclasses.fields(md) if "place" not in f.metadata]


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




def construct(cls: type[_M], values: dict[str, Any]) -> _M:
    """An instance of the frozen metadata dataclass `cls` holding `values`, one per field.

    The one place that makes metadata past the frozen dataclass's generated `__init__`, which
    sets each field through `object.__setattr__` and costs several times one dict assignment;
    builders run once per step, so they call this instead of `cls(**values)`. Metadata classes
    have no `__post_init__` to skip; the field count is checked, so a builder that forgets a
    field fails here, not at a later attribute read. Only builders call this, with arrays
    derived from a validated `Batch`. The caller hands `values` over: it becomes the
    instance's attribute dict (no copy), so pass a dict nothing else keeps.
    """
    # A forgotten field makes the count differ (cheaper than comparing every key each step;
    # builders' tests read every field, so a swapped name fails there too).
    count = _FIELD_COUNTS.get(cls)
    if count is None:
        count = _FIELD_COUNTS[cls] = len(dataclasses.fields(cls))
    if len(values) != count:
        names = {f.name for f in dataclasses.fields(cls)}
        missing, extra = sorted(names - values.keys()), sorted(values.keys() - names)
        raise AssertionError(f"{cls.__name__}: fields missing {missing}, unknown {extra}")
    md: _M = object.__new__(cls)
    # Trusted by the adapters' `check_lowerable`: `dataclasses.replace` and hand-made instances
    # go through `__init__` and carry no mark, so edited metadata is still checked.
    values[BUILT_MARK] = True
    object.__setattr__(md, "__dict__", values)  # (past the frozen class's own __setattr__)
    return md


_FIELD_COUNTS: dict[type, int] = {}  # metadata class -> its number of fields


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
    values = dict(zip(names, fetch(common), strict=False))
    values.update(own)
    return construct(cls, values)


@functools.cache
def _shared_names(cls: type) -> tuple[tuple[str, ...], Any]:
    mine = {f.name for f in dataclasses.fields(cls)}
    names = tuple(f.name for f in dataclasses.fields(CommonMetadata) if f.name in mine)
    return names, fields_getter(names)


def fields_getter(names: tuple[str, ...]) -> Any:
    """`getter(mapping)` -> the values of `names` in order, always a tuple, in one C call for
    two or more names (`operator.itemgetter`, cheaper than per-name lookups in a Python loop
    for a metadata class's 10-25 fields)."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    return lambda mapping: tuple(mapping[name] for name in names)


def build_common(batch: Batch, *, decode_threshold: int = 1, slots: bool = True) -> CommonMetadata:
    """Build the common metadata of `batch` (host only, numpy).

    Args:
        batch: the validated batch.
        decode_threshold: rows with at most this many new tokens count as decodes in the split.
        slots: compute `slot_mapping`. False (internal: for a consumer that derives the slots
            on the device and never reads the host ones, flex's captured step) leaves it a
            shared read-only array of zeros of the right shape, and skips its derivation.
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
    without making the `CommonMetadata` object in between.

    Each array comes from its one function in attnsync/_fields.py (read-only, shared with the
    batch where it is the batch's own array: unpadded rows are not copied)."""
    n, rows, tokens = batch.num_reqs, batch.padded_num_reqs, batch.padded_num_tokens
    total, longest, page = batch.num_tokens, batch.max_query_len, batch.block_size
    q, s, table, exact = batch.query_lens, batch.seq_lens, batch.block_table, batch.seq_lens_exact
    prefilling = batch.is_prefilling
    if rows == n:  # no padding rows: the batch's own read-only arrays
        query_lens, seq_lens, exact_rows, table_rows, prefilling_rows = q, s, exact, table, prefilling
    else:
        query_lens, seq_lens = _fields.padded(q, rows, 0), _fields.padded(s, rows, 0)
        exact_rows, table_rows = _fields.padded(exact, rows, True), _fields.padded(table, rows, 0)
        prefilling_rows = None if prefilling is None else _fields.padded(prefilling, rows, False)
    if slots:
        slot_mapping = _fields.slot_mapping(q, s, table, page, tokens, None if batch.all_exact else exact)
    else:
        slot_mapping = frozen_zeros((tokens,))  # never read (see build_common)
    rows_per_region, tokens_per_region, decode_first = _fields.region_split(
        q, s, prefilling if batch.any_prefilling else None, threshold, total, longest)
    # (a dict literal: cheaper than dict(**keywords) for these 26 entries)
    return {
        "query_start_loc": _fields.query_start_loc(q, total, longest, rows),
        "query_lens": query_lens,
        "seq_lens": seq_lens,
        "seq_lens_exact": exact_rows,
        "num_computed_tokens": _fields.num_computed_tokens(query_lens, seq_lens),
        "is_prefilling": frozen_zeros((rows,), bool) if prefilling_rows is None else prefilling_rows,
        "block_table": table_rows,
        "slot_mapping": slot_mapping,
        "token_to_req": _fields.token_to_req(q, total, longest, rows, tokens),
        "num_reqs": rows,
        "num_actual_tokens": tokens,
        "num_scheduled_reqs": n,
        "num_scheduled_tokens": total,
        "max_query_len": longest,
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
        "all_exact": batch.all_exact,
        "slot_mapping_exact": batch.all_exact,
    }


def inexact_error(seq_lens_exact: np.ndarray, *, backend: str, reason: str) -> SpecError:
    """The error for a batch with inexact rows given to a builder that needs exact host lengths
    (`seq_lens_exact` has a False entry), naming the first such row."""
    row = int(np.argmin(seq_lens_exact))
    return SpecError(
        f"batch: backend {backend!r} needs exact sequence lengths for every row ({reason}), but "
        f"row {row} is marked inexact (seq_lens_exact=False). Fix: pass exact seq_lens (wait "
        f"for the previous step's accepted-draft counts), or use an option of this backend "
        f"that reads exact lengths on the device, if it has one."
    )
