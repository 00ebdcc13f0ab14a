/* k_qdq.c: QuantizeLinear / DequantizeLinear.
 *   https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html     (opsets 10, 13, 19, 21)
 *   https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html
 *
 *   Q:  y = saturate(round_half_even(x / scale) + zero_point)      (x / scale in float32)
 *   DQ: y = (x - zero_point) * scale                                (in float32)
 *
 * Granularity from the scale's shape: per-tensor (scalar or one element), per-axis (1-D of
 * x.shape[axis]; `axis` 13+, default 1) or blocked (opset 21 `block_size` > 0: scale has x's rank
 * with shape[axis] = ceil(x.shape[axis] / block_size)). zero_point, when given, has the scale's
 * shape and fixes the quantized dtype; otherwise Q uses `output_dtype` (21) or uint8.
 * Quantized dtypes: int8, uint8, int16, uint16, int4, uint4 (packed two per byte, low nibble
 * first) and int32 (DQ only, zero point 0). Integer results always saturate to the dtype's range
 * (the `saturate` attribute of opset 19 concerns float8 only, which is refused). Rounding uses
 * nearbyintf (ties to even in the default rounding mode). Scales: float32, float16, bfloat16;
 * x for Q may be float32/float16/bfloat16/int32. No VJP (fake-quant STE lives in src/quant). */
#include <math.h>
#include <string.h>

#include "graph.h"
#include "k_lutil.h"

// Where the scale of element (o, a, t) lives: o * so + (a / bs) * sa + t * st, with x viewed
// as [outer, dim(axis), inner].
struct qmap {
    size_t  outer, inner;
    int64_t dim;
    int64_t bs;
    size_t  so, sa, st;
};

static enum opq_status qerr(struct opq_kctx *k, const struct opq_node *n, enum opq_status st,
                            const char *what) {
    return opq_set_error(k->ctx, st, OPQ_KL_NODE_FMT ": %s", OPQ_KL_NODE(n), what);
}

static bool qrange(enum opq_dtype dt, int64_t *lo, int64_t *hi) {
    switch (dt) {
    case OPQ_DTYPE_INT8:   *lo = -128;   *hi = 127;   return true;
    case OPQ_DTYPE_UINT8:  *lo = 0;      *hi = 255;   return true;
    case OPQ_DTYPE_INT16:  *lo = -32768; *hi = 32767; return true;
    case OPQ_DTYPE_UINT16: *lo = 0;      *hi = 65535; return true;
    case OPQ_DTYPE_INT4:   *lo = -8;     *hi = 7;     return true;
    case OPQ_DTYPE_UINT4:  *lo = 0;      *hi = 15;    return true;
    case OPQ_DTYPE_INT32:  *lo = INT32_MIN; *hi = INT32_MAX; return true;
    default: return false;
    }
}

static int64_t qget(const void *p, enum opq_dtype dt, size_t i) {
    if (dt == OPQ_DTYPE_INT4 || dt == OPQ_DTYPE_UINT4) {
        uint8_t b = ((const uint8_t *)p)[i / 2];
        int v = (i & 1) ? b >> 4 : b & 0x0f;
        if (dt == OPQ_DTYPE_INT4 && v >= 8)
            v -= 16;
        return v;
    }
    return opq_kl_get_i64(p, dt, i);
}

static void qset(void *p, enum opq_dtype dt, size_t i, int64_t v) {
    if (dt == OPQ_DTYPE_INT4 || dt == OPQ_DTYPE_UINT4) {
        uint8_t *b = (uint8_t *)p + i / 2;
        uint8_t nib = (uint8_t)(v & 0x0f);
        *b = (i & 1) ? (uint8_t)((*b & 0x0f) | (nib << 4)) : (uint8_t)((*b & 0xf0) | nib);
        return;
    }
    opq_kl_set_i64(p, dt, i, v);
}

static bool scale_dtype_ok(enum opq_dtype dt) {
    return dt == OPQ_DTYPE_FLOAT || dt == OPQ_DTYPE_FLOAT16 || dt == OPQ_DTYPE_BFLOAT16;
}

