"""CUDA graphs over attnsync metadata: persistent lowerings per bucket, captured decode steps.

Importing this module imports torch (never flashinfer or triton: those are imported by the
classes that launch their kernels).

A captured CUDA graph replays fixed kernel launches: the same tensor addresses, shapes and host
scalars every time. What changes between replays must change *inside*
tensors at fixed addresses. The pieces:

- `PersistentLowering`: the device buffers of one bucket (`attnsync._buckets.Bucket`),
  allocated once; every step is written in place by the one pinned non_blocking copy of
  `attnsync.adapters.torch.lower`, and the host scalars are the bucket's worst case
  (`Bucket.bound`), never the step's own values. Metadata of other shapes is refused before
  anything is written.
- `PersistentLadder`: one `PersistentLowering` per bucket of a `BucketLadder`, made on first
  use (the torch counterpart of the bucketed JAX lowering).
- `TritonGraph`: the attention of every layer of a decode step, attnsync's Triton kernel
  (`unified_paged_attention`), captured once for one bucket and replayed with new metadata.
- `FlashInferDecodeGraph`: the same with FlashInfer's CUDA-graph decode wrapper
  (`make_decode_cuda_graph_wrapper`); its fixed buffers are refreshed by `plan()` before each
  replay, planned for all the bucket's rows (padded rows get no pages, as in vLLM).
- `GraphLadder`: one captured step per bucket, chosen per batch.
- `OverlappedSteps`: two captured steps of a bucket used in turn, each step's uploads on a
  side stream overlapping the other's replay.
- `plan_padded_decode`: `plan()` of a CUDA-graph decode wrapper for every row of a bucket.

One step::

    graph = TritonGraph(ladder, bucket, kv_caches=caches, num_q_heads=16, scale=s)  # captures
    graph.q[:num_tokens].copy_(q)          # or step(batch, q=q)
    out = graph.step(batch)                # pad, build, one H2D copy in place, replay
    # out[layer, :num_tokens] holds each layer's attention output

Order: everything a step enqueues runs on the current stream (the H2D copy, FlashInfer's plan
copies, the replay), so step N+1's copy into the fixed buffers runs after step N's replay has
read them, and the host never waits (the pinned ring waits only for a copy two steps old).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

import attnsync

from .._buckets import Bucket, BucketLadder
from .._validate import SpecError, as_int
from ..adapters import torch as ast

__all__ = [
    "FlashInferDecodeGraph",
    "GraphLadder",
    "OverlappedSteps",
    "PersistentLadder",
    "PersistentLowering",
    "TritonGraph",
    "plan_padded_decode",
]


def _on(device: torch.device) -> Any:
    """`device` made current for kernel launches (a no-op context on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _resolve(device: Any) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class PersistentLowering:
    """Fixed device addresses for the metadata of one bucket (the CUDA-graph input buffers).

    Args:
        bucket: the bucket every lowered step has the shapes of.
        device: target device (a CPU device keeps one host buffer rewritten in place: tests).
        num_slots: pinned host slots of the staging ring (>= 2).

    Attributes:
        bucket, device: as given (the device resolved to an index).
        stager: the persistent `Stager`; `stats.copies` counts the steps written.
    """

    def __init__(self, bucket: Bucket, device: Any = "cuda", *, num_slots: int = 2) -> None:
        if not isinstance(bucket, Bucket):
            raise TypeError(f"bucket: expected a Bucket (BucketLadder.bucket_for), received {bucket!r}.")
        self.bucket = bucket
        self.device = _resolve(device)
        self.stager = ast.Stager(self.device, depth=num_slots, persistent=True)

    @property
    def stats(self):
        """The stager's `StagingStats` (copies = steps written in place)."""
        return self.stager.stats

    def lower(self, md: Any, *, seq_lens: torch.Tensor | None = None) -> Any:
        """`attnsync.adapters.torch.lower(bucket.bound(md))` into the fixed buffers.

        `md` must be built from a batch padded to this bucket (`BucketLadder.pad`); any other
        shape raises `SpecError` before anything is packed or copied. The device fields of
        every result are views at the same addresses, rewritten by each call (so an earlier
        result sees the new values). Host scalars (`num_reqs`, `num_actual_tokens`,
        `max_query_len`, `max_seq_len`) are the bucket's bounds.

        `seq_lens` (exact device lengths, async speculative decoding) replaces the staged
        lengths as in `lower`; that tensor and the slot mapping recomputed from it are then
        the caller's and new tensors, not fixed addresses.
        """
        return ast.lower(self.bucket.bound(md), self.device, seq_lens=seq_lens, stager=self.stager)


class PersistentLadder:
    """One `PersistentLowering` per bucket of `ladder`, created on the bucket's first step.

    Example:
        >>> import attnsync
        >>> from attnsync import BucketLadder
        >>> ladder = BucketLadder(max_num_reqs=8, max_num_tokens=8, max_model_len=64, block_size=16)
        >>> lowerings = PersistentLadder(ladder, "cpu")
        >>> batch = attnsync.Batch(query_lens=[1, 1, 1], seq_lens=[5, 17, 9],
        ...                        block_table=[[1, 0], [2, 3], [4, 0]], block_size=16)
        >>> bucket, tmd = lowerings.lower_batch(batch)
        >>> tmd.num_reqs, tmd.max_seq_len, tmd.query_start_loc.tolist()
        (4, 32, [0, 1, 2, 3, 3])
    """

    def __init__(self, ladder: BucketLadder, device: Any = "cuda", *, num_slots: int = 2) -> None:
        if not isinstance(ladder, BucketLadder):
            raise TypeError(f"ladder: expected a BucketLadder, received {type(ladder).__name__}.")
        self.ladder = ladder
        self.device = _resolve(device)
        self.num_slots = num_slots
        self.lowerings: dict[Bucket, PersistentLowering] = {}

    def for_bucket(self, bucket: Bucket) -> PersistentLowering:
        """The persistent lowering of `bucket` (allocated on first use)."""
        lowering = self.lowerings.get(bucket)
        if lowering is None:
            lowering = self.lowerings[bucket] = PersistentLowering(bucket, self.device, num_slots=self.num_slots)
        return lowering

    def lower_batch(self, batch: attnsync.Batch, /, backend: str = "common", **options: Any) -> tuple[Bucket, Any]:
        """Pick the bucket of `batch`, pad, build `backend`'s metadata, lower it in place.

        Returns `(bucket, lowered)`.
        """
        bucket = self.ladder.bucket_for(batch)
        md = attnsync.build(self.ladder.pad(batch, bucket), backend, **options)
        return bucket, self.for_bucket(bucket).lower(md)


# ---------------------------------------------------------------------------------------------
# Captured steps.


_SIDE_STREAMS: dict[torch.device, Any] = {}


def _side_stream(device: torch.device) -> Any:
    """One warm-up and capture stream per device (torch.cuda.graph's default capture stream is
    one for the whole process, made on whichever device was current first)."""
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def _capture(run: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph:
    """Warm `run` up on a side stream (compiles, allocator pools), then capture it once."""
    current = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(current)
    with torch.cuda.device(device), torch.cuda.stream(side):
        run()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph, stream=side):
        run()
    return graph


class _CapturedStep:
    """What TritonGraph and FlashInferDecodeGraph share: static q/out, capture, replay, step."""

    bucket: Bucket
    ladder: BucketLadder
    device: torch.device
    q: torch.Tensor
    out: torch.Tensor
    graph: torch.cuda.CUDAGraph | None

    def prepare(self, batch: attnsync.Batch) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def launch(self, out: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _finish_init(self, capture: bool | None) -> None:
        if capture is None:
            capture = self.device.type == "cuda"
        if capture and self.device.type != "cuda":
            raise SpecError(f"capture: CUDA graphs need a CUDA device, this step runs on {self.device}.")
        # Valid metadata in the fixed buffers before the first launch: a one-row batch.
        self.last = self.prepare(self.ladder.example_batch(self.bucket))
        self.graph = _capture(lambda: self.launch(), self.device) if capture else None

    def replay(self) -> torch.Tensor:
        """Launch the captured step (or, without capture, the same kernels eagerly); `out`."""
        if self.graph is None:
            return self.launch()
        with _on(self.device):  # replays on the current stream of the graph's device
            self.graph.replay()
        return self.out

    def step(self, batch: attnsync.Batch, q: torch.Tensor | None = None) -> torch.Tensor:
        """`prepare(batch)`, copy `q` ([num_tokens, Hq, D]) into the static q, `replay()`.

        A batch that does not fit the bucket raises `SpecError` before anything is written.
        Returns the static output [layers, bucket tokens, Hq, D]; rows of real tokens hold this
        step's attention until the next replay.
        """
        self.check_q(batch, q)
        self.last = self.prepare(batch)
        if q is not None:
            self.q[: q.shape[0]].copy_(q, non_blocking=True)
        return self.replay()

    def check_q(self, batch: attnsync.Batch, q: torch.Tensor | None) -> None:
        """Refuse, before anything is written, a `q` that does not fit the static input
        ([<= tokens, Hq, D]); a batch beyond the bucket is named first (`prepare` would refuse
        it too, but only after this check). None passes."""
        if q is None or not isinstance(batch, attnsync.Batch):  # prepare() refuses a non-Batch
            return
        problem = self.ladder.fit_error(batch, self.bucket)
        if problem is not None:
            raise SpecError(problem)
        if q.dim() != 3 or q.shape[0] > self.q.shape[0] or q.shape[1:] != self.q.shape[1:]:
            raise SpecError(
                f"q: expected [<= {self.q.shape[0]}, {self.q.shape[1]}, {self.q.shape[2]}] "
                f"(tokens, heads, head_dim), received {tuple(q.shape)}."
            )


def _check_caches(kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], block_size: int) -> torch.Tensor:
    caches = list(kv_caches)
    if not caches:
        raise SpecError("kv_caches: expected one (k_cache, v_cache) pair per layer, received none.")
    for i, pair in enumerate(caches):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise TypeError(f"kv_caches[{i}]: expected a (k_cache, v_cache) pair.")
        k, v = pair
        if k.dim() != 4 or v.shape != k.shape:
            raise SpecError(f"kv_caches[{i}]: expected k and v of shape [pages, page, Hkv, D], received "
                            f"{tuple(k.shape)} and {tuple(v.shape)}.")
        if k.shape[1] != block_size:
            raise SpecError(f"kv_caches[{i}]: pages of {k.shape[1]} tokens, but the ladder's block_size is "
                            f"{block_size}. Fix: build the ladder with the cache's page size.")
    return caches[0][0]


class TritonGraph(_CapturedStep):
    """The attention of every layer of one step on attnsync's Triton kernel, captured once.

    The kernel arguments are the persistent lowering's fixed tensors and the bucket's host
    bounds (`num_reqs`, `max_query_len`, `max_seq_len` and the path), so one capture serves
    every batch of the bucket; the kernel reads each row's real values on the device.

    Args:
        ladder: the ladder `bucket` belongs to (pads batches, makes the capture batch).
        bucket: the bucket captured.
        kv_caches: one `(k_cache, v_cache)` per layer, [pages, block_size, Hkv, D].
        num_q_heads: query heads.
        scale: softmax scale.
        device: default: the caches' device.
        sliding_window: optional window, as in `unified_paged_attention`.
        use_split_kv: the split-KV path for every step of the bucket. Default: for
            single-token decode buckets of at most `max(1, 128 // Hkv)` rows (the Triton
            backend's rule); True forces it (single-token decode buckets only).
        num_segments: KV segments of the split-KV path.
        capture: capture a CUDA graph (default: on CUDA devices); False launches eagerly on
            `replay()` (CPU tests, debugging).

    Attributes:
        q: static input [bucket.num_tokens, Hq, D] in the caches' dtype.
        out: static output [layers, bucket.num_tokens, Hq, D].
        lowering: the `PersistentLowering` of the bucket.
        last: the lowered metadata of the latest step.
    """

    def __init__(
        self,
        ladder: BucketLadder,
        bucket: Bucket,
        *,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        num_q_heads: int,
        scale: float,
        device: Any = None,
        sliding_window: int | None = None,
        use_split_kv: bool | None = None,
        num_segments: int = 16,
        capture: bool | None = None,
    ) -> None:
        from ..kernels import triton_attention

        self._kernels = triton_attention
        self.ladder, self.bucket = ladder, bucket
        first = _check_caches(kv_caches, ladder.block_size)
        self.kv_caches = [tuple(pair) for pair in kv_caches]
        self.device = _resolve(device if device is not None else first.device)
        hq = as_int(num_q_heads, "num_q_heads", minimum=1)
        _, _, hkv, head_dim = first.shape
        if hq % hkv:
            raise SpecError(f"num_q_heads: {hq} is not a multiple of the caches' {hkv} kv heads.")
        decode_1 = bucket.uniform_query_len == 1
        if use_split_kv is None:
            use_split_kv = decode_1 and bucket.num_reqs <= max(1, 128 // hkv)
        elif use_split_kv and not decode_1:
            raise SpecError(
                f"use_split_kv: the split-KV path handles one query token per row, but {bucket} is not "
                f"a single-token decode bucket. Fix: use_split_kv=False (or None) for it."
            )
        self.use_split_kv = bool(use_split_kv)
        self.num_segments = as_int(num_segments, "num_segments", minimum=1)
        self.scale = float(scale)
        self.sliding_window = sliding_window
        self.scratch = (
            triton_attention.split_kv_scratch(bucket.num_reqs, hq, head_dim, self.num_segments, device=self.device)
            if self.use_split_kv
            else (None, None, None)
        )
        self.q = torch.zeros((bucket.num_tokens, hq, head_dim), dtype=first.dtype, device=self.device)
        self.out = torch.zeros((len(self.kv_caches), *self.q.shape), dtype=first.dtype, device=self.device)
        self.lowering = PersistentLowering(bucket, self.device)
        self._finish_init(capture)

    def prepare(self, batch: attnsync.Batch) -> Any:
        """Pad `batch` to the bucket, build the common metadata, lower it into the fixed buffers.

        Raises `SpecError` before anything is written when the batch does not fit the bucket.
        """
        md = attnsync.build(self.ladder.pad(batch, self.bucket))
        return self.lowering.lower(md)

    def launch(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Launch every layer's kernel with the latest metadata into `out` (default: `self.out`)."""
        out = self.out if out is None else out
        tmd = self.last
        segm_output, segm_max, segm_expsum = self.scratch
        with _on(self.device):  # Triton launches on the current device's stream
            self._launch_layers(out, tmd, segm_output, segm_max, segm_expsum)
        return out

    def _launch_layers(self, out, tmd, segm_output, segm_max, segm_expsum) -> None:
        for layer, (k, v) in enumerate(self.kv_caches):
            self._kernels.unified_paged_attention(
                self.q, k, v, out[layer],
                query_start_loc=tmd.query_start_loc,
                seq_lens=tmd.seq_lens,
                block_table=tmd.block_table_tensor,
                max_query_len=tmd.max_query_len,  # the bucket's bounds (Bucket.bound)
                max_seq_len=tmd.max_seq_len,
                num_reqs=tmd.num_reqs,
                scale=self.scale,
                sliding_window=self.sliding_window,
                use_split_kv=self.use_split_kv,
                segm_output=segm_output,
                segm_max=segm_max,
                segm_expsum=segm_expsum,
                num_segments=self.num_segments,
            )


def plan_padded_decode(
    tmd: Any,
    wrapper: Any,
    *,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_data_type: torch.dtype,
    kv_data_type: torch.dtype | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    logits_soft_cap: float | None = None,
) -> None:
    """Plan a CUDA-graph decode wrapper for every row of a padded decode batch (host only).

    A CUDA-graph wrapper has a fixed batch size, the bucket's rows; `attnsync.adapters.
    flashinfer_plan.plan` plans only the real rows. Here every row is planned: the real rows
    (all single-token decodes) as usual, padded rows with no pages and a last-page fill of 1
    (vLLM's padding; FlashInfer reads no key of a row without pages). Host arrays go to plan()
    as CPU int32 tensors, the page ids as the staged device view, so nothing synchronises, and
    the wrapper's pinned plan buffer rotates as in `plan`.

    Args:
        tmd: `attnsync.adapters.torch.lower(attnsync.build(padded_batch, backend="flashinfer"))`.
        wrapper: a CUDA-graph `BatchDecodeWithPagedKVCacheWrapper` for `tmd.num_reqs` rows.
        num_qo_heads, num_kv_heads, head_dim, q_data_type, kv_data_type, sm_scale,
        window_left, logits_soft_cap: as in `attnsync.integrations.flashinfer.plan`.
    """
    from .flashinfer import _check_lowered, _check_wrapper_device, _guarded_plan

    _check_lowered(tmd)
    nd, n = tmd.num_decodes, tmd.num_scheduled_reqs
    if nd != n or tmd.num_decode_tokens != nd:
        raise SpecError(
            f"tmd: a CUDA-graph decode step takes single-token decode rows only, but the batch has "
            f"{n} rows, {nd} of them decodes, with {tmd.num_decode_tokens} decode tokens. Fix: "
            f"run prefills and extends outside the decode graph."
        )
    rows = tmd.num_reqs
    indices = tmd.paged_kv_indices
    _check_wrapper_device(wrapper, "wrapper", indices)
    last = tmd.paged_kv_last_page_len_cpu[:rows].clone()
    last[nd:] = 1  # a host tensor: no device work
    args = (tmd.paged_kv_indptr_cpu[: rows + 1], indices[: tmd.num_pages], last)
    kwargs = dict(
        num_qo_heads=as_int(num_qo_heads, "num_qo_heads", minimum=1),
        num_kv_heads=as_int(num_kv_heads, "num_kv_heads", minimum=1),
        head_dim=as_int(head_dim, "head_dim", minimum=1),
        page_size=tmd.block_size,
        window_left=window_left,
        logits_soft_cap=logits_soft_cap,
        q_data_type=q_data_type,
        kv_data_type=kv_data_type if kv_data_type is not None else q_data_type,
        sm_scale=sm_scale,
        non_blocking=True,
    )
    _guarded_plan(wrapper, lambda: wrapper.plan(*args, **kwargs))


class FlashInferDecodeGraph(_CapturedStep):
    """Every layer's FlashInfer decode of one single-token decode bucket, captured once.

    The CUDA-graph wrapper's indptr, page-id and last-page buffers are allocated once for the
    bucket (`num_reqs` rows, `num_reqs * width` pages); before each replay `prepare` builds
    and lowers the step (one H2D copy: the page ids FlashInfer copies into its buffer on the
    device) and plans all rows (`plan_padded_decode`).

    Args:
        ladder, bucket: as in `TritonGraph`; the bucket must be a decode bucket of one token
            per row (`uniform_query_len == 1`).
        kv_caches: one `(k_cache, v_cache)` per layer, [pages, block_size, Hkv, D] (NHD).
        num_qo_heads, head_dim: attention shape (Hkv comes from the caches).
        q_data_type: q's dtype (default: the caches').
        sm_scale, window_left, logits_soft_cap: as in `plan`.
        device: default: the caches' device.
        workspace: FlashInfer float workspace (default: a fresh 128 MB one).
        use_tensor_cores: FlashInfer's tensor-core decode.
        wrapper: an existing CUDA-graph decode wrapper for this bucket (tests pass stand-ins).
        capture: as in `TritonGraph`.

    Attributes:
        q: static input [bucket.num_tokens, Hq, D]; decode row r reads `q[r]`.
        out: static output [layers, bucket.num_tokens, Hq, D].
        wrapper: the CUDA-graph decode wrapper.
        last: the lowered metadata of the latest step.
    """

    def __init__(
        self,
        ladder: BucketLadder,
        bucket: Bucket,
        *,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        num_qo_heads: int,
        head_dim: int | None = None,
        q_data_type: torch.dtype | None = None,
        sm_scale: float | None = None,
        window_left: int = -1,
        logits_soft_cap: float | None = None,
        device: Any = None,
        workspace: torch.Tensor | None = None,
        use_tensor_cores: bool = False,
        wrapper: Any = None,
        capture: bool | None = None,
    ) -> None:
        if bucket.uniform_query_len != 1:
            raise SpecError(
                f"bucket: FlashInfer's CUDA-graph decode runs one query token per row; {bucket} is "
                f"not a single-token decode bucket. Fix: BucketLadder(uniform_query_len=1) decode "
                f"buckets only; run other steps eagerly."
            )
        self.ladder, self.bucket = ladder, bucket
        first = _check_caches(kv_caches, ladder.block_size)
        self.kv_caches = [tuple(pair) for pair in kv_caches]
        self.device = _resolve(device if device is not None else first.device)
        _, _, hkv, dim = first.shape
        head_dim = dim if head_dim is None else as_int(head_dim, "head_dim", minimum=1)
        if head_dim != dim:
            raise SpecError(f"head_dim: {head_dim}, but the caches have {dim}.")
        dtype = first.dtype if q_data_type is None else q_data_type
        self.plan_args = dict(
            num_qo_heads=as_int(num_qo_heads, "num_qo_heads", minimum=1), num_kv_heads=hkv,
            head_dim=head_dim, q_data_type=dtype, kv_data_type=first.dtype, sm_scale=sm_scale,
            window_left=window_left, logits_soft_cap=logits_soft_cap,
        )
        if wrapper is None:
            from .flashinfer import make_decode_cuda_graph_wrapper, workspace_buffer

            wrapper = make_decode_cuda_graph_wrapper(
                workspace if workspace is not None else workspace_buffer(self.device),
                batch_size=bucket.num_reqs,
                max_num_pages=bucket.num_reqs * bucket.width,
                use_tensor_cores=use_tensor_cores,
            )
        self.wrapper = wrapper
        self.q = torch.zeros((bucket.num_tokens, self.plan_args["num_qo_heads"], head_dim), dtype=dtype,
                             device=self.device)
        self.out = torch.zeros((len(self.kv_caches), *self.q.shape), dtype=dtype, device=self.device)
        self._finish_init(capture)

    def prepare(self, batch: attnsync.Batch) -> Any:
        """Pad, build FlashInfer's metadata, lower it (one H2D copy), plan every row.

        Raises `SpecError` before anything is written when the batch does not fit the bucket.
        """
        md = attnsync.build(self.ladder.pad(batch, self.bucket), backend="flashinfer")
        tmd = ast.lower(md, self.device)
        plan_padded_decode(tmd, self.wrapper, **self.plan_args)
        return tmd

    def launch(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run every layer's decode with the latest plan into `out` (default: `self.out`)."""
        out = self.out if out is None else out
        rows = self.bucket.num_reqs
        with _on(self.device):
            for layer, kv in enumerate(self.kv_caches):
                self.wrapper.run(self.q[:rows], kv, out=out[layer, :rows])
        return out


class OverlappedSteps:
    """Two captured steps of one bucket, used in turn, with each step's metadata uploads
    overlapping the other's replay.

    A single captured step serialises on one stream: step N+1's H2D copy (and, for FlashInfer,
    `plan()`'s uploads into the wrapper's fixed buffers: indptr, last-page fill, page ids, plan
    info) can only start once replay N has read the buffers, and the replay waits for them.
    That left a measurable gap a step between graph mode and the planned-once limit
    (bench/graph_decode_loop.py). Here the two steps own separate fixed buffers
    (persistent lowering, wrapper buffers): step N+1 is prepared on a side stream that waits
    only for replay N-1 (the last reader of its buffers), and the replay stream waits for that
    preparation, which ran while replay N did. Outputs alternate between the two steps' `out`
    tensors: the result of a step is valid until the step after next.

    Args:
        make: `make() -> TritonGraph | FlashInferDecodeGraph`, called twice (two captures, two
            sets of fixed buffers) for the same bucket, on one CUDA device.

    Attributes:
        steps: the two captured steps.
        prepare_stream: the side stream preparations run on.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self.steps = (make(), make())
        devices = {step.device for step in self.steps}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise SpecError(
                f"make: OverlappedSteps needs two steps on one CUDA device (it overlaps streams), "
                f"received steps on {sorted(str(d) for d in devices)}."
            )
        if self.steps[0] is self.steps[1]:
            raise SpecError("make: returned the same step twice; it must capture a new one per call.")
        self.device = self.steps[0].device
        self.prepare_stream = torch.cuda.Stream(self.device)
        self._read = [torch.cuda.Event(), torch.cuda.Event()]  # replay i has read step i's buffers
        self._ready = [torch.cuda.Event(), torch.cuda.Event()]  # step i's buffers hold the new step
        self._replayed = [False, False]
        self._next = 0

    @property
    def bucket(self) -> Bucket:
        """The bucket both steps serve."""
        return self.steps[0].bucket

    def step(self, batch: attnsync.Batch, q: torch.Tensor | None = None) -> torch.Tensor:
        """Prepare `batch` on the side stream into the idle step, then replay it on the current
        stream; returns that step's `out` (see `TritonGraph.step`). A batch that does not fit
        the bucket raises `SpecError` before anything is written."""
        index = self._next
        target = self.steps[index]
        target.check_q(batch, q)
        current = torch.cuda.current_stream(self.device)
        side = self.prepare_stream
        with torch.cuda.device(self.device), torch.cuda.stream(side):
            if self._replayed[index]:
                side.wait_event(self._read[index])  # replay N-1 has read these buffers
            target.last = target.prepare(batch)
            self._ready[index].record(side)
        current.wait_event(self._ready[index])
        if q is not None:
            target.q[: q.shape[0]].copy_(q, non_blocking=True)  # on the replay stream, after q's producer
        out = target.replay()
        self._read[index].record(current)
        self._replayed[index] = True
        self._next = 1 - index
        return out


class GraphLadder:
    """One captured step per bucket of a ladder, made on the bucket's first batch.

    Args:
        ladder: the buckets.
        make: `make(bucket) -> TritonGraph | FlashInferDecodeGraph` (captures).

    Example (on a GPU)::

        graphs = GraphLadder(ladder, lambda b: TritonGraph(ladder, b, kv_caches=caches,
                                                           num_q_heads=16, scale=s))
        out = graphs.step(batch, q)
    """

    def __init__(self, ladder: BucketLadder, make: Callable[[Bucket], Any]) -> None:
        self.ladder = ladder
        self.make = make
        self.graphs: dict[Bucket, Any] = {}

    def graph_for(self, batch: attnsync.Batch) -> Any:
        """The captured step of `batch`'s bucket (captured now if new)."""
        bucket = self.ladder.bucket_for(batch)
        graph = self.graphs.get(bucket)
        if graph is None:
            graph = self.graphs[bucket] = self.make(bucket)
        return graph

    def step(self, batch: attnsync.Batch, q: torch.Tensor | None = None) -> torch.Tensor:
        """Replay `batch`'s bucket with this step's metadata (see `TritonGraph.step`)."""
        return self.graph_for(batch).step(batch, q)

