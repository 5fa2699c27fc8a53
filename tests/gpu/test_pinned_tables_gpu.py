"""Lowerings that copy a batch's pinned block table (`stager.table_memory`), on a GPU.

`attnsync.Batch(..., table_memory=stager.table_memory)` copies a table of 64 KB or more into a
pinned block of that CUDA stager (attnsync/adapters/_pinned_tables.py); a lowering through the
stager then packs the other fields after the table, in the block, and copies the block. These
tests check the values on the device, the one copy, no sync or stall, and the guard that keeps
a block from being handed out (or packed) again while a copy may still read it: with the guard
taken away, the same loop corrupts, so the test can fail.

Whether a lowering copied the block is read from `PinnedTables.block_of`, which the stager asks
once per lowering: a spy on the instance counts the blocks it returned.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.gpu

ROWS, WIDTH, PAGE = 256, 512, 16  # a 512 KB table: above PinnedTables' 64 KB minimum


@pytest.fixture(scope="module")
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


class BlockSpy:
    """Counts what `memory.block_of` returned to the stager: blocks (the lowering copied the
    batch's block) and None (it packed the usual way)."""

    def __init__(self, memory: ast.PinnedTables) -> None:
        self.blocks = self.declined = 0
        real = memory.block_of

        def block_of(table, nbytes):
            block = real(table, nbytes)
            if block is None:
                self.declined += 1
            else:
                self.blocks += 1
            return block

        memory.block_of = block_of


def in_a_block(memory: ast.PinnedTables, table: np.ndarray) -> bool:
    """Whether `table` lies in one of `memory`'s blocks (asked past the spy, so not counted)."""
    return ast.PinnedTables.block_of(memory, table, 0) is not None


def new_stager(device) -> tuple[ast.Stager, BlockSpy]:
    stager = ast.Stager(device)
    assert isinstance(stager.table_memory, ast.PinnedTables)
    return stager, BlockSpy(stager.table_memory)


def decode_inputs(step: int) -> dict:
    seq = 1 + (step * 37 + np.arange(ROWS) * 13) % (WIDTH * PAGE)
    table = ((step * 7919 + np.arange(ROWS * WIDTH, dtype=np.int64)) % (1 << 20)).astype(np.int32)
    return dict(query_lens=np.ones(ROWS, np.int32), seq_lens=seq.astype(np.int32),
                block_table=table.reshape(ROWS, WIDTH), block_size=PAGE)


def decode_batch(step: int, memory) -> attnsync.Batch:
    return attnsync.Batch(**decode_inputs(step), table_memory=memory)


def expected_of(md) -> np.ndarray:
    return np.concatenate([md.query_start_loc, md.seq_lens, md.block_table.ravel(), md.slot_mapping]).astype(np.int64)


def got_of(out) -> torch.Tensor:
    return torch.cat([out.query_start_loc.long(), out.seq_lens.long(), out.block_table_tensor.reshape(-1).long(),
                      out.slot_mapping])


def test_lowerings_copy_the_pinned_table_and_are_right(cuda):
    stager, spy = new_stager(cuda)
    memory = stager.table_memory
    for step in range(40):
        batch = decode_batch(step, memory)
        assert in_a_block(memory, batch.block_table), "the table went to a pinned block"
        md = attnsync.build(batch)
        out = ast.lower(md, cuda, stager=stager)
        np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(md), err_msg=f"step {step}")
        np.testing.assert_array_equal(out.seq_lens_cpu_upper_bound.numpy(), md.seq_lens)
        np.testing.assert_array_equal(out.query_start_loc_cpu.numpy(), md.query_start_loc)
        assert out.max_seq_len == md.max_seq_len and out.num_reqs == ROWS
        del batch, md, out
    # every step's copy was read back before the next batch: each block was free and copied
    assert spy.blocks == 40 and spy.declined == 0, "every lowering copied its batch's block"
    assert memory.blocks <= 4, "blocks are handed out again once nothing views them"
    assert stager.stats.copies == 40
    plain = attnsync.Batch(**decode_inputs(0))  # no table_memory: numpy memory, packed as usual
    assert not in_a_block(memory, plain.block_table)
    out = ast.lower(attnsync.build(plain), cuda, stager=stager)
    np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(attnsync.build(plain)))
    assert spy.declined == 1


