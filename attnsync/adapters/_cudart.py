"""The CUDA runtime's copy call for the reused lowering's hot path, made through ctypes.

Why: a reused lowering (`attnsync.adapters.torch._lower_reusing`) issues one host-to-device
copy per step. Through torch (`Tensor.copy_(pinned, non_blocking=True)`: argument parsing,
dispatch, a TensorIterator for a byte copy) it cost 5.2 us of host time on an H100 host, the
`cudaMemcpyAsync` under it called directly 3.8 us, and whole lowerings 2-3.5 us less in a
paired comparison (results/2026-11-27-h100/run26-prof8.json). Event record and query were
measured too and are no cheaper this way than torch's own C methods, so they stay torch's.

The library is the `libcudart` torch itself loaded (found in this process's memory map), and
stream handles are torch's own. Where it cannot be found (a torch linked against the static
runtime, or no Linux memory map), `runtime()` returns None and lowerings use torch's `copy_`:
same values, same ordering, only slower.

Semantics kept from torch's call: the copy is queued on the given stream and returns without
waiting (the source is pinned memory). A failed call clears the runtime's sticky last-error
state (so torch's next kernel-launch check does not report our error as its own) and raises
`RuntimeError` naming the call and CUDA's message.

One difference the caller must handle: torch's pinned allocator does not see these copies, so
it cannot hold a freed pinned buffer back while one is pending (`attnsync.adapters.torch._retire` does).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

_CUDA_MEMCPY_HOST_TO_DEVICE = 1


class Runtime:
    """Bound runtime functions (ctypes, argument types declared once)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        void_p, size_t, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self._memcpy_async = _bind(lib.cudaMemcpyAsync, [void_p, void_p, size_t, c_int, void_p])
        self._get_last_error = _bind(lib.cudaGetLastError, [])
        self._error_string = lib.cudaGetErrorString
        self._error_string.argtypes = [c_int]
        self._error_string.restype = ctypes.c_char_p
        # The addresses of the calls a reused lowering's step makes, for the compiled step
        # (attnsync._native.lower_step), in the order it reads them: copy, event record, event
        # query, current device, clear last error, error string.
        # None where they cannot be had (a runtime without these symbols, a test's stand-in
        # library): lowerings then take the Python step.
        try:
            self.addresses: tuple[int, ...] | None = tuple(
                ctypes.cast(getattr(lib, name), void_p).value
                for name in ("cudaMemcpyAsync", "cudaEventRecord", "cudaEventQuery", "cudaGetDevice",
                             "cudaGetLastError", "cudaGetErrorString")
            )
        except (AttributeError, TypeError, ctypes.ArgumentError):
            self.addresses = None

    def copy_to_device(self, device_ptr: int, host_ptr: int, nbytes: int, stream_ptr: int) -> None:
        """Queue `nbytes` from pinned `host_ptr` to `device_ptr` on the stream; no wait."""
        status = self._memcpy_async(device_ptr, host_ptr, nbytes, _CUDA_MEMCPY_HOST_TO_DEVICE, stream_ptr)
        if status:
            self._fail("cudaMemcpyAsync", status)

    def _fail(self, call: str, status: int) -> None:
        self._get_last_error()  # clear the per-thread error so torch does not report it as its own
        message = self._error_string(status)
        raise RuntimeError(
            f"{call} failed with CUDA error {status} "
            f"({message.decode() if message else 'unknown'}) while lowering attnsync metadata."
        )


def _bind(function: Any, argtypes: list[Any]) -> Any:
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_LOCK = threading.Lock()
_LOADED: list[Runtime] = []  # empty until found (a miss is looked up again: stagers are rare)


def runtime() -> Runtime | None:
    """The runtime torch uses, bound once; None where it cannot be found (torch is used then).

    A CUDA build of torch maps its runtime when imported; a miss is not remembered, so a
    stager made later looks again.
    """
    if _LOADED:
        return _LOADED[0]
    with _LOCK:
        if not _LOADED:
            found = _load()
            if found is None:
                return None
            _LOADED.append(found)
    return _LOADED[0]


def _load() -> Runtime | None:
    path = _loaded_library_path("libcudart.so")
    if path is None:
        return None
    try:
        return Runtime(ctypes.CDLL(path))
    except (OSError, AttributeError):  # not loadable here, or a runtime without these symbols
        return None


def _loaded_library_path(stem: str) -> str | None:
    """Path of an already-loaded shared library whose file name starts with `stem`."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.rsplit("/", 1)[-1].startswith(stem):
                    return path
    except OSError:
        return None
    return None
