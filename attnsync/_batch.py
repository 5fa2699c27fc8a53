"""`Batch`: the validated host description of one serving step, and `reorder`.

A `Batch` is what the scheduler knows on the host before the step runs: how many new tokens
each request gets, how long each sequence will be, which KV-cache pages it owns. Everything
attnsync builds is derived from it, so it is checked here once, completely.
"""

from __future__ import annotations

import functools
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike

from . import _accel
from ._fields import DECODE, LONG_EXTEND, PREFILL, REGION_NAMES, SHORT_EXTEND, pages_per_seq, regions
from ._validate import (
    INT32_MAX,
    SpecError,
    as_bool_array,
    as_int,
    as_int_array,
    check_contents,
    freeze,
)

if TYPE_CHECKING:  # (a runtime import would be circular: the view's module imports this one)
    from ._block_table import BlockTableView

__all__ = ["DECODE", "LONG_EXTEND", "PREFILL", "REGION_NAMES", "SHORT_EXTEND", "Batch", "TableMemory",
           "decode_first_error", "reorder", "require_decode_first"]


@functools.lru_cache(maxsize=64)
def _uniform_flags(length: int, value: bool) -> np.ndarray:
    """A read-only bool array of `length` copies of `value`, shared by every batch that asks
    (`seq_lens_exact` given as one bool: the common case)."""
    return freeze(np.full(length, value, dtype=bool))


class TableMemory(Protocol):
    """Where a `Batch` copies its block table (see `Batch`'s `table_memory`)."""

    def table_buffer(self, shape: tuple[int, int]) -> np.ndarray | None:
        """A writable C-contiguous int32 array of exactly `shape`, or None (numpy allocates)."""


def _table_buffer(table_memory: TableMemory, shape: tuple[int, int]) -> np.ndarray | None:
    """The buffer `table_memory` offers for a table of `shape`, checked; None if it offers none."""
    buffer = table_memory.table_buffer(shape)
    if buffer is None:
        return None
    if not (type(buffer) is np.ndarray and buffer.dtype == np.int32 and buffer.shape == shape
            and buffer.flags.c_contiguous and buffer.flags.writeable):
        what = (f"a {'' if buffer.flags.writeable else 'read-only '}"
                f"{'C-contiguous' if buffer.flags.c_contiguous else 'strided'} {buffer.dtype} array of shape "
                f"{buffer.shape}" if isinstance(buffer, np.ndarray) else type(buffer).__name__)
        raise TypeError(
            f"table_memory: table_buffer({shape}) returned {what}; expected a writable C-contiguous "
            f"int32 numpy array of shape {shape}, or None. Fix: return exactly that (or None to let "
            f"numpy allocate the table)."
        )
    return buffer


def _checked_natively(query_lens: Any, seq_lens: Any, block_table: Any,
                      table_memory: TableMemory | None) -> tuple[Any, ...] | None:
    """`Batch`'s array checks in one compiled call when all three are plain int32 arrays and
    pass (copies, total tokens, the longest query and sequence, the table's largest entry as
    uint32 or None); None otherwise, and the numpy checks run (and name any problem)."""
    native = _accel.native
    # numpy arrays of any dtype and layout: their copies below have the same dtype and shape,
    # and the compiled check itself returns None unless all three are C-contiguous int32 of
    # the right dimensions (lists and other inputs go to the numpy checks directly).
    if native is None or not type(query_lens) is type(seq_lens) is type(block_table) is np.ndarray:
        return None
    table_copy = None
    if (table_memory is not None and block_table.dtype == np.int32 and block_table.ndim == 2
            and block_table.flags.c_contiguous):  # (else the numpy checks run, and ask then)
        table_copy = _table_buffer(table_memory, block_table.shape)
    copies = (np.empty_like(query_lens), np.empty_like(seq_lens),
              np.empty_like(block_table) if table_copy is None else table_copy)
    found = native.check_batch(query_lens, seq_lens, block_table, *copies)
    return None if found is None else (*copies, *found)


