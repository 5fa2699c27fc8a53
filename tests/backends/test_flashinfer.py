"""The ``flashinfer`` backend: builder vs a per-row reference, refusals, lowerings, planning.

The planning tests run FlashInfer's contract on the CPU: stand-in wrappers record what
`attnsync.integrations.flashinfer.plan` hands them and compute paged attention exactly as
FlashInfer defines it from those arrays (indptr/indices/last_page_len, causal alignment to
the end of each sequence). Matching the float64 reference then proves the slicing and
rebasing of the sub-batches without a GPU.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import exact_batches

import attnsync
from attnsync.backends.flashinfer import FlashInferMetadata, paged_kv_arrays
from attnsync.kernels.reference import paged_attention_reference, relative_error
from attnsync.testing import brute_force_common

# ---------------------------------------------------------------------------------------------
# The per-row reference: one Python iteration per row, no numpy vectorisation.


def brute_force_flashinfer(batch: attnsync.Batch, *, decode_threshold: int = 1) -> dict:
    """Every FlashInferMetadata field from first principles, one row at a time."""
    n, r_pad, bs = batch.num_reqs, batch.padded_num_reqs, batch.block_size
    q = [int(x) for x in batch.query_lens] + [0] * (r_pad - n)
    s = [int(x) for x in batch.seq_lens] + [0] * (r_pad - n)
    pre = [bool(x) for x in batch.is_prefilling] if batch.is_prefilling is not None else [False] * n
    table = [[int(x) for x in row] for row in batch.block_table]
    table += [[0] * batch.block_table.shape[1] for _ in range(r_pad - n)]
    indptr, indices, last = [0], [], []
    for r in range(r_pad):
        pages = math.ceil(s[r] / bs)
        indptr.append(indptr[-1] + pages)
        indices.extend(table[r][:pages])
        if s[r] == 0:
            last.append(0)
        elif s[r] % bs == 0:
            last.append(bs)
        else:
            last.append(s[r] % bs)
    nd = 0
    while nd < n and q[nd] <= decode_threshold and not pre[nd]:
        nd += 1
    qsl = [0]
    for r in range(r_pad):
        qsl.append(qsl[-1] + q[r])
    return dict(
        paged_kv_indptr=np.array(indptr, dtype=np.int32),
        paged_kv_indices=np.array(indices, dtype=np.int32),
        paged_kv_last_page_len=np.array(last, dtype=np.int32),
        prefill_qo_indptr=np.array([qsl[r] - qsl[nd] for r in range(nd, n + 1)], dtype=np.int32),
        prefill_paged_kv_indptr=np.array([indptr[r] - indptr[nd] for r in range(nd, n + 1)], dtype=np.int32),
        num_decodes=nd,
        num_decode_tokens=sum(q[:nd]),
        num_prefills=n - nd,
        num_prefill_tokens=sum(q[nd:n]),
        max_decode_query_len=max(q[:nd], default=0),
        max_prefill_query_len=max(q[nd:n], default=0),
        num_decode_pages=indptr[nd],
        num_pages=indptr[-1],
        block_size=bs,
        decode_threshold=decode_threshold,
    )


COMMON_FIELDS = (
    "query_start_loc", "seq_lens", "block_table", "slot_mapping", "num_reqs", "num_actual_tokens",
    "num_scheduled_reqs", "num_scheduled_tokens", "max_query_len", "max_seq_len",
)


def assert_matches_reference(batch: attnsync.Batch, *, decode_threshold: int = 1) -> FlashInferMetadata:
    md = attnsync.build(batch, backend="flashinfer", decode_threshold=decode_threshold)
    ref = brute_force_flashinfer(batch, decode_threshold=decode_threshold)
    common = brute_force_common(batch, decode_threshold=decode_threshold)
    for name in COMMON_FIELDS:
        ref[name] = common[name]
    for name, expected in ref.items():
        got = getattr(md, name)
        if isinstance(expected, np.ndarray):
            assert got.dtype == expected.dtype, name
            np.testing.assert_array_equal(got, expected, err_msg=name)
            assert not got.flags.writeable, f"{name} must be read-only"
        else:
            assert got == expected and type(got) is int, (name, got, expected)
    # Invariants from the field docstrings, checked directly as well.
    indptr = md.paged_kv_indptr
    assert indptr[0] == 0 and (np.diff(indptr) >= 0).all() and indptr[-1] == md.paged_kv_indices.size
    has_context = md.seq_lens > 0
    assert ((md.paged_kv_last_page_len >= 1) & (md.paged_kv_last_page_len <= md.block_size))[has_context].all()
    assert (md.paged_kv_last_page_len[~has_context] == 0).all()
    return md


def _batch(query_lens, seq_lens, block_size=16, width=None, seed=0, **kw) -> attnsync.Batch:
    """A batch with distinct random page ids, wide enough for every row."""
    seq = np.asarray(seq_lens, dtype=np.int64)
    need = int((-(-seq // block_size)).max(initial=0))
    width = need if width is None else width
    rng = np.random.default_rng(seed)
    pages = rng.permutation(max(len(seq) * width, 1))[: len(seq) * width]
    return attnsync.Batch(
        query_lens=query_lens, seq_lens=seq_lens,
        block_table=pages.reshape(len(seq), width), block_size=block_size, **kw,
    )


# ---------------------------------------------------------------------------------------------
# Hand cases.


def test_worked_example():
    """Page 16, seq_lens [0, 16, 17, 33]: indptr [0,0,1,3,6], last_page_len [0,16,1,1]."""
    batch = attnsync.Batch(
        query_lens=[0, 1, 1, 1], seq_lens=[0, 16, 17, 33],
        block_table=[[0, 0, 0], [5, 0, 0], [6, 7, 0], [8, 9, 10]], block_size=16,
    )
    md = assert_matches_reference(batch)
    assert md.paged_kv_indptr.tolist() == [0, 0, 1, 3, 6]
    assert md.paged_kv_last_page_len.tolist() == [0, 16, 1, 1]
    assert md.paged_kv_indices.tolist() == [5, 6, 7, 8, 9, 10]
    assert (md.num_decodes, md.num_prefills, md.num_decode_pages, md.num_pages) == (4, 0, 6, 6)


def test_paged_kv_arrays_worked_example_directly():
    indptr, indices, last = paged_kv_arrays(
        np.array([0, 16, 17, 33], dtype=np.int32),
        np.array([[0, 0, 0], [5, 0, 0], [6, 7, 0], [8, 9, 10]], dtype=np.int32), 16,
    )
    assert indptr.tolist() == [0, 0, 1, 3, 6]
    assert indices.tolist() == [5, 6, 7, 8, 9, 10]
    assert last.tolist() == [0, 16, 1, 1]
    assert indptr.dtype == indices.dtype == last.dtype == np.int32


@pytest.mark.parametrize("width_extra", [0, 5000], ids=["mask-gather", "repeat-gather"])
def test_both_gather_strategies_agree(width_extra):
    """A narrow table takes the boolean-mask gather, a wide one the repeat/take gather."""
    seq = [3, 40, 0, 17, 64]
    batch = _batch([1, 1, 0, 1, 1], seq, block_size=16, width=4 + width_extra)
    assert_matches_reference(batch)


def test_empty_batch():
    batch = attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 0), dtype=np.int32), block_size=16)
    md = assert_matches_reference(batch)
    assert md.paged_kv_indptr.tolist() == [0]
    assert md.paged_kv_indices.shape == (0,) and md.paged_kv_last_page_len.shape == (0,)
    assert md.prefill_qo_indptr.tolist() == [0] and md.prefill_paged_kv_indptr.tolist() == [0]
    assert (md.num_decodes, md.num_prefills, md.num_pages) == (0, 0, 0)


def test_empty_batch_padded():
    batch = attnsync.Batch(
        query_lens=[], seq_lens=[], block_table=np.zeros((0, 3), dtype=np.int32), block_size=16,
        padded_num_reqs=4, padded_num_tokens=8,
    )
    md = assert_matches_reference(batch)
    assert md.paged_kv_indptr.tolist() == [0] * 5
    assert md.paged_kv_last_page_len.tolist() == [0] * 4
    assert md.slot_mapping.tolist() == [-1] * 8


def test_all_decode():
    md = assert_matches_reference(_batch([1, 1, 1, 1], [1, 15, 16, 200]))
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills) == (4, 4, 0)
    assert md.max_decode_query_len == 1 and md.max_prefill_query_len == 0
    assert md.num_decode_pages == md.num_pages == 1 + 1 + 1 + 13


def test_all_prefill():
    md = assert_matches_reference(_batch([7, 16, 33], [7, 16, 33]))
    assert (md.num_decodes, md.num_prefills, md.num_prefill_tokens) == (0, 3, 56)
    assert md.prefill_qo_indptr.tolist() == [0, 7, 23, 56]
    assert md.prefill_paged_kv_indptr.tolist() == md.paged_kv_indptr.tolist() == [0, 1, 2, 5]
    assert md.num_decode_pages == 0 and md.max_prefill_query_len == 33


def test_mixed_with_chunked_prefill_continuation():
    # Two decodes, a chunked-prefill continuation (20 new tokens after 30 cached), a fresh
    # prefill, and a short extend (1 token, still prefilling) that must count as a prefill.
    batch = _batch(
        [1, 1, 20, 37, 1], [17, 64, 50, 37, 90],
        is_prefilling=[False, False, True, True, True],
    )
    md = assert_matches_reference(batch)
    assert (md.num_decodes, md.num_decode_tokens) == (2, 2)
    assert (md.num_prefills, md.num_prefill_tokens) == (3, 58)
    assert md.prefill_qo_indptr.tolist() == [0, 20, 57, 58]
    pages = [2, 4, 4, 3, 6]
    assert md.paged_kv_indptr.tolist() == np.concatenate([[0], np.cumsum(pages)]).tolist()
    assert md.num_decode_pages == 6
    assert md.prefill_paged_kv_indptr.tolist() == [0, 4, 7, 13]
    assert md.max_prefill_query_len == 37


def test_padded_rows_are_neither_decodes_nor_prefills():
    batch = _batch([1, 5], [33, 5], padded_num_reqs=5, padded_num_tokens=10)
    md = assert_matches_reference(batch)
    assert md.num_reqs == 5 and md.num_scheduled_reqs == 2 and md.num_actual_tokens == 10
    assert (md.num_decodes, md.num_prefills) == (1, 1)
    assert md.paged_kv_indptr.tolist() == [0, 3, 4, 4, 4, 4]
    assert md.paged_kv_last_page_len.tolist() == [1, 5, 0, 0, 0]
    assert md.prefill_qo_indptr.tolist() == [0, 5]
    assert md.prefill_paged_kv_indptr.tolist() == [0, 1]


def test_exact_page_multiples():
    md = assert_matches_reference(_batch([1, 1, 16, 64], [16, 32, 16, 128]))
    assert md.paged_kv_last_page_len.tolist() == [16, 16, 16, 16]
    assert md.paged_kv_indptr.tolist() == [0, 1, 3, 4, 12]


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_block_sizes(block_size):
    seq = [1, 63, 64, 65, 129, 40]
    md = assert_matches_reference(_batch([1, 1, 1, 1, 5, 40], seq, block_size=block_size))
    expected_last = [(x % block_size) or block_size for x in seq]
    assert md.paged_kv_last_page_len.tolist() == expected_last
    if block_size == 1:
        assert md.paged_kv_indptr.tolist() == np.concatenate([[0], np.cumsum(seq)]).tolist()


def test_speculative_threshold_moves_short_rows_to_decodes():
    batch = _batch([3, 1, 9], [40, 41, 9])
    assert assert_matches_reference(batch, decode_threshold=3).num_decodes == 2
    with pytest.raises(attnsync.SpecError, match="attnsync.reorder"):
        attnsync.build(batch, backend="flashinfer")  # threshold 1: an extend before a decode


@pytest.mark.parametrize("padded", [False, True])
def test_common_arrays_are_the_common_builds(padded):
    """The fields FlashInfer shares with the common metadata hold the same values (one derivation
    each, attnsync/_fields.py), and an unpadded batch's own arrays are shared, not copied."""
    kw = {"padded_num_reqs": 4, "padded_num_tokens": 8} if padded else {}
    batch = _batch([1, 4], [20, 4], **kw)
    md = attnsync.build(batch, backend="flashinfer")
    common = attnsync.build(batch)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        np.testing.assert_array_equal(getattr(md, name), getattr(common, name), err_msg=name)
    assert (md.seq_lens is batch.seq_lens and md.block_table is batch.block_table) is not padded


