/* test_k_norm.c: Softmax and LayerNormalization (op and the decomposed ReduceMean/Sub/Pow/Sqrt/
 * Div chain) plus ReduceMean/ReduceSum/ReduceMax: hand cases, edge cases (softmax rows of -1e4,
 * zero-variance LayerNorm) and finite-difference VJP checks. */
#include "kx_fd.h"

static void test_softmax_hand(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(3, 3));
    gb_node(m, "Softmax", "x", "y");
    gb_output(m, "y");
    // row 1: all -1e4 (a max that starts at 0 would underflow everything to 0/0)
    float x[9] = {1, 2, 3, -1e4f, -1e4f, -1e4f, 1000, 0, -1000};
    struct opq_named_tensor in = kx_f32("x", GB_SHAPE(3, 3), x);
    float *y = NULL;
    kx_run(ctx, m, &in, 1, 0, &y);
    double e1 = exp(-2.0), e2 = exp(-1.0);
    kx_near(y[0], e1 / (1 + e1 + e2), 1e-7);
    kx_near(y[2], 1 / (1 + e1 + e2), 1e-7);
    for (int i = 3; i < 6; i++)
        kx_near(y[i], 1.0 / 3.0, 1e-7);
    kx_near(y[6], 1.0, 0);
    kx_near(y[7], 0.0, 0);
    free(y);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_softmax_grad(void **state) {
    (void)state;
    for (int axis = 0; axis < 3; axis++) {
        struct opq_ctx *ctx = opq_ctx_new();
        struct opq_model *m = gb_new(ctx);
        gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3, 4));
        struct opq_node *n = gb_node(m, "Softmax", "x", "y");
        gb_attr_int(m, n, "axis", axis - 2); // -2, -1, 0
        gb_output(m, "y");
        float x[24];
        kx_fill(x, 24, 5, 2.0f);
        struct opq_named_tensor in = kx_f32("x", GB_SHAPE(2, 3, 4), x);
        kx_check_grad(ctx, m, &in, 1, NULL, 2e-3, 13);
        opq_model_free(m);
        opq_ctx_free(ctx);
    }
}

static struct opq_model *ln_model(struct opq_ctx *ctx, int64_t axis) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3, 4));
    gb_input(m, "g", OPQ_DTYPE_FLOAT, GB_SHAPE(4));
    gb_input(m, "b", OPQ_DTYPE_FLOAT, GB_SHAPE(4));
    struct opq_node *n = gb_node(m, "LayerNormalization", "x,g,b", "y,mean,inv");
    gb_attr_int(m, n, "axis", axis);
    gb_attr_float(m, n, "epsilon", 1e-5f);
    gb_output(m, "y");
    gb_output(m, "mean");
    gb_output(m, "inv");
    return m;
}

static void test_layernorm_hand(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = ln_model(ctx, -1);
    float x[24];
    for (int i = 0; i < 24; i++)
        x[i] = i < 4 ? 7.0f : (float)(i % 4); // row 0 has zero variance
    float g[4] = {1, 2, 3, 4};
    float b[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    struct opq_named_tensor in[3] = {kx_f32("x", GB_SHAPE(2, 3, 4), x), kx_f32("g", GB_SHAPE(4), g),
                                     kx_f32("b", GB_SHAPE(4), b)};
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, in, 3, NULL, &ex), OPQ_OK);
    struct opq_tensor out[3];
    assert_int_equal(opq_exec_run(ex, in, 3, out, 3), OPQ_OK);
    const float *y = out[0].data;
    for (int i = 0; i < 4; i++)
        kx_near(y[i], 0.5f, 1e-6); // zero variance: xhat = 0, no NaN
    // row 1 = 0,1,2,3: mean 1.5, var 1.25
    double r = 1.0 / sqrt(1.25 + 1e-5);
    for (int i = 0; i < 4; i++)
        kx_near(y[4 + i], (i - 1.5) * r * (double)g[i] + 0.5, 1e-5);
    assert_int_equal(out[1].ndim, 3);
    assert_int_equal(out[1].shape[2], 1);
    kx_near(((const float *)out[1].data)[1], 1.5, 1e-6);
    kx_near(((const float *)out[2].data)[1], r, 1e-5);
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_layernorm_grad(void **state) {
    (void)state;
    for (int64_t axis = -1; axis >= -2; axis--) {
        struct opq_ctx *ctx = opq_ctx_new();
        struct opq_model *m = gb_new(ctx);
        int64_t c = axis == -1 ? 4 : 12;
        gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3, 4));
        gb_input(m, "g", OPQ_DTYPE_FLOAT, 1, &c);
        gb_input(m, "b", OPQ_DTYPE_FLOAT, 1, &c);
        struct opq_node *n = gb_node(m, "LayerNormalization", "x,g,b", "y");
        gb_attr_int(m, n, "axis", axis);
        gb_output(m, "y");
        float x[24];
        float g[12];
        float b[12];
        kx_fill(x, 24, 21, 2.0f);
        kx_fill(g, 12, 22, 1.0f);
        kx_fill(b, 12, 23, 1.0f);
        struct opq_named_tensor in[3] = {kx_f32("x", GB_SHAPE(2, 3, 4), x), kx_f32("g", 1, &c, g),
                                         kx_f32("b", 1, &c, b)};
        kx_check_grad(ctx, m, in, 3, NULL, 3e-3, 17);
        opq_model_free(m);
        opq_ctx_free(ctx);
    }
}

