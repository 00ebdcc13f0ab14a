/* k_unary.c: elementwise math: Sqrt, Reciprocal, Neg, Exp, Erf, Tanh, Sigmoid, Relu, Abs, Gelu.
 * https://onnx.ai/onnx/operators/ (each op's page). Opsets 6+ (Erf 9+, Gelu 20+).
 * dtypes: float32; Neg, Abs and Relu also int32/int64.
 *
 * Gelu (opset 20), attribute approximate = "none" | "tanh":
 *   none: y = x/2 (1 + erf(x/sqrt2)),          dy/dx = Phi(x) + x phi(x)
 *   tanh: u = sqrt(2/pi)(x + 0.044715 x^3), y = x/2 (1 + tanh u),
 *         dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) sqrt(2/pi)(1 + 3*0.044715 x^2)
 * VJPs: Sqrt dy/(2y); Reciprocal -dy y^2; Neg -dy; Exp dy y; Erf dy 2/sqrt(pi) exp(-x^2);
 *       Tanh dy (1-y^2); Sigmoid dy y(1-y); Relu dy [x>0]; Abs dy sign(x). */
#include <math.h>

#include "k_math.h"

enum uop {
    UOP_SQRT,
    UOP_RECIP,
    UOP_NEG,
    UOP_EXP,
    UOP_ERF,
    UOP_TANH,
    UOP_SIGMOID,
    UOP_RELU,
    UOP_ABS,
    UOP_GELU,
    UOP_GELU_TANH
};

#define SQRT_2_OVER_PI 0.7978845608028654f
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f
#define TWO_OVER_SQRTPI 1.1283791670955126f

static bool int_ok(enum opq_op op) {
    return op == OPQ_OP_NEG || op == OPQ_OP_ABS || op == OPQ_OP_RELU;
}

static enum opq_status unary_infer(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (n->n_inputs < 1 || !in[0])
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, "%s node '%s': needs an input",
                             n->op_type, ku_name(n));
    enum opq_dtype dt = in[0]->dtype;
    if (dt != OPQ_DTYPE_FLOAT &&
        !(int_ok(n->op) && (dt == OPQ_DTYPE_INT64 || dt == OPQ_DTYPE_INT32)))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, "%s node '%s': dtype %s", n->op_type,
                             ku_name(n), opq_dtype_name(dt));
    out[0].dtype = dt;
    ku_copy_shape(&out[0], in[0]);
    return OPQ_OK;
}

static inline float gelu_erf(float x) {
    return 0.5f * x * (1.0f + ku_erff(x * INV_SQRT2));
}

