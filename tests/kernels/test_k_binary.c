/* test_k_binary.c: Add/Sub/Mul/Div/Pow: hand cases, broadcasting, int64 shape arithmetic and
 * finite-difference VJP checks (including broadcast reductions). */
#include "kx_fd.h"

static void run_binary(const char *op, int na, const int64_t *sa, const float *a, int nb,
                       const int64_t *sb, const float *b, const float *want, size_t n_want) {
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "a", OPQ_DTYPE_FLOAT, na, sa);
    gb_input(m, "b", OPQ_DTYPE_FLOAT, nb, sb);
    gb_node(m, op, "a,b", "y");
    gb_output(m, "y");
    struct opq_named_tensor in[2] = {kx_f32("a", na, sa, (float *)a),
                                     kx_f32("b", nb, sb, (float *)b)};
    float *y = NULL;
    size_t n = kx_run(ctx, m, in, 2, 0, &y);
    assert_int_equal(n, n_want);
    for (size_t i = 0; i < n; i++)
        kx_near(y[i], want[i], 1e-6);
    free(y);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_hand(void **state) {
    (void)state;
    float a[6] = {1, 2, 3, 4, 5, 6};
    float b[3] = {10, 20, 30};
    float s[1] = {2};
    run_binary("Add", GB_SHAPE(2, 3), a, GB_SHAPE(3), b, (const float[]){11, 22, 33, 14, 25, 36},
               6);
    run_binary("Sub", GB_SHAPE(2, 3), a, GB_SCALAR, s, (const float[]){-1, 0, 1, 2, 3, 4}, 6);
    run_binary("Mul", GB_SHAPE(2, 1), (const float[]){2, 3}, GB_SHAPE(1, 3), b,
               (const float[]){20, 40, 60, 30, 60, 90}, 6);
    run_binary("Div", GB_SCALAR, s, GB_SHAPE(2, 3), a,
               (const float[]){2, 1, 2.0f / 3, 0.5f, 0.4f, 2.0f / 6}, 6);
    run_binary("Pow", GB_SHAPE(2, 3), a, GB_SCALAR, s, (const float[]){1, 4, 9, 16, 25, 36}, 6);
}

static void test_int64(void **state) {
    (void)state;
    // shape arithmetic: Div truncates toward zero, Mul wraps like ORT
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_init_i64(m, "a", GB_SHAPE(3), (const int64_t[]){7, -7, 12});
    gb_init_i64(m, "b", GB_SHAPE(1), (const int64_t[]){2});
    gb_node(m, "Div", "a,b", "y");
    gb_output(m, "y");
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, NULL, &ex), OPQ_OK);
    struct opq_tensor out;
    assert_int_equal(opq_exec_run(ex, NULL, 0, &out, 1), OPQ_OK);
    const int64_t *y = out.data;
    assert_int_equal(y[0], 3);
    assert_int_equal(y[1], -3);
    assert_int_equal(y[2], 6);
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_bad_broadcast(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "a", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3));
    gb_input(m, "b", OPQ_DTYPE_FLOAT, GB_SHAPE(2));
    gb_node(m, "Add", "a,b", "y");
    gb_output(m, "y");
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, NULL, &ex), OPQ_ERR_SHAPE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "Add"));
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void grad_case(const char *op, int na, const int64_t *sa, int nb, const int64_t *sb,
                      float off_b) {
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "a", OPQ_DTYPE_FLOAT, na, sa);
    gb_input(m, "b", OPQ_DTYPE_FLOAT, nb, sb);
    gb_node(m, op, "a,b", "y");
    gb_output(m, "y");
    float a[64];
    float b[64];
    kx_fill(a, 64, 1, 1.0f);
    kx_fill(b, 64, 2, 1.0f);
    for (int i = 0; i < 64; i++) {
        b[i] += off_b; // keep Div/Pow away from 0
        if (strcmp(op, "Pow") == 0)
            a[i] = fabsf(a[i]) + 0.5f;
    }
    struct opq_named_tensor in[2] = {kx_f32("a", na, sa, a), kx_f32("b", nb, sb, b)};
    kx_check_grad(ctx, m, in, 2, NULL, 2e-3, 7);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_grad(void **state) {
    (void)state;
    const char *ops[] = {"Add", "Sub", "Mul", "Div", "Pow"};
    for (int i = 0; i < 5; i++) {
        float off = i >= 3 ? 2.0f : 0.0f;
        grad_case(ops[i], GB_SHAPE(2, 3, 4), GB_SHAPE(2, 3, 4), off);
        grad_case(ops[i], GB_SHAPE(2, 3, 4), GB_SHAPE(4), off);    // row broadcast
        grad_case(ops[i], GB_SHAPE(2, 1, 4), GB_SHAPE(3, 1), off); // both broadcast
        grad_case(ops[i], GB_SHAPE(2, 3, 4), GB_SHAPE(2, 3, 1), off); // along the last dim
        grad_case(ops[i], GB_SHAPE(2, 3, 1), GB_SHAPE(2, 3, 4), off);
        grad_case(ops[i], GB_SCALAR, GB_SHAPE(3, 2), off);
    }
}

// Rows longer than the row-sum piece (1024 partials at a time): Sub and Div with the second
// input broadcast along the last dim (the deferred softmax's x - max and y / sum).
static void test_grad_long_rows(void **state) {
    (void)state;
    const char *ops[] = {"Sub", "Div", "Mul"};
    for (int i = 0; i < 3; i++) {
        struct opq_ctx *ctx = opq_ctx_new();
        struct opq_model *m = gb_new(ctx);
        gb_input(m, "a", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 1100));
        gb_input(m, "b", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 1));
        gb_node(m, ops[i], "a,b", "y");
        gb_output(m, "y");
        float *a = malloc(sizeof(float) * 2200);
        float b[2] = {1.5f, -2.25f};
        kx_fill(a, 2200, 3, 1.0f);
        struct opq_named_tensor in[2] = {kx_f32("a", GB_SHAPE(2, 1100), a),
                                         kx_f32("b", GB_SHAPE(2, 1), b)};
        kx_check_grad(ctx, m, in, 2, (const bool[]){false, true}, 2e-3, 11);
        free(a);
        opq_model_free(m);
        opq_ctx_free(ctx);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hand),
        cmocka_unit_test(test_int64),
        cmocka_unit_test(test_bad_broadcast),
        cmocka_unit_test(test_grad),
        cmocka_unit_test(test_grad_long_rows),
    };
    return cmocka_run_group_tests_name("k_binary", tests, NULL, NULL);
}
