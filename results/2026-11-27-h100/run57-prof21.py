"""Session 7 experiment: what a native CUDA step and huge-page pinned memory would save."""
import time, statistics, json, ctypes, mmap, os, sys, subprocess, sysconfig
import numpy as np, torch
here = os.path.dirname(os.path.abspath(__file__))
suffix = sysconfig.get_config_var('EXT_SUFFIX')
inc = sysconfig.get_paths()['include']
subprocess.check_call(['gcc', '-O2', '-shared', '-fPIC', '-I' + inc, os.path.join(here, 'x21.c'), '-o', '/tmp/x21' + suffix])
sys.path.insert(0, '/tmp'); import x21
def t(fn, n=5000, rounds=7):
    for _ in range(200): fn()
    r = []
    for _ in range(rounds):
        s = time.perf_counter_ns()
        for _ in range(n): fn()
        r.append((time.perf_counter_ns() - s) / n / 1e3)
    return round(statistics.median(r), 3)
out = {}
torch.zeros(1, device='cuda'); torch.cuda.synchronize()
print(open('/sys/kernel/mm/transparent_hugepage/enabled').read().strip(), open('/sys/kernel/mm/transparent_hugepage/defrag').read().strip())
small = np.arange(256, dtype=np.int32)
out['np add 256'] = t(lambda: small + 1)
out['empty lambda'] = t(lambda: None)
a33 = np.arange(33, dtype=np.int32); big = np.empty(10000, np.int32)
out['np.empty(33)'] = t(lambda: np.empty(33, dtype=np.int32))
out['slice'] = t(lambda: big[:33])
out['setflags'] = t(lambda: a33.setflags(write=False))
out['dict(25 kw)'] = t(lambda: dict(a=1,b=2,c=3,d=4,e=5,f=6,g=7,h=8,i=9,j=10,k=11,l=12,m=13,n=14,o=15,p=16,q=17,r=18,s=19,t=20,u=21,v=22,w=23,x=24,y=25))
out['{25 literal}'] = t(lambda: {'a':1,'b':2,'c':3,'d':4,'e':5,'f':6,'g':7,'h':8,'i':9,'j':10,'k':11,'l':12,'m':13,'n':14,'o':15,'p':16,'q':17,'r':18,'s':19,'t':20,'u':21,'v':22,'w':23,'x':24,'y':25})
arrs = [np.arange(33, dtype=np.int32) for _ in range(28)]
out['28 getbuffer, C-contig'] = t(lambda: x21.getbufs(arrs, 0x0020 | 0x0008 | 0x0010))
out['28 getbuffer, C-contig|FORMAT'] = t(lambda: x21.getbufs(arrs, 0x0020 | 0x0008 | 0x0010 | 0x0004))
# CUDA calls: ctypes vs C function pointer
sys.path.insert(0, os.getcwd())
from attnsync.adapters import _cudart
rt = _cudart.runtime()
lib = ctypes.CDLL(_cudart._loaded_library_path('libcudart.so'))
fmem = ctypes.cast(lib.cudaMemcpyAsync, ctypes.c_void_p).value
frec = ctypes.cast(lib.cudaEventRecord, ctypes.c_void_p).value
fq = ctypes.cast(lib.cudaEventQuery, ctypes.c_void_p).value
dev = torch.empty(8192, dtype=torch.uint8, device='cuda'); pin = torch.empty(8192, dtype=torch.uint8, pin_memory=True)
stream = torch.cuda.current_stream()
ev = torch.cuda.Event(); ev.record(stream)
evh = ev.cuda_event
args = (dev.data_ptr(), pin.data_ptr(), 8192, stream.cuda_stream)
er = torch._C._CudaEventBase.record; eq = torch._C._CudaEventBase.query
out['torch copy_ 8K'] = t(lambda: dev.copy_(pin, non_blocking=True))
out['ctypes memcpyAsync 8K'] = t(lambda: rt.copy_to_device(*args))
out['C fnptr memcpyAsync 8K'] = t(lambda: x21.copy(fmem, *args))
out['ctypes + torch event record'] = t(lambda: (rt.copy_to_device(*args), er(ev, stream)))
out['C fnptr memcpy + record'] = t(lambda: x21.copy_record(fmem, *args, frec, evh))
out['torch event query'] = t(lambda: eq(ev))
out['C fnptr event query'] = t(lambda: x21.query(fq, evh))
torch.cuda.synchronize()
# 512 KB copies
src = np.random.default_rng(0).integers(0, 1 << 20, 131072).astype(np.int32)
def thp_buffer(nbytes):
    m = mmap.mmap(-1, nbytes + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    off = (-base) % (2 << 20)
    libc = ctypes.CDLL(None)
    libc.madvise(ctypes.c_void_p(base + off), ctypes.c_size_t(nbytes), 14)  # MADV_HUGEPAGE
    arr = np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=off)
    arr[:] = 0
    return m, arr
nb = 512 * 1024
pinned = torch.empty(nb, dtype=torch.uint8, pin_memory=True).numpy()
m, thp = thp_buffer(nb)
reg = lib.cudaHostRegister(ctypes.c_void_p(thp.ctypes.data), ctypes.c_size_t(nb), 0)
pageable = np.empty(nb, np.uint8)
m2, thp_src = thp_buffer(nb); thp_src.view(np.int32)[:] = src
for name, dst in [('torch pinned', pinned), ('THP + cudaHostRegister (%d)' % reg, thp), ('pageable np.empty', pageable)]:
    d = dst.view(np.int32)
    out['copyto 512K -> ' + name] = t(lambda: np.copyto(d, src), n=500)
    out['copyto 512K THP src -> ' + name] = t(lambda: np.copyto(d, thp_src.view(np.int32)), n=500)
smaps = open('/proc/self/smaps_rollup').read()
out['AnonHugePages'] = [l for l in smaps.splitlines() if 'AnonHuge' in l]
out['np add 256 again'] = t(lambda: small + 1)
print('PROF21 ' + json.dumps(out, indent=1))
