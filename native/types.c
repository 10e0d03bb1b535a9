/* types.c - the block-format table: one row per tensor type, with its scalar reference kernels.
 *
 * A format is: how many bytes a (rows, cols) tensor takes, how to turn a row back into floats, and a matmul
 * kernel per ISA. The scalar kernels here are the reference every SIMD kernel is tested against.
 */
#include "qrz_internal.h"
#include <math.h>
#include <stdlib.h>
#include <stdbool.h>
#include <string.h>

static uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

/* ---- F32 ---- */
static uint64_t f32_nbytes(int64_t rows, int64_t cols, int32_t group) {
    (void)group;
    return (uint64_t)rows * (uint64_t)cols * 4;
}

static void f32_dequant_row(const qrz_weight *w, int64_t r, float *out) {
    memcpy(out, (const float *)w->data + r * w->cols, w->cols * sizeof(float));
}

static void f32_matmul_scalar(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = (const float *)w->data + r * w->cols;
        for (int64_t i = 0; i < x->n; i++) {
            const float *xi = x->f32 + i * x->cols;
            float acc = 0.0f;
            for (int64_t c = 0; c < w->cols; c++) acc += wr[c] * xi[c];
            y[i * ldy + r] = acc;
        }
    }
}

/* ---- F16 ---- */
static uint64_t f16_nbytes(int64_t rows, int64_t cols, int32_t group) {
    (void)group;
    return (uint64_t)rows * (uint64_t)cols * 2;
}

static void f16_dequant_row(const qrz_weight *w, int64_t r, float *out) {
    const uint16_t *wr = (const uint16_t *)w->data + r * w->cols;
    for (int64_t c = 0; c < w->cols; c++) out[c] = qrz_f16_to_f32(wr[c]);
}

static void f16_matmul_scalar(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = (const uint16_t *)w->data + r * w->cols;
        for (int64_t i = 0; i < x->n; i++) {
            const float *xi = x->f32 + i * x->cols;
            float acc = 0.0f;
            for (int64_t c = 0; c < w->cols; c++) acc += qrz_f16_to_f32(wr[c]) * xi[c];
            y[i * ldy + r] = acc;
        }
    }
}

/* ---- Q8: int8 absmax groups; a plane of f16 scales, then a plane of int8 quants (docs/FORMAT.md) ---- */
static uint64_t q8_nbytes(int64_t rows, int64_t cols, int32_t group) {
    if (group <= 0 || cols % group) return 0;
    return align_up((uint64_t)rows * (uint64_t)(cols / group) * 2, QRZ_ALIGN) + (uint64_t)rows * (uint64_t)cols;
}

static const uint16_t *q8_scales(const qrz_weight *w) { return (const uint16_t *)w->data; }
static const int8_t *q8_quants(const qrz_weight *w) {
    return (const int8_t *)w->data + align_up((uint64_t)w->rows * (w->cols / w->group) * 2, QRZ_ALIGN);
}

static void q8_dequant_row(const qrz_weight *w, int64_t r, float *out) {
    int64_t ng = w->cols / w->group;
    const uint16_t *d = q8_scales(w) + r * ng;
    const int8_t *q = q8_quants(w) + r * w->cols;
    for (int64_t c = 0; c < w->cols; c++) out[c] = qrz_f16_to_f32(d[c / w->group]) * q[c];
}

static void q8_matmul_scalar(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const int32_t G = w->group;
    const int64_t ng = w->cols / G;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wd = q8_scales(w) + r * ng;
        const int8_t *wq = q8_quants(w) + r * w->cols;
        for (int64_t i = 0; i < x->n; i++) {
            const int8_t *xq = x->q + i * x->cols;
            const float *xd = x->d + i * ng;
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                int32_t sum = 0;   /* |sum| <= G * 127 * 127: fits int32 for any group below 2^17 */
                for (int32_t k = 0; k < G; k++) sum += (int32_t)wq[g * G + k] * xq[g * G + k];
                acc += qrz_f16_to_f32(wd[g]) * xd[g] * (float)sum;
            }
            y[i * ldy + r] = acc;
        }
    }
}

/* ---- 4-bit codes: mantissas in -8..7 stored as nibbles m + 8, each run of 32 values in 16 bytes, byte j holding
 * values j (low nibble) and j + 16 (high nibble); SDR and INT4 share this plane ---- */
static inline int nibble_at(const uint8_t *row, int64_t c) {
    const uint8_t b = row[(c >> 5) * 16 + (c & 15)];
    return ((c & 16) ? (b >> 4) : (b & 15)) - 8;
}

static bool nibble_shape_ok(int64_t cols, int32_t group, int32_t max_group) {
    return group > 0 && group % 16 == 0 && group <= max_group && cols % group == 0 && cols % 32 == 0;
}

/* ---- SDR (QRazor): row scale s (f32), per-group shift e (nibbles), 4-bit mantissas; value s * 2^e * m ---- */
#define SDR_MAX_COLS (1 << 17)    /* |m 2^e| <= 128 and |q| <= 127: a row of up to 2^17 columns sums in int32 */
#define SDR_MAX_SHIFT 4           /* an int8 base has its leading one at bit 6 at most: shifts 0..4 */

static uint64_t sdr_flag_bytes(int64_t cols, int32_t group) { return (uint64_t)((cols / group + 1) / 2); }

