/* k_reduce.c: ReduceMean, ReduceSum, ReduceMax.
 * https://onnx.ai/onnx/operators/onnx__ReduceMean.html (and ReduceSum, ReduceMax).
 * Axes come from the `axes` attribute before opset 18 (ReduceSum: 13) and from the optional second
 * input from then on (it must be known at plan time). keepdims (default 1); empty/absent axes
 * reduce everything unless noop_with_empty_axes = 1 (then Y = X). float32 (ReduceSum/Max also
 * int64). Sums accumulate in double.
 * VJP: ReduceSum dX = broadcast(dY); ReduceMean dX = broadcast(dY) / count; ReduceMax routes dY
 * to the first element (in memory order) equal to the maximum and gives the others 0 (a
 * subgradient at ties, as in argmax-based max pooling). */
#include <math.h>

#include "k_math.h"

enum rop { ROP_MEAN, ROP_SUM, ROP_MAX };

struct red_params {
    bool axes_from_input;
    bool keepdims;
    bool noop_empty;
    int n_axes;
    int64_t axes[OPQ_MAX_DIMS];
};

static enum opq_status red_parse(struct opq_kctx *k, struct opq_graph *g, struct opq_node *n) {
    struct red_params *p = opq_arena_alloc(g->arena, sizeof(*p));
    if (!p)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "%s node '%s': out of memory", n->op_type,
                             ku_name(n));
    int64_t input_from = n->op == OPQ_OP_REDUCESUM ? 13 : 18;
    p->axes_from_input = k->opset >= input_from;
    p->keepdims = opq_node_attr_int(n, "keepdims", 1) != 0;
    p->noop_empty = opq_node_attr_int(n, "noop_with_empty_axes", 0) != 0;
    const struct opq_attr *a = opq_node_attr(n, "axes");
    if (a) {
        if (a->type != OPQ_ATTR_INTS || a->n > OPQ_MAX_DIMS)
            return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, "%s node '%s': bad axes",
                                 n->op_type, ku_name(n));
        p->n_axes = a->n;
        for (int i = 0; i < a->n; i++)
            p->axes[i] = a->ints[i];
    }
    n->params = p;
    return OPQ_OK;
}

// mask[d] = true for reduced dims; *noop when the op is the identity.
static enum opq_status red_mask(struct opq_kctx *k, const struct opq_node *n,
                                const struct opq_tensor *const *in, bool *mask, bool *noop) {
    const struct red_params *p = n->params;
    int r = in[0]->ndim;
    int64_t axes[OPQ_MAX_DIMS];
    int na = p->n_axes;
    memcpy(axes, p->axes, sizeof(axes));
    if (p->axes_from_input && n->n_inputs > 1 && in[1]) {
        const struct opq_tensor *t = in[1];
        if (!t->data)
            return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                                 "%s node '%s': axes computed at "
                                 "run time are not supported",
                                 n->op_type, ku_name(n));
        int64_t cnt = ku_numel(t);
        if (t->dtype != OPQ_DTYPE_INT64 || cnt > OPQ_MAX_DIMS)
            return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL,
                                 "%s node '%s': axes must be "
                                 "int64 with at most %d values",
                                 n->op_type, ku_name(n), OPQ_MAX_DIMS);
        na = (int)cnt;
        memcpy(axes, t->data, (size_t)cnt * sizeof(int64_t));
    }
    *noop = na == 0 && p->noop_empty;
    for (int d = 0; d < r; d++)
        mask[d] = na == 0 && !p->noop_empty;
    for (int i = 0; i < na; i++) {
        int ax;
        if (!opq_axis_norm(axes[i], r, &ax))
            return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL,
                                 "%s node '%s': axis %lld out of "
                                 "range for rank %d",
                                 n->op_type, ku_name(n), (long long)axes[i], r);
        mask[ax] = true;
    }
    return OPQ_OK;
}

static enum opq_status red_infer(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *in, struct opq_tensor *out) {
    const struct red_params *p = n->params;
    enum opq_dtype dt = in[0] ? in[0]->dtype : OPQ_DTYPE_UNDEF;
    if (dt != OPQ_DTYPE_FLOAT && !(dt == OPQ_DTYPE_INT64 && n->op != OPQ_OP_REDUCEMEAN))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, "%s node '%s': dtype %s", n->op_type,
                             ku_name(n), opq_dtype_name(dt));
    bool mask[OPQ_MAX_DIMS];
    bool noop;
    enum opq_status st = red_mask(k, n, in, mask, &noop);
    if (st != OPQ_OK)
        return st;
    out[0].dtype = dt;
    out[0].ndim = 0;
    for (int d = 0; d < in[0]->ndim; d++) {
        if (!mask[d])
            out[0].shape[out[0].ndim++] = in[0]->shape[d];
        else if (p->keepdims)
            out[0].shape[out[0].ndim++] = 1;
    }
    return OPQ_OK;
}

