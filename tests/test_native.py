"""The compiled twin (attnsync/_native.c) against the numpy forms it stands in for, bit for bit.

The one module that exercises the compiled twin. Every field function of attnsync/_fields.py
with a compiled form is run with `attnsync._accel.native` in place and monkeypatched to None
(the numpy form, the reference) over a corpus of batches (decode, mixed, padded, inexact,
unordered, empty, power-of-two and other block sizes, wide tables) and hypothesis batches, and
the two results must agree bit for bit (values, dtype, shape, read-only). Then the builders
and `Batch` (its compiled checks, with and without `table_memory`) are compared whole, and
`pack` (the torch lowering's copies) against np.copyto.

The module must be built for these tests (pip install builds it; so does
`python -m attnsync._native_build`): a checkout where it is missing fails here rather than
skipping, since CI always has a compiler.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import batch_kwargs

import attnsync
from attnsync import _accel, _fields

native = _accel.native
if native is None and os.environ.get("ATTNSYNC_PURE_NUMPY", "0") in ("", "0"):
    pytest.fail("attnsync._native is not built: pip install -e . (or python -m attnsync._native_build)",
                pytrace=False)
pytestmark = pytest.mark.skipif(native is None, reason="ATTNSYNC_PURE_NUMPY is set: the numpy forms run")

# The field functions of attnsync/_fields.py that have a compiled form (the same names in
# attnsync._native).
FIELD_FUNCTIONS = ("slot_mapping", "token_to_req", "region_split", "paged_kv_indptr",
                   "paged_kv_last_page_len", "paged_kv_indices")


def numpy_form(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with the compiled twin switched off (the numpy forms run)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_accel, "native", None)
        return fn(*args, **kwargs)


def test_every_compiled_field_function_is_listed():
    """What attnsync._native exports: the field functions compared below, Batch's checks and
    the lowering's pack; nothing else (a new compiled form needs its comparison here)."""
    exported = {name for name in dir(native) if not name.startswith("_") and callable(getattr(native, name))}
    assert exported == {*FIELD_FUNCTIONS, "check_batch", "pack"}
    assert all(callable(getattr(_fields, name)) for name in FIELD_FUNCTIONS)


# --------------------------------------------------------------------------------------------
# The corpus: named batches covering every shape the builders meet


