"""The 21 equivalence pairs of vllm-backends.md section 6: each naive (sync-ful) form against its
sync-free form, with the worked values of the reference where it gives them.

Every pair runs on the CPU, and on CUDA when present (the ``device`` parameter's ``cuda`` case is
marked ``gpu``; tests/conftest.py skips it on a host without CUDA). On CUDA the sync-free form
also runs under `attnsync.testing.no_sync()` (torch's sync debug mode in "error"), and for
the pairs whose naive form is a flagged sync (S1 reads, S2 scalar/list copies, S3 data-dependent
shapes) the naive form must raise there: equality alone would not show the pair is the right
one. On the CPU the same distinction is shown with fake tensors where it applies: the naive form
needs data to know its result (`DataDependentOutputException` / `DynamicOutputShapeException`),
the sync-free one does not.

Where a pair belongs to a backend (Flex left-pack and inverse table, Mamba chunk metadata,
FlashInfer indptr, Tree/TurboQuant maxima, ...), the pair is tested self-contained here (both
forms written in this file), and a second test checks that attnsync's builder gives the same
values; it imports the backend lazily and skips, with the reason, when the module is missing.

Item 21 (pinned staging reuse, a negative test) is simulated on the CPU with a delayed fake
stream through attnsync's own `SlotRing`; the real-GPU versions are
tests/gpu/test_core_gpu.py::test_guarded_ring_under_a_delayed_stream and
::test_unguarded_single_slot_corrupts_under_the_same_delay (reused, not duplicated), plus the
fresh-allocation leg in tests/gpu/test_equivalence_gpu.py.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from pathlib import Path

import numpy as np
import pytest

import attnsync
from attnsync.testing import no_sync

torch = pytest.importorskip("torch")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DATA_DEPENDENT = ("DataDependentOutputException", "DynamicOutputShapeException")


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on(device, values, dtype=torch.int32):
    """A tensor on `device` (test input preparation; outside any guard)."""
    out = torch.as_tensor(np.asarray(values), dtype=dtype).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def upload(values, dtype, device):
    """vLLM's `async_tensor_h2d`: a fresh pinned host tensor, one non_blocking copy."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


@contextlib.contextmanager
def sync_free(device):
    """On CUDA, fail on any sync inside the block; on the CPU nothing to guard."""
    with no_sync() if device.type == "cuda" else contextlib.nullcontext():
        yield


def assert_naive_syncs(device, fn):
    """On CUDA the naive form must be flagged by the sync debug mode (S1/S2/S3)."""
    if device.type != "cuda":
        return
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=r"(?i)synchroniz"), no_sync():
        fn()
    torch.cuda.synchronize()


def fake_raises(fn, *tensors):
    """`fn` needs data: on fake tensors it raises a data-dependence exception."""
    with pytest.raises(Exception) as info, FakeTensorMode() as mode:
        fn(*(mode.from_tensor(t) for t in tensors))
    assert type(info.value).__name__ in DATA_DEPENDENT, info.value


def fake_ok(fn, *tensors):
    """`fn` runs on fake tensors: no data-dependent read."""
    with FakeTensorMode() as mode:
        return fn(*(mode.from_tensor(t) for t in tensors))


