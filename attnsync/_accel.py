"""Whether the compiled twin of five hot numpy steps is in use (`native`, else None).

`attnsync/_native.c` holds five functions that do in one call what a few numpy calls do in the
builders, the torch lowering and `Batch`: the lowering's per-field copies (`pack`), a decode
row's slot (`decode_slots`), FlashInfer's page offsets and last-page fills (`paged_kv_counts`)
and page list (`gather_pages`), and `Batch`'s copies and length checks of plain int32 input
(`check_batch`: it only accepts; on anything it would refuse it returns None and the numpy
checks run and name the problem). On the GPU hosts each numpy call costs 1-2.5 us whatever its
size, and a decode step makes a few dozen (results/2026-11-27-h100/README.md). The numpy forms
stay the reference: tests/test_native.py checks each compiled function against them bit for
bit (and `Batch`'s fields and errors with and without it), and every caller keeps its numpy
path for when this module is missing.

The module is built by `pip install` where a C compiler is present (setup.py marks it optional)
or by `python -m attnsync._native_build` in a source checkout. Set ATTNSYNC_PURE_NUMPY=1 to run
without it.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

# The `VERSION` of attnsync/_native.c this code calls (its functions and their behaviour).
NATIVE_VERSION = 2

native: ModuleType | None = None
if os.environ.get("ATTNSYNC_PURE_NUMPY", "0") in ("", "0"):
    try:
        from . import _native as native  # type: ignore[no-redef]
    except ImportError:  # not built here: the numpy forms run
        native = None
    if native is not None and getattr(native, "VERSION", None) != NATIVE_VERSION:
        # A build of an older (or newer) _native.c left in a checkout: same values from numpy,
        # and a word on how to get the compiled steps back.
        warnings.warn(
            f"attnsync._native at {native.__file__} is version {getattr(native, 'VERSION', 1)}, "
            f"this attnsync calls version {NATIVE_VERSION}: using the numpy forms (same values, "
            f"slower). Fix: rebuild it with `python -m attnsync._native_build` or reinstall.",
            RuntimeWarning, stacklevel=2,
        )
        native = None
