/* actsearch.c: output-aware activation ranges (see actsearch.h).
 *
 * A "pair" is one MatMul/Gemm consumer with its two operands. Weight pairs (B an initializer)
 * are evaluated when A is captured; attention pairs (both operands computed) when the later of
 * the two is captured, the earlier one having been copied aside for that batch. */
#include "quant/actsearch.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "quantize.h"
#include "strmap.h"
#include "threadpool.h"

#define MAX_CANDS  32
#define ROW_CHUNK  256 // rows of A per GEMM call in weight pairs (bounds the per-thread scratch)

// Candidate ranges as factors on the calibrated (lo, hi). The first is the starting range.
static const float joint_f[] = {1.0f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f,  0.9f,
                                1.1f, 1.2f, 1.3f, 1.5f, 1.75f, 2.0f};
static const float side_f[]  = {0.6f, 0.8f, 0.9f, 1.1f, 1.25f};

struct slot {                 // one searched activation target
    int                t;     // placement target index
    struct opq_qparams cand[MAX_CANDS];
    int                n_cand;
    double             err[MAX_CANDS];
};

struct pair {
    const char  *name[2];     // operand value names (name[1] NULL: B is the weight)
    int          slot[2];     // searched slot of A / B, -1 if none
    const char  *out;         // the consumer's output
    double      *wrow;        // loss sensitivity per output row of one sample (NULL: all 1)
    int64_t      n_wrow;
    const float *w;           // weight: [K, N], or [N, K] when trans_b
    float       *wq;          // the weight on its quantization grid (same layout)
    // K < N (qkv, fc1): the error through K x K matrices (see job_run), alpha folded in:
    // hq = Wq Wq^T, cq = (Wq - W) Wq^T, dq = (Wq - W) (Wq - W)^T
    float       *hq, *cq, *dq;
    bool         trans_b;
    float        alpha;
    int64_t      K, N;
    // the first-arrived operand of an attention pair in the current batch
    int               have;   // 0: none, 1 + side
    struct opq_tensor held;
};

struct search {
    struct pair       *pairs;
    int                n_pairs;
    struct slot       *slots;
    int                n_slots;
    struct opq_strmap *index;  // operand name -> first pair using it + 1 (pairs chain by name)
    const char       **names;  // capture list
    int                n_names;
    struct opq_threadpool *pool;
    int64_t            n_batch; // samples in the current batch
};

// One GEMM problem split in slices: slice s multiplies A rows [a_off, +m) by B at b_off.
struct job {
    const struct slot *sl;
    double            *err;     // [n_cand] this job's sums
    int                side;    // 0: A is quantized, 1: B
    const float       *A, *B;   // B: the float other operand, or Wq for weight pairs
    const float       *yref;
    const float       *hq, *z, *cr; // Gram form: hq [K, K], z = A cq [rows, K], cr [rows]
    const double      *wrow;    // per output row of a sample, n_wrow of them (NULL: all 1)
    int64_t            n_wrow;
    int64_t            n_slices, M, K, N, rows; // weight pairs: rows of A in all (slices of
                                                // ROW_CHUNK); attention: M per slice
    bool               shared_b, trans_b;
    float              alpha;
    bool               failed[MAX_CANDS]; // per candidate (threads write disjoint entries)
};

// y = opq_fq(x) elementwise, bit for bit, without a libm call per value (so it vectorises):
// x / scale is clamped to the grid first (the bounds are integers, so clamping commutes with
// rounding), then rounded half to even by adding and subtracting 1.5 * 2^23 (exact for
// |r| < 2^22; grids span at most 256 codes).
static void fq_into(const float *x, size_t n, const struct opq_qparams *p, float *y) {
    const float s = p->scale, z = (float)p->zero_point, magic = 12582912.0f;
    const float lo = (float)p->qmin - z, hi = (float)p->qmax - z;
    for (size_t i = 0; i < n; i++) {
        float r = x[i] / s;
        r       = r < lo ? lo : (r > hi ? hi : r);
        y[i]    = ((r + magic) - magic) * s;
    }
}

