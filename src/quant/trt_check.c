/* trt_check.c: TensorRT explicit-quantization rule checker (see trt_check.h). */
#include "quant/trt_check.h"

#include <math.h>
#include <string.h>

static enum opq_status fail(struct opq_ctx *ctx, const struct opq_node *n, const char *rule) {
    return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED, "TensorRT rule broken at %s '%s': %s",
                         n->op_type, n->name, rule);
}

static bool all_zero(const struct opq_value *v) {
    if (!v)
        return true; // absent zero point means 0
    if (!(v->kind & OPQ_VK_INIT) || !v->t.data)
        return false;
    const uint8_t *p = v->t.data;
    for (size_t i = 0; i < v->t.nbytes; i++)
        if (p[i])
            return false;
    return true;
}

// Expected channel axis of a weight DQ output `w` read by its consumers (-2 if they disagree or
// one is not a weighted op).
static int consumer_axis(const struct opq_value *w) {
    int axis = -2;
    for (int u = 0; u < w->n_users; u++) {
        const struct opq_node *c = w->users[u];
        int a = -2;
        if (c->op == OPQ_OP_CONV && c->inputs[1] == w)
            a = 0;
        else if (c->op == OPQ_OP_MATMUL && c->inputs[1] == w)
            a = w->t.ndim - 1;
        else if (c->op == OPQ_OP_GEMM && c->n_inputs > 1 && c->inputs[1] == w)
            a = opq_node_attr_int(c, "transB", 0) ? 0 : 1;
        if (a == -2 || (axis != -2 && axis != a))
            return -2;
        axis = a;
    }
    return axis;
}

enum opq_status opq_trt_check(struct opq_ctx *ctx, const struct opq_model *m) {
    const struct opq_graph *g = m->graph;
    if (opq_model_opset(m, "") < 13)
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                             "TensorRT rule broken: opset %lld < 13 (per-channel Q/DQ)",
                             (long long)opq_model_opset(m, ""));
    for (int i = 0; i < g->n_nodes; i++) {
        const struct opq_node *n = g->nodes[i];
        bool q = n->op == OPQ_OP_QUANTIZELINEAR, dq = n->op == OPQ_OP_DEQUANTIZELINEAR;
        if (!q && !dq)
            continue;
        if (n->n_inputs < 2 || !n->inputs[1])
            return fail(ctx, n, "no scale input");
        const struct opq_value *scale = n->inputs[1];
        const struct opq_value *zp = n->n_inputs > 2 ? n->inputs[2] : NULL;
        const struct opq_value *codes = q ? n->outputs[0] : n->inputs[0];
        enum opq_dtype qt = zp ? zp->t.dtype : (codes ? codes->t.dtype : OPQ_DTYPE_UNDEF);
        if (qt != OPQ_DTYPE_INT8)
            return fail(ctx, n, "quantized type must be int8");
        if (!all_zero(zp))
            return fail(ctx, n, "zero point must be 0 (TensorRT is symmetric)");
        if (!(scale->kind & OPQ_VK_INIT) || scale->t.dtype != OPQ_DTYPE_FLOAT || !scale->t.data)
            return fail(ctx, n, "scale must be a float32 initializer");
        size_t ns;
        if (!opq_tensor_numel(&scale->t, &ns) || ns == 0)
            return fail(ctx, n, "scale has no elements");
        for (size_t k = 0; k < ns; k++) {
            float s = ((const float *)scale->t.data)[k];
            if (!(isfinite(s) && s > 0.0f))
                return fail(ctx, n, "scales must be finite and positive");
        }
        if (opq_node_attr(n, "block_size"))
            return fail(ctx, n, "block quantization is for 4-bit weights only");
        if (q) {
            if (ns != 1)
                return fail(ctx, n, "activations must be quantized per tensor");
            const struct opq_value *out = n->outputs[0];
            for (int u = 0; out && u < out->n_users; u++)
                if (out->users[u]->op != OPQ_OP_DEQUANTIZELINEAR)
                    return fail(ctx, n, "a QuantizeLinear must feed DequantizeLinear only");
            continue;
        }
        // DequantizeLinear of an initializer: a weight.
        const struct opq_value *w = n->inputs[0];
        if (w && (w->kind & OPQ_VK_INIT)) {
            const int8_t *c = w->t.data;
            for (size_t k = 0; c && k < w->t.nbytes; k++)
                if (c[k] == -128)
                    return fail(ctx, n, "weight codes must lie in [-127, 127]");
            if (ns > 1) {
                int64_t axis = opq_node_attr_int(n, "axis", 1);
                if (axis < 0)
                    axis += w->t.ndim;
                int want = consumer_axis(n->outputs[0]);
                if (want < 0 || axis != want)
                    return fail(ctx, n, "per-channel weights must use the output-channel axis");
                if (w->t.shape[axis] != (int64_t)ns)
                    return fail(ctx, n, "per-channel scale count must equal the axis size");
            }
        } else if (ns != 1) {
            return fail(ctx, n, "activations must be dequantized per tensor");
        }
    }
    return OPQ_OK;
}
