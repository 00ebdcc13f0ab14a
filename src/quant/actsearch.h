/* actsearch.h: output-aware activation ranges. The tensor calibrators (qparams.h) choose a range
 * that minimises the activation's own quantization error; what the network sees is the error of
 * the layer that reads it. For post-softmax probabilities the rounding errors are correlated
 * (small probabilities all round to 0, peaks clip), and the range that is best for the tensor is
 * not the one that is best for softmax.V.
 *
 * For every per-tensor activation target x read by a MatMul or Gemm (as input A or B), starting
 * from its calibrated range [lo, hi], a grid of candidate ranges is tried (both ends scaled by
 * 0.3 .. 2; for two-sided asymmetric ranges also each end alone by 0.6 .. 1.25), and the
 * candidate minimising the consumer's output error
 *
 *     sum over samples and output rows r of  w_r * || (Q(x) . Wq - x . W)_r ||^2    (x as A)
 *
 * is kept, where W is the float weight and Wq the weight on its quantization grid, or for the
 * attention matmuls W = Wq is the other operand as computed (x as B likewise). Errors of several
 * consumers of one x add up. The starting range is a candidate: a search never increases the
 * measured error.
 *
 * The row weights w_r (optional) make the error loss-aware: plain output MSE over all tokens
 * underrates rows the prediction hangs on (the class token's attention row, whose probability
 * peak clipping shrinks) and, on the fixtures, picked post-softmax ranges that lost accuracy.
 * w_r is the squared gradient, summed over a row's channels and over the samples, of the
 * cross-entropy of the float model against its own top-1 class (unit norm per sample), swept
 * back from the logits to the consumer's output.
 *
 * Samples are streamed in batches; the errors of all candidates are accumulated in double per
 * batch, so memory is one batch's activations (the weights pass holds one sample's forward tape
 * with its gradients), whatever the number of samples. Candidates run in parallel on ctx's
 * threads; each candidate's sum is accumulated in a fixed order, so results do not depend on the
 * thread count. */
#ifndef OPQ_ACTSEARCH_H
#define OPQ_ACTSEARCH_H

#include "calib_data.h"
#include "quant/placement.h"
#include "quant/qparams.h"

struct opq_act_search_opts {
    int  n_samples; // samples [0, n_samples) of the source
    int  batch;
    bool symmetric; // activation grids are symmetric (candidates keep the zero point centred)
};

// Per target t of pl (a placement of the float model fmodel): qp[t] holds n_ch[t] qparams
// (weights per channel along axis[t]). Refines qp[t] in place for every activation target with
// search[t] set, n_ch[t] == 1, and at least one MatMul/Gemm consumer. The activations are
// measured on `model` (fmodel itself, or a copy with Q/DQ already in place: then each x is what
// its consumer sees in the quantized model), captured by name; the row weights come from fmodel
// (NULL: all rows weigh 1). err_start/err_best (optional, pl->n_targets entries) receive the
// errors of the starting and the chosen ranges (0 where nothing was searched).
enum opq_status opq_act_search(struct opq_ctx *ctx, struct opq_model *model,
                               struct opq_model *fmodel, struct opq_calib_src *src,
                               const struct opq_placement *pl,
                               struct opq_qparams *const *qp, const int *n_ch, const int *axis,
                               const bool *search, const struct opq_act_search_opts *o,
                               double *err_start, double *err_best);

#endif
