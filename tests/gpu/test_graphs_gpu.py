"""CUDA graphs over attnsync metadata on one GPU: capture once per bucket, replay with new
metadata every step, outputs equal to eager; too-small buckets refused before any write; no
syncs or host stalls per step; bucketed JAX lowerings that compile once per bucket.

Every test is marked `gpu` (tests/conftest.py skips them without CUDA); FlashInfer tests also
need flashinfer (decode JIT about 10 s on first use, GPU.md), the JAX test a JAX GPU backend.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import attnsync
from attnsync import BucketLadder
from attnsync.kernels.reference import paged_attention_reference, relative_error
from attnsync.testing import assert_no_host_stall, count_h2d_copies, no_sync

torch = pytest.importorskip("torch")
from attnsync.adapters import torch as ast  # noqa: E402

pytestmark = pytest.mark.gpu

HQ, HKV, DIM, PAGE = 16, 8, 128, 16
SCALE = 1.0 / math.sqrt(DIM)
NUM_PAGES = 1024
LAYERS = 2
TOLERANCE = 1e-2  # max-abs error relative to max |ref|; bf16 output rounding is ~4e-3


@pytest.fixture(scope="module")
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="module")
def kv_caches(cuda):
    gen = torch.Generator(device="cuda").manual_seed(77)
    shape = (NUM_PAGES, PAGE, HKV, DIM)
    return [
        tuple(torch.randn(shape, generator=gen, device=cuda, dtype=torch.float32).to(torch.bfloat16)
              for _ in range(2))
        for _ in range(LAYERS)
    ]


def ladder() -> BucketLadder:
    # One width rung: every batch below lands in the bucket its token count picks.
    return BucketLadder(max_num_reqs=32, max_num_tokens=64, max_model_len=1024, block_size=PAGE,
                        width_sizes=(64,))


def batches(seed: int, rows: tuple[int, ...], query_lens=None, max_context: int = 900):
    """One batch per entry of `rows` (row counts), contexts and pages changing every step."""
    rng = np.random.default_rng(seed)
    for n in rows:
        q = np.ones(n, np.int64) if query_lens is None else np.asarray(query_lens[:n])
        seq = q + rng.integers(0, max_context, n)
        table = rng.permutation(NUM_PAGES)[: n * 64].reshape(n, 64)
        yield attnsync.Batch(query_lens=q, seq_lens=seq, block_table=table, block_size=PAGE)


def random_q(num_tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(num_tokens, HQ, DIM, generator=gen, device="cuda", dtype=torch.float32).to(torch.bfloat16)


def reference(md, q, kv) -> np.ndarray:
    k, v = kv
    f = lambda t: t.float().cpu().numpy()  # noqa: E731
    return paged_attention_reference(
        f(q), f(k), f(v), query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,
        block_table=md.block_table, scale=SCALE,
    )


def stall_free(fn, *, budget_ms: float, sleep_ms: float = 50.0, attempts: int = 3):
    """`assert_no_host_stall`, retried: a stall fails every attempt, host noise only one."""
    error = None
    for _ in range(attempts):
        try:
            return assert_no_host_stall(fn, budget_ms=budget_ms, sleep_ms=sleep_ms)
        except AssertionError as exc:
            error = exc
    raise error


# ---------------------------------------------------------------------------------------------
# Triton


TRITON_CASES = {
    # rows 5..8 share the 8-row decode bucket; 8 rows <= 128 // Hkv: the split-KV path
    "decode-split-kv": dict(rows=(6, 8, 5, 7, 8), query_lens=None, use_split_kv=None),
    "decode-2d": dict(rows=(6, 8, 5, 7, 8), query_lens=None, use_split_kv=False),
    # decodes then prefill chunks, 23 or 29 tokens: the mixed 32-token bucket (2-D path)
    "mixed": dict(rows=(5, 4, 5, 4, 5), query_lens=[1, 1, 9, 12, 6], use_split_kv=None),
}


@pytest.mark.parametrize("case", sorted(TRITON_CASES))
def test_triton_graph_replays_new_metadata_and_equals_eager(cuda, kv_caches, case):
    from attnsync.integrations.graphs import TritonGraph
    from attnsync.kernels.triton_attention import paged_attention_from_metadata

    spec = TRITON_CASES[case]
    lad = ladder()
    steps = list(batches(1, spec["rows"], spec["query_lens"]))
    buckets = {lad.bucket_for(b) for b in steps}
    assert len(buckets) == 1, buckets
    (bucket,) = buckets
    graph = TritonGraph(lad, bucket, kv_caches=kv_caches, num_q_heads=HQ, scale=SCALE,
                        use_split_kv=spec["use_split_kv"])
    assert graph.graph is not None
    assert graph.use_split_kv == (case == "decode-split-kv")
    addresses = {graph.last.query_start_loc.data_ptr(), graph.last.seq_lens.data_ptr(),
                 graph.last.block_table_tensor.data_ptr()}
    seen = set()
    for step, batch in enumerate(steps):
        t = batch.num_tokens
        q = random_q(t, step)
        replayed = graph.step(batch, q).clone()
        assert {graph.last.query_start_loc.data_ptr(), graph.last.seq_lens.data_ptr(),
                graph.last.block_table_tensor.data_ptr()} == addresses
        assert graph.last.max_seq_len == bucket.max_seq_len and graph.last.num_reqs == bucket.num_reqs
        # The same kernels launched eagerly on the same buffers: identical bits.
        eager_same = graph.launch(torch.empty_like(graph.out))
        # Eager with this step's own, unpadded metadata (per-step host scalars).
        md = attnsync.build(batch, backend="triton", num_q_heads=HQ, num_kv_heads=HKV, head_dim=DIM)
        tmd = ast.lower(md, cuda)
        torch.cuda.synchronize()
        seen.add(tuple(md.seq_lens.tolist()))
        assert torch.equal(replayed[:, :t], eager_same[:, :t]), f"step {step}: replay != eager launch"
        for layer, kv in enumerate(kv_caches):
            eager = paged_attention_from_metadata(q, *kv, torch.empty_like(q), tmd, scale=SCALE)
            torch.cuda.synchronize()
            got = replayed[layer, :t].float().cpu().numpy()
            assert relative_error(got, eager.float().cpu().numpy()) < TOLERANCE, (step, layer)
            assert relative_error(got, reference(md, q, kv)) < TOLERANCE, (step, layer)
    assert len(seen) == len(steps)


def test_triton_graph_refuses_a_batch_beyond_its_bucket_before_writing(cuda, kv_caches):
    from attnsync.integrations.graphs import TritonGraph

    lad = ladder()
    first, too_many_rows, fitting = batches(2, (6, 9, 2))
    graph = TritonGraph(lad, lad.bucket_for(first), kv_caches=kv_caches, num_q_heads=HQ, scale=SCALE)
    graph.step(first, random_q(6, 0))
    torch.cuda.synchronize()
    copies = graph.lowering.stats.copies
    snapshot = {n: getattr(graph.last, n).clone() for n in ("query_start_loc", "seq_lens", "block_table_tensor")}
    with pytest.raises(attnsync.SpecError, match=r"9 requests \(bucket rows: 8\)"):
        graph.step(too_many_rows, random_q(9, 1))
    long_q = attnsync.Batch(query_lens=[1, 5], seq_lens=[40, 60], block_table=np.ones((2, 64), np.int32),
                            block_size=PAGE)
    with pytest.raises(attnsync.SpecError, match=r"a query of 5 tokens \(bucket max_query_len: 1\)"):
        graph.step(long_q)
    torch.cuda.synchronize()
    assert graph.lowering.stats.copies == copies, "nothing staged"
    for name, before in snapshot.items():
        assert torch.equal(getattr(graph.last, name), before), f"{name} was rewritten"
    graph.step(fitting, random_q(2, 2))  # a fitting batch still replays
    torch.cuda.synchronize()


def test_triton_graph_step_has_one_copy_no_sync_and_no_stall(cuda, kv_caches):
    from attnsync.integrations.graphs import TritonGraph

    lad = ladder()
    steps = list(batches(3, (8, 7, 8, 6, 8, 8)))
    graph = TritonGraph(lad, lad.bucket_for(steps[0]), kv_caches=kv_caches, num_q_heads=HQ, scale=SCALE)
    q = random_q(8, 3)
    for batch in steps:  # warm
        graph.step(batch, q[: batch.num_tokens])
    torch.cuda.synchronize()
    count, _ = count_h2d_copies(lambda: graph.step(steps[0], q))
    assert count == 1, "one staged copy per step (q is copied device to device)"
    with no_sync():
        for batch in steps:
            graph.step(batch, q[: batch.num_tokens])
    torch.cuda.synchronize()
    stall_free(lambda: graph.step(steps[1], q[:7]), budget_ms=3.0)


def test_graph_ladder_captures_one_graph_per_bucket(cuda, kv_caches):
    from attnsync.integrations.graphs import GraphLadder, TritonGraph

    lad = ladder()
    graphs = GraphLadder(lad, lambda b: TritonGraph(lad, b, kv_caches=kv_caches, num_q_heads=HQ, scale=SCALE))
    for step, batch in enumerate(batches(4, (3, 8, 4, 16, 7, 2, 13))):
        q = random_q(batch.num_tokens, step)
        out = graphs.step(batch, q).clone()
        torch.cuda.synchronize()
        md = attnsync.build(batch)
        for layer, kv in enumerate(kv_caches):
            assert relative_error(out[layer, : batch.num_tokens].float().cpu().numpy(),
                                  reference(md, q, kv)) < TOLERANCE, (step, layer)
    assert sorted(b.num_reqs for b in graphs.graphs) == [2, 4, 8, 16]


# ---------------------------------------------------------------------------------------------
# FlashInfer


@pytest.fixture(scope="module")
def fi():
    return pytest.importorskip("flashinfer")


def test_flashinfer_graph_replays_new_metadata_and_equals_eager(fi, cuda, kv_caches):
    from attnsync.integrations.flashinfer import plan, workspace_buffer
    from attnsync.integrations.graphs import FlashInferDecodeGraph

    lad = ladder()
    steps = list(batches(5, (6, 8, 5, 7, 8)))  # 5..8 real rows in the 8-row bucket: padded rows vary
    bucket = lad.bucket_for(steps[0])
    graph = FlashInferDecodeGraph(lad, bucket, kv_caches=kv_caches, num_qo_heads=HQ,
                                  q_data_type=torch.bfloat16, sm_scale=SCALE)
    assert graph.graph is not None
    eager_wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace_buffer(cuda), "NHD")
    plan_args = dict(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=DIM, q_data_type=torch.bfloat16, sm_scale=SCALE)
    seen = set()
    for step, batch in enumerate(steps):
        n = batch.num_reqs
        q = random_q(n, 10 + step)
        replayed = graph.step(batch, q).clone()
        md = attnsync.build(batch, backend="flashinfer")
        plan(ast.lower(md, cuda), decode_wrapper=eager_wrapper, **plan_args)
        seen.add(tuple(md.seq_lens.tolist()))
        for layer, kv in enumerate(kv_caches):
            eager = eager_wrapper.run(q, kv)
            torch.cuda.synchronize()
            got = replayed[layer, :n].float().cpu().numpy()
            assert relative_error(got, eager.float().cpu().numpy()) < TOLERANCE, (step, layer)
            assert relative_error(got, reference(md, q, kv)) < TOLERANCE, (step, layer)
    assert len(seen) == len(steps)


def test_flashinfer_graph_refuses_before_writing_and_never_stalls(fi, cuda, kv_caches):
    from attnsync.integrations.graphs import FlashInferDecodeGraph

    lad = ladder()
    steps = list(batches(6, (8, 7, 8, 8)))
    graph = FlashInferDecodeGraph(lad, lad.bucket_for(steps[0]), kv_caches=kv_caches, num_qo_heads=HQ,
                                  q_data_type=torch.bfloat16, sm_scale=SCALE)
    q = random_q(8, 20)
    for batch in steps:
        graph.step(batch, q[: batch.num_reqs])
    torch.cuda.synchronize()
    stager = ast.default_stager(cuda)
    copies = stager.stats.copies
    (too_big,) = batches(7, (9,))
    with pytest.raises(attnsync.SpecError, match=r"9 requests \(bucket rows: 8\)"):
        graph.step(too_big, random_q(9, 21))
    mixed = attnsync.Batch(query_lens=[1, 4], seq_lens=[30, 4], block_table=np.ones((2, 64), np.int32),
                           block_size=PAGE)
    with pytest.raises(attnsync.SpecError, match=r"a query of 4 tokens \(bucket max_query_len: 1\)"):
        graph.step(mixed)
    assert stager.stats.copies == copies, "nothing staged"
    with no_sync():
        for batch in steps:
            graph.step(batch, q[: batch.num_reqs])
    torch.cuda.synchronize()
    # build + lower + plan() (~130 us on the H100 host, GPU.md) + replay: far below the sleep.
    stall_free(lambda: graph.step(steps[0], q), budget_ms=5.0)


# ---------------------------------------------------------------------------------------------
# JAX on the GPU: one compile per bucket.


def test_jax_bucketed_lowering_on_gpu_compiles_once_per_bucket(cuda):
    jax = pytest.importorskip("jax")
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("JAX has no GPU backend here")
    from attnsync.adapters import jax as asj

    device = devices[0]
    lad = BucketLadder(max_num_reqs=16, max_num_tokens=32, max_model_len=256, block_size=PAGE, width_sizes=(16,))
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(1) if event.endswith("backend_compile_duration") else None
    )

    @jax.jit
    def consume(m):
        return m.slot_mapping.sum() + m.seq_lens.sum() * m.max_seq_len + m.num_decodes

    rng = np.random.default_rng(9)

    def step(batch, bucket):
        md = attnsync.build(lad.pad(batch, bucket))
        jmd = asj.lower(md, device, bucket=bucket)
        return md, jmd, consume(jmd)

    with jax.transfer_guard("disallow"):
        for bucket in lad.buckets():
            jax.block_until_ready(step(lad.example_batch(bucket), bucket)[2])
    warm = len(compiles)
    results = []
    with jax.transfer_guard("disallow"):
        for _ in range(200):
            n = int(rng.integers(1, 17))
            q = np.ones(n, np.int64) if rng.random() < 0.5 else rng.integers(1, 3, n)
            batch = attnsync.Batch(query_lens=q, seq_lens=q + rng.integers(0, 200, n),
                                   block_table=rng.integers(0, 4096, (n, 16)), block_size=PAGE)
            bucket = lad.bucket_for(batch)
            results.append((bucket, *step(batch, bucket)))
    assert len(compiles) == warm, f"{len(compiles) - warm} compiles after warm-up"
    for bucket, md, jmd, value in results[::20]:
        assert jmd.slot_mapping.devices() == {device} and jmd.num_decodes.devices() == {device}
        want = int(md.slot_mapping.sum()) + int(md.seq_lens.sum()) * bucket.max_seq_len + md.num_decodes
        assert int(jax.device_get(value)) == want


# ---------------------------------------------------------------------------------------------
# Two captures used in turn, metadata prepared on a side stream.


@pytest.mark.parametrize("kernel", ["triton", "flashinfer"])
def test_overlapped_steps_equal_the_reference_while_the_host_runs_ahead(cuda, kv_caches, kernel):
    from attnsync.integrations.graphs import FlashInferDecodeGraph, OverlappedSteps, TritonGraph

    lad = ladder()
    steps = list(batches(11, (6, 8, 5, 7, 8, 6, 7)))
    bucket = lad.bucket_for(steps[0])
    if kernel == "flashinfer":
        pytest.importorskip("flashinfer")

        def make():
            return FlashInferDecodeGraph(lad, bucket, kv_caches=kv_caches, num_qo_heads=HQ,
                                         q_data_type=torch.bfloat16, sm_scale=SCALE)
    else:
        def make():
            return TritonGraph(lad, bucket, kv_caches=kv_caches, num_q_heads=HQ, scale=SCALE)

    overlapped = OverlappedSteps(make)
    assert overlapped.steps[0].graph is not None and overlapped.steps[1].graph is not None
    qs = [random_q(b.num_reqs, 40 + i) for i, b in enumerate(steps)]
    torch.cuda.synchronize()
    # A busy GPU, so the host enqueues every step (and its side-stream preparation) long
    # before the replays run: each preparation must still wait for the replay that last read
    # its buffers, and each replay for its preparation.
    torch.cuda._sleep(50_000_000)
    outs = []
    with no_sync():
        for batch, q in zip(steps, qs, strict=True):
            outs.append(overlapped.step(batch, q)[:, : batch.num_reqs].clone())
    torch.cuda.synchronize()
    for i, (batch, q, out) in enumerate(zip(steps, qs, outs, strict=True)):
        md = attnsync.build(batch)
        for layer, kv in enumerate(kv_caches):
            got = out[layer].float().cpu().numpy()
            assert relative_error(got, reference(md, q, kv)) < TOLERANCE, (kernel, i, layer)
    (too_big,) = batches(12, (9,))
    with pytest.raises(attnsync.SpecError, match=r"9 requests \(bucket rows: 8\)"):
        overlapped.step(too_big)
