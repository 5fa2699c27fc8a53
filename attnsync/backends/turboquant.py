"""The ``turboquant`` backend: attention over a quantized paged KV cache (k8v4 style).

Host side only (numpy). This module holds three things:

1. the **builder** (`build`): the metadata a TurboQuant layer needs so that its per-layer code
   reads no device value;
2. the **cache format** (`SlotLayout`, `slot_layout`, `rotation_matrix`, `quantize`,
   `dequantize`, `write_slots`): the exact bytes of one cache slot, with a numpy quantizer that
   the Triton, torch and JAX writers match bit for bit;
3. the **float64 reference** (`reference_attention`) every consumer is tested against.

Consumers live in `attnsync.kernels.turboquant` (Triton and torch) and
`attnsync.kernels.turboquant_jax` (JAX).

Split and paths
---------------
Rows are split decode-first with threshold 1, as vLLM's TurboQuant does: rows with at most one
new token are decodes and run the decode kernel over the compressed cache; the rest form the
prefill sub-batch. The batch must be in that order (`attnsync.reorder(batch)` gives it). A
prefill row is served in one of three ways:

* **fresh** (`seq_len == query_len`): attention over the raw (unquantized) K/V of the step;
* **continuation** (`seq_len > query_len`, exact length): the cached context
  (`cached_len = seq_len - query_len` tokens) is dequantized and joined with the raw new K/V;
* **device-routed** (`seq_len` only an upper bound: an async speculative-decode row with
  `query_len > 1`): its exact length exists only on the device, so it must not feed the host
  loop. With ``inexact_spec_rows="device"`` (default) its tokens go to the decode kernel, which
  reads lengths on the device; with ``"refuse"`` such a batch raises `SpecError`.

When every prefill row is fresh (`prefill_all_fresh`, checked row by row), the layer makes one
varlen call over the whole prefill sub-batch. vLLM tested ``max_query_len == max_seq_len``
instead, which also accepts rows (q=10, s=10) and (q=2, s=5) and then silently drops the
second row's cached context; the per-row predicate cannot.

Options:
    decode_threshold: must be 1 (accepted only to say so clearly): TurboQuant decodes are
        single-token rows; speculative rows with more tokens are prefills by shape.
    inexact_spec_rows: ``"device"`` (default) or ``"refuse"``, see above.

Example:
    >>> import attnsync
    >>> batch = attnsync.Batch(query_lens=[1, 10, 2], seq_lens=[40, 10, 5],
    ...                        block_table=[[1, 2, 3], [4, 0, 0], [5, 0, 0]], block_size=16)
    >>> md = attnsync.build(batch, backend="turboquant")
    >>> md.num_decodes, md.num_prefills, md.prefill_all_fresh
    (1, 2, False)
    >>> [tuple(r) for r in md.host_loop_rows]
    [(1, 1, 10, 10, 0), (2, 11, 2, 5, 3)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .._batch import Batch
from .._spec import array_field, build_common, inherit
from .._validate import SpecError, as_choice, as_int, freeze

DECODE_THRESHOLD = 1  # vLLM's TurboQuant split: single-token rows are decodes
INEXACT_SPEC_ROW_MODES = ("device", "refuse")


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


class HostRow(NamedTuple):
    """One prefill row served by the per-layer host loop; all values exact host ints.

    Attributes:
        row: the row index in the batch (its block-table row).
        token_start: index of the row's first new token in the step's token arrays.
        query_len: new tokens of the row.
        seq_len: context after this step (exact).
        cached_len: `seq_len - query_len`, tokens already in the cache (0 for a fresh prefill).
    """

    row: int
    token_start: int
    query_len: int
    seq_len: int
    cached_len: int


@dataclass(frozen=True, kw_only=True, eq=False)
class TurboQuantMetadata:
    """Metadata of a TurboQuant attention layer (vLLM's `TurboQuantMetadata` plus host plans).

    R is `num_reqs` (padded), T `num_actual_tokens` (padded), P `num_prefills`, S
    `num_spec_tokens`. Rows `[0, num_decodes)` are decodes, rows
    `[num_decodes, num_decodes + num_prefills)` the prefill sub-batch, padded rows follow.

    Attributes:
        query_start_loc: [R+1] int32, exact. Device and host (`query_start_loc_cpu`).
        seq_lens: [R] int32, exact where the row is exact, else an upper bound. Device (pass
            exact device lengths to the torch adapter's `lower(..., seq_lens=)` for inexact
            batches) and host (`seq_lens_cpu`, vLLM's name for the bound).
        block_table: [R, W] int32 page ids. Device.
        slot_mapping: [T] int32 (int64 in torch), -1 for padding and inexact rows. Device.
        token_to_req: [T] int32 row of each token, padding tokens R. Device: the decode
            kernel finds a token's row with it.
        prefill_query_start_loc: [P+1] int32, `query_start_loc[nd:nd+P+1] - num_decode_tokens`
            (the prefill sub-batch's own offsets, exact). Device and host
            (`prefill_query_start_loc_cpu`).
        prefill_seq_lens: [P] int32, `seq_lens[nd:nd+P]` (bound; exact on host-loop rows).
            Host (`prefill_seq_lens_cpu`); the device view is a slice of `seq_lens`, so exact
            device lengths reach it too.
        spec_token_ids: [S] int32, token indices of device-routed rows (inexact prefill-shaped
            rows), in order. Device.
        num_reqs, num_actual_tokens, num_scheduled_reqs, num_scheduled_tokens: padded and real
            sizes, as in `CommonMetadata`.
        max_query_len: longest query (exact). max_seq_len: longest seq_len (bound).
        block_size: tokens per page.
        is_prefill: `max_query_len > 1` (vLLM's flag).
        num_decodes, num_decode_tokens: the decode prefix.
        decode_max_seq_len: largest decode `seq_len` (bound; sizes the split-KV grid).
        num_prefills, num_prefill_tokens: the prefill sub-batch (device-routed rows included).
        prefill_max_query_len: exact. prefill_max_seq_len: bound (exact when no row is routed).
        prefill_all_fresh: True when there are prefills and every one has
            `seq_len == query_len` (and therefore an exact length): one varlen call serves them.
        host_loop_rows: `HostRow` per exact prefill row, in order: everything the per-layer
            host loop reads, as Python ints.
        num_spec_rows, num_spec_tokens: device-routed rows and their tokens.
        spec_max_seq_len: largest seq_len bound among device-routed rows (0 if none).
        all_exact: every row's length is exact.
        slot_mapping_exact: every real token's slot is known on the host.
    """

    query_start_loc: np.ndarray = array_field(place="both")
    seq_lens: np.ndarray = array_field(place="both", host_name="seq_lens_cpu")
    block_table: np.ndarray = array_field(place="device")
    slot_mapping: np.ndarray = array_field(place="device")
    token_to_req: np.ndarray = array_field(place="device")
    prefill_query_start_loc: np.ndarray = array_field(place="both")
    prefill_seq_lens: np.ndarray = array_field(place="host", host_name="prefill_seq_lens_cpu")
    spec_token_ids: np.ndarray = array_field(place="device")
    num_reqs: int
    num_actual_tokens: int
    num_scheduled_reqs: int
    num_scheduled_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    is_prefill: bool
    num_decodes: int
    num_decode_tokens: int
    decode_max_seq_len: int
    num_prefills: int
    num_prefill_tokens: int
    prefill_max_query_len: int
    prefill_max_seq_len: int
    prefill_all_fresh: bool
    host_loop_rows: tuple[HostRow, ...]
    num_spec_rows: int
    num_spec_tokens: int
    spec_max_seq_len: int
    all_exact: bool
    slot_mapping_exact: bool


def build(
    batch: Batch,
    /,
    *,
    decode_threshold: int = DECODE_THRESHOLD,
    inexact_spec_rows: str = "device",
) -> TurboQuantMetadata:
    """Build TurboQuant metadata on the host (numpy only; the plan phase). See the module docstring."""
    threshold = as_int(decode_threshold, "decode_threshold", minimum=1)
    if threshold != DECODE_THRESHOLD:
        raise SpecError(
            f"decode_threshold: the turboquant backend splits at 1 (received {threshold}). Its "
            f"decode kernel serves single-token rows; speculative rows with more tokens are "
            f"prefills by shape (inexact ones are routed to the device, see inexact_spec_rows). "
            f"Fix: leave decode_threshold at 1."
        )
    mode = as_choice(inexact_spec_rows, "inexact_spec_rows", INEXACT_SPEC_ROW_MODES)
    common = build_common(batch, decode_threshold=DECODE_THRESHOLD)
    n = batch.num_reqs
    q = batch.query_lens
    s = batch.seq_lens
    qsl = common.query_start_loc

    is_decode = q <= DECODE_THRESHOLD
    if n > 1:
        late = is_decode[1:] & ~is_decode[:-1]  # a decode right after a prefill-shaped row
        if late.any():
            row = int(np.argmax(late)) + 1
            first = int(np.argmin(is_decode))
            raise SpecError(
                f"batch: backend 'turboquant' needs decode-first order (rows with query_len <= 1 "
                f"first), but row {row} (query_len {int(q[row])}) comes after row {first} "
                f"(query_len {int(q[first])}). Fix: `perm, batch = attnsync.reorder(batch)` and "
                f"apply `perm` to your per-request state."
            )
    nd = int(np.count_nonzero(is_decode))
    ndt = int(qsl[nd])
    num_prefills = n - nd
    pq, ps = q[nd:], s[nd:]
    p_exact = batch.seq_lens_exact[nd:]
    spec = ~p_exact  # prefill-shaped rows whose length is only an upper bound
    num_spec_rows = int(np.count_nonzero(spec))
    if num_spec_rows and mode == "refuse":
        row = nd + int(np.argmax(spec))
        raise SpecError(
            f"batch: row {row} has query_len {int(q[row])} > 1 and an inexact seq_len "
            f"({int(s[row])} is only an upper bound: an async speculative-decode row). The "
            f"turboquant host loop needs exact lengths for prefill-shaped rows, and "
            f"inexact_spec_rows='refuse' was asked for. Fix: pass exact seq_lens, or build with "
            f"inexact_spec_rows='device' so the row's tokens read their length on the device."
        )

    t = common.num_scheduled_tokens
    if num_spec_rows:
        spec_rows = np.zeros(common.num_reqs + 1, dtype=bool)  # + 1: padding tokens map to R
        spec_rows[nd:n] = spec
        spec_token_ids = np.flatnonzero(spec_rows[common.token_to_req[:t]]).astype(np.int32)
    else:
        spec_token_ids = np.zeros(0, dtype=np.int32)
    prefill_qsl = qsl[nd : n + 1] - np.int32(ndt)
    prefill_seq_lens = ps.copy()

    host_rows = np.flatnonzero(p_exact) + nd
    if host_rows.size:
        starts, lens, seqs = qsl[host_rows].tolist(), q[host_rows].tolist(), s[host_rows].tolist()
        host_loop_rows = tuple(
            HostRow(r, a, b, c, c - b) for r, a, b, c in zip(host_rows.tolist(), starts, lens, seqs, strict=True)
        )
    else:
        host_loop_rows = ()
    for value in (prefill_qsl, prefill_seq_lens, spec_token_ids):
        freeze(value)
    return inherit(
        common,
        TurboQuantMetadata,
        query_start_loc=qsl,
        prefill_query_start_loc=prefill_qsl,
        prefill_seq_lens=prefill_seq_lens,
        spec_token_ids=spec_token_ids,
        num_scheduled_reqs=n,
        num_scheduled_tokens=t,
        is_prefill=common.max_query_len > DECODE_THRESHOLD,
        num_decodes=nd,
        num_decode_tokens=ndt,
        decode_max_seq_len=int(s[:nd].max()) if nd else 0,
        num_prefills=num_prefills,
        num_prefill_tokens=t - ndt,
        prefill_max_query_len=int(pq.max()) if num_prefills else 0,
        prefill_max_seq_len=int(ps.max()) if num_prefills else 0,
        prefill_all_fresh=bool(num_prefills > 0 and (ps == pq).all()),
        host_loop_rows=host_loop_rows,
        num_spec_rows=num_spec_rows,
        num_spec_tokens=int(spec_token_ids.size),
        spec_max_seq_len=int(ps[spec].max()) if num_spec_rows else 0,
    )


# --------------------------------------------------------------------------------------------
# Cache format
# --------------------------------------------------------------------------------------------

SLOT_ALIGN = 16  # bytes; a slot starts on a 16-byte boundary, so its float32 fields are aligned
K_LEVELS = 127  # int8 keys use the symmetric range [-127, 127] (-128 is never written)
V_LEVELS = 15  # 4-bit values: codes 0..15


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """Byte layout of one cache slot (one token, one kv head). All fields little-endian.

    ========================  ===========================================================
    bytes                     content
    ========================  ===========================================================
    ``[0, D)``                key codes, int8: ``k ~ code * k_scale``, code in [-127, 127]
    ``[D, D + D/2)``          value codes, 4 bit: byte ``j`` = ``code[2j] | code[2j+1] << 4``;
                              ``v ~ v_min + code * v_scale``, code in [0, 15]
    ``[k_scale_offset, +4)``  ``k_scale``, float32 (``= 1.5 D``)
    ``[v_scale_offset, +4)``  ``v_scale``, float32
    ``[v_min_offset, +4)``    ``v_min``, float32
    rest up to ``slot_bytes`` padding (never read; writers leave it untouched)
    ========================  ===========================================================

    K and V are stored after the rotation of `rotation_matrix` (the cache never holds
    unrotated vectors). The cache is uint8 ``[num_blocks, num_kv_heads, block_size,
    slot_bytes]``: slot ``s`` of kv head ``h`` is ``cache[s // block_size, h, s % block_size]``.

    Quantization is float32 arithmetic with round-half-to-even, done identically by every
    writer (numpy, torch, Triton, JAX), so caches agree bit for bit:
    ``k_scale = max|k| / 127``, ``k_code = clip(round(k / k_scale), -127, 127)``;
    ``v_scale = (max v - min v) / 15``, ``v_code = clip(round((v - v_min) / v_scale), 0, 15)``;
    a zero scale (constant vector) writes codes 0.

    Attributes:
        head_dim: D, a power of two >= 8.
        slot_bytes: bytes per slot, ``round_up(1.5 D + 12, 16)`` (208 for D = 128, against
            512 for bf16 K and V: 2.46x smaller).
        k_offset, v_offset, k_scale_offset, v_scale_offset, v_min_offset: byte offsets.
    """

    head_dim: int
    slot_bytes: int
    k_offset: int
    v_offset: int
    k_scale_offset: int
    v_scale_offset: int
    v_min_offset: int

    @property
    def used_bytes(self) -> int:
        """Bytes a writer fills (the rest of the slot is padding)."""
        return self.v_min_offset + 4


def slot_layout(head_dim: int) -> SlotLayout:
    """The `SlotLayout` of `head_dim` (a power of two >= 8).

    Example:
        >>> slot_layout(128).slot_bytes, slot_layout(128).k_scale_offset
        (208, 192)
    """
    d = as_int(head_dim, "head_dim", minimum=8)
    if d & (d - 1):
        raise SpecError(
            f"head_dim: turboquant needs a power of two >= 8 (the rotation is a Hadamard "
            f"transform and the kernels tile the head dimension), received {d}."
        )
    scales = d + d // 2
    used = scales + 12
    return SlotLayout(
        head_dim=d,
        slot_bytes=-(-used // SLOT_ALIGN) * SLOT_ALIGN,
        k_offset=0,
        v_offset=d,
        k_scale_offset=scales,
        v_scale_offset=scales + 4,
        v_min_offset=scales + 8,
    )


def rotation_matrix(head_dim: int, *, kind: str = "hadamard", seed: int = 0) -> np.ndarray:
    """A fixed orthogonal matrix R, float32 [D, D]; the cache stores ``x @ R``.

    Scores are unchanged, ``(q R) . (k R) = q . k``, and an output computed from rotated
    values is turned back with ``R^T``. The rotation spreads an outlier coordinate over all
    coordinates, so one per-vector scale fits the whole vector better.

    Args:
        head_dim: D, a power of two for ``"hadamard"``.
        kind: ``"hadamard"``: a normalised Sylvester-Hadamard matrix with seeded random row
            signs, ``diag(signs) H / sqrt(D)``; ``"qr"``: the Q factor of a seeded Gaussian
            matrix (signs fixed so it is unique).
        seed: seed of the signs / Gaussian.

    Example:
        >>> r = rotation_matrix(8)
        >>> bool(np.allclose(r @ r.T, np.eye(8), atol=1e-6)), r.dtype
        (True, dtype('float32'))
    """
    d = as_int(head_dim, "head_dim", minimum=1)
    kind = as_choice(kind, "kind", ("hadamard", "qr"))
    rng = np.random.default_rng(seed)
    if kind == "hadamard":
        if d & (d - 1):
            raise SpecError(f"head_dim: a Hadamard rotation needs a power of two, received {d}. Fix: kind='qr'.")
        h = np.ones((1, 1))
        while h.shape[0] < d:
            h = np.block([[h, h], [h, -h]])
        signs = rng.choice([-1.0, 1.0], size=d)
        rot = signs[:, None] * h / math.sqrt(d)
    else:
        a = rng.standard_normal((d, d))
        qm, rm = np.linalg.qr(a)
        rot = qm * np.sign(np.diag(rm))[None, :]
    return np.ascontiguousarray(rot, dtype=np.float32)


def _round_half_even(x: np.ndarray) -> np.ndarray:
    return np.rint(x)


def quantize(k_rot: np.ndarray, v_rot: np.ndarray) -> np.ndarray:
    """Quantize rotated keys and values into slot bytes (the reference writer).

    Args:
        k_rot, v_rot: [..., D] float (rounded to float32 first), already rotated.

    Returns:
        uint8 [..., slot_bytes]; padding bytes are 0.
    """
    k = np.asarray(k_rot, dtype=np.float32)
    v = np.asarray(v_rot, dtype=np.float32)
    if k.shape != v.shape:
        raise SpecError(f"quantize: k_rot has shape {k.shape} but v_rot has {v.shape}; they must match.")
    layout = slot_layout(k.shape[-1])
    d = layout.head_dim
    one = np.float32(1)
    k_scale = np.abs(k).max(axis=-1) / np.float32(K_LEVELS)
    k_safe = np.where(k_scale > 0, k_scale, one)
    k_code = np.clip(_round_half_even(k / k_safe[..., None]), -K_LEVELS, K_LEVELS)
    k_code = np.where((k_scale > 0)[..., None], k_code, 0).astype(np.int8)
    v_min = v.min(axis=-1)
    v_scale = (v.max(axis=-1) - v_min) / np.float32(V_LEVELS)
    v_safe = np.where(v_scale > 0, v_scale, one)
    v_code = np.clip(_round_half_even((v - v_min[..., None]) / v_safe[..., None]), 0, V_LEVELS)
    v_code = np.where((v_scale > 0)[..., None], v_code, 0).astype(np.uint8)
    out = np.zeros(k.shape[:-1] + (layout.slot_bytes,), dtype=np.uint8)
    out[..., : d] = k_code.view(np.uint8)
    out[..., d : d + d // 2] = v_code[..., 0::2] | (v_code[..., 1::2] << 4)
    scales = np.stack([k_scale, v_scale, v_min], axis=-1).astype("<f4")
    out[..., layout.k_scale_offset : layout.used_bytes] = scales.view(np.uint8).reshape(k.shape[:-1] + (12,))
    return out


def dequantize(slots: np.ndarray, *, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Rotated keys and values of slot bytes: ``(k, v)``, each [..., D] of `dtype`.

    Args:
        slots: uint8 [..., slot_bytes] (a whole cache works: [num_blocks, Hkv, block, bytes]).
        dtype: float64 (default) computes ``code * scale`` exactly from the float32 fields.
    """
    slots = np.asarray(slots)
    if slots.dtype != np.uint8:
        raise TypeError(f"dequantize: expected uint8 slot bytes, received dtype {slots.dtype}.")
    head_dim = _head_dim_of(slots.shape[-1])
    layout = slot_layout(head_dim)
    d = layout.head_dim
    k_code = slots[..., :d].view(np.int8).astype(dtype)
    packed = slots[..., d : d + d // 2]
    v_code = np.stack([packed & 15, packed >> 4], axis=-1).reshape(slots.shape[:-1] + (d,)).astype(dtype)
    scales = np.ascontiguousarray(slots[..., layout.k_scale_offset : layout.used_bytes]).view("<f4").astype(dtype)
    k = k_code * scales[..., 0:1]
    v = scales[..., 2:3] + v_code * scales[..., 1:2]
    return k, v


def _head_dim_of(slot_bytes: int) -> int:
    """The head_dim whose layout has `slot_bytes` bytes per slot."""
    for exponent in range(3, 16):
        d = 1 << exponent
        size = slot_layout(d).slot_bytes
        if size == slot_bytes:
            return d
        if size > slot_bytes:
            break
    raise SpecError(f"slot_bytes: {slot_bytes} is not the slot size of any power-of-two head_dim.")


def write_slots(cache: np.ndarray, slots: np.ndarray, slot_mapping: np.ndarray) -> None:
    """Write ``slots`` [T, Hkv, slot_bytes] into ``cache`` in place at ``slot_mapping`` [T].

    Writes the used bytes of each slot only (padding untouched); slot -1 is skipped.
    """
    num_blocks, num_kv_heads, block_size, slot_bytes = cache.shape
    layout = slot_layout(_head_dim_of(slot_bytes))
    for t, slot in enumerate(np.asarray(slot_mapping).tolist()):
        if slot < 0:
            continue
        cache[slot // block_size, :, slot % block_size, : layout.used_bytes] = slots[t, :, : layout.used_bytes]


# --------------------------------------------------------------------------------------------
# Float64 reference
# --------------------------------------------------------------------------------------------


def reference_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cache: np.ndarray,
    md: TurboQuantMetadata,
    *,
    rotation: np.ndarray,
    scale: float,
    seq_lens: np.ndarray | None = None,
) -> np.ndarray:
    """What a TurboQuant layer must output, in float64, one row at a time.

    `cache` is the cache *after* the step's tokens were written, so the reference checks the
    attention of a consumer on exactly the bytes it wrote. Per path:

    * decode rows and device-routed rows: every key and value from the dequantized cache
      (the row's own new tokens included), causal;
    * fresh host-loop rows: the raw `k`, `v` of the step, causal;
    * continuation host-loop rows: the dequantized cached context (positions < cached_len)
      followed by the raw new `k`, `v`, causal (query i sits at position cached_len + i).

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] (unrotated, any float dtype).
        cache: uint8 [num_blocks, Hkv, block_size, slot_bytes] after the write.
        md: the step's metadata.
        rotation: the float32 [D, D] rotation the cache was written with.
        scale: softmax scale.
        seq_lens: exact lengths [R] for inexact batches (default `md.seq_lens`).

    Returns:
        float64 [T, Hq, D]; tokens of no row (padding) are NaN.
    """
    qf = np.asarray(q, dtype=np.float64)
    kf = np.asarray(k, dtype=np.float64)
    vf = np.asarray(v, dtype=np.float64)
    rot = np.asarray(rotation, dtype=np.float64)
    lens = np.asarray(md.seq_lens if seq_lens is None else seq_lens, dtype=np.int64)
    num_q_heads = qf.shape[1]
    num_kv_heads = kf.shape[1]
    group = num_q_heads // num_kv_heads
    block_size = cache.shape[2]
    k_deq, v_deq = dequantize(cache)  # rotated, [nb, Hkv, bs, D]
    k_deq = k_deq @ rot.T  # back to the original space: (x R) R^T = x
    v_deq = v_deq @ rot.T
    qsl = np.asarray(md.query_start_loc, dtype=np.int64)
    host = {r.row: r for r in md.host_loop_rows}
    out = np.full(qf.shape, np.nan)

    def cached(row: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        pages = md.block_table[row, : -(-length // block_size)].astype(np.int64)
        kk = np.concatenate([k_deq[p].transpose(1, 0, 2) for p in pages], axis=0)[:length]
        vv = np.concatenate([v_deq[p].transpose(1, 0, 2) for p in pages], axis=0)[:length]
        return kk, vv  # [length, Hkv, D]

    for row in range(md.num_scheduled_reqs):
        start, end = int(qsl[row]), int(qsl[row + 1])
        q_len = end - start
        if q_len == 0:
            continue
        if row in host:
            info = host[row]
            seq_len, ctx = info.seq_len, info.cached_len
            if ctx:
                kc, vc = cached(row, ctx)
                keys = np.concatenate([kc, kf[start:end]], axis=0)
                values = np.concatenate([vc, vf[start:end]], axis=0)
            else:
                keys, values = kf[start:end], vf[start:end]
        else:
            seq_len = int(lens[row])
            keys, values = cached(row, seq_len)
        q_pos = np.arange(seq_len - q_len, seq_len)[:, None]
        visible = np.arange(seq_len)[None, :] <= q_pos
        for h in range(num_q_heads):
            logits = scale * (qf[start:end, h] @ keys[:, h // group].T)
            logits = np.where(visible, logits, -np.inf)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            out[start:end, h] = p @ values[:, h // group]
    return out
