"""The ``flex`` backend: host builder, torch lowering and flex attention, JAX reference.

- builder against a per-token Python brute force (hand cases and hypothesis);
- every sync-free device form against its naive form, and under ``FakeTensorMode`` (a
  data-dependent op raises there, which is how the CPU CI catches a would-be host sync);
- numpy vs torch vs JAX, bit for bit (lowered fields and device-side rebuilds);
- eager flex attention (CPU) and the JAX reference against a dense-mask float64 reference,
  with the block sparsity enforced, so a missing page would change the output.

Shapes are tiny: eager flex evaluates the mask densely over the whole cache.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnsync
from attnsync import SpecError
from attnsync.backends import flex as flex_backend
from attnsync.backends.flex import FlexMetadata
from attnsync.kernels.reference import paged_attention_reference

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from torch._subclasses.fake_tensor import (  # noqa: E402
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)

from attnsync.integrations import flex_torch as ft  # noqa: E402
from attnsync.adapters import jax as asj  # noqa: E402
from attnsync.adapters import torch as ast  # noqa: E402
from attnsync.kernels import flex_jax as fj  # noqa: E402

DEVICE_FIELDS = ("query_start_loc", "seq_lens", "block_table", "doc_ids", "decode_offset",
                 "num_blocks_per_seq", "physical_to_logical", "kv_num_blocks", "kv_indices")


# ----------------------------------------------------------------------------------------------
# Brute force: per token, per column, plain Python
# ----------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def brute_flex(batch: attnsync.Batch, *, num_pages: int, q_block_size: int = 16, width: int | None = None):
    """Every flex field from the definitions, one token and one column at a time."""
    n, rows, tokens, bs = batch.num_reqs, batch.padded_num_reqs, batch.padded_num_tokens, batch.block_size
    q = [int(x) for x in batch.query_lens] + [0] * (rows - n)
    s = [int(x) for x in batch.seq_lens] + [0] * (rows - n)
    table = [[int(x) for x in row] for row in batch.block_table]
    table += [[0] * batch.block_table.shape[1] for _ in range(rows - n)]
    qsl = [0]
    for r in range(rows):
        qsl.append(qsl[-1] + q[r])
    doc = []
    for r in range(rows):
        doc += [r] * q[r]
    real = len(doc)
    doc += [rows - 1] * (tokens - real)
    offset = [s[r] - q[r] for r in range(rows)]
    used = [-(-s[r] // bs) for r in range(rows)]
    inverse = [[-1] * num_pages for _ in range(rows)]
    for r in range(rows):
        for c in range(used[r]):
            page = table[r][c]
            inverse[r][page] = max(inverse[r][page], c)
        inverse[r][0] = -1
    num_q_blocks = -(-tokens // q_block_size)
    lists: list[list[int]] = [[] for _ in range(num_q_blocks)]
    for t in range(real):
        r = doc[t]
        position = offset[r] + t - qsl[r]
        for c in range(position // bs + 1):
            page = table[r][c]
            if page != 0 and page not in lists[t // q_block_size]:
                lists[t // q_block_size].append(page)
    width = width or _next_pow2(max([len(x) for x in lists] + [1]))
    return dict(
        query_start_loc=np.array(qsl, dtype=np.int32),
        seq_lens=np.array(s, dtype=np.int32),
        doc_ids=np.array(doc, dtype=np.int32),
        decode_offset=np.array(offset, dtype=np.int32),
        num_blocks_per_seq=np.array(used, dtype=np.int32),
        physical_to_logical=np.array(inverse, dtype=np.int32).reshape(rows, num_pages),
        kv_num_blocks=np.array([len(x) for x in lists], dtype=np.int32),
        kv_indices=np.array([x + [-1] * (width - len(x)) for x in lists], dtype=np.int32).reshape(
            num_q_blocks, width),
    )


def brute_mask(batch: attnsync.Batch, *, num_pages: int, window: int | None = None) -> np.ndarray:
    """Dense [T, num_pages * block_size] visibility straight from the batch (the semantics);
    with `window`, a query at p sees keys k with p - k < window only."""
    bs, tokens = batch.block_size, batch.padded_num_tokens
    out = np.zeros((tokens, num_pages * bs), dtype=bool)
    t = 0
    for r in range(batch.num_reqs):
        s, q = int(batch.seq_lens[r]), int(batch.query_lens[r])
        row = [int(x) for x in batch.block_table[r]]
        for i in range(q):
            position = s - q + i
            for slot in range(num_pages * bs):
                page = slot // bs
                columns = [c for c in range(-(-s // bs)) if row[c] == page]
                if page == 0 or not columns:
                    continue
                key = max(columns) * bs + slot % bs  # the latest logical block owns the page
                out[t, slot] = key < s and key <= position and (window is None or position - key < window)
            t += 1
    return out


def dense_attention(q, k_cache, v_cache, mask, scale):
    """Float64 attention of q [T, Hq, D] over the flattened cache with a dense [T, S] mask."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k_cache, v_cache))
    pages, page, kv_heads, dim = k.shape
    k = k.reshape(pages * page, kv_heads, dim)
    v = v.reshape(pages * page, kv_heads, dim)
    group = q.shape[1] // kv_heads
    out = np.zeros(q.shape, dtype=np.float64)
    for h in range(q.shape[1]):
        scores = q[:, h] @ k[:, h // group].T * scale
        scores = np.where(mask, scores, -np.inf)
        top = scores.max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        w = np.where(mask, np.exp(scores - top), 0.0)
        total = w.sum(axis=1, keepdims=True)
        out[:, h] = (w / np.where(total > 0, total, 1.0)) @ v[:, h // group]
    return out


def _check_against_brute(md: FlexMetadata, ref: dict) -> None:
    for name, expected in ref.items():
        got = getattr(md, name)
        assert got.dtype == np.int32, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def mixed_batch(**overrides) -> attnsync.Batch:
    """Decode, prefill, extend and empty rows over a 12-page cache of 4-token pages.

    Row 0 (decode) and row 2 (extend) share pages 2 and 4 (a cached prefix); row 3 lists page 9
    twice (columns 0 and 2: the later one owns it) and holds a stale entry (page 2) beyond its
    length; row 1 is a fresh prefill; row 4 has no tokens this step.
    """
    args = dict(
        query_lens=[1, 6, 3, 2, 0],
        seq_lens=[10, 6, 11, 11, 5],
        block_table=[[2, 4, 7, 0], [5, 6, 0, 0], [2, 4, 8, 0], [9, 3, 9, 2], [10, 11, 0, 0]],
        block_size=4,
        num_cache_pages=12,
    )
    args.update(overrides)
    return attnsync.Batch(**args)


@st.composite
def flex_batches(draw, *, max_reqs: int = 6, max_pages: int = 24):
    """Valid batches with shared pages, in-row duplicates, stale entries, zeros and padding."""
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    num_pages = draw(st.integers(2, max_pages))
    rows = draw(st.integers(0, max_reqs))
    q, computed = [], []
    for _ in range(rows):
        kind = draw(st.sampled_from(["decode", "prefill", "extend", "empty"]))
        if kind == "decode":
            q.append(draw(st.integers(1, 3)))
            computed.append(draw(st.integers(1, 40)))
        elif kind == "prefill":
            q.append(draw(st.integers(1, 20)))
            computed.append(0)
        elif kind == "extend":
            q.append(draw(st.integers(2, 12)))
            computed.append(draw(st.integers(1, 30)))
        else:
            q.append(0)
            computed.append(draw(st.integers(0, 20)))
    s = [a + b for a, b in zip(q, computed, strict=True)]
    width = max([-(-x // bs) for x in s] + [0]) + draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    table = rng.integers(1, num_pages, size=(rows, width)) if num_pages > 1 else np.zeros((rows, width), int)
    if rows and width and draw(st.booleans()):
        table[rng.random((rows, width)) < 0.1] = 0  # a few null pages inside the used columns
    tokens = sum(q)
    pad_rows = draw(st.integers(0, 2))
    pad_tokens = draw(st.integers(0, 5))
    if rows + pad_rows == 0:
        pad_tokens = 0
    batch = attnsync.Batch(
        query_lens=q, seq_lens=s, block_table=table.reshape(rows, width), block_size=bs,
        padded_num_reqs=rows + pad_rows, padded_num_tokens=tokens + pad_tokens,
    )
    return batch, num_pages, draw(st.sampled_from([1, 2, 4, 8, 16]))


def _random_qkv(md: FlexMetadata, *, q_heads=4, kv_heads=2, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(md.num_actual_tokens, q_heads, dim, dtype=dtype, generator=g)
    shape = (md.num_cache_pages, md.block_size, kv_heads, dim)
    return q, torch.randn(*shape, dtype=dtype, generator=g), torch.randn(*shape, dtype=dtype, generator=g)


def _eager_flex(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        return ft.flex_paged_attention(*args, **kwargs)


def _block_restricted_mask_mod(tmd):
    """The paged mask AND "the slot's page is listed for the token's query block".

    Eager flex evaluates the mask densely and ignores the block lists; the compiled kernel only
    visits listed pages. This mask makes eager flex behave like the kernel, so the CPU tests
    check the block sparsity too.
    """
    paged = ft.paged_mask_mod(tmd)
    listed = torch.zeros(tmd.num_q_blocks, tmd.num_cache_pages + 1, dtype=torch.bool)
    columns = torch.arange(tmd.max_kv_blocks)[None, :] < tmd.kv_num_blocks[:, None]
    index = torch.where(columns, tmd.kv_indices, tmd.num_cache_pages).long()
    listed.scatter_(1, index, torch.ones_like(index, dtype=torch.bool))
    qb, page = tmd.q_block_size, tmd.block_size

    def mask_mod(b, h, q_idx, kv_idx):
        return paged(b, h, q_idx, kv_idx) & listed[q_idx // qb, kv_idx // page]

    return mask_mod


def _dense_mask_of(mask_mod, tokens: int, slots: int) -> np.ndarray:
    q_idx = torch.arange(tokens)[:, None]
    kv_idx = torch.arange(slots)[None, :]
    return mask_mod(torch.tensor(0), torch.tensor(0), q_idx, kv_idx).numpy()


# ----------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------


def test_doc_ids_example_with_an_empty_row():
    # qsl [0, 2, 2, 5] -> [0, 0, 2, 2, 2] (vllm-backends.md 6, item 6)
    batch = attnsync.Batch(query_lens=[2, 0, 3], seq_lens=[2, 4, 3], block_table=[[1], [2], [3]],
                           block_size=4, num_cache_pages=4)
    md = attnsync.build(batch, backend="flex")
    assert md.doc_ids.tolist() == [0, 0, 2, 2, 2]


def test_mixed_batch_against_hand_values_and_brute_force():
    batch = mixed_batch(padded_num_reqs=6, padded_num_tokens=14)
    md = attnsync.build(batch, backend="flex", q_block_size=4)
    _check_against_brute(md, brute_flex(batch, num_pages=12, q_block_size=4))
    assert md.doc_ids.tolist() == [0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 5, 5]
    assert md.decode_offset.tolist() == [9, 0, 8, 9, 5, 0]
    assert md.num_blocks_per_seq.tolist() == [3, 2, 3, 3, 2, 0]
    # row 3: page 9 at columns 0 and 2 -> 2 wins; page 2 sits in column 3, beyond ceil(11/4) = 3
    assert md.physical_to_logical[3].tolist() == [-1, -1, -1, 1, -1, -1, -1, -1, -1, 2, -1, -1]
    assert md.physical_to_logical[0, 0] == -1 and (md.physical_to_logical[5] == -1).all()
    # block 0 = tokens 0..3: row 0 (pos 9: columns 0..2 -> 2, 4, 7), row 1 (pos 0..2: page 5)
    # block 1 = tokens 4..7: row 1 (pos 3..5: 5, 6), row 2 (pos 8: 2, 4, 8; the pages row 0
    #   shares with row 2 are listed again, since this is another query block)
    # block 2 = tokens 8..11: row 2 (2, 4, 8), row 3 (pos 9..10: 9, 3, 9 -> 9 once)
    # block 3 = tokens 12..13: padding, nothing
    assert md.kv_num_blocks.tolist() == [4, 5, 5, 0]
    assert md.kv_indices.tolist() == [
        [2, 4, 7, 5, -1, -1, -1, -1],
        [5, 6, 2, 4, 8, -1, -1, -1],
        [2, 4, 8, 9, 3, -1, -1, -1],
        [-1] * 8,
    ]
    assert (md.num_q_blocks, md.max_kv_blocks, md.max_pages_per_seq) == (4, 8, 3)
    assert (md.total_cache_tokens, md.num_actual_tokens, md.num_reqs) == (48, 14, 6)


def test_shared_pages_are_listed_once_per_query_block():
    # two decode rows in one query block share their whole prefix
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[9, 7], block_table=[[3, 5, 6], [3, 5, 0]],
                           block_size=4, num_cache_pages=8)
    md = attnsync.build(batch, backend="flex")
    assert md.kv_num_blocks.tolist() == [3] and md.kv_indices.tolist() == [[3, 5, 6, -1]]


def test_every_array_is_frozen_int32_and_documented():
    md = attnsync.build(mixed_batch(), backend="flex")
    doc = FlexMetadata.__doc__
    for f in dataclasses.fields(md):
        value = getattr(md, f.name)
        if "place" in f.metadata:
            assert value.dtype == np.int32 and not value.flags.writeable, f.name
        assert f"{f.name}:" in doc or f"{f.name}," in doc or f" {f.name}" in doc, f.name


def test_fixed_width_and_device_inverse_table():
    batch = mixed_batch()
    md = attnsync.build(batch, backend="flex", q_block_size=4, max_kv_blocks=6, inverse_table="device")
    ref = brute_flex(batch, num_pages=12, q_block_size=4, width=6)
    ref.pop("physical_to_logical")
    _check_against_brute(md, ref)
    assert md.physical_to_logical.shape == (5, 0) and md.inverse_table_on_device
    with pytest.raises(SpecError, match="max_kv_blocks: query block 1 lists 5 pages"):
        attnsync.build(batch, backend="flex", q_block_size=4, max_kv_blocks=4)


def test_num_cache_pages_from_option_or_batch():
    plain = dict(query_lens=[1], seq_lens=[5], block_table=[[1, 2]], block_size=4)
    md = attnsync.build(attnsync.Batch(**plain), backend="flex", num_cache_pages=3)
    assert md.num_cache_pages == 3 and md.physical_to_logical.shape == (1, 3)
    md = attnsync.build(attnsync.Batch(**plain, num_cache_pages=5), backend="flex")
    assert md.num_cache_pages == 5
    with pytest.raises(SpecError, match="num_cache_pages: the flex backend needs"):
        attnsync.build(attnsync.Batch(**plain), backend="flex")
    with pytest.raises(SpecError, match="the option says 4 but the batch says 5"):
        attnsync.build(attnsync.Batch(**plain, num_cache_pages=5), backend="flex", num_cache_pages=4)
    with pytest.raises(SpecError, match="page id 2 .* num_cache_pages=2"):
        attnsync.build(attnsync.Batch(**plain), backend="flex", num_cache_pages=2)
    with pytest.raises(SpecError, match="beyond int32"):
        attnsync.build(attnsync.Batch(**plain), backend="flex", num_cache_pages=2**30)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(q_block_size=12), SpecError, "power of two"),
        (dict(q_block_size=0), SpecError, "q_block_size"),
        (dict(q_block_size=16.0), TypeError, "q_block_size"),
        (dict(max_kv_blocks=0), SpecError, "max_kv_blocks"),
        (dict(inverse_table="gpu"), SpecError, "inverse_table"),
        (dict(page_size=4), SpecError, "no option"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        attnsync.build(mixed_batch(), backend="flex", **options)


def test_padding_tokens_need_a_row():
    batch = attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 1), int), block_size=4,
                           padded_num_tokens=3, num_cache_pages=2)
    with pytest.raises(SpecError, match="pad the batch to at least one request row"):
        attnsync.build(batch, backend="flex")
    empty = attnsync.build(attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 1), int),
                                          block_size=4, num_cache_pages=2), backend="flex")
    assert empty.kv_indices.shape == (0, 1) and empty.doc_ids.shape == (0,)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches())
