"""The compiled twin (attnsync/_native.c) against the numpy forms it stands in for, bit for bit.

Every function is compared with its numpy form on hand cases and hypothesis inputs, and every
builder and the torch lowering are compared with the compiled module on and off
(`_accel.native = None` runs the numpy forms). The module must be built for these tests (pip
install builds it; so does `python -m attnsync._native_build`): a checkout where it is missing
fails here rather than skipping, since CI always has a compiler.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import batch_kwargs

import attnsync
from attnsync import _accel
from attnsync._spec import _decode_slots
from attnsync.backends import flashinfer as fi_backend

native = _accel.native
if native is None and os.environ.get("ATTNSYNC_PURE_NUMPY", "0") in ("", "0"):
    pytest.fail("attnsync._native is not built: pip install -e . (or python -m attnsync._native_build)",
                pytrace=False)
pytestmark = pytest.mark.skipif(native is None, reason="ATTNSYNC_PURE_NUMPY is set: the numpy forms run")


def without_native(fn, *args):
    saved, _accel.native = _accel.native, None
    try:
        return fn(*args)
    finally:
        _accel.native = saved


# --------------------------------------------------------------------------------------------
# pack


PAIRS = [  # (target dtype, source dtype): each handled by the compiled copy
    (np.int32, np.int32), (np.int64, np.int32), (np.int64, np.uint32), (np.int32, np.int64),
    (np.bool_, np.bool_), (np.float32, np.float32), (np.int64, np.int64),
]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_pack_copies_like_np_copyto(data):
    count = data.draw(st.integers(0, 5))
    targets, sources = [], []
    for _ in range(count):
        dst_type, src_type = data.draw(st.sampled_from(PAIRS))
        shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        if src_type == np.bool_:
            source = rng.integers(0, 2, shape).astype(bool)
        elif src_type == np.float32:
            source = rng.standard_normal(shape).astype(np.float32)
        else:
            info = np.iinfo(src_type)
            source = rng.integers(info.min, info.max, shape, dtype=src_type, endpoint=True)
        targets.append(np.full(shape, 7, dtype=dst_type))
        sources.append(source)
    expected = [t.copy() for t in targets]
    for want, source in zip(expected, sources):
        np.copyto(want, source, casting="unsafe")
    assert native.pack(tuple(targets), tuple(sources)) == count
    for got, want in zip(targets, expected):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "case", ["shape", "strided source", "strided target", "int16", "read-only target", "list"])
def test_pack_stops_at_a_pair_it_does_not_handle_and_leaves_it(case):
    """Everything before the pair is copied; the pair and everything after it are untouched,
    for np.copyto to do (or refuse) as numpy does."""
    first_target, first_source = np.zeros(4, np.int32), np.arange(4, dtype=np.int32)
    target, source = np.zeros(6, np.int32), np.arange(6, dtype=np.int32)
    if case == "shape":
        target = np.zeros((2, 3), np.int32)
    elif case == "strided source":
        source = np.arange(12, dtype=np.int32)[::2]
    elif case == "strided target":
        target = np.zeros(12, np.int32)[::2]
    elif case == "int16":
        source = source.astype(np.int16)
    elif case == "read-only target":
        target.setflags(write=False)
    else:
        source = list(range(6))
    last_target = np.zeros(3, np.int32)
    done = native.pack((first_target, target, last_target), (first_source, source, np.ones(3, np.int32)))
    assert done == 1
    np.testing.assert_array_equal(first_target, first_source)
    assert not np.asarray(target).any() and not last_target.any()


def test_pack_refuses_tuples_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        native.pack((np.zeros(2, np.int32),), ())
    with pytest.raises(TypeError, match="two tuples or lists"):
        native.pack(iter([np.zeros(2, np.int32)]), (np.zeros(2, np.int32),))
    target = np.zeros(2, np.int32)
    assert native.pack([target], (np.ones(2, np.int32),)) == 1 and target.tolist() == [1, 1]


# --------------------------------------------------------------------------------------------
# decode_slots


@st.composite
def tables(draw, *, min_width: int):
    """(block table int32 [R, W], page size, a generator for the rest of the case)."""
    rows, width = draw(st.integers(0, 20)), draw(st.integers(min_width, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    table = rng.integers(0, 1000, (rows, width)).astype(np.int32)
    return table, draw(st.sampled_from([1, 2, 3, 16, 64])), rng


@settings(max_examples=200, deadline=None)
@given(case=tables(min_width=1))
def test_decode_slots_equal_the_numpy_form(case):
    table, page, rng = case
    (rows, width) = table.shape
    positions = rng.integers(0, width * page, rows).astype(np.int32)
    got = _decode_slots(table, positions, page)
    want = without_native(_decode_slots, table, positions, page)
    brute = np.array([table[r, positions[r] // page] * page + positions[r] % page for r in range(rows)],
                     dtype=np.int32).reshape(rows)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, brute)


def test_decode_slots_refuse_what_would_read_outside_the_table():
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = np.empty(2, np.int32)
    with pytest.raises(IndexError, match="row 1: position 48 is outside its 3 pages of 16"):
        native.decode_slots(table, np.array([0, 48], np.int32), 16, out)
    with pytest.raises(IndexError, match="row 0: position -1"):
        native.decode_slots(table, np.array([-1, 0], np.int32), 16, out)
    with pytest.raises(TypeError, match="positions: expected a C-contiguous int32 array"):
        native.decode_slots(table, np.array([0, 1], np.int64), 16, out)
    with pytest.raises(ValueError, match="differ in rows"):
        native.decode_slots(table, np.array([0], np.int32), 16, out)
    with pytest.raises(ValueError, match="page must be >= 1"):
        native.decode_slots(table, np.array([0, 1], np.int32), 0, out)


@settings(max_examples=200, deadline=None)
@given(case=tables(min_width=1))
def test_decode_rows_equal_the_numpy_forms(case):
    """decode_rows: seq_lens - 1 then each row's slot, in one [2R] array."""
    table, page, rng = case
    (rows, width) = table.shape
    seq = rng.integers(1, width * page + 1, rows).astype(np.int32)
    out = np.full(2 * rows, 7, np.int32)
    native.decode_rows(table, seq, page, out)
    np.testing.assert_array_equal(out[:rows], seq - 1)
    np.testing.assert_array_equal(out[rows:], without_native(_decode_slots, table, seq - 1, page))


