/* onnx_io.c: ONNX protobuf <-> IR. The only translation unit that sees protobuf-c and the
 * generated onnx.pb-c.h (STYLE 8.8).
 *
 * Load: the file is mmapped and unpacked by protobuf-c with an allocator that carves every
 * message out of the model's arena. The unpacked messages therefore live exactly as long as the
 * model, and tensor bytes (raw_data, or float_data/int64_data/... when their layout already is the
 * IR's) are used in place: the weights exist once in memory and are never copied. What the IR
 * does not model (doc strings, unknown fields, subgraph and type attributes, functions, training
 * info, non-tensor types) stays reachable through struct opq_pb_extra and is re-emitted on save.
 *
 * Save: a fresh ModelProto is assembled in a scratch arena. Its raw_data fields point at the IR's
 * tensor bytes (no copy) and protobuf_c_message_pack_to_buffer streams it into a FILE named
 * "<path>.tmp.XXXXXX" that is renamed into place at the end. Serialization is a pure function of
 * the IR, so save(load(save(x))) == save(x) byte for byte. */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE // MAP_POPULATE (Linux)

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "onnx.pb-c.h"

#include "arena.h"
#include "base.h"
#include "graph.h"
#include "onnx_io.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "onnx_io.c uses ONNX little-endian tensor bytes in place: big-endian hosts need byte swaps"
#endif

#define PB_MAX_DEPTH 100 // message nesting accepted at load (protobuf's own default)
#define EXT_ALIGN 64     // offset alignment of tensors in external data files

// Above this the protobuf is written with external data (protobuf's hard limit is 2 GiB).
static size_t inline_limit = (size_t)INT32_MAX;

enum vi_role { ROLE_INPUT, ROLE_OUTPUT, ROLE_INFO, ROLE_COUNT };

// Round-trip data of one message. Pointers refer to unpacked messages living in the model arena.
struct opq_pb_extra {
    size_t n_unknown;
    ProtobufCMessageUnknownField *unknown;
    const char *doc_string;
    union {
        struct {
            Onnx__OperatorSetIdProto **opsets; // as loaded; re-emitted if the IR's match
            size_t n_opsets;
            Onnx__StringStringEntryProto **metadata;
            size_t n_metadata;
            Onnx__TrainingInfoProto **training;
            size_t n_training;
            Onnx__FunctionProto **functions;
            size_t n_functions;
        } model;
        struct {
            Onnx__TensorAnnotation **qannot;
            size_t n_qannot;
        } graph;
        struct {
            Onnx__ValueInfoProto *vi[ROLE_COUNT]; // graph.input / output / value_info entries
            // dtype and shape as loaded: the ValueInfoProtos are re-emitted verbatim while the
            // value still matches them, and rebuilt from the IR once a pass changed it
            enum opq_dtype dtype;
            int ndim;
            int64_t shape[OPQ_MAX_DIMS];
            const char *dim_param[OPQ_MAX_DIMS];
        } value;
        struct {
            const char *name;
        } tensor;
        struct {
            const Onnx__AttributeProto *orig; // GRAPH(S)/SPARSE/TYPE_PROTO(S) values come from here
            struct opq_pb_extra *t;           // TENSOR
            struct opq_pb_extra **ts;         // TENSORS
        } attr;
    };
};

// ---- shared helpers -----------------------------------------------------------------------------

static const char *str_or_empty(const char *s) {
    return s ? s : "";
}

// "[1,3,224,224]" into buf (truncated if needed).
static const char *fmt_dims(char *buf, size_t n, const int64_t *dims, size_t nd) {
    size_t off = 0;
    buf[0] = '\0';
    off += (size_t)snprintf(buf + off, n - off, "[");
    for (size_t i = 0; i < nd && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, "%s%" PRId64, i ? "," : "", dims[i]);
    if (off < n)
        snprintf(buf + off, n - off, "]");
    return buf;
}

// The folder part of a path ("." if none); caller frees with opq_free. NULL on OOM.
static char *dir_of(struct opq_ctx *ctx, const char *path) {
    const char *slash = strrchr(path, '/');
    const char *dir = slash ? path : ".";
    size_t n = !slash ? 1 : slash == path ? 1 : (size_t)(slash - path);
    char *d = opq_malloc(ctx, n + 1);
    if (d) {
        memcpy(d, dir, n);
        d[n] = '\0';
    }
    return d;
}

// A protobuf-c allocator carving everything out of an arena (frees are no-ops: the arena owns
// the unpacked messages). `oom` tells an allocation failure apart from malformed input.
struct arena_alloc {
    struct opq_arena *arena;
    bool oom;
};

static void *pb_arena_alloc(void *user, size_t size) {
    struct arena_alloc *aa = user;
    void *p = opq_arena_alloc_raw(aa->arena, size);
    if (!p)
        aa->oom = true;
    return p;
}

static void pb_arena_free(void *user, void *p) {
    (void)user;
    (void)p;
}

// A read-only view of a whole file.
struct mapped {
    const uint8_t *data;
    size_t len;
    bool is_map;
};

static enum opq_status map_file(struct opq_ctx *ctx, const char *path, struct mapped *mf) {
    enum opq_status st = OPQ_OK;
    struct stat sb;
    mf->data = NULL;
    mf->len = 0;
    mf->is_map = false;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (fstat(fd, &sb) != 0) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto out_close;
    }
    if (S_ISDIR(sb.st_mode)) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: is a directory, not a model file", path);
        goto out_close;
    }
    if (sb.st_size == 0)
        goto out_close; // empty: the caller reports it as a parse error
    mf->len = (size_t)sb.st_size;
    int flags = MAP_PRIVATE;
#ifdef MAP_POPULATE
    flags |= MAP_POPULATE; // map every page now: the whole file is read once anyway
#endif
    void *map = mmap(NULL, mf->len, PROT_READ, flags, fd, 0);
    if (map == MAP_FAILED) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
        goto out_close;
    }
    posix_madvise(map, mf->len, POSIX_MADV_SEQUENTIAL);
    mf->data = map;
    mf->is_map = true;
out_close:
    close(fd);
    return st;
}

static void unmap_file(struct mapped *mf) {
    if (mf->is_map)
        munmap((void *)mf->data, mf->len);
    mf->data = NULL;
    mf->is_map = false;
}

// ---- wire pre-check -----------------------------------------------------------------------------

static bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (*p >= end)
            return false;
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << (shift < 64 ? shift : 63);
        if (!(b & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

// Walks the wire format of message type `d` (NULL: an unknown field's payload, not descended)
// without allocating. protobuf-c's unpacker recurses without a depth limit, so nesting deeper
// than PB_MAX_DEPTH is refused here, together with obviously malformed framing.
static bool wire_check(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t len,
                       int depth) {
    const uint8_t *end = p + len;
    if (depth > PB_MAX_DEPTH)
        return false;
    while (p < end) {
        uint64_t key;
        uint64_t v;
        if (!read_varint(&p, end, &key) || (key >> 3) == 0 || (key >> 3) > 0x1fffffff)
            return false;
        switch (key & 7) {
        case 0:
            if (!read_varint(&p, end, &v))
                return false;
            break;
        case 1:
            if ((size_t)(end - p) < 8)
                return false;
            p += 8;
            break;
        case 5:
            if ((size_t)(end - p) < 4)
                return false;
            p += 4;
            break;
        case 2: {
            if (!read_varint(&p, end, &v) || v > (uint64_t)(end - p))
                return false;
            const ProtobufCFieldDescriptor *f =
                d ? protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3)) : NULL;
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                !wire_check(f->descriptor, p, (size_t)v, depth + 1))
                return false;
            p += v;
            break;
        }
        default: // groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            return false;
        }
    }
    return true;
}

// ---- load: tensors ------------------------------------------------------------------------------

struct loader {
    struct opq_ctx *ctx;
    struct opq_arena *a; // the model arena: unpacked messages live here too
    struct opq_graph *g;
    const char *file; // for messages
    const char *dir;  // base folder of external data (NULL: external data refused)
};

static struct opq_pb_extra *extra_new(struct loader *L, const ProtobufCMessage *msg,
                                      const char *doc_string) {
    struct opq_pb_extra *x = opq_arena_alloc(L->a, sizeof(*x));
    if (!x) {
        opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
        return NULL;
    }
    if (msg) {
        x->n_unknown = msg->n_unknown_fields;
        x->unknown = msg->unknown_fields;
    }
    x->doc_string = doc_string;
    return x;
}

static bool parse_u64(const char *s, uint64_t *out) {
    if (!s || !*s || *s < '0' || *s > '9')
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

// Rejects locations that could leave the model's folder: absolute paths and ".." components.
static bool location_is_safe(const char *loc) {
    if (!*loc || loc[0] == '/')
        return false;
    for (const char *p = loc; *p;) {
        const char *e = strchr(p, '/');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n == 2 && p[0] == '.' && p[1] == '.')
            return false;
        p += n;
        if (*p == '/')
            p++;
    }
    return true;
}

