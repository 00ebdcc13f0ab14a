/* k_cast.c: dtype conversion and tensors made from attributes or scalars.
 *
 *   Cast            https://onnx.ai/onnx/operators/onnx__Cast.html  between float32, float16,
 *                   bfloat16, double, int8/16/32/64, uint8/16/32/64 and bool. Floating to
 *                   integer truncates toward zero (numpy astype); to float16/bfloat16 rounds to
 *                   nearest even; to bool is x != 0. Strings and float8/int4 are refused.
 *   Constant        https://onnx.ai/onnx/operators/onnx__Constant.html  value, value_float(s),
 *                   value_int(s); value_string(s) and sparse_value are refused
 *   ConstantOfShape https://onnx.ai/onnx/operators/onnx__ConstantOfShape.html  value default 0.0f
 *   Range           https://onnx.ai/onnx/operators/onnx__Range.html  n = max(ceil((limit-start)/
 *                   delta), 0), y[i] = start + i*delta
 * Cast's VJP (float to float types only) is a cast back; the others have no inputs to
 * differentiate. */
#include <math.h>
#include <string.h>

#include "graph.h"
#include "k_lutil.h"

static bool cast_ok(enum opq_dtype dt) {
    return opq_kl_dtype_is_int(dt) || opq_kl_dtype_is_float(dt);
}

static enum opq_status cast_infer(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct opq_tensor *out) {
    const struct opq_attr *to = opq_node_attr(n, "to");
    if (!to || to->type != OPQ_ATTR_INT)
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, OPQ_KL_NODE_FMT ": needs attribute 'to'",
                             OPQ_KL_NODE(n));
    enum opq_dtype dt = (enum opq_dtype)to->i;
    if (to->i <= 0 || to->i >= OPQ_DTYPE_COUNT || !cast_ok(dt) || !cast_ok(in[0]->dtype))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             OPQ_KL_NODE_FMT ": cast from %s to %s is not supported",
                             OPQ_KL_NODE(n), opq_dtype_name(in[0]->dtype),
                             opq_dtype_name((enum opq_dtype)to->i));
    *out = *in[0];
    out->data = NULL;
    out->dtype = dt;
    return opq_kl_finish(k, n, out);
}

static void convert(const void *src, enum opq_dtype sdt, void *dst, enum opq_dtype ddt,
                    size_t cnt) {
    if (sdt == ddt) {
        memcpy(dst, src, cnt * opq_dtype_size(sdt));
        return;
    }
    bool via_int = opq_kl_dtype_is_int(sdt) && (opq_kl_dtype_is_int(ddt) || ddt == OPQ_DTYPE_BOOL);
    for (size_t i = 0; i < cnt; i++) {
        if (via_int)
            opq_kl_set_i64(dst, ddt, i, opq_kl_get_i64(src, sdt, i));
        else if (sdt == OPQ_DTYPE_FLOAT && ddt == OPQ_DTYPE_FLOAT16)
            ((uint16_t *)dst)[i] = opq_kl_f32_to_f16(((const float *)src)[i]);
        else
            opq_kl_set_f64(dst, ddt, i, opq_kl_get_f64(src, sdt, i));
    }
}

static enum opq_status cast_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    convert(in[0]->data, in[0]->dtype, out->data, out->dtype, opq_kl_numel(out));
    return OPQ_OK;
}

static enum opq_status cast_backward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in,
                                     const struct opq_tensor *out, const struct opq_tensor *dout,
                                     struct opq_tensor *din) {
    if (!din[0].data)
        return OPQ_OK;
    if (!opq_kl_dtype_is_float(in[0]->dtype) || !opq_kl_dtype_is_float(out[0].dtype))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             OPQ_KL_NODE_FMT ": gradient through a cast to %s",
                             OPQ_KL_NODE(n), opq_dtype_name(out[0].dtype));
    if (!dout[0].data) {
        memset(din[0].data, 0, din[0].nbytes);
        return OPQ_OK;
    }
    // Gradients are float32 buffers shaped like the values they belong to.
    convert(dout[0].data, OPQ_DTYPE_FLOAT, din[0].data, OPQ_DTYPE_FLOAT, opq_kl_numel(in[0]));
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_cast = {
    .min_opset = 6,
    .infer     = cast_infer,
    .forward   = cast_forward,
    .backward  = cast_backward,
};

