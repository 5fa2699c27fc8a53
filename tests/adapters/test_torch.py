"""torch adapter on CPU: vLLM names and dtypes, values bit for bit, packing, `seq_lens=`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import batch_kwargs

import attnsync
from attnsync import SpecError
from attnsync.testing import brute_force_common, naive_common_torch

torch = pytest.importorskip("torch")
ast = pytest.importorskip("attnsync.adapters.torch")

# lowered name -> (source field of CommonMetadata, torch dtype, where). The numpy-only helpers
# (query_lens, seq_lens_exact, token_to_req) are not carried.
EXPECTED_FIELDS = {
    "query_start_loc": ("query_start_loc", torch.int32, "device"),
    "query_start_loc_cpu": ("query_start_loc", torch.int32, "host"),
    "seq_lens": ("seq_lens", torch.int32, "device"),
    "seq_lens_cpu_upper_bound": ("seq_lens", torch.int32, "host"),
    "num_computed_tokens_cpu": ("num_computed_tokens", torch.int32, "host"),
    "is_prefilling": ("is_prefilling", torch.bool, "host"),
    "block_table_tensor": ("block_table", torch.int32, "device"),
    "slot_mapping": ("slot_mapping", torch.int64, "device"),
}
SCALARS = (
    "num_reqs", "num_actual_tokens", "num_scheduled_reqs", "num_scheduled_tokens", "max_query_len",
    "max_seq_len", "block_size", "decode_threshold", "num_decodes", "num_decode_tokens", "num_extends",
    "num_extend_tokens", "num_prefills", "num_prefill_tokens", "is_decode_first", "all_exact",
    "slot_mapping_exact",
)

MIXED = dict(
    query_lens=[1, 1, 3, 5],
    seq_lens=[17, 33, 3, 12],
    block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 0, 0]],
    block_size=16,
)


def assert_lowered_equals(md, out) -> None:
    """Every lowered field equals its numpy source bit for bit, with the dtype vLLM expects."""
    for name, (source, dtype, _) in EXPECTED_FIELDS.items():
        tensor = getattr(out, name)
        assert isinstance(tensor, torch.Tensor), name
        assert tensor.dtype == dtype, (name, tensor.dtype)
        assert tensor.device.type == "cpu", name
        want = getattr(md, source)
        assert tuple(tensor.shape) == want.shape, (name, tensor.shape, want.shape)
        got = tensor.numpy()
        np.testing.assert_array_equal(got, want, err_msg=name)
    for name in SCALARS:
        assert getattr(out, name) == getattr(md, name), name
        assert type(getattr(out, name)) is type(getattr(md, name)), name


def test_field_names_are_vllm_names():
    out = ast.lower(attnsync.build(attnsync.Batch(**MIXED)), "cpu")
    names = [f for f in out.__dataclass_fields__]
    assert sorted(names) == sorted([*EXPECTED_FIELDS, *SCALARS])
    assert type(out).__name__ == "TorchCommonMetadata"


@pytest.mark.parametrize(
    "extra",
    [{}, dict(padded_num_reqs=6, padded_num_tokens=12), dict(block_size=16, is_prefilling=[False] * 4)],
    ids=["plain", "padded", "is_prefilling"],
)
def test_hand_case_values(extra):
    md = attnsync.build(attnsync.Batch(**{**MIXED, **extra}))
    out = ast.lower(md, "cpu")
    assert_lowered_equals(md, out)
    # the hand values of tests/test_common.py, once more through torch
    assert out.slot_mapping[:10].tolist() == [144, 112, 176, 177, 178, 55, 56, 57, 58, 59]


def test_empty_batches():
    for extra in ({}, dict(padded_num_reqs=2, padded_num_tokens=3)):
        md = attnsync.build(attnsync.Batch(query_lens=[], seq_lens=[], block_table=[], block_size=16, **extra))
        assert_lowered_equals(md, ast.lower(md, "cpu"))


def test_device_fields_share_one_packed_buffer_and_host_mirrors_are_copies():
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    out = ast.lower(md, "cpu")
    device = [getattr(out, n) for n, (_, _, where) in EXPECTED_FIELDS.items() if where == "device"]
    storages = {t.untyped_storage().data_ptr() for t in device}
    assert len(storages) == 1, "one packed buffer, one copy"
    base = device[0].untyped_storage().data_ptr()
    for t in device:
        assert (t.data_ptr() - base) % 64 == 0, "fields at 64-byte aligned offsets"
        assert t.is_contiguous()
    for name, (source, _, where) in EXPECTED_FIELDS.items():
        if where == "host":
            assert not np.shares_memory(getattr(out, name).numpy(), getattr(md, source)), name


def test_each_lowering_gets_fresh_memory_on_cpu():
    b1 = attnsync.Batch(**MIXED)
    b2 = attnsync.Batch(**{**MIXED, "block_table": [[5, 6, 1], [1, 1, 1], [2, 0, 0], [9, 0, 0]]})
    first = ast.lower(attnsync.build(b1), "cpu")
    before = first.slot_mapping.clone()
    ast.lower(attnsync.build(b2), "cpu")
    assert torch.equal(first.slot_mapping, before)


OTHER_TABLE = [[5, 6, 1], [1, 1, 1], [2, 0, 0], [9, 0, 0]]


def _same_shape_batches(count):
    """`count` batches of MIXED's shapes with different values (seq_lens and page ids)."""
    out = []
    for i in range(count):
        table = (np.asarray(MIXED["block_table"]) + 10 * i) * (np.asarray(MIXED["block_table"]) > 0)
        out.append(attnsync.Batch(**{**MIXED, "seq_lens": [17 + i, 33 - i, 3, 12 + i], "block_table": table}))
    return out


