/* model.c - the transformer: bind the mapped weights, then one readable forward pass.
 *
 * Read top to bottom: context creation (hyper-parameters, weights, buffers), the building blocks (matmul on the
 * thread pool, RMSNorm, RoPE, attention), the forward pass, and the public eval/score calls.
 * Architectures: Llama (RMSNorm, RoPE with rotate-half pairs, grouped-query attention, SwiGLU MLP, tied or
 * separate output head; Mistral and TinyLlama are Llamas), Qwen2 (a Llama with q/k/v biases) and Gemma-3 (q/k
 * norms, norms after attention and MLP too, GELU-tanh, scaled embeddings, sliding-window layers with their own
 * RoPE base). The differences are data: which tensors exist, and a few model.* keys (docs/FORMAT.md).
 */
#include "qrz_internal.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int qrz_fail(qrz_context *ctx, int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
    va_end(ap);
    return status;
}

const char *qrz_context_error(const qrz_context *ctx) { return ctx ? ctx->err : "no context"; }

/* ---- binding weights ---- */
static int bind_matrix(const qrz_model *m, const char *name, int64_t rows, int64_t cols, bool optional,
                       qrz_weight *out, char *err, size_t cap) {
    const qrz_tensor_view *t = qrz_find_tensor(m, name);
    memset(out, 0, sizeof *out);
    if (!t) {
        if (optional) return QRZ_OK;
        qrz_set_error(err, cap, "tensor '%s' is missing from the file; convert the model again", name);
        return QRZ_ERR_ARCH;
    }
    if (t->n_dims != 2 || (int64_t)t->shape[0] != rows || (int64_t)t->shape[1] != cols) {
        qrz_set_error(err, cap, "tensor '%s' has shape (%llu, %llu), expected (%lld, %lld)", name,
                      (unsigned long long)t->shape[0], (unsigned long long)(t->n_dims > 1 ? t->shape[1] : 0),
                      (long long)rows, (long long)cols);
        return QRZ_ERR_ARCH;
    }
    *out = (qrz_weight){(int)t->type, (int32_t)t->group_size, rows, cols, m->base + t->offset, t - m->tensors,
                        (int64_t)t->nbytes};
    return QRZ_OK;
}

static int bind_vector(const qrz_model *m, const char *name, int64_t n, bool optional, const float **out,
                       char *err, size_t cap) {
    const qrz_tensor_view *t = qrz_find_tensor(m, name);
    *out = NULL;
    if (!t) {
        if (optional) return QRZ_OK;
        qrz_set_error(err, cap, "tensor '%s' is missing from the file; convert the model again", name);
        return QRZ_ERR_ARCH;
    }
    if (t->n_dims != 1 || (int64_t)t->shape[0] != n || t->type != QRZ_TYPE_F32) {
        qrz_set_error(err, cap, "tensor '%s' must be a float32 vector of %lld values", name, (long long)n);
        return QRZ_ERR_ARCH;
    }
    *out = (const float *)(m->base + t->offset);
    return QRZ_OK;
}

/* a float array from the metadata (ARRAY of F32, exactly n long); false if absent, error if malformed */
static int kv_f32_array(const qrz_model *m, const char *key, int n, float *out, bool *found, char *err, size_t cap) {
    const qrz_kv_view *kv = qrz_find_kv(m, key);
    *found = kv != NULL;
    if (!kv) return QRZ_OK;
    if (kv->type != QRZ_KV_ARRAY || kv->elem_type != QRZ_KV_F32 || kv->count != (uint64_t)n) {
        qrz_set_error(err, cap, "metadata '%s' must be an array of %d float32; convert the model again", key, n);
        return QRZ_ERR_ARCH;
    }
    memcpy(out, kv->data, (size_t)n * sizeof(float));   /* metadata is not aligned: copy, never cast */
    return QRZ_OK;
}

/* RoPE frequencies in float32 the way transformers computes them, inv_freq = 1 / base^(2i/d), unless the file
 * carries them precomputed (scaled RoPE: Llama-3, linear) */
static int rope_frequencies(const qrz_model *m, const char *key, float base, int head_dim, float *out,
                            char *err, size_t cap) {
    bool found;
    int rc = kv_f32_array(m, key, head_dim / 2, out, &found, err, cap);
    if (rc || found) return rc;
    for (int i = 0; i < head_dim / 2; i++) out[i] = 1.0f / powf(base, (float)(2 * i) / (float)head_dim);
    return QRZ_OK;
}

static const struct { const char *name; qrz_arch arch; } ARCHITECTURES[] = {
    {"llama", QRZ_ARCH_LLAMA}, {"qwen2", QRZ_ARCH_QWEN2}, {"gemma3", QRZ_ARCH_GEMMA3},
};

