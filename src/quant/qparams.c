/* qparams.c: quantization grids, qparams from ranges, the streaming histogram observer and the
 * range calibrators (minmax, percentile, MSE, entropy/KL), and per-channel weight ranges.
 *
 * The histogram spans [-R, R) with OPQ_OBS_BINS bins and R a power of two. When a sample falls
 * outside, R doubles and bin pairs merge exactly: old bins 2k and 2k+1 become new bin NB/4 + k.
 * Zero always sits at the left edge of bin NB/2, so it needs no special case, even before R is
 * known. */
#include "quant/qparams.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base.h"

#define NB OPQ_OBS_BINS

void opq_qgrid(int bits, bool is_signed, bool narrow, int32_t *qmin, int32_t *qmax) {
    if (is_signed) {
        *qmax = (int32_t)((1u << (bits - 1)) - 1);
        *qmin = narrow ? -*qmax : -*qmax - 1;
    } else {
        *qmin = 0;
        *qmax = (int32_t)((1u << bits) - 1);
    }
}

bool opq_qparams_from_range(float lo, float hi, int32_t qmin, int32_t qmax, bool symmetric,
                            struct opq_qparams *out) {
    if (!isfinite(lo) || !isfinite(hi) || qmax <= qmin)
        return false;
    if (lo > 0.0f)
        lo = 0.0f;
    if (hi < 0.0f)
        hi = 0.0f;
    double scale;
    int32_t zp;
    if (symmetric) {
        // signed grids centre on 0, unsigned ones on their middle code (128 for uint8)
        zp          = qmin < 0 ? 0 : (int32_t)((qmin + qmax + 1) / 2);
        double amax = fmax(-(double)lo, (double)hi);
        scale       = amax / (double)(qmax - zp);
    } else {
        scale     = ((double)hi - (double)lo) / (double)(qmax - qmin);
        double z  = (double)qmin - nearbyint((double)lo / (scale > 0 ? scale : 1.0));
        zp        = (int32_t)(z < qmin ? qmin : (z > qmax ? qmax : z));
    }
    if (!(scale > 0.0))
        scale = 1.0; // all-zero tensor: any scale represents it exactly
    if (scale < 1e-30)
        scale = 1e-30;
    out->scale      = (float)scale;
    out->zero_point = zp;
    out->qmin       = qmin;
    out->qmax       = qmax;
    return true;
}

int32_t opq_quantize1(float x, const struct opq_qparams *p) {
    float q = nearbyintf(x / p->scale) + (float)p->zero_point;
    if (!(q >= (float)p->qmin)) // also maps NaN to qmin
        return p->qmin;
    if (q > (float)p->qmax)
        return p->qmax;
    return (int32_t)q;
}

double opq_fq_array(float *x, size_t n, const struct opq_qparams *p) {
    double err = 0.0;
    for (size_t i = 0; i < n; i++) {
        float y = opq_fq(x[i], p);
        double d = (double)x[i] - (double)y;
        err += d * d;
        x[i] = y;
    }
    return err;
}

static const char *const calib_names[] = {"minmax", "percentile", "mse", "entropy"};

int opq_calibrator_from_name(const char *name) {
    for (size_t i = 0; i < ARRAY_SIZE(calib_names); i++)
        if (strcmp(calib_names[i], name) == 0)
            return (int)i;
    return -1;
}

const char *opq_calibrator_name(enum opq_calibrator c) {
    return (size_t)c < ARRAY_SIZE(calib_names) ? calib_names[c] : "?";
}

// ---- observer -------------------------------------------------------------------------------------

void opq_observer_init(struct opq_observer *o) {
    memset(o, 0, sizeof(*o));
    o->min = INFINITY;
    o->max = -INFINITY;
}

// Makes the histogram cover |x| < need (add: strict, so `need` itself gets a bin) or, with
// exact == true, doubles R until R >= need (merge: both sides end on the same power of two).
static void observer_grow(struct opq_observer *o, double need, bool exact) {
    if (o->range == 0.0) {
        // first non-zero sample: the smallest power of two above it; the zeros already counted
        // stay in bin NB/2, which is where zero falls for any R
        int e;
        frexp(need, &e);
        o->range = ldexp(1.0, e - 1);
    }
    while (exact ? o->range < need : o->range <= need) {
        double merged[NB] = {0};
        for (int k = 0; k < NB / 2; k++)
            merged[NB / 4 + k] = o->hist[2 * k] + o->hist[2 * k + 1];
        memcpy(o->hist, merged, sizeof(merged));
        o->range *= 2.0;
    }
}

