"""The ``flex`` backend: block-sparse metadata for FlexAttention on a paged KV cache.

FlexAttention sees one query sequence and one KV sequence. Here the queries are the batch's
T (padded) tokens in order, and the KV sequence is the *whole* paged cache read as one long
sequence of ``num_cache_pages * block_size`` slots: slot ``k`` is offset ``k % block_size`` of
physical page ``k // block_size``. A KV block of the block mask is therefore one cache page,
and a list of KV blocks is a list of physical page ids. The kernel visits, for each query block
of ``q_block_size`` tokens, only the pages listed for it (``kv_indices``), and a mask function
decides per (token, slot) pair whether the slot holds a key the token may see:

    r       = doc_ids[q]                                  # the token's request
    lb      = physical_to_logical[r, k // block_size]     # which logical block of r the page is
    logical = lb * block_size + k % block_size            # the key's position in request r
    visible = q < query_start_loc[r + 1]                  # a real token of row r (not padding)
              & lb >= 0 & logical < seq_lens[r]           # the page is r's, the key exists
              & logical <= decode_offset[r] + q - query_start_loc[r]   # causal

Everything here is host numpy (the "plan" phase); `attnsync.integrations.flex_torch` turns the
result into a torch ``BlockMask`` and runs flex attention, `attnsync.kernels.flex_jax` is a JAX
reference driven by the same fields.

Which pages a query block lists. A token at position ``p`` of request ``r`` may read logical
blocks ``0 .. p // block_size`` of ``r``; the list of a query block is the union, over its real
tokens, of the physical pages at those columns of the block table, in first-occurrence order
(tokens in order, columns in order), with page 0 (the null page) left out and every page listed
once even when several requests of the block share it (prefix caching). This is exactly the set
of pages the mask can open for that block, plus pages reached only through a logical block that
a later duplicate of the same page overrides (harmless: the mask closes them).

Inexact rows (``seq_lens_exact=False``, async speculative decoding). The page lists and the
host inverse table are built from the host upper bound: a larger bound only adds columns at the
end of a row, so every page the exact lengths need is still listed, and the mask reads the exact
lengths on the device. The per-row values that must be exact for the mask (``decode_offset``,
``num_blocks_per_seq``, ``physical_to_logical``) are then recomputed on the device from exact
device ``seq_lens`` by `attnsync.integrations.flex_torch.lower(md, device, seq_lens=...)`, which is
required for such a batch (the block-mask helpers refuse a lowering that still holds bounds).
The JAX lowering accepts exact batches only.

Options:
    num_cache_pages: pages in the KV cache, the width of the inverse table and the KV sequence
        length in pages. Required here unless the batch carries ``num_cache_pages``; when both
        are given they must agree. Every block-table entry must be below it.
    q_block_size: tokens per query block, a power of two (default 16). The compiled GPU kernel
        tiles queries by it, so keep it >= 16 there.
    max_kv_blocks: width of ``kv_indices`` (the most pages one query block may list). Default:
        the smallest power of two holding this step's longest list. Pass a fixed value to keep
        one layout across steps (CUDA graphs, persistent staging, jit buckets); a step that
        needs more raises `SpecError`.
    inverse_table: ``"host"`` builds ``physical_to_logical`` here, [R, num_cache_pages]
        int32, staged with the rest. ``"device"`` leaves it empty ([R, 0]) and the torch and JAX
        consumers build it on the device from the staged block table (one ``scatter_reduce``):
        the table grows with the cache, so staging it costs ``4 * R * num_cache_pages`` bytes a
        step, which dominates for large caches. ``"auto"`` (default) stages it while it is at
        most 1 MiB and leaves it to the device beyond (256 requests over a 32k-page cache would
        stage 33 MB a step).
    block_sparse: ``"host"`` (default) builds ``kv_num_blocks`` / ``kv_indices`` here, in
        numpy: O(total pages) work with a sort-free dedupe when no page is shared.
        ``"device"`` leaves them empty ([NQ], [NQ, 0]) and the torch and JAX consumers build
        them on the device from the staged fields (`flex_torch.kv_blocks_device`: fixed shapes,
        a handful of launches, no sync), so the host work no longer grows with the pages a
        batch spans. The host still sizes the list: ``max_kv_blocks`` is then a bound, the
        next power of two of the most pages any query block's requests own, so the device
        list is never cut (or the given ``max_kv_blocks``, refused when below that bound).
    decode_threshold: split threshold of the common metadata (default 1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._batch import Batch
from .._fields import pages_per_seq
from .._spec import array_field, build_common, frozen_zeros, inherit, prefix_mask
from .._validate import INT32_MAX, SpecError, as_choice, as_int, freeze

DEFAULT_Q_BLOCK_SIZE = 16  # vLLM's direct-build default on torch >= 2.9; one 16-row MMA tile
AUTO_HOST_INVERSE_TABLE_BYTES = 1 << 20  # "auto" stages the host inverse table up to 1 MiB
NULL_PAGE = 0  # page 0 is the null page: never listed, never mapped (vLLM's NULL_BLOCK_ID)


@dataclass(frozen=True, kw_only=True, eq=False)
class FlexMetadata:
    """Host metadata of the ``flex`` backend (numpy, read-only). R is `num_reqs` (padded rows),
    T is `num_actual_tokens` (padded tokens), P is `num_cache_pages`, NQ is `num_q_blocks`.

    Attributes:
        query_start_loc: [R+1] int32, [0] == 0, non-decreasing, padded rows repeat the last value.
            Device and host (`query_start_loc_cpu`).
        seq_lens: [R] int32, context including this step's tokens, padded rows 0; an upper bound
            on inexact rows. Device and host (`seq_lens_cpu_upper_bound`).
        block_table: [R, W] int32 page ids in [0, P), padded rows 0. Device.
        slot_mapping: [T] int32 (int64 in torch) cache slot of each new token, -1 for padding
            and inexact rows. Device.
        doc_ids: [T] int32 request row of each token, in [0, R); padding tokens get R - 1 (the
            mask closes them: they are at or beyond `query_start_loc[R]`). Device.
        decode_offset: [R] int32, `seq_lens - query_lens` (tokens already in the cache), padded
            rows 0; a bound on inexact rows. Device.
        num_blocks_per_seq: [R] int32, `ceil(seq_lens / block_size)`. Device.
        physical_to_logical: [R, P] int32, the inverse block table: entry [r, p] is the largest
            column c < num_blocks_per_seq[r] with block_table[r, c] == p, else -1; column 0
            (the null page) is -1. [R, 0] when `inverse_table_on_device`. Device.
        kv_num_blocks: [NQ] int32, pages listed for each query block, in [0, max_kv_blocks].
            Device. Zeros (and `kv_indices` [NQ, 0]) when `block_sparse_on_device`: the
            consumers compute both on the device.
        kv_indices: [NQ, max_kv_blocks] int32, the listed physical page ids of each query block,
            distinct, in [1, P), left-packed in first-occurrence order, -1 after the first
            kv_num_blocks[b] entries. Device.
        num_reqs, num_actual_tokens: R and T (padded). num_scheduled_reqs, num_scheduled_tokens:
            the real counts.
        max_query_len, max_seq_len: host maxima (`max_seq_len` is a bound on inexact rows).
        block_size: tokens per cache page, also the KV block size of the block mask.
        q_block_size: tokens per query block. num_q_blocks: NQ = ceil(T / q_block_size).
        max_kv_blocks: the width of `kv_indices`.
        max_pages_per_seq: ceil(max_seq_len / block_size), a bound on any row's pages.
        num_cache_pages: P. total_cache_tokens: P * block_size, the KV sequence length.
        inverse_table_on_device: True when `physical_to_logical` is left to the device.
        block_sparse_on_device: True when `kv_num_blocks` / `kv_indices` are left to the device.
        all_exact: every row's length is exact. slot_mapping_exact: as in `CommonMetadata`.
    """

    query_start_loc: np.ndarray = array_field(place="both")
    seq_lens: np.ndarray = array_field(place="both", host_name="seq_lens_cpu_upper_bound")
    block_table: np.ndarray = array_field(place="device")
    slot_mapping: np.ndarray = array_field(place="device")
    doc_ids: np.ndarray = array_field(place="device")
    decode_offset: np.ndarray = array_field(place="device")
    num_blocks_per_seq: np.ndarray = array_field(place="device")
    physical_to_logical: np.ndarray = array_field(place="device")
    kv_num_blocks: np.ndarray = array_field(place="device")
    kv_indices: np.ndarray = array_field(place="device")
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    q_block_size: int
    num_q_blocks: int
    max_kv_blocks: int
    max_pages_per_seq: int
    num_cache_pages: int
    total_cache_tokens: int
    inverse_table_on_device: bool
    block_sparse_on_device: bool
    all_exact: bool
    slot_mapping_exact: bool


def _next_pow2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


@functools.lru_cache(maxsize=64, typed=True)  # typed: True is not 1, np.int64(16) is not 16
def _checked_options(q_block_size: Any, max_kv_blocks: Any, inverse_table: Any,
                     block_sparse: Any) -> tuple[int, int | None, str, bool]:
    """The build options, validated: (q block size, list width or None, inverse-table choice,
    lists on the device). Errors are raised, never cached."""
    qb = as_int(q_block_size, "q_block_size", minimum=1, maximum=1 << 20)
    if qb & (qb - 1):
        raise SpecError(
            f"q_block_size: expected a power of two (the kernel tiles queries by it), received "
            f"{qb}. Fix: pass 16, 32, 64 or 128."
        )
    width = None if max_kv_blocks is None else as_int(max_kv_blocks, "max_kv_blocks", minimum=1)
    choice = as_choice(inverse_table, "inverse_table", ("auto", "host", "device"))
    sparse_on_device = as_choice(block_sparse, "block_sparse", ("host", "device")) == "device"
    return qb, width, choice, sparse_on_device


def _cache_pages(batch: Batch, num_cache_pages: int | None) -> int:
    known = batch.num_cache_pages
    if num_cache_pages is None and known is None:
        raise SpecError(
            "num_cache_pages: the flex backend needs the number of pages in the KV cache (the KV "
            "sequence is the whole cache, and the inverse block table has one column per page). "
            "Fix: attnsync.build(batch, backend='flex', num_cache_pages=...) or "
            "attnsync.Batch(..., num_cache_pages=...)."
        )
    if num_cache_pages is None:
        pages = known  # validated by Batch: an int >= 1
    else:
        pages = as_int(num_cache_pages, "num_cache_pages", minimum=1)
        if known is not None and int(known) != pages:
            raise SpecError(
                f"num_cache_pages: the option says {pages} but the batch says "
                f"{int(known)}. Fix: pass one of them, or the same value."
            )
    if pages * batch.block_size > INT32_MAX:
        raise SpecError(
            f"num_cache_pages: {pages} pages of {batch.block_size} tokens make a KV sequence of "
            f"{pages * batch.block_size} slots, beyond int32 (flex indexes slots as int32). "
            f"Fix: a smaller cache, or split it."
        )
    if known is not None:
        # `Batch` already refused page ids at or beyond its own num_cache_pages (in the one scan
        # of the table it makes for the largest id), and `pages` equals it here: scanning the
        # table again would be a noticeable share of a decode build.
        return pages
    table = batch.block_table
    if table.size and int(table.max()) >= pages:
        bad = np.unravel_index(int(np.argmax(table)), table.shape)
        raise SpecError(
            f"block_table: page id {int(table.max())} at {tuple(int(i) for i in bad)} is outside "
            f"the cache of num_cache_pages={pages} pages. Fix: page ids must be below "
            f"num_cache_pages (unused entries 0, the null page)."
        )
    return pages


def _ragged_arange(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, index): for each i, lengths[i] entries (i, 0), (i, 1), ... concatenated."""
    total = int(lengths.sum(dtype=np.int64))
    owner = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    return owner, np.arange(total, dtype=np.int64) - starts[owner]


