/* cmd_run.c: the `run` and `eval` subcommands (argument parsing and reporting only; the work is
 * done by the library's executor).
 *
 *   onnx-ptq run MODEL [--input NAME=FILE.npy ...] [--test-data DIR] [--output-dir DIR]
 *                      [--repeat N]
 *   onnx-ptq eval MODEL --data X.npy --labels Y.npy [--batch B] */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "arena.h"
#include "base.h"
#include "cli.h"
#include "exec.h"
#include "graph.h"
#include "ir.h"
#include "npy.h"
#include "onnx_io.h"

#define MAX_INPUTS 64
#define RTOL 1e-3
#define ATOL 1e-7

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int fail(struct opq_ctx *ctx, enum opq_status st) {
    const char *msg = opq_ctx_errmsg(ctx);
    cli_error("%s", msg && msg[0] ? msg : opq_status_str(st));
    return cli_exit_code(st);
}

// float64 arrays (NumPy's default) are accepted for float32 inputs and converted.
static enum opq_status to_dtype(struct opq_ctx *ctx, struct opq_arena *a, struct opq_tensor *t,
                                enum opq_dtype want, const char *what) {
    if (want == OPQ_DTYPE_UNDEF || t->dtype == want)
        return OPQ_OK;
    if (t->dtype == OPQ_DTYPE_DOUBLE && want == OPQ_DTYPE_FLOAT) {
        size_t n = t->nbytes / sizeof(double);
        float *f = opq_arena_alloc_raw(a, n * sizeof(float) + 1);
        if (!f)
            return opq_set_error(ctx, OPQ_ERR_NOMEM, "out of memory");
        for (size_t i = 0; i < n; i++)
            f[i] = (float)((const double *)t->data)[i];
        t->data = f;
        t->dtype = OPQ_DTYPE_FLOAT;
        t->nbytes = n * sizeof(float);
        return OPQ_OK;
    }
    return opq_set_error(ctx, OPQ_ERR_SHAPE, "%s: dtype %s, the model wants %s", what,
                         opq_dtype_name(t->dtype), opq_dtype_name(want));
}

// Graph inputs that the caller must feed (not initializers).
static int feed_inputs(const struct opq_graph *g, struct opq_value **out) {
    int n = 0;
    for (int i = 0; i < g->n_inputs && n < MAX_INPUTS; i++)
        if (!(g->inputs[i]->kind & OPQ_VK_INIT))
            out[n++] = g->inputs[i];
    return n;
}

static void safe_name(const char *in, char *out, size_t cap) {
    size_t i = 0;
    for (; in[i] && i + 1 < cap; i++) {
        char c = in[i];
        out[i] = (c == '/' || c == '\\' || c == ':' || (c == '.' && i == 0)) ? '_' : c;
    }
    out[i] = '\0';
}

// Worst error of got vs want under |g - w| <= atol + rtol |w|; returns the mismatch count.
static size_t compare(const struct opq_tensor *got, const struct opq_tensor *want,
                      double *worst_abs, double *worst_ratio) {
    size_t n = 0;
    opq_tensor_numel(want, &n);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double g;
        double w;
        if (want->dtype == OPQ_DTYPE_FLOAT) {
            g = (double)((const float *)got->data)[i];
            w = (double)((const float *)want->data)[i];
        } else if (want->dtype == OPQ_DTYPE_INT64) {
            g = (double)((const int64_t *)got->data)[i];
            w = (double)((const int64_t *)want->data)[i];
        } else if (want->dtype == OPQ_DTYPE_INT32) {
            g = (double)((const int32_t *)got->data)[i];
            w = (double)((const int32_t *)want->data)[i];
        } else {
            g = (double)((const uint8_t *)got->data)[i];
            w = (double)((const uint8_t *)want->data)[i];
        }
        double d = fabs(g - w);
        double tol = ATOL + RTOL * fabs(w);
        if (isnan(g) != isnan(w) || (!isnan(w) && d > tol))
            bad++;
        if (d > *worst_abs || isnan(d))
            *worst_abs = d;
        if (d / tol > *worst_ratio)
            *worst_ratio = d / tol;
    }
    return bad;
}

static bool has_file(const char *dir, const char *name) {
    char path[4096];
    if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path))
        return false;
    struct stat sb;
    return stat(path, &sb) == 0;
}

