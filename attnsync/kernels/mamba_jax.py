"""Reference Mamba consumers in ``jax.numpy``, driven only by the JAX-lowered Mamba metadata.

Opt-in module: it imports ``jax`` at module level.

The same two consumers as :mod:`attnsync.kernels.mamba_reference` (read its docstring for the
state-slot rules), written for JAX: :func:`causal_conv1d_varlen_jax`,
:func:`ssd_chunked_scan_jax` and :func:`mamba2_mixer_jax`. The metadata object from
`attnsync.adapters.jax.lower` is a pytree whose host ints are static fields, so every function
can be wrapped in `jax.jit` with the metadata as an ordinary argument: shapes and loop bounds
come from those static ints, arrays never leave the device, and with inputs already on the
device the functions run under `jax.transfer_guard("disallow")`.

Masked writes go to an out-of-range slot with ``mode="drop"`` (a negative index would wrap);
gathers clamp their indices and mask the result. The chunk-to-chunk state passing is one
`lax.scan` over `num_chunks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["causal_conv1d_varlen_jax", "mamba2_mixer_jax", "ssd_chunked_scan_jax"]


@dataclass(frozen=True)
class _Slots:
    p_init: jax.Array
    p_has_init: jax.Array
    p_final: jax.Array
    p_write: jax.Array
    p_len: jax.Array
    ck_dest: jax.Array | None
    ck_write: jax.Array | None
    d_init: jax.Array
    d_init_ok: jax.Array
    d_len: jax.Array
    d_start: jax.Array
    d_computed: jax.Array | None


def _take_col(table: jax.Array, col: jax.Array) -> jax.Array:
    """table[i, col[i]] with col clamped into range."""
    col = jnp.clip(col, 0, max(table.shape[1] - 1, 0))
    return jnp.take_along_axis(table, col[:, None], axis=1)[:, 0]


def _slots(md: Any) -> _Slots:
    nd_rows, npf, nd = md.num_decode_rows, md.num_prefills, md.num_decodes
    qsl_p = md.query_start_loc_p
    p_len = qsl_p[1:] - qsl_p[:-1]
    has_init = md.has_initial_states_p != 0  # JAX gets int32 for bools
    qsl_d = md.query_start_loc_d
    d_len = qsl_d[1:] - qsl_d[:-1]
    idx_p, idx_d = md.state_indices_tensor_p, md.state_indices_tensor_d
    ck_dest = ck_write = d_computed = None
    if md.cache_mode == "all":
        last_comp = md.block_idx_last_computed_token
        last_sched = md.block_idx_last_scheduled_token
        p_init = _take_col(idx_p, last_comp[nd : nd + npf])
        p_final = _take_col(idx_p, last_sched[nd : nd + npf])
        if md.num_chunks:
            seq = md.seq_idx_p
            cu = md.cu_chunk_seqlen_p
            end = md.num_computed_tokens_p[seq] + cu[1:] - qsl_p[seq]
            ck_dest = _take_col(idx_p[seq], end // md.block_size - 1)
            ck_write = end % md.block_size == 0
        d_init = _take_col(idx_d, last_comp[:nd_rows])
        d_computed = md.seq_lens[:nd_rows] - d_len
    else:
        p_init = p_final = idx_p
        if md.has_num_accepted_tokens:
            d_init = _take_col(idx_d, md.num_accepted_tokens - 1)
        else:
            d_init = idx_d[:, 0]
    return _Slots(
        p_init=p_init, p_has_init=has_init, p_final=p_final, p_write=p_len > 0, p_len=p_len,
        ck_dest=ck_dest, ck_write=ck_write, d_init=d_init, d_init_ok=d_init >= 0, d_len=d_len,
        d_start=qsl_d[:-1], d_computed=d_computed,
    )


def _decode_dest(md: Any, slots: _Slots, j: int) -> tuple[jax.Array, jax.Array] | None:
    idx_d = md.state_indices_tensor_d
    valid = j < slots.d_len
    if md.cache_mode == "all":
        dest = _take_col(idx_d, (slots.d_computed + j) // md.block_size)
    elif md.has_num_accepted_tokens:
        dest = idx_d[:, min(j, idx_d.shape[1] - 1)]
    else:
        return None
    return dest, valid & (dest >= 0)


def _gather_states(cache: jax.Array, slot: jax.Array, ok: jax.Array) -> jax.Array:
    rows = cache[jnp.clip(slot, 0, cache.shape[0] - 1)]
    return jnp.where(ok.reshape(-1, *([1] * (cache.ndim - 1))), rows, 0)


def _write_rows(target: jax.Array, row: jax.Array, ok: jax.Array, values: jax.Array) -> jax.Array:
    """`target` with values[i] at row[i] where ok[i]; masked writes land out of range and drop."""
    dest = jnp.where(ok, row, target.shape[0])
    return target.at[dest].set(values.astype(target.dtype), mode="drop")


def _activate(y: jax.Array, activation: str | None) -> jax.Array:
    if activation is None:
        return y
    if activation == "silu":
        return jax.nn.silu(y)
    raise ValueError(f"activation: expected None or 'silu', received {activation!r}")


def _conv_windows(x_ext: jax.Array, start: jax.Array, init: jax.Array, rel: jax.Array, width: int) -> jax.Array:
    """Inputs at relative positions `rel` [M, L] of rows starting at `start` [M]; [M, L, dim]."""
    num = x_ext.shape[0] - 1
    from_x = rel >= 0
    xi = jnp.clip(jnp.where(from_x, start[:, None] + rel, num), 0, num)
    xv = x_ext[xi]
    hist = jnp.concatenate([init, jnp.zeros((*init.shape[:2], 1), init.dtype)], axis=2).transpose(0, 2, 1)
    si = jnp.clip(jnp.where(from_x, width - 1, rel + (width - 1)), 0, width - 1)
    sv = jnp.take_along_axis(hist, si[..., None], axis=1)
    return jnp.where(from_x[..., None], xv, sv)


def causal_conv1d_varlen_jax(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    conv_state: jax.Array,
    md: Any,
    *,
    activation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """JAX twin of :func:`attnsync.kernels.mamba_reference.causal_conv1d_varlen` (same shapes)."""
    width, dim = weight.shape[1], x.shape[1]
    ndt, npt, npf = md.num_decode_tokens, md.num_prefill_tokens, md.num_prefills
    slots = _slots(md)
    out = jnp.zeros_like(x)
    writes = []
    w = weight.astype(x.dtype)
    if npf:
        xp = x[ndt : ndt + npt]
        x_ext = jnp.concatenate([xp, jnp.zeros((1, dim), x.dtype)])
        qsl_p = md.query_start_loc_p
        init = _gather_states(conv_state, slots.p_init, slots.p_has_init).astype(x.dtype)
        prog_ok = md.batch_ptr >= 0
        req = jnp.clip(md.batch_ptr, 0, npf - 1)
        block = md.conv_block_m
        rel = jnp.maximum(md.token_chunk_offset_ptr, 0)[:, None] * block + jnp.arange(block)
        tok_ok = prog_ok[:, None] & (rel < slots.p_len[req][:, None])
        window_rel = rel[:, :, None] - (width - 1) + jnp.arange(width)
        start = qsl_p[req]
        win = _conv_windows(x_ext, start, init[req], window_rel.reshape(rel.shape[0], -1), width)
        win = win.reshape(*window_rel.shape, dim)
        y = jnp.einsum("pawd,dw->pad", win, w, precision=jax.lax.Precision.HIGHEST)
        if bias is not None:
            y = y + bias.astype(x.dtype)
        y = _activate(y, activation)
        tok = (start[:, None] + rel).reshape(-1)
        out_p = _write_rows(jnp.zeros((npt, dim), x.dtype), tok, tok_ok.reshape(-1), y.reshape(-1, dim))
        out = out.at[ndt : ndt + npt].set(out_p)
        hist = jnp.arange(width - 1) - (width - 1)
        if slots.ck_dest is not None:
            seq = md.seq_idx_p
            end_rel = md.cu_chunk_seqlen_p[1:] - qsl_p[seq]
            ck = _conv_windows(x_ext, qsl_p[seq], init[seq], end_rel[:, None] + hist, width)
            writes.append((slots.ck_dest, slots.ck_write, ck.transpose(0, 2, 1)))
        final = _conv_windows(x_ext, qsl_p[:-1], init, slots.p_len[:, None] + hist, width)
        writes.append((slots.p_final, slots.p_write, final.transpose(0, 2, 1)))
    if md.max_decode_query_len:
        state = _gather_states(conv_state, slots.d_init, slots.d_init_ok).astype(x.dtype)
        for j in range(md.max_decode_query_len):
            valid = j < slots.d_len
            tok = slots.d_start + j
            xt = x[jnp.where(valid, tok, 0)]
            win = jnp.concatenate([state, xt[:, :, None]], axis=2)
            y = (win * w).sum(-1)
            if bias is not None:
                y = y + bias.astype(x.dtype)
            out = _write_rows(out, tok, valid, _activate(y, activation))
            state = jnp.where(valid[:, None, None], win[:, :, 1:], state)
            dest = _decode_dest(md, slots, j)
            if dest is not None:
                writes.append((dest[0], dest[1], state))
        if md.cache_mode != "all" and not md.has_num_accepted_tokens:
            writes.append((slots.d_init, slots.d_init_ok & (slots.d_len > 0), state))
    new_state = conv_state
    for slot, ok, values in writes:
        new_state = _write_rows(new_state, slot, ok, values)
    return out, new_state


def _heads(v: jax.Array, num_heads: int) -> jax.Array:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H // G)."""
    return jnp.repeat(v, num_heads // v.shape[-2], axis=-2)


def ssd_chunked_scan_jax(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    ssm_state: jax.Array,
    md: Any,
) -> tuple[jax.Array, jax.Array]:
    """JAX twin of :func:`attnsync.kernels.mamba_reference.ssd_chunked_scan` (same shapes)."""
    if not md.has_chunk_metadata:
        raise ValueError("ssd_chunked_scan_jax: the metadata has no chunk metadata (Mamba1 outside cache_mode 'all').")
    hp = jax.lax.Precision.HIGHEST
    num_heads, head_dim = x.shape[1], x.shape[2]
    ndt, npt, npf, num_chunks, q = md.num_decode_tokens, md.num_prefill_tokens, md.num_prefills, md.num_chunks, md.chunk_size
    slots = _slots(md)
    y_all = jnp.zeros_like(x)
    A = A.astype(x.dtype)
    D = D.astype(x.dtype)
    writes = []
    if npf:
        init = _gather_states(ssm_state, slots.p_init, slots.p_has_init).astype(x.dtype)
        h_final = init
        if num_chunks:
            cu = md.cu_chunk_seqlen_p
            pos = cu[:-1, None] + jnp.arange(q)
            ok = pos < cu[1:, None]
            idx = jnp.where(ok, pos, 0) + ndt
            okf = ok.astype(x.dtype)
            xg = x[idx] * okf[..., None, None]
            dtg = dt[idx].astype(x.dtype) * okf[..., None]
            Bg = _heads(B[idx].astype(x.dtype), num_heads)
            Cg = _heads(C[idx].astype(x.dtype), num_heads)
            L = jnp.cumsum(dtg * A, axis=1)
            diff = L[:, :, None, :] - L[:, None, :, :]
            causal = jnp.tril(jnp.ones((q, q), bool))[None, :, :, None]
            decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))
            scores = jnp.einsum("kthn,kuhn->ktuh", Cg, Bg, precision=hp) * decay
            y = jnp.einsum("ktuh,kuh,kuhp->kthp", scores, dtg, xg, precision=hp)
            to_end = jnp.exp(L[:, -1:, :] - L)
            local = jnp.einsum("kuh,kuh,kuhp,kuhn->khpn", to_end, dtg, xg, Bg, precision=hp)
            chunk_decay = jnp.exp(L[:, -1, :])
            seq = md.seq_idx_p
            new_req = jnp.concatenate([jnp.ones((1,), bool), seq[1:] != seq[:-1]])
            init_k = init[seq]

            def step(h, inputs):
                fresh, start, dec, loc = inputs
                h_in = jnp.where(fresh, start, h)
                h_out = dec[:, None, None] * h_in + loc
                return h_out, (h_in, h_out)

            _, (h_in_t, h_out_t) = jax.lax.scan(
                step, jnp.zeros(init_k.shape[1:], x.dtype), (new_req, init_k, chunk_decay, local)
            )
            y = y + jnp.exp(L)[..., None] * jnp.einsum("kthn,khpn->kthp", Cg, h_in_t, precision=hp)
            y = y + D[:, None] * xg
            y_p = _write_rows(
                jnp.zeros((npt, num_heads, head_dim), x.dtype), pos.reshape(-1), ok.reshape(-1),
                y.reshape(-1, num_heads, head_dim),
            )
            y_all = y_all.at[ndt : ndt + npt].set(y_p)
            h_final = h_out_t[jnp.maximum(md.last_chunk_indices_p, 0)]
            if slots.ck_dest is not None:
                writes.append((slots.ck_dest, slots.ck_write, h_out_t))
        writes.append((slots.p_final, slots.p_write, h_final))
    if md.max_decode_query_len:
        h = _gather_states(ssm_state, slots.d_init, slots.d_init_ok).astype(x.dtype)
        for j in range(md.max_decode_query_len):
            valid = j < slots.d_len
            tok = slots.d_start + j
            safe = jnp.where(valid, tok, 0)
            xt = x[safe]
            dtt = dt[safe].astype(x.dtype)
            Bt = _heads(B[safe].astype(x.dtype), num_heads)
            Ct = _heads(C[safe].astype(x.dtype), num_heads)
            stepped = jnp.exp(dtt * A)[..., None, None] * h + (dtt[..., None] * xt)[..., None] * Bt[:, :, None, :]
            h = jnp.where(valid[:, None, None, None], stepped, h)
            yt = jnp.einsum("rhpn,rhn->rhp", h, Ct, precision=hp) + D[:, None] * xt
            y_all = _write_rows(y_all, tok, valid, yt)
            dest = _decode_dest(md, slots, j)
            if dest is not None:
                writes.append((dest[0], dest[1], h))
        if md.cache_mode != "all" and not md.has_num_accepted_tokens:
            writes.append((slots.d_init, slots.d_init_ok & (slots.d_len > 0), h))
    new_state = ssm_state
    for slot, ok, values in writes:
        new_state = _write_rows(new_state, slot, ok, values)
    return y_all, new_state


def mamba2_mixer_jax(
    xbc: jax.Array,
    dt_raw: jax.Array,
    *,
    conv_weight: jax.Array,
    conv_bias: jax.Array | None,
    dt_bias: jax.Array,
    A_log: jax.Array,
    D: jax.Array,
    conv_state: jax.Array,
    ssm_state: jax.Array,
    md: Any,
    num_heads: int,
    num_groups: int,
    state_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """JAX twin of :func:`attnsync.kernels.mamba_reference.mamba2_mixer`."""
    conv_out, conv_state = causal_conv1d_varlen_jax(xbc, conv_weight, conv_bias, conv_state, md, activation="silu")
    tokens, channels = conv_out.shape
    gn = num_groups * state_size
    x = conv_out[:, : channels - 2 * gn].reshape(tokens, num_heads, -1)
    B = conv_out[:, channels - 2 * gn : channels - gn].reshape(tokens, num_groups, state_size)
    C = conv_out[:, channels - gn :].reshape(tokens, num_groups, state_size)
    dt = jax.nn.softplus(dt_raw + dt_bias)
    A = -jnp.exp(A_log)
    y, ssm_state = ssd_chunked_scan_jax(x, dt, A, B, C, D, ssm_state, md)
    return y, conv_state, ssm_state
