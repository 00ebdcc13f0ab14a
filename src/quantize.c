/* quantize.c: the round-to-nearest quantization flow (see quantize.h). */
#define _POSIX_C_SOURCE 200809L
#include "quantize.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "arena.h"
#include "exec.h"
#include "quant/actsearch.h"
#include "quant/placement.h"
#include "quant/qdq.h"
#include "quant/reparam.h"
#include "quant/trt_check.h"
#include "recognize.h"
#include "strmap.h"
#include "threadpool.h"

void opq_quant_opts_default(struct opq_quant_opts *o) {
    memset(o, 0, sizeof(*o));
    o->wbits         = 8;
    o->abits         = 8;
    o->input_bits    = 8;
    o->calibrator    = OPQ_CALIB_MSE;
    o->act_search    = -1;
    o->act_search_samples = 64;
    o->percentile    = 99.99;
    o->wcalib        = OPQ_WCALIB_MSE;
    o->target        = OPQ_TARGET_ORT;
    o->reparam       = -1;
    o->defer_softmax = -1;
    o->reparam_alpha = 1.0f;
    o->batch         = 16;
    o->holdout       = -1;
    opq_erq_opts_default(&o->erq);
    opq_recon_opts_default(&o->recon);
    opq_mr_opts_default(&o->mr);
}

int opq_quant_holdout(const struct opq_quant_opts *o, int total) {
    int holdout = o->holdout;
    if (holdout < 0)
        holdout = total >= 16 ? (total / 8 < 8 ? 8 : (total / 8 > 128 ? 128 : total / 8)) : 0;
    if (holdout >= total)
        holdout = total / 2;
    return holdout;
}

static void phase_end(struct opq_report *r, const char *name, double t0) {
    if (!r || r->n_phases >= (int)ARRAY_SIZE(r->phases))
        return;
    r->phases[r->n_phases++] = (struct opq_report_phase){name, opq_now_s() - t0, opq_peak_rss_kb()};
}

// ---- streaming runs over calibration samples -------------------------------------------------------

struct runner {
    struct opq_ctx          *ctx;
    struct opq_model        *model;
    struct opq_calib_src    *src;
    int                      batch;
    const char *const       *capture;
    int                      n_capture;
    opq_capture_fn           fn;
    void                    *user;
    struct opq_tensor       *outputs;    // if non-NULL, receives graph outputs of each batch
    int                      n_outputs;
    const char              *phase;
};

// Plans an executor for `n` samples per run.
static enum opq_status plan_for(struct runner *r, int n, struct opq_exec **out) {
    int k = opq_calib_n_inputs(r->src);
    struct opq_named_tensor shapes[16];
    opq_calib_batch(r->src, 0, n, NULL, shapes);
    struct opq_exec_opts eo = {.batch = n};
    enum opq_status st = opq_exec_plan(r->ctx, r->model, shapes, k, &eo, out);
    if (st != OPQ_OK)
        return st;
    if (r->fn) {
        st = opq_exec_set_capture(*out, r->capture, r->n_capture, r->fn, r->user);
        if (st != OPQ_OK) {
            opq_exec_free(*out);
            *out = NULL;
        }
    }
    return st;
}

// Runs samples [first, first + count) in batches of r->batch (one extra plan for the remainder).
static enum opq_status run_samples(struct runner *r, int first, int count) {
    int k = opq_calib_n_inputs(r->src);
    struct opq_exec *ex = NULL, *ex_tail = NULL;
    void *bufs[16] = {0};
    enum opq_status st = OPQ_OK;
    int B = r->batch < count ? r->batch : count;
    if (B <= 0)
        return OPQ_OK;
    for (int i = 0; i < k; i++) {
        bufs[i] = malloc(opq_calib_sample_bytes(r->src, i) * (size_t)B);
        if (!bufs[i]) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
    }
    if ((st = plan_for(r, B, &ex)) != OPQ_OK)
        goto out;
    for (int done = 0; done < count; done += B) {
        int n = count - done < B ? count - done : B;
        struct opq_exec *e = ex;
        if (n != B) {
            if ((st = plan_for(r, n, &ex_tail)) != OPQ_OK)
                goto out;
            e = ex_tail;
        }
        struct opq_named_tensor in[16];
        if ((st = opq_calib_batch(r->src, first + done, n, bufs, in)) != OPQ_OK)
            goto out;
        // graph inputs are not computed, so the capture hook never sees them: feed them here
        for (int i = 0; i < k && r->fn; i++)
            if ((st = r->fn(r->user, in[i].name, &in[i].t)) != OPQ_OK)
                goto out;
        // no graph outputs wanted: stop after the last node producing a captured value (the ERQ
        // statistics passes capture one layer input each, often early in the graph)
        st = r->outputs ? opq_exec_run(e, in, k, r->outputs, r->n_outputs)
                        : opq_exec_run_captured(e, in, k);
        if (st != OPQ_OK)
            goto out;
        if (r->phase)
            opq_progress(r->ctx, r->phase, done + n, count);
    }
out:
    opq_exec_free(ex);
    opq_exec_free(ex_tail);
    for (int i = 0; i < k; i++)
        free(bufs[i]);
    return st;
}

// Values the model leaves untyped (no value_info) get the dtype and shape the executor infers for
// one sample; the batch dim stays unknown (-1). Placement and Q/DQ encoding need the dtypes.
static enum opq_status annotate_types(struct opq_ctx *ctx, struct opq_model *model,
                                      struct opq_calib_src *src) {
    struct runner r = {.ctx = ctx, .model = model, .src = src, .batch = 1};
    struct opq_exec *ex = NULL;
    enum opq_status st = plan_for(&r, 1, &ex);
    if (st != OPQ_OK)
        return st;
    struct opq_graph *g = model->graph;
    for (int i = 0; i < g->n_values; i++) {
        struct opq_value *v = g->values[i];
        if (v->t.dtype != OPQ_DTYPE_UNDEF || (v->kind & OPQ_VK_INIT))
            continue;
        const struct opq_tensor *t = opq_exec_value(ex, v->name);
        if (!t)
            continue;
        v->t.dtype = t->dtype;
        if (v->t.ndim < 0 && t->ndim >= 0) {
            v->t.ndim = t->ndim;
            for (int d = 0; d < t->ndim; d++)
                v->t.shape[d] = d == 0 ? -1 : t->shape[d];
        }
    }
    opq_exec_free(ex);
    return OPQ_OK;
}

enum opq_status opq_calib_stream(struct opq_ctx *ctx, struct opq_model *model,
                                 struct opq_calib_src *src, int first, int count, int batch,
                                 const char *const *capture, int n_capture, opq_capture_fn fn,
                                 void *user, const char *phase) {
    struct runner r = {.ctx = ctx, .model = model, .src = src, .batch = batch,
                       .capture = capture, .n_capture = n_capture, .fn = fn, .user = user,
                       .phase = phase};
    return run_samples(&r, first, count);
}

// ---- per-channel ranges of LayerNorm outputs ----------------------------------------------------------

struct chan_ranges {
    struct opq_strmap *index; // name -> (site index + 1)
    int                n;
    int64_t           *C;
    float            **lo, **hi;
};

