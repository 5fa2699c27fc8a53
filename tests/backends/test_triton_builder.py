"""The ``triton`` backend builder against hand-computed values and per-row references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnsync
from attnsync.testing import brute_force_common

SHAPE = dict(num_q_heads=16, num_kv_heads=8, head_dim=128)


def _batch(**overrides):
    args = dict(
        query_lens=[1, 1, 4],
        seq_lens=[20, 7, 4],
        block_table=[[3, 4], [5, 0], [6, 0]],
        block_size=16,
    )
    args.update(overrides)
    return attnsync.Batch(**args)


def test_common_fields_are_the_common_builders():
    batch = _batch(padded_num_reqs=5, padded_num_tokens=8)
    md = attnsync.build(batch, backend="triton", **SHAPE)
    ref = brute_force_common(batch)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        np.testing.assert_array_equal(getattr(md, name), ref[name], err_msg=name)
        assert getattr(md, name).dtype == ref[name].dtype
    assert (md.max_query_len, md.max_seq_len, md.num_reqs, md.num_actual_tokens) == (4, 20, 5, 8)


def test_kernel_choice_and_scratch_shapes():
    decode = _batch(query_lens=[1, 1, 1], seq_lens=[20, 7, 4])
    # max_seq_len 20: split-KV once the length condition lets rows this short through
    md = attnsync.build(decode, backend="triton", split_kv_min_seq_len=20, **SHAPE)
    # 128 // 8 kv heads = 16 rows at most on the split-KV path
    assert md.seq_threshold_3d == 16 and md.use_split_kv
    assert md.segm_output_shape == (16, 16, 16, 128)
    assert md.segm_stats_shape == (16, 16, 16)
    assert md.split_kv_min_seq_len == 20
    mixed = attnsync.build(_batch(), backend="triton", split_kv_min_seq_len=0, **SHAPE)
    assert not mixed.use_split_kv  # a 4-token row needs the 2D path
    many = attnsync.build(decode, backend="triton", seq_threshold_3d=2, split_kv_min_seq_len=0, **SHAPE)
    assert not many.use_split_kv  # 3 rows > threshold 2
    short = attnsync.build(decode, backend="triton", split_kv_min_seq_len=21, **SHAPE)
    assert not short.use_split_kv  # longest row 20 < 21 keys: the 2D kernel is faster
    default = attnsync.build(decode, backend="triton", **SHAPE)
    assert default.split_kv_min_seq_len == 1024 and not default.use_split_kv
    long = attnsync.build(
        _batch(query_lens=[1, 1], seq_lens=[1024, 7], block_table=np.ones((2, 64), dtype=np.int32)),
        backend="triton", **SHAPE,
    )
    assert long.use_split_kv  # the default lets a 1024-key decode batch split
    odd_dim = attnsync.build(decode, backend="triton", num_q_heads=4, num_kv_heads=4, head_dim=96)
    assert odd_dim.segm_output_shape[-1] == 128  # next power of two
    empty = attnsync.build(
        attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 1)), block_size=16),
        backend="triton", **SHAPE,
    )
    assert not empty.use_split_kv


def test_prefix_ranges_padded_on_the_host():
    md = attnsync.build(_batch(padded_num_reqs=4), backend="triton", prefix_ranges=[None, [(0, 3)], [(0, 2), (2, 4)]],
                        **SHAPE)
    assert md.prefix_ranges.dtype == np.int32 and md.prefix_ranges.shape == (4, 2, 2)
    np.testing.assert_array_equal(md.prefix_ranges[1], [[0, 3], [0, 0]])
    np.testing.assert_array_equal(md.prefix_ranges[2], [[0, 2], [2, 4]])
    assert not md.prefix_ranges[0].any() and not md.prefix_ranges[3].any()
    assert md.has_prefix_ranges
    as_dict = attnsync.build(_batch(), backend="triton", prefix_ranges={2: [(1, 3)]}, **SHAPE)
    np.testing.assert_array_equal(as_dict.prefix_ranges[:, 0], [[0, 0], [0, 0], [1, 3]])
    none = attnsync.build(_batch(), backend="triton", **SHAPE)
    assert none.prefix_ranges.shape == (3, 0, 2) and not none.has_prefix_ranges


@pytest.mark.parametrize(
    ("ranges", "error", "match"),
    [
        ([[(0, 3)]], attnsync.SpecError, "one entry per request"),
        ([None, None, [(3, 1)]], attnsync.SpecError, r"start <= end <= seq_len"),
        ([None, [(0, 8)], None], attnsync.SpecError, r"seq_len \(7\)"),
        ([None, None, [(0,)]], attnsync.SpecError, "pair"),
        ([None, None, [(0.5, 2)]], TypeError, r"prefix_ranges\[2\]\[0\]\.start"),
        ({5: [(0, 1)]}, attnsync.SpecError, "row key"),
        ("0-3", TypeError, "prefix_ranges"),
    ],
)
def test_bad_prefix_ranges(ranges, error, match):
    with pytest.raises(error, match=match):
        attnsync.build(_batch(), backend="triton", prefix_ranges=ranges, **SHAPE)


def test_bad_head_shapes():
    with pytest.raises(attnsync.SpecError, match="multiple of num_kv_heads"):
        attnsync.build(_batch(), backend="triton", num_q_heads=6, num_kv_heads=4, head_dim=64)
    with pytest.raises(TypeError, match="head_dim"):
        attnsync.build(_batch(), backend="triton", num_q_heads=4, num_kv_heads=4, head_dim=64.0)
    with pytest.raises(attnsync.SpecError, match=r"backend 'triton' needs the option\(s\) \['num_kv_heads'\]"):
        attnsync.build(_batch(), backend="triton", num_q_heads=4, head_dim=64)
    with pytest.raises(attnsync.SpecError, match="split_kv_min_seq_len"):
        attnsync.build(_batch(), backend="triton", split_kv_min_seq_len=-1, **SHAPE)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_split_kv_choice_matches_its_definition(data):
    rows = data.draw(st.integers(0, 20))
    q = data.draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows))
    s = [qi + data.draw(st.integers(0, 40)) for qi in q]
    threshold = data.draw(st.integers(1, 24))
    min_seq_len = data.draw(st.integers(0, 45))
    batch = attnsync.Batch(query_lens=q, seq_lens=s, block_table=np.ones((rows, 3), dtype=np.int32),
                           block_size=16)
    md = attnsync.build(batch, backend="triton", seq_threshold_3d=threshold, split_kv_min_seq_len=min_seq_len,
                        **SHAPE)
    expected = rows > 0 and max(q) <= 1 and rows <= threshold and max(s) >= min_seq_len
    assert md.use_split_kv == expected
