"""Lowerings that copy a batch's pinned block table (attnsync/adapters/_pinned_tables.py), on a GPU.

A table of 64 KB or more that `Batch` copied into a pinned block is not packed again: a reused
lowering packs the other fields after it and copies the block. These tests check the values
on the device, the one copy, no sync or stall, and the guard that keeps a block from being
handed out again while a copy may still read it (with the guard taken away, the same loop
corrupts: the test can fail).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import attnsync
from attnsync.testing import (
    _calibrated_cycles,
    assert_no_host_stall,
    count_h2d_copies,
    host_time_under_busy_gpu,
    no_sync,
)

torch = pytest.importorskip("torch")
from attnsync.adapters import _pinned_tables  # noqa: E402
from attnsync.adapters import torch as ast  # noqa: E402

ROWS, WIDTH, PAGE = 256, 512, 16


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    ast.Stager(device)  # a CUDA stager installs the pool
    if _pinned_tables.POOL is None:
        pytest.skip("ATTNSYNC_PINNED_TABLES=0 here")
    return device


def decode_batch(step: int) -> attnsync.Batch:
    seq = 1 + (step * 37 + np.arange(ROWS) * 13) % (WIDTH * PAGE)
    table = ((step * 7919 + np.arange(ROWS * WIDTH, dtype=np.int64)) % (1 << 20)).astype(np.int32)
    return attnsync.Batch(query_lens=np.ones(ROWS, np.int32), seq_lens=seq.astype(np.int32),
                          block_table=table.reshape(ROWS, WIDTH), block_size=PAGE)


def expected_of(md) -> np.ndarray:
    return np.concatenate([md.query_start_loc, md.seq_lens, md.block_table.ravel(), md.slot_mapping]).astype(np.int64)


def got_of(out) -> torch.Tensor:
    return torch.cat([out.query_start_loc.long(), out.seq_lens.long(), out.block_table_tensor.reshape(-1).long(),
                      out.slot_mapping])


@pytest.mark.gpu
def test_lowerings_copy_the_pinned_table_and_are_right(cuda):
    pool = _pinned_tables.POOL
    copies = pool.copies
    for step in range(40):
        batch = decode_batch(step)
        assert pool.block_of(batch.block_table, 0) is not None, "the table went to a pinned block"
        md = attnsync.build(batch)
        out = ast.lower(md, cuda)
        np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(md), err_msg=f"step {step}")
        np.testing.assert_array_equal(out.seq_lens_cpu_upper_bound.numpy(), md.seq_lens)
        assert out.max_seq_len == md.max_seq_len and out.num_reqs == ROWS
        del batch, md, out
    assert pool.copies - copies >= 35, "reused lowerings copy the block (the first two of a pool are fresh)"
    assert len(pool.blocks) <= 4, "blocks are handed out again once nothing views them"


@pytest.mark.gpu
def test_one_copy_no_sync_no_stall_with_a_pinned_table(cuda, record_property):
    pool = _pinned_tables.POOL
    batch = decode_batch(1)
    for _ in range(3):  # the pool's entries made
        ast.lower(attnsync.build(batch), cuda)
    torch.cuda.synchronize()
    copies = pool.copies
    count, out = count_h2d_copies(lambda: ast.lower(attnsync.build(batch), cuda))
    assert count == 1 and pool.copies == copies + 1
    np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(attnsync.build(batch)))
    del out
    steps = [decode_batch(100 + k) for k in range(4)]

    def step():
        for b in steps:
            ast.lower(attnsync.build(b), cuda)

    with no_sync():
        # twice: a block's guard must be its own copy, not the entry's event, which the next
        # lowering re-records (the second call stalled 50 ms when blocks shared it: run 77)
        assert_no_host_stall(step, budget_ms=5.0)
        assert_no_host_stall(step, budget_ms=5.0)
        elapsed, _ = host_time_under_busy_gpu(step)
    # four 256-decode build + torch lowerings of pinned tables, for the GPU report's stall table
    record_property("host_ms_under_50ms_busy_gpu_4_steps", round(elapsed, 3))


def run_delayed(cuda, steps: int) -> tuple[int, int]:
    """`steps` batches made from arrays prepared before the loop (so the host outruns the GPU),
    each lowered behind ~1 ms of queued GPU work and dropped at once; every step's device values
    compared in stream order with an upload made before the loop. Returns (mismatching values,
    lowerings that copied a block)."""
    pool = _pinned_tables.POOL
    inputs = []
    for k in range(steps):
        b = decode_batch(1000 + k)
        inputs.append(dict(query_lens=np.array(b.query_lens), seq_lens=np.array(b.seq_lens),
                           block_table=np.array(b.block_table), block_size=PAGE))
    expected = torch.from_numpy(np.stack([expected_of(attnsync.build(attnsync.Batch(**i))) for i in inputs])).to(cuda)
    cycles = _calibrated_cycles(torch, 1.0)  # the stall probe's own calibration
    mismatches = torch.zeros((), dtype=torch.int64, device=cuda)
    copies = pool.copies
    torch.cuda.synchronize()
    for k in range(steps):
        torch.cuda._sleep(cycles)
        out = ast.lower(attnsync.build(attnsync.Batch(**inputs[k])), cuda)
        mismatches += (got_of(out) != expected[k]).sum()
        del out
    torch.cuda.synchronize()
    return int(mismatches.item()), pool.copies - copies


@pytest.mark.gpu
def test_pinned_tables_under_a_delayed_stream(cuda):
    pool = _pinned_tables.POOL
    declined = pool.declined
    wrong, copied = run_delayed(cuda, 120)
    assert wrong == 0
    assert copied > 0, "some lowerings copied a block while earlier copies were queued"
    assert pool.declined > declined, "the host ran ahead: every block's copy was pending at some point"


@pytest.mark.gpu
def test_without_the_copy_guard_the_same_loop_corrupts(cuda, monkeypatch):
    # A block handed out again as soon as nothing views it, its last copy pending or not: the
    # next batch's table overwrites memory a queued copy has still to read.
    monkeypatch.setattr(_pinned_tables._Block, "free", lambda block: sys.getrefcount(block.whole) == block.baseline)
    monkeypatch.setattr(_pinned_tables, "_event_query", lambda event: True)
    wrong, copied = run_delayed(cuda, 120)
    assert copied > 0
    assert wrong > 0, "the unguarded pool must corrupt, or the guarded test proves nothing"


@pytest.mark.gpu
@pytest.mark.multigpu
def test_a_pinned_table_lowers_to_two_devices(cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    for step in range(6):  # the pools' entries reused from the third step on
        md = attnsync.build(decode_batch(500 + step))
        outs = ast.lower_replicated(md, devices)
        for device, out in zip(devices, outs):
            assert out.block_table_tensor.device == device
            np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(md), err_msg=f"{device} step {step}")
        with torch.cuda.device(1):  # cuda:1 current: its stager's compiled step may run
            out = ast.lower(md, devices[1])
            np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(md))
