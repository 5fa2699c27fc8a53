"""Reference Mamba consumers in torch, driven only by `attnsync.build(..., backend="mamba")`.

Opt-in module: it imports ``torch`` at module level.

Two consumers read the torch-lowered Mamba metadata (`attnsync.adapters.torch.lower`) and
nothing else about the batch:

- :func:`causal_conv1d_varlen`: the depthwise causal conv1d of a Mamba layer over a mixed
  batch. Prefill rows run as fixed-size programs of `conv_block_m` tokens (`batch_ptr`,
  `token_chunk_offset_ptr`), decode rows as a one-token update per step;
- :func:`ssd_chunked_scan`: the Mamba2 state-space scan in its chunked (SSD) form. Prefill
  rows are cut into the chunks of `cu_chunk_seqlen_p`; inside a chunk the output is a
  quadratic form with cumulative `dt * A` decay, across chunks of one request (`seq_idx_p`)
  the state is carried, and the first chunk of a request starts from the state cache when
  `has_initial_states_p` says so. Decode rows use the one-step recurrence.

:func:`mamba2_mixer` chains them into one Mamba2 layer (conv, split, softplus, scan).

Everything on the device is fixed-shape and sync-free: gathers, `where`, `index_copy_` into
one scratch row for masked writes, loops bounded by host ints of the metadata
(`num_chunks`, `max_decode_query_len`). Nothing reads a device value back, so the layer runs
under `attnsync.testing.no_sync()`. These are references (clarity over speed), not kernels.

State slots (where states are read and written) follow `cache_mode`:

- ``"none"`` / ``"align"``: a prefill row reads (when it has an initial state) and writes its
  slot `state_indices_tensor_p[r]`; a decode row reads column 0, or column
  `num_accepted_tokens[r] - 1` under speculative decoding, and then writes the state after its
  token j to column j (speculative) or its final state to column 0;
- ``"all"``: a row reads column `block_idx_last_computed_token` and writes the state of every
  block it completes (prefill: at chunk ends that are block ends) plus its final state at
  column `block_idx_last_scheduled_token`, so column i always holds the state after token
  `min((i + 1) * block_size, seq_len)`.

A row without new tokens writes nothing. Slot -1 (padded decode rows) is never read or written.

The module also holds the sequential float64 numpy oracles (:func:`sequential_conv1d`,
:func:`sequential_ssd`) that the consumers are tested against. They read the `Batch` itself,
one request and one token at a time, and share no code with the consumers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "causal_conv1d_varlen",
    "mamba2_mixer",
    "sequential_conv1d",
    "sequential_mixer",
    "sequential_ssd",
    "ssd_chunked_scan",
]


# ---------------------------------------------------------------------------------------------
# Slot plan: where each path reads and writes states (device tensors only).


@dataclass(frozen=True)
class _Slots:
    p_init: torch.Tensor  # [np] int64 slot read by each prefill row
    p_has_init: torch.Tensor  # [np] bool
    p_final: torch.Tensor  # [np] int64 slot of the final state
    p_write: torch.Tensor  # [np] bool: the row has new tokens
    p_len: torch.Tensor  # [np] int64 new tokens per prefill row
    ck_dest: torch.Tensor | None  # [K] int64 checkpoint slot of each chunk (mode "all")
    ck_write: torch.Tensor | None  # [K] bool: the chunk ends a block
    d_init: torch.Tensor  # [Dr] int64
    d_init_ok: torch.Tensor  # [Dr] bool
    d_len: torch.Tensor  # [Dr] int64 tokens per decode row
    d_start: torch.Tensor  # [Dr] int64 first token of each decode row
    d_computed: torch.Tensor | None  # [Dr] int64 (mode "all")


def _slots(md: Any) -> _Slots:
    nd_rows, npf, nd = md.num_decode_rows, md.num_prefills, md.num_decodes
    qsl_p = md.query_start_loc_p.long()
    p_len = qsl_p[1:] - qsl_p[:-1]
    has_init = md.has_initial_states_p.bool()
    qsl_d = md.query_start_loc_d.long()
    d_len = qsl_d[1:] - qsl_d[:-1]
    idx_p, idx_d = md.state_indices_tensor_p.long(), md.state_indices_tensor_d.long()
    ck_dest = ck_write = d_computed = None
    if md.cache_mode == "all":
        last_comp = md.block_idx_last_computed_token.long()
        last_sched = md.block_idx_last_scheduled_token.long()
        p_init = idx_p.gather(1, last_comp[nd : nd + npf, None]).squeeze(1)
        p_final = idx_p.gather(1, last_sched[nd : nd + npf, None]).squeeze(1)
        if md.num_chunks:
            seq = md.seq_idx_p.long()
            cu = md.cu_chunk_seqlen_p.long()
            end = md.num_computed_tokens_p.long()[seq] + cu[1:] - qsl_p[seq]  # absolute
            col = torch.clamp(end // md.block_size - 1, min=0)
            ck_dest = idx_p[seq].gather(1, col[:, None]).squeeze(1)
            ck_write = end % md.block_size == 0
        d_init = idx_d.gather(1, last_comp[:nd_rows, None]).squeeze(1)
        d_computed = md.seq_lens.long()[:nd_rows] - d_len
    else:
        p_init = p_final = idx_p
        if md.has_num_accepted_tokens:
            col = md.num_accepted_tokens.long() - 1
            d_init = idx_d.gather(1, col[:, None]).squeeze(1)
        else:
            d_init = idx_d[:, 0]
    return _Slots(
        p_init=p_init, p_has_init=has_init, p_final=p_final, p_write=p_len > 0, p_len=p_len,
        ck_dest=ck_dest, ck_write=ck_write, d_init=d_init, d_init_ok=d_init >= 0, d_len=d_len,
        d_start=qsl_d[:-1], d_computed=d_computed,
    )


def _decode_dest(md: Any, slots: _Slots, j: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Slot and mask for the state after decode token j, or None when only the final is written."""
    idx_d = md.state_indices_tensor_d.long()
    valid = j < slots.d_len
    if md.cache_mode == "all":
        col = slots.d_computed + j  # position of token j; its block holds the state after it
        dest = idx_d.gather(1, (col // md.block_size).clamp(0, idx_d.shape[1] - 1)[:, None]).squeeze(1)
    elif md.has_num_accepted_tokens:
        dest = idx_d[:, min(j, idx_d.shape[1] - 1)]
    else:
        return None
    return dest, valid & (dest >= 0)


def _gather_states(cache: torch.Tensor, slot: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """cache[slot] where ok, zeros elsewhere (slot clamped so every gather is in bounds)."""
    rows = cache.index_select(0, slot.clamp(0, cache.shape[0] - 1))
    mask = ok.view(-1, *([1] * (cache.dim() - 1)))
    return torch.where(mask, rows, torch.zeros_like(rows))


def _write_states(cache: torch.Tensor, slot: torch.Tensor, ok: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `cache` with `values[i]` written at `slot[i]` where `ok[i]` (one scratch row)."""
    num = cache.shape[0]
    ext = torch.cat([cache, cache.new_zeros((1, *cache.shape[1:]))])
    ext.index_copy_(0, torch.where(ok, slot, torch.full_like(slot, num)), values.to(cache.dtype))
    return ext[:num]


def _scatter_tokens(out: torch.Tensor, token: torch.Tensor, ok: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`out` with values written at token rows where ok (masked rows go to a scratch row)."""
    num = out.shape[0]
    ext = torch.cat([out, out.new_zeros((1, *out.shape[1:]))])
    ext.index_copy_(0, torch.where(ok, token, torch.full_like(token, num)), values.to(out.dtype))
    return ext[:num]


# ---------------------------------------------------------------------------------------------
# Causal conv1d


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"activation: expected None or 'silu', received {activation!r}")


def _conv_windows(
    x_ext: torch.Tensor, start: torch.Tensor, init: torch.Tensor, rel: torch.Tensor, width: int
) -> torch.Tensor:
    """Inputs at relative positions `rel` of rows starting at `start`, history from `init`.

    x_ext: [Tp + 1, dim] (last row zero); start: [M] int64; init: [M, dim, width - 1];
    rel: [M, L] int64 relative positions (negative ones read `init`, whose last column is the
    input just before the row's first token). Returns [M, L, dim].
    """
    num = x_ext.shape[0] - 1
    from_x = rel >= 0
    xi = torch.where(from_x, start[:, None] + rel, torch.full_like(rel, num)).clamp(0, num)
    xv = x_ext.index_select(0, xi.flatten()).view(*rel.shape, x_ext.shape[1])
    hist = torch.cat([init, init.new_zeros(init.shape[0], init.shape[1], 1)], dim=2).transpose(1, 2)
    si = torch.where(from_x, torch.full_like(rel, width - 1), rel + (width - 1)).clamp(0, width - 1)
    sv = hist.gather(1, si[..., None].expand(*si.shape, hist.shape[2]))
    return torch.where(from_x[..., None], xv, sv)


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    md: Any,
    *,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d over a mixed batch, driven by torch-lowered Mamba metadata.

    Token t of a row sees inputs t - width + 1 .. t of the same row; inputs before the row's
    first new token come from its conv state (the row's last width - 1 inputs) when it has
    one, else are 0.

    Args:
        x: [T, dim] float, decode tokens first then prefill tokens (`T >= num_scheduled_tokens`).
        weight: [dim, width]. bias: [dim] or None.
        conv_state: [num_slots, dim, width - 1], the conv-state cache (not modified).
        md: `attnsync.adapters.torch.lower(attnsync.build(batch, backend="mamba", ...))`.
        activation: None or "silu".

    Returns:
        `(out [T, dim], new_conv_state)`; padding tokens give 0.
    """
    width = weight.shape[1]
    dim = x.shape[1]
    ndt, npt, npf = md.num_decode_tokens, md.num_prefill_tokens, md.num_prefills
    slots = _slots(md)
    out = x.new_zeros(x.shape)
    writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if npf:
        xp = x[ndt : ndt + npt]
        x_ext = torch.cat([xp, xp.new_zeros(1, dim)])
        qsl_p = md.query_start_loc_p.long()
        init = _gather_states(conv_state, slots.p_init, slots.p_has_init).to(x.dtype)
        prog_req = md.batch_ptr.long()
        prog_ok = prog_req >= 0
        req = prog_req.clamp(0, npf - 1)
        block = md.conv_block_m
        rel = md.token_chunk_offset_ptr.long().clamp(min=0)[:, None] * block + torch.arange(
            block, device=x.device
        )
        tok_ok = prog_ok[:, None] & (rel < slots.p_len[req][:, None])
        window_rel = rel[:, :, None] - (width - 1) + torch.arange(width, device=x.device)  # [P, 8, w]
        start = qsl_p[req]
        win = _conv_windows(x_ext, start, init[req], window_rel.flatten(1), width)
        win = win.view(*window_rel.shape, dim)  # [P, 8, width, dim]
        y = torch.einsum("pawd,dw->pad", win, weight.to(x.dtype))
        if bias is not None:
            y = y + bias.to(x.dtype)
        y = _activate(y, activation)
        tok = (start[:, None] + rel).flatten()
        out_p = _scatter_tokens(x.new_zeros(npt, dim), tok, tok_ok.flatten(), y.flatten(0, 1))
        out = torch.cat([out[:ndt], out_p, out[ndt + npt :]])
        hist = torch.arange(width - 1, device=x.device) - (width - 1)  # the last width-1 inputs
        if slots.ck_dest is not None:
            seq = md.seq_idx_p.long()
            end_rel = md.cu_chunk_seqlen_p.long()[1:] - qsl_p[seq]
            ck = _conv_windows(x_ext, qsl_p[seq], init[seq], end_rel[:, None] + hist, width)
            writes.append((slots.ck_dest, slots.ck_write, ck.transpose(1, 2)))
        final = _conv_windows(x_ext, qsl_p[:-1], init, slots.p_len[:, None] + hist, width)
        writes.append((slots.p_final, slots.p_write, final.transpose(1, 2)))
    if md.max_decode_query_len:
        state = _gather_states(conv_state, slots.d_init, slots.d_init_ok).to(x.dtype)
        w = weight.to(x.dtype)
        for j in range(md.max_decode_query_len):
            valid = j < slots.d_len
            tok = slots.d_start + j
            xt = x.index_select(0, torch.where(valid, tok, torch.zeros_like(tok)))
            win = torch.cat([state, xt[:, :, None]], dim=2)  # [Dr, dim, width]
            y = (win * w).sum(-1)
            if bias is not None:
                y = y + bias.to(x.dtype)
            out = _scatter_tokens(out, tok, valid, _activate(y, activation))
            state = torch.where(valid[:, None, None], win[:, :, 1:], state)
            dest = _decode_dest(md, slots, j)
            if dest is not None:
                writes.append((dest[0], dest[1], state))
        if md.cache_mode != "all" and not md.has_num_accepted_tokens:
            writes.append((slots.d_init, slots.d_init_ok & (slots.d_len > 0), state))
    new_state = conv_state
    for slot, ok, values in writes:
        new_state = _write_states(new_state, slot, ok, values)
    return out, new_state


# ---------------------------------------------------------------------------------------------
# Mamba2 SSD scan


def _heads(v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H // G)."""
    groups = v.shape[-2]
    rep = num_heads // groups
    return v.unsqueeze(-2).expand(*v.shape[:-1], rep, v.shape[-1]).reshape(*v.shape[:-2], num_heads, v.shape[-1])


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    ssm_state: torch.Tensor,
    md: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2 selective scan over a mixed batch (chunked SSD for prefill rows, recurrence for decodes).

    The recurrence it computes, per request and token: `h = exp(dt * A) * h + dt * x B^T`,
    `y = h C + D * x`, with h of shape [H, P, N] per request.

    Args:
        x: [T, H, P] float. dt: [T, H] (already positive, e.g. after softplus). A: [H] (< 0).
        B, C: [T, G, N] with H % G == 0. D: [H].
        ssm_state: [num_slots, H, P, N], the state cache (not modified).
        md: torch-lowered Mamba metadata with chunk metadata (Mamba2, or Mamba1 in mode "all").

    Returns:
        `(y [T, H, P], new_ssm_state)`; padding tokens give 0.
    """
    if not md.has_chunk_metadata:
        raise ValueError("ssd_chunked_scan: the metadata has no chunk metadata (Mamba1 outside cache_mode 'all').")
    num_heads, head_dim = x.shape[1], x.shape[2]
    ndt, npt, npf, num_chunks, q = md.num_decode_tokens, md.num_prefill_tokens, md.num_prefills, md.num_chunks, md.chunk_size
    slots = _slots(md)
    y_all = x.new_zeros(x.shape)
    A = A.to(x.dtype)
    D = D.to(x.dtype)
    writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if npf:
        init = _gather_states(ssm_state, slots.p_init, slots.p_has_init).to(x.dtype)  # [np, H, P, N]
        h_final = init
        if num_chunks:
            cu = md.cu_chunk_seqlen_p.long()
            pos = cu[:-1, None] + torch.arange(q, device=x.device)  # [K, Q]
            ok = pos < cu[1:, None]
            idx = torch.where(ok, pos, torch.zeros_like(pos)) + ndt
            okf = ok.to(x.dtype)
            xg = x.index_select(0, idx.flatten()).view(num_chunks, q, num_heads, head_dim) * okf[..., None, None]
            dtg = dt.index_select(0, idx.flatten()).view(num_chunks, q, num_heads).to(x.dtype) * okf[..., None]
            Bg = _heads(B.index_select(0, idx.flatten()).view(num_chunks, q, *B.shape[1:]).to(x.dtype), num_heads)
            Cg = _heads(C.index_select(0, idx.flatten()).view(num_chunks, q, *C.shape[1:]).to(x.dtype), num_heads)
            L = torch.cumsum(dtg * A, dim=1)  # [K, Q, H] cumulative log-decay inside each chunk
            diff = L[:, :, None, :] - L[:, None, :, :]  # [K, t, u, H]
            causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()[None, :, :, None]
            decay = torch.exp(torch.where(causal, diff, torch.full_like(diff, -torch.inf)))
            scores = torch.einsum("kthn,kuhn->ktuh", Cg, Bg) * decay
            y = torch.einsum("ktuh,kuh,kuhp->kthp", scores, dtg, xg)
            to_end = torch.exp(L[:, -1:, :] - L)  # [K, Q, H] decay from token u to the chunk end
            local = torch.einsum("kuh,kuh,kuhp,kuhn->khpn", to_end, dtg, xg, Bg)
            chunk_decay = torch.exp(L[:, -1, :])  # [K, H]
            seq = md.seq_idx_p.long()
            new_req = torch.ones(num_chunks, dtype=torch.bool, device=x.device)
            new_req[1:] = seq[1:] != seq[:-1]
            init_k = init.index_select(0, seq)
            h = torch.zeros_like(init_k[0])
            h_in, h_out = [], []
            for k in range(num_chunks):  # a host int: one step per chunk, no device read
                h = torch.where(new_req[k], init_k[k], h)
                h_in.append(h)
                h = chunk_decay[k][:, None, None] * h + local[k]
                h_out.append(h)
            h_in_t, h_out_t = torch.stack(h_in), torch.stack(h_out)
            y = y + torch.exp(L)[..., None] * torch.einsum("kthn,khpn->kthp", Cg, h_in_t)
            y = y + D[:, None] * xg
            tok = (torch.where(ok, pos, torch.full_like(pos, npt))).flatten()
            y_p = _scatter_tokens(x.new_zeros(npt, num_heads, head_dim), tok, ok.flatten(), y.flatten(0, 1))
            y_all = torch.cat([y_all[:ndt], y_p, y_all[ndt + npt :]])
            last = md.last_chunk_indices_p.long().clamp(min=0)
            h_final = h_out_t.index_select(0, last)
            if slots.ck_dest is not None:
                writes.append((slots.ck_dest, slots.ck_write, h_out_t))
        writes.append((slots.p_final, slots.p_write, h_final))
    if md.max_decode_query_len:
        h = _gather_states(ssm_state, slots.d_init, slots.d_init_ok).to(x.dtype)  # [Dr, H, P, N]
        for j in range(md.max_decode_query_len):
            valid = j < slots.d_len
            tok = slots.d_start + j
            safe = torch.where(valid, tok, torch.zeros_like(tok))
            xt = x.index_select(0, safe)
            dtt = dt.index_select(0, safe).to(x.dtype)
            Bt = _heads(B.index_select(0, safe).to(x.dtype), num_heads)
            Ct = _heads(C.index_select(0, safe).to(x.dtype), num_heads)
            step = torch.exp(dtt * A)[..., None, None] * h + (dtt[..., None] * xt)[..., None] * Bt[:, :, None, :]
            h = torch.where(valid[:, None, None, None], step, h)
            yt = torch.einsum("rhpn,rhn->rhp", h, Ct) + D[:, None] * xt
            y_all = _scatter_tokens(y_all, tok, valid, yt)
            dest = _decode_dest(md, slots, j)
            if dest is not None:
                writes.append((dest[0], dest[1], h))
        if md.cache_mode != "all" and not md.has_num_accepted_tokens:
            writes.append((slots.d_init, slots.d_init_ok & (slots.d_len > 0), h))
    new_state = ssm_state
    for slot, ok, values in writes:
        new_state = _write_states(new_state, slot, ok, values)
    return y_all, new_state


def mamba2_mixer(
    xbc: torch.Tensor,
    dt_raw: torch.Tensor,
    *,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    md: Any,
    num_heads: int,
    num_groups: int,
    state_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Mamba2 layer's metadata-driven part: conv1d (silu), split, softplus, SSD scan.

    Args:
        xbc: [T, H*P + 2*G*N], the concatenated x, B, C projections. dt_raw: [T, H].
        conv_weight: [H*P + 2*G*N, width]; conv_bias: same first dim or None.
        dt_bias, A_log, D: [H]; A = -exp(A_log).
        conv_state: [slots, H*P + 2*G*N, width - 1]; ssm_state: [slots, H, P, N].

    Returns:
        `(y [T, H, P], new_conv_state, new_ssm_state)`.
    """
    conv_out, conv_state = causal_conv1d_varlen(xbc, conv_weight, conv_bias, conv_state, md, activation="silu")
    tokens = xbc.shape[0]
    gn = num_groups * state_size
    x = conv_out[:, : conv_out.shape[1] - 2 * gn].reshape(tokens, num_heads, -1)
    B = conv_out[:, conv_out.shape[1] - 2 * gn : conv_out.shape[1] - gn].reshape(tokens, num_groups, state_size)
    C = conv_out[:, conv_out.shape[1] - gn :].reshape(tokens, num_groups, state_size)
    dt = F.softplus(dt_raw + dt_bias)
    A = -torch.exp(A_log)
    y, ssm_state = ssd_chunked_scan(x, dt, A, B, C, D, ssm_state, md)
    return y, conv_state, ssm_state


# ---------------------------------------------------------------------------------------------
# Sequential float64 oracles (numpy, one request and one token at a time, from the Batch).


def _row_plan(batch: Any, *, cache_mode: str, decode_threshold: int, num_accepted_tokens: Any) -> list[dict]:
    """For each request row: its tokens, the slot read first (or None), and slots written after tokens."""
    plans = []
    q = [int(v) for v in batch.query_lens]
    s = [int(v) for v in batch.seq_lens]
    prefilling = [False] * len(q) if batch.is_prefilling is None else [bool(v) for v in batch.is_prefilling]
    bs = batch.block_size
    start = 0
    accepted = None if num_accepted_tokens is None else [int(v) for v in num_accepted_tokens]
    for r in range(len(q)):
        c = s[r] - q[r]
        table = [int(v) for v in batch.block_table[r]]
        decode = q[r] <= decode_threshold and not prefilling[r]
        writes: list[tuple[int, int]] = []  # (token j, slot written with the state after it)
        if cache_mode == "all":
            if decode:
                read = table[max(-(-c // bs) - 1, 0)]
            else:
                read = table[-(-c // bs) - 1] if c > 0 else None
            for j in range(q[r]):
                writes.append((j, table[(c + j) // bs]))
        else:
            base = 0 if cache_mode == "none" else max((s[r] - 1) // bs, 0)
            if decode and accepted is not None:
                read = table[base + accepted[r] - 1]
                writes = [(j, table[base + j]) for j in range(q[r])]
            else:
                read = table[base] if decode or c > 0 else None
                if q[r]:
                    writes = [(q[r] - 1, table[base])]
        plans.append(dict(start=start, length=q[r], read=read, writes=writes))
        start += q[r]
    return plans


def sequential_conv1d(
    batch: Any,
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    conv_state: np.ndarray,
    *,
    cache_mode: str,
    decode_threshold: int = 1,
    num_accepted_tokens: Any = None,
    activation: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 oracle of :func:`causal_conv1d_varlen`: per request, per token, from the batch."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    cache = np.array(conv_state, dtype=np.float64)
    out = np.zeros_like(x)
    width = weight.shape[1]
    for plan in _row_plan(batch, cache_mode=cache_mode, decode_threshold=decode_threshold,
                          num_accepted_tokens=num_accepted_tokens):
        state = cache[plan["read"]].copy() if plan["read"] is not None else np.zeros((x.shape[1], width - 1))
        for j in range(plan["length"]):
            t = plan["start"] + j
            window = np.concatenate([state, x[t][:, None]], axis=1)
            y = (window * weight).sum(axis=1)
            if bias is not None:
                y = y + bias
            if activation == "silu":
                y = y / (1.0 + np.exp(-y))
            out[t] = y
            state = window[:, 1:]
            for jj, slot in plan["writes"]:
                if jj == j:
                    cache[slot] = state
    return out, cache


def sequential_ssd(
    batch: Any,
    x: np.ndarray,
    dt: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    D: np.ndarray,
    ssm_state: np.ndarray,
    *,
    cache_mode: str,
    decode_threshold: int = 1,
    num_accepted_tokens: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 oracle of :func:`ssd_chunked_scan`: `h = exp(dt A) h + dt x B^T`, `y = h C + D x`."""
    x, dt, A, B, C, D = (np.asarray(v, dtype=np.float64) for v in (x, dt, A, B, C, D))
    cache = np.array(ssm_state, dtype=np.float64)
    num_heads = x.shape[1]
    rep = num_heads // B.shape[1]
    y = np.zeros_like(x)
    for plan in _row_plan(batch, cache_mode=cache_mode, decode_threshold=decode_threshold,
                          num_accepted_tokens=num_accepted_tokens):
        h = cache[plan["read"]].copy() if plan["read"] is not None else np.zeros(cache.shape[1:])
        for j in range(plan["length"]):
            t = plan["start"] + j
            for head in range(num_heads):
                g = head // rep
                h[head] = np.exp(dt[t, head] * A[head]) * h[head] + dt[t, head] * np.outer(x[t, head], B[t, g])
                y[t, head] = h[head] @ C[t, g] + D[head] * x[t, head]
            for jj, slot in plan["writes"]:
                if jj == j:
                    cache[slot] = h
    return y, cache


def sequential_mixer(
    batch: Any,
    xbc: np.ndarray,
    dt_raw: np.ndarray,
    *,
    conv_weight: np.ndarray,
    conv_bias: np.ndarray | None,
    dt_bias: np.ndarray,
    A_log: np.ndarray,
    D: np.ndarray,
    conv_state: np.ndarray,
    ssm_state: np.ndarray,
    num_heads: int,
    num_groups: int,
    state_size: int,
    cache_mode: str,
    decode_threshold: int = 1,
    num_accepted_tokens: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 oracle of :func:`mamba2_mixer` (sequential conv, then sequential scan)."""
    opts = dict(cache_mode=cache_mode, decode_threshold=decode_threshold, num_accepted_tokens=num_accepted_tokens)
    conv_out, conv_state = sequential_conv1d(batch, xbc, conv_weight, conv_bias, conv_state,
                                             activation="silu", **opts)
    tokens = conv_out.shape[0]
    gn = num_groups * state_size
    width = conv_out.shape[1]
    x = conv_out[:, : width - 2 * gn].reshape(tokens, num_heads, -1)
    B = conv_out[:, width - 2 * gn : width - gn].reshape(tokens, num_groups, state_size)
    C = conv_out[:, width - gn :].reshape(tokens, num_groups, state_size)
    z = np.asarray(dt_raw, dtype=np.float64) + np.asarray(dt_bias, dtype=np.float64)
    dt = np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20))))
    A = -np.exp(np.asarray(A_log, dtype=np.float64))
    y, ssm_state = sequential_ssd(batch, x, dt, A, B, C, D, ssm_state, **opts)
    return y, conv_state, ssm_state