def test_decode_rows_refusals():
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = np.empty(4, np.int32)
    with pytest.raises(IndexError, match="row 1: position 48 is outside its 3 pages of 16"):
        native.decode_rows(table, np.array([1, 49], np.int32), 16, out)
    with pytest.raises(IndexError, match="row 0: position -1"):  # a row without its new token
        native.decode_rows(table, np.array([0, 1], np.int32), 16, out)
    with pytest.raises(ValueError, match="out 2R"):
        native.decode_rows(table, np.array([1, 1], np.int32), 16, np.empty(3, np.int32))
    with pytest.raises(TypeError, match="seq_lens: expected a C-contiguous int32 array"):
        native.decode_rows(table, np.array([1, 1], np.int64), 16, out)


@settings(max_examples=200, deadline=None)
@given(kwargs=batch_kwargs(kinds=("decode",), max_decode_query=1, padding=False, prefilling=False))
def test_decode_steps_with_inexact_rows_build_as_the_numpy_forms_do(kwargs):
    """The fused decode path (decode_rows) marks inexact rows' slots as padding, as numpy does."""
    batch = attnsync.Batch(**kwargs)
    assert_same_metadata(attnsync.build(batch), without_native(attnsync.build, batch))


# --------------------------------------------------------------------------------------------
# paged_kv_counts and gather_pages


def test_flashinfer_worked_case():
    """vllm-backends.md's worked values: page 16, seq_lens [0, 16, 17, 33]."""
    seq = np.array([0, 16, 17, 33], np.int32)
    table = np.array([[0, 0, 0], [5, 0, 0], [6, 7, 0], [8, 9, 10]], np.int32)
    indptr, last = np.empty(5, np.int32), np.empty(4, np.int32)
    assert native.paged_kv_counts(seq, 16, indptr, last) == 6
    assert indptr.tolist() == [0, 0, 1, 3, 6] and last.tolist() == [0, 16, 1, 1]
    indices = np.empty(6, np.int32)
    native.gather_pages(table, indptr, indices)
    assert indices.tolist() == [5, 6, 7, 8, 9, 10]


@settings(max_examples=200, deadline=None)
@given(case=tables(min_width=0))
def test_paged_kv_equals_the_numpy_form(case):
    table, page, rng = case
    (rows, width) = table.shape
    seq = rng.integers(0, width * page + 1, rows).astype(np.int32)
    got = fi_backend._paged_kv(seq, None, table, page)
    want = without_native(fi_backend._paged_kv, seq, None, table, page)
    for g, w in zip(got[:3], want[:3]):
        assert g.dtype == w.dtype == np.int32
        np.testing.assert_array_equal(g, w)
    assert got[3] == want[3] and type(got[3]) is int


def test_paged_kv_refusals():
    indptr, last = np.empty(3, np.int32), np.empty(2, np.int32)
    with pytest.raises(ValueError, match="row 1 has length -3"):
        native.paged_kv_counts(np.array([4, -3], np.int32), 16, indptr, last)
    with pytest.raises(ValueError, match="indptr must have R\\+1 entries"):
        native.paged_kv_counts(np.array([4, 3], np.int32), 16, np.empty(2, np.int32), last)
    with pytest.raises(ValueError, match="more pages than int32"):
        native.paged_kv_counts(np.full(2, 2**31 - 1, np.int32), 1, indptr, last)
    table = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError,
                       match=r"row 1's pages \[1, 5\) do not fit its 3 columns and an output of 5"):
        native.gather_pages(table, np.array([0, 1, 5], np.int32), np.empty(5, np.int32))
    with pytest.raises(ValueError, match="from 0 to len\\(out\\)"):
        native.gather_pages(table, np.array([0, 1, 2], np.int32), np.empty(5, np.int32))
    with pytest.raises(ValueError, match=r"row 0's pages \[0, 2\) do not fit .* an output of 1"):
        native.gather_pages(table, np.array([0, 2, 1], np.int32), np.empty(1, np.int32))
    with pytest.raises(TypeError, match="out: expected a C-contiguous int32 array"):
        native.gather_pages(table, np.array([0, 1, 2], np.int32), np.empty(2, np.int64))


