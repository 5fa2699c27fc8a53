"""GPU tests of the core: no syncs, no host stalls, one H2D copy, the `Stager` ownership
contract under a delayed stream (a ring keeps a lowering valid for depth - 1 further lowerings,
and the same ring without its guard corrupts), checking stagers, persistent addresses,
fresh-memory lowerings, multi-device.

Every test is marked `gpu`; tests/conftest.py skips them on a host without CUDA. The JAX
tests also skip when JAX has no GPU backend. Host-time budgets are far below the queued
sleep (a stall costs the whole sleep), and each probe is retried so that one noisy sample
cannot fail the suite while a real stall fails every attempt. "A delayed stream" is a stream
kept busy with `torch.cuda._sleep` before every lowering, so the host runs many steps ahead
of the GPU and every copy is still queued when the host comes back to its memory.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

import attnsync
from attnsync.testing import (
    _calibrated_cycles,
    assert_no_host_stall,
    brute_force_common,
    count_h2d_copies,
    host_time_under_busy_gpu,
    naive_common_torch,
    no_sync,
)

torch = pytest.importorskip("torch")
from attnsync.adapters import torch as ast  # noqa: E402

MIXED = dict(
    query_lens=[1, 1, 3, 5],
    seq_lens=[17, 33, 3, 12],
    block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 0, 0]],
    block_size=16,
)
MIXED_SLOTS = [144, 112, 176, 177, 178, 55, 56, 57, 58, 59]  # worked out in tests/test_common.py
INEXACT = dict(
    query_lens=[1, 2, 3, 1],
    seq_lens=[20, 35, 3, 16],
    block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 8, 0]],
    block_size=16,
    seq_lens_exact=[False, False, True, False],
    padded_num_reqs=5,
    padded_num_tokens=9,
)
INEXACT_TRUE_LENS = [18, 34, 3, 16, 0]
INEXACT_SLOTS = [145, 112, 113, 176, 177, 178, 63, -1, -1]  # tests/adapters/test_torch.py
TORCH_DEVICE_FIELDS = {  # torch name -> (CommonMetadata field, dtype)
    "query_start_loc": ("query_start_loc", torch.int32),
    "seq_lens": ("seq_lens", torch.int32),
    "block_table_tensor": ("block_table", torch.int32),
    "slot_mapping": ("slot_mapping", torch.int64),
}
JAX_FIELDS = ("query_start_loc", "seq_lens", "block_table", "slot_mapping")
# The stagers a serving loop may lower through: None is `lower` without one (fresh memory).
STAGER_KINDS = ("default", "ring", "checked-ring", "persistent")


def assert_torch_matches(md, out, device) -> None:
    for name, (source, dtype) in TORCH_DEVICE_FIELDS.items():
        tensor = getattr(out, name)
        assert tensor.device == device, name
        assert tensor.dtype == dtype, name
        np.testing.assert_array_equal(tensor.cpu().numpy(), getattr(md, source), err_msg=name)
    assert out.query_start_loc_cpu.device.type == "cpu"
    np.testing.assert_array_equal(out.query_start_loc_cpu.numpy(), md.query_start_loc)
    np.testing.assert_array_equal(out.seq_lens_cpu_upper_bound.numpy(), md.seq_lens)


def make_stager(kind: str, device):
    """A stager of `kind` (STAGER_KINDS) on `device`; None for `lower`'s default."""
    return {
        "default": lambda: None,
        "ring": lambda: ast.Stager(device),
        "checked-ring": lambda: ast.Stager(device, check=True),
        "persistent": lambda: ast.Stager(device, persistent=True),
    }[kind]()


def stats_of(stager, device):
    """The counters `lower(..., stager=stager)` adds to (the default stager's for None)."""
    return (stager if stager is not None else ast.default_stager(device)).stats


@pytest.fixture(scope="module")
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="module")
def jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("JAX has no GPU backend here")
    from attnsync.adapters import jax as asj

    return jax, asj, devices[0]


