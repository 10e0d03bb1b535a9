/* kernels_x86.h - small AVX2 helpers shared by the x86 kernel files (kernels_avx2.c, kernels_avxvnni.c,
 * kernels_avx512.c). All static inline with AVX2 target attributes: a function compiled for a superset of AVX2
 * inlines them. */
#ifndef QRZ_KERNELS_X86_H
#define QRZ_KERNELS_X86_H
#include "qrz_internal.h"
#include <immintrin.h>
#include <string.h>

#define QRZ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QRZ_AVX2_INLINE QRZ_AVX2 static inline __attribute__((always_inline))

static inline uint64_t nib_align(uint64_t n) { return (n + QRZ_ALIGN - 1) / QRZ_ALIGN * QRZ_ALIGN; }

QRZ_AVX2_INLINE int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static inline int nib_shift(const uint8_t *flags, int64_t g) { return (flags[g >> 1] >> ((g & 1) * 4)) & 15; }

/* SDR's three planes (docs/FORMAT.md) */
typedef struct {
    const float *s;               /* [rows] row scales */
    const uint8_t *e;             /* [rows][fb] shift nibbles */
    const uint8_t *m;             /* [rows][cols/2] codes */
    int64_t fb;
} sdr_view;

static inline sdr_view sdr_view_of(const qrz_weight *w) {
    const uint8_t *base = w->data;
    const int64_t fb = (w->cols / w->group + 1) / 2;
    const uint64_t s_bytes = nib_align((uint64_t)w->rows * 4);
    return (sdr_view){(const float *)base, base + s_bytes, base + s_bytes + nib_align((uint64_t)w->rows * fb), fb};
}

/* a run of 32 SDR/INT4 codes as unsigned bytes u = m + 8 in order: the low nibbles (values 0..15) in the lower lane,
 * the high nibbles (16..31) in the upper one */
QRZ_AVX2_INLINE __m256i nibu_run(const uint8_t *p) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
}

/* sum_g sums[g] 2^e_g over a row's ng groups, the shifts eight at a time from four flag bytes */
QRZ_AVX2_INLINE uint32_t sdr_shifted_sums(const uint8_t *flags, const int32_t *sums, int64_t ng) {
    const __m256i field = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i acc = _mm256_setzero_si256();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
        uint32_t f;
        memcpy(&f, flags + g / 2, 4);
        const __m256i sh =
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)f), field), _mm256_set1_epi32(15));
        acc = _mm256_add_epi32(acc, _mm256_sllv_epi32(_mm256_loadu_si256((const __m256i *)(sums + g)), sh));
    }
    uint32_t total = (uint32_t)hsum_i32(acc);
    for (; g < ng; g++) total += (uint32_t)sums[g] << nib_shift(flags, g);
    return total;
}

/* The VNNI kernels' SDR x I8_ROW epilogue (kernels_avxvnni.c, kernels_avx512.c): from the integer totals
 * sum (q + 128) w of nt activation rows and the weight row's sum w, y[(i + t) * ldy + r] = (total - 128 sum w)
 * s_w d[i + t], in uint32 (exact modulo 2^32, like the sums) */
static inline void sdr_i8_store(float *y, int64_t ldy, int64_t i, int64_t r, const uint32_t *totals, int nt,
                                uint32_t wsum, float s_w, const float *d) {
    for (int t = 0; t < nt; t++) y[(i + t) * ldy + r] = (float)(int32_t)(totals[t] - 128u * wsum) * (s_w * d[i + t]);
}

/* the VNNI kernels' shift permutes: for the k-th vector of codes in a block of eight SDR groups, a vector of
 * `quarters` runs of 16 values (4 int32 lanes each), lanes[l] = the group within the block that lane l's values
 * lie in */
static inline void sdr_block_groups(int32_t *lanes, int k, int quarters, int32_t G) {
    for (int l = 0; l < 4 * quarters; l++) lanes[l] = (16 * quarters * k + 16 * (l / 4)) / G;
}

/* activation rows [i, n) through another kernel: the VNNI kernels hand the rows short of a full block to AVX2's */
static inline void matmul_rest(qrz_matmul_fn fn, const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0,
                               int64_t r1, float *y, int64_t ldy) {
    if (i >= x->n) return;
    const qrz_acts rest = qrz_acts_rows(x, i, x->n - i);
    fn(w, &rest, r0, r1, y + i * ldy, ldy);
}

/* per 64 activations (a pair of runs): [0..15 | 32..47] then [16..31 | 48..63], the order of the low and the high
 * nibbles of a 32-byte load of two runs' codes */
QRZ_AVX2_INLINE void x_pairs_reorder(const int8_t *x, int64_t pairs, int8_t *xp) {
    for (int64_t c = 0; c < pairs; c++) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(x + 64 * c));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(x + 64 * c + 32));
        _mm256_store_si256((__m256i *)(xp + 64 * c), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_store_si256((__m256i *)(xp + 64 * c + 32), _mm256_permute2x128_si256(a, b, 0x31));
    }
}

/* in-place 8x8 transpose: v[a] lane j becomes v[j] lane a */
QRZ_AVX2_INLINE void transpose8_ps(__m256 *v) {
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    v[0] = _mm256_permute2f128_ps(u0, u4, 0x20); v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    v[1] = _mm256_permute2f128_ps(u1, u5, 0x20); v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    v[2] = _mm256_permute2f128_ps(u2, u6, 0x20); v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    v[3] = _mm256_permute2f128_ps(u3, u7, 0x20); v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* dws[j] lane a = row a's f16 scale of group g0 + j as float, for the eight rows from wd (ng scales a row) and
 * j < gn <= 8 */
QRZ_AVX2_INLINE void scales8_rows(const uint16_t *wd, int64_t ng, int64_t g0, int64_t gn, __m256 *dws) {
    if (gn == 8) {
        for (int a = 0; a < 8; a++) dws[a] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + a * ng + g0)));
        transpose8_ps(dws);
        return;
    }
    for (int64_t j = 0; j < gn; j++) {
        const uint16_t *c = wd + g0 + j;
        dws[j] = _mm256_cvtph_ps(_mm_setr_epi16((short)c[0], (short)c[ng], (short)c[2 * ng], (short)c[3 * ng],
                                                (short)c[4 * ng], (short)c[5 * ng], (short)c[6 * ng],
                                                (short)c[7 * ng]));
    }
}

#endif
