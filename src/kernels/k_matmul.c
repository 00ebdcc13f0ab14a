/* k_matmul.c: MatMul (numpy semantics) and Gemm, over opq_sgemm.
 * https://onnx.ai/onnx/operators/onnx__MatMul.html, https://onnx.ai/onnx/operators/onnx__Gemm.html
 *
 * MatMul: A [..., M, K] x B [..., K, N] -> [..., M, N] with broadcast batch dims; a 1-D A is
 * [1, K] with M dropped, a 1-D B is [K, 1] with N dropped. When B has no batch (the linear
 * layers of a ViT) the whole of A is one [batch*M, K] GEMM.
 *   VJP: dA = dY B^T, dB = A^T dY, each summed over the batch dims it was broadcast along.
 * Gemm (opset 7+; 11+ makes C optional): Y = alpha op(A) op(B) + beta C, C broadcast to [M, N].
 *   VJP: dop(A) = alpha dY op(B)^T, dop(B) = alpha op(A)^T dY (transposed back when trans*),
 *   dC = beta * sum over broadcast dims of dY. */
#include "blas.h"
#include "k_math.h"

// ---- MatMul -------------------------------------------------------------------------------------

struct mm_geom {
    int64_t m, k, n;
    int nb;                       // batch rank of the output
    int64_t bshape[OPQ_MAX_DIMS]; // output batch dims
    int64_t sa[OPQ_MAX_DIMS];     // A/B batch strides in matrices (0 = broadcast)
    int64_t sb[OPQ_MAX_DIMS];
    int64_t batch; // product of bshape
    bool b_shared; // B has one matrix for every batch entry
    bool a_shared;
};

static enum opq_status mm_geometry(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *a, const struct opq_tensor *b,
                                   struct mm_geom *g) {
    if (a->ndim < 1 || b->ndim < 1)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, "MatMul node '%s': scalar operand", ku_name(n));
    int ra = a->ndim;
    int rb = b->ndim;
    g->m = ra >= 2 ? a->shape[ra - 2] : 1;
    g->k = a->shape[ra - 1];
    int64_t kb = rb >= 2 ? b->shape[rb - 2] : b->shape[0];
    g->n = rb >= 2 ? b->shape[rb - 1] : 1;
    if (kb != g->k)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, "MatMul node '%s': inner dims %lld vs %lld",
                             ku_name(n), (long long)g->k, (long long)kb);
    int ba = ra > 2 ? ra - 2 : 0;
    int bb = rb > 2 ? rb - 2 : 0;
    g->nb = ba > bb ? ba : bb;
    int64_t stride_a = 1;
    int64_t stride_b = 1;
    g->batch = 1;
    g->a_shared = true;
    g->b_shared = true;
    for (int d = g->nb - 1; d >= 0; d--) {
        int da = d - (g->nb - ba);
        int db = d - (g->nb - bb);
        int64_t ea = da >= 0 ? a->shape[da] : 1;
        int64_t eb = db >= 0 ? b->shape[db] : 1;
        if (ea != eb && ea != 1 && eb != 1)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 "MatMul node '%s': batch dims %lld vs "
                                 "%lld cannot broadcast",
                                 ku_name(n), (long long)ea, (long long)eb);
        g->bshape[d] = ea == 1 ? eb : ea;
        g->sa[d] = ea == 1 ? 0 : stride_a;
        g->sb[d] = eb == 1 ? 0 : stride_b;
        stride_a *= ea;
        stride_b *= eb;
        g->batch *= g->bshape[d];
        if (ea != 1)
            g->a_shared = false;
        if (eb != 1)
            g->b_shared = false;
    }
    return OPQ_OK;
}

static enum opq_status matmul_infer(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (n->n_inputs != 2 || !in[0] || !in[1] || in[0]->dtype != OPQ_DTYPE_FLOAT ||
        in[1]->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "MatMul node '%s': needs two float32 "
                             "inputs",
                             ku_name(n));
    struct mm_geom g;
    enum opq_status st = mm_geometry(k, n, in[0], in[1], &g);
    if (st != OPQ_OK)
        return st;
    struct opq_tensor *y = &out[0];
    y->dtype = OPQ_DTYPE_FLOAT;
    y->ndim = 0;
    for (int d = 0; d < g.nb; d++)
        y->shape[y->ndim++] = g.bshape[d];
    if (in[0]->ndim >= 2)
        y->shape[y->ndim++] = g.m;
    if (in[1]->ndim >= 2)
        y->shape[y->ndim++] = g.n;
    return OPQ_OK;
}

