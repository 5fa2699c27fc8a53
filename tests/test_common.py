"""`attnsync.build(batch)` (the common backend) against references.

Two references: values written out by hand below (computed on paper from the definitions
of the fields), and `attnsync.testing.brute_force_common`, a per-row Python loop. The hand
cases also check the brute-force reference itself, so neither is trusted blindly. Then >= 500 hypothesis batches compare every field with the brute force.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import batch_kwargs

import attnsync
from attnsync import _fields, _spec
from attnsync.testing import brute_force_common

ARRAY_DTYPES = {
    "query_start_loc": np.int32,
    "query_lens": np.int32,
    "seq_lens": np.int32,
    "seq_lens_exact": np.bool_,
    "num_computed_tokens": np.int32,
    "is_prefilling": np.bool_,
    "block_table": np.int32,
    "slot_mapping": np.int32,
    "token_to_req": np.int32,
}


def assert_matches(md: attnsync.CommonMetadata, expected: dict) -> None:
    """Every key of `expected` equals the field of `md`, dtypes included for arrays."""
    for name, want in expected.items():
        got = getattr(md, name)
        if isinstance(want, np.ndarray) or isinstance(got, np.ndarray):
            want = np.asarray(want, dtype=ARRAY_DTYPES[name])
            assert isinstance(got, np.ndarray), name
            assert got.dtype == ARRAY_DTYPES[name], (name, got.dtype)
            assert got.shape == want.shape, (name, got.shape, want.shape)
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            assert type(got) is type(want), (name, type(got), type(want))
            assert got == want, (name, got, want)


def assert_same_as_brute_force(batch: attnsync.Batch, *, decode_threshold: int = 1) -> None:
    md = attnsync.build(batch, decode_threshold=decode_threshold)
    ref = brute_force_common(batch, decode_threshold=decode_threshold)
    assert_matches(md, ref)
    # fields the reference does not list
    assert md.block_size == batch.block_size
    assert md.decode_threshold == decode_threshold
    assert md.slot_mapping_exact == ref["all_exact"]
    assert md.num_decodes + md.num_extends + md.num_prefills == batch.num_reqs
    assert md.num_decode_tokens + md.num_extend_tokens + md.num_prefill_tokens == batch.num_tokens
    for field in dataclasses.fields(md):
        value = getattr(md, field.name)
        if isinstance(value, np.ndarray):
            assert not value.flags.writeable, f"{field.name} must be read-only"


# --------------------------------------------------------------------------------------------
# Hand-computed cases: every value below was worked out on paper.


def _table(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


# page 16, query_lens [1,1,3,5], seq_lens [17,33,3,12]:
#   row 0: one token at position 16 -> page column 1 (id 9), offset 0 -> 9*16 + 0 = 144
#   row 1: one token at position 32 -> column 2 (id 7), offset 0 -> 112
#   row 2: positions 0,1,2 (no context: a prefill) -> column 0 (id 11) -> 176, 177, 178
#   row 3: positions 7..11 (context 7: a long extend) -> column 0 (id 3) -> 55..59
MIXED = dict(
    query_lens=[1, 1, 3, 5],
    seq_lens=[17, 33, 3, 12],
    block_table=_table([[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 0, 0]]),
    block_size=16,
)
MIXED_EXPECTED = dict(
    query_start_loc=[0, 1, 2, 5, 10],
    query_lens=[1, 1, 3, 5],
    seq_lens=[17, 33, 3, 12],
    seq_lens_exact=[True] * 4,
    num_computed_tokens=[16, 32, 0, 7],
    is_prefilling=[False] * 4,
    block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 0, 0]],
    slot_mapping=[144, 112, 176, 177, 178, 55, 56, 57, 58, 59],
    token_to_req=[0, 1, 2, 2, 2, 3, 3, 3, 3, 3],
    num_reqs=4, num_actual_tokens=10, num_scheduled_reqs=4, num_scheduled_tokens=10,
    max_query_len=5, max_seq_len=33,
    num_decodes=2, num_decode_tokens=2, num_extends=1, num_extend_tokens=5,
    num_prefills=1, num_prefill_tokens=3,
    is_decode_first=True, all_exact=True, slot_mapping_exact=True,
)

HAND_CASES = {
    "mixed": (MIXED, MIXED_EXPECTED),
    # padded to 6 rows and 12 tokens: qsl repeats its last value, seq_lens 0, table rows 0,
    # padding tokens slot -1 and owner row R=6.
    "mixed_padded": (
        dict(MIXED, padded_num_reqs=6, padded_num_tokens=12),
        dict(
            MIXED_EXPECTED,
            query_start_loc=[0, 1, 2, 5, 10, 10, 10],
            query_lens=[1, 1, 3, 5, 0, 0],
            seq_lens=[17, 33, 3, 12, 0, 0],
            seq_lens_exact=[True] * 6,
            num_computed_tokens=[16, 32, 0, 7, 0, 0],
            is_prefilling=[False] * 6,
            block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 0, 0], [0, 0, 0], [0, 0, 0]],
            slot_mapping=[144, 112, 176, 177, 178, 55, 56, 57, 58, 59, -1, -1],
            token_to_req=[0, 1, 2, 2, 2, 3, 3, 3, 3, 3, 6, 6],
            num_reqs=6, num_actual_tokens=12, num_scheduled_reqs=4, num_scheduled_tokens=10,
        ),
    ),
    "empty": (
        dict(query_lens=[], seq_lens=[], block_table=np.zeros((0, 0), np.int32), block_size=16),
        dict(
            query_start_loc=[0], query_lens=np.zeros(0), seq_lens=np.zeros(0),
            seq_lens_exact=np.zeros(0), num_computed_tokens=np.zeros(0),
            is_prefilling=np.zeros(0), block_table=np.zeros((0, 0)),
            slot_mapping=np.zeros(0), token_to_req=np.zeros(0),
            num_reqs=0, num_actual_tokens=0, num_scheduled_reqs=0, num_scheduled_tokens=0,
            max_query_len=0, max_seq_len=0, num_decodes=0, num_decode_tokens=0, num_extends=0,
            num_extend_tokens=0, num_prefills=0, num_prefill_tokens=0,
            is_decode_first=True, all_exact=True, slot_mapping_exact=True,
        ),
    ),
    # an empty batch padded to a bucket: every token is padding
    "empty_padded": (
        dict(query_lens=[], seq_lens=[], block_table=np.zeros((0, 2), np.int32), block_size=16,
             padded_num_reqs=3, padded_num_tokens=4),
        dict(
            query_start_loc=[0, 0, 0, 0], query_lens=[0, 0, 0], seq_lens=[0, 0, 0],
            block_table=np.zeros((3, 2)), slot_mapping=[-1, -1, -1, -1], token_to_req=[3, 3, 3, 3],
            num_reqs=3, num_actual_tokens=4, num_scheduled_reqs=0, num_scheduled_tokens=0,
            max_query_len=0, max_seq_len=0, num_decodes=0,
        ),
    ),
    # decodes at 5, 16 and 17 tokens: positions 4 (col 0), 15 (col 0, last offset), 16 (col 1)
    "all_decode": (
        dict(query_lens=[1, 1, 1], seq_lens=[5, 16, 17], block_table=_table([[7, 0], [3, 0], [2, 8]]),
             block_size=16),
        dict(
            query_start_loc=[0, 1, 2, 3], slot_mapping=[7 * 16 + 4, 3 * 16 + 15, 8 * 16 + 0],
            num_computed_tokens=[4, 15, 16], max_query_len=1, max_seq_len=17,
            num_decodes=3, num_decode_tokens=3, num_extends=0, num_prefills=0, is_decode_first=True,
        ),
    ),
    # page 2: row 0 positions 0,1,2 -> 5*2+0, 5*2+1, 6*2+0; row 1 positions 0,1 -> 18, 19
    "all_prefill": (
        dict(query_lens=[3, 2], seq_lens=[3, 2], block_table=_table([[5, 6], [9, 0]]), block_size=2),
        dict(
            query_start_loc=[0, 3, 5], slot_mapping=[10, 11, 12, 18, 19], token_to_req=[0, 0, 0, 1, 1],
            num_computed_tokens=[0, 0], num_decodes=0, num_extends=0, num_prefills=2,
            num_prefill_tokens=5, max_query_len=3, max_seq_len=3, is_decode_first=True,
        ),
    ),
    # page 4, positions 6..9: col 1 (id 2) offsets 2,3 -> 10, 11; col 2 (id 3) offsets 0,1 -> 12, 13
    "one_request": (
        dict(query_lens=[4], seq_lens=[10], block_table=_table([[1, 2, 3]]), block_size=4),
        dict(
            query_start_loc=[0, 4], slot_mapping=[10, 11, 12, 13], num_computed_tokens=[6],
            num_decodes=0, num_extends=1, num_extend_tokens=4, num_prefills=0,
            max_query_len=4, max_seq_len=10,
        ),
    ),
    # exact page boundaries, page 16: row 0 position 15 (last slot of col 0), row 1 positions
    # 16..31 (all of col 1), row 2 positions 0..15 (all of col 0); the table is exactly wide enough
    "page_boundaries": (
        dict(query_lens=[1, 16, 16], seq_lens=[16, 32, 16], block_table=_table([[4, 0], [5, 6], [7, 0]]),
             block_size=16),
        dict(
            slot_mapping=[4 * 16 + 15, *range(6 * 16, 7 * 16), *range(7 * 16, 8 * 16)],
            query_start_loc=[0, 1, 17, 33], num_decodes=1, num_extends=1, num_prefills=1,
            num_extend_tokens=16, num_prefill_tokens=16,
        ),
    ),
    # block_size 1: the slot is the page id itself. row 0 positions 1,2 -> ids 8, 7; row 1
    # position 1 -> id 6
    "block_size_1": (
        dict(query_lens=[2, 1], seq_lens=[3, 2], block_table=_table([[9, 8, 7], [5, 6, 0]]), block_size=1),
        dict(slot_mapping=[8, 7, 6], num_computed_tokens=[1, 1], num_extends=1, num_decodes=1,
             is_decode_first=False),
    ),
    # row 2 is an upper bound (async spec decode): its slot is unknown on the host -> -1;
    # row 0 position 9 -> col 2 (id 3) offset 1 -> 13; row 1 positions 2,3 -> col 0 (id 4) -> 18, 19
    "inexact": (
        dict(query_lens=[1, 2, 1], seq_lens=[10, 4, 7], block_table=_table([[1, 2, 3], [4, 0, 0], [5, 6, 0]]),
             block_size=4, seq_lens_exact=[True, True, False]),
        dict(
            slot_mapping=[13, 18, 19, -1], seq_lens=[10, 4, 7], seq_lens_exact=[True, True, False],
            num_computed_tokens=[9, 2, 6], all_exact=False, slot_mapping_exact=False, max_seq_len=10,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(HAND_CASES))
def test_hand_cases(name):
    kwargs, expected = HAND_CASES[name]
    batch = attnsync.Batch(**kwargs)
    md = attnsync.build(batch)
    assert_matches(md, expected)
    # the brute-force reference must agree with the same hand values
    ref = brute_force_common(batch)
    for key, want in expected.items():
        if key == "slot_mapping_exact":
            continue
        if isinstance(want, bool | int):
            assert ref[key] == want, key
        else:
            np.testing.assert_array_equal(ref[key], np.asarray(want).astype(ref[key].dtype), err_msg=key)
    assert_same_as_brute_force(batch)


def test_split_with_threshold_and_is_prefilling():
    # threshold 3: row 0 (1 token) decode; row 1 (3 tokens, still prefilling) short extend;
    # row 2 (2 tokens, prompt done) decode; row 3 (5 tokens, no context) prefill.
    batch = attnsync.Batch(
        query_lens=[1, 3, 2, 5], seq_lens=[5, 9, 4, 5], block_table=np.ones((4, 1), np.int32),
        block_size=16, is_prefilling=[False, True, False, True],
    )
    md = attnsync.build(batch, decode_threshold=3)
    assert (md.num_decodes, md.num_decode_tokens) == (2, 3)
    assert (md.num_extends, md.num_extend_tokens) == (1, 3)
    assert (md.num_prefills, md.num_prefill_tokens) == (1, 5)
    assert md.is_decode_first is False  # the decode at row 2 follows an extend
    assert md.decode_threshold == 3
    np.testing.assert_array_equal(md.is_prefilling, [False, True, False, True])
    assert_same_as_brute_force(batch, decode_threshold=3)
    # threshold 1: rows 1 and 2 have more than one token and context -> long extends
    md1 = attnsync.build(batch)
    assert (md1.num_decodes, md1.num_extends, md1.num_prefills) == (1, 2, 1)
    assert md1.is_decode_first is True
    assert_same_as_brute_force(batch, decode_threshold=1)


def test_without_is_prefilling_short_rows_are_decodes():
    batch = attnsync.Batch(query_lens=[2, 1], seq_lens=[9, 4], block_table=np.ones((2, 1), np.int32),
                           block_size=16)
    md = attnsync.build(batch, decode_threshold=2)
    assert (md.num_decodes, md.num_decode_tokens, md.num_extends) == (2, 3, 0)
    np.testing.assert_array_equal(md.is_prefilling, [False, False])


def test_backend_name_and_option_pass_through():
    batch = attnsync.Batch(**MIXED)
    a = attnsync.build(batch)
    b = attnsync.build(batch, backend="common", decode_threshold=1)
    assert isinstance(a, attnsync.CommonMetadata) and isinstance(b, attnsync.CommonMetadata)
    for field in dataclasses.fields(a):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))
    c = attnsync.build(batch, decode_threshold=5)  # every row has <= 5 tokens
    assert c.num_decodes == 4


def test_metadata_is_frozen():
    md = attnsync.build(attnsync.Batch(**MIXED))
    with pytest.raises(dataclasses.FrozenInstanceError):
        md.max_seq_len = 1
    with pytest.raises(ValueError, match="read-only"):
        md.slot_mapping[0] = 0


def test_build_does_not_alias_caller_arrays():
    """The batch must not freeze or alias the caller's own (persistent) buffers."""
    seq_buffer = np.zeros(8, dtype=np.int32)
    seq_buffer[:2] = [17, 3]
    query = np.array([1, 3], dtype=np.int32)
    table = np.array([[4, 9], [2, 0]], dtype=np.int32)
    batch = attnsync.Batch(query_lens=query, seq_lens=seq_buffer[:2], block_table=table, block_size=16)
    md = attnsync.build(batch)
    seq_buffer[:2] = [99, 99]  # the scheduler rewrites its buffer for the next step
    query[0] = 2
    table[0, 1] = 5
    np.testing.assert_array_equal(batch.seq_lens, [17, 3])
    np.testing.assert_array_equal(md.seq_lens, [17, 3])
    np.testing.assert_array_equal(md.slot_mapping, [9 * 16, 2 * 16, 2 * 16 + 1, 2 * 16 + 2])


