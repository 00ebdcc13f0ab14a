/* k_binary.c: Add, Sub, Mul, Div, Pow with multidirectional (numpy) broadcasting.
 * https://onnx.ai/onnx/operators/onnx__Add.html (and Sub, Mul, Div, Pow); opsets 7+.
 *
 * dtypes: float32 for all; int32/int64 for Add/Sub/Mul/Div (shape arithmetic; Div truncates
 * toward zero like ORT). Pow: float32 base with float32, int32 or int64 exponent.
 * Fast paths: same shape, a scalar operand, and otherwise a row loop whose inner dimension is
 * contiguous in the output (bias and per-channel broadcasts).
 *
 * VJP (sum over broadcast dims, done by reduce_to):
 *   Add: dA = dY, dB = dY           Sub: dA = dY, dB = -dY
 *   Mul: dA = dY*B, dB = dY*A       Div: dA = dY/B, dB = -dY*A/B^2
 *   Pow: dA = dY*b*a^(b-1), dB = dY*y*ln(a) (0 where a <= 0) */
#include <math.h>
#include <stdio.h>

#include "k_math.h"

enum bop { BOP_ADD, BOP_SUB, BOP_MUL, BOP_DIV, BOP_POW };

static enum opq_status binary_infer(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (n->n_inputs != 2 || !in[0] || !in[1])
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, "%s node '%s': needs 2 inputs",
                             n->op_type, ku_name(n));
    bool pow = n->op == OPQ_OP_POW;
    enum opq_dtype da = in[0]->dtype;
    enum opq_dtype db = in[1]->dtype;
    bool ok = pow ? (da == OPQ_DTYPE_FLOAT &&
                     (db == OPQ_DTYPE_FLOAT || db == OPQ_DTYPE_INT64 || db == OPQ_DTYPE_INT32))
                  : (da == db &&
                     (da == OPQ_DTYPE_FLOAT || da == OPQ_DTYPE_INT64 || da == OPQ_DTYPE_INT32));
    if (!ok)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, "%s node '%s': dtypes %s, %s", n->op_type,
                             ku_name(n), opq_dtype_name(da), opq_dtype_name(db));
    if (opq_broadcast_shape(in[0], in[1], &out[0]) != OPQ_OK)
        return opq_set_error(k->ctx, OPQ_ERR_SHAPE, "%s node '%s': shapes cannot broadcast",
                             n->op_type, ku_name(n));
    out[0].dtype = da;
    return OPQ_OK;
}

static inline float fop(enum bop op, float a, float b) {
    switch (op) {
    case BOP_ADD:
        return a + b;
    case BOP_SUB:
        return a - b;
    case BOP_MUL:
        return a * b;
    case BOP_DIV:
        return a / b;
    case BOP_POW:
        return powf(a, b);
    }
    return 0.0f;
}

// One loop per op and operand layout: both contiguous, or one of them a scalar (stride 0, read
// once), so the compiler vectorises each (a loop with run-time strides only gets a vector
// version for strides of 1, and the scalar operands of x/sqrt2, x+1, x*0.5 ran element by
// element); other strides take the general loop. Every element gets the same operation either
// way.
#define BIN_LOOP(T, EXPR)                                                                          \
    do {                                                                                           \
        if (sa == 1 && sb == 1) {                                                                  \
            for (int64_t i = 0; i < cnt; i++) {                                                    \
                T a = pa[i];                                                                       \
                T b = pb[i];                                                                       \
                py[i] = (EXPR);                                                                    \
            }                                                                                      \
        } else if (sa == 1 && sb == 0) {                                                           \
            const T b = pb[0];                                                                     \
            for (int64_t i = 0; i < cnt; i++) {                                                    \
                T a = pa[i];                                                                       \
                py[i] = (EXPR);                                                                    \
            }                                                                                      \
        } else if (sa == 0 && sb == 1) {                                                           \
            const T a = pa[0];                                                                     \
            for (int64_t i = 0; i < cnt; i++) {                                                    \
                T b = pb[i];                                                                       \
                py[i] = (EXPR);                                                                    \
            }                                                                                      \
        } else {                                                                                   \
            for (int64_t i = 0; i < cnt; i++) {                                                    \
                T a = pa[i * sa];                                                                  \
                T b = pb[i * sb];                                                                  \
                py[i] = (EXPR);                                                                    \
            }                                                                                      \
        }                                                                                          \
    } while (0)

