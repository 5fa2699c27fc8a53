"""The ``tree`` backend: tree parsing, bias, split and maxima, lowerings, and its consumers.

Every builder output is checked against a per-row Python reference that shares none of its
code; the bias against a matrix written by hand; the host maxima against the sync-ful
``.max().item()`` forms vLLM used; the lowered fields numpy vs torch vs JAX bit for bit; and
the torch, JAX and Triton consumers against the float64 reference, itself checked by hand and
against the causal reference of `attnsync.kernels.reference`. The Triton tests run the kernel
on CPU tensors through Triton's interpreter (marked `triton_cpu`; tests/gpu/test_tree_gpu.py
runs it on CUDA).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import batches

import attnsync
from attnsync.backends.tree import (
    TreeMetadata,
    parse_speculative_token_tree,
    tree_attention_bias,
)
from attnsync.kernels.reference import paged_attention_reference, relative_error
from attnsync.kernels.tree_reference import tree_paged_attention_reference

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
from attnsync.adapters import jax as jax_adapter  # noqa: E402
from attnsync.adapters import torch as torch_adapter  # noqa: E402
from attnsync.kernels.tree_jax import tree_paged_attention_jax  # noqa: E402
from attnsync.kernels.tree_reference import tree_paged_attention_torch  # noqa: E402

TREE = "[(0,), (1,), (0, 0), (0, 1)]"  # 4 drafted nodes + root: L = 5
INF = -np.inf


# ---------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------


def test_bias_of_the_hand_tree():
    # nodes: 0 root, 1 (0,), 2 (1,), 3 (0, 0), 4 (0, 1)
    expected = np.array(
        [
            [0, INF, INF, INF, INF],  # root sees itself
            [0, 0, INF, INF, INF],  # (0,): root, itself
            [0, INF, 0, INF, INF],  # (1,): root, itself (not its sibling (0,))
            [0, 0, INF, 0, INF],  # (0, 0): root, parent (0,), itself
            [0, 0, INF, INF, 0],  # (0, 1): root, parent (0,), itself (not sibling (0, 0))
        ],
        dtype=np.float32,
    )
    for tree in (TREE, [(0,), (1,), (0, 0), (0, 1)], [[0, 1], [0], (1,), (0, 0)], "  [(0,),(1,),(0,0),(0,1)] "):
        bias = tree_attention_bias(tree)
        assert bias.dtype == np.float32 and bias.shape == (5, 5)
        np.testing.assert_array_equal(bias, expected)
        assert not bias.flags.writeable
    md = attnsync.build(_batch(), backend="tree", speculative_token_tree=TREE)
    np.testing.assert_array_equal(md.tree_attn_bias, expected)
    assert md.tree_size == 5


def test_canonical_order_and_default():
    assert parse_speculative_token_tree("[(1, 0), (0,), (1,), (0, 2), (0, 0)]") == (
        (0,), (1,), (0, 0), (0, 2), (1, 0),
    )
    assert parse_speculative_token_tree(None) == ((0,),)
    assert parse_speculative_token_tree([(np.int64(2),)]) == ((2,),)
    assert isinstance(parse_speculative_token_tree([(np.int64(2),)])[0][0], int)
    md = attnsync.build(_batch(query_lens=[2, 5], seq_lens=[9, 5], block_table=[[1], [2]]), backend="tree")
    assert md.tree_size == 2
    np.testing.assert_array_equal(md.tree_attn_bias, [[0, INF], [0, 0]])


@pytest.mark.parametrize(
    ("tree", "error", "match"),
    [
        ("[(0,), (1,]", attnsync.SpecError, r"not a Python literal.*Fix"),
        ("__import__('os')", attnsync.SpecError, "not a Python literal"),
        ("[(0)]", TypeError, r"entry 0 is the int 0.*\(0,\)"),
        ("(0,)", TypeError, r"entry 0 is the int 0"),
        ("[]", attnsync.SpecError, "no path"),
        ("[(0,), ()]", attnsync.SpecError, "empty path"),
        ("[(0,), (0,)]", attnsync.SpecError, r"path \(0,\) appears twice"),
        ("[(0,), (0, 1, 2)]", attnsync.SpecError, r"path \(0, 1, 2\) has no parent: \(0, 1\).*Fix: add \(0, 1\)"),
        ("[(1, 0)]", attnsync.SpecError, r"\(1, 0\) has no parent: \(1,\)"),
        ("[(0,), (0, -1)]", attnsync.SpecError, r"path \(0, -1\) has the negative child index -1"),
        ([(0,), (True,)], TypeError, r"child index True"),
        ([(0,), (0, 1.0)], TypeError, r"path \(0, 1.0\) has the child index 1.0"),
        ([(0,), "ab"], TypeError, "entry 1"),
        (42, TypeError, "expected a list of paths"),
        ("{'a': 1}", TypeError, "expected a list of paths"),
    ],
)
def test_bad_trees_name_the_path_and_the_fix(tree, error, match):
    with pytest.raises(error, match=match):
        parse_speculative_token_tree(tree)
    with pytest.raises(error, match=match):
        attnsync.build(_batch(), backend="tree", speculative_token_tree=tree)


@st.composite
def trees(draw, max_nodes: int = 10, max_children: int = 4) -> list[tuple[int, ...]]:
    """Valid trees as a shuffled list of paths."""
    paths: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(1, max_nodes))):
        parent = draw(st.sampled_from([(), *paths]))
        used = {p[-1] for p in paths if p[:-1] == parent}
        free = [c for c in range(max_children) if c not in used]
        if free:
            paths.append((*parent, draw(st.sampled_from(free))))
    return draw(st.permutations(paths))


@settings(max_examples=150, deadline=None)
@given(trees())
def test_bias_against_brute_force(tree):
    order = parse_speculative_token_tree(tree)
    assert sorted(order) == sorted(tree) and len(order) == len(tree)
    # canonical order: by depth, then lexicographic; every ancestor before its node
    assert list(order) == sorted(order, key=lambda p: (len(p), p))
    nodes = [(), *order]
    bias = tree_attention_bias(tree)
    for i, pi in enumerate(nodes):
        for j, pj in enumerate(nodes):
            sees = i == j or j == 0 or (len(pj) < len(pi) and pi[: len(pj)] == pj)
            assert bias[i, j] == (0.0 if sees else -np.inf), (pi, pj)
    # a string and a list describe the same tree
    np.testing.assert_array_equal(tree_attention_bias(str(list(tree))), bias)


# ---------------------------------------------------------------------------------------------
# The builder against a per-row reference
# ---------------------------------------------------------------------------------------------


def _batch(**overrides) -> attnsync.Batch:
    args = dict(query_lens=[5, 1, 0, 7, 3], seq_lens=[30, 9, 4, 7, 20], block_table=np.arange(10).reshape(5, 2),
                block_size=16, is_prefilling=[False, False, False, True, True])
    if "query_lens" in overrides:
        del args["is_prefilling"]  # the default rows' flags do not describe other rows
    args.update(overrides)
    return attnsync.Batch(**args)


def brute_force_tree(batch: attnsync.Batch, size: int) -> dict:
    """Tree metadata of `batch` row by row, in plain Python."""
    n, r_pad = batch.num_reqs, batch.padded_num_reqs
    q = [int(x) for x in batch.query_lens] + [0] * (r_pad - n)
    s = [int(x) for x in batch.seq_lens] + [0] * (r_pad - n)
    pre = [bool(x) for x in batch.is_prefilling] if batch.is_prefilling is not None else [False] * n
    decode = [q[r] <= size and not pre[r] for r in range(n)]
    nd = 0
    while nd < n and decode[nd]:
        nd += 1
    assert not any(decode[nd:]), "not decode-first"
    qsl = [0]
    for r in range(r_pad):
        qsl.append(qsl[-1] + q[r])
    return dict(
        num_decodes=nd,
        num_decode_tokens=sum(q[:nd]),
        num_prefills=n - nd,
        num_prefill_tokens=sum(q[nd:n]),
        max_decode_query_len=max(q[:nd], default=0),
        max_decode_seq_len=max(s[:nd], default=0),
        max_prefill_query_len=max(q[nd:n], default=0),
        max_prefill_seq_len=max(s[nd:n], default=0),
        prefill_query_start_loc=[qsl[r] - qsl[nd] for r in range(nd, r_pad + 1)],
        query_start_loc=qsl,
        seq_lens=s,
    )


def _check_against_brute_force(batch: attnsync.Batch, tree, md: TreeMetadata) -> None:
    size = len(parse_speculative_token_tree(tree)) + 1
    ref = brute_force_tree(batch, size)
    for name in ("num_decodes", "num_decode_tokens", "num_prefills", "num_prefill_tokens",
                 "max_decode_query_len", "max_decode_seq_len", "max_prefill_query_len", "max_prefill_seq_len"):
        assert getattr(md, name) == ref[name], name
        assert type(getattr(md, name)) is int, name
    for name in ("prefill_query_start_loc", "query_start_loc", "seq_lens"):
        value = getattr(md, name)
        assert value.dtype == np.int32 and not value.flags.writeable, name
        np.testing.assert_array_equal(value, ref[name], err_msg=name)
    assert md.tree_size == size and md.max_decode_query_len <= size


def test_hand_case_split_and_maxima():
    # L = 5: rows 0-2 decode (5, 1 and an empty row), rows 3-4 prefill (7 > 5; 3 is prefilling)
    batch = _batch(padded_num_reqs=7, padded_num_tokens=20)
    md = attnsync.build(batch, backend="tree", speculative_token_tree=TREE)
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills, md.num_prefill_tokens) == (3, 6, 2, 10)
    assert (md.max_decode_query_len, md.max_decode_seq_len) == (5, 30)
    assert (md.max_prefill_query_len, md.max_prefill_seq_len) == (7, 20)
    # query_start_loc [0, 5, 6, 6, 13, 16, 16, 16]; rebased from row 3, padding rows repeat
    assert md.prefill_query_start_loc.tolist() == [0, 7, 10, 10, 10]
    assert (md.num_reqs, md.num_actual_tokens, md.max_query_len, md.max_seq_len) == (7, 20, 7, 30)
    _check_against_brute_force(batch, TREE, md)
    # The common fields are build_common's arrays, copied by reference (no copy per step).
    common = attnsync.build(batch, decode_threshold=5)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        np.testing.assert_array_equal(getattr(md, name), getattr(common, name))


def test_short_prefill_chunks_are_attended_causally():
    # A 3-token chunk of a prompt (is_prefilling) is short enough to be a decode but is not a
    # draft block: it must land in the prefill sub-batch.
    batch = _batch(query_lens=[2, 3], seq_lens=[10, 3], block_table=[[1], [2]], is_prefilling=[False, True])
    md = attnsync.build(batch, backend="tree", speculative_token_tree=TREE)
    assert (md.num_decodes, md.num_prefills, md.max_prefill_query_len) == (1, 1, 3)


def test_all_decodes_and_no_decodes_and_empty():
    decodes = attnsync.build(_batch(query_lens=[5, 1], seq_lens=[9, 4], block_table=[[1], [2]]),
                             backend="tree", speculative_token_tree=TREE)
    assert (decodes.num_decodes, decodes.num_prefills, decodes.max_prefill_query_len) == (2, 0, 0)
    assert decodes.max_prefill_seq_len == 0 and decodes.prefill_query_start_loc.tolist() == [0]
    prefills = attnsync.build(_batch(query_lens=[6, 9], seq_lens=[6, 9], block_table=[[1], [2]]),
                              backend="tree", speculative_token_tree=TREE)
    assert (prefills.num_decodes, prefills.max_decode_query_len, prefills.max_decode_seq_len) == (0, 0, 0)
    assert prefills.prefill_query_start_loc.tolist() == [0, 6, 15]
    empty = attnsync.build(attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 1)), block_size=16),
                           backend="tree", speculative_token_tree=TREE)
    assert (empty.num_decodes, empty.num_prefills, empty.max_decode_seq_len) == (0, 0, 0)
    assert empty.prefill_query_start_loc.tolist() == [0]


def test_inexact_decode_rows_give_an_upper_bound():
    # Row 0's host length assumes every draft was accepted: 30 may really be 27.
    batch = _batch(query_lens=[5, 7], seq_lens=[30, 7], block_table=[[1, 2], [3, 0]],
                   seq_lens_exact=[False, True])
    md = attnsync.build(batch, backend="tree", speculative_token_tree=TREE)
    assert md.max_decode_seq_len == 30 and md.max_prefill_seq_len == 7
    assert not md.slot_mapping_exact


def test_refuses_a_batch_that_is_not_decode_first():
    batch = _batch(query_lens=[7, 1], seq_lens=[7, 9], block_table=[[1], [2]])
    with pytest.raises(attnsync.SpecError, match=r"'tree' needs decode-first order \(decode_threshold=5\).*reorder"):
        attnsync.build(batch, backend="tree", speculative_token_tree=TREE)
    perm, ordered = attnsync.reorder(batch, decode_threshold=5)
    assert perm.tolist() == [1, 0]
    assert attnsync.build(ordered, backend="tree", speculative_token_tree=TREE).num_decodes == 1
    # 6 tokens exceed L = 5 but not L = 7: the threshold follows the tree
    six = _batch(query_lens=[6, 1], seq_lens=[16, 9], block_table=[[1], [2]])
    assert attnsync.build(six, backend="tree", speculative_token_tree="[(0,), (1,), (2,), (3,), (4,), (5,)]").num_decodes == 2
    with pytest.raises(attnsync.SpecError, match="decode-first"):
        attnsync.build(six, backend="tree", speculative_token_tree=TREE)


def test_draft_index():
    batch = _batch(query_lens=[3, 2, 7], seq_lens=[30, 9, 7], block_table=[[1, 2], [3, 0], [4, 0]])
    full = tree_attention_bias(TREE)
    verify = attnsync.build(batch, backend="tree", speculative_token_tree=TREE)
    assert verify.draft_index is None and verify.tree_attn_bias is full  # shared, not copied
    first = attnsync.build(batch, backend="tree", speculative_token_tree=TREE, draft_index=0)
    assert first.tree_attn_bias.shape == (0, 0) and first.tree_attn_bias.dtype == np.float32
    assert first.draft_index == 0
    # max_query_len is 7 > L - 1 = 4: the root-excluded square is clipped at 4 (a slice)
    later = attnsync.build(batch, backend="tree", speculative_token_tree=TREE, draft_index=2)
    np.testing.assert_array_equal(later.tree_attn_bias, full[1:5, 1:5])
    small = attnsync.build(batch.take([1, 0]), backend="tree", speculative_token_tree=TREE, draft_index=1)
    np.testing.assert_array_equal(small.tree_attn_bias, full[1:4, 1:4])  # max_query_len 3
    np.testing.assert_array_equal(small.tree_attn_bias, [[0, INF, INF], [INF, 0, INF], [0, INF, 0]])
    assert small.tree_attn_bias.flags.c_contiguous and not small.tree_attn_bias.flags.writeable
    # the split and maxima do not depend on the draft index
    assert (later.num_decodes, later.max_decode_query_len) == (verify.num_decodes, verify.max_decode_query_len)
    with pytest.raises(attnsync.SpecError, match="draft_index"):
        attnsync.build(batch, backend="tree", draft_index=-1)
    with pytest.raises(TypeError, match="draft_index"):
        attnsync.build(batch, backend="tree", draft_index=1.0)
    with pytest.raises(attnsync.SpecError, match="no option"):
        attnsync.build(batch, backend="tree", draft=1)


def test_metadata_is_frozen():
    md = attnsync.build(_batch(), backend="tree", speculative_token_tree=TREE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        md.num_decodes = 0
    for f in dataclasses.fields(md):
        value = getattr(md, f.name)
        if isinstance(value, np.ndarray):
            assert not value.flags.writeable, f.name


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_builder_against_brute_force(data):
    tree = data.draw(trees(max_nodes=6))
    size = len(tree) + 1
    raw = data.draw(batches(max_decode_query=size))
    _, batch = attnsync.reorder(raw, decode_threshold=size)
    draft_index = data.draw(st.sampled_from([None, 0, 1, 3]))
    md = attnsync.build(batch, backend="tree", speculative_token_tree=tree, draft_index=draft_index)
    _check_against_brute_force(batch, tree, md)
    full = tree_attention_bias(tree)
    if draft_index is None:
        np.testing.assert_array_equal(md.tree_attn_bias, full)
    elif draft_index == 0:
        assert md.tree_attn_bias.shape == (0, 0)
    else:
        m = min(md.max_query_len, size - 1)
        np.testing.assert_array_equal(md.tree_attn_bias, full[1 : 1 + m, 1 : 1 + m])


# ---------------------------------------------------------------------------------------------
# Host maxima against the sync-ful forms (vllm-backends.md section 6, item 8)
# ---------------------------------------------------------------------------------------------


def naive_maxima(qsl: torch.Tensor, seq_lens: torch.Tensor, nd: int, num_prefills: int) -> dict[str, int]:
    """The four per-step `.item()` reads of vLLM's tree backend (here on CPU tensors)."""
    out = dict(max_decode_query_len=0, max_decode_seq_len=0, max_prefill_query_len=0, max_prefill_seq_len=0)
    if nd:
        out["max_decode_query_len"] = int(torch.diff(qsl[: nd + 1]).max().item())
        out["max_decode_seq_len"] = int(seq_lens[:nd].max().item())
    if num_prefills:
        prefill_qsl = qsl[nd:] - qsl[nd]
        out["max_prefill_query_len"] = int(torch.diff(prefill_qsl).max().item())
        out["max_prefill_seq_len"] = int(seq_lens[nd:].max().item())
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_host_maxima_match_the_naive_item_reads(data):
    size = data.draw(st.integers(1, 8))
    tree = [(i,) for i in range(size - 1)] or [(0,)]
    size = len(tree) + 1
    raw = data.draw(batches(max_decode_query=size))
    _, batch = attnsync.reorder(raw, decode_threshold=size)
    md = attnsync.build(batch, backend="tree", speculative_token_tree=tree)
    # The device holds exact lengths: an inexact row's bound is too large by the rejected
    # drafts (0 <= rejected <= size - 1, and the row keeps at least its query tokens).
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    host = md.seq_lens.astype(np.int64)
    exact_rows = np.concatenate([batch.seq_lens_exact, np.ones(md.num_reqs - batch.num_reqs, dtype=bool)])
    slack = np.minimum(size - 1, host - np.diff(md.query_start_loc))
    rejected = np.where(exact_rows, 0, rng.integers(0, slack + 1))
    device_seq_lens = torch.from_numpy((host - rejected).astype(np.int32))
    naive = naive_maxima(torch.from_numpy(md.query_start_loc.copy()), device_seq_lens, md.num_decodes, md.num_prefills)
    assert md.max_decode_query_len == naive["max_decode_query_len"]
    assert md.max_prefill_query_len == naive["max_prefill_query_len"]
    for name in ("max_decode_seq_len", "max_prefill_seq_len"):
        # exact when every row is exact; otherwise an upper bound within the rejected drafts
        assert naive[name] <= getattr(md, name) <= naive[name] + size - 1, name
    if batch.seq_lens_exact.all():
        assert md.max_decode_seq_len == naive["max_decode_seq_len"]
        assert md.max_prefill_seq_len == naive["max_prefill_seq_len"]