def test_registered_and_option_checked():
    assert "flashinfer" in attnsync.available_backends()
    with pytest.raises(attnsync.SpecError, match="decode_threshold"):
        attnsync.build(_batch([1], [5]), backend="flashinfer", page_size=16)


# ---------------------------------------------------------------------------------------------
# Property test over random ordered batches.


@settings(max_examples=300, deadline=None)
@given(batch=exact_batches(max_reqs=10), threshold=st.sampled_from([1, 1, 1, 2, 4]))
def test_random_ordered_batches_match_reference(batch, threshold):
    _, ordered = attnsync.reorder(batch, decode_threshold=threshold)
    assert_matches_reference(ordered, decode_threshold=threshold)


# ---------------------------------------------------------------------------------------------
# Decode steps and their neighbours against the reference (the compiled twin against the numpy
# forms is tests/test_native.py's).


def _decode_batch(num_reqs=32, width=128, block_size=16, seed=0, **kw) -> attnsync.Batch:
    """A decode step: one-token rows, seq_lens in [200, 2000), random page ids."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(200, 2000, num_reqs).astype(np.int32)
    table = np.zeros((num_reqs, width), np.int32)
    for r, s in enumerate(seq):
        used = -(-int(s) // block_size)
        table[r, :used] = rng.integers(1, 2**20, used)
    return attnsync.Batch(query_lens=np.ones(num_reqs, np.int32), seq_lens=seq, block_table=table,
                          block_size=block_size, **kw)


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(_decode_batch(), id="benchmark-decode"),
        pytest.param(_batch([1, 1, 1, 1], [1, 15, 16, 200]), id="short-decodes"),
        pytest.param(_batch([1], [1], block_size=1), id="one-token-one-page"),
        pytest.param(_decode_batch(padded_num_reqs=40, padded_num_tokens=48), id="padded-decode"),
        pytest.param(_decode_batch(padded_num_tokens=48), id="padded-tokens-only"),
        pytest.param(_batch([1, 1, 20, 37], [17, 64, 50, 37]), id="decode+prefill"),
        pytest.param(_batch([1, 1, 20, 37], [17, 64, 50, 37], padded_num_reqs=6, padded_num_tokens=64),
                     id="decode+prefill-padded"),
        pytest.param(_batch([1, 1, 1], [17, 64, 9], is_prefilling=[False, False, True]), id="decodes+short-extend"),
        pytest.param(_batch([1, 0, 1], [17, 5, 9]), id="empty-row"),
        pytest.param(_decode_batch(width=5000), id="wide-table"),
    ],
)
def test_decode_steps_and_neighbours_match_reference(batch):
    md = assert_matches_reference(batch)
    assert md.paged_kv_indices.flags.c_contiguous and md.slot_mapping.flags.c_contiguous


def test_paged_kv_arrays_returns_writeable_arrays():
    """The public helper's contract: fresh int32 arrays the caller may write (build freezes its own)."""
    for width_extra in (0, 5000):  # a narrow and a wide table
        out = paged_kv_arrays(np.array([3, 40, 0], np.int32), np.ones((3, 3 + width_extra), np.int32), 16)
        assert all(a.flags.writeable and a.dtype == np.int32 for a in out)


