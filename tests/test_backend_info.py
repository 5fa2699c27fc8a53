"""`attnsync.backend_info`: what each backend requires and builds, and the README's table of it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import attnsync
from attnsync.backends import BackendInfo, backend_module, backend_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_backend_info_of_every_backend():
    for name in attnsync.available_backends():
        info = attnsync.backend_info(name)
        assert isinstance(info, BackendInfo) and info.name == name
        assert set(info.required_options) <= set(info.options)
        assert info.order == "any" or info.order.startswith("decode-first")
        cls = getattr(backend_module(name), info.metadata)
        assert info.fields == tuple(f.name for f in dataclasses.fields(cls)) and info.fields
    assert attnsync.backend_info("triton").required_options == ("num_q_heads", "num_kv_heads", "head_dim")
    assert attnsync.backend_info("flex").required_options == ("num_cache_pages",)
    assert attnsync.backend_info("mamba").required_options == ("chunk_size",)
    assert attnsync.backend_info("common").required_options == ()
    assert attnsync.backend_info("mamba").order.startswith("decode-first")
    assert attnsync.backend_info("common").order == "any"
    assert "slot_mapping" in attnsync.backend_info("common").fields


def test_unknown_backend():
    with pytest.raises(attnsync.SpecError, match=r"backend: unknown backend 'nope'; expected one of"):
        attnsync.backend_info("nope")


def test_the_fields_are_what_build_returns():
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[9, 9], block_table=[[3, 5], [7, 8]], block_size=8)
    for name in ("common", "flashinfer", "tree", "turboquant"):
        md = attnsync.build(batch, backend=name)
        assert tuple(f.name for f in dataclasses.fields(md)) == attnsync.backend_info(name).fields


def test_looping_over_every_backend_names_the_backend_and_its_required_options():
    batch = attnsync.Batch(query_lens=[1, 1], seq_lens=[9, 9], block_table=[[3, 5], [7, 8]], block_size=8)
    for name in attnsync.available_backends():
        info = attnsync.backend_info(name)
        if not info.required_options:
            attnsync.build(batch, backend=name)
            continue
        with pytest.raises(attnsync.SpecError) as error:
            attnsync.build(batch, backend=name)
        message = str(error.value)
        assert all(option in message for option in info.required_options), message
        assert f"backend={name!r}" in message and "Fix:" in message, message
    with pytest.raises(attnsync.SpecError, match=r"build: backend 'triton' needs the option\(s\) \['head_dim'\]; "
                                                 r"its required options are \['num_q_heads', 'num_kv_heads', 'head_dim'\]"):
        attnsync.build(batch, backend="triton", num_q_heads=4, num_kv_heads=2)
    md = attnsync.build(batch, backend="triton", num_q_heads=4, num_kv_heads=2, head_dim=64)
    assert md.num_reqs == 2


def test_readme_table_matches_backend_info():
    text = README.read_text()
    found = re.search(r"<!-- backend-table:[^\n]*-->\n(.*?)<!-- backend-table: end -->", text, re.DOTALL)
    assert found is not None, "README.md has no generated backend table"
    assert found.group(1) == backend_table(), "regenerate with attnsync.backends.backend_table()"
    for name in attnsync.available_backends():
        assert f"| `{name}` |" in found.group(1)


def test_backend_info_loads_no_framework():
    code = ("import sys, attnsync\n"
            "for name in attnsync.available_backends(): attnsync.backend_info(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'jaxlib', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_backends_module_surface_is_pinned():
    import attnsync.backends as backends

    assert sorted(backends.__all__) == ["BACKENDS", "BackendInfo", "available_backends", "backend_info",
                                        "backend_module", "backend_table"]
    assert all(getattr(backends, name) is not None for name in backends.__all__)
