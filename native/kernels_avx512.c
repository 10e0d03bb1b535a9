/* kernels_avx512.c - kernels on 512-bit vectors with AVX-512 F, BW, VL and VNNI (Intel since Ice Lake, AMD since
 * Zen 4), chosen before AVX-VNNI and AVX2 where the CPU has them.
 *
 * Prompts are bound by multiply-accumulate throughput, not memory: each weight meets hundreds of activation rows.
 * vpdpbusd on a 512-bit vector does 64 unsigned x signed byte products into sixteen int32 lanes. On the machine
 * docs/SPEED.md measures it issues at the rate of the 256-bit form, doubling the products per cycle; where a CPU
 * splits it in two halves (Zen 4) it still halves the instructions. Every kernel of this column not defined here is
 * the AVX2 one (qrz_isa_inherit).
 */
#include "qrz_internal.h"
#if (defined(__x86_64__) || defined(__i386__)) && (__GNUC__ >= 8 || __clang_major__ >= 8)
#include "kernels_x86.h"

#define QRZ_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define QRZ_AVX512_INLINE QRZ_AVX512 static inline __attribute__((always_inline))
#define AVX512_NT 8   /* activation rows per pass over the weight rows: 8 accumulators of the 32 registers */

/* ---- SDR x I8_ROW ----
 * vpdpbusd multiplies unsigned by signed bytes. The AVX2 kernel makes the codes the unsigned side (u = m + 8) and
 * subtracts 8 sum_g 2^e_g sum q per activation row; at G = 32 that correction costs as many instructions per
 * activation row as the products themselves. Here the activations are the unsigned side instead: q + 128, one
 * xor as they load. The weights are the signed side with their shifts applied, w = m 2^e in -128..112 (m in
 * -8..7, e <= 4, which the loader checks), and the correction, 128 sum w, belongs to the weight row alone: one
 * more vpdpbusd per 64 weights against a vector of ones, shared by all the activation rows of a pass.
 * Lanes wrap only modulo 2^32, as in the AVX2 kernel, so the total is the same integer.
 *
 * w is built from u = m + 8 in 0..15: u 2^e <= 240 is still a byte, so shifting 32-bit lanes never carries from
 * one byte into the next, and neither does 8 2^e <= 128; then a bytewise subtraction gives m 2^e.
 * A vector holds two runs of 32 codes (32 bytes): its four 128-bit lanes are run c's low nibbles (values 0..15),
 * its high nibbles (16..31), then run c + 1's, matching 64 activation bytes in order. Each 128-bit lane (16
 * values) lies in one group, as groups are multiples of 16. Shifts come eight groups at a time out of four flag
 * bytes into the lanes of one vector; a lane permute with a per-G index vector gives each quarter its group's. */
QRZ_AVX512_INLINE __m512i sdr_codes(__m512i b) {   /* b: run c's 16 bytes in lanes 0-1 and run c + 1's in 2-3 */
    const __m512i nib = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4);
    return _mm512_and_si512(_mm512_srlv_epi32(b, nib), _mm512_set1_epi8(15));
}

QRZ_AVX512_INLINE __m512i sdr_pair_codes(const uint8_t *p) {   /* runs c, c + 1 as u = m + 8, in order */
    const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p));
    return sdr_codes(_mm512_shuffle_i64x2(b, b, _MM_SHUFFLE(1, 1, 0, 0)));
}

QRZ_AVX512_INLINE __m512i sdr_last_run_codes(const uint8_t *p) {   /* a last odd run; lanes 2-3 are 8 (m = 0) */
    const __m512i b = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
    return _mm512_mask_blend_epi64(0xF0, sdr_codes(_mm512_shuffle_i64x2(b, b, _MM_SHUFFLE(1, 1, 0, 0))),
                                   _mm512_set1_epi8(8));
}

/* m 2^e as signed bytes from u = m + 8 and the shift of each 32-bit lane */
QRZ_AVX512_INLINE __m512i sdr_signed(__m512i u, __m512i sh) {
    return _mm512_sub_epi8(_mm512_sllv_epi32(u, sh), _mm512_sllv_epi32(_mm512_set1_epi8(8), sh));
}

/* acc[t] += (x[t] + 128) . w over 64 activation bytes (the first 32 where last) of row t at column 32 c, and
 * wsum += 1 . w */
QRZ_AVX512_INLINE void sdr_pair_products(__m512i w, const int8_t *xq, int64_t K, int64_t c, int last, const int NT,
                                         __m512i *acc, __m512i *wsum) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    *wsum = _mm512_dpbusd_epi32(*wsum, _mm512_set1_epi8(1), w);
    for (int t = 0; t < NT; t++) {
        const int8_t *xp = xq + t * K + 32 * c;
        const __m512i xv = last ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, xp) : _mm512_loadu_si512((const void *)xp);
        acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_xor_si512(xv, flip), w);
    }
}