def backend(name):
    """A backend (or adapter/kernel) module of attnsync, or skip when it does not exist yet."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            pytest.skip(f"{name} does not exist yet")
        raise


def np_of(t):
    return t.cpu().numpy()


def qsl_of(q):
    return np.concatenate([[0], np.cumsum(q)]).astype(np.int32)


# --------------------------------------------------------------------------------------------
# 1. Scalar store into a device tensor: t[i] = v -> t[i:i+1] = v / fill_


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32])
def test_p01_scalar_store(device, dtype):
    rng = np.random.default_rng(1)
    for index in (0, 1):  # [0]: FlashInfer indptr, fast-prefill decode_qsl; [1]: TurboQuant cu_2[1]
        t = on(device, rng.integers(-50, 50, 6), dtype)
        v = int(rng.integers(-9, 9))
        naive = t.clone()
        naive[index] = v
        sliced, filled = t.clone(), t.clone()
        with sync_free(device):
            sliced[index : index + 1] = v
            filled[index : index + 1].fill_(v)
        for out in (sliced, filled):
            assert out.dtype == dtype and torch.equal(out, naive)
    assert_naive_syncs(device, lambda: t.clone().__setitem__(0, 7))


# --------------------------------------------------------------------------------------------
# 2. Histogram: bincount(ids, minlength=R) -> zeros(R).scatter_add_(ids, ones)


def histogram_free(ids, rows):
    ids = ids.long()  # bincount is int64; the scatter follows ids' dtype: cast explicitly
    return torch.zeros(rows, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def test_p02_histogram_worked_values(device):
    logits = on(device, [14, 18, 19, 27], torch.int64)
    qsl = on(device, [0, 15, 20, 28], torch.int64)
    ids = torch.bucketize(logits, qsl[1:], right=True)
    assert np_of(ids).tolist() == [0, 1, 1, 2]
    naive = torch.bincount(ids, minlength=3)
    with sync_free(device):
        counts = histogram_free(ids, 3)
        decode_qsl = torch.empty(4, dtype=torch.int64, device=device)
        decode_qsl[:1].fill_(0)
        torch.cumsum(counts, 0, out=decode_qsl[1:])
    assert counts.dtype == naive.dtype == torch.int64
    assert np_of(counts).tolist() == np_of(naive).tolist() == [1, 2, 1]
    assert np_of(decode_qsl).tolist() == [0, 1, 3, 4]
    assert (int(counts.max()), int(counts.sum())) == (2, 4)  # read back after the guard (test only)
    assert_naive_syncs(device, lambda: torch.bincount(ids, minlength=3))


def test_p02_histogram_random(device):
    rng = np.random.default_rng(2)
    for _ in range(20):
        rows = int(rng.integers(1, 12))
        ids = on(device, rng.integers(0, rows, int(rng.integers(0, 40))), torch.int32)
        with sync_free(device):
            free = histogram_free(ids, rows)
        assert torch.equal(free, torch.bincount(ids.long(), minlength=rows))


def test_p02_histogram_precondition_and_fake_tensors():
    ids = torch.tensor([0, 1, 3])  # 3 >= R = 3: outside the precondition (CPU only)
    assert torch.bincount(ids, minlength=3).tolist() == [1, 1, 0, 1]  # longer than R
    with pytest.raises(RuntimeError):
        histogram_free(ids, 3)  # the scatter refuses (a device-side assert on CUDA)
    good = torch.tensor([0, 2, 2])
    fake_raises(lambda t: torch.bincount(t, minlength=3), good)
    assert tuple(fake_ok(lambda t: histogram_free(t, 3), good).shape) == (3,)


# --------------------------------------------------------------------------------------------
# 3. Bucketize semantics: bucketize(x, qsl[1:], right=True) == searchsorted(side="right")


def test_p03_bucketize_equals_numpy_searchsorted(device):
    rng = np.random.default_rng(3)
    for _ in range(30):
        q = rng.integers(0, 5, int(rng.integers(1, 10)))  # zeros: empty rows, equal qsl entries
        qsl = qsl_of(q)
        x = np.arange(int(qsl[-1]) + 3)  # a few tokens past the end too
        tokens, ends = on(device, x), on(device, qsl[1:])  # inputs prepared outside the guard
        with sync_free(device):
            got = torch.bucketize(tokens, ends, right=True)
        assert np_of(got).tolist() == np.searchsorted(qsl[1:], x, side="right").tolist()


def test_p03_builder_token_to_req_equals_searchsorted():
    batch = attnsync.Batch(query_lens=[2, 0, 3, 1], seq_lens=[9, 4, 3, 7], block_table=[[1], [2], [3], [4]],
                           block_size=16, padded_num_tokens=8)
    md = attnsync.build(batch)
    tokens = np.arange(md.num_actual_tokens)
    want = np.searchsorted(md.query_start_loc[1:], tokens, side="right")
    np.testing.assert_array_equal(md.token_to_req, want)  # padding tokens -> R as well


# --------------------------------------------------------------------------------------------
# 4. Fast-prefill scalars: counts.max().item(), counts.sum().item() -> host ints


def test_p04_fast_prefill_scalars(device):
    rng = np.random.default_rng(4)
    for _ in range(10):
        q = rng.integers(1, 9, int(rng.integers(1, 8)))
        sampled = np.minimum(rng.integers(1, 4, q.size), q)  # per request: its last k tokens
        qsl = qsl_of(q)
        logits = np.concatenate([np.arange(e - k, e) for e, k in zip(qsl[1:], sampled, strict=True)])
        ids = torch.bucketize(on(device, logits, torch.int64), on(device, qsl[1:], torch.int64), right=True)
        counts = histogram_free(ids, q.size)
        naive_max, naive_sum = counts.max().item(), counts.sum().item()
        host_max, host_total = int(sampled.max()), int(logits.size)  # max_logits_per_req, num_logits_indices
        assert (naive_max, naive_sum) == (host_max, host_total)
    assert_naive_syncs(device, lambda: counts.max().item())


# --------------------------------------------------------------------------------------------
# 5. Left-pack with dedup: nonzero + scatter -> garbage-column scatter


def first_occurrence(x, num_values, ignore):
    """Fixed-shape keep mask: the first occurrence of each value per row, `ignore` dropped."""
    rows, width = x.shape
    position = torch.arange(width, device=x.device).expand(rows, width)
    first = torch.full((rows, num_values + 1), width, dtype=torch.long, device=x.device)
    first.scatter_reduce_(1, x.long(), position, reduce="amin", include_self=True)
    return (first.gather(1, x.long()) == position) & (x != ignore)


def left_pack_naive(x, num_values, ignore=0, pad=-1):
    keep = first_occurrence(x, num_values, ignore)
    dest = keep.cumsum(1) - 1
    out = torch.full_like(x, pad)
    rows, cols = torch.nonzero(keep, as_tuple=True)  # S3: the size comes from the device
    out[rows, dest[rows, cols]] = x[rows, cols]
    return out


def left_pack_free(x, num_values, ignore=0, pad=-1):
    keep = first_occurrence(x, num_values, ignore)
    width = x.shape[1]
    dest = torch.where(keep, keep.cumsum(1) - 1, width)  # dropped entries go to column N
    out = torch.full((x.shape[0], width + 1), pad, dtype=x.dtype, device=x.device)
    out.scatter_(1, dest, x)  # column N receives arbitrary values ...
    return out[:, :width]  # ... and is cut off


WORKED_X = [[3, 1, 0, 1, 2], [2, 2, 2, 0, 0]]
WORKED_PACKED = [[3, 1, 2, -1, -1], [2, -1, -1, -1, -1]]


def test_p05_left_pack_worked_values(device):
    x = on(device, WORKED_X, torch.int64)
    naive = left_pack_naive(x, 3)
    with sync_free(device):
        free = left_pack_free(x, 3)
    assert np_of(naive).tolist() == np_of(free).tolist() == WORKED_PACKED
    assert_naive_syncs(device, lambda: left_pack_naive(x, 3))


def test_p05_left_pack_random_and_fake_tensors(device):
    rng = np.random.default_rng(5)
    for _ in range(30):
        m = int(rng.integers(1, 9))
        x = on(device, rng.integers(0, m + 1, (int(rng.integers(1, 5)), int(rng.integers(1, 9)))), torch.int64)
        with sync_free(device):
            free = left_pack_free(x, m)
        assert torch.equal(free, left_pack_naive(x, m))
    cpu = torch.tensor(WORKED_X)
    fake_raises(lambda t: left_pack_naive(t, 3), cpu)
    fake_ok(lambda t: left_pack_free(t, 3), cpu)


def test_p05_left_pack_jax_drop_mode_and_the_negative_index_trap():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x = jnp.asarray(WORKED_X, dtype=jnp.int32)
    keep = jnp.asarray(np_of(first_occurrence(torch.tensor(WORKED_X), 3, 0)))
    width = x.shape[1]
    rows = jnp.arange(x.shape[0])[:, None]
    dest = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, width)
    packed = jnp.full(x.shape, -1, jnp.int32).at[rows, dest].set(x, mode="drop")
    assert np.asarray(packed).tolist() == WORKED_PACKED
    # -1 as the garbage index wraps to the last column: dropped values land in the output
    wrapped = jnp.full(x.shape, -1, jnp.int32).at[rows, jnp.where(keep, dest, -1)].set(x)
    assert np.asarray(wrapped).tolist() != WORKED_PACKED


def test_p05_builder_left_pack_equals():
    flex_torch = backend("attnsync.integrations.flex_torch")
    rng = np.random.default_rng(55)
    for x in [np.array(WORKED_X)] + [rng.integers(0, 7, (3, 6)) for _ in range(10)]:
        packed, counts = flex_torch.left_pack_device(torch.tensor(x), int(x.max()) if x.size else 0)
        want = left_pack_naive(torch.tensor(x), int(x.max()))
        assert torch.equal(packed.long(), want)
        assert counts.tolist() == (want >= 0).sum(1).tolist()
    pytest.importorskip("jax")
    flex_jax = backend("attnsync.kernels.flex_jax")
    packed, _ = flex_jax.left_pack_jax(np.asarray(WORKED_X, np.int32), num_values=3)
    assert np.asarray(packed).tolist() == WORKED_PACKED


# --------------------------------------------------------------------------------------------
# 6. Token -> request ids (doc_ids)


def doc_ids_forms(qsl_np, device, static_tokens):
    qsl = on(device, qsl_np)
    rows = qsl.shape[0] - 1
    counts = qsl[1:] - qsl[:-1]
    naive = torch.repeat_interleave(torch.arange(rows, dtype=torch.int32, device=device), counts)
    with sync_free(device):
        host = upload(np.repeat(np.arange(rows, dtype=np.int32), np.diff(qsl_np)).tolist(), torch.int32, device)
        sized = torch.repeat_interleave(torch.arange(rows, dtype=torch.int32, device=device), counts,
                                        output_size=int(qsl_np[-1]))  # (b) a host int sizes it
        static = torch.bucketize(torch.arange(static_tokens, dtype=torch.int32, device=device), qsl[1:],
                                 out_int32=True, right=True)  # (c) a fixed bucket of tokens
    return naive, host, sized, static


def test_p06_doc_ids_worked_values(device):
    naive, host, sized, static = doc_ids_forms(np.array([0, 2, 2, 5]), device, 8)
    for out in (naive, host, sized):
        assert np_of(out).tolist() == [0, 0, 2, 2, 2]
    assert np_of(static).tolist() == [0, 0, 2, 2, 2, 3, 3, 3]  # the padding tail maps to R
    assert_naive_syncs(device, lambda: doc_ids_forms(np.array([0, 2, 2, 5]), device, 8))


def test_p06_doc_ids_random(device):
    rng = np.random.default_rng(6)
    for _ in range(20):
        qsl = qsl_of(rng.integers(0, 6, int(rng.integers(1, 9))))
        total = int(qsl[-1])
        naive, host, sized, static = doc_ids_forms(qsl, device, total + 4)
        assert torch.equal(naive, host) and torch.equal(naive, sized)
        assert torch.equal(naive, static[:total]) and (np_of(static[total:]) == qsl.size - 1).all()
    fake_raises(lambda q: torch.repeat_interleave(torch.arange(3), q[1:] - q[:-1]), torch.tensor([0, 2, 2, 5]))
    fake_ok(lambda q: torch.repeat_interleave(torch.arange(3), q[1:] - q[:-1], output_size=5),
            torch.tensor([0, 2, 2, 5]))


def test_p06_doc_ids_jax_forms():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    qsl = jnp.asarray([0, 2, 2, 5], jnp.int32)
    rows = jnp.arange(3, dtype=jnp.int32)
    repeated = jnp.repeat(rows, qsl[1:] - qsl[:-1], total_repeat_length=7)
    assert np.asarray(repeated).tolist() == [0, 0, 2, 2, 2, 2, 2]  # pads by repeating the final value
    searched = jnp.searchsorted(qsl[1:], jnp.arange(7, dtype=jnp.int32), side="right")
    assert np.asarray(searched).tolist() == [0, 0, 2, 2, 2, 3, 3]


def test_p06_builder_doc_ids_equal():
    backend("attnsync.backends.flex")
    batch = attnsync.Batch(query_lens=[2, 0, 3], seq_lens=[5, 4, 3], block_table=[[1], [2], [3]], block_size=16,
                           padded_num_tokens=8)
    md = attnsync.build(batch, backend="flex", num_cache_pages=4)
    assert md.doc_ids[:5].tolist() == [0, 0, 2, 2, 2]
    flex_torch = backend("attnsync.integrations.flex_torch")
    qsl = torch.from_numpy(np.array(md.query_start_loc))
    assert flex_torch.doc_ids_device(qsl, 5, padded_tokens=8).tolist() == md.doc_ids.tolist()
    assert flex_torch.doc_ids_static_device(qsl, 8).tolist() == md.doc_ids.tolist()


# --------------------------------------------------------------------------------------------
# 7. Boolean combine in mask mods: where(valid, m, False) -> valid & m


def test_p07_boolean_combine(device):
    rng = np.random.default_rng(7)
    valid = on(device, rng.random((4, 9)) < 0.5, torch.bool)
    m = on(device, rng.random((4, 9)) < 0.5, torch.bool)
    naive = torch.where(valid, m, False)
    with sync_free(device):
        free = valid & m
    assert naive.dtype == free.dtype == torch.bool and torch.equal(naive, free)
    # the precondition matters: for a non-bool m the first form keeps m's values, `&` does not
    ints = on(device, rng.integers(0, 4, (4, 9)), torch.int64)
    assert torch.where(valid, ints, False).dtype == torch.int64


# --------------------------------------------------------------------------------------------
# 8 and 9. Sub-batch maxima and per-request host loop inputs from host arrays

# Decode rows of 1 + k tokens (k = 2) under async spec decode carry an optimistic bound (true +
# rejected drafts); prefill rows are exact.
SPEC_Q = np.array([3, 3, 3, 5, 6, 7])  # 3 decodes, 2 long extends, a fresh prefill (Mamba's strict order)
SPEC_TRUE = np.array([40, 18, 77, 12, 30, 7])
SPEC_REJECTED = np.array([2, 0, 1, 0, 0, 0])
SPEC_BOUND = SPEC_TRUE + SPEC_REJECTED
SPEC_EXACT = SPEC_REJECTED == 0
SPEC_EXACT[:3] = False  # decode rows are inexact even when nothing was rejected
SPEC_ND = 3


def spec_batch(**kwargs):
    table = np.arange(1, 6 * 6 + 1).reshape(6, 6)
    return attnsync.Batch(query_lens=SPEC_Q, seq_lens=SPEC_BOUND, block_table=table, block_size=16,
                          seq_lens_exact=SPEC_EXACT, **kwargs)


def test_p08_sub_batch_maxima(device):
    seq_lens = on(device, SPEC_TRUE)  # exact lengths live on the device only
    qsl_gpu, qsl_cpu = on(device, qsl_of(SPEC_Q)), qsl_of(SPEC_Q)
    for a, b in ((SPEC_ND, 6), (0, SPEC_ND)):
        naive = int(seq_lens[a:b].max().item())
        host = int(SPEC_BOUND[a:b].max())
        if SPEC_EXACT[a:b].all():
            assert host == naive  # prefill rows: exact in every mode
        else:
            assert naive <= host <= naive + 2  # decode rows: a bound, too large by <= k
        assert int((qsl_gpu[a + 1 : b + 1] - qsl_gpu[a:b]).max().item()) == int(np.diff(qsl_cpu[a : b + 1]).max())
    assert_naive_syncs(device, lambda: seq_lens[SPEC_ND:].max().item())


def test_p08_builder_maxima():
    backend("attnsync.backends.tree")
    md = attnsync.build(attnsync.reorder(spec_batch(), decode_threshold=4)[1], backend="tree",
                        speculative_token_tree="[(0,), (1,), (0, 0)]")
    assert md.num_decodes == SPEC_ND
    assert md.max_prefill_seq_len == int(SPEC_TRUE[SPEC_ND:].max())  # == the .item() on exact rows
    assert md.max_prefill_query_len == int(SPEC_Q[SPEC_ND:].max())
    assert SPEC_TRUE[:SPEC_ND].max() <= md.max_decode_seq_len <= SPEC_TRUE[:SPEC_ND].max() + 2
    assert md.max_decode_query_len == 3
    backend("attnsync.backends.turboquant")
    tq = attnsync.build(attnsync.Batch(query_lens=[1, 1, 7, 5, 4], seq_lens=[41, 20, 7, 12, 30],
                                       block_table=np.arange(1, 26).reshape(5, 5), block_size=16,
                                       seq_lens_exact=[False, False, True, True, True]), backend="turboquant")
    assert tq.prefill_max_seq_len == 30 and tq.prefill_max_query_len == 7


def test_p09_host_loop_inputs(device):
    qsl = on(device, qsl_of(SPEC_Q))
    seq_lens = on(device, SPEC_TRUE)
    assert qsl.tolist() == qsl_of(SPEC_Q).tolist()  # always equal
    consumed = slice(SPEC_ND, 6)  # the host loop reads prefill rows only
    assert seq_lens.tolist()[consumed] == SPEC_BOUND.tolist()[consumed]
    assert seq_lens.tolist()[:SPEC_ND] != SPEC_BOUND.tolist()[:SPEC_ND]  # why decode rows must not feed it
    assert_naive_syncs(device, lambda: qsl.tolist())


def test_p09_builder_host_loop_rows():
    backend("attnsync.backends.turboquant")
    q, s = [1, 10, 2, 6], [40, 10, 5, 13]
    md = attnsync.build(attnsync.Batch(query_lens=q, seq_lens=s, block_table=np.arange(1, 13).reshape(4, 3),
                                       block_size=16), backend="turboquant")
    qsl = torch.tensor(qsl_of(q)).tolist()  # the naive form: device lists read back
    lens = torch.tensor(s).tolist()
    naive = [(r, qsl[r], qsl[r + 1] - qsl[r], lens[r], lens[r] - (qsl[r + 1] - qsl[r])) for r in range(1, 4)]
    assert [tuple(int(v) for v in row) for row in md.host_loop_rows] == naive


# --------------------------------------------------------------------------------------------
# 10 and 12. Mamba prefill num_computed and prep_initial_states from host arithmetic


def test_p10_p12_prefill_num_computed(device):
    rows, npre = 6, 6 - SPEC_ND
    seq_lens, qsl = on(device, SPEC_TRUE), on(device, qsl_of(SPEC_Q))
    naive = (seq_lens - (qsl[1:] - qsl[:-1])).cpu()[rows - npre : rows]  # S1
    qsl_cpu = qsl_of(SPEC_Q)
    host = SPEC_BOUND[rows - npre : rows] - np.diff(qsl_cpu[-npre - 1 :])
    assert naive.tolist() == host.tolist() == [7, 24, 0]
    naive_prep = bool(torch.any(seq_lens[rows - npre :] - (qsl[rows - npre + 1 :] - qsl[rows - npre : -1]) > 0).item())
    assert naive_prep == bool((host > 0).any()) is True
    assert_naive_syncs(device, lambda: (seq_lens - (qsl[1:] - qsl[:-1])).cpu())


def test_p10_p12_builder_mamba():
    backend("attnsync.backends.mamba")
    batch = spec_batch()
    md = attnsync.build(batch, backend="mamba", chunk_size=4, num_spec_tokens=2,
                        num_accepted_tokens=[1, 3, 2])
    assert md.num_decodes == SPEC_ND
    assert md.num_computed_tokens_p.tolist() == [7, 24, 0]
    assert md.has_initial_states_p.tolist() == [True, True, False] and md.prep_initial_states is True
    fresh = attnsync.Batch(query_lens=[1, 5, 4], seq_lens=[9, 5, 4], block_table=[[1], [2], [3]], block_size=16)
    assert attnsync.build(fresh, backend="mamba", chunk_size=4).prep_initial_states is False


# --------------------------------------------------------------------------------------------
# 11. List -> device tensor: torch.tensor(list, device) -> pinned non_blocking copy


def test_p11_list_to_device(device):
    values = [0, 4, 6, 9, 13]
    naive = torch.tensor(values, dtype=torch.int32, device=device)  # S2 on CUDA
    with sync_free(device):
        free = upload(values, torch.int32, device)
    assert free.dtype == naive.dtype and torch.equal(free, naive)
    assert_naive_syncs(device, lambda: torch.tensor(values, dtype=torch.int32, device=device))


def test_p11_builder_staged_lists_equal_device_lists(device):
    from attnsync.adapters import torch as ast

    backend("attnsync.backends.mamba")
    batch = attnsync.Batch(query_lens=[7, 6], seq_lens=[12, 6], block_table=[[1], [2]], block_size=16)
    md = attnsync.build(batch, backend="mamba", chunk_size=4)
    with sync_free(device):
        tmd = ast.lower(md, device)
    cu, seq_idx, last = chunks_brute_force([5, 0], [7, 6], 4)
    assert cu == [0, 3, 7, 11, 13]
    for name, want in (("cu_chunk_seqlen_p", cu), ("seq_idx_p", seq_idx), ("last_chunk_indices_p", last)):
        assert torch.equal(getattr(tmd, name), torch.tensor(want, dtype=torch.int32, device=device)), name
    ranges = [[(0, 3)], None]
    tr = attnsync.build(attnsync.Batch(query_lens=[4, 1], seq_lens=[4, 9], block_table=[[1], [2]], block_size=16),
                        backend="triton", num_q_heads=2, num_kv_heads=1, head_dim=16, prefix_ranges=ranges)
    with sync_free(device):
        ttmd = ast.lower(tr, device)
    padded = torch.tensor([[[0, 3]], [[0, 0]]], dtype=torch.int32, device=device)  # vLLM's compute_mm_prefix_range_tensor
    assert torch.equal(ttmd.mm_prefix_range_tensor, padded)


# --------------------------------------------------------------------------------------------
# 13. Indexing a device tensor with host indices -> upload the indices first


def test_p13_indexing_with_uploaded_indices(device):
    rng = np.random.default_rng(13)
    table = on(device, rng.integers(0, 100, (5, 7)))
    rows_np, cols_np = rng.integers(0, 5, 12), rng.integers(0, 7, 12)
    naive = table[torch.from_numpy(rows_np), torch.from_numpy(cols_np)]  # CPU indices: uploaded inside indexing
    with sync_free(device):
        free = table[upload(rows_np.tolist(), torch.int64, device), upload(cols_np.tolist(), torch.int64, device)]
    assert torch.equal(free, naive)


# --------------------------------------------------------------------------------------------
# 14. Mamba chunk metadata: host algorithm vs a brute-force walk over tokens


def chunks_brute_force(computed, new, chunk):
    """Walk tokens; a chunk starts at each request boundary and each absolute multiple of chunk."""
    cu, seq_idx, last, run = [0], [], [], 0
    for r, (c, n) in enumerate(zip(computed, new, strict=True)):
        for t in range(n):
            if t == 0 or (c + t) % chunk == 0:
                if t:
                    cu.append(cu[-1] + run)
                seq_idx.append(r)
                run = 0
            run += 1
        if n:
            cu.append(cu[-1] + run)
        last.append(len(cu) - 2)
    return cu, seq_idx, last


def chunks_host(computed, new, chunk):
    """vllm-backends.md 2.3: a partial first chunk when c % chunk != 0, then full chunks."""
    cu, seq_idx, last = [0], [], []
    for r, (c, n) in enumerate(zip(computed, new, strict=True)):
        remaining = n
        if c % chunk and remaining:
            first = min(math.ceil(c / chunk) * chunk - c, remaining)
            cu.append(cu[-1] + first)
            seq_idx.append(r)
            remaining -= first
        while remaining > 0:
            size = min(chunk, remaining)
            cu.append(cu[-1] + size)
            seq_idx.append(r)
            remaining -= size
        last.append(len(cu) - 2)
    return cu, seq_idx, last


CHUNK_EXAMPLES = [
    (4, [(0, 6), (5, 7)], ([0, 4, 6, 9, 13], [0, 0, 1, 1], [1, 3])),
    (4, [(8, 4), (3, 1), (0, 0)], ([0, 4, 5], [0, 1], [0, 1, 1])),
]


@pytest.mark.parametrize(("chunk", "rows", "want"), CHUNK_EXAMPLES)
def test_p14_chunk_metadata_worked_values(chunk, rows, want):
    computed, new = zip(*rows, strict=True)
    assert chunks_brute_force(computed, new, chunk) == want
    assert chunks_host(computed, new, chunk) == want


def test_p14_chunk_metadata_random_and_upload(device):
    rng = np.random.default_rng(14)
    for _ in range(60):
        chunk = int(rng.choice([1, 3, 4, 16]))
        rows = int(rng.integers(0, 6))
        computed = rng.integers(0, 40, rows).tolist()
        new = rng.integers(0, 30, rows).tolist()
        want = chunks_brute_force(computed, new, chunk)
        assert chunks_host(computed, new, chunk) == want
    naive = torch.as_tensor(want[0], dtype=torch.int32, device=device)  # S2 (the pre-PR form)
    with sync_free(device):
        free = upload(want[0], torch.int32, device)
    assert torch.equal(naive, free)


def test_p14_builder_chunk_metadata():
    mamba = backend("attnsync.backends.mamba")
    rng = np.random.default_rng(141)
    cases = [(chunk, rows) for chunk, rows, _ in CHUNK_EXAMPLES]
    cases += [(int(rng.choice([1, 4, 16])), list(zip(rng.integers(0, 40, n).tolist(), rng.integers(0, 30, n).tolist(),
                                                     strict=True)))
              for n in rng.integers(0, 6, 40)]
    for chunk, rows in cases:
        computed = np.array([c for c, _ in rows], dtype=np.int32)
        qsl = qsl_of([n for _, n in rows])
        cu, seq_idx, last = mamba.chunk_metadata(computed, qsl, chunk)
        want = chunks_brute_force(computed.tolist(), [n for _, n in rows], chunk)
        assert (cu.tolist(), seq_idx.tolist(), last.tolist()) == want, (chunk, rows)


# --------------------------------------------------------------------------------------------
# 15 and 16. FlashInfer paged KV arrays; TRTLLM prefill kv indptr on the device


def paged_kv_brute_force(seq_lens, table, page):
    indptr, indices, last = [0], [], []
    for r, s in enumerate(seq_lens):
        n = -(-s // page)
        indptr.append(indptr[-1] + n)
        indices += [int(x) for x in table[r][:n]]
        last.append(0 if s == 0 else (s % page or page))
    return indptr, indices, last


def paged_kv_host(seq_lens, table, page):
    """Vectorised numpy: what a builder does on the host."""
    s = np.asarray(seq_lens, dtype=np.int64)
    pages = -(-s // page)
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    columns = np.arange(np.asarray(table).shape[1])
    indices = np.asarray(table)[columns[None, :] < pages[:, None]].astype(np.int32)
    last = np.where(s == 0, 0, (s - 1) % page + 1).astype(np.int32)
    return indptr, indices, last


def indices_on_device(table, indptr, total):
    """The copy kernel's result with fixed shapes: slot j belongs to row searchsorted(indptr[1:], j)."""
    slot = torch.arange(total, dtype=torch.int32, device=table.device)
    row = torch.bucketize(slot, indptr[1:], out_int32=True, right=True)
    column = slot - indptr[row.long()]
    return table[row.long(), column.long()]