static uint64_t sdr_nbytes(int64_t rows, int64_t cols, int32_t group) {
    if (!nibble_shape_ok(cols, group, 256) || cols > SDR_MAX_COLS) return 0;
    return align_up((uint64_t)rows * 4, QRZ_ALIGN) + align_up((uint64_t)rows * sdr_flag_bytes(cols, group), QRZ_ALIGN) +
           (uint64_t)rows * (uint64_t)cols / 2;
}

typedef struct {
    const float *s;               /* [rows] */
    const uint8_t *e;             /* [rows][flag bytes] */
    const uint8_t *m;             /* [rows][cols/2] */
    uint64_t e_stride;
} sdr_planes;

static sdr_planes sdr_split(const qrz_weight *w) {
    const uint8_t *base = w->data;
    const uint64_t fb = sdr_flag_bytes(w->cols, w->group);
    const uint64_t s_bytes = align_up((uint64_t)w->rows * 4, QRZ_ALIGN);
    return (sdr_planes){(const float *)base, base + s_bytes, base + s_bytes + align_up((uint64_t)w->rows * fb, QRZ_ALIGN), fb};
}

static inline int sdr_shift(const uint8_t *flags, int64_t g) { return (flags[g >> 1] >> ((g & 1) * 4)) & 15; }

static void sdr_dequant_row(const qrz_weight *w, int64_t r, float *out) {
    const sdr_planes p = sdr_split(w);
    const uint8_t *flags = p.e + r * p.e_stride, *mant = p.m + r * (w->cols / 2);
    for (int64_t c = 0; c < w->cols; c++)
        out[c] = p.s[r] * (float)(nibble_at(mant, c) * (1 << sdr_shift(flags, c / w->group)));
}

/* W4A8: activations int8 per row; sum_g 2^e_g sum_k m_k q_k in int32, one float multiply per output */
/* shifts above 4 (an int8 base's leading one is at bit 6 at most) would break the kernels' int32 bounds */
static const char *sdr_check(const qrz_weight *w) {
    const sdr_planes p = sdr_split(w);
    const int64_t ng = w->cols / w->group;
    for (int64_t r = 0; r < w->rows; r++)
        for (int64_t g = 0; g < ng; g++)
            if (sdr_shift(p.e + (uint64_t)r * p.e_stride, g) > SDR_MAX_SHIFT)
                return "an SDR shift above 4";
    return NULL;
}

static void sdr_matmul_i8_scalar(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const sdr_planes p = sdr_split(w);
    const int32_t G = w->group;
    const int64_t ng = w->cols / G;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *flags = p.e + r * p.e_stride, *mant = p.m + r * (w->cols / 2);
        for (int64_t i = 0; i < x->n; i++) {
            const int8_t *xq = x->q + i * x->cols;
            int32_t acc = 0;
            for (int64_t g = 0; g < ng; g++) {
                int32_t sum = 0;
                for (int32_t k = 0; k < G; k++) sum += nibble_at(mant, g * G + k) * xq[g * G + k];
                acc += sum * (1 << sdr_shift(flags, g));
            }
            y[i * ldy + r] = (float)acc * (p.s[r] * x->d[i]);
        }
    }
}

/* W4A4: both sides SDR; sum_g 2^(e_w + e_x) sum_k m_w m_x, int32 over at most 256 columns, then into an int64 */
static void sdr_matmul_sdr4_scalar(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const sdr_planes p = sdr_split(w);
    const int32_t G = w->group;
    const int64_t ng = w->cols / G, flush = 256 / G;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *flags = p.e + r * p.e_stride, *mant = p.m + r * (w->cols / 2);
        for (int64_t i = 0; i < x->n; i++) {
            const int8_t *xq = x->q + i * x->cols;
            const uint8_t *xe = x->e + i * ng;
            int64_t total = 0;
            int32_t acc = 0;
            for (int64_t g = 0; g < ng; g++) {
                int32_t sum = 0;
                for (int32_t k = 0; k < G; k++) sum += nibble_at(mant, g * G + k) * xq[g * G + k];
                acc += sum * (1 << (sdr_shift(flags, g) + xe[g]));
                if ((g + 1) % flush == 0) { total += acc; acc = 0; }
            }
            total += acc;
            y[i * ldy + r] = (float)total * (p.s[r] * x->d[i]);
        }
    }
}

/* ---- INT4: round-to-nearest, f16 scale per group, the same mantissa plane; the baseline ---- */
static uint64_t int4_nbytes(int64_t rows, int64_t cols, int32_t group) {
    if (!nibble_shape_ok(cols, group, 1 << 16)) return 0;
    return align_up((uint64_t)rows * (uint64_t)(cols / group) * 2, QRZ_ALIGN) + (uint64_t)rows * (uint64_t)cols / 2;
}

static const uint8_t *int4_mant(const qrz_weight *w) {
    return (const uint8_t *)w->data + align_up((uint64_t)w->rows * (w->cols / w->group) * 2, QRZ_ALIGN);
}

static void int4_dequant_row(const qrz_weight *w, int64_t r, float *out) {
    const uint16_t *d = (const uint16_t *)w->data + r * (w->cols / w->group);
    const uint8_t *mant = int4_mant(w) + r * (w->cols / 2);
    for (int64_t c = 0; c < w->cols; c++) out[c] = qrz_f16_to_f32(d[c / w->group]) * (float)nibble_at(mant, c);
}

/* INT4 and SQ: codes (nibble plane), f16 scales and, for SQ, k slots per group (records of `record` bytes);
 * INT4 is the case k = 0 */
typedef struct {
    const uint16_t *d;
    const uint8_t *codes, *slots;
    int32_t k, pos_bits, record;
} nib4_planes;

