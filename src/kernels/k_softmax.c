/* k_softmax.c: Softmax. https://onnx.ai/onnx/operators/onnx__Softmax.html
 * Opset 13+: normalises along one axis (default -1). Opsets 1-12: the input is coerced to 2-D at
 * `axis` (default 1) and each row of the flattened inner block is normalised.
 * Forward: m = x[first] then max; e = exp(x - m); y = e / sum(e) (sum in double).
 * VJP: dX = Y * (dY - sum(dY * Y)) along the same axis. */
#include <math.h>

#include "k_math.h"

struct softmax_params {
    int64_t axis;
};

struct sm_geom {
    int64_t outer, n, inner; // element (o, a, i) lives at (o * n + a) * inner + i
};

static enum opq_status softmax_parse(struct opq_kctx *k, struct opq_graph *g, struct opq_node *n) {
    struct softmax_params *p = opq_arena_alloc(g->arena, sizeof(*p));
    if (!p)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "Softmax node '%s': out of memory", ku_name(n));
    p->axis = opq_node_attr_int(n, "axis", k->opset >= 13 ? -1 : 1);
    n->params = p;
    return OPQ_OK;
}

static enum opq_status sm_geometry(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *x, struct sm_geom *gm) {
    const struct softmax_params *p = n->params;
    int r = x->ndim;
    int ax;
    if (!opq_axis_norm(p->axis, r == 0 ? 1 : r, &ax))
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL,
                             "Softmax node '%s': axis %lld out "
                             "of range for rank %d",
                             ku_name(n), (long long)p->axis, r);
    gm->outer = 1;
    gm->n = 1;
    gm->inner = 1;
    for (int d = 0; d < r; d++) {
        if (d < ax)
            gm->outer *= x->shape[d];
        else if (d == ax || k->opset < 13)
            gm->n *= x->shape[d];
        else
            gm->inner *= x->shape[d];
    }
    return OPQ_OK;
}

static enum opq_status softmax_infer(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (!in[0] || in[0]->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "Softmax node '%s': needs a float32 "
                             "input",
                             ku_name(n));
    struct sm_geom gm;
    enum opq_status st = sm_geometry(k, n, in[0], &gm);
    if (st != OPQ_OK)
        return st;
    out[0].dtype = OPQ_DTYPE_FLOAT;
    ku_copy_shape(&out[0], in[0]);
    return OPQ_OK;
}

struct sm_job {
    struct sm_geom gm;
    const float *x;
    float *y;
};

#define SM_LANES 8

// Rows are (outer, inner) pairs; the common inner == 1 case walks contiguous memory.
KU_HOT static void sm_rows(void *user, int64_t r0, int64_t r1) {
    const struct sm_job *j = user;
    int64_t n = j->gm.n;
    int64_t s = j->gm.inner;
    for (int64_t r = r0; r < r1; r++) {
        int64_t base = (r / s) * n * s + r % s;
        const float *x = j->x + base;
        float *y = j->y + base;
        float m = x[0];
        double sum = 0.0;
        if (s == 1) {
            // contiguous row: max and double sum over SM_LANES interleaved lanes (element a in
            // lane a % SM_LANES, lanes combined pairwise: a fixed order), then a vectorisable
            // exp pass
            float ml[SM_LANES];
            double sl[SM_LANES] = {0};
            int64_t body = n - n % SM_LANES;
            for (int l = 0; l < SM_LANES; l++)
                ml[l] = m;
            for (int64_t a = 0; a < body; a += SM_LANES)
                for (int l = 0; l < SM_LANES; l++)
                    ml[l] = x[a + l] > ml[l] ? x[a + l] : ml[l];
            for (int64_t a = body; a < n; a++)
                m = x[a] > m ? x[a] : m;
            for (int l = 0; l < SM_LANES; l++)
                m = ml[l] > m ? ml[l] : m;
            for (int64_t a = 0; a < n; a++)
                y[a] = ku_expf(x[a] - m);
            for (int64_t a = 0; a < body; a += SM_LANES)
                for (int l = 0; l < SM_LANES; l++)
                    sl[l] += (double)y[a + l];
            for (int64_t a = body; a < n; a++)
                sl[a - body] += (double)y[a];
            sum = ((sl[0] + sl[1]) + (sl[2] + sl[3])) + ((sl[4] + sl[5]) + (sl[6] + sl[7]));
        } else {
            for (int64_t a = 1; a < n; a++)
                m = x[a * s] > m ? x[a * s] : m;
            for (int64_t a = 0; a < n; a++) {
                float e = ku_expf(x[a * s] - m);
                y[a * s] = e;
                sum += (double)e;
            }
        }
        float inv = (float)(1.0 / sum);
        for (int64_t a = 0; a < n; a++)
            y[a * s] *= inv;
    }
}

static enum opq_status softmax_forward(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct sm_job j = {.x = in[0]->data, .y = out[0].data};
    enum opq_status st = sm_geometry(k, n, in[0], &j.gm);
    if (st != OPQ_OK || !j.y || j.gm.n == 0)
        return st;
    int64_t rows = j.gm.outer * j.gm.inner;
    ku_parallel(k, rows, 4096 / j.gm.n + 1, sm_rows, &j);
    return OPQ_OK;
}

struct smb_job {
    const struct sm_geom *gm;
    const float *y, *g;
    float *d;
};

// dX = Y (dY - sum(dY Y)) on rows r0..r1 (independent rows: any split, same bytes).
static void smb_rows(void *user, int64_t r0, int64_t r1) {
    const struct smb_job *j = user;
    int64_t s = j->gm->inner;
    int64_t na = j->gm->n;
    const float *y = j->y;
    const float *g = j->g;
    float *d = j->d;
    for (int64_t r = r0; r < r1; r++) {
        int64_t base = (r / s) * na * s + r % s;
        double dot = 0.0;
        for (int64_t a = 0; a < na; a++)
            dot += (double)g[base + a * s] * (double)y[base + a * s];
        for (int64_t a = 0; a < na; a++) {
            int64_t i = base + a * s;
            d[i] = y[i] * (float)((double)g[i] - dot);
        }
    }
}

static enum opq_status softmax_backward(struct opq_kctx *k, const struct opq_node *n,
                                        const struct opq_tensor *const *in,
                                        const struct opq_tensor *out, const struct opq_tensor *dout,
                                        struct opq_tensor *din) {
    if (!din[0].data)
        return OPQ_OK;
    if (!dout[0].data) {
        memset(din[0].data, 0, din[0].nbytes);
        return OPQ_OK;
    }
    struct sm_geom gm;
    enum opq_status st = sm_geometry(k, n, in[0], &gm);
    if (st != OPQ_OK)
        return st;
    struct smb_job j = {&gm, out[0].data, dout[0].data, din[0].data};
    ku_parallel(k, gm.outer * gm.inner, 4096 / (gm.n > 0 ? gm.n : 1) + 1, smb_rows, &j);
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_softmax = {
    .min_opset = 1,
    .parse = softmax_parse,
    .infer = softmax_infer,
    .forward = softmax_forward,
    .backward = softmax_backward,
};
