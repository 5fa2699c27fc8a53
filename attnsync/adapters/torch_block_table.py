"""The torch half of a device-resident block table (see `attnsync._block_table`).

Importing this module imports torch: that import is the user's choice of framework.

`TorchBlockTable` owns one int32 tensor of shape `BlockTableState.device_shape` at a fixed
address. A step's `BlockTableUpdates` reaches the device as its flat int32 vector (in the
lowering, a slice of the step's one packed copy) and `apply` writes it with indexed writes of
sizes the host knows, queued on the current stream after the copy: no value is read back, no
shape depends on device data, nothing synchronises. The derived fields (`row_pages`,
`slot_mapping`, `paged_kv_indices`) are gathers from the table whose sizes the host gives.
docs/block_table.md describes the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._block_table import (
    PARTS,
    BlockTableState,
    BlockTableUpdates,
    UpdateHeader,
    _check_header,
    _require_next,
)
from .._validate import SpecError, as_int

__all__ = ["TorchBlockTable", "paged_kv_indices", "row_pages", "slot_mapping"]


class TorchBlockTable:
    """A block table that stays on one torch device and changes only by update records.

    Args:
        state: the host half; the table starts as its mirror at its version (one copy, made
            here, outside any step). The state must have no pending changes.
        device: the device of the table (`"cuda"`, `"cuda:1"`, `"cpu"`, a `torch.device`).

    Attributes:
        storage: int32 [max_rows + 1, width] on `device`, the pad row last (always zero). Its
            address never changes, so views of it (and CUDA graphs reading it) stay valid;
            its values change with every `apply`, in stream order.
        version: the version of the last record applied (the state's version once a step's
            record has been applied).
    """

    def __init__(self, state: BlockTableState, device: Any = "cuda") -> None:
        if not isinstance(state, BlockTableState):
            raise TypeError(f"state: expected a BlockTableState, received {type(state).__name__}.")
        if state.pending:
            raise SpecError(
                "state: has changes no record was taken for; a device table made now would miss "
                "them. Fix: call take_updates() (and drop the record) before making the device table."
            )
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.width = state.width
        self.pad_row = state.pad_row
        mirror = torch.from_numpy(np.array(state.mirror))
        self.storage = mirror.to(self.device) if self.device.type != "cpu" else mirror
        self.version = state.version

    def rows(self, num_rows: int, *, version: int) -> torch.Tensor:
        """The first `num_rows` rows (a view, no copy): a condensed batch's block table.

        `version` is the state's version the step was built against; a table at another
        version (a record not applied yet, or applied twice) is refused.
        """
        self.require_version(version)
        n = as_int(num_rows, "num_rows", minimum=0, maximum=self.pad_row + 1)
        return self.storage[:n]

    def require_version(self, version: int) -> None:
        """Refuse a step built against another version of the table than this one holds."""
        if version != self.version:
            raise SpecError(
                f"device block table: the step was built against version {version}, but the table "
                f"is at version {self.version}. Fix: apply each step's record (take_updates()) to "
                f"the device table before lowering the step, exactly once."
            )

    def apply(self, header: UpdateHeader, flat: torch.Tensor) -> None:
        """Write one record into the table (indexed writes on the current stream, no sync).

        Args:
            header: the record's `header` (host ints: versions and counts).
            flat: the record's flat vector as an int32 tensor on this table's device, of
                `header.size` entries (a view into the step's packed device copy).

        Raises:
            SpecError: the record is not the next one for this table (applied twice, or one
                was skipped), or `flat` does not match the header; nothing is written then.
        """
        _require_next(self.version, header, "apply")
        if not isinstance(flat, torch.Tensor) or flat.dtype != torch.int32 or flat.dim() != 1:
            raise TypeError("flat: expected a 1-D int32 torch tensor (the record's flat vector on the device).")
        if flat.device != self.device:
            raise SpecError(f"flat: is on {flat.device}, the table on {self.device}. Fix: stage it to {self.device}.")
        _check_header(header, flat.shape[0], self.width, self.pad_row, "apply")
        _write(self.storage, header, flat)
        self.version = header.version

    def apply_record(self, updates: BlockTableUpdates) -> None:
        """`apply` a host record, copying its flat vector first (tests, CPU serving; a
        lowering hands `apply` the vector from its packed copy instead)."""
        flat = torch.from_numpy(np.array(updates.flat))
        if self.device.type == "cuda":  # pinned, so the copy is asynchronous and ordered
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            flat = flat.to(self.device)
        self.apply(updates.header, flat)


def _write(table: torch.Tensor, header: UpdateHeader, flat: torch.Tensor) -> None:
    """The record's three kinds of writes, in `BlockTableUpdates`' order."""
    copies, sets, appends = header.counts
    part = dict(zip(PARTS, header.offsets, strict=True))

    def view(name: str) -> torch.Tensor:
        start, stop = part[name]
        return flat[start:stop]

    if copies:  # index_select makes the sources a new tensor: every source is read first
        table.index_put_((view("copy_dst"),), table.index_select(0, view("copy_src")))
    if sets:
        table.index_put_((view("set_rows"),), view("set_pages").view(sets, header.width))
    if appends:
        table.index_put_((view("append_rows"), view("append_cols")), view("append_pages"))


def row_pages(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[len(rows), width] the rows of `table` named by `rows` (int32; the pad row gives zeros):
    a batch's block table when its rows are not the table's first rows."""
    return table.index_select(0, rows)


def slot_mapping(
    table: torch.Tensor, token_rows: torch.Tensor, positions: torch.Tensor, block_size: int,
    *, dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Cache slot of every token: `table[row, pos // block_size] * block_size + pos % block_size`.

    Args:
        table: the device table (`TorchBlockTable.storage`).
        token_rows, positions: int32 [T] on the table's device, from
            `BlockTableState.slot_inputs` (position -1: padding or unknown, slot -1).
        block_size: tokens per page.
        dtype: of the result (int64, what vLLM's cache-write kernels take, or int32).

    Returns:
        [T] slots, -1 where the position is negative; equal to `attnsync.build(batch).slot_mapping`.
    """
    block_size = as_int(block_size, "block_size", minimum=1)
    column = torch.clamp(torch.div(positions, block_size, rounding_mode="floor"), 0, table.shape[1] - 1)
    slots = table[token_rows, column].to(dtype) * block_size + torch.remainder(positions, block_size).to(dtype)
    return torch.where(positions >= 0, slots, torch.full_like(slots, -1))


def paged_kv_indices(
    table: torch.Tensor, indptr: torch.Tensor, rows: torch.Tensor, num_pages: int, *, size: int | None = None,
) -> torch.Tensor:
    """FlashInfer's `paged_kv_indices` gathered from the device table.

    Args:
        table: the device table.
        indptr: int32 [R+1] on the device: the host `paged_kv_indptr` (FlashInfer's metadata),
            staged with the step.
        rows: int32 [R] on the device: the table row of each batch row
            (`BlockTableState.batch_rows`, padded rows the pad row).
        num_pages: `indptr[-1]` as the host knows it (FlashInfer's `num_pages`).
        size: entries to return (default `num_pages`); a larger fixed size (a CUDA graph's
            buffer) gets zeros after the real pages.

    Returns:
        int32 [size]: row r's first `indptr[r+1] - indptr[r]` pages for each r, concatenated,
        equal to `attnsync.build(batch, backend="flashinfer").paged_kv_indices`.
    """
    num_pages = as_int(num_pages, "num_pages", minimum=0)
    size = num_pages if size is None else as_int(size, "size", minimum=num_pages)
    num_rows = rows.shape[0]
    if size == 0 or num_rows == 0:
        return torch.zeros(size, dtype=torch.int32, device=table.device)
    entry = torch.arange(size, dtype=torch.int32, device=table.device)
    # the batch row owning each entry: the last r with indptr[r] <= entry
    owner = torch.searchsorted(indptr[1:], entry, right=True, out_int32=True).clamp_(max=num_rows - 1)
    column = (entry - indptr[owner]).clamp_(0, table.shape[1] - 1)
    pages = table[rows[owner], column]
    if size > num_pages:
        pages = torch.where(entry < num_pages, pages, torch.zeros_like(pages))
    return pages
