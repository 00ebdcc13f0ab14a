/* qdq.h: writing quantization into the graph as plain ONNX QuantizeLinear/DequantizeLinear.
 *
 * Encoding rules (what ONNX Runtime and TensorRT consume):
 *   - Activations: x -> QuantizeLinear -> DequantizeLinear -> consumers, one pair per tensor shared
 *     by all its consumers. Graph outputs keep the float value.
 *   - Weights: an integer initializer -> DequantizeLinear (per-axis when several channels).
 *   - 8 bits: int8/uint8. Fewer bits: int4/uint4 when the model is at opset >= 21 (and bits <= 4);
 *     otherwise the exact emulation QuantizeLinear(int8) -> Clip(qmin, qmax) -> DequantizeLinear,
 *     and weights are stored as int8 holding b-bit codes in [qmin, qmax].
 *   - Bias: int32 initializer with scale s_x * s_w per output channel, zero point 0.
 * New nodes are appended; callers sort the graph (opq_graph_sort) once they are done. */
#ifndef OPQ_QDQ_H
#define OPQ_QDQ_H

#include "graph.h"
#include "quant/qparams.h"

struct opq_qdq_spec {
    int                        bits;      // 2..8
    bool                       is_signed; // int vs uint codes
    int64_t                    opset;     // the model's default-domain opset (13..21)
    int                        axis;      // channel axis when n_ch > 1
    int                        n_ch;      // 1: per tensor
    const struct opq_qparams  *p;         // n_ch entries, grids of `bits` bits
    // opq_qdq_quantize_weight: if non-NULL, receive sum(w^2) and sum((w - dq(q(w)))^2) over the
    // weight, from the same pass that makes its codes (the report's SQNR)
    double                    *sig2, *err2;
};

// Storage type of b-bit codes at an opset: INT4/UINT4 for b <= 4 at opset >= 21, else INT8/UINT8.
enum opq_dtype opq_qdq_storage(int bits, bool is_signed, int64_t opset);

// Inserts Q -> [Clip] -> DQ after activation v and redirects node inputs that read v to the DQ
// output (*dq, optional): those of the n_only nodes in `only`, or every user when only == NULL
// (other consumers, e.g. a float residual Add, keep reading v). v must be float32.
enum opq_status opq_qdq_insert_activation(struct opq_graph *g, struct opq_value *v,
                                          const struct opq_qdq_spec *s, const char *name_hint,
                                          struct opq_node *const *only, int n_only,
                                          struct opq_value **dq);

// Replaces the float initializer w by integer codes + DequantizeLinear for all its users. The
// codes are clamp(nearbyint(w / scale) + zp, qmin, qmax) per channel along s->axis. *dq optional.
enum opq_status opq_qdq_quantize_weight(struct opq_graph *g, struct opq_value *w,
                                        const struct opq_qdq_spec *s, struct opq_value **dq);

// Replaces float bias b (1-D, n entries) by an int32 initializer + DequantizeLinear with scale
// scales[c] (= s_x * s_w[c]; n_scales is 1 or n). Codes that do not fit int32 are an error
// (OPQ_ERR_NUMERIC naming the bias); callers then keep the bias float.
enum opq_status opq_qdq_quantize_bias(struct opq_graph *g, struct opq_value *b,
                                      const float *scales, int n_scales, struct opq_value **dq);

#endif
