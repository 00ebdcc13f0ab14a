/* mr.c: MLP reconstruction (see mr.h). Layout: finding the MLPs, the teacher pass (inputs,
 * targets, clamp bound, APH), the training of one MLP on executor tapes, the driver. */
#include "recon/mr.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calib_data.h"
#include "exec.h"
#include "graph.h"
#include "recognize.h"
#include "recon/recon.h"
#include "rng.h"

void opq_mr_opts_default(struct opq_mr_opts *o) {
    memset(o, 0, sizeof(*o));
    o->iters = 2000;
    o->batch = 32;
    o->lr = 4e-4f; // the paper: 4e-5 over 20000 steps; the same total step at 2000
    o->clamp_pct = 0.0f; // the pass picks 0.98 at 4+ activation bits, 0.99 below
    o->clamp_alpha = 2.0f;
    o->temp = 20.0f;
    o->aph = true;
    o->mem_mb = 1024;
}

struct mlp {
    // names shared by teacher and student
    const char *x, *y, *w1, *b1, *w2, *b2; // b1/b2 NULL when absent
    const char *gout;                      // teacher: the GELU output
    const char *r;                         // student: the ReLU output
    int y_prod;                            // teacher: node producing y
    int a0, a1, b0, b1n;                   // student: fc1..Relu and fc2..y node ranges
    size_t per_x, per_y, per_r;            // floats per sample
    float *X, *Y, *h;                      // N samples; APH weights (per_y)
    float u;                               // clamp bound
};

static bool is_weight(const struct opq_value *v) {
    return v && (v->kind & OPQ_VK_INIT) && v->t.data && v->t.dtype == OPQ_DTYPE_FLOAT;
}

static struct opq_node *only_user(const struct opq_value *v) {
    return v && v->n_users == 1 && !(v->kind & OPQ_VK_OUTPUT) ? v->users[0] : NULL;
}

// The linear layer producing v: MatMul(x, W) [+ b]. Returns the MatMul, sets *b (or NULL).
static struct opq_node *linear_of(const struct opq_value *v, const struct opq_value **b) {
    struct opq_node *n = v ? v->producer : NULL;
    *b = NULL;
    if (n && !strcmp(n->op_type, "Add") && n->n_inputs == 2) {
        int k = is_weight(n->inputs[1]) ? 1 : (is_weight(n->inputs[0]) ? 0 : -1);
        if (k < 0)
            return NULL;
        *b = n->inputs[k];
        const struct opq_value *mm = n->inputs[1 - k];
        if (!only_user(mm))
            return NULL;
        n = mm->producer;
    }
    if (!n || strcmp(n->op_type, "MatMul") || n->n_inputs != 2 || !is_weight(n->inputs[1]) ||
        n->inputs[1]->t.ndim != 2)
        return NULL;
    return n;
}

// Finds the MLPs in the teacher (names only; student ranges later).
static enum opq_status find_mlps(struct opq_ctx *ctx, struct opq_graph *t, struct mlp **out,
                                 int *n_out) {
    struct opq_recognized *r = NULL;
    enum opq_status st = opq_recognize(ctx, t, &r);
    if (st != OPQ_OK)
        return st;
    struct mlp *m = calloc((size_t)r->n_items + 1, sizeof(*m));
    int n = 0;
    if (!m) {
        opq_recognized_free(r);
        return opq_set_error(ctx, OPQ_ERR_NOMEM, "MLP reconstruction: out of memory");
    }
    for (int i = 0; i < r->n_items; i++) {
        const struct opq_pattern *p = &r->items[i];
        if (p->kind != OPQ_PAT_GELU || !p->input || !p->output)
            continue;
        const struct opq_value *b1, *b2 = NULL;
        struct opq_node *fc1 = linear_of(p->input, &b1);
        struct opq_node *fc2 = only_user(p->output);
        if (fc2 && (strcmp(fc2->op_type, "MatMul") || fc2->inputs[0] != p->output ||
                    !is_weight(fc2->inputs[1]) || fc2->inputs[1]->t.ndim != 2))
            fc2 = NULL;
        const struct opq_value *y = fc2 ? fc2->outputs[0] : NULL;
        struct opq_node *add = y ? only_user(y) : NULL;
        if (add && !strcmp(add->op_type, "Add") && add->n_inputs == 2) {
            int k = add->inputs[0] == y ? 1 : 0;
            if (is_weight(add->inputs[k])) {
                b2 = add->inputs[k];
                y = add->outputs[0];
            }
        }
        if (!fc1 || !fc2 || !y) {
            opq_log(ctx, OPQ_LOG_INFO, "MLP reconstruction: GELU '%s' is not inside a MatMul MLP",
                    p->output->name);
            continue;
        }
        m[n] = (struct mlp){.x = fc1->inputs[0]->name, .y = y->name, .w1 = fc1->inputs[1]->name,
                            .b1 = b1 ? b1->name : NULL, .w2 = fc2->inputs[1]->name,
                            .b2 = b2 ? b2->name : NULL, .gout = p->output->name,
                            .y_prod = y->producer->index};
        n++;
    }
    opq_recognized_free(r); // names point into the teacher graph, which outlives the run
    *out = m;
    *n_out = n;
    return OPQ_OK;
}

