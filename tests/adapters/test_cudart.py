"""The direct CUDA runtime calls (attnsync.adapters._cudart), against a fake runtime on the CPU.

The real calls run in the GPU suite (tests/gpu/test_core_gpu.py runs the delayed-stream
checks through both the direct calls and torch's).
"""

from __future__ import annotations

import types

import pytest

from attnsync.adapters import _cudart


def fake_library(*, memcpy=0, record=0, query=0):
    calls = []
    cleared = []

    def returning(name, status):
        def call(*args):
            calls.append((name, args))
            return status
        return call

    def get_last_error():
        cleared.append(True)
        return 0

    lib = types.SimpleNamespace(
        cudaMemcpyAsync=returning("memcpy", memcpy),
        cudaEventRecord=returning("record", record),
        cudaEventQuery=returning("query", query),
        cudaGetLastError=get_last_error,
        cudaGetErrorString=lambda status: b"an error for the test",
    )
    return _cudart.Runtime(lib), calls, cleared


def test_calls_pass_their_arguments_in_the_runtime_order():
    runtime, calls, _ = fake_library()
    runtime.copy_to_device(0xD0, 0x40, 512, 0x57)
    runtime.record(0xE0, 0x57)
    assert calls == [("memcpy", (0xD0, 0x40, 512, 1, 0x57)), ("record", (0xE0, 0x57))]


@pytest.mark.parametrize(("status", "done"), [(0, True), (600, False)])
def test_event_query_maps_success_and_not_ready(status, done):
    runtime, _, cleared = fake_library(query=status)
    assert runtime.is_done(0xE0) is done
    assert not cleared


@pytest.mark.parametrize("call", ["copy", "record", "query"])
def test_a_failed_call_clears_the_runtime_error_and_names_itself(call):
    runtime, _, cleared = fake_library(memcpy=700, record=400, query=700)
    name = {"copy": "cudaMemcpyAsync", "record": "cudaEventRecord", "query": "cudaEventQuery"}[call]
    with pytest.raises(RuntimeError, match=rf"{name} failed with CUDA error \d+ \(an error for the test\)"):
        if call == "copy":
            runtime.copy_to_device(1, 2, 3, 4)
        elif call == "record":
            runtime.record(1, 2)
        else:
            runtime.is_done(1)
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
