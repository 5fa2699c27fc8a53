"""An attention backend for vLLM 0.33 whose metadata builder is attnsync (needs vLLM installed).

vLLM's Triton attention backend with one change: its metadata builder reads the step's host
fields and the runner's host block table, builds the metadata with `attnsync.build` on the
host and lowers it with one staged copy; vLLM's Triton kernels then run on attnsync's tensors,
in vLLM's own `TritonAttentionMetadata`. Registered through vLLM's own mechanisms, nothing
patched:

    # a vllm.general_plugins entry point runs this in every vLLM process
    from attnsync.integrations import vllm_backend
    vllm_backend.register()          # AttentionBackendEnum.CUSTOM -> AttnsyncTritonBackend
    # then: vllm serve MODEL --attention-backend CUSTOM

The host block table: vLLM hands builders only the device one. `attach_host_block_tables`
gives each attnsync builder of a (V1) model runner its group's host table; a builder without
one builds with vLLM's own builder, unchanged. docs/vllm.md has the whole recipe.

Importing this module imports vLLM (and torch); `import attnsync` never does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

try:
    from vllm.logger import init_logger
    from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.backends.triton_attn import (
        TritonAttentionBackend,
        TritonAttentionMetadata,
        TritonAttentionMetadataBuilder,
    )
except ImportError as error:  # a clear message instead of a deep vLLM import error
    raise ImportError(
        f"attnsync.integrations.vllm_backend needs vLLM 0.33 (import failed: {error}). Fix: pip install "
        f"vllm==0.33.0, or use attnsync.integrations.vllm, which works without vLLM."
    ) from error

import numpy as np

import attnsync
from attnsync.adapters import torch as ast

from .vllm import batch_from_vllm, to_vllm_common, uses_async_spec_decode

__all__ = [
    "BACKEND_PATH",
    "AttnsyncTritonBackend",
    "AttnsyncTritonMetadataBuilder",
    "attach_host_block_tables",
    "register",
]

BACKEND_PATH = f"{__name__}.AttnsyncTritonBackend"
logger = init_logger(__name__)


class AttnsyncTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    """vLLM's Triton metadata builder with the metadata built by attnsync on the host.

    `build` reads `common_attn_metadata`'s host fields (`batch_from_vllm`) and
    `host_block_table()`, builds attnsync's common metadata, lowers it to `self.device` in one
    staged copy (under async speculative decoding with vLLM's exact device `seq_lens`, the slots
    then recomputed on the device), and hands the lowering to vLLM's own Triton builder as a
    `CommonAttentionMetadata` (`to_vllm_common`). Nothing reads a device value.

    Attributes:
        host_block_table: `() -> [>= num_reqs, W]` host array, the kv-cache group's block table
            in batch order (vLLM's V1 runner: `input_batch.block_table[group].get_numpy_array()`),
            or None: then `build` is vLLM's own.
    """

    # Each step's lowering has its own (reused) memory, not fixed addresses: no full CUDA graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    supports_draft_decode_metadata_update = False

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.supports_draft_decode_metadata_update = False  # (the parent sets it per instance)
        self.host_block_table: Callable[[], np.ndarray] | None = None
        self.async_spec_decode = uses_async_spec_decode(vllm_config)
        self._warned = False

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TritonAttentionMetadata:
        cam = common_attn_metadata
        if self.host_block_table is None:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "attnsync builder %s has no host block table; building with vLLM's Triton builder. "
                    "Call attnsync.integrations.vllm_backend.attach_host_block_tables(model_runner).",
                    self.layer_names[:1],
                )
            return super().build(common_prefix_len, cam, fast_build)
        batch = batch_from_vllm(cam, block_size=self.block_size, block_table_cpu=self.host_block_table(),
                                async_spec_decode=self.async_spec_decode)
        md = attnsync.build(batch, "common")
        # Inexact host lengths (async speculative decoding): vLLM's device seq_lens are exact.
        lowered = ast.lower(md, self.device, seq_lens=None if md.all_exact else cam.seq_lens)
        common = to_vllm_common(lowered, positions=cam.positions).replace(
            mm_req_doc_ranges=cam.mm_req_doc_ranges, rswa_prefix_lens=cam.rswa_prefix_lens)
        # vLLM's builder keeps these tensors, so attnsync reuses their memory only once the
        # step's metadata is dropped (attnsync.adapters.torch.lower).
        return super().build(common_prefix_len, common, fast_build)


class AttnsyncTritonBackend(TritonAttentionBackend):
    """vLLM's Triton attention backend with `AttnsyncTritonMetadataBuilder` (causal decoder
    layers only; registered as `AttentionBackendEnum.CUSTOM` by `register`)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM maps the name back to its enum member

    @staticmethod
    def get_builder_cls() -> type[AttnsyncTritonMetadataBuilder]:
        return AttnsyncTritonMetadataBuilder

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False  # the builder passes vLLM's ranges on, but attnsync has not checked them

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        # attnsync plans from the host query lengths, which adaptive verification leaves stale.
        return False


def register(backend: Any = None) -> None:
    """Register `AttnsyncTritonBackend` with vLLM (`register_backend`), as `backend` (an
    `AttentionBackendEnum` member or a new name; default `AttentionBackendEnum.CUSTOM`).

    Safe to call more than once (vLLM loads general plugins in every process). Use it as a
    `vllm.general_plugins` entry point; select the backend with `--attention-backend CUSTOM`.
    """
    if backend is None:
        backend = AttentionBackendEnum.CUSTOM
    elif isinstance(backend, str) and backend in AttentionBackendEnum.__members__:
        backend = AttentionBackendEnum[backend]
    register_backend(backend, BACKEND_PATH)


def attach_host_block_tables(model_runner: Any) -> int:
    """Give every attnsync builder of vLLM's V1 `GPUModelRunner` its group's host block table.

    Call it once the runner has made its attention groups (after `initialize_kv_cache`), for
    example from a worker subclass selected with vLLM's `--worker-cls`. Each builder then reads
    `model_runner.input_batch.block_table[group].get_numpy_array()` every step (looked up each
    time: the runner may replace its input batch). Groups whose kernels split blocks
    (`kernel_block_size`) are refused: their device table is remapped, the host one is not.

    Returns:
        The number of builders attached.
    """
    if not hasattr(getattr(model_runner, "input_batch", None), "block_table"):
        raise attnsync.SpecError(
            f"attach_host_block_tables: {type(model_runner).__name__} keeps no host block table in batch "
            f"order (vLLM's model runner V2 gathers its tables on the device). Fix: run vLLM's V1 runner "
            f"(VLLM_USE_V2_MODEL_RUNNER=0); without a host table the builder is vLLM's own."
        )
    attached = 0
    for group_id, groups in enumerate(model_runner.attn_groups):
        for group in groups:
            for builder in group.metadata_builders:
                if not isinstance(builder, AttnsyncTritonMetadataBuilder):
                    continue
                if getattr(group, "kernel_block_size", None) is not None:
                    raise attnsync.SpecError(
                        f"attach_host_block_tables: kv-cache group {group_id} uses kernel blocks of "
                        f"{group.kernel_block_size} tokens, which vLLM remaps on the device only. Fix: "
                        f"choose a block size the backend supports directly (a multiple of 16)."
                    )
                builder.host_block_table = _host_table_of(model_runner, group_id)
                attached += 1
    return attached


def _host_table_of(model_runner: Any, group_id: int) -> Callable[[], np.ndarray]:
    return lambda: model_runner.input_batch.block_table[group_id].get_numpy_array()
