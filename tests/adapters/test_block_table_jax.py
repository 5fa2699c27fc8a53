"""The JAX half of the device-resident block table (`attnsync.adapters.jax_block_table`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _block_table_sim import Scheduler

import attnsync
from attnsync._block_table import BlockTableState, bucket_count
from attnsync._validate import SpecError
from attnsync.adapters import jax_block_table
from attnsync.adapters.jax_block_table import JaxBlockTable, paged_kv_indices, row_pages, slot_mapping

STEPS = 1000


def test_all_is_pinned():
    assert jax_block_table.__all__ == ["JaxBlockTable", "paged_kv_indices", "row_pages", "slot_mapping"]


def _padded(values: np.ndarray, length: int, fill: int) -> np.ndarray:
    out = np.full(length, fill, dtype=np.int32)
    out[: values.shape[0]] = values
    return out


def check_derived(sim: Scheduler, step, table: jax.Array) -> bool:
    """The derived fields, with every input padded to a power-of-two bucket (what a jitted
    consumer does), equal the host build of the step's batch."""
    state = sim.state
    batch = sim.batch(step, state.mirror)
    md = attnsync.build(batch)
    rows = state.batch_rows(step.rows, batch.padded_num_reqs)
    r_bucket = bucket_count(rows.shape[0], 8)
    rows_b = _padded(rows, r_bucket, state.pad_row)
    assert np.array_equal(np.asarray(row_pages(table, rows_b))[: rows.shape[0]], md.block_table)
    token_rows, positions = state.slot_inputs(batch, step.rows)
    t = token_rows.shape[0]
    t_bucket = bucket_count(t, 8)
    slots = slot_mapping(table, _padded(token_rows, t_bucket, state.pad_row), _padded(positions, t_bucket, -1),
                         block_size=sim.block_size)
    assert slots.dtype == jnp.int32
    assert np.array_equal(np.asarray(slots)[:t], md.slot_mapping)
    assert (np.asarray(slots)[t:] == -1).all()
    if not batch.all_exact:
        return False
    fi = attnsync.build(batch, "flashinfer")
    # indptr padded with its last value: the padding rows own no pages
    indptr = _padded(fi.paged_kv_indptr, r_bucket + 1, fi.num_pages)
    size = bucket_count(fi.num_pages, 16)
    indices = np.asarray(paged_kv_indices(table, indptr, rows_b, size=size))
    assert np.array_equal(indices[: fi.num_pages], fi.paged_kv_indices)
    assert not indices[fi.num_pages :].any()
    return True


def test_simulated_scheduler_jax_cpu():
    """1,000 steps of bucketed records: the JAX table equals the mirror and the table rebuilt
    from the scheduler's dict after every step, the derived fields equal the host build, and
    the jitted apply compiled for a few dozen bucket combinations only."""
    sim = Scheduler(seed=7, pad_records=True)
    device = JaxBlockTable(sim.state)
    before = jax_block_table._apply._cache_size()
    compared = 0
    with jax.transfer_guard("disallow"):
        for _ in range(STEPS):
            step = sim.step()
            flat = jax.device_put(np.array(step.updates.flat))
            device.apply(step.updates.header, flat)
            table = np.asarray(jax.device_get(device.table))
            assert np.array_equal(table, sim.state.mirror)
            assert np.array_equal(table, sim.table_from_scratch())
            with jax.transfer_guard("allow"):  # the checks below move host arrays implicitly
                compared += check_derived(sim, step, device.table)
    compiles = jax_block_table._apply._cache_size() - before
    assert 1 <= compiles <= 24, compiles
    assert compared > STEPS // 2


def test_unpadded_records_apply_too():
    sim = Scheduler(seed=8, pad_records=False)
    device = JaxBlockTable(sim.state)
    for _ in range(40):
        device.apply_record(sim.step().updates)
        assert np.array_equal(np.asarray(device.table), sim.state.mirror)


def test_apply_donates_the_old_table():
    state = BlockTableState(max_rows=4, width=8, num_cache_pages=50)
    device = JaxBlockTable(state)
    old = device.table
    state.add(0, [1, 2])
    device.apply_record(state.take_updates(pad=True))
    assert old.is_deleted()  # updated in place: the old buffer went to the new table
    assert np.asarray(device.table).tolist()[0] == [1, 2, 0, 0, 0, 0, 0, 0]
    kept = device.rows(1, version=state.version)  # a new array: survives the next apply
    state.append(0, [3])
    device.apply_record(state.take_updates(pad=True))
    assert np.asarray(kept).tolist() == [[1, 2, 0, 0, 0, 0, 0, 0]]
    assert np.asarray(device.table).tolist()[0] == [1, 2, 3, 0, 0, 0, 0, 0]


def test_version_and_shape_refusals_write_nothing():
    state = BlockTableState(max_rows=4, width=8, num_cache_pages=50)
    device = JaxBlockTable(state)
    state.add(0, [1, 2])
    first = state.take_updates(pad=True)
    device.apply_record(first)
    before = np.asarray(device.table).copy()
    with pytest.raises(SpecError, match="already at version 1: it was applied before"):
        device.apply_record(first)
    state.move(0, 3)
    second = state.take_updates(pad=True)
    state.append(3, [4])
    third = state.take_updates(pad=True)
    with pytest.raises(SpecError, match="versions 1 to 2 were never applied"):
        device.apply_record(third)
    with pytest.raises(SpecError, match="built against version 3, but the table is at version 1"):
        device.rows(2, version=state.version)
    with pytest.raises(SpecError, match="flat update vector has"):
        device.apply(second.header, jnp.asarray(second.flat[:-1]))
    with pytest.raises(TypeError, match="1-D int32 jax.Array"):
        device.apply(second.header, np.array(second.flat))
    assert np.array_equal(np.asarray(device.table), before) and device.version == 1
    device.apply_record(second)
    device.apply_record(third)
    assert np.array_equal(np.asarray(device.table), state.mirror)
    state.remove(3)
    with pytest.raises(SpecError, match="changes no record was taken for"):
        JaxBlockTable(state)


def test_empty_batch_derivations():
    state = BlockTableState(max_rows=3, width=4, num_cache_pages=20)
    device = JaxBlockTable(state)
    empty = np.zeros(0, dtype=np.int32)
    assert paged_kv_indices(device.table, np.zeros(1, dtype=np.int32), empty, size=4).tolist() == [0] * 4
    assert slot_mapping(device.table, empty, empty, block_size=16).shape == (0,)
    assert row_pages(device.table, empty).shape == (0, 4)
