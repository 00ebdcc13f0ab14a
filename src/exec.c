/* exec.c: the reference executor (see exec.h).
 *
 * Plan: one slot per graph value (indexed by value->index) holding the planned tensor. Constant
 * slots (initializers, Constant nodes and plan-time folded shape arithmetic) keep their data for
 * the executor's lifetime. Every other value produced by a node gets a buffer chosen greedily
 * (best fit among buffers free at that point, else grow the largest free one, else a new one)
 * while walking the nodes in order; a buffer is freed after the last node that reads it.
 * Values that must survive (graph outputs, pinned values) are never freed.
 *
 * Backward: the range is recomputed forward with every value in its own buffer (a per-call
 * arena; a view op's output shares its input's bytes, element-wise chains run fused as in
 * plain runs), then the kernels' VJPs run in reverse order; gradients of values used by several
 * nodes are summed here, except that a kernel flagged backward_adds is handed the gradient an
 * input already has and adds its own into it (kctx din_add). A gradient dies at its producer's
 * VJP and its buffer serves later ones; an Add/Sub/view input whose gradient is its output's
 * takes that buffer over instead of a copy. */
#include "exec.h"

#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "arena.h"
#include "blas.h"
#include "graph.h"
#include "kernel.h"
#include "threadpool.h"

#define KEEP_FOREVER INT_MAX
// With fold_small_only, plan-time folding is limited to non-float results up to this size
// (shape arithmetic)...
#define FOLD_MAX_INT_BYTES ((size_t)1 << 20)
// ...and tiny float results.
#define FOLD_MAX_FLOAT_BYTES ((size_t)256)

struct slot {
    struct opq_tensor t; // planned dtype/shape; data: constant, buffer or borrowed
    int buf;             // activation buffer, -1 if none
    int def;             // producing node index, -1 for inputs and constants
    int last;            // last reading node index (KEEP_FOREVER: never released)
    bool known;          // shape known (defined so far during planning)
    bool is_const;
    bool is_input; // graph input fed by the caller
    bool valid;    // data computed/provided in this or (kept slots) an earlier run
    bool capture;
    int8_t loc; // chain-local temporary (see plan_chains): its tile slot, else -1
};

// Element-wise chains: runs of consecutive Add/Sub/Mul/Div/Erf nodes with one float output
// shape [.., cols], reading values of that shape, chain results, or constants that broadcast
// along the last dim only. A chain runs tile by tile (a few rows at a time, over the pool),
// each node's own kernel on the tile, so the intermediate values stay in cache: those read only
// inside the chain never reach memory (loc >= 0). Every element gets the same operations as
// node-by-node execution (element-wise kernels), hence the same bytes.
#define CHAIN_MAX 8     // nodes per chain
#define CHAIN_TILE 4096 // floats per tile buffer (whole rows: cols <= CHAIN_TILE)

struct chain {
    int first, last; // node indices (inclusive); skipped (dead/folded) nodes may lie inside
    int64_t rows, cols;
};

struct opq_exec {
    struct opq_ctx *ctx;
    struct opq_model *model;
    struct opq_graph *g;
    int64_t opset;
    struct opq_threadpool *pool;
    struct opq_arena *arena;   // plan lifetime: buffers, folded constants, tables
    struct opq_arena *scratch; // kernels' temporaries, reset after every node
    struct opq_exec_tape *tape; // opq_exec_backward's (gradients live there until the next)
    struct opq_arena *bind;    // one run's bookkeeping
    struct slot *slots;
    int n_slots;
    const struct opq_kernel **kern; // per node; NULL for dead or folded nodes
    bool *folded;                   // per node
    const struct opq_tensor **ins;  // per-node call arrays (sized for the widest node)
    struct opq_tensor *outs;
    struct opq_tensor *douts;
    struct opq_tensor *dins;
    void **bufs;
    size_t *buf_size;
    int n_bufs;
    size_t value_bytes;
    int n_folded;
    opq_capture_fn cap_fn;
    void *cap_user;
    bool cap_all;
    bool fold_small_only;
    struct chain *chains;
    int n_chains;
    int *chain_at; // per node: the chain starting there, else -1
};

// "op 'name'" for messages; nameless nodes are named by their first output.
static const char *node_name(const struct opq_node *n) {
    if (n->name && n->name[0])
        return n->name;
    for (int i = 0; i < n->n_outputs; i++)
        if (n->outputs[i])
            return n->outputs[i]->name;
    return "?";
}

static struct slot *slot_of(struct opq_exec *e, const struct opq_value *v) {
    return &e->slots[v->index];
}

static struct opq_kctx kctx_of(struct opq_exec *e) {
    struct opq_kctx k = {
        .ctx = e->ctx,
        .scratch = e->scratch,
        .n_threads = opq_threadpool_size(e->pool),
        .opset = e->opset,
        .pool = e->pool,
    };
    return k;
}

static bool is_float(const struct opq_tensor *t) {
    return t->dtype == OPQ_DTYPE_FLOAT;
}

// ---- planning -----------------------------------------------------------------------------------

static enum opq_status plan_inputs(struct opq_exec *e, const struct opq_named_tensor *shapes,
                                   int n_shapes, int64_t batch) {
    struct opq_graph *g = e->g;
    for (int i = 0; i < n_shapes; i++) {
        struct opq_value *v = opq_graph_value(g, shapes[i].name);
        if (!v || !(v->kind & OPQ_VK_INPUT))
            return opq_set_error(e->ctx, OPQ_ERR_USAGE, "'%s' is not an input of the model",
                                 shapes[i].name ? shapes[i].name : "(null)");
    }
    for (int i = 0; i < g->n_inputs; i++) {
        struct opq_value *v = g->inputs[i];
        struct slot *s = slot_of(e, v);
        const struct opq_tensor *given = NULL;
        for (int j = 0; j < n_shapes; j++)
            if (strcmp(shapes[j].name, v->name) == 0)
                given = &shapes[j].t;
        if (!given && s->is_const)
            continue; // an initializer also listed as input (IR < 4): its default value
        s->is_const = false;
        s->is_input = true;
        s->t = v->t;
        s->t.data = NULL;
        if (given) {
            if (v->t.dtype != OPQ_DTYPE_UNDEF && given->dtype != v->t.dtype)
                return opq_set_error(e->ctx, OPQ_ERR_SHAPE, "input '%s': dtype %s, model says %s",
                                     v->name, opq_dtype_name(given->dtype),
                                     opq_dtype_name(v->t.dtype));
            if (v->t.ndim >= 0 && given->ndim != v->t.ndim)
                return opq_set_error(e->ctx, OPQ_ERR_SHAPE, "input '%s': rank %d, model says %d",
                                     v->name, given->ndim, v->t.ndim);
            for (int d = 0; v->t.ndim >= 0 && d < given->ndim; d++)
                if (v->t.shape[d] >= 0 && given->shape[d] != v->t.shape[d])
                    return opq_set_error(e->ctx, OPQ_ERR_SHAPE,
                                         "input '%s': dim %d is %lld, model says %lld", v->name, d,
                                         (long long)given->shape[d], (long long)v->t.shape[d]);
            s->t.dtype = given->dtype;
            s->t.ndim = given->ndim;
            memcpy(s->t.shape, given->shape, sizeof(s->t.shape));
        } else {
            if (s->t.ndim < 0)
                return opq_set_error(e->ctx, OPQ_ERR_SHAPE,
                                     "input '%s' has no shape in the model: give one", v->name);
            for (int d = 0; d < s->t.ndim; d++) {
                if (s->t.shape[d] >= 0)
                    continue;
                if (d != 0 || batch <= 0)
                    return opq_set_error(e->ctx, OPQ_ERR_SHAPE,
                                         "input '%s': dim %d is symbolic (%s): give its shape",
                                         v->name, d, v->dim_param[d] ? v->dim_param[d] : "?");
                s->t.shape[d] = batch;
            }
        }
        for (int d = 0; d < s->t.ndim; d++)
            if (s->t.shape[d] < 0)
                return opq_set_error(e->ctx, OPQ_ERR_SHAPE, "input '%s': dim %d is unknown",
                                     v->name, d);
        if (!opq_tensor_set_nbytes(&s->t))
            return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED, "input '%s': dtype %s unsupported",
                                 v->name, opq_dtype_name(s->t.dtype));
        s->known = true;
    }
    return OPQ_OK;
}