// The student's node ranges: fc1 [+ bias] + Relu, then fc2 [+ bias], each contiguous.
static bool student_ranges(struct opq_graph *s, struct mlp *m) {
    struct opq_value *y = opq_graph_value(s, m->y);
    const struct opq_value *b2, *b1;
    struct opq_node *fc2 = linear_of(y, &b2);
    if (!fc2 || !fc2->inputs[0]->producer)
        return false;
    struct opq_node *relu = fc2->inputs[0]->producer;
    if (strcmp(relu->op_type, "Relu") || !only_user(relu->outputs[0]))
        return false;
    struct opq_node *fc1 = linear_of(relu->inputs[0], &b1);
    if (!fc1 || strcmp(fc1->inputs[0]->name, m->x) || strcmp(fc1->inputs[1]->name, m->w1) ||
        strcmp(fc2->inputs[1]->name, m->w2) || !only_user(relu->inputs[0]))
        return false;
    m->r = relu->outputs[0]->name;
    m->a0 = fc1->index;
    m->a1 = relu->index;
    m->b0 = fc2->index;
    m->b1n = y->producer->index;
    // anything else inside the ranges must be inert (no inputs, or nothing reads it)
    for (int i = m->a0; i <= m->b1n; i++) {
        const struct opq_node *n = s->nodes[i];
        if (n == fc1 || n == relu || n == fc2 || n == y->producer ||
            (b1 && n == relu->inputs[0]->producer) || (i > m->a1 && i < m->b0))
            continue;
        bool used = false;
        for (int k = 0; k < n->n_outputs; k++)
            used = used || (n->outputs[k] && n->outputs[k]->n_users > 0);
        if (n->n_inputs > 0 && used)
            return false;
    }
    return m->a0 < m->a1 && m->b0 <= m->b1n && m->a1 < m->b0;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// The q-quantile of the positive entries of v[n] (v is reordered).
static float quantile_pos(float *v, size_t n, float q) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (v[i] > 0.0f)
            v[k++] = v[i];
    if (k == 0)
        return 0.0f;
    qsort(v, k, sizeof(float), cmp_float);
    size_t at = (size_t)floor((double)q * (double)(k - 1));
    return v[at];
}

static enum opq_status nomem(struct opq_ctx *ctx) {
    return opq_set_error(ctx, OPQ_ERR_NOMEM, "MLP reconstruction: out of memory");
}

static struct opq_named_tensor named(struct opq_exec *ex, const char *name, void *data) {
    struct opq_named_tensor nt = {.name = name, .t = *opq_exec_value(ex, name)};
    nt.t.data = data;
    return nt;
}

// ---- training of one MLP ------------------------------------------------------------------------

struct param {
    float *w; // the student's initializer data, updated in place
    size_t n;
    float *g, *m, *v;
};

struct trainer {
    struct opq_ctx *ctx;
    struct opq_exec *ex; // student
    struct opq_graph *g;
    struct opq_exec_tape *ta, *tb1, *tb2;
    const struct opq_mr_opts *o;
    int B, N;
    struct param p[4]; // w1, b1, w2, b2 (absent biases: n = 0)
    float *xb, *yb, *rc, *dr, *dy1, *dy2;
};

