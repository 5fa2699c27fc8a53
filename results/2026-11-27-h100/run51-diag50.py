"""Session 6: host time of build + lower + plan under a queued 100 ms kernel, 20 times, with the
lowerings made counted (is a fresh lowering, i.e. a pinned allocation, made inside the probe?)."""
import sys, json
sys.path.insert(0, 'tests'); sys.path.insert(0, 'tests/gpu')
import torch, attnsync
from attnsync.adapters import torch as ast
from attnsync.adapters.flashinfer_plan import plan
from attnsync.testing import host_time_under_busy_gpu
import test_flashinfer_gpu as t
made = []
orig = ast._Reusable.__init__
def counting(self, *a, **k):
    made.append(1); orig(self, *a, **k)
ast._Reusable.__init__ = counting
name = "bf16-gqa"
import flashinfer
ws = torch.empty(128 << 20, dtype=torch.uint8, device='cuda')
dw = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
pw = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device='cuda'), "NHD")
batch = t.BATCHES["mixed"]()
def step():
    md = attnsync.build(batch, backend="flashinfer")
    tmd = ast.lower(md, device="cuda")
    plan(tmd, decode_wrapper=dw, prefill_wrapper=pw, **t.plan_args(name))
    return md, tmd
for _ in range(3): step()
torch.cuda.synchronize()
out = []
for i in range(20):
    before = len(made)
    ms, _ = host_time_under_busy_gpu(step, sleep_ms=100.0)
    torch.cuda.synchronize()
    out.append((round(ms, 3), len(made) - before))
print('DIAG50 ' + json.dumps(out))
