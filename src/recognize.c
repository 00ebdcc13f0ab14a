/* recognize.c: pattern matching over the IR (see recognize.h). Each matcher starts from an
 * anchor op (LayerNormalization/ReduceMean, Gelu/Erf/Tanh, Softmax) and walks producers and
 * users; constants are read from initializers or Constant nodes and compared loosely. */
#include "recognize.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "graph.h"

#define MAX_PAT_NODES 16

struct builder {
    struct opq_ctx *ctx;
    const struct opq_graph *g;
    struct opq_recognized *r;
    int cap;
    bool *used; // node already in a LayerNorm/GELU pattern
};

// The scalar value of a constant float value (initializer or Constant output).
static bool const_scalar(const struct opq_value *v, double *out) {
    if (!v)
        return false;
    const struct opq_tensor *t = NULL;
    if ((v->kind & OPQ_VK_INIT) && v->t.data)
        t = &v->t;
    else if (v->producer && v->producer->op == OPQ_OP_CONSTANT) {
        const struct opq_attr *a = opq_node_attr(v->producer, "value");
        if (a && a->type == OPQ_ATTR_TENSOR)
            t = a->t;
        else if ((a = opq_node_attr(v->producer, "value_float")) != NULL) {
            *out = (double)a->f;
            return true;
        }
    }
    if (!t || !t->data)
        return false;
    size_t n;
    if (!opq_tensor_numel(t, &n) || n != 1)
        return false;
    if (t->dtype == OPQ_DTYPE_FLOAT)
        *out = (double)*(const float *)t->data;
    else if (t->dtype == OPQ_DTYPE_DOUBLE)
        *out = *(const double *)t->data;
    else if (t->dtype == OPQ_DTYPE_INT64)
        *out = (double)*(const int64_t *)t->data;
    else
        return false;
    return true;
}

static bool near(double a, double b) {
    return fabs(a - b) <= 1e-3 * fabs(b) + 1e-6;
}

// The only live user of v if it is op `op` (users counted per input slot).
static struct opq_node *sole_user(const struct opq_value *v, enum opq_op op) {
    struct opq_node *u = NULL;
    if (!v || (v->kind & OPQ_VK_OUTPUT))
        return NULL;
    for (int i = 0; i < v->n_users; i++) {
        if (v->users[i]->flags & OPQ_NF_DEAD)
            continue;
        if (u && u != v->users[i])
            return NULL;
        u = v->users[i];
    }
    return u && u->op == op ? u : NULL;
}

// A user of v with op `op` (the first in the users list), or NULL.
static struct opq_node *some_user(const struct opq_value *v, enum opq_op op) {
    for (int i = 0; v && i < v->n_users; i++)
        if (v->users[i]->op == op && !(v->users[i]->flags & OPQ_NF_DEAD))
            return v->users[i];
    return NULL;
}

static struct opq_node *producer_op(const struct opq_value *v, enum opq_op op) {
    return v && v->producer && v->producer->op == op && !(v->producer->flags & OPQ_NF_DEAD)
               ? v->producer
               : NULL;
}

// For a binary node with `a` as one input, the other input.
static struct opq_value *other_input(const struct opq_node *n, const struct opq_value *a) {
    if (n->n_inputs != 2)
        return NULL;
    if (n->inputs[0] == a)
        return n->inputs[1];
    if (n->inputs[1] == a)
        return n->inputs[0];
    return NULL;
}

static int cmp_node(const void *a, const void *b) {
    const struct opq_node *x = *(struct opq_node *const *)a;
    const struct opq_node *y = *(struct opq_node *const *)b;
    return (x->index > y->index) - (x->index < y->index);
}

static enum opq_status add_pattern(struct builder *b, enum opq_pattern_kind kind,
                                   enum opq_pattern_variant var, struct opq_node **nodes, int n,
                                   struct opq_value *in, struct opq_value *out,
                                   struct opq_pattern **res) {
    struct opq_recognized *r = b->r;
    if (r->n_items == b->cap) {
        int ncap = b->cap ? 2 * b->cap : 32;
        struct opq_pattern *items = opq_arena_alloc(r->arena, sizeof(*items) * (size_t)ncap);
        if (!items)
            return opq_set_error(b->ctx, OPQ_ERR_NOMEM, "out of memory recognising patterns");
        if (r->n_items)
            memcpy(items, r->items, sizeof(*items) * (size_t)r->n_items);
        r->items = items;
        b->cap = ncap;
    }
    struct opq_pattern *p = &r->items[r->n_items++];
    memset(p, 0, sizeof(*p));
    p->kind = kind;
    p->variant = var;
    p->nodes = opq_arena_memdup(r->arena, nodes, sizeof(*nodes) * (size_t)(n ? n : 1));
    if (!p->nodes)
        return opq_set_error(b->ctx, OPQ_ERR_NOMEM, "out of memory recognising patterns");
    p->n_nodes = n;
    qsort(p->nodes, (size_t)n, sizeof(*p->nodes), cmp_node);
    p->first = n ? p->nodes[0]->index : -1;
    p->last = n ? p->nodes[n - 1]->index : -1;
    p->input = in;
    p->output = out;
    p->ln1 = -1;
    p->ln2 = -1;
    r->n_by_kind[kind]++;
    for (int i = 0; kind <= OPQ_PAT_GELU && i < n; i++)
        b->used[nodes[i]->index] = true;
    if (res)
        *res = p;
    return OPQ_OK;
}

