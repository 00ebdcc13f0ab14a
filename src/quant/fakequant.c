/* fakequant.c: fake-quant forward and STE/LSQ backward (see fakequant.h). */
#include "fakequant.h"

#include <math.h>

void opq_fakequant_forward(const struct opq_fq_params *p, const float *x, float *y) {
    for (int64_t o = 0; o < p->outer; o++) {
        for (int64_t c = 0; c < p->channels; c++) {
            float s = p->scale[c];
            float z = p->zero_point ? p->zero_point[c] : 0.0f;
            int64_t off = (o * p->channels + c) * p->inner;
            const float *xs = x + off;
            float *ys = y + off;
            for (int64_t i = 0; i < p->inner; i++) {
                float q = nearbyintf(xs[i] / s) + z;
                q = q < p->qmin ? p->qmin : q > p->qmax ? p->qmax : q;
                ys[i] = s * (q - z);
            }
        }
    }
}

void opq_fakequant_backward(const struct opq_fq_params *p, const float *x, const float *dy,
                            float *dx, double *dscale) {
    for (int64_t o = 0; o < p->outer; o++) {
        for (int64_t c = 0; c < p->channels; c++) {
            float s = p->scale[c];
            float z = p->zero_point ? p->zero_point[c] : 0.0f;
            int64_t off = (o * p->channels + c) * p->inner;
            double ds = 0.0;
            for (int64_t i = 0; i < p->inner; i++) {
                float v = x[off + i] / s;
                float r = nearbyintf(v);
                float q = r + z;
                float g = dy[off + i];
                float d;
                if (q < p->qmin) {
                    d = p->qmin - z;
                    if (dx)
                        dx[off + i] = 0.0f;
                } else if (q > p->qmax) {
                    d = p->qmax - z;
                    if (dx)
                        dx[off + i] = 0.0f;
                } else {
                    d = r - v;
                    if (dx)
                        dx[off + i] = g;
                }
                ds += (double)g * (double)d;
            }
            if (dscale)
                dscale[c] += ds;
        }
    }
}
