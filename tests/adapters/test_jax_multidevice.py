"""JAX adapter over several devices, on the CPU: four host-platform devices in a fresh
interpreter (`--xla_force_host_platform_device_count` is read at JAX's first import).

`lower(md, sharding=replicated)` is one `device_put` of one packed vector, replicated (one
transfer per device); `lower_replicated(md, devices)` gives one lowering per device from one
packed host vector. Values are checked on every device, for plain and bucketed lowerings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import attnsync
    from attnsync import BucketLadder
    from attnsync.adapters import jax as asj

    devices = jax.devices()
    assert len(devices) == 4 and all(d.platform == "cpu" for d in devices), devices
    mesh = Mesh(np.array(devices), ("tp",))
    replicated = NamedSharding(mesh, P())
    ladder = BucketLadder(max_num_reqs=8, max_num_tokens=16, max_model_len=64, block_size=16)

    puts = []
    real_put = jax.device_put
    def spy(x, *args, **kwargs):
        puts.append(x)
        return real_put(x, *args, **kwargs)
    jax.device_put = spy

    def check_everywhere(jmd, md, names, on):
        for name in names:
            leaf = getattr(jmd, name)
            want = np.asarray(getattr(md, name))
            assert {s.device for s in leaf.addressable_shards} == set(on), name
            for shard in leaf.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want, err_msg=name)

    traces = []

    @jax.jit
    def consume(m):
        traces.append(1)
        rows = jax.numpy.arange(m.num_reqs) < m.num_scheduled_reqs
        return m.slot_mapping.sum() + (m.seq_lens * rows).sum() * m.max_seq_len + m.num_decodes

    rng = np.random.default_rng(0)
    fields = ("query_start_loc", "seq_lens", "block_table", "slot_mapping")
    with jax.transfer_guard("disallow"):
        for step in range(12):
            n = 5 + step % 4
            batch = attnsync.Batch(query_lens=[1] * n, seq_lens=rng.integers(33, 65, n),
                                   block_table=rng.integers(0, 100, (n, 4)), block_size=16)
            bucket = ladder.bucket_for(batch)
            md = attnsync.build(ladder.pad(batch, bucket))
            puts.clear()
            jmd = asj.lower(md, sharding=replicated, bucket=bucket)
            assert len(puts) == 1 and isinstance(puts[0], np.ndarray), "one device_put of one vector"
            (leaf,) = jax.tree_util.tree_leaves(jmd)
            assert leaf is jmd.packed and leaf.sharding.is_fully_replicated and leaf.committed
            check_everywhere(jmd, md, fields + ("num_decodes", "num_scheduled_reqs"), devices)
            value = consume(jmd)
            want = int(md.slot_mapping.sum()) + int(md.seq_lens.sum()) * 64 + n
            assert int(value) == want, (int(value), want)
            plain = asj.lower(md, sharding=replicated)
            assert plain.max_seq_len == md.max_seq_len and plain.slot_mapping.sharding.is_fully_replicated
            check_everywhere(plain, md, fields, devices)
    assert len(traces) == 1, traces  # one bucket (8 decode rows), one compile, on four devices

    # lower_replicated: one lowering per device, each committed there, its own memory
    md = attnsync.build(attnsync.Batch(query_lens=[1, 3], seq_lens=[9, 3], block_table=[[2], [5]], block_size=16))
    puts.clear()
    with jax.transfer_guard("disallow"):
        outs = asj.lower_replicated(md, devices)
    assert len(puts) == 1 and len(puts[0]) == 4, "one device_put call carrying a vector per device"
    hosts = puts[0]
    assert all(not np.shares_memory(a, b) for i, a in enumerate(hosts) for b in hosts[i + 1:])
    assert len(outs) == 4 and len({o.layout for o in outs}) == 1
    for device, out in zip(devices, outs):
        assert out.packed.devices() == {device} and out.packed.committed
        check_everywhere(out, md, fields, [device])
        assert out.max_seq_len == 9
    # donating one device's lowering leaves the others' values alone
    donate = jax.jit(lambda m: m.packed * 0 - 1, donate_argnums=0)
    jax.block_until_ready(donate(outs[0]))
    assert outs[0].packed.is_deleted()
    for out in outs[1:]:
        check_everywhere(out, md, fields, list(out.packed.devices()))
    # the devices can be given in any order
    picked = asj.lower_replicated(md, [devices[3], devices[1]])
    assert [o.packed.devices() for o in picked] == [{devices[3]}, {devices[1]}]

    # refusals, with their messages
    def refused(fn, kind, text):
        try:
            fn()
        except kind as exc:
            assert text in str(exc), exc
        else:
            raise AssertionError(f"accepted: {text}")
    refused(lambda: asj.lower(md, sharding=NamedSharding(mesh, P("tp"))), attnsync.SpecError, "metadata is replicated")
    refused(lambda: asj.lower(md, devices[0], sharding=replicated), attnsync.SpecError, "not both")
    refused(lambda: asj.lower(md, sharding="tp"), TypeError, "expected a jax.sharding.Sharding")
    refused(lambda: asj.lower_replicated(md, [devices[0], devices[0]]), attnsync.SpecError, "distinct devices")
    print("multidevice ok")
    """
)


def test_jax_metadata_on_four_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "multidevice ok" in result.stdout