# ---------------------------------------------------------------------------------------------
# Refusals.


def test_unordered_batch_names_reorder():
    batch = _batch([5, 1], [5, 9])
    with pytest.raises(attnsync.SpecError, match=r"decode-first order.*row 1 is a decode row.*attnsync\.reorder"):
        attnsync.build(batch, backend="flashinfer")


def test_inexact_rows_are_refused():
    batch = _batch([1, 1, 4], [30, 30, 4], seq_lens_exact=[True, False, True])
    with pytest.raises(attnsync.SpecError, match=r"'flashinfer' needs exact sequence lengths.*paged_kv_indptr.*row 1 is marked inexact"):
        attnsync.build(batch, backend="flashinfer")


def test_bad_arguments():
    with pytest.raises(TypeError, match="attnsync.Batch"):
        attnsync.backends.flashinfer.build({"query_lens": [1]})
    with pytest.raises(TypeError, match="decode_threshold"):
        attnsync.build(_batch([1], [5]), backend="flashinfer", decode_threshold=True)
    with pytest.raises(attnsync.SpecError, match="decode_threshold"):
        attnsync.build(_batch([1], [5]), backend="flashinfer", decode_threshold=0)


def test_metadata_is_frozen():
    md = attnsync.build(_batch([1], [5]), backend="flashinfer")
    with pytest.raises(AttributeError):
        md.num_decodes = 3
    with pytest.raises(ValueError, match="read-only"):
        md.paged_kv_indices[0] = 1


