"""Which frameworks this process can lower to, and the versions of what is installed.

`probe_frameworks` is the one probe: `attnsync verify` runs its matrix rows from it and
`attnsync demo` lowers to what it finds. Frameworks are imported only when a name asks for
them (``torch-*`` imports torch, ``jax-*`` imports JAX), never at import of this module.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import __version__
from .report import error_text

__all__ = ["FRAMEWORKS", "Framework", "environment", "installed_version", "prepare_process", "probe_frameworks"]

FRAMEWORKS = ("numpy", "torch-cpu", "torch-cuda", "jax-cpu", "jax-gpu")

# Distribution names whose version differs from the module name.
_DISTRIBUTIONS = {"flashinfer": "flashinfer-python"}


@dataclasses.dataclass
class Framework:
    """One lowering target: whether it runs here, its version (or why not) and its device."""

    name: str
    available: bool
    detail: str  # version when available, reason otherwise
    device: Any = None  # torch.device or jax.Device; None for numpy and unavailable targets


def prepare_process() -> None:
    """Environment that must be set before the kernels' frameworks are imported."""
    _quiet_jax_memory()
    try:
        import torch
    except Exception:
        return
    if not torch.cuda.is_available():
        # Without CUDA the Triton kernels run through the interpreter, which is read when the
        # kernels are decorated, i.e. before attnsync.kernels.triton_attention is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _quiet_jax_memory() -> None:
    # JAX would otherwise reserve most of the GPU's memory at import, next to torch in this process.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def probe_frameworks(wanted: Sequence[str]) -> dict[str, Framework]:
    """Which of `wanted` (names from `FRAMEWORKS`) this process can run, with versions or reasons."""
    out = {"numpy": Framework("numpy", True, f"numpy {np.__version__}")}
    if any(name.startswith("torch") for name in wanted):
        out.update(_probe_torch())
    if any(name.startswith("jax") for name in wanted):
        out.update(_probe_jax())
    return {name: out[name] for name in wanted}


def _probe_torch() -> dict[str, Framework]:
    try:
        import torch

        importlib.import_module("attnsync.adapters.torch")
    except Exception as exc:
        reason = f"torch is not importable ({error_text(exc)}); install attnsync[torch]"
        return {name: Framework(name, False, reason) for name in ("torch-cpu", "torch-cuda")}
    version = f"torch {torch.__version__}"
    out = {"torch-cpu": Framework("torch-cpu", True, version, torch.device("cpu"))}
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        out["torch-cuda"] = Framework("torch-cuda", True, f"{version} on {torch.cuda.get_device_name(device)}", device)
    else:
        why = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        out["torch-cuda"] = Framework("torch-cuda", False, f"no CUDA: {version} is {why}")
    return out


def _probe_jax() -> dict[str, Framework]:
    _quiet_jax_memory()
    try:
        import jax

        importlib.import_module("attnsync.adapters.jax")
    except Exception as exc:
        reason = f"jax is not importable ({error_text(exc)}); install attnsync[jax]"
        return {name: Framework(name, False, reason) for name in ("jax-cpu", "jax-gpu")}
    out = {}
    for name, platform_name in (("jax-cpu", "cpu"), ("jax-gpu", "gpu")):
        try:
            device = jax.devices(platform_name)[0]
        except RuntimeError:
            reason = f"jax {jax.__version__} has no {platform_name.upper()} platform"
            if platform_name == "gpu":
                reason += " (install attnsync[jax-cuda12] or attnsync[jax-cuda13] on a GPU host)"
            out[name] = Framework(name, False, reason)
        else:
            out[name] = Framework(name, True, f"jax {jax.__version__} on {device}", device)
    return out


def installed_version(module: str) -> str | None:
    """The version of `module`: its ``__version__`` when imported, else the installed
    distribution's (read without importing it); None when it is not installed."""
    mod = sys.modules.get(module)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        from importlib import metadata

        return metadata.version(_DISTRIBUTIONS.get(module, module))
    except Exception:
        return None


def environment(frameworks: dict[str, Framework]) -> dict[str, Any]:
    """Versions, card and date of this run (for reports kept next to GPU results)."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "attnsync": __version__,
        "numpy": np.__version__,
    }
    for module in ("torch", "jax", "jaxlib", "triton", "flashinfer", "hypothesis"):
        env[module] = installed_version(module)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["card"] = None
    env["frameworks"] = {name: {"available": fw.available, "detail": fw.detail} for name, fw in frameworks.items()}
    return env