static void job_slice(const struct job *j, int64_t s, int64_t *a_off, int64_t *m, int64_t *b_off) {
    if (j->shared_b) {
        *a_off = s * ROW_CHUNK;
        *m     = j->rows - *a_off < ROW_CHUNK ? j->rows - *a_off : ROW_CHUNK;
        *b_off = 0;
    } else {
        *a_off = s * j->M;
        *m     = j->M;
        *b_off = s * j->K * j->N;
    }
}

// Gram form of a weight pair, for candidate c. With e = Q(x) - x and D = Wq - W per row,
// ||Q(x) Wq - x W||^2 = ||e Wq + x D||^2 = e Hq e^T + 2 e . (x D Wq^T) + x D D^T x^T, which costs
// K x K per row instead of K x N.
static double job_gram(const struct job *j, const struct opq_qparams *p, float *ebuf, float *f) {
    double e = 0.0;
    for (int64_t s = 0; s < j->n_slices; s++) {
        int64_t a_off, m, b_off;
        job_slice(j, s, &a_off, &m, &b_off);
        const float *a = j->A + a_off * j->K, *z = j->z + a_off * j->K;
        fq_into(a, (size_t)(m * j->K), p, ebuf);
        for (int64_t i = 0; i < m * j->K; i++)
            ebuf[i] -= a[i];
        opq_sgemm(false, false, m, j->K, j->K, 1.0f, ebuf, j->K, j->hq, j->K, 0.0f, f, j->K);
        for (int64_t i = 0; i < m; i++) {
            double ei = (double)j->cr[a_off + i];
            for (int64_t k = 0; k < j->K; k++)
                ei += (double)ebuf[i * j->K + k] *
                      ((double)f[i * j->K + k] + 2.0 * (double)z[i * j->K + k]);
            e += j->wrow ? j->wrow[(a_off + i) % j->n_wrow] * ei : ei;
        }
    }
    return e;
}

static void job_run(void *user, int64_t begin, int64_t end) {
    struct job *j = user;
    if (j->hq) {
        float *ebuf = malloc(sizeof(float) * (size_t)(ROW_CHUNK * j->K));
        float *f    = malloc(sizeof(float) * (size_t)(ROW_CHUNK * j->K));
        for (int64_t c = begin; c < end; c++) {
            j->failed[c] = !ebuf || !f;
            if (!j->failed[c])
                j->err[c] = job_gram(j, &j->sl->cand[c], ebuf, f);
        }
        free(ebuf);
        free(f);
        return;
    }
    int64_t m_max = j->shared_b ? ROW_CHUNK : j->M;
    size_t xq_n = j->side == 0 ? (size_t)(m_max * j->K) : (size_t)(j->K * j->N);
    float *xq = malloc(sizeof(float) * xq_n);
    float *y  = malloc(sizeof(float) * (size_t)(m_max * j->N));
    for (int64_t c = begin; c < end; c++)
        j->failed[c] = !xq || !y;
    if (!xq || !y) {
        free(xq);
        free(y);
        return;
    }
    int64_t ldb = j->trans_b ? j->K : j->N;
    for (int64_t c = begin; c < end; c++) {
        const struct opq_qparams *p = &j->sl->cand[c];
        double e = 0.0;
        for (int64_t s = 0; s < j->n_slices; s++) {
            int64_t a_off, m, b_off;
            job_slice(j, s, &a_off, &m, &b_off);
            const float *a = j->A + a_off * j->K, *b = j->B + b_off;
            if (j->side == 0) {
                fq_into(a, (size_t)(m * j->K), p, xq);
                a = xq;
            } else {
                fq_into(b, (size_t)(j->K * j->N), p, xq);
                b = xq;
            }
            opq_sgemm(false, j->trans_b, m, j->N, j->K, j->alpha, a, j->K, b, ldb, 0.0f, y, j->N);
            const float *r = j->yref + a_off * j->N;
            int64_t row0 = j->shared_b ? a_off : s * j->M; // first output row of the slice
            for (int64_t i = 0; i < m; i++) {
                double ei = 0.0;
                for (int64_t k = 0; k < j->N; k++) {
                    double d = (double)y[i * j->N + k] - (double)r[i * j->N + k];
                    ei += d * d;
                }
                e += j->wrow ? j->wrow[(row0 + i) % j->n_wrow] * ei : ei;
            }
        }
        j->err[c] = e;
    }
    free(xq);
    free(y);
}

