/* mr.h: MLP reconstruction (APHQ-ViT's MR), the float step that precedes block reconstruction.
 *
 * Every transformer MLP  fc1 -> GELU -> fc2  of the student model has had its GELU swapped for
 * ReLU (the gelu-to-relu pass); the teacher is the untouched float model. Each MLP's float fc1
 * and fc2 weights and biases are retrained, independently of the other MLPs, so that on the
 * teacher's own fc1 inputs X the ReLU MLP reproduces the teacher's GELU MLP outputs Y:
 *   L = mean(h * (fc2(relu(fc1 X)) - Y)^2) + 2 * mean(h * (fc2(min(relu(fc1 X), u)) - Y)^2)
 * with h the APH weight of Y in the teacher (recon.h; rescaled to RMS 1) and u the clamp
 * quantile of the teacher's positive post-GELU values (98% at 4+ bits, 99% below). Adam with a
 * cosine schedule. The clamped term makes the MLP robust to the range the fc2 input quantizer
 * will clip later; the deployed graph has no clamp.
 *
 * MLPs are found in the teacher: a GELU (recognize.h) whose input is fc1 (MatMul with a weight
 * initializer, optionally + bias initializer) and whose only reader is fc2 (the same). Others
 * are left as they are, logged. */
#ifndef OPQ_RECON_MR_H
#define OPQ_RECON_MR_H

#include "base.h"
#include "ir.h"

struct opq_calib_src;

struct opq_mr_opts {
    int    iters;       // Adam steps per MLP
    int    batch;       // samples per step
    int    count;       // calibration samples used (0: all given)
    float  lr;          // Adam, cosine to 0
    float  clamp_pct;   // quantile of the positive post-GELU values (0: the caller's choice,
                        // 0.98 at 4+ activation bits, 0.99 below, as the paper)
    float  clamp_alpha; // weight of the clamped term (2)
    float  temp;        // APH temperature (20)
    bool   aph;         // APH-weighted (else plain MSE)
    double seconds;     // time budget for all MLPs (0: none): fewer iterations where needed
    size_t mem_mb;      // teacher activations held at once (MLPs are processed in groups)
    uint64_t seed;
};

void opq_mr_opts_default(struct opq_mr_opts *o);

// Retrains the MLPs of `student` (GELUs already swapped for ReLU) against `teacher` on the
// first n samples of src. *n_mlps receives the number retrained.
enum opq_status opq_mr_run(struct opq_ctx *ctx, struct opq_model *teacher,
                           struct opq_model *student, struct opq_calib_src *src, int n,
                           const struct opq_mr_opts *o, int *n_mlps);

#endif
