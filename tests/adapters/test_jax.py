"""JAX adapter on CPU: int32 pytrees under `transfer_guard("disallow")`, jit without
recompiles, int32 range refused; numpy vs torch-CPU vs JAX-CPU bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import batch_kwargs

import attnsync

jax = pytest.importorskip("jax")
asj = pytest.importorskip("attnsync.adapters.jax")

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


def cpu():
    return jax.devices("cpu")[0]


def lower_guarded(md, device=None):
    with jax.transfer_guard("disallow"):
        return asj.lower(md, device if device is not None else cpu())


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


def test_fields_dtypes_and_values_under_transfer_guard():
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    out = lower_guarded(md)
    assert type(out).__name__ == "JaxCommonMetadata"
    assert sorted(out.__dataclass_fields__) == sorted([*DATA, *META])
    assert_jax_equals(md, out)
    assert np.asarray(out.slot_mapping).tolist() == [144, 112, 176, 177, 178, 55, 56, 57, 58, 59, -1, -1]


def test_transfer_guard_is_armed_in_this_test():
    """The guard used above does catch an implicit transfer (so those tests can fail)."""
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="(?i)disallowed"):
        jax.numpy.asarray(np.arange(3))


def test_empty_batches():
    for extra in ({}, dict(padded_num_reqs=2, padded_num_tokens=3)):
        md = attnsync.build(attnsync.Batch(query_lens=[], seq_lens=[], block_table=[], block_size=16, **extra))
        assert_jax_equals(md, lower_guarded(md))


def test_each_lowering_is_fresh_memory():
    first = lower_guarded(attnsync.build(attnsync.Batch(**MIXED)))
    before = np.asarray(first.slot_mapping).copy()
    other = dict(MIXED, block_table=[[7, 7, 7], [8, 8, 8], [9, 0, 0], [6, 0, 0]])
    lower_guarded(attnsync.build(attnsync.Batch(**other)))
    np.testing.assert_array_equal(np.asarray(first.slot_mapping), before)


def test_pytree_structure():
    md = attnsync.build(attnsync.Batch(**MIXED))
    out = lower_guarded(md)
    leaves, treedef = jax.tree_util.tree_flatten(out)
    assert len(leaves) == len(DATA)
    for leaf, name in zip(leaves, DATA, strict=True):
        assert leaf is getattr(out, name)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert all(getattr(rebuilt, name) == getattr(md, name) for name in META)
    # host ints are aux data: equal scalars -> equal treedefs, different scalars -> different
    same = lower_guarded(attnsync.build(attnsync.Batch(**dict(MIXED, block_table=np.array(MIXED["block_table"]) + 1))))
    assert jax.tree_util.tree_structure(same) == treedef
    longer = lower_guarded(attnsync.build(attnsync.Batch(**dict(MIXED, seq_lens=[17, 34, 3, 12]))))
    assert jax.tree_util.tree_structure(longer) != treedef
    doubled = jax.tree_util.tree_map(lambda x: x * 2, out)
    assert type(doubled) is type(out) and doubled.max_seq_len == out.max_seq_len


def test_jit_reuses_the_compilation_for_the_same_shapes():
    traces = []

    @jax.jit
    def consume(m):
        traces.append(1)  # runs only while tracing
        return m.slot_mapping.sum() + m.query_start_loc[-1] * m.max_seq_len + m.block_table.sum()

    md1 = attnsync.build(attnsync.Batch(**MIXED))
    md2 = attnsync.build(attnsync.Batch(**dict(MIXED, block_table=np.array(MIXED["block_table"]) + 3)))
    with jax.transfer_guard("disallow"):
        r1 = consume(asj.lower(md1, cpu()))
        r2 = consume(asj.lower(md2, cpu()))
    assert len(traces) == 1, "a second lowering of the same shapes must not retrace"
    assert int(r1) == int(md1.slot_mapping.sum()) + 10 * 33 + int(md1.block_table.sum())
    assert int(r2) == int(md2.slot_mapping.sum()) + 10 * 33 + int(md2.block_table.sum())
    assert int(r2) != int(r1)
    # a different bucket does retrace: the counter can fail
    md3 = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=8, padded_num_tokens=16))
    with jax.transfer_guard("disallow"):
        consume(asj.lower(md3, cpu()))
    assert len(traces) == 2


def test_int32_overflow_refused():
    md = attnsync.build(attnsync.Batch(**MIXED))
    for bad in (2**31, -(2**31) - 1, 2**40):
        wide = dataclasses.replace(md, seq_lens=np.array([17, bad, 3, 12], dtype=np.int64))
        with pytest.raises(attnsync.SpecError, match=rf"seq_lens: value {bad} does not fit int32.*silently wrap.*Fix"):
            asj.lower(wide, cpu())
    # an int64 field whose values fit is narrowed, not refused
    fits = dataclasses.replace(md, slot_mapping=md.slot_mapping.astype(np.int64))
    out = lower_guarded(fits)
    assert out.slot_mapping.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(out.slot_mapping), md.slot_mapping)


def test_refusals():
    md = attnsync.build(attnsync.Batch(**MIXED))
    inexact = attnsync.build(attnsync.Batch(**MIXED, seq_lens_exact=[False, True, True, True]))
    with pytest.raises(attnsync.SpecError, match=r"slot_mapping: the batch has inexact rows.*Fix"):
        asj.lower(inexact, cpu())
    with pytest.raises(TypeError, match=r"device: expected a jax.Device"):
        asj.lower(md, "cpu")
    with pytest.raises(TypeError, match=r"lower: expected metadata"):
        asj.lower(object())
    with pytest.raises(TypeError, match=r"alias: expected True or False"):
        asj.lower(md, cpu(), alias="no")


def test_alias_false_gives_the_same_arrays_on_the_cpu():
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    with jax.transfer_guard("disallow"):
        split = asj.lower(md, cpu(), alias=False)
    assert_jax_equals(md, split)


def test_zeros_like_lowered():
    out = lower_guarded(attnsync.build(attnsync.Batch(**MIXED)))
    zeros = asj.zeros_like_lowered(out)
    assert type(zeros) is type(out) and zeros.max_seq_len == out.max_seq_len
    for name in DATA:
        assert getattr(zeros, name).shape == getattr(out, name).shape
        assert not np.asarray(getattr(zeros, name)).any()


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