// Matrix offsets (in matrices) of A and B for output batch entry i.
static void mm_batch_offsets(const struct mm_geom *g, int64_t i, int64_t *oa, int64_t *ob) {
    *oa = 0;
    *ob = 0;
    for (int d = g->nb - 1; d >= 0; d--) {
        int64_t c = i % g->bshape[d];
        i /= g->bshape[d];
        *oa += c * g->sa[d];
        *ob += c * g->sb[d];
    }
}

struct mm_job {
    const struct mm_geom *g;
    const float *a, *b;
    float *y;
};

static void mm_batch_range(void *user, int64_t i0, int64_t i1) {
    const struct mm_job *j = user;
    const struct mm_geom *g = j->g;
    for (int64_t i = i0; i < i1; i++) {
        int64_t oa;
        int64_t ob;
        mm_batch_offsets(g, i, &oa, &ob);
        opq_sgemm(false, false, g->m, g->n, g->k, 1.0f, j->a + oa * g->m * g->k, g->k,
                  j->b + ob * g->k * g->n, g->n, 0.0f, j->y + i * g->m * g->n, g->n);
    }
}

static enum opq_status matmul_forward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct mm_geom g;
    enum opq_status st = mm_geometry(k, n, in[0], in[1], &g);
    if (st != OPQ_OK || !out[0].data)
        return st;
    const float *a = in[0]->data;
    const float *b = in[1]->data;
    float *y = out[0].data;
    if (g.b_shared) {
        // A's batch entries are all distinct here (b_shared and a broadcasts only matter if
        // A had batch 1 too): one tall GEMM over every row of A
        int64_t rows = g.a_shared ? g.m : g.batch * g.m;
        opq_sgemm_mt(k->pool, false, false, rows, g.n, g.k, 1.0f, a, g.k, b, g.n, 0.0f, y, g.n);
        if (g.a_shared)
            for (int64_t i = 1; i < g.batch; i++)
                memcpy(y + i * g.m * g.n, y, (size_t)(g.m * g.n) * sizeof(float));
        return OPQ_OK;
    }
    // many small products (attention): one whole product per thread at a time
    struct mm_job j = {&g, a, b, y};
    ku_parallel(k, g.batch, 1, mm_batch_range, &j);
    return OPQ_OK;
}

struct mm_bwd_job {
    const struct mm_geom *g;
    const float *a, *b, *dy;
    float *da, *db;
};

// Backward of batch entries i0..i1 when no operand is broadcast (disjoint dA/dB slices).
static void mm_bwd_range(void *user, int64_t i0, int64_t i1) {
    const struct mm_bwd_job *j = user;
    const struct mm_geom *g = j->g;
    int64_t mk = g->m * g->k, kn = g->k * g->n, mn = g->m * g->n;
    for (int64_t i = i0; i < i1; i++) {
        int64_t oa;
        int64_t ob;
        mm_batch_offsets(g, i, &oa, &ob);
        if (j->da)
            opq_sgemm(false, true, g->m, g->k, g->n, 1.0f, j->dy + i * mn, g->n, j->b + ob * kn,
                      g->n, 0.0f, j->da + oa * mk, g->k);
        if (j->db)
            opq_sgemm(true, false, g->k, g->n, g->m, 1.0f, j->a + oa * mk, g->k, j->dy + i * mn,
                      g->n, 0.0f, j->db + ob * kn, g->n);
    }
}

