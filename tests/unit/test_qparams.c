/* test_qparams.c: quantization grids, qparams from ranges, rounding, the histogram observer and
 * the calibrators, per-channel weight ranges. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <cmocka.h>

#include "opq.h"
#include "quant/qparams.h"
#include "rng.h"
#include "threadpool.h"

static void test_grid(void **state) {
    (void)state;
    int32_t lo, hi;
    opq_qgrid(8, true, false, &lo, &hi);
    assert_int_equal(lo, -128);
    assert_int_equal(hi, 127);
    opq_qgrid(8, true, true, &lo, &hi);
    assert_int_equal(lo, -127);
    opq_qgrid(4, false, false, &lo, &hi);
    assert_int_equal(lo, 0);
    assert_int_equal(hi, 15);
    opq_qgrid(3, true, false, &lo, &hi);
    assert_int_equal(lo, -4);
    assert_int_equal(hi, 3);
}

static void test_from_range(void **state) {
    (void)state;
    struct opq_qparams p;
    assert_true(opq_qparams_from_range(-1.0f, 1.27f, -128, 127, true, &p));
    assert_float_equal(p.scale, 0.01f, 1e-7f);
    assert_int_equal(p.zero_point, 0);
    assert_true(opq_qparams_from_range(0.5f, 2.55f, 0, 255, false, &p)); // widened to include 0
    assert_float_equal(p.scale, 0.01f, 1e-7f);
    assert_int_equal(p.zero_point, 0);
    assert_true(opq_qparams_from_range(-1.0f, 1.0f, 0, 255, false, &p));
    assert_int_equal(p.zero_point, 128); // 127.5 rounds half to even
    assert_true(opq_qparams_from_range(0.0f, 0.0f, -128, 127, false, &p));
    assert_true(p.scale > 0.0f);
    assert_false(opq_qparams_from_range(NAN, 1.0f, -128, 127, false, &p));
    // symmetric on an unsigned grid centres on the middle code
    assert_true(opq_qparams_from_range(-1.0f, 1.0f, 0, 255, true, &p));
    assert_int_equal(p.zero_point, 128);
}

static void test_round_half_even(void **state) {
    (void)state;
    struct opq_qparams p = {.scale = 1.0f, .zero_point = 0, .qmin = -8, .qmax = 7};
    assert_int_equal(opq_quantize1(2.5f, &p), 2);
    assert_int_equal(opq_quantize1(3.5f, &p), 4);
    assert_int_equal(opq_quantize1(-2.5f, &p), -2);
    assert_int_equal(opq_quantize1(100.0f, &p), 7);
    assert_int_equal(opq_quantize1(-100.0f, &p), -8);
    assert_float_equal(opq_fq(0.5f, &p), 0.0f, 0.0f);
    assert_float_equal(opq_fq(1.5f, &p), 2.0f, 0.0f);
}

// Histograms must not depend on how samples are split into batches or in which order they come.
static void test_observer_exact_merge(void **state) {
    (void)state;
    struct opq_rng r;
    opq_rng_seed(&r, 1, 1);
    float small[1000], big[1000];
    for (int i = 0; i < 1000; i++) {
        small[i] = opq_rng_normal(&r);
        big[i]   = 60.0f * opq_rng_normal(&r);
    }
    struct opq_observer *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b)), *c = malloc(sizeof(*c));
    opq_observer_init(a);
    opq_observer_add(a, small, 1000);
    opq_observer_add(a, big, 1000);
    opq_observer_init(b);
    opq_observer_add(b, big, 1000);
    opq_observer_add(b, small, 1000);
    opq_observer_init(c);
    opq_observer_add(c, small, 1000); // merged from two halves
    struct opq_observer *d = malloc(sizeof(*d));
    opq_observer_init(d);
    opq_observer_add(d, big, 1000);
    opq_observer_merge(c, d);
    assert_true(a->range == b->range && a->range == c->range);
    assert_int_equal(a->count, 2000);
    for (int i = 0; i < OPQ_OBS_BINS; i++) {
        assert_true(a->hist[i] == b->hist[i]);
        assert_true(a->hist[i] == c->hist[i]);
    }
    assert_true(a->min == b->min && a->max == c->max);
    free(a);
    free(b);
    free(c);
    free(d);
}

// Calls on a pool (several parts per call, one pass while the range holds, two when it grows)
// give the histogram of one serial observer fed the same samples in the same calls.
static void test_observer_pool_same_as_serial(void **state) {
    (void)state;
    enum { N = 100000 };
    float *x = malloc(sizeof(float) * 3 * N);
    assert_non_null(x);
    struct opq_rng r;
    opq_rng_seed(&r, 7, 1);
    for (int i = 0; i < 3 * N; i++)
        x[i] = (i < N ? 1.0f : i < 2 * N ? 0.5f : 40.0f) * opq_rng_normal(&r);
    x[N + 17] = NAN; // a non-finite sample inside the range-holding call
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_threadpool *pool = opq_threadpool_new(ctx, 2);
    assert_non_null(pool);
    struct opq_observer *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b));
    opq_observer_init(a);
    opq_observer_init(b);
    for (int c = 0; c < 3; c++) {
        opq_observer_add_mt(a, x + (size_t)c * N, N, pool);
        opq_observer_add(b, x + (size_t)c * N, N);
    }
    assert_true(a->range == b->range);
    assert_true(a->count == b->count && a->count == 3 * N - 1);
    assert_true(a->n_nonfinite == 1 && b->n_nonfinite == 1);
    assert_true(a->min == b->min && a->max == b->max);
    for (int i = 0; i < OPQ_OBS_BINS; i++)
        assert_true(a->hist[i] == b->hist[i]);
    free(a);
    free(b);
    free(x);
    opq_threadpool_free(pool);
    opq_ctx_free(ctx);
}

static void test_observer_zeros_and_nonfinite(void **state) {
    (void)state;
    struct opq_observer *o = malloc(sizeof(*o));
    opq_observer_init(o);
    float z[4] = {0, 0, NAN, INFINITY};
    opq_observer_add(o, z, 4);
    assert_int_equal(o->count, 2);
    assert_int_equal(o->n_nonfinite, 2);
    float v[2] = {3.0f, -0.25f};
    opq_observer_add(o, v, 2);
    assert_true(o->range >= 3.0);
    assert_true(o->hist[OPQ_OBS_BINS / 2] >= 2.0); // the zeros stayed at zero
    struct opq_calib_opts c = {.method = OPQ_CALIB_MINMAX, .qmin = 0, .qmax = 255};
    float lo, hi;
    struct opq_qparams p;
    assert_int_equal(opq_observer_range(o, &c, &lo, &hi, &p), OPQ_OK);
    assert_float_equal(lo, -0.25f, 0.0f);
    assert_float_equal(hi, 3.0f, 0.0f);
    struct opq_observer *e = malloc(sizeof(*e));
    opq_observer_init(e);
    assert_int_equal(opq_observer_range(e, &c, &lo, &hi, &p), OPQ_ERR_NUMERIC);
    free(o);
    free(e);
}

// Empirical MSE of fake-quantizing xs with p.
static double emp_mse(const float *xs, int n, const struct opq_qparams *p) {
    double e = 0.0;
    for (int i = 0; i < n; i++) {
        double d = (double)xs[i] - (double)opq_fq(xs[i], p);
        e += d * d;
    }
    return e / n;
}

static void test_calibrators(void **state) {
    (void)state;
    enum { N = 20000 };
    float *xs = malloc(N * sizeof(float));
    struct opq_rng r;
    opq_rng_seed(&r, 7, 3);
    for (int i = 0; i < N; i++)
        xs[i] = opq_rng_normal(&r);
    xs[0] = 40.0f; // a few outliers, as in post-LayerNorm ViT activations
    xs[1] = -35.0f;
    struct opq_observer *o = malloc(sizeof(*o));
    opq_observer_init(o);
    for (int i = 0; i < N; i += 1000)
        opq_observer_add(o, xs + i, 1000);
    struct opq_calib_opts c = {.qmin = -8, .qmax = 7, .symmetric = false, .percentile = 99.9};
    float lo, hi;
    struct opq_qparams pmm, pp, pmse, pkl;
    c.method = OPQ_CALIB_MINMAX;
    assert_int_equal(opq_observer_range(o, &c, &lo, &hi, &pmm), OPQ_OK);
    assert_float_equal(hi, 40.0f, 0.0f);
    c.method = OPQ_CALIB_PERCENTILE;
    assert_int_equal(opq_observer_range(o, &c, &lo, &hi, &pp), OPQ_OK);
    assert_true(hi > 2.5f && hi < 4.5f); // N(0,1) 99.95% point is ~3.3
    assert_true(lo < -2.5f && lo > -4.5f);
    c.method = OPQ_CALIB_MSE;
    assert_int_equal(opq_observer_range(o, &c, &lo, &hi, &pmse), OPQ_OK);
    assert_true(hi < 10.0f);
    c.method = OPQ_CALIB_ENTROPY;
    assert_int_equal(opq_observer_range(o, &c, &lo, &hi, &pkl), OPQ_OK);
    assert_true(hi < 40.0f);
    double e_mm = emp_mse(xs, N, &pmm), e_mse = emp_mse(xs, N, &pmse);
    double e_p = emp_mse(xs, N, &pp), e_kl = emp_mse(xs, N, &pkl);
    assert_true(e_mse < e_mm * 0.2); // 4 bits: clipping the outliers wins by far
    assert_true(e_mse <= e_p * 1.05);
    assert_true(e_kl < e_mm);
    free(xs);
    free(o);
}

static void test_weight_per_channel(void **state) {
    (void)state;
    enum { K = 64, N = 8 };
    float w[K * N];
    struct opq_rng r;
    opq_rng_seed(&r, 11, 0);
    for (int i = 0; i < K * N; i++)
        w[i] = opq_rng_normal(&r) * (float)(1 + i % N); // column c has scale c+1
    struct opq_qparams mm[N], mse[N];
    assert_int_equal(opq_weight_qparams(w, K * N, N, 1, -7, 7, true, OPQ_WCALIB_MINMAX, mm), OPQ_OK);
    for (int c = 0; c < N; c++) {
        float amax = 0.0f;
        for (int k = 0; k < K; k++)
            amax = fmaxf(amax, fabsf(w[k * N + c]));
        assert_float_equal(mm[c].scale, amax / 7.0f, 1e-6f);
        assert_int_equal(mm[c].zero_point, 0);
    }
    assert_int_equal(opq_weight_qparams(w, K * N, N, 1, -7, 7, true, OPQ_WCALIB_MSE, mse), OPQ_OK);
    for (int c = 0; c < N; c++) {
        double e1 = 0, e2 = 0;
        for (int k = 0; k < K; k++) {
            float x = w[k * N + c];
            e1 += ((double)x - (double)opq_fq(x, &mm[c])) * ((double)x - (double)opq_fq(x, &mm[c]));
            e2 += ((double)x - (double)opq_fq(x, &mse[c])) * ((double)x - (double)opq_fq(x, &mse[c]));
        }
        assert_true(e2 <= e1);
        assert_true(mse[c].scale <= mm[c].scale);
    }
    // Conv-style layout: [M=2][inner=3]
    float cw[6] = {1, -2, 0.5f, 4, 0, -1};
    struct opq_qparams cp[2];
    assert_int_equal(opq_weight_qparams(cw, 6, 2, 3, -127, 127, true, OPQ_WCALIB_MINMAX, cp), OPQ_OK);
    assert_float_equal(cp[0].scale, 2.0f / 127.0f, 1e-7f);
    assert_float_equal(cp[1].scale, 4.0f / 127.0f, 1e-7f);
    cw[4] = NAN;
    assert_int_equal(opq_weight_qparams(cw, 6, 2, 3, -127, 127, true, OPQ_WCALIB_MINMAX, cp),
                     OPQ_ERR_NUMERIC);
    assert_int_equal(opq_weight_qparams(cw, 6, 4, 3, -127, 127, true, OPQ_WCALIB_MINMAX, cp),
                     OPQ_ERR_SHAPE);
}

static void test_calibrator_names(void **state) {
    (void)state;
    assert_int_equal(opq_calibrator_from_name("mse"), OPQ_CALIB_MSE);
    assert_int_equal(opq_calibrator_from_name("entropy"), OPQ_CALIB_ENTROPY);
    assert_int_equal(opq_calibrator_from_name("nope"), -1);
    assert_string_equal(opq_calibrator_name(OPQ_CALIB_PERCENTILE), "percentile");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grid),
        cmocka_unit_test(test_from_range),
        cmocka_unit_test(test_round_half_even),
        cmocka_unit_test(test_observer_exact_merge),
        cmocka_unit_test(test_observer_zeros_and_nonfinite),
        cmocka_unit_test(test_observer_pool_same_as_serial),
        cmocka_unit_test(test_calibrators),
        cmocka_unit_test(test_weight_per_channel),
        cmocka_unit_test(test_calibrator_names),
    };
    return cmocka_run_group_tests_name("qparams", tests, NULL, NULL);
}
