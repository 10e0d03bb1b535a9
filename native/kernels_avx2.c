/* kernels_avx2.c - AVX2 + FMA + F16C matmul kernels, one per tensor type.
 *
 * Compiled with per-function target attributes (not -mavx2 for the file), so the rest of the library stays
 * runnable on any x86-64; cpu.c only routes here when cpuid says the CPU has these instructions.
 * Each kernel loads a weight row once and applies it to up to four activation rows, which is what makes the
 * prompt (many rows) path cheaper per token than decoding (one row).
 */
#include "qrz_internal.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

#define QRZ_AVX2 __attribute__((target("avx2,fma,f16c")))

QRZ_AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- F32 and F16: float FMA; the two differ only in how eight weights are loaded ---- */
QRZ_AVX2 static inline __m256 load8_f32(const void *w, int64_t c) { return _mm256_loadu_ps((const float *)w + c); }
QRZ_AVX2 static inline __m256 load8_f16(const void *w, int64_t c) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + c)));
}
static inline float scalar_f32(const void *w, int64_t c) { return ((const float *)w)[c]; }
static inline float scalar_f16(const void *w, int64_t c) { return qrz_f16_to_f32(((const uint16_t *)w)[c]); }

#define DEFINE_FLOAT_MATMUL(NAME, ELEM, LOAD8, SCALAR)                                                          \
    /* one weight row at a time, four activation rows per pass; handles every tail */                       \
    QRZ_AVX2 static void NAME##_rows(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, \
                                     int64_t ldy) {                                                           \
        const int64_t K = w->cols, K8 = K & ~(int64_t)7;                                                      \
        for (int64_t r = r0; r < r1; r++) {                                                                   \
            const void *wr = (const ELEM *)w->data + r * K;                                                   \
            int64_t i = 0;                                                                                    \
            for (; i + 4 <= x->n; i += 4) {                                                                   \
                const float *x0 = x->f32 + i * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;                   \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                   \
                for (int64_t c = 0; c < K8; c += 8) {                                                         \
                    const __m256 wv = LOAD8(wr, c);                                                           \
                    a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + c), a0);                                    \
                    a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + c), a1);                                    \
                    a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + c), a2);                                    \
                    a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + c), a3);                                    \
                }                                                                                             \
                float s0 = hsum8(a0), s1 = hsum8(a1), s2 = hsum8(a2), s3 = hsum8(a3);                         \
                for (int64_t c = K8; c < K; c++) {                                                            \
                    const float wc = SCALAR(wr, c);                                                           \
                    s0 += wc * x0[c]; s1 += wc * x1[c]; s2 += wc * x2[c]; s3 += wc * x3[c];                   \
                }                                                                                             \
                y[i * ldy + r] = s0; y[(i + 1) * ldy + r] = s1; y[(i + 2) * ldy + r] = s2;                    \
                y[(i + 3) * ldy + r] = s3;                                                                    \
            }                                                                                                 \
            for (; i < x->n; i++) {                                                                           \
                const float *xi = x->f32 + i * K;                                                             \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                                     \
                int64_t c = 0;                                                                                \
                for (; c + 16 <= K; c += 16) {                                                                \
                    a0 = _mm256_fmadd_ps(LOAD8(wr, c), _mm256_loadu_ps(xi + c), a0);                          \
                    a1 = _mm256_fmadd_ps(LOAD8(wr, c + 8), _mm256_loadu_ps(xi + c + 8), a1);                  \
                }                                                                                             \
                for (; c < K8; c += 8) a0 = _mm256_fmadd_ps(LOAD8(wr, c), _mm256_loadu_ps(xi + c), a0);       \
                float s = hsum8(_mm256_add_ps(a0, a1));                                                       \
                for (; c < K; c++) s += SCALAR(wr, c) * xi[c];                                                \
                y[i * ldy + r] = s;                                                                           \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    QRZ_AVX2 static void NAME(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,        \
                              int64_t ldy) {                                                                  \
        const int64_t K = w->cols, K8 = K & ~(int64_t)7;                                                      \
        if (x->n < 4) { NAME##_rows(w, x, r0, r1, y, ldy); return; }                                          \
        int64_t r = r0;                                                                                       \
        /* two weight rows x four activation rows: 8 accumulators, 6 loads per 8 FMAs */                      \
        for (; r + 2 <= r1; r += 2) {                                                                         \
            const void *wa = (const ELEM *)w->data + r * K, *wb = (const ELEM *)w->data + (r + 1) * K;         \
            int64_t i = 0;                                                                                    \
            for (; i + 4 <= x->n; i += 4) {                                                                   \
                const float *x0 = x->f32 + i * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;                   \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
                for (int64_t c = 0; c < K8; c += 8) {                                                         \
                    const __m256 va = LOAD8(wa, c), vb = LOAD8(wb, c);                                        \
                    __m256 xv = _mm256_loadu_ps(x0 + c);                                                      \
                    a0 = _mm256_fmadd_ps(va, xv, a0); b0 = _mm256_fmadd_ps(vb, xv, b0);                       \
                    xv = _mm256_loadu_ps(x1 + c);                                                             \
                    a1 = _mm256_fmadd_ps(va, xv, a1); b1 = _mm256_fmadd_ps(vb, xv, b1);                       \
                    xv = _mm256_loadu_ps(x2 + c);                                                             \
                    a2 = _mm256_fmadd_ps(va, xv, a2); b2 = _mm256_fmadd_ps(vb, xv, b2);                       \
                    xv = _mm256_loadu_ps(x3 + c);                                                             \
                    a3 = _mm256_fmadd_ps(va, xv, a3); b3 = _mm256_fmadd_ps(vb, xv, b3);                       \
                }                                                                                             \
                float s[8] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3), hsum8(b0), hsum8(b1), hsum8(b2), hsum8(b3)}; \
                for (int64_t c = K8; c < K; c++) {                                                            \
                    const float ca = SCALAR(wa, c), cb = SCALAR(wb, c);                                       \
                    s[0] += ca * x0[c]; s[1] += ca * x1[c]; s[2] += ca * x2[c]; s[3] += ca * x3[c];           \
                    s[4] += cb * x0[c]; s[5] += cb * x1[c]; s[6] += cb * x2[c]; s[7] += cb * x3[c];           \
                }                                                                                             \
                for (int t = 0; t < 4; t++) { y[(i + t) * ldy + r] = s[t]; y[(i + t) * ldy + r + 1] = s[4 + t]; } \
            }                                                                                                 \
            if (i < x->n) {                                                                                   \
                qrz_acts rest = *x;                                                                           \
                rest.n = x->n - i;                                                                            \
                rest.f32 = x->f32 + i * K;                                                                    \
                NAME##_rows(w, &rest, r, r + 2, y + i * ldy, ldy);                                            \
            }                                                                                                 \
        }                                                                                                     \
        if (r < r1) NAME##_rows(w, x, r, r1, y, ldy);                                                         \
    }

