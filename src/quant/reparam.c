/* reparam.c: post-LayerNorm range reparameterization (see reparam.h). */
#include "quant/reparam.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "arena.h"

static bool is_float_init(const struct opq_value *v) {
    return v && (v->kind & OPQ_VK_INIT) && v->t.dtype == OPQ_DTYPE_FLOAT && v->t.data &&
           !(v->kind & OPQ_VK_INPUT);
}

// For a consumer n of x: the weight and its layout. rows_are_c: W[c, :] (MatMul, Gemm transB=0);
// otherwise W[:, c] (Gemm transB=1).
static bool consumer_weight(const struct opq_node *n, const struct opq_value *x, int64_t C,
                            struct opq_value **w, bool *rows_are_c) {
    if (n->flags & OPQ_NF_DEAD || n->n_inputs < 2 || n->inputs[0] != x || n->inputs[1] == x)
        return false;
    *w = n->inputs[1];
    if (!is_float_init(*w) || (*w)->t.ndim != 2)
        return false;
    if (n->op == OPQ_OP_MATMUL) {
        *rows_are_c = true;
    } else if (n->op == OPQ_OP_GEMM) {
        if (opq_node_attr_int(n, "transA", 0) != 0)
            return false;
        *rows_are_c = opq_node_attr_int(n, "transB", 0) == 0;
    } else {
        return false;
    }
    return (*rows_are_c ? (*w)->t.shape[0] : (*w)->t.shape[1]) == C;
}

// Last dim of a value's known shape, or -1.
static int64_t last_dim(const struct opq_value *v) {
    return (v && v->t.ndim > 0) ? v->t.shape[v->t.ndim - 1] : -1;
}

// True if node n (reading x as its data input) moves elements without mixing the channels of the
// last axis: the channel of every element stays (flat index mod C).
static bool channel_preserving(const struct opq_node *n, const struct opq_value *x, int64_t C) {
    if (n->flags & OPQ_NF_DEAD || n->n_inputs < 1 || n->inputs[0] != x || n->n_outputs < 1 ||
        !n->outputs[0] || (n->outputs[0]->kind & OPQ_VK_OUTPUT))
        return false;
    for (int i = 1; i < n->n_inputs; i++)
        if (n->inputs[i] == x)
            return false;
    const struct opq_value *y = n->outputs[0];
    int r = x->t.ndim;
    switch (n->op) {
    case OPQ_OP_IDENTITY:
    case OPQ_OP_DROPOUT:
        return true;
    case OPQ_OP_GATHER: {
        int64_t axis = opq_node_attr_int(n, "axis", 0);
        if (axis < 0)
            axis += r;
        return r > 0 && axis >= 0 && axis < r - 1 && last_dim(y) == C;
    }
    case OPQ_OP_SLICE: {
        // axes must be a known initializer without the last axis (the default, every axis, is
        // not accepted)
        const struct opq_value *ax = n->n_inputs > 3 ? n->inputs[3] : NULL;
        if (!ax || !(ax->kind & OPQ_VK_INIT) || !ax->t.data || ax->t.dtype != OPQ_DTYPE_INT64)
            return false;
        size_t na;
        if (!opq_tensor_numel(&ax->t, &na))
            return false;
        for (size_t k = 0; k < na; k++) {
            int64_t a = ((const int64_t *)ax->t.data)[k];
            if (a < 0)
                a += r;
            if (a == r - 1)
                return false;
        }
        return last_dim(y) == C;
    }
    case OPQ_OP_TRANSPOSE: {
        const struct opq_attr *perm = opq_node_attr(n, "perm");
        return perm && perm->type == OPQ_ATTR_INTS && perm->n == r && r > 0 &&
               perm->ints[r - 1] == r - 1;
    }
    case OPQ_OP_RESHAPE:
    case OPQ_OP_FLATTEN:
    case OPQ_OP_SQUEEZE:
    case OPQ_OP_UNSQUEEZE:
        // row-major order keeps (flat index mod C) when the last dim stays C
        return last_dim(x) == C && last_dim(y) == C;
    default:
        return false;
    }
}

