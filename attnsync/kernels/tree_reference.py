"""Tree-masked paged attention: a float64 numpy reference, a torch consumer and a Triton one.

Opt-in module. The reference needs numpy only; `tree_paged_attention_torch` imports torch and
`tree_paged_attention_triton` imports torch and Triton inside the function, so importing this
module never imports a framework.

The masking rule (shared with :mod:`attnsync.kernels.tree_jax`). Rows ``[0, num_decodes)`` are
decode rows, the others are attended causally exactly as in
:mod:`attnsync.kernels.reference` (no window, no prefix ranges). A decode row ``r`` with
``q = q_len(r)`` new tokens and ``s = seq_lens[r]`` has its *draft block* at positions
``[s - q, s)``: its ``q`` query tokens are the tree's first ``q`` nodes in canonical order (the
root, then drafted nodes; see :mod:`attnsync.backends.tree`), token ``i`` at position
``s - q + i``. Query token ``i`` sees key position ``k`` when ``k < s`` and

* ``k < s - q`` (the context before the draft block is visible to every draft token), or
* ``k = s - q + j`` with ``j <= i`` and ``bias[i, j] == 0`` (inside the block, the tree bias
  sub-square ``bias[0:q, 0:q]`` decides).

The ``j <= i`` term is the causal mask a kernel applies anyway; for a tree bias it changes
nothing, because a node's ancestors come before it. With an empty bias (``[0, 0]``, the first
drafting step) decode rows are plain causal. A decode row with more tokens than the bias has
rows is refused (``ValueError``). Keys at or beyond ``seq_lens[r]`` are never visible.

The torch consumer applies the bias additively (``logits + bias[i, j]`` for keys inside the
draft block, after the causal mask), the way a kernel's query-query bias works; for a bias of
zeros and ``-inf`` that is the rule above. The Triton consumer is the same additive rule inside
:func:`attnsync.kernels.triton_attention.unified_paged_attention` (its ``qq_bias``): bias added
to the scaled logit of key ``s - q + j`` for query ``i``, then the causal mask ``j <= i``. So
all three agree for any bias of zeros and ``-inf``, in tree order or not: a zero above the
diagonal is hidden by the causal mask in each of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "tree_paged_attention_reference",
    "tree_paged_attention_torch",
    "tree_paged_attention_triton",
]


def tree_paged_attention_reference(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    *,
    query_start_loc: np.ndarray,
    seq_lens: np.ndarray,
    block_table: np.ndarray,
    tree_attn_bias: np.ndarray,
    num_decodes: int,
    scale: float,
    num_reqs: int | None = None,
) -> np.ndarray:
    """Tree-masked paged attention, one request row at a time, in float64.

    Args:
        q: shape [T, Hq, D], float. Row ``r``'s tokens are
            ``q[query_start_loc[r]:query_start_loc[r + 1]]``.
        k_cache, v_cache: shape [num_blocks, block_size, Hkv, D], float, ``Hq % Hkv == 0``.
        query_start_loc: shape [R + 1], integer, non-decreasing, ``[0] == 0``.
        seq_lens: shape [R], integer, exact lengths (including this step's tokens).
        block_table: shape [R, W], integer page ids in ``[0, num_blocks)`` for the pages used.
        tree_attn_bias: shape [B, B], float; 0 marks a visible (query node, key node) pair.
        num_decodes: rows ``[0, num_decodes)`` are decode rows (tree mask), the rest causal.
        scale: softmax scale.
        num_reqs: rows to process (default all R).

    Returns:
        shape [T, Hq, D], float64; tokens of no row are NaN.

    Raises:
        ValueError: inconsistent shapes, or a decode row longer than the bias.

    Example:
        >>> q = np.ones((2, 1, 1)); k = np.zeros((1, 4, 1, 1)); v = np.arange(4.0).reshape(1, 4, 1, 1)
        >>> bias = np.array([[0, -np.inf], [-np.inf, 0]], dtype=np.float32)  # node 1 hides the root
        >>> out = tree_paged_attention_reference(q, k, v, query_start_loc=np.array([0, 2]),
        ...     seq_lens=np.array([4]), block_table=np.array([[0]]), tree_attn_bias=bias,
        ...     num_decodes=1, scale=1.0)
        >>> out[:, 0, 0].tolist()  # token 0 sees keys 0..2, token 1 keys 0, 1 and 3
        [1.0, 1.3333333333333333]
    """
    for name, arr, ndim in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if not isinstance(arr, np.ndarray) or arr.ndim != ndim:
            raise ValueError(
                f"{name}: expected a numpy array with {ndim} dims, got {getattr(arr, 'shape', arr)}"
            )
    bias = np.asarray(tree_attn_bias, dtype=np.float64)
    if bias.ndim != 2 or bias.shape[0] != bias.shape[1]:
        raise ValueError(f"tree_attn_bias: expected a square [B, B] matrix, got shape {bias.shape}")
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    lens = np.asarray(seq_lens, dtype=np.int64)
    table = np.asarray(block_table, dtype=np.int64)
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if v_cache.shape != k_cache.shape or k_cache.shape[3] != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"shapes: q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape} are not "
            f"[T, Hq, D] and [num_blocks, block_size, Hkv, D] with Hq a multiple of Hkv"
        )
    num_reqs = lens.shape[0] if num_reqs is None else int(num_reqs)
    if not 0 <= num_decodes <= num_reqs:
        raise ValueError(
            f"num_decodes: expected 0 <= num_decodes <= num_reqs ({num_reqs}), got {num_decodes}"
        )
    group = num_q_heads // num_kv_heads
    qf, kf, vf = (np.asarray(x, dtype=np.float64) for x in (q, k_cache, v_cache))
    out = np.full((num_tokens, num_q_heads, head_dim), np.nan)
    for r in range(num_reqs):
        start, end = int(qsl[r]), int(qsl[r + 1])
        q_len, seq_len = end - start, int(lens[r])
        if q_len == 0:
            continue
        if seq_len < q_len:
            raise ValueError(f"row {r}: seq_len {seq_len} < query_len {q_len}")
        pages = table[r, : -(-seq_len // block_size)]
        if np.any((pages < 0) | (pages >= num_blocks)):
            raise ValueError(f"row {r}: page ids {pages} outside [0, {num_blocks})")
        keys = np.concatenate([kf[p] for p in pages])[:seq_len]
        values = np.concatenate([vf[p] for p in pages])[:seq_len]
        block_start = seq_len - q_len
        visible = np.zeros((q_len, seq_len), dtype=bool)
        for i in range(q_len):
            for k in range(seq_len):
                if r >= num_decodes or bias.shape[0] == 0:
                    visible[i, k] = k <= block_start + i  # causal
                elif k < block_start:
                    visible[i, k] = True  # context before the draft block
                else:
                    j = k - block_start
                    if q_len > bias.shape[0]:
                        raise ValueError(
                            f"row {r}: a decode row of {q_len} tokens needs a bias of at least "
                            f"{q_len} rows, but tree_attn_bias is {bias.shape}"
                        )
                    visible[i, k] = j <= i and bias[i, j] == 0
        for h in range(num_q_heads):
            logits = scale * (qf[start:end, h] @ keys[:, h // group].T)
            logits = np.where(visible, logits, -np.inf)
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            out[start:end, h] = probs @ values[:, h // group]
    return out


def tree_paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: Any,
    *,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tree attention over torch-lowered `TreeMetadata`: fixed shapes, no device value read.

    Decode rows get the tree bias, prefill rows are causal (the rule in the module docstring).
    Each sub-batch is one batched computation over a ``[rows, max_query_len]`` query tile and
    ``ceil(max_seq_len / block_size)`` pages per row, both sized from the host maxima of the
    metadata (``max_decode_*`` and ``max_prefill_*``); per-row lengths come from the device
    ``seq_lens`` (exact even when the host ones are bounds). The result is gathered back to
    token order with a device ``searchsorted``, so nothing is scattered and nothing is read.
    For correctness checks, not speed: memory is O(rows x max_query_len x keys x heads).

    Args:
        q: shape [T, Hq, D] (T = ``md.num_actual_tokens``), float16/bfloat16/float32/float64.
        k_cache, v_cache: shape [num_blocks, block_size, Hkv, D], on q's device.
        md: ``attnsync.adapters.torch.lower(attnsync.build(batch, backend="tree", ...))``.
        scale: softmax scale.
        out: optional [T, Hq, D] output (q's dtype); tokens of no row are left untouched.

    Returns:
        ``out`` (a new zero tensor if not given), q's dtype. Computed in float32 (float64 for
        float64 inputs).

    Raises:
        ValueError: the decode rows are longer than the bias (``max_decode_query_len >``
            bias rows), or shapes disagree. Checked on host ints only.
    """
    import torch

    num_tokens = q.shape[0]
    block_size = k_cache.shape[1]
    if block_size != md.block_size or num_tokens != md.num_actual_tokens:
        raise ValueError(
            f"shapes: q has {num_tokens} tokens and the cache pages of {block_size}, but the "
            f"metadata was built for {md.num_actual_tokens} tokens and block_size {md.block_size}"
        )
    bias = md.tree_attn_bias
    if md.num_decodes and bias.shape[0] and md.max_decode_query_len > bias.shape[0]:
        raise ValueError(
            f"tree_attn_bias: decode rows have up to {md.max_decode_query_len} tokens but the bias "
            f"is {tuple(bias.shape)}; a decode row's tokens are the tree's first nodes, so it "
            f"cannot be longer than the tree"
        )
    if out is None:
        out = torch.zeros_like(q)
    nd, ndt = md.num_decodes, md.num_decode_tokens
    npf, npt = md.num_prefills, md.num_prefill_tokens
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if ndt:
        out[:ndt] = _sub_batch_torch(
            q[:ndt],
            k_cache,
            v_cache,
            qsl=md.query_start_loc[: nd + 1],
            seq_lens=md.seq_lens[:nd],
            block_table=md.block_table[:nd],
            max_query_len=md.max_decode_query_len,
            max_seq_len=md.max_decode_seq_len,
            bias=bias if bias.shape[0] else None,
            scale=scale,
            compute=compute,
        ).to(out.dtype)
    if npt:
        out[ndt : ndt + npt] = _sub_batch_torch(
            q[ndt : ndt + npt],
            k_cache,
            v_cache,
            qsl=md.prefill_query_start_loc[: npf + 1],
            seq_lens=md.seq_lens[nd : nd + npf],
            block_table=md.block_table[nd : nd + npf],
            max_query_len=md.max_prefill_query_len,
            max_seq_len=md.max_prefill_seq_len,
            bias=None,
            scale=scale,
            compute=compute,
        ).to(out.dtype)
    return out


# Fields of the torch-lowered `TreeMetadata` that `tree_paged_attention_triton` reads.
_TRITON_TMD_FIELDS = (
    "query_start_loc",
    "seq_lens",
    "block_table",
    "tree_attn_bias",
    "num_reqs",
    "num_actual_tokens",
    "max_query_len",
    "max_seq_len",
    "block_size",
    "num_decodes",
    "max_decode_query_len",
)


def tree_paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tmd: Any,
    *,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tree attention over torch-lowered `TreeMetadata` in ONE Triton launch, no device read.

    The whole mixed batch goes through one 2D launch of
    :func:`attnsync.kernels.triton_attention.unified_paged_attention`: the decode rows (the
    first ``tmd.num_decodes``, decode-first order is the builder's contract) take
    ``qq_bias=tmd.tree_attn_bias`` with ``num_qq_bias_rows=tmd.num_decodes``, the prefill rows
    after them stay causal. The grid and tile sizes come from the host ints ``num_reqs``,
    ``max_query_len`` and ``max_seq_len`` only; every per-row length and page comes from the
    device tensors, so the call reads nothing back and can be captured in a CUDA graph (with
    ``out`` given). Split-KV is never used: it handles one query token per row, and a tree
    decode row has several.

    The masking is the module docstring's rule: with the tree's canonical (ancestors-first)
    node order, ``bias[i, j] == 0`` implies ``j <= i``, so the kernel's causal mask removes
    nothing the bias keeps. An empty ``[0, 0]`` bias (``draft_index == 0``) makes the decode
    rows plain causal; a drafting bias (``draft_index >= 1``) works like the full one.

    Args:
        q: shape [T, Hq, D] (T = ``tmd.num_actual_tokens``), float16/bfloat16/float32, ``D`` a
            power of two in [16, 256] (the kernel's limits).
        k_cache, v_cache: shape [num_blocks, tmd.block_size, Hkv, D], q's dtype and device.
        tmd: ``attnsync.adapters.torch.lower(attnsync.build(batch, backend="tree", ...),
            q.device)`` (with ``seq_lens=`` the exact device lengths for inexact rows).
        scale: softmax scale.
        out: optional [T, Hq, D] output of q's dtype; tokens of no row are left untouched.

    Returns:
        ``out`` (a new zero tensor if not given).

    Raises:
        TypeError: ``tmd`` is not a torch lowering of `TreeMetadata`, or a dtype is wrong.
        ValueError: the decode rows are longer than the bias (the kernel would silently give
            the pairs outside the bias square no bias), or shapes disagree with the metadata.
            Checked on host ints and shapes only.

    Example:
        >>> import attnsync, torch
        >>> from attnsync.adapters import torch as ast
        >>> batch = attnsync.Batch(query_lens=[2, 5], seq_lens=[6, 5], block_table=[[0], [1]],
        ...                        block_size=16)
        >>> tmd = ast.lower(attnsync.build(batch, backend="tree", speculative_token_tree="[(0,)]"), "cpu")
        >>> q = torch.ones(7, 2, 16); kv = torch.ones(2, 16, 1, 16)
        >>> out = tree_paged_attention_triton(q, kv, kv, tmd, scale=0.25)  # doctest: +SKIP
    """
    import torch

    # Lazy: the module stays importable (and the reference usable) without Triton.
    from .triton_attention import unified_paged_attention

    missing = [name for name in _TRITON_TMD_FIELDS if not hasattr(tmd, name)]
    if missing or not isinstance(tmd.query_start_loc, torch.Tensor) or not isinstance(
        tmd.tree_attn_bias, torch.Tensor
    ):
        raise TypeError(
            f"tmd: expected the torch lowering of the tree backend's metadata, received "
            f"{type(tmd).__name__}" + (f" (no field(s) {missing})" if missing else " with non-tensor fields")
            + '. Fix: tmd = attnsync.adapters.torch.lower(attnsync.build(batch, backend="tree", '
            "speculative_token_tree=...), device=q.device)."
        )
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"shapes: expected q [T, Hq, D] and k_cache [num_blocks, block_size, Hkv, D], got "
            f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}"
        )
    num_tokens, block_size = q.shape[0], k_cache.shape[1]
    if block_size != tmd.block_size or num_tokens != tmd.num_actual_tokens:
        raise ValueError(
            f"shapes: q has {num_tokens} tokens and the cache pages of {block_size}, but the "
            f"metadata was built for {tmd.num_actual_tokens} tokens and block_size {tmd.block_size}"
        )
    bias = tmd.tree_attn_bias
    # The kernel adds no bias to pairs outside the [B, B] square, so a decode row longer than
    # the bias would run causally instead of failing; the reference refuses it, so do we.
    if tmd.num_decodes and bias.shape[0] and tmd.max_decode_query_len > bias.shape[0]:
        raise ValueError(
            f"tree_attn_bias: decode rows have up to {tmd.max_decode_query_len} tokens but the bias "
            f"is {tuple(bias.shape)}; a decode row's tokens are the tree's first nodes, so it "
            f"cannot be longer than the tree"
        )
    if out is None:
        out = torch.zeros_like(q)
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
        # An empty [0, 0] bias (first drafting step) is accepted and compiles the plain
        # causal kernel; without decode rows num_qq_bias_rows = 0 does the same.
        qq_bias=bias,
        num_qq_bias_rows=tmd.num_decodes,
        use_split_kv=False,
    )


def _sub_batch_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    qsl: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    bias: torch.Tensor | None,
    scale: float,
    compute: torch.dtype,
) -> torch.Tensor:
    """Attention of one sub-batch whose ``qsl`` starts at 0; returns [tokens, Hq, D]."""
    import torch

    device = q.device
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    rows = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    num_pages = -(-max_seq_len // block_size)  # host bound: enough pages for every row
    num_keys = num_pages * block_size

    slot = torch.arange(max_query_len, device=device)  # query slot i of the tile
    q_start = qsl[:rows].long()
    q_len = (qsl[1 : rows + 1] - qsl[:rows]).long()
    seq = seq_lens.long()
    valid_q = slot[None, :] < q_len[:, None]  # [rows, Lq]
    token = (q_start[:, None] + slot[None, :]).clamp(max=max(num_tokens - 1, 0))
    q_tile = q[token].to(compute)  # [rows, Lq, Hq, D]

    pages = block_table[:, :num_pages].long().clamp(0, num_blocks - 1)  # [rows, P]
    keys = k_cache[pages].reshape(rows, num_keys, num_kv_heads, head_dim).to(compute)
    values = v_cache[pages].reshape(rows, num_keys, num_kv_heads, head_dim).to(compute)
    k_pos = torch.arange(num_keys, device=device)
    in_context = k_pos[None, :] < seq[:, None]  # [rows, K]
    block_start = seq - q_len  # first position of the row's new tokens
    q_pos = block_start[:, None] + slot[None, :]  # [rows, Lq]
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & in_context[:, None, :] & valid_q[:, :, None]

    # logits [rows, Hkv, group, Lq, K]
    qg = q_tile.reshape(rows, max_query_len, num_kv_heads, group, head_dim)
    logits = torch.einsum("rikgd,rnkd->rkgin", qg, keys) * scale
    if bias is not None:
        size = bias.shape[0]
        j = k_pos[None, :] - block_start[:, None]  # [rows, K], key index inside the block
        in_block = (j >= 0) & (j < q_len[:, None])
        term = bias.to(compute)[slot.clamp(max=size - 1)[None, :, None], j.clamp(0, size - 1)[:, None, :]]
        term = torch.where(in_block[:, None, :], term, torch.zeros((), dtype=compute, device=device))
        logits = logits + term[:, None, None, :, :]
    mask = visible[:, None, None, :, :]
    logits = torch.where(mask, logits, torch.full((), float("-inf"), dtype=compute, device=device))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.where(mask, torch.exp(logits - row_max), torch.zeros((), dtype=compute, device=device))
    denom = probs.sum(dim=-1, keepdim=True)
    # Slots past seq_len may hold stale NaN; 0 * NaN is NaN, so zero them instead of relying on p.
    values = torch.where(in_context[:, :, None, None], values, torch.zeros((), dtype=compute, device=device))
    tile = torch.einsum("rkgin,rnkd->rikgd", probs, values)
    tile = tile / torch.where(denom > 0, denom, torch.ones_like(denom)).permute(0, 3, 1, 2, 4)
    tile = tile.reshape(rows, max_query_len, num_q_heads, head_dim)

    # Back to token order: token t belongs to the row whose range holds it (device search).
    tokens = torch.arange(num_tokens, device=device)
    row = torch.searchsorted(qsl[1 : rows + 1].long(), tokens, right=True).clamp(max=rows - 1)
    return tile[row, tokens - q_start[row]]