static inline float gelu_tanh(float x) {
    float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

struct un_job {
    enum uop op;
    const float *x;
    float *y;
};

KU_HOT static void un_range(void *user, int64_t i0, int64_t i1) {
    const struct un_job *j = user;
    const float *x = j->x;
    float *y = j->y;
    switch (j->op) {
    case UOP_SQRT:
        for (int64_t i = i0; i < i1; i++)
            y[i] = sqrtf(x[i]);
        break;
    case UOP_RECIP:
        for (int64_t i = i0; i < i1; i++)
            y[i] = 1.0f / x[i];
        break;
    case UOP_NEG:
        for (int64_t i = i0; i < i1; i++)
            y[i] = -x[i];
        break;
    case UOP_EXP:
        for (int64_t i = i0; i < i1; i++)
            y[i] = ku_expf(x[i]);
        break;
    case UOP_ERF:
        for (int64_t i = i0; i < i1; i++)
            y[i] = ku_erff(x[i]);
        break;
    case UOP_TANH:
        for (int64_t i = i0; i < i1; i++)
            y[i] = tanhf(x[i]);
        break;
    case UOP_SIGMOID:
        for (int64_t i = i0; i < i1; i++) {
            // split by sign so exp never overflows
            float v = x[i];
            if (v >= 0.0f) {
                y[i] = 1.0f / (1.0f + expf(-v));
            } else {
                float e = expf(v);
                y[i] = e / (1.0f + e);
            }
        }
        break;
    case UOP_RELU:
        for (int64_t i = i0; i < i1; i++)
            y[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
    case UOP_ABS:
        for (int64_t i = i0; i < i1; i++)
            y[i] = fabsf(x[i]);
        break;
    case UOP_GELU:
        for (int64_t i = i0; i < i1; i++)
            y[i] = gelu_erf(x[i]);
        break;
    case UOP_GELU_TANH:
        for (int64_t i = i0; i < i1; i++)
            y[i] = gelu_tanh(x[i]);
        break;
    }
}

static void int_forward(enum uop op, const struct opq_tensor *x, struct opq_tensor *y) {
    int64_t n = ku_numel(x);
    if (x->dtype == OPQ_DTYPE_INT64) {
        const int64_t *a = x->data;
        int64_t *b = y->data;
        for (int64_t i = 0; i < n; i++)
            b[i] = op == UOP_NEG   ? (int64_t)(0u - (uint64_t)a[i])
                   : op == UOP_ABS ? (a[i] < 0 ? (int64_t)(0u - (uint64_t)a[i]) : a[i])
                                   : (a[i] > 0 ? a[i] : 0);
    } else {
        const int32_t *a = x->data;
        int32_t *b = y->data;
        for (int64_t i = 0; i < n; i++)
            b[i] = op == UOP_NEG   ? (int32_t)(0u - (uint32_t)a[i])
                   : op == UOP_ABS ? (a[i] < 0 ? (int32_t)(0u - (uint32_t)a[i]) : a[i])
                                   : (a[i] > 0 ? a[i] : 0);
    }
}

static enum opq_status unary_forward(struct opq_kctx *k, const struct opq_tensor *const *in,
                                     struct opq_tensor *out, enum uop op) {
    if (!out[0].data)
        return OPQ_OK;
    if (in[0]->dtype != OPQ_DTYPE_FLOAT) {
        int_forward(op, in[0], &out[0]);
        return OPQ_OK;
    }
    struct un_job j = {op, in[0]->data, out[0].data};
    ku_parallel(k, ku_numel(in[0]), 1 << 14, un_range, &j);
    return OPQ_OK;
}

// Phi(x) + x phi(x), with the same branch-free erf/exp as the forward (vectorisable).
static inline float dgelu_erf(float x) {
    float cdf = 0.5f * (1.0f + ku_erff(x * INV_SQRT2));
    return cdf + x * INV_SQRT_2PI * ku_expf(-0.5f * x * x);
}

static float dgelu_tanh(float x) {
    float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
    float th = tanhf(u);
    return 0.5f * (1.0f + th) +
           0.5f * x * (1.0f - th * th) * SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
}

struct ubwd_job {
    enum uop op;
    const float *x, *y, *g;
    float *d;
};

// d = dY * f'(x) on elements i0..i1 (independent elements: any split gives the same bytes).
// One loop per op, so each is branch-free and vectorises.
KU_HOT static void ubwd_range(void *user, int64_t i0, int64_t i1) {
    const struct ubwd_job *j = user;
    const float *x = j->x;
    const float *y = j->y;
    const float *g = j->g;
    float *d = j->d;
    switch (j->op) {
    case UOP_SQRT:
        for (int64_t i = i0; i < i1; i++)
            d[i] = g[i] * 0.5f / y[i];
        break;
    case UOP_RECIP:
        for (int64_t i = i0; i < i1; i++)
            d[i] = -g[i] * y[i] * y[i];
        break;
    case UOP_NEG:
        for (int64_t i = i0; i < i1; i++)
            d[i] = -g[i];
        break;
    case UOP_EXP:
        for (int64_t i = i0; i < i1; i++)
            d[i] = g[i] * y[i];
        break;
    case UOP_ERF:
        for (int64_t i = i0; i < i1; i++)
            d[i] = g[i] * TWO_OVER_SQRTPI * ku_expf(-x[i] * x[i]);
        break;
    case UOP_TANH:
        for (int64_t i = i0; i < i1; i++)
            d[i] = g[i] * (1.0f - y[i] * y[i]);
        break;
    case UOP_SIGMOID:
        for (int64_t i = i0; i < i1; i++)
            d[i] = g[i] * y[i] * (1.0f - y[i]);
        break;
    case UOP_RELU:
        for (int64_t i = i0; i < i1; i++)
            d[i] = x[i] > 0.0f ? g[i] : 0.0f;
        break;
    case UOP_ABS:
        for (int64_t i = i0; i < i1; i++)
            d[i] = x[i] > 0.0f ? g[i] : x[i] < 0.0f ? -g[i] : 0.0f;
        break;
    case UOP_GELU:
        for (int64_t i = i0; i < i1; i++)
            d[i] = g[i] * dgelu_erf(x[i]);
        break;
    case UOP_GELU_TANH:
        for (int64_t i = i0; i < i1; i++)
            d[i] = g[i] * dgelu_tanh(x[i]);
        break;
    }
}

static enum opq_status unary_backward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in,
                                      const struct opq_tensor *out, const struct opq_tensor *dout,
                                      struct opq_tensor *din, enum uop op) {
    if (!din[0].data)
        return OPQ_OK;
    if (in[0]->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, "%s node '%s': backward needs float",
                             n->op_type, ku_name(n));
    int64_t cnt = ku_numel(in[0]);
    const float *x = in[0]->data;
    const float *y = out[0].data;
    const float *g = dout[0].data;
    float *d = din[0].data;
    if (!g) {
        memset(d, 0, din[0].nbytes);
        return OPQ_OK;
    }
    struct ubwd_job j = {op, x, y, g, d};
    ku_parallel(k, cnt, 1 << 14, ubwd_range, &j);
    return OPQ_OK;
}

#define UNARY_KERNEL(prefix, OP, MINSET)                                                           \
    static enum opq_status prefix##_forward(struct opq_kctx *k, const struct opq_node *n,          \
                                            const struct opq_tensor *const *in,                    \
                                            struct opq_tensor *out) {                              \
        (void)n;                                                                                   \
        return unary_forward(k, in, out, OP);                                                      \
    }                                                                                              \
    static enum opq_status prefix##_backward(                                                      \
        struct opq_kctx *k, const struct opq_node *n, const struct opq_tensor *const *in,          \
        const struct opq_tensor *out, const struct opq_tensor *dout, struct opq_tensor *din) {     \
        return unary_backward(k, n, in, out, dout, din, OP);                                       \
    }                                                                                              \
    const struct opq_kernel opq_kernel_##prefix = {                                                \
        .min_opset = MINSET,                                                                       \
        .infer = unary_infer,                                                                      \
        .forward = prefix##_forward,                                                               \
        .backward = prefix##_backward,                                                             \
    };