def test_a_ring_stager_reuses_its_slots_in_turn_and_holds_the_new_values():
    stager = ast.Stager("cpu", depth=2, check=True)
    mds = [attnsync.build(b) for b in _same_shape_batches(4)]
    addresses = []
    for md in mds:
        out = ast.lower(md, "cpu", stager=stager)
        assert_lowered_equals(md, out)
        addresses.append((out.slot_mapping.data_ptr(), out.seq_lens_cpu_upper_bound.data_ptr()))
        del out
    # two slots used in turn: steps 0 and 2 share memory, steps 1 and 3 the other slot
    assert addresses[0] == addresses[2] and addresses[1] == addresses[3] and addresses[0] != addresses[1]


def test_a_lowering_stays_valid_until_the_ring_comes_round():
    stager = ast.Stager("cpu", depth=3)
    mds = [attnsync.build(b) for b in _same_shape_batches(5)]
    first = ast.lower(mds[0], "cpu", stager=stager)
    second = ast.lower(mds[1], "cpu", stager=stager)
    third = ast.lower(mds[2], "cpu", stager=stager)  # depth 3: the first two are still valid
    for md, out in zip(mds, (first, second, third)):
        assert_lowered_equals(md, out)


@pytest.mark.parametrize("hold", ["object", "device field", "host mirror", "with_fields copy"])
def test_a_checking_stager_refuses_to_rewrite_a_held_lowering(hold):
    """Held past its validity, a lowering is refused in checking mode, and nothing is rewritten."""
    stager = ast.Stager("cpu", depth=2, check=True)
    mds = [attnsync.build(b) for b in _same_shape_batches(3)]
    first = ast.lower(mds[0], "cpu", stager=stager)
    kept = {
        "object": lambda o: o,
        "device field": lambda o: o.slot_mapping,
        "host mirror": lambda o: o.seq_lens_cpu_upper_bound,
        "with_fields copy": lambda o: ast.with_fields(o, max_seq_len=0),
    }[hold](first)
    del first
    ast.lower(mds[1], "cpu", stager=stager)  # the other slot
    with pytest.raises(ast.StaleLoweringError, match="still referenced"):
        ast.lower(mds[2], "cpu", stager=stager)  # would rewrite the first one's memory
    if isinstance(kept, torch.Tensor):
        source = mds[0].slot_mapping if hold == "device field" else mds[0].seq_lens
        np.testing.assert_array_equal(kept.numpy(), source)
    else:
        np.testing.assert_array_equal(kept.slot_mapping.numpy(), mds[0].slot_mapping)
        np.testing.assert_array_equal(kept.seq_lens_cpu_upper_bound.numpy(), mds[0].seq_lens)
    del kept
    out = ast.lower(mds[2], "cpu", stager=stager)  # released: the slot is free again
    assert_lowered_equals(mds[2], out)


