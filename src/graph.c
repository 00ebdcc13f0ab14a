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

bool opq_node_remove_attr(struct opq_node *n, const char *name) {
    for (int i = 0; i < n->n_attrs; i++) {
        if (strcmp(n->attrs[i].name, name) != 0)
            continue;
        memmove(&n->attrs[i], &n->attrs[i + 1], (size_t)(n->n_attrs - i - 1) * sizeof(*n->attrs));
        n->n_attrs--;
        return true;
    }
    return false;
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

enum opq_status opq_node_resize_inputs(struct opq_graph *g, struct opq_node *n, int n_inputs) {
    OPQ_ASSERT(n_inputs >= 0);
    for (int i = n_inputs; i < n->n_inputs; i++)
        if (n->inputs[i])
            user_remove(n->inputs[i], n);
    if (n_inputs > n->n_inputs) {
        struct opq_value **in = opq_arena_alloc(g->arena, (size_t)n_inputs * sizeof(*in));
        if (!in)
            return OPQ_ERR_NOMEM;
        if (n->n_inputs)
            memcpy(in, n->inputs, (size_t)n->n_inputs * sizeof(*in));
        n->inputs = in; // opq_arena_alloc zeroes: the new slots are omitted inputs
    }
    n->n_inputs = n_inputs;
    return OPQ_OK;
}

// ---- rewriting ----------------------------------------------------------------------------------

static const char *node_label(const struct opq_node *n) {
    return n->name[0] ? n->name : n->op_type;
}

enum opq_status opq_graph_replace_uses(struct opq_graph *g, struct opq_value *from,
                                       struct opq_value *to) {
    if (!from || !to)
        return opq_set_error(g->ctx, OPQ_ERR_INTERNAL, "replace_uses: NULL value");
    if (from == to)
        return OPQ_OK;
    if (from->kind & OPQ_VK_OUTPUT)
        return opq_set_error(g->ctx, OPQ_ERR_INTERNAL,
                             "replace_uses: '%s' is a graph output and keeps its name", from->name);
    // Each set_input drops exactly one entry of from->users, so this loop terminates.
    while (from->n_users > 0) {
        struct opq_node *n     = from->users[0];
        bool             found = false;
        for (int i = 0; i < n->n_inputs; i++) {
            if (n->inputs[i] != from)
                continue;
            found = true;
            if (opq_node_set_input(g, n, i, to) != OPQ_OK)
                return opq_set_error(g->ctx, OPQ_ERR_NOMEM, "out of memory");
        }
        OPQ_ASSERT(found); // users lists are kept consistent by this file
    }
    return OPQ_OK;
}

void opq_graph_mark_dead(struct opq_graph *g, struct opq_node *n) {
    (void)g;
    if (n->flags & OPQ_NF_DEAD)
        return;
    n->flags |= OPQ_NF_DEAD;
    // The input/output pointers stay readable (passes may still look at them); only the links
    // from values back to n are cut, so that a new node may produce the same values.
    for (int i = 0; i < n->n_inputs; i++)
        if (n->inputs[i])
            user_remove(n->inputs[i], n);
    for (int i = 0; i < n->n_outputs; i++)
        if (n->outputs[i] && n->outputs[i]->producer == n)
            n->outputs[i]->producer = NULL;
}

static bool value_unused(const struct opq_value *v) {
    return v->n_users == 0 && !v->producer && !(v->kind & (OPQ_VK_INPUT | OPQ_VK_OUTPUT));
}

// Compacts a value list in place, dropping the entries `drop` accepts; returns the new count.
static int compact_values(struct opq_value **arr, int n, bool (*drop)(const struct opq_value *)) {
    int k = 0;
    for (int i = 0; i < n; i++)
        if (!drop(arr[i]))
            arr[k++] = arr[i];
    return k;
}

int opq_graph_compact(struct opq_graph *g) {
    int k = 0;
    for (int i = 0; i < g->n_nodes; i++) {
        struct opq_node *n = g->nodes[i];
        if (n->flags & OPQ_NF_DEAD)
            continue;
        n->index      = k;
        g->nodes[k++] = n;
    }
    int dropped = g->n_nodes - k;
    g->n_nodes  = k;
    return dropped;
}

enum opq_status opq_graph_cleanup(struct opq_graph *g) {
    opq_graph_compact(g);
    for (int i = 0; i < g->n_values; i++)
        if (value_unused(g->values[i]))
            opq_strmap_del(g->by_name, g->values[i]->name);
    g->n_inits  = compact_values(g->inits, g->n_inits, value_unused);
    g->n_infos  = compact_values(g->infos, g->n_infos, value_unused);
    g->n_values = compact_values(g->values, g->n_values, value_unused);
    for (int i = 0; i < g->n_values; i++)
        g->values[i]->index = i;
    return OPQ_OK;
}

// ---- ordering -----------------------------------------------------------------------------------

static void reindex_nodes(struct opq_graph *g, int from, int to) {
    for (int i = from; i <= to; i++)
        g->nodes[i]->index = i;
}

static void move_node(struct opq_graph *g, struct opq_node *n, int dst) {
    int src = n->index;
    OPQ_ASSERT(src >= 0 && src < g->n_nodes && g->nodes[src] == n);
    OPQ_ASSERT(dst >= 0 && dst < g->n_nodes);
    if (src < dst)
        memmove(&g->nodes[src], &g->nodes[src + 1], (size_t)(dst - src) * sizeof(*g->nodes));
    else if (src > dst)
        memmove(&g->nodes[dst + 1], &g->nodes[dst], (size_t)(src - dst) * sizeof(*g->nodes));
    g->nodes[dst] = n;
    reindex_nodes(g, src < dst ? src : dst, src < dst ? dst : src);
}

void opq_graph_move_before(struct opq_graph *g, struct opq_node *n, struct opq_node *anchor) {
    if (n == anchor)
        return;
    int dst = anchor->index;
    move_node(g, n, n->index < dst ? dst - 1 : dst);
}

void opq_graph_move_after(struct opq_graph *g, struct opq_node *n, struct opq_node *anchor) {
    if (n == anchor)
        return;
    int dst = anchor->index;
    move_node(g, n, n->index < dst ? dst : dst + 1);
}

// Min-heap of node indices: Kahn's algorithm always emits the ready node that came first in the
// current order, which makes the sort stable (an already sorted graph is left unchanged).
static void heap_push(int *h, int *n, int x) {
    int i = (*n)++;
    while (i > 0 && h[(i - 1) / 2] > x) {
        h[i] = h[(i - 1) / 2];
        i    = (i - 1) / 2;
    }
    h[i] = x;
}

static int heap_pop(int *h, int *n) {
    int top = h[0];
    int x   = h[--(*n)];
    int i   = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n)
            break;
        if (c + 1 < *n && h[c + 1] < h[c])
            c++;
        if (h[c] >= x)
            break;
        h[i] = h[c];
        i    = c;
    }
    if (*n > 0)
        h[i] = x;
    return top;
}