def _init_from_view(batch: Batch, block_size: int) -> None:
    """`Batch.__post_init__` for `block_table=BlockTableView`: every check in O(rows), no copy.

    The view's state checked every page id when its verbs stored it (each in
    `[1, num_cache_pages)`), so the table is not scanned again: only the bound those ids imply
    is checked (a scan happens only where that bound is not enough). The batch's `block_table`
    is the view's table (the mirror's rows in place when the view is condensed).
    """
    view: Any = batch.block_table  # (a BlockTableView here, not the array the field ends as)
    query_lens = as_int_array(batch.query_lens, "query_lens", ndim=1, minimum=0)
    seq_lens = as_int_array(batch.seq_lens, "seq_lens", ndim=1, minimum=0)
    num_reqs = query_lens.shape[0]
    if seq_lens.shape[0] != num_reqs or view.num_rows != num_reqs:
        raise SpecError(
            f"seq_lens / block_table: expected one value and one view row per request ({num_reqs}, the "
            f"length of query_lens), received {seq_lens.shape[0]} lengths and a view of "
            f"{view.num_rows} rows. Fix: make the view with state.view(rows) for exactly the batch's rows."
        )
    too_long = query_lens > seq_lens
    if too_long.any():
        row = int(np.argmax(too_long))
        raise SpecError(
            f"query_lens: row {row} has query_len {int(query_lens[row])} > seq_len {int(seq_lens[row])}. "
            f"Fix: pass seq_lens = num_computed_tokens + query_lens."
        )
    total_tokens = int(query_lens.sum(dtype=np.int64))
    max_seq_len = int(seq_lens.max()) if num_reqs else 0
    if total_tokens > INT32_MAX:
        raise SpecError(f"query_lens: the total {total_tokens} does not fit int32.")
    pages = view.pages  # (refuses a view made before a later verb)
    short = pages_per_seq(seq_lens, block_size) > pages
    if short.any():
        row = int(np.argmax(short))
        raise SpecError(
            f"block_table: row {row} (table row {int(view.rows[row])}) holds {int(pages[row])} pages, "
            f"but seq_len {int(seq_lens[row])} at block_size {block_size} needs "
            f"{int(pages_per_seq(seq_lens[row : row + 1], block_size)[0])}. Fix: append the row's pages "
            f"(BlockTableState.append / append_many) before describing the step."
        )
    table = view.table
    max_page = view.max_page_bound
    if (max_page + 1) * block_size - 1 > INT32_MAX:  # the bound is not enough: the real largest id
        max_page = int(table.max()) if table.size else 0
        if (max_page + 1) * block_size - 1 > INT32_MAX:
            raise SpecError(
                f"block_table: page id {max_page} at block_size {block_size} gives slot ids beyond "
                f"int32. Fix: the KV cache cannot have that many slots."
            )
    num_cache_pages = None
    if batch.num_cache_pages is not None:
        num_cache_pages = as_int(batch.num_cache_pages, "num_cache_pages", minimum=1)
        if max_page >= num_cache_pages:
            batch._check_cache_pages(table, int(table.max()) if table.size else 0)
    batch._finish(block_size, query_lens, seq_lens, table, num_reqs, total_tokens,
                  int(query_lens.max()) if num_reqs else 0, max_seq_len, num_cache_pages)
    batch.__dict__["table_view"] = view


