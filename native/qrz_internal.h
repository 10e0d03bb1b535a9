/* qrz_internal.h - structures shared by the C files of the runtime (not part of the public API). */
#ifndef QRZ_INTERNAL_H
#define QRZ_INTERNAL_H
#include "qrz.h"
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>

#define QRZ_MAGIC "QRZF"
#define QRZ_ENDIAN_MARK 0x0A0B0C0Du
#define QRZ_VERSION 1u
#define QRZ_ALIGN 64u
#define QRZ_HEADER_BYTES 48u
#define QRZ_ISA_COUNT 5

/* ---- logging and errors ---- */
void qrz_log(int level, const char *fmt, ...);
void qrz_set_error(char *buf, size_t cap, const char *fmt, ...);

/* ---- half precision ---- */
float qrz_f16_to_f32(uint16_t h);
uint16_t qrz_f32_to_f16(float f);

/* ---- the mapped file ---- */
typedef struct {
    const uint8_t *ptr;   /* the token's bytes inside the mapped file */
    uint32_t len;
} qrz_bytes;

struct qrz_model {
    const uint8_t *base;          /* the whole file, mapped or copied (QRZ_OPEN_*), read-only */
    uint64_t size;
    uint64_t copied[2][2];        /* byte ranges [from, to) read into memory rather than mapped (QRZ_OPEN_COPY) */
    uint32_t version;
    int64_t n_kv;
    qrz_kv_view *kvs;             /* [n_kv] */
    int64_t n_tensors;
    qrz_tensor_view *tensors;     /* [n_tensors] */
    /* tokenizer tables the C side needs to turn ids into text */
    int32_t n_tokens;
    qrz_bytes *token_bytes;       /* [n_tokens] */
    int32_t *token_type;          /* [n_tokens]; 1 = control */
    int32_t n_eog;
    int32_t *eog_ids;             /* [n_eog] */
};

const qrz_kv_view *qrz_find_kv(const qrz_model *m, const char *key);
/* typed getters: return false if the key is absent or of another type */
bool qrz_kv_u32(const qrz_model *m, const char *key, uint32_t *out);
bool qrz_kv_f32(const qrz_model *m, const char *key, float *out);
bool qrz_kv_bool(const qrz_model *m, const char *key, bool *out);
bool qrz_kv_str_eq(const qrz_model *m, const char *key, const char *value);
const qrz_tensor_view *qrz_find_tensor(const qrz_model *m, const char *name);

/* ---- weights and the block-format table ---- */
typedef struct {
    int type;                     /* qrz_tensor_type */
    int32_t group;                /* group size along cols (quantized types) */
    int64_t rows, cols;
    const void *data;             /* the tensor's bytes */
    int64_t tensor;               /* its index in the file's tensor directory (for the matmul hook) */
    int64_t nbytes;               /* the tensor's bytes (0 where unknown) */
} qrz_weight;

/* How a matmul's input rows are quantized for its weight format's integer kernels (docs/QUANTIZATION.md). */
typedef enum {
    QRZ_ACTS_F32 = 0,     /* float rows, no quantization (float weight types) */
    QRZ_ACTS_Q8_GROUP,    /* int8 per group of `group`: d[n][ng] = absmax/127 */
    QRZ_ACTS_Q4_GROUP,    /* int4 (in int8 bytes) per group: d[n][ng] = absmax/7, q in -8..7 */
    QRZ_ACTS_I8_ROW,      /* int8 per row: d[n] = absmax/127 */
    QRZ_ACTS_SDR4_ROW,    /* QRazor SDR from an int16 base per row: d[n] = absmax/32767, e[n][ng] in 0..12, q in -8..7 */
    QRZ_ACTS_FP4,         /* LLM-FP4 codes with the weight tensor's per-channel offsets k_c, as int8 lanes
                             lut[code] << (K - k_c); d[n] the row's scale / 2^K (docs/QUANTIZATION.md) */
    QRZ_ACTS_FP4_GROUP,   /* the same lanes with a dynamic scale per group of the weight's group size (FP4 header
                             mode 2): d[n][cols/group] */
    QRZ_ACTS_SQ4_GROUP,   /* SQ: per group d = max(clip * max|cold| / top, max|hot| / 127); cold channels by the
                             tensor's grid: int4 (top 7, round(x / d) in -8..7) or E2M1 (top 12, the nearest 4-bit
                             E2M1 value of x / d in half steps 0, +-1, 2, 3, 4, 6, 8, 12); hot ones round(x / d) in
                             -127..127 (the weight tensor's hot plane): d[n][cols/group] */
    QRZ_ACTS_COUNT
} qrz_acts_kind;