// A live producer of v, or NULL (graph input, initializer, undefined or dead producer).
static struct opq_node *live_producer(const struct opq_value *v) {
    return (v && v->producer && !(v->producer->flags & OPQ_NF_DEAD)) ? v->producer : NULL;
}

enum opq_status opq_graph_sort(struct opq_graph *g) {
    enum opq_status   st    = OPQ_OK;
    int               nn    = g->n_nodes;
    int              *indeg = opq_calloc(g->ctx, (size_t)nn + 1, sizeof(*indeg));
    int              *heap  = opq_calloc(g->ctx, (size_t)nn + 1, sizeof(*heap));
    struct opq_node **order = opq_calloc(g->ctx, (size_t)nn + 1, sizeof(*order));
    if (!indeg || !heap || !order) {
        st = opq_set_error(g->ctx, OPQ_ERR_NOMEM, "out of memory sorting the graph");
        goto out_free;
    }
    for (int i = 0; i < nn; i++)
        OPQ_ASSERT(g->nodes[i]->index == i);
    int n_heap = 0;
    for (int i = 0; i < nn; i++) {
        const struct opq_node *n = g->nodes[i];
        if (n->flags & OPQ_NF_DEAD)
            continue;
        for (int j = 0; j < n->n_inputs; j++)
            if (live_producer(n->inputs[j]))
                indeg[i]++;
        if (indeg[i] == 0)
            heap_push(heap, &n_heap, i);
    }
    int n_out = 0;
    while (n_heap > 0) {
        struct opq_node *n = g->nodes[heap_pop(heap, &n_heap)];
        order[n_out++]     = n;
        for (int j = 0; j < n->n_outputs; j++) {
            const struct opq_value *o = n->outputs[j];
            if (!o || o->producer != n)
                continue;
            // users holds one entry per input slot, matching the per-slot in-degree count.
            for (int u = 0; u < o->n_users; u++) {
                const struct opq_node *user = o->users[u];
                if (user->flags & OPQ_NF_DEAD)
                    continue;
                if (--indeg[user->index] == 0)
                    heap_push(heap, &n_heap, user->index);
            }
        }
    }
    int n_live = 0;
    for (int i = 0; i < nn; i++)
        n_live += !(g->nodes[i]->flags & OPQ_NF_DEAD);
    if (n_out < n_live) {
        // Some node is left with a positive in-degree. Walking back from it through unsorted
        // producers n_live times must end inside a cycle (pigeonhole).
        struct opq_node *n = NULL;
        for (int i = 0; i < nn && !n; i++)
            if (!(g->nodes[i]->flags & OPQ_NF_DEAD) && indeg[i] > 0)
                n = g->nodes[i];
        for (int step = 0; step < n_live; step++) {
            struct opq_node *next = NULL;
            for (int j = 0; j < n->n_inputs && !next; j++) {
                struct opq_node *p = live_producer(n->inputs[j]);
                if (p && indeg[p->index] > 0)
                    next = p;
            }
            OPQ_ASSERT(next);
            n = next;
        }
        st = opq_set_error(g->ctx, OPQ_ERR_INVALID_MODEL,
                           "graph has a cycle through node '%s' (%s)", node_label(n), n->op_type);
        goto out_free;
    }
    // Dead nodes keep their relative order after the live ones until cleanup drops them.
    for (int i = 0; i < nn; i++)
        if (g->nodes[i]->flags & OPQ_NF_DEAD)
            order[n_out++] = g->nodes[i];
    for (int i = 0; i < nn; i++) {
        g->nodes[i]        = order[i];
        g->nodes[i]->index = i;
    }
out_free:
    opq_free(g->ctx, order);
    opq_free(g->ctx, heap);
    opq_free(g->ctx, indeg);
    return st;
}