static int read_hparams(qrz_context *c, char *err, size_t cap) {
    const qrz_model *m = c->model;
    const qrz_kv_view *arch = qrz_find_kv(m, "general.architecture");
    if (!arch || arch->type != QRZ_KV_STRING) {
        qrz_set_error(err, cap, "the file has no general.architecture; convert the model again");
        return QRZ_ERR_ARCH;
    }
    size_t a = 0, n_arch = sizeof ARCHITECTURES / sizeof ARCHITECTURES[0];
    while (a < n_arch && !qrz_kv_str_eq(m, "general.architecture", ARCHITECTURES[a].name)) a++;
    if (a == n_arch) {
        qrz_set_error(err, cap, "architecture '%.*s' is not supported by this pyqrt (supported: llama, qwen2, gemma3)",
                      (int)(arch->count > 64 ? 64 : arch->count), (const char *)arch->data);
        return QRZ_ERR_ARCH;
    }
    c->arch = ARCHITECTURES[a].arch;
    struct { const char *key; int32_t *dst; } ints[] = {
        {"model.n_vocab", &c->n_vocab}, {"model.n_embd", &c->n_embd}, {"model.n_layers", &c->n_layers},
        {"model.n_heads", &c->n_heads}, {"model.n_kv_heads", &c->n_kv_heads}, {"model.head_dim", &c->head_dim},
        {"model.n_ff", &c->n_ff},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        uint32_t v;
        if (!qrz_kv_u32(m, ints[i].key, &v) || v == 0 || v > (1u << 24)) {
            qrz_set_error(err, cap, "metadata '%s' is missing or invalid; convert the model again", ints[i].key);
            return QRZ_ERR_ARCH;
        }
        *ints[i].dst = (int32_t)v;
    }
    if (c->n_heads % c->n_kv_heads || c->head_dim % 2) {
        qrz_set_error(err, cap, "inconsistent attention shape: %d heads, %d kv heads, head_dim %d",
                      c->n_heads, c->n_kv_heads, c->head_dim);
        return QRZ_ERR_ARCH;
    }
    if (!qrz_kv_f32(m, "model.norm_eps", &c->norm_eps)) c->norm_eps = 1e-5f;
    if (!qrz_kv_f32(m, "model.embed_scale", &c->embed_scale)) c->embed_scale = 1.0f;
    if (!qrz_kv_f32(m, "model.attn_scale", &c->attn_scale)) c->attn_scale = 1.0f / sqrtf((float)c->head_dim);
    if (!qrz_kv_f32(m, "model.logit_softcap", &c->logit_softcap)) c->logit_softcap = 0.0f;
    if (qrz_find_kv(m, "model.activation") && !qrz_kv_str_eq(m, "model.activation", "silu")) {
        if (!qrz_kv_str_eq(m, "model.activation", "gelu_tanh")) {
            qrz_set_error(err, cap, "metadata model.activation names an activation this pyqrt lacks (silu, gelu_tanh)");
            return QRZ_ERR_ARCH;
        }
        c->act = QRZ_ACT_GELU_TANH;
    }

    float theta = 10000.0f, theta_local;
    qrz_kv_f32(m, "model.rope_theta", &theta);
    if (!qrz_kv_f32(m, "model.rope_theta_local", &theta_local)) theta_local = theta;
    c->inv_freq = malloc((size_t)c->head_dim / 2 * sizeof(float));
    c->inv_freq_local = malloc((size_t)c->head_dim / 2 * sizeof(float));
    c->layers = calloc(c->n_layers, sizeof *c->layers);
    if (!c->inv_freq || !c->inv_freq_local || !c->layers) { qrz_set_error(err, cap, "out of memory"); return QRZ_ERR_MEMORY; }
    int rc;
    if ((rc = rope_frequencies(m, "model.rope_inv_freq", theta, c->head_dim, c->inv_freq, err, cap)) ||
        (rc = rope_frequencies(m, "model.rope_inv_freq_local", theta_local, c->head_dim, c->inv_freq_local, err, cap)))
        return rc;

    /* which layers slide: model.sliding_layers (one U8 per layer) names them, model.sliding_window sizes them */
    uint32_t window = 0;
    qrz_kv_u32(m, "model.sliding_window", &window);
    const qrz_kv_view *sl = qrz_find_kv(m, "model.sliding_layers");
    if (sl && (sl->type != QRZ_KV_ARRAY || (sl->elem_type != QRZ_KV_U8 && sl->elem_type != QRZ_KV_BOOL) ||
               sl->count != (uint64_t)c->n_layers)) {
        qrz_set_error(err, cap, "metadata model.sliding_layers must hold one U8 per layer; convert the model again");
        return QRZ_ERR_ARCH;
    }
    for (int l = 0; l < c->n_layers; l++) {
        const bool sliding = window > 0 && sl && ((const uint8_t *)sl->data)[l];
        c->layers[l].window = sliding ? (int32_t)(window > (1u << 24) ? (1u << 24) : window) : 0;
        c->layers[l].inv_freq = sliding ? c->inv_freq_local : c->inv_freq;
    }
    return QRZ_OK;
}

static int bind_weights(qrz_context *c, char *err, size_t cap) {
    const qrz_model *m = c->model;
    const int64_t E = c->n_embd, Q = (int64_t)c->n_heads * c->head_dim, KV = (int64_t)c->n_kv_heads * c->head_dim;
    const bool gemma = c->arch == QRZ_ARCH_GEMMA3, qwen = c->arch == QRZ_ARCH_QWEN2;
    int rc;
    if ((rc = bind_matrix(m, "model.embed_tokens.weight", c->n_vocab, E, false, &c->tok_embd, err, cap))) return rc;
    if ((rc = bind_matrix(m, "lm_head.weight", c->n_vocab, E, true, &c->output, err, cap))) return rc;
    if (!c->output.data) c->output = c->tok_embd;            /* tied embeddings */
    if ((rc = bind_vector(m, "model.norm.weight", E, false, &c->output_norm, err, cap))) return rc;
    for (int l = 0; l < c->n_layers; l++) {
        qrz_layer *L = &c->layers[l];
        char name[128];
#define NAME(suffix) (snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix), name)
        if ((rc = bind_vector(m, NAME("input_layernorm.weight"), E, false, &L->attn_norm, err, cap))) return rc;
        if (gemma) {   /* Gemma's post_attention_layernorm normalizes the attention output; the MLP has its own pair */
            if ((rc = bind_vector(m, NAME("post_attention_layernorm.weight"), E, false, &L->attn_post_norm, err, cap)) ||
                (rc = bind_vector(m, NAME("pre_feedforward_layernorm.weight"), E, false, &L->ffn_norm, err, cap)) ||
                (rc = bind_vector(m, NAME("post_feedforward_layernorm.weight"), E, false, &L->ffn_post_norm, err, cap)) ||
                (rc = bind_vector(m, NAME("self_attn.q_norm.weight"), c->head_dim, false, &L->q_norm, err, cap)) ||
                (rc = bind_vector(m, NAME("self_attn.k_norm.weight"), c->head_dim, false, &L->k_norm, err, cap)))
                return rc;
        } else if ((rc = bind_vector(m, NAME("post_attention_layernorm.weight"), E, false, &L->ffn_norm, err, cap))) {
            return rc;
        }
        if ((rc = bind_matrix(m, NAME("self_attn.q_proj.weight"), Q, E, false, &L->wq, err, cap))) return rc;
        if ((rc = bind_matrix(m, NAME("self_attn.k_proj.weight"), KV, E, false, &L->wk, err, cap))) return rc;
        if ((rc = bind_matrix(m, NAME("self_attn.v_proj.weight"), KV, E, false, &L->wv, err, cap))) return rc;
        if ((rc = bind_matrix(m, NAME("self_attn.o_proj.weight"), E, Q, false, &L->wo, err, cap))) return rc;
        if ((rc = bind_vector(m, NAME("self_attn.q_proj.bias"), Q, !qwen, &L->bq, err, cap))) return rc;
        if ((rc = bind_vector(m, NAME("self_attn.k_proj.bias"), KV, !qwen, &L->bk, err, cap))) return rc;
        if ((rc = bind_vector(m, NAME("self_attn.v_proj.bias"), KV, !qwen, &L->bv, err, cap))) return rc;
        if ((rc = bind_matrix(m, NAME("mlp.gate_proj.weight"), c->n_ff, E, false, &L->w_gate, err, cap))) return rc;
        if ((rc = bind_matrix(m, NAME("mlp.up_proj.weight"), c->n_ff, E, false, &L->w_up, err, cap))) return rc;
        if ((rc = bind_matrix(m, NAME("mlp.down_proj.weight"), E, c->n_ff, false, &L->w_down, err, cap))) return rc;
#undef NAME
    }
    return QRZ_OK;
}