/* Activations prepared for one weight type: f32 rows, and for integer kernels the same rows quantized. */
typedef struct {
    int64_t n, cols;
    const float *f32;             /* [n][cols] */
    int kind;                     /* qrz_acts_kind */
    int8_t *q;                    /* [n][cols]   codes (int8, or 4-bit values one per byte) */
    float *d;                     /* scales: [n][cols/group] for group kinds, [n] for row kinds */
    uint8_t *e;                   /* [n][cols/group] SDR shifts (SDR4_ROW only) */
    int32_t group;
    const uint8_t *params;        /* the weight tensor's bytes, for kinds whose parameters it holds (FP4) */
    int32_t *sums;                /* NULL, or [n][cols/group] the sum of q over each group: SIMD kernels that
                                     multiply unsigned codes (m + 8) take 8 * sum(q) back off once per group */
    uint8_t *qu;                  /* NULL, or [n][cols] q + 128 (I8_ROW), written beside q by the quantizer: for
                                     kernels that make the activations the unsigned side of vpdpbusd */
} qrz_acts;

/* the activation kind a weight takes on path 0 (8-bit) or 1 (4-bit): the type table's, refined by the tensor's
 * own header where the type has one (an FP4 tensor in mode 2 takes per-group scales) */
int qrz_acts_kind_for(const qrz_weight *w, int path);
/* whether a kind has a scale per group of `group` columns (else one per row) */
static inline bool qrz_acts_grouped(int kind) {
    return kind == QRZ_ACTS_Q8_GROUP || kind == QRZ_ACTS_Q4_GROUP || kind == QRZ_ACTS_FP4_GROUP ||
           kind == QRZ_ACTS_SQ4_GROUP;
}
/* the same activations, rows [i0, i0 + n) */
qrz_acts qrz_acts_rows(const qrz_acts *a, int64_t i0, int64_t n);
/* scales per activation row: 1 for row kinds, cols/group for group kinds */
int64_t qrz_acts_scales_per_row(int kind, int64_t cols, int32_t group);
/* quantizes x[n][cols] into a->q/d/e (and a->sums when set) as a->kind says (the buffers must be allocated);
 * scalar, the reference */
void qrz_quantize_acts(qrz_acts *a);
/* per ISA: NULL, or a quantizer giving the scalar one's bytes, which returns false for kinds it leaves to it */
extern bool (*qrz_acts_quantizer[QRZ_ISA_COUNT])(qrz_acts *a);
/* the ISA's quantizer where it has one for a->kind, else the scalar one */
void qrz_quantize_acts_isa(qrz_acts *a, int isa);

/* y[i*ldy + r] = dot(W row r, activation row i) for rows r in [r0, r1), all n activation rows */
typedef void (*qrz_matmul_fn)(const qrz_weight *w, const qrz_acts *x, int64_t r0, int64_t r1,
                              float *y, int64_t ldy);

/* One row per tensor type. A type has up to two activation paths: [0] for 8-bit (and float types' only path),
 * [1] for 4-bit; acts[1] == QRZ_ACTS_COUNT where the type has no 4-bit path (it then uses [0]). */
typedef struct {
    const char *name;
    int acts[2];                  /* qrz_acts_kind of each path */
    uint64_t (*nbytes)(int64_t rows, int64_t cols, int32_t group);
    void (*dequant_row)(const qrz_weight *w, int64_t r, float *out);
    qrz_matmul_fn matmul[2][QRZ_ISA_COUNT];   /* NULL where an ISA has no kernel: the scalar one is used */
    /* NULL, or checks at load that stored codes lie in the range the kernels' integer bounds assume:
     * returns NULL if they do, else what is wrong */
    const char *(*check)(const qrz_weight *w);
    /* NULL, or the size of a tensor that its own 64-byte header sets (nbytes then returns 0) */
    uint64_t (*nbytes_head)(const uint8_t *head, int64_t rows, int64_t cols, int32_t group);
} qrz_type_traits;

