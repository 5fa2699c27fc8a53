"""Bad input a new user meets: refused with the field, the value, what was expected and the fix.

`Batch(check="full")` checks what the pages mean (page 0 is the padding page, a written page is
the writer's own); the default level does no per-page work and still refuses what costs nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnsync
from attnsync import SpecError
from attnsync._validate import MAX_PADDED_REQS, MAX_PADDED_TOKENS


def kwargs(**changes):
    base = dict(query_lens=[1, 1], seq_lens=[9, 9], block_table=[[3, 5], [7, 8]], block_size=8)
    base.update(changes)
    return base


PAGE_CASES = [
    ("decode token in page 0", dict(block_table=[[3, 0], [7, 8]]),
     r"block_table: row 0 writes its new tokens at positions \[8, 9\) into block_table\[0, 1\] = 0, "
     r"page 0, the padding page.*Fix: allocate a page"),
    ("context in page 0", dict(block_table=[[0, 5], [7, 8]]),
     r"block_table: row 0 \(seq_len 9\) reads positions \[0, 8\) from block_table\[0, 0\] = 0, page 0.*Fix"),
    ("two rows write one slot", dict(block_table=[[3, 8], [7, 8]]),
     r"block_table: row 0 writes its new tokens into page 8 \(block_table\[0, 1\]\), and row 1 writes it "
     r"too \(block_table\[1, 1\]\): both write cache slot 64, two tokens into one slot.*Fix"),
    ("row writes a page another row reads", dict(seq_lens=[9, 16], block_table=[[3, 5], [7, 5]]),
     r"block_table: row 0 writes its new tokens into page 5 \(block_table\[0, 1\]\), and row 1 also "
     r"holds it \(block_table\[1, 1\]\); rows may share pages they only read.*Fix: give each row"),
    ("a row's own tokens write one slot", dict(query_lens=[9, 1], seq_lens=[16, 9], block_table=[[5, 5], [7, 8]]),
     r"block_table: row 0 writes its new tokens into page 5 \(block_table\[0, 0\]\), and the same row "
     r"writes it too \(block_table\[0, 1\]\): both write cache slot 47"),
]


@pytest.mark.parametrize("name, changes, message", PAGE_CASES, ids=[c[0] for c in PAGE_CASES])
def test_full_check_refuses_pages_that_are_wrong(name, changes, message):
    attnsync.Batch(**kwargs(**changes))  # the default level does no per-page work
    with pytest.raises(SpecError, match=message):
        attnsync.Batch(**kwargs(**changes), check="full")


def test_full_check_accepts_shared_read_only_prefix_pages():
    # rows 0 and 1 share page 3 (a cached prefix) and write their own pages 5 and 8
    batch = attnsync.Batch(**kwargs(block_table=[[3, 5], [3, 8]]), check="full")
    assert attnsync.build(batch).slot_mapping.tolist() == [40, 64]


def test_full_check_skips_inexact_rows_and_ignores_columns_past_the_live_pages():
    # row 1's host length is an upper bound: where its token goes is unknown on the host
    attnsync.Batch(**kwargs(block_table=[[3, 5, 0], [7, 5, 5]], seq_lens_exact=[True, False]), check="full")
    with pytest.raises(SpecError, match=r"row 0 writes .* page 5"):
        attnsync.Batch(**kwargs(block_table=[[3, 5, 0], [7, 5, 5]]), check="full")


@pytest.mark.parametrize("level", ["Full", "", None, 1])
def test_unknown_check_level(level):
    with pytest.raises((SpecError, TypeError), match=r"check: .*expected one of \['fast', 'full'\]"):
        attnsync.Batch(**kwargs(), check=level)


def _brute_force_refuses(q, s, table, bs):
    """The full check's rule by token positions: a written slot in page 0 or also held by any
    other live (row, position), or a live position in page 0."""
    owners: dict[int, list[tuple[int, int]]] = {}
    for r in range(len(q)):
        for pos in range(s[r]):
            owners.setdefault(int(table[r][pos // bs]), []).append((r, pos))
    if 0 in owners:
        return True
    for r in range(len(q)):
        for pos in range(s[r] - q[r], s[r]):
            page = int(table[r][pos // bs])
            if any(rr != r or pp // bs != pos // bs for rr, pp in owners[page]):
                return True
    return False


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_full_check_matches_brute_force(data):
    bs = data.draw(st.sampled_from([1, 2, 4]))
    rows = data.draw(st.integers(1, 4))
    q = [data.draw(st.integers(0, 5)) for _ in range(rows)]
    s = [qq + data.draw(st.integers(0, 6)) for qq in q]
    width = max(-(-x // bs) for x in s) + 1
    table = [[data.draw(st.integers(0, 6)) for _ in range(width)] for _ in range(rows)]
    refused = False
    try:
        attnsync.Batch(query_lens=q, seq_lens=s, block_table=table, block_size=bs, check="full")
    except SpecError as error:
        assert str(error).startswith("block_table: row ") and "Fix:" in str(error)
        refused = True
    assert refused == _brute_force_refuses(q, s, table, bs)


def test_masked_arrays_are_refused_not_read_past_their_mask():
    with pytest.raises(TypeError, match=r"query_lens: expected a plain array, received a numpy masked array.*mask.*Fix"):
        attnsync.Batch(**kwargs(query_lens=np.ma.array([1, 1], mask=[0, 1])))
    with pytest.raises(TypeError, match=r"block_table: expected a plain array, received a numpy masked array"):
        attnsync.Batch(**kwargs(block_table=np.ma.array([[3, 5], [7, 8]], mask=[[0, 0], [0, 1]])))
    with pytest.raises(TypeError, match=r"seq_lens_exact: expected a plain array"):
        attnsync.Batch(**kwargs(seq_lens_exact=np.ma.array([True, True], mask=[0, 1])))


@pytest.mark.parametrize("field, value, kind", [
    ("query_lens", (x for x in [1, 1]), r"a one-shot iterator \(generator\)"),
    ("seq_lens", map(int, [9, 9]), r"a one-shot iterator \(map\)"),
    ("query_lens", {1, 2}, r"an unordered set"),
    ("seq_lens", {9: 1, 8: 2}, r"an unordered dict"),
    ("block_table", iter([[3, 5], [7, 8]]), r"a one-shot iterator \(list_iterator\)"),
])
def test_iterators_and_unordered_containers_are_named(field, value, kind):
    with pytest.raises(TypeError, match=rf"{field}: expected a list, a numpy array or a CPU tensor, received {kind}.*Fix: pass `list\(...\)`"):
        attnsync.Batch(**kwargs(**{field: value}))


def test_huge_padding_is_refused_before_anything_is_allocated():
    with pytest.raises(SpecError, match=rf"padded_num_tokens: 2147483647 tokens, expected at most {MAX_PADDED_TOKENS} .*Fix"):
        attnsync.Batch(**kwargs(padded_num_tokens=2**31 - 1))
    with pytest.raises(SpecError, match=rf"padded_num_reqs: 2147483646 rows, expected at most {MAX_PADDED_REQS} .*Fix"):
        attnsync.Batch(**kwargs(padded_num_reqs=2**31 - 2))
    # the limits themselves are accepted, and real rows and tokens are never limited
    batch = attnsync.Batch(**kwargs(padded_num_reqs=MAX_PADDED_REQS, padded_num_tokens=MAX_PADDED_TOKENS))
    assert (batch.padded_num_reqs, batch.padded_num_tokens) == (MAX_PADDED_REQS, MAX_PADDED_TOKENS)