// ---- LayerNorm ----------------------------------------------------------------------------------

static enum opq_status match_ln_chain(struct builder *b, struct opq_node *r1) {
    struct opq_node *ns[MAX_PAT_NODES];
    int k = 0;
    struct opq_value *x = r1->inputs[0];
    ns[k++] = r1;
    struct opq_node *sub = NULL;
    // x feeds both ReduceMean and Sub(x, mean)
    for (int i = 0; x && i < x->n_users && !sub; i++) {
        struct opq_node *u = x->users[i];
        if (u->op == OPQ_OP_SUB && u->n_inputs == 2 && u->inputs[0] == x &&
            u->inputs[1] == r1->outputs[0])
            sub = u;
    }
    if (!sub)
        return OPQ_OK;
    ns[k++] = sub;
    struct opq_value *d = sub->outputs[0];
    struct opq_node *sq = NULL;
    struct opq_node *dv = NULL;
    for (int i = 0; i < d->n_users; i++) {
        struct opq_node *u = d->users[i];
        double e;
        if (u->op == OPQ_OP_POW && u->inputs[0] == d && const_scalar(u->inputs[1], &e) &&
            near(e, 2.0))
            sq = u;
        else if (u->op == OPQ_OP_MUL && u->inputs[0] == d && u->inputs[1] == d)
            sq = u;
        else if (u->op == OPQ_OP_DIV && u->inputs[0] == d)
            dv = u;
    }
    if (!sq || !dv)
        return OPQ_OK;
    ns[k++] = sq;
    struct opq_node *r2 = sole_user(sq->outputs[0], OPQ_OP_REDUCEMEAN);
    struct opq_node *add = r2 ? sole_user(r2->outputs[0], OPQ_OP_ADD) : NULL;
    struct opq_node *sqr = add ? sole_user(add->outputs[0], OPQ_OP_SQRT) : NULL;
    if (!sqr || dv->inputs[1] != sqr->outputs[0])
        return OPQ_OK;
    ns[k++] = r2;
    ns[k++] = add;
    ns[k++] = sqr;
    ns[k++] = dv;
    struct opq_value *out = dv->outputs[0];
    struct opq_node *mul = sole_user(out, OPQ_OP_MUL);
    if (mul) {
        ns[k++] = mul;
        out = mul->outputs[0];
        struct opq_node *bias = sole_user(out, OPQ_OP_ADD);
        if (bias) {
            ns[k++] = bias;
            out = bias->outputs[0];
        }
    }
    return add_pattern(b, OPQ_PAT_LAYERNORM, OPQ_PV_DECOMPOSED, ns, k, x, out, NULL);
}

// ---- GELU ---------------------------------------------------------------------------------------

// From the activation node's output t (Erf or Tanh): Add(t, 1) -> Mul(x or x/2) [-> Mul(0.5)].
static enum opq_status match_gelu_tail(struct builder *b, struct opq_node **ns, int k,
                                       struct opq_value *x, struct opq_value *t,
                                       enum opq_pattern_variant var) {
    struct opq_node *add = sole_user(t, OPQ_OP_ADD);
    double c;
    if (!add || !const_scalar(other_input(add, t), &c) || !near(c, 1.0))
        return OPQ_OK;
    ns[k++] = add;
    struct opq_node *m1 = sole_user(add->outputs[0], OPQ_OP_MUL);
    if (!m1)
        return OPQ_OK;
    ns[k++] = m1;
    struct opq_value *oth = other_input(m1, add->outputs[0]);
    struct opq_value *out = NULL;
    struct opq_node *half = producer_op(oth, OPQ_OP_MUL);
    if (oth == x) {
        struct opq_node *m2 = sole_user(m1->outputs[0], OPQ_OP_MUL);
        if (!m2 || !const_scalar(other_input(m2, m1->outputs[0]), &c) || !near(c, 0.5))
            return OPQ_OK;
        ns[k++] = m2;
        out = m2->outputs[0];
    } else if (half && other_input(half, x) && const_scalar(other_input(half, x), &c) &&
               near(c, 0.5)) {
        ns[k++] = half;
        out = m1->outputs[0];
    } else {
        return OPQ_OK;
    }
    return add_pattern(b, OPQ_PAT_GELU, var, ns, k, x, out, NULL);
}

