/* adaround.c: the small numeric pieces of reconstruction: AdaRound's rectified sigmoid and its
 * hardening (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization"), one
 * Adam step, and the option defaults and names. */
// The AdaRound step runs over every weight of a unit each iteration: it compiles at O3 without
// FP-trap semantics (no fast-math: results unchanged; CMakeLists.txt adds -fno-math-errno for
// the Adam step's sqrt, which the pragma does not reach) so its loops vectorise,
// with an AVX-512 and AVX2 clone (as src/kernels/k_math.h). The pragma comes before the
// includes: the ku_ functions inlined into the loops need it too.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC optimize("O3", "no-trapping-math")
#if !defined(__SANITIZE_ADDRESS__)
#define AR_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef AR_HOT
#define AR_HOT
#endif

#include <math.h>
#include <string.h>

#include "kernels/k_vmath.h"
#include "recon/recon.h"

// h(alpha) and h'(alpha) (0 where clipped), branch-free in float.
static inline float ar_h(float alpha, float *dh) {
    const float zg = OPQ_ADAROUND_ZETA - OPQ_ADAROUND_GAMMA;
    float sg = 1.0f / (1.0f + ku_expf(-alpha));
    float r = sg * zg + OPQ_ADAROUND_GAMMA;
    float d = sg * (1.0f - sg) * zg;
    d = r <= 0.0f ? 0.0f : d;
    *dh = r >= 1.0f ? 0.0f : d;
    return r <= 0.0f ? 0.0f : (r >= 1.0f ? 1.0f : r);
}

static const char *const loss_names[] = {"aph", "mse", "fisher"};
static const char *const rounding_names[] = {"adaround", "flexround"};

int opq_recon_loss_from_name(const char *name) {
    for (size_t i = 0; i < ARRAY_SIZE(loss_names); i++)
        if (strcmp(name, loss_names[i]) == 0)
            return (int)i;
    return -1;
}

const char *opq_recon_loss_name(enum opq_recon_loss l) {
    return (unsigned)l < ARRAY_SIZE(loss_names) ? loss_names[l] : "?";
}

int opq_recon_rounding_from_name(const char *name) {
    for (size_t i = 0; i < ARRAY_SIZE(rounding_names); i++)
        if (strcmp(name, rounding_names[i]) == 0)
            return (int)i;
    return -1;
}

const char *opq_recon_rounding_name(enum opq_recon_rounding r) {
    return (unsigned)r < ARRAY_SIZE(rounding_names) ? rounding_names[r] : "?";
}

void opq_recon_opts_default(struct opq_recon_opts *o) {
    memset(o, 0, sizeof(*o));
    o->iters = 2000;
    o->batch = 32;
    o->count = 0;
    o->loss = OPQ_RECON_LOSS_APH;
    o->rounding = OPQ_RECON_ADAROUND;
    o->qdrop = true;
    o->drop_prob = 0.5f;
    o->temp = 20.0f;
    o->aph_floor = 0.0f;
    o->reg_weight = 0.01f;
    o->warmup = 0.2f;
    o->beta_start = 20.0f;
    o->beta_end = 2.0f;
    o->lr_round = 0.0f; // opq_recon_lr_round
    o->lr_flex = 1e-3f;
    o->lr_act = 4e-5f;
}

float opq_recon_lr_round(const struct opq_recon_opts *o, int iters) {
    if (o->lr_round > 0.0f)
        return o->lr_round;
    double lr = 1e-3 * 20000.0 / (double)(iters > 0 ? iters : 1);
    return (float)(lr < 1e-3 ? 1e-3 : (lr > 1e-2 ? 1e-2 : lr));
}

void opq_recon_aph_floor(float *h, size_t n, float factor) {
    if (n == 0 || factor == 0.0f)
        return;
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m += (double)h[i];
    m /= (double)n;
    for (size_t i = 0; i < n; i++)
        h[i] = (float)((double)h[i] + (double)factor * m);
}

float opq_adaround_h(float alpha, float *dh) {
    float d, h = ar_h(alpha, &d);
    if (dh)
        *dh = d;
    return h;
}

