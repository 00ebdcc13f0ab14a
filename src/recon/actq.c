/* actq.c: activation fake quantization for reconstruction training (see actq.h). */
#include "recon/actq.h"

#include <stdbool.h>
#include <string.h>

#include "threadpool.h"

// The element loops are branch-free selects: they vectorise at O3 without trap semantics (no
// fast-math: every value is the one the scalar code gives), with an AVX2 clone where available.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC optimize("O3", "no-trapping-math")
#if !defined(__SANITIZE_ADDRESS__)
#define ACTQ_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef ACTQ_HOT
#define ACTQ_HOT
#endif

#define RND_MAGIC 12582912.0f // 1.5 * 2^23: (x + M) - M rounds half to even for |x| < 2^22
#define PIECE 16384           // elements per piece of the step-gradient sum
#define GRAIN 16384           // elements per forward work item
#define LANES 8

static size_t pieces_per_seg(const struct opq_actq *q) {
    return q->inner ? (q->inner + PIECE - 1) / PIECE : 1;
}

size_t opq_actq_n_parts(const struct opq_actq *q) {
    size_t nseg = q->inner ? q->n / q->inner : 0;
    return nseg * pieces_per_seg(q) + 1;
}

// ---- forward ------------------------------------------------------------------------------------

struct fwd_job {
    const struct opq_actq *q;
    const float *x;
    float *y;
    uint8_t *keep;
    struct opq_rng rng; // at the first draw of this site
    uint32_t thr;
};

ACTQ_HOT static void quant_run(const float *x, float *y, size_t n, float sc, float lo, float hi) {
    for (size_t i = 0; i < n; i++) {
        float r = x[i] / sc;
        r = r < lo ? lo : (r > hi ? hi : r);
        y[i] = ((r + RND_MAGIC) - RND_MAGIC) * sc;
    }
}

ACTQ_HOT static void quant_run_keep(const float *x, float *y, const uint8_t *k, size_t n, float sc,
                                    float lo, float hi) {
    for (size_t i = 0; i < n; i++) {
        float r = x[i] / sc;
        r = r < lo ? lo : (r > hi ? hi : r);
        float v = ((r + RND_MAGIC) - RND_MAGIC) * sc;
        y[i] = k[i] ? v : x[i];
    }
}

#define KLANES 16 // PCG32 draws computed side by side (independent states, KLANES apart)

// nblk blocks of KLANES draws: lane l holds the state of draw l of the block and jumps KLANES
// draws per block (x -> A x + C), so each draw is the one the sequential stream gives; the lanes
// have no dependency on each other (the scalar stream is one long multiply chain).
ACTQ_HOT static void keep_blocks(uint64_t *st, uint64_t A, uint64_t C, uint32_t thr,
                                 uint8_t *keep, size_t nblk) {
    for (size_t b = 0; b < nblk; b++) {
        uint32_t out[KLANES];
        for (int l = 0; l < KLANES; l++) {
            uint64_t old = st[l];
            st[l] = old * A + C;
            uint32_t xsh = (uint32_t)(((old >> 18u) ^ old) >> 27u);
            uint32_t rot = (uint32_t)(old >> 59u);
            out[l] = (xsh >> rot) | (xsh << ((32u - rot) & 31u));
        }
        uint8_t *k = keep + b * 4 * KLANES;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        // byte 4 l + q of out is (out[l] >> 8 q) & 0xff: one flat compare loop
        uint8_t by[4 * KLANES];
        memcpy(by, out, sizeof(by));
        for (int i = 0; i < 4 * KLANES; i++)
            k[i] = by[i] < thr;
#else
        for (int l = 0; l < KLANES; l++)
            for (int q = 0; q < 4; q++)
                k[4 * l + q] = ((out[l] >> (8 * q)) & 0xffu) < thr;
#endif
    }
}

// keep[i0..i1): element i uses byte i % 4 of draw i / 4 after the site's start.
static void draw_keep(struct opq_rng base, uint32_t thr, uint8_t *keep, size_t i0, size_t i1) {
    struct opq_rng r = base;
    opq_rng_advance(&r, i0 / 4);
    uint32_t bits = 0;
    size_t i = i0;
    if (i % 4) {
        bits = opq_rng_u32(&r) >> (8 * (i % 4));
        for (; i < i1 && i % 4; i++) {
            keep[i] = (bits & 0xffu) < thr;
            bits >>= 8;
        }
    }
    size_t nblk = i < i1 ? (i1 - i) / (4 * KLANES) : 0;
    if (nblk > 0) {
        // the jump x -> A x + C of KLANES draws: C from state 0, A + C from state 1
        struct opq_rng j0 = {.state = 0, .inc = r.inc}, j1 = {.state = 1, .inc = r.inc};
        opq_rng_advance(&j0, KLANES);
        opq_rng_advance(&j1, KLANES);
        uint64_t st[KLANES];
        for (int l = 0; l < KLANES; l++) {
            st[l] = r.state;
            opq_rng_u32(&r);
        }
        keep_blocks(st, j1.state - j0.state, j0.state, thr, keep + i, nblk);
        r.state = st[0]; // draw i / 4 + KLANES * nblk
        i += 4 * KLANES * nblk;
    }
    for (; i < i1; i++) {
        if (i % 4 == 0)
            bits = opq_rng_u32(&r);
        keep[i] = (bits & 0xffu) < thr;
        bits >>= 8;
    }
}