DEFINE_FLOAT_MATMUL(f32_matmul_avx2, float, load8_f32, scalar_f32)
DEFINE_FLOAT_MATMUL(f16_matmul_avx2, uint16_t, load8_f16, scalar_f16)

/* ---- Q8 weights x Q8 activations: int8 MACs per group, one float multiply-add per group ----
 * maddubs multiplies unsigned by signed bytes, so the weight's sign moves onto the activation first:
 * |w| * (x * sign(w)) = w * x. Pair sums stay below 2 * 127 * 127 < 32767, so the int16 step cannot saturate. */
QRZ_AVX2 static inline __m256i dot32_i8(__m256i w_abs, __m256i w, const int8_t *x) {
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    const __m256i p16 = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xv, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

static inline int32_t dot_tail_i8(const int8_t *w, const int8_t *x, int n) {
    int32_t s = 0;
    for (int k = 0; k < n; k++) s += (int32_t)w[k] * x[k];
    return s;
}

QRZ_AVX2 static void q8_matmul_avx2(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const int32_t G = w->group, G32 = G & ~31;
    const int64_t K = w->cols, ng = K / G;
    const uint16_t *scales = (const uint16_t *)w->data;
    const int8_t *quants = (const int8_t *)w->data + (((uint64_t)w->rows * ng * 2 + QRZ_ALIGN - 1) / QRZ_ALIGN) * QRZ_ALIGN;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wd = scales + r * ng;
        const int8_t *wq = quants + r * K;
        int64_t i = 0;
        for (; i + 4 <= x->n; i += 4) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            float tail[4] = {0, 0, 0, 0};
            for (int64_t g = 0; g < ng; g++) {
                const int8_t *wg = wq + g * G;
                __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
                for (int32_t k = 0; k < G32; k += 32) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(wg + k));
                    const __m256i wa = _mm256_sign_epi8(wv, wv);
                    for (int t = 0; t < 4; t++)
                        s[t] = _mm256_add_epi32(s[t], dot32_i8(wa, wv, x->q + (i + t) * K + g * G + k));
                }
                const float dw = _cvtsh_ss(wd[g]);
                for (int t = 0; t < 4; t++) {
                    const float dwx = dw * x->d[(i + t) * ng + g];
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dwx), _mm256_cvtepi32_ps(s[t]), acc[t]);
                    if (G32 < G) tail[t] += dwx * (float)dot_tail_i8(wg + G32, x->q + (i + t) * K + g * G + G32, G - G32);
                }
            }
            for (int t = 0; t < 4; t++) y[(i + t) * ldy + r] = hsum8(acc[t]) + tail[t];
        }
        for (; i < x->n; i++) {
            const int8_t *xq = x->q + i * K;
            const float *xd = x->d + i * ng;
            __m256 acc = _mm256_setzero_ps();
            float tail = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                const int8_t *wg = wq + g * G;
                __m256i s = _mm256_setzero_si256();
                for (int32_t k = 0; k < G32; k += 32) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(wg + k));
                    s = _mm256_add_epi32(s, dot32_i8(_mm256_sign_epi8(wv, wv), wv, xq + g * G + k));
                }
                const float dwx = _cvtsh_ss(wd[g]) * xd[g];
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dwx), _mm256_cvtepi32_ps(s), acc);
                if (G32 < G) tail += dwx * (float)dot_tail_i8(wg + G32, xq + g * G + G32, G - G32);
            }
            y[i * ldy + r] = hsum8(acc) + tail;
        }
    }
}

/* ---- attention vectors ---- */
QRZ_AVX2 static float dot_avx2(const float *a, const float *b, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float s = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

QRZ_AVX2 static void axpy_avx2(float *y, float a, const float *x, int n) {
    const __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

void qrz_register_avx2(void) {
    qrz_vec[QRZ_ISA_AVX2] = (qrz_vec_ops){dot_avx2, axpy_avx2};
    qrz_types[QRZ_TYPE_F32].matmul[QRZ_ISA_AVX2] = f32_matmul_avx2;
    qrz_types[QRZ_TYPE_F16].matmul[QRZ_ISA_AVX2] = f16_matmul_avx2;
    qrz_types[QRZ_TYPE_Q8].matmul[QRZ_ISA_AVX2] = q8_matmul_avx2;
}
#else
void qrz_register_avx2(void) {}
#endif
