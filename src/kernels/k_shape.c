/* k_shape.c: ops that only change the view of a tensor, or read its shape.
 *
 *   Reshape    https://onnx.ai/onnx/operators/onnx__Reshape.html    opsets 5+ (shape input;
 *              0 copies the input dim unless allowzero=1 (14), one -1 is inferred)
 *   Flatten    https://onnx.ai/onnx/operators/onnx__Flatten.html    axis in [-r, r], default 1
 *   Squeeze    https://onnx.ai/onnx/operators/onnx__Squeeze.html    axes attribute (< 13) or input
 *   Unsqueeze  https://onnx.ai/onnx/operators/onnx__Unsqueeze.html  axes attribute (< 13) or input
 *   Shape      https://onnx.ai/onnx/operators/onnx__Shape.html      start/end (15), clamped
 *   Size       https://onnx.ai/onnx/operators/onnx__Size.html       int64 scalar
 *   Expand     https://onnx.ai/onnx/operators/onnx__Expand.html     numpy broadcast with `shape`
 *   Identity, Dropout (inference only: Y = X, mask all true; training_mode=1 is refused)
 *
 * Data is moved as raw bytes, so every non-packed dtype works (packed int4 only where the op is a
 * pure byte copy). VJPs: the view ops pass dY through unchanged (dX = reshape(dY)); Expand sums dY
 * over the broadcast dimensions (dX = sum over expanded axes, accumulated in double). */
#include <string.h>

#include "arena.h"
#include "graph.h"
#include "k_lutil.h"

static enum opq_status need_rank(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *t) {
    if (t->ndim >= 0)
        return OPQ_OK;
    return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": input rank is unknown",
                         OPQ_KL_NODE(n));
}

// Forward of every pure view op: the bytes do not change.
static enum opq_status view_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (!out[0].data)
        return OPQ_OK;
    if (out[0].nbytes != in[0]->nbytes)
        return opq_set_error(k->ctx, OPQ_ERR_INTERNAL, OPQ_KL_NODE_FMT ": %zu bytes in, %zu out",
                             OPQ_KL_NODE(n), in[0]->nbytes, out[0].nbytes);
    if (out[0].data != in[0]->data)
        memcpy(out[0].data, in[0]->data, out[0].nbytes);
    return OPQ_OK;
}

// VJP of every pure view op: dX is dY with the input's shape.
static enum opq_status view_backward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in,
                                     const struct opq_tensor *out, const struct opq_tensor *dout,
                                     struct opq_tensor *din) {
    (void)in;
    (void)out;
    if (!din[0].data)
        return OPQ_OK;
    if (dout[0].data && dout[0].nbytes != din[0].nbytes)
        return opq_set_error(k->ctx, OPQ_ERR_INTERNAL, OPQ_KL_NODE_FMT ": gradient size mismatch",
                             OPQ_KL_NODE(n));
    opq_kl_copy_or_zero(&din[0], &dout[0]);
    return OPQ_OK;
}

static enum opq_status copy_numel(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *x, struct opq_tensor *out) {
    size_t a = 0;
    size_t b = 0;
    if (opq_tensor_numel(x, &a) && opq_tensor_numel(out, &b) && a != b)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                             OPQ_KL_NODE_FMT ": %zu input elements cannot take the new shape of "
                             "%zu elements",
                             OPQ_KL_NODE(n), a, b);
    out->dtype = x->dtype;
    return opq_kl_finish(k, n, out);
}

// ---- Reshape ------------------------------------------------------------------------------------