def test_one_copy_no_sync_no_stall_with_a_pinned_table(cuda, record_property):
    stager, spy = new_stager(cuda)
    batch = decode_batch(1, stager.table_memory)
    for _ in range(3):  # the ring's slots made
        ast.lower(attnsync.build(batch), cuda, stager=stager)
    torch.cuda.synchronize()
    copies, blocks = stager.stats.copies, spy.blocks
    count, out = count_h2d_copies(lambda: ast.lower(attnsync.build(batch), cuda, stager=stager))
    assert count == 1 and stager.stats.copies == copies + 1
    assert spy.blocks == blocks + 1, "the lowering copied the block"
    np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(attnsync.build(batch)))
    del out
    steps = [decode_batch(100 + k, stager.table_memory) for k in range(4)]

    def step():
        for b in steps:
            ast.lower(attnsync.build(b), cuda, stager=stager)

    blocks = spy.blocks
    with no_sync():
        # twice: each batch's block is guarded by its own copy's event, not the ring slot's,
        # so lowering it again in the next call does not wait for the slot's last copy
        assert_no_host_stall(step, budget_ms=5.0)
        assert_no_host_stall(step, budget_ms=5.0)
        elapsed, _ = host_time_under_busy_gpu(step)
    assert spy.blocks - blocks >= 8, "the timed lowerings copied blocks"
    # four 256-decode build + torch lowerings of pinned tables, for the GPU report's stall table
    record_property("host_ms_under_50ms_busy_gpu_4_steps", round(elapsed, 3))


def run_delayed(cuda, steps: int) -> tuple[int, BlockSpy, ast.Stager]:
    """`steps` batches made in the loop from arrays prepared before it (so the host outruns the
    GPU), each lowered behind ~2 ms of queued GPU work and dropped at once; every step's device
    values compared in stream order with an upload made before the loop. Returns (mismatching
    values, the spy, the stager)."""
    stager, spy = new_stager(cuda)
    memory = stager.table_memory
    inputs = [decode_inputs(1000 + k) for k in range(steps)]
    expected = torch.from_numpy(np.stack([expected_of(attnsync.build(attnsync.Batch(**i))) for i in inputs])).to(cuda)
    # the stall probe's own calibration; 2 ms a step keeps the host (about 0.15 ms a step on the
    # H100 host) far enough ahead that all 16 blocks the pool may hold are pending at times
    cycles = _calibrated_cycles(torch, 2.0)
    mismatches = torch.zeros((), dtype=torch.int64, device=cuda)
    torch.cuda.synchronize()
    for k in range(steps):
        torch.cuda._sleep(cycles)
        out = ast.lower(attnsync.build(attnsync.Batch(**inputs[k], table_memory=memory)), cuda, stager=stager)
        mismatches += (got_of(out) != expected[k]).sum()
        del out
    torch.cuda.synchronize()
    return int(mismatches.item()), spy, stager


def test_pinned_tables_under_a_delayed_stream(cuda):
    wrong, spy, stager = run_delayed(cuda, 120)
    assert wrong == 0
    assert spy.blocks > 0, "some lowerings copied a block while earlier copies were queued"
    # the host ran ahead: every block's copy was pending at some point, so some batches got
    # no block (or a block not yet copied) and their lowerings packed the usual way
    assert spy.declined > 0
    assert spy.blocks + spy.declined == 120 and stager.stats.copies == 120


def test_without_the_copy_guard_the_same_loop_corrupts(cuda, monkeypatch):
    # Every block counts as copied: one given back is handed out again, and packed, while its
    # last copy is still queued, so the next batch's table overwrites memory that copy has
    # still to read.
    monkeypatch.setattr(_pinned_tables._Block, "copied", lambda block: True)
    wrong, spy, _ = run_delayed(cuda, 120)
    assert spy.blocks > 0
    assert wrong > 0, "the unguarded blocks must corrupt, or the guarded test proves nothing"


@pytest.mark.multigpu
def test_a_pinned_table_lowers_to_two_devices(cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    stagers = [new_stager(device) for device in devices]
    for step in range(6):  # the rings' slots reused from the third step on
        for owner in (0, 1):  # the table in cuda:0's stager's blocks, then in cuda:1's
            batch = decode_batch(500 + step, stagers[owner][0].table_memory)
            md = attnsync.build(batch)
            outs = ast.lower_replicated(md, devices, stagers=[s for s, _ in stagers])
            for device, out in zip(devices, outs, strict=True):
                assert out.block_table_tensor.device == device
                np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(md),
                                              err_msg=f"{device} step {step} owner {owner}")
            del outs
            with torch.cuda.device(1):  # cuda:1 current
                out = ast.lower(md, devices[1], stager=stagers[1][0])
                np.testing.assert_array_equal(got_of(out).cpu().numpy(), expected_of(md))
            del out, md, batch
    # each stager copied the blocks of its own tables only: one of its two lowerings of
    # cuda:1's tables per step plus the replicated one, and cuda:0's once per step
    assert stagers[0][1].blocks == 6 and stagers[1][1].blocks == 12
    assert stagers[0][0].stats.copies == 12 and stagers[1][0].stats.copies == 24
