"""`attnsync.verify`'s per-backend registry: a backend is verified through its record alone.

A toy backend (the common builder under a new name) registered for a test runs the whole
CPU matrix with no other change; each part of a record (options, preparation, oracle,
refusals, kernel) is what the generic code uses; the generic modules compare no backend
names; and the package's public names are pinned.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import types
from pathlib import Path

import pytest

import attnsync
from attnsync import verify
from attnsync.backends import BACKENDS
from attnsync.verify import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnsync" / "verify"
CASES = ["one request decode", "chunked-prefill continuations", "padded bucket", "inexact decode rows"]

PUBLIC = [
    "CHECKS", "FAIL", "FRAMEWORKS", "KERNELS", "PASS", "SKIP", "BackendCheck", "Case", "CaseResult", "Cell",
    "Fail", "Framework", "Report", "Skip", "backend_check", "brute_force_fields", "build_options",
    "check_kernel", "check_lowered", "check_numpy", "compare_arrays", "environment", "exact_twin",
    "expected_build_refusal", "expected_lower_refusal", "format_text", "main", "merge_reports",
    "prepare_batch", "probe_frameworks", "register", "run_matrix", "true_seq_lens", "unregister",
    "write_report",
]


@pytest.fixture
def toy(monkeypatch):
    """Registers backend "toy" (the common builder) in attnsync and a record for it in verify;
    yields a function that registers a record for it (a copy of common's, with changes)."""
    monkeypatch.setitem(BACKENDS, "toy", BACKENDS["common"])

    def record(**changes) -> verify.BackendCheck:
        check = dataclasses.replace(verify.backend_check("common"), name="toy", **changes)
        return verify.register(check, replace=True)

    yield record
    registry.REGISTRY.pop("toy", None)
    assert "toy" not in registry.REGISTRY


def _run(frameworks=("numpy",), checks=("metadata",), cases=CASES):
    return verify.run_matrix(backends=["toy"], frameworks=list(frameworks), checks=list(checks), cases=0,
                             only_cases=cases, progress=False)


def test_public_names_are_pinned():
    assert verify.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(verify, name) is not None, name
    assert issubclass(verify.Skip, Exception) and verify._Skip is verify.Skip and verify._Fail is verify.Fail


REGISTRY_PUBLIC = ["DEFAULT_DEVICE_RECOMPUTED", "KERNELS", "REGISTRY", "BackendCheck", "backend_check", "register",
                   "unregister"]


def test_every_module_of_the_package_names_its_public_surface():
    import importlib
    import pkgutil

    assert registry.__all__ == REGISTRY_PUBLIC  # the module a backend author imports
    modules = ["attnsync.verify." + m.name for m in pkgutil.iter_modules([str(PACKAGE)]) if m.name != "__main__"]
    modules += ["attnsync.verify.backends." + m.name for m in pkgutil.iter_modules([str(PACKAGE / "backends")])]
    assert len(modules) >= 17, modules
    for name in modules:
        module = importlib.import_module(name)
        assert module.__all__, name
        for public in module.__all__:
            assert hasattr(module, public), (name, public)


def test_every_shipped_backend_has_a_record():
    assert set(registry.REGISTRY) >= set(attnsync.available_backends())
    for name, check in registry.REGISTRY.items():
        assert check.name == name and check.kernel is not None and check.oracle is not None, name


def test_a_toy_backend_runs_the_cpu_matrix_through_its_record(toy):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    toy()
    checks = ["metadata", "kernel", "fake_tensor", "syncs", "jax_recompiles"]
    report = _run(frameworks=["numpy", "torch-cpu", "jax-cpu"], checks=checks)
    assert not report.failed, verify.format_text(report)
    assert report.config["backends"] == ["toy"] and "toy" in report.config["options"]
    numpy = report.cell("toy", "numpy", "metadata")
    assert numpy.status == verify.PASS
    # common's oracle (every CommonMetadata field), not the shared fields of a record-less backend
    counts = {int(c.detail.split()[0]) for c in numpy.cases if c.status == verify.PASS}
    assert min(counts) > 8, numpy.cases
    for fw, check in [("torch-cpu", "metadata"), ("torch-cpu", "fake_tensor"), ("jax-cpu", "metadata"),
                      ("jax-cpu", "kernel"), ("jax-cpu", "syncs"), ("jax-cpu", "jax_recompiles")]:
        assert report.cell("toy", fw, check).status == verify.PASS, (fw, check)
    kernel = report.cell("toy", "jax-cpu", "kernel")
    assert any(c.status == verify.PASS and "relative error" in c.detail for c in kernel.cases)
    # the inexact batch: torch lowers it with exact device lengths, JAX refuses it as documented
    torch_cases = {c.case: c for c in report.cell("toy", "torch-cpu", "metadata").cases}
    assert torch_cases["inexact decode rows"].status == verify.PASS
    jax_cases = {c.case: c for c in report.cell("toy", "jax-cpu", "metadata").cases}
    assert jax_cases["inexact decode rows"].status == verify.SKIP


def test_the_records_options_preparation_and_oracle_are_the_ones_used(toy):
    prepared = []

    def prepare(batch):
        prepared.append(batch.num_reqs)
        return batch

    def oracle(batch, md):
        want = verify.backend_check("common").oracle(batch, md)
        assert md.decode_threshold == 2  # the record's options reached the build
        want["max_seq_len"] += 1  # a wrong expectation: the oracle is the record's
        return want

    toy(options={"decode_threshold": 2}, prepare=prepare, oracle=oracle)
    assert verify.build_options("toy", attnsync.Batch(query_lens=[1], seq_lens=[3], block_table=[[1]],
                                                      block_size=16)) == {"decode_threshold": 2}
    report = _run(cases=["padded bucket"])
    cell = report.cell("toy", "numpy", "metadata")
    assert cell.status == verify.FAIL and "max_seq_len: got" in cell.detail, cell.detail
    assert len(prepared) == 1


def test_an_undocumented_refusal_fails_and_a_documented_one_skips(toy, monkeypatch):
    import attnsync.backends.common as common_builder

    real = common_builder.build

    def refusing(batch, /, **options):
        if (~batch.seq_lens_exact).any():
            raise attnsync.SpecError("seq_lens_exact: the toy wants exact rows")
        return real(batch, **options)

    module = types.ModuleType("attnsync_test_toy")
    module.build = refusing
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(BACKENDS, "toy", module.__name__)
    toy()
    cases = ["inexact decode rows", "one request decode"]
    cell = _run(cases=cases).cell("toy", "numpy", "metadata")
    assert cell.status == verify.FAIL and "unexpected refusal by build" in cell.detail
    toy(build_refusal=lambda batch, options: "the toy documents exact rows only")
    cell = _run(cases=cases).cell("toy", "numpy", "metadata")
    assert cell.status == verify.PASS
    skipped = {c.case: c for c in cell.cases}["inexact decode rows"]
    assert skipped.status == verify.SKIP and "the toy documents exact rows only" in skipped.reason


def test_a_backend_without_a_record_gets_the_generic_checks(toy):
    assert "toy" not in registry.REGISTRY
    assert verify.backend_check("toy") == verify.BackendCheck("toy")
    report = _run(checks=["metadata"], cases=["padded bucket"])
    cell = report.cell("toy", "numpy", "metadata")
    assert cell.status == verify.PASS and cell.cases[0].detail == "8 fields equal the brute-force oracle"


def test_kernels_view_reads_and_writes_the_records(toy):
    toy()
    original = verify.backend_check("toy").kernel
    assert verify.KERNELS["toy"] is original and "toy" in verify.KERNELS

    def fake(case, fw, lowered):
        return 0.0, 1.0

    with pytest.MonkeyPatch.context() as patch:  # what the GPU tests do to a consumer
        patch.setitem(verify.KERNELS, "toy", fake)
        assert verify.backend_check("toy").kernel is fake
    assert verify.backend_check("toy").kernel is original
    del verify.KERNELS["toy"]
    assert "toy" not in verify.KERNELS and verify.backend_check("toy").kernel is None
    with pytest.raises(KeyError):
        del verify.KERNELS["toy"]


def test_register_refuses_a_second_record_and_unregister_names_the_missing_one(toy):
    toy()
    with pytest.raises(attnsync.SpecError, match="'toy' already has a verify record"):
        verify.register(verify.BackendCheck("toy"))
    with pytest.raises(TypeError, match="expected a BackendCheck"):
        verify.register({"name": "toy"})
    assert verify.unregister("toy").name == "toy"
    with pytest.raises(attnsync.SpecError, match="'toy' has no verify record"):
        verify.unregister("toy")


def _names_backend(node: ast.AST) -> bool:
    """A variable or attribute whose name says it holds a backend name (backend, case.backend)."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "backend" in name.lower()


def _backend_literals(node: ast.AST) -> list[str]:
    values = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return [v.value for v in values if isinstance(v, ast.Constant) and v.value in BACKENDS]


def test_generic_modules_compare_no_backend_names():
    """Only the records in attnsync/verify/backends/ know backend names: no `backend == "flex"`
    and no table keyed by backend names elsewhere in the package."""
    generic = sorted(PACKAGE.glob("*.py"))
    assert {p.name for p in generic} >= {"runner.py", "checks.py", "lowering.py", "oracles.py", "kernels.py"}
    found = []
    for path in generic:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_names_backend(s) for s in sides) and any(_backend_literals(s) for s in sides):
                    found.append(f"{path.name}:{node.lineno}: compares a backend with a name")
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in BACKENDS]
                if len(keys) >= 2:
                    found.append(f"{path.name}:{node.lineno}: a table keyed by backend names {keys}")
    assert not found, found


def test_the_grep_would_catch_a_comparison():
    tree = ast.parse('if case.backend == "flex": pass\nx = {"flex": 1, "tree": 2}\ny = backend in ("mamba",)')
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert all(any(_names_backend(s) for s in [c.left, *c.comparators]) for c in compares)
    assert all(any(_backend_literals(s) for s in [c.left, *c.comparators]) for c in compares)
    assert len(compares) == 2