// Fills e->ins / e->outs for node n from the slots (outs are copies; omitted outputs get
// data NULL). `data` selects where activation data comes from (NULL: the slots).
static void node_io(struct opq_exec *e, const struct opq_node *n, struct opq_tensor *const *over) {
    for (int j = 0; j < n->n_inputs; j++) {
        const struct opq_value *v = n->inputs[j];
        e->ins[j] = !v ? NULL : over ? over[v->index] : &slot_of(e, v)->t;
    }
    for (int j = 0; j < n->n_outputs; j++) {
        const struct opq_value *v = n->outputs[j];
        if (v) {
            e->outs[j] = over ? *over[v->index] : slot_of(e, v)->t;
        } else {
            memset(&e->outs[j], 0, sizeof(e->outs[j]));
            e->outs[j].ndim = -1;
        }
    }
}

static bool node_foldable(struct opq_exec *e, const struct opq_node *n) {
    if (n->op == OPQ_OP_CONSTANT)
        return true;
    bool shape_only = n->op == OPQ_OP_SHAPE || n->op == OPQ_OP_SIZE;
    for (int j = 0; j < n->n_inputs; j++) {
        const struct opq_value *v = n->inputs[j];
        if (!v)
            continue;
        if (v->kind & OPQ_VK_PARAM)
            return false;
        if (!slot_of(e, v)->is_const && !shape_only)
            return false;
    }
    for (int j = 0; j < n->n_outputs && e->fold_small_only; j++) {
        const struct opq_tensor *t = &e->outs[j];
        if (n->outputs[j] && t->nbytes > (is_float(t) ? FOLD_MAX_FLOAT_BYTES : FOLD_MAX_INT_BYTES))
            return false;
    }
    return true;
}

static enum opq_status plan_node(struct opq_exec *e, struct opq_node *n, int i) {
    const struct opq_kernel *kern = opq_kernel_for(n->op);
    if (!kern || !kern->forward || !kern->infer)
        return opq_set_error(
            e->ctx, OPQ_ERR_UNSUPPORTED, "node '%s': op %s%s%s (opset %lld) is not supported",
            node_name(n), n->domain && n->domain[0] ? n->domain : "",
            n->domain && n->domain[0] ? "::" : "", n->op_type, (long long)e->opset);
    if (kern->min_opset > 0 && e->opset < kern->min_opset)
        return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                             "node '%s': %s at opset %lld is not supported (needs opset >= %d)",
                             node_name(n), n->op_type, (long long)e->opset, kern->min_opset);
    e->kern[i] = kern;
    for (int j = 0; j < n->n_inputs; j++) {
        const struct opq_value *v = n->inputs[j];
        if (v && !slot_of(e, v)->known)
            return opq_set_error(e->ctx, OPQ_ERR_INVALID_MODEL,
                                 "node '%s' (%s): input '%s' is not defined before it (graph "
                                 "not topologically sorted, or a missing input)",
                                 node_name(n), n->op_type, v->name);
    }
    for (int j = 0; j < n->n_outputs; j++)
        if (n->outputs[j] && slot_of(e, n->outputs[j])->known)
            return opq_set_error(e->ctx, OPQ_ERR_INVALID_MODEL,
                                 "node '%s': output '%s' is defined twice", node_name(n),
                                 n->outputs[j]->name);
    struct opq_kctx k = kctx_of(e);
    enum opq_status st = OPQ_OK;
    if (kern->parse) {
        st = kern->parse(&k, e->g, n);
        if (st != OPQ_OK)
            goto out;
    }
    node_io(e, n, NULL);
    for (int j = 0; j < n->n_outputs; j++) {
        memset(&e->outs[j], 0, sizeof(e->outs[j]));
        e->outs[j].ndim = -1;
    }
    st = kern->infer(&k, n, e->ins, e->outs);
    if (st != OPQ_OK)
        goto out;
    for (int j = 0; j < n->n_outputs; j++) {
        struct opq_tensor *t = &e->outs[j];
        if (!n->outputs[j])
            continue;
        bool ok = t->ndim >= 0 && t->ndim <= OPQ_MAX_DIMS;
        for (int d = 0; ok && d < t->ndim; d++)
            ok = t->shape[d] >= 0;
        if (!ok || !opq_tensor_set_nbytes(t)) {
            st = opq_set_error(e->ctx, OPQ_ERR_SHAPE,
                               "node '%s' (%s): cannot infer the shape of output '%s'",
                               node_name(n), n->op_type, n->outputs[j]->name);
            goto out;
        }
        t->data = NULL;
        struct slot *s = slot_of(e, n->outputs[j]);
        s->t = *t;
        s->known = true;
        s->def = i;
    }
    if (node_foldable(e, n)) {
        for (int j = 0; j < n->n_outputs; j++) {
            if (!n->outputs[j])
                continue;
            e->outs[j].data = opq_arena_alloc(e->arena, e->outs[j].nbytes);
            if (!e->outs[j].data) {
                st = opq_set_error(e->ctx, OPQ_ERR_NOMEM, "out of memory planning '%s'",
                                   node_name(n));
                goto out;
            }
        }
        st = kern->forward(&k, n, e->ins, e->outs);
        if (st != OPQ_OK)
            goto out;
        for (int j = 0; j < n->n_outputs; j++) {
            if (!n->outputs[j])
                continue;
            struct slot *s = slot_of(e, n->outputs[j]);
            s->t.data = e->outs[j].data;
            s->is_const = true;
            s->valid = true;
            s->def = -1;
        }
        e->folded[i] = true;
        e->n_folded++;
    }
out:
    if (st != OPQ_OK && opq_ctx_status(e->ctx) == OPQ_OK)
        opq_set_error(e->ctx, st, "node '%s' (%s): planning failed", node_name(n), n->op_type);
    opq_arena_rewind(e->scratch);
    return st;
}

// A pure view op (Reshape, Flatten, Squeeze, Unsqueeze, Identity) whose float/int input lives in
// an activation buffer and is read for the last time by this node hands that buffer to its
// output: the kernel then sees the same pointer on both sides and copies nothing. Returns the
// buffer, or -1.
static int view_alias(struct opq_exec *e, const struct opq_node *n, int i) {
    switch (n->op) {
    case OPQ_OP_RESHAPE:
    case OPQ_OP_FLATTEN:
    case OPQ_OP_SQUEEZE:
    case OPQ_OP_UNSQUEEZE:
    case OPQ_OP_IDENTITY:
        break;
    default:
        return -1;
    }
    if (n->n_inputs < 1 || !n->inputs[0] || n->n_outputs < 1 || !n->outputs[0])
        return -1;
    const struct slot *x = slot_of(e, n->inputs[0]);
    const struct slot *y = slot_of(e, n->outputs[0]);
    if (x->buf < 0 || x->last != i || x->t.nbytes != y->t.nbytes || x->t.dtype != y->t.dtype)
        return -1;
    // the input must not be read again by this node through another operand
    for (int j = 1; j < n->n_inputs; j++)
        if (n->inputs[j] == n->inputs[0])
            return -1;
    return x->buf;
}

// ---- element-wise chains (see struct chain) ----------------------------------------------------

static bool chain_op(const struct opq_node *n) {
    switch (n->op) {
    case OPQ_OP_ADD:
    case OPQ_OP_SUB:
    case OPQ_OP_MUL:
    case OPQ_OP_DIV:
    case OPQ_OP_ERF:
        return true;
    default:
        return false;
    }
}

static bool dims_equal(const struct opq_tensor *a, const struct opq_tensor *b) {
    if (a->ndim != b->ndim)
        return false;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d])
            return false;
    return true;
}