// Reads `nbytes` of external data for tensor `label` into the arena.
static enum opq_status read_external(struct loader *L, const Onnx__TensorProto *tp,
                                     const char *label, size_t nbytes, void **data) {
    enum opq_status st = OPQ_OK;
    const char *location = NULL;
    uint64_t offset = 0;
    uint64_t length = 0;
    bool has_len = false;
    char *path = NULL;
    int fd = -1;
    for (size_t i = 0; i < tp->n_external_data; i++) {
        const Onnx__StringStringEntryProto *e = tp->external_data[i];
        const char *k = str_or_empty(e->key);
        if (strcmp(k, "location") == 0) {
            location = str_or_empty(e->value);
        } else if (strcmp(k, "offset") == 0 || strcmp(k, "length") == 0) {
            uint64_t v;
            if (!parse_u64(e->value, &v))
                return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                                     "%s: tensor '%s': external data %s '%s' is not a number",
                                     L->file, label, k, str_or_empty(e->value));
            if (k[0] == 'o') {
                offset = v;
            } else {
                length = v;
                has_len = true;
            }
        }
    }
    if (!location)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                             "%s: tensor '%s': external data without a location", L->file, label);
    if (!L->dir)
        return opq_set_error(L->ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: tensor '%s': external data '%s' needs the model's folder (model "
                             "loaded from memory)",
                             L->file, label, location);
    if (!location_is_safe(location))
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                             "%s: tensor '%s': external data location '%s' must be a relative path "
                             "inside the model's folder",
                             L->file, label, location);
    if (tp->data_type == OPQ_DTYPE_STRING)
        return opq_set_error(L->ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: tensor '%s': STRING tensors in external data", L->file, label);
    if (has_len && length != nbytes)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                             "%s: tensor '%s': external data length %" PRIu64
                             " in '%s' disagrees with its shape (%zu bytes)",
                             L->file, label, length, location, nbytes);
    size_t plen = strlen(L->dir) + strlen(location) + 2;
    path = opq_malloc(L->ctx, plen);
    if (!path) {
        st = opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
        goto out;
    }
    snprintf(path, plen, "%s/%s", L->dir, location);
    fd = open(path, O_RDONLY);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) {
        st = opq_set_error(L->ctx, OPQ_ERR_IO,
                           "%s: tensor '%s': cannot open external data file '%s': %s", L->file,
                           label, path, strerror(errno));
        goto out;
    }
    if (offset > (uint64_t)sb.st_size || nbytes > (uint64_t)sb.st_size - offset) {
        st = opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                           "%s: tensor '%s': external data [%" PRIu64
                           ", +%zu) is out of bounds of '%s' (%lld bytes)",
                           L->file, label, offset, nbytes, path, (long long)sb.st_size);
        goto out;
    }
    *data = opq_arena_alloc_raw(L->a, nbytes);
    if (!*data) {
        st = opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
        goto out;
    }
    for (size_t done = 0; done < nbytes;) {
        ssize_t r = pread(fd, (char *)*data + done, nbytes - done, (off_t)(offset + done));
        if (r <= 0) {
            st = opq_set_error(L->ctx, OPQ_ERR_IO, "%s: tensor '%s': reading '%s': %s", L->file,
                               label, path, r < 0 ? strerror(errno) : "unexpected end of file");
            goto out;
        }
        done += (size_t)r;
    }
out:
    if (fd >= 0)
        close(fd);
    opq_free(L->ctx, path);
    return st;
}

// Narrows the int32_data carrier of 8/16-bit types (one element per int32) into dst.
static void narrow_int32(void *dst, const int32_t *src, size_t n, size_t elem) {
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)src[i];
        if (elem == 1) {
            ((uint8_t *)dst)[i] = (uint8_t)v;
        } else {
            ((uint16_t *)dst)[i] = (uint16_t)v;
        }
    }
}

// Converts TensorProto tp into *out: dtype, shape and dense little-endian data (in the arena:
// in place when the protobuf's storage already has the IR layout). `label` names the tensor in
// messages. *xout (optional) receives its round-trip extra.
static enum opq_status tensor_from_pb(struct loader *L, const Onnx__TensorProto *tp,
                                      const char *label, struct opq_tensor *out,
                                      struct opq_pb_extra **xout) {
    char dbuf[160];
    size_t numel = 1;
    size_t nbytes = 0;
    memset(out, 0, sizeof(*out));
    int dt = tp->has_data_type ? tp->data_type : 0;
    if (dt <= 0 || dt >= OPQ_DTYPE_COUNT)
        return opq_set_error(L->ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: tensor '%s': unsupported data type %d", L->file, label, dt);
    if (tp->n_dims > OPQ_MAX_DIMS)
        return opq_set_error(L->ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: tensor '%s': rank %zu exceeds the maximum of %d", L->file, label,
                             tp->n_dims, OPQ_MAX_DIMS);
    for (size_t i = 0; i < tp->n_dims; i++) {
        if (tp->dims[i] < 0 || !opq_mul_size(numel, (size_t)tp->dims[i], &numel))
            return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL, "%s: tensor '%s': invalid shape %s",
                                 L->file, label,
                                 fmt_dims(dbuf, sizeof(dbuf), tp->dims, tp->n_dims));
    }
    out->dtype = (enum opq_dtype)dt;
    out->ndim = (int)tp->n_dims;
    for (size_t i = 0; i < tp->n_dims; i++)
        out->shape[i] = tp->dims[i];
    fmt_dims(dbuf, sizeof(dbuf), tp->dims, tp->n_dims);
    bool is_str = dt == OPQ_DTYPE_STRING;
    if (is_str ? !opq_mul_size(numel, sizeof(struct opq_bytes), &nbytes)
               : !opq_dtype_nbytes(out->dtype, numel, &nbytes))
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                             "%s: tensor '%s': shape %s is too large", L->file, label, dbuf);
    if (tp->segment)
        return opq_set_error(L->ctx, OPQ_ERR_UNSUPPORTED, "%s: tensor '%s': segmented tensors",
                             L->file, label);
    if (xout) {
        *xout = extra_new(L, &tp->base, tp->doc_string);
        if (!*xout)
            return OPQ_ERR_NOMEM;
        (*xout)->tensor.name = tp->name;
    }
    out->nbytes = nbytes;
    if (tp->has_data_location && tp->data_location == ONNX__TENSOR_PROTO__DATA_LOCATION__EXTERNAL)
        return read_external(L, tp, label, nbytes, &out->data);

    if (is_str) {
        if (tp->n_string_data != numel)
            return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                                 "%s: tensor '%s': %zu strings for shape %s", L->file, label,
                                 tp->n_string_data, dbuf);
        struct opq_bytes *s = opq_arena_alloc(L->a, nbytes);
        if (!s)
            return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
        for (size_t i = 0; i < numel; i++) {
            s[i].len = tp->string_data[i].len;
            s[i].data = tp->string_data[i].data;
        }
        out->data = s;
        return OPQ_OK;
    }
    size_t n_typed = tp->n_float_data + tp->n_int32_data + tp->n_int64_data + tp->n_double_data +
                     tp->n_uint64_data;
    if (tp->raw_data.len > 0 || n_typed == 0) {
        if (tp->raw_data.len != nbytes)
            return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                                 "%s: tensor '%s': %zu data bytes but shape %s of %s needs %zu",
                                 L->file, label, tp->raw_data.len, dbuf, opq_dtype_name(out->dtype),
                                 nbytes);
        out->data = nbytes ? tp->raw_data.data : NULL; // arena memory (see pb_arena_alloc)
        return OPQ_OK;
    }

    // Typed fields. `have` elements of the carrier field must match `want`.
    size_t want = numel;
    size_t have = 0;
    const void *src = NULL;
    const char *field = NULL;
    switch (out->dtype) {
    case OPQ_DTYPE_FLOAT:
    case OPQ_DTYPE_COMPLEX64:
        want = out->dtype == OPQ_DTYPE_COMPLEX64 ? numel * 2 : numel;
        have = tp->n_float_data;
        src = tp->float_data;
        field = "float_data";
        break;
    case OPQ_DTYPE_DOUBLE:
    case OPQ_DTYPE_COMPLEX128:
        want = out->dtype == OPQ_DTYPE_COMPLEX128 ? numel * 2 : numel;
        have = tp->n_double_data;
        src = tp->double_data;
        field = "double_data";
        break;
    case OPQ_DTYPE_INT64:
        have = tp->n_int64_data;
        src = tp->int64_data;
        field = "int64_data";
        break;
    case OPQ_DTYPE_UINT32:
    case OPQ_DTYPE_UINT64:
        have = tp->n_uint64_data;
        src = tp->uint64_data;
        field = "uint64_data";
        break;
    default: // INT32, 8/16-bit types, FLOAT8*, BOOL and packed 4-bit travel in int32_data
        have = tp->n_int32_data;
        src = tp->int32_data;
        field = "int32_data";
        if (opq_dtype_is_packed4(out->dtype) && have != numel)
            want = nbytes; // one packed byte (two elements, low nibble first) per int32
        break;
    }
    if (have != want)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                             "%s: tensor '%s': %zu values in %s but shape %s needs %zu", L->file,
                             label, have, field, dbuf, want);
    if (nbytes == 0)
        return OPQ_OK;
    // Same layout as the IR: use the arena copy protobuf-c made, in place.
    if (out->dtype == OPQ_DTYPE_FLOAT || out->dtype == OPQ_DTYPE_COMPLEX64 ||
        out->dtype == OPQ_DTYPE_DOUBLE || out->dtype == OPQ_DTYPE_COMPLEX128 ||
        out->dtype == OPQ_DTYPE_INT64 || out->dtype == OPQ_DTYPE_UINT64 ||
        out->dtype == OPQ_DTYPE_INT32) {
        out->data = (void *)src;
        return OPQ_OK;
    }
    uint8_t *d = opq_arena_alloc(L->a, nbytes);
    if (!d)
        return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
    if (out->dtype == OPQ_DTYPE_UINT32) {
        for (size_t i = 0; i < numel; i++)
            ((uint32_t *)d)[i] = (uint32_t)tp->uint64_data[i];
    } else if (opq_dtype_is_packed4(out->dtype)) {
        if (want == nbytes) {
            narrow_int32(d, tp->int32_data, nbytes, 1);
            if (numel & 1)
                d[nbytes - 1] &= 0x0f; // the unused high nibble of an odd count is zero
        } else {
            for (size_t i = 0; i < numel; i++)
                d[i / 2] |= (uint8_t)(((uint32_t)tp->int32_data[i] & 0xf) << (4 * (i & 1)));
        }
    } else {
        narrow_int32(d, tp->int32_data, numel, opq_dtype_size(out->dtype));
    }
    out->data = d;
    return OPQ_OK;
}

