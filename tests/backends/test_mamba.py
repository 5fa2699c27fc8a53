"""The ``mamba`` backend: builder against hand values and brute force, consumers against float64 oracles.

References, none of which shares code with the builder:

- values worked out on paper (the comments show the arithmetic);
- `brute_force_mamba`: a per-row Python loop over the batch, with the chunk metadata taken from a
  token walk (a global counter that cuts at request boundaries and where (c + offset) % chunk
  == 0) and checked against a second, per-request loop that follows the issue's description;
- for the consumers (torch and JAX), the sequential float64 per-token recurrences of
  `attnsync.kernels.mamba_reference`, which read the `Batch` directly.

Lowerings are compared with the numpy metadata bit for bit (torch and JAX, on the CPU).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from strategies import batch_kwargs

import attnsync
from attnsync.backends.mamba import MambaMetadata, chunk_metadata

try:  # the builder tests need numpy only; lowerings and consumers need torch
    import torch

    from attnsync.adapters import torch as torch_adapter
    from attnsync.kernels import mamba_reference as ref
except ImportError:  # pragma: no cover - CI always has torch
    torch = torch_adapter = ref = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

DEVICE_ARRAYS = [f.name for f in dataclasses.fields(MambaMetadata) if f.metadata.get("place")]


# --------------------------------------------------------------------------------------------
# Brute-force references


def token_walk_chunks(computed: list[int], new: list[int], chunk: int) -> tuple[list[int], list[int], list[int]]:
    """Chunks by walking every token: cut at request starts and at multiples of `chunk`."""
    cu, seq, last = [], [], []
    token = 0
    for r, (c, n) in enumerate(zip(computed, new, strict=True)):
        for offset in range(n):
            if offset == 0 or (c + offset) % chunk == 0:
                cu.append(token)
                seq.append(r)
            token += 1
        last.append(len(seq) - 1)
    cu.append(token)
    return cu, seq, last


def per_request_chunks(computed: list[int], new: list[int], chunk: int) -> tuple[list[int], list[int], list[int]]:
    """The issue's description as a loop: a partial first chunk to the next multiple, then full ones."""
    cu, seq, last = [], [], []
    offset = 0
    for r, (c, n) in enumerate(zip(computed, new, strict=True)):
        rest = n
        if c % chunk and rest:
            first = min(-(-c // chunk) * chunk - c, rest)
            cu.append(offset)
            seq.append(r)
            offset += first
            rest -= first
        while rest > 0:
            take = min(chunk, rest)
            cu.append(offset)
            seq.append(r)
            offset += take
            rest -= take
        last.append(len(cu) - 1)
    cu.append(offset)
    return cu, seq, last


def _next_pow2(value: int) -> int:
    size = 1
    while size < value:
        size *= 2
    return size


def brute_force_mamba(
    batch: attnsync.Batch,
    *,
    variant: str = "mamba2",
    chunk_size: int | None = None,
    cache_mode: str = "none",
    num_spec_tokens: int = 0,
    num_accepted_tokens=None,
    decode_threshold: int | None = None,
    conv_capacity: int | None = None,
) -> dict:
    """Every field of `MambaMetadata`, one row at a time (the batch must be in decode-first order)."""
    k = num_spec_tokens
    thr = decode_threshold if decode_threshold is not None else (1 + k if num_accepted_tokens is not None else 1)
    n, r_pad, bs = batch.num_reqs, batch.padded_num_reqs, batch.block_size
    q = [int(v) for v in batch.query_lens]
    s = [int(v) for v in batch.seq_lens]
    pre = [False] * n if batch.is_prefilling is None else [bool(v) for v in batch.is_prefilling]
    table = [[int(v) for v in row] for row in batch.block_table]
    kinds = []
    for r in range(n):
        if q[r] <= thr:
            kinds.append("short extend" if pre[r] else "decode")
        else:
            kinds.append("long extend" if s[r] > q[r] else "prefill")
    nd = sum(kind == "decode" for kind in kinds)
    assert all(kind == "decode" for kind in kinds[:nd])
    prefill_rows = list(range(nd, n))
    npf = len(prefill_rows)
    rows_d = r_pad if npf == 0 else nd
    qsl = [0]
    for r in range(n):
        qsl.append(qsl[-1] + q[r])
    ndt = qsl[nd]
    computed_p = [s[r] - q[r] for r in prefill_rows]
    new_p = [q[r] for r in prefill_rows]
    if variant == "mamba2":
        chunk = chunk_size
    else:
        chunk = bs if cache_mode == "all" else 0
    if chunk:
        cu, seq, last = token_walk_chunks(computed_p, new_p, chunk)
        assert (cu, seq, last) == per_request_chunks(computed_p, new_p, chunk)
    else:
        cu = seq = last = []
    programs_req, programs_off = [], []
    for i, n_tokens in enumerate(new_p):
        for block in range(-(-n_tokens // 8)):
            programs_req.append(i)
            programs_off.append(block)
    programs = len(programs_req)
    capacity = conv_capacity if conv_capacity is not None else _next_pow2(max(programs, 16))
    pad = [-1] * (capacity - programs)

    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    out: dict = {}
    if cache_mode == "all":
        out["state_indices_tensor_p"] = [table[r] for r in prefill_rows]
        out["state_indices_tensor_d"] = [table[r] for r in range(nd)] + [[-1] * batch.block_table.shape[1]] * (rows_d - nd)
        out["block_idx_last_scheduled_token"] = [max(ceil_div(s[r], bs) - 1, 0) for r in range(n)] + [0] * (r_pad - n)
        out["block_idx_last_computed_token"] = [max(ceil_div(s[r] - q[r], bs) - 1, 0) for r in range(n)] + [0] * (r_pad - n)
        out["block_idx_first_scheduled_token_p"] = [ceil_div(c + 1, bs) - 1 for c in computed_p]
    else:
        base = [0 if cache_mode == "none" else max((s[r] - 1) // bs, 0) for r in range(n)]
        out["state_indices_tensor_p"] = [table[r][base[r]] for r in prefill_rows]
        out["state_indices_tensor_d"] = [[table[r][base[r] + j] for j in range(1 + k)] for r in range(nd)]
        out["state_indices_tensor_d"] += [[-1] * (1 + k)] * (rows_d - nd)
        for name in ("block_idx_last_scheduled_token", "block_idx_last_computed_token",
                     "block_idx_first_scheduled_token_p"):
            out[name] = []
    if num_accepted_tokens is not None:
        out["num_accepted_tokens"] = [int(v) for v in num_accepted_tokens][:nd] + [1] * (rows_d - nd)
    else:
        out["num_accepted_tokens"] = []
    qsl_d = qsl[: nd + 1] + [qsl[nd]] * (rows_d - nd)
    out.update(
        seq_lens=s + [0] * (r_pad - n),
        query_start_loc_p=[v - ndt for v in qsl[nd:]],
        query_start_loc_d=qsl_d,
        num_computed_tokens_p=computed_p,
        has_initial_states_p=[c > 0 for c in computed_p],
        cu_chunk_seqlen_p=cu,
        seq_idx_p=seq,
        last_chunk_indices_p=last,
        batch_ptr=programs_req + pad,
        token_chunk_offset_ptr=programs_off + pad,
        num_reqs=r_pad,
        num_actual_tokens=batch.padded_num_tokens,
        num_scheduled_reqs=n,
        num_scheduled_tokens=qsl[n],
        num_decodes=nd,
        num_decode_tokens=ndt,
        num_prefills=npf,
        num_prefill_tokens=qsl[n] - ndt,
        num_decode_rows=rows_d,
        num_short_extends=kinds.count("short extend"),
        num_long_extends=kinds.count("long extend"),
        num_fresh_prefills=kinds.count("prefill"),
        max_query_len=max(q, default=0),
        max_seq_len=max(s, default=0),
        max_decode_query_len=max(q[:nd], default=0),
        max_prefill_query_len=max(new_p, default=0),
        decode_threshold=thr,
        num_spec_tokens=k,
        has_num_accepted_tokens=num_accepted_tokens is not None,
        variant=variant,
        cache_mode=cache_mode,
        block_size=bs,
        chunk_size=chunk,
        has_chunk_metadata=bool(chunk),
        num_chunks=len(seq),
        prep_initial_states=any(c > 0 for c in computed_p),
        num_conv_programs=programs,
        conv_block_m=8,
        conv_capacity=capacity,
        all_exact=all(bool(v) for v in batch.seq_lens_exact),
    )
    return out


def assert_metadata(md: MambaMetadata, expected: dict) -> None:
    """Each key of `expected` equals `md`'s field; arrays are int32 (bool for has_initial_states_p)."""
    for name, want in expected.items():
        got = getattr(md, name)
        if name in DEVICE_ARRAYS:
            dtype = np.bool_ if name == "has_initial_states_p" else np.int32
            assert isinstance(got, np.ndarray) and got.dtype == dtype, (name, type(got), getattr(got, "dtype", None))
            assert not got.flags.writeable, f"{name} must be read-only"
            want_arr = np.asarray(want, dtype=dtype)
            if want_arr.size == 0:
                assert got.size == 0, (name, got)
            else:
                assert got.shape == want_arr.shape, (name, got.shape, want_arr.shape)
                np.testing.assert_array_equal(got, want_arr, err_msg=name)
        else:
            assert type(got) is type(want) and got == want, (name, got, want)


def build_and_check(batch: attnsync.Batch, **options) -> MambaMetadata:
    md = attnsync.build(batch, backend="mamba", **options)
    assert_metadata(md, brute_force_mamba(batch, **options))
    return md


# --------------------------------------------------------------------------------------------
# Hand cases


@pytest.mark.parametrize(
    ("computed", "query_start_loc", "expected"),
    [
        # chunk 4: (c, n) = (0, 6): [0, 4) [4, 6); (5, 7): 3 to reach 8 -> [6, 9), then [9, 13)
        ([0, 5], [0, 6, 13], ([0, 4, 6, 9, 13], [0, 0, 1, 1], [1, 3])),
        # (8, 4): aligned -> [0, 4); (3, 1): 1 token to reach 4 -> [4, 5); (0, 0): nothing, and
        # its last index repeats the previous one
        ([8, 3, 0], [0, 4, 5, 5], ([0, 4, 5], [0, 1], [0, 1, 1])),
        # an empty first row has no chunk before it: last index -1
        ([0, 2], [0, 0, 3], ([0, 2, 3], [1, 1], [-1, 1])),
        ([], [0], ([0], [], [])),
    ],
)
def test_chunk_metadata_worked_examples(computed, query_start_loc, expected):
    cu, seq, last = chunk_metadata(np.array(computed, np.int32), np.array(query_start_loc, np.int32), 4)
    assert (cu.tolist(), seq.tolist(), last.tolist()) == tuple(list(v) for v in expected)
    assert cu.dtype == seq.dtype == last.dtype == np.int32
    new = np.diff(query_start_loc).tolist()
    assert token_walk_chunks(computed, new, 4) == tuple(list(v) for v in expected)
    assert per_request_chunks(computed, new, 4) == tuple(list(v) for v in expected)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=12),
    st.integers(1, 9),
)
def test_vectorised_chunks_equal_the_token_walk(rows, chunk):
    computed = [c for c, _ in rows]
    new = [n for _, n in rows]
    qsl = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    cu, seq, last = chunk_metadata(np.array(computed, np.int32), qsl, chunk)
    walk = token_walk_chunks(computed, new, chunk)
    assert (cu.tolist(), seq.tolist(), last.tolist()) == walk
    assert walk == per_request_chunks(computed, new, chunk)
    # chunks never cross requests, never exceed the chunk size, and every absolute multiple of
    # the chunk size inside a row starts a chunk
    lengths = np.diff(cu)
    assert (lengths >= 1).all() and (lengths <= chunk).all()


# Four regions in order: decode (c=9), short extend (q=1, prefilling, c=4), long extend
# (q=7, c=5), prefill (q=6, c=0). block_size 4, chunk 4, table rows 10.., 20.., 30.., 40...
HAND = dict(
    query_lens=[1, 1, 7, 6],
    seq_lens=[10, 5, 12, 6],
    is_prefilling=[False, True, True, True],
    block_table=[[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]],
    block_size=4,
)
# qsl [0, 1, 2, 9, 15]; prefill rows 1..3 rebased by 1: [0, 1, 8, 14]; computed [4, 5, 0].
# chunks: (4, 1) aligned -> [0, 1); (5, 7) 3 to reach 8 -> [1, 4), then [4, 8); (0, 6) -> [8, 12),
# [12, 14). conv programs: lengths 1, 7, 6 -> one program each.
HAND_COMMON = dict(
    seq_lens=[10, 5, 12, 6],
    query_start_loc_p=[0, 1, 8, 14],
    query_start_loc_d=[0, 1],
    num_computed_tokens_p=[4, 5, 0],
    has_initial_states_p=[True, True, False],
    cu_chunk_seqlen_p=[0, 1, 4, 8, 12, 14],
    seq_idx_p=[0, 1, 1, 2, 2],
    last_chunk_indices_p=[0, 2, 4],
    batch_ptr=[0, 1, 2] + [-1] * 13,
    token_chunk_offset_ptr=[0, 0, 0] + [-1] * 13,
    num_reqs=4, num_actual_tokens=15, num_decodes=1, num_decode_tokens=1, num_prefills=3,
    num_prefill_tokens=14, num_decode_rows=1, num_short_extends=1, num_long_extends=1,
    num_fresh_prefills=1, max_query_len=7, max_seq_len=12, max_decode_query_len=1,
    max_prefill_query_len=7, decode_threshold=1, chunk_size=4, num_chunks=5,
    prep_initial_states=True, num_conv_programs=3, conv_capacity=16, all_exact=True,
)


def test_hand_case_mode_none():
    md = build_and_check(attnsync.Batch(**HAND), chunk_size=4)
    assert_metadata(md, dict(HAND_COMMON, state_indices_tensor_p=[20, 30, 40], state_indices_tensor_d=[[10]],
                             block_idx_last_scheduled_token=[], num_accepted_tokens=[]))


def test_hand_case_mode_all():
    md = build_and_check(attnsync.Batch(**HAND), chunk_size=4, cache_mode="all")
    assert_metadata(md, dict(
        HAND_COMMON,
        state_indices_tensor_p=HAND["block_table"][1:],
        state_indices_tensor_d=HAND["block_table"][:1],
        # ceil([10, 5, 12, 6] / 4) - 1
        block_idx_last_scheduled_token=[2, 1, 2, 1],
        # computed [9, 4, 5, 0]: ceil(c / 4) - 1, clamped at 0
        block_idx_last_computed_token=[2, 0, 1, 0],
        # block of the first new token: c // 4 for c = [4, 5, 0]
        block_idx_first_scheduled_token_p=[1, 1, 0],
    ))


def test_hand_case_mode_align_with_speculation():
    # k = 1: threshold 2. Column start max((s - 1) // 4, 0) = [2, 1, 2, 1]; decode row 0 gets
    # columns 2, 3 -> [12, 13]; prefill rows take their start column -> [21, 32, 41].
    md = build_and_check(attnsync.Batch(**HAND), chunk_size=4, cache_mode="align", num_spec_tokens=1,
                         num_accepted_tokens=[2, 1, 1, 1])
    assert_metadata(md, dict(HAND_COMMON, decode_threshold=2, state_indices_tensor_p=[21, 32, 41],
                             state_indices_tensor_d=[[12, 13]], num_accepted_tokens=[2]))


def test_mamba1_chunks_only_in_mode_all():
    batch = attnsync.Batch(**HAND)
    none = build_and_check(batch, variant="mamba1")
    assert not none.has_chunk_metadata and none.chunk_size == 0 and none.num_chunks == 0
    assert none.cu_chunk_seqlen_p.shape == (0,) and none.seq_idx_p.shape == (0,)
    assert none.prep_initial_states and none.num_conv_programs == 3
    everything = build_and_check(batch, variant="mamba1", cache_mode="all")
    # block size 4 is the chunk: the same chunks as HAND_COMMON
    assert everything.chunk_size == 4 and everything.cu_chunk_seqlen_p.tolist() == HAND_COMMON["cu_chunk_seqlen_p"]


def test_decode_only_padded_batch_pads_the_decode_arrays():
    # a CUDA-graph bucket of 4 rows for 2 decodes: padded rows join the decode path with slot -1
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[9, 3], block_table=[[5, 6, 50], [7, 8, 51]], block_size=4,
                           padded_num_reqs=4, padded_num_tokens=4)
    md = build_and_check(batch, chunk_size=4, num_spec_tokens=1, num_accepted_tokens=[1, 2])
    assert md.num_decodes == 2 and md.num_decode_rows == 4
    assert md.state_indices_tensor_d.tolist() == [[5, 6], [7, 8], [-1, -1], [-1, -1]]
    assert md.num_accepted_tokens.tolist() == [1, 2, 1, 1]
    assert md.query_start_loc_d.tolist() == [0, 1, 2, 2, 2]
    assert md.query_start_loc_p.tolist() == [0] and md.cu_chunk_seqlen_p.tolist() == [0]
    assert not md.prep_initial_states and md.num_prefills == 0
    everything = build_and_check(batch, chunk_size=4, cache_mode="all")
    assert everything.block_idx_last_scheduled_token.tolist() == [2, 0, 0, 0]
    assert everything.state_indices_tensor_d.tolist()[2:] == [[-1, -1, -1]] * 2


def test_empty_batch():
    batch = attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 0)), block_size=16)
    md = build_and_check(batch, chunk_size=8)
    assert md.num_reqs == 0 and md.num_chunks == 0 and md.query_start_loc_p.tolist() == [0]