# ---------------------------------------------------------------------------------------------
# numpy vs torch vs JAX, bit for bit
# ---------------------------------------------------------------------------------------------


def _bits(value) -> np.ndarray:
    arr = np.asarray(value)
    return arr.view(np.int32) if arr.dtype == np.float32 else arr


def _check_lowerings(md: TreeMetadata) -> None:
    tmd = torch_adapter.lower(md, "cpu")
    jmd = jax_adapter.lower(md, jax.devices("cpu")[0])
    for f in dataclasses.fields(md):
        value = getattr(md, f.name)
        place = f.metadata.get("place")
        if place is None:
            assert getattr(tmd, f.name) == value and getattr(jmd, f.name) == value, f.name
            continue
        torch_name = f.metadata["device_name"] or f.name
        host_name = f.metadata["host_name"] or f"{f.name}_cpu"
        torch_dtype = torch.int64 if f.name == "slot_mapping" else torch_adapter.TORCH_DTYPES[value.dtype.name]
        device_t = getattr(tmd, torch_name)
        assert device_t.dtype == torch_dtype and tuple(device_t.shape) == value.shape, f.name
        np.testing.assert_array_equal(_bits(device_t.numpy().astype(value.dtype)), _bits(value), err_msg=f.name)
        if place == "both":
            host_t = getattr(tmd, host_name)
            assert host_t.dtype == torch_dtype and host_t.device.type == "cpu"
            np.testing.assert_array_equal(_bits(host_t.numpy()), _bits(value), err_msg=f.name)
        jax_value = getattr(jmd, f.name)
        expected_dtype = np.float32 if value.dtype == np.float32 else np.int32
        assert jax_value.dtype == expected_dtype and jax_value.shape == value.shape, f.name
        np.testing.assert_array_equal(_bits(jax_value), _bits(value.astype(expected_dtype)), err_msg=f.name)
    assert tmd.tree_attn_bias.dtype == torch.float32 and jmd.tree_attn_bias.dtype == np.float32