def test_builder_matches_brute_force(case):
    batch, num_pages, qb = case
    md = attnsync.build(batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb)
    _check_against_brute(md, brute_flex(batch, num_pages=num_pages, q_block_size=qb))
    # every listed page is distinct and real; rows are left-packed
    for b in range(md.num_q_blocks):
        row = md.kv_indices[b]
        k = md.kv_num_blocks[b]
        assert len(set(row[:k].tolist())) == k and (row[:k] > 0).all() and (row[k:] == -1).all()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches())
def test_a_captured_steps_work_equals_the_host_build(case):
    """`CapturedBlockLists`' graph work (`_captured_work`) run eagerly on the CPU: from the
    staged lengths and table alone, every field it makes equals the host builder's (the device
    lists padded with -1 to their width)."""
    batch, num_pages, qb = case
    if batch.padded_num_tokens and not batch.padded_num_reqs:
        return  # refused by the flex builder (tested elsewhere)
    options = dict(num_cache_pages=num_pages, q_block_size=qb, block_sparse="device", inverse_table="device")
    md = attnsync.build(batch, backend="flex", **options)
    host = attnsync.build(batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb,
                          inverse_table="host", max_kv_blocks=md.max_kv_blocks)
    # what step_batch lowers: no host slots or page counts (zeros of their shapes), the rest equal
    lite = flex_backend._build(batch, **ft._step_batch_options(md), for_captured_graph=True)
    for field in dataclasses.fields(md):
        want, got = getattr(md, field.name), getattr(lite, field.name)
        if field.name in ("slot_mapping", "num_blocks_per_seq"):
            assert got.shape == want.shape and got.dtype == want.dtype and not got.any(), field.name
        elif isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want, err_msg=field.name)
        else:
            assert got == want, field.name
    for built in (md, lite):
        tmd = ast.lower(built, "cpu")
        out = ft._captured_work({name: getattr(tmd, name) for name in ft._CAPTURED_INPUTS}, built)
        for name in ("doc_ids", "decode_offset", "num_blocks_per_seq", "kv_num_blocks", "kv_indices",
                     "physical_to_logical", "slot_mapping"):
            # each with the dtype the staged field has (vLLM's int64 slot ids)
            assert out[name].dtype == getattr(tmd, name).dtype, name
            np.testing.assert_array_equal(out[name].numpy(), getattr(host, name), err_msg=name)
        assert out["slot_mapping"].dtype == torch.int64


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches(max_reqs=4, max_pages=10))
def test_block_lists_cover_the_mask_exactly(case):
    """Every visible (token, slot) lies in a listed page; without in-row duplicates, every listed
    page has a visible slot (the lists are tight)."""
    batch, num_pages, qb = case
    md = attnsync.build(batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb)
    mask = brute_mask(batch, num_pages=num_pages)
    bs = batch.block_size
    duplicates = any(
        len(set(row[: -(-int(s) // bs)].tolist()) - {0}) < len([p for p in row[: -(-int(s) // bs)] if p])
        for row, s in zip(batch.block_table, batch.seq_lens, strict=True)
    )
    for b in range(md.num_q_blocks):
        listed = set(md.kv_indices[b, : md.kv_num_blocks[b]].tolist())
        block_rows = mask[b * qb : (b + 1) * qb]
        opened = {int(slot) // bs for slot in np.flatnonzero(block_rows.any(axis=0))}
        assert opened <= listed
        if not duplicates:
            assert opened == listed


# ----------------------------------------------------------------------------------------------
# Sync-free device forms against their naive forms
# ----------------------------------------------------------------------------------------------


def test_left_pack_worked_example():
    x = torch.tensor([[3, 1, 0, 1, 2], [2, 2, 2, 0, 0]])
    expected = [[3, 1, 2, -1, -1], [2, -1, -1, -1, -1]]
    packed, counts = ft.left_pack_device(x, 3, ignore=0)  # M = 3, the largest value
    assert packed.tolist() == expected and counts.tolist() == [3, 1]
    assert ft._naive_left_pack(x, ignore=0).tolist() == expected
    packed_jax, counts_jax = fj.left_pack_jax(jnp.asarray(x.numpy()), num_values=3)
    assert np.asarray(packed_jax).tolist() == expected and np.asarray(counts_jax).tolist() == [3, 1]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 5), st.integers(0, 9), st.integers(1, 12), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_left_pack_against_nonzero_form(rows, width, values, ignore, seed):
    x = torch.from_numpy(np.random.default_rng(seed).integers(0, values + 1, size=(rows, width)))
    packed, counts = ft.left_pack_device(x, values, ignore=ignore)
    naive = ft._naive_left_pack(x, ignore=ignore)
    assert torch.equal(packed, naive)
    assert counts.tolist() == (naive >= 0).sum(1).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_left_pack_jax_against_nonzero_form(seed):
    # fixed shapes: each new shape is a new XLA compile
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 7, size=(4, 9)))
    naive = ft._naive_left_pack(x, ignore=seed % 2)
    packed, counts = fj.left_pack_jax(jnp.asarray(x.numpy().astype(np.int32)), num_values=6, ignore=seed % 2)
    np.testing.assert_array_equal(np.asarray(packed), naive.numpy())
    np.testing.assert_array_equal(np.asarray(counts), (naive >= 0).sum(1).numpy())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=7), st.integers(0, 4))