# --------------------------------------------------------------------------------------------
# No syncs, no stalls


@pytest.mark.gpu
def test_guards_catch_a_sync_ful_builder(cuda, record_property):
    """The guards used below do fail on the naive builder (device lists, .item())."""
    batch = attnsync.Batch(**MIXED)
    naive_common_torch(batch, cuda)  # warm-up
    with pytest.raises(RuntimeError, match="(?i)synchroniz"), no_sync():
        naive_common_torch(batch, cuda)
    torch.cuda.synchronize()
    with pytest.raises(AssertionError, match="host stalled"):
        assert_no_host_stall(lambda: naive_common_torch(batch, cuda), budget_ms=5.0)
    elapsed, _ = host_time_under_busy_gpu(lambda: naive_common_torch(batch, cuda))
    record_property("naive_host_ms_under_50ms_busy_gpu", round(elapsed, 3))  # the GPU report's stall table
    assert elapsed > 25.0, "the naive builder waits for the queued kernel"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["default", "ring", "persistent"])
def test_build_and_torch_lower_without_sync_or_stall(cuda, record_property, kind, stall_probe):
    batch = attnsync.Batch(**MIXED, padded_num_reqs=8, padded_num_tokens=16)
    stager = make_stager(kind, cuda)

    def step():
        with no_sync():
            return ast.lower(attnsync.build(batch), device=cuda, stager=stager)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    out = stall_probe(step, budget_ms=2.0, warmup=0)  # warmed up above; 3 tries
    torch.cuda.synchronize()
    md = attnsync.build(batch)
    assert_torch_matches(md, out, cuda)  # checked while valid: no further lowering yet
    assert out.slot_mapping[:10].tolist() == MIXED_SLOTS
    del out
    elapsed, _ = host_time_under_busy_gpu(step)
    # the GPU report's stall table (the default stager keeps the name it always had)
    record_property("host_ms_under_50ms_busy_gpu" + ("" if kind == "default" else f"_{kind}"), round(elapsed, 3))


@pytest.mark.gpu
def test_torch_lower_with_device_seq_lens_without_sync_or_stall(cuda, stall_probe):
    md = attnsync.build(attnsync.Batch(**INEXACT))
    lens = torch.tensor(INEXACT_TRUE_LENS, dtype=torch.int32, device=cuda)
    torch.cuda.synchronize()

    def step():
        with no_sync():
            return ast.lower(md, device=cuda, seq_lens=lens)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    out = stall_probe(step, budget_ms=2.0, warmup=0)  # warmed up above; 3 tries
    torch.cuda.synchronize()
    assert out.slot_mapping.dtype == torch.int64 and out.slot_mapping.device == cuda
    assert out.slot_mapping.tolist() == INEXACT_SLOTS
    assert out.seq_lens is lens


@pytest.mark.gpu
def test_jax_lower_without_sync_or_stall(jax_gpu, record_property, stall_probe):
    jax, asj, device = jax_gpu
    batch = attnsync.Batch(**MIXED, padded_num_reqs=8, padded_num_tokens=16)

    def step():
        with no_sync():  # torch sync debug mode + jax.transfer_guard("disallow")
            return asj.lower(attnsync.build(batch), device)

    for _ in range(5):
        jax.block_until_ready(step())
    torch.cuda.synchronize()
    # a wide budget, still far below the 100 ms sleep a stall would cost
    out = stall_probe(step, budget_ms=15.0, sleep_ms=100.0, warmup=0)
    jax.block_until_ready(out)
    elapsed, ready = host_time_under_busy_gpu(step, sleep_ms=100.0)
    jax.block_until_ready(ready)
    record_property("host_ms_under_100ms_busy_gpu", round(elapsed, 3))  # the GPU report's stall table
    md = attnsync.build(batch)
    for name in JAX_FIELDS:
        leaf = getattr(out, name)
        assert leaf.dtype == np.int32 and leaf.devices() == {device}, name
        np.testing.assert_array_equal(np.asarray(leaf), getattr(md, name), err_msg=name)


