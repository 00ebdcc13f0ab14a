/* test_k_linear.c: MatMul (batched, broadcast, 1-D operands), Gemm (alpha, beta, transA/B, C
 * broadcast), Conv (stride, pad, dilation, group, auto_pad), Clip, BatchNormalization and
 * GlobalAveragePool: values against naive references, and finite-difference VJP checks. */
#include "blas.h"
#include "kx_fd.h"
#include "threadpool.h"

static void test_sgemm_vs_ref(void **state) {
    (void)state;
    float a[6 * 5];
    float b[5 * 7];
    float c1[6 * 7];
    float c2[6 * 7];
    kx_fill(a, 30, 1, 1.0f);
    kx_fill(b, 35, 2, 1.0f);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            kx_fill(c1, 42, 3, 1.0f);
            memcpy(c2, c1, sizeof(c1));
            opq_sgemm(ta, tb, 6, 7, 5, 0.5f, a, ta ? 6 : 5, b, tb ? 5 : 7, 2.0f, c1, 7);
            opq_gemm_ref(ta, tb, 6, 7, 5, 0.5f, a, ta ? 6 : 5, b, tb ? 5 : 7, 2.0f, c2, 7);
            for (int i = 0; i < 42; i++)
                kx_near(c1[i], c2[i], 1e-5);
        }
}

// Sizes that cross every blocking boundary of the packed GEMM (MC 144, NC 512, KC 256) and its
// 12 x 32 micro-tile edges, all transpose combinations, strided C; against the reference loop.
static void test_sgemm_blocked(void **state) {
    (void)state;
    const int64_t M = 151, N = 523, K = 263;
    float *a = malloc(sizeof(float) * (size_t)(M * K));
    float *b = malloc(sizeof(float) * (size_t)(K * N));
    float *c1 = malloc(sizeof(float) * (size_t)(M * (N + 3)));
    float *c2 = malloc(sizeof(float) * (size_t)(M * (N + 3)));
    kx_fill(a, (size_t)(M * K), 21, 1.0f);
    kx_fill(b, (size_t)(K * N), 22, 1.0f);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int beta = 0; beta < 2; beta++) {
                kx_fill(c1, (size_t)(M * (N + 3)), 23, 1.0f);
                memcpy(c2, c1, sizeof(float) * (size_t)(M * (N + 3)));
                opq_sgemm(ta, tb, M, N, K, 0.75f, a, ta ? M : K, b, tb ? K : N, (float)beta, c1,
                          N + 3);
                opq_gemm_ref(ta, tb, M, N, K, 0.75f, a, ta ? M : K, b, tb ? K : N, (float)beta, c2,
                             N + 3);
                for (int64_t i = 0; i < M * (N + 3); i++)
                    kx_near(c1[i], c2[i], 2e-4);
            }
    free(a);
    free(b);
    free(c1);
    free(c2);
}

// The pool-split GEMM gives the same bytes as the single call, for rows and column splits.
static void test_sgemm_mt_deterministic(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_threadpool *pool = opq_threadpool_new(ctx, 3);
    assert_non_null(pool);
    const int64_t shapes[2][3] = {{300, 200, 150}, {20, 900, 300}}; // tall, then wide
    for (int s = 0; s < 2; s++) {
        int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *a = malloc(sizeof(float) * (size_t)(M * K));
        float *b = malloc(sizeof(float) * (size_t)(K * N));
        float *c1 = malloc(sizeof(float) * (size_t)(M * N));
        float *c2 = malloc(sizeof(float) * (size_t)(M * N));
        kx_fill(a, (size_t)(M * K), 31, 1.0f);
        kx_fill(b, (size_t)(K * N), 32, 1.0f);
        opq_sgemm(false, false, M, N, K, 1.0f, a, K, b, N, 0.0f, c1, N);
        opq_sgemm_mt(pool, false, false, M, N, K, 1.0f, a, K, b, N, 0.0f, c2, N);
        assert_memory_equal(c1, c2, sizeof(float) * (size_t)(M * N));
        free(a);
        free(b);
        free(c1);
        free(c2);
    }
    opq_threadpool_free(pool);
    opq_ctx_free(ctx);
}

struct pf_rec {
    int64_t hits[1000];
};

static void pf_body(void *user, int64_t b, int64_t e) {
    struct pf_rec *r = user;
    for (int64_t i = b; i < e; i++)
        r->hits[i]++;
}

