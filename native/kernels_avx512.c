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

/* ---- SDR x I8_ROW, two runs per vector ----
 * For groups of 16, 48, 80, ... and the rows short of a block of sixteen; whole-run groups in blocks of sixteen
 * rows take the column kernel further down, which measured faster (docs/SPEED.md).
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

/* Two to seven activation rows take the AVX2 kernel (four rows per pass over the weights); one row, decoding,
 * takes sdr_i8_decode_avx512 below where the group allows. The signed-weight form above costs more instructions per
 * code than the AVX2 kernel's unsigned codes and measured behind it there. */
static qrz_matmul_fn sdr_matmul_i8_few;

/* ---- SDR x I8_ROW, one activation row (decoding): four runs per 64-byte load ----
 * The AVX2 decoding kernel's arithmetic (sdr_i8_row_pairs) on vectors twice as wide: unsigned codes u = m + 8 into
 * maddubs against the activations, 8 (q_a + q_b) taken off each int16 pair sum (sdr_decode_rows), then widened and
 * shifted by one madd with 2^e per lane; the same integer total. A 64-byte load holds runs 4c .. 4c + 3, one per
 * 128-bit lane, the low nibbles of each its values 0..15 and the high ones 16..31; so the activation row is
 * reordered once per call into, per 128 values, [0..15 | 32..47 | 64..79 | 96..111] and [16..31 | 48..63 | 80..95 |
 * 112..127]. Lane k's multipliers 2^e come from the flag bytes by a variable shift of one broadcast word: at G = 32
 * lane k is group 4c + k (nibble k of two flag bytes); at G = 16 its low half is group 8c + 2k and its high half
 * 8c + 2k + 1, nibbles 2k and 2k + 1 of four flag bytes, so the two halves keep apart sums; at G = 64 lanes 0-1 and
 * 2-3 are the two nibbles of one flag byte; from G = 128 on all four lanes are one group. Runs past the last whole
 * four take the AVX2 kernel's per-run step. */
#define SDR_QUADS_MAX_K 16384     /* the reordered row lives on the stack */

QRZ_AVX512_INLINE void x_quads_reorder(const int8_t *x, int64_t quads, int8_t *xq4) {
    const __m512i lo = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), hi = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
    for (int64_t c = 0; c < quads; c++) {
        const __m512i a = _mm512_loadu_si512(x + 128 * c), b = _mm512_loadu_si512(x + 128 * c + 64);
        _mm512_store_si512(xq4 + 128 * c, _mm512_permutex2var_epi64(a, lo, b));
        _mm512_store_si512(xq4 + 128 * c + 64, _mm512_permutex2var_epi64(a, hi, b));
    }
}

/* 2^e in both int16 halves of each int32 lane (a madd operand), for e in 0..15 per lane */
QRZ_AVX512_INLINE __m512i pow2_pairs(__m512i e) { return _mm512_sllv_epi32(_mm512_set1_epi32(0x00010001), e); }

/* The decoding loop for one group form, a constant once inlined (16, 32, 64, or 0 for G >= 128: one multiplier per
 * four runs), so that the loop holds no test of the group. u = m + 8 is taken back per int16 pair before the
 * multipliers: corr holds 8 (x_a + x_b) for each pair of the reordered row (G = 16: the low and the high half of
 * quad c at 2c and 2c + 1; otherwise their sum at c), so a pair's sum is sum m x, at most 4 * 8 * 127 in magnitude
 * after the two halves are added, and no per-row pass over the groups' activation sums is left. */