# --------------------------------------------------------------------------------------------
# split_regions and token_slots: batches with any query lengths


@settings(max_examples=300, deadline=None)
@given(kwargs=batch_kwargs(), threshold=st.integers(1, 5))
def test_split_regions_equals_the_numpy_split(kwargs, threshold):
    """Rows and tokens per region and the decode-first flag, ordered or not, with and without
    is_prefilling, against attnsync._spec._split's numpy form."""
    from attnsync._spec import _split

    batch = attnsync.Batch(**kwargs)
    qsl = np.concatenate([[0], np.cumsum(batch.query_lens)]).astype(np.int32)
    got = _split(batch, threshold, qsl)
    want = without_native(_split, batch, threshold, qsl)
    assert [list(got[0]), list(got[1]), got[2]] == [list(want[0]), list(want[1]), want[2]]
    assert all(type(v) is int for v in (*got[0], *got[1])) and type(got[2]) is bool
    ordered = attnsync.reorder(batch, decode_threshold=threshold)[1]
    assert _split(ordered, threshold, qsl)[2] is True


@settings(max_examples=300, deadline=None)
@given(kwargs=batch_kwargs())
def test_token_slots_equal_the_numpy_forms(kwargs):
    """Every token's row and slot (-1 for inexact rows), from the whole common build with the
    compiled module on and off: mixed, padded, inexact and empty rows."""
    batch = attnsync.Batch(**kwargs)
    assert_same_metadata(attnsync.build(batch), without_native(attnsync.build, batch))


def test_token_slots_refusals():
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    q, done = np.array([2, 1], np.int32), np.array([0, 48], np.int32)
    owner, out = np.empty(3, np.int32), np.empty(3, np.int32)
    with pytest.raises(IndexError, match="row 1: position 48 is outside its 3 pages of 16"):
        native.token_slots(q, done, table, 16, None, owner, out)
    with pytest.raises(ValueError, match="the rows hold 3 tokens, the outputs 4"):
        native.token_slots(q, np.zeros(2, np.int32), table, 16, None, np.empty(4, np.int32), np.empty(4, np.int32))
    with pytest.raises(ValueError, match="row 0's 2 tokens do not fit the 1 outputs"):
        native.token_slots(q, np.zeros(2, np.int32), table, 16, None, np.empty(1, np.int32), np.empty(1, np.int32))
    with pytest.raises(TypeError, match="exact: expected a C-contiguous bool array of 2 entries"):
        native.token_slots(q, np.zeros(2, np.int32), table, 16, np.ones(3, bool), owner, out)
    native.token_slots(q, np.array([0, 16], np.int32), table, 16, np.array([True, False]), owner, out)
    assert owner.tolist() == [0, 0, 1] and out.tolist() == [0, 1, -1]
    with pytest.raises(ValueError, match="threshold must be >= 1"):
        native.split_regions(q, q, None, 0)
    with pytest.raises(TypeError, match="is_prefilling: expected a C-contiguous bool array"):
        native.split_regions(q, q, np.zeros(2, np.int32), 1)


# --------------------------------------------------------------------------------------------
# builders and the torch lowering, compiled module on and off


def assert_same_metadata(a, b) -> None:
    assert type(a) is type(b)
    for name, value in a.__dict__.items():
        other = b.__dict__[name]
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype, name
            assert value.flags.writeable is other.flags.writeable is False, name
            np.testing.assert_array_equal(value, other, err_msg=name)
        else:
            assert value == other and type(value) is type(other), name


@settings(max_examples=300, deadline=None)
@given(kwargs=batch_kwargs(inexact=False, kinds=("decode", "prefill", "extend", "empty")),
       decode_only=st.booleans())
def test_builds_are_the_same_with_and_without_the_compiled_module(kwargs, decode_only):
    if decode_only:  # the one-token rows that take the compiled slot path
        kwargs["query_lens"] = np.minimum(kwargs["query_lens"], 1)
        kwargs["seq_lens"] = np.maximum(kwargs["seq_lens"], kwargs["query_lens"])
        kwargs.pop("is_prefilling", None)
    batch = attnsync.Batch(**kwargs)
    for backend in ("common", "flashinfer"):
        try:
            want = without_native(attnsync.build, attnsync.reorder(batch)[1], backend)
        except attnsync.SpecError:
            continue
        assert_same_metadata(attnsync.build(attnsync.reorder(batch)[1], backend), want)


