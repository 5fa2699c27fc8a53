"""Device-side integer expressions at the edge of what `Batch` accepts (lengths near 2**31 - 1).

The host derives page counts in wide Python/numpy arithmetic; the device forms (torch on the
CPU, JAX on the CPU) must give the same values, without an int32 wrap on the way.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnsync

BS = 1 << 20  # the longest sequence then needs 2048 pages: a table that fits a test
LENGTHS = [2**31 - 1, 2**31 - BS, 2**31 - BS - 1, 2**31 - BS + 1, 1, 0]


def _edge_batch():
    """Rows whose `seq_len + block_size - 1` passes 2**31 - 1. Such a row needs 2**31 / BS
    pages while slot ids that fit int32 leave only 2**31 / BS - 1 pages besides page 0, so it
    holds some pages twice (its last columns repeat pages 1, 2); rows reuse each other's ids (the
    default check level accepts both; the device forms must match the host anyway)."""
    lens = np.array(LENGTHS, dtype=np.int64)
    pages = -(-lens // BS)
    num_pages = 2**31 // BS - 1  # flex: num_cache_pages * BS slots must fit int32
    width = int(pages.max())
    table = np.zeros((len(lens), width), dtype=np.int32)
    for r, n in enumerate(pages):
        table[r, :n] = np.arange(n) % (num_pages - 1) + 1
    q = np.minimum(lens, 1)
    batch = attnsync.Batch(query_lens=q, seq_lens=lens, block_table=table, block_size=BS,
                           num_cache_pages=num_pages)
    return batch, pages, num_pages


def _host_inverse(table, pages, num_pages):
    out = np.full((table.shape[0], num_pages), -1, dtype=np.int32)
    for r, n in enumerate(pages):
        for column in range(n):  # a page held twice: its larger logical column (scatter-max)
            out[r, table[r, column]] = max(out[r, table[r, column]], column)
    out[:, 0] = -1
    return out


def test_torch_device_page_counts_and_inverse_table_do_not_wrap():
    torch = pytest.importorskip("torch")
    from attnsync.integrations import flex_torch

    batch, pages, num_pages = _edge_batch()
    seq = torch.tensor(batch.seq_lens)
    assert flex_torch._pages_of(seq, BS).tolist() == pages.tolist()
    assert int(flex_torch._pages_of(torch.tensor([2**31 - 1], dtype=torch.int32), 1)) == 2**31 - 1
    inverse = flex_torch.physical_to_logical_device(torch.tensor(batch.block_table), seq, BS, num_pages)
    expected = _host_inverse(batch.block_table, pages, num_pages)
    assert (inverse.numpy() == expected).all()
    assert (inverse.numpy() == flex_torch._naive_physical_to_logical(
        torch.tensor(batch.block_table), seq, BS, num_pages).numpy()).all()
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(batch.query_lens)]).astype(np.int32))
    offset, per_seq = flex_torch._row_fields_device(qsl, seq, BS)
    assert per_seq.tolist() == pages.tolist()
    assert offset.tolist() == (batch.seq_lens - batch.query_lens).tolist()


def test_torch_flex_lowering_matches_the_host_at_the_edge():
    pytest.importorskip("torch")
    from attnsync.integrations import flex_torch

    batch, pages, num_pages = _edge_batch()
    md = attnsync.build(batch, backend="flex", num_cache_pages=num_pages)
    host = md.physical_to_logical
    assert (np.asarray(host) == _host_inverse(batch.block_table, pages, num_pages)).all()
    assert md.num_blocks_per_seq.tolist() == pages.tolist()
    import torch

    tmd = flex_torch.lower(md, "cpu", seq_lens=torch.tensor(batch.seq_lens))  # recomputed on the device
    assert (tmd.physical_to_logical.numpy() == host).all()
    assert tmd.num_blocks_per_seq.tolist() == pages.tolist()
    assert (tmd.num_blocks_per_seq >= 0).all()


def test_jax_inverse_table_and_positions_do_not_wrap():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from attnsync.kernels import flex_jax

    batch, pages, num_pages = _edge_batch()
    inverse = flex_jax.physical_to_logical_jax(jnp.asarray(batch.block_table), jnp.asarray(batch.seq_lens),
                                               block_size=BS, num_pages=num_pages)
    assert (np.asarray(inverse) == _host_inverse(batch.block_table, pages, num_pages)).all()
    # block lists: the last token of the longest row sits at position 2**31 - 2, page column 2047
    md = attnsync.build(batch, backend="flex", num_cache_pages=num_pages)
    qsl = jnp.asarray(md.query_start_loc)
    doc_ids = flex_jax.doc_ids_jax(qsl, num_tokens=md.num_actual_tokens)
    counts, indices = flex_jax.kv_blocks_jax(
        doc_ids, qsl, jnp.asarray(md.decode_offset), jnp.asarray(md.block_table), block_size=BS,
        q_block_size=md.q_block_size, max_pages=md.block_table.shape[1], num_pages=num_pages,
        width=md.max_kv_blocks)
    assert np.asarray(counts).tolist() == np.asarray(md.kv_num_blocks).tolist()
    assert (np.asarray(indices) == np.asarray(md.kv_indices)).all()