QRZ_AVX512_INLINE void sdr_decode_rows(const sdr_view p, const int8_t *xq, const int8_t *xq4, const __m512i *corr,
                                       int32_t G, int64_t K, int64_t r0, int64_t r1, float d, float *y,
                                       const int FORM) {
    const int64_t nq = K / 128, runs = K / 32;
    const __m512i low4 = _mm512_set1_epi8(15), nib15 = _mm512_set1_epi32(15);
    /* per-lane right shifts of the broadcast flag word: G = 16 low and high halves, G = 32, G = 64 */
    const __m512i sh16_lo = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
    const __m512i sh16_hi = _mm512_add_epi32(sh16_lo, _mm512_set1_epi32(4));
    const __m512i sh32 = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    const __m512i sh64 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
    const __m256i eight = _mm256_set1_epi8(8);
    /* a software prefetch sixteen rows ahead (7 KB at 896 columns; at most 16 KB): a row is a short stream for the
     * hardware prefetcher, and four rows ahead, as in the AVX2 kernel, measured 12% slower on one thread */
    const int64_t ahead = 16 * (K / 2) < 16384 ? 16 * (K / 2) : 16384;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *flags = p.e + r * p.fb, *mant = p.m + r * (K / 2);
        __m512i acc = _mm512_setzero_si512();
        for (int64_t c = 0; c < nq; c++) {
            _mm_prefetch((const char *)(mant + ahead + 64 * c), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(mant + 64 * c);
            const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            const __m512i s_lo = _mm512_maddubs_epi16(lo, _mm512_load_si512(xq4 + 128 * c));
            const __m512i s_hi = _mm512_maddubs_epi16(hi, _mm512_load_si512(xq4 + 128 * c + 64));
            if (FORM == 16) {
                uint32_t f;
                memcpy(&f, flags + 4 * c, 4);
                const __m512i fv = _mm512_set1_epi32((int32_t)f);
                const __m512i e_lo = _mm512_and_si512(_mm512_srlv_epi32(fv, sh16_lo), nib15);
                const __m512i e_hi = _mm512_and_si512(_mm512_srlv_epi32(fv, sh16_hi), nib15);
                acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_sub_epi16(s_lo, corr[2 * c]), pow2_pairs(e_lo)));
                acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_sub_epi16(s_hi, corr[2 * c + 1]),
                                                              pow2_pairs(e_hi)));
                continue;
            }
            __m512i e;
            if (FORM == 32) {
                uint16_t f;
                memcpy(&f, flags + 2 * c, 2);
                e = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(f), sh32), nib15);
            } else if (FORM == 64) {
                e = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(flags[c]), sh64), nib15);
            } else {
                e = _mm512_set1_epi32(nib_shift(flags, 4 * c / (G / 32)));
            }
            const __m512i s = _mm512_sub_epi16(_mm512_add_epi16(s_lo, s_hi), corr[c]);
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(s, pow2_pairs(e)));
        }
        uint32_t total = (uint32_t)_mm512_reduce_add_epi32(acc);
        for (int64_t c = 4 * nq; c < runs; c++) {   /* the last one to three runs, one at a time */
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * c));
            const __m256i s16 = _mm256_sub_epi16(_mm256_maddubs_epi16(nibu_run(mant + 16 * c), xv),
                                                 _mm256_maddubs_epi16(eight, xv));
            /* lanes 0-3 values 0..15 of run c, lanes 4-7 values 16..31 */
            const int e_lo = FORM == 16 ? nib_shift(flags, 2 * c) : nib_shift(flags, c / (G / 32));
            const int e_hi = FORM == 16 ? nib_shift(flags, 2 * c + 1) : e_lo;
            const __m256i pw = _mm256_setr_epi16(1 << e_lo, 1 << e_lo, 1 << e_lo, 1 << e_lo, 1 << e_lo, 1 << e_lo,
                                                 1 << e_lo, 1 << e_lo, 1 << e_hi, 1 << e_hi, 1 << e_hi, 1 << e_hi,
                                                 1 << e_hi, 1 << e_hi, 1 << e_hi, 1 << e_hi);
            total += (uint32_t)hsum_i32(_mm256_madd_epi16(s16, pw));
        }
        y[r] = (float)(int32_t)total * (p.s[r] * d);
    }
}

QRZ_AVX512_INLINE void sdr_i8_decode_avx512(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y) {
    const sdr_view p = sdr_view_of(w);
    const int32_t G = w->group;
    const int64_t K = w->cols, nq = K / 128;
    int8_t xq4[SDR_QUADS_MAX_K] __attribute__((aligned(64)));
    __m512i corr[2 * (SDR_QUADS_MAX_K / 128)];
    x_quads_reorder(x->q, nq, xq4);
    const __m512i eight = _mm512_set1_epi8(8);
    for (int64_t c = 0; c < nq; c++) {
        const __m512i lo = _mm512_maddubs_epi16(eight, _mm512_load_si512(xq4 + 128 * c));
        const __m512i hi = _mm512_maddubs_epi16(eight, _mm512_load_si512(xq4 + 128 * c + 64));
        if (G == 16) {
            corr[2 * c] = lo;
            corr[2 * c + 1] = hi;
        } else {
            corr[c] = _mm512_add_epi16(lo, hi);
        }
    }
    switch (G) {
    case 16: sdr_decode_rows(p, x->q, xq4, corr, G, K, r0, r1, x->d[0], y, 16); break;
    case 32: sdr_decode_rows(p, x->q, xq4, corr, G, K, r0, r1, x->d[0], y, 32); break;
    case 64: sdr_decode_rows(p, x->q, xq4, corr, G, K, r0, r1, x->d[0], y, 64); break;
    default: sdr_decode_rows(p, x->q, xq4, corr, G, K, r0, r1, x->d[0], y, 0); break;
    }
}