// Validates scale/zero-point shapes against x and fills the index map.
static enum opq_status qmap_init(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *x, const struct opq_tensor *scale,
                                 const struct opq_tensor *zp, struct qmap *m) {
    memset(m, 0, sizeof(*m));
    m->outer = 1;
    m->inner = 1;
    m->dim = 1;
    m->bs = 1;
    if (x->ndim < 0 || scale->ndim < 0)
        return qerr(k, n, OPQ_ERR_SHAPE, "input ranks must be known");
    if (!scale_dtype_ok(scale->dtype))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": scale dtype %s",
                             OPQ_KL_NODE(n), opq_dtype_name(scale->dtype));
    if (zp) {
        if (zp->ndim != scale->ndim)
            return qerr(k, n, OPQ_ERR_SHAPE, "zero point and scale differ in shape");
        for (int d = 0; d < zp->ndim; d++)
            if (zp->shape[d] != scale->shape[d])
                return qerr(k, n, OPQ_ERR_SHAPE, "zero point and scale differ in shape");
    }
    int64_t block = opq_node_attr_int(n, "block_size", 0);
    size_t sn = opq_kl_numel(scale);
    if (block < 0)
        return qerr(k, n, OPQ_ERR_INVALID_MODEL, "block_size must be >= 0");
    if (block == 0 && scale->ndim <= 1 && sn == 1) {
        m->outer = opq_kl_numel(x); // per-tensor: every element reads scale[0]
        return OPQ_OK;
    }
    int axis = 0;
    if (!opq_axis_norm(opq_node_attr_int(n, "axis", 1), x->ndim, &axis))
        return qerr(k, n, OPQ_ERR_SHAPE, "axis out of range");
    for (int d = 0; d < x->ndim; d++) {
        if (x->shape[d] < 0)
            return qerr(k, n, OPQ_ERR_SHAPE, "input dims must be known");
        if (d < axis)
            m->outer *= (size_t)x->shape[d];
        else if (d > axis)
            m->inner *= (size_t)x->shape[d];
    }
    m->dim = x->shape[axis];
    if (block == 0) {
        if (scale->ndim != 1 || scale->shape[0] != m->dim)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 OPQ_KL_NODE_FMT ": per-axis scale must be 1-D of size %lld "
                                 "(axis %d)",
                                 OPQ_KL_NODE(n), (long long)m->dim, axis);
        m->sa = 1;
        return OPQ_OK;
    }
    if (scale->ndim != x->ndim)
        return qerr(k, n, OPQ_ERR_SHAPE, "blocked scale must have the input's rank");
    int64_t nblocks = (m->dim + block - 1) / block;
    for (int d = 0; d < x->ndim; d++) {
        int64_t want = d == axis ? nblocks : x->shape[d];
        if (scale->shape[d] != want)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 OPQ_KL_NODE_FMT ": blocked scale dim %d is %lld, expected %lld",
                                 OPQ_KL_NODE(n), d, (long long)scale->shape[d], (long long)want);
    }
    m->bs = block;
    m->so = (size_t)nblocks * m->inner;
    m->sa = m->inner;
    m->st = 1;
    return OPQ_OK;
}

// Quantized dtype of a QuantizeLinear node.
static enum opq_dtype q_out_dtype(const struct opq_node *n, const struct opq_tensor *zp) {
    if (zp)
        return zp->dtype;
    int64_t od = opq_node_attr_int(n, "output_dtype", 0);
    return od > 0 && od < OPQ_DTYPE_COUNT ? (enum opq_dtype)od : OPQ_DTYPE_UINT8;
}

static const struct opq_tensor *opt_in(const struct opq_node *n, const struct opq_tensor *const *in,
                                       int i) {
    return n->n_inputs > i ? in[i] : NULL;
}

static enum opq_status quantize_infer(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct qmap m;
    int64_t lo = 0;
    int64_t hi = 0;
    const struct opq_tensor *zp = opt_in(n, in, 2);
    if (n->n_inputs < 2 || !in[1])
        return qerr(k, n, OPQ_ERR_INVALID_MODEL, "needs x and y_scale");
    enum opq_dtype qt = q_out_dtype(n, zp);
    if (!qrange(qt, &lo, &hi) || qt == OPQ_DTYPE_INT32)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": quantized dtype %s",
                             OPQ_KL_NODE(n), opq_dtype_name(qt));
    if (zp && opq_node_attr_int(n, "output_dtype", 0) > 0 &&
        opq_node_attr_int(n, "output_dtype", 0) != (int64_t)zp->dtype)
        return qerr(k, n, OPQ_ERR_INVALID_MODEL, "output_dtype differs from the zero point's");
    if (!scale_dtype_ok(in[0]->dtype) && in[0]->dtype != OPQ_DTYPE_INT32)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": input dtype %s",
                             OPQ_KL_NODE(n), opq_dtype_name(in[0]->dtype));
    enum opq_status st = qmap_init(k, n, in[0], in[1], zp, &m);
    if (st)
        return st;
    *out = *in[0];
    out->data = NULL;
    out->dtype = qt;
    return opq_kl_finish(k, n, out);
}

