/* file.c - opening a .qrz: map it, check it, index its metadata and tensors (docs/FORMAT.md).
 *
 * Every read is bounds-checked against the mapped size before it happens, so a truncated or hostile file
 * becomes a QRZ_ERR_FORMAT with a message, never a read past the mapping.
 */
#include "qrz_internal.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- logging and errors ---- */
static qrz_log_fn g_log_fn;
static void *g_log_user;

void qrz_set_log_callback(qrz_log_fn fn, void *user) { g_log_fn = fn; g_log_user = user; }

void qrz_log(int level, const char *fmt, ...) {
    if (!g_log_fn) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    g_log_fn(g_log_user, level, msg);
}

void qrz_set_error(char *buf, size_t cap, const char *fmt, ...) {
    if (!buf || cap == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
}

double qrz_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* ---- half precision (IEEE binary16), exact both ways, round-to-nearest-even on the way down ---- */
float qrz_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {      /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t qrz_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, absx = x & 0x7FFFFFFFu;
    if (absx >= 0x7F800000u) return (uint16_t)(sign | 0x7C00 | (absx > 0x7F800000u ? 0x200 : 0));
    if (absx >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);            /* rounds to >= 65520: inf */
    if (absx < 0x38800000u) {                                             /* below 2^-14: subnormal */
        if (absx < 0x33000000u) return (uint16_t)sign;                    /* below 2^-25: zero */
        uint32_t e = absx >> 23, m = (absx & 0x7FFFFF) | 0x800000;
        uint32_t shift = 126 - e;                                         /* 14 + (113 - e) - 1 */
        uint32_t half = m >> shift, rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((absx >> 13) - ((127 - 15) << 10));
    uint32_t rem = absx & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* ---- CRC-32 (IEEE, reflected, as zlib.crc32), slicing by 8 ---- */
static uint32_t crc_table[8][256];
static int crc_ready;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
    crc_ready = 1;
}

uint32_t qrz_crc32(uint32_t crc, const void *data, size_t n) {
    if (!crc_ready) crc_init();
    const uint8_t *p = data;
    crc = ~crc;
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc;
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
              crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
              crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* ---- a bounds-checked reader over the mapping ---- */
typedef struct {
    const uint8_t *base;
    uint64_t pos, end;
    bool ok;
} reader;

static const uint8_t *take(reader *r, uint64_t n) {
    if (!r->ok || n > r->end - r->pos) { r->ok = false; return NULL; }
    const uint8_t *p = r->base + r->pos;
    r->pos += n;
    return p;
}
static uint32_t rd_u32(reader *r) { const uint8_t *p = take(r, 4); uint32_t v = 0; if (p) memcpy(&v, p, 4); return v; }
static uint64_t rd_u64(reader *r) { const uint8_t *p = take(r, 8); uint64_t v = 0; if (p) memcpy(&v, p, 8); return v; }

static uint64_t kv_scalar_size(uint32_t type) {
    switch (type) {
    case QRZ_KV_U8: case QRZ_KV_I8: case QRZ_KV_BOOL: return 1;
    case QRZ_KV_U16: case QRZ_KV_I16: return 2;
    case QRZ_KV_U32: case QRZ_KV_I32: case QRZ_KV_F32: return 4;
    case QRZ_KV_U64: case QRZ_KV_I64: case QRZ_KV_F64: return 8;
    default: return 0;
    }
}

/* reads one value of `type` (not an array) and returns false if it does not fit or the type is unknown */
static bool skip_value(reader *r, uint32_t type) {
    if (type == QRZ_KV_STRING) { uint64_t n = rd_u64(r); return take(r, n) != NULL; }
    uint64_t size = kv_scalar_size(type);
    return size && take(r, size) != NULL;
}

static int parse_kv(reader *r, qrz_kv_view *kv, char *err, size_t cap) {
    kv->key_len = rd_u64(r);
    kv->key = (const char *)take(r, kv->key_len);
    kv->type = rd_u32(r);
    kv->elem_type = 0;
    if (!r->ok) goto truncated;
    if (kv->type == QRZ_KV_ARRAY) {
        kv->elem_type = rd_u32(r);
        kv->count = rd_u64(r);
        if (!r->ok) goto truncated;
        if (kv->elem_type == QRZ_KV_ARRAY || (kv->elem_type != QRZ_KV_STRING && !kv_scalar_size(kv->elem_type))) {
            qrz_set_error(err, cap, "metadata key '%.*s' has an array of unknown element type %u",
                          (int)kv->key_len, kv->key, kv->elem_type);
            return QRZ_ERR_FORMAT;
        }
        uint64_t start = r->pos;
        if (kv->elem_type == QRZ_KV_STRING) {
            for (uint64_t i = 0; i < kv->count; i++)
                if (!skip_value(r, QRZ_KV_STRING)) goto truncated;
        } else {
            uint64_t size = kv_scalar_size(kv->elem_type);
            if (kv->count > (r->end - r->pos) / size) goto truncated;
            take(r, kv->count * size);
        }
        kv->data = r->base + start;
        kv->nbytes = r->pos - start;
    } else if (kv->type == QRZ_KV_STRING) {
        kv->count = rd_u64(r);
        kv->data = take(r, kv->count);
        kv->nbytes = kv->count;
        if (!r->ok) goto truncated;
    } else {
        kv->count = 1;
        kv->nbytes = kv_scalar_size(kv->type);
        if (!kv->nbytes) {
            qrz_set_error(err, cap, "metadata key '%.*s' has unknown value type %u", (int)kv->key_len, kv->key, kv->type);
            return QRZ_ERR_FORMAT;
        }
        kv->data = take(r, kv->nbytes);
        if (!r->ok) goto truncated;
    }
    return QRZ_OK;
truncated:
    qrz_set_error(err, cap, "the metadata section is truncated or corrupt (the file may be cut short)");
    return QRZ_ERR_FORMAT;
}

static int parse_tensor(reader *r, qrz_tensor_view *t, const uint8_t *base, uint64_t data_offset, uint64_t file_size,
                        char *err, size_t cap) {
    memset(t, 0, sizeof *t);
    t->name_len = rd_u64(r);
    t->name = (const char *)take(r, t->name_len);
    t->type = rd_u32(r);
    t->n_dims = rd_u32(r);
    if (!r->ok) goto truncated;
    if (t->n_dims < 1 || t->n_dims > 4) {
        qrz_set_error(err, cap, "tensor '%.*s' has %u dimensions (1 to 4 allowed)", (int)t->name_len, t->name, t->n_dims);
        return QRZ_ERR_FORMAT;
    }
    for (uint32_t i = 0; i < t->n_dims; i++) t->shape[i] = rd_u64(r);
    t->group_size = rd_u32(r);
    uint64_t rel = rd_u64(r);
    t->nbytes = rd_u64(r);
    t->crc32 = rd_u32(r);
    if (!r->ok) goto truncated;
    if (t->type >= QRZ_TYPE_COUNT) {
        qrz_set_error(err, cap, "tensor '%.*s' has type %u, unknown to this version of pyqrt; upgrade pyqrt",
                      (int)t->name_len, t->name, t->type);
        return QRZ_ERR_FORMAT;
    }
    if (rel % QRZ_ALIGN) {
        qrz_set_error(err, cap, "tensor '%.*s' data is not 64-byte aligned", (int)t->name_len, t->name);
        return QRZ_ERR_FORMAT;
    }
    int64_t rows = 1, cols = (int64_t)t->shape[t->n_dims - 1];
    for (uint32_t i = 0; i + 1 < t->n_dims; i++) {
        if (t->shape[i] > (1ull << 40) || (t->shape[i] && (uint64_t)rows > (1ull << 40) / t->shape[i])) goto bad_shape;
        rows *= (int64_t)t->shape[i];
    }
    if (t->shape[t->n_dims - 1] > (1ull << 40) || rows > (1ll << 40)) goto bad_shape;
    if (rel > file_size || t->nbytes > file_size - data_offset || rel > file_size - data_offset - t->nbytes) {
        qrz_set_error(err, cap, "tensor '%.*s' lies past the end of the file: the file is truncated; "
                      "convert the model again", (int)t->name_len, t->name);
        return QRZ_ERR_FORMAT;
    }
    /* a type whose size its own header sets (SQ) is read there, once the header is known to lie in the file */
    const uint8_t *head = t->nbytes >= 64 ? base + data_offset + rel : NULL;
    uint64_t want = qrz_tensor_nbytes_of((int)t->type, rows, cols, (int32_t)t->group_size, head);
    if (want == 0 || want != t->nbytes) {
        qrz_set_error(err, cap, "tensor '%.*s': %llu bytes recorded, %llu expected for its type and shape",
                      (int)t->name_len, t->name, (unsigned long long)t->nbytes, (unsigned long long)want);
        return QRZ_ERR_FORMAT;
    }
    t->offset = data_offset + rel;
    return QRZ_OK;
bad_shape:
    qrz_set_error(err, cap, "tensor '%.*s' has an impossible shape", (int)t->name_len, t->name);
    return QRZ_ERR_FORMAT;
truncated:
    qrz_set_error(err, cap, "the tensor directory is truncated or corrupt (the file may be cut short)");
    return QRZ_ERR_FORMAT;
}

/* the tokenizer tables the detokenizer needs; absent tables simply leave the model unable to render text */
static int index_tokenizer(qrz_model *m, char *err, size_t cap) {
    const qrz_kv_view *tb = qrz_find_kv(m, "tokenizer.token_bytes");
    if (tb && tb->type == QRZ_KV_ARRAY && tb->elem_type == QRZ_KV_STRING) {
        if (tb->count > (1u << 24)) { qrz_set_error(err, cap, "tokenizer.token_bytes is implausibly large"); return QRZ_ERR_FORMAT; }
        m->n_tokens = (int32_t)tb->count;
        m->token_bytes = calloc(m->n_tokens ? m->n_tokens : 1, sizeof *m->token_bytes);
        m->token_type = calloc(m->n_tokens ? m->n_tokens : 1, sizeof *m->token_type);
        if (!m->token_bytes || !m->token_type) return QRZ_ERR_MEMORY;
        reader r = {tb->data, 0, tb->nbytes, true};
        for (int32_t i = 0; i < m->n_tokens; i++) {
            uint64_t n = rd_u64(&r);
            const uint8_t *p = take(&r, n);
            if (!p || n > UINT32_MAX) { qrz_set_error(err, cap, "tokenizer.token_bytes is corrupt"); return QRZ_ERR_FORMAT; }
            m->token_bytes[i].ptr = p;
            m->token_bytes[i].len = (uint32_t)n;
        }
        const qrz_kv_view *tt = qrz_find_kv(m, "tokenizer.token_type");
        if (tt && tt->type == QRZ_KV_ARRAY && tt->elem_type == QRZ_KV_I32) {
            uint64_t n = tt->count < (uint64_t)m->n_tokens ? tt->count : (uint64_t)m->n_tokens;
            memcpy(m->token_type, tt->data, n * 4);
        }
    }
    const qrz_kv_view *eog = qrz_find_kv(m, "tokenizer.eog_ids");
    if (eog && eog->type == QRZ_KV_ARRAY && eog->elem_type == QRZ_KV_I32 && eog->count < 4096) {
        m->n_eog = (int32_t)eog->count;
        m->eog_ids = malloc((m->n_eog ? m->n_eog : 1) * sizeof(int32_t));
        if (!m->eog_ids) return QRZ_ERR_MEMORY;
        memcpy(m->eog_ids, eog->data, m->n_eog * 4);
    } else {
        const qrz_kv_view *eos = qrz_find_kv(m, "tokenizer.eos_id");
        int32_t id = -1;
        if (eos && eos->type == QRZ_KV_I32) memcpy(&id, eos->data, 4);
        m->eog_ids = malloc(sizeof(int32_t));
        if (!m->eog_ids) return QRZ_ERR_MEMORY;
        m->n_eog = id >= 0;
        m->eog_ids[0] = id;
    }
    return QRZ_OK;
}

/* The checksum reads the file with pread, not through the mapping: a page read through the mapping stays in this
 * process's resident set, and rows of an embedding table that no prompt looks up (most of a 150k-token vocabulary)
 * would then count against its memory for as long as the model is open. Read this way, they only pass through the
 * page cache, which the kernel may drop. */
#define CRC_CHUNK (1u << 20)      /* the read buffer of crc32_of_file_range */

static int crc32_of_file_range(int fd, const char *path, uint64_t offset, uint64_t n, uint8_t *buf, uint32_t *out,
                               char *err, size_t cap) {
    uint32_t crc = 0;
    while (n > 0) {
        const ssize_t got = pread(fd, buf, n < CRC_CHUNK ? n : CRC_CHUNK, (off_t)offset);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            qrz_set_error(err, cap, "cannot read '%s': %s", path, got < 0 ? strerror(errno) : "the file shrank");
            return QRZ_ERR_IO;
        }
        crc = qrz_crc32(crc, buf, (size_t)got);
        offset += (uint64_t)got;
        n -= (uint64_t)got;
    }
    *out = crc;
    return QRZ_OK;
}

/* The file mapped at a 2 MiB boundary and marked for huge pages: where the page cache holds the file in 2 MiB
 * folios (ext4 and others on recent kernels), the mapping can then use one TLB entry per 2 MiB instead of one per
 * 4 KiB. A token reads every weight once, hundreds of MB, so with 4 KiB pages it walks the page table every 4 KiB.
 * Whether the page cache has such folios is up to the kernel (one day 336 of Qwen2.5's 337 MB were mapped so,
 * another day 72); copy_weights below does not depend on it. The alignment also lets copied ranges get huge pages. */
static void *map_aligned(int fd, uint64_t size) {
    const uint64_t huge = 2u << 20;
    uint8_t *span = mmap(NULL, size + huge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (span == MAP_FAILED) return mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    uint8_t *at = (uint8_t *)(((uintptr_t)span + huge - 1) & ~(uintptr_t)(huge - 1));
    void *map = mmap(at, size, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
    if (map == MAP_FAILED) { munmap(span, size + huge); return mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0); }
    if (at > span) munmap(span, (size_t)(at - span));
    const uint64_t tail = (uint64_t)(span + size + huge - (at + size));
    if (tail) munmap(at + size, tail);
#ifdef MADV_HUGEPAGE
    madvise(map, size, MADV_HUGEPAGE);
#endif
    return map;
}

/* Weights read into anonymous memory marked for huge pages, in place of the mapping of pages [from, to) of the file
 * (the same addresses, so every view into the file stays valid), then made read-only: anonymous huge pages are the
 * kernel's to give at fault time, whatever the page cache holds, so every 2 MiB of weights is one TLB entry.
 * Qwen2.5-0.5B generated 3% faster so than from a mapping whose page cache was mostly in small folios. The cost:
 * the pages are this process's own, not shared with another process that loads the same file. */
static int copy_pages(qrz_model *m, int fd, const char *path, uint64_t from, uint64_t to, char *err, size_t cap) {
    if (from >= to) return QRZ_OK;
    uint8_t *at = (uint8_t *)m->base + from;
    if (mmap(at, to - from, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) {
        qrz_set_error(err, cap, "out of memory reading '%s' (%llu bytes); load it with mmap=True", path,
                      (unsigned long long)(to - from));
        return QRZ_ERR_MEMORY;
    }
#ifdef MADV_HUGEPAGE
    madvise(at, to - from, MADV_HUGEPAGE);
#endif
    const uint64_t end = to < m->size ? to : m->size;
    for (uint64_t off = from; off < end;) {
        const uint64_t want = end - off < (64u << 20) ? end - off : (64u << 20);
        const ssize_t got = pread(fd, (uint8_t *)m->base + off, (size_t)want, (off_t)off);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            qrz_set_error(err, cap, "cannot read '%s': %s", path, got < 0 ? strerror(errno) : "the file shrank");
            return QRZ_ERR_IO;
        }
        off += (uint64_t)got;
    }
    mprotect(at, to - from, PROT_READ);   /* the kernels never write weights; a stray write faults */
    return QRZ_OK;
}

/* The tensors' pages copied (copy_pages), except those of a token embedding that has an output head of its own:
 * a token reads one row of it, and a mapping keeps the rows no prompt looks up (most of a 150k-token vocabulary)
 * out of memory. The byte ranges copied (before and after those pages) are recorded in m->copied for the
 * checksum. */
static int copy_weights(qrz_model *m, int fd, const char *path, uint64_t data_offset, char *err, size_t cap) {
    const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    const uint64_t start = data_offset / page * page, end = (m->size + page - 1) / page * page;
    const qrz_tensor_view *emb = qrz_find_tensor(m, "model.embed_tokens.weight");
    uint64_t hole_from = end, hole_to = end;   /* pages left mapped */
    if (emb && qrz_find_tensor(m, "lm_head.weight")) {
        hole_from = (emb->offset + page - 1) / page * page;
        hole_to = (emb->offset + emb->nbytes) / page * page;
        if (hole_to <= hole_from) hole_from = hole_to = end;
    }
    m->copied[0][0] = start; m->copied[0][1] = hole_from;
    m->copied[1][0] = hole_to; m->copied[1][1] = end;
    int rc = copy_pages(m, fd, path, start, hole_from, err, cap);
    return rc == QRZ_OK ? copy_pages(m, fd, path, hole_to, end, err, cap) : rc;
}

static bool in_copied(const qrz_model *m, uint64_t off, uint64_t n) {
    for (int i = 0; i < 2; i++)
        if (off >= m->copied[i][0] && off + n <= m->copied[i][1]) return true;
    return false;
}

/* copy (true) or map (false), by the flags or, with neither, by whether anonymous memory gets huge pages */
static bool copy_wanted(int flags) {
    if (flags & QRZ_OPEN_MAP) return false;
    if (flags & QRZ_OPEN_COPY) return true;
#ifdef MADV_HUGEPAGE
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return false;
    char line[128] = {0};
    const bool thp = fgets(line, sizeof line, f) && (strstr(line, "[always]") || strstr(line, "[madvise]"));
    fclose(f);
    return thp;
#else
    return false;
#endif
}

int qrz_model_open(const char *path, int flags, qrz_model **out, char *err, size_t cap) {
    if (!path || !out) { qrz_set_error(err, cap, "path and out must not be NULL"); return QRZ_ERR_ARG; }
    if (flags & ~(QRZ_OPEN_VERIFY | QRZ_OPEN_MAP | QRZ_OPEN_COPY) || (flags & QRZ_OPEN_MAP && flags & QRZ_OPEN_COPY)) {
        qrz_set_error(err, cap, "flags %d: QRZ_OPEN_VERIFY, and at most one of QRZ_OPEN_MAP and QRZ_OPEN_COPY", flags);
        return QRZ_ERR_ARG;
    }
    const bool verify = flags & QRZ_OPEN_VERIFY, copied = copy_wanted(flags);
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) { qrz_set_error(err, cap, "cannot open '%s': %s", path, strerror(errno)); return QRZ_ERR_IO; }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        qrz_set_error(err, cap, "'%s' is not a regular file", path);
        return QRZ_ERR_IO;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size < QRZ_HEADER_BYTES) {
        close(fd);
        qrz_set_error(err, cap, "'%s' is %llu bytes, too short to be a .qrz file (truncated?)", path, (unsigned long long)size);
        return QRZ_ERR_FORMAT;
    }
    void *map = map_aligned(fd, size);
    if (map == MAP_FAILED) {
        close(fd);
        qrz_set_error(err, cap, "cannot map '%s': %s", path, strerror(errno));
        return QRZ_ERR_IO;
    }

    qrz_model *m = calloc(1, sizeof *m);
    if (!m) { close(fd); munmap(map, size); qrz_set_error(err, cap, "out of memory"); return QRZ_ERR_MEMORY; }
    m->base = map;
    m->size = size;
    int rc = QRZ_ERR_FORMAT;
    reader r = {m->base, 0, size, true};
    const uint8_t *magic = take(&r, 4);
    if (memcmp(magic, QRZ_MAGIC, 4) != 0) {
        if (memcmp(magic, "GGUF", 4) == 0)
            qrz_set_error(err, cap, "'%s' is a GGUF file, not a .qrz; convert it with: python -m convert '%s' OUT.qrz", path, path);
        else
            qrz_set_error(err, cap, "'%s' is not a .qrz file (bad magic); convert a model with python -m convert", path);
        goto fail;
    }
    uint32_t endian = rd_u32(&r);
    if (endian != QRZ_ENDIAN_MARK) {
        qrz_set_error(err, cap, endian == 0x0D0C0B0Au ? "'%s' was written big-endian; this runtime reads little-endian .qrz files"
                                                      : "'%s' has a corrupt header (bad endianness marker)", path);
        goto fail;
    }
    m->version = rd_u32(&r);
    if (m->version != QRZ_VERSION) {
        qrz_set_error(err, cap, "'%s' is .qrz version %u; this pyqrt reads version %u: %s", path, m->version, QRZ_VERSION,
                      m->version > QRZ_VERSION ? "upgrade pyqrt" : "convert the model again with this pyqrt");
        rc = QRZ_ERR_VERSION;
        goto fail;
    }
    uint32_t meta_crc = rd_u32(&r);
    m->n_kv = (int64_t)rd_u64(&r);
    m->n_tensors = (int64_t)rd_u64(&r);
    uint64_t data_offset = rd_u64(&r), file_size = rd_u64(&r);
    if (file_size != size) {
        qrz_set_error(err, cap, "'%s' is %llu bytes but its header says %llu: the file is %s; convert the model again",
                      path, (unsigned long long)size, (unsigned long long)file_size, size < file_size ? "truncated" : "corrupt");
        goto fail;
    }
    if (data_offset % QRZ_ALIGN || data_offset < QRZ_HEADER_BYTES || data_offset > size) {
        qrz_set_error(err, cap, "'%s' has a corrupt header (data offset %llu)", path, (unsigned long long)data_offset);
        goto fail;
    }
    if (qrz_crc32(0, m->base + 16, data_offset - 16) != meta_crc) {
        qrz_set_error(err, cap, "'%s' is corrupt: the metadata checksum does not match; convert the model again", path);
        rc = QRZ_ERR_CHECKSUM;
        goto fail;
    }
    /* every entry takes at least 12 bytes, which bounds the counts before allocating for them */
    if (m->n_kv < 0 || m->n_tensors < 0 || (uint64_t)m->n_kv > data_offset / 12 || (uint64_t)m->n_tensors > data_offset / 12) {
        qrz_set_error(err, cap, "'%s' has a corrupt header (counts)", path);
        goto fail;
    }
    r.end = data_offset;
    m->kvs = calloc(m->n_kv ? m->n_kv : 1, sizeof *m->kvs);
    m->tensors = calloc(m->n_tensors ? m->n_tensors : 1, sizeof *m->tensors);
    if (!m->kvs || !m->tensors) { rc = QRZ_ERR_MEMORY; qrz_set_error(err, cap, "out of memory"); goto fail; }
    for (int64_t i = 0; i < m->n_kv; i++)
        if ((rc = parse_kv(&r, &m->kvs[i], err, cap)) != QRZ_OK) goto fail;
    for (int64_t i = 0; i < m->n_tensors; i++)
        if ((rc = parse_tensor(&r, &m->tensors[i], m->base, data_offset, size, err, cap)) != QRZ_OK) goto fail;
    if ((rc = index_tokenizer(m, err, cap)) != QRZ_OK) goto fail;
    if (copied && (rc = copy_weights(m, fd, path, data_offset, err, cap)) != QRZ_OK) goto fail;
    if (verify) {
        uint8_t *buf = malloc(CRC_CHUNK);
        if (!buf) { rc = QRZ_ERR_MEMORY; qrz_set_error(err, cap, "out of memory"); goto fail; }
        for (int64_t i = 0; i < m->n_tensors && rc == QRZ_OK; i++) {
            const qrz_tensor_view *t = &m->tensors[i];
            uint32_t crc;
            if (in_copied(m, t->offset, t->nbytes)) crc = qrz_crc32(0, m->base + t->offset, (size_t)t->nbytes);
            else if ((rc = crc32_of_file_range(fd, path, t->offset, t->nbytes, buf, &crc, err, cap)) != QRZ_OK) break;
            if (crc != t->crc32) {
                qrz_set_error(err, cap, "'%s' is corrupt: tensor '%.*s' fails its checksum; convert the model again",
                              path, (int)t->name_len, t->name);
                rc = QRZ_ERR_CHECKSUM;
            }
        }
        free(buf);
        if (rc != QRZ_OK) goto fail;
    }
    /* codes outside what the kernels' integer bounds assume are refused, checksum or not */
    for (int64_t i = 0; i < m->n_tensors; i++) {
        const qrz_tensor_view *t = &m->tensors[i];
        if (!qrz_types[t->type].check) continue;
        int64_t rows = 1;                 /* bounded by parse_tensor */
        for (uint32_t d = 0; d + 1 < t->n_dims; d++) rows *= (int64_t)t->shape[d];
        const qrz_weight w = {(int)t->type, (int32_t)t->group_size, rows, (int64_t)t->shape[t->n_dims - 1],
                              m->base + t->offset, -1};
        const char *why = qrz_types[t->type].check(&w);
        if (why) {
            qrz_set_error(err, cap, "'%s' is corrupt: tensor '%.*s' holds %s; convert the model again",
                          path, (int)t->name_len, t->name, why);
            rc = QRZ_ERR_FORMAT;
            goto fail;
        }
    }
    /* weights are read front to back once per token: ask for read-ahead */
    if (!copied) madvise(map, size, MADV_WILLNEED);
    close(fd);
    *out = m;
    return QRZ_OK;
fail:
    close(fd);
    qrz_model_free(m);
    return rc;
}

void qrz_model_free(qrz_model *m) {
    if (!m) return;
    if (m->base) munmap((void *)m->base, m->size);
    free(m->kvs);
    free(m->tensors);
    free(m->token_bytes);
    free(m->token_type);
    free(m->eog_ids);
    free(m);
}

uint32_t qrz_model_version(const qrz_model *m) { return m ? m->version : 0; }
int64_t qrz_model_n_kv(const qrz_model *m) { return m ? m->n_kv : 0; }
int64_t qrz_model_n_tensors(const qrz_model *m) { return m ? m->n_tensors : 0; }
uint64_t qrz_model_file_size(const qrz_model *m) { return m ? m->size : 0; }

int qrz_model_kv(const qrz_model *m, int64_t i, qrz_kv_view *out) {
    if (!m || !out || i < 0 || i >= m->n_kv) return QRZ_ERR_ARG;
    *out = m->kvs[i];
    return QRZ_OK;
}

int qrz_model_tensor(const qrz_model *m, int64_t i, qrz_tensor_view *out) {
    if (!m || !out || i < 0 || i >= m->n_tensors) return QRZ_ERR_ARG;
    *out = m->tensors[i];
    return QRZ_OK;
}

const qrz_kv_view *qrz_find_kv(const qrz_model *m, const char *key) {
    size_t n = strlen(key);
    for (int64_t i = 0; i < m->n_kv; i++)
        if (m->kvs[i].key_len == n && memcmp(m->kvs[i].key, key, n) == 0) return &m->kvs[i];
    return NULL;
}

const qrz_tensor_view *qrz_find_tensor(const qrz_model *m, const char *name) {
    size_t n = strlen(name);
    for (int64_t i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].name_len == n && memcmp(m->tensors[i].name, name, n) == 0) return &m->tensors[i];
    return NULL;
}

