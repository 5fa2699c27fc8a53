"""Whether the compiled twin of attnsync's hot numpy steps is in use (`native`, else None).

`attnsync/_native.c` holds functions that do in one call what a few numpy calls (or Python
steps) do in the builders, the torch lowering and `Batch`:

- `pack`: the lowering's per-field copies;
- `decode_slots`, `decode_rows`: a one-token row's slot (and, for a decode step without
  padding, its computed-token count beside it, in one array);
- `token_slots`, `split_regions`: a batch with any query lengths: every token's row and slot,
  and the decode-first split (rows and tokens per region, decode-first or not);
- `paged_kv_counts`, `gather_pages`: FlashInfer's page offsets, last-page fills and page list
  (`decode_rows` writes all three for a decode step);
- `check_batch`: `Batch`'s copies and length checks of plain int32 input, and the table's
  largest page id found while copying it where the CPU has AVX2 (it only accepts: on anything
  it would refuse it returns None and the numpy checks run and name the problem);
- `lower_step`, `lower_users`: a reused torch lowering's whole step (users count, event
  query, pack, copy, event record, scalar fields) through the CUDA runtime calls torch loaded
  (attnsync.adapters._cudart), in the order the Python step makes them.

On the GPU hosts each numpy call costs 1-2.5 us whatever its size, and a decode step makes a
few dozen (results/2026-11-27-h100/README.md). The numpy forms stay the reference:
tests/test_native.py checks each compiled function against them bit for bit (and `Batch`'s
fields and errors with and without it, and `lower_step` against stand-in CUDA calls), and every
caller keeps its numpy (or Python) path for when this module is missing.

The module is built by `pip install` where a C compiler is present (setup.py marks it optional)
or by `python -m attnsync._native_build` in a source checkout. Set ATTNSYNC_PURE_NUMPY=1 to run
without it.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

# The `VERSION` of attnsync/_native.c this code calls (its functions and their behaviour).
NATIVE_VERSION = 7

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
