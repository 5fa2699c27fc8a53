"""Pinned blocks for block tables, owned by a CUDA `Stager` (`stager.table_memory`).

`attnsync.Batch(..., table_memory=stager.table_memory)` copies the caller's block table into a
pinned block instead of numpy memory. A lowering through that stager then packs the step's
other fields after the table, in the same block, and copies the block: the table is written
into host memory once a step instead of twice (the table is the largest field of a decode step,
and host memory bandwidth is what its copy costs). Still one host-to-device copy.

A block is owned by the batch whose table it holds, for as long as any array views that table
(numpy points every view at the block's handed-out array, and a `weakref.finalize` on that array
gives the block back when the last view dies). A block given back is handed out again only once
the event recorded after its last copy has completed. Its tail (the other fields) is written
only under the same event check: a batch lowered twice while its first copy is pending packs
the second time into the stager's own buffer instead.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import torch

from .._staging import PackedLayout, _round_up

__all__ = ["PinnedTables"]


class _Block:
    """One pinned block: its memory, the event after its last copy, and cached tail views."""

    __slots__ = ("capacity", "event", "handed", "host", "pinned", "sources", "table", "tails")

    def __init__(self, capacity: int, pin_memory: bool, event: Any) -> None:
        self.pinned = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin_memory)
        self.host = self.pinned.numpy()  # the block's own view, for the tails; never handed out
        self.capacity = capacity
        self.event = event()
        self.handed: weakref.ref | None = None  # the array the block's current batch views
        self.table: weakref.ref | None = None  # the table array handed out (at the block's start)
        self.tails: dict[PackedLayout, tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]] = {}
        self.sources: dict[int, torch.Tensor] = {}

    def copied(self) -> bool:
        """Whether every copy that read the block has executed (an event never recorded has)."""
        return self.event.query()

    def targets(self, layout: PackedLayout, mirrors: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Views of `layout`'s fields after the table (its first field), then the `mirrors`."""
        cached = self.tails.get(layout)
        if cached is None or cached[0] is not mirrors:
            if len(self.tails) > 16:
                self.tails.clear()
            views = tuple(self.host[e.offset: e.offset + e.nbytes].view(e.dtype).reshape(e.shape)
                          for e in layout.entries[1:])
            cached = self.tails[layout] = (mirrors, views + mirrors)
        return cached[1]

    def source(self, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of the block as the copy's source tensor."""
        source = self.sources.get(nbytes)
        if source is None:
            if len(self.sources) > 16:
                self.sources.clear()
            source = self.sources[nbytes] = self.pinned[:nbytes]
        return source


def _leading_rows(view: np.ndarray, table: np.ndarray) -> bool:
    """Whether `view` is `table`'s first rows (same start, same row width, C-contiguous)."""
    return (view.ndim == 2 and view.shape[1] == table.shape[1] and view.flags.c_contiguous
            and view.__array_interface__["data"][0] == table.__array_interface__["data"][0])


class PinnedTables:
    """Pinned block-table memory for batches lowered through one CUDA stager.

    `table_buffer(shape)` is what `attnsync.Batch(table_memory=...)` calls; tables smaller than
    `min_table_bytes` stay in numpy memory (their second write costs little), and beyond
    `max_blocks` blocks or `max_bytes` pinned bytes alive it declines too. A block is three times
    its table (at least 64 KB more), so a step's other fields fit after the table; a step that
    does not fit packs the usual way.

    Args:
        min_table_bytes: smallest table worth a block.
        max_blocks: blocks alive at once.
        max_bytes: pinned bytes the pool may hold.
        pin_memory: pin the blocks (False only for tests on hosts without CUDA).
        event: makes a block's event (`torch.cuda.Event`; tests pass stand-ins with
            `query`/`record`).
    """

    def __init__(self, *, min_table_bytes: int = 64 << 10, max_blocks: int = 16, max_bytes: int = 256 << 20,
                 pin_memory: bool = True, event: Any = None) -> None:
        self.min_table_bytes, self.max_blocks, self.max_bytes = min_table_bytes, max_blocks, max_bytes
        self._pin_memory = pin_memory
        self._event = event if event is not None else torch.cuda.Event
        self._blocks: list[_Block] = []
        self._free: list[_Block] = []
        self._by_array: dict[int, _Block] = {}  # id of a handed-out array -> its block
        self._lock = threading.RLock()  # a finalizer may run inside a locked region of this thread

    def table_buffer(self, shape: tuple[int, int]) -> np.ndarray | None:
        """A writable int32 array of `shape` in a pinned block, or None (use numpy memory)."""
        rows, width = shape
        nbytes = rows * width * 4
        if nbytes < self.min_table_bytes:
            return None
        with self._lock:
            block = next((b for b in self._free if b.capacity >= nbytes * 2 and b.copied()), None)
            if block is not None:
                self._free.remove(block)
            else:
                capacity = 2 * _round_up(nbytes, 4096) + max(_round_up(nbytes, 4096), 1 << 16)
                if (len(self._blocks) >= self.max_blocks
                        or sum(b.capacity for b in self._blocks) + capacity > self.max_bytes):
                    return None
                block = _Block(capacity, self._pin_memory, self._event)
                self._blocks.append(block)
            whole = block.pinned.numpy()  # a fresh array: its views are this batch's table
            block.handed = weakref.ref(whole)
            self._by_array[id(whole)] = block
            weakref.finalize(whole, self._give_back, id(whole), block)
            table = whole[:nbytes].view(np.int32).reshape(shape)
            block.table = weakref.ref(table)
            return table

    def _give_back(self, key: int, block: _Block) -> None:
        with self._lock:
            if self._by_array.get(key) is block:
                del self._by_array[key]
            block.handed = block.table = None
            self._free.append(block)

    def block_of(self, table: np.ndarray, nbytes: int) -> _Block | None:
        """The block holding `table` (the very array `table_buffer` handed out, or a view of its
        first rows), if a step of `nbytes` fits after it and the block may be packed now."""
        block = self._by_array.get(id(table.base))
        if block is None or block.handed is None or block.handed() is not table.base or nbytes > block.capacity:
            return None
        handed = block.table()
        if handed is None or not (table is handed or _leading_rows(table, handed)) or not block.copied():
            return None
        return block

    def events(self) -> list:
        """The event of every block (the stager waits on them before its memory goes)."""
        return [block.event for block in self._blocks]

    @property
    def blocks(self) -> int:
        """Blocks the pool holds (in use or free)."""
        return len(self._blocks)
