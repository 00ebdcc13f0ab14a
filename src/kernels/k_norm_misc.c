/* k_norm_misc.c: BatchNormalization (inference), GlobalAveragePool, Clip, Min, Max.
 * https://onnx.ai/onnx/operators/onnx__BatchNormalization.html: opset 9+, training_mode = 0
 *   only; y = (x - mean) / sqrt(var + eps) * scale + B per channel (dim 1).
 * https://onnx.ai/onnx/operators/onnx__GlobalAveragePool.html: mean over dims 2.. (double sum).
 * https://onnx.ai/onnx/operators/onnx__Clip.html: opset 11+ min/max as optional inputs, older
 *   opsets as attributes. VJP: dX = dY where min <= x <= max, else 0.
 * https://onnx.ai/onnx/operators/onnx__Min.html / Max: variadic with broadcasting; float32,
 *   int32, int64. NaN propagates for floats, as in ORT. */
#include <float.h>
#include <math.h>

#include "k_math.h"

// ---- BatchNormalization ---------------------------------------------------------------------

static enum opq_status bn_infer(struct opq_kctx *k, const struct opq_node *n,
                                const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (opq_node_attr_int(n, "training_mode", 0) != 0 || n->n_inputs < 5)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "BatchNormalization node '%s': only "
                             "inference mode with 5 inputs is supported",
                             ku_name(n));
    for (int j = 1; j < n->n_outputs; j++)
        if (n->outputs[j])
            return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                                 "BatchNormalization node '%s': "
                                 "running statistics outputs are not supported",
                                 ku_name(n));
    const struct opq_tensor *x = in[0];
    if (!x || x->dtype != OPQ_DTYPE_FLOAT || x->ndim < 2)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "BatchNormalization node '%s': X must "
                             "be float32 of rank >= 2",
                             ku_name(n));
    for (int j = 1; j < 5; j++)
        if (!in[j] || in[j]->dtype != OPQ_DTYPE_FLOAT || ku_numel(in[j]) != x->shape[1])
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 "BatchNormalization node '%s': input %d "
                                 "must hold %lld float32 values",
                                 ku_name(n), j, (long long)x->shape[1]);
    out[0].dtype = OPQ_DTYPE_FLOAT;
    ku_copy_shape(&out[0], x);
    return OPQ_OK;
}

static enum opq_status bn_forward(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    float eps = opq_node_attr_float(n, "epsilon", 1e-5f);
    const float *x = in[0]->data;
    const float *sc = in[1]->data;
    const float *bias = in[2]->data;
    const float *mean = in[3]->data;
    const float *var = in[4]->data;
    float *y = out[0].data;
    int64_t nb = in[0]->shape[0];
    int64_t c = in[0]->shape[1];
    int64_t inner = c ? ku_numel(in[0]) / (nb * c) : 0;
    for (int64_t i = 0; i < nb; i++)
        for (int64_t ch = 0; ch < c; ch++) {
            float a = sc[ch] / sqrtf(var[ch] + eps);
            float b = bias[ch] - mean[ch] * a;
            const float *xs = x + (i * c + ch) * inner;
            float *ys = y + (i * c + ch) * inner;
            for (int64_t q = 0; q < inner; q++)
                ys[q] = xs[q] * a + b;
        }
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_batchnorm = {
    .min_opset = 9,
    .infer = bn_infer,
    .forward = bn_forward,
};

// ---- GlobalAveragePool ----------------------------------------------------------------------

static enum opq_status gap_infer(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (!in[0] || in[0]->dtype != OPQ_DTYPE_FLOAT || in[0]->ndim < 3)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "GlobalAveragePool node '%s': X must "
                             "be float32 of rank >= 3",
                             ku_name(n));
    out[0].dtype = OPQ_DTYPE_FLOAT;
    ku_copy_shape(&out[0], in[0]);
    for (int d = 2; d < out[0].ndim; d++)
        out[0].shape[d] = 1;
    return OPQ_OK;
}

static enum opq_status gap_forward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    (void)k;
    (void)n;
    int64_t rows = in[0]->shape[0] * in[0]->shape[1];
    int64_t inner = rows ? ku_numel(in[0]) / rows : 0;
    const float *x = in[0]->data;
    float *y = out[0].data;
    for (int64_t r = 0; r < rows; r++) {
        double s = 0.0;
        for (int64_t q = 0; q < inner; q++)
            s += (double)x[r * inner + q];
        y[r] = inner ? (float)(s / (double)inner) : 0.0f;
    }
    return OPQ_OK;
}

