/* erq.c: ERQ as the quantization flow's refinement step (see erq.h and
 * ../shared/research/erq.md). Layers are independent: each one's statistics come from the float
 * model's input to it, fake-quantized by its own activation quantizer; so all statistics are
 * streamed through the unchanged float model and the new weights are written back at the end. */
#define _POSIX_C_SOURCE 200809L
#include "recon/erq.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "blas.h"
#include "graph.h"
#include "quant/placement.h"
#include "quantize.h"
#include "recon/erq_la.h"
#include "strmap.h"
#include "threadpool.h"

void opq_erq_opts_default(struct opq_erq_opts *o) {
    memset(o, 0, sizeof(*o));
    o->lambda    = 0.16;
    o->steps     = 100;
    o->duq       = true;
    o->duq_frac  = 0.05;
    o->duq_ratio = 1.0;
    o->ri        = 1;
    o->aqer      = true;
    o->wqer      = true;
    o->mem_mb    = 512;
    o->qinputs   = true;
}

void opq_erq_state_free(struct opq_erq_state *s) {
    if (!s)
        return;
    for (int i = 0; i < s->n_layers; i++) {
        free(s->layers[i].w);
        free(s->layers[i].outlier);
        free(s->layers[i].qp_in);
        free(s->layers[i].qp_out);
    }
    free(s->layers);
    s->layers   = NULL;
    s->n_layers = 0;
}

// ---- numerical kernels ---------------------------------------------------------------------------

enum opq_status opq_erq_ridge_solve(struct opq_ctx *ctx, const double *A, int n, double lambda,
                                    const double *B, int m, double *X) {
    if (n <= 0)
        return OPQ_OK;
    double *a = malloc(sizeof(double) * (size_t)n * (size_t)n);
    if (!a)
        return OPQ_ERR_NOMEM;
    memcpy(a, A, sizeof(double) * (size_t)n * (size_t)n);
    for (int i = 0; i < n; i++)
        a[(size_t)i * (size_t)n + (size_t)i] += lambda;
    if (X != B)
        memcpy(X, B, sizeof(double) * (size_t)n * (size_t)m);
    bool ok = opq_erq_chol_solve(a, n, X, m);
    free(a);
    if (!ok)
        return opq_set_error(ctx, OPQ_ERR_NUMERIC,
                             "ERQ ridge solve: %dx%d system is not positive definite (lambda %g)",
                             n, n, lambda);
    return OPQ_OK;
}

