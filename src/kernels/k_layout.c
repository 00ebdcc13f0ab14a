/* k_layout.c: ops that move elements around without arithmetic.
 *
 *   Transpose      https://onnx.ai/onnx/operators/onnx__Transpose.html   perm (default: reverse)
 *   Concat         https://onnx.ai/onnx/operators/onnx__Concat.html      axis (negative ok, 4+)
 *   Split          https://onnx.ai/onnx/operators/onnx__Split.html       split attribute (< 13)
 *                  or input (13+), num_outputs (18: ceil-sized chunks, the last smaller)
 *   Slice          https://onnx.ai/onnx/operators/onnx__Slice.html       attributes (< 10) or
 *                  inputs starts/ends/axes/steps (10+); clamping as in the spec
 *   Gather         https://onnx.ai/onnx/operators/onnx__Gather.html      negative indices ok
 *   GatherElements https://onnx.ai/onnx/operators/onnx__GatherElements.html
 *   Tile           https://onnx.ai/onnx/operators/onnx__Tile.html
 *   Pad            https://onnx.ai/onnx/operators/onnx__Pad.html         constant/reflect/edge/wrap;
 *                  pads attribute (< 11) or input (11+), axes input (18)
 *   Trilu          https://onnx.ai/onnx/operators/onnx__Trilu.html
 *
 * Elements are moved as raw bytes (any non-packed dtype). VJPs (float32): Transpose applies the
 * inverse permutation; Concat splits dY and Split concatenates the dY_i (zeros for unused outputs);
 * Slice scatters dY into a zero dX; Gather scatter-adds dY rows into dX (double accumulation). */
#include <string.h>

#include "arena.h"
#include "graph.h"
#include "k_lutil.h"
#include "threadpool.h"

static enum opq_status bad(struct opq_kctx *k, const struct opq_node *n, enum opq_status st,
                           const char *what) {
    return opq_set_error(k->ctx, st, OPQ_KL_NODE_FMT ": %s", OPQ_KL_NODE(n), what);
}

static enum opq_status plain_dtype(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *t) {
    if (t->ndim < 0)
        return bad(k, n, OPQ_ERR_SHAPE, "input rank is unknown");
    if (opq_dtype_size(t->dtype) == 0 && t->dtype != OPQ_DTYPE_STRING)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": dtype %s",
                             OPQ_KL_NODE(n), opq_dtype_name(t->dtype));
    return OPQ_OK;
}

static size_t elem_size(enum opq_dtype dt) {
    return dt == OPQ_DTYPE_STRING ? sizeof(struct opq_bytes) : opq_dtype_size(dt);
}

static void *scratch(struct opq_kctx *k, const struct opq_node *n, size_t bytes) {
    void *p = opq_arena_alloc(k->scratch, bytes ? bytes : 1);
    if (!p)
        opq_set_error(k->ctx, OPQ_ERR_NOMEM, OPQ_KL_NODE_FMT ": out of memory", OPQ_KL_NODE(n));
    return p;
}

// ---- strided copies (Transpose, Slice) ----------------------------------------------------------
//
// out (contiguous, shape oshape) [i] = src[base + sum(idx[d] * istr[d])]. The copy is planned
// once: size-1 dims are dropped and output dims that are contiguous in the input are merged.
// Then, when the innermost input stride is 1, whole rows are copied with memcpy; when another
// dim has input stride 1, the copy is a batch of 2-D transposes done in 16 x 16 tiles (both
// sides touch whole cache lines); otherwise elements are copied one by one. Work is split over
// the thread pool by outer rows (each element is written once: the result does not depend on
// the thread count).

#define SG_TILE 16

struct sg_plan {
    int r;                       // merged rank (>= 1)
    int64_t shape[OPQ_MAX_DIMS]; // merged output shape
    int64_t istr[OPQ_MAX_DIMS];  // input strides (elements) per merged output dim
    int64_t ostr[OPQ_MAX_DIMS];  // output strides (contiguous)
    int64_t base;
    size_t es;
    int p;          // tiled mode: the output dim with input stride 1 (< r - 1), else -1
    int64_t rows;   // work items
    char *dst;
    const char *src;
};

static void sg_plan_make(struct sg_plan *sp, char *dst, const char *src, size_t es, int ndim,
                         const int64_t *oshape, const int64_t *istr, int64_t base) {
    sp->r = 0;
    for (int d = 0; d < ndim; d++) {
        if (oshape[d] == 1)
            continue;
        if (sp->r > 0 && sp->istr[sp->r - 1] == istr[d] * oshape[d]) {
            sp->shape[sp->r - 1] *= oshape[d];
            sp->istr[sp->r - 1] = istr[d];
            continue;
        }
        sp->shape[sp->r] = oshape[d];
        sp->istr[sp->r] = istr[d];
        sp->r++;
    }
    if (sp->r == 0) {
        sp->shape[0] = 1;
        sp->istr[0] = 1;
        sp->r = 1;
    }
    int64_t s = 1;
    for (int d = sp->r - 1; d >= 0; d--) {
        sp->ostr[d] = s;
        s *= sp->shape[d];
    }
    sp->base = base;
    sp->es = es;
    sp->dst = dst;
    sp->src = src;
    sp->p = -1;
    int r = sp->r;
    if (sp->istr[r - 1] != 1 && r >= 2)
        for (int d = r - 2; d >= 0; d--)
            if (sp->istr[d] == 1) {
                sp->p = d;
                break;
            }
    // rows: every dim but the last (row mode), or but p and the last with p in tiles (tiled)
    sp->rows = 1;
    for (int d = 0; d < r - 1; d++)
        sp->rows *= d == sp->p ? (sp->shape[d] + SG_TILE - 1) / SG_TILE : sp->shape[d];
}

// Output and input offsets of the first element of work item `row`; *p0 the tile's start in
// dim p (tiled mode).
static void sg_row_offsets(const struct sg_plan *sp, int64_t row, int64_t *oo, int64_t *io,
                           int64_t *p0) {
    *oo = 0;
    *io = sp->base;
    *p0 = 0;
    for (int d = sp->r - 2; d >= 0; d--) {
        int64_t dim = d == sp->p ? (sp->shape[d] + SG_TILE - 1) / SG_TILE : sp->shape[d];
        int64_t c = row % dim;
        row /= dim;
        if (d == sp->p) {
            c *= SG_TILE;
            *p0 = c;
        }
        *oo += c * sp->ostr[d];
        *io += c * sp->istr[d];
    }
}

