/* inspect.c: `onnx-ptq inspect MODEL.onnx`: a summary of a model on stdout: producer, IR
 * version, opsets, graph inputs and outputs with shapes (symbolic dims by name), operator counts
 * (most frequent first) and the parameter count and bytes per dtype. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "recognize.h"
#include "ir.h"

static const char inspect_usage[] = "usage: onnx-ptq inspect MODEL.onnx\n"
                                    "prints producer, IR version, opsets, inputs and outputs, "
                                    "operator counts and parameter sizes\n";

static void print_type(const struct opq_value *v) {
    printf("%s ", opq_dtype_name(v->t.dtype));
    if (v->t.ndim < 0) {
        printf("[rank unknown]");
        return;
    }
    printf("[");
    for (int i = 0; i < v->t.ndim; i++) {
        if (i)
            printf(", ");
        if (v->dim_param[i] && *v->dim_param[i])
            printf("%s", v->dim_param[i]);
        else if (v->t.shape[i] < 0)
            printf("?");
        else
            printf("%lld", (long long)v->t.shape[i]);
    }
    printf("]");
}

struct op_count {
    const char *domain;
    const char *op_type;
    long        n;
};

static int op_count_cmp(const void *pa, const void *pb) {
    const struct op_count *a = pa;
    const struct op_count *b = pb;
    if (a->n != b->n)
        return a->n > b->n ? -1 : 1;
    int c = strcmp(a->domain, b->domain);
    return c ? c : strcmp(a->op_type, b->op_type);
}

static int print_ops(const struct opq_graph *g) {
    struct op_count *ops = calloc((size_t)g->n_nodes + 1, sizeof(*ops));
    int              n   = 0;
    if (!ops) {
        cli_error("out of memory");
        return CLI_EXIT_INTERNAL;
    }
    for (int i = 0; i < g->n_nodes; i++) {
        const struct opq_node *node = g->nodes[i];
        int                    j    = 0;
        while (j < n && !(strcmp(ops[j].op_type, node->op_type) == 0
                          && strcmp(ops[j].domain, node->domain) == 0))
            j++;
        if (j == n)
            ops[n++] = (struct op_count){node->domain, node->op_type, 0};
        ops[j].n++;
    }
    qsort(ops, (size_t)n, sizeof(*ops), op_count_cmp);
    printf("nodes: %d (%d op types)\n", g->n_nodes, n);
    for (int i = 0; i < n; i++)
        printf("  %-24s %6ld%s%s\n", ops[i].op_type, ops[i].n, *ops[i].domain ? "  domain " : "",
               ops[i].domain);
    free(ops);
    return CLI_EXIT_OK;
}

static void print_params(const struct opq_graph *g) {
    size_t elems[OPQ_DTYPE_COUNT] = {0};
    size_t bytes[OPQ_DTYPE_COUNT] = {0};
    int    count[OPQ_DTYPE_COUNT] = {0};
    size_t total_e = 0, total_b = 0;
    for (int i = 0; i < g->n_inits; i++) {
        const struct opq_tensor *t  = &g->inits[i]->t;
        int                      dt = (t->dtype > 0 && t->dtype < OPQ_DTYPE_COUNT) ? t->dtype : 0;
        size_t                   numel = 0;
        if (!opq_tensor_numel(t, &numel))
            numel = 0;
        elems[dt] += numel;
        bytes[dt] += t->nbytes;
        count[dt]++;
        total_e += numel;
        total_b += t->nbytes;
    }
    printf("parameters: %zu in %d initializers, %zu bytes\n", total_e, g->n_inits, total_b);
    for (int dt = 0; dt < OPQ_DTYPE_COUNT; dt++)
        if (count[dt])
            printf("  %-10s %12zu elements %12zu bytes  (%d tensors)\n",
                   opq_dtype_name((enum opq_dtype)dt), elems[dt], bytes[dt], count[dt]);
}

// What the recognition layer found: LayerNorms, GELUs, attention cores, transformer blocks.
static int print_patterns(struct opq_ctx *ctx, const struct opq_graph *g) {
    struct opq_recognized *r = NULL;
    enum opq_status        st = opq_recognize(ctx, g, &r);
    if (st != OPQ_OK)
        return cli_fail(ctx, st, "inspect");
    size_t need = opq_recognize_describe(r, NULL, 0);
    char  *buf  = malloc(need + 1);
    if (!buf) {
        opq_recognized_free(r);
        cli_error("out of memory");
        return CLI_EXIT_INTERNAL;
    }
    opq_recognize_describe(r, buf, need + 1);
    fputs(buf, stdout);
    if (need && buf[need - 1] != '\n')
        fputc('\n', stdout);
    free(buf);
    opq_recognized_free(r);
    return CLI_EXIT_OK;
}

int cmd_inspect(struct opq_ctx *ctx, int argc, char **argv) {
    const char *path = NULL;
    bool        dash = false;
    for (int i = 1; i < argc; i++) {
        if (!dash && (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0)) {
            fputs(inspect_usage, stdout);
            return CLI_EXIT_OK;
        }
        if (!dash && strcmp(argv[i], "--") == 0) {
            dash = true;
        } else if (!dash && argv[i][0] == '-' && argv[i][1]) {
            cli_error("inspect: unknown option '%s'", argv[i]);
            return CLI_EXIT_USAGE;
        } else if (path) {
            cli_error("inspect: one model at a time ('%s' is extra)", argv[i]);
            return CLI_EXIT_USAGE;
        } else {
            path = argv[i];
        }
    }
    if (!path) {
        cli_error("inspect: expected a model file (onnx-ptq inspect MODEL.onnx)");
        return CLI_EXIT_USAGE;
    }
    struct opq_model *m  = NULL;
    enum opq_status   st = opq_model_load(ctx, path, &m);
    if (st != OPQ_OK)
        return cli_fail(ctx, st, path);
    const struct opq_graph *g = m->graph;
    printf("model: %s\n", path);
    printf("producer: %s%s%s\n", *m->producer_name ? m->producer_name : "(none)",
           *m->producer_version ? " " : "", m->producer_version);
    printf("ir_version: %lld\n", (long long)m->ir_version);
    printf("opsets:");
    for (int i = 0; i < m->n_opsets; i++)
        printf("%s %s %lld", i ? "," : "", *m->opsets[i].domain ? m->opsets[i].domain : "ai.onnx",
               (long long)m->opsets[i].version);
    printf("\n");
    printf("graph: %s\n", *g->name ? g->name : "(unnamed)");
    int n_in = 0;
    for (int i = 0; i < g->n_inputs; i++)
        n_in += !(g->inputs[i]->kind & OPQ_VK_INIT);
    printf("inputs: %d\n", n_in);
    for (int i = 0; i < g->n_inputs; i++) {
        const struct opq_value *v = g->inputs[i];
        if (v->kind & OPQ_VK_INIT) // IR < 4 lists initializers as inputs too
            continue;
        printf("  %s: ", v->name);
        print_type(v);
        printf("\n");
    }
    printf("outputs: %d\n", g->n_outputs);
    for (int i = 0; i < g->n_outputs; i++) {
        printf("  %s: ", g->outputs[i]->name);
        print_type(g->outputs[i]);
        printf("\n");
    }
    int rc = print_ops(g);
    if (rc == CLI_EXIT_OK)
        print_params(g);
    if (rc == CLI_EXIT_OK)
        rc = print_patterns(ctx, g);
    opq_model_free(m);
    if (rc == CLI_EXIT_OK && fflush(stdout) != 0) {
        cli_error("inspect: cannot write to standard output");
        rc = CLI_EXIT_IO;
    }
    return rc;
}