// Strides of the output (in keepdims layout) for each input dim; 0 on reduced dims.
static void out_strides(const struct opq_tensor *x, const bool *mask, int64_t *os) {
    int64_t s = 1;
    for (int d = x->ndim - 1; d >= 0; d--) {
        os[d] = mask[d] ? 0 : s;
        if (!mask[d])
            s *= x->shape[d];
    }
}

static enum opq_status red_forward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out,
                                   enum rop op) {
    const struct opq_tensor *x = in[0];
    bool mask[OPQ_MAX_DIMS];
    bool noop;
    enum opq_status st = red_mask(k, n, in, mask, &noop);
    if (st != OPQ_OK || !out[0].data)
        return st;
    if (noop) {
        memcpy(out[0].data, x->data, out[0].nbytes);
        return OPQ_OK;
    }
    int64_t nx = ku_numel(x);
    int64_t ny = ku_numel(&out[0]);
    int64_t cnt = ny ? nx / ny : 0;
    int64_t os[OPQ_MAX_DIMS] = {0};
    out_strides(x, mask, os);
    // the trailing reduced dims form contiguous runs of `inner` elements
    int64_t inner = 1;
    int t = x->ndim;
    while (t > 0 && mask[t - 1])
        inner *= x->shape[--t];
    double *acc = opq_arena_alloc(k->scratch, (size_t)ny * sizeof(double) + 1);
    if (!acc)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "%s node '%s': out of memory", n->op_type,
                             ku_name(n));
    bool is_f = x->dtype == OPQ_DTYPE_FLOAT;
    for (int64_t i = 0; i < ny; i++)
        acc[i] = op == ROP_MAX ? -HUGE_VAL : 0.0;
    int64_t idx[OPQ_MAX_DIMS] = {0};
    int64_t o = 0;
    for (int64_t i = 0; i < nx; i += inner) {
        double v;
        if (op == ROP_MAX) {
            v = acc[o];
            for (int64_t q = 0; q < inner; q++) {
                double e = is_f ? (double)((const float *)x->data)[i + q]
                                : (double)((const int64_t *)x->data)[i + q];
                v = e > v || isnan(e) ? e : v;
            }
            acc[o] = v;
        } else {
            v = 0.0;
            for (int64_t q = 0; q < inner; q++)
                v += is_f ? (double)((const float *)x->data)[i + q]
                          : (double)((const int64_t *)x->data)[i + q];
            acc[o] += v;
        }
        for (int d = t - 1; d >= 0; d--) {
            idx[d]++;
            o += os[d];
            if (idx[d] < x->shape[d])
                break;
            o -= os[d] * x->shape[d];
            idx[d] = 0;
        }
    }
    for (int64_t i = 0; i < ny; i++) {
        double v = op == ROP_MEAN ? acc[i] / (double)cnt : acc[i];
        if (is_f)
            ((float *)out[0].data)[i] = (float)v;
        else
            ((int64_t *)out[0].data)[i] = (int64_t)v;
    }
    return OPQ_OK;
}

struct rbwd_job {
    enum rop op;
    const float *x, *y, *dy;
    float *dx;
    int64_t inner;
    float scale;
    bool add; // add into dx (the other users' gradient): the maximum's element only
};

// Trailing axes reduced: output element o owns the run x[o*inner .. (o+1)*inner), rows o0..o1
// (disjoint destinations: any split gives the same bytes as the general loop).
KU_HOT static void rbwd_rows(void *user, int64_t o0, int64_t o1) {
    const struct rbwd_job *j = user;
    int64_t inner = j->inner;
    for (int64_t o = o0; o < o1; o++) {
        const float *xr = j->x + o * inner;
        float *dr = j->dx + o * inner;
        float g = j->dy[o];
        if (j->op == ROP_MAX) {
            // the first element equal to the maximum takes dY
            float m = j->y[o];
            int64_t q = 0;
            while (q < inner && !(xr[q] == m))
                q++;
            for (int64_t i = 0; i < inner && !j->add; i++)
                dr[i] = 0.0f;
            if (q < inner)
                dr[q] = j->add ? dr[q] + g : g;
        } else {
            float v = g * j->scale;
            if (j->add)
                for (int64_t i = 0; i < inner; i++)
                    dr[i] = dr[i] + v;
            else
                for (int64_t i = 0; i < inner; i++)
                    dr[i] = v;
        }
    }
}