static void sg_rows(void *user, int64_t r0, int64_t r1) {
    const struct sg_plan *sp = user;
    size_t es = sp->es;
    int last = sp->r - 1;
    int64_t n = sp->shape[last];
    int64_t is = sp->istr[last];
    for (int64_t row = r0; row < r1; row++) {
        int64_t oo;
        int64_t io;
        int64_t p0;
        sg_row_offsets(sp, row, &oo, &io, &p0);
        char *d = sp->dst + oo * (int64_t)es;
        const char *s = sp->src + io * (int64_t)es;
        if (is == 1) {
            memcpy(d, s, (size_t)n * es);
        } else if (sp->p < 0) {
            for (int64_t j = 0; j < n; j++)
                memcpy(d + j * (int64_t)es, s + j * is * (int64_t)es, es);
        } else {
            // tile rows i in [p0, p0 + m) of dim p (input stride 1), columns j of the last dim
            int64_t m = sp->shape[sp->p] - p0 < SG_TILE ? sp->shape[sp->p] - p0 : SG_TILE;
            int64_t os = sp->ostr[sp->p];
            for (int64_t j0 = 0; j0 < n; j0 += SG_TILE) {
                int64_t nj = n - j0 < SG_TILE ? n - j0 : SG_TILE;
                if (es == 4) {
                    uint32_t *dd = (uint32_t *)(void *)d;
                    const uint32_t *ss = (const uint32_t *)(const void *)s;
                    for (int64_t j = j0; j < j0 + nj; j++)
                        for (int64_t i = 0; i < m; i++)
                            dd[i * os + j] = ss[i + j * is];
                } else {
                    for (int64_t j = j0; j < j0 + nj; j++)
                        for (int64_t i = 0; i < m; i++)
                            memcpy(d + (i * os + j) * (int64_t)es, s + (i + j * is) * (int64_t)es,
                                   es);
                }
            }
        }
    }
}

// Copies every element of the output (shape oshape) from src at offset sum(idx[d]*istr[d]).
static void strided_gather(struct opq_threadpool *pool, char *dst, const char *src, size_t es,
                           int ndim, const int64_t *oshape, const int64_t *istr, int64_t base) {
    struct sg_plan sp;
    for (int d = 0; d < ndim; d++)
        if (oshape[d] == 0)
            return;
    sg_plan_make(&sp, dst, src, es, ndim, oshape, istr, base);
    // rows per chunk: at least ~32 KiB of output
    int64_t row_bytes = sp.shape[sp.r - 1] * (int64_t)es * (sp.p >= 0 ? SG_TILE : 1);
    int64_t grain = row_bytes >= 32768 ? 1 : 32768 / (row_bytes ? row_bytes : 1);
    opq_parallel_for(pool, sp.rows, grain, sg_rows, &sp);
}

// ---- Transpose ----------------------------------------------------------------------------------

static enum opq_status get_perm(struct opq_kctx *k, const struct opq_node *n, int r, int *perm) {
    int64_t p[OPQ_MAX_DIMS];
    size_t cnt = 0;
    bool seen[OPQ_MAX_DIMS] = {false};
    enum opq_status st = opq_kl_attr_ints(k, n, "perm", p, OPQ_MAX_DIMS, &cnt, NULL);
    if (st)
        return st;
    if (cnt == 0) {
        for (int d = 0; d < r; d++)
            perm[d] = r - 1 - d;
        return OPQ_OK;
    }
    if ((int)cnt != r)
        return bad(k, n, OPQ_ERR_SHAPE, "perm length differs from the input rank");
    for (int d = 0; d < r; d++) {
        if (p[d] < 0 || p[d] >= r || seen[p[d]])
            return bad(k, n, OPQ_ERR_INVALID_MODEL, "perm is not a permutation");
        seen[p[d]] = true;
        perm[d] = (int)p[d];
    }
    return OPQ_OK;
}

static enum opq_status transpose_infer(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in, struct opq_tensor *out) {
    int perm[OPQ_MAX_DIMS];
    enum opq_status st = plain_dtype(k, n, in[0]);
    if (!st)
        st = get_perm(k, n, in[0]->ndim, perm);
    if (st)
        return st;
    out->dtype = in[0]->dtype;
    out->ndim = in[0]->ndim;
    for (int d = 0; d < out->ndim; d++)
        out->shape[d] = in[0]->shape[perm[d]];
    return opq_kl_finish(k, n, out);
}

// dst (shape ishape permuted by perm) = src (shape ishape) transposed.
static void permute(struct opq_threadpool *pool, char *dst, const char *src, size_t es, int r,
                    const int64_t *ishape, const int *perm) {
    int64_t istr[OPQ_MAX_DIMS];
    int64_t pstr[OPQ_MAX_DIMS];
    int64_t oshape[OPQ_MAX_DIMS];
    opq_kl_strides(r, ishape, istr);
    for (int d = 0; d < r; d++) {
        pstr[d] = istr[perm[d]];
        oshape[d] = ishape[perm[d]];
    }
    strided_gather(pool, dst, src, es, r, oshape, pstr, 0);
}

static enum opq_status transpose_forward(struct opq_kctx *k, const struct opq_node *n,
                                         const struct opq_tensor *const *in,
                                         struct opq_tensor *out) {
    int perm[OPQ_MAX_DIMS];
    enum opq_status st = get_perm(k, n, in[0]->ndim, perm);
    if (!st)
        permute(k->pool, out->data, in[0]->data, elem_size(in[0]->dtype), in[0]->ndim,
                in[0]->shape, perm);
    return st;
}

