"""`attnsync.reorder`: decode-first order (decode, short extend, long extend, prefill), stable.

The region of each row is recomputed here from its definition, not
taken from `Batch.regions`, so the test checks the classification too.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import batch_kwargs

import attnsync
from attnsync._batch import require_decode_first


def reference_regions(batch: attnsync.Batch, threshold: int) -> list[int]:
    """0 decode, 1 short extend, 2 long extend, 3 prefill; one row at a time."""
    out = []
    for r in range(batch.num_reqs):
        q, s = int(batch.query_lens[r]), int(batch.seq_lens[r])
        prefilling = bool(batch.is_prefilling[r]) if batch.is_prefilling is not None else False
        if q <= threshold:
            out.append(1 if prefilling else 0)
        else:
            out.append(2 if s - q > 0 else 3)
    return out


def test_hand_case():
    # rows: 0 prefill (no context), 1 decode, 2 long extend, 3 short extend (prefilling,
    # 1 token), 4 decode -> order: decodes 1, 4; short extend 3; long extend 2; prefill 0
    batch = attnsync.Batch(
        query_lens=[4, 1, 3, 1, 1],
        seq_lens=[4, 9, 7, 6, 2],
        block_table=[[10], [11], [12], [13], [14]],
        block_size=16,
        is_prefilling=[True, False, False, True, False],
        seq_lens_exact=[True, False, True, True, True],
        padded_num_reqs=8,
        padded_num_tokens=16,
    )
    perm, ordered = attnsync.reorder(batch)
    assert perm.tolist() == [1, 4, 3, 2, 0]
    assert perm.dtype == np.int64
    assert ordered.query_lens.tolist() == [1, 1, 1, 3, 4]
    assert ordered.seq_lens.tolist() == [9, 2, 6, 7, 4]
    assert ordered.block_table.tolist() == [[11], [14], [13], [12], [10]]
    assert ordered.is_prefilling.tolist() == [False, False, True, False, True]
    assert ordered.seq_lens_exact.tolist() == [False, True, True, True, True]
    assert (ordered.padded_num_reqs, ordered.padded_num_tokens, ordered.block_size) == (8, 16, 16)
    md = attnsync.build(ordered)
    assert md.is_decode_first
    assert (md.num_decodes, md.num_extends, md.num_prefills) == (2, 2, 1)


def test_threshold_moves_spec_decode_rows_into_decodes():
    batch = attnsync.Batch(query_lens=[5, 3, 1], seq_lens=[5, 20, 9], block_table=[[1, 2], [3, 4], [5, 6]],
                           block_size=16)
    assert attnsync.reorder(batch)[0].tolist() == [2, 1, 0]  # threshold 1: 3 tokens is an extend
    assert attnsync.reorder(batch, decode_threshold=3)[0].tolist() == [1, 2, 0]  # stable: 1 before 2


def test_already_ordered_and_empty_batches_keep_identity():
    ordered = attnsync.Batch(query_lens=[1, 1, 5], seq_lens=[3, 4, 5], block_table=[[1], [2], [3]], block_size=16)
    assert attnsync.reorder(ordered)[0].tolist() == [0, 1, 2]
    empty = attnsync.Batch(query_lens=[], seq_lens=[], block_table=[], block_size=16)
    perm, out = attnsync.reorder(empty)
    assert perm.shape == (0,) and out.num_reqs == 0


def test_bad_threshold():
    batch = attnsync.Batch(query_lens=[1], seq_lens=[3], block_table=[[1]], block_size=16)
    with pytest.raises(attnsync.SpecError, match="decode_threshold"):
        attnsync.reorder(batch, decode_threshold=0)


@settings(max_examples=200, deadline=None)
@given(kwargs=batch_kwargs(max_reqs=16), threshold=st.sampled_from([1, 2, 3, 5]))
def test_random_batches(kwargs, threshold):
    batch = attnsync.Batch(**kwargs)
    perm, ordered = attnsync.reorder(batch, decode_threshold=threshold)
    n = batch.num_reqs
    assert sorted(perm.tolist()) == list(range(n)), "a permutation"
    regions = reference_regions(batch, threshold)
    permuted = [regions[i] for i in perm]
    assert permuted == sorted(permuted), "rows in region order"
    for region in range(4):
        rows = [int(i) for i in perm if regions[i] == region]
        assert rows == sorted(rows), "stable within a region"
    # the permutation applied to the inputs gives the reordered batch
    np.testing.assert_array_equal(ordered.query_lens, batch.query_lens[perm])
    np.testing.assert_array_equal(ordered.seq_lens, batch.seq_lens[perm])
    np.testing.assert_array_equal(ordered.block_table, batch.block_table[perm])
    np.testing.assert_array_equal(ordered.seq_lens_exact, batch.seq_lens_exact[perm])
    if batch.is_prefilling is None:
        assert ordered.is_prefilling is None
    else:
        np.testing.assert_array_equal(ordered.is_prefilling, batch.is_prefilling[perm])
    assert ordered.padded_num_reqs == batch.padded_num_reqs
    assert ordered.padded_num_tokens == batch.padded_num_tokens
    assert reference_regions(ordered, threshold) == permuted
    # the result passes the decode-first checks, strict and not
    require_decode_first(ordered, decode_threshold=threshold, backend="test", strict=True)
    require_decode_first(ordered, decode_threshold=threshold, backend="test", strict=False)
    assert attnsync.build(ordered, decode_threshold=threshold).is_decode_first
    # and the unordered batch is refused exactly when it is out of order
    out_of_order = any(regions[a] > regions[b] for a in range(n) for b in range(a + 1, n))
    if out_of_order:
        with pytest.raises(attnsync.SpecError, match="decode-first"):
            require_decode_first(batch, decode_threshold=threshold, backend="test", strict=True)
    else:
        assert perm.tolist() == list(range(n))
    # reordering is idempotent
    assert attnsync.reorder(ordered, decode_threshold=threshold)[0].tolist() == list(range(n))
