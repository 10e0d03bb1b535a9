/* kernels_neon.c - AArch64 Advanced SIMD (NEON) matmul kernels, one per tensor type and activation path.
 *
 * NEON is part of the AArch64 base ISA, so these kernels need no run-time check. The integer kernels come in two
 * builds: plain NEON (widening int8 multiplies, pairwise accumulation into int32) and one using the Armv8.2 dot
 * product (SDOT), compiled with a per-function target attribute and chosen at start-up only when the kernel
 * reports HWCAP_ASIMDDP (or unconditionally when the whole build already targets it).
 *
 * Every kernel is built from one "tile": NW weight rows x NX activation rows (1x4, 4x1 or 1x1), each (weight row,
 * activation row) pair owning one lane of an int32x4 / float32x4. A prompt (many activation rows) runs 1x4 tiles,
 * reusing each unpacked weight vector four times; decoding (one activation row) runs 4x1 tiles.
 *
 * The integer kernels compute exactly the scalar reference's (native/types.c) integer totals and then the same
 * float expression in the same order, lane by lane: SDR results are bit-identical to the scalar kernels, and so
 * are Q8/INT4/FP4/SQ as long as the build does not contract multiply-adds (ISO C mode, as pyqrt/_build.py compiles).
 */
#include "qrz_internal.h"
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#include <string.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif

/* the SDOT build: when the compiler targets it already, or when GCC's arm_neon.h declares vdotq_s32 behind a
 * target pragma (so a function with the +dotprod target attribute can use it); otherwise plain NEON only */
#if defined(__ARM_FEATURE_DOTPROD)
#define QRZ_NEON_DOTPROD 1
#define QRZ_DOTPROD_TARGET
#elif defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
#define QRZ_NEON_DOTPROD 1
#define QRZ_DOTPROD_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define QRZ_NEON_DOTPROD 0
#endif

#define QRZ_INLINE static inline __attribute__((always_inline))

int qrz_neon_uses_dotprod(void);

#if QRZ_NEON_DOTPROD
static int neon_has_dotprod(void) {
#if defined(__ARM_FEATURE_DOTPROD)
    return 1;
#elif QRZ_NEON_DOTPROD && defined(__linux__)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return 0;
#endif
}
#endif

static uint64_t align64(uint64_t n) { return (n + QRZ_ALIGN - 1) / QRZ_ALIGN * QRZ_ALIGN; }

/* half -> float with the hardware conversion (exact, as qrz_f16_to_f32) */
QRZ_INLINE float h2f(uint16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }

/* ---- 16 int8 x int8 products added into an int32x4 (which lanes get which products does not matter: the
 * lanes are summed at the end of each group) ---- */
typedef int32x4_t (*dot16_fn)(int32x4_t acc, int8x16_t a, int8x16_t b);

/* two products per int16 lane: activation codes are within +-127 (the runtime's quantizers), so even an int8
 * weight of -128 keeps each pair below 2 * 128 * 127 < 32767 */
QRZ_INLINE int32x4_t dot16_mull(int32x4_t acc, int8x16_t a, int8x16_t b) {
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    p = vmlal_high_s8(p, a, b);
    return vpadalq_s16(acc, p);
}

#if QRZ_NEON_DOTPROD
QRZ_DOTPROD_TARGET QRZ_INLINE int32x4_t dot16_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vdotq_s32(acc, a, b);
}
#endif

/* the L lane totals of acc[0..L) as one int32x4 (L = 4 or 1; unused lanes 0) */
QRZ_INLINE int32x4_t lane_totals(const int32x4_t *acc, int L) {
    if (L == 4) return vpaddq_s32(vpaddq_s32(acc[0], acc[1]), vpaddq_s32(acc[2], acc[3]));
    return vsetq_lane_s32(vaddvq_s32(acc[0]), vdupq_n_s32(0), 0);
}

/* ---- the 4-bit plane (SDR, INT4, FP4, SQ): each run of 32 values in 16 bytes, value j in the low nibble of byte j
 * and value j + 16 in its high nibble; SDR, INT4 and SQ store mantissas m as m + 8, FP4 stores codes 0..15 that its
 * layout's 16-entry table turns into int8 values (TBL: one instruction for 16 lookups) ---- */
QRZ_INLINE int8x16_t nib_lo(uint8x16_t b) {
    return vsubq_s8(vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(15))), vdupq_n_s8(8));
}
QRZ_INLINE int8x16_t nib_hi(uint8x16_t b) { return vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(b, 4)), vdupq_n_s8(8)); }

