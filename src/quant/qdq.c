/* qdq.c: Q/DQ insertion and weight/bias encoding (see qdq.h). */
#include "quant/qdq.h"

#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "arena.h"

enum opq_dtype opq_qdq_storage(int bits, bool is_signed, int64_t opset) {
    if (bits <= 4 && opset >= 21)
        return is_signed ? OPQ_DTYPE_INT4 : OPQ_DTYPE_UINT4;
    return is_signed ? OPQ_DTYPE_INT8 : OPQ_DTYPE_UINT8;
}

// Writes code q (already in range) at element i of a tensor of dtype dt.
static void put_code(void *data, enum opq_dtype dt, size_t i, int32_t q) {
    switch (dt) {
    case OPQ_DTYPE_INT8: ((int8_t *)data)[i] = (int8_t)q; break;
    case OPQ_DTYPE_UINT8: ((uint8_t *)data)[i] = (uint8_t)q; break;
    case OPQ_DTYPE_INT4:
    case OPQ_DTYPE_UINT4: {
        uint8_t *b   = (uint8_t *)data + i / 2;
        uint8_t  nib = (uint8_t)(q & 0xF);
        *b = (i & 1) ? (uint8_t)((*b & 0x0F) | (nib << 4)) : (uint8_t)((*b & 0xF0) | nib);
        break;
    }
    case OPQ_DTYPE_INT32: ((int32_t *)data)[i] = q; break;
    default: OPQ_ABORT("put_code: not a code dtype");
    }
}

// A new initializer named after `hint` with the given dtype/shape; data zero-filled.
static struct opq_value *new_init(struct opq_graph *g, const char *hint, enum opq_dtype dt,
                                  int ndim, const int64_t *shape) {
    struct opq_value *v = opq_graph_value_new_unique(g, hint);
    if (!v)
        return NULL;
    struct opq_tensor t = {.dtype = dt, .ndim = ndim};
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        t.shape[i] = shape[i];
        n *= (size_t)shape[i];
    }
    if (!opq_dtype_nbytes(dt, n, &t.nbytes))
        return NULL;
    void *zero = opq_arena_alloc(g->arena, t.nbytes);
    if (!zero)
        return NULL;
    t.data = zero;
    if (opq_graph_set_initializer(g, v, &t) != OPQ_OK)
        return NULL;
    return v;
}

// Scale and zero-point initializers for a spec (scalars per tensor, 1-D per channel).
static enum opq_status make_scale_zp(struct opq_graph *g, const char *base,
                                     const struct opq_qdq_spec *s, enum opq_dtype zdt,
                                     struct opq_value **scale, struct opq_value **zp) {
    char hint[512];
    int64_t n = s->n_ch;
    int nd = s->n_ch > 1 ? 1 : 0;
    snprintf(hint, sizeof(hint), "%s_scale", base);
    *scale = new_init(g, hint, OPQ_DTYPE_FLOAT, nd, &n);
    snprintf(hint, sizeof(hint), "%s_zero_point", base);
    *zp = new_init(g, hint, zdt, nd, &n);
    if (!*scale || !*zp)
        return OPQ_ERR_NOMEM;
    for (int c = 0; c < s->n_ch; c++) {
        ((float *)(*scale)->t.data)[c] = s->p[c].scale;
        put_code((*zp)->t.data, zdt, (size_t)c, s->p[c].zero_point);
    }
    return OPQ_OK;
}

static enum opq_status add_axis_attr(struct opq_graph *g, struct opq_node *n,
                                     const struct opq_qdq_spec *s) {
    if (s->n_ch <= 1)
        return OPQ_OK;
    struct opq_attr a = {.name = "axis", .type = OPQ_ATTR_INT, .i = s->axis};
    return opq_node_add_attr(g, n, &a);
}

