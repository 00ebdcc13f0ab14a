/* recon.c: the block-reconstruction engine (see recon.h for the method). Layout of this file:
 * graph analysis (units, sub-ranges, quantizers), unit forward/backward around the executor,
 * losses and output weights, the training loop, checkpoints, and the refine hook. */
#define _POSIX_C_SOURCE 200809L
#include "recon/recon.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include "calib_data.h"
#include "graph.h"
#include "quant/placement.h"
#include "quantize.h"
#include "recognize.h"
#include "recon/actq.h"
#include "rng.h"
#include "threadpool.h"

void opq_recon_report_free(struct opq_recon_report *r) {
    if (!r)
        return;
    free(r->units);
    r->units = NULL;
    r->n_units = 0;
}

// Training-step phases timed by the engine (logged per unit at debug level).
enum tm_phase { TM_BATCH, TM_WEIGHTS, TM_RECORD, TM_SITE_FWD, TM_LOSS, TM_SWEEP, TM_SITE_BWD,
                TM_UPDATE, TM_COUNT };
static const char *const tm_names[TM_COUNT] = {"batch",   "weights", "record", "site-fwd",
                                               "loss",    "sweep",   "site-bwd", "update"};

// ---- state --------------------------------------------------------------------------------------

enum wmode { W_FLOAT = 0, W_SOFT, W_HARD };
enum amode { A_OFF = 0, A_HARD, A_SOFT };

// An activation quantizer of the current unit (per tensor, or per channel along rc->axis[t]).
struct site {
    int t;                  // placement target
    int vi;                 // value index
    int prod;               // producer node index; -1: the unit input
    struct opq_qparams *qp; // rc->qp[t][n_ch]: scales written back when hardening
    int n_ch;
    size_t inner;   // elements after the channel axis (per tensor: all)
    float *scale;   // [n_ch] trained step sizes
    float *m, *v;   // [n_ch] Adam state
    float *gs;      // [n_ch] gradient of the current iteration
    double *dscale; // [n_ch] its accumulation
    const float *x; // pre-quantization values of the batch (borrowed: a tape value or the input)
    uint8_t *keep;  // QDrop: 1 where the element is quantized in this iteration
    float *lo, *hi; // [n_ch] code range relative to the zero point
    double *parts;  // backward scratch (opq_actq_n_parts)
    struct opq_actq aq;
};

// A weight with its rounding parameters: AdaRound (alpha per element) or FlexRound (fr.theta;
// then m and v2 are its Adam state and gacc its gradient).
struct wparam {
    int t;
    struct opq_value *v;
    size_t n, inner;
    int n_ch;
    struct opq_qparams *qp; // n_ch entries (FlexRound writes the learned grid into the scales)
    float *w0;              // the model's float data
    float *wq;              // quantized values handed to the executor
    float *base;            // floor(w0 / s)
    float *alpha, *m, *v2, *g, *dwda;
    float *h, *dh; // AdaRound: h(alpha) and h'(alpha) of the last soft forward
    struct opq_flexround fr;
    double *gacc;
    bool gw; // g holds this step's gradient (else it is zero)
    // AdaRound: the grid per channel as floats (scales, zero points, qmin, qmax: 4 x n_ch)
    float *chq;
    bool soft_ok; // wq, h, dh, dwda are the soft weights of the current alpha
};

struct sub {
    int first, last;
    int *ext; // values read from outside the sub-range (no initializers)
    int n_ext;
    int *outs; // values produced here and read after it (or the unit output)
    int n_outs;
    int *wts; // wparam indices read here
    int n_wts;
    struct opq_exec_tape *tape; // the recorded forward of this iteration (e->tapes[its index])
    int wrt_vi[128];            // its gradient targets: value index, or -1 - wparam index
    int n_wrt, n_val;           // targets, of which values (the rest are weights)
};

struct unit {
    int first, last;
    char name[64];
    int in_vi, out_vi;
    struct sub *subs;
    int n_subs;
    struct site *sites;
    int n_sites;
    struct wparam *wps;
    int n_wps;
};

struct eng {
    struct opq_ctx *ctx;
    struct opq_refine_ctx *rc;
    const struct opq_recon_opts *o;
    struct opq_graph *g;
    struct opq_exec *ex;
    int B, N;
    bool *dyn;      // per value
    int *site_of;   // per value: site index + 1 in the current unit
    void **fwd;     // per value: one batch of data (quantized activations)
    void **cur;     // per value: its data in the last unit_forward (borrowed: fwd or a tape)
    float **grd;    // per value: its gradient
    bool *gw;       // per value: this step's gradient is in gcur (else it is zero)
    float **gcur;   // per value: this step's gradient (borrowed: grd or a tape's result)
    size_t *bbytes; // per value: bytes of one batch
    bool *isf;      // per value: float (gets a gradient buffer)
    struct unit *units;
    int n_units;
    int logits_vi;
    int64_t K;        // classes
    float *logits_fp; // N * K (Fisher)
    struct opq_rng rng;
    uint64_t fingerprint;
    float **aph; // per unit: its APH output weights from the shared pass (NULL: none)
    // The APH computations record the float model from a unit's output to the logits on a tape
    // (every value of that range); at the training batch that is what a ViT-S/16 at batch 32
    // cannot hold (16.5 GB measured). They run on aph_ex, planned at the largest batch aph_b
    // dividing B whose tape fits APH_TAPE_BYTES (aph_ex == ex when B fits: the small models).
    struct opq_exec *aph_ex;
    int aph_b;
    // Under --time-budget, the per-unit APH (more than OPQ_RECON_APH_MAX_EXACT classes) is the
    // largest fixed cost of a unit and grows with the depth of the model after it: its measured
    // cost (seconds per sample per node after the unit) sizes the samples it takes, and the
    // iterations leave room for the APH of the units still to come.
    double t_start;  // the budget's start
    double aph_cost; // 0 until measured
    int aph_n;       // samples of the latest per-unit APH
    double tm[TM_COUNT]; // training time per phase (seconds, current unit)
    // Tapes by sub-range position, shared by all units: block after block records the same
    // sizes, so their arenas' chunks are reused, never mapped and faulted in again.
    struct opq_exec_tape **tapes;
    int max_subs;
    // Large buffers a unit gave back (same sizes block after block), taken again by the next.
    struct spare {
        void *p;
        size_t n;
    } *spares;
    int n_spares, cap_spares;
    uint32_t *bat_j;         // [B] training batch: samples
    struct opq_rng *bat_rng; // [B] and where their QDrop coins start
};

#define APH_TAPE_BYTES ((size_t)1 << 30)

static enum opq_status aph_exec_setup(struct eng *e);
static void aph_exec_free(struct eng *e);

static enum opq_status nomem(struct opq_ctx *ctx) {
    return opq_set_error(ctx, OPQ_ERR_NOMEM, "reconstruction: out of memory");
}

// The model input's shape for an executor plan at batch b (no data).
static struct opq_named_tensor input_shape(const struct eng *e, int b) {
    const struct opq_tensor *s = opq_calib_sample_shape(e->rc->src, 0);
    struct opq_named_tensor shape = {.name = opq_calib_input_name(e->rc->src, 0), .t = *s};
    shape.t.ndim     = s->ndim + 1;
    shape.t.shape[0] = b;
    memcpy(&shape.t.shape[1], s->shape, sizeof(int64_t) * (size_t)s->ndim);
    shape.t.data = NULL;
    return shape;
}

static int node_pos(const struct opq_node *n) {
    return n ? n->index : -1;
}

// A named tensor for value vi with the planned shape and the given data.
static struct opq_named_tensor named(const struct eng *e, int vi, void *data) {
    const struct opq_value *v = e->g->values[vi];
    struct opq_named_tensor nt = {.name = v->name, .t = *opq_exec_value(e->ex, v->name)};
    nt.t.data = data;
    return nt;
}

// Adds the time since *t0 to phase ph and restarts *t0.
static void tm_add(struct eng *e, enum tm_phase ph, double *t0) {
    double t = opq_now_s();
    e->tm[ph] += t - *t0;
    *t0 = t;
}

// ---- buffers kept from unit to unit -------------------------------------------------------------

// A buffer of n bytes: a spare of exactly that size if there is one (zeroed if asked), else a
// new one. NULL when out of memory.
static void *spare_get(struct eng *e, size_t n, bool zero) {
    for (int i = e->n_spares - 1; i >= 0; i--) {
        if (e->spares[i].n != n)
            continue;
        void *p = e->spares[i].p;
        e->spares[i] = e->spares[--e->n_spares];
        if (zero)
            memset(p, 0, n);
        return p;
    }
    return zero ? calloc(1, n) : malloc(n);
}

// Gives p (n bytes, from spare_get or malloc; NULL is ignored) back for the next unit.
static void spare_put(struct eng *e, void *p, size_t n) {
    if (!p)
        return;
    if (e->n_spares == e->cap_spares) {
        free(p);
        return;
    }
    e->spares[e->n_spares++] = (struct spare){p, n};
}

// Frees the spares nobody took.
static void spare_trim(struct eng *e) {
    for (int i = 0; i < e->n_spares; i++)
        free(e->spares[i].p);
    e->n_spares = 0;
}

// ---- graph analysis -----------------------------------------------------------------------------

// Values that change from run to run: graph inputs, trainable weights and what depends on them
// (Shape/Size/Constant results are folded at plan time whatever their inputs).
static void mark_dynamic(struct eng *e) {
    struct opq_graph *g = e->g;
    for (int i = 0; i < g->n_values; i++) {
        uint32_t k = g->values[i]->kind;
        e->dyn[i] = ((k & OPQ_VK_INPUT) && !(k & OPQ_VK_INIT)) || (k & OPQ_VK_PARAM);
    }
    for (int i = 0; i < g->n_nodes; i++) {
        struct opq_node *n = g->nodes[i];
        if (n->op == OPQ_OP_SHAPE || n->op == OPQ_OP_SIZE || n->op == OPQ_OP_CONSTANT)
            continue;
        bool d = false;
        for (int j = 0; j < n->n_inputs; j++)
            d = d || (n->inputs[j] && e->dyn[n->inputs[j]->index]);
        for (int j = 0; j < n->n_outputs && d; j++)
            if (n->outputs[j])
                e->dyn[n->outputs[j]->index] = true;
    }
}

// True if value v (produced before node `first`) is read by a node at index >= first.
static bool read_from(const struct opq_value *v, int first, int last) {
    for (int u = 0; u < v->n_users; u++) {
        int p = v->users[u]->index;
        if (p >= first && p <= last)
            return true;
    }
    return false;
}

// Appends vi to a small set (arrays sized by the caller).
static void set_add(int *a, int *n, int vi) {
    for (int i = 0; i < *n; i++)
        if (a[i] == vi)
            return;
    a[(*n)++] = vi;
}

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

// The one dynamic value crossing into node `first` from before it.
static enum opq_status state_at(struct eng *e, int first, int *vi) {
    struct opq_graph *g = e->g;
    int found = -1;
    for (int i = 0; i < g->n_values; i++) {
        struct opq_value *v = g->values[i];
        if (!e->dyn[i] || (v->kind & OPQ_VK_INIT))
            continue;
        if (node_pos(v->producer) >= first)
            continue;
        if (!read_from(v, first, g->n_nodes - 1))
            continue;
        if (found >= 0)
            return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                 "reconstruction: more than one value crosses into node %d "
                                 "('%s' and '%s'); units need a single input",
                                 first, g->values[found]->name, v->name);
        found = i;
    }
    if (found < 0)
        return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                             "reconstruction: no value crosses into node %d", first);
    *vi = found;
    return OPQ_OK;
}

