"""Helpers of the benchmark scripts whose logic decides a reported target (not their timings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_flex  # noqa: E402


def test_paired_ratio_alternates_blocks_and_takes_the_median_of_per_round_ratios(monkeypatch):
    calls = []
    host_ms = {"top": iter([4.0, 9.0, 5.0, 30.0]), "bottom": iter([2.0, 3.0, 1.0, 10.0])}

    def fake_measure(fn, device, iters, warmup=None):
        side = fn()
        calls.append(side)
        assert (iters, warmup) == (3, 2)  # every block warm, then timed
        return {"host_ms": next(host_ms[side]), "step_ms": 0.0}

    monkeypatch.setattr(bench_flex, "measure", fake_measure)
    result = bench_flex.paired_ratio(lambda: "top", lambda: "bottom", "cpu", rounds=4, calls=3, warmup=2)
    # round 0: top first; round 1: bottom first; and so on
    assert calls == ["top", "bottom", "bottom", "top", "top", "bottom", "bottom", "top"]
    # per-round ratios 2, 3, 5, 3 -> median 3; medians of each side over the rounds
    assert result["ratio"] == 3.0
    assert result["numerator_host_ms"] == 7.0 and result["denominator_host_ms"] == 2.5


def test_bench_native_times_both_modes_and_restores_the_module(tmp_path, monkeypatch):
    import bench_native

    from attnsync import _accel

    if _accel.native is None:
        pytest.skip("attnsync._native is not in use here (not built, or ATTNSYNC_PURE_NUMPY set)")
    module = _accel.native
    seen = set()
    real_block = bench_native.block

    def spying_block(fn, drain, *, calls, warmup=5):
        seen.add(_accel.native is module)
        return real_block(fn, drain, calls=2, warmup=1)  # a smoke run: the logic, not the timings

    monkeypatch.setattr(bench_native, "block", spying_block)
    assert bench_native.main(["--out", str(tmp_path), "--quick"]) == 0
    report = json.loads((tmp_path / "bench_native.json").read_text())
    assert _accel.native is module, "the compiled module is back in use after the run"
    assert seen == {True, False}, "both modes were timed"
    assert report["status"] == "ok" and len(report["results"]) == 6
    for row in report["results"].values():
        assert row["native_us"] > 0 and row["numpy_us"] > 0 and row["numpy_over_native"] > 0


def test_bench_common_side_by_side_alternates_warm_blocks_with_the_probe():
    import bench_common

    calls, drains = [], []
    result = bench_common.side_by_side({"probe": lambda: calls.append("probe"),
                                        "target": lambda: calls.append("target")},
                                       lambda: drains.append(1), rounds=3, calls=2)
    block = 3 + 2  # warm calls, then timed ones
    assert calls == (["probe"] * block + ["target"] * block + ["target"] * block + ["probe"] * block
                     + ["probe"] * block + ["target"] * block)
    assert len(drains) == 3 * 2 * 2  # before every timed call only
    assert set(result) == {"probe", "target"} and all(value >= 0 for value in result.values())


def test_bench_common_reports_the_target_next_to_the_probe(tmp_path):
    import bench_common

    assert bench_common.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_common.json").read_text())
    probed = report["target_all_decode"]["side_by_side_with_probe_us"]
    assert set(probed) == {"numpy add, 256 int32", "build+torch", "build+torch, table in numpy memory",
                           "batch+build+torch", "batch+build+torch, table in numpy memory"}
    assert all(value > 0 for value in probed.values())
    # no CUDA stager here, so no pinned table memory: the report says so instead of claiming a pinned table
    assert report["target_all_decode"]["table_in_pinned_block"] is None
