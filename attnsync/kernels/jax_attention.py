"""Pure ``jax.numpy`` paged attention over attnsync metadata, jit-compiled with static shapes.

Opt-in module: it imports ``jax`` at module level.

This is a reference, not a fast kernel: every query token gathers its row's whole page list
(``W * block_size`` keys), so memory is ``O(T * W * block_size * Hkv * D)``. What it offers is a
second, independent implementation that runs wherever JAX does, needs no data-dependent shapes
(so it compiles once per input shape), and never moves data between host and device: with all
inputs already on the device it runs under ``jax.transfer_guard("disallow")``.

Masking follows :mod:`attnsync.kernels.reference`: causal, restricted by the sliding window,
OR-ed with bidirectional prefix ranges; keys at or beyond ``seq_lens[r]`` are never visible.

:func:`paged_attention_jax_from_metadata` feeds it the JAX lowering of the ``triton`` backend's
metadata (``attnsync.adapters.jax.lower``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["paged_attention_jax", "paged_attention_jax_from_metadata"]


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window"))
def paged_attention_jax(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_table: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    prefix_ranges: jax.Array | None = None,
) -> jax.Array:
    """Causal paged attention for a mixed batch, with static shapes.

    Each token finds its row with ``searchsorted`` over ``query_start_loc``, gathers that row's
    pages, and takes a masked softmax in float32. Shape/dtype checks run once per trace. Rows
    are all ``R = seq_lens.shape[0]`` rows; padded rows (query length 0) produce nothing.
    ``scale`` and ``sliding_window`` are static (a new value recompiles); passing
    ``prefix_ranges`` or not is a separate trace too, since ``None`` has no array leaves.

    Args:
        q: shape [T, Hq, D], float16/bfloat16/float32.
        k_cache: shape [num_blocks, block_size, Hkv, D], float, ``Hq % Hkv == 0``.
        v_cache: same shape as ``k_cache``, float.
        query_start_loc: shape [R + 1], int32, non-decreasing, ``[0] == 0``, ``[R] <= T``.
        seq_lens: shape [R], int32, ``seq_lens[r] >= q_len(r)``.
        block_table: shape [R, W], int32 page ids; entries past a row's last page may hold
            anything (they are clipped into range and masked).
        scale: softmax scale (static).
        sliding_window: ``None`` or an int >= 1 (static): query at ``p`` sees keys ``k`` with
            ``p - k < sliding_window``.
        prefix_ranges: ``None`` or shape [R, max_ranges, 2], int32, half-open bidirectional
            ranges ``[start, end)``; ``(0, 0)`` entries are padding.

    Returns:
        shape [T, Hq, D], ``q.dtype``. Tokens of no row (``t >= query_start_loc[R]``) are 0.

    Raises:
        TypeError: a dtype is wrong or ``sliding_window`` is not an int.
        ValueError: shapes are inconsistent.

    Example:
        >>> q = jnp.ones((1, 1, 2)); k = jnp.zeros((1, 2, 1, 2))
        >>> v = jnp.arange(4.0).reshape(1, 2, 1, 2)
        >>> i32 = lambda *x: jnp.array(x, dtype=jnp.int32)
        >>> paged_attention_jax(q, k, v, i32(0, 1), i32(2), i32(0)[None], scale=1.0)[0, 0]
        Array([1., 2.], dtype=float32)
    """
    _check_inputs(q, k_cache, v_cache, query_start_loc, seq_lens, block_table, sliding_window, prefix_ranges)
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_rows, max_pages = block_table.shape
    group = num_q_heads // num_kv_heads
    num_keys = max_pages * block_size
    if num_rows == 0 or num_tokens == 0:
        return jnp.zeros(q.shape, q.dtype)

    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    # Row of token t: the number of rows that end at or before t. Tokens past the last row get
    # num_rows; tokens of a padded row (empty range) are never assigned to it.
    row = jnp.searchsorted(query_start_loc[1:], tokens, side="right").astype(jnp.int32)
    valid = row < num_rows  # [T]
    row = jnp.minimum(row, num_rows - 1)  # in-range gathers; invalid tokens are zeroed below
    q_start = query_start_loc[row]
    q_len = query_start_loc[row + 1] - q_start
    seq_len = seq_lens[row]  # [T]
    q_pos = seq_len - q_len + (tokens - q_start)  # absolute position of each query token

    pages = jnp.clip(block_table[row], 0, num_blocks - 1)  # [T, W]
    keys = k_cache[pages].reshape(num_tokens, num_keys, num_kv_heads, head_dim)
    values = v_cache[pages].reshape(num_tokens, num_keys, num_kv_heads, head_dim)
    k_pos = jnp.arange(num_keys, dtype=jnp.int32)[None, :]  # [1, L]
    in_context = k_pos < seq_len[:, None]  # [T, L]

    visible = k_pos <= q_pos[:, None]
    if sliding_window is not None:
        visible &= (q_pos[:, None] - k_pos) < sliding_window
    if prefix_ranges is not None:
        ranges = prefix_ranges[row]  # [T, max_ranges, 2]
        start, end = ranges[..., 0:1], ranges[..., 1:2]  # [T, max_ranges, 1]
        in_q = (q_pos[:, None, None] >= start) & (q_pos[:, None, None] < end)
        in_k = (k_pos[:, None, :] >= start) & (k_pos[:, None, :] < end)  # [T, max_ranges, L]
        visible |= jnp.any(in_q & in_k, axis=1)
    visible &= in_context & valid[:, None]
    visible = visible[:, None, None, :]  # [T, 1, 1, L] against [T, Hkv, group, L]

    # HIGHEST: on GPUs the default float32 matmul precision may be TF32 (about 1e-3 relative).
    precision = jax.lax.Precision.HIGHEST
    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    logits = jnp.einsum("tkgd,tlkd->tkgl", qf, keys.astype(jnp.float32), precision=precision) * jnp.float32(
        scale
    )
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # all-masked (invalid) tokens
    probs = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    # Slots past seq_len (page tails, unused pages) may hold stale NaN/inf, and 0 * NaN = NaN
    # in the product below, so zero them rather than rely on probs being 0 there.
    values = jnp.where(in_context[:, :, None, None], values.astype(jnp.float32), 0.0)
    out = jnp.einsum("tkgl,tlkd->tkgd", probs, values, precision=precision)
    out = out / jnp.where(denom > 0, denom, 1.0)
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


# Fields of the JAX lowering of attnsync.backends.triton.TritonMetadata read here.
_JMD_FIELDS = ("query_start_loc", "seq_lens", "block_table", "prefix_ranges", "block_size", "num_actual_tokens")


def paged_attention_jax_from_metadata(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    jmd: Any,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """:func:`paged_attention_jax` driven by the JAX lowering of the ``triton`` backend.

    ``jmd`` is ``attnsync.adapters.jax.lower(attnsync.build(batch, backend="triton", ...))``:
    its int32 device arrays (``query_start_loc``, ``seq_lens``, ``block_table``,
    ``prefix_ranges``) are the kernel's inputs.

    Compiles once per bucket. The lowered pytree keeps host ints (``max_seq_len``,
    ``max_query_len``, ``use_split_kv``, ...) as static meta fields, and a jitted function that
    took the whole pytree would key its cache on them too: ``max_seq_len`` grows every decode
    step, so it would recompile every step. The data leaves are therefore unpacked here, outside
    jit, and the compiled function's key is only the array shapes and dtypes (fixed by the
    bucket: ``Batch(padded_num_reqs=..., padded_num_tokens=...)`` and the block-table width),
    ``scale``, ``sliding_window`` and whether the prefix-range array has any column. The
    ranges are passed whenever that array has a column, even if every range is empty, so that
    ``has_prefix_ranges`` flipping between steps of one bucket does not recompile either.

    When ``q``, ``k_cache`` and ``v_cache`` are JAX arrays the call runs under
    ``jax.transfer_guard("disallow")``: everything is already on the device, and any implicit
    transfer is a bug. (Numpy inputs are transferred implicitly, as ``jit`` does.)

    Args:
        q: shape [T, Hq, D], float, with ``T >= jmd.num_actual_tokens``.
        k_cache, v_cache: shape [num_blocks, jmd.block_size, Hkv, D], float.
        jmd: the JAX-lowered ``TritonMetadata`` (``JaxTritonMetadata``), on ``q``'s device.
        scale: softmax scale (static).
        sliding_window: ``None`` or an int >= 1 (static).

    Returns:
        shape [T, Hq, D], ``q.dtype``; tokens of no row are 0.

    Raises:
        TypeError: ``jmd`` is not a JAX lowering of ``TritonMetadata``, or a dtype is wrong.
        ValueError: the arrays disagree with the metadata (block size, token count).
    """
    missing = [name for name in _JMD_FIELDS if not hasattr(jmd, name)]
    if missing or not isinstance(jmd.query_start_loc, jax.Array):
        raise TypeError(
            f"jmd: expected the JAX lowering of the triton backend's metadata, received "
            f"{type(jmd).__name__}" + (f" (no field(s) {missing})" if missing else " with non-JAX fields")
            + '. Fix: jmd = attnsync.adapters.jax.lower(attnsync.build(batch, backend="triton", ...)).'
        )
    if k_cache.ndim == 4 and k_cache.shape[1] != jmd.block_size:
        raise ValueError(
            f"k_cache has pages of {k_cache.shape[1]} tokens but the metadata was built with "
            f"block_size={jmd.block_size}; build the batch with the cache's page size"
        )
    if q.ndim >= 1 and q.shape[0] < jmd.num_actual_tokens:
        raise ValueError(
            f"q has {q.shape[0]} tokens but the metadata covers num_actual_tokens="
            f"{jmd.num_actual_tokens}; q must hold every (padded) token of the batch"
        )
    prefix_ranges = jmd.prefix_ranges if jmd.prefix_ranges.shape[1] > 0 else None
    on_device = all(isinstance(x, jax.Array) for x in (q, k_cache, v_cache))
    guard = jax.transfer_guard("disallow") if on_device else contextlib.nullcontext()
    with guard:
        return paged_attention_jax(
            q,
            k_cache,
            v_cache,
            jmd.query_start_loc,
            jmd.seq_lens,
            jmd.block_table,
            scale=scale,
            sliding_window=sliding_window,
            prefix_ranges=prefix_ranges,
        )


def _check_inputs(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_table: jax.Array,
    sliding_window: int | None,
    prefix_ranges: jax.Array | None,
) -> None:
    """Trace-time shape and dtype checks of :func:`paged_attention_jax`."""
    for name, arr in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name} must have a float dtype, got {arr.dtype}")
    int_args = [
        ("query_start_loc", query_start_loc),
        ("seq_lens", seq_lens),
        ("block_table", block_table),
    ]
    if prefix_ranges is not None:
        int_args.append(("prefix_ranges", prefix_ranges))
    for name, arr in int_args:
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise TypeError(f"{name} must be an int32 array, got {arr.dtype}")
    if q.ndim != 3:
        raise ValueError(f"q must have shape [T, Hq, D], got {q.shape}")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both have shape [num_blocks, block_size, Hkv, D], got "
            f"{k_cache.shape} and {v_cache.shape}"
        )
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"q has head_dim {q.shape[2]} but k_cache has {k_cache.shape[3]}")
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads}) for grouped-query attention"
        )
    if seq_lens.ndim != 1:
        raise ValueError(f"seq_lens must have shape [R], got {seq_lens.shape}")
    num_rows = seq_lens.shape[0]
    if query_start_loc.shape != (num_rows + 1,):
        raise ValueError(
            f"query_start_loc must have shape [R + 1] = ({num_rows + 1},) with R = "
            f"len(seq_lens), got {query_start_loc.shape}"
        )
    if block_table.ndim != 2 or block_table.shape[0] != num_rows:
        raise ValueError(f"block_table must have shape [R, W] with R = {num_rows}, got {block_table.shape}")
    if prefix_ranges is not None and (
        prefix_ranges.ndim != 3 or prefix_ranges.shape[0] != num_rows or prefix_ranges.shape[2] != 2
    ):
        raise ValueError(
            f"prefix_ranges must have shape [R, max_ranges, 2] with R = {num_rows}, got {prefix_ranges.shape}"
        )
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(f"sliding_window must be an int or None, got {type(sliding_window).__name__}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
