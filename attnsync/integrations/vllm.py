"""vLLM interop: attnsync batches from vLLM's host state, and vLLM's field names back.

Into attnsync:

- `batch_from_vllm`: an `attnsync.Batch` from vLLM's `CommonAttentionMetadata`, reading host
  fields only (the block table comes from the runner's host copy);
- `batch_from_vllm_state`: the same from the per-request host arrays vLLM's runner keeps
  (tokens scheduled this step, tokens already computed, prompt lengths, the host block table).

Back to vLLM:

- `to_vllm_common`: a torch lowering (`attnsync.adapters.torch.lower`) as vLLM's own
  `CommonAttentionMetadata` when vLLM is importable, else `vllm_common_fields`'s dict;
- `vllm_split` and `vllm_split_with_extends`: the decode/prefill counts vLLM's
  `split_decodes_and_prefills` and `split_decodes_prefills_and_extends` return for the same
  step, from host arrays only (vLLM's functions read the split off row positions and count
  padded rows in the last group; attnsync's own `num_decodes`, `num_extends` and
  `num_prefills` count the real rows of each kind);
- `vllm_reorder`: the row order vLLM's `reorder_batch_to_split_decodes_and_prefills` gives
  (its regions and its swaps, which differ from `attnsync.reorder`: see docs/vllm.md).

Importing this module imports torch (vLLM's metadata holds torch tensors); it imports vLLM only
inside `to_vllm_common`, so it works without vLLM: any object with `CommonAttentionMetadata`'s
attribute names is accepted. docs/vllm.md has the field mapping and the backend registration.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._batch import Batch
from .._validate import SpecError, as_int

__all__ = [
    "VLLM_COMMON_FIELDS",
    "batch_from_vllm",
    "batch_from_vllm_state",
    "to_vllm_common",
    "uses_async_spec_decode",
    "vllm_common_fields",
    "vllm_regions",
    "vllm_reorder",
    "vllm_split",
    "vllm_split_with_extends",
]

# vLLM's CommonAttentionMetadata field -> (lowered attnsync names that may carry it, in order
# of preference; dtype; where it lives). Backends name a few fields differently (the FlashInfer
# lowering's host lengths are `seq_lens_cpu`, the Triton and Flex lowerings' table `block_table`).
VLLM_COMMON_FIELDS: dict[str, tuple[tuple[str, ...], torch.dtype, str]] = {
    "query_start_loc": (("query_start_loc",), torch.int32, "device"),
    "query_start_loc_cpu": (("query_start_loc_cpu",), torch.int32, "host"),
    "seq_lens": (("seq_lens",), torch.int32, "device"),
    "seq_lens_cpu_upper_bound": (("seq_lens_cpu_upper_bound", "seq_lens_cpu"), torch.int32, "host"),
    "block_table_tensor": (("block_table_tensor", "block_table"), torch.int32, "device"),
    "slot_mapping": (("slot_mapping",), torch.int64, "device"),
    "is_prefilling": (("is_prefilling",), torch.bool, "host"),
}
_SCALARS = ("num_reqs", "num_actual_tokens", "max_query_len", "max_seq_len")
_OPTIONAL = frozenset({"is_prefilling"})  # only the common lowering carries it


def _vllm_host_array(value: Any, name: str) -> np.ndarray:
    """A host numpy view of a vLLM CPU field; device tensors are refused, never copied back."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise TypeError(
                f"{name}: expected a CPU tensor, received one on {value.device}. Reading it would "
                f"synchronise the host with the device. Fix: pass vLLM's host mirror (the *_cpu field)."
            )
        return value.numpy()
    device = getattr(value, "device", None)
    if device is not None and not str(device).lower().startswith("cpu"):
        raise TypeError(f"{name}: expected host data, received an array on {device}.")
    return np.asarray(value)


def uses_async_spec_decode(vllm_config: Any) -> bool:
    """Whether vLLM runs speculative decoding with async scheduling for `vllm_config`.

    Then `seq_lens_cpu_upper_bound` is only an upper bound on decode rows (vLLM assumes every
    draft was accepted and corrects the device `seq_lens` on the GPU): pass the result as
    `batch_from_vllm(..., async_spec_decode=...)`. vLLM 0.33's metadata no longer says so itself.
    """
    spec = getattr(vllm_config, "speculative_config", None)
    tokens = getattr(spec, "num_speculative_tokens", None) if spec is not None else None
    scheduler = getattr(vllm_config, "scheduler_config", None)
    return bool(tokens) and bool(getattr(scheduler, "async_scheduling", False))


