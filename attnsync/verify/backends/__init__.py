"""The verify records of the shipped backends, one module each; importing this registers them.

A new backend adds a module here that calls `attnsync.verify.registry.register` with its
`BackendCheck`, and one import line below.
"""

from __future__ import annotations

from . import common, flashinfer, flex, mamba, tree, triton, turboquant

__all__ = ["common", "flashinfer", "flex", "mamba", "tree", "triton", "turboquant"]