QRZ_AVX512 static void sdr_matmul_i8_avx512(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                            int64_t ldy) {
    if (x->n == 1 && w->cols <= SDR_QUADS_MAX_K && (w->group == 16 || w->group == 32 || w->group % 64 == 0)) {
        sdr_i8_decode_avx512(w, x, r0, r1, y);
        return;
    }
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

/* ---- FP4 x Q8_GROUP (and FP4's own activation kinds, one scale per row or per group) ----
 * Sixteen weight rows at once, one per int32 lane, so a group's sums come out of the products already per row and
 * need no horizontal reduction (at G = 32 that reduction costs as much as the products). For that, each group of
 * the sixteen rows is repacked once into G / 4 vectors, vector j holding codes 4j..4j+3 of row a in lane a, as the
 * layout's table shifted by its top value (lut + top in 0..2 top <= 128, unsigned); then one vpdpbusd per four
 * columns, against those four activation bytes broadcast to every lane, adds sum (lut + top) q for all sixteen rows.
 * The repacking serves every activation row of the call. sum lut q = that - top sum q, sum q per group coming
 * with the activations. The float steps are the scalar kernel's, in its order, one row per lane: acc += (d_w d_x)
 * sum, a multiply, a multiply and an add; so the result is the scalar one bit for bit. */
#define COL_ROWS 16         /* weight rows per block: one per int32 lane */
#define COL_ACT_CHUNK 128   /* activation rows whose accumulators a block keeps (on the stack) */
#define COL_NT 8            /* activation rows a column vector serves at once */

/* cols[j] lane a = the four bytes 4j..4j+3 of rowvals[a], for j < G / 4 (G <= 256) */
QRZ_AVX512_INLINE void columns_of_rows(const uint8_t (*rowvals)[256], int32_t G, __m512i *cols) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(256 / 4));
    for (int32_t j = 0; j < G / 4; j++)
        cols[j] = _mm512_i32gather_epi32(_mm512_add_epi32(rows, _mm512_set1_epi32(j)), (const void *)rowvals, 4);
}

/* s[u] += the sixteen rows' dot products with activation row u's G bytes at xg + u K, for u < NT: one vpdpbusd per
 * four columns and activation row, NT independent chains (one chain alone would wait on each product's latency) */
QRZ_AVX512_INLINE void columns_dot(const __m512i *cols, int32_t G, const int8_t *xg, int64_t K, __m512i *s,
                                   const int NT) {
    for (int32_t j = 0; j < G / 4; j++)
        for (int u = 0; u < NT; u++) {
            int32_t four;
            memcpy(&four, xg + u * K + 4 * j, 4);
            s[u] = _mm512_dpbusd_epi32(s[u], cols[j], _mm512_set1_epi32(four));
        }
}

/* the sixteen rows' group g as G / 4 column vectors cols[j] (lane a: row a's codes 4j..4j+3 through lut_u) */
QRZ_AVX512_INLINE void fp4_repack16(const uint8_t *codes, int64_t row_bytes, int64_t g, int32_t G, __m256i lut_u,
                                    __m512i *cols) {
    uint8_t rowvals[COL_ROWS][256] __attribute__((aligned(64)));   /* G <= 256 (fp4_matmul_avx512 checks) */
    for (int a = 0; a < COL_ROWS; a++)
        for (int32_t c = 0; c < G / 32; c++) {
            const uint8_t *p = codes + a * row_bytes + (g * G + 32 * c) / 2;
            _mm256_store_si256((__m256i *)(rowvals[a] + 32 * c), _mm256_shuffle_epi8(lut_u, nibu_run(p)));
        }
    columns_of_rows((const uint8_t (*)[256])rowvals, G, cols);
}

/* acc[u] += (d_w d_x) sum for activation rows i .. i + NT - 1 and group g */
QRZ_AVX512_INLINE void fp4_group_rows(const qrz_acts *x, int64_t i, int64_t g, int32_t G, int top, const __m512i *cols,
                                      __m512 dw, bool grouped, __m512 *acc, const int NT) {
    const int64_t K = x->cols, ng = K / G;
    __m512i s[COL_NT];
    for (int u = 0; u < NT; u++) s[u] = _mm512_set1_epi32(-top * x->sums[(i + u) * ng + g]);
    columns_dot(cols, G, x->q + i * K + g * G, K, s, NT);
    for (int u = 0; u < NT; u++) {
        const __m512 sc = grouped ? _mm512_mul_ps(dw, _mm512_set1_ps(x->d[(i + u) * ng + g])) : dw;
        acc[u] = _mm512_add_ps(acc[u], _mm512_mul_ps(sc, _mm512_cvtepi32_ps(s[u])));
    }
}