static enum opq_status chan_capture(void *user, const char *name, const struct opq_tensor *t) {
    struct chan_ranges *cr = user;
    intptr_t k = (intptr_t)opq_strmap_get(cr->index, name) - 1;
    if (k < 0 || t->dtype != OPQ_DTYPE_FLOAT || t->ndim < 1)
        return OPQ_OK;
    int64_t C = cr->C[k];
    size_t n;
    if (!opq_tensor_numel(t, &n) || t->shape[t->ndim - 1] != C)
        return OPQ_OK;
    const float *x = t->data;
    float *lo = cr->lo[k], *hi = cr->hi[k];
    for (size_t r = 0; r < n / (size_t)C; r++, x += C)
        for (int64_t c = 0; c < C; c++) {
            lo[c] = x[c] < lo[c] ? x[c] : lo[c];
            hi[c] = x[c] > hi[c] ? x[c] : hi[c];
        }
    return OPQ_OK;
}

// Post-LayerNorm reparameterization sites: every LayerNormalization (normalising the last axis)
// whose output feeds only linear layers with initializer weights.
struct reparam_sites {
    struct opq_reparam_site *sites;
    const char             **names;
    int                      n;
    struct chan_ranges       cr;
};

static void reparam_sites_free(struct reparam_sites *rs) {
    if (rs->cr.lo)
        for (int k = 0; k < rs->cr.n; k++)
            free(rs->cr.lo[k]);
    if (rs->cr.hi)
        for (int k = 0; k < rs->cr.n; k++)
            free(rs->cr.hi[k]);
    free(rs->cr.lo);
    free(rs->cr.hi);
    free(rs->cr.C);
    opq_strmap_free(rs->cr.index);
    free(rs->sites);
    free(rs->names);
    memset(rs, 0, sizeof(*rs));
}

static enum opq_status reparam_find(struct opq_ctx *ctx, struct opq_graph *g,
                                    struct reparam_sites *rs) {
    memset(rs, 0, sizeof(*rs));
    rs->sites = calloc((size_t)g->n_nodes + 1, sizeof(*rs->sites));
    rs->names = calloc((size_t)g->n_nodes + 1, sizeof(*rs->names));
    if (!rs->sites || !rs->names)
        return OPQ_ERR_NOMEM;
    for (int i = 0; i < g->n_nodes; i++) {
        struct opq_node *ln = g->nodes[i];
        if (ln->op != OPQ_OP_LAYERNORM || ln->n_outputs < 1 || !ln->outputs[0] || ln->n_inputs < 2)
            continue;
        struct opq_reparam_site s = {.out = ln->outputs[0], .gamma = ln->inputs[1],
                                     .beta = ln->n_inputs > 2 ? ln->inputs[2] : NULL, .ln = ln};
        int64_t axis = opq_node_attr_int(ln, "axis", -1);
        if (axis != -1 && axis != (int64_t)s.out->t.ndim - 1)
            continue;
        if (opq_reparam_applicable(g, &s)) {
            rs->names[rs->n]   = s.out->name;
            rs->sites[rs->n++] = s;
        }
    }
    // Decomposed LayerNorms (exports before opset 17): gamma and beta are the 1-D initializer
    // operands of the chain's final Mul and Add.
    struct opq_recognized *rz = NULL;
    enum opq_status st = opq_recognize(ctx, g, &rz);
    if (st != OPQ_OK)
        return st;
    for (int i = 0; i < rz->n_items; i++) {
        const struct opq_pattern *p = &rz->items[i];
        if (p->kind != OPQ_PAT_LAYERNORM || p->variant != OPQ_PV_DECOMPOSED || p->n_nodes < 2)
            continue;
        const struct opq_node *mul = p->nodes[p->n_nodes - 2], *add = p->nodes[p->n_nodes - 1];
        if (mul->op != OPQ_OP_MUL || add->op != OPQ_OP_ADD || add->outputs[0] != p->output)
            continue;
        struct opq_value *gamma = NULL, *beta = NULL;
        for (int k = 0; k < 2; k++) {
            if (mul->inputs[k] && (mul->inputs[k]->kind & OPQ_VK_INIT))
                gamma = mul->inputs[k];
            if (add->inputs[k] && (add->inputs[k]->kind & OPQ_VK_INIT))
                beta = add->inputs[k];
        }
        if (!gamma || !beta || gamma->t.ndim != 1 || p->output->t.ndim < 1 ||
            p->output->t.shape[p->output->t.ndim - 1] != gamma->t.shape[0])
            continue;
        struct opq_reparam_site s = {.out = p->output, .gamma = gamma, .beta = beta, .ln = NULL};
        if (opq_reparam_applicable(g, &s)) {
            rs->names[rs->n]   = s.out->name;
            rs->sites[rs->n++] = s;
        }
    }
    opq_recognized_free(rz);
    struct chan_ranges *cr = &rs->cr;
    cr->index = opq_strmap_new(ctx);
    cr->n     = rs->n;
    cr->C     = calloc((size_t)rs->n + 1, sizeof(*cr->C));
    cr->lo    = calloc((size_t)rs->n + 1, sizeof(*cr->lo));
    cr->hi    = calloc((size_t)rs->n + 1, sizeof(*cr->hi));
    if (!cr->index || !cr->C || !cr->lo || !cr->hi)
        return OPQ_ERR_NOMEM;
    for (int k = 0; k < rs->n; k++) {
        cr->C[k]  = rs->sites[k].gamma->t.shape[0];
        cr->lo[k] = malloc(sizeof(float) * (size_t)cr->C[k]);
        cr->hi[k] = malloc(sizeof(float) * (size_t)cr->C[k]);
        if (!cr->lo[k] || !cr->hi[k] ||
            opq_strmap_put(cr->index, rs->names[k], (void *)(intptr_t)(k + 1)) != OPQ_OK)
            return OPQ_ERR_NOMEM;
        for (int64_t c = 0; c < cr->C[k]; c++) {
            cr->lo[k][c] = INFINITY;
            cr->hi[k][c] = -INFINITY;
        }
    }
    return OPQ_OK;
}

// Applies the rewrite where it helps (the widest channel range over 8x the median one, the
// signature of ViT outlier channels) or everywhere (reparam == 1). applied[k] marks the sites done.
static enum opq_status reparam_apply(struct opq_ctx *ctx, struct opq_graph *g,
                                     struct reparam_sites *rs, const struct opq_quant_opts *o,
                                     bool *applied, int *n_done) {
    struct chan_ranges *cr = &rs->cr;
    *n_done = 0;
    for (int k = 0; k < rs->n; k++) {
        int64_t C = cr->C[k];
        float *h = malloc(sizeof(float) * (size_t)C);
        if (!h)
            return OPQ_ERR_NOMEM;
        bool seen = true;
        for (int64_t c = 0; c < C; c++) {
            seen &= cr->hi[k][c] >= cr->lo[k][c];
            h[c] = 0.5f * (cr->hi[k][c] - cr->lo[k][c]);
        }
        for (int64_t a = 1; a < C; a++) // insertion sort: C is a hidden size
            for (int64_t b = a; b > 0 && h[b - 1] > h[b]; b--) {
                float t  = h[b];
                h[b]     = h[b - 1];
                h[b - 1] = t;
            }
        float med = h[C / 2], mx = h[C - 1];
        free(h);
        applied[k] = false;
        opq_log(ctx, OPQ_LOG_DEBUG, "reparam site %s: max/median channel range %.1f", rs->names[k],
                (double)(med > 0.0f ? mx / med : 0.0f));
        if (!seen)
            continue;
        if (!(o->reparam == 1 || (o->reparam < 0 && med > 0.0f && mx > 8.0f * med)))
            continue;
        enum opq_status st = opq_reparam_apply(g, &rs->sites[k], cr->lo[k], cr->hi[k],
                                               o->reparam_alpha);
        if (st != OPQ_OK)
            return st;
        applied[k] = true;
        (*n_done)++;
        opq_log(ctx, OPQ_LOG_DEBUG, "reparam: %s (max/median channel range %.1f)", rs->names[k],
                (double)(med > 0.0f ? mx / med : 0.0f));
    }
    return *n_done ? opq_graph_sort(g) : OPQ_OK;
}

