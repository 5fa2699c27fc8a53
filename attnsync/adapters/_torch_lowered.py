"""The torch lowering classes `attnsync.adapters.torch.lower` returns, importable for
`isinstance` and annotations (re-exported there).

Generated from the metadata declarations by `python tests/test_typing.py --write`; a test checks
that every class here has exactly the fields the adapter gives it, in its order.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # (annotations only: no backend is imported with the adapter)
    from ..backends.turboquant import HostRow

__all__ = ["TorchCommonMetadata", "TorchFlashInferMetadata", "TorchFlexMetadata", "TorchLowering", "TorchMambaMetadata", "TorchTreeMetadata", "TorchTritonMetadata", "TorchTurboQuantMetadata"]


class TorchLowering:
    """Base of every torch lowering: a frozen dataclass of device views, CPU tensors (`*_cpu`)
    and host scalars under vLLM's field names (`isinstance(tmd, TorchLowering)`)."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # (each lowering is a dataclass)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TorchCommonMetadata(TorchLowering):
    """torch lowering of `CommonMetadata`: device fields are views into one staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars."""

    block_table_tensor: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu_upper_bound: torch.Tensor
    num_computed_tokens_cpu: torch.Tensor
    is_prefilling: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    decode_threshold: int
    num_decodes: int
    num_decode_tokens: int
    num_extends: int
    num_extend_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    is_decode_first: bool
    all_exact: bool
    slot_mapping_exact: bool


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TorchFlashInferMetadata(TorchLowering):
    """torch lowering of `FlashInferMetadata`: device fields are views into one staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars."""

    block_table_tensor: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    paged_kv_indices: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    paged_kv_indptr_cpu: torch.Tensor
    paged_kv_last_page_len_cpu: torch.Tensor
    prefill_qo_indptr_cpu: torch.Tensor
    prefill_paged_kv_indptr_cpu: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    decode_threshold: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    max_decode_query_len: int
    max_prefill_query_len: int
    num_decode_pages: int
    num_pages: int


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TorchFlexMetadata(TorchLowering):
    """torch lowering of `FlexMetadata`: device fields are views into one staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars."""

    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    doc_ids: torch.Tensor
    decode_offset: torch.Tensor
    num_blocks_per_seq: torch.Tensor
    physical_to_logical: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu_upper_bound: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    q_block_size: int
    num_q_blocks: int
    max_kv_blocks: int
    max_pages_per_seq: int
    num_cache_pages: int
    total_cache_tokens: int
    inverse_table_on_device: bool
    block_sparse_on_device: bool
    all_exact: bool
    slot_mapping_exact: bool


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TorchMambaMetadata(TorchLowering):
    """torch lowering of `MambaMetadata`: device fields are views into one staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars."""

    seq_lens: torch.Tensor
    query_start_loc_p: torch.Tensor
    query_start_loc_d: torch.Tensor
    num_computed_tokens_p: torch.Tensor
    has_initial_states_p: torch.Tensor
    state_indices_tensor_p: torch.Tensor
    state_indices_tensor_d: torch.Tensor
    num_accepted_tokens: torch.Tensor
    block_idx_last_scheduled_token: torch.Tensor
    block_idx_first_scheduled_token_p: torch.Tensor
    block_idx_last_computed_token: torch.Tensor
    cu_chunk_seqlen_p: torch.Tensor
    seq_idx_p: torch.Tensor
    last_chunk_indices_p: torch.Tensor
    batch_ptr: torch.Tensor
    token_chunk_offset_ptr: torch.Tensor
    seq_lens_cpu_upper_bound: torch.Tensor
    query_start_loc_p_cpu: torch.Tensor
    query_start_loc_d_cpu: torch.Tensor
    num_computed_tokens_p_cpu: torch.Tensor
    has_initial_states_p_cpu: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    num_decode_rows: int
    num_short_extends: int
    num_long_extends: int
    num_fresh_prefills: int
    max_query_len: int
    max_seq_len: int
    max_decode_query_len: int
    max_prefill_query_len: int
    decode_threshold: int
    num_spec_tokens: int
    has_num_accepted_tokens: bool
    block_size: int
    chunk_size: int
    has_chunk_metadata: bool
    num_chunks: int
    prep_initial_states: bool
    num_conv_programs: int
    conv_block_m: int
    conv_capacity: int
    all_exact: bool
    variant: str
    cache_mode: str


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TorchTreeMetadata(TorchLowering):
    """torch lowering of `TreeMetadata`: device fields are views into one staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars."""

    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    tree_attn_bias: torch.Tensor
    prefill_query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu_upper_bound: torch.Tensor
    prefill_query_start_loc_cpu: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    tree_size: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    max_decode_query_len: int
    max_decode_seq_len: int
    max_prefill_query_len: int
    max_prefill_seq_len: int
    slot_mapping_exact: bool
    draft_index: int | None


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TorchTritonMetadata(TorchLowering):
    """torch lowering of `TritonMetadata`: device fields are views into one staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars."""

    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    mm_prefix_range_tensor: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu_upper_bound: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    use_split_kv: bool
    seq_threshold_3d: int
    num_segments: int
    split_kv_min_seq_len: int
    has_prefix_ranges: bool
    slot_mapping_exact: bool
    segm_output_shape: tuple[int, int, int, int]
    segm_stats_shape: tuple[int, int, int]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TorchTurboQuantMetadata(TorchLowering):
    """torch lowering of `TurboQuantMetadata`: device fields are views into one staged buffer, `*_cpu` fields are CPU tensors, ints are host scalars."""

    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    token_to_req: torch.Tensor
    prefill_query_start_loc: torch.Tensor
    spec_token_ids: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    prefill_query_start_loc_cpu: torch.Tensor
    prefill_seq_lens_cpu: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    is_prefill: bool
    num_decodes: int
    num_decode_tokens: int
    decode_max_seq_len: int
    num_prefills: int
    num_prefill_tokens: int
    prefill_max_query_len: int
    prefill_max_seq_len: int
    prefill_all_fresh: bool
    num_spec_rows: int
    num_spec_tokens: int
    spec_max_seq_len: int
    all_exact: bool
    slot_mapping_exact: bool
    host_loop_rows: tuple[HostRow, ...]


# The declared class of each metadata class (by qualified name: importing every backend here
# would cost the adapter's import what only a build of that backend needs).
DECLARED: dict[str, type[TorchLowering]] = {
    "attnsync._spec.CommonMetadata": TorchCommonMetadata,
    "attnsync.backends.flashinfer.FlashInferMetadata": TorchFlashInferMetadata,
    "attnsync.backends.flex.FlexMetadata": TorchFlexMetadata,
    "attnsync.backends.mamba.MambaMetadata": TorchMambaMetadata,
    "attnsync.backends.tree.TreeMetadata": TorchTreeMetadata,
    "attnsync.backends.triton.TritonMetadata": TorchTritonMetadata,
    "attnsync.backends.turboquant.TurboQuantMetadata": TorchTurboQuantMetadata,
}
