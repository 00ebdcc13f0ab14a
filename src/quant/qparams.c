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
#include "threadpool.h"

// The observer's counting and the weight-range search are the hot loops of calibration: O3
// without FP-trap semantics (as in src/kernels/k_math.h; no fast-math, results unchanged) and an
// AVX2 clone picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC optimize("O3", "no-trapping-math")
#if !defined(__SANITIZE_ADDRESS__)
#define OPQ_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef OPQ_HOT
#define OPQ_HOT
#endif
#if defined(__GNUC__)
#define OPQ_INLINE __attribute__((always_inline)) inline
#else
#define OPQ_INLINE inline
#endif

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

// Histogram counting runs on integer counts per part of the input (two interleaved count arrays
// per part, so consecutive samples in the same bin do not serialise on one counter), added into
// the double histogram at the end: the result is exact and does not depend on how the input was
// split, so any thread count gives the same observer. The bin of v is floor(v * NB / 2R) + NB/2,
// exact in float because NB / 2R is a power of two.
#define OBS_PAR_MIN 32768 // below this a call runs on the caller alone
#define OBS_MAX_PARTS 8
#define OBS_IDX 512

struct obs_part {
    float    mn, mx;
    uint64_t bad;
};

struct obs_job {
    const float     *x;
    size_t           n;
    int              parts;
    float            inv;
    struct obs_part *p;      // [parts]
    uint32_t        *counts; // [parts][2][NB + 1]; bin NB takes the non-finite samples
    bool             fused;  // obs_bin_parts also takes each part's min/max (obs_minmax_bin)
};

static size_t part_begin(const struct obs_job *j, int64_t p) {
    return j->n * (size_t)p / (size_t)j->parts; // n <= 2^31 (one slab), parts <= 8
}

// Min, max and non-finite count of x. Eight lanes of GCC vector code where available (the
// compiler does not turn a NaN-aware scalar min into vector code by itself); finite means the
// exponent bits are not all ones.
#if defined(__GNUC__)
typedef float   obs_v8f __attribute__((vector_size(32)));
typedef int32_t obs_v8i __attribute__((vector_size(32)));
#endif

