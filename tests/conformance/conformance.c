/* conformance.c: runs one ONNX backend node test (onnx's own test data, Debian libonnx-testdata)
 * through the reference executor.
 *
 *   opq_conformance <dir> [--rtol R] [--atol A]
 *
 * <dir> holds model.onnx and test_data_set_N/{input,output}_K.pb (serialized TensorProtos). For
 * every data set: load the inputs (input_K feeds the K-th graph input that is not an
 * initializer), plan the model for their shapes, run, and compare each output with output_K:
 * same dtype and shape, integers/bools exactly, floating values with |got - want| <= atol +
 * rtol * |want| (ONNX defaults rtol 1e-3, atol 1e-7; NaN matches NaN). Prints the worst error.
 * Exit 0 = pass, 1 = fail, 77 = skipped for a documented exclusion reason (EXCLUDED.md): a
 * graph input or output whose dtype the executor does not compute (double, float16, strings...).
 */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "base.h"
#include "exec.h"
#include "ir.h"
#include "kernels/k_lutil.h"
#include "onnx_io.h"

#define EXIT_SKIP 77
#define MAX_IO    64

static bool dtype_supported(enum opq_dtype dt) {
    switch (dt) {
    case OPQ_DTYPE_FLOAT: case OPQ_DTYPE_UINT8: case OPQ_DTYPE_INT8: case OPQ_DTYPE_INT16:
    case OPQ_DTYPE_UINT16: case OPQ_DTYPE_INT32: case OPQ_DTYPE_INT64: case OPQ_DTYPE_BOOL:
    case OPQ_DTYPE_INT4: case OPQ_DTYPE_UINT4: case OPQ_DTYPE_UINT32: case OPQ_DTYPE_UINT64:
    case OPQ_DTYPE_FLOAT16: case OPQ_DTYPE_BFLOAT16: case OPQ_DTYPE_DOUBLE:
        return true;
    default:
        return false;
    }
}

struct worst {
    double err;     // largest |got - want| - (atol + rtol*|want|) excess, or abs error when ok
    double abs_err;
    size_t index;
    int    output;
};

static bool is_floatish(enum opq_dtype dt) {
    return dt == OPQ_DTYPE_FLOAT || dt == OPQ_DTYPE_FLOAT16 || dt == OPQ_DTYPE_BFLOAT16 ||
           dt == OPQ_DTYPE_DOUBLE;
}

static int64_t packed_get(const void *p, enum opq_dtype dt, size_t i) {
    uint8_t b = ((const uint8_t *)p)[i / 2];
    int v = (i & 1) ? b >> 4 : b & 0x0f;
    return dt == OPQ_DTYPE_INT4 && v >= 8 ? v - 16 : v;
}