// The decomposed LayerNorm chain exported by older PyTorch: its gradient runs through
// ReduceMean, Sub, Pow, Add, Sqrt, Div, Mul, Add.
static void test_decomposed_ln_grad(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(3, 5));
    gb_input(m, "g", OPQ_DTYPE_FLOAT, GB_SHAPE(5));
    gb_init_f32(m, "two", GB_SCALAR, (const float[]){2.0f});
    gb_init_f32(m, "eps", GB_SCALAR, (const float[]){1e-5f});
    struct opq_node *r1 = gb_node(m, "ReduceMean", "x", "mu");
    gb_attr_ints(m, r1, "axes", 1, (const int64_t[]){-1});
    gb_node(m, "Sub", "x,mu", "d");
    gb_node(m, "Pow", "d,two", "d2");
    struct opq_node *r2 = gb_node(m, "ReduceMean", "d2", "var");
    gb_attr_ints(m, r2, "axes", 1, (const int64_t[]){-1});
    gb_node(m, "Add", "var,eps", "ve");
    gb_node(m, "Sqrt", "ve", "sd");
    gb_node(m, "Div", "d,sd", "xh");
    gb_node(m, "Mul", "xh,g", "y");
    gb_output(m, "y");
    float x[15];
    float g[5];
    kx_fill(x, 15, 31, 2.0f);
    kx_fill(g, 5, 32, 1.0f);
    struct opq_named_tensor in[2] = {kx_f32("x", GB_SHAPE(3, 5), x), kx_f32("g", GB_SHAPE(5), g)};
    kx_check_grad(ctx, m, in, 2, NULL, 3e-3, 19);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_reduce(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, 18);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3, 2));
    gb_init_i64(m, "ax", GB_SHAPE(1), (const int64_t[]){1});
    gb_init_i64(m, "none", GB_SHAPE(0), NULL);
    struct opq_node *a = gb_node(m, "ReduceMean", "x,ax", "mean");
    struct opq_node *b = gb_node(m, "ReduceSum", "x,none", "all");
    struct opq_node *c = gb_node(m, "ReduceMax", "x,ax", "max");
    gb_attr_int(m, a, "keepdims", 0);
    gb_attr_int(m, b, "keepdims", 1);
    gb_attr_int(m, c, "keepdims", 1);
    gb_output(m, "mean");
    gb_output(m, "all");
    gb_output(m, "max");
    float x[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -12};
    struct opq_named_tensor in = kx_f32("x", GB_SHAPE(2, 3, 2), x);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    struct opq_tensor out[3];
    assert_int_equal(opq_exec_run(ex, &in, 1, out, 3), OPQ_OK);
    assert_int_equal(out[0].ndim, 2);
    const float *mean = out[0].data;
    kx_near(mean[0], 3, 1e-6);
    kx_near(mean[1], 4, 1e-6);
    kx_near(mean[3], 2, 1e-6);
    assert_int_equal(out[1].ndim, 3);
    kx_near(((const float *)out[1].data)[0], 54, 1e-5);
    const float *mx = out[2].data;
    kx_near(mx[0], 5, 0);
    kx_near(mx[3], 10, 0);
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_reduce_grad(void **state) {
    (void)state;
    const char *ops[] = {"ReduceMean", "ReduceSum", "ReduceMax"}; // random x: no ties for max
    for (int i = 0; i < 3; i++) {
        for (int keep = 0; keep < 2; keep++) {
            struct opq_ctx *ctx = opq_ctx_new();
            struct opq_model *m = gb_new(ctx);
            gb_set_opset(m, 11);
            gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3, 4));
            struct opq_node *n = gb_node(m, ops[i], "x", "y");
            gb_attr_ints(m, n, "axes", 2, (const int64_t[]){0, 2});
            gb_attr_int(m, n, "keepdims", keep);
            gb_output(m, "y");
            float x[24];
            kx_fill(x, 24, 41, 1.0f);
            struct opq_named_tensor in = kx_f32("x", GB_SHAPE(2, 3, 4), x);
            kx_check_grad(ctx, m, &in, 1, NULL, 2e-3, 43);
            opq_model_free(m);
            opq_ctx_free(ctx);
        }
    }
}

