/* kernels_avx2.c - AVX2 + FMA + F16C matmul kernels, one per tensor type.
 *
 * Compiled with per-function target attributes (not -mavx2 for the file), so the rest of the library stays
 * runnable on any x86-64; cpu.c only routes here when cpuid says the CPU has these instructions.
 * Each kernel loads a weight row once and applies it to up to four activation rows, which is what makes the
 * prompt (many rows) path cheaper per token than decoding (one row).
 */
#include "qrz_internal.h"
#if defined(__x86_64__) || defined(__i386__)
#include "kernels_x86.h"
#include <math.h>


QRZ_AVX2 static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* ---- 4-bit nibble planes: SDR and INT4 (docs/FORMAT.md, docs/QUANTIZATION.md) ----
 * A run of 32 codes is 16 bytes, byte j holding value j (low nibble) and value j + 16 (high nibble), stored as
 * m + 8. One broadcast load, a shift of the upper lane and a mask give the 32 values in order, so lanes 0-3 of a
 * madd result hold values 0..15 of the run and lanes 4-7 values 16..31. The weights are never expanded to float:
 * the codes go through the same sign trick as Q8 (|w| * (x * sign(w)) = w * x) into maddubs and madd.
 * Each kernel takes four activation rows (then the 1..3 left over) against all of its weight rows, so that block
 * of activations stays in L1 while the weight rows stream past; NT (activation rows) and RPG (32-value runs per
 * group) are compile-time constants of each specialization. */

/* Shift and multiplier vectors indexed by a byte holding two 4-bit fields, filled by qrz_register_avx2:
 * nib_shift_lo[b] / nib_shift_hi[b]: the low / high nibble of b in every int32 lane (the shifts of the two groups
 * of a flag byte, groups that are whole runs); nib_shift_pair[b]: the low nibble in lanes 0-3 (the first 16 values
 * of a run), the high nibble in lanes 4-7 (the last 16), for groups of 16; nib_pow_one[b] and nib_pow_pair[b]: the
 * same as powers of two in int16 lanes (pairs 0-7 and 8-15), for the activation shifts of SDR4_ROW (0..12, so
 * 2^e fits an int16 and a madd with them is the shift). */
static int32_t nib_shift_lo[256][8] __attribute__((aligned(32)));
static int32_t nib_shift_hi[256][8] __attribute__((aligned(32)));
static int32_t nib_shift_pair[256][8] __attribute__((aligned(32)));
static int16_t nib_pow_one[16][16] __attribute__((aligned(32)));
static int16_t nib_pow_pair[256][16] __attribute__((aligned(32)));

static void nib_tables_init(void) {
    for (int b = 0; b < 256; b++) {
        for (int l = 0; l < 8; l++) {
            nib_shift_lo[b][l] = b & 15;
            nib_shift_hi[b][l] = b >> 4;
            nib_shift_pair[b][l] = l < 4 ? (b & 15) : (b >> 4);
        }
        for (int l = 0; l < 16; l++) {
            const int e = l < 8 ? (b & 15) : (b >> 4);
            nib_pow_pair[b][l] = (int16_t)(e < 15 ? 1 << e : 0);   /* shifts above 12 never come from the quantizer */
            if (b < 16) nib_pow_one[b][l] = (int16_t)(b < 15 ? 1 << b : 0);
        }
    }
}

#define NIB_LOAD(p) _mm256_load_si256((const __m256i *)(p))

/* the 16 bytes in both lanes (a broadcast load), the upper lane shifted right by a nibble, then masked: the low
 * nibbles (values 0..15) in the lower lane, the high nibbles (16..31) in the upper one, as m = nibble - 8 */
QRZ_AVX2_INLINE __m256i nib_run(const uint8_t *p) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    const __m256i v = _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_sub_epi8(_mm256_and_si256(v, _mm256_set1_epi8(15)), _mm256_set1_epi8(8));
}

/* int16 pair sums of w * x over 32 codes. |w| <= 8 and |x| <= 127 keep each pair below 2032 in magnitude, so up
 * to 16 of these vectors add in int16 without wrapping (and maddubs never saturates) */
QRZ_AVX2_INLINE __m256i nib_dot16(__m256i w_abs, __m256i w, const int8_t *x) {
    return _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x), w));
}

QRZ_AVX2_INLINE __m256i widen16(__m256i v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }

/* the int16 pair sums of `runs` consecutive runs (at most 16) for NT activation rows, x rows K apart */
QRZ_AVX2_INLINE void nib_runs16(const uint8_t *m, const int8_t *x, int64_t K, int32_t runs, const int NT, __m256i *s16) {
    for (int t = 0; t < NT; t++) s16[t] = _mm256_setzero_si256();
    for (int32_t j = 0; j < runs; j++) {
        const __m256i wv = nib_run(m + 16 * j), wa = _mm256_sign_epi8(wv, wv);
        for (int t = 0; t < NT; t++) s16[t] = _mm256_add_epi16(s16[t], nib_dot16(wa, wv, x + t * K + 32 * j));
    }
}


/* int32 lanes added into four int64 lanes */
QRZ_AVX2_INLINE __m256i add_i32_to_i64(__m256i tot, __m256i v) {
    tot = _mm256_add_epi64(tot, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)));
    return _mm256_add_epi64(tot, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
}

QRZ_AVX2_INLINE int64_t hsum_i64(__m256i v) {   /* through memory: no 64-bit lane extracts on 32-bit x86 */
    int64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, v);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}


/* Groups that are an odd multiple of 16 (16, 48, 80, ...) can change in the middle of a run; each half run of 16
 * values lies in one group. half_walk_next gives the group of the next half run. */
typedef struct { int64_t g; int32_t k, per; } half_walk;
static inline half_walk half_walk_start(int32_t G) { return (half_walk){0, 0, G / 16}; }
static inline int64_t half_walk_next(half_walk *h) {
    const int64_t g = h->g;
    if (++h->k == h->per) { h->k = 0; h->g++; }
    return g;
}


/* Specializations: NT activation rows 1..4; RPG runs per group 1, 2, 4, 8, or 0 (another multiple of 32, read
 * from G), or -1 (groups of 16: two per run), or -2 (48, 80, ...: a group boundary inside some runs) */
#define NIB_RPG(FN, NT, G, ...)                                                                                \
    switch (G) {                                                                                               \
    case 32: FN(__VA_ARGS__, NT, 1); break;                                                                    \
    case 64: FN(__VA_ARGS__, NT, 2); break;                                                                    \
    case 128: FN(__VA_ARGS__, NT, 4); break;                                                                   \
    case 256: FN(__VA_ARGS__, NT, 8); break;                                                                   \
    case 16: FN(__VA_ARGS__, NT, -1); break;                                                                   \
    default:                                                                                                   \
        if ((G) & 31) FN(__VA_ARGS__, NT, -2);                                                                 \
        else FN(__VA_ARGS__, NT, 0);                                                                           \
    }
#define NIB_DISPATCH(FN, w, x, r0, r1, y, ldy)                                                                 \
    for (int64_t i = 0; i < (x)->n; i += 4) {                                                                  \
        switch ((x)->n - i < 4 ? (x)->n - i : 4) {                                                             \
        case 4: NIB_RPG(FN, 4, (w)->group, w, x, i, r0, r1, y, ldy); break;                                    \
        case 3: NIB_RPG(FN, 3, (w)->group, w, x, i, r0, r1, y, ldy); break;                                    \
        case 2: NIB_RPG(FN, 2, (w)->group, w, x, i, r0, r1, y, ldy); break;                                    \
        default: NIB_RPG(FN, 1, (w)->group, w, x, i, r0, r1, y, ldy); break;                                   \
        }                                                                                                      \
    }

/* SDR x I8_ROW: y = s_w s_x sum_g 2^e_g sum_{k in g} m_k q_k, the integer sum exact (docs/QUANTIZATION.md bounds it
 * in int32 for rows of up to 2^17 columns).
 * The codes stay unsigned, u = m + 8 in 0..15, so a run is one shift and one mask away from maddubs (no sign trick):
 * sum m q = sum u q - 8 sum q, and sum q per group comes with the activations (qrz_acts.sums), once per row of
 * activations instead of once per weight row. Lanes may wrap on the way (|u q 2^e| can be twice |m q 2^e|), but
 * every step is an add or a left shift, exact modulo 2^32, so the total is exact wherever the true sum fits. */