def test_conv_capacity_rule():
    long_prefill = attnsync.Batch(query_lens=[1, 200], seq_lens=[3, 200], block_table=[[1], [2]], block_size=256)
    # ceil(200 / 8) = 25 programs -> the next power of two, 32
    assert attnsync.build(long_prefill, backend="mamba", chunk_size=64).conv_capacity == 32
    md = build_and_check(long_prefill, chunk_size=64, conv_capacity=40)
    assert md.batch_ptr.shape == (40,) and md.batch_ptr[24] == 0 and md.batch_ptr[25] == -1
    assert md.token_chunk_offset_ptr[:25].tolist() == list(range(25))
    with pytest.raises(attnsync.SpecError, match="conv_capacity: 24 is smaller than the 25"):
        attnsync.build(long_prefill, backend="mamba", chunk_size=64, conv_capacity=24)


# --------------------------------------------------------------------------------------------
# Refusals


def test_refuses_an_unordered_batch_and_names_reorder():
    swapped = dict(HAND, query_lens=HAND["query_lens"][::-1], seq_lens=HAND["seq_lens"][::-1],
                   is_prefilling=HAND["is_prefilling"][::-1], block_table=HAND["block_table"][::-1])
    batch = attnsync.Batch(**swapped)
    with pytest.raises(attnsync.SpecError, match=r"attnsync\.reorder"):
        attnsync.build(batch, backend="mamba", chunk_size=4)
    # strict: a prefill row before a long extend is refused too, not only decodes last
    strict = attnsync.Batch(query_lens=[6, 7], seq_lens=[6, 12], block_table=[[1, 2, 3], [4, 5, 6]], block_size=4)
    with pytest.raises(attnsync.SpecError, match="long extend row after a prefill row"):
        attnsync.build(strict, backend="mamba", chunk_size=4)
    _, ordered = attnsync.reorder(strict)
    assert attnsync.build(ordered, backend="mamba", chunk_size=4).num_long_extends == 1