// ---- activation observers -----------------------------------------------------------------------------

// Activation observers by value name (placement may be recomputed after reparameterization;
// names stay), and the pass-1 capture that also feeds the reparameterization statistics.
struct observers {
    struct opq_strmap   *index; // name -> k + 1
    struct opq_observer *obs;   // name k owns obs[first[k] .. first[k] + heads[k])
    int                 *first, *heads;
    int                  n_obs;
    const char         **names;
    int                  n;
    struct chan_ranges  *cr;    // optional: per-channel ranges of reparam sites
    struct opq_threadpool *pool; // counting threads (idle while the executor runs)
};

static enum opq_status obs_capture(void *user, const char *name, const struct opq_tensor *t) {
    struct observers *ob = user;
    if (ob->cr)
        chan_capture(ob->cr, name, t);
    intptr_t k = (intptr_t)opq_strmap_get(ob->index, name) - 1;
    size_t n;
    if (k < 0 || t->dtype != OPQ_DTYPE_FLOAT || !opq_tensor_numel(t, &n))
        return OPQ_OK;
    struct opq_observer *o = &ob->obs[ob->first[k]];
    int H = ob->heads[k];
    if (H <= 1 || t->ndim < 2 || t->shape[1] != H) {
        opq_observer_add_mt(o, t->data, n, ob->pool);
        return OPQ_OK;
    }
    // per head: contiguous runs of shape[2] * ... elements along axis 1
    size_t inner = n / ((size_t)t->shape[0] * (size_t)H);
    const float *x = t->data;
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int h = 0; h < H; h++)
            opq_observer_add(&o[h], x + ((size_t)b * (size_t)H + (size_t)h) * inner, inner);
    return OPQ_OK;
}

// The first observer of a name (heads_out: how many) or NULL.
static struct opq_observer *observer_of(const struct observers *ob, const char *name,
                                        int *heads_out) {
    intptr_t k = (intptr_t)opq_strmap_get(ob->index, name) - 1;
    if (heads_out)
        *heads_out = k >= 0 ? ob->heads[k] : 0;
    return k >= 0 ? &ob->obs[ob->first[k]] : NULL;
}

// ---- the report's evaluation: float and quantized models in lockstep ------------------------------------

struct eval_state {
    struct opq_strmap     *index;   // captured name -> k + 1
    int                    n;
    const char           **names;
    float                **ref;     // float model's values for the current batch
    size_t                *ref_n;
    size_t                *ref_cap;
    double                *sig, *noise; // per captured value, over all batches
    bool                   quant_pass;
    // activation targets: isolated qdq error, computed in the float pass
    struct opq_strmap     *act_index; // name -> report tensor index + 1
    struct opq_report     *rep;
    const struct opq_qparams **act_p;
    const int             *act_nch;  // qparams per target (> 1: per head along axis 1)
    double                *act_sig, *act_noise;
};

static enum opq_status eval_capture(void *user, const char *name, const struct opq_tensor *t) {
    struct eval_state *es = user;
    size_t n;
    if (t->dtype != OPQ_DTYPE_FLOAT || !opq_tensor_numel(t, &n))
        return OPQ_OK;
    const float *x = t->data;
    // A tensor's own quantization error is measured on the quantized model, where it is the input
    // of its Q/DQ pair (after any reparameterization, with upstream quantization in place).
    if (es->quant_pass) {
        intptr_t a = (intptr_t)opq_strmap_get(es->act_index, name) - 1;
        if (a >= 0) {
            const struct opq_qparams *p = es->act_p[a];
            int H = es->act_nch[a];
            size_t inner = (H > 1 && t->ndim >= 2 && t->shape[1] == H)
                               ? n / ((size_t)t->shape[0] * (size_t)H) : n;
            if (H > 1 && inner == n)
                H = 1;
            double s = 0.0, e = 0.0;
            for (size_t i = 0; i < n; i++) {
                double d = (double)x[i] - (double)opq_fq(x[i], &p[H > 1 ? (i / inner) % (size_t)H : 0]);
                s += (double)x[i] * (double)x[i];
                e += d * d;
            }
            es->act_sig[a] += s;
            es->act_noise[a] += e;
        }
    }
    intptr_t k = (intptr_t)opq_strmap_get(es->index, name) - 1;
    if (k < 0)
        return OPQ_OK;
    if (!es->quant_pass) {
        if (n > es->ref_cap[k]) {
            float *nb = realloc(es->ref[k], n * sizeof(float));
            if (!nb)
                return OPQ_ERR_NOMEM;
            es->ref[k]     = nb;
            es->ref_cap[k] = n;
        }
        memcpy(es->ref[k], x, n * sizeof(float));
        es->ref_n[k] = n;
    } else if (es->ref_n[k] == n) {
        for (size_t i = 0; i < n; i++) {
            double d = (double)x[i] - (double)es->ref[k][i];
            es->sig[k] += (double)es->ref[k][i] * (double)es->ref[k][i];
            es->noise[k] += d * d;
        }
    }
    return OPQ_OK;
}

static double sqnr_db(double sig, double noise) {
    if (noise <= 0.0)
        return 200.0;
    if (sig <= 0.0)
        return -200.0;
    return 10.0 * log10(sig / noise);
}

// Block outputs: residual Adds, i.e. an Add one of whose operands also feeds a LayerNorm (pre-norm
// transformer blocks read their input twice: the norm and the skip connection).
static bool is_block_output(const struct opq_node *n) {
    if (n->op != OPQ_OP_ADD || n->n_inputs != 2 || !n->outputs[0])
        return false;
    for (int i = 0; i < 2; i++) {
        const struct opq_value *v = n->inputs[i];
        if (!v || (v->kind & OPQ_VK_INIT))
            continue;
        for (int u = 0; u < v->n_users; u++) {
            enum opq_op op = v->users[u]->op;
            if (op == OPQ_OP_LAYERNORM || op == OPQ_OP_REDUCEMEAN)
                return true;
        }
    }
    return false;
}


// ---- main flow ----------------------------------------------------------------------------------------

// Softmax of a row in double.
static void softmax_row(const float *x, int64_t n, double *p) {
    double mx = x[0], s = 0.0;
    for (int64_t i = 1; i < n; i++)
        mx = fmax(mx, (double)x[i]);
    for (int64_t i = 0; i < n; i++) {
        p[i] = exp((double)x[i] - mx);
        s += p[i];
    }
    for (int64_t i = 0; i < n; i++)
        p[i] /= s;
}