/* the low / high nibbles as values: through table when there is one (FP4), else as m + 8 mantissas; table is a
 * constant per kernel, so the inlined test folds away */
QRZ_INLINE int8x16_t unpack_lo(uint8x16_t b, const int8x16_t *table) {
    return table ? vqtbl1q_s8(*table, vandq_u8(b, vdupq_n_u8(15))) : nib_lo(b);
}
QRZ_INLINE int8x16_t unpack_hi(uint8x16_t b, const int8x16_t *table) {
    return table ? vqtbl1q_s8(*table, vshrq_n_u8(b, 4)) : nib_hi(b);
}

/* acc[a * NX + b] += products of weight row a's values and activation row b's codes over columns [c, end);
 * c and end are multiples of 16 (group sizes of the 4-bit formats are), so a group may start or end mid-run */
QRZ_INLINE void nib_dot(const uint8_t *const *wm, const int8_t *const *xq, int NW, int NX, int64_t c, int64_t end,
                        const int8x16_t *table, dot16_fn dot, int32x4_t *acc) {
    if (c < end && (c & 16)) {            /* the high half of a run */
        int8x16_t wv[4];
        for (int a = 0; a < NW; a++) wv[a] = unpack_hi(vld1q_u8(wm[a] + (c >> 5) * 16), table);
        for (int b = 0; b < NX; b++) {
            const int8x16_t xv = vld1q_s8(xq[b] + c);
            for (int a = 0; a < NW; a++) acc[a * NX + b] = dot(acc[a * NX + b], wv[a], xv);
        }
        c += 16;
    }
    for (; c + 32 <= end; c += 32) {      /* whole runs: one load, two unpacks per weight row */
        int8x16_t lo[4], hi[4];
        for (int a = 0; a < NW; a++) {
            const uint8x16_t raw = vld1q_u8(wm[a] + (c >> 5) * 16);
            lo[a] = unpack_lo(raw, table);
            hi[a] = unpack_hi(raw, table);
        }
        for (int b = 0; b < NX; b++) {
            const int8x16_t x0 = vld1q_s8(xq[b] + c), x1 = vld1q_s8(xq[b] + c + 16);
            for (int a = 0; a < NW; a++) {
                acc[a * NX + b] = dot(acc[a * NX + b], lo[a], x0);
                acc[a * NX + b] = dot(acc[a * NX + b], hi[a], x1);
            }
        }
    }
    if (c < end) {                        /* the low half of a run */
        int8x16_t wv[4];
        for (int a = 0; a < NW; a++) wv[a] = unpack_lo(vld1q_u8(wm[a] + (c >> 5) * 16), table);
        for (int b = 0; b < NX; b++) {
            const int8x16_t xv = vld1q_s8(xq[b] + c);
            for (int a = 0; a < NW; a++) acc[a * NX + b] = dot(acc[a * NX + b], wv[a], xv);
        }
    }
}

/* ---- tiles: y for weight rows [r, r + NW) x activation rows [i, i + NX) ---- */
#define TILE_PARAMS const qrz_weight *w, const qrz_acts *x, int64_t r, int64_t i, float *y, int64_t ldy
typedef void (*tile_fn)(TILE_PARAMS);

QRZ_INLINE void store_f32(float32x4_t v, int NW, int NX, int64_t r, int64_t i, float *y, int64_t ldy) {
    float out[4];
    vst1q_f32(out, v);
    for (int a = 0; a < NW; a++)
        for (int b = 0; b < NX; b++) y[(i + b) * ldy + r + a] = out[a * NX + b];
}

/* float weights: one float32x4 accumulator pair per lane, FMA over columns; scalar tail */
typedef float32x4_t (*load4_fn)(const void *row, int64_t c);
typedef float (*load1_fn)(const void *row, int64_t c);
QRZ_INLINE float32x4_t load4_f32(const void *row, int64_t c) { return vld1q_f32((const float *)row + c); }
QRZ_INLINE float load1_f32(const void *row, int64_t c) { return ((const float *)row)[c]; }
QRZ_INLINE float32x4_t load4_f16(const void *row, int64_t c) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)row + c)));
}
QRZ_INLINE float load1_f16(const void *row, int64_t c) { return h2f(((const uint16_t *)row)[c]); }