// Can node i join a chain whose values have shape `shape`?
static bool chain_fits(struct opq_exec *e, int i, const struct opq_tensor *shape) {
    const struct opq_node *n = e->g->nodes[i];
    if (!chain_op(n) || n->n_outputs != 1 || !n->outputs[0] || n->n_inputs < 1 ||
        n->n_inputs > 2)
        return false;
    const struct slot *y = slot_of(e, n->outputs[0]);
    if (!is_float(&y->t) || !dims_equal(&y->t, shape) || y->buf < 0)
        return false;
    for (int j = 0; j < n->n_inputs; j++) {
        if (!n->inputs[j])
            return false;
        const struct slot *x = slot_of(e, n->inputs[j]);
        if (!is_float(&x->t))
            return false;
        if (dims_equal(&x->t, shape) && !x->is_const)
            continue; // a full-size value: graph input, computed earlier, or a chain result
        if (!x->is_const || x->t.ndim > shape->ndim)
            return false;
        // a constant: 1 in every dim but the last, which is 1 or cols
        int64_t cols = shape->ndim ? shape->shape[shape->ndim - 1] : 1;
        for (int d = 0; d < x->t.ndim; d++) {
            int64_t dim = x->t.shape[d];
            if (d < x->t.ndim - 1 ? dim != 1 : (dim != 1 && dim != cols))
                return false;
        }
    }
    return true;
}

static enum opq_status plan_chains(struct opq_exec *e) {
    struct opq_graph *g = e->g;
    e->chain_at = opq_arena_alloc(e->arena, sizeof(*e->chain_at) * (size_t)(g->n_nodes + 1));
    e->chains = opq_arena_alloc(e->arena, sizeof(*e->chains) * (size_t)(g->n_nodes / 2 + 1));
    if (!e->chain_at || !e->chains)
        return opq_set_error(e->ctx, OPQ_ERR_NOMEM, "out of memory planning");
    for (int i = 0; i < g->n_nodes; i++)
        e->chain_at[i] = -1;
    for (int i = 0; i < g->n_nodes; i++) {
        if (!e->kern[i] || e->folded[i] || !chain_op(g->nodes[i]) || !g->nodes[i]->outputs[0])
            continue;
        const struct opq_tensor *shape = &slot_of(e, g->nodes[i]->outputs[0])->t;
        int64_t cols = shape->ndim ? shape->shape[shape->ndim - 1] : 1;
        if (cols <= 0 || cols > CHAIN_TILE || !chain_fits(e, i, shape))
            continue;
        int members = 1;
        int last = i;
        for (int j = i + 1; j < g->n_nodes && members < CHAIN_MAX; j++) {
            if (!e->kern[j] || e->folded[j])
                continue;
            if (!chain_fits(e, j, shape))
                break;
            members++;
            last = j;
        }
        if (members < 2)
            continue;
        struct chain *c = &e->chains[e->n_chains];
        c->first = i;
        c->last = last;
        c->cols = cols;
        c->rows = (int64_t)(shape->nbytes / sizeof(float)) / cols;
        int loc = 0;
        for (int j = i; j <= last; j++) {
            if (!e->kern[j] || e->folded[j])
                continue;
            struct slot *y = slot_of(e, g->nodes[j]->outputs[0]);
            if (y->last != KEEP_FOREVER && y->last <= last)
                y->loc = (int8_t)loc++;
        }
        e->chain_at[i] = e->n_chains++;
        i = last;
    }
    return OPQ_OK;
}

struct chain_job {
    struct opq_exec *e;
    const struct chain *c;
    struct opq_tensor *const *fw; // a tape's values (every chain value stored), or NULL
    _Atomic int failed;
};

// A tile view of value v (rows r0.. of n rows): chain temporaries in `loc`, full-size values
// at their rows, constants as a 1-D tensor broadcasting along the rows.
static void chain_view(struct opq_exec *e, const struct chain *c, const struct opq_value *v,
                       int64_t r0, int64_t n, float (*loc)[CHAIN_TILE],
                       struct opq_tensor *const *fw, struct opq_tensor *t) {
    const struct slot *s = slot_of(e, v);
    t->dtype = OPQ_DTYPE_FLOAT;
    if (s->is_const) {
        t->ndim = 1;
        t->shape[0] = (int64_t)(s->t.nbytes / sizeof(float));
        t->nbytes = s->t.nbytes;
        t->data = s->t.data;
        return;
    }
    t->ndim = 2;
    t->shape[0] = n;
    t->shape[1] = c->cols;
    t->nbytes = (size_t)(n * c->cols) * sizeof(float);
    if (fw)
        t->data = (float *)fw[v->index]->data + r0 * c->cols;
    else
        t->data = s->loc >= 0 ? loc[s->loc] : (float *)s->t.data + r0 * c->cols;
}

static void chain_tiles(void *user, int64_t t0, int64_t t1) {
    struct chain_job *j = user;
    struct opq_exec *e = j->e;
    const struct chain *c = j->c;
    struct opq_kctx k = kctx_of(e);
    k.pool = NULL; // this thread runs whole tiles
    k.n_threads = 1;
    k.scratch = NULL; // Add/Sub/Mul/Div/Erf on floats allocate nothing
    int64_t per = CHAIN_TILE / c->cols;
    float loc[CHAIN_MAX][CHAIN_TILE];
    for (int64_t t = t0; t < t1; t++) {
        int64_t r0 = t * per;
        int64_t n = c->rows - r0 < per ? c->rows - r0 : per;
        for (int i = c->first; i <= c->last; i++) {
            const struct opq_node *nd = e->g->nodes[i];
            if (!e->kern[i] || e->folded[i])
                continue;
            struct opq_tensor in[2];
            const struct opq_tensor *ins[2];
            struct opq_tensor out;
            for (int q = 0; q < nd->n_inputs; q++) {
                chain_view(e, c, nd->inputs[q], r0, n, loc, j->fw, &in[q]);
                ins[q] = &in[q];
            }
            chain_view(e, c, nd->outputs[0], r0, n, loc, j->fw, &out);
            if (e->kern[i]->forward(&k, nd, ins, &out) != OPQ_OK) {
                atomic_store(&j->failed, 1);
                return;
            }
        }
    }
}

// Runs chain c fused when nothing needs its temporaries (captured ones included); true if done.
static bool chain_run(struct opq_exec *e, const struct chain *c) {
    for (int i = c->first; i <= c->last; i++) {
        if (!e->kern[i] || e->folded[i])
            continue;
        const struct slot *y = slot_of(e, e->g->nodes[i]->outputs[0]);
        if (y->loc >= 0 && e->cap_fn && (e->cap_all || y->capture))
            return false;
    }
    struct chain_job j = {.e = e, .c = c, .fw = NULL};
    atomic_init(&j.failed, 0);
    int64_t per = CHAIN_TILE / c->cols;
    opq_parallel_for(e->pool, (c->rows + per - 1) / per, 1, chain_tiles, &j);
    return atomic_load(&j.failed) == 0;
}

// Lifetimes and greedy buffer assignment over the non-folded nodes.
static enum opq_status plan_buffers(struct opq_exec *e, const struct opq_exec_opts *opts) {
    struct opq_graph *g = e->g;
    for (int i = 0; i < g->n_nodes; i++) {
        const struct opq_node *n = g->nodes[i];
        if (!e->kern[i] || e->folded[i])
            continue;
        for (int j = 0; j < n->n_inputs; j++) {
            struct slot *s = n->inputs[j] ? slot_of(e, n->inputs[j]) : NULL;
            if (s && s->last != KEEP_FOREVER && s->last < i)
                s->last = i;
        }
    }
    for (int i = 0; i < g->n_outputs; i++)
        slot_of(e, g->outputs[i])->last = KEEP_FOREVER;
    for (int i = 0; opts && i < opts->n_pinned; i++) {
        struct opq_value *v = opq_graph_value(g, opts->pinned[i]);
        if (!v)
            return opq_set_error(e->ctx, OPQ_ERR_USAGE, "cannot pin '%s': no such value",
                                 opts->pinned[i]);
        slot_of(e, v)->last = KEEP_FOREVER;
    }
    if (opts && opts->keep_all)
        for (int i = 0; i < e->n_slots; i++)
            e->slots[i].last = KEEP_FOREVER;