def inverse_block_table(
    block_table: np.ndarray, seq_lens: np.ndarray, block_size: int, num_pages: int
) -> np.ndarray:
    """The inverse block table [R, num_pages] int32 (see `FlexMetadata.physical_to_logical`).

    Host numpy, vectorised: one `np.maximum.at` over the used columns of every row, so the
    latest logical column wins when a row lists a page twice, and columns at or beyond
    ``ceil(seq_lens[r] / block_size)`` (stale entries) are never read.
    """
    rows_count = block_table.shape[0]
    out = np.full((rows_count, num_pages), -1, dtype=np.int32)
    used = pages_per_seq(seq_lens, block_size)
    row, col = _ragged_arange(used)
    if row.size:
        np.maximum.at(out, (row, block_table[row, col].astype(np.int64)), col.astype(np.int32))
    if num_pages:
        out[:, NULL_PAGE] = -1
    return out


_BINCOUNT_RATIO = 16  # cache pages per candidate up to which the bincount proof is used


def _first_occurrences(key: np.ndarray, key_bound: int) -> np.ndarray:
    """Mask of the first occurrence of each value of `key` (values in [0, key_bound)).

    One plain sort of ``key * n + index`` (unique values, so no stable sort is needed, and
    numpy's plain sort is several times faster than a stable argsort on int64 keys); the index
    of the first entry of each run of equal keys is its first occurrence. Falls back to a
    stable argsort when the combined value could overflow.
    """
    n = key.shape[0]
    first = np.zeros(n, dtype=bool)
    if n == 0:
        return first
    if key_bound * n < (1 << 62):
        combined = np.sort(key * n + np.arange(n, dtype=np.int64))
        sorted_key, index = np.divmod(combined, n)
    else:  # pragma: no cover - needs > 2**62 (block, page, candidate) combinations
        index = np.argsort(key, kind="stable")
        sorted_key = key[index]
    run_start = np.ones(n, dtype=bool)
    run_start[1:] = sorted_key[1:] != sorted_key[:-1]
    first[index[run_start]] = True
    return first


