/* actq.h: fake quantization of one activation batch for reconstruction training (LSQ step
 * sizes, QDrop), forward and backward, run over a thread pool.
 *
 * Forward, per element with step s and code range [lo, hi] (relative to the zero point):
 *   y = clamp(x / s, lo, hi) rounded half to even, times s; with a keep mask (QDrop) elements
 *   not kept pass through as x.
 * Backward (straight-through inside the range, LSQ step gradient):
 *   dx = dy inside the range, 0 where the code clamps; ds += dy * (round(x/s) - x/s) inside,
 *   dy * lo / dy * hi below / above; dropped elements pass dy through and add nothing to ds.
 *
 * Determinism: elements are independent, the QDrop mask comes from fixed positions of one PCG
 * stream (element i uses byte i % 4 of draw i / 4, whatever thread computes it), and the step
 * gradient is summed in fixed pieces of each channel segment (8 double lanes per piece, then the
 * pieces in order), so results do not depend on the thread count. */
#ifndef OPQ_RECON_ACTQ_H
#define OPQ_RECON_ACTQ_H

#include <stddef.h>
#include <stdint.h>

#include "rng.h"

struct opq_threadpool;

// One quantized activation: n elements in segments of `inner` consecutive elements; segment j
// belongs to channel j % n_ch (per tensor: n_ch = 1, inner = n). Arrays are borrowed.
struct opq_actq {
    size_t n;
    size_t inner;
    int n_ch;
    const float *scale; // [n_ch] step sizes
    const float *lo;    // [n_ch] lowest code minus the zero point
    const float *hi;    // [n_ch] highest code minus the zero point
};

// Doubles of scratch opq_actq_backward needs for q.
size_t opq_actq_n_parts(const struct opq_actq *q);

// y = fake-quantized x (x and y may be the same buffer). With keep != NULL (QDrop), keep[i] =
// byte i % 4 of draw i / 4 of *rng is below thr (kept with probability thr / 256), dropped
// elements copy x, and *rng moves past the (n + 3) / 4 draws. pool may be NULL.
void opq_actq_forward(struct opq_threadpool *pool, const struct opq_actq *q, const float *x,
                      float *y, uint8_t *keep, struct opq_rng *rng, uint32_t thr);

// In place dy -> dx for the forward of x with mask keep (NULL: every element was quantized);
// adds the step-size gradient of each channel to dscale[n_ch]. parts: opq_actq_n_parts(q)
// doubles of scratch.
void opq_actq_backward(struct opq_threadpool *pool, const struct opq_actq *q, const float *x,
                       float *dy, const uint8_t *keep, double *parts, double *dscale);

#endif