    // at most one buffer per value
    bool *busy = opq_arena_alloc(e->scratch, sizeof(*busy) * ((size_t)g->n_values + 1));
    size_t *size = opq_arena_alloc(e->scratch, sizeof(*size) * ((size_t)g->n_values + 1));
    if (!busy || !size)
        return opq_set_error(e->ctx, OPQ_ERR_NOMEM, "out of memory planning buffers");
    int nb = 0;
    for (int i = 0; i < g->n_nodes; i++) {
        const struct opq_node *n = g->nodes[i];
        if (!e->kern[i] || e->folded[i])
            continue;
        int alias = view_alias(e, n, i);
        for (int j = 0; j < n->n_outputs; j++) {
            if (!n->outputs[j])
                continue;
            struct slot *s = slot_of(e, n->outputs[j]);
            size_t need = s->t.nbytes ? s->t.nbytes : 1;
            e->value_bytes += s->t.nbytes;
            if (j == 0 && alias >= 0) {
                s->buf = alias; // stays busy: the input's release below skips it
                continue;
            }
            int best = -1;
            int big = -1;
            for (int b = 0; b < nb; b++) {
                if (busy[b])
                    continue;
                if (size[b] >= need && (best < 0 || size[b] < size[best]))
                    best = b;
                if (big < 0 || size[b] > size[big])
                    big = b;
            }
            if (best < 0 && big >= 0) {
                best = big;
                size[best] = need;
            }
            if (best < 0) {
                best = nb++;
                size[best] = need;
            }
            busy[best] = true;
            s->buf = best;
        }
        // release what this node read for the last time, and outputs nobody reads
        for (int j = 0; j < n->n_inputs; j++) {
            struct slot *s = n->inputs[j] ? slot_of(e, n->inputs[j]) : NULL;
            if (s && s->buf >= 0 && s->last == i && s->buf != alias)
                busy[s->buf] = false;
        }
        for (int j = 0; j < n->n_outputs; j++) {
            struct slot *s = n->outputs[j] ? slot_of(e, n->outputs[j]) : NULL;
            if (s && s->buf >= 0 && s->last < 0)
                busy[s->buf] = false;
        }
    }
    e->n_bufs = nb;
    e->bufs = opq_arena_alloc(e->arena, sizeof(*e->bufs) * (size_t)(nb + 1));
    e->buf_size = opq_arena_alloc(e->arena, sizeof(*e->buf_size) * (size_t)(nb + 1));
    if (!e->bufs || !e->buf_size)
        return opq_set_error(e->ctx, OPQ_ERR_NOMEM, "out of memory planning buffers");
    for (int b = 0; b < nb; b++) {
        e->buf_size[b] = size[b];
        e->bufs[b] = opq_arena_alloc_raw(e->arena, size[b]);
        if (!e->bufs[b])
            return opq_set_error(e->ctx, OPQ_ERR_NOMEM,
                                 "out of memory allocating activations (%zu bytes)", size[b]);
    }
    for (int i = 0; i < e->n_slots; i++)
        if (e->slots[i].buf >= 0)
            e->slots[i].t.data = e->bufs[e->slots[i].buf];
    opq_arena_rewind(e->scratch);
    return OPQ_OK;
}

enum opq_status opq_exec_plan(struct opq_ctx *ctx, struct opq_model *model,
                              const struct opq_named_tensor *shapes, int n_shapes,
                              const struct opq_exec_opts *opts, struct opq_exec **out) {
    enum opq_status st = OPQ_OK;
    struct opq_graph *g = model->graph;
    *out = NULL;
    struct opq_exec *e = opq_calloc(ctx, 1, sizeof(*e));
    if (!e)
        return opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory creating the executor");
    e->ctx = ctx;
    e->model = model;
    e->g = g;
    e->opset = opq_model_opset(model, "");
    e->fold_small_only = opts && opts->fold_small_only;
    e->arena = opq_arena_new(ctx);
    e->scratch = opq_arena_new(ctx);
    e->bind = opq_arena_new(ctx);
    if (!e->arena || !e->scratch || !e->bind) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory creating the executor");
        goto out_fail;
    }
    int nt = opq_ctx_threads(ctx);
    opq_blas_set_threads(1); // the pool parallelises GEMMs itself (see blas.h)
    if (nt > 1) {
        e->pool = opq_threadpool_new(ctx, nt);
        if (!e->pool) {
            st = opq_ctx_status(ctx) ? opq_ctx_status(ctx) : OPQ_ERR_INTERNAL;
            goto out_fail;
        }
    }
    int max_io = 1;
    for (int i = 0; i < g->n_nodes; i++) {
        if (g->nodes[i]->index != i) {
            st =
                opq_set_error(ctx, OPQ_ERR_INTERNAL, "node %d has index %d", i, g->nodes[i]->index);
            goto out_fail;
        }
        if (g->nodes[i]->n_inputs > max_io)
            max_io = g->nodes[i]->n_inputs;
        if (g->nodes[i]->n_outputs > max_io)
            max_io = g->nodes[i]->n_outputs;
    }
    e->n_slots = g->n_values;
    e->slots = opq_arena_alloc(e->arena, sizeof(*e->slots) * (size_t)(g->n_values + 1));
    e->kern = opq_arena_alloc(e->arena, sizeof(*e->kern) * (size_t)(g->n_nodes + 1));
    e->folded = opq_arena_alloc(e->arena, sizeof(*e->folded) * (size_t)(g->n_nodes + 1));
    e->ins = opq_arena_alloc(e->arena, sizeof(*e->ins) * (size_t)max_io);
    e->outs = opq_arena_alloc(e->arena, sizeof(*e->outs) * (size_t)max_io);
    e->douts = opq_arena_alloc(e->arena, sizeof(*e->douts) * (size_t)max_io);
    e->dins = opq_arena_alloc(e->arena, sizeof(*e->dins) * (size_t)max_io);
    if (!e->slots || !e->kern || !e->folded || !e->ins || !e->outs || !e->douts || !e->dins) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory planning");
        goto out_fail;
    }
    for (int i = 0; i < g->n_values; i++) {
        const struct opq_value *v = g->values[i];
        struct slot *s = &e->slots[i];
        if (v->index != i) {
            st = opq_set_error(ctx, OPQ_ERR_INTERNAL, "value '%s' has index %d, not %d", v->name,
                               v->index, i);
            goto out_fail;
        }
        s->buf = -1;
        s->def = -1;
        s->last = -1;
        s->loc = -1;
        s->t = v->t;
        if ((v->kind & OPQ_VK_INIT) && !v->t.data && v->t.nbytes == 0 && v->t.ndim >= 0) {
            s->t.data = opq_arena_alloc(e->arena, 1); // an empty initializer: valid pointer
            if (!s->t.data) {
                st = opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory planning");
                goto out_fail;
            }
            s->is_const = true;
            s->known = true;
            s->valid = true;
        } else if ((v->kind & OPQ_VK_INIT) && v->t.data) {
            s->is_const = true;
            s->known = true;
            s->valid = true;
        } else {
            s->t.data = NULL;
        }
    }
    st = plan_inputs(e, shapes, n_shapes, opts ? opts->batch : 0);
    if (st != OPQ_OK)
        goto out_fail;
    for (int i = 0; i < g->n_nodes; i++) {
        struct opq_node *n = g->nodes[i];
        if (n->flags & OPQ_NF_DEAD)
            continue;
        st = plan_node(e, n, i);
        if (st != OPQ_OK)
            goto out_fail;
    }
    for (int i = 0; i < g->n_outputs; i++)
        if (!slot_of(e, g->outputs[i])->known) {
            st = opq_set_error(ctx, OPQ_ERR_INVALID_MODEL, "graph output '%s' is never computed",
                               g->outputs[i]->name);
            goto out_fail;
        }
    st = plan_buffers(e, opts);
    if (st == OPQ_OK)
        st = plan_chains(e);
    if (st != OPQ_OK)
        goto out_fail;
    *out = e;
    return OPQ_OK;