struct run_opts {
    const char *model;
    const char *in_name[MAX_INPUTS];
    const char *in_file[MAX_INPUTS];
    int n_in;
    const char *test_data;
    const char *out_dir;
    long repeat;
};

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a;
    double y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// One data set: run, optionally compare with output_*.pb, write outputs. Returns exit code.
static int run_set(struct opq_ctx *ctx, struct opq_model *m, struct opq_arena *a,
                   const struct run_opts *o, const char *set_dir, bool *mismatch) {
    struct opq_graph *g = m->graph;
    struct opq_value *feeds[MAX_INPUTS];
    int nf = feed_inputs(g, feeds);
    struct opq_named_tensor in[MAX_INPUTS];
    int n_in = 0;
    enum opq_status st = OPQ_OK;
    struct opq_exec *ex = NULL;
    struct opq_tensor *outs = NULL;
    int rc = CLI_EXIT_OK;
    if (set_dir) {
        for (int i = 0; i < nf; i++) {
            char path[4096];
            if (snprintf(path, sizeof(path), "%s/input_%d.pb", set_dir, i) >= (int)sizeof(path))
                return fail(ctx, opq_set_error(ctx, OPQ_ERR_IO, "%s: path too long", set_dir));
            const char *name = NULL;
            in[n_in].name = feeds[i]->name;
            st = opq_tensor_load_pb(ctx, a, path, &in[n_in].t, &name);
            if (st != OPQ_OK)
                return fail(ctx, st);
            if (name && name[0] && opq_graph_value(g, name) &&
                (opq_graph_value(g, name)->kind & OPQ_VK_INPUT))
                in[n_in].name = name;
            n_in++;
        }
    } else {
        for (int i = 0; i < o->n_in; i++) {
            in[n_in].name = o->in_name[i];
            st = opq_npy_load(ctx, a, o->in_file[i], &in[n_in].t);
            if (st != OPQ_OK)
                return fail(ctx, st);
            n_in++;
        }
    }
    for (int i = 0; i < n_in; i++) {
        const struct opq_value *v = opq_graph_value(g, in[i].name);
        if (!v || !(v->kind & OPQ_VK_INPUT)) {
            cli_error("'%s' is not an input of %s", in[i].name, o->model);
            return CLI_EXIT_USAGE;
        }
        st = to_dtype(ctx, a, &in[i].t, v->t.dtype, in[i].name);
        if (st != OPQ_OK)
            return fail(ctx, st);
    }
    st = opq_exec_plan(ctx, m, in, n_in, NULL, &ex);
    if (st != OPQ_OK)
        return fail(ctx, st);
    outs = calloc((size_t)g->n_outputs + 1, sizeof(*outs));
    if (!outs) {
        cli_error("out of memory");
        rc = CLI_EXIT_INTERNAL;
        goto out;
    }
    st = opq_exec_run(ex, in, n_in, outs, g->n_outputs);
    if (st != OPQ_OK) {
        rc = fail(ctx, st);
        goto out;
    }
    if (o->repeat > 0) {
        double *ms = calloc((size_t)o->repeat, sizeof(double));
        if (!ms) {
            cli_error("out of memory");
            rc = CLI_EXIT_INTERNAL;
            goto out;
        }
        for (long r = 0; r < o->repeat && st == OPQ_OK; r++) {
            double t0 = now_ms();
            st = opq_exec_run(ex, in, n_in, outs, g->n_outputs);
            ms[r] = now_ms() - t0;
        }
        if (st != OPQ_OK) {
            free(ms);
            rc = fail(ctx, st);
            goto out;
        }
        qsort(ms, (size_t)o->repeat, sizeof(double), cmp_double);
        double med =
            o->repeat % 2 ? ms[o->repeat / 2] : 0.5 * (ms[o->repeat / 2 - 1] + ms[o->repeat / 2]);
        fprintf(stderr, "forward: median %.3f ms, min %.3f ms over %ld runs (%d threads)\n", med,
                ms[0], o->repeat, opq_ctx_threads(ctx));
        printf("{\"forward_ms_median\": %.4f, \"runs\": %ld}\n", med, o->repeat);
        free(ms);
    }
    if (set_dir) {
        double worst_abs = 0.0;
        double worst_ratio = 0.0;
        size_t bad = 0;
        for (int i = 0; i < g->n_outputs; i++) {
            char path[4096];
            if (snprintf(path, sizeof(path), "%s/output_%d.pb", set_dir, i) >= (int)sizeof(path)) {
                rc = fail(ctx, opq_set_error(ctx, OPQ_ERR_IO, "%s: path too long", set_dir));
                goto out;
            }
            struct opq_tensor want;
            st = opq_tensor_load_pb(ctx, a, path, &want, NULL);
            if (st != OPQ_OK) {
                rc = fail(ctx, st);
                goto out;
            }
            bool same = want.dtype == outs[i].dtype && want.ndim == outs[i].ndim;
            for (int d = 0; same && d < want.ndim; d++)
                same = want.shape[d] == outs[i].shape[d];
            if (!same) {
                cli_error("%s: output '%s' has dtype/shape different from %s", set_dir,
                          g->outputs[i]->name, path);
                *mismatch = true;
                continue;
            }
            bad += compare(&outs[i], &want, &worst_abs, &worst_ratio);
        }
        printf("%s: worst abs error %.3g (%.3g x tolerance), %zu mismatches\n", set_dir, worst_abs,
               worst_ratio, bad);
        if (bad)
            *mismatch = true;
    }
    if (o->out_dir) {
        if (mkdir(o->out_dir, 0777) != 0 && errno != EEXIST) {
            cli_error("%s: %s", o->out_dir, strerror(errno));
            rc = CLI_EXIT_IO;
            goto out;
        }
        for (int i = 0; i < g->n_outputs; i++) {
            char name[1024];
            char path[4096];
            safe_name(g->outputs[i]->name, name, sizeof(name));
            if (snprintf(path, sizeof(path), "%s/%s.npy", o->out_dir, name) >= (int)sizeof(path)) {
                rc = fail(ctx, opq_set_error(ctx, OPQ_ERR_IO, "%s: path too long", o->out_dir));
                goto out;
            }
            st = opq_npy_save(ctx, path, &outs[i]);
            if (st != OPQ_OK) {
                rc = fail(ctx, st);
                goto out;
            }
        }
    }
out:
    free(outs);
    opq_exec_free(ex);
    return rc;
}