static enum opq_status transpose_backward(struct opq_kctx *k, const struct opq_node *n,
                                          const struct opq_tensor *const *in,
                                          const struct opq_tensor *out,
                                          const struct opq_tensor *dout, struct opq_tensor *din) {
    int perm[OPQ_MAX_DIMS];
    int inv[OPQ_MAX_DIMS];
    if (!din[0].data)
        return OPQ_OK;
    if (!dout[0].data) {
        memset(din[0].data, 0, din[0].nbytes);
        return OPQ_OK;
    }
    enum opq_status st = get_perm(k, n, in[0]->ndim, perm);
    if (st)
        return st;
    for (int d = 0; d < in[0]->ndim; d++)
        inv[perm[d]] = d;
    permute(k->pool, din[0].data, dout[0].data, sizeof(float), out[0].ndim, out[0].shape,
            inv);
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_transpose = {
    .infer    = transpose_infer,
    .forward  = transpose_forward,
    .backward = transpose_backward,
};

// ---- Concat -------------------------------------------------------------------------------------

static enum opq_status concat_infer(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (n->n_inputs < 1 || !in[0])
        return bad(k, n, OPQ_ERR_INVALID_MODEL, "needs at least one input");
    enum opq_status st = plain_dtype(k, n, in[0]);
    if (st)
        return st;
    int r = in[0]->ndim;
    int axis = 0;
    if (!opq_axis_norm(opq_node_attr_int(n, "axis", 0), r, &axis))
        return bad(k, n, OPQ_ERR_SHAPE, "axis out of range");
    *out = *in[0];
    out->data = NULL;
    out->shape[axis] = 0;
    for (int i = 0; i < n->n_inputs; i++) {
        const struct opq_tensor *t = in[i];
        if (!t)
            return bad(k, n, OPQ_ERR_INVALID_MODEL, "an input is missing");
        if (t->ndim != r || t->dtype != in[0]->dtype)
            return bad(k, n, OPQ_ERR_SHAPE, "inputs differ in rank or dtype");
        for (int d = 0; d < r; d++) {
            if (d == axis)
                continue;
            if (t->shape[d] != out->shape[d] && t->shape[d] >= 0 && out->shape[d] >= 0)
                return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                     OPQ_KL_NODE_FMT ": input %d dim %d is %lld, expected %lld",
                                     OPQ_KL_NODE(n), i, d, (long long)t->shape[d],
                                     (long long)out->shape[d]);
        }
        if (out->shape[axis] >= 0)
            out->shape[axis] = t->shape[axis] < 0 ? -1 : out->shape[axis] + t->shape[axis];
    }
    return opq_kl_finish(k, n, out);
}

// Outer count and the byte length of one row of a tensor at `axis` (row = shape[axis..]).
static void outer_row(const struct opq_tensor *t, int axis, size_t es, size_t *outer, size_t *row) {
    size_t o = 1;
    size_t r = es;
    for (int d = 0; d < t->ndim; d++) {
        if (d < axis)
            o *= (size_t)t->shape[d];
        else
            r *= (size_t)t->shape[d];
    }
    *outer = o;
    *row = r;
}

// Concatenates (dir = 0) or splits (dir = 1) `cnt` parts along axis into/out of `whole`.
// Parts with NULL data are skipped when splitting and read as zeros when concatenating.
static void concat_split(struct opq_tensor *whole, struct opq_tensor *const *parts, int cnt,
                         int axis, int dir) {
    size_t es = elem_size(whole->dtype);
    size_t outer = 0;
    size_t wrow = 0;
    outer_row(whole, axis, es, &outer, &wrow);
    size_t pos = 0;
    for (int i = 0; i < cnt; i++) {
        size_t po = 0;
        size_t prow = 0;
        outer_row(parts[i], axis, es, &po, &prow);
        char *w = (char *)whole->data + pos;
        char *p = parts[i]->data;
        for (size_t o = 0; o < outer && prow; o++) {
            if (dir == 1 && p)
                memcpy(p + o * prow, w + o * wrow, prow);
            else if (dir == 0 && p)
                memcpy(w + o * wrow, p + o * prow, prow);
            else if (dir == 0)
                memset(w + o * wrow, 0, prow);
        }
        pos += prow;
    }
}

static enum opq_status concat_forward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out) {
    int axis = 0;
    opq_axis_norm(opq_node_attr_int(n, "axis", 0), out->ndim, &axis);
    struct opq_tensor **parts = scratch(k, n, (size_t)n->n_inputs * sizeof(*parts));
    if (!parts)
        return OPQ_ERR_NOMEM;
    for (int i = 0; i < n->n_inputs; i++)
        parts[i] = (struct opq_tensor *)in[i]; // read only when concatenating
    concat_split(out, parts, n->n_inputs, axis, 0);
    return OPQ_OK;
}

