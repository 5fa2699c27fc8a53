"""Host time of the Mamba backend per step against batch size; vs the sync-ful way.

    python bench/bench_mamba.py --out DIR [--quick]

Workloads (decode rows first, the strict decode-first order Mamba needs), for 1 to 1024 requests:

- `decode`:    every row a one-token decode, cache mode "none";
- `mixed`:     decode-heavy: per 16 requests one chunked-prefill continuation (256 new tokens
  after a cached prefix) and, per 32, one fresh 512-token prefill; cache mode "none";
- `mixed-all`: the same with prefix caching, cache mode "all" (block 512, table 32 wide);
- `spec`:      speculative decodes (k = 3, 1..4 tokens each) whose host lengths are upper
  bounds (async spec decode), with `num_accepted_tokens`, plus the mixed prefills.

Variants, host microseconds per call (median over many calls after a warm-up):

- `build`:       `attnsync.build(batch, backend="mamba", ...)` (numpy only);
- `build+torch`: build, then `attnsync.adapters.torch.lower` (one pinned non_blocking copy);
- `build+jax`:   build, then `attnsync.adapters.jax.lower`;
- `naive`:       the way vLLM 0.20 built the same fields: device num_computed read back with
  `.cpu()`, `any(...).item()` for prep_initial_states, a per-request Python loop for the chunk
  and conv1d lists, `torch.tensor(list, device=...)` uploads. Syncs included.

The device queue is drained between calls. On a CUDA host everything targets the GPU; on a
CPU-only host it still runs (device "cpu") and the report says so: only GPU numbers count.
Writes DIR/bench_mamba.json and DIR/bench_mamba.md and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX next to torch: docs/jax.md
try:
    import attnsync
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync
from bench_common import measure  # the one timing helper of bench/ (same folder)

SIZES = (1, 8, 32, 128, 256, 512, 1024)
QUICK_SIZES = (1, 32, 256, 1024)
WORKLOADS = ("decode", "mixed", "mixed-all", "spec")
VARIANTS = ("build", "build+torch", "build+jax", "naive")
CHUNK_SIZE = 256  # Mamba2's usual scan chunk
BLOCK_ALL = 512  # state checkpoint every 512 tokens in mode "all" (a multiple of the chunk)
MAX_CONTEXT = 16384
K_SPEC = 3


def workload(name: str, num_reqs: int, rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Batch keyword arguments, build options) for one step of `name` with `num_reqs` rows."""
    extends = num_reqs // 16 if name != "decode" else 0
    fresh = num_reqs // 32 if name != "decode" else 0
    decodes = num_reqs - extends - fresh
    if name == "spec":
        dq = rng.integers(1, K_SPEC + 2, decodes)
    else:
        dq = np.ones(decodes, dtype=np.int64)
    q = np.concatenate([dq, np.full(extends, 256), np.full(fresh, 512)]).astype(np.int64)
    context = np.concatenate([rng.integers(64, MAX_CONTEXT - 600, decodes + extends), np.zeros(fresh)]).astype(np.int64)
    s = q + context
    prefilling = np.arange(num_reqs) >= decodes
    options: dict[str, Any] = dict(chunk_size=CHUNK_SIZE)
    if name == "mixed-all":
        block = BLOCK_ALL
        width = MAX_CONTEXT // BLOCK_ALL
        options["cache_mode"] = "all"
    else:
        block = MAX_CONTEXT  # one state slot per request: the table holds 1 + k slots
        width = 1 + (K_SPEC if name == "spec" else 0)
    table = rng.integers(1, 1 << 16, size=(num_reqs, width))  # slot ids; * block_size fits int32
    args: dict[str, Any] = dict(query_lens=q, seq_lens=s, block_table=table, block_size=block,
                                is_prefilling=prefilling)
    if name == "spec":
        rejected = rng.integers(0, K_SPEC + 1, num_reqs) * (np.arange(num_reqs) < decodes)
        args["seq_lens"] = s + rejected  # optimistic host lengths
        args["seq_lens_exact"] = rejected == 0
        options.update(num_spec_tokens=K_SPEC, num_accepted_tokens=rng.integers(1, K_SPEC + 2, num_reqs))
    return args, options