// Adds the errors of pair p for one batch: A and B as computed (B NULL for weight pairs).
static enum opq_status pair_eval(struct search *se, struct pair *p, const struct opq_tensor *ta,
                                 const struct opq_tensor *tb) {
    struct job j = {.A = ta->data, .trans_b = p->trans_b, .alpha = p->alpha};
    size_t na;
    if (ta->ndim < 2 || !opq_tensor_numel(ta, &na))
        return OPQ_OK;
    if (!tb) {
        if (ta->shape[ta->ndim - 1] != p->K)
            return OPQ_OK;
        j.shared_b = true;
        j.K        = p->K;
        j.N        = p->N;
        j.rows     = (int64_t)na / p->K;
        j.n_slices = (j.rows + ROW_CHUNK - 1) / ROW_CHUNK;
    } else {
        // equal leading dims only (the attention matmuls); anything else is not searched
        if (tb->ndim != ta->ndim || ta->shape[ta->ndim - 1] != tb->shape[tb->ndim - 2])
            return OPQ_OK;
        for (int d = 0; d < ta->ndim - 2; d++)
            if (ta->shape[d] != tb->shape[d])
                return OPQ_OK;
        j.M = ta->shape[ta->ndim - 2];
        j.K = ta->shape[ta->ndim - 1];
        j.N = tb->shape[tb->ndim - 1];
        j.n_slices = j.M * j.K > 0 ? (int64_t)na / (j.M * j.K) : 0;
        j.B = tb->data;
    }
    if (j.n_slices <= 0 || j.K <= 0 || j.N <= 0)
        return OPQ_OK;
    int64_t rows = tb ? j.n_slices * j.M : j.rows;
    float *yref = NULL, *cr = NULL;
    if (p->hq) { // Gram form: z = A cq, cr = per row x dq x^T
        yref = malloc(sizeof(float) * (size_t)(2 * rows * j.K));
        cr   = malloc(sizeof(float) * (size_t)(rows ? rows : 1));
        if (!yref || !cr) {
            free(yref);
            free(cr);
            return OPQ_ERR_NOMEM;
        }
        float *z = yref, *t = yref + rows * j.K;
        opq_sgemm(false, false, rows, j.K, j.K, 1.0f, j.A, j.K, p->cq, j.K, 0.0f, z, j.K);
        opq_sgemm(false, false, rows, j.K, j.K, 1.0f, j.A, j.K, p->dq, j.K, 0.0f, t, j.K);
        for (int64_t r = 0; r < rows; r++) {
            double c = 0.0;
            for (int64_t k = 0; k < j.K; k++)
                c += (double)t[r * j.K + k] * (double)j.A[r * j.K + k];
            cr[r] = (float)c;
        }
        j.hq = p->hq;
        j.z  = z;
        j.cr = cr;
    } else if (!(yref = malloc(sizeof(float) * (size_t)(rows * j.N)))) {
        return OPQ_ERR_NOMEM;
    }
    // reference: the float product (weight pairs: float A times the float weight)
    if (!tb && !p->hq) {
        opq_sgemm(false, p->trans_b, rows, j.N, j.K, p->alpha, ta->data, j.K, p->w,
                  p->trans_b ? j.K : j.N, 0.0f, yref, j.N);
        j.B = p->wq;
    } else if (tb) {
        for (int64_t s = 0; s < j.n_slices; s++)
            opq_sgemm(false, false, j.M, j.N, j.K, 1.0f, j.A + s * j.M * j.K, j.K,
                      j.B + s * j.K * j.N, j.N, 0.0f, yref + s * j.M * j.N, j.N);
    }
    j.yref = yref;
    // rows of one sample (rows are sample-major)
    if (p->wrow && se->n_batch > 0 && rows % se->n_batch == 0 &&
        rows / se->n_batch == p->n_wrow) {
        j.wrow   = p->wrow;
        j.n_wrow = p->n_wrow;
    }
    double err[MAX_CANDS] = {0};
    enum opq_status st = OPQ_OK;
    for (int side = 0; side < 2 && st == OPQ_OK; side++) {
        if (p->slot[side] < 0 || (side == 1 && !tb))
            continue;
        struct slot *sl = &se->slots[p->slot[side]];
        j.sl     = sl;
        j.side   = side;
        j.err    = err;
        opq_parallel_for(se->pool, sl->n_cand, 1, job_run, &j);
        for (int c = 0; c < sl->n_cand; c++) {
            if (j.failed[c])
                st = OPQ_ERR_NOMEM;
            sl->err[c] += err[c];
        }
    }
    free(yref);
    free(cr);
    return st;
}

