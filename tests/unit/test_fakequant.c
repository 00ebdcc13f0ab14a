/* test_fakequant.c: fake-quant forward (half to even, clamping, zero point, per channel), the
 * straight-through x gradient, and the LSQ step-size gradient against finite differences:
 * exactly on clamped elements, and on in-range elements against the STE surrogate
 * s -> s * (x/s + d) with the rounding residual d = round(x/s0) - x/s0 frozen at s0 (the
 * function whose derivative LSQ defines), with elements near rounding boundaries excluded. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "quant/fakequant.h"

static void test_forward(void **state) {
    (void)state;
    float s = 0.5f;
    float z = 1.0f;
    struct opq_fq_params p = {.scale = &s,
                              .zero_point = &z,
                              .qmin = -2,
                              .qmax = 3,
                              .outer = 1,
                              .channels = 1,
                              .inner = 7};
    // x/s = 0.5 -> 0 (even), 1.5 -> 2, -0.5 -> -0 ; clamps: q in [-2, 3] -> x/s in [-3, 2]
    const float x[7] = {0.25f, 0.75f, -0.25f, 5.0f, -5.0f, 0.6f, -1.5f};
    const float want[7] = {0.0f, 1.0f, 0.0f, 1.0f, -1.5f, 0.5f, -1.5f};
    float y[7];
    opq_fakequant_forward(&p, x, y);
    for (int i = 0; i < 7; i++)
        assert_true(y[i] == want[i]);
    // per channel: x [2, 2, 2], channel scales 1 and 0.1
    float sc[2] = {1.0f, 0.1f};
    struct opq_fq_params pc = {
        .scale = sc, .qmin = -128, .qmax = 127, .outer = 2, .channels = 2, .inner = 2};
    const float xc[8] = {1.4f, -2.6f, 0.14f, 0.26f, 200.0f, 0.0f, -20.0f, 0.049f};
    float yc[8];
    opq_fakequant_forward(&pc, xc, yc);
    const float wc[8] = {1.0f, -3.0f, 0.1f, 0.3f, 127.0f, 0.0f, -12.8f, 0.0f};
    for (int i = 0; i < 8; i++)
        assert_true(fabsf(yc[i] - wc[i]) < 1e-6f);
}

static void test_backward(void **state) {
    (void)state;
    float s = 0.1f;
    float z = 3.0f;
    struct opq_fq_params p = {.scale = &s,
                              .zero_point = &z,
                              .qmin = 0,
                              .qmax = 15,
                              .outer = 1,
                              .channels = 1,
                              .inner = 64};
    float x[64];
    float w[64];
    uint32_t seed = 1;
    for (int i = 0; i < 64; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = ((float)(seed >> 8) / 16777216.0f - 0.5f) * 3.0f; // beyond both bounds
        seed = seed * 1664525u + 1013904223u;
        w[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
    float dx[64];
    double ds = 0.0;
    opq_fakequant_backward(&p, x, w, dx, &ds);
    double ds_fd = 0.0;
    int used = 0;
    for (int i = 0; i < 64; i++) {
        float v = x[i] / s;
        float q = nearbyintf(v) + z;
        bool in = q >= 0 && q <= 15;
        assert_true(dx[i] == (in ? w[i] : 0.0f));
        double h = 1e-4;
        if (in) {
            // surrogate with frozen residual, skipped near a rounding boundary
            double frac = fabs((double)v - floor((double)v) - 0.5);
            if (frac < 0.05 || fabs((double)q) < 0.5 || fabs((double)q - 15) < 0.5)
                continue;
            double d = (double)nearbyintf(v) - (double)v;
            double sd = (double)s;
            double fp = (sd + h) * ((double)x[i] / (sd + h) + d);
            double fm = (sd - h) * ((double)x[i] / (sd - h) + d);
            ds_fd += (double)w[i] * (fp - fm) / (2 * h);
        } else {
            // clamped: the true forward is linear in s, so plain differences of it are exact
            float sp = (float)((double)s + h);
            float sm = (float)((double)s - h);
            float yp;
            float ym;
            struct opq_fq_params pp = p;
            pp.inner = 1;
            pp.scale = &sp;
            opq_fakequant_forward(&pp, &x[i], &yp);
            pp.scale = &sm;
            opq_fakequant_forward(&pp, &x[i], &ym);
            ds_fd += (double)w[i] * ((double)yp - (double)ym) / ((double)sp - (double)sm);
        }
        used++;
    }
    assert_true(used > 32);
    // recompute the analytic sum over the same elements
    double ds_sel = 0.0;
    for (int i = 0; i < 64; i++) {
        float v = x[i] / s;
        float q = nearbyintf(v) + z;
        bool in = q >= 0 && q <= 15;
        if (in) {
            double frac = fabs((double)v - floor((double)v) - 0.5);
            if (frac < 0.05 || fabs((double)q) < 0.5 || fabs((double)q - 15) < 0.5)
                continue;
        }
        float one = w[i];
        double d1 = 0.0;
        struct opq_fq_params pp = p;
        pp.inner = 1;
        opq_fakequant_backward(&pp, &x[i], &one, NULL, &d1);
        ds_sel += d1;
    }
    assert_true(fabs(ds_sel - ds_fd) < 1e-3 * (fabs(ds_fd) + 1.0));
    assert_true(fabs(ds) > 0.0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward),
        cmocka_unit_test(test_backward),
    };
    return cmocka_run_group_tests_name("fakequant", tests, NULL, NULL);
}