// Compares one output; returns false (with a message) on mismatch.
static bool compare(const char *name, int k, const struct opq_tensor *got,
                    const struct opq_tensor *want, double rtol, double atol, struct worst *w) {
    if (got->dtype != want->dtype) {
        printf("output %d '%s': dtype %s, expected %s\n", k, name, opq_dtype_name(got->dtype),
               opq_dtype_name(want->dtype));
        return false;
    }
    bool same = got->ndim == want->ndim;
    for (int d = 0; same && d < got->ndim; d++)
        same = got->shape[d] == want->shape[d];
    if (!same) {
        printf("output %d '%s': shape [", k, name);
        for (int d = 0; d < got->ndim; d++)
            printf("%s%lld", d ? "," : "", (long long)got->shape[d]);
        printf("], expected [");
        for (int d = 0; d < want->ndim; d++)
            printf("%s%lld", d ? "," : "", (long long)want->shape[d]);
        printf("]\n");
        return false;
    }
    size_t n = opq_kl_numel(want);
    bool ok = true;
    for (size_t i = 0; i < n; i++) {
        if (is_floatish(want->dtype)) {
            double a = opq_kl_get_f64(got->data, got->dtype, i);
            double b = opq_kl_get_f64(want->data, want->dtype, i);
            if (isnan(a) && isnan(b))
                continue;
            if (isinf(b) || isinf(a)) {
                if (a != b) {
                    printf("output %d '%s'[%zu]: got %g, expected %g\n", k, name, i, a, b);
                    ok = false;
                }
                continue;
            }
            double e = fabs(a - b);
            double tol = atol + rtol * fabs(b);
            if (e > w->abs_err) {
                w->abs_err = e;
                w->index = i;
                w->output = k;
            }
            if (!(e <= tol)) {
                if (ok)
                    printf("output %d '%s'[%zu]: got %.9g, expected %.9g (tolerance %g)\n", k,
                           name, i, a, b, tol);
                ok = false;
            }
        } else {
            int64_t a;
            int64_t b;
            if (opq_dtype_is_packed4(want->dtype)) {
                a = packed_get(got->data, got->dtype, i);
                b = packed_get(want->data, want->dtype, i);
            } else {
                a = opq_kl_get_i64(got->data, got->dtype, i);
                b = opq_kl_get_i64(want->data, want->dtype, i);
            }
            if (a != b) {
                if (ok)
                    printf("output %d '%s'[%zu]: got %lld, expected %lld\n", k, name, i,
                           (long long)a, (long long)b);
                ok = false;
            }
        }
    }
    return ok;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

// Loads <set>/<prefix>_0.pb, _1.pb, ... until one is missing.
static enum opq_status load_set(struct opq_ctx *ctx, struct opq_arena *a, const char *set,
                                const char *prefix, struct opq_tensor *ts, int *count) {
    char path[4096];
    *count = 0;
    for (int k = 0; k < MAX_IO; k++) {
        snprintf(path, sizeof(path), "%s/%s_%d.pb", set, prefix, k);
        FILE *f = fopen(path, "rb");
        if (!f)
            break;
        fclose(f);
        enum opq_status st = opq_tensor_load_pb(ctx, a, path, &ts[k], NULL);
        if (st != OPQ_OK)
            return st;
        (*count)++;
    }
    return OPQ_OK;
}

static int run_set(struct opq_ctx *ctx, struct opq_model *m, const char *set, double rtol,
                   double atol, struct worst *w) {
    struct opq_arena *a = opq_arena_new(ctx);
    struct opq_tensor ins[MAX_IO];
    struct opq_tensor outs[MAX_IO];
    struct opq_tensor got[MAX_IO];
    struct opq_named_tensor named[MAX_IO];
    struct opq_exec *ex = NULL;
    struct {
        struct opq_value *v;
        struct opq_tensor saved;
        uint32_t          kind;
    } consts[MAX_IO];
    int n_consts = 0;
    static uint64_t empty;
    int n_in = 0;
    int n_out = 0;
    int rc = 1;
    struct opq_graph *g = m->graph;
    if (!a) {
        printf("out of memory\n");
        return 1;
    }
    if (load_set(ctx, a, set, "input", ins, &n_in) || load_set(ctx, a, set, "output", outs, &n_out))
        goto out_msg;
    // Integer and scalar inputs (shapes, axes, indices, pads, Range bounds...) become constants
    // of this plan: the executor evaluates shape arithmetic at plan time only, and node tests
    // feed such values as graph inputs where real models have initializers. Restored below.
    int k = 0;
    int n_named = 0;
    for (int i = 0; i < g->n_inputs && k < n_in; i++) {
        struct opq_value *v = g->inputs[i];
        if (v->kind & OPQ_VK_INIT)
            continue;
        if (!ins[k].data)
            ins[k].data = &empty; // zero-element tensor: a valid pointer to nothing
        if (v->t.dtype == OPQ_DTYPE_BFLOAT16 && ins[k].dtype == OPQ_DTYPE_UINT16)
            ins[k].dtype = OPQ_DTYPE_BFLOAT16; // onnx <= 1.13 wrote bfloat16 data as uint16
        if (ins[k].dtype == OPQ_DTYPE_INT64 || ins[k].dtype == OPQ_DTYPE_INT32 ||
            ins[k].ndim == 0) {
            consts[n_consts].v = v;
            consts[n_consts].saved = v->t;
            consts[n_consts].kind = v->kind;
            n_consts++;
            v->t = ins[k];
            v->kind |= OPQ_VK_INIT;
        } else {
            named[n_named].name = v->name;
            named[n_named].t = ins[k];
            n_named++;
        }
        k++;
    }
    if (k != n_in) {
        printf("%s: %d input files for %d graph inputs\n", set, n_in, k);
        goto out;
    }
    if (n_out > g->n_outputs) {
        printf("%s: %d output files for %d graph outputs\n", set, n_out, g->n_outputs);
        goto out;
    }
    for (int i = 0; i < n_in; i++)
        if (!dtype_supported(ins[i].dtype)) {
            printf("SKIP: input %d has dtype %s, which the executor does not compute\n", i,
                   opq_dtype_name(ins[i].dtype));
            rc = EXIT_SKIP;
            goto out;
        }
    for (int i = 0; i < n_out; i++) {
        if (g->outputs[i]->t.dtype == OPQ_DTYPE_BFLOAT16 && outs[i].dtype == OPQ_DTYPE_UINT16)
            outs[i].dtype = OPQ_DTYPE_BFLOAT16; // same quirk as for inputs
        if (!dtype_supported(outs[i].dtype)) {
            printf("SKIP: output %d has dtype %s, which the executor does not compute\n", i,
                   opq_dtype_name(outs[i].dtype));
            rc = EXIT_SKIP;
            goto out;
        }
    }
    if (opq_exec_plan(ctx, m, named, n_named, NULL, &ex) != OPQ_OK ||
        opq_exec_run(ex, named, n_named, got, n_out) != OPQ_OK)
        goto out_msg;
    rc = 0;
    for (int i = 0; i < n_out; i++)
        if (!compare(g->outputs[i]->name, i, &got[i], &outs[i], rtol, atol, w))
            rc = 1;
    goto out;
out_msg:
    printf("%s: %s\n", set, opq_ctx_errmsg(ctx));
out:
    opq_exec_free(ex);
    for (int i = 0; i < n_consts; i++) {
        consts[i].v->t = consts[i].saved;
        consts[i].v->kind = consts[i].kind;
    }
    opq_arena_free(a);
    return rc;
}

int main(int argc, char **argv) {
    double rtol = 1e-3;
    double atol = 1e-7;
    const char *dir = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--rtol") == 0 && i + 1 < argc)
            rtol = atof(argv[++i]);
        else if (strcmp(argv[i], "--atol") == 0 && i + 1 < argc)
            atol = atof(argv[++i]);
        else if (!dir)
            dir = argv[i];
        else {
            fprintf(stderr, "usage: %s <test dir> [--rtol R] [--atol A]\n", argv[0]);
            return 2;
        }
    }
    if (!dir) {
        fprintf(stderr, "usage: %s <test dir> [--rtol R] [--atol A]\n", argv[0]);
        return 2;
    }
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = NULL;
    char path[4096];
    char *sets[256];
    int n_sets = 0;
    int rc = 1;
    if (!ctx)
        return 1;
    snprintf(path, sizeof(path), "%s/model.onnx", dir);
    if (opq_model_load(ctx, path, &m) != OPQ_OK) {
        printf("%s\n", opq_ctx_errmsg(ctx));
        goto out;
    }
    DIR *d = opendir(dir);
    if (!d) {
        printf("%s: cannot list\n", dir);
        goto out;
    }
    for (struct dirent *e; (e = readdir(d)) && n_sets < 256;)
        if (strncmp(e->d_name, "test_data_set_", 14) == 0) {
            size_t len = strlen(dir) + strlen(e->d_name) + 2;
            sets[n_sets] = malloc(len);
            if (!sets[n_sets])
                break;
            snprintf(sets[n_sets], len, "%s/%s", dir, e->d_name);
            n_sets++;
        }
    closedir(d);
    qsort(sets, (size_t)n_sets, sizeof(sets[0]), cmp_str);
    if (n_sets == 0) {
        printf("%s: no test_data_set_*\n", dir);
        goto out_sets;
    }
    struct worst w = {0, 0, 0, 0};
    rc = 0;
    for (int i = 0; i < n_sets && rc != EXIT_SKIP; i++) {
        opq_ctx_clear_error(ctx);
        int r = run_set(ctx, m, sets[i], rtol, atol, &w);
        if (r == EXIT_SKIP || (r && !rc))
            rc = r;
    }
    if (rc != EXIT_SKIP)
        printf("%s: %s, %d data set(s), worst abs error %.3g (output %d, element %zu), rtol %g "
               "atol %g\n",
               dir, rc ? "FAIL" : "PASS", n_sets, w.abs_err, w.output, w.index, rtol, atol);
out_sets:
    for (int i = 0; i < n_sets; i++)
        free(sets[i]);
out:
    opq_model_free(m);
    opq_ctx_free(ctx);
    return rc;
}