/* activations int8 or int4 per group (Q8_GROUP / Q4_GROUP / SQ4_GROUP): one int32 sum per group of the dense codes
 * and the group's slots (|q| <= 8 and |16 h| <= 128 against |x| <= 127 over at most 256 + 256 terms for SQ:
 * within int32), one float multiply-add per group */
static void nib4_matmul_scalar(const qrz_weight *w, nib4_planes p, const qrz_acts *x, int64_t r0, int64_t r1,
                               float *y, int64_t ldy) {
    const int32_t G = w->group;
    const int64_t ng = w->cols / G;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wd = p.d + r * ng;
        const uint8_t *codes = p.codes + r * (w->cols / 2);
        for (int64_t i = 0; i < x->n; i++) {
            const int8_t *xq = x->q + i * x->cols;
            const float *xd = x->d + i * ng;
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                int32_t sum = 0;
                for (int32_t k = 0; k < G; k++) sum += nibble_at(codes, g * G + k) * xq[g * G + k];
                const uint8_t *record = p.slots + ((uint64_t)r * ng + g) * (uint64_t)p.record;
                for (int32_t j = 0; j < p.k; j++) {
                    int32_t pos;
                    const int32_t high = qrz_sq_slot(record, j, p.pos_bits, &pos);
                    sum += high * xq[g * G + pos];
                }
                acc += qrz_f16_to_f32(wd[g]) * xd[g] * (float)sum;
            }
            y[i * ldy + r] = acc;
        }
    }
}

static void int4_matmul_scalar(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    nib4_matmul_scalar(w, (nib4_planes){(const uint16_t *)w->data, int4_mant(w), NULL, 0, 0, 0}, x, r0, r1, y, ldy);
}

/* ---- FP4 (LLM-FP4): header, activation offsets, f16 group scales, codes; value d * lut[code] ---- */
const int8_t qrz_fp4_lut[4][16] = {
    {0},
    {0, 1, 2, 3, 4, 5, 6, 7, 0, -1, -2, -3, -4, -5, -6, -7},                /* E1M2: sign-magnitude integers */
    {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12},              /* E2M1, in steps of 0.5 */
    {0, 1, 2, 4, 8, 16, 32, 64, 0, -1, -2, -4, -8, -16, -32, -64},         /* E3M0: powers of two */
};

/* 2^E - 1 (LLM-FP4's offset range), cut so that every activation lane lut[code] << K fits an int8 */
int qrz_fp4_max_shift(int e) {
    static const int k[4] = {0, 1, 3, 0};
    return e >= 1 && e <= 3 ? k[e] : 0;
}

static uint64_t fp4_nbytes(int64_t rows, int64_t cols, int32_t group) {
    if (!nibble_shape_ok(cols, group, 1 << 16) || group % 32) return 0;
    return QRZ_FP4_HEADER + align_up((uint64_t)cols, QRZ_ALIGN) + align_up((uint64_t)rows * (cols / group) * 2, QRZ_ALIGN) +
           (uint64_t)rows * (uint64_t)cols / 2;
}

qrz_fp4_view qrz_fp4_split(const uint8_t *data, int64_t rows, int64_t cols, int32_t group) {
    qrz_fp4_view v = {data[0], data[1], data[2], 0.0f, NULL, NULL, NULL};
    memcpy(&v.scale, data + 4, 4);
    v.shifts = data + QRZ_FP4_HEADER;
    v.d = (const uint16_t *)(v.shifts + align_up((uint64_t)cols, QRZ_ALIGN));
    v.codes = (const uint8_t *)v.d + align_up((uint64_t)rows * (cols / group) * 2, QRZ_ALIGN);
    return v;
}

static const char *fp4_check(const qrz_weight *w) {
    const qrz_fp4_view v = qrz_fp4_split(w->data, w->rows, w->cols, w->group);
    if (v.e_w < 1 || v.e_w > 3 || v.e_a < 1 || v.e_a > 3) return "an FP4 layout other than E1M2, E2M1, E3M0";
    if (v.mode > QRZ_FP4_GROUP) return "an unknown FP4 activation scale mode";
    if (!(v.scale > 0.0f) || !isfinite(v.scale)) return "an FP4 activation scale that is not a positive number";
    const int K = qrz_fp4_max_shift(v.e_a);
    for (int64_t c = 0; c < w->cols; c++)
        if (v.shifts[c] > K) return "an FP4 activation offset above its layout's largest";
    return NULL;
}

static void fp4_dequant_row(const qrz_weight *w, int64_t r, float *out) {
    const qrz_fp4_view v = qrz_fp4_split(w->data, w->rows, w->cols, w->group);
    const uint16_t *d = v.d + r * (w->cols / w->group);
    const uint8_t *codes = v.codes + r * (w->cols / 2);
    for (int64_t c = 0; c < w->cols; c++)
        out[c] = qrz_f16_to_f32(d[c / w->group]) * (float)qrz_fp4_lut[v.e_w][nibble_at(codes, c) + 8];
}

/* activations int8 per group (Q8_GROUP) or FP4 lanes with one scale per row (FP4) or per group (FP4_GROUP): an
 * int32 sum per group from the weight table's integers, acc += (d_w * d_x,g) * sum per group with d_x,g = 1 for
 * row scales (an exact multiply, so those keep the plain d_w * sum), then acc * d_x,row with d_x,row = 1 for
 * group scales. The SIMD kernels keep this order. */
