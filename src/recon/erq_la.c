/* erq_la.c: double-precision GEMM, Gram updates and Cholesky solve for ERQ (see erq_la.h).
 * This is the only ERQ file that knows which BLAS/LAPACK is linked. LAPACK is Fortran: the
 * prototypes below follow its calling convention (everything by pointer, column-major). A
 * row-major symmetric matrix read as column-major is itself, so dpotrf('L') on our row-major
 * buffer factors it as U^T U with U in our upper triangle; and a row-major n x m right-hand side
 * is a column-major m x n matrix, so we solve with the transposed layout through a copy. */
#include "recon/erq_la.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef OPQ_BLAS_OPENBLAS
#include <cblas.h>

void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info);
void dpotrs_(const char *uplo, const int *n, const int *nrhs, const double *a, const int *lda,
             double *b, const int *ldb, int *info);
void openblas_set_num_threads(int n);

void opq_erq_dgemm(bool trans_a, bool trans_b, int m, int n, int k, double alpha, const double *a,
                   int lda, const double *b, int ldb, double beta, double *c, int ldc) {
    if (m <= 0 || n <= 0)
        return;
    cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void opq_erq_dsyrk_acc(int n, int k, const double *a, int lda, double *c, int ldc) {
    if (n <= 0 || k <= 0)
        return;
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, n, k, 1.0, a, lda, 1.0, c, ldc);
}

bool opq_erq_chol_solve(double *a, int n, double *b, int m) {
    int info = 0;
    if (n <= 0)
        return true;
    // Row-major upper == column-major lower.
    dpotrf_("L", &n, a, &n, &info);
    if (info != 0)
        return false;
    // B is row-major n x m; LAPACK wants column-major n x m: transpose through a copy.
    double *bt = malloc(sizeof(double) * (size_t)n * (size_t)(m > 0 ? m : 1));
    if (!bt)
        return false;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < m; j++)
            bt[(size_t)j * (size_t)n + (size_t)i] = b[(size_t)i * (size_t)m + (size_t)j];
    dpotrs_("L", &n, &m, a, &n, bt, &n, &info);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < m; j++)
            b[(size_t)i * (size_t)m + (size_t)j] = bt[(size_t)j * (size_t)n + (size_t)i];
    free(bt);
    return info == 0;
}

void opq_erq_la_threads(int n) {
    openblas_set_num_threads(n < 1 ? 1 : n);
}

#else // reference loops

void opq_erq_dgemm(bool trans_a, bool trans_b, int m, int n, int k, double alpha, const double *a,
                   int lda, const double *b, int ldb, double beta, double *c, int ldc) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int p = 0; p < k; p++)
                s += (trans_a ? a[(size_t)p * lda + i] : a[(size_t)i * lda + p]) *
                     (trans_b ? b[(size_t)j * ldb + p] : b[(size_t)p * ldb + j]);
            double *d = &c[(size_t)i * ldc + j];
            *d = alpha * s + (beta == 0.0 ? 0.0 : beta * *d);
        }
}

void opq_erq_dsyrk_acc(int n, int k, const double *a, int lda, double *c, int ldc) {
    for (int p = 0; p < k; p++) {
        const double *r = a + (size_t)p * lda;
        for (int i = 0; i < n; i++)
            for (int j = i; j < n; j++)
                c[(size_t)i * ldc + j] += r[i] * r[j];
    }
}

bool opq_erq_chol_solve(double *a, int n, double *b, int m) {
    // A = U^T U with U upper (row-major, in place).
    for (int i = 0; i < n; i++) {
        double d = a[(size_t)i * n + i];
        for (int p = 0; p < i; p++)
            d -= a[(size_t)p * n + i] * a[(size_t)p * n + i];
        if (!(d > 0.0))
            return false;
        d = sqrt(d);
        a[(size_t)i * n + i] = d;
        for (int j = i + 1; j < n; j++) {
            double s = a[(size_t)i * n + j];
            for (int p = 0; p < i; p++)
                s -= a[(size_t)p * n + i] * a[(size_t)p * n + j];
            a[(size_t)i * n + j] = s / d;
        }
    }
    for (int c = 0; c < m; c++) {
        for (int i = 0; i < n; i++) { // U^T y = b
            double s = b[(size_t)i * m + c];
            for (int p = 0; p < i; p++)
                s -= a[(size_t)p * n + i] * b[(size_t)p * m + c];
            b[(size_t)i * m + c] = s / a[(size_t)i * n + i];
        }
        for (int i = n - 1; i >= 0; i--) { // U x = y
            double s = b[(size_t)i * m + c];
            for (int p = i + 1; p < n; p++)
                s -= a[(size_t)i * n + p] * b[(size_t)p * m + c];
            b[(size_t)i * m + c] = s / a[(size_t)i * n + i];
        }
    }
    return true;
}

void opq_erq_la_threads(int n) {
    (void)n;
}

#endif
