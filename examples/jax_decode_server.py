"""A small continuous-batching decode server in JAX, on attnsync's bucketed metadata.

    python examples/jax_decode_server.py [--steps 200] [--check]   # CPU by default, GPU if present

A toy transformer with random weights serves requests that arrive at random steps, prefill
their prompt in one step, decode a token per step and finish after their budget of new tokens.
Keys and values live in a paged cache; attention is `attnsync.kernels.jax_attention.
paged_attention_jax`. Each step the host (numpy only) schedules the batch, builds an
`attnsync.Batch`, picks its bucket from a `BucketLadder`, pads it, builds the metadata and lowers
it with `attnsync.adapters.jax.lower(md, device, bucket=bucket)`: the pytree's static part is the
bucket's bounds, so the jitted step compiles once per bucket and never again. The whole step
runs under `jax.transfer_guard("disallow")`: the only transfers are the explicit ones (the
packed metadata and the step's prompt tokens).

The host never waits for the device: sampled tokens stay on the device and feed the next
step's decode rows there (each row names its request's slot in a device array of last
tokens); requests finish after a known number of tokens, so the host needs no token value to
schedule. The tokens are fetched once, at the end.

Prints tokens/s, the compiles, and the recompiles (compiles in a step whose bucket had run
before: the number attnsync exists to keep at 0). `--check` compares every finished request's
tokens with a dense, unpaged recomputation of the same model.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
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


@dataclass(frozen=True)
class ServerConfig:
    """Model, cache, limits and workload of one run (defaults: a few seconds on a CPU)."""

    vocab: int = 256
    hidden: int = 64
    layers: int = 2
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    block_size: int = 8
    num_pages: int = 256
    max_num_reqs: int = 8
    max_num_tokens: int = 64
    max_model_len: int = 128
    steps: int = 120
    arrival_prob: float = 0.6  # chance that a request arrives at a step
    prompt_len: tuple[int, int] = (3, 24)
    new_tokens: tuple[int, int] = (4, 24)
    seed: int = 0


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
    keys = iter(jax.random.split(key, 2 + 6 * cfg.layers))

    def dense(k, fan_in, fan_out):
        return jax.random.normal(k, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)

    layers = [
        dict(wq=dense(next(keys), h, hq * d), wk=dense(next(keys), h, hkv * d), wv=dense(next(keys), h, hkv * d),
             wo=dense(next(keys), hq * d, h), w1=dense(next(keys), h, 4 * h), w2=dense(next(keys), 4 * h, h))
        for _ in range(cfg.layers)
    ]
    return dict(
        embed=jax.random.normal(next(keys), (cfg.vocab, h), jnp.float32),
        pos=0.1 * jax.random.normal(next(keys), (cfg.max_model_len, h), jnp.float32),
        layers=layers,
    )


def _rms(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _layer_qkv(p: dict[str, jax.Array], x: jax.Array, cfg: ServerConfig):
    h = _rms(x)
    n = x.shape[0]
    q = (h @ p["wq"]).reshape(n, cfg.num_q_heads, cfg.head_dim)
    k = (h @ p["wk"]).reshape(n, cfg.num_kv_heads, cfg.head_dim)
    v = (h @ p["wv"]).reshape(n, cfg.num_kv_heads, cfg.head_dim)
    return q, k, v


def _layer_out(p: dict[str, jax.Array], x: jax.Array, attn: jax.Array) -> jax.Array:
    x = x + attn.reshape(x.shape[0], -1) @ p["wo"]
    return x + jax.nn.gelu(_rms(x) @ p["w1"]) @ p["w2"]


def make_step(cfg: ServerConfig):
    """The jitted step: (params, caches, last_tokens, jmd, inputs) -> (caches, last_tokens, next)."""
    scale = 1.0 / math.sqrt(cfg.head_dim)
    num_slots = cfg.num_pages * cfg.block_size

    def step(params, caches, last_tokens, jmd, inputs):
        # Static: the bucket's padded sizes (pytree meta fields), hence the shapes.
        t_pad, r_pad = jmd.num_actual_tokens, jmd.num_reqs
        prompt_ids, row_slot = inputs[:t_pad], inputs[t_pad : t_pad + r_pad]
        qsl, seq_lens = jmd.query_start_loc, jmd.seq_lens
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
        slots = jnp.where(jmd.slot_mapping < 0, num_slots, jmd.slot_mapping)  # padding: dropped
        new_caches = []
        for p, (k_cache, v_cache) in zip(params["layers"], caches, strict=True):
            q, k, v = _layer_qkv(p, x, cfg)
            flat = (num_slots, cfg.num_kv_heads, cfg.head_dim)
            k_cache = k_cache.reshape(flat).at[slots].set(k, mode="drop").reshape(k_cache.shape)
            v_cache = v_cache.reshape(flat).at[slots].set(v, mode="drop").reshape(v_cache.shape)
            attn = paged_attention_jax(q, k_cache, v_cache, qsl, seq_lens, jmd.block_table, scale=scale)
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
        def listener(event: str, duration: float, **kwargs: Any) -> None:
            if event == _COMPILE_EVENT:
                _compiles[0] += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        _listening[0] = True
    return _compiles[0]


# ---------------------------------------------------------------------------------------------
# The server loop.


class Server:
    """Host scheduler + device state; `run(steps)` drives the loop."""

    def __init__(self, cfg: ServerConfig, device: Any = None) -> None:
        self.cfg = cfg
        self.device = device if device is not None else jax.devices()[0]
        self.rng = np.random.default_rng(cfg.seed)
        self.width = -(-cfg.max_model_len // cfg.block_size)
        # One width rung: fewer buckets (compiles); the JAX reference reads width * block_size keys.
        self.ladder = BucketLadder(
            max_num_reqs=cfg.max_num_reqs, max_num_tokens=cfg.max_num_tokens,
            max_model_len=cfg.max_model_len, block_size=cfg.block_size, width_sizes=(self.width,),
        )
        self.params = jax.device_put(init_params(cfg, jax.random.PRNGKey(cfg.seed)), self.device)
        shape = (cfg.num_pages, cfg.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.caches = [
            (jax.device_put(np.zeros(shape, np.float32), self.device),
             jax.device_put(np.zeros(shape, np.float32), self.device))
            for _ in range(cfg.layers)
        ]
        # One slot per possible running request, plus a spare that padded rows write to.
        self.last_tokens = jax.device_put(np.zeros(cfg.max_num_reqs + 1, np.int32), self.device)
        self.step_fn = make_step(cfg)
        self.free_pages = list(range(1, cfg.num_pages))  # page 0 is the null page of padded rows
        self.free_slots = list(range(cfg.max_num_reqs))
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.next_rid = 0
        self.sampled: list[tuple[jax.Array, list[int]]] = []  # (next tokens, request id per row)
        self.buckets_seen: set[Any] = set()
        self.recompiles = 0
        self.compile_seconds = 0.0  # host time of the steps that compiled
        self.requests: dict[int, Request] = {}

    def _arrive(self) -> None:
        cfg = self.cfg
        if self.rng.random() < cfg.arrival_prob:
            n = int(self.rng.integers(cfg.prompt_len[0], cfg.prompt_len[1] + 1))
            new = int(self.rng.integers(cfg.new_tokens[0], cfg.new_tokens[1] + 1))
            new = min(new, cfg.max_model_len - n + 1)  # the cache holds prompt + new - 1 tokens
            req = Request(self.next_rid, self.rng.integers(0, cfg.vocab, n).tolist(), new)
            self.requests[req.rid] = req
            self.waiting.append(req)
            self.next_rid += 1

    def _schedule(self) -> list[tuple[Request, int]]:
        """Rows of this step, decodes first: (request, new tokens)."""
        cfg = self.cfg
        rows = [(r, 1) for r in self.running]
        budget = cfg.max_num_tokens - len(rows)
        while self.waiting and len(rows) < cfg.max_num_reqs:
            req = self.waiting[0]
            pages = -(-(len(req.prompt) + req.max_new - 1) // cfg.block_size)
            if len(req.prompt) > budget or pages > len(self.free_pages) or not self.free_slots:
                break
            self.waiting.pop(0)
            req.pages = [self.free_pages.pop() for _ in range(pages)]  # reserved for its whole life
            req.slot = self.free_slots.pop()
            rows.append((req, len(req.prompt)))
            budget -= len(req.prompt)
        return rows

    def _batch(self, rows: list[tuple[Request, int]]) -> tuple[attnsync.Batch, np.ndarray, np.ndarray]:
        cfg = self.cfg
        n = len(rows)
        table = np.zeros((n, self.width), dtype=np.int32)
        query_lens = np.empty(n, np.int32)
        seq_lens = np.empty(n, np.int32)
        prefilling = np.empty(n, bool)
        prompt_ids, slots = [], []
        for i, (req, q) in enumerate(rows):
            table[i, : len(req.pages)] = req.pages
            query_lens[i] = q
            seq_lens[i] = req.num_computed + q
            prefilling[i] = req.generated == 0
            prompt_ids.extend(req.prompt if req.generated == 0 else [-1])
            slots.append(req.slot)
        batch = attnsync.Batch(query_lens=query_lens, seq_lens=seq_lens, block_table=table,
                               block_size=cfg.block_size, is_prefilling=prefilling)
        return batch, np.asarray(prompt_ids, np.int32), np.asarray(slots, np.int32)

    def step(self) -> int:
        """One serving step; returns the tokens it sampled."""
        cfg = self.cfg
        self._arrive()
        rows = self._schedule()
        if not rows:
            return 0
        batch, prompt_ids, slots = self._batch(rows)
        bucket = self.ladder.bucket_for(batch)
        md = attnsync.build(self.ladder.pad(batch, bucket))
        jmd = asj.lower(md, self.device, bucket=bucket)
        # The step's other host input, one explicit transfer: prompt ids (-1 for decode tokens)
        # padded to the bucket's tokens, then each row's request slot (padded rows: the spare).
        inputs = np.full(bucket.num_tokens + bucket.num_reqs, -1, np.int32)
        inputs[: len(prompt_ids)] = prompt_ids
        inputs[bucket.num_tokens : bucket.num_tokens + len(slots)] = slots
        inputs[bucket.num_tokens + len(slots) :] = cfg.max_num_reqs
        before, start = compile_count(), time.perf_counter()
        self.caches, self.last_tokens, next_tokens = self.step_fn(
            self.params, self.caches, self.last_tokens, jmd, jax.device_put(inputs, self.device)
        )
        if compile_count() > before:
            self.compile_seconds += time.perf_counter() - start
            if bucket in self.buckets_seen:
                self.recompiles += compile_count() - before
        self.buckets_seen.add(bucket)
        self.sampled.append((next_tokens, [req.rid for req, _ in rows]))
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
        return len(rows)

    def outputs(self) -> dict[int, list[int]]:
        """Every request's sampled tokens (fetched from the device once, here)."""
        tokens: dict[int, list[int]] = {}
        fetched = jax.device_get([t for t, _ in self.sampled])
        for values, (_, rids) in zip(fetched, self.sampled, strict=True):
            for row, rid in enumerate(rids):
                tokens.setdefault(rid, []).append(int(values[row]))
        return tokens


