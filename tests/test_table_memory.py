"""`Batch(table_memory=...)`: where a batch copies its block table.

A stand-in object offers buffers the way the torch adapter's pinned-memory pool does; the
batch copies its table into the offered buffer, falls back to numpy's allocator on None, and
refuses a buffer that is not exactly what it asked for. (tests/test_native.py runs the same
with the compiled checks on and off.)
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest

import attnsync


class Offer:
    """A `table_memory` that offers `make(shape)` and records each request."""

    def __init__(self, make):
        self.make, self.asked, self.given = make, [], []

    def table_buffer(self, shape):
        self.asked.append(shape)
        buffer = self.make(shape)
        if isinstance(buffer, np.ndarray):
            self.given.append(weakref.ref(buffer))
        return buffer


TABLE = np.array([[3, 5, 0], [7, 0, 0], [2, 4, 6]], np.int32)


def make(table=TABLE, **kw):
    return attnsync.Batch(query_lens=[1, 2, 1], seq_lens=[9, 2, 40], block_table=table, block_size=16, **kw)


def test_the_offered_buffer_holds_the_table():
    offer = Offer(lambda shape: np.full(shape, -1, np.int32))
    batch = make(table_memory=offer)
    assert offer.asked == [(3, 3)]
    assert batch.block_table is offer.given[0]()
    assert batch.block_table.tolist() == TABLE.tolist() and not batch.block_table.flags.writeable
    assert attnsync.build(batch).slot_mapping.tolist() == attnsync.build(make()).slot_mapping.tolist()


def test_a_view_into_a_larger_block_is_a_valid_buffer():
    """The pool hands out the start of a larger block: a C-contiguous view is what it asks for."""
    block = np.zeros(64, np.int32)
    batch = make(table_memory=Offer(lambda shape: block[: shape[0] * shape[1]].reshape(shape)))
    assert np.shares_memory(batch.block_table, block) and block[:9].tolist() == TABLE.ravel().tolist()


def test_none_falls_back_to_numpy():
    offer = Offer(lambda shape: None)
    batch = make(table_memory=offer)
    assert offer.asked == [(3, 3)] and batch.block_table.tolist() == TABLE.tolist()


def test_every_table_is_asked_for_whatever_its_size_or_input():
    """The object decides which sizes it serves; the batch always asks (lists and int64 too)."""
    for table in (TABLE, TABLE.astype(np.int64), TABLE.tolist(), np.asfortranarray(TABLE)):
        offer = Offer(lambda shape: np.empty(shape, np.int32))
        assert make(table, table_memory=offer).block_table.tolist() == TABLE.tolist()
        assert offer.asked == [(3, 3)]
    offer = Offer(lambda shape: np.empty(shape, np.int32))
    empty = attnsync.Batch(query_lens=[], seq_lens=[], block_table=np.zeros((0, 4), np.int32), block_size=16,
                           table_memory=offer)
    assert offer.asked == [(0, 4)] and empty.block_table.shape == (0, 4)


@pytest.mark.parametrize(
    "wrong, what",
    [
        (lambda shape: np.zeros((shape[0], shape[1] + 1), np.int32), r"a C-contiguous int32 array of shape \(3, 4\)"),
        (lambda shape: np.zeros(shape, np.int64), r"a C-contiguous int64 array of shape \(3, 3\)"),
        (lambda shape: np.zeros((shape[1], shape[0]), np.int32).T, r"a strided int32 array of shape \(3, 3\)"),
        (lambda shape: _read_only(np.zeros(shape, np.int32)), r"a read-only C-contiguous int32 array"),
        (lambda shape: [[0] * shape[1]] * shape[0], r"list;"),
    ],
    ids=["shape", "dtype", "layout", "read-only", "not an array"],
)
def test_a_wrong_buffer_is_refused_with_a_clear_error(wrong, what):
    with pytest.raises(TypeError, match=r"table_memory: table_buffer\(\(3, 3\)\) returned " + what) as caught:
        make(table_memory=Offer(wrong))
    message = str(caught.value)
    assert "expected a writable C-contiguous int32 numpy array of shape (3, 3), or None" in message
    assert "Fix:" in message


def _read_only(array):
    array.setflags(write=False)
    return array


def test_a_refused_batch_needs_no_give_back():
    """Validation fails after the buffer was handed out: nothing references it afterwards, so
    the object reclaims it by itself (here: its weak reference dies)."""
    offer = Offer(lambda shape: np.zeros(shape, np.int32))
    with pytest.raises(attnsync.SpecError, match="query_len 2 > seq_len 1"):
        attnsync.Batch(query_lens=[1, 2, 1], seq_lens=[9, 1, 40], block_table=TABLE, block_size=16,
                       table_memory=offer)
    with pytest.raises(attnsync.SpecError, match="row 2 needs 3 pages"):
        attnsync.Batch(query_lens=[1, 1, 1], seq_lens=[9, 1, 40], block_table=TABLE[:, :2], block_size=16,
                       table_memory=offer)
    gc.collect()
    assert offer.asked and all(ref() is None for ref in offer.given)


def test_the_object_is_not_kept_and_not_a_field():
    offer = Offer(lambda shape: np.zeros(shape, np.int32))
    batch = make(table_memory=offer)
    assert "table_memory" not in {f.name for f in dataclasses.fields(batch)}
    assert "table_memory" not in repr(batch) and "table_memory" not in vars(batch)
    assert all(value is not offer for value in vars(batch).values())
    assert "table_memory" in attnsync.Batch.__doc__  # documented with the other arguments
