"""Float64 numpy reference for paged attention over attnsync metadata.

This module is the ground truth for every kernel in :mod:`attnsync.kernels`. It is deliberately
slow and literal: one Python iteration per request row, keys gathered page by page, the mask built
as an explicit boolean matrix, softmax in float64. It imports numpy only, so it also runs where no
framework is installed.

Masking rule (shared by all kernels): a query at absolute position ``p`` of row ``r`` sees key
``k`` when ``k < seq_lens[r]`` and either

* ``k <= p`` and (no window or ``p - k < sliding_window``), or
* some prefix range ``[s, e)`` of row ``r`` contains both ``p`` and ``k``.

The range term is OR-ed with the causal/window term, so a sliding window never hides a key of the
query's own bidirectional range. We chose this because a multimodal prefix (an image) is attended
as one unit; cutting it with the window would make the result depend on where the window edge
falls inside the image.

Tree attention (optional ``qq_bias`` [L, L]): for rows ``r < num_qq_bias_rows`` the logit of query
``i`` (position ``seq_len - q_len + i``) against the key at ``seq_len - q_len + j`` (the draft
block: the row's last ``q_len`` keys) gets ``qq_bias[i, j]`` added, for ``i, j < L``. The mask
above still applies; keys before the draft block and pairs outside the [L, L] square get no bias.
A bias of zeros and ``-inf`` is thus a visibility mask inside the draft block.
"""

from __future__ import annotations

import numpy as np

__all__ = ["paged_attention_reference", "relative_error"]


