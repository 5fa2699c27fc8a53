"""The torch half of the device-resident block table (`attnsync.adapters.torch_block_table`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _block_table_sim import Scheduler

import attnsync
from attnsync._block_table import BlockTableState
from attnsync._staging import pack, plan_layout
from attnsync._validate import SpecError
from attnsync.adapters import torch_block_table
from attnsync.adapters.torch_block_table import TorchBlockTable, paged_kv_indices, row_pages, slot_mapping

STEPS = 1000


def test_all_is_pinned():
    assert torch_block_table.__all__ == ["TorchBlockTable", "paged_kv_indices", "row_pages", "slot_mapping"]


def _t(array: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.array(array)).to(device)


def check_derived(sim: Scheduler, step, table: torch.Tensor, device: str = "cpu") -> bool:
    """The device-derived fields equal the host build of the step's batch; True when the
    FlashInfer fields were compared too (exact batches)."""
    state = sim.state
    batch = sim.batch(step, state.mirror)
    md = attnsync.build(batch)
    rows = state.batch_rows(step.rows, batch.padded_num_reqs)
    assert torch.equal(row_pages(table, _t(rows, device)).cpu(), _t(md.block_table))
    token_rows, positions = state.slot_inputs(batch, step.rows)
    slots = slot_mapping(table, _t(token_rows, device), _t(positions, device), sim.block_size)
    assert slots.dtype == torch.int64
    assert torch.equal(slots.cpu(), torch.from_numpy(md.slot_mapping.astype(np.int64)))
    narrow = slot_mapping(table, _t(token_rows, device), _t(positions, device), sim.block_size, dtype=torch.int32)
    assert torch.equal(narrow.cpu(), _t(md.slot_mapping))
    if not batch.all_exact:
        return False
    fi = attnsync.build(batch, "flashinfer")
    indptr, rows_t = _t(fi.paged_kv_indptr, device), _t(rows, device)
    indices = paged_kv_indices(table, indptr, rows_t, fi.num_pages)
    assert torch.equal(indices.cpu(), _t(fi.paged_kv_indices))
    wide = paged_kv_indices(table, indptr, rows_t, fi.num_pages, size=fi.num_pages + 7)
    assert torch.equal(wide.cpu()[: fi.num_pages], _t(fi.paged_kv_indices))
    assert not wide.cpu()[fi.num_pages :].any()
    return True


def test_simulated_scheduler_torch_cpu():
    """1,000 steps: the torch table equals the mirror and the table rebuilt from the
    scheduler's dict after every step, and its derived fields equal the host build."""
    sim = Scheduler(seed=2)
    device = TorchBlockTable(sim.state, "cpu")
    address = device.storage.data_ptr()
    compared = 0
    for _ in range(STEPS):
        step = sim.step()
        device.apply_record(step.updates)
        assert device.version == sim.state.version
        table = device.storage.numpy()
        assert np.array_equal(table, sim.state.mirror)
        assert np.array_equal(table, sim.table_from_scratch())
        compared += check_derived(sim, step, device.storage)
    assert device.storage.data_ptr() == address  # fixed address for the life of the table
    assert compared > STEPS // 2


def test_apply_from_a_packed_step_buffer():
    """The lowering's path: the record's flat vector is one int32 field of the step's packed
    buffer; `apply` takes the device view of it, next to the step's other fields."""
    sim = Scheduler(seed=3, pad_records=True)
    device = TorchBlockTable(sim.state, "cpu")
    for _ in range(60):
        step = sim.step()
        seq_lens = step.seq_lens
        layout = plan_layout([("seq_lens", seq_lens.shape, np.int32),
                              ("_block_table_updates", step.updates.flat.shape, np.int32)])
        buffer = np.zeros(layout.nbytes, dtype=np.uint8)
        pack(layout, {"seq_lens": seq_lens, "_block_table_updates": step.updates.flat}, buffer)
        staged = torch.from_numpy(buffer)  # (on CUDA: the one non_blocking copy of this buffer)
        entry = layout.entry("_block_table_updates")
        flat = staged[entry.offset : entry.offset + entry.nbytes].view(torch.int32)
        device.apply(step.updates.header, flat)
        view = device.rows(len(step.rows), version=sim.state.version)
        assert view.data_ptr() == device.storage.data_ptr()
        assert np.array_equal(device.storage.numpy(), sim.state.mirror)


