"""The jax.numpy paged attention against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from attnsync.kernels.jax_attention import paged_attention_jax  # noqa: E402
from attnsync.kernels.reference import relative_error  # noqa: E402

from .test_reference import PagedBatch, make_paged_batch  # noqa: E402

TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
PREFIX = [[], [(0, 3)], [(2, 6), (14, 18)], [], [(10, 17)]]


def _inputs(batch: PagedBatch, dtype: str) -> tuple[list[jax.Array], jax.Array | None]:
    """Device arrays for the kernel, placed before the call so it needs no transfer."""
    floats = [jax.device_put(jnp.asarray(a, dtype=dtype)) for a in (batch.q, batch.k_cache, batch.v_cache)]
    ints = [jax.device_put(a) for a in (batch.query_start_loc, batch.seq_lens, batch.block_table)]
    prefix = None if batch.prefix_ranges is None else jax.device_put(batch.prefix_ranges)
    return floats + ints, prefix


def _check(batch: PagedBatch, dtype: str, *, sliding_window: int | None = None) -> None:
    args, prefix = _inputs(batch, dtype)
    with jax.transfer_guard("disallow"):
        out = paged_attention_jax(
            *args, scale=batch.scale, sliding_window=sliding_window, prefix_ranges=prefix
        )
        out.block_until_ready()
    assert out.dtype == jnp.dtype(dtype)
    out = np.asarray(out.astype(jnp.float32), dtype=np.float64)
    ref = batch.cast(jnp.dtype(dtype)).reference(sliding_window=sliding_window)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    # Tokens of no row come back as zeros (the JAX function returns a fresh array).
    end = int(batch.query_start_loc[-1])
    np.testing.assert_array_equal(out[end:], 0.0)


@pytest.mark.parametrize(
    ("block_size", "dtype"),
    [(1, "float32"), (4, "float32"), (16, "float32"), (4, "float16"), (4, "bfloat16")],
)
def test_mixed_batch(block_size: int, dtype: str) -> None:
    _check(make_paged_batch(block_size=block_size, seed=block_size), dtype)


@pytest.mark.parametrize("window", [None, 3])
def test_prefix_ranges(window: int | None) -> None:
    _check(make_paged_batch(prefix_ranges=PREFIX, seed=13), "float32", sliding_window=window)


def test_zero_width_prefix_ranges() -> None:
    # [R, 0, 2] is how the Triton backend builder says "no ranges".
    _check(make_paged_batch(prefix_ranges=[[]] * 5, seed=16), "float32")


def test_sliding_window() -> None:
    _check(make_paged_batch(seed=11), "float32", sliding_window=3)


def test_decode_batch() -> None:
    _check(make_paged_batch(((1, 5), (1, 17), (0, 0), (1, 70)), seed=7), "float32")


def test_validation() -> None:
    batch = make_paged_batch(head_dim=16)
    args, _ = _inputs(batch, "float32")
    q, k, v, qsl, lens, table = args
    with pytest.raises(ValueError, match=r"query_start_loc must have shape \[R \+ 1\]"):
        paged_attention_jax(q, k, v, qsl[:-1], lens, table, scale=1.0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention_jax(q[:, :3], k, v, qsl, lens, table, scale=1.0)
    with pytest.raises(TypeError, match="int32"):
        paged_attention_jax(q, k, v, qsl.astype(jnp.float32), lens, table, scale=1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention_jax(q, k, v, qsl, lens, table, scale=1.0, sliding_window=0)
