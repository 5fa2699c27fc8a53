"""The JAX lowering classes `attnsync.adapters.jax.lower` returns, importable for
`isinstance` and annotations (re-exported there).

Generated from the metadata declarations by `python tests/test_typing.py --write`; a test checks
that every class here has exactly the fields the adapter gives it, in its order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from ._jax_base import JaxLowering

if TYPE_CHECKING:  # (annotations only: no backend is imported with the adapter)
    from ..backends.turboquant import HostRow

__all__ = ["JaxBucketedCommonMetadata", "JaxBucketedFlashInferMetadata", "JaxBucketedFlexMetadata", "JaxBucketedMambaMetadata", "JaxBucketedTreeMetadata", "JaxBucketedTritonMetadata", "JaxBucketedTurboQuantMetadata", "JaxCommonMetadata", "JaxFlashInferMetadata", "JaxFlexMetadata", "JaxLowering", "JaxMambaMetadata", "JaxTreeMetadata", "JaxTritonMetadata", "JaxTurboQuantMetadata"]


class JaxCommonMetadata(JaxLowering):
    """JAX lowering of `CommonMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
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


class JaxBucketedCommonMetadata(JaxLowering):
    """Bucketed JAX lowering of `CommonMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    num_scheduled_reqs: jax.Array
    num_scheduled_tokens: jax.Array
    num_decodes: jax.Array
    num_decode_tokens: jax.Array
    num_extends: jax.Array
    num_extend_tokens: jax.Array
    num_prefills: jax.Array
    num_prefill_tokens: jax.Array
    is_decode_first: jax.Array
    all_exact: jax.Array
    slot_mapping_exact: jax.Array
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    decode_threshold: int


class JaxFlashInferMetadata(JaxLowering):
    """JAX lowering of `FlashInferMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    paged_kv_indices: jax.Array
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


class JaxBucketedFlashInferMetadata(JaxLowering):
    """Bucketed JAX lowering of `FlashInferMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    paged_kv_indices: jax.Array
    num_scheduled_reqs: jax.Array
    num_scheduled_tokens: jax.Array
    num_decodes: jax.Array
    num_decode_tokens: jax.Array
    num_prefills: jax.Array
    num_prefill_tokens: jax.Array
    max_decode_query_len: jax.Array
    max_prefill_query_len: jax.Array
    num_decode_pages: jax.Array
    num_pages: jax.Array
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    decode_threshold: int


class JaxFlexMetadata(JaxLowering):
    """JAX lowering of `FlexMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    doc_ids: jax.Array
    decode_offset: jax.Array
    num_blocks_per_seq: jax.Array
    physical_to_logical: jax.Array
    kv_num_blocks: jax.Array
    kv_indices: jax.Array
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


class JaxBucketedFlexMetadata(JaxLowering):
    """Bucketed JAX lowering of `FlexMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    doc_ids: jax.Array
    decode_offset: jax.Array
    num_blocks_per_seq: jax.Array
    physical_to_logical: jax.Array
    kv_num_blocks: jax.Array
    kv_indices: jax.Array
    num_scheduled_reqs: jax.Array
    num_scheduled_tokens: jax.Array
    all_exact: jax.Array
    slot_mapping_exact: jax.Array
    num_reqs: int
    num_actual_tokens: int
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


class JaxMambaMetadata(JaxLowering):
    """JAX lowering of `MambaMetadata`."""

    __slots__ = ()

    seq_lens: jax.Array
    query_start_loc_p: jax.Array
    query_start_loc_d: jax.Array
    num_computed_tokens_p: jax.Array
    has_initial_states_p: jax.Array
    state_indices_tensor_p: jax.Array
    state_indices_tensor_d: jax.Array
    num_accepted_tokens: jax.Array
    block_idx_last_scheduled_token: jax.Array
    block_idx_first_scheduled_token_p: jax.Array
    block_idx_last_computed_token: jax.Array
    cu_chunk_seqlen_p: jax.Array
    seq_idx_p: jax.Array
    last_chunk_indices_p: jax.Array
    batch_ptr: jax.Array
    token_chunk_offset_ptr: jax.Array
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
    variant: str
    cache_mode: str
    block_size: int
    chunk_size: int
    has_chunk_metadata: bool
    num_chunks: int
    prep_initial_states: bool
    num_conv_programs: int
    conv_block_m: int
    conv_capacity: int
    all_exact: bool


class JaxBucketedMambaMetadata(JaxLowering):
    """Bucketed JAX lowering of `MambaMetadata`."""

    __slots__ = ()

    seq_lens: jax.Array
    query_start_loc_p: jax.Array
    query_start_loc_d: jax.Array
    num_computed_tokens_p: jax.Array
    has_initial_states_p: jax.Array
    state_indices_tensor_p: jax.Array
    state_indices_tensor_d: jax.Array
    num_accepted_tokens: jax.Array
    block_idx_last_scheduled_token: jax.Array
    block_idx_first_scheduled_token_p: jax.Array
    block_idx_last_computed_token: jax.Array
    cu_chunk_seqlen_p: jax.Array
    seq_idx_p: jax.Array
    last_chunk_indices_p: jax.Array
    batch_ptr: jax.Array
    token_chunk_offset_ptr: jax.Array
    num_scheduled_reqs: jax.Array
    num_scheduled_tokens: jax.Array
    num_decodes: jax.Array
    num_decode_tokens: jax.Array
    num_prefills: jax.Array
    num_prefill_tokens: jax.Array
    num_decode_rows: jax.Array
    num_short_extends: jax.Array
    num_long_extends: jax.Array
    num_fresh_prefills: jax.Array
    max_decode_query_len: jax.Array
    max_prefill_query_len: jax.Array
    has_chunk_metadata: jax.Array
    num_chunks: jax.Array
    prep_initial_states: jax.Array
    num_conv_programs: jax.Array
    all_exact: jax.Array
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    decode_threshold: int
    num_spec_tokens: int
    has_num_accepted_tokens: bool
    variant: str
    cache_mode: str
    block_size: int
    chunk_size: int
    conv_block_m: int
    conv_capacity: int


class JaxTreeMetadata(JaxLowering):
    """JAX lowering of `TreeMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    tree_attn_bias: jax.Array
    prefill_query_start_loc: jax.Array
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    tree_size: int
    draft_index: int | None
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    max_decode_query_len: int
    max_decode_seq_len: int
    max_prefill_query_len: int
    max_prefill_seq_len: int
    slot_mapping_exact: bool


class JaxBucketedTreeMetadata(JaxLowering):
    """Bucketed JAX lowering of `TreeMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    tree_attn_bias: jax.Array
    prefill_query_start_loc: jax.Array
    num_decodes: jax.Array
    num_decode_tokens: jax.Array
    num_prefills: jax.Array
    num_prefill_tokens: jax.Array
    max_decode_query_len: jax.Array
    max_decode_seq_len: jax.Array
    max_prefill_query_len: jax.Array
    max_prefill_seq_len: jax.Array
    slot_mapping_exact: jax.Array
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    tree_size: int
    draft_index: int | None


