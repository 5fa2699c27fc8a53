"""The layers import one way: core <- backends <- adapters <- integrations <- verify and the CLI.

Read from the source (every import statement, at any depth, so a lazy import inside a function
counts too), not from what happens to be imported at run time:

- the core (attnsync/*.py but the CLI and testing helpers) and backends/ import no adapter,
  integration, kernel, verify module, and no framework at module level;
- neither framework adapter imports the other, and the JAX adapter imports no torch at all;
- adapters import no integration;
- kernels import no adapter and no integration (they consume what adapters make).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attnsync"
FRAMEWORKS = ("torch", "jax", "jaxlib", "triton", "flashinfer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, at module level) of every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [f"{module}.{alias.name}" for alias in node.names]
            out += [(name, id(node) in top_level) for name in [module, *names]]
    return out


def _files(*globs: str) -> list[Path]:
    return sorted({p for g in globs for p in PACKAGE.glob(g)})


CORE = [p for p in _files("*.py", "backends/*.py") if p.name not in ("cli.py", "testing.py", "__main__.py")]


def _refs(path: Path, prefix: str) -> list[str]:
    return [name for name, _ in _imports(path) if name == prefix or name.startswith(prefix + ".")]


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_imports_no_adapter_integration_or_framework(path):
    for layer in ("attnsync.adapters", "attnsync.integrations", "attnsync.kernels", "attnsync.verify"):
        assert not _refs(path, layer), (path, layer)
    framework_imports = [name for name, top in _imports(path) if top and name.split(".")[0] in FRAMEWORKS]
    assert not framework_imports, (path, framework_imports)


@pytest.mark.parametrize("path", _files("adapters/*.py"), ids=lambda p: p.name)
def test_adapters_import_no_integration_and_not_each_other(path):
    assert not _refs(path, "attnsync.integrations"), path
    name = path.stem
    if name.startswith(("jax", "_jax")):
        assert not [n for n, _ in _imports(path) if n.split(".")[0] == "torch"], path
        assert not _refs(path, "attnsync.adapters.torch"), path
        assert not [n for n, _ in _imports(path) if n.startswith("attnsync.adapters._") and "jax" not in n], path
    if name.startswith(("torch", "_torch", "_pinned", "_cuda")):
        assert not [n for n, _ in _imports(path) if n.split(".")[0] in ("jax", "jaxlib")], path
        assert not _refs(path, "attnsync.adapters.jax"), path


@pytest.mark.parametrize("path", _files("kernels/*.py"), ids=lambda p: p.name)
def test_kernels_import_no_adapter_or_integration(path):
    assert not _refs(path, "attnsync.adapters"), path
    assert not _refs(path, "attnsync.integrations"), path


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    """The rules above could not fail if the parser missed imports: check it on known source."""
    folder = PACKAGE / "adapters"
    sample = folder / "torch.py"
    names = {n for n, _ in _imports(sample)}
    assert "attnsync._plan" in names and "attnsync.adapters._pinned_tables" in names
    lazy = PACKAGE / "integrations" / "graphs.py"
    assert any(n.startswith("attnsync.integrations.flashinfer") and not top for n, top in _imports(lazy))
