/* placement.c: choosing the tensors to quantize (see placement.h). */
#define _POSIX_C_SOURCE 200809L
#include "quant/placement.h"

#include <regex.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"

bool opq_placement_is_quantizable(const struct opq_node *n) {
    return !(n->flags & OPQ_NF_DEAD) &&
           (n->op == OPQ_OP_MATMUL || n->op == OPQ_OP_GEMM || n->op == OPQ_OP_CONV);
}

enum opq_status opq_keep_float_parse(struct opq_ctx *ctx, const char *list, unsigned *bits) {
    static const struct {
        const char *word;
        unsigned    bit;
    } words[] = {{"first", OPQ_KEEP_FIRST},
                 {"last", OPQ_KEEP_LAST},
                 {"head", OPQ_KEEP_HEAD},
                 {"patch-embed", OPQ_KEEP_PATCH_EMBED}};
    *bits = 0;
    const char *p = list;
    while (p && *p) {
        const char *e = strchr(p, ',');
        size_t      n = e ? (size_t)(e - p) : strlen(p);
        bool        ok = false;
        for (size_t i = 0; i < ARRAY_SIZE(words); i++) {
            if (strlen(words[i].word) == n && strncmp(words[i].word, p, n) == 0) {
                *bits |= words[i].bit;
                ok = true;
            }
        }
        if (!ok)
            return opq_set_error(ctx, OPQ_ERR_USAGE,
                                 "--keep-float: unknown position '%.*s' (use first, last, head, "
                                 "patch-embed)",
                                 (int)n, p);
        p = e ? e + 1 : NULL;
    }
    return OPQ_OK;
}

// Exclusion list: op types and compiled regexes.
struct exclusions {
    char   **types;
    int      n_types;
    regex_t *res;
    int      n_res;
};

static void exclusions_free(struct exclusions *x) {
    for (int i = 0; i < x->n_types; i++)
        free(x->types[i]);
    for (int i = 0; i < x->n_res; i++)
        regfree(&x->res[i]);
    free(x->types);
    free(x->res);
}

static enum opq_status exclusions_parse(struct opq_ctx *ctx, const char *list,
                                        struct exclusions *x) {
    memset(x, 0, sizeof(*x));
    if (!list || !*list)
        return OPQ_OK;
    size_t cap = 1;
    for (const char *p = list; *p; p++)
        cap += *p == ',';
    x->types = calloc(cap, sizeof(*x->types));
    x->res   = calloc(cap, sizeof(*x->res));
    if (!x->types || !x->res)
        return OPQ_ERR_NOMEM;
    const char *p = list;
    while (p) {
        const char *e = strchr(p, ',');
        size_t      n = e ? (size_t)(e - p) : strlen(p);
        char       *item = strndup(p, n);
        if (!item)
            return OPQ_ERR_NOMEM;
        p = e ? e + 1 : NULL;
        if (!*item) {
            free(item);
            continue;
        }
        if (opq_op_from_type("", item) != OPQ_OP_UNKNOWN) {
            x->types[x->n_types++] = item;
            continue;
        }
        int rc = regcomp(&x->res[x->n_res], item, REG_EXTENDED | REG_NOSUB);
        if (rc != 0) {
            char why[128];
            regerror(rc, &x->res[x->n_res], why, sizeof(why));
            enum opq_status st = opq_set_error(ctx, OPQ_ERR_USAGE,
                                               "--exclude: bad regex '%s': %s", item, why);
            free(item);
            return st;
        }
        x->n_res++;
        free(item);
    }
    return OPQ_OK;
}

static bool excluded(const struct exclusions *x, const struct opq_node *n) {
    for (int i = 0; i < x->n_types; i++)
        if (strcmp(x->types[i], n->op_type) == 0)
            return true;
    for (int i = 0; i < x->n_res; i++)
        if (regexec(&x->res[i], n->name, 0, NULL, 0) == 0)
            return true;
    return false;
}

