/* quantize_flexround.c (pass): FlexRound weights in the block-reconstruction engine
 * (recon/recon.h, recon/flexround.c), the calibrated flow of src/quantize.c with the engine as
 * its refinement step. The units, data flow, QDrop, LSQ activation step sizes and the loss
 * (--recon-loss, APH by default as for quantize-aphq) are the engine's; only the weight rounding
 * differs: W_hat = s1 * round(W / (s1 S2 s3 [s4])) with the grid s1 and the divisors learned in
 * log space. Matches: every MatMul/Gemm/Conv the flow quantizes. Rewrites: as the quantize pass
 * (integer weight initializers whose DequantizeLinear scale is the learned grid s1, activation
 * Q/DQ pairs with the learned scales). Preserves: graph inputs/outputs, every non-quantized op.
 * Needs opts->quant (hyperparameters in opts->quant->recon). */
#include "pass.h"
#include "quantize.h"
#include "recon/recon.h"

enum opq_status opq_pass_run_quantize_flexround(struct opq_pass_ctx *pc, struct opq_graph *g) {
    (void)g;
    if (!pc->opts->quant)
        return opq_set_error(pc->ctx, OPQ_ERR_USAGE,
                             "the quantize-flexround pass needs quantization options "
                             "(calibration data)");
    struct opq_quant_opts o = *pc->opts->quant;
    o.recon.rounding = OPQ_RECON_FLEXROUND;
    o.recon.seed = pc->opts->seed; // --seed: batches and QDrop draws
    o.refine = opq_recon_refine;
    o.refine_user = &o.recon;
    return opq_pass_quantize_with(pc, &o);
}