QRZ_AVX512_INLINE void fp4_block16(const qrz_weight *w, const qrz_acts *x, int64_t rb, float *y, int64_t ldy) {
    const qrz_fp4_view v = qrz_fp4_split(w->data, w->rows, w->cols, w->group);
    const int32_t G = w->group;
    const int64_t K = w->cols, ng = K / G;
    const int top = qrz_fp4_lut[v.e_w][7];
    const __m256i lut_u = _mm256_broadcastsi128_si256(
        _mm_add_epi8(_mm_loadu_si128((const __m128i *)qrz_fp4_lut[v.e_w]), _mm_set1_epi8((char)top)));
    const bool grouped = qrz_acts_grouped(x->kind);
    for (int64_t t0 = 0; t0 < x->n; t0 += COL_ACT_CHUNK) {
        const int64_t nt = x->n - t0 < COL_ACT_CHUNK ? x->n - t0 : COL_ACT_CHUNK;
        __m512 acc[COL_ACT_CHUNK];
        for (int64_t t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m512i cols[64];
            fp4_repack16(v.codes + rb * (K / 2), K / 2, g, G, lut_u, cols);
            /* lane a: row rb + a's scale of group g */
            const uint16_t *dbase = v.d + rb * ng + g;
            uint16_t dh[COL_ROWS];
            for (int a = 0; a < COL_ROWS; a++) dh[a] = dbase[a * ng];
            const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dh));
            int64_t t = 0;
            for (; t + COL_NT <= nt; t += COL_NT)
                fp4_group_rows(x, t0 + t, g, G, top, cols, dw, grouped, acc + t, COL_NT);
            for (; t < nt; t++) fp4_group_rows(x, t0 + t, g, G, top, cols, dw, grouped, acc + t, 1);
        }
        for (int64_t t = 0; t < nt; t++) {
            const int64_t i = t0 + t;
            const __m512 out = grouped ? acc[t] : _mm512_mul_ps(acc[t], _mm512_set1_ps(x->d[i]));
            _mm512_storeu_ps(y + i * ldy + rb, out);
        }
    }
}

/* ---- SDR x I8_ROW, sixteen weight rows per vector ----
 * The FP4 kernel's layout (above) for SDR, with the signs of the two-runs kernel at the top of this file: lane a of
 * a column vector holds row a's w = m 2^e (signed bytes, -128..112), and the activations are the unsigned side,
 * q + 128 (x->qu, written by the quantizer beside q), broadcast four bytes at a time. So sum w q = sum w (q + 128)
 * - 128 sum w, whose correction belongs to the weight row alone; and with each group's shift inside w, every
 * column adds into one int32 per row and activation row. No step per group and activation row is left, and the
 * repacking goes by spans of 256 columns whatever G is (any multiple of 16: a half run has one shift). Lanes wrap
 * only modulo 2^32, so the total is the scalar kernel's integer; the float step is its multiply. */
#define SDR_SPAN 256

QRZ_AVX512_INLINE void sdr_repack16_span(const sdr_view *p, int64_t rb, int64_t K, int32_t G, int64_t c0, int32_t span,
                                         __m512i *cols, __m512i *wsum) {
    uint8_t rowvals[COL_ROWS][256] __attribute__((aligned(64)));
    for (int a = 0; a < COL_ROWS; a++) {
        const uint8_t *flags = p->e + (rb + a) * p->fb, *m = p->m + (rb + a) * (K / 2);
        for (int32_t c = 0; c < span / 32; c++) {
            const int64_t col = c0 + 32 * c;   /* nibu_run: values 0..15 in the lower lane, 16..31 in the upper */
            const int e0 = nib_shift(flags, col / G), e1 = nib_shift(flags, (col + 16) / G);
            const __m256i sh = _mm256_setr_epi32(e0, e0, e0, e0, e1, e1, e1, e1);
            const __m256i w = _mm256_sub_epi8(_mm256_sllv_epi32(nibu_run(m + col / 2), sh),
                                              _mm256_sllv_epi32(_mm256_set1_epi8(8), sh));
            _mm256_store_si256((__m256i *)(rowvals[a] + 32 * c), w);
        }
    }
    columns_of_rows((const uint8_t (*)[256])rowvals, span, cols);
    for (int32_t j = 0; j < span / 4; j++) *wsum = _mm512_dpbusd_epi32(*wsum, _mm512_set1_epi8(1), cols[j]);
}

