"""TurboQuant attention in torch and Triton over attnsync's ``turboquant`` metadata.

Opt-in module: it imports ``torch`` and ``triton`` at module level.

The cache format (byte layout, quantization rule, rotation) is specified in
`attnsync.backends.turboquant.SlotLayout`; the Triton writer here produces the same bytes as
the numpy reference there. One layer step (`TurboQuantAttention.forward`) is:

1. rotate q, k, v with the fixed orthogonal matrix R (``x @ R``);
2. quantize the step's k, v and write them into the cache at ``slot_mapping``
   (`store_kv`; slot -1 is skipped);
3. decodes, and device-routed speculative rows, run `decode_attention` over the compressed
   cache: one program per (query token, kv head, KV split), lengths read on the device;
4. prefills: one `varlen_attention` call over the raw K/V when every prefill row is fresh,
   otherwise a host loop over `md.host_loop_rows` (Python ints from the builder): a fresh row
   attends over its raw K/V; a continuation row first dequantizes its cached context
   (`dequantize_context`) into a workspace, appends its raw new K/V and attends over both.
   The 2-element ``cu_seqlens`` buffers of these calls are allocated once per layer object and
   rewritten with ``buf[1:2].fill_(n)``, a fill kernel; ``buf[1] = n`` would copy a host scalar
   synchronously on CUDA;
5. turn the output back with ``R^T``.

`sub_batches` gives vLLM-style decode and prefill sub-metadata (device views, host maxima) of
a lowered object, for code that wants to call the kernels itself.

Nothing in `forward` reads a device value: every branch and loop bound is a host int of the
metadata, every device value stays on the device. `TurboQuantAttention.forward_naive` is
vLLM's code before its sync-removal PR (vllm-project/vllm#41434): ``.tolist()`` of device
tensors every layer, ``torch.zeros(2)`` per call, ``t[1] = q_len``; it is kept for the
equivalence tests and `bench/bench_turboquant.py`.

Two implementations of the four device operations: ``impl="triton"`` (the kernels below) and
``impl="torch"`` (plain torch ops with static shapes; slower and memory hungry, but framework
only, so CPU tests are fast and FakeTensorMode can trace the whole forward).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from ..backends.turboquant import HostRow, SlotLayout, rotation_matrix, slot_layout

__all__ = [
    "SubBatch",
    "TurboQuantAttention",
    "allocate_cache",
    "decode_attention",
    "dequantize_cache",
    "dequantize_context",
    "choose_num_splits",
    "quantize",
    "store_kv",
    "sub_batches",
    "varlen_attention",
]

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 16  # KV splits of the decode kernel at most (partials are [items, Hq, 16, D])
# Elements of the [GROUP_PAD, BLOCK_N, HEAD_DIM] product the decode kernel keeps per tile:
# 8192 fp32 is 64 registers per thread at 4 warps; with head_dim 128 and a GQA group of 2
# (Qwen3-0.6B) that is a 32-key tile. A starting point, not a tuned value.
_DECODE_TILE_ELEMENTS = 8192


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _rint(y):
    """Round half to even for |y| < 2**22, in fp32, identical compiled and interpreted.

    Adding 1.5 * 2**23 moves y into [2**23, 2**24), where the fp32 spacing is 1, so the
    addition itself rounds (to nearest, ties to even); subtracting it back is exact.
    """
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _store_kernel(
    k_ptr,
    v_ptr,
    slot_ptr,
    cache_u8,
    cache_i8,
    cache_f32,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ch,
    stride_cs,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_DIM: tl.constexpr,
    KS_OFF: tl.constexpr,
    VS_OFF: tl.constexpr,
    VM_OFF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return  # padding token (PAD_SLOT_ID)
    base = (slot // PAGE_SIZE) * stride_cb + head * stride_ch + (slot % PAGE_SIZE) * stride_cs

    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + tok * stride_kt + head * stride_kh + offs_d).to(tl.float32)
    k_scale = tl.math.div_rn(tl.max(tl.abs(k), axis=0), 127.0)
    k_safe = tl.where(k_scale > 0.0, k_scale, 1.0)
    k_code = _rint(tl.math.div_rn(k, k_safe))
    k_code = tl.minimum(tl.maximum(k_code, -127.0), 127.0)
    k_code = tl.where(k_scale > 0.0, k_code, 0.0)
    tl.store(cache_i8 + base + offs_d, k_code.to(tl.int8))

    # Even and odd coordinates are loaded apart, so each pair lands in one byte without a
    # register shuffle: byte j = code[2j] | code[2j + 1] << 4.
    offs_h = tl.arange(0, HALF_DIM)
    v_row = v_ptr + tok * stride_vt + head * stride_vh
    v_even = tl.load(v_row + 2 * offs_h).to(tl.float32)
    v_odd = tl.load(v_row + 2 * offs_h + 1).to(tl.float32)
    v_min = tl.minimum(tl.min(v_even, axis=0), tl.min(v_odd, axis=0))
    v_max = tl.maximum(tl.max(v_even, axis=0), tl.max(v_odd, axis=0))
    v_scale = tl.math.div_rn(v_max - v_min, 15.0)
    v_safe = tl.where(v_scale > 0.0, v_scale, 1.0)
    c_even = tl.minimum(tl.maximum(_rint(tl.math.div_rn(v_even - v_min, v_safe)), 0.0), 15.0)
    c_odd = tl.minimum(tl.maximum(_rint(tl.math.div_rn(v_odd - v_min, v_safe)), 0.0), 15.0)
    c_even = tl.where(v_scale > 0.0, c_even, 0.0).to(tl.int32)
    c_odd = tl.where(v_scale > 0.0, c_odd, 0.0).to(tl.int32)
    tl.store(cache_u8 + base + HEAD_DIM + offs_h, (c_even | (c_odd << 4)).to(tl.uint8))
    tl.store(cache_f32 + (base + KS_OFF) // 4, k_scale)
    tl.store(cache_f32 + (base + VS_OFF) // 4, v_scale)
    tl.store(cache_f32 + (base + VM_OFF) // 4, v_min)


@triton.jit
def _decode_tile(
    q,
    m_i,
    l_i,
    acc,
    tile_start,
    kv_len,
    offs_n,
    offs_d,
    bt_row,
    head_base,
    cache_u8,
    cache_i8,
    cache_f32,
    stride_cb,
    stride_cs,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KS_OFF: tl.constexpr,
    VS_OFF: tl.constexpr,
    VM_OFF: tl.constexpr,
):
    """Folds keys [tile_start, tile_start + BLOCK_N) of one row and kv head into the state.

    ``q`` [GROUP_PAD, HEAD_DIM] fp32 is pre-scaled by ``scale * log2(e)``; ``m_i``/``l_i``
    [GROUP_PAD] are the running max (log2 units) and exp-sum, ``acc`` [GROUP_PAD, HEAD_DIM].
    """
    k_pos = tile_start + offs_n
    valid = k_pos < kv_len
    page = tl.load(bt_row + k_pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
    base = head_base + page * stride_cb + (k_pos % PAGE_SIZE).to(tl.int64) * stride_cs
    k_code = tl.load(cache_i8 + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0).to(tl.float32)
    k_scale = tl.load(cache_f32 + (base + KS_OFF) // 4, mask=valid, other=0.0)
    # scores = (q . code) * k_scale: one multiply per key instead of one per coordinate
    s = tl.sum(q[:, None, :] * k_code[None, :, :], axis=2) * k_scale[None, :]
    s = tl.where(valid[None, :], s, float("-inf"))

    packed = tl.load(
        cache_u8 + base[:, None] + HEAD_DIM + offs_d[None, :] // 2, mask=valid[:, None], other=0
    ).to(tl.int32)
    v_code = ((packed >> ((offs_d[None, :] % 2) * 4)) & 15).to(tl.float32)
    v_scale = tl.load(cache_f32 + (base + VS_OFF) // 4, mask=valid, other=0.0)
    v_min = tl.load(cache_f32 + (base + VM_OFF) // 4, mask=valid, other=0.0)
    v = v_min[:, None] + v_code * v_scale[:, None]  # masked keys: 0, never NaN

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["token_base"])
def _decode_kernel(
    q_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    cache_u8,
    cache_i8,
    cache_f32,
    token_ids_ptr,
    token_to_req_ptr,
    qsl_ptr,
    seq_lens_ptr,
    block_table_ptr,
    token_base,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_pi,
    stride_ph,
    stride_ps,
    stride_si,
    stride_sh,
    stride_cb,
    stride_ch,
    stride_cs,
    stride_btr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KS_OFF: tl.constexpr,
    VS_OFF: tl.constexpr,
    VM_OFF: tl.constexpr,
    HAS_TOKEN_IDS: tl.constexpr,
    SPLIT: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    if HAS_TOKEN_IDS:
        tok = tl.load(token_ids_ptr + item)
    else:
        tok = token_base + item
    row = tl.load(token_to_req_ptr + tok)
    q_end = tl.load(qsl_ptr + row + 1)
    seq_len = tl.load(seq_lens_ptr + row)  # device length: exact even when the host has a bound
    kv_len = seq_len - (q_end - tok) + 1  # the token sits at position kv_len - 1; causal

    offs_g = tl.arange(0, GROUP_PAD)
    g_valid = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    tok64 = tok.to(tl.int64)
    q = tl.load(
        q_ptr + tok64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_valid[:, None],
        other=0.0,
    ).to(tl.float32)
    q = q * sm_scale_log2

    num_tiles = tl.cdiv(kv_len, BLOCK_N)
    per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = split * per_split
    tile_end = tl.minimum(tile_begin + per_split, num_tiles)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = block_table_ptr + row.to(tl.int64) * stride_btr
    head_base = kv_head.to(tl.int64) * stride_ch
    if INTERPRETED:
        # Triton 3.6's interpreter calls int() on a tensor loop bound, which numpy >= 2.4
        # refuses (triton-lang/triton#9171); a while loop compares instead.
        tile = tile_begin
        while tile < tile_end:
            m_i, l_i, acc = _decode_tile(
                q, m_i, l_i, acc, tile * BLOCK_N, kv_len, offs_n, offs_d, bt_row, head_base,
                cache_u8, cache_i8, cache_f32, stride_cb, stride_cs,
                PAGE_SIZE, HEAD_DIM, KS_OFF, VS_OFF, VM_OFF,
            )
            tile += 1
    else:
        for tile in range(tile_begin, tile_end):
            m_i, l_i, acc = _decode_tile(
                q, m_i, l_i, acc, tile * BLOCK_N, kv_len, offs_n, offs_d, bt_row, head_base,
                cache_u8, cache_i8, cache_f32, stride_cb, stride_cs,
                PAGE_SIZE, HEAD_DIM, KS_OFF, VS_OFF, VM_OFF,
            )

    if SPLIT:
        item64 = item.to(tl.int64)
        tl.store(
            part_acc_ptr + item64 * stride_pi + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
            acc,
            mask=g_valid[:, None],
        )
        stat = item64 * stride_si + heads * stride_sh + split
        tl.store(part_max_ptr + stat, m_i, mask=g_valid)
        tl.store(part_sum_ptr + stat, l_i, mask=g_valid)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded group rows; a token sees itself
        o = acc / l_safe[:, None]
        tl.store(
            out_ptr + tok64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=g_valid[:, None],
        )


@triton.jit(do_not_specialize=["token_base", "num_splits"])
def _decode_reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    token_ids_ptr,
    token_base,
    num_splits,
    stride_ot,
    stride_oh,
    stride_pi,
    stride_ph,
    stride_ps,
    stride_si,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    HAS_TOKEN_IDS: tl.constexpr,
):
    item = tl.program_id(0)
    head = tl.program_id(1)
    if HAS_TOKEN_IDS:
        tok = tl.load(token_ids_ptr + item)
    else:
        tok = token_base + item
    item64 = item.to(tl.int64)
    offs_s = tl.arange(0, SPLIT_PAD)
    s_valid = offs_s < num_splits
    stat = item64 * stride_si + head * stride_sh + offs_s
    seg_max = tl.load(part_max_ptr + stat, mask=s_valid, other=float("-inf"))
    seg_sum = tl.load(part_sum_ptr + stat, mask=s_valid, other=0.0)
    # Split 0 always holds the first key tile, so the global max is finite; empty splits
    # (max -inf, sum 0, acc 0) get weight 0.
    weight = tl.math.exp2(seg_max - tl.max(seg_max, axis=0))
    total = tl.sum(seg_sum * weight, axis=0)
    offs_d = tl.arange(0, HEAD_DIM)
    partial = tl.load(
        part_acc_ptr + item64 * stride_pi + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=s_valid[:, None],
        other=0.0,
    )
    o = tl.sum(partial * weight[:, None], axis=0) / total
    tl.store(out_ptr + tok.to(tl.int64) * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["num_positions"])
def _dequant_context_kernel(
    cache_u8,
    cache_i8,
    cache_f32,
    bt_row,
    k_out,
    v_out,
    num_positions,
    stride_cb,
    stride_ch,
    stride_cs,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    KS_OFF: tl.constexpr,
    VS_OFF: tl.constexpr,
    VM_OFF: tl.constexpr,
):
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    head = tl.program_id(1).to(tl.int64)
    valid = pos < num_positions
    page = tl.load(bt_row + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
    base = page * stride_cb + head * stride_ch + (pos % PAGE_SIZE).to(tl.int64) * stride_cs
    offs_d = tl.arange(0, HEAD_DIM)
    k_code = tl.load(cache_i8 + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0).to(tl.float32)
    k_scale = tl.load(cache_f32 + (base + KS_OFF) // 4, mask=valid, other=0.0)
    packed = tl.load(
        cache_u8 + base[:, None] + HEAD_DIM + offs_d[None, :] // 2, mask=valid[:, None], other=0
    ).to(tl.int32)
    v_code = ((packed >> ((offs_d[None, :] % 2) * 4)) & 15).to(tl.float32)
    v_scale = tl.load(cache_f32 + (base + VS_OFF) // 4, mask=valid, other=0.0)
    v_min = tl.load(cache_f32 + (base + VM_OFF) // 4, mask=valid, other=0.0)
    pos64 = pos.to(tl.int64)
    tl.store(
        k_out + pos64[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
        (k_code * k_scale[:, None]).to(k_out.dtype.element_ty),
        mask=valid[:, None],
    )
    tl.store(
        v_out + pos64[:, None] * stride_vt + head * stride_vh + offs_d[None, :],
        (v_min[:, None] + v_code * v_scale[:, None]).to(v_out.dtype.element_ty),
        mask=valid[:, None],
    )


@triton.jit
def _varlen_tile(
    q,
    q_last,
    m_i,
    l_i,
    acc,
    n_start,
    k_len,
    offs_n,
    offs_d,
    k_head,
    v_head,
    stride_kt,
    stride_vt,
    sm_scale_log2,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    k_idx = n_start + offs_n
    n_valid = k_idx < k_len
    k = tl.load(k_head + k_idx[None, :].to(tl.int64) * stride_kt + offs_d[:, None], mask=n_valid[None, :], other=0.0)
    v = tl.load(v_head + k_idx[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    if INTERPRETED:
        # The 3.6 interpreter keeps bfloat16 as raw uint16 bits, which its tl.dot would
        # multiply as integers; fp32 is exact for 16-bit inputs.
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale_log2
    visible = (k_idx[None, :] <= q_last[:, None]) & n_valid[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)
    if INTERPRETED:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _varlen_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    cu_q_ptr,
    cu_k_ptr,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    offs_d = tl.arange(0, HEAD_DIM)
    q_tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    # Bottom-right causal alignment: query i of the sequence sees keys [0, k_len - q_len + i].
    q_last = k_len - q_len + offs_m
    hi = tl.minimum(k_len, k_len - q_len + (m_block + 1) * BLOCK_M)
    kv_head = (head // GROUP).to(tl.int64)
    k_head = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_head = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    num_tiles = tl.cdiv(hi, BLOCK_N)
    if INTERPRETED:
        tile = num_tiles * 0
        while tile < num_tiles:
            m_i, l_i, acc = _varlen_tile(
                q, q_last, m_i, l_i, acc, tile * BLOCK_N, k_len, offs_n, offs_d, k_head, v_head,
                stride_kt, stride_vt, sm_scale_log2, DOT_PRECISION, INTERPRETED,
            )
            tile += 1
    else:
        for tile in range(0, num_tiles):
            m_i, l_i, acc = _varlen_tile(
                q, q_last, m_i, l_i, acc, tile * BLOCK_N, k_len, offs_n, offs_d, k_head, v_head,
                stride_kt, stride_vt, sm_scale_log2, DOT_PRECISION, INTERPRETED,
            )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(
        o_ptr + q_tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=m_valid[:, None],
    )


try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - layout of a future Triton
    _InterpretedFunction = ()
# Triton decides at decoration time (TRITON_INTERPRET) whether a kernel runs interpreted.
_INTERPRETED = isinstance(_decode_kernel, _InterpretedFunction)


# --------------------------------------------------------------------------------------------
# Cache helpers
# --------------------------------------------------------------------------------------------


def allocate_cache(
    num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int, *, device: Any = "cuda"
) -> torch.Tensor:
    """A zeroed TurboQuant cache: uint8 [num_blocks, num_kv_heads, block_size, slot_bytes]."""
    layout = slot_layout(head_dim)
    return torch.zeros((num_blocks, num_kv_heads, block_size, layout.slot_bytes), dtype=torch.uint8, device=device)


def _layout_of(cache: torch.Tensor, head_dim: int) -> SlotLayout:
    layout = slot_layout(head_dim)
    if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[-1] != layout.slot_bytes:
        raise ValueError(
            f"kv_cache: expected uint8 [num_blocks, num_kv_heads, block_size, {layout.slot_bytes}] "
            f"for head_dim {head_dim}, received {cache.dtype} {tuple(cache.shape)}. "
            f"Fix: allocate it with attnsync.kernels.turboquant.allocate_cache."
        )
    if not cache.is_contiguous() or cache.storage_offset() % 16:
        raise ValueError(
            "kv_cache: expected a contiguous, 16-byte aligned cache (one layer's cache, for example "
            "caches[layer] of a [num_layers, ...] tensor); received strides "
            f"{cache.stride()}."
        )
    return layout


def _cache_views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 and float32 views of the same bytes (the kernels address all three by byte offset)."""
    flat = cache.view(-1)
    return flat.view(torch.int8), flat.view(torch.float32)