static enum opq_status reshape_infer(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    int64_t s[OPQ_MAX_DIMS];
    size_t cnt = 0;
    const struct opq_tensor *x = in[0];
    enum opq_status st = need_rank(k, n, x);
    if (!st && n->n_inputs < 2)
        st = opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, OPQ_KL_NODE_FMT ": needs a shape input",
                           OPQ_KL_NODE(n));
    if (!st)
        st = opq_kl_read_ints(k, n, in[1], "shape", s, OPQ_MAX_DIMS, &cnt);
    if (st)
        return st;
    bool allowzero = opq_node_attr_int(n, "allowzero", 0) != 0;
    int infer_at = -1;
    int64_t known = 1;
    bool unknown = false;
    out->ndim = (int)cnt;
    for (int i = 0; i < (int)cnt; i++) {
        int64_t d = s[i];
        if (d == 0 && !allowzero) {
            if (i >= x->ndim)
                return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                     OPQ_KL_NODE_FMT ": shape[%d] = 0 copies a dim the input lacks",
                                     OPQ_KL_NODE(n), i);
            d = x->shape[i];
        } else if (d == -1) {
            if (infer_at >= 0)
                return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": two -1 in shape",
                                     OPQ_KL_NODE(n));
            infer_at = i;
        } else if (d < -1) {
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": shape[%d] = %lld",
                                 OPQ_KL_NODE(n), i, (long long)d);
        }
        out->shape[i] = d;
        if (i != infer_at) {
            if (d < 0)
                unknown = true;
            else
                known *= d;
        }
    }
    if (infer_at >= 0) {
        size_t total = 0;
        if (unknown || !opq_tensor_numel(x, &total)) {
            out->shape[infer_at] = -1;
        } else {
            if (known == 0 || (int64_t)total % known != 0)
                return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                     OPQ_KL_NODE_FMT ": cannot infer -1 (%zu elements over %lld)",
                                     OPQ_KL_NODE(n), total, (long long)known);
            out->shape[infer_at] = (int64_t)total / known;
        }
    }
    return copy_numel(k, n, x, out);
}

const struct opq_kernel opq_kernel_reshape = {
    .min_opset = 5,
    .infer     = reshape_infer,
    .forward   = view_forward,
    .backward  = view_backward,
};

// ---- Flatten ------------------------------------------------------------------------------------

static enum opq_status flatten_infer(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    const struct opq_tensor *x = in[0];
    enum opq_status st = need_rank(k, n, x);
    if (st)
        return st;
    int64_t axis = opq_node_attr_int(n, "axis", 1);
    if (axis < 0)
        axis += x->ndim;
    if (axis < 0 || axis > x->ndim)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": axis out of range",
                             OPQ_KL_NODE(n));
    int64_t a = 1;
    int64_t b = 1;
    for (int d = 0; d < x->ndim; d++) {
        int64_t *p = d < axis ? &a : &b;
        *p = (*p < 0 || x->shape[d] < 0) ? -1 : *p * x->shape[d];
    }
    out->ndim = 2;
    out->shape[0] = a;
    out->shape[1] = b;
    return copy_numel(k, n, x, out);
}

const struct opq_kernel opq_kernel_flatten = {
    .infer    = flatten_infer,
    .forward  = view_forward,
    .backward = view_backward,
};

// ---- Squeeze / Unsqueeze ------------------------------------------------------------------------

// Axes from the attribute (opset < 13) or the second input; *given = false if neither.
static enum opq_status get_axes(struct opq_kctx *k, const struct opq_node *n,
                                const struct opq_tensor *const *in, int64_t *axes, size_t *cnt,
                                bool *given) {
    if (n->n_inputs > 1 && in[1]) {
        *given = true;
        return opq_kl_read_ints(k, n, in[1], "axes", axes, OPQ_MAX_DIMS, cnt);
    }
    return opq_kl_attr_ints(k, n, "axes", axes, OPQ_MAX_DIMS, cnt, given);
}

static enum opq_status squeeze_infer(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    const struct opq_tensor *x = in[0];
    int64_t axes[OPQ_MAX_DIMS];
    size_t cnt = 0;
    bool given = false;
    bool drop[OPQ_MAX_DIMS] = {false};
    enum opq_status st = need_rank(k, n, x);
    if (!st)
        st = get_axes(k, n, in, axes, &cnt, &given);
    if (st)
        return st;
    if (!given || cnt == 0) {
        for (int d = 0; d < x->ndim; d++) {
            if (x->shape[d] < 0)
                return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                                     OPQ_KL_NODE_FMT ": no axes and dim %d is unknown",
                                     OPQ_KL_NODE(n), d);
            drop[d] = x->shape[d] == 1;
        }
    }
    for (size_t i = 0; i < cnt; i++) {
        int a = 0;
        if (!opq_axis_norm(axes[i], x->ndim, &a))
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": axis %lld out of range",
                                 OPQ_KL_NODE(n), (long long)axes[i]);
        if (x->shape[a] != 1 && x->shape[a] != -1)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 OPQ_KL_NODE_FMT ": cannot squeeze axis %d of size %lld",
                                 OPQ_KL_NODE(n), a, (long long)x->shape[a]);
        drop[a] = true;
    }
    out->ndim = 0;
    for (int d = 0; d < x->ndim; d++)
        if (!drop[d])
            out->shape[out->ndim++] = x->shape[d];
    return copy_numel(k, n, x, out);
}

