"""vLLM interop: an `attnsync.Batch` from vLLM's `CommonAttentionMetadata`, reading host fields only.

Importing this module imports torch (vLLM's metadata holds torch tensors); it never imports vLLM:
any object with `CommonAttentionMetadata`'s attribute names is accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._batch import Batch
from .._validate import SpecError, as_int

__all__ = ["batch_from_vllm"]


def _vllm_host_array(value: Any, name: str) -> np.ndarray:
    """A host numpy view of a vLLM CPU field; device tensors are refused, never copied back."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise TypeError(
                f"{name}: expected a CPU tensor, received one on {value.device}. Reading it would "
                f"synchronise the host with the device. Fix: pass vLLM's host mirror (the *_cpu field)."
            )
        return value.numpy()
    device = getattr(value, "device", None)
    if device is not None and not str(device).lower().startswith("cpu"):
        raise TypeError(f"{name}: expected host data, received an array on {device}.")
    return np.asarray(value)


def batch_from_vllm(
    common_attn_metadata: Any,
    *,
    block_size: int,
    block_table_cpu: Any = None,
    seq_lens_exact: Any = None,
) -> Any:
    """An `attnsync.Batch` from vLLM's `CommonAttentionMetadata`, reading host fields only.

    Reads `query_start_loc_cpu`, `seq_lens_cpu_upper_bound` (or, on older vLLM, the exact
    `_seq_lens_cpu`), `num_reqs`, `num_actual_tokens`, `is_prefilling` and `causal`: host
    tensors and ints. It never touches a device value: not `query_start_loc`, `seq_lens`,
    `slot_mapping`, not the `seq_lens_cpu` property (it copies `seq_lens` from the GPU when
    `_seq_lens_cpu` is None), and not `block_table_tensor`, which lives on the GPU. The block
    table comes from the caller's host copy (vLLM keeps one: `BlockTable.get_numpy_array()` /
    `get_cpu_tensor()` of the kv-cache group, rows in the same order as the batch).

    vLLM's CUDA-graph padding is kept: trailing rows with no tokens and no context are padding
    (`padded_num_reqs=num_reqs`), and `padded_num_tokens=num_actual_tokens`.

    Args:
        common_attn_metadata: an object with `CommonAttentionMetadata`'s attribute names.
        block_size: tokens per KV-cache page of this kv-cache group.
        block_table_cpu: [>= R, W] int host array or CPU tensor, the host block table. Optional
            only when `block_table_tensor` is itself a CPU tensor.
        seq_lens_exact: None to infer (exact, except under async speculative decoding, marked
            by `_seq_lens_cpu is None`, where rows with context that are not prefilling hold
            only an upper bound), a bool for every row, or a bool array over the real rows.

    Returns:
        The `attnsync.Batch` of the step (lower with `attnsync.build` + `lower` as usual).

    Raises:
        TypeError: a host field is on a device, or the block table is only on the device.
        SpecError: the fields are inconsistent, or the attention is not causal.
    """

    cam = common_attn_metadata
    block_size = as_int(block_size, "block_size", minimum=1)
    if getattr(cam, "causal", True) is False:
        raise SpecError(
            "common_attn_metadata.causal is False; attnsync builds causal decoder metadata. Fix: "
            "keep non-causal (encoder) layers on vLLM's own builder."
        )
    qsl_value = getattr(cam, "query_start_loc_cpu", None)
    if qsl_value is None:
        raise SpecError("common_attn_metadata: query_start_loc_cpu is missing; attnsync reads the host copy.")
    qsl = _vllm_host_array(qsl_value, "query_start_loc_cpu").astype(np.int64).ravel()
    num_reqs = getattr(cam, "num_reqs", None)
    num_reqs = len(qsl) - 1 if num_reqs is None else as_int(num_reqs, "num_reqs", minimum=0)
    if len(qsl) < num_reqs + 1:
        raise SpecError(
            f"query_start_loc_cpu: {len(qsl)} entries for num_reqs={num_reqs}; expected num_reqs + 1."
        )
    qsl = qsl[: num_reqs + 1]
    if len(qsl) and (qsl[0] != 0 or (np.diff(qsl) < 0).any()):
        raise SpecError(
            f"query_start_loc_cpu: expected [0] == 0 and non-decreasing values, received "
            f"{qsl[:8].tolist()}{' ...' if len(qsl) > 8 else ''}."
        )
    bound = getattr(cam, "seq_lens_cpu_upper_bound", None)
    source = "seq_lens_cpu_upper_bound"
    if bound is None:
        bound, source = getattr(cam, "_seq_lens_cpu", None), "_seq_lens_cpu"
    if bound is None:
        raise SpecError(
            "common_attn_metadata: neither seq_lens_cpu_upper_bound nor _seq_lens_cpu is set. "
            "attnsync never reads the seq_lens_cpu property (it copies seq_lens from the GPU). "
            "Fix: use a vLLM that fills seq_lens_cpu_upper_bound."
        )
    seq = _vllm_host_array(bound, source).astype(np.int64).ravel()
    if len(seq) < num_reqs:
        raise SpecError(f"{source}: {len(seq)} entries for num_reqs={num_reqs}.")
    seq = seq[:num_reqs]
    query_lens = np.diff(qsl)
    # vLLM pads CUDA-graph batches with rows of no tokens and no context at the end.
    used = np.flatnonzero((query_lens > 0) | (seq > 0))
    n = int(used[-1]) + 1 if used.size else 0
    num_tokens = int(qsl[-1]) if len(qsl) else 0
    num_actual_tokens = getattr(cam, "num_actual_tokens", None)
    padded_tokens = (
        num_tokens if num_actual_tokens is None else as_int(num_actual_tokens, "num_actual_tokens", minimum=0)
    )

    prefilling = getattr(cam, "is_prefilling", None)
    if prefilling is not None:
        prefilling = _vllm_host_array(prefilling, "is_prefilling").astype(bool).ravel()[:n]
    if seq_lens_exact is None:
        async_spec = hasattr(cam, "_seq_lens_cpu") and cam._seq_lens_cpu is None
        if async_spec:
            # Exact for prefill rows, an optimistic bound for decode rows.
            has_context = seq[:n] > query_lens[:n]
            decode_like = has_context if prefilling is None else has_context & ~prefilling
            seq_lens_exact = ~decode_like
        else:
            seq_lens_exact = True
    elif not isinstance(seq_lens_exact, bool | np.bool_):
        seq_lens_exact = _vllm_host_array(seq_lens_exact, "seq_lens_exact").astype(bool).ravel()[:n]

    if block_table_cpu is None:
        table = getattr(cam, "block_table_tensor", None)
        device = getattr(table, "device", None)
        if table is None or device is None or not str(device).lower().startswith("cpu"):
            raise TypeError(
                f"block_table_cpu: not given, and common_attn_metadata.block_table_tensor lives on "
                f"{device}; reading it would synchronise the host with the device. Fix: pass the "
                f"host block table your runner keeps, batch_from_vllm(cam, block_size=..., "
                f"block_table_cpu=input_batch.block_table[group].get_numpy_array())."
            )
        block_table_cpu = table
    table_np = _vllm_host_array(block_table_cpu, "block_table_cpu")
    if table_np.ndim != 2 or table_np.shape[0] < n:
        raise SpecError(
            f"block_table_cpu: expected a [>= {n}, W] table (one row per request, in batch order), "
            f"received shape {table_np.shape}."
        )
    return Batch(
        query_lens=query_lens[:n],
        seq_lens=seq[:n],
        block_table=table_np[:n],
        block_size=block_size,
        seq_lens_exact=seq_lens_exact,
        is_prefilling=prefilling,
        padded_num_reqs=max(num_reqs, n),
        padded_num_tokens=max(padded_tokens, num_tokens),
    )
