"""Bucket ladders: a few fixed shapes that every serving step is padded to (numpy only).

A CUDA graph bakes in tensor addresses, shapes and every host scalar handed to a kernel; a
jitted JAX function compiles once per input shape *and* per value of every static argument.
Both want the same thing from the metadata: a small, fixed set of shapes, and host scalars
that do not change from step to step. `BucketLadder` provides it. Given the engine's limits it
picks, for each batch, the smallest of a few buckets (rows, tokens, block-table width) that the
batch fits, pads the batch to it, and names the bucket's worst-case host scalars, which replace
the per-step values: a captured graph replays with the scalars it was captured with, so they
must be the bucket's worst case.

Which buckets (as vLLM's CUDA-graph dispatcher pads):

- tokens: the smallest rung of the token ladder >= the batch's tokens (default: powers of two
  up to `max_num_tokens`, which is always a rung);
- rows: derived from the token rung as vLLM does. A *uniform decode* batch, where every
  request has exactly `uniform_query_len` new tokens (1, or 1 + k with k speculative tokens),
  gets `min(token_rung // uniform_query_len, max_num_reqs)` rows; any other batch gets
  `min(token_rung, max_num_reqs)` rows (every request has at least one token, so that is
  enough). A batch with more rows than that (only possible with rows of zero new tokens) takes
  the next token rung;
- block-table width: the smallest rung of the width ladder >= the pages the longest request
  needs (default: powers of two up to `max_blocks_per_req`).

Padding follows vLLM: padded rows have 0 new tokens (`query_start_loc` repeats its last value),
`seq_lens` 0, block-table rows of page 0 (`NULL_BLOCK_ID`), padded tokens have slot -1; the
block table is cut or zero-padded to the bucket's width. `attnsync.build` writes those values
from `Batch(padded_num_reqs=..., padded_num_tokens=...)`; `BucketLadder.pad` sets them.

Bucket scalars (`Bucket.bound`): `num_reqs` and `num_actual_tokens` are the padded sizes,
`max_query_len` the uniform query length of a decode bucket or the token rung of a mixed one,
`max_seq_len` the longest context the bucket can hold, `min(width * block_size,
max_model_len)` (vLLM captures with `max_model_len`). Upper bounds are all a kernel needs to size
its grid, and they are the same for every step of the bucket.

Phase: plan (host only). Nothing here imports a framework.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._batch import Batch
from ._spec import array_fields, scalar_fields
from ._validate import INT32_MAX, SpecError, as_int, freeze

# Host scalars replaced by the bucket's worst case (every backend's metadata has them).
BOUND_SCALARS = ("num_reqs", "num_actual_tokens", "max_query_len", "max_seq_len")

# Host scalars that change from step to step inside one bucket: counts and flags of the real
# rows. A bucketed JAX lowering carries them as 0-d int32 data leaves, so that a jitted consumer
# does not see a new static value (and retrace) every step. Every other scalar (page size,
# thresholds, options, strings, tuples) depends only on the build options and stays static.
# The list covers every backend in attnsync.backends; a scalar not named here stays static.
STEP_SCALARS = frozenset({
    # common
    "num_scheduled_reqs", "num_scheduled_tokens", "num_decodes", "num_decode_tokens",
    "num_extends", "num_extend_tokens", "num_prefills", "num_prefill_tokens",
    "is_decode_first", "all_exact", "slot_mapping_exact",
    # triton
    "use_split_kv", "has_prefix_ranges",
    # flashinfer, tree, mamba, turboquant: per-step maxima and counts of sub-batches
    "max_decode_query_len", "max_prefill_query_len", "max_decode_seq_len", "max_prefill_seq_len",
    "num_decode_pages", "num_pages", "num_decode_rows", "num_short_extends", "num_long_extends",
    "num_fresh_prefills", "has_chunk_metadata", "num_chunks", "prep_initial_states",
    "num_conv_programs", "is_prefill", "decode_max_seq_len", "prefill_max_query_len",
    "prefill_max_seq_len", "prefill_all_fresh", "num_spec_rows", "spec_max_seq_len",
})


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


@functools.lru_cache(maxsize=None)
def _is_metadata(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) and bool(array_fields(cls))


def _shallow_copy(md: Any) -> Any:
    """A copy sharing every field (a third of `copy.copy`'s cost for the slots dataclasses)."""
    cls = type(md)
    if hasattr(md, "__dict__"):
        return copy.copy(md)
    out = object.__new__(cls)
    for name in _field_names(cls):
        object.__setattr__(out, name, getattr(md, name))
    return out


def _powers_of_two(cap: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `cap`, then `cap` itself."""
    rungs = [1 << i for i in range(cap.bit_length()) if 1 << i < cap]
    return (*rungs, cap)


def _ladder(sizes: Iterable[int] | None, cap: int, name: str) -> tuple[int, ...]:
    """Sorted distinct rungs, each in [1, cap], ending at `cap`."""
    if sizes is None:
        return _powers_of_two(cap)
    if isinstance(sizes, str | bytes) or not isinstance(sizes, Iterable):
        raise TypeError(f"{name}: expected a sequence of ints (the ladder's rungs), received {sizes!r}.")
    rungs = sorted({as_int(s, f"{name} (rung)", minimum=1) for s in sizes})
    if rungs and rungs[-1] > cap:
        raise SpecError(
            f"{name}: rung {rungs[-1]} is above the limit {cap}. Fix: keep every rung <= {cap}, or "
            f"raise the limit."
        )
    if not rungs or rungs[-1] != cap:
        rungs.append(cap)  # the biggest bucket always holds the limit
    return tuple(rungs)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One fixed shape of the ladder: hashable, so it keys CUDA graphs, stagers and jit caches.

    Attributes:
        num_reqs: padded request rows (`Batch.padded_num_reqs`, metadata `num_reqs`).
        num_tokens: padded tokens (`Batch.padded_num_tokens`, metadata `num_actual_tokens`).
        width: block-table columns.
        max_query_len: host bound on the longest query of any batch in the bucket.
        max_seq_len: host bound on the longest context, `min(width * block_size, max_model_len)`.
        uniform_query_len: for a uniform-decode bucket, the query length of every real row
            (1, or 1 + k speculative tokens); None for a mixed bucket.
    """

    num_reqs: int
    num_tokens: int
    width: int
    max_query_len: int
    max_seq_len: int
    uniform_query_len: int | None

    @property
    def is_uniform_decode(self) -> bool:
        """True when every real row of the bucket's batches has `uniform_query_len` tokens."""
        return self.uniform_query_len is not None

    def bound(self, md: Any) -> Any:
        """`md` with its host scalars replaced by the bucket's worst case (see `BOUND_SCALARS`).

        Checks first that `md` was built from a batch padded to this bucket (its rows, tokens
        and block-table width are the bucket's, its maxima within the bucket's bounds) and
        raises `SpecError` otherwise, naming the difference and the fix. Host only; the arrays
        are shared, not copied.

        Example:
            >>> import attnsync
            >>> ladder = BucketLadder(max_num_reqs=8, max_num_tokens=8, max_model_len=64, block_size=16)
            >>> batch = attnsync.Batch(query_lens=[1, 1, 1], seq_lens=[5, 17, 9],
            ...                        block_table=[[1, 0], [2, 3], [4, 0]], block_size=16)
            >>> bucket = ladder.bucket_for(batch)
            >>> md = bucket.bound(attnsync.build(ladder.pad(batch, bucket)))
            >>> md.num_reqs, md.num_actual_tokens, md.max_query_len, md.max_seq_len
            (4, 4, 1, 32)
        """
        if isinstance(md, type) or not _is_metadata(type(md)):
            raise TypeError(f"bound: expected metadata from attnsync.build(...), received {type(md).__name__}.")
        got = {
            "rows (num_reqs)": (getattr(md, "num_reqs", None), self.num_reqs),
            "tokens (num_actual_tokens)": (getattr(md, "num_actual_tokens", None), self.num_tokens),
        }
        table = getattr(md, "block_table", None)
        if isinstance(table, np.ndarray) and table.ndim == 2:
            got["block-table columns"] = (table.shape[1], self.width)
        wrong = {k: v for k, v in got.items() if v[0] != v[1]}
        if wrong:
            what = ", ".join(f"{k} {have} (bucket: {want})" for k, (have, want) in wrong.items())
            raise SpecError(
                f"bucket: the metadata does not have this bucket's shapes: {what}. Every step of a "
                f"bucket must have its exact shapes. Fix: build from `ladder.pad(batch, bucket)` with "
                f"the bucket `ladder.bucket_for(batch)`."
            )
        for name, limit in (("max_query_len", self.max_query_len), ("max_seq_len", self.max_seq_len)):
            value = getattr(md, name, None)
            if isinstance(value, int) and value > limit:
                raise SpecError(
                    f"bucket: the metadata's {name} {value} exceeds the bucket's bound {limit}, so a "
                    f"kernel sized by the bound could miss work. Fix: choose the bucket with "
                    f"`ladder.bucket_for(batch)`."
                )
        values = (self.num_reqs, self.num_tokens, self.max_query_len, self.max_seq_len)
        # A shallow copy with four scalars set: dataclasses.replace would re-run __init__ over
        # every field, a cost paid every step; the arrays are shared, as replace would share them.
        out = _shallow_copy(md)
        names = _field_names(type(md))
        for name, value in zip(BOUND_SCALARS, values, strict=True):
            if name in names:
                object.__setattr__(out, name, value)
        return out


class BucketLadder:
    """The buckets an engine pads its steps to, and the padding itself (host only, numpy).

    Args:
        max_num_reqs: most requests in one step (vLLM's `max_num_seqs`).
        max_num_tokens: most tokens in one step (vLLM's `max_num_batched_tokens`, or the
            largest CUDA-graph capture size); always a rung of the token ladder.
        max_model_len: longest sequence (context plus new tokens).
        block_size: tokens per KV-cache page.
        max_blocks_per_req: block-table width limit (default `ceil(max_model_len / block_size)`);
            always a rung of the width ladder.
        token_sizes: rungs of the token ladder (default: powers of two, then `max_num_tokens`).
            Pass vLLM's `cudagraph_capture_sizes` to share its buckets.
        width_sizes: rungs of the width ladder (default: powers of two, then
            `max_blocks_per_req`). One rung (`(max_blocks_per_req,)`) gives fewer buckets;
            several make narrow batches cheaper for kernels whose cost grows with the width
            (the JAX reference attention gathers `width * block_size` keys per token).
        uniform_query_len: query length of a uniform-decode batch: 1, or 1 + k with k
            speculative tokens (vLLM's `uniform_decode_query_len`).

    Example:
        >>> import attnsync
        >>> ladder = BucketLadder(max_num_reqs=64, max_num_tokens=256, max_model_len=2048,
        ...                       block_size=16)
        >>> batch = attnsync.Batch(query_lens=[1] * 5, seq_lens=[40, 9, 100, 7, 33],
        ...                        block_table=[[1, 2, 3, 4, 5, 6, 7]] * 5, block_size=16)
        >>> ladder.bucket_for(batch)
        Bucket(num_reqs=8, num_tokens=8, width=8, max_query_len=1, max_seq_len=128, uniform_query_len=1)
        >>> padded = ladder.pad(batch)
        >>> padded.padded_num_reqs, padded.padded_num_tokens, padded.block_table.shape
        (8, 8, (5, 8))
    """

    def __init__(
        self,
        *,
        max_num_reqs: int,
        max_num_tokens: int,
        max_model_len: int,
        block_size: int,
        max_blocks_per_req: int | None = None,
        token_sizes: Iterable[int] | None = None,
        width_sizes: Iterable[int] | None = None,
        uniform_query_len: int = 1,
    ) -> None:
        self.max_num_reqs = as_int(max_num_reqs, "max_num_reqs", minimum=1, maximum=INT32_MAX - 1)
        self.max_num_tokens = as_int(max_num_tokens, "max_num_tokens", minimum=1, maximum=INT32_MAX)
        self.max_model_len = as_int(max_model_len, "max_model_len", minimum=1, maximum=INT32_MAX)
        self.block_size = as_int(block_size, "block_size", minimum=1, maximum=INT32_MAX)
        default_width = -(-self.max_model_len // self.block_size)
        self.max_blocks_per_req = (
            default_width
            if max_blocks_per_req is None
            else as_int(max_blocks_per_req, "max_blocks_per_req", minimum=1, maximum=INT32_MAX)
        )
        self.uniform_query_len = as_int(uniform_query_len, "uniform_query_len", minimum=1)
        self.token_sizes = _ladder(token_sizes, self.max_num_tokens, "token_sizes")
        self.width_sizes = _ladder(width_sizes, self.max_blocks_per_req, "width_sizes")

    def __repr__(self) -> str:
        return (
            f"BucketLadder(max_num_reqs={self.max_num_reqs}, max_num_tokens={self.max_num_tokens}, "
            f"max_model_len={self.max_model_len}, block_size={self.block_size}, token_sizes="
            f"{list(self.token_sizes)}, width_sizes={list(self.width_sizes)}, uniform_query_len="
            f"{self.uniform_query_len})"
        )

    # -- bucket arithmetic ------------------------------------------------------------------

    def _rows_for(self, token_rung: int, uniform: bool) -> int:
        per_row = self.uniform_query_len if uniform else 1
        return min(token_rung // per_row, self.max_num_reqs)

    def _make(self, token_rung: int, width: int, uniform: bool) -> Bucket:
        return Bucket(
            num_reqs=self._rows_for(token_rung, uniform),
            num_tokens=token_rung,
            width=width,
            max_query_len=self.uniform_query_len if uniform else min(token_rung, self.max_model_len),
            max_seq_len=min(width * self.block_size, self.max_model_len),
            uniform_query_len=self.uniform_query_len if uniform else None,
        )

    def buckets(self) -> tuple[Bucket, ...]:
        """Every bucket of the ladder (uniform-decode and mixed, every width), smallest first.

        Some may never be chosen (a wide token rung with a narrow table can be out of reach);
        use this to warm up or capture everything up front, or let each bucket be prepared on
        its first use.
        """
        out = []
        for tokens in self.token_sizes:
            for width in self.width_sizes:
                if self._rows_for(tokens, True) >= 1:
                    out.append(self._make(tokens, width, True))
                out.append(self._make(tokens, width, False))
        return tuple(dict.fromkeys(out))

    def bucket_for(self, batch: Batch) -> Bucket:
        """The smallest bucket `batch` fits; `SpecError` naming the limit when none does.

        Host only: reads the batch's counts, no arrays are copied.
        """
        if not isinstance(batch, Batch):
            raise TypeError(f"bucket_for: expected an attnsync.Batch, received {type(batch).__name__}.")
        self._check_limits(batch)
        n, t = batch.num_reqs, batch.num_tokens
        q = batch.query_lens
        uniform = n > 0 and int(q.min()) == self.uniform_query_len == int(q.max())
        token_rung = None
        for rung in self.token_sizes:
            if rung >= t and self._rows_for(rung, uniform) >= n:
                token_rung = rung
                break
        if token_rung is None:  # only rows of zero tokens can get here: more rows than tokens
            raise SpecError(
                f"batch: {n} requests with {t} tokens fit no bucket: the biggest holds "
                f"{self._rows_for(self.token_sizes[-1], uniform)} rows (max_num_reqs="
                f"{self.max_num_reqs}, max_num_tokens={self.max_num_tokens}). Fix: schedule fewer "
                f"requests per step, or raise max_num_tokens."
            )
        pages = self._pages_needed(batch)
        width = next(w for w in self.width_sizes if w >= pages)  # _check_limits: pages <= cap
        return self._make(token_rung, width, uniform)

    def _pages_needed(self, batch: Batch) -> int:
        if batch.num_reqs == 0:
            return 0
        longest = int(batch.seq_lens.max())
        return -(-longest // self.block_size)

    def _check_limits(self, batch: Batch) -> None:
        """Refuse a batch beyond the biggest bucket, naming the limit it crosses."""
        if batch.block_size != self.block_size:
            raise SpecError(
                f"batch: block_size {batch.block_size} differs from the ladder's {self.block_size}. "
                f"Fix: build the ladder with the KV cache's page size."
            )
        n, t = batch.num_reqs, batch.num_tokens
        if n > self.max_num_reqs:
            raise SpecError(
                f"batch: {n} requests exceed the biggest bucket (max_num_reqs={self.max_num_reqs}). "
                f"Fix: schedule at most {self.max_num_reqs} requests per step, or raise max_num_reqs."
            )
        if t > self.token_sizes[-1]:
            raise SpecError(
                f"batch: {t} tokens exceed the biggest bucket (max_num_tokens={self.token_sizes[-1]}). "
                f"Fix: schedule at most {self.token_sizes[-1]} tokens per step (chunk long prompts), "
                f"or raise max_num_tokens."
            )
        if n:
            longest = int(batch.seq_lens.max())
            if longest > self.max_model_len:
                raise SpecError(
                    f"batch: a sequence of {longest} tokens exceeds max_model_len={self.max_model_len}. "
                    f"Fix: stop requests at max_model_len, or raise it."
                )
            pages = -(-longest // self.block_size)
            if pages > self.width_sizes[-1]:
                raise SpecError(
                    f"batch: a sequence of {longest} tokens needs {pages} pages, beyond the biggest "
                    f"bucket's block-table width (max_blocks_per_req={self.width_sizes[-1]}). Fix: "
                    f"raise max_blocks_per_req to at least {pages}."
                )

    # -- padding ----------------------------------------------------------------------------

    def fit_error(self, batch: Batch, bucket: Bucket) -> str | None:
        """Why `batch` does not fit `bucket` (a message naming the dimension), or None."""
        n, t = batch.num_reqs, batch.num_tokens
        problems = []
        if batch.block_size != self.block_size:
            problems.append(f"block_size {batch.block_size} (ladder: {self.block_size})")
        if n > bucket.num_reqs:
            problems.append(f"{n} requests (bucket rows: {bucket.num_reqs})")
        if t > bucket.num_tokens:
            problems.append(f"{t} tokens (bucket tokens: {bucket.num_tokens})")
        if n:
            pages = self._pages_needed(batch)
            if pages > bucket.width:
                problems.append(f"{pages} pages for the longest sequence (bucket width: {bucket.width})")
            longest = int(batch.seq_lens.max())
            if longest > bucket.max_seq_len:
                problems.append(f"a sequence of {longest} tokens (bucket max_seq_len: {bucket.max_seq_len})")
            max_q = int(batch.query_lens.max())
            if max_q > bucket.max_query_len:
                problems.append(f"a query of {max_q} tokens (bucket max_query_len: {bucket.max_query_len})")
        if not problems:
            return None
        return (
            f"bucket: the batch does not fit {bucket}: it has " + "; ".join(problems) + ". Fix: pick "
            "the bucket with `ladder.bucket_for(batch)` (or a bigger one)."
        )

    def pad(self, batch: Batch, bucket: Bucket | None = None) -> Batch:
        """`batch` padded to `bucket` (default: `bucket_for(batch)`), for `attnsync.build`.

        The result has `padded_num_reqs`, `padded_num_tokens` and a block table of exactly the
        bucket's width (cut after the pages in use, or padded with page 0); the request rows
        are shared, not copied. A batch that does not fit `bucket` raises `SpecError` naming
        the dimension, before anything else happens.
        """
        if not isinstance(batch, Batch):
            raise TypeError(f"pad: expected an attnsync.Batch, received {type(batch).__name__}.")
        if bucket is None:
            bucket = self.bucket_for(batch)
        elif not isinstance(bucket, Bucket):
            raise TypeError(f"pad: bucket must be a Bucket from this ladder, received {type(bucket).__name__}.")
        problem = self.fit_error(batch, bucket)
        if problem is not None:
            raise SpecError(problem)
        table = batch.block_table
        width = table.shape[1]
        if width != bucket.width:
            if width > bucket.width:  # the cut columns lie past every row's last page (checked)
                table = np.ascontiguousarray(table[:, : bucket.width])
            else:
                wider = np.zeros((table.shape[0], bucket.width), dtype=np.int32)
                wider[:, :width] = table
                table = wider
            freeze(table)
        # Everything Batch validated still holds: only the padding sizes (checked against the
        # real counts above) and the table's unused columns change. Skipping a second
        # validation saves a large share of a step's host time (what this module exists to save).
        padded = copy.copy(batch)
        object.__setattr__(padded, "block_table", table)
        object.__setattr__(padded, "padded_num_reqs", bucket.num_reqs)
        object.__setattr__(padded, "padded_num_tokens", bucket.num_tokens)
        return padded

    def example_batch(self, bucket: Bucket) -> Batch:
        """A small valid batch padded to `bucket`: one real row, for warm-up and capture.

        Its metadata has the bucket's shapes and, after `Bucket.bound`, the bucket's static
        scalars, like every real step of the bucket; only the per-step values differ.
        """
        q = bucket.uniform_query_len or 1
        seq = min(q + 1, bucket.max_seq_len)  # a decode row with context, where the bucket allows
        return Batch(
            query_lens=[q],
            seq_lens=[max(seq, q)],
            block_table=np.zeros((1, bucket.width), dtype=np.int32),
            block_size=self.block_size,
            padded_num_reqs=bucket.num_reqs,
            padded_num_tokens=bucket.num_tokens,
        )


def scalar_roles(md_class: type) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Split a metadata class's host scalars into (bound, per-step, static) names.

    Bound scalars take the bucket's worst case, per-step scalars (`STEP_SCALARS`, ints and
    bools only) become data in a bucketed lowering, the rest are static build options.
    """
    bound, step, static = [], [], []
    for f in scalar_fields(md_class):
        if f.name in BOUND_SCALARS:
            bound.append(f.name)
        elif f.name in STEP_SCALARS:
            step.append(f.name)
        else:
            static.append(f.name)
    return tuple(bound), tuple(step), tuple(static)
