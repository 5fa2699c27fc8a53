"""A block table that lives on the device: its host half (numpy only).

Today every step copies the whole block table to the device, although a decode step changes at
most one page per request and the scheduler knows which rows changed. `BlockTableState` keeps
the table on the host as a mirror of a persistent device table and records what the
scheduler's verbs changed since the last step; `take_updates` turns that into a small
`BlockTableUpdates` record (int32, sized by what changed) that travels inside the step's one
packed copy, and the device halves (`attnsync.adapters.torch_block_table`,
`attnsync.adapters.jax_block_table`) apply it in stream order. `apply_numpy` is the reference
meaning of a record. docs/block_table.md describes the model.

Row `max_rows` of both tables is the pad row: always zero, the target of every padding entry
of a bucketed record (which writes zeros only) and the row a padded batch row reads.

Importing this module imports numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._batch import Batch
from ._validate import INT32_MAX, SpecError, as_int, as_int_array, freeze

__all__ = ["BlockTableState", "BlockTableUpdates", "BlockTableView", "UpdateHeader", "apply_numpy", "bucket_count"]

from ._block_table_records import (  # noqa: F401 - re-exported: the records are part of this API
    MIN_PADDED_APPENDS,
    MIN_PADDED_COPIES,
    PARTS,
    BlockTableUpdates,
    UpdateHeader,
    _check_entries,
    _check_header,
    _int32_vector,
    _offsets,
    _require_next,
    apply_numpy,
    bucket_count,
    check_metadata,
    check_step,
)


class BlockTableState:
    """The host half of a device-resident block table: a mirror plus the pending changes.

    The scheduler calls the verbs as requests come and go; each verb is checked completely
    before anything changes, so a refused call leaves the state as it was. Once a step's verbs
    are done, `take_updates()` returns the record of everything they changed (the device
    applies it) and the mirror is then what the device table will hold once the record lands.

    Args:
        max_rows: rows of the table (request slots); row `max_rows` is the pad row.
        width: pages per row (the longest sequence's pages).
        num_cache_pages: pages in the KV cache; page ids are below it.
        null_page: True (default) when page 0 is the padding page, never assigned to a request
            (attnsync's convention); False lets requests own page 0.

    Attributes:
        version: how many records `take_updates` has returned.
        pad_row: `max_rows`, the always-zero row.
        device_shape: `(max_rows + 1, width)`, the shape of the device table.
        pending: True while verbs have changed the table since the last `take_updates`.

    Example:
        >>> state = BlockTableState(max_rows=4, width=8, num_cache_pages=100)
        >>> state.add(0, [7, 8])
        >>> updates = state.take_updates()
        >>> updates.append_rows.tolist(), updates.append_cols.tolist(), updates.append_pages.tolist()
        ([0, 0], [0, 1], [7, 8])
        >>> state.as_batch_table(1).tolist()
        [[7, 8, 0, 0, 0, 0, 0, 0]]
    """

    def __init__(self, max_rows: int, width: int, num_cache_pages: int, *, null_page: bool = True) -> None:
        self.max_rows = as_int(max_rows, "max_rows", minimum=1, maximum=INT32_MAX - 1)
        self.width = as_int(width, "width", minimum=1, maximum=INT32_MAX)
        self.num_cache_pages = as_int(num_cache_pages, "num_cache_pages", minimum=1, maximum=INT32_MAX)
        if not isinstance(null_page, bool):
            raise TypeError(f"null_page: expected a bool, received {type(null_page).__name__}.")
        self.null_page = null_page
        self._min_page = 1 if null_page else 0
        if self.num_cache_pages <= self._min_page:
            raise SpecError(
                f"num_cache_pages: {self.num_cache_pages} leaves no assignable page (page 0 is the "
                f"padding page). Fix: pass the cache's page count, or null_page=False."
            )
        self.pad_row = self.max_rows
        self.device_shape = (self.max_rows + 1, self.width)
        self._mirror = np.zeros(self.device_shape, dtype=np.int32)
        self._len = np.zeros(self.max_rows, dtype=np.int32)  # pages each row holds
        # ... as of the last record, and 0 for the pad row (its origin index)
        self._base_len = np.zeros(self.max_rows + 1, dtype=np.int32)
        self._live = np.zeros(self.max_rows, dtype=bool)
        # The device row each row's content starts from (the table as of the last record): its
        # first `_base_len[origin]` pages are that row's, the rest are appends. The pad row as
        # origin means zeros: the device row must be cleared (a copy from the pad row) first.
        self._origin = np.arange(self.max_rows, dtype=np.int32)
        self._touched = np.zeros(self.max_rows, dtype=bool)
        self._marks = np.zeros(self.max_rows, dtype=np.int32)  # scratch of append_many
        self._rows = freeze(np.arange(self.max_rows, dtype=np.int32))
        self.version = 0
        self.pending = False
        self._edits = 0  # verbs applied so far: a view made before a later verb is stale
        # The record of the last take_updates: a lowering checks it is staging this state's own
        # latest record, not one of another state that happens to share the versions.
        self.last_updates: BlockTableUpdates | None = None

    # -- reading ---------------------------------------------------------------------------

    @property
    def mirror(self) -> np.ndarray:
        """Read-only view of the host mirror, [max_rows + 1, width] (pad row last)."""
        view = self._mirror.view()
        view.setflags(write=False)
        return view

    def num_pages(self, row: int) -> int:
        """Pages row `row` holds (0 for a free row)."""
        return int(self._len[self._row(row, "row")])

    def is_live(self, row: int) -> bool:
        """Whether row `row` holds a request."""
        return bool(self._live[self._row(row, "row")])

    def live_rows(self) -> np.ndarray:
        """int32 indices of the rows that hold a request, ascending."""
        return np.flatnonzero(self._live).astype(np.int32)

    def batch_rows(self, rows: Any, padded_num_reqs: int | None = None) -> np.ndarray:
        """The table row of each batch row, checked, padded with the pad row.

        Args:
            rows: an int n (batch row i is table row i, for i < n: a condensed table) or a
                sequence of table rows, one per real batch row; every one must hold a request.
            padded_num_reqs: pad to this many rows with `pad_row` (default: no padding).

        Returns:
            int32 [padded_num_reqs or len(rows)]: the gather index the device halves'
            `row_pages`, `slot_mapping` and `paged_kv_indices` take.
        """
        self._require_staged("batch_rows")
        index = self._row_index(rows)
        n = index.shape[0]
        if padded_num_reqs is None:
            return index
        padded = as_int(padded_num_reqs, "padded_num_reqs", minimum=n)
        out = np.full(padded, self.pad_row, dtype=np.int32)
        out[:n] = index
        return out

    def as_batch_table(self, rows: Any = None, *, allow_pending: bool = False) -> np.ndarray:
        """The numpy block table of a step, for `attnsync.Batch(block_table=...)`.

        Args:
            rows: None (every row), an int n (rows [0, n): a condensed table), or a sequence
                of table rows, one per batch row (each must hold a request).
            allow_pending: read the mirror although verbs changed it since the last
                `take_updates`. By default that is refused: a step built from such a table
                would not match the device table, which has not seen those changes.

        Returns:
            int32 [len(rows), width], read-only: a view of the mirror for None or an int (it
            changes with later verbs; `Batch` copies it), a new array for a sequence.
        """
        if not allow_pending:
            self._require_staged("as_batch_table")
        if rows is None:
            view = self._mirror[: self.max_rows]
        elif isinstance(rows, int | np.integer) and not isinstance(rows, bool):
            view = self._mirror[: self._row_index(rows).shape[0]]
        else:
            return freeze(self._mirror.take(self._row_index(rows), axis=0))
        view = view.view()
        view.setflags(write=False)
        return view

    def view(self, rows: Any) -> BlockTableView:
        """The step's block table as a `BlockTableView`: rows of this state at its current
        version, without a copy (see `BlockTableView`). `rows` as in `batch_rows`."""
        self._require_staged("view")
        return BlockTableView(self, rows)

    def slot_inputs(self, batch: Batch, rows: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Host inputs of the device-side slot mapping of `batch` (device halves' `slot_mapping`).

        Args:
            batch: the step's `attnsync.Batch`.
            rows: the table row of each of its real rows (`batch_rows`' forms); default: batch
                row i is table row i.

        Returns:
            `(token_rows, positions)`, int32 [batch.padded_num_tokens]: the table row and the
            position in its sequence of every token; padding tokens have the pad row and -1,
            tokens of inexact rows -1 (the host cannot know where they go), as in
            `attnsync.build(batch).slot_mapping`.
        """
        if not isinstance(batch, Batch):
            raise TypeError(f"batch: expected an attnsync.Batch, received {type(batch).__name__}.")
        self._require_staged("slot_inputs")
        index = self._row_index(batch.num_reqs if rows is None else rows)
        if index.shape[0] != batch.num_reqs:
            raise SpecError(
                f"rows: {index.shape[0]} table rows for a batch of {batch.num_reqs} requests. Fix: "
                f"give the table row of each real batch row, in batch order."
            )
        t, q = batch.num_tokens, batch.query_lens
        token_rows = np.full(batch.padded_num_tokens, self.pad_row, dtype=np.int32)
        positions = np.full(batch.padded_num_tokens, -1, dtype=np.int32)
        if t:
            token_rows[:t] = np.repeat(index, q)
            first = np.cumsum(q, dtype=np.int64) - q  # each row's first token
            positions[:t] = np.repeat(batch.num_computed_tokens - first, q) + np.arange(t)
            if not batch.all_exact:
                positions[:t][~np.repeat(batch.seq_lens_exact, q)] = -1
        return token_rows, positions

    # -- verbs -----------------------------------------------------------------------------

    def add(self, row: int, pages: Any = ()) -> None:
        """A request takes the free row `row` with `pages` (new, or re-admitted after preemption)."""
        row = self._row(row, "add: row")
        if self._live[row]:
            raise SpecError(
                f"add: row {row} already holds a request ({int(self._len[row])} pages). Fix: "
                f"remove(row) it first, add to a free row, or use set(row, pages) to replace its pages."
            )
        pages = self._pages(pages, "add", row, 0)
        n = pages.shape[0]
        self._mirror[row, :n] = pages  # a free row is zero in the mirror
        self._len[row] = n
        self._live[row] = True
        self._touch(row)  # _origin stays: a free row's device row is zero or cleared this step

    def set(self, row: int, pages: Any) -> None:
        """Replace every page of the request in row `row` with `pages`."""
        row = self._live_row(row, "set: row")
        pages = self._pages(pages, "set", row, 0)
        n = pages.shape[0]
        self._mirror[row, :n] = pages
        self._mirror[row, n:] = 0
        self._len[row] = n
        self._origin[row] = self.pad_row
        self._touch(row)

    def append(self, row: int, pages: Any) -> None:
        """Pages appended to the request in row `row` (its sequence grew past its last page)."""
        row = self._live_row(row, "append: row")
        have = int(self._len[row])
        pages = self._pages(pages, "append", row, have)
        n = pages.shape[0]
        self._mirror[row, have : have + n] = pages
        self._len[row] = have + n
        self._touched[row] = True
        self.pending = True
        self._edits += 1

    def append_many(self, rows: Any, pages: Any) -> None:
        """One page appended per entry: `pages[i]` to the request in `rows[i]`, vectorised.

        A row may appear several times; its pages then go in the order given. The decode
        step's verb: the rows whose sequence crossed a page boundary, with their new pages.
        """
        rows, pages = _int32_vector(rows, "append_many: rows"), _int32_vector(pages, "append_many: pages")
        if rows.shape != pages.shape:
            raise SpecError(
                f"append_many: rows has {rows.shape[0]} entries but pages has {pages.shape[0]}. "
                f"Fix: one page per row entry (repeat a row to append several pages to it)."
            )
        if rows.size == 0:
            return
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= self.max_rows:
            bad = lo if lo < 0 else hi
            raise SpecError(
                f"append_many: row {bad} does not exist (rows are 0..{self.max_rows - 1}). Fix: "
                f"append only to rows that hold a request."
            )
        if not self._live[rows].all():
            bad = int(rows[np.argmin(self._live[rows])])
            raise SpecError(
                f"append_many: row {bad} holds no request. Fix: add(row, pages) a request there "
                f"first; append only grows a live row."
            )
        self._check_page_ids(pages, "append_many: pages", None)
        cols = self._len[rows]
        # A repeated row is found in O(entries): each entry marks its row, and an entry whose
        # mark was overwritten shares its row with a later one.
        entry = np.arange(rows.size, dtype=np.int32)
        self._marks[rows] = entry
        if (self._marks[rows] != entry).any():
            order = np.argsort(rows, kind="stable")  # each entry's rank among its row's entries
            sorted_rows = rows[order]
            start = np.r_[True, sorted_rows[1:] != sorted_rows[:-1]]
            first = np.maximum.accumulate(np.where(start, entry, 0))
            rank = np.empty(rows.size, dtype=np.int32)
            rank[order] = entry - first
            cols = cols + rank
            counts = np.bincount(rows, minlength=self.max_rows).astype(np.int32)
        else:
            counts = None
        if int(cols.max()) >= self.width:
            bad = int(rows[np.argmax(cols)])
            total = int(self._len[bad]) + int((rows == bad).sum())
            raise SpecError(
                f"append_many: row {bad} would hold {total} pages, more than the table's "
                f"width {self.width}. Fix: widen the table (BlockTableState(width=...)) or "
                f"preempt the request."
            )
        self._mirror.reshape(-1)[rows.astype(np.int64) * self.width + cols] = pages
        if counts is None:
            self._len[rows] += 1
        else:
            self._len += counts
        self._touched[rows] = True
        self.pending = True
        self._edits += 1

    def remove(self, row: int) -> None:
        """The request in row `row` finished or was preempted: the row is cleared and free."""
        row = self._live_row(row, "remove: row")
        self._vacate(row)

    def move(self, src: int, dst: int) -> None:
        """Move the request in row `src` to the free row `dst` (condensing the batch)."""
        src = self._live_row(src, "move: source row")
        dst = self._row(dst, "move: destination row")
        if self._live[dst]:
            raise SpecError(
                f"move: destination row {dst} already holds a request. Fix: move into a free row, "
                f"swap(a, b) to exchange two requests, or remove(dst) first."
            )
        self._mirror[dst] = self._mirror[src]
        self._len[dst] = self._len[src]
        self._live[dst] = True
        self._origin[dst] = self._origin[src]
        self._touch(dst)
        self._vacate(src)

    def swap(self, a: int, b: int) -> None:
        """Exchange the contents of rows `a` and `b` (either may be free): reordering a batch."""
        a = self._row(a, "swap: row")
        b = self._row(b, "swap: row")
        if a == b:
            return
        for array in (self._mirror, self._len, self._live, self._origin):
            array[[a, b]] = array[[b, a]]
        for row in (a, b):
            self._touch(row)
            if not self._live[row]:
                self._origin[row] = row if self._base_len[row] == 0 else self.pad_row

    # -- staging ---------------------------------------------------------------------------

    def take_updates(self, *, pad: bool = False) -> BlockTableUpdates:
        """The record of every change since the last call; the state's version advances by one.

        Args:
            pad: round each entry count up to a power of two (`bucket_count`; copies to at
                least `MIN_PADDED_COPIES`, appends to at least `MIN_PADDED_APPENDS`), padding
                entries targeting the pad row with zeros: what a jitted (JAX) or captured
                (CUDA graph) apply needs to see only a few shapes.

        Returns:
            A `BlockTableUpdates` (a record is returned, and must be applied, every step, even
            an empty one: the versions count steps).
        """
        touched = np.flatnonzero(self._touched).astype(np.int32)
        width, pad_row = self.width, self.pad_row
        origin = self._origin[touched]  # the pad row: zeros (a clear)
        length = self._len[touched]
        kept = self._base_len[origin]  # pages the device row of `origin` already holds
        extra = length - kept
        # A whole-row set costs 4 * width bytes against 12 per appended page (plus 8 for a copy
        # or a clear): rows gaining a third of the width or more go as sets.
        whole = 3 * extra >= width
        if whole.any():
            set_rows = touched[whole]
            partial = ~whole
            touched_p, origin_p, kept_p, extra_p = touched[partial], origin[partial], kept[partial], extra[partial]
        else:
            set_rows = touched[:0]
            touched_p, origin_p, kept_p, extra_p = touched, origin, kept, extra
        copy = origin_p != touched_p  # moved rows, and clears (from the pad row)
        copy_dst, copy_src = touched_p[copy], origin_p[copy]
        grow = extra_p > 0
        grow_rows, grow_from, grow_count = touched_p[grow], kept_p[grow], extra_p[grow]
        num_appends = int(grow_count.sum())
        if num_appends == grow_rows.shape[0]:  # one page a row (decode steps)
            append_rows, append_cols = grow_rows, grow_from
        else:
            append_rows = np.repeat(grow_rows, grow_count)
            first = np.repeat(np.cumsum(grow_count) - grow_count - grow_from, grow_count)
            append_cols = np.arange(num_appends, dtype=np.int32) - first.astype(np.int32)
        real = (copy_dst.shape[0], set_rows.shape[0], num_appends)
        counts = ((bucket_count(real[0], MIN_PADDED_COPIES), bucket_count(real[1]),
                   bucket_count(real[2], MIN_PADDED_APPENDS)) if pad else real)
        header = UpdateHeader(self.version, self.version + 1, *counts, width, pad_row)
        flat = np.empty(header.size, dtype=np.int32)
        (c0, c1), (d0, d1), (s0, s1), (r0, r1), (k0, k1), (p0, p1), (q0, q1) = header.offsets
        # real entries, then padding: rows -> the pad row, columns and pages -> 0
        flat[c0 : c0 + real[0]] = copy_src
        flat[d0 : d0 + real[0]] = copy_dst
        flat[s0 : s0 + real[1]] = set_rows
        flat[r0 : r0 + num_appends] = append_rows
        flat[k0 : k0 + num_appends] = append_cols
        flat[p0 : p0 + num_appends] = self._mirror.reshape(-1)[append_rows.astype(np.int64) * width + append_cols]
        flat[q0 : q0 + real[1] * width] = self._mirror[set_rows].reshape(-1)
        if pad:
            flat[c0 + real[0] : c1] = pad_row
            flat[d0 + real[0] : d1] = pad_row
            flat[s0 + real[1] : s1] = pad_row
            flat[r0 + num_appends : r1] = pad_row
            flat[k0 + num_appends : k1] = 0
            flat[p0 + num_appends : p1] = 0
            flat[q0 + real[1] * width : q1] = 0
        freeze(flat)
        # The mirror is now the device table as of the new version.
        self._origin[touched] = touched
        self._base_len[touched] = length
        self._touched[touched] = False
        self.version += 1
        self.pending = False
        self.last_updates = BlockTableUpdates(header, flat, real)
        return self.last_updates

    # -- internals -------------------------------------------------------------------------

    def _require_staged(self, what: str) -> None:
        """Refuse to describe a step while verbs have changed the table since the last record."""
        if self.pending:
            raise SpecError(
                f"{what}: the verbs since the last take_updates() changed the block table, but their "
                f"record was never taken, so the device table does not have them and a step built "
                f"now would disagree with it. Fix: call take_updates() and stage its record with "
                f"this step (or pass allow_pending=True for a host-only step)."
            )

    def _touch(self, row: int) -> None:
        self._touched[row] = True
        self.pending = True
        self._edits += 1

    def _vacate(self, row: int) -> None:
        """Row `row` becomes free and zero; its device row needs a clear unless it was empty."""
        self._mirror[row, : self._len[row]] = 0
        self._len[row] = 0
        self._live[row] = False
        self._origin[row] = row if self._base_len[row] == 0 else self.pad_row
        self._touch(row)

    def _row(self, row: Any, what: str) -> int:
        if isinstance(row, bool) or not isinstance(row, int | np.integer):
            raise TypeError(f"{what}: expected an int row index, received {row!r} ({type(row).__name__}).")
        row = int(row)
        if not 0 <= row < self.max_rows:
            raise SpecError(
                f"{what} {row} does not exist; the table has rows 0..{self.max_rows - 1} "
                f"(max_rows={self.max_rows}). Fix: use a row below max_rows, or make the state "
                f"with more rows."
            )
        return row

    def _live_row(self, row: Any, what: str) -> int:
        """`row` checked to exist and hold a request; `what` names it ("remove: row")."""
        row = self._row(row, what)
        if not self._live[row]:
            raise SpecError(
                f"{what} {row} holds no request. Fix: add(row, pages) a request there first "
                f"(or check the scheduler's row bookkeeping)."
            )
        return row

    def _pages(self, pages: Any, verb: str, row: int, have: int) -> np.ndarray:
        """`pages` as int32 [n], every id assignable, fitting the row after its `have` pages."""
        pages = as_int_array(pages, f"{verb}: pages", ndim=1)
        if have + pages.shape[0] > self.width:
            raise SpecError(
                f"{verb}: row {row} would hold {have + pages.shape[0]} pages ({have} + "
                f"{pages.shape[0]}), more than the table's width {self.width}. Fix: widen the table "
                f"(BlockTableState(width=...)) or preempt the request."
            )
        self._check_page_ids(pages, f"{verb}: pages", row)
        return pages

    def _check_page_ids(self, pages: np.ndarray, what: str, row: int | None) -> None:
        if pages.size == 0:
            return
        lo, hi = int(pages.min()), int(pages.max())
        if lo >= self._min_page and hi < self.num_cache_pages:
            return
        bad = lo if lo < self._min_page else hi
        at = int(np.argmax(pages == bad))
        where = f" for row {row}" if row is not None else ""
        if bad == 0 and self.null_page:
            reason = "page 0 is the padding page (null_page=True), never a request's page"
        elif bad < 0:
            reason = "page ids are >= 0"
        else:
            reason = f"the cache has num_cache_pages={self.num_cache_pages} pages"
        raise SpecError(
            f"{what}: page id {bad} at index {at}{where} is out of range: {reason}. Fix: pass page "
            f"ids in [{self._min_page}, {self.num_cache_pages}) from the cache's allocator."
        )

    def _row_index(self, rows: Any) -> np.ndarray:
        """`rows` (an int n or a sequence of rows) as int32 table rows, each holding a request
        (the pad row is also accepted in a sequence: a padded batch row)."""
        if isinstance(rows, int | np.integer) and not isinstance(rows, bool):
            n = as_int(int(rows), "rows", minimum=0, maximum=self.max_rows)
            free = ~self._live[:n]
            if free.any():
                bad = int(np.argmax(free))
                raise SpecError(
                    f"rows: row {bad} of the first {n} holds no request, so the table is not "
                    f"condensed. Fix: move() requests into the holes first, or pass the table row of "
                    f"each batch row."
                )
            return self._rows[:n]
        index = as_int_array(rows, "rows", ndim=1, minimum=0)
        if index.size and int(index.max()) > self.pad_row:
            raise SpecError(
                f"rows: row {int(index.max())} does not exist (rows 0..{self.max_rows - 1}, pad row "
                f"{self.pad_row}). Fix: pass table rows of live requests."
            )
        live = np.append(self._live, True)  # the pad row counts as a (padding) row
        free = ~live[index]
        if free.any():
            bad = int(index[np.argmax(free)])
            raise SpecError(
                f"rows: table row {bad} holds no request. Fix: pass the rows of live requests (the "
                f"pad row {self.pad_row} for padding rows)."
            )
        return index


class BlockTableView:
    """A step's block table as rows of a `BlockTableState`, read in place (no copy).

    What a batch can hold instead of its own copy of the table: the state checked every page
    id when the verbs put it there, so nothing needs scanning again, and `pages` gives the
    pages each batch row holds (a check that a row's sequence fits its pages is O(rows)).
    The view is valid until the next verb changes the state; reading `table` after that is
    refused, since the mirror then no longer shows this step's table.

    Attributes:
        rows: int32 table row of each batch row (`BlockTableState.batch_rows`).
        version: the state's version the view belongs to (the device table must be at it).
        condensed: True when batch row i is table row i (the device table's first rows are
            then the batch's table, a zero-copy view).
    """

    __slots__ = ("_edits", "_state", "_table", "condensed", "rows", "version")
    # `attnsync.Batch(block_table=view)` recognises a view by this (the batch module cannot
    # import this one, which imports it).
    is_block_table_view = True

    def __init__(self, state: BlockTableState, rows: Any) -> None:
        self._state = state
        self.condensed = isinstance(rows, int | np.integer) and not isinstance(rows, bool)
        self.rows = state._row_index(rows)
        self.version = state.version
        self._edits = state._edits
        self._table: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        """Batch rows the view covers."""
        return int(self.rows.shape[0])

    @property
    def pages(self) -> np.ndarray:
        """int32 [num_rows]: pages each batch row holds (0 for a pad row)."""
        self._require_current()
        return np.append(self._state._len, np.int32(0))[self.rows]

    @property
    def table(self) -> np.ndarray:
        """int32 [num_rows, width], read-only: the mirror's rows (a view when condensed, else
        one gather, made on first use)."""
        self._require_current()
        if self._table is None:
            mirror = self._state._mirror
            table = mirror[: self.num_rows].view() if self.condensed else mirror.take(self.rows, axis=0)
            table.setflags(write=False)
            self._table = table
        return self._table

    @property
    def state(self) -> BlockTableState:
        """The state the view reads."""
        return self._state

    @property
    def max_page_bound(self) -> int:
        """An upper bound of every page id in the view (`num_cache_pages - 1`): the verbs
        refused any id at or above it, so a batch needs no scan to bound its slot ids."""
        return self._state.num_cache_pages - 1

    def is_prefix(self, padded_num_rows: int) -> bool:
        """Whether the batch's table padded to `padded_num_rows` rows is exactly the first
        `padded_num_rows` rows of the table: the view is condensed and the rows after the
        batch's are free (free rows are zero). The device table's prefix is then the batch's
        table, a view with no gather; O(padded_num_rows - num_rows)."""
        self._require_current()
        n = self.num_rows
        if not self.condensed or padded_num_rows > self._state.max_rows:
            return self.condensed and padded_num_rows == n
        return not self._state._live[n:padded_num_rows].any()

    def padded_rows(self, padded_num_rows: int) -> np.ndarray:
        """int32 [padded_num_rows]: the table row of each batch row, the pad row after the
        real ones (the gather index of `row_pages` and `paged_kv_indices`)."""
        self._require_current()
        out = np.full(padded_num_rows, self._state.pad_row, dtype=np.int32)
        out[: self.num_rows] = self.rows
        return out

    def _require_current(self) -> None:
        if self._state._edits != self._edits:
            raise SpecError(
                f"block table view: made at version {self.version}, but verbs have changed the "
                f"state since, so the mirror no longer shows this step's table. Fix: read the "
                f"step's table before the next step's verbs (or keep a copy: np.array(view.table))."
            )