def test_refuses_inexact_rows_on_the_prefill_path():
    # a 3-token speculative row with an upper bound, but no spec options: threshold 1 makes it a
    # long extend, whose computed count must be exact
    batch = attnsync.Batch(query_lens=[3, 4], seq_lens=[12, 4], block_table=[[1, 2, 3], [4, 0, 0]], block_size=4,
                           seq_lens_exact=[False, True])
    with pytest.raises(attnsync.SpecError, match="row 0 is marked inexact.*num_accepted_tokens"):
        attnsync.build(batch, backend="mamba", chunk_size=4)
    md = attnsync.build(batch, backend="mamba", chunk_size=4, num_spec_tokens=2, num_accepted_tokens=[3, 1])
    assert md.num_decodes == 1 and not md.all_exact


@pytest.mark.parametrize("mode", ["all", "align"])
def test_modes_that_place_states_by_length_refuse_inexact_rows(mode):
    batch = attnsync.Batch(query_lens=[1, 4], seq_lens=[12, 4], block_table=[[1, 2, 3, 9], [4, 0, 0, 0]],
                           block_size=4, seq_lens_exact=[False, True])
    with pytest.raises(attnsync.SpecError, match=f"cache_mode '{mode}'.*inexact.*cache_mode 'none'"):
        attnsync.build(batch, backend="mamba", chunk_size=4, cache_mode=mode)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(), attnsync.SpecError, "chunk_size: Mamba2 needs"),
        (dict(chunk_size=0), attnsync.SpecError, "chunk_size: expected an int >= 1"),
        (dict(chunk_size=4.0), TypeError, "chunk_size"),
        (dict(chunk_size=3, cache_mode="all"), attnsync.SpecError, "multiple of chunk_size"),
        (dict(variant="mamba1", chunk_size=4), attnsync.SpecError, "Mamba1 has no chunk_size"),
        (dict(variant="mamba3", chunk_size=4), attnsync.SpecError, "variant: unknown value 'mamba3'"),
        (dict(cache_mode="some", chunk_size=4), attnsync.SpecError, "cache_mode: unknown value"),
        (dict(chunk_size=4, num_spec_tokens=-1), attnsync.SpecError, "num_spec_tokens"),
        (dict(chunk_size=4, num_spec_tokens=1, num_accepted_tokens=[3, 1, 1, 1]), attnsync.SpecError,
         r"decode row 0 has 3; expected 1\.\.2"),
        (dict(chunk_size=4, num_spec_tokens=1, num_accepted_tokens=[0, 1, 1, 1]), attnsync.SpecError, "expected 1..2"),
        (dict(chunk_size=4, num_spec_tokens=1, num_accepted_tokens=[1, 1]), attnsync.SpecError,
         r"one value per request \(4\) or per decode row \(1\)"),
        (dict(chunk_size=4, num_spec_tokens=1, num_accepted_tokens=[1.0]), TypeError, "num_accepted_tokens"),
        (dict(chunk_size=4, num_spec_tokens=4, num_accepted_tokens=[1]), attnsync.SpecError,
         "reads column 4 of row 0, but the table has 4 columns"),
        (dict(chunk_size=4, cache_mode="align", num_spec_tokens=2, num_accepted_tokens=[1]), attnsync.SpecError,
         "cache_mode 'align'.*reads column 4"),
        (dict(chunk_size=4, num_spec_tokens=1, num_accepted_tokens=[1], decode_threshold=3), attnsync.SpecError,
         "keeps only 1 \\+ num_spec_tokens = 2 state slots"),
        (dict(chunk_size=4, conv_capacity=-1), attnsync.SpecError, "conv_capacity"),
        (dict(chunk_size=4, page_size=16), attnsync.SpecError, "has no option"),
    ],
)
def test_bad_options(options, error, match):
    batch = attnsync.Batch(**HAND)
    if options.get("decode_threshold") == 3:  # a 3-token decode row
        batch = attnsync.Batch(query_lens=[3, 6], seq_lens=[9, 6], block_table=[[1, 2, 3], [4, 5, 0]], block_size=4)
    with pytest.raises(error, match=match):
        attnsync.build(batch, backend="mamba", **options)


