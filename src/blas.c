/* blas.c: single-precision GEMM over cblas_sgemm (OpenBLAS) or a reference loop. This is the
 * only file that knows which BLAS is linked (OPQ_BLAS_OPENBLAS comes from CMake).
 *
 * On x86-64 CPUs with AVX-512 an own packed GEMM is used instead of OpenBLAS (whose kernel
 * choice may be pinned to AVX2 ones, e.g. OPENBLAS_CORETYPE=Haswell, or mis-detected on AMD Zen
 * 4): BLIS-style blocking (KC x NC panels of op(B), MC x KC blocks of op(A), both packed) around
 * a 12 x 32 register-blocked micro-kernel (24 zmm accumulators), masked stores at the N edge
 * and zero-padded A rows at the M edge. A row-major (untransposed) A is not packed: the kernel
 * broadcasts straight from its rows, and only a last partial sliver of rows is packed (packing
 * A cost ~6% of a ViT forward). With op(A) = A^T and both dimensions whole slivers (weight
 * gradients X^T dY), neither operand is packed: rows of A and of B are read in place. Each C element is summed in the same order whatever
 * M/N range a thread computes, so results do not depend on the thread count. With a thread
 * pool, both operands are packed once (in parallel, into the pool's workspace) and the threads
 * share C tiles (sgemm_avx512_mt), instead of each repacking all of op(B) for its rows. */
#include "blas.h"

#include <stdlib.h>
#include <string.h>

#include "base.h"
#include "threadpool.h"

#ifdef OPQ_BLAS_OPENBLAS
#include <cblas.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define OPQ_HAVE_AVX512_GEMM 1
#define T512 __attribute__((target("avx512f")))

#define MR 12  // micro-kernel rows
#define NR 32  // micro-kernel columns (two zmm)
#define KC 256 // packed depth
#define MC 144 // rows of A packed at once (L2)
#define NC 512 // columns of B packed at once (L2/L3)

// pack op(A)[i0:i0+mc, p0:p0+kc] as MR-row slivers, k-major: pa[(s*kc + k)*MR + r]
T512 static void pack_a(bool ta, const float *a, int64_t lda, int64_t i0, int64_t mc, int64_t p0,
                        int64_t kc, float *pa) {
    for (int64_t s = 0; s < mc; s += MR) {
        int64_t rows = mc - s < MR ? mc - s : MR;
        float *dst = pa + s * kc;
        for (int64_t k = 0; k < kc; k++) {
            for (int64_t r = 0; r < rows; r++) {
                int64_t i = i0 + s + r, p = p0 + k;
                dst[k * MR + r] = ta ? a[p * lda + i] : a[i * lda + p];
            }
            for (int64_t r = rows; r < MR; r++)
                dst[k * MR + r] = 0.0f;
        }
    }
}

// pack op(B)[p0:p0+kc, j0:j0+nc] as NR-column slivers: pb[(s*kc + k)*NR + c]
T512 static void pack_b(bool tb, const float *b, int64_t ldb, int64_t p0, int64_t kc, int64_t j0,
                        int64_t nc, float *pb) {
    for (int64_t s = 0; s < nc; s += NR) {
        int64_t cols = nc - s < NR ? nc - s : NR;
        float *dst = pb + s * kc;
        if (!tb && cols == NR) {
            for (int64_t k = 0; k < kc; k++) {
                const float *src = b + (p0 + k) * ldb + j0 + s;
                _mm512_storeu_ps(dst + k * NR, _mm512_loadu_ps(src));
                _mm512_storeu_ps(dst + k * NR + 16, _mm512_loadu_ps(src + 16));
            }
            continue;
        }
        for (int64_t k = 0; k < kc; k++) {
            for (int64_t c = 0; c < cols; c++) {
                int64_t p = p0 + k, j = j0 + s + c;
                dst[k * NR + c] = tb ? b[j * ldb + p] : b[p * ldb + j];
            }
            for (int64_t c = cols; c < NR; c++)
                dst[k * NR + c] = 0.0f;
        }
    }
}