static enum opq_status concat_backward(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in,
                                       const struct opq_tensor *out, const struct opq_tensor *dout,
                                       struct opq_tensor *din) {
    int axis = 0;
    opq_axis_norm(opq_node_attr_int(n, "axis", 0), out[0].ndim, &axis);
    if (!dout[0].data) {
        for (int i = 0; i < n->n_inputs; i++)
            if (din[i].data)
                memset(din[i].data, 0, din[i].nbytes);
        return OPQ_OK;
    }
    struct opq_tensor **parts = scratch(k, n, (size_t)n->n_inputs * sizeof(*parts));
    struct opq_tensor *gi = scratch(k, n, (size_t)n->n_inputs * sizeof(*gi));
    if (!parts || !gi)
        return OPQ_ERR_NOMEM;
    for (int i = 0; i < n->n_inputs; i++) {
        gi[i] = *in[i]; // shapes from the forward inputs, data from din (NULL: not wanted)
        gi[i].dtype = OPQ_DTYPE_FLOAT;
        gi[i].data = din[i].data;
        parts[i] = &gi[i];
    }
    struct opq_tensor g = dout[0];
    g.dtype = OPQ_DTYPE_FLOAT;
    concat_split(&g, parts, n->n_inputs, axis, 1);
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_concat = {
    .min_opset = 4,
    .infer     = concat_infer,
    .forward   = concat_forward,
    .backward  = concat_backward,
};

// ---- Split --------------------------------------------------------------------------------------

#define SPLIT_MAX 4096

static enum opq_status split_sizes(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, int *axis, int64_t *sizes) {
    const struct opq_tensor *x = in[0];
    size_t cnt = 0;
    bool given = false;
    enum opq_status st = plain_dtype(k, n, x);
    if (st)
        return st;
    if (!opq_axis_norm(opq_node_attr_int(n, "axis", 0), x->ndim, axis))
        return bad(k, n, OPQ_ERR_SHAPE, "axis out of range");
    if (n->n_outputs > SPLIT_MAX)
        return bad(k, n, OPQ_ERR_UNSUPPORTED, "too many outputs");
    if (n->n_inputs > 1 && in[1]) {
        given = true;
        st = opq_kl_read_ints(k, n, in[1], "split", sizes, SPLIT_MAX, &cnt);
    } else {
        st = opq_kl_attr_ints(k, n, "split", sizes, SPLIT_MAX, &cnt, &given);
    }
    if (st)
        return st;
    int64_t dim = x->shape[*axis];
    if (given) {
        int64_t sum = 0;
        if ((int)cnt != n->n_outputs)
            return bad(k, n, OPQ_ERR_SHAPE, "split has a length different from the outputs");
        for (size_t i = 0; i < cnt; i++) {
            if (sizes[i] < 0)
                return bad(k, n, OPQ_ERR_SHAPE, "negative split size");
            sum += sizes[i];
        }
        if (dim >= 0 && sum != dim)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 OPQ_KL_NODE_FMT ": split sums to %lld, axis has %lld",
                                 OPQ_KL_NODE(n), (long long)sum, (long long)dim);
        return OPQ_OK;
    }
    int64_t parts = opq_node_attr_int(n, "num_outputs", n->n_outputs);
    if (parts != n->n_outputs || parts < 1)
        return bad(k, n, OPQ_ERR_SHAPE, "num_outputs differs from the output count");
    if (dim < 0)
        return bad(k, n, OPQ_ERR_UNSUPPORTED, "split axis size is unknown");
    int64_t chunk = (dim + parts - 1) / parts;
    if (dim % parts != 0 && !opq_node_attr(n, "num_outputs"))
        return bad(k, n, OPQ_ERR_SHAPE, "axis does not divide evenly into the outputs");
    for (int64_t i = 0, left = dim; i < parts; i++) {
        sizes[i] = left < chunk ? left : chunk;
        left -= sizes[i];
    }
    return OPQ_OK;
}

static enum opq_status split_infer(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    int axis = 0;
    int64_t *sizes = scratch(k, n, SPLIT_MAX * sizeof(int64_t));
    enum opq_status st = sizes ? split_sizes(k, n, in, &axis, sizes) : OPQ_ERR_NOMEM;
    for (int i = 0; !st && i < n->n_outputs; i++) {
        out[i] = *in[0];
        out[i].data = NULL;
        out[i].shape[axis] = sizes[i];
        st = opq_kl_finish(k, n, &out[i]);
    }
    return st;
}

static enum opq_status split_forward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    int axis = 0;
    opq_axis_norm(opq_node_attr_int(n, "axis", 0), in[0]->ndim, &axis);
    struct opq_tensor **parts = scratch(k, n, (size_t)n->n_outputs * sizeof(*parts));
    if (!parts)
        return OPQ_ERR_NOMEM;
    for (int i = 0; i < n->n_outputs; i++)
        parts[i] = &out[i];
    struct opq_tensor whole = *in[0];
    concat_split(&whole, parts, n->n_outputs, axis, 1);
    return OPQ_OK;
}