@settings(max_examples=300, deadline=None)
@given(kwargs=batch_kwargs(min_reqs=1, kinds=("decode",), max_decode_query=1, inexact=False, prefilling=False,
                           padding=False, max_extra_width=40, block_sizes=(1, 2, 16, 64)),
       threshold=st.integers(1, 3))
def test_flashinfer_decode_steps_build_in_one_call_as_the_general_path_does(kwargs, threshold):
    """FlashInfer's decode-step path (`_decode_step`, one decode_rows call) against the general
    path with the numpy forms, field for field, types included; and against the general path
    with the compiled module (a table too large for the one-call path)."""
    batch = attnsync.Batch(**kwargs)
    assert batch.max_query_len == 1 and batch.num_tokens == batch.num_reqs  # the path's own case
    got = attnsync.build(batch, "flashinfer", decode_threshold=threshold)
    assert_same_metadata(got, without_native(
        lambda: attnsync.build(batch, "flashinfer", decode_threshold=threshold)))
    saved = fi_backend._ONE_BLOCK_ENTRIES
    fi_backend._ONE_BLOCK_ENTRIES = -1  # every table too large: the general path, compiled pieces
    try:
        assert_same_metadata(got, attnsync.build(batch, "flashinfer", decode_threshold=threshold))
    finally:
        fi_backend._ONE_BLOCK_ENTRIES = saved


def test_decode_rows_with_pages_equals_paged_kv():
    rng = np.random.default_rng(5)
    table = rng.integers(0, 1000, (6, 5)).astype(np.int32)
    seq = np.array([1, 16, 17, 80, 33, 5], np.int32)
    out = np.full(4 * 6 + 1 + 30, -9, np.int32)
    total = native.decode_rows(table, seq, 16, out, True)
    indptr, indices, last, want_total = without_native(fi_backend._paged_kv, seq, None, table, 16)
    assert want_total == total == 13
    np.testing.assert_array_equal(out[12:19], indptr)
    np.testing.assert_array_equal(out[19:25], last)
    np.testing.assert_array_equal(out[25 : 25 + total], indices)
    assert (out[25 + total :] == -9).all()  # nothing written past the pages
    np.testing.assert_array_equal(out[:6], seq - 1)
    with pytest.raises(ValueError, match="row 3's 5 pages do not fit the 2 entries left in out"):
        native.decode_rows(table, seq, 16, np.empty(4 * 6 + 1 + 6, np.int32), True)
    with pytest.raises(ValueError, match="out at least 4R\\+1"):
        native.decode_rows(table, seq, 16, np.empty(24, np.int32), True)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(batch_kwargs(inexact=False), min_size=1, max_size=5))
def test_torch_lowerings_are_the_same_with_and_without_the_compiled_module(steps):
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    with_stager, without_stager = ast.Stager("cpu"), ast.Stager("cpu")
    for kwargs in steps:
        batch = attnsync.reorder(attnsync.Batch(**kwargs))[1]
        for backend in ("common", "flashinfer"):
            try:
                md = attnsync.build(batch, backend)
            except attnsync.SpecError:
                continue
            got = ast.lower(md, "cpu", stager=with_stager)
            want = without_native(lambda md=md: ast.lower(md, "cpu", stager=without_stager))
            for name, value in want.__dict__.items():
                other = got.__dict__[name]
                if isinstance(value, torch.Tensor):
                    assert value.dtype == other.dtype and value.shape == other.shape, name
                    assert torch.equal(value, other), name
                else:
                    assert value == other, name
            del got, want


def test_pure_numpy_switch():
    code = "from attnsync import _accel; print(_accel.native)"
    env = {**os.environ, "ATTNSYNC_PURE_NUMPY": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    env["ATTNSYNC_PURE_NUMPY"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "attnsync._native" in out.stdout


# --------------------------------------------------------------------------------------------
# check_batch: Batch's array checks, happy path


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(0, 12), width=st.integers(0, 6), seed=st.integers(0, 2**32 - 1),
       spoil=st.sampled_from(["none", "negative query", "negative seq", "query > seq", "negative page",
                              "huge page", "rows"]))  # (page ids are Batch's to check: copied only)
def test_check_batch_accepts_exactly_what_the_numpy_checks_accept(rows, width, seed, spoil):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 50, rows).astype(np.int32)
    q = np.minimum(rng.integers(0, 50, rows), s).astype(np.int32)
    t = rng.integers(0, 1000, (rows, width)).astype(np.int32)
    if rows and spoil == "negative query":
        q[rng.integers(rows)] = -1
    elif rows and spoil == "negative seq":
        s[rng.integers(rows)] = -3
    elif rows and spoil == "query > seq":
        r = rng.integers(rows)
        q[r] = s[r] + 1
    elif rows and width and spoil == "negative page":
        t[rng.integers(rows), rng.integers(width)] = -5
    elif rows and width and spoil == "huge page":
        t[rng.integers(rows), rng.integers(width)] = 2**31 - 1
    elif spoil == "rows":
        t = np.zeros((rows + 1, width), np.int32)
    outs = (np.full_like(q, 7), np.full_like(s, 7), np.full_like(t, 7))
    got = native.check_batch(q, s, t, *outs)
    valid = (q >= 0).all() and (s >= 0).all() and (q <= s).all() and t.shape[0] == rows
    if not valid:
        assert got is None
        return
    want = (int(q.sum()), int(q.max(initial=0)), int(s.max(initial=0)))
    assert got[:3] == want
    # the table's largest entry seen as uint32 (a negative id is >= 2**31), found while copying
    assert got[3] is None or got[3] == int(t.view(np.uint32).max(initial=0))
    for out, source in zip(outs, (q, s, t)):
        np.testing.assert_array_equal(out, source)