// acc = A(MR x kc) * pb(kc x NR); C[rows, cols] = alpha*acc + beta*C. Element (r, k) of A is
// pa[k*sk + r*sr]: a packed sliver (sk = MR, sr = 1) or MR whole rows of a row-major A read in
// place (sk = 1, sr = lda), as MLAS does: only op(B) needs packing then. Both give every C
// element the same sums in the same order.
T512 static inline __attribute__((always_inline)) void
kernel_core(int64_t kc, const float *pa, int64_t sk, int64_t sr, const float *pb, int64_t sbk,
            float *c, int64_t ldc, int64_t rows, int64_t cols, float alpha, float beta) {
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
    __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
    __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
    __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
    __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps();
    __m512 c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
    __m512 c60 = _mm512_setzero_ps(), c61 = _mm512_setzero_ps();
    __m512 c70 = _mm512_setzero_ps(), c71 = _mm512_setzero_ps();
    __m512 c80 = _mm512_setzero_ps(), c81 = _mm512_setzero_ps();
    __m512 c90 = _mm512_setzero_ps(), c91 = _mm512_setzero_ps();
    __m512 ca0 = _mm512_setzero_ps(), ca1 = _mm512_setzero_ps();
    __m512 cb0 = _mm512_setzero_ps(), cb1 = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(pb + k * sbk);
        __m512 b1 = _mm512_loadu_ps(pb + k * sbk + 16);
        const float *ak = pa + k * sk;
        __m512 a;
#define ROW(r, x0, x1)                                                                             \
    a = _mm512_set1_ps(ak[(r) * sr]);                                                              \
    x0 = _mm512_fmadd_ps(a, b0, x0);                                                               \
    x1 = _mm512_fmadd_ps(a, b1, x1);
        ROW(0, c00, c01)
        ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31) ROW(4, c40, c41) ROW(5, c50, c51)
            ROW(6, c60, c61) ROW(7, c70, c71) ROW(8, c80, c81) ROW(9, c90, c91) ROW(10, ca0, ca1)
                ROW(11, cb0, cb1)
#undef ROW
    }
    __m512 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51},
                         {c60, c61}, {c70, c71}, {c80, c81}, {c90, c91}, {ca0, ca1}, {cb0, cb1}};
    __mmask16 m0 = cols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1);
    __mmask16 m1 = cols >= 32  ? (__mmask16)0xffff
                   : cols > 16 ? (__mmask16)((1u << (cols - 16)) - 1)
                               : (__mmask16)0;
    __m512 va = _mm512_set1_ps(alpha);
    __m512 vb = _mm512_set1_ps(beta);
    for (int64_t r = 0; r < rows; r++) {
        float *cr = c + r * ldc;
        __m512 x0 = _mm512_mul_ps(acc[r][0], va);
        __m512 x1 = _mm512_mul_ps(acc[r][1], va);
        if (beta != 0.0f) {
            x0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, cr), vb, x0);
            x1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, cr + 16), vb, x1);
        }
        _mm512_mask_storeu_ps(cr, m0, x0);
        _mm512_mask_storeu_ps(cr + 16, m1, x1);
    }
}

T512 static void kernel(int64_t kc, const float *pa, const float *pb, float *c, int64_t ldc,
                        int64_t rows, int64_t cols, float alpha, float beta) {
    kernel_core(kc, pa, MR, 1, pb, NR, c, ldc, rows, cols, alpha, beta);
}

// MR full rows of row-major A at a (leading dimension lda), unpacked
T512 static void kernel_direct(int64_t kc, const float *a, int64_t lda, const float *pb, float *c,
                               int64_t ldc, int64_t cols, float alpha, float beta) {
    kernel_core(kc, a, 1, lda, pb, NR, c, ldc, MR, cols, alpha, beta);
}