# Each new layout compiles a JAX splitter (about 0.2 s), so fewer examples here.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_lowered_fields_numpy_torch_jax_bit_for_bit(data):
    tree = data.draw(trees(max_nodes=5))
    size = len(tree) + 1
    raw = data.draw(batches(max_decode_query=size, inexact=False))
    _, batch = attnsync.reorder(raw, decode_threshold=size)
    md = attnsync.build(batch, backend="tree", speculative_token_tree=tree,
                        draft_index=data.draw(st.sampled_from([None, 0, 2])))
    _check_lowerings(md)


def test_jax_lowering_keeps_float32_bits():
    # The JAX adapter packs float32 fields into its int32 buffer by bitcast: every bit pattern
    # (NaN payloads, -0.0, subnormals, infinities) must come back unchanged, never converted.
    md = attnsync.build(_batch(query_lens=[5, 7], seq_lens=[30, 7], block_table=[[1, 2], [3, 0]]),
                        backend="tree", speculative_token_tree=TREE)
    bits = np.array([0x7FC00001, 0x80000000, 0x00000001, 0xFF800000, 0x7F800000, 0x3F800000, 0xFFFFFFFF,
                     0x00800000, 0xC0490FDB, 0x7F7FFFFF, 0x80800000, 0x12345678, 0x7FA00000, 0, 1, 2,
                     3, 4, 5, 6, 7, 8, 9, 10, 11], dtype=np.uint32)
    odd = bits.view(np.float32).reshape(5, 5)
    jmd = jax_adapter.lower(dataclasses.replace(md, tree_attn_bias=odd), jax.devices("cpu")[0])
    assert jmd.tree_attn_bias.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(jmd.tree_attn_bias).view(np.uint32), bits.reshape(5, 5))
    # the int32 fields around it are untouched
    np.testing.assert_array_equal(np.asarray(jmd.prefill_query_start_loc), md.prefill_query_start_loc)
    np.testing.assert_array_equal(np.asarray(jmd.block_table), md.block_table)