def test_doc_ids_against_repeat_interleave_without_output_size(lengths, padding):
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
    total = int(sum(lengths))
    assert torch.equal(ft.doc_ids_device(qsl, total), ft._naive_doc_ids(qsl))
    padded = ft.doc_ids_device(qsl, total, padded_tokens=total + padding)
    assert padded[:total].tolist() == ft._naive_doc_ids(qsl).tolist()
    assert padded[total:].tolist() == [max(len(lengths) - 1, 0)] * padding
    if lengths:
        assert torch.equal(ft.doc_ids_static_device(qsl, total + padding), padded)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches())
def test_inverse_table_against_dictionary_form(case):
    batch, num_pages, _ = case
    table = torch.from_numpy(np.array(batch.block_table))
    lens = torch.from_numpy(np.array(batch.seq_lens))
    device = ft.physical_to_logical_device(table, lens, batch.block_size, num_pages)
    naive = ft._naive_physical_to_logical(table, lens, batch.block_size, num_pages)
    assert device.dtype == torch.int32 and torch.equal(device, naive)
    out = torch.full((batch.num_reqs, num_pages), 7, dtype=torch.int32)
    assert ft.physical_to_logical_device(table, lens, batch.block_size, num_pages, out=out) is out
    assert torch.equal(out, naive)