// ---- load: values, attributes, nodes, graph, model ----------------------------------------------

// Applies a ValueInfoProto's tensor type to v if v's type is still unknown.
static enum opq_status value_type_from_pb(struct loader *L, struct opq_value *v,
                                          const Onnx__TypeProto *tp) {
    if (!tp || tp->value_case != ONNX__TYPE_PROTO__VALUE_TENSOR_TYPE || !tp->tensor_type)
        return OPQ_OK;
    const Onnx__TypeProto__Tensor *tt = tp->tensor_type;
    if (tt->shape && tt->shape->n_dim > OPQ_MAX_DIMS)
        return opq_set_error(L->ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: value '%s': rank %zu exceeds the maximum of %d", L->file, v->name,
                             tt->shape->n_dim, OPQ_MAX_DIMS);
    if (v->t.dtype != OPQ_DTYPE_UNDEF || v->t.ndim >= 0)
        return OPQ_OK;
    if (tt->has_elem_type && tt->elem_type > 0 && tt->elem_type < OPQ_DTYPE_COUNT)
        v->t.dtype = (enum opq_dtype)tt->elem_type;
    if (!tt->shape)
        return OPQ_OK;
    v->t.ndim = (int)tt->shape->n_dim;
    for (int i = 0; i < v->t.ndim; i++) {
        const Onnx__TensorShapeProto__Dimension *d = tt->shape->dim[i];
        v->t.shape[i] = -1;
        v->dim_param[i] = NULL;
        if (d->value_case == ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_VALUE &&
            d->dim_value >= 0)
            v->t.shape[i] = d->dim_value;
        else if (d->value_case == ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_PARAM)
            v->dim_param[i] = d->dim_param;
    }
    return OPQ_OK;
}

static const char *role_name(enum vi_role r) {
    return r == ROLE_INPUT ? "graph input" : r == ROLE_OUTPUT ? "graph output" : "value_info";
}

static enum opq_status value_info_from_pb(struct loader *L, const Onnx__ValueInfoProto *vi,
                                          enum vi_role role) {
    enum opq_status st;
    const char *name = str_or_empty(vi->name);
    if (!*name)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL, "%s: %s without a name", L->file,
                             role_name(role));
    struct opq_value *v = opq_graph_value_get_or_add(L->g, name);
    if (!v)
        return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
    if (!v->pb && !(v->pb = extra_new(L, NULL, NULL)))
        return OPQ_ERR_NOMEM;
    if (v->pb->value.vi[role] && role != ROLE_OUTPUT)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL, "%s: %s '%s' is listed twice", L->file,
                             role_name(role), name);
    if (!v->pb->value.vi[role])
        v->pb->value.vi[role] = (Onnx__ValueInfoProto *)vi;
    st = value_type_from_pb(L, v, vi->type);
    if (st != OPQ_OK)
        return st;
    st = role == ROLE_INPUT    ? opq_graph_add_input(L->g, v)
         : role == ROLE_OUTPUT ? opq_graph_add_output(L->g, v)
                               : opq_graph_add_info(L->g, v);
    if (st != OPQ_OK)
        return opq_set_error(L->ctx, st, "%s: out of memory", L->file);
    return OPQ_OK;
}

static enum opq_status initializer_from_pb(struct loader *L, const Onnx__TensorProto *tp) {
    const char *name = str_or_empty(tp->name);
    if (!*name)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL, "%s: initializer without a name",
                             L->file);
    struct opq_value *v = opq_graph_value_get_or_add(L->g, name);
    if (!v)
        return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
    if (v->kind & OPQ_VK_INIT)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL, "%s: initializer '%s' is defined twice",
                             L->file, name);
    struct opq_tensor t;
    enum opq_status st = tensor_from_pb(L, tp, name, &t, &v->pb_init);
    if (st != OPQ_OK)
        return st;
    // The data is already arena memory: register the initializer without a copy.
    void *data = t.data;
    size_t nbytes = t.nbytes;
    t.data = NULL;
    t.nbytes = 0;
    st = opq_graph_set_initializer(L->g, v, &t);
    if (st != OPQ_OK)
        return opq_set_error(L->ctx, st, "%s: out of memory", L->file);
    v->t.data = data;
    v->t.nbytes = nbytes;
    for (int i = 0; i < OPQ_MAX_DIMS; i++)
        v->dim_param[i] = NULL;
    return OPQ_OK;
}

static enum opq_attr_type attr_type_infer(const Onnx__AttributeProto *ap) {
    if (ap->has_type && ap->type != ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__UNDEFINED)
        return (enum opq_attr_type)ap->type;
    // IR version 1 attributes carry no type: the field that is set tells it.
    if (ap->has_f)
        return OPQ_ATTR_FLOAT;
    if (ap->has_i)
        return OPQ_ATTR_INT;
    if (ap->has_s)
        return OPQ_ATTR_STRING;
    if (ap->t)
        return OPQ_ATTR_TENSOR;
    if (ap->g)
        return OPQ_ATTR_GRAPH;
    if (ap->sparse_tensor)
        return OPQ_ATTR_SPARSE_TENSOR;
    if (ap->tp)
        return OPQ_ATTR_TYPE_PROTO;
    if (ap->n_floats)
        return OPQ_ATTR_FLOATS;
    if (ap->n_ints)
        return OPQ_ATTR_INTS;
    if (ap->n_strings)
        return OPQ_ATTR_STRINGS;
    if (ap->n_tensors)
        return OPQ_ATTR_TENSORS;
    if (ap->n_graphs)
        return OPQ_ATTR_GRAPHS;
    if (ap->n_sparse_tensors)
        return OPQ_ATTR_SPARSE_TENSORS;
    if (ap->n_type_protos)
        return OPQ_ATTR_TYPE_PROTOS;
    return OPQ_ATTR_UNDEFINED;
}

static enum opq_status attr_from_pb(struct loader *L, struct opq_node *n,
                                    const Onnx__AttributeProto *ap) {
    enum opq_status st = OPQ_OK;
    struct opq_attr a;
    memset(&a, 0, sizeof(a));
    a.name = str_or_empty(ap->name);
    a.type = attr_type_infer(ap);
    if (!*a.name)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                             "%s: node '%s' (%s): attribute without a name", L->file, n->name,
                             n->op_type);
    a.pb = extra_new(L, &ap->base, ap->doc_string);
    if (!a.pb)
        return OPQ_ERR_NOMEM;
    a.pb->attr.orig = ap;
    a.ref_attr_name = ap->ref_attr_name;
    bool missing = false;
    switch (a.type) {
    case OPQ_ATTR_FLOAT:
        a.f = ap->f;
        break;
    case OPQ_ATTR_INT:
        a.i = ap->i;
        break;
    case OPQ_ATTR_STRING:
        a.s.len = ap->s.len;
        a.s.data = ap->s.data;
        break;
    case OPQ_ATTR_TENSOR:
        if (!(missing = !ap->t)) {
            a.t = opq_arena_alloc(L->a, sizeof(*a.t));
            if (!a.t)
                return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
            const char *label = ap->t->name && *ap->t->name ? ap->t->name : n->name;
            st = tensor_from_pb(L, ap->t, label, a.t, &a.pb->attr.t);
        }
        break;
    case OPQ_ATTR_GRAPH:
        missing = !ap->g;
        break;
    case OPQ_ATTR_SPARSE_TENSOR:
        missing = !ap->sparse_tensor;
        break;
    case OPQ_ATTR_TYPE_PROTO:
        missing = !ap->tp;
        break;
    case OPQ_ATTR_FLOATS:
        a.n = (int)ap->n_floats;
        a.floats = ap->floats;
        break;
    case OPQ_ATTR_INTS:
        a.n = (int)ap->n_ints;
        a.ints = ap->ints;
        break;
    case OPQ_ATTR_STRINGS:
        a.n = (int)ap->n_strings;
        a.strings = opq_arena_alloc(L->a, (ap->n_strings + 1) * sizeof(*a.strings));
        if (!a.strings)
            return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
        for (size_t i = 0; i < ap->n_strings; i++) {
            a.strings[i].len = ap->strings[i].len;
            a.strings[i].data = ap->strings[i].data;
        }
        break;
    case OPQ_ATTR_TENSORS:
        a.n = (int)ap->n_tensors;
        a.tensors = opq_arena_alloc(L->a, (ap->n_tensors + 1) * sizeof(*a.tensors));
        a.pb->attr.ts = opq_arena_alloc(L->a, (ap->n_tensors + 1) * sizeof(*a.pb->attr.ts));
        if (!a.tensors || !a.pb->attr.ts)
            return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
        for (size_t i = 0; i < ap->n_tensors && st == OPQ_OK; i++) {
            a.tensors[i] = opq_arena_alloc(L->a, sizeof(*a.tensors[i]));
            if (!a.tensors[i])
                return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
            const char *label =
                ap->tensors[i]->name && *ap->tensors[i]->name ? ap->tensors[i]->name : n->name;
            st = tensor_from_pb(L, ap->tensors[i], label, a.tensors[i], &a.pb->attr.ts[i]);
        }
        break;
    case OPQ_ATTR_GRAPHS:
        a.n = (int)ap->n_graphs;
        break;
    case OPQ_ATTR_SPARSE_TENSORS:
        a.n = (int)ap->n_sparse_tensors;
        break;
    case OPQ_ATTR_TYPE_PROTOS:
        a.n = (int)ap->n_type_protos;
        break;
    case OPQ_ATTR_UNDEFINED:
        missing = true;
        break;
    default:
        return opq_set_error(L->ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: node '%s' (%s): attribute '%s' has unknown type %d", L->file,
                             n->name, n->op_type, a.name, (int)a.type);
    }
    if (st != OPQ_OK)
        return st;
    if (missing)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                             "%s: node '%s' (%s): attribute '%s' has no value", L->file, n->name,
                             n->op_type, a.name);
    st = opq_node_add_attr(L->g, n, &a);
    if (st != OPQ_OK)
        return opq_set_error(L->ctx, st, "%s: out of memory", L->file);
    return OPQ_OK;
}

