"""GPU side of the equivalence suite: the `attnsync verify` matrix on CUDA, the stall probe on the
equivalence pairs, and the fresh-allocation leg of item 21.

Every test is marked `gpu` (tests/conftest.py skips them without CUDA). The pairs themselves
run on CUDA through the ``device`` parameter of tests/test_equivalence_pairs.py (sync debug
mode there); here the stall probe, which sees every host block, confirms the split: naive forms
stall the host behind a queued kernel, sync-free forms do not. Item 21's guarded ring and
unguarded single slot are tests/gpu/test_core_gpu.py's; the third leg, a fresh pinned buffer
per copy (vLLM's `async_tensor_h2d`), is here.

The matrix runs on a few corpus cases to stay within the GPU suite's time budget; the full
report is `attnsync verify --json --out results/` (its text table is printed here too, so it
lands in the suite's pytest log).
"""

from __future__ import annotations

import numpy as np
import pytest

from attnsync import verify
from attnsync.testing import assert_no_host_stall, host_time_under_busy_gpu

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

DEVICE_CASES = ["chunked-prefill continuations", "padded bucket", "inexact decode rows"]
KERNEL_CASES = ["all decode", "chunked-prefill continuations"]
GPU_FRAMEWORKS = ["numpy", "torch-cuda", "jax-gpu"]


@pytest.fixture
def no_flashinfer_jit(monkeypatch):
    """FlashInfer's kernels JIT-compile for minutes on a fresh host: tests/gpu/test_flashinfer_gpu.py
    checks them against the reference; the CLI's full run includes them."""

    def skip(case, fw, lowered):
        raise verify._Skip("covered by tests/gpu/test_flashinfer_gpu.py in the pytest suite")

    monkeypatch.setitem(verify.KERNELS, "flashinfer", skip)


def test_verify_device_columns_on_cuda(capsys):
    checks = ["metadata", "syncs", "stall", "h2d", "jax_recompiles"]
    report = verify.run_matrix(frameworks=GPU_FRAMEWORKS, checks=checks, cases=0, only_cases=DEVICE_CASES,
                               progress=False)
    with capsys.disabled():
        print("\n" + verify.format_text(report))
    assert not report.failed, verify.format_text(report)
    for backend in report.config["backends"]:
        for check in ("metadata", "syncs", "stall", "h2d"):
            cell = report.cell(backend, "torch-cuda", check)
            assert cell.status == verify.PASS, cell  # run, not skipped, on a CUDA host
        h2d = [c.value for c in report.cell(backend, "torch-cuda", "h2d").cases if c.status == verify.PASS]
        assert h2d and set(h2d) == {1}


def test_verify_kernels_on_cuda(capsys, no_flashinfer_jit):
    report = verify.run_matrix(frameworks=GPU_FRAMEWORKS, checks=["metadata", "kernel"], cases=0,
                               only_cases=KERNEL_CASES, progress=False)
    with capsys.disabled():
        print("\n" + verify.format_text(report))
    assert not report.failed, verify.format_text(report)
    for backend in ("common", "triton", "tree", "mamba", "turboquant"):
        assert report.cell(backend, "torch-cuda", "kernel").status == verify.PASS, backend


# --------------------------------------------------------------------------------------------
# Stall probe on the equivalence pairs: the ground truth behind the sync debug mode


def _pairs(device):
    # the pair forms of tests/test_equivalence_pairs.py (tests/ is on sys.path, as for strategies.py)
    from test_equivalence_pairs import left_pack_free, left_pack_naive

    ids = torch.tensor([0, 1, 1, 2], device=device)
    qsl = torch.tensor([0, 2, 2, 5], dtype=torch.int32, device=device)
    x = torch.tensor([[3, 1, 0, 1, 2], [2, 2, 2, 0, 0]], device=device)
    t = torch.zeros(8, dtype=torch.int32, device=device)
    pinned = torch.tensor([0, 4, 6, 9, 13], dtype=torch.int32, pin_memory=True)
    counts = qsl[1:] - qsl[:-1]
    rows = torch.arange(3, dtype=torch.int32, device=device)
    torch.cuda.synchronize()
    return {  # pair: (naive, sync-free)
        "1 scalar store": (lambda: t.__setitem__(0, 5), lambda: t[:1].fill_(5)),
        "2 histogram": (lambda: torch.bincount(ids, minlength=3),
                        lambda: torch.zeros(3, dtype=torch.int64, device=device).scatter_add_(0, ids, torch.ones_like(ids))),
        "5 left-pack": (lambda: left_pack_naive(x, 3), lambda: left_pack_free(x, 3)),
        "6 doc ids": (lambda: torch.repeat_interleave(rows, counts),
                      lambda: torch.repeat_interleave(rows, counts, output_size=5)),
        "8 maxima": (lambda: int(qsl.max().item()), lambda: 5),
        "11 list upload": (lambda: torch.tensor([0, 4, 6, 9, 13], dtype=torch.int32, device=device),
                           lambda: pinned.to(device, non_blocking=True)),
    }


@pytest.mark.parametrize("pair", ["1 scalar store", "2 histogram", "5 left-pack", "6 doc ids", "8 maxima",
                                  "11 list upload"])
def test_naive_forms_stall_and_sync_free_forms_do_not(pair):
    device = torch.device("cuda", torch.cuda.current_device())
    naive, free = _pairs(device)[pair]
    naive(), free()  # warm-up: first calls allocate or load kernels
    torch.cuda.synchronize()
    for attempt in range(3):  # host noise fails one attempt, a stall fails all
        try:
            assert_no_host_stall(free, budget_ms=2.0, sleep_ms=50.0)
            break
        except AssertionError:
            if attempt == 2:
                raise
    # The naive form must wait: up to three tries, since the sleep kernel's length is calibrated
    # from clocks that vary with other test processes on the GPU (one try fell short in run 6).
    for _ in range(3):
        elapsed, _ = host_time_under_busy_gpu(naive, sleep_ms=50.0)
        if elapsed > 25.0:
            break
    assert elapsed > 25.0, f"{pair}: the naive form returned after {elapsed:.2f} ms; it should wait for the GPU"


# --------------------------------------------------------------------------------------------
# Item 21, third leg: a fresh pinned buffer per copy is safe under the same delay


def test_fresh_pinned_buffer_per_copy_under_a_delayed_stream():
    device = torch.device("cuda", torch.cuda.current_device())
    steps, width = 200, 64
    want_np = (np.arange(steps * width, dtype=np.int64).reshape(steps, width) * 7919) % 100_003
    want = torch.from_numpy(want_np).to(device)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    end.synchronize()
    cycles = int(2_000_000 / max(start.elapsed_time(end), 1e-3))  # ~1 ms of GPU work per step
    mismatches = torch.zeros((), dtype=torch.int64, device=device)
    for step in range(steps):
        torch.cuda._sleep(cycles)
        host = torch.from_numpy(want_np[step].copy()).pin_memory()  # fresh per step (async_tensor_h2d)
        got = host.to(device, non_blocking=True)
        del host  # dropped at once: the caching host allocator keeps it until the copy's event
        mismatches += (got != want[step]).sum()
    torch.cuda.synchronize()
    assert int(mismatches.item()) == 0
