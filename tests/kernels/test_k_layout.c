/* test_k_layout.c: Transpose, Concat, Split, Slice, Gather, GatherElements, Tile, Pad, Trilu:
 * hand cases, edge cases (negative Gather indices, Slice with negative/clamped ends and negative
 * steps, uneven Split) and finite-difference VJP checks. */
#include "kl_harness.h"

#define IN(...) ((const struct opq_tensor *const[]){__VA_ARGS__})

static const float seq24[24] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11,
                                12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23};

static void test_transpose(void **state) {
    (void)state;
    struct kt *t = kt_new("Transpose", 1, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 3}, seq24);
    assert_int_equal(kt_run(t, &opq_kernel_transpose, IN(&x)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){3, 2});
    kt_expect_f32(&t->out[0], (float[]){0, 3, 1, 4, 2, 5}, 6, 0.0f);
    kt_attr_ints(t, "perm", (int64_t[]){1, 2, 0}, 3);
    struct opq_tensor y = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){2, 3, 4}, seq24);
    assert_int_equal(kt_run(t, &opq_kernel_transpose, IN(&y)), OPQ_OK);
    kt_expect_shape(&t->out[0], 3, (int64_t[]){3, 4, 2});
    const float *o = t->out[0].data;
    assert_true(o[1] == 12.0f && o[2] == 1.0f && o[23] == 23.0f);
    kt_free(t);
}

static void test_concat_split(void **state) {
    (void)state;
    struct kt *t = kt_new("Concat", 2, 1);
    kt_attr_int(t, "axis", -1);
    struct opq_tensor a = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 1}, (float[]){1, 2});
    struct opq_tensor b = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 2},
                                    (float[]){3, 4, 5, 6});
    assert_int_equal(kt_run(t, &opq_kernel_concat, IN(&a, &b)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){2, 3});
    kt_expect_f32(&t->out[0], (float[]){1, 3, 4, 2, 5, 6}, 6, 0.0f);
    struct opq_tensor c = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 2}, seq24);
    assert_int_equal(kt_run(t, &opq_kernel_concat, IN(&a, &c)), OPQ_ERR_SHAPE);
    kt_free(t);

    // Split with a split input, then num_outputs with an uneven tail (opset 18).
    t = kt_new("Split", 2, 2);
    kt_attr_int(t, "axis", 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 3}, seq24);
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){1, 2});
    assert_int_equal(kt_run(t, &opq_kernel_split, IN(&x, &s)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){0, 3}, 2, 0.0f);
    kt_expect_f32(&t->out[1], (float[]){1, 2, 4, 5}, 4, 0.0f);
    t->node.n_inputs = 1;
    kt_attr_int(t, "num_outputs", 2);
    assert_int_equal(kt_run(t, &opq_kernel_split, IN(&x)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){0, 1, 3, 4}, 4, 0.0f);
    kt_expect_f32(&t->out[1], (float[]){2, 5}, 2, 0.0f);
    kt_free(t);

    // Attribute form (opset < 13), default axis 0.
    t = kt_new("Split", 1, 2);
    kt_attr_ints(t, "split", (int64_t[]){1, 1}, 2);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 3}, seq24);
    assert_int_equal(kt_run(t, &opq_kernel_split, IN(&x)), OPQ_OK);
    kt_expect_f32(&t->out[1], (float[]){3, 4, 5}, 3, 0.0f);
    kt_free(t);
}

static void test_slice(void **state) {
    (void)state;
    struct kt *t = kt_new("Slice", 5, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 4}, seq24);
    struct opq_tensor st = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){-1, 1});
    struct opq_tensor en = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2},
                                     (int64_t[]){INT64_MIN, 1000});
    struct opq_tensor ax = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){0, -1});
    struct opq_tensor sp = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){-2, 2});
    // rows 2, 0 (step -2 from the last), columns 1, 3.
    assert_int_equal(kt_run(t, &opq_kernel_slice, IN(&x, &st, &en, &ax, &sp)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){2, 2});
    kt_expect_f32(&t->out[0], (float[]){9, 11, 1, 3}, 4, 0.0f);
    // Empty result when start >= end.
    struct opq_tensor st2 = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){3});
    struct opq_tensor en2 = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){1});
    t->node.n_inputs = 3;
    assert_int_equal(kt_run(t, &opq_kernel_slice, IN(&x, &st2, &en2)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){0, 4});
    kt_free(t);

    // Attribute form (opset < 10).
    t = kt_new("Slice", 1, 1);
    kt_attr_ints(t, "starts", (int64_t[]){1}, 1);
    kt_attr_ints(t, "ends", (int64_t[]){-1}, 1);
    kt_attr_ints(t, "axes", (int64_t[]){1}, 1);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 4}, seq24);
    assert_int_equal(kt_run(t, &opq_kernel_slice, IN(&x)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){1, 2, 5, 6, 9, 10}, 6, 0.0f);
    kt_free(t);
}

