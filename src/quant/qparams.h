/* qparams.h: uniform affine quantization parameters and the range calibrators.
 *
 * q = clamp(nearbyint(x / scale) + zero_point, qmin, qmax), x' = (q - zero_point) * scale.
 * Rounding is half to even (nearbyintf under the default FE_TONEAREST), as in ONNX
 * QuantizeLinear. Ranges always include 0 so that zero is exactly representable (padding,
 * ReLU outputs, attention masks).
 *
 * Activation ranges are calibrated from a streaming histogram (struct opq_observer): batches are
 * added one after another and the observer never holds the samples themselves, so calibration
 * memory is O(bins) per tensor whatever the number of images. */
#ifndef OPQ_QPARAMS_H
#define OPQ_QPARAMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "opq.h"

struct opq_qparams {
    float   scale;
    int32_t zero_point;
    int32_t qmin, qmax; // integer grid, e.g. [-128, 127] or [0, 15]
};

// Integer grid of a b-bit type: signed [-2^(b-1), 2^(b-1)-1] (narrow: [-(2^(b-1)-1), ...]),
// unsigned [0, 2^b-1].
void opq_qgrid(int bits, bool is_signed, bool narrow, int32_t *qmin, int32_t *qmax);

// Parameters for the real range [lo, hi] (widened to contain 0). symmetric: zero_point is the
// grid's centre (0 for signed grids) and scale = max(|lo|,|hi|) / half-range; otherwise the range
// maps onto [qmin, qmax] with an integer zero point. A degenerate range gives scale 1e-8-ish
// (never 0 or NaN). Returns false if lo/hi are not finite.
bool opq_qparams_from_range(float lo, float hi, int32_t qmin, int32_t qmax, bool symmetric,
                            struct opq_qparams *out);

// Fake quantization of one value (quantize then dequantize).
static inline float opq_fq(float x, const struct opq_qparams *p);
// Integer code of one value.
int32_t opq_quantize1(float x, const struct opq_qparams *p);
// Fake-quantizes n values in place; returns the sum of squared errors (double accumulation).
double opq_fq_array(float *x, size_t n, const struct opq_qparams *p);

// ---- activation observer ------------------------------------------------------------------------

enum opq_calibrator {
    OPQ_CALIB_MINMAX = 0,
    OPQ_CALIB_PERCENTILE,
    OPQ_CALIB_MSE,
    OPQ_CALIB_ENTROPY,
};

// Name <-> enum ("minmax", "percentile", "mse", "entropy"); -1 if unknown.
int         opq_calibrator_from_name(const char *name);
const char *opq_calibrator_name(enum opq_calibrator c);

// A histogram over [-R, R) with a power-of-two R that doubles (merging bin pairs exactly) when a
// sample falls outside, plus exact min/max and count. Fixed memory.
#define OPQ_OBS_BINS 4096
struct opq_observer {
    double   min, max;
    double   range;      // R; 0 until the first non-zero sample
    uint64_t count;
    uint64_t n_nonfinite;
    double   hist[OPQ_OBS_BINS];
};

void opq_observer_init(struct opq_observer *o);
// Adds n samples. Non-finite samples are counted (n_nonfinite) and otherwise ignored.
void opq_observer_add(struct opq_observer *o, const float *x, size_t n);
// The same, split over the pool's threads (NULL: the caller alone); the result is identical.
struct opq_threadpool;
void opq_observer_add_mt(struct opq_observer *o, const float *x, size_t n,
                         struct opq_threadpool *pool);
// Merges b into a (for per-thread observers).
void opq_observer_merge(struct opq_observer *a, const struct opq_observer *b);

struct opq_calib_opts {
    enum opq_calibrator method;
    double              percentile; // for PERCENTILE, e.g. 99.99 (two-sided)
    int32_t             qmin, qmax;
    bool                symmetric;
};

// Chooses the quantization range [*lo, *hi] from the observer by the given method, and the
// matching qparams. OPQ_ERR_NUMERIC if the observer saw no finite sample.
enum opq_status opq_observer_range(const struct opq_observer *o, const struct opq_calib_opts *c,
                                   float *lo, float *hi, struct opq_qparams *out);

// ---- weights --------------------------------------------------------------------------------------

enum opq_wcalib { OPQ_WCALIB_MINMAX = 0, OPQ_WCALIB_MSE = 1 };

// Per-channel weight qparams for a weight viewed as [n_ch][...]: channel c owns the elements
// w[i] with (i / inner) % n_ch == c, where inner is the product of dims after the channel axis.
// (MatMul [K,N] per column: n_ch = N, inner = 1; Conv [M,C,kh,kw] per filter: n_ch = M,
// inner = C*kh*kw; per-tensor: n_ch = 1, inner = n.) MSE searches a clipping factor per channel
// on a grid, minimising the squared weight error. out has n_ch entries.
enum opq_status opq_weight_qparams(const float *w, size_t n, size_t n_ch, size_t inner,
                                   int32_t qmin, int32_t qmax, bool symmetric,
                                   enum opq_wcalib method, struct opq_qparams *out);
// The same with the channels split over the pool's threads (NULL: the caller alone); the result
// does not depend on the thread count.
enum opq_status opq_weight_qparams_mt(const float *w, size_t n, size_t n_ch, size_t inner,
                                      int32_t qmin, int32_t qmax, bool symmetric,
                                      enum opq_wcalib method, struct opq_qparams *out,
                                      struct opq_threadpool *pool);

// Integer codes of a weight viewed as [n_ch][...] (as above) with per-channel qparams p (one grid
// for all channels), exactly as opq_quantize1 gives them, into q (n entries; may be NULL), and
// the sums of x^2 (sig) and of the squared fake-quantization error (err), either may be NULL.
enum opq_status opq_quantize_channels(const float *x, size_t n, size_t n_ch, size_t inner,
                                      const struct opq_qparams *p, int32_t *q, double *sig,
                                      double *err);

#include <math.h>
static inline float opq_fq(float x, const struct opq_qparams *p) {
    float q = nearbyintf(x / p->scale) + (float)p->zero_point;
    q       = q < (float)p->qmin ? (float)p->qmin : (q > (float)p->qmax ? (float)p->qmax : q);
    return (q - (float)p->zero_point) * p->scale;
}

#endif