extern qrz_type_traits qrz_types[QRZ_TYPE_COUNT];

/* FP4 (docs/FORMAT.md): a tensor starts with a 64-byte header; e is a layout's exponent bits (1 E1M2, 2 E2M1,
 * 3 E3M0) */
#define QRZ_FP4_HEADER 64
/* activation scale modes (header byte 2): one calibrated unit for every row (LLM-FP4's), one per row from its
 * maximum, one per group of the weight's group size from the group's maximum */
enum { QRZ_FP4_STATIC = 0, QRZ_FP4_ROW = 1, QRZ_FP4_GROUP = 2 };
extern const int8_t qrz_fp4_lut[4][16];   /* [e][code]: codes 0..7 the layout's integer magnitudes, 8 + i minus them */
int qrz_fp4_max_shift(int e);             /* K: the largest activation channel offset of layout e */
typedef struct {
    int e_w, e_a, mode;           /* weight and activation layouts; activation scale: QRZ_FP4_STATIC, _ROW, _GROUP */
    float scale;                  /* static: the code unit; dynamic: the clipping ratio */
    const uint8_t *shifts;        /* [cols] activation channel offsets k_c */
    const uint16_t *d;            /* [rows][cols/group] f16 weight scales */
    const uint8_t *codes;         /* [rows][cols/2] nibble plane of codes */
} qrz_fp4_view;
qrz_fp4_view qrz_fp4_split(const uint8_t *data, int64_t rows, int64_t cols, int32_t group);
/* SQ (docs/FORMAT.md): a 64-byte header (u16 k slots per group, u16 cold grid, u32 hot channels, f32 cold clipping,
 * u16 slot layout), the hot plane, the f16 scale plane, the slot plane, the nibble plane.
 * A slot is `pos_bits` bits of position in the group and a 4-bit signed high part h; the nibble plane holds the
 * value's low part at the slot's position, so w = d * (q + 16 h): an int8-range value costs pos_bits + 4 bits, not
 * 16, which is what fits three slots per group of 64 in the 4.75 bits per weight that two took. */
#define QRZ_SQ_HEADER 64
/* the u16 at byte 2 of an SQ header: the grid of the cold activation channels under act="4bit" */
#define QRZ_SQ_COLD_INT4 0
#define QRZ_SQ_COLD_E2M1 1
/* the u16 at byte 12: the slot plane's layout; 0 (u8 position, i8 value pairs) was written before it and is refused */
#define QRZ_SQ_LAYOUT_PACKED 1
#define QRZ_SQ_MAX_GROUP 256      /* so at most 256 slots per group, positions of at most 8 bits */
typedef struct {
    int32_t k;                    /* slots per group */
    float clip;                   /* act="4bit": the cold channels' scale is clip * their max / 7 */
    const uint8_t *hot;           /* [cols] 1 = the activation channel stays 8-bit under act="4bit" */
    const uint16_t *d;            /* [rows][cols/group] f16 scales */
    const uint8_t *slots;         /* [rows][cols/group] records of `record` bytes: k slots of pos_bits + 4 bits */
    const uint8_t *codes;         /* [rows][cols/2] nibble plane */
    int32_t pos_bits, record;     /* bits of a slot's position (those of group - 1); bytes of a group's slots */
} qrz_sq_view;
/* the bits of a position in a group of `group`, and the bytes of a group's k slots */
static inline int32_t qrz_sq_pos_bits(int32_t group) {
    int32_t b = 1;
    while ((1 << b) < group) b++;
    return b;
}
static inline int32_t qrz_sq_record(int32_t k, int32_t group) { return (k * (qrz_sq_pos_bits(group) + 4) + 7) / 8; }
/* a slot's 4-bit two's-complement high part, times 16 */
static inline int32_t qrz_sq_high16(uint32_t nibble) {
    const int32_t h = (int32_t)(nibble & 15);
    return 16 * (h - ((h & 8) << 1));
}
/* slot j of a group's record: its position in the group and its value's high part times 16 (the low part is the
 * nibble at that position); reads only the record's own bytes */
