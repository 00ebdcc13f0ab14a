/* test_erq.c: ERQ's numerical kernels (recon/erq.h): the ridge solve against a direct solve,
 * rounding refinement never increasing its proxy, the outlier-column choice of dual uniform
 * quantization, on-grid weights keeping their codes through the encoder, and the DUQ encoding
 * (two DequantizeLinear + Add) computing exactly the dual-grid weights in our executor. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "exec.h"
#include "gb.h"
#include "quant/qdq.h"
#include "recon/erq.h"

// Deterministic uniform numbers in [-1, 1) (a 64-bit LCG).
static double urand(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(*s >> 11) / 4503599627370496.0 - 1.0;
}

// Direct solve of M X = B (n x n, n x m) by Gaussian elimination with partial pivoting.
static void direct_solve(double *M, int n, double *B, int m) {
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(M[r * n + c]) > fabs(M[p * n + c]))
                p = r;
        for (int j = 0; j < n; j++) {
            double t = M[c * n + j];
            M[c * n + j] = M[p * n + j];
            M[p * n + j] = t;
        }
        for (int j = 0; j < m; j++) {
            double t = B[c * m + j];
            B[c * m + j] = B[p * m + j];
            B[p * m + j] = t;
        }
        for (int r = c + 1; r < n; r++) {
            double f = M[r * n + c] / M[c * n + c];
            for (int j = c; j < n; j++)
                M[r * n + j] -= f * M[c * n + j];
            for (int j = 0; j < m; j++)
                B[r * m + j] -= f * B[c * m + j];
        }
    }
    for (int r = n - 1; r >= 0; r--)
        for (int j = 0; j < m; j++) {
            double s = B[r * m + j];
            for (int k = r + 1; k < n; k++)
                s -= M[r * n + k] * B[k * m + j];
            B[r * m + j] = s / M[r * n + r];
        }
}

static void test_ridge_solve_matches_direct(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    uint64_t seed = 1;
    for (int trial = 0; trial < 20; trial++) {
        int n = 1 + trial % 9, m = 1 + trial % 4, rows = trial % 3 == 0 ? n / 2 : 3 * n;
        double A[81] = {0}, M[81], B[36], X[36], Y[36];
        // A = R^T R (rank-deficient when rows < n): only the ridge makes it definite.
        for (int r = 0; r < rows; r++) {
            double v[9];
            for (int i = 0; i < n; i++)
                v[i] = urand(&seed);
            for (int i = 0; i < n; i++)
                for (int j = 0; j < n; j++)
                    A[i * n + j] += v[i] * v[j];
        }
        for (int i = 0; i < n * m; i++)
            B[i] = Y[i] = urand(&seed);
        double lambda = 0.05 + 0.1 * trial;
        assert_int_equal(opq_erq_ridge_solve(ctx, A, n, lambda, B, m, X), OPQ_OK);
        memcpy(M, A, sizeof(double) * (size_t)(n * n));
        for (int i = 0; i < n; i++)
            M[i * n + i] += lambda;
        direct_solve(M, n, Y, m);
        for (int i = 0; i < n * m; i++)
            assert_true(fabs(X[i] - Y[i]) <= 1e-9 * (1.0 + fabs(Y[i])));
        // in place (X aliasing B)
        assert_int_equal(opq_erq_ridge_solve(ctx, A, n, lambda, B, m, B), OPQ_OK);
        for (int i = 0; i < n * m; i++)
            assert_true(fabs(B[i] - Y[i]) <= 1e-9 * (1.0 + fabs(Y[i])));
    }
    // A singular matrix without ridge is reported, not silently solved.
    double Z[4] = {0}, b[2] = {1, 1};
    assert_int_equal(opq_erq_ridge_solve(ctx, Z, 2, 0.0, b, 1, b), OPQ_ERR_NUMERIC);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "not positive definite"));
    opq_ctx_free(ctx);
}

static double proxy(const double *H, const double *d, int k) {
    double s = 0.0;
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++)
            s += d[i] * H[i * k + j] * d[j];
    return s;
}

static void test_refine_never_increases(void **state) {
    (void)state;
    uint64_t seed = 7;
    int total_flips = 0;
    for (int trial = 0; trial < 200; trial++) {
        enum { K = 16 };
        int k = 2 + trial % (K - 1);
        double H[K * K] = {0}, d[K], ef[K], ec[K], h[K];
        // H = mu mu^T + covariance of correlated samples (the ERQ proxy's form).
        for (int r = 0; r < 40; r++) {
            double v[K];
            double common = urand(&seed);
            for (int i = 0; i < k; i++)
                v[i] = 0.7 * common + urand(&seed) + 0.3;
            for (int i = 0; i < k; i++)
                for (int j = 0; j < k; j++)
                    H[i * k + j] += v[i] * v[j] / 40.0;
        }
        double s = 0.05 + 0.1 * (trial % 5);
        for (int i = 0; i < k; i++) {
            double x = 3.0 * urand(&seed);
            ef[i] = floor(x / s) * s - x;
            ec[i] = ceil(x / s) * s - x;
            d[i]  = nearbyint(x / s) * s - x;
        }
        double before = proxy(H, d, k);
        // One step at a time: every accepted flip lowers (or keeps) the proxy.
        double prev = before;
        for (int step = 0; step < 100; step++) {
            int flips = 0;
            double obj = opq_erq_refine_row(H, k, d, ef, ec, 1, h, &flips);
            double now = proxy(H, d, k);
            assert_true(now <= prev + 1e-12 * (1.0 + prev));
            assert_true(fabs(obj - now) <= 1e-9 * (1.0 + now));
            total_flips += flips;
            prev = now;
            if (!flips)
                break;
        }
        for (int i = 0; i < k; i++)
            assert_true(d[i] == ef[i] || d[i] == ec[i]);
        assert_true(prev <= before + 1e-12 * (1.0 + before));
    }
    assert_true(total_flips > 0); // the test exercised accepted flips, not only rejections
}

static void test_duq_outliers(void **state) {
    (void)state;
    enum { DO = 40, DI = 10 };
    double th[DO * DI];
    uint64_t seed = 3;
    for (int i = 0; i < DO; i++)
        for (int j = 0; j < DI; j++)
            th[i * DI + j] = 0.1 * urand(&seed) * (j == 3 ? 20.0 : j == 7 ? -15.0 : 1.0);
    uint8_t out[DI];
    assert_int_equal(opq_erq_duq_outliers(th, DO, DI, DI, 2, out), 2);
    for (int j = 0; j < DI; j++)
        assert_int_equal(out[j], j == 3 || j == 7);
}

// The flow's encoder rounds each weight to nearest on its grid: values ERQ leaves on the grid
// (s * (q - z) in float) must come back as exactly the same codes.
static void test_on_grid_keeps_codes(void **state) {
    (void)state;
    uint64_t seed = 11;
    for (int trial = 0; trial < 2000; trial++) {
        struct opq_qparams p = {.scale = (float)(1e-4 + 0.5 * fabs(urand(&seed))),
                                .zero_point = (int32_t)(trial % 7) - 3, .qmin = -4, .qmax = 3};
        for (int32_t q = p.qmin; q <= p.qmax; q++) {
            float w = (float)(q - p.zero_point) * p.scale;
            assert_int_equal(opq_quantize1(w, &p), q);
            assert_true(opq_fq(w, &p) == w);
        }
    }
}

// DUQ encoding: y = x @ W with W on two grids, encoded as DQ(inliers) + DQ(outliers) -> Add.
static void test_duq_encoding_executes(void **state) {
    (void)state;
    enum { DI = 6, DO = 4, B = 3 };
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    float w0[DI * DO] = {0};
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(B, DI));
    gb_init_f32(m, "w", GB_SHAPE(DI, DO), w0);
    struct opq_node *mm = gb_node(m, "MatMul", "x,w", "y");
    gb_output(m, "y");
    // Two grids per output channel: outlier columns 1 and 4 have a 10x coarser scale.
    uint8_t outlier[DI] = {0, 1, 0, 0, 1, 0};
    struct opq_qparams qi[DO], qo[DO];
    float w[DI * DO];
    uint64_t seed = 5;
    for (int c = 0; c < DO; c++) {
        qi[c] = (struct opq_qparams){.scale = 0.01f * (float)(c + 1), .zero_point = c % 3 - 1,
                                     .qmin = -8, .qmax = 7};
        qo[c] = (struct opq_qparams){.scale = 0.1f * (float)(c + 1), .zero_point = 0,
                                     .qmin = -8, .qmax = 7};
    }
    for (int j = 0; j < DI; j++)
        for (int c = 0; c < DO; c++) {
            const struct opq_qparams *p = outlier[j] ? &qo[c] : &qi[c];
            int32_t q = p->qmin + (int32_t)((urand(&seed) + 1.0) * 7.99);
            w[j * DO + c] = (float)(q - p->zero_point) * p->scale;
        }
    // What the flow writes first: one per-channel DQ on the inlier grid.
    struct opq_qdq_spec sp = {.bits = 4, .is_signed = true, .opset = 17, .axis = 1, .n_ch = DO,
                              .p = qi};
    struct opq_value *wv = gb_value(m, "w");
    memcpy(wv->t.data, w, sizeof(w));
    assert_int_equal(opq_qdq_quantize_weight(m->graph, wv, &sp, NULL), OPQ_OK);
    struct opq_erq_layer L = {.d_in = DI, .d_out = DO, .n_outliers = 2, .node = mm, .w = w,
                              .outlier = outlier, .qp_in = qi, .qp_out = qo, .axis = 1,
                              .n_ch = DO, .shape = {DI, DO}, .rows_are_in = true};
    snprintf(L.name, sizeof(L.name), "mm");
    struct opq_erq_state s = {.layers = &L, .n_layers = 1};
    assert_int_equal(opq_erq_encode_duq(m->graph, &s, 4, 17), OPQ_OK);
    assert_int_equal(opq_graph_cleanup(m->graph), OPQ_OK);
    assert_int_equal(opq_graph_sort(m->graph), OPQ_OK);
    gb_verify(m);
    assert_int_equal(gb_count_op(m, "DequantizeLinear"), 2);
    assert_int_equal(gb_count_op(m, "Add"), 1);

    float x[B * DI];
    for (int i = 0; i < B * DI; i++)
        x[i] = (float)urand(&seed);
    struct opq_named_tensor in = {.name = "x", .t = {.dtype = OPQ_DTYPE_FLOAT, .ndim = 2,
                                                     .shape = {B, DI}, .data = x,
                                                     .nbytes = sizeof(x)}};
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    struct opq_tensor y;
    assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
    const float *yv = y.data;
    for (int b = 0; b < B; b++)
        for (int c = 0; c < DO; c++) {
            double ref = 0.0;
            for (int j = 0; j < DI; j++)
                ref += (double)x[b * DI + j] * (double)w[j * DO + c];
            assert_true(fabs((double)yv[b * DO + c] - ref) <= 1e-5 * (1.0 + fabs(ref)));
        }
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ridge_solve_matches_direct),
        cmocka_unit_test(test_refine_never_increases),
        cmocka_unit_test(test_duq_outliers),
        cmocka_unit_test(test_on_grid_keeps_codes),
        cmocka_unit_test(test_duq_encoding_executes),
    };
    return cmocka_run_group_tests_name("erq", tests, NULL, NULL);
}
