"""Packed staging: every device-bound field of one lowering in one buffer, one copy.

Framework-neutral (numpy only). The adapters supply the framework hooks: how to allocate a
pinned host slot, how to record and wait for the event that marks a slot's copy complete.

Why one packed buffer: each host-to-device copy costs a driver call and, into JAX, a
per-array transfer or import; packing makes a lowering one copy whatever the number of fields.

Why 64-byte offsets: JAX on CPU aliases only 64-byte aligned buffers and silently copies
others; JAX on GPU rejects buffers that are not 16-byte aligned at first use. 64 satisfies both.

Why a ring of slots with events: a pinned host buffer is read by the DMA engine when the
copy *executes*, not when it is enqueued. Rewriting it before then corrupts the device copy
(the negative test in tests/gpu/test_core_gpu.py shows it). A slot is therefore rewritten only
after the event recorded after its last copy has completed. docs/sync-free.md has the details.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _accel

ALIGN_BYTES = 64


@dataclass(frozen=True, slots=True)
class PackedEntry:
    """One field of a packed buffer: byte `offset`, `shape` and numpy `dtype` name."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    # Bytes the field occupies; stored, not a property: every lowering reads it per field.
    nbytes: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", math.prod(self.shape) * np.dtype(self.dtype).itemsize)


@dataclass(frozen=True, slots=True)
class PackedLayout:
    """Where each field lives in a packed buffer; hashable, so it can key caches."""

    entries: tuple[PackedEntry, ...]
    nbytes: int
    # Layouts key per-step caches (views, pack targets): hashing the nested entries each time
    # would cost microseconds a lookup, so the hash is computed once.
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.entries, self.nbytes)))

    def __hash__(self) -> int:
        return self._hash

    def entry(self, name: str) -> PackedEntry:
        """The entry called `name`."""
        for item in self.entries:
            if item.name == name:
                return item
        raise KeyError(name)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_layout(fields: Sequence[tuple[str, tuple[int, ...], Any]]) -> PackedLayout:
    """Lay out `(name, shape, dtype)` fields at 64-byte aligned offsets."""
    entries = []
    offset = 0
    for name, shape, dtype in fields:
        entry = PackedEntry(name, offset, tuple(int(s) for s in shape), np.dtype(dtype).name)
        entries.append(entry)
        offset = _round_up(offset + entry.nbytes, ALIGN_BYTES)
    return PackedLayout(tuple(entries), max(offset, ALIGN_BYTES))


def pack(layout: PackedLayout, arrays: dict[str, np.ndarray], out: np.ndarray) -> None:
    """Write `arrays` into the uint8 buffer `out` at `layout`'s offsets, casting dtypes."""
    assert out.dtype == np.uint8 and out.nbytes >= layout.nbytes
    for entry in layout.entries:
        if entry.nbytes:
            view = out[entry.offset : entry.offset + entry.nbytes].view(entry.dtype)
            np.copyto(view.reshape(entry.shape), arrays[entry.name], casting="unsafe")


def pack_fields(targets: tuple[np.ndarray, ...], sources: tuple[np.ndarray, ...]) -> None:
    """Copy each source array into its target view (same shapes; int32 may widen to int64).

    One compiled call for the common pairs where attnsync's compiled twin is in use (a numpy
    copy per field costs more than the step's own copy for a decode batch's dozen small
    fields), numpy for what it leaves.
    """
    native = _accel.native
    done = native.pack(targets, sources) if native is not None else 0
    for target, source in zip(targets[done:], sources[done:], strict=True):
        np.copyto(target, source, casting="unsafe")


def unpack(layout: PackedLayout, buffer: np.ndarray) -> dict[str, np.ndarray]:
    """Views of every field of a packed host buffer (for tests and the CPU paths)."""
    return {
        e.name: buffer[e.offset : e.offset + e.nbytes].view(e.dtype).reshape(e.shape)
        for e in layout.entries
    }


@dataclass
class StagingStats:
    """Counters a stager keeps; tests and `attnsync demo` read them."""

    copies: int = 0  # host-to-device copies issued
    event_waits: int = 0  # times a slot's previous copy had not finished and the host waited
    grows: int = 0  # times a slot was reallocated larger


class SlotRing:
    """A ring of reusable host staging slots guarded by completion tokens.

    Args:
        num_slots: slots in rotation (>= 2 so packing step N+1 overlaps step N's copy).
        allocate: `allocate(nbytes) -> (owner, uint8 numpy view)`; the owner keeps the memory
            alive (a pinned torch tensor, say).
        is_done: `is_done(token) -> bool`, a non-blocking query of a completion token.
        wait: `wait(token)`, blocks the host until the token's copy has executed.
    """

    def __init__(
        self,
        *,
        num_slots: int,
        allocate: Callable[[int], tuple[Any, np.ndarray]],
        is_done: Callable[[Any], bool],
        wait: Callable[[Any], None],
    ) -> None:
        assert num_slots >= 1
        self._allocate = allocate
        self._is_done = is_done
        self._wait = wait
        self._slots: list[tuple[Any, np.ndarray] | None] = [None] * num_slots
        self._tokens: list[Any] = [None] * num_slots
        self._next = 0
        self.stats = StagingStats()

    @property
    def num_slots(self) -> int:
        """Slots in rotation."""
        return len(self._slots)

    @property
    def next_index(self) -> int:
        """The slot the next `acquire` hands out."""
        return self._next

    def owners(self) -> list[Any]:
        """The owner of every slot allocated so far (its memory), in slot order."""
        return [slot[0] for slot in self._slots if slot is not None]

    def acquire(self, nbytes: int) -> tuple[int, Any, np.ndarray]:
        """Next slot with room for `nbytes`, once its previous copy is done.

        Returns `(slot_index, owner, uint8 view of nbytes)`. Growing replaces only this slot's
        memory, after its own copy has completed, so no in-flight copy ever loses its source.
        """
        index = self._next
        self._next = (index + 1) % len(self._slots)
        token = self._tokens[index]
        if token is not None:
            if not self._is_done(token):
                self.stats.event_waits += 1
                self._wait(token)
            self._tokens[index] = None
        slot = self._slots[index]
        if slot is None or slot[1].nbytes < nbytes:
            if slot is not None:
                self.stats.grows += 1
            capacity = max(_round_up(nbytes, 4096), 2 * (slot[1].nbytes if slot else 0))
            slot = self._allocate(capacity)
            self._slots[index] = slot
        return index, slot[0], slot[1][:nbytes]

    def release(self, index: int, token: Any) -> None:
        """Mark slot `index` busy until `token` (the event after its copy) completes."""
        self._tokens[index] = token
        self.stats.copies += 1