@pytest.mark.parametrize("entries", [1, 15, 16, 17, 31, 33, 1000, 256 * 512])
@pytest.mark.parametrize("plant", ["none", "largest", "negative"])
def test_check_batch_finds_the_largest_page_id_while_copying(entries, plant):
    """The vector copy-and-max (16 entries a pass, then a tail) against numpy's uint32 max, with
    the largest or a negative id planted anywhere, the last entry included."""
    rng = np.random.default_rng(entries)
    rows = 256 if entries % 256 == 0 else 1
    t = rng.integers(0, 1 << 20, entries).astype(np.int32).reshape(rows, -1)
    for position in (0, entries - 1, int(rng.integers(entries))):
        table = t.copy()
        if plant != "none":
            table.flat[position] = (1 << 30) if plant == "largest" else -3
        q = np.zeros(rows, np.int32)
        outs = (np.empty_like(q), np.empty_like(q), np.empty_like(table))
        got = native.check_batch(q, q.copy(), table, *outs)
        np.testing.assert_array_equal(outs[2], table)
        assert got[3] is None or got[3] == int(table.view(np.uint32).max())


def test_check_batch_leaves_what_is_not_plain_int32_to_numpy():
    q, s, t = np.ones(2, np.int32), np.full(2, 3, np.int32), np.zeros((2, 1), np.int32)
    outs = (np.empty_like(q), np.empty_like(s), np.empty_like(t))
    assert native.check_batch(q.astype(np.int64), s, t, *outs) is None
    assert native.check_batch(q, s, np.zeros((4, 2), np.int32)[::2], *outs) is None
    assert native.check_batch([1, 1], s, t, *outs) is None
    with pytest.raises(TypeError, match="outputs must be writable int32"):
        native.check_batch(q, s, t, outs[0], outs[1], np.empty((2, 1), np.int64))
    with pytest.raises(ValueError, match="each output must have its input's shape"):
        native.check_batch(q, s, t, outs[0], outs[1], np.empty((1, 2), np.int32))


@settings(max_examples=300, deadline=None)
@given(kwargs=batch_kwargs(), mutation=st.sampled_from(
    ["none", "negative query", "query > seq", "negative page", "narrow table", "int64", "list",
     "huge page", "page beyond cache"]), pick=st.integers(0, 2**16))
def test_batch_is_the_same_with_and_without_the_compiled_checks(kwargs, mutation, pick):
    """Same fields for a valid batch, the same error type and message for a spoiled one."""
    kwargs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    for name in ("query_lens", "seq_lens", "block_table"):  # a scheduler's int32: the compiled path
        kwargs[name] = kwargs[name].astype(np.int32)
    q, s, t = kwargs["query_lens"], kwargs["seq_lens"], kwargs["block_table"]
    rows = len(q)
    if rows:
        r = pick % rows
        if mutation == "negative query":
            q[r] = -1
        elif mutation == "query > seq":
            q[r] = s[r] + 1
        elif mutation == "negative page" and t.shape[1]:
            t[r, pick % t.shape[1]] = -2
        elif mutation == "huge page" and t.shape[1]:
            t[r, pick % t.shape[1]] = 2**31 - 1
        elif mutation == "narrow table" and t.shape[1]:
            kwargs["block_table"] = t[:, :-1].copy()
        elif mutation == "page beyond cache" and t.shape[1]:
            kwargs["num_cache_pages"] = max(int(t.max()), 1)
            t[r, pick % t.shape[1]] = kwargs["num_cache_pages"]
    if mutation == "int64":
        kwargs["block_table"] = kwargs["block_table"].astype(np.int64)
    elif mutation == "list":
        kwargs["query_lens"] = [int(x) for x in kwargs["query_lens"]]

    def outcome():
        try:
            batch = attnsync.Batch(**kwargs)
        except (attnsync.SpecError, TypeError) as exc:
            return type(exc), str(exc)
        return {name: (value.copy() if isinstance(value, np.ndarray) else value)
                for name, value in batch.__dict__.items()}

    calls = []
    real = native.check_batch
    shim = type("Shim", (), {})()
    for name in ("pack", "decode_slots", "paged_kv_counts", "gather_pages"):
        setattr(shim, name, getattr(native, name))
    shim.check_batch = lambda *args: calls.append(1) or real(*args)
    saved, _accel.native = _accel.native, shim
    try:
        got = outcome()
    finally:
        _accel.native = saved
    want = without_native(outcome)
    assert calls or mutation in ("int64", "list"), "the compiled checks were not reached"
    if isinstance(want, tuple):
        assert got == want
        return
    assert isinstance(got, dict) and got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[name].dtype == value.dtype and got[name].flags.writeable == value.flags.writeable
            np.testing.assert_array_equal(got[name], value, err_msg=name)
        else:
            assert got[name] == value and type(got[name]) is type(value), name