double opq_erq_refine_row(const double *H, int k, double *d, const double *e_floor,
                          const double *e_ceil, int steps, double *h, int *n_flips) {
    double obj = 0.0;
    int flips = 0;
    for (int i = 0; i < k; i++) {
        double s = 0.0;
        for (int j = 0; j < k; j++)
            s += H[(size_t)i * (size_t)k + (size_t)j] * d[j];
        h[i] = s;
        obj += d[i] * s;
    }
    for (int step = 0; step < steps; step++) {
        int best = -1;
        double bg = 0.0;
        for (int j = 0; j < k; j++) {
            double g = 2.0 * h[j];
            if (d[j] * g > 0.0 && fabs(g) > bg) {
                bg   = fabs(g);
                best = j;
            }
        }
        if (best < 0)
            break;
        double v  = d[best] - 2.0 * h[best];
        double nd = fabs(v - e_ceil[best]) <= fabs(v - e_floor[best]) ? e_ceil[best]
                                                                       : e_floor[best];
        double dd = nd - d[best];
        if (dd == 0.0)
            break; // the same element would be chosen again: the row is finished
        double change = 2.0 * dd * h[best] + dd * dd * H[(size_t)best * (size_t)k + (size_t)best];
        if (change > 0.0)
            break;
        d[best] = nd;
        for (int i = 0; i < k; i++)
            h[i] += H[(size_t)i * (size_t)k + (size_t)best] * dd;
        obj += change;
        flips++;
    }
    if (n_flips)
        *n_flips = flips;
    return obj;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Linear-interpolation percentile (numpy's default) of sorted v[0..n), p in [0, 100].
static double percentile_sorted(const double *v, int n, double p) {
    double pos = p / 100.0 * (double)(n - 1);
    int lo     = (int)floor(pos);
    int hi     = lo + 1 < n ? lo + 1 : lo;
    double f   = pos - (double)lo;
    return v[lo] + (v[hi] - v[lo]) * f;
}

int opq_erq_duq_outliers(const double *theta, int d_out, int d_in, int ld, int k,
                         uint8_t *outlier) {
    memset(outlier, 0, (size_t)d_in);
    int *count = calloc((size_t)d_in, sizeof(int));
    long *first = malloc(sizeof(long) * (size_t)d_in);
    double *pos = malloc(sizeof(double) * (size_t)d_in), *neg = malloc(sizeof(double) * (size_t)d_in);
    int marked = 0;
    if (!count || !first || !pos || !neg)
        goto out;
    long order = 0;
    for (int j = 0; j < d_in; j++)
        first[j] = LONG_MAX;
    for (int i = 0; i < d_out; i++) {
        const double *row = theta + (size_t)i * (size_t)ld;
        int np = 0, nn = 0;
        for (int j = 0; j < d_in; j++) {
            if (row[j] > 0.0)
                pos[np++] = row[j];
            else if (row[j] < 0.0)
                neg[nn++] = row[j];
        }
        qsort(pos, (size_t)np, sizeof(double), cmp_double);
        qsort(neg, (size_t)nn, sizeof(double), cmp_double);
        double tp = np ? percentile_sorted(pos, np, 99.0) : (double)INFINITY;
        double tn = nn ? percentile_sorted(neg, nn, 1.0) : -(double)INFINITY;
        for (int j = 0; j < d_in; j++) {
            if (row[j] > tp || row[j] < tn) {
                count[j]++;
                if (first[j] == LONG_MAX)
                    first[j] = order++;
            }
        }
    }
    for (int s = 0; s < k; s++) {
        int best = -1;
        for (int j = 0; j < d_in; j++) {
            if (outlier[j] || count[j] == 0)
                continue;
            if (best < 0 || count[j] > count[best] ||
                (count[j] == count[best] && first[j] < first[best]))
                best = j;
        }
        if (best < 0)
            break;
        outlier[best] = 1;
        marked++;
    }
out:
    free(count);
    free(first);
    free(pos);
    free(neg);
    return marked;
}

// ---- layers and statistics -------------------------------------------------------------------------

struct layer {
    struct opq_node  *node;
    struct opq_value *w;
    float            *bias;       // NULL: no bias
    const char       *bias_name;  // its initializer
    int               t_w;        // weight target
    int               group;      // input statistics
    int               d_in, d_out;
    bool              rows_are_in; // W[d_in][d_out]
    bool              conv;        // patch convolution W[d_out][C][kh][kw]
    float            *w_new, *b_new; // results, written back at the end
};

struct group {
    struct opq_value         *x;
    const struct opq_qparams *qa; // NULL: the input is not quantized
    int                       d;  // D_in; the statistics are (d+1) x (d+1)
    bool                      two_d;
    int                       kh, kw; // > 0: the input of a patch convolution (kernel = stride,
                                      // no padding); its tokens are the kh x kw patches and
                                      // d = channels * kh * kw (the weight's flattening order)
    int                       pass;
    double                   *G, *E, *F;
    double                    n;  // tokens seen
    // With quantized-model inputs (opts.qinputs): this chunk's inputs of the quantized model,
    // as captured (xq_n floats), and how many of them the float pass has paired so far.
    float                    *xq;
    size_t                    xq_n, xq_cap, xq_used;
    // ... or, where they fit, the float model's inputs over the whole calibration set, kept
    // from one float run for several later passes (xf_n floats; xf_used paired so far).
    float                    *xf;
    size_t                    xf_n, xf_used;
    size_t                    per_sample; // floats per calibration sample of the input
    bool                      fill;       // the current float run keeps this input
};

struct erq_run {
    struct opq_ctx        *ctx;
    struct opq_refine_ctx *rc;
    struct opq_erq_state  *st;
    struct layer          *layers;
    int                    n_layers;
    struct group          *groups;
    int                    n_groups;
    struct opq_strmap     *by_name; // input value name -> group + 1
    int                    cur_pass;
    int                    mode;    // 0: float inputs alone, 1: store the quantized model's
                                    // inputs, 2: float inputs paired with the stored ones,
                                    // 3: keep the float inputs (groups with fill), 4: quantized
                                    // inputs paired with the kept float ones, 5: measure
                                    // per_sample (one sample)
    float                 *work;    // opq_erq_stats_add's, for the largest input
    struct opq_threadpool *pool;    // per-channel work (NULL: one thread)
};

static bool float_init(const struct opq_value *v) {
    return v && (v->kind & OPQ_VK_INIT) && !(v->kind & OPQ_VK_INPUT) &&
           v->t.dtype == OPQ_DTYPE_FLOAT && v->t.data;
}

// Finds the bias of a linear node: Gemm input C, or the initializer operand of the single Add
// reading a MatMul's output. NULL if there is none the rewrite may change.
static struct opq_value *find_bias(struct opq_node *n, int d_out) {
    struct opq_value *b = NULL;
    if (n->op == OPQ_OP_GEMM || n->op == OPQ_OP_CONV) {
        b = n->n_inputs >= 3 ? n->inputs[2] : NULL;
    } else {
        struct opq_value *y = n->outputs[0];
        if (!y || y->n_users != 1 || (y->kind & OPQ_VK_OUTPUT))
            return NULL;
        struct opq_node *add = y->users[0];
        if (add->op != OPQ_OP_ADD || add->n_inputs != 2)
            return NULL;
        b = add->inputs[0] == y ? add->inputs[1] : add->inputs[0];
    }
    size_t nb;
    if (!float_init(b) || b->n_users != 1 || !opq_tensor_numel(&b->t, &nb) || nb != (size_t)d_out ||
        b->t.shape[b->t.ndim - 1] != d_out)
        return NULL;
    return b;
}

// A patch convolution: 4-D weight, one group, strides equal to the kernel, no padding or
// dilation (the ViT/Swin patch embedding); *kh, *kw its kernel.
static bool patch_conv(const struct opq_node *n, const struct opq_value *w, int *kh, int *kw) {
    if (n->op != OPQ_OP_CONV || w->t.ndim != 4 || opq_node_attr_int(n, "group", 1) != 1)
        return false;
    const struct opq_attr *a = opq_node_attr(n, "strides");
    if (!a || a->n != 2 || a->ints[0] != w->t.shape[2] || a->ints[1] != w->t.shape[3])
        return false;
    if ((a = opq_node_attr(n, "pads")))
        for (int i = 0; i < a->n; i++)
            if (a->ints[i] != 0)
                return false;
    if ((a = opq_node_attr(n, "dilations")))
        for (int i = 0; i < a->n; i++)
            if (a->ints[i] != 1)
                return false;
    if ((a = opq_node_attr(n, "auto_pad")) && a->s.len > 0 &&
        !(a->s.len == 6 && memcmp(a->s.data, "NOTSET", 6) == 0) &&
        !(a->s.len == 5 && memcmp(a->s.data, "VALID", 5) == 0))
        return false;
    *kh = (int)w->t.shape[2];
    *kw = (int)w->t.shape[3];
    return true;
}

// Collects the layers ERQ handles: MatMul x @ W, Gemm (alpha = beta = 1, transA = 0) with a
// 2-D float weight and the patch convolution, each weight target read by that node alone.
static enum opq_status find_layers(struct erq_run *r) {
    struct opq_refine_ctx *rc = r->rc;
    struct opq_placement *pl  = rc->pl;
    enum opq_status st        = OPQ_OK;
    r->layers = calloc((size_t)pl->n_targets + 1, sizeof(*r->layers));
    r->groups = calloc((size_t)pl->n_targets + 1, sizeof(*r->groups));
    r->by_name = opq_strmap_new(r->ctx);
    if (!r->layers || !r->groups || !r->by_name)
        return OPQ_ERR_NOMEM;
    for (int t = 0; t < pl->n_targets; t++) {
        struct opq_qtarget *tg = &pl->targets[t];
        struct opq_value *w    = tg->value;
        if (tg->role != OPQ_QROLE_WEIGHT || tg->n_consumers != 1 || w->n_users != 1 ||
            !float_init(w))
            continue;
        struct opq_node *n = tg->consumers[0];
        if (n->n_inputs < 2 || n->inputs[1] != w || n->inputs[0] == w || !n->inputs[0])
            continue;
        bool rows_are_in = false;
        int kh = 0, kw = 0;
        if (patch_conv(n, w, &kh, &kw)) {
            struct opq_value *x = n->inputs[0];
            if (x->t.dtype != OPQ_DTYPE_FLOAT || x->t.ndim != 4 || x->t.shape[1] != w->t.shape[1])
                continue;
        } else if (w->t.ndim != 2) {
            continue;
        } else if (n->op == OPQ_OP_MATMUL) {
            rows_are_in = true;
        } else if (n->op == OPQ_OP_GEMM) {
            if (opq_node_attr_int(n, "transA", 0) != 0 || opq_node_attr_float(n, "alpha", 1.0f) != 1.0f ||
                opq_node_attr_float(n, "beta", 1.0f) != 1.0f)
                continue;
            rows_are_in = opq_node_attr_int(n, "transB", 0) == 0;
        } else {
            continue;
        }
        int d_in  = (int)(rows_are_in ? w->t.shape[0] : w->t.shape[1]) * (kh > 0 ? kh * kw : 1);
        int d_out = (int)(rows_are_in ? w->t.shape[1] : w->t.shape[0]);
        int n_ch  = rc->n_ch[t];
        if (n_ch != 1 && (n_ch != d_out || rc->axis[t] != (rows_are_in ? 1 : 0)))
            continue;
        struct opq_value *x = n->inputs[0];
        if (kh == 0 && (x->t.dtype != OPQ_DTYPE_FLOAT || x->t.ndim < 2 ||
                        x->t.shape[x->t.ndim - 1] != d_in))
            continue;
        intptr_t gi = (intptr_t)opq_strmap_get(r->by_name, x->name) - 1;
        if (gi >= 0 && (r->groups[gi].kh != kh || r->groups[gi].kw != kw ||
                        r->groups[gi].d != d_in))
            continue; // the same value read as tokens and as patches: not handled
        if (gi < 0) {
            gi = r->n_groups++;
            struct group *g = &r->groups[gi];
            g->x     = x;
            g->d     = d_in;
            g->kh    = kh;
            g->kw    = kw;
            g->two_d = kh == 0 && x->t.ndim == 2;
            for (int a = 0; a < pl->n_targets && !g->qa; a++) {
                if (pl->targets[a].role != OPQ_QROLE_ACT || pl->targets[a].value != x)
                    continue;
                for (int c = 0; c < pl->targets[a].n_consumers; c++)
                    if (pl->targets[a].consumers[c] == n)
                        g->qa = &rc->qp[a][0];
            }
            if ((st = opq_strmap_put(r->by_name, x->name, (void *)(gi + 1))) != OPQ_OK)
                return st;
        }
        struct layer *L = &r->layers[r->n_layers++];
        L->node        = n;
        L->w           = w;
        L->t_w         = t;
        L->group       = (int)gi;
        L->d_in        = d_in;
        L->d_out       = d_out;
        L->rows_are_in = rows_are_in;
        L->conv        = kh > 0;
        struct opq_value *b = find_bias(n, d_out);
        L->bias        = b ? b->t.data : NULL;
        L->bias_name   = b ? b->name : NULL;
    }
    return OPQ_OK;
}

// ---- statistics -------------------------------------------------------------------------

#define STATS_BLOCK_MAX 1024 // rows per float block
#define FLOAT_EXACT 16777216.0 // 2^24: integers up to this are exact in float

int opq_erq_stats_block(const struct opq_qparams *qa) {
    if (!qa)
        return 256;
    double cmax = fmax(fabs((double)qa->qmin - (double)qa->zero_point),
                       fabs((double)qa->qmax - (double)qa->zero_point));
    cmax = cmax < 1.0 ? 1.0 : cmax;
    double b = floor(FLOAT_EXACT / (cmax * cmax));
    return b > STATS_BLOCK_MAX ? STATS_BLOCK_MAX : (int)b;
}

size_t opq_erq_stats_work(int d, const struct opq_qparams *qa, bool paired) {
    size_t w = (size_t)(qa || paired ? 2 * d + 1 : d + 1);
    return (size_t)opq_erq_stats_block(qa) * w + w * w;
}

#define STATS_PANEL 64 // columns of the block product per task

struct stats_job {
    const float *z;    // nr x W block rows
    float       *c;    // W x W block product (upper triangle)
    int          nr, W, d;
    bool         quant;
    double       s;    // activation scale (1: not quantized)
    double      *G, *E, *F;
};

// Panel [j0, j0 + STATS_PANEL) of the block product Z^T Z (rows 0..j1: its upper part), one
// single-threaded GEMM, then added into the double sums. Panels are fixed by W alone, so every
// sum is formed the same way for any thread count.
static void stats_panel(void *user, int64_t pb, int64_t pe) {
    struct stats_job *j = user;
    int W = j->W, d = j->d, P = d + 1;
    double s = j->s, ss = s * s;
    for (int64_t p = pb; p < pe; p++) {
        int j0 = (int)p * STATS_PANEL, j1 = j0 + STATS_PANEL < W ? j0 + STATS_PANEL : W;
        opq_sgemm(true, false, j1, j1 - j0, j->nr, 1.0f, j->z, W, j->z + j0, W, 0.0f,
                  j->c + j0, W);
        for (int i = 0; i < j1; i++) {
            const float *ci = j->c + (size_t)i * (size_t)W;
            for (int k = i > j0 ? i : j0; k < j1; k++) {
                double v = (double)ci[k];
                if (k < P) { // G: codes x codes (s^2), codes x 1 (s), 1 x 1
                    double f = i < d ? (k < d ? ss : s) : 1.0;
                    j->G[(size_t)i * (size_t)P + (size_t)k] += f * v;
                } else if (i < P) { // E: [codes; 1] x errors
                    j->E[(size_t)i * (size_t)P + (size_t)(k - P)] += (i < d ? s : 1.0) * v;
                } else { // F: errors x errors
                    j->F[(size_t)(i - P) * (size_t)P + (size_t)(k - P)] += v;
                }
            }
        }
    }
}

void opq_erq_stats_add(struct opq_threadpool *pool, const float *x, const float *xref,
                       size_t rows, int d, const struct opq_qparams *qa, double *G, double *E,
                       double *F, float *work) {
    int P = d + 1, W = qa || xref ? 2 * d + 1 : P, B = opq_erq_stats_block(qa);
    struct stats_job job = {.z = work, .c = work + (size_t)B * (size_t)W, .W = W, .d = d,
                            .quant = qa || xref, .s = qa ? (double)qa->scale : 1.0, .G = G,
                            .E = E, .F = F};
    for (size_t r0 = 0; r0 < rows; r0 += (size_t)B) {
        int nr = (int)(rows - r0 < (size_t)B ? rows - r0 : (size_t)B);
        // Block rows [codes (or x) | 1 | x - Q_a(x)]; the codes times the scale are Q_a(x)
        // exactly as opq_fq computes it.
        for (int i = 0; i < nr; i++) {
            const float *xi = x + (r0 + (size_t)i) * (size_t)d;
            const float *ri = xref ? xref + (r0 + (size_t)i) * (size_t)d : xi;
            float *zi = work + (size_t)i * (size_t)W;
            if (qa) {
                float zp = (float)qa->zero_point, lo = (float)qa->qmin, hi = (float)qa->qmax;
                for (int j = 0; j < d; j++) {
                    float q = nearbyintf(xi[j] / qa->scale) + zp;
                    q = q < lo ? lo : (q > hi ? hi : q);
                    float code = q - zp;
                    zi[j]      = code;
                    zi[P + j]  = ri[j] - code * qa->scale;
                }
            } else if (xref) {
                for (int j = 0; j < d; j++) {
                    zi[j]     = xi[j];
                    zi[P + j] = ri[j] - xi[j];
                }
            } else {
                memcpy(zi, xi, sizeof(float) * (size_t)d);
            }
            zi[d] = 1.0f;
        }
        job.nr = nr;
        opq_parallel_for(pool, (W + STATS_PANEL - 1) / STATS_PANEL, 1, stats_panel, &job);
    }
}

// Streams one tensor into its group's statistics.
static enum opq_status stats_capture(void *user, const char *name, const struct opq_tensor *t) {
    struct erq_run *r = user;
    intptr_t gi = (intptr_t)opq_strmap_get(r->by_name, name) - 1;
    size_t numel;
    if (gi < 0 || t->dtype != OPQ_DTYPE_FLOAT || !opq_tensor_numel(t, &numel))
        return OPQ_OK;
    struct group *g = &r->groups[gi];
    if ((g->pass != r->cur_pass && r->mode != 3 && r->mode != 5) ||
        (g->kh > 0 ? t->ndim != 4 || t->shape[2] < g->kh || t->shape[3] < g->kw ||
                         t->shape[1] * g->kh * g->kw != g->d
                   : t->ndim < 1 || t->shape[t->ndim - 1] != g->d))
        return OPQ_OK;
    if (r->mode == 5) {
        g->per_sample = numel;
        return OPQ_OK;
    }
    if (r->mode == 3) {
        if (!g->fill)
            return OPQ_OK;
        if (g->xf_used + numel > g->xf_n)
            return opq_set_error(r->ctx, OPQ_ERR_INTERNAL, "erq: '%s': more float inputs than "
                                 "measured", g->x->name);
        memcpy(g->xf + g->xf_used, t->data, sizeof(float) * numel);
        g->xf_used += numel;
        return OPQ_OK;
    }
    if (r->mode == 1) { // kept until the float pass over the same samples pairs it
        if (g->xq_n + numel > g->xq_cap) {
            size_t cap = 2 * (g->xq_n + numel);
            float *p = realloc(g->xq, sizeof(float) * cap);
            if (!p)
                return OPQ_ERR_NOMEM;
            g->xq     = p;
            g->xq_cap = cap;
        }
        memcpy(g->xq + g->xq_n, t->data, sizeof(float) * numel);
        g->xq_n += numel;
        return OPQ_OK;
    }
    const float *xq = NULL; // the quantized model's input for the same tokens
    const float *in = t->data; // the float model's
    if (r->mode == 4) {
        if (g->xf_used + numel > g->xf_n)
            return opq_set_error(r->ctx, OPQ_ERR_INTERNAL, "erq: '%s': the float and the "
                                 "quantized model saw different shapes", g->x->name);
        xq = t->data;
        in = g->xf + g->xf_used;
        g->xf_used += numel;
    } else if (r->mode == 2) {
        if (g->xq_used + numel > g->xq_n)
            return opq_set_error(r->ctx, OPQ_ERR_INTERNAL, "erq: '%s': the float and the "
                                 "quantized model saw different shapes", g->x->name);
        xq = g->xq + g->xq_used;
        g->xq_used += numel;
    }
    double t0 = opq_now_s();
    size_t rows;
    if (g->kh > 0) { // patches [B, C, H, W] -> rows (b, oy, ox) of (c, ky, kx)
        int64_t B = t->shape[0], C = t->shape[1], H = t->shape[2], Wd = t->shape[3];
        int64_t oh = (H - g->kh) / g->kh + 1, ow = (Wd - g->kw) / g->kw + 1;
        rows = (size_t)(B * oh * ow);
        float *cols = malloc(sizeof(float) * rows * (size_t)g->d * (xq ? 2 : 1));
        if (!cols)
            return OPQ_ERR_NOMEM;
        for (int k = 0; k < (xq ? 2 : 1); k++) {
            const float *x = k == 0 ? in : xq;
            float *dst = cols + (size_t)k * rows * (size_t)g->d;
            for (int64_t b = 0; b < B; b++)
                for (int64_t oy = 0; oy < oh; oy++)
                    for (int64_t ox = 0; ox < ow; ox++) {
                        float *row = dst + (size_t)((b * oh + oy) * ow + ox) * (size_t)g->d;
                        for (int64_t c = 0; c < C; c++)
                            for (int ky = 0; ky < g->kh; ky++)
                                memcpy(row + (c * g->kh + ky) * g->kw,
                                       x + ((b * C + c) * H + oy * g->kh + ky) * Wd + ox * g->kw,
                                       sizeof(float) * (size_t)g->kw);
                    }
        }
        if (xq) // quantized-model patches regressed onto the float ones
            opq_erq_stats_add(r->pool, cols + rows * (size_t)g->d, cols, rows, g->d, g->qa,
                              g->G, g->E, g->F, r->work);
        else
            opq_erq_stats_add(r->pool, cols, NULL, rows, g->d, g->qa, g->G, g->E, g->F, r->work);
        free(cols);
    } else {
        rows = numel / (size_t)g->d;
        if (xq)
            opq_erq_stats_add(r->pool, xq, in, rows, g->d, g->qa, g->G, g->E, g->F, r->work);
        else
            opq_erq_stats_add(r->pool, t->data, NULL, rows, g->d, g->qa, g->G, g->E, g->F,
                              r->work);
    }
    g->n += (double)rows;
    r->st->t_gram += opq_now_s() - t0;
    return OPQ_OK;
}

static void symmetrize(double *a, int n) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++)
            a[(size_t)i * (size_t)n + (size_t)j] = a[(size_t)j * (size_t)n + (size_t)i];
}