static void fp4_matmul_scalar(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const qrz_fp4_view v = qrz_fp4_split(w->data, w->rows, w->cols, w->group);
    const int8_t *lut = qrz_fp4_lut[v.e_w];
    const int32_t G = w->group;
    const int64_t ng = w->cols / G;
    const bool grouped = qrz_acts_grouped(x->kind);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wd = v.d + r * ng;
        const uint8_t *codes = v.codes + r * (w->cols / 2);
        for (int64_t i = 0; i < x->n; i++) {
            const int8_t *xq = x->q + i * x->cols;
            const float *xd = grouped ? x->d + i * ng : NULL;   /* row kinds hold one scale per row */
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                int32_t sum = 0;   /* |lut| <= 64, |x| <= 127, G <= 2^16: within int32 */
                for (int32_t k = 0; k < G; k++) sum += lut[nibble_at(codes, g * G + k) + 8] * xq[g * G + k];
                acc += qrz_f16_to_f32(wd[g]) * (grouped ? xd[g] : 1.0f) * (float)sum;
            }
            y[i * ldy + r] = acc * (grouped ? 1.0f : x->d[i]);
        }
    }
}

/* ---- SQ-format: INT4 groups holding k slots each (position, the value's high part; its low part is the nibble) ---- */

static uint64_t sq_nbytes(int64_t rows, int64_t cols, int32_t group) {
    (void)rows; (void)cols; (void)group;
    return 0;   /* the slot plane's size is in the header */
}

static uint64_t sq_nbytes_head(const uint8_t *head, int64_t rows, int64_t cols, int32_t group) {
    if (!nibble_shape_ok(cols, group, QRZ_SQ_MAX_GROUP) || group % 32) return 0;
    uint16_t k, layout;
    memcpy(&k, head, 2);
    memcpy(&layout, head + 12, 2);
    if (k > group) return 0;
    const uint64_t ng = (uint64_t)rows * (uint64_t)(cols / group);
    /* the earlier layout's size (2 bytes a slot), so such a file passes the size check and sq_check can say why
     * it is refused */
    const uint64_t record = layout == 0 ? 2u * k : (uint64_t)qrz_sq_record(k, group);
    return QRZ_SQ_HEADER + align_up((uint64_t)cols, QRZ_ALIGN) + align_up(ng * 2, QRZ_ALIGN) +
           align_up(ng * record, QRZ_ALIGN) + (uint64_t)rows * (uint64_t)cols / 2;
}

qrz_sq_view qrz_sq_split(const uint8_t *data, int64_t rows, int64_t cols, int32_t group) {
    uint16_t k;
    memcpy(&k, data, 2);
    const uint64_t ng = (uint64_t)rows * (uint64_t)(cols / group);
    qrz_sq_view v = {k, 1.0f, data + QRZ_SQ_HEADER, NULL, NULL, NULL, qrz_sq_pos_bits(group), qrz_sq_record(k, group)};
    memcpy(&v.clip, data + 8, 4);
    v.d = (const uint16_t *)(v.hot + align_up((uint64_t)cols, QRZ_ALIGN));
    v.slots = (const uint8_t *)v.d + align_up(ng * 2, QRZ_ALIGN);
    v.codes = v.slots + align_up(ng * (uint64_t)v.record, QRZ_ALIGN);
    return v;
}

static const char *sq_check(const qrz_weight *w) {
    const qrz_sq_view v = qrz_sq_split(w->data, w->rows, w->cols, w->group);
    uint16_t layout;
    memcpy(&layout, (const uint8_t *)w->data + 12, 2);
    if (layout == 0)
        return "an SQ tensor in the slot layout of earlier converters (pairs of position and value)";
    if (layout != QRZ_SQ_LAYOUT_PACKED) return "an SQ slot layout other than 1";
    uint32_t n_hot, counted = 0;
    memcpy(&n_hot, (const uint8_t *)w->data + 4, 4);
    for (int64_t c = 0; c < w->cols; c++) {
        if (v.hot[c] > 1) return "an SQ hot-channel flag other than 0 or 1";
        counted += v.hot[c];
    }
    if (counted != n_hot) return "an SQ header whose hot-channel count disagrees with its hot plane";
    if (!(v.clip > 0.0f && v.clip <= 1.0f)) return "an SQ activation clipping outside (0, 1]";
    uint16_t grid;
    memcpy(&grid, (const uint8_t *)w->data + 2, 2);
    if (grid > QRZ_SQ_COLD_E2M1) return "an SQ cold-activation grid other than 0 (int4) or 1 (E2M1)";
    const uint64_t n = (uint64_t)w->rows * (uint64_t)(w->cols / w->group);
    for (uint64_t g = 0; g < n; g++)
        for (int32_t j = 0; j < v.k; j++) {
            int32_t pos;
            qrz_sq_slot(v.slots + g * (uint64_t)v.record, j, v.pos_bits, &pos);
            if (pos >= w->group) return "an SQ slot position outside its group";
        }
    return NULL;
}

static void sq_dequant_row(const qrz_weight *w, int64_t r, float *out) {
    const qrz_sq_view v = qrz_sq_split(w->data, w->rows, w->cols, w->group);
    const int32_t G = w->group;
    const int64_t ng = w->cols / G;
    const uint8_t *codes = v.codes + r * (w->cols / 2);
    for (int64_t g = 0; g < ng; g++) {
        int32_t u[QRZ_SQ_MAX_GROUP];
        for (int32_t k = 0; k < G; k++) u[k] = nibble_at(codes, g * G + k);
        const uint8_t *record = v.slots + ((uint64_t)r * ng + g) * (uint64_t)v.record;
        for (int32_t j = 0; j < v.k; j++) {
            int32_t pos;
            const int32_t high = qrz_sq_slot(record, j, v.pos_bits, &pos);
            u[pos] += high;
        }
        const float d = qrz_f16_to_f32(v.d[r * ng + g]);
        for (int32_t k = 0; k < G; k++) out[g * G + k] = d * (float)u[k];
    }
}

