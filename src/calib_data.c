/* calib_data.c: calibration sources (see calib_data.h): streaming .npy rows, .npz members (stored
 * members streamed, deflated ones inflated with zlib), ONNX test-data folders, image folders
 * (stb_image decode, antialiased bilinear resize, centre crop, normalisation), and seeded random
 * data. Sources give random access to samples so the caller can batch them as it likes. */
#define _POSIX_C_SOURCE 200809L
#include "calib_data.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <zlib.h>

#include <stb/stb_image.h>

#include "arena.h"
#include "onnx_io.h"
#include "rng.h"

#define MAX_INPUTS 16

// Element types an array source may hold (numpy descr).
enum adt { ADT_F4, ADT_F8, ADT_U1, ADT_I1, ADT_I4, ADT_I8, ADT_B1 };

// One 2-D view of an input's samples: n_rows samples of row_elems elements each, in a file at
// `off` or in memory.
struct array_src {
    enum adt dt;
    size_t   esz;
    int      ndim;
    int64_t  shape[OPQ_MAX_DIMS];
    FILE    *f;      // borrowed from the source's file table, or NULL
    long     off;
    uint8_t *mem;    // owned, or NULL
    int64_t  n_rows;
    size_t   row_elems;
};

enum src_kind { SRC_ARRAYS, SRC_IMAGES, SRC_RANDOM };

struct opq_calib_src {
    struct opq_ctx         *ctx;
    enum src_kind           kind;
    struct opq_calib_spec   spec;
    char                   *path;
    int                     n_inputs;
    const char             *names[MAX_INPUTS];
    enum opq_dtype          dtypes[MAX_INPUTS];
    struct opq_tensor       sample[MAX_INPUTS]; // per-sample shape (no batch dim)
    size_t                  numel[MAX_INPUTS];
    struct array_src        arr[MAX_INPUTS];
    FILE                   *file;               // the .npy/.npz file
    char                  **images;             // image folder: sorted file paths
    int                     n_images;
    int                     count;
};

// ---- helpers -------------------------------------------------------------------------------------

static bool ends_with_ci(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcasecmp(s + a - b, suffix) == 0;
}

static void shape_str(const int64_t *shape, int ndim, char *buf, size_t len) {
    size_t p = 0;
    p += (size_t)snprintf(buf + p, len - p, "(");
    for (int i = 0; i < ndim && p < len; i++)
        p += (size_t)snprintf(buf + p, len - p, "%s%lld", i ? "," : "", (long long)shape[i]);
    if (p < len)
        snprintf(buf + p, len - p, ")");
}

// Parses a .npy header at buf[0..len). On success fills a (dtype, shape) and *data_off.
static enum opq_status npy_header(struct opq_ctx *ctx, const char *what, const uint8_t *buf,
                                  size_t len, struct array_src *a, size_t *data_off) {
    if (len < 10 || memcmp(buf, "\x93NUMPY", 6) != 0)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: not a .npy array (bad magic)", what);
    size_t hlen, start;
    if (buf[6] == 1) {
        hlen  = (size_t)buf[8] | ((size_t)buf[9] << 8);
        start = 10;
    } else if (buf[6] == 2 || buf[6] == 3) {
        if (len < 12)
            return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: truncated .npy header", what);
        hlen  = (size_t)buf[8] | ((size_t)buf[9] << 8) | ((size_t)buf[10] << 16) |
               ((size_t)buf[11] << 24);
        start = 12;
    } else {
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED, "%s: .npy format version %d", what, buf[6]);
    }
    if (hlen > 65536 || start + hlen > len)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: truncated .npy header", what);
    char h[65537];
    memcpy(h, buf + start, hlen);
    h[hlen] = '\0';
    const char *d = strstr(h, "'descr'");
    const char *f = strstr(h, "'fortran_order'");
    const char *s = strstr(h, "'shape'");
    if (!d || !f || !s)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: malformed .npy header", what);
    d = strchr(d + 7, '\'');
    if (!d)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: malformed .npy header", what);
    static const struct {
        const char *descr;
        enum adt    dt;
        size_t      esz;
    } descrs[] = {{"<f4", ADT_F4, 4}, {"<f8", ADT_F8, 8}, {"|u1", ADT_U1, 1}, {"|i1", ADT_I1, 1},
                  {"<i4", ADT_I4, 4}, {"<i8", ADT_I8, 8}, {"|b1", ADT_B1, 1}};
    bool found = false;
    for (size_t i = 0; i < ARRAY_SIZE(descrs); i++) {
        size_t l = strlen(descrs[i].descr);
        if (strncmp(d + 1, descrs[i].descr, l) == 0 && d[1 + l] == '\'') {
            a->dt  = descrs[i].dt;
            a->esz = descrs[i].esz;
            found  = true;
        }
    }
    if (!found) {
        char dd[16] = {0};
        sscanf(d + 1, "%15[^']", dd);
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: array dtype '%s' (use float32, float64, uint8, int8, int32, "
                             "int64 or bool, little-endian)",
                             what, dd);
    }
    const char *fv = f + strlen("'fortran_order'");
    while (*fv == ' ' || *fv == ':')
        fv++;
    if (strncmp(fv, "False", 5) != 0)
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: Fortran-order array (save it C-contiguous)", what);
    const char *sp = strchr(s, '(');
    if (!sp)
        return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: malformed .npy shape", what);
    sp++;
    a->ndim = 0;
    while (*sp && *sp != ')') {
        while (*sp == ' ' || *sp == ',')
            sp++;
        if (*sp == ')')
            break;
        char *end;
        long long v = strtoll(sp, &end, 10);
        if (end == sp || v < 0)
            return opq_set_error(ctx, OPQ_ERR_PARSE, "%s: malformed .npy shape", what);
        if (a->ndim >= OPQ_MAX_DIMS)
            return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED, "%s: more than %d dims", what,
                                 OPQ_MAX_DIMS);
        a->shape[a->ndim++] = v;
        sp = end;
    }
    *data_off = start + hlen;
    return OPQ_OK;
}

