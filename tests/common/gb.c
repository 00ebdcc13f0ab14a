/* gb.c: the test graph builder (see gb.h). Errors fail the current cmocka test. */
#include "gb.h"

// cmocka needs these before its header.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <stdio.h>
#include <string.h>

#include "arena.h"

static void check(struct opq_model *m, enum opq_status st, const char *what) {
    if (st != OPQ_OK)
        fail_msg("gb: %s: %s (%s)", what, opq_status_str(st), opq_ctx_errmsg(m->ctx));
}

static void *check_ptr(void *p, const char *what) {
    if (!p)
        fail_msg("gb: %s: out of memory", what);
    return p;
}

struct opq_model *gb_new(struct opq_ctx *ctx) {
    struct opq_model *m = check_ptr(opq_model_new(ctx), "model_new");
    m->ir_version    = 8;
    m->producer_name = "gb";
    m->opsets        = check_ptr(opq_arena_alloc(m->arena, sizeof(*m->opsets)), "opsets");
    m->opsets[0].domain  = "";
    m->opsets[0].version = 17;
    m->n_opsets          = 1;
    return m;
}

void gb_set_opset(struct opq_model *m, int64_t version) {
    m->opsets[0].version = version;
}

static void set_type(struct opq_value *v, enum opq_dtype dt, int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > OPQ_MAX_DIMS)
        fail_msg("gb: value '%s': bad rank %d", v->name, ndim);
    v->t.dtype = dt;
    v->t.ndim  = ndim;
    for (int i = 0; i < ndim; i++)
        v->t.shape[i] = shape[i];
}

static struct opq_value *get(struct opq_model *m, const char *name) {
    return check_ptr(opq_graph_value_get_or_add(m->graph, name), name);
}

struct opq_value *gb_input(struct opq_model *m, const char *name, enum opq_dtype dt, int ndim,
                           const int64_t *shape) {
    struct opq_value *v = get(m, name);
    set_type(v, dt, ndim, shape);
    check(m, opq_graph_add_input(m->graph, v), name);
    return v;
}

struct opq_value *gb_init(struct opq_model *m, const char *name, enum opq_dtype dt, int ndim,
                          const int64_t *shape, const void *data) {
    struct opq_tensor t = {.dtype = dt, .ndim = ndim};
    size_t            numel;
    if (ndim < 0 || ndim > OPQ_MAX_DIMS)
        fail_msg("gb: initializer '%s': bad rank %d", name, ndim);
    for (int i = 0; i < ndim; i++)
        t.shape[i] = shape[i];
    if (!opq_tensor_numel(&t, &numel) || !opq_dtype_nbytes(dt, numel, &t.nbytes))
        fail_msg("gb: initializer '%s': bad shape", name);
    t.data              = (void *)data;
    struct opq_value *v = get(m, name);
    check(m, opq_graph_set_initializer(m->graph, v, &t), name);
    return v;
}

struct opq_value *gb_init_f32(struct opq_model *m, const char *name, int ndim,
                              const int64_t *shape, const float *data) {
    return gb_init(m, name, OPQ_DTYPE_FLOAT, ndim, shape, data);
}

struct opq_value *gb_init_i64(struct opq_model *m, const char *name, int ndim,
                              const int64_t *shape, const int64_t *data) {
    return gb_init(m, name, OPQ_DTYPE_INT64, ndim, shape, data);
}

struct opq_value *gb_shape(struct opq_model *m, const char *name, enum opq_dtype dt, int ndim,
                           const int64_t *shape) {
    struct opq_value *v = get(m, name);
    set_type(v, dt, ndim, shape);
    return v;
}