static int run_usage(void) {
    cli_error("usage: onnx-ptq run MODEL [--input NAME=FILE.npy ...] [--test-data DIR] "
              "[--output-dir DIR] [--repeat N]");
    return CLI_EXIT_USAGE;
}

// "--opt VALUE" or "--opt=VALUE"; advances *i.
static const char *opt_value(int argc, char **argv, int *i, const char *opt) {
    size_t l = strlen(opt);
    if (strncmp(argv[*i], opt, l) != 0)
        return NULL;
    if (argv[*i][l] == '=')
        return argv[*i] + l + 1;
    if (argv[*i][l] != '\0')
        return NULL;
    if (*i + 1 >= argc) {
        cli_error("%s needs a value", opt);
        return "";
    }
    return argv[++*i];
}

int cmd_run(struct opq_ctx *ctx, int argc, char **argv) {
    struct run_opts o = {0};
    for (int i = 1; i < argc; i++) {
        const char *v;
        if ((v = opt_value(argc, argv, &i, "--input"))) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v || o.n_in >= MAX_INPUTS) {
                cli_error("--input wants NAME=FILE.npy, got '%s'", v);
                return CLI_EXIT_USAGE;
            }
            char *name = strndup(v, (size_t)(eq - v));
            if (!name)
                return CLI_EXIT_INTERNAL;
            o.in_name[o.n_in] = name; // freed at exit: a handful of bytes
            o.in_file[o.n_in++] = eq + 1;
        } else if ((v = opt_value(argc, argv, &i, "--test-data"))) {
            o.test_data = v;
        } else if ((v = opt_value(argc, argv, &i, "--output-dir"))) {
            o.out_dir = v;
        } else if ((v = opt_value(argc, argv, &i, "--repeat"))) {
            char *end = NULL;
            o.repeat = strtol(v, &end, 10);
            if (!*v || *end || o.repeat < 1 || o.repeat > 1000000) {
                cli_error("--repeat wants a positive count, got '%s'", v);
                return CLI_EXIT_USAGE;
            }
        } else if (argv[i][0] == '-') {
            cli_error("run: unknown option '%s'", argv[i]);
            return run_usage();
        } else if (!o.model) {
            o.model = argv[i];
        } else {
            cli_error("run: unexpected argument '%s'", argv[i]);
            return run_usage();
        }
    }
    int rc = CLI_EXIT_OK;
    if (!o.model || (o.test_data && o.n_in)) {
        rc = run_usage();
        goto out_names;
    }
    struct opq_model *m = NULL;
    enum opq_status st = opq_model_load(ctx, o.model, &m);
    if (st != OPQ_OK) {
        rc = fail(ctx, st);
        goto out_names;
    }
    struct opq_arena *a = opq_arena_new(ctx);
    if (!a) {
        rc = CLI_EXIT_INTERNAL;
        goto out_model;
    }
    bool mismatch = false;
    if (!o.test_data) {
        rc = run_set(ctx, m, a, &o, NULL, &mismatch);
    } else if (has_file(o.test_data, "input_0.pb")) {
        rc = run_set(ctx, m, a, &o, o.test_data, &mismatch);
    } else {
        int n_sets = 0;
        for (int s = 0; rc == CLI_EXIT_OK; s++) {
            char dir[4096];
            if (snprintf(dir, sizeof(dir), "%s/test_data_set_%d", o.test_data, s) >=
                    (int)sizeof(dir) ||
                !has_file(dir, "input_0.pb"))
                break;
            rc = run_set(ctx, m, a, &o, dir, &mismatch);
            n_sets++;
        }
        if (rc == CLI_EXIT_OK && n_sets == 0) {
            cli_error("%s: no input_0.pb nor test_data_set_*/input_0.pb", o.test_data);
            rc = CLI_EXIT_IO;
        }
    }
    if (rc == CLI_EXIT_OK && mismatch) {
        cli_error("outputs differ from the expected ones (rtol %g, atol %g)", RTOL, ATOL);
        rc = 1;
    }
    opq_arena_free(a);