static void fwd_range(void *user, int64_t b0, int64_t b1) {
    const struct fwd_job *j = user;
    const struct opq_actq *q = j->q;
    size_t i0 = (size_t)b0 * GRAIN;
    size_t i1 = (size_t)b1 * GRAIN < q->n ? (size_t)b1 * GRAIN : q->n;
    if (j->keep)
        draw_keep(j->rng, j->thr, j->keep, i0, i1);
    for (size_t i = i0; i < i1;) {
        size_t seg = i / q->inner;
        size_t end = (seg + 1) * q->inner < i1 ? (seg + 1) * q->inner : i1;
        int c = (int)(seg % (size_t)q->n_ch);
        if (j->keep)
            quant_run_keep(j->x + i, j->y + i, j->keep + i, end - i, q->scale[c], q->lo[c],
                           q->hi[c]);
        else
            quant_run(j->x + i, j->y + i, end - i, q->scale[c], q->lo[c], q->hi[c]);
        i = end;
    }
}

void opq_actq_forward(struct opq_threadpool *pool, const struct opq_actq *q, const float *x,
                      float *y, uint8_t *keep, struct opq_rng *rng, uint32_t thr) {
    if (q->n == 0)
        return;
    struct fwd_job j = {.q = q, .x = x, .y = y, .keep = keep && rng ? keep : NULL, .thr = thr};
    if (j.keep)
        j.rng = *rng;
    opq_parallel_for(pool, (int64_t)((q->n + GRAIN - 1) / GRAIN), 1, fwd_range, &j);
    if (j.keep)
        opq_rng_advance(rng, (q->n + 3) / 4);
}

// ---- backward -----------------------------------------------------------------------------------

struct bwd_job {
    const struct opq_actq *q;
    const float *x;
    float *dy;
    const uint8_t *keep;
    double *parts;
    size_t pps; // pieces per segment
};

#define BLK 256 // elements per inner block of the backward

// Elements 0..m of a block: dy -> dx in place and the step-gradient terms into c. Branch-free
// (the selects vectorise); keep NULL: every element was quantized.
ACTQ_HOT static void grad_block(const float *x, float *dy, const uint8_t *keep, float *c, size_t m,
                                float sc, float lo, float hi) {
    float lo1 = lo - 1.0f, hi1 = hi + 1.0f;
    for (size_t i = 0; i < m; i++) {
        float xs = x[i] / sc;
        float xc = xs < lo1 ? lo1 : (xs > hi1 ? hi1 : xs);
        float r = (xc + RND_MAGIC) - RND_MAGIC;
        float g = dy[i];
        int below = r < lo, above = r > hi;
        int k = keep ? keep[i] != 0 : 1;
        float contrib = below ? g * lo : (above ? g * hi : g * (r - xs));
        c[i] = k ? contrib : 0.0f;
        dy[i] = (k & (below | above)) ? 0.0f : g;
    }
}

// One piece: dy -> dx in place and the sum of its step-gradient terms (element i into double
// lane i % LANES, the lanes added in order at the end).
static double grad_run(const float *x, float *dy, const uint8_t *keep, size_t n, float sc,
                       float lo, float hi) {
    double acc[LANES] = {0.0};
    float c[BLK];
    for (size_t b = 0; b < n; b += BLK) {
        size_t m = n - b < BLK ? n - b : BLK;
        grad_block(x + b, dy + b, keep ? keep + b : NULL, c, m, sc, lo, hi);
        size_t mf = m - m % LANES;
        for (size_t i = 0; i < mf; i += LANES)
            for (size_t l = 0; l < LANES; l++)
                acc[l] += (double)c[i + l];
        for (size_t i = mf; i < m; i++)
            acc[i - mf] += (double)c[i];
    }
    double s = 0.0;
    for (size_t l = 0; l < LANES; l++)
        s += acc[l];
    return s;
}

static void bwd_range(void *user, int64_t p0, int64_t p1) {
    const struct bwd_job *j = user;
    const struct opq_actq *q = j->q;
    for (int64_t p = p0; p < p1; p++) {
        size_t seg = (size_t)p / j->pps, k = (size_t)p % j->pps;
        size_t i0 = seg * q->inner + k * PIECE;
        size_t i1 = i0 + PIECE < (seg + 1) * q->inner ? i0 + PIECE : (seg + 1) * q->inner;
        int c = (int)(seg % (size_t)q->n_ch);
        j->parts[p] = grad_run(j->x + i0, j->dy + i0, j->keep ? j->keep + i0 : NULL, i1 - i0,
                               q->scale[c], q->lo[c], q->hi[c]);
    }
}

void opq_actq_backward(struct opq_threadpool *pool, const struct opq_actq *q, const float *x,
                       float *dy, const uint8_t *keep, double *parts, double *dscale) {
    if (q->n == 0 || q->inner == 0)
        return;
    size_t pps = pieces_per_seg(q);
    size_t nseg = q->n / q->inner;
    struct bwd_job j = {.q = q, .x = x, .dy = dy, .keep = keep, .parts = parts, .pps = pps};
    // small segments: several per work item
    int64_t grain = q->inner < PIECE ? (int64_t)(PIECE / q->inner) : 1;
    opq_parallel_for(pool, (int64_t)(nseg * pps), grain, bwd_range, &j);
    for (size_t s = 0; s < nseg; s++) {
        double ds = 0.0;
        for (size_t k = 0; k < pps; k++)
            ds += parts[s * pps + k];
        dscale[s % (size_t)q->n_ch] += ds;
    }
}