bool qrz_kv_u32(const qrz_model *m, const char *key, uint32_t *out) {
    const qrz_kv_view *kv = qrz_find_kv(m, key);
    if (!kv) return false;
    if (kv->type == QRZ_KV_U32 || kv->type == QRZ_KV_I32) { memcpy(out, kv->data, 4); return true; }
    if (kv->type == QRZ_KV_U64 || kv->type == QRZ_KV_I64) { uint64_t v; memcpy(&v, kv->data, 8); *out = (uint32_t)v; return v <= UINT32_MAX; }
    return false;
}

bool qrz_kv_f32(const qrz_model *m, const char *key, float *out) {
    const qrz_kv_view *kv = qrz_find_kv(m, key);
    if (!kv) return false;
    if (kv->type == QRZ_KV_F32) { memcpy(out, kv->data, 4); return true; }
    if (kv->type == QRZ_KV_F64) { double v; memcpy(&v, kv->data, 8); *out = (float)v; return true; }
    return false;
}

bool qrz_kv_bool(const qrz_model *m, const char *key, bool *out) {
    const qrz_kv_view *kv = qrz_find_kv(m, key);
    if (!kv || (kv->type != QRZ_KV_BOOL && kv->type != QRZ_KV_U8)) return false;
    *out = *(const uint8_t *)kv->data != 0;
    return true;
}

bool qrz_kv_str_eq(const qrz_model *m, const char *key, const char *value) {
    const qrz_kv_view *kv = qrz_find_kv(m, key);
    return kv && kv->type == QRZ_KV_STRING && kv->count == strlen(value) && memcmp(kv->data, value, kv->count) == 0;
}