/* int16 pair sums of u * q over `runs` runs, at most 8 (a pair is at most 2 * 15 * 127 = 3810 in magnitude) */
QRZ_AVX2_INLINE void nibu_runs16(const uint8_t *m, const int8_t *x, int64_t K, int32_t runs, const int NT, __m256i *s16) {
    for (int t = 0; t < NT; t++) s16[t] = _mm256_setzero_si256();
    for (int32_t j = 0; j < runs; j++) {
        const __m256i u = nibu_run(m + 16 * j);
        for (int t = 0; t < NT; t++)
            s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(x + t * K + 32 * j))));
    }
}


/* a group of whole runs: int16 sums over at most 8 runs at a time, each widened, shifted by e_g and added */
QRZ_AVX2_INLINE void sdr_i8_group(const uint8_t *m, const int8_t *x, int64_t K, int32_t rpg, __m256i sh, const int NT,
                                  __m256i *acc) {
    for (int32_t j0 = 0; j0 < rpg; j0 += 8) {
        __m256i s16[4];
        nibu_runs16(m + 16 * j0, x + 32 * j0, K, rpg - j0 < 8 ? rpg - j0 : 8, NT, s16);
        for (int t = 0; t < NT; t++) acc[t] = _mm256_add_epi32(acc[t], _mm256_sllv_epi32(widen16(s16[t]), sh));
    }
}

/* One activation row (decoding), groups of whole runs: two runs per 32-byte load. A run's low nibbles are its
 * values 0..15 and its high nibbles 16..31, so with x reordered once per call into [A 0..15 | B 0..15] and
 * [A 16..31 | B 16..31] for each pair of runs A, B, a mask and a shift give both maddubs operands with no
 * cross-lane step, the two halves' int16 sums add (at most 2 * 3810), and one madd with 2^e per lane widens and
 * shifts at once: 9 instructions per 64 codes instead of 16. The integers are those of sdr_i8_rows. */
#define SDR_PAIRS_MAX_K 16384     /* the reordered row lives on the stack */

QRZ_AVX2_INLINE void sdr_i8_row_pairs(const sdr_view p, const int8_t *xq, const int32_t *xs, float xd, int64_t K,
                                      int32_t G, int64_t r0, int64_t r1, float *y, const int RPG) {
    const int64_t ng = K / G, np = K / 64;
    int8_t xp[SDR_PAIRS_MAX_K] __attribute__((aligned(32)));
    x_pairs_reorder(xq, np, xp);
    const __m256i low4 = _mm256_set1_epi8(15);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *flags = p.e + r * p.fb, *mant = p.m + r * (K / 2);
        __m256i acc = _mm256_setzero_si256();
        for (int64_t c = 0; c < np; c++) {
            /* four rows ahead: a row is a short stream (448 bytes at 896 columns) for the hardware prefetcher */
            _mm_prefetch((const char *)(mant + 4 * (K / 2) + 32 * c), _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(mant + 32 * c));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            const __m256i s16_lo = _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(xp + 64 * c)));
            const __m256i s16_hi = _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(xp + 64 * c + 32)));
            if (RPG == -1) {
                /* G = 16: each half of each run is its own group, so the low and the high nibbles keep their own
                 * int16 sums: the lower lanes hold groups 4c (low) and 4c + 1 (high), flag byte 2c, the upper
                 * lanes groups 4c + 2 and 4c + 3, flag byte 2c + 1. Two more instructions per 64 codes. */
                const unsigned f = flags[2 * c] | (unsigned)flags[2 * c + 1] << 8;
                const unsigned b_lo = (f & 0x0Fu) | ((f >> 4) & 0xF0u), b_hi = ((f >> 4) & 0x0Fu) | ((f >> 8) & 0xF0u);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s16_lo, NIB_LOAD(nib_pow_pair[b_lo])));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s16_hi, NIB_LOAD(nib_pow_pair[b_hi])));
                continue;
            }
            const __m256i s16 = _mm256_add_epi16(s16_lo, s16_hi);
            /* runs 2c and 2c + 1 are groups 2c and 2c + 1 (flag byte c) at G = 32; both lie in group 2c / RPG
             * otherwise, whose shift fills both fields of the index */
            const unsigned b = RPG == 1 ? flags[c] : 17u * (unsigned)nib_shift(flags, 2 * c / RPG);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s16, NIB_LOAD(nib_pow_pair[b])));
        }
        if (K & 32) {     /* an odd number of runs: the last one alone (at G = 16 its two halves are flag byte 2np) */
            __m256i s16;
            nibu_runs16(mant + 32 * np, xq + 64 * np, K, 1, 1, &s16);
            const unsigned b = RPG == -1 ? flags[2 * np] : 17u * (unsigned)nib_shift(flags, 2 * np / RPG);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s16, NIB_LOAD(nib_pow_pair[b])));
        }
        const uint32_t total = (uint32_t)hsum_i32(acc) - 8u * sdr_shifted_sums(flags, xs, ng);
        y[r] = (float)(int32_t)total * (p.s[r] * xd);
    }
}

QRZ_AVX2_INLINE void sdr_i8_rows(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1,
                                 float *y, int64_t ldy, const int NT, const int RPG) {
    const sdr_view p = sdr_view_of(w);
    const int32_t G = w->group, rpg = RPG > 0 ? RPG : G / 32;
    const int64_t K = w->cols, ng = K / G;
    const int8_t *xq = x->q + i * K;
    const int32_t *xs = x->sums + i * ng;
    if (NT == 1 && RPG != -2 && RPG != 0 && K <= SDR_PAIRS_MAX_K) {
        sdr_i8_row_pairs(p, xq, xs, x->d[i], K, G, r0, r1, y + i * ldy, RPG);
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *flags = p.e + r * p.fb, *mant = p.m + r * (K / 2);
        __m256i acc[4];
        for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_si256();
        if (RPG >= 0) {   /* groups of whole runs, two per flag byte */
            const int64_t step_m = 16 * rpg, step_x = 32 * rpg;
            int64_t g = 0;
            for (; g + 2 <= ng; g += 2) {
                const unsigned b = flags[g >> 1];
                sdr_i8_group(mant + g * step_m, xq + g * step_x, K, rpg, NIB_LOAD(nib_shift_lo[b]), NT, acc);
                sdr_i8_group(mant + (g + 1) * step_m, xq + (g + 1) * step_x, K, rpg, NIB_LOAD(nib_shift_hi[b]), NT, acc);
            }
            if (g < ng) sdr_i8_group(mant + g * step_m, xq + g * step_x, K, rpg, NIB_LOAD(nib_shift_lo[flags[g >> 1]]), NT, acc);
        } else {          /* groups of 16, 48, 80, ...: a shift per half run */
            half_walk h = half_walk_start(G);
            for (int64_t c = 0; c < K / 32; c++) {
                unsigned b;
                if (RPG == -1) b = flags[c];   /* groups 2c and 2c + 1: exactly flag byte c */
                else {
                    const int64_t glo = half_walk_next(&h), ghi = half_walk_next(&h);
                    b = (unsigned)(nib_shift(flags, glo) | nib_shift(flags, ghi) << 4);
                }
                __m256i s16[4];
                nibu_runs16(mant + 16 * c, xq + 32 * c, K, 1, NT, s16);
                const __m256i sh = NIB_LOAD(nib_shift_pair[b]);
                for (int t = 0; t < NT; t++) acc[t] = _mm256_add_epi32(acc[t], _mm256_sllv_epi32(widen16(s16[t]), sh));
            }
        }
        for (int t = 0; t < NT; t++) {
            const uint32_t total = (uint32_t)hsum_i32(acc[t]) - 8u * sdr_shifted_sums(flags, xs + t * ng, ng);
            y[(i + t) * ldy + r] = (float)(int32_t)total * (p.s[r] * x->d[i + t]);
        }
    }
}

QRZ_AVX2 static void sdr_matmul_i8_avx2(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                        int64_t ldy) {
    NIB_DISPATCH(sdr_i8_rows, w, x, r0, r1, y, ldy)
}

/* SDR x SDR4_ROW: y = s_w s_x sum_g 2^(e_w,g + e_x,g) sum m_w m_x, the integer sum exact. The activation shift is a
 * madd with 2^e_x (e_x <= 12, so 2^e_x fits an int16), the weight shift an sllv. Each shifted product is at most
 * 2^22 in magnitude and a lane takes 4 per run; like the scalar kernel's int32 accumulator, the lanes move into
 * int64 lanes after every 256 columns (8 runs; 8 to 15 runs when a group is 5 to 7 runs long), so no lane passes
 * 2^28 and the total is the scalar kernel's. */