def _inexact_rows(query_lens: np.ndarray, seq_lens: np.ndarray, prefilling: np.ndarray | None) -> np.ndarray:
    """Rows whose host length is only a bound under async speculative decoding: rows with
    context that are not prefilling (prefill rows carry no drafts, so theirs is exact)."""
    decode_like = seq_lens > query_lens
    return ~(decode_like if prefilling is None else decode_like & ~prefilling)


def _short_rows_as_decodes(prefilling: np.ndarray | None, query_lens: np.ndarray,
                           decode_threshold: int) -> np.ndarray | None:
    """`is_prefilling` with rows of at most `decode_threshold` tokens cleared: vLLM's default
    split (treat_short_extends_as_decodes) runs such rows as decodes, and its model runner V2
    sorts them among the decodes, where attnsync would see a short extend out of order."""
    if prefilling is None:
        return None
    return prefilling & (query_lens > decode_threshold)


def batch_from_vllm(
    common_attn_metadata: Any,
    *,
    block_size: int,
    block_table_cpu: Any = None,
    seq_lens_exact: Any = None,
    async_spec_decode: bool | None = None,
    short_extends_as_decodes: bool = False,
    decode_threshold: int = 1,
) -> Batch:
    """An `attnsync.Batch` from vLLM's `CommonAttentionMetadata`, reading host fields only.

    Reads `query_start_loc_cpu`, `seq_lens_cpu_upper_bound` (or, on older vLLM, the exact
    `_seq_lens_cpu`), `num_reqs`, `num_actual_tokens`, `is_prefilling` and `causal`: host
    tensors and ints. It never touches a device value: not `query_start_loc`, `seq_lens`,
    `slot_mapping`, not a `seq_lens_cpu` property (older vLLM copied `seq_lens` from the GPU
    there), and not `block_table_tensor`, which lives on the GPU. The block table comes from
    the caller's host copy (vLLM's V1 runner keeps one per kv-cache group:
    `input_batch.block_table[group].get_numpy_array()`, rows in batch order).

    vLLM's CUDA-graph padding is kept: trailing rows with no tokens and no context are padding
    (`padded_num_reqs=num_reqs`), and `padded_num_tokens=num_actual_tokens`.

    Args:
        common_attn_metadata: an object with `CommonAttentionMetadata`'s attribute names.
        block_size: tokens per KV-cache page of this kv-cache group.
        block_table_cpu: [>= R, W] int host array or CPU tensor, the host block table. Optional
            only when `block_table_tensor` is itself a CPU tensor.
        seq_lens_exact: None to infer (see `async_spec_decode`), a bool for every row, or a
            bool array over the real rows.
        async_spec_decode: whether vLLM runs speculative decoding with async scheduling
            (`uses_async_spec_decode(vllm_config)`): then rows with context that are not
            prefilling hold only an upper bound. None: read it from the metadata where vLLM
            still marks it (older vLLM: `_seq_lens_cpu is None`), else False.
        short_extends_as_decodes: clear `is_prefilling` on rows of at most `decode_threshold`
            tokens, so they count as decodes, as vLLM's default split does (and as its model
            runner V2 orders them). Keep False for the Mamba backend, which tells them apart.
        decode_threshold: the threshold `short_extends_as_decodes` applies.

    Returns:
        The `attnsync.Batch` of the step (lower with `attnsync.build` + `lower` as usual).

    Raises:
        TypeError: a host field is on a device, or the block table is only on the device.
        SpecError: the fields are inconsistent, or the attention is not causal.
    """

    cam = common_attn_metadata
    block_size = as_int(block_size, "block_size", minimum=1)
    causal = getattr(cam, "causal", True)
    if causal is False or isinstance(causal, torch.Tensor):
        raise SpecError(
            f"common_attn_metadata.causal is {'a per-row tensor' if causal is not False else 'False'}; "
            f"attnsync builds causal decoder metadata. Fix: keep non-causal (encoder) layers on "
            f"vLLM's own builder."
        )
    qsl_value = getattr(cam, "query_start_loc_cpu", None)
    if qsl_value is None:
        raise SpecError("common_attn_metadata: query_start_loc_cpu is missing; attnsync reads the host copy.")
    qsl = _vllm_host_array(qsl_value, "query_start_loc_cpu").astype(np.int64).ravel()
    num_reqs = getattr(cam, "num_reqs", None)
    num_reqs = len(qsl) - 1 if num_reqs is None else as_int(num_reqs, "num_reqs", minimum=0)
    if len(qsl) < num_reqs + 1:
        raise SpecError(
            f"query_start_loc_cpu: {len(qsl)} entries for num_reqs={num_reqs}; expected num_reqs + 1."
        )
    qsl = qsl[: num_reqs + 1]
    if len(qsl) and (qsl[0] != 0 or (np.diff(qsl) < 0).any()):
        raise SpecError(
            f"query_start_loc_cpu: expected [0] == 0 and non-decreasing values, received "
            f"{qsl[:8].tolist()}{' ...' if len(qsl) > 8 else ''}."
        )
    bound = getattr(cam, "seq_lens_cpu_upper_bound", None)
    source = "seq_lens_cpu_upper_bound"
    if bound is None:
        bound, source = getattr(cam, "_seq_lens_cpu", None), "_seq_lens_cpu"
    if bound is None:
        raise SpecError(
            "common_attn_metadata: neither seq_lens_cpu_upper_bound nor _seq_lens_cpu is set. "
            "attnsync never reads the seq_lens_cpu property (it copies seq_lens from the GPU). "
            "Fix: use a vLLM that fills seq_lens_cpu_upper_bound."
        )
    seq = _vllm_host_array(bound, source).astype(np.int64).ravel()
    if len(seq) < num_reqs:
        raise SpecError(f"{source}: {len(seq)} entries for num_reqs={num_reqs}.")
    seq = seq[:num_reqs]
    query_lens = np.diff(qsl)
    # vLLM pads CUDA-graph batches with rows of no tokens and no context at the end.
    used = np.flatnonzero((query_lens > 0) | (seq > 0))
    n = int(used[-1]) + 1 if used.size else 0
    num_tokens = int(qsl[-1]) if len(qsl) else 0
    num_actual_tokens = getattr(cam, "num_actual_tokens", None)
    padded_tokens = (
        num_tokens if num_actual_tokens is None else as_int(num_actual_tokens, "num_actual_tokens", minimum=0)
    )

    prefilling = getattr(cam, "is_prefilling", None)
    if prefilling is not None:
        prefilling = _vllm_host_array(prefilling, "is_prefilling").astype(bool).ravel()
        if len(prefilling) < n:
            raise SpecError(f"is_prefilling: {len(prefilling)} entries for {n} rows in use.")
        prefilling = prefilling[:n]
    if seq_lens_exact is None:
        if async_spec_decode is None:
            # Older vLLM left `_seq_lens_cpu` None exactly under async speculative decoding.
            async_spec_decode = hasattr(cam, "_seq_lens_cpu") and cam._seq_lens_cpu is None
        seq_lens_exact = _inexact_rows(query_lens[:n], seq[:n], prefilling) if async_spec_decode else True
    elif not isinstance(seq_lens_exact, bool | np.bool_):
        seq_lens_exact = _vllm_host_array(seq_lens_exact, "seq_lens_exact").astype(bool).ravel()[:n]
    if short_extends_as_decodes:
        prefilling = _short_rows_as_decodes(
            prefilling, query_lens[:n], as_int(decode_threshold, "decode_threshold", minimum=1))

    if block_table_cpu is None:
        table = getattr(cam, "block_table_tensor", None)
        device = getattr(table, "device", None)
        if table is None or device is None or not str(device).lower().startswith("cpu"):
            raise TypeError(
                f"block_table_cpu: not given, and common_attn_metadata.block_table_tensor lives on "
                f"{device}; reading it would synchronise the host with the device. Fix: pass the "
                f"host block table your runner keeps, batch_from_vllm(cam, block_size=..., "
                f"block_table_cpu=input_batch.block_table[group].get_numpy_array())."
            )
        block_table_cpu = table
    table_np = _vllm_host_array(block_table_cpu, "block_table_cpu")
    if table_np.ndim != 2 or table_np.shape[0] < n:
        raise SpecError(
            f"block_table_cpu: expected a [>= {n}, W] table (one row per request, in batch order), "
            f"received shape {table_np.shape}."
        )
    return Batch(
        query_lens=query_lens[:n],
        seq_lens=seq[:n],
        block_table=table_np[:n],
        block_size=block_size,
        seq_lens_exact=seq_lens_exact,
        is_prefilling=prefilling,
        padded_num_reqs=max(num_reqs, n),
        padded_num_tokens=max(padded_tokens, num_tokens),
    )


