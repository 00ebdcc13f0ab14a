/* kx_fd.h: test helpers for the compute-kernel tests (exec helper): run a small model through the
 * executor, and check opq_exec_backward against central finite differences of
 * L = sum(w * Y) with seeded random w (STYLE 8.9). Header-only (static inline). */
#ifndef KX_FD_H
#define KX_FD_H

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "exec.h"
#include "gb.h"

// |a - b| <= tol, with a message naming both values.
#define kx_near(a, b, tol) kx_near_at((double)(a), (double)(b), (double)(tol), __FILE__, __LINE__)
static inline void kx_near_at(double a, double b, double tol, const char *file, int line) {
    if (!(fabs(a - b) <= tol))
        fail_msg("%s:%d: %.9g vs %.9g (tol %.3g)", file, line, a, b, tol);
}

// Deterministic values in [-1, 1).
static inline float kx_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((double)(*s >> 40) / (double)(1ULL << 24) * 2.0 - 1.0);
}

static inline void kx_fill(float *x, size_t n, uint64_t seed, float scale) {
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++)
        x[i] = kx_rand(&s) * scale;
}

static inline struct opq_named_tensor kx_f32(const char *name, int ndim, const int64_t *shape,
                                             float *data) {
    struct opq_named_tensor t = {.name = name};
    t.t.dtype = OPQ_DTYPE_FLOAT;
    t.t.ndim = ndim;
    size_t n = 1;
    for (int d = 0; d < ndim; d++) {
        t.t.shape[d] = shape[d];
        n *= (size_t)shape[d];
    }
    t.t.data = data;
    t.t.nbytes = n * sizeof(float);
    return t;
}

// Plans and runs m on inputs; copies output `out_index` into *y (malloc'd, caller frees).
static inline size_t kx_run(struct opq_ctx *ctx, struct opq_model *m,
                            const struct opq_named_tensor *in, int n_in, int out_index, float **y) {
    struct opq_exec *ex = NULL;
    enum opq_status st = opq_exec_plan(ctx, m, in, n_in, NULL, &ex);
    if (st != OPQ_OK)
        fail_msg("plan: %s", opq_ctx_errmsg(ctx));
    struct opq_tensor outs[8];
    st = opq_exec_run(ex, in, n_in, outs, m->graph->n_outputs);
    if (st != OPQ_OK)
        fail_msg("run: %s", opq_ctx_errmsg(ctx));
    size_t n = outs[out_index].nbytes / sizeof(float);
    *y = malloc(outs[out_index].nbytes + 1);
    memcpy(*y, outs[out_index].data, outs[out_index].nbytes);
    opq_exec_free(ex);
    return n;
}

static inline double kx_loss(struct opq_ctx *ctx, struct opq_model *m,
                             const struct opq_named_tensor *in, int n_in, const float *w) {
    float *y = NULL;
    size_t n = kx_run(ctx, m, in, n_in, 0, &y);
    double l = 0.0;
    for (size_t i = 0; i < n; i++)
        l += (double)w[i] * (double)y[i];
    free(y);
    return l;
}

// Checks dL/d(in[i]) for every input with want_grad[i] (NULL: all). Elements whose numeric
// derivative changes a lot between step h and h/2 are near a kink and skipped. The mean-abs
// error relative to the mean-abs gradient must stay below tol.
static inline void kx_check_grad(struct opq_ctx *ctx, struct opq_model *m,
                                 struct opq_named_tensor *in, int n_in, const bool *want_grad,
                                 double tol, uint64_t seed) {
    float *y = NULL;
    size_t ny = kx_run(ctx, m, in, n_in, 0, &y);
    float *w = malloc(ny * sizeof(float) + 1);
    kx_fill(w, ny, seed, 1.0f);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, in, n_in, NULL, &ex), OPQ_OK);
    const char *wrt[8];
    int nw = 0;
    for (int i = 0; i < n_in; i++)
        if (!want_grad || want_grad[i])
            wrt[nw++] = in[i].name;
    struct opq_named_tensor seedt = {.name = m->graph->outputs[0]->name};
    const struct opq_tensor *yt = opq_exec_value(ex, seedt.name);
    seedt.t = *yt;
    seedt.t.data = w;
    struct opq_tensor grads[8];
    enum opq_status st =
        opq_exec_backward(ex, 0, m->graph->n_nodes - 1, in, n_in, &seedt, 1, wrt, nw, grads);
    if (st != OPQ_OK)
        fail_msg("backward: %s", opq_ctx_errmsg(ctx));
    int gi = 0;
    for (int i = 0; i < n_in; i++) {
        if (want_grad && !want_grad[i])
            continue;
        const float *ana = grads[gi++].data;
        float *x = in[i].t.data;
        size_t nx = in[i].t.nbytes / sizeof(float);
        double err = 0.0;
        double mag = 0.0;
        int used = 0;
        for (size_t e = 0; e < nx; e++) {
            float x0 = x[e];
            double h = 1e-2 * (fabs((double)x0) > 1.0 ? fabs((double)x0) : 1.0);
            double num[2];
            for (int k = 0; k < 2; k++) {
                double hk = k ? h / 2 : h;
                x[e] = (float)((double)x0 + hk);
                double lp = kx_loss(ctx, m, in, n_in, w);
                x[e] = (float)((double)x0 - hk);
                double lm = kx_loss(ctx, m, in, n_in, w);
                num[k] = (lp - lm) / (2.0 * hk);
            }
            x[e] = x0;
            if (fabs(num[0] - num[1]) > 0.05 * (fabs(num[1]) + 1e-2))
                continue; // a kink (Relu, Clip, Abs) inside the step
            err += fabs(num[1] - (double)ana[e]);
            mag += fabs(num[1]);
            used++;
        }
        assert_true(used > 0);
        double rel = err / (mag + 1e-6 * used);
        if (rel > tol)
            fail_msg("%s: gradient of '%s' off by %.3g (mean-abs relative), tol %.3g",
                     m->graph->nodes[0]->op_type, in[i].name, rel, tol);
    }
    opq_exec_free(ex);
    free(w);
    free(y);
}

#endif
