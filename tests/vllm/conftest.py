"""The vLLM check's ledger: what was compared against vLLM, and the summary printed at the end.

Tests record every field they compare (`ledger.compare`), every documented convention
difference they meet, and skip with reasons; `pytest_terminal_summary` prints the totals, each
mismatch and each skip. Without vLLM the test modules skip at import and the summary says so.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
import pytest


@dataclasses.dataclass
class Ledger:
    """Counts of one check run; tests add to it, the summary reads it."""

    batches: set[str] = dataclasses.field(default_factory=set)
    fields: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    mismatches: list[str] = dataclasses.field(default_factory=list)
    differences: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def batch(self, name: str) -> None:
        self.batches.add(name)

    def compare(self, topic: str, batch: str, field: str, ours: Any, theirs: Any) -> bool:
        """Compare one field (value, dtype, shape, device for tensors; value otherwise);
        record it, and the mismatch if any. Returns whether they agree."""
        self.batches.add(batch.split(" [")[0])  # one step in several orders is one batch
        self.fields[topic] += 1
        problem = _difference(ours, theirs)
        if problem is not None:
            self.mismatches.append(f"{topic} | {batch} | {field}: {problem}")
        return problem is None

    def documented(self, what: str) -> None:
        """A difference from vLLM that attnsync documents (docs/vllm.md), not a mismatch."""
        self.differences[what] += 1


def _difference(ours: Any, theirs: Any) -> str | None:
    import torch

    if isinstance(ours, torch.Tensor) or isinstance(theirs, torch.Tensor):
        if not (isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor)):
            return f"attnsync {type(ours).__name__}, vLLM {type(theirs).__name__}"
        if ours.dtype != theirs.dtype:
            return f"dtype attnsync {ours.dtype}, vLLM {theirs.dtype}"
        if tuple(ours.shape) != tuple(theirs.shape):
            return f"shape attnsync {tuple(ours.shape)}, vLLM {tuple(theirs.shape)}"
        if ours.device != theirs.device:
            return f"device attnsync {ours.device}, vLLM {theirs.device}"
        if not torch.equal(ours, theirs):
            diff = (ours != theirs).nonzero()
            first = tuple(int(i) for i in diff[0])
            return (f"{len(diff)} values differ, first at {first}: attnsync {ours[first].item()}, "
                    f"vLLM {theirs[first].item()}")
        return None
    if isinstance(ours, np.ndarray) or isinstance(theirs, np.ndarray):
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        if ours.shape != theirs.shape or not np.array_equal(ours, theirs):
            return f"attnsync {ours.tolist()}, vLLM {theirs.tolist()}"
        return None
    if type(ours) is not type(theirs) or ours != theirs:
        return f"attnsync {ours!r} ({type(ours).__name__}), vLLM {theirs!r} ({type(theirs).__name__})"
    return None


_LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return _LEDGER


def _ours(report: Any) -> bool:
    return "tests/vllm/" in str(getattr(report, "nodeid", "")) or "tests/vllm/" in str(getattr(report, "fspath", ""))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    stats = terminalreporter.stats
    skipped = [r for r in stats.get("skipped", []) if _ours(r)]
    ran = [r for key in ("passed", "failed") for r in stats.get(key, []) if _ours(r) and r.when == "call"]
    if not ran and not skipped and not _LEDGER.fields:
        return
    write = terminalreporter.write_line
    terminalreporter.section("attnsync vs vLLM")
    if not ran and not _LEDGER.fields:
        write(f"vLLM checks skipped ({len(skipped)}): {_reason(skipped[0]) if skipped else ''}")
        return
    import vllm

    write(f"vLLM {vllm.__version__}: {len(_LEDGER.batches)} batches compared, "
          f"{sum(_LEDGER.fields.values())} fields compared, {len(_LEDGER.mismatches)} mismatches")
    for topic, count in sorted(_LEDGER.fields.items()):
        write(f"  {topic}: {count} fields")
    for line in _LEDGER.mismatches[:50]:
        write(f"  MISMATCH {line}")
    if _LEDGER.differences:
        write("documented differences from vLLM's conventions (docs/vllm.md), not mismatches:")
        for what, count in sorted(_LEDGER.differences.items()):
            write(f"  {count} x {what}")
    write(f"tests: {len([r for r in ran if r.outcome == 'passed'])} passed, "
          f"{len([r for r in ran if r.outcome == 'failed'])} failed, {len(skipped)} skipped")
    for report in skipped:
        write(f"  SKIP {report.nodeid}: {_reason(report)}")


def _reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)