static enum opq_status evaluate(struct opq_ctx *ctx, struct opq_model *fmodel,
                                struct opq_model *qmodel, struct opq_calib_src *src, int first,
                                int count, int batch, const struct opq_placement *pl,
                                const struct opq_qparams **act_p, const int *act_nch,
                                struct opq_report *rep) {
    struct opq_graph *g = fmodel->graph;
    struct eval_state es = {0};
    enum opq_status st = OPQ_OK;
    struct opq_exec *fe = NULL, *qe = NULL;
    void *bufs[16] = {0};
    int k_in = opq_calib_n_inputs(src);
    double kl = 0.0, agree = 0.0, lsig = 0.0, lnoise = 0.0;
    long rows = 0;
    es.names     = calloc((size_t)g->n_nodes + 1, sizeof(*es.names));
    es.index     = opq_strmap_new(ctx);
    es.act_index = opq_strmap_new(ctx);
    if (!es.names || !es.index || !es.act_index) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (int i = 0; i < g->n_nodes; i++)
        if (is_block_output(g->nodes[i]))
            es.names[es.n++] = g->nodes[i]->outputs[0]->name;
    es.ref = calloc((size_t)es.n + 1, sizeof(*es.ref));
    es.ref_n = calloc((size_t)es.n + 1, sizeof(*es.ref_n));
    es.ref_cap = calloc((size_t)es.n + 1, sizeof(*es.ref_cap));
    es.sig = calloc((size_t)es.n + 1, sizeof(double));
    es.noise = calloc((size_t)es.n + 1, sizeof(double));
    es.act_p = act_p;
    es.act_nch = act_nch;
    es.act_sig = calloc((size_t)pl->n_targets + 1, sizeof(double));
    es.act_noise = calloc((size_t)pl->n_targets + 1, sizeof(double));
    if (!es.ref || !es.ref_n || !es.ref_cap || !es.sig || !es.noise || !es.act_sig || !es.act_noise) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (int k = 0; k < es.n; k++)
        if (opq_strmap_put(es.index, es.names[k], (void *)(intptr_t)(k + 1)) != OPQ_OK) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
    // capture list for the float pass: block outputs + activation targets
    const char **fnames = calloc((size_t)(es.n + pl->n_targets) + 1, sizeof(*fnames));
    int n_fnames = 0;
    if (!fnames) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (int k = 0; k < es.n; k++)
        fnames[n_fnames++] = es.names[k];
    for (int t = 0; t < pl->n_targets; t++) {
        if (pl->targets[t].role != OPQ_QROLE_ACT || !act_p[t])
            continue;
        if (opq_strmap_put(es.act_index, pl->targets[t].value->name, (void *)(intptr_t)(t + 1)) != OPQ_OK) {
            free(fnames);
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        fnames[n_fnames++] = pl->targets[t].value->name;
    }
    for (int done = 0; done < count; done += batch) {
        int n = count - done < batch ? count - done : batch;
        struct opq_named_tensor in[16];
        for (int i = 0; i < k_in && st == OPQ_OK; i++) {
            free(bufs[i]);
            bufs[i] = malloc(opq_calib_sample_bytes(src, i) * (size_t)n);
            if (!bufs[i])
                st = OPQ_ERR_NOMEM;
        }
        if (st != OPQ_OK || (st = opq_calib_batch(src, first + done, n, bufs, in)) != OPQ_OK)
            break;
        struct opq_exec_opts eo = {.batch = n};
        opq_exec_free(fe);
        opq_exec_free(qe);
        fe = qe = NULL;
        if ((st = opq_exec_plan(ctx, fmodel, in, k_in, &eo, &fe)) != OPQ_OK ||
            (st = opq_exec_plan(ctx, qmodel, in, k_in, &eo, &qe)) != OPQ_OK)
            break;
        if ((st = opq_exec_set_capture(fe, fnames, n_fnames, eval_capture, &es)) != OPQ_OK ||
            (st = opq_exec_set_capture(qe, fnames, n_fnames, eval_capture, &es)) != OPQ_OK)
            break;
        struct opq_tensor fo, qo;
        es.quant_pass = false;
        for (int i = 0; i < k_in; i++)
            if ((st = eval_capture(&es, in[i].name, &in[i].t)) != OPQ_OK)
                break;
        if (st != OPQ_OK)
            break;
        if ((st = opq_exec_run(fe, in, k_in, &fo, 1)) != OPQ_OK)
            break;
        es.quant_pass = true;
        for (int i = 0; i < k_in; i++)
            if ((st = eval_capture(&es, in[i].name, &in[i].t)) != OPQ_OK)
                break;
        if (st != OPQ_OK)
            break;
        if ((st = opq_exec_run(qe, in, k_in, &qo, 1)) != OPQ_OK)
            break;
        // logits: first graph output, [rows, classes] after flattening the leading dims
        size_t nf, nq;
        if (fo.dtype == OPQ_DTYPE_FLOAT && opq_tensor_numel(&fo, &nf) &&
            opq_tensor_numel(&qo, &nq) && nf == nq && fo.ndim >= 1) {
            int64_t C = fo.shape[fo.ndim - 1];
            int64_t R = C > 0 ? (int64_t)nf / C : 0;
            double *pf = malloc(sizeof(double) * (size_t)C), *pq = malloc(sizeof(double) * (size_t)C);
            if (!pf || !pq) {
                free(pf);
                free(pq);
                st = OPQ_ERR_NOMEM;
                break;
            }
            const float *xf = fo.data, *xq = qo.data;
            for (int64_t r = 0; r < R; r++) {
                softmax_row(xf + r * C, C, pf);
                softmax_row(xq + r * C, C, pq);
                int64_t af = 0, aq = 0;
                for (int64_t c = 0; c < C; c++) {
                    if (pf[c] > 0.0)
                        kl += pf[c] * log(pf[c] / fmax(pq[c], 1e-300));
                    if (xf[r * C + c] > xf[r * C + af])
                        af = c;
                    if (xq[r * C + c] > xq[r * C + aq])
                        aq = c;
                }
                agree += af == aq;
                rows++;
            }
            for (size_t i = 0; i < nf; i++) {
                double d = (double)xf[i] - (double)xq[i];
                lsig += (double)xf[i] * (double)xf[i];
                lnoise += d * d;
            }
            free(pf);
            free(pq);
        }
        opq_progress(ctx, "report", done + n, count);
    }
    free(fnames);
    if (st == OPQ_OK && rows > 0) {
        rep->logits_sqnr_db = sqnr_db(lsig, lnoise);
        rep->logits_kl      = kl / (double)rows;
        rep->top1_agreement = agree / (double)rows;
        rep->have_eval      = true;
        rep->n_eval         = count;
        rep->blocks = calloc((size_t)es.n + 1, sizeof(*rep->blocks));
        if (!rep->blocks) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        for (int k = 0; k < es.n; k++)
            rep->blocks[rep->n_blocks++] = (struct opq_report_block){
                strdup(es.names[k]), sqnr_db(es.sig[k], es.noise[k])};
        for (int t = 0; t < pl->n_targets && t < rep->n_tensors; t++)
            if (!rep->tensors[t].weight)
                rep->tensors[t].sqnr_db = sqnr_db(es.act_sig[t], es.act_noise[t]);
    }
out:
    opq_exec_free(fe);
    opq_exec_free(qe);
    for (int i = 0; i < k_in; i++)
        free(bufs[i]);
    if (es.ref)
        for (int k = 0; k < es.n; k++)
            free(es.ref[k]);
    free(es.ref);
    free(es.ref_n);
    free(es.ref_cap);
    free(es.sig);
    free(es.noise);
    free(es.act_sig);
    free(es.act_noise);
    free(es.names);
    opq_strmap_free(es.index);
    opq_strmap_free(es.act_index);
    return st;
}

enum opq_status opq_quant_opts_check(struct opq_ctx *ctx, const struct opq_quant_opts *o) {
    if (o->wbits < 2 || o->wbits > 8 || o->abits < 2 || o->abits > 8)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "--wbits and --abits take 2..8 (got %d and %d)",
                             o->wbits, o->abits);
    if (o->target == OPQ_TARGET_TRT) {
        if (o->abits != 8 || o->wbits != 8)
            return opq_set_error(ctx, OPQ_ERR_USAGE,
                                 "--target trt: TensorRT's explicit quantization is 8-bit only "
                                 "(got W%dA%d); use --target ort for fewer bits",
                                 o->wbits, o->abits);
        if (o->w_asym)
            return opq_set_error(ctx, OPQ_ERR_USAGE,
                                 "--target trt: TensorRT needs symmetric weights");
    }
    if (o->batch < 1)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "--batch must be at least 1");
    if (!o->calib.path || !*o->calib.path)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "no calibration data given");
    return OPQ_OK;
}