static enum opq_status gap_backward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in,
                                    const struct opq_tensor *out, const struct opq_tensor *dout,
                                    struct opq_tensor *din) {
    (void)k;
    (void)n;
    (void)out;
    if (!din[0].data)
        return OPQ_OK;
    int64_t rows = in[0]->shape[0] * in[0]->shape[1];
    int64_t inner = rows ? ku_numel(in[0]) / rows : 0;
    const float *dy = dout[0].data;
    float *dx = din[0].data;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t q = 0; q < inner; q++)
            dx[r * inner + q] = dy ? dy[r] / (float)inner : 0.0f;
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_globalaveragepool = {
    .min_opset = 1,
    .infer = gap_infer,
    .forward = gap_forward,
    .backward = gap_backward,
};

// ---- Clip -------------------------------------------------------------------------------------

// float32, or int8/uint8: the integer forms carry the exact low-bit emulation
// QuantizeLinear(int8) -> Clip(qmin, qmax) -> DequantizeLinear that onnx-ptq writes below opset 21.
static bool clip_int(enum opq_dtype dt) {
    return dt == OPQ_DTYPE_INT8 || dt == OPQ_DTYPE_UINT8;
}

static enum opq_status clip_infer(struct opq_kctx *k, const struct opq_node *n,
                                  const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (!in[0] || (in[0]->dtype != OPQ_DTYPE_FLOAT && !clip_int(in[0]->dtype)))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "Clip node '%s': needs float32, int8 or uint8", ku_name(n));
    for (int j = 1; j < 3 && j < n->n_inputs; j++)
        if (in[j] && (in[j]->dtype != in[0]->dtype || ku_numel(in[j]) != 1))
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE, "Clip node '%s': %s must be a %s scalar",
                                 ku_name(n), j == 1 ? "min" : "max", opq_dtype_name(in[0]->dtype));
    if (clip_int(in[0]->dtype) && k->opset < 12)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "Clip node '%s': integer Clip needs opset 12", ku_name(n));
    out[0].dtype = in[0]->dtype;
    ku_copy_shape(&out[0], in[0]);
    return OPQ_OK;
}

// Integer Clip: bounds default to the type's range.
static void clip_forward_int(const struct opq_node *n, const struct opq_tensor *const *in,
                             struct opq_tensor *out) {
    bool s8 = in[0]->dtype == OPQ_DTYPE_INT8;
    int lo = s8 ? -128 : 0, hi = s8 ? 127 : 255;
    int64_t cnt = ku_numel(in[0]);
    if (n->n_inputs > 1 && in[1])
        lo = s8 ? *(const int8_t *)in[1]->data : *(const uint8_t *)in[1]->data;
    if (n->n_inputs > 2 && in[2])
        hi = s8 ? *(const int8_t *)in[2]->data : *(const uint8_t *)in[2]->data;
    for (int64_t i = 0; i < cnt; i++) {
        int v = s8 ? ((const int8_t *)in[0]->data)[i] : ((const uint8_t *)in[0]->data)[i];
        v = v < lo ? lo : (v > hi ? hi : v);
        if (s8)
            ((int8_t *)out[0].data)[i] = (int8_t)v;
        else
            ((uint8_t *)out[0].data)[i] = (uint8_t)v;
    }
}

static void clip_bounds(struct opq_kctx *k, const struct opq_node *n,
                        const struct opq_tensor *const *in, float *lo, float *hi) {
    if (k->opset < 11) {
        *lo = opq_node_attr_float(n, "min", -FLT_MAX);
        *hi = opq_node_attr_float(n, "max", FLT_MAX);
        return;
    }
    *lo = n->n_inputs > 1 && in[1] ? *(const float *)in[1]->data : -INFINITY;
    *hi = n->n_inputs > 2 && in[2] ? *(const float *)in[2]->data : INFINITY;
}

static enum opq_status clip_forward(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (clip_int(in[0]->dtype)) {
        clip_forward_int(n, in, out);
        return OPQ_OK;
    }
    float lo;
    float hi;
    clip_bounds(k, n, in, &lo, &hi);
    const float *x = in[0]->data;
    float *y = out[0].data;
    int64_t cnt = ku_numel(in[0]);
    for (int64_t i = 0; i < cnt; i++) {
        float v = x[i] < lo ? lo : x[i];
        y[i] = v > hi ? hi : v;
    }
    return OPQ_OK;
}