def device_list_bound(common: Any, *, q_block_size: int, num_q_blocks: int, num_pages: int,
                      pages_per_row: np.ndarray | None = None) -> int:
    """The most pages any query block may list: all pages of the requests with a token in it.

    A query block's list (see the module docstring) holds pages of the requests its real
    tokens belong to, each at most once and never the null page, so the sum of those
    requests' page counts (and ``num_pages - 1``) bounds it. O(R + NQ) host work: the bound
    that sizes a device-built list, which is never cut at this width. Precisely: the sum over
    the rows from the block's first token's row to its last token's row (rows without tokens
    in between count too).

    Args:
        pages_per_row: optional ``ceil(seq_lens / block_size)`` [R] (the builder's
            ``num_blocks_per_seq``), so it is not computed twice.
    """
    tokens, rows = common.num_scheduled_tokens, common.num_scheduled_reqs
    if tokens == 0 or num_q_blocks == 0:
        return 0
    if pages_per_row is None:
        pages_per_row = pages_per_seq(common.seq_lens, common.block_size)
    pages = pages_per_row[:rows]
    if tokens == rows and common.max_query_len == 1:
        # One token per row: query block b holds rows [b * q_block_size, ...) exactly, so its
        # sum is one segment sum (int64: q_block_size rows of int32 counts may not fit int32).
        # The same value as the general path below, in about a third of its time.
        most = int(np.add.reduceat(pages, np.arange(0, rows, q_block_size), dtype=np.int64).max())
        return max(0, min(most, num_pages - 1))
    owned_before = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(pages, dtype=np.int64, out=owned_before[1:])
    first = np.arange(0, tokens, q_block_size)
    last = np.minimum(first + q_block_size, tokens) - 1
    low, high = common.token_to_req[first], common.token_to_req[last]
    most = int((owned_before[high + 1] - owned_before[low]).max())
    return max(0, min(most, num_pages - 1))


