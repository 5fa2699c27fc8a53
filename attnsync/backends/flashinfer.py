"""The ``flashinfer`` backend: paged-KV plan arrays for FlashInfer's native wrappers (numpy only).

FlashInfer's `plan()` runs a work scheduler on the CPU. It needs, as *host* int32 arrays, the
query offsets (`qo_indptr`), the page offsets of each request (`paged_kv_indptr`) and the fill
of each request's last page (`paged_kv_last_page_len`); only the page ids themselves
(`paged_kv_indices`) are read on the device. Handing it device arrays makes it copy them back
(one blocking device-to-host copy each: vllm-backends.md 2.1, reference C1). This module builds
all of them on the host, in vectorised numpy, from an `attnsync.Batch`; the torch adapter stages
the device fields in one copy and `attnsync.integrations.flashinfer.plan` feeds the host ones
to FlashInfer. Nothing here imports a framework.

Phase: plan (host only, allocating; never inside a CUDA graph).

Options:
    decode_threshold (int, default 1): rows with at most this many new tokens, not still
        prefilling, are decodes. FlashInfer's decode wrapper runs exactly one query token per
        request, so keep 1 unless you run the decode rows some other way (the planning helper
        refuses decode rows of more than one token).

Rules the builder enforces:
    * Decode-first order: the decode rows come first, everything else (extends and fresh
      prefills) after them; `attnsync.reorder` puts a batch in that order.
    * Exact lengths for every row: FlashInfer derives each request's KV length from
      `paged_kv_indptr` and `paged_kv_last_page_len`, so an upper bound (async speculative
      decoding) would make it read pages that hold no valid keys.

Why the prefill sub-batch is rebased (`prefill_paged_kv_indptr` starts at 0 and goes with the
slice `paged_kv_indices[num_decode_pages:num_pages]`) where vLLM passes the absolute
`paged_kv_indptr[nd:]` with the whole indices array: both name the same pages, since
FlashInfer 0.6.6 reads indptr values only as offsets into the indices tensor its plan() was
given (page.cuh, and the SM90 scheduler's per-CTA kv offsets) and derives lengths from
differences. We rebase because
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

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _accel
from .._batch import Batch, require_decode_first
from .._spec import (
    CommonMetadata,
    _arange,
    array_field,
    common_fields,
    construct,
    frozen_zeros,
    prefix_mask,
    require_exact,
)
from .._validate import INT32_MAX, SpecError, as_int, freeze

_BACKEND = "flashinfer"

# Gather strategy for paged_kv_indices: the boolean mask costs a copy of R rows of a cached
# table (`attnsync._spec.prefix_mask`) plus one masked read of the [R, W] table, the
# repeat/take gather about 3 passes over the used pages plus a fixed overhead of six numpy
# calls. Measured with numpy 2 on the CPU
# host (`_paged_kv` with each gather forced): the mask wins at every size up to R*W = 16384
# (32 x 512 with 1% of it used: 6.8 us against 7.3) and, above that, while the table is at
# most about 8 times the used pages (256 x 128: 10.0 against 11.6 us at 9.4 times; 256 x 512:
# 26 against 21 us at 10.7 times). These were 4 and 4096 while the mask was a broadcast compare
# (3.5x the cost of the cached table).
_MASK_GATHER_FACTOR = 8
_MASK_GATHER_SLACK = 16384




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
            Device and host (`query_start_loc`, `query_start_loc_cpu`). Shared with the common
            metadata, not copied.
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


# The common fields (attnsync._spec.common_fields) FlashInfer's metadata does not carry.
_COMMON_NOT_CARRIED = tuple(sorted({f.name for f in dataclasses.fields(CommonMetadata)}
                                    - {f.name for f in dataclasses.fields(FlashInferMetadata)}))


def paged_kv_arrays(
    seq_lens: np.ndarray, block_table: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashInfer's paged-KV triple of every row, vectorised (no per-row Python loop).

    Args:
        seq_lens: [R] int32, exact lengths (0 for empty or padded rows).
        block_table: [R, W] int32, W >= ceil(max(seq_lens) / block_size).
        block_size: tokens per page, >= 1.

    Returns:
        `(indptr [R+1], indices [indptr[-1]], last_page_len [R])`, all int32 and writeable.

    Example:
        >>> import numpy as np
        >>> indptr, indices, last = paged_kv_arrays(
        ...     np.array([0, 16, 17, 33], dtype=np.int32),
        ...     np.array([[0, 0, 0], [5, 0, 0], [6, 7, 0], [8, 9, 10]], dtype=np.int32), 16)
        >>> indptr.tolist(), indices.tolist(), last.tolist()
        ([0, 0, 1, 3, 6], [5, 6, 7, 8, 9, 10], [0, 16, 1, 1])
    """
    return _paged_kv(seq_lens, None, block_table, block_size)[:3]