static enum opq_status node_from_pb(struct loader *L, const Onnx__NodeProto *np,
                                    struct opq_value **ins, struct opq_value **outs) {
    const char *name = str_or_empty(np->name);
    const char *op_type = str_or_empty(np->op_type);
    if (!*op_type)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL, "%s: node '%s' has no op_type", L->file,
                             name);
    for (size_t i = 0; i < np->n_input; i++) {
        const char *in = str_or_empty(np->input[i]);
        ins[i] = NULL;
        if (*in && !(ins[i] = opq_graph_value_get_or_add(L->g, in)))
            return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
    }
    for (size_t i = 0; i < np->n_output; i++) {
        const char *on = str_or_empty(np->output[i]);
        outs[i] = NULL;
        if (!*on)
            continue;
        if (!(outs[i] = opq_graph_value_get_or_add(L->g, on)))
            return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
        const struct opq_value *o = outs[i];
        const char *what = o->producer                ? "is also produced by node"
                           : (o->kind & OPQ_VK_INIT)  ? "is also an initializer"
                           : (o->kind & OPQ_VK_INPUT) ? "is also a graph input"
                                                      : NULL;
        for (size_t j = 0; j < i && !what; j++)
            if (outs[j] == o)
                what = "is listed twice among its outputs";
        if (what)
            return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                                 "%s: node '%s' (%s): output '%s' %s%s%s%s", L->file, name, op_type,
                                 on, what, o->producer ? " '" : "",
                                 o->producer ? o->producer->name : "", o->producer ? "'" : "");
    }
    struct opq_node *n;
    enum opq_status st = opq_graph_add_node(L->g, op_type, np->domain, name, ins, (int)np->n_input,
                                            outs, (int)np->n_output, &n);
    if (st != OPQ_OK)
        return opq_set_error(L->ctx, st, "%s: node '%s' (%s): cannot add it", L->file, name,
                             op_type);
    n->pb = extra_new(L, &np->base, np->doc_string);
    if (!n->pb)
        return OPQ_ERR_NOMEM;
    for (size_t i = 0; i < np->n_attribute && st == OPQ_OK; i++)
        st = attr_from_pb(L, n, np->attribute[i]);
    return st;
}

// Prefixes the sticky message set by graph.c with the file name, so it reads like ours.
static enum opq_status with_file_prefix(struct opq_ctx *ctx, enum opq_status st, const char *file) {
    if (st == OPQ_OK || ctx->status != st)
        return st;
    char msg[OPQ_ERRMSG_MAX];
    snprintf(msg, sizeof(msg), "%s", ctx->errmsg);
    opq_ctx_clear_error(ctx);
    return opq_set_error(ctx, st, "%s: %s", file, msg);
}

static enum opq_status graph_from_pb(struct loader *L, const Onnx__GraphProto *gp) {
    enum opq_status st = OPQ_OK;
    struct opq_graph *g = L->g;
    struct opq_value **ins = NULL;
    size_t max_io = 1;
    if (gp->n_sparse_initializer) {
        const Onnx__SparseTensorProto *sp = gp->sparse_initializer[0];
        const char *nm = sp->values && sp->values->name ? sp->values->name : "";
        return opq_set_error(L->ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: sparse initializer '%s' is not supported", L->file, nm);
    }
    g->name = gp->name ? gp->name : "";
    g->pb = extra_new(L, &gp->base, gp->doc_string);
    if (!g->pb)
        return OPQ_ERR_NOMEM;
    g->pb->graph.qannot = gp->quantization_annotation;
    g->pb->graph.n_qannot = gp->n_quantization_annotation;

    for (size_t i = 0; i < gp->n_input && st == OPQ_OK; i++)
        st = value_info_from_pb(L, gp->input[i], ROLE_INPUT);
    for (size_t i = 0; i < gp->n_initializer && st == OPQ_OK; i++)
        st = initializer_from_pb(L, gp->initializer[i]);
    for (size_t i = 0; i < gp->n_output && st == OPQ_OK; i++)
        st = value_info_from_pb(L, gp->output[i], ROLE_OUTPUT);
    for (size_t i = 0; i < gp->n_value_info && st == OPQ_OK; i++)
        st = value_info_from_pb(L, gp->value_info[i], ROLE_INFO);
    if (st != OPQ_OK)
        return st;

    for (size_t i = 0; i < gp->n_node; i++) {
        if (gp->node[i]->n_input > max_io)
            max_io = gp->node[i]->n_input;
        if (gp->node[i]->n_output > max_io)
            max_io = gp->node[i]->n_output;
    }
    if (max_io > INT32_MAX / 2)
        return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL, "%s: node with %zu inputs/outputs",
                             L->file, max_io);
    ins = opq_malloc(L->ctx, 2 * max_io * sizeof(*ins));
    if (!ins)
        return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
    for (size_t i = 0; i < gp->n_node && st == OPQ_OK; i++)
        st = node_from_pb(L, gp->node[i], ins, ins + max_io);
    opq_free(L->ctx, ins);
    if (st != OPQ_OK)
        return st;

    // Every value read must be defined somewhere (the graph may list nodes out of order).
    for (int i = 0; i < g->n_nodes; i++) {
        const struct opq_node *n = g->nodes[i];
        for (int j = 0; j < n->n_inputs; j++) {
            const struct opq_value *v = n->inputs[j];
            if (v && !v->producer && !(v->kind & (OPQ_VK_INPUT | OPQ_VK_INIT)))
                return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                                     "%s: node '%s' (%s) reads undefined value '%s'", L->file,
                                     n->name, n->op_type, v->name);
        }
    }
    for (int i = 0; i < g->n_outputs; i++) {
        const struct opq_value *v = g->outputs[i];
        if (!v->producer && !(v->kind & (OPQ_VK_INPUT | OPQ_VK_INIT)))
            return opq_set_error(L->ctx, OPQ_ERR_INVALID_MODEL,
                                 "%s: graph output '%s' is never computed", L->file, v->name);
    }
    st = with_file_prefix(L->ctx, opq_graph_sort(g), L->file);
    if (st != OPQ_OK)
        return st;

    // Remember the types as loaded (see struct opq_pb_extra).
    for (int i = 0; i < g->n_values; i++) {
        struct opq_value *v = g->values[i];
        if (!v->pb)
            continue;
        v->pb->value.dtype = v->t.dtype;
        v->pb->value.ndim = v->t.ndim;
        memcpy(v->pb->value.shape, v->t.shape, sizeof(v->t.shape));
        memcpy(v->pb->value.dim_param, v->dim_param, sizeof(v->dim_param));
    }
    return OPQ_OK;
}