static bool is_q8(enum opq_dtype dt) {
    return dt == OPQ_DTYPE_INT8 || dt == OPQ_DTYPE_UINT8;
}

// Zero point `si` of an int8/uint8 tensor as float (0 without one).
static float zp8(const struct opq_tensor *zp, size_t si) {
    if (!zp)
        return 0.0f;
    return zp->dtype == OPQ_DTYPE_INT8 ? (float)((const int8_t *)zp->data)[si]
                                       : (float)((const uint8_t *)zp->data)[si];
}

// Fast path of QuantizeLinear: float32 in, int8/uint8 out, one scale per tensor or per slice of
// the axis (no blocks along the inner dims). Same arithmetic as the general loop: x / s, round
// half to even, add the zero point, saturate; NaN maps to the zero point.
static void quantize_q8(const struct qmap *m, const struct opq_tensor *x,
                        const struct opq_tensor *sc, const struct opq_tensor *zp,
                        enum opq_dtype qt, float lo, float hi, void *out) {
    const float *xs = x->data, *ss = sc->data;
    size_t i = 0;
    for (size_t o = 0; o < m->outer; o++)
        for (int64_t a = 0; a < m->dim; a++) {
            size_t si = o * m->so + (size_t)(a / m->bs) * m->sa;
            float s = ss[si], z = zp8(zp, si);
            for (size_t t = 0; t < m->inner; t++, i++) {
                // round half to even without a libm call (so the loop vectorises): adding and
                // removing 1.5 * 2^23 rounds exactly like nearbyintf in the default rounding mode
                // for |r| < 2^22; larger values saturate anyway, NaN stays NaN
                float r = xs[i] / s;
                r       = fabsf(r) < 4194304.0f ? (r + 12582912.0f) - 12582912.0f : r;
                float v = r + z;
                v = v != v ? z : (v < lo ? lo : (v > hi ? hi : v));
                if (qt == OPQ_DTYPE_INT8)
                    ((int8_t *)out)[i] = (int8_t)v;
                else
                    ((uint8_t *)out)[i] = (uint8_t)v;
            }
        }
}