static void sq_matmul_scalar(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const qrz_sq_view v = qrz_sq_split(w->data, w->rows, w->cols, w->group);
    nib4_matmul_scalar(w, (nib4_planes){v.d, v.codes, v.slots, v.k, v.pos_bits, v.record}, x, r0, r1, y, ldy);
}

/* ---- activation quantizers (docs/QUANTIZATION.md); the reference for any SIMD version ---- */
static float absmax(const float *x, int64_t n) {
    float amax = 0.0f;
    for (int64_t k = 0; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    return amax;
}

static void quantize_groups(const float *x, int64_t n, int64_t cols, int32_t group, float qmax, float lo, float hi,
                            int8_t *q, float *d) {
    const int64_t ng = cols / group;
    for (int64_t i = 0; i < n; i++)
        for (int64_t g = 0; g < ng; g++) {
            const float *xg = x + i * cols + g * group;
            int8_t *qg = q + i * cols + g * group;
            const float dg = absmax(xg, group) / qmax, inv = dg > 0.0f ? 1.0f / dg : 0.0f;
            d[i * ng + g] = dg;
            for (int32_t k = 0; k < group; k++) qg[k] = (int8_t)fminf(hi, fmaxf(lo, nearbyintf(xg[k] * inv)));
        }
}

static void quantize_rows_i8(const float *x, int64_t n, int64_t cols, int8_t *q, float *d) {
    for (int64_t i = 0; i < n; i++) {
        const float di = absmax(x + i * cols, cols) / 127.0f, inv = di > 0.0f ? 1.0f / di : 0.0f;
        d[i] = di;
        for (int64_t k = 0; k < cols; k++) q[i * cols + k] = (int8_t)nearbyintf(x[i * cols + k] * inv);
    }
}

/* QRazor on a row: int16 absmax base, then per group the 4-bit window below the leading one */
static void quantize_rows_sdr4(const float *x, int64_t n, int64_t cols, int32_t group, int8_t *q, float *d, uint8_t *e) {
    const int64_t ng = cols / group;
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * cols;
        const float di = absmax(xi, cols) / 32767.0f, inv = di > 0.0f ? 1.0f / di : 0.0f;
        d[i] = di;
        for (int64_t g = 0; g < ng; g++) {
            int32_t base[256], mx = 0;
            for (int32_t k = 0; k < group; k++) {
                base[k] = (int32_t)fminf(32767.0f, fmaxf(-32767.0f, nearbyintf(xi[g * group + k] * inv)));
                mx |= base[k] < 0 ? -base[k] : base[k];   /* OR of magnitudes: same leading one as the max */
            }
            int lead = 0;
            while (mx >> (lead + 1)) lead++;
            const int shift = lead > 2 ? lead - 2 : 0;
            e[i * ng + g] = (uint8_t)shift;
            const float step = 1.0f / (float)(1 << shift);
            for (int32_t k = 0; k < group; k++)
                q[i * cols + g * group + k] = (int8_t)fminf(7.0f, fmaxf(-8.0f, nearbyintf((float)base[k] * step)));
        }
    }
}

/* LLM-FP4 on a row: channel c raised by 2^k_c, one scale per span of the row (the whole row, or a group of the
 * weight's group size in mode QRZ_FP4_GROUP; dynamic: clip * max / top; static: the stored unit), the nearest
 * code (ties to the even magnitude index: round half to even of the float format), kept as the int8 lane
 * lut[code] << (K - k_c) so that the weights' 2^-k_c rides on the activation side */
static void quantize_rows_fp4(const float *x, int64_t n, int64_t cols, int32_t group, const uint8_t *params,
                              int8_t *q, float *d) {
    const qrz_fp4_view v = qrz_fp4_split(params, 1, cols, 32);
    const int8_t *lut = qrz_fp4_lut[v.e_a];
    const int K = qrz_fp4_max_shift(v.e_a);
    static const float pow2[8] = {1, 2, 4, 8, 16, 32, 64, 128};   /* offsets are at most 3 (the loader checks) */
    const int64_t span = v.mode == QRZ_FP4_GROUP ? group : cols;
    float t[7];
    for (int k = 0; k < 7; k++) t[k] = (float)(lut[k] + lut[k + 1]) * 0.5f;
    for (int64_t c0 = 0, j = 0; c0 < n * cols; c0 += span, j++) {   /* span j: values c0 .. c0 + span */
        const float *xs = x + c0;
        const uint8_t *ks = v.shifts + c0 % cols;
        float s = v.scale;
        if (v.mode != QRZ_FP4_STATIC) {
            float amax = 0.0f;   /* a plain compare (NaN never wins, as with fmaxf): GCC 12 for aarch64 fails
                                    with an internal error vectorizing the fmaxf form of this loop */
            for (int64_t c = 0; c < span; c++) {
                const float a = fabsf(xs[c]) * pow2[ks[c]];
                if (a > amax) amax = a;
            }
            s = amax * v.scale / (float)lut[7];
        }
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        d[j] = s * (1.0f / (float)(1 << K));
        for (int64_t c = 0; c < span; c++) {
            const float val = xs[c] * pow2[ks[c]] * inv, a = fabsf(val);
            int idx = 0;
            for (int k = 0; k < 7; k++) idx += a > t[k] || (a == t[k] && (k & 1));
            const int code = idx + (val < 0.0f && idx > 0 ? 8 : 0);
            q[c0 + c] = (int8_t)(lut[code] * (1 << (K - ks[c])));
        }
    }
}