// ---- Constant -----------------------------------------------------------------------------------

// The tensor a Constant node holds, described (shape/dtype) into *t with data pointing at the
// attribute's storage (borrowed from the graph arena).
static enum opq_status constant_value(struct opq_kctx *k, const struct opq_node *n,
                                      struct opq_tensor *t) {
    memset(t, 0, sizeof(*t));
    for (int i = 0; i < n->n_attrs; i++) {
        const struct opq_attr *a = &n->attrs[i];
        if (strcmp(a->name, "value") == 0 && a->type == OPQ_ATTR_TENSOR && a->t) {
            *t = *a->t;
            if (t->dtype == OPQ_DTYPE_STRING)
                break;
            return OPQ_OK;
        }
        if (strcmp(a->name, "value_float") == 0 && a->type == OPQ_ATTR_FLOAT) {
            t->dtype = OPQ_DTYPE_FLOAT;
            t->data = (void *)&a->f;
            return OPQ_OK;
        }
        if (strcmp(a->name, "value_int") == 0 && a->type == OPQ_ATTR_INT) {
            t->dtype = OPQ_DTYPE_INT64;
            t->data = (void *)&a->i;
            return OPQ_OK;
        }
        if (strcmp(a->name, "value_floats") == 0 && a->type == OPQ_ATTR_FLOATS) {
            t->dtype = OPQ_DTYPE_FLOAT;
            t->ndim = 1;
            t->shape[0] = a->n;
            t->data = a->floats;
            return OPQ_OK;
        }
        if (strcmp(a->name, "value_ints") == 0 && a->type == OPQ_ATTR_INTS) {
            t->dtype = OPQ_DTYPE_INT64;
            t->ndim = 1;
            t->shape[0] = a->n;
            t->data = a->ints;
            return OPQ_OK;
        }
    }
    return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                         OPQ_KL_NODE_FMT ": needs a numeric value, value_float(s) or value_int(s) "
                         "attribute (strings and sparse values are not supported)",
                         OPQ_KL_NODE(n));
}

static enum opq_status constant_infer(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)in;
    struct opq_tensor t;
    enum opq_status st = constant_value(k, n, &t);
    if (st)
        return st;
    *out = t;
    out->data = NULL;
    return opq_kl_finish(k, n, out);
}

static enum opq_status constant_forward(struct opq_kctx *k, const struct opq_node *n,
                                        const struct opq_tensor *const *in,
                                        struct opq_tensor *out) {
    (void)in;
    struct opq_tensor t;
    enum opq_status st = constant_value(k, n, &t);
    if (st)
        return st;
    if (out->nbytes && (!t.data || (t.nbytes && t.nbytes < out->nbytes)))
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL,
                             OPQ_KL_NODE_FMT ": value holds less data than its shape", OPQ_KL_NODE(n));
    if (out->nbytes)
        memcpy(out->data, t.data, out->nbytes);
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_constant = {
    .infer   = constant_infer,
    .forward = constant_forward,
};

// ---- ConstantOfShape ----------------------------------------------------------------------------

static enum opq_status cos_value(struct opq_kctx *k, const struct opq_node *n,
                                 struct opq_tensor *v) {
    static const float zero = 0.0f;
    const struct opq_attr *a = opq_node_attr(n, "value");
    memset(v, 0, sizeof(*v));
    v->dtype = OPQ_DTYPE_FLOAT;
    v->data = (void *)&zero;
    if (!a)
        return OPQ_OK;
    if (a->type != OPQ_ATTR_TENSOR || !a->t || !a->t->data || opq_kl_numel(a->t) != 1 ||
        opq_dtype_size(a->t->dtype) == 0)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             OPQ_KL_NODE_FMT ": value must be a one-element numeric tensor",
                             OPQ_KL_NODE(n));
    *v = *a->t;
    return OPQ_OK;
}

