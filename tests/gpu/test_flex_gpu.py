"""GPU tests of the flex backend: no syncs, no host stalls, CUDA-graph capture, compiled flex.

Every test is marked `gpu` (tests/conftest.py skips them without CUDA). Shapes stay inside one
bucket (padded tokens, padded rows, block-table width, cache pages and ``max_kv_blocks`` fixed)
so compiled flex compiles once for the module; the recompile count across two different
batches of the bucket is part of what is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import attnsync
from attnsync.testing import assert_no_host_stall, no_sync

torch = pytest.importorskip("torch")
from attnsync.integrations import flex_torch as ft  # noqa: E402

pytestmark = pytest.mark.gpu

PAGE, QB, PAGES, WIDTH, ROWS, TOKENS, MAX_KV = 16, 16, 64, 8, 8, 48, 32
Q_HEADS, KV_HEADS, DIM = 8, 2, 64
OPTIONS = dict(q_block_size=QB, max_kv_blocks=MAX_KV)


def _batch(query_lens, seq_lens, table, **extra) -> attnsync.Batch:
    padded = np.zeros((len(table), WIDTH), dtype=np.int64)
    for r, row in enumerate(table):
        padded[r, : len(row)] = row
    return attnsync.Batch(query_lens=query_lens, seq_lens=seq_lens, block_table=padded, block_size=PAGE,
                          num_cache_pages=PAGES, padded_num_reqs=ROWS, padded_num_tokens=TOKENS, **extra)


def batch_a() -> attnsync.Batch:
    """Decodes sharing a prefix (pages 2, 3), a prefill, an extend listing page 10 twice, a
    3-token speculative decode; a stale entry (page 3) beyond row 2's length."""
    return _batch([1, 1, 20, 10, 3], [40, 70, 20, 45, 33],
                  [[2, 3, 4], [2, 3, 5, 6, 7], [8, 9, 3], [10, 11, 10], [12, 13, 14]])


def batch_b(*, bound: bool = False) -> attnsync.Batch:
    """Another step of the same bucket; with `bound`, rows 0 and 4 carry host upper bounds
    (2 rejected drafts each) and the exact lengths live on the device (B_EXACT_LENS)."""
    seq = [18, 50, 15, 40, 30]
    exact = [True] * 5
    if bound:
        seq = [20, 50, 15, 40, 32]
        exact = [False, True, True, True, False]
    return _batch([3, 1, 15, 12, 3], seq, [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29], [30, 31]],
                  seq_lens_exact=exact)


B_EXACT_LENS = [18, 50, 15, 40, 30, 0, 0, 0]


def stall_free(fn, *, budget_ms: float, attempts: int = 3):
    """`assert_no_host_stall`, retried: a stall fails every attempt, host noise only one."""
    error: AssertionError | None = None
    for _ in range(attempts):
        try:
            return assert_no_host_stall(fn, budget_ms=budget_ms)
        except AssertionError as exc:
            error = exc
    raise error


@pytest.fixture(scope="module")
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


def _assert_fields(tmd, md, names=("doc_ids", "decode_offset", "num_blocks_per_seq", "physical_to_logical",
                                   "kv_num_blocks", "kv_indices", "query_start_loc", "block_table")):
    for name in names:
        got = getattr(tmd, name)
        assert got.dtype == torch.int32, name
        np.testing.assert_array_equal(got.cpu().numpy(), getattr(md, name), err_msg=name)


