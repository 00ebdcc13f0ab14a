/* test_k_einsum_qdq.c: Einsum (attention patterns on the GEMM path against the general loop,
 * implicit output, ellipsis, trace/diagonal) and QuantizeLinear/DequantizeLinear (per-tensor,
 * per-axis, blocked, int4/uint4 packing, saturation, ties to even, output_dtype). */
#include "kl_harness.h"

#define IN(...) ((const struct opq_tensor *const[]){__VA_ARGS__})

// Reference: Y[b,h,i,j] = sum_d A[b,h,i,d] * B[b,h,j,d].
static void test_einsum_attention(void **state) {
    (void)state;
    struct kt *t = kt_new("Einsum", 2, 1);
    kt_attr_str(t, "equation", "bhid,bhjd->bhij");
    struct opq_tensor a = kt_tensor(t, OPQ_DTYPE_FLOAT, 4, (int64_t[]){2, 3, 4, 5}, NULL);
    struct opq_tensor b = kt_tensor(t, OPQ_DTYPE_FLOAT, 4, (int64_t[]){2, 3, 6, 5}, NULL);
    a.data = opq_arena_alloc(t->arena, a.nbytes);
    b.data = opq_arena_alloc(t->arena, b.nbytes);
    kt_fill(t, &a);
    kt_fill(t, &b);
    assert_int_equal(kt_run(t, &opq_kernel_einsum, IN(&a, &b)), OPQ_OK);
    kt_expect_shape(&t->out[0], 4, (int64_t[]){2, 3, 4, 6});
    const float *A = a.data;
    const float *B = b.data;
    float want[2 * 3 * 4 * 6];
    for (int bh = 0; bh < 6; bh++)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 6; j++) {
                double s = 0;
                for (int d = 0; d < 5; d++)
                    s += (double)A[(bh * 4 + i) * 5 + d] * (double)B[(bh * 6 + j) * 5 + d];
                want[(bh * 4 + i) * 6 + j] = (float)s;
            }
    kt_expect_f32(&t->out[0], want, 144, 1e-5f);

    // Same through the general loop: a size-1 broadcast dim forces it.
    struct opq_tensor b1 = b;
    b1.shape[0] = 1;
    b1.nbytes /= 2;
    t->attrs[0].s.data = (uint8_t *)"bhid,bhjd->bhij";
    assert_int_equal(kt_run(t, &opq_kernel_einsum, IN(&a, &b1)), OPQ_OK);
    const float *y = t->out[0].data;
    for (int i = 0; i < 72; i++) // batch 0 matches
        assert_true(fabsf(y[i] - want[i]) < 1e-5f);
    kt_free(t);
}

static void test_einsum_misc(void **state) {
    (void)state;
    struct kt *t = kt_new("Einsum", 2, 1);
    kt_attr_str(t, "equation", "...ij,...jk");
    struct opq_tensor a = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){1, 2, 2},
                                    (float[]){1, 2, 3, 4});
    struct opq_tensor b = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 1}, (float[]){1, 1});
    assert_int_equal(kt_run(t, &opq_kernel_einsum, IN(&a, &b)), OPQ_OK);
    kt_expect_shape(&t->out[0], 3, (int64_t[]){1, 2, 1});
    kt_expect_f32(&t->out[0], (float[]){3, 7}, 2, 0.0f);
    kt_free(t);

    t = kt_new("Einsum", 1, 1);
    kt_attr_str(t, "equation", "ii->");
    struct opq_tensor m = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 2},
                                    (float[]){1, 2, 3, 4});
    assert_int_equal(kt_run(t, &opq_kernel_einsum, IN(&m)), OPQ_OK);
    assert_int_equal(t->out[0].ndim, 0);
    kt_expect_f32(&t->out[0], (float[]){5}, 1, 0.0f);
    t->attrs[0].s.data = (uint8_t *)"ij";
    t->attrs[0].s.len = 2; // implicit transpose? no: "ij" keeps order i, j
    assert_int_equal(kt_run(t, &opq_kernel_einsum, IN(&m)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){1, 2, 3, 4}, 4, 0.0f);
    t->attrs[0].s.data = (uint8_t *)"ji";
    assert_int_equal(kt_run(t, &opq_kernel_einsum, IN(&m)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){1, 3, 2, 4}, 4, 0.0f); // implicit output is "ij"
    t->attrs[0].s.data = (uint8_t *)"i?";
    assert_int_equal(kt_run(t, &opq_kernel_einsum, IN(&m)), OPQ_ERR_SHAPE);
    kt_free(t);
}

