/* k_layernorm.c: LayerNormalization. https://onnx.ai/onnx/operators/onnx__LayerNormalization.html
 * Opset 17+. Attributes: axis (default -1), epsilon (1e-5), stash_type (1; computation is float
 * with double accumulation either way). Inputs X, Scale, optional B; Scale and B hold either one
 * element or the normalised block's element count. Outputs Y, optional Mean and InvStdDev with
 * shape X.shape[:axis] + [1] * (rank - axis).
 * Forward (per row of D = prod(shape[axis:]) elements): mu = mean(x), var = mean((x-mu)^2),
 *   r = 1/sqrt(var + eps), xhat = (x - mu) r, y = xhat * scale + b.
 * VJP: g = dY * scale; dX = r (g - mean(g) - xhat mean(g xhat)); dScale = sum_rows dY xhat;
 *   dB = sum_rows dY. (Gradients flowing into Mean/InvStdDev outputs are not propagated.) */
#include <math.h>

#include "k_math.h"

struct ln_params {
    int64_t axis;
    float eps;
};

static enum opq_status ln_parse(struct opq_kctx *k, struct opq_graph *g, struct opq_node *n) {
    struct ln_params *p = opq_arena_alloc(g->arena, sizeof(*p));
    if (!p)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "LayerNormalization node '%s': out of memory",
                             ku_name(n));
    p->axis = opq_node_attr_int(n, "axis", -1);
    p->eps = opq_node_attr_float(n, "epsilon", 1e-5f);
    n->params = p;
    return OPQ_OK;
}

// rows x cols geometry; checks scale/bias sizes.
static enum opq_status ln_geom(struct opq_kctx *k, const struct opq_node *n,
                               const struct opq_tensor *const *in, int *axis, int64_t *rows,
                               int64_t *cols) {
    const struct ln_params *p = n->params;
    const struct opq_tensor *x = in[0];
    if (!opq_axis_norm(p->axis, x->ndim, axis))
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL,
                             "LayerNormalization node '%s': axis "
                             "%lld out of range for rank %d",
                             ku_name(n), (long long)p->axis, x->ndim);
    *rows = 1;
    *cols = 1;
    for (int d = 0; d < x->ndim; d++)
        *(d < *axis ? rows : cols) *= x->shape[d];
    for (int j = 1; j < 3 && j < n->n_inputs; j++) {
        if (!in[j])
            continue;
        int64_t c = ku_numel(in[j]);
        if (in[j]->dtype != OPQ_DTYPE_FLOAT || (c != *cols && c != 1))
            return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                                 "LayerNormalization node '%s': %s must be float32 with 1 or "
                                 "%lld elements",
                                 ku_name(n), j == 1 ? "Scale" : "B", (long long)*cols);
    }
    return OPQ_OK;
}

static enum opq_status ln_infer(struct opq_kctx *k, const struct opq_node *n,
                                const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (n->n_inputs < 2 || !in[0] || !in[1] || in[0]->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "LayerNormalization node '%s': needs "
                             "float32 X and Scale",
                             ku_name(n));
    int axis;
    int64_t rows;
    int64_t cols;
    enum opq_status st = ln_geom(k, n, in, &axis, &rows, &cols);
    if (st != OPQ_OK)
        return st;
    out[0].dtype = OPQ_DTYPE_FLOAT;
    ku_copy_shape(&out[0], in[0]);
    for (int j = 1; j < 3 && j < n->n_outputs; j++) {
        out[j].dtype = OPQ_DTYPE_FLOAT;
        ku_copy_shape(&out[j], in[0]);
        for (int d = axis; d < in[0]->ndim; d++)
            out[j].shape[d] = 1;
    }
    return OPQ_OK;
}

struct ln_job {
    int64_t cols;
    float eps;
    const float *x, *scale, *bias;
    int64_t s_step, b_step; // 1, or 0 for a one-element Scale/B
    float *y, *mean, *inv;
};

// Sums in double over 8 interleaved lanes (element i goes to lane i % 8), combined pairwise:
// a fixed order (deterministic), and independent lanes the compiler vectorises.
#define LN_LANES 8

static void ln_stats(const float *x, int64_t c, float eps, double *mu, double *r) {
    double s[LN_LANES] = {0};
    int64_t body = c - c % LN_LANES;
    for (int64_t i = 0; i < body; i += LN_LANES)
        for (int l = 0; l < LN_LANES; l++)
            s[l] += (double)x[i + l];
    for (int64_t i = body; i < c; i++)
        s[i - body] += (double)x[i];
    double m = (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) / (double)c;
    double v[LN_LANES] = {0};
    for (int64_t i = 0; i < body; i += LN_LANES)
        for (int l = 0; l < LN_LANES; l++) {
            double d = (double)x[i + l] - m;
            v[l] += d * d;
        }
    for (int64_t i = body; i < c; i++) {
        double d = (double)x[i] - m;
        v[i - body] += d * d;
    }
    double vs = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    *mu = m;
    *r = 1.0 / sqrt(vs / (double)c + (double)eps);
}

KU_HOT static void ln_rows(void *user, int64_t r0, int64_t r1) {
    const struct ln_job *j = user;
    int64_t c = j->cols;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * c;
        double mu;
        double ri;
        ln_stats(x, c, j->eps, &mu, &ri);
        float fm = (float)mu;
        float fr = (float)ri;
        if (j->y) {
            float *y = j->y + r * c;
            for (int64_t i = 0; i < c; i++) {
                float v = (x[i] - fm) * fr * j->scale[i * j->s_step];
                y[i] = j->bias ? v + j->bias[i * j->b_step] : v;
            }
        }
        if (j->mean)
            j->mean[r] = fm;
        if (j->inv)
            j->inv[r] = fr;
    }
}