def paged_attention_reference(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    *,
    query_start_loc: np.ndarray,
    seq_lens: np.ndarray,
    block_table: np.ndarray,
    scale: float,
    sliding_window: int | None = None,
    prefix_ranges: np.ndarray | None = None,
    num_reqs: int | None = None,
    qq_bias: np.ndarray | None = None,
    num_qq_bias_rows: int | None = None,
) -> np.ndarray:
    """Computes causal paged attention one request row at a time, in float64.

    Args:
        q: shape [T, Hq, D], any float dtype (float16/32/64 or ml_dtypes bfloat16). Row ``r``'s
            new query tokens are ``q[query_start_loc[r]:query_start_loc[r + 1]]``; its query token
            ``i`` sits at absolute position ``seq_lens[r] - q_len + i``.
        k_cache: shape [num_blocks, block_size, Hkv, D], float dtype, ``Hq % Hkv == 0``.
        v_cache: same shape as ``k_cache``, float dtype.
        query_start_loc: shape [R + 1] (at least ``num_reqs + 1`` entries), integer,
            non-decreasing, ``query_start_loc[0] == 0``, ``query_start_loc[num_reqs] <= T``.
        seq_lens: shape [R], integer, ``seq_lens[r] >= q_len(r)``; the total context of row
            ``r`` including this step's tokens. Padded rows have 0.
        block_table: shape [R, W], integer page ids in ``[0, num_blocks)``; the first
            ``ceil(seq_lens[r] / block_size)`` entries of row ``r`` are used.
        scale: softmax scale applied to ``q . k``.
        sliding_window: ``None`` or an int >= 1; keys ``k`` with ``p - k >= sliding_window`` are
            hidden from the query at ``p`` (outside prefix ranges).
        prefix_ranges: ``None`` or shape [R, max_ranges, 2], integer, half-open absolute ranges
            ``[start, end)`` with ``0 <= start <= end``; ``(0, 0)`` entries are padding.
        num_reqs: rows to process, ``None`` for all ``R`` rows.
        qq_bias: ``None`` or shape [L, L], float: additive bias between a row's queries and its
            draft block (see the module docstring); ``-inf`` masks a pair. Every query must keep
            one visible key, or its output is NaN.
        num_qq_bias_rows: rows ``< num_qq_bias_rows`` take ``qq_bias`` (decode rows come
            first); ``None`` for every row. Only with ``qq_bias``.

    Returns:
        shape [T, Hq, D], float64. Tokens at or beyond ``query_start_loc[num_reqs]`` belong to no
        row and are NaN, so a comparison can tell "never written" from "written as zero".

    Raises:
        TypeError: an argument is not a numpy array of the right dtype kind.
        ValueError: shapes disagree or metadata breaks the contract above.

    Example:
        >>> import numpy as np
        >>> q = np.ones((1, 1, 2)); k = np.zeros((1, 2, 1, 2)); v = np.arange(4.0).reshape(1, 2, 1, 2)
        >>> paged_attention_reference(q, k, v, query_start_loc=np.array([0, 1]),
        ...     seq_lens=np.array([2]), block_table=np.array([[0]]), scale=1.0)[0, 0]
        array([1., 2.])
    """
    _check_float("q", q, ndim=3, layout="[T, Hq, D]")
    _check_float("k_cache", k_cache, ndim=4, layout="[num_blocks, block_size, Hkv, D]")
    _check_float("v_cache", v_cache, ndim=4, layout="[num_blocks, block_size, Hkv, D]")
    _check_int("query_start_loc", query_start_loc, ndim=1, layout="[R + 1]")
    _check_int("seq_lens", seq_lens, ndim=1, layout="[R]")
    _check_int("block_table", block_table, ndim=2, layout="[R, W]")
    if prefix_ranges is not None:
        _check_int("prefix_ranges", prefix_ranges, ndim=3, layout="[R, max_ranges, 2]")
    if qq_bias is not None:
        _check_float("qq_bias", qq_bias, ndim=2, layout="[L, L]")
        if qq_bias.shape[0] != qq_bias.shape[1]:
            raise ValueError(f"qq_bias must be a square [L, L] matrix, got shape {qq_bias.shape}")
    elif num_qq_bias_rows is not None:
        raise ValueError("num_qq_bias_rows was given without qq_bias; pass both or neither")

    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, kv_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache has shape {v_cache.shape} but k_cache has {k_cache.shape}; "
            "both caches must be [num_blocks, block_size, Hkv, D] with the same sizes"
        )
    if kv_head_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but k_cache has {kv_head_dim}; the last dims must match")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads}) for grouped-query attention"
        )

    num_rows = seq_lens.shape[0]
    if num_reqs is None:
        num_reqs = num_rows
    if isinstance(num_reqs, bool) or not isinstance(num_reqs, (int, np.integer)):
        raise TypeError(f"num_reqs must be an int or None, got {type(num_reqs).__name__}")
    num_reqs = int(num_reqs)
    if not 0 <= num_reqs <= num_rows:
        raise ValueError(f"num_reqs must be in [0, {num_rows}] (len(seq_lens)), got {num_reqs}")
    if query_start_loc.shape[0] < num_reqs + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries but num_reqs={num_reqs} "
            f"needs at least {num_reqs + 1}"
        )
    if block_table.shape[0] < num_reqs:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows but num_reqs={num_reqs}; "
            "expected one row per request"
        )
    if prefix_ranges is not None and (prefix_ranges.shape[0] < num_reqs or prefix_ranges.shape[2] != 2):
        raise ValueError(
            f"prefix_ranges has shape {prefix_ranges.shape}; expected [R >= {num_reqs}, max_ranges, 2]"
        )
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, (int, np.integer)):
            raise TypeError(f"sliding_window must be an int or None, got {type(sliding_window).__name__}")
        if sliding_window < 1:
            raise ValueError(
                f"sliding_window must be >= 1 (a query always sees itself), got {sliding_window}"
            )

    if qq_bias is None:
        num_qq_bias_rows = 0
    elif num_qq_bias_rows is None:
        num_qq_bias_rows = num_reqs
    elif isinstance(num_qq_bias_rows, bool) or not isinstance(num_qq_bias_rows, (int, np.integer)):
        raise TypeError(f"num_qq_bias_rows must be an int or None, got {type(num_qq_bias_rows).__name__}")
    elif not 0 <= num_qq_bias_rows <= num_reqs:
        raise ValueError(f"num_qq_bias_rows must be in [0, num_reqs = {num_reqs}], got {num_qq_bias_rows}")
    bias = None if qq_bias is None else np.asarray(qq_bias, dtype=np.float64)

    qsl = query_start_loc.astype(np.int64)
    lens = seq_lens.astype(np.int64)
    if qsl[0] != 0 or np.any(np.diff(qsl[: num_reqs + 1]) < 0):
        raise ValueError(f"query_start_loc must start at 0 and be non-decreasing, got {qsl[: num_reqs + 1]}")
    if qsl[num_reqs] > num_tokens:
        raise ValueError(f"query_start_loc[num_reqs] = {qsl[num_reqs]} exceeds the {num_tokens} tokens in q")

    qf = np.asarray(q, dtype=np.float64)
    kf = np.asarray(k_cache, dtype=np.float64)
    vf = np.asarray(v_cache, dtype=np.float64)
    group = num_q_heads // num_kv_heads
    out = np.full((num_tokens, num_q_heads, head_dim), np.nan, dtype=np.float64)

    for r in range(num_reqs):
        q_start, q_end = int(qsl[r]), int(qsl[r + 1])
        q_len, seq_len = q_end - q_start, int(lens[r])
        if q_len == 0:
            continue  # padded row: nothing to compute, nothing to write
        if seq_len < q_len:
            raise ValueError(
                f"row {r}: seq_lens[{r}] = {seq_len} is smaller than its {q_len} query tokens; "
                "seq_lens must include this step's new tokens"
            )
        num_pages = -(-seq_len // block_size)
        if num_pages > block_table.shape[1]:
            raise ValueError(
                f"row {r}: seq_len {seq_len} needs {num_pages} pages of {block_size} but "
                f"block_table has only {block_table.shape[1]} columns"
            )
        pages = block_table[r, :num_pages].astype(np.int64)
        if np.any((pages < 0) | (pages >= num_blocks)):
            raise ValueError(
                f"row {r}: block_table[{r}, :{num_pages}] = {pages} has ids outside [0, {num_blocks})"
            )

        # Gather the row's keys page by page: [num_pages * block_size, Hkv, D], then trim the
        # tail of the last page, which holds stale data beyond seq_len.
        keys = np.concatenate([kf[p] for p in pages], axis=0)[:seq_len]
        values = np.concatenate([vf[p] for p in pages], axis=0)[:seq_len]

        q_pos = np.arange(seq_len - q_len, seq_len)[:, None]  # [q_len, 1]
        k_pos = np.arange(seq_len)[None, :]  # [1, seq_len]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= (q_pos - k_pos) < sliding_window
        if prefix_ranges is not None:
            for start, end in prefix_ranges[r].astype(np.int64):
                if not 0 <= start <= end:
                    raise ValueError(f"row {r}: prefix range ({start}, {end}) must satisfy 0 <= start <= end")
                in_q = (q_pos >= start) & (q_pos < end)
                in_k = (k_pos >= start) & (k_pos < end)
                visible |= in_q & in_k
        # Additive bias on the draft block: [q_len, seq_len], zero outside the block and
        # outside the [L, L] square.
        row_bias = np.zeros((q_len, seq_len))
        if r < num_qq_bias_rows:
            n = min(q_len, bias.shape[0])
            row_bias[:n, seq_len - q_len : seq_len - q_len + n] = bias[:n, :n]

        for h in range(num_q_heads):
            kv_h = h // group
            logits = scale * (qf[q_start:q_end, h, :] @ keys[:, kv_h, :].T)  # [q_len, seq_len]
            logits = np.where(visible, logits + row_bias, -np.inf)
            logits -= logits.max(axis=1, keepdims=True)  # the diagonal is visible (a tree bias keeps it at 0)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            out[q_start:q_end, h, :] = probs @ values[:, kv_h, :]
    return out


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Max-abs relative error of ``out`` against a reference, over the rows the reference wrote.

    A row (leading index) counts as written when ``ref`` has no NaN in it; rows that are NaN in
    ``ref`` (tokens of no request, see :func:`paged_attention_reference`) are skipped. A NaN in
    ``out`` on a written row means the kernel left it unwritten (tests poison outputs with NaN)
    or produced NaN, and yields ``inf``.

    Args:
        out: shape [T, ...], any float dtype (convert framework tensors to numpy first).
        ref: same shape as ``out``, float.

    Returns:
        ``max |out - ref| / max |ref|`` over written rows, as a Python float; ``0.0`` when no row
        is written; ``inf`` on NaN, or when ``max |ref| == 0`` and ``out`` differs.

    Example:
        >>> relative_error(np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[1.0, 4.0], [np.nan, 0.0]]))
        0.5
    """
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {out.shape} but ref has {ref.shape}; they must match")
    if out.ndim == 0:
        out, ref = out[None], ref[None]
    written = ~np.isnan(ref.reshape(ref.shape[0], -1)).any(axis=1)
    if not written.any():
        return 0.0
    out_w, ref_w = out[written], ref[written]
    if np.isnan(out_w).any():
        return float("inf")
    diff = float(np.max(np.abs(out_w - ref_w)))
    denom = float(np.max(np.abs(ref_w)))
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def _check_float(name: str, arr: object, *, ndim: int, layout: str) -> None:
    """Raises unless ``arr`` is a numpy float array (bfloat16 included) of rank ``ndim``."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array, got {type(arr).__name__}; convert torch tensors with "
            "`t.float().cpu().numpy()` and jax arrays with `np.asarray(x)`"
        )
    # ml_dtypes' bfloat16 has kind 'V', so check it by name.
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise TypeError(f"{name} must have a float dtype, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {arr.shape}")


def _check_int(name: str, arr: object, *, ndim: int, layout: str) -> None:
    """Raises unless ``arr`` is a numpy integer array (not bool) of rank ``ndim``."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy integer array, got {type(arr).__name__}; convert with np.asarray(...)"
        )
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype (int32 in the contract), got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {arr.shape}")
