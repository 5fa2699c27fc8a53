"""The device-table path of `attnsync.adapters.torch.lower` (`block_table=`, `table_updates=`).

A step lowered against a `TorchBlockTable` does not upload its block table. The step's update
record (`BlockTableState.take_updates`) travels as one more int32 field of the step's packed
staging copy, `apply` writes it into the device table with indexed writes queued on the same
stream right after that copy, and the device fields that read the table are taken from it:
`block_table_tensor` is the table's first rows (a view) when the batch is condensed, else a
gather of its rows; FlashInfer's `paged_kv_indices` is a gather whose size the host knows
(`num_pages`), from the staged host `paged_kv_indptr`. Every other field is staged as on the
plain path, so the lowering equals the plain one bit for bit. Nothing reads a device value.

Every check runs before anything is staged or written, so a refused step leaves the device
table and the stager as they were. docs/block_table.md describes the model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch

from .._block_table import BlockTableUpdates, BlockTableView, bucket_count, check_metadata, check_step
from .._plan import LoweringPlan, _getter
from .._validate import SpecError
from ..backends.flashinfer import DEVICE_INDICES_MARK
from .torch_block_table import TorchBlockTable, paged_kv_indices, row_pages

__all__: list[str] = []

UPDATES, ROWS, INDPTR = "_block_table_updates", "_block_table_rows", "_paged_kv_indptr"
# Smallest staged length of the update field: padding the record's vector to a power of two
# (at least this) keeps the step's packed layout, and so the stager's views, repeating.
MIN_UPDATE_WORDS = 64


def refuse_device_indices(values: dict[str, Any]) -> None:
    """The plain path's refusal of metadata whose host `paged_kv_indices` is a placeholder."""
    if values.get(DEVICE_INDICES_MARK):
        raise SpecError(
            "paged_kv_indices: this metadata was built with device_indices=True, so its host "
            "paged_kv_indices is a placeholder and only a device block table can supply the real "
            "one. Fix: lower(md, device, block_table=device_table, table_updates=record, "
            "table_view=view), or build without device_indices=True.")


def lower_with_table(plan: LoweringPlan, stager: Any, md: Any, seq_lens: Any, table: Any, updates: Any,
                     view: Any) -> dict[str, Any]:
    """The lowered fields (by lowered name) of `md` against the device table `table`."""
    if table is None or view is None:
        raise SpecError("block_table, table_view: a device-table lowering needs both the TorchBlockTable "
                        "(block_table=) and the step's BlockTableView (table_view=); table_updates= is the "
                        "step's record.")
    if seq_lens is not None:
        raise SpecError("seq_lens: exact device lengths are not supported with a device block table yet. "
                        "Fix: lower such steps without block_table=, or with exact host lengths.")
    values = md.__dict__
    if plan.exact_slots_flag and not values["slot_mapping_exact"]:
        raise SpecError("seq_lens: the batch has inexact rows (seq_lens_exact=False), so the host cannot "
                        "know where their new tokens go. Fix: lower such steps without block_table= and "
                        "with seq_lens=, the exact device lengths.")
    padded = _check(plan, stager, md, table, updates, view)
    prefix = view.is_prefix(padded)
    has_indices = "paged_kv_indices" in plan.staged_fields
    gather = not prefix or has_indices  # the device needs each batch row's table row
    derived = _derived_plan(plan, updates is not None, gather, has_indices)
    staged = dict(values)
    if updates is not None:
        words = bucket_count(updates.flat.shape[0], MIN_UPDATE_WORDS)
        flat = np.zeros(words, dtype=np.int32)
        flat[: updates.flat.shape[0]] = updates.flat
        staged[UPDATES] = flat
    if gather:
        staged[ROWS] = view.padded_rows(padded)
    if has_indices:
        staged[INDPTR] = values["paged_kv_indptr"]
    fields = dict(stager.lower(derived, staged))
    if updates is not None:
        # Queued on the current stream after the copy that carried it: no sync, stream order.
        table.apply(updates.header, fields.pop(UPDATES)[: updates.header.size])
    storage = table.storage
    rows_d = fields.pop(ROWS, None)
    name = dict(plan.staged)["block_table"]
    if prefix:
        fields[name] = table.rows(padded, version=view.version)
    else:
        table.require_version(view.version)
        fields[name] = _gather_rows(table, storage, rows_d, stager.persistent)
    if has_indices:
        fields[dict(plan.staged)["paged_kv_indices"]] = paged_kv_indices(
            storage, fields.pop(INDPTR), rows_d, values["num_pages"])
    return fields


def _gather_rows(table: Any, storage: torch.Tensor, rows: torch.Tensor, persistent: bool) -> torch.Tensor:
    """`row_pages`; into one fixed buffer per shape for a persistent (CUDA graph) stager."""
    if not persistent:
        return row_pages(storage, rows)
    key = (rows.shape[0], storage.shape[1])
    outputs = table.__dict__.setdefault("_outputs", {})
    out = outputs.get(key)
    if out is None:
        out = outputs[key] = torch.empty(key, dtype=storage.dtype, device=storage.device)
    return torch.index_select(storage, 0, rows, out=out)


def _check(plan: LoweringPlan, stager: Any, md: Any, table: Any, updates: Any, view: Any) -> int:
    """Every refusal of a device-table step, before anything is staged or written; returns
    the padded row count."""
    if not isinstance(table, TorchBlockTable):
        raise TypeError(f"block_table: expected an attnsync.adapters.torch_block_table.TorchBlockTable, "
                        f"received {type(table).__name__}.")
    if not isinstance(view, BlockTableView):
        raise TypeError(
            f"table_view: expected the step's BlockTableView (state.view(rows), the one its Batch was made "
            f"from), received {type(view).__name__}.")
    if updates is not None and not isinstance(updates, BlockTableUpdates):
        raise TypeError(f"table_updates: expected a BlockTableUpdates (state.take_updates()) or None, "
                        f"received {type(updates).__name__}.")
    if table.device != stager.device:
        raise SpecError(f"block_table: the device table is on {table.device}, the lowering stages to "
                        f"{stager.device}. Fix: one device table per device.")
    check_step(table, updates, view)
    return check_metadata(md, table.width, view)


@functools.lru_cache(maxsize=64)
def _derived_plan(plan: LoweringPlan, updates: bool, rows: bool, indices: bool) -> LoweringPlan:
    """`plan` with the table-derived fields left out of the staged ones and the device
    table's inputs (record, rows, FlashInfer's indptr) added after them."""
    dropped = {"block_table", "paged_kv_indices"}
    staged = [pair for pair in plan.staged if pair[0] not in dropped]
    staged += [(name, name) for name, wanted in ((UPDATES, updates), (ROWS, rows), (INDPTR, indices)) if wanted]
    staged_names = tuple(name for name, _ in staged)
    arrays = staged_names + tuple(name for name, _ in plan.mirrors if name not in staged_names)
    return dataclasses.replace(
        plan, staged=tuple(staged), arrays=arrays, staged_of=_getter(staged_names),
        arrays_of=_getter(arrays), _layouts={})