def test_a_stale_build_is_set_aside_with_a_warning():
    """A module built from an older _native.c (no or another VERSION) is not called: numpy runs,
    and a RuntimeWarning says how to rebuild."""
    code = (
        "import sys, types, warnings\n"
        "stale = types.ModuleType('attnsync._native'); stale.__file__ = '/old/_native.so'\n"
        "sys.modules['attnsync._native'] = stale\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import attnsync\n"
        "    from attnsync import _accel\n"
        "    batch = attnsync.Batch(query_lens=[1], seq_lens=[3], block_table=[[2]], block_size=4)\n"
        "    md = attnsync.build(batch, 'flashinfer')\n"
        "print(_accel.native, md.slot_mapping.tolist(), md.paged_kv_indices.tolist())\n"
        "print([str(w.message) for w in caught if w.category is RuntimeWarning])\n"
    )
    env = {**os.environ, "ATTNSYNC_PURE_NUMPY": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, second = out.stdout.splitlines()
    assert first == "None [10] [2]"
    assert f"is version 1, this attnsync calls version {_accel.NATIVE_VERSION}" in second
    assert "python -m attnsync._native_build" in second


# --------------------------------------------------------------------------------------------
# lower_step: a reused torch lowering's step in one call (attnsync/adapters/torch.py)

_MEMCPY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                           ctypes.c_void_p)
_RECORD = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_QUERY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_GET_DEVICE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int))
_LAST_ERROR = ctypes.CFUNCTYPE(ctypes.c_int)
_ERROR_STRING = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int)


class FakeRuntime:
    """The six CUDA runtime calls lower_step makes, as C callbacks that log their arguments."""

    def __init__(self, *, query=0, device=3, memcpy=0, record=0):
        self.calls = []
        self._message = ctypes.create_string_buffer(b"a fake CUDA failure")

        def log(name, result):
            def call(*args):
                self.calls.append((name, *args))
                return result
            return call

        def get_device(out):
            self.calls.append(("cudaGetDevice",))
            out[0] = device
            return 0

        self._callbacks = (  # kept alive as long as the addresses are used
            _MEMCPY(log("cudaMemcpyAsync", memcpy)), _RECORD(log("cudaEventRecord", record)),
            _QUERY(log("cudaEventQuery", query)), _GET_DEVICE(get_device),
            _LAST_ERROR(log("cudaGetLastError", 0)),
            _ERROR_STRING(lambda status: ctypes.addressof(self._message)),
        )
        self.addresses = tuple(ctypes.cast(c, ctypes.c_void_p).value for c in self._callbacks)


class Lowered:  # stands in for a lowered dataclass: an object with a __dict__
    pass


def fast_tuple(targets, sources, scalars, runtime=None):
    """A `_Reusable.fast`-shaped tuple over plain objects (its baseline still to take)."""
    lowered = Lowered()
    held = [object(), object()]
    cuda = None
    if runtime is not None:  # copy 0xD0 <- 0x40, 512 bytes, stream 0x57, event 0xE0, device 3
        cuda = runtime.addresses + (0xD0, 0x40, 512, 0x57, 0xE0, 3)
    return (lowered, held, (11, 12), lambda storage: storage * 2, [0], targets, sources, scalars,
            lowered.__dict__, cuda)


def step_case(runtime=None):
    targets = [np.zeros(3, np.int32), np.zeros(2, np.int64)]
    values = {"a": np.arange(3, dtype=np.int32), "b": np.array([-5, 6], np.int32), "n": 4, "flag": True}
    fast = fast_tuple(targets, ("a", "b"), ("n", "flag"), runtime)
    fast[4][0] = native.lower_users(fast)  # once the builder's locals are gone, as rebaseline
    return fast, targets, values


