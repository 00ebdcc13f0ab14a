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
#include "kernels/k_vmath.h"

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

// Runs fn over [0, n) on the kernel's pool (grain: minimum items per chunk).
static inline void ku_parallel(struct opq_kctx *k, int64_t n, int64_t grain, opq_range_fn fn,
                               void *user) {
    opq_parallel_for(k->pool, n, grain, fn, user);
}

#endif
