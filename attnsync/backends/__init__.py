"""Backend registry: a backend name maps to the module that builds its metadata.

A backend module is imported the first time its name is built, never at `import attnsync`.
Each module exposes `build(batch, /, **options) -> metadata dataclass` (numpy only) and may
say which options it takes in its docstring. The dict below is the whole story: no entry
points, no auto-registration.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from types import ModuleType

from .._validate import SpecError

__all__ = ["BACKENDS", "BackendInfo", "available_backends", "backend_info", "backend_module", "backend_table"]

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


# What a backend needs that its signature cannot say: options whose default (None) still
# means "required" (flex also reads `Batch(num_cache_pages=...)`), and the batch order it
# refuses otherwise (checked by its build; `attnsync.reorder` gives decode-first order).
_REQUIRED_WHEN_NONE: dict[str, tuple[str, ...]] = {"flex": ("num_cache_pages",), "mamba": ("chunk_size",)}
_ORDER: dict[str, str] = {
    "flashinfer": "decode-first",
    "mamba": "decode-first (all four regions sorted)",
    "tree": "decode-first",
    "turboquant": "decode-first",
}
_NOTES: dict[str, str] = {
    "flex": "or `Batch(num_cache_pages=...)`",
    "tree": "with decode_threshold = the tree's size",
}


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What `attnsync.build(batch, backend=name, ...)` needs and gives, for one backend.

    Attributes:
        name: the backend's name.
        required_options: options `build` refuses to go without.
        options: every option `build` accepts, in signature order.
        order: the batch order it accepts: ``"any"`` or ``"decode-first ..."``.
        fields: the fields of the metadata it builds, in declaration order.
        metadata: the metadata class's name.
        note: a remark on the above, or ``""``.
    """

    name: str
    required_options: tuple[str, ...]
    options: tuple[str, ...]
    order: str
    fields: tuple[str, ...]
    metadata: str
    note: str = ""


def backend_info(name: str) -> BackendInfo:
    """What backend `name` requires (options, batch order) and what it builds (its fields).

    Imports the backend's module (numpy only; never a framework).

    Example:
        >>> import attnsync
        >>> attnsync.backend_info("triton").required_options
        ('num_q_heads', 'num_kv_heads', 'head_dim')
    """
    module = backend_module(name)
    parameters = [p for p in inspect.signature(module.build).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY]
    required = tuple(p.name for p in parameters if p.default is inspect.Parameter.empty)
    required += _REQUIRED_WHEN_NONE.get(name, ())
    result = inspect.signature(module.build, eval_str=True).return_annotation
    return BackendInfo(
        name=name,
        required_options=required,
        options=tuple(p.name for p in parameters),
        order=_ORDER.get(name, "any"),
        fields=tuple(f.name for f in dataclasses.fields(result)),
        metadata=result.__name__,
        note=_NOTES.get(name, ""),
    )


def missing_options_error(name: str, missing: list[str]) -> SpecError:
    """The error of a `build` call for backend `name` without its required `missing` options."""
    info = backend_info(name)
    example = ", ".join(f"{option}=..." for option in info.required_options)
    return SpecError(
        f"build: backend {name!r} needs the option(s) {missing}; its required options are "
        f"{list(info.required_options)}. Fix: attnsync.build(batch, backend={name!r}, {example}) "
        f"(attnsync.backend_info({name!r}) lists every option)."
    )


def backend_table() -> str:
    """The README's backend table (Markdown), one row per backend from `backend_info`."""
    lines = ["| backend | required options | batch order | metadata (fields) |", "|---|---|---|---|"]
    for name in available_backends():
        info = backend_info(name)
        required = ", ".join(f"`{option}`" for option in info.required_options) or "none"
        if info.note:
            required += f" ({info.note})" if info.required_options else ""
        order = info.order + (f" ({info.note})" if info.note and not info.required_options else "")
        lines.append(f"| `{name}` | {required} | {order} | `{info.metadata}` ({len(info.fields)}) |")
    return "\n".join(lines) + "\n"