def test_lower_step_runs_the_cuda_calls_in_the_python_steps_order():
    runtime = FakeRuntime()
    fast, targets, values = step_case(runtime)
    assert native.lower_step(fast, values) == -2
    assert targets[0].tolist() == [0, 1, 2] and targets[1].tolist() == [-5, 6]  # int32 widened
    assert fast[0].__dict__ == {"n": 4, "flag": True}
    assert runtime.calls == [("cudaEventQuery", 0xE0), ("cudaGetDevice",),
                             ("cudaMemcpyAsync", 0xD0, 0x40, 512, 1, 0x57), ("cudaEventRecord", 0xE0, 0x57)]


def test_lower_step_without_cuda_packs_and_sets_the_scalars():
    fast, targets, values = step_case()
    assert native.lower_step(fast, values) == -2
    assert targets[0].tolist() == [0, 1, 2] and fast[0].__dict__ == {"n": 4, "flag": True}


@pytest.mark.parametrize("hold", ["lowered", "held tensor"])
def test_lower_step_leaves_a_held_entry_alone(hold):
    runtime = FakeRuntime()
    fast, targets, values = step_case(runtime)
    kept = fast[0] if hold == "lowered" else fast[1][1]  # one more reference, as a caller's
    assert native.lower_users(fast) == fast[4][0] + 1
    assert native.lower_step(fast, values) == -1
    assert not targets[0].any() and not fast[0].__dict__ and runtime.calls == []
    del kept
    assert native.lower_step(fast, values) == -2


def test_lower_step_counts_storage_users():
    fast, _, values = step_case()
    counts = {11: 1, 12: 1}
    fast = fast[:3] + (counts.__getitem__,) + fast[4:]
    fast[4][0] = native.lower_users(fast)
    counts[12] = 2  # a view of the buffer's memory somewhere
    assert native.lower_step(fast, values) == -1


def test_lower_step_waits_for_nothing_when_the_copy_is_pending():
    runtime = FakeRuntime(query=600)  # cudaErrorNotReady
    fast, targets, values = step_case(runtime)
    assert native.lower_step(fast, values) == -1
    assert runtime.calls == [("cudaEventQuery", 0xE0), ("cudaGetLastError",)]  # cleared, as torch does
    assert not targets[0].any() and not fast[0].__dict__


def test_lower_step_leaves_the_copy_to_torch_when_another_device_is_current():
    runtime = FakeRuntime(device=0)
    fast, targets, values = step_case(runtime)
    assert native.lower_step(fast, values) == 2  # both fields packed, then nothing
    assert targets[0].tolist() == [0, 1, 2] and not fast[0].__dict__
    assert [c[0] for c in runtime.calls] == ["cudaEventQuery", "cudaGetDevice", "cudaGetLastError"]


def test_lower_step_stops_at_a_pair_pack_does_not_handle():
    fast, targets, values = step_case(FakeRuntime())
    values["b"] = np.array([1, 2], np.int16)
    assert native.lower_step(fast, values) == 1
    assert targets[0].tolist() == [0, 1, 2] and not targets[1].any() and not fast[0].__dict__


@pytest.mark.parametrize("failing", ["cudaMemcpyAsync", "cudaEventRecord", "cudaEventQuery"])
def test_lower_step_names_a_failed_cuda_call_and_clears_its_error(failing):
    runtime = FakeRuntime(**{{"cudaMemcpyAsync": "memcpy", "cudaEventRecord": "record",
                              "cudaEventQuery": "query"}[failing]: 700})
    fast, _, values = step_case(runtime)
    with pytest.raises(RuntimeError, match=rf"{failing} failed with CUDA error 700 \(a fake CUDA failure\) "
                                           r"while lowering attnsync metadata"):
        native.lower_step(fast, values)
    assert runtime.calls[-1] == ("cudaGetLastError",)


def test_lower_step_refuses_what_is_not_a_fast_tuple():
    fast, _, values = step_case()
    with pytest.raises(TypeError, match="not a reusable lowering's fast tuple"):
        native.lower_step(fast[:-1], values)
    with pytest.raises(TypeError, match="values must be a dict"):
        native.lower_step(fast, list(values.items()))
    with pytest.raises(KeyError, match="'a'"):
        native.lower_step(fast, {"b": values["b"]})


def table_case():
    """An entry whose pinned buffer (`host`, 256 bytes) holds a 4 x 4 table at 0, field a at 64
    and b (int64) at 128, plus a host mirror of a; and a pinned table's block (512 bytes) whose
    first 64 bytes are the batch's table."""
    runtime = FakeRuntime()
    host = np.zeros(256, np.uint8)
    table_view = np.ndarray((4, 4), np.int32, host, 0)
    targets = [table_view, np.ndarray(3, np.int32, host, 64), np.ndarray(2, np.int64, host, 128),
               np.zeros(3, np.int32)]
    block = np.zeros(512, np.uint8)
    table = np.ndarray((4, 4), np.int32, block, 0)
    table[:] = np.arange(16).reshape(4, 4) + 100
    values = {"t": table, "a": np.arange(3, dtype=np.int32) + 7, "b": np.array([-5, 6], np.int32), "n": 4}
    fast = fast_tuple(targets, ("t", "a", "b", "a"), ("n",), runtime)
    fast = fast[:9] + (runtime.addresses + (0xD0, host.ctypes.data, 256, 0x57, 0xE0, 3),)
    fast[4][0] = native.lower_users(fast)
    spec = (block.ctypes.data, block.nbytes, 3, 0)  # 3 staged fields, the table first
    return runtime, fast, values, host, block, targets, spec