static enum opq_status check_opts(struct opq_ctx *ctx, const struct opq_model *m,
                                  const struct opq_quant_opts *o) {
    enum opq_status st = opq_quant_opts_check(ctx, o);
    if (st != OPQ_OK)
        return st;
    int64_t opset = opq_model_opset(m, "");
    if (opset < 13 || opset > 21)
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                             "%s: default-domain opset %lld; onnx-ptq quantizes opsets 13 to 21",
                             m->path, (long long)opset);
    return OPQ_OK;
}

// Per value: reached from a graph input without passing a MatMul/Gemm/Conv (nodes sorted).
// Shape and Size carry no data: shape arithmetic on the input does not count.
static bool *input_side(const struct opq_graph *g) {
    bool *in = calloc((size_t)g->n_values + 1, sizeof(*in));
    if (!in)
        return NULL;
    for (int i = 0; i < g->n_inputs; i++)
        in[g->inputs[i]->index] = true;
    for (int i = 0; i < g->n_nodes; i++) {
        const struct opq_node *n = g->nodes[i];
        if (!strcmp(n->op_type, "MatMul") || !strcmp(n->op_type, "Gemm") ||
            !strcmp(n->op_type, "Conv") || !strcmp(n->op_type, "Shape") ||
            !strcmp(n->op_type, "Size"))
            continue;
        bool any = false;
        for (int j = 0; j < n->n_inputs; j++)
            any = any || (n->inputs[j] && in[n->inputs[j]->index]);
        for (int j = 0; any && j < n->n_outputs; j++)
            if (n->outputs[j])
                in[n->outputs[j]->index] = true;
    }
    return in;
}

// Bits of activation target v.
static int act_bits(const struct opq_quant_opts *o, const bool *in_side, const struct opq_value *v) {
    return in_side && in_side[v->index] && o->input_bits > o->abits ? o->input_bits : o->abits;
}

// The Q/DQ pair of an activation target, read by its quantized consumers and its readers.
static enum opq_status insert_act(struct opq_graph *g, const struct opq_qtarget *tg,
                                  const struct opq_qdq_spec *spec) {
    if (tg->n_readers == 0)
        return opq_qdq_insert_activation(g, tg->value, spec, NULL, tg->consumers,
                                         tg->n_consumers, NULL);
    int n = tg->n_consumers + tg->n_readers;
    struct opq_node **all = malloc(sizeof(*all) * (size_t)n);
    if (!all)
        return opq_set_error(g->ctx, OPQ_ERR_NOMEM, "'%s': out of memory", tg->value->name);
    memcpy(all, tg->consumers, sizeof(*all) * (size_t)tg->n_consumers);
    memcpy(all + tg->n_consumers, tg->readers, sizeof(*all) * (size_t)tg->n_readers);
    enum opq_status st = opq_qdq_insert_activation(g, tg->value, spec, NULL, all, n, NULL);
    free(all);
    return st;
}

// Q/DQ pairs for every target of pl (a placement of g) with the given qparams.
static enum opq_status encode_targets(struct opq_graph *g, const struct opq_placement *pl,
                                      struct opq_qparams *const *qp, const int *n_chs,
                                      const int *axes, const int *abits_of, int wbits, bool a_sym,
                                      int64_t opset) {
    enum opq_status st = OPQ_OK;
    for (int t = 0; t < pl->n_targets && st == OPQ_OK; t++) {
        const struct opq_qtarget *tg = &pl->targets[t];
        struct opq_qdq_spec spec = {.opset = opset, .n_ch = n_chs[t], .axis = axes[t], .p = qp[t]};
        if (tg->role == OPQ_QROLE_WEIGHT) {
            spec.bits      = wbits;
            spec.is_signed = true;
            st = opq_qdq_quantize_weight(g, tg->value, &spec, NULL);
        } else {
            spec.bits      = abits_of[t];
            spec.is_signed = a_sym;
            st = insert_act(g, tg, &spec);
        }
    }
    return st == OPQ_OK ? opq_graph_sort(g) : st;
}

// A copy of model with Q/DQ at every target of pl (the placement of model's graph) with the
// given qparams: weights round to nearest on their grids (float, untouched, with act_only),
// activations fake-quantized. The caller frees *out.
static enum opq_status quant_clone(struct opq_ctx *ctx, struct opq_model *model,
                                   struct opq_calib_src *src, const struct opq_placement_opts *po,
                                   const struct opq_placement *pl, struct opq_qparams *const *qp,
                                   const int *n_chs, const int *axes, const int *abits_of,
                                   int wbits, bool a_sym, bool act_only, struct opq_model **out) {
    struct opq_model *qm = NULL;
    struct opq_placement qpl = {0};
    enum opq_status st = opq_model_clone(ctx, model, &qm);
    if (st == OPQ_OK)
        st = annotate_types(ctx, qm, src);
    if (st == OPQ_OK)
        st = opq_placement_find(ctx, qm->graph, po, &qpl);
    if (st == OPQ_OK && qpl.n_targets != pl->n_targets)
        st = opq_set_error(ctx, OPQ_ERR_INTERNAL, "quantized copy: it places %d "
                           "targets, the model %d", qpl.n_targets, pl->n_targets);
    for (int t = 0; st == OPQ_OK && t < pl->n_targets; t++)
        if (strcmp(qpl.targets[t].value->name, pl->targets[t].value->name))
            st = opq_set_error(ctx, OPQ_ERR_INTERNAL, "quantized copy: target %d differs "
                               "('%s')", t, qpl.targets[t].value->name);
    if (st == OPQ_OK && act_only)
        for (int t = 0; t < qpl.n_targets; t++)
            if (qpl.targets[t].role == OPQ_QROLE_WEIGHT)
                qpl.n_targets = t; // weights come after the activations
    if (st == OPQ_OK)
        st = encode_targets(qm->graph, &qpl, qp, n_chs, axes, abits_of, wbits, a_sym,
                            opq_model_opset(model, ""));
    if (st != OPQ_OK) {
        opq_model_free(qm);
        qm = NULL;
    }
    *out = qm;
    return st;
}