// Converts n elements of type dt to the input dtype (float32 or int64).
static void convert(enum adt dt, const uint8_t *src, size_t n, enum opq_dtype to, void *dst) {
    for (size_t i = 0; i < n; i++) {
        double v = 0.0;
        int64_t iv = 0;
        switch (dt) {
        case ADT_F4: { float x; memcpy(&x, src + 4 * i, 4); v = (double)x; iv = (int64_t)x; break; }
        case ADT_F8: { double x; memcpy(&x, src + 8 * i, 8); v = x; iv = (int64_t)x; break; }
        case ADT_U1: v = src[i]; iv = src[i]; break;
        case ADT_I1: v = (int8_t)src[i]; iv = (int8_t)src[i]; break;
        case ADT_B1: v = src[i] != 0; iv = src[i] != 0; break;
        case ADT_I4: { int32_t x; memcpy(&x, src + 4 * i, 4); v = x; iv = x; break; }
        case ADT_I8: { int64_t x; memcpy(&x, src + 8 * i, 8); v = (double)x; iv = x; break; }
        }
        if (to == OPQ_DTYPE_FLOAT)
            ((float *)dst)[i] = (float)v;
        else
            ((int64_t *)dst)[i] = iv;
    }
}

// Checks array a (samples along dim 0) against input k, filling the per-sample shape.
static enum opq_status match_input(struct opq_calib_src *s, int k, struct array_src *a,
                                   const char *what) {
    const struct opq_tensor *in = &s->sample[k];
    char got[128], want[128];
    if (a->dt == ADT_F4 || a->dt == ADT_F8 || a->dt == ADT_U1) {
        if (s->dtypes[k] != OPQ_DTYPE_FLOAT && s->dtypes[k] != OPQ_DTYPE_INT64)
            goto bad_dtype;
    }
    if (s->dtypes[k] == OPQ_DTYPE_INT64 && (a->dt == ADT_F4 || a->dt == ADT_F8))
        goto bad_dtype;
    shape_str(a->shape + 1, a->ndim - 1, got, sizeof(got));
    shape_str(in->shape, in->ndim, want, sizeof(want));
    if (a->ndim < 1 || (in->ndim >= 0 && a->ndim - 1 != in->ndim))
        return opq_set_error(s->ctx, OPQ_ERR_SHAPE,
                             "%s: sample shape %s does not match input '%s' %s (the first dim of "
                             "the array counts samples)",
                             what, a->ndim ? got : "()", s->names[k], want);
    for (int d = 0; d + 1 < a->ndim; d++) {
        if (in->ndim >= 0 && in->shape[d] >= 0 && in->shape[d] != a->shape[d + 1])
            return opq_set_error(s->ctx, OPQ_ERR_SHAPE,
                                 "%s: sample shape %s does not match input '%s' %s", what, got,
                                 s->names[k], want);
    }
    s->sample[k].ndim = a->ndim - 1;
    for (int d = 0; d + 1 < a->ndim; d++)
        s->sample[k].shape[d] = a->shape[d + 1];
    size_t n = 1;
    for (int d = 1; d < a->ndim; d++)
        if (!opq_mul_size(n, (size_t)a->shape[d], &n))
            return opq_set_error(s->ctx, OPQ_ERR_SHAPE, "%s: shape overflows", what);
    a->row_elems = n;
    a->n_rows    = a->shape[0];
    s->numel[k]  = n;
    return OPQ_OK;
bad_dtype:
    return opq_set_error(s->ctx, OPQ_ERR_SHAPE, "%s: array dtype does not fit input '%s' (%s)",
                         what, s->names[k], opq_dtype_name(s->dtypes[k]));
}

// ---- .npy --------------------------------------------------------------------------------------

static enum opq_status open_npy(struct opq_calib_src *s) {
    if (s->n_inputs != 1)
        return opq_set_error(s->ctx, OPQ_ERR_USAGE,
                             "%s: a .npy feeds a single-input model; this model has %d inputs "
                             "(use a .npz keyed by input name)",
                             s->path, s->n_inputs);
    s->file = fopen(s->path, "rb");
    if (!s->file)
        return opq_set_error(s->ctx, OPQ_ERR_IO, "%s: %s", s->path, strerror(errno));
    uint8_t head[4096];
    size_t  got = fread(head, 1, sizeof(head), s->file);
    size_t  off;
    struct array_src *a = &s->arr[0];
    enum opq_status st = npy_header(s->ctx, s->path, head, got, a, &off);
    if (st != OPQ_OK)
        return st;
    a->f   = s->file;
    a->off = (long)off;
    st     = match_input(s, 0, a, s->path);
    if (st != OPQ_OK)
        return st;
    struct stat sb;
    size_t need;
    if (fstat(fileno(s->file), &sb) != 0 ||
        !opq_mul_size(a->row_elems * a->esz, (size_t)a->n_rows, &need) ||
        (size_t)sb.st_size < off + need)
        return opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: truncated .npy data", s->path);
    return OPQ_OK;
}

