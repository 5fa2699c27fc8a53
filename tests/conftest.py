"""Project-wide test setup: GPU tests skip cleanly without CUDA."""

from __future__ import annotations

import os

import pytest

# JAX must not grab 75 % of GPU memory in a process that also uses torch (GPU.md).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU, Triton kernels run through the interpreter; it is read when kernels are
# decorated, so it is set here, before any test module imports triton.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Our tests use attnsync's pytest plugin. Installed, its entry point has loaded it already
    (registering it again would fail); a checkout installed before the entry point existed
    gets it here."""
    manager = config.pluginmanager
    if not (manager.has_plugin("attnsync") or manager.has_plugin("attnsync.pytest_plugin")):
        import attnsync.pytest_plugin

        manager.register(attnsync.pytest_plugin, "attnsync.pytest_plugin")


def pytest_collection_modifyitems(config, items):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    no_interpreter = pytest.mark.skip(
        reason="runs Triton on CPU tensors, which needs TRITON_INTERPRET=1 (set only without CUDA); "
        "its GPU twin runs on this host"
    )
    for item in items:
        if "triton_cpu" in item.keywords and not interpreted:
            item.add_marker(no_interpreter)
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu-suite.sh on a GPU host)")
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cuda_device_zero(request):
    """Every GPU test starts with CUDA device 0 current.

    Tests say "cuda" for the current device, and the current device is process state that
    outlives a test: on the two-GPU host it read 1 after JAX had initialised both GPUs
    (results/2026-11-27-h100, run 5), so a later test's "cuda" meant another GPU than its
    wrappers and sleep kernels.
    """
    if "gpu" in request.keywords and _cuda_available():
        import torch

        torch.cuda.set_device(0)
    yield
