/* sgemm_peak.c: measures the single-precision GEMM throughput the executor gets (opq_sgemm_mt,
 * i.e. the library's own AVX-512 kernel or OpenBLAS): the ceiling a GEMM-bound forward can
 * reach. Built on the fly by bench_exec.sh against the build's libopq_core.a:
 *   sgemm_peak THREADS [N]   -> prints "sgemm_gflops <opq_sgemm_mt> <cblas_sgemm>" for an
 *                               N x N x N product (the second: OpenBLAS with THREADS threads). */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cblas.h>

#include "blas.h"
#include "opq.h"
#include "threadpool.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    int n = argc > 2 ? atoi(argv[2]) : 1536;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_threadpool *pool = threads > 1 ? opq_threadpool_new(ctx, threads) : NULL;
    opq_blas_set_threads(1);
    float *a = malloc(sizeof(float) * (size_t)n * (size_t)n);
    float *b = malloc(sizeof(float) * (size_t)n * (size_t)n);
    float *c = malloc(sizeof(float) * (size_t)n * (size_t)n);
    if (!ctx || !a || !b || !c)
        return 1;
    for (size_t i = 0; i < (size_t)n * (size_t)n; i++) {
        a[i] = (float)(i % 7) * 0.1f;
        b[i] = (float)(i % 5) * 0.2f;
    }
    double best = 0.0;
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        opq_sgemm_mt(pool, false, false, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double gf = 2.0 * (double)n * (double)n * (double)n / (now_s() - t0) * 1e-9;
        best = gf > best ? gf : best;
    }
    opq_blas_set_threads(threads);
    double blas = 0.0;
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c,
                    n);
        double gf = 2.0 * (double)n * (double)n * (double)n / (now_s() - t0) * 1e-9;
        blas = gf > blas ? gf : blas;
    }
    printf("sgemm_gflops %.1f %.1f\n", best, blas);
    free(a);
    free(b);
    free(c);
    opq_threadpool_free(pool);
    opq_ctx_free(ctx);
    return 0;
}