class JaxTritonMetadata(JaxLowering):
    """JAX lowering of `TritonMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    prefix_ranges: jax.Array
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    use_split_kv: bool
    seq_threshold_3d: int
    num_segments: int
    split_kv_min_seq_len: int
    segm_output_shape: tuple[int, int, int, int]
    segm_stats_shape: tuple[int, int, int]
    has_prefix_ranges: bool
    slot_mapping_exact: bool


class JaxBucketedTritonMetadata(JaxLowering):
    """Bucketed JAX lowering of `TritonMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    prefix_ranges: jax.Array
    use_split_kv: jax.Array
    has_prefix_ranges: jax.Array
    slot_mapping_exact: jax.Array
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    seq_threshold_3d: int
    num_segments: int
    split_kv_min_seq_len: int
    segm_output_shape: tuple[int, int, int, int]
    segm_stats_shape: tuple[int, int, int]


class JaxTurboQuantMetadata(JaxLowering):
    """JAX lowering of `TurboQuantMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    token_to_req: jax.Array
    prefill_query_start_loc: jax.Array
    spec_token_ids: jax.Array
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
    host_loop_rows: tuple[HostRow, ...]
    num_spec_rows: int
    num_spec_tokens: int
    spec_max_seq_len: int
    all_exact: bool
    slot_mapping_exact: bool


class JaxBucketedTurboQuantMetadata(JaxLowering):
    """Bucketed JAX lowering of `TurboQuantMetadata`."""

    __slots__ = ()

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    token_to_req: jax.Array
    prefill_query_start_loc: jax.Array
    spec_token_ids: jax.Array
    num_scheduled_reqs: jax.Array
    num_scheduled_tokens: jax.Array
    is_prefill: jax.Array
    num_decodes: jax.Array
    num_decode_tokens: jax.Array
    decode_max_seq_len: jax.Array
    num_prefills: jax.Array
    num_prefill_tokens: jax.Array
    prefill_max_query_len: jax.Array
    prefill_max_seq_len: jax.Array
    prefill_all_fresh: jax.Array
    num_spec_rows: jax.Array
    spec_max_seq_len: jax.Array
    all_exact: jax.Array
    slot_mapping_exact: jax.Array
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    host_loop_rows: tuple[HostRow, ...]
    num_spec_tokens: int


# The declared class of each (metadata class by qualified name, bucketed).
DECLARED: dict[tuple[str, bool], type[JaxLowering]] = {
    ("attnsync._spec.CommonMetadata", False): JaxCommonMetadata,
    ("attnsync._spec.CommonMetadata", True): JaxBucketedCommonMetadata,
    ("attnsync.backends.flashinfer.FlashInferMetadata", False): JaxFlashInferMetadata,
    ("attnsync.backends.flashinfer.FlashInferMetadata", True): JaxBucketedFlashInferMetadata,
    ("attnsync.backends.flex.FlexMetadata", False): JaxFlexMetadata,
    ("attnsync.backends.flex.FlexMetadata", True): JaxBucketedFlexMetadata,
    ("attnsync.backends.mamba.MambaMetadata", False): JaxMambaMetadata,
    ("attnsync.backends.mamba.MambaMetadata", True): JaxBucketedMambaMetadata,
    ("attnsync.backends.tree.TreeMetadata", False): JaxTreeMetadata,
    ("attnsync.backends.tree.TreeMetadata", True): JaxBucketedTreeMetadata,
    ("attnsync.backends.triton.TritonMetadata", False): JaxTritonMetadata,
    ("attnsync.backends.triton.TritonMetadata", True): JaxBucketedTritonMetadata,
    ("attnsync.backends.turboquant.TurboQuantMetadata", False): JaxTurboQuantMetadata,
    ("attnsync.backends.turboquant.TurboQuantMetadata", True): JaxBucketedTurboQuantMetadata,
}