def _one_record_table():
    state = BlockTableState(max_rows=4, width=8, num_cache_pages=50)
    device = TorchBlockTable(state, "cpu")
    state.add(0, [1, 2])
    state.add(1, [3])
    first = state.take_updates()
    device.apply_record(first)
    state.move(1, 2)
    second = state.take_updates()
    return state, device, first, second


def test_applied_twice_or_skipped_is_refused_and_writes_nothing():
    state, device, first, second = _one_record_table()
    before = device.storage.clone()
    with pytest.raises(SpecError, match=r"version 0 to 1, but the table is already at version 1.*applied before"):
        device.apply_record(first)
    assert torch.equal(device.storage, before) and device.version == 1
    state.append(2, [9])
    third = state.take_updates()
    with pytest.raises(SpecError, match=r"applies to version 2, but the table is at version 1.*never applied"):
        device.apply_record(third)
    assert torch.equal(device.storage, before) and device.version == 1
    device.apply_record(second)
    device.apply_record(third)
    assert np.array_equal(device.storage.numpy(), state.mirror)


def test_step_against_another_version_is_refused():
    state, device, _, second = _one_record_table()
    with pytest.raises(SpecError, match=r"built against version 2, but the table is at version 1"):
        device.rows(2, version=state.version)  # the second record was never applied
    device.apply_record(second)
    assert device.rows(3, version=state.version).shape == (3, 8)
    state.append(0, [5])
    with pytest.raises(SpecError, match="record was never taken"):
        state.as_batch_table(1)


def test_malformed_inputs_are_refused():
    state, device, _, second = _one_record_table()
    before = device.storage.clone()
    flat = torch.from_numpy(np.array(second.flat))
    with pytest.raises(TypeError, match="1-D int32"):
        device.apply(second.header, flat.to(torch.int64))
    with pytest.raises(SpecError, match="flat update vector has"):
        device.apply(second.header, flat[:-1])
    other = BlockTableState(max_rows=4, width=6, num_cache_pages=50)
    stranger = other.take_updates()
    stranger = type(stranger)(type(stranger.header)(1, 2, 0, 0, 0, 6, 4), stranger.flat, (0, 0, 0))
    with pytest.raises(SpecError, match="width 6"):
        device.apply(stranger.header, torch.from_numpy(np.array(stranger.flat)))
    assert torch.equal(device.storage, before) and device.version == 1
    state.append(0, [5])
    with pytest.raises(SpecError, match="changes no record was taken for"):
        TorchBlockTable(state, "cpu")
    with pytest.raises(TypeError, match="BlockTableState"):
        TorchBlockTable(np.zeros((4, 4), dtype=np.int32), "cpu")