def test_device_forms_run_under_fake_tensors_and_naive_forms_do_not():
    """FakeTensorMode has no data: any op whose output size or value needs device data raises.

    That is exactly the set of ops that would synchronise on a GPU, so the sync-free forms must
    run and the naive forms must fail.
    """
    md = attnsync.build(mixed_batch(padded_num_tokens=12), backend="flex", q_block_size=4)
    real = ft.lower(md, "cpu")
    mode = FakeTensorMode()
    fake = dataclasses.replace(
        real, **{f.name: mode.from_tensor(getattr(real, f.name)) for f in dataclasses.fields(real)
                 if isinstance(getattr(real, f.name), torch.Tensor)})
    x = mode.from_tensor(torch.tensor([[3, 1, 0, 1, 2], [2, 2, 2, 0, 0]]))
    with mode:
        assert ft.doc_ids_device(fake.query_start_loc, md.num_scheduled_tokens, padded_tokens=12).shape == (12,)
        assert ft.doc_ids_static_device(fake.query_start_loc, 12).shape == (12,)
        assert ft.left_pack_device(x, 3)[0].shape == (2, 5)
        assert ft.physical_to_logical_device(fake.block_table, fake.seq_lens, 4, 12).shape == (5, 12)
        counts, indices = ft.kv_blocks_device(
            fake.doc_ids, fake.query_start_loc, fake.decode_offset, fake.block_table,
            block_size=4, q_block_size=4,
            max_pages=md.max_pages_per_seq, num_pages=12, width=md.max_kv_blocks)
        assert indices.shape == (3, md.max_kv_blocks)
        ft.block_mask(fake)
        ft.block_mask(fake, compute_q_blocks=True)
        with pytest.raises(DynamicOutputShapeException):
            ft._naive_doc_ids(fake.query_start_loc)
        with pytest.raises(DynamicOutputShapeException):
            ft._naive_left_pack(x)
        with pytest.raises(DataDependentOutputException):
            ft._naive_physical_to_logical(fake.block_table, fake.seq_lens, 4, 12)


def test_q_side_indices_are_the_transposed_lists():
    """compute_q_blocks=True: for each page, the query blocks that list it (torch transposes a
    dense [NQ, KV blocks] table, so the narrow kv_indices must be widened first)."""
    md = attnsync.build(mixed_batch(padded_num_tokens=16), backend="flex", q_block_size=4)
    mask = ft.block_mask(ft.lower(md, "cpu"), compute_q_blocks=True)
    assert mask.q_num_blocks.shape == (1, 1, md.num_cache_pages)
    for page in range(md.num_cache_pages):
        expected = {b for b in range(md.num_q_blocks) if page in md.kv_indices[b, : md.kv_num_blocks[b]]}
        count = int(mask.q_num_blocks[0, 0, page])
        assert count == len(expected) and set(mask.q_indices[0, 0, page, :count].tolist()) == expected


def test_logical_mask_mod_replaces_causal():
    tmd = ft.lower(attnsync.build(mixed_batch(), backend="flex", q_block_size=4), "cpu")

    def sliding_window(b, h, q_pos, kv_pos):
        return (kv_pos <= q_pos) & (q_pos - kv_pos < 3)

    got = _dense_mask_of(ft.paged_mask_mod(tmd, logical_mask_mod=sliding_window), 12, 48)
    np.testing.assert_array_equal(got, brute_mask(mixed_batch(), num_pages=12, window=3))


