/* test_exec.c: the executor: plan/run of a small MLP-like chain, buffer reuse below the sum of
 * all values, sub-range runs equal to the full run, the capture callback, backward over a range
 * against finite differences, dynamic batch through Shape -> Gather -> Concat -> Reshape, and
 * plan-time failures for unsupported ops and opsets (naming the node). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base.h"
#include "exec.h"
#include "gb.h"

static void fill(float *x, size_t n, uint32_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f;
    }
}

// x [B,8] -> MatMul w1 [8,16] -> Add b1 -> Relu -> MatMul w2 [16,16] -> Tanh -> MatMul w3 -> y
static struct opq_model *chain(struct opq_ctx *ctx) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 8));
    float w1[128], b1[16], w2[256], w3[64];
    fill(w1, 128, 1);
    fill(b1, 16, 2);
    fill(w2, 256, 3);
    fill(w3, 64, 4);
    gb_init_f32(m, "w1", GB_SHAPE(8, 16), w1);
    gb_init_f32(m, "b1", GB_SHAPE(16), b1);
    gb_init_f32(m, "w2", GB_SHAPE(16, 16), w2);
    gb_init_f32(m, "w3", GB_SHAPE(16, 4), w3);
    gb_node(m, "MatMul", "x,w1", "h1");
    gb_node(m, "Add", "h1,b1", "h2");
    gb_node(m, "Relu", "h2", "h3");
    gb_node(m, "MatMul", "h3,w2", "h4");
    gb_node(m, "Tanh", "h4", "h5");
    gb_node(m, "MatMul", "h5,w3", "y");
    gb_output(m, "y");
    return m;
}

static struct opq_named_tensor input_x(float *x, int64_t batch) {
    struct opq_named_tensor t = {.name = "x"};
    t.t.dtype = OPQ_DTYPE_FLOAT;
    t.t.ndim = 2;
    t.t.shape[0] = batch;
    t.t.shape[1] = 8;
    t.t.data = x;
    t.t.nbytes = (size_t)batch * 8 * sizeof(float);
    return t;
}

static void test_run_and_reuse(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = chain(ctx);
    float x[32];
    fill(x, 32, 9);
    struct opq_named_tensor in = input_x(x, 4);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    struct opq_tensor y1;
    assert_int_equal(opq_exec_run(ex, &in, 1, &y1, 1), OPQ_OK);
    assert_int_equal(y1.ndim, 2);
    assert_int_equal(y1.shape[0], 4);
    assert_int_equal(y1.shape[1], 4);
    float first[16];
    memcpy(first, y1.data, sizeof(first));
    struct opq_exec_stats st;
    opq_exec_get_stats(ex, &st);
    assert_true(st.buffer_bytes < st.value_bytes); // buffers are shared
    // same inputs -> byte-identical outputs
    struct opq_tensor y2;
    assert_int_equal(opq_exec_run(ex, &in, 1, &y2, 1), OPQ_OK);
    assert_memory_equal(first, y2.data, sizeof(first));
    // no reuse gives the same numbers
    struct opq_exec *ex2 = NULL;
    struct opq_exec_opts opts = {.keep_all = true};
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, &opts, &ex2), OPQ_OK);
    struct opq_tensor y3;
    assert_int_equal(opq_exec_run(ex2, &in, 1, &y3, 1), OPQ_OK);
    assert_memory_equal(first, y3.data, sizeof(first));
    struct opq_exec_stats st2;
    opq_exec_get_stats(ex2, &st2);
    assert_true(st.buffer_bytes < st2.buffer_bytes);
    // reference in plain C
    const float *w1 = opq_graph_value(m->graph, "w1")->t.data;
    const float *b1 = opq_graph_value(m->graph, "b1")->t.data;
    const float *w2 = opq_graph_value(m->graph, "w2")->t.data;
    const float *w3 = opq_graph_value(m->graph, "w3")->t.data;
    for (int r = 0; r < 4; r++) {
        float h[16], g[16];
        for (int j = 0; j < 16; j++) {
            double s = 0;
            for (int k = 0; k < 8; k++)
                s += (double)x[r * 8 + k] * (double)w1[k * 16 + j];
            float v = (float)s + b1[j];
            h[j] = v > 0 ? v : 0;
        }
        for (int j = 0; j < 16; j++) {
            double s = 0;
            for (int k = 0; k < 16; k++)
                s += (double)h[k] * (double)w2[k * 16 + j];
            g[j] = tanhf((float)s);
        }
        for (int j = 0; j < 4; j++) {
            double s = 0;
            for (int k = 0; k < 16; k++)
                s += (double)g[k] * (double)w3[k * 4 + j];
            assert_true(fabs(s - (double)first[r * 4 + j]) < 1e-5);
        }
    }
    opq_exec_free(ex2);
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

struct cap {
    int calls;
    bool saw_h3;
    float h3_first;
};

static enum opq_status on_value(void *user, const char *name, const struct opq_tensor *t) {
    struct cap *c = user;
    c->calls++;
    if (strcmp(name, "h3") == 0) {
        c->saw_h3 = true;
        c->h3_first = ((const float *)t->data)[0];
    }
    return OPQ_OK;
}

// A capture-only run stops at the last node producing a captured value: the captured bytes are
// those of a full run, and the nodes after it do not run (they would call the hook for y).
static void test_run_captured_stops_early(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = chain(ctx);
    float x[16];
    fill(x, 16, 5);
    struct opq_named_tensor in = input_x(x, 2);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    struct cap full = {0}, early = {0};
    const char *all[] = {"h3", "y"};
    assert_int_equal(opq_exec_set_capture(ex, all, 2, on_value, &full), OPQ_OK);
    assert_int_equal(opq_exec_run(ex, &in, 1, NULL, 0), OPQ_OK);
    assert_int_equal(full.calls, 2);
    const char *h3[] = {"h3"};
    struct cap seen_all = {0};
    assert_int_equal(opq_exec_set_capture(ex, h3, 1, on_value, &early), OPQ_OK);
    assert_int_equal(opq_exec_run_captured(ex, &in, 1), OPQ_OK);
    assert_int_equal(early.calls, 1);
    assert_true(early.saw_h3 && early.h3_first == full.h3_first);
    // capture-all runs the whole graph
    assert_int_equal(opq_exec_set_capture(ex, NULL, -1, on_value, &seen_all), OPQ_OK);
    assert_int_equal(opq_exec_run_captured(ex, &in, 1), OPQ_OK);
    assert_true(seen_all.calls > early.calls && seen_all.saw_h3);
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_range_and_capture(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = chain(ctx);
    float x[16];
    fill(x, 16, 5);
    struct opq_named_tensor in = input_x(x, 2);
    const char *pins[] = {"h3"};
    struct opq_exec_opts opts = {.pinned = pins, .n_pinned = 1};
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, &opts, &ex), OPQ_OK);
    struct cap c = {0};
    const char *names[] = {"h3", "y"};
    assert_int_equal(opq_exec_set_capture(ex, names, 2, on_value, &c), OPQ_OK);
    struct opq_tensor y;
    assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
    assert_int_equal(c.calls, 2);
    assert_true(c.saw_h3);
    float full[8];
    memcpy(full, y.data, sizeof(full));
    // h3 is pinned: rerun the tail (nodes 3..5) from it alone
    const struct opq_tensor *h3 = opq_exec_value(ex, "h3");
    assert_true(((const float *)h3->data)[0] == c.h3_first);
    assert_int_equal(opq_exec_set_capture(ex, NULL, 0, NULL, NULL), OPQ_OK);
    assert_int_equal(opq_exec_run_range(ex, 3, 5, NULL, 0), OPQ_OK);
    assert_memory_equal(opq_exec_value(ex, "y")->data, full, sizeof(full));
    // or from a caller-provided copy
    float h3copy[32];
    memcpy(h3copy, h3->data, sizeof(h3copy));
    struct opq_named_tensor given = {.name = "h3", .t = *h3};
    given.t.data = h3copy;
    assert_int_equal(opq_exec_run_range(ex, 3, 5, &given, 1), OPQ_OK);
    assert_memory_equal(opq_exec_value(ex, "y")->data, full, sizeof(full));
    // h4 is not pinned and not provided: a range starting after its producer must refuse
    assert_int_equal(opq_exec_run_range(ex, 4, 5, NULL, 0), OPQ_ERR_USAGE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "h4"));
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static double loss(struct opq_exec *ex, struct opq_named_tensor *in, const float *w) {
    struct opq_tensor y;
    assert_int_equal(opq_exec_run(ex, in, 1, &y, 1), OPQ_OK);
    double l = 0;
    for (int i = 0; i < 8; i++)
        l += (double)w[i] * (double)((const float *)y.data)[i];
    return l;
}

// Central differences of loss() along p[0], p[step], ... (changed in place and restored, as
// reconstruction changes weights between runs) against the gradient g.
static void fd_check(struct opq_exec *ex, struct opq_named_tensor *in, const float *w, float *p,
                     int n, int step, const float *g) {
    for (int i = 0; i < n; i += step) {
        float v0 = p[i];
        p[i] = v0 + 1e-2f;
        double a = loss(ex, in, w);
        p[i] = v0 - 1e-2f;
        double b = loss(ex, in, w);
        p[i] = v0;
        assert_true(fabs((a - b) / 2e-2 - (double)g[i]) < 2e-3);
    }
}

static void test_backward(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = chain(ctx);
    float x[16];
    fill(x, 16, 6);
    struct opq_named_tensor in = input_x(x, 2);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    float w[8];
    fill(w, 8, 7);
    struct opq_named_tensor seed = {.name = "y", .t = *opq_exec_value(ex, "y")};
    seed.t.data = w;
    const char *wrt[] = {"x", "w2", "b1"};
    struct opq_tensor g[3];
    assert_int_equal(opq_exec_backward(ex, 0, 5, &in, 1, &seed, 1, wrt, 3, g), OPQ_OK);
    assert_int_equal(g[1].shape[0], 16);
    float dx[16], dw2[256];
    memcpy(dx, g[0].data, sizeof(dx));
    memcpy(dw2, g[1].data, sizeof(dw2));
    // reconstruction marks what it trains: their data may change between runs
    opq_graph_value(m->graph, "w2")->kind |= OPQ_VK_PARAM;
    float *w2 = opq_graph_value(m->graph, "w2")->t.data;
    fd_check(ex, &in, w, x, 16, 1, dx);
    // weights are changed in place between runs (as reconstruction does)
    fd_check(ex, &in, w, w2, 256, 37, dw2);
    // gradients survive the forward runs made since
    assert_memory_equal(g[0].data, dx, sizeof(dx));
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

// x [2,8] -> MatMul w1 -> h1 [2,16] -> two Reshapes (views) -> an element-wise GELU chain
// (Div, Erf, Add, Mul, Mul) -> + h1 (residual) -> Sub c -> two Slices summed -> MatMul w3 -> y:
// the tape's fused chains, shared view bytes, handed-over Add/Sub/view gradients, reused
// gradient buffers and Slice scatter all on one path.
static struct opq_model *paths(struct opq_ctx *ctx) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 8));
    float w1[128], w3[32], c2[16], c3[16];
    fill(w1, 128, 11);
    fill(w3, 32, 12);
    fill(c3, 16, 13);
    for (int i = 0; i < 16; i++)
        c2[i] = 1.0f + 0.05f * (float)i;
    float one = 1.0f, half = 0.5f;
    gb_init_f32(m, "w1", GB_SHAPE(8, 16), w1);
    gb_init_f32(m, "w3", GB_SHAPE(8, 4), w3);
    gb_init_f32(m, "c2", GB_SHAPE(16), c2);
    gb_init_f32(m, "c3", GB_SHAPE(16), c3);
    gb_init_f32(m, "one", GB_SHAPE(1), &one);
    gb_init_f32(m, "half", GB_SHAPE(1), &half);
    gb_init_i64(m, "s3", GB_SHAPE(3), (const int64_t[]){2, 4, 4});
    gb_init_i64(m, "s2", GB_SHAPE(2), (const int64_t[]){2, 16});
    gb_init_i64(m, "b0", GB_SHAPE(1), (const int64_t[]){0});
    gb_init_i64(m, "b8", GB_SHAPE(1), (const int64_t[]){8});
    gb_init_i64(m, "b16", GB_SHAPE(1), (const int64_t[]){16});
    gb_init_i64(m, "ax1", GB_SHAPE(1), (const int64_t[]){1});
    gb_node(m, "MatMul", "x,w1", "h1");
    gb_node(m, "Reshape", "h1,s3", "r1");
    gb_node(m, "Reshape", "r1,s2", "r2");
    gb_node(m, "Div", "r2,c2", "d");
    gb_node(m, "Erf", "d", "e");
    gb_node(m, "Add", "e,one", "a");
    gb_node(m, "Mul", "a,r2", "mm");
    gb_node(m, "Mul", "mm,half", "gl");
    gb_node(m, "Add", "gl,h1", "res");
    gb_node(m, "Sub", "res,c3", "sb");
    gb_node(m, "Slice", "sb,b0,b8,ax1", "sl1");
    gb_node(m, "Slice", "sb,b8,b16,ax1", "sl2");
    gb_node(m, "Add", "sl1,sl2", "t");
    gb_node(m, "MatMul", "t,w3", "y");
    gb_output(m, "y");
    return m;
}

static void test_backward_paths(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = paths(ctx);
    float x[16];
    fill(x, 16, 14);
    struct opq_named_tensor in = input_x(x, 2);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    int n = m->graph->n_nodes;
    float w[8];
    fill(w, 8, 15);
    struct opq_named_tensor seed = {.name = "y", .t = *opq_exec_value(ex, "y")};
    seed.t.data = w;
    const char *wrt[] = {"x", "w1", "r2"};
    struct opq_tensor g[3];
    assert_int_equal(opq_exec_backward(ex, 0, n - 1, &in, 1, &seed, 1, wrt, 3, g), OPQ_OK);
    float dx[16], dw1[128];
    memcpy(dx, g[0].data, sizeof(dx));
    memcpy(dw1, g[1].data, sizeof(dw1));
    opq_graph_value(m->graph, "w1")->kind |= OPQ_VK_PARAM;
    float *w1 = opq_graph_value(m->graph, "w1")->t.data;
    fd_check(ex, &in, w, x, 16, 1, dx);
    fd_check(ex, &in, w, w1, 128, 7, dw1);
    // an intermediate asked for keeps its own gradient: the chain's part of dL/dh1
    const float *dr2 = g[2].data;
    double s = 0.0;
    for (int i = 0; i < 32; i++)
        s += fabs((double)dr2[i]);
    assert_true(s > 0.0);
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

// x [2,8] -> the deferred-softmax pattern (ReduceMax, Sub, Exp, ReduceSum, MatMul v, Div) plus
// Slice(x)*Slice(x) and the row max itself -> y [2,4]: gradients that kernels add into the
// buffer of x's or e's other users (Slice, ReduceMax, ReduceSum, Mul; kernel backward_adds).
static struct opq_model *adds(struct opq_ctx *ctx) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 8));
    float v[32];
    fill(v, 32, 21);
    gb_init_f32(m, "v", GB_SHAPE(8, 4), v);
    gb_init_i64(m, "b0", GB_SHAPE(1), (const int64_t[]){0});
    gb_init_i64(m, "b4", GB_SHAPE(1), (const int64_t[]){4});
    gb_init_i64(m, "b8", GB_SHAPE(1), (const int64_t[]){8});
    gb_init_i64(m, "ax1", GB_SHAPE(1), (const int64_t[]){1});
    gb_init_i64(m, "last", GB_SHAPE(1), (const int64_t[]){-1});
    struct opq_node *mx = gb_node(m, "ReduceMax", "x", "mx");
    gb_attr_ints(m, mx, "axes", 1, (const int64_t[]){-1});
    gb_node(m, "Sub", "x,mx", "d");
    gb_node(m, "Exp", "d", "e");
    gb_node(m, "ReduceSum", "e,last", "z");
    gb_node(m, "MatMul", "e,v", "p");
    gb_node(m, "Div", "p,z", "y0");
    gb_node(m, "Slice", "x,b0,b4,ax1", "s1");
    gb_node(m, "Slice", "x,b4,b8,ax1", "s2");
    gb_node(m, "Mul", "s1,s2", "q");
    gb_node(m, "Add", "y0,q", "y1");
    gb_node(m, "Add", "y1,mx", "y");
    gb_output(m, "y");
    return m;
}

static void test_backward_adds(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = adds(ctx);
    float x[16];
    fill(x, 16, 20); // row maxima at least 0.05 above the runner-up (no kink in the step)
    struct opq_named_tensor in = input_x(x, 2);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    float w[8];
    fill(w, 8, 23);
    struct opq_named_tensor seed = {.name = "y", .t = *opq_exec_value(ex, "y")};
    seed.t.data = w;
    const char *wrt[] = {"x", "v"};
    struct opq_tensor g[2];
    assert_int_equal(opq_exec_backward(ex, 0, m->graph->n_nodes - 1, &in, 1, &seed, 1, wrt, 2, g),
                     OPQ_OK);
    float dx[16], dv[32];
    memcpy(dx, g[0].data, sizeof(dx));
    memcpy(dv, g[1].data, sizeof(dv));
    // the in-place sweep (seed buffer reused, destroyed) gives the same bytes
    struct opq_exec_tape *tape = NULL;
    assert_int_equal(opq_exec_tape_new(ex, &tape), OPQ_OK);
    assert_int_equal(opq_exec_tape_record(tape, 0, m->graph->n_nodes - 1, &in, 1, wrt, 2), OPQ_OK);
    float wcopy[8];
    memcpy(wcopy, w, sizeof(wcopy));
    struct opq_named_tensor seed2 = seed;
    seed2.t.data = wcopy;
    struct opq_tensor g2[2];
    assert_int_equal(opq_exec_tape_backward_in_place(tape, 0, &seed2, 1, g2), OPQ_OK);
    assert_memory_equal(g2[0].data, dx, sizeof(dx));
    assert_memory_equal(g2[1].data, dv, sizeof(dv));
    opq_exec_tape_free(tape);
    opq_graph_value(m->graph, "v")->kind |= OPQ_VK_PARAM;
    float *v = opq_graph_value(m->graph, "v")->t.data;
    fd_check(ex, &in, w, x, 16, 1, dx);
    fd_check(ex, &in, w, v, 32, 3, dv);
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_dynamic_reshape(void **state) {
    (void)state;
    // y = Reshape(x, Concat(Gather(Shape(x), 0), [-1])): the shape is only known per batch
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 2, 3));
    gb_init_i64(m, "zero", GB_SCALAR, (const int64_t[]){0});
    gb_init_i64(m, "m1", GB_SHAPE(1), (const int64_t[]){-1});
    gb_init_i64(m, "ax", GB_SHAPE(1), (const int64_t[]){0});
    gb_node(m, "Shape", "x", "s");
    struct opq_node *ga = gb_node(m, "Gather", "s,zero", "b");
    gb_attr_int(m, ga, "axis", 0);
    gb_node(m, "Unsqueeze", "b,ax", "b1");
    struct opq_node *cc = gb_node(m, "Concat", "b1,m1", "shp");
    gb_attr_int(m, cc, "axis", 0);
    gb_node(m, "Reshape", "x,shp", "y");
    gb_output(m, "y");
    for (int64_t batch = 1; batch <= 3; batch += 2) {
        float x[18];
        struct opq_named_tensor in = {.name = "x"};
        in.t.dtype = OPQ_DTYPE_FLOAT;
        in.t.ndim = 3;
        in.t.shape[0] = batch;
        in.t.shape[1] = 2;
        in.t.shape[2] = 3;
        in.t.data = x;
        in.t.nbytes = (size_t)batch * 6 * sizeof(float);
        fill(x, 18, 3);
        struct opq_exec *ex = NULL;
        struct opq_exec_opts opts = {.batch = batch};
        assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, &opts, &ex), OPQ_OK);
        struct opq_exec_stats st;
        opq_exec_get_stats(ex, &st);
        assert_int_equal(st.n_folded, 4); // Shape, Gather, Unsqueeze, Concat
        struct opq_tensor y;
        assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
        assert_int_equal(y.ndim, 2);
        assert_int_equal(y.shape[0], batch);
        assert_int_equal(y.shape[1], 6);
        assert_memory_equal(y.data, x, in.t.nbytes);
        opq_exec_free(ex);
    }
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_unsupported(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1, 4));
    gb_node(m, "Relu", "x", "r");
    gb_node_full(m, "", "NonMaxSuppression", "nms_7", "r", "y");
    gb_output(m, "y");
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, NULL, &ex), OPQ_ERR_UNSUPPORTED);
    assert_null(ex);
    const char *msg = opq_ctx_errmsg(ctx);
    assert_non_null(strstr(msg, "nms_7"));
    assert_non_null(strstr(msg, "NonMaxSuppression"));
    assert_non_null(strstr(msg, "opset 17"));
    opq_model_free(m);
    // a known op below its minimum opset
    opq_ctx_clear_error(ctx);
    m = gb_new(ctx);
    gb_set_opset(m, 13);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1, 4));
    gb_input(m, "g", OPQ_DTYPE_FLOAT, GB_SHAPE(4));
    gb_node_full(m, "", "LayerNormalization", "ln_0", "x,g", "y");
    gb_output(m, "y");
    assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, NULL, &ex), OPQ_ERR_UNSUPPORTED);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "ln_0"));
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "opset 13"));
    opq_model_free(m);
    // missing input at run time
    opq_ctx_clear_error(ctx);
    m = chain(ctx);
    struct opq_exec_opts opts = {.batch = 2};
    assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, &opts, &ex), OPQ_OK);
    assert_int_equal(opq_exec_run(ex, NULL, 0, NULL, 0), OPQ_ERR_USAGE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "'x'"));
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_threads_same_result(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(64, 256));
    gb_input(m, "g", OPQ_DTYPE_FLOAT, GB_SHAPE(256));
    gb_node(m, "LayerNormalization", "x,g", "l");
    gb_node(m, "Softmax", "l", "s");
    gb_node(m, "Erf", "s", "y");
    gb_output(m, "y");
    static float x[64 * 256];
    float g[256];
    fill(x, 64 * 256, 11);
    fill(g, 256, 12);
    struct opq_named_tensor in[2] = {{.name = "x"}, {.name = "g"}};
    in[0].t = (struct opq_tensor){
        .dtype = OPQ_DTYPE_FLOAT, .ndim = 2, .shape = {64, 256}, .data = x, .nbytes = sizeof(x)};
    in[1].t = (struct opq_tensor){
        .dtype = OPQ_DTYPE_FLOAT, .ndim = 1, .shape = {256}, .data = g, .nbytes = sizeof(g)};
    static float out1[64 * 256];
    for (int t = 1; t <= 2; t++) {
        opq_ctx_set_threads(ctx, t);
        struct opq_exec *ex = NULL;
        assert_int_equal(opq_exec_plan(ctx, m, in, 2, NULL, &ex), OPQ_OK);
        struct opq_tensor y;
        assert_int_equal(opq_exec_run(ex, in, 2, &y, 1), OPQ_OK);
        if (t == 1)
            memcpy(out1, y.data, sizeof(out1));
        else
            assert_memory_equal(out1, y.data, sizeof(out1));
        opq_exec_free(ex);
    }
    opq_model_free(m);
    opq_ctx_free(ctx);
}

// OOM sweep: failing the i-th allocation of plan + run + backward yields OPQ_ERR_NOMEM (never a
// crash or a leak: ASan checks that), until i is past the last allocation and everything works.
static void test_oom_sweep(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = chain(ctx);
    float x[16];
    fill(x, 16, 8);
    struct opq_named_tensor in = input_x(x, 2);
    bool ok = false;
    for (long i = 0; i < 10000 && !ok; i++) {
        opq_ctx_clear_error(ctx);
        ctx->n_allocs = 0;
        ctx->fail_at = i;
        struct opq_exec *ex = NULL;
        enum opq_status st = opq_exec_plan(ctx, m, &in, 1, NULL, &ex);
        if (st == OPQ_OK)
            st = opq_exec_run(ex, &in, 1, NULL, 0);
        if (st == OPQ_OK) {
            const char *wrt[] = {"w1"};
            struct opq_tensor g;
            float w[8] = {1, 1, 1, 1, 1, 1, 1, 1};
            struct opq_named_tensor seed = {.name = "y", .t = *opq_exec_value(ex, "y")};
            seed.t.data = w;
            st = opq_exec_backward(ex, 0, 5, &in, 1, &seed, 1, wrt, 1, &g);
        }
        opq_exec_free(ex);
        if (st == OPQ_OK) {
            assert_true(ctx->n_allocs <= i); // an injected failure never goes unreported
            ok = true;                       // nothing failed: the sweep is complete
        } else {
            assert_int_equal(st, OPQ_ERR_NOMEM);
        }
    }
    assert_true(ok);
    ctx->fail_at = -1;
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_run_and_reuse), cmocka_unit_test(test_range_and_capture),
        cmocka_unit_test(test_run_captured_stops_early),
        cmocka_unit_test(test_backward),      cmocka_unit_test(test_dynamic_reshape),
        cmocka_unit_test(test_unsupported),   cmocka_unit_test(test_threads_same_result),
        cmocka_unit_test(test_oom_sweep),     cmocka_unit_test(test_backward_paths),
        cmocka_unit_test(test_backward_adds),
    };
    return cmocka_run_group_tests_name("exec", tests, NULL, NULL);
}