// Marks (in mark[]) the quantizable nodes reached from the graph inputs (forward == true) or from
// the graph outputs (backward), without walking through another quantizable node.
static void reach(struct opq_graph *g, bool forward, unsigned char *mark) {
    unsigned char *seen = calloc((size_t)g->n_nodes + 1, 1);
    int *stack = malloc(sizeof(int) * ((size_t)g->n_nodes + 1) * 4 + 64);
    int  sp = 0, cap = g->n_nodes * 4 + 16;
    if (!seen || !stack) {
        free(seen);
        free(stack);
        return;
    }
    // seeds
    if (forward) {
        for (int i = 0; i < g->n_inputs; i++) {
            const struct opq_value *v = g->inputs[i];
            if (v->kind & OPQ_VK_INIT)
                continue;
            for (int u = 0; u < v->n_users && sp < cap; u++)
                stack[sp++] = v->users[u]->index;
        }
    } else {
        for (int i = 0; i < g->n_outputs; i++)
            if (g->outputs[i]->producer && sp < cap)
                stack[sp++] = g->outputs[i]->producer->index;
    }
    while (sp > 0) {
        int idx = stack[--sp];
        if (seen[idx])
            continue;
        seen[idx] = 1;
        struct opq_node *n = g->nodes[idx];
        if (opq_placement_is_quantizable(n)) {
            mark[idx] = 1;
            continue;
        }
        if (forward) {
            for (int o = 0; o < n->n_outputs; o++) {
                const struct opq_value *v = n->outputs[o];
                for (int u = 0; v && u < v->n_users && sp < cap; u++)
                    stack[sp++] = v->users[u]->index;
            }
        } else {
            for (int i = 0; i < n->n_inputs; i++) {
                const struct opq_value *v = n->inputs[i];
                if (v && v->producer && sp < cap)
                    stack[sp++] = v->producer->index;
            }
        }
    }
    free(seen);
    free(stack);
}

// The output-channel axis of weight input `slot` of node n, or -1 for per-tensor.
static int weight_axis(const struct opq_node *n, int slot, const struct opq_value *w) {
    switch (n->op) {
    case OPQ_OP_CONV:
        return slot == 1 ? 0 : -1;
    case OPQ_OP_GEMM:
        if (slot == 1)
            return opq_node_attr_int(n, "transB", 0) ? 0 : 1;
        return -1;
    case OPQ_OP_MATMUL:
        // B [.., K, N]: one scale per output column N (ONNX Runtime's convention, axis 1 in 2-D)
        return (slot == 1 && w->t.ndim >= 2) ? w->t.ndim - 1 : -1;
    default:
        return -1;
    }
}

