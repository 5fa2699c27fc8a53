"""Tree attention in ``jax.numpy`` over JAX-lowered tree metadata, jit-compiled.

Opt-in module: it imports ``jax`` at module level.

Same rule and same structure as `attnsync.kernels.tree_reference.tree_paged_attention_torch`:
decode rows see the context before their draft block plus the draft keys the tree bias allows
(the bias is added to the logits inside the block, after the causal mask), prefill rows are
causal. Each sub-batch is one batched computation over a ``[rows, max_query_len]`` query tile
and ``ceil(max_seq_len / block_size)`` pages per row, gathered back to token order with
``searchsorted``: no data-dependent shape, no host transfer (it runs under
``jax.transfer_guard("disallow")`` when its inputs are on the device).

Static values. The JAX adapter makes every host scalar of the metadata a static pytree field,
so the sub-batch counts and maxima are compile-time constants here: each distinct combination
compiles once. A server that wants few compilations rounds them to buckets before building
(pad the batch, and let its maxima be bounds); they only need to be upper bounds of the row
sizes, except ``num_decodes``, ``num_decode_tokens``, ``num_prefills`` and
``num_prefill_tokens``, which locate the sub-batches.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["tree_paged_attention_jax"]


def tree_paged_attention_jax(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: Any, *, scale: float
) -> jax.Array:
    """Tree attention for a batch described by ``attnsync.adapters.jax.lower(tree_metadata)``.

    Args:
        q: shape [T, Hq, D] (T = ``md.num_actual_tokens``), float16/bfloat16/float32.
        k_cache, v_cache: shape [num_blocks, block_size, Hkv, D], ``Hq % Hkv == 0``.
        md: the JAX lowering of `attnsync.backends.tree.TreeMetadata` (``tree_attn_bias`` is
            float32, the rest int32).
        scale: softmax scale (static).

    Returns:
        shape [T, Hq, D], ``q.dtype``; tokens of no row are 0. Computed in float32.

    Raises:
        ValueError: shapes disagree with the metadata, or decode rows are longer than the bias.
    """
    if q.shape[0] != md.num_actual_tokens or k_cache.shape[1] != md.block_size:
        raise ValueError(
            f"shapes: q has {q.shape[0]} tokens and the cache pages of {k_cache.shape[1]}, but the "
            f"metadata was built for {md.num_actual_tokens} tokens and block_size {md.block_size}"
        )
    size = md.tree_attn_bias.shape[0]
    if md.num_decodes and size and md.max_decode_query_len > size:
        raise ValueError(
            f"tree_attn_bias: decode rows have up to {md.max_decode_query_len} tokens but the bias "
            f"is {md.tree_attn_bias.shape}; a decode row cannot be longer than the tree"
        )
    return _tree_attention(q, k_cache, v_cache, md, scale=float(scale))


@functools.partial(jax.jit, static_argnames=("scale",))
def _tree_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: Any, *, scale: float
) -> jax.Array:
    nd, ndt = md.num_decodes, md.num_decode_tokens
    npf, npt = md.num_prefills, md.num_prefill_tokens
    parts = []
    if ndt:
        bias = md.tree_attn_bias if md.tree_attn_bias.shape[0] else None
        parts.append(
            _sub_batch(
                q[:ndt],
                k_cache,
                v_cache,
                md.query_start_loc[: nd + 1],
                md.seq_lens[:nd],
                md.block_table[:nd],
                max_query_len=md.max_decode_query_len,
                max_seq_len=md.max_decode_seq_len,
                bias=bias,
                scale=scale,
            )
        )
    if npt:
        parts.append(
            _sub_batch(
                q[ndt : ndt + npt],
                k_cache,
                v_cache,
                md.prefill_query_start_loc[: npf + 1],
                md.seq_lens[nd : nd + npf],
                md.block_table[nd : nd + npf],
                max_query_len=md.max_prefill_query_len,
                max_seq_len=md.max_prefill_seq_len,
                bias=None,
                scale=scale,
            )
        )
    rest = q.shape[0] - ndt - npt
    if rest:
        parts.append(jnp.zeros((rest, *q.shape[1:]), jnp.float32))
    if not parts:
        return jnp.zeros(q.shape, q.dtype)
    return jnp.concatenate(parts, axis=0).astype(q.dtype)


def _sub_batch(
    q,
    k_cache,
    v_cache,
    qsl,
    seq_lens,
    block_table,
    *,
    max_query_len: int,
    max_seq_len: int,
    bias,
    scale: float,
) -> jax.Array:
    """Attention of one sub-batch whose ``qsl`` starts at 0; returns float32 [tokens, Hq, D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    rows = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    num_pages = -(-max_seq_len // block_size)
    num_keys = num_pages * block_size
    precision = jax.lax.Precision.HIGHEST  # GPUs may default to TF32 for float32 matmuls

    slot = jnp.arange(max_query_len, dtype=jnp.int32)
    q_start = qsl[:rows]
    q_len = qsl[1 : rows + 1] - q_start
    valid_q = slot[None, :] < q_len[:, None]
    token = jnp.minimum(q_start[:, None] + slot[None, :], num_tokens - 1)
    q_tile = q[token].astype(jnp.float32).reshape(rows, max_query_len, num_kv_heads, group, head_dim)

    pages = jnp.clip(block_table[:, :num_pages], 0, num_blocks - 1)
    keys = k_cache[pages].reshape(rows, num_keys, num_kv_heads, head_dim).astype(jnp.float32)
    values = v_cache[pages].reshape(rows, num_keys, num_kv_heads, head_dim).astype(jnp.float32)
    k_pos = jnp.arange(num_keys, dtype=jnp.int32)
    in_context = k_pos[None, :] < seq_lens[:, None]
    block_start = seq_lens - q_len
    q_pos = block_start[:, None] + slot[None, :]
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & in_context[:, None, :] & valid_q[:, :, None]

    logits = jnp.einsum("rikgd,rnkd->rkgin", q_tile, keys, precision=precision) * jnp.float32(scale)
    if bias is not None:
        size = bias.shape[0]
        j = k_pos[None, :] - block_start[:, None]
        in_block = (j >= 0) & (j < q_len[:, None])
        term = bias[jnp.minimum(slot, size - 1)[None, :, None], jnp.clip(j, 0, size - 1)[:, None, :]]
        logits = logits + jnp.where(in_block[:, None, :], term, 0.0)[:, None, None]
    mask = visible[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    values = jnp.where(in_context[:, :, None, None], values, 0.0)  # stale NaN past seq_len
    tile = jnp.einsum("rkgin,rnkd->rikgd", probs, values, precision=precision)
    tile = tile / jnp.transpose(jnp.where(denom > 0, denom, 1.0), (0, 3, 1, 2, 4))
    tile = tile.reshape(rows, max_query_len, num_q_heads, head_dim)

    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(qsl[1 : rows + 1], tokens, side="right"), rows - 1)
    return tile[row, tokens - q_start[row]]
