/* k_lutil.c: helpers shared by the shape/layout/logic/cast/einsum/QDQ kernels (see k_lutil.h).
 *
 * float16 and bfloat16 conversions round to nearest, ties to even, and keep NaN/Inf; they are
 * written here (no compiler _Float16) so results are the same on every platform. */
#include <math.h>
#include <string.h>

#include "graph.h"
#include "k_lutil.h"

const char *opq_kl_label(const struct opq_node *n) {
    if (n->name && n->name[0])
        return n->name;
    for (int i = 0; n->outputs && i < n->n_outputs; i++)
        if (n->outputs[i] && n->outputs[i]->name)
            return n->outputs[i]->name;
    return "";
}

size_t opq_kl_numel(const struct opq_tensor *t) {
    size_t n = 0;
    return opq_tensor_numel(t, &n) ? n : 0;
}

bool opq_kl_set_nbytes(struct opq_tensor *t) {
    size_t numel = 0;
    t->nbytes = 0;
    if (!opq_tensor_numel(t, &numel))
        return true; // unknown dims: size decided later
    if (t->dtype == OPQ_DTYPE_STRING)
        return opq_mul_size(numel, sizeof(struct opq_bytes), &t->nbytes);
    return opq_dtype_nbytes(t->dtype, numel, &t->nbytes);
}

enum opq_status opq_kl_finish(struct opq_kctx *k, const struct opq_node *n, struct opq_tensor *out) {
    if (!opq_kl_set_nbytes(out))
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": output size overflows",
                             OPQ_KL_NODE(n));
    return OPQ_OK;
}

enum opq_status opq_kl_need_data(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *t, const char *what) {
    size_t cnt = 1;
    if (t && (t->data || (opq_tensor_numel(t, &cnt) && cnt == 0)))
        return OPQ_OK; // an empty list needs no bytes
    return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                         OPQ_KL_NODE_FMT ": shape input computed at run time is not supported "
                         "('%s' must be constant or computable at plan time)",
                         OPQ_KL_NODE(n), what);
}

bool opq_kl_dtype_is_int(enum opq_dtype dt) {
    switch (dt) {
    case OPQ_DTYPE_UINT8: case OPQ_DTYPE_INT8: case OPQ_DTYPE_UINT16: case OPQ_DTYPE_INT16:
    case OPQ_DTYPE_INT32: case OPQ_DTYPE_INT64: case OPQ_DTYPE_BOOL: case OPQ_DTYPE_UINT32:
    case OPQ_DTYPE_UINT64:
        return true;
    default:
        return false;
    }
}

bool opq_kl_dtype_is_float(enum opq_dtype dt) {
    return dt == OPQ_DTYPE_FLOAT || dt == OPQ_DTYPE_FLOAT16 || dt == OPQ_DTYPE_BFLOAT16 ||
           dt == OPQ_DTYPE_DOUBLE;
}

enum opq_status opq_kl_read_ints(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *t, const char *what, int64_t *dst,
                                 size_t max, size_t *count) {
    enum opq_status st = opq_kl_need_data(k, n, t, what);
    if (st)
        return st;
    if (!opq_kl_dtype_is_int(t->dtype))
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": %s must be integer, not %s",
                             OPQ_KL_NODE(n), what, opq_dtype_name(t->dtype));
    size_t cnt = opq_kl_numel(t);
    if (t->ndim > 1 || cnt > max)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                             OPQ_KL_NODE_FMT ": %s must be a 1-D list of at most %zu values",
                             OPQ_KL_NODE(n), what, max);
    for (size_t i = 0; i < cnt; i++)
        dst[i] = opq_kl_get_i64(t->data, t->dtype, i);
    *count = cnt;
    return OPQ_OK;
}

enum opq_status opq_kl_attr_ints(struct opq_kctx *k, const struct opq_node *n, const char *name,
                                 int64_t *dst, size_t max, size_t *count, bool *present) {
    const struct opq_attr *a = opq_node_attr(n, name);
    *count = 0;
    if (present)
        *present = a != NULL;
    if (!a)
        return OPQ_OK;
    if (a->type == OPQ_ATTR_INT && max >= 1) { // tolerate a scalar where a list is expected
        dst[0] = a->i;
        *count = 1;
        return OPQ_OK;
    }
    if (a->type != OPQ_ATTR_INTS || a->n < 0 || (size_t)a->n > max)
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL,
                             OPQ_KL_NODE_FMT ": attribute '%s' must be a list of at most %zu ints",
                             OPQ_KL_NODE(n), name, max);
    for (int i = 0; i < a->n; i++)
        dst[i] = a->ints[i];
    *count = (size_t)a->n;
    return OPQ_OK;
}

