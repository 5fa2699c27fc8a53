"""attnsync's pytest plugin: the worked example of docs/testing-kit.md run through `pytester`
(the good builder passes, each bad one fails with the message the page shows, GPU-only fixtures
skip with a reason on CPU), and each fixture shown able to fail."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnsync import pytest_plugin

pytest_plugins = ["pytester"]  # a test module may ask for it; a non-root conftest may not

# Imported before pytester's per-test snapshot of sys.modules: the snapshot drops modules a test
# imported, and importing jaxlib a second time in one process aborts it.
for _framework in ("torch", "jax"):
    try:
        importlib.import_module(_framework)
    except ImportError:
        pass

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "testing-kit.md"


def cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def plugin_args() -> list[str]:
    """Installed, the entry point loads the plugin (naming it again would register it twice);
    from a checkout installed before the entry point existed, `-p` loads it."""
    installed = any(ep.name == "attnsync" and ep.value == "attnsync.pytest_plugin"
                    for ep in importlib.metadata.entry_points(group="pytest11"))
    autoload = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    return [] if installed and autoload else ["-p", "attnsync.pytest_plugin"]


def doc_files() -> dict[str, str]:
    """The files the page marks with `<!-- testing-kit file: NAME -->` before a code block."""
    text = DOC.read_text()
    found = re.findall(r"<!-- testing-kit file: (\S+) -->\n```python\n(.*?)```", text, flags=re.S)
    return dict(found)


def run_inner(pytester, *args: str):
    return pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider", "-rfs", *args)


def test_all_is_pinned():
    assert pytest_plugin.__all__ == ["CompileCounter", "JaxTransferGuard", "PageableCopy", "PageableCopyDetector",
                                     "StallProbe", "TorchSyncGuard"]
    for name in pytest_plugin.__all__:
        assert getattr(pytest_plugin, name) is not None, name


def test_the_entry_point_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points.pytest11]\nattnsync = "attnsync.pytest_plugin"' in text


def test_importing_the_plugin_loads_no_framework():
    code = ("import sys, attnsync.pytest_plugin; "
            "print(sorted(m for m in ('torch', 'jax', 'jaxlib', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out


def test_the_worked_example_of_the_docs(pytester):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    files = doc_files()
    assert sorted(files) == ["my_builder.py", "test_my_builder.py"]
    for name, source in files.items():
        pytester.path.joinpath(name).write_text(source)
    result = run_inner(pytester)
    gpu = cuda()
    # on a GPU host the sync guard catches .item(); on CPU it and the stall probe skip
    result.assert_outcomes(passed=6 if gpu else 4, failed=3 if gpu else 2, skipped=0 if gpu else 3)
    failed = {line.split("::")[1].split()[0] for line in result.outlines if line.startswith("FAILED ")}
    assert failed == {"test_pageable_copy_is_caught", "test_jax_implicit_transfer_is_caught"} | (
        {"test_item_is_caught"} if gpu else set())
    # the messages the page shows
    lines = DOC.read_text()
    assert "my_builder.py:45 (build_pageable)" in lines and "my_builder.py:46 (build_pageable)" in lines
    result.stdout.fnmatch_lines([
        "*pageable_copy_detector: 2 non_blocking host-to-device copies from pageable or non-dense memory*",
        "*Tensor.to(int32[[]4[]] -> *, non_blocking=True) at *my_builder.py:45 (build_pageable): the source is "
        "pageable (not pinned)*",
        "*Tensor.to(int32[[]5[]] -> *, non_blocking=True) at *my_builder.py:46 (build_pageable)*",
    ])
    result.stdout.fnmatch_lines(["*Disallowed host-to-device transfer*"])
    if gpu:
        result.stdout.fnmatch_lines(["*called a synchronizing CUDA operation*"])
    else:
        result.stdout.fnmatch_lines([
            "SKIPPED [[]1[]] test_my_builder.py:30: torch_sync_guard needs a CUDA GPU (torch sees none): skipped, not passed",
            "SKIPPED [[]1[]] test_my_builder.py:34: torch_sync_guard needs a CUDA GPU (torch sees none): skipped, not passed",
            "SKIPPED [[]1[]] test_my_builder.py:38: stall_probe needs a CUDA GPU (torch sees none): skipped, not passed",
        ])
        # the page shows the CPU run's summary and skip reasons
        assert "2 failed, 4 passed, 3 skipped" in lines
        for line in result.outlines:
            if line.startswith("SKIPPED"):
                assert line in lines, line


# --------------------------------------------------------------------------------------------
# Each fixture can fail, is armed around the body only, and leaves nothing behind.

KIT_SELF_TEST = '''
import numpy as np
import pytest
import torch

import attnsync


@pytest.fixture
def implicit_transfer_in_setup():
    import jax.numpy as jnp
    return jnp.asarray(np.arange(3))  # set-up is not guarded


def test_guard_not_armed_in_setup(implicit_transfer_in_setup, jax_transfer_guard):
    import jax.numpy as jnp
    with pytest.raises(Exception, match="Disallowed host-to-device"):
        jnp.asarray(np.arange(3))
    with jax_transfer_guard.allowed():
        jnp.asarray(np.arange(3))


def test_guard_gone_after():
    import jax.numpy as jnp
    assert int(jnp.asarray(np.arange(3)).sum()) == 3
    assert "to" not in torch.Tensor.__dict__ and "copy_" not in torch.Tensor.__dict__


def test_detector_kinds(pageable_copy_detector):
    det = pageable_copy_detector
    dst = torch.empty(3, dtype=torch.int64)
    dst.copy_(torch.arange(6)[::2], non_blocking=True)        # strided and pageable
    dst.copy_(torch.tensor([7]), non_blocking=True)           # broadcast
    torch.arange(6).reshape(2, 3).t().to("cpu", non_blocking=True)
    with det.allowed():
        torch.arange(3).to("cpu", non_blocking=True)           # not recorded
    torch.arange(3).to(torch.int32, non_blocking=True)         # no device: not a transfer
    torch.arange(3).to("cpu")                                  # blocking: not watched
    calls = det.clear()
    assert [c.call.split("(")[0] for c in calls] == ["Tensor.copy_", "Tensor.copy_", "Tensor.to"]
    assert "not dense" in calls[0].reason and "broadcast" in calls[1].reason
    assert "pageable" in calls[2].reason and "not dense" not in calls[2].reason  # a transpose is dense
    assert all("test_kit.py" in c.where for c in calls)
    assert det.watched == 3 and det.calls == []


def test_attnsync_lowering_makes_no_pageable_copy(pageable_copy_detector, jax_transfer_guard):
    from attnsync.adapters import jax as asj
    from attnsync.adapters import torch as ast
    md = attnsync.build(attnsync.Batch(query_lens=[1, 3], seq_lens=[9, 3], block_table=[[1], [2]], block_size=16))
    assert ast.lower(md, "cpu").slot_mapping.tolist() == [24, 32, 33, 34]
    asj.lower(md)


@pytest.mark.attnsync_no_pageable_copy
def test_marker_detects():
    torch.tensor([1.0]).to("cpu", non_blocking=True)


@pytest.mark.attnsync_no_sync
def test_marker_no_sync():
    import jax.numpy as jnp
    jnp.asarray(np.arange(3))


def test_counter(compile_counter):
    import jax.numpy as jnp
    f = compile_counter.jit(lambda x: x + 1)
    h = compile_counter.jit(lambda x: x * 2)
    f(jnp.zeros(3)); f(jnp.ones(3)); h(jnp.ones(2))
    assert compile_counter.count(f) == 1 and compile_counter.count(h) == 1 and compile_counter.total == 2
    with pytest.raises(KeyError, match="not wrapped"):
        compile_counter.count(lambda: 0)
    with compile_counter.frozen():
        f(jnp.zeros(3))
    with compile_counter.frozen():
        f(jnp.zeros(4, jnp.int32))  # fails: a new shape compiles again
'''


def test_each_fixture_can_fail_and_cleans_up(pytester):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytester.path.joinpath("test_kit.py").write_text(KIT_SELF_TEST)
    result = run_inner(pytester)
    result.assert_outcomes(passed=4, failed=3)
    failed = {line.split("::")[1].split()[0] for line in result.outlines if line.startswith("FAILED ")}
    assert failed == {"test_marker_detects", "test_marker_no_sync", "test_counter"}
    result.stdout.fnmatch_lines([
        "*pageable_copy_detector: 1 non_blocking host-to-device copy from pageable*",
        "*Tensor.to(float32[[]1[]] -> cpu, non_blocking=True) at *test_kit.py:* (test_marker_detects)*",
    ])
    result.stdout.fnmatch_lines(["*compile_counter: traced again after warm-up*",
                                 "*test_counter.<locals>.<lambda>: 1 more, with (int32[[]4[]])*"])
    result.stdout.fnmatch_lines(["*Disallowed host-to-device transfer*"])


# --------------------------------------------------------------------------------------------
# The same fixtures in this suite itself (tests/conftest.py makes sure the plugin is loaded).


def test_transfer_guard_fixture_arms_the_guard(jax_transfer_guard):
    jnp = pytest.importorskip("jax").numpy
    with pytest.raises(Exception, match="Disallowed host-to-device"):
        jnp.asarray(np.arange(3))


def test_detector_on_the_cpu_treats_the_host_as_a_device(pageable_copy_detector):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU host the CPU is a host, not a stand-in device")
    assert pageable_copy_detector.host_as_device
    torch.arange(3).to("cpu", non_blocking=True)
    (call,) = pageable_copy_detector.clear()
    assert call.call == "Tensor.to(int64[3] -> cpu, non_blocking=True)" and "pageable" in call.reason


def test_compile_counter_counts_torch_compiles(compile_counter):
    """torch.compile's recompiles are counted by graphs handed to the backend (run in this
    process, not through pytester: the counter is the same object either way)."""
    torch = pytest.importorskip("torch")
    double = compile_counter.torch_compile(lambda x: x * 2, dynamic=False)
    double(torch.zeros(3))
    with compile_counter.frozen():
        assert double(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
    assert compile_counter.count(double) == 1
    with pytest.raises(AssertionError, match=r"(?s)traced again after warm-up.*float32\[5\]"), compile_counter.frozen():
        double(torch.zeros(5))  # a new static shape compiles again
    assert compile_counter.count(double) == 2
