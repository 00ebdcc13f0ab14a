/* test_k_logic.c: Equal/Less/Greater (float and int64, broadcasting), Not, And, Where (3-way
 * broadcast) and Where's finite-difference VJP; Cast, Constant, ConstantOfShape and Range. */
#include "kl_harness.h"

#include "../../src/kernels/k_lutil.h"

#define IN(...) ((const struct opq_tensor *const[]){__VA_ARGS__})

static void expect_bool(const struct opq_tensor *x, const uint8_t *want, size_t n) {
    assert_int_equal(x->dtype, OPQ_DTYPE_BOOL);
    assert_int_equal(x->nbytes, n);
    assert_memory_equal(x->data, want, n);
}

static void test_compare(void **state) {
    (void)state;
    struct kt *t = kt_new("Equal", 2, 1);
    struct opq_tensor a = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 2},
                                    (float[]){1, 2, 3, 4});
    struct opq_tensor b = kt_tensor(t, OPQ_DTYPE_FLOAT, 1, (int64_t[]){2}, (float[]){1, 4});
    assert_int_equal(kt_run(t, &opq_kernel_equal, IN(&a, &b)), OPQ_OK);
    expect_bool(&t->out[0], (uint8_t[]){1, 0, 0, 1}, 4);
    assert_int_equal(kt_run(t, &opq_kernel_less, IN(&a, &b)), OPQ_OK);
    expect_bool(&t->out[0], (uint8_t[]){0, 1, 0, 0}, 4);
    assert_int_equal(kt_run(t, &opq_kernel_greater, IN(&a, &b)), OPQ_OK);
    expect_bool(&t->out[0], (uint8_t[]){0, 0, 1, 0}, 4);
    // int64 values that differ beyond double precision still compare exactly.
    struct opq_tensor i1 = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1},
                                     (int64_t[]){(1ll << 60) + 1});
    struct opq_tensor i2 = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1},
                                     (int64_t[]){1ll << 60});
    assert_int_equal(kt_run(t, &opq_kernel_equal, IN(&i1, &i2)), OPQ_OK);
    expect_bool(&t->out[0], (uint8_t[]){0}, 1);
    assert_int_equal(kt_run(t, &opq_kernel_equal, IN(&a, &i2)), OPQ_ERR_SHAPE);
    kt_free(t);

    t = kt_new("And", 2, 1);
    struct opq_tensor p = kt_tensor(t, OPQ_DTYPE_BOOL, 1, (int64_t[]){3}, (uint8_t[]){1, 0, 1});
    struct opq_tensor q = kt_tensor(t, OPQ_DTYPE_BOOL, 0, NULL, (uint8_t[]){1});
    assert_int_equal(kt_run(t, &opq_kernel_and, IN(&p, &q)), OPQ_OK);
    expect_bool(&t->out[0], (uint8_t[]){1, 0, 1}, 3);
    assert_int_equal(kt_run(t, &opq_kernel_not, IN(&p)), OPQ_OK);
    expect_bool(&t->out[0], (uint8_t[]){0, 1, 0}, 3);
    kt_free(t);
}

static void test_where(void **state) {
    (void)state;
    struct kt *t = kt_new("Where", 3, 1);
    struct opq_tensor c = kt_tensor(t, OPQ_DTYPE_BOOL, 2, (int64_t[]){2, 1}, (uint8_t[]){1, 0});
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 1, (int64_t[]){3}, (float[]){1, 2, 3});
    struct opq_tensor y = kt_tensor(t, OPQ_DTYPE_FLOAT, 0, NULL, (float[]){-1});
    assert_int_equal(kt_run(t, &opq_kernel_where, IN(&c, &x, &y)), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){2, 3});
    kt_expect_f32(&t->out[0], (float[]){1, 2, 3, -1, -1, -1}, 6, 0.0f);
    kt_fill(t, &x);
    kt_fill(t, &y);
    kt_grad_check(t, &opq_kernel_where, (struct opq_tensor *[]){&c, &x, &y}, 3,
                  (bool[]){false, true, true});
    kt_free(t);
}

