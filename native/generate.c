/* generate.c - the token loop: sample, check for the end, turn ids into text, hand text pieces back.
 *
 * Everything per token stays in C so that Python is entered only when there is text to show. Text is handed
 * back only once it is final: never half a UTF-8 character, never the beginning of what may become a stop
 * string.
 */
#include "qrz_internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

bool qrz_is_eog(const qrz_model *m, int32_t token) {
    for (int32_t i = 0; i < m->n_eog; i++)
        if (m->eog_ids[i] == token) return true;
    return false;
}

/* ---- detokenizing ---- */
static bool renders(const qrz_model *m, int32_t id, bool render_special) {
    if (id < 0 || id >= m->n_tokens) return false;
    return render_special || m->token_type[id] != 1;
}

int64_t qrz_detokenize(const qrz_model *m, const int32_t *tokens, int32_t n, int32_t render_special, char *out, int64_t cap) {
    if (!m || (!tokens && n > 0) || n < 0 || cap < 0) return -1;
    int64_t len = 0;
    for (int32_t i = 0; i < n; i++) {
        if (!renders(m, tokens[i], render_special)) continue;
        const qrz_bytes b = m->token_bytes[tokens[i]];
        if (out && len + b.len <= cap) memcpy(out + len, b.ptr, b.len);
        len += b.len;
    }
    return len;
}

/* ---- sampling: repetition penalty -> top-k -> temperature -> softmax -> top-p -> min-p -> draw ---- */
typedef struct {
    int32_t id;
    float logit;
} candidate;

static uint64_t rng_next(uint64_t *state) {     /* splitmix64: small, fast, and fully determined by the seed */
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *state) { return (rng_next(state) >> 11) * (1.0 / 9007199254740992.0); }

static int by_logit_desc(const void *a, const void *b) {
    const float x = ((const candidate *)a)->logit, y = ((const candidate *)b)->logit;
    if (x != y) return x < y ? 1 : -1;
    return ((const candidate *)a)->id - ((const candidate *)b)->id;
}

/* keeps the k largest of cands[0..n) in cands[0..k), sorted descending: a min-heap of size k, O(n log k) */
static void keep_top_k(candidate *cands, int32_t n, int32_t k) {
    #define WORSE(a, b) ((a).logit < (b).logit || ((a).logit == (b).logit && (a).id > (b).id))
    for (int32_t i = 0; i < n; i++) {
        candidate c = cands[i];
        int32_t pos;
        if (i < k) pos = i;
        else if (WORSE(cands[0], c)) pos = 0;
        else continue;
        if (i < k) {            /* sift up */
            while (pos > 0 && WORSE(c, cands[(pos - 1) / 2])) { cands[pos] = cands[(pos - 1) / 2]; pos = (pos - 1) / 2; }
        } else {                /* replace the root, sift down */
            for (;;) {
                int32_t l = 2 * pos + 1, r = l + 1, m = pos;
                candidate best = c;
                if (l < k && WORSE(cands[l], best)) { m = l; best = cands[l]; }
                if (r < k && WORSE(cands[r], best)) { m = r; }
                if (m == pos) break;
                cands[pos] = cands[m];
                pos = m;
            }
        }
        cands[pos] = c;
    }
    #undef WORSE
    qsort(cands, k, sizeof *cands, by_logit_desc);
}

typedef struct {
    candidate *cands;           /* [n_vocab] */
    uint8_t *seen;              /* [n_vocab] repetition-penalty marks */
    uint64_t rng;
} sampler;