static enum opq_status search_capture(void *user, const char *name, const struct opq_tensor *t) {
    struct search *se = user;
    if (!opq_strmap_get(se->index, name)) {
        // the graph inputs, fed to the hook before each run: their leading dim is the batch
        se->n_batch = t->ndim > 0 ? t->shape[0] : 0;
        return OPQ_OK;
    }
    if (t->dtype != OPQ_DTYPE_FLOAT)
        return OPQ_OK;
    for (int i = 0; i < se->n_pairs; i++) {
        struct pair *p = &se->pairs[i];
        int side = p->name[0] && !strcmp(p->name[0], name) ? 0
                 : p->name[1] && !strcmp(p->name[1], name) ? 1 : -1;
        if (side < 0)
            continue;
        enum opq_status st = OPQ_OK;
        if (!p->name[1]) {
            st = pair_eval(se, p, t, NULL);
        } else if (p->have == 2 - side) { // the other operand is held
            st = side == 0 ? pair_eval(se, p, t, &p->held) : pair_eval(se, p, &p->held, t);
            free(p->held.data);
            p->held.data = NULL;
            p->have      = 0;
        } else {
            size_t nb = t->nbytes;
            free(p->held.data);
            p->held      = *t;
            p->held.data = malloc(nb ? nb : 1);
            if (!p->held.data)
                return OPQ_ERR_NOMEM;
            memcpy(p->held.data, t->data, nb);
            p->have = 1 + side;
        }
        if (st != OPQ_OK)
            return st;
    }
    return OPQ_OK;
}

