/* kvcache.c - how the KV cache stores a key or value vector (docs/QUANTIZATION.md, "KV cache").
 *
 * The cache holds one row of head_dim values per (position slot, kv head), in one of four row types: float32,
 * float16, 8-bit (int8 codes with a float32 absmax scale per group of values) or 4-bit QRazor SDR (an int8 base
 * with one float32 scale per row, razored to a 4-bit window and a shift per group of values). A row type is three
 * functions:
 *   store(row, x, n)     quantize the float vector x[n] into a row
 *   dot(q, row, n)       q · row, a float query against a stored key
 *   axpy(y, a, row, n)   y += a · row, a softmax weight times a stored value
 * Attention calls them row by row, so no cache is ever dequantized into a float buffer.
 *
 * Groups (8bit scales, 4bit shifts) run along head_dim: qrz_kv_group(n) values each, the last one shorter when the
 * group does not divide n.
 *
 * The scalar functions here are the reference. kernels_avx2.c fills the AVX2 column of qrz_kv; a member left NULL
 * for an ISA (every NEON one, for now) is taken from the scalar column by qrz_kv_ops_for. float32 rows go through
 * qrz_vec, the float kernels attention always used, so an f32 cache computes exactly what it did before.
 */
#include "qrz_internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline float get_f32(const void *p) { float f; memcpy(&f, p, sizeof f); return f; }   /* rows are not aligned */
static inline void put_f32(void *p, float f) { memcpy(p, &f, sizeof f); }

static float absmax(const float *x, int n) {
    float amax = 0.0f;
    for (int k = 0; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    return amax;
}

/* absmax codes: s = absmax/lim, code = round(clamp(x/s, -lim, lim)) (half to even), all zero when s is 0 */
static inline int base_code(float x, float s, float lim) {
    return s > 0.0f ? (int)nearbyintf(fminf(lim, fmaxf(-lim, x / s))) : 0;
}

static inline int kv_groups(int n, int G) { return (n + G - 1) / G; }

/* ---- f32: the float kernels of qrz_vec, one wrapper per ISA column ---- */
static void f32_store(void *row, const float *x, int n) { memcpy(row, x, (size_t)n * sizeof(float)); }

#define F32_VIA_VEC(ISA, SUFFIX)                                                                                 \
    static float f32_dot_##SUFFIX(const float *q, const void *row, int n) { return qrz_vec[ISA].dot(q, row, n); } \
    static void f32_axpy_##SUFFIX(float *y, float a, const void *row, int n) { qrz_vec[ISA].axpy(y, a, row, n); }
F32_VIA_VEC(QRZ_ISA_SCALAR, scalar)
F32_VIA_VEC(QRZ_ISA_AVX2, avx2)
F32_VIA_VEC(QRZ_ISA_NEON, neon)

/* ---- f16: IEEE half, round to nearest even; values beyond the half range saturate to +-65504 ---- */
#define F16_MAX 65504.0f

static void f16_store(void *row, const float *x, int n) {
    uint16_t *h = row;
    for (int k = 0; k < n; k++) h[k] = qrz_f32_to_f16(fminf(F16_MAX, fmaxf(-F16_MAX, x[k])));
}

static float f16_dot(const float *q, const void *row, int n) {
    const uint16_t *h = row;
    float acc = 0.0f;
    for (int k = 0; k < n; k++) acc += q[k] * qrz_f16_to_f32(h[k]);
    return acc;
}

static void f16_axpy(float *y, float a, const void *row, int n) {
    const uint16_t *h = row;
    for (int k = 0; k < n; k++) y[k] += a * qrz_f16_to_f32(h[k]);
}

/* ---- 8bit: [float32 d x ng][int8 codes x n]; group g (values gG .. gG+G-1) has d_g = absmax(group)/127, value
 * k of the group d_g * c_k. Scales first, so the codes of a row are contiguous whatever G. ---- */
static void q8_store(void *row, const float *x, int n) {
    const int G = qrz_kv_group(n), ng = kv_groups(n, G);
    uint8_t *d = row;
    int8_t *c = (int8_t *)row + 4 * ng;
    for (int g = 0; g < ng; g++) {
        const int k0 = g * G, k1 = n - k0 < G ? n : k0 + G;
        const float s = absmax(x + k0, k1 - k0) / 127.0f;
        put_f32(d + 4 * g, s);
        for (int k = k0; k < k1; k++) c[k] = (int8_t)base_code(x[k], s, 127.0f);
    }
}

static float q8_dot(const float *q, const void *row, int n) {
    const int G = qrz_kv_group(n), ng = kv_groups(n, G);
    const int8_t *c = (const int8_t *)row + 4 * ng;
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const int k0 = g * G, k1 = n - k0 < G ? n : k0 + G;
        float sum = 0.0f;
        for (int k = k0; k < k1; k++) sum += q[k] * (float)c[k];
        acc += sum * get_f32((const uint8_t *)row + 4 * g);
    }
    return acc;
}