// Forward of the batch xb through A and both B branches; loss against yb; with `grad`, the
// parameter gradients into p[].g. Returns the loss through *L.
static enum opq_status step(struct trainer *T, struct mlp *m, bool grad, double *L) {
    const char *wa[2] = {m->w1, m->b1}, *wb[3] = {m->r, m->w2, m->b2};
    int nwa = m->b1 ? 2 : 1, nwb = m->b2 ? 3 : 2;
    struct opq_named_tensor in = named(T->ex, m->x, T->xb);
    enum opq_status st = opq_exec_tape_record(T->ta, m->a0, m->a1, &in, 1, wa, nwa);
    if (st != OPQ_OK)
        return st;
    float *r = opq_exec_tape_value(T->ta, m->r)->data;
    size_t nr = (size_t)T->B * m->per_r, ny = (size_t)T->B * m->per_y;
    for (size_t i = 0; i < nr; i++)
        T->rc[i] = r[i] < m->u ? r[i] : m->u;
    struct opq_named_tensor rin = named(T->ex, m->r, r), rcin = named(T->ex, m->r, T->rc);
    if ((st = opq_exec_tape_record(T->tb1, m->b0, m->b1n, &rin, 1, wb, nwb)) != OPQ_OK ||
        (st = opq_exec_tape_record(T->tb2, m->b0, m->b1n, &rcin, 1, wb, nwb)) != OPQ_OK)
        return st;
    const float *y1 = opq_exec_tape_value(T->tb1, m->y)->data;
    const float *y2 = opq_exec_tape_value(T->tb2, m->y)->data;
    double l1 = 0.0, l2 = 0.0, alpha = (double)T->o->clamp_alpha;
    for (size_t i = 0; i < ny; i++) {
        double h = (double)m->h[i % m->per_y];
        double d1 = (double)y1[i] - (double)T->yb[i], d2 = (double)y2[i] - (double)T->yb[i];
        l1 += h * d1 * d1;
        l2 += h * d2 * d2;
        T->dy1[i] = (float)(2.0 * h * d1 / (double)ny);
        T->dy2[i] = (float)(2.0 * alpha * h * d2 / (double)ny);
    }
    *L = (l1 + alpha * l2) / (double)ny;
    if (!grad)
        return OPQ_OK;
    struct opq_tensor g1[3], g2[3], ga[2];
    struct opq_named_tensor s1 = named(T->ex, m->y, T->dy1), s2 = named(T->ex, m->y, T->dy2);
    if ((st = opq_exec_tape_backward(T->tb1, m->b0, &s1, 1, g1)) != OPQ_OK ||
        (st = opq_exec_tape_backward(T->tb2, m->b0, &s2, 1, g2)) != OPQ_OK)
        return st;
    const float *dr1 = g1[0].data, *dr2 = g2[0].data;
    for (size_t i = 0; i < nr; i++)
        T->dr[i] = dr1[i] + (r[i] < m->u ? dr2[i] : 0.0f);
    struct opq_named_tensor sa = named(T->ex, m->r, T->dr);
    if ((st = opq_exec_tape_backward(T->ta, m->a0, &sa, 1, ga)) != OPQ_OK)
        return st;
    const struct opq_tensor *src[4] = {&ga[0], m->b1 ? &ga[1] : NULL, &g1[1], m->b2 ? &g1[2] : NULL};
    const struct opq_tensor *src2[4] = {NULL, NULL, &g2[1], m->b2 ? &g2[2] : NULL};
    for (int k = 0; k < 4; k++) {
        struct param *P = &T->p[k];
        for (size_t i = 0; src[k] && i < P->n; i++)
            P->g[i] = ((const float *)src[k]->data)[i] +
                      (src2[k] ? ((const float *)src2[k]->data)[i] : 0.0f);
    }
    return OPQ_OK;
}

// Loss of the direct + clamped branches over all N samples (in order).
static enum opq_status full_loss(struct trainer *T, struct mlp *m, double *L) {
    double sum = 0.0;
    for (int b0 = 0; b0 + T->B <= T->N; b0 += T->B) {
        memcpy(T->xb, m->X + (size_t)b0 * m->per_x, sizeof(float) * (size_t)T->B * m->per_x);
        memcpy(T->yb, m->Y + (size_t)b0 * m->per_y, sizeof(float) * (size_t)T->B * m->per_y);
        double l;
        enum opq_status st = step(T, m, false, &l);
        if (st != OPQ_OK)
            return st;
        sum += l;
    }
    *L = sum / (double)(T->N / T->B);
    return OPQ_OK;
}

