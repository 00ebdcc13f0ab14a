/* graph.c: IR construction and mutation (see graph.h). Arrays grow by doubling inside the arena;
 * the abandoned halves are the price of never freeing one by one (bounded by 2x). */
#include "graph.h"

#include <stdio.h>
#include <string.h>

#include "arena.h"
#include "strmap.h"

// Grows *arr (elements of `elem` bytes) so that index `need-1` fits. false on OOM.
static bool grow_array(struct opq_arena *a, void **arr, int *cap, int need, size_t elem) {
    if (need <= *cap)
        return true;
    int ncap = *cap ? *cap * 2 : 8;
    while (ncap < need)
        ncap *= 2;
    void *n = opq_arena_alloc(a, (size_t)ncap * elem);
    if (!n)
        return false;
    if (*arr && *cap)
        memcpy(n, *arr, (size_t)*cap * elem);
    *arr = n;
    *cap = ncap;
    return true;
}

#define GROW(g, arr, cap, need) grow_array((g)->arena, (void **)&(arr), &(cap), (need), sizeof(*(arr)))

struct opq_model *opq_model_new(struct opq_ctx *ctx) {
    struct opq_arena *a = opq_arena_new(ctx);
    if (!a)
        return NULL;
    struct opq_model *m = opq_arena_alloc(a, sizeof(*m));
    struct opq_graph *g = opq_arena_alloc(a, sizeof(*g));
    if (!m || !g)
        goto out_free_arena;
    g->arena   = a;
    g->ctx     = ctx;
    g->name    = "";
    g->by_name = opq_strmap_new(ctx);
    if (!g->by_name)
        goto out_free_arena;
    m->ctx              = ctx;
    m->arena            = a;
    m->graph            = g;
    m->producer_name    = "";
    m->producer_version = "";
    m->domain           = "";
    m->path             = "";
    m->dir              = NULL;
    return m;
out_free_arena:
    opq_arena_free(a);
    return NULL;
}

void opq_model_free(struct opq_model *m) {
    if (!m)
        return;
    opq_strmap_free(m->graph->by_name);
    opq_arena_free(m->arena);
}

struct opq_value *opq_graph_value(const struct opq_graph *g, const char *name) {
    return name ? opq_strmap_get(g->by_name, name) : NULL;
}

static struct opq_value *value_add(struct opq_graph *g, const char *name) {
    if (!GROW(g, g->values, g->cap_values, g->n_values + 1))
        return NULL;
    struct opq_value *v = opq_arena_alloc(g->arena, sizeof(*v));
    if (!v)
        return NULL;
    v->name = opq_arena_strdup(g->arena, name);
    if (!v->name)
        return NULL;
    v->t.ndim = -1;
    if (opq_strmap_put(g->by_name, v->name, v) != OPQ_OK)
        return NULL;
    v->index              = g->n_values;
    g->values[g->n_values++] = v;
    return v;
}

struct opq_value *opq_graph_value_get_or_add(struct opq_graph *g, const char *name) {
    struct opq_value *v = opq_graph_value(g, name);
    return v ? v : value_add(g, name);
}

struct opq_value *opq_graph_value_new_unique(struct opq_graph *g, const char *hint) {
    if (!opq_graph_value(g, hint))
        return value_add(g, hint);
    size_t len = strlen(hint) + 24;
    char  *buf = opq_arena_alloc(g->arena, len);
    if (!buf)
        return NULL;
    for (unsigned long i = 1;; i++) {
        snprintf(buf, len, "%s_%lu", hint, i);
        if (!opq_graph_value(g, buf))
            return value_add(g, buf);
    }
}

enum opq_status opq_graph_set_initializer(struct opq_graph *g, struct opq_value *v,
                                          const struct opq_tensor *t) {
    void *data = NULL;
    if (t->nbytes) {
        data = opq_arena_alloc_raw(g->arena, t->nbytes);
        if (!data)
            return OPQ_ERR_NOMEM;
        memcpy(data, t->data, t->nbytes);
    }
    v->t      = *t;
    v->t.data = data;
    if (!(v->kind & OPQ_VK_INIT)) {
        if (!GROW(g, g->inits, g->cap_inits, g->n_inits + 1))
            return OPQ_ERR_NOMEM;
        g->inits[g->n_inits++] = v;
        v->kind |= OPQ_VK_INIT;
    }
    return OPQ_OK;
}

enum opq_status opq_graph_add_input(struct opq_graph *g, struct opq_value *v) {
    if (!GROW(g, g->inputs, g->cap_inputs, g->n_inputs + 1))
        return OPQ_ERR_NOMEM;
    g->inputs[g->n_inputs++] = v;
    v->kind |= OPQ_VK_INPUT;
    return OPQ_OK;
}

enum opq_status opq_graph_add_output(struct opq_graph *g, struct opq_value *v) {
    if (!GROW(g, g->outputs, g->cap_outputs, g->n_outputs + 1))
        return OPQ_ERR_NOMEM;
    g->outputs[g->n_outputs++] = v;
    v->kind |= OPQ_VK_OUTPUT;
    return OPQ_OK;
}