out_model:
    opq_model_free(m);
out_names:
    for (int i = 0; i < o.n_in; i++)
        free((char *)o.in_name[i]);
    return rc;
}

// ---- eval ---------------------------------------------------------------------------------------

static void progress(size_t done, size_t total) {
    if (!isatty(STDERR_FILENO))
        return;
    int width = 40;
    int fill = total ? (int)((double)width * (double)done / (double)total) : width;
    fprintf(stderr, "\r[%.*s%*s] %zu/%zu", fill,
            "========================================", width - fill, "", done, total);
    if (done == total)
        fputc('\n', stderr);
    fflush(stderr);
}

static int64_t label_at(const struct opq_tensor *y, size_t i) {
    switch (y->dtype) {
    case OPQ_DTYPE_INT64:
        return ((const int64_t *)y->data)[i];
    case OPQ_DTYPE_INT32:
        return ((const int32_t *)y->data)[i];
    case OPQ_DTYPE_UINT8:
        return ((const uint8_t *)y->data)[i];
    default:
        return -1;
    }
}

// Runs rows [first, first+count) of X; adds top-1/top-5 hits.
static enum opq_status eval_batch(struct opq_ctx *ctx, struct opq_model *m, struct opq_exec **ex,
                                  int64_t *planned, const struct opq_value *in,
                                  const struct opq_tensor *x, const struct opq_tensor *labels,
                                  int64_t first, int64_t count, size_t *top1, size_t *top5) {
    size_t row_bytes = x->nbytes / (size_t)x->shape[0];
    struct opq_named_tensor t = {.name = in->name, .t = *x};
    t.t.shape[0] = count;
    t.t.nbytes = row_bytes * (size_t)count;
    t.t.data = (char *)x->data + row_bytes * (size_t)first;
    if (!*ex || *planned != count) {
        opq_exec_free(*ex);
        *ex = NULL;
        enum opq_status st = opq_exec_plan(ctx, m, &t, 1, NULL, ex);
        if (st != OPQ_OK)
            return st;
        *planned = count;
    }
    struct opq_tensor out;
    enum opq_status st = opq_exec_run(*ex, &t, 1, &out, 1);
    if (st != OPQ_OK)
        return st;
    if (out.dtype != OPQ_DTYPE_FLOAT || out.ndim != 2 || out.shape[0] != count)
        return opq_set_error(ctx, OPQ_ERR_SHAPE,
                             "eval: the first output must be float32 logits "
                             "[batch, classes]");
    int64_t nc = out.shape[1];
    const float *lg = out.data;
    for (int64_t r = 0; r < count; r++) {
        int64_t lab = label_at(labels, (size_t)(first + r));
        if (lab < 0 || lab >= nc)
            return opq_set_error(ctx, OPQ_ERR_SHAPE,
                                 "eval: label %lld at row %lld is outside "
                                 "0..%lld",
                                 (long long)lab, (long long)(first + r), (long long)nc - 1);
        const float *row = lg + r * nc;
        int64_t rank = 0; // classes scoring above the label (ties: lower index wins)
        for (int64_t c = 0; c < nc; c++)
            if (row[c] > row[lab] || (row[c] == row[lab] && c < lab))
                rank++;
        *top1 += rank < 1;
        *top5 += rank < 5;
    }
    return OPQ_OK;
}

