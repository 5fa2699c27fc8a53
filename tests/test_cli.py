"""The `attnsync` command line: `demo`, `demo --json`, `--version` and bad arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import attnsync
from attnsync import cli
from attnsync.backends import BACKENDS

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -m attnsync ARGS` in a fresh interpreter (after `prelude`, if any)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if prelude:
        code = f"{prelude}\nfrom attnsync.cli import main\nraise SystemExit(main({list(args)!r}))"
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, "-m", "attnsync", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _demo_json(capsys, *args: str) -> dict:
    """`attnsync demo --json ARGS`; its exit status says whether any backend or lowering failed."""
    status = cli.main(["demo", "--json", *args])
    doc = json.loads(capsys.readouterr().out)
    failed = [
        (name, fw) for name, report in doc["backends"].items()
        for fw, lowering in [("build", report), *report.get("lowerings", {}).items()]
        if lowering["status"] == "error" or str(lowering.get("syncs", "")).startswith("error")
    ]
    assert status == (1 if failed else 0), failed
    return doc


def test_demo_default_output_fits_a_screen_with_one_line_per_lowering():
    result = _run("demo")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 60, len(lines)
    assert not any(line.startswith("== ") for line in lines)  # no field dumps without --fields
    start = lines.index(next(line for line in lines if line.startswith("lowerings to the frameworks")))
    assert lines[start + 1].split()[:4] == ["backend", "framework", "status", "fields"]
    rows = [line.split() for line in lines[start + 2:] if line.strip()]
    doc = cli.run_demo(backends=list(attnsync.available_backends()), frameworks=list(cli.FRAMEWORKS))
    ran = [fw for fw, info in doc["frameworks"].items() if info["status"] == "ok"]
    assert [(row[0], row[1]) for row in rows] == [(b, fw) for b in attnsync.available_backends() for fw in ran]
    for row in rows:
        assert row[2] == "ok" and int(row[3]) == len(doc["backends"][row[0]]["lowerings"][row[1]]["fields"])
    full = _run("demo", "--fields")
    assert full.returncode == 0 and len(full.stdout.splitlines()) > 3 * len(lines)
    assert "== common -> numpy" in full.stdout


def test_demo_text_runs_and_is_aligned():
    result = _run("demo", "--backend", "common", "--fields")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("== common -> numpy")))
    header = lines[start + 1]
    assert header.split() == ["field", "shape", "dtype", "device", "values"]
    rows = lines[start + 2 : lines.index("", start)]
    assert rows[0].split()[0] == "query_start_loc"
    # Every column starts where its header does.
    for column in ("shape", "dtype", "device", "values"):
        at = header.index(column)
        for row in rows:
            assert row[at - 2 : at] == "  " and row[at] != " ", (column, row)
    assert "H2D copies: 0" in lines[start]


def test_demo_json_matches_build(capsys):
    doc = _demo_json(capsys)
    expected = attnsync.build(cli.demo_batch())
    common = doc["backends"]["common"]
    assert common["status"] == "ok" and common["metadata_class"] == "CommonMetadata"
    numpy_fields = common["lowerings"]["numpy"]["fields"]
    assert numpy_fields["query_start_loc"]["values"] == expected.query_start_loc.tolist()
    assert numpy_fields["query_start_loc"]["shape"] == [expected.num_reqs + 1]
    assert numpy_fields["max_seq_len"]["values"] == [expected.max_seq_len]
    for name, lowering in common["lowerings"].items():
        if lowering["status"] == "ok":
            fields = lowering["fields"]
            assert fields["query_start_loc"]["values"] == expected.query_start_loc.tolist(), name
            assert fields["query_start_loc"]["dtype"] == "int32", name
    assert set(doc["frameworks"]) == set(cli.FRAMEWORKS)
    assert set(doc["backends"]) == set(attnsync.available_backends())
    for name, report in doc["backends"].items():
        # Backends still being written may be skipped or fail; either way the demo says why.
        if report["status"] != "ok":
            assert report["reason"], name
        for fw, lowering in report.get("lowerings", {}).items():
            assert lowering["status"] == "ok" or lowering["reason"], (name, fw)


def test_demo_batch_is_the_documented_mix():
    batch = cli.demo_batch()
    assert batch.num_reqs == 7 and batch.padded_num_reqs == 8 and batch.padded_num_tokens == 64
    assert batch.regions().tolist() == [0, 0, 0, 0, 0, 2, 3]  # decodes, chunked prefill, prefill
    assert 100 <= batch.seq_lens[:5].min() and batch.seq_lens[:5].max() <= 3000


def test_demo_counts_copies_and_syncs(capsys):
    doc = _demo_json(capsys, "--backend", "common")
    lowerings = doc["backends"]["common"]["lowerings"]
    assert lowerings["numpy"]["h2d_copies"] == 0
    assert lowerings["numpy"]["syncs"] == cli.NO_DEVICE
    for name in ("torch-cuda", "jax-gpu"):
        if lowerings[name]["status"] == "ok":  # on a GPU host: measured under no_sync()
            assert lowerings[name]["h2d_copies"] == 1 and lowerings[name]["syncs"] == 0, lowerings[name]
    if lowerings["jax-cpu"]["status"] == "ok":
        assert lowerings["jax-cpu"]["h2d_copies"] == 1
        assert lowerings["jax-cpu"]["syncs"] == cli.NO_DEVICE


def test_demo_reports_missing_frameworks_with_reasons():
    # A fresh interpreter in which torch and jax cannot be imported.
    result = _run("demo", "--json", prelude="import sys; sys.modules['torch'] = None; sys.modules['jax'] = None")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["frameworks"]["numpy"]["status"] == "ok"
    for name in ("torch-cpu", "torch-cuda", "jax-cpu", "jax-gpu"):
        framework = doc["frameworks"][name]
        assert framework["status"] == "skipped"
        assert "not importable" in framework["reason"] and "install attnsync[" in framework["reason"]
        lowering = doc["backends"]["common"]["lowerings"][name]
        assert lowering == {"status": "skipped", "reason": framework["reason"]}


def test_demo_without_gpu_says_why(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    doc = _demo_json(capsys, "--backend", "common", "--framework", "torch-cuda")
    assert doc["frameworks"]["torch-cuda"]["status"] == "skipped"
    assert "CUDA" in doc["frameworks"]["torch-cuda"]["reason"]


def test_demo_reports_unwritten_and_refusing_backends(monkeypatch, capsys):
    refuser = types.ModuleType("attnsync_test_refuser")

    def build(batch, /, *, decode_threshold: int = 1):
        raise attnsync.SpecError("batch: this backend wants decode rows only")

    refuser.build = build
    monkeypatch.setitem(sys.modules, refuser.__name__, refuser)
    monkeypatch.setitem(BACKENDS, "refuser", refuser.__name__)
    monkeypatch.setitem(BACKENDS, "ghost", "attnsync.backends._ghost_not_written")
    doc = _demo_json(capsys, "--backend", "ghost", "--backend", "refuser", "--framework", "numpy")
    ghost, refused = doc["backends"]["ghost"], doc["backends"]["refuser"]
    assert ghost["status"] == "skipped" and "does not exist yet" in ghost["reason"]
    assert refused["status"] == "skipped" and "wants decode rows only" in refused["reason"]


def test_demo_fails_when_a_backend_breaks(monkeypatch, capsys):
    broken = types.ModuleType("attnsync_test_broken")

    def build(batch, /):
        raise RuntimeError("boom")

    broken.build = build
    monkeypatch.setitem(sys.modules, broken.__name__, broken)
    monkeypatch.setitem(BACKENDS, "broken", broken.__name__)
    assert cli.main(["demo", "--backend", "broken", "--framework", "numpy"]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "build failed: RuntimeError: boom" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnsync {attnsync.__version__}"


def test_version_imports_no_framework():
    code = (
        "import sys\nfrom attnsync.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'jax', 'triton', 'flashinfer') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[]")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["demo", "--backend", "nope"], "invalid choice: 'nope'"),
        (["demo", "--framework", "tpu"], "invalid choice: 'tpu'"),
        (["demo", "--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: attnsync" in err


def test_python_m_and_console_script():
    result = _run("demo", "--backend", "nope")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    script = Path(sys.executable).parent / "attnsync"
    if not script.exists():
        pytest.skip("attnsync is not pip-installed in this environment (no console script)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"attnsync {attnsync.__version__}"


def test_readme_example_is_the_quickstart_script():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no python example"
    assert blocks[0].strip() in (ROOT / "examples" / "quickstart.py").read_text()


def test_quickstart_example_runs():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "examples/quickstart.py"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "host : [0 1 2 7 7] max_seq_len 33 decodes 2" in result.stdout
    assert "jax  : [0 1 2 7 7] [33 17  5  0]" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = "install -c .ci/constraints.txt -e '.[torch,jax,triton,test]'"
    assert install in readme and install in ci
    assert "/python -m pytest -q" in readme and '/bin/python" -m pytest -q' in ci


@pytest.mark.parametrize("in_use", [True, False])
def test_demo_says_whether_the_compiled_twin_ran(in_use, monkeypatch):
    from attnsync import _accel

    if in_use and _accel.native is None:
        pytest.skip("attnsync._native is not in use here (not built, or ATTNSYNC_PURE_NUMPY set)")
    if not in_use:
        monkeypatch.setattr(_accel, "native", None)
    doc = cli.run_demo(backends=["common"], frameworks=["numpy"])
    assert doc["native"] is in_use
    line = cli.format_text(doc).splitlines()[1]
    assert line.startswith("compiled twin of the hot numpy steps (attnsync._native): ")
    assert ("not in use" not in line) is in_use


@pytest.mark.parametrize(
    ("args", "lines", "statuses"),
    [
        # far more than a pipe holds: the writer meets the closed pipe mid-way
        (["demo", "--json"], 1, {cli.EXIT_BROKEN_PIPE}),
        # closed before the first write
        (["demo", "--backend", "common", "--framework", "torch-cpu"], 0, {cli.EXIT_BROKEN_PIPE}),
        # argparse swallows the failed write of its help text itself and exits 0
        (["--help"], 0, {0, cli.EXIT_BROKEN_PIPE}),
    ],
)
def test_a_reader_that_stops_early_ends_the_command_quietly(args, lines, statuses):
    """`attnsync demo --json | head`: no BrokenPipeError traceback, the SIGPIPE exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "attnsync", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
    read = [proc.stdout.readline() for _ in range(lines)]
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert all(line for line in read), read
    assert proc.returncode in statuses, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_demo_lists_the_frameworks_verify_probes():
    """One probe for both commands: the demo's framework block is verify's probe, word for word."""
    from attnsync.verify.frameworks import probe_frameworks

    probed = probe_frameworks(cli.FRAMEWORKS)
    doc = cli.run_demo(backends=["common"], frameworks=list(cli.FRAMEWORKS))
    for name, fw in probed.items():
        shown = doc["frameworks"][name]
        assert shown["status"] == ("ok" if fw.available else "skipped"), name
        assert shown.get("version", shown.get("reason")) == fw.detail, name
