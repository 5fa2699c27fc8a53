"""Plan and run FlashInfer's paged wrappers from attnsync metadata, with no host sync.

Importing this module imports torch (it works on the torch lowering), never flashinfer:
flashinfer is imported only inside the functions that construct its objects, so the planning
code also runs against stand-in wrappers on machines without it.

The flow of one step::

    md = attnsync.build(batch, backend="flashinfer")          # numpy, host only
    tmd = attnsync.adapters.torch.lower(md, device="cuda")    # one pinned non_blocking copy
    plan(tmd, decode_wrapper=dw, prefill_wrapper=pw, num_qo_heads=16, num_kv_heads=8,
         head_dim=128, q_data_type=torch.bfloat16)            # host arrays in, no D2H copy
    for layer in layers:                                      # the run phase
        run(tmd, q, kv_cache[layer], decode_wrapper=dw, prefill_wrapper=pw, out=out)

Why this is sync-free (docs/flashinfer.md has the whole contract):
`plan()` calls `.to("cpu")` on `qo_indptr`, `paged_kv_indptr` and `paged_kv_last_page_len`,
which returns the tensor itself for CPU tensors and is a blocking device-to-host copy for
device ones. We hand it the CPU tensors of the lowering. `paged_kv_indices` is only moved
`.to(wrapper.device)`, a no-op for the staged device view. plan() moves its own copies of the
small host arrays to the device with `non_blocking` copies from pageable memory, which the
driver stages without waiting for the device; the C++ scheduler then writes its work
partition into a pinned buffer and enqueues one host-to-device copy. Nothing waits.

Why `plan` guards FlashInfer's pinned buffer: each wrapper owns one pinned host buffer that
every `plan()` overwrites on the host before enqueuing its copy. When the host runs more than a
step ahead of the GPU (the point of removing syncs), plan N+1 can overwrite the buffer before
plan N's copy has executed, and the kernels of step N read step N+1's partition (an illegal
memory access, in the worst case). `plan` therefore rotates
each wrapper between two pinned buffers and, before reusing one, waits on the CUDA event
recorded after its last plan: the host may run one full step ahead, never onto a pending copy.
This is the rule of attnsync's own staging ring (docs/sync-free.md).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from .._validate import SpecError, as_int
from ..backends.flashinfer import FlashInferMetadata

# Attributes of `attnsync.adapters.torch.lower(build(batch, backend="flashinfer"), device)`
# that planning reads; checked once so a wrong object fails with a message, not deep inside.
__all__ = ["DEFAULT_WORKSPACE_BYTES", "make_decode_cuda_graph_wrapper", "plan", "run", "workspace_buffer"]

_PLAN_FIELDS = (
    "paged_kv_indptr_cpu",
    "paged_kv_indices",
    "paged_kv_last_page_len_cpu",
    "prefill_qo_indptr_cpu",
    "prefill_paged_kv_indptr_cpu",
    "num_decodes",
    "num_decode_tokens",
    "num_prefills",
    "num_prefill_tokens",
    "num_decode_pages",
    "num_pages",
    "block_size",
    "max_decode_query_len",
)
_HOST_FIELDS = (
    "paged_kv_indptr_cpu",
    "paged_kv_last_page_len_cpu",
    "prefill_qo_indptr_cpu",
    "prefill_paged_kv_indptr_cpu",
)

# FlashInfer's recommended float workspace (its wrapper docstrings: "The recommended size is
# 128MB"); split-KV partial results live there.
DEFAULT_WORKSPACE_BYTES = 128 * 1024 * 1024

# Pinned plan buffers per wrapper: 2 lets the host prepare step N+1 while step N's plan copy
# is pending, the same depth as attnsync's staging ring.
_PINNED_SLOTS = 2


def _check_lowered(tmd: Any) -> None:
    if isinstance(tmd, FlashInferMetadata) or isinstance(getattr(tmd, "paged_kv_indices", None), np.ndarray):
        raise TypeError(
            f"tmd: received {type(tmd).__name__}, host metadata that was not lowered (numpy "
            f"arrays). Fix: tmd = attnsync.adapters.torch.lower(md, device='cuda'), then plan(tmd)."
        )
    missing = [name for name in _PLAN_FIELDS if not hasattr(tmd, name)]
    if missing:
        raise TypeError(
            f"tmd: expected the torch lowering of FlashInfer metadata, received "
            f"{type(tmd).__name__} without {missing}. Fix: tmd = attnsync.adapters.torch.lower("
            f"attnsync.build(batch, backend='flashinfer'), device='cuda')."
        )
    if not isinstance(tmd.paged_kv_indices, torch.Tensor):
        raise TypeError(
            f"tmd.paged_kv_indices: expected a torch.Tensor, received "
            f"{type(tmd.paged_kv_indices).__name__}. Fix: pass the object returned by "
            f"attnsync.adapters.torch.lower unchanged."
        )
    for name in _HOST_FIELDS:
        value = getattr(tmd, name)
        if value.device.type != "cpu" or value.dtype != torch.int32:
            raise SpecError(
                f"tmd.{name}: expected a CPU int32 tensor (FlashInfer's plan reads it on the host; "
                f"a device tensor makes it copy back and wait), received dtype {value.dtype} on "
                f"{value.device}. Fix: pass the object returned by attnsync.adapters.torch.lower "
                f"unchanged."
            )


def _check_wrapper_device(wrapper: Any, name: str, indices: torch.Tensor) -> None:
    device = getattr(wrapper, "device", None)
    if device is not None and torch.device(device) != indices.device:
        raise SpecError(
            f"{name}: the wrapper works on {device}, but the metadata was lowered to "
            f"{indices.device}; plan() would copy the page indices across devices. Fix: "
            f"lower(md, device={str(device)!r})."
        )


def _pinned_like(buffer: torch.Tensor) -> torch.Tensor:
    """A pinned host buffer shaped like FlashInfer's (a seam the CPU tests replace)."""
    return torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu", pin_memory=True)