def batch_from_vllm_state(
    *,
    num_scheduled_tokens: Any,
    num_computed_tokens: Any,
    block_table: Any,
    block_size: int,
    num_prompt_tokens: Any = None,
    num_reqs_padded: int | None = None,
    num_tokens_padded: int | None = None,
    async_spec_decode: bool = False,
) -> Batch:
    """An `attnsync.Batch` from the per-request host arrays vLLM's model runner keeps.

    The same step `batch_from_vllm` reads from `CommonAttentionMetadata`, before vLLM builds
    it: `seq_lens = num_computed_tokens + num_scheduled_tokens` (vLLM's
    `seq_lens_cpu_upper_bound`) and `is_prefilling = num_computed_tokens < num_prompt_tokens`,
    both as vLLM's V1 runner computes them.

    Args:
        num_scheduled_tokens: [R] int, new tokens of each request this step, in batch order
            (the scheduler output's counts of `input_batch.req_ids`).
        num_computed_tokens: [>= R] int, `input_batch.num_computed_tokens_cpu` (an optimistic
            count under async speculative decoding).
        block_table: [>= R, W] int, `input_batch.block_table[group].get_numpy_array()`.
        block_size: tokens per KV-cache page of the group.
        num_prompt_tokens: [>= R] int, `input_batch.num_prompt_tokens`; None leaves
            `is_prefilling` unset.
        num_reqs_padded, num_tokens_padded: vLLM's CUDA-graph padding (None: none).
        async_spec_decode: `uses_async_spec_decode(vllm_config)`: decode rows' lengths are
            then upper bounds.
    """
    scheduled = _vllm_host_array(num_scheduled_tokens, "num_scheduled_tokens").astype(np.int64).ravel()
    n = len(scheduled)
    computed = _vllm_host_array(num_computed_tokens, "num_computed_tokens").astype(np.int64).ravel()
    if len(computed) < n:
        raise SpecError(f"num_computed_tokens: {len(computed)} entries for {n} scheduled requests.")
    seq = computed[:n] + scheduled
    prefilling = None
    if num_prompt_tokens is not None:
        prompt = _vllm_host_array(num_prompt_tokens, "num_prompt_tokens").astype(np.int64).ravel()
        if len(prompt) < n:
            raise SpecError(f"num_prompt_tokens: {len(prompt)} entries for {n} scheduled requests.")
        prefilling = computed[:n] < prompt[:n]
    table = _vllm_host_array(block_table, "block_table")
    if table.ndim != 2 or table.shape[0] < n:
        raise SpecError(
            f"block_table: expected a [>= {n}, W] host table (one row per request, in batch order), "
            f"received shape {table.shape}."
        )
    return Batch(
        query_lens=scheduled,
        seq_lens=seq,
        block_table=table[:n],
        block_size=block_size,
        seq_lens_exact=_inexact_rows(scheduled, seq, prefilling) if async_spec_decode else True,
        is_prefilling=prefilling,
        padded_num_reqs=num_reqs_padded,
        padded_num_tokens=num_tokens_padded,
    )