def naive_mamba_torch(batch: attnsync.Batch, options: dict[str, Any], device: Any) -> dict[str, Any]:
    """The sync-ful build of the same fields, as vLLM 0.20 did it (the equivalence "before")."""
    import torch

    k = options.get("num_spec_tokens", 0)
    threshold = 1 + k if "num_accepted_tokens" in options else 1
    chunk = options["chunk_size"]
    q = batch.query_lens.tolist()
    pre = batch.is_prefilling.tolist() if batch.is_prefilling is not None else [False] * len(q)
    nd = sum(1 for qi, p in zip(q, pre) if qi <= threshold and not p)
    qsl = [0]
    for qi in q:
        qsl.append(qsl[-1] + qi)
    out: dict[str, Any] = {}
    qsl_gpu = torch.tensor(qsl, dtype=torch.int32, device=device)
    seq_gpu = torch.tensor(batch.seq_lens.tolist(), dtype=torch.int32, device=device)
    computed = (seq_gpu - (qsl_gpu[1:] - qsl_gpu[:-1])).cpu()[nd:]  # S1: a device read
    out["query_start_loc_p"] = qsl_gpu[nd:] - qsl_gpu[nd]
    has_init = (computed > 0).to(device)
    out["has_initial_states_p"] = has_init
    out["prep_initial_states"] = bool(torch.any(has_init).item())  # S1
    cu, seq_idx, last = [], [], []
    offset = 0
    for r, c in enumerate(computed.tolist()):
        rest = q[nd + r]
        if c % chunk and rest:
            first = min(-(-c // chunk) * chunk - c, rest)
            cu.append(offset)
            seq_idx.append(r)
            offset += first
            rest -= first
        while rest > 0:
            take = min(chunk, rest)
            cu.append(offset)
            seq_idx.append(r)
            offset += take
            rest -= take
        last.append(len(cu) - 1)
    cu.append(offset)
    out["cu_chunk_seqlen_p"] = torch.tensor(cu, dtype=torch.int32, device=device)  # S2
    out["seq_idx_p"] = torch.tensor(seq_idx, dtype=torch.int32, device=device)
    out["last_chunk_indices_p"] = torch.tensor(last, dtype=torch.int32, device=device)
    programs, offsets = [], []
    for r in range(len(q) - nd):
        for block in range(-(-q[nd + r] // 8)):
            programs.append(r)
            offsets.append(block)
    capacity = 2 * max(1024, len(programs))
    batch_ptr = torch.full((capacity,), -1, dtype=torch.int32, device=device)
    offset_ptr = torch.full((capacity,), -1, dtype=torch.int32, device=device)
    batch_ptr[: len(programs)].copy_(torch.tensor(programs, dtype=torch.int32), non_blocking=True)  # S4
    offset_ptr[: len(offsets)].copy_(torch.tensor(offsets, dtype=torch.int32), non_blocking=True)
    out["batch_ptr"], out["token_chunk_offset_ptr"] = batch_ptr, offset_ptr
    table = torch.tensor(batch.block_table.tolist(), dtype=torch.int32, device=device)
    if options.get("cache_mode") == "all":
        out["state_indices_tensor_p"], out["state_indices_tensor_d"] = table[nd:], table[:nd]
    else:
        out["state_indices_tensor_p"] = table[nd:, 0]
        out["state_indices_tensor_d"] = table[:nd, : 1 + k]
    return out


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {"torch": None, "jax": None, "device": "cpu", "card": None, "versions": {}}
    try:
        import torch

        from attnsync.adapters import torch as torch_adapter

        env["torch"] = (torch, torch_adapter)
        env["versions"]["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["device"] = "cuda"
            env["card"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        import jax

        from attnsync.adapters import jax as jax_adapter

        try:
            device = jax.devices("gpu")[0]
        except RuntimeError:
            device = jax.devices("cpu")[0]
        env["jax"] = (jax, jax_adapter, device)
        env["versions"]["jax"] = jax.__version__
    except ImportError:
        pass
    return env


def _agrees(lowered: Any, naive: dict[str, Any]) -> bool:
    """attnsync and the naive build give the same values (read back once, outside the timing)."""
    for name, value in naive.items():
        ours = getattr(lowered, name)
        if isinstance(value, bool):
            if ours != value:
                return False
            continue
        mine = ours.cpu().numpy()
        theirs = value.cpu().numpy()
        if name in ("batch_ptr", "token_chunk_offset_ptr"):  # different padding capacities
            used = int(lowered.num_conv_programs)
            mine, theirs = mine[:used], theirs[:used]
        if not np.array_equal(mine.astype(np.int64), theirs.astype(np.int64)):
            return False
    return True


def run(*, quick: bool) -> dict[str, Any]:
    reps, warmup, budget_s = (30, 5, 0.2) if quick else (200, 20, 1.0)
    sizes = QUICK_SIZES if quick else SIZES
    env = _environment()
    device = env["device"]
    torch_pair, jax_triple = env["torch"], env["jax"]
    drain = (lambda: torch_pair[0].cuda.synchronize()) if device == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    rows = []
    for name in WORKLOADS:
        for num_reqs in sizes:
            args, options = workload(name, num_reqs, rng)
            batch = attnsync.Batch(**args)
            md = attnsync.build(batch, backend="mamba", **options)
            fns: dict[str, Callable[[], Any]] = {
                "build": lambda b=batch, o=options: attnsync.build(b, backend="mamba", **o),
            }
            agree = None
            if torch_pair is not None:
                adapter = torch_pair[1]
                fns["build+torch"] = lambda b=batch, o=options: adapter.lower(
                    attnsync.build(b, backend="mamba", **o), device)
                fns["naive"] = lambda b=batch, o=options: naive_mamba_torch(b, o, device)
                agree = _agrees(fns["build+torch"](), fns["naive"]())
            if jax_triple is not None:
                jax_adapter, jax_device = jax_triple[1], jax_triple[2]
                fns["build+jax"] = lambda b=batch, o=options: jax_adapter.lower(
                    attnsync.build(b, backend="mamba", **o), jax_device)
            stats = {variant: measure(fn, drain, reps=reps, warmup=warmup, budget_s=budget_s)
                     for variant, fn in fns.items()}
            rows.append({
                "workload": name,
                "num_reqs": num_reqs,
                "num_tokens": batch.num_tokens,
                "num_prefills": md.num_prefills,
                "num_chunks": md.num_chunks,
                "median_us": {v: stats[v]["median"] if v in stats else None for v in VARIANTS},
                "p90_us": {v: stats[v]["p90"] if v in stats else None for v in VARIANTS},
                "reps": {v: stats[v]["reps"] for v in stats},
                "naive_agrees": agree,
            })
    cpu_only = device != "cuda"
    return {
        "bench": "bench_mamba",
        "device": device,
        "cpu_only": cpu_only,
        "card": env["card"] or platform.processor() or platform.machine(),
        "note": ("CPU-only run: lowering copies nothing and .item() waits for nothing; only GPU "
                 "numbers count") if cpu_only else "lowerings and the naive build target the GPU",
        "jax_device": str(jax_triple[2]) if jax_triple else None,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "attnsync": attnsync.__version__, **env["versions"]},
        "config": {"sizes": list(sizes), "workloads": list(WORKLOADS), "chunk_size": CHUNK_SIZE,
                   "block_all": BLOCK_ALL, "num_spec_tokens": K_SPEC, "reps": reps, "warmup": warmup,
                   "quick": quick},
        "results": rows,
    }


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    label = " (CPU-only: only GPU numbers count)" if report["cpu_only"] else ""
    lines = [f"### bench_mamba on {report['device']} ({report['card']}){label}", "",
             "Median host microseconds per step.", ""]
    for name in report["config"]["workloads"]:
        lines += [f"**{name}**", "",
                  "| reqs | tokens | prefills | chunks | " + " | ".join(VARIANTS) + " | naive / build+torch |",
                  "|---:|---:|---:|---:|" + "---:|" * (len(VARIANTS) + 1)]
        for row in report["results"]:
            if row["workload"] != name:
                continue
            med = row["median_us"]
            ratio = (med["naive"] / med["build+torch"]) if med["naive"] and med["build+torch"] else None
            lines.append(f"| {row['num_reqs']} | {row['num_tokens']} | {row['num_prefills']} | {row['num_chunks']} | "
                         + " | ".join(_cell(med[v]) for v in VARIANTS) + f" | {_cell(ratio, 2)}x |")
        lines.append("")
    bad = [(r["workload"], r["num_reqs"]) for r in report["results"] if r["naive_agrees"] is False]
    lines.append("attnsync and the naive build agree on every compared field."
                 if not bad else f"DISAGREEMENT with the naive build at {bad}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for bench_mamba.json / .md")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(quick=args.quick)
    (args.out / "bench_mamba.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "bench_mamba.md").write_text(text)
    print(text)
    return 0 if all(r["naive_agrees"] is not False for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
