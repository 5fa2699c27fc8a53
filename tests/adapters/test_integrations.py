"""Integrations on the CPU: vLLM's CommonAttentionMetadata (a stand-in), the vLLM-style builder
and JAX server examples, JAX metadata replicated over a mesh (two simulated CPU devices), and
the captured-step classes of attnsync.integrations.graphs run eagerly (Triton through its
interpreter, FlashInfer through a stand-in CUDA-graph wrapper)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import attnsync
from attnsync import SpecError
from attnsync import BucketLadder
from attnsync.kernels.reference import paged_attention_reference, relative_error

torch = pytest.importorskip("torch")
from attnsync.adapters import torch as ast  # noqa: E402
from attnsync.integrations import vllm as av  # noqa: E402
from attnsync.integrations.vllm import batch_from_vllm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load_example(name: str):
    module_name = f"_attnsync_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# A stand-in for vLLM's CommonAttentionMetadata whose device fields cannot be read.


class DeviceOnly:
    """A GPU tensor stand-in: `.device` and `.shape` are host metadata; any other use fails."""

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape, self.device = name, shape, torch.device("meta")

    def __getattr__(self, attr: str) -> Any:
        raise AssertionError(f"{self.name}.{attr} read: a device value would be copied back")

    def __array__(self, *args, **kwargs):
        raise AssertionError(f"np.asarray({self.name}): a device value would be copied back")

    def __getitem__(self, item):
        raise AssertionError(f"{self.name}[...] read on the host")

    def __len__(self):
        raise AssertionError(f"len({self.name})")


@dataclasses.dataclass
class StandInCommonAttentionMetadata:
    """vLLM's CommonAttentionMetadata attribute names (vllm-backends.md 1.1), vLLM not needed."""

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
    logits_indices_padded: Any = None
    num_logits_indices: int | None = None
    encoder_seq_lens: Any = None
    encoder_seq_lens_cpu: Any = None
    dcp_local_seq_lens: Any = None
    dcp_local_seq_lens_cpu: Any = None
    is_prefilling: Any = None
    _seq_lens_cpu: Any = None
    _num_computed_tokens_cpu: Any = None
    _num_computed_tokens_cache: Any = None

    @property
    def seq_lens_cpu(self):
        raise AssertionError("seq_lens_cpu read: in vLLM it copies seq_lens from the GPU")

    @property
    def num_computed_tokens_cpu(self):
        raise AssertionError("num_computed_tokens_cpu read: in vLLM it copies from the GPU")


def stand_in(query_lens, seq_lens, *, pad_reqs=0, pad_tokens=0, prefilling=None, async_spec=False,
             block_table=None, max_seq_len=None) -> StandInCommonAttentionMetadata:
    """A step as vLLM's runner would describe it, padded like its CUDA-graph dispatcher."""
    q = np.asarray(query_lens, np.int32)
    s = np.asarray(seq_lens, np.int32)
    r = len(q) + pad_reqs
    qsl = np.zeros(r + 1, np.int32)
    qsl[1 : len(q) + 1] = np.cumsum(q)
    qsl[len(q) + 1 :] = qsl[len(q)]
    seq = np.zeros(r, np.int32)
    seq[: len(s)] = s
    t = int(q.sum()) + pad_tokens
    pre = None
    if prefilling is not None:
        pre = torch.zeros(r, dtype=torch.bool)
        pre[: len(q)] = torch.tensor(prefilling)
    seq_cpu = torch.from_numpy(seq)
    return StandInCommonAttentionMetadata(
        query_start_loc=DeviceOnly("query_start_loc", (r + 1,)),
        query_start_loc_cpu=torch.from_numpy(qsl),
        seq_lens=DeviceOnly("seq_lens", (r,)),
        seq_lens_cpu_upper_bound=seq_cpu,
        num_reqs=r,
        num_actual_tokens=t,
        max_query_len=int(q.max(initial=0)),
        max_seq_len=int(s.max(initial=0)) if max_seq_len is None else max_seq_len,
        block_table_tensor=DeviceOnly("block_table_tensor", (r, 8)) if block_table is None else block_table,
        slot_mapping=DeviceOnly("slot_mapping", (t,)),
        is_prefilling=pre,
        _seq_lens_cpu=None if async_spec else seq_cpu,
        _num_computed_tokens_cpu=None,
    )


def host_table(rows: int, width: int = 8, seed: int = 0) -> np.ndarray:
    """The runner's CPU block table (max_num_reqs rows), distinct page ids."""
    return np.random.default_rng(seed).permutation(4096)[: rows * width].reshape(rows, width).astype(np.int32)