/* tot[u] += sum over the span of w (q + 128) for activation rows u < NT, their q + 128 at xu + u K */
QRZ_AVX512_INLINE void sdr_span_rows(const uint8_t *xu, int64_t K, const __m512i *cols, int32_t span, __m512i *tot,
                                     const int NT) {
    __m512i s[COL_NT];
    for (int u = 0; u < NT; u++) s[u] = tot[u];
    for (int32_t j = 0; j < span / 4; j++)
        for (int u = 0; u < NT; u++) {
            int32_t four;
            memcpy(&four, xu + u * K + 4 * j, 4);
            s[u] = _mm512_dpbusd_epi32(s[u], _mm512_set1_epi32(four), cols[j]);
        }
    for (int u = 0; u < NT; u++) tot[u] = s[u];
}

QRZ_AVX512_INLINE void sdr_block16(const qrz_weight *w, const qrz_acts *x, int64_t rb, float *y, int64_t ldy) {
    const sdr_view p = sdr_view_of(w);
    const int64_t K = w->cols;
    const __m512 s_w = _mm512_loadu_ps(p.s + rb);
    for (int64_t t0 = 0; t0 < x->n; t0 += COL_ACT_CHUNK) {
        const int64_t nt = x->n - t0 < COL_ACT_CHUNK ? x->n - t0 : COL_ACT_CHUNK;
        __m512i tot[COL_ACT_CHUNK], wsum = _mm512_setzero_si512();
        for (int64_t t = 0; t < nt; t++) tot[t] = _mm512_setzero_si512();
        for (int64_t c0 = 0; c0 < K; c0 += SDR_SPAN) {
            const int32_t span = K - c0 < SDR_SPAN ? (int32_t)(K - c0) : SDR_SPAN;
            __m512i cols[SDR_SPAN / 4];
            sdr_repack16_span(&p, rb, K, w->group, c0, span, cols, &wsum);
            const uint8_t *xu = x->qu + t0 * K + c0;
            int64_t t = 0;
            for (; t + COL_NT <= nt; t += COL_NT) sdr_span_rows(xu + t * K, K, cols, span, tot + t, COL_NT);
            for (; t < nt; t++) sdr_span_rows(xu + t * K, K, cols, span, tot + t, 1);
        }
        const __m512i corr = _mm512_slli_epi32(wsum, 7);
        for (int64_t t = 0; t < nt; t++) {
            const int64_t i = t0 + t;
            const __m512 scale = _mm512_mul_ps(s_w, _mm512_set1_ps(x->d[i]));
            _mm512_storeu_ps(y + i * ldy + rb, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(tot[t], corr)), scale));
        }
    }
}
QRZ_AVX512 static void sdr_matmul_i8_avx512_blocks(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1,
                                                   float *y, int64_t ldy) {
    int64_t r = r0;
    if (x->n >= AVX512_NT && x->qu)   /* the column kernel takes the activations as q + 128 */
        for (; r + COL_ROWS <= r1; r += COL_ROWS) sdr_block16(w, x, r, y, ldy);
    if (r < r1) sdr_matmul_i8_avx512(w, x, r, r1, y, ldy);   /* the rows left over, any group */
}

static qrz_matmul_fn fp4_matmul_few;

/* ---- FP4, one activation row (decoding), groups of 64: sixteen weight rows at once ----
 * The AVX2 decoding kernel (fp4_rows8_pairs) on vectors twice as wide, with the same integers and the same float
 * steps, so the result is still the scalar one bit for bit (and a prompt scored in one pass and token by token
 * agree). A group of a row is one run pair, 32 bytes; a 512-bit vector holds the group of two rows, row j in the
 * low half and row j + 4 in the high one for j < 4, rows j + 4 and j + 8 for j = 4..7. Each half goes through the
 * layout's shifted table and maddubs against the activation pair (x_pairs_reorder) broadcast to both halves, and
 * one madd with ones widens to int32: eight lanes per row. fp4_rows16_totals then sums each row's eight lanes into
 * lane (row - r) of one vector: 21 instructions per sixteen rows against the AVX2 kernel's 9 per eight, which
 * spends twice the table lookups, multiplies and widenings per code. Layouts with a burst of 4 or more runs only:
 * an int16 lane holds 4 products, at most 4 * 2 top * 127 = 12192 for E2M1 (E3M0's 128 * 127 * 4 would overflow). */