static void test_quantize(void **state) {
    (void)state;
    struct kt *t = kt_new("QuantizeLinear", 3, 1);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 1, (int64_t[]){6},
                                    (float[]){0.5f, 1.5f, 2.5f, -2.5f, 1000.0f, -1000.0f});
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_FLOAT, 0, NULL, (float[]){1.0f});
    struct opq_tensor z = kt_tensor(t, OPQ_DTYPE_INT8, 0, NULL, (int8_t[]){1});
    assert_int_equal(kt_run(t, &opq_kernel_quantizelinear, IN(&x, &s, &z)), OPQ_OK);
    assert_int_equal(t->out[0].dtype, OPQ_DTYPE_INT8);
    assert_memory_equal(t->out[0].data, ((int8_t[]){1, 3, 3, -1, 127, -128}), 6);
    // No zero point: uint8; with output_dtype: that type.
    t->node.n_inputs = 2;
    assert_int_equal(kt_run(t, &opq_kernel_quantizelinear, IN(&x, &s)), OPQ_OK);
    assert_int_equal(t->out[0].dtype, OPQ_DTYPE_UINT8);
    assert_memory_equal(t->out[0].data, ((uint8_t[]){0, 2, 2, 0, 255, 0}), 6);
    kt_attr_int(t, "output_dtype", OPQ_DTYPE_INT4);
    assert_int_equal(kt_run(t, &opq_kernel_quantizelinear, IN(&x, &s)), OPQ_OK);
    assert_int_equal(t->out[0].dtype, OPQ_DTYPE_INT4);
    assert_int_equal(t->out[0].nbytes, 3);
    // int4 values 0, 2, 2, -2, 7, -8 packed low nibble first.
    assert_memory_equal(t->out[0].data, ((uint8_t[]){0x20, 0xe2, 0x87}), 3);
    kt_free(t);

    // Per-axis (axis 1) uint8 with per-channel zero points.
    t = kt_new("QuantizeLinear", 3, 1);
    x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 2}, (float[]){1, 1, -1, 4});
    s = kt_tensor(t, OPQ_DTYPE_FLOAT, 1, (int64_t[]){2}, (float[]){0.5f, 2.0f});
    z = kt_tensor(t, OPQ_DTYPE_UINT8, 1, (int64_t[]){2}, (uint8_t[]){10, 0});
    assert_int_equal(kt_run(t, &opq_kernel_quantizelinear, IN(&x, &s, &z)), OPQ_OK);
    assert_memory_equal(t->out[0].data, ((uint8_t[]){12, 0, 8, 2}), 4);
    struct opq_tensor sbad = kt_tensor(t, OPQ_DTYPE_FLOAT, 1, (int64_t[]){3}, (float[]){1, 1, 1});
    t->node.n_inputs = 2;
    assert_int_equal(kt_run(t, &opq_kernel_quantizelinear, IN(&x, &sbad)), OPQ_ERR_SHAPE);
    kt_free(t);
}

static void test_dequantize(void **state) {
    (void)state;
    // Blocked (block_size 2 along axis 1) uint4 with zero points.
    struct kt *t = kt_new("DequantizeLinear", 3, 1);
    kt_attr_int(t, "axis", 1);
    kt_attr_int(t, "block_size", 2);
    // x = [[1, 2, 3], [15, 0, 4]] uint4 packed: elements 1,2,3,15,0,4.
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_UINT4, 2, (int64_t[]){2, 3},
                                    (uint8_t[]){0x21, 0xf3, 0x40});
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){2, 2},
                                    (float[]){1, 10, 0.5f, 2});
    struct opq_tensor z = kt_tensor(t, OPQ_DTYPE_UINT4, 2, (int64_t[]){2, 2},
                                    (uint8_t[]){0x01, 0x08});
    assert_int_equal(kt_run(t, &opq_kernel_dequantizelinear, IN(&x, &s, &z)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){0, 1, 30, 3.5f, -4, 8}, 6, 0.0f);
    kt_free(t);

    // int4 sign extension, per-tensor; int32 without zero point.
    t = kt_new("DequantizeLinear", 2, 1);
    x = kt_tensor(t, OPQ_DTYPE_INT4, 1, (int64_t[]){3}, (uint8_t[]){0x8f, 0x07});
    s = kt_tensor(t, OPQ_DTYPE_FLOAT, 0, NULL, (float[]){0.5f});
    assert_int_equal(kt_run(t, &opq_kernel_dequantizelinear, IN(&x, &s)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){-0.5f, -4.0f, 3.5f}, 3, 0.0f);
    struct opq_tensor xi = kt_tensor(t, OPQ_DTYPE_INT32, 1, (int64_t[]){2},
                                     (int32_t[]){-100000, 3});
    assert_int_equal(kt_run(t, &opq_kernel_dequantizelinear, IN(&xi, &s)), OPQ_OK);
    kt_expect_f32(&t->out[0], (float[]){-50000.0f, 1.5f}, 2, 0.0f);
    kt_free(t);
}

// Q then DQ reproduces x to within half a step inside the range (per-axis int8, axis 0).
static void test_qdq_roundtrip(void **state) {
    (void)state;
    struct kt *t = kt_new("QuantizeLinear", 3, 1);
    kt_attr_int(t, "axis", 0);
    struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 2, (int64_t[]){3, 16}, NULL);
    x.data = opq_arena_alloc(t->arena, x.nbytes);
    kt_fill(t, &x);
    struct opq_tensor s = kt_tensor(t, OPQ_DTYPE_FLOAT, 1, (int64_t[]){3},
                                    (float[]){0.01f, 0.02f, 0.05f});
    struct opq_tensor z = kt_tensor(t, OPQ_DTYPE_INT8, 1, (int64_t[]){3}, (int8_t[]){0, -3, 5});
    assert_int_equal(kt_run(t, &opq_kernel_quantizelinear, IN(&x, &s, &z)), OPQ_OK);
    struct opq_tensor q = t->out[0];
    t->node.op_type = "DequantizeLinear";
    assert_int_equal(kt_run(t, &opq_kernel_dequantizelinear, IN(&q, &s, &z)), OPQ_OK);
    const float *xv = x.data;
    const float *y = t->out[0].data;
    const float sc[3] = {0.01f, 0.02f, 0.05f};
    for (int i = 0; i < 48; i++) {
        float step = sc[i / 16];
        if (fabsf(xv[i]) < 1.2f && i >= 16) // rows 1, 2 cover [-1, 1]; row 0 clips at 1.27
            assert_true(fabsf(y[i] - xv[i]) <= 0.5f * step + 1e-6f);
    }
    kt_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_einsum_attention),
        cmocka_unit_test(test_einsum_misc),
        cmocka_unit_test(test_quantize),
        cmocka_unit_test(test_dequantize),
        cmocka_unit_test(test_qdq_roundtrip),
    };
    return cmocka_run_group_tests_name("k_einsum_qdq", tests, NULL, NULL);
}