// A^T read in place (a: row p holds depth p of MR consecutive rows of op(A)), B read in place
// (b: row p holds NR consecutive columns), both with full slivers: nothing packed
T512 static void kernel_tn_direct(int64_t kc, const float *a, int64_t lda, const float *b,
                                  int64_t ldb, float *c, int64_t ldc, float alpha, float beta) {
    kernel_core(kc, a, lda, 1, b, ldb, c, ldc, MR, NR, alpha, beta);
}

T512 static void sgemm_avx512(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                              const float *a, int64_t lda, const float *b, int64_t ldb, float beta,
                              float *c, int64_t ldc, float *work) {
    float *pb = work; // KC*NC + MC*KC floats
    float *pa = work + KC * NC;
    for (int64_t j0 = 0; j0 < n; j0 += NC) {
        int64_t nc = n - j0 < NC ? n - j0 : NC;
        for (int64_t p0 = 0; p0 < k; p0 += KC) {
            int64_t kc = k - p0 < KC ? k - p0 : KC;
            float be = p0 == 0 ? beta : 1.0f;
            pack_b(tb, b, ldb, p0, kc, j0, nc, pb);
            for (int64_t i0 = 0; i0 < m; i0 += MC) {
                int64_t mc = m - i0 < MC ? m - i0 : MC;
                // row-major A: full slivers are read in place, only a partial one is packed
                int64_t full = ta ? 0 : mc / MR * MR;
                if (full < mc)
                    pack_a(ta, a, lda, i0 + full, mc - full, p0, kc, pa + full * kc);
                for (int64_t j = 0; j < nc; j += NR)
                    for (int64_t i = 0; i < mc; i += MR) {
                        float *ct = c + (i0 + i) * ldc + j0 + j;
                        int64_t cols = nc - j < NR ? nc - j : NR;
                        if (i < full)
                            kernel_direct(kc, a + (i0 + i) * lda + p0, lda, pb + j * kc, ct, ldc,
                                          cols, alpha, be);
                        else
                            kernel(kc, pa + i * kc, pb + j * kc, ct, ldc,
                                   mc - i < MR ? mc - i : MR, cols, alpha, be);
                    }
            }
        }
    }
}

// ---- threaded AVX-512 GEMM: both operands packed once into the pool's workspace --------------
//
// op(A) is packed as MR-row slivers over the whole depth (pa[(s*K + p)*MR + r]) and op(B) as
// NR-column slivers (pb[(t*K + p)*NR + c]), each sliver by one thread; then C is cut into
// MT_M x NC tiles computed by whichever thread claims them, each walking K in the same KC blocks
// as sgemm_avx512 with the same micro-kernel: every C element gets exactly the sums it gets from
// the single-threaded path, whatever the thread count.

#define MT_M 96 // rows of a C tile (8 slivers)

struct mt_gemm {
    bool ta, tb;
    int64_t m, n, k, lda, ldb, ldc;
    float alpha, beta;
    const float *a, *b;
    float *c;
    float *pa, *pb;
    int64_t sa, sb;     // slivers of A and of B
    int64_t tm, tn;     // tiles of C
    int64_t wn;         // columns of a C tile (a multiple of NR)
    bool tn_direct;     // op(A) = A^T and B in whole slivers: neither is packed
};