// ---- element access -----------------------------------------------------------------------------

uint16_t opq_kl_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)
        return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (ax >= 0x477ff000u) // >= 65520 rounds to infinity
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { // half subnormal: units of 2^-24, scaling by 2^24 is exact
        float a = fabsf(f) * 16777216.0f;
        return (uint16_t)(sign | (uint32_t)nearbyintf(a));
    }
    uint32_t e = (ax >> 23) - 127 + 15;
    uint32_t m = ax & 0x7fffffu;
    uint32_t h = (e << 10) | (m >> 13);
    uint32_t rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}

float opq_kl_f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    uint32_t x;
    float f;
    if (e == 0) {
        f = (float)m * 5.9604644775390625e-8f; // 2^-24
        return sign ? -f : f;
    }
    if (e == 31)
        x = sign | 0x7f800000u | (m << 13);
    else
        x = sign | ((e - 15 + 127) << 23) | (m << 13);
    memcpy(&f, &x, 4);
    return f;
}

uint16_t opq_kl_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40u); // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

float opq_kl_bf16_to_f32(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

int64_t opq_kl_get_i64(const void *p, enum opq_dtype dt, size_t i) {
    switch (dt) {
    case OPQ_DTYPE_UINT8: case OPQ_DTYPE_BOOL: return ((const uint8_t *)p)[i];
    case OPQ_DTYPE_INT8:   return ((const int8_t *)p)[i];
    case OPQ_DTYPE_UINT16: return ((const uint16_t *)p)[i];
    case OPQ_DTYPE_INT16:  return ((const int16_t *)p)[i];
    case OPQ_DTYPE_INT32:  return ((const int32_t *)p)[i];
    case OPQ_DTYPE_INT64:  return ((const int64_t *)p)[i];
    case OPQ_DTYPE_UINT32: return ((const uint32_t *)p)[i];
    case OPQ_DTYPE_UINT64: return (int64_t)((const uint64_t *)p)[i];
    default: {
        double v = opq_kl_get_f64(p, dt, i);
        if (!(v == v) || v >= 9.2233720368547758e18 || v < -9.2233720368547758e18)
            return INT64_MIN; // NaN/out of range: like the x86 conversion result
        return (int64_t)v;
    }
    }
}

double opq_kl_get_f64(const void *p, enum opq_dtype dt, size_t i) {
    switch (dt) {
    case OPQ_DTYPE_FLOAT:    return (double)((const float *)p)[i];
    case OPQ_DTYPE_DOUBLE:   return ((const double *)p)[i];
    case OPQ_DTYPE_FLOAT16:  return (double)opq_kl_f16_to_f32(((const uint16_t *)p)[i]);
    case OPQ_DTYPE_BFLOAT16: return (double)opq_kl_bf16_to_f32(((const uint16_t *)p)[i]);
    case OPQ_DTYPE_UINT64:   return (double)((const uint64_t *)p)[i];
    default:                 return (double)opq_kl_get_i64(p, dt, i);
    }
}

void opq_kl_set_i64(void *p, enum opq_dtype dt, size_t i, int64_t v) {
    switch (dt) {
    case OPQ_DTYPE_UINT8:  ((uint8_t *)p)[i] = (uint8_t)v; break;
    case OPQ_DTYPE_BOOL:   ((uint8_t *)p)[i] = v != 0; break;
    case OPQ_DTYPE_INT8:   ((int8_t *)p)[i] = (int8_t)v; break;
    case OPQ_DTYPE_UINT16: ((uint16_t *)p)[i] = (uint16_t)v; break;
    case OPQ_DTYPE_INT16:  ((int16_t *)p)[i] = (int16_t)v; break;
    case OPQ_DTYPE_INT32:  ((int32_t *)p)[i] = (int32_t)v; break;
    case OPQ_DTYPE_INT64:  ((int64_t *)p)[i] = v; break;
    case OPQ_DTYPE_UINT32: ((uint32_t *)p)[i] = (uint32_t)v; break;
    case OPQ_DTYPE_UINT64: ((uint64_t *)p)[i] = (uint64_t)v; break;
    default:               opq_kl_set_f64(p, dt, i, (double)v); break;
    }
}

void opq_kl_set_f64(void *p, enum opq_dtype dt, size_t i, double v) {
    switch (dt) {
    case OPQ_DTYPE_FLOAT:    ((float *)p)[i] = (float)v; break;
    case OPQ_DTYPE_DOUBLE:   ((double *)p)[i] = v; break;
    case OPQ_DTYPE_FLOAT16:  ((uint16_t *)p)[i] = opq_kl_f32_to_f16((float)v); break;
    case OPQ_DTYPE_BFLOAT16: ((uint16_t *)p)[i] = opq_kl_f32_to_bf16((float)v); break;
    case OPQ_DTYPE_BOOL:     ((uint8_t *)p)[i] = v != 0.0; break;
    default: {
        int64_t iv = INT64_MIN;
        if (v == v && v < 9.2233720368547758e18 && v >= -9.2233720368547758e18)
            iv = (int64_t)v; // truncation toward zero, like numpy astype
        opq_kl_set_i64(p, dt, i, iv);
        break;
    }
    }
}

// ---- broadcasting -------------------------------------------------------------------------------

void opq_kl_strides(int ndim, const int64_t *shape, int64_t *strides) {
    int64_t s = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        strides[d] = s;
        s *= shape[d];
    }
}

