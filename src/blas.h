/* blas.h: the one seam between the library and BLAS (STYLE 8.10). Row-major single-precision
 * GEMM only: C = alpha * op(A) * op(B) + beta * C, with op(X) = X or X^T.
 * A is M x K (K x M when trans_a), B is K x N (N x K when trans_b), C is M x N; lda/ldb/ldc are
 * row strides in elements. The backend (OpenBLAS or the reference loop) is chosen at build time
 * inside blas.c only. */
#ifndef OPQ_BLAS_H
#define OPQ_BLAS_H

#include <stdbool.h>
#include <stdint.h>

void opq_sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
               int64_t ldc);

// Naive triple loop with double accumulation: the reference tests compare opq_sgemm against.
void opq_gemm_ref(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                  const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                  int64_t ldc);

struct opq_threadpool;

// opq_sgemm split over the pool's threads (by rows of C, or by columns when C is short), each
// part a single-threaded BLAS call. Deterministic for a fixed thread count.
void opq_sgemm_mt(struct opq_threadpool *pool, bool trans_a, bool trans_b, int64_t m, int64_t n,
                  int64_t k, float alpha, const float *a, int64_t lda, const float *b, int64_t ldb,
                  float beta, float *c, int64_t ldc);

// Threads the BLAS backend may use for one call (no-op for the reference backend). The
// executor sets 1 and parallelises with its own pool, so BLAS and kernel threads never
// oversubscribe the cores.
void opq_blas_set_threads(int n_threads);
// "openblas" or "ref".
const char *opq_blas_name(void);

#endif