QRZ_INLINE void float_tile(TILE_PARAMS, int NW, int NX, load4_fn load4, load1_fn load1, size_t elem) {
    const int64_t K = w->cols, K4 = K & ~(int64_t)3, K8 = K & ~(int64_t)7;
    const void *wr[4];
    const float *xr[4];
    for (int a = 0; a < NW; a++) wr[a] = (const uint8_t *)w->data + (uint64_t)(r + a) * K * elem;
    for (int b = 0; b < NX; b++) xr[b] = x->f32 + (i + b) * K;
    float32x4_t acc0[4], acc1[4];
    for (int l = 0; l < 4; l++) acc0[l] = acc1[l] = vdupq_n_f32(0.0f);
    int64_t c = 0;
    for (; c < K8; c += 8) {
        float32x4_t w0[4], w1[4];
        for (int a = 0; a < NW; a++) { w0[a] = load4(wr[a], c); w1[a] = load4(wr[a], c + 4); }
        for (int b = 0; b < NX; b++) {
            const float32x4_t x0 = vld1q_f32(xr[b] + c), x1 = vld1q_f32(xr[b] + c + 4);
            for (int a = 0; a < NW; a++) {
                acc0[a * NX + b] = vfmaq_f32(acc0[a * NX + b], w0[a], x0);
                acc1[a * NX + b] = vfmaq_f32(acc1[a * NX + b], w1[a], x1);
            }
        }
    }
    for (; c < K4; c += 4)
        for (int a = 0; a < NW; a++) {
            const float32x4_t wv = load4(wr[a], c);
            for (int b = 0; b < NX; b++) acc0[a * NX + b] = vfmaq_f32(acc0[a * NX + b], wv, vld1q_f32(xr[b] + c));
        }
    for (int a = 0; a < NW; a++)
        for (int b = 0; b < NX; b++) {
            float s = vaddvq_f32(vaddq_f32(acc0[a * NX + b], acc1[a * NX + b]));
            for (int64_t t = K4; t < K; t++) s += load1(wr[a], t) * xr[b][t];
            y[(i + b) * ldy + r + a] = s;
        }
}

/* Q8 weights x Q8_GROUP activations: int32 per group (16 columns per step, scalar for a group's last G % 16),
 * then acc += (d_w * d_x) * sum per lane, as the scalar kernel */
QRZ_INLINE void q8_tile(TILE_PARAMS, int NW, int NX, dot16_fn dot) {
    const int32_t G = w->group, G16 = G & ~15;
    const int64_t K = w->cols, ng = K / G;
    const uint16_t *scales = (const uint16_t *)w->data;
    const int8_t *quants = (const int8_t *)w->data + align64((uint64_t)w->rows * ng * 2);
    const int8_t *wq[4], *xq[4];
    const uint16_t *wd[4];
    const float *xd[4];
    for (int a = 0; a < NW; a++) { wq[a] = quants + (r + a) * K; wd[a] = scales + (r + a) * ng; }
    for (int b = 0; b < NX; b++) { xq[b] = x->q + (i + b) * K; xd[b] = x->d + (i + b) * ng; }
    float32x4_t facc = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < ng; g++) {
        const int64_t c0 = g * G;
        int32x4_t acc[4];
        for (int l = 0; l < 4; l++) acc[l] = vdupq_n_s32(0);
        for (int64_t c = c0; c < c0 + G16; c += 16) {
            int8x16_t wv[4];
            for (int a = 0; a < NW; a++) wv[a] = vld1q_s8(wq[a] + c);
            for (int b = 0; b < NX; b++) {
                const int8x16_t xv = vld1q_s8(xq[b] + c);
                for (int a = 0; a < NW; a++) acc[a * NX + b] = dot(acc[a * NX + b], wv[a], xv);
            }
        }
        int32x4_t sums = lane_totals(acc, NW * NX);
        if (G16 < G) {
            int32_t tail[4] = {0, 0, 0, 0};
            for (int a = 0; a < NW; a++)
                for (int b = 0; b < NX; b++)
                    for (int64_t c = c0 + G16; c < c0 + G; c++) tail[a * NX + b] += (int32_t)wq[a][c] * xq[b][c];
            sums = vaddq_s32(sums, vld1q_s32(tail));
        }
        float sc[4] = {0, 0, 0, 0};
        for (int a = 0; a < NW; a++)
            for (int b = 0; b < NX; b++) sc[a * NX + b] = h2f(wd[a][g]) * xd[b][g];
        facc = vaddq_f32(facc, vmulq_f32(vld1q_f32(sc), vcvtq_f32_s32(sums)));
    }
    store_f32(facc, NW, NX, r, i, y, ldy);
}