def block_sparse_pages(
    *,
    query_start_loc: np.ndarray,
    num_computed_tokens: np.ndarray,
    block_table: np.ndarray,
    block_size: int,
    q_block_size: int,
    num_tokens: int,
    num_q_blocks: int,
    num_pages: int,
    width: int | None,
    decode_pages: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query block, the distinct pages its tokens may read: (kv_num_blocks, kv_indices).

    Host numpy, vectorised; no loop over rows or tokens. A query block holds consecutive tokens,
    so it cuts the batch into segments (one per request it touches); a segment needs columns
    ``0 .. p_last // block_size`` of its row, p_last being its last token's position. Segments
    are expanded into candidates (block, page), page 0 dropped, and the first occurrence of each
    (block, page) kept in candidate order (one sort of the combined key). Candidates come
    in block order, so each block's kept pages are one run of them, stored left-packed with
    one boolean mask.

    Args:
        decode_pages: for a batch of one token per row (``num_tokens`` rows, token i in row i),
            the rows' page counts ``ceil(seq_lens / block_size)`` (int32, >= 1 each). Then every
            segment is one whole row prefix, and the candidates are one boolean mask of the
            block table; the same candidates, in the same order, as the segment expansion.

    Returns:
        kv_num_blocks [num_q_blocks] int32 and kv_indices [num_q_blocks, width] int32 (-1 padded;
        width None: the next power of two of the longest list, at least 1).
    """
    counts = np.zeros(num_q_blocks, dtype=np.int64)
    if num_tokens and decode_pages is not None:
        # Row r (token r, position seq_len - 1) reads columns 0 .. ceil(seq_len / bs) - 1; in
        # row-major order the masked table is the segment expansion's candidate list.
        used = decode_pages[:num_tokens]
        table = block_table[:num_tokens]
        pages = table[prefix_mask(used, table.shape[1])]
        blocks = np.repeat(np.arange(num_tokens, dtype=np.int64) // q_block_size, used)
    elif num_tokens:
        qsl = query_start_loc.astype(np.int64)
        req = np.repeat(np.arange(qsl.shape[0] - 1, dtype=np.int32), np.diff(qsl))
        token = np.arange(num_tokens, dtype=np.int64)
        position = (num_computed_tokens.astype(np.int64) - qsl[:-1])[req] + token
        qblock = token // q_block_size
        last = np.ones(num_tokens, dtype=bool)  # last token of its (query block, request) segment
        last[:-1] = (req[1:] != req[:-1]) | (qblock[1:] != qblock[:-1])
        seg = np.flatnonzero(last)
        seg_owner, column = _ragged_arange(position[seg] // block_size + 1)
        table_width = block_table.shape[1]
        flat_index = req[seg].astype(np.int64)[seg_owner] * table_width + column
        pages = block_table.reshape(-1)[flat_index]
        blocks = qblock[seg][seg_owner]
    if num_tokens:
        real = pages != NULL_PAGE
        pages, blocks = pages[real], blocks[real]
        # Without shared pages (no prefix caching, no reused pages in this batch) every
        # (block, page) pair is already unique: one bincount over the cache pages proves it
        # and skips the sort, the costliest step of this function in decode batches. The
        # bincount's work grows with the cache, so it runs only where the cache is at most
        # _BINCOUNT_RATIO times the batch's candidates; otherwise the sort runs (work in
        # proportion to the batch; on unique pairs it keeps every one, the same result).
        if pages.size and (num_pages > _BINCOUNT_RATIO * pages.size
                           or np.bincount(pages, minlength=num_pages).max() > 1):
            first = _first_occurrences(blocks * num_pages + pages, num_q_blocks * num_pages)
            pages, blocks = pages[first], blocks[first]
        # blocks is sorted (block order): a block's count is the length of its run, found by
        # binary search, far cheaper than a bincount over every candidate.
        counts = np.diff(np.searchsorted(blocks, np.arange(num_q_blocks + 1, dtype=np.int64)))
    longest = int(counts.max(initial=0))
    if width is None:
        width = _next_pow2(max(longest, 1))
    elif longest > width:
        row = int(np.argmax(counts))
        raise SpecError(
            f"max_kv_blocks: query block {row} lists {longest} pages, more than "
            f"max_kv_blocks={width}. Fix: raise max_kv_blocks to at least {longest} (always "
            f"enough: min(q_block_size * pages of the longest row, num_cache_pages - 1)), or "
            f"leave it None."
        )
    kv_indices = np.full((num_q_blocks, width), -1, dtype=np.int32)
    if num_tokens and pages.size:
        # Candidates come in block order, so block b's kept pages are the next counts[b] of
        # them: the first counts[b] columns of row b, in row-major order, are exactly where
        # they go. One boolean-mask store; the rank arithmetic it replaces (index minus the
        # block's start, then a scatter) was slower.
        kv_indices[prefix_mask(counts, width)] = pages
    return counts.astype(np.int32), kv_indices


def build(
    batch: Batch,
    /,
    *,
    num_cache_pages: int | None = None,
    q_block_size: int = DEFAULT_Q_BLOCK_SIZE,
    max_kv_blocks: int | None = None,
    inverse_table: str = "auto",
    block_sparse: str = "host",
    decode_threshold: int = 1,
) -> FlexMetadata:
    """Build the flex backend's metadata on the host (numpy only). See the module docstring.

    Example:
        >>> import attnsync
        >>> batch = attnsync.Batch(query_lens=[1, 3], seq_lens=[6, 3], block_table=[[2, 5], [3, 0]],
        ...                        block_size=4, num_cache_pages=8)
        >>> md = attnsync.build(batch, backend="flex", q_block_size=4)
        >>> md.doc_ids.tolist(), md.kv_num_blocks.tolist(), md.kv_indices.tolist()
        ([0, 1, 1, 1], [3], [[2, 5, 3, -1]])
        >>> md.physical_to_logical[0].tolist()
        [-1, -1, 0, -1, -1, 1, -1, -1]
    """
    return _build(batch, num_cache_pages=num_cache_pages, q_block_size=q_block_size,
                  max_kv_blocks=max_kv_blocks, inverse_table=inverse_table, block_sparse=block_sparse,
                  decode_threshold=decode_threshold, for_captured_graph=False)


def _build(
    batch: Batch,
    *,
    num_cache_pages: int | None,
    q_block_size: int,
    max_kv_blocks: int | None,
    inverse_table: str,
    block_sparse: str,
    decode_threshold: int,
    for_captured_graph: bool,
) -> FlexMetadata:
    """`build`, and (``for_captured_graph=True``) the metadata `flex_torch.CapturedBlockLists`
    lowers for `step_batch`: its graph derives ``slot_mapping`` and ``num_blocks_per_seq`` from
    the staged lengths, so they are not computed here but left as shared read-only zeros of
    their shapes (the layout stays the bucket's). Such metadata is lowered only by that class,
    whose fixed graph outputs replace both fields, and is never handed to a caller. The caller
    guarantees device lists, a device inverse table and exact lengths (the class checks them).
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"batch: expected an attnsync.Batch, received {type(batch).__name__}.")
    try:  # a serving loop passes the same options every step: validated once
        qb, width, choice, sparse_on_device = _checked_options(q_block_size, max_kv_blocks, inverse_table, block_sparse)
    except TypeError:  # an unhashable option (or a refused type): check it uncached, for its message
        qb, width, choice, sparse_on_device = _checked_options.__wrapped__(
            q_block_size, max_kv_blocks, inverse_table, block_sparse)
    pages = _cache_pages(batch, num_cache_pages)
    # "auto": stage the host-built table while it is small; past the limit one device scatter
    # is cheaper than packing and copying 4 * R * num_cache_pages bytes every step.
    on_device = choice == "device" or (
        choice == "auto" and 4 * batch.padded_num_reqs * pages > AUTO_HOST_INVERSE_TABLE_BYTES
    )
    common = build_common(batch, decode_threshold=decode_threshold, slots=not for_captured_graph)
    r_pad, t_pad, bs = common.num_reqs, common.num_actual_tokens, common.block_size
    if t_pad and not r_pad:
        raise SpecError(
            f"padded_num_reqs: the batch has {t_pad} (padding) tokens but no request rows; flex "
            f"maps every token to a row. Fix: pad the batch to at least one request row."
        )
    num_q_blocks = -(-t_pad // qb)
    qsl = common.query_start_loc
    tokens = common.num_scheduled_tokens
    # Token -> row with padding tokens on the last row. Without padding tokens that is the
    # common token_to_req itself (read-only; for a decode step a view of a shared arange).
    if tokens == t_pad:
        doc_ids = common.token_to_req
    else:
        doc_ids = common.token_to_req.copy()
        doc_ids[tokens:] = max(r_pad - 1, 0)
        freeze(doc_ids)
    if for_captured_graph:
        num_blocks_per_seq = frozen_zeros((r_pad,))  # never read (see the docstring)
    else:
        num_blocks_per_seq = pages_per_seq(common.seq_lens, bs)
    max_pages = -(-common.max_seq_len // bs)
    decode = tokens == common.num_scheduled_reqs and common.max_query_len == 1  # token i is row i
    if on_device:
        inverse = frozen_zeros((r_pad, 0))
    else:
        inverse = freeze(inverse_block_table(common.block_table, common.seq_lens, bs, pages))
    if sparse_on_device:
        # With a fixed width the exact bound only decides whether to refuse it. In a decode step
        # a query block spans at most q_block_size rows (one per token), each owning at most
        # max_pages pages, so a width >= min(q_block_size * max_pages, pages - 1) is never
        # refused and the bound is skipped; the bench's bucket (width 2048
        # >= 16 * 126) is one. Other batches may span token-less rows, which the bound counts.
        if width is None or not decode or width < min(qb * max_pages, pages - 1):
            bound = device_list_bound(common, q_block_size=qb, num_q_blocks=num_q_blocks, num_pages=pages,
                                      pages_per_row=pages_per_seq(common.seq_lens, bs) if for_captured_graph
                                      else num_blocks_per_seq)
            if width is None:
                width = _next_pow2(max(bound, 1))
            elif width < bound:
                raise SpecError(
                    f"max_kv_blocks: {width} columns, but a query block of this batch may list up to "
                    f"{bound} pages (the pages its requests own), and the device-built list must not be "
                    f"cut. Fix: max_kv_blocks >= {bound}, or block_sparse='host' (exact lists)."
                )
        kv_num_blocks = frozen_zeros((num_q_blocks,))
        kv_indices = frozen_zeros((num_q_blocks, 0))
        listed_width = width
    else:
        kv_num_blocks, kv_indices = block_sparse_pages(
            query_start_loc=qsl,
            num_computed_tokens=common.num_computed_tokens,
            block_table=common.block_table,
            block_size=bs,
            q_block_size=qb,
            num_tokens=tokens,
            num_q_blocks=num_q_blocks,
            num_pages=pages,
            width=width,
            decode_pages=num_blocks_per_seq if decode else None,
        )
        freeze(kv_num_blocks)
        freeze(kv_indices)
        listed_width = int(kv_indices.shape[1])
    return inherit(
        common,
        FlexMetadata,
        query_start_loc=qsl,
        doc_ids=doc_ids,
        decode_offset=common.num_computed_tokens,  # int32, read-only: seq_lens - query_lens
        num_blocks_per_seq=num_blocks_per_seq,
        physical_to_logical=inverse,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        num_reqs=r_pad,
        num_actual_tokens=t_pad,
        block_size=bs,
        q_block_size=qb,
        num_q_blocks=num_q_blocks,
        max_kv_blocks=listed_width,
        max_pages_per_seq=max_pages,
        num_cache_pages=pages,
        total_cache_tokens=pages * bs,
        inverse_table_on_device=on_device,
        block_sparse_on_device=sparse_on_device,
    )