// ---- verification -------------------------------------------------------------------------------

static int count_slots(const struct opq_node *n, const struct opq_value *v) {
    int c = 0;
    for (int i = 0; i < n->n_inputs; i++)
        c += n->inputs[i] == v;
    return c;
}

static int count_users(const struct opq_value *v, const struct opq_node *n) {
    int c = 0;
    for (int i = 0; i < v->n_users; i++)
        c += v->users[i] == n;
    return c;
}

static bool node_in_graph(const struct opq_graph *g, const struct opq_node *n) {
    return n->index >= 0 && n->index < g->n_nodes && g->nodes[n->index] == n;
}

static bool value_defined(const struct opq_value *v) {
    return live_producer(v) || (v->kind & (OPQ_VK_INPUT | OPQ_VK_INIT));
}

#define VERIFY_FAIL(...) opq_set_error(g->ctx, OPQ_ERR_INVALID_MODEL, __VA_ARGS__)

static enum opq_status verify_values(struct opq_graph *g) {
    for (int i = 0; i < g->n_values; i++) {
        const struct opq_value *v = g->values[i];
        if (v->index != i)
            return VERIFY_FAIL("value '%s': index %d at position %d", v->name, v->index, i);
        if (opq_graph_value(g, v->name) != v)
            return VERIFY_FAIL("value name '%s' is used by two values", v->name);
        const struct opq_node *p = v->producer;
        if (p) {
            if (!node_in_graph(g, p) || (p->flags & OPQ_NF_DEAD))
                return VERIFY_FAIL("value '%s': its producer '%s' is not a live node", v->name,
                                   node_label(p));
            bool listed = false;
            for (int j = 0; j < p->n_outputs; j++)
                listed |= p->outputs[j] == v;
            if (!listed)
                return VERIFY_FAIL("value '%s': producer '%s' does not list it as an output",
                                   v->name, node_label(p));
            if (v->kind & (OPQ_VK_INPUT | OPQ_VK_INIT))
                return VERIFY_FAIL("value '%s' is a graph input or initializer and is also "
                                   "produced by node '%s'", v->name, node_label(p));
        }
        for (int u = 0; u < v->n_users; u++) {
            const struct opq_node *n = v->users[u];
            if (!node_in_graph(g, n) || (n->flags & OPQ_NF_DEAD))
                return VERIFY_FAIL("value '%s': user '%s' is not a live node", v->name,
                                   node_label(n));
            int slots = count_slots(n, v);
            int uses  = count_users(v, n);
            if (slots != uses)
                return VERIFY_FAIL("value '%s': node '%s' uses it in %d input slot(s) but the "
                                   "users list has %d entries", v->name, node_label(n), slots,
                                   uses);
        }
    }
    return OPQ_OK;
}