static enum opq_status match_gelu_erf(struct builder *b, struct opq_node *erf) {
    struct opq_node *ns[MAX_PAT_NODES];
    struct opq_node *pre = erf->inputs[0] ? erf->inputs[0]->producer : NULL;
    double c;
    struct opq_value *x = NULL;
    if (pre && pre->op == OPQ_OP_DIV && const_scalar(pre->inputs[1], &c) && near(c, sqrt(2.0)))
        x = pre->inputs[0];
    else if (pre && pre->op == OPQ_OP_MUL) {
        for (int j = 0; j < 2 && !x; j++)
            if (const_scalar(pre->inputs[j], &c) && near(c, sqrt(0.5)))
                x = pre->inputs[1 - j];
    }
    if (!x)
        return OPQ_OK;
    ns[0] = pre;
    ns[1] = erf;
    return match_gelu_tail(b, ns, 2, x, erf->outputs[0], OPQ_PV_ERF);
}

static enum opq_status match_gelu_tanh(struct builder *b, struct opq_node *th) {
    struct opq_node *ns[MAX_PAT_NODES];
    int k = 0;
    // Tanh(Mul(sqrt(2/pi), Add(x, Mul(0.044715, x^3)))): collect the arithmetic feeding Tanh
    struct opq_node *m = producer_op(th->inputs[0], OPQ_OP_MUL);
    double c;
    struct opq_value *inner = NULL;
    for (int j = 0; m && j < 2 && !inner; j++)
        if (const_scalar(m->inputs[j], &c) && near(c, sqrt(2.0 / 3.14159265358979323846)))
            inner = m->inputs[1 - j];
    struct opq_node *add = producer_op(inner, OPQ_OP_ADD);
    if (!add)
        return OPQ_OK;
    ns[k++] = m;
    ns[k++] = add;
    // one Add operand is x, the other Mul(0.044715, cube(x))
    for (int j = 0; j < 2; j++) {
        struct opq_value *x = add->inputs[j];
        struct opq_node *mc = producer_op(add->inputs[1 - j], OPQ_OP_MUL);
        struct opq_value *cub = NULL;
        for (int q = 0; mc && q < 2 && !cub; q++)
            if (const_scalar(mc->inputs[q], &c) && near(c, 0.044715))
                cub = mc->inputs[1 - q];
        struct opq_node *pw = producer_op(cub, OPQ_OP_POW);
        int kk = k;
        if (pw && pw->inputs[0] == x && const_scalar(pw->inputs[1], &c) && near(c, 3.0)) {
            ns[kk++] = mc;
            ns[kk++] = pw;
        } else {
            struct opq_node *mm = producer_op(cub, OPQ_OP_MUL); // (x*x)*x
            struct opq_value *sq = mm ? other_input(mm, x) : NULL;
            struct opq_node *m2 = producer_op(sq, OPQ_OP_MUL);
            if (!m2 || m2->inputs[0] != x || m2->inputs[1] != x)
                continue;
            ns[kk++] = mc;
            ns[kk++] = mm;
            ns[kk++] = m2;
        }
        ns[kk++] = th;
        return match_gelu_tail(b, ns, kk, x, th->outputs[0], OPQ_PV_TANH);
    }
    return OPQ_OK;
}

// ---- attention ----------------------------------------------------------------------------------

