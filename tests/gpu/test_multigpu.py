"""Several GPUs of one host: one build lowered to every device (torch: one copy per device; JAX:
replicated over a mesh), the same values everywhere, no syncs, no host stalls; persistent
lowerings and captured steps on a device other than the current one.

Marked `gpu` and `multigpu`; skipped with fewer than two CUDA devices (the JAX test also needs
two JAX GPU devices).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import attnsync
from attnsync import BucketLadder
from attnsync.kernels.reference import paged_attention_reference, relative_error
from attnsync.testing import no_sync

torch = pytest.importorskip("torch")
from attnsync.adapters import torch as ast  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

DEVICE_FIELDS = ("query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping")


@pytest.fixture(scope="module")
def devices():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    return [torch.device("cuda", 0), torch.device("cuda", 1)]


def batch(seed: int = 0, n: int = 6, width: int = 16) -> attnsync.Batch:
    rng = np.random.default_rng(seed)
    q = np.array([1] * (n - 2) + [7, 3])
    return attnsync.Batch(query_lens=q, seq_lens=q + rng.integers(0, 200, n),
                          block_table=rng.integers(0, 1 << 16, (n, width)), block_size=16,
                          padded_num_reqs=n + 2, padded_num_tokens=int(q.sum()) + 3)


def busy_all(devices, milliseconds: float) -> None:
    """Queue a ~`milliseconds` sleep kernel on the current stream of every device."""
    torch.cuda.synchronize(devices[0])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    end.synchronize()
    cycles = int(2_000_000 / max(start.elapsed_time(end), 1e-3) * milliseconds)
    for device in devices:
        with torch.cuda.device(device):
            torch.cuda._sleep(cycles)


def host_ms_while_busy(fn, devices, *, sleep_ms: float = 50.0, attempts: int = 3) -> float:
    """Smallest host time of `fn()` over `attempts`, each with every device busy for `sleep_ms`."""
    samples = []
    for _ in range(attempts):
        for device in devices:
            torch.cuda.synchronize(device)
        busy_all(devices, sleep_ms)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
        for device in devices:
            torch.cuda.synchronize(device)
    return min(samples)


def h2d_copies_per_device(fn, devices) -> dict[int, int]:
    """Host-to-device memcpy activities per device index while `fn()` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for device in devices:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        for device in devices:
            torch.cuda.synchronize(device)
    counts: dict[int, int] = {}
    for event in prof.events():
        if "Memcpy HtoD" in event.name:
            index = getattr(event, "device_index", -1)
            counts[index] = counts.get(index, 0) + 1
    return counts


def test_one_build_lowered_to_two_devices_one_copy_each_without_sync(devices):
    md = attnsync.build(batch())
    ast.lower_replicated(md, devices)  # warm: pinned slots, allocator pools
    for device in devices:
        torch.cuda.synchronize(device)
    counts = h2d_copies_per_device(lambda: ast.lower_replicated(md, devices), devices)
    assert sum(counts.values()) == 2, counts
    if -1 not in counts:  # the profiler attributed the copies to devices: one each
        assert counts == {0: 1, 1: 1}, counts
    with no_sync():
        outs = ast.lower_replicated(md, devices)
    host_ms = host_ms_while_busy(lambda: ast.lower_replicated(md, devices), devices)
    assert host_ms < 3.0, f"host stalled: {host_ms:.2f} ms while both GPUs were busy"
    for device, out in zip(devices, outs, strict=True):
        torch.cuda.synchronize(device)
        for name in DEVICE_FIELDS:
            tensor = getattr(out, name)
            assert tensor.device == device, name
        np.testing.assert_array_equal(out.query_start_loc.cpu().numpy(), md.query_start_loc)
        np.testing.assert_array_equal(out.seq_lens.cpu().numpy(), md.seq_lens)
        np.testing.assert_array_equal(out.block_table_tensor.cpu().numpy(), md.block_table)
        np.testing.assert_array_equal(out.slot_mapping.cpu().numpy(), md.slot_mapping)
    for name in DEVICE_FIELDS:
        assert torch.equal(getattr(outs[0], name).cpu(), getattr(outs[1], name).cpu()), name


def test_persistent_lowering_and_triton_graph_on_the_second_device(devices):
    from attnsync.integrations.graphs import PersistentLowering, TritonGraph

    second = devices[1]
    assert torch.cuda.current_device() == 0  # the second device is not the current one
    lad = BucketLadder(max_num_reqs=16, max_num_tokens=16, max_model_len=512, block_size=16, width_sizes=(32,))
    rng = np.random.default_rng(1)
    steps = [
        attnsync.Batch(query_lens=[1] * n, seq_lens=1 + rng.integers(0, 500, n),
                       block_table=rng.permutation(512)[: n * 32].reshape(n, 32), block_size=16)
        for n in (6, 8, 5)
    ]
    bucket = lad.bucket_for(steps[0])
    lowering = PersistentLowering(bucket, second)
    out = lowering.lower(attnsync.build(lad.pad(steps[0], bucket)))
    assert out.query_start_loc.device == second
    gen = torch.Generator(device=second).manual_seed(3)
    shape = (512, 16, 2, 64)
    caches = [tuple(torch.randn(shape, generator=gen, device=second).to(torch.bfloat16) for _ in range(2))]
    graph = TritonGraph(lad, bucket, kv_caches=caches, num_q_heads=8, scale=1 / math.sqrt(64))
    assert graph.device == second and graph.graph is not None
    for step, b in enumerate(steps):
        q = torch.randn(b.num_tokens, 8, 64, generator=gen, device=second).to(torch.bfloat16)
        replayed = graph.step(b, q).clone()
        torch.cuda.synchronize(second)
        md = attnsync.build(b)
        k, v = caches[0]
        ref = paged_attention_reference(
            q.float().cpu().numpy(), k.float().cpu().numpy(), v.float().cpu().numpy(),
            query_start_loc=md.query_start_loc, seq_lens=md.seq_lens, block_table=md.block_table,
            scale=1 / math.sqrt(64),
        )
        assert relative_error(replayed[0, : b.num_tokens].float().cpu().numpy(), ref) < 1e-2, step


