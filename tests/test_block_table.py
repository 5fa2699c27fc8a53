"""The host half of the device-resident block table (`attnsync._block_table`), numpy only."""

from __future__ import annotations

import dataclasses
import doctest

import numpy as np
import pytest
from _block_table_sim import Scheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import attnsync
from attnsync import _block_table
from attnsync._block_table import (
    MIN_PADDED_APPENDS,
    MIN_PADDED_COPIES,
    BlockTableState,
    BlockTableUpdates,
    UpdateHeader,
    apply_numpy,
    bucket_count,
)
from attnsync._spec import array_fields, scalar_fields
from attnsync._validate import SpecError

STEPS = 1000


def test_all_is_pinned():
    assert _block_table.__all__ == ["BlockTableState", "BlockTableUpdates", "BlockTableView", "UpdateHeader",
                                    "apply_numpy", "bucket_count"]
    for name in _block_table.__all__:
        assert getattr(_block_table, name) is not None


def test_doctests():
    assert doctest.testmod(_block_table).attempted >= 1
    assert doctest.testmod(_block_table).failed == 0


def snapshot(state: BlockTableState) -> dict:
    """Everything a verb may change, copied."""
    out = {name: np.array(getattr(state, name)) for name in
           ("_mirror", "_len", "_base_len", "_live", "_origin", "_touched")}
    out["version"], out["pending"] = state.version, state.pending
    return out


def assert_unchanged(state: BlockTableState, before: dict) -> None:
    after = snapshot(state)
    for name, value in before.items():
        assert np.array_equal(after[name], value), name


def assert_same_metadata(a, b) -> None:
    assert type(a) is type(b)
    for f in array_fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f.name
    for f in scalar_fields(a):
        assert getattr(a, f.name) == getattr(b, f.name), f.name