enum opq_status opq_placement_find(struct opq_ctx *ctx, struct opq_graph *g,
                                   const struct opq_placement_opts *opts,
                                   struct opq_placement *out) {
    memset(out, 0, sizeof(*out));
    struct exclusions x;
    enum opq_status st = exclusions_parse(ctx, opts ? opts->exclude : NULL, &x);
    unsigned char *pe = calloc((size_t)g->n_nodes + 1, 1), *hd = calloc((size_t)g->n_nodes + 1, 1);
    if (st == OPQ_OK && (!pe || !hd))
        st = OPQ_ERR_NOMEM;
    if (st != OPQ_OK)
        goto out;
    for (int i = 0; i < g->n_nodes; i++)
        g->nodes[i]->index = i;
    unsigned kf = opts ? opts->keep_float : 0;
    if (kf & OPQ_KEEP_PATCH_EMBED)
        reach(g, true, pe);
    if (kf & OPQ_KEEP_HEAD)
        reach(g, false, hd);
    int first = -1, last = -1;
    for (int i = 0; i < g->n_nodes; i++) {
        if (!opq_placement_is_quantizable(g->nodes[i]))
            continue;
        if (first < 0)
            first = i;
        last = i;
    }
    out->qnodes = opq_arena_alloc(g->arena, sizeof(*out->qnodes) * ((size_t)g->n_nodes + 1));
    // at most two float inputs of interest per quantized node
    out->targets = opq_arena_alloc(g->arena, sizeof(*out->targets) * ((size_t)g->n_nodes * 2 + 1));
    if (!out->qnodes || !out->targets) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (int i = 0; i < g->n_nodes; i++) {
        struct opq_node *n = g->nodes[i];
        if (!opq_placement_is_quantizable(n))
            continue;
        bool skip = excluded(&x, n) || ((kf & OPQ_KEEP_FIRST) && i == first) ||
                    ((kf & OPQ_KEEP_LAST) && i == last) || pe[i] || hd[i];
        if (skip) {
            out->n_excluded++;
            continue;
        }
        out->qnodes[out->n_qnodes++] = n;
    }
    // Collect targets: activations in order of first use, then weights.
    for (int pass = 0; pass < 2; pass++) {
        for (int q = 0; q < out->n_qnodes; q++) {
            struct opq_node *n = out->qnodes[q];
            for (int s = 0; s < 2 && s < n->n_inputs; s++) {
                struct opq_value *v = n->inputs[s];
                if (!v || v->t.dtype != OPQ_DTYPE_FLOAT)
                    continue;
                bool is_w = (v->kind & OPQ_VK_INIT) != 0;
                if (is_w != (pass == 1))
                    continue;
                struct opq_qtarget *t = NULL;
                for (int k = 0; k < out->n_targets; k++)
                    if (out->targets[k].value == v)
                        t = &out->targets[k];
                if (!t) {
                    t              = &out->targets[out->n_targets++];
                    t->value       = v;
                    t->role        = is_w ? OPQ_QROLE_WEIGHT : OPQ_QROLE_ACT;
                    t->axis        = is_w ? weight_axis(n, s, v) : -1;
                    t->head_axis   = -1;
                    t->readers     = NULL;
                    t->n_readers   = 0;
                    t->consumers   = opq_arena_alloc(g->arena, sizeof(*t->consumers) *
                                                                 ((size_t)v->n_users + 1));
                    if (!t->consumers) {
                        st = OPQ_ERR_NOMEM;
                        goto out;
                    }
                } else if (is_w && t->axis != weight_axis(n, s, v)) {
                    t->axis = -1; // a weight shared with different layouts: per tensor
                }
                bool have = false;
                for (int k = 0; k < t->n_consumers; k++)
                    have |= t->consumers[k] == n;
                if (!have)
                    t->consumers[t->n_consumers++] = n;
            }
        }
    }
    // Row sums of deferred softmaxes: E -> ReduceSum -> z, and z only divides the output of a
    // quantized MatMul that reads E as its first operand.
    for (int k = 0; opts && opts->norm_readers && k < out->n_targets; k++) {
        struct opq_qtarget *t = &out->targets[k];
        struct opq_value *v = t->value;
        if (t->role != OPQ_QROLE_ACT)
            continue;
        for (int u = 0; u < v->n_users; u++) {
            struct opq_node *r = v->users[u];
            if (r->op != OPQ_OP_REDUCESUM || r->n_outputs != 1 || !r->outputs[0] ||
                r->outputs[0]->n_users == 0)
                continue;
            bool norm = true;
            const struct opq_value *z = r->outputs[0];
            for (int d = 0; d < z->n_users && norm; d++) {
                const struct opq_node *dv = z->users[d];
                bool ok = dv->op == OPQ_OP_DIV && dv->n_inputs == 2 && dv->inputs[1] == z &&
                          dv->inputs[0] && dv->inputs[0]->producer;
                bool by_consumer = false;
                for (int c = 0; ok && c < t->n_consumers; c++) {
                    const struct opq_node *m = t->consumers[c];
                    by_consumer |= m->op == OPQ_OP_MATMUL && m->inputs[0] == v &&
                                   dv->inputs[0]->producer == m;
                }
                norm = ok && by_consumer;
            }
            if (!norm)
                continue;
            if (!t->readers) {
                t->readers = opq_arena_alloc(g->arena,
                                             sizeof(*t->readers) * ((size_t)v->n_users + 1));
                if (!t->readers) {
                    st = OPQ_ERR_NOMEM;
                    goto out;
                }
            }
            bool have = false;
            for (int i = 0; i < t->n_readers; i++)
                have |= t->readers[i] == r;
            if (!have)
                t->readers[t->n_readers++] = r;
        }
    }
    // Activations whose every quantized consumer is an attention matmul (both operands computed,
    // rank 4: [batch, heads, tokens, dim]) can carry one scale per head.
    for (int k = 0; k < out->n_targets; k++) {
        struct opq_qtarget *t = &out->targets[k];
        if (t->role != OPQ_QROLE_ACT || t->value->t.ndim != 4 || t->value->t.shape[1] <= 1)
            continue;
        bool attn = t->n_consumers > 0;
        for (int c = 0; c < t->n_consumers; c++) {
            const struct opq_node *n = t->consumers[c];
            attn &= n->op == OPQ_OP_MATMUL && n->n_inputs == 2 && n->inputs[0] && n->inputs[1] &&
                    !(n->inputs[0]->kind & OPQ_VK_INIT) && !(n->inputs[1]->kind & OPQ_VK_INIT);
        }
        if (attn)
            t->head_axis = 1;
    }
out:
    exclusions_free(&x);
    free(pe);
    free(hd);
    return st;
}
