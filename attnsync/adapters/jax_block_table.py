"""The JAX half of a device-resident block table (see `attnsync._block_table`).

Importing this module imports jax: that import is the user's choice of framework.

`JaxBlockTable` holds the table as one int32 `jax.Array` of shape
`BlockTableState.device_shape`. `apply` runs one jitted function that writes a record with
`.at[...].set(...)` into the donated table buffer, so XLA updates it in place instead of
copying it. The record's counts are static arguments: take records with
`take_updates(pad=True)` (counts rounded up to powers of two) and the function compiles once
per combination of buckets, a handful of times in a serving loop. The derived fields are
jitted gathers whose output sizes are static. docs/block_table.md describes the model.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._block_table import (
    PARTS,
    BlockTableState,
    BlockTableUpdates,
    UpdateHeader,
    _check_header,
    _offsets,
    _require_next,
)
from .._validate import SpecError, as_int

__all__ = ["JaxBlockTable", "paged_kv_indices", "row_pages", "slot_mapping"]


class JaxBlockTable:
    """A block table that stays on one JAX device and changes only by update records.

    Args:
        state: the host half; the table starts as its mirror at its version (one
            `device_put`, here). The state must have no pending changes.
        device: a `jax.Device` (default: JAX's default device).

    Attributes:
        version: the version of the last record applied.

    The array behind `table` is donated to the next `apply`: read `table` after each apply,
    and take what a step needs from it (`rows`, `row_pages`, the derived fields: new arrays)
    rather than keeping `table` itself across steps.
    """

    def __init__(self, state: BlockTableState, device: Any = None) -> None:
        if not isinstance(state, BlockTableState):
            raise TypeError(f"state: expected a BlockTableState, received {type(state).__name__}.")
        if state.pending:
            raise SpecError(
                "state: has changes no record was taken for; a device table made now would miss "
                "them. Fix: call take_updates() (and drop the record) before making the device table."
            )
        self.device = device
        self.width = state.width
        self.pad_row = state.pad_row
        self._table = jax.device_put(np.array(state.mirror), device)
        self.version = state.version

    @property
    def table(self) -> jax.Array:
        """int32 [max_rows + 1, width], the pad row last; valid until the next `apply`."""
        return self._table

    def require_version(self, version: int) -> None:
        """Refuse a step built against another version of the table than this one holds."""
        if version != self.version:
            raise SpecError(
                f"device block table: the step was built against version {version}, but the table "
                f"is at version {self.version}. Fix: apply each step's record (take_updates()) to "
                f"the device table before lowering the step, exactly once."
            )

    def rows(self, num_rows: int, *, version: int) -> jax.Array:
        """The first `num_rows` rows (a new array): a condensed batch's block table."""
        self.require_version(version)
        n = as_int(num_rows, "num_rows", minimum=0, maximum=self.pad_row + 1)
        return _prefix(self._table, n)

    def apply(self, header: UpdateHeader, flat: jax.Array) -> None:
        """Write one record into the table: one jitted call on the donated buffer.

        Args:
            header: the record's `header` (host ints: versions and counts, static for jit).
            flat: the record's flat vector as an int32 `jax.Array` of `header.size` entries
                (a slice of the step's packed device buffer).

        Raises:
            SpecError: the record is not the next one for this table, or `flat` does not match
                the header; nothing is written then.
        """
        _require_next(self.version, header, "apply")
        if not isinstance(flat, jax.Array) or flat.dtype != jnp.int32 or flat.ndim != 1:
            raise TypeError("flat: expected a 1-D int32 jax.Array (the record's flat vector on the device).")
        _check_header(header, flat.shape[0], self.width, self.pad_row, "apply")
        self._table = _apply(self._table, flat, header.counts, header.width)
        self.version = header.version

    def apply_record(self, updates: BlockTableUpdates) -> None:
        """`apply` a host record, moving its flat vector to the table's device first."""
        flat = jax.device_put(np.array(updates.flat), next(iter(self._table.devices())))
        self.apply(updates.header, flat)


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=(0,))
def _apply(table: jax.Array, flat: jax.Array, counts: tuple[int, int, int], width: int) -> jax.Array:
    """The record's writes in `BlockTableUpdates`' order; duplicate indices only ever hit the
    pad row with zeros, so the unspecified order of duplicate scatters cannot matter."""
    copies, sets, appends = counts
    offsets = dict(zip(PARTS, _offsets(*counts, width), strict=True))

    def part(name: str) -> jax.Array:
        start, stop = offsets[name]
        return flat[start:stop]

    if copies:  # `table[...]` reads the old table: every source before any write
        table = table.at[part("copy_dst")].set(table[part("copy_src")])
    if sets:
        table = table.at[part("set_rows")].set(part("set_pages").reshape(sets, width))
    if appends:
        table = table.at[part("append_rows"), part("append_cols")].set(part("append_pages"))
    return table


@functools.partial(jax.jit, static_argnums=(1,))
def _prefix(table: jax.Array, num_rows: int) -> jax.Array:
    return table[:num_rows]


@jax.jit
def row_pages(table: jax.Array, rows: jax.Array) -> jax.Array:
    """[len(rows), width] the rows of `table` named by int32 `rows` (the pad row gives zeros)."""
    return table[rows]


@functools.partial(jax.jit, static_argnames=("block_size",))
def slot_mapping(table: jax.Array, token_rows: jax.Array, positions: jax.Array, *, block_size: int) -> jax.Array:
    """int32 cache slot of every token (`BlockTableState.slot_inputs` gives the inputs): the
    torch half's `slot_mapping` in JAX; -1 where the position is negative. Equal to
    `attnsync.build(batch).slot_mapping`."""
    column = jnp.clip(positions // block_size, 0, table.shape[1] - 1)
    slots = table[token_rows, column] * block_size + positions % block_size
    return jnp.where(positions >= 0, slots, -1)


@functools.partial(jax.jit, static_argnames=("size",))
def paged_kv_indices(table: jax.Array, indptr: jax.Array, rows: jax.Array, *, size: int) -> jax.Array:
    """FlashInfer's `paged_kv_indices` gathered from the device table, padded with zeros to the
    static `size` (>= `indptr[-1]`; pad it to a bucket so jit compiles rarely).

    `indptr`: int32 [R+1], the host `paged_kv_indptr`; `rows`: int32 [R], the table row of
    each batch row (`BlockTableState.batch_rows`). Entries `[0, indptr[-1])` equal
    `attnsync.build(batch, backend="flashinfer").paged_kv_indices`.
    """
    num_rows = rows.shape[0]
    if size == 0 or num_rows == 0:
        return jnp.zeros(size, dtype=jnp.int32)
    entry = jnp.arange(size, dtype=jnp.int32)
    owner = jnp.minimum(jnp.searchsorted(indptr[1:], entry, side="right"), num_rows - 1).astype(jnp.int32)
    column = jnp.clip(entry - indptr[owner], 0, table.shape[1] - 1)
    return jnp.where(entry < indptr[-1], table[rows[owner], column], 0)
