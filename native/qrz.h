/* qrz.h - the public C API of the pyqrt runtime.
 *
 * This header is also the cffi cdef: pyqrt/_build.py feeds it to cffi with the lines starting with '#'
 * removed, so keep everything between the guards plain C declarations cffi can parse (no macros).
 *
 * Rules the whole core keeps: no function exits, aborts or prints. Every call that can fail returns a
 * qrz_status and leaves a message in the object's error string (or in the caller's buffer before an object
 * exists). Log lines go through the callback set with qrz_set_log_callback.
 */
#ifndef QRZ_H
#define QRZ_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    QRZ_OK = 0,
    QRZ_ERR_IO = 1,          /* cannot open / map / read the file */
    QRZ_ERR_FORMAT = 2,      /* not a .qrz, truncated, or structurally broken */
    QRZ_ERR_VERSION = 3,     /* a .qrz of a version this build does not read */
    QRZ_ERR_CHECKSUM = 4,    /* metadata or tensor CRC mismatch: the file is corrupt */
    QRZ_ERR_ARCH = 5,        /* unknown architecture or missing/ill-shaped tensor */
    QRZ_ERR_ARG = 6,         /* invalid argument */
    QRZ_ERR_MEMORY = 7,      /* allocation failed */
    QRZ_ERR_CONTEXT = 8,     /* the sequence does not fit in the context window */
    QRZ_ERR_ABORTED = 9      /* the piece callback asked to stop */
} qrz_status;

/* ---- value and tensor types (docs/FORMAT.md) ---- */
typedef enum {
    QRZ_KV_U8 = 0, QRZ_KV_I8 = 1, QRZ_KV_U16 = 2, QRZ_KV_I16 = 3, QRZ_KV_U32 = 4, QRZ_KV_I32 = 5,
    QRZ_KV_F32 = 6, QRZ_KV_BOOL = 7, QRZ_KV_STRING = 8, QRZ_KV_ARRAY = 9, QRZ_KV_U64 = 10,
    QRZ_KV_I64 = 11, QRZ_KV_F64 = 12
} qrz_kv_type;

typedef enum {
    QRZ_TYPE_F32 = 0, QRZ_TYPE_F16 = 1, QRZ_TYPE_Q8 = 2, QRZ_TYPE_SDR = 3, QRZ_TYPE_INT4 = 4, QRZ_TYPE_FP4 = 5, QRZ_TYPE_SQ = 6, QRZ_TYPE_COUNT = 7
} qrz_tensor_type;

/* how a context stores its KV cache: float32, float16, int8 per group of 32 (absmax), or QRazor SDR 4-bit */
typedef enum { QRZ_KV_CACHE_F32 = 0, QRZ_KV_CACHE_F16 = 1, QRZ_KV_CACHE_Q8 = 2, QRZ_KV_CACHE_SDR4 = 3 } qrz_kv_cache_type;

/* instruction sets a kernel can run on; QRZ_ISA_BEST picks what the CPU has (see qrz_isa_name) */
/* AVXVNNI: AVX2 plus AVX-VNNI's 256-bit dot product; AVX512: AVX-512 F, BW, VL and VNNI on 512-bit vectors.
 * Kernels an ISA has no own version of are the AVX2 ones. */
typedef enum {
    QRZ_ISA_BEST = -1, QRZ_ISA_SCALAR = 0, QRZ_ISA_AVX2 = 1, QRZ_ISA_NEON = 2, QRZ_ISA_AVXVNNI = 3, QRZ_ISA_AVX512 = 4
} qrz_isa;

typedef struct qrz_model qrz_model;       /* the mmapped file, its metadata and weight views */
typedef struct qrz_context qrz_context;   /* KV cache, scratch buffers, thread pool, token history */

/* a key/value pair as it lies in the mapped file; pointers stay valid while the model is open */
typedef struct {
    const char *key;        /* not NUL-terminated */
    uint64_t key_len;
    uint32_t type;          /* qrz_kv_type */
    uint32_t elem_type;     /* for arrays */
    uint64_t count;         /* 1 for scalars; string length for strings; element count for arrays */
    const void *data;       /* the value bytes (for an array of strings: the first u64 length) */
    uint64_t nbytes;        /* bytes of the value */
} qrz_kv_view;

typedef struct {
    const char *name;       /* not NUL-terminated */
    uint64_t name_len;
    uint32_t type;          /* qrz_tensor_type */
    uint32_t n_dims;
    uint64_t shape[4];
    uint32_t group_size;
    uint64_t offset;        /* absolute offset in the file */
    uint64_t nbytes;
    uint32_t crc32;
} qrz_tensor_view;

