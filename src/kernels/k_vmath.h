/* k_vmath.h: branch-free float exp, erf and log without libm calls, so loops over them
 * vectorise. Header-only (static inline); used by the compute kernels (through k_math.h), the
 * quantizer search and the reconstruction's AdaRound step. */
#ifndef OPQ_K_VMATH_H
#define OPQ_K_VMATH_H

#include <stdint.h>

// exp(x) in float without libm calls, branch-free so loops over it vectorise: n = round(x/ln2)
// by the 1.5*2^23 trick, r = x - n ln2 (two-part ln2), e^r by its degree-7 Taylor polynomial
// (|r| <= ln2/2: relative error < 1e-8 before float rounding), scaled by 2^n through the
// exponent bits. Inputs below -87.3 give 0 (denormal results are flushed); above 88.3 are
// clamped (callers never get there: softmax and GELU feed values <= 0).
static inline float ku_expf(float x0) {
    float x = x0 < -87.3f ? -87.3f : x0;
    x = x > 88.3f ? 88.3f : x;
    float t = x * 1.44269504f + 12582912.0f;
    float nf = t - 12582912.0f;
    float r = x - nf * 0.693145752f - nf * 1.42860677e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t n = (int32_t)nf;
    union {
        int32_t i;
        float f;
    } s = {.i = (n + 127) * (1 << 23)};
    return x0 < -87.3f ? 0.0f : p * s.f;
}

// erf(x) without libm calls, branch-free: |x| <= 1 uses the Maclaurin series through x^21
// (error < 2e-9); beyond, Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7 where erf > 0.84).
static inline float ku_erff(float x) {
    float a = x < 0.0f ? -x : x;
    float z = a * a;
    // 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)), Horner in z
    float p = -1.0f / (3628800.0f * 21.0f);
    p = p * z + 1.0f / (362880.0f * 19.0f);
    p = p * z - 1.0f / (40320.0f * 17.0f);
    p = p * z + 1.0f / (5040.0f * 15.0f);
    p = p * z - 1.0f / (720.0f * 13.0f);
    p = p * z + 1.0f / (120.0f * 11.0f);
    p = p * z - 1.0f / (24.0f * 9.0f);
    p = p * z + 1.0f / (6.0f * 7.0f);
    p = p * z - 1.0f / (2.0f * 5.0f);
    p = p * z + 1.0f / 3.0f;
    p = p * z - 1.0f;
    float small = -p * a * 1.12837917f;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float q = 1.061405429f;
    q = q * t - 1.453152027f;
    q = q * t + 1.421413741f;
    q = q * t - 0.284496736f;
    q = q * t + 0.254829592f;
    float big = 1.0f - q * t * ku_expf(-z);
    float v = a <= 1.0f ? small : big;
    return x < 0.0f ? -v : v;
}

// ln(x) for normal x > 0 without libm calls, branch-free: x = m 2^e with m in [sqrt(1/2),
// sqrt(2)), ln m = 2 atanh(s), s = (m - 1) / (m + 1) (|s| <= 0.172), by its series through s^9
// (relative error < 1e-8 before float rounding). Zero and denormal inputs give a large negative
// finite value (about -88), not -inf: callers that need exact zeros select them.
static inline float ku_logf(float x) {
    union {
        float f;
        int32_t i;
    } u = {.f = x};
    float e = (float)(((u.i >> 23) & 0xff) - 127);
    u.i = (u.i & 0x007fffff) | 0x3f800000;
    float m = u.f;
    float big = m > 1.41421356f ? 1.0f : 0.0f; // float selects only: the loops vectorise
    m = m - 0.5f * big * m;
    e += big;
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float p = 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p + e * 0.693147181f;
}

#endif