def numpy_slots(table: np.ndarray, token_rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """The device halves' slot mapping, in numpy."""
    column = np.clip(positions // block_size, 0, table.shape[1] - 1)
    slots = table[token_rows, column] * block_size + positions % block_size
    return np.where(positions >= 0, slots, -1).astype(np.int32)


def test_simulated_scheduler_numpy():
    """1,000 steps: the table a record-applied copy holds equals the mirror and the table
    rebuilt from the scheduler's own dict, and metadata built from the mirror equals metadata
    built from that table, for the common and FlashInfer backends."""
    sim = Scheduler(seed=1)
    state = sim.state
    device = np.zeros(state.device_shape, dtype=np.int32)
    delta_bytes = full_bytes = flashinfer_steps = 0
    for _ in range(STEPS):
        step = sim.step()
        apply_numpy(device, step.updates)
        scratch = sim.table_from_scratch()
        assert np.array_equal(device, state.mirror)
        assert np.array_equal(device, scratch)
        assert not device[state.pad_row].any()
        assert np.array_equal(state.as_batch_table(step.rows), scratch[step.rows])
        view = state.view(step.rows)
        assert np.array_equal(view.table, scratch[step.rows])
        assert (view.pages * sim.block_size >= step.seq_lens).all()  # every row fits its pages
        delta_bytes += step.updates.nbytes
        full_bytes += 4 * len(step.rows) * state.width
        ours, theirs = sim.batch(step, state.mirror), sim.batch(step, scratch)
        assert_same_metadata(attnsync.build(ours), attnsync.build(theirs))
        token_rows, positions = state.slot_inputs(ours, step.rows)
        assert np.array_equal(numpy_slots(device, token_rows, positions, sim.block_size),
                              attnsync.build(theirs).slot_mapping)
        if ours.all_exact:
            flashinfer_steps += 1
            assert_same_metadata(attnsync.build(ours, "flashinfer"), attnsync.build(theirs, "flashinfer"))
    assert set(sim.verbs) == {"add", "remove", "move", "swap", "set", "append", "append_many"}
    assert min(sim.verbs.values()) >= 20, sim.verbs
    assert flashinfer_steps > STEPS // 2
    assert state.version == STEPS
    assert delta_bytes * 4 < full_bytes, (delta_bytes, full_bytes)


def test_decode_step_sends_one_append_per_crossing_row():
    """A decode step where k rows cross a page boundary uploads k appends (12 bytes each)."""
    state = BlockTableState(max_rows=64, width=32, num_cache_pages=10_000)
    for row in range(64):
        state.add(row, list(range(1 + 10 * row, 1 + 10 * row + 5)))
    state.take_updates()
    crossing = np.arange(0, 64, 16, dtype=np.int32)
    state.append_many(crossing, 5000 + crossing)
    updates = state.take_updates()
    assert updates.num_real == (0, 0, 4)
    assert updates.nbytes == 12 * 4
    assert updates.append_rows.tolist() == crossing.tolist()
    assert updates.append_cols.tolist() == [5] * 4
    assert updates.append_pages.tolist() == (5000 + crossing).tolist()


def test_kinds_chosen_by_cost():
    """Moves and clears are copies; a row gaining a third of the width or more is one set;
    small growth is appends after its copy."""
    state = BlockTableState(max_rows=8, width=12, num_cache_pages=1000)
    state.add(0, [1, 2])
    state.add(1, [3])
    state.add(2, [4, 5, 6])
    state.take_updates()
    state.move(2, 5)
    state.append(5, [7])
    state.remove(1)
    state.add(3, list(range(10, 14)))  # 4 pages = a third of 12: a set
    updates = state.take_updates()
    assert sorted(zip(updates.copy_dst.tolist(), updates.copy_src.tolist())) == [(1, 8), (2, 8), (5, 2)]
    assert updates.set_rows.tolist() == [3]
    assert updates.set_pages.tolist() == [[10, 11, 12, 13] + [0] * 8]
    assert list(zip(updates.append_rows.tolist(), updates.append_cols.tolist(), updates.append_pages.tolist())) \
        == [(5, 3, 7)]


def test_padded_record_targets_the_pad_row_with_zeros():
    state = BlockTableState(max_rows=8, width=6, num_cache_pages=1000)
    state.add(0, [1, 2, 3])  # a set (3 >= 6 / 3)
    state.add(1, [4])
    updates = state.take_updates(pad=True)
    assert updates.num_real == (0, 1, 1)
    assert updates.header.counts == (MIN_PADDED_COPIES, 1, MIN_PADDED_APPENDS)
    pad = state.pad_row
    assert (updates.copy_src == pad).all() and (updates.copy_dst == pad).all()
    assert (updates.append_rows[1:] == pad).all()
    assert not updates.append_cols[1:].any() and not updates.append_pages[1:].any()
    device = np.zeros(state.device_shape, dtype=np.int32)
    apply_numpy(device, updates)
    assert np.array_equal(device, state.mirror)


def test_bucket_count():
    assert [bucket_count(n) for n in (0, 1, 2, 3, 4, 5, 9, 1000)] == [0, 1, 2, 4, 4, 8, 16, 1024]
    assert [bucket_count(n, 8) for n in (0, 1, 8, 9)] == [8, 8, 8, 16]


def test_record_is_read_only_and_versions_count_steps():
    state = BlockTableState(max_rows=4, width=4, num_cache_pages=100)
    first = state.take_updates()  # an empty step still advances the version
    assert (first.header.base_version, first.header.version) == (0, 1)
    assert first.nbytes == 0
    state.add(0, [9])
    assert state.pending
    second = state.take_updates()
    assert not state.pending
    assert (second.header.base_version, second.header.version, state.version) == (1, 2, 2)
    with pytest.raises(ValueError, match="read-only"):
        second.flat[0] = 1
    with pytest.raises(AttributeError):
        second.header.version = 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.flat = None


def test_as_batch_table_views_and_gathers():
    state = BlockTableState(max_rows=4, width=3, num_cache_pages=100)
    state.add(0, [1, 2])
    state.add(1, [3])
    state.take_updates()
    view = state.as_batch_table(2)
    assert view.tolist() == [[1, 2, 0], [3, 0, 0]]
    assert not view.flags.writeable
    assert state.as_batch_table([1, 0, state.pad_row]).tolist() == [[3, 0, 0], [1, 2, 0], [0, 0, 0]]
    assert state.batch_rows([1, 0], padded_num_reqs=4).tolist() == [1, 0, 4, 4]
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[5, 2], block_table=view, block_size=4)
    assert attnsync.build(batch).slot_mapping.tolist() == [2 * 4 + 0, 3 * 4 + 1]


def test_view_reads_the_mirror_in_place_until_the_next_verb():
    state = BlockTableState(max_rows=4, width=3, num_cache_pages=100)
    state.add(0, [1, 2])
    state.add(1, [3])
    state.take_updates()
    condensed = state.view(2)
    assert condensed.condensed and condensed.num_rows == 2 and condensed.version == 1
    assert condensed.table.tolist() == [[1, 2, 0], [3, 0, 0]]
    assert np.shares_memory(condensed.table, state.mirror)  # no copy
    assert condensed.pages.tolist() == [2, 1]
    gathered = state.view([1, 0, state.pad_row])
    assert not gathered.condensed
    assert gathered.table.tolist() == [[3, 0, 0], [1, 2, 0], [0, 0, 0]]
    assert gathered.pages.tolist() == [1, 2, 0]
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[5, 2], block_table=condensed.table, block_size=4)
    assert attnsync.build(batch).slot_mapping.tolist() == [2 * 4 + 0, 3 * 4 + 1]
    state.append(1, [4])
    for view in (condensed, gathered):
        with pytest.raises(SpecError, match="made at version 1, but verbs have changed the state since"):
            view.table  # noqa: B018 - the read is the test
        with pytest.raises(SpecError, match="verbs have changed the state since"):
            view.pages  # noqa: B018
    with pytest.raises(SpecError, match="view: .*record was never taken"):
        state.view(2)
    state.take_updates()
    assert state.view(2).table.tolist() == [[1, 2, 0], [3, 4, 0]]