def vllm_common_fields(lowered: Any, *, positions: torch.Tensor | None = None) -> dict[str, Any]:
    """The fields of vLLM's `CommonAttentionMetadata` from a torch lowering, as a dict.

    `lowered` is what `attnsync.adapters.torch.lower` returns for a backend that carries the
    common fields (common, triton, flex, flashinfer, ...). Tensors are passed through, not
    copied: device fields stay views into the lowering's staged buffer. vLLM's dtypes are
    checked (int32 offsets, lengths and pages; int64 slots; a bool `is_prefilling`).
    `causal` is True (attnsync builds causal decoder metadata); `positions` is passed through
    (vLLM's int64 token positions, optional there too).

    Raises:
        SpecError: a field vLLM needs is missing or has another dtype.
    """
    out: dict[str, Any] = {}
    fields = getattr(lowered, "__dict__", {})
    for vllm_name, (names, dtype, place) in VLLM_COMMON_FIELDS.items():
        value = next((fields[name] for name in names if name in fields), None)
        if value is None:
            if vllm_name in _OPTIONAL:
                out[vllm_name] = None
                continue
            raise SpecError(
                f"{vllm_name}: the lowering {type(lowered).__name__} has none of {list(names)}. Fix: lower "
                f"the metadata of a backend that carries the common fields (attnsync.build(batch, 'common'))."
            )
        if not isinstance(value, torch.Tensor) or value.dtype != dtype:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise SpecError(
                f"{vllm_name}: vLLM expects a {dtype} tensor ({place}), the lowering holds {got}. Fix: pass "
                f"what attnsync.adapters.torch.lower returned, unedited."
            )
        out[vllm_name] = value
    for name in _SCALARS:
        if name not in fields:
            raise SpecError(f"{name}: the lowering {type(lowered).__name__} has no such scalar.")
        out[name] = int(fields[name])
    out["causal"] = True
    out["positions"] = positions
    return out


