"""FlexAttention on a paged KV cache from attnsync ``flex`` metadata (torch side).

Importing this module imports torch. It adds what the generic `attnsync.adapters.torch.lower`
cannot: the ``BlockMask`` (a torch object), the paged mask function, flex attention itself,
and device-side forms of the metadata for engines whose exact lengths live only on the device.

- `lower(md, device, seq_lens=None)`: the generic lowering (one pinned non_blocking copy), plus,
  given exact device ``seq_lens``, the per-row fields that must be exact recomputed on the
  device; with ``inverse_table="device"`` metadata, the inverse table built on the device.
- `CapturedBlockLists`: for metadata built with ``block_sparse="device"``, the device half of
  the step (page lists and inverse table) captured once as a CUDA graph over a persistent
  lowering and replayed every step: a few microseconds of host time instead of ~50 launches.
  Its ``block_mask`` is built once over those fixed tensors and follows every replay.
- `block_mask(tmd)`: ``BlockMask.from_kv_blocks`` on the staged ``kv_num_blocks`` /
  ``kv_indices`` (no dense mask is ever built), with `paged_mask_mod(tmd)`.
- `flex_paged_attention(q, k_cache, v_cache, tmd, scale=...)`: flex attention of the batch's
  tokens against the whole cache viewed as one KV sequence (no copy of the cache).
- Sync-free device forms, each with a naive form (``_naive_*``) that the tests compare it to:
  `doc_ids_device` (``repeat_interleave`` with ``output_size``; `doc_ids_static_device` for CUDA
  graphs), `left_pack_device` (scatter into
  a garbage column instead of ``nonzero``), `physical_to_logical_device` (``scatter_reduce``
  amax), and `kv_blocks_device`, the whole block-sparse description built on the device.
  None of them reads a device value: every size comes from the host metadata.

Eager flex attention runs anywhere (the CPU CI uses it; it evaluates the mask densely and
ignores the block sparsity). ``compile=True`` runs the compiled kernel, which visits only the
listed pages; on the GPU it is tiled with ``BLOCK_M = q_block_size`` and ``BLOCK_N =
block_size`` so that one sparse block is one kernel tile.
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .._batch import Batch
from .._validate import SpecError
from ..adapters import torch as torch_adapter
from ..backends.flex import FlexMetadata
from ..backends.flex import _build as _build_flex

__all__ = [
    "CapturedBlockLists",
    "block_mask",
    "doc_ids_device",
    "doc_ids_static_device",
    "flex_paged_attention",
    "kv_blocks_device",
    "left_pack_device",
    "lower",
    "paged_mask_mod",
    "physical_to_logical_device",
]

# `compute_q_blocks=False` skips the transposed (q-side) indices, which only the backward pass
# reads. Asked of the signature once, so an older or newer torch without it still works.
_HAS_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


# ----------------------------------------------------------------------------------------------
# Lowering
# ----------------------------------------------------------------------------------------------


def lower(md: FlexMetadata, device: Any = "cuda", *, seq_lens: torch.Tensor | None = None,
          stager: Any = None) -> Any:
    """Lower flex metadata to torch (one pinned non_blocking copy), fixing exact fields on device.

    Args:
        md: metadata from ``attnsync.build(batch, backend="flex", ...)``.
        device: target device.
        seq_lens: optional exact lengths, int32 [num_reqs] on `device`. Required when the batch
            has inexact rows. They replace the staged ``seq_lens`` and the slot mapping (generic
            lowering), and ``decode_offset``, ``num_blocks_per_seq`` and ``physical_to_logical``
            are recomputed from them on the device (fixed shapes, no sync).
        stager: as in `attnsync.adapters.torch.lower`.

    Returns:
        The generic lowered object (`TorchFlexMetadata`: device tensors under the field names,
        ``query_start_loc_cpu`` and ``seq_lens_cpu_upper_bound`` on the host, ints). Its
        ``all_exact`` is True once the device lengths are exact, which `block_mask` requires.
        A device-built inverse table is a fresh tensor per call (not at a persistent address);
        under CUDA graphs call `physical_to_logical_device(..., out=persistent)` yourself.
        Metadata built with ``block_sparse="device"`` gets ``kv_num_blocks`` / ``kv_indices``
        from `kv_blocks_device` here (fresh tensors too).
    """
    if not isinstance(md, FlexMetadata):
        raise TypeError(
            f"lower: expected FlexMetadata from attnsync.build(batch, backend='flex'), received "
            f"{type(md).__name__}. Fix: use attnsync.adapters.torch.lower for other backends."
        )
    tmd = torch_adapter.lower(md, device, seq_lens=seq_lens, stager=stager)
    updates: dict[str, Any] = {}
    if seq_lens is not None:
        updates["decode_offset"], updates["num_blocks_per_seq"] = _row_fields_device(
            tmd.query_start_loc, seq_lens, md.block_size)
        updates["all_exact"] = True
    if seq_lens is not None or md.inverse_table_on_device:
        updates["physical_to_logical"] = physical_to_logical_device(
            tmd.block_table, tmd.seq_lens, md.block_size, md.num_cache_pages
        )
    if md.block_sparse_on_device:
        updates["kv_num_blocks"], updates["kv_indices"] = kv_blocks_device(
            tmd.doc_ids, tmd.query_start_loc, updates.get("decode_offset", tmd.decode_offset), tmd.block_table,
            block_size=md.block_size, q_block_size=md.q_block_size,
            max_pages=min(md.max_pages_per_seq, md.block_table.shape[1]),
            num_pages=md.num_cache_pages, width=md.max_kv_blocks,
        )
    return torch_adapter.with_fields(tmd, **updates) if updates else tmd


class CapturedBlockLists:
    """The device-built page lists and inverse table of a flex step, captured once, replayed.

    With ``block_sparse="device"`` and ``inverse_table="device"`` the host builds only the per-row
    and per-token fields; `lower` then issues about fifty small device operations for
    `kv_blocks_device` and `physical_to_logical_device`, each a few microseconds of host
    launch time. Their shapes depend only on host sizes, so one CUDA graph over fixed input
    addresses serves every step of the same shapes: this class lowers each step into a
    persistent staging buffer (one pinned copy, fixed addresses) and replays that graph. The
    graph also derives ``doc_ids``, ``decode_offset``, ``num_blocks_per_seq`` and
    ``slot_mapping`` from the staged lengths and table, so a step packs only
    ``query_start_loc``, ``seq_lens`` and ``block_table`` (and the host mirrors).

    The ``BlockMask`` needs no per-step construction either: everything it and its mask
    function read lives at a fixed address (the graph's outputs, and the staged fields at the
    persistent buffer's offsets), so `block_mask` is built once, here, and each `step` rewrites
    what it reads. A step is then ``step_batch(batch)`` (or build, ``step(md)``), and
    ``captured.block_mask``. `step_batch` also skips the host fields the graph derives.

    Example (one bucket; ``batches`` padded to the same sizes)::

        options = dict(block_sparse="device", inverse_table="device", max_kv_blocks=2048)
        captured = CapturedBlockLists(attnsync.build(first, backend="flex", **options), "cuda")
        for batch in batches:
            tmd = captured.step_batch(batch)  # or captured.step(attnsync.build(batch, ...))
            out = flex_paged_attention(q, k_cache, v_cache, tmd, scale=s, compile=True,
                                       block_mask=captured.block_mask)

    Args:
        md: the first step's metadata, built with ``block_sparse="device"``,
            ``inverse_table="device"``, exact lengths and a fixed ``max_kv_blocks``. Every later
            step must have the same shapes and sizes (pad batches to one bucket); others are
            refused before anything is written.
        device: a CUDA device.

    Attributes:
        stager: the persistent `attnsync.adapters.torch.Stager`.
        graph: the captured `torch.cuda.CUDAGraph`.
        block_mask: the ``BlockMask`` of the latest `step` (forward only: no q-side indices,
            as `block_mask` with ``compute_q_blocks=False``), built once over the graph's
            ``kv_num_blocks`` / ``kv_indices`` and `paged_mask_mod` over fixed tensors. It is
            the same object every step and describes whichever step was staged and replayed
            last: the next `step` rewrites it (its copy and replay are queued on the current
            stream, after the kernels already queued there that read it). After construction
            it describes ``md`` (the graph is replayed once). For a custom mask function, or
            the backward pass, build one per step with `block_mask` on what `step` returns.
    """

    def __init__(self, md: FlexMetadata, device: Any = "cuda") -> None:
        self._check(md)
        if not (md.block_sparse_on_device and md.inverse_table_on_device):
            raise SpecError(
                "md: CapturedBlockLists builds the page lists and the inverse table on the device, "
                f"but this metadata has block_sparse_on_device={md.block_sparse_on_device}, "
                f"inverse_table_on_device={md.inverse_table_on_device}. Fix: attnsync.build(batch, "
                "backend='flex', block_sparse='device', inverse_table='device', max_kv_blocks=...)."
            )
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise SpecError(f"device: CUDA graphs need a CUDA device, received {self.device}.")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._sizes = _CAPTURED_SIZES(md)  # all_exact is True here (_check above)
        self._build_options = _step_batch_options(md)
        self.stager = torch_adapter.Stager(self.device, persistent=True)
        first = torch_adapter.lower(md, self.device, stager=self.stager)
        # Views of the persistent buffer (same addresses: the stager writes every step there).
        t = {name: getattr(first, name).view(getattr(first, name).shape) for name in _CAPTURED_INPUTS}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(side):
            _captured_work(t, md)  # warm-up: kernels loaded, allocator pools made
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, stream=side):
            self._outputs = _captured_work(t, md)
        torch_adapter.with_fields(first, **self._outputs)  # refuses names the lowering does not have
        del first
        self.block_mask = self._fixed_block_mask(md, t, self._outputs)
        self.graph.replay()  # capturing ran nothing: the outputs (and block_mask) now hold md's lists

    @staticmethod
    def _fixed_block_mask(md: FlexMetadata, staged: dict[str, torch.Tensor],
                          outputs: dict[str, torch.Tensor]) -> BlockMask:
        """The mask over fixed tensors: `block_mask` of a lowering made of them (`staged`: the
        `_CAPTURED_INPUTS` views, `outputs`: `_captured_work`'s). Its scalars (tokens, cache
        slots, block sizes) are the bucket's, the same every step."""
        fixed = types.SimpleNamespace(
            **staged, **outputs,
            q_block_size=md.q_block_size, block_size=md.block_size,
            num_actual_tokens=md.num_actual_tokens, total_cache_tokens=md.total_cache_tokens,
            num_cache_pages=md.num_cache_pages, all_exact=True,
        )
        mask = block_mask(fixed, compute_q_blocks=False)
        if not _HAS_COMPUTE_Q_BLOCKS:
            # An older torch always derives the q-side indices: a copy made now, which no replay
            # would update. Only the backward pass reads them; drop them rather than go stale.
            mask.q_num_blocks = mask.q_indices = None
        return mask

    @staticmethod
    def _check(md: Any) -> None:
        if not isinstance(md, FlexMetadata):
            raise TypeError(f"md: expected FlexMetadata, received {type(md).__name__}.")
        if not md.all_exact:
            raise SpecError(
                "md: the batch has inexact rows; a captured step reads the staged lengths, which are "
                "only upper bounds. Fix: exact lengths, or flex_torch.lower(md, device, seq_lens=...)."
            )

    def step(self, md: FlexMetadata) -> Any:
        """Lower `md` into the fixed buffers (one pinned copy), replay the captured lists.

        Returns the lowered metadata with ``kv_num_blocks``, ``kv_indices``,
        ``physical_to_logical``, ``doc_ids``, ``decode_offset``, ``num_blocks_per_seq`` and
        ``slot_mapping`` filled (the graph's output tensors: fixed addresses, rewritten by the
        next replay); `flex_paged_attention` takes it with ``block_mask=self.block_mask``, which
        now describes `md`. Metadata of other sizes raises `SpecError` before anything is
        written.
        """
        # One condition on the hot path; the slow path below says what is wrong.
        if not isinstance(md, FlexMetadata) or _CAPTURED_SIZES(md) != self._sizes:
            self._refuse(md)
        tmd = torch_adapter.lower(md, self.stager.device, stager=self.stager)  # the stager's own device
        # No `torch.cuda.device(...)` around it: CUDAGraph::replay sets a device guard for its
        # capture stream's device itself and launches on that device's current stream.
        self.graph.replay()
        return torch_adapter.with_fields(tmd, **self._outputs)  # the graph-made fields (`_captured_work`)

    def step_batch(self, batch: Batch) -> Any:
        """`step` of ``attnsync.build(batch, backend="flex", ...)`` with the capture's options,
        without computing on the host what the graph derives (``slot_mapping``: five to seven
        numpy calls; ``num_blocks_per_seq``: three). The host work left is the common split,
        the offsets and the maxima, then one pinned copy of ``query_start_loc``, ``seq_lens``
        and ``block_table``. The result is `step`'s, value for value (the GPU tests compare
        them). A batch of other sizes, or with inexact rows, raises `SpecError` (or
        `TypeError` for what is not a `Batch`) before anything is written.
        """
        return self.step(_build_flex(batch, **self._build_options, for_captured_graph=True))

    def _refuse(self, md: Any) -> None:
        """Raise what is wrong with `md`: not exact flex metadata, or other sizes."""
        self._check(md)  # the type, and exact lengths (the last of _CAPTURED_SIZES)
        raise SpecError(
            f"md: (rows, tokens, table shape, block size, q block size, max_kv_blocks, cache pages, "
            f"device lists, device inverse table) = {_CAPTURED_SIZES(md)[:-1]}, but the graph was "
            f"captured for {self._sizes[:-1]}. Fix: pad every batch to the captured bucket, build it with "
            f"block_sparse='device', inverse_table='device' and the same max_kv_blocks, or capture "
            f"one graph per bucket."
        )


def _step_batch_options(md: FlexMetadata) -> dict[str, Any]:
    """The build options `CapturedBlockLists.step_batch` builds with: those `md` was built with,
    read back from it. The decode threshold is not among them: it changes no field of flex
    metadata (which carries no decode/prefill split), so the default serves every capture."""
    return dict(num_cache_pages=md.num_cache_pages, q_block_size=md.q_block_size,
                max_kv_blocks=md.max_kv_blocks, inverse_table="device", block_sparse="device",
                decode_threshold=1)


# The staged fields a captured step's graph reads; everything else it needs it derives.
_CAPTURED_INPUTS = ("query_start_loc", "seq_lens", "block_table")


def _captured_work(staged: dict[str, torch.Tensor], md: FlexMetadata) -> dict[str, torch.Tensor]:
    """What `CapturedBlockLists`' graph computes from the staged `_CAPTURED_INPUTS`: the page
    lists, the inverse table, and the per-token and per-row fields derived from the lengths.

    Deriving ``doc_ids``, ``decode_offset``, ``num_blocks_per_seq`` and ``slot_mapping`` here
    rather than staging them leaves four fewer fields for each step to pack on the host (a numpy
    call each; the slot mapping's also widens int32 to int64), for a few more small kernels in a graph that is
    replayed anyway. Each equals the host builder's field bit for bit for exact lengths (the
    only ones a captured step takes): ``doc_ids`` is `doc_ids_static_device` (padding tokens on
    the last row), ``decode_offset`` is ``seq_lens - query_lens`` (0 on padding rows, whose
    length and query are 0), ``num_blocks_per_seq`` is ``ceil(seq_lens / block_size)``, and
    ``slot_mapping`` (int64, as the torch lowering stages it) is ``page * block_size + position
    % block_size`` of each real token's page in its row, -1 for padding tokens.
    """
    qsl, seq_lens, table = staged["query_start_loc"], staged["seq_lens"], staged["block_table"]
    page = md.block_size
    doc_ids = doc_ids_static_device(qsl, md.num_actual_tokens)
    decode_offset, num_blocks_per_seq = _row_fields_device(qsl, seq_lens, page)
    counts, indices = kv_blocks_device(doc_ids, qsl, decode_offset, table, block_size=page,
                                       q_block_size=md.q_block_size, max_pages=table.shape[1],
                                       num_pages=md.num_cache_pages, width=md.max_kv_blocks)
    inverse = physical_to_logical_device(table, seq_lens, page, md.num_cache_pages)
    return {"kv_num_blocks": counts, "kv_indices": indices, "physical_to_logical": inverse,
            "doc_ids": doc_ids, "decode_offset": decode_offset, "num_blocks_per_seq": num_blocks_per_seq,
            "slot_mapping": _token_slots(doc_ids, qsl, decode_offset, table, page)}


def _pages_of(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """``ceil(seq_lens / block_size)``: pages each row's length needs (same dtype).

    As quotient plus "a remainder is left": ``seq_lens + block_size - 1`` would wrap in int32
    for a length near 2**31 that `Batch` accepts."""
    whole = torch.div(seq_lens, block_size, rounding_mode="floor")
    return whole + (whole * block_size != seq_lens).to(whole.dtype)


def _row_fields_device(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_offset`` (``seq_lens - query_lens``) and ``num_blocks_per_seq`` from device
    lengths, as the host builder defines them."""
    return seq_lens - (query_start_loc[1:] - query_start_loc[:-1]), _pages_of(seq_lens, block_size)


def _token_positions(doc_ids: torch.Tensor, query_start_loc: torch.Tensor,
                     decode_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position in its request, is real) of every token, int64 / bool [T]. Padding tokens
    (at or beyond ``query_start_loc[-1]``) get a meaningless position; callers mask them."""
    row = doc_ids.long()
    token = torch.arange(doc_ids.shape[0], device=doc_ids.device)
    position = decode_offset.long()[row] + token - query_start_loc.long()[row]
    return row, position, token < query_start_loc[-1]


def _token_slots(doc_ids: torch.Tensor, query_start_loc: torch.Tensor, decode_offset: torch.Tensor,
                 block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV-cache slot of every token, int64 [T], -1 for padding tokens (at or beyond
    ``query_start_loc[-1]``): the torch adapter's one device slot formula."""
    row, position, real = _token_positions(doc_ids, query_start_loc, decode_offset)
    return torch_adapter.device_slot_mapping(block_table, row, position, real, block_size)


# What a captured graph fixes (and, last, exact lengths), read in one call per step: rows,
# tokens, table shape, block size, q block size, list width, cache pages, device lists, device
# inverse table, all_exact.
_CAPTURED_SIZES = operator.attrgetter(
    "num_reqs", "num_actual_tokens", "block_table.shape", "block_size", "q_block_size", "max_kv_blocks",
    "num_cache_pages", "block_sparse_on_device", "inverse_table_on_device", "all_exact",
)


def _require_exact(tmd: Any, what: str) -> None:
    if not getattr(tmd, "all_exact", True):
        raise SpecError(
            f"{what}: this lowering still holds host upper bounds for inexact rows, so the mask "
            f"would let a decode row's queries see its own later tokens. Fix: "
            f"attnsync.integrations.flex_torch.lower(md, device, seq_lens=exact_int32_device_tensor)."
        )


# ----------------------------------------------------------------------------------------------
# Mask and block mask
# ----------------------------------------------------------------------------------------------


def paged_mask_mod(tmd: Any, *, logical_mask_mod: Callable | None = None) -> Callable:
    """The paged mask function of a lowered flex metadata object.

    ``mask_mod(b, h, q_idx, kv_idx)`` is True when query token ``q_idx`` (a real token of request
    ``r = doc_ids[q_idx]``) may see KV slot ``kv_idx`` of the cache: the slot's page holds logical
    block ``lb = physical_to_logical[r, kv_idx // block_size] >= 0`` of ``r``, the key position
    ``lb * block_size + kv_idx % block_size`` is below ``seq_lens[r]``, and the logical mask
    holds for (query position, key position): causal by default (key <= query), or
    ``logical_mask_mod(b, h, q_pos, kv_pos)``. Padding tokens (at or beyond
    ``query_start_loc[r + 1]``) see nothing. Combined with ``&``, never ``where(valid, m, False)``.
    """
    doc_ids = tmd.doc_ids
    qsl = tmd.query_start_loc
    seq_lens = tmd.seq_lens
    offset = tmd.decode_offset
    inverse = tmd.physical_to_logical
    page = int(tmd.block_size)
    if inverse.shape[1] == 0:  # inverse_table="device" lowered without flex_torch.lower
        inverse = physical_to_logical_device(tmd.block_table, seq_lens, page, int(tmd.num_cache_pages))

    def mask_mod(b, h, q_idx, kv_idx):
        row = doc_ids[q_idx]
        logical_block = inverse[row, kv_idx // page]
        kv_pos = logical_block * page + kv_idx % page
        q_pos = offset[row] + q_idx - qsl[row]
        valid = (q_idx < qsl[row + 1]) & (logical_block >= 0) & (kv_pos < seq_lens[row])
        if logical_mask_mod is None:
            return valid & (kv_pos <= q_pos)
        return valid & logical_mask_mod(b, h, q_pos, kv_pos)

    return mask_mod


def block_mask(tmd: Any, *, mask_mod: Callable | None = None, compute_q_blocks: bool = False) -> BlockMask:
    """A ``BlockMask`` from the staged block-sparse description (no dense mask, no sync).

    ``BlockMask.from_kv_blocks`` on ``kv_num_blocks[None, None]`` / ``kv_indices[None, None]``
    (batch and head dims of 1, broadcast), ``BLOCK_SIZE=(q_block_size, block_size)``,
    ``seq_lengths=(num_actual_tokens, total_cache_tokens)``.

    Args:
        tmd: a lowered flex metadata object (`lower`, or the generic torch lowering).
        mask_mod: the mask function; default `paged_mask_mod(tmd)`. A custom one replaces it
            whole (wrap `paged_mask_mod` to restrict it further).
        compute_q_blocks: also build the q-side indices, which only the backward pass reads
            (argsorts on the device; still sync-free). torch derives them assuming one
            ``kv_indices`` column per KV block of the sequence, so the list is first padded with
            -1 to ``num_cache_pages`` columns: [NQ, num_cache_pages] int32 on the device.
    """
    _require_exact(tmd, "block_mask")
    kwargs: dict[str, Any] = {}
    if _HAS_COMPUTE_Q_BLOCKS:
        kwargs["compute_q_blocks"] = compute_q_blocks
    kv_indices = tmd.kv_indices
    if compute_q_blocks and kv_indices.shape[-1] < int(tmd.num_cache_pages):
        kv_indices = torch.nn.functional.pad(kv_indices, (0, int(tmd.num_cache_pages) - kv_indices.shape[-1]),
                                             value=-1)
    return BlockMask.from_kv_blocks(
        tmd.kv_num_blocks[None, None],
        kv_indices[None, None],
        BLOCK_SIZE=(int(tmd.q_block_size), int(tmd.block_size)),
        mask_mod=mask_mod if mask_mod is not None else paged_mask_mod(tmd),
        seq_lengths=(int(tmd.num_actual_tokens), int(tmd.total_cache_tokens)),
        **kwargs,
    )


_make_block_mask = block_mask  # flex_paged_attention's `block_mask` argument shadows the name


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, fullgraph=True)


def flex_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tmd: Any,
    *,
    scale: float,
    block_mask: BlockMask | None = None,
    compile: bool = False,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Flex attention of the batch's tokens against a paged KV cache.

    Args:
        q: [T, Hq, D], T == ``tmd.num_actual_tokens``.
        k_cache, v_cache: [num_cache_pages, block_size, Hkv, D], contiguous (viewed, never
            copied, as one KV sequence [1, Hkv, num_cache_pages * block_size, D]);
            ``Hq % Hkv == 0``.
        tmd: the lowered flex metadata.
        scale: softmax scale.
        block_mask: a prebuilt mask (default: ``block_mask(tmd)``).
        compile: run the compiled kernel (a module-level ``torch.compile(flex_attention)``).
        kernel_options: passed to flex; with ``compile`` on CUDA the default forces the main
            flex kernel (not the decode kernel) with tiles ``BLOCK_M = q_block_size`` and
            ``BLOCK_N = block_size`` (both >= 16 there).

    Returns:
        [T, Hq, D] in q's dtype (a view of flex's output). Padding tokens get zeros.
    """
    tokens, q_heads, dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise SpecError(
            f"k_cache/v_cache: expected two [num_cache_pages, block_size, Hkv, D] tensors of one "
            f"shape, received {tuple(k_cache.shape)} and {tuple(v_cache.shape)}."
        )
    pages, page, kv_heads, kdim = k_cache.shape
    expected = (int(tmd.num_actual_tokens), int(tmd.num_cache_pages), int(tmd.block_size))
    if (tokens, pages, page) != expected or kdim != dim or q_heads % kv_heads:
        raise SpecError(
            f"flex_paged_attention: q {tuple(q.shape)} and cache {tuple(k_cache.shape)} do not "
            f"match the metadata (num_actual_tokens, num_cache_pages, block_size) = {expected}, "
            f"or the head dims/counts disagree (Hq must be a multiple of Hkv)."
        )
    mask = block_mask if block_mask is not None else _make_block_mask(tmd)
    query = q.permute(1, 0, 2).unsqueeze(0)
    key = k_cache.view(pages * page, kv_heads, dim).permute(1, 0, 2).unsqueeze(0)
    value = v_cache.view(pages * page, kv_heads, dim).permute(1, 0, 2).unsqueeze(0)
    if compile and kernel_options is None and q.device.type == "cuda":
        kernel_options = {
            "FORCE_USE_FLEX_ATTENTION": True,
            "BLOCK_M": int(tmd.q_block_size),
            "BLOCK_N": int(tmd.block_size),
        }
    if compile and q.device.type == "cpu":
        mask = _widen_for_cpu_kernel(mask, pages)
    run = _compiled_flex_attention() if compile else flex_attention
    out = run(query, key, value, block_mask=mask, scale=scale, enable_gqa=q_heads != kv_heads,
              kernel_options=kernel_options)
    return out[0].permute(1, 0, 2)


def _widen_for_cpu_kernel(mask: BlockMask, num_kv_blocks: int) -> BlockMask:
    """The compiled CPU kernel (inductor's C++ flex template) asserts that ``kv_indices`` has a
    column per KV block of the sequence; the GPU kernel reads only ``kv_num_blocks`` entries. So
    on CPU the list is padded with -1 to ``num_kv_blocks`` columns (never read either)."""
    width = mask.kv_indices.shape[-1]
    if width >= num_kv_blocks:
        return mask
    kwargs: dict[str, Any] = {"compute_q_blocks": False} if _HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        mask.kv_num_blocks,
        torch.nn.functional.pad(mask.kv_indices, (0, num_kv_blocks - width), value=-1),
        BLOCK_SIZE=mask.BLOCK_SIZE,
        mask_mod=mask.mask_mod,
        seq_lengths=mask.seq_lengths,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# Sync-free device forms
# ----------------------------------------------------------------------------------------------


def doc_ids_device(query_start_loc: torch.Tensor, total_tokens: int, *,
                   padded_tokens: int | None = None) -> torch.Tensor:
    """Token -> request row on the device, int32 [padded_tokens or total_tokens].

    ``repeat_interleave(arange(R), diff(query_start_loc), output_size=total_tokens)``: the host
    knows the total, so the op never reads the device to size its output. Padding tokens
    (``total_tokens .. padded_tokens``) get R - 1, as in the host builder.
    """
    rows = query_start_loc.shape[0] - 1
    counts = query_start_loc[1:] - query_start_loc[:-1]
    ids = torch.repeat_interleave(
        torch.arange(rows, dtype=torch.int32, device=query_start_loc.device), counts,
        output_size=total_tokens,
    )
    if padded_tokens is None or padded_tokens == total_tokens:
        return ids
    out = torch.empty(padded_tokens, dtype=torch.int32, device=query_start_loc.device)
    out[:total_tokens].copy_(ids)
    out[total_tokens:].fill_(max(rows - 1, 0))
    return out


def doc_ids_static_device(query_start_loc: torch.Tensor, padded_tokens: int) -> torch.Tensor:
    """Token -> request row on the device without any token count: int32 [padded_tokens].

    ``bucketize(arange(padded_tokens), query_start_loc[1:], right=True)`` clipped to R - 1:
    equal to `doc_ids_device` and the host ``doc_ids``, but its only size is the bucket's, so a
    CUDA graph captured once serves every batch of the bucket (``output_size`` would bake one
    step's total into the graph).
    """
    rows = query_start_loc.shape[0] - 1
    token = torch.arange(padded_tokens, dtype=query_start_loc.dtype, device=query_start_loc.device)
    row = torch.bucketize(token, query_start_loc[1:], out_int32=True, right=True)
    return row.clamp_(max=max(rows - 1, 0))


def left_pack_device(x: torch.Tensor, num_values: int, ignore: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` [B, N], the first occurrence of each value, left-packed, -1 after.

    Values equal to ``ignore`` are dropped. Fixed shapes throughout: the first position of each
    value comes from a ``scatter_reduce(amin)`` into a [B, num_values + 1] table, the kept
    entries get destination ``cumsum(keep) - 1`` and the dropped ones a garbage column N of a
    [B, N + 1] output, which is cut off (it receives arbitrary values). ``nonzero`` would size
    its output from device data, a host sync.

    Args:
        x: [B, N] integer tensor, values in [0, num_values].
        num_values: an inclusive upper bound on the values (the number of cache pages is one;
            vLLM's ``M``, the largest value, is another). Memory is O(B * num_values).
        ignore: the value to drop (0, the null page).

    Returns:
        (packed [B, N] in x's dtype, counts [B] int32: kept entries per row).
    """
    rows, width = x.shape
    index = x.long()
    position = torch.arange(width, device=x.device).expand(rows, width)
    first = torch.full((rows, num_values + 1), width, dtype=torch.long, device=x.device)
    first.scatter_reduce_(1, index, position, reduce="amin", include_self=True)
    keep = (first.gather(1, index) == position) & (x != ignore)
    kept_before = keep.cumsum(1)
    dest = torch.where(keep, kept_before - 1, width)
    out = torch.full((rows, width + 1), -1, dtype=x.dtype, device=x.device)
    out.scatter_(1, dest, x)
    if width:
        counts = kept_before[:, -1].to(torch.int32)
    else:
        counts = torch.zeros(rows, dtype=torch.int32, device=x.device)
    return out[:, :width].contiguous(), counts


def physical_to_logical_device(
    block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, num_pages: int, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The inverse block table on the device, int32 [R, num_pages] (see `FlexMetadata`).

    Columns at or beyond ``ceil(seq_lens / block_size)`` are redirected to page 0 with value -1
    (stale entries never count), a ``scatter_reduce(amax)`` keeps the latest logical column of a
    page listed twice, and column 0 (the null page) is reset with a slice fill, not ``t[:, 0] =
    -1``-style scalar stores. Exact device ``seq_lens`` give the exact table.

    Args:
        out: optional persistent [R, num_pages] int32 buffer to write into (CUDA graphs).
    """
    rows, width = block_table.shape
    columns = torch.arange(width, dtype=torch.int32, device=block_table.device)
    used = _pages_of(seq_lens, block_size)
    live = columns[None, :] < used[:, None]
    index = torch.where(live, block_table, 0).long()
    logical = torch.where(live, columns[None, :], -1).to(torch.int32)
    if out is None:
        out = torch.full((rows, num_pages), -1, dtype=torch.int32, device=block_table.device)
    else:
        out.fill_(-1)
    out.scatter_reduce_(1, index, logical, reduce="amax", include_self=True)
    out[:, :1].fill_(-1)
    return out


def kv_blocks_device(
    doc_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    decode_offset: torch.Tensor,
    block_table: torch.Tensor,
    *,
    block_size: int,
    q_block_size: int,
    max_pages: int,
    num_pages: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-sparse description (kv_num_blocks, kv_indices) built on the device.

    Every real token (index below ``query_start_loc[-1]``, compared on the device) lists its
    row's pages at columns ``0 .. position // block_size`` (others become the ignored page 0),
    the token rows of one query block are laid side by side, and `left_pack_device` keeps each
    page's first occurrence. Same order as the host builder, so for exact lengths the result
    equals the host's bit for bit. Sizes are host ints fixed per bucket (so the function can be
    captured in a CUDA graph and replayed for any batch of the bucket): ``max_pages`` (a bound
    on pages per row, e.g. ``md.max_pages_per_seq`` or the block-table width), ``width``
    (``md.max_kv_blocks``; a list longer than it would be cut, which lengths at or below the
    host bounds cannot produce), ``num_pages`` (cache pages).

    Returns:
        kv_num_blocks [ceil(T / q_block_size)] int32, kv_indices [same, width] int32.
    """
    device = doc_ids.device
    tokens = doc_ids.shape[0]
    num_blocks = -(-tokens // q_block_size)
    row, position, real = _token_positions(doc_ids, query_start_loc, decode_offset)
    reach = torch.where(real, torch.div(position, block_size, rounding_mode="floor"), -1)
    columns = torch.arange(max_pages, device=device)
    pages = block_table[:, :max_pages].index_select(0, row)
    pages = torch.where(columns[None, :] <= reach[:, None], pages, 0)
    pages = torch.nn.functional.pad(pages, (0, 0, 0, num_blocks * q_block_size - tokens))
    pages = pages.reshape(num_blocks, q_block_size * max_pages)
    packed, counts = left_pack_device(pages, num_pages, ignore=0)
    have = packed.shape[1]
    if width <= have:
        packed = packed[:, :width].contiguous()
    else:
        packed = torch.nn.functional.pad(packed, (0, width - have), value=-1)
    return counts.clamp_(max=width), packed.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Naive forms (they synchronise; the equivalence tests compare the forms above against them)
# ----------------------------------------------------------------------------------------------


def _naive_doc_ids(query_start_loc: torch.Tensor) -> torch.Tensor:
    """``repeat_interleave`` without ``output_size``: the output size is read from the device."""
    rows = query_start_loc.shape[0] - 1
    counts = query_start_loc[1:] - query_start_loc[:-1]
    return torch.repeat_interleave(torch.arange(rows, dtype=torch.int32, device=query_start_loc.device), counts)


def _naive_left_pack(x: torch.Tensor, ignore: int = 0) -> torch.Tensor:
    """First occurrences left-packed with ``nonzero`` (a data-dependent shape, hence a sync)."""
    rows, width = x.shape
    order = torch.arange(width, device=x.device).expand(rows, width)
    same = x[:, :, None] == x[:, None, :]
    earlier = order[:, None, :] < order[:, :, None]
    keep = ~(same & earlier).any(-1) & (x != ignore)
    dest = keep.cumsum(1) - 1
    out = torch.full_like(x, -1)
    r, c = torch.nonzero(keep, as_tuple=True)
    out[r, dest[r, c]] = x[r, c]
    return out


def _naive_physical_to_logical(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                               num_pages: int) -> torch.Tensor:
    """Per-row loops over ``.tolist()`` values: the dictionary form of the inverse table."""
    table = block_table.tolist()
    lens = seq_lens.tolist()
    out = [[-1] * num_pages for _ in table]
    for r, row in enumerate(table):
        for c in range(-(-lens[r] // block_size)):
            out[r][row[c]] = max(out[r][row[c]], c)
        out[r][0] = -1
    return torch.tensor(out, dtype=torch.int32, device=block_table.device).reshape(len(table), num_pages)
