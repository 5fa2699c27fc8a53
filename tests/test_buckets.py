"""Bucket ladders (numpy), bucketed JAX lowerings (no recompiles) and persistent torch staging.

CPU only; the GPU halves are tests/gpu/test_graphs_gpu.py and tests/gpu/test_multigpu.py.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnsync
from attnsync import SpecError
from attnsync._buckets import STEP_SCALARS, Bucket, BucketLadder, scalar_roles
from attnsync.testing import brute_force_common

BLOCK = 16
LIMITS = dict(max_num_reqs=12, max_num_tokens=48, max_model_len=200, block_size=BLOCK)


def ladder(**overrides) -> BucketLadder:
    return BucketLadder(**{**LIMITS, **overrides})


def make_batch(query_lens, seq_lens, *, width=None, seed=0, block_size=BLOCK, **extra) -> attnsync.Batch:
    seq = np.asarray(seq_lens, dtype=np.int64)
    need = int(-(-seq.max(initial=0) // block_size))
    width = max(need, 1) if width is None else width
    rng = np.random.default_rng(seed)
    table = rng.integers(1, 5000, (len(seq), width)).astype(np.int32)
    return attnsync.Batch(query_lens=query_lens, seq_lens=seq_lens, block_table=table,
                          block_size=block_size, **extra)


@st.composite
def ladder_batches(draw, max_num_reqs=12, max_num_tokens=48, max_model_len=200, uniform_query_len=1):
    """A valid batch within the ladder's limits: uniform decodes, or mixed rows."""
    uniform = draw(st.booleans())
    if uniform:
        n = draw(st.integers(1, min(max_num_reqs, max_num_tokens // uniform_query_len)))
        q = np.full(n, uniform_query_len)
    else:
        n = draw(st.integers(0, max_num_reqs))
        q = np.array([draw(st.integers(0 if n > 1 else 1, 12)) for _ in range(n)], dtype=np.int64)
        while q.sum() > max_num_tokens:
            q[int(np.argmax(q))] //= 2
    context = np.array([draw(st.integers(0, max_model_len - int(x))) for x in q], dtype=np.int64)
    seq = q + context
    extra_width = draw(st.integers(0, 3))
    return make_batch(q, seq, width=int(-(-seq.max(initial=0) // BLOCK)) + extra_width,
                      seed=draw(st.integers(0, 100)))


# ---------------------------------------------------------------------------------------------
# The ladder.


def test_default_rungs_are_powers_of_two_ending_at_the_limits():
    lad = ladder()
    assert lad.token_sizes == (1, 2, 4, 8, 16, 32, 48)
    assert lad.max_blocks_per_req == 13  # ceil(200 / 16)
    assert lad.width_sizes == (1, 2, 4, 8, 13)
    custom = ladder(token_sizes=[8, 4, 4, 24], width_sizes=[13])
    assert custom.token_sizes == (4, 8, 24, 48) and custom.width_sizes == (13,)


def test_bad_rungs_are_refused():
    with pytest.raises(SpecError, match=r"token_sizes: rung 64 is above the limit 48"):
        ladder(token_sizes=[8, 64])
    with pytest.raises(SpecError, match=r"token_sizes \(rung\): expected an int >= 1"):
        ladder(token_sizes=[0, 8])
    with pytest.raises(TypeError, match="width_sizes"):
        ladder(width_sizes="8")
    with pytest.raises(TypeError, match="max_num_reqs"):
        ladder(max_num_reqs=2.0)


def test_worked_buckets():
    lad = ladder()
    decode = make_batch([1] * 5, [40, 9, 100, 7, 33])
    assert lad.bucket_for(decode) == Bucket(num_reqs=8, num_tokens=8, width=8, max_query_len=1,
                                           max_seq_len=128, uniform_query_len=1)
    mixed = make_batch([1, 1, 9], [40, 9, 9])
    assert lad.bucket_for(mixed) == Bucket(num_reqs=12, num_tokens=16, width=4, max_query_len=16,
                                          max_seq_len=64, uniform_query_len=None)
    # vLLM: a uniform decode batch with k=1 speculative token pads requests to tokens // 2
    spec = ladder(uniform_query_len=2)
    assert spec.bucket_for(make_batch([2] * 5, [40, 9, 100, 7, 33])).num_reqs == 8  # 10 tokens -> 16
    # rows of zero tokens: more rows than tokens takes a bigger token rung
    empty_rows = make_batch([0, 0, 0, 1], [5, 5, 5, 5])
    assert lad.bucket_for(empty_rows).num_tokens == 4
    # the width reaches max_model_len exactly at the last rung
    assert lad.bucket_for(make_batch([1], [200])).max_seq_len == 200
    assert lad.bucket_for(attnsync.Batch(query_lens=[], seq_lens=[], block_table=[], block_size=BLOCK)).num_tokens == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), uq=st.sampled_from([1, 2]))
def test_every_batch_lands_in_the_smallest_bucket_that_fits(data, uq):
    lad = ladder(uniform_query_len=uq)
    batch = data.draw(ladder_batches(uniform_query_len=uq))
    bucket = lad.bucket_for(batch)
    assert lad.fit_error(batch, bucket) is None
    assert bucket in lad.buckets()
    n, t = batch.num_reqs, batch.num_tokens
    uniform = n > 0 and bool((batch.query_lens == uq).all())
    assert bucket.is_uniform_decode == uniform
    # vLLM's rows rule (vllm-backends.md 4.1): derived from the token rung
    per_row = uq if uniform else 1
    assert bucket.num_reqs == min(bucket.num_tokens // per_row, LIMITS["max_num_reqs"])
    assert bucket.max_query_len == (uq if uniform else bucket.num_tokens)
    pages = int(-(-batch.seq_lens.max(initial=0) // BLOCK))
    assert bucket.width == min(w for w in lad.width_sizes if w >= pages)
    assert bucket.max_seq_len == min(bucket.width * BLOCK, LIMITS["max_model_len"])
    assert bucket.num_tokens == min(r for r in lad.token_sizes if r >= t and min(r // per_row, 12) >= n)
    # No smaller bucket of the same kind fits.
    for other in lad.buckets():
        if other.is_uniform_decode != uniform or other == bucket:
            continue
        if lad.fit_error(batch, other) is None:
            assert other.num_tokens >= bucket.num_tokens and other.width >= bucket.width, other


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ladder_batches())
def test_padding_follows_vllm_and_equals_a_validated_batch(batch):
    lad = ladder()
    bucket = lad.bucket_for(batch)
    padded = lad.pad(batch, bucket)
    assert padded.padded_num_reqs == bucket.num_reqs and padded.padded_num_tokens == bucket.num_tokens
    assert padded.block_table.shape == (batch.num_reqs, bucket.width)
    assert not padded.block_table.flags.writeable and padded.block_table.flags.c_contiguous
    md = attnsync.build(padded)
    # The fast path (no second validation) equals a batch validated from scratch.
    table = np.zeros((batch.num_reqs, bucket.width), np.int32)
    w = min(bucket.width, batch.block_table.shape[1])
    table[:, :w] = batch.block_table[:, :w]
    validated = attnsync.Batch(
        query_lens=batch.query_lens, seq_lens=batch.seq_lens, block_table=table, block_size=BLOCK,
        padded_num_reqs=bucket.num_reqs, padded_num_tokens=bucket.num_tokens,
    )
    reference = brute_force_common(validated)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping", "query_lens"):
        np.testing.assert_array_equal(getattr(md, name), reference[name], err_msg=name)
    n, r, t = batch.num_reqs, bucket.num_reqs, batch.num_tokens
    # vLLM's padding values
    assert (md.query_start_loc[n + 1 :] == md.query_start_loc[n]).all()
    assert (md.seq_lens[n:] == 0).all() and (md.block_table[n:] == 0).all()
    assert (md.slot_mapping[t:] == -1).all() and md.query_start_loc.shape == (r + 1,)
    bound = bucket.bound(md)
    assert (bound.num_reqs, bound.num_actual_tokens, bound.max_query_len, bound.max_seq_len) == (
        bucket.num_reqs, bucket.num_tokens, bucket.max_query_len, bucket.max_seq_len)
    assert bound.max_seq_len >= md.max_seq_len and bound.max_query_len >= md.max_query_len


def test_batches_beyond_the_biggest_bucket_are_refused_naming_the_limit():
    lad = ladder()
    with pytest.raises(SpecError, match=r"13 requests exceed the biggest bucket \(max_num_reqs=12\)"):
        lad.bucket_for(make_batch([1] * 13, [5] * 13))
    with pytest.raises(SpecError, match=r"49 tokens exceed the biggest bucket \(max_num_tokens=48\).*Fix"):
        lad.bucket_for(make_batch([49], [49]))
    with pytest.raises(SpecError, match=r"201 tokens exceeds max_model_len=200"):
        lad.bucket_for(make_batch([1], [201]))
    narrow = ladder(max_blocks_per_req=4)
    with pytest.raises(SpecError, match=r"needs 5 pages.*max_blocks_per_req=4"):
        narrow.bucket_for(make_batch([1], [70]))
    with pytest.raises(SpecError, match=r"block_size 8 differs from the ladder's 16"):
        lad.bucket_for(make_batch([1], [7], block_size=8))
    with pytest.raises(TypeError, match=r"attnsync\.Batch"):
        lad.bucket_for([1, 2])


def test_a_batch_that_does_not_fit_a_given_bucket_is_refused():
    lad = ladder()
    small = lad.bucket_for(make_batch([1, 1], [5, 9]))
    with pytest.raises(SpecError, match=r"3 requests \(bucket rows: 2\).*3 tokens \(bucket tokens: 2\)"):
        lad.pad(make_batch([1, 1, 1], [5, 9, 9]), small)
    with pytest.raises(SpecError, match=r"a query of 3 tokens \(bucket max_query_len: 1\)"):
        lad.pad(make_batch([3], [9]), lad.bucket_for(make_batch([1, 1, 1, 1], [5] * 4)))
    with pytest.raises(SpecError, match=r"5 pages for the longest sequence \(bucket width: 1\)"):
        lad.pad(make_batch([1], [70]), small)


def test_bound_refuses_metadata_of_other_shapes():
    lad = ladder()
    batch = make_batch([1, 1, 1], [5, 17, 9])
    bucket = lad.bucket_for(batch)
    with pytest.raises(SpecError, match=r"rows \(num_reqs\) 3 \(bucket: 4\).*Fix: build from `ladder.pad"):
        bucket.bound(attnsync.build(batch))
    md = attnsync.build(lad.pad(batch, bucket), backend="triton", num_q_heads=4, num_kv_heads=2, head_dim=16)
    out = bucket.bound(md)
    assert type(out) is type(md) and out.block_table is md.block_table
    assert out.max_seq_len == bucket.max_seq_len and out.num_reqs == 4
    with pytest.raises(TypeError, match="bound: expected metadata"):
        bucket.bound(batch)


def test_example_batch_has_the_bucket_shapes():
    lad = ladder(uniform_query_len=2)
    for bucket in lad.buckets():
        example = lad.example_batch(bucket)
        assert lad.fit_error(example, bucket) is None
        md = bucket.bound(attnsync.build(lad.pad(example, bucket)))
        assert md.query_start_loc.shape == (bucket.num_reqs + 1,)
        assert md.slot_mapping.shape == (bucket.num_tokens,)
        assert md.block_table.shape == (bucket.num_reqs, bucket.width)


def test_scalar_roles_cover_common_and_triton():
    from attnsync.backends.triton import TritonMetadata

    bound, step, static = scalar_roles(attnsync.CommonMetadata)
    assert bound == ("num_reqs", "num_actual_tokens", "max_query_len", "max_seq_len")
    assert set(static) == {"block_size", "decode_threshold"}
    assert set(step) <= STEP_SCALARS and "num_decodes" in step
    _, step, static = scalar_roles(TritonMetadata)
    assert {"use_split_kv", "has_prefix_ranges", "slot_mapping_exact"} <= set(step)
    assert {"seq_threshold_3d", "num_segments", "segm_output_shape"} <= set(static)


def test_docstring_examples():
    import attnsync._buckets as buckets

    assert doctest.testmod(buckets).failed == 0


# ---------------------------------------------------------------------------------------------
# JAX: fixed shapes, one static part per bucket, no recompiles.

jax = pytest.importorskip("jax")
asj = pytest.importorskip("attnsync.adapters.jax")


def random_batch(rng, lad: BucketLadder) -> attnsync.Batch:
    """A random step: all single-token decodes half the time, else mixed rows."""
    n = int(rng.integers(1, lad.max_num_reqs + 1))
    if rng.random() < 0.5:
        q = np.ones(n, np.int64)
    else:
        q = rng.integers(1, 6, n)
        while q.sum() > lad.max_num_tokens:
            q[int(np.argmax(q))] //= 2
            q = np.maximum(q, 1)
    seq = q + rng.integers(0, 40, n)
    return make_batch(q, seq, width=lad.max_blocks_per_req, seed=int(rng.integers(1 << 30)))


def test_bucketed_lowering_static_part_is_the_same_for_every_step_of_a_bucket():
    lad = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=BLOCK)
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(3)
    per_bucket: dict = {}
    plain_structures = set()
    for _ in range(60):
        batch = random_batch(rng, lad)
        bucket = lad.bucket_for(batch)
        md = attnsync.build(lad.pad(batch, bucket), backend="triton", num_q_heads=4, num_kv_heads=2, head_dim=16)
        with jax.transfer_guard("disallow"):
            jmd = asj.lower(md, cpu, bucket=bucket)
        assert type(jmd).__name__ == "JaxBucketedTritonMetadata"
        per_bucket.setdefault(bucket, set()).add(jax.tree_util.tree_structure(jmd))
        plain_structures.add((bucket, jax.tree_util.tree_structure(asj.lower(md, cpu))))
        # values: arrays and per-step scalars are the step's own, bounds the bucket's
        np.testing.assert_array_equal(np.asarray(jmd.slot_mapping), md.slot_mapping)
        np.testing.assert_array_equal(np.asarray(jmd.block_table), md.block_table)
        assert int(jmd.use_split_kv) == md.use_split_kv and jmd.use_split_kv.shape == ()
        assert int(jmd.has_prefix_ranges) == 0 and int(jmd.slot_mapping_exact) == 1
        assert jmd.max_seq_len == bucket.max_seq_len and jmd.num_reqs == bucket.num_reqs
        assert jmd.block_size == BLOCK and jmd.segm_output_shape == md.segm_output_shape
        for leaf in jax.tree_util.tree_leaves(jmd):
            assert leaf.committed and leaf.devices() == {cpu}
    assert all(len(s) == 1 for s in per_bucket.values()), "one static part per bucket"
    assert len(per_bucket) > 3
    # Without buckets the static part changes with max_seq_len & co: the retrace this prevents.
    assert len(plain_structures) > len(per_bucket)


def test_bucketed_lowering_refuses_unpadded_metadata_before_any_transfer(monkeypatch):
    lad = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=BLOCK)
    batch = make_batch([1, 1, 1], [5, 9, 17])
    calls = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(SpecError, match=r"bucket: the metadata does not have this bucket's shapes"):
        asj.lower(attnsync.build(batch), bucket=lad.bucket_for(batch))
    with pytest.raises(TypeError, match="bucket: expected a Bucket"):
        asj.lower(attnsync.build(batch), bucket=(4, 4, 4))
    assert calls == []


def _compile_counter():
    """A list whose length is the number of backend compiles since creation."""
    events: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: events.append(event) if event.endswith("backend_compile_duration") else None
    )
    return events


def test_a_jitted_consumer_compiles_once_per_bucket_over_1000_steps():
    lad = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=BLOCK,
                       width_sizes=(2, 4))
    cpu = jax.devices("cpu")[0]
    traces: list[int] = []

    @jax.jit
    def consume(m):
        traces.append(1)  # runs while tracing only
        rows = jax.numpy.arange(m.num_reqs) < m.num_scheduled_reqs  # static bound, per-step value
        return (m.seq_lens * rows).sum() + m.slot_mapping.sum() + m.block_table.sum() * m.max_seq_len

    def step(batch, bucket):
        md = attnsync.build(lad.pad(batch, bucket))
        jmd = asj.lower(md, cpu, bucket=bucket)
        return md, consume(jmd)

    compiles = _compile_counter()
    with jax.transfer_guard("disallow"):
        for bucket in lad.buckets():  # warm-up through the same path as the steps
            step(lad.example_batch(bucket), bucket)
    warm_compiles, warm_traces = len(compiles), len(traces)
    # at most one trace per bucket (buckets of equal shapes and bounds share one)
    assert 8 <= warm_traces <= len(lad.buckets())
    rng = np.random.default_rng(11)
    seen = set()
    with jax.transfer_guard("disallow"):
        for i in range(1000):
            batch = random_batch(rng, lad)
            bucket = lad.bucket_for(batch)
            seen.add(bucket)
            md, value = step(batch, bucket)
            if i % 97 == 0:  # spot-check the consumer's value (a D2H read: allowed on CPU)
                expect = int(md.seq_lens[: md.num_scheduled_reqs].sum()) + int(md.slot_mapping.sum()) \
                    + int(md.block_table.sum()) * bucket.max_seq_len
                assert int(value) == expect
    assert len(seen) >= 6
    assert len(traces) == warm_traces, "a step retraced the consumer"
    assert len(compiles) == warm_compiles, f"{len(compiles) - warm_compiles} compiles after warm-up"


# ---------------------------------------------------------------------------------------------
# torch: persistent staging on the CPU, one persistent lowering per bucket.

torch = pytest.importorskip("torch")


def test_persistent_cpu_stager_keeps_addresses_and_refuses_another_layout_before_writing():
    from attnsync.adapters import torch as ast

    lad = ladder()
    stager = ast.Stager("cpu", persistent=True)
    bucket = lad.bucket_for(make_batch([1] * 5, [80] * 5))
    assert bucket.width == 8
    pointers, out = None, None
    for step in range(5):
        batch = make_batch([1] * 5, np.array([9, 20, 33, 40, 70]) + step, width=8, seed=step)
        md = bucket.bound(attnsync.build(lad.pad(batch, bucket)))
        out = ast.lower(md, "cpu", stager=stager)
        now = {name: getattr(out, name).data_ptr() for name in
               ("query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping")}
        pointers = pointers or now
        assert now == pointers
        np.testing.assert_array_equal(out.slot_mapping.numpy(), md.slot_mapping)
        np.testing.assert_array_equal(out.block_table_tensor.numpy(), md.block_table)
        assert out.max_seq_len == bucket.max_seq_len
    assert stager.stats.copies == 5
    snapshot = out.slot_mapping.clone()
    with pytest.raises(SpecError, match=r"persistent stager.*Fix: pad every batch to the same bucket"):
        ast.lower(attnsync.build(make_batch([1, 1], [5, 9])), "cpu", stager=stager)
    assert stager.stats.copies == 5 and torch.equal(out.slot_mapping, snapshot)


def test_persistent_ladder_has_one_stager_per_bucket():
    from attnsync.integrations.graphs import PersistentLadder, PersistentLowering

    lad = ladder()
    lowerings = PersistentLadder(lad, "cpu")
    first = {}
    for step in range(6):
        for n in (2, 5, 11):
            batch = make_batch([1] * n, np.arange(n) % 4 + 2 + step, width=13, seed=step)
            bucket, tmd = lowerings.lower_batch(batch)
            ptr = tmd.query_start_loc.data_ptr()
            assert first.setdefault(bucket, ptr) == ptr
            assert tmd.num_reqs == bucket.num_reqs and tmd.max_seq_len == bucket.max_seq_len
            np.testing.assert_array_equal(tmd.query_start_loc[: n + 1].numpy(), np.arange(n + 1))
    assert len(lowerings.lowerings) == 3 and len(set(first.values())) == 3
    assert all(low.stats.copies == 6 for low in lowerings.lowerings.values())
    low = PersistentLowering(lad.bucket_for(make_batch([1], [5])), "cpu")
    with pytest.raises(SpecError, match=r"rows \(num_reqs\) 2 \(bucket: 1\)"):
        low.lower(attnsync.build(make_batch([1, 1], [5, 9])))
    assert low.stats.copies == 0


def test_graphs_docstring_examples():
    import attnsync.integrations.graphs as graphs

    assert doctest.testmod(graphs).failed == 0