def test_a_fresh_memory_lowering_is_never_rewritten():
    """Without a stager (or with depth=0) every lowering owns its memory: held ones keep values."""
    stager = ast.Stager("cpu", depth=0)
    mds = [attnsync.build(b) for b in _same_shape_batches(4)]
    kept = [ast.lower(md, "cpu", stager=stager) for md in mds]
    kept += [ast.lower(md, "cpu") for md in mds]
    for md, out in zip(mds + mds, kept):
        assert_lowered_equals(md, out)
    assert len({out.slot_mapping.data_ptr() for out in kept}) == len(kept)


@pytest.mark.parametrize("depth", [1, -1, True, 2.0, "2"])
def test_stager_depth_is_checked(depth):
    with pytest.raises(SpecError, match="depth"):
        ast.Stager("cpu", depth=depth)


def test_scalars_follow_the_step_and_shapes_share_a_slot():
    stager = ast.Stager("cpu", depth=2, check=True)
    small = attnsync.build(attnsync.Batch(**MIXED))
    padded = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    for _ in range(3):  # alternating shapes through one ring
        a = ast.lower(small, "cpu", stager=stager)
        assert_lowered_equals(small, a)
        del a
        b = ast.lower(padded, "cpu", stager=stager)
        assert_lowered_equals(padded, b)
        del b
    md1, md2, md3 = (attnsync.build(b) for b in _same_shape_batches(3))
    ast.lower(md1, "cpu", stager=stager)
    ast.lower(md2, "cpu", stager=stager)
    again = ast.lower(md3, "cpu", stager=stager)  # md1's slot, rewritten
    assert md3.max_seq_len != md1.max_seq_len
    assert again.max_seq_len == md3.max_seq_len
    assert_lowered_equals(md3, again)


def _lowered_equals_host(md, out) -> None:
    """Any backend: every lowered array equals its host field bit for bit (torch dtypes: int32,
    int64 slot_mapping, bool), every scalar equals the host one."""
    from attnsync._plan import plan_of

    plan = plan_of(type(md))
    for field_name, name in plan.staged + plan.mirrors:
        value, want = getattr(out, name), getattr(md, field_name)
        assert tuple(value.shape) == want.shape, (name, tuple(value.shape), want.shape)
        np.testing.assert_array_equal(value.numpy(), want, err_msg=name)
    for name in plan.scalars:
        assert getattr(out, name) == getattr(md, name), name


def _decode_steps(steps, *, rows=6, page=4, seed=0):
    """One-token rows whose contexts grow by one a step: FlashInfer's page list gains a page
    whenever a row crosses a page boundary, so its length drifts from step to step."""
    rng = np.random.default_rng(seed)
    start = rng.integers(1, 30, rows).astype(np.int32)
    width = int(-(-(start.max() + steps) // page))
    table = rng.integers(0, 1000, (rows, width)).astype(np.int32)
    return [attnsync.Batch(query_lens=np.ones(rows, np.int32), seq_lens=start + step + 1,
                           block_table=table, block_size=page) for step in range(steps)]


def test_drifting_shapes_share_the_ring_and_stay_exact():
    """A decode loop's FlashInfer metadata changes length nearly every step: every step's
    tensors hold exactly that step's values, and the slots grow only a few times."""
    stager = ast.Stager("cpu", depth=2, check=True)
    mds = [attnsync.build(b, backend="flashinfer") for b in _decode_steps(60)]
    assert len({md.paged_kv_indices.shape for md in mds}) > 15, "the workload must drift"
    for md in mds:
        out = ast.lower(md, "cpu", stager=stager)
        _lowered_equals_host(md, out)
        del out
    assert stager.stats.grows <= 4, stager.stats


def test_a_cloned_value_outlives_the_ring():
    stager = ast.Stager("cpu", depth=2, check=True)
    mds = [attnsync.build(b, backend="flashinfer") for b in _decode_steps(40)]
    kept = {}
    for step, md in enumerate(mds):
        out = ast.lower(md, "cpu", stager=stager)
        if step % 7 == 0:
            kept[step] = out.paged_kv_indices.clone()  # the contract's way to keep a value
        del out
    for step, value in kept.items():
        np.testing.assert_array_equal(value.numpy(), mds[step].paged_kv_indices)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(batch_kwargs(inexact=False), st.booleans()), min_size=2, max_size=8),
       depth=st.sampled_from([0, 2, 3]))