void opq_observer_add(struct opq_observer *o, const float *x, size_t n) {
    // Pass 1: min/max (and growth once per batch, not per sample).
    double mn = o->min, mx = o->max;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        if (!isfinite(v)) {
            bad++;
            continue;
        }
        if ((double)v < mn)
            mn = (double)v;
        if ((double)v > mx)
            mx = (double)v;
    }
    o->n_nonfinite += bad;
    if (bad == n)
        return;
    o->min = mn;
    o->max = mx;
    double amax = fmax(fabs(mn), fabs(mx));
    if (amax > 0.0 && amax >= o->range)
        observer_grow(o, amax, false);
    // Pass 2: binning. With R == 0 every finite sample is 0 and lands in bin NB/2.
    double inv = o->range > 0.0 ? (double)NB / (2.0 * o->range) : 0.0;
    double R   = o->range;
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        if (!isfinite(v))
            continue;
        // |v| < R, so (v + R) * inv >= 0 and truncation is floor (no libm call per sample)
        long b = R == 0.0 ? NB / 2 : (long)(((double)v + R) * inv);
        if (b < 0)
            b = 0;
        if (b >= NB)
            b = NB - 1;
        o->hist[b] += 1.0;
    }
    o->count += n - bad;
}

void opq_observer_merge(struct opq_observer *a, const struct opq_observer *b) {
    a->n_nonfinite += b->n_nonfinite;
    if (b->count == 0)
        return;
    struct opq_observer *t = malloc(sizeof(*t));
    OPQ_ASSERT(t); // 33 KB; an observer merge has no status to report through
    *t = *b;
    if (t->range > 0.0 && t->range > a->range)
        observer_grow(a, t->range, true);
    else if (a->range > 0.0)
        observer_grow(t, a->range, true);
    // Both ranges are now equal, or one side saw only zeros (all in bin NB/2).
    for (int i = 0; i < NB; i++)
        a->hist[i] += t->hist[i];
    a->min = fmin(a->min, t->min);
    a->max = fmax(a->max, t->max);
    a->count += t->count;
    free(t);
}

static double bin_center(const struct opq_observer *o, int b) {
    double w = 2.0 * o->range / NB;
    return -o->range + ((double)b + 0.5) * w;
}

// Expected squared error of quantizing the histogram with p: rounding noise scale^2/12 inside the
// grid, the clipping distance (from bin centres) outside. Smooth in the range, unlike a per-centre
// rounding estimate, which aliases when bins and grid steps are of similar size.
static double hist_mse(const struct opq_observer *o, const struct opq_qparams *p) {
    double sc   = (double)p->scale;
    double lo   = ((double)p->qmin - p->zero_point) * sc;
    double hi   = ((double)p->qmax - p->zero_point) * sc;
    double in   = 0.0, err = 0.0;
    double s2   = sc * sc / 12.0;
    for (int b = 0; b < NB; b++) {
        double c = o->hist[b];
        if (c == 0.0)
            continue;
        double x = bin_center(o, b);
        if (x < lo)
            err += c * (x - lo) * (x - lo);
        else if (x > hi)
            err += c * (x - hi) * (x - hi);
        else
            in += c;
    }
    return err + in * s2;
}

static bool candidate(const struct opq_calib_opts *c, double lo, double hi,
                      struct opq_qparams *p) {
    return opq_qparams_from_range((float)lo, (float)hi, c->qmin, c->qmax, c->symmetric, p);
}

// Value below which a fraction q of the samples lie (linear inside the bin).
static double hist_quantile(const struct opq_observer *o, double q) {
    double target = q * (double)o->count, acc = 0.0;
    double w = 2.0 * o->range / NB;
    for (int b = 0; b < NB; b++) {
        double c = o->hist[b];
        if (acc + c >= target && c > 0.0) {
            double f = (target - acc) / c;
            return -o->range + ((double)b + f) * w;
        }
        acc += c;
    }
    return o->max;
}

