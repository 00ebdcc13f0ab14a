/* adaround.c: the small numeric pieces of reconstruction: AdaRound's rectified sigmoid and its
 * hardening (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization"), one
 * Adam step, and the option defaults and names. */
#include <math.h>
#include <string.h>

#include "recon/recon.h"

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
    o->lr_round = 1e-3f;
    o->lr_flex = 1e-3f;
    o->lr_act = 4e-5f;
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
    double sg = 1.0 / (1.0 + exp(-(double)alpha));
    double r = sg * (double)(OPQ_ADAROUND_ZETA - OPQ_ADAROUND_GAMMA) + (double)OPQ_ADAROUND_GAMMA;
    if (dh)
        *dh = (r <= 0.0 || r >= 1.0)
                  ? 0.0f
                  : (float)(sg * (1.0 - sg) * (double)(OPQ_ADAROUND_ZETA - OPQ_ADAROUND_GAMMA));
    return r <= 0.0 ? 0.0f : (r >= 1.0 ? 1.0f : (float)r);
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

void opq_adam_step(float *p, const float *g, float *m, float *v, size_t n, float lr, int t) {
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    double c1 = 1.0 - pow(b1, t);
    double c2 = 1.0 - pow(b2, t);
    for (size_t i = 0; i < n; i++) {
        double gi = (double)g[i];
        double mi = b1 * (double)m[i] + (1.0 - b1) * gi;
        double vi = b2 * (double)v[i] + (1.0 - b2) * gi * gi;
        m[i] = (float)mi;
        v[i] = (float)vi;
        p[i] -= (float)((double)lr * (mi / c1) / (sqrt(vi / c2) + eps));
    }
}
