"""`attnsync verify`: the matrix passes on this CPU host, and it fails when a lowering is wrong.

The runs here are small (a few corpus cases, two backends, CPU frameworks) so that the module
stays within seconds; `attnsync verify` with no arguments runs the whole corpus. A corrupted
lowering (one value flipped, a dtype narrowed), a crashing consumer, a data-dependent read in
device code and an unexpected refusal must each turn the matrix red with the field and index
named, and `main` must exit non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import attnsync
from attnsync import cli, verify
from attnsync._corpus import corpus
from attnsync.verify import runner
from attnsync.verify.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
CPU = ["numpy", "torch-cpu", "jax-cpu"]
# small but varied: a decode, a mixed batch with chunked prefills, padding, inexact rows, a random step
CASES = ["one request decode", "chunked-prefill continuations", "padded bucket", "inexact decode rows",
         "random #0 (seed 0)"]
FAST = dict(cases=1, max_reqs=8, progress=False)


def run(**kwargs) -> verify.Report:
    options = {**FAST, "only_cases": CASES, "frameworks": CPU, **kwargs}
    return verify.run_matrix(**options)


@pytest.fixture(scope="module")
def report() -> verify.Report:
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    return run(backends=["common", "triton"])


@pytest.mark.triton_cpu  # its triton cells interpret kernels on CPU tensors
def test_cpu_matrix_passes(report):
    assert not report.failed, verify.format_text(report)
    for cell in report.cells:
        assert cell.status in (verify.PASS, verify.SKIP), cell
        if cell.applicable and cell.framework in CPU and cell.check in ("metadata", "kernel"):
            assert cell.status == verify.PASS, cell
    # the columns that run on CPU did run, on every framework they apply to
    assert report.cell("common", "torch-cpu", "fake_tensor").status == verify.PASS
    assert report.cell("triton", "jax-cpu", "syncs").status == verify.PASS
    assert report.cell("triton", "jax-cpu", "jax_recompiles").status == verify.PASS
    kernel = report.cell("triton", "torch-cpu", "kernel")
    assert any(c.status == verify.PASS and "relative error" in c.detail for c in kernel.cases)


def test_inexact_batches_are_checked_on_torch_and_skipped_on_jax_with_the_reason(report):
    torch_cases = {c.case: c for c in report.cell("common", "torch-cpu", "metadata").cases}
    assert torch_cases["inexact decode rows"].status == verify.PASS  # lowered with exact device lengths
    jax_cases = {c.case: c for c in report.cell("common", "jax-cpu", "metadata").cases}
    skipped = jax_cases["inexact decode rows"]
    assert skipped.status == verify.SKIP and "JAX adapter lowers exact batches only" in skipped.reason


def test_skipped_and_not_applicable_cells_carry_reasons(report):
    for cell in report.cells:
        if cell.status == verify.SKIP:
            assert cell.detail, cell
    cell = report.cell("common", "numpy", "h2d")
    assert not cell.applicable and cell.detail.startswith("n/a")
    cell = report.cell("common", "torch-cpu", "stall")
    assert not cell.applicable and "CUDA" in cell.detail


def test_missing_frameworks_are_skipped_with_the_reason():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    r = verify.run_matrix(backends=["common"], frameworks=["torch-cuda"], checks=["metadata"], cases=0,
                          only_cases=["one request decode"], progress=False)
    cell = r.cell("common", "torch-cuda", "metadata")
    assert cell.status == verify.SKIP and "CUDA" in cell.detail
    assert not r.failed


def test_expected_refusal_is_a_skip_and_an_unexpected_one_a_failure(monkeypatch):
    pytest.importorskip("torch")
    kwargs = dict(backends=["flashinfer"], frameworks=["numpy", "torch-cpu"], checks=["metadata"],
                  only_cases=["inexact decode rows", "one request decode"])
    r = run(**kwargs)
    assert not r.failed
    cases = {c.case: c for c in r.cell("flashinfer", "numpy", "metadata").cases}
    assert cases["inexact decode rows"].status == verify.SKIP
    assert "flashinfer needs exact lengths" in cases["inexact decode rows"].reason
    # without its documented refusal, FlashInfer's refusal of inexact rows is a failure
    record = verify.backend_check("flashinfer")
    monkeypatch.setitem(REGISTRY, "flashinfer", dataclasses.replace(record, build_refusal=None))
    r = run(**kwargs)
    cell = r.cell("flashinfer", "torch-cpu", "metadata")
    assert cell.status == verify.FAIL and "unexpected refusal by build" in cell.detail


def _flip_torch(monkeypatch, field: str, index: int, *, dtype=None) -> None:
    """Make the torch adapter return `field` with one value changed (or narrowed to `dtype`)."""
    from attnsync.adapters import torch as ast

    real = ast.lower

    def corrupted(md, *args, **kwargs):
        out = real(md, *args, **kwargs)
        tensor = getattr(out, field).clone()
        if dtype is not None:
            tensor = tensor.to(dtype)
        else:
            tensor[index] += 1
        return dataclasses.replace(out, **{field: tensor})

    monkeypatch.setattr(ast, "lower", corrupted)


def test_a_corrupted_torch_lowering_fails_with_field_and_index(monkeypatch, capsys):
    pytest.importorskip("torch")
    _flip_torch(monkeypatch, "query_start_loc", 1)
    r = run(backends=["common"], checks=["metadata"], frameworks=["torch-cpu"])
    cell = r.cell("common", "torch-cpu", "metadata")
    assert cell.status == verify.FAIL
    assert "query_start_loc[1]: got" in cell.detail and "expected" in cell.detail, cell.detail
    text = verify.format_text(r)
    assert "FAIL common/torch-cpu/metadata" in text and "query_start_loc[1]" in text
    status = verify.main(["--backend", "common", "--framework", "torch-cpu", "--check", "metadata",
                          "--case", "padded bucket", "--cases", "0", "--no-progress"])
    assert status == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "query_start_loc[1]" in out


def test_a_narrowed_dtype_fails(monkeypatch):
    torch = pytest.importorskip("torch")
    _flip_torch(monkeypatch, "slot_mapping", 0, dtype=torch.int32)  # the adapter documents int64
    r = run(backends=["common"], checks=["metadata"], frameworks=["torch-cpu"], only_cases=["padded bucket"])
    cell = r.cell("common", "torch-cpu", "metadata")
    assert cell.status == verify.FAIL and "slot_mapping: dtype int32, expected int64" in cell.detail


def test_a_corrupted_jax_lowering_fails(monkeypatch):
    pytest.importorskip("jax")
    from attnsync.adapters import jax as asj

    real = asj.lower

    def corrupted(md, *args, **kwargs):
        out = real(md, *args, **kwargs)
        offset = {name: start for name, start, _, _ in out.layout.entries}["block_table"]
        return asj.unpack(out.packed.at[offset].add(7), out.layout)  # block_table[0, 0] + 7

    monkeypatch.setattr(asj, "lower", corrupted)
    r = run(backends=["triton"], checks=["metadata"], frameworks=["jax-cpu"], only_cases=["padded bucket"])
    cell = r.cell("triton", "jax-cpu", "metadata")
    assert cell.status == verify.FAIL and "block_table[(0, 0)]" in cell.detail


def test_a_wrong_kernel_output_fails(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(verify.KERNELS, "common", lambda case, fw, lowered: (0.5, 1e-4))
    r = run(backends=["common"], checks=["kernel"], frameworks=["torch-cpu"], only_cases=["padded bucket"])
    cell = r.cell("common", "torch-cpu", "kernel")
    assert cell.status == verify.FAIL and "relative error 0.5" in cell.detail


def test_a_crashing_consumer_is_a_failure_not_a_skip(monkeypatch):
    pytest.importorskip("torch")

    def crash(case, fw, lowered):
        raise IndexError("boom")

    monkeypatch.setitem(verify.KERNELS, "common", crash)
    r = run(backends=["common"], checks=["kernel"], frameworks=["torch-cpu"], only_cases=["padded bucket"])
    assert r.cell("common", "torch-cpu", "kernel").status == verify.FAIL
    assert "IndexError: boom" in r.cell("common", "torch-cpu", "kernel").detail


def test_fake_tensor_column_catches_a_data_dependent_read(monkeypatch):
    pytest.importorskip("torch")
    from attnsync.adapters import torch as ast

    real = ast.slots_from_device_lengths

    def reads_back(**kwargs):
        int(kwargs["seq_lens"].max())  # a device read: `.item()` in disguise
        return real(**kwargs)

    monkeypatch.setattr(ast, "slots_from_device_lengths", reads_back)
    r = run(backends=["common"], checks=["fake_tensor"], frameworks=["torch-cpu"], only_cases=["padded bucket"])
    cell = r.cell("common", "torch-cpu", "fake_tensor")
    assert cell.status == verify.FAIL and "slot_mapping recompute" in cell.detail


def test_numpy_oracle_names_the_field():
    batch = dict(corpus(cases=0))["padded bucket"]
    md = attnsync.build(batch, backend="flashinfer")
    indptr = np.array(md.paged_kv_indptr)
    indptr[2] += 1
    indptr.flags.writeable = False
    bad = dataclasses.replace(md, paged_kv_indptr=indptr)
    assert "fields equal" in verify.check_numpy("flashinfer", batch, md)
    with pytest.raises(verify._Fail, match=r"paged_kv_indptr\[2\]: got"):
        verify.check_numpy("flashinfer", batch, bad)
    writable = dataclasses.replace(md, paged_kv_indptr=np.array(md.paged_kv_indptr))
    with pytest.raises(verify._Fail, match="paged_kv_indptr: the array is writeable"):
        verify.check_numpy("flashinfer", batch, writable)


def test_compare_arrays_reports_the_first_differing_index():
    verify.compare_arrays("x", np.array([1.0, -np.inf, np.nan]), np.array([1.0, -np.inf, np.nan]))
    with pytest.raises(verify._Fail, match=r"x\[\(1, 0\)\]: got 5, expected 4 \(2 of 4 values differ\)"):
        verify.compare_arrays("x", np.array([[1, 2], [5, 6]]), np.array([[1, 2], [4, 7]]))
    with pytest.raises(verify._Fail, match="x: dtype int64, expected int32"):
        verify.compare_arrays("x", np.zeros(2, np.int64), np.zeros(2, np.int32), dtype=np.int32)
    with pytest.raises(verify._Fail, match=r"x: shape \(3,\), expected \(2,\)"):
        verify.compare_arrays("x", np.zeros(3), np.zeros(2))


def test_true_lengths_stay_within_the_drafts_of_each_inexact_row():
    batch = dict(corpus(cases=0))["inexact decode rows"]
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = verify.true_seq_lens(batch, rng)[: batch.num_reqs]
        bound, q = batch.seq_lens, batch.query_lens
        assert (lengths <= bound).all() and (bound - lengths <= np.maximum(q - 1, 0)).all()
        assert (lengths[batch.seq_lens_exact] == bound[batch.seq_lens_exact]).all()
        assert (lengths > q).all() or (lengths >= q).all()
        verify.exact_twin(batch, verify.true_seq_lens(batch, rng))  # a valid batch


def test_json_output_parses_and_out_writes_a_dated_report(tmp_path, capsys):
    pytest.importorskip("torch")
    status = verify.main(["--json", "--backend", "common", "--framework", "numpy", "--framework", "torch-cpu",
                          "--check", "metadata", "--cases", "0", "--case", "one request decode",
                          "--out", str(tmp_path) + os.sep])
    assert status == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["failed"] is False and doc["summary"]["fail"] == 0
    assert {"date", "python", "numpy", "torch", "jax", "card", "frameworks"} <= set(doc["environment"])
    cell = next(c for c in doc["cells"] if c["framework"] == "torch-cpu" and c["check"] == "metadata")
    assert cell["status"] == "pass" and cell["cases"][0]["case"] == "one request decode"
    written = list(tmp_path.glob("attnsync-verify-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["cells"] == doc["cells"]


def test_cli_verify_subcommand_and_demo_still_work(capsys):
    status = cli.main(["verify", "--backend", "common", "--framework", "numpy", "--cases", "0",
                       "--case", "empty", "--no-progress"])
    assert status == 0
    out = capsys.readouterr().out
    assert out.splitlines()[3].split()[:3] == ["backend", "framework", "metadata"]
    assert out.splitlines()[4].split()[:3] == ["common", "numpy", "PASS"]
    assert cli.main(["demo", "--backend", "common", "--framework", "numpy"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "verify" in capsys.readouterr().out


def test_bad_arguments(capsys):
    assert verify.main(["--case", "no such case", "--cases", "0", "--framework", "numpy"]) == 2
    assert "unknown corpus case" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        verify.main(["--backend", "nope"])
    with pytest.raises(attnsync.SpecError, match="unknown framework"):
        verify.run_matrix(frameworks=["tpu"], progress=False)


def test_progress_counter_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    verify.run_matrix(backends=["common"], frameworks=["numpy"], cases=0, only_cases=["empty"], progress=True)
    assert "attnsync verify: 1/1" in capsys.readouterr().err


def test_importing_verify_imports_no_framework():
    code = ("import sys, attnsync.verify\n"
            "print(sorted(m for m in ('torch', 'jax', 'triton', 'flashinfer') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_time_budget_and_interruption_give_a_partial_report(monkeypatch, capsys):
    r = verify.run_matrix(backends=["common"], frameworks=["numpy"], cases=0, progress=False, time_budget_s=0)
    assert r.config["stopped"].startswith("time budget of 0 s reached") and not r.failed
    assert "STOPPED EARLY" in verify.format_text(r)
    assert verify.main(["--backend", "common", "--framework", "numpy", "--cases", "0", "--time-budget", "0",
                        "--no-progress"]) == 3
    capsys.readouterr()
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(runner, "_run_case", interrupted)
    r = verify.run_matrix(backends=["common"], frameworks=["numpy"], cases=0, progress=False)
    assert r.config["stopped"] == "interrupted" and len(calls) == 2


def test_sigterm_prints_a_partial_report():
    """The GPU suite stops a step with `timeout` (SIGTERM): what ran so far must still come out."""
    import signal

    pytest.importorskip("torch")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "attnsync", "verify", "--framework", "numpy",
                             "--framework", "torch-cpu", "--cases", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    # the second progress line: the handler is set and some cases have finished (libraries may
    # print warnings first: on the GPU host a blank line came before it). After the first line
    # only, a fast host was stopped before any case had passed (run 29).
    seen = []
    while sum(line.startswith("attnsync verify:") for line in seen) < 2 and len(seen) < 50:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
    assert sum(line.startswith("attnsync verify:") for line in seen) == 2, seen
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert proc.returncode == 3, err
    assert "STOPPED EARLY (interrupted)" in out and "PASS" in out


def test_merge_joins_per_backend_runs_into_one_matrix(tmp_path, capsys):
    paths = []
    for backend in ("common", "flashinfer"):
        path = tmp_path / f"{backend}.json"
        assert verify.main(["--backend", backend, "--framework", "numpy", "--cases", "0", "--case", "one request decode",
                            "--no-progress", "--out", str(path)]) == 0
        paths.append(str(path))
    capsys.readouterr()
    together = verify.run_matrix(backends=["common", "flashinfer"], frameworks=["numpy"], cases=0,
                                 only_cases=["one request decode"], progress=False)
    assert verify.main(["--merge", *paths, "--out", str(tmp_path / "merged.json")]) == 0
    text = capsys.readouterr().out
    assert "common" in text and "flashinfer" in text and "0 failed" in text
    merged = verify.Report.from_dict(json.loads((tmp_path / "merged.json").read_text()))
    assert merged.config["backends"] == ["common", "flashinfer"] and merged.config["merged_from"] == 2
    assert [(c.name, c.status) for c in merged.cells] == [(c.name, c.status) for c in together.cells]
    # a backend in two parts, or parts of different corpora, cannot be merged
    assert verify.main(["--merge", paths[0], paths[0]]) == 2
    assert "appear in two reports" in capsys.readouterr().err
    other = json.loads(Path(paths[1]).read_text())
    other["config"]["seed"] = 7
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert verify.main(["--merge", paths[0], str(tmp_path / "other.json")]) == 2
    assert "differ in ['seed']" in capsys.readouterr().err


def test_flex_device_inverse_table_is_compared_with_the_host_builder():
    """A realistic random batch makes "auto" leave flex's inverse table to the device: the torch
    lowering's [R, P] table is compared with the host builder's (found on the GPU host, run 7)."""
    pytest.importorskip("torch")
    report = verify.run_matrix(backends=["flex"], frameworks=["torch-cpu"], checks=["metadata"], cases=1,
                               only_cases=["random #0 (seed 0)"], progress=False)
    cell = report.cell("flex", "torch-cpu", "metadata")
    assert cell.status == "pass", cell.cases
    md_case = next(b for name, b in corpus(seed=0, cases=1, max_reqs=256) if name == "random #0 (seed 0)")
    md = attnsync.build(verify.prepare_batch("flex", md_case), backend="flex",
                        **verify.build_options("flex", verify.prepare_batch("flex", md_case)))
    assert md.inverse_table_on_device, "the case must exercise the device-built table"


def test_environment_names_installed_versions_without_importing_them(capsys):
    """`attnsync verify --framework numpy` imports no JAX, yet prints the installed JAX's version."""
    from importlib import metadata

    jax_version = metadata.version("jax")  # the test environment installs JAX
    assert verify.main(["--framework", "numpy", "--backend", "common", "--cases", "0", "--case", "empty",
                        "--no-progress"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert f"jax {jax_version}," in line and "None" not in line, line
    env = verify.environment({})
    assert env["jax"] == jax_version and env["numpy"] == np.__version__
    code = ("import sys; from attnsync.verify.frameworks import environment; env = environment({}); "
            "print(env['jax'], 'jax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [jax_version, "False"]
