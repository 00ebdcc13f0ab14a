/* blas.c: single-precision GEMM over cblas_sgemm (OpenBLAS) or a reference loop. This is the
 * only file that knows which BLAS is linked (OPQ_BLAS_OPENBLAS comes from CMake). */
#include "blas.h"

#include "base.h"

#ifdef OPQ_BLAS_OPENBLAS
#include <cblas.h>
#endif

void opq_gemm_ref(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                  const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                  int64_t ldc) {
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < n; j++) {
            double acc = 0.0;
            for (int64_t p = 0; p < k; p++) {
                float av = trans_a ? a[p * lda + i] : a[i * lda + p];
                float bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
                acc += (double)av * (double)bv;
            }
            float *cv = &c[i * ldc + j];
            // beta == 0 must ignore C (it may hold NaN garbage), as BLAS does
            double prev = beta == 0.0f ? 0.0 : (double)beta * (double)*cv;
            *cv         = (float)((double)alpha * acc + prev);
        }
    }
}

void opq_sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
               int64_t ldc) {
    if (m <= 0 || n <= 0)
        return;
#ifdef OPQ_BLAS_OPENBLAS
    if (k <= 0) {
        // BLAS leaves C scaled by beta when K == 0; do it here so every backend agrees.
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++)
                c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
        return;
    }
    OPQ_ASSERT(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX);
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n, (blasint)k, alpha, a,
                (blasint)lda, b, (blasint)ldb, beta, c, (blasint)ldc);
#else
    opq_gemm_ref(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

void opq_blas_set_threads(int n_threads) {
#ifdef OPQ_BLAS_OPENBLAS
    openblas_set_num_threads(n_threads < 1 ? 1 : n_threads);
#else
    (void)n_threads;
#endif
}

const char *opq_blas_name(void) {
#ifdef OPQ_BLAS_OPENBLAS
    return "openblas";
#else
    return "ref";
#endif
}