/* INT4 and SQ weights x Q8_GROUP, Q4_GROUP or SQ4_GROUP activations (int8 lanes within +-127, one scale per
 * group): the nibble sums (as Q8, with the nibble plane), plus for SQ each group's k slots (16 h * x[pos], scalar:
 * k is a few per group; a weight row's slots are read once for the tile's activation rows) added into the lane's
 * int32 total before its one float multiply-add, so every lane is the scalar kernel's integer sum and float
 * expression. |q| <= 8 and |16 h| <= 128 against |x| <= 127 over at most 256 + 256 terms keep the total within
 * int32 (and within float's exact integers). INT4 is the case k = 0. */
QRZ_INLINE void nib4_tile(TILE_PARAMS, int NW, int NX, dot16_fn dot, const uint8_t *codes, const uint16_t *scales,
                          const uint8_t *slots, int32_t k, int32_t pos_bits, int32_t record) {
    const int32_t G = w->group;
    const int64_t K = w->cols, ng = K / G;
    const uint8_t *wm[4], *ws[4];
    const int8_t *xq[4];
    const uint16_t *wd[4];
    const float *xd[4];
    for (int a = 0; a < NW; a++) {
        wm[a] = codes + (r + a) * (K / 2);
        wd[a] = scales + (r + a) * ng;
        ws[a] = slots ? slots + (uint64_t)(r + a) * ng * record : NULL;
    }
    for (int b = 0; b < NX; b++) { xq[b] = x->q + (i + b) * K; xd[b] = x->d + (i + b) * ng; }
    float32x4_t facc = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < ng; g++) {
        int32x4_t acc[4];
        for (int l = 0; l < 4; l++) acc[l] = vdupq_n_s32(0);
        nib_dot(wm, xq, NW, NX, g * G, g * G + G, NULL, dot, acc);
        int32_t slot_sums[4] = {0, 0, 0, 0};
        for (int a = 0; a < NW && k; a++) {
            int32_t pos[QRZ_SQ_MAX_GROUP], high[QRZ_SQ_MAX_GROUP];
            qrz_sq_slots(ws[a] + (uint64_t)g * record, k, pos_bits, record, pos, high);
            for (int32_t s = 0; s < k; s++)
                for (int b = 0; b < NX; b++) slot_sums[a * NX + b] += high[s] * xq[b][g * G + pos[s]];
        }
        const int32x4_t sums = vaddq_s32(lane_totals(acc, NW * NX), vld1q_s32(slot_sums));
        float sc[4] = {0, 0, 0, 0};
        for (int a = 0; a < NW; a++)
            for (int b = 0; b < NX; b++) sc[a * NX + b] = h2f(wd[a][g]) * xd[b][g];
        facc = vaddq_f32(facc, vmulq_f32(vld1q_f32(sc), vcvtq_f32_s32(sums)));
    }
    store_f32(facc, NW, NX, r, i, y, ldy);
}

QRZ_INLINE void int4_tile(TILE_PARAMS, int NW, int NX, dot16_fn dot) {
    const uint16_t *scales = (const uint16_t *)w->data;
    const uint8_t *mant = (const uint8_t *)w->data + align64((uint64_t)w->rows * (w->cols / w->group) * 2);
    nib4_tile(w, x, r, i, y, ldy, NW, NX, dot, mant, scales, NULL, 0, 0, 0);
}

QRZ_INLINE void sq_tile(TILE_PARAMS, int NW, int NX, dot16_fn dot) {
    const qrz_sq_view v = qrz_sq_split(w->data, w->rows, w->cols, w->group);
    nib4_tile(w, x, r, i, y, ldy, NW, NX, dot, v.codes, v.d, v.slots, v.k, v.pos_bits, v.record);
}

/* FP4 weights x Q8_GROUP or FP4 activations (int8 lanes within +-127; one scale per group, or per row for FP4 in
 * a row or static mode): the codes through the layout's table (values within +-64, so a dot16_mull int16 pair
 * stays within 2 * 64 * 127), an int32 sum per group, then per lane acc += (d_w * d_x,g) * sum in group order
 * (d_x,g = 1 for row scales) and one multiply by the row's activation scale (1 for group scales), as the scalar
 * kernel */