float opq_adaround_alpha0(float frac) {
    double f = (double)frac;
    if (f < 0.0)
        f = 0.0;
    if (f > 1.0)
        f = 1.0;
    double ratio =
        (double)(OPQ_ADAROUND_ZETA - OPQ_ADAROUND_GAMMA) / (f - (double)OPQ_ADAROUND_GAMMA);
    return (float)-log(ratio - 1.0);
}

float opq_adaround_hard(float w, float s, float alpha) {
    return floorf(w / s) + (alpha >= 0.0f ? 1.0f : 0.0f);
}

// Adam (beta1 0.9, beta2 0.999, eps 1e-8): the bias corrections of step t, and one element's
// moment update and step (what the parameter loses), in double, for opq_adam_step and the
// AdaRound step alike.
#define ADAM_B1 0.9
#define ADAM_B2 0.999

static inline double adam_c1(int t) {
    return 1.0 - pow(ADAM_B1, t);
}

static inline double adam_c2(int t) {
    return 1.0 - pow(ADAM_B2, t);
}

static inline __attribute__((always_inline)) float adam_delta(double g, float *m, float *v,
                                                              double lr, double c1, double c2) {
    double mi = ADAM_B1 * (double)*m + (1.0 - ADAM_B1) * g;
    double vi = ADAM_B2 * (double)*v + (1.0 - ADAM_B2) * g * g;
    *m = (float)mi;
    *v = (float)vi;
    return (float)(lr * (mi / c1) / (sqrt(vi / c2) + 1e-8));
}

void opq_adam_step(float *p, const float *g, float *m, float *v, size_t n, float lr, int t) {
    double c1 = adam_c1(t), c2 = adam_c2(t);
    for (size_t i = 0; i < n; i++)
        p[i] -= adam_delta((double)g[i], &m[i], &v[i], (double)lr, c1, c2);
}

// The soft weight of one element and its derivatives.
static inline __attribute__((always_inline)) void
ar_soft(float al, float base, float s, float z, float lo, float hi, float *restrict wq,
        float *restrict h, float *restrict dh, float *restrict dwda) {
    float d, hh = ar_h(al, &d);
    float q0 = base + hh + z;
    float q = q0 > hi ? hi : q0; // both bounds read unconditionally: no masked loads
    q = q < lo ? lo : q;
    *wq = (q - z) * s;
    *h = hh;
    *dh = d;
    *dwda = q == q0 ? s * d : 0.0f; // 0 where clamped
}

// Runs of elements sharing one channel (cs = 0: sc[0] etc.) or running over consecutive
// channels (cs = 1: element k has channel sc[k]); each loop is inlined once per cs, so both
// vectorise (the arrays are distinct: ivdep spares the alias checks restrict does not give
// once inlined).
static inline __attribute__((always_inline)) void
ar_hard_run(size_t len, const float *restrict alpha, const float *restrict base,
            const float *restrict sc, const float *restrict zp, const float *restrict lo,
            const float *restrict hi, float *restrict wq, size_t cs) {
#pragma GCC ivdep
    for (size_t k = 0; k < len; k++) {
        float s = sc[k * cs], z = zp[k * cs];
        float q = base[k] + (alpha[k] >= 0.0f ? 1.0f : 0.0f) + z;
        float l = lo[k * cs], u = hi[k * cs];
        q = q > u ? u : q; // both bounds read unconditionally: no masked loads
        q = q < l ? l : q;
        wq[k] = (q - z) * s;
    }
}

static inline __attribute__((always_inline)) void
ar_soft_run(size_t len, const float *restrict alpha, const float *restrict base,
            const float *restrict sc, const float *restrict zp, const float *restrict lo,
            const float *restrict hi, float *restrict wq, float *restrict h, float *restrict dh,
            float *restrict dwda, size_t cs) {
#pragma GCC ivdep
    for (size_t k = 0; k < len; k++)
        ar_soft(alpha[k], base[k], sc[k * cs], zp[k * cs], lo[k * cs], hi[k * cs], wq + k, h + k,
                dh + k, dwda + k);
}

struct ar_adam {
    double c1, c2, lr;
    float bm1, rk; // beta - 1, -2 reg_w beta
    bool reg;
};