// The CLI keeps the label pointer between calls: one static label per MLP (modulo 16).
static const char *const progress_label[16] = {
    "MLP reconstruction 0",  "MLP reconstruction 1",  "MLP reconstruction 2",
    "MLP reconstruction 3",  "MLP reconstruction 4",  "MLP reconstruction 5",
    "MLP reconstruction 6",  "MLP reconstruction 7",  "MLP reconstruction 8",
    "MLP reconstruction 9",  "MLP reconstruction 10", "MLP reconstruction 11",
    "MLP reconstruction 12", "MLP reconstruction 13", "MLP reconstruction 14",
    "MLP reconstruction 15"};

// Trains m for *iters steps; with budget_s > 0, fewer if a step (about three no-gradient passes,
// timed on the initial loss) would overrun it. *iters receives the count used.
static enum opq_status train_mlp(struct trainer *T, struct mlp *m, double budget_s, int *iters_io,
                                 uint64_t stream, double *L0, double *L1) {
    struct opq_graph *g = T->g;
    const char *pn[4] = {m->w1, m->b1, m->w2, m->b2};
    enum opq_status st = OPQ_OK;
    size_t nr = (size_t)T->B * m->per_r, ny = (size_t)T->B * m->per_y;
    T->xb = malloc(sizeof(float) * (size_t)T->B * m->per_x);
    T->yb = malloc(sizeof(float) * ny);
    T->rc = malloc(sizeof(float) * nr);
    T->dr = malloc(sizeof(float) * nr);
    T->dy1 = malloc(sizeof(float) * ny);
    T->dy2 = malloc(sizeof(float) * ny);
    if (!T->xb || !T->yb || !T->rc || !T->dr || !T->dy1 || !T->dy2)
        return nomem(T->ctx);
    for (int k = 0; k < 4; k++) {
        struct param *P = &T->p[k];
        memset(P, 0, sizeof(*P));
        if (!pn[k])
            continue;
        struct opq_value *v = opq_graph_value(g, pn[k]);
        P->w = v->t.data;
        opq_tensor_numel(&v->t, &P->n);
        P->g = calloc(P->n, sizeof(float));
        P->m = calloc(P->n, sizeof(float));
        P->v = calloc(P->n, sizeof(float));
        if (!P->g || !P->m || !P->v)
            return nomem(T->ctx);
    }
    double tl = opq_now_s();
    if ((st = full_loss(T, m, L0)) != OPQ_OK)
        return st;
    int iters = *iters_io;
    if (budget_s > 0.0) {
        double per_iter = 3.0 * (opq_now_s() - tl) / (double)(T->N / T->B);
        double fit = (budget_s - 2.0 * (opq_now_s() - tl)) / fmax(per_iter, 1e-9);
        if (fit < (double)iters)
            iters = fit < 10.0 ? 10 : (int)fit;
    }
    *iters_io = iters;
    struct opq_rng rng;
    opq_rng_seed(&rng, T->o->seed, 7000u + stream);
    for (int it = 0; it < iters && st == OPQ_OK; it++) {
        for (int b = 0; b < T->B; b++) {
            uint32_t j = opq_rng_below(&rng, (uint32_t)T->N);
            memcpy(T->xb + (size_t)b * m->per_x, m->X + (size_t)j * m->per_x,
                   sizeof(float) * m->per_x);
            memcpy(T->yb + (size_t)b * m->per_y, m->Y + (size_t)j * m->per_y,
                   sizeof(float) * m->per_y);
        }
        double l;
        if ((st = step(T, m, true, &l)) != OPQ_OK)
            break;
        float lr = (float)(0.5 * (double)T->o->lr *
                           (1.0 + cos(3.14159265358979323846 * (double)it / (double)iters)));
        for (int k = 0; k < 4; k++)
            if (T->p[k].n)
                opq_adam_step(T->p[k].w, T->p[k].g, T->p[k].m, T->p[k].v, T->p[k].n, lr, it + 1);
        opq_progress(T->ctx, progress_label[stream % 16], it + 1, iters);
    }
    if (st == OPQ_OK)
        st = full_loss(T, m, L1);
    return st;
}

