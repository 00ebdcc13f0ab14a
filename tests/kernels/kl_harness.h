/* kl_harness.h: a tiny harness for the layout/shape/logic/cast/einsum/QDQ kernel tests: builds one
 * node with attributes by hand, runs infer + forward like the executor does (outputs allocated to
 * the inferred nbytes), and checks a kernel's VJP against central finite differences of
 * L = sum(w * Y) with seeded random w. Header-only (static inline); include from test_k_*.c. */
#ifndef KL_HARNESS_H
#define KL_HARNESS_H

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "arena.h"
#include "base.h"
#include "graph.h"
#include "kernel.h"

#define KT_MAX 16

struct kt {
    struct opq_ctx   *ctx;
    struct opq_arena *arena;
    struct opq_kctx   k;
    struct opq_node   node;
    struct opq_attr   attrs[KT_MAX];
    struct opq_value  vals[2 * KT_MAX];
    struct opq_value *ins[KT_MAX];
    struct opq_value *outs[KT_MAX];
    struct opq_tensor out[KT_MAX];
    uint64_t          rng;
};

static inline struct kt *kt_new(const char *op_type, int n_in, int n_out) {
    struct kt *t = calloc(1, sizeof(*t));
    assert_non_null(t);
    t->ctx = opq_ctx_new();
    t->arena = opq_arena_new(t->ctx);
    assert_non_null(t->ctx);
    assert_non_null(t->arena);
    t->k.ctx = t->ctx;
    t->k.scratch = t->arena;
    t->k.n_threads = 1;
    t->k.opset = 21;
    t->node.op = opq_op_from_type("", op_type);
    t->node.op_type = op_type;
    t->node.domain = "";
    t->node.name = "n0";
    t->node.n_inputs = n_in;
    t->node.n_outputs = n_out;
    t->node.inputs = t->ins;
    t->node.outputs = t->outs;
    t->node.attrs = t->attrs;
    for (int i = 0; i < n_in; i++)
        t->ins[i] = &t->vals[i];
    for (int i = 0; i < n_out; i++)
        t->outs[i] = &t->vals[KT_MAX + i];
    t->rng = 0x853c49e6748fea9bull;
    return t;
}

static inline void kt_free(struct kt *t) {
    opq_arena_free(t->arena);
    opq_ctx_free(t->ctx);
    free(t);
}

static inline struct opq_attr *kt_attr(struct kt *t, const char *name, enum opq_attr_type type) {
    assert_true(t->node.n_attrs < KT_MAX);
    struct opq_attr *a = &t->attrs[t->node.n_attrs++];
    memset(a, 0, sizeof(*a));
    a->name = name;
    a->type = type;
    return a;
}
static inline void kt_attr_int(struct kt *t, const char *name, int64_t v) {
    kt_attr(t, name, OPQ_ATTR_INT)->i = v;
}
static inline void kt_attr_float(struct kt *t, const char *name, float v) {
    kt_attr(t, name, OPQ_ATTR_FLOAT)->f = v;
}
static inline void kt_attr_ints(struct kt *t, const char *name, const int64_t *v, int n) {
    struct opq_attr *a = kt_attr(t, name, OPQ_ATTR_INTS);
    a->n = n;
    a->ints = opq_arena_memdup(t->arena, v, sizeof(int64_t) * (size_t)n);
}
static inline void kt_attr_str(struct kt *t, const char *name, const char *s) {
    struct opq_attr *a = kt_attr(t, name, OPQ_ATTR_STRING);
    a->s.len = strlen(s);
    a->s.data = (uint8_t *)opq_arena_strdup(t->arena, s);
}

// A tensor whose data (may be NULL: shape only) is copied into the arena.
static inline struct opq_tensor kt_tensor(struct kt *t, enum opq_dtype dt, int ndim,
                                          const int64_t *shape, const void *data) {
    struct opq_tensor x;
    memset(&x, 0, sizeof(x));
    x.dtype = dt;
    x.ndim = ndim;
    for (int d = 0; d < ndim; d++)
        x.shape[d] = shape[d];
    size_t numel = 0;
    assert_true(opq_tensor_numel(&x, &numel));
    assert_true(opq_dtype_nbytes(dt, numel, &x.nbytes));
    if (data)
        x.data = opq_arena_memdup(t->arena, data, x.nbytes);
    return x;
}
static inline void kt_attr_tensor(struct kt *t, const char *name, struct opq_tensor x) {
    struct opq_attr *a = kt_attr(t, name, OPQ_ATTR_TENSOR);
    a->t = opq_arena_memdup(t->arena, &x, sizeof(x));
}

// infer + allocation + forward. Returns the first failing status.
static inline enum opq_status kt_run(struct kt *t, const struct opq_kernel *kern,
                                     const struct opq_tensor *const *in) {
    enum opq_status st = OPQ_OK;
    memset(t->out, 0, sizeof(t->out));
    if (kern->parse)
        st = kern->parse(&t->k, NULL, &t->node);
    if (!st)
        st = kern->infer(&t->k, &t->node, in, t->out);
    if (st)
        return st;
    for (int i = 0; i < t->node.n_outputs; i++) {
        if (!t->outs[i])
            continue;
        t->out[i].data = opq_arena_alloc(t->arena, t->out[i].nbytes ? t->out[i].nbytes : 1);
        assert_non_null(t->out[i].data);
    }
    return kern->forward(&t->k, &t->node, in, t->out);
}