/* KV cache: a global layer keeps every context position; a sliding layer keeps its window plus one batch, so a
 * batch's keys can be written before any of its queries read (the oldest key a batch still needs is then never
 * overwritten) and the sequence can be cut back by up to a batch without losing what the continuation needs.
 * A slot holds one row per kv head, in the context's row type (kvcache.c). */
static int kv_cache_new(qrz_context *c) {
    c->kv_row_bytes = (size_t)qrz_kv_row_bytes(c->kv_type, c->head_dim);
    c->kv_ops = qrz_kv_ops_for(c->kv_type, c->isa);
    const uint64_t slot_bytes = (uint64_t)c->n_kv_heads * c->kv_row_bytes;
    uint64_t total = 0;
    for (int l = 0; l < c->n_layers; l++) {
        qrz_layer *L = &c->layers[l];
        const int64_t ring = (int64_t)L->window + c->n_batch;
        L->kv_slots = L->window && ring < c->n_ctx ? (int32_t)ring : c->n_ctx;
        total += 2 * (uint64_t)L->kv_slots * slot_bytes;
    }
    /* calloc'd: the OS maps zero pages lazily, so an unused context costs address space, not memory */
    c->kv = calloc(total, 1);
    if (!c->kv) return QRZ_ERR_MEMORY;
    c->kv_bytes = total;
    uint8_t *p = c->kv;
    for (int l = 0; l < c->n_layers; l++) {
        qrz_layer *L = &c->layers[l];
        L->k_cache = p; p += (uint64_t)L->kv_slots * slot_bytes;
        L->v_cache = p; p += (uint64_t)L->kv_slots * slot_bytes;
    }
    return QRZ_OK;
}

int32_t qrz_context_keepable(const qrz_context *c, int32_t keep) {
    if (keep >= c->n_past) return keep;
    for (int l = 0; l < c->n_layers; l++) {
        const qrz_layer *L = &c->layers[l];
        if (L->kv_slots >= c->n_ctx) continue;
        /* the continuation reads positions from keep - window + 1 on; the old sequence wrote over position p
         * once it reached p + kv_slots */
        const int32_t oldest = keep - L->window + 1 > 0 ? keep - L->window + 1 : 0;
        if ((int64_t)c->n_past > (int64_t)oldest + L->kv_slots) return 0;
    }
    return keep;
}

void qrz_context_free(qrz_context *c) {
    if (!c) return;
    qrz_pool_free(c->pool);
    free(c->layers);
    free(c->kv);
    free(c->inv_freq); free(c->inv_freq_local);
    free(c->rope_cos); free(c->rope_sin);
    free(c->x); free(c->xb); free(c->q); free(c->k); free(c->v); free(c->att); free(c->hb); free(c->gate_tiles);
    free((void *)c->chunks_taken);
    free(c->scores); free(c->logits); free(c->tokens);
    for (int k = 0; k < 3; k++) {
        qrz_act_buffers *b = &c->acts[k];
        free(b->q); free(b->d); free(b->e); free(b->sums); free(b->qu);
    }
    free(c);
}

