/* test_k_gemm_mt.c: the pool-threaded GEMM (opq_sgemm_mt: operands packed once, tiles shared
 * by the threads) gives the same bytes as the single-threaded opq_sgemm for every transpose
 * combination, beta 0 / non-zero, alpha != 1, leading dims larger than the rows, depths over one
 * packing block and edge sizes that are not multiples of the register block; and both agree with
 * the double-accumulating reference within float rounding. */
#include "kx_fd.h"

#include "blas.h"
#include "threadpool.h"

static void check_case(struct opq_threadpool *pool, bool ta, bool tb, int64_t m, int64_t n,
                       int64_t k, float alpha, float beta) {
    int64_t lda = (ta ? m : k) + 3;
    int64_t ldb = (tb ? k : n) + 5;
    int64_t ldc = n + 2;
    int64_t ra = ta ? k : m;
    int64_t rb = tb ? n : k;
    float *a = malloc(sizeof(float) * (size_t)(ra * lda));
    float *b = malloc(sizeof(float) * (size_t)(rb * ldb));
    float *c0 = malloc(sizeof(float) * (size_t)(m * ldc));
    float *c1 = malloc(sizeof(float) * (size_t)(m * ldc));
    float *c2 = malloc(sizeof(float) * (size_t)(m * ldc));
    assert_true(a && b && c0 && c1 && c2);
    kx_fill(a, (size_t)(ra * lda), 41, 1.0f);
    kx_fill(b, (size_t)(rb * ldb), 42, 1.0f);
    kx_fill(c0, (size_t)(m * ldc), 43, 1.0f);
    memcpy(c1, c0, sizeof(float) * (size_t)(m * ldc));
    memcpy(c2, c0, sizeof(float) * (size_t)(m * ldc));
    opq_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c1, ldc);
    opq_sgemm_mt(pool, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c2, ldc);
    if (memcmp(c1, c2, sizeof(float) * (size_t)(m * ldc)) != 0)
        fail_msg("ta %d tb %d m %lld n %lld k %lld beta %g: threaded result differs", ta, tb,
                 (long long)m, (long long)n, (long long)k, (double)beta);
    opq_gemm_ref(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c0, ldc);
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < ldc; j++) {
            double want = (double)c0[i * ldc + j];
            kx_near(c2[i * ldc + j], want, 1e-4 * (double)k);
        }
    free(a);
    free(b);
    free(c0);
    free(c1);
    free(c2);
}

static void test_gemm_mt_matches_single(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    assert_non_null(ctx);
    for (int nt = 2; nt <= 3; nt++) {
        struct opq_threadpool *pool = opq_threadpool_new(ctx, nt);
        assert_non_null(pool);
        const int64_t shapes[][3] = {{197, 161, 300}, {301, 64, 197}, {37, 700, 600}, {130, 33, 7},
                                     {96, 128, 600}}; // whole slivers: A^T, B read in place
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
            for (int t = 0; t < 4; t++)
                check_case(pool, t & 1, (t >> 1) & 1, shapes[s][0], shapes[s][1], shapes[s][2],
                           t == 3 ? 0.5f : 1.0f, s % 2 ? 0.75f : 0.0f);
        opq_threadpool_free(pool);
    }
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm_mt_matches_single),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