// ---- per-layer ERQ ---------------------------------------------------------------------------------

// tr(A M A^T) over the first nc columns for symmetric M (upper triangle read; row stride ldm),
// A d_out x ld: the sum of M against the Gram matrix A^T A (a rank-d_out update, half the work
// of forming A M). work: nc x nc.
static double quad_sym(const double *A, const double *M, int ldm, int d_out, int nc, int ld,
                       double *work) {
    memset(work, 0, sizeof(double) * (size_t)nc * (size_t)nc);
    opq_erq_dsyrk_acc(nc, d_out, A, ld, work, nc);
    double s = 0.0;
    for (int a = 0; a < nc; a++) {
        const double *w = work + (size_t)a * (size_t)nc, *m = M + (size_t)a * (size_t)ldm;
        double off = 0.0;
        for (int b = a + 1; b < nc; b++)
            off += w[b] * m[b];
        s += w[a] * m[a] + 2.0 * off;
    }
    return s;
}

struct layer_ctx {
    const struct group *g;
    const double *theta0;
    int d_out, nc, P;
    double c0, signal;
    double *delta, *work; // work: nc x nc
    double *t0e; // theta0 E^T (d_out x nc): the cross term of every error is a dot with it
    double *t_err;
};

static double dot_cols(const double *a, int lda, const double *b, int ldb, int rows, int cols) {
    double s = 0.0;
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++)
            s += a[(size_t)i * (size_t)lda + (size_t)j] * b[(size_t)i * (size_t)ldb + (size_t)j];
    return s;
}