QRZ_AVX2_INLINE void sdr_sdr4_group(const uint8_t *m, const int8_t *x, const uint8_t *xe, int64_t K, int64_t ng,
                                    int32_t rpg, __m256i shw, const int NT, __m256i *acc) {
    __m256i s16[4];   /* pair sums |.| <= 2 * 8 * 8, at most 8 runs */
    nib_runs16(m, x, K, rpg, NT, s16);
    for (int t = 0; t < NT; t++) {
        const __m256i v = _mm256_madd_epi16(s16[t], NIB_LOAD(nib_pow_one[xe[t * ng] & 15]));
        acc[t] = _mm256_add_epi32(acc[t], _mm256_sllv_epi32(v, shw));
    }
}

QRZ_AVX2_INLINE void sdr_sdr4_flush(const int NT, __m256i *acc, __m256i *tot) {
    for (int t = 0; t < NT; t++) { tot[t] = add_i32_to_i64(tot[t], acc[t]); acc[t] = _mm256_setzero_si256(); }
}

QRZ_AVX2_INLINE void sdr_sdr4_rows(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1,
                                   float *y, int64_t ldy, const int NT, const int RPG) {
    const sdr_view p = sdr_view_of(w);
    const int32_t G = w->group, rpg = RPG > 0 ? RPG : G / 32;
    const int64_t K = w->cols, ng = K / G;
    const int8_t *xq = x->q + i * K;
    const uint8_t *xe = x->e + i * ng;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *flags = p.e + r * p.fb, *mant = p.m + r * (K / 2);
        __m256i acc[4], tot[4];
        for (int t = 0; t < NT; t++) acc[t] = tot[t] = _mm256_setzero_si256();
        if (RPG >= 0) {   /* groups of whole runs, two per flag byte; 256 columns are 8 runs */
            const int64_t step_m = 16 * rpg, step_x = 32 * rpg;
            int64_t g = 0;
            int32_t held = 0;   /* runs in acc since it was last moved into tot */
            for (; g + 2 <= ng; g += 2) {
                const unsigned b = flags[g >> 1];
                sdr_sdr4_group(mant + g * step_m, xq + g * step_x, xe + g, K, ng, rpg, NIB_LOAD(nib_shift_lo[b]), NT, acc);
                if ((held += rpg) >= 8) { sdr_sdr4_flush(NT, acc, tot); held = 0; }
                sdr_sdr4_group(mant + (g + 1) * step_m, xq + (g + 1) * step_x, xe + g + 1, K, ng, rpg,
                               NIB_LOAD(nib_shift_hi[b]), NT, acc);
                if ((held += rpg) >= 8) { sdr_sdr4_flush(NT, acc, tot); held = 0; }
            }
            if (g < ng)
                sdr_sdr4_group(mant + g * step_m, xq + g * step_x, xe + g, K, ng, rpg, NIB_LOAD(nib_shift_lo[flags[g >> 1]]),
                               NT, acc);
        } else {          /* a shift per half run, 8 runs (256 columns) between flushes */
            half_walk h = half_walk_start(G);
            const int64_t runs = K / 32;
            for (int64_t c0 = 0; c0 < runs; c0 += 8) {
                const int64_t c1 = c0 + 8 < runs ? c0 + 8 : runs;
                for (int64_t c = c0; c < c1; c++) {
                    __m256i s16[4];
                    nib_runs16(mant + 16 * c, xq + 32 * c, K, 1, NT, s16);
                    if (RPG == -1) {   /* groups 2c and 2c + 1: flag byte c, and two adjacent activation shifts */
                        const __m256i shw = NIB_LOAD(nib_shift_pair[flags[c]]);
                        for (int t = 0; t < NT; t++) {
                            uint16_t ex;   /* e[2c] | e[2c + 1] << 8, each below 16: as one byte of two nibbles */
                            memcpy(&ex, xe + t * ng + 2 * c, 2);
                            const __m256i pw = NIB_LOAD(nib_pow_pair[(ex | ex >> 4) & 255]);
                            acc[t] = _mm256_add_epi32(acc[t], _mm256_sllv_epi32(_mm256_madd_epi16(s16[t], pw), shw));
                        }
                    } else {
                        const int64_t glo = half_walk_next(&h), ghi = half_walk_next(&h);
                        const __m256i shw = NIB_LOAD(nib_shift_pair[nib_shift(flags, glo) | nib_shift(flags, ghi) << 4]);
                        for (int t = 0; t < NT; t++) {
                            const uint8_t *et = xe + t * ng;
                            const __m256i pw = NIB_LOAD(nib_pow_pair[(et[glo] & 15) | (et[ghi] & 15) << 4]);
                            acc[t] = _mm256_add_epi32(acc[t], _mm256_sllv_epi32(_mm256_madd_epi16(s16[t], pw), shw));
                        }
                    }
                }
                sdr_sdr4_flush(NT, acc, tot);
            }
        }
        for (int t = 0; t < NT; t++) {
            const int64_t total = hsum_i64(add_i32_to_i64(tot[t], acc[t]));
            y[(i + t) * ldy + r] = (float)total * (p.s[r] * x->d[i + t]);
        }
    }
}

QRZ_AVX2 static void sdr_matmul_sdr4_avx2(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                          int64_t ldy) {
    NIB_DISPATCH(sdr_sdr4_rows, w, x, r0, r1, y, ldy)
}

/* INT4 x Q8_GROUP or Q4_GROUP: an int32 sum per group (per half run for odd multiples of 16), one float
 * multiply-add per group by d_w * d_x, like Q8. The products d_w * d_x are made eight groups at a time. */
QRZ_AVX2_INLINE void int4_scales8(const uint16_t *wd, const float *xd, int64_t ng, int64_t g0, int64_t gn, const int NT,
                                  float *sc) {
    /* sc[8 t + j] = d_w * d_x of group g0 + j, activation row t */
    if (gn == 8) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + g0)));
        for (int t = 0; t < NT; t++) _mm256_storeu_ps(sc + 8 * t, _mm256_mul_ps(dw, _mm256_loadu_ps(xd + t * ng + g0)));
    } else {
        for (int64_t j = 0; j < gn; j++)
            for (int t = 0; t < NT; t++) sc[8 * t + j] = _cvtsh_ss(wd[g0 + j]) * xd[t * ng + g0 + j];
    }
}

/* groups of 16: run j of a block of four holds groups 2j and 2j + 1, whose scales a permute spreads over lanes
 * 0-3 and 4-7 */
QRZ_AVX2_INLINE void int4_run16(const uint8_t *m, const int8_t *x, int64_t K, const float *sc, int j, const int NT,
                                __m256 *acc) {
    __m256i s16[4];
    nib_runs16(m, x, K, 1, NT, s16);
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(2 * j), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    for (int t = 0; t < NT; t++) {
        const __m256 scale = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + 8 * t), idx);
        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(widen16(s16[t])), acc[t]);
    }
}
/* int32 lanes summing to one group's sum of codes times activations, NT activation rows */
QRZ_AVX2_INLINE void int4_group_sums(const uint8_t *m, const int8_t *x, int64_t K, int32_t rpg, const int RPG,
                                     const int NT, __m256i *s32) {
    /* decoding: four weight rows ahead (2 K bytes of codes), as sdr_i8_row_pairs */
    if (NT == 1) _mm_prefetch((const char *)(m + 2 * K), _MM_HINT_T0);
    if (RPG > 0) {
        __m256i s16[4];
        nib_runs16(m, x, K, RPG, NT, s16);
        for (int t = 0; t < NT; t++) s32[t] = widen16(s16[t]);
    } else {   /* any group size: int16 sums over at most 8 runs at a time */
        for (int t = 0; t < NT; t++) s32[t] = _mm256_setzero_si256();
        for (int32_t j0 = 0; j0 < rpg; j0 += 8) {
            __m256i s16[4];
            nib_runs16(m + 16 * j0, x + 32 * j0, K, rpg - j0 < 8 ? rpg - j0 : 8, NT, s16);
            for (int t = 0; t < NT; t++) s32[t] = _mm256_add_epi32(s32[t], widen16(s16[t]));
        }
    }
}

QRZ_AVX2_INLINE void int4_group(const uint8_t *m, const int8_t *x, int64_t K, int32_t rpg, const int RPG,
                                const float *sc, const int NT, __m256 *acc) {
    __m256i s32[4];
    int4_group_sums(m, x, K, rpg, RPG, NT, s32);
    for (int t = 0; t < NT; t++) acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + 8 * t), _mm256_cvtepi32_ps(s32[t]), acc[t]);
}