static bool spec_ok(struct opq_graph *g, const struct opq_value *v, const struct opq_qdq_spec *s) {
    if (s->bits < 2 || s->bits > 8 || s->n_ch < 1 || !s->p) {
        opq_set_error(g->ctx, OPQ_ERR_USAGE, "'%s': bad quantization spec (%d bits)", v->name,
                      s->bits);
        return false;
    }
    if (v->t.dtype != OPQ_DTYPE_FLOAT) {
        opq_set_error(g->ctx, OPQ_ERR_UNSUPPORTED, "'%s': only float32 tensors are quantized, not %s",
                      v->name, opq_dtype_name(v->t.dtype));
        return false;
    }
    if (s->n_ch > 1 && (v->t.ndim <= s->axis || s->axis < 0 || v->t.shape[s->axis] != s->n_ch)) {
        opq_set_error(g->ctx, OPQ_ERR_SHAPE, "'%s': %d channel scales do not match axis %d",
                      v->name, s->n_ch, s->axis);
        return false;
    }
    return true;
}

enum opq_status opq_qdq_insert_activation(struct opq_graph *g, struct opq_value *v,
                                          const struct opq_qdq_spec *s, const char *name_hint,
                                          struct opq_node *const *only, int n_only,
                                          struct opq_value **dq_out) {
    if (!spec_ok(g, v, s))
        return opq_ctx_status(g->ctx);
    const char *base = name_hint ? name_hint : v->name;
    enum opq_dtype qdt = opq_qdq_storage(s->bits, s->is_signed, s->opset);
    bool emulate       = s->bits < 8 && qdt != OPQ_DTYPE_INT4 && qdt != OPQ_DTYPE_UINT4;
    struct opq_value *scale, *zp;
    enum opq_status st = make_scale_zp(g, base, s, qdt, &scale, &zp);
    if (st != OPQ_OK)
        return st;
    char hint[512];
    snprintf(hint, sizeof(hint), "%s_quantized", base);
    struct opq_value *q = opq_graph_value_new_unique(g, hint);
    snprintf(hint, sizeof(hint), "%s_dequantized", base);
    struct opq_value *dq = opq_graph_value_new_unique(g, hint);
    if (!q || !dq)
        return OPQ_ERR_NOMEM;
    q->t       = v->t;
    q->t.dtype = qdt;
    q->t.data  = NULL;
    dq->t      = v->t;
    dq->t.data = NULL;
    memcpy(q->dim_param, v->dim_param, sizeof(q->dim_param));
    memcpy(dq->dim_param, v->dim_param, sizeof(dq->dim_param));
    // Remember the current users before adding ours.
    int n_users = v->n_users;
    struct opq_node **users = opq_arena_alloc(g->arena, sizeof(*users) * (size_t)(n_users + 1));
    if (!users)
        return OPQ_ERR_NOMEM;
    memcpy(users, v->users, sizeof(*users) * (size_t)n_users);

    struct opq_node *qn, *dqn, *cn;
    snprintf(hint, sizeof(hint), "%s_QuantizeLinear", base);
    struct opq_value *qin[3] = {v, scale, zp};
    if ((st = opq_graph_add_node(g, "QuantizeLinear", "", hint, qin, 3, &q, 1, &qn)) != OPQ_OK ||
        (st = add_axis_attr(g, qn, s)) != OPQ_OK)
        return st;
    struct opq_value *dq_src = q;
    if (emulate) {
        snprintf(hint, sizeof(hint), "%s_qmin", base);
        struct opq_value *lo = new_init(g, hint, qdt, 0, NULL);
        snprintf(hint, sizeof(hint), "%s_qmax", base);
        struct opq_value *hi = new_init(g, hint, qdt, 0, NULL);
        snprintf(hint, sizeof(hint), "%s_clipped", base);
        struct opq_value *c = opq_graph_value_new_unique(g, hint);
        if (!lo || !hi || !c)
            return OPQ_ERR_NOMEM;
        // per-axis grids share qmin/qmax (same bit width)
        put_code(lo->t.data, qdt, 0, s->p[0].qmin);
        put_code(hi->t.data, qdt, 0, s->p[0].qmax);
        c->t = q->t;
        memcpy(c->dim_param, v->dim_param, sizeof(c->dim_param));
        snprintf(hint, sizeof(hint), "%s_Clip", base);
        struct opq_value *cin[3] = {q, lo, hi};
        if ((st = opq_graph_add_node(g, "Clip", "", hint, cin, 3, &c, 1, &cn)) != OPQ_OK)
            return st;
        dq_src = c;
    }
    snprintf(hint, sizeof(hint), "%s_DequantizeLinear", base);
    struct opq_value *dqin[3] = {dq_src, scale, zp};
    if ((st = opq_graph_add_node(g, "DequantizeLinear", "", hint, dqin, 3, &dq, 1, &dqn)) != OPQ_OK ||
        (st = add_axis_attr(g, dqn, s)) != OPQ_OK)
        return st;
    // Redirect the original users (each input slot that read v).
    for (int u = 0; u < n_users; u++) {
        struct opq_node *n = users[u]; // listed once per slot: later visits find nothing
        bool redirect = only == NULL;
        for (int k = 0; k < n_only && !redirect; k++)
            redirect = only[k] == n;
        if (!redirect)
            continue;
        for (int i = 0; i < n->n_inputs; i++)
            if (n->inputs[i] == v && (st = opq_node_set_input(g, n, i, dq)) != OPQ_OK)
                return st;
    }
    if (dq_out)
        *dq_out = dq;
    return OPQ_OK;
}