# --------------------------------------------------------------------------------------------
# Hypothesis: >= 500 random batches against the brute force.


@settings(max_examples=500, deadline=None)
@given(kwargs=batch_kwargs(), decode_threshold=st.sampled_from([1, 1, 2, 4]))
def test_random_batches_match_brute_force(kwargs, decode_threshold):
    batch = attnsync.Batch(**kwargs)
    assert_same_as_brute_force(batch, decode_threshold=decode_threshold)


@settings(max_examples=200, deadline=None)
@given(kwargs=batch_kwargs(), decode_threshold=st.sampled_from([1, 2]))
def test_without_slots_every_other_field_is_the_same(kwargs, decode_threshold):
    """`build_common(slots=False)` (for flex's captured step, whose graph derives the slots)
    differs from the full build only in `slot_mapping`: shared read-only zeros of its shape."""
    batch = attnsync.Batch(**kwargs)
    full = _spec.build_common(batch, decode_threshold=decode_threshold)
    lite = _spec.build_common(batch, decode_threshold=decode_threshold, slots=False)
    for field in dataclasses.fields(full):
        want, got = getattr(full, field.name), getattr(lite, field.name)
        if field.name == "slot_mapping":
            assert got.shape == want.shape and got.dtype == want.dtype and not got.any()
            assert not got.flags.writeable
        elif isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want, err_msg=field.name)
            assert got.dtype == want.dtype and not got.flags.writeable, field.name
        else:
            assert got == want and type(got) is type(want), field.name