/* SQ: per group one scale for the 4-bit cold channels (clipped by the tensor's clip) and the int8 hot ones (the
 * weight tensor's hot plane) */
/* E2M1's magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 counted in half steps (0, 1, 2, 3, 4, 6, 8, 12), so a 4-bit
   float code is an integer an int8 lane holds and the integer kernels need no change; a = |x| / step, the
   nearest magnitude, a tie to the larger one, 12 beyond */
static int8_t e2m1_half_steps(float a) {
    return (int8_t)(a < 0.5f ? 0 : a < 1.5f ? 1 : a < 2.5f ? 2 : a < 3.5f ? 3 : a < 5.0f ? 4 : a < 7.0f ? 6 :
                    a < 10.0f ? 8 : 12);
}

static void quantize_groups_sq4(const float *x, int64_t n, int64_t cols, int32_t group, const uint8_t *params,
                                int8_t *q, float *d) {
    const uint8_t *hot = params + QRZ_SQ_HEADER;
    float clip;
    memcpy(&clip, params + 8, 4);
    uint16_t grid;
    memcpy(&grid, params + 2, 2);
    const bool e2m1 = grid == QRZ_SQ_COLD_E2M1;
    const float cold_top = e2m1 ? 12.0f : 7.0f;
    const int64_t ng = cols / group;
    for (int64_t i = 0; i < n; i++)
        for (int64_t g = 0; g < ng; g++) {
            const float *xg = x + i * cols + g * group;
            const uint8_t *hg = hot + g * group;
            int8_t *qg = q + i * cols + g * group;
            float cold = 0.0f, warm = 0.0f;
            for (int32_t k = 0; k < group; k++) {
                if (hg[k]) warm = fmaxf(warm, fabsf(xg[k]));
                else cold = fmaxf(cold, fabsf(xg[k]));
            }
            const float dg = fmaxf(clip * cold / cold_top, warm / 127.0f), inv = dg > 0.0f ? 1.0f / dg : 0.0f;
            d[i * ng + g] = dg;
            for (int32_t k = 0; k < group; k++) {
                const float u = xg[k] * inv;
                if (hg[k]) {
                    qg[k] = (int8_t)fminf(127.0f, fmaxf(-127.0f, nearbyintf(u)));
                } else if (e2m1) {
                    const int8_t m = e2m1_half_steps(fabsf(u));
                    qg[k] = u < 0.0f ? (int8_t)-m : m;
                } else {
                    qg[k] = (int8_t)fminf(7.0f, fmaxf(-8.0f, nearbyintf(u)));
                }
            }
        }
}

void qrz_quantize_acts(qrz_acts *a) {
    switch (a->kind) {
    case QRZ_ACTS_Q8_GROUP: quantize_groups(a->f32, a->n, a->cols, a->group, 127.0f, -127.0f, 127.0f, a->q, a->d); break;
    case QRZ_ACTS_Q4_GROUP: quantize_groups(a->f32, a->n, a->cols, a->group, 7.0f, -8.0f, 7.0f, a->q, a->d); break;
    case QRZ_ACTS_I8_ROW: quantize_rows_i8(a->f32, a->n, a->cols, a->q, a->d); break;
    case QRZ_ACTS_SDR4_ROW: quantize_rows_sdr4(a->f32, a->n, a->cols, a->group, a->q, a->d, a->e); break;
    case QRZ_ACTS_FP4:
    case QRZ_ACTS_FP4_GROUP: quantize_rows_fp4(a->f32, a->n, a->cols, a->group, a->params, a->q, a->d); break;
    case QRZ_ACTS_SQ4_GROUP: quantize_groups_sq4(a->f32, a->n, a->cols, a->group, a->params, a->q, a->d); break;
    default: break;
    }
    if (a->sums && a->kind != QRZ_ACTS_F32 && a->group > 0) {
        const int64_t ng = a->cols / a->group;
        for (int64_t i = 0; i < a->n; i++)
            for (int64_t g = 0; g < ng; g++) {
                const int8_t *qg = a->q + i * a->cols + g * a->group;
                int32_t s = 0;
                for (int32_t k = 0; k < a->group; k++) s += qg[k];
                a->sums[i * ng + g] = s;
            }
    }
}

bool (*qrz_acts_quantizer[QRZ_ISA_COUNT])(qrz_acts *a);

void qrz_quantize_acts_isa(qrz_acts *a, int isa) {
    qrz_types_init();
    if (!(isa > 0 && isa < QRZ_ISA_COUNT && qrz_acts_quantizer[isa] && qrz_acts_quantizer[isa](a))) qrz_quantize_acts(a);
    if (a->qu && a->kind == QRZ_ACTS_I8_ROW)
        for (int64_t k = 0; k < a->n * a->cols; k++) a->qu[k] = (uint8_t)a->q[k] ^ 0x80u;
}

int64_t qrz_acts_scales_per_row(int kind, int64_t cols, int32_t group) {
    return qrz_acts_grouped(kind) ? cols / (group > 0 ? group : 1) : 1;
}

