"""One derivation per host field: every array the builders derive from a batch, made here once.

Each function computes one field (named after it, so a search for the field's name finds its
derivation) from plain numpy arrays and host ints, never from a `Batch`: the builders in
attnsync/_spec.py and attnsync/backends/ are straight-line calls of these functions.

Where a compiled form exists (attnsync/_native.c through attnsync/_accel.py) it is chosen
inside the same function, at its one test of `_accel.native`; the numpy form below that test is
the reference, and tests/test_native.py compares the two bit for bit. A compiled form takes
only C-contiguous int32 (and bool) arrays and returns None for anything else, which the numpy
form then takes; its array is read-only from the start (numpy's view of a bytes object).

Conventions:
    * Inputs are what `Batch` holds: C-contiguous int32 arrays (bool for flags), every length
      >= 0, `query_lens <= seq_lens`, every row's pages inside its table row, and page ids
      whose slots fit int32. So int32 arithmetic cannot overflow here, and no function
      re-checks what `Batch` checked.
    * n is the number of real rows, R >= n the padded rows (padding rows: query_len 0,
      seq_len 0), t = sum(query_lens) the real tokens, T >= t the padded tokens.
    * Every array returned is read-only: a fresh array frozen once by `_frozen`, a compiled
      result (read-only from the start), or a view of a cached read-only array. Callers share
      them between metadata objects and never write them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import _accel
from ._validate import INT32_MAX, SpecError

__all__ = [
    "DECODE", "SHORT_EXTEND", "LONG_EXTEND", "PREFILL", "REGION_NAMES", "PAD_SLOT_ID",
    "arange", "frozen_zeros", "padded", "query_start_loc", "token_to_req", "num_computed_tokens",
    "slot_mapping", "regions", "region_split", "pages_per_seq", "paged_kv_indptr",
    "paged_kv_last_page_len", "paged_kv_indices", "prefill_qo_indptr", "prefill_paged_kv_indptr",
    "prefix_mask",
]

_I32 = np.dtype(np.int32)

# Region codes of the decode-first order: decode, short extend, long extend, prefill. A backend
# that needs decode-first order needs rows sorted by region.
DECODE, SHORT_EXTEND, LONG_EXTEND, PREFILL = 0, 1, 2, 3
REGION_NAMES = ("decode", "short extend", "long extend", "prefill")

PAD_SLOT_ID = -1  # slot of a padding token (and of an inexact row's token); cache writes skip it


def _frozen(values: np.ndarray) -> np.ndarray:
    """`values`, marked read-only (the one place this module freezes what it made)."""
    values.setflags(False)  # (write=False, passed by position: keyword parsing costs more)
    return values


@functools.lru_cache(maxsize=None)
def _counting(size: int) -> np.ndarray:
    """Read-only [0, size) int32; one per power-of-two size (at most 32 of them)."""
    return _frozen(np.arange(size, dtype=_I32))


@functools.lru_cache(maxsize=256)
def arange(length: int) -> np.ndarray:
    """[length] int32 `0, 1, ..., length - 1`: a read-only view of a cached array.

    A one-token-per-row batch's `query_start_loc` and `token_to_req` are such prefixes, so a
    decode step allocates neither (and, for a length seen before, makes no view either).
    """
    return _counting(1 if length <= 1 else 1 << (length - 1).bit_length())[:length]


@functools.lru_cache(maxsize=64)
def frozen_zeros(shape: tuple[int, ...], dtype: Any = np.int32) -> np.ndarray:
    """A read-only zeros array of `shape` and `dtype`, shared by every build that asks for it.

    For fields whose value depends only on a batch's sizes (an absent `is_prefilling`, the
    placeholders of fields left to the device, FlashInfer's `[0]` offsets of no prefill rows).
    """
    return _frozen(np.zeros(shape, dtype=dtype))


def padded(values: np.ndarray, length: int, fill: int | bool) -> np.ndarray:
    """`values` ([n, ...]) with `length - n` rows of `fill` appended: [length, ...], its dtype.

    The (read-only) input itself when `length == n`; the one padding helper of every builder.
    """
    if values.shape[0] == length:
        return values
    out = np.full((length,) + values.shape[1:], fill, dtype=values.dtype)
    out[: values.shape[0]] = values
    return _frozen(out)


def query_start_loc(query_lens: np.ndarray, num_tokens: int, max_query_len: int, num_rows: int) -> np.ndarray:
    """[R+1] int32 token offsets of the rows: [0] == 0, non-decreasing, padding rows repeat t.

    Row r's tokens are `[query_start_loc[r], query_start_loc[r+1])`.

    Args:
        query_lens: [n] int32, the real rows' new tokens.
        num_tokens: t = sum(query_lens); max_query_len: max(query_lens), 0 for no rows. The
            caller's counts (`Batch` has both), so the one-token case needs no array read.
        num_rows: R >= n.
    """
    n = query_lens.shape[0]
    if num_tokens == n == num_rows and max_query_len == 1:  # one token per row: 0, 1, ..., n
        return arange(n + 1)
    out = np.empty(num_rows + 1, dtype=_I32)
    out[0] = 0
    np.add.accumulate(query_lens, out=out[1 : n + 1])
    out[n + 1 :] = num_tokens
    return _frozen(out)


def token_to_req(query_lens: np.ndarray, num_tokens: int, max_query_len: int, num_rows: int,
                 num_padded_tokens: int) -> np.ndarray:
    """[T] int32 row of each token: row r owns `query_lens[r]` consecutive tokens; padding
    tokens get R (one past the last row). Non-decreasing.

    Args as `query_start_loc`, plus num_padded_tokens: T >= t.
    """
    n = query_lens.shape[0]
    if num_tokens == n == num_padded_tokens and max_query_len == 1:  # token i is row i
        return arange(n)
    native = _accel.native
    if native is not None:
        made = native.token_to_req(query_lens, num_rows, num_padded_tokens)
        if made is not None:
            return made
    out = np.full(num_padded_tokens, num_rows, dtype=_I32)
    out[:num_tokens] = np.repeat(arange(n), query_lens)
    return _frozen(out)


def num_computed_tokens(query_lens: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    """[R] int32 context each row had before this step: `seq_lens - query_lens` (>= 0; an upper
    bound where seq_lens is one). Padding rows (0, 0) give 0."""
    return _frozen(seq_lens - query_lens)


def slot_mapping(query_lens: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray, block_size: int,
                 num_padded_tokens: int, exact: np.ndarray | None = None) -> np.ndarray:
    """[T] int32 cache slot of each new token; PAD_SLOT_ID (-1) for padding tokens and for
    every token of a row that is not exact.

    Token i of row r sits at position `p = seq_lens[r] - query_lens[r] + i` and goes to slot
    `block_table[r, p // block_size] * block_size + p % block_size`: the one host form of the
    slot formula. Rows that are not exact get -1, since the host does not know where their
    tokens go (the device recomputes those slots from exact lengths).

    Args:
        query_lens, seq_lens: [n] int32 (padding rows, query_len 0, may be included: they own
            no tokens).
        block_table: [n, W] int32 (at least n rows), covering every row's last position.
        block_size: tokens per page, >= 1.
        num_padded_tokens: T >= sum(query_lens).
        exact: [n] bool, False for a row whose seq_len is only an upper bound; None when every
            row is exact.
    """
    native = _accel.native
    if native is not None:
        made = native.slot_mapping(query_lens, seq_lens, block_table, block_size, exact, num_padded_tokens)
        if made is not None:
            return made
    n = query_lens.shape[0]
    if n == num_padded_tokens and not np.count_nonzero(query_lens != 1):  # one token per row
        row, position = arange(n), seq_lens - 1
    else:
        row = np.repeat(arange(n), query_lens)  # each token's row
        # position of token k (of row r) = k + seq_lens[r] - (tokens of rows 0..r)
        position = (seq_lens - np.add.accumulate(query_lens, dtype=_I32))[row] + arange(row.shape[0])
    # table[r, p // block_size] * block_size + p % block_size, the table read flat (row r's
    # page c at r * W + c: one take, cheaper than a two-array index)
    column = position // block_size
    width = block_table.shape[1]
    flat = row * width if n * width <= INT32_MAX else row.astype(np.int64) * width
    flat += column
    slots = block_table.reshape(-1).take(flat)
    slots *= block_size
    slots += position % block_size
    if exact is not None:
        slots[~exact[row]] = PAD_SLOT_ID
    if slots.shape[0] < num_padded_tokens:
        slots = np.concatenate([slots, np.full(num_padded_tokens - slots.shape[0], PAD_SLOT_ID, dtype=_I32)])
    return _frozen(slots)


def regions(query_lens: np.ndarray, seq_lens: np.ndarray, is_prefilling: np.ndarray | None,
            threshold: int) -> np.ndarray:
    """[n] int8 region of each row in the decode-first order, in {0, 1, 2, 3}.

    0 decode (query_len <= threshold, not prefilling), 1 short extend (<= threshold, still
    prefilling), 2 long extend (> threshold, has context), 3 prefill (> threshold, no
    context). `is_prefilling` None: no row is prefilling, so short rows are decodes.
    """
    short = query_lens <= threshold
    # long rows: 2, or 3 without context; int8 throughout (a bool viewed as int8 is 0/1)
    long_region = (seq_lens <= query_lens).view(np.int8) + np.int8(LONG_EXTEND)
    short_region = np.int8(DECODE) if is_prefilling is None else is_prefilling.view(np.int8)
    return _frozen(np.where(short, short_region, long_region))


def region_split(query_lens: np.ndarray, seq_lens: np.ndarray, is_prefilling: np.ndarray | None,
                 threshold: int, num_tokens: int, max_query_len: int
                 ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int], bool]:
    """The decode/prefill split of the real rows: `(rows, tokens, is_decode_first)`.

    `rows[k]` and `tokens[k]` (Python ints) count the rows of region k (see `regions`: decode,
    short extend, long extend, prefill) and their new tokens: the builders' `num_decodes`,
    `num_decode_tokens`, `num_extends` (regions 1 and 2), `num_prefills` and their tokens.
    `is_decode_first` is True when no decode row follows a row of another region.

    Args: as `regions`, plus num_tokens = sum(query_lens) and max_query_len = max(query_lens)
    (the caller's counts: a batch of short rows with no prefilling row is all decodes, known
    without reading an array). `is_prefilling` None: no row is prefilling.
    """
    if max_query_len <= threshold and is_prefilling is None:
        return (query_lens.shape[0], 0, 0, 0), (num_tokens, 0, 0, 0), True
    native = _accel.native
    if native is not None:
        split = native.region_split(query_lens, seq_lens, is_prefilling, threshold)
        if split is not None:
            return split
    region = regions(query_lens, seq_lens, is_prefilling, threshold)
    rows = np.bincount(region, minlength=4).tolist()
    # float weights are exact here: every total is below 2**31
    tokens = np.bincount(region, weights=query_lens, minlength=4).astype(np.int64).tolist()
    # decode-first: the first rows[DECODE] rows are the decodes (region 0)
    return tuple(rows), tuple(tokens), not np.count_nonzero(region[: rows[DECODE]])


def pages_per_seq(seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    """[R] int32 pages each row's context spans: `ceil(seq_lens / block_size)`.

    Computed as `-(-s // b)`, which cannot overflow where `s + b - 1` could: s is in
    [0, 2**31), so -s fits int32 (and any wider integer dtype keeps its own).
    """
    out = np.negative(seq_lens)
    np.floor_divide(out, block_size, out=out)
    return _frozen(np.negative(out, out=out))


def paged_kv_indptr(seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    """[R+1] int32 page offsets of the rows (FlashInfer's `paged_kv_indptr`): [0] == 0 and
    `indptr[r+1] - indptr[r] == pages_per_seq(seq_lens)[r]`; an empty row adds no page.

    Raises SpecError when the total does not fit int32 (only a table of 2**31 entries or
    more can get there, since every row's pages fit its table row).
    """
    native = _accel.native
    if native is not None:
        made = native.paged_kv_indptr(seq_lens, block_size)
        if made is not None:  # (also None where the total overflows: the numpy form names it)
            return made
    out = np.zeros(seq_lens.shape[0] + 1, dtype=np.int64)
    np.add.accumulate(pages_per_seq(seq_lens, block_size), out=out[1:])
    total = int(out[-1])
    if total > INT32_MAX:
        raise SpecError(
            f"seq_lens: the batch spans {total} KV pages at block_size {block_size}, more than "
            f"int32 offsets can address. Fix: split the batch."
        )
    return _frozen(out.astype(_I32))


def paged_kv_last_page_len(seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    """[R] int32 tokens in each row's last page (FlashInfer's `paged_kv_last_page_len`):
    `(seq_len - 1) % block_size + 1`, in [1, block_size] for a row with context; 0 for an
    empty row."""
    native = _accel.native
    if native is not None:
        made = native.paged_kv_last_page_len(seq_lens, block_size)
        if made is not None:
            return made
    out = seq_lens - 1
    out %= block_size
    out += 1
    return _frozen(np.minimum(out, seq_lens, out=out))  # an empty row: min(block_size, 0)


def paged_kv_indices(block_table: np.ndarray, paged_kv_indptr: np.ndarray) -> np.ndarray:
    """[paged_kv_indptr[-1]] int32 page ids of every row, concatenated (FlashInfer's
    `paged_kv_indices`): row r's first `paged_kv_indptr[r+1] - paged_kv_indptr[r]` entries of
    `block_table[r]`, for r = 0, 1, ....

    Args:
        block_table: [R, W] int32.
        paged_kv_indptr: [R+1] int32, as `paged_kv_indptr` makes it (each row at most W pages).
    """
    native = _accel.native
    if native is not None:
        made = native.paged_kv_indices(block_table, paged_kv_indptr)
        if made is not None:
            return made
    # read row-major, the mask of every row's first pages[r] columns is the concatenation
    return _frozen(block_table[prefix_mask(np.diff(paged_kv_indptr), block_table.shape[1])])


# Row-prefix masks come from a cached [W+1, W] table whose row p is True in its first p columns:
# `table.take(counts, axis=0)` copies R rows where the broadcast compare `arange(W) <
# counts[:, None]` computes them, several times cheaper. The table costs (W+1)*W bytes, kept
# once per width (the last 4: a server meets one block-table width and one flex list width):
# tables up to this width, 4 MiB, use it; wider ones compare.
_PREFIX_MASK_MAX_WIDTH = 2048


def prefix_mask(counts: np.ndarray, width: int) -> np.ndarray:
    """[len(counts), width] bool, row i True in its first `counts[i]` columns (0 <= counts <= width).

    Read row-major as a mask over a [R, width] table, it selects every row's first counts[i]
    entries in order: FlashInfer's page indices, flex's decode candidates and left-packed lists.
    """
    if width <= _PREFIX_MASK_MAX_WIDTH:
        return _prefix_masks(width).take(counts, axis=0)
    return arange(width) < counts[:, None]


@functools.lru_cache(maxsize=4)
def _prefix_masks(width: int) -> np.ndarray:
    """Read-only [width+1, width] bool: row p is True in columns [0, p), False after."""
    columns = np.arange(width, dtype=_I32)
    return _frozen(columns[None, :] < np.arange(width + 1, dtype=_I32)[:, None])


_NO_OFFSETS = frozen_zeros((1,))  # [0]: the offsets of no rows


def prefill_qo_indptr(query_start_loc: np.ndarray, num_decodes: int, num_reqs: int) -> np.ndarray:
    """[np+1] int32 token offsets of the prefill rows [num_decodes, num_reqs) of a decode-first
    batch, rebased to 0 (`query_start_loc[nd : n+1] - query_start_loc[nd]`): offsets into the
    prefill slice of the query tokens. [0] without prefill rows."""
    if num_decodes == num_reqs:
        return _NO_OFFSETS
    return _frozen(query_start_loc[num_decodes : num_reqs + 1] - query_start_loc[num_decodes])


def prefill_paged_kv_indptr(paged_kv_indptr: np.ndarray, num_decodes: int, num_reqs: int) -> np.ndarray:
    """[np+1] int32 page offsets of the prefill rows [num_decodes, num_reqs) of a decode-first
    batch, rebased to 0 (`paged_kv_indptr[nd : n+1] - paged_kv_indptr[nd]`): offsets into the
    prefill slice of `paged_kv_indices`. [0] without prefill rows."""
    if num_decodes == num_reqs:
        return _NO_OFFSETS
    return _frozen(paged_kv_indptr[num_decodes : num_reqs + 1] - paged_kv_indptr[num_decodes])