// The output-aware range search (quant/actsearch.h) for the per-tensor activation targets,
// measured on a copy of the model quantized with the current qparams.
static enum opq_status search_ranges(struct opq_ctx *ctx, struct opq_model *model,
                                     struct opq_calib_src *src,
                                     const struct opq_placement_opts *po,
                                     const struct opq_placement *pl, struct opq_qparams **qp,
                                     const int *n_chs, const int *axes, const int *abits_of,
                                     const struct opq_quant_opts *o, bool a_sym, int n_calib) {
    struct opq_model *qm = NULL;
    bool *search = calloc((size_t)pl->n_targets + 1, sizeof(bool));
    enum opq_status st = search ? quant_clone(ctx, model, src, po, pl, qp, n_chs, axes, abits_of,
                                              o->wbits, a_sym, false, &qm)
                                : OPQ_ERR_NOMEM;
    for (int t = 0; st == OPQ_OK && t < pl->n_targets; t++)
        search[t] = pl->targets[t].role == OPQ_QROLE_ACT && (o->act_search > 0 || abits_of[t] < 8);
    struct opq_act_search_opts so = {.n_samples = o->act_search_samples < n_calib
                                                      ? o->act_search_samples : n_calib,
                                     .batch = o->batch, .symmetric = a_sym};
    if (st == OPQ_OK)
        st = opq_act_search(ctx, qm, model, src, pl, qp, n_chs, axes, search, &so, NULL, NULL);
    free(search);
    opq_model_free(qm);
    return st;
}

