"""CPU-side sync detection for the torch adapter's device-side code.

On a GPU, a data-dependent read (`.item()`, `nonzero`, a bool mask, `repeat_interleave`
without `output_size`) blocks the host. Without a GPU we run the same code on fake tensors
(`FakeTensorMode`): they carry shapes and dtypes but no data, so any op whose result depends
on data raises. A `TorchDispatchMode` spy additionally records the aten ops known to sync
(reference jax-dlpack-flashinfer-peers.md E3). Both harnesses are shown to catch bad code.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnsync

torch = pytest.importorskip("torch")
ast = pytest.importorskip("attnsync.adapters.torch")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SYNCING_OPS = {
    "aten._local_scalar_dense.default",  # .item(), int(t), bool(t), .tolist()
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.bincount.default",
    "aten.repeat_interleave.Tensor",
}


class SyncSpy(TorchDispatchMode):
    """Records every dispatched aten op whose output depends on data on the host."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNCING_OPS and not (name == "aten.repeat_interleave.Tensor" and (kwargs or {}).get("output_size")):
            self.seen.append(name)
        if name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.seen.append(name + " (bool mask)")
        return func(*args, **(kwargs or {}))


def run_fake(fn, **tensors):
    """Run `fn(**tensors)` on fake copies of `tensors`; data-dependent ops raise."""
    with FakeTensorMode() as mode:
        fakes = {k: mode.from_tensor(v) for k, v in tensors.items()}
        return fn(**fakes)


def slot_inputs(md, seq_lens: np.ndarray) -> dict[str, torch.Tensor]:
    rows, back = ast.token_rows_and_back(md.query_start_loc, md.num_actual_tokens)
    return dict(
        seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
        block_table=torch.from_numpy(np.array(md.block_table)),
        rows=torch.from_numpy(rows),
        back=torch.from_numpy(back),
    )


BATCH = dict(
    query_lens=[1, 2, 3, 1],
    seq_lens=[20, 35, 3, 16],
    block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0], [3, 8, 0]],
    block_size=16,
    seq_lens_exact=[False, False, True, False],
    padded_num_reqs=5,
    padded_num_tokens=9,
)
TRUE_LENS = np.array([18, 34, 3, 16, 0])


def test_device_slot_mapping_passes_on_fake_tensors():
    md = attnsync.build(attnsync.Batch(**BATCH))
    inputs = slot_inputs(md, TRUE_LENS)
    out = run_fake(lambda **t: ast.slots_from_device_lengths(**t, block_size=md.block_size), **inputs)
    assert tuple(out.shape) == (md.num_actual_tokens,) and out.dtype == torch.int64
    # and on real tensors it computes the slots (rows 0, 1, 3 from the true lengths)
    real = ast.slots_from_device_lengths(**inputs, block_size=md.block_size)
    assert real.tolist() == [145, 112, 113, 176, 177, 178, 63, -1, -1]


def test_device_slot_mapping_dispatches_no_syncing_op():
    md = attnsync.build(attnsync.Batch(**BATCH))
    inputs = slot_inputs(md, TRUE_LENS)
    with SyncSpy() as spy:
        ast.slots_from_device_lengths(**inputs, block_size=md.block_size)
    assert spy.seen == []


def test_whole_cpu_lowering_with_device_seq_lens_dispatches_no_syncing_op(pageable_copy_detector):
    """No syncing op, and (the plugin's detector, which counts the CPU as a device on a host
    without CUDA) no non_blocking copy from pageable memory."""
    md = attnsync.build(attnsync.Batch(**BATCH))
    lens = torch.from_numpy(TRUE_LENS.astype(np.int32))
    with SyncSpy() as spy:
        out = ast.lower(md, "cpu", seq_lens=lens)
    assert spy.seen == []
    assert pageable_copy_detector.calls == []
    assert out.slot_mapping.tolist() == [145, 112, 113, 176, 177, 178, 63, -1, -1]


@pytest.mark.parametrize("backend", ["common", "flashinfer", "flex", "tree", "turboquant"])
def test_every_cpu_lowering_makes_no_pageable_non_blocking_copy(pageable_copy_detector, backend):
    options = {"flex": {"num_cache_pages": 12}, "tree": {"speculative_token_tree": "[(0,)]"}}.get(backend, {})
    batch = attnsync.Batch(query_lens=[1, 2, 3], seq_lens=[20, 35, 3], block_table=[[4, 9, 0], [2, 5, 7], [11, 0, 0]],
                           block_size=16, seq_lens_exact=[False, True, True] if backend == "common" else True)
    md = attnsync.build(batch, backend=backend, **options)
    lens = torch.tensor([18, 35, 3], dtype=torch.int32) if backend == "common" else None
    with SyncSpy() as spy:
        out = ast.lower(md, "cpu", seq_lens=lens)
    assert spy.seen == [] and pageable_copy_detector.calls == []
    assert out.query_start_loc.tolist() == [0, 1, 3, 6]


def test_the_detector_used_above_catches_a_pageable_non_blocking_copy(pageable_copy_detector):
    if torch.cuda.is_available():
        pytest.skip("the CPU stands in for a device only on a host without CUDA")
    torch.from_numpy(TRUE_LENS.astype(np.int32)).to("cpu", non_blocking=True)
    (call,) = pageable_copy_detector.clear()
    assert call.call == "Tensor.to(int32[5] -> cpu, non_blocking=True)" and "not pinned" in call.reason


def _item(seq_lens, **_):
    return seq_lens.max().item()


def _int_of_max(seq_lens, **_):
    return torch.zeros(int(seq_lens.max()))


def _nonzero(seq_lens, **_):
    return seq_lens.nonzero()


def _bool_mask(seq_lens, back, **_):
    return back[back > 0]


def _repeat_without_output_size(seq_lens, **_):
    return torch.repeat_interleave(torch.arange(seq_lens.shape[0]), seq_lens)


def _tolist(seq_lens, **_):
    return seq_lens.tolist()


@pytest.mark.parametrize("bad", [_item, _int_of_max, _nonzero, _bool_mask, _repeat_without_output_size, _tolist])
def test_harness_catches_data_dependent_reads(bad):
    md = attnsync.build(attnsync.Batch(**BATCH))
    inputs = slot_inputs(md, TRUE_LENS)
    with pytest.raises(Exception) as info:
        run_fake(bad, **inputs)
    assert type(info.value).__name__ in ("DataDependentOutputException", "DynamicOutputShapeException"), info.value
    if bad is _tolist:
        return  # on real CPU tensors tolist reads memory without dispatching: fake tensors only
    with SyncSpy() as spy:
        bad(**inputs)
    assert spy.seen, f"the spy missed {bad.__name__}"


def test_repeat_interleave_with_output_size_passes():
    md = attnsync.build(attnsync.Batch(**BATCH))
    inputs = slot_inputs(md, TRUE_LENS)

    def good(seq_lens, **_):
        return torch.repeat_interleave(torch.arange(seq_lens.shape[0]), seq_lens, output_size=71)

    assert tuple(run_fake(good, **inputs).shape) == (71,)
    with SyncSpy() as spy:
        good(**inputs)
    assert spy.seen == []