static void q8_axpy(float *y, float a, const void *row, int n) {
    const int G = qrz_kv_group(n), ng = kv_groups(n, G);
    const int8_t *c = (const int8_t *)row + 4 * ng;
    for (int g = 0; g < ng; g++) {
        const int k0 = g * G, k1 = n - k0 < G ? n : k0 + G;
        const float as = a * get_f32((const uint8_t *)row + 4 * g);
        for (int k = k0; k < k1; k++) y[k] += as * (float)c[k];
    }
}

/* ---- 4bit, QRazor SDR: [float32 s][shift nibbles x ceil(ng/2)][mantissa nibbles x ceil(n/2)]
 * An int8 base per row, b = round(clamp(x/s, -127, 127)) with s = absmax(row)/127 (8bit's codes with one scale for
 * the whole row), is razored per group of G values: e = max(0, msb(max |b|) - 2) (0..4), and each value keeps the
 * 4-bit window m = clamp(round(b / 2^e), -8, 7); value s * 2^e * m. Group g's shift is the low nibble of shift byte
 * g/2 when g is even, the high one when odd; value k's mantissa, stored as m + 8, likewise in mantissa byte k/2.
 * (An int16 base, shifts 0..12, was measured against this one and gave no better perplexity: docs/QUANTIZATION.md.)
 * ---- */
static inline int nibble(const uint8_t *p, int k) { return (p[k >> 1] >> ((k & 1) * 4)) & 15; }

static void sdr4_store(void *row, const float *x, int n) {
    const int G = qrz_kv_group(n), ng = kv_groups(n, G);
    const float s = absmax(x, n) / 127.0f;
    uint8_t *e = (uint8_t *)row + 4, *m = e + (ng + 1) / 2;
    put_f32(row, s);
    memset(e, 0, (size_t)(ng + 1) / 2 + (size_t)(n + 1) / 2);
    for (int g = 0; g < ng; g++) {
        const int k0 = g * G, len = n - k0 < G ? n - k0 : G;
        int b[32], mx = 0;                                  /* G <= 32 */
        for (int k = 0; k < len; k++) {
            b[k] = base_code(x[k0 + k], s, 127.0f);
            mx = abs(b[k]) > mx ? abs(b[k]) : mx;
        }
        int lead = 0;
        while (mx >> (lead + 1)) lead++;                     /* msb; 0 for 0 and 1 */
        const int shift = lead > 2 ? lead - 2 : 0;
        e[g >> 1] |= (uint8_t)(shift << ((g & 1) * 4));
        const float step = 1.0f / (float)(1 << shift);      /* exact: b * step is b / 2^shift */
        for (int k = 0; k < len; k++) {
            const int mk = (int)fminf(7.0f, fmaxf(-8.0f, nearbyintf((float)b[k] * step)));
            m[(k0 + k) >> 1] |= (uint8_t)((mk + 8) << (((k0 + k) & 1) * 4));
        }
    }
}

static float sdr4_dot(const float *q, const void *row, int n) {
    const int G = qrz_kv_group(n), ng = kv_groups(n, G);
    const uint8_t *e = (const uint8_t *)row + 4, *m = e + (ng + 1) / 2;
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const int k0 = g * G, k1 = n - k0 < G ? n : k0 + G;
        float sum = 0.0f;
        for (int k = k0; k < k1; k++) sum += q[k] * (float)(nibble(m, k) - 8);
        acc += sum * (float)(1 << nibble(e, g));
    }
    return acc * get_f32(row);
}

static void sdr4_axpy(float *y, float a, const void *row, int n) {
    const int G = qrz_kv_group(n), ng = kv_groups(n, G);
    const uint8_t *e = (const uint8_t *)row + 4, *m = e + (ng + 1) / 2;
    const float as = a * get_f32(row);
    for (int g = 0; g < ng; g++) {
        const int k0 = g * G, k1 = n - k0 < G ? n : k0 + G;
        const float c = as * (float)(1 << nibble(e, g));
        for (int k = k0; k < k1; k++) y[k] += c * (float)(nibble(m, k) - 8);
    }
}

/* ---- the table ---- */
/* 32 values, or head_dim itself when it is at most 32; 16 when 32 does not divide head_dim (and a last group of
 * head_dim % 16 values when 16 does not either). Group starts are then multiples of 16 (the SIMD loads rely on it). */
int qrz_kv_group(int head_dim) { return head_dim <= 32 ? head_dim : (head_dim % 32 == 0 ? 32 : 16); }