enum opq_status opq_graph_add_info(struct opq_graph *g, struct opq_value *v) {
    if (!GROW(g, g->infos, g->cap_infos, g->n_infos + 1))
        return OPQ_ERR_NOMEM;
    g->infos[g->n_infos++] = v;
    v->kind |= OPQ_VK_INFO;
    return OPQ_OK;
}

static bool user_add(struct opq_graph *g, struct opq_value *v, struct opq_node *n) {
    if (!GROW(g, v->users, v->cap_users, v->n_users + 1))
        return false;
    v->users[v->n_users++] = n;
    return true;
}

// Removes one use of v by n (one entry per input slot).
static void user_remove(struct opq_value *v, struct opq_node *n) {
    for (int i = 0; i < v->n_users; i++) {
        if (v->users[i] == n) {
            memmove(&v->users[i], &v->users[i + 1], (size_t)(v->n_users - i - 1) * sizeof(*v->users));
            v->n_users--;
            return;
        }
    }
}

enum opq_status opq_graph_add_node(struct opq_graph *g, const char *op_type, const char *domain,
                                   const char *name, struct opq_value *const *inputs, int n_inputs,
                                   struct opq_value *const *outputs, int n_outputs,
                                   struct opq_node **out) {
    for (int i = 0; i < n_outputs; i++) {
        const struct opq_value *o = outputs[i];
        if (!o)
            continue;
        if (o->producer || (o->kind & (OPQ_VK_INPUT | OPQ_VK_INIT)))
            return opq_set_error(g->ctx, OPQ_ERR_INVALID_MODEL,
                                 "node '%s' (%s): output '%s' is already defined", name ? name : "",
                                 op_type, o->name);
        for (int j = 0; j < i; j++)
            if (outputs[j] == o)
                return opq_set_error(g->ctx, OPQ_ERR_INVALID_MODEL,
                                     "node '%s' (%s): output '%s' is listed twice",
                                     name ? name : "", op_type, o->name);
    }
    if (!GROW(g, g->nodes, g->cap_nodes, g->n_nodes + 1))
        return OPQ_ERR_NOMEM;
    struct opq_node *n = opq_arena_alloc(g->arena, sizeof(*n));
    if (!n)
        return OPQ_ERR_NOMEM;
    n->op_type = opq_arena_strdup(g->arena, op_type);
    n->domain  = opq_arena_strdup(g->arena, domain ? domain : "");
    n->name    = opq_arena_strdup(g->arena, name ? name : "");
    n->op      = opq_op_from_type(n->domain, n->op_type);
    n->inputs  = opq_arena_alloc(g->arena, (size_t)(n_inputs + 1) * sizeof(*n->inputs));
    n->outputs = opq_arena_alloc(g->arena, (size_t)(n_outputs + 1) * sizeof(*n->outputs));
    if (!n->op_type || !n->domain || !n->name || !n->inputs || !n->outputs)
        return OPQ_ERR_NOMEM;
    n->n_inputs  = n_inputs;
    n->n_outputs = n_outputs;
    for (int i = 0; i < n_inputs; i++) {
        n->inputs[i] = inputs[i];
        if (inputs[i] && !user_add(g, inputs[i], n))
            return OPQ_ERR_NOMEM;
    }
    for (int i = 0; i < n_outputs; i++) {
        n->outputs[i] = outputs[i];
        if (outputs[i])
            outputs[i]->producer = n;
    }
    n->index              = g->n_nodes;
    g->nodes[g->n_nodes++] = n;
    if (out)
        *out = n;
    return OPQ_OK;
}

enum opq_status opq_node_add_attr(struct opq_graph *g, struct opq_node *n,
                                  const struct opq_attr *a) {
    struct opq_attr *na = opq_arena_alloc(g->arena, (size_t)(n->n_attrs + 1) * sizeof(*na));
    if (!na)
        return OPQ_ERR_NOMEM;
    if (n->n_attrs)
        memcpy(na, n->attrs, (size_t)n->n_attrs * sizeof(*na));
    na[n->n_attrs]      = *a;
    na[n->n_attrs].name = opq_arena_strdup(g->arena, a->name);
    if (!na[n->n_attrs].name)
        return OPQ_ERR_NOMEM;
    n->attrs = na;
    n->n_attrs++;
    return OPQ_OK;
}

const struct opq_attr *opq_node_attr(const struct opq_node *n, const char *name) {
    for (int i = 0; i < n->n_attrs; i++)
        if (strcmp(n->attrs[i].name, name) == 0)
            return &n->attrs[i];
    return NULL;
}

int64_t opq_node_attr_int(const struct opq_node *n, const char *name, int64_t def) {
    const struct opq_attr *a = opq_node_attr(n, name);
    return (a && a->type == OPQ_ATTR_INT) ? a->i : def;
}

float opq_node_attr_float(const struct opq_node *n, const char *name, float def) {
    const struct opq_attr *a = opq_node_attr(n, name);
    return (a && a->type == OPQ_ATTR_FLOAT) ? a->f : def;
}

enum opq_status opq_node_set_input(struct opq_graph *g, struct opq_node *n, int i,
                                   struct opq_value *v) {
    OPQ_ASSERT(i >= 0 && i < n->n_inputs);
    if (n->inputs[i])
        user_remove(n->inputs[i], n);
    n->inputs[i] = v;
    if (v && !user_add(g, v, n))
        return OPQ_ERR_NOMEM;
    return OPQ_OK;
}