def test_batch_from_vllm_reads_host_fields_only():
    table = host_table(16)
    cam = stand_in([1, 1, 5], [33, 17, 5], prefilling=[False, False, True])
    batch = batch_from_vllm(cam, block_size=16, block_table_cpu=table)
    direct = attnsync.Batch(query_lens=[1, 1, 5], seq_lens=[33, 17, 5], block_table=table[:3], block_size=16,
                            is_prefilling=[False, False, True])
    for name in ("query_lens", "seq_lens", "block_table", "seq_lens_exact", "is_prefilling"):
        np.testing.assert_array_equal(getattr(batch, name), getattr(direct, name), err_msg=name)
    assert (batch.padded_num_reqs, batch.padded_num_tokens) == (3, 7)
    for backend, options in (("common", {}), ("triton", dict(num_q_heads=4, num_kv_heads=2, head_dim=16)),
                             ("flashinfer", {})):
        got, want = attnsync.build(batch, backend, **options), attnsync.build(direct, backend, **options)
        for f in dataclasses.fields(want):
            a, b = getattr(got, f.name), getattr(want, f.name)
            assert np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b, (backend, f.name)


def test_batch_from_vllm_keeps_vllm_cuda_graph_padding():
    table = host_table(16, seed=1)
    cam = stand_in([1, 1, 5], [33, 17, 5], pad_reqs=2, pad_tokens=1)  # 5 rows, 8 tokens
    batch = batch_from_vllm(cam, block_size=16, block_table_cpu=table)
    assert batch.num_reqs == 3 and batch.num_tokens == 7
    assert (batch.padded_num_reqs, batch.padded_num_tokens) == (5, 8)
    md = attnsync.build(batch)
    np.testing.assert_array_equal(md.query_start_loc, cam.query_start_loc_cpu.numpy())
    np.testing.assert_array_equal(md.seq_lens, cam.seq_lens_cpu_upper_bound.numpy())
    assert md.slot_mapping[-1] == -1 and (md.block_table[3:] == 0).all()
    expected_slots = [table[0, 2] * 16 + 0, table[1, 1] * 16 + 0] + [table[2, 0] * 16 + i for i in range(5)]
    assert md.slot_mapping[:7].tolist() == expected_slots


def test_batch_from_vllm_marks_decode_rows_inexact_under_async_spec_decode():
    cam = stand_in([3, 3, 20], [40, 23, 20], prefilling=[False, False, True], async_spec=True)
    batch = batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(4))
    assert batch.seq_lens_exact.tolist() == [False, False, True]
    with pytest.raises(SpecError, match="needs exact sequence lengths"):
        attnsync.build(batch, backend="flashinfer")
    exact = batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(4), seq_lens_exact=True)
    assert exact.seq_lens_exact.all()


def test_batch_from_vllm_refuses_to_read_device_values():
    cam = stand_in([1, 1], [9, 17])
    with pytest.raises(TypeError, match=r"block_table_cpu: not given.*lives on meta.*synchronise.*Fix"):
        batch_from_vllm(cam, block_size=16)
    on_device = dataclasses.replace(cam, query_start_loc_cpu=torch.zeros(3, dtype=torch.int32, device="meta"))
    with pytest.raises(TypeError, match=r"query_start_loc_cpu: expected a CPU tensor.*synchronise"):
        batch_from_vllm(on_device, block_size=16, block_table_cpu=host_table(2))
    # A CPU block_table_tensor (a CPU-only run) is host data: accepted.
    cpu_table = dataclasses.replace(cam, block_table_tensor=torch.from_numpy(host_table(2)))
    assert batch_from_vllm(cpu_table, block_size=16).block_table.shape == (2, 8)
    with pytest.raises(SpecError, match="causal is False"):
        batch_from_vllm(dataclasses.replace(cam, causal=False), block_size=16, block_table_cpu=host_table(2))
    no_bound = dataclasses.replace(cam, seq_lens_cpu_upper_bound=None, _seq_lens_cpu=None)
    with pytest.raises(SpecError, match="never reads the seq_lens_cpu property"):
        batch_from_vllm(no_bound, block_size=16, block_table_cpu=host_table(2))
    bad = dataclasses.replace(cam, query_start_loc_cpu=torch.tensor([0, 2, 1], dtype=torch.int32))
    with pytest.raises(SpecError, match="non-decreasing"):
        batch_from_vllm(bad, block_size=16, block_table_cpu=host_table(2))
    with pytest.raises(SpecError, match=r"block_table_cpu: expected a \[>= 2, W\] table"):
        batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(1))
    # Older vLLM without the bound: the exact host lengths are used.
    old = dataclasses.replace(cam, seq_lens_cpu_upper_bound=None)
    assert batch_from_vllm(old, block_size=16, block_table_cpu=host_table(2)).seq_lens.tolist() == [9, 17]


