"""Packed layouts and the guarded slot ring, framework-free (fake allocation and events)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnsync._staging import ALIGN_BYTES, PackedLayout, SlotRing, pack, plan_layout, unpack

DTYPES = ("int32", "int64", "bool", "float32", "uint8")

field_specs = st.lists(
    st.tuples(
        st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
        st.sampled_from(DTYPES),
    ),
    min_size=0,
    max_size=8,
)


def _fields(specs):
    return [(f"f{i}", shape, dtype) for i, (shape, dtype) in enumerate(specs)]


def test_align_is_64():
    assert ALIGN_BYTES == 64


def test_hand_layout():
    # 5 int32 = 20 bytes -> next field at 64; 3x3 int64 = 72 bytes -> next at 64 + 128 = 192;
    # an empty field takes no room; 1 bool -> total rounds up to 256
    layout = plan_layout([("a", (5,), np.int32), ("b", (3, 3), np.int64), ("c", (0,), np.int32), ("d", (1,), bool)])
    assert [(e.name, e.offset, e.nbytes) for e in layout.entries] == [
        ("a", 0, 20), ("b", 64, 72), ("c", 192, 0), ("d", 192, 1)
    ]
    assert layout.nbytes == 256
    assert layout.entry("b").shape == (3, 3) and layout.entry("b").dtype == "int64"
    with pytest.raises(KeyError):
        layout.entry("missing")
    assert plan_layout([]).nbytes == ALIGN_BYTES  # never a zero-byte buffer


@settings(max_examples=200, deadline=None)
@given(specs=field_specs)
def test_layout_aligned_and_non_overlapping(specs):
    fields = _fields(specs)
    layout = plan_layout(fields)
    assert isinstance(layout, PackedLayout)
    assert [e.name for e in layout.entries] == [f[0] for f in fields]
    end = 0
    for entry, (_, shape, dtype) in zip(layout.entries, fields, strict=True):
        assert entry.offset % ALIGN_BYTES == 0
        assert entry.shape == shape and entry.dtype == np.dtype(dtype).name
        assert entry.nbytes == int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        assert entry.offset >= end, "fields must not overlap"
        assert entry.offset - end < ALIGN_BYTES, "no more padding than alignment needs"
        end = entry.offset + entry.nbytes
    assert layout.nbytes >= max(end, 1) and layout.nbytes % ALIGN_BYTES == 0
    assert hash(layout) == hash(plan_layout(fields)) and layout == plan_layout(fields)


@settings(max_examples=200, deadline=None)
@given(specs=field_specs, seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(specs, seed):
    rng = np.random.default_rng(seed)
    fields = _fields(specs)
    layout = plan_layout(fields)
    arrays = {}
    for name, shape, dtype in fields:
        if dtype == "bool":
            arrays[name] = rng.random(shape) < 0.5
        elif dtype == "float32":
            arrays[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            info = np.iinfo(dtype)
            arrays[name] = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    out = np.full(layout.nbytes + 32, 0xAB, dtype=np.uint8)
    pack(layout, arrays, out)
    views = unpack(layout, out)
    for name, _, dtype in fields:
        assert views[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(views[name], arrays[name])
    # bytes outside every field are untouched
    untouched = np.ones(out.nbytes, dtype=bool)
    for e in layout.entries:
        untouched[e.offset : e.offset + e.nbytes] = False
    assert (out[untouched] == 0xAB).all()


def test_pack_casts_to_the_layout_dtype():
    layout = plan_layout([("slots", (3,), np.int64), ("lens", (2,), np.int32)])
    out = np.zeros(layout.nbytes, np.uint8)
    pack(layout, {"slots": np.array([-1, 5, 2**31 - 1], np.int32), "lens": np.array([7, 9], np.int64)}, out)
    views = unpack(layout, out)
    assert views["slots"].dtype == np.int64 and views["slots"].tolist() == [-1, 5, 2**31 - 1]
    assert views["lens"].dtype == np.int32 and views["lens"].tolist() == [7, 9]


# --------------------------------------------------------------------------------------------
# SlotRing with fake hooks


class FakeEvent:
    """A copy-completion token; `done` flips when the simulated stream reaches it."""

    def __init__(self, name: str, done: bool = False):
        self.name, self.done = name, done

    def __repr__(self):
        return f"FakeEvent({self.name}, done={self.done})"


class Hooks:
    """Records every allocate/query/wait in order; `wait` completes the token (a host block)."""

    def __init__(self):
        self.log: list[tuple[str, object]] = []
        self.allocations = 0

    def allocate(self, nbytes: int):
        self.allocations += 1
        owner = f"buffer{self.allocations}"
        self.log.append(("allocate", nbytes))
        return owner, np.zeros(nbytes, dtype=np.uint8)

    def is_done(self, token: FakeEvent) -> bool:
        self.log.append(("query", token.name))
        return token.done

    def wait(self, token: FakeEvent) -> None:
        self.log.append(("wait", token.name))
        token.done = True

    def ring(self, num_slots: int = 2) -> SlotRing:
        return SlotRing(num_slots=num_slots, allocate=self.allocate, is_done=self.is_done, wait=self.wait)


def test_rotates_slots():
    hooks = Hooks()
    ring = hooks.ring(3)
    assert ring.num_slots == 3
    seen = []
    for step in range(7):
        index, owner, view = ring.acquire(100)
        assert view.nbytes == 100 and view.dtype == np.uint8
        seen.append((index, owner))
        ring.release(index, FakeEvent(f"e{step}", done=True))
    assert [i for i, _ in seen] == [0, 1, 2, 0, 1, 2, 0]
    # each slot keeps its memory: the same owner comes back
    assert seen[0][1] == seen[3][1] == seen[6][1] and len({o for _, o in seen}) == 3
    assert ring.stats.copies == 7 and ring.stats.event_waits == 0 and ring.stats.grows == 0
    assert not [entry for entry in hooks.log if entry[0] == "wait"]


def test_waits_only_on_the_pending_token_of_the_reused_slot():
    hooks = Hooks()
    ring = hooks.ring(2)
    i0, _, _ = ring.acquire(64)
    a = FakeEvent("a")  # slot 0's copy still pending
    ring.release(i0, a)
    i1, _, _ = ring.acquire(64)
    b = FakeEvent("b")  # slot 1's copy still pending too
    ring.release(i1, b)
    hooks.log.clear()
    index, _, _ = ring.acquire(64)  # reuses slot 0: must wait for a, and only a
    assert index == 0
    assert hooks.log == [("query", "a"), ("wait", "a")]
    assert a.done and not b.done
    assert ring.stats.event_waits == 1
    ring.release(index, FakeEvent("c", done=True))
    b.done = True  # slot 1's copy finished on its own: reuse without waiting
    hooks.log.clear()
    index, _, _ = ring.acquire(64)
    assert index == 1 and hooks.log == [("query", "b")]
    assert ring.stats.event_waits == 1


def test_grows_a_slot_only_after_its_own_token():
    hooks = Hooks()
    ring = hooks.ring(2)
    i0, owner0, _ = ring.acquire(100)
    a = FakeEvent("a")
    ring.release(i0, a)
    i1, owner1, view1 = ring.acquire(100)
    view1[:] = 7  # slot 1's pending payload
    b = FakeEvent("b")
    ring.release(i1, b)
    hooks.log.clear()
    index, owner, view = ring.acquire(10_000)  # slot 0 must grow
    assert index == 0 and owner != owner0 and view.nbytes == 10_000
    assert hooks.log[:2] == [("query", "a"), ("wait", "a")]
    assert hooks.log[2][0] == "allocate" and hooks.log[2][1] >= 10_000
    assert ("wait", "b") not in hooks.log and not b.done
    assert (view1 == 7).all(), "growing slot 0 must not touch slot 1's in-flight memory"
    assert ring.stats.grows == 1
    # a smaller request reuses the grown slot without allocating
    ring.release(index, FakeEvent("c", done=True))
    b.done = True
    ring.acquire(50)
    index, owner_again, _ = ring.acquire(50)
    assert index == 0 and owner_again == owner and ring.stats.grows == 1


@settings(max_examples=200, deadline=None)
@given(
    num_slots=st.integers(2, 4),
    steps=st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 3)), min_size=1, max_size=40),
)
def test_never_hands_out_a_slot_whose_copy_is_pending(num_slots, steps):
    """Simulated stream: each released token completes some steps later (or when waited on)."""
    hooks = Hooks()
    ring = hooks.ring(num_slots)
    last_token: dict[int, FakeEvent] = {}
    in_flight: list[tuple[int, FakeEvent]] = []  # (completes at step, token)
    waits = 0
    for step, (nbytes, delay) in enumerate(steps):
        for item in [x for x in in_flight if x[0] <= step]:
            item[1].done = True
            in_flight.remove(item)
        pending_before = {i: not t.done for i, t in last_token.items()}
        index, _, view = ring.acquire(nbytes)
        assert view.nbytes == nbytes
        if index in last_token:
            assert last_token[index].done, "slot handed out while its copy was pending"
            waits += pending_before[index]
        token = FakeEvent(f"s{step}")
        ring.release(index, token)
        last_token[index] = token
        in_flight.append((step + delay, token))
    assert ring.stats.event_waits == waits
    assert ring.stats.copies == len(steps)