static enum opq_status split_backward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in,
                                      const struct opq_tensor *out, const struct opq_tensor *dout,
                                      struct opq_tensor *din) {
    if (!din[0].data)
        return OPQ_OK;
    int axis = 0;
    opq_axis_norm(opq_node_attr_int(n, "axis", 0), in[0]->ndim, &axis);
    struct opq_tensor **parts = scratch(k, n, (size_t)n->n_outputs * sizeof(*parts));
    struct opq_tensor *g = scratch(k, n, (size_t)n->n_outputs * sizeof(*g));
    if (!parts || !g)
        return OPQ_ERR_NOMEM;
    for (int i = 0; i < n->n_outputs; i++) {
        g[i] = out[i];
        g[i].dtype = OPQ_DTYPE_FLOAT;
        g[i].data = dout[i].data; // NULL reads as zeros
        parts[i] = &g[i];
    }
    struct opq_tensor whole = din[0];
    whole.dtype = OPQ_DTYPE_FLOAT;
    concat_split(&whole, parts, n->n_outputs, axis, 0);
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_split = {
    .min_opset = 2,
    .infer     = split_infer,
    .forward   = split_forward,
    .backward  = split_backward,
};

// ---- Slice --------------------------------------------------------------------------------------

struct slice_plan {
    int64_t start[OPQ_MAX_DIMS];
    int64_t step[OPQ_MAX_DIMS];
    int64_t count[OPQ_MAX_DIMS];
};

static enum opq_status slice_plan(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct slice_plan *p) {
    const struct opq_tensor *x = in[0];
    int64_t starts[OPQ_MAX_DIMS];
    int64_t ends[OPQ_MAX_DIMS];
    int64_t axes[OPQ_MAX_DIMS];
    int64_t steps[OPQ_MAX_DIMS];
    size_t ns = 0;
    size_t ne = 0;
    size_t na = 0;
    size_t nst = 0;
    bool has_axes = false;
    enum opq_status st = plain_dtype(k, n, x);
    if (st)
        return st;
    if (n->n_inputs >= 3) {
        st = opq_kl_read_ints(k, n, in[1], "starts", starts, OPQ_MAX_DIMS, &ns);
        if (!st)
            st = opq_kl_read_ints(k, n, in[2], "ends", ends, OPQ_MAX_DIMS, &ne);
        if (!st && n->n_inputs > 3 && in[3]) {
            has_axes = true;
            st = opq_kl_read_ints(k, n, in[3], "axes", axes, OPQ_MAX_DIMS, &na);
        }
        if (!st && n->n_inputs > 4 && in[4])
            st = opq_kl_read_ints(k, n, in[4], "steps", steps, OPQ_MAX_DIMS, &nst);
    } else {
        st = opq_kl_attr_ints(k, n, "starts", starts, OPQ_MAX_DIMS, &ns, NULL);
        if (!st)
            st = opq_kl_attr_ints(k, n, "ends", ends, OPQ_MAX_DIMS, &ne, NULL);
        if (!st)
            st = opq_kl_attr_ints(k, n, "axes", axes, OPQ_MAX_DIMS, &na, &has_axes);
    }
    if (st)
        return st;
    if (ns != ne || (has_axes && na != ns) || (nst && nst != ns))
        return bad(k, n, OPQ_ERR_SHAPE, "starts/ends/axes/steps differ in length");
    for (int d = 0; d < x->ndim; d++) {
        p->start[d] = 0;
        p->step[d] = 1;
        p->count[d] = x->shape[d];
    }
    bool seen[OPQ_MAX_DIMS] = {false};
    for (size_t i = 0; i < ns; i++) {
        int a = (int)i;
        if (has_axes && !opq_axis_norm(axes[i], x->ndim, &a))
            return bad(k, n, OPQ_ERR_SHAPE, "axis out of range");
        if (a >= x->ndim || seen[a])
            return bad(k, n, OPQ_ERR_SHAPE, "too many or repeated axes");
        seen[a] = true;
        int64_t dim = x->shape[a];
        int64_t step = nst ? steps[i] : 1;
        if (step == 0)
            return bad(k, n, OPQ_ERR_SHAPE, "step is 0");
        if (dim < 0)
            return bad(k, n, OPQ_ERR_UNSUPPORTED, "sliced dim is unknown");
        int64_t s = starts[i];
        int64_t e = ends[i];
        if (s < 0)
            s += dim;
        if (e < 0)
            e += dim;
        if (step > 0) {
            s = s < 0 ? 0 : (s > dim ? dim : s);
            e = e < 0 ? 0 : (e > dim ? dim : e);
            p->count[a] = e > s ? (e - s + step - 1) / step : 0;
        } else {
            s = s < 0 ? 0 : (s > dim - 1 ? dim - 1 : s);
            e = e < -1 ? -1 : (e > dim - 1 ? dim - 1 : e);
            p->count[a] = s > e ? (s - e + (-step) - 1) / (-step) : 0;
        }
        p->start[a] = s;
        p->step[a] = step;
    }
    return OPQ_OK;
}

static enum opq_status slice_infer(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct slice_plan p;
    enum opq_status st = slice_plan(k, n, in, &p);
    if (st)
        return st;
    out->dtype = in[0]->dtype;
    out->ndim = in[0]->ndim;
    memcpy(out->shape, p.count, sizeof(int64_t) * (size_t)out->ndim);
    return opq_kl_finish(k, n, out);
}

// Input offset of the first output element and per-output-dim input strides.
static void slice_strides(const struct opq_tensor *x, const struct slice_plan *p, int64_t *istr,
                          int64_t *base) {
    int64_t s[OPQ_MAX_DIMS];
    opq_kl_strides(x->ndim, x->shape, s);
    *base = 0;
    for (int d = 0; d < x->ndim; d++) {
        *base += p->start[d] * s[d];
        istr[d] = p->step[d] * s[d];
    }
}

static enum opq_status slice_forward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct slice_plan p;
    int64_t istr[OPQ_MAX_DIMS];
    int64_t base = 0;
    enum opq_status st = slice_plan(k, n, in, &p);
    if (st)
        return st;
    if (opq_kl_numel(out) == 0)
        return OPQ_OK;
    slice_strides(in[0], &p, istr, &base);
    strided_gather(k->pool, out->data, in[0]->data, elem_size(in[0]->dtype), out->ndim,
                   out->shape, istr, base);
    return OPQ_OK;
}

struct slice_scatter {
    float *dx;
    const float *g;
    int ndim;
    const int64_t *oshape;
    const int64_t *istr;
    int64_t base, inner; // inner: the contiguous last dim (step 1)
    bool add;            // add into dx (it holds the other users' gradient)
};

// Rows r0..r1 of the slice (all dims but the last) copied to their place in dx.
static void slice_scatter_rows(void *user, int64_t r0, int64_t r1) {
    const struct slice_scatter *j = user;
    for (int64_t r = r0; r < r1; r++) {
        int64_t off = j->base;
        int64_t rem = r;
        for (int d = j->ndim - 2; d >= 0; d--) {
            off += (rem % j->oshape[d]) * j->istr[d];
            rem /= j->oshape[d];
        }
        float *d = j->dx + off;
        const float *g = j->g + r * j->inner;
        if (j->add)
            for (int64_t i = 0; i < j->inner; i++)
                d[i] = d[i] + g[i];
        else
            memcpy(d, g, sizeof(float) * (size_t)j->inner);
    }
}

