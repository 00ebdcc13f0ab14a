/* fakequant.h: fake quantization for reconstruction (not an ONNX op): the float model sees
 * quantization error while parameters stay trainable.
 *
 * Forward:  y = s * (clamp(nearbyintf(x / s) + z, qmin, qmax) - z)   (half to even, as ONNX)
 * Backward: x gets the straight-through estimator: dx = dy where qmin <= round(x/s) + z <= qmax,
 *           0 where the value was clamped. The step size gets the LSQ gradient
 *           (Esser et al., "Learned Step Size Quantization"):
 *             dy/ds = round(x/s) - x/s   inside the range,
 *                     qmin - z           below it,
 *                     qmax - z           above it,
 *           summed over the elements sharing s (the caller may multiply by LSQ's
 *           1/sqrt(n * qmax) gradient scale; that is policy, not mechanism).
 * Per-tensor: one (s, z). Per-channel: x is viewed as [outer, channels, inner] and channel c
 * uses (s[c], z[c]). s must be > 0; z and the bounds are integers stored as float. */
#ifndef OPQ_FAKEQUANT_H
#define OPQ_FAKEQUANT_H

#include <stddef.h>
#include <stdint.h>

struct opq_fq_params {
    const float *scale;             // [channels] (1 for per-tensor)
    const float *zero_point;        // [channels] or NULL (all 0)
    float qmin, qmax;               // e.g. -128, 127 for int8; 0, 255 for uint8
    int64_t outer, channels, inner; // x = [outer, channels, inner]; per-tensor: 1, 1, n
};

// y may alias x.
void opq_fakequant_forward(const struct opq_fq_params *p, const float *x, float *y);

// dx (may be NULL) = STE mask * dy. dscale (may be NULL, [channels]) += the LSQ gradient,
// accumulated in double. dy and dx may alias.
void opq_fakequant_backward(const struct opq_fq_params *p, const float *x, const float *dy,
                            float *dx, double *dscale);

#endif