int qrz_context_new(qrz_model *model, const qrz_context_params *p, qrz_context **out, char *err, size_t cap) {
    if (!model || !out) { qrz_set_error(err, cap, "model and out must not be NULL"); return QRZ_ERR_ARG; }
    *out = NULL;
    qrz_context_params dp = {0, 0, 0, QRZ_ISA_BEST, 0, QRZ_KV_CACHE_F32};
    if (!p) p = &dp;
    if (p->n_ctx < 0 || p->n_threads < 0 || p->n_batch < 0) {
        qrz_set_error(err, cap, "n_ctx, n_threads and n_batch must be >= 0 (0 picks the default)");
        return QRZ_ERR_ARG;
    }
    if (p->act_bits != 0 && p->act_bits != 8 && p->act_bits != 4) {
        qrz_set_error(err, cap, "act_bits must be 0 (default), 8 or 4, got %d", p->act_bits);
        return QRZ_ERR_ARG;
    }
    if (p->kv_cache < 0 || p->kv_cache >= QRZ_KV_CACHE_COUNT) {
        qrz_set_error(err, cap, "kv_cache must be a qrz_kv_cache_type (0 f32, 1 f16, 2 8bit, 3 4bit), got %d",
                      p->kv_cache);
        return QRZ_ERR_ARG;
    }
    int isa = p->isa == QRZ_ISA_BEST ? qrz_isa_default() : p->isa;
    if (!qrz_isa_supported(isa)) {
        qrz_set_error(err, cap, "this CPU or build cannot run the '%s' kernels", qrz_isa_name(isa));
        return QRZ_ERR_ARG;
    }
    qrz_types_init();
    qrz_context *c = calloc(1, sizeof *c);
    if (!c) { qrz_set_error(err, cap, "out of memory"); return QRZ_ERR_MEMORY; }
    c->model = model;
    c->isa = isa;
    c->act_bits = p->act_bits ? p->act_bits : 8;
    c->kv_type = p->kv_cache;
    int rc;
    if ((rc = read_hparams(c, err, cap)) || (rc = bind_weights(c, err, cap))) goto fail;
    uint32_t n_ctx_train = 0;
    qrz_kv_u32(model, "model.n_ctx_train", &n_ctx_train);
    c->n_ctx = p->n_ctx ? p->n_ctx : (n_ctx_train ? (int32_t)n_ctx_train : 2048);
    if (c->n_ctx > (1 << 20)) { qrz_set_error(err, cap, "n_ctx %d is too large", c->n_ctx); rc = QRZ_ERR_ARG; goto fail; }
    if (n_ctx_train && (uint32_t)c->n_ctx > n_ctx_train)
        qrz_log(30, "n_ctx %d exceeds the model's training context %u; quality may drop past it", c->n_ctx, n_ctx_train);
    c->n_batch = p->n_batch ? p->n_batch : 256;
    if (c->n_batch > c->n_ctx) c->n_batch = c->n_ctx;
    const int n_threads = p->n_threads ? p->n_threads : qrz_physical_cores();
    c->pool = qrz_pool_new(n_threads);

    const size_t B = c->n_batch, E = c->n_embd, Q = (size_t)c->n_heads * c->head_dim,
                 KV = (size_t)c->n_kv_heads * c->head_dim, F = c->n_ff;
    const size_t max_cols = E > Q ? (E > F ? E : F) : (Q > F ? Q : F);
    /* scales, shifts and group sums of a quantized activation row: one per group of the file's smallest group,
     * or one per row */
    int32_t min_group = c->output.group;
    for (int l = 0; l < c->n_layers; l++) {
        const qrz_layer *L = &c->layers[l];
        const qrz_weight *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t k = 0; k < sizeof ws / sizeof ws[0]; k++)
            if (ws[k]->group > 0 && (min_group <= 0 || ws[k]->group < min_group)) min_group = ws[k]->group;
    }
    const size_t per_row = max_cols / (size_t)(min_group > 0 ? min_group : 1) + 1,
                 per_row_up = E / (size_t)(min_group > 0 ? min_group : 1) + 1;
    rc = kv_cache_new(c);
    c->rope_cos = malloc(2 * B * (c->head_dim / 2) * sizeof(float));
    c->rope_sin = malloc(2 * B * (c->head_dim / 2) * sizeof(float));
    c->x = malloc(B * E * sizeof(float));
    c->xb = malloc(B * E * sizeof(float));
    c->q = malloc(B * Q * sizeof(float));
    c->k = malloc(B * KV * sizeof(float));
    c->v = malloc(B * KV * sizeof(float));
    c->att = malloc(B * Q * sizeof(float));
    c->hb = malloc(B * F * sizeof(float));
    c->chunks_taken = calloc((size_t)qrz_pool_size(c->pool), sizeof *c->chunks_taken);
    c->gate_tiles = malloc((size_t)qrz_pool_size(c->pool) * 2 * QRZ_ACTS_TILE_MAX * QRZ_ROW_BLOCK * sizeof(float));
    c->scores = malloc((size_t)qrz_pool_size(c->pool) * (c->n_ctx + c->head_dim) * sizeof(float));
    bool acts_ok = true;
    for (int k = 0; k < 3; k++) {
        qrz_act_buffers *b = &c->acts[k];
        const size_t cols = k == 0 ? max_cols : E, scales = k == 0 ? per_row : per_row_up;
        b->q = malloc(B * cols);
        b->d = malloc(B * scales * sizeof(float));
        b->e = malloc(B * scales);
        b->sums = malloc(B * scales * sizeof(int32_t));
        if (c->isa == QRZ_ISA_AVX512) b->qu = malloc(B * cols);   /* only its SDR column kernel reads them */
        acts_ok = acts_ok && b->q && b->d && b->e && b->sums && (b->qu || c->isa != QRZ_ISA_AVX512);
    }
    c->logits = malloc((size_t)QRZ_LOGIT_ROWS * c->n_vocab * sizeof(float));
    c->tokens = malloc((size_t)c->n_ctx * sizeof(int32_t));
    if (rc || !c->pool || !c->rope_cos || !c->rope_sin || !c->x || !c->xb || !c->q || !c->k || !c->v || !c->att ||
        !c->hb || !c->gate_tiles || !c->chunks_taken || !c->scores || !acts_ok || !c->logits || !c->tokens) {
        qrz_set_error(err, cap, "out of memory allocating a context of %d tokens; pass a smaller ctx", c->n_ctx);
        rc = QRZ_ERR_MEMORY;
        goto fail;
    }
    qrz_log(20, "context: %d tokens, %d threads, %s kernels, %s KV cache of %.1f MiB", c->n_ctx, qrz_pool_size(c->pool),
            qrz_isa_name(isa), qrz_kv_names[c->kv_type], (double)c->kv_bytes / (1 << 20));
    *out = c;
    return QRZ_OK;
fail:
    qrz_context_free(c);
    return rc;
}

int32_t qrz_context_n_ctx(const qrz_context *c) { return c->n_ctx; }
int32_t qrz_context_n_vocab(const qrz_context *c) { return c->n_vocab; }
int32_t qrz_context_n_threads(const qrz_context *c) { return qrz_pool_size(c->pool); }
int32_t qrz_context_n_past(const qrz_context *c) { return c->n_past; }
uint64_t qrz_context_kv_bytes(const qrz_context *c) { return c->kv_bytes; }
void qrz_context_reset(qrz_context *c) { c->n_past = 0; }
void qrz_context_set_matmul_hook(qrz_context *c, qrz_matmul_hook fn, void *user) {
    c->matmul_hook = fn;
    c->matmul_hook_user = user;
}

/* ---- matmul on the thread pool ---- */
/* Rows are handed out in chunks, not split in fixed halves: on a shared machine one core is often slowed for a
 * while (another process, an interrupt), and with a fixed split the other thread then waits at the end of every
 * matmul (the profile of a 512-token prompt had the two threads spinning 13% and 9% of their time). Each thread
 * owns eight consecutive chunks (more for big matrices) and takes them in order, so its reads stay one forward
 * stream (decoding is a read of the weights, and the hardware prefetcher follows a stream); a thread that has
 * finished its own takes what is left of the others'. Chunks are multiples of 16 rows, so two threads never write one cache line of y and the
 * AVX-512 kernels' 16-row blocks stay whole. Which thread computes a row does not change its value. */
#define CHUNKS_PER_THREAD 8
/* Big matrices in more chunks, each of at most this many rows: the output head (151936 rows of Qwen2.5) in sixteen
 * chunks left the thread that finished first waiting up to a sixteenth of the head; at 256 rows Qwen2.5's generation
 * measured +12% and +5% in two A/B runs on 2 threads (medians of 12; 1024 rows +11% and +10%, 64 rows below 256) */
