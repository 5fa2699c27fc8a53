"""Helpers of the benchmark scripts whose logic decides a reported target (not their timings)."""

from __future__ import annotations

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
