/* npy.c: .npy reader/writer (see npy.h). The header is a Python dict literal; we parse just the
 * three keys NumPy always writes ('descr', 'fortran_order', 'shape') with a small scanner. */
#include "npy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"

static const struct {
    const char *descr[3]; // accepted spellings
    enum opq_dtype dt;
    const char *out; // what we write
} npy_types[] = {
    {{"<f4", NULL, NULL}, OPQ_DTYPE_FLOAT, "<f4"},  {{"<f8", NULL, NULL}, OPQ_DTYPE_DOUBLE, "<f8"},
    {{"|u1", "<u1", NULL}, OPQ_DTYPE_UINT8, "|u1"}, {{"<i4", NULL, NULL}, OPQ_DTYPE_INT32, "<i4"},
    {{"<i8", NULL, NULL}, OPQ_DTYPE_INT64, "<i8"},  {{"|b1", "<b1", NULL}, OPQ_DTYPE_BOOL, "|b1"},
};

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == ','))
        p++;
    return p;
}

// Finds "'key'" followed by ':' in the header; returns the position after ':' or NULL.
static const char *find_key(const char *h, const char *end, const char *key) {
    size_t kl = strlen(key);
    for (const char *p = h; p + kl + 2 <= end; p++) {
        if ((*p == '\'' || *p == '"') && p[kl + 1] == *p && memcmp(p + 1, key, kl) == 0) {
            const char *q = skip_ws(p + kl + 2, end);
            if (q < end && *q == ':')
                return skip_ws(q + 1, end);
        }
    }
    return NULL;
}

static enum opq_status parse_header(struct opq_ctx *ctx, const char *name, const char *h, size_t hl,
                                    struct opq_tensor *out) {
    const char *end = h + hl;
    const char *p = find_key(h, end, "descr");
    if (!p || (*p != '\'' && *p != '"'))
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: .npy header has no 'descr'", name);
    char q = *p++;
    const char *de = memchr(p, q, (size_t)(end - p));
    if (!de)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: bad 'descr' in .npy header", name);
    size_t dl = (size_t)(de - p);
    out->dtype = OPQ_DTYPE_UNDEF;
    for (size_t i = 0; i < ARRAY_SIZE(npy_types); i++)
        for (int j = 0; j < 3 && npy_types[i].descr[j]; j++)
            if (strlen(npy_types[i].descr[j]) == dl && memcmp(p, npy_types[i].descr[j], dl) == 0)
                out->dtype = npy_types[i].dt;
    if (out->dtype == OPQ_DTYPE_UNDEF) {
        if (dl > 0 && p[0] == '>')
            return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                                 "%s: big-endian data (%.*s) is not "
                                 "supported: save it little-endian",
                                 name, (int)dl, p);
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: dtype '%.*s' is not supported "
                             "(float32, float64, uint8, int32, int64, bool)",
                             name, (int)dl, p);
    }
    p = find_key(h, end, "fortran_order");
    if (!p)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: .npy header has no 'fortran_order'", name);
    if (end - p >= 4 && memcmp(p, "True", 4) == 0)
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: Fortran-order arrays are not "
                             "supported: save with np.ascontiguousarray",
                             name);
    if (!(end - p >= 5 && memcmp(p, "False", 5) == 0))
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: bad 'fortran_order'", name);
    p = find_key(h, end, "shape");
    if (!p || *p != '(')
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: .npy header has no 'shape' tuple", name);
    p++;
    out->ndim = 0;
    for (;;) {
        p = skip_ws(p, end);
        if (p >= end)
            return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: unterminated 'shape'", name);
        if (*p == ')')
            break;
        if (*p < '0' || *p > '9')
            return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: bad 'shape'", name);
        if (out->ndim >= OPQ_MAX_DIMS)
            return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED, "%s: rank above %d", name, OPQ_MAX_DIMS);
        int64_t v = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            if (v > (INT64_MAX - 9) / 10)
                return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: dimension too large", name);
            v = v * 10 + (*p++ - '0');
        }
        if (p < end && *p == 'L') // Python 2 longs
            p++;
        out->shape[out->ndim++] = v;
    }
    return OPQ_OK;
}