QRZ_INLINE void fp4_tile(TILE_PARAMS, int NW, int NX, dot16_fn dot) {
    const qrz_fp4_view v = qrz_fp4_split(w->data, w->rows, w->cols, w->group);
    const int8x16_t table = vld1q_s8(qrz_fp4_lut[v.e_w]);
    const int32_t G = w->group;
    const int64_t K = w->cols, ng = K / G;
    const uint8_t *wc[4];
    const int8_t *xq[4];
    const uint16_t *wd[4];
    for (int a = 0; a < NW; a++) { wc[a] = v.codes + (r + a) * (K / 2); wd[a] = v.d + (r + a) * ng; }
    for (int b = 0; b < NX; b++) xq[b] = x->q + (i + b) * K;
    const bool grouped = qrz_acts_grouped(x->kind);
    float32x4_t facc = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < ng; g++) {
        int32x4_t acc[4];
        for (int l = 0; l < 4; l++) acc[l] = vdupq_n_s32(0);
        nib_dot(wc, xq, NW, NX, g * G, g * G + G, &table, dot, acc);
        float sc[4] = {0, 0, 0, 0};
        for (int a = 0; a < NW; a++)
            for (int b = 0; b < NX; b++) sc[a * NX + b] = h2f(wd[a][g]) * (grouped ? x->d[(i + b) * ng + g] : 1.0f);
        facc = vaddq_f32(facc, vmulq_f32(vld1q_f32(sc), vcvtq_f32_s32(lane_totals(acc, NW * NX))));
    }
    float xd[4] = {0, 0, 0, 0};
    for (int a = 0; a < NW; a++)
        for (int b = 0; b < NX; b++) xd[a * NX + b] = grouped ? 1.0f : x->d[i + b];
    store_f32(vmulq_f32(facc, vld1q_f32(xd)), NW, NX, r, i, y, ldy);
}

/* SDR weights: row scale s (f32 plane), shift nibbles (flag plane), mantissas (nibble plane) */
typedef struct {
    const float *s;
    const uint8_t *e, *m;
    uint64_t e_stride;
} sdr_planes;

QRZ_INLINE sdr_planes sdr_split(const qrz_weight *w) {
    const uint8_t *base = (const uint8_t *)w->data;
    const uint64_t fb = (uint64_t)((w->cols / w->group + 1) / 2);
    const uint64_t s_bytes = align64((uint64_t)w->rows * 4);
    return (sdr_planes){(const float *)base, base + s_bytes, base + s_bytes + align64((uint64_t)w->rows * fb), fb};
}

QRZ_INLINE int sdr_shift(const uint8_t *flags, int64_t g) { return (flags[g >> 1] >> ((g & 1) * 4)) & 15; }

/* SDR x I8_ROW (W4A8) or SDR4_ROW (W4A4). Per group: the int32 lane sums shifted left by the weight's shift
 * (plus the activation's, W4A4) with vshlq_s32 and added into an int32 accumulator; W4A4 moves that into an int64
 * total every 256 columns, as the scalar kernel. Then one float multiply per output: total * (s_w * d_x). */
