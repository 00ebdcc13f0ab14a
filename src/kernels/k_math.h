/* k_math.h: helpers shared by the compute kernels (matmul, conv, binary, unary, softmax,
 * layernorm, reduce, norm_misc): node labels for messages, broadcast strides, a parallel-for
 * wrapper, and branch-free vectorisable expf/erff. Header-only (static inline), private to
 * src/kernels; the shape/layout kernels have their own k_lutil.h. */
#ifndef OPQ_K_MATH_H
#define OPQ_K_MATH_H

#include <string.h>

#include "arena.h"
#include "graph.h"
#include "kernel.h"
#include "threadpool.h"

// Compute kernels compile at O3 without FP-trap semantics from here on (GCC's O2 cost model
// declines to vectorise the elementwise loops, and trap semantics block if-converting the
// branch-free selects below); results are unchanged, no fast-math is involved. Hot loops also
// get an AVX2 clone (KU_HOT) picked at load time on CPUs that have it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC optimize("O3", "no-trapping-math")
#if !defined(__SANITIZE_ADDRESS__)
#define KU_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef KU_HOT
#define KU_HOT
#endif

// The node's name, or its first output's name when the node is nameless.
static inline const char *ku_name(const struct opq_node *n) {
    if (n->name && n->name[0])
        return n->name;
    for (int i = 0; i < n->n_outputs; i++)
        if (n->outputs[i])
            return n->outputs[i]->name;
    return "?";
}

static inline int64_t ku_numel(const struct opq_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

// Element strides of `in` seen through a broadcast to `out` (right-aligned; 0 where in has 1).
static inline void ku_bcast_strides(const struct opq_tensor *in, const struct opq_tensor *out,
                                    int64_t *strides) {
    int off = out->ndim - in->ndim;
    int64_t s = 1;
    for (int d = out->ndim - 1; d >= 0; d--) {
        int di = d - off;
        if (di < 0 || in->shape[di] == 1) {
            strides[d] = 0;
        } else {
            strides[d] = s;
        }
        if (di >= 0)
            s *= in->shape[di];
    }
}

// Offset of row `row` (all dims but the last, row-major over out's outer dims) given strides.
static inline int64_t ku_row_offset(const struct opq_tensor *out, const int64_t *strides,
                                    int64_t row) {
    int64_t off = 0;
    for (int d = out->ndim - 2; d >= 0; d--) {
        int64_t dim = out->shape[d];
        off += (row % dim) * strides[d];
        row /= dim;
    }
    return off;
}

static inline bool ku_same_shape(const struct opq_tensor *a, const struct opq_tensor *b) {
    if (a->ndim != b->ndim)
        return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i])
            return false;
    return true;
}

static inline void ku_copy_shape(struct opq_tensor *dst, const struct opq_tensor *src) {
    dst->ndim = src->ndim;
    memcpy(dst->shape, src->shape, sizeof(dst->shape));
}

// exp(x) in float without libm calls, branch-free so loops over it vectorise: n = round(x/ln2)
// by the 1.5*2^23 trick, r = x - n ln2 (two-part ln2), e^r by its degree-7 Taylor polynomial
// (|r| <= ln2/2: relative error < 1e-8 before float rounding), scaled by 2^n through the
// exponent bits. Inputs below -87.3 give 0 (denormal results are flushed); above 88.3 are
// clamped (callers never get there: softmax and GELU feed values <= 0).
static inline float ku_expf(float x0) {
    float x = x0 < -87.3f ? -87.3f : x0;
    x = x > 88.3f ? 88.3f : x;
    float t = x * 1.44269504f + 12582912.0f;
    float nf = t - 12582912.0f;
    float r = x - nf * 0.693145752f - nf * 1.42860677e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t n = (int32_t)nf;
    union {
        int32_t i;
        float f;
    } s = {.i = (n + 127) * (1 << 23)};
    return x0 < -87.3f ? 0.0f : p * s.f;
}

// erf(x) without libm calls, branch-free: |x| <= 1 uses the Maclaurin series through x^21
// (error < 2e-9); beyond, Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7 where erf > 0.84).
static inline float ku_erff(float x) {
    float a = x < 0.0f ? -x : x;
    float z = a * a;
    // 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)), Horner in z
    float p = -1.0f / (3628800.0f * 21.0f);
    p = p * z + 1.0f / (362880.0f * 19.0f);
    p = p * z - 1.0f / (40320.0f * 17.0f);
    p = p * z + 1.0f / (5040.0f * 15.0f);
    p = p * z - 1.0f / (720.0f * 13.0f);
    p = p * z + 1.0f / (120.0f * 11.0f);
    p = p * z - 1.0f / (24.0f * 9.0f);
    p = p * z + 1.0f / (6.0f * 7.0f);
    p = p * z - 1.0f / (2.0f * 5.0f);
    p = p * z + 1.0f / 3.0f;
    p = p * z - 1.0f;
    float small = -p * a * 1.12837917f;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float q = 1.061405429f;
    q = q * t - 1.453152027f;
    q = q * t + 1.421413741f;
    q = q * t - 0.284496736f;
    q = q * t + 0.254829592f;
    float big = 1.0f - q * t * ku_expf(-z);
    float v = a <= 1.0f ? small : big;
    return x < 0.0f ? -v : v;
}

// Runs fn over [0, n) on the kernel's pool (grain: minimum items per chunk).
static inline void ku_parallel(struct opq_kctx *k, int64_t n, int64_t grain, opq_range_fn fn,
                               void *user) {
    opq_parallel_for(k->pool, n, grain, fn, user);
}

#endif