KU_HOT static void run_f32(enum bop op, const float *pa, int64_t sa, const float *pb, int64_t sb,
                           float *py, int64_t cnt) {
    switch (op) {
    case BOP_ADD:
        BIN_LOOP(float, a + b);
        break;
    case BOP_SUB:
        BIN_LOOP(float, a - b);
        break;
    case BOP_MUL:
        BIN_LOOP(float, a *b);
        break;
    case BOP_DIV:
        BIN_LOOP(float, a / b);
        break;
    case BOP_POW:
        BIN_LOOP(float, powf(a, b));
        break;
    }
}

static void run_i64(enum bop op, const int64_t *pa, int64_t sa, const int64_t *pb, int64_t sb,
                    int64_t *py, int64_t cnt) {
    switch (op) {
    case BOP_ADD:
        BIN_LOOP(int64_t, (int64_t)((uint64_t)a + (uint64_t)b));
        break;
    case BOP_SUB:
        BIN_LOOP(int64_t, (int64_t)((uint64_t)a - (uint64_t)b));
        break;
    case BOP_MUL:
        BIN_LOOP(int64_t, (int64_t)((uint64_t)a * (uint64_t)b));
        break;
    case BOP_DIV:
        BIN_LOOP(int64_t, b == 0 || (a == INT64_MIN && b == -1) ? 0 : a / b);
        break;
    case BOP_POW:
        break;
    }
}

static void run_i32(enum bop op, const int32_t *pa, int64_t sa, const int32_t *pb, int64_t sb,
                    int32_t *py, int64_t cnt) {
    switch (op) {
    case BOP_ADD:
        BIN_LOOP(int32_t, (int32_t)((uint32_t)a + (uint32_t)b));
        break;
    case BOP_SUB:
        BIN_LOOP(int32_t, (int32_t)((uint32_t)a - (uint32_t)b));
        break;
    case BOP_MUL:
        BIN_LOOP(int32_t, (int32_t)((uint32_t)a * (uint32_t)b));
        break;
    case BOP_DIV:
        BIN_LOOP(int32_t, b == 0 || (a == INT32_MIN && b == -1) ? 0 : a / b);
        break;
    case BOP_POW:
        break;
    }
}

struct bin_job {
    enum bop op;
    const struct opq_tensor *a, *b, *y;
    const void *pa, *pb; // pb converted to float for Pow with an int exponent
    void *py;
    int64_t sa[OPQ_MAX_DIMS], sb[OPQ_MAX_DIMS];
    int64_t inner;
    size_t es;
};

static void bin_rows(void *user, int64_t r0, int64_t r1) {
    struct bin_job *j = user;
    int r = j->y->ndim;
    int64_t ia = r ? j->sa[r - 1] : 0;
    int64_t ib = r ? j->sb[r - 1] : 0;
    for (int64_t row = r0; row < r1; row++) {
        int64_t oa = ku_row_offset(j->y, j->sa, row);
        int64_t ob = ku_row_offset(j->y, j->sb, row);
        int64_t oy = row * j->inner;
        switch (j->y->dtype) {
        case OPQ_DTYPE_FLOAT:
            run_f32(j->op, (const float *)j->pa + oa, ia, (const float *)j->pb + ob, ib,
                    (float *)j->py + oy, j->inner);
            break;
        case OPQ_DTYPE_INT64:
            run_i64(j->op, (const int64_t *)j->pa + oa, ia, (const int64_t *)j->pb + ob, ib,
                    (int64_t *)j->py + oy, j->inner);
            break;
        default:
            run_i32(j->op, (const int32_t *)j->pa + oa, ia, (const int32_t *)j->pb + ob, ib,
                    (int32_t *)j->py + oy, j->inner);
            break;
        }
    }
}

static void bin_flat(void *user, int64_t i0, int64_t i1) {
    // same shape or scalar operand: sa/sb[0] hold the flat strides (0 or 1)
    struct bin_job *j = user;
    int64_t cnt = i1 - i0;
    int64_t sa = j->sa[0];
    int64_t sb = j->sb[0];
    switch (j->y->dtype) {
    case OPQ_DTYPE_FLOAT:
        run_f32(j->op, (const float *)j->pa + i0 * sa, sa, (const float *)j->pb + i0 * sb, sb,
                (float *)j->py + i0, cnt);
        break;
    case OPQ_DTYPE_INT64:
        run_i64(j->op, (const int64_t *)j->pa + i0 * sa, sa, (const int64_t *)j->pb + i0 * sb, sb,
                (int64_t *)j->py + i0, cnt);
        break;
    default:
        run_i32(j->op, (const int32_t *)j->pa + i0 * sa, sa, (const int32_t *)j->pb + i0 * sb, sb,
                (int32_t *)j->py + i0, cnt);
        break;
    }
}