int cmd_eval(struct opq_ctx *ctx, int argc, char **argv) {
    const char *model = NULL;
    const char *data = NULL;
    const char *labels = NULL;
    long batch = 32;
    for (int i = 1; i < argc; i++) {
        const char *v;
        if ((v = opt_value(argc, argv, &i, "--data"))) {
            data = v;
        } else if ((v = opt_value(argc, argv, &i, "--labels"))) {
            labels = v;
        } else if ((v = opt_value(argc, argv, &i, "--batch"))) {
            char *end = NULL;
            batch = strtol(v, &end, 10);
            if (!*v || *end || batch < 1 || batch > 1 << 20) {
                cli_error("--batch wants a positive count, got '%s'", v);
                return CLI_EXIT_USAGE;
            }
        } else if (argv[i][0] == '-' || model) {
            cli_error("eval: unexpected argument '%s'", argv[i]);
            return CLI_EXIT_USAGE;
        } else {
            model = argv[i];
        }
    }
    if (!model || !data || !labels) {
        cli_error("usage: onnx-ptq eval MODEL --data X.npy --labels Y.npy [--batch B]");
        return CLI_EXIT_USAGE;
    }
    int rc = CLI_EXIT_OK;
    struct opq_model *m = NULL;
    struct opq_exec *ex = NULL;
    struct opq_arena *a = opq_arena_new(ctx);
    if (!a)
        return CLI_EXIT_INTERNAL;
    struct opq_tensor x;
    struct opq_tensor y;
    enum opq_status st = opq_model_load(ctx, model, &m);
    if (st == OPQ_OK)
        st = opq_npy_load(ctx, a, data, &x);
    if (st == OPQ_OK)
        st = opq_npy_load(ctx, a, labels, &y);
    if (st != OPQ_OK) {
        rc = fail(ctx, st);
        goto out;
    }
    struct opq_value *feeds[MAX_INPUTS];
    if (feed_inputs(m->graph, feeds) != 1) {
        cli_error("eval: %s must have exactly one input", model);
        rc = CLI_EXIT_INPUT;
        goto out;
    }
    st = to_dtype(ctx, a, &x, feeds[0]->t.dtype, data);
    if (st != OPQ_OK) {
        rc = fail(ctx, st);
        goto out;
    }
    bool int_labels =
        y.dtype == OPQ_DTYPE_INT64 || y.dtype == OPQ_DTYPE_INT32 || y.dtype == OPQ_DTYPE_UINT8;
    if (x.ndim < 1 || y.ndim != 1 || y.shape[0] != x.shape[0] || !int_labels) {
        cli_error("eval: %s must be a 1-D integer array with one label per row of %s", labels,
                  data);
        rc = CLI_EXIT_INPUT;
        goto out;
    }
    size_t top1 = 0;
    size_t top5 = 0;
    int64_t n = x.shape[0];
    int64_t planned = 0;
    for (int64_t f = 0; f < n && st == OPQ_OK; f += batch) {
        int64_t cnt = n - f < batch ? n - f : batch;
        st = eval_batch(ctx, m, &ex, &planned, feeds[0], &x, &y, f, cnt, &top1, &top5);
        progress((size_t)(f + cnt), (size_t)n);
    }
    if (st != OPQ_OK) {
        rc = fail(ctx, st);
        goto out;
    }
    printf("top1: %.4f\n", n ? (double)top1 / (double)n : 0.0);
    printf("top5: %.4f\n", n ? (double)top5 / (double)n : 0.0);
out:
    opq_exec_free(ex);
    opq_model_free(m);
    opq_arena_free(a);
    return rc;
}
