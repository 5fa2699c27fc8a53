"""Triton paged attention over attnsync metadata, with no device-to-host reads.

Opt-in module: it imports ``torch`` and ``triton`` at module level.

Layout
------
One program owns a *tile* of ``BLOCK_M`` (query token, q head) pairs that all read the same kv
head: ``BLOCK_Q`` consecutive query tokens of one request row times the ``GROUP = Hq // Hkv``
q heads of that kv head's GQA group (padded to ``GROUP_PAD``, a power of two, so
``BLOCK_M = BLOCK_Q * GROUP_PAD``). Every key/value tile is loaded once and used by the whole
group, which is why the group is packed into the M dimension instead of giving each q head its
own program. ``BLOCK_M >= 16`` because ``tl.dot`` needs it.

The KV dimension is walked in fixed tiles of ``TILE_N`` absolute positions. Each key's page is
looked up on its own (``block_table[r, pos // block_size]``), so any page size works (1, 16, 64,
...), and a tile aligned to ``TILE_N`` that divides the page size stays inside one page and reads
contiguous memory. Softmax is the online (streaming) form in fp32, kept in base 2:
logits are multiplied by ``scale * log2(e)`` and exponentiated with ``exp2``.

Two launch shapes:

* **2D path** (any batch, prefill/decode mixed). Grid ``(T // BLOCK_Q + num_reqs, Hkv)``. Row
  ``r`` owns the program ids ``[qsl[r] // BLOCK_Q + r, ...)``, one per query block; the next row
  starts at least ``ceil(q_len(r) / BLOCK_Q)`` ids later, and the last id needed is below
  ``qsl[num_reqs] // BLOCK_Q + num_reqs <= T // BLOCK_Q + num_reqs``, so the grid is sized from
  host ints alone. A program finds its row by binary search over ``query_start_loc`` on the
  device; ids that fall past their row's last block (rows with no queries, padding) return at
  once.
* **split-KV path** (decode only: every row has at most one query token). Grid
  ``(num_reqs, Hkv, S)`` with ``S = min(num_segments, ceil(max_seq_len / TILE_N))``. Program
  ``(r, g, s)`` handles the ``s``-th of ``S`` equal runs of KV tiles of row ``r`` (counted from
  the device ``seq_lens``), writing its un-normalised fp32 partial output, running max and
  exp-sum to scratch. A reduce kernel, grid ``(num_reqs, Hq)``, merges the ``S`` partials with
  the log-sum-exp rule. This fills the GPU when a handful of long decodes would leave the 2D
  grid with too few programs.

Grid sizes come only from host ints (``T``, ``num_reqs``, ``max_query_len``, ``max_seq_len``,
shapes). ``max_query_len`` and ``max_seq_len`` only pick tile sizes and the number of segments;
correctness never depends on them, so a CUDA graph captured with one value replays correctly
with other metadata of the same shapes. Every per-row quantity is read from device arrays inside
the kernels.

Masking follows :mod:`attnsync.kernels.reference`: causal, restricted by the sliding window,
OR-ed with bidirectional prefix ranges (a window never hides a key of the query's own range);
keys at or beyond ``seq_lens[r]`` are never visible, and their cache slots are never loaded
(stale slots may hold NaN).

Tree attention (speculative decoding): an optional float32 ``qq_bias`` [L, L] is added to the
logits between each query of the first ``num_qq_bias_rows`` rows and that row's draft block
(its last ``q_len`` keys), on top of the causal mask; later rows of the same launch (prefills)
stay causal. See :func:`unified_paged_attention`.

Entry points: :func:`unified_paged_attention` takes explicit tensors and host ints;
:func:`paged_attention_from_metadata` takes the torch lowering of the ``triton`` backend's
metadata (``attnsync.build(batch, backend="triton", ...)``) and owns the split-KV scratch.

Compile-time constants: head_dim, page size, GQA group, sliding window, ``max_ranges`` (the
second dim of ``prefix_ranges``), whether a tree bias is present, the dtype and the path. Each distinct combination compiles
once per process; everything else (batch composition, lengths, page ids) is runtime data.

Triton's interpreter (``TRITON_INTERPRET=1``, used by the CPU tests) runs the same kernels with
two detours, chosen at launch when the kernel object is interpreted: the KV loop is a
``while`` loop, and ``tl.dot`` operands are widened to fp32 (see ``_attend_tile``).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["paged_attention_from_metadata", "split_kv_scratch", "unified_paged_attention"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Keys per KV tile: 64 was faster than 32 and 16 on every decode and prefill shape tried on an
# H100 (bf16, GQA 32/8, head dim 128). It divides pages of 64, and pages of 16 give 4
# contiguous runs per tile.
_TILE_N = 64
# Largest tile of (query token, q head) rows in the 2D path; decode batches use 16 (tl.dot's
# minimum M), prefills grow to this so each loaded KV tile serves more queries. 128 was slower
# than 64 on a long prefill in the same measurements.
_MAX_BLOCK_M = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _find_row(qsl_ptr, pid, num_reqs, BLOCK_Q: tl.constexpr):
    """Last row ``r`` in ``[0, num_reqs)`` whose first program id ``qsl[r] // BLOCK_Q + r`` is <= pid."""
    # `pid * 0` makes both bounds int32 tensors from the start: a loop-carried variable must
    # keep one type, and Triton turns an int argument equal to 1 into a compile-time constant.
    lo = pid * 0
    hi = pid * 0 + (num_reqs - 1)
    # First program ids strictly increase with r (qsl is non-decreasing and r adds 1), so the
    # predicate "first id <= pid" is monotone and the search is exact.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        go_right = first <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo


