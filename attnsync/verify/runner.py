"""The matrix runner: every backend x every framework x every check over the corpus."""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import Batch, SpecError, build
from .._corpus import corpus
from ..backends import BACKENDS, available_backends, backend_module
from . import backends as _entries  # noqa: F401 - registers the shipped backends' records
from .checks import check_fake_tensor, check_h2d, check_jax_recompiles, check_stall, check_syncs
from .frameworks import FRAMEWORKS, Framework, environment, prepare_process, probe_frameworks
from .kernels import check_kernel
from .lowering import Case, check_lowered, expected_lower_refusal, lower_case
from .oracles import build_options, check_numpy, exact_twin, expected_build_refusal, prepare_batch, true_seq_lens
from .registry import REGISTRY
from .report import FAIL, PASS, SKIP, CaseResult, Cell, Fail, Report, Skip, error_text

__all__ = ["CHECKS", "run_matrix"]

CHECKS = ("metadata", "kernel", "fake_tensor", "syncs", "stall", "h2d", "jax_recompiles")

Results = dict[tuple[str, str, str], list[CaseResult]]


def _applicable(check: str, framework: str) -> str | None:
    """None when `check` applies to `framework`, else why not."""
    if framework == "numpy":
        return None if check == "metadata" else "n/a: numpy is the host reference (nothing is lowered)"
    if check == "fake_tensor" and framework != "torch-cpu":
        if framework == "torch-cuda":
            return "n/a: CPU-side check (torch-cpu row); on CUDA the syncs/stall/h2d columns apply"
        return "n/a: torch only"
    if check == "jax_recompiles" and not framework.startswith("jax"):
        return "n/a: JAX only"
    if check in ("stall", "h2d") and framework in ("torch-cpu", "jax-cpu"):
        return "n/a: needs CUDA"
    if check == "syncs" and framework == "torch-cpu":
        return "n/a: needs CUDA (see the fake_tensor column)"
    return None


class _NoProgress:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, text: str) -> None: ...
    def close(self) -> None: ...


