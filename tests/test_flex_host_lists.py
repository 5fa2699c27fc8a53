"""Flex's host page lists: work in proportion to the batch's pages, not to the cache.

The uniqueness proof (a bincount over the cache pages) runs only for a cache at most
`_BINCOUNT_RATIO` times the batch's candidates; otherwise the sort runs. Both give the same
lists bit for bit (the flex tests compare the lists against brute force).
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import batch_kwargs

import attnsync
from attnsync.backends import flex


@settings(max_examples=150, deadline=None)
@given(batch_kwargs(min_reqs=1, max_reqs=6, max_page_id=12, block_sizes=(1, 2, 4)))
def test_both_uniqueness_paths_give_the_same_lists(kwargs):
    batch = attnsync.Batch(**kwargs)
    saved = flex._BINCOUNT_RATIO
    results = []
    try:
        for ratio in (0, 10**9):  # always the sort; always the bincount proof
            flex._BINCOUNT_RATIO = ratio
            md = attnsync.build(batch, backend="flex", num_cache_pages=13, inverse_table="device")
            results.append((md.kv_num_blocks.copy(), md.kv_indices.copy()))
    finally:
        flex._BINCOUNT_RATIO = saved
    (c0, i0), (c1, i1) = results
    assert np.array_equal(c0, c1) and np.array_equal(i0, i1)


def test_a_huge_cache_costs_nothing_in_proportion_to_it():
    rng = np.random.default_rng(0)
    rows, bs = 64, 1
    seq = rng.integers(1, 200, rows)
    table = np.zeros((rows, 200), dtype=np.int64)
    for r in range(rows):
        table[r, : seq[r]] = rng.choice(np.arange(1, 100_000), size=seq[r], replace=False)
    batch = attnsync.Batch(query_lens=np.ones(rows, np.int64), seq_lens=seq, block_table=table, block_size=bs)
    small = attnsync.build(batch, backend="flex", num_cache_pages=100_000, inverse_table="device")
    tracemalloc.start()
    start = time.perf_counter()
    huge = attnsync.build(batch, backend="flex", num_cache_pages=2**31 - 1, inverse_table="device")
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(small.kv_indices, huge.kv_indices)
    assert np.array_equal(small.kv_num_blocks, huge.kv_num_blocks)
    assert peak < 64 << 20, peak  # a bincount over 2**31 - 1 pages would take 16 GiB
    assert elapsed < 5.0, elapsed


@pytest.mark.parametrize("num_pages", [13, 2**20])
def test_shared_pages_are_listed_once_at_any_cache_size(num_pages):
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[3, 3], block_table=[[5, 6, 7], [5, 6, 8]], block_size=1)
    md = attnsync.build(batch, backend="flex", num_cache_pages=num_pages, inverse_table="device",
                        q_block_size=2)
    assert md.kv_num_blocks.tolist() == [4]
    assert md.kv_indices[0, :4].tolist() == [5, 6, 7, 8]