@triton.jit
def _attend_tile(
    q,
    q_pos,
    m_i,
    l_i,
    acc,
    tile_start,
    kv_hi,
    offs_n,
    offs_d,
    bt_row,
    stride_btc,
    k_head,
    stride_kb,
    stride_ks,
    stride_kd,
    v_head,
    stride_vb,
    stride_vs,
    stride_vd,
    prefix_row,
    stride_pi,
    stride_pc,
    qq_ptr,
    qq_size,
    stride_qq0,
    stride_qq1,
    use_qq,
    context_len,
    sm_scale_log2,
    PAGE_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    MAX_RANGES: tl.constexpr,
    HAS_QQ_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Folds keys ``[tile_start, tile_start + TILE_N)`` into the online softmax state.

    ``q`` [BLOCK_M, HEAD_DIM] and ``q_pos`` [BLOCK_M] (absolute positions) describe the tile
    rows; ``m_i`` / ``l_i`` [BLOCK_M] fp32 are the running max (log2 units) and exp-sum and
    ``acc`` [BLOCK_M, HEAD_DIM] fp32 the un-normalised output. Returns the updated three.
    With ``HAS_QQ_BIAS`` and ``use_qq`` (this row takes the bias), the key at ``context_len + j``
    gets ``qq_bias[i, j]`` added for query ``i`` of the row when both are below ``qq_size``.
    """
    k_pos = tile_start + offs_n
    n_valid = k_pos < kv_hi
    page = tl.load(bt_row + (k_pos // PAGE_SIZE) * stride_btc, mask=n_valid, other=0)
    page = page.to(tl.int64)
    slot = k_pos % PAGE_SIZE
    k_tile = tl.load(
        k_head + (page * stride_kb + slot * stride_ks)[None, :] + offs_d[:, None] * stride_kd,
        mask=n_valid[None, :],
        other=0.0,
    )  # [HEAD_DIM, TILE_N]
    v_tile = tl.load(
        v_head + (page * stride_vb + slot * stride_vs)[:, None] + offs_d[None, :] * stride_vd,
        mask=n_valid[:, None],
        other=0.0,
    )  # [TILE_N, HEAD_DIM]

    if INTERPRETED:
        # Triton 3.6's interpreter stores bfloat16 as uint16 and its tl.dot multiplies those
        # raw bits. Widening to fp32 is exact (a product of two 16-bit floats fits fp32's
        # mantissa) and matches the compiled MMA up to summation order.
        q = q.to(tl.float32)
        k_tile = k_tile.to(tl.float32)
    s = tl.dot(q, k_tile, input_precision=DOT_PRECISION) * sm_scale_log2
    if HAS_QQ_BIAS:
        # Query index i and draft-block key index j (both relative to the row's first new
        # token). Loads are masked to the [qq_size, qq_size] square, so a row with more queries
        # than the bias has rows reads nothing out of bounds; those pairs get no bias.
        qi = q_pos - context_len
        kj = k_pos - context_len
        in_bias = ((qi < qq_size)[:, None] & ((kj >= 0) & (kj < qq_size))[None, :]) & use_qq
        bias = tl.load(
            qq_ptr + qi[:, None] * stride_qq0 + kj[None, :] * stride_qq1, mask=in_bias, other=0.0
        )
        # The bias is in natural-log units like the scaled logits; s is in log2 units.
        s = s + bias * 1.4426950408889634
    visible = k_pos[None, :] <= q_pos[:, None]
    if SLIDING_WINDOW > 0:
        visible = visible & ((q_pos[:, None] - k_pos[None, :]) < SLIDING_WINDOW)
    if MAX_RANGES > 0:
        for i in tl.static_range(MAX_RANGES):
            r_start = tl.load(prefix_row + i * stride_pi)
            r_end = tl.load(prefix_row + i * stride_pi + stride_pc)
            in_q = (q_pos >= r_start) & (q_pos < r_end)
            in_k = (k_pos >= r_start) & (k_pos < r_end)
            visible = visible | (in_q[:, None] & in_k[None, :])
    visible = visible & n_valid[None, :]
    s = tl.where(visible, s, float("-inf"))

    # Online softmax. A row with nothing visible yet keeps m = -inf; m_safe keeps
    # exp2(-inf - -inf) = NaN out of alpha and p.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v_tile.dtype)  # the MMA takes both operands in the cache dtype
    if INTERPRETED:
        p = p.to(tl.float32)  # see the bfloat16 note above; rounding to the cache dtype stays
        v_tile = v_tile.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v_tile, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    qsl_ptr,
    seq_lens_ptr,
    block_table_ptr,
    prefix_ptr,
    qq_ptr,
    segm_out_ptr,
    segm_max_ptr,
    segm_expsum_ptr,
    num_reqs,
    num_qq_bias_rows,
    qq_size,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_btr,
    stride_btc,
    stride_pr,
    stride_pi,
    stride_pc,
    stride_qq0,
    stride_qq1,
    stride_sor,
    stride_soh,
    stride_sos,
    stride_sod,
    stride_smr,
    stride_smh,
    stride_sms,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    MAX_RANGES: tl.constexpr,
    HAS_QQ_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    kv_head = tl.program_id(1)
    if SPLIT:
        row = tl.program_id(0)
        q_block = 0
        segment = tl.program_id(2)
    else:
        pid = tl.program_id(0)
        row = _find_row(qsl_ptr, pid, num_reqs, BLOCK_Q)
        q_block = pid - (tl.load(qsl_ptr + row) // BLOCK_Q + row)

    q_start = tl.load(qsl_ptr + row)
    q_len = tl.load(qsl_ptr + row + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return  # padded row, or a program id past this row's last query block
    seq_len = tl.load(seq_lens_ptr + row)
    context_len = seq_len - q_len  # absolute position of the row's first new query token

    # Tile rows: m -> (query index within the row, head within the GQA group).
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    q_head = kv_head * GROUP + head_in_group
    m_valid = (q_idx < q_len) & (head_in_group < GROUP)
    q_pos = context_len + q_idx
    token = (q_start + q_idx).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=m_valid[:, None],
        other=0.0,
    )

    # KV positions any query of this tile can see: [kv_lo, kv_hi). Only pruning; the exact
    # mask is applied per tile below.
    first_pos = context_len + q_block * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    kv_hi = last_pos + 1
    if SLIDING_WINDOW > 0:
        kv_lo = tl.maximum(first_pos - SLIDING_WINDOW + 1, 0)
    else:
        kv_lo = first_pos * 0  # a tensor zero, so the range updates below type-check
    prefix_row = prefix_ptr + row.to(tl.int64) * stride_pr
    if MAX_RANGES > 0:
        for i in tl.static_range(MAX_RANGES):
            r_start = tl.load(prefix_row + i * stride_pi)
            r_end = tl.load(prefix_row + i * stride_pi + stride_pc)
            # A range containing some query of the tile widens the KV range to the whole range.
            hits = (r_start < r_end) & (r_start <= last_pos) & (r_end > first_pos)
            kv_hi = tl.where(hits, tl.maximum(kv_hi, r_end), kv_hi)
            kv_lo = tl.where(hits, tl.minimum(kv_lo, r_start), kv_lo)
        kv_hi = tl.minimum(kv_hi, seq_len)
    kv_lo = (kv_lo // TILE_N) * TILE_N  # aligned tiles stay within a page when TILE_N | page

    num_tiles = tl.cdiv(kv_hi - kv_lo, TILE_N)
    if SPLIT:
        tiles_per_segment = tl.cdiv(num_tiles, NUM_SEGMENTS)
        tile_begin = segment * tiles_per_segment
        tile_end = tl.minimum(tile_begin + tiles_per_segment, num_tiles)
    else:
        tile_begin = 0
        tile_end = num_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, TILE_N)
    bt_row = block_table_ptr + row.to(tl.int64) * stride_btr
    # Decode rows come first, so "row < num_qq_bias_rows" picks the rows that take the tree
    # bias; later rows (prefills) of the same launch stay plain causal.
    use_qq = row < num_qq_bias_rows
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh

    if INTERPRETED:
        # Interpreter only: Triton 3.6's interpreter turns a tensor loop bound into a Python
        # int with int() on a 1-element array, which numpy >= 2.4 rejects
        # (triton-lang/triton#9171). A while loop compares instead. Compiled kernels keep the
        # for loop, which Triton can software-pipeline.
        tile = tile_begin
        while tile < tile_end:
            m_i, l_i, acc = _attend_tile(
                q,
                q_pos,
                m_i,
                l_i,
                acc,
                kv_lo + tile * TILE_N,
                kv_hi,
                offs_n,
                offs_d,
                bt_row,
                stride_btc,
                k_head,
                stride_kb,
                stride_ks,
                stride_kd,
                v_head,
                stride_vb,
                stride_vs,
                stride_vd,
                prefix_row,
                stride_pi,
                stride_pc,
                qq_ptr,
                qq_size,
                stride_qq0,
                stride_qq1,
                use_qq,
                context_len,
                sm_scale_log2,
                PAGE_SIZE,
                SLIDING_WINDOW,
                MAX_RANGES,
                HAS_QQ_BIAS,
                DOT_PRECISION,
                INTERPRETED,
            )
            tile += 1
    else:
        for tile in range(tile_begin, tile_end):
            m_i, l_i, acc = _attend_tile(
                q,
                q_pos,
                m_i,
                l_i,
                acc,
                kv_lo + tile * TILE_N,
                kv_hi,
                offs_n,
                offs_d,
                bt_row,
                stride_btc,
                k_head,
                stride_kb,
                stride_ks,
                stride_kd,
                v_head,
                stride_vb,
                stride_vs,
                stride_vd,
                prefix_row,
                stride_pi,
                stride_pc,
                qq_ptr,
                qq_size,
                stride_qq0,
                stride_qq1,
                use_qq,
                context_len,
                sm_scale_log2,
                PAGE_SIZE,
                SLIDING_WINDOW,
                MAX_RANGES,
                HAS_QQ_BIAS,
                DOT_PRECISION,
                INTERPRETED,
            )

    if SPLIT:
        # Partials are indexed by row (one query token per row on this path).
        row64 = row.to(tl.int64)
        seg_out = (
            segm_out_ptr
            + row64 * stride_sor
            + q_head[:, None] * stride_soh
            + segment * stride_sos
            + offs_d[None, :] * stride_sod
        )
        tl.store(seg_out, acc, mask=m_valid[:, None])
        seg_stat = row64 * stride_smr + q_head * stride_smh + segment * stride_sms
        tl.store(segm_max_ptr + seg_stat, m_i, mask=m_valid)
        tl.store(segm_expsum_ptr + seg_stat, l_i, mask=m_valid)
    else:
        # Every valid query sees at least itself, so l_i > 0 there; the guard only keeps the
        # masked-off tile rows finite.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=m_valid[:, None],
        )


@triton.jit
def _reduce_segments_kernel(
    out_ptr,
    qsl_ptr,
    segm_out_ptr,
    segm_max_ptr,
    segm_expsum_ptr,
    stride_ot,
    stride_oh,
    stride_od,
    stride_sor,
    stride_soh,
    stride_sos,
    stride_sod,
    stride_smr,
    stride_smh,
    stride_sms,
    NUM_SEGMENTS: tl.constexpr,
    SEG_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + row)
    q_len = tl.load(qsl_ptr + row + 1) - q_start
    if q_len == 0:
        return  # padded row: the attention kernel wrote no partials for it either

    row64 = row.to(tl.int64)
    offs_s = tl.arange(0, SEG_PAD)
    s_valid = offs_s < NUM_SEGMENTS
    stat = row64 * stride_smr + head * stride_smh + offs_s * stride_sms
    seg_max = tl.load(segm_max_ptr + stat, mask=s_valid, other=float("-inf"))
    seg_sum = tl.load(segm_expsum_ptr + stat, mask=s_valid, other=0.0)
    # Empty segments carry max = -inf, sum = 0 and contribute weight 0. The query sees itself,
    # so at least one segment is finite and the global max is finite.
    global_max = tl.max(seg_max, axis=0)
    weight = tl.math.exp2(seg_max - global_max)  # base 2: the partial maxima are in log2 units
    total = tl.sum(seg_sum * weight, axis=0)
    offs_d = tl.arange(0, HEAD_DIM)
    partial = tl.load(
        segm_out_ptr
        + row64 * stride_sor
        + head * stride_soh
        + offs_s[:, None] * stride_sos
        + offs_d[None, :] * stride_sod,
        mask=s_valid[:, None],
        other=0.0,
    )
    o = tl.sum(partial * weight[:, None], axis=0) / total
    token = q_start.to(tl.int64)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + offs_d * stride_od,
        o.to(out_ptr.dtype.element_ty),
    )


try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - layout of a future Triton
    _InterpretedFunction = ()
# Triton decides at decoration time (TRITON_INTERPRET) whether a kernel runs interpreted.
_INTERPRETED = isinstance(_paged_attention_kernel, _InterpretedFunction)


def split_kv_scratch(
    seq_threshold_3d: int,
    num_q_heads: int,
    head_dim: int,
    num_segments: int = 16,
    *,
    device: torch.device | str = "cuda",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocates the fp32 scratch buffers of the split-KV path.

    Plan-phase helper: allocate once (e.g. in the metadata builder) and reuse every step; the
    attention call never allocates, so it stays CUDA-graph capturable.

    Args:
        seq_threshold_3d: most request rows a split-KV launch may have (``num_reqs`` bound).
        num_q_heads: ``Hq``.
        head_dim: ``D``; the output scratch is padded to ``next_pow2(D)``.
        num_segments: KV segments per row.
        device: where to allocate.

    Returns:
        ``(segm_output, segm_max, segm_expsum)``:
        ``segm_output`` shape [seq_threshold_3d, Hq, num_segments, next_pow2(D)], float32;
        ``segm_max`` and ``segm_expsum`` shape [seq_threshold_3d, Hq, num_segments], float32.
        Contents are uninitialised: the kernels write every entry they later read.

    Example:
        >>> o, m, s = split_kv_scratch(4, 8, 64, device="cpu")
        >>> tuple(o.shape), tuple(m.shape), m.dtype
        ((4, 8, 16, 64), (4, 8, 16), torch.float32)
    """
    for name, value, low in (
        ("seq_threshold_3d", seq_threshold_3d, 1),
        ("num_q_heads", num_q_heads, 1),
        ("head_dim", head_dim, 1),
        ("num_segments", num_segments, 1),
    ):
        _check_host_int(name, value, low=low)
    d_pad = triton.next_power_of_2(head_dim)
    segm_output = torch.empty(
        (seq_threshold_3d, num_q_heads, num_segments, d_pad), dtype=torch.float32, device=device
    )
    segm_max = torch.empty((seq_threshold_3d, num_q_heads, num_segments), dtype=torch.float32, device=device)
    segm_expsum = torch.empty_like(segm_max)
    return segm_output, segm_max, segm_expsum


def unified_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    num_reqs: int,
    scale: float,
    sliding_window: int | None = None,
    prefix_ranges: torch.Tensor | None = None,
    use_split_kv: bool = False,
    segm_output: torch.Tensor | None = None,
    segm_max: torch.Tensor | None = None,
    segm_expsum: torch.Tensor | None = None,
    num_segments: int = 16,
    qq_bias: torch.Tensor | None = None,
    num_qq_bias_rows: int | None = None,
) -> torch.Tensor:
    """Causal paged attention for a mixed prefill/decode batch, written into ``out``.

    Run-phase call: it launches kernels and reads no device value on the host (no ``.item()``,
    no ``.cpu()``, no boolean indexing), so it adds no GPU->CPU sync and can be captured in a
    CUDA graph. Checks here look only at shapes, dtypes and devices.

    Args:
        q: shape [T, Hq, D], float16/bfloat16/float32; ``D`` a power of two in [16, 256].
        k_cache: shape [num_blocks, block_size, Hkv, D], same dtype as ``q``, ``Hq % Hkv == 0``.
        v_cache: same shape and dtype as ``k_cache`` (strides may differ).
        out: shape [T, Hq, D], same dtype as ``q``. Only tokens of rows ``< num_reqs`` are
            written; other tokens (padding beyond ``query_start_loc[num_reqs]``) are untouched.
        query_start_loc: shape [>= num_reqs + 1], int32, non-decreasing, ``[0] == 0``,
            ``[num_reqs] <= T``.
        seq_lens: shape [>= num_reqs], int32, ``seq_lens[r] >= q_len(r)``; context of row ``r``
            including this step's tokens. Padded rows: 0 (with ``q_len`` 0).
        block_table: shape [>= num_reqs, W], int32 page ids covering each row's ``seq_len``.
        max_query_len: host upper bound on ``q_len``; picks the query tile size only.
        max_seq_len: host upper bound on ``seq_lens``; sizes the split-KV grid only.
        num_reqs: rows to process (padded rows included).
        scale: softmax scale.
        sliding_window: ``None`` or an int >= 1: query at ``p`` sees keys ``k`` with
            ``p - k < sliding_window``.
        prefix_ranges: ``None`` or shape [>= num_reqs, max_ranges, 2], int32, half-open
            bidirectional ranges ``[start, end)``; ``(0, 0)`` entries are padding.
        use_split_kv: take the split-KV path. Only valid when every row has at most one query
            token (decode-only batch, ``max_query_len <= 1``).
        segm_output: split-KV scratch, shape [>= num_reqs, Hq, >= num_segments, D], float32
            (see :func:`split_kv_scratch`).
        segm_max: split-KV scratch, shape [>= num_reqs, Hq, >= num_segments], float32.
        segm_expsum: split-KV scratch, same shape as ``segm_max``, float32.
        num_segments: KV segments per row on the split-KV path.
        qq_bias: ``None`` or shape [L, L], float32: an additive bias between the query tokens
            of a row and the row's draft block, its last ``q_len`` keys (tree attention for
            speculative decoding). Query ``i`` of row ``r`` (position ``seq_len - q_len + i``)
            gets ``qq_bias[i, j]`` added to its scaled logit for the key at position
            ``seq_len - q_len + j``, for ``i, j < L``; ``-inf`` masks the pair. Keys before the
            draft block are unaffected, and the causal mask (and window, prefix ranges) still
            applies. Pairs outside the [L, L] square get no bias. Every query must keep at least
            one visible key (a tree bias has a zero diagonal).
        num_qq_bias_rows: host int in ``[0, num_reqs]``: rows ``< num_qq_bias_rows`` take the
            bias, the rest are plain causal (decode rows come first, so a mixed batch runs its
            prefills in the same launch). Default: every row. Only with ``qq_bias``.

    Returns:
        ``out``.

    Raises:
        TypeError: wrong tensor dtype or a non-int host argument.
        ValueError: shapes, devices or host ints are inconsistent.

    Example:
        >>> import torch
        >>> q = torch.ones(1, 1, 16); kv = torch.zeros(1, 1, 1, 16)
        >>> out = torch.empty_like(q)
        >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
        >>> _ = unified_paged_attention(q, kv, kv, out, query_start_loc=i32(0, 1),
        ...     seq_lens=i32(1), block_table=i32(0)[None], max_query_len=1, max_seq_len=1,
        ...     num_reqs=1, scale=1.0)  # doctest: +SKIP
    """
    _check_inputs(
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_table=block_table,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        num_reqs=num_reqs,
        sliding_window=sliding_window,
        prefix_ranges=prefix_ranges,
    )
    num_qq_bias_rows = _check_qq_bias(q, qq_bias, num_qq_bias_rows, num_reqs=num_reqs)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    if num_reqs == 0 or num_tokens == 0:
        return out

    # fp32 inputs: ask for true fp32 products; the default would round to TF32 on NVIDIA GPUs
    # (about 1e-3 relative), far from the fp32 reference.
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    window = 0 if sliding_window is None else int(sliding_window)
    if prefix_ranges is None:
        max_ranges = 0
        prefix_arg, prefix_strides = block_table, (0, 0, 0)  # never read: MAX_RANGES == 0
    else:
        max_ranges = prefix_ranges.shape[1]
        prefix_arg, prefix_strides = prefix_ranges, prefix_ranges.stride()
    # An empty [0, 0] bias (the first drafting step) or no bias row adds nothing: compile
    # the plain kernel rather than one that masks every bias load.
    has_qq_bias = qq_bias is not None and qq_bias.shape[0] > 0 and num_qq_bias_rows > 0
    if has_qq_bias:
        qq_arg, qq_size, qq_strides = qq_bias, qq_bias.shape[0], qq_bias.stride()
    else:
        qq_arg, qq_size, qq_strides, num_qq_bias_rows = block_table, 0, (0, 0), 0  # never read
    common = dict(
        GROUP=group,
        GROUP_PAD=group_pad,
        TILE_N=_TILE_N,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        SLIDING_WINDOW=window,
        MAX_RANGES=max_ranges,
        HAS_QQ_BIAS=has_qq_bias,
        DOT_PRECISION=dot_precision,
        INTERPRETED=_INTERPRETED,
    )
    sm_scale_log2 = float(scale) * _LOG2E

    if use_split_kv:
        segm_output, segm_max, segm_expsum = _check_split_kv(
            q,
            num_reqs=num_reqs,
            max_query_len=max_query_len,
            segm_output=segm_output,
            segm_max=segm_max,
            segm_expsum=segm_expsum,
            num_segments=num_segments,
        )
        # Segments past ceil(max_seq_len / TILE_N) would hold no tile for any row; dropping
        # them shrinks the grid. Per-row segment lengths come from the device seq_lens, so a
        # stale max_seq_len still covers every key, just with fewer segments.
        segments = max(1, min(num_segments, triton.cdiv(max_seq_len, _TILE_N)))
        block_m = max(16, group_pad)
        segm_strides = (*segm_output.stride(), *segm_max.stride())
        _paged_attention_kernel[(num_reqs, num_kv_heads, segments)](
            q,
            k_cache,
            v_cache,
            out,
            query_start_loc,
            seq_lens,
            block_table,
            prefix_arg,
            qq_arg,
            segm_output,
            segm_max,
            segm_expsum,
            num_reqs,
            num_qq_bias_rows,
            qq_size,
            sm_scale_log2,
            *q.stride(),
            *out.stride(),
            *k_cache.stride(),
            *v_cache.stride(),
            *block_table.stride(),
            *prefix_strides,
            *qq_strides,
            *segm_strides,
            BLOCK_Q=block_m // group_pad,
            BLOCK_M=block_m,
            SPLIT=True,
            NUM_SEGMENTS=segments,
            **common,
        )
        _reduce_segments_kernel[(num_reqs, num_q_heads)](
            out,
            query_start_loc,
            segm_output,
            segm_max,
            segm_expsum,
            *out.stride(),
            *segm_strides,
            NUM_SEGMENTS=segments,
            SEG_PAD=triton.next_power_of_2(segments),
            HEAD_DIM=head_dim,
        )
        return out

    # Enough query tokens per tile to cover max_query_len, capped so a prefill tile stays in
    # registers; 16 rows minimum for tl.dot.
    tokens_wanted = triton.next_power_of_2(max(max_query_len, 1))
    block_m = max(16, group_pad, min(_MAX_BLOCK_M, group_pad * tokens_wanted))
    block_q = block_m // group_pad
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        block_table,
        prefix_arg,
        qq_arg,
        out,  # the segm_* pointers are never read with SPLIT == False
        out,
        out,
        num_reqs,
        num_qq_bias_rows,
        qq_size,
        sm_scale_log2,
        *q.stride(),
        *out.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_table.stride(),
        *prefix_strides,
        *qq_strides,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        SPLIT=False,
        NUM_SEGMENTS=1,
        **common,
    )
    return out