def quantize(k_rot: torch.Tensor, v_rot: torch.Tensor) -> torch.Tensor:
    """Torch quantizer: slot bytes uint8 [..., used_bytes] (see `SlotLayout`; padding omitted).

    Same float32 arithmetic as the numpy reference, so the bytes agree bit for bit. Divisors
    are full tensors: torch's CUDA division by a Python scalar multiplies by the reciprocal,
    which is not correctly rounded.
    """
    layout = slot_layout(k_rot.shape[-1])
    d = layout.head_dim
    k = k_rot.float()
    v = v_rot.float()
    k_amax = k.abs().amax(dim=-1)
    k_scale = k_amax / torch.full_like(k_amax, 127.0)
    k_safe = torch.where(k_scale > 0, k_scale, torch.ones_like(k_scale))
    k_code = torch.round(k / k_safe.unsqueeze(-1)).clamp(-127, 127)
    k_code = torch.where((k_scale > 0).unsqueeze(-1), k_code, torch.zeros_like(k_code)).to(torch.int8)
    v_min = v.amin(dim=-1)
    v_range = v.amax(dim=-1) - v_min
    v_scale = v_range / torch.full_like(v_range, 15.0)
    v_safe = torch.where(v_scale > 0, v_scale, torch.ones_like(v_scale))
    v_code = torch.round((v - v_min.unsqueeze(-1)) / v_safe.unsqueeze(-1)).clamp(0, 15)
    v_code = torch.where((v_scale > 0).unsqueeze(-1), v_code, torch.zeros_like(v_code)).to(torch.uint8)
    packed = v_code[..., 0::2] | (v_code[..., 1::2] << 4)
    scales = torch.stack([k_scale, v_scale, v_min], dim=-1).contiguous().view(torch.uint8)
    out = torch.cat([k_code.view(torch.uint8), packed, scales], dim=-1)
    assert out.shape[-1] == layout.used_bytes
    return out


