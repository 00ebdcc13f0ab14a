/* flexround.c: FlexRound's weight parameterization (Lee et al., "FlexRound: Learnable Rounding
 * based on Element-wise Division for Post-Training Quantization", ICML 2023), as the
 * reconstruction engine uses it in place of AdaRound (recon.h).
 *
 *   S     = s1 * S2 * s3 [* s4]        learned as theta = log s (one exp of a sum)
 *   r     = W / S,  q = clamp(round(r) + z, qmin, qmax)
 *   W_hat = s1 * (q - z)
 *
 * s1 is the grid (one per weight qparams channel), S2 is element-wise, s3 per output channel and
 * s4 per input channel of Conv weights. With u = theta1 + Theta2 + theta3 + theta4, dr/du = -r;
 * the round is straight-through and the clamp passes no gradient, so for G = dL/dW_hat and
 * m = [qmin <= round(r) + z <= qmax]:
 *   dL/du       = -G s1 m r            (this is dL/dTheta2, summed for theta3 and theta4)
 *   dL/dtheta1  = sum (dL/du + G s1 (q - z))   (the divisor path plus the direct path)
 * The update of a divisor is proportional to the weight itself (the paper's reciprocal rule). */
#include "recon/recon.h"

#include <math.h>
#include <string.h>

#include "quant/qparams.h"

size_t opq_flexround_n_params(const struct opq_flexround *f) {
    return (size_t)f->n1 + f->n + (size_t)f->n3 + (size_t)f->n4;
}

static size_t group(size_t i, size_t inner, int n_groups) {
    return n_groups > 1 ? (i / inner) % (size_t)n_groups : 0;
}

void opq_flexround_init(struct opq_flexround *f, const struct opq_qparams *qp) {
    size_t np = opq_flexround_n_params(f);
    memset(f->theta, 0, sizeof(float) * np);
    for (int c = 0; c < f->n1; c++)
        f->theta[c] = logf(qp[c].scale);
}

// The log divisor u of element i and the four parameter offsets it reads.
static double log_divisor(const struct opq_flexround *f, size_t i, size_t *c1, size_t *c3,
                          size_t *c4) {
    const float *t2 = f->theta + f->n1;
    const float *t3 = t2 + f->n;
    const float *t4 = t3 + f->n3;
    *c1 = group(i, f->inner1, f->n1);
    *c3 = group(i, f->inner3, f->n3);
    *c4 = group(i, f->inner4, f->n4);
    double u = (double)f->theta[*c1] + (double)t2[i] + (double)t3[*c3];
    if (f->n4 > 0)
        u += (double)t4[*c4];
    return u;
}

float opq_flexround_grid(const struct opq_flexround *f, int c) {
    return (float)exp((double)f->theta[c]);
}

void opq_flexround_forward(const struct opq_flexround *f, const struct opq_qparams *qp,
                           const float *w, float *wq, int32_t *q) {
    for (size_t i = 0; i < f->n; i++) {
        size_t c1, c3, c4;
        double u = log_divisor(f, i, &c1, &c3, &c4);
        const struct opq_qparams *p = &qp[c1];
        float s1 = opq_flexround_grid(f, (int)c1);
        float r = (float)((double)w[i] * exp(-u));
        float z = (float)p->zero_point;
        float k = nearbyintf(r) + z;
        k = k < (float)p->qmin ? (float)p->qmin : (k > (float)p->qmax ? (float)p->qmax : k);
        if (wq)
            wq[i] = (k - z) * s1;
        if (q)
            q[i] = (int32_t)k;
    }
}

void opq_flexround_backward(const struct opq_flexround *f, const struct opq_qparams *qp,
                            const float *w, const float *G, double *grad) {
    double *g2 = grad + f->n1;
    double *g3 = g2 + f->n;
    double *g4 = g3 + f->n3;
    for (size_t i = 0; i < f->n; i++) {
        size_t c1, c3, c4;
        double u = log_divisor(f, i, &c1, &c3, &c4);
        const struct opq_qparams *p = &qp[c1];
        double s1 = (double)opq_flexround_grid(f, (int)c1);
        double r = (double)(float)((double)w[i] * exp(-u));
        double z = (double)p->zero_point;
        double k = (double)nearbyintf((float)r) + z;
        bool in = k >= (double)p->qmin && k <= (double)p->qmax;
        k = k < (double)p->qmin ? (double)p->qmin : (k > (double)p->qmax ? (double)p->qmax : k);
        double gi = (double)G[i];
        double du = in ? -gi * s1 * r : 0.0;
        grad[c1] += du + gi * s1 * (k - z);
        g2[i] += du;
        g3[c3] += du;
        if (f->n4 > 0)
            g4[c4] += du;
    }
}
