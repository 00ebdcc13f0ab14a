/* reparam.h: post-LayerNorm channel-range reparameterization (RepQ-ViT style), exact in real
 * arithmetic, so that per-tensor activation quantization works on models with a few huge
 * post-LayerNorm channels.
 *
 * With per-channel ranges [lo_c, hi_c] of the LN output x, centres t_c and half-widths h_c, and
 * migration strength alpha in [0, 1]:
 *     r_c = (h_c / H)^alpha,  H = mean_c h_c,   T = mean_c t_c
 *     x'_c = (x_c - t_c) / r_c + T             (every channel now spans about [T - H, T + H])
 * which is folded into the LN affine and every consumer linear layer y = x W + b:
 *     gamma'_c = gamma_c / r_c,   beta'_c = (beta_c - t_c) / r_c + T
 *     W'[c,:]  = r_c W[c,:],      b' = b + sum_c (t_c - r_c T) W[c,:]
 * alpha = 1 equalises the ranges fully (RepQ-ViT); smaller values leave part of the spread in the
 * activations and put less of it into the weights' input rows. */
#ifndef OPQ_REPARAM_H
#define OPQ_REPARAM_H

#include "graph.h"

struct opq_reparam_site {
    struct opq_value *out;   // the LN output (after the affine)
    struct opq_value *gamma; // 1-D initializer [C]
    struct opq_value *beta;  // 1-D initializer [C], or NULL (created)
    // The LN op node, when the affine is its inputs 1/2 (NULL for a decomposed chain whose
    // gamma/beta are Mul/Add operands).
    struct opq_node  *ln;
};

// Checks that every path from site->out reaches a MatMul (x @ W, W an initializer [C, N]) or a
// Gemm (A = x, B an initializer) through ops that keep the channels of the last axis apart
// (Gather/Slice on other axes, Reshape/Flatten/Squeeze/Unsqueeze keeping the last dim, Transpose
// keeping the last axis last, Identity, Dropout; Shape and Size users read only the shape), so
// the rewrite is exact. A ViT head reads the
// final LayerNorm through such a Gather (the class token). False (no change) otherwise.
bool opq_reparam_applicable(const struct opq_graph *g, const struct opq_reparam_site *site);
// The values whose distribution the rewrite changes: site->out and the values on the paths to
// the linear consumers (at most cap); 0 if the site is not applicable.
int  opq_reparam_changed_values(const struct opq_reparam_site *site, struct opq_value **out,
                                int cap);

// Applies the rewrite with the given per-channel ranges (C entries). Shared initializers are
// copied before being changed; a MatMul consumer without a bias Add gets one. OPQ_ERR_SHAPE if
// the sizes disagree.
enum opq_status opq_reparam_apply(struct opq_graph *g, const struct opq_reparam_site *site,
                                  const float *lo, const float *hi, float alpha);

#endif