static enum opq_status clip_backward(struct opq_kctx *k, const struct opq_node *n,
                                     const struct opq_tensor *const *in,
                                     const struct opq_tensor *out, const struct opq_tensor *dout,
                                     struct opq_tensor *din) {
    (void)out;
    if (clip_int(in[0]->dtype))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED,
                             "Clip node '%s': integer Clip has no gradient", ku_name(n));
    float lo;
    float hi;
    clip_bounds(k, n, in, &lo, &hi);
    // gradients of the bounds themselves are not propagated (they are constants in practice)
    for (int j = 1; j < 3 && j < n->n_inputs; j++)
        if (din[j].data)
            memset(din[j].data, 0, din[j].nbytes);
    if (!din[0].data)
        return OPQ_OK;
    const float *x = in[0]->data;
    const float *dy = dout[0].data;
    float *dx = din[0].data;
    int64_t cnt = ku_numel(in[0]);
    for (int64_t i = 0; i < cnt; i++)
        dx[i] = dy && x[i] >= lo && x[i] <= hi ? dy[i] : 0.0f;
    return OPQ_OK;
}

const struct opq_kernel opq_kernel_clip = {
    .min_opset = 6,
    .infer = clip_infer,
    .forward = clip_forward,
    .backward = clip_backward,
};

// ---- Min / Max --------------------------------------------------------------------------------

static enum opq_status minmax_infer(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    if (n->n_inputs < 1 || !in[0])
        return opq_set_error(k->ctx, OPQ_ERR_INVALID_MODEL, "%s node '%s': needs inputs",
                             n->op_type, ku_name(n));
    enum opq_dtype dt = in[0]->dtype;
    if (dt != OPQ_DTYPE_FLOAT && dt != OPQ_DTYPE_INT64 && dt != OPQ_DTYPE_INT32)
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, "%s node '%s': dtype %s", n->op_type,
                             ku_name(n), opq_dtype_name(dt));
    struct opq_tensor acc = *in[0];
    for (int j = 1; j < n->n_inputs; j++) {
        if (!in[j] || in[j]->dtype != dt)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE,
                                 "%s node '%s': inputs must share one "
                                 "dtype",
                                 n->op_type, ku_name(n));
        struct opq_tensor r = acc;
        if (opq_broadcast_shape(&acc, in[j], &r) != OPQ_OK)
            return opq_set_error(k->ctx, OPQ_ERR_SHAPE, "%s node '%s': shapes cannot broadcast",
                                 n->op_type, ku_name(n));
        acc = r;
    }
    out[0].dtype = dt;
    ku_copy_shape(&out[0], &acc);
    return OPQ_OK;
}

static enum opq_status minmax_forward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out,
                                      bool is_max) {
    (void)k;
    struct opq_tensor *y = &out[0];
    int64_t cnt = ku_numel(y);
    int64_t inner = y->ndim ? y->shape[y->ndim - 1] : 1;
    for (int j = 0; j < n->n_inputs; j++) {
        int64_t s[OPQ_MAX_DIMS] = {0};
        ku_bcast_strides(in[j], y, s);
        int64_t si = y->ndim ? s[y->ndim - 1] : 0;
        for (int64_t row = 0; inner && row < cnt / inner; row++) {
            int64_t off = ku_row_offset(y, s, row);
            for (int64_t q = 0; q < inner; q++) {
                int64_t o = row * inner + q;
                int64_t ii = off + q * si;
                if (y->dtype == OPQ_DTYPE_FLOAT) {
                    float v = ((const float *)in[j]->data)[ii];
                    float *py = (float *)y->data + o;
                    if (j == 0 || isnan(v) || (is_max ? v > *py : v < *py))
                        *py = isnan(*py) && j ? *py : v;
                } else if (y->dtype == OPQ_DTYPE_INT64) {
                    int64_t v = ((const int64_t *)in[j]->data)[ii];
                    int64_t *py = (int64_t *)y->data + o;
                    if (j == 0 || (is_max ? v > *py : v < *py))
                        *py = v;
                } else {
                    int32_t v = ((const int32_t *)in[j]->data)[ii];
                    int32_t *py = (int32_t *)y->data + o;
                    if (j == 0 || (is_max ? v > *py : v < *py))
                        *py = v;
                }
            }
        }
    }
    return OPQ_OK;
}

static enum opq_status min_forward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    return minmax_forward(k, n, in, out, false);
}

static enum opq_status max_forward(struct opq_kctx *k, const struct opq_node *n,
                                   const struct opq_tensor *const *in, struct opq_tensor *out) {
    return minmax_forward(k, n, in, out, true);
}

const struct opq_kernel opq_kernel_min = {
    .min_opset = 8,
    .infer = minmax_infer,
    .forward = min_forward,
};

const struct opq_kernel opq_kernel_max = {
    .min_opset = 8,
    .infer = minmax_infer,
    .forward = max_forward,
};