def test_p15_flashinfer_paged_kv_worked_values(device):
    seq, page = [0, 16, 17, 33], 16
    table = [[0, 0, 0], [5, 0, 0], [6, 7, 0], [8, 9, 10]]
    want = ([0, 0, 1, 3, 6], [5, 6, 7, 8, 9, 10], [0, 16, 1, 1])
    assert paged_kv_brute_force(seq, table, page) == want
    indptr, indices, last = paged_kv_host(seq, table, page)
    assert (indptr.tolist(), indices.tolist(), last.tolist()) == want
    table_d, indptr_d = on(device, table), on(device, indptr)  # inputs prepared outside the guard
    with sync_free(device):
        got = indices_on_device(table_d, indptr_d, int(indptr[-1]))
    assert np_of(got).tolist() == want[1]


def test_p15_flashinfer_paged_kv_random(device):
    rng = np.random.default_rng(15)
    for _ in range(30):
        page = int(rng.choice([1, 4, 16]))
        seq = rng.integers(0, 70, int(rng.integers(1, 8)))
        table = rng.integers(1, 500, (seq.size, -(-int(seq.max()) // page) + 1))
        want = paged_kv_brute_force(seq.tolist(), table.tolist(), page)
        indptr, indices, last = paged_kv_host(seq, table, page)
        assert (indptr.tolist(), indices.tolist(), last.tolist()) == want
        table_d, indptr_d = on(device, table), on(device, indptr)  # inputs prepared outside the guard
        with sync_free(device):
            got = indices_on_device(table_d, indptr_d, int(indptr[-1]))
        assert np_of(got).tolist() == want[1]


def test_p15_builder_paged_kv():
    flashinfer = backend("attnsync.backends.flashinfer")
    rng = np.random.default_rng(151)
    for _ in range(20):
        page = int(rng.choice([1, 16]))
        q = rng.integers(1, 4, int(rng.integers(1, 7)))
        seq = q + rng.integers(0, 60, q.size)
        table = rng.integers(1, 500, (q.size, -(-int(seq.max()) // page)))
        batch = attnsync.reorder(attnsync.Batch(query_lens=q, seq_lens=seq, block_table=table, block_size=page))[1]
        md = attnsync.build(batch, backend="flashinfer")
        want = paged_kv_brute_force(batch.seq_lens.tolist(), batch.block_table.tolist(), page)
        got = (md.paged_kv_indptr.tolist(), md.paged_kv_indices.tolist(), md.paged_kv_last_page_len.tolist())
        assert got == want
        indptr, indices, last = flashinfer.paged_kv_arrays(batch.seq_lens, batch.block_table, page)
        assert (indptr.tolist(), indices.tolist(), last.tolist()) == want


def prefill_indptr_host(seq, ps, page):
    return np.concatenate([[0], np.cumsum(-(-np.asarray(seq[ps:], np.int64) // page))]).astype(np.int32)


def test_p16_trtllm_prefill_indptr_on_device(device):
    rng = np.random.default_rng(16)
    for _ in range(20):
        page = int(rng.choice([1, 16, 64]))
        seq = rng.integers(0, 300, int(rng.integers(1, 9)))
        ps = int(rng.integers(0, seq.size))
        rows = seq.size
        seq_lens = on(device, seq)
        buf_naive = torch.full((rows + 1,), -7, dtype=torch.int32, device=device)  # persistent buffer
        buf_free = buf_naive.clone()
        pages = torch.div(seq_lens[ps:] + (page - 1), page, rounding_mode="floor")
        buf_naive[ps] = 0  # S2
        torch.cumsum(pages, 0, dtype=torch.int32, out=buf_naive[ps + 1 : rows + 1])
        with sync_free(device):
            buf_free[ps : ps + 1].fill_(0)
            torch.cumsum(pages, 0, dtype=torch.int32, out=buf_free[ps + 1 : rows + 1])
        host = prefill_indptr_host(seq, ps, page)
        assert np_of(buf_naive[ps:]).tolist() == np_of(buf_free[ps:]).tolist() == host.tolist()
    assert_naive_syncs(device, lambda: buf_naive.__setitem__(ps, 0))


def test_p16_builder_prefill_paged_kv_indptr():
    backend("attnsync.backends.flashinfer")
    batch = attnsync.Batch(query_lens=[1, 1, 20, 5], seq_lens=[40, 17, 52, 5], block_table=np.arange(1, 17).reshape(4, 4),
                           block_size=16)
    md = attnsync.build(batch, backend="flashinfer")
    assert md.num_decodes == 2
    assert md.prefill_paged_kv_indptr.tolist() == prefill_indptr_host(batch.seq_lens, 2, 16).tolist() == [0, 4, 5]


# --------------------------------------------------------------------------------------------
# 17. Split of decodes and prefills


def split_vllm(qsl, max_query_len, num_reqs, threshold=1, *, require_uniform=False, is_prefilling=None):
    """vllm-backends.md 1.4 `split_decodes_and_prefills` on host arrays."""
    num_tokens = int(qsl[num_reqs])
    if max_query_len <= threshold and not (require_uniform and threshold > 1) and is_prefilling is None:
        return num_reqs, 0, num_tokens, 0
    q = np.diff(qsl[: num_reqs + 1])
    if q[0] > threshold:
        return 0, num_reqs, 0, num_tokens
    if require_uniform:
        if ((q == q[0]) | (q == 0)).all():
            return num_reqs, 0, num_tokens, 0
        mask = q != q[0]
    else:
        mask = q > threshold
    if is_prefilling is not None:
        mask = mask | is_prefilling
    first = int(np.argmax(mask)) if mask.any() else num_reqs
    return first, num_reqs - first, int(qsl[first]), num_tokens - int(qsl[first])


def split_reference(q, threshold=1, *, require_uniform=False, is_prefilling=None):
    """Classify every row, check the batch is ordered, count."""
    if require_uniform:
        decode = [(x == q[0] or x == 0) and q[0] <= threshold for x in q]
        if not all(decode):  # the first non-uniform row and everything after are prefills
            cut = next(i for i, d in enumerate(decode) if not d)
            decode = [i < cut for i in range(len(q))]
    else:
        decode = [x <= threshold and not (is_prefilling is not None and is_prefilling[i]) for i, x in enumerate(q)]
    nd = sum(decode)
    assert decode == [True] * nd + [False] * (len(q) - nd), "batch not decode-first"
    return nd, len(q) - nd, int(sum(q[:nd])), int(sum(q[nd:]))


def test_p17_split():
    rng = np.random.default_rng(17)
    for _ in range(100):
        nd, npre = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        if nd + npre == 0:
            continue
        threshold = int(rng.choice([1, 3]))
        q = np.concatenate([rng.integers(1, threshold + 1, nd), rng.integers(threshold + 1, 9, npre)])
        qsl = qsl_of(q)
        assert split_vllm(qsl, int(q.max()), q.size, threshold) == split_reference(q.tolist(), threshold)
        prefilling = np.concatenate([np.zeros(nd, bool), rng.random(npre) < 0.5])
        prefilling[nd:] |= q[nd:] > threshold
        assert split_vllm(qsl, int(q.max()), q.size, threshold, is_prefilling=prefilling) == split_reference(
            q.tolist(), threshold, is_prefilling=prefilling.tolist())
    # require_uniform: padded rows of 0 tokens count as decodes
    q = [3, 3, 3, 0, 0]
    assert split_vllm(qsl_of(q), 3, 5, 3, require_uniform=True) == split_reference(q, 3, require_uniform=True) == (5, 0, 9, 0)
    q = [3, 3, 2, 7]
    assert split_vllm(qsl_of(q), 7, 4, 3, require_uniform=True) == split_reference(q, 3, require_uniform=True) == (2, 2, 6, 9)


def test_p17_builder_split_equals_reference():
    rng = np.random.default_rng(171)
    for _ in range(40):
        nd, npre = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        q = np.concatenate([np.ones(nd, np.int64), rng.integers(2, 9, npre)])
        s = q + np.concatenate([rng.integers(1, 50, nd), rng.integers(0, 50, npre)])
        batch = attnsync.Batch(query_lens=q, seq_lens=s, block_table=np.ones((q.size, 4), np.int64), block_size=16)
        md = attnsync.build(batch)
        got = (md.num_decodes, md.num_extends + md.num_prefills, md.num_decode_tokens,
               md.num_extend_tokens + md.num_prefill_tokens)
        assert got == split_reference(q.tolist(), 1)


# --------------------------------------------------------------------------------------------
# 18. Local-attention virtual batches


def local_host(q, s, chunk, table, block_size):
    """vllm-backends.md 1.4 `make_local_attention_virtual_batches`, vectorised numpy."""
    q, s = np.asarray(q, np.int64), np.asarray(s, np.int64)
    q_first = np.minimum(chunk - ((s - q) % chunk), q)
    last = chunk + (s % -chunk)
    blocks = 1 + -(-(q - q_first) // chunk)
    starts = np.repeat(np.cumsum(blocks) - blocks, blocks)
    local = np.arange(blocks.sum()) - starts  # block index inside each request
    req = np.repeat(np.arange(q.size), blocks)
    rev = np.repeat(blocks, blocks) - 1 - local  # blocks after this one in its request
    q_local = np.where(local == 0, np.repeat(q_first, blocks),
                       np.minimum(np.repeat(q - q_first, blocks) - chunk * (local - 1), chunk))
    k_local = np.where(rev == 0, np.repeat(last, blocks), chunk)
    k_start = np.repeat(s, blocks) - (rev * chunk + np.repeat(last, blocks))
    block_idx = np.minimum(k_start[:, None] // block_size + np.arange(chunk // block_size)[None, :],
                           np.asarray(table).shape[1] - 1)
    return (q_local.tolist(), np.concatenate([[0], np.cumsum(q_local)]).tolist(), k_local.tolist(),
            k_start.tolist(), req, block_idx)


def local_brute_force(q, s, chunk):
    """Walk each request's new tokens; cut at absolute multiples of the chunk."""
    q_local, k_local, k_start = [], [], []
    for qr, sr in zip(q, s, strict=True):
        positions = list(range(sr - qr, sr))
        while positions:
            c = positions[0] // chunk
            mine = [p for p in positions if p // chunk == c]
            positions = positions[len(mine):]
            q_local.append(len(mine))
            k_start.append(c * chunk)
            k_local.append(mine[-1] + 1 - c * chunk)
    return q_local, [0, *np.cumsum(q_local).tolist()], k_local, k_start


def test_p18_local_attention_worked_values():
    q, s, chunk = [4, 10, 5], [6, 17, 9], 4
    q_local, cu_q, k_local, k_start, _, _ = local_host(q, s, chunk, np.zeros((3, 5)), 2)
    assert q_local == [2, 2, 1, 4, 4, 1, 4, 1]
    assert cu_q == [0, 2, 4, 5, 9, 13, 14, 18, 19]
    assert k_local == [4, 2, 4, 4, 4, 1, 4, 1]
    assert k_start == [0, 4, 4, 8, 12, 16, 4, 8]
    assert local_brute_force(q, s, chunk) == (q_local, cu_q, k_local, k_start)


def test_p18_local_attention_random_and_block_gather(device):
    rng = np.random.default_rng(18)
    for _ in range(40):
        chunk, block_size = int(rng.choice([4, 8, 16])), int(rng.choice([1, 2, 4]))
        q = rng.integers(1, 30, int(rng.integers(1, 6)))
        s = q + rng.integers(0, 40, q.size)
        width = -(-int(s.max()) // block_size)
        table = rng.integers(1, 1000, (q.size, width))
        *lists, req, block_idx = local_host(q, s, chunk, table, block_size)
        assert tuple(lists) == local_brute_force(q.tolist(), s.tolist(), chunk)
        want = table[req[:, None], block_idx]  # host gather
        device_table = on(device, table)
        with sync_free(device):  # indices uploaded first (pair 13), then one gather on the device
            got = device_table[upload(np.broadcast_to(req[:, None], block_idx.shape).tolist(), torch.int64, device),
                               upload(block_idx.tolist(), torch.int64, device)]
        assert np_of(got).tolist() == want.tolist()


# --------------------------------------------------------------------------------------------
# 19. Slice/overwrite into persistent buffers: as_strided copy -> per-dimension slice copy


def test_p19_persistent_buffer_copy(device):
    rng = np.random.default_rng(19)
    src = on(device, rng.integers(0, 100, (3, 4)))
    dst_a = torch.full((8, 6), -1, dtype=torch.int32, device=device)
    dst_b = dst_a.clone()
    view_a = dst_a.as_strided(src.shape, src.stride())
    view_a.copy_(src)
    with sync_free(device):
        view_b = dst_b[: src.shape[0], : src.shape[1]]
        view_b.copy_(src)
    assert torch.equal(view_a, src) and torch.equal(view_b, src)  # equal values
    assert view_a.data_ptr() == dst_a.data_ptr() and view_b.data_ptr() == dst_b.data_ptr()  # same address
    assert view_b.stride() == dst_b.stride() and view_a.stride() == src.stride()  # only B keeps the row stride
    assert torch.equal(dst_b[1, :4], src[1]) and not torch.equal(dst_a[1, :4], src[1])


# --------------------------------------------------------------------------------------------
# 20. Inverse block table (Flex): masked scatter_reduce(amax) vs the host dictionary


def inverse_host_dict(table, seq_lens, block_size, num_pages):
    out = [[-1] * num_pages for _ in table]
    for r, row in enumerate(table):
        for c in range(-(-seq_lens[r] // block_size)):
            out[r][row[c]] = max(out[r][row[c]], c)
        out[r][0] = -1
    return out


def inverse_device(table, seq_lens, block_size, num_pages):
    rows, width = table.shape
    columns = torch.arange(width, device=table.device)
    live = columns[None, :] < torch.div(seq_lens + block_size - 1, block_size, rounding_mode="floor")[:, None]
    index = torch.where(live, table, 0).long()  # garbage columns are redirected to page 0 ...
    logical = torch.where(live, columns[None, :], -1).to(torch.int32)
    out = torch.full((rows, num_pages), -1, dtype=torch.int32, device=table.device)
    out.scatter_reduce_(1, index, logical, reduce="amax", include_self=True)
    out[:, :1].fill_(-1)  # ... and column 0 is reset with a slice fill
    return out


def random_tables(rng, count=30):
    for _ in range(count):
        block_size, pages = int(rng.choice([1, 4, 16])), int(rng.integers(2, 40))
        seq = rng.integers(0, 60, int(rng.integers(1, 6)))
        width = -(-int(seq.max()) // block_size) + 2
        yield rng.integers(0, pages, (seq.size, width)), seq, block_size, pages  # repeats and garbage included


def test_p20_inverse_block_table(device):
    rng = np.random.default_rng(20)
    for table, seq, block_size, pages in random_tables(rng):
        want = inverse_host_dict(table.tolist(), seq.tolist(), block_size, pages)
        table_d, seq_d = on(device, table), on(device, seq)  # inputs prepared outside the guard
        with sync_free(device):
            got = inverse_device(table_d, seq_d, block_size, pages)
        assert np_of(got).tolist() == want


def test_p20_builder_inverse_block_table():
    flex = backend("attnsync.backends.flex")
    flex_torch = backend("attnsync.integrations.flex_torch")
    rng = np.random.default_rng(201)
    for table, seq, block_size, pages in random_tables(rng):
        want = inverse_host_dict(table.tolist(), seq.tolist(), block_size, pages)
        assert flex.inverse_block_table(table.astype(np.int32), seq.astype(np.int32), block_size, pages).tolist() == want
        got = flex_torch.physical_to_logical_device(torch.tensor(table, dtype=torch.int32),
                                                    torch.tensor(seq, dtype=torch.int32), block_size, pages)
        assert got.tolist() == want
    q = np.ones(3, np.int64)
    s = np.array([20, 33, 5])
    table = np.array([[3, 5, 0], [4, 4, 6], [7, 0, 0]])
    md = attnsync.build(attnsync.Batch(query_lens=q, seq_lens=s, block_table=table, block_size=16),
                        backend="flex", num_cache_pages=8)
    assert md.physical_to_logical.tolist() == inverse_host_dict(table.tolist(), s.tolist(), 16, 8)


# --------------------------------------------------------------------------------------------
# 21. Pinned staging reuse (negative test), simulated: a stream that runs copies late


class DelayedStream:
    """A queue of copies that read their source when they *execute*, as a DMA engine does."""

    def __init__(self):
        self.pending: list[tuple[np.ndarray, np.ndarray, dict]] = []

    def copy(self, src: np.ndarray, dst: np.ndarray) -> dict:
        event = {"done": False}
        self.pending.append((src, dst, event))
        return event

    def run(self, count: int | None = None) -> None:
        for src, dst, event in self.pending[: count if count is not None else len(self.pending)]:
            dst[:] = src
            event["done"] = True
        self.pending = self.pending[count if count is not None else len(self.pending) :]

    def wait(self, event: dict) -> None:
        while not event["done"]:
            self.run(1)


def stage_steps(mode: str, steps: int = 40, lag: int = 3) -> tuple[np.ndarray, np.ndarray, object]:
    """Stage `steps` values through `mode` staging while the stream lags `lag` copies behind."""
    from attnsync._staging import SlotRing

    stream = DelayedStream()
    want = np.arange(steps * 4, dtype=np.int32).reshape(steps, 4) * 7 + 1
    got = np.zeros_like(want)
    ring = SlotRing(num_slots=2, allocate=lambda n: (None, np.empty(n, np.uint8)),
                    is_done=lambda event: event["done"], wait=stream.wait)
    single = np.empty(16, np.uint8)
    for step in range(steps):
        if mode == "guarded ring":
            index, _, view = ring.acquire(16)
        else:
            view = single if mode == "one reused buffer" else np.empty(16, np.uint8)  # fresh: async_tensor_h2d
        view.view(np.int32)[:] = want[step]  # the host writes the staging buffer ...
        event = stream.copy(view.view(np.int32), got[step])  # ... and enqueues a copy that reads it later
        if mode == "guarded ring":
            ring.release(index, event)
        if len(stream.pending) > lag:
            stream.run(1)  # the device is busy: the copy of step N runs around step N + lag
    stream.run()
    return want, got, ring


def test_p21_pinned_staging_reuse_simulated():
    want, got, _ = stage_steps("one reused buffer")
    corrupted = (got != want).any(axis=1)
    assert corrupted.any(), "rewriting a buffer before its copy runs must corrupt the copy"
    for i in np.flatnonzero(corrupted):  # each corrupted copy carries a *later* step's values
        assert any(np.array_equal(got[i], want[j]) for j in range(i + 1, len(want))), i
    want, got, _ = stage_steps("fresh buffer per copy")
    np.testing.assert_array_equal(got, want)
    want, got, ring = stage_steps("guarded ring")
    np.testing.assert_array_equal(got, want)
    assert ring.stats.event_waits > 0, "the stream lagged, so the guard had to wait"


def test_p21_gpu_versions_are_in_the_core_gpu_suite():
    """The real-GPU negative test lives in tests/gpu/test_core_gpu.py (reused, not duplicated)."""
    text = (Path(__file__).parent / "gpu" / "test_core_gpu.py").read_text()
    for name in ("test_guarded_ring_under_a_delayed_stream", "test_unguarded_single_slot_corrupts_under_the_same_delay"):
        assert f"def {name}(" in text, name
