/* mlp_recon.c (pass): APHQ-ViT's MLP reconstruction (recon/mr.h). Matches: every transformer MLP
 * fc1 (MatMul [+ bias]) -> GELU (op, Erf or Tanh chain) -> fc2 (MatMul [+ bias]). Rewrites: the
 * GELU becomes a Relu (the gelu-to-relu pass) and fc1/fc2's float weights and biases are
 * retrained against the untouched model's MLP outputs on the calibration samples (the ones the
 * quantize flow calibrates on; its held-out samples are not used). Preserves: everything else,
 * and graph inputs/outputs. Needs opts->quant (calibration data; hyperparameters in
 * opts->quant->mr). Logs the float change of the swap alone and after retraining. Run it
 * before a quantizing pass (--mlp-recon). */
#include <math.h>

#include "pass.h"
#include "quantize.h"
#include "recon/mr.h"

enum opq_status opq_pass_run_mlp_recon(struct opq_pass_ctx *pc, struct opq_graph *g) {
    const struct opq_quant_opts *q = pc->opts->quant;
    if (!q || !q->calib.path)
        return opq_set_error(pc->ctx, OPQ_ERR_USAGE,
                             "the mlp-recon pass needs calibration data (--calib)");
    struct opq_model *teacher = NULL;
    struct opq_calib_src *src = NULL;
    enum opq_status st = opq_model_clone(pc->ctx, pc->model, &teacher);
    if (st == OPQ_OK)
        st = opq_pass_gelu_swap(pc, g);
    long swapped = pc->stats.n_rewrites;
    if (st == OPQ_OK && swapped > 0)
        opq_pass_log_float_change(pc, teacher, "GELU -> ReLU");
    if (st == OPQ_OK && swapped > 0)
        st = opq_calib_open(pc->ctx, teacher, &q->calib, &src);
    if (st == OPQ_OK && swapped > 0) {
        int total = opq_calib_count(src);
        struct opq_mr_opts mo = q->mr;
        mo.seed = pc->opts->seed;
        mo.batch = q->recon.batch; // --recon-batch, as --help says
        if (q->recon.time_budget > 0.0 && mo.seconds <= 0.0) {
            // a fifth of what is left of the run's budget; block reconstruction gets the rest
            double t0 = q->recon.budget_start > 0.0 ? q->recon.budget_start : opq_now_s();
            mo.seconds = 0.2 * fmax(q->recon.time_budget * 60.0 - (opq_now_s() - t0), 0.0);
        }
        if (mo.clamp_pct <= 0.0f)
            mo.clamp_pct = q->abits >= 4 ? 0.98f : 0.99f;
        int n_mlps = 0;
        st = opq_mr_run(pc->ctx, teacher, pc->model, src, total - opq_quant_holdout(q, total), &mo,
                        &n_mlps);
        if (st == OPQ_OK)
            opq_pass_log_float_change(pc, teacher, "after MLP reconstruction");
    }
    opq_calib_close(src);
    opq_model_free(teacher);
    return st;
}