out_fail:
    opq_exec_free(e);
    return st;
}

void opq_exec_free(struct opq_exec *e) {
    if (!e)
        return;
    opq_threadpool_free(e->pool);
    opq_arena_free(e->arena);
    opq_arena_free(e->scratch);
    opq_exec_tape_free(e->tape);
    opq_arena_free(e->bind);
    opq_free(e->ctx, e);
}

void opq_exec_get_stats(const struct opq_exec *e, struct opq_exec_stats *st) {
    memset(st, 0, sizeof(*st));
    for (int b = 0; b < e->n_bufs; b++)
        st->buffer_bytes += e->buf_size[b];
    st->value_bytes = e->value_bytes;
    st->n_buffers = e->n_bufs;
    st->n_folded = e->n_folded;
}

struct opq_threadpool *opq_exec_pool(const struct opq_exec *e) {
    return e->pool;
}

int opq_exec_producer_index(const struct opq_exec *e, const char *name) {
    const struct opq_value *v = opq_graph_value(e->g, name);
    return v && v->producer ? v->producer->index : -1;
}

const struct opq_tensor *opq_exec_value(const struct opq_exec *e, const char *name) {
    const struct opq_value *v = opq_graph_value(e->g, name);
    if (!v || v->index < 0 || v->index >= e->n_slots)
        return NULL;
    return &e->slots[v->index].t;
}

enum opq_status opq_exec_set_capture(struct opq_exec *e, const char *const *names, int n_names,
                                     opq_capture_fn fn, void *user) {
    for (int i = 0; i < e->n_slots; i++)
        e->slots[i].capture = false;
    e->cap_fn = fn;
    e->cap_user = user;
    e->cap_all = fn && n_names < 0;
    for (int i = 0; fn && i < n_names; i++) {
        struct opq_value *v = opq_graph_value(e->g, names[i]);
        if (!v)
            return opq_set_error(e->ctx, OPQ_ERR_USAGE, "cannot capture '%s': no such value",
                                 names[i]);
        slot_of(e, v)->capture = true;
    }
    return OPQ_OK;
}

// ---- running ------------------------------------------------------------------------------------

static bool same_shape(const struct opq_tensor *a, const struct opq_tensor *b) {
    if (a->dtype != b->dtype || a->ndim != b->ndim)
        return false;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d])
            return false;
    return true;
}

static void shape_str(const struct opq_tensor *t, char *buf, size_t cap) {
    size_t len = (size_t)snprintf(buf, cap, "%s[", opq_dtype_name(t->dtype));
    for (int d = 0; d < t->ndim && len < cap; d++)
        len += (size_t)snprintf(buf + len, cap - len, d ? ",%lld" : "%lld", (long long)t->shape[d]);
    if (len < cap)
        snprintf(buf + len, cap - len, "]");
}

// Checks a caller tensor against the planned value.
static enum opq_status check_given(struct opq_exec *e, const struct opq_value *v,
                                   const struct opq_tensor *t) {
    const struct slot *s = slot_of(e, v);
    if (!same_shape(&s->t, t)) {
        char want[128];
        char got[128];
        shape_str(&s->t, want, sizeof(want));
        shape_str(t, got, sizeof(got));
        return opq_set_error(e->ctx, OPQ_ERR_SHAPE, "'%s': got %s, planned for %s", v->name, got,
                             want);
    }
    if (!t->data && s->t.nbytes)
        return opq_set_error(e->ctx, OPQ_ERR_USAGE, "'%s': no data given", v->name);
    return OPQ_OK;
}

static void refresh_constants(struct opq_exec *e) {
    // initializer data may have been replaced between runs (reconstruction updates weights)
    for (int i = 0; i < e->g->n_inits; i++) {
        const struct opq_value *v = e->g->inits[i];
        struct slot *s = slot_of(e, v);
        if (s->is_const && s->def < 0 && !s->is_input && v->t.data && (v->kind & OPQ_VK_INIT))
            s->t.data = v->t.data;
    }
    for (int i = 0; i < e->n_slots; i++) {
        struct slot *s = &e->slots[i];
        if (!s->is_const && s->last != KEEP_FOREVER)
            s->valid = false;
    }
}

struct borrow {
    struct slot *s;
    void *old;
};

// Binds caller tensors: buffered values are copied into their buffer (safe: see plan), others
// (graph inputs, constants) borrow the caller's pointer until unbind().
static enum opq_status bind_given(struct opq_exec *e, const struct opq_named_tensor *given,
                                  int n_given, bool inputs_only, struct borrow *saved) {
    for (int i = 0; i < n_given; i++) {
        struct opq_value *v = opq_graph_value(e->g, given[i].name);
        if (!v || (inputs_only && !(v->kind & OPQ_VK_INPUT)))
            return opq_set_error(e->ctx, OPQ_ERR_USAGE, "'%s' is not %s of the model",
                                 given[i].name, inputs_only ? "an input" : "a value");
        enum opq_status st = check_given(e, v, &given[i].t);
        if (st != OPQ_OK)
            return st;
        struct slot *s = slot_of(e, v);
        saved[i].s = s;
        saved[i].old = s->t.data;
        if (s->buf >= 0) {
            memcpy(s->t.data, given[i].t.data, s->t.nbytes);
            saved[i].s = NULL;
        } else {
            s->t.data = given[i].t.data;
        }
        s->valid = true;
    }
    return OPQ_OK;
}

static void unbind(struct borrow *saved, int n) {
    for (int i = n - 1; i >= 0; i--)
        if (saved[i].s)
            saved[i].s->t.data = saved[i].old;
}

// Every value the chain reads from outside has data (its first node's inputs were checked by
// the caller; later members may read other values computed before the chain).
static bool chain_after_inputs(struct opq_exec *e, const struct chain *c) {
    for (int i = c->first; i <= c->last; i++) {
        const struct opq_node *n = e->g->nodes[i];
        if (!e->kern[i] || e->folded[i])
            continue;
        for (int j = 0; j < n->n_inputs; j++) {
            const struct slot *s = slot_of(e, n->inputs[j]);
            if (s->def < c->first && !s->valid)
                return false;
        }
    }
    return true;
}

static enum opq_status run_nodes(struct opq_exec *e, int first, int last) {
    struct opq_graph *g = e->g;
    struct opq_kctx k = kctx_of(e);
    enum opq_status st = OPQ_OK;
    for (int i = first; i <= last; i++) {
        struct opq_node *n = g->nodes[i];
        if (!e->kern[i] || e->folded[i])
            continue;
        for (int j = 0; j < n->n_inputs; j++) {
            const struct opq_value *v = n->inputs[j];
            if (v && !slot_of(e, v)->valid)
                return opq_set_error(e->ctx, OPQ_ERR_USAGE,
                                     "node '%s' (%s): input '%s' has no data (provide it, or pin "
                                     "it and run its producer first)",
                                     node_name(n), n->op_type, v->name);
        }
        int ci = e->chain_at[i];
        if (ci >= 0 && e->chains[ci].last <= last && chain_after_inputs(e, &e->chains[ci]) &&
            chain_run(e, &e->chains[ci])) {
            // fused: temporaries hold nothing; results are complete, captured in node order
            for (int c = i; c <= e->chains[ci].last; c++) {
                if (!e->kern[c] || e->folded[c])
                    continue;
                const struct opq_value *v = g->nodes[c]->outputs[0];
                struct slot *s = slot_of(e, v);
                s->valid = s->loc < 0;
                if (s->valid && e->cap_fn && (e->cap_all || s->capture)) {
                    st = e->cap_fn(e->cap_user, v->name, &s->t);
                    if (st != OPQ_OK)
                        return st;
                }
            }
            i = e->chains[ci].last;
            continue;
        }
        node_io(e, n, NULL);
        st = e->kern[i]->forward(&k, n, e->ins, e->outs);
        opq_arena_rewind(e->scratch);
        if (st != OPQ_OK) {
            if (opq_ctx_status(e->ctx) == OPQ_OK)
                opq_set_error(e->ctx, st, "node '%s' (%s) failed", node_name(n), n->op_type);
            return st;
        }
        for (int j = 0; j < n->n_outputs; j++) {
            const struct opq_value *v = n->outputs[j];
            if (!v)
                continue;
            struct slot *s = slot_of(e, v);
            s->valid = true;
            if (e->cap_fn && (e->cap_all || s->capture)) {
                st = e->cap_fn(e->cap_user, v->name, &s->t);
                if (st != OPQ_OK)
                    return st;
            }
        }
    }
    return OPQ_OK;
}