def test_refuses_a_table_without_columns():
    batch = attnsync.Batch(query_lens=[0], seq_lens=[0], block_table=np.zeros((1, 0)), block_size=4)
    with pytest.raises(attnsync.SpecError, match="no columns"):
        attnsync.build(batch, backend="mamba", chunk_size=4)


# --------------------------------------------------------------------------------------------
# Hypothesis: builder against brute force, and async speculative decoding


@st.composite
def mamba_cases(draw, *, inexact: bool = True):
    """(batch, options): a reordered batch with a table wide enough for 1 + k slots, and options."""
    k = draw(st.integers(0, 3))
    spec = draw(st.booleans())
    kwargs = draw(batch_kwargs(max_reqs=10, max_decode_query=1 + k if spec else 3, inexact=inexact,
                               max_context=60, max_query=40))
    extra = k + 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    table = kwargs["block_table"]
    kwargs["block_table"] = np.concatenate(
        [table, rng.integers(0, 4096, size=(table.shape[0], extra))], axis=1
    ).astype(np.int64)
    variant = draw(st.sampled_from(["mamba2", "mamba1"]))
    mode = draw(st.sampled_from(["none", "all", "align"]))
    options: dict = dict(variant=variant, cache_mode=mode)
    bs = int(kwargs["block_size"])
    if variant == "mamba2":
        divisors = [d for d in range(1, bs + 1) if bs % d == 0]
        options["chunk_size"] = draw(st.sampled_from(divisors)) if mode == "all" else draw(st.integers(1, 9))
    threshold = 1 + k if spec else draw(st.sampled_from([None, 1, 2]))
    batch = attnsync.Batch(**kwargs)
    _, batch = attnsync.reorder(batch, decode_threshold=threshold or 1)
    if spec:
        options["num_spec_tokens"] = k
        accepted = rng.integers(1, k + 2, size=batch.num_reqs)
        options["num_accepted_tokens"] = accepted
    elif threshold is not None:
        options["decode_threshold"] = threshold
    if draw(st.booleans()):
        options["conv_capacity"] = int(batch.num_tokens) // 8 + batch.num_reqs + draw(st.integers(0, 3))
    return batch, options


