"""Hypothesis strategies for attnsync batches, shared by every test module.

`batch_kwargs()` draws the keyword arguments of a *valid* `attnsync.Batch` (plain numpy
arrays and ints, so a test can mutate them before construction); `batches()` builds the
`Batch` itself. Rows are drawn by kind so that every region of the decode-first order shows
up often: decodes (1..spec_tokens+1 new tokens, some context), prefills (no context yet),
extends (context plus several new tokens) and empty rows (0 new tokens).

Other test authors may import from here: `from strategies import batches` (pytest puts
`tests/` on `sys.path` because `tests/conftest.py` sits in a folder without `__init__.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

import attnsync

BLOCK_SIZES = (1, 2, 16, 64)
ROW_KINDS = ("decode", "prefill", "extend", "empty")


@st.composite
def batch_kwargs(
    draw: st.DrawFn,
    *,
    min_reqs: int = 0,
    max_reqs: int = 12,
    block_sizes: tuple[int, ...] = BLOCK_SIZES,
    max_context: int = 160,
    max_query: int = 40,
    max_decode_query: int = 4,
    kinds: tuple[str, ...] = ROW_KINDS,
    inexact: bool = True,
    prefilling: bool = True,
    padding: bool = True,
    max_extra_width: int = 3,
    max_page_id: int = 4096,
) -> dict[str, Any]:
    """Keyword arguments of a valid `attnsync.Batch`.

    Args:
        min_reqs, max_reqs: range of the request count R.
        block_sizes: block sizes to choose from.
        max_context: largest number of already-computed tokens of a row.
        max_query: largest query length of a prefill or extend row.
        max_decode_query: largest query length of a decode row (1 + speculative tokens).
        kinds: row kinds to draw from (see the module docstring).
        inexact: allow rows marked `seq_lens_exact=False` (decode rows with context whose
            host length is an upper bound).
        prefilling: sometimes pass `is_prefilling`.
        padding: sometimes pass `padded_num_reqs` / `padded_num_tokens`.
        max_extra_width: block-table columns beyond the widest row's need.
        max_page_id: page ids are drawn from [0, max_page_id].
    """
    num_reqs = draw(st.integers(min_reqs, max_reqs))
    block_size = draw(st.sampled_from(block_sizes))
    query_lens, computed = [], []
    for _ in range(num_reqs):
        kind = draw(st.sampled_from(kinds))
        if kind == "decode":
            query_lens.append(draw(st.integers(1, max_decode_query)))
            computed.append(draw(st.integers(1, max_context)))
        elif kind == "prefill":
            query_lens.append(draw(st.integers(1, max_query)))
            computed.append(0)
        elif kind == "extend":
            query_lens.append(draw(st.integers(2, max_query)))
            computed.append(draw(st.integers(1, max_context)))
        else:
            query_lens.append(0)
            computed.append(draw(st.integers(0, max_context)))
    q = np.array(query_lens, dtype=np.int64)
    s = q + np.array(computed, dtype=np.int64)
    pages_needed = -(-s // block_size)
    width = int(pages_needed.max(initial=0)) + draw(st.integers(0, max_extra_width))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    block_table = rng.integers(0, max_page_id + 1, size=(num_reqs, width), dtype=np.int64)

    kwargs: dict[str, Any] = dict(
        query_lens=q, seq_lens=s, block_table=block_table, block_size=block_size
    )
    is_prefilling = None
    if prefilling and draw(st.booleans()):
        # Rows without context are prefilling; others sometimes (short or long extends).
        is_prefilling = (s - q <= 0) | (rng.random(num_reqs) < 0.3)
        kwargs["is_prefilling"] = is_prefilling
    if inexact and draw(st.booleans()):
        can = s - q > 0  # an upper bound needs context (Batch refuses it otherwise)
        if is_prefilling is not None:
            can &= ~is_prefilling
        exact = ~(can & (rng.random(num_reqs) < 0.5))
        kwargs["seq_lens_exact"] = exact
    if padding and draw(st.booleans()):
        kwargs["padded_num_reqs"] = num_reqs + draw(st.integers(0, 4))
    if padding and draw(st.booleans()):
        kwargs["padded_num_tokens"] = int(q.sum()) + draw(st.integers(0, 9))
    return kwargs


def batches(**options: Any) -> st.SearchStrategy[attnsync.Batch]:
    """Valid `attnsync.Batch` objects; `options` as for `batch_kwargs`."""
    return batch_kwargs(**options).map(lambda kw: attnsync.Batch(**kw))


def exact_batches(**options: Any) -> st.SearchStrategy[attnsync.Batch]:
    """Valid batches whose every row is exact (what JAX and plain lowering accept)."""
    return batches(inexact=False, **options)