int qrz_acts_kind_for(const qrz_weight *w, int path) {
    const int kind = qrz_types[w->type].acts[path];
    if (kind == QRZ_ACTS_FP4 && ((const uint8_t *)w->data)[2] == QRZ_FP4_GROUP) return QRZ_ACTS_FP4_GROUP;
    return kind;
}

qrz_acts qrz_acts_rows(const qrz_acts *a, int64_t i0, int64_t n) {
    qrz_acts sub = *a;
    sub.n = n;
    sub.f32 += i0 * a->cols;
    if (a->kind != QRZ_ACTS_F32) {
        sub.q += i0 * a->cols;
        sub.d += i0 * qrz_acts_scales_per_row(a->kind, a->cols, a->group);
        if (a->e) sub.e += i0 * (a->cols / a->group);
        if (a->sums) sub.sums += i0 * (a->cols / a->group);
        if (a->qu) sub.qu += i0 * a->cols;
    }
    return sub;
}

/* ---- float vector helpers (attention) ---- */
static float dot_scalar(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_scalar(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void softmax_scalar(float *x, int n, float scale) {
    float m = -INFINITY;
    for (int t = 0; t < n; t++) {
        x[t] *= scale;
        if (x[t] > m) m = x[t];
    }
    float sum = 0.0f;
    for (int t = 0; t < n; t++) { x[t] = expf(x[t] - m); sum += x[t]; }
    const float inv = 1.0f / sum;
    for (int t = 0; t < n; t++) x[t] *= inv;
}

void qrz_softmax(int isa, float *x, int n, float scale) {
    if (isa > 0 && isa < QRZ_ISA_COUNT && qrz_vec[isa].softmax) qrz_vec[isa].softmax(x, n, scale);
    else softmax_scalar(x, n, scale);
}

/* x / (1 + e^-x) and 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as transformers defines SiLU and
 * GELU-tanh, in float32 */
static void gate_scalar(float *h, const float *g, const float *u, int n, int gelu) {
    if (gelu) {
        for (int j = 0; j < n; j++) {
            const float x = g[j];
            h[j] = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))) * u[j];
        }
    } else {
        for (int j = 0; j < n; j++) h[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

void qrz_gate(int isa, float *h, const float *g, const float *u, int n, int gelu) {
    if (isa > 0 && isa < QRZ_ISA_COUNT && qrz_vec[isa].gate) qrz_vec[isa].gate(h, g, u, n, gelu);
    else gate_scalar(h, g, u, n, gelu);
}

int qrz_kernel_gate(int isa, float *h, const float *g, const float *u, int32_t n, int32_t gelu) {
    if (!h || !g || !u || n <= 0 || (gelu != 0 && gelu != 1)) return QRZ_ERR_ARG;
    if (isa == QRZ_ISA_BEST) isa = qrz_isa_default();
    if (isa < 0 || isa >= QRZ_ISA_COUNT || !qrz_isa_supported(isa)) return QRZ_ERR_ARG;
    qrz_types_init();
    qrz_gate(isa, h, g, u, n, gelu);
    return QRZ_OK;
}

int qrz_kernel_softmax(int isa, float *x, int32_t n, float scale) {
    if (!x || n <= 0 || !(scale > 0.0f) || !isfinite(scale)) return QRZ_ERR_ARG;
    if (isa == QRZ_ISA_BEST) isa = qrz_isa_default();
    if (isa < 0 || isa >= QRZ_ISA_COUNT || !qrz_isa_supported(isa)) return QRZ_ERR_ARG;
    qrz_types_init();
    qrz_softmax(isa, x, n, scale);
    return QRZ_OK;
}

qrz_vec_ops qrz_vec[QRZ_ISA_COUNT] = {
    [QRZ_ISA_SCALAR] = {dot_scalar, axpy_scalar, softmax_scalar, gate_scalar},
    [QRZ_ISA_AVX2] = {dot_scalar, axpy_scalar},     /* replaced by qrz_register_avx2 where the CPU has it */
    [QRZ_ISA_NEON] = {dot_scalar, axpy_scalar},
    [QRZ_ISA_AVXVNNI] = {dot_scalar, axpy_scalar},
    [QRZ_ISA_AVX512] = {dot_scalar, axpy_scalar},
};

/* ---- the table ---- */
#define NO_4BIT QRZ_ACTS_COUNT
qrz_type_traits qrz_types[QRZ_TYPE_COUNT] = {
    [QRZ_TYPE_F32] = {"f32", {QRZ_ACTS_F32, NO_4BIT}, f32_nbytes, f32_dequant_row, {{f32_matmul_scalar}}},
    [QRZ_TYPE_F16] = {"f16", {QRZ_ACTS_F32, NO_4BIT}, f16_nbytes, f16_dequant_row, {{f16_matmul_scalar}}},
    [QRZ_TYPE_Q8] = {"q8", {QRZ_ACTS_Q8_GROUP, NO_4BIT}, q8_nbytes, q8_dequant_row, {{q8_matmul_scalar}}},
    [QRZ_TYPE_SDR] = {"sdr", {QRZ_ACTS_I8_ROW, QRZ_ACTS_SDR4_ROW}, sdr_nbytes, sdr_dequant_row,
                      {{sdr_matmul_i8_scalar}, {sdr_matmul_sdr4_scalar}}, sdr_check},
    [QRZ_TYPE_INT4] = {"int4", {QRZ_ACTS_Q8_GROUP, QRZ_ACTS_Q4_GROUP}, int4_nbytes, int4_dequant_row,
                       {{int4_matmul_scalar}, {int4_matmul_scalar}}},
    [QRZ_TYPE_FP4] = {"fp4", {QRZ_ACTS_Q8_GROUP, QRZ_ACTS_FP4}, fp4_nbytes, fp4_dequant_row,
                      {{fp4_matmul_scalar}, {fp4_matmul_scalar}}, fp4_check},
    [QRZ_TYPE_SQ] = {"sq", {QRZ_ACTS_Q8_GROUP, QRZ_ACTS_SQ4_GROUP}, sq_nbytes, sq_dequant_row,
                     {{sq_matmul_scalar}, {sq_matmul_scalar}}, sq_check, sq_nbytes_head},
};

void qrz_isa_inherit(int isa, int from) {
    for (int t = 0; t < QRZ_TYPE_COUNT; t++)
        for (int p = 0; p < 2; p++) qrz_types[t].matmul[p][isa] = qrz_types[t].matmul[p][from];
    qrz_vec[isa] = qrz_vec[from];
    qrz_acts_quantizer[isa] = qrz_acts_quantizer[from];
    for (int k = 0; k < QRZ_KV_CACHE_COUNT; k++) qrz_kv[k][isa] = qrz_kv[k][from];
}

void qrz_types_init(void) {
    static int done;
    if (done) return;
    done = 1;
#if defined(__x86_64__) || defined(__i386__)
    qrz_register_avx2();
    if (qrz_isa_supported(QRZ_ISA_AVXVNNI)) qrz_register_avxvnni();
    if (qrz_isa_supported(QRZ_ISA_AVX512)) qrz_register_avx512();
#endif
#if defined(__aarch64__)
    qrz_register_neon();
#endif
}

int qrz_act_path(int type, int act_bits) { return act_bits == 4 && qrz_types[type].acts[1] != NO_4BIT ? 1 : 0; }

qrz_matmul_fn qrz_matmul_for(int type, int path, int isa) {
    qrz_types_init();
    if (isa > 0 && isa < QRZ_ISA_COUNT && qrz_types[type].matmul[path][isa]) return qrz_types[type].matmul[path][isa];
    return qrz_types[type].matmul[path][QRZ_ISA_SCALAR];
}

uint64_t qrz_tensor_nbytes(int type, int64_t rows, int64_t cols, int32_t group_size) {
    return qrz_tensor_nbytes_of(type, rows, cols, group_size, NULL);
}

uint64_t qrz_tensor_nbytes_of(int type, int64_t rows, int64_t cols, int32_t group_size, const void *head) {
    if (type < 0 || type >= QRZ_TYPE_COUNT || rows < 0 || cols <= 0) return 0;
    if (qrz_types[type].nbytes_head) return head ? qrz_types[type].nbytes_head(head, rows, cols, group_size) : 0;
    return qrz_types[type].nbytes(rows, cols, group_size);
}

/* ---- kernel entry points for the tests ---- */
int qrz_kernel_matmul(int isa, int type, int32_t group, int32_t act_bits, const void *wdata, int64_t rows,
                      int64_t cols, const float *x, int64_t n, float *y) {
    if (type < 0 || type >= QRZ_TYPE_COUNT || !wdata || !x || !y || rows <= 0 || n <= 0) return QRZ_ERR_ARG;
    if (act_bits != 8 && act_bits != 4) return QRZ_ERR_ARG;
    if (!qrz_tensor_nbytes_of(type, rows, cols, group, wdata)) return QRZ_ERR_ARG;
    if (isa == QRZ_ISA_BEST) isa = qrz_isa_default();
    if (!qrz_isa_supported(isa)) return QRZ_ERR_ARG;
    qrz_types_init();
    const int path = qrz_act_path(type, act_bits);
    qrz_weight w = {type, group, rows, cols, wdata, -1};
    if (qrz_types[type].check && qrz_types[type].check(&w)) return QRZ_ERR_ARG;
    qrz_acts a = {n, cols, x, qrz_acts_kind_for(&w, path), NULL, NULL, NULL, group, wdata, NULL, NULL};
    if (a.kind != QRZ_ACTS_F32) {
        a.q = malloc((size_t)(n * cols));
        a.d = malloc((size_t)(n * cols) * sizeof(float));
        a.e = malloc((size_t)(n * cols));
        a.sums = malloc((size_t)(n * cols) * sizeof(int32_t));
        a.qu = malloc((size_t)(n * cols));
        if (!a.q || !a.d || !a.e || !a.sums || !a.qu) {
            free(a.q); free(a.d); free(a.e); free(a.sums); free(a.qu);
            return QRZ_ERR_MEMORY;
        }
        qrz_quantize_acts_isa(&a, isa);
    }
    qrz_matmul_for(type, path, isa)(&w, &a, 0, rows, y, rows);
    free(a.q);
    free(a.d);
    free(a.e);
    free(a.sums);
    free(a.qu);
    return QRZ_OK;
}

int qrz_kernel_dequant_row(int type, int32_t group, const void *wdata, int64_t rows, int64_t cols, int64_t r, float *out) {
    if (type < 0 || type >= QRZ_TYPE_COUNT || !wdata || !out || r < 0 || r >= rows) return QRZ_ERR_ARG;
    if (!qrz_tensor_nbytes_of(type, rows, cols, group, wdata)) return QRZ_ERR_ARG;
    qrz_weight w = {type, group, rows, cols, wdata, -1};
    qrz_types[type].dequant_row(&w, r, out);
    return QRZ_OK;
}
