/* erq_duq.c: the Q/DQ encoding of ERQ's dual uniform quantization (DUQ). A DUQ weight has, per
 * output channel, one grid for the outlier input columns and one for the others. Plain ONNX has
 * one (scale, zero point) per channel per DequantizeLinear, so the weight becomes two integer
 * initializers, each holding its group's codes and the zero point's code (which dequantizes to
 * exactly 0) elsewhere, dequantized per channel and summed:
 *     W = DQ(q_in; s_in, z_in) + DQ(q_out; s_out, z_out)  ->  Add  ->  MatMul / Gemm.
 * Every entry is exactly one grid value plus an exact 0, so the sum is exact in float. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph.h"
#include "quant/qdq.h"
#include "recon/erq.h"

// A float initializer shaped like layer l's weight holding the entries of group `want`
// (1: outlier columns) and 0 elsewhere.
static struct opq_value *group_init(struct opq_graph *g, const struct opq_erq_layer *l, int want,
                                    const char *hint) {
    size_t n = (size_t)l->d_in * (size_t)l->d_out;
    float *buf = malloc(sizeof(float) * n);
    if (!buf)
        return NULL;
    for (int i = 0; i < l->d_out; i++)
        for (int j = 0; j < l->d_in; j++) {
            size_t o = l->rows_are_in ? (size_t)j * (size_t)l->d_out + (size_t)i
                                      : (size_t)i * (size_t)l->d_in + (size_t)j;
            buf[o] = (l->outlier[j] != 0) == (want != 0) ? l->w[o] : 0.0f;
        }
    struct opq_tensor t = {.dtype = OPQ_DTYPE_FLOAT, .ndim = 2, .data = buf,
                           .nbytes = sizeof(float) * n};
    t.shape[0] = l->shape[0];
    t.shape[1] = l->shape[1];
    struct opq_value *v = opq_graph_value_new_unique(g, hint);
    if (v && opq_graph_set_initializer(g, v, &t) != OPQ_OK)
        v = NULL;
    free(buf);
    return v;
}

enum opq_status opq_erq_encode_duq(struct opq_graph *g, const struct opq_erq_state *s,
                                   int wbits, int64_t opset) {
    enum opq_status st = OPQ_OK;
    for (int li = 0; li < s->n_layers; li++) {
        const struct opq_erq_layer *l = &s->layers[li];
        if (l->n_outliers <= 0)
            continue;
        struct opq_node *n = l->node;
        struct opq_value *old = n && n->n_inputs > 1 ? n->inputs[1] : NULL;
        struct opq_node *dqn  = old ? old->producer : NULL;
        if (!dqn || (n->flags & OPQ_NF_DEAD) || strcmp(dqn->op_type, "DequantizeLinear") != 0)
            return opq_set_error(g->ctx, OPQ_ERR_INTERNAL,
                                 "erq: the weight of node '%s' is not a DequantizeLinear output",
                                 l->name);
        char hint[512];
        snprintf(hint, sizeof(hint), "%s_W_inliers", l->name);
        struct opq_value *w_in = group_init(g, l, 0, hint);
        snprintf(hint, sizeof(hint), "%s_W_outliers", l->name);
        struct opq_value *w_out = group_init(g, l, 1, hint);
        if (!w_in || !w_out)
            return OPQ_ERR_NOMEM;
        struct opq_qdq_spec sp = {.bits = wbits, .is_signed = true, .opset = opset,
                                  .axis = l->axis, .n_ch = l->n_ch, .p = l->qp_in};
        struct opq_value *dq_in, *dq_out;
        if ((st = opq_qdq_quantize_weight(g, w_in, &sp, &dq_in)) != OPQ_OK)
            return st;
        sp.p = l->qp_out;
        if ((st = opq_qdq_quantize_weight(g, w_out, &sp, &dq_out)) != OPQ_OK)
            return st;
        snprintf(hint, sizeof(hint), "%s_duq", old->name);
        struct opq_value *sum = opq_graph_value_new_unique(g, hint);
        if (!sum)
            return OPQ_ERR_NOMEM;
        sum->t        = old->t;
        sum->t.data   = NULL;
        sum->t.nbytes = 0;
        snprintf(hint, sizeof(hint), "%s_DUQ_Add", l->name);
        struct opq_value *in[2] = {dq_in, dq_out};
        if ((st = opq_graph_add_node(g, "Add", "", hint, in, 2, &sum, 1, NULL)) != OPQ_OK)
            return st;
        if ((st = opq_node_set_input(g, n, 1, sum)) != OPQ_OK)
            return st;
        if (old->n_users == 0 && !(old->kind & OPQ_VK_OUTPUT))
            opq_graph_mark_dead(g, dqn);
    }
    return st;
}