// ---- .npz (zip) ------------------------------------------------------------------------------------

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint16_t le16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}
static uint64_t le64(const uint8_t *p) {
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

static enum opq_status open_npz(struct opq_calib_src *s) {
    enum opq_status st = OPQ_OK;
    uint8_t *cd = NULL, *tail = NULL, *comp = NULL;
    bool have[MAX_INPUTS] = {0};
    s->file = fopen(s->path, "rb");
    if (!s->file)
        return opq_set_error(s->ctx, OPQ_ERR_IO, "%s: %s", s->path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(s->file), &sb) != 0 || sb.st_size < 22)
        return opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: not a .npz (zip) file", s->path);
    size_t tl = sb.st_size < 65557 ? (size_t)sb.st_size : 65557;
    tail = malloc(tl);
    if (!tail)
        return OPQ_ERR_NOMEM;
    if (fseeko(s->file, sb.st_size - (off_t)tl, SEEK_SET) != 0 || fread(tail, 1, tl, s->file) != tl) {
        st = opq_set_error(s->ctx, OPQ_ERR_IO, "%s: read error", s->path);
        goto out;
    }
    long eocd = -1;
    for (long i = (long)tl - 22; i >= 0; i--)
        if (le32(tail + i) == 0x06054b50u) {
            eocd = i;
            break;
        }
    if (eocd < 0) {
        st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: not a .npz (zip) file", s->path);
        goto out;
    }
    uint64_t n_entries = le16(tail + eocd + 10);
    uint64_t cd_size   = le32(tail + eocd + 12), cd_off = le32(tail + eocd + 16);
    if (eocd >= 20 && le32(tail + eocd - 20) == 0x07064b50u) { // zip64 locator
        uint8_t z[56];
        uint64_t z64 = le64(tail + eocd - 20 + 8);
        if (fseeko(s->file, (off_t)z64, SEEK_SET) != 0 || fread(z, 1, 56, s->file) != 56 ||
            le32(z) != 0x06064b50u) {
            st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: corrupt zip64 directory", s->path);
            goto out;
        }
        n_entries = le64(z + 32);
        cd_size   = le64(z + 40);
        cd_off    = le64(z + 48);
    }
    if (cd_off + cd_size > (uint64_t)sb.st_size || cd_size > (64u << 20)) {
        st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: corrupt zip directory", s->path);
        goto out;
    }
    cd = malloc(cd_size ? cd_size : 1);
    if (!cd) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    if (fseeko(s->file, (off_t)cd_off, SEEK_SET) != 0 || fread(cd, 1, cd_size, s->file) != cd_size) {
        st = opq_set_error(s->ctx, OPQ_ERR_IO, "%s: read error", s->path);
        goto out;
    }
    size_t p = 0;
    for (uint64_t e = 0; e < n_entries; e++) {
        if (p + 46 > cd_size || le32(cd + p) != 0x02014b50u) {
            st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: corrupt zip directory", s->path);
            goto out;
        }
        uint16_t method = le16(cd + p + 10);
        uint64_t csize = le32(cd + p + 20), usize = le32(cd + p + 24);
        uint16_t nlen = le16(cd + p + 28), xlen = le16(cd + p + 30), clen = le16(cd + p + 32);
        uint64_t loff = le32(cd + p + 42);
        if (p + 46 + nlen + xlen + clen > cd_size) {
            st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: corrupt zip directory", s->path);
            goto out;
        }
        // zip64 extra field: the 0xFFFFFFFF fields follow in order usize, csize, offset
        for (size_t x = p + 46 + nlen; x + 4 <= p + 46 + nlen + xlen;) {
            uint16_t id = le16(cd + x), sz = le16(cd + x + 2);
            if (id == 1) {
                size_t q = x + 4;
                if (usize == 0xFFFFFFFFu && q + 8 <= x + 4 + sz) { usize = le64(cd + q); q += 8; }
                if (csize == 0xFFFFFFFFu && q + 8 <= x + 4 + sz) { csize = le64(cd + q); q += 8; }
                if (loff == 0xFFFFFFFFu && q + 8 <= x + 4 + sz) { loff = le64(cd + q); }
            }
            x += 4u + sz;
        }
        char name[512];
        size_t nl = nlen < sizeof(name) - 1 ? nlen : sizeof(name) - 1;
        memcpy(name, cd + p + 46, nl);
        name[nl] = '\0';
        p += 46u + nlen + xlen + clen;
        if (!ends_with_ci(name, ".npy"))
            continue;
        name[nl - 4] = '\0';
        int k = -1;
        for (int i = 0; i < s->n_inputs; i++)
            if (strcmp(s->names[i], name) == 0)
                k = i;
        char what[1200];
        snprintf(what, sizeof(what), "%s[%s]", s->path, name);
        if (k < 0) {
            char list[512] = "";
            for (int i = 0; i < s->n_inputs; i++)
                snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s'%s'", i ? ", " : "",
                         s->names[i]);
            st = opq_set_error(s->ctx, OPQ_ERR_USAGE,
                               "%s: key '%s' is not a model input (inputs: %s)", s->path, name,
                               list);
            goto out;
        }
        uint8_t lh[30];
        if (fseeko(s->file, (off_t)loff, SEEK_SET) != 0 || fread(lh, 1, 30, s->file) != 30 ||
            le32(lh) != 0x04034b50u) {
            st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: corrupt zip member", what);
            goto out;
        }
        uint64_t data_off = loff + 30 + le16(lh + 26) + le16(lh + 28);
        if (data_off + csize > (uint64_t)sb.st_size) {
            st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: truncated zip member", what);
            goto out;
        }
        struct array_src *a = &s->arr[k];
        size_t hoff;
        if (method == 0) {
            uint8_t head[4096];
            size_t want = csize < sizeof(head) ? (size_t)csize : sizeof(head);
            if (fseeko(s->file, (off_t)data_off, SEEK_SET) != 0 ||
                fread(head, 1, want, s->file) != want) {
                st = opq_set_error(s->ctx, OPQ_ERR_IO, "%s: read error", what);
                goto out;
            }
            st = npy_header(s->ctx, what, head, want, a, &hoff);
            if (st != OPQ_OK)
                goto out;
            a->f   = s->file;
            a->off = (long)(data_off + hoff);
        } else if (method == 8) {
            if (usize > ((uint64_t)1 << 34)) {
                st = opq_set_error(s->ctx, OPQ_ERR_UNSUPPORTED, "%s: member too large", what);
                goto out;
            }
            comp   = malloc(csize ? csize : 1);
            a->mem = malloc(usize ? usize : 1);
            if (!comp || !a->mem) {
                st = OPQ_ERR_NOMEM;
                goto out;
            }
            if (fseeko(s->file, (off_t)data_off, SEEK_SET) != 0 ||
                fread(comp, 1, csize, s->file) != csize) {
                st = opq_set_error(s->ctx, OPQ_ERR_IO, "%s: read error", what);
                goto out;
            }
            z_stream zs;
            memset(&zs, 0, sizeof(zs));
            if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) {
                st = OPQ_ERR_NOMEM;
                goto out;
            }
            zs.next_in   = comp;
            zs.avail_in  = (uInt)csize;
            zs.next_out  = a->mem;
            zs.avail_out = (uInt)usize;
            int zr       = inflate(&zs, Z_FINISH);
            inflateEnd(&zs);
            free(comp);
            comp = NULL;
            if (zr != Z_STREAM_END || zs.total_out != usize) {
                st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: corrupt compressed member", what);
                goto out;
            }
            st = npy_header(s->ctx, what, a->mem, (size_t)usize, a, &hoff);
            if (st != OPQ_OK)
                goto out;
            a->off = (long)hoff;
        } else {
            st = opq_set_error(s->ctx, OPQ_ERR_UNSUPPORTED,
                               "%s: zip compression method %u (use np.savez or np.savez_compressed)",
                               what, method);
            goto out;
        }
        st = match_input(s, k, a, what);
        if (st != OPQ_OK)
            goto out;
        size_t need;
        uint64_t avail = method == 0 ? csize : usize;
        if (!opq_mul_size(a->row_elems * a->esz, (size_t)a->n_rows, &need) || hoff + need > avail) {
            st = opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: truncated .npy data", what);
            goto out;
        }
        have[k] = true;
    }
    for (int k = 0; k < s->n_inputs; k++) {
        if (!have[k]) {
            st = opq_set_error(s->ctx, OPQ_ERR_USAGE, "%s: no array for input '%s'", s->path,
                               s->names[k]);
            goto out;
        }
        if (s->arr[k].n_rows != s->arr[0].n_rows) {
            st = opq_set_error(s->ctx, OPQ_ERR_SHAPE,
                               "%s: inputs '%s' and '%s' have different sample counts", s->path,
                               s->names[0], s->names[k]);
            goto out;
        }
    }