def test_vllm_module_surface_is_pinned():
    assert av.__all__ == ["VLLM_COMMON_FIELDS", "batch_from_vllm", "batch_from_vllm_state", "to_vllm_common",
                          "uses_async_spec_decode", "vllm_common_fields", "vllm_regions", "vllm_reorder",
                          "vllm_split", "vllm_split_with_extends"]


def vllm_033(cam: StandInCommonAttentionMetadata):
    """The same metadata as vLLM 0.33 holds it: no `_seq_lens_cpu` attribute at all."""
    fields = {f.name: getattr(cam, f.name) for f in dataclasses.fields(cam)
              if f.name not in ("_seq_lens_cpu", "_num_computed_tokens_cpu")}
    return _Plain(**fields)


class _Plain:
    """Attributes only, like a dataclass instance of another class."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_batch_from_vllm_033_takes_async_spec_decode_from_the_caller():
    cam = vllm_033(stand_in([3, 3, 20], [40, 23, 20], prefilling=[False, False, True]))
    assert not hasattr(cam, "_seq_lens_cpu")
    assert batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(4)).all_exact  # nothing says otherwise
    batch = batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(4), async_spec_decode=True)
    assert batch.seq_lens_exact.tolist() == [False, False, True]
    config = lambda tokens, asynchronous: _Plain(  # noqa: E731
        speculative_config=None if tokens is None else _Plain(num_speculative_tokens=tokens),
        scheduler_config=_Plain(async_scheduling=asynchronous))
    assert av.uses_async_spec_decode(config(3, True))
    assert not av.uses_async_spec_decode(config(3, False)) and not av.uses_async_spec_decode(config(None, True))
    with pytest.raises(SpecError, match="per-row tensor"):
        batch_from_vllm(_Plain(**{**cam.__dict__, "causal": torch.ones(3, dtype=torch.bool)}), block_size=16,
                        block_table_cpu=host_table(4))


def test_batch_from_vllm_short_extends_as_decodes():
    # vLLM's model runner V2 sorts a one-token prompt among the decodes.
    cam = vllm_033(stand_in([1, 1, 1, 9], [40, 1, 90, 9], prefilling=[False, True, False, True]))
    kept = batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(4))
    assert kept.is_prefilling.tolist() == [False, True, False, True]
    with pytest.raises(SpecError, match="decode-first order"):
        attnsync.build(kept, "flashinfer")
    short = batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(4), short_extends_as_decodes=True)
    assert short.is_prefilling.tolist() == [False, False, False, True]
    assert attnsync.build(short, "flashinfer").num_decodes == 3
    wide = batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(4), short_extends_as_decodes=True,
                           decode_threshold=9)
    assert wide.is_prefilling.tolist() == [False, False, False, False]


def test_batch_from_vllm_state_is_the_runners_arithmetic():
    table = host_table(8, seed=4)
    batch = av.batch_from_vllm_state(num_scheduled_tokens=[1, 1, 5, 24], num_computed_tokens=[32, 16, 0, 40, 7],
                                     num_prompt_tokens=[10, 16, 5, 100, 3], block_table=table, block_size=16,
                                     num_reqs_padded=6, num_tokens_padded=40)
    assert batch.seq_lens.tolist() == [33, 17, 5, 64]
    assert batch.is_prefilling.tolist() == [False, False, True, True]
    assert (batch.padded_num_reqs, batch.padded_num_tokens) == (6, 40) and batch.all_exact
    same = batch_from_vllm(stand_in([1, 1, 5, 24], [33, 17, 5, 64], pad_reqs=2, pad_tokens=9,
                                    prefilling=[False, False, True, True]), block_size=16, block_table_cpu=table)
    for name in ("query_lens", "seq_lens", "block_table", "is_prefilling", "padded_num_reqs", "padded_num_tokens"):
        assert np.array_equal(getattr(batch, name), getattr(same, name)), name
    inexact = av.batch_from_vllm_state(num_scheduled_tokens=[4, 9], num_computed_tokens=[30, 0],
                                       num_prompt_tokens=[5, 9], block_table=table, block_size=16,
                                       async_spec_decode=True)
    assert inexact.seq_lens_exact.tolist() == [False, True]
    with pytest.raises(SpecError, match="num_computed_tokens: 1 entries for 2"):
        av.batch_from_vllm_state(num_scheduled_tokens=[4, 9], num_computed_tokens=[30], block_table=table,
                                 block_size=16)


def test_vllm_common_fields_have_vllms_names_and_dtypes():
    cam = stand_in([1, 1, 5], [33, 17, 5], pad_reqs=1, pad_tokens=2, prefilling=[False, False, True])
    table = host_table(8, seed=5)
    lowered = ast.lower(attnsync.build(batch_from_vllm(cam, block_size=16, block_table_cpu=table)), "cpu")
    fields = av.vllm_common_fields(lowered)
    assert fields["query_start_loc"].tolist() == [0, 1, 2, 7, 7] and fields["query_start_loc_cpu"].tolist() == [0, 1, 2, 7, 7]
    assert fields["seq_lens_cpu_upper_bound"].tolist() == [33, 17, 5, 0]
    assert fields["is_prefilling"].tolist() == [False, False, True, False]
    assert fields["slot_mapping"].dtype == torch.int64 and fields["slot_mapping"][-2:].tolist() == [-1, -1]
    assert fields["block_table_tensor"].shape == (4, 8) and fields["block_table_tensor"][3].sum() == 0
    assert (fields["num_reqs"], fields["num_actual_tokens"], fields["max_query_len"], fields["max_seq_len"]) == (4, 9, 5, 33)
    assert fields["causal"] is True and fields["positions"] is None
    for name, (_, dtype, _) in av.VLLM_COMMON_FIELDS.items():
        assert fields[name].dtype == dtype, name
    triton = ast.lower(attnsync.build(batch_from_vllm(cam, block_size=16, block_table_cpu=table), "triton",
                                      num_q_heads=4, num_kv_heads=2, head_dim=16), "cpu")
    from_triton = av.vllm_common_fields(triton)  # its table is `block_table`, no is_prefilling
    assert torch.equal(from_triton["block_table_tensor"], fields["block_table_tensor"])
    assert from_triton["is_prefilling"] is None
    with pytest.raises(SpecError, match="slot_mapping: vLLM expects a torch.int64"):
        av.vllm_common_fields(ast.with_fields(lowered, slot_mapping=lowered.slot_mapping.to(torch.int32)))
    with pytest.raises(SpecError, match="query_start_loc: the lowering"):
        av.vllm_common_fields(_Plain(seq_lens=lowered.seq_lens))
    common = av.to_vllm_common(lowered)  # without vLLM installed: the dict
    assert common.keys() == fields.keys() if isinstance(common, dict) else common.num_reqs == 4


def test_vllm_split_follows_vllms_positional_convention():
    # Decode, decode, short extend (prefilling, 1 token), long extend, prefill; one padded row.
    cam = stand_in([1, 1, 1, 6, 9], [40, 20, 12, 30, 9], pad_reqs=1, pad_tokens=3,
                   prefilling=[False, False, True, True, True])
    md = attnsync.build(batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(8)))
    assert (md.num_decodes, md.num_extends, md.num_prefills) == (2, 2, 1)  # attnsync's own counts: real rows
    # vLLM: the split is the first row of more tokens; padding counts with the prefills.
    assert av.vllm_split(md) == (3, 3, 3, 18)
    assert av.vllm_split(md, treat_short_extends_as_decodes=False) == (2, 4, 2, 19)
    assert av.vllm_split_with_extends(md) == (3, 1, 2, 3, 6, 12)
    assert av.vllm_split(md, decode_threshold=9) == (6, 0, 21, 0)
    assert av.vllm_split(md, decode_threshold=6) == (4, 2, 9, 12)
    decodes = attnsync.build(batch_from_vllm(stand_in([1, 1], [9, 4], pad_reqs=2, pad_tokens=2), block_size=16,
                                             block_table_cpu=host_table(4)))
    assert av.vllm_split(decodes) == (4, 0, 4, 0)  # padding counts with the decodes
    assert av.vllm_split(decodes, require_uniform=True, decode_threshold=4) == (4, 0, 4, 0)
    with pytest.raises(SpecError, match="needs is_prefilling"):
        av.vllm_split(ast.lower(attnsync.build(batch_from_vllm(cam, block_size=16, block_table_cpu=host_table(8)),
                                               "triton", num_q_heads=2, num_kv_heads=2, head_dim=8), "cpu"),
                      treat_short_extends_as_decodes=False)


def test_vllm_reorder_moves_only_rows_outside_their_region():
    # Rows: prefill, decode, decode. vLLM swaps the misplaced prefill with the last decode.
    batch = attnsync.Batch(query_lens=[9, 1, 1], seq_lens=[9, 30, 20], block_table=host_table(3), block_size=16)
    perm, reordered = av.vllm_reorder(batch)
    assert perm.tolist() == [2, 1, 0] and reordered.query_lens.tolist() == [1, 1, 9]
    assert attnsync.reorder(batch)[0].tolist() == [1, 2, 0]  # attnsync sorts stably instead
    # A one-token prompt without context: a prefill in vLLM, a short extend in attnsync.
    fresh = attnsync.Batch(query_lens=[1, 1, 4], seq_lens=[1, 30, 40], block_table=host_table(3), block_size=16,
                           is_prefilling=[True, False, True])
    assert av.vllm_regions(fresh).tolist() == [3, 0, 2]
    assert fresh.regions().tolist() == [1, 0, 2]
    assert av.vllm_reorder(fresh)[0].tolist() == [1, 2, 0]
    with pytest.raises(TypeError, match="expected an attnsync.Batch"):
        av.vllm_reorder([1, 2])


# ---------------------------------------------------------------------------------------------
# The vLLM-style builder example.


def test_vllm_style_builder_returns_attnsync_metadata_for_a_backend():
    example = load_example("vllm_style_builder")
    table = host_table(16, seed=2)
    shape = dict(num_q_heads=4, num_kv_heads=2, head_dim=16)
    builder = example.AttnsyncMetadataBuilder(backend="triton", block_size=16, device="cpu",
                                              host_block_table=lambda: table, **shape)
    cam = stand_in([1, 1, 5], [33, 17, 5], pad_reqs=1, prefilling=[False, False, True])
    tmd = builder.build(0, cam)
    md = attnsync.build(batch_from_vllm(cam, block_size=16, block_table_cpu=table), "triton", **shape)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        np.testing.assert_array_equal(getattr(tmd, name).numpy(), getattr(md, name), err_msg=name)
    assert tmd.num_reqs == 4 and tmd.max_seq_len == 33 and tmd.query_start_loc_cpu.device.type == "cpu"
    assert builder.reorder_batch_threshold == 1
    with pytest.raises(SpecError, match="cascade"):
        builder.build(16, cam)
    fi = example.AttnsyncMetadataBuilder(backend="flashinfer", block_size=16, device="cpu",
                                         host_block_table=lambda: table)
    fmd = fi.build(0, cam)
    assert fmd.paged_kv_indptr_cpu.tolist() == [0, 3, 5, 6, 6] and fmd.num_decodes == 2
    with pytest.raises(SpecError, match="unknown backend"):
        example.AttnsyncMetadataBuilder(backend="nope", block_size=16, device="cpu", host_block_table=lambda: table)


def test_vllm_style_builder_with_a_ladder_lowers_into_fixed_buffers():
    example = load_example("vllm_style_builder")
    table = host_table(16, seed=3)
    ladder = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=128, block_size=16)
    builder = example.AttnsyncMetadataBuilder(backend="common", block_size=16, device="cpu",
                                              host_block_table=lambda: table, ladder=ladder)
    pointers = set()
    for step in range(4):
        cam = stand_in([1] * 5, np.array([33, 17, 5, 60, 9]) + step)
        tmd = builder.build_for_cudagraph_capture(cam) if step == 0 else builder.build(0, cam)
        pointers.add(tmd.block_table_tensor.data_ptr())
        assert (tmd.num_reqs, tmd.num_actual_tokens, tmd.max_query_len, tmd.max_seq_len) == (8, 8, 1, 64)
        assert tmd.seq_lens[:5].tolist() == (np.array([33, 17, 5, 60, 9]) + step).tolist()
    assert len(pointers) == 1
    padded_by_vllm = stand_in([1] * 5, [9] * 5, pad_reqs=11, pad_tokens=11)  # 16 rows: over the bucket
    with pytest.raises(SpecError, match="vLLM padded this step to 16 rows"):
        builder.build(0, padded_by_vllm)
    example.main()  # the demo runs


# ---------------------------------------------------------------------------------------------
# The JAX decode server example.


def test_jax_decode_server_serves_without_recompiles_and_matches_a_dense_model():
    pytest.importorskip("jax")
    example = load_example("jax_decode_server")
    cfg = example.ServerConfig(steps=60, layers=2, seed=5, max_num_reqs=6, max_num_tokens=32)
    start = time.perf_counter()
    stats = example.run_server(cfg, check=True)
    assert time.perf_counter() - start < 30
    assert stats["recompiles"] == 0
    assert stats["finished"] >= 10 and stats["mismatched"] == []
    assert stats["tokens"] > 0 and stats["tokens_per_s"] > 0
    # one step compile per bucket, plus the metadata split of each bucket (and a few one-offs)
    assert stats["compiles"] <= 2 * stats["buckets"] + 4
    for rid, tokens in stats["outputs"].items():
        assert all(0 <= t < cfg.vocab for t in tokens), rid


# ---------------------------------------------------------------------------------------------
# JAX metadata replicated over a mesh of two (simulated) CPU devices.

SHARDING_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import attnsync
    from attnsync import BucketLadder
    from attnsync.adapters import jax as asj

    devices = jax.devices()
    assert len(devices) == 2, devices
    mesh = Mesh(np.array(devices), ("tp",))
    replicated = NamedSharding(mesh, P())
    ladder = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=16)
    traces = []

    @jax.jit
    def consume(m):
        traces.append(1)
        return m.slot_mapping.sum() + m.seq_lens.sum() * m.max_seq_len + m.num_scheduled_reqs

    rng = np.random.default_rng(0)
    with jax.transfer_guard("disallow"):
        for step in range(12):
            n = 3 + step % 2
            batch = attnsync.Batch(query_lens=[1] * n, seq_lens=rng.integers(33, 65, n),
                                   block_table=rng.integers(0, 100, (n, 4)), block_size=16)
            bucket = ladder.bucket_for(batch)
            md = attnsync.build(ladder.pad(batch, bucket))
            jmd = asj.lower(md, sharding=replicated, bucket=bucket)
            for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping", "num_decodes"):
                leaf = getattr(jmd, name)
                assert leaf.sharding.is_fully_replicated and leaf.committed, name
                assert {s.device for s in leaf.addressable_shards} == set(devices), name
                want = getattr(md, name)
                for shard in leaf.addressable_shards:
                    np.testing.assert_array_equal(np.asarray(shard.data), want, err_msg=name)
            value = consume(jmd)
            assert bucket.max_seq_len == 64
            assert int(value) == int(md.slot_mapping.sum()) + int(md.seq_lens.sum()) * 64 + n
            plain = asj.lower(md, sharding=replicated)
            assert plain.max_seq_len == md.max_seq_len and plain.slot_mapping.sharding.is_fully_replicated
    assert len(traces) == 1, traces
    for bad, message in ((NamedSharding(mesh, P("tp")), "metadata is replicated"),):
        try:
            asj.lower(md, sharding=bad)
        except attnsync.SpecError as exc:
            assert message in str(exc), exc
        else:
            raise AssertionError("a sharded layout was accepted")
    try:
        asj.lower(md, devices[0], sharding=replicated)
    except attnsync.SpecError as exc:
        assert "not both" in str(exc)
    else:
        raise AssertionError("device and sharding together were accepted")
    print("sharding ok")
    """
)


