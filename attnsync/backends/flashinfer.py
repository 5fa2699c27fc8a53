"""The ``flashinfer`` backend: paged-KV plan arrays for FlashInfer's native wrappers (numpy only).

FlashInfer's `plan()` runs a work scheduler on the CPU. It needs, as *host* int32 arrays, the
query offsets (`qo_indptr`), the page offsets of each request (`paged_kv_indptr`) and the fill
of each request's last page (`paged_kv_last_page_len`); only the page ids themselves
(`paged_kv_indices`) are read on the device. Handing it device arrays makes it copy them back
(one blocking device-to-host copy each). This module builds all of them on the host from an
`attnsync.Batch`, each through its one function in attnsync/_fields.py; the torch adapter stages
the device fields in one copy and `attnsync.integrations.flashinfer.plan` feeds the host ones
to FlashInfer. Nothing here imports a framework.

Phase: plan (host only, allocating; never inside a CUDA graph).

Options:
    decode_threshold (int, default 1): rows with at most this many new tokens, not still
        prefilling, are decodes. FlashInfer's decode wrapper runs exactly one query token per
        request, so keep 1 unless you run the decode rows some other way (the planning helper
        refuses decode rows of more than one token).
    device_indices (bool, default False): leave `paged_kv_indices` to the device. The host
        array is then a zero-filled placeholder of the right shape, never computed (on a
        batch over a `BlockTableView` it would read most of the table), and the metadata is
        marked so that only a device-table lowering (`lower(md, ..., block_table=...)`, which
        gathers the indices from the device table) accepts it; `paged_kv_indptr` and
        `paged_kv_last_page_len` stay on the host as always.

Rules the builder enforces:
    * Decode-first order: the decode rows come first, everything else (extends and fresh
      prefills) after them; `attnsync.reorder` puts a batch in that order.
    * Exact lengths for every row: FlashInfer derives each request's KV length from
      `paged_kv_indptr` and `paged_kv_last_page_len`, so an upper bound (async speculative
      decoding) would make it read pages that hold no valid keys.

Why the prefill sub-batch is rebased (`prefill_paged_kv_indptr` starts at 0 and goes with the
slice `paged_kv_indices[num_decode_pages:num_pages]`) where vLLM passes the absolute
`paged_kv_indptr[nd:]` with the whole indices array: both name the same pages, since
FlashInfer reads indptr values only as offsets into the indices tensor its plan() was given
and derives lengths from differences. We rebase because
  1. `qo_indptr` must be rebased anyway: run() gets the prefill slice of q, and the FA2/FA3
     schedulers store qo_indptr values as offsets into that slice. Rebasing the KV side too
     makes the sub-batch self-contained and meets plan()'s documented contract literally
     (indptr[0] == 0, indices of length indptr[-1]);
  2. a CUDA-graph prefill wrapper copies `len(paged_kv_indices)` page ids into its fixed
     buffer: the slice copies, and sizes that buffer for, the prefill pages only;
  3. it costs one [np+1] subtraction here and a zero-copy device view at a host-known offset
     in the adapter: no device work, no sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _fields
from .._batch import Batch, decode_first_error
from .._fields import DECODE
from .._spec import array_field, construct, inexact_error
from .._validate import as_int

_BACKEND = "flashinfer"


@dataclass(frozen=True, kw_only=True, eq=False)
class FlashInferMetadata:
    """Host metadata for FlashInfer's paged decode and prefill wrappers (read-only numpy).

    R is `num_reqs` (request rows, padding included), T is `num_actual_tokens` (tokens, padding
    included), nd = `num_decodes`, np = `num_prefills` (extends count as prefills: FlashInfer's
    prefill wrapper attends to the cached context too). Rows [0, nd) are decodes, rows
    [nd, nd + np) prefills, rows [nd + np, R) padding (query_len 0, seq_len 0). Lowered names in
    parentheses are the attribute names of `attnsync.adapters.torch.lower`'s result.

    Attributes:
        query_start_loc: [R+1] int32, [0] == 0, non-decreasing; padding repeats the last value.
            Device and host (`query_start_loc`, `query_start_loc_cpu`).
        seq_lens: [R] int32, exact context of each row including this step's tokens; padding 0.
            Device and host (`seq_lens`, `seq_lens_cpu`: exact, since the builder refuses
            upper bounds).
        block_table: [R, W] int32 page ids; padding rows 0. Device (`block_table_tensor`).
        slot_mapping: [T] int32 cache slot of each new token, -1 for padding tokens. Device
            (`slot_mapping`, int64 in torch).
        paged_kv_indptr: [R+1] int32, [0] == 0, `paged_kv_indptr[r+1] - paged_kv_indptr[r] ==
            ceil(seq_lens[r] / block_size)`; padding rows add 0 pages. Host
            (`paged_kv_indptr_cpu`). The decode wrapper takes `[: nd + 1]` (it starts at 0,
            because decodes come first).
        paged_kv_indices: [paged_kv_indptr[-1]] int32, the first `ceil(seq_lens[r] /
            block_size)` entries of `block_table[r]` for r = 0, 1, ..., concatenated. Device
            (`paged_kv_indices`). Decode rows own `[: num_decode_pages]`, prefill rows
            `[num_decode_pages : num_pages]`.
        paged_kv_last_page_len: [R] int32, tokens in each row's last page: `seq_len % block_size`,
            or `block_size` when that is 0 and seq_len > 0; 0 for an empty row. In
            [1, block_size] for every row with context. Host (`paged_kv_last_page_len_cpu`).
        prefill_qo_indptr: [np+1] int32, [0] == 0, `query_start_loc[nd : nd+np+1] -
            query_start_loc[nd]`: offsets into the prefill slice of q,
            `q[num_decode_tokens : num_decode_tokens + num_prefill_tokens]`. Host
            (`prefill_qo_indptr_cpu`).
        prefill_paged_kv_indptr: [np+1] int32, [0] == 0, `paged_kv_indptr[nd : nd+np+1] -
            num_decode_pages`: page offsets into the prefill slice of the indices,
            `paged_kv_indices[num_decode_pages : num_pages]`. Host (`prefill_paged_kv_indptr_cpu`).
            Rebased rather than absolute so the prefill sub-batch is self-contained, as its
            `qo_indptr` must be (see `attnsync.integrations.flashinfer`).
        num_reqs, num_actual_tokens: R and T (padded sizes).
        num_scheduled_reqs, num_scheduled_tokens: the real request and token counts.
        max_query_len, max_seq_len: longest query and sequence over the real rows (exact).
        block_size: tokens per KV-cache page (FlashInfer's `page_size`).
        decode_threshold: the split threshold the batch was built with.
        num_decodes, num_decode_tokens: decode rows and their tokens.
        num_prefills, num_prefill_tokens: every other real row (extends and fresh prefills) and
            their tokens.
        max_decode_query_len: longest decode query (1 for plain decoding, 0 without decodes).
        max_prefill_query_len: longest prefill query (0 without prefills).
        num_decode_pages: `paged_kv_indptr[nd]`, pages of the decode rows.
        num_pages: `paged_kv_indptr[-1]`, pages of all rows (== len(paged_kv_indices)).

    Example:
        >>> import attnsync
        >>> batch = attnsync.Batch(query_lens=[0, 1, 1, 1], seq_lens=[0, 16, 17, 33],
        ...                        block_table=[[0, 0, 0], [5, 0, 0], [6, 7, 0], [8, 9, 10]],
        ...                        block_size=16)
        >>> md = attnsync.build(batch, backend="flashinfer")
        >>> md.paged_kv_indptr.tolist(), md.paged_kv_last_page_len.tolist()
        ([0, 0, 1, 3, 6], [0, 16, 1, 1])
        >>> md.paged_kv_indices.tolist()
        [5, 6, 7, 8, 9, 10]
    """

    query_start_loc: np.ndarray = array_field(place="both")
    seq_lens: np.ndarray = array_field(place="both", host_name="seq_lens_cpu")
    block_table: np.ndarray = array_field(place="device", device_name="block_table_tensor")
    slot_mapping: np.ndarray = array_field(place="device")
    paged_kv_indptr: np.ndarray = array_field(place="host", host_name="paged_kv_indptr_cpu")
    paged_kv_indices: np.ndarray = array_field(place="device")
    paged_kv_last_page_len: np.ndarray = array_field(
        place="host", host_name="paged_kv_last_page_len_cpu"
    )
    prefill_qo_indptr: np.ndarray = array_field(place="host", host_name="prefill_qo_indptr_cpu")
    prefill_paged_kv_indptr: np.ndarray = array_field(
        place="host", host_name="prefill_paged_kv_indptr_cpu"
    )
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
    num_prefills: int
    num_prefill_tokens: int
    max_decode_query_len: int
    max_prefill_query_len: int
    num_decode_pages: int
    num_pages: int


def paged_kv_arrays(
    seq_lens: np.ndarray, block_table: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashInfer's paged-KV triple of every row (attnsync/_fields.py's three functions).

    Args:
        seq_lens: [R] int32, exact lengths (0 for empty or padded rows).
        block_table: [R, W] int32, W >= ceil(max(seq_lens) / block_size).
        block_size: tokens per page, >= 1.

    Returns:
        `(indptr [R+1], indices [indptr[-1]], last_page_len [R])`, all int32, fresh and
        writeable (the builder shares read-only ones instead).

    Example:
        >>> import numpy as np
        >>> indptr, indices, last = paged_kv_arrays(
        ...     np.array([0, 16, 17, 33], dtype=np.int32),
        ...     np.array([[0, 0, 0], [5, 0, 0], [6, 7, 0], [8, 9, 10]], dtype=np.int32), 16)
        >>> indptr.tolist(), indices.tolist(), last.tolist()
        ([0, 0, 1, 3, 6], [5, 6, 7, 8, 9, 10], [0, 16, 1, 1])
    """
    seq_lens = np.ascontiguousarray(seq_lens, dtype=np.int32)
    indptr = _fields.paged_kv_indptr(seq_lens, block_size)
    indices = _fields.paged_kv_indices(np.ascontiguousarray(block_table, dtype=np.int32), indptr)
    return indptr.copy(), indices.copy(), _fields.paged_kv_last_page_len(seq_lens, block_size).copy()


# The instance-dict key marking metadata built with device_indices=True (its host
# paged_kv_indices is a placeholder); the adapters' plain lowerings refuse such metadata.
DEVICE_INDICES_MARK = "_attnsync_device_indices"


def _placeholder_indices(num_pages: int) -> np.ndarray:
    """A read-only zero array of `num_pages` entries that takes no memory (device_indices)."""
    return np.broadcast_to(np.zeros(1, dtype=np.int32), (num_pages,))


def build(batch: Batch, /, *, decode_threshold: int = 1, device_indices: bool = False) -> FlashInferMetadata:
    """Build FlashInfer's host metadata for `batch` (host only, numpy; the "plan" phase).

    Args:
        batch: a validated `attnsync.Batch` in decode-first order with exact lengths.
        decode_threshold: rows with at most this many new tokens (and not still prefilling)
            are decodes; keep 1 for FlashInfer's decode wrapper.
        device_indices: leave `paged_kv_indices` to a device-table lowering (module docs).

    Returns:
        A `FlashInferMetadata` of read-only arrays; lower it with
        `attnsync.adapters.torch.lower(md, device)` and plan FlashInfer with
        `attnsync.integrations.flashinfer.plan`.

    Raises:
        TypeError: `batch` is not an `attnsync.Batch`, or an option has the wrong type.
        SpecError: the batch is not decode-first (fix: `attnsync.reorder`), has inexact rows,
            or spans more pages than int32 can address.

    Example:
        >>> import attnsync
        >>> batch = attnsync.Batch(query_lens=[1, 5], seq_lens=[17, 5], block_table=[[3, 4], [7, 0]],
        ...                        block_size=16)
        >>> md = attnsync.build(batch, backend="flashinfer")
        >>> md.num_decodes, md.num_prefills, md.prefill_qo_indptr.tolist()
        (1, 1, [0, 5])
    """
    if not isinstance(batch, Batch):
        raise TypeError(
            f"batch: expected an attnsync.Batch, received {type(batch).__name__}. "
            f"Fix: attnsync.build(attnsync.Batch(...), backend='flashinfer')."
        )
    # (the check's common case inline: a call less a step)
    threshold = decode_threshold if type(decode_threshold) is int and decode_threshold >= 1 else as_int(
        decode_threshold, "decode_threshold", minimum=1)
    n, rows, tokens = batch.num_reqs, batch.padded_num_reqs, batch.padded_num_tokens
    total, longest, page = batch.num_tokens, batch.max_query_len, batch.block_size
    q, s, table = batch.query_lens, batch.seq_lens, batch.block_table
    prefilling = batch.is_prefilling if batch.any_prefilling else None  # None: no row prefills
    rows_per_region, tokens_per_region, decode_first = _fields.region_split(q, s, prefilling, threshold, total,
                                                                             longest)
    if not decode_first:
        raise decode_first_error(batch, decode_threshold=threshold, backend=_BACKEND, strict=False)
    if not batch.all_exact:
        raise inexact_error(
            batch.seq_lens_exact, backend=_BACKEND,
            reason="its plan() derives each request's KV length from paged_kv_indptr and "
            "paged_kv_last_page_len, so an upper bound would make the kernel read invalid keys",
        )
    seq_lens, block_table = (s, table) if rows == n else (_fields.padded(s, rows, 0), _fields.padded(table, rows, 0))
    query_start_loc = _fields.query_start_loc(q, total, longest, rows)
    indptr = _fields.paged_kv_indptr(seq_lens, page)
    nd = rows_per_region[DECODE]
    num_pages = indptr.item(rows)
    decode_pages = num_pages if nd == rows else indptr.item(nd)
    if nd == n:  # no prefill rows (decode steps)
        max_decode_q, max_prefill_q = longest, 0
    else:
        max_decode_q = int(q[:nd].max()) if nd else 0
        max_prefill_q = int(q[nd:].max())
    if not isinstance(device_indices, bool):
        raise TypeError(f"device_indices: expected a bool, received {device_indices!r}.")
    # FlashInfer's prefills are every non-decode row (the common split's extends too)
    md = construct(FlashInferMetadata, {
        "query_start_loc": query_start_loc,
        "seq_lens": seq_lens,
        "block_table": block_table,
        "slot_mapping": _fields.slot_mapping(q, s, table, page, tokens),
        "paged_kv_indptr": indptr,
        "paged_kv_indices": (_placeholder_indices(num_pages) if device_indices
                             else _fields.paged_kv_indices(block_table, indptr)),
        "paged_kv_last_page_len": _fields.paged_kv_last_page_len(seq_lens, page),
        "prefill_qo_indptr": _fields.prefill_qo_indptr(query_start_loc, nd, n),
        "prefill_paged_kv_indptr": _fields.prefill_paged_kv_indptr(indptr, nd, n),
        "num_reqs": rows,
        "num_actual_tokens": tokens,
        "num_scheduled_reqs": n,
        "num_scheduled_tokens": total,
        "max_query_len": longest,
        "max_seq_len": batch.max_seq_len,
        "block_size": page,
        "decode_threshold": threshold,
        "num_decodes": nd,
        "num_decode_tokens": tokens_per_region[DECODE],
        "num_prefills": n - nd,
        "num_prefill_tokens": total - tokens_per_region[DECODE],
        "max_decode_query_len": max_decode_q,
        "max_prefill_query_len": max_prefill_q,
        "num_decode_pages": decode_pages,
        "num_pages": num_pages,
    })
    if device_indices:
        md.__dict__[DEVICE_INDICES_MARK] = True
    return md
