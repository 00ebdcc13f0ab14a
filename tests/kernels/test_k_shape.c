/* test_k_shape.c: Reshape, Flatten, Squeeze, Unsqueeze, Shape, Size, Expand, Identity, Dropout:
 * hand cases, edge cases (0 / -1 in Reshape, negative axes, Shape start/end clamping, a shape
 * input only known at run time) and finite-difference VJP checks. */
#include "kl_harness.h"

#define IN(...) ((const struct opq_tensor *const[]){__VA_ARGS__})

static const float seq12[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};

static void test_reshape(void **state) {
    (void)state;
    struct kt *t = kt_new("Reshape", 2, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){2, 3, 2}, seq12);
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){3},
                                    (int64_t[]){0, -1, 3});
    assert_int_equal(kt_run(t, &opq_kernel_reshape, IN(&x, &s)), OPQ_OK);
    kt_expect_shape(&t->out[0], 3, (int64_t[]){2, 2, 3});
    kt_expect_f32(&t->out[0], seq12, 12, 0.0f);
    // Wrong element count.
    struct opq_tensor bad = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){5, 2});
    assert_int_equal(kt_run(t, &opq_kernel_reshape, IN(&x, &bad)), OPQ_ERR_SHAPE);
    kt_free(t);
}

static void test_reshape_allowzero_and_runtime_shape(void **state) {
    (void)state;
    struct kt *t = kt_new("Reshape", 2, 1);
    kt_attr_int(t, "allowzero", 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){0, 3}, NULL);
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){3, 0});
    x.data = (void *)seq12;
    assert_int_equal(kt_run(t, &opq_kernel_reshape, IN(&x, &s)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){3, 0});
    // A shape input without data (computed at run time) is refused, naming the node.
    struct opq_tensor dyn = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, NULL);
    assert_int_equal(kt_run(t, &opq_kernel_reshape, IN(&x, &dyn)), OPQ_ERR_UNSUPPORTED);
    assert_non_null(strstr(opq_ctx_errmsg(t->ctx), "n0"));
    assert_non_null(strstr(opq_ctx_errmsg(t->ctx), "run time"));
    kt_free(t);
}

static void test_flatten(void **state) {
    (void)state;
    struct kt *t = kt_new("Flatten", 1, 1);
    kt_attr_int(t, "axis", -1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){2, 3, 2}, seq12);
    assert_int_equal(kt_run(t, &opq_kernel_flatten, IN(&x)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){6, 2});
    t->attrs[0].i = 0;
    assert_int_equal(kt_run(t, &opq_kernel_flatten, IN(&x)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){1, 12});
    t->attrs[0].i = 3;
    assert_int_equal(kt_run(t, &opq_kernel_flatten, IN(&x)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){12, 1});
    t->attrs[0].i = 4;
    assert_int_equal(kt_run(t, &opq_kernel_flatten, IN(&x)), OPQ_ERR_SHAPE);
    kt_free(t);
}

static void test_squeeze_unsqueeze(void **state) {
    (void)state;
    struct kt *t = kt_new("Squeeze", 2, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 4, (int64_t[]){1, 3, 1, 4}, seq12);
    struct opq_tensor ax = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){-2});
    assert_int_equal(kt_run(t, &opq_kernel_squeeze, IN(&x, &ax)), OPQ_OK);
    kt_expect_shape(&t->out[0], 3, (int64_t[]){1, 3, 4});
    t->node.n_inputs = 1; // no axes: every 1
    assert_int_equal(kt_run(t, &opq_kernel_squeeze, IN(&x)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){3, 4});
    struct opq_tensor ax1 = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){1});
    t->node.n_inputs = 2;
    assert_int_equal(kt_run(t, &opq_kernel_squeeze, IN(&x, &ax1)), OPQ_ERR_SHAPE);
    kt_free(t);

    t = kt_new("Unsqueeze", 2, 1);
    struct opq_tensor y = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 4}, seq12);
    struct opq_tensor ua = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){-1, 0});
    assert_int_equal(kt_run(t, &opq_kernel_unsqueeze, IN(&y, &ua)), OPQ_OK);
    kt_expect_shape(&t->out[0], 4, (int64_t[]){1, 3, 4, 1});
    kt_expect_f32(&t->out[0], seq12, 12, 0.0f);
    kt_free(t);

    // Attribute form (opset < 13).
    t = kt_new("Unsqueeze", 1, 1);
    kt_attr_ints(t, "axes", (int64_t[]){1}, 1);
    y = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 4}, seq12);
    assert_int_equal(kt_run(t, &opq_kernel_unsqueeze, IN(&y)), OPQ_OK);
    kt_expect_shape(&t->out[0], 3, (int64_t[]){3, 1, 4});
    kt_free(t);
}

static void test_shape_size(void **state) {
    (void)state;
    struct kt *t = kt_new("Shape", 1, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){2, 3, 4}, NULL);
    assert_int_equal(kt_run(t, &opq_kernel_shape, IN(&x)), OPQ_OK);
    kt_expect_i64(&t->out[0], (int64_t[]){2, 3, 4}, 3);
    kt_attr_int(t, "start", -2);
    kt_attr_int(t, "end", 100);
    assert_int_equal(kt_run(t, &opq_kernel_shape, IN(&x)), OPQ_OK);
    kt_expect_i64(&t->out[0], (int64_t[]){3, 4}, 2);
    t->attrs[0].i = 2;
    t->attrs[1].i = 1; // end before start: empty
    assert_int_equal(kt_run(t, &opq_kernel_shape, IN(&x)), OPQ_OK);
    kt_expect_shape(&t->out[0], 1, (int64_t[]){0});
    kt_free(t);

    t = kt_new("Size", 1, 1);
    assert_int_equal(kt_run(t, &opq_kernel_size, IN(&x)), OPQ_OK);
    assert_int_equal(t->out[0].ndim, 0);
    kt_expect_i64(&t->out[0], (int64_t[]){24}, 1);
    kt_free(t);
}

