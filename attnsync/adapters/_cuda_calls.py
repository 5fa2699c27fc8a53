"""The two CUDA calls a reused torch lowering makes every step, without torch's Python layers.

Why this module exists: `bench/compare_commits.py` on an H100 measured a ring stager that
looks up the current stream with `torch.cuda.current_stream(device)` and copies with
`Tensor.copy_(pinned, non_blocking=True)` at well over 1.25x the host time of the earlier
lowering on the FlashInfer 32-decode case (figures in results/), and those two calls were most
of the difference. So a ring stager uses, here and nowhere else:

- `torch._C._cuda_getCurrentStream(index)`, the C lookup under `torch.cuda.current_stream`
  (a tuple, turned into a `torch.cuda.Stream` only when it changes), and
- `cudaMemcpyAsync` of the CUDA runtime torch itself loaded, called through ctypes on torch's
  own stream handle: the copy `copy_` queues, without its argument parsing and dispatch.

Where either cannot be had (a CPU build, a statically linked runtime, no Linux memory map), the
public calls are used: same values, same stream order. Ownership stays the stager's: torch's
pinned allocator does not see these copies, so the stager never frees a pinned buffer whose
copy may be pending (a slot waits for its event before it grows, and a dropped stager's
buffers wait for their events; `attnsync.adapters.torch.Stager`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CurrentStream", "HostToDevice"]

_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice
_stream_key = getattr(torch._C, "_cuda_getCurrentStream", None)  # absent from CPU builds
_current_device = getattr(torch._C, "_cuda_getDevice", None)


class CurrentStream:
    """`current()` -> device `index`'s current `torch.cuda.Stream`, made anew only when it changes."""

    def __init__(self, index: int) -> None:
        self._index = index
        self._key: Any = None
        self._stream: torch.cuda.Stream | None = None

    def current(self) -> torch.cuda.Stream:
        if _stream_key is None:
            return torch.cuda.current_stream(self._index)
        key = _stream_key(self._index)
        if key != self._key:
            self._key, self._stream = key, torch.cuda.current_stream(self._index)
        return self._stream


def _loaded_runtime() -> tuple[Callable[..., int], Callable[[], int]] | None:
    """(`cudaMemcpyAsync`, `cudaGetLastError`) of the libcudart this process mapped, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split(maxsplit=5)[-1].strip() for line in maps if "libcudart.so" in line]
    except OSError:
        return None
    for path in dict.fromkeys(paths):
        try:
            lib = ctypes.CDLL(path)
            copy, last_error = lib.cudaMemcpyAsync, lib.cudaGetLastError
        except (OSError, AttributeError):
            continue
        copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        copy.restype = last_error.restype = ctypes.c_int
        return copy, last_error
    return None


class HostToDevice:
    """`copy(device, pinned, stream)`: one non_blocking copy of `pinned` into `device` on `stream`."""

    def __init__(self, device: torch.device) -> None:
        found = _loaded_runtime() if device.type == "cuda" and _current_device is not None else None
        self._copy, self._last_error = found if found is not None else (None, None)
        self._index = device.index
        self.direct = found is not None

    def __call__(self, device: torch.Tensor, pinned: torch.Tensor, stream: torch.cuda.Stream) -> None:
        # The runtime reads stream handle 0 as the *current* device's default stream, so the
        # direct call is made only with the target device current; otherwise torch's copy_,
        # which sets a device guard itself.
        if self._copy is None or _current_device() != self._index:
            device.copy_(pinned, non_blocking=True)
            return
        status = self._copy(device.data_ptr(), pinned.data_ptr(), device.numel(), _HOST_TO_DEVICE,
                            stream.cuda_stream)
        if status:
            self._last_error()  # clear the sticky error, so torch does not report it as its own
            raise RuntimeError(f"cudaMemcpyAsync failed with CUDA error {status} while lowering attnsync "
                               f"metadata; the copy was not queued.")