out:
    free(tail);
    free(cd);
    free(comp);
    return st;
}

// ---- ONNX test-data folders ------------------------------------------------------------------------

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

// Sorted list of entries of dir whose name satisfies keep(); caller frees each and the array.
static enum opq_status list_dir(struct opq_ctx *ctx, const char *dir, bool (*keep)(const char *),
                                char ***out, int *n_out) {
    DIR *d = opendir(dir);
    if (!d)
        return opq_set_error(ctx, OPQ_ERR_IO, "%s: %s", dir, strerror(errno));
    char **list = NULL;
    int n = 0, cap = 0;
    enum opq_status st = OPQ_OK;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !keep(e->d_name))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **nl = realloc(list, (size_t)cap * sizeof(*nl));
            if (!nl) {
                st = OPQ_ERR_NOMEM;
                break;
            }
            list = nl;
        }
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        list[n] = malloc(len);
        if (!list[n]) {
            st = OPQ_ERR_NOMEM;
            break;
        }
        snprintf(list[n], len, "%s/%s", dir, e->d_name);
        n++;
    }
    closedir(d);
    if (st != OPQ_OK) {
        for (int i = 0; i < n; i++)
            free(list[i]);
        free(list);
        return st;
    }
    if (n)
        qsort(list, (size_t)n, sizeof(*list), cmp_str);
    *out   = list;
    *n_out = n;
    return OPQ_OK;
}