T512 static void mt_pack(void *user, int64_t s0, int64_t s1) {
    const struct mt_gemm *g = user;
    for (int64_t s = s0; s < s1; s++) {
        if (s < g->sa) {
            int64_t i0 = s * MR;
            int64_t rows = g->m - i0 < MR ? g->m - i0 : MR;
            if ((!g->ta && rows == MR) || g->tn_direct)
                continue; // read in place (kernel_direct, kernel_tn_direct)
            float *dst = g->pa + s * g->k * MR;
            for (int64_t p = 0; p < g->k; p++) {
                for (int64_t r = 0; r < rows; r++)
                    dst[p * MR + r] =
                        g->ta ? g->a[p * g->lda + i0 + r] : g->a[(i0 + r) * g->lda + p];
                for (int64_t r = rows; r < MR; r++)
                    dst[p * MR + r] = 0.0f;
            }
        } else {
            int64_t t = s - g->sa;
            int64_t j0 = t * NR;
            int64_t cols = g->n - j0 < NR ? g->n - j0 : NR;
            float *dst = g->pb + t * g->k * NR;
            if (g->tn_direct)
                continue; // read in place by kernel_tn_direct
            if (!g->tb && cols == NR) {
                for (int64_t p = 0; p < g->k; p++) {
                    const float *src = g->b + p * g->ldb + j0;
                    _mm512_storeu_ps(dst + p * NR, _mm512_loadu_ps(src));
                    _mm512_storeu_ps(dst + p * NR + 16, _mm512_loadu_ps(src + 16));
                }
                continue;
            }
            for (int64_t p = 0; p < g->k; p++) {
                for (int64_t c = 0; c < cols; c++)
                    dst[p * NR + c] =
                        g->tb ? g->b[(j0 + c) * g->ldb + p] : g->b[p * g->ldb + j0 + c];
                for (int64_t c = cols; c < NR; c++)
                    dst[p * NR + c] = 0.0f;
            }
        }
    }
}

T512 static void mt_tiles(void *user, int64_t t0, int64_t t1) {
    const struct mt_gemm *g = user;
    for (int64_t t = t0; t < t1; t++) {
        int64_t i0 = (t / g->tn) * MT_M;
        int64_t j0 = (t % g->tn) * g->wn;
        int64_t i1 = i0 + MT_M < g->m ? i0 + MT_M : g->m;
        int64_t j1 = j0 + g->wn < g->n ? j0 + g->wn : g->n;
        for (int64_t p0 = 0; p0 < g->k; p0 += KC) {
            int64_t kc = g->k - p0 < KC ? g->k - p0 : KC;
            float be = p0 == 0 ? g->beta : 1.0f;
            for (int64_t j = j0; j < j1; j += NR) {
                const float *pb = g->pb + (j / NR) * g->k * NR + p0 * NR;
                for (int64_t i = i0; i < i1; i += MR) {
                    int64_t cols = j1 - j < NR ? j1 - j : NR;
                    if (!g->ta && i + MR <= g->m) {
                        kernel_direct(kc, g->a + i * g->lda + p0, g->lda, pb,
                                      g->c + i * g->ldc + j, g->ldc, cols, g->alpha, be);
                        continue;
                    }
                    if (g->tn_direct) {
                        kernel_tn_direct(kc, g->a + p0 * g->lda + i, g->lda,
                                         g->b + p0 * g->ldb + j, g->ldb, g->c + i * g->ldc + j,
                                         g->ldc, g->alpha, be);
                        continue;
                    }
                    const float *pa = g->pa + (i / MR) * g->k * MR + p0 * MR;
                    kernel(kc, pa, pb, g->c + i * g->ldc + j, g->ldc, i1 - i < MR ? i1 - i : MR,
                           cols, g->alpha, be);
                }
            }
        }
    }
}

// false when the workspace cannot be had (the caller falls back to splitting the product)
static bool sgemm_avx512_mt(struct opq_threadpool *pool, bool ta, bool tb, int64_t m, int64_t n,
                            int64_t k, float alpha, const float *a, int64_t lda, const float *b,
                            int64_t ldb, float beta, float *c, int64_t ldc) {
    struct mt_gemm g = {ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, a, b, c, NULL, NULL,
                        (m + MR - 1) / MR, (n + NR - 1) / NR, (m + MT_M - 1) / MT_M,
                        (n + NC - 1) / NC, NC, ta && !tb && m % MR == 0 && n % NR == 0};
    // Few row tiles (a short, deep product such as a weight gradient): narrower column tiles of
    // equal width, so that the threads get equal shares (12 tiles of 96 x 512 on 2 threads left
    // one idle for a sixth of the time). Which thread computes a tile never changes its sums.
    int64_t want = 8 * (int64_t)opq_threadpool_size(pool);
    if (g.tm * g.tn < want) {
        int64_t tn = (want + g.tm - 1) / g.tm;
        int64_t wn = ((g.sb + tn - 1) / tn) * NR;
        g.wn = wn < NC ? wn : NC;
        g.tn = (n + g.wn - 1) / g.wn;
    }
    size_t fa = (size_t)g.sa * MR * (size_t)k;
    size_t fb = (size_t)g.sb * NR * (size_t)k;
    float *ws = opq_threadpool_workspace(pool, (fa + fb) * sizeof(float) + 64);
    if (!ws)
        return false;
    g.pa = ws;
    g.pb = ws + fa;
    opq_parallel_for(pool, g.sa + g.sb, 4, mt_pack, &g);
    opq_parallel_for(pool, g.tm * g.tn, 1, mt_tiles, &g);
    return true;
}