static void range_mse(const struct opq_observer *o, const struct opq_calib_opts *c, double *lo,
                      double *hi) {
    const int K = 100;
    double best = INFINITY, blo = *lo, bhi = *hi;
    struct opq_qparams p;
    // 1) shrink both ends together
    for (int k = 1; k <= K; k++) {
        double a = (double)k / K;
        if (candidate(c, *lo * a, *hi * a, &p)) {
            double e = hist_mse(o, &p);
            if (e < best) {
                best = e;
                blo  = *lo * a;
                bhi  = *hi * a;
            }
        }
    }
    if (!c->symmetric) {
        // 2) refine each end alone (asymmetric grids only; symmetric ranges have one parameter)
        double lo0 = blo, hi0 = bhi;
        for (int k = 1; k <= K; k++) {
            double h = *hi * k / K;
            if (h < hi0 * 0.5)
                continue;
            if (candidate(c, lo0, h, &p)) {
                double e = hist_mse(o, &p);
                if (e < best) {
                    best = e;
                    bhi  = h;
                }
            }
        }
        for (int k = 1; k <= K; k++) {
            double l = *lo * k / K;
            if (candidate(c, l, bhi, &p)) {
                double e = hist_mse(o, &p);
                if (e < best) {
                    best = e;
                    blo  = l;
                }
            }
        }
    }
    *lo = blo;
    *hi = bhi;
}

// TensorRT-style entropy calibration on |x|: the threshold whose clipped-and-requantized
// distribution Q is closest (KL) to the clipped reference P.
static double threshold_kl(const struct opq_observer *o, int levels) {
    enum { H = NB / 2 };
    double abs_hist[H];
    for (int i = 0; i < H; i++)
        abs_hist[i] = o->hist[H + i] + o->hist[H - 1 - i];
    int last = H;
    while (last > 0 && abs_hist[last - 1] == 0.0)
        last--;
    double w = o->range / H;
    if (last <= levels)
        return last * w;
    double best = INFINITY;
    int    best_i = last;
    double *p = malloc(sizeof(double) * H), *q = malloc(sizeof(double) * H);
    if (!p || !q) {
        free(p);
        free(q);
        return last * w;
    }
    for (int i = levels; i <= last; i++) {
        double outliers = 0.0;
        for (int j = i; j < H; j++)
            outliers += abs_hist[j];
        memcpy(p, abs_hist, sizeof(double) * (size_t)i);
        p[i - 1] += outliers;
        // Q: merge the i bins into `levels` groups, spread each group's mass over its non-empty
        // bins.
        for (int g = 0; g < levels; g++) {
            int s = (int)((long)g * i / levels), e = (int)((long)(g + 1) * i / levels);
            double mass = 0.0;
            int nz = 0;
            for (int j = s; j < e; j++) {
                mass += abs_hist[j];
                nz += abs_hist[j] != 0.0;
            }
            for (int j = s; j < e; j++)
                q[j] = (abs_hist[j] != 0.0 && nz) ? mass / nz : 0.0;
        }
        double sp = 0.0, sq = 0.0;
        for (int j = 0; j < i; j++) {
            sp += p[j];
            sq += q[j];
        }
        if (sp <= 0.0 || sq <= 0.0)
            continue;
        double kl = 0.0;
        for (int j = 0; j < i; j++) {
            if (p[j] == 0.0)
                continue;
            double pj = p[j] / sp, qj = q[j] / sq;
            kl += pj * log(pj / (qj > 0.0 ? qj : 1e-12));
        }
        if (kl < best) {
            best   = kl;
            best_i = i;
        }
    }
    free(p);
    free(q);
    return best_i * w;
}

enum opq_status opq_observer_range(const struct opq_observer *o, const struct opq_calib_opts *c,
                                   float *lo_out, float *hi_out, struct opq_qparams *out) {
    if (o->count == 0)
        return OPQ_ERR_NUMERIC;
    double lo = fmin(o->min, 0.0), hi = fmax(o->max, 0.0);
    if (o->range > 0.0) {
        switch (c->method) {
        case OPQ_CALIB_MINMAX:
            break;
        case OPQ_CALIB_PERCENTILE: {
            double q = c->percentile > 0.0 && c->percentile < 100.0 ? c->percentile : 99.99;
            double l = hist_quantile(o, 1.0 - q / 100.0), h = hist_quantile(o, q / 100.0);
            lo = fmin(fmax(l, o->min), 0.0);
            hi = fmax(fmin(h, o->max), 0.0);
            break;
        }
        case OPQ_CALIB_MSE:
            range_mse(o, c, &lo, &hi);
            break;
        case OPQ_CALIB_ENTROPY: {
            int levels = (c->qmax - c->qmin + 1) / 2;
            if (levels < 2)
                levels = 2;
            double t = threshold_kl(o, levels);
            lo = fmax(lo, -t);
            hi = fmin(hi, t);
            break;
        }
        }
    }
    *lo_out = (float)lo;
    *hi_out = (float)hi;
    return opq_qparams_from_range((float)lo, (float)hi, c->qmin, c->qmax, c->symmetric, out)
               ? OPQ_OK
               : OPQ_ERR_NUMERIC;
}