enum opq_status opq_quantize(struct opq_ctx *ctx, struct opq_model *model,
                             const struct opq_quant_opts *o, struct opq_report **report_out) {
    struct opq_graph *g = model->graph;
    enum opq_status st;
    struct opq_calib_src *src = NULL;
    struct opq_model *fmodel = NULL;
    struct opq_report *rep = calloc(1, sizeof(*rep));
    struct observers ob = {0};
    struct reparam_sites rsites = {0};
    struct opq_qparams **qp = NULL;
    const struct opq_qparams **act_p = NULL;
    int *n_chs = NULL, *axes = NULL;
    struct opq_placement pl = {0};
    int *abits_of = NULL; // per target: activation bits
    double t0 = opq_now_s();
    if (!rep)
        return OPQ_ERR_NOMEM;
    if ((st = check_opts(ctx, model, o)) != OPQ_OK)
        goto out;
    // Observer counting and the weight-range search run on their own pool (the executor's
    // workers sleep between kernels, so the two never compete).
    if (opq_ctx_threads(ctx) > 1 && !(ob.pool = opq_threadpool_new(ctx, opq_ctx_threads(ctx)))) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    if ((st = opq_graph_sort(g)) != OPQ_OK || (st = opq_graph_verify(g)) != OPQ_OK)
        goto out;
    bool trt    = o->target == OPQ_TARGET_TRT;
    bool a_sym  = o->a_sym || trt;
    int64_t opset = opq_model_opset(model, "");
    snprintf(rep->settings, sizeof(rep->settings),
             "W%dA%d target=%s weights=%s/%s activations=%s calibrator=%s", o->wbits, o->abits,
             trt ? "trt" : "ort", o->w_per_tensor ? "per-tensor" : "per-channel",
             o->w_asym ? "asymmetric" : "symmetric", a_sym ? "symmetric" : "asymmetric",
             opq_calibrator_name(o->calibrator));

    // Calibration data: the last `holdout` samples are kept for the report.
    if ((st = opq_calib_open(ctx, model, &o->calib, &src)) != OPQ_OK)
        goto out;
    int total = opq_calib_count(src);
    int holdout = opq_quant_holdout(o, total);
    int n_calib = total - holdout;
    rep->n_calib = n_calib;
    if (holdout > 0 && (st = opq_model_clone(ctx, model, &fmodel)) != OPQ_OK)
        goto out;
    phase_end(rep, "prepare", t0);

    // 1. Placement on the float graph (typed by one executor plan).
    if ((st = annotate_types(ctx, model, src)) != OPQ_OK)
        goto out;
    struct opq_placement_opts po = {.exclude = o->exclude, .keep_float = o->keep_float,
                                    .norm_readers = o->refine == opq_recon_refine};
    if ((st = opq_placement_find(ctx, g, &po, &pl)) != OPQ_OK)
        goto out;

    // 2. One calibration pass: activation observers of every activation target, plus per-channel
    // ranges of the LayerNorm outputs that may be reparameterized.
    t0 = opq_now_s();
    if (o->reparam != 0 && (st = reparam_find(ctx, g, &rsites)) != OPQ_OK)
        goto out;
    ob.index = opq_strmap_new(ctx);
    ob.names = calloc((size_t)pl.n_targets + (size_t)rsites.n + 1, sizeof(*ob.names));
    ob.first = calloc((size_t)pl.n_targets + 1, sizeof(int));
    ob.heads = calloc((size_t)pl.n_targets + 1, sizeof(int));
    if (!ob.index || !ob.names || !ob.first || !ob.heads) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    bool per_head = o->act_per_head && !trt;
    for (int t = 0; t < pl.n_targets; t++) {
        if (pl.targets[t].role != OPQ_QROLE_ACT)
            continue;
        const struct opq_value *v = pl.targets[t].value;
        ob.first[ob.n] = ob.n_obs;
        ob.heads[ob.n] = per_head && pl.targets[t].head_axis == 1 ? (int)v->t.shape[1] : 1;
        ob.n_obs += ob.heads[ob.n];
        ob.names[ob.n] = v->name;
        if (opq_strmap_put(ob.index, ob.names[ob.n], (void *)(intptr_t)(ob.n + 1)) != OPQ_OK) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        ob.n++;
    }
    ob.obs = malloc(sizeof(*ob.obs) * ((size_t)ob.n_obs + 1));
    if (!ob.obs) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (int k = 0; k < ob.n_obs; k++)
        opq_observer_init(&ob.obs[k]);
    int n_cap = ob.n;
    for (int k = 0; k < rsites.n; k++)
        if (!observer_of(&ob, rsites.names[k], NULL))
            ob.names[n_cap++] = rsites.names[k];
    ob.cr = rsites.n ? &rsites.cr : NULL;
    if (n_cap > 0) {
        struct runner r = {.ctx = ctx, .model = model, .src = src, .batch = o->batch,
                           .capture = ob.names, .n_capture = n_cap, .fn = obs_capture,
                           .user = &ob, .phase = "calibration"};
        if ((st = run_samples(&r, 0, n_calib)) != OPQ_OK)
            goto out;
    }
    ob.cr = NULL;
    phase_end(rep, "calibration", t0);

    // 3. Post-LayerNorm reparameterization (function-preserving). Only the reparameterized LN
    // outputs change distribution (every consumer computes the same function as before), so only
    // they are observed again, and only when something was rewritten.
    if (rsites.n > 0) {
        t0 = opq_now_s();
        bool *applied = calloc((size_t)rsites.n, sizeof(bool));
        if (!applied) {
            st = OPQ_ERR_NOMEM;
            goto out;
        }
        st = reparam_apply(ctx, g, &rsites, o, applied, &rep->n_reparam);
        const char **again = st == OPQ_OK ? calloc((size_t)rsites.n * 64 + 1, sizeof(*again)) : NULL;
        int n_again = 0;
        for (int k = 0; st == OPQ_OK && again && k < rsites.n; k++) {
            if (!applied[k])
                continue;
            struct opq_value *vals[64];
            int nv = opq_reparam_changed_values(&rsites.sites[k], vals, 64);
            for (int i = 0; i < nv; i++) {
                int heads;
                struct opq_observer *obs = observer_of(&ob, vals[i]->name, &heads);
                if (obs) {
                    for (int h = 0; h < heads; h++)
                        opq_observer_init(&obs[h]);
                    again[n_again++] = vals[i]->name;
                }
            }
        }
        if (st == OPQ_OK && !again)
            st = OPQ_ERR_NOMEM;
        if (st == OPQ_OK && n_again > 0) {
            struct runner r = {.ctx = ctx, .model = model, .src = src, .batch = o->batch,
                               .capture = again, .n_capture = n_again, .fn = obs_capture,
                               .user = &ob, .phase = "reparam calibration"};
            st = run_samples(&r, 0, n_calib);
        }
        free(again);
        free(applied);
        if (st != OPQ_OK)
            goto out;
        // weights were copied or rescaled: find the targets again (same activation names)
        if (rep->n_reparam > 0 && (st = opq_placement_find(ctx, g, &po, &pl)) != OPQ_OK)
            goto out;
        phase_end(rep, "reparam", t0);
    }
    rep->n_qnodes   = pl.n_qnodes;
    rep->n_excluded = pl.n_excluded;
    if (pl.n_qnodes == 0)
        opq_log(ctx, OPQ_LOG_WARN, "%s: nothing to quantize (no MatMul/Gemm/Conv left)",
                model->path);

    // 4a. Ranges: per-channel weight qparams and activation qparams for every target.
    t0 = opq_now_s();
    bool *in_side = input_side(g);
    abits_of = calloc((size_t)pl.n_targets + 1, sizeof(int));
    for (int t = 0; in_side && abits_of && t < pl.n_targets; t++)
        abits_of[t] = act_bits(o, in_side, pl.targets[t].value);
    free(in_side);
    qp    = calloc((size_t)pl.n_targets + 1, sizeof(*qp));
    act_p = calloc((size_t)pl.n_targets + 1, sizeof(*act_p));
    n_chs = calloc((size_t)pl.n_targets + 1, sizeof(int));
    axes  = calloc((size_t)pl.n_targets + 1, sizeof(int));
    rep->tensors = calloc((size_t)pl.n_targets + 1, sizeof(*rep->tensors));
    if (!qp || !act_p || !rep->tensors || !n_chs || !axes || !abits_of) {
        st = OPQ_ERR_NOMEM;
        goto out;
    }
    for (int t = 0; t < pl.n_targets && st == OPQ_OK; t++) {
        struct opq_qtarget *tg = &pl.targets[t];
        struct opq_value *v = tg->value;
        if (tg->role == OPQ_QROLE_WEIGHT) {
            size_t n;
            if (!opq_tensor_numel(&v->t, &n)) {
                st = opq_set_error(ctx, OPQ_ERR_SHAPE, "weight '%s': unknown shape", v->name);
                break;
            }
            size_t n_ch = 1, inner = n;
            if (!o->w_per_tensor && tg->axis >= 0) {
                n_ch  = (size_t)v->t.shape[tg->axis];
                inner = 1;
                for (int d = tg->axis + 1; d < v->t.ndim; d++)
                    inner *= (size_t)v->t.shape[d];
            }
            int32_t qmin, qmax;
            opq_qgrid(o->wbits, true, trt, &qmin, &qmax);
            qp[t] = calloc(n_ch, sizeof(**qp));
            if (!qp[t]) {
                st = OPQ_ERR_NOMEM;
                break;
            }
            st = opq_weight_qparams_mt(v->t.data, n, n_ch, inner, qmin, qmax, !o->w_asym,
                                       o->wcalib, qp[t], ob.pool);
            if (st == OPQ_ERR_NUMERIC)
                st = opq_set_error(ctx, st, "weight '%s' has NaN or Inf values", v->name);
            n_chs[t] = (int)n_ch;
            axes[t]  = n_ch > 1 ? tg->axis : 0;
        } else {
            int32_t qmin, qmax;
            opq_qgrid(abits_of[t], a_sym, false, &qmin, &qmax);
            int heads = 0;
            struct opq_observer *obs = observer_of(&ob, v->name, &heads);
            qp[t] = calloc((size_t)(heads > 0 ? heads : 1), sizeof(**qp));
            if (!qp[t]) {
                st = OPQ_ERR_NOMEM;
                break;
            }
            struct opq_calib_opts co = {.method = o->calibrator, .percentile = o->percentile,
                                        .qmin = qmin, .qmax = qmax, .symmetric = a_sym};
            for (int h = 0; h < heads && st == OPQ_OK; h++) {
                float lo, hi;
                if (opq_observer_range(&obs[h], &co, &lo, &hi, &qp[t][h]) != OPQ_OK)
                    st = opq_set_error(ctx, OPQ_ERR_NUMERIC,
                                       "activation '%s': no finite value seen during calibration",
                                       v->name);
                else if (obs[h].n_nonfinite)
                    opq_log(ctx, OPQ_LOG_WARN, "activation '%s': %llu NaN/Inf values ignored",
                            v->name, (unsigned long long)obs[h].n_nonfinite);
            }
            if (!obs)
                st = opq_set_error(ctx, OPQ_ERR_INTERNAL, "activation '%s' was not observed",
                                   v->name);
            if (st != OPQ_OK)
                break;
            act_p[t] = qp[t];
            n_chs[t] = heads;
            axes[t]  = heads > 1 ? 1 : 0;
        }
    }
    // 4a'. Output-aware activation ranges, starting from the calibrated ones, measured on the
    // model quantized with them (each activation as its consumers see it in the quantized model).
    bool ranges_done = false;
    bool any_search = false;
    for (int t = 0; st == OPQ_OK && t < pl.n_targets; t++)
        any_search |= pl.targets[t].role == OPQ_QROLE_ACT &&
                      (o->act_search > 0 ||
                       (o->act_search < 0 && abits_of[t] < 8));
    if (st == OPQ_OK && any_search && o->act_search_samples > 0) {
        phase_end(rep, "ranges", t0);
        ranges_done = true;
        t0 = opq_now_s();
        st = search_ranges(ctx, model, src, &po, &pl, qp, n_chs, axes, abits_of, o, a_sym,
                           n_calib);
        if (st != OPQ_OK)
            goto out;
        phase_end(rep, "range search", t0);
        t0 = opq_now_s();
    }
    // 4b. Refinement (ERQ, reconstruction): may change float weights and biases, weight qparams
    // (and then leave weights on their grid) and activation qparams, before anything is encoded.
    if (st == OPQ_OK && o->refine) {
        if (!ranges_done)
            phase_end(rep, "ranges", t0);
        t0 = opq_now_s();
        struct opq_refine_ctx rc = {.ctx = ctx, .model = model, .opts = o, .pl = &pl, .qp = qp,
                                    .n_ch = n_chs, .axis = axes, .src = src, .n_calib = n_calib};
        if (o->refine_qmodel)
            st = quant_clone(ctx, model, src, &po, &pl, qp, n_chs, axes, abits_of, o->wbits, a_sym,
                             true, &rc.qmodel);
        if (st == OPQ_OK)
            st = o->refine(o->refine_user, &rc);
        opq_model_free(rc.qmodel);
        if (st == OPQ_OK)
            phase_end(rep, "refine", t0);
        t0 = opq_now_s();
    }
    // 4c. Encoding.
    for (int t = 0; t < pl.n_targets && st == OPQ_OK; t++) {
        struct opq_qtarget *tg = &pl.targets[t];
        struct opq_value *v = tg->value;
        struct opq_report_tensor *rt = &rep->tensors[rep->n_tensors++];
        rt->name   = strdup(v->name); // the report outlives the float clone and the model
        rt->weight = tg->role == OPQ_QROLE_WEIGHT;
        struct opq_qdq_spec spec = {.opset = opset, .n_ch = n_chs[t], .axis = axes[t], .p = qp[t]};
        if (tg->role == OPQ_QROLE_WEIGHT) {
            // the weight's own quantization error, from the pass that makes its codes
            double s2 = 0.0, e2 = 0.0;
            spec.bits      = o->wbits;
            spec.is_signed = true;
            spec.sig2      = &s2;
            spec.err2      = &e2;
            st = opq_qdq_quantize_weight(g, v, &spec, NULL);
            rt->sqnr_db = sqnr_db(s2, e2);
        } else {
            spec.bits      = abits_of[t];
            spec.is_signed = a_sym;
            st = insert_act(g, tg, &spec);
        }
        rt->bits       = spec.bits;
        rt->n_ch       = spec.n_ch;
        rt->scale_min  = rt->scale_max = spec.p[0].scale;
        rt->zero_point = spec.p[0].zero_point;
        for (int c = 1; c < spec.n_ch; c++) {
            rt->scale_min = fminf(rt->scale_min, spec.p[c].scale);
            rt->scale_max = fmaxf(rt->scale_max, spec.p[c].scale);
        }
    }
    if (st != OPQ_OK)
        goto out;
    for (int i = 0; i < g->n_nodes; i++)
        for (int q = 0; q < pl.n_qnodes; q++)
            if (g->nodes[i] == pl.qnodes[q])
                g->nodes[i]->flags |= OPQ_NF_QUANTIZED;
    if ((st = opq_graph_cleanup(g)) != OPQ_OK || (st = opq_graph_sort(g)) != OPQ_OK ||
        (st = opq_graph_verify(g)) != OPQ_OK)
        goto out;
    // What --target trt writes must build in TensorRT: a broken rule here is our bug.
    if (trt && opq_trt_check(ctx, model) != OPQ_OK) {
        char msg[OPQ_ERRMSG_MAX];
        snprintf(msg, sizeof(msg), "%s", opq_ctx_errmsg(ctx));
        opq_ctx_clear_error(ctx);
        st = opq_set_error(ctx, OPQ_ERR_INTERNAL, "--target trt output failed its check: %s", msg);
        goto out;
    }
    phase_end(rep, "encode", t0);

    // 5. Report on held-out samples.
    if (holdout > 0 && report_out) {
        t0 = opq_now_s();
        st = evaluate(ctx, fmodel, model, src, n_calib, holdout, o->batch, &pl, act_p, n_chs, rep);
        if (st != OPQ_OK)
            goto out;
        phase_end(rep, "report", t0);
    }
out:
    if (qp)
        for (int t = 0; t < pl.n_targets; t++)
            free(qp[t]);
    free(qp);
    free(act_p);
    free(n_chs);
    free(axes);
    free(abits_of);
    free(ob.names);
    free(ob.first);
    free(ob.heads);
    free(ob.obs);
    opq_strmap_free(ob.index);
    opq_threadpool_free(ob.pool);
    reparam_sites_free(&rsites);
    opq_calib_close(src);
    opq_model_free(fmodel);
    if (st == OPQ_OK && report_out)
        *report_out = rep;
    else
        opq_report_free(rep);
    return st;
}

