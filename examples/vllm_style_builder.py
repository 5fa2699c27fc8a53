"""A vLLM-shaped attention metadata builder backed by attnsync (vLLM itself is not needed).

    python examples/vllm_style_builder.py      # a demo step on the CPU (on the GPU when present)

vLLM's model runner calls `builder.build(common_prefix_len, common_attn_metadata)` once per
step and kv-cache group, with a `CommonAttentionMetadata`: device
tensors (`query_start_loc`, `seq_lens`, `block_table_tensor`, `slot_mapping`), their host
mirrors (`query_start_loc_cpu`, `seq_lens_cpu_upper_bound`) and host ints (`num_reqs`,
`num_actual_tokens`, `max_query_len`, `max_seq_len`). `AttnsyncMetadataBuilder` has that shape
and returns attnsync's metadata for the chosen backend, lowered to torch with vLLM's field
names:

1. `attnsync.integrations.vllm.batch_from_vllm` reads only the host fields. The block table lives
   on the GPU in vLLM, so the builder takes the runner's host copy of it (vLLM keeps one per
   kv-cache group: `input_batch.block_table[group].get_numpy_array()`); it never copies a
   device tensor back.
2. `attnsync.build` computes the backend's metadata on the host (numpy).
3. One pinned non_blocking copy moves every device field; with a `BucketLadder` the copy goes
   into fixed buffers per bucket (CUDA-graph replay), and the host scalars are the bucket's
   bounds.

For FlashInfer, plan the wrappers from the result with `attnsync.integrations.flashinfer.plan`
(host arrays in, no sync); for Triton, pass it to
`attnsync.kernels.triton_attention.paged_attention_from_metadata`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync
from attnsync import BucketLadder
from attnsync.adapters import torch as ast
from attnsync.integrations.graphs import PersistentLadder
from attnsync.integrations.vllm import batch_from_vllm


class AttnsyncMetadataBuilder:
    """An attention metadata builder in the shape of vLLM's, producing attnsync metadata.

    Args:
        backend: an attnsync backend name ("triton", "flashinfer", "common", ...).
        block_size: tokens per KV-cache page of the kv-cache group.
        device: where the metadata goes ("cuda", "cuda:1", "cpu").
        host_block_table: `() -> [max_num_reqs, W]` host array: the runner's CPU block table
            of this kv-cache group (rows in the batch order). Read once per step.
        ladder: optional `BucketLadder` for CUDA graphs: steps are padded to its buckets and
            lowered into fixed buffers per bucket (use vLLM's capture sizes as
            `token_sizes`, so both pad alike).
        **backend_options: options of the backend's `build` (Triton: `num_q_heads`,
            `num_kv_heads`, `head_dim`, ...).

    Attributes:
        reorder_batch_threshold: vLLM reorders its batch so rows with at most this many new
            tokens (decodes) come first, as FlashInfer's builder requires.
    """

    reorder_batch_threshold: int = 1

    def __init__(
        self,
        *,
        backend: str = "triton",
        block_size: int,
        device: Any = "cuda",
        host_block_table: Callable[[], Any],
        ladder: BucketLadder | None = None,
        **backend_options: Any,
    ) -> None:
        if backend not in attnsync.available_backends():
            raise attnsync.SpecError(
                f"backend: unknown backend {backend!r}; expected one of {list(attnsync.available_backends())}."
            )
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.host_block_table = host_block_table
        self.ladder = ladder
        self.options = backend_options
        self.persistent = PersistentLadder(ladder, device) if ladder is not None else None

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: Any,
        fast_build: bool = False,
        *,
        block_table_cpu: Any = None,
    ) -> Any:
        """The step's lowered metadata (vLLM's signature; `fast_build` changes nothing here).

        `block_table_cpu` overrides `host_block_table()` for this call.
        """
        if common_prefix_len:
            raise attnsync.SpecError(
                "common_prefix_len: cascade attention is not built by attnsync; vLLM disables it for "
                "these backends. Fix: pass 0."
            )
        table = block_table_cpu if block_table_cpu is not None else self.host_block_table()
        batch = batch_from_vllm(common_attn_metadata, block_size=self.block_size, block_table_cpu=table)
        if self.persistent is None:
            md = attnsync.build(batch, self.backend, **self.options)
            return ast.lower(md, self.device)
        ladder = self.ladder
        assert ladder is not None  # (a persistent builder is made with its ladder)
        bucket = ladder.bucket_for(batch)
        if batch.padded_num_tokens > bucket.num_tokens or batch.padded_num_reqs > bucket.num_reqs:
            raise attnsync.SpecError(
                f"ladder: vLLM padded this step to {batch.padded_num_reqs} rows and "
                f"{batch.padded_num_tokens} tokens, more than the bucket {bucket}. Fix: build the "
                f"ladder with vLLM's CUDA-graph capture sizes as token_sizes."
            )
        md = attnsync.build(ladder.pad(batch, bucket), self.backend, **self.options)
        return self.persistent.for_bucket(bucket).lower(md)

    def build_for_cudagraph_capture(self, common_attn_metadata: Any) -> Any:
        """The metadata of a capture step (vLLM calls this before capturing a graph)."""
        return self.build(0, common_attn_metadata)


@dataclass
class DemoCommonAttentionMetadata:
    """The fields of vLLM's `CommonAttentionMetadata` this demo fills (a stand-in, not vLLM's)."""

    query_start_loc: Any
    query_start_loc_cpu: Any
    seq_lens: Any
    seq_lens_cpu_upper_bound: Any
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_table_tensor: Any
    slot_mapping: Any
    causal: bool = True
    is_prefilling: Any = None


def main() -> None:
    import numpy as np
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The runner's host state: two decodes and a 5-token prompt, padded by vLLM to 4 rows / 8 tokens.
    host_table = np.zeros((8, 4), dtype=np.int32)
    host_table[:3, :3] = [[7, 3, 9], [4, 2, 0], [8, 0, 0]]
    qsl = torch.tensor([0, 1, 2, 7, 7], dtype=torch.int32)
    seq = torch.tensor([33, 17, 5, 0], dtype=torch.int32)
    cam = DemoCommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq.to(device),
        seq_lens_cpu_upper_bound=seq, num_reqs=4, num_actual_tokens=8, max_query_len=5,
        max_seq_len=33, block_table_tensor=torch.from_numpy(host_table[:4]).to(device),
        slot_mapping=torch.zeros(8, dtype=torch.int64, device=device),
        is_prefilling=torch.tensor([False, False, True, False]),
    )
    builder = AttnsyncMetadataBuilder(
        backend="triton", block_size=16, device=device, host_block_table=lambda: host_table,
        num_q_heads=16, num_kv_heads=8, head_dim=128,
    )
    tmd = builder.build(0, cam)
    print("query_start_loc", tmd.query_start_loc.tolist(), "seq_lens", tmd.seq_lens.tolist())
    print("slot_mapping   ", tmd.slot_mapping.tolist())
    print("num_reqs", tmd.num_reqs, "num_actual_tokens", tmd.num_actual_tokens,
          "max_seq_len", tmd.max_seq_len, "use_split_kv", tmd.use_split_kv)
    ladder = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=16)
    graphs = AttnsyncMetadataBuilder(
        backend="common", block_size=16, device=device, host_block_table=lambda: host_table, ladder=ladder,
    )
    first = graphs.build_for_cudagraph_capture(cam)
    again = graphs.build(0, cam)
    print("fixed addresses:", first.query_start_loc.data_ptr() == again.query_start_loc.data_ptr(),
          "bucket max_seq_len", again.max_seq_len)


if __name__ == "__main__":
    main()
