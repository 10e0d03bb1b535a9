/* kernel_check.c - runs every matmul case of a case file through the scalar and the NEON kernels and writes
 * both outputs back, for tests/test_neon.py (which cross-compiles this with native/ for aarch64 and runs it
 * under qemu-user, or natively on an aarch64 host).
 *
 * usage: kernel_check CASES OUT
 *
 * CASES (little-endian): "QRZK", u32 version (1), u32 n_cases, u32 0, then per case a 48-byte header
 *   i32 kind, i32 type, i32 group, i32 act_bits, i64 rows, i64 cols, i64 n, u64 wlen
 * followed by wlen weight bytes and n * cols float32 activations.
 *   kind 0, matmul: the weight bytes are a tensor of `type`, exactly qrz_tensor_nbytes_of bytes (a type with a
 *   header, SQ, sets its size there: qrz_tensor_nbytes is 0 for it).
 *   kind 1, vector ops: n = 3 rows (a, b, y) of cols floats; the weight bytes are the float32 alpha.
 * OUT: "QRZO", u32 n_cases, i32 qrz_isa_default(), i32 NEON kernels use SDOT, i32 qrz_isa_supported(NEON), then
 * per case i32 status scalar, i32 status neon, i32 neon kernel registered, i32 0, and
 *   kind 0: float32 y[n][rows] three times: scalar, neon, neon run as three row slices (as threads split it)
 *   kind 1: float32 dot scalar, dot neon, then y + alpha * a: scalar [cols], neon [cols]
 */
#include "qrz_internal.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int qrz_neon_uses_dotprod(void);

typedef struct {
    int32_t kind, type, group, act_bits;
    int64_t rows, cols, n;
    uint64_t wlen;
} case_header;

static int read_exact(FILE *f, void *p, size_t n) { return n == 0 || fread(p, 1, n, f) == n; }
static void write_all(FILE *f, const void *p, size_t n) {
    if (n && fwrite(p, 1, n, f) != n) { fprintf(stderr, "kernel_check: write failed\n"); exit(2); }
}
static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "kernel_check: out of memory\n"); exit(2); }
    return p;
}
static void fill_nan(float *y, size_t n) { for (size_t k = 0; k < n; k++) y[k] = NAN; }