// Loss sensitivity of every pair's output rows, from the float model: per sample, the gradient
// of the cross-entropy against the model's own top-1 class (scaled to unit norm per sample, so
// every sample counts alike) is swept back to the consumers' outputs, and g^2 is summed over each
// output row (a token, or a token of one head) and over samples. A row the prediction depends on
// (the class token in the last blocks) weighs accordingly; errors elsewhere count less. The
// caller runs one sample per batch: a tape holds a whole forward and its gradients (about 0.5 GB
// per ViT-S/16 sample).
static enum opq_status row_weights(struct opq_ctx *ctx, struct opq_model *fm,
                                   struct opq_calib_src *src, int count, int batch,
                                   struct search *se) {
    struct opq_graph *g = fm->graph;
    int k_in = opq_calib_n_inputs(src);
    if (g->n_outputs < 1 || k_in > 16)
        return OPQ_OK;
    const char **wrt = calloc((size_t)se->n_pairs + 1, sizeof(*wrt));
    int *of = calloc((size_t)se->n_pairs + 1, sizeof(int));
    struct opq_tensor *grads = calloc((size_t)se->n_pairs + 1, sizeof(*grads));
    void *bufs[16] = {0};
    float *seed = NULL;
    struct opq_exec *ex = NULL;
    struct opq_exec_tape *tape = NULL;
    enum opq_status st = wrt && of && grads ? OPQ_OK : OPQ_ERR_NOMEM;
    int n_wrt = 0;
    for (int i = 0; st == OPQ_OK && i < se->n_pairs; i++)
        if (se->pairs[i].out) {
            of[n_wrt]    = i;
            wrt[n_wrt++] = se->pairs[i].out;
        }
    for (int i = 0; st == OPQ_OK && i < k_in; i++)
        if (!(bufs[i] = malloc(opq_calib_sample_bytes(src, i) * (size_t)batch)))
            st = OPQ_ERR_NOMEM;
    int planned = 0;
    for (int done = 0; st == OPQ_OK && n_wrt > 0 && done < count; done += batch) {
        int n = count - done < batch ? count - done : batch;
        struct opq_named_tensor in[16];
        if ((st = opq_calib_batch(src, done, n, bufs, in)) != OPQ_OK)
            break;
        if (n != planned) {
            opq_exec_tape_free(tape);
            opq_exec_free(ex);
            tape = NULL;
            struct opq_exec_opts eo = {.batch = n};
            if ((st = opq_exec_plan(ctx, fm, in, k_in, &eo, &ex)) != OPQ_OK ||
                (st = opq_exec_tape_new(ex, &tape)) != OPQ_OK)
                break;
            planned = n;
        }
        if ((st = opq_exec_tape_record(tape, 0, g->n_nodes - 1, in, k_in, wrt, n_wrt)) != OPQ_OK)
            break;
        const struct opq_tensor *lt = opq_exec_tape_value(tape, g->outputs[0]->name);
        size_t nl;
        if (!lt || lt->dtype != OPQ_DTYPE_FLOAT || lt->ndim < 1 || !opq_tensor_numel(lt, &nl))
            break;
        int64_t C = lt->shape[lt->ndim - 1], R = C > 0 ? (int64_t)nl / C : 0;
        free(seed);
        if (!(seed = malloc(sizeof(float) * (nl ? nl : 1)))) {
            st = OPQ_ERR_NOMEM;
            break;
        }
        const float *z = lt->data;
        for (int64_t r = 0; r < R; r++) {
            const float *zr = z + r * C;
            double mx = zr[0], sum = 0.0, norm = 0.0;
            int64_t top = 0;
            for (int64_t c = 1; c < C; c++)
                if (zr[c] > zr[top])
                    top = c;
            mx = zr[top];
            for (int64_t c = 0; c < C; c++)
                sum += exp((double)zr[c] - mx);
            for (int64_t c = 0; c < C; c++) {
                double d = exp((double)zr[c] - mx) / sum - (c == top ? 1.0 : 0.0);
                seed[r * C + c] = (float)d;
                norm += d * d;
            }
            for (int64_t c = 0; c < C && norm > 0.0; c++)
                seed[r * C + c] = (float)((double)seed[r * C + c] / sqrt(norm));
        }
        struct opq_named_tensor sd = {.name = g->outputs[0]->name, .t = *lt};
        sd.t.data = seed;
        if ((st = opq_exec_tape_backward(tape, 0, &sd, 1, grads)) != OPQ_OK)
            break;
        for (int w = 0; w < n_wrt; w++) {
            struct pair *p = &se->pairs[of[w]];
            const struct opq_tensor *gt = &grads[w];
            size_t ng;
            if (!gt->data || gt->ndim < 2 || !opq_tensor_numel(gt, &ng))
                continue;
            int64_t N = gt->shape[gt->ndim - 1], rows = N > 0 ? (int64_t)ng / N : 0;
            if (rows % n)
                continue;
            int64_t rps = rows / n;
            if (!p->wrow) {
                if (!(p->wrow = calloc((size_t)rps + 1, sizeof(double)))) {
                    st = OPQ_ERR_NOMEM;
                    break;
                }
                p->n_wrow = rps;
            }
            if (p->n_wrow != rps)
                continue;
            const float *G = gt->data;
            for (int64_t r = 0; r < rows; r++) {
                double s2 = 0.0;
                for (int64_t c = 0; c < N; c++)
                    s2 += (double)G[r * N + c] * (double)G[r * N + c];
                p->wrow[r % rps] += s2;
            }
        }
        opq_progress(ctx, "range search weights", done + n, count);
    }
    opq_exec_tape_free(tape);
    opq_exec_free(ex);
    for (int i = 0; i < k_in; i++)
        free(bufs[i]);
    free(seed);
    free(grads);
    free(of);
    free(wrt);
    return st;
}