#define CHUNK_MAX_ROWS 256
typedef struct {
    atomic_int *taken;   /* [nth] chunks taken so far from each thread's own (qrz_context.chunks_taken) */
    int nth, per;        /* threads, chunks each thread owns */
    int64_t rows, size;  /* rows in all, rows per chunk */
    const qrz_weight *next[2];   /* the next pass's matrices, whose first rows a thread prefetches when it is done */
    int64_t next_rows;
} row_chunks;

/* how a pass over `rows` rows is cut: chunks each thread owns (*per) of *size rows */
static void chunk_shape(int64_t rows, int nth, int *per, int64_t *size) {
    const int64_t per_min = (rows + (int64_t)CHUNK_MAX_ROWS * nth - 1) / ((int64_t)CHUNK_MAX_ROWS * nth);
    *per = per_min > CHUNKS_PER_THREAD ? (int)per_min : CHUNKS_PER_THREAD;
    const int64_t s = (rows + (int64_t)*per * nth - 1) / ((int64_t)*per * nth);
    *size = (s + QRZ_ROW_BLOCK - 1) / QRZ_ROW_BLOCK * QRZ_ROW_BLOCK;
}

static row_chunks row_chunks_start(qrz_context *c, int64_t rows) {
    const int nth = qrz_pool_size(c->pool);
    int per;
    int64_t size;
    chunk_shape(rows, nth, &per, &size);
    /* relaxed stores: qrz_pool_run publishes them to the workers with its release of the new task */
    for (int t = 0; t < nth; t++) atomic_store_explicit(&c->chunks_taken[t], 0, memory_order_relaxed);
    return (row_chunks){c->chunks_taken, nth, per, rows, size, {c->next[0], c->next[1]}, c->next_rows};
}

/* A thread with no chunk left would wait for the others, then for the main thread's serial work (norms, RoPE,
 * the next input's quantization), while the memory bus idles. It asks instead for the first bytes of the rows it
 * will take first in the next pass, in its own L2. The bulk of every type is its last plane, rows one after another. */
#define IDLE_PREFETCH_BYTES (48 << 10)
static void prefetch_next_pass(const row_chunks *rc, int ith) {
    if (!rc->next[0] || rc->next_rows <= 0) return;
    int per;
    int64_t size;
    chunk_shape(rc->next_rows, rc->nth, &per, &size);
    const int64_t row = (int64_t)ith * per * size;
    for (int k = 0; k < 2 && rc->next[k]; k++) {
        const qrz_weight *w = rc->next[k];
        const int64_t row_bytes = w->type == QRZ_TYPE_F32 ? 4 * w->cols : w->type == QRZ_TYPE_F16 ? 2 * w->cols
                                  : w->type == QRZ_TYPE_Q8 ? w->cols : w->cols / 2;
        if (row >= w->rows || w->nbytes < w->rows * row_bytes) continue;
        const uint8_t *plane = (const uint8_t *)w->data + w->nbytes - w->rows * row_bytes;
        const int64_t budget = rc->next[1] ? IDLE_PREFETCH_BYTES / 2 : IDLE_PREFETCH_BYTES;   /* shared by two */
        const int64_t left = (w->rows - row) * row_bytes, bytes = left < budget ? left : budget;
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(plane + row * row_bytes + b, 0, 2);
    }
}

/* thread ith's next chunk, rows [*r0, *r1): its own first, then the others'; false when none is left */
static bool row_chunks_take(const row_chunks *rc, int ith, int64_t *r0, int64_t *r1) {
    for (int k = 0; k < rc->nth; k++) {
        const int owner = (ith + k) % rc->nth;
        int j;
        while ((j = atomic_fetch_add_explicit(&rc->taken[owner], 1, memory_order_relaxed)) < rc->per) {
            const int64_t start = ((int64_t)owner * rc->per + j) * rc->size;
            if (start >= rc->rows) break;       /* the rows ran out before this owner's chunks did */
            *r0 = start;
            *r1 = start + rc->size < rc->rows ? start + rc->size : rc->rows;
            return true;
        }
    }
    prefetch_next_pass(rc, ith);
    return false;
}

typedef struct {
    const qrz_weight *w;
    qrz_acts acts;
    float *y;
    int64_t ldy;
    qrz_matmul_fn fn;
    int64_t acts_tile;   /* activation rows per kernel call */
    const row_chunks *chunks;
} matmul_job;

/* weight rows per kernel call for n activation rows in tiles of acts: 16 for a full tile, more for fewer, up to
 * 2048 for one (decoding: the kernels' per-call set-up, such as reordering the activation row, is paid once per
 * block, and a block reads its rows as one stream) */
static int64_t weight_rows_per_call(int64_t n, int64_t acts) {
    return QRZ_ROW_BLOCK * (QRZ_ACTS_TILE_MAX / (n < acts ? n : acts));
}

/* rows [r0, end) of a job's matrix, in blocks of weight rows and tiles of activation rows */
static void matmul_rows(const matmul_job *job, int64_t r0, int64_t end) {
    /* cache blocking for prompts: a block of weight rows stays in L1/L2 while a block of activation rows
     * streams past it, instead of every weight row meeting the whole batch */
    const int64_t ACTS = job->acts_tile, n = job->acts.n, ROWS = weight_rows_per_call(n, ACTS);
    for (int64_t rb = r0; rb < end; rb += ROWS) {
        const int64_t re = rb + ROWS < end ? rb + ROWS : end;
        for (int64_t ib = 0; ib < n; ib += ACTS) {
            const qrz_acts sub = qrz_acts_rows(&job->acts, ib, n - ib < ACTS ? n - ib : ACTS);
            job->fn(job->w, &sub, rb, re, job->y + ib * job->ldy, job->ldy);
        }
    }
}

static void matmul_task(void *arg, int ith, int nth) {
    const matmul_job *job = arg;
    int64_t r0, end;
    while (row_chunks_take(job->chunks, ith, &r0, &end)) matmul_rows(job, r0, end);
}

/* activation rows per kernel call: AVX-512's column kernels repack each weight group once per call, so more rows
 * per call amortize it (128 measured 5-10% faster on prompts there; on AVX2 64 stays ahead) */
static int64_t acts_tile(const qrz_context *c) { return c->isa == QRZ_ISA_AVX512 ? QRZ_ACTS_TILE_MAX : 64; }

