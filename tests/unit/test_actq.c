/* test_actq.c: activation fake quantization for reconstruction (recon/actq.h) and the PCG
 * jump-ahead it relies on (rng.h).
 *   - opq_rng_advance(n) lands where n draws land, and draws continue identically;
 *   - the QDrop mask is byte i % 4 of draw i / 4 of the stream, the stream moves past (n+3)/4
 *     draws, and forward values follow the scalar definition (quantized or passed through);
 *   - forward and backward give the same bytes without a pool, with 2 and with 3 threads, per
 *     tensor and per channel (several pieces per segment, and many small segments);
 *   - the backward matches a scalar reference: dx, and the step gradient within 1e-9. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base.h"
#include "recon/actq.h"
#include "rng.h"
#include "threadpool.h"

static void test_rng_advance(void **state) {
    (void)state;
    const uint64_t steps[] = {0, 1, 2, 3, 7, 100, 1000, 65537};
    for (size_t k = 0; k < ARRAY_SIZE(steps); k++) {
        struct opq_rng a;
        struct opq_rng b;
        opq_rng_seed(&a, 42, 7);
        b = a;
        for (uint64_t i = 0; i < steps[k]; i++)
            opq_rng_u32(&a);
        opq_rng_advance(&b, steps[k]);
        assert_true(a.state == b.state && a.inc == b.inc);
        for (int i = 0; i < 5; i++)
            assert_int_equal(opq_rng_u32(&a), opq_rng_u32(&b));
    }
}

// n elements of x spread over about [-3, 3] step units, with exact halves and far outliers.
static void fill(float *x, size_t n, uint64_t seed) {
    struct opq_rng r;
    opq_rng_seed(&r, seed, 1);
    for (size_t i = 0; i < n; i++) {
        float v = 2.0f * opq_rng_normal(&r);
        if (i % 97 == 0)
            v = 0.25f * (float)((int)(i % 13) - 6) + 0.125f; // on a rounding tie
        if (i % 101 == 0)
            v = 50.0f * (i % 2 ? 1.0f : -1.0f);
        x[i] = v;
    }
}

struct layout {
    size_t n, inner;
    int n_ch;
};

static void run(struct opq_threadpool *pool, const struct layout *l, bool drop, float *y,
                uint8_t *keep, float *dx, double *ds, struct opq_rng *after) {
    float scale[4] = {0.25f, 0.5f, 0.3f, 0.125f};
    float lo[4] = {-8.0f, -3.0f, -8.0f, 0.0f};
    float hi[4] = {7.0f, 12.0f, 7.0f, 15.0f};
    struct opq_actq q = {.n = l->n, .inner = l->inner, .n_ch = l->n_ch, .scale = scale,
                         .lo = lo, .hi = hi};
    float *x = malloc(sizeof(float) * l->n);
    double *parts = malloc(sizeof(double) * opq_actq_n_parts(&q));
    assert_non_null(x);
    assert_non_null(parts);
    fill(x, l->n, 3);
    struct opq_rng r;
    opq_rng_seed(&r, 9, 2);
    opq_actq_forward(pool, &q, x, y, drop ? keep : NULL, drop ? &r : NULL, 128);
    *after = r;
    fill(dx, l->n, 5);
    memset(ds, 0, sizeof(double) * (size_t)l->n_ch);
    opq_actq_backward(pool, &q, x, dx, drop ? keep : NULL, parts, ds);
    // scalar reference
    struct opq_rng ref;
    opq_rng_seed(&ref, 9, 2);
    uint32_t bits = 0;
    double *rds = calloc((size_t)l->n_ch, sizeof(double));
    float *g = malloc(sizeof(float) * l->n);
    assert_non_null(rds);
    assert_non_null(g);
    fill(g, l->n, 5);
    for (size_t i = 0; i < l->n; i++) {
        int c = (int)((i / l->inner) % (size_t)l->n_ch);
        if (i % 4 == 0)
            bits = opq_rng_u32(&ref);
        bool k = !drop || (bits & 0xffu) < 128;
        bits >>= 8;
        if (drop)
            assert_int_equal(keep[i], k);
        float xs = x[i] / scale[c];
        float code = nearbyintf(xs);
        float qv = fminf(fmaxf(code, lo[c]), hi[c]) * scale[c];
        assert_true(y[i] == (k ? qv : x[i]));
        bool below = code < lo[c], above = code > hi[c];
        float want = k && (below || above) ? 0.0f : g[i];
        assert_true(dx[i] == want);
        if (k)
            rds[c] += below ? (double)(g[i] * lo[c])
                            : above ? (double)(g[i] * hi[c]) : (double)(g[i] * (code - xs));
    }
    for (int c = 0; c < l->n_ch; c++)
        assert_true(fabs(ds[c] - rds[c]) <= 1e-9 * (1.0 + fabs(rds[c])));
    if (drop) {
        opq_rng_seed(&ref, 9, 2);
        opq_rng_advance(&ref, (l->n + 3) / 4);
        assert_true(ref.state == after->state);
    }
    free(rds);
    free(g);
    free(x);
    free(parts);
}

static void test_actq_threads(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    assert_non_null(ctx);
    struct opq_threadpool *p2 = opq_threadpool_new(ctx, 2);
    struct opq_threadpool *p3 = opq_threadpool_new(ctx, 3);
    assert_non_null(p2);
    assert_non_null(p3);
    const struct layout ls[] = {
        {100003, 100003, 1}, // per tensor: several pieces, odd tail
        {4 * 40000, 40000, 4}, // per channel, pieces within segments
        {3 * 7 * 1001, 7, 3},  // many small segments
    };
    struct opq_threadpool *pools[] = {NULL, p2, p3};
    for (size_t li = 0; li < ARRAY_SIZE(ls); li++) {
        for (int drop = 0; drop < 2; drop++) {
            size_t n = ls[li].n;
            float *y[3];
            float *dx[3];
            uint8_t *keep[3];
            double ds[3][4];
            struct opq_rng after[3];
            for (int p = 0; p < 3; p++) {
                y[p] = malloc(sizeof(float) * n);
                dx[p] = malloc(sizeof(float) * n);
                keep[p] = malloc(n);
                assert_non_null(y[p]);
                assert_non_null(dx[p]);
                assert_non_null(keep[p]);
                run(pools[p], &ls[li], drop != 0, y[p], keep[p], dx[p], ds[p], &after[p]);
            }
            for (int p = 1; p < 3; p++) {
                assert_memory_equal(y[0], y[p], sizeof(float) * n);
                assert_memory_equal(dx[0], dx[p], sizeof(float) * n);
                assert_memory_equal(ds[0], ds[p], sizeof(double) * (size_t)ls[li].n_ch);
                if (drop)
                    assert_memory_equal(keep[0], keep[p], n);
            }
            for (int p = 0; p < 3; p++) {
                free(y[p]);
                free(dx[p]);
                free(keep[p]);
            }
        }
    }
    opq_threadpool_free(p2);
    opq_threadpool_free(p3);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rng_advance),
        cmocka_unit_test(test_actq_threads),
    };
    return cmocka_run_group_tests_name("actq", tests, NULL, NULL);
}
