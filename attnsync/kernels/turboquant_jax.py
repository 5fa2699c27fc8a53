"""JAX reference of TurboQuant attention over attnsync's ``turboquant`` metadata.

Opt-in module: it imports ``jax`` at module level. Plain ``jax.numpy`` with static shapes, one
jitted function per layer step (`forward`): the metadata lowered by
`attnsync.adapters.jax.lower` carries its host ints as static pytree fields, so the host
loop over `host_loop_rows` unrolls at trace time and the step reads no device value. A new
batch plan retraces; this module is a reference for the math and the contract, not a
serving kernel.

Same paths and cache bytes as `attnsync.kernels.turboquant` (see the cache format in
`attnsync.backends.turboquant.SlotLayout`): the quantizer is float32 with round-half-to-even
and writes the bytes the numpy reference writes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ..backends.turboquant import SlotLayout, slot_layout

__all__ = ["decode_attention", "dequantize", "forward", "quantize", "varlen_attention", "write_cache"]


def _exact_div(a: jax.Array, b: Any) -> jax.Array:
    """``a / b`` correctly rounded, as numpy, torch and Triton's ``div_rn`` compute it.

    XLA rewrites a division by a broadcast divisor into a multiplication by its reciprocal,
    which is off by one ulp for many inputs (measured on CPU: 107 of 2000 quotients by a
    scalar, 16525 of 64000 by a per-row divisor), and a changed quotient can change a code.
    A full-shaped divisor behind an optimization barrier is no broadcast, so it stays a
    true division.
    """
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape))


def quantize(k_rot: jax.Array, v_rot: jax.Array) -> jax.Array:
    """Slot bytes uint8 [..., used_bytes] of rotated k, v [..., D] (see `SlotLayout`)."""
    layout = slot_layout(k_rot.shape[-1])
    k = k_rot.astype(jnp.float32)
    v = v_rot.astype(jnp.float32)
    k_scale = _exact_div(jnp.max(jnp.abs(k), axis=-1), 127.0)
    k_safe = jnp.where(k_scale > 0, k_scale, 1.0)
    k_code = jnp.clip(jnp.round(_exact_div(k, k_safe[..., None])), -127, 127)
    k_code = jnp.where((k_scale > 0)[..., None], k_code, 0.0).astype(jnp.int8)
    v_min = jnp.min(v, axis=-1)
    v_scale = _exact_div(jnp.max(v, axis=-1) - v_min, 15.0)
    v_safe = jnp.where(v_scale > 0, v_scale, 1.0)
    v_code = jnp.clip(jnp.round(_exact_div(v - v_min[..., None], v_safe[..., None])), 0, 15)
    v_code = jnp.where((v_scale > 0)[..., None], v_code, 0.0).astype(jnp.uint8)
    packed = v_code[..., 0::2] | (v_code[..., 1::2] << 4)
    scales = jax.lax.bitcast_convert_type(jnp.stack([k_scale, v_scale, v_min], axis=-1), jnp.uint8)
    out = jnp.concatenate(
        [jax.lax.bitcast_convert_type(k_code, jnp.uint8), packed, scales.reshape(scales.shape[:-2] + (12,))], axis=-1
    )
    assert out.shape[-1] == layout.used_bytes
    return out


def write_cache(cache: jax.Array, k_rot: jax.Array, v_rot: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """The cache with tokens ``k_rot``/``v_rot`` [T, Hkv, D] written at ``slot_mapping`` [T].

    Slot -1 is dropped (an out-of-range index with ``mode="drop"``: a negative index would
    wrap). Padding bytes of each slot keep their old value.
    """
    num_blocks, num_kv_heads, block_size, slot_bytes = cache.shape
    layout = slot_layout(k_rot.shape[-1])
    data = quantize(k_rot, v_rot)  # [T, Hkv, used]
    slots = slot_mapping.astype(jnp.int32)
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)
    rows = ((slots // block_size)[:, None] * num_kv_heads + heads[None, :]) * block_size + (slots % block_size)[:, None]
    num_rows = num_blocks * num_kv_heads * block_size
    rows = jnp.where((slots >= 0)[:, None], rows, num_rows)
    flat = cache.reshape(num_rows, slot_bytes)
    cols = jnp.arange(layout.used_bytes, dtype=jnp.int32)
    flat = flat.at[rows.reshape(-1)[:, None], cols[None, :]].set(data.reshape(-1, layout.used_bytes), mode="drop")
    return flat.reshape(cache.shape)


def dequantize(slots: jax.Array, layout: SlotLayout, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Rotated ``(k, v)`` [..., D] of slot bytes [..., >= used_bytes]."""
    d = layout.head_dim
    k_code = jax.lax.bitcast_convert_type(slots[..., :d], jnp.int8).astype(jnp.float32)
    packed = slots[..., d : d + d // 2]
    v_code = jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(slots.shape[:-1] + (d,)).astype(jnp.float32)
    raw = slots[..., layout.k_scale_offset : layout.used_bytes].reshape(slots.shape[:-1] + (3, 4))
    scales = jax.lax.bitcast_convert_type(raw, jnp.float32)
    k = k_code * scales[..., 0:1]
    v = scales[..., 2:3] + v_code * scales[..., 1:2]
    return k.astype(dtype), v.astype(dtype)


def decode_attention(
    q_rot: jax.Array,
    cache: jax.Array,
    tokens: jax.Array,
    *,
    token_to_req: jax.Array,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_table: jax.Array,
    scale: float,
) -> jax.Array:
    """Rotated outputs [n, Hq, D] of query tokens `tokens` [n] over the compressed cache.

    Token ``t`` of row ``r`` sits at ``seq_lens[r] - (query_start_loc[r + 1] - t)`` and sees
    keys up to itself; each token gathers its row's whole block-table width (static shape).
    """
    num_q_heads, head_dim = q_rot.shape[1], q_rot.shape[2]
    num_kv_heads, block_size = cache.shape[1], cache.shape[2]
    layout = slot_layout(head_dim)
    group = num_q_heads // num_kv_heads
    rows = token_to_req[tokens]
    pos = seq_lens[rows] - (query_start_loc[rows + 1] - tokens)
    pages = block_table[rows]  # [n, W]
    n, width = pages.shape
    slots = cache[pages]  # [n, W, Hkv, bs, bytes]
    slots = slots.transpose(0, 2, 1, 3, 4).reshape(n, num_kv_heads, width * block_size, -1)
    k, v = dequantize(slots, layout)  # [n, Hkv, L, D]
    visible = jnp.arange(width * block_size)[None, :] <= pos[:, None]
    k = jnp.where(visible[:, None, :, None], k, 0.0)
    v = jnp.where(visible[:, None, :, None], v, 0.0)
    qg = q_rot[tokens].astype(jnp.float32).reshape(n, num_kv_heads, group, head_dim)
    logits = jnp.einsum("nhgd,nhld->nhgl", qg, k, precision=jax.lax.Precision.HIGHEST) * scale
    logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("nhgl,nhld->nhgd", probs, v, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(n, num_q_heads, head_dim)


def varlen_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cu_q: jax.Array, cu_k: jax.Array, *, num_seqs: int, scale: float
) -> jax.Array:
    """Causal attention over packed sequences (bottom-right aligned), offsets on the device.

    q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_q/cu_k [>= num_seqs + 1]. Returns [Tq, Hq, D] float32;
    rows past ``cu_q[num_seqs]`` are unspecified.
    """
    tq, num_q_heads, _ = q.shape
    tk, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    cu_q = cu_q[: num_seqs + 1]
    cu_k = cu_k[: num_seqs + 1]
    iq = jnp.arange(tq)
    ik = jnp.arange(tk)
    seg_q = jnp.minimum(jnp.searchsorted(cu_q[1:], iq, side="right"), num_seqs - 1)
    seg_k = jnp.minimum(jnp.searchsorted(cu_k[1:], ik, side="right"), num_seqs - 1)
    q_len = cu_q[seg_q + 1] - cu_q[seg_q]
    k_len = cu_k[seg_q + 1] - cu_k[seg_q]
    last = k_len - q_len + (iq - cu_q[seg_q])
    visible = (seg_q[:, None] == seg_k[None, :]) & ((ik - cu_k[seg_k])[None, :] <= last[:, None])
    visible = visible & (ik < cu_k[-1])[None, :]
    visible = visible | (iq >= cu_q[-1])[:, None]
    kk = jnp.repeat(k.astype(jnp.float32), group, axis=1)
    vv = jnp.repeat(v.astype(jnp.float32), group, axis=1)
    logits = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), kk, precision=jax.lax.Precision.HIGHEST) * scale
    logits = jnp.where(visible[None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("hqk,khd->qhd", probs, vv, precision=jax.lax.Precision.HIGHEST)


def _context(cache: jax.Array, block_table: jax.Array, row: int, length: int, layout: SlotLayout):
    """Rotated dequantized positions [0, length) of `row`: (k, v) [length, Hkv, D]."""
    block_size = cache.shape[2]
    num_pages = -(-length // block_size)
    slots = cache[block_table[row, :num_pages]]  # [np, Hkv, bs, bytes]
    slots = slots.transpose(0, 2, 1, 3).reshape(num_pages * block_size, cache.shape[1], -1)[:length]
    return dequantize(slots, layout)


@functools.partial(jax.jit, static_argnames=("scale",))
def forward(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: jax.Array, md: Any, rotation: jax.Array, *, scale: float
) -> tuple[jax.Array, jax.Array]:
    """One layer step: ``(out [T, Hq, D] float32, new cache)``.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] (unrotated).
        cache: uint8 [num_blocks, Hkv, block_size, slot_bytes].
        md: the step's metadata lowered by `attnsync.adapters.jax.lower` (its host ints are
            static, so each batch plan compiles once).
        rotation: float32 [D, D] (``jax.device_put(rotation_matrix(D))``).
        scale: softmax scale.

    Rows of padding tokens in `out` are unspecified.
    """
    hi = jax.lax.Precision.HIGHEST
    head_dim = q.shape[-1]
    layout = slot_layout(head_dim)
    rot = rotation.astype(jnp.float32)
    q_rot = jnp.einsum("thd,de->the", q.astype(jnp.float32), rot, precision=hi)
    k_rot = jnp.einsum("thd,de->the", k.astype(jnp.float32), rot, precision=hi)
    v_rot = jnp.einsum("thd,de->the", v.astype(jnp.float32), rot, precision=hi)
    cache = write_cache(cache, k_rot, v_rot, md.slot_mapping)
    o_rot = jnp.zeros(q_rot.shape, jnp.float32)
    device = dict(
        token_to_req=md.token_to_req, query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,
        block_table=md.block_table, scale=scale,
    )
    if md.num_decode_tokens:
        tokens = jnp.arange(md.num_decode_tokens, dtype=jnp.int32)
        o_rot = o_rot.at[: md.num_decode_tokens].set(decode_attention(q_rot, cache, tokens, **device))
    if md.num_spec_tokens:
        o_rot = o_rot.at[md.spec_token_ids].set(decode_attention(q_rot, cache, md.spec_token_ids, **device))
    if md.num_prefills and md.prefill_all_fresh:
        a, b = md.num_decode_tokens, md.num_decode_tokens + md.num_prefill_tokens
        cu = md.prefill_query_start_loc
        o_rot = o_rot.at[a:b].set(
            varlen_attention(q_rot[a:b], k_rot[a:b], v_rot[a:b], cu, cu, num_seqs=md.num_prefills, scale=scale)
        )
    elif md.num_prefills:
        for row in md.host_loop_rows:
            a, b = row.token_start, row.token_start + row.query_len
            keys, values = k_rot[a:b], v_rot[a:b]
            if row.cached_len:
                ck, cv = _context(cache, md.block_table, row.row, row.cached_len, layout)
                keys = jnp.concatenate([ck, keys], axis=0)
                values = jnp.concatenate([cv, values], axis=0)
            cu_q = jnp.array([0, row.query_len], dtype=jnp.int32)
            cu_k = jnp.array([0, row.seq_len], dtype=jnp.int32)
            o_rot = o_rot.at[a:b].set(varlen_attention(q_rot[a:b], keys, values, cu_q, cu_k, num_seqs=1, scale=scale))
    out = jnp.einsum("the,de->thd", o_rot, rot, precision=hi)  # o_rot @ R^T
    return out, cache
