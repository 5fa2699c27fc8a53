"""Host time of the JAX lowering against its floor, one `jax.device_put` of the same bytes.

    python bench/bench_jax.py [--quick] [--out DIR | --json PATH] [--device auto|cpu|gpu]

For 1, 32, 256 and 1,024 decode requests (contexts 100 to 8,192 tokens, a block table 512
pages wide, 16-token pages), common and flashinfer backends, with the metadata built once, it
measures the host microseconds of

- `lower`:         `attnsync.adapters.jax.lower(md, device)` (pack, one device_put, the pytree);
- `device_put`:    one `jax.device_put` of an int32 numpy vector of the same bytes (the floor);
- `pack`:          `asj.pack(md)`, the host half alone (no transfer);
- `lower+step`:    `lower`, then a jitted consumer of the lowering (reads every field);
- `zero-dispatch`: `asj.pack(md)`, then the same consumer taking the numpy vector and a static
                   layout (`asj.unpack` inside): the transfer rides in the step's dispatch.

Blocks of each variant alternate in one process (order reversed every other round), the device
drained before each call, so the numbers compare with each other even where the host's speed
drifts. Prints median us and the ratio lower / device_put (target on a GPU: <= 1.3x; on a CPU
the transfer is a host memcpy or an alias, so the ratio there says little).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync

import jax
import jax.numpy as jnp

from attnsync.adapters import jax as asj

SIZES = (1, 32, 256, 1024)
BACKENDS = ("common", "flashinfer")
BLOCK_SIZE = 16
WIDTH = 512
VARIANTS = ("lower", "device_put", "pack", "lower+step", "zero-dispatch")


def decode_batch(num_reqs: int, rng: np.random.Generator) -> attnsync.Batch:
    """`num_reqs` single-token decodes with contexts of 100..8192 tokens, a 512-wide table."""
    seq_lens = rng.integers(100, WIDTH * BLOCK_SIZE + 1, size=num_reqs).astype(np.int32)
    pages_needed = -(-seq_lens // BLOCK_SIZE)
    pages = rng.integers(1, 1 << 20, size=(num_reqs, WIDTH), dtype=np.int32)
    table = np.where(np.arange(WIDTH) < pages_needed[:, None], pages, 0).astype(np.int32)
    return attnsync.Batch(query_lens=np.ones(num_reqs, np.int32), seq_lens=seq_lens, block_table=table,
                          block_size=BLOCK_SIZE)


def consumer(names: tuple[str, ...]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A jitted step reading every data field, in two forms: of a lowering, of (vector, layout)."""

    def total(m: Any) -> jax.Array:
        return sum(getattr(m, name).astype(jnp.int32).sum() for name in names)

    of_lowering = jax.jit(total)
    of_vector = jax.jit(lambda vector, layout: total(asj.unpack(vector, layout)), static_argnums=1)
    return of_lowering, of_vector


def block(fn: Callable[[], Any], *, calls: int, warmup: int = 3) -> list[float]:
    """Host us of `calls` timed calls of `fn` (after `warmup`), the device drained before each."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        out = fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
        jax.block_until_ready(out)
    return samples


def side_by_side(fns: dict[str, Callable[[], Any]], *, rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """Median and p90 host us of each of `fns`, blocks alternating, order reversed every other round."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside one timed call would dominate microsecond timings
    try:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                samples[name].extend(block(fns[name], calls=calls))
    finally:
        if gc_enabled:
            gc.enable()
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))],
                     "n": len(values)}
    return out


def run(device: Any, *, quick: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    rows = []
    rounds, calls = (4, 25) if quick else (10, 60)
    for backend in BACKENDS:
        for n in SIZES:
            md = attnsync.build(decode_batch(n, rng), backend=backend)
            vector, layout = asj.pack(md)
            jmd = asj.lower(md, device)
            names = type(jmd)._data_names
            step_lowered, step_vector = consumer(names)
            expect = int(step_lowered(jmd))
            with jax.transfer_guard_host_to_device("allow"):
                assert int(step_vector(vector, layout)) == expect, "zero-dispatch gives other values"
            assert np.asarray(jmd.packed).tobytes() == vector.tobytes()
            same_bytes = vector.copy()

            def zero_dispatch(md: Any = md, step: Any = step_vector) -> Any:
                v, lay = asj.pack(md)
                return step(v, lay)

            fns = {
                "lower": lambda md=md: asj.lower(md, device),
                "device_put": lambda v=same_bytes: jax.device_put(v, device),
                "pack": lambda md=md: asj.pack(md)[0],
                "lower+step": lambda md=md, step=step_lowered: step(asj.lower(md, device)),
                "zero-dispatch": zero_dispatch,
            }
            with jax.transfer_guard_host_to_device("allow"):  # the zero-dispatch step's argument
                timing = side_by_side(fns, rounds=rounds, calls=calls)
            median = {name: timing[name]["median"] for name in VARIANTS}
            rows.append({
                "backend": backend, "decodes": n, "bytes": int(vector.nbytes), "fields": len(names),
                "median_us": median, "p90_us": {name: timing[name]["p90"] for name in VARIANTS},
                "samples": timing["lower"]["n"],
                "lower_over_device_put": median["lower"] / median["device_put"],
                "zero_dispatch_over_lower_step": median["zero-dispatch"] / median["lower+step"],
            })
            print(_row(rows[-1]), flush=True)
    return {
        "device": str(device), "platform": device.platform,
        "device_kind": getattr(device, "device_kind", None),
        "host": platform.node(), "processor": platform.processor() or platform.machine(),
        "versions": {"jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "quick": quick, "rows": rows,
    }


HEADER = ("| backend | decodes | bytes | lower | device_put | lower / device_put | pack | lower+step "
          "| zero-dispatch | zero-dispatch / lower+step |\n|---|---|---|---|---|---|---|---|---|---|")


def _row(row: dict[str, Any]) -> str:
    m = row["median_us"]
    return (f"| {row['backend']} | {row['decodes']} | {row['bytes']} | {m['lower']:.1f} | {m['device_put']:.1f} "
            f"| {row['lower_over_device_put']:.2f}x | {m['pack']:.1f} | {m['lower+step']:.1f} "
            f"| {m['zero-dispatch']:.1f} | {row['zero_dispatch_over_lower_step']:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Host time of attnsync.adapters.jax.lower against one jax.device_put of the same bytes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="JAX platform to lower to (auto: the GPU if JAX has one, else the CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--out", type=Path, default=None, help="also write the results to DIR/bench_jax.json")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.json = args.json or args.out / "bench_jax.json"
    if args.device == "auto":
        try:
            device = jax.devices("gpu")[0]
        except RuntimeError:
            device = jax.devices("cpu")[0]
    else:
        device = jax.devices(args.device)[0]
    print(f"device {device} ({getattr(device, 'device_kind', '?')}), jax {jax.__version__}; median host us")
    print(HEADER, flush=True)
    result = run(device, quick=args.quick)
    if device.platform == "cpu":
        print("CPU only: device_put is a host copy or an alias here, so only GPU ratios count (target <= 1.3x).")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