static enum opq_status build_unit(struct eng *e, struct unit *U, int ui) {
    struct opq_refine_ctx *rc = e->rc;
    struct opq_graph *g = e->g;
    struct opq_placement *pl = rc->pl;
    enum opq_status st;
    if ((st = state_at(e, U->first, &U->in_vi)) != OPQ_OK)
        return st;
    if (U->last == g->n_nodes - 1) {
        U->out_vi = e->logits_vi;
    } else if ((st = state_at(e, U->last + 1, &U->out_vi)) != OPQ_OK) {
        return st;
    }
    int op = node_pos(g->values[U->out_vi]->producer);
    if (op < U->first || op > U->last)
        return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                             "reconstruction: unit %d (nodes %d..%d) does not produce '%s'", ui,
                             U->first, U->last, g->values[U->out_vi]->name);
    // quantizers
    U->sites = calloc((size_t)pl->n_targets + 1, sizeof(*U->sites));
    U->wps = calloc((size_t)pl->n_targets + 1, sizeof(*U->wps));
    int *splits = calloc((size_t)pl->n_targets + 2, sizeof(int));
    if (!U->sites || !U->wps || !splits) {
        free(splits);
        return nomem(e->ctx);
    }
    int n_splits = 0;
    for (int t = 0; t < pl->n_targets; t++) {
        struct opq_qtarget *tg = &pl->targets[t];
        bool in_unit = false;
        for (int c = 0; c < tg->n_consumers; c++)
            in_unit = in_unit ||
                      (tg->consumers[c]->index >= U->first && tg->consumers[c]->index <= U->last);
        if (!in_unit)
            continue;
        struct opq_value *v = tg->value;
        if (tg->role == OPQ_QROLE_WEIGHT) {
            struct wparam *w = &U->wps[U->n_wps++];
            w->t = t;
            w->v = v;
            w->n_ch = rc->n_ch[t];
            w->qp = rc->qp[t];
            w->w0 = v->t.data; // the model's buffer: hardened weights are written here
            if (!opq_tensor_numel(&v->t, &w->n) || v->t.dtype != OPQ_DTYPE_FLOAT) {
                free(splits);
                return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                     "reconstruction: weight '%s' is not a float tensor", v->name);
            }
            w->inner = 1;
            if (w->n_ch > 1)
                for (int d = rc->axis[t] + 1; d < v->t.ndim; d++)
                    w->inner *= (size_t)v->t.shape[d];
            continue;
        }
        struct site *s = &U->sites[U->n_sites++];
        s->t = t;
        s->vi = v->index;
        s->qp = rc->qp[t];
        s->n_ch = rc->n_ch[t] > 0 ? rc->n_ch[t] : 1;
        s->prod = node_pos(v->producer);
        if (s->prod < U->first) {
            if (v->index != U->in_vi && e->dyn[v->index]) {
                free(splits);
                return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                     "reconstruction: activation '%s' is quantized in unit '%s' "
                                     "but computed before it",
                                     v->name, U->name);
            }
            if (!e->dyn[v->index]) { // a constant input of a quantized op: nothing to learn
                U->n_sites--;
                continue;
            }
            s->prod = -1;
        } else {
            // every reader of a quantized value inside the unit must be a quantized consumer
            for (int u = 0; u < v->n_users; u++) {
                struct opq_node *r = v->users[u];
                if (r->index < U->first || r->index > U->last || r->op == OPQ_OP_SHAPE ||
                    r->op == OPQ_OP_SIZE)
                    continue;
                bool q = false;
                for (int c = 0; c < tg->n_consumers; c++)
                    q = q || tg->consumers[c] == r;
                for (int c = 0; c < tg->n_readers; c++)
                    q = q || tg->readers[c] == r;
                if (!q) {
                    free(splits);
                    return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                         "reconstruction: activation '%s' feeds both quantized "
                                         "and float nodes (node '%s')",
                                         v->name, r->name);
                }
            }
            if (s->prod < U->last)
                splits[n_splits++] = s->prod;
        }
    }
    qsort(splits, (size_t)n_splits, sizeof(int), cmp_int);
    U->subs = calloc((size_t)n_splits + 1, sizeof(*U->subs));
    if (!U->subs) {
        free(splits);
        return nomem(e->ctx);
    }
    int start = U->first;
    for (int i = 0; i <= n_splits; i++) {
        int end = i < n_splits ? splits[i] : U->last;
        if (end < start)
            continue;
        U->subs[U->n_subs++] = (struct sub){.first = start, .last = end};
        start = end + 1;
    }
    free(splits);
    // sub-range inputs and outputs
    for (int r = 0; r < U->n_subs; r++) {
        struct sub *S = &U->subs[r];
        int cap = 0;
        for (int i = S->first; i <= S->last; i++)
            cap += g->nodes[i]->n_inputs + g->nodes[i]->n_outputs;
        S->ext = calloc((size_t)cap + 1, sizeof(int));
        S->outs = calloc((size_t)cap + 2, sizeof(int));
        S->wts = calloc((size_t)U->n_wps + 1, sizeof(int));
        if (!S->ext || !S->outs || !S->wts)
            return nomem(e->ctx);
        for (int i = S->first; i <= S->last; i++) {
            struct opq_node *n = g->nodes[i];
            for (int j = 0; j < n->n_inputs; j++) {
                struct opq_value *v = n->inputs[j];
                if (!v || !e->dyn[v->index])
                    continue;
                if (v->kind & OPQ_VK_INIT) {
                    for (int w = 0; w < U->n_wps; w++)
                        if (U->wps[w].v == v)
                            set_add(S->wts, &S->n_wts, w);
                    continue;
                }
                if (node_pos(v->producer) < S->first)
                    set_add(S->ext, &S->n_ext, v->index);
            }
            for (int j = 0; j < n->n_outputs; j++) {
                struct opq_value *v = n->outputs[j];
                if (!v || !e->dyn[v->index])
                    continue;
                if (v->index == U->out_vi || read_from(v, S->last + 1, g->n_nodes - 1))
                    set_add(S->outs, &S->n_outs, v->index);
            }
        }
    }
    return OPQ_OK;
}

static void free_units(struct eng *e) {
    for (int u = 0; u < e->n_units; u++) {
        struct unit *U = &e->units[u];
        for (int r = 0; r < U->n_subs; r++) {
            free(U->subs[r].ext);
            free(U->subs[r].outs);
            free(U->subs[r].wts);
        }
        free(U->subs);
        free(U->sites);
        free(U->wps);
    }
    free(e->units);
}

// Units: cut the node list at the first node of every block and after its last node.
static enum opq_status find_units(struct eng *e) {
    struct opq_graph *g = e->g;
    struct opq_recognized *rec = NULL;
    enum opq_status st = opq_recognize(e->ctx, g, &rec);
    if (st != OPQ_OK)
        return st;
    int *cuts = calloc((size_t)rec->n_items * 2 + 2, sizeof(int));
    if (!cuts) {
        opq_recognized_free(rec);
        return nomem(e->ctx);
    }
    int nc = 0;
    cuts[nc++] = 0;
    for (int i = 0; i < rec->n_items; i++) {
        if (rec->items[i].kind != OPQ_PAT_BLOCK)
            continue;
        cuts[nc++] = rec->items[i].first;
        if (rec->items[i].last + 1 < g->n_nodes)
            cuts[nc++] = rec->items[i].last + 1;
    }
    qsort(cuts, (size_t)nc, sizeof(int), cmp_int);
    e->units = calloc((size_t)nc + 1, sizeof(*e->units));
    if (!e->units) {
        free(cuts);
        opq_recognized_free(rec);
        return nomem(e->ctx);
    }
    int n_blocks = 0;
    for (int i = 0; i < nc; i++) {
        if (i > 0 && cuts[i] == cuts[i - 1])
            continue;
        int end = (i + 1 < nc) ? cuts[i + 1] - 1 : g->n_nodes - 1;
        for (int k = i + 1; k < nc && cuts[k] == cuts[i]; k++)
            end = (k + 1 < nc) ? cuts[k + 1] - 1 : g->n_nodes - 1;
        struct unit *U = &e->units[e->n_units++];
        U->first = cuts[i];
        U->last = end;
        bool block = false;
        for (int k = 0; k < rec->n_items; k++)
            block =
                block || (rec->items[k].kind == OPQ_PAT_BLOCK && rec->items[k].first == U->first);
        if (block)
            snprintf(U->name, sizeof(U->name), "block %d", n_blocks++);
        else if (U->first == 0)
            snprintf(U->name, sizeof(U->name), "embedding");
        else if (U->last == g->n_nodes - 1)
            snprintf(U->name, sizeof(U->name), "head");
        else
            snprintf(U->name, sizeof(U->name), "between %d", n_blocks);
    }
    free(cuts);
    opq_recognized_free(rec);
    // a range that does not produce the value crossing out of it (e.g. shape arithmetic between
    // two Swin blocks) carries no state: it joins the unit after it
    for (int u = 0; u + 1 < e->n_units;) {
        int vi;
        struct unit *U = &e->units[u];
        if ((st = state_at(e, U->last + 1, &vi)) != OPQ_OK)
            return st;
        int op = node_pos(g->values[vi]->producer);
        if (op >= U->first && op <= U->last) {
            u++;
            continue;
        }
        e->units[u + 1].first = U->first;
        memmove(U, U + 1, sizeof(*U) * (size_t)(e->n_units - u - 1));
        e->n_units--;
    }
    if (e->n_units == 1) // no block recognized: the whole model is one unit
        snprintf(e->units[0].name, sizeof(e->units[0].name), "model");
    for (int u = 0; u < e->n_units; u++)
        if ((st = build_unit(e, &e->units[u], u)) != OPQ_OK)
            return st;
    return OPQ_OK;
}

// The batch buffers of the values crossing U's sub-ranges (grd: float values only), allocated
// while U is processed and freed after it, so memory follows one unit, not the whole model.
static enum opq_status unit_bufs(struct eng *e, struct unit *U, bool on) {
    for (int r = -1; r < U->n_subs; r++) {
        const struct sub *S = r >= 0 ? &U->subs[r] : NULL;
        int n = S ? S->n_ext + S->n_outs : 2;
        for (int i = 0; i < n; i++) {
            int vi = !S ? (i ? U->out_vi : U->in_vi)
                        : (i < S->n_ext ? S->ext[i] : S->outs[i - S->n_ext]);
            if (!on) {
                spare_put(e, e->fwd[vi], e->bbytes[vi] + 1);
                spare_put(e, e->grd[vi], e->bbytes[vi] + 1);
                e->fwd[vi] = NULL;
                e->grd[vi] = NULL;
                continue;
            }
            // contents are written before they are read (zero_grads clears the gradients)
            if (!e->fwd[vi] && !(e->fwd[vi] = spare_get(e, e->bbytes[vi] + 1, false)))
                return nomem(e->ctx);
            if (e->isf[vi] && !e->grd[vi] &&
                !(e->grd[vi] = spare_get(e, e->bbytes[vi] + 1, false)))
                return nomem(e->ctx);
        }
    }
    return OPQ_OK;
}

// ---- unit forward / backward --------------------------------------------------------------------

// One opq_adaround_step over a range of a weight's elements (soft or hard weights, or the Adam
// step).
struct wjob {
    struct opq_adaround ar;
    struct opq_adaround_hyper hp;
};

static void adaround_range(void *user, int64_t i0, int64_t i1) {
    const struct wjob *j = user;
    opq_adaround_step(&j->ar, &j->hp, (size_t)i0, (size_t)i1);
}

// w's AdaRound arrays as opq_adaround_step sees them.
static struct opq_adaround ar_of(struct wparam *w) {
    int nc = w->n_ch > 1 ? w->n_ch : 1;
    return (struct opq_adaround){.n = w->n,
                                 .inner = w->inner,
                                 .n_ch = nc,
                                 .sc = w->chq,
                                 .z = w->chq + nc,
                                 .lo = w->chq + 2 * nc,
                                 .hi = w->chq + 3 * nc,
                                 .base = w->base,
                                 .alpha = w->alpha,
                                 .m = w->m,
                                 .v = w->v2,
                                 .g = w->g,
                                 .h = w->h,
                                 .dh = w->dh,
                                 .dwda = w->dwda,
                                 .wq = w->wq};
}

#define WGRAIN 16384 // weight elements per work item (element-wise: any split, same bytes)

static void set_weights(struct eng *e, struct unit *U, enum wmode wm) {
    for (int k = 0; k < U->n_wps; k++) {
        struct wparam *w = &U->wps[k];
        if (wm == W_FLOAT) {
            w->v->t.data = w->w0;
            continue;
        }
        if (e->o->rounding == OPQ_RECON_FLEXROUND) { // soft and hard alike (straight-through)
            opq_flexround_forward(&w->fr, w->qp, w->w0, w->wq, NULL);
            w->v->t.data = w->wq;
            continue;
        }
        if (wm == W_SOFT && w->soft_ok) { // the last update left them
            w->v->t.data = w->wq;
            continue;
        }
        struct wjob j = {.ar = ar_of(w),
                         .hp = {.mode = wm == W_SOFT ? OPQ_ADAROUND_SOFT : OPQ_ADAROUND_HARD}};
        opq_parallel_for(opq_exec_pool(e->ex), (int64_t)w->n, WGRAIN, adaround_range, &j);
        w->soft_ok = wm == W_SOFT;
        w->v->t.data = w->wq;
    }
}

// Bernoulli draws 8 bits at a time: true with probability thr / 256.
struct coin {
    uint32_t bits;
    int left;
};

static bool coin_flip(struct opq_rng *r, struct coin *c, uint32_t thr) {
    if (c->left == 0) {
        c->bits = opq_rng_u32(r);
        c->left = 4;
    }
    uint32_t b = c->bits & 0xffu;
    c->bits >>= 8;
    c->left--;
    return b < thr;
}

static uint32_t coin_threshold(float p) {
    return (uint32_t)lrintf(p * 256.0f);
}

// Fake quantization of site s from src into e->fwd[s->vi] (training: with quantizer dropping;
// src, kept for the backward, must stay unchanged until then).
static void site_forward(struct eng *e, struct site *s, const float *src, enum amode am) {
    bool train = am == A_SOFT;
    bool drop = train && e->o->qdrop;
    if (train)
        s->x = src;
    opq_actq_forward(opq_exec_pool(e->ex), &s->aq, src, e->fwd[s->vi], drop ? s->keep : NULL,
                     drop ? &e->rng : NULL, coin_threshold(e->o->drop_prob));
}

// dy (in place) -> dx, and the LSQ step-size gradient into s->dscale.
static void site_backward(struct eng *e, struct site *s) {
    opq_actq_backward(opq_exec_pool(e->ex), &s->aq, s->x, e->gcur[s->vi],
                      e->o->qdrop ? s->keep : NULL, s->parts, s->dscale);
}

