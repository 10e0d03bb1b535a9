/* types.c - the block-format table: one row per tensor type, with its scalar reference kernels.
 *
 * A format is: how many bytes a (rows, cols) tensor takes, how to turn a row back into floats, and a matmul
 * kernel per ISA. The scalar kernels here are the reference every SIMD kernel is tested against.
 */
#include "qrz_internal.h"
#include <math.h>
#include <stdlib.h>
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

void qrz_quantize_acts_q8(const float *x, int64_t n, int64_t cols, int32_t group, int8_t *q, float *d) {
    const int64_t ng = cols / group;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t g = 0; g < ng; g++) {
            const float *xg = x + i * cols + g * group;
            int8_t *qg = q + i * cols + g * group;
            float amax = 0.0f;
            for (int32_t k = 0; k < group; k++) amax = fmaxf(amax, fabsf(xg[k]));
            const float dg = amax / 127.0f, inv = dg > 0.0f ? 1.0f / dg : 0.0f;
            d[i * ng + g] = dg;
            for (int32_t k = 0; k < group; k++) qg[k] = (int8_t)nearbyintf(xg[k] * inv);
        }
    }
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

qrz_vec_ops qrz_vec[QRZ_ISA_COUNT] = {
    [QRZ_ISA_SCALAR] = {dot_scalar, axpy_scalar},
    [QRZ_ISA_AVX2] = {dot_scalar, axpy_scalar},     /* replaced by qrz_register_avx2 where the CPU has it */
    [QRZ_ISA_NEON] = {dot_scalar, axpy_scalar},
};

/* ---- the table ---- */
qrz_type_traits qrz_types[QRZ_TYPE_COUNT] = {
    [QRZ_TYPE_F32] = {"f32", false, f32_nbytes, f32_dequant_row, {f32_matmul_scalar}},
    [QRZ_TYPE_F16] = {"f16", false, f16_nbytes, f16_dequant_row, {f16_matmul_scalar}},
    [QRZ_TYPE_Q8] = {"q8", true, q8_nbytes, q8_dequant_row, {q8_matmul_scalar}},
};

void qrz_types_init(void) {
    static int done;
    if (done) return;
    done = 1;
#if defined(__x86_64__) || defined(__i386__)
    qrz_register_avx2();
#endif
}

qrz_matmul_fn qrz_matmul_for(int type, int isa) {
    qrz_types_init();
    if (isa > 0 && isa < QRZ_ISA_COUNT && qrz_types[type].matmul[isa]) return qrz_types[type].matmul[isa];
    return qrz_types[type].matmul[QRZ_ISA_SCALAR];
}

uint64_t qrz_tensor_nbytes(int type, int64_t rows, int64_t cols, int32_t group_size) {
    if (type < 0 || type >= QRZ_TYPE_COUNT || rows < 0 || cols <= 0) return 0;
    return qrz_types[type].nbytes(rows, cols, group_size);
}

/* ---- kernel entry points for the tests ---- */
int qrz_kernel_matmul(int isa, int type, int32_t group, const void *wdata, int64_t rows, int64_t cols,
                      const float *x, int64_t n, float *y) {
    if (type < 0 || type >= QRZ_TYPE_COUNT || !wdata || !x || !y || rows <= 0 || n <= 0) return QRZ_ERR_ARG;
    if (!qrz_tensor_nbytes(type, rows, cols, group)) return QRZ_ERR_ARG;
    if (isa == QRZ_ISA_BEST) isa = qrz_isa_default();
    if (!qrz_isa_supported(isa)) return QRZ_ERR_ARG;
    qrz_weight w = {type, group, rows, cols, wdata};
    qrz_acts a = {n, cols, x, NULL, NULL, group};
    int8_t *q = NULL;
    float *d = NULL;
    if (qrz_types[type].int8_acts) {
        q = malloc((size_t)(n * cols));
        d = malloc((size_t)(n * (cols / group)) * sizeof(float));
        if (!q || !d) { free(q); free(d); return QRZ_ERR_MEMORY; }
        qrz_quantize_acts_q8(x, n, cols, group, q, d);
        a.q = q;
        a.d = d;
    }
    qrz_matmul_for(type, isa)(&w, &a, 0, rows, y, rows);
    free(q);
    free(d);
    return QRZ_OK;
}

int qrz_kernel_dequant_row(int type, int32_t group, const void *wdata, int64_t rows, int64_t cols, int64_t r, float *out) {
    if (type < 0 || type >= QRZ_TYPE_COUNT || !wdata || !out || r < 0 || r >= rows) return QRZ_ERR_ARG;
    if (!qrz_tensor_nbytes(type, rows, cols, group)) return QRZ_ERR_ARG;
    qrz_weight w = {type, group, rows, cols, wdata};
    qrz_types[type].dequant_row(&w, r, out);
    return QRZ_OK;
}