// parallel-for covers [0, n) exactly once, for sizes below and above the thread count.
static void test_parallel_for(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_threadpool *pool = opq_threadpool_new(ctx, 4);
    assert_int_equal(opq_threadpool_size(pool), 4);
    static struct pf_rec r;
    const int64_t sizes[] = {1, 3, 4, 5, 999, 1000};
    for (int rep = 0; rep < 50; rep++)
        for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
            memset(&r, 0, sizeof(r));
            opq_parallel_for(pool, sizes[s], 1, pf_body, &r);
            for (int64_t i = 0; i < 1000; i++)
                assert_int_equal(r.hits[i], i < sizes[s] ? 1 : 0);
        }
    opq_parallel_for(NULL, 7, 1, pf_body, &r); // no pool: inline
    opq_threadpool_free(pool);
    opq_ctx_free(ctx);
}

static void matmul_case(int na, const int64_t *sa, int nb, const int64_t *sb, int ny,
                        const int64_t *sy) {
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "a", OPQ_DTYPE_FLOAT, na, sa);
    gb_input(m, "b", OPQ_DTYPE_FLOAT, nb, sb);
    gb_node(m, "MatMul", "a,b", "y");
    gb_output(m, "y");
    float a[96];
    float b[96];
    kx_fill(a, 96, 5, 1.0f);
    kx_fill(b, 96, 6, 1.0f);
    struct opq_named_tensor in[2] = {kx_f32("a", na, sa, a), kx_f32("b", nb, sb, b)};
    float *y = NULL;
    size_t n = kx_run(ctx, m, in, 2, 0, &y);
    // reference: explicit broadcast loops over a rank-4 view
    int64_t A[4] = {1, 1, 1, 1};
    int64_t B[4] = {1, 1, 1, 1};
    for (int d = 0; d < na; d++)
        A[4 - na + d] = sa[d];
    for (int d = 0; d < nb; d++)
        B[4 - nb + d] = sb[d];
    if (na == 1) { // [K] -> [1, K]
        A[2] = 1;
        A[3] = sa[0];
    }
    if (nb == 1) { // [K] -> [K, 1]
        B[2] = sb[0];
        B[3] = 1;
    }
    int64_t M = A[2], K = A[3], N = B[3];
    int64_t d0 = A[0] > B[0] ? A[0] : B[0], d1 = A[1] > B[1] ? A[1] : B[1];
    size_t cnt = 0;
    for (int64_t i0 = 0; i0 < d0; i0++)
        for (int64_t i1 = 0; i1 < d1; i1++)
            for (int64_t r = 0; r < M; r++)
                for (int64_t c = 0; c < N; c++) {
                    int64_t ab = ((A[0] > 1 ? i0 : 0) * A[1] + (A[1] > 1 ? i1 : 0)) * M * K;
                    int64_t bb = ((B[0] > 1 ? i0 : 0) * B[1] + (B[1] > 1 ? i1 : 0)) * K * N;
                    double s = 0;
                    for (int64_t q = 0; q < K; q++)
                        s += (double)a[ab + r * K + q] * (double)b[bb + q * N + c];
                    kx_near(y[cnt++], s, 1e-5);
                }
    assert_int_equal(cnt, n);
    size_t want = 1;
    for (int d = 0; d < ny; d++)
        want *= (size_t)sy[d];
    assert_int_equal(n, want);
    kx_check_grad(ctx, m, in, 2, NULL, 2e-3, 9);
    free(y);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_matmul(void **state) {
    (void)state;
    matmul_case(GB_SHAPE(3, 4), GB_SHAPE(4, 5), GB_SHAPE(3, 5));
    matmul_case(GB_SHAPE(2, 3, 4), GB_SHAPE(4, 5), GB_SHAPE(2, 3, 5));             // linear layer
    matmul_case(GB_SHAPE(2, 2, 3, 4), GB_SHAPE(2, 2, 4, 3), GB_SHAPE(2, 2, 3, 3)); // attention
    matmul_case(GB_SHAPE(2, 1, 3, 4), GB_SHAPE(1, 3, 4, 2), GB_SHAPE(2, 3, 3, 2)); // broadcast
    matmul_case(GB_SHAPE(3, 4), GB_SHAPE(2, 4, 5), GB_SHAPE(2, 3, 5));             // A shared
    matmul_case(GB_SHAPE(4), GB_SHAPE(2, 4, 3), GB_SHAPE(2, 3));                   // 1-D A
    matmul_case(GB_SHAPE(2, 3, 4), GB_SHAPE(4), GB_SHAPE(2, 3));                   // 1-D B
}

