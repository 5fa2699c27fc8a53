"""A continuous-batching decode server in JAX, three ways to feed it metadata, in one run.

    python examples/jax_decode_server.py                 # Qwen3-0.6B shapes on a GPU, small on a CPU
    python examples/jax_decode_server.py --small --check # small shapes (a CPU), dense check

A transformer with random weights (Qwen3-0.6B's shapes by default: 28 layers, 16 query heads,
8 KV heads, head dim 128, hidden 1024, batch 32) serves requests that arrive at random steps,
prefill their prompt, decode a token per step and finish after their budget of new tokens.
Keys and values live in a paged cache; attention is
`attnsync.kernels.jax_attention.paged_attention_jax`. Each step the host (numpy only)
schedules the batch and picks its bucket from a `BucketLadder`; the jitted step compiles once
per bucket. The same schedule (same seed) runs in three modes:

- `naive`: the metadata built in Python lists, each field uploaded with its own `jnp.asarray`,
  host ints read back with `int()` (a device-to-host read that waits for the device);
- `attnsync`: `attnsync.build` on the padded batch and `attnsync.adapters.jax.lower(md,
  device, bucket=bucket)`: one `device_put` of one packed int32 vector, under
  `jax.transfer_guard("disallow")`;
- `prepared`: every step's metadata lowered before the clock starts (the same schedule, run
  ahead), so the loop schedules and dispatches only (the limit: metadata that costs nothing).

The host never waits for the device in the last two: sampled tokens stay on the device and
feed the next step's decode rows there; requests finish after a known number of tokens, so the
scheduler needs no token value. Tokens are fetched once, at the end, and must agree across the
modes. Prints tokens/s of each mode and the ratios; every bucket is compiled before the clock
starts, and a compile inside the timed loop (a recompile) fails the run. `--check` compares
every finished request's tokens with a dense, unpaged recomputation (slow at large shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# JAX would reserve 75 % of the GPU's memory at start-up; torch may share this process (docs/jax.md).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
try:
    import attnsync
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attnsync

import jax
import jax.numpy as jnp

from attnsync import BucketLadder
from attnsync.adapters import jax as asj
from attnsync.kernels.jax_attention import paged_attention_jax

MODES = ("naive", "attnsync", "prepared")


@dataclass(frozen=True)
class ServerConfig:
    """Model, cache, limits and workload of one run (defaults: small, a few seconds on a CPU)."""

    vocab: int = 256
    hidden: int = 64
    mlp: int = 0  # MLP width (0: 4 * hidden)
    layers: int = 2
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    block_size: int = 8
    num_pages: int = 256
    max_num_reqs: int = 8
    max_num_tokens: int = 64
    max_model_len: int = 128
    token_sizes: tuple[int, ...] | None = None  # token rungs of the ladder (None: powers of two)
    steps: int = 400
    arrival_prob: float = 0.6  # chance that a request arrives at a step
    initial_requests: int = 0  # requests waiting at step 0
    prompt_len: tuple[int, int] = (3, 24)
    new_tokens: tuple[int, int] = (4, 24)
    seed: int = 0


SMALL = ServerConfig()
# Qwen3-0.6B's attention and model shapes, a batch of 32 decodes once the first prompts are in.
QWEN3_0_6B = ServerConfig(
    vocab=151936, hidden=1024, mlp=3072, layers=28, num_q_heads=16, num_kv_heads=8, head_dim=128,
    block_size=16, num_pages=32 * 16 + 1, max_num_reqs=32, max_num_tokens=256, max_model_len=256,
    token_sizes=(32, 256), steps=200, arrival_prob=0.5, initial_requests=32, prompt_len=(16, 64),
    new_tokens=(48, 192),
)
SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "small": SMALL}


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new: int
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    generated: int = 0  # tokens sampled so far


# ---------------------------------------------------------------------------------------------
# The model (random weights) and one jitted step.


def init_params(cfg: ServerConfig, key: jax.Array) -> dict[str, Any]:
    """Random weights of a pre-norm transformer: embeddings, attention, MLP per layer."""
    h, hq, hkv, d = cfg.hidden, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    m = cfg.mlp or 4 * h
    keys = iter(jax.random.split(key, 2 + 6 * cfg.layers))

    def dense(k: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
        return jax.random.normal(k, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)

    layers = [
        dict(wq=dense(next(keys), h, hq * d), wk=dense(next(keys), h, hkv * d), wv=dense(next(keys), h, hkv * d),
             wo=dense(next(keys), hq * d, h), w1=dense(next(keys), h, m), w2=dense(next(keys), m, h))
        for _ in range(cfg.layers)
    ]
    return dict(
        embed=jax.random.normal(next(keys), (cfg.vocab, h), jnp.float32),
        pos=0.1 * jax.random.normal(next(keys), (cfg.max_model_len, h), jnp.float32),
        layers=layers,
    )


def _rms(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _layer_qkv(p: dict[str, jax.Array], x: jax.Array, cfg: ServerConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    h = _rms(x)
    n = x.shape[0]
    q = (h @ p["wq"]).reshape(n, cfg.num_q_heads, cfg.head_dim)
    k = (h @ p["wk"]).reshape(n, cfg.num_kv_heads, cfg.head_dim)
    v = (h @ p["wv"]).reshape(n, cfg.num_kv_heads, cfg.head_dim)
    return q, k, v


def _layer_out(p: dict[str, jax.Array], x: jax.Array, attn: jax.Array) -> jax.Array:
    x = x + attn.reshape(x.shape[0], -1) @ p["wo"]
    return x + jax.nn.gelu(_rms(x) @ p["w1"]) @ p["w2"]


def make_step(cfg: ServerConfig) -> Callable[..., tuple[Any, jax.Array, jax.Array]]:
    """The jitted step: (params, caches, last_tokens, md, inputs) -> (caches, last_tokens, next).

    `md` is any pytree with the four common device fields as attributes and the padded sizes
    `num_actual_tokens` and `num_reqs` as static ints: the attnsync lowering (inside this jit
    its fields are static slices of its one packed vector) or the naive mode's `NaiveMetadata`.
    """
    scale = 1.0 / math.sqrt(cfg.head_dim)
    num_slots = cfg.num_pages * cfg.block_size

    def step(params: Any, caches: Any, last_tokens: jax.Array, md: Any,
             inputs: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        # Static: the bucket's padded sizes (pytree meta fields), hence the shapes.
        t_pad, r_pad = md.num_actual_tokens, md.num_reqs
        prompt_ids, row_slot = inputs[:t_pad], inputs[t_pad : t_pad + r_pad]
        qsl, seq_lens = md.query_start_loc, md.seq_lens
        tokens = jnp.arange(t_pad, dtype=jnp.int32)
        row = jnp.searchsorted(qsl[1:], tokens, side="right").astype(jnp.int32)
        valid = row < r_pad
        row = jnp.minimum(row, r_pad - 1)
        position = seq_lens[row] - (qsl[row + 1] - qsl[row]) + (tokens - qsl[row])
        position = jnp.clip(position, 0, cfg.max_model_len - 1)
        # Decode tokens (prompt id -1) read the token their request sampled last step.
        ids = jnp.where(prompt_ids >= 0, prompt_ids, last_tokens[row_slot[row]])
        ids = jnp.where(valid, ids, 0)
        x = params["embed"][ids] + params["pos"][position]
        slots = jnp.where(md.slot_mapping < 0, num_slots, md.slot_mapping)  # padding: dropped
        new_caches = []
        for p, (k_cache, v_cache) in zip(params["layers"], caches, strict=True):
            q, k, v = _layer_qkv(p, x, cfg)
            flat = (num_slots, cfg.num_kv_heads, cfg.head_dim)
            k_cache = k_cache.reshape(flat).at[slots].set(k, mode="drop").reshape(k_cache.shape)
            v_cache = v_cache.reshape(flat).at[slots].set(v, mode="drop").reshape(v_cache.shape)
            attn = paged_attention_jax(q, k_cache, v_cache, qsl, seq_lens, md.block_table, scale=scale)
            x = _layer_out(p, x, attn)
            new_caches.append((k_cache, v_cache))
        last = jnp.clip(qsl[1:] - 1, 0, t_pad - 1)  # each row's last token
        logits = _rms(x[last]) @ params["embed"].T
        next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        last_tokens = last_tokens.at[row_slot].set(next_tokens)  # padded rows: the spare slot
        return new_caches, last_tokens, next_tokens

    return jax.jit(step, donate_argnums=(1, 2))


def dense_generate(params: dict[str, Any], prompt: list[int], max_new: int, cfg: ServerConfig) -> list[int]:
    """The same model without paging or batching: full causal attention over the sequence."""
    tokens = np.zeros(cfg.max_model_len, np.int32)
    tokens[: len(prompt)] = prompt
    out = []
    for n in range(len(prompt), len(prompt) + max_new):
        token = int(_dense_next(params, jnp.asarray(tokens), jnp.int32(n), cfg))
        out.append(token)
        if n < cfg.max_model_len:
            tokens[n] = token
    return out


@functools.partial(jax.jit, static_argnums=(3,))
def _dense_next(params: dict[str, Any], tokens: jax.Array, n: jax.Array, cfg: ServerConfig) -> jax.Array:
    """Greedy next token after `tokens[:n]` (one compile: the sequence is padded to max_model_len)."""
    length = cfg.max_model_len
    group = cfg.num_q_heads // cfg.num_kv_heads
    x = params["embed"][tokens] + params["pos"][:length]
    position = jnp.arange(length)
    mask = (position[None, :] <= position[:, None]) & (position[None, :] < n)
    for p in params["layers"]:
        q, k, v = _layer_qkv(p, x, cfg)
        k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
        logits = jnp.einsum("qhd,khd->hqk", q, k, precision="highest") / math.sqrt(cfg.head_dim)
        probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
        x = _layer_out(p, x, jnp.einsum("hqk,khd->qhd", probs, v, precision="highest"))
    return jnp.argmax(_rms(x[n - 1]) @ params["embed"].T)


# ---------------------------------------------------------------------------------------------
# Compile counting (JAX reports every backend compile as a monitoring event).

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]
_listening = [False]


def compile_count() -> int:
    """Backend compiles in this process so far (from the first call on)."""
    if not _listening[0]:
        def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
            if event == _COMPILE_EVENT:
                _compiles[0] += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        _listening[0] = True
    return _compiles[0]


# ---------------------------------------------------------------------------------------------
# The host scheduler (numpy only; the same in every mode).


@dataclass
class Step:
    """One scheduled step: the rows, their batch and bucket, the step's other host input."""

    rows: list[tuple[Request, int]]  # (request, new tokens), decodes first
    batch: attnsync.Batch
    bucket: Any
    inputs: np.ndarray  # prompt ids (-1: decode), padded to the bucket's tokens, then row slots


