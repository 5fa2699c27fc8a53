"""Quickstart: one serving step's attention metadata, built on the host, lowered to torch and JAX.

    python examples/quickstart.py          # on the CPU; on the GPU when torch sees one

Needs `pip install -e '.[torch,jax]'` (see README.md).
"""

import torch

import attnsync
from attnsync.adapters import jax as asj
from attnsync.adapters import torch as ast

# One step of three requests: two decodes (1 new token each) and a fresh 5-token prompt.
batch = attnsync.Batch(
    query_lens=[1, 1, 5],  # new tokens of each request this step
    seq_lens=[33, 17, 5],  # tokens in each sequence after this step
    block_table=[[7, 3, 9], [4, 2, 0], [8, 0, 0]],  # KV-cache pages of each request (0: unused)
    block_size=16,  # tokens per page
    padded_num_reqs=4,  # pad to a fixed bucket: same shapes every step,
    padded_num_tokens=8,  # so CUDA graphs and jit never see a new shape
)
md = attnsync.build(batch)  # numpy only: no device touched, no framework imported
print("host :", md.query_start_loc, "max_seq_len", md.max_seq_len, "decodes", md.num_decodes)

device = "cuda" if torch.cuda.is_available() else "cpu"
tmd = ast.lower(md, device=device)  # one pinned non_blocking copy; the host never waits
print("torch:", tmd.query_start_loc, tmd.slot_mapping, tmd.max_seq_len)

jmd = asj.lower(md)  # one packed int32 vector, one device_put; fields are static slices of it
print("jax  :", jmd.query_start_loc, jmd.seq_lens)
