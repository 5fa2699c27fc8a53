"""`attnsync verify`'s command line: arguments, the SIGTERM stop, printing and `--merge`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterable
from typing import Any

from .. import SpecError
from ..backends import available_backends
from . import runner
from .frameworks import FRAMEWORKS
from .report import Report, format_text, merge_reports, write_report

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnsync verify",
        description="Run the equivalence matrix (every backend x every framework present x a corpus of "
        "batches) and print pass/fail/skip per cell. Exit status: 0 all ran and passed, 1 a failure, "
        "2 bad arguments, 3 stopped early (--time-budget or SIGTERM; the partial report is printed).",
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random corpus batches (default 0)")
    parser.add_argument("--cases", type=int, default=4,
                        help="random batches after the edge cases: N realistic and N small ones (default 4)")
    parser.add_argument("--max-reqs", type=int, default=256, help="most requests in a random batch (default 256)")
    parser.add_argument("--backend", action="append", choices=available_backends(), metavar="NAME",
                        help=f"only this backend (repeatable; default all: {', '.join(available_backends())})")
    parser.add_argument("--framework", action="append", choices=FRAMEWORKS, metavar="NAME",
                        help=f"only this framework (repeatable; default all: {', '.join(FRAMEWORKS)})")
    parser.add_argument("--check", action="append", choices=runner.CHECKS, metavar="NAME",
                        help=f"only this column (repeatable; default all: {', '.join(runner.CHECKS)})")
    parser.add_argument("--case", action="append", metavar="NAME",
                        help="only the corpus batch of this name (repeatable; names are in --json's config)")
    parser.add_argument("--out", metavar="PATH",
                        help="also write the JSON report there (a directory gets attnsync-verify-<date>.json)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no new case after this many seconds (a partial report, marked as stopped)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="run nothing: merge saved JSON reports of disjoint backends (one process "
                        "per backend, say) into one matrix, printed (and written with --out)")
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _print(report: Report, as_json: bool) -> None:
    print(json.dumps(report.to_dict(), indent=1, default=str) if as_json else format_text(report))


def main(argv: Iterable[str] | None = None) -> int:
    """`attnsync verify [--json] [--seed N] [--cases N] [--backend NAME ...] [--framework NAME ...]
    [--max-reqs N] [--out PATH] ...`; returns the exit status: 0 all ran and nothing failed, 1 a
    failure, 2 bad arguments, 3 stopped early (time budget or SIGTERM) without a failure."""
    args = _parser().parse_args(None if argv is None else list(argv))
    if args.merge:
        try:
            parts = []
            for path in args.merge:
                with open(path, encoding="utf-8") as handle:
                    parts.append(Report.from_dict(json.load(handle)))
            report = merge_reports(parts)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"attnsync verify --merge: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        if args.out:
            print(f"attnsync verify: report written to {write_report(report, args.out)}", file=sys.stderr)
        _print(report, args.json)
        return 1 if report.failed else (3 if report.config.get("stopped") else 0)
    if args.cases < 0 or args.max_reqs < 1:
        _parser().error("--cases must be >= 0 and --max-reqs >= 1")
    # `timeout` (the GPU suite's step limit) sends SIGTERM: stop and print what ran so far.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = runner.run_matrix(backends=args.backend, frameworks=args.framework, seed=args.seed,
                                   cases=args.cases, max_reqs=args.max_reqs,
                                   progress=not args.no_progress and not args.json, checks=args.check,
                                   only_cases=args.case, time_budget_s=args.time_budget)
    except SpecError as exc:
        print(f"attnsync verify: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.out:
        print(f"attnsync verify: report written to {write_report(report, args.out)}", file=sys.stderr)
    _print(report, args.json)
    if report.failed:
        return 1
    return 3 if report.config.get("stopped") else 0