class _Counter(_NoProgress):
    """A stderr counter: every case on a terminal, about ten lines in a log."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.text = total, 0, ""
        self.tty = sys.stderr.isatty()
        self.every = 1 if self.tty else max(1, total // 10)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every and self.done != self.total:
            return
        if self.tty:
            sys.stderr.write(f"\rattnsync verify: {self.done}/{self.total} {self.text[:60]:<60}")
        else:
            sys.stderr.write(f"attnsync verify: {self.done}/{self.total} ({self.text})\n")
        sys.stderr.flush()

    def set_postfix_str(self, text: str) -> None:
        self.text = text

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar if tqdm is installed, else a simple stderr counter (nothing when disabled)."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="attnsync verify", unit="case", file=sys.stderr, leave=False)
    except ImportError:
        return _Counter(total)


def run_matrix(
    *,
    backends: Sequence[str] | None = None,
    frameworks: Sequence[str] | None = None,
    seed: int = 0,
    cases: int = 4,
    max_reqs: int = 256,
    progress: bool = True,
    checks: Sequence[str] | None = None,
    only_cases: Sequence[str] | None = None,
    time_budget_s: float | None = None,
) -> Report:
    """Run the equivalence matrix on this machine and return the `Report`.

    Args:
        backends: backend names (default: every registered backend).
        frameworks: from `FRAMEWORKS` (default: all; missing ones are skipped with the reason).
        seed: seed of the random corpus batches, the exact-length draws and the kernel inputs.
        cases: random batches after the hand-written edge cases: `cases` realistic ones of up to
            `max_reqs` requests, and `cases` small ones that the kernel check can afford.
        max_reqs: most requests in a random batch.
        progress: show a progress bar (tqdm if installed, else a stderr counter).
        checks: columns to run (default: all of `CHECKS`).
        only_cases: run only the corpus batches of these names (to rerun a failing case).
        time_budget_s: start no new (backend, case) after this many seconds; what did not run
            is left out of the cells and `config["stopped"]` says why. A KeyboardInterrupt
            (or SIGTERM under `main`) stops the run the same way, with a partial report.
    """
    started = time.perf_counter()
    backends = list(dict.fromkeys(backends or available_backends()))
    frameworks = list(dict.fromkeys(frameworks or FRAMEWORKS))
    checks = list(dict.fromkeys(checks or CHECKS))
    for name in backends:
        if name not in BACKENDS:
            raise SpecError(f"backend: unknown backend {name!r}; expected one of {list(available_backends())}.")
    for name in frameworks:
        if name not in FRAMEWORKS:
            raise SpecError(f"framework: unknown framework {name!r}; expected one of {list(FRAMEWORKS)}.")
    for name in checks:
        if name not in CHECKS:
            raise SpecError(f"check: unknown check {name!r}; expected one of {list(CHECKS)}.")
    prepare_process()
    fws = probe_frameworks(frameworks)
    batches = list(corpus(seed=seed, cases=cases, max_reqs=max_reqs, small_cases=cases))
    if only_cases is not None:
        names = [name for name, _ in batches]
        unknown = sorted(set(only_cases) - set(names))
        if unknown:
            raise SpecError(f"case: unknown corpus case(s) {unknown}; this corpus has {names}.")
        batches = [(name, batch) for name, batch in batches if name in set(only_cases)]
    results: Results = collections.defaultdict(list)
    whole: dict[tuple[str, str, str], tuple[str, str]] = {}  # cells decided without running cases
    bar = _progress(len(backends) * len(batches), progress)
    stopped = None
    try:
        for backend in backends:
            if stopped:
                break
            decided = _import_backend(backend)
            if decided is not None:
                for fw in frameworks:
                    for check in checks:
                        whole[(backend, fw, check)] = decided
                bar.update(len(batches))
                continue
            for index, (case_name, raw) in enumerate(batches):
                if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                    stopped = f"time budget of {time_budget_s:g} s reached before {backend}: {case_name}"
                    break
                bar.set_postfix_str(f"{backend}: {case_name}")
                _run_case(backend, index, case_name, raw, fws, checks, seed, results)
                bar.update()
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
    cells = [_aggregate(backend, fw, check, fws[fw], results, whole)
             for backend in backends for fw in frameworks for check in checks]
    config = dict(seed=seed, cases=cases, max_reqs=max_reqs, backends=backends, frameworks=frameworks,
                  checks=checks, corpus=[name for name, _ in batches],
                  options={name: dict(entry.options) for name, entry in REGISTRY.items()})
    if only_cases is not None:
        config["only_cases"] = list(only_cases)
    if stopped:
        config["stopped"] = stopped
    return Report(cells=cells, environment=environment(fws), config=config,
                  elapsed_s=time.perf_counter() - started)


def _import_backend(backend: str) -> tuple[str, str] | None:
    """None when the backend's module imports, else the (status, detail) of all its cells."""
    try:
        backend_module(backend)
    except ModuleNotFoundError as exc:
        if exc.name == BACKENDS[backend]:
            return SKIP, f"module {BACKENDS[backend]} does not exist yet"
        return SKIP, f"import failed ({error_text(exc)})"
    except Exception as exc:
        return FAIL, f"import failed: {error_text(exc)}"
    return None


def _aggregate(backend: str, framework: str, check: str, fw: Framework, results: Results,
               whole: dict[tuple[str, str, str], tuple[str, str]]) -> Cell:
    not_applicable = _applicable(check, framework)
    if not_applicable is not None:
        return Cell(backend, framework, check, SKIP, not_applicable, applicable=False)
    if (backend, framework, check) in whole:
        status, detail = whole[(backend, framework, check)]
        return Cell(backend, framework, check, status, detail)
    if not fw.available:
        return Cell(backend, framework, check, SKIP, fw.detail)
    cases = results.get((backend, framework, check), [])
    failed = [c for c in cases if c.status == FAIL]
    passed = [c for c in cases if c.status == PASS]
    skipped = [c for c in cases if c.status == SKIP]
    if failed:
        first = failed[0]
        detail = f"{len(failed)}/{len(cases)} case(s) failed; first: {first.case!r}: {first.detail}"
        return Cell(backend, framework, check, FAIL, detail, cases=cases)
    if passed:
        detail = f"{len(passed)}/{len(cases)} case(s) passed" + (f", {len(skipped)} skipped" if skipped else "")
        return Cell(backend, framework, check, PASS, detail, cases=cases)
    reasons = collections.Counter(c.reason for c in skipped)
    reason = reasons.most_common(1)[0][0] if reasons else "no case ran"
    return Cell(backend, framework, check, SKIP, reason, cases=cases)