def test_valid_and_causal_equals_where_form():
    # vllm-backends.md 6 item 7: `where(valid, m, False)` -> `valid & m` for boolean m
    tmd = ft.lower(attnsync.build(mixed_batch(), backend="flex", q_block_size=4), "cpu")

    def where_form(b, h, q_idx, kv_idx):
        row = tmd.doc_ids[q_idx]
        lb = tmd.physical_to_logical[row, kv_idx // 4]
        kv_pos = lb * 4 + kv_idx % 4
        valid = (q_idx < tmd.query_start_loc[row + 1]) & (lb >= 0) & (kv_pos < tmd.seq_lens[row])
        causal = kv_pos <= tmd.decode_offset[row] + q_idx - tmd.query_start_loc[row]
        return torch.where(valid, causal, False)

    np.testing.assert_array_equal(_dense_mask_of(where_form, 12, 48),
                                  _dense_mask_of(ft.paged_mask_mod(tmd), 12, 48))


# ----------------------------------------------------------------------------------------------
# numpy vs torch vs JAX, bit for bit
# ----------------------------------------------------------------------------------------------


def _check_numpy_torch_jax(md: FlexMetadata, *, jax_too: bool) -> None:
    """Lowered fields and device-side rebuilds, torch (and JAX) against the host arrays."""
    tmd = ft.lower(md, "cpu")
    for name in DEVICE_FIELDS:
        t = getattr(tmd, name)
        assert t.dtype == torch.int32 and np.array_equal(t.numpy(), getattr(md, name)), name
    assert np.array_equal(tmd.query_start_loc_cpu.numpy(), md.query_start_loc)
    sizes = dict(block_size=md.block_size, q_block_size=md.q_block_size, max_pages=md.max_pages_per_seq,
                 num_pages=md.num_cache_pages, width=md.max_kv_blocks)
    counts, indices = ft.kv_blocks_device(tmd.doc_ids, tmd.query_start_loc, tmd.decode_offset,
                                          tmd.block_table, **sizes)
    assert np.array_equal(counts.numpy(), md.kv_num_blocks) and np.array_equal(indices.numpy(), md.kv_indices)
    inverse = ft.physical_to_logical_device(tmd.block_table, tmd.seq_lens, md.block_size, md.num_cache_pages)
    assert np.array_equal(inverse.numpy(), md.physical_to_logical)
    doc = ft.doc_ids_device(tmd.query_start_loc, md.num_scheduled_tokens, padded_tokens=md.num_actual_tokens)
    assert np.array_equal(doc.numpy(), md.doc_ids)
    if md.num_reqs:
        assert np.array_equal(ft.doc_ids_static_device(tmd.query_start_loc, md.num_actual_tokens).numpy(),
                              md.doc_ids)
    if not jax_too:
        return
    jmd = asj.lower(md)
    for name in DEVICE_FIELDS:
        j = getattr(jmd, name)
        assert j.dtype == jnp.int32 and np.array_equal(np.asarray(j), getattr(md, name)), name
    with jax.transfer_guard("disallow"):
        jcounts, jindices = fj.kv_blocks_jax(jmd.doc_ids, jmd.query_start_loc, jmd.decode_offset,
                                             jmd.block_table, **sizes)
        jinverse = fj.physical_to_logical_jax(jmd.block_table, jmd.seq_lens, block_size=md.block_size,
                                              num_pages=md.num_cache_pages)
        jdoc = fj.doc_ids_jax(jmd.query_start_loc, num_tokens=md.num_actual_tokens)
    assert np.array_equal(np.asarray(jcounts), md.kv_num_blocks)
    assert np.array_equal(np.asarray(jindices), md.kv_indices)
    assert np.array_equal(np.asarray(jinverse), md.physical_to_logical)
    assert np.array_equal(np.asarray(jdoc), md.doc_ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches(max_reqs=5, max_pages=16))
def test_numpy_torch_bit_for_bit(case):
    batch, num_pages, qb = case
    _check_numpy_torch_jax(attnsync.build(batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb),
                           jax_too=False)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(padded_num_reqs=6, padded_num_tokens=14), dict(block_size=2, block_table=[
        [2, 4, 7, 1, 3, 0], [5, 6, 1, 2, 0, 0], [2, 4, 8, 1, 2, 3], [9, 3, 9, 2, 1, 2], [10, 11, 1, 0, 0, 0]])],
)
def test_numpy_torch_jax_bit_for_bit(overrides):
    # fixed cases for JAX: every new shape is a new XLA compile
    md = attnsync.build(mixed_batch(**overrides), backend="flex", q_block_size=4)
    _check_numpy_torch_jax(md, jax_too=True)


# ----------------------------------------------------------------------------------------------
# Attention outputs against the dense float64 reference
# ----------------------------------------------------------------------------------------------


def _real(md):
    return slice(0, md.num_scheduled_tokens)


def test_flex_mixed_batch_against_float64_reference():
    batch = mixed_batch(padded_num_reqs=6, padded_num_tokens=14)
    md = attnsync.build(batch, backend="flex", q_block_size=4)
    tmd = ft.lower(md, "cpu")
    q, k, v = _random_qkv(md)
    mask = brute_mask(batch, num_pages=12)
    np.testing.assert_array_equal(_dense_mask_of(ft.paged_mask_mod(tmd), 14, 48), mask)
    expected = dense_attention(q.numpy(), k.numpy(), v.numpy(), mask, 0.37)
    out = _eager_flex(q, k, v, tmd, scale=0.37)
    assert out.shape == (14, 4, 8) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    assert (out[md.num_scheduled_tokens:] == 0).all()  # padding tokens see nothing
    # the block sparsity holds everything the mask opens
    restricted = ft.block_mask(tmd, mask_mod=_block_restricted_mask_mod(tmd))
    out_sparse = _eager_flex(q, k, v, tmd, scale=0.37, block_mask=restricted)
    np.testing.assert_allclose(out_sparse.numpy(), expected, rtol=0, atol=1e-12)
    # rows without an in-row duplicate page also match the independent paged reference
    plain = paged_attention_reference(q.numpy(), k.numpy(), v.numpy(), query_start_loc=md.query_start_loc,
                                      seq_lens=md.seq_lens, block_table=md.block_table, scale=0.37,
                                      num_reqs=3)
    np.testing.assert_allclose(out.numpy()[:10], plain[:10], rtol=0, atol=1e-12)


def test_jax_reference_against_float64_reference():
    batch = mixed_batch(padded_num_reqs=6, padded_num_tokens=14)
    for inverse_table in ("host", "device"):
        md = attnsync.build(batch, backend="flex", q_block_size=4, inverse_table=inverse_table)
        jmd = asj.lower(md)
        q, k, v = (x.numpy().astype(np.float32) for x in _random_qkv(md))
        expected = dense_attention(q, k, v, brute_mask(batch, num_pages=12), 0.37)
        with jax.transfer_guard("disallow"):
            args = [jax.device_put(a) for a in (q, k, v)]
            out = fj.flex_attention_jax(*args, jmd, scale=0.37)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-6)
        assert (np.asarray(out)[md.num_scheduled_tokens:] == 0).all()


def test_a_missing_page_changes_the_outputs():
    """Negative control: drop one listed page and the block-restricted outputs must change."""
    md = attnsync.build(mixed_batch(), backend="flex", q_block_size=4)
    broken_indices = md.kv_indices.copy()
    broken_counts = md.kv_num_blocks.copy()
    broken_indices[0, 0], broken_counts[0] = broken_indices[0, broken_counts[0] - 1], broken_counts[0] - 1
    broken_indices[0, broken_counts[0]] = -1
    broken = dataclasses.replace(md, kv_indices=freeze_copy(broken_indices), kv_num_blocks=freeze_copy(broken_counts))
    q, k, v = _random_qkv(md)
    good_t, bad_t = ft.lower(md, "cpu"), ft.lower(broken, "cpu")
    good = _eager_flex(q, k, v, good_t, scale=0.5, block_mask=ft.block_mask(
        good_t, mask_mod=_block_restricted_mask_mod(good_t)))
    bad = _eager_flex(q, k, v, bad_t, scale=0.5, block_mask=ft.block_mask(
        bad_t, mask_mod=_block_restricted_mask_mod(bad_t)))
    assert not torch.allclose(good, bad)
    jgood = fj.flex_attention_jax(*(jnp.asarray(x.numpy()) for x in (q, k, v)), asj.lower(md), scale=0.5)
    jbad = fj.flex_attention_jax(*(jnp.asarray(x.numpy()) for x in (q, k, v)), asj.lower(broken), scale=0.5)
    assert not np.allclose(np.asarray(jgood), np.asarray(jbad))