static inline int32_t qrz_sq_slot(const uint8_t *record, int32_t j, int32_t pos_bits, int32_t *pos) {
    const uint32_t width = (uint32_t)pos_bits + 4, at = (uint32_t)j * width, first = at >> 3,
                   last = (at + width - 1) >> 3;
    uint32_t bits = 0;
    for (uint32_t b = first; b <= last; b++) bits |= (uint32_t)record[b] << (8 * (b - first));
    bits >>= at & 7;
    *pos = (int32_t)(bits & ((1u << pos_bits) - 1));
    return qrz_sq_high16(bits >> pos_bits);
}
/* every slot of a group's record at once, as qrz_sq_slot gives them: one 64-bit read when the record fits in 8
 * bytes (k <= 6 at a group of 64), which is what the SIMD kernels' per-group step can afford */
static inline void qrz_sq_slots(const uint8_t *record, int32_t k, int32_t pos_bits, int32_t record_bytes,
                                int32_t *pos, int32_t *high) {
    if (record_bytes > 8) {
        for (int32_t j = 0; j < k; j++) high[j] = qrz_sq_slot(record, j, pos_bits, pos + j);
        return;
    }
    uint64_t bits = 0;
    for (int32_t b = 0; b < record_bytes; b++) bits |= (uint64_t)record[b] << (8 * b);
    const uint64_t pos_mask = (1u << pos_bits) - 1;
    for (int32_t j = 0; j < k; j++, bits >>= pos_bits + 4) {
        pos[j] = (int32_t)(bits & pos_mask);
        high[j] = qrz_sq_high16((uint32_t)(bits >> pos_bits));
    }
}
qrz_sq_view qrz_sq_split(const uint8_t *data, int64_t rows, int64_t cols, int32_t group);
void qrz_types_init(void);        /* fills the SIMD columns of qrz_types for this build */
/* the activation path (0 or 1) a weight type uses when the context asks for act_bits */
int qrz_act_path(int type, int act_bits);
qrz_matmul_fn qrz_matmul_for(int type, int path, int isa);

/* small float vector kernels the attention uses, per ISA */
typedef struct {
    float (*dot)(const float *a, const float *b, int n);
    void (*axpy)(float *y, float a, const float *x, int n);     /* y += a * x */
    /* NULL, or in place: x[t] = exp(scale x[t] - m) / sum, m = max scale x[t] (attention's weights) */
    void (*softmax)(float *x, int n, float scale);
    /* NULL, or the MLP's gate: h[j] = act(g[j]) * u[j], act SiLU or (gelu) GELU with the tanh approximation */
    void (*gate)(float *h, const float *g, const float *u, int n, int gelu);
} qrz_vec_ops;
void qrz_softmax(int isa, float *x, int n, float scale);   /* the ISA's softmax, else the scalar one */
void qrz_gate(int isa, float *h, const float *g, const float *u, int n, int gelu);   /* likewise */
extern qrz_vec_ops qrz_vec[QRZ_ISA_COUNT];

/* KV cache rows (kvcache.c, docs/QUANTIZATION.md): one cached k or v vector of head_dim values per (slot, kv head),
 * in a qrz_kv_cache_type. Rows are packed back to back, so a row's start is not aligned (memcpy its scale). */
#define QRZ_KV_CACHE_COUNT 4
typedef struct {
    void (*store)(void *row, const float *x, int n);            /* x[n] into a row */
    float (*dot)(const float *q, const void *row, int n);       /* q · row */
    void (*axpy)(float *y, float a, const void *row, int n);    /* y += a * row */
    /* NULL, or the same over m rows `stride` bytes apart at once (attention's two loops, done per row they cost a
     * call, a horizontal sum or a load and store of y per row): out[t] = q · row_t, and y = sum_t a[t] row_t */
    void (*dots)(const float *q, const uint8_t *rows, size_t stride, int m, int n, float *out);
    void (*mix)(float *y, const float *a, const uint8_t *rows, size_t stride, int m, int n);
} qrz_kv_ops;
/* [kv type][isa]; a NULL member means the scalar one (kernels_avx2.c fills the AVX2 column) */
extern qrz_kv_ops qrz_kv[QRZ_KV_CACHE_COUNT][QRZ_ISA_COUNT];
extern const char *const qrz_kv_names[QRZ_KV_CACHE_COUNT];
qrz_kv_ops qrz_kv_ops_for(int kv_type, int isa);                /* resolved: store, dot and axpy set */
/* out[t] = q · row_t and y = sum_t a[t] row_t over m rows `stride` bytes apart: ops->dots and ops->mix where set,
 * else a loop of ops->dot or ops->axpy */
