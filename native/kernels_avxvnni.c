/* kernels_avxvnni.c - AVX2 kernels with the 256-bit VNNI dot product of AVX-VNNI (the VEX encoding: Intel since
 * Alder Lake, AMD since Zen 5), for CPUs that have it without AVX-512 (kernels_avx512.c is chosen first where both
 * are there).
 *
 * vpdpbusd multiplies 32 unsigned bytes by 32 signed bytes and adds each four neighbouring products into one of
 * eight int32 lanes, without saturating: one instruction where AVX2 needs maddubs, a widening madd and an add.
 * Prompts are where that pays: generation reads each weight once and is bound by memory, a prompt applies each
 * weight to hundreds of activation rows and is bound by instructions. A kernel takes VNNI_NT activation rows per
 * pass over its weight rows (matmul_task in model.c hands it cache-sized tiles of both). Every kernel of this
 * column not defined here is the AVX2 one (qrz_isa_inherit).
 */
#include "qrz_internal.h"
#if (defined(__x86_64__) || defined(__i386__)) && (__GNUC__ >= 11 || __clang_major__ >= 12)
#include "kernels_x86.h"

#define VNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define VNNI_INLINE VNNI static inline __attribute__((always_inline))
#define VNNI_NT 8   /* activation rows per pass over the weight rows */

/* ---- SDR x I8_ROW ----
 * kernels_avx512.c's scheme on 256-bit vectors (its comment has the arithmetic): the activations are the unsigned
 * side, q + 128 (one xor as they load), the weights the signed side with their shifts applied, m 2^e, and the
 * correction 128 sum w comes from one more vpdpbusd per run against a vector of ones, shared by all the
 * activation rows of a pass. A vector is one run of 32 codes: lanes 0-3 its low nibbles (values 0..15), lanes 4-7
 * its high nibbles (16..31); each half lies in one group. */
VNNI_INLINE __m256i sdr_signed_run(const uint8_t *p, __m256i sh) {   /* m 2^e from u = m + 8 */
    return _mm256_sub_epi8(_mm256_sllv_epi32(nibu_run(p), sh), _mm256_sllv_epi32(_mm256_set1_epi8(8), sh));
}

/* acc[t] += (x[t] + 128) . w over the 32 activation bytes of row t at column 32 c, and wsum += 1 . w */
VNNI_INLINE void sdr_run_products(__m256i w, const int8_t *xq, int64_t K, int64_t c, const int NT, __m256i *acc,
                                  __m256i *wsum) {
    *wsum = _mm256_dpbusd_avx_epi32(*wsum, _mm256_set1_epi8(1), w);
    for (int t = 0; t < NT; t++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + t * K + 32 * c));
        acc[t] = _mm256_dpbusd_avx_epi32(acc[t], _mm256_xor_si256(xv, _mm256_set1_epi8((char)0x80)), w);
    }
}

/* the runs eight groups span: G / 4, at most 64 as G <= 256 (the loader checks it) */
#define SDR_MAX_RUNS_PER_BLOCK 64

VNNI_INLINE void sdr_i8_vnni_rows(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1, float *y,
                                  int64_t ldy, const __m256i *idx, int runs_per_block, const int NT) {
    const sdr_view p = sdr_view_of(w);
    const int32_t G = w->group;
    const int64_t K = w->cols, ng = K / G, runs = K / 32;
    const int8_t *xq = x->q + i * K;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *flags = p.e + r * p.fb, *mant = p.m + r * (K / 2);
        __m256i acc[VNNI_NT], wsum = _mm256_setzero_si256();
        for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_si256();
        int64_t c = 0;   /* the next run */
        for (int64_t g = 0; g + 8 <= ng; g += 8) {   /* eight groups: their shifts in the eight lanes of one vector */
            uint32_t f;
            memcpy(&f, flags + g / 2, 4);
            const __m256i shifts = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32((int32_t)f), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                _mm256_set1_epi32(15));
            for (int k = 0; k < runs_per_block; k++, c++)
                sdr_run_products(sdr_signed_run(mant + 16 * c, _mm256_permutevar8x32_epi32(shifts, idx[k])), xq, K, c,
                                 NT, acc, &wsum);
        }
        for (; c < runs; c++) {   /* the last ng mod 8 groups */
            const __m256i sh = _mm256_setr_m128i(_mm_set1_epi32(nib_shift(flags, 32 * c / G)),
                                                 _mm_set1_epi32(nib_shift(flags, (32 * c + 16) / G)));
            sdr_run_products(sdr_signed_run(mant + 16 * c, sh), xq, K, c, NT, acc, &wsum);
        }
        uint32_t totals[VNNI_NT];
        for (int t = 0; t < NT; t++) totals[t] = (uint32_t)hsum_i32(acc[t]);
        sdr_i8_store(y, ldy, i, r, totals, NT, (uint32_t)hsum_i32(wsum), p.s[r], x->d);
    }
}

/* fewer than VNNI_NT activation rows (decoding): the AVX2 kernel, the same integers (kernels_avx512.c says why) */
static qrz_matmul_fn sdr_matmul_i8_few;

VNNI static void sdr_matmul_i8_vnni(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                    int64_t ldy) {
    /* idx[k]: for run k of a block of eight groups, each lane's group within the block */
    const int32_t G = w->group;
    const int runs = G / 4 <= SDR_MAX_RUNS_PER_BLOCK ? G / 4 : SDR_MAX_RUNS_PER_BLOCK;
    __m256i idx[SDR_MAX_RUNS_PER_BLOCK];
    for (int k = 0; k < runs; k++) {
        int32_t lanes[8];
        sdr_block_groups(lanes, k, 2, G);
        idx[k] = _mm256_loadu_si256((const __m256i *)lanes);
    }
    int64_t i = 0;
    for (; i + VNNI_NT <= x->n; i += VNNI_NT) sdr_i8_vnni_rows(w, x, i, r0, r1, y, ldy, idx, runs, VNNI_NT);
    matmul_rest(sdr_matmul_i8_few, w, x, i, r0, r1, y, ldy);
}

void qrz_register_avxvnni(void) {
    qrz_isa_inherit(QRZ_ISA_AVXVNNI, QRZ_ISA_AVX2);
    sdr_matmul_i8_few = qrz_types[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_AVX2];
    qrz_types[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_AVXVNNI] = sdr_matmul_i8_vnni;
}
#else
/* this compiler cannot emit AVX-VNNI: the column is the AVX2 one */
void qrz_register_avxvnni(void) { qrz_isa_inherit(QRZ_ISA_AVXVNNI, QRZ_ISA_AVX2); }
#endif