class _PinnedRotation:
    """Two pinned plan buffers for one wrapper, each reused only after its copy has executed."""

    def __init__(self, wrapper: Any) -> None:
        first = wrapper._pin_memory_int_workspace_buffer
        self.buffers = [first] + [_pinned_like(first) for _ in range(_PINNED_SLOTS - 1)]
        self.events: list[torch.cuda.Event | None] = [None] * _PINNED_SLOTS
        self.next = 0
        self.waits = 0  # plans that found their slot's copy still pending (diagnostics)

    def owns(self, buffer: Any) -> bool:
        return any(buffer is b for b in self.buffers)


# One rotation per live wrapper; a dropped wrapper takes its extra pinned buffer with it.
_ROTATIONS: weakref.WeakKeyDictionary[Any, _PinnedRotation] = weakref.WeakKeyDictionary()
_SINGLE_EVENTS: weakref.WeakKeyDictionary[Any, torch.cuda.Event] = weakref.WeakKeyDictionary()


def _guarded_plan(wrapper: Any, call: Any) -> None:
    """Run `call()` (one wrapper.plan) so it never overwrites a pinned buffer still being copied."""
    device = getattr(wrapper, "device", None)
    if device is None or torch.device(device).type != "cuda":
        call()  # no asynchronous copy on CPU stand-ins
        return
    if not hasattr(wrapper, "_pin_memory_int_workspace_buffer"):
        # A FlashInfer without the attribute we rotate: keep the safety, lose the overlap
        # (the host waits for the previous plan's copy before planning again).
        event = _SINGLE_EVENTS.get(wrapper)
        if event is not None and not event.query():
            event.synchronize()
        call()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(torch.device(device)))
        _SINGLE_EVENTS[wrapper] = event
        return
    rotation = _ROTATIONS.get(wrapper)
    if rotation is None or not rotation.owns(wrapper._pin_memory_int_workspace_buffer):
        # First plan, or the user called reset_workspace_buffer (a fresh pinned buffer).
        rotation = _ROTATIONS[wrapper] = _PinnedRotation(wrapper)
    slot = rotation.next
    rotation.next = (slot + 1) % len(rotation.buffers)
    pending = rotation.events[slot]
    if pending is not None and not pending.query():
        rotation.waits += 1
        pending.synchronize()  # the host is two plans ahead of the GPU: bounded run-ahead
    wrapper._pin_memory_int_workspace_buffer = rotation.buffers[slot]
    call()
    event = torch.cuda.Event()
    # FlashInfer enqueues its plan copy on the stream TVM-FFI hands its kernels: torch's current
    # stream of the first CUDA argument (tvm_ffi function.pxi, 0.1.15), the workspace's device.
    # An event recorded after plan() on that stream completes after the copy.
    event.record(torch.cuda.current_stream(torch.device(device)))
    rotation.events[slot] = event


