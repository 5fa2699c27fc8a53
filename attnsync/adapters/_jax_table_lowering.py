"""The device-table path of `attnsync.adapters.jax.lower` (`block_table=`, `table_updates=`).

The step's host fields, its update record and the table rows of its batch go to the device
in one `device_put` (one int32 vector, without the block table). One jitted function then
applies the record to the donated `JaxBlockTable` buffer (`.at[].set`) and assembles the
lowering's packed vector in the plain path's exact layout: the host fields sliced from the
vector, the block table gathered from the device table, FlashInfer's `paged_kv_indices`
gathered with a static size (`num_pages`). The result is the same `Jax<MetadataClass>` pytree
as `lower(md, device)`, bit for bit. Every check runs before anything moves.

The jitted function's static arguments are the step's shapes and the record's counts: take
records with `take_updates(pad=True)` and bucket batches so it compiles a few times only.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._block_table import (
    BlockTableUpdates,
    BlockTableView,
    _offsets,
    bucket_count,
    check_metadata,
    check_step,
)
from .._validate import SpecError
from . import jax as _jax
from .jax_block_table import JaxBlockTable
from .jax_block_table import _apply as _apply_record

__all__: list[str] = []

_TABLE_FIELDS = ("block_table", "paged_kv_indices")
MIN_UPDATE_WORDS = 64  # (the staged record's smallest length, as in the torch path)


def lower_with_table(md: Any, device: Any, bucket: Any, table: Any, updates: Any, view: Any) -> Any:
    """`lower(md, device, bucket=..., block_table=table, table_updates=updates, table_view=view)`."""
    if not isinstance(table, JaxBlockTable):
        raise TypeError(f"block_table: expected an attnsync.adapters.jax_block_table.JaxBlockTable, "
                        f"received {type(table).__name__}.")
    if not isinstance(view, BlockTableView):
        raise TypeError(f"table_view: expected the step's BlockTableView, received {type(view).__name__}.")
    if updates is not None and not isinstance(updates, BlockTableUpdates):
        raise TypeError(f"table_updates: expected a BlockTableUpdates or None, received {type(updates).__name__}.")
    plan, md, built = _jax._prepare(md, bucket)
    padded = check_metadata(md, table.width, view)
    check_step(table, updates, view)
    target = _jax._target(device, None)
    where = next(iter(table.table.devices()))
    if target != where:
        raise SpecError(f"device: the device table lives on {where}, the lowering asks for {target}. "
                        f"Fix: lower to the device table's device.")
    bucketed = bucket is not None
    variant = plan.bucketed if bucketed else plan.plain
    values = plan.get_arrays(md)
    fields = variant.fields_for((tuple(map(_jax._SHAPE, values)), tuple(map(_jax._DTYPE, values))))
    parts, segments, start = [], [], 0
    for i, (name, value) in enumerate(zip(plan.arrays, values, strict=True)):
        if name in _TABLE_FIELDS:
            segments.append((name, 0, 0))
            continue
        if i in fields.wide:
            _jax._refuse_wide(name, value)
        part = value.reshape(-1)
        if i in fields.floats:
            part = part.view(np.int32)
        parts.append(part)
        segments.append(("host", start, start + part.shape[0]))
        start += part.shape[0]
    if bucketed:
        step = _jax._step_vector(plan, md)
        parts.append(step)
        segments.append(("host", start, start + step.shape[0]))
        start += step.shape[0]
    counts, record_at = (0, 0, 0), start
    if updates is not None:
        words = bucket_count(updates.flat.shape[0], MIN_UPDATE_WORDS)
        record = np.zeros(words, dtype=np.int32)
        record[: updates.flat.shape[0]] = updates.flat
        parts.append(record)
        counts = updates.header.counts
        start += words
    has_indices = "paged_kv_indices" in plan.arrays
    prefix = view.is_prefix(padded)
    rows_at = start
    if not prefix or has_indices:
        parts.append(view.padded_rows(padded))
        start += padded
    indptr_at = start
    if has_indices:
        parts.append(np.asarray(md.paged_kv_indptr, dtype=np.int32))
        start += padded + 1
    host = np.concatenate(parts, dtype=np.int32, casting="unsafe") if parts else np.zeros(0, np.int32)
    spec = (tuple(segments), counts, record_at, prefix, rows_at, padded, indptr_at,
            int(md.num_pages) if has_indices else 0)
    new_table, packed = _assemble(table.table, jax.device_put(host, where), spec, table.width)
    table._table = new_table
    if updates is not None:
        table.version = updates.header.version
    static = variant.get_static(md)
    layout = _jax.Layout(variant.cls, fields, static if built else _jax._host_values(static))
    return _jax._new(layout.cls, packed, layout)


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=(0,))
def _assemble(table: jax.Array, host: jax.Array, spec: tuple, width: int) -> tuple[jax.Array, jax.Array]:
    """The record applied to the donated table, then the plain layout's packed vector."""
    segments, counts, record_at, prefix, rows_at, padded, indptr_at, num_pages = spec
    if any(counts):
        size = _offsets(*counts, width)[-1][1]
        table = _apply_record(table, host[record_at : record_at + size], counts, width)
    needs_rows = not prefix or any(kind == "paged_kv_indices" for kind, _, _ in segments)
    rows = host[rows_at : rows_at + padded] if needs_rows else None
    pieces = []
    for kind, a, b in segments:
        if kind == "host":
            pieces.append(host[a:b])
        elif kind == "block_table":
            pieces.append((table[:padded] if prefix else table[rows]).reshape(-1))
        else:  # paged_kv_indices, as `jax_block_table.paged_kv_indices` gathers it
            indptr = host[indptr_at : indptr_at + padded + 1]
            if num_pages == 0 or padded == 0:
                pieces.append(jnp.zeros(num_pages, dtype=jnp.int32))
                continue
            entry = jnp.arange(num_pages, dtype=jnp.int32)
            owner = jnp.minimum(jnp.searchsorted(indptr[1:], entry, side="right"), padded - 1).astype(jnp.int32)
            column = jnp.clip(entry - indptr[owner], 0, width - 1)
            pieces.append(table[rows[owner], column])
    packed = jnp.concatenate(pieces) if pieces else jnp.zeros(0, dtype=jnp.int32)
    return table, packed