/* the shift of every quarter of a run pair: 16 int32 lanes, 4 per quarter, from a scalar walk over the flags */
QRZ_AVX512_INLINE __m512i sdr_pair_shifts_slow(const uint8_t *flags, int64_t c, int32_t G, int64_t K) {
    int32_t e[4];
    for (int q = 0; q < 4; q++) {
        const int64_t col = 32 * c + 16 * q;
        e[q] = col < K ? nib_shift(flags, col / G) : 0;
    }
    return _mm512_setr_epi32(e[0], e[0], e[0], e[0], e[1], e[1], e[1], e[1], e[2], e[2], e[2], e[2], e[3], e[3], e[3],
                             e[3]);
}

/* the run pairs eight groups span: G / 8, at most 32 as G <= 256 (the loader checks it) */
#define SDR_MAX_PAIRS_PER_BLOCK 32

QRZ_AVX512_INLINE void sdr_i8_avx512_rows(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1,
                                          float *y, int64_t ldy, const __m512i *idx, int pairs_per_block,
                                          const int NT) {
    const sdr_view p = sdr_view_of(w);
    const int32_t G = w->group;
    const int64_t K = w->cols, ng = K / G, runs = K / 32;
    const int8_t *xq = x->q + i * K;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *flags = p.e + r * p.fb, *mant = p.m + r * (K / 2);
        __m512i acc[AVX512_NT], wsum = _mm512_setzero_si512();
        for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_si512();
        int64_t c = 0;   /* the next run */
        for (int64_t g = 0; g + 8 <= ng; g += 8) {   /* eight groups: 8 G / 64 run pairs */
            uint32_t f;
            memcpy(&f, flags + g / 2, 4);
            const __m512i shifts = _mm512_and_si512(
                _mm512_srlv_epi32(_mm512_set1_epi32((int32_t)f),
                                  _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)),
                _mm512_set1_epi32(15));
            for (int k = 0; k < pairs_per_block; k++, c += 2) {
                const __m512i w = sdr_signed(sdr_pair_codes(mant + 16 * c), _mm512_permutexvar_epi32(idx[k], shifts));
                sdr_pair_products(w, xq, K, c, 0, NT, acc, &wsum);
            }
        }
        for (; c < runs; c += 2) {   /* the last ng mod 8 groups */
            const int last = c + 1 == runs;
            const __m512i codes = last ? sdr_last_run_codes(mant + 16 * c) : sdr_pair_codes(mant + 16 * c);
            sdr_pair_products(sdr_signed(codes, sdr_pair_shifts_slow(flags, c, G, K)), xq, K, c, last, NT, acc, &wsum);
        }
        uint32_t totals[AVX512_NT];
        for (int t = 0; t < NT; t++) totals[t] = (uint32_t)_mm512_reduce_add_epi32(acc[t]);
        sdr_i8_store(y, ldy, i, r, totals, NT, (uint32_t)_mm512_reduce_add_epi32(wsum), p.s[r], x->d);
    }
}

/* Fewer than AVX512_NT activation rows (decoding is one) read the weights once per row of them, so memory bounds
 * them, not the products; there the AVX2 kernel, which builds its codes with fewer instructions, measured ahead. */
static qrz_matmul_fn sdr_matmul_i8_few;

QRZ_AVX512 static void sdr_matmul_i8_avx512(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                            int64_t ldy) {
    /* idx[k]: for run pair k of a block of eight groups, each lane's group within the block */
    const int32_t G = w->group;
    const int pairs = G / 8 <= SDR_MAX_PAIRS_PER_BLOCK ? G / 8 : SDR_MAX_PAIRS_PER_BLOCK;
    __m512i idx[SDR_MAX_PAIRS_PER_BLOCK];
    for (int k = 0; k < pairs; k++) {
        int32_t lanes[16];
        sdr_block_groups(lanes, k, 4, G);
        idx[k] = _mm512_loadu_si512(lanes);
    }
    int64_t i = 0;
    for (; i + AVX512_NT <= x->n; i += AVX512_NT) sdr_i8_avx512_rows(w, x, i, r0, r1, y, ldy, idx, pairs, AVX512_NT);
    matmul_rest(sdr_matmul_i8_few, w, x, i, r0, r1, y, ldy);   /* the AVX2 kernel, the same integers */
}

void qrz_register_avx512(void) {
    qrz_isa_inherit(QRZ_ISA_AVX512, QRZ_ISA_AVX2);
    sdr_matmul_i8_few = qrz_types[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_AVX2];
    qrz_types[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_AVX512] = sdr_matmul_i8_avx512;
}
#else
/* this compiler cannot emit AVX-512: the column is the AVX2 one */
void qrz_register_avx512(void) { qrz_isa_inherit(QRZ_ISA_AVX512, QRZ_ISA_AVX2); }
#endif