static void test_cast(void **state) {
    (void)state;
    struct kt *t = kt_new("Cast", 1, 1);
    kt_attr_int(t, "to", OPQ_DTYPE_INT32);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 1, (int64_t[]){4},
                                    (float[]){-1.7f, 2.5f, 0.0f, 3.9f});
    assert_int_equal(kt_run(t, &opq_kernel_cast, IN(&x)), OPQ_OK);
    assert_memory_equal(t->out[0].data, ((int32_t[]){-1, 2, 0, 3}), 16);
    t->attrs[0].i = OPQ_DTYPE_BOOL;
    assert_int_equal(kt_run(t, &opq_kernel_cast, IN(&x)), OPQ_OK);
    assert_memory_equal(t->out[0].data, ((uint8_t[]){1, 1, 0, 1}), 4);
    // float16: 1/3 rounds to nearest even; 65520 overflows to inf; 1e-8 -> subnormal/zero.
    t->attrs[0].i = OPQ_DTYPE_FLOAT16;
    struct opq_tensor h = kt_tensor(t, OPQ_DTYPE_FLOAT, 1, (int64_t[]){4},
                                    (float[]){1.0f / 3.0f, 65520.0f, 6e-8f, -2.0f});
    assert_int_equal(kt_run(t, &opq_kernel_cast, IN(&h)), OPQ_OK);
    assert_memory_equal(t->out[0].data, ((uint16_t[]){0x3555, 0x7c00, 0x0001, 0xc000}), 8);
    t->attrs[0].i = OPQ_DTYPE_BFLOAT16;
    assert_int_equal(kt_run(t, &opq_kernel_cast, IN(&h)), OPQ_OK);
    assert_int_equal(((uint16_t *)t->out[0].data)[3], 0xc000);
    assert_true(fabsf(opq_kl_bf16_to_f32(((uint16_t *)t->out[0].data)[0]) - 1.0f / 3.0f) < 2e-3f);
    t->attrs[0].i = OPQ_DTYPE_STRING;
    assert_int_equal(kt_run(t, &opq_kernel_cast, IN(&h)), OPQ_ERR_UNSUPPORTED);
    kt_free(t);
    // Round trip of every float16 bit pattern that is not NaN.
    for (uint32_t b = 0; b < 0x10000; b++) {
        if ((b & 0x7c00) == 0x7c00 && (b & 0x3ff))
            continue;
        assert_int_equal(opq_kl_f32_to_f16(opq_kl_f16_to_f32((uint16_t)b)), b);
    }
}

static void test_constant_range(void **state) {
    (void)state;
    struct kt *t = kt_new("Constant", 0, 1);
    kt_attr_ints(t, "value_ints", (int64_t[]){4, 5}, 2);
    assert_int_equal(kt_run(t, &opq_kernel_constant, NULL), OPQ_OK);
    kt_expect_i64(&t->out[0], (int64_t[]){4, 5}, 2);
    kt_free(t);
    t = kt_new("Constant", 0, 1);
    kt_attr_float(t, "value_float", 2.5f);
    assert_int_equal(kt_run(t, &opq_kernel_constant, NULL), OPQ_OK);
    assert_int_equal(t->out[0].ndim, 0);
    kt_expect_f32(&t->out[0], (float[]){2.5f}, 1, 0.0f);
    kt_free(t);
    t = kt_new("Constant", 0, 1);
    kt_attr_tensor(t, "value", kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){1, 2},
                                         (float[]){7, 8}));
    assert_int_equal(kt_run(t, &opq_kernel_constant, NULL), OPQ_OK);
    kt_expect_shape(&t->out[0], 2, (int64_t[]){1, 2});
    kt_expect_f32(&t->out[0], (float[]){7, 8}, 2, 0.0f);
    kt_free(t);
    t = kt_new("Constant", 0, 1);
    kt_attr_str(t, "value_string", "x");
    assert_int_equal(kt_run(t, &opq_kernel_constant, NULL), OPQ_ERR_UNSUPPORTED);
    kt_free(t);

    t = kt_new("ConstantOfShape", 1, 1);
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){2}, (int64_t[]){2, 3});
    assert_int_equal(kt_run(t, &opq_kernel_constantofshape, IN(&s)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){0, 0, 0, 0, 0, 0}, 6, 0.0f);
    kt_attr_tensor(t, "value", kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){1}, (int64_t[]){-3}));
    assert_int_equal(kt_run(t, &opq_kernel_constantofshape, IN(&s)), OPQ_OK);
    kt_expect_i64(&t->out[0], (int64_t[]){-3, -3, -3, -3, -3, -3}, 6);
    kt_free(t);

    t = kt_new("Range", 3, 1);
    struct opq_tensor a = kt_tensor(t, OPQ_DTYPE_INT64, 0, NULL, (int64_t[]){10});
    struct opq_tensor b = kt_tensor(t, OPQ_DTYPE_INT64, 0, NULL, (int64_t[]){4});
    struct opq_tensor d = kt_tensor(t, OPQ_DTYPE_INT64, 0, NULL, (int64_t[]){-3});
    assert_int_equal(kt_run(t, &opq_kernel_range, IN(&a, &b, &d)), OPQ_OK);
    kt_expect_i64(&t->out[0], (int64_t[]){10, 7}, 2);
    struct opq_tensor fa = kt_tensor(t, OPQ_DTYPE_FLOAT, 0, NULL, (float[]){0});
    struct opq_tensor fb = kt_tensor(t, OPQ_DTYPE_FLOAT, 0, NULL, (float[]){1});
    struct opq_tensor fd = kt_tensor(t, OPQ_DTYPE_FLOAT, 0, NULL, (float[]){0.25f});
    assert_int_equal(kt_run(t, &opq_kernel_range, IN(&fa, &fb, &fd)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){0, 0.25f, 0.5f, 0.75f}, 4, 0.0f);
    kt_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_compare),
        cmocka_unit_test(test_where),
        cmocka_unit_test(test_cast),
        cmocka_unit_test(test_constant_range),
    };
    return cmocka_run_group_tests_name("k_logic", tests, NULL, NULL);
}