static int32_t sample_token(qrz_context *c, sampler *s, float *logits, const qrz_sampling_params *p) {
    const int32_t V = c->n_vocab;
    if (p->repeat_penalty != 1.0f && p->repeat_penalty > 0.0f) {
        const int32_t n_hist = c->n_past;
        const int32_t from = p->repeat_last_n < 0 ? 0 : (n_hist > p->repeat_last_n ? n_hist - p->repeat_last_n : 0);
        for (int32_t i = from; i < n_hist; i++) {
            const int32_t t = c->tokens[i];
            if (s->seen[t]) continue;
            s->seen[t] = 1;
            logits[t] = logits[t] > 0 ? logits[t] / p->repeat_penalty : logits[t] * p->repeat_penalty;
        }
        for (int32_t i = from; i < n_hist; i++) s->seen[c->tokens[i]] = 0;
    }
    if (p->temperature <= 0.0f) {
        int32_t best = 0;
        for (int32_t v = 1; v < V; v++) if (logits[v] > logits[best]) best = v;
        return best;
    }
    int32_t n = 0;
    if (p->top_k > 0 && p->top_k < V) {
        for (int32_t v = 0; v < V; v++) s->cands[v] = (candidate){v, logits[v]};
        keep_top_k(s->cands, V, p->top_k);
        n = p->top_k;
    } else {
        /* no top-k: sorting the whole vocabulary per token is slow, so drop tokens whose probability relative
         * to the best is below e^-30 first; they cannot change a draw in any double-precision sense */
        float mx = -INFINITY;
        for (int32_t v = 0; v < V; v++) mx = logits[v] > mx ? logits[v] : mx;
        const float floor_logit = mx - 30.0f * p->temperature;
        for (int32_t v = 0; v < V; v++)
            if (logits[v] >= floor_logit) s->cands[n++] = (candidate){v, logits[v]};
        qsort(s->cands, n, sizeof *s->cands, by_logit_desc);
    }
    /* softmax at temperature, in place: from here on a candidate's logit field holds its unnormalized weight */
    double sum = 0.0;
    const double t = p->temperature, top = s->cands[0].logit;
    for (int32_t i = 0; i < n; i++) {
        const double e = exp((s->cands[i].logit - top) / t);
        s->cands[i].logit = (float)e;
        sum += e;
    }
    int32_t keep = n;
    if (p->top_p < 1.0f) {
        double cum = 0.0;
        for (int32_t i = 0; i < n; i++) {
            cum += s->cands[i].logit / sum;
            if (cum >= p->top_p) { keep = i + 1; break; }
        }
    }
    if (p->min_p > 0.0f) {
        const double threshold = p->min_p * s->cands[0].logit;   /* relative to the most likely token */
        int32_t i = 1;
        while (i < keep && s->cands[i].logit >= threshold) i++;
        keep = i;
    }
    double kept = 0.0;
    for (int32_t i = 0; i < keep; i++) kept += s->cands[i].logit;
    double r = rng_uniform(&s->rng) * kept;
    for (int32_t i = 0; i < keep; i++) {
        r -= s->cands[i].logit;
        if (r < 0) return s->cands[i].id;
    }
    return s->cands[keep - 1].id;
}

/* ---- text accounting: what is final, what must wait ---- */
typedef struct {
    char *buf;
    size_t len, cap, emitted;
} text_buf;

static int text_append(text_buf *t, const uint8_t *p, size_t n) {
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 1024;
        while (cap < t->len + n + 1) cap *= 2;
        char *nb = realloc(t->buf, cap);
        if (!nb) return QRZ_ERR_MEMORY;
        t->buf = nb;
        t->cap = cap;
    }
    memcpy(t->buf + t->len, p, n);
    t->len += n;
    t->buf[t->len] = 0;
    return QRZ_OK;
}

/* end of the text that can be shown without splitting a UTF-8 character at the end of [start, end) */
static size_t utf8_complete(const char *s, size_t start, size_t end) {
    for (size_t i = end, back = 0; i > start && back < 4; i--, back++) {
        const unsigned char ch = (unsigned char)s[i - 1];
        if ((ch & 0xC0) == 0x80) continue;            /* continuation byte: keep looking for the lead */
        const size_t need = ch < 0x80 ? 1 : (ch >> 5) == 6 ? 2 : (ch >> 4) == 14 ? 3 : (ch >> 3) == 30 ? 4 : 1;
        return end - (i - 1) < need ? i - 1 : end;
    }
    return end;
}

/* position of the first stop string at or after `from`, or -1; *stop_len receives its length */
static long find_stop(const text_buf *t, size_t from, const qrz_sampling_params *p) {
    long best = -1;
    for (int32_t s = 0; s < p->n_stop; s++) {
        const size_t n = strlen(p->stop[s]);
        if (!n) continue;
        size_t lo = from >= n - 1 ? from - (n - 1) : 0;
        for (size_t i = lo; i + n <= t->len; i++)
            if (memcmp(t->buf + i, p->stop[s], n) == 0) { if (best < 0 || (long)i < best) best = (long)i; break; }
    }
    return best;
}

/* how much of the text's tail might be the start of a stop string and must be held back */
static size_t stop_prefix_hold(const text_buf *t, const qrz_sampling_params *p) {
    size_t hold = 0;
    for (int32_t s = 0; s < p->n_stop; s++) {
        const size_t n = strlen(p->stop[s]);
        for (size_t k = n > 1 ? n - 1 : 0; k > hold; k--)
            if (k <= t->len - t->emitted && memcmp(t->buf + t->len - k, p->stop[s], k) == 0) { hold = k; break; }
    }
    return hold;
}