// hq, cq, dq of a weight pair (alpha folded in). W is [K, N], or [N, K] when trans_b.
static enum opq_status gram_build(struct pair *p) {
    size_t kk = (size_t)(p->K * p->K), nw = (size_t)(p->K * p->N);
    float *d = malloc(sizeof(float) * nw), *wq = malloc(sizeof(float) * nw);
    p->hq = malloc(sizeof(float) * kk);
    p->cq = malloc(sizeof(float) * kk);
    p->dq = malloc(sizeof(float) * kk);
    if (!d || !wq || !p->hq || !p->cq || !p->dq) {
        free(d);
        free(wq);
        return OPQ_ERR_NOMEM;
    }
    for (size_t i = 0; i < nw; i++) {
        wq[i] = p->alpha * p->wq[i];
        d[i]  = p->alpha * (p->wq[i] - p->w[i]);
    }
    // X X^T for X [K, N] is (no trans, trans); for X stored [N, K] it is (trans, no trans)
    bool t = p->trans_b;
    int64_t ld = t ? p->K : p->N;
    opq_sgemm(t, !t, p->K, p->K, p->N, 1.0f, wq, ld, wq, ld, 0.0f, p->hq, p->K);
    opq_sgemm(t, !t, p->K, p->K, p->N, 1.0f, d, ld, wq, ld, 0.0f, p->cq, p->K);
    opq_sgemm(t, !t, p->K, p->K, p->N, 1.0f, d, ld, d, ld, 0.0f, p->dq, p->K);
    free(d);
    free(wq);
    return OPQ_OK;
}

// The weight target reading value w, or -1.
static int weight_target(const struct opq_placement *pl, const struct opq_value *w) {
    for (int t = 0; t < pl->n_targets; t++)
        if (pl->targets[t].role == OPQ_QROLE_WEIGHT && pl->targets[t].value == w)
            return t;
    return -1;
}

static double range_lo(const struct opq_qparams *p) {
    return (double)((float)(p->qmin - p->zero_point) * p->scale);
}

static double range_hi(const struct opq_qparams *p) {
    return (double)((float)(p->qmax - p->zero_point) * p->scale);
}

static void make_candidates(struct slot *sl, const struct opq_qparams *p0, bool symmetric) {
    float lo = (float)range_lo(p0), hi = (float)range_hi(p0);
    float f[MAX_CANDS][2];
    int n = 0;
    for (size_t i = 0; i < ARRAY_SIZE(joint_f); i++) {
        f[n][0]   = joint_f[i];
        f[n++][1] = joint_f[i];
    }
    // two-sided asymmetric ranges: each end alone as well
    if (!symmetric && lo < 0.0f && hi > 0.0f)
        for (size_t i = 0; i < ARRAY_SIZE(side_f); i++) {
            f[n][0]   = side_f[i];
            f[n++][1] = 1.0f;
            f[n][0]   = 1.0f;
            f[n++][1] = side_f[i];
        }
    sl->cand[0] = *p0;
    sl->n_cand  = 1;
    for (int i = 1; i < n; i++) {
        struct opq_qparams q;
        if (!opq_qparams_from_range(f[i][0] * lo, f[i][1] * hi, p0->qmin, p0->qmax, symmetric,
                                    &q))
            continue;
        bool dup = false;
        for (int k = 0; k < sl->n_cand && !dup; k++)
            dup = sl->cand[k].scale == q.scale && sl->cand[k].zero_point == q.zero_point;
        if (!dup)
            sl->cand[sl->n_cand++] = q;
    }
}

static void search_free(struct search *se) {
    for (int i = 0; i < se->n_pairs; i++) {
        free(se->pairs[i].wq);
        free(se->pairs[i].wrow);
        free(se->pairs[i].hq);
        free(se->pairs[i].cq);
        free(se->pairs[i].dq);
        free(se->pairs[i].held.data);
    }
    free(se->pairs);
    free(se->slots);
    free(se->names);
    opq_strmap_free(se->index);
    opq_threadpool_free(se->pool);
}

// Adds name to the capture list (once).
static enum opq_status want(struct search *se, const char *name, int pair) {
    if (opq_strmap_get(se->index, name))
        return OPQ_OK;
    se->names[se->n_names++] = name;
    return opq_strmap_put(se->index, name, (void *)(intptr_t)(pair + 1));
}