# Split-KV scratch of paged_attention_from_metadata, one set per (device, output shape, stats
# shape), allocated by the first split-KV call (the warm-up, or before CUDA-graph capture) and
# reused by every later call, so steady-state calls allocate nothing and keep fixed addresses.
# The contents are only live between the attention kernel and its reduce, which run back to
# back on one stream, so calls on one stream may share a set; calls that can overlap on
# different streams must not (each would overwrite the other's partials): give each stream its
# own via ``scratch=``.
_SCRATCH: dict[tuple[torch.device, tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, ...]] = {}
_SCRATCH_LOCK = threading.Lock()
# Fields of the torch lowering of attnsync.backends.triton.TritonMetadata read here.
_TMD_FIELDS = (
    "query_start_loc",
    "seq_lens",
    "block_table",
    "mm_prefix_range_tensor",
    "num_reqs",
    "num_actual_tokens",
    "max_query_len",
    "max_seq_len",
    "block_size",
    "use_split_kv",
    "num_segments",
    "segm_output_shape",
    "segm_stats_shape",
    "has_prefix_ranges",
)


def _cached_scratch(
    device: torch.device, output_shape: tuple[int, ...], stats_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The process-wide split-KV scratch of ``device`` for these shapes (allocated once)."""
    key = (device, tuple(output_shape), tuple(stats_shape))
    scratch = _SCRATCH.get(key)
    if scratch is None:
        with _SCRATCH_LOCK:
            scratch = _SCRATCH.get(key)
            if scratch is None:
                scratch = (
                    torch.empty(key[1], dtype=torch.float32, device=device),
                    torch.empty(key[2], dtype=torch.float32, device=device),
                    torch.empty(key[2], dtype=torch.float32, device=device),
                )
                _SCRATCH[key] = scratch
    return scratch  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _missing_dataclass_fields(cls: type) -> tuple[str, ...]:
    """Fields of ``_TMD_FIELDS`` a dataclass ``cls`` lacks (cached: checked on every call)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return tuple(name for name in _TMD_FIELDS if name not in names)


def _missing_fields(tmd: Any) -> tuple[str, ...]:
    cls = type(tmd)
    if dataclasses.is_dataclass(cls):
        return _missing_dataclass_fields(cls)
    return tuple(name for name in _TMD_FIELDS if not hasattr(tmd, name))


def paged_attention_from_metadata(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    tmd: Any,
    *,
    scale: float,
    sliding_window: int | None = None,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`unified_paged_attention` driven by the torch lowering of the ``triton`` backend.

    ``tmd`` is ``attnsync.adapters.torch.lower(attnsync.build(batch, backend="triton", ...),
    device)``. Its fields are passed as they are: the host ints (``num_reqs``,
    ``max_query_len``, ``max_seq_len``, ``num_segments``, ``use_split_kv``) size the grids, and
    every per-row value comes from its device tensors (``query_start_loc``, ``seq_lens``,
    ``block_table``, and ``mm_prefix_range_tensor`` when ``has_prefix_ranges``). Nothing is read
    back from the device, so the call adds no sync and can be captured in a CUDA graph once the
    scratch exists.

    Split-KV scratch: unless ``scratch`` is given, the buffers of ``tmd.segm_output_shape`` /
    ``tmd.segm_stats_shape`` are allocated on the first split-KV call for that device and those
    shapes, then cached for the life of the process and reused by every later call. That is safe
    for calls on one stream (each call's reduce finishes reading before the next call's kernel
    writes). Launches that may overlap on different streams need their own buffers: pass
    ``scratch=split_kv_scratch(...)`` per stream.

    Args:
        q: shape [T, Hq, D] with ``T >= tmd.num_actual_tokens``; see
            :func:`unified_paged_attention` for dtypes and head sizes.
        k_cache, v_cache: shape [num_blocks, tmd.block_size, Hkv, D].
        out: shape [T, Hq, D], same dtype as ``q``; tokens of no row stay untouched.
        tmd: the torch-lowered ``TritonMetadata`` (``TorchTritonMetadata``), on ``q``'s device.
        scale: softmax scale.
        sliding_window: ``None`` or an int >= 1.
        scratch: optional ``(segm_output, segm_max, segm_expsum)`` for the split-KV path,
            shaped like :func:`split_kv_scratch`'s result; overrides the cached buffers.

    Returns:
        ``out``.

    Raises:
        TypeError: ``tmd`` is not a torch lowering of ``TritonMetadata``, or a dtype is wrong.
        ValueError: the tensors disagree with the metadata (block size, token count, heads).

    Example:
        >>> import attnsync, torch
        >>> from attnsync.adapters import torch as ast
        >>> batch = attnsync.Batch(query_lens=[1], seq_lens=[3], block_table=[[0]], block_size=4)
        >>> md = attnsync.build(batch, backend="triton", num_q_heads=2, num_kv_heads=1, head_dim=16)
        >>> tmd = ast.lower(md, device="cpu")
        >>> q = torch.ones(1, 2, 16); kv = torch.ones(1, 4, 1, 16)
        >>> out = paged_attention_from_metadata(q, kv, kv, torch.empty_like(q), tmd, scale=0.25)
        >>> out[0, 0, :2].tolist()  # doctest: +SKIP (CPU tensors need TRITON_INTERPRET=1)
        [1.0, 1.0]
    """
    missing = _missing_fields(tmd)
    if missing or not isinstance(tmd.query_start_loc, torch.Tensor):
        raise TypeError(
            f"tmd: expected the torch lowering of the triton backend's metadata, received "
            f"{type(tmd).__name__}" + (f" (no field(s) {list(missing)})" if missing else " with non-tensor fields")
            + '. Fix: tmd = attnsync.adapters.torch.lower(attnsync.build(batch, backend="triton", '
            "num_q_heads=..., num_kv_heads=..., head_dim=...), device=q.device)."
        )
    if k_cache.dim() == 4 and k_cache.shape[1] != tmd.block_size:
        raise ValueError(
            f"k_cache has pages of {k_cache.shape[1]} tokens but the metadata was built with "
            f"block_size={tmd.block_size}; build the batch with the cache's page size"
        )
    if q.dim() >= 1 and q.shape[0] < tmd.num_actual_tokens:
        raise ValueError(
            f"q has {q.shape[0]} tokens but the metadata covers num_actual_tokens="
            f"{tmd.num_actual_tokens}; q must hold every (padded) token of the batch"
        )
    prefix_ranges = tmd.mm_prefix_range_tensor if tmd.has_prefix_ranges else None
    segm_output = segm_max = segm_expsum = None
    if tmd.use_split_kv:
        if scratch is None:
            if q.dim() == 3 and tmd.segm_output_shape[1] != q.shape[1]:
                raise ValueError(
                    f"the metadata was built with num_q_heads={tmd.segm_output_shape[1]} but q has "
                    f"{q.shape[1]} heads; build with the layer's head counts"
                )
            segm_output, segm_max, segm_expsum = _cached_scratch(
                q.device, tmd.segm_output_shape, tmd.segm_stats_shape
            )
        else:
            if not isinstance(scratch, tuple | list) or len(scratch) != 3:
                raise TypeError("scratch must be a (segm_output, segm_max, segm_expsum) tuple")
            segm_output, segm_max, segm_expsum = scratch
    return unified_paged_attention(
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc=tmd.query_start_loc,
        seq_lens=tmd.seq_lens,
        block_table=tmd.block_table,
        max_query_len=tmd.max_query_len,
        max_seq_len=tmd.max_seq_len,
        num_reqs=tmd.num_reqs,
        scale=scale,
        sliding_window=sliding_window,
        prefix_ranges=prefix_ranges,
        use_split_kv=tmd.use_split_kv,
        segm_output=segm_output,
        segm_max=segm_max,
        segm_expsum=segm_expsum,
        num_segments=tmd.num_segments,
    )


def _check_host_int(name: str, value: object, *, low: int) -> None:
    """Raises unless ``value`` is a Python int (not bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be a host int, got {type(value).__name__}; pass a Python int "
            "computed on the host, not a device tensor (reading one would sync the GPU)"
        )
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    num_reqs: int,
    sliding_window: int | None,
    prefix_ranges: torch.Tensor | None,
) -> None:
    """Checks shapes, dtypes, devices and host ints of :func:`unified_paged_attention`."""
    tensors = {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "out": out,
        "query_start_loc": query_start_loc,
        "seq_lens": seq_lens,
        "block_table": block_table,
    }
    if prefix_ranges is not None:
        tensors["prefix_ranges"] = prefix_ranges
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; move every input to one device"
            )

    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name in ("k_cache", "v_cache", "out"):
        if tensors[name].dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {tensors[name].dtype} but q has {q.dtype}; "
                "q, k_cache, v_cache and out must share one dtype"
            )
    for name in ("query_start_loc", "seq_lens", "block_table", "prefix_ranges"):
        if name in tensors and tensors[name].dtype != torch.int32:
            raise TypeError(
                f"{name} must be int32, got {tensors[name].dtype}; the metadata contract is int32"
            )

    if q.dim() != 3:
        raise ValueError(f"q must have shape [T, Hq, D], got {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must have shape [num_blocks, block_size, Hkv, D], got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    if out.shape != q.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but q has {tuple(q.shape)}")
    _, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but k_cache has {kv_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads}) for grouped-query attention"
        )
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(
            f"head_dim must be a power of two in [16, 256] (tl.arange and tl.dot need it), got {head_dim}"
        )

    _check_host_int("num_reqs", num_reqs, low=0)
    _check_host_int("max_query_len", max_query_len, low=0)
    _check_host_int("max_seq_len", max_seq_len, low=0)
    if query_start_loc.dim() != 1 or query_start_loc.shape[0] < num_reqs + 1:
        raise ValueError(
            f"query_start_loc must have shape [>= num_reqs + 1] = [>= {num_reqs + 1}], "
            f"got {tuple(query_start_loc.shape)}"
        )
    if seq_lens.dim() != 1 or seq_lens.shape[0] < num_reqs:
        raise ValueError(
            f"seq_lens must have shape [>= num_reqs] = [>= {num_reqs}], got {tuple(seq_lens.shape)}"
        )
    if block_table.dim() != 2 or block_table.shape[0] < num_reqs:
        raise ValueError(
            f"block_table must have shape [>= num_reqs, W] with num_reqs = {num_reqs}, "
            f"got {tuple(block_table.shape)}"
        )
    if prefix_ranges is not None and (
        prefix_ranges.dim() != 3 or prefix_ranges.shape[0] < num_reqs or prefix_ranges.shape[2] != 2
    ):
        raise ValueError(
            f"prefix_ranges must have shape [>= num_reqs, max_ranges, 2] with num_reqs = "
            f"{num_reqs}, got {tuple(prefix_ranges.shape)}"
        )
    if sliding_window is not None:
        _check_host_int("sliding_window", sliding_window, low=1)


