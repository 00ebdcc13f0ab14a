/* opq_prof.c: where a forward pass of the executor spends its time, per op type and per node.
 *
 *     opq-prof MODEL.onnx X.npy [--threads N] [--repeat R] [--top K]
 *
 * X.npy feeds the model's first input (its leading dim is the batch). After one warm-up run,
 * R runs (default 5) are timed with a capture callback on every computed value: the time between
 * two callbacks is the producing node's time (multi-output nodes report on their first output).
 * Prints the total per op type (ms per run, share, node count) and the K slowest nodes. A
 * diagnostic aid for the executor's speed work (tools/bench/bench_exec.sh measures the plain
 * forward without the capture overhead). */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arena.h"
#include "exec.h"
#include "npy.h"
#include "opq.h"

struct prof {
    struct opq_exec *exec;
    struct opq_graph *g;
    double *node_s; // per node, summed over runs
    double last;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static enum opq_status on_value(void *user, const char *name, const struct opq_tensor *t) {
    struct prof *p = user;
    (void)t;
    double t1 = now_s();
    int i = opq_exec_producer_index(p->exec, name);
    if (i >= 0) {
        struct opq_node *n = p->g->nodes[i];
        if (n->n_outputs > 0 && n->outputs[0] && strcmp(n->outputs[0]->name, name) == 0)
            p->node_s[i] += t1 - p->last;
    }
    p->last = now_s();
    return OPQ_OK;
}

struct row {
    const char *key;
    double s;
    int count;
};

static int by_time(const void *a, const void *b) {
    double x = ((const struct row *)a)->s;
    double y = ((const struct row *)b)->s;
    return x < y ? 1 : x > y ? -1 : 0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL;
    const char *x_path = NULL;
    int threads = 1;
    int repeat = 5;
    int top = 15;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc)
            repeat = atoi(argv[++i]);
        else if (strcmp(argv[i], "--top") == 0 && i + 1 < argc)
            top = atoi(argv[++i]);
        else if (!model_path)
            model_path = argv[i];
        else if (!x_path)
            x_path = argv[i];
        else
            model_path = NULL, i = argc;
    }
    if (!model_path || !x_path || threads < 1 || repeat < 1) {
        fprintf(stderr, "usage: opq-prof MODEL.onnx X.npy [--threads N] [--repeat R] [--top K]\n");
        return 1;
    }
    int rc = 2;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_arena *arena = ctx ? opq_arena_new(ctx) : NULL;
    struct opq_model *m = NULL;
    struct prof p = {0};
    struct row *rows = NULL;
    if (!arena)
        return 4;
    opq_ctx_set_threads(ctx, threads);
    struct opq_named_tensor x = {0};
    if (opq_model_load(ctx, model_path, &m) != OPQ_OK ||
        opq_npy_load(ctx, arena, x_path, &x.t) != OPQ_OK)
        goto exit;
    p.g = m->graph;
    if (p.g->n_inputs < 1) {
        fprintf(stderr, "opq-prof: %s has no inputs\n", model_path);
        goto exit;
    }
    x.name = p.g->inputs[0]->name;
    if (opq_exec_plan(ctx, m, &x, 1, NULL, &p.exec) != OPQ_OK ||
        opq_exec_run(p.exec, &x, 1, NULL, 0) != OPQ_OK)
        goto exit;
    p.node_s = calloc((size_t)p.g->n_nodes + 1, sizeof(*p.node_s));
    rows = calloc((size_t)p.g->n_nodes + 1, sizeof(*rows));
    if (!p.node_s || !rows)
        goto exit;
    opq_exec_set_capture(p.exec, NULL, -1, on_value, &p);
    double total = 0.0;
    for (int r = 0; r < repeat; r++) {
        double t0 = now_s();
        p.last = t0;
        if (opq_exec_run(p.exec, &x, 1, NULL, 0) != OPQ_OK)
            goto exit;
        total += now_s() - t0;
    }
    // per op type
    int n_rows = 0;
    for (int i = 0; i < p.g->n_nodes; i++) {
        if (p.node_s[i] <= 0.0)
            continue;
        const char *op = p.g->nodes[i]->op_type;
        int j = 0;
        while (j < n_rows && strcmp(rows[j].key, op) != 0)
            j++;
        if (j == n_rows)
            rows[n_rows++] = (struct row){op, 0.0, 0};
        rows[j].s += p.node_s[i];
        rows[j].count++;
    }
    qsort(rows, (size_t)n_rows, sizeof(*rows), by_time);
    printf("forward %.1f ms per run (%d threads, %d runs, capture on)\n", total / repeat * 1e3,
           threads, repeat);
    for (int j = 0; j < n_rows; j++)
        printf("  %-22s %9.2f ms  %5.1f%%  %4d nodes\n", rows[j].key, rows[j].s / repeat * 1e3,
               100.0 * rows[j].s / total, rows[j].count);
    // slowest nodes
    n_rows = 0;
    for (int i = 0; i < p.g->n_nodes; i++)
        if (p.node_s[i] > 0.0)
            rows[n_rows++] = (struct row){p.g->nodes[i]->name, p.node_s[i], i};
    qsort(rows, (size_t)n_rows, sizeof(*rows), by_time);
    printf("slowest nodes:\n");
    for (int j = 0; j < n_rows && j < top; j++)
        printf("  %8.2f ms  %-16s %s\n", rows[j].s / repeat * 1e3,
               p.g->nodes[rows[j].count]->op_type, rows[j].key);
    rc = 0;
exit:
    if (rc)
        fprintf(stderr, "opq-prof: %s\n", opq_ctx_errmsg(ctx));
    free(rows);
    free(p.node_s);
    opq_exec_free(p.exec);
    opq_model_free(m);
    opq_arena_free(arena);
    opq_ctx_free(ctx);
    return rc;
}