def dequantize_cache(cache: torch.Tensor, head_dim: int, *, dtype: torch.dtype = torch.float32):
    """Rotated ``(k, v)`` of every slot of `cache`, each [num_blocks, Hkv, block_size, D]."""
    layout = _layout_of(cache, head_dim)
    return _dequantize_bytes(cache, layout, dtype)


def _dequantize_bytes(slots: torch.Tensor, layout: SlotLayout, dtype: torch.dtype):
    d = layout.head_dim
    k_code = slots[..., :d].contiguous().view(torch.int8)
    packed = slots[..., d : d + d // 2]
    v_code = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
    scales = slots[..., layout.k_scale_offset : layout.used_bytes].contiguous().view(torch.float32)
    k = k_code.float() * scales[..., 0:1]
    v = scales[..., 2:3] + v_code.float() * scales[..., 1:2]
    return k.to(dtype), v.to(dtype)


# --------------------------------------------------------------------------------------------
# The four device operations (impl="triton" or "torch")
# --------------------------------------------------------------------------------------------


def store_kv(
    k_rot: torch.Tensor,
    v_rot: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    num_tokens: int,
    impl: str = "triton",
) -> None:
    """Quantize the first `num_tokens` tokens of `k_rot`, `v_rot` [T, Hkv, D] into the cache.

    Token ``t`` goes to slot ``slot_mapping[t]`` of every kv head; slot -1 is skipped (Triton).
    The torch path writes the first `num_tokens` tokens and expects their slots to be valid
    (the adapters guarantee it: padding tokens come after the real ones).
    """
    head_dim = k_rot.shape[-1]
    layout = _layout_of(kv_cache, head_dim)
    if num_tokens == 0:
        return
    if impl == "torch":
        _store_torch(k_rot[:num_tokens], v_rot[:num_tokens], kv_cache, slot_mapping[:num_tokens], layout)
        return
    _require_unit_stride(k_rot, "k_rot")
    _require_unit_stride(v_rot, "v_rot")
    cache_i8, cache_f32 = _cache_views(kv_cache)
    _store_kernel[(num_tokens, k_rot.shape[1])](
        k_rot, v_rot, slot_mapping, kv_cache, cache_i8, cache_f32,
        k_rot.stride(0), k_rot.stride(1), v_rot.stride(0), v_rot.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        PAGE_SIZE=kv_cache.shape[2], HEAD_DIM=head_dim, HALF_DIM=head_dim // 2,
        KS_OFF=layout.k_scale_offset, VS_OFF=layout.v_scale_offset, VM_OFF=layout.v_min_offset,
    )


def _store_torch(k_rot, v_rot, kv_cache, slots, layout: SlotLayout) -> None:
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    data = quantize(k_rot, v_rot)  # [n, Hkv, used]
    slots = slots.to(torch.int64)
    heads = torch.arange(num_kv_heads, device=kv_cache.device, dtype=torch.int64)
    rows = ((slots // block_size)[:, None] * num_kv_heads + heads[None, :]) * block_size + (slots % block_size)[:, None]
    flat = kv_cache.view(-1, kv_cache.shape[-1])[:, : layout.used_bytes]
    flat.index_copy_(0, rows.reshape(-1), data.reshape(-1, layout.used_bytes))


def _decode_block_n(group_pad: int, head_dim: int) -> int:
    return max(8, min(64, triton.next_power_of_2(max(1, _DECODE_TILE_ELEMENTS // (group_pad * head_dim)))))


def choose_num_splits(num_items: int, num_kv_heads: int, max_seq_len: int, *, block_n: int = 32) -> int:
    """KV splits of the decode kernel, from host ints only (grid sizing, never correctness).

    Splits only when the (token, kv head) grid is small, so that a few long rows still fill
    the GPU; each split keeps at least four key tiles.
    """
    programs = num_items * num_kv_heads
    if programs >= 512:
        return 1
    tiles = -(-max(max_seq_len, 1) // block_n)
    return int(max(1, min(_MAX_SPLITS, tiles // 4, -(-512 // max(programs, 1)))))


def decode_attention(
    q_rot: torch.Tensor,
    kv_cache: torch.Tensor,
    out: torch.Tensor,
    *,
    token_to_req: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    num_items: int,
    max_seq_len: int,
    scale: float,
    token_base: int = 0,
    token_ids: torch.Tensor | None = None,
    num_splits: int | None = None,
    impl: str = "triton",
) -> None:
    """Attention over the compressed cache for a list of query tokens, written into `out`.

    The tokens are ``token_ids`` (int32 device indices) or, without it, the range
    ``[token_base, token_base + num_items)``. Token ``t`` of row ``r = token_to_req[t]`` sits
    at position ``seq_lens[r] - (query_start_loc[r + 1] - t)`` and sees keys 0 up to itself,
    all read from the cache (so its own k, v must be stored first). Every per-row value is
    read on the device; `max_seq_len` (a host bound) only picks the number of KV splits.

    Args:
        q_rot: [T, Hq, D] rotated queries; out: [T, Hq, D], rotated outputs are written to
            the listed tokens only.
        kv_cache: uint8 [num_blocks, Hkv, block_size, slot_bytes].
        token_to_req, query_start_loc, seq_lens, block_table: device metadata (int32).
        num_items, max_seq_len, scale, token_base: host values.
        num_splits: KV splits (default: `choose_num_splits`).
    """
    if num_items == 0:
        return
    num_q_heads, head_dim = q_rot.shape[1], q_rot.shape[2]
    num_kv_heads = kv_cache.shape[1]
    layout = _layout_of(kv_cache, head_dim)
    if impl == "torch":
        _decode_torch(q_rot, kv_cache, out, token_to_req, query_start_loc, seq_lens, block_table,
                      num_items, token_base, token_ids, scale, layout)
        return
    _require_unit_stride(q_rot, "q_rot")
    _require_unit_stride(out, "out")
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_n = _decode_block_n(group_pad, head_dim)
    splits = choose_num_splits(num_items, num_kv_heads, max_seq_len, block_n=block_n) if num_splits is None else num_splits
    if not 1 <= splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits: expected 1..{_MAX_SPLITS}, received {splits}.")
    cache_i8, cache_f32 = _cache_views(kv_cache)
    has_ids = token_ids is not None
    ids = token_ids if has_ids else token_to_req  # any int32 tensor; unused without ids
    if splits > 1:
        part_acc = torch.empty((num_items, num_q_heads, splits, head_dim), dtype=torch.float32, device=q_rot.device)
        part_max = torch.empty((num_items, num_q_heads, splits), dtype=torch.float32, device=q_rot.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused on the direct path
    _decode_kernel[(num_items, num_kv_heads, splits)](
        q_rot, out, part_acc, part_max, part_sum,
        kv_cache, cache_i8, cache_f32,
        ids, token_to_req, query_start_loc, seq_lens, block_table,
        token_base, scale * _LOG2E,
        q_rot.stride(0), q_rot.stride(1), out.stride(0), out.stride(1),
        part_acc.stride(0) if splits > 1 else 0, part_acc.stride(1) if splits > 1 else 0,
        part_acc.stride(2) if splits > 1 else 0,
        part_max.stride(0) if splits > 1 else 0, part_max.stride(1) if splits > 1 else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, PAGE_SIZE=kv_cache.shape[2], BLOCK_N=block_n,
        KS_OFF=layout.k_scale_offset, VS_OFF=layout.v_scale_offset, VM_OFF=layout.v_min_offset,
        HAS_TOKEN_IDS=has_ids, SPLIT=splits > 1, INTERPRETED=_INTERPRETED,
    )
    if splits > 1:
        _decode_reduce_kernel[(num_items, num_q_heads)](
            out, part_acc, part_max, part_sum, ids, token_base, splits,
            out.stride(0), out.stride(1),
            part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
            part_max.stride(0), part_max.stride(1),
            HEAD_DIM=head_dim, SPLIT_PAD=_MAX_SPLITS, HAS_TOKEN_IDS=has_ids,
        )


def _decode_torch(q_rot, kv_cache, out, token_to_req, qsl, seq_lens, block_table, num_items, token_base,
                  token_ids, scale, layout: SlotLayout) -> None:
    """Static-shape torch decode: every token gathers its row's whole block-table width."""
    device = q_rot.device
    num_q_heads, head_dim = q_rot.shape[1], q_rot.shape[2]
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if token_ids is None:
        tok = torch.arange(token_base, token_base + num_items, device=device, dtype=torch.int64)
    else:
        tok = token_ids[:num_items].to(torch.int64)
    row = token_to_req.index_select(0, tok).to(torch.int64)
    pos = seq_lens.index_select(0, row).to(torch.int64) - (qsl.index_select(0, row + 1).to(torch.int64) - tok)
    pages = block_table.index_select(0, row).to(torch.int64)  # [n, W]
    slots = kv_cache.index_select(0, pages.reshape(-1))  # [n * W, Hkv, bs, bytes]
    n, width = pages.shape
    slots = slots.reshape(n, width, num_kv_heads, block_size, -1).permute(0, 2, 1, 3, 4)
    slots = slots.reshape(n, num_kv_heads, width * block_size, -1)
    k, v = _dequantize_bytes(slots, layout, torch.float32)  # [n, Hkv, L, D]
    visible = torch.arange(width * block_size, device=device)[None, :] <= pos[:, None]  # [n, L]
    v = torch.where(visible[:, None, :, None], v, torch.zeros((), device=device))
    qg = q_rot.index_select(0, tok).float().reshape(n, num_kv_heads, group, head_dim)
    logits = torch.einsum("nhgd,nhld->nhgl", qg, torch.where(visible[:, None, :, None], k, torch.zeros((), device=device)))
    logits = logits * scale
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    o = torch.einsum("nhgl,nhld->nhgd", probs, v).reshape(n, num_q_heads, head_dim)
    out.index_copy_(0, tok, o.to(out.dtype))


def dequantize_context(
    kv_cache: torch.Tensor,
    block_table_row: torch.Tensor,
    num_positions: int,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    *,
    impl: str = "triton",
) -> None:
    """Dequantize positions ``[0, num_positions)`` of one row into ``k_out``/``v_out`` [>= n, Hkv, D].

    `block_table_row` is the row's device page ids (a view such as ``block_table[r]``); the
    values stay rotated.
    """
    if num_positions == 0:
        return
    head_dim = k_out.shape[-1]
    layout = _layout_of(kv_cache, head_dim)
    block_size = kv_cache.shape[2]
    if impl == "torch":
        num_pages = -(-num_positions // block_size)
        pages = block_table_row[:num_pages].to(torch.int64)
        slots = kv_cache.index_select(0, pages).permute(0, 2, 1, 3).reshape(num_pages * block_size, kv_cache.shape[1], -1)
        k, v = _dequantize_bytes(slots[:num_positions], layout, k_out.dtype)
        k_out[:num_positions].copy_(k)
        v_out[:num_positions].copy_(v)
        return
    _require_unit_stride(k_out, "k_out")
    _require_unit_stride(v_out, "v_out")
    cache_i8, cache_f32 = _cache_views(kv_cache)
    block_p = 32
    _dequant_context_kernel[(triton.cdiv(num_positions, block_p), kv_cache.shape[1])](
        kv_cache, cache_i8, cache_f32, block_table_row, k_out, v_out, num_positions,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1),
        PAGE_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_P=block_p,
        KS_OFF=layout.k_scale_offset, VS_OFF=layout.v_scale_offset, VM_OFF=layout.v_min_offset,
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    num_seqs: int,
    max_seqlen_q: int,
    scale: float,
    impl: str = "triton",
) -> None:
    """Causal attention over packed sequences (FlashAttention's varlen contract), into `out`.

    Sequence ``b`` has queries ``q[cu_q[b]:cu_q[b+1]]`` and keys ``k[cu_k[b]:cu_k[b+1]]``;
    query ``i`` sees keys ``[0, k_len - q_len + i]`` (bottom-right alignment, so a
    continuation's queries see the whole cached context). The offsets are device tensors;
    `num_seqs` and `max_seqlen_q` are host ints that size the grid.

    Args:
        q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; out: [Tq, Hq, D].
    """
    if num_seqs == 0 or max_seqlen_q == 0:
        return
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    group = num_q_heads // k.shape[1]
    if impl == "torch":
        _varlen_torch(q, k, v, out, cu_seqlens_q, cu_seqlens_k, num_seqs, scale)
        return
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _require_unit_stride(t, name)
    block_m = 16 if max_seqlen_q <= 16 else 64
    block_n = 32
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _varlen_kernel[(triton.cdiv(max_seqlen_q, block_m), num_seqs, num_q_heads)](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision, INTERPRETED=_INTERPRETED,
    )


def _varlen_torch(q, k, v, out, cu_q, cu_k, num_seqs, scale) -> None:
    """Block-diagonal causal mask from device offsets; shapes are static, nothing is read."""
    device = q.device
    tq, tk = q.shape[0], k.shape[0]
    cu_q = cu_q[: num_seqs + 1].to(torch.int64)
    cu_k = cu_k[: num_seqs + 1].to(torch.int64)
    iq = torch.arange(tq, device=device)
    ik = torch.arange(tk, device=device)
    seg_q = torch.searchsorted(cu_q[1:], iq, right=True).clamp(max=num_seqs - 1)
    seg_k = torch.searchsorted(cu_k[1:], ik, right=True).clamp(max=num_seqs - 1)
    q_len = cu_q[seg_q + 1] - cu_q[seg_q]
    k_len = cu_k[seg_q + 1] - cu_k[seg_q]
    last = k_len - q_len + (iq - cu_q[seg_q])  # last visible key index within the sequence
    local_k = ik - cu_k[seg_k]
    visible = (seg_q[:, None] == seg_k[None, :]) & (local_k[None, :] <= last[:, None])
    visible &= (ik < cu_k[-1])[None, :]
    row_valid = iq < cu_q[-1]
    visible |= ~row_valid[:, None]  # rows past the last sequence: any finite softmax, discarded
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(), v.transpose(0, 1)[None].float(),
        attn_mask=visible, scale=scale, enable_gqa=True,
    )[0].transpose(0, 1)
    out.copy_(torch.where(row_valid[:, None, None], o.to(out.dtype), out))


def _require_unit_stride(t: torch.Tensor, name: str) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the head dimension must be contiguous (stride 1), received strides {t.stride()}.")


class SubBatch(NamedTuple):
    """One side of the decode/prefill split of lowered TurboQuant metadata (vLLM's sub-metadata).

    Device fields are views of the lowered tensors (no copy, no kernel); host fields are CPU
    tensors and ints from the builder. `query_start_loc` starts at 0 for the sub-batch.
    """

    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int


def sub_batches(md: Any) -> tuple[SubBatch, SubBatch]:
    """``(decode, prefill)`` sub-batches of metadata lowered by the torch adapter.

    Slices with host ints only, so nothing is read from the device. The prefill side's
    `seq_lens` is a view of the lowered `seq_lens`, so exact device lengths passed to `lower`
    reach it; its `max_seq_len` is the host bound (exact when no row is device-routed).
    """
    nd, ndt = md.num_decodes, md.num_decode_tokens
    end_row, end_tok = nd + md.num_prefills, ndt + md.num_prefill_tokens
    decode = SubBatch(
        query_start_loc=md.query_start_loc[: nd + 1],
        query_start_loc_cpu=md.query_start_loc_cpu[: nd + 1],
        seq_lens=md.seq_lens[:nd],
        seq_lens_cpu=md.seq_lens_cpu[:nd],
        block_table=md.block_table[:nd],
        slot_mapping=md.slot_mapping[:ndt],
        num_reqs=nd,
        num_actual_tokens=ndt,
        max_query_len=1 if ndt else 0,
        max_seq_len=md.decode_max_seq_len,
    )
    prefill = SubBatch(
        query_start_loc=md.prefill_query_start_loc,
        query_start_loc_cpu=md.prefill_query_start_loc_cpu,
        seq_lens=md.seq_lens[nd:end_row],
        seq_lens_cpu=md.prefill_seq_lens_cpu,
        block_table=md.block_table[nd:end_row],
        slot_mapping=md.slot_mapping[ndt:end_tok],
        num_reqs=md.num_prefills,
        num_actual_tokens=md.num_prefill_tokens,
        max_query_len=md.prefill_max_query_len,
        max_seq_len=md.prefill_max_seq_len,
    )
    return decode, prefill


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class TurboQuantAttention:
    """One TurboQuant attention layer's per-layer state and forward (the "run" phase).

    Holds the rotation and the two cached 2-element ``cu_seqlens`` buffers, allocated once on
    `device`; the forward reads only host ints from the metadata and never synchronises.

    Args:
        num_q_heads, num_kv_heads, head_dim: the layer's shape (head_dim a power of two >= 16
            for the Triton kernels).
        device: where the buffers live.
        scale: softmax scale (default ``head_dim ** -0.5``).
        rotation: float32 [D, D] orthogonal matrix (default `rotation_matrix(head_dim)`).
        impl: ``"triton"`` (default) or ``"torch"``.
        dtype: the activations' dtype; its copy of R is uploaded here, once. Another dtype
            gets its copy at its first forward (a one-time blocking upload: warm up with it).

    Example:
        >>> import torch, attnsync
        >>> from attnsync.adapters import torch as ast
        >>> layer = TurboQuantAttention(2, 1, 16, device="cpu", impl="torch")
        >>> cache = allocate_cache(4, 1, 16, 16, device="cpu")
        >>> batch = attnsync.Batch(query_lens=[3], seq_lens=[3], block_table=[[1]], block_size=16)
        >>> md = ast.lower(attnsync.build(batch, backend="turboquant"), device="cpu")
        >>> q, k, v = torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16)
        >>> layer.forward(q, k, v, cache, md).shape
        torch.Size([3, 2, 16])
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: Any = "cuda",
        scale: float | None = None,
        rotation: np.ndarray | None = None,
        impl: str = "triton",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}.")
        if impl not in ("triton", "torch"):
            raise ValueError(f"impl: expected 'triton' or 'torch', received {impl!r}.")
        self.layout = slot_layout(head_dim)
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.device = torch.device(device)
        self.scale = float(head_dim**-0.5 if scale is None else scale)
        self.impl = impl
        rot = rotation_matrix(head_dim) if rotation is None else np.asarray(rotation, dtype=np.float32)
        self.rotation_np = rot
        self._rotations: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rotation(dtype)
        # Cached cu_seqlens buffers of the per-row calls, [0, n]: allocated once, entry 1
        # rewritten by a fill kernel per call (stream order keeps earlier calls' reads right).
        self._cu_q = torch.zeros(2, dtype=torch.int32, device=self.device)
        self._cu_k = torch.zeros(2, dtype=torch.int32, device=self.device)

    def _rotation(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, R^T) in `dtype` on the device, uploaded once per dtype (at first use)."""
        pair = self._rotations.get(dtype)
        if pair is None:
            r = torch.from_numpy(self.rotation_np).to(device=self.device, dtype=dtype)
            pair = self._rotations[dtype] = (r, r.t().contiguous())
        return pair

    def rotate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """``(q R, k R, v R)``, contiguous, in the inputs' dtype."""
        r, _ = self._rotation(q.dtype)
        return q @ r, k @ r, v @ r

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, md: Any) -> torch.Tensor:
        """One layer step: write k, v into `kv_cache`, return attention output [T, Hq, D].

        Args:
            q: [T, Hq, D]; k, v: [T, Hkv, D] (unrotated, T = md.num_actual_tokens).
            kv_cache: this layer's cache (updated in place).
            md: the step's metadata lowered by `attnsync.adapters.torch.lower`.

        Rows of padding tokens in the result are unspecified.
        """
        q_rot, k_rot, v_rot = self.rotate(q, k, v)
        o_rot = torch.empty_like(q_rot)
        self._store_and_decode(q_rot, k_rot, v_rot, kv_cache, md, o_rot)
        if md.num_prefills:
            if md.prefill_all_fresh:
                start, end = md.num_decode_tokens, md.num_decode_tokens + md.num_prefill_tokens
                # cu_seqlens_k = cu_seqlens_q: a fresh prefill's keys are its queries
                varlen_attention(
                    q_rot[start:end], k_rot[start:end], v_rot[start:end], o_rot[start:end],
                    cu_seqlens_q=md.prefill_query_start_loc, cu_seqlens_k=md.prefill_query_start_loc,
                    num_seqs=md.num_prefills, max_seqlen_q=md.prefill_max_query_len, scale=self.scale,
                    impl=self.impl,
                )
            else:
                for row in md.host_loop_rows:
                    self._prefill_row(row, q_rot, k_rot, v_rot, kv_cache, md.block_table, o_rot)
        _, r_t = self._rotation(q.dtype)
        return o_rot @ r_t

    def _store_and_decode(self, q_rot, k_rot, v_rot, kv_cache, md, o_rot) -> None:
        store_kv(k_rot, v_rot, kv_cache, md.slot_mapping, num_tokens=md.num_scheduled_tokens, impl=self.impl)
        common = dict(
            token_to_req=md.token_to_req, query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,
            block_table=md.block_table, scale=self.scale, impl=self.impl,
        )
        decode_attention(q_rot, kv_cache, o_rot, num_items=md.num_decode_tokens,
                         max_seq_len=md.decode_max_seq_len, **common)
        if md.num_spec_tokens:
            decode_attention(q_rot, kv_cache, o_rot, num_items=md.num_spec_tokens, token_ids=md.spec_token_ids,
                             max_seq_len=md.spec_max_seq_len, **common)

    def _prefill_row(self, row: HostRow, q_rot, k_rot, v_rot, kv_cache, block_table, o_rot) -> None:
        """One host-loop row: host ints in, device work out, nothing read back."""
        start, end = row.token_start, row.token_start + row.query_len
        self._cu_q[1:2].fill_(row.query_len)
        if row.cached_len == 0:
            varlen_attention(
                q_rot[start:end], k_rot[start:end], v_rot[start:end], o_rot[start:end],
                cu_seqlens_q=self._cu_q, cu_seqlens_k=self._cu_q, num_seqs=1,
                max_seqlen_q=row.query_len, scale=self.scale, impl=self.impl,
            )
            return
        keys = torch.empty((row.seq_len, self.num_kv_heads, self.head_dim), dtype=k_rot.dtype, device=k_rot.device)
        values = torch.empty_like(keys)
        dequantize_context(kv_cache, block_table[row.row], row.cached_len, keys, values, impl=self.impl)
        keys[row.cached_len :].copy_(k_rot[start:end])
        values[row.cached_len :].copy_(v_rot[start:end])
        self._cu_k[1:2].fill_(row.seq_len)
        varlen_attention(
            q_rot[start:end], keys, values, o_rot[start:end],
            cu_seqlens_q=self._cu_q, cu_seqlens_k=self._cu_k, num_seqs=1,
            max_seqlen_q=row.query_len, scale=self.scale, impl=self.impl,
        )

    def forward_naive(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, md: Any
    ) -> torch.Tensor:
        """vLLM's baseline before its PR 41434: same kernels, host values read back from the device per layer.

        Per layer it does what vLLM's TurboQuant did before that PR: on a mixed batch
        ``max(seq_lens[nd:].tolist())``; in the prefill path ``query_start_loc.tolist()`` and
        ``seq_lens.tolist()`` (each a device-to-host sync); per request a fresh
        ``torch.zeros(2, device)`` and a scalar store ``cu[1] = q_len`` (a blocking copy on
        CUDA). It reads exact lengths back, so it serves every prefill-shaped row in the host
        loop. Only for the benchmark and the equivalence tests.
        """
        q_rot, k_rot, v_rot = self.rotate(q, k, v)
        o_rot = torch.empty_like(q_rot)
        store_kv(k_rot, v_rot, kv_cache, md.slot_mapping, num_tokens=md.num_scheduled_tokens, impl=self.impl)
        nd, n = md.num_decodes, md.num_scheduled_reqs
        decode_attention(
            q_rot, kv_cache, o_rot, token_to_req=md.token_to_req, query_start_loc=md.query_start_loc,
            seq_lens=md.seq_lens, block_table=md.block_table, num_items=md.num_decode_tokens,
            max_seq_len=md.decode_max_seq_len, scale=self.scale, impl=self.impl,
        )
        if n > nd:
            if nd:
                # the prefill sub-batch's max_seq_len, read from the device as vLLM did
                _prefill_max_seq = max(md.seq_lens[nd:n].tolist())
            qsl = md.query_start_loc.tolist()  # device read
            seq_lens = md.seq_lens.tolist()  # device read
            q_lens = [qsl[r + 1] - qsl[r] for r in range(nd, n)]
            if all(seq_lens[r] == q_lens[r - nd] for r in range(nd, n)):
                start = qsl[nd]
                cu = md.query_start_loc[nd : n + 1] - start
                varlen_attention(
                    q_rot[start : qsl[n]], k_rot[start : qsl[n]], v_rot[start : qsl[n]], o_rot[start : qsl[n]],
                    cu_seqlens_q=cu, cu_seqlens_k=cu, num_seqs=n - nd, max_seqlen_q=max(q_lens),
                    scale=self.scale, impl=self.impl,
                )
            else:
                for r in range(nd, n):
                    start, end, seq_len = qsl[r], qsl[r + 1], seq_lens[r]
                    q_len = end - start
                    cu_q = torch.zeros(2, dtype=torch.int32, device=q.device)  # per call
                    cu_q[1] = q_len  # scalar store: a synchronous copy on CUDA
                    if seq_len == q_len:
                        varlen_attention(q_rot[start:end], k_rot[start:end], v_rot[start:end], o_rot[start:end],
                                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, num_seqs=1,
                                         max_seqlen_q=q_len, scale=self.scale, impl=self.impl)
                        continue
                    cached = seq_len - q_len
                    keys = torch.empty((seq_len, self.num_kv_heads, self.head_dim), dtype=k_rot.dtype, device=q.device)
                    values = torch.empty_like(keys)
                    dequantize_context(kv_cache, md.block_table[r], cached, keys, values, impl=self.impl)
                    keys[cached:].copy_(k_rot[start:end])
                    values[cached:].copy_(v_rot[start:end])
                    cu_k = torch.zeros(2, dtype=torch.int32, device=q.device)
                    cu_k[1] = seq_len
                    varlen_attention(q_rot[start:end], keys, values, o_rot[start:end],
                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, num_seqs=1,
                                     max_seqlen_q=q_len, scale=self.scale, impl=self.impl)
        _, r_t = self._rotation(q.dtype)
        return o_rot @ r_t
