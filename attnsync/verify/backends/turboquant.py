"""`turboquant`: the token owners and the prefill sub-batch against the oracle; TurboQuant
attention over a quantized cache (torch and JAX) against its reference reading the same
bytes as its consumer."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import kernels as k
from ..frameworks import Framework
from ..lowering import Case
from ..oracles import rows, shared_fields
from ..registry import BackendCheck, register

__all__ = ["CHECK"]

# The cache is quantized, but the reference reads the same bytes: float32 rounding remains.
TOL_TURBOQUANT = 5e-4


def oracle(batch: Any, md: Any) -> dict[str, Any]:
    want = shared_fields(batch)
    qsl, lens, _ = rows(want)
    n, nd, npre = len(lens), md.num_decodes, md.num_prefills
    owners = [r for r in range(n) for _ in range(qsl[r + 1] - qsl[r])]
    owners += [n] * (md.num_actual_tokens - len(owners))
    want.update(
        token_to_req=np.array(owners, np.int32),
        prefill_query_start_loc=np.array([qsl[r] - qsl[nd] for r in range(nd, nd + npre + 1)], np.int32),
        prefill_seq_lens=np.array(lens[nd : nd + npre], np.int32),
    )
    return want


def kernel(case: Case, fw: Framework, lowered: Any) -> tuple[float, float]:
    """The layer's forward (cache write, then attention) against the reference on the written cache."""
    from ...backends import turboquant as tqb

    md, batch = case.md, case.batch
    rng = np.random.default_rng(case.seed)
    cache_pages = int(batch.block_table.max(initial=0)) + 1
    bs = batch.block_size
    rotation = tqb.rotation_matrix(k.HEAD_DIM)
    # every byte 0xFF, whose float fields read as NaN: reading a slot that was never written shows
    cache = np.full((cache_pages, k.NUM_KV_HEADS, bs, tqb.slot_layout(k.HEAD_DIM).slot_bytes), 0xFF, np.uint8)
    for r in range(batch.num_reqs):
        context = int(case.lengths[r]) - int(batch.query_lens[r])
        if context > 0:
            pos = np.arange(context)
            kk = rng.standard_normal((context, k.NUM_KV_HEADS, k.HEAD_DIM)).astype(np.float32)
            vv = rng.standard_normal((context, k.NUM_KV_HEADS, k.HEAD_DIM)).astype(np.float32)
            slots = batch.block_table[r, pos // bs].astype(np.int64) * bs + pos % bs
            tqb.write_slots(cache, tqb.quantize(kk @ rotation, vv @ rotation), slots)
    t = md.num_actual_tokens
    q = rng.standard_normal((t, k.NUM_Q_HEADS, k.HEAD_DIM)).astype(np.float32)
    key = rng.standard_normal((t, k.NUM_KV_HEADS, k.HEAD_DIM)).astype(np.float32)
    value = rng.standard_normal((t, k.NUM_KV_HEADS, k.HEAD_DIM)).astype(np.float32)
    if fw.name.startswith("torch"):
        from ...kernels import turboquant as tqk

        impl = "triton" if fw.device.type == "cuda" else "torch"  # the interpreter is too slow here
        qt, kt, vt, ct = k.to_torch(fw, q, key, value, cache)
        layer = tqk.TurboQuantAttention(k.NUM_Q_HEADS, k.NUM_KV_HEADS, k.HEAD_DIM, device=fw.device, scale=k.SCALE,
                                        rotation=rotation, impl=impl)
        out = layer.forward(qt, kt, vt, ct, lowered).float().cpu().numpy()
        cache_after = ct.cpu().numpy()
    else:
        from ...kernels import turboquant_jax as tqj

        qj, kj, vj, cj, rj = k.to_jax(fw, q, key, value, cache, rotation)
        out, cache_after = tqj.forward(qj, kj, vj, cj, lowered, rj, scale=k.SCALE)
        out, cache_after = np.asarray(out), np.asarray(cache_after)
    ref = tqb.reference_attention(q, key, value, cache_after, md, rotation=rotation, scale=k.SCALE,
                                  seq_lens=case.lengths)
    real = md.num_scheduled_tokens
    return k.relative_error(out[:real], ref[:real]), TOL_TURBOQUANT


CHECK = register(BackendCheck("turboquant", oracle=oracle, kernel=kernel))