@settings(max_examples=100, deadline=None)
@given(kwargs=batch_kwargs(inexact=False))
def test_invariants(kwargs):
    """Structural facts that follow from the definitions, independent of the reference."""
    md = attnsync.build(attnsync.Batch(**kwargs))
    qsl = md.query_start_loc
    assert qsl[0] == 0 and (np.diff(qsl) >= 0).all()
    np.testing.assert_array_equal(np.diff(qsl), md.query_lens)
    assert qsl[-1] == md.num_scheduled_tokens <= md.num_actual_tokens
    assert md.slot_mapping.shape == (md.num_actual_tokens,)
    real = md.token_to_req < md.num_reqs
    assert real.sum() == md.num_scheduled_tokens
    assert (md.slot_mapping[real] >= 0).all() and (md.slot_mapping[~real] == -1).all()
    # every slot lies in the page its row's table names, at the token's offset
    bs = md.block_size
    rows = md.token_to_req[real]
    pages = md.slot_mapping[real] // bs
    np.testing.assert_array_equal((md.block_table[rows] == pages[:, None]).any(axis=1), True)
    assert (md.num_computed_tokens == md.seq_lens - md.query_lens).all()


@pytest.mark.parametrize("page", [1, 3, 7, 16, 64])
@pytest.mark.parametrize("layout", ["contiguous", "fortran", "padded"])
def test_one_token_per_row_slots_equal_brute_force(page, layout):
    """One-token rows' slots (power-of-two and other page sizes, any table layout, padding)
    against the brute force and the slot formula written out."""
    rng = np.random.default_rng(page)
    n, width = 9, 5
    seq = rng.integers(1, width * page + 1, n)
    table = rng.integers(0, 1000, (n, width))
    if layout == "fortran":
        table = np.asfortranarray(table)  # a caller's table need not be C-contiguous
    extra = dict(padded_num_reqs=12, padded_num_tokens=15) if layout == "padded" else {}
    batch = attnsync.Batch(query_lens=np.ones(n, np.int64), seq_lens=seq, block_table=table, block_size=page, **extra)
    md = attnsync.build(batch)
    want = brute_force_common(batch)["slot_mapping"]
    np.testing.assert_array_equal(md.slot_mapping, want)
    positions = seq - 1
    np.testing.assert_array_equal(md.slot_mapping[:n], table[np.arange(n), positions // page] * page + positions % page)
    assert md.slot_mapping.dtype == np.int32 and not md.slot_mapping.flags.writeable


def test_batch_any_prefilling():
    base = dict(query_lens=[1, 4], seq_lens=[9, 4], block_table=[[3, 5], [7, 0]], block_size=8)
    assert attnsync.Batch(**base).any_prefilling is False
    assert attnsync.Batch(**base, is_prefilling=[False, False]).any_prefilling is False
    assert attnsync.Batch(**base, is_prefilling=[False, True]).any_prefilling is True


def test_prefix_mask_table_matches_the_compare():
    for width in (0, 1, 7, 128):
        table = _fields._prefix_masks(width)
        assert table.shape == (width + 1, width) and table.dtype == np.bool_ and not table.flags.writeable
        pages = np.arange(width + 1, dtype=np.int32)
        np.testing.assert_array_equal(table.take(pages, axis=0), np.arange(width) < pages[:, None])
        np.testing.assert_array_equal(_fields.prefix_mask(pages, width), np.arange(width) < pages[:, None])
    wide = np.array([0, 3000, 5000], np.int32)  # wider than the cached tables: the compare itself
    np.testing.assert_array_equal(_fields.prefix_mask(wide, 5000), np.arange(5000) < wide[:, None])
    assert _spec.prefix_mask is _fields.prefix_mask  # (flex imports it from _spec)


def test_arange_is_a_cached_read_only_prefix():
    """The shared [0, n) behind a decode step's query_start_loc and token_to_req: read-only,
    the same object for a length seen before, any length (no module state is rebound)."""
    for length in (0, 1, 2, 3, 4097, 5000, 70000):
        got = _fields.arange(length)
        assert got.dtype == np.int32 and got.tolist() == list(range(length)) and not got.flags.writeable
        assert _fields.arange(length) is got
    assert np.shares_memory(_fields.arange(5000), _fields.arange(6000))  # one base per power of two
    batch = attnsync.Batch(query_lens=np.ones(3, np.int32), seq_lens=[4, 9, 1], block_table=[[1], [2], [3]],
                           block_size=16)
    md = attnsync.build(batch)
    assert md.query_start_loc.tolist() == [0, 1, 2, 3] and md.token_to_req.tolist() == [0, 1, 2]
    assert np.shares_memory(md.query_start_loc, md.token_to_req)