// The constant parts: c0 = tr(theta0 F theta0^T), theta0 E^T, and the float output energy
// sum ||theta0 x~||^2 = tr(theta0 (G + E + E^T + F) theta0^T).
static void layer_err_init(struct layer_ctx *lc) {
    double t0 = opq_now_s();
    const struct group *g = lc->g;
    int d_out = lc->d_out, nc = lc->nc, P = lc->P;
    lc->c0 = quad_sym(lc->theta0, g->F, P, d_out, nc, P, lc->work);
    opq_erq_dgemm(false, true, d_out, nc, nc, 1.0, lc->theta0, P, g->E, P, 0.0, lc->t0e, nc);
    lc->signal = quad_sym(lc->theta0, g->G, P, d_out, nc, P, lc->work) +
                 2.0 * dot_cols(lc->theta0, P, lc->t0e, nc, d_out, nc) + lc->c0;
    *lc->t_err += opq_now_s() - t0;
}

// Relative output error of weights theta against the float layer on the calibration inputs:
// with delta = theta - theta0, sum ||theta xq~ - theta0 x~||^2 = tr(delta G delta^T)
// - 2 tr(delta E theta0^T) + c0.
static double layer_err(struct layer_ctx *lc, const double *theta) {
    double t0 = opq_now_s();
    size_t n = (size_t)lc->d_out * (size_t)lc->P;
    for (size_t i = 0; i < n; i++)
        lc->delta[i] = theta[i] - lc->theta0[i];
    double e = quad_sym(lc->delta, lc->g->G, lc->P, lc->d_out, lc->nc, lc->P, lc->work) -
               2.0 * dot_cols(lc->delta, lc->P, lc->t0e, lc->nc, lc->d_out, lc->nc) + lc->c0;
    *lc->t_err += opq_now_s() - t0;
    return lc->signal > 0.0 ? (e > 0.0 ? e : 0.0) / lc->signal : 0.0;
}

static inline float grid_value(int32_t q, const struct opq_qparams *p) {
    return (float)(q - p->zero_point) * p->scale;
}

static inline int32_t clampq(double q, const struct opq_qparams *p) {
    return q < (double)p->qmin ? p->qmin : (q > (double)p->qmax ? p->qmax : (int32_t)q);
}

// Grid of weight (row i, column j).
struct grids {
    const struct opq_qparams *single; // n_ch entries (1: per tensor)
    int                       n_ch;
    const uint8_t            *outlier; // NULL: single grid
    const struct opq_qparams *qp_in, *qp_out;
};

static inline const struct opq_qparams *grid_of(const struct grids *gr, int i, int j) {
    if (gr->outlier)
        return gr->outlier[j] ? &gr->qp_out[i] : &gr->qp_in[i];
    return &gr->single[gr->n_ch > 1 ? i : 0];
}

struct fit_job {
    const float        *buf;   // d_out x cnt
    size_t              cnt;
    int32_t             qmin, qmax;
    bool                symmetric;
    enum opq_wcalib     method;
    struct opq_qparams *out;
    enum opq_status    *st;    // per row: the status of the chunk starting there
};

static void fit_chunk(void *user, int64_t b, int64_t e) {
    struct fit_job *j = user;
    size_t rows = (size_t)(e - b);
    j->st[b] = opq_weight_qparams(j->buf + (size_t)b * j->cnt, rows * j->cnt, rows, j->cnt,
                                  j->qmin, j->qmax, j->symmetric, j->method, j->out + b);
}