static bool use_avx512(void) {
    return __builtin_cpu_supports("avx512f");
}
#else
static bool use_avx512(void) {
    return false;
}
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
            *cv = (float)((double)alpha * acc + prev);
        }
    }
}

void opq_sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
               int64_t ldc) {
    if (m <= 0 || n <= 0)
        return;
    if (k <= 0) {
        // BLAS leaves C scaled by beta when K == 0; do it here so every backend agrees.
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++)
                c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
        return;
    }
#ifdef OPQ_HAVE_AVX512_GEMM
    if (use_avx512()) {
        // packing space on the stack (672 KiB): no allocation, no page faults after first use
        _Alignas(64) float work[KC * NC + MC * KC];
        sgemm_avx512(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, work);
        return;
    }
#endif
#ifdef OPQ_BLAS_OPENBLAS
    OPQ_ASSERT(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX);
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n, (blasint)k, alpha, a,
                (blasint)lda, b, (blasint)ldb, beta, c, (blasint)ldc);
#else
    opq_gemm_ref(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

struct gemm_job {
    bool ta, tb, split_rows;
    int64_t m, n, k, lda, ldb, ldc;
    float alpha, beta;
    const float *a, *b;
    float *c;
};

// Chunk [i0, i1) of 16-wide blocks of rows (or columns) of C.
static void gemm_part(void *user, int64_t i0, int64_t i1) {
    const struct gemm_job *j = user;
    int64_t total = j->split_rows ? j->m : j->n;
    int64_t lo = i0 * 16;
    int64_t hi = i1 * 16 < total ? i1 * 16 : total;
    if (lo >= hi)
        return;
    if (j->split_rows)
        opq_sgemm(j->ta, j->tb, hi - lo, j->n, j->k, j->alpha,
                  j->ta ? j->a + lo : j->a + lo * j->lda, j->lda, j->b, j->ldb, j->beta,
                  j->c + lo * j->ldc, j->ldc);
    else
        opq_sgemm(j->ta, j->tb, j->m, hi - lo, j->k, j->alpha, j->a, j->lda,
                  j->tb ? j->b + lo * j->ldb : j->b + lo, j->ldb, j->beta, j->c + lo, j->ldc);
}

void opq_sgemm_mt(struct opq_threadpool *pool, bool trans_a, bool trans_b, int64_t m, int64_t n,
                  int64_t k, float alpha, const float *a, int64_t lda, const float *b, int64_t ldb,
                  float beta, float *c, int64_t ldc) {
    int nt = opq_threadpool_size(pool);
    // small products are not worth a fork/join
    if (nt <= 1 || (double)m * (double)n * (double)k < 4e6) {
        opq_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
#ifdef OPQ_HAVE_AVX512_GEMM
    if (use_avx512() && k > 0 && m > 0 && n > 0 &&
        sgemm_avx512_mt(pool, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc))
        return;
#endif
    struct gemm_job j = {
        trans_a, trans_b, m >= n || m >= 64 * nt, m, n, k, lda, ldb, ldc, alpha, beta, a, b, c};
    int64_t blocks = ((j.split_rows ? m : n) + 15) / 16;
    opq_parallel_for(pool, blocks, 1, gemm_part, &j);
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