void qrz_kv_dots(const qrz_kv_ops *ops, const float *q, const uint8_t *rows, size_t stride, int m, int n, float *out);
void qrz_kv_mix(const qrz_kv_ops *ops, float *y, const float *a, const uint8_t *rows, size_t stride, int m, int n);
int qrz_kv_group(int head_dim);   /* 8bit/4bit rows' group: head_dim if <= 32, else 32 if it divides, else 16 */

/* per-ISA kernel registration (kernels_avx2.c, kernels_neon.c) */
void qrz_register_avx2(void);
void qrz_register_kv_avx2(void);    /* the KV-row section of kernels_avx2.c, called by qrz_register_avx2 */
void qrz_register_neon(void);
/* the AVXVNNI and AVX512 columns: the AVX2 column copied, then their own kernels */
void qrz_register_avxvnni(void);
void qrz_register_avx512(void);
void qrz_isa_inherit(int isa, int from);   /* copies every kernel table's column `from` into column `isa` */

/* ---- threads ---- */
typedef struct qrz_pool qrz_pool;
typedef void (*qrz_task_fn)(void *arg, int ith, int nth);
qrz_pool *qrz_pool_new(int n_threads);
void qrz_pool_free(qrz_pool *pool);
int qrz_pool_size(const qrz_pool *pool);
/* runs fn(arg, i, n) for i in [0, n) on the pool's threads (the caller is thread 0) and waits for all */
void qrz_pool_run(qrz_pool *pool, qrz_task_fn fn, void *arg);
int qrz_physical_cores(void);

/* ---- time ---- */
double qrz_now_ms(void);

/* ---- the inference context (model.c runs the forward pass, generate.c the token loop) ---- */
typedef enum { QRZ_ARCH_LLAMA, QRZ_ARCH_QWEN2, QRZ_ARCH_GEMMA3 } qrz_arch;
typedef enum { QRZ_ACT_SILU, QRZ_ACT_GELU_TANH } qrz_activation;

typedef struct {
    const float *attn_norm, *ffn_norm;            /* [n_embd], before attention and before the MLP */
    const float *attn_post_norm, *ffn_post_norm;  /* [n_embd], on their outputs (Gemma-3); NULL otherwise */
    const float *q_norm, *k_norm;                 /* [head_dim], per-head RMSNorm of q and k (Gemma-3); NULL otherwise */
    qrz_weight wq, wk, wv, wo;                    /* (n_heads*hd, n_embd) (n_kv*hd, n_embd) x2, (n_embd, n_heads*hd) */
    const float *bq, *bk, *bv;                    /* optional biases, NULL when absent */
    qrz_weight w_gate, w_up, w_down;              /* (n_ff, n_embd) x2, (n_embd, n_ff) */
    /* attention span: a sliding layer sees the last `window` positions and keeps only kv_slots of them (a ring:
     * position p lives in slot p % kv_slots); a global layer has window 0 and a slot per context position */
    int32_t window, kv_slots;
    uint8_t *k_cache, *v_cache;                   /* [kv_slots][n_kv_heads] rows of ctx->kv_row_bytes, inside ctx->kv */
    const float *inv_freq;                        /* [head_dim/2] RoPE frequencies: ctx->inv_freq or _local */
} qrz_layer;

/* where a matmul's input rows go once quantized (qrz_acts's q, d, e, sums and qu) */
typedef struct {
    int8_t *q;
    float *d;
    uint8_t *e;
    int32_t *sums;
    uint8_t *qu;                                  /* NULL but for I8_ROW on AVX-512 */
} qrz_act_buffers;