static enum opq_status model_from_pb(struct loader *L, struct opq_model *m,
                                     const Onnx__ModelProto *mp) {
    m->ir_version = mp->ir_version;
    m->producer_name = str_or_empty(mp->producer_name);
    m->producer_version = str_or_empty(mp->producer_version);
    m->domain = str_or_empty(mp->domain);
    m->model_version = mp->model_version;
    m->pb = extra_new(L, &mp->base, mp->doc_string);
    if (!m->pb)
        return OPQ_ERR_NOMEM;
    m->pb->model.opsets = mp->opset_import;
    m->pb->model.n_opsets = mp->n_opset_import;
    m->pb->model.metadata = mp->metadata_props;
    m->pb->model.n_metadata = mp->n_metadata_props;
    m->pb->model.training = mp->training_info;
    m->pb->model.n_training = mp->n_training_info;
    m->pb->model.functions = mp->functions;
    m->pb->model.n_functions = mp->n_functions;
    m->opsets = opq_arena_alloc(L->a, (mp->n_opset_import + 1) * sizeof(*m->opsets));
    m->metadata = opq_arena_alloc(L->a, (mp->n_metadata_props + 1) * sizeof(*m->metadata));
    if (!m->opsets || !m->metadata)
        return opq_set_error(L->ctx, OPQ_ERR_NOMEM, "%s: out of memory", L->file);
    for (size_t i = 0; i < mp->n_opset_import; i++) {
        m->opsets[i].domain = str_or_empty(mp->opset_import[i]->domain);
        m->opsets[i].version = mp->opset_import[i]->version;
    }
    m->n_opsets = (int)mp->n_opset_import;
    for (size_t i = 0; i < mp->n_metadata_props; i++) {
        m->metadata[i].key = str_or_empty(mp->metadata_props[i]->key);
        m->metadata[i].value = str_or_empty(mp->metadata_props[i]->value);
    }
    m->n_metadata = (int)mp->n_metadata_props;
    return graph_from_pb(L, mp->graph);
}

static enum opq_status load_model(struct opq_ctx *ctx, const void *buf, size_t len,
                                  const char *file, const char *dir, bool from_file,
                                  struct opq_model **out) {
    enum opq_status st = OPQ_OK;
    struct loader L;
    struct arena_alloc aa;
    *out = NULL;
    struct opq_model *m = opq_model_new(ctx);
    if (!m)
        return opq_set_error(ctx, OPQ_ERR_NOMEM, "%s: out of memory", file);
    L.ctx = ctx;
    L.a = m->arena;
    L.g = m->graph;
    L.file = opq_arena_strdup(m->arena, file);
    L.dir = dir ? opq_arena_strdup(m->arena, dir) : NULL;
    if (!L.file || (dir && !L.dir)) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "%s: out of memory", file);
        goto out_free;
    }
    m->path = from_file ? L.file : "";
    m->dir = L.dir;
    if (len == 0 || !wire_check(&onnx__model_proto__descriptor, buf, len, 0)) {
        st = opq_set_error(ctx, OPQ_ERR_PARSE, "%s: not a valid ONNX protobuf (%s)", file,
                           len ? "truncated or corrupt" : "empty file");
        goto out_free;
    }
    aa.arena = m->arena;
    aa.oom = false;
    ProtobufCAllocator pa = {pb_arena_alloc, pb_arena_free, &aa};
    Onnx__ModelProto *mp = onnx__model_proto__unpack(&pa, len, buf);
    if (!mp) {
        st = aa.oom ? opq_set_error(ctx, OPQ_ERR_NOMEM, "%s: out of memory", file)
                    : opq_set_error(ctx, OPQ_ERR_PARSE,
                                    "%s: not a valid ONNX protobuf (truncated or corrupt)", file);
        goto out_free;
    }
    if (!mp->graph || (mp->ir_version == 0 && mp->n_opset_import == 0)) {
        st = opq_set_error(ctx, OPQ_ERR_PARSE, "%s: is not an ONNX model (%s)", file,
                           mp->graph ? "no ir_version and no opset_import" : "no graph");
        goto out_free;
    }
    st = model_from_pb(&L, m, mp);
    if (st != OPQ_OK)
        goto out_free;
    *out = m;
    return OPQ_OK;
out_free:
    opq_model_free(m);
    return st;
}

enum opq_status opq_model_load_buffer(struct opq_ctx *ctx, const void *buf, size_t len,
                                      const char *name, const char *base_dir,
                                      struct opq_model **out) {
    if (!out)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "opq_model_load_buffer: NULL output");
    *out = NULL;
    if (!buf && len)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "opq_model_load_buffer: NULL buffer");
    return load_model(ctx, buf, len, name ? name : "<buffer>", base_dir, false, out);
}

enum opq_status opq_model_load(struct opq_ctx *ctx, const char *path, struct opq_model **out) {
    struct mapped mf;
    if (!out || !path)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "opq_model_load: NULL argument");
    *out = NULL;
    enum opq_status st = map_file(ctx, path, &mf);
    if (st != OPQ_OK)
        return st;
    char *dir = dir_of(ctx, path); // external data is resolved against the model's folder
    if (!dir)
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "%s: out of memory", path);
    else
        st = load_model(ctx, mf.data, mf.len, path, dir, true, out);
    opq_free(ctx, dir);
    unmap_file(&mf);
    return st;
}

enum opq_status opq_tensor_load_pb(struct opq_ctx *ctx, struct opq_arena *arena, const char *path,
                                   struct opq_tensor *out, const char **name) {
    struct mapped mf;
    struct loader L;
    char *dir = NULL;
    enum opq_status st = map_file(ctx, path, &mf);
    if (st != OPQ_OK)
        return st;
    L.ctx = ctx;
    L.a = arena;
    L.g = NULL;
    L.file = path;
    L.dir = dir = dir_of(ctx, path);
    if (!L.dir) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "%s: out of memory", path);
        goto out_unmap;
    }
    if (!wire_check(&onnx__tensor_proto__descriptor, mf.data, mf.len, 0)) {
        st = opq_set_error(ctx, OPQ_ERR_PARSE, "%s: not a valid TensorProto (truncated or corrupt)",
                           path);
        goto out_unmap;
    }
    struct arena_alloc aa = {arena, false};
    ProtobufCAllocator pa = {pb_arena_alloc, pb_arena_free, &aa};
    Onnx__TensorProto *tp = onnx__tensor_proto__unpack(&pa, mf.len, mf.data);
    if (!tp) {
        st = aa.oom ? opq_set_error(ctx, OPQ_ERR_NOMEM, "%s: out of memory", path)
                    : opq_set_error(ctx, OPQ_ERR_PARSE,
                                    "%s: not a valid TensorProto (truncated or corrupt)", path);
        goto out_unmap;
    }
    st = tensor_from_pb(&L, tp, str_or_empty(tp->name), out, NULL);
    if (st == OPQ_OK && name)
        *name = str_or_empty(tp->name);
out_unmap:
    opq_free(ctx, dir);
    unmap_file(&mf);
    return st;
}

// ---- save ---------------------------------------------------------------------------------------

struct saver {
    struct opq_ctx *ctx;
    struct opq_arena *a; // scratch: the ModelProto being assembled
    const struct opq_model *m;
    enum opq_status st;
    // external data (opq_model_save only)
    bool external;
    size_t ext_min;
    const char *ext_location; // as written into the model
    const char *ext_final;    // side file path
    char *ext_tmp;            // its temporary name (heap), NULL until opened
    FILE *ext_f;
    uint64_t ext_off;
};

static void *pb_new(struct saver *S, size_t size, const ProtobufCMessageDescriptor *d) {
    void *p = opq_arena_alloc(S->a, size);
    if (!p) {
        S->st = opq_set_error(S->ctx, OPQ_ERR_NOMEM, "out of memory serializing the model");
        return NULL;
    }
    if (d)
        protobuf_c_message_init(d, p);
    return p;
}

#define PB_NEW(S, T, desc) ((T *)pb_new((S), sizeof(T), &(desc)))

static void *pb_array(struct saver *S, size_t n, size_t elem) {
    return pb_new(S, n ? n * elem : 1, NULL);
}

static void set_unknown(ProtobufCMessage *msg, const struct opq_pb_extra *x) {
    if (x && x->n_unknown) {
        msg->n_unknown_fields = (unsigned)x->n_unknown;
        msg->unknown_fields = x->unknown;
    }
}

static char *cs(const char *s) { // protobuf-c fields are not const; packing only reads them
    return (char *)s;
}

static bool ext_write(struct saver *S, const void *data, size_t n, uint64_t *off) {
    static const uint8_t zeros[EXT_ALIGN];
    if (!S->ext_f) {
        size_t len = strlen(S->ext_final) + 16;
        S->ext_tmp = opq_malloc(S->ctx, len);
        if (!S->ext_tmp) {
            S->st = opq_set_error(S->ctx, OPQ_ERR_NOMEM, "out of memory serializing the model");
            return false;
        }
        snprintf(S->ext_tmp, len, "%s.tmp.XXXXXX", S->ext_final);
        int fd = mkstemp(S->ext_tmp);
        if (fd < 0 || !(S->ext_f = fdopen(fd, "wb"))) {
            S->st = opq_set_error(S->ctx, OPQ_ERR_IO, "%s: cannot create: %s", S->ext_final,
                                  strerror(errno));
            if (fd >= 0) {
                close(fd);
                unlink(S->ext_tmp);
            }
            opq_free(S->ctx, S->ext_tmp);
            S->ext_tmp = NULL;
            return false;
        }
        fchmod(fd, 0644);
    }
    size_t pad = (size_t)((EXT_ALIGN - S->ext_off % EXT_ALIGN) % EXT_ALIGN);
    if ((pad && fwrite(zeros, 1, pad, S->ext_f) != pad) ||
        (n && fwrite(data, 1, n, S->ext_f) != n)) {
        S->st = opq_set_error(S->ctx, OPQ_ERR_IO, "%s: write failed: %s", S->ext_final,
                              strerror(errno));
        return false;
    }
    *off = S->ext_off + pad;
    S->ext_off = *off + n;
    return true;
}

