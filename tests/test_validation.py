"""Every malformed input is refused at the boundary with the right error type and a message
that names the field and says how to fix it; nothing is staged after a refusal; a fuzz test
mutates valid batches >= 1000 times and accepts only SpecError/TypeError naming the field.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import batch_kwargs

import attnsync
from attnsync import SpecError
from attnsync._batch import decode_first_error, require_decode_first

GOOD = dict(
    query_lens=[1, 3],
    seq_lens=[17, 3],
    block_table=[[4, 9], [2, 0]],
    block_size=16,
)


def batch(**changes):
    return attnsync.Batch(**{**GOOD, **changes})


class FakeDeviceArray:
    """Looks like a CUDA tensor: has `.device`; reading it would be a device-to-host sync."""

    device = "cuda:0"
    shape = (2,)
    dtype = np.int32

    def __array__(self, *args, **kwargs):  # pragma: no cover - must never be called
        raise AssertionError("a device array was read on the host")


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)


# --------------------------------------------------------------------------------------------
# Lengths and shapes


@pytest.mark.parametrize("field", ["query_lens", "seq_lens"])
def test_negative_lengths(field):
    with pytest.raises(SpecError, match=rf"{field}: expected every value >= 0, received -2 at index 1.*Fix"):
        batch(**{field: [3, -2]})


def test_query_len_above_seq_len():
    with pytest.raises(SpecError, match=r"query_lens: row 1 has query_len 4 > seq_len 3") as info:
        batch(query_lens=[1, 4])
    assert "Fix: pass seq_lens = num_computed_tokens + query_lens" in str(info.value)


def test_block_table_too_narrow():
    # row 0 needs ceil(17 / 16) = 2 pages
    with pytest.raises(SpecError, match=r"block_table: row 0 needs 2 pages for seq_len 17.*only 1 col") as info:
        batch(block_table=[[4], [2]])
    assert "Fix: widen the table to at least 2 columns" in str(info.value)


def test_block_table_exactly_wide_enough_at_a_page_boundary():
    ok = batch(seq_lens=[16, 3], block_table=[[4], [2]])  # 16 tokens fit one page of 16
    assert ok.block_table.shape == (2, 1)
    with pytest.raises(SpecError, match="block_table: row 0 needs 2 pages"):
        batch(seq_lens=[17, 3], block_table=[[4], [2]])


def test_negative_page_ids():
    with pytest.raises(SpecError, match=r"block_table: expected every value >= 0, received -1 at index \(1, 1\).*Fix"):
        batch(block_table=[[4, 9], [2, -1]])


def test_page_id_outside_the_cache():
    with pytest.raises(SpecError, match=r"block_table: page id 9 .*num_cache_pages=9.*Fix: page ids must be below"):
        batch(num_cache_pages=9)
    assert batch(num_cache_pages=10).num_reqs == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(seq_lens=[17, 3, 5]), r"seq_lens: expected one value per request \(2, the length of query_lens\), received 3.*Fix"),
        (dict(seq_lens=[17]), r"seq_lens: expected one value per request \(2, .*received 1"),
        (dict(block_table=[[4, 9]]), r"block_table: expected 2 rows \(one per request\), received shape \(1, 2\).*Fix"),
        (dict(is_prefilling=[False, False, True]), r"is_prefilling: expected shape \(2,\).*received \(3,\).*Fix"),
        (dict(seq_lens_exact=[True]), r"seq_lens_exact: expected shape \(2,\).*received \(1,\).*Fix"),
        (dict(query_lens=[[1, 3]]), r"query_lens: expected 1 dimension\(s\), received shape \(1, 2\).*Fix"),
        (dict(seq_lens=17), r"seq_lens: expected 1 dimension\(s\), received shape \(\).*Fix"),
        (dict(block_table=[4, 9]), r"block_table: expected 2 dimension\(s\), received shape \(2,\).*Fix"),
        (dict(block_table=[[[4, 9]], [[2, 0]]]), r"block_table: expected 2 dimension\(s\).*Fix"),
    ],
)
def test_mismatched_lengths_and_shapes(changes, message):
    with pytest.raises(SpecError, match=message):
        batch(**changes)


# --------------------------------------------------------------------------------------------
# dtypes: floats, NaN and bools posing as ints


INT_ARRAY_FIELDS = {
    "query_lens": [1, 3],
    "seq_lens": [17, 3],
    "block_table": [[4, 9], [2, 0]],
}


@pytest.mark.parametrize("field", sorted(INT_ARRAY_FIELDS))
@pytest.mark.parametrize(
    ("convert", "message"),
    [
        (lambda v: np.asarray(v, dtype=np.float64), r"received floats.*Fix: convert to an integer dtype"),
        (lambda v: np.asarray(v, dtype=np.float32), r"received floats.*Fix: convert to an integer dtype"),
        (lambda v: _with_nan(v), r"received NaN.*Fix: convert to an integer dtype"),
        (lambda v: np.asarray(v) > 0, r"received booleans.*Fix: pass integer counts, not a mask"),
        (lambda v: _one_bool(v), r"received a bool among the values.*Fix: pass integer counts, not a mask"),
        (lambda v: _one_float(v), r"received floats.*Fix"),
        (lambda v: np.asarray(v).astype(str), r"expected an integer array"),
        (lambda v: _one_none(v), r"found element None.*Fix"),
    ],
    ids=["float64", "float32", "nan", "bool_array", "bool_in_list", "float_in_list", "str", "none_in_list"],
)
def test_int_fields_refuse_non_integers(field, convert, message):
    with pytest.raises(TypeError, match=rf"^{field}: expected integers|^{field}: expected an integer array") as info:
        batch(**{field: convert(INT_ARRAY_FIELDS[field])})
    assert info.match(message)


def _with_nan(value):
    arr = np.asarray(value, dtype=np.float64)
    arr.flat[0] = math.nan
    return arr


def _replace_first(value, item):
    value = [list(row) if isinstance(row, list) else row for row in value]
    if isinstance(value[0], list):
        value[0][0] = item
    else:
        value[0] = item
    return value


def _one_bool(value):
    return _replace_first(value, True)


def _one_float(value):
    return _replace_first(value, 1.5)


def _one_none(value):
    return _replace_first(value, None)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (True, TypeError, r"block_size: expected a Python int, received True.*bool and float are not accepted"),
        (16.0, TypeError, r"block_size: expected a Python int, received 16.0.*Fix: pass an int"),
        (np.float32(16), TypeError, r"block_size: expected a Python int.*Fix: pass an int"),
        (math.nan, TypeError, r"block_size: expected a Python int, received nan.*Fix"),
        ("16", TypeError, r"block_size: expected a Python int.*Fix"),
        (0, SpecError, r"block_size: expected an int >= 1, received 0. Fix: pass block_size >= 1"),
        (-16, SpecError, r"block_size: expected an int >= 1, received -16. Fix: pass block_size >= 1"),
        (2**31, SpecError, r"block_size: expected an int <= 2147483647, received 2147483648. Fix"),
    ],
)
def test_block_size(value, error, message):
    with pytest.raises(error, match=message):
        batch(block_size=value)


def test_numpy_integer_block_size_is_accepted():
    assert batch(block_size=np.int64(16)).block_size == 16
    assert type(batch(block_size=np.int64(16)).block_size) is int


@pytest.mark.parametrize("field", ["seq_lens_exact", "is_prefilling"])
@pytest.mark.parametrize(
    "value", [[1, 0], np.array([1.0, 0.0]), ["yes", "no"]], ids=["ints", "floats", "strings"]
)
def test_bool_fields_refuse_non_bools(field, value):
    with pytest.raises(TypeError, match=rf"^{field}: expected booleans.*Fix: pass a bool array"):
        batch(**{field: value})


# --------------------------------------------------------------------------------------------
# Padding and int32 range


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(padded_num_reqs=1), r"padded_num_reqs: 1 is smaller than the batch's 2 requests. Fix: choose a bucket >= 2"),
        (dict(padded_num_tokens=3), r"padded_num_tokens: 3 is smaller than the batch's 4 tokens. Fix: choose a bucket >= 4"),
        (dict(padded_num_reqs=-1), r"padded_num_reqs: expected an int >= 0, received -1. Fix"),
        (dict(padded_num_tokens=2**31), r"padded_num_tokens: expected an int <= 2147483647.*Fix"),
        (dict(padded_num_reqs=2**31), r"padded_num_reqs: expected an int <= 2147483646.*Fix"),
    ],
)
def test_padding_too_small_or_out_of_range(changes, message):
    with pytest.raises(SpecError, match=message):
        batch(**changes)


@pytest.mark.parametrize("field", ["padded_num_reqs", "padded_num_tokens"])
@pytest.mark.parametrize("value", [True, 4.0])
def test_padding_must_be_int(field, value):
    with pytest.raises(TypeError, match=rf"{field}: expected a Python int.*Fix"):
        batch(**{field: value})


@pytest.mark.parametrize(
    ("changes", "field", "bad"),
    [
        (dict(seq_lens=[2**31, 3]), "seq_lens", 2**31),
        (dict(seq_lens=np.array([2**40, 3], dtype=np.int64)), "seq_lens", 2**40),
        (dict(seq_lens=np.array([2**40, 3], dtype=np.uint64)), "seq_lens", 2**40),
        (dict(seq_lens=[2**63, 3]), "seq_lens", 2**63),  # numpy would read this list as floats
        (dict(seq_lens=[2**64, 3]), "seq_lens", 2**64),  # and this one as objects
        (dict(query_lens=[1, -(2**31) - 1]), "query_lens", -(2**31) - 1),
        (dict(block_table=[[4, 2**35], [2, 0]]), "block_table", 2**35),
    ],
)
def test_values_beyond_int32(changes, field, bad):
    with pytest.raises(SpecError, match=rf"{field}: value {bad} does not fit int32.*Fix"):
        batch(**changes)


def test_giant_page_id_times_block_size_beyond_int32():
    # page 2**26 at block size 64: slot ids reach 2**32 - 1
    with pytest.raises(SpecError, match=r"block_table: page id 67108864 at block_size 64 gives slot ids beyond int32.*Fix"):
        batch(block_table=[[4, 2**26], [2, 0]], block_size=64)
    # the largest page whose slots still fit is accepted and its slots are exact
    last_page = (2**31) // 64 - 1
    md = attnsync.build(batch(query_lens=[1, 1], seq_lens=[64, 1], block_table=[[last_page], [0]], block_size=64))
    assert int(md.slot_mapping[0]) == last_page * 64 + 63 == 2**31 - 1


def test_total_tokens_beyond_int32():
    with pytest.raises(SpecError, match=r"query_lens: the total 4294967294 does not fit int32"):
        attnsync.Batch(query_lens=[2**31 - 1] * 2, seq_lens=[2**31 - 1] * 2,
                       block_table=np.zeros((2, 1), np.int32), block_size=2**31 - 1)


# --------------------------------------------------------------------------------------------
# Device arrays, exactness, order, backends, options


@pytest.mark.parametrize("field", ["query_lens", "seq_lens", "block_table", "seq_lens_exact", "is_prefilling"])
def test_device_array_refused_without_reading_it(field):
    with pytest.raises(TypeError, match=rf"{field}: expected host data.*device 'cuda:0'.*Fix: pass the host copy"):
        batch(**{field: FakeDeviceArray()})


def test_cpu_tensor_like_is_read():
    class CpuArray:
        device = "cpu"

        def __array__(self, dtype=None, copy=None):
            return np.array([1, 3], dtype=np.int32)

    assert batch(query_lens=CpuArray()).num_tokens == 4


def test_inexact_prefilling_row_refused():
    with pytest.raises(SpecError, match=r"seq_lens_exact: row 0 is prefilling but marked inexact.*Fix: mark it exact"):
        batch(seq_lens_exact=[False, True], is_prefilling=[True, False])


def test_inexact_row_without_context_refused():
    # row 1 has seq_len 3 == query_len 3: no context, a prefill, whose length is always exact
    with pytest.raises(SpecError, match=r"seq_lens_exact: row 1 is marked inexact but has no context.*Fix: mark the row exact"):
        batch(seq_lens_exact=[True, False])
    assert batch(seq_lens_exact=[False, True]).seq_lens_exact.tolist() == [False, True]


def test_unordered_batch_refused_by_decode_first_check():
    unordered = attnsync.Batch(query_lens=[5, 1], seq_lens=[5, 9], block_table=[[1], [2]], block_size=16)
    with pytest.raises(SpecError, match=r"batch: backend 'flashinfer' needs decode-first order.*row 1 is a decode row after a prefill row") as info:
        require_decode_first(unordered, decode_threshold=1, backend="flashinfer", strict=False)
    assert "Fix: `perm, batch = attnsync.reorder(batch, decode_threshold=1)`" in str(info.value)
    _, ordered = attnsync.reorder(unordered)
    require_decode_first(ordered, decode_threshold=1, backend="flashinfer", strict=False)


def test_builders_raise_the_decode_first_error_itself():
    """`decode_first_error` is the error `require_decode_first` raises (None for an ordered
    batch), and the FlashInfer builder raises that same error directly, once."""
    unordered = attnsync.Batch(query_lens=[1, 5, 1], seq_lens=[9, 5, 9], block_table=[[1], [2], [3]], block_size=16)
    error = decode_first_error(unordered, decode_threshold=1, backend="flashinfer", strict=False)
    assert isinstance(error, SpecError) and "row 2 is a decode row after a prefill row" in str(error)
    with pytest.raises(SpecError) as info:
        require_decode_first(unordered, decode_threshold=1, backend="flashinfer", strict=False)
    assert str(info.value) == str(error)
    with pytest.raises(SpecError) as built:
        attnsync.build(unordered, backend="flashinfer")
    assert str(built.value) == str(error) and built.value.__context__ is None
    ordered = attnsync.reorder(unordered)[1]
    assert decode_first_error(ordered, decode_threshold=1, backend="flashinfer", strict=False) is None


def test_decode_first_strict_needs_all_regions_sorted():
    # a prefill before a long extend: fine when only decodes must lead, refused when strict
    rows = attnsync.Batch(query_lens=[1, 5, 4], seq_lens=[9, 5, 8], block_table=[[1], [2], [3]], block_size=16)
    require_decode_first(rows, decode_threshold=1, backend="turboquant", strict=False)
    with pytest.raises(SpecError, match=r"backend 'mamba' needs decode-first order.*row 2 is a long extend row after a prefill row"):
        require_decode_first(rows, decode_threshold=1, backend="mamba", strict=True)


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(SpecError, match=r"backend: unknown backend 'nope'; expected one of \[.*'common'.*\]"):
        attnsync.build(batch(), backend="nope")
    with pytest.raises(TypeError, match=r"backend: expected a name"):
        attnsync.build(batch(), backend=3)


def test_unknown_build_option_lists_valid_ones():
    with pytest.raises(SpecError, match=r"build: backend 'common' has no option\(s\) \['bogus'\]; its options are \['decode_threshold'\]"):
        attnsync.build(batch(), bogus=1)


@pytest.mark.parametrize(("value", "error"), [(0, SpecError), (True, TypeError), (1.0, TypeError)])
def test_bad_decode_threshold(value, error):
    with pytest.raises(error, match="decode_threshold: expected"):
        attnsync.build(batch(), decode_threshold=value)


def test_build_and_reorder_need_a_batch():
    with pytest.raises(TypeError, match=r"build: expected an attnsync.Batch.*Fix"):
        attnsync.build(GOOD)
    with pytest.raises(TypeError, match=r"reorder: expected an attnsync.Batch"):
        attnsync.reorder(GOOD)


def test_batch_is_keyword_only():
    with pytest.raises(TypeError):
        attnsync.Batch([1, 3], [17, 3], [[4, 9], [2, 0]], 16)


# --------------------------------------------------------------------------------------------
# Nothing is staged after a refusal


def test_torch_lowering_stages_nothing_after_a_refusal():
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    class SpyStager(ast.Stager):
        def __init__(self):
            super().__init__("cpu", depth=2)
            self.calls = {"stage": 0, "lower": 0}

        def stage(self, layout, arrays):  # fresh memory: device seq_lens
            self.calls["stage"] += 1
            return super().stage(layout, arrays)

        def lower(self, plan, values):  # the ring
            self.calls["lower"] += 1
            return super().lower(plan, values)

    stager = SpyStager()
    inexact = attnsync.build(batch(seq_lens_exact=[False, True]))
    with pytest.raises(SpecError, match="seq_lens"):
        ast.lower(inexact, "cpu", stager=stager)
    with pytest.raises(SpecError, match="seq_lens"):
        ast.lower(inexact, "cpu", stager=stager, seq_lens=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="seq_lens"):
        ast.lower(inexact, "cpu", stager=stager, seq_lens=np.zeros(2, np.int32))
    with pytest.raises(TypeError, match="lower: expected metadata"):
        ast.lower(batch(), "cpu", stager=stager)
    assert stager.calls == {"stage": 0, "lower": 0}  # nothing staged, no ring slot taken
    ast.lower(attnsync.build(batch()), "cpu", stager=stager)  # the spy does see a good lowering
    assert stager.calls == {"stage": 0, "lower": 1}
    ast.lower(attnsync.build(batch()), "cpu", stager=stager, seq_lens=torch.tensor([3, 17], dtype=torch.int32))
    assert stager.calls == {"stage": 1, "lower": 1}


def test_jax_lowering_transfers_nothing_after_a_refusal(monkeypatch):
    jax = pytest.importorskip("jax")
    import dataclasses

    from attnsync.adapters import jax as asj

    calls = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: calls.append(1) or real(*a, **k))
    md = attnsync.build(batch())
    with pytest.raises(SpecError, match=r"slot_mapping: the batch has inexact rows.*Fix"):
        asj.lower(attnsync.build(batch(seq_lens_exact=[False, True])))
    wide = dataclasses.replace(md, seq_lens=np.array([2**31, 3], dtype=np.int64))
    with pytest.raises(SpecError, match=r"seq_lens: value 2147483648 does not fit int32.*JAX.*Fix"):
        asj.lower(wide)
    assert calls == []
    asj.lower(md, jax.devices("cpu")[0])
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# Fuzz: mutate valid batches; only SpecError/TypeError naming the mutated field may come out.

INT_FIELDS = ("query_lens", "seq_lens", "block_table")
BOOL_FIELDS = ("seq_lens_exact", "is_prefilling")
SCALAR_FIELDS = ("block_size", "padded_num_reqs", "padded_num_tokens")

INT_MUTATIONS = (
    "float", "float_element", "nan", "bool", "bool_element", "str", "complex", "negative",
    "overflow", "overflow_element", "extra_dim", "drop_dim", "length", "device",
)
BOOL_MUTATIONS = ("ints", "floats", "length", "extra_dim", "device")
SCALAR_MUTATIONS = ("bool", "float", "nan", "negative", "overflow", "str", "array", "too_small")


def _mutate_int(arr: np.ndarray, how: str, draw) -> object:
    arr = np.array(arr, dtype=np.int64)
    index = tuple(draw(st.integers(0, n - 1)) for n in arr.shape)
    if how == "float":
        return arr.astype(draw(st.sampled_from([np.float64, np.float32, np.float16])))
    if how == "float_element":
        out = arr.tolist()
        _set(out, index, float(arr[index]) + draw(st.sampled_from([0.0, 0.5])))
        return out
    if how == "nan":
        out = arr.astype(np.float64)
        out[index] = math.nan
        return out
    if how == "bool":
        return arr > draw(st.integers(-1, 3))
    if how == "bool_element":
        out = arr.tolist()
        _set(out, index, draw(st.booleans()))
        return out
    if how == "str":
        return arr.astype(str)
    if how == "complex":
        return arr.astype(np.complex64)
    if how == "negative":
        arr[index] = -draw(st.integers(1, 2**31))
        return arr
    if how == "overflow":
        arr[index] = draw(st.sampled_from([2**31, 2**40, 2**63 - 1, -(2**31) - 1, -(2**63)]))
        return arr
    if how == "overflow_element":
        out = arr.tolist()
        _set(out, index, draw(st.sampled_from([2**31, 2**63, 2**64, 2**100, -(2**70)])))
        return out
    if how == "extra_dim":
        return arr[..., None]
    if how == "drop_dim":
        return arr[index[:-1]] if arr.ndim > 1 else arr[index]
    if how == "length":
        if draw(st.booleans()) or arr.shape[0] == 0:
            return np.concatenate([arr, arr[:1] if arr.shape[0] else np.zeros((1, *arr.shape[1:]), np.int64)])
        return arr[:-1]
    if how == "device":
        return FakeDeviceArray()
    raise AssertionError(how)


def _set(nested: list, index: tuple, value) -> None:
    for i in index[:-1]:
        nested = nested[i]
    nested[index[-1]] = value


def _mutate_bool(value, num_reqs: int, how: str, draw) -> object:
    arr = np.broadcast_to(np.asarray(value, dtype=bool), (num_reqs,)).copy()
    if how == "ints":
        return arr.astype(draw(st.sampled_from([np.int32, np.int64, np.uint8])))
    if how == "floats":
        return arr.astype(np.float64)
    if how == "length":
        return np.concatenate([arr, [True]]) if draw(st.booleans()) or num_reqs == 0 else arr[:-1]
    if how == "extra_dim":
        return arr[:, None]
    if how == "device":
        return FakeDeviceArray()
    raise AssertionError(how)


def _mutate_scalar(field: str, kwargs: dict, how: str, draw) -> object:
    if how == "bool":
        return draw(st.booleans())
    if how == "float":
        return float(draw(st.integers(1, 64)))
    if how == "nan":
        return math.nan
    if how == "negative":
        return -draw(st.integers(1, 2**40))
    if how == "overflow":
        return draw(st.sampled_from([2**31, 2**40, 2**64]))
    if how == "str":
        return "16"
    if how == "array":
        return np.array([16])
    if how == "too_small":
        if field == "block_size":
            return 0
        floor = len(kwargs["query_lens"]) if field == "padded_num_reqs" else int(np.sum(kwargs["query_lens"]))
        return floor - draw(st.integers(1, floor)) if floor else -1
    raise AssertionError(how)


@st.composite
def malformed(draw):
    kwargs = draw(batch_kwargs(min_reqs=1, max_reqs=6, kinds=("decode", "prefill", "extend")))
    group = draw(st.sampled_from(["int", "int", "bool", "scalar"]))
    if group == "int":
        field = draw(st.sampled_from(INT_FIELDS))
        how = draw(st.sampled_from(INT_MUTATIONS))
        kwargs[field] = _mutate_int(kwargs[field], how, draw)
    elif group == "bool":
        field = draw(st.sampled_from(BOOL_FIELDS))
        how = draw(st.sampled_from(BOOL_MUTATIONS))
        current = kwargs.get(field)
        kwargs[field] = _mutate_bool(True if current is None else current, len(kwargs["query_lens"]), how, draw)
    else:
        field = draw(st.sampled_from(SCALAR_FIELDS))
        how = draw(st.sampled_from(SCALAR_MUTATIONS))
        kwargs[field] = _mutate_scalar(field, kwargs, how, draw)
    return field, how, kwargs


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=malformed())
def test_fuzz_malformed_batches_name_the_field(case):
    field, how, kwargs = case
    with pytest.raises((SpecError, TypeError)) as info:
        attnsync.Batch(**kwargs)
    assert type(info.value) in (SpecError, TypeError), (how, type(info.value))
    assert field in str(info.value), (field, how, str(info.value))
    assert "Fix" in str(info.value) or type(info.value) is TypeError, (field, how, str(info.value))