# --------------------------------------------------------------------------------------------
# One copy; the packed JAX vector


@pytest.mark.gpu
@pytest.mark.parametrize("kind", STAGER_KINDS)
def test_exactly_one_h2d_copy_per_lowering(cuda, kind):
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=8, padded_num_tokens=16))
    stager = make_stager(kind, cuda)
    stats = stats_of(stager, cuda)
    for _ in range(3):  # warm-up: every ring slot's memory made
        ast.lower(md, cuda, stager=stager)
    copies = stats.copies
    count, out = count_h2d_copies(lambda: ast.lower(md, cuda, stager=stager))
    assert count == 1 and stats.copies == copies + 1
    assert_torch_matches(md, out, cuda)
    del out  # (a checking ring refuses to come round to a lowering still held)

    def three():
        for _ in range(3):
            out = ast.lower(md, cuda, stager=stager)
        return out

    count, _ = count_h2d_copies(three)
    assert count == 3 and stats.copies == copies + 4
    inexact = attnsync.build(attnsync.Batch(**INEXACT))
    lens = torch.tensor(INEXACT_TRUE_LENS, dtype=torch.int32, device=cuda)
    count, out = count_h2d_copies(lambda: ast.lower(inexact, cuda, seq_lens=lens, stager=stager))
    assert count == 1
    assert out.slot_mapping.tolist() == INEXACT_SLOTS
    # the counter does count: the naive builder uploads one list per field
    count, _ = count_h2d_copies(lambda: naive_common_torch(attnsync.Batch(**MIXED), cuda))
    assert count >= 4


@pytest.mark.gpu
def test_exactly_one_h2d_copy_per_jax_lowering(jax_gpu):
    jax, asj, device = jax_gpu
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=8, padded_num_tokens=16))
    jax.block_until_ready(asj.lower(md, device))
    count, out = count_h2d_copies(lambda: jax.block_until_ready(asj.lower(md, device)))
    assert count == 1
    np.testing.assert_array_equal(np.asarray(out.slot_mapping), md.slot_mapping)


@pytest.mark.gpu
def test_jax_lowering_is_one_packed_device_vector(jax_gpu):
    """The lowering's one leaf is the packed int32 vector, on the GPU, holding the host
    vector's bytes; fields read outside jit come from one split and own their memory."""
    jax, asj, device = jax_gpu
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    vector, layout = asj.pack(md)
    out = asj.lower(md, device)
    (leaf,) = jax.tree_util.tree_leaves(out)
    assert leaf is out.packed and leaf.devices() == {device} and leaf.dtype == np.int32
    assert out.layout == layout and np.asarray(leaf).tobytes() == vector.tobytes()
    start = leaf.unsafe_buffer_pointer()
    for name in JAX_FIELDS:
        field = getattr(out, name)
        assert field.devices() == {device}, name
        assert not start <= field.unsafe_buffer_pointer() < start + vector.nbytes or field.size == 0, name
        np.testing.assert_array_equal(np.asarray(field), getattr(md, name), err_msg=name)


@pytest.mark.gpu
def test_jax_lowering_donated_without_sync_or_stall(jax_gpu, stall_probe):
    """One H2D copy, no sync or stall, and a lowering may be donated into a jitted consumer."""
    jax, asj, device = jax_gpu
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    consume = jax.jit(lambda m: (m.packed + 1, m.slot_mapping.sum() + m.block_table.sum()), donate_argnums=0)
    for _ in range(3):  # compile once
        jax.block_until_ready(consume(asj.lower(md, device)))
    with no_sync():
        out = asj.lower(md, device)
        _, total = consume(out)
    assert int(total) == int(md.slot_mapping.sum()) + int(md.block_table.sum())
    assert out.packed.is_deleted()
    copies, _ = count_h2d_copies(lambda: jax.block_until_ready(asj.lower(md, device)))
    assert copies == 1
    stall_probe(lambda: asj.lower(md, device), budget_ms=15.0, sleep_ms=100.0)