static enum opq_status ln_forward(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct opq_tensor *out) {
    int axis;
    int64_t rows;
    int64_t cols;
    enum opq_status st = ln_geom(k, n, in, &axis, &rows, &cols);
    if (st != OPQ_OK || cols == 0)
        return st;
    const struct opq_tensor *b = n->n_inputs > 2 ? in[2] : NULL;
    struct ln_job j = {
        .cols = cols,
        .eps = ((const struct ln_params *)n->params)->eps,
        .x = in[0]->data,
        .scale = in[1]->data,
        .bias = b ? b->data : NULL,
        .s_step = ku_numel(in[1]) == 1 ? 0 : 1,
        .b_step = b && ku_numel(b) == 1 ? 0 : 1,
        .y = out[0].data,
        .mean = n->n_outputs > 1 ? out[1].data : NULL,
        .inv = n->n_outputs > 2 ? out[2].data : NULL,
    };
    ku_parallel(k, rows, 16384 / cols + 1, ln_rows, &j);
    return OPQ_OK;
}

// One row of the VJP: dX into dxr (NULL: not wanted) and, with dsc/db, the row's part of the
// scale and bias gradients (double sums over rows).
static void ln_row_backward(const float *xr, const float *gr, const float *sc, int64_t ss,
                            int64_t cols, float eps, double *dsc, double *db, float *dxr) {
    double mu;
    double ri;
    ln_stats(xr, cols, eps, &mu, &ri);
    double mg = 0.0;
    double mgx = 0.0;
    for (int64_t i = 0; i < cols; i++) {
        double xh = ((double)xr[i] - mu) * ri;
        double g = (double)gr[i] * (double)sc[i * ss];
        mg += g;
        mgx += g * xh;
        if (dsc) {
            dsc[i] += (double)gr[i] * xh;
            db[i] += (double)gr[i];
        }
    }
    if (!dxr)
        return;
    mg /= (double)cols;
    mgx /= (double)cols;
    for (int64_t i = 0; i < cols; i++) {
        double xh = ((double)xr[i] - mu) * ri;
        double g = (double)gr[i] * (double)sc[i * ss];
        dxr[i] = (float)(ri * (g - mg - xh * mgx));
    }
}

struct lnb_job {
    const float *x, *sc, *dy;
    float *dx;
    int64_t ss, cols;
    float eps;
};

// dX of rows r0..r1 alone (no scale/bias gradient).
static void lnb_rows(void *user, int64_t r0, int64_t r1) {
    const struct lnb_job *j = user;
    for (int64_t r = r0; r < r1; r++)
        ln_row_backward(j->x + r * j->cols, j->dy + r * j->cols, j->sc, j->ss, j->cols, j->eps,
                        NULL, NULL, j->dx + r * j->cols);
}

static enum opq_status ln_backward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, const struct opq_tensor *out,
                                   const struct opq_tensor *dout, struct opq_tensor *din) {
    (void)out;
    int axis;
    int64_t rows;
    int64_t cols;
    enum opq_status st = ln_geom(k, n, in, &axis, &rows, &cols);
    if (st != OPQ_OK)
        return st;
    const struct ln_params *p = n->params;
    const float *x = in[0]->data;
    const float *sc = in[1]->data;
    int64_t ss = ku_numel(in[1]) == 1 ? 0 : 1;
    const float *dy = dout[0].data;
    float *dx = din[0].data;
    bool has_b = n->n_inputs > 2 && in[2];
    if (dy && dx && !din[1].data && !(has_b && din[2].data)) {
        // only dX: rows are independent, over the pool
        struct lnb_job j = {x, sc, dy, dx, ss, cols, p->eps};
        ku_parallel(k, rows, 16384 / cols + 1, lnb_rows, &j);
        return OPQ_OK;
    }
    double *dsc = opq_arena_alloc(k->scratch, (size_t)cols * sizeof(double));
    double *db = opq_arena_alloc(k->scratch, (size_t)cols * sizeof(double));
    if (!dsc || !db)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM,
                             "LayerNormalization node '%s': out of "
                             "memory",
                             ku_name(n));
    for (int64_t r = 0; dy && r < rows; r++)
        ln_row_backward(x + r * cols, dy + r * cols, sc, ss, cols, p->eps, dsc, db,
                        dx ? dx + r * cols : NULL);
    if (dx && !dy)
        memset(dx, 0, din[0].nbytes);
    for (int j = 1; j <= 2; j++) {
        if (j == 2 && !has_b)
            break;
        float *d = din[j].data;
        const double *acc = j == 1 ? dsc : db;
        if (!d)
            continue;
        if (ku_numel(in[j]) == 1) {
            double s = 0.0;
            for (int64_t i = 0; i < cols; i++)
                s += acc[i];
            d[0] = (float)s;
        } else {
            for (int64_t i = 0; i < cols; i++)
                d[i] = (float)acc[i];
        }
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_layernorm = {
    .min_opset = 17,
    .parse = ln_parse,
    .infer = ln_infer,
    .forward = ln_forward,
    .backward = ln_backward,
};
