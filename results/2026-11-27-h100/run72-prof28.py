"""Session 8: does the 256-decode lowering take the pinned-table path, and what does it cost?"""
import time, statistics, json, gc, sys
import numpy as np, torch, attnsync
from attnsync import _batch, _accel
from attnsync.adapters import torch as at, _pinned_tables as pt
perf = time.perf_counter_ns
dev = torch.device('cuda', 0)
at.Stager(dev)
pool = pt.POOL
def mk(step, rows=256, width=512):
    seq = 1 + (step * 37 + np.arange(rows) * 13) % (width * 16)
    table = ((step * 7919 + np.arange(rows * width, dtype=np.int64)) % (1 << 20)).astype(np.int32)
    return attnsync.Batch(query_lens=np.ones(rows, np.int32), seq_lens=seq.astype(np.int32), block_table=table.reshape(rows, width), block_size=16)
b = mk(0)
saved = _batch.table_memory; _batch.table_memory = None; bn = mk(0); _batch.table_memory = saved
print('pinned?', pool.block_of(b.block_table, 0) is not None, pool.block_of(bn.block_table, 0) is not None)
md, mdn = attnsync.build(b), attnsync.build(bn)
def drained(fn, n=300):
    for _ in range(20): fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); s = perf(); fn(); ts.append(perf() - s)
    return round(statistics.median(ts) / 1e3, 2)
c0 = pool.copies
r = {}
gc.disable()
for rnd in range(3):
    r[rnd] = {'probe': drained(lambda s=np.arange(256, dtype=np.int32): s + 1),
              'lower pinned': drained(lambda: at.lower(md, dev)),
              'lower numpy': drained(lambda: at.lower(mdn, dev)),
              'build+lower pinned': drained(lambda: at.lower(attnsync.build(b), dev)),
              'build+lower numpy': drained(lambda: at.lower(attnsync.build(bn), dev)),
              'Batch pinned': drained(lambda: attnsync.Batch(query_lens=b.query_lens, seq_lens=b.seq_lens, block_table=bn.block_table, block_size=16)),
              'copies': pool.copies - c0}
    print(rnd, r[rnd], flush=True)
# which path: call lower_step directly
stager, _ = at._stager_for(dev, None)
plan = at._plan_of(md)
ents = [p for p in stager._pools]
info = []
for p in stager._pools:
    for e in p[1:3]:
        if e is not None:
            info.append((e.table_position, e.num_staged, e.copy_args[2], [n for n, _ in e.pack_pairs][:3], e.fast is not None))
print('entries', info)
blk = pool.block_of(b.block_table, 0)
print('block', blk and (blk.capacity, blk.event))
# diag of the delayed loop, unguarded
def delayed(steps, unguarded):
    if unguarded:
        orig_free, orig_q = pt._Block.free, pt._event_query
        pt._Block.free = lambda block: sys.getrefcount(block.whole) == block.baseline
    c = pool.copies; w = stager.stats.event_waits; pend = 0
    torch.cuda.synchronize()
    ins = []
    for k in range(steps):
        x = mk(2000 + k); ins.append(dict(query_lens=np.array(x.query_lens), seq_lens=np.array(x.seq_lens), block_table=np.array(x.block_table), block_size=16))
    del x
    torch.cuda.synchronize()
    for k in range(steps):
        torch.cuda._sleep(2_000_000)
        bb = attnsync.Batch(**ins[k])
        blk = pool.block_of(bb.block_table, 0)
        out = at.lower(attnsync.build(bb), dev)
        del out, bb
    torch.cuda.synchronize()
    if unguarded: pt._Block.free = orig_free
    return {'copies': pool.copies - c, 'event_waits': stager.stats.event_waits - w, 'blocks': len(pool.blocks), 'declined': pool.declined}
print('guarded', delayed(60, False))
print('unguarded', delayed(60, True))
print('PROF28 ' + json.dumps({'device': torch.cuda.get_device_name(), 'rounds': r}))