// The data of value vi after this forward: its fake-quantized copy when it is a quantized site
// (am != A_OFF), else src itself.
static void *forward_value(struct eng *e, struct unit *U, int vi, void *src, enum amode am) {
    if (!e->site_of[vi] || am == A_OFF)
        return src;
    site_forward(e, &U->sites[e->site_of[vi] - 1], src, am);
    return e->fwd[vi];
}

// The gradient targets of sub-range S (values entering it that need a gradient, then its
// weights) into S->wrt_vi and their names into wrt.
static enum opq_status sub_wrt(struct eng *e, struct unit *U, struct sub *S, const char **wrt) {
    int n = 0;
    if (S->n_ext + S->n_wts > (int)ARRAY_SIZE(S->wrt_vi))
        return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                             "reconstruction: too many values cross nodes %d..%d", S->first,
                             S->last);
    for (int i = 0; i < S->n_ext; i++) {
        int vi = S->ext[i];
        if (!e->grd[vi] || (vi == U->in_vi && !e->site_of[vi]))
            continue;
        S->wrt_vi[n] = vi;
        wrt[n++] = e->g->values[vi]->name;
    }
    S->n_val = n;
    for (int i = 0; i < S->n_wts; i++) {
        S->wrt_vi[n] = -1 - S->wts[i];
        wrt[n++] = U->wps[S->wts[i]].v->name;
    }
    S->n_wrt = n;
    return OPQ_OK;
}

// Forward of unit U on one batch xin (planned input bytes). Result in e->cur[U->out_vi] (valid
// until the next forward). With `record`, the tapes also know the gradient targets, for
// unit_backward. Values crossing sub-ranges are read where they are (tapes, xin), never copied;
// only quantized sites get a buffer of their own (e->fwd).
static enum opq_status unit_forward(struct eng *e, struct unit *U, enum wmode wm, enum amode am,
                                    const float *xin, bool record) {
    enum opq_status st = OPQ_OK;
    double t0 = opq_now_s();
    set_weights(e, U, wm);
    tm_add(e, TM_WEIGHTS, &t0);
    e->cur[U->in_vi] = forward_value(e, U, U->in_vi, (void *)xin, am);
    tm_add(e, TM_SITE_FWD, &t0);
    struct opq_named_tensor prov[64];
    const char *wrt[128];
    for (int r = 0; r < U->n_subs && st == OPQ_OK; r++) {
        struct sub *S = &U->subs[r];
        if (S->n_ext > (int)ARRAY_SIZE(prov))
            return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                 "reconstruction: too many inputs to nodes %d..%d", S->first,
                                 S->last);
        for (int i = 0; i < S->n_ext; i++)
            prov[i] = named(e, S->ext[i], e->cur[S->ext[i]]);
        // every sub-range runs on its tape (the executor keeps no values between sub-ranges,
        // so the engine pins nothing and executor memory stays that of one sub-range)
        if (!e->tapes[r] && (st = opq_exec_tape_new(e->ex, &e->tapes[r])) != OPQ_OK)
            break;
        S->tape = e->tapes[r];
        S->n_wrt = 0;
        if (record && (st = sub_wrt(e, U, S, wrt)) != OPQ_OK)
            break;
        st = opq_exec_tape_record(S->tape, S->first, S->last, prov, S->n_ext, wrt, S->n_wrt);
        if (st != OPQ_OK)
            break;
        tm_add(e, TM_RECORD, &t0);
        for (int i = 0; i < S->n_outs; i++) {
            int vi = S->outs[i];
            const struct opq_tensor *t = opq_exec_tape_value(S->tape, e->g->values[vi]->name);
            e->cur[vi] = forward_value(e, U, vi, t->data, am);
        }
        tm_add(e, TM_SITE_FWD, &t0);
    }
    return st;
}

// Backward of the last recorded unit_forward given dL/d(output) in e->grd[U->out_vi]: weight
// gradients into wparam.g, step-size gradients into site.dscale.
static enum opq_status unit_backward(struct eng *e, struct unit *U) {
    struct opq_named_tensor seeds[64];
    struct opq_tensor grads[128];
    double t0 = opq_now_s();
    for (int r = U->n_subs - 1; r >= 0; r--) {
        struct sub *S = &U->subs[r];
        int n_seeds = 0;
        if (S->n_outs > (int)ARRAY_SIZE(seeds))
            return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                 "reconstruction: too many values cross nodes %d..%d", S->first,
                                 S->last);
        for (int i = 0; i < S->n_outs; i++) {
            int vi = S->outs[i];
            if (!e->grd[vi] || !e->gw[vi]) // no gradient reached it: zero
                continue;
            if (e->site_of[vi])
                site_backward(e, &U->sites[e->site_of[vi] - 1]);
            seeds[n_seeds++] = named(e, vi, e->gcur[vi]);
        }
        tm_add(e, TM_SITE_BWD, &t0);
        if (S->n_wrt == 0 || n_seeds == 0)
            continue;
        // the seeds' buffers are dead after this sweep (their values' gradients are complete):
        // the sweep starts in them instead of copying them
        enum opq_status st =
            opq_exec_tape_backward_in_place(S->tape, S->first, seeds, n_seeds, grads);
        if (st != OPQ_OK)
            return st;
        // a value's first gradient stays where the sweep left it (that tape is not swept
        // again this step); weight gradients go to the optimizer's buffers
        for (int i = 0; i < S->n_wrt; i++) {
            float *gsrc = grads[i].data;
            int w = S->wrt_vi[i];
            bool val = i < S->n_val;
            float *dst = val ? e->gcur[w] : U->wps[-1 - w].g;
            size_t n = val ? e->bbytes[w] / sizeof(float) : U->wps[-1 - w].n;
            bool *written = val ? &e->gw[w] : &U->wps[-1 - w].gw;
            if (!*written && val)
                e->gcur[w] = gsrc;
            else if (!*written)
                memcpy(dst, gsrc, sizeof(float) * n);
            else
                for (size_t k = 0; k < n; k++)
                    dst[k] += gsrc[k];
            *written = true;
        }
        tm_add(e, TM_SWEEP, &t0);
    }
    if (e->site_of[U->in_vi] && e->gw[U->in_vi])
        site_backward(e, &U->sites[e->site_of[U->in_vi] - 1]);
    for (int k = 0; k < U->n_wps; k++)
        if (!U->wps[k].gw)
            memset(U->wps[k].g, 0, sizeof(float) * U->wps[k].n);
    tm_add(e, TM_SITE_BWD, &t0);
    return OPQ_OK;
}

// ---- output weights -----------------------------------------------------------------------------

static void softmax_t(const float *z, int64_t K, double T, double *p) {
    double mx = -INFINITY, sum = 0.0;
    for (int64_t k = 0; k < K; k++)
        mx = fmax(mx, (double)z[k] / T);
    for (int64_t k = 0; k < K; k++) {
        p[k] = exp((double)z[k] / T - mx);
        sum += p[k];
    }
    for (int64_t k = 0; k < K; k++)
        p[k] /= sum;
}

// The reverse-mode seed of the APH's second sweep: seed = H_z u per sample, H_z = (diag(p) -
// p p^T) / T^2 the Hessian of the batch-mean KL at the float point (p, u: B rows of K).
static void hz_seed(const double *p, const double *u, int B, int64_t K, float T, float *seed) {
    for (int i = 0; i < B; i++) {
        const double *pi = p + (size_t)i * (size_t)K, *ui = u + (size_t)i * (size_t)K;
        double pu = 0.0;
        for (int64_t k = 0; k < K; k++)
            pu += pi[k] * ui[k];
        for (int64_t k = 0; k < K; k++)
            seed[(size_t)i * (size_t)K + (size_t)k] =
                (float)((pi[k] * ui[k] - pi[k] * pu) / ((double)T * (double)T * B));
    }
}

enum opq_status opq_recon_aph(struct opq_exec *ex, struct opq_graph *g, const char *out, int first,
                              int last, const float *O, int n, int B, float T, double *hbar) {
    struct opq_ctx *ctx = g->ctx;
    const struct opq_tensor *ot = opq_exec_value(ex, out);
    if (!ot || ot->dtype != OPQ_DTYPE_FLOAT || g->n_outputs < 1 || B <= 0 || n % B != 0)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "APH: bad arguments for '%s'", out ? out : "?");
    const char *lname = g->outputs[0]->name;
    const struct opq_tensor *lt = opq_exec_value(ex, lname);
    size_t per = ot->nbytes / sizeof(float) / (size_t)B;
    int64_t K = (int64_t)(lt->nbytes / sizeof(float)) / B;
    size_t nb = (size_t)B * (size_t)K;
    enum opq_status st = OPQ_OK;
    double *p = malloc(sizeof(double) * nb), *u = calloc(nb, sizeof(double));
    float *seed = malloc(sizeof(float) * nb), *z = malloc(sizeof(float) * nb);
    float *pert = malloc(ot->nbytes);
    if (!p || !u || !seed || !z || !pert) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "APH: out of memory");
        goto out;
    }
    memset(hbar, 0, sizeof(double) * per);
    for (int b0 = 0; b0 < n; b0 += B) {
        const float *Ob = O + (size_t)b0 * per;
        struct opq_named_tensor prov = {.name = out, .t = *ot};
        prov.t.data = (void *)Ob;
        if ((st = opq_exec_run_range(ex, first, last, &prov, 1)) != OPQ_OK)
            goto out;
        memcpy(z, opq_exec_value(ex, lname)->data, sizeof(float) * nb);
        for (int i = 0; i < B; i++)
            softmax_t(z + (size_t)i * (size_t)K, K, (double)T, p + (size_t)i * (size_t)K);
        struct opq_named_tensor sd = {.name = lname, .t = *lt};
        sd.t.data = seed;
        struct opq_tensor grad;
        // u = J . 1 (per sample)
        if (K <= OPQ_RECON_APH_MAX_EXACT) {
            for (int64_t c = 0; c < K; c++) {
                memset(seed, 0, sizeof(float) * nb);
                for (int i = 0; i < B; i++)
                    seed[(size_t)i * (size_t)K + (size_t)c] = 1.0f;
                st = opq_exec_backward(ex, first, last, &prov, 1, &sd, 1, &out, 1, &grad);
                if (st != OPQ_OK)
                    goto out;
                const float *G = grad.data;
                for (int i = 0; i < B; i++) {
                    double s = 0.0;
                    for (size_t k = 0; k < per; k++)
                        s += (double)G[(size_t)i * per + k];
                    u[(size_t)i * (size_t)K + (size_t)c] = s;
                }
            }
        } else {
            // central difference of the logits along the all-ones direction
            double ss = 0.0;
            for (size_t k = 0; k < per * (size_t)B; k++)
                ss += (double)Ob[k] * (double)Ob[k];
            double eps = 1e-2 * fmax(sqrt(ss / (double)(per * (size_t)B)), 1e-3);
            for (int sgn = 1; sgn >= -1; sgn -= 2) {
                for (size_t k = 0; k < per * (size_t)B; k++)
                    pert[k] = (float)((double)Ob[k] + sgn * eps);
                prov.t.data = pert;
                if ((st = opq_exec_run_range(ex, first, last, &prov, 1)) != OPQ_OK)
                    goto out;
                const float *zz = opq_exec_value(ex, lname)->data;
                for (size_t k = 0; k < nb; k++)
                    u[k] += sgn * (double)zz[k] / (2.0 * eps);
            }
            prov.t.data = (void *)Ob;
        }
        // v = H_z u, then h = |J^T v|
        hz_seed(p, u, B, K, T, seed);
        memset(u, 0, sizeof(double) * nb);
        st = opq_exec_backward(ex, first, last, &prov, 1, &sd, 1, &out, 1, &grad);
        if (st != OPQ_OK)
            goto out;
        const float *G = grad.data;
        for (int i = 0; i < B; i++)
            for (size_t k = 0; k < per; k++)
                hbar[k] += fabs((double)G[(size_t)i * per + k]);
    }
    for (size_t k = 0; k < per; k++)
        hbar[k] /= (double)n;
out:
    free(p);
    free(u);
    free(seed);
    free(z);
    free(pert);
    return st;
}