// ---- weights --------------------------------------------------------------------------------------

enum opq_status opq_weight_qparams(const float *w, size_t n, size_t n_ch, size_t inner,
                                   int32_t qmin, int32_t qmax, bool symmetric,
                                   enum opq_wcalib method, struct opq_qparams *out) {
    if (n_ch == 0 || inner == 0 || n % (n_ch * inner) != 0)
        return OPQ_ERR_SHAPE;
    double *lo = calloc(n_ch, sizeof(double)), *hi = calloc(n_ch, sizeof(double));
    double *err = NULL, *best = NULL;
    struct opq_qparams *cand = NULL;
    enum opq_status st = OPQ_OK;
    if (!lo || !hi) {
        st = OPQ_ERR_NOMEM;
        goto out_free;
    }
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(w[i])) {
            st = OPQ_ERR_NUMERIC;
            goto out_free;
        }
        size_t ch = (i / inner) % n_ch;
        if ((double)w[i] < lo[ch])
            lo[ch] = (double)w[i];
        if ((double)w[i] > hi[ch])
            hi[ch] = (double)w[i];
    }
    for (size_t ch = 0; ch < n_ch; ch++)
        opq_qparams_from_range((float)lo[ch], (float)hi[ch], qmin, qmax, symmetric, &out[ch]);
    if (method == OPQ_WCALIB_MSE) {
        err  = calloc(n_ch, sizeof(double));
        best = malloc(n_ch * sizeof(double));
        cand = malloc(n_ch * sizeof(*cand));
        if (!err || !best || !cand) {
            st = OPQ_ERR_NOMEM;
            goto out_free;
        }
        for (size_t ch = 0; ch < n_ch; ch++)
            best[ch] = INFINITY;
        // Clipping factors 1.00, 0.99, ... 0.50: one sweep over the weight per factor. Element
        // (o, c, t) of the [outer][n_ch][inner] view belongs to channel c; the channel's scale,
        // zero point and grid sit in arrays so the innermost loop has no calls or divisions by
        // index and vectorises. Rounding is half to even (1.5 * 2^23 trick, exact for |r| < 2^22;
        // larger values clamp anyway).
        float *cs = malloc(n_ch * sizeof(float)), *cz = malloc(n_ch * sizeof(float));
        float *clo = malloc(n_ch * sizeof(float)), *chi = malloc(n_ch * sizeof(float));
        if (!cs || !cz || !clo || !chi) {
            free(cs);
            free(cz);
            free(clo);
            free(chi);
            st = OPQ_ERR_NOMEM;
            goto out_free;
        }
        size_t outer = n / (n_ch * inner);
        for (int k = 0; k <= 50; k++) {
            double a = 1.0 - 0.01 * k;
            for (size_t ch = 0; ch < n_ch; ch++) {
                opq_qparams_from_range((float)(lo[ch] * a), (float)(hi[ch] * a), qmin, qmax,
                                       symmetric, &cand[ch]);
                cs[ch]  = cand[ch].scale;
                cz[ch]  = (float)cand[ch].zero_point;
                clo[ch] = (float)cand[ch].qmin;
                chi[ch] = (float)cand[ch].qmax;
                err[ch] = 0.0;
            }
            for (size_t o = 0; o < outer; o++) {
                for (size_t ch = 0; ch < n_ch; ch++) {
                    const float *x = w + (o * n_ch + ch) * inner;
                    float s = cs[ch], z = cz[ch], ql = clo[ch], qh = chi[ch];
                    double e = 0.0;
                    for (size_t t = 0; t < inner; t++) {
                        float r = x[t] / s;
                        r       = fabsf(r) < 4194304.0f ? (r + 12582912.0f) - 12582912.0f : r;
                        float q = r + z;
                        q       = q < ql ? ql : (q > qh ? qh : q);
                        float d = x[t] - (q - z) * s;
                        e += (double)(d * d);
                    }
                    err[ch] += e;
                }
            }
            for (size_t ch = 0; ch < n_ch; ch++) {
                if (err[ch] < best[ch]) {
                    best[ch] = err[ch];
                    out[ch]  = cand[ch];
                }
            }
        }
        free(cs);
        free(cz);
        free(clo);
        free(chi);
    }
out_free:
    free(lo);
    free(hi);
    free(err);
    free(best);
    free(cand);
    return st;
}
