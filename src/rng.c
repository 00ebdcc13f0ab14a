/* rng.c: PCG32 XSH-RR with 64-bit state (see rng.h). */
#include "rng.h"

#include <math.h>

void opq_rng_seed(struct opq_rng *r, uint64_t seed, uint64_t stream) {
    r->state = 0;
    r->inc   = (stream << 1u) | 1u;
    opq_rng_u32(r);
    r->state += seed;
    opq_rng_u32(r);
}

uint32_t opq_rng_u32(struct opq_rng *r) {
    uint64_t old   = r->state;
    r->state       = old * 6364136223846793005ull + r->inc;
    uint32_t xsh   = (uint32_t)(((old >> 18u) ^ old) >> 27u);
    uint32_t rot   = (uint32_t)(old >> 59u);
    return (xsh >> rot) | (xsh << ((32u - rot) & 31u));
}

// The LCG step x -> a x + c composed with itself delta times is x -> A x + C; A and C are built
// by binary powering of the step (all arithmetic mod 2^64).
void opq_rng_advance(struct opq_rng *r, uint64_t delta) {
    uint64_t a = 6364136223846793005ull, c = r->inc;
    uint64_t A = 1, C = 0;
    while (delta) {
        if (delta & 1u) {
            A *= a;
            C = C * a + c;
        }
        c *= a + 1;
        a *= a;
        delta >>= 1u;
    }
    r->state = A * r->state + C;
}

float opq_rng_uniform(struct opq_rng *r) {
    return (float)(opq_rng_u32(r) >> 8) * (1.0f / 16777216.0f);
}

uint32_t opq_rng_below(struct opq_rng *r, uint32_t n) {
    uint32_t threshold = (0u - n) % n; // 2^32 mod n
    for (;;) {
        uint32_t x = opq_rng_u32(r);
        if (x >= threshold)
            return x % n;
    }
}

float opq_rng_normal(struct opq_rng *r) {
    double u1 = ((double)(opq_rng_u32(r) >> 8) + 1.0) / 16777217.0; // (0, 1]
    double u2 = (double)(opq_rng_u32(r) >> 8) / 16777216.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
