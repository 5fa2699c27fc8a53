"""Pinned host blocks for the block tables of `attnsync.Batch` (CUDA lowerings only).

Why: a reused lowering of 256 decode requests with a 512-page-wide table spends most of its
time writing the 512 KB table into its pinned buffer (17-27 us on the H100 host, whose memcpy
moves about 25-30 GB/s: results/2026-11-27-h100, run 66 and prof27; streaming stores were
slower there). `Batch` copies the caller's table anyway, to own it; with this pool installed,
that copy lands in pinned memory, and the lowering copies the table to the device from there.
The table is then written into host memory once per step instead of twice.

The lowering still makes one copy: a block holds the table at its start and has room after
it for the lowering's other fields, packed at their usual offsets (the table is the first
field of every layout, `attnsync.adapters.torch._Room`), and the block is copied to the
device as the lowering's pinned buffer would be (`attnsync._native.lower_step`'s `table`).

A block is handed out again only when both hold:
- no array views its memory: numpy makes every view of a view point at the block's `whole`
  array, so `whole`'s reference count is back to what it was when the block was made;
- the last copy that read it has completed (the event recorded after that copy).
The tail after the table is written only under the same event check, and under this pool's
lock: two lowerings of one batch on two streams must not pack into it at once.

Installed by the first CUDA `Stager`; `ATTNSYNC_PINNED_TABLES=0` in the environment keeps
numpy's allocator (every lowering then packs the table, as before).
"""

from __future__ import annotations

import os
import sys
import threading
import weakref

import numpy as np
import torch

from .. import _batch
from .._staging import _round_up

# The C methods under torch.cuda.Event's query and record (absent from CPU builds, where no
# block is copied from): as cheap as the adapter's own calls of them (attnsync/adapters/torch.py).
_event_query = getattr(getattr(torch._C, "_CudaEventBase", None), "query", None)
_event_record = getattr(getattr(torch._C, "_CudaEventBase", None), "record", None)

MAX_BLOCKS = 16  # beyond this many tables alive at once, Batch uses numpy's allocator
MAX_BYTES = 256 << 20  # pinned bytes the pool may hold


def block_bytes(table_nbytes: int) -> int:
    """A block's size for a table of `table_nbytes`: three times the table (at least 64 KB more).

    A lowering reuses a pool whose slots are up to twice (plus 4 KB) what a step needs
    (`attnsync.adapters.torch._Room.fits`), so its other fields may start as far as twice the
    table's size into the buffer; FlashInfer's page list then needs up to the table's size
    again. A lowering that needs more than its block holds packs the table the usual way.
    (bench_common on an H100, run 71: the 256-decode target reused the pool its 512-request
    size had made, 1.05 MB, and a block of twice the table did not hold it.)
    """
    table = _round_up(table_nbytes, 4096)
    return 2 * table + max(table, 1 << 16)


class _Block:
    """One pinned block: `whole` (uint8 numpy over all of it), its address and capacity, the
    users count of `whole` when nothing views it (`baseline`), a weak reference to the table
    handed out last, the event recorded after the last copy that read the block, and the
    block's own events, one per device (an event is recorded on streams of its device only)."""

    __slots__ = ("pinned", "whole", "address", "capacity", "baseline", "table", "event", "events", "__weakref__")

    def __init__(self, capacity: int, pin_memory: bool) -> None:
        self.pinned = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin_memory)
        self.whole = self.pinned.numpy()
        self.address = self.pinned.data_ptr()
        self.capacity = capacity
        self.baseline = sys.getrefcount(self.whole)  # the same expression as in `free`
        self.table: weakref.ref | None = None
        self.event: torch.cuda.Event | None = None
        self.events: dict[int, torch.cuda.Event] = {}

    def free(self) -> bool:
        """Whether no array views the block and no copy may still read it."""
        return sys.getrefcount(self.whole) == self.baseline and (self.event is None or _event_query(self.event))


class PinnedTables:
    """The pool `attnsync._batch.table_memory` calls (see the module docstring)."""

    def __init__(self, *, max_blocks: int = MAX_BLOCKS, max_bytes: int = MAX_BYTES, pin_memory: bool = True) -> None:
        self.pin_memory = pin_memory  # False: plain host memory (tests of the pool's bookkeeping on the CPU)
        self.max_blocks = max_blocks
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.blocks: list[_Block] = []
        self._by_whole: dict[int, _Block] = {}
        self.handed_out = 0  # tables placed in pinned memory (tests and benches read these)
        self.declined = 0  # tables left to numpy's allocator: the pool was full
        self.copies = 0  # lowerings that copied a block (`copied` counts them)

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """A writable C-contiguous int32 array of `shape` at the start of a free block, or None."""
        nbytes = int(np.prod(shape)) * 4
        need = block_bytes(nbytes)
        with self.lock:
            best = None
            for block in self.blocks:  # the smallest free block that fits
                if need <= block.capacity <= 4 * need and (best is None or block.capacity < best.capacity):
                    if block.free():
                        best = block
            if best is None:
                best = self._make(need)
                if best is None:
                    self.declined += 1
                    return None
            table = np.ndarray(shape, np.int32, best.whole, 0)
            best.table = weakref.ref(table)
            best.event = None  # free() saw its last copy done
            self.handed_out += 1
            return table

    def _make(self, capacity: int) -> _Block | None:
        """A new block, in place of free ones if the pool is at its limits; None if it cannot."""
        total = sum(block.capacity for block in self.blocks)
        while len(self.blocks) >= self.max_blocks or total + capacity > self.max_bytes:
            spare = next((block for block in self.blocks if block.free()), None)
            if spare is None:
                return None
            self.blocks.remove(spare)
            del self._by_whole[id(spare.whole)]
            total -= spare.capacity
        block = _Block(capacity, self.pin_memory)
        self.blocks.append(block)
        self._by_whole[id(block.whole)] = block
        return block

    def copied(self, block: _Block, stream: torch.cuda.Stream, device_index: int) -> None:
        """Record, on `stream` after the copy just queued from `block`, the block's own event
        for that device: its guard from now on. Not the lowering entry's event, which a later
        step re-records: the block would look busy then, and its next lowering would take the
        entry's own buffer and wait (results/2026-11-27-h100, run 77: 50 ms behind a queued
        kernel). Call under `lock`."""
        event = block.events.get(device_index)
        if event is None:  # torch makes it on the stream's device when first recorded
            event = block.events[device_index] = torch.cuda.Event()
        _event_record(event, stream)
        block.event = event
        self.copies += 1

    def block_of(self, table: np.ndarray, nbytes: int) -> _Block | None:
        """The block whose table `table` is, if a lowering copying `nbytes` from the block's
        start may pack into it now (its last copy done); None otherwise. Call under `lock`."""
        block = self._by_whole.get(id(table.base))
        if (block is None or block.table is None or block.table() is not table or nbytes > block.capacity
                or (block.event is not None and not _event_query(block.event))):
            return None
        return block


POOL: PinnedTables | None = None


def install() -> PinnedTables | None:
    """Make Batch copy large tables into the pool (once; not where ATTNSYNC_PINNED_TABLES=0)."""
    global POOL
    if POOL is None and os.environ.get("ATTNSYNC_PINNED_TABLES", "1") != "0":
        POOL = PinnedTables()
        _batch.table_memory = POOL
    return POOL


def uninstall() -> None:
    """Back to numpy's allocator for new batches (tables already handed out stay valid)."""
    global POOL
    POOL = None
    _batch.table_memory = None
