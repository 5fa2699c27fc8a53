"""Mamba on the GPU: build + lowering, and one full Mamba2 layer, without syncs or host stalls.

Every test is marked `gpu`; tests/conftest.py skips them without CUDA. The JAX test also skips
when JAX has no GPU backend. The step under test is everything a serving step does per layer
group and per layer: `attnsync.build` (host numpy), the lowering (one pinned non_blocking copy),
and the layer (`mamba2_mixer`: conv1d + SSD scan, with their per-layer host code), run under
`attnsync.testing.no_sync()` (torch sync-debug "error", JAX transfer guard) and inside
`assert_no_host_stall` (a queued sleep kernel; a host wait of any kind costs the whole sleep).
Budgets sit far below the sleep, and each probe is retried, so host noise cannot fail the suite
while a real stall fails every attempt. Results are then read back (outside the guards) and
compared with the numpy metadata bit for bit, and with the float64 sequential oracle.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import attnsync
from attnsync.testing import assert_no_host_stall, count_h2d_copies, no_sync

torch = pytest.importorskip("torch")
from attnsync.adapters import torch as ast  # noqa: E402
from attnsync.kernels import mamba_reference as ref  # noqa: E402

pytestmark = pytest.mark.gpu

H, P, G, N, WIDTH = 8, 16, 2, 16, 4
CHANNELS = H * P + 2 * G * N
K_SPEC = 2


def stall_free(fn, *, budget_ms: float, sleep_ms: float, attempts: int = 3):
    """`assert_no_host_stall`, retried: a stall fails every attempt, host noise only one."""
    error = None
    for _ in range(attempts):
        try:
            return assert_no_host_stall(fn, budget_ms=budget_ms, sleep_ms=sleep_ms)
        except AssertionError as exc:
            error = exc
    raise error


def warm(step) -> None:
    """Run `step` once per pinned staging slot (2), so no slot is allocated inside a probe."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()