static int emit(text_buf *t, size_t end, qrz_piece_fn on_piece, void *user) {
    if (end <= t->emitted) return 0;
    int stop = on_piece ? on_piece(user, t->buf + t->emitted, end - t->emitted) : 0;
    t->emitted = end;
    return stop;
}

int qrz_generate(qrz_context *c, const int32_t *prompt, int32_t n_prompt, const qrz_sampling_params *p,
                 qrz_piece_fn on_piece, void *user, int32_t *out_tokens, int32_t out_cap, qrz_generate_result *res) {
    if (!c) return QRZ_ERR_ARG;
    if (!prompt || n_prompt <= 0) return qrz_fail(c, QRZ_ERR_ARG, "the prompt is empty: give at least one token");
    if (!p || !res) return qrz_fail(c, QRZ_ERR_ARG, "params and result must not be NULL");
    if (p->n_stop < 0 || (p->n_stop > 0 && !p->stop)) return qrz_fail(c, QRZ_ERR_ARG, "invalid stop strings");
    for (int32_t s = 0; s < p->n_stop; s++) if (!p->stop[s]) return qrz_fail(c, QRZ_ERR_ARG, "stop string %d is NULL", s);
    if (n_prompt >= c->n_ctx)
        return qrz_fail(c, QRZ_ERR_CONTEXT, "the prompt has %d tokens but the context holds %d (and needs room for at "
                        "least one more); load the model with a larger ctx or shorten the prompt", n_prompt, c->n_ctx);
    memset(res, 0, sizeof *res);
    res->n_prompt = n_prompt;

    /* reuse the longest prefix already in the KV cache; the last prompt token always runs, for its logits */
    int32_t reuse = 0;
    while (reuse < c->n_past && reuse < n_prompt && c->tokens[reuse] == prompt[reuse]) reuse++;
    if (reuse == n_prompt) reuse--;
    reuse = qrz_context_keepable(c, reuse);
    c->n_past = reuse;
    res->n_reused = reuse;

    const int32_t V = c->n_vocab;
    sampler s = {malloc((size_t)V * sizeof(candidate)), calloc((size_t)V, 1), p->seed};
    text_buf text = {0};
    float *logits = c->logits;
    int rc = QRZ_OK;
    if (!s.cands || !s.seen) { rc = qrz_fail(c, QRZ_ERR_MEMORY, "out of memory"); goto done; }

    double t0 = qrz_now_ms();
    if ((rc = qrz_eval(c, prompt + reuse, n_prompt - reuse, logits, 0))) goto done;
    res->prompt_ms = qrz_now_ms() - t0;
    t0 = qrz_now_ms();

    res->finish = QRZ_FINISH_LENGTH;
    const int32_t max_tokens = p->max_tokens < 0 ? INT32_MAX : p->max_tokens;
    while (res->n_generated < max_tokens) {
        const int32_t tok = sample_token(c, &s, logits, p);
        if (!p->ignore_eos && qrz_is_eog(c->model, tok)) { res->finish = QRZ_FINISH_EOG; break; }
        if (out_tokens && res->n_generated < out_cap) out_tokens[res->n_generated] = tok;
        res->n_generated++;
        if (renders(c->model, tok, false)) {
            const size_t before = text.len;
            const qrz_bytes b = c->model->token_bytes[tok];
            if ((rc = text_append(&text, b.ptr, b.len))) { qrz_fail(c, rc, "out of memory"); goto done; }
            const long at = p->n_stop ? find_stop(&text, before, p) : -1;
            if (at >= 0) {
                text.len = (size_t)at;     /* the stop string and anything after it are not part of the answer */
                res->finish = QRZ_FINISH_STOP;
                break;
            }
            const size_t ready = utf8_complete(text.buf, text.emitted, text.len - stop_prefix_hold(&text, p));
            if (emit(&text, ready, on_piece, user)) { res->finish = QRZ_FINISH_ABORTED; break; }
        }
        if (res->n_generated >= max_tokens) break;
        if (c->n_past >= c->n_ctx) { res->finish = QRZ_FINISH_CONTEXT; break; }
        if ((rc = qrz_eval(c, &tok, 1, logits, 0))) goto done;
    }
    if (res->finish != QRZ_FINISH_ABORTED) emit(&text, text.len, on_piece, user);
    res->gen_ms = qrz_now_ms() - t0;
done:
    free(s.cands);
    free(s.seen);
    free(text.buf);
    return rc;
}
