"""The pool of pinned blocks Batch copies large block tables into (attnsync/adapters/_pinned_tables.py).

Here on the CPU the blocks are plain host memory (`pin_memory=False`): what is checked is the
bookkeeping (which tables go to a block, when a block is handed out again, what a lowering may
copy from) and that batches and builds are the same with and without the pool. The copies
themselves are checked on a GPU (tests/gpu/test_pinned_tables_gpu.py).
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnsync
from attnsync import _accel, _batch

torch = pytest.importorskip("torch")
from attnsync.adapters import _pinned_tables  # noqa: E402
from attnsync.adapters import torch as ast  # noqa: E402

needs_native = pytest.mark.skipif(_accel.native is None, reason="Batch copies into the pool through attnsync._native")


def decode_inputs(seed: int, *, rows: int = 256, width: int = 512, page: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, width * page + 1, rows).astype(np.int32)
    table = rng.integers(0, 1 << 20, (rows, width)).astype(np.int32)
    return dict(query_lens=np.ones(rows, np.int32), seq_lens=seq, block_table=table, block_size=page)


def decode_batch(seed: int, **shape: int) -> attnsync.Batch:
    return attnsync.Batch(**decode_inputs(seed, **shape))


@pytest.fixture
def pool(monkeypatch):
    """A CPU pool in place of whatever is installed (restored afterwards)."""
    pool = _pinned_tables.PinnedTables(pin_memory=False, max_blocks=3)
    monkeypatch.setattr(_batch, "table_memory", pool)
    monkeypatch.setattr(_pinned_tables, "POOL", pool)
    return pool


def block_of_batch(pool, batch):
    return pool.block_of(batch.block_table, 0)


@needs_native
def test_a_large_table_is_copied_into_a_block(pool):
    inputs = decode_inputs(0)
    batch = attnsync.Batch(**inputs)
    block = block_of_batch(pool, batch)
    assert block is not None and pool.handed_out == 1 and len(pool.blocks) == 1
    assert batch.block_table.base is block.whole and not batch.block_table.flags.writeable
    np.testing.assert_array_equal(batch.block_table, inputs["block_table"])
    assert block.capacity >= _pinned_tables.block_bytes(batch.block_table.nbytes)


@needs_native
def test_small_tables_and_other_dtypes_keep_numpy_memory(pool):
    small = decode_batch(1, rows=8, width=8)
    assert block_of_batch(pool, small) is None and pool.handed_out == 0
    wide = attnsync.Batch(query_lens=np.ones(256, np.int64), seq_lens=np.full(256, 5, np.int64),
                          block_table=np.zeros((256, 512), np.int64), block_size=16)
    assert wide.block_table.dtype == np.int32 and pool.handed_out == 0  # numpy checks made it


@needs_native
def test_a_block_is_handed_out_again_only_when_nothing_views_it(pool):
    first = decode_batch(0)
    block = block_of_batch(pool, first)
    md = attnsync.build(first)
    assert md.block_table is first.block_table  # the build shares it: the block stays in use
    row = first.block_table[3]
    del first
    gc.collect()
    second = decode_batch(1)
    assert block_of_batch(pool, second) is not block  # md and the row still view the block
    del md
    third = decode_batch(2)
    assert block_of_batch(pool, third) is not block  # the row alone does too
    assert row.base is block.whole
    del row, second
    fourth = decode_batch(3)
    assert block_of_batch(pool, fourth) in (block, *pool.blocks) and len(pool.blocks) == 3
    assert pool.handed_out == 4


@needs_native
def test_a_full_pool_declines_and_batches_stay_right(pool):
    kept = [decode_batch(seed) for seed in range(3)]
    assert len(pool.blocks) == 3 and pool.declined == 0
    extra = decode_batch(9)
    assert pool.declined == 1 and block_of_batch(pool, extra) is None
    again = decode_batch(9)
    np.testing.assert_array_equal(extra.block_table, again.block_table)
    assert pool.declined == 2
    del kept[0]
    taker = decode_batch(10)  # takes the freed block
    assert block_of_batch(pool, taker) is not None and pool.declined == 2 and len(pool.blocks) == 3


@needs_native
def test_a_pool_at_its_limit_replaces_a_free_block_too_small(pool):
    kept = [decode_batch(seed, rows=64) for seed in range(3)]  # 128 KB tables
    small_block = block_of_batch(pool, kept[0])
    del kept[0]
    big = decode_batch(7, rows=1024)  # 2 MB: no block fits, the free one is replaced
    assert block_of_batch(pool, big) is not None and small_block not in pool.blocks and len(pool.blocks) == 3


@needs_native
def test_a_batch_refused_after_taking_a_block_gives_it_back(pool):
    table = np.zeros((256, 512), np.int32)
    table[5, 0] = -1  # check_batch copies; the numpy checks then refuse the page id
    with pytest.raises(attnsync.SpecError, match="block_table"):
        attnsync.Batch(query_lens=np.ones(256, np.int32), seq_lens=np.full(256, 9, np.int32),
                       block_table=table, block_size=16)
    gc.collect()
    assert len(pool.blocks) == 1 and pool.blocks[0].free()


@needs_native
def test_block_of_knows_only_the_table_it_handed_out(pool, monkeypatch):
    batch = decode_batch(0)
    block = block_of_batch(pool, batch)
    table = batch.block_table
    assert pool.block_of(table, block.capacity) is block
    assert pool.block_of(table, block.capacity + 1) is None  # a lowering larger than the block
    assert pool.block_of(table[1:], 0) is None  # a view, not the table itself
    assert pool.block_of(table.copy(), 0) is None
    assert pool.block_of(np.ndarray(table.shape, np.int32, block.whole, 0), 0) is None  # same memory, another array
    pending = {"done": False}
    monkeypatch.setattr(_pinned_tables, "_event_query", lambda event: pending["done"])
    block.event = object()  # the last copy that read the block
    assert pool.block_of(table, 0) is None and not block.free()
    pending["done"] = True
    assert pool.block_of(table, 0) is block


@needs_native
@pytest.mark.parametrize("backend", ["common", "flashinfer"])
def test_builds_and_cpu_lowerings_are_the_same_with_and_without_the_pool(pool, backend):
    with_pool = decode_batch(4)
    assert block_of_batch(pool, with_pool) is not None
    _batch.table_memory = None
    without = decode_batch(4)
    assert without.block_table.base is None or without.block_table.base is not with_pool.block_table.base
    a, b = attnsync.build(with_pool, backend=backend), attnsync.build(without, backend=backend)
    for name, value in vars(b).items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(getattr(a, name), value, err_msg=name)
            assert getattr(a, name).dtype == value.dtype, name
        else:
            assert getattr(a, name) == value, name
    la, lb = ast.lower(a, "cpu"), ast.lower(b, "cpu")
    for name, value in vars(lb).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(la, name), value), name


def test_the_block_table_is_the_first_field_of_every_layout():
    md = attnsync.build(decode_batch(5, rows=4, width=4), backend="flashinfer")
    plan = ast._plan_of(md)
    room = ast._Room(plan, plan.arrays_of(md.__dict__), grow=True)
    assert room.slots[0][0] == "block_table" and room.slots[0][3] == 0
    assert plan.array_names[plan.table_index] == "block_table"


def test_install_is_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(_pinned_tables, "POOL", None)
    monkeypatch.setattr(_batch, "table_memory", None)
    monkeypatch.setenv("ATTNSYNC_PINNED_TABLES", "0")
    assert _pinned_tables.install() is None and _batch.table_memory is None
    monkeypatch.setenv("ATTNSYNC_PINNED_TABLES", "1")
    pool = _pinned_tables.install()
    assert pool is not None and _batch.table_memory is pool and _pinned_tables.install() is pool
    _pinned_tables.uninstall()
    assert _batch.table_memory is None and _pinned_tables.POOL is None


@needs_native
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["make", "drop", "view", "unview"]), st.integers(0, 7),
                              st.sampled_from([64, 128, 256])), min_size=1, max_size=30))
def test_live_tables_never_share_a_block_and_keep_their_values(ops):
    """Any order of making batches, dropping them and holding row views: every live table keeps
    its values, no two live tables share a block, and the pool stays within its limits."""
    pool = _pinned_tables.PinnedTables(pin_memory=False, max_blocks=4, max_bytes=8 << 20)
    saved = _batch.table_memory
    _batch.table_memory = pool
    try:
        live: dict[int, tuple[attnsync.Batch, np.ndarray]] = {}
        views: dict[int, np.ndarray] = {}
        for step, (op, slot, rows) in enumerate(ops):
            if op == "make":
                batch = decode_batch(step, rows=rows)
                live[slot] = (batch, batch.block_table.copy())
            elif op == "drop":
                live.pop(slot, None)
            elif op == "view" and slot in live:
                views[slot] = live[slot][0].block_table[slot % rows]
            elif op == "unview":
                views.pop(slot, None)
            blocks = [pool.block_of(batch.block_table, 0) for batch, _ in live.values()]
            placed = [id(b) for b in blocks if b is not None]
            assert len(placed) == len(set(placed)), "two live tables in one block"
            for batch, expected in live.values():
                np.testing.assert_array_equal(batch.block_table, expected)
            assert len(pool.blocks) <= pool.max_blocks
            assert sum(b.capacity for b in pool.blocks) <= pool.max_bytes
    finally:
        _batch.table_memory = saved


@needs_native
def test_batches_made_in_threads_get_their_own_blocks(pool):
    pool.max_blocks = 8
    made: dict[int, attnsync.Batch] = {}
    errors: list[BaseException] = []

    def make(k: int) -> None:
        try:
            made[k] = decode_batch(50 + k, rows=64)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    blocks = [pool.block_of(made[k].block_table, 0) for k in range(8)]
    assert all(b is not None for b in blocks) and len({id(b) for b in blocks}) == 8
    for k in range(8):
        np.testing.assert_array_equal(made[k].block_table, decode_batch(50 + k, rows=64).block_table)


@needs_native
def test_a_copied_block_is_guarded_by_its_own_event_per_device(pool, monkeypatch):
    recorded = []

    class Event:  # torch.cuda.Event's stand-in: CPU builds cannot make one
        pass

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(_pinned_tables, "_event_record", lambda event, stream: recorded.append((event, stream)))
    block = block_of_batch(pool, batch := decode_batch(0))
    pool.copied(block, "stream 0", 0)
    pool.copied(block, "stream 0b", 0)
    pool.copied(block, "stream 1", 1)
    (first, s0), (again, s0b), (other, s1) = recorded
    assert first is again and first is not other and isinstance(other, Event) and block.event is other
    assert (s0, s0b, s1) == ("stream 0", "stream 0b", "stream 1")
    assert set(block.events) == {0, 1} and pool.copies == 3
    del batch