enum opq_status opq_qdq_quantize_weight(struct opq_graph *g, struct opq_value *w,
                                        const struct opq_qdq_spec *s, struct opq_value **dq_out) {
    if (!spec_ok(g, w, s))
        return opq_ctx_status(g->ctx);
    if (!(w->kind & OPQ_VK_INIT) || !w->t.data)
        return opq_set_error(g->ctx, OPQ_ERR_INTERNAL, "'%s' is not an initializer", w->name);
    size_t n;
    if (!opq_tensor_numel(&w->t, &n))
        return opq_set_error(g->ctx, OPQ_ERR_SHAPE, "'%s': shape unknown", w->name);
    size_t inner = 1;
    if (s->n_ch > 1)
        for (int d = s->axis + 1; d < w->t.ndim; d++)
            inner *= (size_t)w->t.shape[d];
    const float *x = w->t.data;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return opq_set_error(g->ctx, OPQ_ERR_NUMERIC, "weight '%s' has NaN or Inf values",
                                 w->name);
    enum opq_dtype qdt = opq_qdq_storage(s->bits, s->is_signed, s->opset);
    char hint[512];
    snprintf(hint, sizeof(hint), "%s_quantized", w->name);
    struct opq_value *qw = new_init(g, hint, qdt, w->t.ndim, w->t.shape);
    if (!qw)
        return OPQ_ERR_NOMEM;
    int32_t *codes = malloc(n * sizeof(int32_t) + 1);
    if (!codes)
        return opq_set_error(g->ctx, OPQ_ERR_NOMEM, "'%s': out of memory", w->name);
    opq_prefault(codes, n * sizeof(int32_t));
    opq_prefault(qw->t.data, qw->t.nbytes);
    enum opq_status qs = opq_quantize_channels(x, n, s->n_ch > 1 ? (size_t)s->n_ch : 1,
                                               s->n_ch > 1 ? inner : n, s->p, codes, s->sig2,
                                               s->err2);
    if (qs == OPQ_OK && qdt == OPQ_DTYPE_INT8)
        for (size_t i = 0; i < n; i++)
            ((int8_t *)qw->t.data)[i] = (int8_t)codes[i];
    else if (qs == OPQ_OK)
        for (size_t i = 0; i < n; i++)
            put_code(qw->t.data, qdt, i, codes[i]);
    free(codes);
    if (qs != OPQ_OK)
        return opq_set_error(g->ctx, qs, "'%s': cannot quantize", w->name);
    struct opq_value *scale, *zp;
    enum opq_status st = make_scale_zp(g, w->name, s, qdt, &scale, &zp);
    if (st != OPQ_OK)
        return st;
    snprintf(hint, sizeof(hint), "%s_dequantized", w->name);
    struct opq_value *dq = opq_graph_value_new_unique(g, hint);
    if (!dq)
        return OPQ_ERR_NOMEM;
    dq->t      = w->t;
    dq->t.data = NULL;
    dq->t.nbytes = 0;
    if ((st = opq_graph_replace_uses(g, w, dq)) != OPQ_OK)
        return st;
    struct opq_node *dqn;
    snprintf(hint, sizeof(hint), "%s_DequantizeLinear", w->name);
    struct opq_value *in[3] = {qw, scale, zp};
    if ((st = opq_graph_add_node(g, "DequantizeLinear", "", hint, in, 3, &dq, 1, &dqn)) != OPQ_OK ||
        (st = add_axis_attr(g, dqn, s)) != OPQ_OK)
        return st;
    if (dq_out)
        *dq_out = dq;
    return OPQ_OK;
}