static Onnx__StringStringEntryProto *kv_new(struct saver *S, const char *k, const char *v) {
    Onnx__StringStringEntryProto *e =
        PB_NEW(S, Onnx__StringStringEntryProto, onnx__string_string_entry_proto__descriptor);
    if (e) {
        e->key = cs(k);
        e->value = cs(v);
    }
    return e;
}

static Onnx__TensorProto *tensor_to_pb(struct saver *S, const struct opq_tensor *t,
                                       const char *name, const struct opq_pb_extra *x,
                                       bool may_external) {
    size_t numel;
    size_t need = 0;
    bool ok = t->ndim >= 0 && t->dtype > OPQ_DTYPE_UNDEF && t->dtype < OPQ_DTYPE_COUNT &&
              opq_tensor_numel(t, &numel);
    if (ok)
        ok = t->dtype == OPQ_DTYPE_STRING ? opq_mul_size(numel, sizeof(struct opq_bytes), &need)
                                          : opq_dtype_nbytes(t->dtype, numel, &need);
    if (!ok || need != t->nbytes || (need && !t->data)) {
        S->st = opq_set_error(S->ctx, OPQ_ERR_INTERNAL,
                              "tensor '%s': %zu data bytes do not match its %s shape (rank %d)",
                              name, t->nbytes, opq_dtype_name(t->dtype), t->ndim);
        return NULL;
    }
    Onnx__TensorProto *tp = PB_NEW(S, Onnx__TensorProto, onnx__tensor_proto__descriptor);
    if (!tp)
        return NULL;
    tp->n_dims = (size_t)t->ndim;
    tp->dims = (int64_t *)t->shape;
    tp->has_data_type = 1;
    tp->data_type = (int32_t)t->dtype;
    tp->name = name && *name ? cs(name) : NULL;
    if (x) {
        tp->doc_string = cs(x->doc_string);
        set_unknown(&tp->base, x);
    }
    if (t->dtype == OPQ_DTYPE_STRING) {
        const struct opq_bytes *s = t->data;
        tp->string_data = pb_array(S, numel, sizeof(*tp->string_data));
        if (!tp->string_data)
            return NULL;
        for (size_t i = 0; i < numel; i++) {
            tp->string_data[i].len = s[i].len;
            tp->string_data[i].data = s[i].data;
        }
        tp->n_string_data = numel;
    } else if (may_external && S->external && t->nbytes >= S->ext_min && t->nbytes > 0) {
        uint64_t off;
        char nums[2][24];
        if (!ext_write(S, t->data, t->nbytes, &off))
            return NULL;
        snprintf(nums[0], sizeof(nums[0]), "%" PRIu64, off);
        snprintf(nums[1], sizeof(nums[1]), "%zu", t->nbytes);
        tp->external_data = pb_array(S, 3, sizeof(*tp->external_data));
        if (!tp->external_data)
            return NULL;
        const char *off_s = opq_arena_strdup(S->a, nums[0]);
        const char *len_s = opq_arena_strdup(S->a, nums[1]);
        if (!off_s || !len_s) {
            S->st = opq_set_error(S->ctx, OPQ_ERR_NOMEM, "out of memory serializing the model");
            return NULL;
        }
        tp->external_data[0] = kv_new(S, "location", S->ext_location);
        tp->external_data[1] = kv_new(S, "offset", off_s);
        tp->external_data[2] = kv_new(S, "length", len_s);
        if (!tp->external_data[0] || !tp->external_data[1] || !tp->external_data[2])
            return NULL;
        tp->n_external_data = 3;
        tp->has_data_location = 1;
        tp->data_location = ONNX__TENSOR_PROTO__DATA_LOCATION__EXTERNAL;
    } else {
        tp->has_raw_data = 1;
        tp->raw_data.len = t->nbytes;
        tp->raw_data.data = t->data; // borrowed from the IR: no copy of the weights
    }
    return tp;
}

static bool value_unchanged(const struct opq_value *v) {
    const struct opq_pb_extra *x = v->pb;
    if (v->t.dtype != x->value.dtype || v->t.ndim != x->value.ndim)
        return false;
    for (int i = 0; i < v->t.ndim && i < OPQ_MAX_DIMS; i++) {
        const char *a = v->dim_param[i];
        const char *b = x->value.dim_param[i];
        if (v->t.shape[i] != x->value.shape[i] || (!a != !b) || (a && strcmp(a, b) != 0))
            return false;
    }
    return true;
}

static Onnx__TypeProto *tensor_type_to_pb(struct saver *S, const struct opq_value *v) {
    Onnx__TypeProto *tp = PB_NEW(S, Onnx__TypeProto, onnx__type_proto__descriptor);
    Onnx__TypeProto__Tensor *tt =
        PB_NEW(S, Onnx__TypeProto__Tensor, onnx__type_proto__tensor__descriptor);
    if (!tp || !tt)
        return NULL;
    tp->value_case = ONNX__TYPE_PROTO__VALUE_TENSOR_TYPE;
    tp->tensor_type = tt;
    if (v->t.dtype != OPQ_DTYPE_UNDEF) {
        tt->has_elem_type = 1;
        tt->elem_type = (int32_t)v->t.dtype;
    }
    if (v->t.ndim < 0)
        return tp;
    Onnx__TensorShapeProto *sh =
        PB_NEW(S, Onnx__TensorShapeProto, onnx__tensor_shape_proto__descriptor);
    if (!sh)
        return NULL;
    sh->dim = pb_array(S, (size_t)v->t.ndim, sizeof(*sh->dim));
    if (!sh->dim)
        return NULL;
    sh->n_dim = (size_t)v->t.ndim;
    for (int i = 0; i < v->t.ndim; i++) {
        Onnx__TensorShapeProto__Dimension *d = PB_NEW(
            S, Onnx__TensorShapeProto__Dimension, onnx__tensor_shape_proto__dimension__descriptor);
        if (!d)
            return NULL;
        if (v->dim_param[i]) {
            d->value_case = ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_PARAM;
            d->dim_param = cs(v->dim_param[i]);
        } else if (v->t.shape[i] >= 0) {
            d->value_case = ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_VALUE;
            d->dim_value = v->t.shape[i];
        }
        sh->dim[i] = d;
    }
    tt->shape = sh;
    return tp;
}

static Onnx__ValueInfoProto *value_info_to_pb(struct saver *S, const struct opq_value *v,
                                              enum vi_role role) {
    Onnx__ValueInfoProto *orig = v->pb ? v->pb->value.vi[role] : NULL;
    if (orig && strcmp(str_or_empty(orig->name), v->name) == 0 && value_unchanged(v))
        return orig; // verbatim: denotations, non-tensor types and unknown fields survive
    Onnx__ValueInfoProto *vi = PB_NEW(S, Onnx__ValueInfoProto, onnx__value_info_proto__descriptor);
    if (!vi)
        return NULL;
    vi->name = cs(v->name);
    if (orig) {
        vi->doc_string = orig->doc_string;
        vi->base.n_unknown_fields = orig->base.n_unknown_fields;
        vi->base.unknown_fields = orig->base.unknown_fields;
    }
    if (v->t.dtype != OPQ_DTYPE_UNDEF || v->t.ndim >= 0) {
        if (!(vi->type = tensor_type_to_pb(S, v)))
            return NULL;
    } else if (orig) {
        vi->type = orig->type; // a type the IR does not model (sequence, map, ...)
    }
    return vi;
}