def test_jax_metadata_replicated_over_two_cpu_devices():
    pytest.importorskip("jax")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharding ok" in result.stdout


def test_torch_lowering_to_several_devices():
    md = attnsync.build(attnsync.Batch(query_lens=[1, 3], seq_lens=[9, 3], block_table=[[2], [5]], block_size=16))
    (only,) = ast.lower_replicated(md, ["cpu"])
    np.testing.assert_array_equal(only.slot_mapping.numpy(), md.slot_mapping)
    with pytest.raises(SpecError, match="distinct devices"):
        ast.lower_replicated(md, ["cpu", "cpu"])
    with pytest.raises(SpecError, match="one stager per device"):
        ast.lower_replicated(md, ["cpu"], stagers=[])
    with pytest.raises(SpecError, match="at least one device"):
        ast.lower_replicated(md, [])


# ---------------------------------------------------------------------------------------------
# Captured-step classes, run eagerly on the CPU (capture needs CUDA: tests/gpu/test_graphs_gpu.py).

HQ, HKV, DIM, PAGE = 4, 2, 16, 16


def caches(layers: int, pages: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (pages, PAGE, HKV, DIM)
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(layers)]


def reference_out(md, q, kv, scale):
    k, v = kv
    return paged_attention_reference(
        q.numpy(), k.numpy(), v.numpy(), query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,
        block_table=md.block_table, scale=scale,
    )