def to_vllm_common(lowered: Any, *, positions: torch.Tensor | None = None) -> Any:
    """vLLM's own `CommonAttentionMetadata` from a torch lowering (a dict without vLLM).

    The fields are `vllm_common_fields(lowered)`; fields attnsync does not build (encoder,
    DCP, multimodal ranges, ...) keep vLLM's defaults (None). Imports vLLM on first use; when
    it cannot be imported, returns the dict.
    """
    fields = vllm_common_fields(lowered, positions=positions)
    cls = _vllm_common_class()
    return fields if cls is None else cls(**fields)


_COMMON_CLASS: list[Any] = []


def _vllm_common_class() -> Any:
    """vLLM's `CommonAttentionMetadata` class, or None; looked up once (a failing import
    scans sys.path every time)."""
    if not _COMMON_CLASS:
        try:
            from vllm.v1.attention.backend import CommonAttentionMetadata
        except ImportError:
            CommonAttentionMetadata = None
        _COMMON_CLASS.append(CommonAttentionMetadata)
    return _COMMON_CLASS[0]


def _host_split_inputs(md: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int, int]:
    """(query lens, host seq lens, is_prefilling or None, num_reqs, num_actual_tokens,
    max_query_len) of attnsync metadata, numpy or lowered: host values only."""
    fields = md.__dict__
    qsl = fields.get("query_start_loc_cpu", fields.get("query_start_loc"))
    seq = next((fields[k] for k in ("seq_lens_cpu_upper_bound", "seq_lens_cpu") if k in fields), None)
    if seq is None:
        seq = fields.get("seq_lens")
    prefilling = fields.get("is_prefilling")
    qsl = _vllm_host_array(qsl, "query_start_loc").astype(np.int64)
    seq = _vllm_host_array(seq, "seq_lens").astype(np.int64)
    prefilling = None if prefilling is None else _vllm_host_array(prefilling, "is_prefilling").astype(bool)
    return np.diff(qsl), seq, prefilling, int(md.num_reqs), int(md.num_actual_tokens), int(md.max_query_len)


def _query_start(query_lens: np.ndarray, row: int) -> int:
    return int(query_lens[:row].sum())


def vllm_split(
    md: Any,
    *,
    decode_threshold: int = 1,
    require_uniform: bool = False,
    treat_short_extends_as_decodes: bool = True,
) -> tuple[int, int, int, int]:
    """`(num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens)` as vLLM's
    `split_decodes_and_prefills` returns them for the same step, from host values only.

    vLLM's convention, which differs from attnsync's own counts (`md.num_decodes`, ...): the
    split is the first row that is not a decode, read off the row order (the batch is expected
    decode-first); padded rows count in the last group (prefills when there are any, else
    decodes), and so do rows after the first prefill whatever their kind. `md` is attnsync
    metadata, numpy (`attnsync.build`) or lowered (`lower`), with the common fields.
    """
    threshold = as_int(decode_threshold, "decode_threshold", minimum=1)
    query_lens, _, prefilling, num_reqs, num_tokens, max_query_len = _host_split_inputs(md)
    if max_query_len <= threshold and (not require_uniform or threshold <= 1) and treat_short_extends_as_decodes:
        return num_reqs, 0, num_tokens, 0
    if num_reqs == 0 or query_lens[0] > threshold:
        return 0, num_reqs, 0, num_tokens
    if require_uniform:
        first = query_lens[0]
        if treat_short_extends_as_decodes and ((query_lens == first) | (query_lens == 0)).all():
            return num_reqs, 0, num_tokens, 0
        is_prefill = (query_lens != first) & (query_lens != 0)
    else:
        is_prefill = query_lens > threshold
    if not treat_short_extends_as_decodes:
        if prefilling is None:
            raise SpecError(
                "vllm_split: treat_short_extends_as_decodes=False needs is_prefilling; this metadata "
                "has none. Fix: build with the common backend, from a Batch with is_prefilling."
            )
        is_prefill = is_prefill | prefilling[: len(is_prefill)]
    if not is_prefill.any():
        return num_reqs, 0, num_tokens, 0
    first_prefill = int(np.argmax(is_prefill))
    decode_tokens = _query_start(query_lens, first_prefill)
    return first_prefill, num_reqs - first_prefill, decode_tokens, num_tokens - decode_tokens