def test_any_sequence_of_batches_through_one_stager(steps, depth):
    """Shapes grow, shrink, empty and refill in any order through one checking stager; every
    step is exact, and clones kept by the caller keep their values."""
    stager = ast.Stager("cpu", depth=depth, check=True)
    kept = []
    for kwargs, keep in steps:
        md = attnsync.build(attnsync.Batch(**kwargs))
        out = ast.lower(md, "cpu", stager=stager)
        assert_lowered_equals(md, out)
        if keep:
            kept.append((md, out.slot_mapping.clone()))
        del out
    for md, slots in kept:
        np.testing.assert_array_equal(slots.numpy(), md.slot_mapping)


def test_persistent_stager_writes_its_fixed_addresses():
    stager = ast.Stager("cpu", persistent=True)
    mds = [attnsync.build(b) for b in _same_shape_batches(3)]
    first = ast.lower(mds[0], "cpu", stager=stager)
    address = first.slot_mapping.data_ptr()
    del first
    for md in mds[1:]:
        out = ast.lower(md, "cpu", stager=stager)
        assert out.slot_mapping.data_ptr() == address
        assert_lowered_equals(md, out)
        del out
    assert stager.stats.copies == 3
    other = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    last = ast.lower(mds[0], "cpu", stager=stager)
    with pytest.raises(SpecError, match="fixed addresses"):
        ast.lower(other, "cpu", stager=stager)
    assert_lowered_equals(mds[0], last)  # refused before anything was written


def test_matches_the_naive_sync_ful_builder():
    batch = attnsync.Batch(**MIXED)
    naive = naive_common_torch(batch, "cpu")
    out = ast.lower(attnsync.build(batch), "cpu")
    for name in ("query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping"):
        assert naive[name].dtype == getattr(out, name).dtype, name
        assert torch.equal(naive[name], getattr(out, name)), name
    assert (naive["max_query_len"], naive["max_seq_len"]) == (out.max_query_len, out.max_seq_len)


@settings(max_examples=200, deadline=None)
@given(kwargs=batch_kwargs(inexact=False))
def test_random_batches(kwargs):
    md = attnsync.build(attnsync.Batch(**kwargs))
    assert_lowered_equals(md, ast.lower(md, "cpu"))


def test_refusals():
    md = attnsync.build(attnsync.Batch(**MIXED))
    with pytest.raises(TypeError, match=r"lower: expected metadata from attnsync.build"):
        ast.lower({"query_start_loc": md.query_start_loc}, "cpu")
    with pytest.raises(TypeError, match=r"lower: expected metadata"):
        ast.lower(type(md), "cpu")
    with pytest.raises(attnsync.SpecError, match=r"depth: expected 0 .* or an int >= 2"):
        ast.Stager("cpu", depth=1)
    for device in ("meta", "mps"):
        with pytest.raises(attnsync.SpecError, match=r"device: attnsync lowers to 'cuda' or 'cpu'"):
            ast.Stager(device)
        with pytest.raises(attnsync.SpecError, match=r"device: attnsync lowers to 'cuda' or 'cpu'"):
            ast.lower(md, device)
    with pytest.raises(TypeError, match=r"stager: expected an attnsync.adapters.torch.Stager"):
        ast.lower(md, "cpu", stager="cpu")


# --------------------------------------------------------------------------------------------
# seq_lens=: exact lengths that live only on the "device"


INEXACT = dict(
    query_lens=[1, 2, 3, 1],
    seq_lens=[20, 35, 3, 16],  # rows 0, 1 and 3 are upper bounds (drafts assumed accepted)
    block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 8, 0]],
    block_size=16,
    seq_lens_exact=[False, False, True, False],
    padded_num_reqs=5,
    padded_num_tokens=9,
)


def test_inexact_batch_needs_device_seq_lens():
    md = attnsync.build(attnsync.Batch(**INEXACT))
    with pytest.raises(attnsync.SpecError, match=r"seq_lens: the batch has inexact rows.*Fix: pass the exact device lengths"):
        ast.lower(md, "cpu")