def steps_of(rng, n, query_lens=None, max_context=50):
    """Batches of n rows sharing one page table, contexts changing every step."""
    table = rng.permutation(40)[: n * 4].reshape(n, 4)
    q = np.ones(n, np.int64) if query_lens is None else np.asarray(query_lens)
    while True:
        seq = q + rng.integers(0, max_context, n)
        yield attnsync.Batch(query_lens=q, seq_lens=seq, block_table=table, block_size=PAGE)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("kind", ["split-kv decode", "2d mixed"])
def test_triton_step_replays_new_metadata_in_fixed_buffers(kind):
    from attnsync.integrations.graphs import TritonGraph

    ladder = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=PAGE)
    rng = np.random.default_rng(4)
    layers = caches(2)
    q_lens = None if kind == "split-kv decode" else [1, 1, 5]
    batches = steps_of(rng, 3, q_lens)
    bucket = ladder.bucket_for(next(batches))
    graph = TritonGraph(ladder, bucket, kv_caches=layers, num_q_heads=HQ, scale=0.25, capture=False)
    assert graph.graph is None and graph.use_split_kv == (kind == "split-kv decode")
    pointers = {graph.last.query_start_loc.data_ptr(), graph.last.block_table_tensor.data_ptr()}
    seen = set()
    for step in range(3):
        batch = next(batches)
        q = torch.randn(batch.num_tokens, HQ, DIM)
        out = graph.step(batch, q).clone()
        assert {graph.last.query_start_loc.data_ptr(), graph.last.block_table_tensor.data_ptr()} == pointers
        assert graph.last.max_seq_len == bucket.max_seq_len and graph.last.num_reqs == bucket.num_reqs
        md = attnsync.build(batch)
        seen.add(tuple(md.seq_lens.tolist()))
        eager = graph.launch(torch.zeros_like(graph.out))  # the same kernels, launched again
        assert torch.equal(out, eager)
        for layer, kv in enumerate(layers):
            ref = reference_out(md, q, kv, 0.25)
            assert relative_error(out[layer, : batch.num_tokens].numpy(), ref) < 1e-5, (step, layer)
    assert len(seen) == 3
    assert graph.lowering.stats.copies == 4  # the capture batch, then one per step


