/* gelu_to_relu.c: swaps every GELU for ReLU, the first step of APHQ-ViT's MLP reconstruction
 * (the recovery training comes with the reconstruction methods).
 *
 * Matches: what recognize.h calls a GELU: the Gelu op (opset 20, either approximate mode), the
 * Erf chain (Div|Mul, Erf, Add, Mul, Mul in any operand order) and the Tanh chain.
 * Rewrites: a Relu reading the GELU's input replaces the chain; every use of the GELU's output
 * becomes a use of the Relu's; the chain's nodes are marked dead (clean-up then drops the
 * constants only they used).
 * Preserves: a GELU whose output is a graph output, or whose intermediate values are read
 * outside the chain, is left alone (logged). Nothing else changes.
 * Reports: with calibration data in the options (--calib), the float change it causes, measured
 * on up to 256 calibration samples: top-1 agreement and logits SQNR of the ReLU model against the
 * GELU model (logged at info level). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calib_data.h"
#include "exec.h"
#include "pass.h"
#include "quantize.h"
#include "recognize.h"

// True if every value a chain node produces, other than the chain's output, is read only by
// chain nodes.
static bool chain_closed(const struct opq_pattern *p) {
    for (int i = 0; i < p->n_nodes; i++) {
        const struct opq_node *n = p->nodes[i];
        for (int o = 0; o < n->n_outputs; o++) {
            const struct opq_value *v = n->outputs[o];
            if (!v || v == p->output)
                continue;
            if (v->kind & OPQ_VK_OUTPUT)
                return false;
            for (int u = 0; u < v->n_users; u++) {
                bool member = false;
                for (int k = 0; k < p->n_nodes; k++)
                    member |= v->users[u] == p->nodes[k];
                if (!member)
                    return false;
            }
        }
    }
    return true;
}

// Logits of `m` on samples [0, n) of src, batch by batch, into out (n * classes floats, caller
// frees); *classes receives the last-dim size of the first graph output.
static enum opq_status logits_of(struct opq_ctx *ctx, struct opq_model *m,
                                 struct opq_calib_src *src, int n, float **out, size_t *per) {
    enum opq_status st = OPQ_OK;
    int k = opq_calib_n_inputs(src);
    struct opq_named_tensor in[16];
    void *bufs[16] = {0};
    struct opq_exec *ex = NULL;
    *out = NULL;
    for (int i = 0; i < k && st == OPQ_OK; i++) {
        bufs[i] = malloc(opq_calib_sample_bytes(src, i) * (size_t)n);
        if (!bufs[i])
            st = OPQ_ERR_NOMEM;
    }
    if (st == OPQ_OK)
        st = opq_calib_batch(src, 0, n, bufs, in);
    struct opq_exec_opts eo = {.batch = n};
    struct opq_tensor y;
    size_t numel;
    if (st == OPQ_OK)
        st = opq_exec_plan(ctx, m, in, k, &eo, &ex);
    if (st == OPQ_OK)
        st = opq_exec_run(ex, in, k, &y, 1);
    if (st == OPQ_OK && (y.dtype != OPQ_DTYPE_FLOAT || !opq_tensor_numel(&y, &numel) || y.ndim < 1))
        st = OPQ_ERR_UNSUPPORTED;
    if (st == OPQ_OK) {
        *out = malloc(numel * sizeof(float));
        if (!*out)
            st = OPQ_ERR_NOMEM;
        else
            memcpy(*out, y.data, numel * sizeof(float));
        *per = numel / (size_t)n;
    }
    opq_exec_free(ex);
    for (int i = 0; i < k; i++)
        free(bufs[i]);
    return st;
}

void opq_pass_log_float_change(struct opq_pass_ctx *pc, struct opq_model *before,
                               const char *what) {
    const struct opq_quant_opts *q = pc->opts->quant;
    struct opq_calib_src *src = NULL;
    float *a = NULL, *b = NULL;
    size_t per = 0, per_b = 0;
    if (!q || !q->calib.path || opq_calib_open(pc->ctx, before, &q->calib, &src) != OPQ_OK)
        goto out;
    int n = opq_calib_count(src) < 256 ? opq_calib_count(src) : 256;
    if (logits_of(pc->ctx, before, src, n, &a, &per) != OPQ_OK ||
        logits_of(pc->ctx, pc->model, src, n, &b, &per_b) != OPQ_OK || per != per_b || per == 0)
        goto out;
    double sig = 0.0, noise = 0.0;
    int agree = 0;
    for (int s = 0; s < n; s++) {
        const float *x = a + (size_t)s * per, *y = b + (size_t)s * per;
        size_t ax = 0, ay = 0;
        for (size_t c = 0; c < per; c++) {
            sig += (double)x[c] * (double)x[c];
            noise += ((double)x[c] - (double)y[c]) * ((double)x[c] - (double)y[c]);
            ax = x[c] > x[ax] ? c : ax;
            ay = y[c] > y[ay] ? c : ay;
        }
        agree += ax == ay;
    }
    opq_log(pc->ctx, OPQ_LOG_INFO,
            "%s: float change (%s) on %d calibration samples: top-1 agreement %.4f, "
            "logits SQNR %.2f dB",
            pc->pass->name, what, n, (double)agree / n, noise > 0.0 ? 10.0 * log10(sig / noise) : 200.0);
out:
    opq_ctx_clear_error(pc->ctx); // a report that could not be made is not an error of the pass
    free(a);
    free(b);
    opq_calib_close(src);
}

enum opq_status opq_pass_gelu_swap(struct opq_pass_ctx *pc, struct opq_graph *g) {
    struct opq_recognized *r = NULL;
    enum opq_status st = opq_recognize(pc->ctx, g, &r);
    for (int i = 0; st == OPQ_OK && i < r->n_items; i++) {
        const struct opq_pattern *p = &r->items[i];
        if (p->kind != OPQ_PAT_GELU || !p->input || !p->output)
            continue;
        if ((p->output->kind & OPQ_VK_OUTPUT) || !chain_closed(p)) {
            opq_log(pc->ctx, OPQ_LOG_INFO, "gelu-to-relu: '%s' left as GELU (its values are read "
                    "outside the chain)", p->output->name);
            continue;
        }
        char hint[512];
        snprintf(hint, sizeof(hint), "%s_relu", p->output->name);
        struct opq_value *y = opq_graph_value_new_unique(g, hint);
        if (!y) {
            st = OPQ_ERR_NOMEM;
            break;
        }
        y->t      = p->output->t;
        y->t.data = NULL;
        memcpy(y->dim_param, p->output->dim_param, sizeof(y->dim_param));
        if ((st = opq_graph_replace_uses(g, p->output, y)) != OPQ_OK)
            break;
        for (int k = 0; k < p->n_nodes; k++)
            opq_graph_mark_dead(g, p->nodes[k]);
        struct opq_value *x = p->input;
        snprintf(hint, sizeof(hint), "%s_Relu", p->nodes[p->n_nodes - 1]->name);
        struct opq_node *relu = NULL;
        if ((st = opq_graph_add_node(g, "Relu", "", hint, &x, 1, &y, 1, &relu)) != OPQ_OK)
            break;
        // in the chain's place, so fc1 -> Relu -> fc2 stays contiguous after the sort
        opq_graph_move_after(g, relu, p->nodes[p->n_nodes - 1]);
        pc->stats.n_rewrites++;
    }
    opq_recognized_free(r);
    if (st == OPQ_OK && pc->stats.n_rewrites > 0) {
        opq_graph_compact(g);
        st = opq_graph_sort(g);
    }
    return st;
}

enum opq_status opq_pass_run_gelu_to_relu(struct opq_pass_ctx *pc, struct opq_graph *g) {
    struct opq_model *before = NULL; // for the report (best effort: no copy, no report)
    if (pc->opts->quant && pc->opts->quant->calib.path &&
        opq_model_clone(pc->ctx, pc->model, &before) != OPQ_OK)
        opq_ctx_clear_error(pc->ctx);
    enum opq_status st = opq_pass_gelu_swap(pc, g);
    if (st == OPQ_OK && before && pc->stats.n_rewrites > 0)
        opq_pass_log_float_change(pc, before, "GELU -> ReLU");
    opq_model_free(before);
    return st;
}