# ---------------------------------------------------------------------------------------------
# The consumers: reference by hand, torch and JAX against the reference
# ---------------------------------------------------------------------------------------------


def test_reference_by_hand():
    # One decode row: 2 context keys, then a draft block of root + node 1, where node 1 may
    # not see the root. Keys are 0, so attention averages the visible values.
    bias = np.array([[0, INF], [INF, 0]], dtype=np.float32)
    q = np.ones((2, 1, 1))
    k = np.zeros((1, 4, 1, 1))
    v = np.arange(4.0).reshape(1, 4, 1, 1)
    args = dict(query_start_loc=np.array([0, 2]), seq_lens=np.array([4]), block_table=np.array([[0]]), scale=1.0)
    out = tree_paged_attention_reference(q, k, v, tree_attn_bias=bias, num_decodes=1, **args)
    assert out[0, 0, 0] == pytest.approx((0 + 1 + 2) / 3)  # root: context + itself
    assert out[1, 0, 0] == pytest.approx((0 + 1 + 3) / 3)  # node 1: context + itself, not the root
    causal = tree_paged_attention_reference(q, k, v, tree_attn_bias=bias, num_decodes=0, **args)
    assert causal[1, 0, 0] == pytest.approx((0 + 1 + 2 + 3) / 4)
    empty = tree_paged_attention_reference(q, k, v, tree_attn_bias=np.zeros((0, 0)), num_decodes=1, **args)
    np.testing.assert_array_equal(empty, causal)  # an empty bias (first draft step) is causal
    with pytest.raises(ValueError, match="needs a bias of at least 2 rows"):
        tree_paged_attention_reference(q, k, v, tree_attn_bias=np.zeros((1, 1)), num_decodes=1, **args)