def _paged_kv(
    seq_lens: np.ndarray, seq_lens_minus_one: np.ndarray | None, block_table: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """`paged_kv_arrays` plus the page total, for a caller that may already hold `seq_lens - 1`.

    `seq_lens_minus_one`, when given, must equal `seq_lens - 1` with every seq_len >= 1 (a
    batch of one-token rows without padding: the common metadata's `num_computed_tokens`).
    It saves the subtraction and the clamp of empty rows, 0.7 us of the decode step.
    """
    num_rows, width = block_table.shape
    native = _accel.native
    if native is not None and num_rows * width <= INT32_MAX and block_table.flags.c_contiguous:
        # two compiled calls for the eight numpy calls below (attnsync/_accel.py); the total
        # is at most R*W, so within int32
        indptr = np.empty(num_rows + 1, dtype=np.int32)
        last = np.empty(num_rows, dtype=np.int32)
        total = native.paged_kv_counts(seq_lens, block_size, indptr, last)
        indices = np.empty(total, dtype=np.int32)
        native.gather_pages(block_table, indptr, indices)
        return indptr, indices, last, total
    # With d, m = divmod(seq - 1, block_size): pages = d + 1 = ceil(seq / block_size) and the
    # last page holds m + 1 tokens, for seq >= 1. An empty row gives d = -1 (0 pages) and
    # m + 1 = block_size, which the minimum with seq (0) turns into FlashInfer's 0. No
    # intermediate exceeds int32 (seq - 1 >= -1; seq + block_size - 1 could pass 2**31).
    if seq_lens_minus_one is None:
        pages, last = np.divmod(seq_lens - 1, block_size)
        pages += 1
        last += 1
        np.minimum(last, seq_lens, out=last)
    else:  # no empty row, so no clamp
        pages, last = np.divmod(seq_lens_minus_one, block_size)
        pages += 1
        last += 1
    if num_rows * width > INT32_MAX:
        # The total is at most R*W (Batch checked every row fits its table row), so only a
        # table of 2**31 entries or more needs the wide sum.
        total = int(pages.sum(dtype=np.int64))
        if total > INT32_MAX:
            raise SpecError(
                f"seq_lens: the batch spans {total} KV pages at block_size {block_size}, more "
                f"than int32 offsets can address. Fix: split the batch."
            )
    indptr = np.zeros(num_rows + 1, dtype=np.int32)
    np.add.accumulate(pages, out=indptr[1:])  # np.cumsum with out= costs 3x more per call
    total = indptr.item(num_rows)
    if num_rows * width <= _MASK_GATHER_FACTOR * total + _MASK_GATHER_SLACK:
        # A narrow table: one boolean mask over it, read in row-major order, is exactly the
        # concatenation of every row's first pages_r entries (the cheapest form when most of
        # the table is in use, as in decode batches).
        indices = block_table[prefix_mask(pages, width)]
    else:
        # A wide table (long max_model_len, short rows): touch only the used pages. Row r's
        # pages sit at flat positions r*W + [0, pages_r); one repeat of the per-row shift
        # r*W - indptr[r] turns arange(total) into those positions, and one `take` gathers.
        shift = np.arange(num_rows, dtype=np.int64) * width - indptr[:-1]
        flat = np.repeat(shift, pages)
        flat += np.arange(total, dtype=np.int64)
        indices = block_table.reshape(-1).take(flat)
    return indptr, indices, last, total


# Tables of up to this many entries (256 KiB of int32) let a decode step get its arrays in one
# allocation with room for every page of the table (`_decode_step`); above it the unused room
# would cost more than the calls it saves (a fresh large allocation maps new pages each step).
_ONE_BLOCK_ENTRIES = 1 << 16


def build(batch: Batch, /, *, decode_threshold: int = 1) -> FlashInferMetadata:
    """Build FlashInfer's host metadata for `batch` (host only, numpy; the "plan" phase).

    Args:
        batch: a validated `attnsync.Batch` in decode-first order with exact lengths.
        decode_threshold: rows with at most this many new tokens (and not still prefilling)
            are decodes; keep 1 for FlashInfer's decode wrapper.

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
    n = batch.num_reqs
    if (n and batch.num_tokens == n == batch.padded_num_reqs == batch.padded_num_tokens
            and batch.max_query_len == 1 and not batch.any_prefilling and batch.all_exact
            and _accel.native is not None and batch.block_table.size <= _ONE_BLOCK_ENTRIES
            and batch.block_table.flags.c_contiguous):
        return _decode_step(batch, threshold)
    # The common fields as a dict, inherited below without a CommonMetadata object in between
    # (one object and its attribute reads fewer a step).
    common = common_fields(batch, threshold)
    if not common["is_decode_first"]:
        # The common build already classified the rows; ask for the full check (and its error
        # message naming the row and the fix) only when the order is wrong, which saves a
        # second classification (about 6 us) on every valid step.
        require_decode_first(batch, decode_threshold=threshold, backend=_BACKEND, strict=False)
        raise AssertionError("require_decode_first accepted a batch the common build flagged")
    if not common["all_exact"]:
        require_exact(
            construct(CommonMetadata, dict(common)),
            backend=_BACKEND,
            reason="its plan() derives each request's KV length from paged_kv_indptr and "
            "paged_kv_last_page_len, so an upper bound would make the kernel read invalid keys",
        )
    page = common["block_size"]
    n = common["num_scheduled_reqs"]
    indptr, indices, last, num_pages = _paged_kv(
        common["seq_lens"], _seq_lens_minus_one(common) if _accel.native is None else None,  # (numpy's only)
        common["block_table"], page,
    )
    freeze(indptr)
    freeze(indices)
    freeze(last)
    nd = common["num_decodes"]
    decode_pages = num_pages if nd == n else indptr.item(nd)
    if nd == n:  # no prefill rows (decode steps): both prefill offsets are [0]
        prefill_qo_indptr = prefill_kv_indptr = frozen_zeros((1,))
        max_decode_q, max_prefill_q = common["max_query_len"], 0
    else:
        qsl = common["query_start_loc"]
        prefill_qo_indptr = freeze(qsl[nd : n + 1] - qsl[nd])
        prefill_kv_indptr = freeze(indptr[nd : n + 1] - np.int32(decode_pages))
        query_lens = batch.query_lens  # [n], the real rows only
        max_decode_q = int(query_lens[:nd].max()) if nd else 0
        max_prefill_q = int(query_lens[nd:].max())

    # FlashInfer's metadata is the common fields less those it does not carry, plus its own:
    # made from the common dict in place (it is this build's own), one copy fewer a step.
    num_prefill_tokens = common["num_scheduled_tokens"] - common["num_decode_tokens"]
    for name in _COMMON_NOT_CARRIED:
        del common[name]
    common.update({
        "paged_kv_indptr": indptr,
        "paged_kv_indices": indices,
        "paged_kv_last_page_len": last,
        "prefill_qo_indptr": prefill_qo_indptr,
        "prefill_paged_kv_indptr": prefill_kv_indptr,
        "num_prefills": n - nd,
        # FlashInfer's prefills are every non-decode row (the common split's extends too)
        "num_prefill_tokens": num_prefill_tokens,
        "max_decode_query_len": max_decode_q,
        "max_prefill_query_len": max_prefill_q,
        "num_decode_pages": decode_pages,
        "num_pages": num_pages,
    })
    return construct(FlashInferMetadata, common)


def _decode_step(batch: Batch, threshold: int) -> FlashInferMetadata:
    """`build` of a decode step in one compiled call: every row one new token, exact, not
    prefilling, no padding (so every row is a decode, in decode-first order), with the compiled
    twin in use and a table of at most `_ONE_BLOCK_ENTRIES`.

    The arrays the step makes (slots, page offsets, last-page fills, page list) come from
    `attnsync._native.decode_rows` as read-only views of one allocation, and the host scalars
    are those such a batch gives in the general path above (`common_fields`, then the page
    arrays), which stays the reference: tests/test_native.py checks the two agree field for
    field, types included. About 3 us less a step than the general path on the CPU host.
    """
    n, page, table = batch.num_reqs, batch.block_size, batch.block_table
    # [0, n) computed tokens (not a FlashInfer field), [n, 2n) slots, [2n, 3n+1) indptr,
    # [3n+1, 4n+1) last_page_len, then room for every page of the table
    block = np.empty(4 * n + 1 + table.size, dtype=np.int32)
    total = _accel.native.decode_rows(table, batch.seq_lens, page, block, True)
    block.setflags(write=False)  # (the views below are read-only with it)
    zero_offsets = frozen_zeros((1,))
    return construct(FlashInferMetadata, {
        "query_start_loc": _arange(n + 1),
        "seq_lens": batch.seq_lens,
        "block_table": table,
        "slot_mapping": block[n : 2 * n],
        "paged_kv_indptr": block[2 * n : 3 * n + 1],
        "paged_kv_indices": block[4 * n + 1 : 4 * n + 1 + total],
        "paged_kv_last_page_len": block[3 * n + 1 : 4 * n + 1],
        "prefill_qo_indptr": zero_offsets,
        "prefill_paged_kv_indptr": zero_offsets,
        "num_reqs": n,
        "num_actual_tokens": n,
        "num_scheduled_reqs": n,
        "num_scheduled_tokens": n,
        "max_query_len": 1,
        "max_seq_len": batch.max_seq_len,
        "block_size": page,
        "decode_threshold": threshold,
        "num_decodes": n,
        "num_decode_tokens": n,
        "num_prefills": 0,
        "num_prefill_tokens": 0,
        "max_decode_query_len": 1,
        "max_prefill_query_len": 0,
        "num_decode_pages": total,
        "num_pages": total,
    })


def _seq_lens_minus_one(common: dict[str, Any]) -> np.ndarray | None:
    """`seq_lens - 1` as an array the common build already made, else None.

    When every one of the R rows (no padding) has exactly one new token, which
    `num_scheduled_tokens == num_scheduled_reqs == num_reqs` with `max_query_len == 1` says
    without reading an array, each row's `num_computed_tokens = seq_len - 1 >= 0` (exact: the
    builder refused inexact rows before this). Padding rows have seq_len 0, hence the need
    for no padding. `common`: the common fields (`attnsync._spec.common_fields`).
    """
    n = common["num_scheduled_reqs"]
    if n and common["max_query_len"] == 1 and common["num_scheduled_tokens"] == n == common["num_reqs"]:
        return common["num_computed_tokens"]
    return None
