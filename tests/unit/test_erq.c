/* test_erq.c: ERQ's numerical kernels (recon/erq.h): the ridge solve against a direct solve,
 * rounding refinement never increasing its proxy, the outlier-column choice of dual uniform
 * quantization, on-grid weights keeping their codes through the encoder, and the DUQ encoding
 * (two DequantizeLinear + Add) computing exactly the dual-grid weights in our executor; the
 * streamed statistics (float blocks, double sums) against a double reference, and a whole ERQ
 * run giving byte-identical models on one and two threads. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "exec.h"
#include "npy.h"
#include "gb.h"
#include "quant/qdq.h"
#include "quantize.h"
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

// Reference statistics in double, token by token: Q_a(x) = (code - z) * scale formed in double
// (opq_fq's float product differs from it by a float rounding), the error x - opq_fq(x).
static void stats_ref(const float *x, const float *xref, int rows, int d,
                      const struct opq_qparams *qa, double *G, double *E, double *F) {
    int P = d + 1;
    double *q = malloc(sizeof(double) * (size_t)P), *e = malloc(sizeof(double) * (size_t)P);
    for (int n = 0; n < rows; n++) {
        for (int j = 0; j < d; j++) {
            float v = qa ? opq_fq(x[n * d + j], qa) : x[n * d + j];
            q[j] = qa ? (double)(opq_quantize1(x[n * d + j], qa) - qa->zero_point) *
                            (double)qa->scale
                      : (double)v;
            e[j] = (double)(xref ? xref : x)[n * d + j] - (double)v;
        }
        q[d] = 1.0;
        e[d] = 0.0;
        for (int a = 0; a < P; a++)
            for (int b = 0; b < P; b++) {
                G[a * P + b] += q[a] * q[b];
                E[a * P + b] += q[a] * e[b];
                F[a * P + b] += e[a] * e[b];
            }
    }
    free(q);
    free(e);
}

// The streamed statistics match the double reference: G (from exact integer-code products)
// to double rounding, E and F (float block products of the rounding errors) to float rounding
// of the blocks; several blocks, 4- and 8-bit grids and an unquantized input.
static void test_stats_match_double(void **state) {
    (void)state;
    enum { D = 24, ROWS = 2100 };
    int P = D + 1;
    float *x = malloc(sizeof(float) * ROWS * D);
    uint64_t seed = 21;
    for (int i = 0; i < ROWS * D; i++)
        x[i] = (float)(2.0 * urand(&seed) + (i % D == 3 ? 6.0 : 0.0)); // one shifted channel
    struct opq_qparams q4 = {.scale = 0.61f, .zero_point = 4, .qmin = 0, .qmax = 15};
    struct opq_qparams q8 = {.scale = 0.037f, .zero_point = 60, .qmin = 0, .qmax = 255};
    const struct opq_qparams *qs[3] = {&q4, &q8, NULL};
    assert_true(opq_erq_stats_block(&q4) >= 1000);
    // 8 bits, zero point 60: codes up to 195 in magnitude, several blocks of 2100 rows
    assert_true(opq_erq_stats_block(&q8) * 195.0 * 195.0 <= 16777216.0);
    assert_true(opq_erq_stats_block(&q8) > 256 && opq_erq_stats_block(&q8) < 1000);
    for (int t = 0; t < 3; t++) {
        size_t PP = (size_t)P * (size_t)P;
        double *G = calloc(PP, sizeof(double)), *E = calloc(PP, sizeof(double));
        double *F = calloc(PP, sizeof(double)), *Gr = calloc(PP, sizeof(double));
        double *Er = calloc(PP, sizeof(double)), *Fr = calloc(PP, sizeof(double));
        float *work = malloc(sizeof(float) * opq_erq_stats_work(D, qs[t], false));
        // Two calls, as two batches arrive.
        opq_erq_stats_add(NULL, x, NULL, 700, D, qs[t], G, E, F, work);
        opq_erq_stats_add(NULL, x + 700 * D, NULL, ROWS - 700, D, qs[t], G, E, F, work);
        stats_ref(x, NULL, ROWS, D, qs[t], Gr, Er, Fr);
        double gmax = 0.0, emax = 0.0, fmax_ = 0.0;
        for (int a = 0; a < P; a++)
            for (int b = 0; b < P; b++) {
                gmax = fmax(gmax, fabs(Gr[a * P + b]));
                emax = fmax(emax, fabs(Er[a * P + b]));
                fmax_ = fmax(fmax_, fabs(Fr[a * P + b]));
            }
        for (int a = 0; a < P; a++)
            for (int b = 0; b < P; b++) {
                if (b >= a) {
                    // exact codes: double rounding only; raw float inputs: float products
                    double tol = qs[t] ? 1e-12 : 1e-5;
                    assert_true(fabs(G[a * P + b] - Gr[a * P + b]) <= tol * gmax);
                    assert_true(fabs(F[a * P + b] - Fr[a * P + b]) <= 1e-5 * fmax_ + 1e-300);
                }
                assert_true(fabs(E[a * P + b] - Er[a * P + b]) <= 1e-5 * emax + 1e-300);
            }
        if (qs[t])
            assert_true(emax > 0.0 && fmax_ > 0.0);
        else
            assert_true(emax == 0.0 && E[0] == 0.0 && F[0] == 0.0);
        free(G);
        free(E);
        free(F);
        free(Gr);
        free(Er);
        free(Fr);
        free(work);
    }
    free(x);
}

// Paired statistics (the quantized model's inputs x regressed onto the float ones xref): G from
// x alone, E = sum xq~ (xref~ - xq~)^T and F from xref - Q_a(x), quantized or not; with xref = x
// they are the unpaired statistics.
static void test_stats_paired(void **state) {
    (void)state;
    enum { D = 12, ROWS = 1500 };
    int P = D + 1;
    size_t PP = (size_t)P * (size_t)P;
    float *x = malloc(sizeof(float) * ROWS * D), *xr = malloc(sizeof(float) * ROWS * D);
    uint64_t seed = 5;
    for (int i = 0; i < ROWS * D; i++) {
        xr[i] = (float)(2.0 * urand(&seed));
        x[i]  = xr[i] + (float)(0.3 * urand(&seed) + (i % D == 2 ? 0.5 : 0.0)); // upstream error
    }
    struct opq_qparams q4 = {.scale = 0.41f, .zero_point = 6, .qmin = 0, .qmax = 15};
    const struct opq_qparams *qs[2] = {&q4, NULL};
    for (int t = 0; t < 2; t++) {
        double *G = calloc(PP, sizeof(double)), *E = calloc(PP, sizeof(double));
        double *F = calloc(PP, sizeof(double)), *Gr = calloc(PP, sizeof(double));
        double *Er = calloc(PP, sizeof(double)), *Fr = calloc(PP, sizeof(double));
        double *G1 = calloc(PP, sizeof(double)), *E1 = calloc(PP, sizeof(double));
        double *F1 = calloc(PP, sizeof(double)), *G2 = calloc(PP, sizeof(double));
        double *E2 = calloc(PP, sizeof(double)), *F2 = calloc(PP, sizeof(double));
        float *work = malloc(sizeof(float) * opq_erq_stats_work(D, qs[t], true));
        opq_erq_stats_add(NULL, x, xr, 600, D, qs[t], G, E, F, work);
        opq_erq_stats_add(NULL, x + 600 * D, xr + 600 * D, ROWS - 600, D, qs[t], G, E, F, work);
        stats_ref(x, xr, ROWS, D, qs[t], Gr, Er, Fr);
        double gmax = 0.0, emax = 0.0, fmax_ = 0.0;
        for (size_t i = 0; i < PP; i++) {
            gmax  = fmax(gmax, fabs(Gr[i]));
            emax  = fmax(emax, fabs(Er[i]));
            fmax_ = fmax(fmax_, fabs(Fr[i]));
        }
        assert_true(emax > 0.0 && fmax_ > 0.0);
        for (int a = 0; a < P; a++)
            for (int b = 0; b < P; b++) {
                size_t i = (size_t)a * (size_t)P + (size_t)b;
                if (b >= a) {
                    assert_true(fabs(G[i] - Gr[i]) <= (qs[t] ? 1e-12 : 1e-5) * gmax);
                    assert_true(fabs(F[i] - Fr[i]) <= 1e-5 * fmax_);
                }
                assert_true(fabs(E[i] - Er[i]) <= 1e-5 * emax);
            }
        // The column of the ones in E: sum (xref - Q_a(x)), the mean shift the bias absorbs.
        double shift = 0.0;
        for (int n = 0; n < ROWS; n++)
            shift += (double)xr[n * D + 2] - (double)(qs[t] ? opq_fq(x[n * D + 2], qs[t])
                                                             : x[n * D + 2]);
        assert_true(fabs(E[(size_t)D * (size_t)P + 2] - shift) <= 1e-4 * fabs(shift));
        assert_true(shift < -0.4 * ROWS);
        // xref = x: the unpaired statistics (quantized input), or nothing to regress (float).
        opq_erq_stats_add(NULL, x, x, ROWS, D, qs[t], G1, E1, F1, work);
        opq_erq_stats_add(NULL, x, NULL, ROWS, D, qs[t], G2, E2, F2, work);
        for (size_t i = 0; i < PP; i++) {
            assert_true(fabs(G1[i] - G2[i]) <= 1e-12 * gmax);
            assert_true(fabs(E1[i] - E2[i]) <= 1e-9 * emax);
            if (!qs[t])
                assert_true(E1[i] == 0.0 && F1[i] == 0.0);
        }
        free(G);
        free(E);
        free(F);
        free(Gr);
        free(Er);
        free(Fr);
        free(G1);
        free(E1);
        free(F1);
        free(G2);
        free(E2);
        free(F2);
        free(work);
    }
    free(x);
    free(xr);
}

// ERQ (W4A4, DUQ, refinement) on the vit_tiny fixture: 1 and 2 threads (statistics, refinement
// and grid fits split over the pool) serialize to the same bytes.
static void erq_fixture(int threads, bool qinputs, void **buf, size_t *len,
                        struct opq_erq_state *s) {
    struct opq_ctx *ctx = opq_ctx_new();
    opq_ctx_set_threads(ctx, threads);
    struct opq_model *m = NULL;
    assert_int_equal(opq_model_load(ctx, OPQ_SOURCE_DIR "/fixtures/models/vit_tiny_op17.onnx",
                                    &m), OPQ_OK);
    struct opq_quant_opts o;
    opq_quant_opts_default(&o);
    o.wbits = o.abits = 4;
    o.w_asym = true;
    o.calib.path = "random";
    o.calib.count = 24;
    o.calib.seed = 3;
    o.holdout = 0;
    o.batch = 8;
    opq_erq_opts_default(&s->opts);
    s->opts.qinputs = qinputs;
    o.refine_qmodel = qinputs;
    o.reparam = 1;
    o.reparam_alpha = 1.0f;
    o.refine = opq_erq_refine;
    o.refine_user = s;
    if (opq_quantize(ctx, m, &o, NULL) != OPQ_OK)
        fail_msg("%s", opq_ctx_errmsg(ctx));
    assert_int_equal(opq_erq_encode_duq(m->graph, s, 4, 17), OPQ_OK);
    assert_int_equal(opq_graph_cleanup(m->graph), OPQ_OK);
    assert_int_equal(opq_graph_sort(m->graph), OPQ_OK);
    void *b;
    assert_int_equal(opq_model_save_buffer(ctx, m, &b, len), OPQ_OK);
    *buf = malloc(*len);
    memcpy(*buf, b, *len);
    opq_buffer_free(ctx, b);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_threads_byte_identical(void **state) {
    (void)state;
    if (access(OPQ_SOURCE_DIR "/fixtures/models/vit_tiny_op17.onnx", R_OK) != 0)
        skip();
    struct opq_erq_state s1 = {0}, s2 = {0};
    void *b1, *b2;
    size_t l1, l2;
    erq_fixture(1, false, &b1, &l1, &s1);
    erq_fixture(2, false, &b2, &l2, &s2);
    assert_true(s1.n_layers > 0 && s1.n_layers == s2.n_layers);
    long flips = 0;
    for (int i = 0; i < s1.n_layers; i++) {
        // The error figures go through threaded BLAS: equal up to the summation order.
        assert_true(fabs(s1.layers[i].err_wqer - s2.layers[i].err_wqer) <=
                    1e-12 * s1.layers[i].err_wqer);
        assert_true(s1.layers[i].err_wqer < s1.layers[i].err_rtn);
        flips += s1.layers[i].n_outliers;
    }
    assert_true(flips > 0); // DUQ took part
    assert_int_equal(l1, l2);
    assert_memory_equal(b1, b2, l1);
    free(b1);
    free(b2);
    opq_erq_state_free(&s1);
    opq_erq_state_free(&s2);
}

// Statistics on the quantized model's inputs, one layer input after another: byte-identical for
// 1 and 2 threads; every layer still ends below round to nearest on the same statistics; the
// later layers see the upstream error (their error before Aqer is above the float-input run's)
// and the output differs from the float-input run's.
static void test_qinputs(void **state) {
    (void)state;
    if (access(OPQ_SOURCE_DIR "/fixtures/models/vit_tiny_op17.onnx", R_OK) != 0)
        skip();
    struct opq_erq_state s1 = {0}, s2 = {0}, sf = {0};
    void *b1, *b2, *bf;
    size_t l1, l2, lf;
    erq_fixture(1, true, &b1, &l1, &s1);
    erq_fixture(2, true, &b2, &l2, &s2);
    erq_fixture(1, false, &bf, &lf, &sf);
    assert_true(s1.n_layers > 4 && s1.n_layers == sf.n_layers);
    int later_worse = 0;
    for (int i = 0; i < s1.n_layers; i++) {
        assert_string_equal(s1.layers[i].name, sf.layers[i].name);
        assert_true(s1.layers[i].err_wqer < s1.layers[i].err_rtn);
        later_worse += s1.layers[i].err_before > sf.layers[i].err_before;
    }
    assert_true(later_worse >= s1.n_layers / 2);
    assert_int_equal(l1, l2);
    assert_memory_equal(b1, b2, l1);
    assert_true(l1 != lf || memcmp(b1, bf, l1) != 0);
    free(b1);
    free(b2);
    free(bf);
    opq_erq_state_free(&s1);
    opq_erq_state_free(&s2);
    opq_erq_state_free(&sf);
}

// The patch convolution goes through ERQ as the linear layer of its im2col patches: a Conv
// (kernel = stride = 2) and a MatMul + Add fed the patches of the same images in (image, row,
// column) order, with (c, ky, kx) columns, end with the same quantized weights (Wqer without
// refinement; the convolution gets ten times the ridge strength, so the MatMul gets lambda x 10).
enum { CS = 32, CC = 2, CH = 4, CK = 2, CO = 3, CD = CC * CK * CK, CT = (CH / CK) * (CH / CK) };

static void conv_or_matmul(bool conv, const float *data, float *y_out, const float *x_eval) {
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    float w[CO * CD], b[CO], wt[CD * CO];
    uint64_t seed = 9;
    for (int i = 0; i < CO * CD; i++)
        w[i] = (float)urand(&seed);
    for (int i = 0; i < CO; i++)
        b[i] = 0.1f * (float)i;
    for (int o = 0; o < CO; o++)
        for (int j = 0; j < CD; j++)
            wt[j * CO + o] = w[o * CD + j];
    const char *path = conv ? OPQ_BINARY_DIR "/erq_conv_a.npy"
                            : OPQ_BINARY_DIR "/erq_conv_b.npy";
    struct opq_tensor t = {.dtype = OPQ_DTYPE_FLOAT, .data = (void *)data};
    if (conv) {
        gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, CC, CH, CH));
        gb_init_f32(m, "w", GB_SHAPE(CO, CC, CK, CK), w);
        gb_init_f32(m, "b", GB_SHAPE(CO), b);
        struct opq_node *n = gb_node(m, "Conv", "x,w,b", "y");
        gb_attr_ints(m, n, "kernel_shape", 2, (int64_t[]){CK, CK});
        gb_attr_ints(m, n, "strides", 2, (int64_t[]){CK, CK});
        t.ndim = 4;
        memcpy(t.shape, (int64_t[]){CS, CC, CH, CH}, sizeof(int64_t) * 4);
    } else {
        gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, CT, CD));
        gb_init_f32(m, "w", GB_SHAPE(CD, CO), wt);
        gb_init_f32(m, "b", GB_SHAPE(CO), b);
        gb_node(m, "MatMul", "x,w", "xw");
        gb_node(m, "Add", "xw,b", "y");
        t.ndim = 3;
        memcpy(t.shape, (int64_t[]){CS, CT, CD}, sizeof(int64_t) * 3);
    }
    gb_output(m, "y");
    t.nbytes = sizeof(float) * CS * CT * CD;
    assert_int_equal(opq_npy_save(ctx, path, &t), OPQ_OK);
    struct opq_quant_opts o;
    opq_quant_opts_default(&o);
    o.wbits = 3;
    o.abits = 4;
    o.w_asym = true;
    o.calib.path = path;
    o.holdout = 0;
    o.batch = 8;
    struct opq_erq_state s = {0};
    opq_erq_opts_default(&s.opts);
    s.opts.aqer = false;
    s.opts.duq = false;
    s.opts.steps = 0;
    s.opts.lambda = conv ? 0.5 : 5.0;
    o.refine = opq_erq_refine;
    o.refine_user = &s;
    enum opq_status qst = opq_quantize(ctx, m, &o, NULL);
    if (qst != OPQ_OK)
        fail_msg("status %d: %s", (int)qst, opq_ctx_errmsg(ctx));
    assert_int_equal(s.n_layers, 1);
    assert_true(s.layers[0].err_wqer < s.layers[0].err_rtn);
    struct opq_named_tensor in = {.name = "x", .t = {.dtype = OPQ_DTYPE_FLOAT, .ndim = t.ndim,
                                                     .data = (void *)x_eval}};
    memcpy(in.t.shape, conv ? (int64_t[]){1, CC, CH, CH} : (int64_t[]){1, CT, CD, 0},
           sizeof(int64_t) * 4);
    in.t.nbytes = sizeof(float) * CT * CD;
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    struct opq_tensor y;
    assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
    memcpy(y_out, y.data, sizeof(float) * CT * CO);
    opq_exec_free(ex);
    opq_erq_state_free(&s);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_patch_conv_as_linear(void **state) {
    (void)state;
    float *img = malloc(sizeof(float) * CS * CC * CH * CH);
    float *pat = malloc(sizeof(float) * CS * CT * CD);
    uint64_t seed = 17;
    for (int i = 0; i < CS * CC * CH * CH; i++)
        img[i] = (float)(urand(&seed) + (i % 5 == 0 ? 1.5 : 0.0));
    for (int n = 0; n < CS; n++)
        for (int py = 0; py < CH / CK; py++)
            for (int px = 0; px < CH / CK; px++)
                for (int c = 0; c < CC; c++)
                    for (int ky = 0; ky < CK; ky++)
                        for (int kx = 0; kx < CK; kx++)
                            pat[((n * CT) + py * (CH / CK) + px) * CD + (c * CK + ky) * CK + kx] =
                                img[((n * CC + c) * CH + py * CK + ky) * CH + px * CK + kx];
    float ya[CT * CO], yb[CT * CO];
    conv_or_matmul(true, img, ya, img);  // evaluated on the first image
    conv_or_matmul(false, pat, yb, pat); // and on its patches
    for (int p = 0; p < CT; p++)
        for (int o = 0; o < CO; o++)
            assert_true(fabs((double)ya[o * CT + p] - (double)yb[p * CO + o]) <= 1e-5);
    free(img);
    free(pat);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ridge_solve_matches_direct),
        cmocka_unit_test(test_refine_never_increases),
        cmocka_unit_test(test_duq_outliers),
        cmocka_unit_test(test_on_grid_keeps_codes),
        cmocka_unit_test(test_duq_encoding_executes),
        cmocka_unit_test(test_stats_match_double),
        cmocka_unit_test(test_stats_paired),
        cmocka_unit_test(test_threads_byte_identical),
        cmocka_unit_test(test_qinputs),
        cmocka_unit_test(test_patch_conv_as_linear),
    };
    return cmocka_run_group_tests_name("erq", tests, NULL, NULL);
}