// Walks from v through channel-preserving ops. Collects the values whose distribution the rewrite
// changes (v and everything on the way) and the linear consumers reading them. False if some
// path ends anywhere else (the rewrite would not be exact).
struct chain {
    struct opq_value *vals[64];
    int               n_vals;
    struct opq_node  *lin[64];
    struct opq_value *lin_in[64];
    int               n_lin;
};

static bool walk(const struct opq_value *v, int64_t C, struct chain *ch) {
    if (ch->n_vals >= 64 || v->n_users == 0 || (v->kind & OPQ_VK_OUTPUT))
        return false;
    ch->vals[ch->n_vals++] = (struct opq_value *)v;
    for (int u = 0; u < v->n_users; u++) {
        struct opq_node *n = v->users[u];
        bool dup = false;
        for (int k = 0; k < u; k++)
            dup |= v->users[k] == n;
        if (dup)
            continue;
        struct opq_value *w;
        bool rows;
        if (n->op == OPQ_OP_SHAPE || n->op == OPQ_OP_SIZE)
            continue; // they read the shape only, which the rewrite keeps
        if (consumer_weight(n, v, C, &w, &rows)) {
            if (ch->n_lin >= 64)
                return false;
            ch->lin[ch->n_lin]      = n;
            ch->lin_in[ch->n_lin++] = (struct opq_value *)v;
        } else if (!channel_preserving(n, v, C) || !walk(n->outputs[0], C, ch)) {
            return false;
        }
    }
    return true;
}

static bool site_chain(const struct opq_reparam_site *s, struct chain *ch) {
    memset(ch, 0, sizeof(*ch));
    if (!s->out || !is_float_init(s->gamma) || s->gamma->t.ndim != 1)
        return false;
    int64_t C = s->gamma->t.shape[0];
    if (s->beta && (!is_float_init(s->beta) || s->beta->t.ndim != 1 || s->beta->t.shape[0] != C))
        return false;
    return walk(s->out, C, ch) && ch->n_lin > 0;
}

bool opq_reparam_applicable(const struct opq_graph *g, const struct opq_reparam_site *s) {
    (void)g;
    struct chain ch;
    return site_chain(s, &ch);
}

int opq_reparam_changed_values(const struct opq_reparam_site *s, struct opq_value **out, int cap) {
    struct chain ch;
    if (!site_chain(s, &ch))
        return 0;
    int n = ch.n_vals < cap ? ch.n_vals : cap;
    for (int i = 0; i < n; i++)
        out[i] = ch.vals[i];
    return n;
}

// Makes v private to node n's input slot i (copies it if anything else uses it) and returns it.
static struct opq_value *private_init(struct opq_graph *g, struct opq_node *n, int slot) {
    struct opq_value *v = n->inputs[slot];
    if (v->n_users == 1 && !(v->kind & OPQ_VK_OUTPUT))
        return v;
    char hint[512];
    snprintf(hint, sizeof(hint), "%s_reparam", v->name);
    struct opq_value *c = opq_graph_value_new_unique(g, hint);
    if (!c || opq_graph_set_initializer(g, c, &v->t) != OPQ_OK ||
        opq_node_set_input(g, n, slot, c) != OPQ_OK)
        return NULL;
    return c;
}