static enum opq_status matmul_backward(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in,
                                       const struct opq_tensor *out, const struct opq_tensor *dout,
                                       struct opq_tensor *din) {
    (void)out;
    struct mm_geom g;
    enum opq_status st = mm_geometry(k, n, in[0], in[1], &g);
    if (st != OPQ_OK)
        return st;
    const float *a = in[0]->data;
    const float *b = in[1]->data;
    const float *dy = dout[0].data;
    float *da = din[0].data;
    float *db = din[1].data;
    if (!dy) {
        if (da)
            memset(da, 0, din[0].nbytes);
        if (db)
            memset(db, 0, din[1].nbytes);
        return OPQ_OK;
    }
    int64_t mk = g.m * g.k;
    int64_t kn = g.k * g.n;
    int64_t mn = g.m * g.n;
    // the two paths below write every element of dA and dB (beta 0)
    if (g.b_shared && !g.a_shared) {
        int64_t rows = g.batch * g.m;
        if (da)
            opq_sgemm_mt(k->pool, false, true, rows, g.k, g.n, 1.0f, dy, g.n, b, g.n, 0.0f, da,
                         g.k);
        if (db)
            opq_sgemm_mt(k->pool, true, false, g.k, g.n, rows, 1.0f, a, g.k, dy, g.n, 0.0f, db,
                         g.n);
        return OPQ_OK;
    }
    // no batch broadcast (attention): every entry owns its slices of dA and dB, one whole
    // entry per thread at a time
    int64_t na = ku_numel(in[0]) / (mk > 0 ? mk : 1);
    int64_t nbm = ku_numel(in[1]) / (kn > 0 ? kn : 1);
    if (na == g.batch && nbm == g.batch) {
        struct mm_bwd_job j = {&g, a, b, dy, da, db};
        ku_parallel(k, g.batch, 1, mm_bwd_range, &j);
        return OPQ_OK;
    }
    // general: accumulate per batch entry in a fixed order (deterministic)
    if (da)
        memset(da, 0, din[0].nbytes);
    if (db)
        memset(db, 0, din[1].nbytes);
    for (int64_t i = 0; i < g.batch; i++) {
        int64_t oa;
        int64_t ob;
        mm_batch_offsets(&g, i, &oa, &ob);
        if (da)
            opq_sgemm(false, true, g.m, g.k, g.n, 1.0f, dy + i * mn, g.n, b + ob * kn, g.n, 1.0f,
                      da + oa * mk, g.k);
        if (db)
            opq_sgemm(true, false, g.k, g.n, g.m, 1.0f, a + oa * mk, g.k, dy + i * mn, g.n, 1.0f,
                      db + ob * kn, g.n);
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_matmul = {
    .min_opset = 1,
    .infer = matmul_infer,
    .forward = matmul_forward,
    .backward = matmul_backward,
};

// ---- Gemm ---------------------------------------------------------------------------------------

struct gemm_params {
    float alpha, beta;
    bool trans_a, trans_b;
};

static enum opq_status gemm_parse(struct opq_kctx *k, struct opq_graph *g, struct opq_node *n) {
    struct gemm_params *p = opq_arena_alloc(g->arena, sizeof(*p));
    if (!p)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "Gemm node '%s': out of memory", ku_name(n));
    p->alpha = opq_node_attr_float(n, "alpha", 1.0f);
    p->beta = opq_node_attr_float(n, "beta", 1.0f);
    p->trans_a = opq_node_attr_int(n, "transA", 0) != 0;
    p->trans_b = opq_node_attr_int(n, "transB", 0) != 0;
    n->params = p;
    return OPQ_OK;
}

static enum opq_status gemm_dims(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *in, int64_t *m, int64_t *kk,
                                 int64_t *nn) {
    const struct gemm_params *p = n->params;
    const struct opq_tensor *a = in[0];
    const struct opq_tensor *b = in[1];
    if (!a || !b || a->ndim != 2 || b->ndim != 2 || a->dtype != OPQ_DTYPE_FLOAT ||
        b->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "Gemm node '%s': A and B must be 2-D "
                             "float32",
                             ku_name(n));
    *m = p->trans_a ? a->shape[1] : a->shape[0];
    *kk = p->trans_a ? a->shape[0] : a->shape[1];
    int64_t k2 = p->trans_b ? b->shape[1] : b->shape[0];
    *nn = p->trans_b ? b->shape[0] : b->shape[1];
    if (k2 != *kk)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, "Gemm node '%s': inner dims %lld vs %lld",
                             ku_name(n), (long long)*kk, (long long)k2);
    const struct opq_tensor *c = n->n_inputs > 2 ? in[2] : NULL;
    if (c) {
        struct opq_tensor y = {.ndim = 2, .shape = {*m, *nn}};
        struct opq_tensor r;
        if (c->dtype != OPQ_DTYPE_FLOAT || c->ndim > 2 || opq_broadcast_shape(c, &y, &r) ||
            !ku_same_shape(&r, &y))
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 "Gemm node '%s': C does not broadcast "
                                 "to [%lld, %lld]",
                                 ku_name(n), (long long)*m, (long long)*nn);
    }
    return OPQ_OK;
}

