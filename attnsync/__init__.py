"""attnsync: LLM-serving attention metadata built once on the host, with zero GPU<->CPU syncs.

    import attnsync
    batch = attnsync.Batch(query_lens=..., seq_lens=..., block_table=..., block_size=16)
    md = attnsync.build(batch, backend="flashinfer")      # numpy only: the plan
    from attnsync.adapters import torch as ast            # the user picks a framework
    tmd = ast.lower(md, device="cuda")                    # one pinned H2D copy, no sync

Importing attnsync imports numpy only; a test proves it.
"""

from __future__ import annotations

from ._batch import Batch as Batch
from ._batch import reorder as reorder
from ._buckets import Bucket as Bucket
from ._buckets import BucketLadder as BucketLadder
from ._build import build as build
from ._spec import CommonMetadata as CommonMetadata
from ._validate import SpecError as SpecError
from .backends import available_backends as available_backends
from .backends import backend_info as backend_info

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Bucket",
    "BucketLadder",
    "CommonMetadata",
    "SpecError",
    "available_backends",
    "backend_info",
    "build",
    "reorder",
]


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