@pytest.mark.triton_cpu
def test_triton_step_refuses_a_batch_beyond_its_bucket_before_writing():
    from attnsync.integrations.graphs import TritonGraph

    ladder = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=PAGE)
    rng = np.random.default_rng(5)
    batches = steps_of(rng, 2)
    first = next(batches)
    graph = TritonGraph(ladder, ladder.bucket_for(first), kv_caches=caches(1), num_q_heads=HQ, scale=0.25,
                        capture=False)
    graph.step(first, torch.randn(2, HQ, DIM))
    copies = graph.lowering.stats.copies
    before = {n: getattr(graph.last, n).clone() for n in ("query_start_loc", "seq_lens", "block_table_tensor")}
    too_big = next(steps_of(rng, 3))
    with pytest.raises(SpecError, match=r"does not fit Bucket\(num_reqs=2.*3 requests \(bucket rows: 2\)"):
        graph.step(too_big, torch.randn(3, HQ, DIM))
    assert graph.lowering.stats.copies == copies
    for name, value in before.items():
        assert torch.equal(getattr(graph.last, name), value), name
    with pytest.raises(SpecError, match="use_split_kv"):
        mixed = ladder.bucket_for(attnsync.Batch(query_lens=[1, 3], seq_lens=[5, 3], block_table=[[1], [2]],
                                                 block_size=PAGE))
        TritonGraph(ladder, mixed, kv_caches=caches(1), num_q_heads=HQ, scale=0.25, use_split_kv=True,
                    capture=False)
    with pytest.raises(SpecError, match="capture: CUDA graphs need a CUDA device"):
        TritonGraph(ladder, graph.bucket, kv_caches=caches(1), num_q_heads=HQ, scale=0.25, capture=True)