def brute_mask(batch: attnsync.Batch) -> np.ndarray:
    """Dense [T, PAGES * PAGE] visibility from the batch (latest logical block owns a page)."""
    out = np.zeros((batch.padded_num_tokens, PAGES * PAGE), dtype=bool)
    t = 0
    slots = np.arange(PAGES * PAGE)
    for r in range(batch.num_reqs):
        s, q = int(batch.seq_lens[r]), int(batch.query_lens[r])
        row = batch.block_table[r, : -(-s // PAGE)]
        owner = np.full(PAGES, -1)
        for c, page in enumerate(row):
            owner[page] = c
        owner[0] = -1
        lb = owner[slots // PAGE]
        key = lb * PAGE + slots % PAGE
        for i in range(q):
            out[t] = (lb >= 0) & (key < s) & (key <= s - q + i)
            t += 1
    return out


def dense_reference(q, k, v, mask, scale) -> np.ndarray:
    q, k, v = (x.double().cpu().numpy() for x in (q, k, v))
    k = k.reshape(PAGES * PAGE, KV_HEADS, DIM)
    v = v.reshape(PAGES * PAGE, KV_HEADS, DIM)
    group = Q_HEADS // KV_HEADS
    out = np.zeros(q.shape)
    for h in range(Q_HEADS):
        scores = np.where(mask, q[:, h] @ k[:, h // group].T * scale, -np.inf)
        top = scores.max(axis=1, keepdims=True)
        w = np.where(mask, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
        total = w.sum(axis=1, keepdims=True)
        out[:, h] = (w / np.where(total > 0, total, 1.0)) @ v[:, h // group]
    return out


def _qkv(cuda, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(TOKENS, Q_HEADS, DIM, generator=g).to(cuda, dtype)
    k = torch.randn(PAGES, PAGE, KV_HEADS, DIM, generator=g).to(cuda, dtype)
    v = torch.randn(PAGES, PAGE, KV_HEADS, DIM, generator=g).to(cuda, dtype)
    return q, k, v


# --------------------------------------------------------------------------------------------
# No syncs, no stalls


@pytest.mark.parametrize("inverse_table", ["host", "device"])
def test_build_lower_and_block_mask_without_sync_or_stall(cuda, inverse_table):
    batch = batch_a()

    def step():
        with no_sync():
            md = attnsync.build(batch, backend="flex", inverse_table=inverse_table, **OPTIONS)
            tmd = ft.lower(md, cuda)
            return tmd, ft.block_mask(tmd)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    tmd, mask = stall_free(step, budget_ms=3.0)
    torch.cuda.synchronize()
    _assert_fields(tmd, attnsync.build(batch, backend="flex", **OPTIONS))
    assert mask.kv_indices.shape == (1, 1, TOKENS // QB, MAX_KV)
    assert mask.BLOCK_SIZE == (QB, PAGE) and tuple(mask.seq_lengths) == (TOKENS, PAGES * PAGE)


def test_block_mask_with_q_blocks_without_sync(cuda):
    """compute_q_blocks=True (the transposed indices the backward pass reads) is sync-free too."""
    tmd = ft.lower(attnsync.build(batch_a(), backend="flex", **OPTIONS), cuda)
    ft.block_mask(tmd, compute_q_blocks=True)
    torch.cuda.synchronize()
    with no_sync():
        mask = ft.block_mask(tmd, compute_q_blocks=True)
    torch.cuda.synchronize()
    assert mask.q_num_blocks is not None


def test_inexact_lowering_without_sync_or_stall(cuda):
    md = attnsync.build(batch_b(bound=True), backend="flex", **OPTIONS)
    lens = torch.tensor(B_EXACT_LENS, dtype=torch.int32, device=cuda)
    torch.cuda.synchronize()

    def step():
        with no_sync():
            tmd = ft.lower(md, cuda, seq_lens=lens)
            return tmd, ft.block_mask(tmd)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    tmd, _ = stall_free(step, budget_ms=3.0)
    torch.cuda.synchronize()
    exact = attnsync.build(batch_b(), backend="flex", **OPTIONS)
    _assert_fields(tmd, exact, names=("decode_offset", "num_blocks_per_seq", "physical_to_logical", "seq_lens"))
    np.testing.assert_array_equal(tmd.slot_mapping.cpu().numpy(), exact.slot_mapping)


def test_device_forms_without_sync_equal_the_host(cuda):
    md = attnsync.build(batch_a(), backend="flex", **OPTIONS)
    tmd = ft.lower(md, cuda)
    x = torch.tensor([[3, 1, 0, 1, 2], [2, 2, 2, 0, 0]], device=cuda)
    sizes = dict(block_size=PAGE, q_block_size=QB, max_pages=WIDTH, num_pages=PAGES, width=MAX_KV)

    def forms():
        return (
            ft.doc_ids_device(tmd.query_start_loc, md.num_scheduled_tokens, padded_tokens=TOKENS),
            ft.doc_ids_static_device(tmd.query_start_loc, TOKENS),
            ft.left_pack_device(x, 3),
            ft.physical_to_logical_device(tmd.block_table, tmd.seq_lens, PAGE, PAGES),
            ft.kv_blocks_device(tmd.doc_ids, tmd.query_start_loc, tmd.decode_offset, tmd.block_table, **sizes),
        )

    forms()
    torch.cuda.synchronize()
    with no_sync():
        doc, doc_static, (packed, counts), inverse, (kv_counts, kv_indices) = forms()
    torch.cuda.synchronize()
    assert doc.tolist() == md.doc_ids.tolist() == doc_static.tolist()
    assert packed.tolist() == [[3, 1, 2, -1, -1], [2, -1, -1, -1, -1]] and counts.tolist() == [3, 1]
    np.testing.assert_array_equal(inverse.cpu().numpy(), md.physical_to_logical)
    np.testing.assert_array_equal(kv_counts.cpu().numpy(), md.kv_num_blocks)
    np.testing.assert_array_equal(kv_indices.cpu().numpy(), md.kv_indices)
    # the guard does catch the naive forms
    with pytest.raises(RuntimeError, match="(?i)synchroniz"), no_sync():
        ft._naive_doc_ids(tmd.query_start_loc)
    with pytest.raises(RuntimeError, match="(?i)synchroniz"), no_sync():
        ft._naive_left_pack(x)
    torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# CUDA-graph capture of the block-mask construction


def _persistent_inputs(cuda):
    return dict(
        query_start_loc=torch.zeros(ROWS + 1, dtype=torch.int32, device=cuda),
        seq_lens=torch.zeros(ROWS, dtype=torch.int32, device=cuda),
        decode_offset=torch.zeros(ROWS, dtype=torch.int32, device=cuda),
        block_table=torch.zeros(ROWS, WIDTH, dtype=torch.int32, device=cuda),
    )


def _load(buffers, md, cuda):
    tmd = ft.lower(md, cuda)
    for name, buffer in buffers.items():
        buffer.copy_(getattr(tmd, name))


def _construct(buffers, inverse_out, *, compute_q_blocks=False):
    """The whole block-mask construction from persistent device inputs; sizes from the bucket."""
    doc = ft.doc_ids_static_device(buffers["query_start_loc"], TOKENS)
    inverse = ft.physical_to_logical_device(buffers["block_table"], buffers["seq_lens"], PAGE, PAGES,
                                            out=inverse_out)
    counts, indices = ft.kv_blocks_device(doc, buffers["query_start_loc"], buffers["decode_offset"],
                                          buffers["block_table"], block_size=PAGE, q_block_size=QB,
                                          max_pages=WIDTH, num_pages=PAGES, width=MAX_KV)
    meta = types.SimpleNamespace(
        **buffers, doc_ids=doc, physical_to_logical=inverse, kv_num_blocks=counts, kv_indices=indices,
        q_block_size=QB, block_size=PAGE, num_actual_tokens=TOKENS, total_cache_tokens=PAGES * PAGE,
        num_cache_pages=PAGES, all_exact=True,
    )
    return meta, ft.block_mask(meta, compute_q_blocks=compute_q_blocks)


@pytest.mark.parametrize("compute_q_blocks", [False, True])
def test_block_mask_construction_captures_in_a_cuda_graph(cuda, compute_q_blocks):
    """Capture fails on any hidden sync, so a successful capture (and correct replays for two
    different batches of the bucket) shows the construction is sync-free and graph-safe."""
    buffers = _persistent_inputs(cuda)
    inverse_out = torch.empty(ROWS, PAGES, dtype=torch.int32, device=cuda)
    md_a = attnsync.build(batch_a(), backend="flex", **OPTIONS)
    md_b = attnsync.build(batch_b(), backend="flex", **OPTIONS)
    _load(buffers, md_a, cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch requires
        _construct(buffers, inverse_out, compute_q_blocks=compute_q_blocks)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta, mask = _construct(buffers, inverse_out, compute_q_blocks=compute_q_blocks)
    for md in (md_a, md_b):
        _load(buffers, md, cuda)
        graph.replay()
        torch.cuda.synchronize()
        _assert_fields(meta, md, names=("doc_ids", "physical_to_logical", "kv_num_blocks", "kv_indices"))
        # The mask reads the replayed metadata: its indices hold this batch's page lists.
        width = meta.kv_indices.shape[-1]
        assert torch.equal(mask.kv_indices[0, 0, :, :width], meta.kv_indices)
    if not compute_q_blocks:
        # Without the q-side transpose the mask views the persistent buffer itself; with it,
        # from_kv_blocks pads the indices to one column per cache page (a captured copy).
        assert mask.kv_indices.data_ptr() == meta.kv_indices.data_ptr()


def test_graph_capture_detects_a_hidden_sync():
    """Negative control, in a subprocess (a failed capture must not disturb this process): the
    nonzero form of the left-pack cannot be captured, the garbage-column form can."""
    script = textwrap.dedent(
        """
        import torch
        from attnsync.integrations import flex_torch as ft
        x = torch.tensor([[3, 1, 0, 1, 2], [2, 2, 2, 0, 0]], device="cuda")
        results = {}
        for name, fn in (("sync_free", lambda: ft.left_pack_device(x, 3)), ("naive", lambda: ft._naive_left_pack(x))):
            fn(); torch.cuda.synchronize()
            try:
                with torch.cuda.graph(torch.cuda.CUDAGraph()):
                    fn()
                results[name] = "captured"
            except Exception as exc:
                results[name] = "failed: " + type(exc).__name__
            torch.cuda.synchronize()
        print(results)
        """
    )
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    results = eval(done.stdout.strip().splitlines()[-1])  # a dict literal printed above
    assert results["sync_free"] == "captured", results
    assert results["naive"].startswith("failed"), results


# --------------------------------------------------------------------------------------------
# Compiled flex attention against the float64 reference


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_flex_against_float64_reference(cuda):
    """bf16, BLOCK_M = q_block 16, BLOCK_N = page 16, GQA 8/2. Batch A, then batch B of the same
    bucket three ways (exact; host bounds + exact device lengths; inverse table on the device):
    all must match the dense float64 reference, and B must not recompile."""
    scale = DIM**-0.5
    cases = []
    md_a = attnsync.build(batch_a(), backend="flex", **OPTIONS)
    cases.append(("A", batch_a(), ft.lower(md_a, cuda)))
    md_b = attnsync.build(batch_b(), backend="flex", **OPTIONS)
    cases.append(("B exact", batch_b(), ft.lower(md_b, cuda)))
    md_bound = attnsync.build(batch_b(bound=True), backend="flex", **OPTIONS)
    lens = torch.tensor(B_EXACT_LENS, dtype=torch.int32, device=cuda)
    cases.append(("B bound + device lengths", batch_b(), ft.lower(md_bound, cuda, seq_lens=lens)))
    md_dev = attnsync.build(batch_b(), backend="flex", inverse_table="device", **OPTIONS)
    cases.append(("B inverse on device", batch_b(), ft.lower(md_dev, cuda)))
    graphs_after_first = None
    for i, (name, batch, tmd) in enumerate(cases):
        q, k, v = _qkv(cuda, seed=i)
        out = ft.flex_paged_attention(q, k, v, tmd, scale=scale, compile=True)
        torch.cuda.synchronize()
        if graphs_after_first is None:
            graphs_after_first = _unique_graphs()
        expected = dense_reference(q, k, v, brute_mask(batch), scale)
        got = out.double().cpu().numpy()
        real = batch.num_tokens
        np.testing.assert_allclose(got[:real], expected[:real], rtol=0, atol=3e-2, err_msg=name)
        assert np.isfinite(got).all(), name
        assert (got[real:] == 0).all(), f"{name}: padding tokens should see nothing"
    assert _unique_graphs() == graphs_after_first, "a new batch of the same bucket recompiled flex"


def test_jax_reference_on_gpu(cuda):
    jax = pytest.importorskip("jax")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    from attnsync.adapters import jax as asj
    from attnsync.kernels import flex_jax as fj

    batch = batch_a()
    md = attnsync.build(batch, backend="flex", **OPTIONS)
    q, k, v = _qkv(cuda, seed=7, dtype=torch.float32)
    jmd = asj.lower(md, gpu)
    args = [jax.device_put(x.cpu().numpy(), gpu) for x in (q, k, v)]
    fj.flex_attention_jax(*args, jmd, scale=0.125).block_until_ready()  # compile
    with jax.transfer_guard("disallow"):
        out = fj.flex_attention_jax(*args, jmd, scale=0.125)
    expected = dense_reference(q, k, v, brute_mask(batch), 0.125)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-4)


def test_captured_block_lists_replay_each_step_without_sync(cuda):
    """`CapturedBlockLists`: metadata with device-built lists, one capture, replayed for two
    batches of the bucket; the lists and inverse table equal the host build's bit for bit."""
    device_options = dict(q_block_size=QB, max_kv_blocks=MAX_KV, block_sparse="device", inverse_table="device")
    steps = [batch_a(), batch_b(), batch_a()]
    captured = ft.CapturedBlockLists(attnsync.build(steps[0], backend="flex", **device_options), cuda)
    addresses = None
    for batch in steps:
        md = attnsync.build(batch, backend="flex", **device_options)
        copies = captured.stager.stats.copies
        with no_sync():
            tmd = captured.step(md)
            mask = ft.block_mask(tmd)
        torch.cuda.synchronize()
        assert captured.stager.stats.copies == copies + 1, "one pinned copy a step"
        # staged fields at the persistent stager's fixed addresses, graph-made ones at the
        # graph's outputs: every device tensor the same every step
        now = {name: value.data_ptr() for name, value in vars(tmd).items()
               if isinstance(value, torch.Tensor) and value.device.type == "cuda"}
        addresses = addresses or now
        assert now == addresses
        host = attnsync.build(batch, backend="flex", **OPTIONS)  # host lists, host inverse table
        np.testing.assert_array_equal(tmd.kv_num_blocks.cpu().numpy(), host.kv_num_blocks)
        np.testing.assert_array_equal(tmd.kv_indices.cpu().numpy(), host.kv_indices)
        np.testing.assert_array_equal(tmd.physical_to_logical.cpu().numpy(), host.physical_to_logical)
        for name in ("doc_ids", "decode_offset", "num_blocks_per_seq", "slot_mapping"):  # derived in the graph
            np.testing.assert_array_equal(getattr(tmd, name).cpu().numpy(), getattr(md, name), err_msg=name)
        assert mask.kv_indices.data_ptr() == tmd.kv_indices.data_ptr()
    assert tmd.slot_mapping.dtype == torch.int64
    other = attnsync.build(batch_a(), backend="flex", q_block_size=QB, max_kv_blocks=2 * MAX_KV,
                           block_sparse="device", inverse_table="device")
    copies = captured.stager.stats.copies
    with pytest.raises(attnsync.SpecError, match="captured for"):
        captured.step(other)
    assert captured.stager.stats.copies == copies, "nothing staged"
    stall_free(lambda: captured.step(md), budget_ms=2.0)


def test_captured_step_batch_equals_step_of_the_built_metadata(cuda):
    """`CapturedBlockLists.step_batch(batch)` skips the host slots and page counts the graph
    derives: every field of what it returns equals `step(attnsync.build(batch, ...))`'s, step
    after step of different batches, without a sync; other sizes and inexact rows are refused
    before anything is staged."""
    device_options = dict(q_block_size=QB, max_kv_blocks=MAX_KV, block_sparse="device", inverse_table="device")
    captured = ft.CapturedBlockLists(attnsync.build(batch_a(), backend="flex", **device_options), cuda)
    for batch, other in [(batch_b(), batch_a()), (batch_a(), batch_b()), (batch_b(), batch_a())]:
        with no_sync():
            tmd = captured.step(attnsync.build(batch, backend="flex", **device_options))
        torch.cuda.synchronize()
        want = {name: value.clone() if isinstance(value, torch.Tensor) else value
                for name, value in vars(tmd).items()}
        captured.step(attnsync.build(other, backend="flex", **device_options))  # the buffers hold other values
        with no_sync():
            got = captured.step_batch(batch)
        torch.cuda.synchronize()
        assert set(vars(got)) == set(want)
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(got, name), value), name
            else:
                assert getattr(got, name) == value, name
        host = attnsync.build(batch, backend="flex", **OPTIONS)
        np.testing.assert_array_equal(got.slot_mapping.cpu().numpy(), host.slot_mapping)
        np.testing.assert_array_equal(got.num_blocks_per_seq.cpu().numpy(), host.num_blocks_per_seq)
    copies = captured.stager.stats.copies
    with pytest.raises(attnsync.SpecError, match="inexact"):
        captured.step_batch(batch_b(bound=True))
    with pytest.raises(attnsync.SpecError, match="captured for"):  # one row, one token: not the bucket
        captured.step_batch(attnsync.Batch(query_lens=[1], seq_lens=[5], block_table=[[2]], block_size=PAGE,
                                           num_cache_pages=PAGES))
    with pytest.raises(TypeError):
        captured.step_batch(attnsync.build(batch_a(), backend="flex", **device_options))
    assert captured.stager.stats.copies == copies, "nothing staged"
    stall_free(lambda: captured.step_batch(batch_a()), budget_ms=2.0)


def test_captured_block_mask_follows_each_step_without_sync(cuda):
    """`CapturedBlockLists.block_mask`: one BlockMask, built at capture, over the graph's outputs
    and the persistent lowering. After each step of a different batch of the bucket it holds that
    batch's lists, and compiled flex with it gives the output of a BlockMask built fresh for the
    step (and the float64 reference), without recompiling."""
    device_options = dict(q_block_size=QB, max_kv_blocks=MAX_KV, block_sparse="device", inverse_table="device")
    captured = ft.CapturedBlockLists(attnsync.build(batch_a(), backend="flex", **device_options), cuda)
    mask = captured.block_mask
    torch.cuda.synchronize()
    host_a = attnsync.build(batch_a(), backend="flex", **OPTIONS)
    np.testing.assert_array_equal(mask.kv_indices[0, 0].cpu().numpy(), host_a.kv_indices)  # valid at once
    scale = DIM**-0.5
    graphs = None
    for i, batch in enumerate([batch_b(), batch_a(), batch_b()]):
        md = attnsync.build(batch, backend="flex", **device_options)
        with no_sync():
            tmd = captured.step(md)
        assert captured.block_mask is mask, "one mask object for every step"
        assert mask.kv_indices.data_ptr() == tmd.kv_indices.data_ptr()
        assert mask.kv_num_blocks.data_ptr() == tmd.kv_num_blocks.data_ptr()
        q, k, v = _qkv(cuda, seed=10 + i)
        cached = ft.flex_paged_attention(q, k, v, tmd, scale=scale, compile=True, block_mask=mask)
        torch.cuda.synchronize()
        if graphs is None:
            graphs = _unique_graphs()
        host = attnsync.build(batch, backend="flex", **OPTIONS)  # host lists, host inverse table
        np.testing.assert_array_equal(mask.kv_num_blocks[0, 0].cpu().numpy(), host.kv_num_blocks)
        np.testing.assert_array_equal(mask.kv_indices[0, 0].cpu().numpy(), host.kv_indices)
        fresh_tmd = ft.lower(host, cuda)
        fresh = ft.flex_paged_attention(q, k, v, fresh_tmd, scale=scale, compile=True,
                                        block_mask=ft.block_mask(fresh_tmd))
        torch.cuda.synchronize()
        torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-2)
        expected = dense_reference(q, k, v, brute_mask(batch), scale)
        got = cached.double().cpu().numpy()
        real = batch.num_tokens
        np.testing.assert_allclose(got[:real], expected[:real], rtol=0, atol=3e-2, err_msg=f"step {i}")
        assert (got[real:] == 0).all(), "padding tokens should see nothing"
    # the cached mask's closure is one function over fixed tensors: no new graph per step
    q, k, v = _qkv(cuda, seed=20)
    before = _unique_graphs()
    for batch in (batch_a(), batch_b()):
        tmd = captured.step(attnsync.build(batch, backend="flex", **device_options))
        ft.flex_paged_attention(q, k, v, tmd, scale=scale, compile=True, block_mask=captured.block_mask)
    torch.cuda.synchronize()
    assert _unique_graphs() == before >= graphs
    stall_free(lambda: captured.step(md), budget_ms=2.0)