#define FP4_DECODE_ROWS 16
#define FP4_DECODE_MAX_K 16384     /* the reordered activation row lives on the stack */

/* the int32 group sums of (lut + top) q of rows ra (lanes 0-7) and rb (lanes 8-15), 32 code bytes each */
QRZ_AVX512_INLINE __m512i fp4_two_rows(const uint8_t *ra, const uint8_t *rb, __m512i lut_u, __m512i xlo,
                                       __m512i xhi) {
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)ra)),
                                         _mm256_loadu_si256((const __m256i *)rb), 1);
    const __m512i low4 = _mm512_set1_epi8(15);
    const __m512i lo = _mm512_shuffle_epi8(lut_u, _mm512_and_si512(v, low4));
    const __m512i hi = _mm512_shuffle_epi8(lut_u, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
    return _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, xlo), _mm512_maddubs_epi16(hi, xhi)),
                             _mm512_set1_epi16(1));
}

/* lane L = the sum of the eight lanes that hold row L, for v[j] holding rows (j, j + 4) for j < 4 and (j + 4,
 * j + 8) for j >= 4: pairs of vectors interleave and add twice (each 128-bit lane q of a then holds v[0..3]'s sums
 * of their lanes 4q..4q+3, of b v[4..7]'s), and lanes 0 + 1 and 2 + 3 of a and b make rows 0-3, 4-7, 8-11, 12-15 */
QRZ_AVX512_INLINE __m512i fp4_rows16_totals(const __m512i *v) {
    __m512i t[4];
    for (int k = 0; k < 4; k++)
        t[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]),
                                _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]));
    const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi64(t[0], t[1]), _mm512_unpackhi_epi64(t[0], t[1]));
    const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2], t[3]), _mm512_unpackhi_epi64(t[2], t[3]));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* scales8_rows for a whole block of eight groups even when only gn < 8 are left (at 896 columns, 6 of 14): plain
 * loads and one transpose instead of a gather of 8 gn halves; the lanes past gn are never used, and past the last
 * row of the tensor the load reads the plane's padding or the codes that follow it */
QRZ_AVX512_INLINE void scales8_rows_whole(const uint16_t *wd, int64_t ng, int64_t g0, __m256 *dws) {
    for (int a = 0; a < 8; a++) dws[a] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + a * ng + g0)));
    transpose8_ps(dws);
}

QRZ_AVX512_INLINE void fp4_decode16(const qrz_fp4_view *v, const qrz_acts *x, const int8_t *xp, __m512i lut_u,
                                    int top, bool grouped, int64_t K, int64_t r, float *y) {
    const int64_t ng = K / 64, row = K / 2;
    const uint16_t *wd = v->d + r * ng;
    const uint8_t *codes = v->codes + r * row;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < ng; g0 += 8) {
        const int64_t gn = ng - g0 < 8 ? ng - g0 : 8;
        __m256 d_lo[8], d_hi[8];   /* lane a: row r + a's (r + 8 + a's) scale of group g0 + j */
        scales8_rows_whole(wd, ng, g0, d_lo);
        scales8_rows_whole(wd + 8 * ng, ng, g0, d_hi);
        for (int64_t j = 0; j < gn; j++) {
            const int64_t g = g0 + j;
            const __m512i xlo = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)(xp + 64 * g)));
            const __m512i xhi = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)(xp + 64 * g + 32)));
            __m512i s[8];
            for (int k = 0; k < 8; k++) {
                const int64_t ra = k < 4 ? k : k + 4, rb = ra + 4;
                _mm_prefetch((const char *)(codes + (ra + FP4_DECODE_ROWS) * row + 32 * g), _MM_HINT_T0);
                _mm_prefetch((const char *)(codes + (rb + FP4_DECODE_ROWS) * row + 32 * g), _MM_HINT_T0);
                s[k] = fp4_two_rows(codes + ra * row + 32 * g, codes + rb * row + 32 * g, lut_u, xlo, xhi);
            }
            const __m512i total = _mm512_sub_epi32(fp4_rows16_totals(s), _mm512_set1_epi32(top * x->sums[g]));
            const __m512 dw = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(d_lo[j])),
                                                                  _mm256_castps_pd(d_hi[j]), 1));
            const __m512 sc = grouped ? _mm512_mul_ps(dw, _mm512_set1_ps(x->d[g])) : dw;
            acc = _mm512_add_ps(acc, _mm512_mul_ps(sc, _mm512_cvtepi32_ps(total)));
        }
    }
    _mm512_storeu_ps(y + r, grouped ? acc : _mm512_mul_ps(acc, _mm512_set1_ps(x->d[0])));
}