/* a matmul's job: its input rows x quantized into buffers b for w's kernels */
static matmul_job matmul_prepare(qrz_context *c, const qrz_weight *w, const float *x, int64_t n, const qrz_act_buffers *b) {
    if (c->matmul_hook) c->matmul_hook(c->matmul_hook_user, w->tensor, x, n, w->cols);
    const int path = qrz_act_path(w->type, c->act_bits);
    const int kind = qrz_acts_kind_for(w, path);
    /* q + 128 only where a kernel reads it: int8 rows of a prompt (the column kernels take 8 rows or more) */
    uint8_t *with_qu = kind == QRZ_ACTS_I8_ROW && n >= 8 ? b->qu : NULL;
    matmul_job job = {w, {n, w->cols, x, kind, b->q, b->d, b->e, w->group, w->data, b->sums, with_qu},
                      NULL, w->rows, qrz_matmul_for(w->type, path, c->isa), acts_tile(c), NULL};
    qrz_quantize_acts_isa(&job.acts, c->isa);
    return job;
}

/* y[n][w->rows] = x[n][w->cols] W^T */
static void matmul(qrz_context *c, const qrz_weight *w, const float *x, int64_t n, float *y) {
    matmul_job job = matmul_prepare(c, w, x, n, &c->acts[0]);
    const row_chunks chunks = row_chunks_start(c, w->rows);
    job.y = y;
    job.chunks = &chunks;
    qrz_pool_run(c->pool, matmul_task, &job);
}

/* q, k and v of a layer read the same input: one pass of the pool over their rows as if the three matrices were
 * stacked, instead of three passes, each with its hand-off to the workers and its wait for the last of them (in
 * generation a pass over k or v is 128 rows, less work than the wait). */
typedef struct {
    matmul_job part[3];
    int64_t end[3];      /* where each part's rows end in the stacked numbering */
    const row_chunks *chunks;
} stacked_job;

static void stacked_task(void *arg, int ith, int nth) {
    const stacked_job *job = arg;
    int64_t r0, r1;
    while (row_chunks_take(job->chunks, ith, &r0, &r1))
        for (int p = 0; p < 3; p++) {   /* a chunk may span two parts */
            const int64_t start = p ? job->end[p - 1] : 0;
            const int64_t lo = r0 > start ? r0 : start, hi = r1 < job->end[p] ? r1 : job->end[p];
            if (lo < hi) matmul_rows(&job->part[p], lo - start, hi - start);
        }
}

static void matmul_qkv(qrz_context *c, const qrz_layer *L, const float *x, int64_t n) {
    stacked_job job;
    const qrz_weight *ws[3] = {&L->wq, &L->wk, &L->wv};
    float *ys[3] = {c->q, c->k, c->v};
    int64_t rows = 0;
    for (int p = 0; p < 3; p++) {
        job.part[p] = matmul_prepare(c, ws[p], x, n, &c->acts[p]);
        job.part[p].y = ys[p];
        job.end[p] = rows += ws[p]->rows;
    }
    const row_chunks chunks = row_chunks_start(c, rows);
    job.chunks = &chunks;
    qrz_pool_run(c->pool, stacked_task, &job);
}

/* ---- element-wise blocks ---- */
/* out = weight * x / rms(x); Gemma's (1 + w) scale is folded into the stored weight by the converter */
static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float scale = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

/* RoPE angles of the batch's positions, angle = pos * inv_freq in float32 as transformers computes them, for the
 * global frequencies (table 0) and the sliding layers' (table 1) */
static void rope_angles(qrz_context *c, int pos0, int n) {
    const int half = c->head_dim / 2;
    const float *freqs[2] = {c->inv_freq, c->inv_freq_local};
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < n; i++) {
            float *cs = c->rope_cos + ((size_t)t * c->n_batch + i) * half, *sn = c->rope_sin + ((size_t)t * c->n_batch + i) * half;
            for (int j = 0; j < half; j++) {
                const float angle = (float)(pos0 + i) * freqs[t][j];
                cs[j] = cosf(angle);
                sn[j] = sinf(angle);
            }
        }
}

/* rotate-half RoPE: element i pairs with element i + head_dim/2 (the Hugging Face layout) */
static void rope(const qrz_context *c, float *vec, int n_heads, const float *cs, const float *sn) {
    const int half = c->head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = vec + (size_t)h * c->head_dim;
        for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
    }
}

/* ---- attention: one job per (token, head) pair, spread over the pool ---- */
typedef struct {
    qrz_context *c;
    const qrz_layer *L;
    int n, pos0;
} attention_job;

/* keys and values are read row by row from the cache in its own type: kv_ops.dot and kv_ops.axpy decode a row as
 * they go, so a quantized cache is never expanded into floats */
static void attention_task(void *arg, int ith, int nth) {
    const attention_job *job = arg;
    qrz_context *c = job->c;
    const qrz_layer *L = job->L;
    const int hd = c->head_dim, group = c->n_heads / c->n_kv_heads, slots = L->kv_slots;
    const size_t row = c->kv_row_bytes, slot_bytes = (size_t)c->n_kv_heads * row;
    float *scores = c->scores + (size_t)ith * (c->n_ctx + hd);
    const qrz_kv_ops *kv = &c->kv_ops;
    const int total = job->n * c->n_heads;
    for (int job_i = ith; job_i < total; job_i += nth) {
        const int i = job_i / c->n_heads, h = job_i % c->n_heads, pos = job->pos0 + i;
        const int first = L->window && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0, span = pos - first + 1;
        const float *q = c->q + ((size_t)i * c->n_heads + h) * hd;
        const size_t head = (size_t)(h / group) * row;
        /* the span's slots are [s0, s0 + n0) then, where the ring wraps, [0, span - n0) */
        const int s0 = first % slots, n0 = span < slots - s0 ? span : slots - s0;
        qrz_kv_dots(kv, q, L->k_cache + (size_t)s0 * slot_bytes + head, slot_bytes, n0, hd, scores);
        if (n0 < span) qrz_kv_dots(kv, q, L->k_cache + head, slot_bytes, span - n0, hd, scores + n0);
        qrz_softmax(c->isa, scores, span, c->attn_scale);
        float *out = c->att + ((size_t)i * c->n_heads + h) * hd;
        qrz_kv_mix(kv, out, scores, L->v_cache + (size_t)s0 * slot_bytes + head, slot_bytes, n0, hd);
        if (n0 < span) {   /* the wrapped part: its mix added to the first part's */
            float *part = scores + c->n_ctx;
            qrz_kv_mix(kv, part, scores + n0, L->v_cache + head, slot_bytes, span - n0, hd);
            for (int k = 0; k < hd; k++) out[k] += part[k];
        }
    }
}

