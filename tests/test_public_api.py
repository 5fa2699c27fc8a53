"""The public surface of `import attnsync` is small and pinned: changing it is a decision."""

from __future__ import annotations

import re
from pathlib import Path

import attnsync

PUBLIC = ["Batch", "Bucket", "BucketLadder", "CommonMetadata", "SpecError", "available_backends", "backend_info",
          "build", "reorder"]


def test_all_is_pinned():
    assert attnsync.__all__ == PUBLIC


def test_every_public_name_resolves():
    for name in PUBLIC:
        assert getattr(attnsync, name) is not None, name
    assert issubclass(attnsync.SpecError, ValueError)
    assert callable(attnsync.build) and callable(attnsync.reorder)
    assert isinstance(attnsync.Batch, type) and isinstance(attnsync.CommonMetadata, type)


def test_dir_lists_the_public_names_and_version_only():
    assert sorted(dir(attnsync)) == sorted([*PUBLIC, "__version__"])


def test_version_matches_pyproject():
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", attnsync.__version__)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert declared is not None and attnsync.__version__ == declared.group(1)


def test_available_backends():
    names = attnsync.available_backends()
    assert isinstance(names, tuple)
    assert names == tuple(sorted(names))
    assert "common" in names
    assert all(isinstance(name, str) for name in names)
