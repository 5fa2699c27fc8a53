"""JAX reference attention driven by attnsync ``flex`` metadata, with static shapes.

Opt-in module: it imports ``jax`` at module level.

It consumes the same fields FlexAttention does (see `attnsync.backends.flex`): the block-sparse
description (``kv_num_blocks``, ``kv_indices``) is expanded on the device into a [NQ, P] block
mask with one scatter, each token gets the mask of its query block, and the paged mask
function (request via ``doc_ids``, logical block via ``physical_to_logical``, causal via
``decode_offset``) is evaluated densely over the whole cache viewed as one KV sequence. A key is
visible only when *both* say so, so a page missing from a block's list would show up as a
difference from the float64 reference: the reference checks the block sparsity, not only the
mask. Memory is O(T * num_cache_pages * block_size): a reference for small shapes, not a kernel.

Also here, the device-side forms of the builder in JAX (every size static, no transfer, runs
under ``jax.transfer_guard("disallow")``): `doc_ids_jax`, `left_pack_jax`,
`physical_to_logical_jax`, `kv_blocks_jax`. For exact batches they equal the host arrays bit for
bit. Scatters that must drop entries say ``mode="drop"`` with an out-of-range index, never -1
(negative indices wrap).
"""

from __future__ import annotations

import functools
from typing import Any

import jax  # noqa: TID253 - opt-in JAX module
import jax.numpy as jnp  # noqa: TID253

__all__ = [
    "doc_ids_jax",
    "expand_block_mask",
    "flex_attention_jax",
    "flex_token_mask",
    "kv_blocks_jax",
    "left_pack_jax",
    "physical_to_logical_jax",
]


@functools.partial(jax.jit, static_argnames=("num_tokens",))
def doc_ids_jax(query_start_loc: jax.Array, *, num_tokens: int) -> jax.Array:
    """Token -> request row, int32 [num_tokens]; tokens past the last row get R - 1.

    ``searchsorted(query_start_loc[1:], arange(num_tokens), side="right")`` clipped to R - 1:
    a static output shape, equal to the host ``doc_ids`` (padding included).
    """
    rows = query_start_loc.shape[0] - 1
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    row = jnp.searchsorted(query_start_loc[1:], token, side="right")
    return jnp.minimum(row, max(rows - 1, 0)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_values", "ignore"))
def left_pack_jax(x: jax.Array, *, num_values: int, ignore: int = 0) -> tuple[jax.Array, jax.Array]:
    """First occurrences per row of ``x`` [B, N], left-packed, -1 after; values == ignore dropped.

    Values lie in [0, num_values]. Returns (packed [B, N] int32, counts [B] int32).
    """
    rows, width = x.shape
    row = jnp.arange(rows)[:, None]
    position = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (rows, width))
    first = jnp.full((rows, num_values + 1), width, dtype=jnp.int32).at[row, x].min(position)
    keep = (jnp.take_along_axis(first, x, axis=1) == position) & (x != ignore)
    kept_before = jnp.cumsum(keep, axis=1, dtype=jnp.int32)
    dest = jnp.where(keep, kept_before - 1, width)  # width: out of range, dropped
    packed = jnp.full((rows, width), -1, dtype=jnp.int32).at[row, dest].set(x.astype(jnp.int32), mode="drop")
    counts = kept_before[:, -1] if width else jnp.zeros(rows, dtype=jnp.int32)
    return packed, counts