UNARY_KERNEL(sqrt, UOP_SQRT, 6)
UNARY_KERNEL(reciprocal, UOP_RECIP, 6)
UNARY_KERNEL(neg, UOP_NEG, 6)
UNARY_KERNEL(exp, UOP_EXP, 6)
UNARY_KERNEL(erf, UOP_ERF, 9)
UNARY_KERNEL(tanh, UOP_TANH, 6)
UNARY_KERNEL(sigmoid, UOP_SIGMOID, 6)
UNARY_KERNEL(relu, UOP_RELU, 6)
UNARY_KERNEL(abs, UOP_ABS, 6)

// ---- Gelu: the approximate attribute is digested into params ---------------------------------

static enum opq_status gelu_parse(struct opq_kctx *k, struct opq_graph *g, struct opq_node *n) {
    const struct opq_attr *a = opq_node_attr(n, "approximate");
    enum uop *op = opq_arena_alloc(g->arena, sizeof(*op));
    if (!op)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, "Gelu node '%s': out of memory", ku_name(n));
    *op = UOP_GELU;
    if (a) {
        if (a->type == OPQ_ATTR_STRING && a->s.len == 4 && memcmp(a->s.data, "tanh", 4) == 0)
            *op = UOP_GELU_TANH;
        else if (!(a->type == OPQ_ATTR_STRING && a->s.len == 4 &&
                   memcmp(a->s.data, "none", 4) == 0))
            return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                                 "Gelu node '%s': approximate must be \"none\" or \"tanh\"",
                                 ku_name(n));
    }
    n->params = op;
    return OPQ_OK;
}

static enum opq_status gelu_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    return unary_forward(k, in, out, *(const enum uop *)n->params);
}

static enum opq_status gelu_backward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in,
                                     const struct opq_tensor *out, const struct opq_tensor *dout,
                                     struct opq_tensor *din) {
    return unary_backward(k, n, in, out, dout, din, *(const enum uop *)n->params);
}

const struct opq_kernel opq_kernel_gelu = {
    .min_opset = 20,
    .parse = gelu_parse,
    .infer = unary_infer,
    .forward = gelu_forward,
    .backward = gelu_backward,
};
