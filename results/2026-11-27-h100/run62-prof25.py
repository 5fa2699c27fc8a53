"""Session 7: does a huge-page pinned buffer make the lowering's 512 KB pack cheaper, in the
real pattern (two buffers in turn, each copied to the device between writes)?"""
import time, statistics, json, ctypes, mmap, os, sys
import numpy as np, torch
sys.path.insert(0, os.getcwd())
from attnsync.adapters import _cudart
perf = time.perf_counter_ns
torch.zeros(1, device='cuda'); torch.cuda.synchronize()
lib = ctypes.CDLL(_cudart._loaded_library_path('libcudart.so'))
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
NB = 512 * 1024
HUGE = 2 << 20
def huge_region(size):
    raw = libc.mmap(None, size + HUGE, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    base = (raw + HUGE - 1) // HUGE * HUGE
    rc = libc.madvise(base, size, 14)  # MADV_HUGEPAGE
    arr = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(base))
    arr[:] = 0
    reg = lib.cudaHostRegister(ctypes.c_void_p(base), ctypes.c_size_t(size), 0)
    return arr, rc, reg
region, rc, reg = huge_region(HUGE)
smaps = [l for l in open('/proc/self/smaps_rollup').read().splitlines() if 'AnonHuge' in l]
src = np.random.default_rng(0).integers(0, 1 << 20, NB // 4).astype(np.int32)
dev = torch.empty(NB, dtype=torch.uint8, device='cuda')
stream = torch.cuda.current_stream()
def pattern(bufs, drain, n=400):
    ts = []
    for i in range(n + 20):
        b = bufs[i % 2]
        if drain: torch.cuda.synchronize()
        s = perf(); np.copyto(b.view(np.int32), src); e = perf()
        lib.cudaMemcpyAsync(ctypes.c_void_p(dev.data_ptr()), ctypes.c_void_p(b.ctypes.data), ctypes.c_size_t(NB), 1, ctypes.c_void_p(stream.cuda_stream))
        if i >= 20: ts.append(e - s)
    torch.cuda.synchronize()
    return round(statistics.median(ts) / 1e3, 2)
pinned = [torch.empty(NB, dtype=torch.uint8, pin_memory=True).numpy() for _ in range(2)]
hp = [region[:NB], region[NB:2 * NB]]
plain = [np.zeros(NB, np.uint8) for _ in range(2)]
out = {'madvise rc': rc, 'cudaHostRegister rc': reg, 'smaps': smaps}
for rnd in range(3):
    for name, bufs in (('torch pinned (4 KB pages)', pinned), ('huge page, registered', hp), ('pageable np.zeros', plain)):
        for drain in (False, True):
            key = f'{name}, {"drained" if drain else "back to back"}'
            out.setdefault(key, []).append(pattern(bufs, drain))
    out.setdefault('hot copyto, same pinned buffer', []).append(
        round(statistics.median([(lambda s: (np.copyto(pinned[0].view(np.int32), src), perf() - s)[1])(perf()) for _ in range(400)]) / 1e3, 2))
print('PROF25 ' + json.dumps(out, indent=1))