OPQ_HOT static void obs_minmax(const float *x, size_t n, struct obs_part *out) {
    float mn = INFINITY, mx = -INFINITY;
    uint64_t nb = 0;
    size_t i = 0;
#if defined(__GNUC__)
    const obs_v8i expo = (obs_v8i){0} + 0x7f800000, absm = (obs_v8i){0} + 0x7fffffff;
    const obs_v8f pinf = (obs_v8f){0} + INFINITY, ninf = (obs_v8f){0} + -INFINITY;
    obs_v8f vmn = pinf, vmx = ninf;
    obs_v8i vbad = (obs_v8i){0};
    for (; i + 8 <= n; i += 8) {
        obs_v8f v;
        memcpy(&v, x + i, sizeof(v));
        obs_v8i fin = ((obs_v8i)v & absm) < expo; // -1 where finite
        obs_v8f lo  = (obs_v8f)(((obs_v8i)v & fin) | ((obs_v8i)pinf & ~fin));
        obs_v8f hi  = (obs_v8f)(((obs_v8i)v & fin) | ((obs_v8i)ninf & ~fin));
        obs_v8i lt = lo < vmn, gt = hi > vmx;
        vmn  = (obs_v8f)(((obs_v8i)lo & lt) | ((obs_v8i)vmn & ~lt));
        vmx  = (obs_v8f)(((obs_v8i)hi & gt) | ((obs_v8i)vmx & ~gt));
        vbad += fin + 1;
    }
    for (int j = 0; j < 8; j++) {
        mn = vmn[j] < mn ? vmn[j] : mn;
        mx = vmx[j] > mx ? vmx[j] : mx;
        nb += (uint64_t)vbad[j];
    }
#endif
    for (; i < n; i++) {
        float v = x[i];
        if (!(fabsf(v) <= FLT_MAX)) {
            nb++;
            continue;
        }
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    out->mn  = mn;
    out->mx  = mx;
    out->bad = nb;
}

OPQ_HOT static void obs_bin(const float *x, size_t n, float inv, uint32_t *h0, uint32_t *h1) {
    int32_t idx[OBS_IDX];
    const float lo = -(float)(NB / 2), hi = (float)(NB / 2 - 1);
    for (size_t i = 0; i < n; i += OBS_IDX) {
        size_t m = n - i < OBS_IDX ? n - i : OBS_IDX;
        for (size_t j = 0; j < m; j++) {
            float v  = x[i + j];
            int fin  = fabsf(v) <= FLT_MAX;
            float f  = floorf((fin ? v : 0.0f) * inv);
            f        = f < lo ? lo : (f > hi ? hi : f);
            idx[j]   = fin ? (int32_t)f + NB / 2 : NB;
        }
        size_t j = 0;
        for (; j + 2 <= m; j += 2) {
            h0[idx[j]]++;
            h1[idx[j + 1]]++;
        }
        if (j < m)
            h0[idx[j]]++;
    }
}

// obs_minmax and obs_bin in one pass over x, block by block (the block is re-read from L1), for
// calls where the histogram's range is already known: the caller keeps the counts only if every
// finite sample turned out to lie inside the range, which is then the range the two-pass path
// would have binned at, so the counts are the same.
OPQ_HOT static void obs_minmax_bin(const float *x, size_t n, float inv, uint32_t *h0,
                                   uint32_t *h1, struct obs_part *out) {
    struct obs_part acc = {INFINITY, -INFINITY, 0};
    for (size_t i = 0; i < n; i += OBS_IDX) {
        size_t m = n - i < OBS_IDX ? n - i : OBS_IDX;
        struct obs_part p;
        obs_minmax(x + i, m, &p);
        acc.mn = p.mn < acc.mn ? p.mn : acc.mn;
        acc.mx = p.mx > acc.mx ? p.mx : acc.mx;
        acc.bad += p.bad;
        obs_bin(x + i, m, inv, h0, h1);
    }
    *out = acc;
}

static void obs_minmax_parts(void *user, int64_t b, int64_t e) {
    struct obs_job *j = user;
    for (int64_t p = b; p < e; p++) {
        size_t s = part_begin(j, p), t = part_begin(j, p + 1);
        obs_minmax(j->x + s, t - s, &j->p[p]);
    }
}

// Counts of each part (with j->fused, min/max in the same pass).
static void obs_bin_parts(void *user, int64_t b, int64_t e) {
    struct obs_job *j = user;
    for (int64_t p = b; p < e; p++) {
        size_t s = part_begin(j, p), t = part_begin(j, p + 1);
        uint32_t *h = j->counts + (size_t)p * 2 * (NB + 1);
        memset(h, 0, sizeof(uint32_t) * 2 * (NB + 1));
        if (j->fused)
            obs_minmax_bin(j->x + s, t - s, j->inv, h, h + NB + 1, &j->p[p]);
        else
            obs_bin(j->x + s, t - s, j->inv, h, h + NB + 1);
    }
}

static void observer_add_slab(struct opq_observer *o, const float *x, size_t n,
                              struct opq_threadpool *pool) {
    uint32_t local[2 * (NB + 1)];
    struct obs_part parts[OBS_MAX_PARTS];
    struct obs_job j = {.x = x, .n = n, .parts = 1, .p = parts, .counts = local};
    int T = pool ? opq_threadpool_size(pool) : 1;
    if (T > 1 && n >= OBS_PAR_MIN) {
        int np = 2 * T < OBS_MAX_PARTS ? 2 * T : OBS_MAX_PARTS;
        uint32_t *ws = opq_threadpool_workspace(pool, sizeof(uint32_t) * 2 * (NB + 1) * (size_t)np);
        if (ws) {
            j.parts  = np;
            j.counts = ws;
        }
    }
    // Range known: one pass, kept unless the range has to grow (then the two passes below).
    bool counted = false;
    if (o->range > 0.0) {
        j.inv   = (float)((double)NB / (2.0 * o->range));
        j.fused = true;
        if (j.parts > 1)
            opq_parallel_for(pool, j.parts, 1, obs_bin_parts, &j);
        else
            obs_bin_parts(&j, 0, 1);
        j.fused = false;
        counted = true;
    } else if (j.parts > 1) {
        opq_parallel_for(pool, j.parts, 1, obs_minmax_parts, &j);
    } else {
        obs_minmax_parts(&j, 0, 1);
    }
    // Min/max and growth once per call.
    double mn = o->min, mx = o->max;
    uint64_t bad = 0;
    for (int p = 0; p < j.parts; p++) {
        bad += parts[p].bad;
        if (parts[p].mn <= parts[p].mx) {
            mn = fmin(mn, (double)parts[p].mn);
            mx = fmax(mx, (double)parts[p].mx);
        }
    }
    o->n_nonfinite += bad;
    if (bad == n)
        return;
    o->min = mn;
    o->max = mx;
    double amax = fmax(fabs(mn), fabs(mx));
    if (amax > 0.0 && amax >= o->range) {
        observer_grow(o, amax, false);
        counted = false; // binned at the old range: count again at the new one
    }
    // With R == 0 every finite sample is 0 and lands in bin NB/2 (inv = 0).
    j.inv = o->range > 0.0 ? (float)((double)NB / (2.0 * o->range)) : 0.0f;
    if (!counted && j.parts > 1)
        opq_parallel_for(pool, j.parts, 1, obs_bin_parts, &j);
    else if (!counted)
        obs_bin_parts(&j, 0, 1);
    for (int p = 0; p < j.parts; p++) {
        const uint32_t *h = j.counts + (size_t)p * 2 * (NB + 1);
        for (int b = 0; b < NB; b++)
            o->hist[b] += (double)h[b] + (double)h[NB + 1 + b];
    }
    o->count += n - bad;
}

// Slabs of at most 2^31 samples keep every part's 32-bit counts from overflowing.
void opq_observer_add_mt(struct opq_observer *o, const float *x, size_t n,
                         struct opq_threadpool *pool) {
    const size_t slab = (size_t)1 << 31;
    for (; n > slab; x += slab, n -= slab)
        observer_add_slab(o, x, slab, pool);
    if (n > 0)
        observer_add_slab(o, x, n, pool);
}

void opq_observer_add(struct opq_observer *o, const float *x, size_t n) {
    opq_observer_add_mt(o, x, n, NULL);
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

// MSE search: clipping factors 1.00, 0.99, ... 0.50 of each channel's range. The channel's scale,
// zero point and grid per candidate sit in arrays so the innermost loops have no calls or index
// divisions and vectorise; x / scale is taken as x * (1 / scale) (the search only ranks candidates;
// the codes written later divide). Rounding is half to even (1.5 * 2^23 trick, exact for |r| < 2^22;
// larger values clamp anyway). Every channel's error sums run in a fixed order of its own, so
// the result does not depend on how channels are split over threads.
#define WS_K  51 // candidates
#define WS_CB 64 // channels per block when channels are contiguous (inner == 1)

struct ws_job {
    const float *w;
    size_t       n_ch, inner, outer;
    const float *cs, *ci, *cz; // [WS_K][n_ch] candidate scale, 1 / scale, zero point
    float        ql, qh;
    double      *err;     // [WS_K][n_ch]
};

// The code of r = x / scale on the grid [ql, qh] with zero point z, in float.
static OPQ_INLINE float grid_code(float r, float z, float ql, float qh) {
    r       = fabsf(r) < 4194304.0f ? (r + 12582912.0f) - 12582912.0f : r;
    float q = r + z;
    return q < ql ? ql : (q > qh ? qh : q);
}

static OPQ_INLINE float ws_d(float x, float s, float is, float z, float ql, float qh) {
    return x - (grid_code(x * is, z, ql, qh) - z) * s;
}

// inner == 1 ([outer][n_ch], e.g. MatMul [K, N] per column): blocks of WS_CB channels, one row of
// the block read once for all candidates; each channel's sum runs over the rows in order.
OPQ_HOT static void ws_cols(void *user, int64_t b, int64_t e) {
    const struct ws_job *j = user;
    double acc[WS_K][WS_CB];
    for (int64_t blk = b; blk < e; blk++) {
        size_t c0 = (size_t)blk * WS_CB;
        size_t m  = j->n_ch - c0 < WS_CB ? j->n_ch - c0 : WS_CB;
        memset(acc, 0, sizeof(acc));
        for (size_t o = 0; o < j->outer; o++) {
            const float *x = j->w + o * j->n_ch + c0;
            for (int k = 0; k < WS_K; k++) {
                const float *s = j->cs + (size_t)k * j->n_ch + c0;
                const float *is = j->ci + (size_t)k * j->n_ch + c0;
                const float *z = j->cz + (size_t)k * j->n_ch + c0;
                double *a      = acc[k];
                for (size_t c = 0; c < m; c++) {
                    float d = ws_d(x[c], s[c], is[c], z[c], j->ql, j->qh);
                    a[c] += (double)(d * d);
                }
            }
        }
        for (int k = 0; k < WS_K; k++)
            memcpy(j->err + (size_t)k * j->n_ch + c0, acc[k], m * sizeof(double));
    }
}

// inner > 1 (e.g. Conv [M, C, kh, kw] per filter, or per tensor): one channel at a time, eight
// double partial sums over its contiguous runs, added in a fixed order.
OPQ_HOT static void ws_rows(void *user, int64_t b, int64_t e) {
    const struct ws_job *j = user;
    for (int64_t ch = b; ch < e; ch++) {
        for (int k = 0; k < WS_K; k++) {
            float s = j->cs[(size_t)k * j->n_ch + (size_t)ch];
            float is = j->ci[(size_t)k * j->n_ch + (size_t)ch];
            float z = j->cz[(size_t)k * j->n_ch + (size_t)ch];
            double a[8] = {0};
            for (size_t o = 0; o < j->outer; o++) {
                const float *x = j->w + (o * j->n_ch + (size_t)ch) * j->inner;
                size_t t = 0;
                for (; t + 8 <= j->inner; t += 8)
                    for (int l = 0; l < 8; l++) {
                        float d = ws_d(x[t + l], s, is, z, j->ql, j->qh);
                        a[l] += (double)(d * d);
                    }
                for (; t < j->inner; t++) {
                    float d = ws_d(x[t], s, is, z, j->ql, j->qh);
                    a[0] += (double)(d * d);
                }
            }
            j->err[(size_t)k * j->n_ch + (size_t)ch] =
                ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        }
    }
}

enum opq_status opq_weight_qparams_mt(const float *w, size_t n, size_t n_ch, size_t inner,
                                      int32_t qmin, int32_t qmax, bool symmetric,
                                      enum opq_wcalib method, struct opq_qparams *out,
                                      struct opq_threadpool *pool) {
    if (n_ch == 0 || inner == 0 || n % (n_ch * inner) != 0)
        return OPQ_ERR_SHAPE;
    size_t outer = n / (n_ch * inner);
    double *lo = calloc(n_ch, sizeof(double)), *hi = calloc(n_ch, sizeof(double));
    float *cs = NULL, *ci = NULL, *cz = NULL;
    double *err = NULL;
    enum opq_status st = OPQ_OK;
    if (!lo || !hi) {
        st = OPQ_ERR_NOMEM;
        goto out_free;
    }
    for (size_t o = 0; o < outer; o++)
        for (size_t ch = 0; ch < n_ch; ch++) {
            const float *x = w + (o * n_ch + ch) * inner;
            double l = lo[ch], h = hi[ch];
            for (size_t t = 0; t < inner; t++) {
                if (!isfinite(x[t])) {
                    st = OPQ_ERR_NUMERIC;
                    goto out_free;
                }
                l = (double)x[t] < l ? (double)x[t] : l;
                h = (double)x[t] > h ? (double)x[t] : h;
            }
            lo[ch] = l;
            hi[ch] = h;
        }
    for (size_t ch = 0; ch < n_ch; ch++)
        opq_qparams_from_range((float)lo[ch], (float)hi[ch], qmin, qmax, symmetric, &out[ch]);
    if (method != OPQ_WCALIB_MSE)
        goto out_free;
    cs  = malloc(sizeof(float) * WS_K * n_ch);
    ci  = malloc(sizeof(float) * WS_K * n_ch);
    cz  = malloc(sizeof(float) * WS_K * n_ch);
    err = malloc(sizeof(double) * WS_K * n_ch);
    if (!cs || !ci || !cz || !err) {
        st = OPQ_ERR_NOMEM;
        goto out_free;
    }
    for (int k = 0; k < WS_K; k++) {
        double a = 1.0 - 0.01 * k;
        for (size_t ch = 0; ch < n_ch; ch++) {
            struct opq_qparams c;
            opq_qparams_from_range((float)(lo[ch] * a), (float)(hi[ch] * a), qmin, qmax,
                                   symmetric, &c);
            cs[(size_t)k * n_ch + ch] = c.scale;
            ci[(size_t)k * n_ch + ch] = 1.0f / c.scale;
            cz[(size_t)k * n_ch + ch] = (float)c.zero_point;
        }
    }
    struct ws_job j = {.w = w, .n_ch = n_ch, .inner = inner, .outer = outer, .cs = cs, .ci = ci,
                       .cz = cz,
                       .ql = (float)qmin, .qh = (float)qmax, .err = err};
    if (inner == 1)
        opq_parallel_for(pool, (int64_t)((n_ch + WS_CB - 1) / WS_CB), 1, ws_cols, &j);
    else
        opq_parallel_for(pool, (int64_t)n_ch, 1, ws_rows, &j);
    for (size_t ch = 0; ch < n_ch; ch++) {
        double best = INFINITY;
        for (int k = 0; k < WS_K; k++) {
            double e = err[(size_t)k * n_ch + ch];
            if (e < best) {
                best = e;
                opq_qparams_from_range((float)(lo[ch] * (1.0 - 0.01 * k)),
                                       (float)(hi[ch] * (1.0 - 0.01 * k)), qmin, qmax, symmetric,
                                       &out[ch]);
            }
        }
    }
out_free:
    free(lo);
    free(hi);
    free(cs);
    free(ci);
    free(cz);
    free(err);
    return st;
}

enum opq_status opq_weight_qparams(const float *w, size_t n, size_t n_ch, size_t inner,
                                   int32_t qmin, int32_t qmax, bool symmetric,
                                   enum opq_wcalib method, struct opq_qparams *out) {
    return opq_weight_qparams_mt(w, n, n_ch, inner, qmin, qmax, symmetric, method, out, NULL);
}

// ---- per-channel codes ------------------------------------------------------------------------------

struct qc_job {
    const float *x;
    size_t       n_ch, inner, outer;
    const float *s, *z;   // [n_ch]
    float        ql, qh;
    int32_t     *q;       // NULL: codes not wanted
    double      *sig, *err; // [n_ch] sums per channel
};


// Rows [b, e) of the [outer][n_ch] view (inner == 1): every channel's sums run over the rows in
// order.
OPQ_HOT static void qc_cols(const struct qc_job *j, size_t b, size_t e) {
    for (size_t o = b; o < e; o++) {
        const float *x = j->x + o * j->n_ch;
        int32_t *q     = j->q ? j->q + o * j->n_ch : NULL;
        for (size_t c = 0; c < j->n_ch; c++) {
            float k = grid_code(x[c] / j->s[c], j->z[c], j->ql, j->qh);
            float d = x[c] - (k - j->z[c]) * j->s[c];
            j->sig[c] += (double)(x[c] * x[c]);
            j->err[c] += (double)(d * d);
            if (q)
                q[c] = (int32_t)k;
        }
    }
}

// Channel runs of `inner` contiguous elements, eight double partial sums per run.
OPQ_HOT static void qc_rows(const struct qc_job *j) {
    for (size_t o = 0; o < j->outer; o++)
        for (size_t c = 0; c < j->n_ch; c++) {
            size_t off     = (o * j->n_ch + c) * j->inner;
            const float *x = j->x + off;
            int32_t *q     = j->q ? j->q + off : NULL;
            float s = j->s[c], z = j->z[c];
            double as[8] = {0}, ae[8] = {0};
            size_t t = 0;
            for (; t + 8 <= j->inner; t += 8)
                for (int l = 0; l < 8; l++) {
                    float k = grid_code(x[t + l] / s, z, j->ql, j->qh);
                    float d = x[t + l] - (k - z) * s;
                    as[l] += (double)(x[t + l] * x[t + l]);
                    ae[l] += (double)(d * d);
                    if (q)
                        q[t + l] = (int32_t)k;
                }
            for (; t < j->inner; t++) {
                float k = grid_code(x[t] / s, z, j->ql, j->qh);
                float d = x[t] - (k - z) * s;
                as[0] += (double)(x[t] * x[t]);
                ae[0] += (double)(d * d);
                if (q)
                    q[t] = (int32_t)k;
            }
            for (int l = 0; l < 8; l++) {
                j->sig[c] += as[l];
                j->err[c] += ae[l];
            }
        }
}

enum opq_status opq_quantize_channels(const float *x, size_t n, size_t n_ch, size_t inner,
                                      const struct opq_qparams *p, int32_t *q, double *sig,
                                      double *err) {
    if (n_ch == 0 || inner == 0 || n % (n_ch * inner) != 0)
        return OPQ_ERR_SHAPE;
    float *s = malloc(sizeof(float) * n_ch), *z = malloc(sizeof(float) * n_ch);
    double *cs = calloc(n_ch, sizeof(double)), *ce = calloc(n_ch, sizeof(double));
    enum opq_status st = OPQ_ERR_NOMEM;
    if (s && z && cs && ce) {
        for (size_t c = 0; c < n_ch; c++) {
            s[c] = p[c].scale;
            z[c] = (float)p[c].zero_point;
        }
        // one grid for all channels (same bit width)
        struct qc_job j = {.x = x, .n_ch = n_ch, .inner = inner, .outer = n / (n_ch * inner),
                           .s = s, .z = z, .ql = (float)p[0].qmin, .qh = (float)p[0].qmax,
                           .q = q, .sig = cs, .err = ce};
        if (inner == 1)
            qc_cols(&j, 0, j.outer);
        else
            qc_rows(&j);
        double ts = 0.0, te = 0.0;
        for (size_t c = 0; c < n_ch; c++) {
            ts += cs[c];
            te += ce[c];
        }
        if (sig)
            *sig = ts;
        if (err)
            *err = te;
        st = OPQ_OK;
    }
    free(s);
    free(z);
    free(cs);
    free(ce);
    return st;
}
