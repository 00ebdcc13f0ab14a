/* recon.h: the block-reconstruction engine shared by the reconstruction methods (APHQ first).
 *
 * It runs as the refine step of the quantize flow (quantize.h): the model is still float, the
 * placement and the calibrated qparams are known. The graph is cut into units at the transformer
 * blocks that recognize.h finds (patch embedding = everything before the first block, each
 * block, head = everything after the last one; Swin's patch merging falls between blocks and
 * becomes its own unit). Units are reconstructed in order. For each unit:
 *   - float inputs X and float targets Y = unit(X) are streamed from the calibration samples,
 *     the quantized input Xq is what the already-reconstructed prefix produces;
 *   - an output weight h (APH, Fisher or 1) is computed for the loss mean(h * (Yq - Y)^2)
 *     (the head uses KL(softmax(Y) || softmax(Yq)) instead);
 *   - AdaRound rounding variables for every weight of the unit and LSQ step sizes for every
 *     activation quantizer of the unit are trained with Adam, with QDrop input mixing and
 *     per-element quantizer dropping;
 *   - the rounding is hardened: weights are left exactly on their grid (s * (q - z)) in the
 *     model and the learned step sizes are written into the activation qparams.
 *
 * Activation fake quantization inside a unit: the unit's node range is split after the producer
 * of every quantized activation; the sub-ranges run in the executor one after another and the
 * engine fake-quantizes between them (backward: the same in reverse, with the straight-through
 * estimator and the LSQ step-size gradient in between). No executor change is needed.
 *
 * APH (average-perturbation Hessian): the output weight of a unit is |H . 1| averaged over the
 * samples, H the Hessian of KL(p_fp || softmax(z / T)) with respect to the unit output. At the
 * float point the loss gradient is 0, so H = J^T H_z J exactly (J = dz/dO, H_z = (diag(p) -
 * p p^T) / T^2): u = J . 1 (reverse mode, one backward per class: exact; central difference of
 * the logits for more than OPQ_RECON_APH_MAX_EXACT classes), v = H_z u, h = |J^T v| (one
 * backward pass). */
#ifndef OPQ_RECON_H
#define OPQ_RECON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base.h"
#include "exec.h"
#include "ir.h"

struct opq_refine_ctx;

enum opq_recon_loss { OPQ_RECON_LOSS_APH = 0, OPQ_RECON_LOSS_MSE = 1, OPQ_RECON_LOSS_FISHER = 2 };

// "aph", "mse", "fisher" <-> enum; -1 if unknown.
int opq_recon_loss_from_name(const char *name);
const char *opq_recon_loss_name(enum opq_recon_loss l);

struct opq_recon_opts {
    int iters; // per unit (the time budget may lower it)
    int batch; // samples per iteration
    int count; // calibration samples used (0: all; rounded down to batch)
    enum opq_recon_loss loss;
    bool qdrop;       // QDrop input mixing + quantizer dropping (else quantized)
    float drop_prob;  // probability that an element stays quantized (0.5)
    float temp;       // KL temperature of APH / Fisher (20)
    float reg_weight; // AdaRound regularizer weight (0.01)
    float warmup;     // fraction of iterations without the regularizer (0.2)
    float beta_start; // regularizer exponent schedule (20 -> 2)
    float beta_end;
    float lr_round;         // Adam on the rounding variables (1e-3)
    float lr_act;           // Adam on the activation step sizes, cosine (4e-5)
    double time_budget;     // minutes for the whole reconstruction (0: none)
    const char *checkpoint; // folder: state saved after each unit, resumed (NULL: none)
    uint64_t seed;
};

void opq_recon_opts_default(struct opq_recon_opts *o);

// What happened to one unit.
struct opq_recon_unit_report {
    char name[64];
    int first, last; // node range
    int iters;
    int n_weights, n_acts;          // rounding variables, activation quantizers
    double sqnr_before, sqnr_after; // dB, unit output, quantized input, vs float target
    double werr_before, werr_after; // weighted error (head: KL)
    double flip_frac;               // fraction of weights rounded away from nearest
    double seconds;
    double iter_ms, fwd_ms; // one training iteration, one float forward of the unit (a batch)
    long peak_rss_kb;
    bool resumed; // loaded from the checkpoint
};

struct opq_recon_report {
    struct opq_recon_unit_report *units; // caller frees with opq_recon_report_free
    int n_units;
};
void opq_recon_report_free(struct opq_recon_report *r);

// Runs the reconstruction inside a refine hook. report (optional) receives per-unit figures.
enum opq_status opq_recon_run(struct opq_refine_ctx *rc, const struct opq_recon_opts *o,
                              struct opq_recon_report *report);

// The refine hook (quantize.h): user is a const struct opq_recon_opts * (NULL: the options in
// rc->opts->recon). Logs one info line per unit.
enum opq_status opq_recon_refine(void *user, struct opq_refine_ctx *rc);

// ---- building blocks (exposed for tests) -----------------------------------------------------

#define OPQ_ADAROUND_ZETA 1.1f
#define OPQ_ADAROUND_GAMMA (-0.1f)

// h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1); *dh (may be NULL) receives
// dh/dalpha (0 where clipped).
float opq_adaround_h(float alpha, float *dh);
// alpha such that h(alpha) = frac (frac in [0, 1)).
float opq_adaround_alpha0(float frac);
// The hardened integer code before clamping: floor(w / s) + [alpha >= 0].
float opq_adaround_hard(float w, float s, float alpha);

// One Adam step (beta1 0.9, beta2 0.999, eps 1e-8) on n parameters; t >= 1 is the step number.
void opq_adam_step(float *p, const float *g, float *m, float *v, size_t n, float lr, int t);

#define OPQ_RECON_APH_MAX_EXACT 64

// APH weights of value `out` for n samples (O: n * numel floats, the float outputs of a unit
// that nodes first..last consume; last produces graph output 0, the logits [B, K]). ex is planned
// for batch B (n a multiple of B). hbar[numel] receives (1/n) sum_samples |H . 1|. The loss is
// KL(p || softmax(z / T)) with p the float prediction (batchmean: H carries 1/B).
enum opq_status opq_recon_aph(struct opq_exec *ex, struct opq_graph *g, const char *out, int first,
                              int last, const float *O, int n, int B, float T, double *hbar);
// The same for n_outs values of the float model at once (K <= OPQ_RECON_APH_MAX_EXACT), from
// the graph input `in` (X: n samples): per batch one forward tape, K reverse sweeps give every
// J_j . 1, then one sweep per value, down to node stops[j] (the first node after its producer),
// gives |J_j^T H_z J_j . 1|. hbar[j] receives value j's per-sample weights.
enum opq_status opq_recon_aph_many(struct opq_exec *ex, struct opq_graph *g, const char *in,
                                   const float *X, int n, int B, float T, const char *const *outs,
                                   const int *stops, int n_outs, double **hbar);

#endif