enum opq_status opq_recon_aph_many(struct opq_exec *ex, struct opq_graph *g, const char *in,
                                   const float *X, int n, int B, float T, const char *const *outs,
                                   const int *stops, int n_outs, double **hbar) {
    struct opq_ctx *ctx = g->ctx;
    const struct opq_tensor *it = opq_exec_value(ex, in);
    if (!it || g->n_outputs < 1 || B <= 0 || n % B != 0 || n_outs < 1)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "APH: bad arguments");
    const char *lname = g->outputs[0]->name;
    const struct opq_tensor *lt = opq_exec_value(ex, lname);
    int64_t K = (int64_t)(lt->nbytes / sizeof(float)) / B;
    if (K > OPQ_RECON_APH_MAX_EXACT)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "APH: %lld classes: use opq_recon_aph",
                             (long long)K);
    size_t nb = (size_t)B * (size_t)K, per_in = it->nbytes / sizeof(float) / (size_t)B;
    size_t *per = calloc((size_t)n_outs, sizeof(*per));
    double *p = malloc(sizeof(double) * nb);
    double *u = calloc(nb * (size_t)n_outs, sizeof(double));
    float *seed = malloc(sizeof(float) * nb);
    struct opq_tensor *grads = calloc((size_t)n_outs, sizeof(*grads));
    struct opq_exec_tape *tape = NULL;
    enum opq_status st = OPQ_OK;
    if (!per || !p || !u || !seed || !grads) {
        st = opq_set_error(ctx, OPQ_ERR_NOMEM, "APH: out of memory");
        goto out;
    }
    int lo = g->n_nodes;
    for (int j = 0; j < n_outs; j++) {
        const struct opq_tensor *ot = opq_exec_value(ex, outs[j]);
        if (!ot || ot->dtype != OPQ_DTYPE_FLOAT) {
            st = opq_set_error(ctx, OPQ_ERR_USAGE, "APH: '%s' is not a float value", outs[j]);
            goto out;
        }
        per[j] = ot->nbytes / sizeof(float) / (size_t)B;
        memset(hbar[j], 0, sizeof(double) * per[j]);
        lo = stops[j] < lo ? stops[j] : lo;
    }
    if ((st = opq_exec_tape_new(ex, &tape)) != OPQ_OK)
        goto out;
    struct opq_named_tensor sd = {.name = lname, .t = *lt};
    sd.t.data = seed;
    for (int b0 = 0; b0 < n; b0 += B) {
        struct opq_named_tensor prov = {.name = in, .t = *it};
        prov.t.data = (void *)(X + (size_t)b0 * per_in);
        st = opq_exec_tape_record(tape, 0, g->n_nodes - 1, &prov, 1, outs, n_outs);
        if (st != OPQ_OK)
            goto out;
        const float *z = opq_exec_tape_value(tape, lname)->data;
        for (int i = 0; i < B; i++)
            softmax_t(z + (size_t)i * (size_t)K, K, (double)T, p + (size_t)i * (size_t)K);
        // u_j = J_j . 1 for every value at once: one sweep per class
        for (int64_t c = 0; c < K; c++) {
            memset(seed, 0, sizeof(float) * nb);
            for (int i = 0; i < B; i++)
                seed[(size_t)i * (size_t)K + (size_t)c] = 1.0f;
            if ((st = opq_exec_tape_backward(tape, lo, &sd, 1, grads)) != OPQ_OK)
                goto out;
            for (int j = 0; j < n_outs; j++) {
                const float *G = grads[j].data;
                for (int i = 0; i < B; i++) {
                    double sum = 0.0;
                    for (size_t k = 0; k < per[j]; k++)
                        sum += (double)G[(size_t)i * per[j] + k];
                    u[(size_t)j * nb + (size_t)i * (size_t)K + (size_t)c] = sum;
                }
            }
        }
        // h_j = |J_j^T H_z u_j|: one sweep per value, down to its producer
        for (int j = 0; j < n_outs; j++) {
            hz_seed(p, u + (size_t)j * nb, B, K, T, seed);
            if ((st = opq_exec_tape_backward(tape, stops[j], &sd, 1, grads)) != OPQ_OK)
                goto out;
            const float *G = grads[j].data;
            for (int i = 0; i < B; i++)
                for (size_t k = 0; k < per[j]; k++)
                    hbar[j][k] += fabs((double)G[(size_t)i * per[j] + k]);
        }
    }
    for (int j = 0; j < n_outs; j++)
        for (size_t k = 0; k < per[j]; k++)
            hbar[j][k] /= (double)n;
out:
    opq_exec_tape_free(tape);
    free(per);
    free(p);
    free(u);
    free(seed);
    free(grads);
    return st;
}

// ---- the engine ---------------------------------------------------------------------------------

struct unit_data {
    size_t per_in, per_out; // floats per sample
    float *X, *Xq, *Y;      // N samples each
    float *hw;              // per_out (APH, MSE) or N * per_out (Fisher); NULL for the head
    bool hw_per_sample;
    bool head;
    float *xin, *ybat, *hbat; // one batch
};

// Loss on one batch (Yq in e->cur[out]); with dY != NULL also its gradient times `scale`.
static double unit_loss(struct eng *e, struct unit *U, struct unit_data *d, const float *Y,
                        const float *hw, float *dY, double scale) {
    const float *Yq = e->cur[U->out_vi];
    size_t n = (size_t)e->B * d->per_out;
    double L = 0.0;
    if (d->head) {
        int64_t K = (int64_t)d->per_out;
        double *p = malloc(sizeof(double) * 2 * (size_t)K);
        if (!p)
            return NAN;
        for (int i = 0; i < e->B; i++) {
            const float *y = Y + (size_t)i * (size_t)K, *yq = Yq + (size_t)i * (size_t)K;
            softmax_t(y, K, 1.0, p);
            softmax_t(yq, K, 1.0, p + K);
            for (int64_t k = 0; k < K; k++) {
                if (p[k] > 0.0)
                    L += p[k] * (log(p[k]) - log(fmax(p[K + k], 1e-300)));
                if (dY)
                    dY[(size_t)i * (size_t)K + (size_t)k] =
                        (float)(scale * (p[K + k] - p[k]) / e->B);
            }
        }
        free(p);
        return L / e->B;
    }
    for (size_t i = 0; i < n; i++) {
        double w = hw ? (double)hw[d->hw_per_sample ? i : i % d->per_out] : 1.0;
        double df = (double)Yq[i] - (double)Y[i];
        L += w * df * df;
        if (dY)
            dY[i] = (float)(scale * 2.0 * w * df / (double)n);
    }
    return L / (double)n;
}

static double sqnr_db(double sig, double noise) {
    if (noise <= 0.0)
        return 200.0;
    return 10.0 * log10(sig / noise);
}

// Runs U over all N samples of Xin in mode (wm, am); accumulates SQNR and loss against d->Y;
// Yout (optional) receives the outputs.
static enum opq_status unit_eval(struct eng *e, struct unit *U, struct unit_data *d, enum wmode wm,
                                 enum amode am, const float *Xin, float *Yout, double *sqnr,
                                 double *werr) {
    double sig = 0.0, noise = 0.0, L = 0.0;
    size_t nb_out = (size_t)e->B * d->per_out;
    for (int b0 = 0; b0 < e->N; b0 += e->B) {
        enum opq_status st = unit_forward(e, U, wm, am, Xin + (size_t)b0 * d->per_in, false);
        if (st != OPQ_OK)
            return st;
        const float *Yq = e->cur[U->out_vi];
        const float *Y = d->Y + (size_t)b0 * d->per_out;
        for (size_t i = 0; i < nb_out; i++) {
            double df = (double)Yq[i] - (double)Y[i];
            sig += (double)Y[i] * (double)Y[i];
            noise += df * df;
        }
        const float *hw = d->hw;
        if (hw && d->hw_per_sample)
            hw += (size_t)b0 * d->per_out;
        L += unit_loss(e, U, d, Y, hw, NULL, 0.0);
        if (Yout)
            memcpy(Yout + (size_t)b0 * d->per_out, Yq, sizeof(float) * nb_out);
    }
    *sqnr = sqnr_db(sig, noise);
    *werr = L / (double)(e->N / e->B);
    return OPQ_OK;
}

// Fisher weights: per sample (dKL/dO)^2 with O the float unit applied to the quantized input.
static enum opq_status fisher_weights(struct eng *e, struct unit *U, struct unit_data *d) {
    struct opq_graph *g = e->g;
    const char *lname = g->values[e->logits_vi]->name;
    const char *oname = g->values[U->out_vi]->name;
    size_t nbk = (size_t)e->B * (size_t)e->K;
    double T = (double)e->o->temp;
    float *seed = malloc(sizeof(float) * nbk);
    double *q = malloc(sizeof(double) * (size_t)e->K);
    double *p = malloc(sizeof(double) * (size_t)e->K);
    enum opq_status st = OPQ_OK;
    if (!seed || !q || !p) {
        st = nomem(e->ctx);
        goto out;
    }
    for (int b0 = 0; b0 < e->N && st == OPQ_OK; b0 += e->B) {
        if ((st = unit_forward(e, U, W_FLOAT, A_OFF, d->Xq + (size_t)b0 * d->per_in, false)) !=
            OPQ_OK)
            break;
        struct opq_named_tensor prov = named(e, U->out_vi, e->cur[U->out_vi]);
        if ((st = opq_exec_run_range(e->ex, U->last + 1, g->n_nodes - 1, &prov, 1)) != OPQ_OK)
            break;
        const float *z = opq_exec_value(e->ex, lname)->data;
        for (int i = 0; i < e->B; i++) {
            softmax_t(z + (size_t)i * (size_t)e->K, e->K, T, q);
            softmax_t(e->logits_fp + (size_t)(b0 + i) * (size_t)e->K, e->K, T, p);
            for (int64_t k = 0; k < e->K; k++)
                seed[(size_t)i * (size_t)e->K + (size_t)k] = (float)((q[k] - p[k]) / (T * e->B));
        }
        struct opq_named_tensor sd = named(e, e->logits_vi, seed);
        struct opq_tensor grad;
        st = opq_exec_backward(e->ex, U->last + 1, g->n_nodes - 1, &prov, 1, &sd, 1, &oname, 1,
                               &grad);
        if (st != OPQ_OK)
            break;
        const float *G = grad.data;
        for (size_t k = 0; k < (size_t)e->B * d->per_out; k++)
            d->hw[(size_t)b0 * d->per_out + k] = G[k] * G[k];
    }
out:
    free(seed);
    free(q);
    free(p);
    return st;
}

// Nodes after unit u's output, summed over the units from `from` on whose APH is computed per
// unit (all but the logits).
static double aph_depth(const struct eng *e, int from) {
    double d = 0.0;
    for (int u = from; u < e->n_units; u++)
        if (e->units[u].out_vi != e->logits_vi)
            d += (double)(e->g->n_nodes - 1 - e->units[u].last);
    return d;
}

static double budget_left(const struct eng *e) {
    double since = e->o->budget_start > 0.0 ? e->o->budget_start : e->t_start;
    return e->o->time_budget * 60.0 - (opq_now_s() - since);
}

// Samples of unit U's APH (a multiple of aph_b): all of them without a time budget; with one,
// as many as keep the APH of this and the later units within 40% of the time left, from the
// cost measured on the previous unit (the first unit measures on at most 32).
static int aph_budget_samples(struct eng *e, const struct unit *U) {
    if (e->o->time_budget <= 0.0)
        return e->N;
    int u = (int)(U - e->units);
    double n = e->aph_cost > 0.0 ? 0.4 * budget_left(e) / (e->aph_cost * aph_depth(e, u)) : 32.0;
    int b = e->aph_b, k = n < (double)e->N ? (int)n / b * b : e->N;
    if (k < b)
        k = b;
    if (k < e->N)
        opq_log(e->ctx, OPQ_LOG_INFO, "time budget: APH of %s on %d of %d samples", U->name, k,
                e->N);
    return k;
}

static enum opq_status output_weights(struct eng *e, struct unit *U, struct unit_data *d) {
    if (d->head)
        return OPQ_OK;
    enum opq_recon_loss l = e->o->loss;
    d->hw_per_sample = l == OPQ_RECON_LOSS_FISHER;
    size_t n = d->hw_per_sample ? (size_t)e->N * d->per_out : d->per_out;
    d->hw = malloc(sizeof(float) * n);
    if (!d->hw)
        return nomem(e->ctx);
    if (l == OPQ_RECON_LOSS_MSE) {
        for (size_t i = 0; i < n; i++)
            d->hw[i] = 1.0f;
        return OPQ_OK;
    }
    if (l == OPQ_RECON_LOSS_FISHER)
        return fisher_weights(e, U, d);
    if (e->aph && e->aph[U - e->units]) {
        memcpy(d->hw, e->aph[U - e->units], sizeof(float) * n);
        opq_recon_aph_floor(d->hw, n, e->o->aph_floor);
        return OPQ_OK;
    }
    double *h = malloc(sizeof(double) * d->per_out);
    if (!h)
        return nomem(e->ctx);
    enum opq_status st = aph_exec_setup(e);
    int n_aph = st == OPQ_OK ? aph_budget_samples(e, U) : e->N;
    double ta = opq_now_s();
    if (st == OPQ_OK)
        st = opq_recon_aph(e->aph_ex, e->g, e->g->values[U->out_vi]->name, U->last + 1,
                           e->g->n_nodes - 1, d->Y, n_aph, e->aph_b, e->o->temp, h);
    if (st == OPQ_OK) {
        e->aph_cost = (opq_now_s() - ta) / ((double)n_aph * (double)(e->g->n_nodes - 1 - U->last));
        e->aph_n    = n_aph;
    }
    aph_exec_free(e); // planned again for the next unit: training does not hold its tape memory
    for (size_t i = 0; st == OPQ_OK && i < d->per_out; i++)
        d->hw[i] = (float)h[i];
    if (st == OPQ_OK)
        opq_recon_aph_floor(d->hw, n, e->o->aph_floor);
    free(h);
    return st;
}