static bool is_test_set(const char *name) {
    return strncmp(name, "test_data_set_", 14) == 0;
}

static bool is_image(const char *name) {
    return ends_with_ci(name, ".png") || ends_with_ci(name, ".jpg") ||
           ends_with_ci(name, ".jpeg") || ends_with_ci(name, ".bmp");
}

static enum adt adt_of(enum opq_dtype dt, bool *ok) {
    *ok = true;
    switch (dt) {
    case OPQ_DTYPE_FLOAT: return ADT_F4;
    case OPQ_DTYPE_DOUBLE: return ADT_F8;
    case OPQ_DTYPE_UINT8: return ADT_U1;
    case OPQ_DTYPE_INT8: return ADT_I1;
    case OPQ_DTYPE_INT32: return ADT_I4;
    case OPQ_DTYPE_INT64: return ADT_I8;
    case OPQ_DTYPE_BOOL: return ADT_B1;
    default: *ok = false; return ADT_F4;
    }
}

static enum opq_status open_pb_dir(struct opq_calib_src *s, char **sets, int n_sets) {
    enum opq_status st = OPQ_OK;
    struct opq_arena *arena = opq_arena_new(s->ctx);
    if (!arena)
        return OPQ_ERR_NOMEM;
    for (int k = 0; k < s->n_inputs && st == OPQ_OK; k++) {
        struct array_src *a = &s->arr[k];
        size_t used = 0;
        for (int i = 0; i < n_sets && st == OPQ_OK; i++) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/input_%d.pb", sets[i], k);
            struct opq_tensor t;
            const char *name = NULL;
            st = opq_tensor_load_pb(s->ctx, arena, path, &t, &name);
            if (st != OPQ_OK)
                break;
            if (name && name[0] && strcmp(name, s->names[k]) != 0) {
                st = opq_set_error(s->ctx, OPQ_ERR_USAGE,
                                   "%s: tensor '%s' is not model input %d ('%s')", path, name, k,
                                   s->names[k]);
                break;
            }
            bool ok;
            struct array_src ta = {.dt = adt_of(t.dtype, &ok), .ndim = t.ndim};
            ta.esz = opq_dtype_size(t.dtype);
            if (!ok || t.ndim < 1) {
                st = opq_set_error(s->ctx, OPQ_ERR_SHAPE,
                                   "%s: a %s tensor of rank %d cannot feed input '%s'", path,
                                   opq_dtype_name(t.dtype), t.ndim, s->names[k]);
                break;
            }
            memcpy(ta.shape, t.shape, sizeof(ta.shape));
            st = match_input(s, k, &ta, path);
            if (st != OPQ_OK)
                break;
            if (i == 0) {
                *a       = ta;
                a->n_rows = 0;
            } else if (ta.dt != a->dt || ta.row_elems != a->row_elems) {
                st = opq_set_error(s->ctx, OPQ_ERR_SHAPE, "%s: differs in dtype or shape from %s",
                                   path, sets[0]);
                break;
            }
            uint8_t *nm = realloc(a->mem, used + t.nbytes);
            if (!nm) {
                st = OPQ_ERR_NOMEM;
                break;
            }
            a->mem = nm;
            memcpy(a->mem + used, t.data, t.nbytes);
            used += t.nbytes;
            a->n_rows += ta.shape[0];
            opq_arena_reset(arena);
        }
        a->off = 0;
    }
    opq_arena_free(arena);
    return st;
}

// ---- images ----------------------------------------------------------------------------------------

// Antialiased bilinear resampling along one axis (a triangle filter whose support widens with the
// downscale factor), the usual choice of image libraries for model preprocessing.
static void resample_axis(const float *src, int in_len, int out_len, int stride_in, int count,
                          int step_in, float *dst, int stride_out, int step_out) {
    double scale   = (double)in_len / out_len;
    double support = scale > 1.0 ? scale : 1.0;
    for (int o = 0; o < out_len; o++) {
        double center = (o + 0.5) * scale;
        int lo = (int)floor(center - support), hi = (int)ceil(center + support);
        if (lo < 0)
            lo = 0;
        if (hi > in_len)
            hi = in_len;
        double wsum = 0.0;
        double w[512];
        int    nw = 0;
        for (int i = lo; i < hi && nw < 512; i++, nw++) {
            double x = fabs((i + 0.5 - center) / support);
            w[nw]    = x < 1.0 ? 1.0 - x : 0.0;
            wsum += w[nw];
        }
        for (int c = 0; c < count; c++) {
            double acc = 0.0;
            for (int j = 0; j < nw; j++)
                acc += w[j] * (double)src[(size_t)(lo + j) * (size_t)stride_in + (size_t)c * (size_t)step_in];
            dst[(size_t)o * (size_t)stride_out + (size_t)c * (size_t)step_out] =
                (float)(wsum > 0.0 ? acc / wsum : 0.0);
        }
    }
}

