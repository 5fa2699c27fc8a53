"""The update records of a device-resident block table: their layout, checks and reference meaning.

A record (`BlockTableUpdates`) is what `attnsync._block_table.BlockTableState.take_updates`
hands a step: int32 parts sized by what the scheduler changed, one flat vector that travels in the
step's packed copy. `apply_numpy` is the meaning every device half reproduces; `check_step` and
`check_metadata` are the refusals both framework lowerings share. docs/block_table.md describes
the model. Importing this module imports numpy only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._validate import SpecError, as_int_array

if TYPE_CHECKING:
    from ._block_table import BlockTableView

__all__ = ["BlockTableUpdates", "UpdateHeader", "apply_numpy", "bucket_count", "check_metadata", "check_step"]

# Part names of a record's flat vector, in order; `set_pages` last, so the small index parts
# sit together at the front.
PARTS = ("copy_src", "copy_dst", "set_rows", "append_rows", "append_cols", "append_pages", "set_pages")
# Smallest padded counts of copies and appends (8 and 12 bytes an entry): a bucketed record
# always has room for a few, so the common small steps share one shape.
MIN_PADDED_COPIES = 8
MIN_PADDED_APPENDS = 16


def bucket_count(count: int, minimum: int = 0) -> int:
    """`count` rounded up to a power of two, and to at least `minimum` (0 stays 0 when
    `minimum` is 0): the entry counts of a padded record, so a jitted apply compiles once per
    combination of buckets, not once per step."""
    count = max(int(count), minimum)
    return 0 if count <= 0 else 1 << (count - 1).bit_length()


@functools.lru_cache(maxsize=1024)
def _offsets(copies: int, sets: int, appends: int, width: int) -> tuple[tuple[int, int], ...]:
    """(start, stop) in the flat vector of every part of `PARTS`."""
    sizes = (copies, copies, sets, appends, appends, appends, sets * width)
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return tuple(out)


class UpdateHeader(NamedTuple):
    """The host-side description of an update record: versions and entry counts, no data.

    A device half needs only this and the record's flat int32 vector (already on the device)
    to apply it: every shape follows from the counts, so nothing is read back. (A named tuple:
    immutable, and made every step at a fraction of a frozen dataclass's cost.)

    Attributes:
        base_version: the table version the record applies to (the device must be at it).
        version: the version the table has after applying it (`base_version + 1`).
        num_copies, num_sets, num_appends: entries of each kind (padding included).
        width: columns of the table.
        pad_row: index of the always-zero pad row (the state's `max_rows`).
    """

    base_version: int
    version: int
    num_copies: int
    num_sets: int
    num_appends: int
    width: int
    pad_row: int

    @property
    def counts(self) -> tuple[int, int, int]:
        """(copies, sets, appends)."""
        return (self.num_copies, self.num_sets, self.num_appends)

    @property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        """(start, stop) of each part of the flat vector, in `PARTS` order."""
        return _offsets(self.num_copies, self.num_sets, self.num_appends, self.width)

    @property
    def size(self) -> int:
        """Entries of the flat vector."""
        return 2 * self.num_copies + self.num_sets * (1 + self.width) + 3 * self.num_appends

    @property
    def nbytes(self) -> int:
        """Bytes of the flat vector (what travels to the device)."""
        return 4 * self.size


@dataclass(frozen=True, slots=True)
class BlockTableUpdates:
    """What changed in a block table since the last step, as one flat int32 vector.

    Applied to a table in this order (the device halves and `apply_numpy` agree):

    1. copies: `table[copy_dst] = table[copy_src]`, every source read before any write: a
       condensing move, a swap, a permutation, and a clear (a copy from the always-zero pad
       row: a row whose request finished or was preempted, or whose pages are replaced by
       appends from column 0);
    2. sets: `table[set_rows] = set_pages` (a whole row: a new or replaced row with many pages);
    3. appends: `table[append_rows, append_cols] = append_pages` (pages appended to a row).

    A row is copied to or set at most once and a cell appended to at most once; padding
    entries (a bucketed record) target the pad row and write zeros.

    Attributes:
        header: versions and counts (`UpdateHeader`); the host-only part.
        flat: int32 [header.size], read-only: the parts of `PARTS` concatenated.
        num_real: (copies, sets, appends) before padding.
    """

    header: UpdateHeader
    flat: np.ndarray
    num_real: tuple[int, int, int]

    def part(self, name: str) -> np.ndarray:
        """A view of one part of `flat` (`set_pages` as [num_sets, width])."""
        start, stop = self.header.offsets[PARTS.index(name)]
        view = self.flat[start:stop]
        return view.reshape(-1, self.header.width) if name == "set_pages" else view

    copy_src = property(lambda self: self.part("copy_src"), doc="[num_copies] source rows.")
    copy_dst = property(lambda self: self.part("copy_dst"), doc="[num_copies] destination rows.")
    set_rows = property(lambda self: self.part("set_rows"), doc="[num_sets] rows replaced whole.")
    set_pages = property(lambda self: self.part("set_pages"), doc="[num_sets, width] their pages.")
    append_rows = property(lambda self: self.part("append_rows"), doc="[num_appends] rows.")
    append_cols = property(lambda self: self.part("append_cols"), doc="[num_appends] columns.")
    append_pages = property(lambda self: self.part("append_pages"), doc="[num_appends] page ids.")

    @property
    def nbytes(self) -> int:
        """Bytes that travel to the device."""
        return self.flat.nbytes


def _require_next(version: int, header: UpdateHeader, where: str) -> None:
    """Refuse a record that does not apply to a table at `version` (applied twice, skipped
    one, or from another table)."""
    if header.base_version == version:
        return
    if header.base_version < version:
        raise SpecError(
            f"{where}: this record takes the table from version {header.base_version} to "
            f"{header.version}, but the table is already at version {version}: it was applied "
            f"before (staged twice?). Fix: apply each record of BlockTableState.take_updates() once."
        )
    raise SpecError(
        f"{where}: this record applies to version {header.base_version}, but the table is at "
        f"version {version}: the records of versions {version} to {header.base_version} were "
        f"never applied. Fix: apply every record take_updates() returns, in order."
    )


def _check_header(header: UpdateHeader, flat_size: int, width: int, pad_row: int, where: str) -> None:
    if not isinstance(header, UpdateHeader):
        raise TypeError(f"{where}: expected an UpdateHeader, received {type(header).__name__}.")
    if header.width != width or header.pad_row != pad_row:
        raise SpecError(
            f"{where}: the record is for a table of width {header.width} with pad row "
            f"{header.pad_row}, but this table has width {width} and pad row {pad_row}. Fix: "
            f"apply records only to the table of the BlockTableState that made them."
        )
    if flat_size != header.size:
        raise SpecError(
            f"{where}: the flat update vector has {flat_size} entries, but the header's counts "
            f"{header.counts} at width {width} need {header.size}. Fix: pass the record's own flat "
            f"vector (its device copy, unsliced)."
        )


def apply_numpy(table: np.ndarray, updates: BlockTableUpdates) -> None:
    """Apply `updates` to the numpy `table` in place: the reference meaning of a record.

    Args:
        table: int32 [pad_row + 1, width], writable (the device layout: the last row is the pad
            row, zero).
        updates: a record from `BlockTableState.take_updates`.

    Raises:
        SpecError: the table's shape does not match the record, or the record is malformed (an
            index out of range, a row targeted twice, a padding entry writing non-zero);
            nothing is written then.

    Versions are not checked here (a plain array has none); the device halves check them.
    """
    if not isinstance(updates, BlockTableUpdates):
        raise TypeError(f"updates: expected a BlockTableUpdates, received {type(updates).__name__}.")
    header = updates.header
    if not (isinstance(table, np.ndarray) and table.dtype == np.int32 and table.ndim == 2):
        raise TypeError("table: expected a 2-D int32 numpy array (the device layout, pad row last).")
    if table.shape != (header.pad_row + 1, header.width):
        raise SpecError(
            f"table: expected shape {(header.pad_row + 1, header.width)} (max_rows + 1 rows: the pad "
            f"row last), received {table.shape}. Fix: allocate it as BlockTableState.device_shape."
        )
    _check_header(header, updates.flat.shape[0], header.width, header.pad_row, "updates")
    _check_entries(updates)
    table[updates.copy_dst] = table[updates.copy_src]  # the fancy read copies: sources read first
    table[updates.set_rows] = updates.set_pages
    table[updates.append_rows, updates.append_cols] = updates.append_pages


def _check_entries(updates: BlockTableUpdates) -> None:
    """Every index of a record in range, no row targeted twice, padding writing zeros only."""
    header = updates.header
    pad, width = header.pad_row, header.width
    for name in ("copy_src", "copy_dst", "set_rows", "append_rows"):
        part = updates.part(name)
        if part.size and (int(part.min()) < 0 or int(part.max()) > pad):
            bad = int(part.min()) if int(part.min()) < 0 else int(part.max())
            raise SpecError(f"updates.{name}: row {bad} is outside [0, {pad}] (the pad row is {pad}).")
    cols = updates.append_cols
    if cols.size and (int(cols.min()) < 0 or int(cols.max()) >= width):
        raise SpecError(f"updates.append_cols: a column is outside [0, {width}).")
    for name, part in (("set_pages", updates.set_pages), ("append_pages", updates.append_pages)):
        if part.size and int(part.min()) < 0:
            raise SpecError(f"updates.{name}: page id {int(part.min())} is negative.")
    real_dst = np.concatenate([updates.copy_dst, updates.set_rows])
    real_dst = real_dst[real_dst != pad]
    if np.unique(real_dst).size != real_dst.size:
        raise SpecError("updates: a row is copied to or set more than once.")
    flat_cells = updates.append_rows.astype(np.int64) * width + cols
    real_cells = flat_cells[updates.append_rows != pad]
    if np.unique(real_cells).size != real_cells.size:
        raise SpecError("updates: a table cell is appended to more than once.")
    if ((updates.copy_dst == pad) & (updates.copy_src != pad)).any():
        raise SpecError("updates: a copy into the pad row from another row (the pad row stays zero).")
    if (updates.set_pages[updates.set_rows == pad] != 0).any() or (
            updates.append_pages[updates.append_rows == pad] != 0).any():
        raise SpecError("updates: a padding entry writes a non-zero page into the pad row.")


def _int32_vector(value: Any, what: str) -> np.ndarray:
    """`value` as a 1-D int32 array: a scheduler's own int32 array as it is (read, never
    kept or written), anything else through the general check."""
    if type(value) is np.ndarray and value.dtype == np.int32 and value.ndim == 1:
        return value
    return as_int_array(value, what, ndim=1)


def check_step(table: Any, updates: BlockTableUpdates | None, view: BlockTableView) -> None:
    """Refuse a device-table step whose record, view and device table do not belong together.

    `table` is a device half (its `version`, `width`, `pad_row`); `updates` the step's record
    (None: already applied); `view` the step's `BlockTableView`. Refused: a stale view (a verb
    since), verbs after the record was taken, a record never staged (the table behind the
    view), a record applied before or skipped, and a record of another state. Checks only:
    the caller stages and applies once this returns.
    """
    state = view.state
    if state.width != table.width or state.pad_row != table.pad_row:
        raise SpecError(
            f"table_view: the view is of a table of width {state.width} with pad row {state.pad_row}, the "
            f"device table has width {table.width} and pad row {table.pad_row}. Fix: pass the view of "
            f"the state the device table was made from.")
    view._require_current()  # refuses a view made before a later verb
    if state.pending:
        raise SpecError(
            "table_view: verbs changed the block table after this step's record was taken, so neither "
            "the device table nor the step's batch has those changes. Fix: take_updates() once per step, "
            "after the step's last verb, and lower the step with that record.")
    if updates is None:
        if table.version != view.version:
            raise SpecError(
                f"table_updates: the device table is at version {table.version}, but the step was built at "
                f"version {view.version}: the pending updates were never staged. Fix: pass the step's "
                f"record, lower(md, ..., table_updates=state.take_updates()), once per step.")
    else:
        if updates is not state.last_updates:
            raise SpecError(
                "table_updates: this record is not the last one the view's state returned (another "
                "state's, or an older step's). Fix: pass this step's state.take_updates() record.")
        _require_next(table.version, updates.header, "table_updates")
        if updates.header.version != view.version:
            raise SpecError(
                f"table_updates: the record takes the table to version {updates.header.version}, but the "
                f"step's view is of version {view.version}. Fix: pass the record take_updates() returned "
                f"just before this step's view was made.")
        if updates.header.width != table.width or updates.header.pad_row != table.pad_row:
            raise SpecError(
                f"table_updates: the record is for a table of width {updates.header.width} (pad row "
                f"{updates.header.pad_row}), the device table has width {table.width} (pad row "
                f"{table.pad_row}). Fix: apply records only to the table of their state.")


def check_metadata(md: Any, width: int, view: BlockTableView) -> int:
    """Refuse metadata a device-table lowering cannot serve (no block table, another shape,
    another batch than `view`'s); returns its padded row count."""
    values = getattr(md, "__dict__", {})
    if "block_table" not in values or "num_reqs" not in values:
        raise SpecError(f"block_table: {type(md).__name__} has no device block table to take from a device "
                        f"table. Fix: lower it without block_table=.")
    padded = md.num_reqs
    block_table = md.block_table
    if block_table.shape != (padded, width):
        raise SpecError(
            f"block_table: the metadata's table has shape {block_table.shape}, the device table's rows "
            f"have width {width} for {padded} rows. Fix: build the step from Batch(block_table=view).")
    scheduled = md.__dict__.get("num_scheduled_reqs", padded)
    if view.num_rows != scheduled:
        raise SpecError(
            f"table_view: the view has {view.num_rows} rows, the metadata {scheduled} requests. Fix: pass "
            f"the view the step's Batch was made from.")
    return padded