// The bias the consumer's output flows into: Gemm input C (created if absent), or for a MatMul
// the initializer operand of its single Add user (an Add is inserted if there is none). Returns
// the float array of N entries, private to this consumer.
static float *consumer_bias(struct opq_graph *g, struct opq_node *n, int64_t N) {
    char hint[512];
    if (n->op == OPQ_OP_GEMM) {
        if (n->n_inputs >= 3 && n->inputs[2]) {
            struct opq_value *b = n->inputs[2];
            if (!is_float_init(b) || b->t.ndim != 1 || b->t.shape[0] != N)
                return NULL; // broadcast forms of C: not rewritten
            if (opq_node_attr_float(n, "beta", 1.0f) != 1.0f)
                return NULL;
            b = private_init(g, n, 2);
            return b ? b->t.data : NULL;
        }
        return NULL; // Gemm without C: caller falls back (not applicable)
    }
    struct opq_value *y = n->outputs[0];
    if (y->n_users == 1 && !(y->kind & OPQ_VK_OUTPUT)) {
        struct opq_node *add = y->users[0];
        if (add->op == OPQ_OP_ADD && add->n_inputs == 2) {
            int slot = add->inputs[0] == y ? 1 : 0;
            struct opq_value *b = add->inputs[slot];
            if (add->inputs[1 - slot] == y && is_float_init(b) && b->t.ndim == 1 &&
                b->t.shape[0] == N) {
                b = private_init(g, add, slot);
                return b ? b->t.data : NULL;
            }
        }
    }
    // No bias Add: y -> Add(y, b0) with b0 = 0, inserted before the users of y.
    snprintf(hint, sizeof(hint), "%s_reparam_bias", n->name[0] ? n->name : y->name);
    struct opq_value *b0 = opq_graph_value_new_unique(g, hint);
    snprintf(hint, sizeof(hint), "%s_biased", y->name);
    struct opq_value *yb = opq_graph_value_new_unique(g, hint);
    if (!b0 || !yb)
        return NULL;
    float *zeros = opq_arena_alloc(g->arena, sizeof(float) * (size_t)N);
    if (!zeros)
        return NULL;
    struct opq_tensor t = {.dtype = OPQ_DTYPE_FLOAT, .ndim = 1, .shape = {N}, .data = zeros,
                           .nbytes = sizeof(float) * (size_t)N};
    if (opq_graph_set_initializer(g, b0, &t) != OPQ_OK)
        return NULL;
    yb->t      = y->t;
    yb->t.data = NULL;
    memcpy(yb->dim_param, y->dim_param, sizeof(yb->dim_param));
    if (y->kind & OPQ_VK_OUTPUT)
        return NULL;
    if (opq_graph_replace_uses(g, y, yb) != OPQ_OK)
        return NULL;
    struct opq_value *in[2] = {y, b0};
    struct opq_node *add;
    snprintf(hint, sizeof(hint), "%s_reparam_add", n->name);
    if (opq_graph_add_node(g, "Add", "", hint, in, 2, &yb, 1, &add) != OPQ_OK)
        return NULL;
    return b0->t.data;
}

