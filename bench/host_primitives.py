"""Host cost of the torch and numpy calls a lowering is made of, one by one.

    python bench/host_primitives.py --out DIR [--quick]

A lowering's host time is a sum of a few dozen public calls into numpy and torch (which
call the CUDA driver), and hosts differ in how fast each one is. This script times every such primitive (and the
cheaper alternatives to some of them) on the host it runs on, so the breakdown of
`bench_common.py`'s numbers can be read against measured per-call costs rather than guessed.
Each value is the median host microseconds of one call over many calls (the device queue is
drained between batches of calls, so no call waits for the GPU). Without CUDA only the numpy
and CPU-torch rows run. Writes DIR/host_primitives.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def per_call_us(fn: Callable[[], object], *, calls: int, rounds: int, drain: Callable[[], None]) -> float:
    """Median over `rounds` of the mean host microseconds of `calls` back-to-back calls."""
    for _ in range(max(calls // 4, 5)):
        fn()
    drain()
    samples = []
    gc.disable()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls * 1e6)
            drain()
    finally:
        gc.enable()
    return statistics.median(samples)


def run(*, quick: bool) -> dict[str, object]:
    calls, rounds = (50, 9) if quick else (200, 25)
    rows: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    drain = torch.cuda.synchronize if cuda else (lambda: None)

    def time_it(name: str, fn: Callable[[], object]) -> None:
        rows[name] = per_call_us(fn, calls=calls, rounds=rounds, drain=drain)

    small = np.arange(1024, dtype=np.int32)
    other = np.empty_like(small)
    time_it("numpy: copyto 4 KB", lambda: np.copyto(other, small))
    time_it("numpy: cumsum 256", lambda: np.cumsum(small[:256]))
    time_it("numpy: add scalar 256", lambda: small[:256] + 1)
    time_it("numpy: empty 4 KB", lambda: np.empty(1024, dtype=np.int32))
    writable = small.copy()
    time_it("torch: from_numpy", lambda: torch.from_numpy(writable))
    time_it("torch: np.array copy + from_numpy", lambda: torch.from_numpy(np.array(small)))
    cpu_buffer = torch.empty(1 << 16, dtype=torch.uint8)
    time_it("torch cpu: view(int32)", lambda: cpu_buffer.view(torch.int32))
    cpu_i32 = cpu_buffer.view(torch.int32)
    time_it("torch cpu: as_strided", lambda: cpu_i32.as_strided((256, 16), (16, 1), 64))
    time_it("torch cpu: split_with_sizes x4", lambda: cpu_i32.split_with_sizes([257, 256, 4096, 16384 - 4609]))
    time_it("torch cpu: slice [a:b]", lambda: cpu_i32[16:272])
    time_it("torch cpu: numpy() of a tensor", lambda: cpu_buffer.numpy())
    time_it("python: weakref.ref of a tensor", lambda: weakref.ref(cpu_i32))

    fields = [(f"f{i}", int) for i in range(24)]
    frozen = dataclasses.make_dataclass("Frozen", fields, frozen=True, kw_only=True, eq=False)
    values = {f"f{i}": i for i in range(24)}
    time_it("python: frozen dataclass init, 24 fields", lambda: frozen(**values))

    def bypass() -> object:
        obj = object.__new__(frozen)
        obj.__dict__.update(values)
        return obj

    time_it("python: same, __new__ + __dict__.update", bypass)

    report: dict[str, object] = {"host": platform.node(), "python": platform.python_version(),
                                 "torch": torch.__version__, "numpy": np.__version__, "quick": quick}
    if cuda:
        dev = torch.device("cuda", torch.cuda.current_device())
        report["card"] = torch.cuda.get_device_name(dev)
        dev_buffer = torch.empty(1 << 20, dtype=torch.uint8, device=dev)
        pinned = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
        time_it("cuda: torch.empty 4 KB", lambda: torch.empty(4096, dtype=torch.uint8, device=dev))
        time_it("cuda: copy_ pinned 4 KB non_blocking",
                lambda: dev_buffer[:4096].copy_(pinned[:4096], non_blocking=True))
        time_it("cuda: copy_ pinned 512 KB non_blocking",
                lambda: dev_buffer[: 1 << 19].copy_(pinned[: 1 << 19], non_blocking=True))
        head_d, head_p = dev_buffer[:4096], pinned[:4096]
        time_it("cuda: copy_ pinned 4 KB, views made once", lambda: head_d.copy_(head_p, non_blocking=True))
        time_it("cuda: torch.empty pinned 4 KB (caching host allocator)",
                lambda: torch.empty(4096, dtype=torch.uint8, pin_memory=True))
        time_it("cuda: torch.cuda.current_stream(device)", lambda: torch.cuda.current_stream(dev))
        time_it("cuda: torch.cuda.current_stream()", lambda: torch.cuda.current_stream())
        event = torch.cuda.Event()
        stream = torch.cuda.current_stream(dev)
        time_it("cuda: Event.record(stream)", lambda: event.record(stream))
        time_it("cuda: Event.query (done)", lambda: event.query())
        time_it("cuda: torch.cuda.Event()", lambda: torch.cuda.Event())
        time_it("cuda: view(int32)", lambda: dev_buffer.view(torch.int32))
        dev_i32 = dev_buffer.view(torch.int32)
        time_it("cuda: as_strided", lambda: dev_i32.as_strided((256, 16), (16, 1), 64))
        time_it("cuda: split_with_sizes x4", lambda: dev_i32.split_with_sizes([257, 256, 4096, (1 << 18) - 4609]))
        time_it("cuda: slice [a:b]", lambda: dev_i32[16:272])
    report["us_per_call"] = rows
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for host_primitives.json")
    parser.add_argument("--quick", action="store_true", help="fewer calls per measurement")
    args = parser.parse_args(argv)
    report = run(quick=args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_primitives.json").write_text(json.dumps(report, indent=1))
    where = report.get("card", "CPU only")
    print(f"### host primitives on {where} (host {report['host']}, torch {report['torch']})\n")
    print("| call | host us per call |\n|---|---:|")
    for name, value in report["us_per_call"].items():
        print(f"| {name} | {value:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