class StandInGraphDecodeWrapper:
    """FlashInfer's CUDA-graph decode wrapper contract: a batch size fixed at construction,
    host int32 indptr / last-page arrays, device page ids; attention computed as FlashInfer
    defines it (a row without pages outputs zeros here)."""

    def __init__(self, batch_size: int) -> None:
        self.device = torch.device("cpu")
        self.batch_size = batch_size
        self.plans: list[tuple] = []

    def plan(self, indptr, indices, last, **kw):
        assert len(last) == self.batch_size and len(indptr) == self.batch_size + 1, "batch size is fixed"
        for t in (indptr, last):
            assert t.device.type == "cpu" and t.dtype == torch.int32
        assert indices.numel() == int(indptr[-1]) and kw["non_blocking"] is True
        self.plans.append((indptr.clone(), indices.clone(), last.clone(), kw))

    def run(self, q, kv, *, out):
        indptr, indices, last, kw = self.plans[-1]
        k, v = kv
        page, scale = kw["page_size"], kw["sm_scale"]
        group = kw["num_qo_heads"] // kw["num_kv_heads"]
        assert q.shape[0] == self.batch_size == out.shape[0]
        for b in range(self.batch_size):
            pages = indices[indptr[b] : indptr[b + 1]].tolist()
            if not pages:
                out[b] = 0
                continue
            kv_len = (len(pages) - 1) * page + int(last[b])
            keys = torch.cat([k[p] for p in pages])[:kv_len].double()
            vals = torch.cat([v[p] for p in pages])[:kv_len].double()
            for h in range(q.shape[1]):
                p = torch.softmax(scale * keys[:, h // group] @ q[b, h].double(), 0)
                out[b, h] = (p @ vals[:, h // group]).to(out.dtype)
        return out


def test_flashinfer_decode_step_plans_every_bucket_row():
    from attnsync.integrations.graphs import FlashInferDecodeGraph

    ladder = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=PAGE)
    rng = np.random.default_rng(6)
    layers = caches(2, seed=1)
    batches = steps_of(rng, 3)
    bucket = ladder.bucket_for(next(batches))
    wrapper = StandInGraphDecodeWrapper(bucket.num_reqs)
    graph = FlashInferDecodeGraph(ladder, bucket, kv_caches=layers, num_qo_heads=HQ, sm_scale=0.25,
                                  wrapper=wrapper, capture=False)
    for step in range(3):
        batch = next(batches)
        q = torch.randn(3, HQ, DIM)
        out = graph.step(batch, q)
        indptr, _, last, kw = wrapper.plans[-1]
        md = attnsync.build(batch, backend="flashinfer")
        assert indptr.tolist() == [*md.paged_kv_indptr.tolist(), md.num_pages]  # padded row: no pages
        assert last.tolist() == [*md.paged_kv_last_page_len.tolist(), 1]  # vLLM's padding fill
        assert kw["num_kv_heads"] == HKV and kw["head_dim"] == DIM and kw["page_size"] == PAGE
        for layer, kv in enumerate(layers):
            ref = reference_out(md, q, kv, 0.25)
            assert relative_error(out[layer, :3].numpy(), ref) < 1e-5, (step, layer)
    plans = len(wrapper.plans)
    with pytest.raises(SpecError, match=r"5 requests \(bucket rows: 4\)"):
        graph.step(next(steps_of(rng, 5)))
    with pytest.raises(SpecError, match=r"a query of 3 tokens \(bucket max_query_len: 1\)"):
        graph.step(next(steps_of(rng, 2, [1, 3])))
    assert len(wrapper.plans) == plans, "nothing planned after a refusal"
    with pytest.raises(SpecError, match="single-token decode bucket"):
        mixed = ladder.bucket_for(next(steps_of(rng, 2, [1, 3])))
        FlashInferDecodeGraph(ladder, mixed, kv_caches=layers, num_qo_heads=HQ, wrapper=wrapper, capture=False)


def test_graph_ladder_makes_one_step_per_bucket():
    from attnsync.integrations.graphs import GraphLadder

    ladder = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=PAGE)
    made = []

    class Recorder:
        def __init__(self, bucket):
            self.bucket = bucket
            made.append(bucket)

        def step(self, batch, q=None):
            assert ladder.fit_error(batch, self.bucket) is None
            return self.bucket

    graphs = GraphLadder(ladder, Recorder)
    for n in (1, 3, 3, 4, 7, 2, 8):
        batch = attnsync.Batch(query_lens=[1] * n, seq_lens=[40] * n, block_table=np.ones((n, 4), np.int32),
                               block_size=PAGE)
        assert graphs.step(batch) == ladder.bucket_for(batch)
    assert len(made) == len(set(made)) == 4  # buckets of 1, 4 (3, 4), 8 (7, 8) and 2 rows