/* The MLP's first half in one pass: hb = act(x W_gate^T) * (x W_up^T). Each thread takes a block of rows of
 * both matrices and a tile of activation rows at a time, into its own small gate_tiles, and writes the combined
 * values into hb (qrz_gate: the ISA's vector SiLU or GELU); so no n_batch x n_ff buffer for the up projection
 * (10 MB at 512 tokens of Qwen2.5-0.5B), no separate pass over the hidden values, and the exp or tanh per value
 * runs on every thread while the block is in cache. */
typedef struct {
    qrz_context *c;
    matmul_job gate, up;
} gated_job;

/* the kernels write y[i * ldy + r] for weight rows r in [r0, r1); a tile that holds only rows r0.. is addressed
 * from r0 columns before it. The address is formed as an integer so no pointer leaves its object. */
static float *tile_base(float *tile, int64_t r0) { return (float *)((uintptr_t)tile - (uintptr_t)r0 * sizeof(float)); }

static void gated_task(void *arg, int ith, int nth) {
    const gated_job *job = arg;
    qrz_context *c = job->c;
    const int64_t n = job->gate.acts.n, F = c->n_ff, ACTS = job->gate.acts_tile;
    /* weight rows per step: 16 for a full tile of activation rows (the block stays in cache while the tile
     * streams past), more for fewer activation rows, up to a whole chunk for one: decoding is a read of both
     * matrices, and switching between them every 16 rows (7 KB) kept restarting the hardware prefetcher's streams
     * (fp4 generation measured 24 against 38 tokens/s on one thread) */
    const int64_t R = weight_rows_per_call(n, ACTS);
    float *g_tile = c->gate_tiles + (size_t)ith * 2 * QRZ_ACTS_TILE_MAX * QRZ_ROW_BLOCK;
    float *u_tile = g_tile + QRZ_ACTS_TILE_MAX * QRZ_ROW_BLOCK;
    const int gelu = c->act == QRZ_ACT_GELU_TANH;
    int64_t r0, end;
    while (row_chunks_take(job->gate.chunks, ith, &r0, &end))
        for (int64_t rb = r0; rb < end; rb += R) {
            const int64_t re = rb + R < end ? rb + R : end;
            for (int64_t ib = 0; ib < n; ib += ACTS) {
                const int64_t m = n - ib < ACTS ? n - ib : ACTS;
                const qrz_acts gx = qrz_acts_rows(&job->gate.acts, ib, m), ux = qrz_acts_rows(&job->up.acts, ib, m);
                job->gate.fn(job->gate.w, &gx, rb, re, tile_base(g_tile, rb), R);
                job->up.fn(job->up.w, &ux, rb, re, tile_base(u_tile, rb), R);
                for (int64_t i = 0; i < m; i++)
                    qrz_gate(c->isa, c->hb + (size_t)(ib + i) * F + rb, g_tile + i * R, u_tile + i * R, (int)(re - rb),
                             gelu);
            }
        }
}

static void gated_up(qrz_context *c, const qrz_layer *L, const float *x, int64_t n) {
    gated_job job = {c, matmul_prepare(c, &L->w_gate, x, n, &c->acts[0]), matmul_prepare(c, &L->w_up, x, n, &c->acts[1])};
    const row_chunks chunks = row_chunks_start(c, L->w_gate.rows);
    job.gate.chunks = &chunks;
    qrz_pool_run(c->pool, gated_task, &job);
}

static void add_normed(float *x, float *y, const float *post_norm, int n, int E, float eps) {
    for (int i = 0; i < n; i++) {
        float *yi = y + (size_t)i * E, *xi = x + (size_t)i * E;
        if (post_norm) rmsnorm(yi, yi, post_norm, E, eps);
        for (int j = 0; j < E; j++) xi[j] += yi[j];
    }
}

/* ---- the forward pass ---- */
/* set before a pass: the matrices the pass after it reads (a, and b or NULL), over `rows` rows in all, whose first
 * rows that pass's threads prefetch when they run out of work (prefetch_next_pass) */
static void next_pass(qrz_context *c, const qrz_weight *a, const qrz_weight *b, int64_t rows) {
    c->next[0] = a;
    c->next[1] = b;
    c->next_rows = rows;
}

static int64_t qkv_rows(const qrz_layer *L) { return L->wq.rows + L->wk.rows + L->wv.rows; }