def test_starts_from_a_populated_state():
    state = BlockTableState(max_rows=3, width=4, num_cache_pages=20)
    state.add(1, [4, 5])
    state.take_updates()
    device = TorchBlockTable(state, "cpu")
    assert device.version == 1
    assert device.storage.tolist() == [[0, 0, 0, 0], [4, 5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_empty_batch_derivations():
    state = BlockTableState(max_rows=3, width=4, num_cache_pages=20)
    device = TorchBlockTable(state, "cpu")
    empty = torch.zeros(0, dtype=torch.int32)
    assert paged_kv_indices(device.storage, torch.zeros(1, dtype=torch.int32), empty, 0).shape == (0,)
    assert slot_mapping(device.storage, empty, empty, 16).shape == (0,)
    assert row_pages(device.storage, empty).shape == (0, 4)


# -- on a GPU: the same, with every sync an error -----------------------------------------------


@pytest.mark.gpu
def test_gpu_apply_and_derive_without_sync():
    """200 steps on CUDA: each record's flat vector copied from pinned memory with
    non_blocking, applied, and every derived field gathered, all under
    `set_sync_debug_mode("error")`; compared with the host after the loop's device work."""
    from attnsync.testing import no_sync

    sim = Scheduler(seed=4)
    device = TorchBlockTable(sim.state, "cuda")
    stream_outputs = []
    for _ in range(200):
        step = sim.step()
        batch = sim.batch(step, sim.state.mirror)
        rows = sim.state.batch_rows(step.rows, batch.padded_num_reqs)
        token_rows, positions = sim.state.slot_inputs(batch, step.rows)
        host = [torch.from_numpy(np.array(a)).pin_memory() for a in (step.updates.flat, rows, token_rows, positions)]
        with no_sync():
            flat, rows_d, token_rows_d, positions_d = (h.to("cuda", non_blocking=True) for h in host)
            device.apply(step.updates.header, flat)
            table_copy = device.storage.clone()
            slots = slot_mapping(device.storage, token_rows_d, positions_d, sim.block_size)
            pages = row_pages(device.storage, rows_d)
        stream_outputs.append((step, batch, table_copy, slots, pages, np.array(sim.state.mirror)))
    torch.cuda.synchronize()
    for _step, batch, table_copy, slots, pages, mirror in stream_outputs:
        md = attnsync.build(batch)
        assert np.array_equal(table_copy.cpu().numpy(), mirror)
        assert np.array_equal(slots.cpu().numpy(), md.slot_mapping.astype(np.int64))
        assert np.array_equal(pages.cpu().numpy(), md.block_table)


@pytest.mark.gpu
def test_gpu_flashinfer_indices_without_sync():
    from attnsync.testing import no_sync

    sim = Scheduler(seed=5)
    device = TorchBlockTable(sim.state, "cuda")
    checked = 0
    for _ in range(100):
        step = sim.step()
        device.apply_record(step.updates)
        batch = sim.batch(step, sim.state.mirror)
        if not batch.all_exact:
            continue
        fi = attnsync.build(batch, "flashinfer")
        rows = sim.state.batch_rows(step.rows, batch.padded_num_reqs)
        host = [torch.from_numpy(np.array(a)).pin_memory() for a in (fi.paged_kv_indptr, rows)]
        with no_sync():
            indptr, rows_d = (h.to("cuda", non_blocking=True) for h in host)
            indices = paged_kv_indices(device.storage, indptr, rows_d, fi.num_pages, size=fi.num_pages + 5)
        assert np.array_equal(indices.cpu().numpy()[: fi.num_pages], fi.paged_kv_indices)
        checked += 1
    assert checked > 30


@pytest.mark.gpu
def test_gpu_apply_does_not_stall_the_host():
    """The ground truth: with a long kernel queued, apply and the gathers return at once."""
    from attnsync.testing import assert_no_host_stall

    sim = Scheduler(seed=6, pad_records=True)
    device = TorchBlockTable(sim.state, "cuda")

    def prepared():
        step = sim.step()
        flat = torch.from_numpy(np.array(step.updates.flat)).pin_memory()
        rows = torch.from_numpy(sim.state.batch_rows(step.rows)).pin_memory()

        def work():
            device.apply(step.updates.header, flat.to("cuda", non_blocking=True))
            row_pages(device.storage, rows.to("cuda", non_blocking=True))

        return work

    for _ in range(5):  # first calls allocate and load kernels
        prepared()()
    work = prepared()
    assert_no_host_stall(work)
    torch.cuda.synchronize()
    assert np.array_equal(device.storage.cpu().numpy(), sim.state.mirror)