# -- safety: every refusal names the problem and leaves the state as it was ---------------------


def _state() -> BlockTableState:
    state = BlockTableState(max_rows=4, width=4, num_cache_pages=50)
    state.add(0, [1, 2])
    state.add(1, [3])
    state.take_updates()
    state.append(0, [4])  # pending changes: a refusal must keep them too
    return state


@pytest.mark.parametrize(
    ("verb", "match"),
    [
        (lambda s: s.add(4, [5]), r"add: row 4 does not exist.*rows 0\.\.3"),
        (lambda s: s.add(-1, [5]), r"add: row -1 does not exist"),
        (lambda s: s.add(0, [5]), r"add: row 0 already holds a request.*Fix"),
        (lambda s: s.add(2, [5, 60]), r"add: pages: page id 60 at index 1 for row 2.*num_cache_pages=50"),
        (lambda s: s.add(2, [5, -3]), r"page id -3 .*>= 0"),
        (lambda s: s.add(2, [0]), r"page id 0 .*padding page"),
        (lambda s: s.add(2, [5, 6, 7, 8, 9]), r"add: row 2 would hold 5 pages.*width 4.*Fix"),
        (lambda s: s.append(2, [5]), r"append: row 2 holds no request.*Fix: add"),
        (lambda s: s.append(9, [5]), r"append: row 9 does not exist"),
        (lambda s: s.append(0, [5, 6]), r"append: row 0 would hold 5 pages \(3 \+ 2\).*width 4"),
        (lambda s: s.append(1, [50]), r"page id 50"),
        (lambda s: s.append_many([1, 2], [5, 6]), r"append_many: row 2 holds no request"),
        (lambda s: s.append_many([1, 7], [5, 6]), r"append_many: row 7 does not exist"),
        (lambda s: s.append_many([1, 1], [5, 0]), r"page id 0 at index 1"),
        (lambda s: s.append_many([1, 0, 0], [5, 6, 7]), r"append_many: row 0 would hold 5 pages"),
        (lambda s: s.append_many([1], [5, 6]), r"rows has 1 entries but pages has 2"),
        (lambda s: s.set(3, [5]), r"set: row 3 holds no request"),
        (lambda s: s.set(0, [5, 99]), r"page id 99"),
        (lambda s: s.remove(2), r"remove: row 2 holds no request"),
        (lambda s: s.move(2, 3), r"move: source row 2 holds no request"),
        (lambda s: s.move(0, 1), r"move: destination row 1 already holds a request"),
        (lambda s: s.move(0, 4), r"move: destination row 4 does not exist"),
        (lambda s: s.swap(0, 5), r"swap: row 5 does not exist"),
        (lambda s: s.as_batch_table(2), r"as_batch_table: .*record was never taken.*Fix: call take_updates"),
        (lambda s: s.batch_rows(2), r"batch_rows: .*record was never taken"),
        (lambda s: s.slot_inputs(attnsync.Batch(query_lens=[1], seq_lens=[3], block_table=[[1]], block_size=4)),
         r"slot_inputs: .*record was never taken"),
    ],
)
def test_refusals_change_nothing(verb, match):
    state = _state()
    before = snapshot(state)
    with pytest.raises(SpecError, match=match):
        verb(state)
    assert_unchanged(state, before)