def mixed_batch(mode: str, *, inexact: bool = False, seed: int = 0) -> tuple[attnsync.Batch, dict, int]:
    """Decode rows (speculative, k = 2), short extends, long extends, fresh prefills; distinct slots.

    With `inexact`, the first decode rows carry upper bounds (async speculative decoding).
    """
    rng = np.random.default_rng(seed)
    bs = 32
    rows = [(3, 40), (2, 95), (1, 31), (3, 200), (1, 7), (3, 64)]  # decodes (q <= 1 + k, context)
    rows += [(1, 20), (2, 33)]  # short extends (prefilling)
    rows += [(70, 64), (45, 100)]  # long extends (chunked prefill continuations)
    rows += [(90, 0), (17, 0)]  # fresh prefills
    q = np.array([r[0] for r in rows])
    s = q + np.array([r[1] for r in rows])
    prefilling = np.array([False] * 6 + [True] * 6)
    width = int(-(-s.max() // bs)) + K_SPEC + 1
    num_slots = len(rows) * width + 1
    table = rng.permutation(num_slots)[: len(rows) * width].reshape(len(rows), width)
    args = dict(query_lens=q, seq_lens=s, block_table=table, block_size=bs, is_prefilling=prefilling)
    if inexact:
        args["seq_lens"] = s + np.array([2, 1, 0, 0, 0, 0] + [0] * 6)  # bounds of rows 0 and 1
        args["seq_lens_exact"] = np.array([False, False] + [True] * 10)
    options = dict(chunk_size=32, cache_mode=mode, num_spec_tokens=K_SPEC,
                   num_accepted_tokens=rng.integers(1, K_SPEC + 2, len(rows)), conv_capacity=64)
    return attnsync.Batch(**args), options, num_slots


def layer_params(num_tokens: int, num_slots: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        xbc=rng.standard_normal((num_tokens, CHANNELS)),
        dt_raw=rng.standard_normal((num_tokens, H)) - 1.0,
        conv_weight=rng.standard_normal((CHANNELS, WIDTH)) * 0.5,
        conv_bias=rng.standard_normal(CHANNELS) * 0.1,
        dt_bias=rng.standard_normal(H) * 0.1,
        A_log=rng.standard_normal(H) * 0.3,
        D=rng.standard_normal(H),
        conv_state=rng.standard_normal((num_slots, CHANNELS, WIDTH - 1)),
        ssm_state=rng.standard_normal((num_slots, H, P, N)) * 0.1,
    )


def assert_close_to_oracle(got, want, *, rel: float = 2e-3) -> None:
    for name, a, b in zip(("y", "conv_state", "ssm_state"), got, want, strict=True):
        a = np.asarray(a, dtype=np.float64)
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(scope="module")
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.parametrize("mode", ["none", "all", "align"])
def test_build_and_lower_without_sync_or_stall(mode, cuda):
    batch, options, _ = mixed_batch(mode)
    stager = ast.Stager(cuda)

    def step():
        return ast.lower(attnsync.build(batch, backend="mamba", **options), cuda, stager=stager)

    warm(step)
    with no_sync():
        lowered = stall_free(step, budget_ms=5.0, sleep_ms=50.0)
    torch.cuda.synchronize()
    copies, _ = count_h2d_copies(step)
    assert copies == 1, f"expected one host-to-device copy per lowering, saw {copies}"
    md = attnsync.build(batch, backend="mamba", **options)
    for f in dataclasses.fields(md):
        value = getattr(md, f.name)
        place = f.metadata.get("place")
        if place in ("device", "both"):
            got = getattr(lowered, f.name)
            assert got.device == cuda, f.name
            np.testing.assert_array_equal(got.cpu().numpy(), value, err_msg=f.name)
        elif place is None:
            assert getattr(lowered, f.name) == value, f.name


def test_optimistic_decode_rows_lower_without_sync(cuda):
    batch, options, _ = mixed_batch("none", inexact=True)
    exact_batch, _, _ = mixed_batch("none")
    stager = ast.Stager(cuda)

    def step():
        return ast.lower(attnsync.build(batch, backend="mamba", **options), cuda, stager=stager)

    warm(step)
    with no_sync():
        lowered = stall_free(step, budget_ms=5.0, sleep_ms=50.0)
    torch.cuda.synchronize()
    exact = attnsync.build(exact_batch, backend="mamba", **options)
    for name in ("query_start_loc_p", "num_computed_tokens_p", "has_initial_states_p", "cu_chunk_seqlen_p",
                 "seq_idx_p", "last_chunk_indices_p", "state_indices_tensor_p", "state_indices_tensor_d"):
        np.testing.assert_array_equal(getattr(lowered, name).cpu().numpy(), getattr(exact, name), err_msg=name)
    assert lowered.prep_initial_states == exact.prep_initial_states


@pytest.mark.parametrize("mode", ["none", "all"])
def test_one_mamba2_layer_without_sync_or_stall(mode, cuda):
    batch, options, num_slots = mixed_batch(mode)
    params = layer_params(batch.num_tokens, num_slots)
    dev = {name: torch.from_numpy(v).to(cuda, torch.float32) for name, v in params.items()}
    stager = ast.Stager(cuda)

    def step():
        md = attnsync.build(batch, backend="mamba", **options)
        tmd = ast.lower(md, cuda, stager=stager)
        inputs = dict(dev)
        return ref.mamba2_mixer(inputs.pop("xbc"), inputs.pop("dt_raw"), **inputs, md=tmd, num_heads=H,
                                num_groups=G, state_size=N)

    warm(step)  # the caching allocator, every kernel, both pinned slots
    # The reference layer launches a few hundred small kernels: host time is milliseconds, so the
    # sleep is long (a wait of any kind costs about all of it) and the budget half of it.
    with no_sync():
        got = stall_free(step, budget_ms=150.0, sleep_ms=300.0)
    torch.cuda.synchronize()
    want = ref.sequential_mixer(batch, **params, num_heads=H, num_groups=G, state_size=N, cache_mode=mode,
                                decode_threshold=1 + K_SPEC, num_accepted_tokens=options["num_accepted_tokens"])
    assert_close_to_oracle([t.cpu().numpy() for t in got], want)


def test_jax_layer_without_transfers_or_stall(cuda):
    jax = pytest.importorskip("jax")
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    from attnsync.adapters import jax as asj
    from attnsync.kernels import mamba_jax

    batch, options, num_slots = mixed_batch("all")
    params = layer_params(batch.num_tokens, num_slots)
    dev = {name: jax.device_put(v.astype(np.float32), device) for name, v in params.items()}

    @jax.jit
    def layer(p, md):
        rest = {name: v for name, v in p.items() if name not in ("xbc", "dt_raw")}
        return mamba_jax.mamba2_mixer_jax(p["xbc"], p["dt_raw"], **rest, md=md, num_heads=H, num_groups=G,
                                          state_size=N)

    def step():
        return layer(dev, asj.lower(attnsync.build(batch, backend="mamba", **options), device))

    jax.block_until_ready(step())  # compile
    warm(step)
    with no_sync():
        # each DLPack import costs up to ~0.9 ms of host time while the stream is busy (reference)
        got = stall_free(step, budget_ms=60.0, sleep_ms=200.0)
    got = [np.asarray(v) for v in jax.block_until_ready(got)]
    want = ref.sequential_mixer(batch, **params, num_heads=H, num_groups=G, state_size=N, cache_mode="all",
                                decode_threshold=1 + K_SPEC, num_accepted_tokens=options["num_accepted_tokens"])
    assert_close_to_oracle(got, want)


def test_torch_and_cpu_consumers_agree(cuda):
    """The GPU float32 layer and the CPU float64 layer run the same metadata to the same result."""
    batch, options, num_slots = mixed_batch("align")
    params = layer_params(batch.num_tokens, num_slots, seed=3)
    md = attnsync.build(batch, backend="mamba", **options)
    results = []
    for device, dtype in ((cuda, torch.float32), (torch.device("cpu"), torch.float64)):
        inputs = {name: torch.from_numpy(v).to(device, dtype) for name, v in params.items()}
        out = ref.mamba2_mixer(inputs.pop("xbc"), inputs.pop("dt_raw"), **inputs, md=ast.lower(md, device),
                               num_heads=H, num_groups=G, state_size=N)
        results.append([t.cpu().numpy() for t in out])
    assert_close_to_oracle(results[0], results[1])