const struct opq_kernel opq_kernel_squeeze = {
    .infer    = squeeze_infer,
    .forward  = view_forward,
    .backward = view_backward,
};

static enum opq_status unsqueeze_infer(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in, struct opq_tensor *out) {
    const struct opq_tensor *x = in[0];
    int64_t axes[OPQ_MAX_DIMS];
    size_t cnt = 0;
    bool given = false;
    bool ins[OPQ_MAX_DIMS] = {false};
    enum opq_status st = need_rank(k, n, x);
    if (!st)
        st = get_axes(k, n, in, axes, &cnt, &given);
    if (st)
        return st;
    int r = x->ndim + (int)cnt;
    if (!given || r > OPQ_MAX_DIMS)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                             OPQ_KL_NODE_FMT ": needs axes, and rank %d must be <= %d",
                             OPQ_KL_NODE(n), r, OPQ_MAX_DIMS);
    for (size_t i = 0; i < cnt; i++) {
        int a = 0;
        if (!opq_axis_norm(axes[i], r, &a) || ins[a])
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 OPQ_KL_NODE_FMT ": axis %lld out of range or repeated",
                                 OPQ_KL_NODE(n), (long long)axes[i]);
        ins[a] = true;
    }
    out->ndim = r;
    for (int d = 0, j = 0; d < r; d++)
        out->shape[d] = ins[d] ? 1 : x->shape[j++];
    return copy_numel(k, n, x, out);
}

const struct opq_kernel opq_kernel_unsqueeze = {
    .infer    = unsqueeze_infer,
    .forward  = view_forward,
    .backward = view_backward,
};

// ---- Identity / Dropout -------------------------------------------------------------------------

static enum opq_status identity_infer(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out) {
    out[0].dtype = in[0]->dtype;
    out[0].ndim = in[0]->ndim;
    memcpy(out[0].shape, in[0]->shape, sizeof(out[0].shape));
    return opq_kl_finish(k, n, &out[0]);
}

const struct opq_kernel opq_kernel_identity = {
    .infer    = identity_infer,
    .forward  = view_forward,
    .backward = view_backward,
};

static enum opq_status dropout_infer(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (n->n_inputs > 2 && in[2]) {
        const struct opq_tensor *tm = in[2];
        if (!tm->data || opq_kl_numel(tm) != 1)
            return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                                 OPQ_KL_NODE_FMT ": training_mode must be a constant scalar",
                                 OPQ_KL_NODE(n));
        double ratio = 0.5;
        if (n->n_inputs > 1 && in[1] && in[1]->data && opq_kl_numel(in[1]) == 1)
            ratio = opq_kl_get_f64(in[1]->data, in[1]->dtype, 0);
        if (opq_kl_get_i64(tm->data, tm->dtype, 0) != 0 && ratio != 0.0)
            return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                                 OPQ_KL_NODE_FMT ": training-mode dropout is not supported",
                                 OPQ_KL_NODE(n));
    }
    enum opq_status st = identity_infer(k, n, in, out);
    if (!st && n->n_outputs > 1 && n->outputs[1]) {
        out[1].dtype = OPQ_DTYPE_BOOL;
        out[1].ndim = in[0]->ndim;
        memcpy(out[1].shape, in[0]->shape, sizeof(out[1].shape));
        st = opq_kl_finish(k, n, &out[1]);
    }
    return st;
}

static enum opq_status dropout_forward(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in, struct opq_tensor *out) {
    enum opq_status st = view_forward(k, n, in, out);
    if (!st && n->n_outputs > 1 && out[1].data)
        memset(out[1].data, 1, out[1].nbytes);
    return st;
}

const struct opq_kernel opq_kernel_dropout = {
    .infer    = dropout_infer,
    .forward  = dropout_forward,
    .backward = view_backward,
};

// ---- Shape / Size -------------------------------------------------------------------------------

static void shape_range(const struct opq_node *n, int r, int64_t *s, int64_t *e) {
    int64_t start = opq_node_attr_int(n, "start", 0);
    int64_t end = opq_node_attr_int(n, "end", r);
    if (start < 0)
        start += r;
    if (end < 0)
        end += r;
    start = start < 0 ? 0 : (start > r ? r : start);
    end = end < 0 ? 0 : (end > r ? r : end);
    *s = start;
    *e = end > start ? end : start;
}