# --------------------------------------------------------------------------------------------
# The Stager contract under a delayed stream

RING_STEPS = 1000
RING_REQS, RING_WIDTH = 8, 8


def ring_batch(step: int) -> attnsync.Batch:
    """Same shapes every step, different values: seq lens 17..106, page ids shifting by step."""
    seq = 17 + (step * 7 + np.arange(RING_REQS) * 3) % 90
    table = (step * 1000 + np.arange(RING_REQS * RING_WIDTH).reshape(RING_REQS, RING_WIDTH)) % (1 << 20)
    return attnsync.Batch(query_lens=np.ones(RING_REQS, np.int64), seq_lens=seq, block_table=table, block_size=16)


def ring_expected(md) -> np.ndarray:
    return np.concatenate(
        [md.query_start_loc, md.seq_lens, md.block_table.ravel(), md.slot_mapping]
    ).astype(np.int64)


def ring_got(out) -> torch.Tensor:
    return torch.cat(
        [out.query_start_loc.long(), out.seq_lens.long(), out.block_table_tensor.reshape(-1).long(), out.slot_mapping]
    )


@pytest.fixture(scope="module")
def ring_steps(cuda):
    mds = [attnsync.build(ring_batch(step)) for step in range(RING_STEPS)]
    expected_np = np.stack([ring_expected(md) for md in mds])
    assert (expected_np[1:] != expected_np[:-1]).any(axis=1).all(), "consecutive steps must differ"
    expected = torch.from_numpy(expected_np).to(cuda)  # one upload before the loop
    torch.cuda.synchronize()
    return mds, expected_np, expected


def delayed_loop(cuda, mds, expected, stager, *, sleep_ms: float = 1.0) -> tuple[int, set[int]]:
    """Lower every md of `mds` behind `sleep_ms` of queued GPU work, drop it at once, and compare
    its device values with `expected` on the device, in stream order (read back once at the
    end). Returns (mismatching values, the distinct addresses of `slot_mapping`)."""
    cycles = _calibrated_cycles(torch, sleep_ms)
    mismatches = torch.zeros((), dtype=torch.int64, device=cuda)
    addresses = set()
    torch.cuda.synchronize()
    for step, md in enumerate(mds):
        torch.cuda._sleep(cycles)
        out = ast.lower(md, cuda, stager=stager)
        addresses.add(out.slot_mapping.data_ptr())
        mismatches += (ring_got(out) != expected[step]).sum()
        del out  # its slot comes round depth steps later; the rewrite is queued after this check
    torch.cuda.synchronize()
    return int(mismatches.item()), addresses


@pytest.mark.gpu
@pytest.mark.parametrize("depth, check", [(2, False), (2, True), (3, False)], ids=["depth2", "depth2-checked", "depth3"])
def test_guarded_ring_under_a_delayed_stream(cuda, ring_steps, depth, check):
    mds, _, expected = ring_steps
    stager = ast.Stager(cuda, depth=depth, check=check)
    wrong, addresses = delayed_loop(cuda, mds, expected, stager)
    assert wrong == 0
    assert stager.stats.copies == RING_STEPS
    assert stager.stats.event_waits > 0, "the host ran ahead, so the guard must have waited"
    assert len(addresses) == depth, "the ring's slots are used in turn"
    assert stager.stats.grows == 0, "one shape: each slot's memory made once"


@pytest.mark.gpu
def test_without_the_slot_guard_the_same_ring_corrupts(cuda, ring_steps, monkeypatch):
    """A slot's pinned buffer repacked without waiting for the copy that reads it: the next
    step's values overwrite bytes a queued copy has still to read, so the check above would
    fail (the guarded test can fail)."""
    mds, _, expected = ring_steps
    stager = ast.Stager(cuda, depth=2)
    stager._ring._is_done = lambda event: True  # the ring's guard says every copy has run
    wrong, addresses = delayed_loop(cuda, mds[:200], expected[:200], stager)
    assert len(addresses) == 2 and stager.stats.event_waits == 0
    assert wrong > 0, "the unguarded ring must corrupt, or the guarded test proves nothing"


