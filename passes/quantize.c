/* quantize.c (pass): calibrated round-to-nearest quantization of the whole graph, the driver in
 * src/quantize.c run as a pipeline step. Matches: every MatMul/Gemm/Conv (minus exclusions).
 * Rewrites: weights to integer initializers + DequantizeLinear, activations through shared
 * QuantizeLinear/DequantizeLinear pairs, optionally LayerNorm/linear reparameterization first.
 * Preserves: graph inputs/outputs, every non-quantized op. Needs opts->quant. */
#include "pass.h"
#include "quantize.h"

enum opq_status opq_pass_quantize_with(struct opq_pass_ctx *pc, const struct opq_quant_opts *o) {
    struct opq_report *rep = NULL;
    enum opq_status st = opq_quantize(pc->ctx, pc->model, o, pc->opts->report ? &rep : NULL);
    if (st != OPQ_OK)
        return st;
    pc->stats.n_rewrites = rep ? rep->n_qnodes : 0;
    if (pc->opts->report) {
        opq_report_free(*pc->opts->report);
        *pc->opts->report = rep;
    }
    return OPQ_OK;
}

enum opq_status opq_pass_run_quantize(struct opq_pass_ctx *pc, struct opq_graph *g) {
    (void)g;
    if (!pc->opts->quant)
        return opq_set_error(pc->ctx, OPQ_ERR_USAGE,
                             "the quantize pass needs quantization options (calibration data)");
    return opq_pass_quantize_with(pc, pc->opts->quant);
}