def freeze_copy(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches(max_reqs=4, max_pages=8))
def test_flex_random_batches_against_float64_reference(case):
    batch, num_pages, qb = case
    if batch.padded_num_tokens == 0:
        return
    md = attnsync.build(batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb)
    tmd = ft.lower(md, "cpu")
    q, k, v = _random_qkv(md, q_heads=2, kv_heads=1, dim=4)
    expected = dense_attention(q.numpy(), k.numpy(), v.numpy(), brute_mask(batch, num_pages=num_pages), 0.5)
    restricted = ft.block_mask(tmd, mask_mod=_block_restricted_mask_mod(tmd))
    out = _eager_flex(q, k, v, tmd, scale=0.5, block_mask=restricted)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_inverse_table_on_device_gives_the_same_outputs():
    batch = mixed_batch()
    host = attnsync.build(batch, backend="flex", q_block_size=4)
    device = attnsync.build(batch, backend="flex", q_block_size=4, inverse_table="device")
    tmd = ft.lower(device, "cpu")
    assert torch.equal(tmd.physical_to_logical, torch.from_numpy(np.array(host.physical_to_logical)))
    generic = ast.lower(device, "cpu")  # the generic lowering: the mask builds the table itself
    q, k, v = _random_qkv(host)
    expected = _eager_flex(q, k, v, ft.lower(host, "cpu"), scale=0.5)
    torch.testing.assert_close(_eager_flex(q, k, v, tmd, scale=0.5), expected, rtol=0, atol=0)
    torch.testing.assert_close(_eager_flex(q, k, v, generic, scale=0.5), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Inexact rows: host bounds for the page lists, exact device lengths for the mask
# ----------------------------------------------------------------------------------------------


def _spec_decode_batches():
    """The same step twice: exact lengths, and host bounds (every draft assumed accepted).

    Row 0 is a decode with 2 drafts of which 2 were rejected in the previous step (bound +2),
    crossing a page boundary; its bound column holds page 2 again, which would move page 2's
    logical block under the bound. Row 1 is exact (a prefill).
    """
    common = dict(query_lens=[3, 4], block_table=[[2, 6, 2], [5, 0, 0]], block_size=4,
                  num_cache_pages=8)
    exact = attnsync.Batch(seq_lens=[8, 4], **common)
    bound = attnsync.Batch(seq_lens=[10, 4], seq_lens_exact=[False, True], **common)
    return exact, bound


def test_inexact_rows_use_bounds_on_the_host_and_exact_lengths_on_the_device():
    exact_batch, bound_batch = _spec_decode_batches()
    exact = attnsync.build(exact_batch, backend="flex", q_block_size=4)
    bound = attnsync.build(bound_batch, backend="flex", q_block_size=4)
    assert not bound.all_exact
    # the bound only adds pages to the lists
    for b in range(exact.num_q_blocks):
        assert set(exact.kv_indices[b, : exact.kv_num_blocks[b]]) <= set(bound.kv_indices[b, : bound.kv_num_blocks[b]])
    # the host bound gets page 2 wrong (logical 2 instead of 0); the device recompute fixes it
    assert bound.physical_to_logical[0, 2] == 2 and exact.physical_to_logical[0, 2] == 0
    exact_lens = torch.tensor([8, 4], dtype=torch.int32)
    tmd = ft.lower(bound, "cpu", seq_lens=exact_lens)
    assert tmd.all_exact
    for name in ("decode_offset", "num_blocks_per_seq", "physical_to_logical", "seq_lens", "slot_mapping"):
        reference = ft.lower(exact, "cpu")
        assert torch.equal(getattr(tmd, name), getattr(reference, name)), name
    q, k, v = _random_qkv(exact)
    expected = dense_attention(q.numpy(), k.numpy(), v.numpy(), brute_mask(exact_batch, num_pages=8), 0.5)
    restricted = ft.block_mask(tmd, mask_mod=_block_restricted_mask_mod(tmd))
    out = _eager_flex(q, k, v, tmd, scale=0.5, block_mask=restricted)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches(max_reqs=5, max_pages=16), st.integers(0, 2**31 - 1))