enum opq_status opq_exec_run_range(struct opq_exec *e, int first, int last,
                                   const struct opq_named_tensor *provided, int n_provided) {
    if (first < 0 || last >= e->g->n_nodes || first > last)
        return opq_set_error(e->ctx, OPQ_ERR_USAGE, "node range %d..%d is outside 0..%d", first,
                             last, e->g->n_nodes - 1);
    refresh_constants(e);
    struct borrow *saved = opq_arena_alloc(e->bind, sizeof(*saved) * (size_t)(n_provided + 1));
    if (!saved)
        return opq_set_error(e->ctx, OPQ_ERR_NOMEM, "out of memory");
    enum opq_status st = bind_given(e, provided, n_provided, false, saved);
    if (st == OPQ_OK)
        st = run_nodes(e, first, last);
    unbind(saved, n_provided);
    opq_arena_reset(e->bind);
    return st;
}

static enum opq_status run_graph(struct opq_exec *e, const struct opq_named_tensor *inputs,
                                 int n_inputs, struct opq_tensor *outputs, int n_outputs,
                                 int last);

enum opq_status opq_exec_run(struct opq_exec *e, const struct opq_named_tensor *inputs,
                             int n_inputs, struct opq_tensor *outputs, int n_outputs) {
    return run_graph(e, inputs, n_inputs, outputs, n_outputs, e->g->n_nodes - 1);
}

enum opq_status opq_exec_run_captured(struct opq_exec *e, const struct opq_named_tensor *inputs,
                                      int n_inputs) {
    // nodes are in topological order: every ancestor of a captured value comes before the last
    // node producing one
    int last = e->cap_fn && !e->cap_all ? -1 : e->g->n_nodes - 1;
    for (int i = 0; last < e->g->n_nodes - 1 && i < e->n_slots; i++)
        if (e->slots[i].capture && e->slots[i].def > last)
            last = e->slots[i].def;
    return run_graph(e, inputs, n_inputs, NULL, 0, last);
}

static enum opq_status run_graph(struct opq_exec *e, const struct opq_named_tensor *inputs,
                                 int n_inputs, struct opq_tensor *outputs, int n_outputs,
                                 int last) {
    struct opq_graph *g = e->g;
    if (n_outputs > g->n_outputs)
        return opq_set_error(e->ctx, OPQ_ERR_USAGE, "%d outputs asked, the model has %d", n_outputs,
                             g->n_outputs);
    refresh_constants(e);
    for (int i = 0; i < g->n_inputs; i++) {
        struct slot *s = slot_of(e, g->inputs[i]);
        if (s->is_input)
            s->valid = false;
    }
    struct borrow *saved = opq_arena_alloc(e->bind, sizeof(*saved) * (size_t)(n_inputs + 1));
    if (!saved)
        return opq_set_error(e->ctx, OPQ_ERR_NOMEM, "out of memory");
    enum opq_status st = bind_given(e, inputs, n_inputs, true, saved);
    for (int i = 0; st == OPQ_OK && i < g->n_inputs; i++)
        if (slot_of(e, g->inputs[i])->is_input && !slot_of(e, g->inputs[i])->valid)
            st = opq_set_error(e->ctx, OPQ_ERR_USAGE, "input '%s' was not given",
                               g->inputs[i]->name);
    if (st == OPQ_OK && last >= 0)
        st = run_nodes(e, 0, last);
    for (int i = 0; st == OPQ_OK && outputs && i < n_outputs; i++)
        outputs[i] = slot_of(e, g->outputs[i])->t;
    // graph inputs that are also outputs stay borrowed: keep the caller's pointer in outputs
    unbind(saved, n_inputs);
    opq_arena_reset(e->bind);
    return st;
}

// ---- backward -----------------------------------------------------------------------------------

static enum opq_status bwd_nomem(struct opq_exec *e) {
    return opq_set_error(e->ctx, OPQ_ERR_NOMEM, "out of memory in backward");
}

struct add_job {
    float *dst;
    const float *src;
};

static void add_range(void *user, int64_t i0, int64_t i1) {
    const struct add_job *j = user;
    for (int64_t i = i0; i < i1; i++)
        j->dst[i] += j->src[i];
}

// dst += src over the pool (element-wise: the same bytes for any split).
static void add_into(struct opq_exec *e, float *dst, const float *src, size_t n) {
    struct add_job j = {dst, src};
    opq_parallel_for(e->pool, (int64_t)n, 1 << 15, add_range, &j);
}

// Pure view ops: the output has the input's bytes.
static bool is_view_op(const struct opq_node *n) {
    switch (n->op) {
    case OPQ_OP_RESHAPE:
    case OPQ_OP_FLATTEN:
    case OPQ_OP_SQUEEZE:
    case OPQ_OP_UNSQUEEZE:
    case OPQ_OP_IDENTITY:
        return true;
    default:
        return false;
    }
}

// The input of node n whose gradient is exactly the gradient of its output 0 (Add without
// broadcast, Sub's minuend, view ops), or -1. The reverse sweep then hands the output's
// gradient buffer over instead of copying it.
static int passthrough_input(const struct opq_node *n, struct opq_tensor *const *fw) {
    int cand[2] = {0, -1};
    if (n->op == OPQ_OP_ADD)
        cand[1] = 1;
    else if (n->op != OPQ_OP_SUB && !is_view_op(n))
        return -1;
    if (n->n_outputs < 1 || !n->outputs[0] || !fw[n->outputs[0]->index])
        return -1;
    const struct opq_tensor *y = fw[n->outputs[0]->index];
    for (int c = 0; c < 2; c++) {
        int j = cand[c];
        if (j < 0 || j >= n->n_inputs || !n->inputs[j])
            continue;
        const struct opq_tensor *x = fw[n->inputs[j]->index];
        if (!x || !is_float(x) || !is_float(y) || x->nbytes != y->nbytes)
            continue;
        bool twice = false;
        for (int q = 0; q < n->n_inputs; q++)
            twice = twice || (q != j && n->inputs[q] == n->inputs[j]);
        if (!twice)
            return j;
    }
    return -1;
}

// Is input j of n also another of its inputs?
static bool twice_input(const struct opq_node *n, int j) {
    for (int q = 0; q < n->n_inputs; q++)
        if (q != j && n->inputs[q] == n->inputs[j])
            return true;
    return false;
}

// A recorded forward (see exec.h): every value of nodes first..last kept in the tape's arena.
struct opq_exec_tape {
    struct opq_exec *e;
    struct opq_arena *fwd;   // the record: forward values, `need`, wrt indices
    struct opq_arena *grads; // one reverse sweep
    int first, last;
    struct opq_tensor **fw; // per slot: forward value
    bool *need;             // per slot: on a gradient path
    int *wrt;               // value indices
    int n_wrt;
    bool valid;
};

enum opq_status opq_exec_tape_new(struct opq_exec *e, struct opq_exec_tape **out) {
    struct opq_exec_tape *t = opq_calloc(e->ctx, 1, sizeof(*t));
    *out = NULL;
    if (!t)
        return bwd_nomem(e);
    t->e = e;
    t->fwd = opq_arena_new(e->ctx);
    t->grads = opq_arena_new(e->ctx);
    if (!t->fwd || !t->grads) {
        opq_exec_tape_free(t);
        return bwd_nomem(e);
    }
    *out = t;
    return OPQ_OK;
}

