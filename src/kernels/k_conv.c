/* k_conv.c: Conv (1-D and 2-D). https://onnx.ai/onnx/operators/onnx__Conv.html
 * Opset 1+. Attributes: auto_pad (NOTSET, SAME_UPPER, SAME_LOWER, VALID), dilations, group,
 * kernel_shape, pads ([begin..., end...]), strides. X [N, C, (H,) W], W [M, C/group, (kH,) kW],
 * optional B [M]. A 1-D conv runs as 2-D with H = kH = 1.
 * Forward per (image, group): col = im2col(X) [C/g*kH*kW, oH*oW]; Y = W_g col (+ B).
 * VJP: dW_g += dY_g col^T; dcol = W_g^T dY_g, scattered back by col2im into dX;
 *      dB = sum of dY over images and positions. */
#include "blas.h"
#include "k_math.h"

struct conv_params {
    int auto_pad; // 0 NOTSET, 1 SAME_UPPER, 2 SAME_LOWER, 3 VALID
    int64_t group;
    int n_kernel;
    int64_t kernel[2], strides[2], dil[2], pads[4];
    bool has_pads;
};

struct conv_geom {
    int64_t n, c, h, w, m, kh, kw, oh, ow, group;
    int64_t sh, sw, dh, dw, pt, pl; // strides, dilations, pad top/left
};

static enum opq_status ints_attr(struct opq_kctx *k, const struct opq_node *n, const char *name,
                                 int64_t *dst, int max, int *cnt) {
    const struct opq_attr *a = opq_node_attr(n, name);
    *cnt = 0;
    if (!a)
        return OPQ_OK;
    if (a->type != OPQ_ATTR_INTS || a->n > max)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "Conv node '%s': attribute %s: only "
                             "1-D and 2-D convolutions are supported",
                             ku_name(n), name);
    for (int i = 0; i < a->n; i++)
        dst[i] = a->ints[i];
    *cnt = a->n;
    return OPQ_OK;
}

static enum opq_status conv_parse(struct opq_kctx *k, struct opq_graph *g, struct opq_node *n) {
    struct conv_params *p = opq_arena_alloc(g->arena, sizeof(*p));
    if (!p)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "Conv node '%s': out of memory", ku_name(n));
    p->group = opq_node_attr_int(n, "group", 1);
    for (int i = 0; i < 2; i++) {
        p->strides[i] = 1;
        p->dil[i] = 1;
    }
    const struct opq_attr *ap = opq_node_attr(n, "auto_pad");
    if (ap && ap->type == OPQ_ATTR_STRING) {
        static const char *const names[] = {"NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"};
        p->auto_pad = -1;
        for (int i = 0; i < 4; i++)
            if (ap->s.len == strlen(names[i]) && memcmp(ap->s.data, names[i], ap->s.len) == 0)
                p->auto_pad = i;
        if (p->auto_pad < 0)
            return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, "Conv node '%s': bad auto_pad",
                                 ku_name(n));
    }
    int cnt;
    enum opq_status st = ints_attr(k, n, "kernel_shape", p->kernel, 2, &p->n_kernel);
    if (!st)
        st = ints_attr(k, n, "strides", p->strides, 2, &cnt);
    if (!st)
        st = ints_attr(k, n, "dilations", p->dil, 2, &cnt);
    if (!st)
        st = ints_attr(k, n, "pads", p->pads, 4, &cnt);
    if (st)
        return st;
    p->has_pads = cnt > 0;
    if (p->group < 1)
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, "Conv node '%s': group %lld",
                             ku_name(n), (long long)p->group);
    n->params = p;
    return OPQ_OK;
}

