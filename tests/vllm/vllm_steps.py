"""Serving steps as vLLM's model runner holds them, and vLLM's own view of each (tests/vllm only).

A `Step` is the runner's per-request host state for one forward pass: tokens scheduled, tokens
already computed (optimistic under async speculative decoding), prompt lengths, KV pages, the
CUDA-graph padding. `vllm_side` turns it into what vLLM 0.33 would hand an attention builder,
using vLLM's own classes where they run on a CPU: its `BlockTable` (rows, the null block for
padded rows), its slot-mapping Triton kernel (run through Triton's interpreter), its
`CommonAttentionMetadata`. `attnsync_side` takes the same step through attnsync:
`batch_from_vllm` -> `attnsync.build` -> `lower` -> `to_vllm_common`.

The steps: every batch of attnsync's corpus (`attnsync._corpus.corpus`) recast as runner state,
and batches shaped like vLLM's own attention-backend test specs (small and medium decodes,
chunked prefills, mixed batches, single requests, long contexts, speculative-decode rows),
written here with our own numbers.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

import attnsync
from attnsync._corpus import corpus
from attnsync.adapters import torch as ast
from attnsync.integrations import vllm as av


@dataclasses.dataclass
class Step:
    """One step of vLLM's runner state, rows in batch order."""

    name: str
    num_scheduled: np.ndarray  # [n] tokens this step
    num_computed: np.ndarray  # [n] host count (optimistic under async spec decode)
    num_prompt: np.ndarray  # [n] prompt lengths
    pages: list[np.ndarray]  # per row: its KV page ids, in order
    block_size: int
    num_reqs_padded: int
    num_tokens_padded: int
    rejected: np.ndarray | None = None  # [n] drafts rejected last step (async spec decode)
    width: int | None = None  # block-table columns (default: enough for the longest row)

    @property
    def n(self) -> int:
        return len(self.num_scheduled)

    @property
    def async_spec(self) -> bool:
        return self.rejected is not None

    @property
    def exact_computed(self) -> np.ndarray:
        return self.num_computed - (0 if self.rejected is None else self.rejected)

    def take(self, order: np.ndarray, name: str | None = None) -> Step:
        order = np.asarray(order, dtype=np.int64)
        return dataclasses.replace(
            self, name=name or self.name, num_scheduled=self.num_scheduled[order],
            num_computed=self.num_computed[order], num_prompt=self.num_prompt[order],
            pages=[self.pages[i] for i in order],
            rejected=None if self.rejected is None else self.rejected[order])