# ---------------------------------------------------------------------------------------------
# Lowerings.


def _mixed_padded_batch() -> attnsync.Batch:
    return _batch([1, 1, 20, 37], [17, 64, 50, 37], padded_num_reqs=6, padded_num_tokens=64)


def test_torch_cpu_lowering_is_bit_for_bit():
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    md = attnsync.build(_mixed_padded_batch(), backend="flashinfer")
    tmd = ast.lower(md, device="cpu")
    device = {
        "query_start_loc": ("query_start_loc", torch.int32),
        "seq_lens": ("seq_lens", torch.int32),
        "block_table_tensor": ("block_table", torch.int32),
        "slot_mapping": ("slot_mapping", torch.int64),  # vLLM's cache-write kernels take int64
        "paged_kv_indices": ("paged_kv_indices", torch.int32),
    }
    host = {
        "query_start_loc_cpu": "query_start_loc",
        "seq_lens_cpu": "seq_lens",
        "paged_kv_indptr_cpu": "paged_kv_indptr",
        "paged_kv_last_page_len_cpu": "paged_kv_last_page_len",
        "prefill_qo_indptr_cpu": "prefill_qo_indptr",
        "prefill_paged_kv_indptr_cpu": "prefill_paged_kv_indptr",
    }
    for name, (field, dtype) in device.items():
        got = getattr(tmd, name)
        assert got.dtype == dtype and got.device.type == "cpu", name
        np.testing.assert_array_equal(got.numpy(), getattr(md, field).astype(got.numpy().dtype), err_msg=name)
    for name, field in host.items():
        got = getattr(tmd, name)
        assert got.dtype == torch.int32 and got.device.type == "cpu", name
        np.testing.assert_array_equal(got.numpy(), getattr(md, field), err_msg=name)
    for name in ("num_decodes", "num_prefills", "num_decode_pages", "num_pages", "block_size",
                 "max_prefill_query_len", "num_decode_tokens", "num_prefill_tokens"):
        assert getattr(tmd, name) == getattr(md, name)