QRZ_INLINE void sdr_tile(TILE_PARAMS, int NW, int NX, dot16_fn dot, int act4) {
    const sdr_planes p = sdr_split(w);
    const int32_t G = w->group;
    const int64_t K = w->cols, ng = K / G, flush = 256 / G;
    const uint8_t *wm[4], *flags[4], *xe[4];
    const int8_t *xq[4];
    for (int a = 0; a < NW; a++) { wm[a] = p.m + (r + a) * (K / 2); flags[a] = p.e + (r + a) * p.e_stride; }
    for (int b = 0; b < NX; b++) { xq[b] = x->q + (i + b) * K; xe[b] = act4 ? x->e + (i + b) * ng : NULL; }
    int32x4_t iacc = vdupq_n_s32(0);
    int64x2_t tot_lo = vdupq_n_s64(0), tot_hi = vdupq_n_s64(0);
    for (int64_t g = 0; g < ng; g++) {
        int32x4_t acc[4];
        for (int l = 0; l < 4; l++) acc[l] = vdupq_n_s32(0);
        nib_dot(wm, xq, NW, NX, g * G, g * G + G, NULL, dot, acc);
        int32_t sh[4] = {0, 0, 0, 0};
        for (int a = 0; a < NW; a++)
            for (int b = 0; b < NX; b++) sh[a * NX + b] = sdr_shift(flags[a], g) + (act4 ? xe[b][g] : 0);
        iacc = vaddq_s32(iacc, vshlq_s32(lane_totals(acc, NW * NX), vld1q_s32(sh)));
        if (act4 && (g + 1) % flush == 0) {
            tot_lo = vaddw_s32(tot_lo, vget_low_s32(iacc));
            tot_hi = vaddw_high_s32(tot_hi, iacc);
            iacc = vdupq_n_s32(0);
        }
    }
    int64_t tot[4] = {0, 0, 0, 0};
    if (act4) {
        tot_lo = vaddw_s32(tot_lo, vget_low_s32(iacc));
        tot_hi = vaddw_high_s32(tot_hi, iacc);
        vst1q_s64(tot, tot_lo);
        vst1q_s64(tot + 2, tot_hi);
    }
    int32_t acc32[4];
    vst1q_s32(acc32, iacc);
    for (int a = 0; a < NW; a++)
        for (int b = 0; b < NX; b++) {
            const float scale = p.s[r + a] * x->d[i + b];
            y[(i + b) * ldy + r + a] = act4 ? (float)tot[a * NX + b] * scale : (float)acc32[a * NX + b] * scale;
        }
}

/* ---- the row loop: four weight rows at a time (they stay in cache while every activation row passes), 1x4
 * tiles over activation rows in fours, 4x1 tiles for the rest; leftover weight rows run 1x4 and 1x1 ---- */
QRZ_INLINE void run_tiles(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy,
                          tile_fn t1x4, tile_fn t4x1, tile_fn t1x1) {
    const int64_t n4 = x->n & ~(int64_t)3;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        for (int64_t i = 0; i < n4; i += 4)
            for (int a = 0; a < 4; a++) t1x4(w, x, r + a, i, y, ldy);
        for (int64_t i = n4; i < x->n; i++) t4x1(w, x, r, i, y, ldy);
    }
    for (; r < r1; r++) {
        for (int64_t i = 0; i < n4; i += 4) t1x4(w, x, r, i, y, ldy);
        for (int64_t i = n4; i < x->n; i++) t1x1(w, x, r, i, y, ldy);
    }
}