// Decodes, resizes, crops and normalises one image into dst (the sample layout).
static enum opq_status load_image(struct opq_calib_src *s, const char *path, float *dst) {
    const struct opq_tensor *t = &s->sample[0];
    int C  = (int)(s->spec.nhwc ? t->shape[2] : t->shape[0]);
    int H  = (int)(s->spec.nhwc ? t->shape[0] : t->shape[1]);
    int W  = (int)(s->spec.nhwc ? t->shape[1] : t->shape[2]);
    int w, h, n;
    unsigned char *px = stbi_load(path, &w, &h, &n, C);
    if (!px)
        return opq_set_error(s->ctx, OPQ_ERR_PARSE, "%s: cannot decode image (%s)", path,
                             stbi_failure_reason());
    enum opq_status st = OPQ_OK;
    // resize so the shorter side is `resize`, then centre-crop H x W
    int short_side = s->spec.resize > 0 ? s->spec.resize : (H > W ? H : W);
    int rw, rh;
    if (w <= h) {
        rw = short_side;
        rh = (int)((double)h * short_side / w + 0.5);
    } else {
        rh = short_side;
        rw = (int)((double)w * short_side / h + 0.5);
    }
    if (rw < W || rh < H) {
        stbi_image_free(px);
        return opq_set_error(s->ctx, OPQ_ERR_USAGE,
                             "%s: resized image %dx%d is smaller than the crop %dx%d", path, rw,
                             rh, W, H);
    }
    size_t n0 = (size_t)w * h * C, n1 = (size_t)w * rh * C, n2 = (size_t)rw * rh * C;
    float *a = malloc(n0 * sizeof(float)), *b = malloc(n1 * sizeof(float));
    float *c = malloc(n2 * sizeof(float));
    if (!a || !b || !c) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n0; i++)
        a[i] = px[i] / 255.0f;
    // rows: (h -> rh), each column/channel pair is a 1-D signal with stride w*C
    resample_axis(a, h, rh, w * C, w * C, 1, b, w * C, 1);
    // columns: (w -> rw), per row
    for (int y = 0; y < rh; y++)
        resample_axis(b + (size_t)y * w * C, w, rw, C, C, 1, c + (size_t)y * rw * C, C, 1);
    int x0 = (rw - W) / 2, y0 = (rh - H) / 2;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            for (int ch = 0; ch < C; ch++) {
                float v  = c[((size_t)(y + y0) * rw + (size_t)(x + x0)) * C + (size_t)ch];
                float m  = s->spec.n_mean ? s->spec.mean[s->spec.n_mean == 1 ? 0 : ch] : 0.0f;
                float sd = s->spec.n_std ? s->spec.std[s->spec.n_std == 1 ? 0 : ch] : 1.0f;
                size_t o = s->spec.nhwc ? ((size_t)y * W + (size_t)x) * C + (size_t)ch
                                        : ((size_t)ch * H + (size_t)y) * W + (size_t)x;
                dst[o] = (v - m) / sd;
            }
out:
    free(a);
    free(b);
    free(c);
    stbi_image_free(px);
    return st;
}

static enum opq_status open_images(struct opq_calib_src *s) {
    struct opq_tensor *t = &s->sample[0];
    if (s->n_inputs != 1 || s->dtypes[0] != OPQ_DTYPE_FLOAT || t->ndim != 3)
        return opq_set_error(s->ctx, OPQ_ERR_USAGE,
                             "%s: an image folder feeds one float image input of shape "
                             "(N,C,H,W) or (N,H,W,C); input '%s' is not one",
                             s->path, s->names[0]);
    int cdim = s->spec.nhwc ? 2 : 0;
    if (s->spec.channels)
        t->shape[cdim] = s->spec.channels;
    if (s->spec.crop) {
        t->shape[s->spec.nhwc ? 0 : 1] = s->spec.crop;
        t->shape[s->spec.nhwc ? 1 : 2] = s->spec.crop;
    }
    for (int d = 0; d < 3; d++)
        if (t->shape[d] <= 0)
            return opq_set_error(s->ctx, OPQ_ERR_USAGE,
                                 "%s: input '%s' has a dynamic %s dim: give --crop and --channels",
                                 s->path, s->names[0], d == cdim ? "channel" : "spatial");
    if (t->shape[cdim] != 1 && t->shape[cdim] != 3)
        return opq_set_error(s->ctx, OPQ_ERR_USAGE,
                             "%s: images give 1 or 3 channels; input '%s' wants %lld", s->path,
                             s->names[0], (long long)t->shape[cdim]);
    if ((s->spec.n_mean > 1 && s->spec.n_mean != t->shape[cdim]) ||
        (s->spec.n_std > 1 && s->spec.n_std != t->shape[cdim]))
        return opq_set_error(s->ctx, OPQ_ERR_USAGE,
                             "--mean/--std: give 1 or %lld values", (long long)t->shape[cdim]);
    for (int i = 0; i < s->spec.n_std; i++)
        if (!(s->spec.std[i] > 0.0f))
            return opq_set_error(s->ctx, OPQ_ERR_USAGE, "--std: values must be positive");
    s->numel[0] = (size_t)(t->shape[0] * t->shape[1] * t->shape[2]);
    enum opq_status st = list_dir(s->ctx, s->path, is_image, &s->images, &s->n_images);
    if (st != OPQ_OK)
        return st;
    if (s->n_images == 0)
        return opq_set_error(s->ctx, OPQ_ERR_USAGE,
                             "%s: no .png/.jpg/.jpeg/.bmp images and no test_data_set_* folders",
                             s->path);
    return OPQ_OK;
}