def _batch(query_lens, seq_lens, block_size, *, width=None, seed=0, **kw) -> attnsync.Batch:
    """A batch with random page ids (slots within int32), at least as wide as its rows need."""
    q, s = np.asarray(query_lens, np.int32), np.asarray(seq_lens, np.int32)
    need = int((-(-s.astype(np.int64) // block_size)).max(initial=0))
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 1 << 20, (len(s), max(need, width or 0))).astype(np.int32)
    return attnsync.Batch(query_lens=q, seq_lens=s, block_table=table, block_size=block_size, **kw)


def _corpus() -> list[tuple[str, attnsync.Batch]]:
    rng = np.random.default_rng(7)
    cases = []
    for page in (1, 3, 16, 64, 100):
        seq = rng.integers(1, 40 * page, 24)
        cases.append((f"decode/page{page}", _batch(np.ones(24), seq, page)))
        q = np.where(np.arange(24) < 18, 1, rng.integers(2, 70, 24))
        context = np.where(np.arange(24) < 18, seq, np.where(np.arange(24) % 2, 0, rng.integers(1, 300, 24)))
        prefilling = np.arange(24) >= 18
        cases.append((f"mixed/page{page}", _batch(q, q + context, page, is_prefilling=prefilling)))
        cases.append((f"padded/page{page}", _batch(q, q + context, page, padded_num_reqs=31, padded_num_tokens=int(q.sum()) + 13)))
        exact = np.arange(24) % 3 != 0  # decode rows with context marked inexact
        cases.append((f"inexact/page{page}", _batch(np.ones(24), seq + 1, page, seq_lens_exact=exact)))
        cases.append((f"unordered/page{page}", _batch(q[::-1], (q + context)[::-1], page)))
    wide = rng.integers(100, 8193, 256)
    cases += [
        ("decode/256x512", _batch(np.ones(256), wide, 16, width=512)),
        ("decode/padded-rows", _batch(np.ones(8), rng.integers(1, 200, 8), 16, padded_num_reqs=12, padded_num_tokens=12)),
        ("decode/padded-tokens", _batch(np.ones(8), rng.integers(1, 200, 8), 16, padded_num_tokens=20)),
        ("wide/4x4096", _batch([1, 5, 0, 2], [3, 40, 7, 9], 16, width=4096)),
        ("speculative", _batch([3, 3, 1, 4], [50, 61, 9, 33], 16, seq_lens_exact=[True, False, True, False])),
        ("zero-query-rows", _batch([0, 2, 0, 1], [5, 2, 0, 17], 16)),
        ("empty", _batch([], [], 16)),
        ("empty/padded", _batch([], [], 16, padded_num_reqs=4, padded_num_tokens=8)),
        ("one-token-one-page", _batch([1], [1], 1)),
    ]
    return cases


CORPUS = _corpus()


def field_calls(batch: attnsync.Batch, threshold: int = 1):
    """(name, the field function's args, its compiled form's args) of every compiled field
    function's call for `batch`, as the builders make them (attnsync/_spec.py's common_fields,
    attnsync/backends/flashinfer.py's build)."""
    q, s, table, page = batch.query_lens, batch.seq_lens, batch.block_table, batch.block_size
    rows, tokens, total, longest = batch.padded_num_reqs, batch.padded_num_tokens, batch.num_tokens, batch.max_query_len
    seq_lens, block_table = _fields.padded(s, rows, 0), _fields.padded(table, rows, 0)
    indptr = numpy_form(_fields.paged_kv_indptr, seq_lens, page)
    exact = None if batch.all_exact else batch.seq_lens_exact
    return [
        ("slot_mapping", (q, s, table, page, tokens, exact), (q, s, table, page, exact, tokens)),
        ("slot_mapping", (q, s, table, page, tokens, batch.seq_lens_exact),  # an all-True array too
         (q, s, table, page, batch.seq_lens_exact, tokens)),
        ("token_to_req", (q, total, longest, rows, tokens), (q, rows, tokens)),
        ("region_split", (q, s, batch.is_prefilling, threshold, total, longest), (q, s, batch.is_prefilling, threshold)),
        ("paged_kv_indptr", (seq_lens, page), (seq_lens, page)),
        ("paged_kv_last_page_len", (seq_lens, page), (seq_lens, page)),
        ("paged_kv_indices", (block_table, indptr), (block_table, indptr)),
    ]


def assert_same_values(got, want, what: str) -> None:
    """Bit for bit: arrays of one dtype, shape and values, both read-only; else equal values of
    one type (tuples of Python ints and a bool for region_split)."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), what
        assert (got.dtype, got.shape) == (want.dtype, want.shape), what
        assert got.tobytes() == want.tobytes(), what
        assert not got.flags.writeable and not want.flags.writeable, what
        assert got.flags.c_contiguous, what
    else:
        assert got == want, what
        assert type(got) is type(want), what
        if isinstance(want, tuple):
            for g, w in zip(got, want):
                assert type(g) is type(w), what
                if isinstance(w, tuple):
                    assert all(type(x) is int for x in (*g, *w)), what


def compare(batch: attnsync.Batch, threshold: int = 1) -> None:
    for name, args, compiled_args in field_calls(batch, threshold):
        fn = getattr(_fields, name)
        # the compiled form takes the builders' arrays (None would mean: left to numpy), and
        # the field function's result is the compiled one's where it has no shortcut of its own
        compiled = getattr(native, name)(*compiled_args)
        assert compiled is not None, name
        want = numpy_form(fn, *args)
        assert_same_values(compiled, want, name)
        assert_same_values(fn(*args), want, name)


@pytest.mark.parametrize("threshold", [1, 2, 4])
@pytest.mark.parametrize("case", [c for _, c in CORPUS], ids=[n for n, _ in CORPUS])
def test_field_functions_compiled_equal_numpy_over_the_corpus(case, threshold):
    compare(case, threshold)


@settings(max_examples=300, deadline=None)
@given(kwargs=batch_kwargs(block_sizes=(1, 2, 3, 16, 64, 100)), threshold=st.integers(1, 5))
def test_field_functions_compiled_equal_numpy_over_random_batches(kwargs, threshold):
    compare(attnsync.Batch(**kwargs), threshold)


@pytest.mark.parametrize("case", [c for _, c in CORPUS], ids=[n for n, _ in CORPUS])
def test_slot_mapping_is_the_slot_formula(case):
    """Against the formula written per token (brute force): -1 for padding and inexact rows."""
    q, s, t, page = case.query_lens, case.seq_lens, case.block_table, case.block_size
    want = []
    for r in range(case.num_reqs):
        for p in range(int(s[r] - q[r]), int(s[r])):
            want.append(int(t[r, p // page]) * page + p % page if case.seq_lens_exact[r] else -1)
    want += [-1] * (case.padded_num_tokens - len(want))
    got = _fields.slot_mapping(q, s, t, page, case.padded_num_tokens, None if case.all_exact else case.seq_lens_exact)
    assert got.tolist() == want


def test_compiled_forms_leave_other_layouts_and_dtypes_to_numpy():
    """A strided table, int64 lengths or a non-bool mask: the compiled form returns None and the
    field function's numpy form gives the same values as for plain int32 input."""
    batch = _batch([1, 3, 2], [9, 40, 2], 16, width=5)
    q, s, t = batch.query_lens, batch.seq_lens, batch.block_table
    fortran = np.asfortranarray(t)
    assert native.slot_mapping(q, s, fortran, 16, None, 6) is None
    assert native.paged_kv_indices(fortran, _fields.paged_kv_indptr(s, 16)) is None
    assert native.paged_kv_indptr(s.astype(np.int64), 16) is None
    assert native.paged_kv_last_page_len(s[::-1][::-1].astype(np.int16), 16) is None
    assert native.token_to_req(q.astype(np.int64), 3, 6) is None
    assert native.region_split(q, s, np.zeros(3, np.int32), 1) is None
    assert native.slot_mapping(q, s, t, 16, np.ones(3, np.int32), 6) is None
    assert_same_values(_fields.slot_mapping(q, s, fortran, 16, 6), _fields.slot_mapping(q, s, t, 16, 6), "slots")
    indptr = _fields.paged_kv_indptr(s, 16)
    assert_same_values(_fields.paged_kv_indices(fortran, indptr), _fields.paged_kv_indices(t, indptr), "indices")
    assert _fields.paged_kv_indptr(s.astype(np.int64), 16).tolist() == indptr.tolist()


def test_compiled_forms_refuse_what_would_read_or_write_outside_their_buffers():
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    q, s = np.array([1, 1], np.int32), np.array([1, 49], np.int32)
    with pytest.raises(IndexError, match="row 1 .* does not fit its 3 pages of 16"):
        native.slot_mapping(q, s, table, 16, None, 2)
    with pytest.raises(ValueError, match="row 0 .*or the 1 tokens"):
        native.slot_mapping(np.array([2, 0], np.int32), np.array([2, 0], np.int32), table, 16, None, 1)
    with pytest.raises(ValueError, match="seq_len 1"):
        native.slot_mapping(np.array([2, 0], np.int32), np.array([1, 0], np.int32), table, 16, None, 4)
    with pytest.raises(ValueError, match="at least n rows"):
        native.slot_mapping(np.ones(3, np.int32), np.ones(3, np.int32), table, 16, None, 3)
    with pytest.raises(ValueError, match="page must be >= 1"):
        native.slot_mapping(q, q, table, 0, None, 2)
    with pytest.raises(ValueError, match="row 1's 2 tokens do not fit the 2 tokens"):
        native.token_to_req(np.array([1, 2], np.int32), 2, 2)
    with pytest.raises(ValueError, match="row 1 has length -3"):
        native.paged_kv_indptr(np.array([4, -3], np.int32), 16)
    with pytest.raises(ValueError, match="row 1 has length -3"):
        native.paged_kv_last_page_len(np.array([4, -3], np.int32), 16)
    with pytest.raises(ValueError, match=r"row 1's pages \[1, 5\) do not fit its 3 columns and an output of 5"):
        native.paged_kv_indices(table, np.array([0, 1, 5], np.int32))
    with pytest.raises(ValueError, match="indptr must have R\\+1 entries from 0"):
        native.paged_kv_indices(table, np.array([1, 1, 2], np.int32))
    with pytest.raises(ValueError, match=r"row 0's pages \[0, 2\) do not fit .* an output of 1"):
        native.paged_kv_indices(table, np.array([0, 2, 1], np.int32))
    with pytest.raises(ValueError, match="threshold must be >= 1"):
        native.region_split(q, q, None, 0)


def test_a_page_total_beyond_int32_is_named_by_the_numpy_form():
    seq = np.full(2, 2**31 - 1, np.int32)
    assert native.paged_kv_indptr(seq, 1) is None  # (the total overflows: left to numpy)
    with pytest.raises(attnsync.SpecError, match="spans 4294967294 KV pages at block_size 1"):
        _fields.paged_kv_indptr(seq, 1)


def test_compiled_results_are_read_only_views_of_their_own_memory():
    """What the builders share between metadata objects cannot be written by any holder, and
    two results never share memory."""
    batch = _batch([1, 1, 5], [9, 17, 5], 16)
    a = _fields.slot_mapping(batch.query_lens, batch.seq_lens, batch.block_table, 16, 7)
    b = _fields.slot_mapping(batch.query_lens, batch.seq_lens, batch.block_table, 16, 7)
    assert not np.shares_memory(a, b) and a.tolist() == b.tolist()
    with pytest.raises(ValueError, match="read-only"):
        a[0] = 1
    with pytest.raises(ValueError):
        a.setflags(write=True)


# --------------------------------------------------------------------------------------------
# Builders and Batch whole, compiled twin on and off


def assert_same_metadata(a, b) -> None:
    assert type(a) is type(b)
    assert a.__dict__.keys() == b.__dict__.keys()
    for name, value in a.__dict__.items():
        other = b.__dict__[name]
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and value.shape == other.shape, name
            assert value.flags.writeable is other.flags.writeable is False, name
            np.testing.assert_array_equal(value, other, err_msg=name)
        else:
            assert value == other and type(value) is type(other), name


# every backend (its options beyond decode_threshold): each takes its common fields, slots and
# page counts from attnsync/_fields.py
BACKENDS = {"common": {}, "flashinfer": {}, "flex": {}, "tree": None, "turboquant": {}, "mamba": {},
            "triton": {"num_q_heads": 8, "num_kv_heads": 2, "head_dim": 64}}


def _builds(batch: attnsync.Batch, threshold: int):
    """Every backend's metadata for `batch`, or its refusal's message."""
    out = {}
    for backend, extra in BACKENDS.items():
        options = {} if extra is None else {**extra, "decode_threshold": threshold}
        try:
            out[backend] = attnsync.build(batch, backend, **options)
        except attnsync.SpecError as exc:
            out[backend] = str(exc)
    return out


def compare_builds(batch: attnsync.Batch, threshold: int) -> None:
    got, want = _builds(batch, threshold), numpy_form(_builds, batch, threshold)
    for backend in BACKENDS:
        if isinstance(want[backend], str):
            assert got[backend] == want[backend], backend
        else:
            assert_same_metadata(got[backend], want[backend])


@pytest.mark.parametrize("threshold", [1, 2])
@pytest.mark.parametrize("case", [c for _, c in CORPUS], ids=[n for n, _ in CORPUS])
def test_builds_are_the_same_with_and_without_the_compiled_twin(case, threshold):
    compare_builds(case, threshold)
    compare_builds(attnsync.reorder(case, decode_threshold=threshold)[1], threshold)


@settings(max_examples=200, deadline=None)
@given(kwargs=batch_kwargs(), threshold=st.integers(1, 3))
def test_random_builds_are_the_same_with_and_without_the_compiled_twin(kwargs, threshold):
    batch = attnsync.Batch(**kwargs)
    compare_builds(batch, threshold)
    compare_builds(attnsync.reorder(batch, decode_threshold=threshold)[1], threshold)


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
    for name in FIELD_FUNCTIONS + ("pack",):
        setattr(shim, name, getattr(native, name))
    shim.check_batch = lambda *args: calls.append(1) or real(*args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_accel, "native", shim)
        got = outcome()
    want = numpy_form(outcome)
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




# --------------------------------------------------------------------------------------------
# Batch(table_memory=...) with the compiled checks and with the numpy ones


class Buffers:
    """A stand-in `table_memory`: hands out `offer(shape)` and records every request."""

    def __init__(self, offer):
        self.offer, self.asked = offer, []

    def table_buffer(self, shape):
        self.asked.append(shape)
        return self.offer(shape)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("table", ["int32", "int64", "fortran", "list"])
def test_table_memory_buffer_holds_the_table_on_both_paths(compiled, table):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 1000, (5, 7)).astype(np.int32)
    given = {"int32": values, "int64": values.astype(np.int64), "fortran": np.asfortranarray(values),
             "list": values.tolist()}[table]
    offered = []
    memory = Buffers(lambda shape: offered.append(np.full(shape, -7, np.int32)) or offered[-1])

    def make():
        return attnsync.Batch(query_lens=[1] * 5, seq_lens=[3, 9, 1, 17, 2], block_table=given, block_size=4,
                              table_memory=memory)

    batch = make() if compiled else numpy_form(make)
    assert memory.asked == [(5, 7)]  # asked once, whichever path checked the table
    assert batch.block_table is offered[0]  # the buffer itself holds the table
    np.testing.assert_array_equal(batch.block_table, values)
    assert not batch.block_table.flags.writeable and batch.block_table.dtype == np.int32
    plain = attnsync.Batch(query_lens=[1] * 5, seq_lens=[3, 9, 1, 17, 2], block_table=values, block_size=4)
    assert_same_metadata(attnsync.build(batch, "flashinfer"), numpy_form(attnsync.build, plain, "flashinfer"))


def test_batch_is_the_same_with_and_without_the_compiled_checks_on_a_refusal_with_table_memory():
    """A refused batch raises the same error both ways; the buffer it was offered is simply
    dropped (nothing to give back)."""
    memory = Buffers(lambda shape: np.zeros(shape, np.int32))

    def outcome():
        try:
            attnsync.Batch(query_lens=[1, 2], seq_lens=[5, 1], block_table=np.zeros((2, 2), np.int32),
                           block_size=4, table_memory=memory)
        except attnsync.SpecError as exc:
            return str(exc)
        raise AssertionError("accepted")

    assert outcome() == numpy_form(outcome)
    assert "query_len 2 > seq_len 1" in outcome()


# --------------------------------------------------------------------------------------------
# pack: the torch lowering's copies


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
            want = numpy_form(ast.lower, md, "cpu", stager=without_stager)
            for name, value in want.__dict__.items():
                other = got.__dict__[name]
                if isinstance(value, torch.Tensor):
                    assert value.dtype == other.dtype and value.shape == other.shape, name
                    assert torch.equal(value, other), name
                else:
                    assert value == other, name
            del got, want



# --------------------------------------------------------------------------------------------
# the switch and stale builds


def test_pure_numpy_switch():
    code = "from attnsync import _accel; print(_accel.native)"
    env = {**os.environ, "ATTNSYNC_PURE_NUMPY": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    env["ATTNSYNC_PURE_NUMPY"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "attnsync._native" in out.stdout


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


