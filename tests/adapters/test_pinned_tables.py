"""The pinned block-table memory a CUDA stager owns (attnsync/adapters/_pinned_tables.py).

On the CPU the blocks are plain host memory (`pin_memory=False`) and events are stand-ins: what
is checked is the bookkeeping (which tables get a block, when a block is handed out again, what
a lowering may pack into). The copies themselves are checked on a GPU
(tests/gpu/test_pinned_tables_gpu.py).
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from attnsync._staging import pack_fields, plan_layout  # noqa: E402
from attnsync.adapters import _pinned_tables  # noqa: E402


class FakeEvent:
    """A CUDA event stand-in: `pending` until the test says the copy has run."""

    def __init__(self) -> None:
        self.pending = False

    def query(self) -> bool:
        return not self.pending

    def record(self, stream=None) -> None:
        self.pending = True


def make_pool(**options) -> _pinned_tables.PinnedTables:
    return _pinned_tables.PinnedTables(pin_memory=False, event=FakeEvent, **options)


def test_a_large_table_gets_a_writable_block_and_a_small_one_does_not():
    pool = make_pool()
    table = pool.table_buffer((256, 512))
    assert table.shape == (256, 512) and table.dtype == np.int32 and table.flags.c_contiguous
    assert table.flags.writeable and pool.blocks == 1
    assert pool.table_buffer((4, 8)) is None  # below min_table_bytes: numpy memory does
    assert pool.blocks == 1


def test_a_block_comes_back_only_when_no_view_of_its_table_is_alive():
    pool = make_pool()
    table = pool.table_buffer((256, 512))
    address = table.ctypes.data
    row = table[3]  # a view keeps the block
    del table
    gc.collect()
    second = pool.table_buffer((256, 512))
    assert second.ctypes.data != address and pool.blocks == 2
    del row, second
    gc.collect()
    third = pool.table_buffer((256, 512))
    assert third.ctypes.data in {b.host.ctypes.data for b in pool._blocks}
    assert pool.blocks == 2  # a free block was handed out again


def test_a_block_whose_copy_is_pending_is_not_handed_out_again():
    pool = make_pool()
    table = pool.table_buffer((256, 512))
    block = pool.block_of(table, table.nbytes)
    assert block is not None
    block.event.record()  # a copy from it is queued
    del table
    gc.collect()
    other = pool.table_buffer((256, 512))
    assert pool.blocks == 2 and other.ctypes.data != block.host.ctypes.data
    block.event.pending = False  # the copy ran
    del other
    gc.collect()
    again = pool.table_buffer((256, 512))
    assert pool.blocks == 2 and again is not None


def test_block_of_knows_only_its_own_tables_at_their_start():
    pool = make_pool()
    table = pool.table_buffer((256, 512))
    assert pool.block_of(table, table.nbytes) is not None
    assert pool.block_of(table[:128], table.nbytes) is not None  # the first rows: still at the start
    assert pool.block_of(table[1:], table.nbytes) is None  # not at the block's start
    assert pool.block_of(np.zeros((256, 512), np.int32), 1 << 20) is None  # numpy memory
    block = pool.block_of(table, table.nbytes)
    assert pool.block_of(table, block.capacity + 1) is None  # a step larger than the block
    block.event.record()
    assert pool.block_of(table, table.nbytes) is None  # its tail may still be in a copy


def test_the_pool_declines_beyond_its_limits():
    pool = make_pool(max_blocks=2)
    held = [pool.table_buffer((256, 512)) for _ in range(2)]
    assert pool.table_buffer((256, 512)) is None and pool.blocks == 2
    small = make_pool(max_bytes=1 << 20)
    assert small.table_buffer((256, 512)) is None  # one block would be 1.5 MB
    del held


def test_targets_are_the_layout_fields_after_the_table_then_the_mirrors():
    pool = make_pool()
    table = pool.table_buffer((256, 512))
    table[:] = 7
    layout = plan_layout([("block_table", (256, 512), np.int32), ("seq_lens", (256,), np.int32),
                          ("slot_mapping", (256,), np.int64)])
    block = pool.block_of(table, layout.nbytes)
    mirror = (np.zeros(256, np.int32),)
    targets = block.targets(layout, mirror)
    assert len(targets) == 3 and targets[-1] is mirror[0]
    pack_fields(targets, (np.arange(256, dtype=np.int32), np.arange(256, dtype=np.int32),
                                         np.ones(256, np.int32)))
    raw = block.host
    seq = raw[layout.entry("seq_lens").offset:][:1024].view(np.int32)
    slots = raw[layout.entry("slot_mapping").offset:][:2048].view(np.int64)
    np.testing.assert_array_equal(seq, np.arange(256))
    np.testing.assert_array_equal(slots, np.arange(256))
    np.testing.assert_array_equal(table, 7)  # the table itself is untouched
    assert block.source(layout.nbytes).numel() == layout.nbytes


def test_tables_made_in_threads_get_distinct_blocks():
    pool = make_pool(max_blocks=8)
    out: list = []
    lock = threading.Lock()

    def make():
        table = pool.table_buffer((256, 512))
        with lock:
            out.append(table)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({t.ctypes.data for t in out}) == 8


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["make", "drop", "view", "drop_view", "copy", "copied"]),
                          st.integers(0, 5)), max_size=40))
def test_live_tables_keep_their_values_and_never_share_a_block(ops):
    """Any order of making and dropping tables, holding views and pending copies: every live
    table keeps its values, no two live tables share a block, and the pool stays in limits."""
    pool = make_pool(max_blocks=4)
    live: list[tuple[np.ndarray, int]] = []
    views: list[tuple[np.ndarray, int]] = []
    for step, (op, k) in enumerate(ops):
        if op == "make":
            table = pool.table_buffer((64, 512))
            if table is not None:
                table[:] = step
                live.append((table, step))
        elif op == "drop" and live:
            live.pop(k % len(live))
        elif op == "view" and live:
            table, value = live[k % len(live)]
            views.append((table[1:3], value))
        elif op == "drop_view" and views:
            views.pop(k % len(views))
        elif op in ("copy", "copied") and live:
            block = pool.block_of(live[k % len(live)][0], 1)
            if block is not None:
                block.event.pending = op == "copy"
        gc.collect()
        for table, value in live + views:
            assert (table == value).all()
        starts = [t.ctypes.data for t, _ in live]
        assert len(set(starts)) == len(starts)
        assert pool.blocks <= 4


def test_a_batch_copies_its_table_into_the_block_and_builds_keep_it_there():
    """`Batch(table_memory=pool)`: the batch's own table is the block's, and so is the common and
    FlashInfer metadata's (unpadded: the same array), which is what a CUDA lowering copies from."""
    import attnsync

    pool = make_pool()
    rng = np.random.default_rng(0)
    table = rng.integers(1, 1000, (256, 512)).astype(np.int32)
    batch = attnsync.Batch(query_lens=np.ones(256, np.int32), seq_lens=np.full(256, 100, np.int32),
                           block_table=table, block_size=16, table_memory=pool)
    np.testing.assert_array_equal(batch.block_table, table)
    assert pool.block_of(batch.block_table, 1) is not None
    for backend in ("common", "flashinfer"):
        md = attnsync.build(batch, backend=backend)
        assert pool.block_of(md.block_table, 1) is not None, backend
    padded = attnsync.build(attnsync.Batch(query_lens=np.ones(256, np.int32), seq_lens=np.full(256, 100, np.int32),
                                           block_table=table, block_size=16, padded_num_reqs=260, table_memory=pool))
    assert pool.block_of(padded.block_table, 1) is None  # a padded copy is numpy's: packed the usual way
