"""`flex`: document ids, offsets, page counts and the inverse block table against the oracle;
its torch lowering recomputes the length-dependent fields on the device; FlexAttention (torch)
or the JAX Flex reference as its consumer, and its device builders in the fake-tensor column."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .. import kernels as k
from ..frameworks import Framework
from ..lowering import Case
from ..oracles import pages, rows, shared_fields
from ..registry import BackendCheck, register
from ..report import Skip

__all__ = ["CHECK"]

INT32_MAX = 2**31 - 1


def batch_options(batch: Any) -> dict[str, Any]:
    """The cache size Flex needs when the batch does not give one (largest page id + 1)."""
    if batch.num_cache_pages is None:
        return {"num_cache_pages": int(batch.block_table.max(initial=0)) + 1}
    return {}


def build_refusal(batch: Any, options: dict[str, Any]) -> str | None:
    cache_pages = options.get("num_cache_pages") or batch.num_cache_pages or 1
    if cache_pages * batch.block_size > INT32_MAX:
        return "flex indexes the whole cache as one int32 KV sequence (attnsync.backends.flex)"
    return None


def oracle(batch: Any, md: Any) -> dict[str, Any]:
    want = shared_fields(batch)
    qsl, lens, table = rows(want)
    n, bs = len(lens), batch.block_size
    doc = [r for r in range(n) for _ in range(qsl[r + 1] - qsl[r])]
    doc += [max(n - 1, 0)] * (md.num_actual_tokens - len(doc))
    offset = [lens[r] - (qsl[r + 1] - qsl[r]) for r in range(n)]
    want.update(doc_ids=np.array(doc, np.int32), decode_offset=np.array(offset, np.int32),
                num_blocks_per_seq=np.array([pages(s, bs) for s in lens], np.int32))
    if not md.inverse_table_on_device:  # the dictionary form of the inverse table
        p2l = [[-1] * md.num_cache_pages for _ in range(n)]
        for r in range(n):
            for c in range(pages(lens[r], bs)):
                page = int(table[r, c])
                p2l[r][page] = max(p2l[r][page], c)
            if md.num_cache_pages:
                p2l[r][0] = -1
        want["physical_to_logical"] = np.array(p2l, np.int32).reshape(n, md.num_cache_pages)
    return want


def device_built(md: Any) -> dict[str, np.ndarray]:
    """The inverse table a torch lowering builds on the device when the host left it empty
    (``inverse_table="device"``, which "auto" picks for large caches): [R, num_cache_pages]."""
    if not md.inverse_table_on_device:
        return {}
    from ...backends.flex import inverse_block_table

    return {"physical_to_logical": inverse_block_table(md.block_table, md.seq_lens, md.block_size,
                                                       md.num_cache_pages)}


def torch_lower(md: Any, device: Any, *, seq_lens: Any = None) -> Any:
    from ...integrations import flex_torch

    return flex_torch.lower(md, device, seq_lens=seq_lens)


def kernel(case: Case, fw: Framework, lowered: Any) -> tuple[float, float]:
    """FlexAttention over the lowered block lists against the float64 paged reference."""
    md = case.md
    dense = md.num_actual_tokens * md.total_cache_tokens
    if dense > k.KERNEL_MAX_DENSE:
        raise Skip(f"batch too large for the dense Flex references (T x cache slots > {k.KERNEL_MAX_DENSE})",
                   f"{dense}")
    q, key, value = k.attention_inputs(case)
    ref = k.paged_reference(case, q, key, value)
    if fw.name.startswith("torch"):
        from ...integrations import flex_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            out = flex_torch.flex_paged_attention(*k.to_torch(fw, q, key, value), lowered, scale=k.SCALE)
        return k.relative_error(out.float().cpu().numpy(), ref), k.TOL_ATTENTION
    from ...kernels import flex_jax

    out = flex_jax.flex_attention_jax(*k.to_jax(fw, q, key, value), lowered, scale=k.SCALE)
    return k.relative_error(np.asarray(out), ref), k.TOL_ATTENTION


def fake_paths(case: Case) -> list[tuple[str, Any, dict[str, Any], Any]]:
    """Flex's device builders (document ids, inverse table, block lists) as device paths."""
    import torch

    from ...integrations import flex_torch

    md = case.md
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731 - writable copies of read-only arrays
    exact = case.twin_md if case.inexact else md
    total = md.num_scheduled_tokens
    paths = [
        ("doc_ids_device (flex)", lambda query_start_loc: flex_torch.doc_ids_device(
            query_start_loc, total, padded_tokens=md.num_actual_tokens), dict(query_start_loc=t(md.query_start_loc)),
         md.doc_ids),
        ("doc_ids_static_device (flex)", lambda query_start_loc: flex_torch.doc_ids_static_device(
            query_start_loc, md.num_actual_tokens), dict(query_start_loc=t(md.query_start_loc)), md.doc_ids),
        ("physical_to_logical_device (flex)", lambda block_table, seq_lens:
         flex_torch.physical_to_logical_device(block_table, seq_lens, md.block_size, md.num_cache_pages),
         dict(block_table=t(md.block_table), seq_lens=t(case.lengths)),
         None if md.inverse_table_on_device else exact.physical_to_logical),
    ]
    if not case.inexact:
        def kv_blocks(doc_ids: Any, query_start_loc: Any, decode_offset: Any, block_table: Any) -> Any:
            return flex_torch.kv_blocks_device(
                doc_ids, query_start_loc, decode_offset, block_table, block_size=md.block_size,
                q_block_size=md.q_block_size, max_pages=md.max_pages_per_seq, num_pages=md.num_cache_pages,
                width=md.max_kv_blocks)

        paths.append(("kv_blocks_device (flex)", kv_blocks,
                      dict(doc_ids=t(md.doc_ids), query_start_loc=t(md.query_start_loc),
                           decode_offset=t(md.decode_offset), block_table=t(md.block_table)),
                      (md.kv_num_blocks, md.kv_indices)))
    return paths


CHECK = register(BackendCheck(
    "flex",
    options={"q_block_size": 16},  # num_cache_pages comes per batch (batch_options)
    batch_options=batch_options,
    build_refusal=build_refusal,
    oracle=oracle,
    device_recomputed=("seq_lens", "slot_mapping", "decode_offset", "num_blocks_per_seq", "physical_to_logical"),
    # the lowered lengths are exact once the device lengths replace the host bound
    scalar_overrides={"all_exact": True},
    device_built=device_built,
    torch_lower=torch_lower,
    kernel=kernel,
    fake_paths=fake_paths,
))
