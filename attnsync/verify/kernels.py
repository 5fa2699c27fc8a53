"""The kernel column: each backend's consumer (its record's `kernel`) against a float64 reference.

Shared here: the size gate (the references are dense and slow), the model shape, random
inputs, the paged-attention reference and the framework transfers the drivers use.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .frameworks import Framework
from .lowering import Case
from .registry import backend_check
from .report import Fail, Skip, error_text

__all__ = [
    "CACHE", "HEAD_DIM", "KERNEL_MAX_DENSE", "KERNEL_MAX_GATHER", "KERNEL_MAX_SLOTS", "KERNEL_MAX_TOKENS",
    "NUM_KV_HEADS", "NUM_Q_HEADS", "SCALE", "TOL_ATTENTION", "attention_inputs", "check_kernel", "kernel_gate",
    "need_triton", "paged_reference", "relative_error", "to_jax", "to_torch",
]

# Model shapes are small so that the kernel check runs in seconds on a CPU (Triton through its
# interpreter there).
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16
SCALE = 1.0 / math.sqrt(HEAD_DIM)

# Kernel checks run only on batches under these limits: the references are dense and slow.
KERNEL_MAX_TOKENS = 512
KERNEL_MAX_GATHER = 1 << 20  # T x W x block_size: keys gathered per token by the JAX references
KERNEL_MAX_SLOTS = 1 << 18  # cache slots (pages x block_size) allocated for the random cache
KERNEL_MAX_DENSE = 1 << 22  # T x cache slots: the dense mask of the Flex references

# Tolerance of float32 attention (max |out - ref| / max |ref|); drivers of quantized, scanned or
# bf16 consumers name their own.
TOL_ATTENTION = 2e-4

# Compiled consumers and wrappers kept across cases (jitted layers, FlashInfer wrappers).
CACHE: dict[Any, Any] = {}


def kernel_gate(case: Case) -> None:
    """Raise `Skip` when the case is too large (or empty) for the dense references."""
    md = case.md
    if case.batch.num_tokens == 0:
        raise Skip("no tokens to attend")
    if md.num_actual_tokens > KERNEL_MAX_TOKENS:
        raise Skip(f"batch too large for the kernel check (> {KERNEL_MAX_TOKENS} tokens)",
                   f"{md.num_actual_tokens} tokens")
    batch = case.batch
    slots = (int(batch.block_table.max(initial=0)) + 1) * batch.block_size
    if slots > KERNEL_MAX_SLOTS:
        raise Skip(f"batch too large for the kernel check (> {KERNEL_MAX_SLOTS} cache slots)", f"{slots} slots")
    gather = md.num_actual_tokens * batch.block_table.shape[1] * batch.block_size
    if gather > KERNEL_MAX_GATHER:
        raise Skip(f"batch too large for the kernel check (T x W x block_size > {KERNEL_MAX_GATHER})", f"{gather}")


def attention_inputs(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random float32 queries [T, Hq, D] and a paged K/V cache [pages, block_size, Hkv, D]."""
    rng = np.random.default_rng(case.seed)
    pages = int(case.batch.block_table.max(initial=0)) + 1
    q = rng.standard_normal((case.md.num_actual_tokens, NUM_Q_HEADS, HEAD_DIM)).astype(np.float32)
    shape = (pages, case.batch.block_size, NUM_KV_HEADS, HEAD_DIM)
    return q, rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def paged_reference(case: Case, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float = SCALE) -> np.ndarray:
    """Float64 paged attention over the case's exact lengths."""
    from ..kernels.reference import paged_attention_reference

    md = case.md
    return paged_attention_reference(q, k, v, query_start_loc=md.query_start_loc, seq_lens=case.lengths,
                                      block_table=md.block_table, scale=scale, num_reqs=md.num_reqs)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref| (`attnsync.kernels.reference.relative_error`)."""
    from ..kernels.reference import relative_error as error

    return error(out, ref)


def to_torch(fw: Framework, *arrays: np.ndarray) -> list[Any]:
    """Each array as a torch tensor on `fw`'s device."""
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a)).to(fw.device) for a in arrays]


def to_jax(fw: Framework, *arrays: np.ndarray) -> list[Any]:
    """Each array as a jax.Array on `fw`'s device."""
    import jax

    return [jax.device_put(np.ascontiguousarray(a), fw.device) for a in arrays]


def need_triton(fw: Framework) -> Any:
    """`attnsync.kernels.triton_attention`, or `Skip` when it cannot run on `fw` here."""
    try:
        from ..kernels import triton_attention
    except Exception as exc:
        raise Skip("triton is not importable", error_text(exc)) from None
    if fw.device.type == "cpu" and "Interpret" not in type(triton_attention._paged_attention_kernel).__name__:
        raise Skip("triton kernels were imported before TRITON_INTERPRET=1 was set; run verify in a fresh process")
    return triton_attention


def check_kernel(case: Case, fw: Framework, lowered: Any) -> tuple[str, float]:
    """Run the backend's consumer; (detail, relative error) or raise `Fail` / `Skip`."""
    consumer = backend_check(case.backend).kernel
    if consumer is None:
        raise Skip("no consumer wired for this backend")
    kernel_gate(case)
    try:
        error, tolerance = consumer(case, fw, lowered)
    except (Skip, Fail):
        raise
    except ImportError as exc:
        raise Skip("the backend's consumer is not importable", error_text(exc)) from None
    if not error < tolerance:
        raise Fail(f"output: relative error {error:.3g} >= tolerance {tolerance:g} against the float64 reference")
    return f"relative error {error:.2g} (tolerance {tolerance:g})", error