static void test_matmul_bad(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "a", OPQ_DTYPE_FLOAT, GB_SHAPE(3, 4));
    gb_input(m, "b", OPQ_DTYPE_FLOAT, GB_SHAPE(5, 2));
    gb_node(m, "MatMul", "a,b", "y");
    gb_output(m, "y");
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, NULL, 0, NULL, &ex), OPQ_ERR_SHAPE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "inner dims 4 vs 5"));
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void gemm_case(int ta, int tb, int nc, const int64_t *sc) {
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    const int64_t M = 3, K = 4, N = 5;
    int64_t sa[2] = {ta ? K : M, ta ? M : K};
    int64_t sb[2] = {tb ? N : K, tb ? K : N};
    gb_input(m, "a", OPQ_DTYPE_FLOAT, 2, sa);
    gb_input(m, "b", OPQ_DTYPE_FLOAT, 2, sb);
    gb_input(m, "c", OPQ_DTYPE_FLOAT, nc, sc);
    struct opq_node *n = gb_node(m, "Gemm", "a,b,c", "y");
    gb_attr_float(m, n, "alpha", 0.5f);
    gb_attr_float(m, n, "beta", 2.0f);
    gb_attr_int(m, n, "transA", ta);
    gb_attr_int(m, n, "transB", tb);
    gb_output(m, "y");
    float a[20];
    float b[20];
    float c[15];
    kx_fill(a, 20, 7, 1.0f);
    kx_fill(b, 20, 8, 1.0f);
    kx_fill(c, 15, 9, 1.0f);
    struct opq_named_tensor in[3] = {kx_f32("a", 2, sa, a), kx_f32("b", 2, sb, b),
                                     kx_f32("c", nc, sc, c)};
    float *y = NULL;
    kx_run(ctx, m, in, 3, 0, &y);
    struct opq_tensor ct = in[2].t;
    struct opq_tensor yt = {.ndim = 2, .shape = {M, N}};
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = 0;
            for (int64_t q = 0; q < K; q++)
                s += (double)a[ta ? q * M + i : i * K + q] * (double)b[tb ? j * K + q : q * N + j];
            int64_t ci = ct.ndim == 2
                             ? (ct.shape[0] > 1 ? i : 0) * ct.shape[1] + (ct.shape[1] > 1 ? j : 0)
                         : ct.ndim == 1 ? (ct.shape[0] > 1 ? j : 0)
                                        : 0;
            kx_near(y[i * N + j], 0.5 * s + 2.0 * (double)c[ci], 1e-5);
        }
    (void)yt;
    kx_check_grad(ctx, m, in, 3, NULL, 2e-3, 10);
    free(y);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_gemm(void **state) {
    (void)state;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            gemm_case(ta, tb, GB_SHAPE(3, 5));
    gemm_case(0, 1, GB_SHAPE(5));
    gemm_case(1, 0, GB_SHAPE(3, 1));
    gemm_case(0, 0, GB_SCALAR);
}

static void conv_case(int64_t group, int64_t stride, int64_t pad, int64_t dil,
                      const char *auto_pad) {
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    int64_t sx[4] = {2, 4, 5, 6};
    int64_t sw[4] = {6, 4 / group, 3, 2};
    gb_input(m, "x", OPQ_DTYPE_FLOAT, 4, sx);
    gb_input(m, "w", OPQ_DTYPE_FLOAT, 4, sw);
    gb_input(m, "b", OPQ_DTYPE_FLOAT, GB_SHAPE(6));
    struct opq_node *n = gb_node(m, "Conv", "x,w,b", "y");
    gb_attr_int(m, n, "group", group);
    gb_attr_ints(m, n, "strides", 2, (const int64_t[]){stride, stride});
    gb_attr_ints(m, n, "dilations", 2, (const int64_t[]){dil, dil});
    if (auto_pad)
        gb_attr_string(m, n, "auto_pad", auto_pad);
    else
        gb_attr_ints(m, n, "pads", 4, (const int64_t[]){pad, pad, pad, 0});
    gb_output(m, "y");
    float x[240];
    float w[144];
    float b[6];
    kx_fill(x, 240, 11, 1.0f);
    kx_fill(w, 144, 12, 1.0f);
    kx_fill(b, 6, 13, 1.0f);
    struct opq_named_tensor in[3] = {kx_f32("x", 4, sx, x), kx_f32("w", 4, sw, w),
                                     kx_f32("b", GB_SHAPE(6), b)};
    float *y = NULL;
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, in, 3, NULL, &ex), OPQ_OK);
    const struct opq_tensor *yt = opq_exec_value(ex, "y");
    int64_t oh = yt->shape[2], ow = yt->shape[3];
    int64_t pt = pad, pl = pad;
    if (auto_pad && strcmp(auto_pad, "SAME_UPPER") == 0) {
        int64_t th = (oh - 1) * stride + (3 - 1) * dil + 1 - 5;
        int64_t tw = (ow - 1) * stride + (2 - 1) * dil + 1 - 6;
        pt = (th > 0 ? th : 0) / 2;
        pl = (tw > 0 ? tw : 0) / 2;
        assert_int_equal(oh, (5 + stride - 1) / stride);
    }
    opq_exec_free(ex);
    kx_run(ctx, m, in, 3, 0, &y);
    int64_t cg = 4 / group, mg = 6 / group;
    for (int64_t i = 0; i < 2; i++)
        for (int64_t o = 0; o < 6; o++)
            for (int64_t r = 0; r < oh; r++)
                for (int64_t c = 0; c < ow; c++) {
                    double s = (double)b[o];
                    int64_t gr = o / mg;
                    for (int64_t ci = 0; ci < cg; ci++)
                        for (int64_t ki = 0; ki < 3; ki++)
                            for (int64_t kj = 0; kj < 2; kj++) {
                                int64_t ii = r * stride - pt + ki * dil;
                                int64_t jj = c * stride - pl + kj * dil;
                                if (ii < 0 || ii >= 5 || jj < 0 || jj >= 6)
                                    continue;
                                s += (double)x[((i * 4 + gr * cg + ci) * 5 + ii) * 6 + jj] *
                                     (double)w[((o * cg + ci) * 3 + ki) * 2 + kj];
                            }
                    kx_near(y[((i * 6 + o) * oh + r) * ow + c], s, 1e-5);
                }
    kx_check_grad(ctx, m, in, 3, NULL, 2e-3, 14);
    free(y);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_conv(void **state) {
    (void)state;
    conv_case(1, 1, 0, 1, NULL);
    conv_case(2, 2, 1, 1, NULL);
    conv_case(1, 1, 1, 2, NULL);
    conv_case(1, 2, 0, 1, "SAME_UPPER");
    conv_case(1, 1, 0, 1, "VALID");
}