def test_row_index_refusals():
    state = _state()
    state.take_updates()
    before = snapshot(state)
    with pytest.raises(SpecError, match=r"rows: row 2 of the first 3 holds no request.*not condensed"):
        state.as_batch_table(3)
    with pytest.raises(SpecError, match=r"rows: table row 3 holds no request"):
        state.as_batch_table([0, 3])
    with pytest.raises(SpecError, match=r"rows: row 5 does not exist"):
        state.batch_rows([0, 5])
    with pytest.raises(SpecError, match=r"padded_num_reqs: expected an int >= 2"):
        state.batch_rows([0, 1], padded_num_reqs=1)
    assert_unchanged(state, before)


def test_type_refusals():
    state = _state()
    before = snapshot(state)
    with pytest.raises(TypeError, match="add: row: expected an int row index"):
        state.add(1.0, [5])
    with pytest.raises(TypeError, match="expected integers, received floats"):
        state.add(2, [5.5])
    with pytest.raises(TypeError, match="bool"):
        state.remove(True)
    assert_unchanged(state, before)


def test_constructor_refusals():
    with pytest.raises(SpecError, match="max_rows"):
        BlockTableState(0, 4, 10)
    with pytest.raises(SpecError, match="num_cache_pages: 1 leaves no assignable page"):
        BlockTableState(4, 4, 1)
    state = BlockTableState(4, 4, 1, null_page=False)
    state.add(0, [0])  # page 0 is a real page then
    assert state.take_updates().num_real == (0, 0, 1)


def test_page_zero_allowed_without_null_page():
    state = BlockTableState(max_rows=2, width=2, num_cache_pages=3, null_page=False)
    state.add(1, [0, 2])
    device = np.zeros(state.device_shape, dtype=np.int32)
    apply_numpy(device, state.take_updates())
    assert device.tolist() == [[0, 0], [0, 2], [0, 0]]


def _tampered(updates: BlockTableUpdates, name: str, index: int, value: int) -> BlockTableUpdates:
    flat = np.array(updates.flat)
    start, _ = updates.header.offsets[_block_table.PARTS.index(name)]
    flat[start + index] = value
    return BlockTableUpdates(updates.header, flat, updates.num_real)


def test_apply_numpy_refuses_malformed_records_and_writes_nothing():
    state = BlockTableState(max_rows=4, width=8, num_cache_pages=50)
    state.add(0, [1])
    state.add(1, [2])
    device = np.zeros(state.device_shape, dtype=np.int32)
    apply_numpy(device, state.take_updates())
    state.move(1, 2)
    state.append_many([0, 0], [7, 8])
    updates = state.take_updates(pad=True)
    assert updates.num_real == (2, 0, 2)
    assert updates.copy_dst[:2].tolist() == [1, 2]
    cases = [
        (_tampered(updates, "copy_dst", 0, 9), r"copy_dst: row 9 is outside \[0, 4\]"),
        (_tampered(updates, "append_cols", 0, 8), r"append_cols: a column is outside \[0, 8\)"),
        (_tampered(updates, "append_pages", 0, -2), r"append_pages: page id -2 is negative"),
        (_tampered(updates, "append_cols", 1, 1), r"a table cell is appended to more than once"),
        (_tampered(updates, "copy_dst", 1, 1), r"a row is copied to or set more than once"),
        (_tampered(updates, "copy_src", 3, 0), r"a copy into the pad row from another row"),
        (_tampered(updates, "append_pages", 5, 3), r"a padding entry writes a non-zero page"),
    ]
    for bad, match in cases:
        before = device.copy()
        with pytest.raises(SpecError, match=match):
            apply_numpy(device, bad)
        assert np.array_equal(device, before)
    with pytest.raises(SpecError, match=r"table: expected shape \(5, 8\)"):
        apply_numpy(np.zeros((4, 8), dtype=np.int32), updates)
    short = BlockTableUpdates(updates.header, updates.flat[:-1], updates.num_real)
    with pytest.raises(SpecError, match="flat update vector has"):
        apply_numpy(device, short)
    other = updates.header._replace(width=6)
    with pytest.raises(SpecError, match=r"expected shape \(5, 6\)"):
        apply_numpy(device, BlockTableUpdates(other, updates.flat, updates.num_real))
    apply_numpy(device, updates)  # the untampered record still applies
    assert np.array_equal(device, state.mirror)