static enum opq_status cos_infer(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct opq_tensor v;
    size_t cnt = 0;
    enum opq_status st = cos_value(k, n, &v);
    if (!st)
        st = opq_kl_read_ints(k, n, in[0], "shape", out->shape, OPQ_MAX_DIMS, &cnt);
    if (st)
        return st;
    out->ndim = (int)cnt;
    out->dtype = v.dtype;
    for (size_t i = 0; i < cnt; i++)
        if (out->shape[i] < 0)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": negative dim",
                                 OPQ_KL_NODE(n));
    return opq_kl_finish(k, n, out);
}

static enum opq_status cos_forward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)in;
    struct opq_tensor v;
    enum opq_status st = cos_value(k, n, &v);
    if (st)
        return st;
    size_t es = opq_dtype_size(v.dtype);
    size_t total = opq_kl_numel(out);
    for (size_t i = 0; i < total; i++)
        memcpy((char *)out->data + i * es, v.data, es);
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_constantofshape = {
    .min_opset = 9,
    .infer     = cos_infer,
    .forward   = cos_forward,
};

// ---- Range --------------------------------------------------------------------------------------

static enum opq_status range_args(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, double *v, size_t *count) {
    static const char *names[3] = {"start", "limit", "delta"};
    for (int j = 0; j < 3; j++) {
        enum opq_status st = opq_kl_need_data(k, n, in[j], names[j]);
        if (st)
            return st;
        if (opq_kl_numel(in[j]) != 1 || in[j]->dtype != in[0]->dtype)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 OPQ_KL_NODE_FMT ": %s must be a scalar of the start's dtype",
                                 OPQ_KL_NODE(n), names[j]);
        v[j] = opq_kl_get_f64(in[j]->data, in[j]->dtype, 0);
    }
    if (v[2] == 0.0)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": delta is 0", OPQ_KL_NODE(n));
    double cnt = ceil((v[1] - v[0]) / v[2]);
    if (!(cnt < 1e12))
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": too many elements",
                             OPQ_KL_NODE(n));
    *count = cnt > 0.0 ? (size_t)cnt : 0;
    return OPQ_OK;
}

static enum opq_status range_infer(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    double v[3];
    size_t cnt = 0;
    enum opq_dtype dt = in[0]->dtype;
    if (dt != OPQ_DTYPE_FLOAT && dt != OPQ_DTYPE_DOUBLE && dt != OPQ_DTYPE_INT16 &&
        dt != OPQ_DTYPE_INT32 && dt != OPQ_DTYPE_INT64)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": dtype %s",
                             OPQ_KL_NODE(n), opq_dtype_name(dt));
    enum opq_status st = range_args(k, n, in, v, &cnt);
    if (st)
        return st;
    out->dtype = dt;
    out->ndim = 1;
    out->shape[0] = (int64_t)cnt;
    return opq_kl_finish(k, n, out);
}

static enum opq_status range_forward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    double v[3];
    size_t cnt = 0;
    enum opq_status st = range_args(k, n, in, v, &cnt);
    if (st)
        return st;
    enum opq_dtype dt = out->dtype;
    if (opq_kl_dtype_is_int(dt)) {
        int64_t s = opq_kl_get_i64(in[0]->data, dt, 0);
        int64_t d = opq_kl_get_i64(in[2]->data, dt, 0);
        for (size_t i = 0; i < cnt; i++)
            opq_kl_set_i64(out->data, dt, i, s + (int64_t)i * d);
    } else if (dt == OPQ_DTYPE_FLOAT) {
        // Accumulate in the output type like the ONNX reference loop (start += delta).
        float s = (float)v[0];
        float d = (float)v[2];
        for (size_t i = 0; i < cnt; i++, s += d)
            ((float *)out->data)[i] = s;
    } else {
        double s = v[0];
        for (size_t i = 0; i < cnt; i++, s += v[2])
            ((double *)out->data)[i] = s;
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_range = {
    .min_opset = 11,
    .infer     = range_infer,
    .forward   = range_forward,
};