// Fits per-row qparams on the columns selected by sel (NULL: all; else columns with sel[j] ==
// want) of theta (d_out x ld, first d_in columns). Rows are independent: with n_ch > 1 they are
// split over the pool (the same qparams for any thread count).
static enum opq_status fit_rows(struct opq_threadpool *pool, const double *theta, int d_out,
                                int d_in, int ld, const uint8_t *sel, int want, int n_ch,
                                int32_t qmin, int32_t qmax, bool symmetric,
                                enum opq_wcalib method, struct opq_qparams *out) {
    int cnt = 0;
    for (int j = 0; j < d_in; j++)
        cnt += !sel || sel[j] == want;
    if (cnt == 0)
        return OPQ_OK;
    float *buf = malloc(sizeof(float) * (size_t)d_out * (size_t)cnt);
    enum opq_status *sts = calloc((size_t)d_out, sizeof(*sts));
    enum opq_status st = OPQ_OK;
    if (!buf || !sts) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (int i = 0; i < d_out; i++) {
        int c = 0;
        for (int j = 0; j < d_in; j++)
            if (!sel || sel[j] == want)
                buf[(size_t)i * (size_t)cnt + (size_t)c++] =
                    (float)theta[(size_t)i * (size_t)ld + (size_t)j];
    }
    size_t n = (size_t)d_out * (size_t)cnt;
    if (n_ch > 1) {
        struct fit_job job = {.buf = buf, .cnt = (size_t)cnt, .qmin = qmin, .qmax = qmax,
                              .symmetric = symmetric, .method = method, .out = out, .st = sts};
        opq_parallel_for(pool, d_out, 16, fit_chunk, &job);
        for (int i = 0; i < d_out && st == OPQ_OK; i++)
            st = sts[i];
    } else {
        st = opq_weight_qparams(buf, n, 1, n, qmin, qmax, symmetric, method, out);
    }
out:
    free(buf);
    free(sts);
    return st;
}

struct refine_job {
    const double *H;
    int           k, steps;
    double       *dl, *h;       // d_out x k
    const double *ef, *ec;      // d_out x k
    int          *flips;        // d_out
};

static void refine_chunk(void *user, int64_t b, int64_t e) {
    struct refine_job *j = user;
    for (int64_t i = b; i < e; i++) {
        size_t o = (size_t)i * (size_t)j->k;
        opq_erq_refine_row(j->H, j->k, j->dl + o, j->ef + o, j->ec + o, j->steps, j->h + o,
                           &j->flips[i]);
    }
}

// Progressive quantization with rounding refinement and ridge compensation (Wqer), or plain
// round to nearest when wqer is off. theta (d_out x P) ends with every weight column on its grid.
static enum opq_status wqer(struct erq_run *r, const struct group *g, double *theta, int d_out,
                            int d_in, int nc, const struct grids *gr, bool do_wqer,
                            double lambda2, int steps, long *n_flips) {
    int P = g->d + 1;
    int kmax = (nc + 1) / 2 + 1;
    size_t nk = (size_t)d_out * (size_t)kmax;
    double *dl = malloc(sizeof(double) * nk), *ef = malloc(sizeof(double) * nk);
    double *ec = malloc(sizeof(double) * nk);
    int32_t *qf = malloc(sizeof(int32_t) * nk), *qc = malloc(sizeof(int32_t) * nk);
    double *H = malloc(sizeof(double) * (size_t)kmax * (size_t)kmax);
    double *h = malloc(sizeof(double) * nk);
    int *flips = calloc((size_t)d_out, sizeof(int));
    size_t rmax = (size_t)nc;
    double *A = malloc(sizeof(double) * rmax * rmax), *M = malloc(sizeof(double) * rmax * (size_t)kmax);
    double *dR = malloc(sizeof(double) * rmax * (size_t)d_out);
    enum opq_status st = OPQ_OK;
    if (!dl || !ef || !ec || !qf || !qc || !H || !h || !flips || !A || !M || !dR) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    if (!do_wqer) {
        for (int i = 0; i < d_out; i++)
            for (int j = 0; j < d_in; j++) {
                double *t = &theta[(size_t)i * (size_t)P + (size_t)j];
                const struct opq_qparams *p = grid_of(gr, i, j);
                *t = (double)grid_value(clampq(nearbyint(*t / (double)p->scale) + p->zero_point, p), p);
            }
        goto out;
    }
    const double *s = g->G + d_in; // column of the ones: sum of the quantized inputs (stride P)
    int done = 0, n = nc;
    while (done < d_in) {
        int k = n / 2 > 0 ? n / 2 : 1;
        if (done + k > d_in)
            k = d_in - done;
        int r0 = done + k, nr = nc - r0;
        // Candidate codes and errors of the columns in S, per row (row-major d_out x k).
        for (int i = 0; i < d_out; i++)
            for (int c = 0; c < k; c++) {
                int j = done + c;
                double x = theta[(size_t)i * (size_t)P + (size_t)j];
                const struct opq_qparams *p = grid_of(gr, i, j);
                double u = x / (double)p->scale;
                int32_t q_n = clampq(nearbyint(u) + p->zero_point, p);
                int32_t q_f = clampq(floor(u) + p->zero_point, p);
                int32_t q_c = clampq(ceil(u) + p->zero_point, p);
                size_t o = (size_t)i * (size_t)k + (size_t)c;
                qf[o] = q_f;
                qc[o] = q_c;
                ef[o] = (double)grid_value(q_f, p) - x;
                ec[o] = (double)grid_value(q_c, p) - x;
                dl[o] = (double)grid_value(q_n, p) - x;
            }
        // Rounding refinement on H_S = (G_SS - mu mu^T) / (N - 1), mu = s_S / N.
        if (steps > 0 && g->n > 1.0) {
            for (int a = 0; a < k; a++)
                for (int b = 0; b < k; b++) {
                    double mu_a = s[(size_t)(done + a) * (size_t)P] / g->n;
                    double mu_b = s[(size_t)(done + b) * (size_t)P] / g->n;
                    H[(size_t)a * (size_t)k + (size_t)b] =
                        (g->G[(size_t)(done + a) * (size_t)P + (size_t)(done + b)] - mu_a * mu_b) /
                        (g->n - 1.0);
                }
            // Rows are independent: the same result for any split over the pool.
            struct refine_job job = {.H = H, .k = k, .steps = steps, .dl = dl, .h = h, .ef = ef,
                                     .ec = ec, .flips = flips};
            opq_parallel_for(r->pool, d_out, 4, refine_chunk, &job);
            for (int i = 0; i < d_out; i++)
                *n_flips += flips[i];
        }
        // Ridge compensation of the remaining columns R = [r0, nc): d_R = -M d_S.
        if (nr > 0) {
            for (int a = 0; a < nr; a++) {
                memcpy(A + (size_t)a * (size_t)nr, g->G + (size_t)(r0 + a) * (size_t)P + r0,
                       sizeof(double) * (size_t)nr);
                memcpy(M + (size_t)a * (size_t)k, g->G + (size_t)(r0 + a) * (size_t)P + done,
                       sizeof(double) * (size_t)k);
            }
            if ((st = opq_erq_ridge_solve(r->ctx, A, nr, lambda2, M, k, M)) != OPQ_OK)
                goto out;
            // dR (nr x d_out) = -M (nr x k) * dS^T, dS = dl (d_out x k)
            opq_erq_dgemm(false, true, nr, d_out, k, -1.0, M, k, dl, k, 0.0, dR, d_out);
            for (int i = 0; i < d_out; i++)
                for (int a = 0; a < nr; a++)
                    theta[(size_t)i * (size_t)P + (size_t)(r0 + a)] +=
                        dR[(size_t)a * (size_t)d_out + (size_t)i];
        }
        // S onto the grid: the code whose error is the chosen one.
        for (int i = 0; i < d_out; i++)
            for (int c = 0; c < k; c++) {
                size_t o = (size_t)i * (size_t)k + (size_t)c;
                int j = done + c;
                const struct opq_qparams *p = grid_of(gr, i, j);
                int32_t q = fabs(dl[o] - ec[o]) < fabs(dl[o] - ef[o]) ? qc[o] : qf[o];
                theta[(size_t)i * (size_t)P + (size_t)j] = (double)grid_value(q, p);
            }
        done += k;
        n -= k;
    }
out:
    free(dl);
    free(ef);
    free(ec);
    free(qf);
    free(qc);
    free(H);
    free(h);
    free(flips);
    free(A);
    free(M);
    free(dR);
    return st;
}

static double column_ratio(const double *theta, int d_out, int d_in, int ld) {
    double *c = calloc((size_t)d_in, sizeof(double));
    if (!c)
        return 0.0;
    for (int i = 0; i < d_out; i++)
        for (int j = 0; j < d_in; j++)
            c[j] = fmax(c[j], fabs(theta[(size_t)i * (size_t)ld + (size_t)j]));
    qsort(c, (size_t)d_in, sizeof(double), cmp_double);
    double ratio = c[d_in / 2] > 0.0 ? c[d_in - 1] / c[d_in / 2] : 0.0;
    free(c);
    return ratio;
}