// ---- training -----------------------------------------------------------------------------------

// FlexRound's groups for weight w: s1 per weight qparams channel, s3 along the output-channel
// axis of the placement (also with per-tensor grids), s4 along axis 1 of Conv weights.
static enum opq_status alloc_flexround(struct eng *e, struct wparam *w) {
    const struct opq_qtarget *tg = &e->rc->pl->targets[w->t];
    const struct opq_tensor *t = &w->v->t;
    struct opq_flexround *f = &w->fr;
    *f = (struct opq_flexround){.n = w->n, .n1 = w->n_ch > 1 ? w->n_ch : 1, .n3 = 1};
    f->inner1 = f->inner3 = f->inner4 = 1;
    if (w->n_ch > 1)
        f->inner1 = w->inner;
    if (tg->axis >= 0 && tg->axis < t->ndim) {
        f->n3 = (int)t->shape[tg->axis];
        for (int d = tg->axis + 1; d < t->ndim; d++)
            f->inner3 *= (size_t)t->shape[d];
    }
    bool conv = tg->n_consumers > 0 && tg->consumers[0]->op == OPQ_OP_CONV;
    if (conv && tg->axis == 0 && t->ndim >= 3) {
        f->n4 = (int)t->shape[1];
        for (int d = 2; d < t->ndim; d++)
            f->inner4 *= (size_t)t->shape[d];
    }
    size_t np = opq_flexround_n_params(f);
    w->wq = malloc(sizeof(float) * w->n);
    w->g = calloc(w->n, sizeof(float));
    f->theta = malloc(sizeof(float) * np);
    w->m = calloc(np, sizeof(float));
    w->v2 = calloc(np, sizeof(float));
    w->dwda = calloc(np, sizeof(float)); // the float gradient handed to Adam
    w->gacc = calloc(np, sizeof(double));
    if (!w->wq || !w->g || !f->theta || !w->m || !w->v2 || !w->dwda || !w->gacc)
        return nomem(e->ctx);
    opq_flexround_init(f, w->qp);
    return OPQ_OK;
}

static enum opq_status alloc_unit_params(struct eng *e, struct unit *U) {
    for (int k = 0; k < U->n_wps; k++) {
        struct wparam *w = &U->wps[k];
        if (e->o->rounding == OPQ_RECON_FLEXROUND) {
            enum opq_status st = alloc_flexround(e, w);
            if (st != OPQ_OK)
                return st;
            continue;
        }
        size_t nb = sizeof(float) * w->n;
        w->wq = spare_get(e, nb, false);
        w->base = spare_get(e, nb, false);
        w->alpha = spare_get(e, nb, false);
        w->m = spare_get(e, nb, true);
        w->v2 = spare_get(e, nb, true);
        w->g = spare_get(e, nb, true);
        w->dwda = spare_get(e, nb, true);
        w->h = spare_get(e, nb, false);
        w->dh = spare_get(e, nb, false);
        if (!w->wq || !w->base || !w->alpha || !w->m || !w->v2 || !w->g || !w->dwda || !w->h ||
            !w->dh)
            return nomem(e->ctx);
        for (size_t i = 0; i < w->n; i++) {
            const struct opq_qparams *p =
                &w->qp[w->n_ch > 1 ? (i / w->inner) % (size_t)w->n_ch : 0];
            float r = w->w0[i] / p->scale;
            w->base[i] = floorf(r);
            w->alpha[i] = opq_adaround_alpha0(r - w->base[i]);
        }
        int nc = w->n_ch > 1 ? w->n_ch : 1;
        w->chq = malloc(sizeof(float) * 4 * (size_t)nc);
        if (!w->chq)
            return nomem(e->ctx);
        for (int c = 0; c < nc; c++) {
            w->chq[c] = w->qp[c].scale;
            w->chq[nc + c] = (float)w->qp[c].zero_point;
            w->chq[2 * nc + c] = (float)w->qp[c].qmin;
            w->chq[3 * nc + c] = (float)w->qp[c].qmax;
        }
        w->soft_ok = false;
    }
    for (int k = 0; k < U->n_sites; k++) {
        struct site *s = &U->sites[k];
        size_t n = e->bbytes[s->vi] / sizeof(float);
        size_t nc = (size_t)s->n_ch;
        s->x = NULL;
        s->keep = spare_get(e, n + 1, false);
        s->scale = malloc(sizeof(float) * nc);
        s->lo = malloc(sizeof(float) * nc);
        s->hi = malloc(sizeof(float) * nc);
        s->m = calloc(nc, sizeof(float));
        s->v = calloc(nc, sizeof(float));
        s->gs = calloc(nc, sizeof(float));
        s->dscale = calloc(nc, sizeof(double));
        if (!s->keep || !s->scale || !s->lo || !s->hi || !s->m || !s->v || !s->gs || !s->dscale)
            return nomem(e->ctx);
        for (size_t c = 0; c < nc; c++) {
            float z = (float)s->qp[c].zero_point;
            s->scale[c] = s->qp[c].scale;
            s->lo[c] = (float)s->qp[c].qmin - z;
            s->hi[c] = (float)s->qp[c].qmax - z;
        }
        s->inner = n;
        if (s->n_ch > 1) {
            const struct opq_tensor *t = opq_exec_value(e->ex, e->g->values[s->vi]->name);
            int axis = e->rc->axis[s->t];
            if (axis < 0 || axis >= t->ndim || t->shape[axis] != s->n_ch)
                return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                     "reconstruction: activation '%s': %d scales along axis %d "
                                     "do not match its shape",
                                     e->g->values[s->vi]->name, s->n_ch, axis);
            s->inner = 1;
            for (int d = axis + 1; d < t->ndim; d++)
                s->inner *= (size_t)t->shape[d];
        }
        s->aq = (struct opq_actq){.n = n, .inner = s->inner, .n_ch = s->n_ch, .scale = s->scale,
                                  .lo = s->lo, .hi = s->hi};
        s->parts = malloc(sizeof(double) * opq_actq_n_parts(&s->aq));
        if (!s->parts)
            return nomem(e->ctx);
        e->site_of[s->vi] = k + 1;
    }
    return OPQ_OK;
}

static void free_unit_params(struct eng *e, struct unit *U) {
    for (int r = 0; r < U->n_subs; r++) {
        U->subs[r].tape = NULL;
    }
    for (int k = 0; k < U->n_wps; k++) {
        struct wparam *w = &U->wps[k];
        if (w->w0)
            w->v->t.data = w->w0;
        if (e->o->rounding == OPQ_RECON_ADAROUND) { // the arrays of alloc_unit_params
            size_t nb = sizeof(float) * w->n;
            spare_put(e, w->wq, nb);
            spare_put(e, w->base, nb);
            spare_put(e, w->alpha, nb);
            spare_put(e, w->m, nb);
            spare_put(e, w->v2, nb);
            spare_put(e, w->g, nb);
            spare_put(e, w->dwda, nb);
            spare_put(e, w->h, nb);
            spare_put(e, w->dh, nb);
        } else {
            free(w->wq);
            free(w->base);
            free(w->alpha);
            free(w->m);
            free(w->v2);
            free(w->g);
            free(w->dwda);
        }
        free(w->fr.theta);
        free(w->gacc);
        free(w->chq);
        w->chq = NULL;
        w->soft_ok = false;
        w->wq = w->base = w->alpha = w->m = w->v2 = w->g = w->dwda = w->fr.theta = NULL;
        w->h = w->dh = NULL;
        w->gacc = NULL;
    }
    for (int k = 0; k < U->n_sites; k++) {
        struct site *s = &U->sites[k];
        s->x = NULL;
        if (s->keep)
            spare_put(e, s->keep, e->bbytes[s->vi] / sizeof(float) + 1);
        free(s->lo);
        free(s->hi);
        free(s->parts);
        free(s->scale);
        free(s->m);
        free(s->v);
        free(s->gs);
        free(s->dscale);
        s->scale = s->m = s->v = s->gs = s->lo = s->hi = NULL;
        s->keep = NULL;
        s->parts = NULL;
        s->dscale = NULL;
        e->site_of[s->vi] = 0;
    }
}

// Gradients start at zero: flagged unwritten (the first contribution is copied, not added).
static void zero_grads(struct eng *e, struct unit *U) {
    for (int r = 0; r < U->n_subs; r++) {
        struct sub *S = &U->subs[r];
        for (int i = 0; i < S->n_ext; i++)
            e->gw[S->ext[i]] = false;
        for (int i = 0; i < S->n_outs; i++)
            e->gw[S->outs[i]] = false;
    }
    for (int k = 0; k < U->n_wps; k++)
        U->wps[k].gw = false;
    for (int k = 0; k < U->n_sites; k++)
        memset(U->sites[k].dscale, 0, sizeof(double) * (size_t)U->sites[k].n_ch);
}

struct batch_job {
    struct eng *e;
    struct unit_data *d;
    uint32_t *j;         // [B] sample of each batch row
    struct opq_rng *rng; // [B] QDrop: the stream at that row's first coin
};

// Batch rows b0..b1: the input (QDrop: each element the quantized or the float input, by a
// fair coin), the targets and the per-sample loss weights.
static void batch_range(void *user, int64_t b0, int64_t b1) {
    struct batch_job *bj = user;
    struct eng *e = bj->e;
    struct unit_data *d = bj->d;
    for (int64_t b = b0; b < b1; b++) {
        uint32_t j = bj->j[b];
        const float *xq = d->Xq + (size_t)j * d->per_in, *xf = d->X + (size_t)j * d->per_in;
        float *dst = d->xin + (size_t)b * d->per_in;
        if (e->o->qdrop) {
            struct coin cn = {0};
            struct opq_rng r = bj->rng[b];
            for (size_t k = 0; k < d->per_in; k++)
                dst[k] = coin_flip(&r, &cn, 128) ? xq[k] : xf[k];
        } else {
            memcpy(dst, xq, sizeof(float) * d->per_in);
        }
        memcpy(d->ybat + (size_t)b * d->per_out, d->Y + (size_t)j * d->per_out,
               sizeof(float) * d->per_out);
        if (d->hw && d->hw_per_sample)
            memcpy(d->hbat + (size_t)b * d->per_out, d->hw + (size_t)j * d->per_out,
                   sizeof(float) * d->per_out);
    }
}

// One training step's forward + backward on a random batch; returns the loss through *L.
static enum opq_status train_pass(struct eng *e, struct unit *U, struct unit_data *d, double L0,
                                  double *L) {
    double t0 = opq_now_s();
    // draw the samples (and where each one's mixing coins start in the stream), then assemble
    // the batch over the pool
    struct batch_job bj = {.e = e, .d = d, .j = e->bat_j, .rng = e->bat_rng};
    for (int b = 0; b < e->B; b++) {
        bj.j[b] = opq_rng_below(&e->rng, (uint32_t)e->N);
        if (e->o->qdrop) {
            bj.rng[b] = e->rng;
            opq_rng_advance(&e->rng, (d->per_in + 3) / 4);
        }
    }
    opq_parallel_for(opq_exec_pool(e->ex), e->B, 1, batch_range, &bj);
    tm_add(e, TM_BATCH, &t0);
    enum opq_status st = unit_forward(e, U, W_SOFT, A_SOFT, d->xin, true);
    if (st != OPQ_OK)
        return st;
    t0 = opq_now_s();
    zero_grads(e, U);
    const float *hw = d->hw_per_sample ? d->hbat : d->hw;
    if (L0 > 0.0) { // the gradient's scale is known: one pass
        *L = unit_loss(e, U, d, d->ybat, hw, e->grd[U->out_vi], 2.0 / L0);
    } else {
        *L = unit_loss(e, U, d, d->ybat, hw, NULL, 0.0);
        double L0v = *L > 0.0 ? *L : 1.0;
        unit_loss(e, U, d, d->ybat, hw, e->grd[U->out_vi], 2.0 / L0v);
    }
    e->gw[U->out_vi] = true;
    e->gcur[U->out_vi] = e->grd[U->out_vi];
    tm_add(e, TM_LOSS, &t0);
    return unit_backward(e, U);
}

