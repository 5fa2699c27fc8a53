"""The report model of `attnsync verify`: case outcomes, cells, the report, merging and printing."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from .. import SpecError, __version__
from ..backends import BACKENDS

__all__ = [
    "FAIL", "PASS", "SKIP", "CaseResult", "Cell", "Fail", "Report", "Skip", "error_text", "format_text",
    "merge_reports", "write_report",
]

PASS, FAIL, SKIP = "pass", "fail", "skip"


class Skip(Exception):
    """A case that cannot run here: `reason` (groupable across cases) and `detail` (specific)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class Fail(Exception):
    """A failed check; the message names the field and index where it applies."""


def error_text(exc: BaseException) -> str:
    """The first line of `exc` with its type, at most 300 characters (for cell details)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


@dataclasses.dataclass
class CaseResult:
    """One check of one corpus case: status, a short reason (skips) and details."""

    case: str
    status: str
    reason: str = ""
    detail: str = ""
    value: Any = None


@dataclasses.dataclass
class Cell:
    """One (backend, framework, check) cell of the matrix, aggregated over the corpus."""

    backend: str
    framework: str
    check: str
    status: str
    detail: str
    applicable: bool = True
    cases: list[CaseResult] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.framework}/{self.check}"


@dataclasses.dataclass
class Report:
    """What `run_matrix` found: the cells, the environment and the run's configuration."""

    cells: list[Cell]
    environment: dict[str, Any]
    config: dict[str, Any]
    elapsed_s: float = 0.0

    @property
    def failed(self) -> bool:
        """True when any cell failed."""
        return any(cell.status == FAIL for cell in self.cells)

    @property
    def summary(self) -> dict[str, int]:
        """Cells per status (not-applicable cells counted apart)."""
        counts = collections.Counter(cell.status if cell.applicable else "n/a" for cell in self.cells)
        return {key: counts.get(key, 0) for key in (PASS, FAIL, SKIP, "n/a")}

    def cell(self, backend: str, framework: str, check: str) -> Cell:
        """The cell of `backend` x `framework` x `check`."""
        for cell in self.cells:
            if (cell.backend, cell.framework, cell.check) == (backend, framework, check):
                return cell
        raise KeyError((backend, framework, check))

    def to_dict(self) -> dict[str, Any]:
        """The whole report as JSON-able data."""
        return {
            "attnsync": __version__,
            "environment": self.environment,
            "config": self.config,
            "elapsed_s": round(self.elapsed_s, 3),
            "summary": self.summary,
            "failed": self.failed,
            "cells": [
                {**{k: v for k, v in dataclasses.asdict(cell).items() if k != "cases"},
                 "cases": [dataclasses.asdict(c) for c in cell.cases]}
                for cell in self.cells
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report `to_dict` wrote (for example a saved `--out` file)."""
        cells = [
            Cell(**{k: v for k, v in cell.items() if k != "cases"},
                 cases=[CaseResult(**case) for case in cell.get("cases", [])])
            for cell in data["cells"]
        ]
        return cls(cells=cells, environment=data["environment"], config=data["config"],
                   elapsed_s=float(data.get("elapsed_s", 0.0)))


def merge_reports(reports: Sequence[Report]) -> Report:
    """One report from runs over disjoint sets of backends (one process per backend, say).

    The runs must share the corpus (seed, cases, request limit), frameworks and checks; a
    backend in two runs, or differing settings, raise `SpecError`. The merged run's time is
    the longest of the parts (they ran side by side); it is stopped early if any part was.
    """
    if not reports:
        raise SpecError("merge: expected at least one report.")
    first = reports[0].config
    same = ("seed", "cases", "max_reqs", "frameworks", "checks")
    backends: list[str] = []
    for report in reports:
        differs = [key for key in same if report.config.get(key) != first.get(key)]
        if differs:
            raise SpecError(f"merge: the reports differ in {differs}; merge only runs of the same corpus and columns.")
        twice = sorted(set(backends) & set(report.config["backends"]))
        if twice:
            raise SpecError(f"merge: backend(s) {twice} appear in two reports; run each backend once.")
        backends.extend(report.config["backends"])
    order = [b for b in BACKENDS if b in backends] + [b for b in backends if b not in BACKENDS]
    stopped = "; ".join(r.config["stopped"] for r in reports if r.config.get("stopped"))
    config = {**first, "backends": order, "merged_from": len(reports)}
    config.pop("stopped", None)
    if stopped:
        config["stopped"] = stopped
    cells = [cell for backend in order for report in reports for cell in report.cells if cell.backend == backend]
    return Report(cells=cells, environment=reports[0].environment, config=config,
                  elapsed_s=max(r.elapsed_s for r in reports))


def write_report(report: Report, path: str) -> str:
    """Write the JSON report to `path` (a directory, or a path ending in '/', gets a dated name)."""
    if path.endswith(os.sep) or os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        stamp = report.environment["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
        path = os.path.join(path, f"attnsync-verify-{stamp}.json")
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report.to_dict(), handle, indent=1, default=str)
        handle.write("\n")
    return path


_MARK = {PASS: "PASS", FAIL: "FAIL", SKIP: "SKIP"}


def _version(env: dict[str, Any], name: str) -> str:
    # None: the package is not installed (older reports also wrote None for "not imported").
    return env.get(name) or "not installed"


def format_text(report: Report, *, max_cases: int = 3) -> str:
    """The matrix as a compact table, then failures and skips with their reasons."""
    cfg, env = report.config, report.environment
    lines = [
        f"attnsync {__version__} verify: seed {cfg['seed']}, {len(cfg['corpus'])} batches "
        f"({cfg['cases']} + {cfg['cases']} small random, max {cfg['max_reqs']} requests), {len(cfg['backends'])} backend(s) x "
        f"{len(cfg['frameworks'])} framework(s); {report.elapsed_s:.1f} s",
        f"date {env['date']}, python {env['python']}, numpy {env['numpy']}, torch {_version(env, 'torch')}, "
        f"jax {_version(env, 'jax')}, triton {_version(env, 'triton')}, flashinfer {_version(env, 'flashinfer')}, "
        f"card {env.get('card') or 'none'}",
        "",
    ]
    header = ["backend", "framework", *cfg["checks"]]
    rows = []
    for backend in cfg["backends"]:
        for fw in cfg["frameworks"]:
            row = [backend, fw]
            for check in cfg["checks"]:
                cell = report.cell(backend, fw, check)
                row.append("n/a" if not cell.applicable else _MARK[cell.status])
            rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    summary = report.summary
    if cfg.get("stopped"):
        lines += ["", f"STOPPED EARLY ({cfg['stopped']}): cells cover only the cases that ran"]
    lines += ["", f"{summary[PASS]} passed, {summary[FAIL]} failed, {summary[SKIP]} skipped, "
                  f"{summary['n/a']} not applicable (n/a: reasons in --json)"]
    failed = [c for c in report.cells if c.status == FAIL]
    if failed:
        lines += ["", "failures:"]
        for cell in failed:
            lines.append(f"  FAIL {cell.name}: {cell.detail if not cell.cases else ''}".rstrip())
            bad = [c for c in cell.cases if c.status == FAIL]
            for c in bad[:max_cases]:
                lines.append(f"       case {c.case!r}: {c.detail}")
            if len(bad) > max_cases:
                lines.append(f"       ... and {len(bad) - max_cases} more case(s)")
    skipped = collections.defaultdict(list)
    for cell in report.cells:
        if cell.applicable and cell.status == SKIP:
            skipped[cell.detail].append(cell.name)
    if skipped:
        lines += ["", "skipped cells:"]
        for reason, names in skipped.items():
            lines.append(f"  SKIP {reason}")
            lines.append(f"       {_compact(names)}")
    partial = collections.defaultdict(set)
    for cell in report.cells:
        if cell.status == PASS:
            for c in cell.cases:
                if c.status == SKIP:
                    partial[c.reason].add((cell.name, c.case))
    if partial:
        lines += ["", "skipped cases inside passing cells:"]
        for reason, items in partial.items():
            names = sorted({name for name, _ in items})
            case_names = sorted({case for _, case in items})
            lines.append(f"  {reason}")
            lines.append(f"       {len(items)} case(s) of {_compact(names)}; cases: {_compact(case_names, 6)}")
    return "\n".join(lines)


def _compact(names: Sequence[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