// Trailing axes (the deferred softmax's row max and row sum): the contiguous-run path, also
// with ties for ReduceMax (the first maximum in memory order takes the gradient).
static void test_reduce_grad_trailing(void **state) {
    (void)state;
    const char *ops[] = {"ReduceMean", "ReduceSum", "ReduceMax"};
    const int64_t axes[2][2] = {{2, 0}, {1, 2}};
    for (int i = 0; i < 3; i++) {
        for (int a = 0; a < 2; a++) {
            struct opq_ctx *ctx = opq_ctx_new();
            struct opq_model *m = gb_new(ctx);
            gb_set_opset(m, 11);
            gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3, 4));
            struct opq_node *n = gb_node(m, ops[i], "x", "y");
            gb_attr_ints(m, n, "axes", a + 1, axes[a]);
            gb_attr_int(m, n, "keepdims", 1);
            gb_output(m, "y");
            float x[24];
            kx_fill(x, 24, 47, 1.0f);
            struct opq_named_tensor in = kx_f32("x", GB_SHAPE(2, 3, 4), x);
            kx_check_grad(ctx, m, &in, 1, NULL, 2e-3, 53);
            opq_model_free(m);
            opq_ctx_free(ctx);
        }
    }
    // ties: rows {1, 3, 3, 0} and {2, 2, 2, 2} route dY to the first maximum only
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, 11);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 4));
    struct opq_node *n = gb_node(m, "ReduceMax", "x", "y");
    gb_attr_ints(m, n, "axes", 1, (const int64_t[]){-1});
    gb_output(m, "y");
    float x[8] = {1, 3, 3, 0, 2, 2, 2, 2};
    float dy[2] = {5, 7};
    struct opq_named_tensor in = kx_f32("x", GB_SHAPE(2, 4), x);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    struct opq_named_tensor seed = kx_f32("y", GB_SHAPE(2, 1), dy);
    const char *wrt[1] = {"x"};
    struct opq_tensor g;
    assert_int_equal(opq_exec_backward(ex, 0, m->graph->n_nodes - 1, &in, 1, &seed, 1, wrt, 1, &g),
                     OPQ_OK);
    const float want[8] = {0, 5, 0, 0, 7, 0, 0, 0};
    assert_memory_equal(g.data, want, sizeof(want));
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_softmax_hand),       cmocka_unit_test(test_softmax_grad),
        cmocka_unit_test(test_layernorm_hand),     cmocka_unit_test(test_layernorm_grad),
        cmocka_unit_test(test_decomposed_ln_grad), cmocka_unit_test(test_reduce),
        cmocka_unit_test(test_reduce_grad), cmocka_unit_test(test_reduce_grad_trailing),
    };
    return cmocka_run_group_tests_name("k_norm", tests, NULL, NULL);
}