// Builds pairs for the consumers of the searched targets.
static enum opq_status search_build(struct opq_ctx *ctx, const struct opq_placement *pl,
                                    struct opq_qparams *const *qp, const int *n_ch,
                                    const int *axis, const bool *search, bool symmetric,
                                    int *slot_of, struct search *se) {
    int max_pairs = 0;
    for (int t = 0; t < pl->n_targets; t++)
        if (pl->targets[t].role == OPQ_QROLE_ACT)
            max_pairs += pl->targets[t].n_consumers;
    se->pairs = calloc((size_t)max_pairs + 1, sizeof(*se->pairs));
    se->slots = calloc((size_t)pl->n_targets + 1, sizeof(*se->slots));
    se->names = calloc(2 * (size_t)max_pairs + 1, sizeof(*se->names));
    se->index = opq_strmap_new(ctx);
    if (!se->pairs || !se->slots || !se->names || !se->index)
        return OPQ_ERR_NOMEM;
    for (int t = 0; t < pl->n_targets; t++) {
        slot_of[t] = -1;
        const struct opq_qtarget *tg = &pl->targets[t];
        if (tg->role == OPQ_QROLE_ACT && search[t] && n_ch[t] == 1 && qp[t])
            slot_of[t] = -2; // searched if a consumer qualifies
    }
    for (int t = 0; t < pl->n_targets; t++) {
        const struct opq_qtarget *tg = &pl->targets[t];
        if (slot_of[t] == -1)
            continue;
        for (int c = 0; c < tg->n_consumers; c++) {
            const struct opq_node *n = tg->consumers[c];
            bool gemm = n->op == OPQ_OP_GEMM;
            if ((n->op != OPQ_OP_MATMUL && !gemm) || n->n_inputs < 2 || !n->inputs[0] ||
                !n->inputs[1] || (gemm && opq_node_attr_int(n, "transA", 0)))
                continue;
            const struct opq_value *a = n->inputs[0], *b = n->inputs[1];
            if (a->t.dtype != OPQ_DTYPE_FLOAT || b->t.dtype != OPQ_DTYPE_FLOAT ||
                (a->kind & (OPQ_VK_INIT | OPQ_VK_INPUT)) || (b->kind & OPQ_VK_INPUT))
                continue;
            // the same node read twice (two targets, or x.x): one pair
            bool seen = false;
            for (int i = 0; i < se->n_pairs && !seen; i++)
                seen = !strcmp(se->pairs[i].name[0], a->name) &&
                       ((se->pairs[i].name[1] && !strcmp(se->pairs[i].name[1], b->name)) ||
                        (!se->pairs[i].name[1] && se->pairs[i].w == b->t.data));
            if (seen)
                continue;
            struct pair p = {.name = {a->name, NULL}, .slot = {-1, -1}, .alpha = 1.0f,
                             .out = n->n_outputs > 0 && n->outputs[0] ? n->outputs[0]->name
                                                                      : NULL};
            if (b->kind & OPQ_VK_INIT) {
                int tw = weight_target(pl, b);
                bool tb = gemm && opq_node_attr_int(n, "transB", 0);
                if (b->t.ndim != 2 || !b->t.data || tw < 0 || !qp[tw])
                    continue;
                p.trans_b = tb;
                p.alpha   = gemm ? opq_node_attr_float(n, "alpha", 1.0f) : 1.0f;
                p.K       = b->t.shape[tb ? 1 : 0];
                p.N       = b->t.shape[tb ? 0 : 1];
                p.w       = b->t.data;
                size_t nw = (size_t)(p.K * p.N);
                p.wq      = malloc(sizeof(float) * (nw ? nw : 1));
                if (!p.wq)
                    return OPQ_ERR_NOMEM;
                int ch = n_ch[tw], ax = axis[tw];
                size_t inner = ch > 1 && ax == 0 ? (size_t)b->t.shape[1] : 1;
                for (size_t i = 0; i < nw; i++)
                    p.wq[i] = opq_fq(p.w[i], &qp[tw][ch > 1 ? (i / inner) % (size_t)ch : 0]);
                if (p.K < p.N && gram_build(&p) != OPQ_OK) {
                    free(p.wq);
                    return OPQ_ERR_NOMEM;
                }
            } else {
                if (gemm) // Gemm on two computed operands: not a ViT pattern
                    continue;
                p.name[1] = b->name;
            }
            for (int side = 0; side < 2; side++) {
                if (!p.name[side])
                    continue;
                int ts = -1;
                for (int u = 0; u < pl->n_targets && ts < 0; u++)
                    if (pl->targets[u].role == OPQ_QROLE_ACT &&
                        !strcmp(pl->targets[u].value->name, p.name[side]) && slot_of[u] != -1)
                        ts = u;
                if (ts < 0)
                    continue;
                if (slot_of[ts] == -2) {
                    slot_of[ts] = se->n_slots;
                    struct slot *sl = &se->slots[se->n_slots++];
                    sl->t = ts;
                    make_candidates(sl, &qp[ts][0], symmetric);
                }
                p.slot[side] = slot_of[ts];
            }
            if (p.slot[0] < 0 && p.slot[1] < 0) {
                free(p.wq);
                continue;
            }
            se->pairs[se->n_pairs] = p;
            enum opq_status st = want(se, p.name[0], se->n_pairs);
            if (st == OPQ_OK && p.name[1])
                st = want(se, p.name[1], se->n_pairs);
            se->n_pairs++;
            if (st != OPQ_OK)
                return st;
        }
    }
    return OPQ_OK;
}

