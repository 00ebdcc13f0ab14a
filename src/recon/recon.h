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
 *   - the rounding parameters of every weight of the unit (AdaRound's rounding variables, or
 *     FlexRound's log divisors and grid: opts.rounding) and LSQ step sizes for every activation
 *     quantizer of the unit are trained with Adam, with QDrop input mixing and per-element
 *     quantizer dropping;
 *   - the rounding is hardened: weights are left exactly on their grid (s * (q - z)) in the
 *     model (FlexRound: s is the learned grid s1, written into the weight qparams) and the
 *     learned step sizes are written into the activation qparams.
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
struct opq_qparams;

enum opq_recon_loss { OPQ_RECON_LOSS_APH = 0, OPQ_RECON_LOSS_MSE = 1, OPQ_RECON_LOSS_FISHER = 2 };

// "aph", "mse", "fisher" <-> enum; -1 if unknown.
int opq_recon_loss_from_name(const char *name);
const char *opq_recon_loss_name(enum opq_recon_loss l);

// How weights are rounded: AdaRound (learned up/down per element, regularized towards 0/1) or
// FlexRound (learned element-wise division before round to nearest, and a learned grid).
enum opq_recon_rounding { OPQ_RECON_ADAROUND = 0, OPQ_RECON_FLEXROUND = 1 };

// "adaround", "flexround" <-> enum; -1 if unknown.
int opq_recon_rounding_from_name(const char *name);
const char *opq_recon_rounding_name(enum opq_recon_rounding r);

struct opq_recon_opts {
    int iters; // per unit (the time budget may lower it)
    int batch; // samples per iteration
    int count; // calibration samples used (0: all; rounded down to batch)
    enum opq_recon_loss loss;
    enum opq_recon_rounding rounding;
    bool qdrop;       // QDrop input mixing + quantizer dropping (else quantized)
    float drop_prob;  // probability that an element stays quantized (0.5)
    float temp;       // KL temperature of APH / Fisher (20)
    float aph_floor;  // APH loss: every output weight gets aph_floor x the unit's mean weight
                      // added (0: the plain APH, the default), see opq_recon_aph_floor
    float reg_weight; // AdaRound regularizer weight (0.01)
    float warmup;     // fraction of iterations without the regularizer (0.2)
    float beta_start; // regularizer exponent schedule (20 -> 2)
    float beta_end;
    float lr_round;         // Adam on the rounding variables (0: opq_recon_lr_round's default)
    float lr_flex;          // Adam on FlexRound's log parameters, cosine to 0 (1e-3)
    float lr_act;           // Adam on the activation step sizes, cosine (4e-5)
    double time_budget;     // minutes for the whole reconstruction (0: none)
    double budget_start;    // opq_now_s() when the budget started (0: the reconstruction's start;
                            // the CLI sets its own start, so the budget covers the whole run)
    const char *checkpoint; // folder: state saved after each unit, resumed (NULL: none)
    uint64_t seed;
};

void opq_recon_opts_default(struct opq_recon_opts *o);

// The AdaRound learning rate of a unit trained for `iters` iterations: o->lr_round if set, else
// the paper's 1e-3 scaled to the same total step as its 20,000 iterations, 1e-3 * 20000 / iters,
// kept within [1e-3, 1e-2]. At 1e-3 over 2000 iterations (Adam moves a variable about lr per
// step) a third to a half of the rounding variables were still undecided when a unit ended and
// hardening chose for them; at 1e-2 under 0.5% are, and W3A3 top-1 rose on every fixture.
float opq_recon_lr_round(const struct opq_recon_opts *o, int iters);

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
// dh/dalpha (0 where clipped). In float, exactly as opq_adaround_step computes it.
float opq_adaround_h(float alpha, float *dh);
// alpha such that h(alpha) = frac (frac in [0, 1)).
float opq_adaround_alpha0(float frac);
// The hardened integer code before clamping: floor(w / s) + [alpha >= 0].
float opq_adaround_hard(float w, float s, float alpha);

// FlexRound state of one weight W (ONNX order, n elements): element i uses grid s1[(i / inner1)
// % n1] (the weight qparams channel), output channel s3[(i / inner3) % n3] and, for Conv
// weights, input channel s4[(i / inner4) % n4] (n4 = 0: no s4). theta (caller-owned, see
// opq_flexround_n_params) holds log s1 [n1], log S2 [n], log s3 [n3], log s4 [n4] in this order.
struct opq_flexround {
    size_t n;
    int n1, n3, n4; // n1, n3 >= 1
    size_t inner1, inner3, inner4;
    float *theta;
};

size_t opq_flexround_n_params(const struct opq_flexround *f);
// Round to nearest with the grid of qp: log s1 = log qp[c].scale, the rest 0.
void opq_flexround_init(struct opq_flexround *f, const struct opq_qparams *qp);
// The grid size s1 of channel c: exp(log s1) rounded to float, the exported scale.
float opq_flexround_grid(const struct opq_flexround *f, int c);
// W_hat = s1 * (q - z), q = clamp(round(W / (s1 S2 s3 s4)) + z, qmin, qmax), qp[n1] giving z and
// the range. wq and q (either may be NULL) receive W_hat and the integer codes.
void opq_flexround_forward(const struct opq_flexround *f, const struct opq_qparams *qp,
                           const float *w, float *wq, int32_t *q);
// Given G = dL/dW_hat, adds dL/dtheta (straight-through round, no gradient through the clamp)
// to grad[opq_flexround_n_params(f)].
void opq_flexround_backward(const struct opq_flexround *f, const struct opq_qparams *qp,
                            const float *w, const float *G, double *grad);

// AdaRound state of one weight for opq_adaround_step: element i has grid channel
// (i / inner) % n_ch, whose step, zero point and code range are sc, z, lo, hi [n_ch] (codes, as
// floats). base = floor(w / s); alpha, its Adam moments m, v; g = dL/dW_hat of the last soft
// forward; h, dh = h(alpha), h'(alpha) and dwda = dW_hat/dalpha of that forward (0 where the
// code is clamped); wq receives W_hat.
struct opq_adaround {
    size_t n, inner;
    int n_ch;
    const float *sc, *z, *lo, *hi;
    const float *base;
    float *alpha, *m, *v, *g, *h, *dh, *dwda, *wq;
};

enum opq_adaround_mode {
    OPQ_ADAROUND_SOFT = 0,   // W_hat = s (clamp(base + h(alpha) + z) - z), with h, dh, dwda
    OPQ_ADAROUND_HARD = 1,   // the same with h = [alpha >= 0] (h, dh, dwda untouched)
    OPQ_ADAROUND_UPDATE = 2, // Adam step on alpha along g * dwda (+ the regularizer), then SOFT
};

struct opq_adaround_hyper {
    enum opq_adaround_mode mode;
    bool reg;          // UPDATE: add the gradient of reg_w * sum(1 - |2h - 1|^beta)
    float reg_w, beta; // (h, dh of the last soft forward)
    float lr;
    int t; // Adam step number (>= 1)
};

// Elements [i0, i1) of a (any split gives the same bytes). Vectorised: h by a float sigmoid on
// ku_expf, the regularizer's |2h - 1|^(beta - 1) by ku_expf/ku_logf; the Adam arithmetic is
// opq_adam_step's (double).
void opq_adaround_step(const struct opq_adaround *a, const struct opq_adaround_hyper *hp,
                       size_t i0, size_t i1);

// One Adam step (beta1 0.9, beta2 0.999, eps 1e-8) on n parameters; t >= 1 is the step number.
void opq_adam_step(float *p, const float *g, float *m, float *v, size_t n, float lr, int t);

// h[i] += factor * mean(h) over the n weights of a unit's output (the mean summed in double, in
// order). The APH of the last transformer block is zero wherever the head does not read (every
// token but the class token of a ViT), so its loss would constrain the block's rounding with
// one token per sample; the added floor keeps every output element in the loss, weighted down.
void opq_recon_aph_floor(float *h, size_t n, float factor);

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