static enum opq_status do_layer(struct erq_run *r, struct layer *L, struct opq_erq_layer *out) {
    struct opq_refine_ctx *rc = r->rc;
    const struct opq_erq_opts *eo = &r->st->opts;
    const struct group *g = &r->groups[L->group];
    int d_in = L->d_in, d_out = L->d_out, P = d_in + 1, nc = d_in + (L->bias ? 1 : 0);
    size_t tn = (size_t)d_out * (size_t)P;
    struct opq_qparams *qp = rc->qp[L->t_w];
    int n_ch = rc->n_ch[L->t_w];
    bool symmetric = !rc->opts->w_asym || rc->opts->target == OPQ_TARGET_TRT;
    double *th0 = calloc(tn, sizeof(double)), *th = calloc(tn, sizeof(double));
    double *delta = malloc(sizeof(double) * tn);
    double *work = malloc(sizeof(double) * (size_t)nc * (size_t)nc);
    double *rhs = malloc(sizeof(double) * (size_t)P * (size_t)d_out);
    double *t0e = malloc(sizeof(double) * tn);
    enum opq_status st = OPQ_OK;
    if (!th0 || !th || !delta || !work || !rhs || !t0e) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    const float *w = L->w->t.data;
    for (int i = 0; i < d_out; i++) {
        for (int j = 0; j < d_in; j++)
            th0[(size_t)i * (size_t)P + (size_t)j] =
                (double)(L->rows_are_in ? w[(size_t)j * (size_t)d_out + (size_t)i]
                                        : w[(size_t)i * (size_t)d_in + (size_t)j]);
        th0[(size_t)i * (size_t)P + (size_t)d_in] = L->bias ? (double)L->bias[i] : 0.0;
    }
    struct layer_ctx lc = {.g = g, .theta0 = th0, .d_out = d_out, .nc = nc, .P = P,
                           .delta = delta, .work = work, .t0e = t0e, .t_err = &r->st->t_err};
    layer_err_init(&lc);
    snprintf(out->name, sizeof(out->name), "%s", L->node->name ? L->node->name : L->w->name);
    out->d_in  = d_in;
    out->d_out = d_out;
    out->err_before = lc.signal > 0.0 ? lc.c0 / lc.signal : 0.0; // theta = theta0
    // Reference: round to nearest on the flow's grids.
    memcpy(th, th0, sizeof(double) * tn);
    for (int i = 0; i < d_out; i++)
        for (int j = 0; j < d_in; j++) {
            double *t = &th[(size_t)i * (size_t)P + (size_t)j];
            *t = (double)opq_fq((float)*t, &qp[n_ch > 1 ? i : 0]);
        }
    out->err_rtn = layer_err(&lc, th);

    // Aqer: (G + l1 I) dTheta^T = E Theta^T over the nc used columns.
    memcpy(th, th0, sizeof(double) * tn);
    double t0 = opq_now_s();
    if (eo->aqer && g->qa && !L->conv) { // the paper has no Aqer for the patch convolution
        double l1 = eo->lambda * g->n * (g->two_d ? 0.02 : 1.0);
        opq_erq_dgemm(false, true, nc, d_out, nc, 1.0, g->E, P, th0, P, 0.0, rhs, d_out);
        double *A = malloc(sizeof(double) * (size_t)nc * (size_t)nc);
        if (!A) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        for (int a = 0; a < nc; a++)
            memcpy(A + (size_t)a * (size_t)nc, g->G + (size_t)a * (size_t)P, sizeof(double) * (size_t)nc);
        st = opq_erq_ridge_solve(r->ctx, A, nc, l1, rhs, d_out, rhs);
        free(A);
        if (st != OPQ_OK)
            goto out;
        for (int i = 0; i < d_out; i++)
            for (int j = 0; j < nc; j++)
                th[(size_t)i * (size_t)P + (size_t)j] += rhs[(size_t)j * (size_t)d_out + (size_t)i];
    }
    r->st->t_aqer += opq_now_s() - t0;
    out->err_aqer = layer_err(&lc, th);

    // Grids re-fitted on the updated weights; DUQ where columns are outliers.
    t0 = opq_now_s();
    struct grids gr = {.single = qp, .n_ch = n_ch};
    int32_t qmin = qp[0].qmin, qmax = qp[0].qmax;
    enum opq_wcalib method = rc->opts->wcalib;
    int k_out = (int)floor(eo->duq_frac * (double)d_out);
    if (k_out > d_in / 2)
        k_out = d_in / 2;
    if (eo->duq && !L->conv && n_ch == d_out && k_out > 0 &&
        column_ratio(th, d_out, d_in, P) >= eo->duq_ratio) {
        out->outlier = malloc((size_t)d_in);
        out->qp_in   = calloc((size_t)d_out, sizeof(*out->qp_in));
        out->qp_out  = calloc((size_t)d_out, sizeof(*out->qp_out));
        if (!out->outlier || !out->qp_in || !out->qp_out) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        out->n_outliers = opq_erq_duq_outliers(th, d_out, d_in, P, k_out, out->outlier);
    }
    if (out->n_outliers > 0) {
        if ((st = fit_rows(r->pool, th, d_out, d_in, P, out->outlier, 0, n_ch, qmin, qmax,
                           symmetric, method, out->qp_in)) != OPQ_OK ||
            (st = fit_rows(r->pool, th, d_out, d_in, P, out->outlier, 1, n_ch, qmin, qmax,
                           symmetric, method, out->qp_out)) != OPQ_OK)
            goto out;
        gr.outlier = out->outlier;
        gr.qp_in   = out->qp_in;
        gr.qp_out  = out->qp_out;
    } else if ((st = fit_rows(r->pool, th, d_out, d_in, P, NULL, 0, n_ch, qmin, qmax, symmetric,
                              method, qp)) != OPQ_OK) {
        goto out;
    }
    long flips = 0;
    // The patch convolution (the paper's section 4.5): no rounding refinement, ten times the
    // ridge strength.
    double lambda2 = eo->lambda * g->n * (L->conv ? 10.0 : 1.0);
    if ((st = wqer(r, g, th, d_out, d_in, nc, &gr, eo->wqer, lambda2, L->conv ? 0 : eo->steps,
                   &flips)) != OPQ_OK)
        goto out;
    r->st->t_wqer += opq_now_s() - t0;
    out->err_wqer = layer_err(&lc, th);

    // Results in the initializer's layout (written back once every layer is done).
    size_t wn = (size_t)d_in * (size_t)d_out;
    L->w_new = malloc(sizeof(float) * wn);
    L->b_new = L->bias ? malloc(sizeof(float) * (size_t)d_out) : NULL;
    if (!L->w_new || (L->bias && !L->b_new)) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (int i = 0; i < d_out; i++) {
        for (int j = 0; j < d_in; j++) {
            float v = (float)th[(size_t)i * (size_t)P + (size_t)j];
            L->w_new[L->rows_are_in ? (size_t)j * (size_t)d_out + (size_t)i
                                    : (size_t)i * (size_t)d_in + (size_t)j] = v;
        }
        if (L->bias)
            L->b_new[i] = (float)th[(size_t)i * (size_t)P + (size_t)d_in];
    }
    if (out->n_outliers > 0) {
        out->node        = L->node;
        out->axis        = rc->axis[L->t_w];
        out->n_ch        = n_ch;
        out->rows_are_in = L->rows_are_in;
        out->shape[0]    = L->w->t.shape[0];
        out->shape[1]    = L->w->t.shape[1];
        out->w           = malloc(sizeof(float) * wn);
        if (!out->w) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        memcpy(out->w, L->w_new, sizeof(float) * wn);
        // The flow encodes this weight on one grid before the DUQ rewrite replaces it: give it the
        // inlier grid.
        for (int i = 0; i < d_out; i++)
            qp[i] = out->qp_in[i];
    }
    opq_log(r->ctx, OPQ_LOG_DEBUG, "erq: %s: %ld rounding flips", out->name, flips);
out:
    free(th0);
    free(th);
    free(delta);
    free(work);
    free(rhs);
    free(t0e);
    return st;
}