enum opq_status opq_act_search(struct opq_ctx *ctx, struct opq_model *model,
                               struct opq_model *fmodel, struct opq_calib_src *src,
                               const struct opq_placement *pl,
                               struct opq_qparams *const *qp, const int *n_ch, const int *axis,
                               const bool *search, const struct opq_act_search_opts *o,
                               double *err_start, double *err_best) {
    struct search se = {0};
    int *slot_of = calloc((size_t)pl->n_targets + 1, sizeof(int));
    enum opq_status st = slot_of ? OPQ_OK : OPQ_ERR_NOMEM;
    for (int t = 0; t < pl->n_targets; t++) {
        if (err_start)
            err_start[t] = 0.0;
        if (err_best)
            err_best[t] = 0.0;
    }
    if (st == OPQ_OK)
        st = search_build(ctx, pl, qp, n_ch, axis, search, o->symmetric, slot_of, &se);
    int count = o->n_samples < opq_calib_count(src) ? o->n_samples : opq_calib_count(src);
    if (st == OPQ_OK && se.n_slots > 0 && count > 0) {
        se.pool = opq_threadpool_new(ctx, opq_ctx_threads(ctx));
        if (!se.pool)
            st = OPQ_ERR_NOMEM;
        if (st == OPQ_OK && fmodel)
            st = row_weights(ctx, fmodel, src, count, 1, &se);
        if (st == OPQ_OK)
            st = opq_calib_stream(ctx, model, src, 0, count, o->batch > 0 ? o->batch : 16,
                                  se.names, se.n_names, search_capture, &se, "range search");
    }
    for (int s = 0; st == OPQ_OK && s < se.n_slots; s++) {
        struct slot *sl = &se.slots[s];
        int best = 0;
        for (int c = 1; c < sl->n_cand; c++)
            if (sl->err[c] < sl->err[best])
                best = c;
        const struct opq_qparams *c0 = &sl->cand[0], *cb = &sl->cand[best];
        opq_log(ctx, OPQ_LOG_DEBUG, "range search %s: [%g, %g] -> [%g, %g], error %.4g -> %.4g",
                pl->targets[sl->t].value->name, range_lo(c0), range_hi(c0), range_lo(cb),
                range_hi(cb), sl->err[0], sl->err[best]);
        if (count > 0)
            qp[sl->t][0] = sl->cand[best];
        if (err_start)
            err_start[sl->t] = sl->err[0];
        if (err_best)
            err_best[sl->t] = sl->err[best];
    }
    search_free(&se);
    free(slot_of);
    return st;
}
