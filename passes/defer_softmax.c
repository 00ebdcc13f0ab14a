/* defer_softmax.c: moves the softmax normalization of attention past the P.V MatMul, so the
 * quantized matmul operand has every row's maximum at 1.
 *
 * Why: a per-tensor quantizer of the post-softmax probabilities P sees rows whose largest entry
 * is anywhere in (0, 1]. A flat row (max 0.05) falls below half a 4-bit step and becomes zeros;
 * measured by keeping one class of activation at 8 bits in an otherwise W4A4 model, the
 * post-softmax input of P.V was the largest single loss on the ViT fixtures (tv_vit +0.85 pt,
 * vit_tiny +0.68 pt in ONNX Runtime). E = exp(S - rowmax(S)) has max exactly 1 in every row,
 * so the same per-tensor quantizer acts like a per-row one on P (P = E / rowsum(E)).
 *
 * Matches: a Softmax over the last axis (opset >= 13 axis -1 or rank-1; before 13 an axis equal
 * to rank-1, where the 2-D coercion is the same thing) whose output is read only by MatMuls, as
 * their first operand, each with a second operand of rank >= 2 (so the MatMul's rows are P's
 * rows), and which is not a graph output.
 * Rewrites: S -> Softmax -> P -> MatMul(P, V) -> Y becomes
 *     m = ReduceMax(S, -1, keepdims)   E = Exp(S - m)   z = ReduceSum(E, -1, keepdims)
 *     Y = MatMul(E, V) / z
 * (Y keeps its name). Exact in real arithmetic: sum_j E_ij V_j / sum_j E_ij = sum_j P_ij V_j;
 * in float32 the outputs differ by rounding only (about 1e-7 relative). The quantize pass then
 * quantizes E on its way into the MatMul; z is computed from the float E.
 * Preserves: graph inputs/outputs and names, everything else. Skipped (debug log): other
 * Softmax uses. With quantization options, `defer_softmax` (-1 auto: activations below 8 bits,
 * 0 off, 1 on) decides whether to run; run without them, it always rewrites. In every
 * quantizing preset. Round to nearest and ERQ compute z from the float E; the reconstruction
 * methods (aphq, flexround) from the quantized E (placement's norm_readers: the engine has every
 * reader of a quantized value see it quantized), which also makes each row of the effective
 * attention sum to 1. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "exec.h"
#include "pass.h"
#include "quantize.h"

static const int64_t last_axis[1] = {-1};

// A new float value named after `hint` shaped like `like` (last dim 1 if `reduced`).
static struct opq_value *value_like(struct opq_graph *g, const char *hint,
                                    const struct opq_value *like, bool reduced) {
    struct opq_value *v = opq_graph_value_new_unique(g, hint);
    if (!v)
        return NULL;
    v->t      = like->t;
    v->t.data = NULL;
    v->t.nbytes = 0;
    memcpy(v->dim_param, like->dim_param, sizeof(v->dim_param));
    if (reduced && v->t.ndim > 0) {
        v->t.shape[v->t.ndim - 1]      = 1;
        v->dim_param[v->t.ndim - 1] = NULL;
    }
    return v;
}

// Why Softmax sm cannot be rewritten, or NULL if it can. ex: a plan of the graph (for ranks
// and dtypes, which exported models seldom record for intermediate values).
static const char *why_not(const struct opq_node *sm, int64_t opset, const struct opq_exec *ex) {
    const struct opq_value  *s  = sm->inputs[0];
    const struct opq_value  *p  = sm->outputs[0];
    const struct opq_tensor *ts = s ? opq_exec_value(ex, s->name) : NULL;
    int64_t                  axis = opq_node_attr_int(sm, "axis", opset >= 13 ? -1 : 1);
    if (!ts || !p || ts->dtype != OPQ_DTYPE_FLOAT || ts->ndim < 1)
        return "not a float softmax";
    if (axis != -1 && axis != ts->ndim - 1)
        return "not over the last axis";
    if (p->kind & OPQ_VK_OUTPUT)
        return "its output is a graph output";
    if (p->n_users == 0)
        return "unused";
    for (int i = 0; i < p->n_users; i++) {
        const struct opq_node   *u  = p->users[i];
        const struct opq_tensor *tv = NULL;
        if (u->op != OPQ_OP_MATMUL || u->inputs[0] != p || u->inputs[1] == p)
            return "read by something other than a MatMul's first operand";
        if (!(tv = opq_exec_value(ex, u->inputs[1]->name)) || tv->ndim < 2)
            return "a MatMul's second operand is not a matrix";
    }
    return NULL;
}

// Plans g for its declared input shapes, unknown dims taken as 1 (ranks do not depend on them).
static enum opq_status plan_shapes(struct opq_pass_ctx *pc, struct opq_graph *g,
                                   struct opq_exec **ex) {
    struct opq_named_tensor in[16];
    int                     k = 0;
    for (int i = 0; i < g->n_inputs; i++) {
        const struct opq_value *v = g->inputs[i];
        if (v->kind & OPQ_VK_INIT)
            continue;
        if (k == (int)ARRAY_SIZE(in) || v->t.ndim < 0)
            return OPQ_ERR_UNSUPPORTED;
        in[k].name = v->name;
        in[k].t    = v->t;
        in[k].t.data = NULL;
        for (int d = 0; d < v->t.ndim; d++)
            in[k].t.shape[d] = v->t.shape[d] < 0 ? 1 : v->t.shape[d];
        k++;
    }
    return opq_exec_plan(pc->ctx, pc->model, in, k, NULL, ex);
}

// ReduceMax or ReduceSum over the last axis with keepdims, in the form the opset takes.
static enum opq_status add_reduce(struct opq_graph *g, const char *op, const char *name,
                                  struct opq_value *x, struct opq_value *y, int64_t opset,
                                  int64_t input_from, struct opq_value **axes,
                                  struct opq_node *after) {
    struct opq_node *n = NULL;
    bool             as_input = opset >= input_from;
    if (as_input && !*axes) {
        struct opq_tensor t = {.dtype = OPQ_DTYPE_INT64, .ndim = 1, .shape = {1},
                               .data = (void *)last_axis, .nbytes = sizeof(last_axis)};
        *axes = opq_graph_value_new_unique(g, "defer_softmax_axes");
        if (!*axes || opq_graph_set_initializer(g, *axes, &t) != OPQ_OK)
            return OPQ_ERR_NOMEM;
    }
    struct opq_value *in[2] = {x, as_input ? *axes : NULL};
    enum opq_status   st    = opq_graph_add_node(g, op, "", name, in, as_input ? 2 : 1, &y, 1, &n);
    if (st != OPQ_OK)
        return st;
    opq_graph_move_after(g, n, after);
    struct opq_attr keep = {.name = "keepdims", .type = OPQ_ATTR_INT, .i = 1};
    if ((st = opq_node_add_attr(g, n, &keep)) != OPQ_OK || as_input)
        return st;
    int64_t *ax = opq_arena_memdup(g->arena, last_axis, sizeof(last_axis));
    if (!ax)
        return OPQ_ERR_NOMEM;
    struct opq_attr a = {.name = "axes", .type = OPQ_ATTR_INTS, .n = 1, .ints = ax};
    return opq_node_add_attr(g, n, &a);
}

static enum opq_status rewrite(struct opq_graph *g, struct opq_node *sm, int64_t opset,
                               struct opq_value **axes) {
    struct opq_value *s = sm->inputs[0];
    struct opq_value *p = sm->outputs[0];
    char              hint[512];
    enum opq_status   st;
    const char       *base = sm->name && sm->name[0] ? sm->name : p->name;
    snprintf(hint, sizeof(hint), "%s_rowmax", p->name);
    struct opq_value *m = value_like(g, hint, s, true);
    snprintf(hint, sizeof(hint), "%s_shifted", p->name);
    struct opq_value *d = value_like(g, hint, s, false);
    snprintf(hint, sizeof(hint), "%s_exp", p->name);
    struct opq_value *e = value_like(g, hint, s, false);
    snprintf(hint, sizeof(hint), "%s_rowsum", p->name);
    struct opq_value *z = value_like(g, hint, s, true);
    if (!m || !d || !e || !z)
        return OPQ_ERR_NOMEM;
    // The MatMuls first: their outputs keep their names, produced by the Divs.
    while (p->n_users > 0) {
        struct opq_node  *mm = p->users[0];
        struct opq_value *y  = mm->outputs[0];
        struct opq_value *in[2] = {e, mm->inputs[1]};
        snprintf(hint, sizeof(hint), "%s_unnormalized", y->name);
        struct opq_value *yu = value_like(g, hint, y, false);
        if (!yu)
            return OPQ_ERR_NOMEM;
        opq_graph_mark_dead(g, mm);
        struct opq_node *nm = NULL;
        struct opq_node *dv = NULL;
        snprintf(hint, sizeof(hint), "%s_normalize", mm->name);
        struct opq_value *dv_in[2] = {yu, z};
        if ((st = opq_graph_add_node(g, "MatMul", "", mm->name, in, 2, &yu, 1, &nm)) != OPQ_OK ||
            (st = opq_graph_add_node(g, "Div", "", hint, dv_in, 2, &y, 1, &dv)) != OPQ_OK)
            return st;
        opq_graph_move_after(g, nm, mm);
        opq_graph_move_after(g, dv, nm);
    }
    opq_graph_mark_dead(g, sm);
    struct opq_node *sub = NULL;
    struct opq_node *ex  = NULL;
    struct opq_value *sub_in[2] = {s, m};
    snprintf(hint, sizeof(hint), "%s_ReduceMax", base);
    if ((st = add_reduce(g, "ReduceMax", hint, s, m, opset, 18, axes, sm)) != OPQ_OK)
        return st;
    snprintf(hint, sizeof(hint), "%s_Sub", base);
    if ((st = opq_graph_add_node(g, "Sub", "", hint, sub_in, 2, &d, 1, &sub)) != OPQ_OK)
        return st;
    snprintf(hint, sizeof(hint), "%s_Exp", base);
    if ((st = opq_graph_add_node(g, "Exp", "", hint, &d, 1, &e, 1, &ex)) != OPQ_OK)
        return st;
    opq_graph_move_after(g, sub, m->producer);
    opq_graph_move_after(g, ex, sub);
    snprintf(hint, sizeof(hint), "%s_ReduceSum", base);
    return add_reduce(g, "ReduceSum", hint, e, z, opset, 13, axes, ex);
}

enum opq_status opq_pass_run_defer_softmax(struct opq_pass_ctx *pc, struct opq_graph *g) {
    const struct opq_quant_opts *q = pc->opts->quant;
    if (q && (q->defer_softmax == 0 || (q->defer_softmax < 0 && q->abits >= 8))) {
        opq_log(pc->ctx, OPQ_LOG_DEBUG, "defer-softmax: off (activations at %d bits)",
                q->abits);
        return OPQ_OK;
    }
    int64_t           opset = opq_model_opset(pc->model, "");
    struct opq_value *axes  = NULL; // shared int64 [-1] initializer (opset >= 13)
    enum opq_status   st    = OPQ_OK;
    // Collected first: the rewrite adds and moves nodes.
    struct opq_exec  *ex    = NULL;
    if (plan_shapes(pc, g, &ex) != OPQ_OK) {
        opq_ctx_clear_error(pc->ctx);
        opq_log(pc->ctx, OPQ_LOG_DEBUG, "defer-softmax: shapes unknown, nothing rewritten");
        return OPQ_OK;
    }
    struct opq_node **found = malloc(sizeof(*found) * ((size_t)g->n_nodes + 1));
    int               n     = 0;
    if (!found) {
        opq_exec_free(ex);
        return opq_set_error(pc->ctx, OPQ_ERR_NOMEM, "defer-softmax: out of memory");
    }
    for (int i = 0; i < g->n_nodes; i++) {
        struct opq_node *sm = g->nodes[i];
        if (sm->op != OPQ_OP_SOFTMAX || (sm->flags & OPQ_NF_DEAD))
            continue;
        const char *why = why_not(sm, opset, ex);
        if (why)
            opq_log(pc->ctx, OPQ_LOG_DEBUG, "defer-softmax: '%s' left alone (%s)",
                    sm->name && sm->name[0] ? sm->name : sm->outputs[0]->name, why);
        else
            found[n++] = sm;
    }
    opq_exec_free(ex); // before the graph changes
    for (int i = 0; i < n && st == OPQ_OK; i++)
        if ((st = rewrite(g, found[i], opset, &axes)) == OPQ_OK)
            pc->stats.n_rewrites++;
    free(found);
    if (st == OPQ_ERR_NOMEM)
        return opq_set_error(pc->ctx, st, "defer-softmax: out of memory");
    if (st == OPQ_OK && pc->stats.n_rewrites > 0) {
        opq_graph_compact(g);
        st = opq_graph_sort(g);
    }
    return st;
}
