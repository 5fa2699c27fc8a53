"""Boundary checks shared by `Batch`, the backends and the adapters.

Everything a user hands to attnsync passes through these helpers exactly once. They turn
lists, numpy arrays and CPU tensors of any framework into numpy int32/bool arrays, and
raise `SpecError` (a `ValueError`) or `TypeError` with a message that names the field,
says what was expected, shows what was received and says how to fix it. Code behind the
boundary trusts the result and uses plain `assert` for invariants established here.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterator
from typing import Any

import numpy as np

INT32_MAX = int(np.iinfo(np.int32).max)
INT32_MIN = int(np.iinfo(np.int32).min)
_INT32 = np.dtype(np.int32)


class SpecError(ValueError):
    """A batch, option or metadata value is wrong; the message says which and how to fix it."""


def _describe(value: Any) -> str:
    """A short description of a received value for error messages."""
    if isinstance(value, np.ndarray):
        body = np.array2string(value.ravel()[:8], separator=", ", threshold=8)
        more = ", ..." if value.size > 8 else ""
        return f"{type(value).__name__}(shape={value.shape}, dtype={value.dtype}, values={body}{more})"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _as_numpy(value: Any, field: str) -> np.ndarray:
    """`np.asarray` for lists, numpy, and CPU tensors of any framework; refuses device memory.

    A CUDA tensor converted with `np.asarray` would either fail deep inside the framework or,
    worse, silently copy device memory to the host: exactly the synchronisation attnsync exists
    to avoid. So device arrays are refused with a message that says where host data comes from.
    """
    if type(value) is np.ndarray:
        return value
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{field}: expected a plain array, received a numpy masked array "
            f"{_describe(np.ma.getdata(value))} with mask {_describe(np.ma.getmaskarray(value))}; "
            f"its mask would be ignored. Fix: pass `np.ma.getdata(x)` for the values or "
            f"`x.filled(fill)` with the value masked entries stand for."
        )
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Iterator | set | frozenset | dict):
        kind = "an unordered " + type(value).__name__ if isinstance(value, set | frozenset | dict) else (
            f"a one-shot iterator ({type(value).__name__})")
        raise TypeError(
            f"{field}: expected a list, a numpy array or a CPU tensor, received {kind}, which has "
            f"no fixed length or order to read one value per request from. Fix: pass "
            f"`list(...)` of it (or a numpy array)."
        )
    device = getattr(value, "device", None)
    device_text = str(device) if device is not None else ""
    if device_text and not device_text.lower().startswith(("cpu", "tfrt_cpu")):
        raise TypeError(
            f"{field}: expected host data (a list, a numpy array or a CPU tensor), received an array "
            f"on device {device_text!r}. Reading it would synchronise the host with the device. "
            f"Fix: pass the host copy your scheduler already holds (for example its numpy array)."
        )
    try:
        return np.asarray(value)
    except Exception as exc:  # pragma: no cover - depends on exotic inputs
        raise TypeError(f"{field}: cannot be read as an array ({exc}); received {_describe(value)}") from None


def _int32_message(field: str, bad: int) -> str:
    return (
        f"{field}: value {bad} does not fit int32 (range [{INT32_MIN}, {INT32_MAX}]). "
        f"Every metadata array is int32 (JAX silently wraps wider values). "
        f"Fix: check the scheduler's counts; they cannot be that large in a real batch."
    )


def _has_bool(value: Any) -> bool:
    """True if a (nested) list holds a bool, or a bool array, anywhere."""
    if isinstance(value, bool | np.bool_):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "b"
    return isinstance(value, list | tuple) and any(_has_bool(item) for item in value)


def _all_integral(value: Any) -> bool:
    """True if every leaf of a (nested) list is an integer, not a float."""
    if isinstance(value, list | tuple):
        return all(_all_integral(item) for item in value)
    return isinstance(value, numbers.Integral)


def _owned(arr: np.ndarray, source: Any) -> np.ndarray:
    """`arr`, copied if it is the caller's array or a view of someone's memory.

    Validated arrays are frozen and kept: sharing the caller's memory would make the caller's
    array read-only, and a later write into the caller's buffer (a scheduler's persistent
    numpy or CPU tensor) would silently change an already validated batch.
    """
    return arr.copy() if arr is source or arr.base is not None else arr


def as_int_array(
    value: Any,
    field: str,
    *,
    ndim: int,
    minimum: int | None = None,
    allow_empty_2d: bool = True,
) -> np.ndarray:
    """Return `value` as a C-contiguous int32 numpy array with `ndim` dimensions.

    Refuses bools and floats posing as integers (a float array of whole numbers is still refused:
    a float in a length field is almost always a bug upstream), NaN, values outside int32 and,
    with `minimum`, values below it.
    """
    if (
        type(value) is np.ndarray
        and value.dtype == _INT32
        and value.ndim == ndim
        and value.flags.c_contiguous
        and (minimum is None or value.size == 0 or int(value.min()) >= minimum)
    ):
        # The common case (a scheduler's own int32 array): one scan for the minimum and the
        # copy `_owned` makes, instead of the general path's dtype and list checks (together
        # with `Batch`'s one-scan block-table check, about a third less validation time).
        return value.copy()
    arr = _as_numpy(value, field)
    if arr.size == 0 and arr.dtype.kind in "fO":
        # `np.asarray([])` is float64: an empty list carries no value that could be wrong.
        arr = arr.astype(np.int64)
    if isinstance(value, list | tuple) and arr.dtype.kind in "iuf":
        # numpy hides a Python bool among ints ([1, True] -> int64) and turns ints beyond int64
        # into floats ([2**63, 1] -> float64); look at the elements before trusting the dtype.
        if _has_bool(value):
            raise TypeError(
                f"{field}: expected integers, received a bool among the values {_describe(value)}. "
                f"Fix: pass integer counts, not a mask (bool is not accepted as an int)."
            )
        if arr.dtype.kind == "f" and _all_integral(value):
            arr = np.asarray(value, dtype=object)
    if arr.dtype.kind == "b":
        raise TypeError(
            f"{field}: expected integers, received booleans {_describe(arr)}. "
            f"Fix: pass integer counts, not a mask (bool is not accepted as an int)."
        )
    if arr.dtype.kind == "f":
        what = "NaN" if np.isnan(arr).any() else "floats"
        raise TypeError(
            f"{field}: expected integers, received {what} {_describe(arr)}. "
            f"Fix: convert to an integer dtype upstream (for example `np.asarray(x, dtype=np.int32)`) "
            f"after checking the values are whole numbers."
        )
    if arr.dtype.kind not in "iu":
        if arr.dtype == object:
            for item in arr.ravel():
                if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                    raise TypeError(
                        f"{field}: expected integers, found element {item!r} of type "
                        f"{type(item).__name__}. Fix: pass a list of Python ints or an integer array."
                    )
            items = [int(item) for item in arr.ravel()]
            if items and (max(items) > INT32_MAX or min(items) < INT32_MIN):
                raise SpecError(_int32_message(field, max(items) if max(items) > INT32_MAX else min(items)))
            arr = np.asarray(arr.tolist(), dtype=np.int64)  # host object array, not a device read
        else:
            raise TypeError(f"{field}: expected an integer array, received {_describe(arr)}.")
    if arr.ndim != ndim:
        if not (allow_empty_2d and ndim == 2 and arr.size == 0 and arr.ndim == 1):
            raise SpecError(
                f"{field}: expected {ndim} dimension(s), received shape {arr.shape}. "
                f"Fix: pass {'one value per request' if ndim == 1 else 'a [num_requests, width] table'}."
            )
        arr = arr.reshape(0, 0)
    if arr.size:
        # int32 and narrower dtypes fit by construction: one pass (the minimum) instead of two.
        fits = arr.dtype == np.int32 or (arr.dtype.itemsize < 4)
        lo = int(arr.min()) if (minimum is not None or not fits) else 0
        if not fits:
            hi = int(arr.max())
            if hi > INT32_MAX or lo < INT32_MIN:
                raise SpecError(_int32_message(field, hi if hi > INT32_MAX else lo))
        if minimum is not None and lo < minimum:
            index = np.unravel_index(int(np.argmin(arr)), arr.shape)
            where = index[0] if len(index) == 1 else tuple(int(i) for i in index)
            raise SpecError(
                f"{field}: expected every value >= {minimum}, received {lo} at index {where}. "
                f"Fix: {field} cannot be negative; check how it was computed."
            )
    return _owned(np.ascontiguousarray(arr, dtype=np.int32), value)


def as_bool_array(value: Any, field: str, *, length: int) -> np.ndarray:
    """Return `value` as a bool numpy array of `length`; a Python bool broadcasts."""
    if isinstance(value, bool | np.bool_):
        return np.full(length, bool(value), dtype=bool)
    arr = _as_numpy(value, field)
    if arr.dtype.kind != "b":
        raise TypeError(
            f"{field}: expected booleans (one per request), received {_describe(arr)}. "
            f"Fix: pass a bool array such as `np.array([True, False, ...])`."
        )
    if arr.shape != (length,):
        raise SpecError(
            f"{field}: expected shape ({length},) (one value per request), received {arr.shape}. "
            f"Fix: give exactly one value per request row."
        )
    return _owned(np.ascontiguousarray(arr), value)


def as_int(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return `value` as a Python int, refusing bool, float and out-of-range values."""
    if type(value) is int and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value  # the common case, without the slower abstract-class checks below
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{field}: expected a Python int, received {_describe(value)} "
            f"({type(value).__name__}). Fix: pass an int (bool and float are not accepted)."
        )
    number = operator.index(value)
    if minimum is not None and number < minimum:
        raise SpecError(f"{field}: expected an int >= {minimum}, received {number}. Fix: pass {field} >= {minimum}.")
    if maximum is not None and number > maximum:
        raise SpecError(f"{field}: expected an int <= {maximum}, received {number}. Fix: pass {field} <= {maximum}.")
    return number


