"""Tests of the float64 numpy reference, plus the random paged batches every kernel test uses.

The reference is checked against things that share none of its code: numbers worked out by
hand, and a dense formulation that builds each row's K/V contiguously and its mask cell by cell
from the masking rule, before any paging happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from attnsync.kernels.reference import paged_attention_reference, relative_error

# (q_len, seq_len) rows of the mixed batch the kernel tests share: a decode, a fresh prefill,
# a chunked prefill (context 16 + 4 new), a padded row, a decode crossing a page boundary.
MIXED_ROWS = ((1, 5), (3, 3), (4, 20), (0, 0), (1, 17))

# Tree attention: the bias of the speculative tree [(0,), (1,), (0, 0), (0, 1)] (node 0 is the
# root, nodes 1..4 the paths in that order), and each node's parent, from which the tests
# derive visibility without the bias.
NEG = -np.inf
TREE_BIAS = np.array(
    [
        [0, NEG, NEG, NEG, NEG],
        [0, 0, NEG, NEG, NEG],
        [0, NEG, 0, NEG, NEG],
        [0, 0, NEG, 0, NEG],
        [0, 0, NEG, NEG, 0],
    ],
    dtype=np.float32,
)
TREE_PARENT = (None, 0, 0, 1, 1)
# (q_len, seq_len) rows: three tree (decode) rows first -- a full tree after 7 context tokens,
# the first 3 nodes of it, a root alone -- then a chunked prefill, a fresh prefill and padding.
TREE_ROWS = ((5, 12), (3, 9), (1, 6), (4, 20), (3, 3), (0, 0))
NUM_TREE_ROWS = 3


@dataclass(frozen=True, eq=False)
class PagedBatch:
    """A random paged batch in numpy, laid out exactly as the metadata contract says.

    Attributes:
        q: shape [T, Hq, D], float32; T includes ``pad_tokens`` tokens of no row.
        k_cache: shape [num_blocks, block_size, Hkv, D], float32. Slots past each row's
            seq_len and pages no row uses hold NaN, so a kernel that reads them fails.
        v_cache: same as ``k_cache``.
        query_start_loc: shape [R + 1], int32.
        seq_lens: shape [R], int32.
        block_table: shape [R, W], int32; unused entries point at an all-NaN page.
        prefix_ranges: ``None`` or shape [R, max_ranges, 2], int32.
        num_reqs: rows to process (R minus ``trailing_rows``).
        max_query_len: max q_len over the rows.
        max_seq_len: max seq_len over the rows.
    """

    q: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_table: np.ndarray
    prefix_ranges: np.ndarray | None
    num_reqs: int
    max_query_len: int
    max_seq_len: int

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.q.shape[-1])

    def reference(self, **kwargs: object) -> np.ndarray:
        """The float64 reference output for this batch; kwargs override (e.g. sliding_window)."""
        args: dict[str, object] = dict(
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_table=self.block_table,
            scale=self.scale,
            prefix_ranges=self.prefix_ranges,
            num_reqs=self.num_reqs,
        )
        args.update(kwargs)
        return paged_attention_reference(self.q, self.k_cache, self.v_cache, **args)

    def cast(self, dtype: object) -> PagedBatch:
        """Rounds q/k/v through ``dtype`` (e.g. ml_dtypes bfloat16) and back to float32, so the
        reference sees exactly the values a low-precision kernel sees."""

        def rt(a: np.ndarray) -> np.ndarray:
            return a.astype(dtype).astype(np.float32)

        return PagedBatch(
            **{**self.__dict__, "q": rt(self.q), "k_cache": rt(self.k_cache), "v_cache": rt(self.v_cache)}
        )


def make_paged_batch(
    rows: tuple[tuple[int, int], ...] = MIXED_ROWS,
    *,
    block_size: int = 4,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    pad_tokens: int = 2,
    trailing_rows: int = 0,
    prefix_ranges: list[list[tuple[int, int]]] | None = None,
    seed: int = 0,
) -> PagedBatch:
    """Builds a :class:`PagedBatch` from ``(q_len, seq_len)`` rows.

    ``trailing_rows`` extra rows (with real queries) are appended past ``num_reqs``: a kernel
    must ignore them and leave their tokens untouched. ``prefix_ranges[r]`` lists row ``r``'s
    ranges; missing entries pad with ``(0, 0)``.
    """
    rng = np.random.default_rng(seed)
    all_rows = list(rows) + [(2, 6)] * trailing_rows
    num_rows = len(all_rows)
    pages_per_row = [-(-seq_len // block_size) for _, seq_len in all_rows]
    max_pages = max(pages_per_row) + 1  # one spare column that no row uses
    num_blocks = sum(pages_per_row) + 3  # spare pages no row uses, one of them the poison page
    perm = rng.permutation(num_blocks)
    poison_page = int(perm[-1])
    block_table = np.full((num_rows, max_pages), poison_page, dtype=np.int32)
    k_cache = rng.standard_normal((num_blocks, block_size, num_kv_heads, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal(k_cache.shape).astype(np.float32)
    used = np.zeros((num_blocks, block_size), dtype=bool)
    next_page = 0
    for r, ((_, seq_len), n) in enumerate(zip(all_rows, pages_per_row, strict=True)):
        block_table[r, :n] = perm[next_page : next_page + n]
        next_page += n
        for pos in range(seq_len):
            used[block_table[r, pos // block_size], pos % block_size] = True
    k_cache[~used] = np.nan
    v_cache[~used] = np.nan

    q_lens = [q_len for q_len, _ in all_rows]
    query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_reqs = len(rows)
    # Tokens of trailing rows and pad tokens both sit past query_start_loc[num_reqs].
    num_tokens = int(query_start_loc[-1]) + pad_tokens
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32)

    ranges = None
    if prefix_ranges is not None:
        width = max(len(r) for r in prefix_ranges)  # 0 gives [R, 0, 2], the builder's "none"
        ranges = np.zeros((num_rows, width, 2), dtype=np.int32)
        for r, row_ranges in enumerate(prefix_ranges):
            for i, (start, end) in enumerate(row_ranges):
                ranges[r, i] = (start, end)
    return PagedBatch(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        query_start_loc=query_start_loc,
        seq_lens=np.array([s for _, s in all_rows], dtype=np.int32),
        block_table=block_table,
        prefix_ranges=ranges,
        num_reqs=num_reqs,
        max_query_len=max(q_lens[:num_reqs]),
        max_seq_len=max(s for _, s in all_rows[:num_reqs]),
    )


def _dense_attention(batch: PagedBatch, *, sliding_window: int | None = None) -> np.ndarray:
    """Independent float64 attention: contiguous K/V per row and a mask built cell by cell."""
    q = batch.q.astype(np.float64)
    _, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = batch.k_cache.shape[1], batch.k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = np.full(q.shape, np.nan)
    for r in range(batch.num_reqs):
        start, end = int(batch.query_start_loc[r]), int(batch.query_start_loc[r + 1])
        seq_len = int(batch.seq_lens[r])
        # Contiguous keys, one position at a time: [seq_len, Hkv, D].
        keys = (
            np.stack(
                [batch.k_cache[batch.block_table[r, p // block_size], p % block_size] for p in range(seq_len)]
            ).astype(np.float64)
            if seq_len
            else np.zeros((0, num_kv_heads, head_dim))
        )
        values = (
            np.stack(
                [batch.v_cache[batch.block_table[r, p // block_size], p % block_size] for p in range(seq_len)]
            ).astype(np.float64)
            if seq_len
            else np.zeros((0, num_kv_heads, head_dim))
        )
        ranges = [] if batch.prefix_ranges is None else [tuple(x) for x in batch.prefix_ranges[r]]
        for t in range(start, end):
            pos = seq_len - (end - start) + (t - start)
            mask = np.zeros(seq_len, dtype=bool)
            for k in range(seq_len):
                causal = k <= pos and (sliding_window is None or pos - k < sliding_window)
                bidir = any(s <= pos < e and s <= k < e for s, e in ranges)
                mask[k] = causal or bidir
            for h in range(num_q_heads):
                logits = batch.scale * keys[mask, h // group] @ q[t, h]
                w = np.exp(logits - logits.max())
                out[t, h] = (w / w.sum()) @ values[mask, h // group]
    return out


def _tree_dense(batch: PagedBatch, num_tree_rows: int) -> np.ndarray:
    """Independent float64 tree attention: each decode query's key set from TREE_PARENT."""
    q = batch.q.astype(np.float64)
    _, num_q_heads, _ = q.shape
    block_size, num_kv_heads = batch.k_cache.shape[1], batch.k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = np.full(q.shape, np.nan)
    for r in range(batch.num_reqs):
        start, end = int(batch.query_start_loc[r]), int(batch.query_start_loc[r + 1])
        seq_len, q_len = int(batch.seq_lens[r]), end - start
        context = seq_len - q_len
        for i in range(q_len):
            if r < num_tree_rows:
                node, seen = i, []
                while node is not None:  # the node and its ancestors, up to the root
                    seen.append(context + node)
                    node = TREE_PARENT[node]
                keys = list(range(context)) + sorted(seen)
            else:
                keys = list(range(context + i + 1))
            kk = np.stack([batch.k_cache[batch.block_table[r, p // block_size], p % block_size] for p in keys])
            vv = np.stack([batch.v_cache[batch.block_table[r, p // block_size], p % block_size] for p in keys])
            for h in range(num_q_heads):
                logits = batch.scale * kk[:, h // group].astype(np.float64) @ q[start + i, h]
                w = np.exp(logits - logits.max())
                out[start + i, h] = (w / w.sum()) @ vv[:, h // group].astype(np.float64)
    return out


def test_hand_case() -> None:
    # Row: q_len 2, seq_len 3, block_size 2; positions 0,1 in page 1, position 2 in page 0.
    k = np.zeros((2, 2, 1, 2))
    v = np.zeros((2, 2, 1, 2))
    k[1, 0, 0], k[1, 1, 0], k[0, 0, 0] = (1, 0), (0, 1), (1, 1)
    v[1, 0, 0], v[1, 1, 0], v[0, 0, 0] = (1, 2), (3, 4), (5, 6)
    k[0, 1] = v[0, 1] = np.nan  # tail of the last page, past seq_len
    q = np.array([[[math.log(2.0), 0.0]], [[0.0, 0.0]]])
    meta = dict(
        query_start_loc=np.array([0, 2], np.int32),
        seq_lens=np.array([3], np.int32),
        block_table=np.array([[1, 0]], np.int32),
        scale=1.0,
    )
    out = paged_attention_reference(q, k, v, **meta)
    # Position 1 sees keys 0, 1 with logits (ln 2, 0): weights (2/3, 1/3).
    np.testing.assert_allclose(out[0, 0], [5 / 3, 8 / 3], rtol=1e-12)
    # Position 2 has q = 0: uniform over keys 0..2, the mean of v.
    np.testing.assert_allclose(out[1, 0], [3.0, 4.0], rtol=1e-12)

    # A bidirectional range [1, 3) lets position 1 see key 2 as well: logits (ln 2, 0, ln 2),
    # weights (2/5, 1/5, 2/5).
    ranged = paged_attention_reference(q, k, v, **meta, prefix_ranges=np.array([[[1, 3]]], np.int32))
    np.testing.assert_allclose(ranged[0, 0], [(2 * 1 + 3 + 2 * 5) / 5, (2 * 2 + 4 + 2 * 6) / 5], rtol=1e-12)
    np.testing.assert_allclose(ranged[1, 0], [3.0, 4.0], rtol=1e-12)

    # A window of 1 leaves each query only itself.
    windowed = paged_attention_reference(q, k, v, **meta, sliding_window=1)
    np.testing.assert_allclose(windowed[:, 0], [[3.0, 4.0], [5.0, 6.0]], rtol=1e-12)


def test_qq_bias_hand_case() -> None:
    # One row, q_len 2, seq_len 3 (context 1), all logits 0 (q = 0). The draft block is
    # positions 1, 2. Query 0 (position 1) sees keys 0, 1 causally: bias[0, 0] = 0, so the
    # mean of v0, v1. Query 1 (position 2) sees keys 0..2 and bias[1, 0] = ln 3 on key 1:
    # weights (1, 3, 1) / 5.
    k = np.zeros((1, 4, 1, 2))
    v = np.zeros((1, 4, 1, 2))
    v[0, :3, 0] = [(1, 2), (3, 4), (5, 6)]
    v[0, 3] = np.nan  # past seq_len
    q = np.zeros((2, 1, 2))
    bias = np.array([[0.0, -np.inf], [math.log(3.0), 0.0]])
    meta = dict(
        query_start_loc=np.array([0, 2], np.int32),
        seq_lens=np.array([3], np.int32),
        block_table=np.array([[0]], np.int32),
        scale=1.0,
    )
    out = paged_attention_reference(q, k, v, **meta, qq_bias=bias)
    np.testing.assert_allclose(out[0, 0], [2.0, 3.0], rtol=1e-12)
    np.testing.assert_allclose(out[1, 0], [(1 + 9 + 5) / 5, (2 + 12 + 6) / 5], rtol=1e-12)
    # -inf on the pair (1, 0) hides key 1 from query 1: the mean of v0, v2.
    hidden = paged_attention_reference(q, k, v, **meta, qq_bias=np.array([[0.0, 0.0], [-np.inf, 0.0]]))
    np.testing.assert_allclose(hidden[1, 0], [3.0, 4.0], rtol=1e-12)
    # num_qq_bias_rows=0: no row takes the bias.
    plain = paged_attention_reference(q, k, v, **meta)
    np.testing.assert_array_equal(
        paged_attention_reference(q, k, v, **meta, qq_bias=bias, num_qq_bias_rows=0), plain
    )


def test_tree_bias_matches_dense_tree_formulation() -> None:
    batch = make_paged_batch(TREE_ROWS, head_dim=8, seed=21)
    ref = batch.reference(qq_bias=TREE_BIAS, num_qq_bias_rows=NUM_TREE_ROWS)
    assert relative_error(ref, _tree_dense(batch, NUM_TREE_ROWS)) < 1e-12
    # The prefill rows are plain causal; the bias matters for the tree rows.
    plain = batch.reference()
    prefill = slice(int(batch.query_start_loc[NUM_TREE_ROWS]), int(batch.query_start_loc[batch.num_reqs]))
    np.testing.assert_array_equal(ref[prefill], plain[prefill])
    assert not np.allclose(ref[:5], plain[:5])
    # Applied to every row it changes the 4-token prefill too (its query 2 loses key 1).
    everywhere = batch.reference(qq_bias=TREE_BIAS)
    assert not np.allclose(everywhere[prefill], plain[prefill])


def test_qq_bias_square_limits_the_bias() -> None:
    # A 2x2 bias on rows with up to 5 queries: only pairs with i, j < 2 are biased, so hiding
    # key 0 of the block from query 1 equals the reference with that one pair masked.
    batch = make_paged_batch(TREE_ROWS, head_dim=8, seed=22)
    small = np.array([[0.0, -np.inf], [-np.inf, 0.0]])
    big = np.zeros((5, 5))
    big[1, 0] = -np.inf
    big[0, 1] = -np.inf  # causally masked anyway
    np.testing.assert_allclose(
        batch.reference(qq_bias=small, num_qq_bias_rows=2),
        batch.reference(qq_bias=big, num_qq_bias_rows=2),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_matches_dense_formulation(block_size: int) -> None:
    batch = make_paged_batch(block_size=block_size, head_dim=8, seed=block_size)
    ref = batch.reference()
    assert relative_error(ref, _dense_attention(batch)) < 1e-12
    # Tokens of no row stay NaN; every token of a row is written.
    end = batch.query_start_loc[batch.num_reqs]
    assert np.isnan(ref[end:]).all()
    assert not np.isnan(ref[:end]).any()


def test_window_and_prefix_ranges_match_dense_formulation() -> None:
    # Row 2 (q_len 4 at positions 16..19) gets a range [14, 18) that reaches past its first
    # queries and an earlier one [2, 6) that no query lies in; row 1 is fully bidirectional.
    prefix = [[], [(0, 3)], [(2, 6), (14, 18)], [], [(10, 17)]]
    batch = make_paged_batch(head_dim=8, prefix_ranges=prefix, seed=3)
    for window in (None, 3):
        ref = batch.reference(sliding_window=window)
        assert relative_error(ref, _dense_attention(batch, sliding_window=window)) < 1e-12
    # The range changes the answer for the queries inside it and not for the last query.
    plain = batch.reference(prefix_ranges=None)
    ranged = batch.reference()
    # Row 2's tokens are 4..7 at positions 16..19.
    assert not np.allclose(plain[4:6], ranged[4:6])  # positions 16, 17: inside [14, 18)
    np.testing.assert_array_equal(plain[7], ranged[7])  # position 19, past the range


def test_zero_width_prefix_ranges_mean_none() -> None:
    # The Triton backend builder passes [R, 0, 2] when no row has a range.
    batch = make_paged_batch(head_dim=8, prefix_ranges=[[]] * len(MIXED_ROWS))
    assert batch.prefix_ranges is not None and batch.prefix_ranges.shape == (len(MIXED_ROWS), 0, 2)
    np.testing.assert_array_equal(batch.reference(), batch.reference(prefix_ranges=None))


def test_num_reqs_leaves_later_rows_unwritten() -> None:
    batch = make_paged_batch(head_dim=8, trailing_rows=2)
    ref = batch.reference()
    end = batch.query_start_loc[batch.num_reqs]
    assert end < batch.query_start_loc[-1]
    assert np.isnan(ref[end:]).all()
    assert not np.isnan(ref[:end]).any()


def test_accepts_low_precision_inputs() -> None:
    batch = make_paged_batch(head_dim=8)
    f16 = {name: getattr(batch, name).astype(np.float16) for name in ("q", "k_cache", "v_cache")}
    half = PagedBatch(**{**batch.__dict__, **f16})
    assert relative_error(half.reference(), batch.cast(np.float16).reference()) < 1e-12


def test_relative_error() -> None:
    ref = np.array([[1.0, -4.0], [np.nan, np.nan]])
    assert relative_error(np.array([[1.0, -2.0], [7.0, 7.0]]), ref) == 0.5  # NaN row skipped
    assert relative_error(np.array([[1.0, np.nan], [0.0, 0.0]]), ref) == math.inf
    assert relative_error(np.zeros((2, 2)), np.full((2, 2), np.nan)) == 0.0
    assert relative_error(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_error(np.ones(2), np.zeros(2)) == math.inf
    with pytest.raises(ValueError, match="shape"):
        relative_error(np.zeros(2), np.zeros(3))


def _meta() -> dict[str, object]:
    return dict(
        query_start_loc=np.array([0, 1], np.int32),
        seq_lens=np.array([2], np.int32),
        block_table=np.array([[0]], np.int32),
        scale=1.0,
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(q=np.zeros((1, 3, 4)), k_cache=np.zeros((1, 2, 2, 4))), ValueError, "v_cache has"),
        (
            dict(q=np.zeros((1, 3, 4)), k_cache=np.zeros((1, 2, 2, 4)), v_cache=np.zeros((1, 2, 2, 4))),
            ValueError,
            "multiple of num_kv_heads",
        ),
        (dict(q=np.zeros((1, 2, 8))), ValueError, "head_dim"),
        (dict(q=np.zeros((1, 2, 4), np.int32)), TypeError, "float dtype"),
        (dict(q=[[[0.0] * 4] * 2]), TypeError, "numpy array"),
        (dict(seq_lens=np.array([2.0])), TypeError, "integer dtype"),
        (dict(seq_lens=np.array([0], np.int32)), ValueError, "smaller than its 1 query"),
        (dict(seq_lens=np.array([9], np.int32)), ValueError, "block_table has only 1 columns"),
        (dict(block_table=np.array([[5]], np.int32)), ValueError, "outside"),
        (dict(query_start_loc=np.array([1, 1], np.int32)), ValueError, "start at 0"),
        (dict(query_start_loc=np.array([0, 3], np.int32)), ValueError, "exceeds"),
        (dict(sliding_window=0), ValueError, ">= 1"),
        (dict(sliding_window=True), TypeError, "sliding_window"),
        (dict(num_reqs=2), ValueError, "num_reqs"),
        (dict(prefix_ranges=np.array([[[3, 1]]], np.int32)), ValueError, "start <= end"),
        (dict(qq_bias=np.zeros((2, 3))), ValueError, "square"),
        (dict(qq_bias=np.zeros((2, 2), np.int32)), TypeError, "float dtype"),
        (dict(num_qq_bias_rows=1), ValueError, "without qq_bias"),
        (dict(qq_bias=np.zeros((2, 2)), num_qq_bias_rows=2), ValueError, "num_qq_bias_rows"),
        (dict(qq_bias=np.zeros((2, 2)), num_qq_bias_rows=1.0), TypeError, "num_qq_bias_rows"),
    ],
)
def test_validation(change: dict[str, object], error: type[Exception], match: str) -> None:
    args: dict[str, object] = dict(
        q=np.zeros((1, 2, 4)), k_cache=np.zeros((1, 2, 1, 4)), v_cache=np.zeros((1, 2, 1, 4))
    )
    args.update(_meta())
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    with pytest.raises(error, match=match):
        paged_attention_reference(q, k, v, **args)