static enum opq_status shape_infer(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    int64_t s = 0;
    int64_t e = 0;
    enum opq_status st = need_rank(k, n, in[0]);
    if (st)
        return st;
    shape_range(n, in[0]->ndim, &s, &e);
    out->dtype = OPQ_DTYPE_INT64;
    out->ndim = 1;
    out->shape[0] = e - s;
    return opq_kl_finish(k, n, out);
}

static enum opq_status shape_forward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    int64_t s = 0;
    int64_t e = 0;
    shape_range(n, in[0]->ndim, &s, &e);
    for (int64_t i = s; i < e; i++) {
        if (in[0]->shape[i] < 0)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": dim %lld is unknown",
                                 OPQ_KL_NODE(n), (long long)i);
        ((int64_t *)out->data)[i - s] = in[0]->shape[i];
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_shape = {
    .infer   = shape_infer,
    .forward = shape_forward,
};

static enum opq_status size_infer(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)in;
    out->dtype = OPQ_DTYPE_INT64;
    out->ndim = 0;
    return opq_kl_finish(k, n, out);
}

static enum opq_status size_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    size_t cnt = 0;
    if (!opq_tensor_numel(in[0], &cnt))
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": input shape is unknown",
                             OPQ_KL_NODE(n));
    *(int64_t *)out->data = (int64_t)cnt;
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_size = {
    .infer   = size_infer,
    .forward = size_forward,
};

// ---- Expand -------------------------------------------------------------------------------------

static enum opq_status expand_infer(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct opq_tensor s = {0};
    size_t cnt = 0;
    enum opq_status st = need_rank(k, n, in[0]);
    if (!st && n->n_inputs < 2)
        st = opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, OPQ_KL_NODE_FMT ": needs a shape input",
                           OPQ_KL_NODE(n));
    if (!st)
        st = opq_kl_read_ints(k, n, in[1], "shape", s.shape, OPQ_MAX_DIMS, &cnt);
    if (st)
        return st;
    s.ndim = (int)cnt;
    const struct opq_tensor *ts[2] = {in[0], &s};
    st = opq_kl_broadcast(k, n, ts, 2, out);
    if (st)
        return st;
    if (opq_dtype_is_packed4(in[0]->dtype) || in[0]->dtype == OPQ_DTYPE_STRING)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": dtype %s",
                             OPQ_KL_NODE(n), opq_dtype_name(in[0]->dtype));
    out->dtype = in[0]->dtype;
    return opq_kl_finish(k, n, out);
}

static enum opq_status expand_forward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    struct opq_kl_iter it;
    size_t es = opq_dtype_size(in[0]->dtype);
    size_t total = opq_kl_numel(out);
    const char *src = in[0]->data;
    char *dst = out->data;
    opq_kl_iter_init(&it, out->ndim, out->shape, 1, in);
    for (size_t i = 0; i < total; i++, opq_kl_iter_next(&it))
        memcpy(dst + i * es, src + (size_t)it.off[0] * es, es);
    return OPQ_OK;
}

static enum opq_status expand_backward(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in,
                                       const struct opq_tensor *out, const struct opq_tensor *dout,
                                       struct opq_tensor *din) {
    if (!din[0].data)
        return OPQ_OK;
    size_t m = opq_kl_numel(in[0]);
    if (!dout[0].data) {
        memset(din[0].data, 0, din[0].nbytes);
        return OPQ_OK;
    }
    if (in[0]->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": gradient of %s",
                             OPQ_KL_NODE(n), opq_dtype_name(in[0]->dtype));
    double *acc = opq_arena_alloc(k->scratch, (m ? m : 1) * sizeof(double));
    if (!acc)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, OPQ_KL_NODE_FMT ": out of memory",
                             OPQ_KL_NODE(n));
    struct opq_kl_iter it;
    size_t total = opq_kl_numel(out);
    const float *g = dout[0].data;
    opq_kl_iter_init(&it, out->ndim, out->shape, 1, in);
    for (size_t i = 0; i < total; i++, opq_kl_iter_next(&it))
        acc[it.off[0]] += (double)g[i];
    float *dx = din[0].data;
    for (size_t i = 0; i < m; i++)
        dx[i] = (float)acc[i];
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_expand = {
    .min_opset = 8,
    .infer     = expand_infer,
    .forward   = expand_forward,
    .backward  = expand_backward,
};