static enum opq_status conv_geometry(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct conv_geom *g) {
    const struct conv_params *p = n->params;
    const struct opq_tensor *x = in[0];
    const struct opq_tensor *w = in[1];
    if (!x || !w || x->dtype != OPQ_DTYPE_FLOAT || w->dtype != OPQ_DTYPE_FLOAT ||
        (x->ndim != 3 && x->ndim != 4) || w->ndim != x->ndim)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "Conv node '%s': only float32 1-D and "
                             "2-D convolutions are supported (X rank %d)",
                             ku_name(n), x ? x->ndim : -1);
    int sp = x->ndim - 2; // spatial rank
    bool one = sp == 1;
    g->n = x->shape[0];
    g->c = x->shape[1];
    g->h = one ? 1 : x->shape[2];
    g->w = x->shape[x->ndim - 1];
    g->m = w->shape[0];
    g->kh = one ? 1 : w->shape[2];
    g->kw = w->shape[w->ndim - 1];
    g->group = p->group;
    if (g->c % g->group || g->m % g->group || w->shape[1] != g->c / g->group)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                             "Conv node '%s': channels %lld, weight "
                             "[%lld, %lld, ...], group %lld do not match",
                             ku_name(n), (long long)g->c, (long long)w->shape[0],
                             (long long)w->shape[1], (long long)g->group);
    if (p->n_kernel &&
        (p->n_kernel != sp || p->kernel[sp - 1] != g->kw || (!one && p->kernel[0] != g->kh)))
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                             "Conv node '%s': kernel_shape disagrees "
                             "with the weight",
                             ku_name(n));
    int64_t s[2] = {one ? 1 : p->strides[0], p->strides[sp - 1]};
    int64_t dl[2] = {one ? 1 : p->dil[0], p->dil[sp - 1]};
    int64_t in_sz[2] = {g->h, g->w};
    int64_t ks[2] = {g->kh, g->kw};
    int64_t pb[2] = {0, 0};
    int64_t pe[2] = {0, 0};
    int64_t o[2];
    for (int i = 0; i < 2; i++) {
        int a = one ? 0 : i; // attribute index
        if (one && i == 0) {
            o[0] = 1;
            continue;
        }
        int64_t ek = (ks[i] - 1) * dl[i] + 1;
        if (p->auto_pad == 1 || p->auto_pad == 2) {
            o[i] = (in_sz[i] + s[i] - 1) / s[i];
            int64_t tot = (o[i] - 1) * s[i] + ek - in_sz[i];
            tot = tot < 0 ? 0 : tot;
            pb[i] = p->auto_pad == 1 ? tot / 2 : tot - tot / 2;
        } else {
            if (p->auto_pad == 0 && p->has_pads) {
                pb[i] = p->pads[a];
                pe[i] = p->pads[a + sp];
            }
            o[i] = (in_sz[i] + pb[i] + pe[i] - ek) / s[i] + 1;
        }
        if (o[i] < 1 || s[i] < 1 || dl[i] < 1)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE, "Conv node '%s': empty output", ku_name(n));
    }
    g->oh = o[0];
    g->ow = o[1];
    g->sh = s[0];
    g->sw = s[1];
    g->dh = dl[0];
    g->dw = dl[1];
    g->pt = pb[0];
    g->pl = pb[1];
    if (n->n_inputs > 2 && in[2] && (in[2]->dtype != OPQ_DTYPE_FLOAT || ku_numel(in[2]) != g->m))
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, "Conv node '%s': B must have %lld values",
                             ku_name(n), (long long)g->m);
    return OPQ_OK;
}

static enum opq_status conv_infer(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct conv_geom g;
    enum opq_status st = conv_geometry(k, n, in, &g);
    if (st != OPQ_OK)
        return st;
    out[0].dtype = OPQ_DTYPE_FLOAT;
    out[0].ndim = in[0]->ndim;
    out[0].shape[0] = g.n;
    out[0].shape[1] = g.m;
    if (in[0]->ndim == 4)
        out[0].shape[2] = g.oh;
    out[0].shape[out[0].ndim - 1] = g.ow;
    return OPQ_OK;
}

// col [cg*kh*kw, oh*ow] from the cg channels starting at x (one image).
static void im2col(const struct conv_geom *g, int64_t cg, const float *x, float *col) {
    int64_t ohw = g->oh * g->ow;
    for (int64_t c = 0; c < cg; c++)
        for (int64_t ki = 0; ki < g->kh; ki++)
            for (int64_t kj = 0; kj < g->kw; kj++) {
                float *row = col + ((c * g->kh + ki) * g->kw + kj) * ohw;
                for (int64_t oi = 0; oi < g->oh; oi++) {
                    int64_t ii = oi * g->sh - g->pt + ki * g->dh;
                    float *r = row + oi * g->ow;
                    if (ii < 0 || ii >= g->h) {
                        memset(r, 0, (size_t)g->ow * sizeof(float));
                        continue;
                    }
                    const float *xr = x + (c * g->h + ii) * g->w;
                    for (int64_t oj = 0; oj < g->ow; oj++) {
                        int64_t jj = oj * g->sw - g->pl + kj * g->dw;
                        r[oj] = jj >= 0 && jj < g->w ? xr[jj] : 0.0f;
                    }
                }
            }
}