QRZ_AVX2_INLINE void int4_rows(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1,
                               float *y, int64_t ldy, const int NT, const int RPG) {
    const int32_t G = w->group, rpg = RPG > 0 ? RPG : G / 32;
    const int64_t K = w->cols, ng = K / G;
    const uint16_t *scales = (const uint16_t *)w->data;
    const uint8_t *mant_all = (const uint8_t *)w->data + nib_align((uint64_t)w->rows * ng * 2);
    const int8_t *xq = x->q + i * K;
    const float *xd = x->d + i * ng;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wd = scales + r * ng;
        const uint8_t *mant = mant_all + r * (K / 2);
        /* one accumulator chain per activation row whatever NT is, so a row's result does not depend on how many
         * rows share the call (batch invariance: scoring a prompt in one pass or token by token agrees exactly) */
        __m256 acc[4];
        for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
        if (RPG >= 0) {
            const int64_t step_m = 16 * rpg, step_x = 32 * rpg;
            for (int64_t g0 = 0; g0 < ng; g0 += 8) {
                const int64_t gn = ng - g0 < 8 ? ng - g0 : 8;
                float sc[4 * 8];
                int4_scales8(wd, xd, ng, g0, gn, NT, sc);
                int64_t j = 0;
                for (; j + 2 <= gn; j += 2) {
                    const int64_t g = g0 + j;
                    int4_group(mant + g * step_m, xq + g * step_x, K, rpg, RPG, sc + j, NT, acc);
                    int4_group(mant + (g + 1) * step_m, xq + (g + 1) * step_x, K, rpg, RPG, sc + j + 1, NT, acc);
                }
                if (j < gn) int4_group(mant + (g0 + j) * step_m, xq + (g0 + j) * step_x, K, rpg, RPG, sc + j, NT, acc);
            }
        } else if (RPG == -1) {   /* eight groups are four runs; ng is even, as cols is a multiple of 32 */
            for (int64_t g0 = 0; g0 < ng; g0 += 8) {
                const int64_t gn = ng - g0 < 8 ? ng - g0 : 8, c0 = g0 / 2;
                float sc[4 * 8];
                int4_scales8(wd, xd, ng, g0, gn, NT, sc);
                int j = 0;
                for (; 2 * j + 4 <= gn; j += 2) {
                    int4_run16(mant + 16 * (c0 + j), xq + 32 * (c0 + j), K, sc, j, NT, acc);
                    int4_run16(mant + 16 * (c0 + j + 1), xq + 32 * (c0 + j + 1), K, sc, j + 1, NT, acc);
                }
                if (2 * j < gn) int4_run16(mant + 16 * (c0 + j), xq + 32 * (c0 + j), K, sc, j, NT, acc);
            }
        } else {
            half_walk h = half_walk_start(G);
            for (int64_t c = 0; c < K / 32; c++) {
                const int64_t glo = half_walk_next(&h), ghi = half_walk_next(&h);
                const float dlo = _cvtsh_ss(wd[glo]), dhi = _cvtsh_ss(wd[ghi]);
                __m256i s16[4];
                nib_runs16(mant + 16 * c, xq + 32 * c, K, 1, NT, s16);
                for (int t = 0; t < NT; t++) {
                    const float *dt = xd + t * ng;
                    const __m256 sc = _mm256_set_m128(_mm_set1_ps(dhi * dt[ghi]), _mm_set1_ps(dlo * dt[glo]));
                    acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(widen16(s16[t])), acc[t]);
                }
            }
        }
        for (int t = 0; t < NT; t++) y[(i + t) * ldy + r] = hsum8(acc[t]);
    }
}

QRZ_AVX2 static void int4_matmul_avx2(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                      int64_t ldy) {
    NIB_DISPATCH(int4_rows, w, x, r0, r1, y, ldy)
}

/* ---- SQ x Q8_GROUP or SQ4_GROUP: the INT4 group sums, plus the group's k slots (16 h * x[pos], scalar: k is a
 * few per group) added into the same int32 sum before its one float multiply-add. Groups are multiples of 32. */
QRZ_AVX2_INLINE void sq_rows(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1,
                             float *y, int64_t ldy, const int NT, const int RPG) {
    const qrz_sq_view v = qrz_sq_split(w->data, w->rows, w->cols, w->group);
    const int32_t G = w->group, rpg = RPG > 0 ? RPG : G / 32, k = v.k;
    const int64_t K = w->cols, ng = K / G;
    const int8_t *xq = x->q + i * K;
    const float *xd = x->d + i * ng;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wd = v.d + r * ng;
        const uint8_t *mant = v.codes + r * (K / 2), *slots = v.slots + (uint64_t)r * ng * v.record;
        __m256 acc[4];
        for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t g0 = 0; g0 < ng; g0 += 8) {
            const int64_t gn = ng - g0 < 8 ? ng - g0 : 8;
            float sc[4 * 8];
            int4_scales8(wd, xd, ng, g0, gn, NT, sc);
            for (int64_t j = 0; j < gn; j++) {
                const int64_t g = g0 + j;
                const int8_t *xg = xq + g * G;
                const uint8_t *record = slots + g * v.record;
                int32_t pos[QRZ_SQ_MAX_GROUP], high[QRZ_SQ_MAX_GROUP];
                qrz_sq_slots(record, k, v.pos_bits, v.record, pos, high);
                __m256i s32[4];
                int4_group_sums(mant + g * 16 * rpg, xg, K, rpg, RPG > 0 ? RPG : 0, NT, s32);
                for (int t = 0; t < NT; t++) {
                    int32_t extra = 0;
                    for (int32_t s = 0; s < k; s++) extra += high[s] * xg[t * K + pos[s]];
                    s32[t] = _mm256_add_epi32(s32[t], _mm256_setr_epi32(extra, 0, 0, 0, 0, 0, 0, 0));
                    acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + 8 * t + j), _mm256_cvtepi32_ps(s32[t]), acc[t]);
                }
            }
        }
        for (int t = 0; t < NT; t++) y[(i + t) * ldy + r] = hsum8(acc[t]);
    }
}

QRZ_AVX2 static void sq_matmul_avx2(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                    int64_t ldy) {
    NIB_DISPATCH(sq_rows, w, x, r0, r1, y, ldy)
}

/* ---- FP4 x Q8_GROUP or FP4 lanes (row or group scales): the codes through the layout's 16-entry table, shifted to
 * be unsigned (one pshufb), straight into maddubs, exact int32 group sums; eight sums are reduced into one vector
 * and the float multiply-adds then run in the scalar kernel's order, so the result is the scalar one bit for
 * bit ---- */
QRZ_AVX2_INLINE __m256i fp4_run(const uint8_t *p, __m256i lut) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    const __m256i v = _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_shuffle_epi8(lut, _mm256_and_si256(v, _mm256_set1_epi8(15)));
}

/* int32 lanes summing to one group's sum of (lut + top) q, for NT activation rows: the table shifted by the
 * layout's top value, 0..2 top, unsigned, so the codes go straight into maddubs (no sign trick), and
 * sum lut q = sum (lut + top) q - top sum q, sum q per group coming with the activations (qrz_acts.sums). A
 * maddubs pair is at most 2 * 2 top * 127: 6096 for E2M1 (top 12: `burst` 4 runs add in int16 before widening),
 * 3556 for E1M2 (8 runs), 32512 for E3M0 (top 64: one run at a time). */
QRZ_AVX2_INLINE void fp4u_group(const uint8_t *m, const int8_t *x, int64_t K, int32_t runs, int32_t burst,
                                __m256i lut_u, const int NT, __m256i *s32) {
    for (int t = 0; t < NT; t++) s32[t] = _mm256_setzero_si256();
    for (int32_t j0 = 0; j0 < runs; j0 += burst) {
        const int32_t j1 = j0 + burst < runs ? j0 + burst : runs;
        __m256i s16[4];
        for (int t = 0; t < NT; t++) s16[t] = _mm256_setzero_si256();
        for (int32_t j = j0; j < j1; j++) {
            const __m256i u = fp4_run(m + 16 * j, lut_u);
            for (int t = 0; t < NT; t++)
                s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(x + t * K + 32 * j))));
        }
        for (int t = 0; t < NT; t++) s32[t] = _mm256_add_epi32(s32[t], widen16(s16[t]));
    }
}

/* runs of a group that add in int16 before widening, by the weight layout (fp4u_group) */
static inline int32_t fp4_burst(int e_w) { return e_w == 3 ? 1 : e_w == 2 ? 4 : 8; }

/* what both FP4 row kernels set up: the tensor's planes, the layout's table shifted by its top value
 * (fp4u_group) in both lanes, and the activation rows from i on */