// Splits "a,b,,c" into values (NULL for empty entries). Returns the count.
static int split_names(struct opq_model *m, const char *list, struct opq_value **out, int cap) {
    int n = 0;
    if (!list || !*list)
        return 0;
    const char *p = list;
    for (;;) {
        const char *e   = strchr(p, ',');
        size_t      len = e ? (size_t)(e - p) : strlen(p);
        char        buf[256];
        if (n == cap || len >= sizeof(buf))
            fail_msg("gb: name list too long: %s", list);
        memcpy(buf, p, len);
        buf[len] = '\0';
        out[n++] = len ? get(m, buf) : NULL;
        if (!e)
            break;
        p = e + 1;
    }
    return n;
}

struct opq_node *gb_node_full(struct opq_model *m, const char *domain, const char *op_type,
                              const char *name, const char *inputs, const char *outputs) {
    struct opq_value *in[32];
    struct opq_value *out[32];
    int               n_in  = split_names(m, inputs, in, 32);
    int               n_out = split_names(m, outputs, out, 32);
    struct opq_node  *n     = NULL;
    check(m, opq_graph_add_node(m->graph, op_type, domain, name, in, n_in, out, n_out, &n),
          op_type);
    return n;
}

struct opq_node *gb_node(struct opq_model *m, const char *op_type, const char *inputs,
                         const char *outputs) {
    char name[128];
    snprintf(name, sizeof(name), "%s_%d", op_type, m->graph->n_nodes);
    return gb_node_full(m, "", op_type, name, inputs, outputs);
}

static void add_attr(struct opq_model *m, struct opq_node *n, const struct opq_attr *a) {
    check(m, opq_node_add_attr(m->graph, n, a), a->name);
}

void gb_attr_int(struct opq_model *m, struct opq_node *n, const char *name, int64_t v) {
    add_attr(m, n, &(struct opq_attr){.name = name, .type = OPQ_ATTR_INT, .i = v});
}

void gb_attr_float(struct opq_model *m, struct opq_node *n, const char *name, float v) {
    add_attr(m, n, &(struct opq_attr){.name = name, .type = OPQ_ATTR_FLOAT, .f = v});
}

void gb_attr_string(struct opq_model *m, struct opq_node *n, const char *name, const char *v) {
    size_t   len = strlen(v);
    uint8_t *s   = check_ptr(opq_arena_memdup(m->arena, v, len), name);
    add_attr(m, n,
             &(struct opq_attr){.name = name, .type = OPQ_ATTR_STRING, .s = {len, s}});
}

void gb_attr_ints(struct opq_model *m, struct opq_node *n, const char *name, int count,
                  const int64_t *v) {
    int64_t *a = check_ptr(opq_arena_memdup(m->arena, v, (size_t)count * sizeof(*v)), name);
    add_attr(m, n, &(struct opq_attr){.name = name, .type = OPQ_ATTR_INTS, .n = count, .ints = a});
}

void gb_attr_floats(struct opq_model *m, struct opq_node *n, const char *name, int count,
                    const float *v) {
    float *a = check_ptr(opq_arena_memdup(m->arena, v, (size_t)count * sizeof(*v)), name);
    add_attr(m, n,
             &(struct opq_attr){.name = name, .type = OPQ_ATTR_FLOATS, .n = count, .floats = a});
}

struct opq_value *gb_output(struct opq_model *m, const char *name) {
    struct opq_value *v = gb_value(m, name);
    check(m, opq_graph_add_output(m->graph, v), name);
    return v;
}

struct opq_value *gb_value(struct opq_model *m, const char *name) {
    struct opq_value *v = opq_graph_value(m->graph, name);
    if (!v)
        fail_msg("gb: no value named '%s'", name);
    return v;
}

int gb_count_op(const struct opq_model *m, const char *op_type) {
    int c = 0;
    for (int i = 0; i < m->graph->n_nodes; i++) {
        const struct opq_node *n = m->graph->nodes[i];
        c += !(n->flags & OPQ_NF_DEAD) && strcmp(n->op_type, op_type) == 0;
    }
    return c;
}

void gb_verify(struct opq_model *m) {
    check(m, opq_graph_verify(m->graph), "verify");
}