def test_lower_step_on_a_pinned_table_packs_after_it_and_copies_the_block():
    runtime, fast, values, host, block, targets, spec = table_case()
    before = block[:64].copy()
    assert native.lower_step(fast, values, spec) == -2
    assert not host.any()  # the entry's own buffer is not written
    assert (block[:64] == before).all()  # the table is not packed again
    assert np.ndarray(3, np.int32, block, 64).tolist() == [7, 8, 9]
    assert np.ndarray(2, np.int64, block, 128).tolist() == [-5, 6]  # widened, at b's offset
    assert targets[3].tolist() == [7, 8, 9]  # the host mirror, in its own memory
    assert fast[0].__dict__ == {"n": 4}
    assert runtime.calls == [("cudaGetDevice",),  # no wait: the entry's own buffer is not written
                             ("cudaMemcpyAsync", 0xD0, block.ctypes.data, 256, 1, 0x57), ("cudaEventRecord", 0xE0, 0x57)]


def test_lower_step_on_a_pinned_table_does_not_wait_for_the_entrys_last_copy():
    runtime, fast, values, host, block, targets, spec = table_case()
    pending = FakeRuntime(query=600)
    fast = fast[:9] + (pending.addresses + fast[9][6:],)
    fast[4][0] = native.lower_users(fast)
    assert native.lower_step(fast, values, spec) == -2
    assert "cudaEventQuery" not in [c[0] for c in pending.calls]
    assert native.lower_step(fast, values) == -1  # the entry's own buffer: its copy is pending


@pytest.mark.parametrize("case", ["pair it does not handle", "another device", "held"])
def test_lower_step_on_a_pinned_table_declines_everything_but_the_whole_step(case):
    runtime, fast, values, host, block, targets, spec = table_case()
    kept = None
    if case == "pair it does not handle":
        values["b"] = np.array([1, 2], np.int16)
    elif case == "another device":
        runtime = FakeRuntime(device=0)
        fast = fast[:9] + (runtime.addresses + fast[9][6:],)
    else:
        kept = fast[0]
    assert native.lower_step(fast, values, spec) == -1  # the caller lowers the usual way
    assert "cudaMemcpyAsync" not in [c[0] for c in runtime.calls] and not fast[0].__dict__
    del kept


def test_lower_step_on_a_pinned_table_refuses_a_block_too_small_or_a_bad_spec():
    _, fast, values, _, block, _, spec = table_case()
    with pytest.raises(ValueError, match="larger than the pinned table's block"):
        native.lower_step(fast, values, (spec[0], 200, 3, 0))  # the entry copies 256 bytes
    with pytest.raises(TypeError, match=r"\(address, capacity, num_staged, skip\), on CUDA only"):
        native.lower_step(fast, values, spec[:3])
    cpu_fast = fast[:9] + (None,)
    with pytest.raises(TypeError, match="on CUDA only"):
        native.lower_step(cpu_fast, values, spec)
    _, fast, values, host, block, _, _ = table_case()
    assert native.lower_step(fast, values, None) == -2  # None: the entry's own buffer
    assert np.ndarray(3, np.int32, host, 64).tolist() == [7, 8, 9] and not block[64:].any()


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(batch_kwargs(inexact=False), min_size=1, max_size=3), repeats=st.integers(2, 4))
def test_repeated_lowerings_take_the_compiled_step_and_equal_numpy(steps, repeats):
    """Steps repeated through one stager reuse their lowerings (the compiled lower_step);
    every lowering equals the numpy path's, and each entry reads free afterwards."""
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    stager = ast.Stager("cpu")
    mds = []
    for kwargs in steps:
        batch = attnsync.reorder(attnsync.Batch(**kwargs))[1]
        for backend in ("common", "flashinfer"):
            try:
                mds.append(attnsync.build(batch, backend))
            except attnsync.SpecError:
                pass
    for _ in range(repeats):
        for md in mds:
            got = ast.lower(md, "cpu", stager=stager)
            want = without_native(lambda md=md: ast.lower(md, "cpu", stager=ast.Stager("cpu")))
            for name, value in want.__dict__.items():
                other = got.__dict__[name]
                if isinstance(value, torch.Tensor):
                    assert value.dtype == other.dtype and torch.equal(value, other), name
                else:
                    assert value == other, name
            del got, want
    entries = [e for pool in stager._pools for e in pool[1:3] if e is not None]
    assert entries and all(e.fast is not None for e in entries)
    assert all(e.users() == e.baseline and native.lower_users(e.fast) == e.fast[4][0] for e in entries)