def test_require_next():
    header = UpdateHeader(3, 4, 0, 0, 0, 4, 2)
    _block_table._require_next(3, header, "apply")
    with pytest.raises(SpecError, match="already at version 4: it was applied before"):
        _block_table._require_next(4, header, "apply")
    with pytest.raises(SpecError, match="versions 1 to 3 were never applied"):
        _block_table._require_next(1, header, "apply")


# -- property: random verb sequences ------------------------------------------------------------

VERBS = st.one_of(
    st.tuples(st.just("add"), st.integers(-1, 6), st.lists(st.integers(-1, 40), max_size=6)),
    st.tuples(st.just("append"), st.integers(-1, 6), st.lists(st.integers(0, 40), max_size=3)),
    st.tuples(st.just("append_many"), st.lists(st.integers(-1, 6), max_size=5), st.integers(1, 39)),
    st.tuples(st.just("set"), st.integers(0, 6), st.lists(st.integers(1, 39), max_size=5)),
    st.tuples(st.just("remove"), st.integers(-1, 6)),
    st.tuples(st.just("move"), st.integers(0, 6), st.integers(0, 6)),
    st.tuples(st.just("swap"), st.integers(0, 5), st.integers(0, 5)),
    st.tuples(st.just("take"), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(VERBS, max_size=40))
def test_random_verb_sequences(ops):
    """Any sequence of verbs: a refused verb changes nothing, and after each record the
    record-applied table equals the mirror and a dict model of the rows."""
    state = BlockTableState(max_rows=6, width=5, num_cache_pages=40)
    device = np.zeros(state.device_shape, dtype=np.int32)
    model: dict[int, list[int]] = {}
    for op in [*ops, ("take", False)]:
        before = snapshot(state)
        kind = op[0]
        try:
            if kind == "add":
                state.add(op[1], op[2])
                model[op[1]] = list(op[2])
            elif kind == "append":
                state.append(op[1], op[2])
                model[op[1]] = model[op[1]] + list(op[2])
            elif kind == "append_many":
                pages = [op[2]] * len(op[1])
                state.append_many(op[1], pages)
                for row, page in zip(op[1], pages, strict=True):
                    model[row] = [*model[row], page]
            elif kind == "set":
                state.set(op[1], op[2])
                model[op[1]] = list(op[2])
            elif kind == "remove":
                state.remove(op[1])
                del model[op[1]]
            elif kind == "move":
                state.move(op[1], op[2])
                if op[1] != op[2]:
                    model[op[2]] = model.pop(op[1])
            elif kind == "swap":
                state.swap(op[1], op[2])
                a, b = model.pop(op[1], None), model.pop(op[2], None)
                if a is not None:
                    model[op[2]] = a
                if b is not None:
                    model[op[1]] = b
            else:
                apply_numpy(device, state.take_updates(pad=op[1]))
                assert np.array_equal(device, state.mirror)
        except (SpecError, TypeError):
            assert_unchanged(state, before)
        expected = np.zeros(state.device_shape, dtype=np.int32)
        for row, pages in model.items():
            expected[row, : len(pages)] = pages
        assert np.array_equal(state.mirror, expected)
        assert sorted(model) == state.live_rows().tolist()
    assert np.array_equal(device, state.mirror)


def test_host_half_imports_no_framework():
    """The host half is core code: numpy only (checked in a fresh interpreter)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = ("import attnsync._block_table, sys, json; "
            "print(json.dumps([m for m in ('torch', 'jax', 'jaxlib', 'triton') if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
