"""`mamba`: the prefill sub-batch and chunk metadata against the oracle; one Mamba2 mixer layer
(torch and JAX) against a sequential float64 scan as its consumer, also run on fake tensors.
It documents refusing inexact rows on the prefill path."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import kernels as k
from ..frameworks import Framework
from ..lowering import Case, lower_case
from ..oracles import rows, shared_fields
from ..registry import BackendCheck, register

__all__ = ["CHECK"]

# The scan accumulates over chunks in float32.
TOL_MAMBA = 3e-3

# Mamba2 layer shape of the kernel check: heads, head dim, groups, state size, conv width.
SHAPE = dict(num_heads=2, head_dim=4, num_groups=1, state_size=4, width=4)


def build_refusal(batch: Any, options: dict[str, Any]) -> str | None:
    threshold = options.get("decode_threshold") or 1
    if ((~batch.seq_lens_exact) & (batch.query_lens > threshold)).any():
        return ("mamba runs an inexact row of more than decode_threshold tokens on the prefill "
                "path, which needs exact lengths (attnsync.backends.mamba)")
    return None


def oracle(batch: Any, md: Any) -> dict[str, Any]:
    want = shared_fields(batch)
    qsl, lens, _ = rows(want)
    nd, npre = md.num_decodes, md.num_prefills
    pre_rows = range(nd, nd + npre)
    computed = [lens[r] - (qsl[r + 1] - qsl[r]) for r in pre_rows]
    for name in ("slot_mapping", "block_table", "query_start_loc"):
        want.pop(name)
    base = qsl[nd]
    want.update(
        query_start_loc_p=np.array([qsl[r] - base for r in range(nd, nd + npre + 1)], np.int32),
        num_computed_tokens_p=np.array(computed, np.int32),
        has_initial_states_p=np.array([c > 0 for c in computed], bool),
        prep_initial_states=any(c > 0 for c in computed),
    )
    if md.has_chunk_metadata:  # walk the tokens, cut at request and chunk boundaries
        chunk = md.chunk_size
        cu, seq_idx, last, run = [0], [], [], 0
        for i, r in enumerate(pre_rows):
            n = qsl[r + 1] - qsl[r]
            for t in range(n):
                if t == 0 or (computed[i] + t) % chunk == 0:
                    if t:
                        cu.append(cu[-1] + run)
                    seq_idx.append(i)
                    run = 0
                run += 1
            if n:
                cu.append(cu[-1] + run)
            last.append(len(cu) - 2)
        want.update(cu_chunk_seqlen_p=np.array(cu, np.int32), seq_idx_p=np.array(seq_idx, np.int32),
                    last_chunk_indices_p=np.array(last, np.int32), num_chunks=len(seq_idx))
    return want


def _params(case: Case) -> dict[str, np.ndarray]:
    """Random float32 inputs of one Mamba2 layer for the case (state slots from the table)."""
    md, batch = case.md, case.batch
    h, p, g, n, width = (SHAPE[key] for key in ("num_heads", "head_dim", "num_groups", "state_size", "width"))
    rng = np.random.default_rng(case.seed)
    channels = h * p + 2 * g * n
    slots = int(batch.block_table.max(initial=0)) + 1
    tokens = md.num_actual_tokens
    f32 = np.float32
    return dict(
        xbc=rng.standard_normal((tokens, channels)).astype(f32),
        dt_raw=rng.standard_normal((tokens, h)).astype(f32),
        conv_weight=(rng.standard_normal((channels, width)) * 0.5).astype(f32),
        conv_bias=(rng.standard_normal(channels) * 0.1).astype(f32),
        dt_bias=(rng.standard_normal(h) * 0.1).astype(f32),
        A_log=(rng.standard_normal(h) * 0.3).astype(f32),
        D=rng.standard_normal(h).astype(f32),
        conv_state=rng.standard_normal((slots, channels, width - 1)).astype(f32),
        ssm_state=rng.standard_normal((slots, h, p, n)).astype(f32),
    )


def _layer_shape() -> dict[str, int]:
    return dict(num_heads=SHAPE["num_heads"], num_groups=SHAPE["num_groups"], state_size=SHAPE["state_size"])


def kernel(case: Case, fw: Framework, lowered: Any) -> tuple[float, float]:
    """The mixer on the lowered metadata against the sequential scan over the batch."""
    from ...kernels.mamba_reference import sequential_mixer

    md = case.md
    params = _params(case)
    shape = _layer_shape()
    want = sequential_mixer(case.batch, **{name: v.astype(np.float64) for name, v in params.items()}, **shape,
                            cache_mode=md.cache_mode, decode_threshold=md.decode_threshold)
    if fw.name.startswith("torch"):
        from ...kernels.mamba_reference import mamba2_mixer

        t = dict(zip(params, k.to_torch(fw, *params.values()), strict=True))
        got = mamba2_mixer(t.pop("xbc"), t.pop("dt_raw"), **t, md=lowered, **shape)
        got = [x.cpu().numpy() for x in got]
    else:
        import jax

        from ...kernels.mamba_jax import mamba2_mixer_jax

        layer = k.CACHE.get("mamba_jax")
        if layer is None:
            def mixer(p: dict[str, Any], m: Any) -> Any:
                rest = {name: v for name, v in p.items() if name not in ("xbc", "dt_raw")}
                return mamba2_mixer_jax(p["xbc"], p["dt_raw"], **rest, md=m, **shape)

            layer = k.CACHE["mamba_jax"] = jax.jit(mixer)  # the metadata's host ints are static
        j = dict(zip(params, k.to_jax(fw, *params.values()), strict=True))
        with jax.transfer_guard("disallow"):
            got = layer(j, lowered)
        got = [np.asarray(x) for x in got]
    real = md.num_scheduled_tokens
    errors = [k.relative_error(got[0][:real], want[0][:real])]
    errors += [k.relative_error(a, b) for a, b in zip(got[1:], want[1:], strict=True)]
    return max(errors), TOL_MAMBA


def fake_paths(case: Case) -> list[tuple[str, Any, dict[str, Any], Any]]:
    """The torch mixer (torch implementation) as a device path, on batches the gate admits."""
    k.kernel_gate(case)
    import torch

    from ...kernels.mamba_reference import mamba2_mixer

    lowered, _, _ = lower_case(case, Framework("torch-cpu", True, "", torch.device("cpu")))
    params = {name: torch.from_numpy(a) for name, a in _params(case).items()}
    shape = _layer_shape()
    return [("mamba2_mixer (consumer)",
             lambda md, **p: mamba2_mixer(p.pop("xbc"), p.pop("dt_raw"), **p, md=md, **shape),
             dict(params, md=lowered), None)]


CHECK = register(BackendCheck("mamba", options={"variant": "mamba2", "chunk_size": 64},
                              build_refusal=build_refusal, oracle=oracle, kernel=kernel, fake_paths=fake_paths))