@dataclass(frozen=True, kw_only=True, eq=False)
class Batch:
    """Host description of one serving step (numpy int32 inside, read-only).

    Every argument is keyword-only and validated on construction; a malformed batch raises
    `SpecError` (a `ValueError`) or `TypeError` naming the field, what was expected, what was
    received and how to fix it. Inputs may be lists, numpy arrays or CPU tensors of any
    framework (read with `np.asarray`); device arrays are refused, since reading them would
    synchronise.

    Args:
        query_lens: shape [R], int. New tokens of each request this step (exact).
        seq_lens: shape [R], int. Sequence length of each request after this step, as the host
            knows it: exact, or for rows marked inexact an upper bound (async speculative
            decoding assumes every draft was accepted). `query_lens[r] <= seq_lens[r]`.
        block_table: shape [R, W], int. KV-cache page ids of each request; row r needs at least
            `ceil(seq_lens[r] / block_size)` columns. Page ids are >= 0 (0 is the null page).
        block_size: tokens per KV-cache page, > 0.
        seq_lens_exact: shape [R] bool, or one bool for all rows (default True). False marks a
            row whose `seq_lens` is only an upper bound (a decode row under async speculative
            decoding, too large by at most the number of rejected drafts). Such a row must
            already have context and must not be prefilling.
        is_prefilling: shape [R] bool, optional. True while a request is still in its prompt
            (chunked prefill); separates short extends from decodes in `reorder`.
        padded_num_reqs: rows to pad the batch to (a CUDA-graph or jit bucket), >= R.
        padded_num_tokens: tokens to pad the batch to, >= sum(query_lens).
        num_cache_pages: optional number of pages in the KV cache; page ids must be below it.
        table_memory: optional, init-only: where to copy the block table. An object with one
            method, `table_buffer(shape: tuple[int, int]) -> numpy.ndarray | None`, returning a
            writable C-contiguous int32 array of exactly that shape for the batch's copy of its
            table, or None (numpy allocates it as usual). The torch adapter's `Stager` offers
            one that hands out pinned host memory, from which a CUDA lowering copies the table
            to the device without packing it again; the object decides which sizes it serves,
            and `Batch` asks it for every table. The batch keeps the array, not the object
            (it is not a field), and a batch refused during validation needs no give-back: the
            object reclaims a buffer once nothing references it. A wrong array (shape, dtype,
            layout or read-only) is refused with a `TypeError`.
        check: init-only, how much of what the pages mean is checked. "fast" (default): the
            checks above and no per-page work. "full" (tests, debugging; work in proportion to
            every live page): also refuses a new token written into page 0 (the padding page),
            a live context position in page 0, two tokens writing one cache slot, and a row
            writing a page that another row (or the same row in another column) also holds;
            rows may share pages they only read (prefix caching). At every level, padding
            beyond 65,536 rows or 16,777,216 tokens is refused before anything is allocated.

    Attributes:
        num_reqs: R, the real request count.
        num_tokens: sum of `query_lens`, the real token count.
        all_exact: True when every row's `seq_lens` is exact.
        max_query_len, max_seq_len: the largest `query_lens` and `seq_lens` (0 for no rows).
        any_prefilling: True when `is_prefilling` marks at least one row.

    Example:
        >>> import attnsync
        >>> batch = attnsync.Batch(query_lens=[1, 4], seq_lens=[9, 4], block_table=[[3, 5], [7, 0]],
        ...                        block_size=8)
        >>> batch.num_reqs, batch.num_tokens
        (2, 5)
    """

    # Typed as the values after construction; the arguments' types are those of the
    # `__init__` stub below (lists, arrays, CPU tensors), which mypy reads and runtime never sees.
    query_lens: np.ndarray
    seq_lens: np.ndarray
    block_table: np.ndarray
    block_size: int
    seq_lens_exact: np.ndarray = True  # type: ignore[assignment]  # (one bool becomes an array)
    is_prefilling: np.ndarray | None = None
    padded_num_reqs: int = None  # type: ignore[assignment]  # (None: the real count is set)
    padded_num_tokens: int = None  # type: ignore[assignment]  # (None: the real count is set)
    num_cache_pages: int | None = None
    table_memory: InitVar[TableMemory | None] = None
    check: InitVar[str] = "fast"
    num_reqs: int = field(init=False)
    num_tokens: int = field(init=False)
    all_exact: bool = field(init=False)
    max_query_len: int = field(init=False)
    max_seq_len: int = field(init=False)
    any_prefilling: bool = field(init=False)
    # The `attnsync.BlockTableView` the batch's table was read from (block_table=view), else
    # None: a device-table lowering takes the table rows from it (not a field: never copied).
    table_view: ClassVar[Any] = None

    if TYPE_CHECKING:  # what the constructor accepts (the dataclass makes the real __init__)
        def __init__(
            self, *, query_lens: ArrayLike, seq_lens: ArrayLike, block_table: ArrayLike | BlockTableView,
            block_size: int | np.integer[Any], seq_lens_exact: bool | ArrayLike = True,
            is_prefilling: ArrayLike | None = None, padded_num_reqs: int | np.integer[Any] | None = None,
            padded_num_tokens: int | np.integer[Any] | None = None,
            num_cache_pages: int | np.integer[Any] | None = None, table_memory: TableMemory | None = None,
            check: Literal["fast", "full"] = "fast",
        ) -> None: ...

    def __post_init__(self, table_memory: TableMemory | None, check: str) -> None:
        block_size = self.block_size
        if not (type(block_size) is int and 1 <= block_size <= INT32_MAX):  # (the common case inline)
            block_size = as_int(block_size, "block_size", minimum=1, maximum=INT32_MAX)
        if getattr(type(self.block_table), "is_block_table_view", False):
            _init_from_view(self, block_size)
            return
        checked = _checked_natively(self.query_lens, self.seq_lens, self.block_table, table_memory)
        if checked is not None:
            # The compiled happy path (attnsync/_accel.py): the three arrays copied, lengths
            # checked >= 0 and query_len <= seq_len, in one call. Everything else is checked
            # below, the same way for both paths.
            query_lens, seq_lens, block_table, total_tokens, max_query_len, max_seq_len, max_page = checked
            num_reqs = query_lens.shape[0]
        else:
            query_lens, seq_lens, block_table, total_tokens, max_seq_len = self._check_arrays()
            num_reqs = query_lens.shape[0]
            max_query_len = int(query_lens.max()) if num_reqs else 0
            max_page = None
            buffer = None if table_memory is None else _table_buffer(table_memory, block_table.shape)
            if buffer is not None:
                buffer[...] = block_table
                block_table = buffer
        if max_page is None:
            # Seen as uint32, a negative page id is >= 2**31: one max() finds both the largest
            # page and any negative one (the table is the biggest input: R x W, 512 KB at 256 x
            # 512). The compiled check finds it while copying the table, where the CPU has AVX2.
            max_page = int(block_table.view(np.uint32).max()) if block_table.size else 0
        if total_tokens > INT32_MAX:
            raise SpecError(f"query_lens: the total {total_tokens} does not fit int32.")
        width = block_table.shape[1]
        if -(-max_seq_len // block_size) > width:  # the longest row decides; find the first one
            pages_needed = pages_per_seq(seq_lens, block_size)
            narrow = pages_needed > width
            row = int(np.argmax(narrow))
            raise SpecError(
                f"block_table: row {row} needs {int(pages_needed[row])} pages for seq_len "
                f"{int(seq_lens[row])} at block_size {block_size}, but the table has only {width} "
                f"columns. Fix: widen the table to at least {int(pages_needed.max())} columns "
                f"(pad unused entries with 0)."
            )
        if max_page > INT32_MAX:  # seen as uint32, a negative id
            index = np.unravel_index(int(np.argmin(block_table)), block_table.shape)
            raise SpecError(
                f"block_table: expected every value >= 0, received {int(block_table.min())} at index "
                f"{tuple(int(i) for i in index)}. Fix: block_table cannot be negative; check how it was "
                f"computed."
            )
        if (max_page + 1) * block_size - 1 > INT32_MAX:
            raise SpecError(
                f"block_table: page id {max_page} at block_size {block_size} gives "
                f"slot ids beyond int32. Fix: the KV cache cannot have that many slots."
            )
        num_cache_pages = self._check_cache_pages(block_table, max_page)
        self._finish(block_size, query_lens, seq_lens, block_table, num_reqs, total_tokens,
                     max_query_len, max_seq_len, num_cache_pages)
        check_contents(self, check)  # pages and padding (attnsync/_validate.py)

    def _check_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """The general path: query_lens, seq_lens and block_table validated and copied, the
        total of query_lens and the longest seq_len."""
        query_lens = as_int_array(self.query_lens, "query_lens", ndim=1, minimum=0)
        num_reqs = query_lens.shape[0]
        seq_lens = as_int_array(self.seq_lens, "seq_lens", ndim=1, minimum=0)
        if seq_lens.shape[0] != num_reqs:
            raise SpecError(
                f"seq_lens: expected one value per request ({num_reqs}, the length of query_lens), "
                f"received {seq_lens.shape[0]}. Fix: query_lens, seq_lens and block_table rows "
                f"must describe the same requests."
            )
        # Range checked below with the largest page id, in one scan of the table.
        block_table = as_int_array(self.block_table, "block_table", ndim=2)
        if block_table.shape[0] != num_reqs:
            if block_table.size == 0 and num_reqs == 0:
                block_table = block_table.reshape(0, block_table.shape[1] if block_table.ndim == 2 else 0)
            else:
                raise SpecError(
                    f"block_table: expected {num_reqs} rows (one per request), received shape "
                    f"{block_table.shape}. Fix: pass one row of page ids per request."
                )
        too_long = query_lens > seq_lens
        if too_long.any():
            row = int(np.argmax(too_long))
            raise SpecError(
                f"query_lens: row {row} has query_len {int(query_lens[row])} > seq_len "
                f"{int(seq_lens[row])}. seq_lens counts this step's new tokens too, so it is at "
                f"least query_len. Fix: pass seq_lens = num_computed_tokens + query_lens."
            )
        total_tokens = int(query_lens.sum(dtype=np.int64))
        max_seq_len = int(seq_lens.max()) if num_reqs else 0
        return query_lens, seq_lens, block_table, total_tokens, max_seq_len

    def _check_cache_pages(self, block_table: np.ndarray, max_page: int) -> int | None:
        """`num_cache_pages` as a Python int (None when not given), every page id below it."""
        num_pages = None
        if self.num_cache_pages is not None:
            num_pages = as_int(self.num_cache_pages, "num_cache_pages", minimum=1)
            if block_table.size and max_page >= num_pages:
                bad = np.unravel_index(int(np.argmax(block_table)), block_table.shape)
                raise SpecError(
                    f"block_table: page id {max_page} at {tuple(int(i) for i in bad)} "
                    f"is outside the cache of num_cache_pages={num_pages} pages. Fix: page ids must "
                    f"be below num_cache_pages."
                )
        return num_pages

    def _finish(self, block_size: int, query_lens: np.ndarray, seq_lens: np.ndarray,
                block_table: np.ndarray, num_reqs: int, total_tokens: int, max_query_len: int,
                max_seq_len: int, num_cache_pages: int | None) -> None:
        """The per-row flags and padded sizes, checked; every field set."""
        given: Any = self.seq_lens_exact  # (still the argument as passed: one bool or array-like)
        if type(given) is bool:  # one flag for every row: a shared read-only array
            exact = _uniform_flags(num_reqs, given)
        else:
            exact = freeze(as_bool_array(given, "seq_lens_exact", length=num_reqs))
        all_exact = given is True or bool(exact.all())
        no_context = None if all_exact else ~exact & (seq_lens <= query_lens)
        if no_context is not None and no_context.any():
            row = int(np.argmax(no_context))
            raise SpecError(
                f"seq_lens_exact: row {row} is marked inexact but has no context (seq_len "
                f"{int(seq_lens[row])}, query_len {int(query_lens[row])}). Only decode rows under "
                f"async speculative decoding may carry an upper bound; prefill rows are always "
                f"exact. Fix: mark the row exact."
            )
        if self.is_prefilling is None:
            prefilling = None
        else:
            prefilling = as_bool_array(self.is_prefilling, "is_prefilling", length=num_reqs)
            both = None if all_exact else prefilling & ~exact
            if both is not None and both.any():
                row = int(np.argmax(both))
                raise SpecError(
                    f"seq_lens_exact: row {row} is prefilling but marked inexact. A prefilling row "
                    f"carries no drafts, so its length is always exact. Fix: mark it exact."
                )
            freeze(prefilling)
        padded_reqs = num_reqs if self.padded_num_reqs is None else as_int(
            self.padded_num_reqs, "padded_num_reqs", minimum=0, maximum=INT32_MAX - 1
        )
        if padded_reqs < num_reqs:
            raise SpecError(
                f"padded_num_reqs: {padded_reqs} is smaller than the batch's {num_reqs} requests. "
                f"Fix: choose a bucket >= {num_reqs} (or leave it None for no padding)."
            )
        padded_tokens = total_tokens if self.padded_num_tokens is None else as_int(
            self.padded_num_tokens, "padded_num_tokens", minimum=0, maximum=INT32_MAX
        )
        if padded_tokens < total_tokens:
            raise SpecError(
                f"padded_num_tokens: {padded_tokens} is smaller than the batch's {total_tokens} "
                f"tokens. Fix: choose a bucket >= {total_tokens} (or leave it None)."
            )
        query_lens.setflags(False)  # type: ignore[call-arg]  # (write=False, by position: cheaper than the keyword)
        seq_lens.setflags(False)  # type: ignore[call-arg]
        block_table.setflags(False)  # type: ignore[call-arg]
        # Every field in one update of the instance dict: the one place a Batch is written past
        # its frozen class's __setattr__ (cheaper than one object.__setattr__ per field).
        self.__dict__.update({
            "block_size": block_size,
            "query_lens": query_lens,
            "seq_lens": seq_lens,
            "block_table": block_table,
            "seq_lens_exact": exact,
            "is_prefilling": prefilling,
            "padded_num_reqs": padded_reqs,
            "padded_num_tokens": padded_tokens,
            "num_cache_pages": num_cache_pages,
            "num_reqs": num_reqs,
            "num_tokens": total_tokens,
            "all_exact": all_exact,
            "max_query_len": max_query_len,
            "max_seq_len": max_seq_len,
            "any_prefilling": prefilling is not None and bool(prefilling.any()),
        })

    @property
    def num_computed_tokens(self) -> np.ndarray:
        """shape [R], int32: `seq_lens - query_lens` (an upper bound where a row is inexact)."""
        computed: np.ndarray = self.seq_lens - self.query_lens
        return computed

    def regions(self, decode_threshold: int = 1) -> np.ndarray:
        """Region of each row in the decode-first order: shape [R], int8 in {0, 1, 2, 3}.

        0 decode (query_len <= threshold, not prefilling), 1 short extend (<= threshold, still
        prefilling), 2 long extend (> threshold, has context), 3 prefill (> threshold, no
        context). Without `is_prefilling`, short rows count as decodes.
        """
        threshold = as_int(decode_threshold, "decode_threshold", minimum=1)
        return regions(self.query_lens, self.seq_lens, self.is_prefilling, threshold)

    def take(self, rows: np.ndarray) -> Batch:
        """A new batch holding `rows` of this one, in that order (padding sizes kept)."""
        rows = np.asarray(rows, dtype=np.int64)
        return Batch(
            query_lens=self.query_lens[rows],
            seq_lens=self.seq_lens[rows],
            block_table=self.block_table[rows],
            block_size=self.block_size,
            seq_lens_exact=self.seq_lens_exact[rows],
            is_prefilling=None if self.is_prefilling is None else self.is_prefilling[rows],
            padded_num_reqs=self.padded_num_reqs,
            padded_num_tokens=self.padded_num_tokens,
            num_cache_pages=self.num_cache_pages,
        )


def reorder(batch: Batch, *, decode_threshold: int = 1) -> tuple[np.ndarray, Batch]:
    """Put `batch` in decode-first order: decode, short extend, long extend, prefill.

    Host only. The order inside each region is kept (a stable sort), unlike vLLM's in-place
    swaps, so the permutation is deterministic and easy to apply to the caller's own per-row
    state.

    Args:
        batch: the batch to reorder.
        decode_threshold: rows with at most this many new tokens count as decodes (1, or
            1 + k for k speculative tokens when the backend treats them as decodes).

    Returns:
        `(permutation, reordered)`: `permutation` has shape [R], int64; row i of `reordered`
        is row `permutation[i]` of `batch`.

    Example:
        >>> import attnsync
        >>> batch = attnsync.Batch(query_lens=[5, 1], seq_lens=[5, 9], block_table=[[1], [2]],
        ...                        block_size=16)
        >>> perm, ordered = attnsync.reorder(batch)
        >>> perm.tolist(), ordered.query_lens.tolist()
        ([1, 0], [1, 5])
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"reorder: expected an attnsync.Batch, received {type(batch).__name__}.")
    permutation = np.argsort(batch.regions(decode_threshold), kind="stable").astype(np.int64)
    return permutation, batch.take(permutation)


def require_decode_first(batch: Batch, *, decode_threshold: int, backend: str, strict: bool) -> None:
    """Refuse a batch that is not in decode-first order for `backend`.

    With `strict`, all four regions must be sorted (Mamba); otherwise only decodes must come
    before everything else (FlashInfer, TurboQuant, Tree).
    """
    error = decode_first_error(batch, decode_threshold=decode_threshold, backend=backend, strict=strict)
    if error is not None:
        raise error


def decode_first_error(batch: Batch, *, decode_threshold: int, backend: str, strict: bool) -> SpecError | None:
    """The error `require_decode_first` raises for `batch`, naming the first row out of order;
    None when the batch is in order."""
    region = batch.regions(decode_threshold)
    key = region if strict else np.minimum(region, 1)
    if key.size < 2 or not (np.diff(key) < 0).any():
        return None
    row = int(np.argmax(np.diff(key) < 0)) + 1
    return SpecError(
        f"batch: backend {backend!r} needs decode-first order (decode_threshold="
        f"{decode_threshold}), but row {row} is a {REGION_NAMES[int(region[row])]} row after a "
        f"{REGION_NAMES[int(region[row - 1])]} row. Fix: "
        f"`perm, batch = attnsync.reorder(batch, decode_threshold={decode_threshold})` and apply "
        f"`perm` to your per-request state."
    )
