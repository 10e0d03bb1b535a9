/* cpu.c - what the CPU can do (checked once, at run time) and the thread pool.
 *
 * One build runs on any CPU of its architecture: SIMD kernels are compiled with per-function target
 * attributes and only chosen when cpuid says the CPU and the OS support them; on AArch64, NEON is baseline and the
 * default (kernels_neon.c picks its dot-product build from HWCAP). QRZ_FORCE_GENERIC=1 forces the scalar path,
 * which is how the tests cover it on a machine that has SIMD.
 */
#include "qrz_internal.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif

/* ---- instruction sets ---- */
static int cpu_has_avx2(void) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!(osxsave && avx && fma && f16c)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6) != 6) return 0;                 /* the OS saves XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
#else
    return 0;
#endif
}

/* cpuid leaf 7: subleaf 0 in b, c; subleaf 1 in a1 (0 where the CPU has no subleaf 1) */
static void cpuid7(unsigned *b, unsigned *c, unsigned *a1) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, d;
    __cpuid_count(7, 0, a, *b, *c, d);
    *a1 = 0;
    if (a >= 1) {
        unsigned b1, c1, d1;
        __cpuid_count(7, 1, *a1, b1, c1, d1);
    }
#else
    *b = *c = *a1 = 0;
#endif
}

/* AVX-VNNI: the VEX-encoded 256-bit vpdpbusd (cpuid 7.1 eax bit 4), on top of AVX2 */
static int cpu_has_avxvnni(void) {
    if (!cpu_has_avx2()) return 0;
    unsigned b, c, a1;
    cpuid7(&b, &c, &a1);
    return (a1 >> 4) & 1;
}

/* AVX-512 F (7.0 ebx bit 16), BW (bit 30), VL (bit 31) and VNNI (ecx bit 11), with the OS saving the opmask and
 * ZMM state (xcr0 bits 5-7) */
static int cpu_has_avx512(void) {
#if defined(__x86_64__) || defined(__i386__)
    if (!cpu_has_avx2()) return 0;
    unsigned b, c, a1;
    cpuid7(&b, &c, &a1);
    if (!(((b >> 16) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1) && ((c >> 11) & 1))) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xE6) == 0xE6;
#else
    return 0;
#endif
}

/* Advanced SIMD is part of the AArch64 base ISA: every aarch64 CPU (and OS) has it */
static int cpu_has_neon(void) {
#if defined(__aarch64__) && defined(__ARM_NEON)
    return 1;
#else
    return 0;
#endif
}

int qrz_isa_supported(int isa) {
    static int avx2 = -1, avxvnni = -1, avx512 = -1;
    if (avx2 < 0) { avx2 = cpu_has_avx2(); avxvnni = cpu_has_avxvnni(); avx512 = cpu_has_avx512(); }
    switch (isa) {
    case QRZ_ISA_SCALAR: return 1;
    case QRZ_ISA_AVX2: return avx2;
    case QRZ_ISA_NEON: return cpu_has_neon();
    case QRZ_ISA_AVXVNNI: return avxvnni;
    case QRZ_ISA_AVX512: return avx512;
    default: return 0;
    }
}

int qrz_isa_default(void) {
    const char *force = getenv("QRZ_FORCE_GENERIC");
    if (force && *force && strcmp(force, "0") != 0) return QRZ_ISA_SCALAR;
    if (qrz_isa_supported(QRZ_ISA_AVX512)) return QRZ_ISA_AVX512;
    if (qrz_isa_supported(QRZ_ISA_AVXVNNI)) return QRZ_ISA_AVXVNNI;
    if (qrz_isa_supported(QRZ_ISA_AVX2)) return QRZ_ISA_AVX2;
    if (qrz_isa_supported(QRZ_ISA_NEON)) return QRZ_ISA_NEON;
    return QRZ_ISA_SCALAR;
}