void opq_report_free(struct opq_report *r) {
    if (!r)
        return;
    for (int i = 0; i < r->n_tensors; i++)
        free((char *)r->tensors[i].name);
    for (int i = 0; i < r->n_blocks; i++)
        free((char *)r->blocks[i].name);
    free(r->tensors);
    free(r->blocks);
    free(r->layers);
    free(r);
}

// JSON string with escapes.
static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static void json_num(FILE *f, double v) {
    if (isfinite(v))
        fprintf(f, "%.6g", v);
    else
        fputs("null", f);
}

enum opq_status opq_report_write_json(struct opq_ctx *ctx, const struct opq_report *r,
                                      const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot write the report", path);
    fputs("{\n  \"settings\": ", f);
    json_str(f, r->settings);
    fprintf(f, ",\n  \"quantized_nodes\": %d,\n  \"excluded_nodes\": %d,\n"
               "  \"reparameterized_layernorms\": %d,\n  \"calibration_samples\": %d,\n",
            r->n_qnodes, r->n_excluded, r->n_reparam, r->n_calib);
    fputs("  \"end_to_end\": ", f);
    if (r->have_eval) {
        fprintf(f, "{\"samples\": %d, \"logits_sqnr_db\": ", r->n_eval);
        json_num(f, r->logits_sqnr_db);
        fputs(", \"logits_kl\": ", f);
        json_num(f, r->logits_kl);
        fputs(", \"top1_agreement\": ", f);
        json_num(f, r->top1_agreement);
        fputs("},\n", f);
    } else {
        fputs("null,\n", f);
    }
    fputs("  \"tensors\": [\n", f);
    for (int i = 0; i < r->n_tensors; i++) {
        const struct opq_report_tensor *t = &r->tensors[i];
        fputs("    {\"name\": ", f);
        json_str(f, t->name);
        fprintf(f, ", \"kind\": \"%s\", \"bits\": %d, \"channels\": %d, \"scale_min\": ",
                t->weight ? "weight" : "activation", t->bits, t->n_ch);
        json_num(f, (double)t->scale_min);
        fputs(", \"scale_max\": ", f);
        json_num(f, (double)t->scale_max);
        fprintf(f, ", \"zero_point\": %d, \"sqnr_db\": ", t->zero_point);
        json_num(f, t->sqnr_db);
        fprintf(f, "}%s\n", i + 1 < r->n_tensors ? "," : "");
    }
    fputs("  ],\n  \"blocks\": [\n", f);
    for (int i = 0; i < r->n_blocks; i++) {
        fputs("    {\"output\": ", f);
        json_str(f, r->blocks[i].name);
        fputs(", \"sqnr_db\": ", f);
        json_num(f, r->blocks[i].sqnr_db);
        fprintf(f, "}%s\n", i + 1 < r->n_blocks ? "," : "");
    }
    if (r->n_layers) { // a refinement method's per-layer errors (ERQ)
        fputs("  ],\n  \"layers\": [\n", f);
        for (int i = 0; i < r->n_layers; i++) {
            const struct opq_report_layer *l = &r->layers[i];
            fputs("    {\"name\": ", f);
            json_str(f, l->name);
            fprintf(f, ", \"in\": %d, \"out\": %d, \"duq_outliers\": %d, \"err_before\": ",
                    l->d_in, l->d_out, l->n_outliers);
            json_num(f, l->err_before);
            fputs(", \"err_aqer\": ", f);
            json_num(f, l->err_aqer);
            fputs(", \"err_wqer\": ", f);
            json_num(f, l->err_wqer);
            fputs(", \"err_rtn\": ", f);
            json_num(f, l->err_rtn);
            fprintf(f, "}%s\n", i + 1 < r->n_layers ? "," : "");
        }
    }
    fputs("  ],\n  \"phases\": [\n", f);
    for (int i = 0; i < r->n_phases; i++) {
        fputs("    {\"name\": ", f);
        json_str(f, r->phases[i].name);
        fputs(", \"seconds\": ", f);
        json_num(f, r->phases[i].seconds);
        fprintf(f, ", \"peak_rss_kb\": %ld}%s\n", r->phases[i].peak_rss_kb,
                i + 1 < r->n_phases ? "," : "");
    }
    fputs("  ]\n}\n", f);
    bool bad = ferror(f) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        remove(tmp);
        return opq_set_error(ctx, OPQ_ERR_IO, "%s: cannot write the report", path);
    }
    return OPQ_OK;
}