typedef struct {
    qrz_fp4_view v;
    __m256i lut_u;
    int top;
    int32_t burst, rpg;
    int64_t K, ng;
    const int8_t *xq;
    const int32_t *xs;
    bool grouped;
} fp4_setup;

QRZ_AVX2_INLINE fp4_setup fp4_setup_of(const qrz_weight *w, const qrz_acts *x, int64_t i, const int RPG) {
    fp4_setup f;
    f.v = qrz_fp4_split(w->data, w->rows, w->cols, w->group);
    f.top = qrz_fp4_lut[f.v.e_w][7];
    f.burst = fp4_burst(f.v.e_w);
    f.lut_u = _mm256_broadcastsi128_si256(
        _mm_add_epi8(_mm_loadu_si128((const __m128i *)qrz_fp4_lut[f.v.e_w]), _mm_set1_epi8((char)f.top)));
    f.rpg = RPG > 0 ? RPG : w->group / 32;
    f.K = w->cols;
    f.ng = w->cols / w->group;
    f.xq = x->q + i * f.K;
    f.xs = x->sums + i * f.ng;
    f.grouped = qrz_acts_grouped(x->kind);
    return f;
}

/* lane j = the sum of the lanes of v[j] */
QRZ_AVX2_INLINE __m256i hsum8x8_i32(const __m256i *v) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

QRZ_AVX2_INLINE void fp4_rows(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1,
                              float *y, int64_t ldy, const int NT, const int RPG, const int ONE_BURST) {
    const fp4_setup f = fp4_setup_of(w, x, i, RPG);
    const int32_t runs = ONE_BURST ? RPG : f.rpg, burst = ONE_BURST ? RPG : f.burst;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wd = f.v.d + r * f.ng;
        const uint8_t *codes = f.v.codes + r * (f.K / 2);
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t g0 = 0; g0 < f.ng; g0 += 8) {
            const int64_t gn = f.ng - g0 < 8 ? f.ng - g0 : 8;
            __m256i sums[4][8];
            for (int64_t j = 0; j < 8; j++) {
                __m256i s32[4];
                if (j < gn)
                    fp4u_group(codes + (g0 + j) * 16 * runs, f.xq + (g0 + j) * 32 * runs, f.K, runs, burst, f.lut_u, NT,
                               s32);
                for (int t = 0; t < NT; t++) sums[t][j] = j < gn ? s32[t] : _mm256_setzero_si256();
            }
            float ds[8];
            for (int64_t j = 0; j < gn; j++) ds[j] = _cvtsh_ss(wd[g0 + j]);
            for (int t = 0; t < NT; t++) {
                int32_t s[8];
                _mm256_storeu_si256((__m256i *)s, hsum8x8_i32(sums[t]));
                const float *xd = f.grouped ? x->d + (i + t) * f.ng + g0 : NULL;   /* row kinds: one scale per row */
                for (int64_t j = 0; j < gn; j++)
                    acc[t] += ds[j] * (f.grouped ? xd[j] : 1.0f) * (float)(s[j] - f.top * f.xs[t * f.ng + g0 + j]);
            }
        }
        for (int t = 0; t < NT; t++) y[(i + t) * ldy + r] = acc[t] * (f.grouped ? 1.0f : x->d[i + t]);
    }
}

/* Eight weight rows at once, one per float lane: the scalar kernel's per-row chain acc += (d_w * d_x,g) * sum
 * becomes eight independent chains in one vector, each the same operations in the same order (a multiply, a
 * multiply and an add, no fused multiply-add), so the result is still the scalar one bit for bit. This is what
 * decoding needs: one activation row, and a float multiply-add per group that no longer waits on the previous
 * group's. */
QRZ_AVX2_INLINE void fp4_rows8(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r, float *y, int64_t ldy,
                               const int NT, const int RPG, const int ONE_BURST) {
    const fp4_setup f = fp4_setup_of(w, x, i, RPG);
    const int32_t runs = ONE_BURST ? RPG : f.rpg, burst = ONE_BURST ? RPG : f.burst;
    const uint16_t *wd = f.v.d + r * f.ng;
    const uint8_t *codes = f.v.codes + r * (f.K / 2);
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < f.ng; g0 += 8) {
        const int64_t gn = f.ng - g0 < 8 ? f.ng - g0 : 8;
        __m256 dws[8];   /* dws[j] lane a: row r + a's scale of group g0 + j */
        scales8_rows(wd, f.ng, g0, gn, dws);
        for (int64_t j = 0; j < gn; j++) {
            const int64_t g = g0 + j;
            __m256i sums[4][8];
            for (int a = 0; a < 8; a++) {
                __m256i s32[4];
                fp4u_group(codes + a * (f.K / 2) + g * 16 * runs, f.xq + g * 32 * runs, f.K, runs, burst, f.lut_u, NT,
                           s32);
                for (int t = 0; t < NT; t++) sums[t][a] = s32[t];
            }
            for (int t = 0; t < NT; t++) {
                const __m256i total = _mm256_sub_epi32(hsum8x8_i32(sums[t]), _mm256_set1_epi32(f.top * f.xs[t * f.ng + g]));
                const __m256 sc = f.grouped ? _mm256_mul_ps(dws[j], _mm256_set1_ps(x->d[(i + t) * f.ng + g])) : dws[j];
                acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(sc, _mm256_cvtepi32_ps(total)));
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        const __m256 out = f.grouped ? acc[t] : _mm256_mul_ps(acc[t], _mm256_set1_ps(x->d[i + t]));
        _mm256_storeu_ps(y + (i + t) * ldy + r, out);
    }
}

/* Decoding, eight rows at once, two runs per 32-byte load against x reordered as in sdr_i8_row_pairs (xp): the
 * low nibbles of runs A, B through the table against [A 0..15 | B 0..15], the high ones against [A 16..31 |
 * B 16..31]. At RPG = 1 the two lanes are two groups, so the reduction of eight rows' vectors stops one step early
 * and gives both groups' totals; at RPG = 2 or 4 a group is one or two pairs. An int16 lane then holds up to 8
 * products, at most 24384 for E2M1's table and less for E1M2's, so layouts with a burst of 4 or more only. The
 * float steps are fp4_rows8's, in its order. */
QRZ_AVX2_INLINE __m256i fp4_pair16(const uint8_t *m, const int8_t *xp, __m256i lut_u) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)m), low4 = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_shuffle_epi8(lut_u, _mm256_and_si256(v, low4));
    const __m256i hi = _mm256_shuffle_epi8(lut_u, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
    return _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)xp)),
                            _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(xp + 32))));
}

QRZ_AVX2_INLINE __m256 fp4_pair_step(__m256 acc, const fp4_setup *f, const qrz_acts *x, int64_t i, int64_t g,
                                     __m256 dw, __m256i total) {
    total = _mm256_sub_epi32(total, _mm256_set1_epi32(f->top * f->xs[g]));
    const __m256 sc = f->grouped ? _mm256_mul_ps(dw, _mm256_set1_ps(x->d[i * f->ng + g])) : dw;
    return _mm256_add_ps(acc, _mm256_mul_ps(sc, _mm256_cvtepi32_ps(total)));
}

QRZ_AVX2_INLINE void fp4_rows8_pairs(const fp4_setup *f, const qrz_acts *x, int64_t i, const int8_t *xp, int64_t r,
                                     float *y, const int RPG) {
    const uint16_t *wd = f->v.d + r * f->ng;
    const uint8_t *codes = f->v.codes + r * (f->K / 2);
    const int64_t row = f->K / 2;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < f->ng; g0 += 8) {
        const int64_t gn = f->ng - g0 < 8 ? f->ng - g0 : 8;
        __m256 dws[8];
        scales8_rows(wd, f->ng, g0, gn, dws);
        if (RPG == 1) {   /* gn is even: ng = K / 32 is, and g0 a multiple of 8 */
            for (int64_t j = 0; j < gn; j += 2) {
                const int64_t g = g0 + j;
                __m256i v[8];
                for (int a = 0; a < 8; a++) {
                    _mm_prefetch((const char *)(codes + (a + 8) * row + g * 16), _MM_HINT_T0);
                    v[a] = widen16(fp4_pair16(codes + a * row + g * 16, xp + g * 32, f->lut_u));
                }
                const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
                const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
                acc = fp4_pair_step(acc, f, x, i, g, dws[j], _mm256_permute2x128_si256(lo, hi, 0x20));
                acc = fp4_pair_step(acc, f, x, i, g + 1, dws[j + 1], _mm256_permute2x128_si256(lo, hi, 0x31));
            }
        } else {
            for (int64_t j = 0; j < gn; j++) {
                const int64_t g = g0 + j;
                __m256i v[8];
                for (int a = 0; a < 8; a++) {
                    _mm_prefetch((const char *)(codes + (a + 8) * row + g * 16 * RPG), _MM_HINT_T0);
                    __m256i s16 = fp4_pair16(codes + a * row + g * 16 * RPG, xp + g * 32 * RPG, f->lut_u);
                    for (int p = 1; p < RPG / 2; p++)
                        s16 = _mm256_add_epi16(s16, fp4_pair16(codes + a * row + g * 16 * RPG + 32 * p,
                                                               xp + g * 32 * RPG + 64 * p, f->lut_u));
                    v[a] = widen16(s16);
                }
                acc = fp4_pair_step(acc, f, x, i, g, dws[j], hsum8x8_i32(v));
            }
        }
    }
    _mm256_storeu_ps(y + r, f->grouped ? acc : _mm256_mul_ps(acc, _mm256_set1_ps(x->d[i])));
}