// ---- driver ----------------------------------------------------------------------------------------

// The quantized model's copy of initializer `name` (NULL if it has none of n floats).
static float *qmodel_data(struct erq_run *r, const char *name, size_t n) {
    struct opq_value *v = opq_graph_value(r->rc->qmodel->graph, name);
    size_t m;
    if (!v || !(v->kind & OPQ_VK_INIT) || v->t.dtype != OPQ_DTYPE_FLOAT || !v->t.data ||
        !opq_tensor_numel(&v->t, &m) || m != n)
        return NULL;
    return v->t.data;
}

// Every weight of the quantized model to round to nearest on the flow's grids (the layers ERQ
// changes get their final weights as they are done).
static enum opq_status qmodel_weights_rtn(struct erq_run *r) {
    struct opq_refine_ctx *rc = r->rc;
    for (int t = 0; t < rc->pl->n_targets; t++) {
        const struct opq_qtarget *tg = &rc->pl->targets[t];
        size_t n;
        if (tg->role != OPQ_QROLE_WEIGHT || !opq_tensor_numel(&tg->value->t, &n))
            continue;
        float *w = qmodel_data(r, tg->value->name, n);
        if (!w)
            return opq_set_error(r->ctx, OPQ_ERR_INTERNAL, "erq: weight '%s' is missing from "
                                 "the quantized model", tg->value->name);
        int n_ch = rc->n_ch[t], axis = rc->axis[t];
        size_t inner = 1;
        for (int d = axis + 1; n_ch > 1 && d < tg->value->t.ndim; d++)
            inner *= (size_t)tg->value->t.shape[d];
        for (size_t i = 0; i < n; i++)
            w[i] = opq_fq(w[i], &rc->qp[t][n_ch > 1 ? i / inner % (size_t)n_ch : 0]);
    }
    return OPQ_OK;
}

// Layer L's final weights (and bias) into the quantized model.
static enum opq_status qmodel_set(struct erq_run *r, const struct layer *L) {
    size_t wn = (size_t)L->d_in * (size_t)L->d_out;
    float *w = qmodel_data(r, L->w->name, wn);
    float *b = L->bias ? qmodel_data(r, L->bias_name, (size_t)L->d_out) : NULL;
    if (!w || (L->bias && !b))
        return opq_set_error(r->ctx, OPQ_ERR_INTERNAL, "erq: '%s' is missing from the "
                             "quantized model", L->w->name);
    memcpy(w, L->w_new, sizeof(float) * wn);
    if (b)
        memcpy(b, L->b_new, sizeof(float) * (size_t)L->d_out);
    return OPQ_OK;
}

// The current pass's statistics with quantized-model inputs: per chunk of calibration samples,
// the quantized model's inputs of this pass's layers are kept, then the float model's run over
// the same samples pairs every token with them. A chunk holds at most mem_mb of inputs (whole
// batches, at least one; the first chunk is one batch and measures their size per sample).
static enum opq_status stats_paired(struct erq_run *r, const char *const *names, int n_names) {
    struct opq_refine_ctx *rc = r->rc;
    int batch = rc->opts->batch > 0 ? rc->opts->batch : 1;
    double budget = (double)(r->st->opts.mem_mb > 0 ? r->st->opts.mem_mb : 1) * 1048576.0;
    int chunk = batch; // the first chunk measures the inputs' size per sample
    enum opq_status st = OPQ_OK;
    struct group *cur = NULL;
    for (int gi = 0; gi < r->n_groups; gi++)
        if (r->groups[gi].pass == r->cur_pass)
            cur = &r->groups[gi];
    if (cur && n_names == 1 && cur->per_sample > 0 &&
        4.0 * (double)cur->per_sample * (double)rc->n_calib <= budget) {
        if (!cur->xf) { // one float run keeps this input and the next ones that fit with it
            double used = 0.0;
            const char **fill = malloc(sizeof(*fill) * ((size_t)r->n_groups + 1));
            if (!fill)
                return OPQ_ERR_NOMEM;
            int n_fill = 0;
            for (int p = r->cur_pass; p < r->n_groups; p++) {
                struct group *g = NULL;
                for (int gi = 0; gi < r->n_groups; gi++)
                    if (r->groups[gi].pass == p)
                        g = &r->groups[gi];
                double b = 4.0 * (double)g->per_sample * (double)rc->n_calib;
                if (g->per_sample == 0 || used + b > budget)
                    break;
                g->xf_n = g->per_sample * (size_t)rc->n_calib;
                g->xf   = malloc(sizeof(float) * g->xf_n);
                if (!g->xf) {
                    free(fill);
                    return OPQ_ERR_NOMEM;
                }
                g->xf_used = 0;
                g->fill = true;
                fill[n_fill++] = g->x->name;
                used += b;
            }
            r->mode = 3;
            st = opq_calib_stream(r->ctx, rc->model, rc->src, 0, rc->n_calib, batch, fill,
                                  n_fill, stats_capture, r, NULL);
            for (int gi = 0; gi < r->n_groups; gi++) {
                struct group *g = &r->groups[gi];
                if (g->fill && st == OPQ_OK && g->xf_used != g->xf_n)
                    st = opq_set_error(r->ctx, OPQ_ERR_INTERNAL, "erq: '%s': fewer float "
                                       "inputs than measured", g->x->name);
                g->fill    = false;
                g->xf_used = 0;
            }
            free(fill);
        }
        r->mode = 4;
        if (st == OPQ_OK)
            st = opq_calib_stream(r->ctx, rc->qmodel, rc->src, 0, rc->n_calib, batch, names,
                                  n_names, stats_capture, r, "erq statistics");
        if (st == OPQ_OK && cur->xf_used != cur->xf_n)
            st = opq_set_error(r->ctx, OPQ_ERR_INTERNAL, "erq: '%s': the float and the "
                               "quantized model saw different shapes", cur->x->name);
        free(cur->xf);
        cur->xf = NULL;
        r->mode = 0;
        return st;
    }
    for (int first = 0; first < rc->n_calib && st == OPQ_OK; first += chunk) {
        if (first > 0) {
            double floats = 0.0;
            for (int gi = 0; gi < r->n_groups; gi++)
                floats += (double)r->groups[gi].xq_n;
            floats /= (double)chunk;
            chunk = floats > 0.0 ? (int)fmin(budget / (4.0 * floats), (double)rc->n_calib) : batch;
            chunk = chunk < batch ? batch : chunk / batch * batch;
        }
        int n = rc->n_calib - first < chunk ? rc->n_calib - first : chunk;
        for (int gi = 0; gi < r->n_groups; gi++)
            r->groups[gi].xq_n = r->groups[gi].xq_used = 0;
        r->mode = 1;
        st = opq_calib_stream(r->ctx, rc->qmodel, rc->src, first, n, batch, names, n_names,
                              stats_capture, r, NULL);
        r->mode = 2;
        if (st == OPQ_OK)
            st = opq_calib_stream(r->ctx, rc->model, rc->src, first, n, batch, names, n_names,
                                  stats_capture, r, NULL);
        for (int gi = 0; st == OPQ_OK && gi < r->n_groups; gi++)
            if (r->groups[gi].pass == r->cur_pass && r->groups[gi].xq_used != r->groups[gi].xq_n)
                st = opq_set_error(r->ctx, OPQ_ERR_INTERNAL, "erq: '%s': the float and the "
                                   "quantized model saw different shapes",
                                   r->groups[gi].x->name);
        opq_progress(r->ctx, "erq statistics", first + n, rc->n_calib);
    }
    r->mode = 0;
    return st;
}