static void test_gather(void **state) {
    (void)state;
    struct kt *t = kt_new("Gather", 2, 1);
    kt_attr_int(t, "axis", 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 3}, seq24);
    struct opq_tensor i = kt_tensor(t, OPQ_DTYPE_INT64, 2, (int64_t[]){2, 2},
                                    (int64_t[]){-1, 0, 1, 1});
    assert_int_equal(kt_run(t, &opq_kernel_gather, IN(&x, &i)), OPQ_OK);
    kt_expect_shape(&t->out[0], 3, (int64_t[]){2, 2, 2});
    kt_expect_f32(&t->out[0], (float[]){2, 0, 1, 1, 5, 3, 4, 4}, 8, 0.0f);
    // Scalar index removes the axis (the ViT class-token pick).
    struct opq_tensor i0 = kt_tensor(t, OPQ_DTYPE_INT32, 0, NULL, (int32_t[]){0});
    assert_int_equal(kt_run(t, &opq_kernel_gather, IN(&x, &i0)), OPQ_OK);
    kt_expect_shape(&t->out[0], 1, (int64_t[]){2});
    kt_expect_f32(&t->out[0], (float[]){0, 3}, 2, 0.0f);
    struct opq_tensor ib = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){3});
    assert_int_equal(kt_run(t, &opq_kernel_gather, IN(&x, &ib)), OPQ_ERR_SHAPE);
    kt_free(t);

    t = kt_new("GatherElements", 2, 1);
    kt_attr_int(t, "axis", 1);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 2}, (float[]){1, 2, 3, 4});
    i = kt_tensor(t, OPQ_DTYPE_INT64, 2, (int64_t[]){2, 2}, (int64_t[]){0, 0, 1, 0});
    assert_int_equal(kt_run(t, &opq_kernel_gatherelements, IN(&x, &i)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){1, 1, 4, 3}, 4, 0.0f);
    kt_free(t);
}

static void test_tile_trilu(void **state) {
    (void)state;
    struct kt *t = kt_new("Tile", 2, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){1, 2}, (float[]){1, 2});
    struct opq_tensor r = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){2, 2});
    assert_int_equal(kt_run(t, &opq_kernel_tile, IN(&x, &r)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){1, 2, 1, 2, 1, 2, 1, 2}, 8, 0.0f);
    kt_free(t);

    t = kt_new("Trilu", 2, 1);
    kt_attr_int(t, "upper", 0);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 3}, (float[]){1, 2, 3, 4, 5, 6, 7, 8, 9});
    struct opq_tensor kk = kt_tensor(t, OPQ_DTYPE_INT64, 0, NULL, (int64_t[]){-1});
    assert_int_equal(kt_run(t, &opq_kernel_trilu, IN(&x, &kk)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){0, 0, 0, 4, 0, 0, 7, 8, 0}, 9, 0.0f);
    t->attrs[0].i = 1;
    t->node.n_inputs = 1;
    assert_int_equal(kt_run(t, &opq_kernel_trilu, IN(&x)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){1, 2, 3, 0, 5, 6, 0, 0, 9}, 9, 0.0f);
    kt_free(t);
}

