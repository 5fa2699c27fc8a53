"""One prepared case, its lowering to a framework and the metadata column's comparison."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import Batch
from .._spec import array_fields, scalar_fields
from .compare import compare_arrays, compare_scalar
from .frameworks import Framework
from .registry import BackendCheck, backend_check
from .report import Fail

__all__ = ["Case", "check_lowered", "device_lengths", "expected_lower_refusal", "lower", "lower_case",
           "torch_lower"]


@dataclasses.dataclass
class Case:
    """A corpus batch prepared for one backend, built, with its exact twin when inexact."""

    name: str
    index: int
    backend: str
    batch: Batch
    options: dict[str, Any]
    md: Any
    lengths: np.ndarray  # exact lengths (a draw below the bound for inexact rows), [R]
    twin_md: Any  # metadata of the exact twin batch, or None when the batch is exact
    seed: int

    @property
    def inexact(self) -> bool:
        return getattr(self.md, "slot_mapping_exact", True) is False

    @property
    def check(self) -> BackendCheck:
        """The backend's registry record."""
        return backend_check(self.backend)


def expected_lower_refusal(framework: str, md: Any) -> str | None:
    """Why the `framework` adapter documents refusing `md`, or None."""
    if framework.startswith("jax") and getattr(md, "slot_mapping_exact", True) is False:
        return ("the JAX adapter lowers exact batches only: it has no device-length recompute "
                "(attnsync.adapters.jax)")
    return None


def torch_lower(backend: str) -> Callable[..., Any]:
    """The torch lowering of `backend`: its record's, else the torch adapter's `lower`."""
    own = backend_check(backend).torch_lower
    if own is not None:
        return own
    from ..adapters import torch as torch_adapter

    return torch_adapter.lower


def lower(backend: str, fw: Framework, md: Any, seq_lens: Any = None) -> Any:
    """Lower `md` to `fw` (torch: with exact device lengths when given)."""
    if fw.name.startswith("torch"):
        return torch_lower(backend)(md, fw.device, seq_lens=seq_lens)
    from ..adapters import jax as jax_adapter

    return jax_adapter.lower(md, fw.device)


def device_lengths(fw: Framework, lengths: np.ndarray) -> Any:
    """`lengths` as an int32 torch tensor on `fw`'s device."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int32)).to(fw.device)


def lower_case(case: Case, fw: Framework) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """Lower a case to `fw`; (lowered, field overrides, scalar overrides) for the comparison."""
    check = case.check
    if fw.name.startswith("torch") and case.inexact:
        lowered = lower(case.backend, fw, case.md, device_lengths(fw, case.lengths))
        overrides = {name: getattr(case.twin_md, name) for name in check.device_recomputed if hasattr(case.md, name)}
        overrides.update(_device_built(check, case.twin_md))
        return lowered, overrides, dict(check.scalar_overrides)
    if fw.name.startswith("torch"):
        return lower(case.backend, fw, case.md), _device_built(check, case.md), {}
    return lower(case.backend, fw, case.md), {}, {}


def _device_built(check: BackendCheck, md: Any) -> dict[str, np.ndarray]:
    return {} if check.device_built is None else check.device_built(md)


# The torch adapter's documented dtypes where they differ from the numpy metadata's.
_TORCH_WIDER = {"slot_mapping": np.int64}


def check_lowered(backend: str, fw: Framework, md: Any, lowered: Any, *,
                  overrides: dict[str, np.ndarray] | None = None,
                  scalar_overrides: dict[str, Any] | None = None) -> str:
    """Compare every lowered field with `md` (or `overrides` for device-recomputed fields)."""
    overrides = overrides or {}
    scalar_overrides = scalar_overrides or {}
    count = 0
    if fw.name.startswith("torch"):
        import torch

        for f in array_fields(md):
            place = f.metadata["place"]
            value = getattr(md, f.name)
            if place in ("device", "both"):
                name = f.metadata["device_name"] or f.name
                tensor = _attr(lowered, name)
                if not isinstance(tensor, torch.Tensor):
                    raise Fail(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
                if tensor.device.type != fw.device.type:
                    raise Fail(f"{name}: on {tensor.device}, expected {fw.device}")
                want = overrides.get(f.name, value)
                compare_arrays(name, tensor.detach().cpu().numpy(), want,
                               dtype=_TORCH_WIDER.get(f.name, value.dtype))
                count += 1
            if place in ("host", "both"):
                name = f.metadata["host_name"] or (f.name if place == "host" else f"{f.name}_cpu")
                tensor = _attr(lowered, name)
                if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                    raise Fail(f"{name}: expected a CPU torch.Tensor (host mirror), got {_describe(tensor)}")
                compare_arrays(name, tensor.numpy(), value, dtype=value.dtype)
                count += 1
    else:
        import jax

        for f in array_fields(md):
            if f.metadata["place"] not in ("device", "both"):
                continue
            value = getattr(md, f.name)
            leaf = _attr(lowered, f.name)
            if not isinstance(leaf, jax.Array):
                raise Fail(f"{f.name}: expected a jax.Array, got {type(leaf).__name__}")
            if leaf.devices() != {fw.device}:
                raise Fail(f"{f.name}: on {sorted(map(str, leaf.devices()))}, expected {fw.device}")
            dtype = np.float32 if value.dtype == np.float32 else np.int32
            compare_arrays(f.name, np.asarray(leaf), overrides.get(f.name, value), dtype=dtype)
            count += 1
    for f in scalar_fields(md):
        compare_scalar(f.name, _attr(lowered, f.name), scalar_overrides.get(f.name, getattr(md, f.name)))
        count += 1
    return f"{count} fields equal"


def _attr(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        raise Fail(f"{name}: missing from the lowered {type(obj).__name__}")
    return getattr(obj, name)


def _describe(value: Any) -> str:
    device = getattr(value, "device", None)
    return f"{type(value).__name__}" + (f" on {device}" if device is not None else "")