def test_torch_cpu_lowering_of_empty_batch():
    pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    md = attnsync.build(
        attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 2), np.int32), block_size=16),
        backend="flashinfer",
    )
    tmd = ast.lower(md, device="cpu")
    assert tuple(tmd.paged_kv_indices.shape) == (0,) and tmd.paged_kv_indptr_cpu.tolist() == [0]


def test_jax_cpu_lowering_is_bit_for_bit():
    jax = pytest.importorskip("jax")
    from attnsync.adapters import jax as asj

    md = attnsync.build(_mixed_padded_batch(), backend="flashinfer")
    jmd = asj.lower(md, jax.devices("cpu")[0])
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping", "paged_kv_indices"):
        got = np.asarray(getattr(jmd, name))
        assert got.dtype == np.int32, name
        np.testing.assert_array_equal(got, getattr(md, name), err_msg=name)
    assert jmd.num_decode_pages == md.num_decode_pages


def test_import_pulls_in_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import attnsync, attnsync.backends.flashinfer
        md = attnsync.build(attnsync.Batch(query_lens=[1, 3], seq_lens=[17, 3],
                            block_table=[[1, 2], [3, 0]], block_size=16), backend="flashinfer")
        assert md.paged_kv_indptr.tolist() == [0, 2, 3]
        loaded = sorted(m for m in ("torch", "jax", "jaxlib", "triton", "flashinfer") if m in sys.modules)
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_module_does_not_import_flashinfer():
    pytest.importorskip("torch")
    code = "import sys, attnsync.integrations.flashinfer; assert 'flashinfer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Planning against stand-in wrappers that follow FlashInfer's documented contract.