QRZ_AVX512 static void fp4_matmul_avx512(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                         int64_t ldy) {
    int64_t r = r0;
    if (x->n >= AVX512_NT && w->group <= 256)
        for (; r + COL_ROWS <= r1; r += COL_ROWS) fp4_block16(w, x, r, y, ldy);
    if (x->n == 1 && w->group == 64 && w->cols <= FP4_DECODE_MAX_K && r1 - r0 >= FP4_DECODE_ROWS) {
        const qrz_fp4_view v = qrz_fp4_split(w->data, w->rows, w->cols, w->group);
        if (v.e_w != 3) {   /* E3M0's table overflows fp4_two_rows' int16 lanes */
            const int top = qrz_fp4_lut[v.e_w][7];
            const __m512i lut_u = _mm512_broadcast_i32x4(
                _mm_add_epi8(_mm_loadu_si128((const __m128i *)qrz_fp4_lut[v.e_w]), _mm_set1_epi8((char)top)));
            int8_t xp[FP4_DECODE_MAX_K] __attribute__((aligned(64)));
            x_pairs_reorder(x->q, w->cols / 64, xp);
            for (; r + FP4_DECODE_ROWS <= r1; r += FP4_DECODE_ROWS)
                fp4_decode16(&v, x, xp, lut_u, top, qrz_acts_grouped(x->kind), w->cols, r, y);
        }
    }
    if (r < r1) fp4_matmul_few(w, x, r, r1, y, ldy);   /* the AVX2 kernel: the same results bit for bit */
}

/* ---- Q8 x Q8_GROUP: 64 weights per vector ----
 * vpdpbusd multiplies unsigned by signed bytes, and AVX-512 has no byte sign instruction: the weight's sign moves
 * onto the activation by a masked negation instead, |w| (w < 0 ? -x : x) = w x (x in -127..127 never overflows;
 * w = -128 is 128 as an unsigned byte, still exact). At G = 32 a vector holds two groups (int32 lanes 0-7 and
 * 8-15), from G = 64 on a group is G / 64 vectors; each group's int32 sums go to float and into a 16-lane
 * accumulator times d_w d_x, which come sixteen groups at a time (cvtph of the f16 scales times the activation
 * scales) and are spread over the lanes by a permute. Every activation row of a call takes the same steps in the
 * same order, so a row's result does not depend on the batch it came in (the float order differs from the AVX2
 * kernel's, within the tests' bound). Other group sizes take the AVX2 kernel for every row. */
static qrz_matmul_fn q8_matmul_other;
#define Q8_AHEAD 8192   /* software prefetch distance in bytes; the rows are one stream, but the hardware
                         * prefetcher alone measured behind (as for SDR's decoding kernel) */

/* 32 bytes in the lower half, zeros above */
QRZ_AVX512_INLINE __m512i load_half(const int8_t *p) {
    return _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)p));
}

