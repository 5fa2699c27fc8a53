"""`flashinfer`: its paged-KV plan arrays against the oracle; FlashInfer's own wrappers (CUDA
through torch) as its consumer. It documents refusing inexact rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import kernels as k
from ..frameworks import Framework
from ..lowering import Case
from ..oracles import pages, rows, shared_fields
from ..registry import BackendCheck, register
from ..report import Skip, error_text

__all__ = ["CHECK"]

# bf16 output rounding is about 4e-3 of the largest value.
TOL_BF16 = 1e-2


def build_refusal(batch: Any, options: dict[str, Any]) -> str | None:
    if (~batch.seq_lens_exact).any():
        return ("flashinfer needs exact lengths for every row (plan() derives KV lengths from "
                "paged_kv_indptr and last_page_len; attnsync.backends.flashinfer)")
    return None


def oracle(batch: Any, md: Any) -> dict[str, Any]:
    want = shared_fields(batch)
    qsl, lens, table = rows(want)
    bs, nd, npre = batch.block_size, md.num_decodes, md.num_prefills
    indptr, indices, last = [0], [], []
    for r in range(len(lens)):
        n = pages(lens[r], bs)
        indptr.append(indptr[-1] + n)
        indices.extend(int(x) for x in table[r, :n])
        last.append(0 if lens[r] == 0 else (lens[r] % bs or bs))
    want.update(
        paged_kv_indptr=np.array(indptr, np.int32), paged_kv_indices=np.array(indices, np.int32),
        paged_kv_last_page_len=np.array(last, np.int32),
        prefill_qo_indptr=np.array([qsl[r] - qsl[nd] for r in range(nd, nd + npre + 1)], np.int32),
        prefill_paged_kv_indptr=np.array([indptr[r] - indptr[nd] for r in range(nd, nd + npre + 1)], np.int32),
        num_decode_pages=indptr[nd], num_pages=indptr[-1],
    )
    return want


def kernel(case: Case, fw: Framework, lowered: Any) -> tuple[float, float]:
    """FlashInfer's decode and prefill wrappers planned from the lowered metadata, in bf16."""
    if not fw.name == "torch-cuda":
        raise Skip("FlashInfer runs on CUDA through torch only")
    try:
        import flashinfer
    except Exception as exc:
        raise Skip("flashinfer is not installed", error_text(exc)) from None
    import torch

    from ...integrations.flashinfer import plan, run, workspace_buffer

    md = case.md
    if md.num_decode_tokens != md.num_decodes:
        # FlashInfer's decode wrapper plans one query token per request; plan() refuses a real
        # decode row without a token, with that reason.
        raise Skip("a real decode row has no new tokens; FlashInfer's decode wrapper plans one per request")

    # bf16 with grouped-query heads and head dim 128: the configuration the GPU tests compile
    # (FlashInfer compiles each configuration on first use, which is slow).
    hq, hkv, dim, dtype = 16, 8, 128, torch.bfloat16
    key = ("flashinfer", fw.device)
    wrappers = k.CACHE.get(key)
    if wrappers is None:
        wrappers = k.CACHE[key] = (
            flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace_buffer(fw.device), "NHD"),
            flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace_buffer(fw.device), "NHD"),
        )
    rng = np.random.default_rng(case.seed)
    cache_pages = int(case.batch.block_table.max(initial=0)) + 1
    shape = (cache_pages, case.batch.block_size, hkv, dim)
    q = torch.from_numpy(rng.standard_normal((md.num_actual_tokens, hq, dim), np.float32)).to(fw.device, dtype)
    kc = torch.from_numpy(rng.standard_normal(shape, np.float32)).to(fw.device, dtype)
    vc = torch.from_numpy(rng.standard_normal(shape, np.float32)).to(fw.device, dtype)
    scale = 1.0 / math.sqrt(dim)
    plan(lowered, decode_wrapper=wrappers[0], prefill_wrapper=wrappers[1], num_qo_heads=hq, num_kv_heads=hkv,
         head_dim=dim, q_data_type=dtype, sm_scale=scale)
    out = torch.full_like(q, float("nan"))
    run(lowered, q, (kc, vc), decode_wrapper=wrappers[0], prefill_wrapper=wrappers[1], out=out)
    as_np = [x.float().cpu().numpy() for x in (q, kc, vc, out)]
    ref = k.paged_reference(case, *as_np[:3], scale=scale)
    return k.relative_error(as_np[3], ref), TOL_BF16


CHECK = register(BackendCheck("flashinfer", build_refusal=build_refusal, oracle=oracle, kernel=kernel))
