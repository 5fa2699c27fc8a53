"""The JAX lowering against a device-resident block table (`lower(md, ..., block_table=...)`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _block_table_sim import Scheduler

import attnsync
from attnsync._block_table import BlockTableState
from attnsync._validate import SpecError
from attnsync.adapters.jax import lower
from attnsync.adapters.jax_block_table import JaxBlockTable

STEPS = 1000
CPU = jax.devices("cpu")[0]


def _equal(a, b) -> None:
    assert type(a) is type(b) and a.layout == b.layout
    assert np.array_equal(np.asarray(a.packed), np.asarray(b.packed))


def _batch(sim, step, table, order=None):
    o = slice(None) if order is None else order
    return attnsync.Batch(
        query_lens=step.query_lens[o], seq_lens=step.seq_lens[o], block_table=table, block_size=sim.block_size,
        seq_lens_exact=step.exact[o], is_prefilling=step.is_prefilling[o],
        padded_num_reqs=40, padded_num_tokens=512)  # one bucket: the jitted assembly compiles rarely


def test_simulated_scheduler_device_table_equals_full_table():
    """1,000 steps: the device-table lowering's packed vector and layout equal the plain
    lowering's, for common and FlashInfer metadata, prefix views and gathered rows (one
    bucket of shapes; FlashInfer's exact num_pages compiles anew, so one step in ten)."""
    sim = Scheduler(seed=12, pad_records=True)
    device = JaxBlockTable(sim.state, CPU)
    seen = {"prefix": 0, "gather": 0, "flashinfer": 0}
    for i in range(STEPS):
        step = sim.step()
        state = sim.state
        if not step.exact.all():
            device.apply_record(step.updates)
            continue
        order = np.argsort(step.rows, kind="stable")
        if i % 2 and np.array_equal(step.rows[order], np.arange(step.rows.shape[0])):
            n = step.rows.shape[0]
            view = state.view(n)
            plain = attnsync.build(_batch(sim, step, state.as_batch_table(n), order))
            got = lower(attnsync.build(_batch(sim, step, view, order)), CPU, block_table=device,
                        table_updates=step.updates, table_view=view)
            _equal(got, lower(plain, CPU))
            seen["prefix" if view.is_prefix(40) else "gather"] += 1
            continue
        view = state.view(step.rows)
        backend = "flashinfer" if i % 10 == 0 else "common"
        options = {"device_indices": True} if backend == "flashinfer" else {}
        got = lower(attnsync.build(_batch(sim, step, view), backend, **options), CPU, block_table=device,
                    table_updates=step.updates, table_view=view)
        _equal(got, lower(attnsync.build(_batch(sim, step, state.mirror[step.rows]), backend), CPU))
        seen["flashinfer" if backend == "flashinfer" else "gather"] += 1
    assert np.array_equal(np.asarray(device.table), sim.state.mirror)
    assert min(seen.values()) > 20, seen


def test_refusals_write_nothing():
    state = BlockTableState(max_rows=4, width=4, num_cache_pages=30)
    device = JaxBlockTable(state, CPU)
    state.add(0, [1, 2])
    updates = state.take_updates()
    view = state.view(1)
    md = attnsync.build(attnsync.Batch(query_lens=[1], seq_lens=[5], block_table=view, block_size=4))
    with pytest.raises(SpecError, match="pending updates were never staged"):
        lower(md, CPU, block_table=device, table_view=view)
    assert device.version == 0 and not np.asarray(device.table).any()
    got = lower(md, CPU, block_table=device, table_updates=updates, table_view=view)
    assert got.block_table.tolist() == [[1, 2, 0, 0]]
    with pytest.raises(SpecError, match="applied before"):
        lower(md, CPU, block_table=device, table_updates=updates, table_view=view)
    assert device.version == 1
    fi = attnsync.build(attnsync.Batch(query_lens=[1], seq_lens=[5], block_table=view, block_size=4),
                        "flashinfer", device_indices=True)
    with pytest.raises(SpecError, match="device_indices=True"):
        lower(fi, CPU)
    assert lower(fi, CPU, block_table=device, table_view=view).paged_kv_indices.tolist() == [1, 2]