uint64_t qrz_kv_row_bytes(int kv_type, int32_t head_dim) {
    if (head_dim <= 0 || head_dim > (1 << 16)) return 0;
    const uint64_t n = (uint64_t)head_dim;
    switch (kv_type) {
    case QRZ_KV_CACHE_F32: return 4 * n;
    case QRZ_KV_CACHE_F16: return 2 * n;
    case QRZ_KV_CACHE_Q8: return 4 * (uint64_t)kv_groups(head_dim, qrz_kv_group(head_dim)) + n;
    case QRZ_KV_CACHE_SDR4: {
        const uint64_t ng = (uint64_t)kv_groups(head_dim, qrz_kv_group(head_dim));
        return 4 + (ng + 1) / 2 + (n + 1) / 2;
    }
    default: return 0;
    }
}

const char *const qrz_kv_names[QRZ_KV_CACHE_COUNT] = {"f32", "f16", "8bit", "4bit"};

qrz_kv_ops qrz_kv[QRZ_KV_CACHE_COUNT][QRZ_ISA_COUNT] = {
    [QRZ_KV_CACHE_F32] = {[QRZ_ISA_SCALAR] = {f32_store, f32_dot_scalar, f32_axpy_scalar},
                          [QRZ_ISA_AVX2] = {f32_store, f32_dot_avx2, f32_axpy_avx2},
                          [QRZ_ISA_NEON] = {f32_store, f32_dot_neon, f32_axpy_neon}},
    [QRZ_KV_CACHE_F16] = {[QRZ_ISA_SCALAR] = {f16_store, f16_dot, f16_axpy}},
    [QRZ_KV_CACHE_Q8] = {[QRZ_ISA_SCALAR] = {q8_store, q8_dot, q8_axpy}},
    [QRZ_KV_CACHE_SDR4] = {[QRZ_ISA_SCALAR] = {sdr4_store, sdr4_dot, sdr4_axpy}},
};

qrz_kv_ops qrz_kv_ops_for(int kv_type, int isa) {
    qrz_types_init();             /* registers the SIMD columns */
    const qrz_kv_ops *ref = &qrz_kv[kv_type][QRZ_ISA_SCALAR];
    qrz_kv_ops ops = isa > 0 && isa < QRZ_ISA_COUNT ? qrz_kv[kv_type][isa] : *ref;
    if (!ops.store) ops.store = ref->store;
    if (!ops.dot) ops.dot = ref->dot;
    if (!ops.axpy) ops.axpy = ref->axpy;
    return ops;
}

void qrz_kv_dots(const qrz_kv_ops *ops, const float *q, const uint8_t *rows, size_t stride, int m, int n, float *out) {
    if (ops->dots) { ops->dots(q, rows, stride, m, n, out); return; }
    for (int t = 0; t < m; t++) out[t] = ops->dot(q, rows + (size_t)t * stride, n);
}

void qrz_kv_mix(const qrz_kv_ops *ops, float *y, const float *a, const uint8_t *rows, size_t stride, int m, int n) {
    if (ops->mix) { ops->mix(y, a, rows, stride, m, n); return; }
    memset(y, 0, (size_t)n * sizeof(float));
    for (int t = 0; t < m; t++) ops->axpy(y, a[t], rows + (size_t)t * stride, n);
}

/* ---- the entry point for the tests ---- */
int qrz_kernel_kv_rows(int isa, int kv_type, int32_t head_dim, const float *x, int32_t n_rows, const float *q,
                       const float *a, uint8_t *raw, float *rows_out, float *dots, float *axpy_out) {
    const uint64_t rb = qrz_kv_row_bytes(kv_type, head_dim);
    if (!rb || !x || n_rows <= 0 || (dots && !q) || (axpy_out && !a)) return QRZ_ERR_ARG;
    if (isa == QRZ_ISA_BEST) isa = qrz_isa_default();
    if (isa < 0 || isa >= QRZ_ISA_COUNT || !qrz_isa_supported(isa)) return QRZ_ERR_ARG;
    const qrz_kv_ops ops = qrz_kv_ops_for(kv_type, isa);
    uint8_t *rows = raw ? raw : malloc(rb * (uint64_t)n_rows);
    if (!rows) return QRZ_ERR_MEMORY;
    for (int32_t i = 0; i < n_rows; i++) ops.store(rows + rb * i, x + (size_t)i * head_dim, head_dim);
    for (int32_t i = 0; i < n_rows && rows_out; i++) {
        float *out = rows_out + (size_t)i * head_dim;
        memset(out, 0, (size_t)head_dim * sizeof(float));
        ops.axpy(out, 1.0f, rows + rb * i, head_dim);
    }
    /* attention's batched calls, over all the rows (axpy_out is overwritten, as attention's output is) */
    if (dots) qrz_kv_dots(&ops, q, rows, rb, n_rows, head_dim, dots);
    if (axpy_out) qrz_kv_mix(&ops, axpy_out, a, rows, rb, n_rows, head_dim);
    if (!raw) free(rows);
    return QRZ_OK;
}