def test_slots_recomputed_from_device_seq_lens_hand_case():
    md = attnsync.build(attnsync.Batch(**INEXACT))
    # true lengths: row 0 rejected 2 drafts (18), row 1 one (34), row 3 none (16); padding 0
    exact = torch.tensor([18, 34, 3, 16, 0], dtype=torch.int32)
    out = ast.lower(md, "cpu", seq_lens=exact)
    # row 0: position 17 -> col 1 (id 9) offset 1 -> 145; row 1: positions 32, 33 -> col 2
    # (id 7) -> 112, 113; row 2: 176, 177, 178; row 3: position 15 -> col 0 (id 3) -> 63
    assert out.slot_mapping.tolist() == [145, 112, 113, 176, 177, 178, 63, -1, -1]
    assert out.slot_mapping.dtype == torch.int64
    assert out.seq_lens is exact
    assert out.seq_lens_cpu_upper_bound.tolist() == [20, 35, 3, 16, 0]
    assert out.query_start_loc.tolist() == [0, 1, 3, 6, 7, 7]
    assert out.block_table_tensor.tolist() == [[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 8, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    ("seq_lens", "error", "message"),
    [
        (np.array([18, 34, 3, 16, 0], np.int32), TypeError, r"seq_lens: expected a torch.Tensor"),
        (torch.tensor([18, 34, 3, 16, 0]), attnsync.SpecError, r"seq_lens: expected an int32 tensor of shape \(5,\).*received dtype torch.int64.*Fix"),
        (torch.tensor([18, 34, 3, 16], dtype=torch.int32), attnsync.SpecError, r"seq_lens: expected an int32 tensor of shape \(5,\).*received .*shape \(4,\).*Fix"),
        (torch.zeros((5, 1), dtype=torch.int32), attnsync.SpecError, r"seq_lens: .*shape \(5, 1\)"),
        (torch.zeros(5, dtype=torch.int32, device="meta"), attnsync.SpecError, r"seq_lens: .*device meta"),
    ],
    ids=["numpy", "int64", "short", "2d", "wrong_device"],
)
def test_bad_device_seq_lens(seq_lens, error, message):
    md = attnsync.build(attnsync.Batch(**INEXACT))
    with pytest.raises(error, match=message):
        ast.lower(md, "cpu", seq_lens=seq_lens)


@st.composite
def with_true_lengths(draw):
    kwargs = draw(batch_kwargs())
    batch = attnsync.Batch(**kwargs)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, s = batch.query_lens.astype(np.int64), batch.seq_lens.astype(np.int64)
    # an inexact row's true length drops by the rejected drafts, keeping at least 1 of context
    room = np.maximum(s - q - 1, 0)
    rejected = np.where(batch.seq_lens_exact, 0, rng.integers(0, room + 1))
    return kwargs, s - rejected


@settings(max_examples=150, deadline=None)
@given(case=with_true_lengths())
def test_slots_from_device_seq_lens_equal_brute_force(case):
    kwargs, true_lens = case
    batch = attnsync.Batch(**kwargs)
    md = attnsync.build(batch)
    device_lens = np.zeros(batch.padded_num_reqs, dtype=np.int32)
    device_lens[: batch.num_reqs] = true_lens
    out = ast.lower(md, "cpu", seq_lens=torch.from_numpy(device_lens))
    # the brute force with those exact lengths, as if the host had known them
    exact_batch = attnsync.Batch(**{**kwargs, "seq_lens": true_lens, "seq_lens_exact": True})
    want = brute_force_common(exact_batch)
    assert out.slot_mapping.dtype == torch.int64
    np.testing.assert_array_equal(out.slot_mapping.numpy(), want["slot_mapping"])
    np.testing.assert_array_equal(out.seq_lens.numpy(), device_lens)
    np.testing.assert_array_equal(out.seq_lens_cpu_upper_bound.numpy(), md.seq_lens)
    np.testing.assert_array_equal(out.query_start_loc.numpy(), md.query_start_loc)
    np.testing.assert_array_equal(out.block_table_tensor.numpy(), md.block_table)


def test_device_seq_lens_with_no_rows_and_padding_tokens():
    # a bucket of 3 padding tokens and no request rows at all: nothing to gather from
    md = attnsync.build(attnsync.Batch(query_lens=[], seq_lens=[], block_table=[], block_size=16,
                                       padded_num_tokens=3))
    out = ast.lower(md, "cpu", seq_lens=torch.zeros(0, dtype=torch.int32))
    assert out.slot_mapping.tolist() == [-1, -1, -1]
    assert out.slot_mapping.dtype == torch.int64