class Scheduler:
    """Arrivals, admission (pages and slots reserved for a request's whole life), finishing."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.width = -(-cfg.max_model_len // cfg.block_size)
        # One width rung: fewer buckets (compiles); the JAX reference reads width * block_size keys.
        self.ladder = BucketLadder(
            max_num_reqs=cfg.max_num_reqs, max_num_tokens=cfg.max_num_tokens, max_model_len=cfg.max_model_len,
            block_size=cfg.block_size, width_sizes=(self.width,), token_sizes=cfg.token_sizes,
        )
        self.free_pages = list(range(1, cfg.num_pages))  # page 0 is the null page of padded rows
        self.free_slots = list(range(cfg.max_num_reqs))
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.requests: dict[int, Request] = {}
        for _ in range(cfg.initial_requests):
            self._new_request()

    def _new_request(self) -> None:
        cfg = self.cfg
        n = int(self.rng.integers(cfg.prompt_len[0], cfg.prompt_len[1] + 1))
        new = int(self.rng.integers(cfg.new_tokens[0], cfg.new_tokens[1] + 1))
        new = min(new, cfg.max_model_len - n + 1)  # the cache holds prompt + new - 1 tokens
        req = Request(len(self.requests), self.rng.integers(0, cfg.vocab, n).tolist(), new)
        self.requests[req.rid] = req
        self.waiting.append(req)

    def buckets(self) -> list[Any]:
        """The ladder's buckets a batch can fall in (a uniform-decode bucket whose rows fit a
        smaller token rung is never chosen), for the warm-up."""
        out, rungs = [], self.ladder.token_sizes
        for bucket in self.ladder.buckets():
            smaller = [r for r in rungs if r < bucket.num_tokens]
            if (bucket.is_uniform_decode and smaller and bucket.uniform_query_len is not None
                    and bucket.num_reqs * bucket.uniform_query_len <= smaller[-1]):
                continue
            out.append(bucket)
        return out

    def schedule(self) -> Step | None:
        """The next step, or None when nothing runs; updates every request's counts."""
        cfg = self.cfg
        if self.rng.random() < cfg.arrival_prob:
            self._new_request()
        rows = [(r, 1) for r in self.running]
        budget = cfg.max_num_tokens - len(rows)
        while self.waiting and len(rows) < cfg.max_num_reqs:
            req = self.waiting[0]
            pages = -(-(len(req.prompt) + req.max_new - 1) // cfg.block_size)
            if len(req.prompt) > budget or pages > len(self.free_pages) or not self.free_slots:
                break
            self.waiting.pop(0)
            req.pages = [self.free_pages.pop() for _ in range(pages)]
            req.slot = self.free_slots.pop()
            rows.append((req, len(req.prompt)))
            budget -= len(req.prompt)
        if not rows:
            return None
        n = len(rows)
        table = np.zeros((n, self.width), dtype=np.int32)
        query_lens, seq_lens = np.empty(n, np.int32), np.empty(n, np.int32)
        prompt_ids, slots = [], []
        for i, (req, q) in enumerate(rows):
            table[i, : len(req.pages)] = req.pages
            query_lens[i] = q
            seq_lens[i] = req.num_computed + q
            prompt_ids.extend(req.prompt if req.generated == 0 else [-1])
            slots.append(req.slot)
        batch = attnsync.Batch(query_lens=query_lens, seq_lens=seq_lens, block_table=table,
                               block_size=cfg.block_size, is_prefilling=np.array([r.generated == 0 for r, _ in rows]))
        bucket = self.ladder.bucket_for(batch)
        step = Step(rows, batch, bucket, step_inputs(bucket, prompt_ids, slots, cfg.max_num_reqs))
        for req, q in rows:
            req.num_computed += q
            req.generated += 1
            if req.generated == 1:
                self.running.append(req)
            if req.generated == req.max_new:
                self.running.remove(req)
                self.free_pages.extend(req.pages)
                self.free_slots.append(req.slot)
                self.finished.append(req)
        return step


def step_inputs(bucket: Any, prompt_ids: list[int], slots: list[int], spare: int) -> np.ndarray:
    """Prompt ids (-1 for decode tokens) padded to the bucket's tokens, then each row's request
    slot (padded rows: the spare slot)."""
    inputs = np.full(bucket.num_tokens + bucket.num_reqs, -1, np.int32)
    inputs[: len(prompt_ids)] = prompt_ids
    inputs[bucket.num_tokens : bucket.num_tokens + len(slots)] = slots
    inputs[bucket.num_tokens + len(slots) :] = spare
    return inputs


# ---------------------------------------------------------------------------------------------
# The three ways to hand the step its metadata.


@functools.partial(jax.tree_util.register_dataclass, data_fields=["query_start_loc", "seq_lens", "block_table",
                                                                  "slot_mapping"],
                   meta_fields=["num_reqs", "num_actual_tokens"])
@dataclass(frozen=True)
class NaiveMetadata:
    """The naive mode's metadata: four device arrays, the padded sizes static."""

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_table: jax.Array
    slot_mapping: jax.Array
    num_reqs: int
    num_actual_tokens: int


def naive_metadata(batch: attnsync.Batch, bucket: Any, device: Any) -> tuple[NaiveMetadata, int, int]:
    """The way metadata is built without attnsync: Python lists, one upload per field, host
    ints read back from the device. Same values as `attnsync.build` (vLLM's padding)."""
    rows, tokens = bucket.num_reqs, bucket.num_tokens
    q = [int(x) for x in batch.query_lens]
    s = [int(x) for x in batch.seq_lens]
    qsl = [0]
    for n in q:
        qsl.append(qsl[-1] + n)
    qsl += [qsl[-1]] * (rows - len(q))
    slots = []
    for r, (n, length) in enumerate(zip(q, s, strict=True)):
        for pos in range(length - n, length):
            slots.append(int(batch.block_table[r, pos // batch.block_size]) * batch.block_size + pos % batch.block_size)
    slots += [-1] * (tokens - len(slots))
    table = np.zeros((rows, bucket.width), np.int32)
    table[: len(q)] = batch.block_table[:, : bucket.width]
    md = NaiveMetadata(
        query_start_loc=jax.device_put(jnp.asarray(qsl, dtype=jnp.int32), device),
        seq_lens=jax.device_put(jnp.asarray(s + [0] * (rows - len(s)), dtype=jnp.int32), device),
        block_table=jax.device_put(jnp.asarray(table), device),
        slot_mapping=jax.device_put(jnp.asarray(slots, dtype=jnp.int32), device),
        num_reqs=rows, num_actual_tokens=tokens,
    )
    # Host ints the way a server without host metadata gets them: read from the device.
    return md, int(md.seq_lens.max()), int(md.query_start_loc[-1])


def attnsync_metadata(batch: attnsync.Batch, bucket: Any, ladder: BucketLadder, device: Any) -> Any:
    md = attnsync.build(ladder.pad(batch, bucket))
    return asj.lower(md, device, bucket=bucket)


# ---------------------------------------------------------------------------------------------
# One mode's run.


def _fresh_state(cfg: ServerConfig, device: Any) -> tuple[Any, Any]:
    shape = (cfg.num_pages, cfg.block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [(jax.device_put(np.zeros(shape, np.float32), device), jax.device_put(np.zeros(shape, np.float32), device))
              for _ in range(cfg.layers)]
    # One slot per possible running request, plus a spare that padded rows write to.
    last_tokens = jax.device_put(np.zeros(cfg.max_num_reqs + 1, np.int32), device)
    return caches, last_tokens


def run_server(cfg: ServerConfig, *, device: Any = None, check: bool = False, mode: str = "attnsync",
               params: Any = None, step_fn: Any = None) -> dict[str, Any]:
    """Run `cfg.steps` steps in `mode`; return the statistics (with `check`, the dense comparison).

    Every bucket the schedule can reach is compiled first (through the mode's own metadata
    path); the clock then covers scheduling, metadata, the step's input upload and dispatch of
    every step, up to the last step's tokens being ready (`prepared`: its metadata was lowered
    before the clock started, so only the metadata's cost is missing).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, received {mode!r}")
    device = device if device is not None else jax.devices()[0]
    params = params if params is not None else jax.device_put(init_params(cfg, jax.random.PRNGKey(cfg.seed)), device)
    step_fn = step_fn if step_fn is not None else make_step(cfg)
    sched = Scheduler(cfg)
    spare = cfg.max_num_reqs

    def metadata(batch: attnsync.Batch, bucket: Any) -> Any:
        if mode == "naive":
            md, _, _ = naive_metadata(batch, bucket, device)
            return md
        return attnsync_metadata(batch, bucket, sched.ladder, device)

    guard = "allow" if mode == "naive" else "disallow"  # naive uploads implicitly, by design
    caches, last_tokens = _fresh_state(cfg, device)
    compiles_before = compile_count()
    with jax.transfer_guard(guard):
        for bucket in sched.buckets():  # warm-up: page 0 and the spare slot absorb its writes
            example = sched.ladder.example_batch(bucket)
            inputs = jax.device_put(step_inputs(bucket, [], [spare], spare), device)
            caches, last_tokens, _ = step_fn(params, caches, last_tokens, metadata(example, bucket), inputs)
    jax.block_until_ready(last_tokens)
    warm_compiles = compile_count() - compiles_before
    prepared: list[Any] = []
    if mode == "prepared":  # the same schedule, run ahead (it needs no device value)
        ahead = Scheduler(cfg)
        with jax.transfer_guard("disallow"):
            for _ in range(cfg.steps):
                step = ahead.schedule()
                if step is not None:
                    prepared.append(metadata(step.batch, step.bucket))
        jax.block_until_ready(prepared)
        prepared.reverse()  # popped in step order
    sampled: list[tuple[jax.Array, list[int]]] = []
    buckets_seen: set[Any] = set()
    generated, host_reads = 0, 0
    before = compile_count()
    start = time.perf_counter()
    with jax.transfer_guard(guard):
        for _ in range(cfg.steps):
            step = sched.schedule()
            if step is None:
                continue
            if mode == "naive":
                md, max_seq_len, num_tokens = naive_metadata(step.batch, step.bucket, device)
                host_reads += 2
                assert num_tokens == int(step.batch.query_lens.sum()) and max_seq_len <= cfg.max_model_len
            elif mode == "attnsync":
                md = attnsync_metadata(step.batch, step.bucket, sched.ladder, device)
            else:
                md = prepared.pop()
            caches, last_tokens, next_tokens = step_fn(params, caches, last_tokens, md, jax.device_put(step.inputs, device))
            sampled.append((next_tokens, [req.rid for req, _ in step.rows]))
            buckets_seen.add(step.bucket)
            generated += len(step.rows)
        jax.block_until_ready(last_tokens)
    assert not prepared, "the prepared schedule and the served one differ"
    wall = time.perf_counter() - start
    recompiles = compile_count() - before
    tokens: dict[int, list[int]] = {}
    for values, rids in zip(jax.device_get([t for t, _ in sampled]), [r for _, r in sampled], strict=True):
        for row, rid in enumerate(rids):
            tokens.setdefault(rid, []).append(int(values[row]))
    stats: dict[str, Any] = {
        "mode": mode,
        "device": str(device),
        "steps": len(sampled),
        "tokens": generated,
        "seconds": wall,
        "tokens_per_s": generated / wall if wall > 0 else 0.0,
        "requests": len(sched.requests),
        "finished": len(sched.finished),
        "buckets": len(buckets_seen),
        "compiles": warm_compiles + recompiles,
        "recompiles": recompiles,
        "host_reads": host_reads,
    }
    if check:
        mismatched = [req.rid for req in sched.finished
                      if tokens[req.rid] != dense_generate(params, req.prompt, req.max_new, cfg)]
        stats["checked"] = len(sched.finished)
        stats["mismatched"] = mismatched
    stats["outputs"] = {rid: tokens.get(rid, []) for rid in sorted(sched.requests)}
    return stats


def run_modes(cfg: ServerConfig, modes: tuple[str, ...] = MODES, *, device: Any = None,
              check: bool = False) -> dict[str, dict[str, Any]]:
    """Each of `modes` on the same schedule, parameters and compiled step; the dense check
    (if asked) once, on the first mode's tokens (the others must equal them)."""
    device = device if device is not None else jax.devices()[0]
    params = jax.device_put(init_params(cfg, jax.random.PRNGKey(cfg.seed)), device)
    step_fn = make_step(cfg)
    return {mode: run_server(cfg, device=device, check=check and i == 0, mode=mode, params=params, step_fn=step_fn)
            for i, mode in enumerate(modes)}


def main(argv: list[str] | None = None) -> int:
    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    parser = argparse.ArgumentParser(
        description="Serve random requests with a JAX transformer on paged KV caches, feeding the metadata "
                    "three ways (naive, attnsync, prepared once), and compare tokens/s.",
    )
    parser.add_argument("--shapes", choices=("auto", *SHAPES), default="auto",
                        help="model and batch shapes; auto: qwen3-0.6b (28 layers, 16 q heads, 8 kv heads, "
                             "head dim 128, batch 32) on a GPU, small on a CPU (default: auto)")
    parser.add_argument("--small", action="store_true", help="shorthand for --shapes small")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes to run (default: {','.join(MODES)})")
    parser.add_argument("--steps", type=int, default=None, help=f"serving steps per mode (default: the shapes' own, "
                        f"{QWEN3_0_6B.steps} for qwen3-0.6b, {SMALL.steps} for small)")
    parser.add_argument("--layers", type=int, default=None, help=f"transformer layers (default: the shapes' own, "
                        f"{QWEN3_0_6B.layers} for qwen3-0.6b, {SMALL.layers} for small)")
    parser.add_argument("--seed", type=int, default=0, help="workload and weight seed (default: 0)")
    parser.add_argument("--check", action="store_true",
                        help="compare the tokens with a dense recomputation of the same model (slow at large shapes)")
    args = parser.parse_args(argv)
    shapes = "small" if args.small else args.shapes
    if shapes == "auto":
        shapes = "qwen3-0.6b" if has_gpu else "small"
    cfg = SHAPES[shapes]
    cfg = dataclasses.replace(cfg, seed=args.seed, steps=args.steps if args.steps is not None else cfg.steps,
                              layers=args.layers if args.layers is not None else cfg.layers)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown}; choose from {MODES}")
    device = jax.devices()[0]
    print(f"device {device} ({getattr(device, 'device_kind', '?')}); shapes {shapes}: {cfg.layers} layers, "
          f"{cfg.num_q_heads} q heads, {cfg.num_kv_heads} kv heads, head dim {cfg.head_dim}, hidden {cfg.hidden}, "
          f"batch up to {cfg.max_num_reqs}, {cfg.steps} steps")
    results = run_modes(cfg, modes, device=device, check=args.check)
    print("| mode | steps | tokens | seconds | tokens/s | buckets | compiles | recompiles |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, st in results.items():
        print(f"| {mode} | {st['steps']} | {st['tokens']} | {st['seconds']:.3f} | {st['tokens_per_s']:.0f} "
              f"| {st['buckets']} | {st['compiles']} | {st['recompiles']} |")
    rate = {mode: st["tokens_per_s"] for mode, st in results.items()}
    if "attnsync" in rate and "naive" in rate:
        print(f"attnsync / naive: {rate['attnsync'] / rate['naive']:.2f}x tokens/s")
    if "attnsync" in rate and "prepared" in rate:
        print(f"attnsync / prepared (the limit): {rate['attnsync'] / rate['prepared']:.2f}x tokens/s")
    outputs = [st["outputs"] for st in results.values()]
    same = all(o == outputs[0] for o in outputs)
    print(f"outputs: {'identical' if same else 'DIFFERENT'} across {len(outputs)} mode(s), "
          f"{sum(map(len, outputs[0].values()))} tokens of {len(outputs[0])} requests")
    first = next(iter(results.values()))
    if args.check:
        print(f"dense check: {first['checked'] - len(first['mismatched'])}/{first['checked']} requests "
              f"match token for token")
    ok = same and all(st["recompiles"] == 0 for st in results.values()) and not first.get("mismatched")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