static enum opq_status gemm_infer(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct opq_tensor *out) {
    int64_t m = 0;
    int64_t kk = 0;
    int64_t nn = 0;
    enum opq_status st = gemm_dims(k, n, in, &m, &kk, &nn);
    if (st != OPQ_OK)
        return st;
    out[0].dtype = OPQ_DTYPE_FLOAT;
    out[0].ndim = 2;
    out[0].shape[0] = m;
    out[0].shape[1] = nn;
    return OPQ_OK;
}

static enum opq_status gemm_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    const struct gemm_params *p = n->params;
    int64_t m = 0;
    int64_t kk = 0;
    int64_t nn = 0;
    enum opq_status st = gemm_dims(k, n, in, &m, &kk, &nn);
    if (st != OPQ_OK || !out[0].data)
        return st;
    float *y = out[0].data;
    const struct opq_tensor *c = n->n_inputs > 2 ? in[2] : NULL;
    float beta = 0.0f;
    if (c && p->beta != 0.0f) {
        struct opq_tensor yt = out[0];
        int64_t s[OPQ_MAX_DIMS] = {0};
        ku_bcast_strides(c, &yt, s);
        const float *cv = c->data;
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < nn; j++)
                y[i * nn + j] = p->beta * cv[i * s[0] + j * s[1]];
        beta = 1.0f;
    }
    opq_sgemm_mt(k->pool, p->trans_a, p->trans_b, m, nn, kk, p->alpha, in[0]->data, in[0]->shape[1],
                 in[1]->data, in[1]->shape[1], beta, y, nn);
    return OPQ_OK;
}

static enum opq_status gemm_backward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in,
                                     const struct opq_tensor *out, const struct opq_tensor *dout,
                                     struct opq_tensor *din) {
    const struct gemm_params *p = n->params;
    int64_t m = 0;
    int64_t kk = 0;
    int64_t nn = 0;
    enum opq_status st = gemm_dims(k, n, in, &m, &kk, &nn);
    if (st != OPQ_OK)
        return st;
    const float *dy = dout[0].data;
    const float *a = in[0]->data;
    const float *b = in[1]->data;
    int64_t la = in[0]->shape[1];
    int64_t lb = in[1]->shape[1];
    for (int j = 0; j < 3 && j < n->n_inputs; j++)
        if (din[j].data && !dy)
            memset(din[j].data, 0, din[j].nbytes);
    if (!dy)
        return OPQ_OK;
    if (din[0].data) {
        if (!p->trans_a) // dA [m,k] = dY [m,n] op(B)^T
            opq_sgemm_mt(k->pool, false, !p->trans_b, m, kk, nn, p->alpha, dy, nn, b, lb, 0.0f,
                         din[0].data, kk);
        else // dA [k,m] = op(B) [k,n] dY^T
            opq_sgemm_mt(k->pool, p->trans_b, true, kk, m, nn, p->alpha, b, lb, dy, nn, 0.0f,
                         din[0].data, m);
    }
    if (din[1].data) {
        if (!p->trans_b) // dB [k,n] = op(A)^T dY
            opq_sgemm_mt(k->pool, !p->trans_a, false, kk, nn, m, p->alpha, a, la, dy, nn, 0.0f,
                         din[1].data, nn);
        else // dB [n,k] = dY^T op(A)
            opq_sgemm_mt(k->pool, true, p->trans_a, nn, kk, m, p->alpha, dy, nn, a, la, 0.0f,
                         din[1].data, kk);
    }
    if (n->n_inputs > 2 && in[2] && din[2].data) {
        const struct opq_tensor *c = in[2];
        int64_t s[OPQ_MAX_DIMS] = {0};
        ku_bcast_strides(c, &out[0], s);
        int64_t nc = ku_numel(c);
        double *acc = opq_arena_alloc(k->scratch, (size_t)nc * sizeof(double) + 1);
        if (!acc)
            return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "Gemm node '%s': out of memory",
                                 ku_name(n));
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < nn; j++)
                acc[i * s[0] + j * s[1]] += (double)dy[i * nn + j];
        float *dc = din[2].data;
        for (int64_t i = 0; i < nc; i++)
            dc[i] = (float)((double)p->beta * acc[i]);
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_gemm = {
    .min_opset = 7,
    .parse = gemm_parse,
    .infer = gemm_infer,
    .forward = gemm_forward,
    .backward = gemm_backward,
};
