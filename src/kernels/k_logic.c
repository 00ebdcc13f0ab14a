/* k_logic.c: comparisons, boolean logic and selection, with numpy broadcasting.
 *
 *   Equal/Less/Greater https://onnx.ai/onnx/operators/onnx__Equal.html (and Less, Greater):
 *            bool output; integer inputs compare exactly as int64, floating inputs as double
 *   Not, And https://onnx.ai/onnx/operators/onnx__And.html: bool tensors
 *   Where    https://onnx.ai/onnx/operators/onnx__Where.html: Y = cond ? X : Y, 3-way broadcast
 *
 * None of these is differentiable w.r.t. its bool/compare inputs. Where's VJP routes dY to the
 * selected branch (dX = cond ? dY : 0, dY2 = cond ? 0 : dY), summed over broadcast dimensions. */
#include <string.h>

#include "arena.h"
#include "k_lutil.h"

static enum opq_status bad_dtype(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *t) {
    return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": dtype %s not supported",
                         OPQ_KL_NODE(n), opq_dtype_name(t->dtype));
}

static bool numeric(enum opq_dtype dt) {
    return opq_kl_dtype_is_int(dt) || opq_kl_dtype_is_float(dt);
}

enum cmp_kind { CMP_EQ, CMP_LT, CMP_GT };

static enum opq_status cmp_infer(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (!numeric(in[0]->dtype))
        return bad_dtype(k, n, in[0]);
    if (in[1]->dtype != in[0]->dtype)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": inputs differ in dtype",
                             OPQ_KL_NODE(n));
    enum opq_status st = opq_kl_broadcast(k, n, in, 2, out);
    if (st)
        return st;
    out->dtype = OPQ_DTYPE_BOOL;
    return opq_kl_finish(k, n, out);
}

static enum opq_status cmp_run(const struct opq_tensor *const *in, struct opq_tensor *out,
                               enum cmp_kind kind) {
    struct opq_kl_iter it;
    size_t total = opq_kl_numel(out);
    uint8_t *y = out->data;
    enum opq_dtype dt = in[0]->dtype;
    bool fl = opq_kl_dtype_is_float(dt);
    opq_kl_iter_init(&it, out->ndim, out->shape, 2, in);
    for (size_t i = 0; i < total; i++, opq_kl_iter_next(&it)) {
        int c;
        if (fl) {
            double a = opq_kl_get_f64(in[0]->data, dt, (size_t)it.off[0]);
            double b = opq_kl_get_f64(in[1]->data, dt, (size_t)it.off[1]);
            c = kind == CMP_EQ ? a == b : (kind == CMP_LT ? a < b : a > b);
        } else {
            int64_t a = opq_kl_get_i64(in[0]->data, dt, (size_t)it.off[0]);
            int64_t b = opq_kl_get_i64(in[1]->data, dt, (size_t)it.off[1]);
            c = kind == CMP_EQ ? a == b : (kind == CMP_LT ? a < b : a > b);
        }
        y[i] = (uint8_t)c;
    }
    return OPQ_OK;
}

static enum opq_status equal_forward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    return cmp_run(in, out, CMP_EQ);
}

static enum opq_status less_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    return cmp_run(in, out, CMP_LT);
}

static enum opq_status greater_forward(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in,
                                       struct opq_tensor *out) {
    (void)k;
    (void)n;
    return cmp_run(in, out, CMP_GT);
}

const struct opq_kernel opq_kernel_equal = {.min_opset = 7, .infer = cmp_infer,
                                            .forward = equal_forward};
const struct opq_kernel opq_kernel_less = {.min_opset = 7, .infer = cmp_infer,
                                           .forward = less_forward};
const struct opq_kernel opq_kernel_greater = {.min_opset = 7, .infer = cmp_infer,
                                              .forward = greater_forward};

// ---- Not / And ----------------------------------------------------------------------------------

static enum opq_status not_infer(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (in[0]->dtype != OPQ_DTYPE_BOOL)
        return bad_dtype(k, n, in[0]);
    *out = *in[0];
    out->data = NULL;
    return opq_kl_finish(k, n, out);
}

static enum opq_status not_forward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    const uint8_t *x = in[0]->data;
    uint8_t *y = out->data;
    for (size_t i = 0; i < out->nbytes; i++)
        y[i] = !x[i];
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_not = {.infer = not_infer, .forward = not_forward};