static void test_misc(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1, 2, 2, 2));
    gb_init_f32(m, "lo", GB_SCALAR, (const float[]){-0.5f});
    gb_init_f32(m, "hi", GB_SCALAR, (const float[]){0.5f});
    gb_init_f32(m, "s", GB_SHAPE(2), (const float[]){1, 2});
    gb_init_f32(m, "bb", GB_SHAPE(2), (const float[]){0, 1});
    gb_init_f32(m, "mu", GB_SHAPE(2), (const float[]){1, -1});
    gb_init_f32(m, "var", GB_SHAPE(2), (const float[]){4, 0.25f});
    gb_node(m, "Clip", "x,lo,hi", "c");
    struct opq_node *bn = gb_node(m, "BatchNormalization", "c,s,bb,mu,var", "n");
    gb_attr_float(m, bn, "epsilon", 0.0f);
    gb_node(m, "GlobalAveragePool", "n", "y");
    gb_output(m, "y");
    float x[8] = {-1, 0, 0.25f, 1, 0, 0.5f, -0.5f, 0.25f};
    struct opq_named_tensor in = kx_f32("x", GB_SHAPE(1, 2, 2, 2), x);
    float *y = NULL;
    kx_run(ctx, m, &in, 1, 0, &y);
    // channel 0: clip -> -0.5, 0, 0.25, 0.5: mean -> 0.0625; bn: (v - 1)/2 * 1 + 0
    kx_near(y[0], (0.0625 - 1.0) / 2.0, 1e-6);
    // channel 1: 0, 0.5, -0.5, 0.25 -> mean 0.0625; (v + 1)/0.5 * 2 + 1
    kx_near(y[1], (0.0625 + 1.0) / 0.5 * 2.0 + 1.0, 1e-5);
    free(y);
    opq_model_free(m);
    // Clip VJP (away from the bounds) and GlobalAveragePool VJP
    m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3, 2, 2));
    gb_init_f32(m, "lo", GB_SCALAR, (const float[]){-0.6f});
    gb_init_f32(m, "hi", GB_SCALAR, (const float[]){0.7f});
    gb_node(m, "Clip", "x,lo,hi", "c");
    gb_node(m, "GlobalAveragePool", "c", "y");
    gb_output(m, "y");
    float x2[24];
    kx_fill(x2, 24, 15, 1.0f);
    struct opq_named_tensor in2 = kx_f32("x", GB_SHAPE(2, 3, 2, 2), x2);
    kx_check_grad(ctx, m, &in2, 1, NULL, 2e-3, 16);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sgemm_vs_ref),
        cmocka_unit_test(test_sgemm_blocked),
        cmocka_unit_test(test_sgemm_mt_deterministic),
        cmocka_unit_test(test_parallel_for),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_bad),
        cmocka_unit_test(test_gemm),
        cmocka_unit_test(test_conv),
        cmocka_unit_test(test_misc),
    };
    return cmocka_run_group_tests_name("k_linear", tests, NULL, NULL);
}