enum opq_status opq_erq_refine(void *user, struct opq_refine_ctx *rc) {
    struct opq_erq_state *s = user;
    struct erq_run r = {.ctx = rc->ctx, .rc = rc, .st = s};
    const char **names = NULL;
    enum opq_status st = find_layers(&r);
    if (st != OPQ_OK)
        goto out;
    opq_erq_state_free(s);
    s->layers = calloc((size_t)r.n_layers + 1, sizeof(*s->layers));
    names     = calloc((size_t)r.n_groups + 1, sizeof(*names));
    size_t wmax = 1;
    for (int gi = 0; gi < r.n_groups; gi++) {
        size_t w = opq_erq_stats_work(r.groups[gi].d, r.groups[gi].qa, rc->qmodel != NULL);
        wmax = w > wmax ? w : wmax;
    }
    r.work = malloc(sizeof(float) * wmax);
    if (r.ctx->n_threads > 1 && !(r.pool = opq_threadpool_new(r.ctx, r.ctx->n_threads))) {
        st = r.ctx->status != OPQ_OK ? r.ctx->status : OPQ_ERR_NOMEM;
        goto out;
    }
    if (!s->layers || !names || !r.work) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    // Passes over the calibration data, each holding at most mem_mb of statistics. With the
    // quantized model's inputs, one pass per input in graph order, each after the layers
    // before it have their final weights in the quantized model.
    double budget = (double)(s->opts.mem_mb > 0 ? s->opts.mem_mb : 1) * 1048576.0;
    int n_pass = 0;
    double used = 0.0;
    if (rc->qmodel) {
        if ((st = qmodel_weights_rtn(&r)) != OPQ_OK)
            goto out;
        for (int gi = 0; gi < r.n_groups; gi++)
            names[gi] = r.groups[gi].x->name;
        r.mode = 5; // every input's floats per sample, from one sample
        st = opq_calib_stream(r.ctx, rc->model, rc->src, 0, 1, 1, names, r.n_groups,
                              stats_capture, &r, NULL);
        r.mode = 0;
        if (st != OPQ_OK)
            goto out;
        int *order = malloc(sizeof(int) * ((size_t)r.n_groups + 1));
        if (!order) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        for (int gi = 0; gi < r.n_groups; gi++)
            order[gi] = INT_MAX;
        for (int li = 0; li < r.n_layers; li++) {
            int *o = &order[r.layers[li].group];
            *o = r.layers[li].node->index < *o ? r.layers[li].node->index : *o;
        }
        for (int gi = 0; gi < r.n_groups; gi++) { // rank by first reader (indices are distinct)
            int rank = 0;
            for (int gj = 0; gj < r.n_groups; gj++)
                rank += order[gj] < order[gi];
            r.groups[gi].pass = rank;
        }
        free(order);
        n_pass = r.n_groups;
    }
    for (int gi = 0; gi < r.n_groups && !rc->qmodel; gi++) {
        double b = 3.0 * 8.0 * (double)(r.groups[gi].d + 1) * (double)(r.groups[gi].d + 1);
        if (gi == 0 || used + b > budget) {
            n_pass++;
            used = 0.0;
        }
        used += b;
        r.groups[gi].pass = n_pass - 1;
    }
    opq_log(r.ctx, OPQ_LOG_INFO, "erq: %d linear layers, %d inputs, %d calibration pass(es) over %d "
            "samples", r.n_layers, r.n_groups, n_pass, rc->n_calib);
    int n_done = 0;
    for (int pass = 0; pass < n_pass; pass++) {
        double t0 = opq_now_s();
        int n_names = 0;
        for (int gi = 0; gi < r.n_groups; gi++) {
            struct group *g = &r.groups[gi];
            if (g->pass != pass)
                continue;
            size_t PP = (size_t)(g->d + 1) * (size_t)(g->d + 1);
            g->G = calloc(PP, sizeof(double));
            g->E = calloc(PP, sizeof(double));
            g->F = calloc(PP, sizeof(double));
            if (!g->G || !g->E || !g->F) {
                st = OPQ_ERR_NOMEM;
                goto out;
            }
            names[n_names++] = g->x->name;
        }
        r.cur_pass = pass;
        if (rc->qmodel)
            st = stats_paired(&r, names, n_names);
        else
            st = opq_calib_stream(r.ctx, rc->model, rc->src, 0, rc->n_calib, rc->opts->batch,
                                  names, n_names, stats_capture, &r, "erq statistics");
        if (st != OPQ_OK)
            goto out;
        for (int gi = 0; gi < r.n_groups; gi++) {
            struct group *g = &r.groups[gi];
            if (g->pass != pass)
                continue;
            int P = g->d + 1;
            symmetrize(g->G, P);
            symmetrize(g->F, P);
            if (g->n < 1.0) {
                st = opq_set_error(r.ctx, OPQ_ERR_INTERNAL, "erq: no calibration data reached '%s'",
                                   g->x->name);
                goto out;
            }
        }
        s->t_stats += opq_now_s() - t0;
        opq_erq_la_threads(r.ctx->n_threads);
        for (int li = 0; li < r.n_layers; li++) {
            struct layer *L = &r.layers[li];
            if (r.groups[L->group].pass != pass)
                continue;
            st = do_layer(&r, L, &s->layers[s->n_layers]);
            s->n_layers++;
            if (st != OPQ_OK) {
                opq_erq_la_threads(1);
                goto out;
            }
            opq_progress(r.ctx, "erq layers", ++n_done, r.n_layers);
            if (rc->qmodel && (st = qmodel_set(&r, L)) != OPQ_OK) {
                opq_erq_la_threads(1);
                goto out;
            }
        }
        opq_erq_la_threads(1);
        for (int gi = 0; gi < r.n_groups; gi++) {
            struct group *g = &r.groups[gi];
            if (g->pass != pass)
                continue;
            free(g->G);
            free(g->E);
            free(g->F);
            g->G = g->E = g->F = NULL;
        }
    }
    // Write back.
    for (int li = 0; li < r.n_layers; li++) {
        struct layer *L = &r.layers[li];
        memcpy(L->w->t.data, L->w_new, sizeof(float) * (size_t)L->d_in * (size_t)L->d_out);
        if (L->bias)
            memcpy(L->bias, L->b_new, sizeof(float) * (size_t)L->d_out);
    }
    opq_log(r.ctx, OPQ_LOG_INFO, "erq: relative output error per layer (calibration set)");
    opq_log(r.ctx, OPQ_LOG_INFO, "  %-40s %9s %5s %10s %10s %10s %10s", "layer", "in->out", "duq",
            "before", "aqer", "wqer", "(rtn)");
    for (int i = 0; i < s->n_layers; i++) {
        const struct opq_erq_layer *l = &s->layers[i];
        size_t len = strlen(l->name);
        char io[32];
        snprintf(io, sizeof(io), "%d->%d", l->d_in, l->d_out);
        opq_log(r.ctx, OPQ_LOG_INFO, "  %s%-*s %9s %5d %10.3e %10.3e %10.3e %10.3e",
                len > 40 ? "..." : "", len > 40 ? 37 : 40, len > 40 ? l->name + len - 37 : l->name,
                io, l->n_outliers, l->err_before, l->err_aqer, l->err_wqer, l->err_rtn);
    }
out:
    opq_erq_la_threads(1);
    if (r.layers)
        for (int li = 0; li < r.n_layers; li++) {
            free(r.layers[li].w_new);
            free(r.layers[li].b_new);
        }
    if (r.groups)
        for (int gi = 0; gi < r.n_groups; gi++) {
            free(r.groups[gi].xq);
            free(r.groups[gi].xf);
            free(r.groups[gi].G);
            free(r.groups[gi].E);
            free(r.groups[gi].F);
        }
    free(r.layers);
    free(r.groups);
    free(r.work);
    opq_threadpool_free(r.pool);
    free(names);
    opq_strmap_free(r.by_name);
    return st;
}