struct qrz_context {
    qrz_model *model;
    qrz_arch arch;
    qrz_activation act;
    /* hyper-parameters */
    int32_t n_vocab, n_embd, n_layers, n_heads, n_kv_heads, head_dim, n_ff, n_ctx, n_batch;
    float norm_eps;
    float embed_scale;                            /* token embeddings are multiplied by it (Gemma: sqrt(n_embd)) */
    float attn_scale;                             /* q.k multiplier, 1/sqrt(head_dim) unless the model says otherwise */
    float logit_softcap;                          /* logits = cap * tanh(logits / cap) when > 0 */
    float *inv_freq, *inv_freq_local;             /* [head_dim/2] RoPE frequencies of global and sliding layers */
    /* weights, views into the mapped file */
    qrz_weight tok_embd, output;                  /* (n_vocab, n_embd) each; output may alias tok_embd */
    const float *output_norm;                     /* [n_embd] */
    qrz_layer *layers;                            /* [n_layers] */
    int isa;
    qrz_pool *pool;
    qrz_matmul_hook matmul_hook;                  /* when set, sees every matmul's float input (calibration) */
    void *matmul_hook_user;
    /* KV cache, one allocation of rows of kv_type; each layer's k and v planes point into it */
    uint8_t *kv;
    uint64_t kv_bytes;
    int kv_type;                                  /* qrz_kv_cache_type */
    size_t kv_row_bytes;                          /* one (slot, kv head) row: qrz_kv_row_bytes(kv_type, head_dim) */
    qrz_kv_ops kv_ops;                            /* its row functions for ctx->isa */
    /* scratch for one batch of up to n_batch tokens */
    float *rope_cos, *rope_sin;                   /* [2][n_batch][head_dim/2]: global, then sliding-layer angles */
    float *x, *xb, *q, *k, *v, *att, *hb;         /* [n_batch][n_embd | n_heads*hd | n_kv*hd | n_ff] */
    float *gate_tiles;                            /* [n_threads][2][QRZ_ACTS_TILE_MAX][QRZ_ROW_BLOCK]: a block of
                                                   * gate and up outputs before they are combined into hb */
    atomic_int *chunks_taken;                     /* [n_threads] a matmul's row chunks taken from each thread's */
    const qrz_weight *next[2];                    /* the next pass's matrices (prefetched by idle threads), or NULL */
    int64_t next_rows;                            /* the rows that pass hands out in chunks */
    float *scores;                                /* [n_threads][n_ctx + head_dim] attention weights, then a
                                                   * head_dim part sum where the KV ring wraps */
    int act_bits;                                 /* 8 or 4: which activation path quantized matmuls take */
    /* quantized matmul inputs: acts[0] [n_batch][max cols] for every matmul; acts[1] and acts[2]
     * [n_batch][n_embd] for the inputs quantized beside it for one pass over several matrices (up beside gate, k
     * and v beside q), each apart because a format's activation form may depend on the tensor (FP4's offsets,
     * SQ's hot channels). Scales, shifts and group sums hold cols / (the file's smallest group) + 1 per row. */
    qrz_act_buffers acts[3];
    float *logits;                                /* [LOGIT_ROWS][n_vocab] */
    /* the sequence held in the KV cache */
    int32_t *tokens;                              /* [n_ctx] */
    int32_t n_past;
    char err[512];
};

#define QRZ_LOGIT_ROWS 32
/* matmul tiles: weight rows per block, and the most activation rows one kernel call takes */
#define QRZ_ROW_BLOCK 16
#define QRZ_ACTS_TILE_MAX 128
/* runs tokens[0..n) at positions n_past.. and leaves their final-norm hidden states in ctx->xb ([n][n_embd]);
 * n <= n_batch */
int qrz_forward(qrz_context *ctx, const int32_t *tokens, int32_t n);
/* logits[i] = output head applied to ctx->xb row i, for rows [0, n) */
void qrz_output_head(qrz_context *ctx, const float *hidden, int32_t n, float *logits);
int qrz_fail(qrz_context *ctx, int status, const char *fmt, ...);
bool qrz_is_eog(const qrz_model *m, int32_t token);
/* how many of the cached tokens can be kept when the sequence is cut back to `keep` tokens: `keep` itself, or 0
 * when a sliding layer's ring has already overwritten positions the continuation would need */
int32_t qrz_context_keepable(const qrz_context *ctx, int32_t keep);

#endif