def test_bounds_only_add_pages_and_device_rebuilds_are_exact(case, seed):
    batch, num_pages, qb = case
    rng = np.random.default_rng(seed)
    computed = batch.seq_lens - batch.query_lens
    inexact = (computed > 0) & (batch.query_lens > 0) & (rng.random(batch.num_reqs) < 0.6)
    error = np.where(inexact, rng.integers(0, 3, batch.num_reqs), 0)  # rejected drafts
    bound_lens = batch.seq_lens + error
    width = max(batch.block_table.shape[1], int((-(-bound_lens // batch.block_size)).max(initial=0)))
    table = rng.integers(1, num_pages, size=(batch.num_reqs, width))
    table[:, : batch.block_table.shape[1]] = batch.block_table
    common = dict(query_lens=batch.query_lens, block_table=table, block_size=batch.block_size,
                  padded_num_reqs=batch.padded_num_reqs, padded_num_tokens=batch.padded_num_tokens)
    exact_batch = attnsync.Batch(seq_lens=batch.seq_lens, **common)
    bound_batch = attnsync.Batch(seq_lens=bound_lens, seq_lens_exact=~inexact, **common)
    exact = attnsync.build(exact_batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb)
    bound = attnsync.build(bound_batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb)
    for b in range(exact.num_q_blocks):
        assert set(exact.kv_indices[b, : exact.kv_num_blocks[b]]) <= set(bound.kv_indices[b, : bound.kv_num_blocks[b]])
    lens = torch.zeros(batch.padded_num_reqs, dtype=torch.int32)
    lens[: batch.num_reqs] = torch.from_numpy(np.array(batch.seq_lens))
    tmd = ft.lower(bound, "cpu", seq_lens=lens)
    reference = ft.lower(exact, "cpu")
    for name in ("seq_lens", "decode_offset", "num_blocks_per_seq", "physical_to_logical", "slot_mapping"):
        assert torch.equal(getattr(tmd, name), getattr(reference, name)), name
    # rebuilt on the device from the exact lengths (sizes from the bound metadata): exact lists
    counts, indices = ft.kv_blocks_device(tmd.doc_ids, tmd.query_start_loc, tmd.decode_offset, tmd.block_table,
                                          block_size=batch.block_size, q_block_size=qb,
                                          max_pages=bound.max_pages_per_seq, num_pages=num_pages,
                                          width=exact.max_kv_blocks)
    assert np.array_equal(counts.numpy(), exact.kv_num_blocks) and np.array_equal(indices.numpy(), exact.kv_indices)


def test_inexact_rows_refused_without_exact_device_lengths():
    _, bound_batch = _spec_decode_batches()
    bound = attnsync.build(bound_batch, backend="flex", q_block_size=4)
    with pytest.raises(SpecError, match="seq_lens"):
        ft.lower(bound, "cpu")
    generic = ast.lower(bound, "cpu", seq_lens=torch.tensor([8, 4], dtype=torch.int32))
    with pytest.raises(SpecError, match="block_mask: this lowering still holds host upper bounds"):
        ft.block_mask(generic)
    with pytest.raises(SpecError, match="inexact"):
        asj.lower(bound)


def test_flex_lower_refuses_other_metadata():
    with pytest.raises(TypeError, match="FlexMetadata"):
        ft.lower(attnsync.build(mixed_batch()), "cpu")


def test_attention_shape_checks():
    md = attnsync.build(mixed_batch(), backend="flex", q_block_size=4)
    tmd = ft.lower(md, "cpu")
    q, k, v = _random_qkv(md)
    with pytest.raises(SpecError, match="do not match the metadata"):
        ft.flex_paged_attention(q[:-1], k, v, tmd, scale=1.0)
    with pytest.raises(SpecError, match="k_cache/v_cache"):
        ft.flex_paged_attention(q, k, v[:-1], tmd, scale=1.0)


def test_auto_inverse_table_stages_small_tables_and_leaves_large_ones_to_the_device():
    batch = attnsync.Batch(query_lens=[1, 3], seq_lens=[6, 3], block_table=[[2, 5], [3, 0]], block_size=4)
    small = attnsync.build(batch, backend="flex", num_cache_pages=8)
    assert not small.inverse_table_on_device and small.physical_to_logical.shape == (2, 8)
    # 2 rows x 2**18 pages x 4 bytes = 2 MiB > 1 MiB: one device scatter instead of staging it
    large = attnsync.build(batch, backend="flex", num_cache_pages=1 << 18)
    assert large.inverse_table_on_device and large.physical_to_logical.shape == (2, 0)
    forced = attnsync.build(batch, backend="flex", num_cache_pages=1 << 18, inverse_table="host")
    assert forced.physical_to_logical.shape == (2, 1 << 18)
    np.testing.assert_array_equal(forced.physical_to_logical[:, :8], small.physical_to_logical)


# ----------------------------------------------------------------------------------------------
# block_sparse="device": the lists built by the consumers
# ----------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches())
def test_device_block_lists_equal_the_host_lists(case):
    batch, num_pages, qb = case
    host = attnsync.build(batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb)
    md = attnsync.build(batch, backend="flex", num_cache_pages=num_pages, q_block_size=qb, block_sparse="device")
    assert md.block_sparse_on_device and not host.block_sparse_on_device
    assert md.kv_indices.shape == (md.num_q_blocks, 0)
    # the host bound holds every host list: the device list is never cut
    assert md.max_kv_blocks >= int(host.kv_num_blocks.max(initial=0))
    tmd = ft.lower(md, "cpu")
    assert tmd.kv_indices.shape == (md.num_q_blocks, md.max_kv_blocks)
    np.testing.assert_array_equal(tmd.kv_num_blocks.numpy(), host.kv_num_blocks)
    width = host.kv_indices.shape[1]
    shown = min(width, md.max_kv_blocks)
    np.testing.assert_array_equal(tmd.kv_indices.numpy()[:, :shown], host.kv_indices[:, :shown])
    assert (tmd.kv_indices.numpy()[:, width:] == -1).all()


def test_device_block_lists_give_the_reference_outputs_in_torch_and_jax():
    batch = mixed_batch(padded_num_reqs=6, padded_num_tokens=14)
    md = attnsync.build(batch, backend="flex", q_block_size=4, block_sparse="device")
    tmd = ft.lower(md, "cpu")
    q, k, v = _random_qkv(md)
    expected = dense_attention(q.numpy(), k.numpy(), v.numpy(), brute_mask(batch, num_pages=12), 0.37)
    restricted = ft.block_mask(tmd, mask_mod=_block_restricted_mask_mod(tmd))
    out = _eager_flex(q, k, v, tmd, scale=0.37, block_mask=restricted)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    jmd = asj.lower(md)
    with jax.transfer_guard("disallow"):
        args = [jax.device_put(a.numpy().astype(np.float32)) for a in (q, k, v)]
        jout = fj.flex_attention_jax(*args, jmd, scale=0.37)
    np.testing.assert_allclose(np.asarray(jout), expected, rtol=0, atol=2e-6)


def test_device_block_lists_refuse_a_width_below_the_bound():
    batch = mixed_batch()
    md = attnsync.build(batch, backend="flex", q_block_size=16, block_sparse="device")
    bound = md.max_kv_blocks
    assert bound >= 2
    with pytest.raises(SpecError, match=r"max_kv_blocks: 1 columns, but a query block .* up to \d+ pages"):
        attnsync.build(batch, backend="flex", q_block_size=16, block_sparse="device", max_kv_blocks=1)
    with pytest.raises(SpecError, match=r"block_sparse: unknown value 'gpu'"):
        attnsync.build(batch, backend="flex", block_sparse="gpu")


def test_captured_block_lists_refuse_what_they_cannot_capture():
    batch = mixed_batch()
    host_lists = attnsync.build(batch, backend="flex", q_block_size=4)
    with pytest.raises(SpecError, match="block_sparse='device', inverse_table='device'"):
        ft.CapturedBlockLists(host_lists, "cpu")
    device_lists = attnsync.build(batch, backend="flex", q_block_size=4, block_sparse="device",
                                  inverse_table="device")
    with pytest.raises(SpecError, match="CUDA graphs need a CUDA device"):
        ft.CapturedBlockLists(device_lists, "cpu")
    with pytest.raises(TypeError, match="expected FlexMetadata"):
        ft.CapturedBlockLists(attnsync.build(batch), "cpu")


# ----------------------------------------------------------------------------------------------
# The decode fast path of the builder, and the BlockMask built once over fixed tensors
# ----------------------------------------------------------------------------------------------


@st.composite
def decode_batches(draw):
    """One token per row (decode steps), padded or not, exact or not, shared and stale pages."""
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    num_pages = draw(st.sampled_from([2, 9, 40, 2000]))
    rows = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, draw(st.sampled_from([2, 8, 60])) + 1, size=rows)
    width = int(-(-seq.max() // bs)) + draw(st.integers(0, 2))
    if rows * width < num_pages and draw(st.booleans()):  # no page shared (no dedupe needed)
        table = rng.permutation(np.arange(1, num_pages))[: rows * width].reshape(rows, width)
    else:
        table = rng.integers(0, num_pages, size=(rows, width))  # nulls, duplicates, stale entries
    exact = True
    if draw(st.booleans()):
        exact = (rng.random(rows) < 0.7) | (seq < 2)  # an inexact row needs context
    return attnsync.Batch(
        query_lens=np.ones(rows, dtype=np.int64), seq_lens=seq, block_table=table, block_size=bs,
        seq_lens_exact=exact, num_cache_pages=num_pages,
        padded_num_reqs=rows + draw(st.sampled_from([0, 0, 3])),
        padded_num_tokens=rows + draw(st.sampled_from([0, 0, 5])),
    ), draw(st.sampled_from([1, 2, 4, 16]))


def _general_fields(batch: attnsync.Batch, qb: int) -> tuple[dict, int]:
    """The per-token and per-row fields and the device-list bound by the general derivation (no
    decode shortcut): what the builder computed for every batch before its decode fast path."""
    common = attnsync.build(batch)
    t, r_pad = common.num_scheduled_tokens, common.num_reqs
    doc_ids = np.full(common.num_actual_tokens, max(r_pad - 1, 0), dtype=np.int32)
    doc_ids[:t] = common.token_to_req[:t]
    pages = -(-common.seq_lens.astype(np.int64) // common.block_size)
    owned_before = np.concatenate([[0], np.cumsum(pages[: common.num_scheduled_reqs])])
    first = np.arange(0, t, qb)
    last = np.minimum(first + qb, t) - 1
    most = (owned_before[common.token_to_req[last] + 1] - owned_before[common.token_to_req[first]]).max(initial=0)
    bound = max(0, min(int(most), batch.num_cache_pages - 1))
    return dict(doc_ids=doc_ids, num_blocks_per_seq=pages.astype(np.int32),
                decode_offset=np.asarray(common.num_computed_tokens, dtype=np.int32)), bound


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decode_batches())
def test_decode_fast_path_equals_the_general_path(case):
    batch, qb = case
    fields, bound = _general_fields(batch, qb)
    options = dict(q_block_size=qb, block_sparse="device", inverse_table="device")
    md = attnsync.build(batch, backend="flex", **options)
    assert md.max_kv_blocks == _next_pow2(max(bound, 1))
    host = attnsync.build(batch, backend="flex", q_block_size=qb)  # host lists: the bound holds them
    assert int(host.kv_num_blocks.max(initial=0)) <= bound
    for name, expected in fields.items():
        got = getattr(md, name)
        assert got.dtype == expected.dtype and got.shape == expected.shape and not got.flags.writeable, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    for name, shape in (("physical_to_logical", (md.num_reqs, 0)), ("kv_num_blocks", (md.num_q_blocks,)),
                        ("kv_indices", (md.num_q_blocks, 0))):
        got = getattr(md, name)
        assert got.shape == shape and got.dtype == np.int32 and not got.flags.writeable and not got.any(), name
    # a fixed width: the same metadata at any width >= the bound (some of them above the cheap
    # q_block_size * max_pages_per_seq bound that skips computing it), refused below it
    for width in {max(bound, 1), bound + 1, 2 * md.max_kv_blocks, qb * md.max_pages_per_seq + 1}:
        fixed = attnsync.build(batch, backend="flex", max_kv_blocks=width, **options)
        assert fixed.max_kv_blocks == width
        for name in fields:
            np.testing.assert_array_equal(getattr(fixed, name), getattr(md, name), err_msg=name)
    if bound > 1:
        with pytest.raises(SpecError, match=rf"max_kv_blocks: {bound - 1} columns, .* up to {bound} pages"):
            attnsync.build(batch, backend="flex", max_kv_blocks=bound - 1, **options)
    # host lists (one mask of the block table for decode steps) and the host inverse table
    _check_against_brute(host, brute_flex(batch, num_pages=batch.num_cache_pages, q_block_size=qb))
    for name in ("kv_num_blocks", "kv_indices", "physical_to_logical"):
        assert not getattr(host, name).flags.writeable, name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flex_batches())
def test_device_list_bound_of_any_batch_equals_the_general_derivation(case):
    batch, num_pages, qb = case
    batch = dataclasses.replace(batch, num_cache_pages=num_pages)
    _, bound = _general_fields(batch, qb)
    md = attnsync.build(batch, backend="flex", q_block_size=qb, block_sparse="device")
    assert md.max_kv_blocks == _next_pow2(max(bound, 1))


def test_cache_pages_of_the_option_are_checked_against_the_table():
    # the batch's own num_cache_pages was checked by Batch; an option the batch did not see is
    # checked here
    plain = dict(query_lens=[1], seq_lens=[5], block_table=[[1, 7]], block_size=4)
    with pytest.raises(SpecError, match="page id 7 at \\(0, 1\\) is outside the cache of num_cache_pages=5"):
        attnsync.build(attnsync.Batch(**plain), backend="flex", num_cache_pages=5)
    with pytest.raises(SpecError, match="page id 7"):
        attnsync.Batch(**plain, num_cache_pages=5)
    assert attnsync.build(attnsync.Batch(**plain, num_cache_pages=8), backend="flex").num_cache_pages == 8


def _same_shape_batch_b(**padding) -> attnsync.Batch:
    """Another step of `mixed_batch`'s shapes (rows, table width, cache): other lengths and pages."""
    return attnsync.Batch(query_lens=[2, 1, 4, 3, 1], seq_lens=[6, 9, 8, 12, 3],
                          block_table=[[3, 1, 0, 0], [6, 10, 11, 0], [3, 1, 2, 5], [7, 8, 7, 0], [4, 0, 0, 0]],
                          block_size=4, num_cache_pages=12, **padding)


def test_a_block_mask_built_once_over_fixed_tensors_follows_every_step():
    """What `CapturedBlockLists.block_mask` rests on, checked on the CPU: a persistent stager
    writes every lowering into the same memory (each lowering hands out new tensor objects over
    it), so one BlockMask built over views of it and over fixed output tensors, refilled in
    place per step as the graph replay does, is every step's mask; here it gives the same
    attention as a BlockMask built fresh for the step, and the dense reference."""
    padding = dict(padded_num_reqs=6, padded_num_tokens=14)
    batches = [mixed_batch(**padding), _same_shape_batch_b(**padding)]
    options = dict(q_block_size=4, block_sparse="device", inverse_table="device")
    options["max_kv_blocks"] = max(attnsync.build(b, backend="flex", **options).max_kv_blocks for b in batches)
    stager = ast.Stager("cpu", persistent=True)
    md = attnsync.build(batches[0], backend="flex", **options)
    first = ast.lower(md, "cpu", stager=stager)
    staged = {name: getattr(first, name).view(getattr(first, name).shape) for name in ft._CAPTURED_INPUTS}
    del first
    outputs = {name: torch.empty_like(value) for name, value in ft._captured_work(staged, md).items()}

    def replay():  # the captured graph's work, reading only the fixed views
        for name, value in ft._captured_work(staged, md).items():
            outputs[name].copy_(value)

    mask = ft.CapturedBlockLists._fixed_block_mask(md, staged, outputs)
    assert mask.q_indices is None and mask.kv_indices.data_ptr() == outputs["kv_indices"].data_ptr()
    for i, batch in enumerate([batches[1], batches[0], batches[1]]):
        step = attnsync.build(batch, backend="flex", **options)
        tmd = ast.lower(step, "cpu", stager=stager)
        assert tmd.seq_lens.data_ptr() == staged["seq_lens"].data_ptr()  # new objects, same memory
        replay()
        # the fields the graph derives from the staged lengths equal the host builder's
        for name in ("doc_ids", "decode_offset", "num_blocks_per_seq", "slot_mapping"):
            assert outputs[name].dtype == tmd.__dict__[name].dtype, name
            np.testing.assert_array_equal(outputs[name].numpy(), getattr(step, name), err_msg=name)
        host = attnsync.build(batch, backend="flex", q_block_size=4, max_kv_blocks=options["max_kv_blocks"])
        np.testing.assert_array_equal(mask.kv_num_blocks[0, 0].numpy(), host.kv_num_blocks)
        np.testing.assert_array_equal(mask.kv_indices[0, 0].numpy(), host.kv_indices)
        np.testing.assert_array_equal(_dense_mask_of(mask.mask_mod, 14, 48), brute_mask(batch, num_pages=12))
        q, k, v = _random_qkv(step, seed=i)
        cached = _eager_flex(q, k, v, tmd, scale=0.37, block_mask=mask)
        fresh = _eager_flex(q, k, v, tmd, scale=0.37, block_mask=ft.block_mask(ft.lower(step, "cpu")))
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
        expected = dense_attention(q.numpy(), k.numpy(), v.numpy(), brute_mask(batch, num_pages=12), 0.37)
        np.testing.assert_allclose(cached.numpy(), expected, rtol=0, atol=1e-12)
