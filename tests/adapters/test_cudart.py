"""The direct CUDA runtime calls (attnsync.adapters._cudart), against a fake runtime on the CPU.

The real call runs in the GPU suite (tests/gpu/test_core_gpu.py runs the delayed-stream
checks through both the direct calls and torch's).
"""

from __future__ import annotations

import types

import pytest

from attnsync.adapters import _cudart


def fake_library(*, memcpy=0):
    calls = []
    cleared = []

    def copy(*args):
        calls.append(args)
        return memcpy

    def get_last_error():
        cleared.append(True)
        return 0

    lib = types.SimpleNamespace(
        cudaMemcpyAsync=copy,
        cudaGetLastError=get_last_error,
        cudaGetErrorString=lambda status: b"an error for the test",
    )
    return _cudart.Runtime(lib), calls, cleared


def test_the_copy_passes_its_arguments_in_the_runtime_order():
    runtime, calls, cleared = fake_library()
    runtime.copy_to_device(0xD0, 0x40, 512, 0x57)
    assert calls == [(0xD0, 0x40, 512, 1, 0x57)]  # dst, src, bytes, cudaMemcpyHostToDevice, stream
    assert not cleared


def test_a_failed_copy_clears_the_runtime_error_and_names_itself():
    runtime, _, cleared = fake_library(memcpy=700)
    with pytest.raises(RuntimeError, match=r"cudaMemcpyAsync failed with CUDA error 700 \(an error for the test\)"):
        runtime.copy_to_device(1, 2, 3, 4)
    assert cleared == [True]  # torch's next launch check must not see our error


def test_loaded_library_lookup_finds_a_mapped_library_and_nothing_else():
    assert _cudart._loaded_library_path("libc.so") is not None  # this process has libc mapped
    assert _cudart._loaded_library_path("libattnsync-no-such-library.so") is None


def test_cpu_stagers_make_no_direct_calls():
    torch = pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    assert ast.Stager("cpu")._direct is None
    if not torch.cuda.is_available():  # a CPU build of torch has no runtime to call
        assert _cudart.runtime() is None or "libcudart" in str(_cudart._loaded_library_path("libcudart.so"))