def _pages(rng: np.random.Generator, seq_lens: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Distinct random page ids (>= 1; vLLM's block 0 is the null block) for each row."""
    needed = -(-seq_lens.astype(np.int64) // block_size)
    pool = rng.permutation(np.arange(1, max(8192, int(needed.sum()) + 1)))
    out, start = [], 0
    for count in needed:
        out.append(pool[start : start + count].astype(np.int32))
        start += int(count)
    return out


def step_from_rows(name: str, seq_lens, query_lens, *, block_size: int = 16, prefilling=None,
                   pad_reqs: int = 0, pad_tokens: int = 0, rejected=None, seed: int = 0,
                   pages: list[np.ndarray] | None = None, width: int | None = None) -> Step:
    """A step from per-row lengths; `prefilling` defaults to rows without context or with more
    than one new token (chunked prefills), the rest are decodes."""
    s = np.asarray(seq_lens, dtype=np.int64)
    q = np.asarray(query_lens, dtype=np.int64)
    computed = s - q
    if prefilling is None:
        prefilling = (computed == 0) | (q > 1)
        if rejected is not None:  # rows with drafts are decodes
            prefilling &= computed == 0
    prefilling = np.asarray(prefilling, dtype=bool)
    # vLLM: still prefilling <=> num_computed < num_prompt.
    prompt = np.where(prefilling, np.maximum(s, computed + 1), np.maximum(computed - 3, 0))
    rng = np.random.default_rng(seed)
    return Step(
        name=name, num_scheduled=q, num_computed=computed, num_prompt=prompt,
        pages=_pages(rng, s, block_size) if pages is None else pages, block_size=block_size,
        num_reqs_padded=len(q) + pad_reqs, num_tokens_padded=int(q.sum()) + pad_tokens,
        rejected=None if rejected is None else np.asarray(rejected, dtype=np.int64), width=width)


def corpus_steps() -> Iterator[Step]:
    """attnsync's corpus (edge cases, random steps, small random steps) as runner state.

    Rows the corpus marks inexact become async-spec-decode rows (one or two drafts rejected on
    the device); `is_prefilling` comes from the batch, or from the row shape when it has none.
    """
    for name, batch in corpus(seed=0, cases=8, small_cases=8):
        q = batch.query_lens.astype(np.int64)
        s = batch.seq_lens.astype(np.int64)
        rejected = None
        prefilling = batch.is_prefilling
        if not batch.all_exact:
            rejected = np.where(batch.seq_lens_exact, 0, np.minimum(2, np.maximum(q - 1, 0)))
            if prefilling is None:
                prefilling = (s == q) & batch.seq_lens_exact
        pages = [row[: -(-int(length) // batch.block_size)].copy() for row, length in zip(batch.block_table, s)]
        yield step_from_rows(
            f"corpus: {name}", s, q, block_size=batch.block_size, prefilling=prefilling,
            pad_reqs=batch.padded_num_reqs - batch.num_reqs, pad_tokens=batch.padded_num_tokens - batch.num_tokens,
            rejected=rejected, pages=pages, width=batch.block_table.shape[1])


def vllm_shaped_steps() -> Iterator[Step]:
    """Batches shaped like vLLM's attention-backend test specs (our numbers), plus the cases
    its runner adds: CUDA-graph padding, async speculative decoding, one-token prompts."""
    yield step_from_rows("vllm-shaped: small decode", [27, 45], [1, 1])
    yield step_from_rows("vllm-shaped: small chunked prefill", [30, 44], [10, 6])
    yield step_from_rows("vllm-shaped: small mixed", [33, 41, 50, 57], [1, 1, 6, 4])
    yield step_from_rows("vllm-shaped: medium decode", [100, 260, 515, 1000, 129, 250, 511, 1030], [1] * 8)
    yield step_from_rows("vllm-shaped: medium chunked prefill", [300, 600, 1000, 2100], [16] * 4)
    yield step_from_rows("vllm-shaped: medium mixed", [500, 1000, 2050, 520, 1010, 2040], [1, 1, 1, 7, 7, 7])
    yield step_from_rows("vllm-shaped: large decode", [2048 + i for i in range(32)], [1] * 32, seed=1)
    yield step_from_rows("vllm-shaped: large chunked prefill", [4096] * 8, [32] * 8, seed=2)
    rng = np.random.default_rng(3)
    decode_ctx = rng.integers(64, 4096, size=48)
    yield step_from_rows(
        "vllm-shaped: large mixed (decodes, continuations, fresh prompts)",
        np.concatenate([decode_ctx, rng.integers(300, 3000, size=14) + 24, [512, 1000]]),
        np.concatenate([np.ones(48, int), np.full(14, 24), [512, 1000]]), seed=3)
    yield step_from_rows("vllm-shaped: single decode", [1000], [1])
    yield step_from_rows("vllm-shaped: single chunked prefill", [1024], [64])
    yield step_from_rows("vllm-shaped: single fresh prompt", [77], [77])
    yield step_from_rows("vllm-shaped: one-token prompt among decodes", [40, 1, 90, 3], [1, 1, 1, 3])
    yield step_from_rows("vllm-shaped: long contexts", [32768, 131072, 65537, 8192], [1, 1, 1, 8192], seed=4)
    yield step_from_rows("vllm-shaped: spec decode (1 + 3 drafts)", [128, 256, 512, 1024], [4] * 4,
                         prefilling=[False] * 4)
    yield step_from_rows("vllm-shaped: spec decode (1 + 7 drafts)", [512, 1024, 2048, 512, 1024, 2048],
                         [8] * 6, prefilling=[False] * 6, seed=5)
    yield step_from_rows("vllm-shaped: async spec decode, drafts rejected on the device",
                         [130, 260, 515, 1030, 44], [4, 4, 4, 4, 20], rejected=[0, 1, 3, 2, 0], seed=6)
    yield step_from_rows("vllm-shaped: CUDA-graph padded decode", [33, 17, 80, 5, 64], [1] * 5,
                         pad_reqs=3, pad_tokens=3, seed=7)
    yield step_from_rows("vllm-shaped: CUDA-graph padded mixed", [33, 17, 8], [1, 1, 8],
                         pad_reqs=1, pad_tokens=6, seed=8)
    yield step_from_rows("vllm-shaped: block size 64", [200, 70, 640], [1, 70, 1], block_size=64, seed=9)


def all_steps() -> list[Step]:
    return [*corpus_steps(), *vllm_shaped_steps()]


# ---------------------------------------------------------------------------------------------
# vLLM's side


def block_table_width(step: Step) -> int:
    needed = max((len(p) for p in step.pages), default=0)
    return max(needed, 1) if step.width is None else max(step.width, needed)


def vllm_block_table(step: Step) -> Any:
    """vLLM's `BlockTable` (one kv-cache group) on the CPU, holding the step's rows."""
    from vllm.v1.worker.block_table import BlockTable

    table = BlockTable(step.block_size, max(step.num_reqs_padded, 1), block_table_width(step),
                       max(step.num_tokens_padded, 1), False, torch.device("cpu"), 1)
    for row, pages in enumerate(step.pages):
        table.add_row(pages.tolist(), row)
    # What commit_block_table does, minus pinning (vLLM pins only with a CUDA driver).
    table.block_table.gpu.copy_(table.block_table.cpu)
    return table


def _interpreted_slot_kernel():
    """vLLM's slot-mapping kernel (`ComputeSlotMappingKernel.kernel`), under Triton's interpreter.

    Without a GPU vLLM turns `triton.jit` into a no-op and its `tl` into a placeholder, so the
    kernel's own Python function is re-bound to real Triton here and jitted; with
    TRITON_INTERPRET=1 it then runs on CPU tensors, line for line as vLLM wrote it.
    """
    import triton
    import triton.language as tl
    from vllm.v1.worker.block_table import ComputeSlotMappingKernel

    fn = ComputeSlotMappingKernel.kernel
    fn = getattr(fn, "fn", fn)  # a real JITFunction keeps the Python function in .fn
    names = dict(fn.__globals__, tl=tl, triton=triton)
    return triton.jit(types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__))


_SLOT_KERNEL: list[Any] = []


def vllm_slot_mapping(step: Step, table: Any, query_start_loc: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """vLLM's slot mapping of the step: its kernel, writing the table's own slot buffer."""
    from vllm.v1.attention.backends.utils import PAD_SLOT_ID

    if not _SLOT_KERNEL:
        _SLOT_KERNEL.append(_interpreted_slot_kernel())
    buffer = table.slot_mapping.gpu
    buffer.fill_(12345)  # stale values: the kernel must overwrite every slot it reports
    _SLOT_KERNEL[0][(step.n + 1,)](
        positions.shape[0], step.num_tokens_padded, query_start_loc, positions, table.block_table.gpu,
        table.block_table.gpu.stride(0), buffer, KV_CACHE_BLOCK_SIZE=step.block_size, TOTAL_CP_WORLD_SIZE=1,
        TOTAL_CP_RANK=0, CP_KV_CACHE_INTERLEAVE_SIZE=1, PAD_ID=PAD_SLOT_ID, BLOCK_SIZE=1024)
    return buffer[: step.num_tokens_padded]


def vllm_side(step: Step) -> tuple[Any, Any]:
    """`(CommonAttentionMetadata, BlockTable)` as vLLM 0.33's V1 runner builds them for `step`
    (`_prepare_inputs` and `_build_attention_metadata`), CPU tensors standing in for device ones."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n, r, t = step.n, step.num_reqs_padded, step.num_tokens_padded
    table = vllm_block_table(step)
    qsl = np.zeros(r + 1, dtype=np.int32)
    np.cumsum(step.num_scheduled, out=qsl[1 : n + 1])
    qsl[n + 1 :] = qsl[n]  # non-decreasing padding
    real_tokens = int(qsl[n])
    req = np.repeat(np.arange(n), step.num_scheduled)
    offset = np.arange(real_tokens) - np.repeat(qsl[:n], step.num_scheduled)
    # Device positions and lengths come from the device's (exact) computed counts.
    positions = torch.from_numpy((step.exact_computed[req] + offset).astype(np.int64))
    device_seq = np.zeros(r, dtype=np.int32)
    device_seq[:n] = step.exact_computed + step.num_scheduled
    host_seq = np.zeros(r, dtype=np.int32)
    host_seq[:n] = step.num_computed + step.num_scheduled
    prefilling = np.zeros(r, dtype=bool)
    prefilling[:n] = step.num_computed < step.num_prompt
    query_start_loc = torch.from_numpy(qsl)
    slot_mapping = vllm_slot_mapping(step, table, query_start_loc, positions)
    block_table = table.get_device_tensor(r)
    block_table[n:r].fill_(0)  # NULL_BLOCK_ID for padded rows
    cam = CommonAttentionMetadata(
        query_start_loc=query_start_loc.clone(),
        query_start_loc_cpu=query_start_loc,
        seq_lens=torch.from_numpy(device_seq),
        seq_lens_cpu_upper_bound=torch.from_numpy(host_seq),
        num_reqs=r,
        num_actual_tokens=t,
        max_query_len=int(step.num_scheduled.max(initial=0)),
        max_seq_len=int(host_seq[:n].max(initial=0)),
        block_table_tensor=block_table,
        slot_mapping=slot_mapping,
        causal=True,
        is_prefilling=torch.from_numpy(prefilling),
        positions=torch.cat([positions, torch.zeros(t - real_tokens, dtype=torch.int64)]),
    )
    return cam, table


def attnsync_side(step: Step, cam: Any, table: Any, *, backend: str = "common", **options: Any) -> tuple[Any, Any, Any]:
    """`(batch, numpy metadata, CommonAttentionMetadata)` through attnsync, from vLLM's host
    fields and host block table only."""
    batch = av.batch_from_vllm(cam, block_size=step.block_size, block_table_cpu=table.get_numpy_array(),
                               async_spec_decode=step.async_spec)
    md = attnsync.build(batch, backend, **options)
    lowered = ast.lower(md, "cpu", seq_lens=None if batch.all_exact else cam.seq_lens)
    return batch, md, av.to_vllm_common(lowered, positions=cam.positions)


# ---------------------------------------------------------------------------------------------
# vLLM's reorder, on stand-ins of the two objects it reads


class InputBatchStandIn:
    """The attributes of vLLM's `InputBatch` that `reorder_batch_to_split_decodes_and_prefills`
    reads, and its `swap_states`, over a `Step`'s rows."""

    def __init__(self, step: Step) -> None:
        self.req_ids = [f"req-{i}" for i in range(step.n)]
        self.num_computed_tokens_cpu = step.num_computed.copy()
        self.num_prompt_tokens = step.num_prompt.copy()
        self.order = np.arange(step.n)

    def swap_states(self, i: int, j: int) -> None:
        for values in (self.req_ids, self.num_computed_tokens_cpu, self.num_prompt_tokens, self.order):
            values[i], values[j] = values[j], values[i]


def vllm_reorder_order(step: Step, decode_threshold: int) -> np.ndarray:
    """The row order vLLM's V1 runner leaves after its reorder (row i: old row order[i])."""
    from vllm.v1.attention.backends.utils import reorder_batch_to_split_decodes_and_prefills

    stand_in = InputBatchStandIn(step)
    scheduled = {f"req-{i}": int(k) for i, k in enumerate(step.num_scheduled)}
    reorder_batch_to_split_decodes_and_prefills(
        stand_in, types.SimpleNamespace(num_scheduled_tokens=scheduled), decode_threshold=decode_threshold)
    return stand_in.order.copy()


def vllm_v2_order(step: Step, decode_query_len: int) -> np.ndarray:
    """The row order of vLLM's model runner V2 (`sort_batch_req_ids`), drafts marked on rows
    with more than one token and context (verification rows)."""
    from vllm.v1.worker.gpu.model_runner import sort_batch_req_ids

    scheduled = {f"req-{i}": int(k) for i, k in enumerate(step.num_scheduled)}
    drafts = {f"req-{i}": [0] * (int(k) - 1) for i, k in enumerate(step.num_scheduled)
              if k > 1 and step.num_computed[i] >= step.num_prompt[i]}
    ids = sort_batch_req_ids(scheduled, drafts, decode_query_len)
    return np.array([int(name.split("-")[1]) for name in ids], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# A vLLM config without the internet


def tiny_vllm_config(directory: str, *, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 64,
                     block_size: int = 16, max_num_seqs: int = 256) -> Any:
    """A `VllmConfig` for a one-layer Llama-shaped model whose `config.json` is written into
    `directory` (no weights, no tokenizer, no download), on the CPU device."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig

    LlamaConfig(hidden_size=num_heads * head_dim, intermediate_size=2 * num_heads * head_dim, num_hidden_layers=1,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                vocab_size=1024, max_position_embeddings=8192).save_pretrained(directory)
    model = ModelConfig(model=directory, tokenizer=directory, skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=8192, seed=0)
    return VllmConfig(model_config=model, device_config=DeviceConfig(device="cpu"),
                      cache_config=CacheConfig(block_size=block_size),
                      scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
                                                       max_model_len=8192, is_encoder_decoder=False))


def attention_spec(vllm_config: Any) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    model = vllm_config.model_config
    return FullAttentionSpec(block_size=vllm_config.cache_config.block_size,
                             num_kv_heads=model.get_num_kv_heads(vllm_config.parallel_config),
                             head_size=model.get_head_size(), dtype=model.dtype)