QRZ_AVX512_INLINE void q8_rows_avx512(const qrz_weight *w, const qrz_acts *x, int64_t i, int64_t r0, int64_t r1,
                                      float *y, int64_t ldy, const int NT) {
    const int32_t G = w->group;
    const int64_t K = w->cols, ng = K / G;
    const uint16_t *scales = (const uint16_t *)w->data;
    const int8_t *quants = (const int8_t *)w->data + (((uint64_t)w->rows * ng * 2 + QRZ_ALIGN - 1) / QRZ_ALIGN) * QRZ_ALIGN;
    const __m512i zero = _mm512_setzero_si512();
    const __m512i pair_lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wd = scales + r * ng;
        const int8_t *wq = quants + r * K;
        __m512 acc[4];
        for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
        for (int64_t g0 = 0; g0 < ng; g0 += 16) {
            const int64_t m = ng - g0 < 16 ? ng - g0 : 16;
            const __mmask16 in = (__mmask16)((1u << m) - 1);
            /* a plain load even past the row's last group: a masked one does not train the hardware prefetcher,
             * and this plane is a second stream beside the codes (masked, the head streamed 33 GB/s on one thread
             * instead of 44). Past the last row it reads the plane's padding or the codes that follow it, inside
             * the tensor; the lanes past m, whatever they decode to (inf, NaN), are zeroed by the masked multiply,
             * as a last odd group's pair picks lane m */
            const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + g0)));
            __m512 dwx[4];
            for (int t = 0; t < NT; t++)
                dwx[t] = _mm512_maskz_mul_ps(in, dw, _mm512_maskz_loadu_ps(in, x->d + (i + t) * ng + g0));
            if (G == 32) {
                for (int64_t k = 0; k < m; k += 2) {   /* groups g0 + k and g0 + k + 1 (none past the last) */
                    /* plain loads but for a last group alone: masked loads measured 2x slower on the whole head
                     * (they seem not to train the hardware prefetcher) */
                    const int two = k + 1 < m;
                    const int64_t at = (g0 + k) * 32;
                    _mm_prefetch((const char *)(wq + at + Q8_AHEAD), _MM_HINT_T0);
                    const __m512i wv = two ? _mm512_loadu_si512(wq + at) : load_half(wq + at);
                    const __m512i wa = _mm512_abs_epi8(wv);
                    const __mmask64 neg = _mm512_movepi8_mask(wv);
                    const __m512i lanes = _mm512_add_epi32(pair_lanes, _mm512_set1_epi32((int)k));
                    for (int t = 0; t < NT; t++) {
                        const int8_t *xp = x->q + (i + t) * K + at;
                        const __m512i xv = two ? _mm512_loadu_si512(xp) : load_half(xp);
                        const __m512i s = _mm512_dpbusd_epi32(zero, wa, _mm512_mask_sub_epi8(xv, neg, zero, xv));
                        acc[t] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lanes, dwx[t]), _mm512_cvtepi32_ps(s), acc[t]);
                    }
                }
            } else {
                for (int64_t k = 0; k < m; k++) {
                    __m512i s[4];
                    for (int t = 0; t < NT; t++) s[t] = zero;
                    for (int64_t at = (g0 + k) * G, end = at + G; at < end; at += 64) {
                        _mm_prefetch((const char *)(wq + at + Q8_AHEAD), _MM_HINT_T0);
                        const __m512i wv = _mm512_loadu_si512(wq + at);
                        const __m512i wa = _mm512_abs_epi8(wv);
                        const __mmask64 neg = _mm512_movepi8_mask(wv);
                        for (int t = 0; t < NT; t++) {
                            const __m512i xv = _mm512_loadu_si512(x->q + (i + t) * K + at);
                            s[t] = _mm512_dpbusd_epi32(s[t], wa, _mm512_mask_sub_epi8(xv, neg, zero, xv));
                        }
                    }
                    const __m512i lane = _mm512_set1_epi32((int)k);
                    for (int t = 0; t < NT; t++)
                        acc[t] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lane, dwx[t]), _mm512_cvtepi32_ps(s[t]), acc[t]);
                }
            }
        }
        for (int t = 0; t < NT; t++) y[(i + t) * ldy + r] = _mm512_reduce_add_ps(acc[t]);
    }
}

QRZ_AVX512 static void q8_matmul_avx512(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                        int64_t ldy) {
    if (w->group != 32 && w->group % 64 != 0) {
        q8_matmul_other(w, x, r0, r1, y, ldy);
        return;
    }
    int64_t i = 0;
    for (; i + 4 <= x->n; i += 4) q8_rows_avx512(w, x, i, r0, r1, y, ldy, 4);
    switch (x->n - i) {
    case 3: q8_rows_avx512(w, x, i, r0, r1, y, ldy, 3); break;
    case 2: q8_rows_avx512(w, x, i, r0, r1, y, ldy, 2); break;
    case 1: q8_rows_avx512(w, x, i, r0, r1, y, ldy, 1); break;
    default: break;
    }
}

void qrz_register_avx512(void) {
    qrz_isa_inherit(QRZ_ISA_AVX512, QRZ_ISA_AVX2);
    q8_matmul_other = qrz_types[QRZ_TYPE_Q8].matmul[0][QRZ_ISA_AVX2];
    qrz_types[QRZ_TYPE_Q8].matmul[0][QRZ_ISA_AVX512] = q8_matmul_avx512;
    sdr_matmul_i8_few = qrz_types[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_AVX2];
    qrz_types[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_AVX512] = sdr_matmul_i8_avx512_blocks;
    fp4_matmul_few = qrz_types[QRZ_TYPE_FP4].matmul[0][QRZ_ISA_AVX2];
    qrz_types[QRZ_TYPE_FP4].matmul[0][QRZ_ISA_AVX512] = fp4_matmul_avx512;
    qrz_types[QRZ_TYPE_FP4].matmul[1][QRZ_ISA_AVX512] = fp4_matmul_avx512;
}
#else
/* this compiler cannot emit AVX-512: the column is the AVX2 one */
void qrz_register_avx512(void) { qrz_isa_inherit(QRZ_ISA_AVX512, QRZ_ISA_AVX2); }
#endif