def make_case(rows, *, tree=TREE, block_size=4, hq=4, hkv=2, d=16, seed=0, inexact=(), rejected=1,
              is_prefilling=None, padded_reqs=0, padded_tokens=0, draft_index=None):
    """A paged batch from (query_len, context) rows; `inexact` rows' host lengths exceed the
    exact ones by `rejected`. Cache slots no row owns and unused pages hold NaN."""
    rng = np.random.default_rng(seed)
    q_lens = np.array([r[0] for r in rows], dtype=np.int32)
    exact = np.array([r[0] + r[1] for r in rows], dtype=np.int32)
    host = exact + np.array([rejected if i in inexact else 0 for i in range(len(rows))], dtype=np.int32)
    pages = -(-host // block_size)
    width = int(pages.max(initial=0)) + 1
    num_blocks = int(pages.sum()) + 2
    perm = rng.permutation(num_blocks)
    poison = int(perm[-1])
    table = np.full((len(rows), width), poison, dtype=np.int32)
    k = rng.standard_normal((num_blocks, block_size, hkv, d)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    used = np.zeros((num_blocks, block_size), dtype=bool)
    start = 0
    for r, n in enumerate(pages):
        table[r, :n] = perm[start : start + n]
        start += n
        for pos in range(exact[r]):
            used[table[r, pos // block_size], pos % block_size] = True
    k[~used] = np.nan
    v[~used] = np.nan
    kwargs = dict(query_lens=q_lens, seq_lens=host, block_table=table, block_size=block_size,
                  seq_lens_exact=np.array([i not in inexact for i in range(len(rows))]),
                  is_prefilling=is_prefilling)
    if padded_reqs:
        kwargs["padded_num_reqs"] = len(rows) + padded_reqs
    if padded_tokens:
        kwargs["padded_num_tokens"] = int(q_lens.sum()) + padded_tokens
    batch = attnsync.Batch(**kwargs)
    md = attnsync.build(batch, backend="tree", speculative_token_tree=tree, draft_index=draft_index)
    q = rng.standard_normal((md.num_actual_tokens, hq, d)).astype(np.float32)
    exact_padded = np.zeros(md.num_reqs, dtype=np.int32)
    exact_padded[: len(rows)] = exact
    ref = tree_paged_attention_reference(
        q, k, v, query_start_loc=md.query_start_loc, seq_lens=exact_padded, block_table=md.block_table,
        tree_attn_bias=md.tree_attn_bias, num_decodes=md.num_decodes, scale=1 / math.sqrt(d), num_reqs=md.num_reqs,
    )
    return dict(md=md, q=q, k=k, v=v, exact=exact_padded, ref=ref, scale=1 / math.sqrt(d))


def _torch_out(case) -> np.ndarray:
    md = case["md"]
    seq_lens = None if md.slot_mapping_exact else torch.from_numpy(case["exact"])
    tmd = torch_adapter.lower(md, "cpu", seq_lens=seq_lens)
    out = tree_paged_attention_torch(torch.from_numpy(case["q"]), torch.from_numpy(case["k"]),
                                     torch.from_numpy(case["v"]), tmd, scale=case["scale"])
    return out.numpy()


def _jax_out(case) -> np.ndarray:
    dev = jax.devices("cpu")[0]
    jmd = jax_adapter.lower(case["md"], dev)
    q, k, v = (jax.device_put(case[x], dev) for x in "qkv")
    with jax.transfer_guard("disallow"):
        out = tree_paged_attention_jax(q, k, v, jmd, scale=case["scale"])
    return np.asarray(out)


CASES = {
    # decode rows of every length up to L (and an empty one), then a chunked prefill and a
    # fresh prefill, padded rows and tokens
    "mixed": dict(rows=[(5, 9), (3, 2), (1, 17), (0, 6), (9, 6), (7, 0)], padded_reqs=2, padded_tokens=3),
    "gqa-4": dict(rows=[(5, 3), (2, 30), (6, 0)], hq=8, hkv=2, block_size=16),
    "inexact": dict(rows=[(5, 9), (4, 20), (8, 4)], inexact=(0, 1), rejected=3),
    "prefilling": dict(rows=[(4, 12), (3, 0), (5, 8)], is_prefilling=[False, True, True]),
    "draft-0": dict(rows=[(3, 5), (2, 9), (6, 0)], draft_index=0),
    "draft-2": dict(rows=[(4, 5), (2, 9), (6, 0)], draft_index=2),
    "block-1": dict(rows=[(5, 4), (7, 0)], block_size=1),
    "only-prefill": dict(rows=[(6, 0), (9, 3)]),
    "only-decode": dict(rows=[(5, 40), (5, 1)], padded_reqs=1),
    "deep-tree": dict(rows=[(8, 5), (6, 3)], tree="[(0,), (0, 0), (0, 0, 0), (1,), (0, 1), (0, 0, 1), (2,)]"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_consumer_matches_reference(name):
    case = make_case(**CASES[name])
    out = _torch_out(case)
    assert relative_error(out, case["ref"]) < 1e-5
    md = case["md"]
    real = md.num_decode_tokens + md.num_prefill_tokens
    assert not np.isnan(case["ref"][:real]).any()
    assert (out[real:] == 0).all()  # padding tokens untouched


@pytest.mark.parametrize("name", ["mixed", "gqa-4", "draft-0", "draft-2", "deep-tree"])
def test_jax_consumer_matches_reference(name):
    case = make_case(**CASES[name])
    out = _jax_out(case)
    assert relative_error(out, case["ref"]) < 1e-5
    real = case["md"].num_decode_tokens + case["md"].num_prefill_tokens
    assert (out[real:] == 0).all()


def test_tree_bias_matters():
    # Independent checks of the reference: a chain tree's bias is lower-triangular, so the tree
    # rule is the causal rule; a branching tree differs from causal on the decode rows only.
    chain = make_case(rows=[(4, 7), (6, 0)], tree="[(0,), (0, 0), (0, 0, 0)]")
    md = chain["md"]
    causal = paged_attention_reference(chain["q"], chain["k"], chain["v"], query_start_loc=md.query_start_loc,
                                       seq_lens=chain["exact"], block_table=md.block_table, scale=chain["scale"])
    np.testing.assert_allclose(chain["ref"], causal, rtol=1e-12, atol=1e-12)
    branch = make_case(rows=[(4, 7), (6, 0)])
    md = branch["md"]
    causal = paged_attention_reference(branch["q"], branch["k"], branch["v"], query_start_loc=md.query_start_loc,
                                       seq_lens=branch["exact"], block_table=md.block_table, scale=branch["scale"])
    np.testing.assert_allclose(branch["ref"][4:], causal[4:], rtol=1e-12)  # prefill row: causal
    np.testing.assert_allclose(branch["ref"][:2], causal[:2], rtol=1e-12)  # root and (0,) see their prefix
    assert np.abs(branch["ref"][2:4] - causal[2:4]).max() > 1e-3  # (1,) and (0, 0) skip siblings


@st.composite
def consumer_cases(draw):
    tree = draw(trees(max_nodes=6))
    size = len(tree) + 1
    draft_index = draw(st.sampled_from([None, None, 0, 1]))
    # While drafting (index >= 1) the bias has at most L - 1 rows, so decode rows are shorter.
    longest = size - 1 if draft_index else size
    num_decodes = draw(st.integers(0, 4))
    rows = [(draw(st.integers(0, longest)), draw(st.integers(1, 20))) for _ in range(num_decodes)]
    rows += [(draw(st.integers(size + 1, size + 8)), draw(st.integers(0, 12))) for _ in range(draw(st.integers(0, 3)))]
    if not rows:
        rows = [(1, 1)]
    inexact = tuple(i for i in range(num_decodes) if rows[i][0] and draw(st.booleans()))
    return dict(rows=rows, tree=tree, block_size=draw(st.sampled_from([1, 2, 4, 16])),
                inexact=inexact, rejected=draw(st.integers(0, 3)), seed=draw(st.integers(0, 1000)),
                padded_reqs=draw(st.integers(0, 2)), padded_tokens=draw(st.integers(0, 2)),
                draft_index=draft_index)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(consumer_cases())
def test_torch_consumer_against_reference_fuzz(spec):
    case = make_case(**spec)
    out = _torch_out(case)
    assert out.shape == case["q"].shape
    if out.shape[0]:  # (a batch of empty rows has no token to compare)
        assert relative_error(out, case["ref"]) < 1e-5


def test_torch_consumer_refuses_rows_longer_than_the_bias():
    case = make_case(rows=[(4, 5), (4, 9)], draft_index=1)
    md = case["md"]
    assert md.tree_attn_bias.shape == (4, 4)  # bias[1:5, 1:5]: max_query_len 4 = L - 1
    short = dataclasses.replace(md, tree_attn_bias=np.zeros((2, 2), dtype=np.float32))
    tmd = torch_adapter.lower(short, "cpu")
    q, k, v = (torch.from_numpy(case[x]) for x in "qkv")
    with pytest.raises(ValueError, match="up to 4 tokens but the bias is \\(2, 2\\)"):
        tree_paged_attention_torch(q, k, v, tmd, scale=1.0)
    with pytest.raises(ValueError, match="up to 4 tokens"):
        tree_paged_attention_jax(*(jax.numpy.asarray(case[x]) for x in "qkv"), jax_adapter.lower(short), scale=1.0)


def test_torch_consumer_reads_no_device_value():
    # Under FakeTensorMode every tensor is data-less: an .item(), a boolean mask or any other
    # data-dependent shape would raise. The consumer must run on shapes and host ints alone.
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = make_case(**CASES["mixed"])
    tmd = torch_adapter.lower(case["md"], "cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake = {}
    for f in dataclasses.fields(tmd):
        value = getattr(tmd, f.name)
        fake[f.name] = mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
    fake_md = type(tmd)(**fake)
    q, k, v = (mode.from_tensor(torch.from_numpy(case[x])) for x in "qkv")
    with mode:
        out = tree_paged_attention_torch(q, k, v, fake_md, scale=case["scale"])
    assert tuple(out.shape) == case["q"].shape


def test_builder_and_reference_import_no_framework():
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import json, sys, numpy as np, attnsync\n"
        "from attnsync.kernels import tree_reference\n"
        "b = attnsync.Batch(query_lens=[2, 4], seq_lens=[6, 4], block_table=[[0], [1]], block_size=8)\n"
        "md = attnsync.build(b, backend='tree', speculative_token_tree='[(0,), (1,)]')\n"
        "tree_reference.tree_paged_attention_reference(np.ones((6, 1, 2)), np.ones((2, 8, 1, 2)),\n"
        "    np.ones((2, 8, 1, 2)), query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,\n"
        "    block_table=md.block_table, tree_attn_bias=md.tree_attn_bias, num_decodes=md.num_decodes,\n"
        "    scale=1.0)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'jax', 'jaxlib', 'triton') if m in sys.modules)))\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------------------------------------
# The Triton consumer: one launch of unified_paged_attention with the tree bias as qq_bias
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_consumer():
    if not torch.cuda.is_available():
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py does it too
    pytest.importorskip("triton")
    from attnsync.kernels import triton_attention
    from attnsync.kernels.tree_reference import tree_paged_attention_triton

    return tree_paged_attention_triton, triton_attention


def _rounded(case, dtype: torch.dtype) -> dict:
    """`case` with q, k, v rounded to `dtype` and the reference recomputed on the rounded values,
    so a low-precision run is judged on the kernel's arithmetic alone."""
    rounded = dict(case)
    for x in "qkv":
        rounded[x] = torch.from_numpy(case[x]).to(dtype).float().numpy()
    md = case["md"]
    rounded["ref"] = tree_paged_attention_reference(
        rounded["q"], rounded["k"], rounded["v"], query_start_loc=md.query_start_loc, seq_lens=case["exact"],
        block_table=md.block_table, tree_attn_bias=md.tree_attn_bias, num_decodes=md.num_decodes,
        scale=case["scale"], num_reqs=md.num_reqs,
    )
    return rounded


def _triton_out(triton_consumer, case, dtype: torch.dtype = torch.float32, *, md=None, out=None) -> np.ndarray:
    consume, _ = triton_consumer
    md = case["md"] if md is None else md
    seq_lens = None if md.slot_mapping_exact else torch.from_numpy(case["exact"])
    tmd = torch_adapter.lower(md, "cpu", seq_lens=seq_lens)
    q, k, v = (torch.from_numpy(case[x]).to(dtype) for x in "qkv")
    result = consume(q, k, v, tmd, scale=case["scale"], out=out)
    assert result.dtype == dtype and (out is None or result is out)
    return result.float().numpy().astype(np.float64)


@pytest.mark.triton_cpu
@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, "float32") for name in sorted(CASES)]
    + [(name, "bfloat16") for name in ("mixed", "gqa-4", "inexact", "draft-2")],
)
def test_triton_consumer_matches_reference(triton_consumer, name, dtype):
    dtype = getattr(torch, dtype)
    case = make_case(**CASES[name])
    if dtype == torch.bfloat16:
        case = _rounded(case, dtype)
    md = case["md"]
    real = md.num_decode_tokens + md.num_prefill_tokens
    poisoned = torch.full(case["q"].shape, float("nan"), dtype=dtype)
    out = _triton_out(triton_consumer, case, dtype, out=poisoned)
    assert relative_error(out, case["ref"]) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert not np.isnan(out[:real]).any()
    assert np.isnan(out[real:]).all()  # padding tokens belong to no row: left untouched
    default = _triton_out(triton_consumer, case, dtype)
    assert (default[real:] == 0).all()  # out=None: a zero tensor, like the torch consumer
    np.testing.assert_array_equal(default[:real], out[:real])


@pytest.mark.triton_cpu
def test_triton_consumer_is_one_launch_with_the_bias_on_the_decode_rows(triton_consumer, monkeypatch):
    # The mixed batch (decode rows of q_len == L and < L, an empty decode row, a chunked and a
    # fresh prefill, padded rows and tokens) goes through ONE 2D launch: the bias covers the
    # decode rows only, the grid comes from host ints.
    _, triton_attention = triton_consumer
    calls = []
    real_launch = triton_attention.unified_paged_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "unified_paged_attention", spy)
    case = make_case(**CASES["mixed"])
    md = case["md"]
    assert md.max_decode_query_len == md.tree_size == 5 and md.num_prefills == 2 and md.num_reqs == 8
    out = _triton_out(triton_consumer, case)
    assert relative_error(out, case["ref"]) < 1e-5
    assert len(calls) == 1
    (kw,) = calls
    assert kw["num_qq_bias_rows"] == md.num_decodes == 4 and tuple(kw["qq_bias"].shape) == (5, 5)
    assert kw["use_split_kv"] is False
    assert (kw["num_reqs"], kw["max_query_len"], kw["max_seq_len"]) == (md.num_reqs, md.max_query_len, md.max_seq_len)
    assert all(type(kw[k]) is int for k in ("num_reqs", "max_query_len", "max_seq_len", "num_qq_bias_rows"))


@pytest.mark.triton_cpu
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(consumer_cases())
def test_triton_and_torch_consumers_agree_fuzz(triton_consumer, spec):
    case = make_case(**spec)
    if not case["q"].shape[0]:
        return  # a batch of empty rows has no token to compare
    out = _triton_out(triton_consumer, case)
    assert relative_error(out, case["ref"]) < 1e-5
    assert relative_error(out, _torch_out(case)) < 1e-5


@pytest.mark.triton_cpu
def test_triton_bias_semantics_equal_the_reference_rule(triton_consumer):
    # The reference's rule: draft token i sees the context before the block plus draft key j
    # when j <= i and bias[i, j] == 0. The kernel adds bias[i, j] and then applies its causal
    # mask. (1) In the canonical order a node's ancestors come first, so bias[i, j] == 0
    # implies j <= i: the causal mask removes nothing the tree keeps.
    for tree in (TREE, CASES["deep-tree"]["tree"], "[(2,), (0, 1), (0,), (2, 0), (0, 1, 3), (1,)]"):
        bias = tree_attention_bias(tree)
        assert (bias[np.triu_indices(bias.shape[0], 1)] == -np.inf).all(), tree
    # (2) A bias that is NOT in ancestor-first order (the tree's transpose: every node "sees"
    # its descendants, which come later) keeps only the diagonal in the reference, the torch
    # consumer and the kernel alike: the causal mask hides zeros above the diagonal in all three.
    case = make_case(rows=[(5, 9), (3, 2), (1, 4), (7, 3)], seed=5)
    md = case["md"]
    diagonal = np.where(np.eye(5, dtype=bool), 0, -np.inf).astype(np.float32)

    def with_bias(b):
        changed = dataclasses.replace(md, tree_attn_bias=np.ascontiguousarray(b, dtype=np.float32))
        ref = tree_paged_attention_reference(
            case["q"], case["k"], case["v"], query_start_loc=md.query_start_loc, seq_lens=case["exact"],
            block_table=md.block_table, tree_attn_bias=changed.tree_attn_bias, num_decodes=md.num_decodes,
            scale=case["scale"], num_reqs=md.num_reqs,
        )
        torch_out = _torch_out({**case, "md": changed})
        return ref, torch_out, _triton_out(triton_consumer, case, md=changed)

    transposed = with_bias(tree_attention_bias(TREE).T)
    only_self = with_bias(diagonal)
    for got in (*transposed, *only_self):
        assert relative_error(got, only_self[0]) < 1e-5
    # (3) An all-zero bias is causal, like the empty bias of the first drafting step.
    causal = paged_attention_reference(case["q"], case["k"], case["v"], query_start_loc=md.query_start_loc,
                                       seq_lens=case["exact"], block_table=md.block_table, scale=case["scale"])
    for got in with_bias(np.zeros((5, 5))):
        assert relative_error(got, causal) < 1e-5
    # and the real tree differs from causal on the decode rows: the bias reached the kernel
    tree_out = _triton_out(triton_consumer, case)
    assert relative_error(tree_out, case["ref"]) < 1e-5
    assert np.abs(tree_out[:8] - causal[:8]).max() > 1e-3


@pytest.mark.triton_cpu
@pytest.mark.parametrize("draft_index", [0, 1, 3])
def test_triton_consumer_drafting_steps(triton_consumer, draft_index):
    # draft_index 0: empty [0, 0] bias, decode rows attend causally; >= 1: the root-excluded
    # sub-square of the bias, sized from max_query_len.
    case = make_case(rows=[(4, 6), (2, 11), (1, 3), (9, 0)], draft_index=draft_index, seed=draft_index)
    md = case["md"]
    expected = {0: (0, 0), 1: (4, 4), 3: (4, 4)}[draft_index]
    assert md.tree_attn_bias.shape == expected
    out = _triton_out(triton_consumer, case)
    assert relative_error(out, case["ref"]) < 1e-5
    if draft_index == 0:
        causal = paged_attention_reference(case["q"], case["k"], case["v"], query_start_loc=md.query_start_loc,
                                           seq_lens=case["exact"], block_table=md.block_table, scale=case["scale"])
        assert relative_error(out, causal) < 1e-5


def test_triton_consumer_refuses_what_the_kernel_would_get_wrong(triton_consumer):
    # Checked on host ints and shapes before any launch, so this runs on CUDA hosts too.
    consume, _ = triton_consumer
    case = make_case(rows=[(4, 5), (4, 9)], draft_index=1)
    md = case["md"]
    q, k, v = (torch.from_numpy(case[x]) for x in "qkv")
    # The kernel gives pairs outside the bias square no bias at all (causal): refuse instead.
    short = dataclasses.replace(md, tree_attn_bias=np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"up to 4 tokens but the bias is \(2, 2\)"):
        consume(q, k, v, torch_adapter.lower(short, "cpu"), scale=1.0)
    tmd = torch_adapter.lower(md, "cpu")
    with pytest.raises(TypeError, match=r"torch lowering of the tree backend.*Fix: tmd = "):
        consume(q, k, v, md, scale=1.0)  # the host metadata, not lowered
    with pytest.raises(ValueError, match="block_size 4"):
        consume(q, k[:, :2], v[:, :2], tmd, scale=1.0)
    with pytest.raises(ValueError, match="built for 8 tokens"):
        consume(q[:5], k, v, tmd, scale=1.0)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        consume(q.double(), k.double(), v.double(), tmd, scale=1.0)