void opq_kl_bstrides(const struct opq_tensor *t, int ndim, const int64_t *oshape, int64_t *strides) {
    int64_t own[OPQ_MAX_DIMS];
    opq_kl_strides(t->ndim, t->shape, own);
    int off = ndim - t->ndim;
    for (int d = 0; d < ndim; d++) {
        int sd = d - off;
        strides[d] = (sd < 0 || t->shape[sd] == 1 || oshape[d] == 1) ? 0 : own[sd];
    }
}

enum opq_status opq_kl_broadcast(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *ts, int count,
                                 struct opq_tensor *out) {
    int nd = 0;
    for (int j = 0; j < count; j++) {
        if (ts[j]->ndim < 0) {
            out->ndim = -1;
            return OPQ_OK;
        }
        nd = ts[j]->ndim > nd ? ts[j]->ndim : nd;
    }
    out->ndim = nd;
    for (int d = 0; d < nd; d++) {
        int64_t v = 1;
        for (int j = 0; j < count; j++) {
            int sd = d - (nd - ts[j]->ndim);
            if (sd < 0)
                continue;
            int64_t s = ts[j]->shape[sd];
            if (s == 1)
                continue;
            if (v == 1 || (v == -1 && s > 1))
                v = s;
            else if (s != v && s != -1)
                return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                     OPQ_KL_NODE_FMT ": inputs cannot be broadcast (dim %d: %lld "
                                     "vs %lld)",
                                     OPQ_KL_NODE(n), d, (long long)v, (long long)s);
        }
        out->shape[d] = v;
    }
    return OPQ_OK;
}

void opq_kl_iter_init(struct opq_kl_iter *it, int ndim, const int64_t *shape, int n_in,
                      const struct opq_tensor *const *ins) {
    memset(it, 0, sizeof(*it));
    it->ndim = ndim;
    it->n_in = n_in;
    memcpy(it->shape, shape, (size_t)ndim * sizeof(int64_t));
    for (int j = 0; j < n_in; j++)
        opq_kl_bstrides(ins[j], ndim, shape, it->strides[j]);
}

void opq_kl_iter_next(struct opq_kl_iter *it) {
    for (int d = it->ndim - 1; d >= 0; d--) {
        it->idx[d]++;
        for (int j = 0; j < it->n_in; j++)
            it->off[j] += it->strides[j][d];
        if (it->idx[d] < it->shape[d])
            return;
        for (int j = 0; j < it->n_in; j++)
            it->off[j] -= it->strides[j][d] * it->shape[d];
        it->idx[d] = 0;
    }
}

void opq_kl_copy_or_zero(struct opq_tensor *dst, const struct opq_tensor *src) {
    if (!dst->data)
        return;
    if (src && src->data && src->nbytes == dst->nbytes)
        memcpy(dst->data, src->data, dst->nbytes);
    else
        memset(dst->data, 0, dst->nbytes);
}