@pytest.mark.gpu
def test_unguarded_single_slot_corrupts_under_the_same_delay(cuda, ring_steps):
    """The hazard itself, in plain torch: one pinned buffer rewritten without waiting for its
    copy gets later values into earlier copies under the same delay."""
    _, expected_np, expected = ring_steps
    steps = 200
    cycles = _calibrated_cycles(torch, 1.0)
    pinned = torch.empty(expected_np.shape[1], dtype=torch.int64, pin_memory=True)
    host = pinned.numpy()
    mismatches = torch.zeros((), dtype=torch.int64, device=cuda)
    torch.cuda.synchronize()
    for step in range(steps):
        torch.cuda._sleep(cycles)
        host[:] = expected_np[step]  # may overwrite data a queued copy has not read yet
        device = torch.empty(expected_np.shape[1], dtype=torch.int64, device=cuda)
        device.copy_(pinned, non_blocking=True)
        mismatches += (device != expected[step]).sum()
    torch.cuda.synchronize()
    assert int(mismatches.item()) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_held_lowerings_keep_their_values_while_valid_under_a_delayed_stream(cuda, ring_steps, check):
    """A depth-4 ring: each lowering (the object, or a slice of one field) is held for 3 further
    lowerings, then compared on the device, in stream order after those lowerings' copies, and
    dropped just before its slot comes round. A checking stager accepts this (it is within
    the contract)."""
    mds, _, expected = ring_steps
    depth, steps = 4, 200
    cycles = _calibrated_cycles(torch, 0.5)
    stager = ast.Stager(cuda, depth=depth, check=check)
    held = collections.deque()
    mismatches = torch.zeros((), dtype=torch.int64, device=cuda)
    torch.cuda.synchronize()
    for step, md in enumerate(mds[:steps]):
        torch.cuda._sleep(cycles)
        out = ast.lower(md, cuda, stager=stager)
        held.append((step, out if step % 2 else out.block_table_tensor[1:]))  # the object, or a slice only
        del out
        if len(held) == depth:  # the oldest has seen depth - 1 further lowerings; the next rewrites it
            old_step, old = held.popleft()
            if old_step % 2:
                mismatches += (ring_got(old) != expected[old_step]).sum()
            else:
                want = expected[old_step][2 * RING_REQS + 1 + RING_WIDTH: 2 * RING_REQS + 1 + RING_REQS * RING_WIDTH]
                mismatches += (old.reshape(-1).long() != want).sum()
            del old
    torch.cuda.synchronize()
    assert int(mismatches.item()) == 0
    for step, value in held:  # the last depth - 1: still valid
        if step % 2:
            assert torch.equal(ring_got(value), expected[step]), step
        else:
            want = torch.from_numpy(mds[step].block_table[1:].astype(np.int32)).to(cuda)
            assert torch.equal(value, want), step
    assert stager.stats.copies == steps and stager.stats.event_waits > 0