static void trainer_free_bufs(struct trainer *T) {
    free(T->xb);
    free(T->yb);
    free(T->rc);
    free(T->dr);
    free(T->dy1);
    free(T->dy2);
    T->xb = T->yb = T->rc = T->dr = T->dy1 = T->dy2 = NULL;
    for (int k = 0; k < 4; k++) {
        free(T->p[k].g);
        free(T->p[k].m);
        free(T->p[k].v);
        memset(&T->p[k], 0, sizeof(T->p[k]));
    }
}

// ---- driver -------------------------------------------------------------------------------------

static void set_param_flag(struct opq_graph *g, const struct mlp *m, int n, bool on) {
    for (int i = 0; i < n; i++) {
        const char *pn[4] = {m[i].w1, m[i].b1, m[i].w2, m[i].b2};
        for (int k = 0; k < 4; k++) {
            struct opq_value *v = pn[k] ? opq_graph_value(g, pn[k]) : NULL;
            if (v && on)
                v->kind |= OPQ_VK_PARAM;
            else if (v)
                v->kind &= ~(uint32_t)OPQ_VK_PARAM;
        }
    }
}

// out = h rescaled to RMS 1 (all ones if h is all zero).
static void rms_one(const double *h, size_t n, float *out) {
    double ss = 0.0;
    for (size_t k = 0; k < n; k++)
        ss += h[k] * h[k];
    double rms = sqrt(ss / (double)n);
    for (size_t k = 0; k < n; k++)
        out[k] = rms > 0.0 ? (float)(h[k] / rms) : 1.0f;
}

// APH weights of every MLP output in the teacher, rescaled to RMS 1 (exact: K <= 64 classes;
// else per MLP from its targets in the group loop).
static enum opq_status aph_exact(struct opq_ctx *ctx, struct opq_exec *ext, struct opq_graph *tg,
                                 const char *in, const float *X0, int N, int B, float T,
                                 struct mlp *m, int nm) {
    const char **outs = calloc((size_t)nm, sizeof(*outs));
    int *stops = calloc((size_t)nm, sizeof(int));
    double **h = calloc((size_t)nm, sizeof(*h));
    enum opq_status st = OPQ_OK;
    if (!outs || !stops || !h)
        st = nomem(ctx);
    for (int i = 0; st == OPQ_OK && i < nm; i++) {
        outs[i] = m[i].y;
        stops[i] = m[i].y_prod + 1;
        if (!(h[i] = malloc(sizeof(double) * m[i].per_y)))
            st = nomem(ctx);
    }
    if (st == OPQ_OK)
        st = opq_recon_aph_many(ext, tg, in, X0, N, B, T, outs, stops, nm, h);
    for (int i = 0; st == OPQ_OK && i < nm; i++)
        rms_one(h[i], m[i].per_y, m[i].h);
    for (int i = 0; h && i < nm; i++)
        free(h[i]);
    free(h);
    free(outs);
    free(stops);
    return st;
}