static enum opq_status slice_backward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in,
                                      const struct opq_tensor *out, const struct opq_tensor *dout,
                                      struct opq_tensor *din) {
    struct slice_plan p;
    int64_t istr[OPQ_MAX_DIMS];
    int64_t base = 0;
    int64_t idx[OPQ_MAX_DIMS] = {0};
    // adding into the other users' gradient (k->din_add) touches the slice only
    bool add = k->din_add & 1u;
    if (!din[0].data)
        return OPQ_OK;
    if (!add)
        memset(din[0].data, 0, din[0].nbytes);
    if (!dout[0].data)
        return OPQ_OK;
    enum opq_status st = slice_plan(k, n, in, &p);
    if (st)
        return st;
    slice_strides(in[0], &p, istr, &base);
    size_t total = opq_kl_numel(&out[0]);
    const float *g = dout[0].data;
    float *dx = din[0].data;
    int r = out[0].ndim;
    if (r >= 1 && istr[r - 1] == 1 && out[0].shape[r - 1] > 0) {
        // unit step along the last dim: whole rows, over the pool (disjoint destinations)
        struct slice_scatter j = {dx, g, r, out[0].shape, istr, base, out[0].shape[r - 1], add};
        int64_t rows = (int64_t)total / j.inner;
        opq_parallel_for(k->pool, rows, 4096 / j.inner + 1, slice_scatter_rows, &j);
        return OPQ_OK;
    }
    int64_t off = base;
    for (size_t i = 0; i < total; i++) {
        dx[off] = add ? dx[off] + g[i] : g[i]; // slices never alias: assignment is the sum
        for (int d = out[0].ndim - 1; d >= 0; d--) {
            idx[d]++;
            off += istr[d];
            if (idx[d] < out[0].shape[d])
                break;
            off -= istr[d] * out[0].shape[d];
            idx[d] = 0;
        }
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_slice = {
    .infer         = slice_infer,
    .forward       = slice_forward,
    .backward      = slice_backward,
    .backward_adds = true,
};

// ---- Gather -------------------------------------------------------------------------------------

static enum opq_status gather_infer(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    const struct opq_tensor *x = in[0];
    const struct opq_tensor *ind = in[1];
    int axis = 0;
    enum opq_status st = plain_dtype(k, n, x);
    if (st)
        return st;
    if (ind->dtype != OPQ_DTYPE_INT64 && ind->dtype != OPQ_DTYPE_INT32)
        return bad(k, n, OPQ_ERR_SHAPE, "indices must be int32 or int64");
    if (!opq_axis_norm(opq_node_attr_int(n, "axis", 0), x->ndim, &axis))
        return bad(k, n, OPQ_ERR_SHAPE, "axis out of range");
    if (ind->ndim < 0 || x->ndim - 1 + ind->ndim > OPQ_MAX_DIMS)
        return bad(k, n, OPQ_ERR_SHAPE, "indices rank unknown or output rank too large");
    out->dtype = x->dtype;
    out->ndim = 0;
    for (int d = 0; d < axis; d++)
        out->shape[out->ndim++] = x->shape[d];
    for (int d = 0; d < ind->ndim; d++)
        out->shape[out->ndim++] = ind->shape[d];
    for (int d = axis + 1; d < x->ndim; d++)
        out->shape[out->ndim++] = x->shape[d];
    return opq_kl_finish(k, n, out);
}

// outer = prod(x[:axis]), dim = x[axis], inner = prod(x[axis+1:]) elements.
static void gather_dims(const struct opq_tensor *x, int axis, size_t *outer, int64_t *dim,
                        size_t *inner) {
    *outer = 1;
    *inner = 1;
    for (int d = 0; d < x->ndim; d++) {
        if (d < axis)
            *outer *= (size_t)x->shape[d];
        else if (d > axis)
            *inner *= (size_t)x->shape[d];
    }
    *dim = x->shape[axis];
}

static enum opq_status gather_index(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *ind, size_t j, int64_t dim,
                                    int64_t *out) {
    int64_t v = opq_kl_get_i64(ind->data, ind->dtype, j);
    if (v < 0)
        v += dim;
    if (v < 0 || v >= dim)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": index %lld out of [%lld, %lld)",
                             OPQ_KL_NODE(n), (long long)opq_kl_get_i64(ind->data, ind->dtype, j),
                             (long long)-dim, (long long)dim);
    *out = v;
    return OPQ_OK;
}

static enum opq_status gather_forward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out) {
    int axis = 0;
    size_t outer = 0;
    size_t inner = 0;
    int64_t dim = 0;
    opq_axis_norm(opq_node_attr_int(n, "axis", 0), in[0]->ndim, &axis);
    gather_dims(in[0], axis, &outer, &dim, &inner);
    size_t es = elem_size(in[0]->dtype);
    size_t ni = opq_kl_numel(in[1]);
    size_t row = inner * es;
    const char *src = in[0]->data;
    char *dst = out->data;
    for (size_t j = 0; j < ni; j++) {
        int64_t v = 0;
        enum opq_status st = gather_index(k, n, in[1], j, dim, &v);
        if (st)
            return st;
        for (size_t o = 0; o < outer; o++)
            memcpy(dst + (o * ni + j) * row, src + (o * (size_t)dim + (size_t)v) * row, row);
    }
    return OPQ_OK;
}