@pytest.mark.gpu
def test_a_checking_stager_refuses_a_held_lowering_and_a_stream_change_on_cuda(cuda, ring_steps):
    """Past its validity a held lowering is refused before anything is written (its values stay,
    with the copies before it still queued), and so is a lowering on another stream."""
    mds, _, expected = ring_steps
    stager = ast.Stager(cuda, depth=2, check=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(_calibrated_cycles(torch, 20.0))  # the copies below stay queued meanwhile
    first = ast.lower(mds[0], cuda, stager=stager)
    ast.lower(mds[1], cuda, stager=stager)  # dropped at once
    copies = stager.stats.copies
    with pytest.raises(ast.StaleLoweringError, match="still referenced") as refused:
        ast.lower(mds[2], cuda, stager=stager)  # would rewrite first's slot
    assert isinstance(refused.value, attnsync.SpecError)
    assert stager.stats.copies == copies, "nothing copied"
    side = torch.cuda.Stream(cuda)
    side.wait_stream(torch.cuda.current_stream(cuda))
    with torch.cuda.stream(side), pytest.raises(ast.StaleLoweringError, match="one Stager per stream"):
        ast.lower(mds[3], cuda, stager=stager)
    torch.cuda.current_stream(cuda).wait_stream(side)
    assert stager.stats.copies == copies, "nothing copied"
    assert torch.equal(ring_got(first), expected[0]), "the held lowering was not rewritten"
    del first
    torch.cuda._sleep(_calibrated_cycles(torch, 5.0))
    again = ast.lower(mds[2], cuda, stager=stager)  # released: the slot is free again
    assert torch.equal(ring_got(again), expected[2])
    assert stager.stats.copies == copies + 1


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["default", "depth-0"])
def test_fresh_memory_lowerings_are_never_rewritten_under_a_delayed_stream(cuda, ring_steps, kind):
    """`lower` without a stager (and `Stager(depth=0)`): every lowering owns its memory, so all
    held lowerings keep their values and addresses."""
    mds, _, expected = ring_steps
    steps = 64
    stager = None if kind == "default" else ast.Stager(cuda, depth=0)
    stats = stats_of(stager, cuda)
    copies = stats.copies
    cycles = _calibrated_cycles(torch, 0.5)
    kept = []
    torch.cuda.synchronize()
    for md in mds[:steps]:
        torch.cuda._sleep(cycles)
        kept.append(ast.lower(md, cuda, stager=stager))
    torch.cuda.synchronize()
    for step, out in enumerate(kept):
        assert torch.equal(ring_got(out), expected[step]), step
    assert len({out.slot_mapping.data_ptr() for out in kept}) == steps
    assert len({out.seq_lens_cpu_upper_bound.data_ptr() for out in kept}) == steps
    assert stats.copies == copies + steps


@pytest.mark.gpu
def test_a_fresh_lowerings_pinned_source_lives_until_its_copy_ran(cuda, ring_steps):
    """Depth 0, nothing held: each lowering's pinned source goes back to torch's caching host
    allocator at once, which must not hand it to a later lowering before the copy that reads
    it has run. 150 lowerings of different values behind a delayed stream stay exact."""
    mds, _, expected = ring_steps
    stager = ast.Stager(cuda, depth=0)
    wrong, _ = delayed_loop(cuda, mds[:150], expected[:150], stager)
    assert wrong == 0
    assert stager.stats.copies == 150 and stager.stats.event_waits == 0


# --------------------------------------------------------------------------------------------
# Persistent addresses


@pytest.mark.gpu
def test_persistent_stager_keeps_addresses_and_refuses_another_layout(cuda):
    stager = ast.Stager(cuda, persistent=True)
    mds = [attnsync.build(ring_batch(step)) for step in range(6)]
    pointers = None
    out = None
    for md in mds:
        out = ast.lower(md, cuda, stager=stager)
        now = {name: getattr(out, name).data_ptr() for name in TORCH_DEVICE_FIELDS}
        pointers = pointers or now
        assert now == pointers
    torch.cuda.synchronize()
    assert_torch_matches(mds[-1], out, cuda)
    copies = stager.stats.copies
    snapshot = {name: getattr(out, name).clone() for name in TORCH_DEVICE_FIELDS}
    other = attnsync.build(attnsync.Batch(**MIXED))  # 4 rows, not 8: another layout
    with pytest.raises(attnsync.SpecError, match=r"persistent stager.*Fix: pad every batch to the same bucket"):
        ast.lower(other, cuda, stager=stager)
    torch.cuda.synchronize()
    assert stager.stats.copies == copies, "nothing staged"
    for name, before in snapshot.items():
        assert torch.equal(getattr(out, name), before), f"{name} was rewritten"


