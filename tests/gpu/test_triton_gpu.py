"""GPU tests of the Triton chain: build -> torch lowering -> kernel on CUDA, against float64.

- bf16 and fp16, a mixed padded batch (2D path), a decode batch (split-KV path), prefix ranges
  and a tree bias, with realistic shapes (16 q heads, 8 kv heads, head dim 128, pages of 16);
- no sync and no host stall around build + lower + kernel launch (after a warm-up that
  compiles the kernels and allocates the cached split-KV scratch);
- the JAX kernel fed by the DLPack lowering (`attnsync.adapters.jax.lower` on a GPU device)
  against the Triton output;
- a 2D vs split-KV timing sweep that prints where split-KV starts to pay off (it informs
  `attnsync.backends.triton.DEFAULT_SPLIT_KV_MIN_SEQ_LEN`; it asserts correctness only).

Every test is marked `gpu`; tests/conftest.py skips them on a host without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnsync
from attnsync.kernels.reference import relative_error
from attnsync.testing import assert_no_host_stall, no_sync

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from attnsync.adapters import torch as ast  # noqa: E402
from attnsync.kernels import triton_attention as ta  # noqa: E402

# tests/ is on sys.path (tests/gpu is the package `gpu`), and tests/kernels is `kernels`.
from kernels.test_reference import (  # noqa: E402
    NUM_TREE_ROWS,
    TREE_BIAS,
    PagedBatch,
    make_paged_batch,
)

pytestmark = pytest.mark.gpu

SHAPE = dict(num_q_heads=16, num_kv_heads=8, head_dim=128)
BLOCK_SIZE = 16
PAD_ROWS = 2
TOLERANCE = 1e-2  # bf16/fp16 outputs against the reference of the rounded inputs


def _rows(case: str) -> tuple[tuple[int, int], ...]:
    rng = np.random.default_rng(0)
    if case == "decode":
        # 8 single-token rows, the longest >= 1024 keys: the builder's default takes split-KV.
        lens = [int(s) for s in rng.integers(300, 3000, size=8)]
        lens[3] = 2500
        return tuple((1, s) for s in lens)
    if case == "tree":
        # Tree rows first (full tree of 5, first 3 nodes, root alone), then causal prefills.
        return ((5, 700), (3, 129), (1, 40), (37, 300), (64, 64), (1, 17))
    q_lens = (1, 1, 37, 1, 128, 1, 5, 64)
    return tuple((q, q + int(c)) for q, c in zip(q_lens, rng.integers(0, 480, size=8), strict=True))


def _prefix(rows) -> list[list[tuple[int, int]]]:
    """A bidirectional range inside the new tokens of each row with more than 8 of them."""
    ranges = []
    for q_len, seq_len in rows:
        start = seq_len - q_len
        ranges.append([(start + 2, start + q_len // 2)] if q_len > 8 else [])
    return ranges


def _paged(rows, *, prefix=None, seed=1) -> PagedBatch:
    return make_paged_batch(rows, block_size=BLOCK_SIZE, pad_tokens=5, prefix_ranges=prefix, seed=seed, **SHAPE)


def _batch(paged: PagedBatch) -> attnsync.Batch:
    return attnsync.Batch(
        query_lens=np.diff(paged.query_start_loc),
        seq_lens=paged.seq_lens,
        block_table=paged.block_table,
        block_size=BLOCK_SIZE,
        padded_num_reqs=paged.num_reqs + PAD_ROWS,
        padded_num_tokens=paged.q.shape[0],
    )


def _np_dtype(dtype):
    if dtype == torch.bfloat16:
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.float16


def _tensors(paged: PagedBatch, dtype, device):
    q, k, v = (torch.from_numpy(a).to(device=device, dtype=dtype) for a in (paged.q, paged.k_cache, paged.v_cache))
    return q, k, v, torch.full_like(q, float("nan"))


def _to_np(t) -> np.ndarray:
    return t.float().cpu().numpy().astype(np.float64)


def stall_free(fn, *, budget_ms: float, sleep_ms: float = 50.0, attempts: int = 3):
    """`assert_no_host_stall`, retried: a stall fails every attempt, host noise only one."""
    error: AssertionError | None = None
    for _ in range(attempts):
        try:
            return assert_no_host_stall(fn, budget_ms=budget_ms, sleep_ms=sleep_ms)
        except AssertionError as exc:
            error = exc
    raise error


@pytest.fixture(scope="module")
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="module")
def jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("JAX has no GPU backend here")
    from attnsync.adapters import jax as asj
    from attnsync.kernels import jax_attention as ja

    return jax, asj, ja, devices[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["mixed", "decode", "prefix"])
def test_end_to_end_matches_reference(cuda, case, dtype, record_property):
    rows = _rows("mixed" if case == "prefix" else case)
    prefix = _prefix(rows) if case == "prefix" else None
    paged = _paged(rows, prefix=prefix)
    md = attnsync.build(_batch(paged), backend="triton", prefix_ranges=prefix, **SHAPE)
    assert md.use_split_kv == (case == "decode")
    assert md.has_prefix_ranges == (case == "prefix")
    tmd = ast.lower(md, device=cuda)
    q, k, v, out = _tensors(paged, dtype, cuda)
    ta.paged_attention_from_metadata(q, k, v, out, tmd, scale=paged.scale)
    torch.cuda.synchronize()
    got = _to_np(out)
    ref = paged.cast(_np_dtype(dtype)).reference()
    err = relative_error(got, ref)
    record_property("relative_error_vs_float64", float(f"{err:.3g}"))
    assert err < TOLERANCE, f"{case}/{dtype}: relative error {err:.3g}"
    end = int(paged.query_start_loc[paged.num_reqs])
    assert np.isnan(got[end:]).all(), "padding tokens stay untouched"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_tree_bias_matches_reference(cuda, dtype):
    paged = _paged(_rows("tree"), seed=2)
    q, k, v, out = _tensors(paged, dtype, cuda)
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(cuda)  # noqa: E731 (keeps dtype)
    ta.unified_paged_attention(
        q, k, v, out, query_start_loc=dev(paged.query_start_loc), seq_lens=dev(paged.seq_lens),
        block_table=dev(paged.block_table), max_query_len=paged.max_query_len,
        max_seq_len=paged.max_seq_len, num_reqs=paged.num_reqs, scale=paged.scale,
        qq_bias=dev(TREE_BIAS), num_qq_bias_rows=NUM_TREE_ROWS,
    )
    torch.cuda.synchronize()
    ref = paged.cast(_np_dtype(dtype)).reference(qq_bias=TREE_BIAS, num_qq_bias_rows=NUM_TREE_ROWS)
    err = relative_error(_to_np(out), ref)
    assert err < TOLERANCE, f"tree/{dtype}: relative error {err:.3g}"


@pytest.mark.parametrize("case", ["mixed", "decode"])
def test_build_lower_launch_without_sync_or_stall(cuda, case):
    paged = _paged(_rows(case), seed=3)
    batch = _batch(paged)
    q, k, v, out = _tensors(paged, torch.bfloat16, cuda)

    def step():
        with no_sync():
            md = attnsync.build(batch, backend="triton", **SHAPE)
            tmd = ast.lower(md, device=cuda)
            ta.paged_attention_from_metadata(q, k, v, out, tmd, scale=paged.scale)
        return tmd

    for _ in range(3):  # compiles the kernels and allocates the cached scratch
        tmd = step()
    assert tmd.use_split_kv == (case == "decode")
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    # Build (tens of us), lowering (tens of us) and one or two Triton launches: a stall would
    # cost the whole 50 ms sleep.
    stall_free(step, budget_ms=5.0)
    torch.cuda.synchronize()
    ref = paged.cast(_np_dtype(torch.bfloat16)).reference()
    assert relative_error(_to_np(out), ref) < TOLERANCE


@pytest.mark.parametrize("case", ["mixed", "prefix"])
def test_jax_on_dlpack_lowering_matches_triton(cuda, jax_gpu, case, record_property):
    jax, asj, ja, device = jax_gpu
    ml_dtypes = pytest.importorskip("ml_dtypes")
    # Smaller rows than above: the JAX kernel gathers every row's pages for each token.
    rows = ((1, 40), (1, 300), (37, 120), (1, 17), (16, 16), (5, 200))
    prefix = _prefix(rows) if case == "prefix" else None
    paged = _paged(rows, prefix=prefix, seed=4).cast(ml_dtypes.bfloat16)  # exact in bf16 now
    md = attnsync.build(_batch(paged), backend="triton", prefix_ranges=prefix, **SHAPE)

    q, k, v, out = _tensors(paged, torch.bfloat16, cuda)
    ta.paged_attention_from_metadata(q, k, v, out, ast.lower(md, device=cuda), scale=paged.scale)
    torch.cuda.synchronize()

    jmd = asj.lower(md, device)  # torch staging + DLPack import on the GPU
    qj, kj, vj = (jax.device_put(a.astype(ml_dtypes.bfloat16), device) for a in (paged.q, paged.k_cache,
                                                                                  paged.v_cache))
    out_j = ja.paged_attention_jax_from_metadata(qj, kj, vj, jmd, scale=paged.scale)  # transfer guard on
    out_j.block_until_ready()
    assert out_j.dtype == ml_dtypes.bfloat16 and out_j.devices() == {device}
    got_j = np.asarray(out_j).astype(np.float64)
    got_t = _to_np(out)
    ref = paged.reference()
    record_property("jax_bf16_vs_float64", float(f"{relative_error(got_j, ref):.3g}"))
    record_property("triton_bf16_vs_float64", float(f"{relative_error(got_t, ref):.3g}"))
    assert relative_error(got_j, ref) < TOLERANCE
    assert relative_error(got_t, ref) < TOLERANCE
    # Both kernels round to bf16 once at the end: they agree to about two bf16 ulps.
    assert relative_error(got_j, got_t) < 2 * TOLERANCE


def test_split_kv_crossover_sweep(cuda):
    """Times 2D vs split-KV for decode batches and prints the table; asserts agreement only."""
    from triton.testing import do_bench

    hq, hkv, dim, page = 32, 8, 128, 16  # the shape the kernel's tile sizes were measured with
    rng = np.random.default_rng(5)
    scale = dim**-0.5
    lines = ["rows keys 2d_us split_us split/2d"]
    for rows in (8, 16):
        for keys in (256, 512, 1024, 2048, 4096, 8192):
            pages = keys // page
            num_blocks = rows * pages
            k = torch.randn(num_blocks, page, hkv, dim, device=cuda, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            table = torch.from_numpy(rng.permutation(num_blocks).reshape(rows, pages).astype(np.int32)).to(cuda)
            q = torch.randn(rows, hq, dim, device=cuda, dtype=torch.bfloat16)
            qsl = torch.arange(rows + 1, dtype=torch.int32, device=cuda)
            lens = torch.full((rows,), keys, dtype=torch.int32, device=cuda)
            o2, o3 = torch.empty_like(q), torch.empty_like(q)
            so, sm, ss = ta.split_kv_scratch(rows, hq, dim, device=cuda)
            common = dict(query_start_loc=qsl, seq_lens=lens, block_table=table, max_query_len=1,
                          max_seq_len=keys, num_reqs=rows, scale=scale)

            def two_d(o2=o2, k=k, v=v, q=q, common=common):
                ta.unified_paged_attention(q, k, v, o2, **common)

            def split(o3=o3, k=k, v=v, q=q, common=common, so=so, sm=sm, ss=ss):
                ta.unified_paged_attention(q, k, v, o3, **common, use_split_kv=True, segm_output=so,
                                           segm_max=sm, segm_expsum=ss)

            t2, t3 = do_bench(two_d) * 1e3, do_bench(split) * 1e3
            torch.cuda.synchronize()
            assert relative_error(_to_np(o3), _to_np(o2)) < TOLERANCE
            lines.append(f"{rows} {keys} {t2:.1f} {t3:.1f} {t3 / t2:.2f}")
            del k, v
    card = torch.cuda.get_device_name(cuda)
    print(f"\n[split-KV crossover on {card}: bf16, Hq {hq}, Hkv {hkv}, D {dim}, pages of {page}]")
    print("\n".join(lines))