enum opq_status opq_qdq_quantize_bias(struct opq_graph *g, struct opq_value *b,
                                      const float *scales, int n_scales, struct opq_value **dq_out) {
    size_t n;
    if (!(b->kind & OPQ_VK_INIT) || b->t.dtype != OPQ_DTYPE_FLOAT || b->t.ndim != 1 ||
        !opq_tensor_numel(&b->t, &n) || (n_scales != 1 && (size_t)n_scales != n))
        return opq_set_error(g->ctx, OPQ_ERR_SHAPE, "bias '%s': expected a 1-D float initializer "
                             "matching %d scales", b->name, n_scales);
    const float *x = b->t.data;
    for (size_t i = 0; i < n; i++) {
        double q = nearbyint((double)x[i] / (double)scales[n_scales == 1 ? 0 : i]);
        if (!isfinite(q) || fabs(q) > 2147483647.0)
            return opq_set_error(g->ctx, OPQ_ERR_NUMERIC,
                                 "bias '%s'[%zu] does not fit int32 at scale %g", b->name, i,
                                 (double)scales[n_scales == 1 ? 0 : i]);
    }
    struct opq_qparams *p = opq_arena_alloc(g->arena, sizeof(*p) * (size_t)n_scales);
    if (!p)
        return OPQ_ERR_NOMEM;
    for (int c = 0; c < n_scales; c++)
        p[c] = (struct opq_qparams){.scale = scales[c], .zero_point = 0,
                                    .qmin = INT32_MIN, .qmax = INT32_MAX};
    char hint[512];
    snprintf(hint, sizeof(hint), "%s_quantized", b->name);
    struct opq_value *qb = new_init(g, hint, OPQ_DTYPE_INT32, 1, b->t.shape);
    if (!qb)
        return OPQ_ERR_NOMEM;
    for (size_t i = 0; i < n; i++)
        ((int32_t *)qb->t.data)[i] =
            (int32_t)nearbyint((double)x[i] / (double)scales[n_scales == 1 ? 0 : i]);
    struct opq_qdq_spec s = {.bits = 32, .is_signed = true, .axis = 0, .n_ch = n_scales, .p = p};
    struct opq_value *scale, *zp;
    enum opq_status st = make_scale_zp(g, b->name, &s, OPQ_DTYPE_INT32, &scale, &zp);
    if (st != OPQ_OK)
        return st;
    snprintf(hint, sizeof(hint), "%s_dequantized", b->name);
    struct opq_value *dq = opq_graph_value_new_unique(g, hint);
    if (!dq)
        return OPQ_ERR_NOMEM;
    dq->t      = b->t;
    dq->t.data = NULL;
    dq->t.nbytes = 0;
    if ((st = opq_graph_replace_uses(g, b, dq)) != OPQ_OK)
        return st;
    struct opq_node *dqn;
    snprintf(hint, sizeof(hint), "%s_DequantizeLinear", b->name);
    struct opq_value *in[3] = {qb, scale, zp};
    if ((st = opq_graph_add_node(g, "DequantizeLinear", "", hint, in, 3, &dq, 1, &dqn)) != OPQ_OK ||
        (st = add_axis_attr(g, dqn, &s)) != OPQ_OK)
        return st;
    if (dq_out)
        *dq_out = dq;
    return OPQ_OK;
}
