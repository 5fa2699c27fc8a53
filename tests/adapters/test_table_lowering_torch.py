"""The torch lowering against a device-resident block table (`lower(md, ..., block_table=...)`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _block_table_sim import Scheduler

import attnsync
from attnsync._block_table import BlockTableState
from attnsync._validate import SpecError
from attnsync.adapters.torch import Stager, lower
from attnsync.adapters.torch_block_table import TorchBlockTable

STEPS = 1000


def _equal(a, b) -> None:
    """Two lowerings hold the same fields, bit for bit (tensors, ints, options)."""
    assert type(a) is type(b)
    assert a.__dict__.keys() == b.__dict__.keys()
    for name, x in a.__dict__.items():
        y = b.__dict__[name]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x.cpu(), y.cpu()), name
        else:
            assert x == y, name


def _batch(sim: Scheduler, step, table, rows=None) -> attnsync.Batch:
    order = slice(None) if rows is None else rows
    return attnsync.Batch(
        query_lens=step.query_lens[order], seq_lens=step.seq_lens[order], block_table=table,
        block_size=sim.block_size, seq_lens_exact=step.exact[order], is_prefilling=step.is_prefilling[order],
        padded_num_reqs=step.padded_num_reqs, padded_num_tokens=step.padded_num_tokens)


def _condensed_order(step) -> np.ndarray | None:
    """The batch rows in table order when they are exactly rows [0, n) (a condensed table)."""
    order = np.argsort(step.rows, kind="stable")
    return order if np.array_equal(step.rows[order], np.arange(step.rows.shape[0])) else None


@pytest.mark.parametrize("depth", [0, 2])
def test_simulated_scheduler_device_table_equals_full_table(depth):
    """1,000 steps: the device-table lowering equals the full-table lowering bit for bit, for
    the common and FlashInfer metadata, with condensed (prefix view) and gathered rows."""
    sim = Scheduler(seed=11)
    device = TorchBlockTable(sim.state, "cpu")
    address = device.storage.data_ptr()
    stager = Stager("cpu", depth=depth)
    seen = {"prefix": 0, "gather": 0, "flashinfer": 0, "inexact": 0}
    for i in range(STEPS):
        step = sim.step()
        state = sim.state
        if not step.exact.all():  # inexact rows: the device path refuses, nothing applied
            view = state.view(step.rows)
            md = attnsync.build(_batch(sim, step, view))
            with pytest.raises(SpecError, match="inexact"):
                lower(md, "cpu", stager=stager, block_table=device, table_updates=step.updates, table_view=view)
            assert device.version == state.version - 1
            device.apply_record(step.updates)
            seen["inexact"] += 1
            continue
        order = _condensed_order(step) if i % 2 else None
        if order is not None:  # common metadata over the condensed table: the prefix view
            view = state.view(step.rows.shape[0])
            plain = attnsync.build(_batch(sim, step, state.as_batch_table(step.rows.shape[0]), order))
            md = attnsync.build(_batch(sim, step, view, order))
            got = lower(md, "cpu", stager=stager, block_table=device, table_updates=step.updates, table_view=view)
            _equal(got, lower(plain, "cpu"))
            seen["prefix" if view.is_prefix(md.num_reqs) else "gather"] += 1
            continue
        view = state.view(step.rows)
        plain_batch = sim.batch(step, state.mirror)
        backend = "flashinfer" if i % 3 == 0 else "common"
        options = {"device_indices": True} if backend == "flashinfer" and i % 2 else {}
        md = attnsync.build(_batch(sim, step, view), backend, **options)
        got = lower(md, "cpu", stager=stager, block_table=device, table_updates=step.updates, table_view=view)
        _equal(got, lower(attnsync.build(plain_batch, backend), "cpu"))
        seen["flashinfer" if backend == "flashinfer" else "gather"] += 1
        del got  # (depth 2 reuses the slot)
    assert device.storage.data_ptr() == address
    assert np.array_equal(device.storage.numpy(), sim.state.mirror)
    assert min(seen.values()) > 20, seen


def _small():
    state = BlockTableState(max_rows=4, width=4, num_cache_pages=30)
    device = TorchBlockTable(state, "cpu")
    state.add(0, [1, 2])
    state.add(1, [3])
    return state, device


def _md(state, view, seq_lens=(5, 3)):
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=list(seq_lens), block_table=view, block_size=4)
    return attnsync.build(batch)


def test_record_applied_twice_is_refused_and_writes_nothing():
    state, device = _small()
    updates = state.take_updates()
    view = state.view(2)
    lowered = lower(_md(state, view), "cpu", block_table=device, table_updates=updates, table_view=view)
    assert lowered.block_table_tensor.tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]
    before = device.storage.clone()
    with pytest.raises(SpecError, match=r"already at version 1.*applied before"):
        lower(_md(state, view), "cpu", block_table=device, table_updates=updates, table_view=view)
    assert torch.equal(device.storage, before) and device.version == 1
    # the record once applied, the same step lowers again without it
    again = lower(_md(state, view), "cpu", block_table=device, table_view=view)
    assert again.block_table_tensor.tolist() == lowered.block_table_tensor.tolist()


def test_pending_updates_never_staged_are_refused():
    state, device = _small()
    state.take_updates()  # the record is dropped: the device never sees rows 0 and 1
    view = state.view(2)
    with pytest.raises(SpecError, match="pending updates were never staged"):
        lower(_md(state, view), "cpu", block_table=device, table_view=view)
    assert device.version == 0 and not device.storage.any()


def test_verbs_after_the_record_are_refused():
    state, device = _small()
    updates = state.take_updates()
    view = state.view(2)
    md = _md(state, view)
    state.append(1, [9])
    with pytest.raises(SpecError, match="verbs have changed the state since"):
        lower(md, "cpu", block_table=device, table_updates=updates, table_view=view)
    assert device.version == 0 and not device.storage.any()


def test_bad_rows_and_page_ids_are_refused_by_the_verbs_and_views():
    state, _ = _small()
    with pytest.raises(SpecError, match="row 7 does not exist"):
        state.append(7, [4])
    with pytest.raises(SpecError, match=r"page id 30 .* out of range"):
        state.append(0, [30])
    state.take_updates()
    with pytest.raises(SpecError, match="holds no request"):
        state.view([0, 2])
    view = state.view(2)
    with pytest.raises(SpecError, match=r"holds 1 pages, but seq_len 9 .* needs 3"):
        _md(state, view, seq_lens=(5, 9))


def test_plain_lowering_refuses_placeholder_indices():
    state, device = _small()
    updates = state.take_updates()
    view = state.view(2)
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[5, 3], block_table=view, block_size=4)
    md = attnsync.build(batch, "flashinfer", device_indices=True)
    with pytest.raises(SpecError, match="device_indices=True"):
        lower(md, "cpu")
    got = lower(md, "cpu", block_table=device, table_updates=updates, table_view=view)
    assert got.paged_kv_indices.tolist() == [1, 2, 3]
    assert got.paged_kv_indptr_cpu.tolist() == [0, 2, 3]


def test_wrong_arguments_are_refused():
    state, device = _small()
    updates = state.take_updates()
    view = state.view(2)
    md = _md(state, view)
    with pytest.raises(SpecError, match="needs both"):
        lower(md, "cpu", block_table=device)
    with pytest.raises(TypeError, match="TorchBlockTable"):
        lower(md, "cpu", block_table=np.zeros((5, 4), np.int32), table_view=view)
    other = BlockTableState(max_rows=4, width=4, num_cache_pages=30)
    other.add(0, [1])
    other.take_updates()
    with pytest.raises(SpecError, match="not the last one the view's state returned"):
        lower(md, "cpu", block_table=device, table_updates=other.take_updates(), table_view=view)
    assert device.version == 0
    lower(md, "cpu", block_table=device, table_updates=updates, table_view=view)
    assert device.version == 1


def test_padded_condensed_batch_is_a_view_of_the_table():
    state, device = _small()
    updates = state.take_updates()
    view = state.view(2)
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[5, 3], block_table=view, block_size=4,
                           padded_num_reqs=4, padded_num_tokens=4)
    md = attnsync.build(batch)
    got = lower(md, "cpu", stager=Stager("cpu", depth=2), block_table=device, table_updates=updates,
                table_view=view)
    assert got.block_table_tensor.data_ptr() == device.storage.data_ptr()
    assert got.block_table_tensor.tolist() == md.block_table.tolist()


# -- on a GPU (the lead runs these): no sync, no stall, stream order under a delayed stream -----


def _exact_steps(seed: int, count: int):
    """A simulated scheduler (its state still empty) and a generator of `count` exact steps:
    (step, view, device-table md, plain md) each."""
    sim = Scheduler(seed=seed, pad_records=True)

    def steps():
        for _ in range(count):
            step = sim.step()
            step.exact[:] = True
            view = sim.state.view(step.rows)
            yield step, view, attnsync.build(_batch(sim, step, view)), attnsync.build(sim.batch(step, sim.state.mirror))

    return sim, steps()


@pytest.mark.gpu
def test_gpu_device_table_lowering_without_sync():
    """300 steps through a depth-2 CUDA stager, every lowering under set_sync_debug_mode("error");
    each step's block table and slots, cloned on the stream, equal the plain path's."""
    from attnsync.testing import no_sync

    stager = Stager("cuda", depth=2)
    sim, steps = _exact_steps(21, 300)
    device = TorchBlockTable(sim.state, "cuda")
    kept = []
    for step, view, md, plain in steps:
        with no_sync():
            got = lower(md, "cuda", stager=stager, block_table=device, table_updates=step.updates, table_view=view)
            kept.append((got.block_table_tensor.clone(), got.slot_mapping.clone(), plain))
        del got
    torch.cuda.synchronize()
    for table, slots, plain in kept:
        assert np.array_equal(table.cpu().numpy(), plain.block_table)
        assert np.array_equal(slots.cpu().numpy(), plain.slot_mapping.astype(np.int64))


@pytest.mark.gpu
def test_gpu_device_table_lowering_does_not_stall_the_host():
    from attnsync.testing import assert_no_host_stall

    stager = Stager("cuda", depth=3)
    sim, steps = _exact_steps(22, 12)
    device = TorchBlockTable(sim.state, "cuda")
    for i, (step, view, md, _) in enumerate(steps):
        def work(md=md, step=step, view=view):
            return lower(md, "cuda", stager=stager, block_table=device, table_updates=step.updates, table_view=view)

        if i < 8:
            work()  # first calls allocate and load kernels
        else:
            assert_no_host_stall(work)
    torch.cuda.synchronize()
    assert np.array_equal(device.storage.cpu().numpy(), sim.state.mirror)


@pytest.mark.gpu
def test_gpu_delayed_stream_keeps_the_table_and_an_unguarded_copy_corrupts():
    """1,000 steps with the stream held back by a sleep kernel each step: the lowering's ring
    (events guard its pinned slots) leaves the device table equal to the mirror; packing every
    record into one pinned buffer without that guard corrupts a second table."""
    from attnsync.testing import _calibrated_cycles

    cycles = _calibrated_cycles(torch, 0.2)
    stager = Stager("cuda", depth=2)
    sim, steps = _exact_steps(23, 1000)
    guarded, unguarded = TorchBlockTable(sim.state, "cuda"), TorchBlockTable(sim.state, "cuda")
    pinned = torch.empty(1 << 20, dtype=torch.int32, pin_memory=True)
    for step, view, md, _ in steps:
        torch.cuda._sleep(cycles)
        lower(md, "cuda", stager=stager, block_table=guarded, table_updates=step.updates, table_view=view)
        size = step.updates.flat.shape[0]
        pinned[:size].numpy()[:] = step.updates.flat  # rewritten while earlier copies may still wait
        unguarded.apply(step.updates.header, pinned[:size].to("cuda", non_blocking=True))
    torch.cuda.synchronize()
    assert np.array_equal(guarded.storage.cpu().numpy(), sim.state.mirror)
    assert not np.array_equal(unguarded.storage.cpu().numpy(), sim.state.mirror)