def _check_qq_bias(
    q: torch.Tensor, qq_bias: torch.Tensor | None, num_qq_bias_rows: int | None, *, num_reqs: int
) -> int:
    """Checks the tree-bias arguments; returns the number of biased rows (0 without a bias)."""
    if qq_bias is None:
        if num_qq_bias_rows is not None:
            raise ValueError("num_qq_bias_rows was given without qq_bias; pass both or neither")
        return 0
    if not isinstance(qq_bias, torch.Tensor):
        raise TypeError(f"qq_bias must be a torch.Tensor, got {type(qq_bias).__name__}")
    if qq_bias.dtype != torch.float32:
        raise TypeError(
            f"qq_bias must be float32 (an additive bias with -inf for masked pairs), got {qq_bias.dtype}"
        )
    if qq_bias.device != q.device:
        raise ValueError(f"qq_bias is on {qq_bias.device} but q is on {q.device}; move it to one device")
    if qq_bias.dim() != 2 or qq_bias.shape[0] != qq_bias.shape[1]:
        raise ValueError(f"qq_bias must be a square [L, L] matrix, got shape {tuple(qq_bias.shape)}")
    if num_qq_bias_rows is None:
        return num_reqs
    _check_host_int("num_qq_bias_rows", num_qq_bias_rows, low=0)
    if num_qq_bias_rows > num_reqs:
        raise ValueError(
            f"num_qq_bias_rows ({num_qq_bias_rows}) exceeds num_reqs ({num_reqs}); it counts the "
            "leading (decode) rows that take the bias"
        )
    return num_qq_bias_rows