// Float copy of Pow's integer exponent (scratch); NULL on OOM.
static const float *exp_as_float(struct opq_kctx *k, const struct opq_tensor *b) {
    if (b->dtype == OPQ_DTYPE_FLOAT)
        return b->data;
    int64_t n = ku_numel(b);
    float *f = opq_arena_alloc_raw(k->scratch, (size_t)n * sizeof(float) + 1);
    if (!f)
        return NULL;
    for (int64_t i = 0; i < n; i++)
        f[i] = b->dtype == OPQ_DTYPE_INT64 ? (float)((const int64_t *)b->data)[i]
                                           : (float)((const int32_t *)b->data)[i];
    return f;
}

static enum opq_status binary_forward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out,
                                      enum bop op) {
    struct opq_tensor *y = &out[0];
    if (!y->data)
        return OPQ_OK;
    struct bin_job j = {.op = op,
                        .a = in[0],
                        .b = in[1],
                        .y = y,
                        .pa = in[0]->data,
                        .pb = in[1]->data,
                        .py = y->data};
    if (op == BOP_POW) {
        j.pb = exp_as_float(k, in[1]);
        if (!j.pb)
            return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "Pow node '%s': out of memory", ku_name(n));
    }
    int64_t total = ku_numel(y);
    int64_t na = ku_numel(in[0]);
    int64_t nb = ku_numel(in[1]);
    if (total == 0)
        return OPQ_OK;
    if ((na == total || na == 1) && (nb == total || nb == 1)) {
        j.sa[0] = na == total ? 1 : 0;
        j.sb[0] = nb == total ? 1 : 0;
        if (total == 1)
            j.sa[0] = j.sb[0] = 0;
        ku_parallel(k, total, 1 << 15, bin_flat, &j);
        return OPQ_OK;
    }
    ku_bcast_strides(in[0], y, j.sa);
    ku_bcast_strides(in[1], y, j.sb);
    j.inner = y->shape[y->ndim - 1];
    ku_parallel(k, total / j.inner, (1 << 15) / j.inner + 1, bin_rows, &j);
    return OPQ_OK;
}

// d (shape of `in`) = sum over broadcast dims of g (shape of y), or d += that sum (add).
// Double accumulation. Only for inputs that are broadcast (fewer elements than y).
static enum opq_status reduce_to(struct opq_kctx *k, const struct opq_node *n, const float *g,
                                 const struct opq_tensor *y, const struct opq_tensor *in,
                                 float *d, bool add) {
    int64_t total = ku_numel(y);
    int64_t nin = ku_numel(in);
    double *acc = opq_arena_alloc(k->scratch, (size_t)nin * sizeof(double) + 1);
    if (!acc)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "%s node '%s': out of memory", n->op_type,
                             ku_name(n));
    int64_t s[OPQ_MAX_DIMS] = {0};
    ku_bcast_strides(in, y, s);
    int64_t inner = y->ndim ? y->shape[y->ndim - 1] : 1;
    int64_t si = y->ndim ? s[y->ndim - 1] : 0;
    for (int64_t row = 0; row < total / inner; row++) {
        double *pa = acc + ku_row_offset(y, s, row);
        const float *pg = g + row * inner;
        for (int64_t i = 0; i < inner; i++)
            pa[i * si] += (double)pg[i];
    }
    for (int64_t i = 0; i < nin; i++)
        d[i] = add ? d[i] + (float)acc[i] : (float)acc[i];
    return OPQ_OK;
}