def _record(results: Results, key: tuple[str, str, str], case: str, fn: Callable[[], Any]) -> Any:
    """Run one check of one case and record its outcome; returns fn's value on success."""
    try:
        out = fn()
    except Skip as exc:
        results[key].append(CaseResult(case, SKIP, exc.reason, exc.detail))
        return None
    except Fail as exc:
        results[key].append(CaseResult(case, FAIL, "", str(exc)))
        return None
    except Exception as exc:  # a crash of the code under test is a failure, not a skip
        results[key].append(CaseResult(case, FAIL, "", f"raised {error_text(exc)}"))
        return None
    detail, value = out if isinstance(out, tuple) else (out, None)
    results[key].append(CaseResult(case, PASS, "", detail, value))
    return out


def _run_case(backend: str, index: int, case_name: str, raw: Batch, fws: dict[str, Framework],
              checks: Sequence[str], seed: int, results: Results) -> None:
    batch = prepare_batch(backend, raw)
    options = build_options(backend, batch)
    runnable = [(name, fw) for name, fw in fws.items() if fw.available]

    def everywhere(status: str, reason: str, detail: str) -> None:
        for name, _ in runnable:
            for check in checks:
                if _applicable(check, name) is None:
                    results[(backend, name, check)].append(CaseResult(case_name, status, reason, detail))

    try:
        md = build(batch, backend=backend, **options)
    except SpecError as exc:
        reason = expected_build_refusal(backend, batch, options)
        if reason is not None:
            everywhere(SKIP, f"build refuses the batch: {reason}", error_text(exc))
        else:
            everywhere(FAIL, "", f"unexpected refusal by build: {error_text(exc)}")
        return
    except Exception as exc:
        everywhere(FAIL, "", f"build raised {error_text(exc)}")
        return
    rng = np.random.default_rng([seed, index])
    lengths = true_seq_lens(batch, rng)
    twin_md = None
    if getattr(md, "slot_mapping_exact", True) is False or not batch.seq_lens_exact.all():
        try:
            twin_md = build(exact_twin(batch, lengths), backend=backend, **options)
        except Exception as exc:
            everywhere(FAIL, "", f"build of the exact twin batch raised {error_text(exc)}")
            return
    case = Case(case_name, index, backend, batch, options, md, lengths, twin_md, seed * 100_003 + index)
    for name, fw in runnable:
        _run_framework(case, name, fw, checks, results)


def _run_framework(case: Case, name: str, fw: Framework, checks: Sequence[str], results: Results) -> None:
    """Every applicable check of one case on one framework."""
    wanted = [check for check in checks if _applicable(check, name) is None]
    backend, md = case.backend, case.md
    if name == "numpy":
        if "metadata" in wanted:
            _record(results, (backend, name, "metadata"), case.name, lambda: check_numpy(backend, case.batch, md))
        return
    try:
        lowered, overrides, scalars = lower_case(case, fw)
    except SpecError as exc:
        refusal = expected_lower_refusal(name, md)
        for check in wanted:
            if refusal is not None:
                outcome = CaseResult(case.name, SKIP, f"lowering refuses the batch: {refusal}", error_text(exc))
            else:
                outcome = CaseResult(case.name, FAIL, "", f"unexpected refusal by lower: {error_text(exc)}")
            results[(backend, name, check)].append(outcome)
        return
    except Exception as exc:
        for check in wanted:
            results[(backend, name, check)].append(CaseResult(case.name, FAIL, "", f"lower raised {error_text(exc)}"))
        return
    runs = {
        "metadata": lambda: check_lowered(backend, fw, md, lowered, overrides=overrides, scalar_overrides=scalars),
        "kernel": lambda: check_kernel(case, fw, lowered),
        "fake_tensor": lambda: check_fake_tensor(case, fw),
        "syncs": lambda: check_syncs(case, fw),
        "stall": lambda: check_stall(case, fw),
        "h2d": lambda: check_h2d(case, fw),
        "jax_recompiles": lambda: check_jax_recompiles(case, fw),
    }
    for check in CHECKS:  # the columns' order: the syncs check warms the stall probe's step up
        if check in wanted:
            _record(results, (backend, name, check), case.name, runs[check])
