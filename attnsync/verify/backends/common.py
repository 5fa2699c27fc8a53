"""`common`: every common field against the oracle; the unified Triton kernel (torch) or the
JAX paged-attention reference as its consumer."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import kernels as k
from ..frameworks import Framework
from ..lowering import Case
from ..oracles import brute_common
from ..registry import BackendCheck, register

__all__ = ["CHECK"]


def oracle(batch: Any, md: Any) -> dict[str, Any]:
    """Every field of `CommonMetadata`, at the metadata's own decode threshold."""
    threshold = getattr(md, "decode_threshold", None) or 1
    want = dict(brute_common(batch, decode_threshold=threshold))
    want["decode_threshold"] = threshold
    want["block_size"] = batch.block_size
    want["slot_mapping_exact"] = bool(batch.seq_lens_exact.all())
    return want


def kernel(case: Case, fw: Framework, lowered: Any) -> tuple[float, float]:
    """Paged attention from the common fields against the float64 reference."""
    q, key, value = k.attention_inputs(case)
    ref = k.paged_reference(case, q, key, value)
    if fw.name.startswith("torch"):
        import torch

        ta = k.need_triton(fw)
        qt, kt, vt = k.to_torch(fw, q, key, value)
        out = torch.full_like(qt, float("nan"))
        ta.unified_paged_attention(
            qt, kt, vt, out, query_start_loc=lowered.query_start_loc, seq_lens=lowered.seq_lens,
            block_table=lowered.block_table_tensor, max_query_len=lowered.max_query_len,
            max_seq_len=lowered.max_seq_len, num_reqs=lowered.num_reqs, scale=k.SCALE,
        )
        return k.relative_error(out.cpu().numpy(), ref), k.TOL_ATTENTION
    from ...kernels import jax_attention

    qj, kj, vj = k.to_jax(fw, q, key, value)
    out = jax_attention.paged_attention_jax(qj, kj, vj, lowered.query_start_loc, lowered.seq_lens,
                                            lowered.block_table, scale=k.SCALE)
    return k.relative_error(np.asarray(out), ref), k.TOL_ATTENTION


CHECK = register(BackendCheck("common", oracle=oracle, kernel=kernel))