class _FakeWrapper:
    """Records plan() arguments and computes attention from them as FlashInfer defines it."""

    def __init__(self, kind):
        import torch

        self.kind = kind
        self.device = torch.device("cpu")
        self.plans = []

    def plan(self, *args, **kwargs):
        import torch

        if self.kind == "decode":
            indptr, indices, last = args
            batch = len(last)
            qo_indptr = torch.arange(batch + 1, dtype=torch.int32)
        else:
            qo_indptr, indptr, indices, last = args
            assert kwargs["causal"] is True
        # FlashInfer's contract: host int32 indptr arrays; indices [indptr[-1]]; one
        # last-page entry per row; every planned row has at least one page.
        for t in (qo_indptr, indptr, last):
            assert t.device.type == "cpu" and t.dtype == torch.int32
        assert int(indptr[0]) == 0 and int(qo_indptr[0]) == 0
        assert indices.numel() == int(indptr[-1]) and len(indptr) == len(last) + 1
        self.plans.append(dict(args=args, kwargs=kwargs))
        self.state = (qo_indptr, indptr, indices, last, kwargs)

    def run(self, q, kv_cache, *, out):
        qo_indptr, indptr, indices, last, kw = self.state
        k, v = kv_cache
        page = kw["page_size"]
        scale = kw["sm_scale"]
        group = kw["num_qo_heads"] // kw["num_kv_heads"]
        assert out.shape == q.shape
        for b in range(len(last)):
            pages = indices[indptr[b] : indptr[b + 1]].tolist()
            kv_len = (len(pages) - 1) * page + int(last[b])
            keys = np.concatenate([k[p].numpy() for p in pages])[:kv_len].astype(np.float64)
            vals = np.concatenate([v[p].numpy() for p in pages])[:kv_len].astype(np.float64)
            q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
            for i in range(q0, q1):
                pos = kv_len - (q1 - q0) + (i - q0)  # causal, aligned to the end of the sequence
                for h in range(q.shape[1]):
                    logits = scale * keys[: pos + 1, h // group] @ q[i, h].numpy().astype(np.float64)
                    p = np.exp(logits - logits.max())
                    out[i, h] = torch_from(p @ vals[: pos + 1, h // group] / p.sum())
        return out


def torch_from(values):
    import torch

    return torch.from_numpy(np.asarray(values))


def _plan_inputs(batch):
    from attnsync.adapters import torch as ast

    md = attnsync.build(batch, backend="flashinfer")
    return md, ast.lower(md, device="cpu")


PLAN_SHAPE = dict(num_qo_heads=4, num_kv_heads=2, head_dim=8)


def test_plan_hands_flashinfer_host_arrays_and_device_indices():
    torch = pytest.importorskip("torch")
    from attnsync.integrations.flashinfer import plan

    md, tmd = _plan_inputs(_mixed_padded_batch())
    dw, pw = _FakeWrapper("decode"), _FakeWrapper("prefill")
    plan(tmd, decode_wrapper=dw, prefill_wrapper=pw, q_data_type=torch.bfloat16, sm_scale=0.5, **PLAN_SHAPE)
    (decode,), (prefill,) = dw.plans, pw.plans
    indptr, indices, last = decode["args"]
    assert indptr.tolist() == md.paged_kv_indptr[:3].tolist()
    assert last.tolist() == md.paged_kv_last_page_len[:2].tolist()
    assert indices.tolist() == md.paged_kv_indices[: md.num_decode_pages].tolist()
    # A view of the staged indices at a host-known offset, never a copy.
    assert indices.data_ptr() == tmd.paged_kv_indices.data_ptr()
    qo, kv, p_indices, p_last = prefill["args"]
    assert qo.tolist() == [0, 20, 57] and kv.tolist() == md.prefill_paged_kv_indptr.tolist()
    assert p_last.tolist() == md.paged_kv_last_page_len[2:4].tolist()
    assert p_indices.data_ptr() == tmd.paged_kv_indices.data_ptr() + 4 * md.num_decode_pages
    assert p_indices.tolist() == md.paged_kv_indices[md.num_decode_pages : md.num_pages].tolist()
    for call, head_key in ((decode, "head_dim"), (prefill, "head_dim_qk")):
        kw = call["kwargs"]
        assert kw[head_key] == 8 and kw["page_size"] == 16 and kw["non_blocking"] is True
        assert kw["q_data_type"] == kw["kv_data_type"] == torch.bfloat16 and kw["sm_scale"] == 0.5
        assert kw["window_left"] == -1 and "o_data_type" not in kw


@pytest.mark.parametrize(
    "query_lens, seq_lens, prefilling",
    [
        ([1, 1, 1], [5, 16, 40], None),  # decode only
        ([9, 16, 30], [9, 16, 30], None),  # fresh prefills only
        ([12, 3], [40, 20], [True, True]),  # chunked-prefill continuations only
        ([1, 1, 20, 37, 1], [17, 64, 50, 37, 33], [False, False, True, True, True]),  # mixed
    ],
    ids=["decode", "prefill", "continuation", "mixed"],
)
def test_planned_contract_reproduces_reference_attention(query_lens, seq_lens, prefilling):
    torch = pytest.importorskip("torch")
    from attnsync.integrations.flashinfer import plan, run

    batch = _batch(query_lens, seq_lens, block_size=4, is_prefilling=prefilling,
                   padded_num_reqs=len(query_lens) + 2, padded_num_tokens=sum(query_lens) + 3)
    md, tmd = _plan_inputs(batch)
    rng = np.random.default_rng(1)
    num_pages = int(batch.block_table.max()) + 1
    k = torch.from_numpy(rng.standard_normal((num_pages, 4, 2, 8)))
    v = torch.from_numpy(rng.standard_normal((num_pages, 4, 2, 8)))
    q = torch.from_numpy(rng.standard_normal((md.num_actual_tokens, 4, 8)))
    out = torch.full_like(q, float("nan"))
    dw, pw = _FakeWrapper("decode"), _FakeWrapper("prefill")
    plan(tmd, decode_wrapper=dw, prefill_wrapper=pw, q_data_type=torch.float64, sm_scale=0.3, **PLAN_SHAPE)
    assert len(dw.plans) == (md.num_decodes > 0) and len(pw.plans) == (md.num_prefills > 0)
    run(tmd, q, (k, v), decode_wrapper=dw, prefill_wrapper=pw, out=out)
    ref = paged_attention_reference(
        q.numpy(), k.numpy(), v.numpy(), query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,
        block_table=md.block_table, scale=0.3,
    )
    assert relative_error(out.numpy(), ref) < 1e-12
    # Padding tokens are left untouched.
    assert torch.isnan(out[md.num_scheduled_tokens :]).all()


def test_plan_refuses_missing_wrappers():
    torch = pytest.importorskip("torch")
    from attnsync.integrations.flashinfer import plan

    _, tmd = _plan_inputs(_mixed_padded_batch())
    with pytest.raises(attnsync.SpecError, match=r"decode_wrapper: the batch has 2 decode row\(s\).*BatchDecodeWithPagedKVCacheWrapper"):
        plan(tmd, prefill_wrapper=_FakeWrapper("prefill"), q_data_type=torch.float16, **PLAN_SHAPE)
    with pytest.raises(attnsync.SpecError, match=r"prefill_wrapper: the batch has 2 prefill.*BatchPrefillWithPagedKVCacheWrapper"):
        plan(tmd, decode_wrapper=_FakeWrapper("decode"), q_data_type=torch.float16, **PLAN_SHAPE)
    # A decode-only batch needs no prefill wrapper, and the other way round.
    _, decode_only = _plan_inputs(_batch([1, 1], [3, 9]))
    plan(decode_only, decode_wrapper=_FakeWrapper("decode"), q_data_type=torch.float16, **PLAN_SHAPE)


def test_plan_refuses_multi_token_decode_rows():
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast
    from attnsync.integrations.flashinfer import plan

    md = attnsync.build(_batch([3, 2], [40, 41]), backend="flashinfer", decode_threshold=3)
    with pytest.raises(attnsync.SpecError, match="one query token per request.*decode_threshold=1"):
        plan(ast.lower(md, device="cpu"), decode_wrapper=_FakeWrapper("decode"),
             q_data_type=torch.float16, **PLAN_SHAPE)


def test_plan_refuses_unlowered_or_foreign_objects():
    torch = pytest.importorskip("torch")
    from attnsync.integrations.flashinfer import plan

    md = attnsync.build(_batch([1], [5]), backend="flashinfer")
    with pytest.raises(TypeError, match="not lowered.*lower"):
        plan(md, decode_wrapper=_FakeWrapper("decode"), q_data_type=torch.float16, **PLAN_SHAPE)
    with pytest.raises(TypeError, match="torch lowering of FlashInfer metadata"):
        plan(object(), q_data_type=torch.float16, **PLAN_SHAPE)
    _, tmd = _plan_inputs(_batch([1], [5]))
    with pytest.raises(attnsync.SpecError, match="multiple of num_kv_heads"):
        plan(tmd, decode_wrapper=_FakeWrapper("decode"), q_data_type=torch.float16,
             num_qo_heads=6, num_kv_heads=4, head_dim=8)
    with pytest.raises(TypeError, match="num_qo_heads"):
        plan(tmd, decode_wrapper=_FakeWrapper("decode"), q_data_type=torch.float16,
             num_qo_heads=4.0, num_kv_heads=2, head_dim=8)


def test_plan_refuses_a_wrapper_on_another_device():
    torch = pytest.importorskip("torch")
    from attnsync.integrations.flashinfer import plan

    _, tmd = _plan_inputs(_batch([1], [5]))
    wrapper = _FakeWrapper("decode")
    wrapper.device = torch.device("cuda", 0)
    with pytest.raises(attnsync.SpecError, match=r"works on cuda:0.*lowered to\s+cpu"):
        plan(tmd, decode_wrapper=wrapper, q_data_type=torch.float16, **PLAN_SHAPE)


def test_run_refuses_short_q():
    torch = pytest.importorskip("torch")
    from attnsync.integrations.flashinfer import run

    _, tmd = _plan_inputs(_batch([1, 4], [9, 4]))
    q = torch.zeros(3, 4, 8)
    with pytest.raises(attnsync.SpecError, match="at least 5 tokens"):
        run(tmd, q, None, decode_wrapper=_FakeWrapper("decode"), prefill_wrapper=_FakeWrapper("prefill"),
            out=torch.zeros_like(q))


# ---------------------------------------------------------------------------------------------
# The pinned plan-buffer rotation, with stand-in CUDA events.


class _FakeEvent:
    """A CUDA event stand-in: pending until the test marks it done."""

    made: list = []

    def __init__(self):
        self.done = False
        self.waited = False
        _FakeEvent.made.append(self)

    def record(self, stream):
        pass

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = True
        self.done = True


class _PinnedWrapper:
    def __init__(self, torch):
        self.device = torch.device("cuda", 0)
        self._pin_memory_int_workspace_buffer = torch.zeros(4, dtype=torch.uint8)
        self.seen = []

    def plan(self):
        self.seen.append(self._pin_memory_int_workspace_buffer)


@pytest.fixture
def fake_cuda_events(monkeypatch):
    torch = pytest.importorskip("torch")
    from attnsync.integrations import flashinfer as fp

    _FakeEvent.made = []
    monkeypatch.setattr(fp.torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(fp.torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(fp, "_pinned_like", lambda buffer: torch.zeros_like(buffer))
    return torch, fp


def test_plans_alternate_pinned_buffers_and_wait_only_for_a_pending_one(fake_cuda_events):
    torch, fp = fake_cuda_events
    wrapper = _PinnedWrapper(torch)
    original = wrapper._pin_memory_int_workspace_buffer
    fp._guarded_plan(wrapper, wrapper.plan)
    fp._guarded_plan(wrapper, wrapper.plan)
    first, second = wrapper.seen
    assert first is original and second is not original  # two buffers in rotation
    assert not any(e.waited for e in _FakeEvent.made)  # nothing waited yet
    # Third plan reuses the first buffer while its copy (event 0) is still pending: it waits.
    fp._guarded_plan(wrapper, wrapper.plan)
    assert wrapper.seen[2] is original and _FakeEvent.made[0].waited
    # Fourth reuses the second buffer, whose copy has completed: no wait.
    _FakeEvent.made[1].done = True
    fp._guarded_plan(wrapper, wrapper.plan)
    assert wrapper.seen[3] is second and not _FakeEvent.made[1].waited


def test_rotation_restarts_after_reset_workspace_buffer(fake_cuda_events):
    torch, fp = fake_cuda_events
    wrapper = _PinnedWrapper(torch)
    fp._guarded_plan(wrapper, wrapper.plan)
    fresh = torch.zeros(8, dtype=torch.uint8)
    wrapper._pin_memory_int_workspace_buffer = fresh  # what reset_workspace_buffer does
    fp._guarded_plan(wrapper, wrapper.plan)
    assert wrapper.seen[1] is fresh


def test_wrapper_without_the_pinned_attribute_waits_for_its_previous_plan(fake_cuda_events):
    torch, fp = fake_cuda_events
    wrapper = _PinnedWrapper(torch)
    del wrapper._pin_memory_int_workspace_buffer
    calls = []
    fp._guarded_plan(wrapper, lambda: calls.append(1))
    fp._guarded_plan(wrapper, lambda: calls.append(2))
    assert calls == [1, 2] and len(_FakeEvent.made) == 2
    assert _FakeEvent.made[0].waited  # the first plan's copy was pending: the second waited

