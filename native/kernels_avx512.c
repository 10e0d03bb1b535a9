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

QRZ_AVX512 static void fp4_matmul_avx512(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y,
                                         int64_t ldy) {
    int64_t r = r0;
    if (x->n >= AVX512_NT && w->group <= 256)
        for (; r + COL_ROWS <= r1; r += COL_ROWS) fp4_block16(w, x, r, y, ldy);
    if (r < r1) fp4_matmul_few(w, x, r, r1, y, ldy);   /* the AVX2 kernel: the same results bit for bit */
}

void qrz_register_avx512(void) {
    qrz_isa_inherit(QRZ_ISA_AVX512, QRZ_ISA_AVX2);
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