def vllm_split_with_extends(md: Any, *, decode_threshold: int = 1) -> tuple[int, int, int, int, int, int]:
    """`(num_decodes, num_extends, num_prefills, num_decode_tokens, num_extend_tokens,
    num_prefill_tokens)` as vLLM's `split_decodes_prefills_and_extends` returns them.

    vLLM's convention: decodes are the rows before the first one of more than
    `decode_threshold` tokens (short extends included); prefills start at the first row of
    more tokens without context; padding counts in the last group (see `vllm_split`).
    """
    threshold = as_int(decode_threshold, "decode_threshold", minimum=1)
    query_lens, seq, _, num_reqs, num_tokens, max_query_len = _host_split_inputs(md)
    if max_query_len <= threshold:
        return num_reqs, 0, 0, num_tokens, 0, 0
    long_rows = query_lens > threshold
    is_prefill = (seq[: len(query_lens)] == query_lens) & long_rows
    num_decodes = int(np.argmax(long_rows))
    decode_tokens = _query_start(query_lens, num_decodes)
    if not long_rows.any():
        return num_decodes, 0, 0, decode_tokens, 0, 0
    rest_rows, rest_tokens = num_reqs - num_decodes, num_tokens - decode_tokens
    if not is_prefill.any():
        return num_decodes, rest_rows, 0, decode_tokens, rest_tokens, 0
    first_prefill = int(np.argmax(is_prefill))
    prefill_tokens = num_tokens - _query_start(query_lens, first_prefill)
    return (num_decodes, first_prefill - num_decodes, num_reqs - first_prefill, decode_tokens,
            rest_tokens - prefill_tokens, prefill_tokens)


def vllm_regions(batch: Batch, *, decode_threshold: int = 1) -> np.ndarray:
    """vLLM's reorder regions of each row ([R] int8): 0 decode, 1 short extend, 2 long extend,
    3 prefill, as `reorder_batch_to_split_decodes_and_prefills` assigns them.

    One difference from `Batch.regions`: a row without context is a prefill in vLLM whatever
    its length (attnsync calls a short one a decode or a short extend, by `is_prefilling`).
    A batch without `is_prefilling` counts every short row with context as a decode.
    """
    threshold = as_int(decode_threshold, "decode_threshold", minimum=1)
    q, computed = batch.query_lens, batch.num_computed_tokens
    short = q <= threshold
    still_prefilling = np.zeros_like(short) if batch.is_prefilling is None else batch.is_prefilling
    region = np.where(short, np.where(still_prefilling, 1, 0), 2).astype(np.int8)
    region[computed <= 0] = 3
    return region


def vllm_reorder(batch: Batch, *, decode_threshold: int = 1) -> tuple[np.ndarray, Batch]:
    """Rows in the order vLLM's `reorder_batch_to_split_decodes_and_prefills` leaves them.

    vLLM moves only rows that sit outside their region's span, pairing them in a stable sort of
    their regions, and leaves the others where they are; `attnsync.reorder` sorts every row
    stably. Both give decode-first batches, in different orders within a region, and their
    regions differ for short rows without context (`vllm_regions`). Use this one when attnsync
    builds for rows that vLLM's runner has reordered, or to predict its order.

    Returns:
        `(permutation, reordered)` as `attnsync.reorder`: row i of `reordered` is row
        `permutation[i]` of `batch`.
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"vllm_reorder: expected an attnsync.Batch, received {type(batch).__name__}.")
    region = vllm_regions(batch, decode_threshold=decode_threshold)
    target = np.repeat(np.arange(4, dtype=np.int8), np.bincount(region, minlength=4))
    moved = np.flatnonzero(region != target)
    permutation = np.arange(batch.num_reqs, dtype=np.int64)
    # Position moved[k] receives the k-th moved row in a stable sort by region.
    permutation[moved] = moved[np.argsort(region[moved], kind="stable")]
    return permutation, batch.take(permutation)
