/* test_k_unary.c: elementwise math ops: hand values (Gelu both modes, Sigmoid at large |x|),
 * and finite-difference VJP checks for every op (Relu/Abs kinks skipped by the harness). */
#include "kx_fd.h"

static struct opq_model *one_op(struct opq_ctx *ctx, const char *op, const char *approx,
                                int64_t n) {
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, 20);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(n));
    struct opq_node *nd = gb_node(m, op, "x", "y");
    if (approx)
        gb_attr_string(m, nd, "approximate", approx);
    gb_output(m, "y");
    return m;
}

static void check_values(const char *op, const char *approx, const float *x, const float *want,
                         int n, double tol) {
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = one_op(ctx, op, approx, n);
    struct opq_named_tensor in = kx_f32("x", GB_SHAPE(n), (float *)x);
    float *y = NULL;
    kx_run(ctx, m, &in, 1, 0, &y);
    for (int i = 0; i < n; i++)
        if (fabs((double)y[i] - (double)want[i]) > tol)
            fail_msg("%s(%g) = %.8g, want %.8g", op, (double)x[i], (double)y[i], (double)want[i]);
    free(y);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_values(void **state) {
    (void)state;
    const float x[4] = {-2.0f, -0.5f, 0.0f, 1.5f};
    // reference values from the closed forms, computed in double
    float gelu[4];
    float gelu_t[4];
    for (int i = 0; i < 4; i++) {
        double v = (double)x[i];
        gelu[i] = (float)(0.5 * v * (1.0 + erf(v / sqrt(2.0))));
        gelu_t[i] =
            (float)(0.5 * v *
                    (1.0 + tanh(sqrt(2.0 / 3.14159265358979323846) * (v + 0.044715 * v * v * v))));
    }
    check_values("Gelu", NULL, x, gelu, 4, 1e-6);
    check_values("Gelu", "none", x, gelu, 4, 1e-6);
    check_values("Gelu", "tanh", x, gelu_t, 4, 1e-6);
    check_values("Relu", NULL, x, (const float[]){0, 0, 0, 1.5f}, 4, 0);
    check_values("Abs", NULL, x, (const float[]){2, 0.5f, 0, 1.5f}, 4, 0);
    check_values("Neg", NULL, x, (const float[]){2, 0.5f, 0, -1.5f}, 4, 0);
    check_values("Sigmoid", NULL, (const float[]){-100, 0, 100, 2},
                 (const float[]){0, 0.5f, 1, (float)(1 / (1 + exp(-2.0)))}, 4, 1e-7);
    check_values("Sqrt", NULL, (const float[]){0, 4, 2, 9}, (const float[]){0, 2, sqrtf(2), 3}, 4,
                 1e-7);
    check_values("Reciprocal", NULL, (const float[]){1, 4, -2, 8},
                 (const float[]){1, 0.25f, -0.5f, 0.125f}, 4, 0);
    check_values("Erf", NULL, x, (const float[]){erff(-2), erff(-0.5f), 0, erff(1.5f)}, 4, 2e-7);
}

static void test_bad_approx(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = one_op(ctx, "Gelu", "fast", 4);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, NULL, &ex), OPQ_ERR_UNSUPPORTED);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "approximate"));
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_gelu_needs_opset20(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = one_op(ctx, "Gelu", NULL, 4);
    gb_set_opset(m, 17);
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, NULL, &ex), OPQ_ERR_UNSUPPORTED);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "opset 17"));
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_grad(void **state) {
    (void)state;
    const char *ops[] = {"Sqrt",    "Reciprocal", "Neg", "Exp",  "Erf", "Tanh",
                         "Sigmoid", "Relu",       "Abs", "Gelu", "Gelu"};
    const char *modes[] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "none", "tanh"};
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
        struct opq_ctx *ctx = opq_ctx_new();
        struct opq_model *m = one_op(ctx, ops[i], modes[i], 24);
        float x[24];
        kx_fill(x, 24, 3 + i, 2.0f);
        if (strcmp(ops[i], "Sqrt") == 0 || strcmp(ops[i], "Reciprocal") == 0)
            for (int e = 0; e < 24; e++)
                x[e] = fabsf(x[e]) + 0.5f;
        struct opq_named_tensor in = kx_f32("x", GB_SHAPE(24), x);
        kx_check_grad(ctx, m, &in, 1, NULL, 2e-3, 11);
        opq_model_free(m);
        opq_ctx_free(ctx);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_values),
        cmocka_unit_test(test_bad_approx),
        cmocka_unit_test(test_gelu_needs_opset20),
        cmocka_unit_test(test_grad),
    };
    return cmocka_run_group_tests_name("k_unary", tests, NULL, NULL);
}