@pytest.mark.gpu
def test_bucketed_jax_lowerings_compile_a_consumer_once(jax_gpu):
    """Varying steps of one bucket on the GPU: one compile of a jitted consumer."""
    jax, asj, device = jax_gpu
    lad = attnsync.BucketLadder(max_num_reqs=RING_REQS, max_num_tokens=RING_REQS, max_model_len=RING_WIDTH * 16,
                                block_size=16, width_sizes=(RING_WIDTH,))
    traces = []

    @jax.jit
    def consume(m):
        traces.append(1)
        return m.slot_mapping.sum() + m.seq_lens.sum() + m.num_decodes

    for step in range(100):
        batch = ring_batch(step)
        bucket = lad.bucket_for(batch)
        md = attnsync.build(lad.pad(batch, bucket))
        with jax.transfer_guard("disallow"):
            value = consume(asj.lower(md, device, bucket=bucket))
        if step % 25 == 0:
            assert int(value) == int(md.slot_mapping.sum()) + int(md.seq_lens.sum()) + md.num_decodes
    assert len(traces) == 1 and consume._cache_size() == 1


@pytest.mark.gpu
def test_persistent_stager_under_a_delayed_stream(cuda, ring_steps):
    """One device address every step, each step's values there in stream order, and the
    rotating host slots guarded as the ring's are."""
    mds, _, expected = ring_steps
    stager = ast.Stager(cuda, persistent=True)
    wrong, addresses = delayed_loop(cuda, mds[:300], expected[:300], stager)
    assert wrong == 0
    assert len(addresses) == 1
    assert stager.stats.copies == 300 and stager.stats.event_waits > 0


# --------------------------------------------------------------------------------------------
# int32 range for JAX, CPU vs GPU, multi-device


@pytest.mark.gpu
def test_jax_refuses_int64_beyond_int32_before_staging(jax_gpu, monkeypatch):
    jax, asj, device = jax_gpu
    puts = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: puts.append(1) or real(*a, **k))
    md = attnsync.build(attnsync.Batch(**MIXED))
    wide = dataclasses.replace(md, block_table=md.block_table.astype(np.int64) + 2**31)
    with pytest.raises(attnsync.SpecError, match=r"block_table: value \d+ does not fit int32.*Fix"):
        asj.lower(wide, device)
    assert puts == []


@pytest.mark.gpu
def test_gpu_lowering_equals_cpu_lowering_and_brute_force(cuda):
    """Random shapes, fresh memory and through one checking ring (its slots grow as shapes do)."""
    rng = np.random.default_rng(7)
    ring = ast.Stager(cuda, check=True)
    for _ in range(30):
        r = int(rng.integers(0, 10))
        q = rng.integers(1, 6, r)
        s = q + rng.integers(0, 80, r)
        bs = int(rng.choice([1, 16, 64]))
        width = int(max((-(-s // bs)).max(initial=0), 1))
        batch = attnsync.Batch(query_lens=q, seq_lens=s, block_table=rng.integers(0, 5000, (r, width)),
                               block_size=bs, padded_num_reqs=r + 2, padded_num_tokens=int(q.sum()) + 3)
        md = attnsync.build(batch)
        gpu, cpu = ast.lower(md, cuda), ast.lower(md, "cpu")
        ringed = ast.lower(md, cuda, stager=ring)
        for name in TORCH_DEVICE_FIELDS:
            assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
            assert torch.equal(getattr(ringed, name).cpu(), getattr(cpu, name)), name
        np.testing.assert_array_equal(gpu.slot_mapping.cpu().numpy(), brute_force_common(batch)["slot_mapping"])
        del ringed
    assert ring.stats.copies == 30


@pytest.mark.gpu
@pytest.mark.multigpu
def test_same_metadata_on_two_devices():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    md = attnsync.build(attnsync.Batch(**MIXED, padded_num_reqs=6, padded_num_tokens=12))
    first = ast.lower(md, "cuda:0")
    second = ast.lower(md, "cuda:1")
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    assert_torch_matches(md, first, torch.device("cuda", 0))
    assert_torch_matches(md, second, torch.device("cuda", 1))
    for name in TORCH_DEVICE_FIELDS:
        assert torch.equal(getattr(first, name).cpu(), getattr(second, name).cpu()), name