static Onnx__AttributeProto *attr_to_pb(struct saver *S, const struct opq_node *n,
                                        const struct opq_attr *a) {
    const struct opq_pb_extra *x = a->pb;
    const Onnx__AttributeProto *orig = x ? x->attr.orig : NULL;
    Onnx__AttributeProto *ap = PB_NEW(S, Onnx__AttributeProto, onnx__attribute_proto__descriptor);
    if (!ap)
        return NULL;
    ap->name = cs(a->name);
    ap->ref_attr_name = cs(a->ref_attr_name);
    ap->has_type = 1;
    ap->type = (Onnx__AttributeProto__AttributeType)a->type;
    if (x) {
        ap->doc_string = cs(x->doc_string);
        set_unknown(&ap->base, x);
    }
    bool from_orig = a->type == OPQ_ATTR_GRAPH || a->type == OPQ_ATTR_GRAPHS ||
                     a->type == OPQ_ATTR_SPARSE_TENSOR || a->type == OPQ_ATTR_SPARSE_TENSORS ||
                     a->type == OPQ_ATTR_TYPE_PROTO || a->type == OPQ_ATTR_TYPE_PROTOS;
    if (from_orig && (!orig || attr_type_infer(orig) != a->type)) {
        S->st = opq_set_error(S->ctx, OPQ_ERR_INTERNAL,
                              "node '%s': attribute '%s' of type %d has no protobuf to re-emit",
                              n->name, a->name, (int)a->type);
        return NULL;
    }
    switch (a->type) {
    case OPQ_ATTR_FLOAT:
        ap->has_f = 1;
        ap->f = a->f;
        break;
    case OPQ_ATTR_INT:
        ap->has_i = 1;
        ap->i = a->i;
        break;
    case OPQ_ATTR_STRING:
        ap->has_s = 1;
        ap->s.len = a->s.len;
        ap->s.data = a->s.data;
        break;
    case OPQ_ATTR_TENSOR:
        if (!a->t) {
            S->st =
                opq_set_error(S->ctx, OPQ_ERR_INTERNAL,
                              "node '%s': tensor attribute '%s' has no tensor", n->name, a->name);
            return NULL;
        }
        ap->t = tensor_to_pb(S, a->t, x && x->attr.t ? x->attr.t->tensor.name : NULL,
                             x ? x->attr.t : NULL, false);
        if (!ap->t)
            return NULL;
        break;
    case OPQ_ATTR_FLOATS:
        ap->n_floats = (size_t)a->n;
        ap->floats = a->floats;
        break;
    case OPQ_ATTR_INTS:
        ap->n_ints = (size_t)a->n;
        ap->ints = a->ints;
        break;
    case OPQ_ATTR_STRINGS:
        ap->strings = pb_array(S, (size_t)a->n, sizeof(*ap->strings));
        if (!ap->strings)
            return NULL;
        for (int i = 0; i < a->n; i++) {
            ap->strings[i].len = a->strings[i].len;
            ap->strings[i].data = a->strings[i].data;
        }
        ap->n_strings = (size_t)a->n;
        break;
    case OPQ_ATTR_TENSORS:
        ap->tensors = pb_array(S, (size_t)a->n, sizeof(*ap->tensors));
        if (!ap->tensors)
            return NULL;
        for (int i = 0; i < a->n; i++) {
            const struct opq_pb_extra *tx = x && x->attr.ts ? x->attr.ts[i] : NULL;
            ap->tensors[i] = tensor_to_pb(S, a->tensors[i], tx ? tx->tensor.name : NULL, tx, false);
            if (!ap->tensors[i])
                return NULL;
        }
        ap->n_tensors = (size_t)a->n;
        break;
    case OPQ_ATTR_GRAPH:
        ap->g = orig->g;
        break;
    case OPQ_ATTR_GRAPHS:
        ap->n_graphs = orig->n_graphs;
        ap->graphs = orig->graphs;
        break;
    case OPQ_ATTR_SPARSE_TENSOR:
        ap->sparse_tensor = orig->sparse_tensor;
        break;
    case OPQ_ATTR_SPARSE_TENSORS:
        ap->n_sparse_tensors = orig->n_sparse_tensors;
        ap->sparse_tensors = orig->sparse_tensors;
        break;
    case OPQ_ATTR_TYPE_PROTO:
        ap->tp = orig->tp;
        break;
    case OPQ_ATTR_TYPE_PROTOS:
        ap->n_type_protos = orig->n_type_protos;
        ap->type_protos = orig->type_protos;
        break;
    default:
        S->st =
            opq_set_error(S->ctx, OPQ_ERR_INTERNAL, "node '%s': attribute '%s' has invalid type %d",
                          n->name, a->name, (int)a->type);
        return NULL;
    }
    return ap;
}

static Onnx__NodeProto *node_to_pb(struct saver *S, const struct opq_node *n) {
    Onnx__NodeProto *np = PB_NEW(S, Onnx__NodeProto, onnx__node_proto__descriptor);
    if (!np)
        return NULL;
    np->input = pb_array(S, (size_t)n->n_inputs, sizeof(*np->input));
    np->output = pb_array(S, (size_t)n->n_outputs, sizeof(*np->output));
    np->attribute = pb_array(S, (size_t)n->n_attrs, sizeof(*np->attribute));
    if (!np->input || !np->output || !np->attribute)
        return NULL;
    for (int i = 0; i < n->n_inputs; i++)
        np->input[i] = cs(n->inputs[i] ? n->inputs[i]->name : "");
    for (int i = 0; i < n->n_outputs; i++)
        np->output[i] = cs(n->outputs[i] ? n->outputs[i]->name : "");
    np->n_input = (size_t)n->n_inputs;
    np->n_output = (size_t)n->n_outputs;
    np->name = n->name && *n->name ? cs(n->name) : NULL;
    np->op_type = cs(n->op_type);
    np->domain = n->domain && *n->domain ? cs(n->domain) : NULL;
    for (int i = 0; i < n->n_attrs; i++)
        if (!(np->attribute[i] = attr_to_pb(S, n, &n->attrs[i])))
            return NULL;
    np->n_attribute = (size_t)n->n_attrs;
    if (n->pb) {
        np->doc_string = cs(n->pb->doc_string);
        set_unknown(&np->base, n->pb);
    }
    return np;
}

static bool value_infos_to_pb(struct saver *S, struct opq_value *const *vals, int n,
                              enum vi_role role, Onnx__ValueInfoProto ***out, size_t *n_out) {
    *out = pb_array(S, (size_t)n, sizeof(**out));
    if (!*out)
        return false;
    for (int i = 0; i < n; i++)
        if (!((*out)[i] = value_info_to_pb(S, vals[i], role)))
            return false;
    *n_out = (size_t)n;
    return true;
}

static Onnx__GraphProto *graph_to_pb(struct saver *S, const struct opq_graph *g) {
    Onnx__GraphProto *gp = PB_NEW(S, Onnx__GraphProto, onnx__graph_proto__descriptor);
    if (!gp)
        return NULL;
    gp->node = pb_array(S, (size_t)g->n_nodes, sizeof(*gp->node));
    gp->initializer = pb_array(S, (size_t)g->n_inits, sizeof(*gp->initializer));
    if (!gp->node || !gp->initializer)
        return NULL;
    for (int i = 0; i < g->n_nodes; i++) {
        if (g->nodes[i]->flags & OPQ_NF_DEAD)
            continue;
        if (!(gp->node[gp->n_node++] = node_to_pb(S, g->nodes[i])))
            return NULL;
    }
    gp->name = cs(g->name);
    for (int i = 0; i < g->n_inits; i++) {
        const struct opq_value *v = g->inits[i];
        if (!(v->kind & OPQ_VK_INIT))
            continue;
        if (!(gp->initializer[gp->n_initializer++] =
                  tensor_to_pb(S, &v->t, v->name, v->pb_init, true)))
            return NULL;
    }
    if (!value_infos_to_pb(S, g->inputs, g->n_inputs, ROLE_INPUT, &gp->input, &gp->n_input) ||
        !value_infos_to_pb(S, g->outputs, g->n_outputs, ROLE_OUTPUT, &gp->output, &gp->n_output) ||
        !value_infos_to_pb(S, g->infos, g->n_infos, ROLE_INFO, &gp->value_info, &gp->n_value_info))
        return NULL;
    if (g->pb) {
        gp->doc_string = cs(g->pb->doc_string);
        gp->n_quantization_annotation = g->pb->graph.n_qannot;
        gp->quantization_annotation = g->pb->graph.qannot;
        set_unknown(&gp->base, g->pb);
    }
    return gp;
}

static bool opsets_unchanged(const struct opq_model *m) {
    const struct opq_pb_extra *x = m->pb;
    if (!x || x->model.n_opsets != (size_t)m->n_opsets)
        return false;
    for (int i = 0; i < m->n_opsets; i++) {
        const Onnx__OperatorSetIdProto *o = x->model.opsets[i];
        if (o->version != m->opsets[i].version ||
            strcmp(str_or_empty(o->domain), str_or_empty(m->opsets[i].domain)) != 0)
            return false;
    }
    return true;
}

static bool metadata_unchanged(const struct opq_model *m) {
    const struct opq_pb_extra *x = m->pb;
    if (!x || x->model.n_metadata != (size_t)m->n_metadata)
        return false;
    for (int i = 0; i < m->n_metadata; i++) {
        const Onnx__StringStringEntryProto *e = x->model.metadata[i];
        if (strcmp(str_or_empty(e->key), str_or_empty(m->metadata[i].key)) != 0 ||
            strcmp(str_or_empty(e->value), str_or_empty(m->metadata[i].value)) != 0)
            return false;
    }
    return true;
}