static void train_update(struct eng *e, struct unit *U, int it, int iters) {
    const struct opq_recon_opts *o = e->o;
    int warm = (int)(o->warmup * (float)iters);
    bool reg = it >= warm;
    double beta = o->beta_end;
    if (iters > warm) {
        double t = (double)(it - warm) / (double)(iters - warm);
        beta = (double)o->beta_end + (double)(o->beta_start - o->beta_end) * fmax(0.0, 1.0 - t);
    }
    // FlexRound: no regularizer, the learning rate decays to 0 along a cosine
    double lr_flex =
        0.5 * (double)o->lr_flex * (1.0 + cos(3.14159265358979323846 * (double)it / (double)iters));
    for (int k = 0; k < U->n_wps && o->rounding == OPQ_RECON_FLEXROUND; k++) {
        struct wparam *w = &U->wps[k];
        size_t np = opq_flexround_n_params(&w->fr);
        memset(w->gacc, 0, sizeof(double) * np);
        opq_flexround_backward(&w->fr, w->qp, w->w0, w->g, w->gacc);
        for (size_t i = 0; i < np; i++)
            w->dwda[i] = (float)w->gacc[i];
        opq_adam_step(w->fr.theta, w->dwda, w->m, w->v2, np, (float)lr_flex, it + 1);
    }
    for (int k = 0; k < U->n_wps && o->rounding == OPQ_RECON_ADAROUND; k++) {
        // the Adam step, then the soft weights of the next forward in the same pass
        struct wjob j = {.ar = ar_of(&U->wps[k]),
                         .hp = {.mode = OPQ_ADAROUND_UPDATE,
                                .reg = reg,
                                .reg_w = o->reg_weight,
                                .beta = (float)beta,
                                .lr = opq_recon_lr_round(o, iters),
                                .t = it + 1}};
        opq_parallel_for(opq_exec_pool(e->ex), (int64_t)U->wps[k].n, WGRAIN, adaround_range, &j);
        U->wps[k].soft_ok = true;
    }
    double lr =
        0.5 * (double)o->lr_act * (1.0 + cos(3.14159265358979323846 * (double)it / (double)iters));
    for (int k = 0; k < U->n_sites; k++) {
        struct site *s = &U->sites[k];
        for (int c = 0; c < s->n_ch; c++)
            s->gs[c] = (float)s->dscale[c];
        opq_adam_step(s->scale, s->gs, s->m, s->v, (size_t)s->n_ch, (float)lr, it + 1);
        for (int c = 0; c < s->n_ch; c++)
            if (!(s->scale[c] > 1e-8f))
                s->scale[c] = 1e-8f;
    }
}

// FlexRound hardening: the weight becomes s1 * (q - z) in the model and s1 the qparams scale, so
// the encoder's round(w / s1) gives back q exactly. Returns the number of codes that differ from
// round to nearest on the calibrated grid.
static size_t harden_flexround(struct wparam *w) {
    size_t flips = 0;
    opq_flexround_forward(&w->fr, w->qp, w->w0, w->wq, NULL);
    for (size_t i = 0; i < w->n; i++) {
        int c = w->n_ch > 1 ? (int)((i / w->inner) % (size_t)w->n_ch) : 0;
        struct opq_qparams learned = w->qp[c];
        learned.scale = opq_flexround_grid(&w->fr, c);
        flips += opq_quantize1(w->wq[i], &learned) != opq_quantize1(w->w0[i], &w->qp[c]);
    }
    memcpy(w->w0, w->wq, sizeof(float) * w->n);
    for (int c = 0; c < w->fr.n1; c++)
        w->qp[c].scale = opq_flexround_grid(&w->fr, c);
    w->v->t.data = w->w0;
    return flips;
}

// Hardening: weights to floor + [alpha >= 0] on their grid (in the model), step sizes into the
// qparams. Returns the fraction of weights rounded away from nearest.
static double harden(struct eng *e, struct unit *U) {
    size_t flips = 0, total = 0;
    for (int k = 0; k < U->n_wps && e->o->rounding == OPQ_RECON_FLEXROUND; k++)
        flips += harden_flexround(&U->wps[k]), total += U->wps[k].n;
    for (int k = 0; k < U->n_wps && e->o->rounding == OPQ_RECON_ADAROUND; k++) {
        struct wparam *w = &U->wps[k];
        for (size_t i = 0; i < w->n; i++) {
            const struct opq_qparams *p =
                &w->qp[w->n_ch > 1 ? (i / w->inner) % (size_t)w->n_ch : 0];
            float z = (float)p->zero_point;
            float q = opq_adaround_hard(w->w0[i], p->scale, w->alpha[i]);
            flips += q != nearbyintf(w->w0[i] / p->scale);
            q += z;
            q = q < (float)p->qmin ? (float)p->qmin : (q > (float)p->qmax ? (float)p->qmax : q);
            w->w0[i] = (q - z) * p->scale;
        }
        total += w->n;
        w->v->t.data = w->w0;
    }
    for (int k = 0; k < U->n_sites; k++)
        for (int c = 0; c < U->sites[k].n_ch; c++)
            U->sites[k].qp[c].scale = U->sites[k].scale[c];
    return total ? (double)flips / (double)total : 0.0;
}

// ---- checkpoints --------------------------------------------------------------------------------

#define CKPT_MAGIC "OPQRCK01"

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static uint64_t fingerprint(const struct eng *e) {
    const struct opq_recon_opts *o = e->o;
    const struct opq_quant_opts *q = e->rc->opts;
    uint64_t h = 1469598103934665603ull;
    int32_t ints[] = {
        e->g->n_nodes,    e->rc->pl->n_targets, e->N,       e->B, o->iters, o->loss, o->qdrop,
        q ? q->wbits : 0, q ? q->abits : 0,     o->rounding};
    h = fnv(h, ints, sizeof(ints));
    float fl[] = {o->drop_prob, o->temp,   o->reg_weight, o->warmup,  o->beta_start,
                  o->beta_end,  o->lr_round, o->lr_act,   o->lr_flex, o->aph_floor};
    h = fnv(h, fl, sizeof(fl));
    h = fnv(h, &o->seed, sizeof(o->seed));
    size_t layout = sizeof(struct opq_recon_unit_report);
    h = fnv(h, &layout, sizeof(layout));
    h = fnv(h, &o->time_budget, sizeof(o->time_budget));
    for (int t = 0; t < e->rc->pl->n_targets; t++) {
        const char *nm = e->rc->pl->targets[t].value->name;
        h = fnv(h, nm, strlen(nm) + 1);
        h = fnv(h, e->rc->qp[t], sizeof(struct opq_qparams) * (size_t)e->rc->n_ch[t]);
    }
    return h;
}

// Per rounding, so one folder can hold an aphq and a flexround run side by side (they share
// aph.bin, see the shared APH pass).
static void ckpt_path(const struct eng *e, int ui, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/%s_unit_%03d.bin", e->o->checkpoint,
             e->o->rounding == OPQ_RECON_FLEXROUND ? "flexround" : "adaround", ui);
}

// Saves the unit's hardened weights, every activation step size and the unit report. Written
// to a temporary name and renamed, so an interrupted run never leaves a torn file.
static enum opq_status ckpt_save(struct eng *e, int ui, const struct opq_recon_unit_report *ur) {
    struct unit *U = &e->units[ui];
    char path[4096], tmp[4200];
    ckpt_path(e, ui, path, sizeof(path));
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f)
        return opq_set_error(e->ctx, OPQ_ERR_IO, "%s: cannot write checkpoint: %s", tmp,
                             strerror(errno));
    bool ok = fwrite(CKPT_MAGIC, 8, 1, f) == 1 && fwrite(&e->fingerprint, 8, 1, f) == 1 &&
              fwrite(&ui, sizeof(ui), 1, f) == 1 && fwrite(ur, sizeof(*ur), 1, f) == 1;
    for (int k = 0; ok && k < U->n_wps; k++)
        ok = fwrite(U->wps[k].w0, sizeof(float), U->wps[k].n, f) == U->wps[k].n;
    for (int k = 0; ok && e->o->rounding == OPQ_RECON_FLEXROUND && k < U->n_wps; k++)
        for (int c = 0; ok && c < (U->wps[k].n_ch > 1 ? U->wps[k].n_ch : 1); c++)
            ok = fwrite(&U->wps[k].qp[c].scale, sizeof(float), 1, f) == 1; // the learned grid
    for (int t = 0; ok && t < e->rc->pl->n_targets; t++) {
        if (e->rc->pl->targets[t].role != OPQ_QROLE_ACT)
            continue;
        for (int c = 0; ok && c < e->rc->n_ch[t]; c++)
            ok = fwrite(&e->rc->qp[t][c].scale, sizeof(float), 1, f) == 1;
    }
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return opq_set_error(e->ctx, OPQ_ERR_IO, "%s: cannot write checkpoint", path);
    }
    return OPQ_OK;
}

// Loads unit ui from the checkpoint if a matching file exists (*found). A file from another
// model or other options is ignored with a warning.
static enum opq_status ckpt_load(struct eng *e, int ui, struct opq_recon_unit_report *ur,
                                 bool *found) {
    struct unit *U = &e->units[ui];
    char path[4096];
    *found = false;
    ckpt_path(e, ui, path, sizeof(path));
    FILE *f = fopen(path, "rb");
    if (!f)
        return OPQ_OK;
    char magic[8];
    uint64_t fp = 0;
    int idx = -1;
    struct opq_recon_unit_report r;
    bool ok = fread(magic, 8, 1, f) == 1 && memcmp(magic, CKPT_MAGIC, 8) == 0 &&
              fread(&fp, 8, 1, f) == 1 && fread(&idx, sizeof(idx), 1, f) == 1 &&
              fread(&r, sizeof(r), 1, f) == 1;
    if (!ok || fp != e->fingerprint || idx != ui) {
        fclose(f);
        opq_log(e->ctx, OPQ_LOG_WARN, "%s: checkpoint of another model or options, ignored", path);
        return OPQ_OK;
    }
    for (int k = 0; ok && k < U->n_wps; k++)
        ok = fread(U->wps[k].w0, sizeof(float), U->wps[k].n, f) == U->wps[k].n;
    for (int k = 0; ok && e->o->rounding == OPQ_RECON_FLEXROUND && k < U->n_wps; k++)
        for (int c = 0; ok && c < (U->wps[k].n_ch > 1 ? U->wps[k].n_ch : 1); c++)
            ok = fread(&U->wps[k].qp[c].scale, sizeof(float), 1, f) == 1;
    for (int t = 0; ok && t < e->rc->pl->n_targets; t++) {
        if (e->rc->pl->targets[t].role != OPQ_QROLE_ACT)
            continue;
        for (int c = 0; ok && c < e->rc->n_ch[t]; c++)
            ok = fread(&e->rc->qp[t][c].scale, sizeof(float), 1, f) == 1;
    }
    fclose(f);
    if (!ok)
        return opq_set_error(e->ctx, OPQ_ERR_IO, "%s: truncated checkpoint", path);
    *ur = r;
    ur->resumed = true;
    *found = true;
    return OPQ_OK;
}

// ---- shared APH pass ----------------------------------------------------------------------------
//
// APH weights depend only on the float model, the calibration samples, the batch and the
// temperature, not on bits, rounding or method: they are computed for every unit in one pass
// before reconstruction and, with a checkpoint folder, kept in DIR/aph.bin, so any later run
// (another method or bit width) with the same folder reuses them.

#define APH_MAGIC "OPQAPH01"

// Plans aph_ex / aph_b (see struct eng). A tape holds about every planned value of the graph.
static enum opq_status aph_exec_setup(struct eng *e) {
    if (e->aph_ex)
        return OPQ_OK;
    struct opq_exec_stats es;
    opq_exec_get_stats(e->ex, &es);
    size_t per_sample = es.value_bytes / (size_t)e->B;
    int b = e->B;
    while (b > 1 && b % 2 == 0 && (size_t)b * per_sample > APH_TAPE_BYTES)
        b /= 2;
    if (b == e->B) {
        e->aph_ex = e->ex;
        e->aph_b  = e->B;
        return OPQ_OK;
    }
    struct opq_named_tensor shape = input_shape(e, b);
    struct opq_exec_opts eo = {.batch = b};
    enum opq_status st = opq_exec_plan(e->ctx, e->rc->model, &shape, 1, &eo, &e->aph_ex);
    if (st != OPQ_OK)
        return st;
    e->aph_b = b;
    opq_log(e->ctx, OPQ_LOG_INFO,
            "APH weights in batches of %d (a tape of the float model takes about %.0f MB a "
            "sample)", b, (double)per_sample / 1048576.0);
    return OPQ_OK;
}

static void aph_exec_free(struct eng *e) {
    if (e->aph_ex != e->ex)
        opq_exec_free(e->aph_ex);
    e->aph_ex = NULL;
}

static uint64_t aph_fingerprint(const struct eng *e, const float *X, size_t per_in) {
    uint64_t h = 1469598103934665603ull;
    int32_t ints[] = {e->g->n_nodes, e->n_units, e->N, e->B};
    h = fnv(h, ints, sizeof(ints));
    h = fnv(h, &e->o->temp, sizeof(e->o->temp));
    h = fnv(h, X, sizeof(float) * (size_t)e->N * per_in);
    for (int t = 0; t < e->rc->pl->n_targets; t++) {
        const struct opq_value *v = e->rc->pl->targets[t].value;
        h = fnv(h, v->name, strlen(v->name) + 1);
        if (e->rc->pl->targets[t].role == OPQ_QROLE_WEIGHT && v->t.data)
            h = fnv(h, v->t.data, v->t.nbytes);
    }
    return h;
}

static bool aph_load(struct eng *e, const char *path, uint64_t fp) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return false;
    char magic[8];
    uint64_t h = 0;
    bool ok = fread(magic, 8, 1, f) == 1 && memcmp(magic, APH_MAGIC, 8) == 0 &&
              fread(&h, 8, 1, f) == 1 && h == fp;
    for (int u = 0; ok && u < e->n_units; u++) {
        uint64_t n = 0;
        size_t want = e->aph[u] ? e->bbytes[e->units[u].out_vi] / sizeof(float) / (size_t)e->B : 0;
        ok = fread(&n, 8, 1, f) == 1 && n == want;
        if (ok && n)
            ok = fread(e->aph[u], sizeof(float), n, f) == n;
    }
    fclose(f);
    return ok;
}