// ---- open/close/read --------------------------------------------------------------------------------

enum opq_status opq_calib_open(struct opq_ctx *ctx, const struct opq_model *model,
                               const struct opq_calib_spec *spec, struct opq_calib_src **out) {
    enum opq_status st = OPQ_OK;
    struct opq_calib_src *s = calloc(1, sizeof(*s));
    char **sets = NULL;
    int n_sets = 0;
    if (!s)
        return OPQ_ERR_NOMEM;
    s->ctx  = ctx;
    s->spec = *spec;
    s->path = strdup(spec->path ? spec->path : "");
    if (!s->path) {
        st = OPQ_ERR_NOMEM;
        goto out_fail;
    }
    const struct opq_graph *g = model->graph;
    for (int i = 0; i < g->n_inputs; i++) {
        const struct opq_value *v = g->inputs[i];
        if (v->kind & OPQ_VK_INIT)
            continue;
        if (s->n_inputs == MAX_INPUTS) {
            st = opq_set_error(ctx, OPQ_ERR_UNSUPPORTED, "model has more than %d inputs",
                               MAX_INPUTS);
            goto out_fail;
        }
        int k = s->n_inputs++;
        s->names[k]  = v->name;
        s->dtypes[k] = v->t.dtype;
        if (v->t.dtype != OPQ_DTYPE_FLOAT && v->t.dtype != OPQ_DTYPE_INT64) {
            st = opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                               "input '%s': calibration feeds float32 or int64 inputs, not %s",
                               v->name, opq_dtype_name(v->t.dtype));
            goto out_fail;
        }
        s->sample[k].dtype = v->t.dtype;
        s->sample[k].ndim  = v->t.ndim < 1 ? -1 : v->t.ndim - 1;
        for (int d = 1; d < v->t.ndim; d++)
            s->sample[k].shape[d - 1] = v->t.shape[d];
    }
    if (s->n_inputs == 0) {
        st = opq_set_error(ctx, OPQ_ERR_INVALID_MODEL, "model has no inputs to calibrate");
        goto out_fail;
    }
    struct stat sb;
    if (strcmp(s->path, "random") == 0) {
        s->kind = SRC_RANDOM;
        if (spec->count <= 0) {
            st = opq_set_error(ctx, OPQ_ERR_USAGE, "--calib random needs --calib-count N");
            goto out_fail;
        }
        for (int k = 0; k < s->n_inputs; k++) {
            struct opq_tensor *t = &s->sample[k];
            size_t n = 1;
            for (int d = 0; d < t->ndim; d++) {
                if (t->shape[d] <= 0) {
                    st = opq_set_error(ctx, OPQ_ERR_USAGE,
                                       "--calib random: input '%s' has a dynamic non-batch dim",
                                       s->names[k]);
                    goto out_fail;
                }
                n *= (size_t)t->shape[d];
            }
            if (t->ndim < 0) {
                st = opq_set_error(ctx, OPQ_ERR_USAGE,
                                   "--calib random: input '%s' has no shape", s->names[k]);
                goto out_fail;
            }
            s->numel[k] = n;
        }
        s->count = spec->count;
    } else if (stat(s->path, &sb) != 0) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: %s", s->path, strerror(errno));
        goto out_fail;
    } else if (S_ISDIR(sb.st_mode)) {
        st = list_dir(ctx, s->path, is_test_set, &sets, &n_sets);
        if (st != OPQ_OK)
            goto out_fail;
        if (n_sets > 0) {
            s->kind = SRC_ARRAYS;
            st      = open_pb_dir(s, sets, n_sets);
        } else {
            s->kind = SRC_IMAGES;
            st      = open_images(s);
        }
        if (st != OPQ_OK)
            goto out_fail;
        s->count = s->kind == SRC_IMAGES ? s->n_images : (int)s->arr[0].n_rows;
    } else if (ends_with_ci(s->path, ".npy")) {
        s->kind = SRC_ARRAYS;
        if ((st = open_npy(s)) != OPQ_OK)
            goto out_fail;
        s->count = (int)s->arr[0].n_rows;
    } else if (ends_with_ci(s->path, ".npz")) {
        s->kind = SRC_ARRAYS;
        if ((st = open_npz(s)) != OPQ_OK)
            goto out_fail;
        s->count = (int)s->arr[0].n_rows;
    } else {
        st = opq_set_error(ctx, OPQ_ERR_USAGE,
                           "%s: calibration data must be a .npy, a .npz, a folder of images or "
                           "of test_data_set_*, or 'random'",
                           s->path);
        goto out_fail;
    }
    if (s->count == 0) {
        st = opq_set_error(ctx, OPQ_ERR_USAGE, "%s: no calibration samples", s->path);
        goto out_fail;
    }
    if (spec->count > 0 && spec->count < s->count)
        s->count = spec->count;
    for (int i = 0; i < n_sets; i++)
        free(sets[i]);
    free(sets);
    *out = s;
    return OPQ_OK;