// dx (cg channels of one image) += col2im(dcol).
static void col2im(const struct conv_geom *g, int64_t cg, const float *col, float *dx) {
    int64_t ohw = g->oh * g->ow;
    for (int64_t c = 0; c < cg; c++)
        for (int64_t ki = 0; ki < g->kh; ki++)
            for (int64_t kj = 0; kj < g->kw; kj++) {
                const float *row = col + ((c * g->kh + ki) * g->kw + kj) * ohw;
                for (int64_t oi = 0; oi < g->oh; oi++) {
                    int64_t ii = oi * g->sh - g->pt + ki * g->dh;
                    if (ii < 0 || ii >= g->h)
                        continue;
                    float *xr = dx + (c * g->h + ii) * g->w;
                    for (int64_t oj = 0; oj < g->ow; oj++) {
                        int64_t jj = oj * g->sw - g->pl + kj * g->dw;
                        if (jj >= 0 && jj < g->w)
                            xr[jj] += row[oi * g->ow + oj];
                    }
                }
            }
}

static enum opq_status conv_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct conv_geom g;
    enum opq_status st = conv_geometry(k, n, in, &g);
    if (st != OPQ_OK || !out[0].data)
        return st;
    int64_t cg = g.c / g.group;
    int64_t mg = g.m / g.group;
    int64_t kdim = cg * g.kh * g.kw;
    int64_t ohw = g.oh * g.ow;
    float *col = opq_arena_alloc_raw(k->scratch, (size_t)(kdim * ohw) * sizeof(float) + 1);
    if (!col)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "Conv node '%s': out of memory", ku_name(n));
    const float *x = in[0]->data;
    const float *w = in[1]->data;
    const float *b = n->n_inputs > 2 && in[2] ? in[2]->data : NULL;
    float *y = out[0].data;
    for (int64_t i = 0; i < g.n; i++) {
        for (int64_t gr = 0; gr < g.group; gr++) {
            im2col(&g, cg, x + (i * g.c + gr * cg) * g.h * g.w, col);
            float *yg = y + (i * g.m + gr * mg) * ohw;
            float beta = 0.0f;
            if (b) {
                for (int64_t m = 0; m < mg; m++)
                    for (int64_t q = 0; q < ohw; q++)
                        yg[m * ohw + q] = b[gr * mg + m];
                beta = 1.0f;
            }
            opq_sgemm_mt(k->pool, false, false, mg, ohw, kdim, 1.0f, w + gr * mg * kdim, kdim, col,
                         ohw, beta, yg, ohw);
        }
    }
    return OPQ_OK;
}

static enum opq_status conv_backward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in,
                                     const struct opq_tensor *out, const struct opq_tensor *dout,
                                     struct opq_tensor *din) {
    (void)out;
    struct conv_geom g;
    enum opq_status st = conv_geometry(k, n, in, &g);
    if (st != OPQ_OK)
        return st;
    for (int j = 0; j < 3 && j < n->n_inputs; j++)
        if (din[j].data)
            memset(din[j].data, 0, din[j].nbytes);
    const float *dy = dout[0].data;
    if (!dy)
        return OPQ_OK;
    int64_t cg = g.c / g.group;
    int64_t mg = g.m / g.group;
    int64_t kdim = cg * g.kh * g.kw;
    int64_t ohw = g.oh * g.ow;
    float *col = opq_arena_alloc_raw(k->scratch, (size_t)(kdim * ohw) * sizeof(float) + 1);
    if (!col)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "Conv node '%s': out of memory", ku_name(n));
    const float *x = in[0]->data;
    const float *w = in[1]->data;
    float *dx = din[0].data;
    float *dw = din[1].data;
    float *db = n->n_inputs > 2 && in[2] ? din[2].data : NULL;
    for (int64_t i = 0; i < g.n; i++) {
        for (int64_t gr = 0; gr < g.group; gr++) {
            const float *dyg = dy + (i * g.m + gr * mg) * ohw;
            if (dw) {
                im2col(&g, cg, x + (i * g.c + gr * cg) * g.h * g.w, col);
                opq_sgemm(false, true, mg, kdim, ohw, 1.0f, dyg, ohw, col, ohw, 1.0f,
                          dw + gr * mg * kdim, kdim);
            }
            if (dx) {
                opq_sgemm(true, false, kdim, ohw, mg, 1.0f, w + gr * mg * kdim, kdim, dyg, ohw,
                          0.0f, col, ohw);
                col2im(&g, cg, col, dx + (i * g.c + gr * cg) * g.h * g.w);
            }
        }
    }
    if (db) {
        for (int64_t m = 0; m < g.m; m++) {
            double s = 0.0;
            for (int64_t i = 0; i < g.n; i++)
                for (int64_t q = 0; q < ohw; q++)
                    s += (double)dy[(i * g.m + m) * ohw + q];
            db[m] = (float)s;
        }
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_conv = {
    .min_opset = 1,
    .parse = conv_parse,
    .infer = conv_infer,
    .forward = conv_forward,
    .backward = conv_backward,
};