static inline __attribute__((always_inline)) void
ar_update_run(size_t len, const struct ar_adam *p, const float *restrict g, float *restrict m,
              float *restrict v, float *restrict alpha, const float *restrict base,
              const float *restrict sc, const float *restrict zp, const float *restrict lo,
              const float *restrict hi, float *restrict wq, float *restrict h,
              float *restrict dh, float *restrict dwda, size_t cs) {
    const double c1 = p->c1, c2 = p->c2, lr = p->lr;
    const float bm1 = p->bm1, rk = p->reg ? p->rk : 0.0f;
#pragma GCC ivdep
    for (size_t k = 0; k < len; k++) {
        float hk = h[k], dk = dh[k];
        double ga = (double)g[k] * (double)dwda[k];
        float x = 2.0f * hk - 1.0f, ax = x < 0.0f ? -x : x;
        // |2h - 1|^(beta - 1), 0 below e^-60: the product with rk dh would be denormal there
        // (slow), and a gradient that small is no step for Adam (its eps is 1e-8)
        float lg = bm1 * ku_logf(ax);
        float pw = ku_expf(lg < -60.0f ? -60.0f : lg);
        pw = lg < -60.0f ? 0.0f : pw;
        float rg = rk * pw * (x > 0.0f ? 1.0f : -1.0f) * dk; // rk = 0 without the regularizer
        rg = ax > 0.0f ? rg : 0.0f;
        ga += (double)rg;
        float al = alpha[k] - adam_delta(ga, m + k, v + k, lr, c1, c2);
        alpha[k] = al;
        ar_soft(al, base[k], sc[k * cs], zp[k * cs], lo[k * cs], hi[k * cs], wq + k, h + k,
                dh + k, dwda + k);
    }
}

// Elements [i, i + len) of a, all in channel c (cs = 0) or in channels c, c + 1, ... (cs = 1).
static inline __attribute__((always_inline)) void ar_run(const struct opq_adaround *a,
                                                         const struct opq_adaround_hyper *hp,
                                                         const struct ar_adam *ad, size_t i,
                                                         size_t len, size_t c, size_t cs) {
    if (hp->mode == OPQ_ADAROUND_HARD)
        ar_hard_run(len, a->alpha + i, a->base + i, a->sc + c, a->z + c, a->lo + c, a->hi + c,
                    a->wq + i, cs);
    else if (hp->mode == OPQ_ADAROUND_SOFT)
        ar_soft_run(len, a->alpha + i, a->base + i, a->sc + c, a->z + c, a->lo + c, a->hi + c,
                    a->wq + i, a->h + i, a->dh + i, a->dwda + i, cs);
    else
        ar_update_run(len, ad, a->g + i, a->m + i, a->v + i, a->alpha + i, a->base + i,
                      a->sc + c, a->z + c, a->lo + c, a->hi + c, a->wq + i, a->h + i, a->dh + i,
                      a->dwda + i, cs);
}

AR_HOT void opq_adaround_step(const struct opq_adaround *a, const struct opq_adaround_hyper *hp,
                              size_t i0, size_t i1) {
    struct ar_adam ad = {.c1 = adam_c1(hp->t),
                         .c2 = adam_c2(hp->t),
                         .lr = (double)hp->lr,
                         .bm1 = hp->beta - 1.0f,
                         .rk = -2.0f * hp->reg_w * hp->beta,
                         .reg = hp->reg};
    size_t nc = a->n_ch > 1 ? (size_t)a->n_ch : 1;
    if (nc == 1) {
        ar_run(a, hp, &ad, i0, i1 - i0, 0, 0);
        return;
    }
    for (size_t i = i0; i < i1;) {
        size_t c = (i / a->inner) % nc;
        if (a->inner == 1) { // consecutive elements, consecutive channels: to the row's end
            size_t len = nc - c < i1 - i ? nc - c : i1 - i;
            ar_run(a, hp, &ad, i, len, c, 1);
            i += len;
        } else { // one channel to the end of its run
            size_t left = a->inner - i % a->inner;
            size_t len = left < i1 - i ? left : i1 - i;
            ar_run(a, hp, &ad, i, len, c, 0);
            i += len;
        }
    }
}