out_fail:
    for (int i = 0; i < n_sets; i++)
        free(sets[i]);
    free(sets);
    opq_calib_close(s);
    return st;
}

void opq_calib_close(struct opq_calib_src *s) {
    if (!s)
        return;
    for (int k = 0; k < MAX_INPUTS; k++)
        free(s->arr[k].mem);
    for (int i = 0; i < s->n_images; i++)
        free(s->images[i]);
    free(s->images);
    if (s->file)
        fclose(s->file);
    free(s->path);
    free(s);
}

int opq_calib_count(const struct opq_calib_src *s) {
    return s->count;
}

int opq_calib_n_inputs(const struct opq_calib_src *s) {
    return s->n_inputs;
}

const char *opq_calib_input_name(const struct opq_calib_src *s, int k) {
    return (k >= 0 && k < s->n_inputs) ? s->names[k] : NULL;
}

size_t opq_calib_sample_numel(const struct opq_calib_src *s, int k) {
    return s->numel[k];
}

const struct opq_tensor *opq_calib_sample_shape(const struct opq_calib_src *s, int k) {
    return &s->sample[k];
}

enum opq_status opq_calib_read(struct opq_calib_src *s, int k, int first, int n, void *dst) {
    OPQ_ASSERT(k >= 0 && k < s->n_inputs);
    if (first < 0 || n < 0 || first + n > s->count)
        return opq_set_error(s->ctx, OPQ_ERR_USAGE, "calibration samples [%d, %d) out of range",
                             first, first + n);
    size_t numel = s->numel[k];
    size_t osz   = s->dtypes[k] == OPQ_DTYPE_FLOAT ? 4 : 8;
    switch (s->kind) {
    case SRC_RANDOM: {
        // sample i is a function of (seed, input, i) only, so batching does not change it
        for (int i = 0; i < n; i++) {
            struct opq_rng r;
            opq_rng_seed(&r, s->spec.seed, (uint64_t)(first + i) * MAX_INPUTS + (uint64_t)k);
            for (size_t j = 0; j < numel; j++) {
                float v = opq_rng_normal(&r);
                if (s->dtypes[k] == OPQ_DTYPE_FLOAT)
                    ((float *)dst)[(size_t)i * numel + j] = v;
                else
                    ((int64_t *)dst)[(size_t)i * numel + j] = 0;
            }
        }
        return OPQ_OK;
    }
    case SRC_IMAGES:
        for (int i = 0; i < n; i++) {
            enum opq_status st = load_image(s, s->images[first + i], (float *)dst + (size_t)i * numel);
            if (st != OPQ_OK)
                return st;
        }
        return OPQ_OK;
    case SRC_ARRAYS: {
        struct array_src *a = &s->arr[k];
        size_t row = a->row_elems * a->esz;
        if (a->mem) {
            convert(a->dt, a->mem + a->off + (size_t)first * row, (size_t)n * a->row_elems,
                    s->dtypes[k], dst);
            return OPQ_OK;
        }
        uint8_t *tmp = malloc(row * (size_t)(n ? n : 1));
        if (!tmp)
            return OPQ_ERR_NOMEM;
        if (fseeko(a->f, (off_t)a->off + (off_t)first * (off_t)row, SEEK_SET) != 0 ||
            fread(tmp, row, (size_t)n, a->f) != (size_t)n) {
            free(tmp);
            return opq_set_error(s->ctx, OPQ_ERR_IO, "%s: read error (truncated?)", s->path);
        }
        convert(a->dt, tmp, (size_t)n * a->row_elems, s->dtypes[k], dst);
        free(tmp);
        (void)osz;
        return OPQ_OK;
    }
    }
    return OPQ_ERR_INTERNAL;
}

size_t opq_calib_sample_bytes(const struct opq_calib_src *s, int k) {
    return (s->dtypes[k] == OPQ_DTYPE_FLOAT ? 4 : 8) * s->numel[k];
}

enum opq_status opq_calib_batch(struct opq_calib_src *s, int first, int n, void *const *bufs,
                                struct opq_named_tensor *in) {
    for (int k = 0; k < s->n_inputs; k++) {
        const struct opq_tensor *t = &s->sample[k];
        if (bufs) {
            enum opq_status st = opq_calib_read(s, k, first, n, bufs[k]);
            if (st != OPQ_OK)
                return st;
        }
        in[k].name       = s->names[k];
        in[k].t          = *t;
        in[k].t.ndim     = t->ndim + 1;
        in[k].t.shape[0] = n;
        memcpy(&in[k].t.shape[1], t->shape, sizeof(int64_t) * (size_t)t->ndim);
        in[k].t.data     = bufs ? bufs[k] : NULL;
        in[k].t.nbytes   = bufs ? opq_calib_sample_bytes(s, k) * (size_t)n : 0;
    }
    return OPQ_OK;
}