static enum opq_status aph_save(struct eng *e, const char *path, uint64_t fp) {
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f)
        return opq_set_error(e->ctx, OPQ_ERR_IO, "%s: cannot write checkpoint: %s", tmp,
                             strerror(errno));
    bool ok = fwrite(APH_MAGIC, 8, 1, f) == 1 && fwrite(&fp, 8, 1, f) == 1;
    for (int u = 0; ok && u < e->n_units; u++) {
        uint64_t n = e->aph[u] ? e->bbytes[e->units[u].out_vi] / sizeof(float) / (size_t)e->B : 0;
        ok = fwrite(&n, 8, 1, f) == 1 && (!n || fwrite(e->aph[u], sizeof(float), n, f) == n);
    }
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return opq_set_error(e->ctx, OPQ_ERR_IO, "%s: cannot write checkpoint", path);
    }
    return OPQ_OK;
}

// APH weights of every unit but the head, from the float model on the calibration samples X.
static enum opq_status aph_all(struct eng *e, const float *X, size_t per_in) {
    int n = 0;
    for (int u = 0; u < e->n_units; u++)
        n += e->units[u].out_vi != e->logits_vi;
    if (n == 0)
        return OPQ_OK;
    e->aph = calloc((size_t)e->n_units, sizeof(*e->aph));
    const char **outs = calloc((size_t)n, sizeof(*outs));
    int *stops = calloc((size_t)n, sizeof(*stops));
    double **h = calloc((size_t)n, sizeof(*h));
    enum opq_status st = OPQ_OK;
    if (!e->aph || !outs || !stops || !h) {
        st = nomem(e->ctx);
        goto out;
    }
    int j = 0;
    for (int u = 0; u < e->n_units; u++) {
        struct unit *U = &e->units[u];
        if (U->out_vi == e->logits_vi)
            continue;
        size_t per = e->bbytes[U->out_vi] / sizeof(float) / (size_t)e->B;
        e->aph[u] = malloc(sizeof(float) * per);
        h[j] = malloc(sizeof(double) * per);
        if (!e->aph[u] || !h[j]) {
            st = nomem(e->ctx);
            goto out;
        }
        outs[j] = e->g->values[U->out_vi]->name;
        stops[j++] = U->last + 1;
    }
    double t0 = opq_now_s();
    uint64_t fp = 0;
    char path[4096] = "";
    if (e->o->checkpoint) {
        fp = aph_fingerprint(e, X, per_in);
        snprintf(path, sizeof(path), "%s/aph.bin", e->o->checkpoint);
        if (aph_load(e, path, fp)) {
            opq_log(e->ctx, OPQ_LOG_INFO, "APH weights of %d units: from %s", n, path);
            goto out;
        }
    }
    opq_progress(e->ctx, "APH weights", 0, 1);
    if ((st = aph_exec_setup(e)) == OPQ_OK)
        st = opq_recon_aph_many(e->aph_ex, e->g, e->g->values[e->units[0].in_vi]->name, X, e->N,
                                e->aph_b, e->o->temp, outs, stops, n, h);
    aph_exec_free(e); // the shared pass is all the APH this run needs
    opq_progress(e->ctx, "APH weights", 1, 1);
    j = 0;
    for (int u = 0; st == OPQ_OK && u < e->n_units; u++) {
        if (!e->aph[u])
            continue;
        size_t per = e->bbytes[e->units[u].out_vi] / sizeof(float) / (size_t)e->B;
        for (size_t k = 0; k < per; k++)
            e->aph[u][k] = (float)h[j][k];
        j++;
    }
    if (st == OPQ_OK)
        opq_log(e->ctx, OPQ_LOG_INFO, "APH weights of %d units in one pass: %.1f s", n,
                opq_now_s() - t0);
    if (st == OPQ_OK && e->o->checkpoint)
        st = aph_save(e, path, fp);
out:
    for (int k = 0; h && k < n; k++)
        free(h[k]);
    free(h);
    free(outs);
    free(stops);
    return st;
}

// ---- driver -------------------------------------------------------------------------------------

// Marks the weight targets trainable and plans the executor with every crossing value pinned.
static enum opq_status eng_setup(struct eng *e) {
    struct opq_refine_ctx *rc = e->rc;
    struct opq_graph *g = e->g;
    if (opq_calib_n_inputs(rc->src) != 1)
        return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                             "reconstruction: models with %d inputs are not supported (1 needed)",
                             opq_calib_n_inputs(rc->src));
    if (g->n_outputs < 1)
        return opq_set_error(e->ctx, OPQ_ERR_INVALID_MODEL, "reconstruction: no graph output");
    e->logits_vi = g->outputs[0]->index;
    for (int t = 0; t < rc->pl->n_targets; t++)
        if (rc->pl->targets[t].role == OPQ_QROLE_WEIGHT)
            rc->pl->targets[t].value->kind |= OPQ_VK_PARAM;
    size_t nv = (size_t)g->n_values + 1;
    e->dyn = calloc(nv, sizeof(*e->dyn));
    e->site_of = calloc(nv, sizeof(*e->site_of));
    e->fwd = calloc(nv, sizeof(*e->fwd));
    e->cur = calloc(nv, sizeof(*e->cur));
    e->grd = calloc(nv, sizeof(*e->grd));
    e->gw = calloc(nv, sizeof(*e->gw));
    e->gcur = calloc(nv, sizeof(*e->gcur));
    e->bbytes = calloc(nv, sizeof(*e->bbytes));
    e->isf = calloc(nv, sizeof(*e->isf));
    if (!e->dyn || !e->site_of || !e->fwd || !e->cur || !e->grd || !e->gw || !e->gcur || !e->bbytes ||
        !e->isf)
        return nomem(e->ctx);
    mark_dynamic(e);
    enum opq_status st = find_units(e);
    if (st != OPQ_OK)
        return st;
    e->max_subs = 1;
    e->cap_spares = 4;
    for (int u = 0; u < e->n_units; u++) {
        const struct unit *U = &e->units[u];
        e->max_subs = U->n_subs > e->max_subs ? U->n_subs : e->max_subs;
        int nb = U->n_sites + 9 * U->n_wps + 4;
        for (int r = 0; r < U->n_subs; r++)
            nb += 2 * (U->subs[r].n_ext + U->subs[r].n_outs);
        e->cap_spares = nb > e->cap_spares ? nb : e->cap_spares;
    }
    e->tapes = calloc((size_t)e->max_subs, sizeof(*e->tapes));
    e->bat_j = calloc((size_t)e->B, sizeof(*e->bat_j));
    e->bat_rng = calloc((size_t)e->B, sizeof(*e->bat_rng));
    if (!e->bat_j || !e->bat_rng)
        return nomem(e->ctx);
    e->spares = calloc((size_t)e->cap_spares, sizeof(*e->spares));
    if (!e->tapes || !e->spares)
        return nomem(e->ctx);
    struct opq_named_tensor shape = input_shape(e, e->B);
    // only the unit outputs are pinned (a unit's plain forward then computes all of it: the
    // reference of the iteration cost); sub-ranges run on tapes, which keep their own values
    const char **pin = calloc((size_t)e->n_units, sizeof(*pin));
    if (!pin)
        return nomem(e->ctx);
    for (int u = 0; u < e->n_units; u++)
        pin[u] = g->values[e->units[u].out_vi]->name;
    struct opq_exec_opts eo = {.batch = e->B, .pinned = pin, .n_pinned = e->n_units};
    st = opq_exec_plan(e->ctx, rc->model, &shape, 1, &eo, &e->ex);
    free(pin);
    if (st != OPQ_OK)
        return st;
    // batch sizes of the values crossing sub-range boundaries (their buffers: unit_bufs)
    for (int u = 0; u < e->n_units; u++)
        for (int r = 0; r < e->units[u].n_subs; r++) {
            const struct sub *S = &e->units[u].subs[r];
            for (int i = 0; i < S->n_ext + S->n_outs; i++) {
                int vi = i < S->n_ext ? S->ext[i] : S->outs[i - S->n_ext];
                const struct opq_tensor *t = opq_exec_value(e->ex, g->values[vi]->name);
                e->bbytes[vi] = t->nbytes;
                e->isf[vi] = t->dtype == OPQ_DTYPE_FLOAT;
            }
        }
    // unit boundaries are cached per sample: they must have the batch as leading dim
    for (int u = 0; u < e->n_units; u++) {
        int vis[2] = {e->units[u].in_vi, e->units[u].out_vi};
        for (int k = 0; k < 2; k++) {
            const struct opq_tensor *t = opq_exec_value(e->ex, g->values[vis[k]]->name);
            if (t->dtype != OPQ_DTYPE_FLOAT || t->ndim < 1 || t->shape[0] != e->B)
                return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                                     "reconstruction: unit boundary '%s' is not a float tensor "
                                     "with the batch as first dim",
                                     g->values[vis[k]]->name);
            if (!e->bbytes[vis[k]])
                e->bbytes[vis[k]] = t->nbytes;
        }
    }
    const struct opq_tensor *lt = opq_exec_value(e->ex, g->values[e->logits_vi]->name);
    e->K = lt->ndim == 2 ? lt->shape[1] : 0;
    if (lt->ndim != 2 || lt->dtype != OPQ_DTYPE_FLOAT)
        return opq_set_error(e->ctx, OPQ_ERR_UNSUPPORTED,
                             "reconstruction: the first graph output '%s' must be float logits "
                             "[batch, classes]",
                             g->values[e->logits_vi]->name);
    return OPQ_OK;
}

static void eng_free(struct eng *e) {
    struct opq_graph *g = e->g;
    if (e->units)
        for (int u = 0; u < e->n_units; u++)
            free_unit_params(e, &e->units[u]);
    for (int t = 0; e->rc && t < e->rc->pl->n_targets; t++)
        if (e->rc->pl->targets[t].role == OPQ_QROLE_WEIGHT)
            e->rc->pl->targets[t].value->kind &= ~(uint32_t)OPQ_VK_PARAM;
    if (e->fwd)
        for (int i = 0; i < g->n_values; i++) {
            free(e->fwd[i]);
            free(e->grd[i]);
        }
    free(e->fwd);
    free(e->cur);
    free(e->grd);
    free(e->gw);
    free(e->gcur);
    free(e->bbytes);
    free(e->isf);
    free(e->dyn);
    free(e->site_of);
    free(e->logits_fp);
    for (int u = 0; e->aph && u < e->n_units; u++)
        free(e->aph[u]);
    free(e->aph);
    free_units(e);
    aph_exec_free(e);
    for (int r = 0; e->tapes && r < e->max_subs; r++)
        opq_exec_tape_free(e->tapes[r]);
    free(e->tapes);
    free(e->bat_j);
    free(e->bat_rng);
    spare_trim(e);
    free(e->spares);
    opq_exec_free(e->ex);
}

static void free_unit_data(struct unit_data *d) {
    free(d->X);
    free(d->Xq);
    free(d->Y);
    free(d->hw);
    free(d->xin);
    free(d->ybat);
    free(d->hbat);
}

// Iterations for this unit under the time budget: the remaining time shared by the remaining
// units, measured with two untimed-state passes.
static enum opq_status budget_iters(struct eng *e, struct unit *U, struct unit_data *d,
                                    int ui, int *iters) {
    *iters = e->o->iters;
    if (e->o->time_budget <= 0.0)
        return OPQ_OK;
    double t0 = opq_now_s(), L;
    for (int k = 0; k < 2; k++) {
        enum opq_status st = train_pass(e, U, d, 1.0, &L);
        if (st != OPQ_OK)
            return st;
    }
    double per_iter = (opq_now_s() - t0) / 2.0 * 1.1; // + the optimizer step
    double left = budget_left(e);
    // room for the later units' own APH (per-unit path), at the current sample count
    double reserve = e->aph_cost * (double)e->aph_n * aph_depth(e, ui + 1);
    double share = fmax(left - reserve, 0.0) / (double)(e->n_units - ui) * 0.9;
    double n = share / fmax(per_iter, 1e-9);
    if (n < (double)*iters)
        *iters = n < 10.0 ? 10 : (int)n;
    char lr[48] = ""; // AdaRound's learning rate follows the iterations (opq_recon_lr_round)
    if (e->o->rounding == OPQ_RECON_ADAROUND)
        snprintf(lr, sizeof(lr), "; AdaRound lr %g", (double)opq_recon_lr_round(e->o, *iters));
    opq_log(e->ctx, OPQ_LOG_INFO,
            "time budget: %s gets %d iterations (%.0f ms each, %.0f s left for %d units%s)",
            U->name, *iters, 1e3 * per_iter, left, e->n_units - ui, lr);
    return OPQ_OK;
}

