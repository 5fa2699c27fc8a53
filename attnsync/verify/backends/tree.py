"""`tree`: the four sub-batch maxima and the prefill offsets against the oracle; tree attention
(torch and JAX) against its float64 reference as its consumer, also run on fake tensors. The
corpus batch is reordered for the tree's decode threshold."""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import reorder
from .. import kernels as k
from ..frameworks import Framework
from ..lowering import Case, lower_case
from ..oracles import rows, shared_fields
from ..registry import BackendCheck, register

__all__ = ["CHECK"]

TREE = "[(0,), (1,), (0, 0)]"  # three drafted nodes + the root: L = 4, the tree's decode threshold
TREE_SIZE = 4


def prepare(batch: Any) -> Any:
    """Rows of up to L tokens count as decodes: decode-first order for that threshold."""
    return reorder(batch, decode_threshold=TREE_SIZE)[1]


def oracle(batch: Any, md: Any) -> dict[str, Any]:
    want = shared_fields(batch)
    qsl, lens, _ = rows(want)
    n, nd = len(lens), md.num_decodes
    q = [qsl[r + 1] - qsl[r] for r in range(n)]
    dec, pre = range(nd), range(nd, nd + md.num_prefills)
    want.update(  # the four sub-batch maxima from host arrays
        max_decode_query_len=max((q[r] for r in dec), default=0),
        max_decode_seq_len=max((lens[r] for r in dec), default=0),
        max_prefill_query_len=max((q[r] for r in pre), default=0),
        max_prefill_seq_len=max((lens[r] for r in pre), default=0),
        prefill_query_start_loc=np.array([qsl[r] - qsl[nd] for r in range(nd, n + 1)], np.int32),
    )
    return want


def kernel(case: Case, fw: Framework, lowered: Any) -> tuple[float, float]:
    """Tree attention on the lowered metadata against the float64 tree reference."""
    from ...kernels.tree_reference import tree_paged_attention_reference

    md = case.md
    q, key, value = k.attention_inputs(case)
    ref = tree_paged_attention_reference(
        q, key, value, query_start_loc=md.query_start_loc, seq_lens=case.lengths, block_table=md.block_table,
        tree_attn_bias=md.tree_attn_bias, num_decodes=md.num_decodes, scale=k.SCALE, num_reqs=md.num_reqs,
    )
    if fw.name.startswith("torch"):
        import torch

        from ...kernels.tree_reference import tree_paged_attention_torch

        qt, kt, vt = k.to_torch(fw, q, key, value)
        out = tree_paged_attention_torch(qt, kt, vt, lowered, scale=k.SCALE, out=torch.full_like(qt, float("nan")))
        return k.relative_error(out.cpu().numpy(), ref), k.TOL_ATTENTION
    from ...kernels.tree_jax import tree_paged_attention_jax

    out = tree_paged_attention_jax(*k.to_jax(fw, q, key, value), lowered, scale=k.SCALE)
    return k.relative_error(np.asarray(out), ref), k.TOL_ATTENTION


def fake_paths(case: Case) -> list[tuple[str, Any, dict[str, Any], Any]]:
    """The torch tree attention as a device path, on batches the gate admits."""
    k.kernel_gate(case)
    import torch

    from ...kernels.tree_reference import tree_paged_attention_torch

    lowered, _, _ = lower_case(case, Framework("torch-cpu", True, "", torch.device("cpu")))
    q, key, value = (torch.from_numpy(a) for a in k.attention_inputs(case))
    scale = k.SCALE  # the lambda's parameter `k` (the inputs' key name) hides the module alias
    return [("tree_paged_attention_torch (consumer)",
             lambda q, k, v, md: tree_paged_attention_torch(q, k, v, md, scale=scale),
             dict(q=q, k=key, v=value, md=lowered), None)]


CHECK = register(BackendCheck("tree", options={"speculative_token_tree": TREE}, prepare=prepare, oracle=oracle,
                              kernel=kernel, fake_paths=fake_paths))
