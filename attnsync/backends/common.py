"""The ``common`` backend: `CommonMetadata` itself (vLLM's CommonAttentionMetadata).

Options: ``decode_threshold`` (int, default 1), the split threshold.
"""

from __future__ import annotations

from .._batch import Batch
from .._spec import CommonMetadata, build_common


def build(batch: Batch, /, *, decode_threshold: int = 1) -> CommonMetadata:
    """Build the common metadata (host only). See `attnsync.CommonMetadata` for every field."""
    return build_common(batch, decode_threshold=decode_threshold)