/* ---- logging ---- */
typedef void (*qrz_log_fn)(void *user, int level, const char *message);   /* level: 10 debug .. 40 error */
void qrz_set_log_callback(qrz_log_fn fn, void *user);

/* ---- the CPU ---- */
int qrz_isa_supported(int isa);           /* 1 if this CPU (and this build) can run the ISA */
int qrz_isa_default(void);                /* what QRZ_ISA_BEST resolves to; QRZ_FORCE_GENERIC=1 forces scalar */
const char *qrz_isa_name(int isa);
uint32_t qrz_crc32(uint32_t crc, const void *data, size_t n);   /* zlib-compatible */

/* ---- the model file ---- */
/* How qrz_model_open holds the weights: QRZ_OPEN_VERIFY checks every tensor's CRC (reads the whole file once);
 * QRZ_OPEN_MAP maps the file (pages shared with the page cache and other processes, loaded on first touch);
 * QRZ_OPEN_COPY reads it into this process's memory, marked for transparent huge pages; with neither, the copy
 * where the kernel gives anonymous memory huge pages (Linux with THP "always" or "madvise"), else the mapping. */
typedef enum { QRZ_OPEN_VERIFY = 1, QRZ_OPEN_MAP = 2, QRZ_OPEN_COPY = 4 } qrz_open_flags;
/* flags: qrz_open_flags or'ed. err receives a message on failure. */
int qrz_model_open(const char *path, int flags, qrz_model **out, char *err, size_t err_cap);
void qrz_model_free(qrz_model *model);
uint32_t qrz_model_version(const qrz_model *model);
int64_t qrz_model_n_kv(const qrz_model *model);
int qrz_model_kv(const qrz_model *model, int64_t i, qrz_kv_view *out);
int64_t qrz_model_n_tensors(const qrz_model *model);
int qrz_model_tensor(const qrz_model *model, int64_t i, qrz_tensor_view *out);
uint64_t qrz_model_file_size(const qrz_model *model);

/* ---- inference contexts ---- */
typedef struct {
    int32_t n_ctx;          /* tokens the KV cache holds; 0 = the model's training context */
    int32_t n_threads;      /* 0 = number of physical cores */
    int32_t n_batch;        /* prompt tokens per forward pass; 0 = 256 */
    int32_t isa;            /* qrz_isa; QRZ_ISA_BEST normally */
    int32_t act_bits;       /* activations of quantized matmuls: 0 or 8 = 8-bit, 4 = 4-bit where the weight
                               format has a 4-bit path (others, e.g. a q8 output head, keep 8-bit) */
    int32_t kv_cache;       /* qrz_kv_cache_type */
} qrz_context_params;

int qrz_context_new(qrz_model *model, const qrz_context_params *params, qrz_context **out,
                    char *err, size_t err_cap);
void qrz_context_free(qrz_context *ctx);
const char *qrz_context_error(const qrz_context *ctx);
int32_t qrz_context_n_ctx(const qrz_context *ctx);
int32_t qrz_context_n_vocab(const qrz_context *ctx);
int32_t qrz_context_n_threads(const qrz_context *ctx);
int32_t qrz_context_n_past(const qrz_context *ctx);         /* tokens currently held in the KV cache */
uint64_t qrz_context_kv_bytes(const qrz_context *ctx);
/* Calibration: when set, called before every matmul with its float input rows x[n][cols] and the index of the
 * weight in the file's tensor directory (qrz_model_tensor). NULL removes it. */
typedef void (*qrz_matmul_hook)(void *user, int64_t tensor, const float *x, int64_t n, int64_t cols);
void qrz_context_set_matmul_hook(qrz_context *ctx, qrz_matmul_hook fn, void *user);
void qrz_context_reset(qrz_context *ctx);                   /* forget the cached sequence */

/* Appends tokens to the cached sequence and runs them. logits (n x n_vocab) receives every position's logits
 * when all_logits != 0, else (1 x n_vocab) the last position's; it may be NULL. */
int qrz_eval(qrz_context *ctx, const int32_t *tokens, int32_t n, float *logits, int32_t all_logits);

/* Scores a fresh sequence: nll[i] = -log p(tokens[i+1] | tokens[..i]) for i in [0, n-1). Resets the cache. */
int qrz_score(qrz_context *ctx, const int32_t *tokens, int32_t n, double *nll);