// sm: a Softmax, or the Exp of the deferred form (passes/defer_softmax.c)
// Exp(S - ReduceMax(S)) . V / ReduceSum(...).
static enum opq_status match_attention(struct builder *b, struct opq_node *sm) {
    struct opq_node *ns[MAX_PAT_NODES];
    int k = 0;
    struct opq_value *v = sm->inputs[0];
    struct opq_node *p = v ? v->producer : NULL;
    if (sm->op == OPQ_OP_EXP) {
        struct opq_node *sub = producer_op(v, OPQ_OP_SUB);
        struct opq_node *mx = sub ? producer_op(sub->inputs[1], OPQ_OP_REDUCEMAX) : NULL;
        if (!mx || mx->inputs[0] != sub->inputs[0])
            return OPQ_OK;
        ns[k++] = mx;
        ns[k++] = sub;
        v = sub->inputs[0];
        p = v ? v->producer : NULL;
    }
    if (p && p->op == OPQ_OP_ADD) { // mask
        ns[k++] = p;
        // the scores come from whichever operand is not a constant/graph input
        struct opq_node *a = p->inputs[0] ? p->inputs[0]->producer : NULL;
        struct opq_node *c = p->inputs[1] ? p->inputs[1]->producer : NULL;
        p = a && (a->op == OPQ_OP_MATMUL || a->op == OPQ_OP_MUL || a->op == OPQ_OP_DIV) ? a : c;
    }
    if (p && (p->op == OPQ_OP_MUL || p->op == OPQ_OP_DIV)) { // scale
        ns[k++] = p;
        struct opq_node *a = p->inputs[0] ? p->inputs[0]->producer : NULL;
        struct opq_node *c = p->inputs[1] ? p->inputs[1]->producer : NULL;
        p = a && a->op == OPQ_OP_MATMUL ? a : c;
    }
    if (!p || p->op != OPQ_OP_MATMUL)
        return OPQ_OK;
    struct opq_node *qk = p;
    ns[k++] = qk;
    ns[k++] = sm;
    struct opq_node *pv = some_user(sm->outputs[0], OPQ_OP_MATMUL);
    if (!pv || pv->inputs[0] != sm->outputs[0])
        return OPQ_OK;
    ns[k++] = pv;
    struct opq_pattern *pat = NULL;
    enum opq_status st =
        add_pattern(b, OPQ_PAT_ATTENTION, OPQ_PV_NONE, ns, k, qk->inputs[0], pv->outputs[0], &pat);
    if (st == OPQ_OK) {
        pat->qk = qk;
        pat->softmax = sm;
        pat->pv = pv;
    }
    return st;
}

// ---- blocks -------------------------------------------------------------------------------------

// The residual Add after `from` (node index) that reads x, or NULL.
static struct opq_node *residual_add(const struct opq_value *x, int after) {
    struct opq_node *best = NULL;
    for (int i = 0; x && i < x->n_users; i++) {
        struct opq_node *u = x->users[i];
        if (u->op == OPQ_OP_ADD && u->index > after && (!best || u->index < best->index))
            best = u;
    }
    return best;
}

static bool range_has(const struct opq_recognized *r, enum opq_pattern_kind kind, int lo, int hi) {
    for (int i = 0; i < r->n_items; i++)
        if (r->items[i].kind == kind && r->items[i].first > lo && r->items[i].last < hi)
            return true;
    return false;
}

static bool range_has_op(const struct opq_graph *g, int lo, int hi) {
    for (int i = lo + 1; i < hi; i++)
        if (g->nodes[i]->op == OPQ_OP_MATMUL || g->nodes[i]->op == OPQ_OP_GEMM)
            return true;
    return false;
}

static enum opq_status match_blocks(struct builder *b) {
    struct opq_recognized *r = b->r;
    int nln = r->n_items; // LayerNorms come first
    for (int i = 0; i < nln; i++) {
        const struct opq_pattern *ln1 = &r->items[i];
        if (ln1->kind != OPQ_PAT_LAYERNORM)
            continue;
        struct opq_node *a1 = residual_add(ln1->input, ln1->last);
        if (!a1 || !range_has(r, OPQ_PAT_ATTENTION, ln1->last, a1->index))
            continue;
        int j2 = -1;
        for (int j = 0; j < nln; j++)
            if (r->items[j].kind == OPQ_PAT_LAYERNORM && r->items[j].input == a1->outputs[0])
                j2 = j;
        if (j2 < 0)
            continue;
        const struct opq_pattern *ln2 = &r->items[j2];
        struct opq_node *a2 = residual_add(a1->outputs[0], ln2->last);
        if (!a2 || !range_has_op(b->g, ln2->last, a2->index))
            continue;
        int first = ln1->first;
        int last = a2->index;
        int n = last - first + 1;
        struct opq_node **ns = opq_arena_alloc(r->arena, sizeof(*ns) * (size_t)n);
        if (!ns)
            return opq_set_error(b->ctx, OPQ_ERR_NOMEM, "out of memory recognising blocks");
        int k = 0;
        for (int q = first; q <= last; q++)
            if (!(b->g->nodes[q]->flags & OPQ_NF_DEAD))
                ns[k++] = b->g->nodes[q];
        struct opq_pattern *p = NULL;
        enum opq_status st =
            add_pattern(b, OPQ_PAT_BLOCK, OPQ_PV_NONE, ns, k, ln1->input, a2->outputs[0], &p);
        if (st != OPQ_OK)
            return st;
        p->ln1 = i;
        p->ln2 = j2;
        p->res1 = a1;
        p->res2 = a2;
    }
    return OPQ_OK;
}