static enum opq_status and_infer(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *in, struct opq_tensor *out) {
    for (int j = 0; j < 2; j++)
        if (in[j]->dtype != OPQ_DTYPE_BOOL)
            return bad_dtype(k, n, in[j]);
    enum opq_status st = opq_kl_broadcast(k, n, in, 2, out);
    if (st)
        return st;
    out->dtype = OPQ_DTYPE_BOOL;
    return opq_kl_finish(k, n, out);
}

static enum opq_status and_forward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    struct opq_kl_iter it;
    size_t total = opq_kl_numel(out);
    const uint8_t *a = in[0]->data;
    const uint8_t *b = in[1]->data;
    uint8_t *y = out->data;
    opq_kl_iter_init(&it, out->ndim, out->shape, 2, in);
    for (size_t i = 0; i < total; i++, opq_kl_iter_next(&it))
        y[i] = a[it.off[0]] && b[it.off[1]];
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_and = {.min_opset = 7, .infer = and_infer,
                                          .forward = and_forward};

// ---- Where --------------------------------------------------------------------------------------

static enum opq_status where_infer(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (in[0]->dtype != OPQ_DTYPE_BOOL)
        return bad_dtype(k, n, in[0]);
    if (in[1]->dtype != in[2]->dtype)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": X and Y differ in dtype",
                             OPQ_KL_NODE(n));
    if (opq_dtype_size(in[1]->dtype) == 0)
        return bad_dtype(k, n, in[1]);
    enum opq_status st = opq_kl_broadcast(k, n, in, 3, out);
    if (st)
        return st;
    out->dtype = in[1]->dtype;
    return opq_kl_finish(k, n, out);
}

static enum opq_status where_forward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    struct opq_kl_iter it;
    size_t total = opq_kl_numel(out);
    size_t es = opq_dtype_size(out->dtype);
    const uint8_t *c = in[0]->data;
    const char *x = in[1]->data;
    const char *y = in[2]->data;
    char *o = out->data;
    opq_kl_iter_init(&it, out->ndim, out->shape, 3, in);
    for (size_t i = 0; i < total; i++, opq_kl_iter_next(&it)) {
        if (c[it.off[0]])
            memcpy(o + i * es, x + (size_t)it.off[1] * es, es);
        else
            memcpy(o + i * es, y + (size_t)it.off[2] * es, es);
    }
    return OPQ_OK;
}

static enum opq_status where_backward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in,
                                      const struct opq_tensor *out, const struct opq_tensor *dout,
                                      struct opq_tensor *din) {
    double *acc[3] = {NULL, NULL, NULL};
    if (din[0].data)
        memset(din[0].data, 0, din[0].nbytes);
    for (int j = 1; j < 3; j++) {
        if (!din[j].data)
            continue;
        if (in[j]->dtype != OPQ_DTYPE_FLOAT)
            return bad_dtype(k, n, in[j]);
        size_t m = opq_kl_numel(in[j]);
        acc[j] = opq_arena_alloc(k->scratch, (m ? m : 1) * sizeof(double));
        if (!acc[j])
            return opq_set_error(k->ctx, OPQ_ERR_NOMEM, OPQ_KL_NODE_FMT ": out of memory",
                                 OPQ_KL_NODE(n));
    }
    if (dout[0].data) {
        struct opq_kl_iter it;
        size_t total = opq_kl_numel(&out[0]);
        const uint8_t *c = in[0]->data;
        const float *g = dout[0].data;
        opq_kl_iter_init(&it, out[0].ndim, out[0].shape, 3, in);
        for (size_t i = 0; i < total; i++, opq_kl_iter_next(&it)) {
            int j = c[it.off[0]] ? 1 : 2;
            if (acc[j])
                acc[j][it.off[j]] += (double)g[i];
        }
    }
    for (int j = 1; j < 3; j++) {
        if (!acc[j])
            continue;
        size_t m = opq_kl_numel(in[j]);
        float *d = din[j].data;
        for (size_t i = 0; i < m; i++)
            d[i] = (float)acc[j][i];
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_where = {
    .min_opset = 9,
    .infer     = where_infer,
    .forward   = where_forward,
    .backward  = where_backward,
};