enum opq_status opq_npy_parse(struct opq_ctx *ctx, struct opq_arena *arena, const void *buf,
                              size_t len, const char *name, struct opq_tensor *out) {
    const unsigned char *b = buf;
    memset(out, 0, sizeof(*out));
    if (len < 10 || memcmp(b, "\x93NUMPY", 6) != 0)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: not a .npy file (bad magic)", name);
    int major = b[6];
    size_t hl;
    size_t off;
    if (major == 1) {
        hl = (size_t)b[8] | (size_t)b[9] << 8;
        off = 10;
    } else if (major == 2 || major == 3) {
        if (len < 12)
            return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: truncated .npy header", name);
        hl = (size_t)b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24;
        off = 12;
    } else {
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED, "%s: .npy format version %d", name, major);
    }
    if (hl > len - off)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: truncated .npy header", name);
    enum opq_status st = parse_header(ctx, name, (const char *)b + off, hl, out);
    if (st != OPQ_OK)
        return st;
    size_t numel;
    size_t nbytes;
    if (!opq_tensor_numel(out, &numel) || !opq_dtype_nbytes(out->dtype, numel, &nbytes))
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: array size overflows", name);
    off += hl;
    if (len - off < nbytes)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: truncated .npy data (%zu of %zu bytes)", name,
                             len - off, nbytes);
    out->data = opq_arena_memdup(arena, b + off, nbytes);
    if (!out->data)
        return opq_set_error(ctx, OPQ_ERR_NOMEM, "%s: out of memory (%zu bytes)", name, nbytes);
    out->nbytes = nbytes;
    return OPQ_OK;
}

enum opq_status opq_npy_load(struct opq_ctx *ctx, struct opq_arena *arena, const char *path,
                             struct opq_tensor *out) {
    enum opq_status st = OPQ_OK;
    unsigned char *buf = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return opq_set_error(ctx, OPQ_ERR_IO, "%s: %s", path, strerror(errno));
    long len = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        len = ftell(f);
    if (len < 0 || fseek(f, 0, SEEK_SET) != 0) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot determine the file size", path);
        goto out_close;
    }
    buf = opq_malloc(ctx, (size_t)len + 1);
    if (!buf) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "%s: out of memory (%ld bytes)", path, len);
        goto out_close;
    }
    if (fread(buf, 1, (size_t)len, f) != (size_t)len) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: read error", path);
        goto out_free;
    }
    st = opq_npy_parse(ctx, arena, buf, (size_t)len, path, out);
out_free:
    opq_free(ctx, buf);
out_close:
    fclose(f);
    return st;
}

enum opq_status opq_npy_save(struct opq_ctx *ctx, const char *path, const struct opq_tensor *t) {
    const char *descr = NULL;
    for (size_t i = 0; i < ARRAY_SIZE(npy_types); i++)
        if (npy_types[i].dt == t->dtype)
            descr = npy_types[i].out;
    if (!descr)
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED, "%s: cannot write dtype %s to .npy", path,
                             opq_dtype_name(t->dtype));
    if (t->ndim < 0 || t->ndim > OPQ_MAX_DIMS)
        return opq_set_error(ctx, OPQ_ERR_SHAPE, "%s: tensor has no known shape", path);
    char hdr[512];
    int n = snprintf(hdr, sizeof(hdr), "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
    for (int d = 0; d < t->ndim; d++)
        n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "%lld,%s", (long long)t->shape[d],
                      d + 1 < t->ndim ? " " : "");
    if (t->ndim > 1) // Python writes (2, 3) but (4,) for rank 1
        n--;
    n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "), }");
    // pad with spaces so that magic + lengths + header + '\n' is a multiple of 64
    int total = 10 + n + 1;
    int pad = (64 - total % 64) % 64;
    memset(hdr + n, ' ', (size_t)pad);
    n += pad;
    hdr[n++] = '\n';
    size_t numel;
    size_t nbytes;
    if (!opq_tensor_numel(t, &numel) || !opq_dtype_nbytes(t->dtype, numel, &nbytes) ||
        (nbytes && !t->data))
        return opq_set_error(ctx, OPQ_ERR_SHAPE, "%s: tensor has no data", path);
    FILE *f = fopen(path, "wb");
    if (!f)
        return opq_set_error(ctx, OPQ_ERR_IO, "%s: %s", path, strerror(errno));
    unsigned char pre[10] = {
        0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(n & 0xff), (unsigned char)(n >> 8)};
    bool ok = fwrite(pre, 1, 10, f) == 10 && fwrite(hdr, 1, (size_t)n, f) == (size_t)n &&
              (nbytes == 0 || fwrite(t->data, 1, nbytes, f) == nbytes);
    ok = (fclose(f) == 0) && ok;
    if (!ok)
        return opq_set_error(ctx, OPQ_ERR_IO, "%s: write error", path);
    return OPQ_OK;
}