// Elementwise partials of the output w.r.t. input `which` times dY along one row of y:
// r[i] for i < cnt, with A/B read at strides ia/ib from ra/rb and y's values at yr.
KU_HOT static void partial_row(enum bop op, int which, const float *ra, int64_t ia,
                               const float *rb, int64_t ib, const float *yr, const float *g,
                               float *r, int64_t cnt) {
    // the operator is chosen per row so that the inner loops are branch-free (they vectorise)
    switch (op) {
    case BOP_ADD:
        memcpy(r, g, sizeof(float) * (size_t)cnt);
        break;
    case BOP_SUB:
        if (which)
            for (int64_t i = 0; i < cnt; i++)
                r[i] = -g[i];
        else
            memcpy(r, g, sizeof(float) * (size_t)cnt);
        break;
    case BOP_MUL:
        if (which)
            for (int64_t i = 0; i < cnt; i++)
                r[i] = g[i] * ra[i * ia];
        else
            for (int64_t i = 0; i < cnt; i++)
                r[i] = g[i] * rb[i * ib];
        break;
    case BOP_DIV:
        if (which)
            for (int64_t i = 0; i < cnt; i++)
                r[i] = -g[i] * ra[i * ia] / (rb[i * ib] * rb[i * ib]);
        else
            for (int64_t i = 0; i < cnt; i++)
                r[i] = g[i] / rb[i * ib];
        break;
    case BOP_POW:
        for (int64_t i = 0; i < cnt; i++) {
            float av = ra[i * ia], bv = rb[i * ib];
            if (which)
                r[i] = av > 0.0f ? g[i] * yr[i] * logf(av) : 0.0f;
            else
                r[i] = bv == 0.0f ? 0.0f : g[i] * bv * powf(av, bv - 1.0f);
        }
        break;
    }
}

#define PIECE 1024 // partials computed at once on the stack (to add or sum them)

// t + r for cnt elements (the executor's gradient sum, element by element).
KU_HOT static void add_row(float *t, const float *r, int64_t cnt) {
    for (int64_t i = 0; i < cnt; i++)
        t[i] = t[i] + r[i];
}

// The partials on y's shape, rows r0..r1 (of the last dim), into t or added to it; with
// rowsum, each row's partials summed instead (double, index order: the bytes reduce_to gives for
// an input broadcast along the last dim only), into t[row] or added to it.
static void partial_rows(enum bop op, int which, const struct opq_tensor *a,
                         const struct opq_tensor *b, const float *pb, const struct opq_tensor *y,
                         const float *dy, float *t, bool add, bool rowsum, int64_t r0,
                         int64_t r1) {
    int64_t sa[OPQ_MAX_DIMS] = {0};
    int64_t sb[OPQ_MAX_DIMS] = {0};
    ku_bcast_strides(a, y, sa);
    ku_bcast_strides(b, y, sb);
    int64_t inner = y->ndim ? y->shape[y->ndim - 1] : 1;
    int64_t ia = y->ndim ? sa[y->ndim - 1] : 0;
    int64_t ib = y->ndim ? sb[y->ndim - 1] : 0;
    const float *A = a->data;
    const float *Y = y->data;
    float r[PIECE];
    for (int64_t row = r0; row < r1; row++) {
        int64_t o = row * inner;
        const float *ra = A + ku_row_offset(y, sa, row);
        const float *rb = pb + ku_row_offset(y, sb, row);
        if (!add && !rowsum) {
            partial_row(op, which, ra, ia, rb, ib, Y + o, dy + o, t + o, inner);
            continue;
        }
        double acc = 0.0;
        for (int64_t c0 = 0; c0 < inner; c0 += PIECE) {
            int64_t cnt = inner - c0 < PIECE ? inner - c0 : PIECE;
            partial_row(op, which, ra + c0 * ia, ia, rb + c0 * ib, ib, Y + o + c0, dy + o + c0, r,
                        cnt);
            if (!rowsum)
                add_row(t + o + c0, r, cnt);
            else
                for (int64_t i = 0; i < cnt; i++)
                    acc += (double)r[i];
        }
        if (rowsum)
            t[row] = add ? t[row] + (float)acc : (float)acc;
    }
}

struct partial_job {
    enum bop op;
    int which;
    const struct opq_tensor *a, *b, *y;
    const float *pb, *dy;
    float *t;
    bool add, rowsum;
};

static void partial_range(void *user, int64_t r0, int64_t r1) {
    const struct partial_job *j = user;
    partial_rows(j->op, j->which, j->a, j->b, j->pb, j->y, j->dy, j->t, j->add, j->rowsum, r0, r1);
}

// All partials (every row, over the pool: rows are independent), into t or added to it; with
// rowsum, one sum per row (see partial_rows).
static void partial(struct opq_kctx *k, enum bop op, int which, const struct opq_tensor *a,
                    const struct opq_tensor *b, const float *pb, const struct opq_tensor *y,
                    const float *dy, float *t, bool add, bool rowsum) {
    int64_t inner = y->ndim ? y->shape[y->ndim - 1] : 1;
    int64_t rows = inner ? ku_numel(y) / inner : 0;
    struct partial_job j = {op, which, a, b, y, pb, dy, t, add, rowsum};
    ku_parallel(k, rows, (1 << 14) / (inner ? inner : 1) + 1, partial_range, &j);
}

