/* quantize_erq.c (pass): ERQ quantization (recon/erq.h; TPAMI 2025 version), the calibrated
 * flow of src/quantize.c with ERQ as its refinement step. Matches: every MatMul/Gemm/Conv the
 * flow quantizes; ERQ refines the linear ones (MatMul x @ W (+ bias Add), Gemm), Conv keeps
 * round to nearest. Rewrites: as the quantize pass (Q/DQ), after post-LayerNorm
 * reparameterization with alpha = 1 (ERQ's reparameterization initialization, --erq-ri); then
 * each dual-uniform (DUQ) weight's DequantizeLinear becomes two DequantizeLinear nodes (inlier /
 * outlier codes) summed by an Add. Preserves: graph inputs/outputs, every non-quantized op.
 * Needs opts->quant (hyperparameters in opts->quant->erq). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pass.h"
#include "quantize.h"
#include "recon/erq.h"

enum opq_status opq_pass_run_quantize_erq(struct opq_pass_ctx *pc, struct opq_graph *g) {
    if (!pc->opts->quant)
        return opq_set_error(pc->ctx, OPQ_ERR_USAGE,
                             "the quantize-erq pass needs quantization options (calibration data)");
    struct opq_quant_opts o = *pc->opts->quant;
    struct opq_erq_state  s = {.opts = o.erq};
    struct opq_report   *rep = NULL;
    enum opq_status      st;
    if (s.opts.ri >= 0) {
        o.reparam       = s.opts.ri;
        o.reparam_alpha = 1.0f;
    }
    o.refine        = opq_erq_refine;
    o.refine_user   = &s;
    o.refine_qmodel = s.opts.qinputs;
    if ((st = opq_quantize(pc->ctx, pc->model, &o, pc->opts->report ? &rep : NULL)) != OPQ_OK)
        goto out;
    if ((st = opq_erq_encode_duq(g, &s, o.wbits, opq_model_opset(pc->model, ""))) != OPQ_OK ||
        (st = opq_graph_cleanup(g)) != OPQ_OK || (st = opq_graph_sort(g)) != OPQ_OK)
        goto out;
    opq_log(pc->ctx, OPQ_LOG_INFO, "erq: statistics %.2f s (Gram products %.2f s), aqer %.2f s, "
            "wqer %.2f s, error figures %.2f s", s.t_stats, s.t_gram, s.t_aqer, s.t_wqer, s.t_err);
    pc->stats.n_rewrites = rep ? rep->n_qnodes : s.n_layers;
    if (rep && s.n_layers > 0) {
        rep->layers = calloc((size_t)s.n_layers, sizeof(*rep->layers));
        if (!rep->layers) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        rep->n_layers = s.n_layers;
        for (int i = 0; i < s.n_layers; i++) {
            const struct opq_erq_layer *l = &s.layers[i];
            struct opq_report_layer   *r = &rep->layers[i];
            memcpy(r->name, l->name, sizeof(r->name));
            r->d_in       = l->d_in;
            r->d_out      = l->d_out;
            r->n_outliers = l->n_outliers;
            r->err_before = l->err_before;
            r->err_aqer   = l->err_aqer;
            r->err_wqer   = l->err_wqer;
            r->err_rtn    = l->err_rtn;
        }
        size_t len = strlen(rep->settings);
        snprintf(rep->settings + len, sizeof(rep->settings) - len,
                 " method=erq lambda=%g steps=%d duq=%s", s.opts.lambda, s.opts.steps,
                 s.opts.duq ? "on" : "off");
    }
    if (pc->opts->report) {
        opq_report_free(*pc->opts->report);
        *pc->opts->report = rep;
        rep = NULL;
    }
out:
    opq_report_free(rep);
    opq_erq_state_free(&s);
    return st;
}