enum opq_status opq_mr_run(struct opq_ctx *ctx, struct opq_model *teacher,
                           struct opq_model *student, struct opq_calib_src *src, int n,
                           const struct opq_mr_opts *o, int *n_mlps) {
    struct opq_graph *tg = teacher->graph, *sg = student->graph;
    struct mlp *m = NULL;
    int nm = 0, B = o->batch;
    struct opq_exec *ext = NULL, *exs = NULL;
    struct trainer T = {.ctx = ctx, .o = o, .g = sg};
    float *X0 = NULL, *qbuf = NULL;
    const char **pins = NULL;
    enum opq_status st;
    double t_start = opq_now_s();
    *n_mlps = 0;
    if (opq_calib_n_inputs(src) != 1)
        return opq_set_error(ctx, OPQ_ERR_UNSUPPORTED,
                             "MLP reconstruction: models with %d inputs are not supported",
                             opq_calib_n_inputs(src));
    if (o->count > 0 && o->count < n)
        n = o->count;
    if (B < 1 || o->iters < 1 || n < 1)
        return opq_set_error(ctx, OPQ_ERR_USAGE, "MLP reconstruction: bad batch, iterations or "
                                                 "sample count");
    B = B > n ? n : B;
    int N = n / B * B;
    T.B = B;
    T.N = N;
    if ((st = find_mlps(ctx, tg, &m, &nm)) != OPQ_OK)
        return st;
    int keep = 0;
    for (int i = 0; i < nm; i++) {
        if (student_ranges(sg, &m[i]))
            m[keep++] = m[i];
        else
            opq_log(ctx, OPQ_LOG_INFO, "MLP reconstruction: '%s' not found as fc1 -> Relu -> fc2 "
                    "in the swapped model, left as it is", m[i].y);
    }
    nm = keep;
    if (nm == 0)
        goto out;
    // the teacher, planned with every MLP's input, output and GELU output kept
    pins = calloc((size_t)nm * 3, sizeof(*pins));
    if (!pins) {
        st = nomem(ctx);
        goto out;
    }
    for (int i = 0; i < nm; i++) {
        pins[3 * i] = m[i].x;
        pins[3 * i + 1] = m[i].y;
        pins[3 * i + 2] = m[i].gout;
    }
    const struct opq_tensor *s0 = opq_calib_sample_shape(src, 0);
    struct opq_named_tensor shape = {.name = opq_calib_input_name(src, 0), .t = *s0};
    shape.t.ndim = s0->ndim + 1;
    shape.t.shape[0] = B;
    memcpy(&shape.t.shape[1], s0->shape, sizeof(int64_t) * (size_t)s0->ndim);
    shape.t.data = NULL;
    struct opq_exec_opts eo = {.batch = B, .pinned = pins, .n_pinned = nm * 3};
    if ((st = opq_exec_plan(ctx, teacher, &shape, 1, &eo, &ext)) != OPQ_OK)
        goto out;
    set_param_flag(sg, m, nm, true);
    struct opq_exec_opts es = {.batch = B};
    if ((st = opq_exec_plan(ctx, student, &shape, 1, &es, &exs)) != OPQ_OK)
        goto out;
    T.ex = exs;
    if ((st = opq_exec_tape_new(exs, &T.ta)) != OPQ_OK ||
        (st = opq_exec_tape_new(exs, &T.tb1)) != OPQ_OK ||
        (st = opq_exec_tape_new(exs, &T.tb2)) != OPQ_OK)
        goto out;
    size_t per_in = opq_calib_sample_bytes(src, 0) / sizeof(float);
    size_t per_g_max = 0;
    for (int i = 0; i < nm; i++) {
        m[i].per_x = opq_exec_value(ext, m[i].x)->nbytes / sizeof(float) / (size_t)B;
        m[i].per_y = opq_exec_value(ext, m[i].y)->nbytes / sizeof(float) / (size_t)B;
        m[i].per_r = opq_exec_value(ext, m[i].gout)->nbytes / sizeof(float) / (size_t)B;
        per_g_max = m[i].per_r > per_g_max ? m[i].per_r : per_g_max;
        if (!(m[i].h = malloc(sizeof(float) * m[i].per_y))) {
            st = nomem(ctx);
            goto out;
        }
        for (size_t k = 0; k < m[i].per_y; k++)
            m[i].h[k] = 1.0f;
    }
    X0 = malloc(sizeof(float) * (size_t)N * per_in);
    int nq = N < 64 ? N : 64; // samples for the clamp quantile
    qbuf = malloc(sizeof(float) * per_g_max * (size_t)nq);
    if (!X0 || !qbuf) {
        st = nomem(ctx);
        goto out;
    }
    if ((st = opq_calib_read(src, 0, 0, N, X0)) != OPQ_OK)
        goto out;
    const struct opq_tensor *lt = opq_exec_value(ext, tg->outputs[0]->name);
    int64_t K = (int64_t)(lt->nbytes / sizeof(float)) / B;
    bool exact = o->aph && K <= OPQ_RECON_APH_MAX_EXACT;
    if (exact && (st = aph_exact(ctx, ext, tg, shape.name, X0, N, B, o->temp, m, nm)) != OPQ_OK)
        goto out;
    // groups of MLPs whose teacher inputs and targets fit in o->mem_mb
    for (int g0 = 0; g0 < nm && st == OPQ_OK;) {
        size_t bytes = 0;
        int g1 = g0;
        while (g1 < nm) {
            size_t b = sizeof(float) * (size_t)N * (m[g1].per_x + m[g1].per_y);
            if (g1 > g0 && bytes + b > o->mem_mb * 1024u * 1024u)
                break;
            bytes += b;
            g1++;
        }
        for (int i = g0; i < g1 && st == OPQ_OK; i++) {
            m[i].X = malloc(sizeof(float) * (size_t)N * m[i].per_x);
            m[i].Y = malloc(sizeof(float) * (size_t)N * m[i].per_y);
            if (!m[i].X || !m[i].Y)
                st = nomem(ctx);
        }
        for (int b0 = 0; b0 < N && st == OPQ_OK; b0 += B) {
            struct opq_named_tensor in = shape;
            in.t.data = X0 + (size_t)b0 * per_in;
            if ((st = opq_exec_run_range(ext, 0, tg->n_nodes - 1, &in, 1)) != OPQ_OK)
                break;
            for (int i = g0; i < g1; i++) {
                memcpy(m[i].X + (size_t)b0 * m[i].per_x, opq_exec_value(ext, m[i].x)->data,
                       sizeof(float) * (size_t)B * m[i].per_x);
                memcpy(m[i].Y + (size_t)b0 * m[i].per_y, opq_exec_value(ext, m[i].y)->data,
                       sizeof(float) * (size_t)B * m[i].per_y);
            }
        }
        for (int i = g0; i < g1 && st == OPQ_OK; i++) {
            // the clamp bound from the first nq samples' post-GELU values
            for (int b0 = 0; b0 < nq && st == OPQ_OK; b0 += B) {
                struct opq_named_tensor in = shape;
                in.t.data = X0 + (size_t)b0 * per_in;
                if ((st = opq_exec_run_range(ext, 0, m[i].y_prod, &in, 1)) != OPQ_OK)
                    break;
                int take = nq - b0 < B ? nq - b0 : B;
                memcpy(qbuf + (size_t)b0 * m[i].per_r, opq_exec_value(ext, m[i].gout)->data,
                       sizeof(float) * (size_t)take * m[i].per_r);
            }
            if (st != OPQ_OK)
                break;
            m[i].u = quantile_pos(qbuf, (size_t)nq * m[i].per_r, o->clamp_pct);
            if (o->aph && !exact) {
                double *h = malloc(sizeof(double) * m[i].per_y);
                if (!h) {
                    st = nomem(ctx);
                    break;
                }
                st = opq_recon_aph(ext, tg, m[i].y, m[i].y_prod + 1, tg->n_nodes - 1, m[i].Y, N,
                                   B, o->temp, h);
                if (st == OPQ_OK)
                    rms_one(h, m[i].per_y, m[i].h);
                free(h);
                if (st != OPQ_OK)
                    break;
            }
            double t0 = opq_now_s(), L0 = 0.0, L1 = 0.0;
            int iters = o->iters;
            double share = 0.0; // the remaining time shared by the remaining MLPs
            if (o->seconds > 0.0)
                share = fmax(o->seconds - (opq_now_s() - t_start), 0.0) / (double)(nm - i);
            st = train_mlp(&T, &m[i], share, &iters, (uint64_t)i, &L0, &L1);
            trainer_free_bufs(&T);
            if (st == OPQ_OK)
                opq_log(ctx, OPQ_LOG_INFO,
                        "MLP reconstruction %-40s %5d iters  loss %.4g -> %.4g  clamp %.3g  %.1f s",
                        m[i].y, iters, L0, L1, (double)m[i].u, opq_now_s() - t0);
            (*n_mlps)++;
        }
        for (int i = g0; i < g1; i++) {
            free(m[i].X);
            free(m[i].Y);
            m[i].X = m[i].Y = NULL;
        }
        g0 = g1;
    }
out:
    trainer_free_bufs(&T);
    opq_exec_tape_free(T.ta);
    opq_exec_tape_free(T.tb1);
    opq_exec_tape_free(T.tb2);
    if (m)
        set_param_flag(sg, m, nm, false);
    for (int i = 0; m && i < nm; i++) {
        free(m[i].X);
        free(m[i].Y);
        free(m[i].h);
    }
    free(m);
    free(pins);
    free(X0);
    free(qbuf);
    opq_exec_free(ext);
    opq_exec_free(exs);
    return st;
}