def plan(
    tmd: Any,
    *,
    decode_wrapper: Any = None,
    prefill_wrapper: Any = None,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_data_type: torch.dtype,
    kv_data_type: torch.dtype | None = None,
    o_data_type: torch.dtype | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    logits_soft_cap: float | None = None,
) -> None:
    """Plan FlashInfer's wrappers for one step from lowered attnsync metadata (host only, no sync).

    The decode wrapper gets the first `num_decodes` rows: `paged_kv_indptr_cpu[:nd+1]`,
    `paged_kv_last_page_len_cpu[:nd]` (CPU int32) and the device view
    `paged_kv_indices[:num_decode_pages]`. The prefill wrapper gets the other real rows,
    rebased: `prefill_qo_indptr_cpu`, `prefill_paged_kv_indptr_cpu` (CPU int32, both start at
    0), `paged_kv_last_page_len_cpu[nd:nd+np]` and the device view
    `paged_kv_indices[num_decode_pages:num_pages]`, with `causal=True`. Padded rows are never
    planned. A sub-batch without rows is not planned (FlashInfer's scheduler divides by the
    batch size), so its wrapper may be None.

    Phase: plan, once per step for all layers; not inside a CUDA graph. For a CUDA-graph decode
    wrapper (see `make_decode_cuda_graph_wrapper`) call it before each replay: FlashInfer then
    copies the host arrays into the wrapper's fixed buffers (stream-ordered, non_blocking).

    Args:
        tmd: `attnsync.adapters.torch.lower(attnsync.build(batch, backend="flashinfer"), device)`.
        decode_wrapper: a `flashinfer.BatchDecodeWithPagedKVCacheWrapper`; required when the
            batch has decode rows.
        prefill_wrapper: a `flashinfer.BatchPrefillWithPagedKVCacheWrapper`; required when the
            batch has prefill (or extend) rows.
        num_qo_heads, num_kv_heads, head_dim: attention shape (`num_qo_heads % num_kv_heads
            == 0`).
        q_data_type: dtype of q (torch.bfloat16, torch.float16, ...).
        kv_data_type: dtype of the KV cache (default: `q_data_type`).
        o_data_type: dtype of the output (default: FlashInfer's, `q_data_type`).
        sm_scale: softmax scale (default: FlashInfer's, `1 / sqrt(head_dim)`).
        window_left: sliding window, FlashInfer's convention (-1: none).
        logits_soft_cap: soft cap of the logits (None or 0: none).

    Raises:
        TypeError: `tmd` is not a torch-lowered FlashInfer metadata, or a size is not an int.
        SpecError: a wrapper the batch needs is missing, decode rows carry more than one query
            token, the host arrays are not CPU int32, or a wrapper lives on another device.
    """
    _check_lowered(tmd)
    num_qo_heads = as_int(num_qo_heads, "num_qo_heads", minimum=1)
    num_kv_heads = as_int(num_kv_heads, "num_kv_heads", minimum=1)
    head_dim = as_int(head_dim, "head_dim", minimum=1)
    window_left = as_int(window_left, "window_left", minimum=-1)
    if num_qo_heads % num_kv_heads:
        raise SpecError(
            f"num_qo_heads: expected a multiple of num_kv_heads={num_kv_heads} (grouped-query "
            f"attention), received {num_qo_heads}."
        )
    nd, npf = tmd.num_decodes, tmd.num_prefills
    if nd and decode_wrapper is None:
        raise SpecError(
            f"decode_wrapper: the batch has {nd} decode row(s) but no decode wrapper was given. "
            f"Fix: pass decode_wrapper=flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "
            f"'NHD')."
        )
    if npf and prefill_wrapper is None:
        raise SpecError(
            f"prefill_wrapper: the batch has {npf} prefill or extend row(s) but no prefill "
            f"wrapper was given. Fix: pass prefill_wrapper=flashinfer."
            f"BatchPrefillWithPagedKVCacheWrapper(workspace, 'NHD')."
        )
    if nd and (tmd.max_decode_query_len != 1 or tmd.num_decode_tokens != nd):
        raise SpecError(
            f"tmd: FlashInfer's decode wrapper runs exactly one query token per request, but the "
            f"{nd} decode rows carry {tmd.num_decode_tokens} tokens (longest "
            f"{tmd.max_decode_query_len}). Fix: build with decode_threshold=1, so rows with more "
            f"tokens are planned on the prefill wrapper, and give every decode row one new token."
        )
    common: dict[str, Any] = dict(
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        page_size=tmd.block_size,
        window_left=window_left,
        logits_soft_cap=logits_soft_cap,
        q_data_type=q_data_type,
        kv_data_type=kv_data_type if kv_data_type is not None else q_data_type,
        sm_scale=sm_scale,
        non_blocking=True,
    )
    if o_data_type is not None:
        common["o_data_type"] = o_data_type
    indices = tmd.paged_kv_indices
    if nd:
        _check_wrapper_device(decode_wrapper, "decode_wrapper", indices)
        # Decode rows come first, so their slice of indptr already starts at 0 and indexes
        # the first num_decode_pages page ids.
        args = (
            tmd.paged_kv_indptr_cpu[: nd + 1],
            indices[: tmd.num_decode_pages],
            tmd.paged_kv_last_page_len_cpu[:nd],
        )
        _guarded_plan(decode_wrapper, lambda: decode_wrapper.plan(*args, head_dim=head_dim, **common))
    if npf:
        _check_wrapper_device(prefill_wrapper, "prefill_wrapper", indices)
        args = (
            tmd.prefill_qo_indptr_cpu,
            tmd.prefill_paged_kv_indptr_cpu,
            indices[tmd.num_decode_pages : tmd.num_pages],
            tmd.paged_kv_last_page_len_cpu[nd : nd + npf],
        )
        _guarded_plan(
            prefill_wrapper,
            lambda: prefill_wrapper.plan(*args, head_dim_qk=head_dim, causal=True, **common),
        )


