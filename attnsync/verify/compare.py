"""Exact comparisons that name the field and the first differing index when they fail."""

from __future__ import annotations

from typing import Any

import numpy as np

from .report import Fail

__all__ = ["compare_arrays", "compare_scalar"]


def compare_arrays(name: str, got: Any, want: Any, *, dtype: Any = None) -> None:
    """Raise `Fail` naming `name` and the first differing index unless `got` equals `want`.

    `got` and `want` are numpy arrays (or array-likes); `dtype`, when given, is the dtype `got`
    must have. Floats compare bit for bit except that NaN equals NaN (-inf equals -inf anyway).
    """
    got = np.asarray(got)
    want = np.asarray(want)
    if dtype is not None and got.dtype != np.dtype(dtype):
        raise Fail(f"{name}: dtype {got.dtype}, expected {np.dtype(dtype)}")
    if got.shape != want.shape:
        raise Fail(f"{name}: shape {got.shape}, expected {want.shape}")
    if got.size == 0:
        return
    if got.dtype.kind == "f" or want.dtype.kind == "f":
        g, w = got.astype(np.float64), want.astype(np.float64)
        differ = (g != w) & ~(np.isnan(g) & np.isnan(w))
    else:
        differ = got.astype(np.int64) != want.astype(np.int64)
    if differ.any():
        index = tuple(int(i) for i in np.argwhere(differ)[0])
        where = index[0] if len(index) == 1 else index
        raise Fail(
            f"{name}[{where}]: got {got[index].item()!r}, expected {want[index].item()!r} "
            f"({int(differ.sum())} of {got.size} values differ)"
        )


def compare_scalar(name: str, got: Any, want: Any) -> None:
    """Raise `Fail` unless `got == want` with the same type (any two ints compare as ints)."""
    if type(got) is not type(want) and not (isinstance(got, int) and isinstance(want, int)):
        raise Fail(f"{name}: got {got!r} ({type(got).__name__}), expected {want!r} ({type(want).__name__})")
    if got != want:
        raise Fail(f"{name}: got {got!r}, expected {want!r}")
