"""JAX adapter on CPU: one packed int32 vector per lowering (the pytree's only leaf) under
`transfer_guard("disallow")`, one `device_put`, no torch; static layouts and jit without
recompiles (1,000 steps of a bucket); aliasing and donation; the zero-dispatch pack/unpack;
int32 range and edited metadata refused; numpy vs torch-CPU vs JAX-CPU bit for bit."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import batch_kwargs

import attnsync
from attnsync import BucketLadder

jax = pytest.importorskip("jax")
asj = pytest.importorskip("attnsync.adapters.jax")
jnp = jax.numpy

ROOT = Path(__file__).resolve().parents[2]
DATA = ("query_start_loc", "seq_lens", "block_table", "slot_mapping")  # declaration order
META = (
    "num_reqs", "num_actual_tokens", "num_scheduled_reqs", "num_scheduled_tokens", "max_query_len",
    "max_seq_len", "block_size", "decode_threshold", "num_decodes", "num_decode_tokens", "num_extends",
    "num_extend_tokens", "num_prefills", "num_prefill_tokens", "is_decode_first", "all_exact",
    "slot_mapping_exact",
)
# torch name of each device field, and its torch dtype name
TORCH_NAMES = {
    "query_start_loc": ("query_start_loc", "int32"),
    "seq_lens": ("seq_lens", "int32"),
    "block_table": ("block_table_tensor", "int32"),
    "slot_mapping": ("slot_mapping", "int64"),
}
HOST_MIRRORS = {"query_start_loc_cpu": "query_start_loc", "seq_lens_cpu_upper_bound": "seq_lens"}

MIXED = dict(
    query_lens=[1, 1, 3, 5],
    seq_lens=[17, 33, 3, 12],
    block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 0, 0]],
    block_size=16,
)
TREE = "[(0,), (1,), (0, 0), (0, 1)]"


def cpu():
    return jax.devices("cpu")[0]


def lower_guarded(md, device=None, **kwargs):
    with jax.transfer_guard("disallow"):
        return asj.lower(md, device if device is not None else cpu(), **kwargs)


def assert_jax_equals(md, out) -> None:
    for name in DATA:
        leaf = getattr(out, name)
        assert isinstance(leaf, jax.Array), name
        assert leaf.dtype == np.int32, (name, leaf.dtype)
        assert leaf.shape == getattr(md, name).shape, name
        assert leaf.devices() == {cpu()}, name
        np.testing.assert_array_equal(np.asarray(leaf), getattr(md, name), err_msg=name)
    for name in META:
        assert getattr(out, name) == getattr(md, name), name


def test_all_is_pinned():
    lowerings = [p + name for p in ("JaxBucketed", "Jax") for name in (
        "CommonMetadata", "FlashInferMetadata", "FlexMetadata", "MambaMetadata", "TreeMetadata",
        "TritonMetadata", "TurboQuantMetadata")]  # importable for isinstance and annotations
    assert sorted(asj.__all__) == sorted(["JaxLowering", *lowerings, "Layout", "lower", "lower_replicated",
                                          "pack", "unpack", "zeros_like_lowered"])
    for name in asj.__all__:
        assert getattr(asj, name) is not None, name


def test_fields_dtypes_and_values_under_transfer_guard(jax_transfer_guard):
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    out = asj.lower(md, cpu())  # the whole test body runs under transfer_guard("disallow")
    assert type(out).__name__ == "JaxCommonMetadata"
    assert sorted(out._data_names) == sorted(DATA) and sorted(out._static_names) == sorted(META)
    assert_jax_equals(md, out)
    assert np.asarray(out.slot_mapping).tolist() == [144, 112, 176, 177, 178, 55, 56, 57, 58, 59, -1, -1]
    # host scalars are plain Python values, static
    for name in META:
        assert type(getattr(out, name)) is type(getattr(md, name)), name
    assert type(out.max_seq_len) is int and type(out.all_exact) is bool


def test_transfer_guard_is_armed_in_this_test(jax_transfer_guard):
    """The guard used above does catch an implicit transfer (so those tests can fail)."""
    with pytest.raises(Exception, match=r"(?i)disallowed"):
        jax.numpy.asarray(np.arange(3))
    with jax_transfer_guard.allowed():
        assert int(jax.numpy.asarray(np.arange(3)).sum()) == 3


def test_the_packed_vector_is_the_only_leaf_and_the_layout_is_static():
    md = attnsync.build(attnsync.Batch(**MIXED))
    out = lower_guarded(md)
    leaves, treedef = jax.tree_util.tree_flatten(out)
    assert len(leaves) == 1 and leaves[0] is out.packed
    assert out.packed.dtype == np.int32 and out.packed.ndim == 1 and out.packed.committed
    assert out.packed.shape == (out.layout.size,) == (5 + 4 + 12 + 10,)
    # the layout names offsets, shapes and dtypes; the fields are slices of the vector
    entries = {name: (offset, shape, dtype) for name, offset, shape, dtype in out.layout.entries}
    assert entries == {"query_start_loc": (0, (5,), "int32"), "seq_lens": (5, (4,), "int32"),
                       "block_table": (9, (4, 3), "int32"), "slot_mapping": (21, (10,), "int32")}
    vector = np.asarray(out.packed)
    for name, (offset, shape, _) in entries.items():
        size = int(np.prod(shape))
        np.testing.assert_array_equal(vector[offset : offset + size].reshape(shape), getattr(md, name))
    assert out.layout.scalars == {name: getattr(md, name) for name in META}
    assert out.layout.names == DATA + out._static_names and sorted(out._static_names) == sorted(META)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(out)[0]]
    assert paths == [".packed"]
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert all(getattr(rebuilt, name) == getattr(md, name) for name in META)
    # host scalars are aux data: equal scalars -> equal treedefs, different scalars -> different
    same = lower_guarded(attnsync.build(attnsync.Batch(**dict(MIXED, block_table=np.array(MIXED["block_table"]) + 1))))
    assert jax.tree_util.tree_structure(same) == treedef and same.layout == out.layout
    assert hash(same.layout) == hash(out.layout) and same.layout is not out.layout
    longer = lower_guarded(attnsync.build(attnsync.Batch(**dict(MIXED, seq_lens=[17, 34, 3, 12]))))
    assert jax.tree_util.tree_structure(longer) != treedef and longer.layout != out.layout
    doubled = jax.tree_util.tree_map(lambda x: x * 2, out)
    assert type(doubled) is type(out) and doubled.max_seq_len == out.max_seq_len
    np.testing.assert_array_equal(np.asarray(doubled.seq_lens), 2 * md.seq_lens)


def test_lowered_objects_are_immutable():
    out = lower_guarded(attnsync.build(attnsync.Batch(**MIXED)))
    with pytest.raises(AttributeError, match="immutable"):
        out.max_seq_len = 3
    with pytest.raises(AttributeError, match="immutable"):
        out.packed = None
    assert f"JaxCommonMetadata(packed=int32[31] on {cpu()}; num_reqs=4," in repr(out)


def test_one_device_put_of_one_fresh_int32_vector_and_no_other_dispatch(monkeypatch):
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    calls = []
    real = jax.device_put

    def spy(x, *args, **kwargs):
        calls.append(x)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", spy)
    jitted = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: jitted.append(1))  # lower dispatches no jit
    out = lower_guarded(md)
    assert len(calls) == 1 and jitted == []
    (vector,) = calls
    assert isinstance(vector, np.ndarray) and vector.dtype == np.int32 and vector.ndim == 1
    assert vector.shape == (7 + 6 + 6 * 3 + 12,)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(out.packed), vector)
    # bucketed: the per-step scalars ride in the same vector, still one transfer
    lad = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=16)
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[5, 40], block_table=[[1, 2, 3], [4, 5, 6]], block_size=16)
    bucket = lad.bucket_for(batch)
    bmd = attnsync.build(lad.pad(batch, bucket))
    monkeypatch.setattr(jax, "device_put", spy)
    calls.clear()
    jb = lower_guarded(bmd, bucket=bucket)
    assert len(calls) == 1 and len(jax.tree_util.tree_leaves(jb)) == 1


def test_empty_batches():
    for extra in ({}, dict(padded_num_reqs=2, padded_num_tokens=3)):
        md = attnsync.build(attnsync.Batch(query_lens=[], seq_lens=[], block_table=[], block_size=16, **extra))
        assert_jax_equals(md, lower_guarded(md))


def test_eager_reads_split_once_and_keep_the_fields(jax_transfer_guard):
    md = attnsync.build(attnsync.Batch(**MIXED))
    out = asj.lower(md, cpu())
    first = out.slot_mapping
    assert out.slot_mapping is first and out.block_table is out.block_table
    assert out.block_table.shape == (4, 3) and out.block_table.committed


def test_a_lowering_closed_over_by_jit_leaks_no_tracer():
    md = attnsync.build(attnsync.Batch(**MIXED))
    out = lower_guarded(md)
    value = jax.jit(lambda x: out.slot_mapping.sum() + x)(jnp.int32(1))
    assert int(value) == int(md.slot_mapping.sum()) + 1
    # the read inside the trace kept nothing: an eager read now gives concrete arrays
    np.testing.assert_array_equal(np.asarray(out.slot_mapping), md.slot_mapping)


def test_float32_fields_ride_bit_for_bit():
    batch = attnsync.Batch(query_lens=[5, 5, 3], seq_lens=[20, 9, 3], block_table=[[1, 2], [3, 0], [4, 0]],
                           block_size=16)
    md = attnsync.build(batch, backend="tree", speculative_token_tree=TREE)
    assert md.tree_attn_bias.dtype == np.float32 and np.isinf(md.tree_attn_bias).any()
    out = lower_guarded(md)
    entries = {name: dtype for name, _, _, dtype in out.layout.entries}
    assert entries["tree_attn_bias"] == "float32" and out.packed.dtype == np.int32
    bias = out.tree_attn_bias
    assert bias.dtype == np.float32 and np.asarray(bias).tobytes() == md.tree_attn_bias.tobytes()
    inside = jax.jit(lambda m: m.tree_attn_bias)(out)
    assert inside.dtype == np.float32 and np.asarray(inside).tobytes() == md.tree_attn_bias.tobytes()


def test_jit_reuses_the_compilation_for_the_same_shapes(jax_transfer_guard):
    traces = []

    @jax.jit
    def consume(m):
        traces.append(1)  # runs only while tracing
        return m.slot_mapping.sum() + m.query_start_loc[-1] * m.max_seq_len + m.block_table.sum()

    md1 = attnsync.build(attnsync.Batch(**MIXED))
    md2 = attnsync.build(attnsync.Batch(**dict(MIXED, block_table=np.array(MIXED["block_table"]) + 3)))
    r1 = consume(asj.lower(md1, cpu()))
    r2 = consume(asj.lower(md2, cpu()))
    assert len(traces) == 1, "a second lowering of the same shapes must not retrace"
    assert int(r1) == int(md1.slot_mapping.sum()) + 10 * 33 + int(md1.block_table.sum())
    assert int(r2) == int(md2.slot_mapping.sum()) + 10 * 33 + int(md2.block_table.sum())
    assert int(r2) != int(r1)
    # a different bucket does retrace: the counter can fail
    md3 = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=8, padded_num_tokens=16))
    consume(asj.lower(md3, cpu()))
    assert len(traces) == 2


# --------------------------------------------------------------------------------------------
# Buckets: 1,000 random steps of one bucket, one compile.


def one_bucket_steps(count: int, seed: int):
    """(bucket, metadata) of `count` random decode steps that all fall in one bucket."""
    lad = BucketLadder(max_num_reqs=16, max_num_tokens=16, max_model_len=256, block_size=16, width_sizes=(16,))
    rng = np.random.default_rng(seed)
    bucket = None
    for _ in range(count):
        n = int(rng.integers(9, 17))  # 9..16 single-token rows: the 16-row decode bucket
        seq = rng.integers(1, 257, n)
        table = rng.integers(0, 5000, (n, 16)).astype(np.int32)
        batch = attnsync.Batch(query_lens=np.ones(n, np.int32), seq_lens=seq, block_table=table, block_size=16)
        b = lad.bucket_for(batch)
        assert bucket is None or b == bucket
        bucket = b
        yield b, attnsync.build(lad.pad(batch, b))


def test_a_jitted_consumer_compiles_once_over_1000_steps_of_one_bucket():
    traces = []

    @jax.jit
    def consume(m):
        traces.append(1)  # runs while tracing only
        rows = jnp.arange(m.num_reqs) < m.num_scheduled_reqs  # static bound, per-step value
        return (m.seq_lens * rows).sum() + m.slot_mapping.sum() * m.max_seq_len + m.num_decodes

    layouts, values = set(), []
    with jax.transfer_guard("disallow"):
        for i, (bucket, md) in enumerate(one_bucket_steps(1000, seed=4)):
            jmd = asj.lower(md, cpu(), bucket=bucket)
            layouts.add(jmd.layout)
            values.append((consume(jmd), md))
            if i == 0:
                assert consume._cache_size() == 1
    assert len(traces) == 1 and consume._cache_size() == 1, "one compile for the whole bucket"
    assert len(layouts) == 1
    assert len({md.num_scheduled_reqs for _, md in values}) > 4  # the steps did vary
    for value, md in values[::50]:
        want = int(md.seq_lens[: md.num_scheduled_reqs].sum()) + int(md.slot_mapping.sum()) * 256 + md.num_decodes
        assert int(value) == want
    # the counter can fail: unbucketed lowerings of the same steps retrace
    plain = jax.jit(lambda m: (traces.append(1), m.seq_lens.sum() + m.max_seq_len)[1])
    before = len(traces)
    for _, md in list(one_bucket_steps(30, seed=5)):
        plain(asj.lower(md, cpu()))
    assert len(traces) - before > 1


def test_the_zero_dispatch_form_compiles_once_over_1000_steps_of_one_bucket():
    traces = []

    def body(vector, layout):
        traces.append(1)
        m = asj.unpack(vector, layout)
        return m.seq_lens.sum() + m.block_table[:, 0].sum() + m.num_scheduled_tokens * m.max_seq_len

    step = jax.jit(body, static_argnums=1)
    checked = 0
    with jax.transfer_guard_host_to_device("allow"):  # the vector rides in the step's dispatch
        for i, (bucket, md) in enumerate(one_bucket_steps(1000, seed=6)):
            vector, layout = asj.pack(md, bucket=bucket)
            assert isinstance(vector, np.ndarray) and vector.dtype == np.int32
            value = step(vector, layout)
            if i % 100 == 0:
                want = int(md.seq_lens.sum()) + int(md.block_table[:, 0].sum()) + md.num_scheduled_tokens * 256
                assert int(value) == want
                checked += 1
    assert checked == 10 and len(traces) == 1 and step._cache_size() == 1


def test_pack_unpack_equals_lower():
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12), backend="flashinfer")
    vector, layout = asj.pack(md)
    out = lower_guarded(md)
    assert layout == out.layout and vector.tobytes() == np.asarray(out.packed).tobytes()
    host = asj.unpack(vector, layout)  # numpy views, for inspection
    for name in out._data_names:
        assert isinstance(getattr(host, name), np.ndarray)
        np.testing.assert_array_equal(getattr(host, name), getattr(md, name), err_msg=name)
    inside = jax.jit(lambda v, layout: asj.unpack(v, layout).paged_kv_indices, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(inside(out.packed, layout)), md.paged_kv_indices)
    with pytest.raises(attnsync.SpecError, match=r"vector: expected an int32 vector of shape \(\d+,\).*Fix"):
        asj.unpack(vector[:-1], layout)
    with pytest.raises(attnsync.SpecError, match=r"vector: expected an int32 vector"):
        asj.unpack(vector.astype(np.int64), layout)
    with pytest.raises(TypeError, match=r"layout: expected the Layout"):
        asj.unpack(vector, (1, 2))
    # pack refuses what lower refuses
    inexact = attnsync.build(attnsync.Batch(**MIXED, seq_lens_exact=[False, True, True, True]))
    with pytest.raises(attnsync.SpecError, match=r"slot_mapping: the batch has inexact rows"):
        asj.pack(inexact)


# --------------------------------------------------------------------------------------------
# Aliasing and donation


def test_each_lowering_is_fresh_memory():
    first = lower_guarded(attnsync.build(attnsync.Batch(**MIXED)))
    before = np.asarray(first.slot_mapping).copy()
    other = dict(MIXED, block_table=[[7, 7, 7], [8, 8, 8], [9, 0, 0], [6, 0, 0]])
    lower_guarded(attnsync.build(attnsync.Batch(**other)))
    np.testing.assert_array_equal(np.asarray(first.slot_mapping), before)


def test_a_later_lowering_never_changes_an_earlier_one(monkeypatch):
    """Fifty lowerings of one shape alive together: each keeps its own values, and no two host
    vectors handed to device_put share memory (on the CPU, device_put may alias them)."""
    vectors = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: (vectors.append(x), real(x, *a, **k))[1])
    rng = np.random.default_rng(0)
    kept = []
    for _ in range(50):
        table = rng.integers(0, 1 << 20, (4, 3)).astype(np.int32)
        md = attnsync.build(attnsync.Batch(**dict(MIXED, block_table=table)))
        kept.append((md, lower_guarded(md)))
    for md, out in kept:
        np.testing.assert_array_equal(np.asarray(out.block_table), md.block_table)
        np.testing.assert_array_equal(np.asarray(out.slot_mapping), md.slot_mapping)
    assert len(vectors) == 50
    for i, a in enumerate(vectors):
        for b in vectors[i + 1 :]:
            assert not np.shares_memory(a, b)
    # large vectors (aligned by hand so the CPU device aliases them rather than copying)
    vectors.clear()
    big = []
    for _ in range(6):
        table = rng.integers(0, 1 << 20, (64, 512)).astype(np.int32)
        md = attnsync.build(attnsync.Batch(query_lens=np.ones(64, np.int32), seq_lens=np.full(64, 8000),
                                           block_table=table, block_size=16))
        big.append((md, lower_guarded(md)))
    aliased = sum(out.packed.unsafe_buffer_pointer() == v.ctypes.data for (_, out), v in zip(big, vectors, strict=True))
    assert aliased == len(big), "large CPU lowerings alias their own fresh host vector"
    for md, out in big:
        np.testing.assert_array_equal(np.asarray(out.block_table), md.block_table)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(vectors) for b in vectors[i + 1 :])


def test_donating_a_lowering_into_a_jitted_consumer():
    md = attnsync.build(attnsync.Batch(**MIXED))
    other = attnsync.build(attnsync.Batch(**dict(MIXED, block_table=np.array(MIXED["block_table"]) + 1)))
    keep = lower_guarded(other)

    def consume(m):
        return m.packed * 2, m.slot_mapping.sum() + m.block_table.sum()

    donating = jax.jit(consume, donate_argnums=0)
    read = lower_guarded(md)
    read_before = read.block_table  # the first eager read splits every field: they own their memory
    unread = lower_guarded(md)
    with jax.transfer_guard("disallow"):
        for out in (read, unread):
            doubled, total = donating(out)
            assert int(total) == int(md.slot_mapping.sum()) + int(md.block_table.sum())
            assert out.packed.is_deleted()
            np.testing.assert_array_equal(np.asarray(doubled)[:5], 2 * md.query_start_loc)
    # fields read before the donation stay valid ...
    np.testing.assert_array_equal(np.asarray(read_before), md.block_table)
    np.testing.assert_array_equal(np.asarray(read.slot_mapping), md.slot_mapping)
    # ... fields never read are gone with the vector, and say so
    with pytest.raises(RuntimeError, match="(?i)slot_mapping: .*donated.*Fix"):
        _ = unread.slot_mapping
    # another lowering is untouched
    np.testing.assert_array_equal(np.asarray(keep.block_table), other.block_table)
    np.testing.assert_array_equal(np.asarray(keep.slot_mapping), other.slot_mapping)


def test_a_packed_host_vector_is_never_written_after_pack():
    md = attnsync.build(attnsync.Batch(**MIXED))
    vector, layout = asj.pack(md)
    snapshot = vector.copy()
    for _ in range(3):
        asj.pack(md)
        lower_guarded(md)
    donate = jax.jit(lambda m: m.packed + 1, donate_argnums=0)
    with jax.transfer_guard_host_to_device("allow"):
        jax.block_until_ready(donate(asj.unpack(jax.device_put(vector, cpu()), layout)))
    assert vector.tobytes() == snapshot.tobytes()


# --------------------------------------------------------------------------------------------
# Refusals


def test_int32_overflow_refused():
    md = attnsync.build(attnsync.Batch(**MIXED))
    for bad in (2**31, -(2**31) - 1, 2**40):
        wide = dataclasses.replace(md, seq_lens=np.array([17, bad, 3, 12], dtype=np.int64))
        with pytest.raises(attnsync.SpecError, match=rf"seq_lens: value {bad} does not fit int32.*silently wrap.*Fix"):
            asj.lower(wide, cpu())
        with pytest.raises(attnsync.SpecError, match=rf"seq_lens: value {bad} does not fit int32"):
            asj.pack(wide)
    # an int64 field whose values fit is narrowed, not refused
    fits = dataclasses.replace(md, slot_mapping=md.slot_mapping.astype(np.int64))
    out = lower_guarded(fits)
    assert out.slot_mapping.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(out.slot_mapping), md.slot_mapping)
    # numpy scalars of edited metadata come out as Python ints
    scalar = dataclasses.replace(md, max_seq_len=np.int64(33))
    assert type(lower_guarded(scalar).max_seq_len) is int and lower_guarded(scalar).max_seq_len == 33


def test_refusals():
    md = attnsync.build(attnsync.Batch(**MIXED))
    inexact = attnsync.build(attnsync.Batch(**MIXED, seq_lens_exact=[False, True, True, True]))
    with pytest.raises(attnsync.SpecError, match=r"slot_mapping: the batch has inexact rows.*Fix"):
        asj.lower(inexact, cpu())
    with pytest.raises(TypeError, match=r"device: expected a jax.Device"):
        asj.lower(md, "cpu")
    with pytest.raises(TypeError, match=r"lower: expected metadata"):
        asj.lower(object())
    with pytest.raises(TypeError, match=r"lower: expected metadata"):
        asj.lower(lower_guarded(md))
    with pytest.raises(TypeError, match=r"lower: expected metadata"):
        asj.lower(attnsync.CommonMetadata)
    with pytest.raises(TypeError, match=r"stager=: removed.*no longer stages through torch.*Fix: drop stager="):
        asj.lower(md, cpu(), stager=object())
    with pytest.raises(TypeError, match=r"alias=: removed.*Fix: drop alias="):
        asj.lower(md, cpu(), alias=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'devcie'"):
        asj.lower(md, devcie=cpu())
    edited = dataclasses.replace(md, block_table=md.block_table.astype(np.float64))
    with pytest.raises(TypeError, match=r"block_table: expected an int32"):
        asj.lower(edited, cpu())


def test_zeros_like_lowered():
    out = lower_guarded(attnsync.build(attnsync.Batch(**MIXED)))
    zeros = asj.zeros_like_lowered(out)
    assert type(zeros) is type(out) and zeros.max_seq_len == out.max_seq_len and zeros.layout == out.layout
    for name in DATA:
        assert getattr(zeros, name).shape == getattr(out, name).shape
        assert not np.asarray(getattr(zeros, name)).any()


def test_lower_replicated_on_one_device():
    md = attnsync.build(attnsync.Batch(**MIXED))
    (only,) = asj.lower_replicated(md, [cpu()])
    assert_jax_equals(md, only)
    with pytest.raises(attnsync.SpecError, match="distinct devices"):
        asj.lower_replicated(md, [cpu(), cpu()])
    with pytest.raises(attnsync.SpecError, match="at least one device"):
        asj.lower_replicated(md, [])
    with pytest.raises(TypeError, match="devices: expected a sequence of jax.Device"):
        asj.lower_replicated(md, cpu())
    with pytest.raises(TypeError, match="devices: expected jax.Device entries"):
        asj.lower_replicated(md, ["cpu"])


def test_docstring_examples():
    import doctest

    assert doctest.testmod(asj).failed == 0


# --------------------------------------------------------------------------------------------
# No torch, on any platform (fresh interpreters: pytest has long imported torch here)

NO_TORCH = """
import sys
sys.modules["torch"] = None  # import torch now raises ImportError
import json, jax, numpy as np
import attnsync
from attnsync import BucketLadder
from attnsync.adapters import jax as asj
cpu = jax.devices("cpu")[0]
md = attnsync.build(attnsync.Batch(query_lens=[1, 3], seq_lens=[9, 3], block_table=[[2], [5]], block_size=16))
with jax.transfer_guard("disallow"):
    out = asj.lower(md, cpu)
    value = int(jax.jit(lambda m: m.slot_mapping.sum() + m.max_seq_len)(out))