const char *qrz_isa_name(int isa) {
    switch (isa) {
    case QRZ_ISA_SCALAR: return "scalar";
    case QRZ_ISA_AVX2: return "avx2";
    case QRZ_ISA_NEON: return "neon";
    case QRZ_ISA_AVXVNNI: return "avxvnni";
    case QRZ_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}

/* physical cores: distinct (package, core) pairs; hyper-threads share a core's execution units, and the
 * matmuls here are bound by memory bandwidth, so a second thread per core only adds contention */
int qrz_physical_cores(void) {
    long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (n_cpu < 1) n_cpu = 1;
    int seen[1024][2], n_seen = 0;
    for (long cpu = 0; cpu < n_cpu && cpu < 1024; cpu++) {
        char path[128];
        int pkg = 0, core = -1;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%ld/topology/core_id", cpu);
        FILE *f = fopen(path, "r");
        if (!f) return (int)n_cpu;
        if (fscanf(f, "%d", &core) != 1) core = (int)cpu;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%ld/topology/physical_package_id", cpu);
        f = fopen(path, "r");
        if (f) { if (fscanf(f, "%d", &pkg) != 1) pkg = 0; fclose(f); }
        int dup = 0;
        for (int i = 0; i < n_seen; i++) dup |= seen[i][0] == pkg && seen[i][1] == core;
        if (!dup) { seen[n_seen][0] = pkg; seen[n_seen][1] = core; n_seen++; }
    }
    return n_seen > 0 ? n_seen : (int)n_cpu;
}

/* ---- thread pool ----
 * Workers spin on a generation counter for a while before sleeping on a condition variable: a forward pass
 * dispatches a few hundred small jobs per token, and waking a sleeping thread costs more than most of them. */
#define SPIN_BEFORE_SLEEP (1 << 15)

struct qrz_pool {
    int n;
    pthread_t *threads;
    _Atomic uint64_t generation;
    _Atomic int pending;
    qrz_task_fn fn;
    void *arg;
    int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

typedef struct { qrz_pool *pool; int ith; } worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void *worker_main(void *p) {
    worker_arg *wa = p;
    qrz_pool *pool = wa->pool;
    const int ith = wa->ith;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool->generation, memory_order_acquire) == seen) {
            if (++spins < SPIN_BEFORE_SLEEP) { cpu_relax(); continue; }
            /* idle for a while: sleep until the next job rather than burn a core others may need */
            pthread_mutex_lock(&pool->mu);
            while (atomic_load(&pool->generation) == seen && !pool->stop) pthread_cond_wait(&pool->cv, &pool->mu);
            pthread_mutex_unlock(&pool->mu);
            spins = 0;
            if (pool->stop) break;
        }
        if (pool->stop) return NULL;
        seen = atomic_load(&pool->generation);
        pool->fn(pool->arg, ith, pool->n);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
    }
    return NULL;
}

qrz_pool *qrz_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    qrz_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    pool->threads = calloc(n_threads, sizeof(pthread_t));
    if (!pool->threads) { free(pool); return NULL; }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) { pool->n = i; qrz_pool_free(pool); return NULL; }
        wa->pool = pool;
        wa->ith = i;
        if (pthread_create(&pool->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            pool->n = i;
            qrz_pool_free(pool);
            return NULL;
        }
    }
    return pool;
}

void qrz_pool_free(qrz_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    pool->stop = 1;
    atomic_fetch_add(&pool->generation, 1);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    free(pool->threads);
    free(pool);
}

int qrz_pool_size(const qrz_pool *pool) { return pool ? pool->n : 1; }

void qrz_pool_run(qrz_pool *pool, qrz_task_fn fn, void *arg) {
    if (!pool || pool->n == 1) { fn(arg, 0, 1); return; }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store(&pool->pending, pool->n - 1);
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    fn(arg, 0, pool->n);
    /* spin briefly, then yield: if the machine is oversubscribed, a worker we wait for may need our core */
    for (int spins = 0; atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_BEFORE_SLEEP) cpu_relax();
        else sched_yield();
    }
}