// Is `in` broadcast along y's last dim only (its shape y's with the last dim 1)? Then each of
// its gradient's elements is the sum of one row of partials (partial with rowsum), without a
// full-size temporary.
static bool row_broadcast(const struct opq_tensor *in, const struct opq_tensor *y) {
    int r = y->ndim;
    if (r < 1 || in->ndim != r || in->shape[r - 1] != 1 || y->shape[r - 1] <= 1)
        return false;
    for (int d = 0; d < r - 1; d++)
        if (in->shape[d] != y->shape[d])
            return false;
    return true;
}

static enum opq_status binary_backward(struct opq_kctx *k, const struct opq_node *n,
                                       const struct opq_tensor *const *in,
                                       const struct opq_tensor *out, const struct opq_tensor *dout,
                                       struct opq_tensor *din, enum bop op) {
    const struct opq_tensor *y = &out[0];
    if (y->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, "%s node '%s': backward needs float",
                             n->op_type, ku_name(n));
    int64_t total = ku_numel(y);
    const float *pb = exp_as_float(k, in[1]);
    // the partials go straight to din when an input is not broadcast, are summed row by row when
    // it is broadcast along the last dim only (row_broadcast), else go through t
    bool bcast = (din[0].data && ku_numel(in[0]) != total && !row_broadcast(in[0], y)) ||
                 (din[1].data && ku_numel(in[1]) != total && !row_broadcast(in[1], y));
    float *t = bcast ? opq_arena_alloc_raw(k->scratch, (size_t)total * sizeof(float) + 1) : NULL;
    if ((bcast && !t) || !pb)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "%s node '%s': out of memory", n->op_type,
                             ku_name(n));
    for (int w = 0; w < 2; w++) {
        if (!din[w].data)
            continue;
        bool add = (k->din_add >> w) & 1u; // din[w] holds the other users' gradient
        if (!dout[0].data || (w == 1 && in[1]->dtype != OPQ_DTYPE_FLOAT)) {
            if (!add)
                memset(din[w].data, 0, din[w].nbytes);
            continue;
        }
        if (!add && (op == BOP_ADD || (op == BOP_SUB && w == 0)) && ku_numel(in[w]) == total) {
            memcpy(din[w].data, dout[0].data, (size_t)total * sizeof(float)); // no broadcast
            continue;
        }
        if (ku_numel(in[w]) == total) {
            partial(k, op, w, in[0], in[1], pb, y, dout[0].data, din[w].data, add, false);
            continue;
        }
        if (row_broadcast(in[w], y)) {
            partial(k, op, w, in[0], in[1], pb, y, dout[0].data, din[w].data, add, true);
            continue;
        }
        partial(k, op, w, in[0], in[1], pb, y, dout[0].data, t, false, false);
        enum opq_status st = reduce_to(k, n, t, y, in[w], din[w].data, add);
        if (st != OPQ_OK)
            return st;
    }
    return OPQ_OK;
}

#define BINARY_KERNEL(prefix, OP)                                                                  \
    static enum opq_status prefix##_forward(struct opq_kctx *k, const struct opq_node *n,          \
                                            const struct opq_tensor *const *in,                    \
                                            struct opq_tensor *out) {                              \
        return binary_forward(k, n, in, out, OP);                                                  \
    }                                                                                              \
    static enum opq_status prefix##_backward(                                                      \
        struct opq_kctx *k, const struct opq_node *n, const struct opq_tensor *const *in,          \
        const struct opq_tensor *out, const struct opq_tensor *dout, struct opq_tensor *din) {     \
        return binary_backward(k, n, in, out, dout, din, OP);                                      \
    }                                                                                              \
    const struct opq_kernel opq_kernel_##prefix = {                                                \
        .min_opset = 7,                                                                            \
        .infer = binary_infer,                                                                     \
        .forward = prefix##_forward,                                                               \
        .backward = prefix##_backward,                                                             \
        .backward_adds = true,                                                                     \
    };

BINARY_KERNEL(add, BOP_ADD)
BINARY_KERNEL(sub, BOP_SUB)
BINARY_KERNEL(mul, BOP_MUL)
BINARY_KERNEL(div, BOP_DIV)
BINARY_KERNEL(pow, BOP_POW)