lad = BucketLadder(max_num_reqs=4, max_num_tokens=8, max_model_len=64, block_size=16)
batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[9, 30], block_table=[[2, 3], [5, 6]], block_size=16)
bucket = lad.bucket_for(batch)
jb = asj.lower(attnsync.build(lad.pad(batch, bucket)), cpu, bucket=bucket)
print(json.dumps({"slots": np.asarray(out.slot_mapping).tolist(), "value": value,
                  "decodes": int(jb.num_decodes), "torch": sys.modules["torch"] is not None}))
"""


def run_fresh(code: str, **env) -> str:
    environ = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **env)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_lowers_with_torch_unimportable():
    out = json.loads(run_fresh(NO_TORCH))
    assert out == {"slots": [40, 80, 81, 82], "value": 40 + 80 + 81 + 82 + 9, "decodes": 2, "torch": False}


def test_importing_the_adapter_loads_no_torch():
    code = "import sys, json\nimport attnsync.adapters.jax\nprint(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))"
    assert json.loads(run_fresh(code)) == []
    # the probe can fail: importing the torch adapter does load torch
    pytest.importorskip("torch")
    assert "torch" in json.loads(run_fresh(code.replace("attnsync.adapters.jax", "attnsync.adapters.torch")))


# --------------------------------------------------------------------------------------------
# numpy vs torch-CPU vs JAX-CPU, bit for bit


def assert_three_way(md) -> None:
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    t_out = ast.lower(md, "cpu")
    j_out = lower_guarded(md)
    for name in DATA:
        want = getattr(md, name)
        torch_name, torch_dtype = TORCH_NAMES[name]
        t = getattr(t_out, torch_name)
        assert t.dtype == getattr(torch, torch_dtype), name
        j = getattr(j_out, name)
        assert j.dtype == np.int32, name
        np.testing.assert_array_equal(t.numpy(), want, err_msg=name)
        np.testing.assert_array_equal(np.asarray(j), want, err_msg=name)
        # bit for bit across frameworks once widened to the same dtype
        assert t.numpy().astype(np.int64).tobytes() == np.asarray(j).astype(np.int64).tobytes(), name
    for torch_name, source in HOST_MIRRORS.items():
        mirror = getattr(t_out, torch_name)
        assert mirror.dtype == torch.int32 and mirror.device.type == "cpu", torch_name
        assert mirror.numpy().tobytes() == getattr(md, source).tobytes(), torch_name
    for name in META:
        assert getattr(t_out, name) == getattr(j_out, name) == getattr(md, name), name


@pytest.mark.parametrize(
    "extra",
    [{}, dict(padded_num_reqs=6, padded_num_tokens=12), dict(block_size=64, block_table=[[1], [2], [3], [4]])],
    ids=["plain", "padded", "page64"],
)
def test_three_way_hand_cases(extra):
    assert_three_way(attnsync.build(attnsync.Batch(**{**MIXED, **extra})))


def test_three_way_empty():
    assert_three_way(attnsync.build(attnsync.Batch(query_lens=[], seq_lens=[], block_table=[], block_size=16,
                                                   padded_num_reqs=2, padded_num_tokens=5)))


@settings(max_examples=50, deadline=None)
@given(kwargs=batch_kwargs(inexact=False, max_reqs=8))
def test_three_way_random_batches(kwargs):
    assert_three_way(attnsync.build(attnsync.Batch(**kwargs)))


# --------------------------------------------------------------------------------------------
# The decode-server example: three metadata modes, one schedule, the same tokens


def test_decode_server_example_modes_agree_without_recompiles():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_jax_decode_server_modes", ROOT / "examples" / "jax_decode_server.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)
    cfg = dataclasses.replace(example.SMALL, steps=40, seed=3, token_sizes=(8, 64))  # three buckets: few compiles
    results = example.run_modes(cfg, device=cpu())
    assert list(results) == ["naive", "attnsync", "prepared"]
    outputs = [r["outputs"] for r in results.values()]
    assert outputs[0] == outputs[1] == outputs[2] and sum(map(len, outputs[0].values())) > 50
    for mode, r in results.items():
        assert r["recompiles"] == 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0, mode
    assert results["naive"]["host_reads"] == 2 * results["naive"]["steps"]
    assert results["attnsync"]["host_reads"] == 0
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