// Progress labels: the CLI keeps the label pointer between calls, so they must be static.
static const char *const phase_names[] = {
    "reconstruct unit 0",  "reconstruct unit 1",  "reconstruct unit 2",  "reconstruct unit 3",
    "reconstruct unit 4",  "reconstruct unit 5",  "reconstruct unit 6",  "reconstruct unit 7",
    "reconstruct unit 8",  "reconstruct unit 9",  "reconstruct unit 10", "reconstruct unit 11",
    "reconstruct unit 12", "reconstruct unit 13", "reconstruct unit 14", "reconstruct unit 15",
    "reconstruct unit 16", "reconstruct unit 17", "reconstruct unit 18", "reconstruct unit 19",
    "reconstruct unit 20", "reconstruct unit 21", "reconstruct unit 22", "reconstruct unit 23",
    "reconstruct unit 24", "reconstruct unit 25", "reconstruct unit 26", "reconstruct unit 27",
    "reconstruct unit 28", "reconstruct unit 29", "reconstruct unit 30", "reconstruct unit 31",
    "reconstruct unit 32", "reconstruct unit 33", "reconstruct unit 34", "reconstruct unit 35",
    "reconstruct unit 36", "reconstruct unit 37", "reconstruct unit 38", "reconstruct unit 39",
    "reconstruct unit 40", "reconstruct unit 41", "reconstruct unit 42", "reconstruct unit 43",
    "reconstruct unit 44", "reconstruct unit 45", "reconstruct unit 46", "reconstruct unit 47",
    "reconstruct unit 48", "reconstruct unit 49", "reconstruct unit 50", "reconstruct unit 51",
    "reconstruct unit 52", "reconstruct unit 53", "reconstruct unit 54", "reconstruct unit 55",
    "reconstruct unit 56", "reconstruct unit 57", "reconstruct unit 58", "reconstruct unit 59",
    "reconstruct unit 60", "reconstruct unit 61", "reconstruct unit 62", "reconstruct unit 63",
};

static enum opq_status recon_unit(struct eng *e, int ui, struct unit_data *d,
                                  struct opq_recon_unit_report *ur) {
    struct unit *U = &e->units[ui];
    enum opq_status st;
    double t0 = opq_now_s();
    if ((st = alloc_unit_params(e, U)) != OPQ_OK)
        return st;
    if ((st = output_weights(e, U, d)) != OPQ_OK)
        return st;
    // before: round to nearest with the calibrated ranges
    if ((st = unit_eval(e, U, d, W_HARD, A_HARD, d->Xq, NULL, &ur->sqnr_before,
                        &ur->werr_before)) != OPQ_OK)
        return st;
    int iters;
    if ((st = budget_iters(e, U, d, ui, &iters)) != OPQ_OK)
        return st;
    spare_trim(e); // what this unit did not take back from the previous one
    opq_rng_seed(&e->rng, e->o->seed, 1000u + (uint64_t)ui);
    const char *phase = phase_names[ui % (int)ARRAY_SIZE(phase_names)];
    memset(e->tm, 0, sizeof(e->tm));
    double L0 = 0.0, L = 0.0, Lsum = 0.0, t_train = opq_now_s();
    int step = iters / 100 > 0 ? iters / 100 : 1;
    for (int it = 0; it < iters; it++) {
        if ((st = train_pass(e, U, d, L0, &L)) != OPQ_OK)
            return st;
        if (it == 0)
            L0 = L > 0.0 ? L : 1.0;
        Lsum += L;
        double t1 = opq_now_s();
        train_update(e, U, it, iters);
        tm_add(e, TM_UPDATE, &t1);
        if ((it + 1) % step == 0 || it + 1 == iters)
            opq_progress(e->ctx, phase, it + 1, iters);
        if ((it + 1) % (iters / 10 > 0 ? iters / 10 : 1) == 0) {
            opq_log(e->ctx, OPQ_LOG_DEBUG, "%s: iteration %d/%d, loss %.4f", U->name, it + 1, iters,
                    2.0 * Lsum / L0 / (double)(iters / 10 > 0 ? iters / 10 : 1));
            Lsum = 0.0;
        }
    }
    ur->iters = iters;
    ur->iter_ms = 1e3 * (opq_now_s() - t_train) / iters;
    char buf[512];
    int len = 0;
    for (int p = 0; p < TM_COUNT && len < (int)sizeof(buf); p++)
        len += snprintf(buf + len, sizeof(buf) - (size_t)len, " %s %.1f", tm_names[p],
                        1e3 * e->tm[p] / iters);
    opq_log(e->ctx, OPQ_LOG_DEBUG, "%s: ms per iteration:%s", U->name, buf);
    ur->flip_frac = harden(e, U);
    ur->seconds = opq_now_s() - t0;
    return OPQ_OK;
}

enum opq_status opq_recon_run(struct opq_refine_ctx *rc, const struct opq_recon_opts *o,
                              struct opq_recon_report *report) {
    struct eng e = {.ctx = rc->ctx, .rc = rc, .o = o, .g = rc->model->graph, .B = o->batch};
    struct unit_data d = {0};
    struct opq_recon_report rep = {0};
    enum opq_status st = OPQ_OK;
    e.t_start = opq_now_s();
    if (o->batch < 1 || o->iters < 1)
        return opq_set_error(rc->ctx, OPQ_ERR_USAGE,
                             "reconstruction: batch and iterations must "
                             "be positive");
    if (rc->pl->n_qnodes == 0)
        return OPQ_OK; // nothing quantized, nothing to reconstruct
    int n = rc->n_calib;
    if (o->count > 0 && o->count < n)
        n = o->count;
    if (n < 1)
        return opq_set_error(rc->ctx, OPQ_ERR_USAGE, "reconstruction: no calibration samples");
    if (e.B > n) { // fewer samples than a batch: one batch of all of them
        opq_log(rc->ctx, OPQ_LOG_WARN,
                "reconstruction: %d calibration samples, batch lowered "
                "from %d",
                n, e.B);
        e.B = n;
    }
    e.N = n / e.B * e.B;
    if (o->checkpoint && mkdir(o->checkpoint, 0777) != 0 && errno != EEXIST)
        return opq_set_error(rc->ctx, OPQ_ERR_IO, "%s: cannot create checkpoint folder: %s",
                             o->checkpoint, strerror(errno));
    if ((st = eng_setup(&e)) != OPQ_OK)
        goto out;
    e.fingerprint = fingerprint(&e);
    rep.units = calloc((size_t)e.n_units, sizeof(*rep.units));
    if (!rep.units) {
        st = nomem(e.ctx);
        goto out;
    }
    rep.n_units = e.n_units;
    // unit 0 input: the calibration samples themselves
    d.per_in = e.bbytes[e.units[0].in_vi] / sizeof(float) / (size_t)e.B;
    d.X = malloc(sizeof(float) * (size_t)e.N * d.per_in);
    d.Xq = malloc(sizeof(float) * (size_t)e.N * d.per_in);
    if (!d.X || !d.Xq) {
        st = nomem(e.ctx);
        goto out;
    }
    if ((st = opq_calib_read(rc->src, 0, 0, e.N, d.X)) != OPQ_OK)
        goto out;
    memcpy(d.Xq, d.X, sizeof(float) * (size_t)e.N * d.per_in);
    if (o->loss == OPQ_RECON_LOSS_APH && e.K <= OPQ_RECON_APH_MAX_EXACT &&
        (st = aph_all(&e, d.X, d.per_in)) != OPQ_OK)
        goto out;
    if (o->loss == OPQ_RECON_LOSS_FISHER) { // the float model's logits
        e.logits_fp = malloc(sizeof(float) * (size_t)e.N * (size_t)e.K);
        if (!e.logits_fp) {
            st = nomem(e.ctx);
            goto out;
        }
        for (int b0 = 0; b0 < e.N && st == OPQ_OK; b0 += e.B) {
            struct opq_named_tensor in = named(&e, e.units[0].in_vi, d.X + (size_t)b0 * d.per_in);
            if ((st = opq_exec_run_range(e.ex, 0, e.g->n_nodes - 1, &in, 1)) != OPQ_OK)
                break;
            memcpy(e.logits_fp + (size_t)b0 * (size_t)e.K,
                   opq_exec_value(e.ex, e.g->values[e.logits_vi]->name)->data,
                   sizeof(float) * (size_t)e.B * (size_t)e.K);
        }
        if (st != OPQ_OK)
            goto out;
    }
    for (int ui = 0; ui < e.n_units; ui++) {
        struct unit *U = &e.units[ui];
        struct opq_recon_unit_report *ur = &rep.units[ui];
        d.per_in = e.bbytes[U->in_vi] / sizeof(float) / (size_t)e.B;
        d.per_out = e.bbytes[U->out_vi] / sizeof(float) / (size_t)e.B;
        d.head = U->out_vi == e.logits_vi;
        d.Y = malloc(sizeof(float) * (size_t)e.N * d.per_out);
        d.xin = malloc(sizeof(float) * (size_t)e.B * d.per_in);
        d.ybat = malloc(sizeof(float) * (size_t)e.B * d.per_out);
        d.hbat = malloc(sizeof(float) * (size_t)e.B * d.per_out);
        float *Xq_next = malloc(sizeof(float) * (size_t)e.N * d.per_out);
        if (!d.Y || !d.xin || !d.ybat || !d.hbat || !Xq_next) {
            free(Xq_next);
            st = nomem(e.ctx);
            goto out;
        }
        if ((st = unit_bufs(&e, U, true)) != OPQ_OK) {
            free(Xq_next);
            goto out;
        }
        // float targets
        double dummy_s, dummy_w;
        if ((st = unit_eval(&e, U, &d, W_FLOAT, A_OFF, d.X, d.Y, &dummy_s, &dummy_w)) != OPQ_OK) {
            free(Xq_next);
            goto out;
        }
        // the reference for the iteration cost: the executor's plain forward of the whole unit
        // on one batch (fastest of two; the targets above ran sub-range by sub-range on tapes)
        ur->fwd_ms = 0.0;
        for (int k = 0; k < 2 && st == OPQ_OK; k++) {
            struct opq_named_tensor in = named(&e, U->in_vi, d.X);
            double t1 = opq_now_s();
            st = opq_exec_run_range(e.ex, U->first, U->last, &in, 1);
            double ms = 1e3 * (opq_now_s() - t1);
            ur->fwd_ms = k == 0 || ms < ur->fwd_ms ? ms : ur->fwd_ms;
        }
        if (st != OPQ_OK) {
            free(Xq_next);
            goto out;
        }
        bool found = false;
        if ((st = alloc_unit_params(&e, U)) == OPQ_OK && o->checkpoint)
            st = ckpt_load(&e, ui, ur, &found);
        for (int k = 0; found && k < U->n_sites; k++)
            for (int c = 0; c < U->sites[k].n_ch; c++)
                U->sites[k].scale[c] = U->sites[k].qp[c].scale;
        if (st == OPQ_OK && !found) {
            free_unit_params(&e, U);
            st = recon_unit(&e, ui, &d, ur);
        }
        snprintf(ur->name, sizeof(ur->name), "%s", U->name);
        ur->first = U->first;
        ur->last = U->last;
        ur->n_weights = 0;
        for (int k = 0; k < U->n_wps; k++)
            ur->n_weights += (int)U->wps[k].n;
        ur->n_acts = U->n_sites;
        // after: the hardened unit on the quantized input gives the next quantized input
        if (st == OPQ_OK) {
            double sq, we;
            st = unit_eval(&e, U, &d, W_FLOAT, A_HARD, d.Xq, Xq_next, &sq, &we);
            if (st == OPQ_OK && !found) {
                ur->sqnr_after = sq;
                ur->werr_after = we;
                ur->peak_rss_kb = opq_peak_rss_kb();
                if (o->checkpoint)
                    st = ckpt_save(&e, ui, ur);
            }
        }
        free_unit_params(&e, U);
        unit_bufs(&e, U, false);
        if (st != OPQ_OK) {
            free(Xq_next);
            goto out;
        }
        opq_log(e.ctx, OPQ_LOG_INFO,
                "reconstruct %-10s %5d iters  SQNR %6.2f -> %6.2f dB  %s %.4g -> %.4g  flips "
                "%4.1f%%  %.1f s (iteration %.1f ms = %.1fx forward)  peak %ld MB%s",
                U->name, ur->iters, ur->sqnr_before, ur->sqnr_after,
                d.head ? "KL" : opq_recon_loss_name(o->loss), ur->werr_before, ur->werr_after,
                100.0 * ur->flip_frac, ur->seconds, ur->iter_ms,
                ur->fwd_ms > 0.0 ? ur->iter_ms / ur->fwd_ms : 0.0, ur->peak_rss_kb / 1024,
                found ? " (checkpoint)" : "");
        free(d.X);
        free(d.Xq);
        free(d.hw);
        d.hw = NULL;
        d.X = d.Y;
        d.Xq = Xq_next;
        d.Y = NULL;
        free(d.xin);
        free(d.ybat);
        free(d.hbat);
        d.xin = d.ybat = d.hbat = NULL;
    }
out:
    free_unit_data(&d);
    eng_free(&e);
    if (st == OPQ_OK && report)
        *report = rep;
    else
        opq_recon_report_free(&rep);
    return st;
}

enum opq_status opq_recon_refine(void *user, struct opq_refine_ctx *rc) {
    const struct opq_recon_opts *o = user ? user : &rc->opts->recon;
    return opq_recon_run(rc, o, NULL);
}