/* one matmul kernel: its three tile shapes and the row loop over them */
#define DEFINE_KERNEL(NAME, ATTR, TILE, ...)                                                                    \
    ATTR static void NAME##_1x4(TILE_PARAMS) { TILE(w, x, r, i, y, ldy, 1, 4, __VA_ARGS__); }                   \
    ATTR static void NAME##_4x1(TILE_PARAMS) { TILE(w, x, r, i, y, ldy, 4, 1, __VA_ARGS__); }                   \
    ATTR static void NAME##_1x1(TILE_PARAMS) { TILE(w, x, r, i, y, ldy, 1, 1, __VA_ARGS__); }                   \
    ATTR static void NAME(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) { \
        run_tiles(w, x, r0, r1, y, ldy, NAME##_1x4, NAME##_4x1, NAME##_1x1);                                    \
    }

#define QRZ_PLAIN

DEFINE_KERNEL(f32_matmul_neon, QRZ_PLAIN, float_tile, load4_f32, load1_f32, sizeof(float))
DEFINE_KERNEL(f16_matmul_neon, QRZ_PLAIN, float_tile, load4_f16, load1_f16, sizeof(uint16_t))
DEFINE_KERNEL(q8_matmul_neon, QRZ_PLAIN, q8_tile, dot16_mull)
DEFINE_KERNEL(int4_matmul_neon, QRZ_PLAIN, int4_tile, dot16_mull)
DEFINE_KERNEL(sdr_i8_matmul_neon, QRZ_PLAIN, sdr_tile, dot16_mull, 0)
DEFINE_KERNEL(sdr_sdr4_matmul_neon, QRZ_PLAIN, sdr_tile, dot16_mull, 1)
DEFINE_KERNEL(fp4_matmul_neon, QRZ_PLAIN, fp4_tile, dot16_mull)
DEFINE_KERNEL(sq_matmul_neon, QRZ_PLAIN, sq_tile, dot16_mull)
#if QRZ_NEON_DOTPROD
DEFINE_KERNEL(q8_matmul_sdot, QRZ_DOTPROD_TARGET, q8_tile, dot16_sdot)
DEFINE_KERNEL(int4_matmul_sdot, QRZ_DOTPROD_TARGET, int4_tile, dot16_sdot)
DEFINE_KERNEL(sdr_i8_matmul_sdot, QRZ_DOTPROD_TARGET, sdr_tile, dot16_sdot, 0)
DEFINE_KERNEL(sdr_sdr4_matmul_sdot, QRZ_DOTPROD_TARGET, sdr_tile, dot16_sdot, 1)
DEFINE_KERNEL(fp4_matmul_sdot, QRZ_DOTPROD_TARGET, fp4_tile, dot16_sdot)
DEFINE_KERNEL(sq_matmul_sdot, QRZ_DOTPROD_TARGET, sq_tile, dot16_sdot)
#endif

/* ---- attention vectors ---- */
static float dot_neon(const float *a, const float *b, int n) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        acc2 = vfmaq_f32(acc2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        acc3 = vfmaq_f32(acc3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(acc0, acc1), vaddq_f32(acc2, acc3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_neon(float *y, float a, const float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
        vst1q_f32(y + i + 4, vfmaq_n_f32(vld1q_f32(y + i + 4), vld1q_f32(x + i + 4), a));
    }
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}

static int g_dotprod;

/* 1 when the integer kernels registered are the SDOT build (for tests and logs) */
int qrz_neon_uses_dotprod(void) { return g_dotprod; }

void qrz_register_neon(void) {
    qrz_vec[QRZ_ISA_NEON] = (qrz_vec_ops){.dot = dot_neon, .axpy = axpy_neon};   /* softmax: the scalar one */
    qrz_type_traits *t = qrz_types;
    t[QRZ_TYPE_F32].matmul[0][QRZ_ISA_NEON] = f32_matmul_neon;
    t[QRZ_TYPE_F16].matmul[0][QRZ_ISA_NEON] = f16_matmul_neon;
    t[QRZ_TYPE_Q8].matmul[0][QRZ_ISA_NEON] = q8_matmul_neon;
    t[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_NEON] = sdr_i8_matmul_neon;
    t[QRZ_TYPE_SDR].matmul[1][QRZ_ISA_NEON] = sdr_sdr4_matmul_neon;
    t[QRZ_TYPE_INT4].matmul[0][QRZ_ISA_NEON] = int4_matmul_neon;
    t[QRZ_TYPE_INT4].matmul[1][QRZ_ISA_NEON] = int4_matmul_neon;
    t[QRZ_TYPE_FP4].matmul[0][QRZ_ISA_NEON] = fp4_matmul_neon;
    t[QRZ_TYPE_FP4].matmul[1][QRZ_ISA_NEON] = fp4_matmul_neon;
    t[QRZ_TYPE_SQ].matmul[0][QRZ_ISA_NEON] = sq_matmul_neon;
    t[QRZ_TYPE_SQ].matmul[1][QRZ_ISA_NEON] = sq_matmul_neon;
    g_dotprod = 0;
#if QRZ_NEON_DOTPROD
    if (neon_has_dotprod()) {
        g_dotprod = 1;
        t[QRZ_TYPE_Q8].matmul[0][QRZ_ISA_NEON] = q8_matmul_sdot;
        t[QRZ_TYPE_SDR].matmul[0][QRZ_ISA_NEON] = sdr_i8_matmul_sdot;
        t[QRZ_TYPE_SDR].matmul[1][QRZ_ISA_NEON] = sdr_sdr4_matmul_sdot;
        t[QRZ_TYPE_INT4].matmul[0][QRZ_ISA_NEON] = int4_matmul_sdot;
        t[QRZ_TYPE_INT4].matmul[1][QRZ_ISA_NEON] = int4_matmul_sdot;
        t[QRZ_TYPE_FP4].matmul[0][QRZ_ISA_NEON] = fp4_matmul_sdot;
        t[QRZ_TYPE_FP4].matmul[1][QRZ_ISA_NEON] = fp4_matmul_sdot;
        t[QRZ_TYPE_SQ].matmul[0][QRZ_ISA_NEON] = sq_matmul_sdot;
        t[QRZ_TYPE_SQ].matmul[1][QRZ_ISA_NEON] = sq_matmul_sdot;
    }
#endif
}
#else
void qrz_register_neon(void) {}
int qrz_neon_uses_dotprod(void);
int qrz_neon_uses_dotprod(void) { return 0; }
#endif
