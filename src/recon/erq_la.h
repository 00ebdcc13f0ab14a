/* erq_la.h: the double-precision linear algebra ERQ needs (internal to src/recon/erq*.c): GEMM,
 * rank-k Gram updates and the Cholesky solve. With OpenBLAS these are cblas_dgemm/cblas_dsyrk
 * and LAPACK's dpotrf/dpotrs; the reference build (OPQ_BLAS=ref) uses plain loops. */
#ifndef OPQ_ERQ_LA_H
#define OPQ_ERQ_LA_H

#include <stdbool.h>

// C (m x n) = alpha op(A) op(B) + beta C, row-major, op(X) = X or X^T (as opq_sgemm).
void opq_erq_dgemm(bool trans_a, bool trans_b, int m, int n, int k, double alpha, const double *a,
                   int lda, const double *b, int ldb, double beta, double *c, int ldc);

// Upper triangle of C (n x n, row-major, ldc) += A^T A for A (k x n, row-major, lda).
void opq_erq_dsyrk_acc(int n, int k, const double *a, int lda, double *c, int ldc);

// In-place Cholesky factor of the SPD matrix A (n x n, row-major; upper triangle read) and the
// solve of A X = B for B (n x m, row-major, overwritten by X). false if A is not positive
// definite.
bool opq_erq_chol_solve(double *a, int n, double *b, int m);

// Threads the double kernels may use (OpenBLAS); the executor keeps BLAS at one thread.
void opq_erq_la_threads(int n);

#endif