@functools.partial(jax.jit, static_argnames=("block_size", "num_pages"))
def physical_to_logical_jax(block_table: jax.Array, seq_lens: jax.Array, *, block_size: int,
                            num_pages: int) -> jax.Array:
    """The inverse block table, int32 [R, num_pages]: scatter-max of live columns, page 0 -> -1."""
    rows, width = block_table.shape
    columns = jnp.arange(width, dtype=jnp.int32)
    # quotient plus "a remainder is left": `seq_lens + block_size - 1` wraps in int32 near 2**31
    used = seq_lens // block_size + (seq_lens % block_size != 0).astype(seq_lens.dtype)
    live = columns[None, :] < used[:, None]
    index = jnp.where(live, block_table, 0)
    logical = jnp.where(live, columns[None, :], -1)
    out = jnp.full((rows, num_pages), -1, dtype=jnp.int32)
    out = out.at[jnp.arange(rows)[:, None], index].max(logical)
    return out.at[:, 0].set(-1)


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "q_block_size", "max_pages", "num_pages", "width"),
)
def kv_blocks_jax(
    doc_ids: jax.Array,
    query_start_loc: jax.Array,
    decode_offset: jax.Array,
    block_table: jax.Array,
    *,
    block_size: int,
    q_block_size: int,
    max_pages: int,
    num_pages: int,
    width: int,
) -> tuple[jax.Array, jax.Array]:
    """(kv_num_blocks, kv_indices) built on the device, as `flex_torch.kv_blocks_device` does."""
    tokens = doc_ids.shape[0]
    num_blocks = -(-tokens // q_block_size)
    token = jnp.arange(tokens, dtype=jnp.int32)
    # (the offset within the row first: offset + token alone can pass 2**31 - 1 in int32)
    position = decode_offset[doc_ids] + (token - query_start_loc[doc_ids])
    reach = jnp.where(token < query_start_loc[-1], position // block_size, -1)
    columns = jnp.arange(max_pages, dtype=jnp.int32)
    pages = jnp.where(columns[None, :] <= reach[:, None], block_table[doc_ids, :max_pages], 0)
    pages = jnp.pad(pages, ((0, num_blocks * q_block_size - tokens), (0, 0)))
    pages = pages.reshape(num_blocks, q_block_size * max_pages)
    packed, counts = left_pack_jax(pages, num_values=num_pages, ignore=0)
    have = packed.shape[1]
    if width <= have:
        packed = packed[:, :width]
    else:
        packed = jnp.pad(packed, ((0, 0), (0, width - have)), constant_values=-1)
    return jnp.minimum(counts, width), packed


def expand_block_mask(kv_num_blocks: jax.Array, kv_indices: jax.Array, num_kv_blocks: int) -> jax.Array:
    """Dense block mask [NQ, num_kv_blocks] bool from a left-packed block list (one scatter)."""
    num_q_blocks, width = kv_indices.shape
    listed = jnp.arange(width)[None, :] < kv_num_blocks[:, None]
    column = jnp.where(listed, kv_indices, num_kv_blocks)  # unlisted: out of range, dropped
    dense = jnp.zeros((num_q_blocks, num_kv_blocks), dtype=bool)
    return dense.at[jnp.arange(num_q_blocks)[:, None], column].set(True, mode="drop")


def flex_token_mask(jmd: Any, *, physical_to_logical: jax.Array | None = None) -> jax.Array:
    """Token-level mask [T, num_cache_pages * block_size] bool: listed block AND paged mask."""
    page = jmd.block_size
    tokens = jmd.num_actual_tokens
    slots = jmd.total_cache_tokens
    inverse = jmd.physical_to_logical if physical_to_logical is None else physical_to_logical
    q_idx = jnp.arange(tokens, dtype=jnp.int32)[:, None]
    kv_idx = jnp.arange(slots, dtype=jnp.int32)[None, :]
    kv_num_blocks, kv_indices = jmd.kv_num_blocks, jmd.kv_indices
    if jmd.block_sparse_on_device:  # built with block_sparse="device": the lists are made here
        kv_num_blocks, kv_indices = kv_blocks_jax(
            jmd.doc_ids, jmd.query_start_loc, jmd.decode_offset, jmd.block_table, block_size=page,
            q_block_size=jmd.q_block_size, max_pages=min(jmd.max_pages_per_seq, jmd.block_table.shape[1]),
            num_pages=jmd.num_cache_pages, width=jmd.max_kv_blocks,
        )
    blocks = expand_block_mask(kv_num_blocks, kv_indices, jmd.num_cache_pages)
    listed = blocks[q_idx // jmd.q_block_size, kv_idx // page]
    row = jmd.doc_ids[q_idx]
    logical_block = inverse[row, kv_idx // page]
    kv_pos = logical_block * page + kv_idx % page
    q_pos = jmd.decode_offset[row] + (q_idx - jmd.query_start_loc[row])  # (no int32 wrap on the way)
    valid = (q_idx < jmd.query_start_loc[row + 1]) & (logical_block >= 0) & (kv_pos < jmd.seq_lens[row])
    return listed & valid & (kv_pos <= q_pos)


@functools.partial(jax.jit, static_argnames=("scale",))
def flex_attention_jax(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, jmd: Any, *,
                       scale: float) -> jax.Array:
    """Block-sparse paged attention over the flex metadata, float32 softmax, static shapes.

    Args:
        q: [T, Hq, D] float, T == ``jmd.num_actual_tokens``.
        k_cache, v_cache: [num_cache_pages, block_size, Hkv, D] float, ``Hq % Hkv == 0``.
        jmd: ``attnsync.adapters.jax.lower(md)`` of flex metadata (a pytree; its host scalars
            are static, so a new bucket recompiles and a new step of the same bucket does not).
            With ``inverse_table="device"`` the inverse table is built here.
        scale: softmax scale (static).

    Returns:
        [T, Hq, D] in q's dtype; tokens that see no key (padding) are 0.
    """
    tokens, q_heads, dim = q.shape
    pages, page, kv_heads, _ = k_cache.shape
    inverse = None
    if jmd.physical_to_logical.shape[1] == 0:
        inverse = physical_to_logical_jax(jmd.block_table, jmd.seq_lens, block_size=jmd.block_size,
                                          num_pages=jmd.num_cache_pages)
    mask = flex_token_mask(jmd, physical_to_logical=inverse)  # [T, S]
    group = q_heads // kv_heads
    keys = k_cache.reshape(pages * page, kv_heads, dim).astype(jnp.float32)
    values = v_cache.reshape(pages * page, kv_heads, dim).astype(jnp.float32)
    queries = q.reshape(tokens, kv_heads, group, dim).astype(jnp.float32)
    exact = jax.lax.Precision.HIGHEST  # a reference: no TF32 / bf16 passes on GPU matmuls
    scores = jnp.einsum("tkgd,skd->kgts", queries, keys, precision=exact) * scale
    scores = jnp.where(mask[None, None], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.where(mask[None, None], jnp.exp(scores - top), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("kgts,skd->tkgd", weights / jnp.where(total > 0, total, 1.0), values, precision=exact)
    return out.reshape(tokens, q_heads, dim).astype(q.dtype)
