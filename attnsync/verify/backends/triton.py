"""`triton`: the shared fields and its empty prefix ranges against the oracle; its own metadata
driving the Triton kernel (torch) or the JAX reference as its consumer."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import kernels as k
from ..frameworks import Framework
from ..lowering import Case
from ..oracles import shared_fields
from ..registry import BackendCheck, register

__all__ = ["CHECK"]

# split_kv_min_seq_len 0: small decode-only batches take the split-KV path too, so the kernel
# check covers both launch shapes on the corpus.
OPTIONS = {"num_q_heads": k.NUM_Q_HEADS, "num_kv_heads": k.NUM_KV_HEADS, "head_dim": k.HEAD_DIM,
           "split_kv_min_seq_len": 0}


def oracle(batch: Any, md: Any) -> dict[str, Any]:
    want = shared_fields(batch)
    want["prefix_ranges"] = np.zeros((len(want["seq_lens"]), 0, 2), np.int32)
    return want


def kernel(case: Case, fw: Framework, lowered: Any) -> tuple[float, float]:
    """The kernel launched from the lowered triton metadata against the float64 reference."""
    q, key, value = k.attention_inputs(case)
    ref = k.paged_reference(case, q, key, value)
    if fw.name.startswith("torch"):
        import torch

        ta = k.need_triton(fw)
        qt, kt, vt = k.to_torch(fw, q, key, value)
        out = torch.full_like(qt, float("nan"))
        ta.paged_attention_from_metadata(qt, kt, vt, out, lowered, scale=k.SCALE)
        return k.relative_error(out.cpu().numpy(), ref), k.TOL_ATTENTION
    from ...kernels import jax_attention

    qj, kj, vj = k.to_jax(fw, q, key, value)
    out = jax_attention.paged_attention_jax_from_metadata(qj, kj, vj, lowered, scale=k.SCALE)
    return k.relative_error(np.asarray(out), ref), k.TOL_ATTENTION


CHECK = register(BackendCheck("triton", options=OPTIONS, oracle=oracle, kernel=kernel))
