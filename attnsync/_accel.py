"""Whether the compiled twin of attnsync's hot numpy steps is in use (`native`, else None).

`attnsync/_native.c` holds functions that do in one call what a few numpy calls do:

- the field derivations of attnsync/_fields.py, each chosen inside the function of the field it
  computes (one test of `native` there; the numpy form below it is the reference):
  `slot_mapping`, `token_to_req`, `region_split` (the decode-first split), and FlashInfer's
  `paged_kv_indptr`, `paged_kv_last_page_len` and `paged_kv_indices`;
- `check_batch`: `Batch`'s copies and length checks of plain int32 input, and the table's
  largest page id found while copying it where the CPU has AVX2 (it only accepts: on anything
  it would refuse it returns None and the numpy checks run and name the problem);
- `pack`: the torch lowering's per-field copies.

Each numpy call has a fixed overhead whatever its size, and a decode step would make a few
dozen. The numpy forms stay the reference: tests/test_native.py checks each compiled function
against them bit for bit (and `Batch`'s fields and errors with and without it), and every
caller keeps its numpy path for when this module is missing.

The module is built by `pip install` where a C compiler is present (setup.py marks it optional)
or by `python -m attnsync._native_build` in a source checkout. Set ATTNSYNC_PURE_NUMPY=1 to run
without it.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

# The `VERSION` of attnsync/_native.c this code calls (its functions and their behaviour).
NATIVE_VERSION = 8

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