static enum opq_status verify_nodes(struct opq_graph *g) {
    for (int i = 0; i < g->n_nodes; i++) {
        const struct opq_node *n = g->nodes[i];
        if (n->index != i)
            return VERIFY_FAIL("node '%s': index %d at position %d", node_label(n), n->index, i);
        if (n->flags & OPQ_NF_DEAD)
            continue;
        for (int j = 0; j < n->n_outputs; j++) {
            const struct opq_value *o = n->outputs[j];
            if (!o)
                continue;
            if (o->producer != n)
                return VERIFY_FAIL("value '%s' has two producers: '%s' and '%s'", o->name,
                                   node_label(n), o->producer ? node_label(o->producer) : "?");
            if (o->index < 0 || o->index >= g->n_values || g->values[o->index] != o)
                return VERIFY_FAIL("node '%s': output '%s' is not a value of the graph",
                                   node_label(n), o->name);
        }
        for (int j = 0; j < n->n_inputs; j++) {
            const struct opq_value *v = n->inputs[j];
            if (!v)
                continue;
            if (v->index < 0 || v->index >= g->n_values || g->values[v->index] != v)
                return VERIFY_FAIL("node '%s': input '%s' is not a value of the graph",
                                   node_label(n), v->name);
            if (!value_defined(v))
                return VERIFY_FAIL("node '%s' (%s): input '%s' is not defined", node_label(n),
                                   n->op_type, v->name);
            if (count_users(v, n) == 0)
                return VERIFY_FAIL("value '%s': users list misses node '%s'", v->name,
                                   node_label(n));
            const struct opq_node *p = live_producer(v);
            if (p && p->index >= i)
                return VERIFY_FAIL("node '%s' uses '%s' before its producer '%s' (not in "
                                   "topological order)", node_label(n), v->name, node_label(p));
        }
    }
    return OPQ_OK;
}

enum opq_status opq_graph_verify(struct opq_graph *g) {
    enum opq_status st = verify_nodes(g);
    if (st == OPQ_OK)
        st = verify_values(g);
    if (st != OPQ_OK)
        return st;
    for (int i = 0; i < g->n_outputs; i++) {
        const struct opq_value *v = g->outputs[i];
        if (!(v->kind & OPQ_VK_OUTPUT))
            return VERIFY_FAIL("graph output '%s' lacks its output flag", v->name);
        if (!value_defined(v))
            return VERIFY_FAIL("graph output '%s' is not produced by any node", v->name);
    }
    for (int i = 0; i < g->n_inputs; i++)
        if (!(g->inputs[i]->kind & OPQ_VK_INPUT))
            return VERIFY_FAIL("graph input '%s' lacks its input flag", g->inputs[i]->name);
    for (int i = 0; i < g->n_inits; i++)
        if (!(g->inits[i]->kind & OPQ_VK_INIT))
            return VERIFY_FAIL("initializer '%s' lacks its initializer flag", g->inits[i]->name);
    return OPQ_OK;
}