void opq_exec_tape_free(struct opq_exec_tape *t) {
    if (!t)
        return;
    opq_arena_free(t->fwd);
    opq_arena_free(t->grads);
    opq_free(t->e->ctx, t);
}

// Node n of a record: its inputs bound (provided, recorded or executor values) and its outputs
// given tape storage (a view shares its input's bytes: recorded values never change); `need`
// follows the gradient path.
static enum opq_status tape_node_values(struct opq_exec_tape *t, const struct opq_node *n,
                                        struct opq_tensor **fw, bool *need) {
    struct opq_exec *e = t->e;
    bool any_need = false;
    for (int j = 0; j < n->n_inputs; j++) {
        const struct opq_value *v = n->inputs[j];
        if (!v)
            continue;
        any_need = any_need || need[v->index];
        if (fw[v->index])
            continue;
        struct slot *s = slot_of(e, v);
        if (!s->valid)
            return opq_set_error(e->ctx, OPQ_ERR_USAGE,
                                 "node '%s' (%s): input '%s' has no data (provide it)",
                                 node_name(n), n->op_type, v->name);
        fw[v->index] = &s->t;
    }
    for (int j = 0; j < n->n_outputs; j++) {
        const struct opq_value *v = n->outputs[j];
        if (!v)
            continue;
        struct opq_tensor *tt = opq_arena_alloc(t->fwd, sizeof(*tt));
        if (!tt)
            return bwd_nomem(e);
        *tt = slot_of(e, v)->t;
        const struct opq_tensor *src =
            j == 0 && is_view_op(n) && n->inputs[0] ? fw[n->inputs[0]->index] : NULL;
        if (src && src->nbytes == tt->nbytes && src->dtype == tt->dtype)
            tt->data = src->data;
        else
            tt->data = opq_arena_alloc_raw(t->fwd, tt->nbytes);
        if (!tt->data)
            return bwd_nomem(e);
        fw[v->index] = tt;
        if (any_need && is_float(tt))
            need[v->index] = true;
    }
    return OPQ_OK;
}

enum opq_status opq_exec_tape_record(struct opq_exec_tape *t, int first, int last,
                                     const struct opq_named_tensor *provided, int n_provided,
                                     const char *const *wrt, int n_wrt) {
    struct opq_exec *e = t->e;
    struct opq_graph *g = e->g;
    enum opq_status st = OPQ_OK;
    t->valid = false;
    if (first < 0 || last >= g->n_nodes || first > last)
        return opq_set_error(e->ctx, OPQ_ERR_USAGE, "node range %d..%d is outside 0..%d", first,
                             last, g->n_nodes - 1);
    refresh_constants(e);
    opq_arena_rewind(t->fwd);
    size_t ns = (size_t)e->n_slots + 1;
    struct opq_tensor **fw = opq_arena_alloc(t->fwd, sizeof(*fw) * ns); // forward values
    bool *need = opq_arena_alloc(t->fwd, sizeof(*need) * ns);           // on a grad path
    int *wv = opq_arena_alloc(t->fwd, sizeof(*wv) * ((size_t)n_wrt + 1));
    if (!fw || !need || !wv)
        return bwd_nomem(e);
    // 1. values available to the range: provided, constant or valid
    for (int i = 0; i < n_provided; i++) {
        struct opq_value *v = opq_graph_value(g, provided[i].name);
        if (!v)
            return opq_set_error(e->ctx, OPQ_ERR_USAGE, "'%s' is not a value of the model",
                                 provided[i].name);
        st = check_given(e, v, &provided[i].t);
        if (st != OPQ_OK)
            return st;
        fw[v->index] = opq_arena_memdup(t->fwd, &provided[i].t, sizeof(provided[i].t));
        if (!fw[v->index])
            return bwd_nomem(e);
    }
    for (int i = 0; i < n_wrt; i++) {
        struct opq_value *v = opq_graph_value(g, wrt[i]);
        if (!v)
            return opq_set_error(e->ctx, OPQ_ERR_USAGE, "gradient asked for '%s': no such value",
                                 wrt[i]);
        need[v->index] = is_float(&slot_of(e, v)->t);
        wv[i] = v->index;
    }
    // 2. forward, keeping everything
    struct opq_kctx k = kctx_of(e);
    for (int i = first; i <= last; i++) {
        struct opq_node *n = g->nodes[i];
        if (!e->kern[i] || e->folded[i])
            continue;
        int ci = e->chain_at[i];
        if (ci >= 0 && e->chains[ci].last <= last) {
            // an element-wise chain: every value stored, computed tile by tile
            const struct chain *c = &e->chains[ci];
            for (int q = c->first; q <= c->last && st == OPQ_OK; q++)
                if (e->kern[q] && !e->folded[q])
                    st = tape_node_values(t, g->nodes[q], fw, need);
            if (st != OPQ_OK)
                return st;
            struct chain_job j = {.e = e, .c = c, .fw = fw};
            atomic_init(&j.failed, 0);
            int64_t per = CHAIN_TILE / c->cols;
            opq_parallel_for(e->pool, (c->rows + per - 1) / per, 1, chain_tiles, &j);
            if (atomic_load(&j.failed) != 0) {
                if (opq_ctx_status(e->ctx) == OPQ_OK)
                    opq_set_error(e->ctx, OPQ_ERR_INTERNAL, "node '%s' (%s) failed",
                                  node_name(n), n->op_type);
                return opq_ctx_status(e->ctx);
            }
            i = c->last;
            continue;
        }
        if ((st = tape_node_values(t, n, fw, need)) != OPQ_OK)
            return st;
        node_io(e, n, fw);
        st = e->kern[i]->forward(&k, n, e->ins, e->outs);
        opq_arena_rewind(e->scratch);
        if (st != OPQ_OK) {
            if (opq_ctx_status(e->ctx) == OPQ_OK)
                opq_set_error(e->ctx, st, "node '%s' (%s) failed", node_name(n), n->op_type);
            return st;
        }
    }
    t->first = first;
    t->last = last;
    t->fw = fw;
    t->need = need;
    t->wrt = wv;
    t->n_wrt = n_wrt;
    t->valid = true;
    return OPQ_OK;
}

const struct opq_tensor *opq_exec_tape_value(const struct opq_exec_tape *t, const char *name) {
    if (!t->valid)
        return NULL;
    const struct opq_value *v = opq_graph_value(t->e->g, name);
    return v ? t->fw[v->index] : NULL;
}

// Gradient buffers of one reverse sweep: a gradient dies at its producer's VJP, and its buffer
// serves a later allocation of the same size, so a sweep touches the memory of its live
// gradients, not of all of them.
struct gpool {
    struct gbuf {
        float *p;
        size_t n;
    } *b;
    int count, cap;
    const struct opq_named_tensor *seeds; // in-place sweep: the caller's buffers (never pooled)
    int n_seeds;
};

static float *grad_alloc(struct opq_exec_tape *t, struct gpool *gp, size_t n) {
    for (int i = gp->count - 1; i >= 0; i--)
        if (gp->b[i].n == n) {
            float *p = gp->b[i].p;
            gp->b[i] = gp->b[--gp->count];
            return p;
        }
    return opq_arena_alloc_raw(t->grads, n);
}

static void grad_release(struct gpool *gp, float *p, size_t n) {
    for (int i = 0; i < gp->n_seeds; i++)
        if (gp->seeds[i].t.data == p)
            return;
    if (p && gp->count < gp->cap)
        gp->b[gp->count++] = (struct gbuf){p, n};
}

static bool is_wrt(const struct opq_exec_tape *t, int vi) {
    for (int i = 0; i < t->n_wrt; i++)
        if (t->wrt[i] == vi)
            return true;
    return false;
}

// After node n's VJP its outputs' gradients are dead (unless asked for); `kept` is a buffer
// handed over to an input, not released.
static void release_outputs(const struct opq_exec_tape *t, struct gpool *gp,
                            const struct opq_node *n, struct opq_tensor *const *fw, float **gr,
                            const float *kept) {
    for (int j = 0; j < n->n_outputs; j++) {
        const struct opq_value *v = n->outputs[j];
        if (!v || !gr[v->index] || is_wrt(t, v->index))
            continue;
        if (gr[v->index] != kept)
            grad_release(gp, gr[v->index], fw[v->index]->nbytes);
        gr[v->index] = NULL;
    }
}

