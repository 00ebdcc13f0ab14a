/* trt_check.h: checks a quantized model against TensorRT's explicit-quantization rules, so that
 * `--target trt` output is known to build. The rules (TensorRT developer guide, "Explicit
 * Quantization", and the ONNX parser's Q/DQ importer):
 *   1. Q/DQ are int8 only (no uint8, no 4-bit), with zero points all 0 and finite positive scales.
 *   2. Activations (a QuantizeLinear of a computed tensor) are quantized per tensor.
 *   3. Weights (an int8 initializer -> DequantizeLinear) are per tensor or per output channel,
 *      on the consumer's output-channel axis (Conv 0, MatMul B last, Gemm B 0 if transB else 1),
 *      with codes in [-127, 127].
 *   4. A QuantizeLinear feeds DequantizeLinear nodes only (no Clip emulation in between).
 *   5. The model's default-domain opset is at least 13 (per-channel DequantizeLinear). */
#ifndef OPQ_TRT_CHECK_H
#define OPQ_TRT_CHECK_H

#include "graph.h"

// OPQ_OK, or OPQ_ERR_UNSUPPORTED with a message naming the node and the rule broken.
enum opq_status opq_trt_check(struct opq_ctx *ctx, const struct opq_model *m);

#endif
