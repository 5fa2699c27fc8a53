"""Paged-attention kernels that consume attnsync metadata directly.

Each module is opt-in and imports its own framework; this package imports nothing so that
``import attnsync.kernels`` stays as light as ``import attnsync``.

* :mod:`attnsync.kernels.reference` -- float64 numpy reference, one request at a time. Needs
  numpy only; it is the ground truth every other kernel is tested against.
* :mod:`attnsync.kernels.triton_attention` -- Triton paged attention (2D path for mixed batches,
  split-KV path plus a reduce kernel for small decode batches, optional tree bias).
  ``paged_attention_from_metadata`` runs it from the torch lowering of the ``triton`` backend.
  Imports ``torch`` and ``triton``.
* :mod:`attnsync.kernels.jax_attention` -- pure ``jax.numpy`` paged attention with static shapes,
  jit-compiled; ``paged_attention_jax_from_metadata`` runs it from the JAX lowering of the
  ``triton`` backend. Imports ``jax``.

Backend-specific consumers, each checked against its own float64 reference:

* :mod:`attnsync.kernels.tree_reference` -- tree attention: float64 reference (numpy), torch
  consumer, and ``tree_paged_attention_triton`` (the Triton kernel above with the tree bias).
  :mod:`attnsync.kernels.tree_jax` is the JAX consumer.
* :mod:`attnsync.kernels.flex_jax` -- JAX reference attention driven by the ``flex`` backend's
  block-sparse metadata (the torch side is :mod:`attnsync.integrations.flex_torch`).
* :mod:`attnsync.kernels.mamba_reference` / :mod:`attnsync.kernels.mamba_jax` -- Mamba2 chunked
  scan (SSD) and varlen causal conv1d driven by the ``mamba`` metadata, with float64
  sequential oracles.
* :mod:`attnsync.kernels.turboquant` / :mod:`attnsync.kernels.turboquant_jax` -- the k8v4
  quantized cache, its Triton decode and prefill paths, and a JAX reference.

The three paged-attention modules above read the same metadata contract:

* ``query_start_loc``: shape [R + 1], int32, non-decreasing, ``query_start_loc[0] == 0``.
* ``seq_lens``: shape [R], int32, total context of each row including this step's new tokens.
* ``block_table``: shape [R, W], int32 page ids; absolute position ``p`` of row ``r`` lives in
  page ``block_table[r, p // block_size]`` at offset ``p % block_size``.
* ``k_cache`` / ``v_cache``: shape [num_blocks, block_size, Hkv, D].
* ``q``: shape [T, Hq, D] with ``Hq % Hkv == 0`` (q head ``h`` reads kv head ``h // (Hq // Hkv)``).
* optional ``sliding_window`` and ``prefix_ranges`` (shape [R, max_ranges, 2], int32, half-open
  bidirectional ranges ``[start, end)``, padded with ``(0, 0)``).
* optional ``qq_bias`` (shape [L, L], float32, reference and Triton only) for the first
  ``num_qq_bias_rows`` rows: added to the logits between a row's queries and its draft block
  (its last ``q_len`` keys), for tree attention.

Masking is causal (query at absolute position ``p`` sees keys ``k <= p``), restricted by the
sliding window (``p - k < sliding_window``) and then OR-ed with the prefix-range visibility (a
query inside a range sees every key of that range, including later ones, regardless of the
window). Keys at or beyond ``seq_lens[r]`` are never visible.
"""