enum opq_status opq_recognize(struct opq_ctx *ctx, const struct opq_graph *g,
                              struct opq_recognized **out) {
    enum opq_status st = OPQ_OK;
    *out = NULL;
    struct builder b = {.ctx = ctx, .g = g};
    struct opq_arena *a = opq_arena_new(ctx);
    if (!a)
        return opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory recognising patterns");
    b.r = opq_arena_alloc(a, sizeof(*b.r));
    b.used = opq_arena_alloc(a, (size_t)g->n_nodes + 1);
    if (!b.r || !b.used) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory recognising patterns");
        goto out_fail;
    }
    b.r->arena = a;
    // pass 1: LayerNorms (the items array starts with them: blocks index into it)
    for (int i = 0; i < g->n_nodes && st == OPQ_OK; i++) {
        struct opq_node *n = g->nodes[i];
        if (n->flags & OPQ_NF_DEAD)
            continue;
        if (n->op == OPQ_OP_LAYERNORM)
            st = add_pattern(&b, OPQ_PAT_LAYERNORM, OPQ_PV_OP, &n, 1, n->inputs[0], n->outputs[0],
                             NULL);
        else if (n->op == OPQ_OP_REDUCEMEAN && !b.used[i])
            st = match_ln_chain(&b, n);
    }
    // pass 2: GELUs and attention cores
    for (int i = 0; i < g->n_nodes && st == OPQ_OK; i++) {
        struct opq_node *n = g->nodes[i];
        if ((n->flags & OPQ_NF_DEAD) || b.used[i])
            continue;
        if (n->op == OPQ_OP_GELU)
            st = add_pattern(&b, OPQ_PAT_GELU, OPQ_PV_OP, &n, 1, n->inputs[0], n->outputs[0], NULL);
        else if (n->op == OPQ_OP_ERF)
            st = match_gelu_erf(&b, n);
        else if (n->op == OPQ_OP_TANH)
            st = match_gelu_tanh(&b, n);
        else if (n->op == OPQ_OP_SOFTMAX || n->op == OPQ_OP_EXP)
            st = match_attention(&b, n);
    }
    if (st == OPQ_OK)
        st = match_blocks(&b);
    if (st != OPQ_OK)
        goto out_fail;
    *out = b.r;
    return OPQ_OK;
out_fail:
    opq_arena_free(a);
    return st;
}

void opq_recognized_free(struct opq_recognized *r) {
    if (r)
        opq_arena_free(r->arena);
}

struct sbuf {
    char *buf;
    size_t cap, len;
};

static void sb_printf(struct sbuf *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sbuf *s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = s->len < s->cap ? s->cap - s->len : 0;
    int n = vsnprintf(room ? s->buf + s->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0)
        s->len += (size_t)n;
}

size_t opq_recognize_describe(const struct opq_recognized *r, char *buf, size_t cap) {
    struct sbuf s = {buf, cap, 0};
    if (buf && cap)
        buf[0] = '\0';
    static const char *const vname[] = {"op", "decomposed", "erf chain", "tanh chain", ""};
    static const char *const kname[] = {"LayerNorm", "GELU", "attention", "block"};
    for (int kind = 0; kind < 3; kind++) {
        int cnt[5] = {0};
        for (int i = 0; i < r->n_items; i++)
            if ((int)r->items[i].kind == kind)
                cnt[r->items[i].variant]++;
        sb_printf(&s, "%-10s %d", kname[kind], r->n_by_kind[kind]);
        const char *sep = " (";
        for (int v = 0; v < 4; v++)
            if (cnt[v]) {
                sb_printf(&s, "%s%d %s", sep, cnt[v], vname[v]);
                sep = ", ";
            }
        sb_printf(&s, "%s\n", sep[0] == ',' ? ")" : "");
    }
    sb_printf(&s, "%-10s %d\n", kname[3], r->n_by_kind[OPQ_PAT_BLOCK]);
    int bi = 0;
    for (int i = 0; i < r->n_items; i++) {
        const struct opq_pattern *p = &r->items[i];
        if (p->kind != OPQ_PAT_BLOCK)
            continue;
        sb_printf(&s, "  block %d: nodes %d..%d (%d), in '%s' -> out '%s'\n", bi++, p->first,
                  p->last, p->n_nodes, p->input ? p->input->name : "?",
                  p->output ? p->output->name : "?");
    }
    return s.len;
}