static enum opq_status tape_backward(struct opq_exec_tape *t, int stop,
                                     const struct opq_named_tensor *seeds, int n_seeds,
                                     struct opq_tensor *grads, bool in_place) {
    struct opq_exec *e = t->e;
    struct opq_graph *g = e->g;
    enum opq_status st = OPQ_OK;
    if (!t->valid)
        return opq_set_error(e->ctx, OPQ_ERR_USAGE, "backward: no forward recorded on the tape");
    struct opq_tensor **fw = t->fw;
    opq_arena_rewind(t->grads);
    float **gr = opq_arena_alloc(t->grads, sizeof(*gr) * ((size_t)e->n_slots + 1)); // gradients
    if (!gr)
        return bwd_nomem(e);
    // 3. seeds
    for (int i = 0; i < n_seeds; i++) {
        struct opq_value *v = opq_graph_value(g, seeds[i].name);
        if (!v)
            return opq_set_error(e->ctx, OPQ_ERR_USAGE, "seed '%s': no such value", seeds[i].name);
        st = check_given(e, v, &seeds[i].t);
        if (st != OPQ_OK)
            return st;
        if (!is_float(&seeds[i].t))
            return opq_set_error(e->ctx, OPQ_ERR_USAGE, "seed '%s' must be float32", seeds[i].name);
        size_t nb = seeds[i].t.nbytes;
        if (gr[v->index]) {
            add_into(e, gr[v->index], seeds[i].t.data, nb / sizeof(float));
        } else if (in_place) {
            gr[v->index] = seeds[i].t.data;
        } else {
            gr[v->index] = opq_arena_memdup(t->grads, seeds[i].t.data, nb);
            if (!gr[v->index])
                return bwd_nomem(e);
        }
    }
    // 4. reverse sweep
    struct opq_kctx k = kctx_of(e);
    struct gpool gp = {.cap = 2 * e->n_slots + 16,
                       .seeds = in_place ? seeds : NULL,
                       .n_seeds = in_place ? n_seeds : 0};
    gp.b = opq_arena_alloc_raw(t->grads, sizeof(*gp.b) * (size_t)gp.cap);
    if (!gp.b)
        return bwd_nomem(e);
    int lo = stop > t->first ? stop : t->first;
    for (int i = t->last; i >= lo; i--) {
        struct opq_node *n = g->nodes[i];
        if (!e->kern[i] || e->folded[i])
            continue;
        bool has_dout = false;
        for (int j = 0; j < n->n_outputs; j++)
            has_dout = has_dout || (n->outputs[j] && gr[n->outputs[j]->index]);
        bool want_din = false;
        for (int j = 0; j < n->n_inputs; j++)
            want_din = want_din || (n->inputs[j] && t->need[n->inputs[j]->index]);
        if (!has_dout || !want_din) {
            release_outputs(t, &gp, n, fw, gr, NULL);
            continue;
        }
        // an input whose gradient is the output's own (and has none yet) takes over its buffer:
        // the output's gradient is complete here and read by nobody after its producer, unless
        // it was asked for
        int pt = passthrough_input(n, fw);
        const struct opq_value *ptv = pt >= 0 ? n->inputs[pt] : NULL;
        if (ptv && (!t->need[ptv->index] || gr[ptv->index] || !gr[n->outputs[0]->index] ||
                    is_wrt(t, n->outputs[0]->index)))
            ptv = NULL;
        if (ptv) {
            gr[ptv->index] = gr[n->outputs[0]->index];
            bool more = false;
            for (int j = 0; j < n->n_inputs; j++)
                more = more || (n->inputs[j] && n->inputs[j] != ptv && t->need[n->inputs[j]->index]);
            if (!more) {
                release_outputs(t, &gp, n, fw, gr, gr[ptv->index]);
                continue;
            }
        }
        if (!e->kern[i]->backward)
            return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                 "node '%s': %s has no backward (it is on the gradient path)",
                                 node_name(n), n->op_type);
        node_io(e, n, fw);
        for (int j = 0; j < n->n_outputs; j++) {
            e->douts[j] = e->outs[j];
            e->douts[j].data = n->outputs[j] ? gr[n->outputs[j]->index] : NULL;
        }
        // an input that already has a gradient (from its later users) gets it to add into
        // when the kernel can (backward_adds), once per node: no buffer, no second pass
        k.din_add = 0;
        for (int j = 0; j < n->n_inputs; j++) {
            const struct opq_value *v = n->inputs[j];
            memset(&e->dins[j], 0, sizeof(e->dins[j]));
            if (!v)
                continue;
            e->dins[j] = *fw[v->index];
            e->dins[j].data = NULL;
            if (!t->need[v->index] || v == ptv)
                continue;
            if (gr[v->index] && e->kern[i]->backward_adds && j < 32 && !twice_input(n, j)) {
                e->dins[j].data = gr[v->index];
                k.din_add |= 1u << j;
                continue;
            }
            e->dins[j].data = grad_alloc(t, &gp, e->dins[j].nbytes);
            if (!e->dins[j].data)
                return bwd_nomem(e);
        }
        st = e->kern[i]->backward(&k, n, e->ins, e->outs, e->douts, e->dins);
        opq_arena_rewind(e->scratch);
        if (st != OPQ_OK) {
            if (opq_ctx_status(e->ctx) == OPQ_OK)
                opq_set_error(e->ctx, st, "node '%s' (%s): backward failed", node_name(n),
                              n->op_type);
            return st;
        }
        for (int j = 0; j < n->n_inputs; j++) {
            const struct opq_value *v = n->inputs[j];
            if (!v || !e->dins[j].data || (k.din_add & (1u << j)))
                continue;
            if (gr[v->index]) {
                add_into(e, gr[v->index], e->dins[j].data, e->dins[j].nbytes / sizeof(float));
                grad_release(&gp, e->dins[j].data, e->dins[j].nbytes);
            } else {
                gr[v->index] = e->dins[j].data;
            }
        }
        release_outputs(t, &gp, n, fw, gr, ptv ? gr[ptv->index] : NULL);
    }
    // 5. results
    for (int i = 0; i < t->n_wrt; i++) {
        struct opq_value *v = g->values[t->wrt[i]];
        grads[i] = slot_of(e, v)->t;
        if (!gr[v->index]) {
            gr[v->index] = opq_arena_alloc(t->grads, grads[i].nbytes);
            if (!gr[v->index])
                return bwd_nomem(e);
        }
        grads[i].dtype = OPQ_DTYPE_FLOAT;
        grads[i].data = gr[v->index];
    }
    return OPQ_OK;
}

enum opq_status opq_exec_tape_backward(struct opq_exec_tape *t, int stop,
                                       const struct opq_named_tensor *seeds, int n_seeds,
                                       struct opq_tensor *grads) {
    return tape_backward(t, stop, seeds, n_seeds, grads, false);
}

enum opq_status opq_exec_tape_backward_in_place(struct opq_exec_tape *t, int stop,
                                                const struct opq_named_tensor *seeds, int n_seeds,
                                                struct opq_tensor *grads) {
    return tape_backward(t, stop, seeds, n_seeds, grads, true);
}

enum opq_status opq_exec_backward(struct opq_exec *e, int first, int last,
                                  const struct opq_named_tensor *provided, int n_provided,
                                  const struct opq_named_tensor *seeds, int n_seeds,
                                  const char *const *wrt, int n_wrt, struct opq_tensor *grads) {
    if (!e->tape) {
        enum opq_status st = opq_exec_tape_new(e, &e->tape);
        if (st != OPQ_OK)
            return st;
    }
    enum opq_status st = opq_exec_tape_record(e->tape, first, last, provided, n_provided, wrt, n_wrt);
    if (st != OPQ_OK)
        return st;
    return opq_exec_tape_backward(e->tape, first, seeds, n_seeds, grads);
}