static inline void kt_expect_shape(const struct opq_tensor *x, int ndim, const int64_t *shape) {
    assert_int_equal(x->ndim, ndim);
    for (int d = 0; d < ndim; d++)
        assert_int_equal(x->shape[d], shape[d]);
}

static inline void kt_expect_f32(const struct opq_tensor *x, const float *want, size_t n,
                                 float tol) {
    assert_int_equal(x->dtype, OPQ_DTYPE_FLOAT);
    assert_int_equal(x->nbytes, n * sizeof(float));
    const float *y = x->data;
    for (size_t i = 0; i < n; i++) {
        if (fabsf(y[i] - want[i]) > tol) {
            print_error("element %zu: got %g want %g\n", i, (double)y[i], (double)want[i]);
            fail();
        }
    }
}

static inline void kt_expect_i64(const struct opq_tensor *x, const int64_t *want, size_t n) {
    assert_int_equal(x->dtype, OPQ_DTYPE_INT64);
    assert_int_equal(x->nbytes, n * sizeof(int64_t));
    assert_memory_equal(x->data, want, n * sizeof(int64_t));
}

static inline float kt_uniform(struct kt *t) { // in [-1, 1)
    t->rng = t->rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(t->rng >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

static inline void kt_fill(struct kt *t, struct opq_tensor *x) {
    float *p = x->data;
    for (size_t i = 0; i < x->nbytes / sizeof(float); i++)
        p[i] = kt_uniform(t);
}

// L = sum_i sum(w_i * Y_i) over the float outputs, accumulated in double.
static inline double kt_loss(struct kt *t, const struct opq_kernel *kern,
                             const struct opq_tensor *const *in, float *const *w) {
    enum opq_status st = kt_run(t, kern, in);
    assert_int_equal(st, OPQ_OK);
    double l = 0.0;
    for (int i = 0; i < t->node.n_outputs; i++) {
        if (!t->outs[i] || t->out[i].dtype != OPQ_DTYPE_FLOAT)
            continue;
        const float *y = t->out[i].data;
        for (size_t e = 0; e < t->out[i].nbytes / sizeof(float); e++)
            l += (double)w[i][e] * (double)y[e];
    }
    return l;
}

// Checks kern->backward for the float inputs flagged in `diff` by central differences.
// `in` points at mutable tensors (perturbed in place and restored).
static inline void kt_grad_check(struct kt *t, const struct opq_kernel *kern,
                                 struct opq_tensor *const *in, int n_in, const bool *diff) {
    const struct opq_tensor *cin[KT_MAX];
    float *w[KT_MAX] = {0};
    struct opq_tensor dout[KT_MAX];
    struct opq_tensor din[KT_MAX];
    struct opq_tensor outs[KT_MAX];
    for (int i = 0; i < n_in; i++)
        cin[i] = in[i];
    assert_int_equal(kt_run(t, kern, cin), OPQ_OK);
    memcpy(outs, t->out, sizeof(outs));
    memset(dout, 0, sizeof(dout));
    for (int i = 0; i < t->node.n_outputs; i++) {
        if (!t->outs[i] || outs[i].dtype != OPQ_DTYPE_FLOAT)
            continue;
        dout[i] = outs[i];
        dout[i].data = opq_arena_alloc(t->arena, outs[i].nbytes + 1);
        w[i] = dout[i].data;
        for (size_t e = 0; e < outs[i].nbytes / sizeof(float); e++)
            w[i][e] = kt_uniform(t);
    }
    memset(din, 0, sizeof(din));
    for (int i = 0; i < n_in; i++) {
        if (!diff[i])
            continue;
        din[i] = *in[i];
        din[i].data = opq_arena_alloc(t->arena, in[i]->nbytes + 1);
        memset(din[i].data, 0x7f, in[i]->nbytes); // garbage: backward must write every element
    }
    assert_non_null(kern->backward);
    assert_int_equal(kern->backward(&t->k, &t->node, cin, outs, dout, din), OPQ_OK);
    const double eps = 1e-2;
    for (int i = 0; i < n_in; i++) {
        if (!diff[i])
            continue;
        float *x = in[i]->data;
        const float *g = din[i].data;
        for (size_t e = 0; e < in[i]->nbytes / sizeof(float); e++) {
            float x0 = x[e];
            x[e] = (float)((double)x0 + eps);
            double lp = kt_loss(t, kern, cin, w);
            x[e] = (float)((double)x0 - eps);
            double lm = kt_loss(t, kern, cin, w);
            x[e] = x0;
            double fd = (lp - lm) / (2.0 * eps);
            if (fabs(fd - (double)g[e]) > 1e-3 * (1.0 + fabs(fd))) {
                print_error("input %d element %zu: VJP %g, finite difference %g\n", i, e,
                            (double)g[e], fd);
                fail();
            }
        }
    }
}

#endif
