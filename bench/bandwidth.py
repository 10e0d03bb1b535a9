"""Memory read bandwidth, STREAM-like: how many GB/s the cores can stream from a buffer far beyond the caches.

    python -m bench.bandwidth [--threads N] [--size-mib 1024] [--runs 5] [--kernel auto|avx2|scalar] [--json]

Token generation of a small model reads every weight once per token, so this figure over the bytes a token
reads is the generation speed no kernel can beat (bench/compare.py reports it as the roofline).

The read loop is C, compiled once on first use with cffi's API mode into ~/.cache/pyqrt-bench/bandwidth/ (or
$PYQRT_BENCH_CACHE), keyed by a hash of the source and the Python version; it is not part of pyqrt's core.
--threads pthreads (default: physical cores) each read their own contiguous slice of the buffer, with 32-byte
AVX2 loads when the CPU has them and portable 64-bit loads otherwise; each run is timed from a barrier that
starts every thread to one that sees the last of them finish, and the first run (the warm-up) is dropped.
GB/s are decimal (1e9 bytes per second). The buffer is allocated and filled in C, 2 MiB-aligned and marked for
transparent huge pages (MADV_HUGEPAGE), as pyqrt maps its model files: where the kernel gives them, both read with
one TLB entry per 2 MiB.
"""
import argparse
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile

BENCH_CACHE = os.environ.get("PYQRT_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyqrt-bench")

CDEF = """
void *bw_alloc(size_t bytes);
void bw_free(void *buf);
int bw_has_avx2(void);
size_t bw_read(const void *buf, size_t bytes, int threads, int reps, int use_avx2, double *seconds,
               uint64_t *checksum);
"""

C_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BW_X86 1
#endif

/* each thread reads this many bytes per loop turn: four independent 32-byte loads, so neither load latency
   nor the dependency chain of one accumulator limits the rate */
#define BW_STEP 128

typedef struct {
    const uint8_t *p;
    size_t n;
    int reps, use_avx2;
    uint64_t sum;
    pthread_barrier_t *start, *end;
} bw_slice;

static uint64_t read_scalar(const uint8_t *p, size_t n) {
    const uint64_t *q = (const uint64_t *)p;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i < n / 8; i += 4) { a ^= q[i]; b ^= q[i + 1]; c ^= q[i + 2]; d ^= q[i + 3]; }
    return a ^ b ^ c ^ d;
}

#ifdef BW_X86
__attribute__((target("avx2")))
static uint64_t read_avx2(const uint8_t *p, size_t n) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    for (size_t i = 0; i < n; i += BW_STEP) {
        a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(p + i)));
        b = _mm256_xor_si256(b, _mm256_load_si256((const __m256i *)(p + i + 32)));
        c = _mm256_xor_si256(c, _mm256_load_si256((const __m256i *)(p + i + 64)));
        d = _mm256_xor_si256(d, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    __m256i x = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, x);
    return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}
#endif

