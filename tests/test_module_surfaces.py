"""Every module a user imports has a pinned `__all__`: each public name resolves, and the list
changes only by a decision recorded here."""

from __future__ import annotations

import importlib

import pytest

SURFACES = {
    "attnsync.adapters.torch": [
        "TORCH_DTYPES", "PinnedTables", "StaleLoweringError", "Stager", "default_stager", "device_slot_mapping",
        "lower", "lower_replicated", "slots_from_device_lengths", "token_rows_and_back", "views_of", "with_fields",
        # the lowering classes, importable for isinstance and annotations (tests/test_typing.py)
        "TorchCommonMetadata", "TorchFlashInferMetadata", "TorchFlexMetadata", "TorchLowering",
        "TorchMambaMetadata", "TorchTreeMetadata", "TorchTritonMetadata", "TorchTurboQuantMetadata",
    ],
    "attnsync.integrations": [],
    "attnsync.integrations.flashinfer": [
        "DEFAULT_WORKSPACE_BYTES", "make_decode_cuda_graph_wrapper", "plan", "run", "workspace_buffer",
    ],
    "attnsync.integrations.flex_torch": [
        "CapturedBlockLists", "block_mask", "doc_ids_device", "doc_ids_static_device", "flex_paged_attention",
        "kv_blocks_device", "left_pack_device", "lower", "paged_mask_mod", "physical_to_logical_device",
    ],
    "attnsync.integrations.graphs": [
        "FlashInferDecodeGraph", "GraphLadder", "OverlappedSteps", "PersistentLadder", "PersistentLowering",
        "TritonGraph", "plan_padded_decode",
    ],
    "attnsync.integrations.vllm": [
        "VLLM_COMMON_FIELDS", "batch_from_vllm", "batch_from_vllm_state", "to_vllm_common", "uses_async_spec_decode",
        "vllm_common_fields", "vllm_regions", "vllm_reorder", "vllm_split", "vllm_split_with_extends",
    ],
}


@pytest.mark.parametrize("module_name", sorted(SURFACES))
def test_all_is_pinned_and_resolves(module_name):
    pytest.importorskip("torch")
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(SURFACES[module_name])
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_both_adapters_offer_the_same_verbs():
    """An engine switching frameworks finds the same verbs: lower and lower_replicated."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    torch_adapter = importlib.import_module("attnsync.adapters.torch")
    jax_adapter = importlib.import_module("attnsync.adapters.jax")
    for verb in ("lower", "lower_replicated"):
        assert verb in torch_adapter.__all__ and verb in jax_adapter.__all__, verb
