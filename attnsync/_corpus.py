"""A corpus of batches for the equivalence suite: hand-written edge cases plus seeded random ones.

Host only (numpy). Every batch is decode-first ordered (`attnsync.reorder`), so every backend
accepts it; the unordered form is covered by the validation tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ._batch import Batch, reorder


def _table(rng: np.random.Generator, seq_lens: np.ndarray, block_size: int, *, width: int | None = None,
           num_pages: int = 4096) -> np.ndarray:
    """A block table with distinct random page ids (>= 1; page 0 is the null page) per row."""
    needed = -(-np.asarray(seq_lens, dtype=np.int64) // block_size)
    width = int(max(needed.max(initial=0), 1)) if width is None else width
    table = np.zeros((len(seq_lens), width), dtype=np.int32)
    total = int(needed.sum())
    pages = rng.permutation(np.arange(1, max(num_pages, total + 1)))[:total].astype(np.int32)
    start = 0
    for row, count in enumerate(needed):  # a loop over rows is fine in a test corpus
        table[row, :count] = pages[start : start + count]
        start += int(count)
    return table


def _batch(rng, q, s, block_size, **kwargs) -> Batch:
    q = np.asarray(q, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    width = kwargs.pop("width", None)
    table = kwargs.pop("block_table", None)
    num_pages = kwargs.pop("num_pages", 4096)
    if table is None:
        table = _table(rng, s, block_size, width=width, num_pages=num_pages)
    return reorder(Batch(query_lens=q, seq_lens=s, block_table=table, block_size=block_size, **kwargs))[1]


def edge_cases(seed: int = 0) -> Iterator[tuple[str, Batch]]:
    """The hand-written cases, named."""
    rng = np.random.default_rng(seed)
    yield "empty", _batch(rng, [], [], 16)
    yield "one request decode", _batch(rng, [1], [37], 16)
    yield "one request prefill", _batch(rng, [40], [40], 16)
    yield "all decode", _batch(rng, [1] * 6, [5, 16, 17, 100, 250, 1], 16)
    yield "all prefill", _batch(rng, [7, 16, 33], [7, 16, 33], 16)
    yield "chunked-prefill continuations", _batch(
        rng, [1, 1, 24, 16, 9], [80, 12, 56, 48, 9], 16,
        is_prefilling=[False, False, True, True, True],
    )
    yield "padded bucket", _batch(rng, [1, 1, 5], [30, 64, 5], 16, padded_num_reqs=8, padded_num_tokens=16)
    yield "exact page multiples", _batch(rng, [1, 16, 32], [16, 32, 64], 16)
    yield "block_size 1", _batch(rng, [1, 3, 2], [4, 3, 9], 1)
    yield "block_size 64", _batch(rng, [1, 70, 1], [200, 70, 64], 64)
    yield "inexact decode rows", _batch(
        rng, [3, 3, 3, 9], [40, 21, 77, 9], 16, seq_lens_exact=[False, True, False, True],
    )
    yield "zero-token rows", _batch(rng, [0, 1, 0, 4], [12, 13, 0, 4], 16)
    yield "widest block table", _batch(rng, [1, 2], [3, 5], 16, width=512)
    # Slot ids up to 2**31 - 1: block_size 2**20 and 2048 pages reach the int32 limit exactly.
    big = np.arange(2048, dtype=np.int32)[::-1].copy()
    yield "near the int32 limit", _batch(
        rng, [1, 3], [2**31 - 1, 3], 2**20,
        block_table=np.stack([big, np.concatenate([[7], np.zeros(2047, dtype=np.int32)])]),
    )


def random_batch(rng: np.random.Generator, *, max_reqs: int = 1024, max_prefill: int = 32768,
                 block_size: int | None = None) -> Batch:
    """A realistic random step: decodes, a few chunked-prefill continuations, at most two
    fresh prefills of up to `max_prefill` tokens (a 32k prompt is one serving step's budget)."""
    block_size = int(rng.choice([16, 32, 64])) if block_size is None else block_size
    num_fresh = int(rng.integers(0, 3))
    num_cont = int(rng.integers(0, 5))
    num_decode = int(rng.integers(0, max(1, max_reqs - num_fresh - num_cont) + 1))
    decode_ctx = rng.integers(2, 4096, size=num_decode)
    cont_chunk = rng.integers(2, 2048, size=num_cont)
    cont_ctx = rng.integers(1, 8192, size=num_cont)
    fresh = rng.integers(1, max_prefill + 1, size=num_fresh)
    q = np.concatenate([np.ones(num_decode, dtype=np.int64), cont_chunk, fresh])
    s = np.concatenate([decode_ctx, cont_ctx + cont_chunk, fresh])
    prefilling = np.concatenate([np.zeros(num_decode, bool), np.ones(num_cont + num_fresh, bool)])
    extra: dict = dict(is_prefilling=prefilling)
    if rng.integers(0, 2):
        extra.update(padded_num_reqs=int(len(q) + rng.integers(0, 8)),
                     padded_num_tokens=int(q.sum() + rng.integers(0, 64)))
    return _batch(rng, q, s, block_size, **extra)


def small_random_batch(rng: np.random.Generator, *, max_reqs: int = 8) -> Batch:
    """A random mixed step small enough for the dense kernel references (`attnsync verify`):
    decodes with up to 300 tokens of context (some with 1 + k tokens), chunked-prefill
    continuations of up to 32 tokens, fresh prompts of up to 48 tokens, sometimes padded."""
    block_size = int(rng.choice([1, 4, 16, 32]))
    rows = int(rng.integers(1, max_reqs + 1))
    kind = rng.integers(0, 3, size=rows)  # 0 decode, 1 continuation, 2 fresh prompt
    q = np.where(kind == 0, rng.integers(1, 4, size=rows),
                 np.where(kind == 1, rng.integers(2, 33, size=rows), rng.integers(1, 49, size=rows)))
    context = np.where(kind == 2, 0, rng.integers(1, 301, size=rows))
    extra: dict = dict(is_prefilling=kind > 0)
    if rng.integers(0, 2):
        extra.update(padded_num_reqs=rows + int(rng.integers(0, 4)),
                     padded_num_tokens=int(q.sum()) + int(rng.integers(0, 16)))
    return _batch(rng, q, q + context, block_size, num_pages=512, **extra)


def corpus(*, seed: int = 0, cases: int = 8, max_reqs: int = 1024,
           small_cases: int = 0) -> Iterator[tuple[str, Batch]]:
    """Every edge case, then `cases` seeded random batches of up to `max_reqs` requests, then
    `small_cases` small ones (`small_random_batch`, for kernel checks against dense references)."""
    yield from edge_cases(seed)
    rng = np.random.default_rng(seed)
    for i in range(cases):
        yield f"random #{i} (seed {seed})", random_batch(rng, max_reqs=max_reqs)
    small = np.random.default_rng([seed, 1])
    for i in range(small_cases):
        yield f"small random #{i} (seed {seed})", small_random_batch(small)