#define FP4_PAIRS_MAX_K SDR_PAIRS_MAX_K

QRZ_AVX2_INLINE void fp4_rows_any(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1,
                                  float *y, int64_t ldy, const int NT, const int RPG) {
    int64_t r = r0;
    if (NT == 1 && (RPG == 1 || RPG == 2 || RPG == 4) && r1 - r0 >= 8 && w->cols % 64 == 0 &&
        w->cols <= FP4_PAIRS_MAX_K && fp4_burst(((const uint8_t *)w->data)[0]) >= 4) {
        const fp4_setup f = fp4_setup_of(w, x, i, RPG);
        int8_t xp[FP4_PAIRS_MAX_K] __attribute__((aligned(32)));
        x_pairs_reorder(f.xq, f.K / 64, xp);
        for (; r + 8 <= r1; r += 8) fp4_rows8_pairs(&f, x, i, xp, r, y + i * ldy, RPG);
        if (r < r1) fp4_rows(w, x, i, r, r1, y, ldy, NT, RPG, 1);
        return;
    }
    /* a group whose runs all fit one int16 burst (E2M1 and E1M2 up to 128 columns) takes a copy of the kernels
     * with the run count known at compile time: with it at run time, groups of 64 kept their sums on the stack
     * and ran 2.5-4x slower than groups of 32 */
    if (RPG > 0 && RPG <= fp4_burst(((const uint8_t *)w->data)[0])) {
        for (; r + 8 <= r1; r += 8) fp4_rows8(w, x, i, r, y, ldy, NT, RPG, 1);
        if (r < r1) fp4_rows(w, x, i, r, r1, y, ldy, NT, RPG, 1);
    } else {
        for (; r + 8 <= r1; r += 8) fp4_rows8(w, x, i, r, y, ldy, NT, RPG, 0);
        if (r < r1) fp4_rows(w, x, i, r, r1, y, ldy, NT, RPG, 0);
    }
}

QRZ_AVX2 static void fp4_matmul_avx2(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                     int64_t ldy) {
    NIB_DISPATCH(fp4_rows_any, w, x, r0, r1, y, ldy)
}

/* ---- activation quantizers: I8_ROW and Q8_GROUP as types.c's scalar ones compute them (the same absmax, the
 * same float divide and reciprocal, round half to even by cvtps under the default rounding mode, as nearbyintf),
 * so the codes and scales are the scalar ones bit for bit; other kinds go to the scalar quantizer ---- */
/* max |x[k]| over n values; a NaN is skipped, as fmaxf skips it in the scalar quantizers */
QRZ_AVX2 static inline float absmax_avx2(const float *x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) mx = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), mx);
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_movehdup_ps(r));
    float amax = _mm_cvtss_f32(r);
    for (; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    return amax;
}

/* q[k] = round(x[k] * inv) clamped to +-127, for n values; returns their sum */
QRZ_AVX2 static inline int32_t round_i8_avx2(const float *x, int64_t n, float inv, int8_t *q) {
    const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i sum = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(x + k), vinv)));
        const __m256i r = _mm256_cvtps_epi32(v);
        sum = _mm256_add_epi32(sum, r);
        const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(p16, p16));
    }
    int32_t s = hsum_i32(sum);
    for (; k < n; k++) {
        q[k] = (int8_t)fminf(127.0f, fmaxf(-127.0f, nearbyintf(x[k] * inv)));
        s += q[k];
    }
    return s;
}

QRZ_AVX2 static bool quantize_acts_avx2(qrz_acts *a) {
    const int64_t K = a->cols;
    if (a->kind == QRZ_ACTS_I8_ROW) {
        const int64_t ng = a->group > 0 ? K / a->group : 0;
        for (int64_t i = 0; i < a->n; i++) {
            const float *xi = a->f32 + i * K;
            const float di = absmax_avx2(xi, K) / 127.0f, inv = di > 0.0f ? 1.0f / di : 0.0f;
            a->d[i] = di;
            if (a->sums && ng)
                for (int64_t g = 0; g < ng; g++)
                    a->sums[i * ng + g] = round_i8_avx2(xi + g * a->group, a->group, inv, a->q + i * K + g * a->group);
            else
                round_i8_avx2(xi, K, inv, a->q + i * K);
        }
        return true;
    }
    if (a->kind == QRZ_ACTS_Q8_GROUP && a->group > 0) {
        const int64_t ng = K / a->group;
        for (int64_t i = 0; i < a->n; i++)
            for (int64_t g = 0; g < ng; g++) {
                const float *xg = a->f32 + i * K + g * a->group;
                const float dg = absmax_avx2(xg, a->group) / 127.0f, inv = dg > 0.0f ? 1.0f / dg : 0.0f;
                a->d[i * ng + g] = dg;
                const int32_t s = round_i8_avx2(xg, a->group, inv, a->q + i * K + g * a->group);
                if (a->sums) a->sums[i * ng + g] = s;
            }
        return true;
    }
    return false;
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

/* exp on eight floats: 2^n p(r), n = round(x / ln 2), r = x - n ln 2 in two parts (so r keeps its low bits), p a
 * degree-6 minimax polynomial for e^r on |r| <= ln 2 / 2 (Cephes' expf coefficients); within 2 ulp of expf.
 * Below -87.3 (where e^x leaves the normal floats) it gives 0, above 88.3 +inf. */
QRZ_AVX2 static inline __m256 exp8_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_blendv_ps(_mm256_andnot_ps(under, y), _mm256_set1_ps(INFINITY), over);
}

QRZ_AVX2 static void softmax_avx2(float *x, int n, float scale) {
    const __m256 sv = _mm256_set1_ps(scale);
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + t), sv);
        _mm256_storeu_ps(x + t, v);
        mv = _mm256_max_ps(mv, v);
    }
    float m = hmax8(mv);
    for (; t < n; t++) {
        x[t] *= scale;
        if (x[t] > m) m = x[t];
    }
    mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + t), mv));
        _mm256_storeu_ps(x + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float s = hsum8(sum);
    for (; t < n; t++) { x[t] = expf(x[t] - m); s += x[t]; }
    const __m256 inv = _mm256_set1_ps(1.0f / s);
    for (t = 0; t + 8 <= n; t += 8) _mm256_storeu_ps(x + t, _mm256_mul_ps(_mm256_loadu_ps(x + t), inv));
    for (; t < n; t++) x[t] *= 1.0f / s;
}

/* the MLP's gate, eight values at a time through exp8_avx2: SiLU x / (1 + e^-x); GELU's tanh(y) as
 * 1 - 2 / (e^2y + 1), which goes to +-1 without a NaN where e^2y overflows or underflows. Against the scalar
 * gate (expf, tanhf) each value is a few ulps off, of act(x) u for SiLU and of x u for GELU (tests/test_kvcache.py) */
QRZ_AVX2 static void gate_avx2(float *h, const float *g, const float *u, int n, int gelu) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int j = 0;
    if (gelu) {
        const __m256 half = _mm256_set1_ps(0.5f), two = _mm256_set1_ps(2.0f), k = _mm256_set1_ps(0.7978845608028654f),
                     c = _mm256_set1_ps(0.044715f);
        for (; j + 8 <= n; j += 8) {
            const __m256 x = _mm256_loadu_ps(g + j);
            const __m256 y = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(c, x), _mm256_mul_ps(x, x), x));
            const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8_avx2(_mm256_add_ps(y, y)), one)));
            _mm256_storeu_ps(h + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t)),
                                                  _mm256_loadu_ps(u + j)));
        }
    } else {
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (; j + 8 <= n; j += 8) {
            const __m256 x = _mm256_loadu_ps(g + j);
            const __m256 e = exp8_avx2(_mm256_xor_ps(x, sign));
            _mm256_storeu_ps(h + j, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
        }
    }
    if (j < n) qrz_vec[QRZ_ISA_SCALAR].gate(h + j, g + j, u + j, n - j, gelu);
}

