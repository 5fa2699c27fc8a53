"""End to end: `attnsync.build(batch, backend="triton")` -> lowering -> kernel, against float64.

torch: the CPU lowering feeds `paged_attention_from_metadata` (Triton's interpreter without a
GPU). JAX: the CPU lowering feeds `paged_attention_jax_from_metadata`. The reference is computed
from the raw batch, not from the metadata, so a wrong metadata field fails here as surely as a
wrong kernel. tests/gpu/test_triton_gpu.py runs the same chain on CUDA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import attnsync
from attnsync.kernels.reference import relative_error

# tests/ is on sys.path (tests/conftest.py's folder, as for `strategies`), and tests/kernels is
# the package `kernels`: the random paged batches every kernel test uses.
from kernels.test_reference import MIXED_ROWS, PagedBatch, make_paged_batch

SHAPE = dict(num_q_heads=4, num_kv_heads=2, head_dim=32)
BLOCK_SIZE = 4
PAD_ROWS = 2  # padded_num_reqs = rows + PAD_ROWS: padded rows must be skipped
PREFIX = [[], [(0, 3)], [(2, 6), (14, 18)], [], [(10, 17)]]  # per MIXED_ROWS row
# Decode-only rows, long enough that a split-KV launch spreads the 200-key row over segments.
DECODE_ROWS = ((1, 5), (1, 17), (1, 200), (1, 70))


def _paged(rows, *, seed: int, prefix=None) -> PagedBatch:
    return make_paged_batch(rows, block_size=BLOCK_SIZE, head_dim=SHAPE["head_dim"], pad_tokens=3,
                            prefix_ranges=prefix, seed=seed)


def _batch(paged: PagedBatch) -> attnsync.Batch:
    """The attnsync.Batch of a PagedBatch: same rows and pages, padded rows and tokens."""
    q_lens = np.diff(paged.query_start_loc)
    return attnsync.Batch(
        query_lens=q_lens,
        seq_lens=paged.seq_lens,
        block_table=paged.block_table,
        block_size=BLOCK_SIZE,
        padded_num_reqs=paged.num_reqs + PAD_ROWS,
        padded_num_tokens=paged.q.shape[0],
    )


def _build(paged: PagedBatch, **options):
    return attnsync.build(_batch(paged), backend="triton", **SHAPE, **options)


# ---------------------------------------------------------------------------------------------
# torch lowering -> Triton


@pytest.fixture(scope="module")
def torch_side():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py does it too
    pytest.importorskip("triton")
    from attnsync.adapters import torch as ast
    from attnsync.kernels import triton_attention as ta

    return torch, ast, ta


def _run_torch(torch_side, paged: PagedBatch, md, dtype_name: str = "float32", **kwargs) -> np.ndarray:
    torch, ast, ta = torch_side
    dtype = getattr(torch, dtype_name)
    tmd = ast.lower(md, device="cpu")
    q, k, v = (torch.from_numpy(a).to(dtype) for a in (paged.q, paged.k_cache, paged.v_cache))
    out = torch.full_like(q, float("nan"))
    result = ta.paged_attention_from_metadata(q, k, v, out, tmd, scale=paged.scale, **kwargs)
    assert result is out
    return out.float().numpy().astype(np.float64)


def _check_torch(out: np.ndarray, paged: PagedBatch, dtype_name: str = "float32", **ref_kwargs) -> None:
    if dtype_name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        ref = paged.cast(ml_dtypes.bfloat16).reference(**ref_kwargs)
        tolerance = 1e-2
    else:
        ref = paged.reference(**ref_kwargs)
        tolerance = 1e-5
    assert relative_error(out, ref) < tolerance
    end = int(paged.query_start_loc[paged.num_reqs])
    assert np.isnan(out[end:]).all(), "padding tokens belong to no row and stay untouched"


@pytest.mark.triton_cpu
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_torch_mixed_padded_batch(torch_side, dtype_name):
    paged = _paged(MIXED_ROWS, seed=1)
    md = _build(paged)
    assert not md.use_split_kv and md.num_reqs == paged.num_reqs + PAD_ROWS
    _check_torch(_run_torch(torch_side, paged, md, dtype_name), paged, dtype_name)


@pytest.mark.triton_cpu
def test_torch_decode_batch_takes_split_kv(torch_side):
    torch, ast, ta = torch_side
    paged = _paged(DECODE_ROWS, seed=2)
    md = _build(paged, split_kv_min_seq_len=64)
    assert md.use_split_kv and md.max_seq_len == 200
    # The cached scratch starts as NaN: the result must not depend on its old contents.
    scratch = ta._cached_scratch(torch.device("cpu"), md.segm_output_shape, md.segm_stats_shape)
    for t in scratch:
        t.fill_(float("nan"))
    out = _run_torch(torch_side, paged, md)
    _check_torch(out, paged)
    # One scratch per (device, shapes): the next call reuses the same buffers.
    again = ta._cached_scratch(torch.device("cpu"), md.segm_output_shape, md.segm_stats_shape)
    assert all(a is b for a, b in zip(scratch, again, strict=True))
    # Explicit per-stream scratch gives the same answer; so does the default length rule,
    # which sends these short rows (max 200 < 1024 keys) to the 2D kernel.
    own = ta.split_kv_scratch(md.seq_threshold_3d, SHAPE["num_q_heads"], SHAPE["head_dim"], device="cpu")
    assert relative_error(_run_torch(torch_side, paged, md, scratch=own), out) < 1e-6
    two_d = _build(paged)
    assert not two_d.use_split_kv
    assert relative_error(_run_torch(torch_side, paged, two_d), out) < 1e-5


@pytest.mark.triton_cpu
@pytest.mark.parametrize("window", [None, 3])
def test_torch_prefix_ranges_through_the_builder(torch_side, window):
    paged = _paged(MIXED_ROWS, seed=3, prefix=PREFIX)
    md = _build(paged, prefix_ranges=PREFIX)
    assert md.has_prefix_ranges
    out = _run_torch(torch_side, paged, md, sliding_window=window)
    _check_torch(out, paged, sliding_window=window)
    # The ranges did reach the kernel: without them the answer differs.
    assert relative_error(out, paged.reference(prefix_ranges=None, sliding_window=window)) > 1e-3


def test_torch_refuses_what_the_metadata_contradicts(torch_side):
    torch, ast, ta = torch_side
    paged = _paged(MIXED_ROWS, seed=4)
    md = _build(paged)
    tmd = ast.lower(md, device="cpu")
    q = torch.from_numpy(paged.q)
    k = torch.from_numpy(paged.k_cache)
    with pytest.raises(TypeError, match="torch lowering"):
        ta.paged_attention_from_metadata(q, k, k, torch.empty_like(q), md, scale=1.0)  # host md
    k8 = torch.zeros(1, 8, SHAPE["num_kv_heads"], SHAPE["head_dim"])  # pages of 8, built with 4
    with pytest.raises(ValueError, match="block_size=4"):
        ta.paged_attention_from_metadata(q, k8, k8, torch.empty_like(q), tmd, scale=1.0)
    with pytest.raises(ValueError, match="num_actual_tokens"):
        ta.paged_attention_from_metadata(q[:-1], k, k, torch.empty_like(q[:-1]), tmd, scale=1.0)
    decode = _paged(DECODE_ROWS, seed=5)
    split = ast.lower(attnsync.build(_batch(decode), backend="triton", num_q_heads=8, num_kv_heads=2,
                                     head_dim=32, split_kv_min_seq_len=0), device="cpu")
    dq = torch.from_numpy(decode.q)
    dk = torch.from_numpy(decode.k_cache)
    with pytest.raises(ValueError, match="num_q_heads=8"):
        ta.paged_attention_from_metadata(dq, dk, dk, torch.empty_like(dq), split, scale=1.0)


# ---------------------------------------------------------------------------------------------
# JAX lowering -> JAX kernel


@pytest.fixture(scope="module")
def jax_side():
    jax = pytest.importorskip("jax")
    from attnsync.adapters import jax as asj
    from attnsync.kernels import jax_attention as ja

    return jax, asj, ja


def _run_jax(jax_side, paged: PagedBatch, md, **kwargs) -> np.ndarray:
    jax, asj, ja = jax_side
    jmd = asj.lower(md)
    q, k, v = (jax.device_put(a) for a in (paged.q, paged.k_cache, paged.v_cache))
    out = ja.paged_attention_jax_from_metadata(q, k, v, jmd, scale=paged.scale, **kwargs)
    return np.asarray(out, dtype=np.float64)


def _check_jax(out: np.ndarray, paged: PagedBatch, **ref_kwargs) -> None:
    assert relative_error(out, paged.reference(**ref_kwargs)) < 1e-5
    end = int(paged.query_start_loc[paged.num_reqs])
    np.testing.assert_array_equal(out[end:], 0.0)  # padding tokens come back as zeros


def test_jax_mixed_padded_batch(jax_side):
    paged = _paged(MIXED_ROWS, seed=1)
    _check_jax(_run_jax(jax_side, paged, _build(paged)), paged)


def test_jax_decode_batch(jax_side):
    paged = _paged(DECODE_ROWS, seed=2)
    _check_jax(_run_jax(jax_side, paged, _build(paged, split_kv_min_seq_len=0)), paged)


@pytest.mark.parametrize("window", [None, 3])
def test_jax_prefix_ranges_through_the_builder(jax_side, window):
    paged = _paged(MIXED_ROWS, seed=3, prefix=PREFIX)
    out = _run_jax(jax_side, paged, _build(paged, prefix_ranges=PREFIX), sliding_window=window)
    _check_jax(out, paged, sliding_window=window)


def test_jax_refuses_host_metadata(jax_side):
    jax, _, ja = jax_side
    paged = _paged(MIXED_ROWS, seed=4)
    with pytest.raises(TypeError, match="JAX lowering"):
        ja.paged_attention_jax_from_metadata(paged.q, paged.k_cache, paged.v_cache, _build(paged), scale=1.0)


def _bucket_batch(rng, q_lens, seq_lens, *, num_blocks: int, width: int, padded_reqs: int,
                  padded_tokens: int):
    """A batch over a shared cache of `num_blocks` pages, padded to a fixed bucket."""
    pages = rng.permutation(num_blocks)
    table = np.zeros((len(q_lens), width), dtype=np.int32)
    used = 0
    for r, s in enumerate(seq_lens):
        n = -(-s // BLOCK_SIZE)
        table[r, :n] = pages[used : used + n]
        used += n
    return attnsync.Batch(query_lens=q_lens, seq_lens=seq_lens, block_table=table, block_size=BLOCK_SIZE,
                          padded_num_reqs=padded_reqs, padded_num_tokens=padded_tokens)


def test_jax_same_bucket_different_values_does_not_recompile(jax_side):
    jax, asj, ja = jax_side
    from attnsync.kernels.reference import paged_attention_reference

    rng = np.random.default_rng(6)
    num_blocks, width = 40, 8
    heads, dim = SHAPE["num_q_heads"], SHAPE["head_dim"]
    k = rng.standard_normal((num_blocks, BLOCK_SIZE, SHAPE["num_kv_heads"], dim)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    kj, vj = jax.device_put(k), jax.device_put(v)
    scale = 1.0 / np.sqrt(dim)
    bucket = dict(num_blocks=num_blocks, width=width, padded_reqs=6)

    def run(q_lens, seq_lens, padded_tokens):
        batch = _bucket_batch(rng, q_lens, seq_lens, padded_tokens=padded_tokens, **bucket)
        md = attnsync.build(batch, backend="triton", **SHAPE, split_kv_min_seq_len=0)
        q = rng.standard_normal((padded_tokens, heads, dim)).astype(np.float32)
        out = ja.paged_attention_jax_from_metadata(jax.device_put(q), kj, vj, asj.lower(md), scale=scale)
        ref = paged_attention_reference(q, k, v, query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,
                                        block_table=md.block_table, scale=scale)
        assert relative_error(np.asarray(out), ref) < 1e-5
        return md

    md1 = run([1, 1, 1], [5, 30, 12], padded_tokens=16)
    compiled = ja.paged_attention_jax._cache_size()
    # Same bucket, different everything else: row count, lengths, pages, both maxima and
    # use_split_kv -- host ints that are static meta fields of the lowered pytree.
    md2 = run([4, 1, 7, 2], [9, 1, 20, 31], padded_tokens=16)
    for name in ("max_seq_len", "max_query_len", "use_split_kv"):
        assert getattr(md1, name) != getattr(md2, name), name
    assert ja.paged_attention_jax._cache_size() == compiled, "a same-bucket batch recompiled"
    # The counter does count: another token bucket is a new shape and compiles once.
    run([1, 2], [3, 8], padded_tokens=24)
    assert ja.paged_attention_jax._cache_size() == compiled + 1
