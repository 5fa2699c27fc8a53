"""The ``turboquant`` backend: builder, cache format and consumers, on the CPU.

* Builder: hand cases worked on paper, a per-row brute-force reference on hypothesis batches
  (async speculative batches with upper-bound rows included), refusals.
* Lowering: numpy vs torch vs JAX, bit for bit.
* Cache format: a hand-computed slot, and every writer (numpy, torch, Triton, JAX) producing the
  same bytes.
* Consumers: torch (``impl="torch"`` and Triton in the interpreter, tiny shapes) and JAX
  against the float64 reference of the dequantized cache; the float64 reference against the
  generic paged reference; the sync-free forward against the naive one; FakeTensorMode and a
  scalar-store tripwire over the per-layer code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import batch_kwargs

import attnsync
from attnsync.backends import turboquant as tqb
from attnsync.backends.turboquant import HostRow

# --------------------------------------------------------------------------------------------
# Builder: brute-force reference
# --------------------------------------------------------------------------------------------


def brute_force(batch: attnsync.Batch, mode: str = "device") -> dict[str, Any] | str:
    """Per-row Python reference of every TurboQuant-specific field, or the refusal it expects."""
    n = batch.num_reqs
    q = [int(x) for x in batch.query_lens]
    s = [int(x) for x in batch.seq_lens]
    exact = [bool(x) for x in batch.seq_lens_exact]
    qsl = [0]
    for x in q:
        qsl.append(qsl[-1] + x)
    nd = 0
    while nd < n and q[nd] <= 1:
        nd += 1
    if any(q[r] <= 1 for r in range(nd, n)):
        return "order"
    spec = [r for r in range(nd, n) if not exact[r]]
    if spec and mode == "refuse":
        return "spec"
    return dict(
        num_decodes=nd,
        num_decode_tokens=qsl[nd],
        num_prefills=n - nd,
        num_prefill_tokens=qsl[n] - qsl[nd],
        prefill_query_start_loc=[qsl[r] - qsl[nd] for r in range(nd, n + 1)],
        prefill_seq_lens=s[nd:],
        prefill_max_query_len=max(q[nd:], default=0),
        prefill_max_seq_len=max(s[nd:], default=0),
        decode_max_seq_len=max(s[:nd], default=0),
        prefill_all_fresh=n > nd and all(s[r] == q[r] for r in range(nd, n)),
        host_loop_rows=tuple(
            HostRow(r, qsl[r], q[r], s[r], s[r] - q[r]) for r in range(nd, n) if exact[r]
        ),
        spec_token_ids=[t for r in spec for t in range(qsl[r], qsl[r + 1])],
        num_spec_rows=len(spec),
        spec_max_seq_len=max((s[r] for r in spec), default=0),
        is_prefill=max(q, default=0) > 1,
    )


def assert_matches_brute_force(batch: attnsync.Batch, mode: str = "device") -> None:
    want = brute_force(batch, mode)
    if isinstance(want, str):
        match = "decode-first" if want == "order" else "inexact_spec_rows='refuse'"
        with pytest.raises(attnsync.SpecError, match=match):
            attnsync.build(batch, backend="turboquant", inexact_spec_rows=mode)
        return
    md = attnsync.build(batch, backend="turboquant", inexact_spec_rows=mode)
    for name, value in want.items():
        got = getattr(md, name)
        if isinstance(got, np.ndarray):
            assert got.dtype == np.int32, name
            np.testing.assert_array_equal(got, np.asarray(value, dtype=np.int32).reshape(got.shape), err_msg=name)
        else:
            assert got == value, (name, got, value)
            assert type(got) is type(value), (name, type(got))
    assert md.num_spec_tokens == len(want["spec_token_ids"])
    # The common fields are the common builder's, by reference.
    common = attnsync.build(batch)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping", "token_to_req"):
        np.testing.assert_array_equal(getattr(md, name), getattr(common, name), err_msg=name)
    assert (md.max_query_len, md.max_seq_len, md.num_reqs, md.num_actual_tokens) == (
        common.max_query_len, common.max_seq_len, common.num_reqs, common.num_actual_tokens
    )
    # Exact host values only ever come from exact rows.
    for row in md.host_loop_rows:
        assert batch.seq_lens_exact[row.row]
    for f in dataclasses.fields(md):
        value = getattr(md, f.name)
        if isinstance(value, np.ndarray):
            assert not value.flags.writeable, f.name


# --------------------------------------------------------------------------------------------
# Builder: hand cases
# --------------------------------------------------------------------------------------------


def _batch(q, s, **kw):
    bs = kw.pop("block_size", 16)
    width = max([-(-x // bs) for x in s] + [1])
    table = kw.pop("block_table", [[r * width + c + 1 for c in range(width)] for r in range(len(q))])
    return attnsync.Batch(query_lens=q, seq_lens=s, block_table=table, block_size=bs, **kw)


def test_mixed_batch_by_hand():
    # decodes (1, 40), (1, 7); prefills (10, 10) fresh and (2, 5) with 3 cached tokens
    batch = _batch([1, 1, 10, 2], [40, 7, 10, 5])
    md = attnsync.build(batch, backend="turboquant")
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills, md.num_prefill_tokens) == (2, 2, 2, 12)
    assert md.query_start_loc.tolist() == [0, 1, 2, 12, 14]
    assert md.seq_lens.tolist() == [40, 7, 10, 5]
    assert md.prefill_query_start_loc.tolist() == [0, 10, 12]
    assert md.prefill_seq_lens.tolist() == [10, 5]
    assert (md.decode_max_seq_len, md.prefill_max_query_len, md.prefill_max_seq_len) == (40, 10, 10)
    assert md.is_prefill and md.max_query_len == 10 and md.max_seq_len == 40
    # vLLM's fast-path test on the prefill sub-batch, max_query_len == max_seq_len, passes here
    # and would skip row 3's cached context; the per-row predicate does not.
    assert md.prefill_max_query_len == md.prefill_max_seq_len
    assert md.prefill_all_fresh is False
    assert md.host_loop_rows == (HostRow(2, 2, 10, 10, 0), HostRow(3, 12, 2, 5, 3))
    assert md.spec_token_ids.shape == (0,) and md.num_spec_rows == 0
    assert md.token_to_req.tolist() == [0, 1] + [2] * 10 + [3, 3]
    assert md.all_exact and md.slot_mapping_exact
    assert md.slot_mapping[-2:].tolist() == [10 * 16 + 3, 10 * 16 + 4]  # row 3: page 10, offsets 3, 4


def test_fast_path_and_single_kind_batches():
    fresh = attnsync.build(_batch([1, 3, 5], [9, 3, 5]), backend="turboquant")
    assert fresh.prefill_all_fresh and fresh.num_decodes == 1
    assert fresh.host_loop_rows == (HostRow(1, 1, 3, 3, 0), HostRow(2, 4, 5, 5, 0))
    decode = attnsync.build(_batch([1, 0, 1], [9, 4, 2]), backend="turboquant")
    assert (decode.num_decodes, decode.num_decode_tokens, decode.num_prefills) == (3, 2, 0)
    assert not decode.prefill_all_fresh and not decode.is_prefill
    assert decode.prefill_query_start_loc.tolist() == [0] and decode.host_loop_rows == ()
    prefill = attnsync.build(_batch([4, 6], [4, 13]), backend="turboquant")
    assert (prefill.num_decodes, prefill.decode_max_seq_len, prefill.num_prefills) == (0, 0, 2)
    assert prefill.prefill_query_start_loc.tolist() == [0, 4, 10]
    empty = attnsync.build(
        attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 1)), block_size=16), backend="turboquant"
    )
    assert (empty.num_decodes, empty.num_prefills, empty.prefill_all_fresh) == (0, 0, False)


def test_padded_batch():
    md = attnsync.build(_batch([1, 3], [9, 5], padded_num_reqs=4, padded_num_tokens=8), backend="turboquant")
    assert md.num_reqs == 4 and md.num_actual_tokens == 8
    assert md.num_scheduled_reqs == 2 and md.num_scheduled_tokens == 4
    assert md.query_start_loc.tolist() == [0, 1, 4, 4, 4]
    assert md.prefill_query_start_loc.tolist() == [0, 3]  # real prefill rows only
    assert md.token_to_req.tolist() == [0, 1, 1, 1, 4, 4, 4, 4]
    assert md.slot_mapping[4:].tolist() == [-1] * 4
    assert md.host_loop_rows == (HostRow(1, 1, 3, 5, 2),)


def test_async_spec_rows_never_feed_the_host_loop():
    # Rows: decodes with upper bounds (q=1, inexact), a spec row (q=3, bound 12, inexact), an
    # exact spec-shaped row (its bound happens to be exact), a continuation and a fresh prefill.
    exact = [False, True, False, True, True, True]
    batch = _batch([1, 1, 3, 3, 4, 5], [20, 9, 12, 8, 11, 5], seq_lens_exact=exact)
    md = attnsync.build(batch, backend="turboquant")
    assert md.num_decodes == 2 and md.num_prefills == 4
    assert not md.all_exact and not md.slot_mapping_exact
    assert [r.row for r in md.host_loop_rows] == [3, 4, 5]  # row 2 is routed to the device
    assert md.host_loop_rows[0] == HostRow(3, 5, 3, 8, 5)
    assert md.spec_token_ids.tolist() == [2, 3, 4]
    assert (md.num_spec_rows, md.num_spec_tokens, md.spec_max_seq_len) == (1, 3, 12)
    assert not md.prefill_all_fresh
    assert md.slot_mapping[2:5].tolist() == [-1, -1, -1]  # only the device knows where they go
    with pytest.raises(attnsync.SpecError, match=r"row 2 has query_len 3 > 1 and an inexact seq_len"):
        attnsync.build(batch, backend="turboquant", inexact_spec_rows="refuse")
    # inexact decode rows alone are fine in both modes: the decode kernel reads device lengths
    decodes = _batch([1, 1, 4], [20, 9, 4], seq_lens_exact=[False, False, True])
    refused = attnsync.build(decodes, backend="turboquant", inexact_spec_rows="refuse")
    assert refused.host_loop_rows == (HostRow(2, 2, 4, 4, 0),) and refused.prefill_all_fresh


def test_refusals():
    with pytest.raises(attnsync.SpecError, match=r"decode-first.*row 2 \(query_len 1\) comes after row 1"):
        attnsync.build(_batch([1, 4, 1], [9, 4, 3]), backend="turboquant")
    with pytest.raises(attnsync.SpecError, match="splits at 1"):
        attnsync.build(_batch([1], [9]), backend="turboquant", decode_threshold=2)
    with pytest.raises(attnsync.SpecError, match="unknown value 'host'"):
        attnsync.build(_batch([1], [9]), backend="turboquant", inexact_spec_rows="host")
    with pytest.raises(attnsync.SpecError, match="no option"):
        attnsync.build(_batch([1], [9]), backend="turboquant", num_splits=2)
    # attnsync.reorder gives an order the builder accepts
    _, ordered = attnsync.reorder(_batch([4, 1, 0, 2, 1], [4, 9, 3, 7, 2]))
    assert attnsync.build(ordered, backend="turboquant").num_decodes == 3


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_kwargs(), st.sampled_from(["device", "refuse"]), st.booleans())
def test_builder_matches_brute_force(kwargs, mode, ordered):
    batch = attnsync.Batch(**kwargs)
    if ordered:
        _, batch = attnsync.reorder(batch)
    assert_matches_brute_force(batch, mode)


# --------------------------------------------------------------------------------------------
# Lowering: numpy vs torch vs JAX
# --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_kwargs(inexact=False, max_reqs=8))
def test_lowering_numpy_torch_jax_bit_for_bit(kwargs):
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    from attnsync.adapters import jax as asj
    from attnsync.adapters import torch as ast

    _, batch = attnsync.reorder(attnsync.Batch(**kwargs))
    md = attnsync.build(batch, backend="turboquant")
    tmd = ast.lower(md, device="cpu")
    with jax.transfer_guard("disallow"):
        jmd = asj.lower(md)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping", "token_to_req",
                 "prefill_query_start_loc", "spec_token_ids"):
        want = getattr(md, name)
        t = getattr(tmd, name)
        expected_dtype = torch.int64 if name == "slot_mapping" else torch.int32
        assert t.dtype == expected_dtype, name
        np.testing.assert_array_equal(t.numpy(), want, err_msg=name)
        j = getattr(jmd, name)
        assert j.dtype == np.int32, name
        np.testing.assert_array_equal(np.asarray(j), want, err_msg=name)
    for host, name in (("query_start_loc_cpu", "query_start_loc"), ("seq_lens_cpu", "seq_lens"),
                       ("prefill_query_start_loc_cpu", "prefill_query_start_loc"),
                       ("prefill_seq_lens_cpu", "prefill_seq_lens")):
        value = getattr(tmd, host)
        assert value.device.type == "cpu" and value.dtype == torch.int32
        np.testing.assert_array_equal(value.numpy(), getattr(md, name), err_msg=host)
    assert tmd.host_loop_rows == md.host_loop_rows and jmd.host_loop_rows == md.host_loop_rows
    assert tmd.prefill_all_fresh == md.prefill_all_fresh == jmd.prefill_all_fresh


def test_torch_lowering_with_exact_device_lengths():
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    bound = _batch([1, 3, 4], [20, 12, 4], seq_lens_exact=[False, False, True], block_size=4)
    true = np.array([18, 10, 4], dtype=np.int32)
    exact = attnsync.Batch(query_lens=[1, 3, 4], seq_lens=true, block_table=bound.block_table, block_size=4)
    md = attnsync.build(bound, backend="turboquant")
    with pytest.raises(attnsync.SpecError, match="exact device lengths"):
        ast.lower(md, device="cpu")
    tmd = ast.lower(md, device="cpu", seq_lens=torch.from_numpy(true))
    np.testing.assert_array_equal(tmd.slot_mapping.numpy(), attnsync.build(exact).slot_mapping)
    np.testing.assert_array_equal(tmd.seq_lens.numpy(), true)
    np.testing.assert_array_equal(tmd.seq_lens_cpu.numpy(), [20, 12, 4])  # the host keeps its bound


def test_sub_batches_are_views_with_host_maxima():
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast
    from attnsync.kernels.turboquant import sub_batches

    md = attnsync.build(_batch([1, 0, 1, 10, 2], [40, 6, 7, 10, 5], padded_num_reqs=7, padded_num_tokens=20),
                        backend="turboquant")
    tmd = ast.lower(md, device="cpu")
    decode, prefill = sub_batches(tmd)
    assert decode.query_start_loc.tolist() == [0, 1, 1, 2] and decode.seq_lens.tolist() == [40, 6, 7]
    assert (decode.num_reqs, decode.num_actual_tokens, decode.max_query_len, decode.max_seq_len) == (3, 2, 1, 40)
    assert prefill.query_start_loc.tolist() == [0, 10, 12] == prefill.query_start_loc_cpu.tolist()
    assert prefill.seq_lens.tolist() == [10, 5] == prefill.seq_lens_cpu.tolist()
    assert prefill.block_table.tolist() == md.block_table[3:5].tolist()
    assert prefill.slot_mapping.tolist() == md.slot_mapping[2:14].tolist()
    assert (prefill.num_reqs, prefill.num_actual_tokens, prefill.max_query_len, prefill.max_seq_len) == (2, 12, 10, 10)
    assert prefill.seq_lens.data_ptr() == tmd.seq_lens[3:].data_ptr()  # a view: exact device lengths reach it
    assert isinstance(prefill.seq_lens, torch.Tensor)


# --------------------------------------------------------------------------------------------
# Cache format
# --------------------------------------------------------------------------------------------


def test_slot_bytes_by_hand():
    layout = tqb.slot_layout(8)
    assert (layout.slot_bytes, layout.v_offset, layout.k_scale_offset, layout.used_bytes) == (32, 8, 12, 24)
    assert tqb.slot_layout(128).slot_bytes == 208 and tqb.slot_layout(64).slot_bytes == 112
    # max|k| = 127 gives k_scale = 1, so the codes are k rounded half to even; v spans [0, 15],
    # so v_scale = 1, v_min = 0 and the codes are v rounded.
    k = np.array([127, -3, 2.5, -2.5, 0.4, 0, 1.5, -127], dtype=np.float32)
    v = np.array([0, 15, 7.5, 8.5, 3, 1, 2, 4], dtype=np.float32)
    slot = tqb.quantize(k, v)
    assert slot.dtype == np.uint8 and slot.shape == (32,)
    assert slot[:8].view(np.int8).tolist() == [127, -3, 2, -2, 0, 0, 2, -127]
    assert slot[8:12].tolist() == [0xF0, 0x88, 0x13, 0x42]  # (0, 15), (8, 8), (3, 1), (2, 4)
    assert slot[12:24].view("<f4").tolist() == [1.0, 1.0, 0.0]
    assert slot[24:].tolist() == [0] * 8
    kd, vd = tqb.dequantize(slot)
    assert kd.tolist() == [127, -3, 2, -2, 0, 0, 2, -127] and vd.tolist() == [0, 15, 8, 8, 3, 1, 2, 4]
    # constant vectors: zero scales, codes 0, exact round trip
    z = tqb.quantize(np.zeros(8, np.float32), np.full(8, 3.25, np.float32))
    kz, vz = tqb.dequantize(z)
    assert not z[:12].any() and kz.tolist() == [0.0] * 8 and vz.tolist() == [3.25] * 8


def test_layout_refusals():
    with pytest.raises(attnsync.SpecError, match="power of two"):
        tqb.slot_layout(96)
    with pytest.raises(attnsync.SpecError, match="kind='qr'"):
        tqb.rotation_matrix(96)
    assert tqb.rotation_matrix(96, kind="qr").shape == (96, 96)
    with pytest.raises(TypeError, match="uint8"):
        tqb.dequantize(np.zeros((2, 32), np.int8))


@pytest.mark.parametrize("kind", ["hadamard", "qr"])
def test_rotation_is_orthogonal_and_fixed(kind):
    r = tqb.rotation_matrix(64, kind=kind)
    np.testing.assert_allclose(r.astype(np.float64) @ r.T, np.eye(64), atol=1e-6)
    np.testing.assert_array_equal(r, tqb.rotation_matrix(64, kind=kind))
    assert not np.array_equal(r, tqb.rotation_matrix(64, kind=kind, seed=1))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 64))
    np.testing.assert_allclose((a @ r) @ (b @ r), a @ b, rtol=1e-5, atol=1e-5)


def test_quantization_error_bounds():
    rng = np.random.default_rng(3)
    k = (rng.standard_normal((500, 64)) * rng.choice([1e-3, 1.0, 100.0], (500, 1))).astype(np.float32)
    v = (rng.standard_normal((500, 64)) * rng.choice([1e-3, 1.0, 100.0], (500, 1))).astype(np.float32)
    slots = tqb.quantize(k, v)
    kd, vd = tqb.dequantize(slots)
    scales = slots[:, 96:108].view("<f4").astype(np.float64)
    assert (np.abs(kd - k) <= scales[:, 0:1] * 0.5 * (1 + 1e-5)).all()
    assert (np.abs(vd - v) <= scales[:, 1:2] * 0.5 * (1 + 1e-5) + 1e-6 * np.abs(v)).all()


def _writer_inputs(seed=1, tokens=37, heads=2, dim=16):
    rng = np.random.default_rng(seed)
    mag = rng.choice([1e-3, 1.0, 50.0], size=(tokens, heads, 1))
    k = (rng.standard_normal((tokens, heads, dim)) * mag).astype(np.float32)
    v = (rng.standard_normal((tokens, heads, dim)) * mag).astype(np.float32)
    k[0, 0] = 0.0  # zero scale
    v[0, 0] = 3.0  # zero range
    k[1, 1] = np.arange(dim) - 7.5  # ties at .5 after scaling
    v[1, 1] = np.arange(dim) * 0.5
    return k, v


@pytest.mark.triton_cpu
def test_every_writer_writes_the_same_bytes():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from attnsync.kernels import turboquant as tqk

    k, v = _writer_inputs()
    tokens, heads, dim = k.shape
    block_size, num_blocks = 4, 20
    layout = tqb.slot_layout(dim)
    slots = np.random.default_rng(2).permutation(num_blocks * block_size)[:tokens]
    slots[3] = -1  # a padding token: skipped
    want = np.full((num_blocks, heads, block_size, layout.slot_bytes), 7, np.uint8)  # padding bytes stay 7
    tqb.write_slots(want, tqb.quantize(k, v), slots)
    np.testing.assert_array_equal(tqk.quantize(torch.from_numpy(k), torch.from_numpy(v)).numpy(),
                                  tqb.quantize(k, v)[..., : layout.used_bytes])
    for impl in ("triton", "torch"):
        cache = torch.full(want.shape, 7, dtype=torch.uint8)
        keep = slots >= 0 if impl == "torch" else np.ones(tokens, bool)  # torch path: real tokens only
        tqk.store_kv(torch.from_numpy(k[keep]), torch.from_numpy(v[keep]), cache,
                     torch.from_numpy(slots[keep]), num_tokens=int(keep.sum()), impl=impl)
        np.testing.assert_array_equal(cache.numpy(), want, err_msg=impl)
    jax = pytest.importorskip("jax")
    from attnsync.kernels import turboquant_jax as tqj

    got = jax.jit(tqj.write_cache)(jax.numpy.full(want.shape, 7, jax.numpy.uint8), k, v, slots.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(got), want)
    kj, vj = tqj.dequantize(jax.numpy.asarray(want), layout)
    kn, vn = tqb.dequantize(want)
    # float32 dequantization against float64: equal up to one float32 rounding of each term
    np.testing.assert_allclose(np.asarray(kj), kn, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(vj), vn, rtol=1e-5, atol=1e-5)
    kt, vt = tqk.dequantize_cache(torch.from_numpy(want), dim)
    np.testing.assert_allclose(kt.numpy(), kn, rtol=1e-6)
    np.testing.assert_allclose(vt.numpy(), vn, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Consumers
# --------------------------------------------------------------------------------------------


class Step(NamedTuple):
    batch: attnsync.Batch
    md: Any
    cache: np.ndarray  # before this step's write
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    true_seq_lens: np.ndarray
    rotation: np.ndarray


def make_step(rows, *, block_size=4, num_q_heads=4, num_kv_heads=2, head_dim=16, seed=0, rejected=2, **pad):
    """A random step: rows are (query_len, true seq_len, exact); inexact rows carry a bound
    `rejected` tokens too large. The cache holds each row's quantized context; every other
    byte is 0xFF, whose float32 fields read as NaN, so reading a wrong slot shows."""
    rng = np.random.default_rng(seed)
    q_lens = np.array([r[0] for r in rows], dtype=np.int32)
    true = np.array([r[1] for r in rows], dtype=np.int32)
    exact = np.array([r[2] for r in rows], dtype=bool)
    bound = true + np.where(exact, 0, rejected).astype(np.int32)
    width = int(-(-bound.max() // block_size)) + 1
    num_blocks = len(rows) * width + 3
    table = rng.permutation(np.arange(1, num_blocks))[: len(rows) * width].reshape(len(rows), width)
    rotation = tqb.rotation_matrix(head_dim)
    cache = np.full((num_blocks, num_kv_heads, block_size, tqb.slot_layout(head_dim).slot_bytes), 0xFF, np.uint8)
    for r in range(len(rows)):
        ctx = int(true[r] - q_lens[r])
        if ctx:
            kk = rng.standard_normal((ctx, num_kv_heads, head_dim)).astype(np.float32)
            vv = rng.standard_normal((ctx, num_kv_heads, head_dim)).astype(np.float32)
            pos = np.arange(ctx)
            tqb.write_slots(cache, tqb.quantize(kk @ rotation, vv @ rotation), table[r, pos // block_size] * block_size + pos % block_size)
    batch = attnsync.Batch(query_lens=q_lens, seq_lens=bound, block_table=table, block_size=block_size,
                           seq_lens_exact=exact, **pad)
    md = attnsync.build(batch, backend="turboquant")
    t = md.num_actual_tokens
    q = rng.standard_normal((t, num_q_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((t, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((t, num_kv_heads, head_dim)).astype(np.float32)
    return Step(batch, md, cache, q, k, v, true, rotation)


# decodes (one a 1-token prompt, one inexact), an empty row, a device-routed spec row, a
# fresh prefill and two continuations (one starting mid-page)
MIXED = [(1, 9, True), (1, 6, False), (0, 5, True), (1, 1, True), (3, 7, False), (5, 5, True), (4, 11, True),
         (2, 5, True)]
MIXED_EXACT = [(1, 9, True), (1, 6, True), (0, 5, True), (1, 1, True), (5, 5, True), (4, 11, True), (2, 5, True)]
FRESH = [(1, 9, True), (3, 3, True), (5, 5, True)]  # the one-call fast path
PREFILL_ONLY = [(4, 4, True), (6, 13, True)]
SCALE = 0.3


def run_torch(step: Step, impl: str, *, naive: bool = False):
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast
    from attnsync.kernels import turboquant as tqk

    seq_lens = None if step.md.all_exact else torch.from_numpy(step.true_seq_lens)
    tmd = ast.lower(step.md, device="cpu", seq_lens=seq_lens)
    hq, hkv, d = step.q.shape[1], step.k.shape[1], step.q.shape[2]
    layer = tqk.TurboQuantAttention(hq, hkv, d, device="cpu", scale=SCALE, rotation=step.rotation, impl=impl)
    cache = torch.from_numpy(step.cache.copy())
    args = (torch.from_numpy(step.q), torch.from_numpy(step.k), torch.from_numpy(step.v), cache, tmd)
    out = layer.forward_naive(*args) if naive else layer.forward(*args)
    return out.numpy(), cache.numpy()


def check(out: np.ndarray, cache_after: np.ndarray, step: Step, tol: float = 2e-5) -> None:
    """`out` against the float64 reference of `cache_after`; the step's k, v sit in their slots."""
    ref = tqb.reference_attention(step.q, step.k, step.v, cache_after, step.md, rotation=step.rotation,
                                  scale=SCALE, seq_lens=step.true_seq_lens)
    real = step.md.num_scheduled_tokens
    assert not np.isnan(ref[:real]).any()
    err = np.abs(out[:real] - ref[:real]).max() / np.abs(ref[:real]).max()
    assert err < tol, err
    # Each new token's quantized k, v are at its slot (found from the exact lengths) and
    # within half a quantization step of k R, v R: the writer used slot_mapping.
    k_deq, v_deq = tqb.dequantize(cache_after)
    md, bs = step.md, step.cache.shape[2]
    qsl = md.query_start_loc
    layout = tqb.slot_layout(step.k.shape[-1])
    for r in range(md.num_scheduled_reqs):
        for t in range(int(qsl[r]), int(qsl[r + 1])):
            pos = int(step.true_seq_lens[r]) - (int(qsl[r + 1]) - t)
            page, off = int(md.block_table[r, pos // bs]), pos % bs
            scales = cache_after[page, :, off, layout.k_scale_offset : layout.used_bytes].view("<f4")
            k_err = np.abs(k_deq[page, :, off] - step.k[t] @ step.rotation).max(axis=-1)
            v_err = np.abs(v_deq[page, :, off] - step.v[t] @ step.rotation).max(axis=-1)
            assert (k_err <= scales[:, 0] * 0.51 + 1e-6).all() and (v_err <= scales[:, 1] * 0.51 + 1e-6).all()


@pytest.mark.parametrize("rows", [MIXED, FRESH, PREFILL_ONLY], ids=["mixed", "fresh", "prefill-only"])
def test_torch_forward_matches_reference(rows):
    step = make_step(rows, padded_num_tokens=sum(r[0] for r in rows) + 2)
    out, cache = run_torch(step, "torch")
    check(out, cache, step)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("rows", [MIXED, FRESH], ids=["mixed", "fresh"])
def test_triton_forward_matches_reference(rows):
    pytest.importorskip("triton")
    step = make_step(rows, seed=1)
    out, cache = run_torch(step, "triton")
    check(out, cache, step)
    ref_out, ref_cache = run_torch(step, "torch")
    np.testing.assert_array_equal(cache, ref_cache)  # same rotated inputs, same bytes
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)


@pytest.mark.triton_cpu
def test_triton_split_kv_decode_matches_direct():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from attnsync.adapters import torch as ast
    from attnsync.kernels import turboquant as tqk

    step = make_step([(1, 70, True), (1, 33, True), (1, 2, True)], block_size=16)
    tmd = ast.lower(step.md, device="cpu")
    cache = torch.from_numpy(step.cache.copy())
    q_rot = torch.from_numpy(step.q @ step.rotation)
    k_rot, v_rot = (torch.from_numpy(x @ step.rotation) for x in (step.k, step.v))
    tqk.store_kv(k_rot, v_rot, cache, tmd.slot_mapping, num_tokens=3)  # decodes see their own k, v
    outs = []
    for splits in (1, 3):
        out = torch.full_like(q_rot, float("nan"))
        tqk.decode_attention(q_rot, cache, out, token_to_req=tmd.token_to_req, query_start_loc=tmd.query_start_loc,
                             seq_lens=tmd.seq_lens, block_table=tmd.block_table, num_items=3, max_seq_len=70,
                             scale=SCALE, num_splits=splits)
        outs.append(out.numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    check(outs[1] @ step.rotation.T, cache.numpy(), step, tol=1e-5)


def test_reference_agrees_with_generic_paged_reference():
    from attnsync.kernels.reference import paged_attention_reference

    step = make_step([(1, 9, True), (1, 14, True), (1, 3, True)])
    cache = step.cache.copy()
    tqb.write_slots(cache, tqb.quantize(step.k @ step.rotation, step.v @ step.rotation), step.md.slot_mapping)
    k_rot, v_rot = tqb.dequantize(cache)
    rot = step.rotation.astype(np.float64)
    # generic layout [num_blocks, block_size, Hkv, D], unrotated; unused slots are NaN there
    # and never read
    k_cache = np.nan_to_num((k_rot @ rot.T).transpose(0, 2, 1, 3), nan=0.0)
    v_cache = np.nan_to_num((v_rot @ rot.T).transpose(0, 2, 1, 3), nan=0.0)
    want = paged_attention_reference(step.q, k_cache, v_cache, query_start_loc=step.md.query_start_loc,
                                     seq_lens=step.md.seq_lens, block_table=step.md.block_table, scale=SCALE)
    got = tqb.reference_attention(step.q, step.k, step.v, cache, step.md, rotation=step.rotation, scale=SCALE)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows", [MIXED_EXACT, FRESH], ids=["loop", "fresh"])
def test_sync_free_forward_equals_naive(rows):
    step = make_step(rows, seed=2)
    out, cache = run_torch(step, "torch")
    naive_out, naive_cache = run_torch(step, "torch", naive=True)
    np.testing.assert_array_equal(out, naive_out)
    np.testing.assert_array_equal(cache, naive_cache)


def test_jax_forward_matches_reference():
    jax = pytest.importorskip("jax")
    from attnsync.adapters import jax as asj
    from attnsync.kernels import turboquant_jax as tqj

    for rows in (MIXED_EXACT, FRESH, PREFILL_ONLY):
        step = make_step(rows, seed=3)
        rotation = jax.device_put(step.rotation)
        inputs = [jax.device_put(x) for x in (step.q, step.k, step.v, step.cache)]
        with jax.transfer_guard("disallow"):
            jmd = asj.lower(step.md)
            out, cache = tqj.forward(*inputs, jmd, rotation, scale=SCALE)
        check(np.asarray(out), np.asarray(cache), step)
    with pytest.raises(attnsync.SpecError, match="inexact"):
        asj.lower(make_step(MIXED).md)  # JAX lowers exact batches only


# --------------------------------------------------------------------------------------------
# The per-layer code reads nothing back
# --------------------------------------------------------------------------------------------


def _fake_everything(step: Step, mode):
    """The layer, its inputs and its lowered metadata as fake tensors of `mode`."""
    import torch

    from attnsync.adapters import torch as ast
    from attnsync.kernels import turboquant as tqk

    tmd = ast.lower(step.md, device="cpu")
    fake = {f.name: mode.from_tensor(getattr(tmd, f.name)) for f in dataclasses.fields(tmd)
            if isinstance(getattr(tmd, f.name), torch.Tensor)}
    tmd = dataclasses.replace(tmd, **fake)
    layer = tqk.TurboQuantAttention(4, 2, 16, device="cpu", scale=SCALE, rotation=step.rotation, impl="torch")
    layer._cu_q, layer._cu_k = mode.from_tensor(layer._cu_q), mode.from_tensor(layer._cu_k)
    layer._rotations = {k: tuple(mode.from_tensor(t) for t in pair) for k, pair in layer._rotations.items()}
    args = [mode.from_tensor(torch.from_numpy(x)) for x in (step.q, step.k, step.v, step.cache.copy())]
    return layer, args, tmd


@pytest.mark.parametrize("rows", [MIXED_EXACT, FRESH], ids=["loop", "fresh"])
def test_forward_has_no_data_dependent_op(rows, monkeypatch):
    torch = pytest.importorskip("torch")
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    step = make_step(rows)
    mode = FakeTensorMode()
    layer, args, tmd = _fake_everything(step, mode)

    scalar_stores = []
    original = torch.Tensor.__setitem__

    def tripwire(self, key, value):
        # t[i] = x with an int index is a 0-d destination: a blocking copy on CUDA
        if isinstance(key, int) or (isinstance(key, tuple) and all(isinstance(i, int) for i in key)):
            scalar_stores.append(key)
        return original(self, key, value)

    monkeypatch.setattr(torch.Tensor, "__setitem__", tripwire)
    with mode:
        out = layer.forward(*args, tmd)  # would raise on .item(), .tolist(), nonzero, bool(t), ...
    assert tuple(out.shape) == step.q.shape and scalar_stores == []
    # negative control: the naive forward reads device values and is caught
    mode = FakeTensorMode()
    layer, args, tmd = _fake_everything(step, mode)
    with pytest.raises(DataDependentOutputException), mode:
        layer.forward_naive(*args, tmd)


def test_forward_naive_stores_scalars(monkeypatch):
    torch = pytest.importorskip("torch")
    step = make_step([(1, 9, True), (4, 11, True)])
    seen = []
    original = torch.Tensor.__setitem__

    def spy(self, key, value):
        if isinstance(key, int):
            seen.append((key, value))
        return original(self, key, value)

    monkeypatch.setattr(torch.Tensor, "__setitem__", spy)
    run_torch(step, "torch", naive=True)
    naive_seen = list(seen)
    seen.clear()
    run_torch(step, "torch")
    assert naive_seen == [(1, 4), (1, 11)] and seen == []


def test_module_import_stays_light():
    # the backend module is numpy only: importing it must not import a framework
    import subprocess
    import sys

    code = ("import sys, attnsync; import attnsync.backends.turboquant as m; "
            "attnsync.build(attnsync.Batch(query_lens=[1, 3], seq_lens=[5, 3], block_table=[[1], [2]], "
            "block_size=16), backend='turboquant'); "
            "print(sorted(x for x in ('torch', 'jax', 'triton') if x in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