static void test_pad(void **state) {
    (void)state;
    struct kt *t = kt_new("Pad", 3, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){1, 3}, (float[]){1, 2, 3});
    struct opq_tensor p = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){4},
                                    (int64_t[]){0, 2, 0, 1});
    struct opq_tensor v = kt_tensor(t, OPQ_DTYPE_FLOAT, 0, NULL, (float[]){9});
    assert_int_equal(kt_run(t, &opq_kernel_pad, IN(&x, &p, &v)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){9, 9, 1, 2, 3, 9}, 6, 0.0f);
    kt_attr_str(t, "mode", "reflect");
    assert_int_equal(kt_run(t, &opq_kernel_pad, IN(&x, &p, &v)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){3, 2, 1, 2, 3, 2}, 6, 0.0f);
    t->attrs[0].s.data = (uint8_t *)"edge";
    t->attrs[0].s.len = 4;
    assert_int_equal(kt_run(t, &opq_kernel_pad, IN(&x, &p, &v)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){1, 1, 1, 2, 3, 3}, 6, 0.0f);
    // Negative pads crop.
    struct opq_tensor pn = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){4},
                                     (int64_t[]){0, -1, 0, 0});
    assert_int_equal(kt_run(t, &opq_kernel_pad, IN(&x, &pn, &v)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){2, 3}, 2, 0.0f);
    kt_free(t);
}

// ---- VJPs ---------------------------------------------------------------------------------------

static void test_vjp_transpose_concat_split(void **state) {
    (void)state;
    struct kt *t = kt_new("Transpose", 1, 1);
    kt_attr_ints(t, "perm", (int64_t[]){2, 0, 1}, 3);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){2, 3, 4}, seq24);
    kt_fill(t, &x);
    kt_grad_check(t, &opq_kernel_transpose, (struct opq_tensor *[]){&x}, 1, (bool[]){true});
    kt_free(t);

    t = kt_new("Concat", 3, 1);
    kt_attr_int(t, "axis", 1);
    struct opq_tensor a = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 1}, seq24);
    struct opq_tensor b = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 3}, seq24);
    struct opq_tensor c = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 2}, seq24);
    kt_fill(t, &a);
    kt_fill(t, &b);
    kt_fill(t, &c);
    kt_grad_check(t, &opq_kernel_concat, (struct opq_tensor *[]){&a, &b, &c}, 3,
                  (bool[]){true, false, true});
    kt_free(t);

    t = kt_new("Split", 2, 3);
    kt_attr_int(t, "axis", 0);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){6, 2}, seq24);
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){3}, (int64_t[]){1, 3, 2});
    kt_fill(t, &x);
    t->outs[1] = NULL; // an unused output: its gradient is zero
    kt_grad_check(t, &opq_kernel_split, (struct opq_tensor *[]){&x, &s}, 2,
                  (bool[]){true, false});
    kt_free(t);
}

static void test_vjp_slice_gather(void **state) {
    (void)state;
    struct kt *t = kt_new("Slice", 5, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){4, 6}, seq24);
    struct opq_tensor st = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){3, 1});
    struct opq_tensor en = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){0, 6});
    struct opq_tensor ax = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){0, 1});
    struct opq_tensor sp = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){-1, 2});
    kt_fill(t, &x);
    kt_grad_check(t, &opq_kernel_slice, (struct opq_tensor *[]){&x, &st, &en, &ax, &sp}, 5,
                  (bool[]){true, false, false, false, false});
    kt_free(t);

    // Repeated indices: the scatter must add.
    t = kt_new("Gather", 2, 1);
    kt_attr_int(t, "axis", 0);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){4, 3}, seq24);
    struct opq_tensor i = kt_tensor(t, OPQ_DTYPE_INT64, 2, (int64_t[]){2, 3},
                                    (int64_t[]){0, -1, 0, 2, 2, 0});
    kt_fill(t, &x);
    kt_grad_check(t, &opq_kernel_gather, (struct opq_tensor *[]){&x, &i}, 2,
                  (bool[]){true, false});
    kt_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_transpose),
        cmocka_unit_test(test_concat_split),
        cmocka_unit_test(test_slice),
        cmocka_unit_test(test_gather),
        cmocka_unit_test(test_tile_trilu),
        cmocka_unit_test(test_pad),
        cmocka_unit_test(test_vjp_transpose_concat_split),
        cmocka_unit_test(test_vjp_slice_gather),
    };
    return cmocka_run_group_tests_name("k_layout", tests, NULL, NULL);
}
