/* quantize_aphq.c (pass): APHQ-ViT block reconstruction (recon/recon.h), the calibrated flow of
 * src/quantize.c with the reconstruction engine as its refinement step: AdaRound weights and
 * LSQ activation step sizes trained unit by unit (embedding, each transformer block, head)
 * against the float model under the average-perturbation-Hessian weighted output loss, with
 * QDrop. Matches: every MatMul/Gemm/Conv the flow quantizes. Rewrites: as the quantize pass
 * (integer weight initializers + DequantizeLinear, activation Q/DQ pairs with the learned
 * scales). Preserves: graph inputs/outputs, every non-quantized op. Needs opts->quant
 * (hyperparameters in opts->quant->recon). MLP reconstruction runs before it as the mlp-recon
 * pass (--mlp-recon). */
#include "pass.h"
#include "quantize.h"
#include "recon/recon.h"

enum opq_status opq_pass_run_quantize_aphq(struct opq_pass_ctx *pc, struct opq_graph *g) {
    (void)g;
    if (!pc->opts->quant)
        return opq_set_error(pc->ctx, OPQ_ERR_USAGE,
                             "the quantize-aphq pass needs quantization options (calibration "
                             "data)");
    struct opq_quant_opts o = *pc->opts->quant;
    o.recon.seed = pc->opts->seed; // --seed: batches and QDrop draws
    o.refine = opq_recon_refine;
    o.refine_user = &o.recon;
    return opq_pass_quantize_with(pc, &o);
}