static enum opq_status gather_backward(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in,
                                       const struct opq_tensor *out, const struct opq_tensor *dout,
                                       struct opq_tensor *din) {
    (void)out;
    int axis = 0;
    size_t outer = 0;
    size_t inner = 0;
    int64_t dim = 0;
    if (din[1].data)
        memset(din[1].data, 0, din[1].nbytes);
    if (!din[0].data)
        return OPQ_OK;
    if (!dout[0].data) {
        memset(din[0].data, 0, din[0].nbytes);
        return OPQ_OK;
    }
    opq_axis_norm(opq_node_attr_int(n, "axis", 0), in[0]->ndim, &axis);
    gather_dims(in[0], axis, &outer, &dim, &inner);
    size_t m = opq_kl_numel(in[0]);
    size_t ni = opq_kl_numel(in[1]);
    double *acc = scratch(k, n, m * sizeof(double));
    if (!acc)
        return OPQ_ERR_NOMEM;
    const float *g = dout[0].data;
    for (size_t j = 0; j < ni; j++) {
        int64_t v = 0;
        enum opq_status st = gather_index(k, n, in[1], j, dim, &v);
        if (st)
            return st;
        for (size_t o = 0; o < outer; o++) {
            double *a = acc + (o * (size_t)dim + (size_t)v) * inner;
            const float *gr = g + (o * ni + j) * inner;
            for (size_t t = 0; t < inner; t++)
                a[t] += (double)gr[t];
        }
    }
    float *dx = din[0].data;
    for (size_t i = 0; i < m; i++)
        dx[i] = (float)acc[i];
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_gather = {
    .infer    = gather_infer,
    .forward  = gather_forward,
    .backward = gather_backward,
};

// ---- GatherElements -----------------------------------------------------------------------------

static enum opq_status gatherelements_infer(struct opq_kctx *k, const struct opq_node *n,
                                            const struct opq_tensor *const *in,
                                            struct opq_tensor *out) {
    int axis = 0;
    enum opq_status st = plain_dtype(k, n, in[0]);
    if (st)
        return st;
    if (in[1]->dtype != OPQ_DTYPE_INT64 && in[1]->dtype != OPQ_DTYPE_INT32)
        return bad(k, n, OPQ_ERR_SHAPE, "indices must be int32 or int64");
    if (in[1]->ndim != in[0]->ndim)
        return bad(k, n, OPQ_ERR_SHAPE, "indices rank differs from data rank");
    if (!opq_axis_norm(opq_node_attr_int(n, "axis", 0), in[0]->ndim, &axis))
        return bad(k, n, OPQ_ERR_SHAPE, "axis out of range");
    out->dtype = in[0]->dtype;
    out->ndim = in[1]->ndim;
    memcpy(out->shape, in[1]->shape, sizeof(out->shape));
    return opq_kl_finish(k, n, out);
}

static enum opq_status gatherelements_forward(struct opq_kctx *k, const struct opq_node *n,
                                              const struct opq_tensor *const *in,
                                              struct opq_tensor *out) {
    int axis = 0;
    int64_t xs[OPQ_MAX_DIMS];
    int64_t idx[OPQ_MAX_DIMS] = {0};
    opq_axis_norm(opq_node_attr_int(n, "axis", 0), in[0]->ndim, &axis);
    opq_kl_strides(in[0]->ndim, in[0]->shape, xs);
    size_t es = elem_size(in[0]->dtype);
    size_t total = opq_kl_numel(out);
    int r = out->ndim;
    for (size_t i = 0; i < total; i++) {
        int64_t v = 0;
        enum opq_status st = gather_index(k, n, in[1], i, in[0]->shape[axis], &v);
        if (st)
            return st;
        int64_t off = 0;
        for (int d = 0; d < r; d++) {
            if (d != axis && idx[d] >= in[0]->shape[d])
                return bad(k, n, OPQ_ERR_SHAPE, "indices shape exceeds data shape");
            off += (d == axis ? v : idx[d]) * xs[d];
        }
        memcpy((char *)out->data + i * es, (const char *)in[0]->data + (size_t)off * es, es);
        for (int d = r - 1; d >= 0; d--) {
            if (++idx[d] < out->shape[d])
                break;
            idx[d] = 0;
        }
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_gatherelements = {
    .min_opset = 11,
    .infer     = gatherelements_infer,
    .forward   = gatherelements_forward,
};

// ---- Tile ---------------------------------------------------------------------------------------

static enum opq_status tile_infer(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct opq_tensor *out) {
    int64_t rep[OPQ_MAX_DIMS];
    size_t cnt = 0;
    enum opq_status st = plain_dtype(k, n, in[0]);
    if (!st)
        st = opq_kl_read_ints(k, n, in[1], "repeats", rep, OPQ_MAX_DIMS, &cnt);
    if (st)
        return st;
    if ((int)cnt != in[0]->ndim)
        return bad(k, n, OPQ_ERR_SHAPE, "repeats length differs from the input rank");
    out->dtype = in[0]->dtype;
    out->ndim = in[0]->ndim;
    for (int d = 0; d < out->ndim; d++) {
        if (rep[d] < 0)
            return bad(k, n, OPQ_ERR_SHAPE, "negative repeat");
        out->shape[d] = in[0]->shape[d] < 0 ? -1 : in[0]->shape[d] * rep[d];
    }
    return opq_kl_finish(k, n, out);
}

static enum opq_status tile_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    int64_t xs[OPQ_MAX_DIMS];
    int64_t idx[OPQ_MAX_DIMS] = {0};
    const struct opq_tensor *x = in[0];
    opq_kl_strides(x->ndim, x->shape, xs);
    size_t es = elem_size(x->dtype);
    size_t total = opq_kl_numel(out);
    for (size_t i = 0; i < total; i++) {
        int64_t off = 0;
        for (int d = 0; d < x->ndim; d++)
            off += (idx[d] % x->shape[d]) * xs[d];
        memcpy((char *)out->data + i * es, (const char *)x->data + (size_t)off * es, es);
        for (int d = out->ndim - 1; d >= 0; d--) {
            if (++idx[d] < out->shape[d])
                break;
            idx[d] = 0;
        }
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_tile = {
    .min_opset = 6,
    .infer     = tile_infer,
    .forward   = tile_forward,
};

// ---- Pad ----------------------------------------------------------------------------------------

enum pad_mode { PAD_CONSTANT, PAD_REFLECT, PAD_EDGE, PAD_WRAP };

struct pad_plan {
    enum pad_mode mode;
    int64_t       begin[OPQ_MAX_DIMS];
    int64_t       end[OPQ_MAX_DIMS];
};

static enum opq_status pad_plan(struct opq_kctx *k, const struct opq_node *n,
                                const struct opq_tensor *const *in, struct pad_plan *p) {
    const struct opq_tensor *x = in[0];
    int64_t pads[2 * OPQ_MAX_DIMS];
    int64_t axes[OPQ_MAX_DIMS];
    size_t np = 0;
    size_t na = 0;
    enum opq_status st = plain_dtype(k, n, x);
    if (st)
        return st;
    const struct opq_attr *m = opq_node_attr(n, "mode");
    p->mode = PAD_CONSTANT;
    if (m && m->type == OPQ_ATTR_STRING) {
        static const char *names[] = {"constant", "reflect", "edge", "wrap"};
        size_t i = 0;
        for (; i < ARRAY_SIZE(names); i++)
            if (m->s.len == strlen(names[i]) && memcmp(m->s.data, names[i], m->s.len) == 0)
                break;
        if (i == ARRAY_SIZE(names))
            return bad(k, n, OPQ_ERR_UNSUPPORTED, "unknown pad mode");
        p->mode = (enum pad_mode)i;
    }
    if (n->n_inputs > 1 && in[1]) {
        st = opq_kl_read_ints(k, n, in[1], "pads", pads, 2 * OPQ_MAX_DIMS, &np);
        if (!st && n->n_inputs > 3 && in[3])
            st = opq_kl_read_ints(k, n, in[3], "axes", axes, OPQ_MAX_DIMS, &na);
    } else {
        bool present = false;
        st = opq_kl_attr_ints(k, n, "pads", pads, 2 * OPQ_MAX_DIMS, &np, &present);
        if (!st && !present)
            st = opq_kl_attr_ints(k, n, "paddings", pads, 2 * OPQ_MAX_DIMS, &np, NULL);
    }
    if (st)
        return st;
    if (!na) {
        na = (size_t)x->ndim;
        for (int d = 0; d < x->ndim; d++)
            axes[d] = d;
    }
    if (np != 2 * na)
        return bad(k, n, OPQ_ERR_SHAPE, "pads must hold 2 values per padded axis");
    memset(p->begin, 0, sizeof(p->begin));
    memset(p->end, 0, sizeof(p->end));
    for (size_t i = 0; i < na; i++) {
        int a = 0;
        if (!opq_axis_norm(axes[i], x->ndim, &a))
            return bad(k, n, OPQ_ERR_SHAPE, "axis out of range");
        p->begin[a] = pads[i];
        p->end[a] = pads[i + na];
        if (x->shape[a] < 0)
            return bad(k, n, OPQ_ERR_UNSUPPORTED, "padded dim is unknown");
        if (p->mode != PAD_CONSTANT && x->shape[a] == 0 && (pads[i] > 0 || pads[i + na] > 0))
            return bad(k, n, OPQ_ERR_SHAPE, "cannot reflect/edge/wrap pad an empty axis");
    }
    return OPQ_OK;
}

static enum opq_status pad_infer(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct pad_plan p;
    enum opq_status st = pad_plan(k, n, in, &p);
    if (st)
        return st;
    out->dtype = in[0]->dtype;
    out->ndim = in[0]->ndim;
    for (int d = 0; d < out->ndim; d++) {
        out->shape[d] = in[0]->shape[d] + p.begin[d] + p.end[d];
        if (out->shape[d] < 0)
            return bad(k, n, OPQ_ERR_SHAPE, "negative pads remove more than the axis holds");
    }
    return opq_kl_finish(k, n, out);
}

// Source coordinate for output coordinate c (already shifted by -begin); -1 = constant fill.
static int64_t pad_src(enum pad_mode mode, int64_t c, int64_t dim) {
    if (c >= 0 && c < dim)
        return c;
    switch (mode) {
    case PAD_EDGE:
        return c < 0 ? 0 : dim - 1;
    case PAD_WRAP:
        return ((c % dim) + dim) % dim;
    case PAD_REFLECT: {
        if (dim == 1)
            return 0;
        int64_t period = 2 * (dim - 1);
        c = ((c % period) + period) % period;
        return c < dim ? c : period - c;
    }
    default:
        return -1;
    }
}

static enum opq_status pad_forward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct pad_plan p;
    int64_t xs[OPQ_MAX_DIMS];
    int64_t idx[OPQ_MAX_DIMS] = {0};
    char fill[16] = {0};
    const struct opq_tensor *x = in[0];
    enum opq_status st = pad_plan(k, n, in, &p);
    if (st)
        return st;
    size_t es = elem_size(x->dtype);
    if (x->dtype != OPQ_DTYPE_STRING) {
        if (n->n_inputs > 2 && in[2] && in[2]->data && opq_kl_numel(in[2]) >= 1) {
            if (in[2]->dtype != x->dtype)
                return bad(k, n, OPQ_ERR_SHAPE, "constant_value dtype differs from data");
            memcpy(fill, in[2]->data, es);
        } else {
            opq_kl_set_f64(fill, x->dtype, 0, (double)opq_node_attr_float(n, "value", 0.0f));
        }
    }
    opq_kl_strides(x->ndim, x->shape, xs);
    size_t total = opq_kl_numel(out);
    for (size_t i = 0; i < total; i++) {
        int64_t off = 0;
        bool constant = false;
        for (int d = 0; d < x->ndim && !constant; d++) {
            int64_t c = pad_src(p.mode, idx[d] - p.begin[d], x->shape[d]);
            if (c < 0)
                constant = true;
            else
                off += c * xs[d];
        }
        char *dst = (char *)out->data + i * es;
        if (constant)
            memcpy(dst, fill, es);
        else
            memcpy(dst, (const char *)x->data + (size_t)off * es, es);
        for (int d = out->ndim - 1; d >= 0; d--) {
            if (++idx[d] < out->shape[d])
                break;
            idx[d] = 0;
        }
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_pad = {
    .min_opset = 2,
    .infer     = pad_infer,
    .forward   = pad_forward,
};

// ---- Trilu --------------------------------------------------------------------------------------

static enum opq_status trilu_infer(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    enum opq_status st = plain_dtype(k, n, in[0]);
    if (st)
        return st;
    if (in[0]->ndim < 2)
        return bad(k, n, OPQ_ERR_SHAPE, "input rank must be >= 2");
    if (n->n_inputs > 1 && in[1] && opq_kl_numel(in[1]) != 1)
        return bad(k, n, OPQ_ERR_SHAPE, "k must be a scalar");
    *out = *in[0];
    out->data = NULL;
    return opq_kl_finish(k, n, out);
}

static enum opq_status trilu_forward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in, struct opq_tensor *out) {
    int64_t kk = 0;
    if (n->n_inputs > 1 && in[1]) {
        enum opq_status st = opq_kl_need_data(k, n, in[1], "k");
        if (st)
            return st;
        kk = opq_kl_get_i64(in[1]->data, in[1]->dtype, 0);
    }
    bool upper = opq_node_attr_int(n, "upper", 1) != 0;
    int r = in[0]->ndim;
    int64_t rows = in[0]->shape[r - 2];
    int64_t cols = in[0]->shape[r - 1];
    size_t es = elem_size(in[0]->dtype);
    size_t mats = opq_kl_numel(in[0]) / (size_t)(rows * cols > 0 ? rows * cols : 1);
    const char *src = in[0]->data;
    char *dst = out->data;
    for (size_t m = 0; m < mats; m++) {
        for (int64_t i = 0; i < rows; i++) {
            for (int64_t j = 0; j < cols; j++) {
                size_t off = ((m * (size_t)rows + (size_t)i) * (size_t)cols + (size_t)j) * es;
                bool keep = upper ? (j - i >= kk) : (j - i <= kk);
                if (keep)
                    memcpy(dst + off, src + off, es);
                else
                    memset(dst + off, 0, es);
            }
        }
    }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_trilu = {
    .min_opset = 14,
    .infer     = trilu_infer,
    .forward   = trilu_forward,
};
