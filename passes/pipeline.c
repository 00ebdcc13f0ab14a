/* pipeline.c: the pass registry (expanded from passes.def), the method presets and the driver
 * that runs passes in order, compacts dead nodes after each one and, when asked (always without
 * NDEBUG), verifies the graph after each one so a broken invariant is blamed on the pass that
 * caused it. */
#define _POSIX_C_SOURCE 200809L // strnlen
#include "pass.h"

#include <stdio.h>
#include <string.h>

static const struct opq_pass registry[] = {
#define OPQ_PASS(ident, name, doc) {name, doc, opq_pass_run_##ident},
#include "passes.def"
#undef OPQ_PASS
};

// Presets. Each list names registered passes (checked by tests/passes/test_pipeline.c).
struct method {
    const char *name;
    const char *doc;
    const char *passes[8]; // NULL-terminated
};

static const struct method methods[] = {
    {"none", "no quantization: only the function-preserving clean-up passes",
     {"remove-identity", "cleanup-dead", NULL}},
    {"rtn", "calibrated round-to-nearest quantization (the default)",
     {"remove-identity", "cleanup-dead", "defer-softmax", "quantize", NULL}},
    {"erq", "ERQ: activation and weight quantization error reduction (ridge regression, "
            "rounding refinement, dual uniform weights)",
     {"remove-identity", "cleanup-dead", "defer-softmax", "quantize-erq", NULL}},
    {"aphq", "APHQ-ViT block reconstruction: AdaRound + LSQ per unit, APH-weighted loss, QDrop "
             "(MLP reconstruction first with --mlp-recon)",
     {"remove-identity", "cleanup-dead", "defer-softmax", "quantize-aphq", NULL}},
    {"flexround", "FlexRound in the block-reconstruction engine: learned grid and element-wise "
                  "division before rounding + LSQ per unit, APH-weighted loss (--recon-loss), "
                  "QDrop",
     {"remove-identity", "cleanup-dead", "defer-softmax", "quantize-flexround", NULL}},
};

int opq_method_passes(const char *name, const char **out, int cap) {
    for (size_t i = 0; i < ARRAY_SIZE(methods); i++) {
        if (strcmp(methods[i].name, name) != 0)
            continue;
        int n = 0;
        while (methods[i].passes[n] && n < cap) {
            out[n] = methods[i].passes[n];
            n++;
        }
        return n;
    }
    return -1;
}

bool opq_method_quantizes(const char *name) {
    for (size_t i = 0; i < ARRAY_SIZE(methods); i++) {
        if (strcmp(methods[i].name, name) != 0)
            continue;
        for (int k = 0; methods[i].passes[k]; k++)
            if (strcmp(methods[i].passes[k], "quantize") == 0 ||
                strcmp(methods[i].passes[k], "quantize-erq") == 0 ||
                strcmp(methods[i].passes[k], "quantize-aphq") == 0 ||
                strcmp(methods[i].passes[k], "quantize-flexround") == 0)
                return true;
    }
    return false;
}

int opq_pass_count(void) {
    return (int)ARRAY_SIZE(registry);
}

const struct opq_pass *opq_pass_at(int i) {
    return (i >= 0 && i < opq_pass_count()) ? &registry[i] : NULL;
}

const struct opq_pass *opq_pass_find(const char *name) {
    for (size_t i = 0; i < ARRAY_SIZE(registry); i++)
        if (strcmp(registry[i].name, name) == 0)
            return &registry[i];
    return NULL;
}

int opq_method_count(void) {
    return (int)ARRAY_SIZE(methods);
}

const char *opq_method_name(int i) {
    return (i >= 0 && i < opq_method_count()) ? methods[i].name : NULL;
}

const char *opq_method_doc(int i) {
    return (i >= 0 && i < opq_method_count()) ? methods[i].doc : NULL;
}

// Rewrites the sticky message as "<prefix><message>" and its status as `st`.
static enum opq_status prefix_error(struct opq_ctx *ctx, enum opq_status st, const char *prefix) {
    if (!ctx)
        return st;
    if (ctx->status == OPQ_OK)
        return opq_set_error(ctx, st, "%s%s", prefix, opq_status_str(st));
    char msg[OPQ_ERRMSG_MAX];
    size_t np = strnlen(prefix, sizeof(msg) - 1);
    size_t nm = strnlen(ctx->errmsg, sizeof(msg) - 1 - np);
    memcpy(msg, prefix, np);
    memcpy(msg + np, ctx->errmsg, nm);
    msg[np + nm] = '\0';
    memcpy(ctx->errmsg, msg, sizeof(msg));
    ctx->status = st;
    return st;
}

static long live_nodes(const struct opq_graph *g) {
    long c = 0;
    for (int i = 0; i < g->n_nodes; i++)
        c += !(g->nodes[i]->flags & OPQ_NF_DEAD);
    return c;
}