/* the NEON kernel called directly over three row slices [0, a), [a, b), [b, rows), as a thread pool splits it */
static int neon_split(const case_header *h, const void *wdata, const float *x, float *y) {
    const int path = qrz_act_path(h->type, h->act_bits);
    qrz_weight w = {h->type, h->group, h->rows, h->cols, wdata, -1};
    qrz_acts a = {h->n, h->cols, x, qrz_acts_kind_for(&w, path), NULL, NULL, NULL, h->group, wdata};
    if (a.kind != QRZ_ACTS_F32) {
        a.q = xmalloc((size_t)(h->n * h->cols));
        a.d = xmalloc((size_t)(h->n * h->cols) * sizeof(float));
        a.e = xmalloc((size_t)(h->n * h->cols));
        qrz_quantize_acts(&a);
    }
    const qrz_matmul_fn fn = qrz_matmul_for(h->type, path, QRZ_ISA_NEON);
    const int64_t r_a = h->rows / 3, r_b = h->rows - h->rows / 4;
    fn(&w, &a, 0, r_a, y, h->rows);
    fn(&w, &a, r_a, r_b, y, h->rows);
    fn(&w, &a, r_b, h->rows, y, h->rows);
    free(a.q);
    free(a.d);
    free(a.e);
    return QRZ_OK;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s CASES OUT\n", argv[0]); return 2; }
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) { fprintf(stderr, "kernel_check: cannot open %s or %s\n", argv[1], argv[2]); return 2; }
    char magic[4];
    uint32_t hdr[3];
    if (!read_exact(in, magic, 4) || memcmp(magic, "QRZK", 4) || !read_exact(in, hdr, sizeof hdr) || hdr[0] != 1) {
        fprintf(stderr, "kernel_check: not a version-1 case file\n");
        return 2;
    }
    qrz_types_init();
    const uint32_t n_cases = hdr[1];
    const int32_t info[3] = {qrz_isa_default(), qrz_neon_uses_dotprod(), qrz_isa_supported(QRZ_ISA_NEON)};
    write_all(out, "QRZO", 4);
    write_all(out, &n_cases, 4);
    write_all(out, info, sizeof info);
    uint32_t n_matmul = 0, n_vec = 0, n_failed = 0;
    for (uint32_t c = 0; c < n_cases; c++) {
        case_header h;
        if (!read_exact(in, &h, sizeof h) || h.rows < 0 || h.cols <= 0 || h.n <= 0) {
            fprintf(stderr, "kernel_check: case %u: bad header\n", c);
            return 2;
        }
        uint8_t *wbytes = xmalloc(h.wlen);
        float *x = xmalloc((size_t)(h.n * h.cols) * sizeof(float));
        if (!read_exact(in, wbytes, h.wlen) || !read_exact(in, x, (size_t)(h.n * h.cols) * sizeof(float))) {
            fprintf(stderr, "kernel_check: case %u: truncated\n", c);
            return 2;
        }
        if (h.kind == 0) {
            /* the kernels read as many bytes as the tensor's shape (and its 64-byte header, if the type has one)
             * says: a case whose bytes disagree is a broken case file, not a kernel result */
            const uint64_t need = qrz_tensor_nbytes_of(h.type, h.rows, h.cols, h.group,
                                                       h.wlen >= 64 ? wbytes : NULL);
            if (need != h.wlen) {
                fprintf(stderr, "kernel_check: case %u: %llu weight bytes, the tensor takes %llu\n", c,
                        (unsigned long long)h.wlen, (unsigned long long)need);
                return 2;
            }
            const size_t ny = (size_t)(h.n * h.rows);
            float *ys = xmalloc(ny * sizeof(float)), *yn = xmalloc(ny * sizeof(float)), *yp = xmalloc(ny * sizeof(float));
            fill_nan(ys, ny);
            fill_nan(yn, ny);
            fill_nan(yp, ny);
            int32_t st[4] = {0, 0, 0, 0};
            st[0] = qrz_kernel_matmul(QRZ_ISA_SCALAR, h.type, h.group, h.act_bits, wbytes, h.rows, h.cols, x, h.n, ys);
            st[1] = qrz_kernel_matmul(QRZ_ISA_NEON, h.type, h.group, h.act_bits, wbytes, h.rows, h.cols, x, h.n, yn);
            if (st[0] == QRZ_OK && st[1] == QRZ_OK) {
                const int path = qrz_act_path(h.type, h.act_bits);
                const qrz_matmul_fn neon = qrz_types[h.type].matmul[path][QRZ_ISA_NEON];
                st[2] = neon != NULL && neon != qrz_types[h.type].matmul[path][QRZ_ISA_SCALAR];
                neon_split(&h, wbytes, x, yp);
            }
            n_failed += st[0] != QRZ_OK || st[1] != QRZ_OK;
            write_all(out, st, sizeof st);
            write_all(out, ys, ny * sizeof(float));
            write_all(out, yn, ny * sizeof(float));
            write_all(out, yp, ny * sizeof(float));
            free(ys);
            free(yn);
            free(yp);
            n_matmul++;
        } else if (h.kind == 1 && h.n == 3 && h.wlen == 4) {
            const int len = (int)h.cols;
            float alpha;
            memcpy(&alpha, wbytes, 4);
            const float *va = x, *vb = x + len, *vy = x + 2 * len;
            const float dots[2] = {qrz_vec[QRZ_ISA_SCALAR].dot(va, vb, len), qrz_vec[QRZ_ISA_NEON].dot(va, vb, len)};
            float *ys = xmalloc((size_t)len * sizeof(float)), *yn = xmalloc((size_t)len * sizeof(float));
            memcpy(ys, vy, (size_t)len * sizeof(float));
            memcpy(yn, vy, (size_t)len * sizeof(float));
            qrz_vec[QRZ_ISA_SCALAR].axpy(ys, alpha, va, len);
            qrz_vec[QRZ_ISA_NEON].axpy(yn, alpha, va, len);
            const int32_t st[4] = {0, 0, qrz_vec[QRZ_ISA_NEON].dot != qrz_vec[QRZ_ISA_SCALAR].dot, 0};
            write_all(out, st, sizeof st);
            write_all(out, dots, sizeof dots);
            write_all(out, ys, (size_t)len * sizeof(float));
            write_all(out, yn, (size_t)len * sizeof(float));
            free(ys);
            free(yn);
            n_vec++;
        } else {
            fprintf(stderr, "kernel_check: case %u: unknown kind %d\n", c, h.kind);
            return 2;
        }
        free(wbytes);
        free(x);
    }
    if (fclose(out) != 0) { fprintf(stderr, "kernel_check: write failed\n"); return 2; }
    fclose(in);
    printf("kernel_check: isa_default=%s neon=%d sdot=%d matmul_cases=%u vec_cases=%u bad_status=%u\n",
           qrz_isa_name(info[0]), info[2], info[1], n_matmul, n_vec, n_failed);
    return 0;
}