static enum opq_status red_backward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in,
                                    const struct opq_tensor *out, const struct opq_tensor *dout,
                                    struct opq_tensor *din, enum rop op) {
    const struct opq_tensor *x = in[0];
    bool mask[OPQ_MAX_DIMS];
    bool noop;
    enum opq_status st = red_mask(k, n, in, mask, &noop);
    if (st != OPQ_OK || !din[0].data)
        return st;
    if (x->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, "%s node '%s': backward needs float",
                             n->op_type, ku_name(n));
    float *dx = din[0].data;
    const float *dy = dout[0].data;
    int64_t nx = ku_numel(x);
    int64_t ny = ku_numel(&out[0]);
    bool add = k->din_add & 1u; // dx holds the other users' gradient: add to it
    if (!dy) {
        if (!add)
            memset(dx, 0, din[0].nbytes);
        return OPQ_OK;
    }
    if (noop) {
        for (int64_t i = 0; i < nx; i++)
            dx[i] = add ? dx[i] + dy[i] : dy[i];
        return OPQ_OK;
    }
    float scale = op == ROP_MEAN && ny ? (float)((double)ny / (double)nx) : 1.0f;
    int64_t os[OPQ_MAX_DIMS] = {0};
    out_strides(x, mask, os);
    // reduced axes all trailing (softmax-style rows): one contiguous run per output element
    int t = x->ndim;
    int64_t inner = 1;
    while (t > 0 && mask[t - 1])
        inner *= x->shape[--t];
    bool trailing = true;
    for (int d = 0; d < t; d++)
        trailing = trailing && !mask[d];
    if (trailing && ny > 0 && inner > 0 && nx == ny * inner) {
        struct rbwd_job j = {op, x->data, out[0].data, dy, dx, inner, scale, add};
        ku_parallel(k, ny, (1 << 14) / inner + 1, rbwd_rows, &j);
        return OPQ_OK;
    }
    int64_t idx[OPQ_MAX_DIMS] = {0};
    int64_t o = 0;
    bool *taken = NULL; // ReduceMax: the output's maximum already found
    if (op == ROP_MAX && !(taken = opq_arena_alloc(k->scratch, (size_t)ny + 1)))
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "%s node '%s': out of memory", n->op_type,
                             ku_name(n));
    for (int64_t i = 0; taken && i < ny; i++)
        taken[i] = false;
    for (int64_t i = 0; i < nx; i++) {
        if (taken) {
            const float *xf = x->data;
            bool hit = !taken[o] && xf[i] == ((const float *)out[0].data)[o];
            float v = hit ? dy[o] : 0.0f;
            dx[i] = add ? dx[i] + v : v;
            taken[o] = taken[o] || hit;
        } else {
            dx[i] = add ? dx[i] + dy[o] * scale : dy[o] * scale;
        }
        for (int d = x->ndim - 1; d >= 0; d--) {
            idx[d]++;
            o += os[d];
            if (idx[d] < x->shape[d])
                break;
            o -= os[d] * x->shape[d];
            idx[d] = 0;
        }
    }
    return OPQ_OK;
}

#define RED_FORWARD(prefix, OP)                                                                    \
    static enum opq_status prefix##_forward(struct opq_kctx *k, const struct opq_node *n,          \
                                            const struct opq_tensor *const *in,                    \
                                            struct opq_tensor *out) {                              \
        return red_forward(k, n, in, out, OP);                                                     \
    }
#define RED_BACKWARD(prefix, OP)                                                                   \
    static enum opq_status prefix##_backward(                                                      \
        struct opq_kctx *k, const struct opq_node *n, const struct opq_tensor *const *in,          \
        const struct opq_tensor *out, const struct opq_tensor *dout, struct opq_tensor *din) {     \
        return red_backward(k, n, in, out, dout, din, OP);                                         \
    }

RED_FORWARD(reducemean, ROP_MEAN)
RED_FORWARD(reducesum, ROP_SUM)
RED_FORWARD(reducemax, ROP_MAX)
RED_BACKWARD(reducemean, ROP_MEAN)
RED_BACKWARD(reducesum, ROP_SUM)
RED_BACKWARD(reducemax, ROP_MAX)

const struct opq_kernel opq_kernel_reducemean = {
    .parse = red_parse,
    .infer = red_infer,
    .forward = reducemean_forward,
    .backward = reducemean_backward,
    .backward_adds = true,
};
const struct opq_kernel opq_kernel_reducesum = {
    .parse = red_parse,
    .infer = red_infer,
    .forward = reducesum_forward,
    .backward = reducesum_backward,
    .backward_adds = true,
};
const struct opq_kernel opq_kernel_reducemax = {
    .parse = red_parse,
    .infer = red_infer,
    .forward = reducemax_forward,
    .backward = reducemax_backward,
    .backward_adds = true,
};