/* ---- generation: the token loop, sampling, stop checks and UTF-8-safe detokenization in one call ---- */
typedef struct {
    int32_t max_tokens;     /* < 0: until the context is full */
    float temperature;      /* <= 0: greedy */
    int32_t top_k;          /* <= 0: off */
    float top_p;            /* >= 1: off */
    float min_p;            /* <= 0: off */
    float repeat_penalty;   /* 1: off */
    int32_t repeat_last_n;  /* tokens the penalty looks back over; < 0: whole context */
    uint64_t seed;
    int32_t ignore_eos;
    int32_t n_stop;         /* stop strings; generation ends before the first occurrence of any */
    const char *const *stop;
} qrz_sampling_params;

typedef enum {
    QRZ_FINISH_EOG = 0, QRZ_FINISH_LENGTH = 1, QRZ_FINISH_STOP = 2, QRZ_FINISH_ABORTED = 3,
    QRZ_FINISH_CONTEXT = 4
} qrz_finish;

typedef struct {
    int32_t n_prompt;       /* prompt tokens */
    int32_t n_reused;       /* prompt tokens found already in the KV cache */
    int32_t n_generated;
    int32_t finish;         /* qrz_finish */
    double prompt_ms;
    double gen_ms;
} qrz_generate_result;

/* Called with each complete UTF-8 piece of text as it becomes final (never splits a character, never part of
 * a stop string). Return nonzero to stop. */
typedef int (*qrz_piece_fn)(void *user, const char *piece, size_t len);

/* Runs prompt (reusing the longest cached prefix) and generates. out_tokens (capacity out_cap) receives the
 * generated ids, and may be NULL. */
int qrz_generate(qrz_context *ctx, const int32_t *prompt, int32_t n_prompt, const qrz_sampling_params *params,
                 qrz_piece_fn on_piece, void *user, int32_t *out_tokens, int32_t out_cap,
                 qrz_generate_result *result);

/* bytes of a token sequence as text (control tokens skipped unless render_special); returns bytes written,
 * or the size needed if cap is too small */
int64_t qrz_detokenize(const qrz_model *model, const int32_t *tokens, int32_t n, int32_t render_special,
                       char *out, int64_t cap);

/* ---- kernels, exposed so tests can check every ISA against numpy ---- */
/* bytes a (rows, cols) tensor of this type takes; 0 if the shape or group size is invalid for the type, or if
 * the size depends on the tensor's own header (SQ: its slot count) */
uint64_t qrz_tensor_nbytes(int type, int64_t rows, int64_t cols, int32_t group_size);
/* the same for a tensor whose first 64 bytes are at head (types with a header read it; the others ignore it) */
uint64_t qrz_tensor_nbytes_of(int type, int64_t rows, int64_t cols, int32_t group_size, const void *head);
/* y[n x rows] = x[n x cols] · W^T, W given as the raw bytes of a tensor of this type; act_bits 8 or 4 chooses
 * how x is quantized for integer kernels (ignored by float types) */
int qrz_kernel_matmul(int isa, int type, int32_t group_size, int32_t act_bits, const void *w, int64_t rows,
                      int64_t cols, const float *x, int64_t n, float *y);
/* out[cols] = row r of W as float */
int qrz_kernel_dequant_row(int type, int32_t group_size, const void *w, int64_t rows, int64_t cols,
                           int64_t r, float *out);
/* bytes of one KV cache row (one position, one kv head: head_dim values) of a qrz_kv_cache_type; 0 if invalid.
 * A context's qrz_context_kv_bytes is 2 (k and v) x n_kv_heads x this, summed over every layer's slots. */
uint64_t qrz_kv_row_bytes(int kv_type, int32_t head_dim);
/* KV cache rows with one ISA's kernels: stores x[n_rows x head_dim] as rows of kv_type into raw (n_rows x
 * qrz_kv_row_bytes bytes), then rows_out[i] = 0 + 1 * row i (the row as float, through axpy), and through the
 * batched calls attention makes, dots[i] = q . row i and axpy_out[head_dim] = sum_i a[i] * row i. raw, rows_out,
 * dots (with q) and axpy_out (with a) may each be NULL. */
int qrz_kernel_kv_rows(int isa, int kv_type, int32_t head_dim, const float *x, int32_t n_rows, const float *q,
                       const float *a, uint8_t *raw, float *rows_out, float *dots, float *axpy_out);
/* attention's softmax with one ISA's kernel, in place: x[t] = exp(scale x[t] - m) / sum, m the largest scale x[t] */
int qrz_kernel_softmax(int isa, float *x, int32_t n, float scale);
/* the MLP's gate with one ISA's kernel: h[j] = act(g[j]) * u[j], act SiLU (gelu = 0) or GELU, tanh form (1) */
int qrz_kernel_gate(int isa, float *h, const float *g, const float *u, int32_t n, int32_t gelu);

#ifdef __cplusplus
}
#endif
#endif
