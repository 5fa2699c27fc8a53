"""Session 8: why did the second stall measurement of four pinned-table lowerings read 50 ms?"""
import time, sys
import numpy as np, torch, attnsync
from attnsync.testing import host_time_under_busy_gpu, assert_no_host_stall, no_sync, count_h2d_copies
from attnsync.adapters import torch as ast, _pinned_tables as pt
sys.path.insert(0, 'tests/gpu')
from test_pinned_tables_gpu import decode_batch, got_of, expected_of
cuda = torch.device('cuda', 0)
ast.Stager(cuda)
pool = pt.POOL
made = [0]
orig = ast._Reusable.__init__
def counting(self, *a, **k):
    made[0] += 1; orig(self, *a, **k)
ast._Reusable.__init__ = counting
batch = decode_batch(1)
for _ in range(3): ast.lower(attnsync.build(batch), cuda)
torch.cuda.synchronize()
count, out = count_h2d_copies(lambda: ast.lower(attnsync.build(batch), cuda))
del out
steps = [decode_batch(100 + k) for k in range(4)]
stager, _ = ast._stager_for(cuda, None)
def step(log=None):
    for b in steps:
        t = time.perf_counter(); c = pool.copies; m = made[0]; w = stager.stats.event_waits
        blk = pool.block_of(b.block_table, 0)
        ev = None if blk is None else (blk.event is not None and not blk.event.query())
        ast.lower(attnsync.build(b), cuda)
        if log is not None: log.append((round((time.perf_counter()-t)*1e3, 3), pool.copies - c, made[0] - m, stager.stats.event_waits - w, blk is not None, ev))
for attempt in range(4):
    log = []
    with no_sync():
        e, _ = host_time_under_busy_gpu(lambda: step(log))
    print(attempt, round(e, 3), log, 'blocks', len(pool.blocks), flush=True)
