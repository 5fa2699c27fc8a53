"""Triton paged attention against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU torch tensors. The interpreter is
chosen when a kernel is decorated, so TRITON_INTERPRET must be set before
``attnsync.kernels.triton_attention`` is imported; the setdefault below does it for this module
(tests/conftest.py does the same for the whole run) and leaves an explicit choice alone. The
interpreter executes numpy per program, so the CPU cases use tiny shapes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from attnsync.kernels.reference import relative_error  # noqa: E402
from attnsync.kernels.triton_attention import (  # noqa: E402
    split_kv_scratch,
    unified_paged_attention,
)

from .test_reference import (  # noqa: E402
    MIXED_ROWS,
    NUM_TREE_ROWS,
    TREE_BIAS,
    TREE_ROWS,
    PagedBatch,
    make_paged_batch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Decode-only rows for the split-KV path: short, page-crossing, padded, and one of 200 keys,
# which is 4 KV tiles of 64 keys and so spreads over several segments.
DECODE_ROWS = ((1, 5), (1, 17), (0, 0), (1, 200))


def _np_dtype(dtype: torch.dtype) -> object:
    """The numpy dtype that rounds like ``dtype`` (bfloat16 comes from ml_dtypes, a jax dep)."""
    if dtype == torch.bfloat16:
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return ml_dtypes.bfloat16
    return {torch.float32: np.float32, torch.float16: np.float16}[dtype]


def _run(
    batch: PagedBatch,
    dtype: torch.dtype,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    **kwargs: object,
) -> np.ndarray:
    """Runs the kernel on ``batch`` with a NaN-poisoned output; returns it as float64 numpy."""

    def dev(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=DEVICE, dtype=dt)

    q = dev(batch.q, dtype)
    out = torch.full_like(q, float("nan"))
    prefix = None if batch.prefix_ranges is None else dev(batch.prefix_ranges, torch.int32)
    unified_paged_attention(
        q,
        dev(batch.k_cache, dtype),
        dev(batch.v_cache, dtype),
        out,
        query_start_loc=dev(batch.query_start_loc, torch.int32),
        seq_lens=dev(batch.seq_lens, torch.int32),
        block_table=dev(batch.block_table, torch.int32),
        max_query_len=batch.max_query_len if max_query_len is None else max_query_len,
        max_seq_len=batch.max_seq_len if max_seq_len is None else max_seq_len,
        num_reqs=batch.num_reqs,
        scale=batch.scale,
        prefix_ranges=prefix,
        **kwargs,
    )
    return out.float().cpu().numpy().astype(np.float64)


def _check(out: np.ndarray, batch: PagedBatch, dtype: torch.dtype, **ref_kwargs: object) -> None:
    """Compares against the reference of the dtype-rounded inputs; padding must stay NaN."""
    ref = batch.cast(_np_dtype(dtype)).reference(**ref_kwargs)
    end = int(batch.query_start_loc[batch.num_reqs])
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert np.isnan(out[end:]).all(), "tokens of no row must be left untouched"


def _split_kwargs(batch: PagedBatch, num_segments: int) -> dict[str, object]:
    segm_output, segm_max, segm_expsum = split_kv_scratch(
        batch.num_reqs + 1, batch.q.shape[1], batch.q.shape[2], num_segments, device=DEVICE
    )
    # Scratch starts as NaN: anything the reduce reads must have been written this call.
    for t in (segm_output, segm_max, segm_expsum):
        t.fill_(float("nan"))
    return dict(
        use_split_kv=True,
        segm_output=segm_output,
        segm_max=segm_max,
        segm_expsum=segm_expsum,
        num_segments=num_segments,
    )


@pytest.mark.parametrize(
    ("block_size", "dtype"),
    [
        (1, torch.float32),
        (4, torch.float32),
        (16, torch.float32),
        (4, torch.float16),
        (16, torch.bfloat16),
    ],
)
def test_2d_mixed_batch(block_size: int, dtype: torch.dtype) -> None:
    batch = make_paged_batch(block_size=block_size, trailing_rows=1, seed=block_size)
    _check(_run(batch, dtype), batch, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode_batch(dtype: torch.dtype) -> None:
    batch = make_paged_batch(DECODE_ROWS, block_size=4, trailing_rows=1, seed=7)
    # 3 segments over 4 tiles: 2 + 2 + 0 tiles, so the empty-segment case is merged too.
    _check(_run(batch, dtype, **_split_kwargs(batch, num_segments=3)), batch, dtype)


def test_2d_and_split_kv_agree_on_decode_batch() -> None:
    batch = make_paged_batch(DECODE_ROWS, block_size=16, seed=8)
    two_d = _run(batch, torch.float32)
    split = _run(batch, torch.float32, **_split_kwargs(batch, num_segments=16))
    assert relative_error(split, two_d) < 1e-5


def test_sliding_window() -> None:
    batch = make_paged_batch(block_size=4, seed=11)
    _check(_run(batch, torch.float32, sliding_window=3), batch, torch.float32, sliding_window=3)
    decode = make_paged_batch(DECODE_ROWS, block_size=4, seed=12)
    out = _run(decode, torch.float32, sliding_window=40, **_split_kwargs(decode, 4))
    _check(out, decode, torch.float32, sliding_window=40)


@pytest.mark.parametrize("window", [None, 3])
def test_prefix_ranges(window: int | None) -> None:
    # See test_reference.test_window_and_prefix_ranges_match_dense_formulation for the layout.
    prefix = [[], [(0, 3)], [(2, 6), (14, 18)], [], [(10, 17)]]
    batch = make_paged_batch(block_size=4, prefix_ranges=prefix, seed=13)
    out = _run(batch, torch.float32, sliding_window=window)
    _check(out, batch, torch.float32, sliding_window=window)


def test_zero_width_prefix_ranges() -> None:
    # [R, 0, 2] is how the Triton backend builder says "no ranges".
    batch = make_paged_batch(block_size=4, prefix_ranges=[[]] * len(MIXED_ROWS), seed=16)
    _check(_run(batch, torch.float32), batch, torch.float32)


def test_stale_host_bounds_only_change_speed() -> None:
    # max_query_len / max_seq_len pick tile sizes and segment counts; results must not depend
    # on them (a CUDA graph replays with the values it was captured with).
    batch = make_paged_batch(block_size=4, seed=14)
    _check(_run(batch, torch.float32, max_query_len=1, max_seq_len=1), batch, torch.float32)
    decode = make_paged_batch(DECODE_ROWS, block_size=4, seed=15)
    out = _run(decode, torch.float32, max_seq_len=1, **_split_kwargs(decode, 4))
    _check(out, decode, torch.float32)


def _bias(bias: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_bias_mixed_batch(dtype: torch.dtype) -> None:
    # Tree rows first (full tree, partial tree, root alone), then prefills that must stay
    # causal in the same launch.
    batch = make_paged_batch(TREE_ROWS, block_size=4, seed=31)
    bias = dict(qq_bias=TREE_BIAS, num_qq_bias_rows=NUM_TREE_ROWS)
    out = _run(batch, dtype, qq_bias=_bias(TREE_BIAS), num_qq_bias_rows=NUM_TREE_ROWS)
    _check(out, batch, dtype, **bias)
    if dtype == torch.float32:
        # The bias matters: without it the tree rows differ.
        assert relative_error(out, batch.reference()) > 1e-2


def test_tree_bias_finite_values_and_transposed_layout() -> None:
    # Finite biases check the units (natural log, like the scaled logits) and a strided view
    # checks that the kernel follows qq_bias's strides.
    batch = make_paged_batch(TREE_ROWS, block_size=4, seed=32)
    rng = np.random.default_rng(32)
    finite = np.where(np.isinf(TREE_BIAS), TREE_BIAS, rng.uniform(-2, 2, TREE_BIAS.shape)).astype(np.float32)
    transposed = _bias(finite.T.copy()).t()
    assert not transposed.is_contiguous()
    out = _run(batch, torch.float32, qq_bias=transposed, num_qq_bias_rows=NUM_TREE_ROWS)
    _check(out, batch, torch.float32, qq_bias=finite, num_qq_bias_rows=NUM_TREE_ROWS)


def test_tree_bias_on_the_split_kv_path() -> None:
    # Decode-only rows have one query: bias[0, 0] is added to each row's last key.
    batch = make_paged_batch(DECODE_ROWS, block_size=4, seed=33)
    bias = np.array([[1.5, 0.0], [0.0, 0.0]], dtype=np.float32)
    out = _run(batch, torch.float32, qq_bias=_bias(bias), num_qq_bias_rows=2, **_split_kwargs(batch, 3))
    _check(out, batch, torch.float32, qq_bias=bias, num_qq_bias_rows=2)
    assert relative_error(out, batch.reference()) > 1e-3  # rows 0 and 1 did change


def test_empty_tree_bias_is_causal() -> None:
    # The first drafting step has a [0, 0] bias: plain causal attention.
    batch = make_paged_batch(TREE_ROWS, block_size=4, seed=34)
    out = _run(batch, torch.float32, qq_bias=_bias(np.zeros((0, 0))), num_qq_bias_rows=NUM_TREE_ROWS)
    _check(out, batch, torch.float32)


def test_no_rows_writes_nothing() -> None:
    batch = make_paged_batch(block_size=4)
    batch = PagedBatch(**{**batch.__dict__, "num_reqs": 0, "max_query_len": 0, "max_seq_len": 0})
    assert np.isnan(_run(batch, torch.float32)).all()


def test_split_kv_scratch_shapes() -> None:
    segm_output, segm_max, segm_expsum = split_kv_scratch(3, 8, 64, device="cpu")
    assert segm_output.shape == (3, 8, 16, 64)
    assert segm_max.shape == segm_expsum.shape == (3, 8, 16)
    assert {t.dtype for t in (segm_output, segm_max, segm_expsum)} == {torch.float32}
    with pytest.raises(TypeError, match="host int"):
        split_kv_scratch(3, 8, 64.0, device="cpu")  # type: ignore[arg-type]


def _tiny(**change: object) -> dict[str, object]:
    args: dict[str, object] = dict(
        q=torch.zeros(1, 2, 16),
        k_cache=torch.zeros(1, 4, 1, 16),
        v_cache=torch.zeros(1, 4, 1, 16),
        out=torch.zeros(1, 2, 16),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        block_table=torch.zeros(1, 1, dtype=torch.int32),
        max_query_len=1,
        max_seq_len=1,
        num_reqs=1,
        scale=1.0,
    )
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            dict(
                q=torch.zeros(1, 2, 48),
                out=torch.zeros(1, 2, 48),
                k_cache=torch.zeros(1, 4, 1, 48),
                v_cache=torch.zeros(1, 4, 1, 48),
            ),
            ValueError,
            "power of two",
        ),
        (
            dict(
                q=torch.zeros(1, 3, 16),
                out=torch.zeros(1, 3, 16),
                k_cache=torch.zeros(1, 4, 2, 16),
                v_cache=torch.zeros(1, 4, 2, 16),
            ),
            ValueError,
            "multiple of num_kv_heads",
        ),
        (dict(out=torch.zeros(1, 2, 16, dtype=torch.float16)), TypeError, "share one dtype"),
        (dict(seq_lens=torch.tensor([1])), TypeError, "int32"),
        (dict(num_reqs=torch.tensor(1)), TypeError, "host int"),
        (dict(num_reqs=2), ValueError, "num_reqs"),
        (dict(sliding_window=0), ValueError, "sliding_window"),
        (dict(use_split_kv=True), ValueError, "split_kv_scratch"),
        (dict(qq_bias=torch.zeros(2, 3)), ValueError, "square"),
        (dict(qq_bias=torch.zeros(2, 2, dtype=torch.float64)), TypeError, "float32"),
        (dict(qq_bias=torch.zeros(2, 2), num_qq_bias_rows=2), ValueError, "exceeds num_reqs"),
        (dict(qq_bias=torch.zeros(2, 2), num_qq_bias_rows=torch.tensor(1)), TypeError, "host int"),
        (dict(num_qq_bias_rows=1), ValueError, "without qq_bias"),
        (
            dict(
                use_split_kv=True,
                max_query_len=2,
                segm_output=torch.zeros(1, 2, 16, 16),
                segm_max=torch.zeros(1, 2, 16),
                segm_expsum=torch.zeros(1, 2, 16),
            ),
            ValueError,
            "decode-only",
        ),
        (
            dict(
                use_split_kv=True,
                num_reqs=1,
                segm_output=torch.zeros(0, 2, 16, 16),
                segm_max=torch.zeros(0, 2, 16),
                segm_expsum=torch.zeros(0, 2, 16),
            ),
            ValueError,
            "seq_threshold_3d",
        ),
    ],
)
def test_validation(change: dict[str, object], error: type[Exception], match: str) -> None:
    args = _tiny(**change)
    q, k, v, out = args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("out")
    with pytest.raises(error, match=match):
        unified_paged_attention(q, k, v, out, **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("split", [False, True])
def test_gpu_realistic_bf16(split: bool) -> None:
    rng = np.random.default_rng(0)
    if split:
        rows = tuple((1, int(s)) for s in rng.integers(100, 600, size=8))
    else:
        q_lens = (1, 1, 37, 1, 128, 1, 5, 64)
        rows = tuple((q, q + int(c)) for q, c in zip(q_lens, rng.integers(0, 480, size=8), strict=True))
    batch = make_paged_batch(rows, block_size=16, num_q_heads=16, num_kv_heads=8, head_dim=128, seed=1)
    kwargs = _split_kwargs(batch, 16) if split else {}
    out = _run(batch, torch.bfloat16, **kwargs)
    _check(out, batch, torch.bfloat16)
    out32 = _run(batch, torch.float32, **kwargs)
    _check(out32, batch, torch.float32)


def test_mixed_rows_are_the_shared_layout() -> None:
    # The prefix-range cases above index tokens by this layout.
    assert MIXED_ROWS == ((1, 5), (3, 3), (4, 20), (0, 0), (1, 17))
