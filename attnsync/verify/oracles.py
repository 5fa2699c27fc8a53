"""The numpy row of the matrix: per-backend preparation, expected refusals and brute-force oracles.

The generic functions here look the backend up in the registry (`registry.backend_check`);
the per-backend parts live in the backend's record.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import Batch
from .._spec import array_fields
from .compare import compare_arrays, compare_scalar
from .registry import backend_check
from .report import Fail

__all__ = [
    "SHARED_FIELDS", "brute_common", "brute_force_fields", "build_options", "check_numpy", "exact_twin",
    "expected_build_refusal", "pages", "prepare_batch", "rows", "shared_fields", "true_seq_lens",
]

# Fields every backend's metadata has, with the common builder's meaning.
SHARED_FIELDS = ("query_start_loc", "seq_lens", "block_table", "slot_mapping", "num_reqs",
                 "num_actual_tokens", "max_query_len", "max_seq_len")


def prepare_batch(backend: str, batch: Batch) -> Batch:
    """The corpus batch in the order `backend` needs (its record's `prepare`)."""
    prepare = backend_check(backend).prepare
    return batch if prepare is None else prepare(batch)


def build_options(backend: str, batch: Batch) -> dict[str, Any]:
    """Build options of `backend` for `batch` (its record's options plus per-batch values)."""
    check = backend_check(backend)
    options = dict(check.options)
    if check.batch_options is not None:
        options.update(check.batch_options(batch))
    return options


def expected_build_refusal(backend: str, batch: Batch, options: dict[str, Any]) -> str | None:
    """Why `backend` documents refusing `batch`, or None when it must accept it."""
    refusal = backend_check(backend).build_refusal
    return None if refusal is None else refusal(batch, options)


def true_seq_lens(batch: Batch, rng: np.random.Generator) -> np.ndarray:
    """A draw of exact lengths below the host bound: inexact rows lose up to k rejected drafts.

    A row with 1 + k new tokens carries k drafts; the bound assumes all were accepted, so the
    true length is the bound minus 0..k (and never below the row's query length plus one
    token of context). Padded rows are 0. Shape [padded_num_reqs], int32.
    """
    q = batch.query_lens.astype(np.int64)
    s = batch.seq_lens.astype(np.int64)
    most = np.minimum(np.maximum(q - 1, 0), np.maximum(s - q - 1, 0))
    rejected = np.where(batch.seq_lens_exact, 0, np.floor(rng.random(len(q)) * (most + 1)).astype(np.int64))
    out = np.zeros(batch.padded_num_reqs, dtype=np.int32)
    out[: batch.num_reqs] = s - rejected
    return out


def exact_twin(batch: Batch, lengths: np.ndarray) -> Batch:
    """`batch` with exact `lengths` ([padded_num_reqs]) for every row."""
    return Batch(
        query_lens=batch.query_lens, seq_lens=lengths[: batch.num_reqs], block_table=batch.block_table,
        block_size=batch.block_size, is_prefilling=batch.is_prefilling,
        padded_num_reqs=batch.padded_num_reqs, padded_num_tokens=batch.padded_num_tokens,
        num_cache_pages=batch.num_cache_pages,
    )


# ---------------------------------------------------------------------------------------------
# Building blocks of the per-backend oracles: per-row Python, no numpy cleverness


def pages(seq_len: int, block_size: int) -> int:
    """Cache pages a sequence of `seq_len` tokens occupies."""
    return -(-seq_len // block_size)


def brute_common(batch: Batch, *, decode_threshold: int = 1) -> dict[str, Any]:
    """Every common field of `batch` computed row by row (`attnsync.testing.brute_force_common`)."""
    from ..testing import brute_force_common

    return brute_force_common(batch, decode_threshold=decode_threshold)


def shared_fields(batch: Batch) -> dict[str, Any]:
    """The expected values of `SHARED_FIELDS` (decode threshold 1: they do not depend on it)."""
    common = brute_common(batch)
    return {k: common[k] for k in SHARED_FIELDS}


def rows(want: dict[str, Any]) -> tuple[list[int], list[int], np.ndarray]:
    """(query_start_loc, seq_lens, block_table) of oracle values, as Python lists and the table."""
    return ([int(x) for x in want["query_start_loc"]], [int(x) for x in want["seq_lens"]], want["block_table"])


def brute_force_fields(backend: str, batch: Batch, md: Any) -> dict[str, Any]:
    """Expected values of `md`'s fields computed row by row from `batch` (what can be)."""
    oracle = backend_check(backend).oracle
    return shared_fields(batch) if oracle is None else oracle(batch, md)


def check_numpy(backend: str, batch: Batch, md: Any) -> str:
    """The numpy row's metadata check: dtypes, read-only arrays, brute-force values."""
    for f in array_fields(md):
        value = getattr(md, f.name)
        if not isinstance(value, np.ndarray):
            raise Fail(f"{f.name}: expected a numpy array, got {type(value).__name__}")
        if value.dtype not in (np.int32, np.bool_, np.float32):
            raise Fail(f"{f.name}: dtype {value.dtype}, expected int32 (bool/float32 where documented)")
        if value.flags.writeable:
            raise Fail(f"{f.name}: the array is writeable; built metadata must be read-only")
    want = brute_force_fields(backend, batch, md)
    checked = 0
    for name, value in want.items():
        if not hasattr(md, name):
            continue
        got = getattr(md, name)
        if isinstance(got, np.ndarray):
            compare_arrays(name, got, value, dtype=got.dtype if name == "block_table" else np.asarray(value).dtype)
        else:
            compare_scalar(name, got, value)
        checked += 1
    return f"{checked} fields equal the brute-force oracle"