def _check_split_kv(
    q: torch.Tensor,
    *,
    num_reqs: int,
    max_query_len: int,
    segm_output: torch.Tensor | None,
    segm_max: torch.Tensor | None,
    segm_expsum: torch.Tensor | None,
    num_segments: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks the split-KV arguments; returns the three scratch buffers, now known non-None."""
    if segm_output is None or segm_max is None or segm_expsum is None:
        raise ValueError(
            "use_split_kv=True needs segm_output, segm_max and segm_expsum; "
            "allocate them once with split_kv_scratch(...)"
        )
    if max_query_len > 1:
        raise ValueError(
            f"use_split_kv=True handles decode-only batches (max_query_len <= 1), got "
            f"max_query_len={max_query_len}; use the 2D path (use_split_kv=False)"
        )
    _check_host_int("num_segments", num_segments, low=1)
    _, num_q_heads, head_dim = q.shape
    for name, t in (("segm_output", segm_output), ("segm_max", segm_max), ("segm_expsum", segm_expsum)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device != q.device:
            raise TypeError(f"{name} must be a float32 tensor on {q.device}")
        if t.shape[0] < num_reqs or t.shape[1] != num_q_heads or t.shape[2] < num_segments:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected [>= num_reqs ({num_reqs}), "
                f"Hq ({num_q_heads}), >= num_segments ({num_segments}), ...]; "
                "raise seq_threshold_3d in split_kv_scratch or take the 2D path"
            )
    if segm_output.dim() != 4 or segm_output.shape[3] < head_dim:
        raise ValueError(f"segm_output must be [R, Hq, S, >= {head_dim}], got {tuple(segm_output.shape)}")
    if segm_max.dim() != 3 or segm_expsum.shape != segm_max.shape:
        raise ValueError(
            f"segm_max and segm_expsum must both be [R, Hq, S], got {tuple(segm_max.shape)} "
            f"and {tuple(segm_expsum.shape)}"
        )
    if segm_max.stride() != segm_expsum.stride():
        raise ValueError("segm_max and segm_expsum must have the same strides (one index for both)")
    return segm_output, segm_max, segm_expsum