enum opq_status opq_reparam_apply(struct opq_graph *g, const struct opq_reparam_site *s,
                                  const float *lo, const float *hi, float alpha) {
    if (!opq_reparam_applicable(g, s))
        return opq_set_error(g->ctx, OPQ_ERR_INTERNAL, "reparam: '%s' is not a reparam site",
                             s->out ? s->out->name : "?");
    int64_t C = s->gamma->t.shape[0];
    double  H = 0.0, T = 0.0;
    for (int64_t c = 0; c < C; c++) {
        if (!isfinite(lo[c]) || !isfinite(hi[c]) || hi[c] < lo[c])
            return opq_set_error(g->ctx, OPQ_ERR_NUMERIC, "reparam '%s': bad range for channel %lld",
                                 s->out->name, (long long)c);
        H += 0.5 * ((double)hi[c] - (double)lo[c]);
        T += 0.5 * ((double)hi[c] + (double)lo[c]);
    }
    H /= (double)C;
    T /= (double)C;
    if (!(H > 0.0))
        return OPQ_OK; // constant output: nothing to equalise
    double *r = opq_arena_alloc(g->arena, sizeof(double) * (size_t)C);
    double *t = opq_arena_alloc(g->arena, sizeof(double) * (size_t)C);
    if (!r || !t)
        return OPQ_ERR_NOMEM;
    for (int64_t c = 0; c < C; c++) {
        double h = 0.5 * ((double)hi[c] - (double)lo[c]);
        t[c]     = 0.5 * ((double)hi[c] + (double)lo[c]);
        // channels that never vary keep their scale (r = 1) and only move to the common centre
        r[c] = h > 0.0 ? pow(h / H, (double)alpha) : 1.0;
    }
    // Consumers first (they may need a private copy, which changes nothing in the LN).
    struct chain ch;
    site_chain(s, &ch);
    for (int u = 0; u < ch.n_lin; u++) {
        struct opq_node *n = ch.lin[u];
        struct opq_value *w;
        bool rows;
        consumer_weight(n, ch.lin_in[u], C, &w, &rows);
        int64_t N = rows ? w->t.shape[1] : w->t.shape[0];
        float *b = consumer_bias(g, n, N);
        if (!b)
            return opq_set_error(g->ctx, OPQ_ERR_UNSUPPORTED,
                                 "reparam: cannot fold a bias into '%s' (%s)", n->name, n->op_type);
        w = private_init(g, n, 1);
        if (!w)
            return OPQ_ERR_NOMEM;
        float *W = w->t.data;
        for (int64_t j = 0; j < N; j++) {
            double acc = 0.0;
            for (int64_t c = 0; c < C; c++) {
                float *wc = rows ? &W[c * N + j] : &W[j * C + c];
                acc += (t[c] - r[c] * T) * (double)*wc;
                *wc = (float)((double)*wc * r[c]);
            }
            b[j] = (float)((double)b[j] + acc);
        }
    }
    // The LN affine.
    struct opq_value *beta = s->beta;
    if (!beta) {
        if (!s->ln || s->ln->n_inputs > 3)
            return opq_set_error(g->ctx, OPQ_ERR_INTERNAL, "reparam '%s': no beta", s->out->name);
        char hint[512];
        snprintf(hint, sizeof(hint), "%s_beta", s->out->name);
        beta = opq_graph_value_new_unique(g, hint);
        float *z = opq_arena_alloc(g->arena, sizeof(float) * (size_t)C);
        if (!beta || !z)
            return OPQ_ERR_NOMEM;
        struct opq_tensor bt = {.dtype = OPQ_DTYPE_FLOAT, .ndim = 1, .shape = {C}, .data = z,
                                .nbytes = sizeof(float) * (size_t)C};
        if (opq_graph_set_initializer(g, beta, &bt) != OPQ_OK)
            return OPQ_ERR_NOMEM;
        if (s->ln->n_inputs < 3) {
            // grow the input list to 3 (B is input 2)
            struct opq_value **in = opq_arena_alloc(g->arena, sizeof(*in) * 4);
            if (!in)
                return OPQ_ERR_NOMEM;
            memcpy(in, s->ln->inputs, sizeof(*in) * (size_t)s->ln->n_inputs);
            s->ln->inputs   = in;
            s->ln->n_inputs = 3;
        }
        if (opq_node_set_input(g, s->ln, 2, beta) != OPQ_OK)
            return OPQ_ERR_NOMEM;
    }
    struct opq_node *gn = s->gamma->users[0], *bn = beta->users[0];
    int gslot = 0, bslot = 0;
    for (int i = 0; i < gn->n_inputs; i++)
        if (gn->inputs[i] == s->gamma)
            gslot = i;
    for (int i = 0; i < bn->n_inputs; i++)
        if (bn->inputs[i] == beta)
            bslot = i;
    struct opq_value *gm = private_init(g, gn, gslot);
    struct opq_value *bt = private_init(g, bn, bslot);
    if (!gm || !bt)
        return OPQ_ERR_NOMEM;
    float *G = gm->t.data, *B = bt->t.data;
    for (int64_t c = 0; c < C; c++) {
        G[c] = (float)((double)G[c] / r[c]);
        B[c] = (float)(((double)B[c] - t[c]) / r[c] + T);
    }
    return OPQ_OK;
}