def as_choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`, else raise naming the valid ones."""
    if not isinstance(value, str):
        raise TypeError(f"{field}: expected one of {list(choices)}, received {_describe(value)}.")
    if value not in choices:
        raise SpecError(f"{field}: unknown value {value!r}; expected one of {list(choices)}.")
    return value


def freeze(arr: np.ndarray) -> np.ndarray:
    """Mark a freshly built array read-only so a frozen dataclass is frozen for its data too."""
    arr.setflags(write=False)  # half the cost of `arr.flags.writeable = False`
    return arr


# ---------------------------------------------------------------------------------------------
# Batch contents: what the pages and padding of a shape-valid batch mean.

CHECK_LEVELS = ("fast", "full")

# Padding is a CUDA-graph or jit bucket, allocated by every build in proportion to its size, so
# a bucket far beyond any captured size is refused before anything is allocated.
MAX_PADDED_REQS = 1 << 16
MAX_PADDED_TOKENS = 1 << 24


def check_padding(padded_reqs: int, num_reqs: int, padded_tokens: int, num_tokens: int) -> None:
    """Refuse padding beyond `MAX_PADDED_REQS` rows / `MAX_PADDED_TOKENS` tokens (real rows and
    tokens themselves are never limited here: their arrays already exist)."""
    if padded_reqs > max(num_reqs, MAX_PADDED_REQS):
        raise SpecError(
            f"padded_num_reqs: {padded_reqs} rows, expected at most {MAX_PADDED_REQS} (or the "
            f"batch's own {num_reqs}). Every build allocates its padded rows (block table "
            f"included). Fix: pad to the bucket you captured or jitted, or leave it None."
        )
    if padded_tokens > max(num_tokens, MAX_PADDED_TOKENS):
        raise SpecError(
            f"padded_num_tokens: {padded_tokens} tokens, expected at most {MAX_PADDED_TOKENS} (or "
            f"the batch's own {num_tokens}). Every build allocates its padded tokens. Fix: pad "
            f"to the bucket you captured or jitted, or leave it None."
        )


def _entries(rows: np.ndarray, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every block-table entry in columns [first[i], last[i]] of rows[i]."""
    counts = (last - first + 1).astype(np.int64)
    row_of = np.repeat(rows, counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    cols = np.repeat(first.astype(np.int64), counts) + (np.arange(row_of.size, dtype=np.int64) - starts)
    return row_of, cols


def check_pages(query_lens: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray,
                block_size: int, exact: np.ndarray) -> None:
    """`Batch(check="full")`: refuse a batch whose tokens sit or are written where they must not.

    Refused: a new token written into page 0, the padding page; a live context position in
    page 0; a page a row writes that appears a second time among the rows' live pages (two
    tokens writing one slot, one row writing into another row's page, or a row holding the
    page it writes twice). Rows may share pages they only read (prefix caching). Rows marked
    inexact are not checked: the host does not know where their tokens go. Work
    in proportion to every live page of the batch (a sort of them), so this is a level for
    tests and debugging, not the per-step default.
    """
    bs = block_size
    q64, s64 = query_lens.astype(np.int64), seq_lens.astype(np.int64)
    writes = (q64 > 0) & exact
    rows = np.flatnonzero(writes)
    if rows.size:
        first = (s64[rows] - q64[rows]) // bs
        last = (s64[rows] - 1) // bs
        row_of, cols = _entries(rows, first, last)
        pages = block_table[row_of, cols]
        zero = pages == 0
        if zero.any():
            i = int(np.argmax(zero))
            r, c = int(row_of[i]), int(cols[i])
            lo, hi = max(int(s64[r] - q64[r]), c * bs), min(int(s64[r]), (c + 1) * bs)
            raise SpecError(
                f"block_table: row {r} writes its new tokens at positions [{lo}, {hi}) into "
                f"block_table[{r}, {c}] = 0, page 0, the padding page (unused entries are padded "
                f"with 0, so page 0 holds no live token). Fix: allocate a page for the row's new "
                f"tokens and put its id in column {c}."
            )
    npages = np.where(exact, -(-s64 // bs), 0)  # (an inexact row's live length is unknown)
    live = np.arange(block_table.shape[1], dtype=np.int64) < npages[:, None]
    zero = live & (block_table == 0)
    if zero.any():
        r, c = (int(i) for i in np.unravel_index(int(np.argmax(zero)), zero.shape))
        raise SpecError(
            f"block_table: row {r} (seq_len {int(s64[r])}) reads positions [{c * bs}, "
            f"{min(int(s64[r]), (c + 1) * bs)}) from block_table[{r}, {c}] = 0, page 0, the padding "
            f"page (unused entries are padded with 0, so page 0 holds no live token). Fix: put "
            f"the id of the page holding those positions in column {c}."
        )
    if not rows.size:
        return
    live_pages = block_table[live]  # row-major: every live entry once
    order = np.sort(live_pages)
    counts = np.searchsorted(order, pages, side="right") - np.searchsorted(order, pages, side="left")
    shared = counts > 1
    if not shared.any():
        return
    i = int(np.argmax(shared))
    r, c, page = int(row_of[i]), int(cols[i]), int(pages[i])
    holders = np.argwhere(live & (block_table == page))
    r2, c2 = next((int(a), int(b)) for a, b in holders if (int(a), int(b)) != (r, c))

    def written(row: int, col: int) -> tuple[int, int]:  # offsets the row's new tokens write
        lo = max(int(s64[row] - q64[row]), col * bs) if writes[row] else (col + 1) * bs
        return lo - col * bs, min(int(s64[row]), (col + 1) * bs) - col * bs

    (a0, a1), (b0, b1) = written(r, c), written(r2, c2)
    if max(a0, b0) < min(a1, b1):
        who = "the same row" if r2 == r else f"row {r2}"
        what = (f"{who} writes it too (block_table[{r2}, {c2}]): both write cache slot "
                f"{page * bs + max(a0, b0)}, two tokens into one slot")
    elif r2 == r:
        what = f"row {r} holds page {page} twice (columns {c2} and {c}) and writes it"
    else:
        what = (f"row {r2} also holds it (block_table[{r2}, {c2}]); rows may share pages they "
                f"only read (prefix caching), but a page a row writes is its own")
    raise SpecError(
        f"block_table: row {r} writes its new tokens into page {page} (block_table[{r}, {c}]), and "
        f"{what}. Fix: give each row a fresh page of its own for the tokens it writes."
    )


def check_contents(batch: Any, check: Any) -> None:
    """`Batch`'s checks of its padding and, at level "full", of what its pages mean (see
    `check_pages`), after every field is set; the one call `Batch` makes for them."""
    if batch.padded_num_reqs > MAX_PADDED_REQS or batch.padded_num_tokens > MAX_PADDED_TOKENS:
        check_padding(batch.padded_num_reqs, batch.num_reqs, batch.padded_num_tokens, batch.num_tokens)
    if check != "fast" and as_choice(check, "check", CHECK_LEVELS) == "full":
        check_pages(batch.query_lens, batch.seq_lens, batch.block_table, batch.block_size,
                    batch.seq_lens_exact)
