/* rng.h: seeded PCG32 (O'Neill's permuted congruential generator, XSH-RR output). Every random
 * choice in the library goes through it, so a seed fixes a run; rand() is never used. */
#ifndef OPQ_RNG_H
#define OPQ_RNG_H

#include <stdint.h>

struct opq_rng {
    uint64_t state;
    uint64_t inc; // stream selector, always odd
};

void     opq_rng_seed(struct opq_rng *r, uint64_t seed, uint64_t stream);
uint32_t opq_rng_u32(struct opq_rng *r);
// Uniform in [0, 1) with 24 random bits.
float    opq_rng_uniform(struct opq_rng *r);
// Uniform integer in [0, n) without modulo bias (n > 0).
uint32_t opq_rng_below(struct opq_rng *r, uint32_t n);
// Moves the generator `delta` draws ahead (as if opq_rng_u32 had been called delta times) in
// O(log delta) steps: lets threads draw disjoint parts of one stream.
void     opq_rng_advance(struct opq_rng *r, uint64_t delta);
// Standard normal (Box-Muller; one value per call, deterministic).
float    opq_rng_normal(struct opq_rng *r);

#endif