int qrz_forward(qrz_context *c, const int32_t *tokens, int32_t n) {
    const int E = c->n_embd, Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim, hd = c->head_dim,
              half = hd / 2;
    const int pos0 = c->n_past;
    if (n <= 0 || n > c->n_batch) return qrz_fail(c, QRZ_ERR_ARG, "batch of %d tokens (1..%d allowed)", n, c->n_batch);
    if (pos0 + n > c->n_ctx)
        return qrz_fail(c, QRZ_ERR_CONTEXT, "%d tokens do not fit in the context of %d (%d already used); "
                        "load the model with a larger ctx", n, c->n_ctx, pos0);
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->n_vocab)
            return qrz_fail(c, QRZ_ERR_ARG, "token id %d is out of range (vocabulary of %d)", tokens[i], c->n_vocab);
        float *xi = c->x + (size_t)i * E;
        qrz_types[c->tok_embd.type].dequant_row(&c->tok_embd, tokens[i], xi);
        if (c->embed_scale != 1.0f) for (int j = 0; j < E; j++) xi[j] *= c->embed_scale;
    }
    rope_angles(c, pos0, n);
    for (int l = 0; l < c->n_layers; l++) {
        const qrz_layer *L = &c->layers[l];
        const size_t table = (size_t)(L->inv_freq == c->inv_freq ? 0 : 1) * c->n_batch * half;
        /* attention */
        for (int i = 0; i < n; i++) rmsnorm(c->xb + (size_t)i * E, c->x + (size_t)i * E, L->attn_norm, E, c->norm_eps);
        next_pass(c, &L->wo, NULL, L->wo.rows);
        matmul_qkv(c, L, c->xb, n);
        for (int i = 0; i < n; i++) {
            float *q = c->q + (size_t)i * Q, *k = c->k + (size_t)i * KV, *v = c->v + (size_t)i * KV;
            if (L->bq) for (int j = 0; j < Q; j++) q[j] += L->bq[j];
            if (L->bk) for (int j = 0; j < KV; j++) k[j] += L->bk[j];
            if (L->bv) for (int j = 0; j < KV; j++) v[j] += L->bv[j];
            if (L->q_norm) for (int h = 0; h < c->n_heads; h++) rmsnorm(q + h * hd, q + h * hd, L->q_norm, hd, c->norm_eps);
            if (L->k_norm) for (int h = 0; h < c->n_kv_heads; h++) rmsnorm(k + h * hd, k + h * hd, L->k_norm, hd, c->norm_eps);
            const float *cs = c->rope_cos + table + (size_t)i * half, *sn = c->rope_sin + table + (size_t)i * half;
            rope(c, q, c->n_heads, cs, sn);
            rope(c, k, c->n_kv_heads, cs, sn);
            /* k after RoPE, v as is, one row per kv head in the cache's type */
            const size_t slot = (size_t)((pos0 + i) % L->kv_slots) * c->n_kv_heads;
            for (int h = 0; h < c->n_kv_heads; h++) {
                c->kv_ops.store(L->k_cache + (slot + h) * c->kv_row_bytes, k + (size_t)h * hd, hd);
                c->kv_ops.store(L->v_cache + (slot + h) * c->kv_row_bytes, v + (size_t)h * hd, hd);
            }
        }
        attention_job aj = {c, L, n, pos0};
        qrz_pool_run(c->pool, attention_task, &aj);
        next_pass(c, &L->w_gate, &L->w_up, L->w_gate.rows);
        matmul(c, &L->wo, c->att, n, c->xb);
        add_normed(c->x, c->xb, L->attn_post_norm, n, E, c->norm_eps);
        /* gated MLP: down(act(gate x) * up x) */
        for (int i = 0; i < n; i++) rmsnorm(c->xb + (size_t)i * E, c->x + (size_t)i * E, L->ffn_norm, E, c->norm_eps);
        next_pass(c, &L->w_down, NULL, L->w_down.rows);
        gated_up(c, L, c->xb, n);
        if (l + 1 < c->n_layers) next_pass(c, &c->layers[l + 1].wq, NULL, qkv_rows(&c->layers[l + 1]));
        else next_pass(c, &c->output, NULL, c->output.rows);
        matmul(c, &L->w_down, c->hb, n, c->xb);
        add_normed(c->x, c->xb, L->ffn_post_norm, n, E, c->norm_eps);
    }
    for (int i = 0; i < n; i++) rmsnorm(c->xb + (size_t)i * E, c->x + (size_t)i * E, c->output_norm, E, c->norm_eps);
    memcpy(c->tokens + pos0, tokens, (size_t)n * sizeof(int32_t));
    c->n_past = pos0 + n;
    return QRZ_OK;
}

void qrz_output_head(qrz_context *c, const float *hidden, int32_t n, float *logits) {
    next_pass(c, &c->layers[0].wq, NULL, qkv_rows(&c->layers[0]));   /* the next token's first pass */
    matmul(c, &c->output, hidden, n, logits);
    if (c->logit_softcap > 0.0f)
        for (size_t j = 0; j < (size_t)n * c->n_vocab; j++)
            logits[j] = c->logit_softcap * tanhf(logits[j] / c->logit_softcap);
}

/* ---- public eval and score ---- */
int qrz_eval(qrz_context *c, const int32_t *tokens, int32_t n, float *logits, int32_t all_logits) {
    if (!c || (!tokens && n > 0) || n < 0) return c ? qrz_fail(c, QRZ_ERR_ARG, "invalid arguments to eval") : QRZ_ERR_ARG;
    if (c->n_past + n > c->n_ctx)
        return qrz_fail(c, QRZ_ERR_CONTEXT, "%d tokens do not fit in the context of %d (%d already used); "
                        "load the model with a larger ctx", n, c->n_ctx, c->n_past);
    for (int32_t done = 0; done < n;) {
        const int32_t chunk = n - done < c->n_batch ? n - done : c->n_batch;
        int rc = qrz_forward(c, tokens + done, chunk);
        if (rc) return rc;
        if (logits && all_logits) {
            qrz_output_head(c, c->xb, chunk, logits + (size_t)done * c->n_vocab);
        } else if (logits && done + chunk == n) {
            qrz_output_head(c, c->xb + (size_t)(chunk - 1) * c->n_embd, 1, logits);
        }
        done += chunk;
    }
    return QRZ_OK;
}

int qrz_score(qrz_context *c, const int32_t *tokens, int32_t n, double *nll) {
    if (!c || !tokens || !nll || n < 2) return c ? qrz_fail(c, QRZ_ERR_ARG, "score needs at least 2 tokens") : QRZ_ERR_ARG;
    if (n > c->n_ctx)
        return qrz_fail(c, QRZ_ERR_CONTEXT, "a window of %d tokens does not fit in the context of %d; "
                        "use a smaller window or load with a larger ctx", n, c->n_ctx);
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->n_vocab)
            return qrz_fail(c, QRZ_ERR_ARG, "token id %d is out of range (vocabulary of %d)", tokens[i], c->n_vocab);
    c->n_past = 0;
    for (int32_t done = 0; done < n - 1;) {
        const int32_t chunk = n - 1 - done < c->n_batch ? n - 1 - done : c->n_batch;
        int rc = qrz_forward(c, tokens + done, chunk);
        if (rc) return rc;
        for (int32_t r0 = 0; r0 < chunk; r0 += QRZ_LOGIT_ROWS) {
            const int32_t rows = chunk - r0 < QRZ_LOGIT_ROWS ? chunk - r0 : QRZ_LOGIT_ROWS;
            qrz_output_head(c, c->xb + (size_t)r0 * c->n_embd, rows, c->logits);
            for (int32_t i = 0; i < rows; i++) {
                const float *lg = c->logits + (size_t)i * c->n_vocab;
                float mx = -INFINITY;
                for (int v = 0; v < c->n_vocab; v++) mx = lg[v] > mx ? lg[v] : mx;
                double sum = 0.0;
                for (int v = 0; v < c->n_vocab; v++) sum += exp((double)lg[v] - mx);
                const int32_t target = tokens[done + r0 + i + 1];
                nll[done + r0 + i] = log(sum) + mx - lg[target];
            }
        }
        done += chunk;
    }
    return QRZ_OK;
}
