"""The ``triton`` backend: metadata for attnsync's Triton paged attention.

No reordering and no split: one kernel handles mixed batches. What the host adds to the
common fields is the kernel choice and its scratch sizes, and the bidirectional multimodal
prefix ranges as one padded int32 array that travels in the packed staging buffer (vLLM
built it with `torch.tensor(..., device=cuda)`, a blocking copy every step).

Options:
    num_q_heads, num_kv_heads, head_dim: the layer's shape (keyword-only, required); they
        size the split-KV scratch and set the 2D/split-KV threshold.
    seq_threshold_3d: batches of at most this many rows, all single-token decodes, use the
        split-KV path (default `max(1, 128 // num_kv_heads)`: below that the 2D grid has too
        few programs to fill the GPU). Under CUDA graphs pass the capture size, so each
        captured graph has a fixed choice.
    split_kv_min_seq_len: the split-KV path is taken only when, in addition, the longest row
        (`max_seq_len`, a host upper bound) has at least this many keys (default
        `DEFAULT_SPLIT_KV_MIN_SEQ_LEN`, 1024): short rows give each program little KV to
        walk, and the 2D kernel alone beats split-KV plus its reduce launch. 0 restores the row-count rule alone (vLLM's). Under CUDA
        graphs, where a captured graph has one fixed path, pass 0 (or capture both paths):
        with a length condition the same row count can take either path.
    num_segments: KV segments of the split-KV path (default 16).
    prefix_ranges: optional per-request list of half-open absolute position ranges
        [start, end) with bidirectional attention (multimodal prefixes): a sequence of
        length num_reqs (None or a list of (start, end) pairs per row), or a dict
        row -> list of pairs.
    decode_threshold: split threshold of the common metadata (default 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._batch import Batch
from .._spec import array_field, build_common, inherit
from .._validate import SpecError, as_int, freeze

DEFAULT_NUM_SEGMENTS = 16  # partial-softmax segments per row on the split-KV path (vLLM uses 16)
# Split-KV only pays off for long rows. At 512 keys (8 KV tiles of 64) the split grid gets at
# most 8 one-tile segments, and its second (reduce) launch and the fp32 partials' round trip
# cost more than walking 8 tiles in one 2D program: it ran slower on an H100. At 4096 keys a
# 2D program walks 64 tiles in sequence while few programs fill the GPU: the case split-KV
# exists for. 1024 keys is the first length at which each of the 16 segments gets a full tile;
# the exact crossover is not pinned down yet (tests/gpu/test_triton_gpu.py::
# test_split_kv_crossover_sweep prints a sweep on a GPU host; move this default to what it shows).
DEFAULT_SPLIT_KV_MIN_SEQ_LEN = 1024


@dataclass(frozen=True, kw_only=True, eq=False)
class TritonMetadata:
    """Metadata of `attnsync.kernels.triton_attention.unified_paged_attention`.

    Attributes:
        query_start_loc: [R+1] int32 (device and host), as in `CommonMetadata`.
        seq_lens: [R] int32 (device; host `seq_lens_cpu_upper_bound`), exact or upper bound.
        block_table: [R, W] int32 page ids (device `block_table`).
        slot_mapping: [T] int32 (int64 in torch), -1 for padding (device).
        prefix_ranges: [R, M, 2] int32 half-open [start, end) bidirectional ranges per row,
            padded with (0, 0); M = 0 when there are none (device `mm_prefix_range_tensor`).
        num_reqs, num_actual_tokens, max_query_len, max_seq_len, block_size: as in common
            (`max_seq_len` is an upper bound, which is all grid sizing needs).
        use_split_kv: take the split-KV path (decode-only batch of <= seq_threshold_3d rows
            whose max_seq_len >= split_kv_min_seq_len).
        seq_threshold_3d, num_segments: split-KV threshold and segments per row.
        split_kv_min_seq_len: shortest max_seq_len that takes the split-KV path.
        segm_output_shape: shape of the fp32 split-KV output scratch,
            (seq_threshold_3d, num_q_heads, num_segments, next_pow2(head_dim)).
        segm_stats_shape: shape of the fp32 max and exp-sum scratch buffers,
            (seq_threshold_3d, num_q_heads, num_segments).
        has_prefix_ranges: True when any row has a non-empty range.
    """

    query_start_loc: np.ndarray = array_field(place="both")
    seq_lens: np.ndarray = array_field(place="both", host_name="seq_lens_cpu_upper_bound")
    block_table: np.ndarray = array_field(place="device")
    slot_mapping: np.ndarray = array_field(place="device")
    prefix_ranges: np.ndarray = array_field(place="device", device_name="mm_prefix_range_tensor")
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    use_split_kv: bool
    seq_threshold_3d: int
    num_segments: int
    split_kv_min_seq_len: int
    segm_output_shape: tuple[int, int, int, int]
    segm_stats_shape: tuple[int, int, int]
    has_prefix_ranges: bool
    slot_mapping_exact: bool


def _next_pow2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _prefix_ranges(ranges: Any, batch: Batch, num_rows: int) -> np.ndarray:
    """Pad per-request ranges into [num_rows, M, 2] int32, validating each pair."""
    if ranges is None:
        return np.zeros((num_rows, 0, 2), dtype=np.int32)
    if isinstance(ranges, Mapping):
        per_row: list[Any] = [None] * batch.num_reqs
        for row, value in ranges.items():
            r = as_int(row, "prefix_ranges (row key)", minimum=0, maximum=max(batch.num_reqs - 1, 0))
            if batch.num_reqs == 0:
                raise SpecError("prefix_ranges: the batch has no requests, but ranges were given.")
            per_row[r] = value
    elif isinstance(ranges, Sequence) and not isinstance(ranges, str | bytes):
        if len(ranges) != batch.num_reqs:
            raise SpecError(
                f"prefix_ranges: expected one entry per request ({batch.num_reqs}), received "
                f"{len(ranges)}. Fix: use None for rows without ranges, or pass a dict row -> ranges."
            )
        per_row = list(ranges)
    else:
        raise TypeError(
            f"prefix_ranges: expected a list (one entry per request) or a dict row -> list of "
            f"(start, end) pairs, received {type(ranges).__name__}."
        )
    width = max((len(v) for v in per_row if v is not None), default=0)
    out = np.zeros((num_rows, width, 2), dtype=np.int32)
    for r, pairs in enumerate(per_row):
        for i, pair in enumerate(pairs or ()):
            if len(pair) != 2:
                raise SpecError(f"prefix_ranges: row {r} entry {i} is {pair!r}; expected a (start, end) pair.")
            start = as_int(pair[0], f"prefix_ranges[{r}][{i}].start", minimum=0)
            end = as_int(pair[1], f"prefix_ranges[{r}][{i}].end", minimum=0)
            limit = int(batch.seq_lens[r])
            if not start <= end <= limit:
                raise SpecError(
                    f"prefix_ranges: row {r} range ({start}, {end}) must satisfy 0 <= start <= end <= "
                    f"seq_len ({limit}); ranges are half-open absolute token positions."
                )
            out[r, i] = (start, end)
    return out


def build(
    batch: Batch,
    /,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seq_threshold_3d: int | None = None,
    num_segments: int = DEFAULT_NUM_SEGMENTS,
    split_kv_min_seq_len: int = DEFAULT_SPLIT_KV_MIN_SEQ_LEN,
    prefix_ranges: Any = None,
    decode_threshold: int = 1,
) -> TritonMetadata:
    """Build the Triton backend's metadata on the host (numpy only). See the module docstring."""
    hq = as_int(num_q_heads, "num_q_heads", minimum=1)
    hkv = as_int(num_kv_heads, "num_kv_heads", minimum=1)
    if hq % hkv:
        raise SpecError(
            f"num_q_heads: {hq} is not a multiple of num_kv_heads {hkv}; grouped-query attention "
            f"shares each kv head among num_q_heads // num_kv_heads query heads."
        )
    dim = as_int(head_dim, "head_dim", minimum=1)
    threshold = (
        max(1, 128 // hkv) if seq_threshold_3d is None else as_int(seq_threshold_3d, "seq_threshold_3d", minimum=1)
    )
    segments = as_int(num_segments, "num_segments", minimum=1)
    min_seq_len = as_int(split_kv_min_seq_len, "split_kv_min_seq_len", minimum=0)
    common = build_common(batch, decode_threshold=decode_threshold)
    ranges = freeze(_prefix_ranges(prefix_ranges, batch, common.num_reqs))
    use_split_kv = (
        common.num_scheduled_reqs > 0
        and common.max_query_len <= 1
        and common.num_reqs <= threshold
        and common.max_seq_len >= min_seq_len
    )
    return inherit(
        common,
        TritonMetadata,
        prefix_ranges=ranges,
        use_split_kv=bool(use_split_kv),
        seq_threshold_3d=threshold,
        num_segments=segments,
        split_kv_min_seq_len=min_seq_len,
        segm_output_shape=(threshold, hq, segments, _next_pow2(dim)),
        segm_stats_shape=(threshold, hq, segments),
        has_prefix_ranges=bool((ranges[..., 1] > ranges[..., 0]).any()),
    )