def _expected_refusal(batch: attnsync.Batch, options: dict) -> str | None:
    thr = options.get("decode_threshold") or (1 + options.get("num_spec_tokens", 0)
                                              if "num_accepted_tokens" in options else 1)
    regions = batch.regions(thr)
    exact = batch.seq_lens_exact
    if (~exact & (regions != 0)).any():
        return "inexact"
    if options["cache_mode"] != "none" and not exact.all():
        return "inexact"
    return None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mamba_cases())
def test_builder_matches_brute_force(case):
    batch, options = case
    if _expected_refusal(batch, options):
        event("refused: inexact row")
        with pytest.raises(attnsync.SpecError, match="inexact"):
            attnsync.build(batch, backend="mamba", **options)
        return
    md = build_and_check(batch, **options)
    event(f"built, mode {md.cache_mode}, {'inexact' if not md.all_exact else 'exact'}, "
          f"{'spec' if md.has_num_accepted_tokens else 'no spec'}")


def _inflate_decode_rows(batch: attnsync.Batch, threshold: int, rng: np.random.Generator, k: int) -> attnsync.Batch:
    """The same step as the host sees it under async spec decode: decode rows with context get an
    optimistic length (true + rejected drafts, 0..k) and are marked inexact."""
    regions = batch.regions(threshold)
    can = (regions == 0) & (batch.seq_lens > batch.query_lens)
    rejected = np.where(can, rng.integers(0, k + 1, size=batch.num_reqs), 0)
    seq_lens = batch.seq_lens.astype(np.int64) + rejected
    pages = int((-(-seq_lens // batch.block_size)).max(initial=0))
    table = batch.block_table
    if pages > table.shape[1]:
        table = np.concatenate([table, np.zeros((table.shape[0], pages - table.shape[1]), np.int32)], axis=1)
    return attnsync.Batch(
        query_lens=batch.query_lens, seq_lens=seq_lens, block_table=table, block_size=batch.block_size,
        seq_lens_exact=~can | (rejected == 0) & batch.seq_lens_exact, is_prefilling=batch.is_prefilling,
        padded_num_reqs=batch.padded_num_reqs, padded_num_tokens=batch.padded_num_tokens,
    )


PREFILL_FIELDS = (
    "query_start_loc_p", "query_start_loc_d", "num_computed_tokens_p", "has_initial_states_p",
    "state_indices_tensor_p", "state_indices_tensor_d", "num_accepted_tokens", "cu_chunk_seqlen_p",
    "seq_idx_p", "last_chunk_indices_p", "batch_ptr", "token_chunk_offset_ptr",
)
PREFILL_SCALARS = (
    "num_decodes", "num_decode_tokens", "num_prefills", "num_prefill_tokens", "num_decode_rows",
    "num_chunks", "prep_initial_states", "num_conv_programs", "conv_capacity", "max_prefill_query_len",
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mamba_cases(inexact=False), st.integers(0, 2**32 - 1))
def test_optimistic_decode_rows_leave_prefill_fields_exact(case, seed):
    """Async speculative decoding: decode rows carry upper bounds, prefill fields stay exact."""
    batch, options = case
    options = dict(options, cache_mode="none")  # the mode that accepts inexact rows
    k = max(options.get("num_spec_tokens", 0), 1)
    thr = options.get("decode_threshold") or (1 + options.get("num_spec_tokens", 0)
                                              if "num_accepted_tokens" in options else 1)
    optimistic = _inflate_decode_rows(batch, thr, np.random.default_rng(seed), k)
    exact_md = build_and_check(batch, **options)
    bound_md = build_and_check(optimistic, **options)
    for name in PREFILL_FIELDS:
        np.testing.assert_array_equal(getattr(bound_md, name), getattr(exact_md, name), err_msg=name)
    for name in PREFILL_SCALARS:
        assert getattr(bound_md, name) == getattr(exact_md, name), name
    # the bound shows only where it should: decode rows' lengths, never below the truth
    assert (bound_md.seq_lens >= exact_md.seq_lens).all()
    nd = exact_md.num_decodes
    np.testing.assert_array_equal(bound_md.seq_lens[nd:], exact_md.seq_lens[nd:])


def test_optimistic_decode_rows_hand_case():
    # decode rows 0, 1 (k = 2) accepted fewer drafts than the host assumed: their bounds are 2
    # and 1 too large. The prefill rows (a long extend with 5 computed, a fresh prefill) and
    # everything derived from them are identical.
    exact = dict(query_lens=[3, 3, 7, 6], seq_lens=[10, 7, 12, 6], block_size=4,
                 block_table=[[1, 2, 3, 4], [5, 6, 7, 0], [8, 9, 10, 0], [11, 12, 0, 0]])
    bound = dict(exact, seq_lens=[12, 8, 12, 6], seq_lens_exact=[False, False, True, True])
    options = dict(chunk_size=4, num_spec_tokens=2, num_accepted_tokens=[1, 2, 1, 1])
    a = attnsync.build(attnsync.Batch(**exact), backend="mamba", **options)
    b = attnsync.build(attnsync.Batch(**bound), backend="mamba", **options)
    assert b.num_computed_tokens_p.tolist() == a.num_computed_tokens_p.tolist() == [5, 0]
    assert b.cu_chunk_seqlen_p.tolist() == a.cu_chunk_seqlen_p.tolist() == [0, 3, 7, 11, 13]
    assert b.prep_initial_states and b.has_initial_states_p.tolist() == [True, False]
    assert b.state_indices_tensor_d.tolist() == [[1, 2, 3], [5, 6, 7]] and b.num_accepted_tokens.tolist() == [1, 2]
    assert b.seq_lens.tolist() == [12, 8, 12, 6]  # the device copy holds the bound as given
    assert not b.all_exact and a.all_exact


# --------------------------------------------------------------------------------------------
# Lowerings: numpy == torch == JAX, bit for bit


def _lowered_checks(md: MambaMetadata) -> None:
    tmd = torch_adapter.lower(md, device="cpu")
    for f in dataclasses.fields(md):
        value = getattr(md, f.name)
        place = f.metadata.get("place")
        if place is None:
            assert getattr(tmd, f.name) == value
            continue
        if place in ("device", "both"):
            got = getattr(tmd, f.name)
            want_dtype = torch.bool if value.dtype == np.bool_ else torch.int32
            assert got.dtype == want_dtype and tuple(got.shape) == value.shape, f.name
            np.testing.assert_array_equal(got.numpy(), value, err_msg=f.name)
        if place in ("host", "both"):
            host_name = f.metadata["host_name"] or f"{f.name}_cpu"
            np.testing.assert_array_equal(getattr(tmd, host_name).numpy(), value, err_msg=host_name)
    jax = pytest.importorskip("jax")
    from attnsync.adapters import jax as jax_adapter

    jmd = jax_adapter.lower(md)
    for f in dataclasses.fields(md):
        value = getattr(md, f.name)
        if f.metadata.get("place") in ("device", "both"):
            got = getattr(jmd, f.name)
            assert got.dtype == np.int32 and got.shape == value.shape, f.name
            np.testing.assert_array_equal(np.asarray(got), value.astype(np.int32), err_msg=f.name)
        elif f.metadata.get("place") is None:
            assert getattr(jmd, f.name) == value
    assert jax.tree_util.tree_structure(jmd) is not None


@needs_torch
@pytest.mark.parametrize("mode", ["none", "all", "align"])
def test_lowerings_are_bit_identical(mode):
    batch = attnsync.Batch(**dict(HAND, padded_num_reqs=6, padded_num_tokens=20))
    spec = dict(num_spec_tokens=0, num_accepted_tokens=[1, 1, 1, 1]) if mode == "all" else {}
    _lowered_checks(attnsync.build(batch, backend="mamba", chunk_size=4, cache_mode=mode, **spec))


@needs_torch
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mamba_cases())
def test_lowerings_are_bit_identical_on_random_batches(case):
    batch, options = case
    if _expected_refusal(batch, options):
        return
    _lowered_checks(attnsync.build(batch, backend="mamba", **options))


# --------------------------------------------------------------------------------------------
# Consumers against the sequential float64 oracles

H, P, G, N, WIDTH, DIM = 4, 3, 2, 5, 4, 6


def _consumer_batch(q, s, pre, *, bs=4, k=0, pad_reqs=0, pad_tokens=0, seed=0):
    """A batch whose table holds distinct slots (one state per slot), wide enough for 1 + k."""
    rng = np.random.default_rng(seed)
    n = len(q)
    width = max(int((-(-np.asarray(s, np.int64) // bs)).max(initial=0)), 1) + k + 1
    num_slots = n * width + 2
    table = rng.permutation(num_slots)[: n * width].reshape(n, width)
    batch = attnsync.Batch(query_lens=q, seq_lens=s, is_prefilling=pre, block_table=table, block_size=bs,
                           padded_num_reqs=n + pad_reqs, padded_num_tokens=sum(q) + pad_tokens)
    return batch, num_slots


def _inputs(num_tokens: int, num_slots: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((num_tokens, H, P)),
        dt=rng.uniform(0.05, 1.0, (num_tokens, H)),
        A=-rng.uniform(0.2, 2.0, H),
        B=rng.standard_normal((num_tokens, G, N)),
        C=rng.standard_normal((num_tokens, G, N)),
        D=rng.standard_normal(H),
        ssm_state=rng.standard_normal((num_slots, H, P, N)),
        xc=rng.standard_normal((num_tokens, DIM)),
        weight=rng.standard_normal((DIM, WIDTH)),
        bias=rng.standard_normal(DIM),
        conv_state=rng.standard_normal((num_slots, DIM, WIDTH - 1)),
    )


def _oracle(batch, md, inputs, options):
    opts = dict(cache_mode=md.cache_mode, decode_threshold=md.decode_threshold,
                num_accepted_tokens=options.get("num_accepted_tokens"))
    y, state = ref.sequential_ssd(batch, inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"],
                                  inputs["D"], inputs["ssm_state"], **opts)
    out, conv = ref.sequential_conv1d(batch, inputs["xc"], inputs["weight"], inputs["bias"],
                                      inputs["conv_state"], activation="silu", **opts)
    return y, state, out, conv


def _torch_consumers(md, inputs):
    t = {name: torch.from_numpy(np.asarray(v)) for name, v in inputs.items()}
    tmd = torch_adapter.lower(md, device="cpu")
    y, state = ref.ssd_chunked_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["ssm_state"], tmd)
    out, conv = ref.causal_conv1d_varlen(t["xc"], t["weight"], t["bias"], t["conv_state"], tmd, activation="silu")
    return tuple(v.numpy() for v in (y, state, out, conv))


def _assert_close(got, want, tol=1e-10):
    for name, a, b in zip(("y", "ssm_state", "conv_out", "conv_state"), got, want, strict=True):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)


# (query_lens, seq_lens, is_prefilling, options): every path and cache mode
CONSUMER_CASES = {
    "mixed_none": ([1, 1, 1, 3, 9, 6], [9, 17, 5, 8, 20, 6], [False, False, True, True, True, True],
                   dict(chunk_size=4)),
    "mixed_all": ([1, 1, 1, 3, 9, 6], [9, 16, 5, 8, 20, 6], [False, False, True, True, True, True],
                  dict(chunk_size=2, cache_mode="all")),
    "mixed_align": ([1, 1, 3, 9, 6], [9, 17, 8, 20, 6], [False, False, True, True, True],
                    dict(chunk_size=4, cache_mode="align")),
    "spec_none": ([3, 1, 2, 9, 6], [9, 17, 4, 20, 6], [False, False, False, True, True],
                  dict(chunk_size=4, num_spec_tokens=2, num_accepted_tokens=[2, 1, 3, 1, 1])),
    "spec_align": ([3, 1, 9, 6], [9, 17, 20, 6], [False, False, True, True],
                   dict(chunk_size=3, cache_mode="align", num_spec_tokens=2, num_accepted_tokens=[3, 1, 1, 1])),
    "spec_all": ([3, 2, 9, 6], [9, 17, 20, 6], [False, False, True, True],
                 dict(chunk_size=4, cache_mode="all", num_spec_tokens=2, num_accepted_tokens=[3, 1, 1, 1])),
    "prefill_only_long": ([23, 17], [30, 17], [True, True], dict(chunk_size=4)),
    "empty_prefill_rows": ([1, 0, 0, 5], [6, 3, 0, 5], [False, True, True, True], dict(chunk_size=4)),
    "mamba1_all": ([1, 6, 7], [9, 10, 7], [False, True, True], dict(variant="mamba1", cache_mode="all")),
}


@needs_torch
@pytest.mark.parametrize("name", list(CONSUMER_CASES))
def test_torch_consumers_match_the_sequential_oracle(name):
    q, s, pre, options = CONSUMER_CASES[name]
    batch, slots = _consumer_batch(q, s, pre, k=options.get("num_spec_tokens", 0), pad_tokens=3)
    md = attnsync.build(batch, backend="mamba", **options)
    inputs = _inputs(batch.padded_num_tokens, slots, seed=len(name))
    _assert_close(_torch_consumers(md, inputs), _oracle(batch, md, inputs, options))


@needs_torch
def test_torch_consumers_on_a_padded_decode_only_batch():
    batch, slots = _consumer_batch([1, 1, 1], [9, 4, 17], [False] * 3, pad_reqs=3, pad_tokens=5)
    md = attnsync.build(batch, backend="mamba", chunk_size=4)
    assert md.num_decode_rows == 6
    inputs = _inputs(batch.padded_num_tokens, slots, seed=3)
    got = _torch_consumers(md, inputs)
    _assert_close(got, _oracle(batch, md, inputs, {}))
    assert not got[0][3:].any() and not got[2][3:].any()  # padding tokens stay 0


@needs_torch
def test_torch_consumers_with_optimistic_decode_rows():
    # decode rows carry upper bounds (mode "none"): the consumers never read decode lengths, so
    # the result is the exact batch's result
    exact, slots = _consumer_batch([3, 2, 9, 6], [9, 17, 20, 6], [False, False, True, True], k=2)
    bound = attnsync.Batch(query_lens=exact.query_lens, seq_lens=exact.seq_lens + np.array([2, 1, 0, 0]),
                           block_table=exact.block_table, block_size=exact.block_size,
                           is_prefilling=exact.is_prefilling, seq_lens_exact=[False, False, True, True])
    options = dict(chunk_size=4, num_spec_tokens=2, num_accepted_tokens=[1, 2, 1, 1])
    inputs = _inputs(exact.num_tokens, slots, seed=5)
    want = _oracle(exact, attnsync.build(exact, backend="mamba", **options), inputs, options)
    _assert_close(_torch_consumers(attnsync.build(bound, backend="mamba", **options), inputs), want)


@needs_torch
def test_device_accepted_counts_swap_into_the_lowered_object():
    """Async spec decode: the counts live on the device; placeholders on the host, swapped after."""
    q, s, pre, options = CONSUMER_CASES["spec_none"]
    batch, slots = _consumer_batch(q, s, pre, k=2)
    inputs = _inputs(batch.num_tokens, slots, seed=7)
    placeholder = dict(options, num_accepted_tokens=np.ones(len(q), np.int32))
    tmd = torch_adapter.lower(attnsync.build(batch, backend="mamba", **placeholder), device="cpu")
    counts = torch.tensor(options["num_accepted_tokens"][: tmd.num_decode_rows], dtype=torch.int32)
    swapped = dataclasses.replace(tmd, num_accepted_tokens=counts)
    t = {name: torch.from_numpy(np.asarray(v)) for name, v in inputs.items()}
    y, state = ref.ssd_chunked_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["ssm_state"], swapped)
    want = _oracle(batch, attnsync.build(batch, backend="mamba", **options), inputs, options)
    np.testing.assert_allclose(y.numpy(), want[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(state.numpy(), want[1], rtol=1e-10, atol=1e-10)


@st.composite
def consumer_cases(draw):
    k = draw(st.integers(0, 2))
    spec = draw(st.booleans())
    mode = draw(st.sampled_from(["none", "all", "align"]))
    bs = draw(st.sampled_from([2, 4, 8]))
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["decode", "short", "long", "prefill"]))
        if kind == "decode":
            rows.append((draw(st.integers(0 if not spec else 1, 1 + k if spec else 1)), draw(st.integers(1, 30)), False))
        elif kind == "short":
            rows.append((draw(st.integers(0, 1 + k if spec else 1)), draw(st.integers(0, 30)), True))
        elif kind == "long":
            rows.append((draw(st.integers(2 + (k if spec else 0), 20)), draw(st.integers(1, 30)), True))
        else:
            rows.append((draw(st.integers(2 + (k if spec else 0), 20)), 0, True))
    q = [r[0] for r in rows]
    s = [r[0] + r[1] for r in rows]
    pre = [r[2] for r in rows]
    batch, slots = _consumer_batch(q, s, pre, bs=bs, k=k, pad_tokens=draw(st.integers(0, 2)),
                                   pad_reqs=draw(st.integers(0, 2)), seed=draw(st.integers(0, 1000)))
    thr = 1 + k if spec else 1
    _, batch = attnsync.reorder(batch, decode_threshold=thr)
    options: dict = dict(cache_mode=mode)
    options["chunk_size"] = draw(st.sampled_from([d for d in (1, 2, 4, 8) if bs % d == 0])) if mode == "all" \
        else draw(st.integers(1, 6))
    if spec:
        options.update(num_spec_tokens=k,
                       num_accepted_tokens=[draw(st.integers(1, 1 + k)) for _ in range(batch.num_reqs)])
    return batch, slots, options


@needs_torch
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(consumer_cases(), st.integers(0, 1000))
def test_torch_consumers_match_the_oracle_on_random_batches(case, seed):
    batch, slots, options = case
    md = attnsync.build(batch, backend="mamba", **options)
    inputs = _inputs(batch.padded_num_tokens, slots, seed)
    _assert_close(_torch_consumers(md, inputs), _oracle(batch, md, inputs, options))


@needs_torch
def test_torch_mixer_matches_the_sequential_layer():
    q, s, pre, options = CONSUMER_CASES["spec_none"]
    batch, slots = _consumer_batch(q, s, pre, k=2)
    md = attnsync.build(batch, backend="mamba", **options)
    params = _mixer_params(batch.num_tokens, slots, seed=11)
    want = ref.sequential_mixer(batch, **params, **_mixer_shape(), cache_mode="none", decode_threshold=3,
                                num_accepted_tokens=options["num_accepted_tokens"])
    t = {name: torch.from_numpy(v) for name, v in params.items()}
    got = ref.mamba2_mixer(t.pop("xbc"), t.pop("dt_raw"), **t, md=torch_adapter.lower(md, device="cpu"),
                           **_mixer_shape())
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-10, atol=1e-10)


def _mixer_shape() -> dict:
    return dict(num_heads=H, num_groups=G, state_size=N)


def _mixer_params(num_tokens: int, num_slots: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    channels = H * P + 2 * G * N
    return dict(
        xbc=rng.standard_normal((num_tokens, channels)),
        dt_raw=rng.standard_normal((num_tokens, H)),
        conv_weight=rng.standard_normal((channels, WIDTH)) * 0.5,
        conv_bias=rng.standard_normal(channels) * 0.1,
        dt_bias=rng.standard_normal(H) * 0.1,
        A_log=rng.standard_normal(H) * 0.3,
        D=rng.standard_normal(H),
        conv_state=rng.standard_normal((num_slots, channels, WIDTH - 1)),
        ssm_state=rng.standard_normal((num_slots, H, P, N)),
    )


@needs_torch
def test_torch_consumers_make_no_data_dependent_reads():
    """Under FakeTensorMode a device read (`.item()`, `nonzero`, bool masks) raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, s, pre, options = CONSUMER_CASES["mixed_all"]
    batch, slots = _consumer_batch(q, s, pre)
    tmd = torch_adapter.lower(attnsync.build(batch, backend="mamba", **options), device="cpu")
    inputs = _inputs(batch.num_tokens, slots, seed=1)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_md = type(tmd)(**{
            f.name: mode.from_tensor(getattr(tmd, f.name)) if isinstance(getattr(tmd, f.name), torch.Tensor)
            else getattr(tmd, f.name) for f in dataclasses.fields(tmd)
        })
        t = {name: mode.from_tensor(torch.from_numpy(np.asarray(v))) for name, v in inputs.items()}
        y, state = ref.ssd_chunked_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["ssm_state"], fake_md)
        out, conv = ref.causal_conv1d_varlen(t["xc"], t["weight"], t["bias"], t["conv_state"], fake_md,
                                             activation="silu")
        assert tuple(y.shape) == (batch.num_tokens, H, P) and tuple(conv.shape) == (slots, DIM, WIDTH - 1)
        with pytest.raises(Exception, match="_local_scalar_dense|[Dd]ata.?dependent"):
            t["x"].sum().item()  # the guard is live: a device read raises
        with pytest.raises(Exception, match="nonzero|DynamicOutputShape|[Dd]ata.?dependent"):
            torch.nonzero(fake_md.seq_idx_p)


# --------------------------------------------------------------------------------------------
# JAX consumers


def _x64(jax):
    """Float64 in JAX for one block (`jax.enable_x64`; older releases: jax.experimental)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64(True)


@pytest.fixture(scope="module")
def jax_modules():
    jax = pytest.importorskip("jax")
    from attnsync.adapters import jax as jax_adapter
    from attnsync.kernels import mamba_jax

    return jax, jax_adapter, mamba_jax


# Two cases between them cover every JAX path (mode "all" with checkpoints, plain and speculative
# decodes, short extends, "align"); each jit compile costs seconds on a small CPU host.
@needs_torch
@pytest.mark.parametrize("name", ["mixed_all", "spec_align"])
def test_jax_consumers_match_the_oracle_and_torch(name, jax_modules):
    jax, jax_adapter, mamba_jax = jax_modules
    q, s, pre, options = CONSUMER_CASES[name]
    batch, slots = _consumer_batch(q, s, pre, k=options.get("num_spec_tokens", 0), pad_tokens=2)
    md = attnsync.build(batch, backend="mamba", **options)
    inputs = _inputs(batch.padded_num_tokens, slots, seed=len(name) + 1)
    want = _oracle(batch, md, inputs, options)
    with _x64(jax):
        jmd = jax_adapter.lower(md)
        j = {name_: jax.numpy.asarray(v) for name_, v in inputs.items()}
        y, state = jax.jit(mamba_jax.ssd_chunked_scan_jax)(j["x"], j["dt"], j["A"], j["B"], j["C"], j["D"],
                                                           j["ssm_state"], jmd)
        conv_fn = jax.jit(mamba_jax.causal_conv1d_varlen_jax, static_argnames="activation")
        out, conv = conv_fn(j["xc"], j["weight"], j["bias"], j["conv_state"], jmd, activation="silu")
        got = tuple(np.asarray(v) for v in (y, state, out, conv))
    assert got[0].dtype == np.float64
    _assert_close(got, want)
    _assert_close(got, _torch_consumers(md, inputs), tol=1e-12)


@needs_torch
def test_jax_mixer_matches_the_sequential_layer_in_float32(jax_modules):
    jax, jax_adapter, mamba_jax = jax_modules
    q, s, pre, options = CONSUMER_CASES["mixed_none"]
    batch, slots = _consumer_batch(q, s, pre)
    md = attnsync.build(batch, backend="mamba", **options)
    params = _mixer_params(batch.num_tokens, slots, seed=12)
    want = ref.sequential_mixer(batch, **params, **_mixer_shape(), cache_mode="none")
    j = {name: jax.numpy.asarray(v, dtype=jax.numpy.float32) for name, v in params.items()}
    jmd = jax_adapter.lower(md)

    @jax.jit
    def layer(p, m):
        rest = {name: v for name, v in p.items() if name not in ("xbc", "dt_raw")}
        return mamba_jax.mamba2_mixer_jax(p["xbc"], p["dt_raw"], **rest, md=m, **_mixer_shape())

    with jax.transfer_guard("disallow"):
        got = layer(j, jmd)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=2e-4)