def test_jax_metadata_replicated_over_two_gpus(devices):
    jax = pytest.importorskip("jax")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if len(gpus) < 2:
        pytest.skip("JAX sees fewer than two GPUs")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from attnsync.adapters import jax as asj

    mesh = Mesh(np.array(gpus[:2]), ("tp",))
    replicated = NamedSharding(mesh, PartitionSpec())
    lad = BucketLadder(max_num_reqs=16, max_num_tokens=32, max_model_len=512, block_size=16, width_sizes=(16,))
    traces = []

    @jax.jit
    def consume(m):
        traces.append(1)
        return m.slot_mapping.sum() + m.seq_lens.sum() * m.max_seq_len + m.num_decodes

    def lower(b):
        bucket = lad.bucket_for(b)
        md = attnsync.build(lad.pad(b, bucket))
        return md, bucket, asj.lower(md, sharding=replicated, bucket=bucket)

    steps = [batch(seed, n=8) for seed in range(12)]
    with jax.transfer_guard("disallow"):
        jax.block_until_ready(consume(lower(steps[0])[2]))
        results = [(*lower(b), None) for b in steps]
        results = [(md, bucket, jmd, consume(jmd)) for md, bucket, jmd, _ in results]
    jax.block_until_ready([r[3] for r in results])
    assert len(traces) == 1, "one trace for every step of the bucket"
    for md, bucket, jmd, value in results:
        for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping", "num_decodes"):
            leaf = getattr(jmd, name)
            assert leaf.sharding.is_fully_replicated and leaf.committed, name
            shards = leaf.addressable_shards
            assert {s.device for s in shards} == set(gpus[:2]), name
            for shard in shards:
                np.testing.assert_array_equal(np.asarray(jax.device_get(shard.data)), getattr(md, name),
                                              err_msg=name)
        want = int(md.slot_mapping.sum()) + int(md.seq_lens.sum()) * bucket.max_seq_len + md.num_decodes
        assert int(jax.device_get(value)) == want
    # No host stall: torch staging per device plus DLPack imports, with both GPUs busy.
    with jax.transfer_guard("disallow"):
        host_ms = host_ms_while_busy(lambda: lower(steps[1]), devices, sleep_ms=100.0)
    assert host_ms < 20.0, f"host stalled: {host_ms:.2f} ms while both GPUs were busy for 100 ms"


def _device_values(out) -> torch.Tensor:
    return torch.cat([getattr(out, name).reshape(-1).long() for name in DEVICE_FIELDS])


def _host_values(md) -> np.ndarray:
    return np.concatenate([md.query_start_loc, md.seq_lens, md.block_table.ravel(), md.slot_mapping]).astype(np.int64)


@pytest.mark.parametrize("check", [False, True], ids=["ring", "checked-ring"])
def test_lowering_to_another_device_is_ordered_on_that_devices_stream(devices, check):
    """Lowered to cuda:1 while cuda:0 is current and busy: the staged copy must be queued on
    cuda:1's stream. On cuda:0's default stream it would wait behind cuda:0's work while
    cuda:1's reader ran first (stale values), and the event guarding the pinned buffer would
    not cover it (a later step could overwrite the buffer before the copy read it). A checking
    stager sees one stream throughout (cuda:1's), whichever device is current."""
    first, other = devices
    steps = 64
    mds = [attnsync.build(batch(seed=step)) for step in range(steps)]
    expected = torch.from_numpy(np.stack([_host_values(md) for md in mds])).to(other)
    with torch.cuda.device(other):
        torch.cuda.synchronize()
    stager = ast.Stager(other, check=check)
    assert stager.device == other
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    end.synchronize()
    cycles = int(2_000_000 / max(start.elapsed_time(end), 1e-3))  # ~1 ms on cuda:0
    mismatches = torch.zeros((), dtype=torch.int64, device=other)
    with torch.cuda.device(first):
        for step, md in enumerate(mds):
            torch.cuda._sleep(cycles)  # the current device's default stream is busy
            out = ast.lower(md, other, stager=stager)
            with torch.cuda.device(other):  # cuda:1's reader, queued right after the lowering
                mismatches += (_device_values(out) != expected[step]).sum()
            del out
    for device in devices:
        torch.cuda.synchronize(device)
    assert int(mismatches.item()) == 0
    assert stager.stats.copies == steps