def run_server(cfg: ServerConfig, *, device: Any = None, check: bool = False) -> dict[str, Any]:
    """Run `cfg.steps` steps; return the statistics (and, with `check`, the dense comparison)."""
    server = Server(cfg, device)
    compiles_before = compile_count()
    start = time.perf_counter()
    generated = 0
    with jax.transfer_guard("disallow"):
        for _ in range(cfg.steps):
            generated += server.step()
    jax.block_until_ready(server.last_tokens)
    wall = time.perf_counter() - start
    outputs = server.outputs()
    stats: dict[str, Any] = {
        "device": str(server.device),
        "steps": cfg.steps,
        "tokens": generated,
        "seconds": wall,
        "tokens_per_s": generated / wall if wall > 0 else 0.0,
        "tokens_per_s_warm": generated / max(wall - server.compile_seconds, 1e-9),
        "requests": server.next_rid,
        "finished": len(server.finished),
        "buckets": len(server.buckets_seen),
        "compiles": compile_count() - compiles_before,
        "recompiles": server.recompiles,
    }
    if check:
        mismatched = []
        for req in server.finished:
            want = dense_generate(server.params, req.prompt, req.max_new, cfg)
            if outputs[req.rid] != want:
                mismatched.append(req.rid)
        stats["checked"] = len(server.finished)
        stats["mismatched"] = mismatched
    stats["outputs"] = {rid: outputs.get(rid, []) for rid in sorted(server.requests)}
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=ServerConfig.steps)
    parser.add_argument("--layers", type=int, default=ServerConfig.layers)
    parser.add_argument("--seed", type=int, default=ServerConfig.seed)
    parser.add_argument("--check", action="store_true", help="compare with a dense recomputation")
    args = parser.parse_args(argv)
    cfg = ServerConfig(steps=args.steps, layers=args.layers, seed=args.seed)
    stats = run_server(cfg, check=args.check)
    print(f"device {stats['device']}: {stats['tokens']} tokens in {stats['steps']} steps, "
          f"{stats['seconds']:.2f} s: {stats['tokens_per_s']:.0f} tokens/s, "
          f"{stats['tokens_per_s_warm']:.0f} tokens/s without the steps that compiled")
    print(f"requests {stats['requests']}, finished {stats['finished']}; buckets {stats['buckets']}, "
          f"compiles {stats['compiles']}, recompiles {stats['recompiles']}")
    if args.check:
        print(f"dense check: {stats['checked'] - len(stats['mismatched'])}/{stats['checked']} requests "
              f"match token for token")
    return 0 if stats["recompiles"] == 0 and not stats.get("mismatched") else 1


if __name__ == "__main__":
    raise SystemExit(main())
