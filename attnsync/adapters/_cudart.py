"""Three CUDA runtime calls for the reused lowering's hot path, made through ctypes.

Why: a reused lowering (`attnsync.adapters.torch._lower_reusing`) issues one host-to-device
copy and one event record per step, and queries that event before repacking. Through torch
these cost 6.3 us (`Tensor.copy_(pinned, non_blocking=True)`, argument parsing, dispatch and
a TensorIterator for a byte copy) and 2-8 us (`Event.record`) of host time on the H100 host,
where one whole FlashInfer lowering of 32 decodes took 24.7 us
(results/2026-11-27-h100/run24-prof6.json). The runtime functions under them are what
remains when called directly: `cudaMemcpyAsync`, `cudaEventRecord`, `cudaEventQuery`.

The library is the `libcudart` torch itself loaded (found in this process's memory map), so
stream and event handles are torch's own. Where it cannot be found (a torch linked against
the static runtime, or no Linux memory map), `runtime()` returns None and lowerings go
through torch as before: same values, same ordering, only slower.

Semantics kept from the torch calls: the copy is queued on the given stream and returns
without waiting (the source is pinned memory); a failed call clears the runtime's sticky
last-error state (so torch's next kernel-launch check does not report our error as its own)
and raises `RuntimeError` naming the call and CUDA's message.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

_CUDA_MEMCPY_HOST_TO_DEVICE = 1
_CUDA_SUCCESS = 0
_CUDA_ERROR_NOT_READY = 600


class Runtime:
    """Bound runtime functions (ctypes, argument types declared once)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        void_p, size_t, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self._memcpy_async = _bind(lib.cudaMemcpyAsync, [void_p, void_p, size_t, c_int, void_p])
        self._event_record = _bind(lib.cudaEventRecord, [void_p, void_p])
        self._event_query = _bind(lib.cudaEventQuery, [void_p])
        self._get_last_error = _bind(lib.cudaGetLastError, [])
        self._error_string = lib.cudaGetErrorString
        self._error_string.argtypes = [c_int]
        self._error_string.restype = ctypes.c_char_p

    def copy_to_device(self, device_ptr: int, host_ptr: int, nbytes: int, stream_ptr: int) -> None:
        """Queue `nbytes` from pinned `host_ptr` to `device_ptr` on the stream; no wait."""
        status = self._memcpy_async(device_ptr, host_ptr, nbytes, _CUDA_MEMCPY_HOST_TO_DEVICE, stream_ptr)
        if status:
            self._fail("cudaMemcpyAsync", status)

    def record(self, event_ptr: int, stream_ptr: int) -> None:
        """Record the event on the stream (after everything queued on it so far)."""
        status = self._event_record(event_ptr, stream_ptr)
        if status:
            self._fail("cudaEventRecord", status)

    def is_done(self, event_ptr: int) -> bool:
        """Whether the work before the event's last record has completed (never waits)."""
        status = self._event_query(event_ptr)
        if status == _CUDA_SUCCESS:
            return True
        if status == _CUDA_ERROR_NOT_READY:
            return False
        self._fail("cudaEventQuery", status)
        return False  # unreachable: _fail raises

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
_LOADED: list[Runtime | None] = []  # empty until the first lookup, then [runtime or None]


def runtime() -> Runtime | None:
    """The runtime torch uses, bound once; None where it cannot be found (torch is used then).

    Call only after torch has initialised CUDA (a stager's first buffer does): before that the
    library may not be loaded yet.
    """
    if _LOADED:
        return _LOADED[0]
    with _LOCK:
        if not _LOADED:
            _LOADED.append(_load())
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