static Onnx__ModelProto *model_to_pb(struct saver *S) {
    const struct opq_model *m = S->m;
    Onnx__ModelProto *mp = PB_NEW(S, Onnx__ModelProto, onnx__model_proto__descriptor);
    if (!mp)
        return NULL;
    mp->has_ir_version = 1;
    mp->ir_version = m->ir_version ? m->ir_version : 8; // 8: the IR of opsets 15-17
    if (opsets_unchanged(m)) {
        mp->n_opset_import = m->pb->model.n_opsets;
        mp->opset_import = m->pb->model.opsets;
    } else {
        mp->opset_import = pb_array(S, (size_t)m->n_opsets, sizeof(*mp->opset_import));
        if (!mp->opset_import)
            return NULL;
        for (int i = 0; i < m->n_opsets; i++) {
            Onnx__OperatorSetIdProto *o =
                PB_NEW(S, Onnx__OperatorSetIdProto, onnx__operator_set_id_proto__descriptor);
            if (!o)
                return NULL;
            o->domain = cs(str_or_empty(m->opsets[i].domain));
            o->has_version = 1;
            o->version = m->opsets[i].version;
            mp->opset_import[i] = o;
        }
        mp->n_opset_import = (size_t)m->n_opsets;
    }
    mp->producer_name = m->producer_name && *m->producer_name ? cs(m->producer_name) : NULL;
    mp->producer_version =
        m->producer_version && *m->producer_version ? cs(m->producer_version) : NULL;
    mp->domain = m->domain && *m->domain ? cs(m->domain) : NULL;
    mp->has_model_version = m->model_version != 0;
    mp->model_version = m->model_version;
    if (metadata_unchanged(m)) {
        mp->n_metadata_props = m->pb->model.n_metadata;
        mp->metadata_props = m->pb->model.metadata;
    } else {
        mp->metadata_props = pb_array(S, (size_t)m->n_metadata, sizeof(*mp->metadata_props));
        if (!mp->metadata_props)
            return NULL;
        for (int i = 0; i < m->n_metadata; i++)
            if (!(mp->metadata_props[i] = kv_new(S, m->metadata[i].key, m->metadata[i].value)))
                return NULL;
        mp->n_metadata_props = (size_t)m->n_metadata;
    }
    if (m->pb) {
        mp->doc_string = cs(m->pb->doc_string);
        mp->n_training_info = m->pb->model.n_training;
        mp->training_info = m->pb->model.training;
        mp->n_functions = m->pb->model.n_functions;
        mp->functions = m->pb->model.functions;
        set_unknown(&mp->base, m->pb);
    }
    if (!(mp->graph = graph_to_pb(S, m->graph)))
        return NULL;
    return mp;
}

// Assembles the ModelProto into S->a (reset first). NULL with S->st set on failure.
static Onnx__ModelProto *build(struct saver *S) {
    opq_arena_reset(S->a);
    S->st = OPQ_OK;
    Onnx__ModelProto *mp = model_to_pb(S);
    if (!mp && S->st == OPQ_OK)
        S->st = OPQ_ERR_INTERNAL;
    return mp;
}

enum opq_status opq_model_save_buffer(struct opq_ctx *ctx, const struct opq_model *model,
                                      void **buf, size_t *len) {
    enum opq_status st = OPQ_OK;
    struct saver S;
    if (!model || !buf || !len)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "opq_model_save_buffer: NULL argument");
    *buf = NULL;
    *len = 0;
    memset(&S, 0, sizeof(S));
    S.ctx = ctx;
    S.m = model;
    S.a = opq_arena_new(ctx);
    if (!S.a)
        return opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory serializing the model");
    Onnx__ModelProto *mp = build(&S);
    if (!mp) {
        st = S.st;
        goto out_free_arena;
    }
    size_t size = protobuf_c_message_get_packed_size(&mp->base);
    if (size > inline_limit) {
        st = opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                           "model of %zu bytes exceeds the 2 GiB protobuf limit: save it to a file "
                           "with external data",
                           size);
        goto out_free_arena;
    }
    uint8_t *out = opq_malloc(ctx, size ? size : 1);
    if (!out) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory serializing the model (%zu bytes)",
                           size);
        goto out_free_arena;
    }
    size_t packed = protobuf_c_message_pack(&mp->base, out);
    OPQ_ASSERT(packed == size);
    *buf = out;
    *len = size;
out_free_arena:
    opq_arena_free(S.a);
    return st;
}

void opq_buffer_free(struct opq_ctx *ctx, void *buf) {
    opq_free(ctx, buf);
}

enum opq_status opq_model_clone(struct opq_ctx *ctx, const struct opq_model *model,
                                struct opq_model **out) {
    void *buf = NULL;
    size_t len = 0;
    *out = NULL;
    enum opq_status st = opq_model_save_buffer(ctx, model, &buf, &len);
    if (st == OPQ_OK)
        st = opq_model_load_buffer(ctx, buf, len, model->path, model->dir, out);
    opq_buffer_free(ctx, buf);
    return st;
}

void opq_io_set_inline_limit(size_t bytes) {
    inline_limit = bytes ? bytes : (size_t)INT32_MAX;
}

// A ProtobufCBuffer that streams into a FILE (no in-memory copy of the output).
struct file_sink {
    ProtobufCBuffer base;
    FILE *f;
    bool failed;
};

static void file_sink_append(ProtobufCBuffer *b, size_t len, const uint8_t *data) {
    struct file_sink *s = (struct file_sink *)b;
    if (!s->failed && len && fwrite(data, 1, len, s->f) != len)
        s->failed = true;
}

// Closes f, reporting any buffered write error against `path`.
static enum opq_status close_checked(struct opq_ctx *ctx, FILE *f, bool failed, const char *path) {
    bool bad = failed || fflush(f) != 0 || ferror(f);
    int err = errno;
    if (fclose(f) != 0 && !bad) {
        bad = true;
        err = errno;
    }
    if (bad)
        return opq_set_error(ctx, OPQ_ERR_IO, "%s: write failed: %s", path,
                             err ? strerror(err) : "I/O error");
    return OPQ_OK;
}

enum opq_status opq_model_save(struct opq_ctx *ctx, const struct opq_model *model, const char *path,
                               const struct opq_save_opts *opts) {
    enum opq_status st = OPQ_OK;
    struct saver S;
    char *tmp = NULL;
    char *extpath = NULL;
    FILE *f = NULL;
    int fd = -1;
    if (!model || !path || !*path)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "opq_model_save: NULL argument");
    memset(&S, 0, sizeof(S));
    S.ctx = ctx;
    S.m = model;
    S.external = opts && opts->external_data;
    S.ext_min = opts && opts->external_min_bytes ? opts->external_min_bytes : 1024;
    S.a = opq_arena_new(ctx);
    if (!S.a)
        return opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory serializing the model");

    // Side-file name: given, or "<model file name>.data", next to the model.
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    size_t dlen = (size_t)(base - path);
    const char *ename = opts && opts->external_name ? opts->external_name : NULL;
    if (ename && !location_is_safe(ename)) {
        st = opq_set_error(ctx, OPQ_ERR_USAGE,
                           "external data name '%s' must be a relative path without '..'", ename);
        goto out;
    }
    size_t elen = dlen + (ename ? strlen(ename) : strlen(base) + 5) + 1;
    extpath = opq_malloc(ctx, elen);
    tmp = opq_malloc(ctx, strlen(path) + 16);
    if (!extpath || !tmp) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory saving '%s'", path);
        goto out;
    }
    tmp[0] = '\0'; // no temporary file yet
    if (ename)
        snprintf(extpath, elen, "%.*s%s", (int)dlen, path, ename);
    else
        snprintf(extpath, elen, "%s.data", path);
    S.ext_final = extpath;
    S.ext_location = extpath + dlen;

    Onnx__ModelProto *mp = NULL;
    if (!S.external) {
        if (!(mp = build(&S))) {
            st = S.st;
            goto out;
        }
        size_t size = protobuf_c_message_get_packed_size(&mp->base);
        if (size > inline_limit) {
            opq_log(ctx, OPQ_LOG_WARN,
                    "%s: the model needs %zu bytes, more than the 2 GiB protobuf limit: writing "
                    "weights to external data file '%s'",
                    path, size, S.ext_location);
            S.external = true;
            mp = NULL;
        }
    }
    if (!mp && !(mp = build(&S))) {
        st = S.st;
        goto out;
    }
    if (S.ext_f) {
        st = close_checked(ctx, S.ext_f, false, S.ext_final);
        S.ext_f = NULL;
        if (st != OPQ_OK)
            goto out;
    }

    snprintf(tmp, strlen(path) + 16, "%s.tmp.XXXXXX", path);
    fd = mkstemp(tmp);
    if (fd < 0) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
        tmp[0] = '\0';
        goto out;
    }
    fchmod(fd, 0644);
    if (!(f = fdopen(fd, "wb"))) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto out;
    }
    fd = -1;
    setvbuf(f, NULL, _IOFBF, 1u << 20);
    struct file_sink sink = {{file_sink_append}, f, false};
    protobuf_c_message_pack_to_buffer(&mp->base, &sink.base);
    st = close_checked(ctx, f, sink.failed, path);
    f = NULL;
    if (st != OPQ_OK)
        goto out;
    if (S.ext_tmp && rename(S.ext_tmp, S.ext_final) != 0) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot rename into place: %s", S.ext_final,
                           strerror(errno));
        goto out;
    }
    if (S.ext_tmp) {
        opq_free(ctx, S.ext_tmp);
        S.ext_tmp = NULL;
    }
    if (rename(tmp, path) != 0) {
        st = opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot rename into place: %s", path,
                           strerror(errno));
        goto out;
    }
    tmp[0] = '\0';
out:
    if (S.ext_f)
        fclose(S.ext_f);
    if (S.ext_tmp) {
        unlink(S.ext_tmp);
        opq_free(ctx, S.ext_tmp);
    }
    if (f)
        fclose(f);
    if (fd >= 0)
        close(fd);
    if (tmp && tmp[0] && st != OPQ_OK)
        unlink(tmp);
    opq_free(ctx, tmp);
    opq_free(ctx, extpath);
    opq_arena_free(S.a);
    return st;
}
