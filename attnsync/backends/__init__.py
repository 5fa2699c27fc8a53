"""Backend registry: a backend name maps to the module that builds its metadata.

A backend module is imported the first time its name is built, never at `import attnsync`.
Each module exposes `build(batch, /, **options) -> metadata dataclass` (numpy only) and may
say which options it takes in its docstring. The dict below is the whole story: no entry
points, no auto-registration.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .._validate import SpecError

BACKENDS: dict[str, str] = {
    "common": "attnsync.backends.common",
    "flashinfer": "attnsync.backends.flashinfer",
    "flex": "attnsync.backends.flex",
    "mamba": "attnsync.backends.mamba",
    "tree": "attnsync.backends.tree",
    "triton": "attnsync.backends.triton",
    "turboquant": "attnsync.backends.turboquant",
}


def available_backends() -> tuple[str, ...]:
    """Names accepted by `attnsync.build`, sorted."""
    return tuple(sorted(BACKENDS))


def backend_module(name: object) -> ModuleType:
    """Import and return the module of backend `name`; an unknown name lists the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a name such as 'common', received {type(name).__name__}.")
    try:
        path = BACKENDS[name]
    except KeyError:
        raise SpecError(
            f"backend: unknown backend {name!r}; expected one of {list(available_backends())}."
        ) from None
    return importlib.import_module(path)