int bw_has_avx2(void) {
#ifdef BW_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

static void *bw_worker(void *arg) {
    bw_slice *s = arg;
    for (int r = 0; r < s->reps; r++) {
        pthread_barrier_wait(s->start);
#ifdef BW_X86
        s->sum ^= s->use_avx2 ? read_avx2(s->p, s->n) : read_scalar(s->p, s->n);
#else
        s->sum ^= read_scalar(s->p, s->n);
#endif
        pthread_barrier_wait(s->end);
    }
    return NULL;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void *bw_alloc(size_t bytes) {
    void *buf = NULL;
    /* 2 MiB-aligned and marked for huge pages, as pyqrt maps its model files (native/file.c): the roofline is then
       the bandwidth with one TLB entry per 2 MiB, not one per 4 KiB, which would flatter pyqrt's fraction of it */
    if (posix_memalign(&buf, 2u << 20, bytes)) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(buf, bytes, MADV_HUGEPAGE);
#endif
    /* written, not just allocated: untouched pages would all map the kernel's one zero page, which sits in cache;
       and with distinct contents, as weights are: pages of one repeated byte can be merged into one physical page
       by same-page merging (KSM, in this guest or its host), and then they too are read from cache */
    uint64_t *words = buf;
    for (size_t k = 0; k < bytes / 8; k++) words[k] = (uint64_t)k * 0x9E3779B97F4A7C15ull;
    return buf;
}

void bw_free(void *buf) { free(buf); }

/* seconds[r] for each of `reps` passes of `threads` threads over the buffer together; returns the bytes read
   per pass (each thread's slice cut to whole BW_STEP blocks), 0 on a bad argument or out of memory */
size_t bw_read(const void *buf, size_t bytes, int threads, int reps, int use_avx2, double *seconds,
               uint64_t *checksum) {
    if (!buf || threads < 1 || reps < 1 || ((uintptr_t)buf & 31)) return 0;
    const size_t per = bytes / (size_t)threads / BW_STEP * BW_STEP;
    if (per == 0) return 0;
    pthread_barrier_t start, end;
    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    pthread_barrier_init(&end, NULL, (unsigned)threads + 1);
    bw_slice *slices = calloc((size_t)threads, sizeof *slices);
    pthread_t *ids = calloc((size_t)threads, sizeof *ids);
    int ok = slices && ids;
    int started = 0;
    for (int t = 0; ok && t < threads; t++) {
        slices[t] = (bw_slice){(const uint8_t *)buf + (size_t)t * per, per, reps, use_avx2, 0, &start, &end};
        if (pthread_create(&ids[t], NULL, bw_worker, &slices[t])) ok = 0; else started++;
    }
    if (!ok) {
        /* the threads already started wait at a barrier sized for all of them, for ever: nothing to recover */
        if (started) abort();
        free(slices); free(ids);
        pthread_barrier_destroy(&start); pthread_barrier_destroy(&end);
        return 0;
    }
    for (int r = 0; r < reps; r++) {
        pthread_barrier_wait(&start);
        const double t0 = now_s();
        pthread_barrier_wait(&end);
        seconds[r] = now_s() - t0;
    }
    uint64_t sum = 0;
    for (int t = 0; t < threads; t++) { pthread_join(ids[t], NULL); sum ^= slices[t].sum; }
    *checksum = sum;
    free(slices); free(ids);
    pthread_barrier_destroy(&start); pthread_barrier_destroy(&end);
    return per * (size_t)threads;
}
"""


@contextlib.contextmanager
def _locked(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_extension(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled(cache_dir=None):
    """the compiled read loop (a cffi module with .ffi and .lib), built on first use into cache_dir"""
    import cffi
    cache_dir = cache_dir or os.path.join(BENCH_CACHE, "bandwidth")
    key = hashlib.sha256((CDEF + C_SOURCE + sys.version + cffi.__version__).encode()).hexdigest()[:12]
    name = f"_bandwidth_{key}"
    def built():     # _bandwidth_<key>.<abi tag>.so, as cffi names it
        return glob.glob(os.path.join(cache_dir, name + ".*so"))

    found = built()
    if not found:
        with _locked(os.path.join(cache_dir, "build.lock")):
            found = built()
            if not found:
                build_dir = tempfile.mkdtemp(prefix="build-", dir=cache_dir)
                try:
                    ffi = cffi.FFI()
                    ffi.cdef(CDEF)
                    ffi.set_source(name, C_SOURCE, extra_compile_args=["-O2", "-pthread"], libraries=["pthread"])
                    built = ffi.compile(tmpdir=build_dir)
                    dest = os.path.join(cache_dir, os.path.basename(built))
                    os.replace(built, dest)
                    found = [dest]
                finally:
                    shutil.rmtree(build_dir, ignore_errors=True)
    return _load_extension(name, found[0])


def measure(threads, size_bytes=1 << 30, runs=5, kernel="auto", cache_dir=None):
    """{"gbps": [one per run], "threads", "bytes" (read per run), "kernel"}; one extra first run is dropped"""
    module = compiled(cache_dir)
    ffi, lib = module.ffi, module.lib
    use_avx2 = {"auto": lib.bw_has_avx2(), "avx2": 1, "scalar": 0}[kernel]
    if use_avx2 and not lib.bw_has_avx2():
        raise RuntimeError("--kernel avx2: this CPU has no AVX2")
    buf = lib.bw_alloc(size_bytes)
    if buf == ffi.NULL:
        raise MemoryError(f"could not allocate {size_bytes / 2**20:.0f} MiB for the bandwidth buffer")
    try:
        seconds = ffi.new("double[]", runs + 1)
        checksum = ffi.new("uint64_t *")
        read = lib.bw_read(buf, size_bytes, threads, runs + 1, use_avx2, seconds, checksum)
        if not read:
            raise RuntimeError(f"bw_read failed ({threads} threads, {size_bytes} bytes)")
    finally:
        lib.bw_free(buf)
    return {"gbps": [read / seconds[r] / 1e9 for r in range(1, runs + 1)], "threads": threads, "bytes": read,
            "kernel": "avx2" if use_avx2 else "scalar"}


def main(argv=None):
    from bench.speed import physical_cores
    p = argparse.ArgumentParser(prog="python -m bench.bandwidth", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="reading threads (default: physical cores)")
    p.add_argument("--size-mib", type=int, default=1024, help="buffer size; keep it far beyond the last-level cache")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--kernel", choices=["auto", "avx2", "scalar"], default="auto")
    p.add_argument("--json", action="store_true", help="print the measurement as one JSON line instead")
    args = p.parse_args(argv)
    if args.runs < 1 or args.size_mib < 1:
        p.error("--runs and --size-mib must be at least 1")
    threads = args.threads or physical_cores()
    r = measure(threads, args.size_mib << 20, args.runs, args.kernel)
    if args.json:
        print(json.dumps(r))
    else:
        g = r["gbps"]
        print(f"read bandwidth: {statistics.median(g):.1f} GB/s median ({min(g):.1f}-{max(g):.1f}) over {args.runs} "
              f"runs; {threads} threads, {args.size_mib} MiB buffer, {r['kernel']} loads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