void qrz_register_avx2(void) {
    qrz_vec[QRZ_ISA_AVX2] = (qrz_vec_ops){dot_avx2, axpy_avx2, softmax_avx2, gate_avx2};
    qrz_acts_quantizer[QRZ_ISA_AVX2] = quantize_acts_avx2;
    qrz_register_kv_avx2();     /* KV cache rows: the last section of this file */
    qrz_types[QRZ_TYPE_F32].matmul[0][QRZ_ISA_AVX2] = f32_matmul_avx2;
    qrz_types[QRZ_TYPE_F16].matmul[0][QRZ_ISA_AVX2] = f16_matmul_avx2;
    qrz_types[QRZ_TYPE_Q8].matmul[0][QRZ_ISA_AVX2] = q8_matmul_avx2;
    nib_tables_init();
    qrz_types[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_AVX2] = sdr_matmul_i8_avx2;
    qrz_types[QRZ_TYPE_SDR].matmul[1][QRZ_ISA_AVX2] = sdr_matmul_sdr4_avx2;
    qrz_types[QRZ_TYPE_INT4].matmul[0][QRZ_ISA_AVX2] = int4_matmul_avx2;
    qrz_types[QRZ_TYPE_INT4].matmul[1][QRZ_ISA_AVX2] = int4_matmul_avx2;
    qrz_types[QRZ_TYPE_FP4].matmul[0][QRZ_ISA_AVX2] = fp4_matmul_avx2;
    qrz_types[QRZ_TYPE_FP4].matmul[1][QRZ_ISA_AVX2] = fp4_matmul_avx2;
    qrz_types[QRZ_TYPE_SQ].matmul[0][QRZ_ISA_AVX2] = sq_matmul_avx2;
    qrz_types[QRZ_TYPE_SQ].matmul[1][QRZ_ISA_AVX2] = sq_matmul_avx2;
}
#else
void qrz_register_avx2(void) {}
#endif

/* ==== KV cache rows: f16, 8bit and 4bit SDR (kvcache.c has the row layouts and the scalar reference) ====
 * dot and axpy decode a row eight values at a time into floats and use FMA, so they differ from the scalar ones only
 * by the order of float additions; stores give the scalar ones' bytes exactly (IEEE division, round half to even,
 * F16C's round-to-nearest-even conversion). */
#if defined(__x86_64__) || defined(__i386__)
#include <math.h>

static inline float kv_get_f32(const void *p) { float f; memcpy(&f, p, sizeof f); return f; }

QRZ_AVX2 static inline __m256 kv_i8x8_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* ---- f16 ---- */
QRZ_AVX2 static void kv_f16_store_avx2(void *row, const float *x, int n) {
    uint16_t *h = row;
    const __m256 lo = _mm256_set1_ps(-65504.0f), hi = _mm256_set1_ps(65504.0f);
    int k = 0;
    for (; k + 8 <= n; k += 8) {
        const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(x + k), lo), hi);
        _mm_storeu_si128((__m128i *)(h + k), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; k < n; k++) h[k] = qrz_f32_to_f16(fminf(65504.0f, fmaxf(-65504.0f, x[k])));
}

QRZ_AVX2 static inline __m256 kv_load_f16x8(const uint16_t *h) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

QRZ_AVX2 static float kv_f16_dot_avx2(const float *q, const void *row, int n) {
    const uint16_t *h = row;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int k = 0;
    for (; k + 16 <= n; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), kv_load_f16x8(h + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k + 8), kv_load_f16x8(h + k + 8), a1);
    }
    for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), kv_load_f16x8(h + k), a0);
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; k < n; k++) s += q[k] * _cvtsh_ss(h[k]);
    return s;
}

QRZ_AVX2 static void kv_f16_axpy_avx2(float *y, float a, const void *row, int n) {
    const uint16_t *h = row;
    const __m256 av = _mm256_set1_ps(a);
    int k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, kv_load_f16x8(h + k), _mm256_loadu_ps(y + k)));
    for (; k < n; k++) y[k] += a * _cvtsh_ss(h[k]);
}

/* ---- 8bit: [float32 d x ng][int8 codes x n], a scale per group of qrz_kv_group(n) values ---- */
/* c[k] = round(clamp(x[k] / s, -127, 127)), half to even, for s > 0 (also the 4bit store's base codes) */
QRZ_AVX2 static void kv_i8_codes(int8_t *c, const float *x, int len, float s) {
    const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    int k = 0;
    for (; k + 8 <= len; k += 8) {
        const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), sv), lo), hi);
        const __m256i i32 = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i *)(c + k), _mm_packs_epi16(i16, i16));
    }
    for (; k < len; k++) c[k] = (int8_t)nearbyintf(fminf(127.0f, fmaxf(-127.0f, x[k] / s)));
}

QRZ_AVX2 static void kv_q8_store_avx2(void *row, const float *x, int n) {
    const int G = qrz_kv_group(n), ng = (n + G - 1) / G;
    int8_t *c = (int8_t *)row + 4 * ng;
    for (int g = 0; g < ng; g++) {
        const int k0 = g * G, len = n - k0 < G ? n - k0 : G;
        const float s = absmax_avx2(x + k0, len) / 127.0f;
        memcpy((uint8_t *)row + 4 * g, &s, sizeof s);
        if (s > 0.0f) kv_i8_codes(c + k0, x + k0, len, s);
        else memset(c + k0, 0, (size_t)len);
    }
}

QRZ_AVX2 static float kv_q8_dot_avx2(const float *q, const void *row, int n) {
    const int G = qrz_kv_group(n), ng = (n + G - 1) / G;
    const int8_t *c = (const int8_t *)row + 4 * ng;
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.0f;
    for (int g = 0; g < ng; g++) {      /* group starts are multiples of 16 */
        const int k1 = n - g * G < G ? n : g * G + G;
        int k = g * G;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        for (; k + 16 <= k1; k += 16) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(c + k));
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), kv_i8x8_ps(v), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k + 8), kv_i8x8_ps(_mm_srli_si128(v, 8)), s1);
        }
        if (k + 8 <= k1) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), kv_i8x8_ps(_mm_loadl_epi64((const __m128i *)(c + k))), s0);
            k += 8;
        }
        float rest = 0.0f;
        for (; k < k1; k++) rest += q[k] * (float)c[k];
        const float d = kv_get_f32((const uint8_t *)row + 4 * g);
        acc = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(d), acc);
        tail += rest * d;
    }
    return hsum8(acc) + tail;
}

QRZ_AVX2 static void kv_q8_axpy_avx2(float *y, float a, const void *row, int n) {
    const int G = qrz_kv_group(n), ng = (n + G - 1) / G;
    const int8_t *c = (const int8_t *)row + 4 * ng;
    for (int g = 0; g < ng; g++) {
        const int k1 = n - g * G < G ? n : g * G + G;
        int k = g * G;
        const float as = a * kv_get_f32((const uint8_t *)row + 4 * g);
        const __m256 av = _mm256_set1_ps(as);
        for (; k + 8 <= k1; k += 8)
            _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, kv_i8x8_ps(_mm_loadl_epi64((const __m128i *)(c + k))),
                                                    _mm256_loadu_ps(y + k)));
        for (; k < k1; k++) y[k] += as * (float)c[k];
    }
}

/* ---- 4bit SDR: [float32 s][shift nibbles][mantissa nibbles, value k in byte k/2, low nibble when k is even] ---- */
/* the mantissas of 16 values (8 bytes) or 8 values (4 bytes) as int8 in -8..7, in value order */
QRZ_AVX2 static inline __m128i kv_nibbles_i8(__m128i b) {
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    return _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8));
}
QRZ_AVX2 static inline __m128i kv_nib16(const uint8_t *p) { return kv_nibbles_i8(_mm_loadl_epi64((const __m128i *)p)); }
QRZ_AVX2 static inline __m128i kv_nib8(const uint8_t *p) {
    int32_t w;
    memcpy(&w, p, sizeof w);
    return kv_nibbles_i8(_mm_cvtsi32_si128(w));
}
static inline int kv_nibble(const uint8_t *p, int k) { return (p[k >> 1] >> ((k & 1) * 4)) & 15; }

