"""The ``mamba`` backend: Mamba1 / Mamba2 state-space metadata (as vLLM's Mamba backends take it).

Host only, numpy only (the "plan" phase). A Mamba layer runs two paths over one batch:

- **decode rows** (the first `num_decodes` rows): at most `decode_threshold` new tokens each,
  advanced by the one-step recurrence from the state slots in `state_indices_tensor_d`;
- **prefill rows** (every other row: short extends, long extends, fresh prefills): a varlen
  causal conv1d and a chunked scan over `query_start_loc_p`, starting from the state slot in
  `state_indices_tensor_p` when `has_initial_states_p`.

The batch must be in the strict four-region decode-first order (decode, short extend, long
extend, prefill; `attnsync.reorder`). Everything the host knows is computed here, so the
device never reports anything back: `prep_initial_states` (vLLM read it with `.item()`) and
the prefill `num_computed_tokens_p` come from host lengths, which are exact for prefill rows
even when decode rows carry an optimistic upper bound (async speculative decoding).

Options (keyword-only):
    variant: ``"mamba2"`` (default) or ``"mamba1"``.
    chunk_size: scan chunk length, required for Mamba2 (the model's ``chunk_size``). Mamba1
        takes none: it uses ``block_size`` as its chunk and builds chunk metadata only in
        cache mode ``"all"``.
    cache_mode: how state slots are addressed, read from the batch's ``block_table``:
        ``"none"``: one state per request in column 0 (columns 0..k hold the 1 + k
        speculative state slots of a decode row);
        ``"all"`` (prefix caching): column ``i`` holds the state after token
        ``min((i + 1) * block_size, seq_len)``, so every full block is a checkpoint;
        ``"align"``: the slots of the page holding the last token and the k pages after it,
        columns ``max((seq_len - 1) // block_size, 0) + [0, k]``. The engine copies a
        continued request's state into that page before the step, as vLLM does.
        Modes ``"all"`` and ``"align"`` place states by each row's exact length, so they
        refuse batches with inexact rows; mode ``"none"`` accepts them.
    num_spec_tokens: k, draft tokens per decode row (default 0).
    num_accepted_tokens: optional host ints, accepted tokens of each decode row's previous
        step (1..1+k), one per request row or one per decode row; passed through to the
        device. Giving it turns on speculative decoding: the decode threshold becomes 1 + k.
        Under async scheduling the counts exist only on the device (the rejection sampler's
        output) and the host must not wait for them: pass placeholders (ones) here and swap the
        device tensor into the lowered object, ``dataclasses.replace(lowered,
        num_accepted_tokens=counts)`` (int32, shape [num_decode_rows], padded rows 1). Nothing
        on the host depends on the values.
    decode_threshold: rows with at most this many new tokens are decodes (default: 1 + k
        when `num_accepted_tokens` is given, else 1).
    conv_capacity: length of the conv1d launch arrays (see `MambaMetadata.batch_ptr`).
        Default: the smallest power of two >= max(num_conv_programs, 16), so a JAX jit or a
        graph sees few distinct shapes. Pass a fixed value for one static shape; a safe one is
        ``max_num_batched_tokens // 8 + max_num_reqs`` (each row adds at most one partial
        block of 8 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._batch import DECODE, Batch, require_decode_first
from .._fields import pages_per_seq
from .._spec import PAD_SLOT_ID, array_field
from .._validate import INT32_MAX, SpecError, as_choice, as_int, as_int_array, freeze

VARIANTS = ("mamba2", "mamba1")
CACHE_MODES = ("none", "all", "align")
CONV_BLOCK_M = 8  # tokens per program of the varlen causal-conv1d launch (vLLM's BLOCK_M)
MIN_CONV_CAPACITY = 16  # smallest default bucket of the conv1d launch arrays

_I32 = np.int32


@dataclass(frozen=True, kw_only=True, eq=False)
class MambaMetadata:
    """Mamba metadata of one step: numpy arrays (read-only) and host scalars.

    R is `num_reqs` (padded rows), nd / np the decode / prefill rows, Dr `num_decode_rows`
    (nd, or R when the batch is decode-only, so padded rows join the decode path with
    slot -1), K `num_chunks`, W the block-table width. Every array is int32 unless noted;
    "device" fields are staged by the adapters, "both" also keep a host mirror (`*_cpu` in
    torch).

    Attributes:
        seq_lens: [R], context per row after this step, exact for prefill rows, an upper
            bound on inexact decode rows; padded rows 0. Both (host name
            `seq_lens_cpu_upper_bound`). The reference consumers read it only in mode "all".
        query_start_loc_p: [np+1], prefill token offsets rebased to 0:
            `query_start_loc[nd:nd+np+1] - num_decode_tokens`. Both.
        query_start_loc_d: [Dr+1], decode token offsets, `query_start_loc[:nd+1]`, padded
            rows repeat the last value. Both.
        num_computed_tokens_p: [np], tokens already in each prefill row's state, from the
            host lengths (exact for prefill rows). Both.
        has_initial_states_p: [np] bool, `num_computed_tokens_p > 0`. Both (JAX: int32).
        state_indices_tensor_p: state slots of the prefill rows: [np] (modes "none",
            "align") or [np, W] (mode "all", the whole row). Device.
        state_indices_tensor_d: state slots of the decode rows: [Dr, 1+k] (modes "none",
            "align") or [Dr, W] (mode "all"); padded rows -1. Device.
        num_accepted_tokens: [Dr] accepted tokens of each decode row (padded rows 1), or [0]
            when not given. Device.
        block_idx_last_scheduled_token: [R] (mode "all", else [0]): column of the block that
            holds each row's last token, `max(ceil(seq_len / bs) - 1, 0)`. Device.
        block_idx_first_scheduled_token_p: [np] (mode "all", else [0]): column of the block
            of each prefill row's first new token, `num_computed // bs`. Device.
        block_idx_last_computed_token: [R] (mode "all", else [0]): column holding the state
            after the already-computed tokens, `max(ceil(num_computed / bs) - 1, 0)`. Device.
        cu_chunk_seqlen_p: [K+1] token offsets (in prefill tokens) of the scan chunks; a
            chunk never crosses a request and every multiple of `chunk_size` in absolute
            position starts a chunk. [0] when there is no chunk metadata. Device.
        seq_idx_p: [K] prefill request of each chunk. Device.
        last_chunk_indices_p: [np] index of each prefill request's last chunk (a request
            without new tokens repeats the previous value; -1 before any chunk). Device.
        batch_ptr: [conv_capacity] prefill request of each conv1d program, -1 padding. Device.
        token_chunk_offset_ptr: [conv_capacity] block of `CONV_BLOCK_M` tokens each program
            handles inside its request, -1 padding. Device.
        num_reqs, num_actual_tokens: R and T (padded). num_scheduled_reqs,
            num_scheduled_tokens: the real counts.
        num_decodes, num_decode_tokens, num_prefills, num_prefill_tokens: the split (prefills
            are all non-decode rows). num_decode_rows: Dr.
        num_short_extends, num_long_extends, num_fresh_prefills: the prefill rows by region.
        max_query_len, max_seq_len (a bound), max_decode_query_len, max_prefill_query_len.
        decode_threshold, num_spec_tokens, has_num_accepted_tokens, variant, cache_mode,
        block_size.
        chunk_size: the scan chunk (Mamba1 "all": block_size; 0 without chunk metadata).
        has_chunk_metadata, num_chunks: K.
        prep_initial_states: any prefill row starts from a stored state (host bool).
        num_conv_programs, conv_block_m, conv_capacity: the conv1d launch.
        all_exact: every row's length is exact.
    """

    seq_lens: np.ndarray = array_field(place="both", host_name="seq_lens_cpu_upper_bound")
    query_start_loc_p: np.ndarray = array_field(place="both")
    query_start_loc_d: np.ndarray = array_field(place="both")
    num_computed_tokens_p: np.ndarray = array_field(place="both")
    has_initial_states_p: np.ndarray = array_field(place="both")
    state_indices_tensor_p: np.ndarray = array_field(place="device")
    state_indices_tensor_d: np.ndarray = array_field(place="device")
    num_accepted_tokens: np.ndarray = array_field(place="device")
    block_idx_last_scheduled_token: np.ndarray = array_field(place="device")
    block_idx_first_scheduled_token_p: np.ndarray = array_field(place="device")
    block_idx_last_computed_token: np.ndarray = array_field(place="device")
    cu_chunk_seqlen_p: np.ndarray = array_field(place="device")
    seq_idx_p: np.ndarray = array_field(place="device")
    last_chunk_indices_p: np.ndarray = array_field(place="device")
    batch_ptr: np.ndarray = array_field(place="device")
    token_chunk_offset_ptr: np.ndarray = array_field(place="device")
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    num_decode_rows: int
    num_short_extends: int
    num_long_extends: int
    num_fresh_prefills: int
    max_query_len: int
    max_seq_len: int
    max_decode_query_len: int
    max_prefill_query_len: int
    decode_threshold: int
    num_spec_tokens: int
    has_num_accepted_tokens: bool
    variant: str
    cache_mode: str
    block_size: int
    chunk_size: int
    has_chunk_metadata: bool
    num_chunks: int
    prep_initial_states: bool
    num_conv_programs: int
    conv_block_m: int
    conv_capacity: int
    all_exact: bool


def chunk_metadata(
    num_computed: np.ndarray, query_start_loc: np.ndarray, chunk_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan chunks of prefill rows: `(cu_chunk_seqlen, seq_idx, last_chunk_indices)`, int32.

    Vectorised, no loop over requests. A row with c computed and n new tokens first fills its
    partial chunk, `f = min((-c) % chunk_size, n)` tokens when c is not a multiple, then
    `ceil((n - f) / chunk_size)` chunks. Chunk j of a row starts `max(0, f - chunk_size * [f > 0]
    + j * chunk_size)` tokens in (0 for the partial chunk, then f, f + chunk, ...), so chunk
    starts sit on request boundaries and on multiples of `chunk_size` in absolute position.

    Args:
        num_computed: [np] tokens already computed per prefill row (exact).
        query_start_loc: [np+1] prefill token offsets, [0] == 0.
        chunk_size: > 0.

    Example:
        >>> cu, seq, last = chunk_metadata(np.array([0, 5]), np.array([0, 6, 13]), 4)
        >>> cu.tolist(), seq.tolist(), last.tolist()
        ([0, 4, 6, 9, 13], [0, 0, 1, 1], [1, 3])
    """
    if num_computed.size == 0:  # no prefill rows (a decode-only step): the common fast path
        return np.zeros(1, dtype=_I32), np.zeros(0, dtype=_I32), np.zeros(0, dtype=_I32)
    c = num_computed.astype(np.int64)
    qsl = query_start_loc.astype(np.int64)
    n = qsl[1:] - qsl[:-1]
    first = np.minimum((-c) % chunk_size, n)  # 0 when c is aligned (or the row is empty)
    has_first = (first > 0).astype(np.int64)
    counts = has_first + -(-(n - first) // chunk_size)
    ends = np.cumsum(counts)
    total = int(ends[-1]) if ends.size else 0
    seq_idx = np.repeat(np.arange(c.size, dtype=np.int64), counts)
    j = np.arange(total, dtype=np.int64) - (ends - counts)[seq_idx]  # chunk index inside its row
    start = np.maximum(0, first[seq_idx] - chunk_size * has_first[seq_idx] + j * chunk_size)
    cu = np.empty(total + 1, dtype=_I32)
    cu[:total] = qsl[:-1][seq_idx] + start
    cu[total] = qsl[-1] if qsl.size else 0
    return cu, seq_idx.astype(_I32), (ends - 1).astype(_I32)


def conv1d_metadata(query_start_loc: np.ndarray, capacity: int | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Varlen causal-conv1d launch arrays: `(batch_ptr, token_chunk_offset_ptr, programs, capacity)`.

    Row r of the prefill rows gets `ceil(n_r / 8)` programs; program i handles tokens
    `[8 * token_chunk_offset_ptr[i], +8)` of row `batch_ptr[i]`. Both arrays are padded with
    -1 to `capacity` (see the module docstring for the default bucket).
    """
    if query_start_loc.size > 1:
        qsl = query_start_loc.astype(np.int64)
        n = qsl[1:] - qsl[:-1]
        counts = -(-n // CONV_BLOCK_M)
        ends = np.cumsum(counts)
        programs = int(ends[-1])
    else:
        programs = 0
    if capacity is None:
        capacity = 1 << (max(programs, MIN_CONV_CAPACITY) - 1).bit_length()
    elif capacity < programs:
        raise SpecError(
            f"conv_capacity: {capacity} is smaller than the {programs} conv1d programs this batch "
            f"needs (ceil(query_len / {CONV_BLOCK_M}) per prefill row). Fix: pass at least "
            f"max_num_batched_tokens // {CONV_BLOCK_M} + max_num_reqs, or leave it None."
        )
    batch_ptr = np.full(capacity, PAD_SLOT_ID, dtype=_I32)
    offsets = np.full(capacity, PAD_SLOT_ID, dtype=_I32)
    if not programs:
        return batch_ptr, offsets, programs, capacity
    owner = np.repeat(np.arange(n.size, dtype=np.int64), counts)
    batch_ptr[:programs] = owner
    offsets[:programs] = np.arange(programs, dtype=np.int64) - (ends - counts)[owner]
    return batch_ptr, offsets, programs, capacity


def _pad_rows(values: np.ndarray, length: int, fill: int) -> np.ndarray:
    if values.shape[0] == length:
        return np.ascontiguousarray(values, dtype=_I32)
    out = np.full((length, *values.shape[1:]), fill, dtype=_I32)
    out[: values.shape[0]] = values
    return out


def _accepted(value: Any, num_reqs: int, num_decodes: int, k: int) -> np.ndarray:
    accepted = as_int_array(value, "num_accepted_tokens", ndim=1)
    if accepted.shape[0] not in (num_reqs, num_decodes):
        raise SpecError(
            f"num_accepted_tokens: expected one value per request ({num_reqs}) or per decode row "
            f"({num_decodes}), received {accepted.shape[0]}. Fix: pass the previous step's accepted "
            f"token counts in the reordered row order."
        )
    accepted = accepted[:num_decodes]
    bad = (accepted < 1) | (accepted > 1 + k)
    if bad.any():
        row = int(np.argmax(bad))
        raise SpecError(
            f"num_accepted_tokens: decode row {row} has {int(accepted[row])}; expected 1..{1 + k} "
            f"(the bonus token plus at most num_spec_tokens={k} accepted drafts). Fix: pass "
            f"num_spec_tokens=k matching the drafter."
        )
    return accepted


def _refuse_narrow(need: np.ndarray, width: int, mode: str, k: int) -> None:
    """Refuse a block table too narrow for the state-slot columns of `mode`."""
    if not need.size or int(need.max()) <= width:
        return
    narrow = need > width
    if narrow.any():
        row = int(np.argmax(narrow))
        raise SpecError(
            f"block_table: cache_mode {mode!r} with num_spec_tokens={k} reads column "
            f"{int(need[row]) - 1} of row {row}, but the table has {width} columns. Fix: give each "
            f"row its 1 + num_spec_tokens state slots (vLLM allocates num_speculative_blocks extra "
            f"blocks per request)."
        )


def build(
    batch: Batch,
    /,
    *,
    variant: str = "mamba2",
    chunk_size: int | None = None,
    cache_mode: str = "none",
    num_spec_tokens: int = 0,
    num_accepted_tokens: Any = None,
    decode_threshold: int | None = None,
    conv_capacity: int | None = None,
) -> MambaMetadata:
    """Build the Mamba metadata of `batch` on the host (numpy only). Options: module docstring.

    Example:
        >>> import attnsync
        >>> batch = attnsync.Batch(query_lens=[1, 7, 6], seq_lens=[9, 12, 6],
        ...                        block_table=[[3], [4], [5]], block_size=16)
        >>> md = attnsync.build(batch, backend="mamba", chunk_size=4)
        >>> md.num_decodes, md.query_start_loc_p.tolist(), md.has_initial_states_p.tolist()
        (1, [0, 7, 13], [True, False])
        >>> md.cu_chunk_seqlen_p.tolist(), md.seq_idx_p.tolist(), md.last_chunk_indices_p.tolist()
        ([0, 3, 7, 11, 13], [0, 0, 1, 1], [1, 3])
        >>> md.state_indices_tensor_p.tolist(), md.state_indices_tensor_d.tolist()
        ([4, 5], [[3]])
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"batch: expected an attnsync.Batch, received {type(batch).__name__}.")
    variant = as_choice(variant, "variant", VARIANTS)
    mode = as_choice(cache_mode, "cache_mode", CACHE_MODES)
    k = as_int(num_spec_tokens, "num_spec_tokens", minimum=0, maximum=INT32_MAX - 1)
    spec = num_accepted_tokens is not None
    threshold = (
        (1 + k if spec else 1) if decode_threshold is None
        else as_int(decode_threshold, "decode_threshold", minimum=1)
    )
    bs = batch.block_size
    if variant == "mamba2":
        if chunk_size is None:
            raise SpecError(
                "chunk_size: Mamba2 needs the model's scan chunk size (e.g. 256). Fix: "
                "attnsync.build(batch, backend='mamba', chunk_size=...)."
            )
        chunk = as_int(chunk_size, "chunk_size", minimum=1)
        if mode == "all" and bs % chunk:
            raise SpecError(
                f"chunk_size: cache_mode 'all' stores a state at every block boundary, so "
                f"block_size ({bs}) must be a multiple of chunk_size ({chunk}) for every checkpoint "
                f"to end a chunk. Fix: choose a block size that is a multiple of the chunk size."
            )
    else:
        if chunk_size is not None:
            raise SpecError(
                f"chunk_size: Mamba1 has no chunk_size option (received {chunk_size!r}); it uses "
                f"block_size as its chunk in cache_mode 'all'. Fix: leave chunk_size out."
            )
        chunk = bs if mode == "all" else 0

    n, r_pad = batch.num_reqs, batch.padded_num_reqs
    q, s, table = batch.query_lens, batch.seq_lens, batch.block_table
    exact = batch.seq_lens_exact
    region = batch.regions(threshold)
    if n > 1 and (region[1:] < region[:-1]).any():  # the core check names the row and the fix
        require_decode_first(batch, decode_threshold=threshold, backend="mamba", strict=True)
    nd = int(np.count_nonzero(region == DECODE))
    npf = n - nd
    region_counts = np.bincount(region[nd:], minlength=4)
    all_exact = bool(exact.all())
    if not exact[nd:].all():
        row = nd + int(np.argmin(exact[nd:]))
        raise SpecError(
            f"batch: row {row} is marked inexact (seq_lens_exact=False) but has {int(q[row])} new "
            f"tokens, more than the decode threshold {threshold}, so Mamba runs it on the prefill "
            f"path, which needs its exact computed-token count. Fix: pass num_spec_tokens=k and "
            f"num_accepted_tokens (threshold 1 + k), or decode_threshold >= {int(q[row])}."
        )
    if mode != "none" and not all_exact:
        row = int(np.argmin(exact))
        raise SpecError(
            f"batch: cache_mode {mode!r} places each row's state by its exact length, but row {row} "
            f"is marked inexact (an async speculative-decoding upper bound). Fix: pass exact "
            f"seq_lens (after the previous step's accepted counts are known) or use cache_mode "
            f"'none'."
        )

    qsl = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q, out=qsl[1:])
    ndt = int(qsl[nd])
    qsl_p = (qsl[nd:] - ndt).astype(_I32)
    computed_p = (s[nd:] - q[nd:]).astype(_I32)  # exact: prefill rows carry no drafts
    has_init = computed_p > 0
    decode_only = npf == 0
    decode_rows = r_pad if decode_only else nd
    qsl_d = np.full(decode_rows + 1, qsl[nd], dtype=_I32)
    qsl_d[: nd + 1] = qsl[: nd + 1]

    width = table.shape[1]
    empty = np.zeros(0, dtype=_I32)
    if n and width == 0:
        raise SpecError(
            "block_table: Mamba reads each row's state slot from the block table, which has no "
            "columns. Fix: pass at least one column (the state slot) per row."
        )
    if mode == "all":
        idx_p = table[nd:]
        idx_d = _pad_rows(table[:nd], decode_rows, PAD_SLOT_ID)
        pages = pages_per_seq(s, bs)
        done = pages_per_seq(s - q, bs)
        last_sched = _pad_rows(np.maximum(pages - 1, 0), r_pad, 0)
        last_comp = _pad_rows(np.maximum(done - 1, 0), r_pad, 0)
        first_sched = (computed_p // bs).astype(_I32)
    else:
        if mode == "none":
            base = np.zeros(n, dtype=np.int64)
        else:
            base = np.maximum((s.astype(np.int64) - 1) // bs, 0)
        _refuse_narrow(base[:nd] + 1 + k, width, mode, k)
        _refuse_narrow(base[nd:] + 1, width, mode, k)
        idx_p = table[np.arange(nd, n), base[nd:]]
        cols = base[:nd, None] + np.arange(1 + k)
        idx_d = _pad_rows(table[np.arange(nd)[:, None], cols], decode_rows, PAD_SLOT_ID)
        last_sched = last_comp = first_sched = empty
    if spec:
        if nd and int(q[:nd].max()) > 1 + k:
            row = int(np.argmax(q[:nd]))
            raise SpecError(
                f"decode_threshold: decode row {row} has {int(q[row])} new tokens, but speculative "
                f"decoding keeps only 1 + num_spec_tokens = {1 + k} state slots per decode row. Fix: "
                f"leave decode_threshold at its default 1 + k, or raise num_spec_tokens."
            )
        accepted = _pad_rows(_accepted(num_accepted_tokens, n, nd, k), decode_rows, 1)
    else:
        accepted = empty

    if chunk:
        cu, seq_idx, last_chunk = chunk_metadata(computed_p, qsl_p, chunk)
    else:
        cu, seq_idx, last_chunk = empty, empty, empty
    if conv_capacity is not None:
        conv_capacity = as_int(conv_capacity, "conv_capacity", minimum=0, maximum=INT32_MAX)
    batch_ptr, offsets, programs, capacity = conv1d_metadata(qsl_p, conv_capacity)

    arrays = dict(
        seq_lens=_pad_rows(s, r_pad, 0),
        query_start_loc_p=qsl_p,
        query_start_loc_d=qsl_d,
        num_computed_tokens_p=computed_p,
        has_initial_states_p=has_init,
        state_indices_tensor_p=np.ascontiguousarray(idx_p, dtype=_I32),
        state_indices_tensor_d=idx_d,
        num_accepted_tokens=accepted,
        block_idx_last_scheduled_token=last_sched,
        block_idx_first_scheduled_token_p=first_sched,
        block_idx_last_computed_token=last_comp,
        cu_chunk_seqlen_p=cu,
        seq_idx_p=seq_idx,
        last_chunk_indices_p=last_chunk,
        batch_ptr=batch_ptr,
        token_chunk_offset_ptr=offsets,
    )
    for value in arrays.values():
        if value.flags.writeable:  # views of the batch's arrays are read-only already
            freeze(value)
    q_d, q_p = q[:nd], q[nd:]
    return MambaMetadata(
        **arrays,
        num_reqs=r_pad,
        num_actual_tokens=batch.padded_num_tokens,
        num_scheduled_reqs=n,
        num_scheduled_tokens=batch.num_tokens,
        num_decodes=nd,
        num_decode_tokens=ndt,
        num_prefills=npf,
        num_prefill_tokens=int(qsl[n]) - ndt,
        num_decode_rows=decode_rows,
        num_short_extends=int(region_counts[1]),
        num_long_extends=int(region_counts[2]),
        num_fresh_prefills=int(region_counts[3]),
        max_query_len=int(q.max()) if n else 0,
        max_seq_len=int(s.max()) if n else 0,
        max_decode_query_len=int(q_d.max()) if nd else 0,
        max_prefill_query_len=int(q_p.max()) if npf else 0,
        decode_threshold=threshold,
        num_spec_tokens=k,
        has_num_accepted_tokens=spec,
        variant=variant,
        cache_mode=mode,
        block_size=bs,
        chunk_size=chunk,
        has_chunk_metadata=bool(chunk),
        num_chunks=int(seq_idx.shape[0]),
        prep_initial_states=bool(has_init.any()),
        num_conv_programs=programs,
        conv_block_m=CONV_BLOCK_M,
        conv_capacity=capacity,
        all_exact=all_exact,
    )