def run(
    tmd: Any,
    q: torch.Tensor,
    kv_cache: Any,
    *,
    decode_wrapper: Any = None,
    prefill_wrapper: Any = None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Run one layer's attention: decode tokens on the decode wrapper, the rest on the prefill one.

    Phase: run (per layer, after `plan`); launches kernels only, reads no device value, so it
    can be captured in a CUDA graph when the wrappers can.

    Args:
        tmd: the lowered metadata `plan` was called with.
        q: [T, num_qo_heads, head_dim], T >= num_decode_tokens + num_prefill_tokens.
        kv_cache: this layer's cache as FlashInfer takes it (NHD: a tensor [pages, 2, page,
            Hkv, D] or a tuple (k, v) of [pages, page, Hkv, D]).
        decode_wrapper, prefill_wrapper: the wrappers `plan` planned.
        out: [T, num_qo_heads, head_dim] in the planned output dtype; tokens
            [0, num_decode_tokens) are written by the decode wrapper, the next
            num_prefill_tokens by the prefill wrapper, padding tokens are left untouched.

    Returns:
        `out`.
    """
    ndt, npt = tmd.num_decode_tokens, tmd.num_prefill_tokens
    used = ndt + npt
    if q.shape[0] < used or out.shape[:1] != q.shape[:1]:
        raise SpecError(
            f"q/out: expected at least {used} tokens in q and out with q's token count, received "
            f"q {tuple(q.shape)} and out {tuple(out.shape)}. Fix: pass this step's q and an "
            f"output of the same number of tokens."
        )
    if tmd.num_decodes:
        if decode_wrapper is None:
            raise SpecError("decode_wrapper: the batch has decode rows; pass the wrapper plan() planned.")
        decode_wrapper.run(q[:ndt], kv_cache, out=out[:ndt])
    if tmd.num_prefills:
        if prefill_wrapper is None:
            raise SpecError("prefill_wrapper: the batch has prefill rows; pass the wrapper plan() planned.")
        prefill_wrapper.run(q[ndt:used], kv_cache, out=out[ndt:used])
    return out


def workspace_buffer(device: Any = "cuda", *, nbytes: int = DEFAULT_WORKSPACE_BYTES) -> torch.Tensor:
    """A zeroed uint8 float-workspace buffer for FlashInfer wrappers (it must start zeroed)."""
    nbytes = as_int(nbytes, "nbytes", minimum=1)
    return torch.zeros(nbytes, dtype=torch.uint8, device=device)


def make_decode_cuda_graph_wrapper(
    workspace: torch.Tensor,
    *,
    batch_size: int,
    max_num_pages: int,
    device: Any = None,
    kv_layout: str = "NHD",
    use_tensor_cores: bool = False,
) -> Any:
    """A CUDA-graph-capable `BatchDecodeWithPagedKVCacheWrapper` with fixed metadata buffers.

    The wrapper reads indptr, page ids and last-page fills from device buffers allocated here
    once, so a graph captured around `wrapper.run` stays valid while `plan` rewrites them
    before each replay. Every step must then have exactly `batch_size` decode rows and at most
    `max_num_pages` pages (FlashInfer raises otherwise). Lower with the default stager: plan()
    copies the page ids into the wrapper's own buffer, so the staged metadata need not sit at
    fixed addresses (and `paged_kv_indices` changes length every step, which a persistent
    stager would refuse).

    Args:
        workspace: the float workspace (see `workspace_buffer`); its device is the wrapper's.
        batch_size: decode rows of every step (FlashInfer freezes it for the wrapper's life).
        max_num_pages: capacity of the page-id buffer, >= the pages of any planned step.
        device: optional; must match `workspace.device` when given.
        kv_layout: "NHD" ([pages, page, Hkv, D]) or "HND".
        use_tensor_cores: FlashInfer's tensor-core decode (faster for large GQA groups).

    Returns:
        The wrapper (flashinfer is imported here).
    """
    import flashinfer

    batch_size = as_int(batch_size, "batch_size", minimum=1)
    max_num_pages = as_int(max_num_pages, "max_num_pages", minimum=1)
    target = workspace.device
    if device is not None and torch.device(device) != target:
        # "cuda" and "cuda:0" name the same device when 0 is current.
        requested = torch.device(device)
        if not (requested.type == target.type and requested.index is None):
            raise SpecError(
                f"device: {device!r} differs from the workspace's {target}. Fix: allocate the "
                f"workspace on the device the wrapper should use."
            )
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace,
        kv_layout,
        use_cuda_graph=True,
        use_tensor_cores=use_tensor_cores,
        paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=target),
        paged_kv_indices_buffer=torch.zeros(max_num_pages, dtype=torch.int32, device=target),
        paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=target),
    )