static enum opq_status quantize_forward(struct opq_kctx *k, const struct opq_node *n,
                                        const struct opq_tensor *const *in,
                                        struct opq_tensor *out) {
    struct qmap m;
    int64_t lo = 0;
    int64_t hi = 0;
    const struct opq_tensor *x = in[0];
    const struct opq_tensor *sc = in[1];
    const struct opq_tensor *zp = opt_in(n, in, 2);
    enum opq_status st = qmap_init(k, n, x, sc, zp, &m);
    if (st)
        return st;
    enum opq_dtype qt = out->dtype;
    qrange(qt, &lo, &hi);
    if (opq_dtype_is_packed4(qt))
        memset(out->data, 0, out->nbytes);
    bool fast = x->dtype == OPQ_DTYPE_FLOAT && sc->dtype == OPQ_DTYPE_FLOAT;
    if (fast && is_q8(qt) && (!zp || zp->dtype == qt) && m.st == 0) {
        quantize_q8(&m, x, sc, zp, qt, (float)lo, (float)hi, out->data);
        return OPQ_OK;
    }
    size_t i = 0;
    for (size_t o = 0; o < m.outer; o++)
        for (int64_t a = 0; a < m.dim; a++)
            for (size_t t = 0; t < m.inner; t++, i++) {
                size_t si = o * m.so + (size_t)(a / m.bs) * m.sa + t * m.st;
                float s = fast ? ((const float *)sc->data)[si]
                               : (float)opq_kl_get_f64(sc->data, sc->dtype, si);
                float xv = fast ? ((const float *)x->data)[i]
                                : (float)opq_kl_get_f64(x->data, x->dtype, i);
                float r = nearbyintf(xv / s);
                int64_t z = zp ? qget(zp->data, zp->dtype, si) : 0;
                float v = r + (float)z;
                int64_t q;
                if (!(v == v))
                    q = z; // NaN input: the zero point (what x = 0 maps to)
                else if (v <= (float)lo)
                    q = lo;
                else if (v >= (float)hi)
                    q = hi;
                else
                    q = (int64_t)v;
                qset(out->data, qt, i, q);
            }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_quantizelinear = {
    .min_opset = 10,
    .infer     = quantize_infer,
    .forward   = quantize_forward,
};

static enum opq_status dequantize_infer(struct opq_kctx *k, const struct opq_node *n,
                                        const struct opq_tensor *const *in,
                                        struct opq_tensor *out) {
    struct qmap m;
    int64_t lo = 0;
    int64_t hi = 0;
    const struct opq_tensor *zp = opt_in(n, in, 2);
    if (n->n_inputs < 2 || !in[1])
        return qerr(k, n, OPQ_ERR_INVALID_MODEL, "needs x and x_scale");
    if (!qrange(in[0]->dtype, &lo, &hi))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": input dtype %s",
                             OPQ_KL_NODE(n), opq_dtype_name(in[0]->dtype));
    if (zp && zp->dtype != in[0]->dtype)
        return qerr(k, n, OPQ_ERR_SHAPE, "zero point dtype differs from x's");
    enum opq_status st = qmap_init(k, n, in[0], in[1], zp, &m);
    if (st)
        return st;
    *out = *in[0];
    out->data = NULL;
    out->dtype = in[1]->dtype;
    return opq_kl_finish(k, n, out);
}

static enum opq_status dequantize_forward(struct opq_kctx *k, const struct opq_node *n,
                                          const struct opq_tensor *const *in,
                                          struct opq_tensor *out) {
    struct qmap m;
    const struct opq_tensor *x = in[0];
    const struct opq_tensor *sc = in[1];
    const struct opq_tensor *zp = opt_in(n, in, 2);
    enum opq_status st = qmap_init(k, n, x, sc, zp, &m);
    if (st)
        return st;
    bool fast = sc->dtype == OPQ_DTYPE_FLOAT;
    if (fast && out->dtype == OPQ_DTYPE_FLOAT && is_q8(x->dtype) && (!zp || zp->dtype == x->dtype) &&
        m.st == 0) {
        // fast path: int8/uint8 codes, one scale per tensor or per slice of the axis
        float *y = out->data;
        size_t i = 0;
        for (size_t o = 0; o < m.outer; o++)
            for (int64_t a = 0; a < m.dim; a++) {
                size_t si = o * m.so + (size_t)(a / m.bs) * m.sa;
                float s = ((const float *)sc->data)[si], z = zp8(zp, si);
                if (x->dtype == OPQ_DTYPE_INT8)
                    for (size_t t = 0; t < m.inner; t++, i++)
                        y[i] = ((float)((const int8_t *)x->data)[i] - z) * s;
                else
                    for (size_t t = 0; t < m.inner; t++, i++)
                        y[i] = ((float)((const uint8_t *)x->data)[i] - z) * s;
            }
        return OPQ_OK;
    }
    size_t i = 0;
    for (size_t o = 0; o < m.outer; o++)
        for (int64_t a = 0; a < m.dim; a++)
            for (size_t t = 0; t < m.inner; t++, i++) {
                size_t si = o * m.so + (size_t)(a / m.bs) * m.sa + t * m.st;
                float s = fast ? ((const float *)sc->data)[si]
                               : (float)opq_kl_get_f64(sc->data, sc->dtype, si);
                int64_t z = zp ? qget(zp->data, zp->dtype, si) : 0;
                float y = ((float)qget(x->data, x->dtype, i) - (float)z) * s;
                if (fast)
                    ((float *)out->data)[i] = y;
                else
                    opq_kl_set_f64(out->data, out->dtype, i, (double)y);
            }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_dequantizelinear = {
    .min_opset = 10,
    .infer     = dequantize_infer,
    .forward   = dequantize_forward,
};