enum opq_status opq_pipeline_run_passes(struct opq_ctx *ctx, struct opq_model *model,
                                        const struct opq_pass *const *passes, int n,
                                        const struct opq_pipeline_opts *opts) {
    static const struct opq_pipeline_opts defaults = {0};
    struct opq_pipeline_opts              o        = opts ? *opts : defaults;
#ifndef NDEBUG
    o.verify = true;
#endif
    struct opq_graph *g  = model->graph;
    enum opq_status   st = OPQ_OK;
    char              prefix[160];
    if (o.verify && (st = opq_graph_verify(g)) != OPQ_OK)
        return prefix_error(ctx, st, "before the first pass: ");
    for (int i = 0; i < n; i++) {
        const struct opq_pass *p  = passes[i];
        struct opq_pass_ctx    pc = {.ctx = ctx, .model = model, .opts = &o, .pass = p};
        pc.stats.n_nodes_before   = live_nodes(g);
        opq_log(ctx, OPQ_LOG_DEBUG, "pass %s: start (%ld nodes)", p->name,
                pc.stats.n_nodes_before);
        st = p->run(&pc, g);
        if (st != OPQ_OK) {
            snprintf(prefix, sizeof(prefix), "pass %s: ", p->name);
            return prefix_error(ctx, st, prefix);
        }
        opq_graph_compact(g);
        pc.stats.n_nodes_after = g->n_nodes;
        if (o.verify && (st = opq_graph_verify(g)) != OPQ_OK) {
            // A pass that leaves a broken graph is a bug in the pass, whatever the input was.
            snprintf(prefix, sizeof(prefix), "pass %s left an invalid graph: ", p->name);
            return prefix_error(ctx, OPQ_ERR_INTERNAL, prefix);
        }
        opq_log(ctx, OPQ_LOG_INFO, "pass %s: %ld rewrite(s), %ld -> %ld nodes", p->name,
                pc.stats.n_rewrites, pc.stats.n_nodes_before, pc.stats.n_nodes_after);
    }
    return OPQ_OK;
}

// Appends ", name" entries of the registry or the methods to buf.
static void list_names(char *buf, size_t cap, bool of_methods) {
    size_t len = strlen(buf);
    int    n   = of_methods ? opq_method_count() : opq_pass_count();
    for (int i = 0; i < n && len < cap; i++) {
        const char *name = of_methods ? opq_method_name(i) : opq_pass_at(i)->name;
        if (!name)
            break;
        int         w    = snprintf(buf + len, cap - len, "%s%s", i ? ", " : "", name);
        if (w < 0)
            break;
        len += (size_t)w;
    }
}

static const struct method *method_find(const char *name) {
    for (size_t i = 0; i < ARRAY_SIZE(methods); i++)
        if (strcmp(methods[i].name, name) == 0)
            return &methods[i];
    return NULL;
}

enum opq_status opq_pipeline_check_names(struct opq_ctx *ctx, const char *const *names, int n) {
    for (int i = 0; i < n; i++) {
        if (!opq_pass_find(names[i])) {
            char valid[512] = "";
            list_names(valid, sizeof(valid), false);
            return opq_set_error(ctx, OPQ_ERR_USAGE, "unknown pass '%s' (valid: %s)", names[i],
                                 valid);
        }
    }
    return OPQ_OK;
}

enum opq_status opq_pipeline_check_method(struct opq_ctx *ctx, const char *method) {
    if (method_find(method))
        return OPQ_OK;
    char valid[512] = "";
    list_names(valid, sizeof(valid), true);
    return opq_set_error(ctx, OPQ_ERR_USAGE, "unknown method '%s' (valid: %s)", method, valid);
}

enum opq_status opq_pipeline_run(struct opq_ctx *ctx, struct opq_model *model,
                                 const char *const *names, int n,
                                 const struct opq_pipeline_opts *opts) {
    const struct opq_pass *passes[64];
    if (n < 0 || n > (int)ARRAY_SIZE(passes))
        return opq_set_error(ctx, OPQ_ERR_USAGE, "too many passes (%d, at most %d)", n,
                             (int)ARRAY_SIZE(passes));
    enum opq_status st = opq_pipeline_check_names(ctx, names, n);
    if (st != OPQ_OK)
        return st;
    for (int i = 0; i < n; i++)
        passes[i] = opq_pass_find(names[i]);
    return opq_pipeline_run_passes(ctx, model, passes, n, opts);
}

enum opq_status opq_pipeline_run_method(struct opq_ctx *ctx, struct opq_model *model,
                                        const char *method, const struct opq_pipeline_opts *opts) {
    enum opq_status st = opq_pipeline_check_method(ctx, method);
    if (st != OPQ_OK)
        return st;
    const struct method *m = method_find(method);
    int                  n = 0;
    while (m->passes[n])
        n++;
    opq_log(ctx, OPQ_LOG_DEBUG, "method %s: %d pass(es)", method, n);
    return opq_pipeline_run(ctx, model, m->passes, n, opts);
}