QRZ_AVX2 static float kv_sdr4_dot_avx2(const float *q, const void *row, int n) {
    const int G = qrz_kv_group(n), ng = (n + G - 1) / G;
    const uint8_t *e = (const uint8_t *)row + 4, *m = e + (ng + 1) / 2;
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.0f;
    for (int g = 0; g < ng; g++) {      /* group starts are even: G is even unless there is a single group */
        const int k1 = n - g * G < G ? n : g * G + G;
        int k = g * G;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        for (; k + 16 <= k1; k += 16) {
            const __m128i v = kv_nib16(m + k / 2);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), kv_i8x8_ps(v), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k + 8), kv_i8x8_ps(_mm_srli_si128(v, 8)), s1);
        }
        if (k + 8 <= k1) { s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), kv_i8x8_ps(kv_nib8(m + k / 2)), s0); k += 8; }
        float rest = 0.0f;
        for (; k < k1; k++) rest += q[k] * (float)(kv_nibble(m, k) - 8);
        const float scale = (float)(1 << kv_nibble(e, g));
        acc = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(scale), acc);
        tail += rest * scale;
    }
    return (hsum8(acc) + tail) * kv_get_f32(row);
}

QRZ_AVX2 static void kv_sdr4_axpy_avx2(float *y, float a, const void *row, int n) {
    const int G = qrz_kv_group(n), ng = (n + G - 1) / G;
    const uint8_t *e = (const uint8_t *)row + 4, *m = e + (ng + 1) / 2;
    const float as = a * kv_get_f32(row);
    for (int g = 0; g < ng; g++) {
        const int k1 = n - g * G < G ? n : g * G + G;
        int k = g * G;
        const float c = as * (float)(1 << kv_nibble(e, g));
        const __m256 cv = _mm256_set1_ps(c);
        for (; k + 16 <= k1; k += 16) {
            const __m128i v = kv_nib16(m + k / 2);
            _mm256_storeu_ps(y + k, _mm256_fmadd_ps(cv, kv_i8x8_ps(v), _mm256_loadu_ps(y + k)));
            _mm256_storeu_ps(y + k + 8, _mm256_fmadd_ps(cv, kv_i8x8_ps(_mm_srli_si128(v, 8)), _mm256_loadu_ps(y + k + 8)));
        }
        if (k + 8 <= k1) {
            _mm256_storeu_ps(y + k, _mm256_fmadd_ps(cv, kv_i8x8_ps(kv_nib8(m + k / 2)), _mm256_loadu_ps(y + k)));
            k += 8;
        }
        for (; k < k1; k++) y[k] += c * (float)(kv_nibble(m, k) - 8);
    }
}

/* the razor of one group, as the scalar store: base codes b (SIMD, as the 8bit store), e from the OR of |b| (the same
 * leading one as the max), mantissas round(b / 2^e) clamped to -8..7 (SIMD), packed two per byte */
QRZ_AVX2 static void kv_sdr4_store_avx2(void *row, const float *x, int n) {
    const int G = qrz_kv_group(n), ng = (n + G - 1) / G;
    const float s = absmax_avx2(x, n) / 127.0f;
    uint8_t *e = (uint8_t *)row + 4, *m = e + (ng + 1) / 2;
    memcpy(row, &s, sizeof s);
    memset(e, 0, (size_t)(ng + 1) / 2 + (size_t)(n + 1) / 2);
    const __m256 m_lo = _mm256_set1_ps(-8.0f), m_hi = _mm256_set1_ps(7.0f);
    const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int g = 0; g < ng; g++) {
        const int k0 = g * G, len = n - k0 < G ? n - k0 : G;
        int8_t b[32];
        uint8_t u[32];                                        /* mantissa + 8, value order */
        int k;
        if (s > 0.0f) kv_i8_codes(b, x + k0, len, s);
        else memset(b, 0, (size_t)len);
        int mx = 0;
        for (k = 0; k < len; k++) mx |= b[k] < 0 ? -b[k] : b[k];
        int lead = 0;
        while (mx >> (lead + 1)) lead++;
        const int shift = lead > 2 ? lead - 2 : 0;
        e[g >> 1] |= (uint8_t)(shift << ((g & 1) * 4));
        const float step = 1.0f / (float)(1 << shift);
        const __m256 stepv = _mm256_set1_ps(step);
        for (k = 0; k + 8 <= len; k += 8) {
            const __m256 bf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + k))));
            const __m256 mf = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_mul_ps(bf, stepv), rnd), m_lo), m_hi);
            const __m256i i32 = _mm256_add_epi32(_mm256_cvtps_epi32(mf), _mm256_set1_epi32(8));
            const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
            _mm_storel_epi64((__m128i *)(u + k), _mm_packus_epi16(i16, i16));
        }
        for (; k < len; k++) u[k] = (uint8_t)((int)fminf(7.0f, fmaxf(-8.0f, nearbyintf((float)b[k] * step))) + 8);
        /* pairs (u[2j], u[2j+1]) -> u[2j] + 16 u[2j+1]; group starts are even (see the dot) */
        for (k = 0; k + 16 <= len; k += 16) {
            const __m128i pairs = _mm_maddubs_epi16(_mm_loadu_si128((const __m128i *)(u + k)), _mm_set1_epi16(0x1001));
            _mm_storel_epi64((__m128i *)(m + (k0 + k) / 2), _mm_packus_epi16(pairs, pairs));
        }
        for (; k < len; k++) m[(k0 + k) >> 1] |= (uint8_t)(u[k] << (((k0 + k) & 1) * 4));
    }
}

/* f32 rows, eight at a time: eight accumulators, then one transpose-and-add gives the eight sums in one vector */
QRZ_AVX2 static void kv_f32_dots_avx2(const float *q, const uint8_t *rows, size_t stride, int m, int n, float *out) {
    int t = 0;
    if (n % 8 == 0)
        for (; t + 8 <= m; t += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int k = 0; k < n; k += 8) {
                const __m256 qv = _mm256_loadu_ps(q + k);
                for (int j = 0; j < 8; j++)
                    acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps((const float *)(rows + (size_t)(t + j) * stride) + k), acc[j]);
            }
            /* hadd pairs: lanes 0-3 of s0123 are rows 0-3's sums over the lower four lanes, lanes 4-7 the upper */
            const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
            const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
            _mm256_storeu_ps(out + t, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                                    _mm256_permute2f128_ps(s0123, s4567, 0x31)));
        }
    for (; t < m; t++) out[t] = dot_avx2(q, (const float *)(rows + (size_t)t * stride), n);
}

/* y = sum_t a[t] row_t with y held in registers, 64 values (eight vectors) at a time, across all the rows */
QRZ_AVX2 static void kv_f32_mix_avx2(float *y, const float *a, const uint8_t *rows, size_t stride, int m, int n) {
    int k0 = 0;
    for (; k0 + 64 <= n; k0 += 64) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int t = 0; t < m; t++) {
            const float *row = (const float *)(rows + (size_t)t * stride) + k0;
            const __m256 av = _mm256_set1_ps(a[t]);
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(av, _mm256_loadu_ps(row + 8 * j), acc[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(y + k0 + 8 * j, acc[j]);
    }
    for (; k0 + 8 <= n; k0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int t = 0; t < m; t++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(a[t]), _mm256_loadu_ps((const float *)(rows + (size_t)t * stride) + k0), acc);
        _mm256_storeu_ps(y + k0, acc);
    }
    for (; k0 < n; k0++) {
        float s = 0.0f;
        for (int t = 0; t < m; t++) s += a[t] * ((const float *)(rows + (size_t)t * stride))[k0];
        y[k0] = s;
    }
}

void qrz_register_kv_avx2(void) {
    qrz_kv[QRZ_KV_CACHE_F32][QRZ_ISA_AVX2].dots = kv_f32_dots_avx2;
    qrz_kv[QRZ_KV_CACHE_F32][QRZ_ISA_AVX2].mix = kv_f32_mix_avx2;
    qrz_kv[QRZ_KV_CACHE_F16][QRZ_ISA_AVX2] =
        (qrz_kv_ops){.store = kv_f16_store_avx2, .dot = kv_f16_dot_avx2, .axpy = kv_f16_axpy_avx2};
    qrz_kv[QRZ_KV_CACHE_Q8][QRZ_ISA_AVX2] =
        (qrz_kv_ops){.store = kv_q8_store_avx2, .dot = kv_q8_dot_avx2, .axpy = kv_q8_axpy_avx2};
    qrz_kv[QRZ_KV_CACHE_SDR4][QRZ_ISA_AVX2] =
        (qrz_kv_ops){.store = kv_sdr4_store_avx2, .dot = kv_sdr4_dot_avx2, .axpy = kv_sdr4_axpy_avx2};
}
#endif