static void test_expand(void **state) {
    (void)state;
    struct kt *t = kt_new("Expand", 2, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 1},
                                    (float[]){1, 2, 3});
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){3}, (int64_t[]){2, 1, 2});
    assert_int_equal(kt_run(t, &opq_kernel_expand, IN(&x, &s)), OPQ_OK);
    kt_expect_shape(&t->out[0], 3, (int64_t[]){2, 3, 2});
    kt_expect_f32(&t->out[0], (float[]){1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3}, 12, 0.0f);
    // Shape smaller than the input: the input's dims win (bidirectional broadcast).
    struct opq_tensor s1 = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){1});
    assert_int_equal(kt_run(t, &opq_kernel_expand, IN(&x, &s1)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){3, 1});
    struct opq_tensor s2 = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){2, 2});
    assert_int_equal(kt_run(t, &opq_kernel_expand, IN(&x, &s2)), OPQ_ERR_SHAPE);
    kt_free(t);
}

static void test_dropout_identity(void **state) {
    (void)state;
    struct kt *t = kt_new("Dropout", 3, 2);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 4}, seq12);
    struct opq_tensor r = kt_tensor(t, OPQ_DTYPE_FLOAT, 0, NULL, (float[]){0.3f});
    struct opq_tensor tm = kt_tensor(t, OPQ_DTYPE_BOOL, 0, NULL, (uint8_t[]){0});
    assert_int_equal(kt_run(t, &opq_kernel_dropout, IN(&x, &r, &tm)), OPQ_OK);
    kt_expect_f32(&t->out[0], seq12, 12, 0.0f);
    assert_int_equal(t->out[1].dtype, OPQ_DTYPE_BOOL);
    for (int i = 0; i < 12; i++)
        assert_int_equal(((uint8_t *)t->out[1].data)[i], 1);
    ((uint8_t *)tm.data)[0] = 1; // training mode with ratio > 0 is refused
    assert_int_equal(kt_run(t, &opq_kernel_dropout, IN(&x, &r, &tm)), OPQ_ERR_UNSUPPORTED);
    kt_free(t);

    t = kt_new("Identity", 1, 1);
    struct opq_tensor xi = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){7, -7});
    assert_int_equal(kt_run(t, &opq_kernel_identity, IN(&xi)), OPQ_OK);
    kt_expect_i64(&t->out[0], (int64_t[]){7, -7}, 2);
    kt_free(t);
}

// ---- VJPs ---------------------------------------------------------------------------------------

static void grad_case(const char *op, const struct opq_kernel *kern, struct opq_tensor *x,
                      struct opq_tensor *second, struct kt *t) {
    (void)op;
    struct opq_tensor *in[2] = {x, second};
    bool diff[2] = {true, false};
    kt_fill(t, x);
    kt_grad_check(t, kern, in, second ? 2 : 1, diff);
}

static void test_vjp_views(void **state) {
    (void)state;
    struct kt *t = kt_new("Reshape", 2, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){2, 3, 2}, seq12);
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){-1, 4});
    grad_case("Reshape", &opq_kernel_reshape, &x, &s, t);
    kt_free(t);

    t = kt_new("Flatten", 1, 1);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){2, 3, 2}, seq12);
    grad_case("Flatten", &opq_kernel_flatten, &x, NULL, t);
    kt_free(t);

    t = kt_new("Squeeze", 2, 1);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){2, 1, 6}, seq12);
    s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){1});
    grad_case("Squeeze", &opq_kernel_squeeze, &x, &s, t);
    kt_free(t);

    t = kt_new("Unsqueeze", 2, 1);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 6}, seq12);
    s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){0});
    grad_case("Unsqueeze", &opq_kernel_unsqueeze, &x, &s, t);
    kt_free(t);

    t = kt_new("Identity", 1, 1);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 6}, seq12);
    grad_case("Identity", &opq_kernel_identity, &x, NULL, t);
    kt_free(t);

    t = kt_new("Dropout", 1, 2);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 6}, seq12);
    grad_case("Dropout", &opq_kernel_dropout, &x, NULL, t);
    kt_free(t);
}

static void test_vjp_expand(void **state) {
    (void)state;
    struct kt *t = kt_new("Expand", 2, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){3, 1, 2}, seq12);
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){4},
                                    (int64_t[]){2, 3, 4, 1});
    grad_case("Expand", &opq_kernel_expand, &x, &s, t);
    kt_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reshape),
        cmocka_unit_test(test_reshape_allowzero_and_runtime_shape),
        cmocka_unit_test(test_flatten),
        cmocka_unit_test(test_squeeze_unsqueeze),
        cmocka_unit_test(test_shape_size),
        cmocka_unit_test(test_expand),
        cmocka_unit_test(test_dropout_identity),
        cmocka_unit_test(test_vjp_views),
        cmocka_unit_test(test_vjp_expand),
    };
    return cmocka_run_group_tests_name("k_shape", tests, NULL, NULL);
}
