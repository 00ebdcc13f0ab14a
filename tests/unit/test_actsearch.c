/* test_actsearch.c: the output-aware activation range search (quant/actsearch.h) on a small built
 * graph with a weight matmul and an attention-style matmul of two computed operands:
 *
 *     h = x * c;  y = h . W;  y2 = h . W2;  p = Softmax(h);  v = Transpose(h);  z = p . v
 *
 * (outputs y, y2, z; W is wider than tall and takes the search's K x K form, W2 the direct one).
 * The consumer-output errors are recomputed here with the reference GEMM from captured
 * activations: the chosen ranges never measure worse than the starting ones, the search's own
 * figures agree with that measurement, and the result is the same on every run and thread
 * count. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "blas.h"
#include "gb.h"
#include "opq.h"
#include "quant/actsearch.h"
#include "quantize.h"

#define NS 24 // samples
#define T  4  // tokens
#define D  6  // features
#define N  8  // outputs of the weight matmuls
#define N2 3

static struct opq_model *build(struct opq_ctx *ctx) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, T, D));
    float c[D], w[D * N], w2[D * N2];
    for (int i = 0; i < D; i++)
        c[i] = 0.5f + 0.4f * (float)i; // uneven feature scales
    for (int i = 0; i < D * N; i++)
        w[i] = sinf(1.7f * (float)i + 0.3f);
    for (int i = 0; i < D * N2; i++)
        w2[i] = cosf(0.9f * (float)i);
    gb_init_f32(m, "c", GB_SHAPE(D), c);
    gb_init_f32(m, "W", GB_SHAPE(D, N), w);
    gb_init_f32(m, "W2", GB_SHAPE(D, N2), w2);
    gb_node(m, "Mul", "x,c", "h");
    gb_node(m, "MatMul", "h,W", "y");
    gb_node(m, "MatMul", "h,W2", "y2");
    gb_node(m, "Softmax", "h", "p");
    struct opq_node *tr = gb_node(m, "Transpose", "h", "v");
    gb_attr_ints(m, tr, "perm", 3, (const int64_t[]){0, 2, 1});
    gb_node(m, "MatMul", "p,v", "z");
    gb_shape(m, "h", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, T, D));
    gb_shape(m, "p", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, T, D));
    gb_shape(m, "v", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, D, T));
    gb_shape(m, "y", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, T, N));
    gb_shape(m, "y2", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, T, N2));
    gb_shape(m, "z", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, T, T));
    gb_output(m, "y");
    gb_output(m, "y2");
    gb_output(m, "z");
    gb_verify(m);
    return m;
}

// Every sample's h, p, v (the test holds them all; the search does not).
struct acts {
    float h[NS * T * D], p[NS * T * D], v[NS * D * T];
    int   n_h, n_p, n_v;
};

static enum opq_status grab(void *user, const char *name, const struct opq_tensor *t) {
    struct acts *a = user;
    size_t n = t->nbytes / sizeof(float);
    float *dst = !strcmp(name, "h") ? a->h + a->n_h : !strcmp(name, "p") ? a->p + a->n_p
               : !strcmp(name, "v") ? a->v + a->n_v : NULL;
    if (!dst)
        return OPQ_OK;
    memcpy(dst, t->data, t->nbytes);
    *(!strcmp(name, "h") ? &a->n_h : !strcmp(name, "p") ? &a->n_p : &a->n_v) += (int)n;
    return OPQ_OK;
}

static void fq(const float *x, int n, const struct opq_qparams *q, float *y) {
    for (int i = 0; i < n; i++)
        y[i] = opq_fq(x[i], q);
}

static double sq_diff(const float *a, const float *b, int n) {
    double e = 0.0;
    for (int i = 0; i < n; i++)
        e += ((double)a[i] - (double)b[i]) * ((double)a[i] - (double)b[i]);
    return e;
}

// The consumer-output error of activation `which` ("h", "p" or "v") quantized with q.
static double measure(const struct acts *a, const char *which, const struct opq_qparams *q,
                      const float *const *w, const float *const *wq) {
    double e = 0.0;
    float xq[T * D], y0[T * T > T * N ? T * T : T * N], y1[T * T > T * N ? T * T : T * N];
    for (int s = 0; s < NS; s++) {
        const float *h = a->h + s * T * D, *p = a->p + s * T * D, *v = a->v + s * D * T;
        if (!strcmp(which, "h")) {
            fq(h, T * D, q, xq);
            for (int k = 0; k < 2; k++) {
                int n = k ? N2 : N;
                opq_gemm_ref(false, false, T, n, D, 1.0f, h, D, w[k], n, 0.0f, y0, n);
                opq_gemm_ref(false, false, T, n, D, 1.0f, xq, D, wq[k], n, 0.0f, y1, n);
                e += sq_diff(y0, y1, T * n);
            }
        } else {
            opq_gemm_ref(false, false, T, T, D, 1.0f, p, D, v, T, 0.0f, y0, T);
            fq(!strcmp(which, "p") ? p : v, T * D, q, xq);
            if (!strcmp(which, "p"))
                opq_gemm_ref(false, false, T, T, D, 1.0f, xq, D, v, T, 0.0f, y1, T);
            else
                opq_gemm_ref(false, false, T, T, D, 1.0f, p, D, xq, T, 0.0f, y1, T);
            e += sq_diff(y0, y1, T * T);
        }
    }
    return e;
}

struct fixture {
    struct opq_ctx        *ctx;
    struct opq_model      *m;
    struct opq_calib_src  *src;
    struct opq_placement   pl;
    struct opq_qparams   **qp;    // starting qparams (minmax ranges, 4 bits)
    int                   *n_ch, *axis;
    bool                  *search;
    struct acts            a;
};

static void fixture_init(struct fixture *f) {
    memset(f, 0, sizeof(*f));
    f->ctx = opq_ctx_new();
    assert_non_null(f->ctx);
    f->m = build(f->ctx);
    struct opq_calib_spec spec = {.path = "random", .count = NS, .seed = 7};
    assert_int_equal(opq_calib_open(f->ctx, f->m, &spec, &f->src), OPQ_OK);
    struct opq_placement_opts po = {0};
    assert_int_equal(opq_placement_find(f->ctx, f->m->graph, &po, &f->pl), OPQ_OK);
    const char *names[] = {"h", "p", "v"};
    assert_int_equal(opq_calib_stream(f->ctx, f->m, f->src, 0, NS, 8, names, 3, grab, &f->a,
                                      NULL),
                     OPQ_OK);
    assert_int_equal(f->a.n_h, NS * T * D);
    int nt = f->pl.n_targets;
    f->qp     = calloc((size_t)nt, sizeof(*f->qp));
    f->n_ch   = calloc((size_t)nt, sizeof(int));
    f->axis   = calloc((size_t)nt, sizeof(int));
    f->search = calloc((size_t)nt, sizeof(bool));
    int n_act = 0;
    for (int t = 0; t < nt; t++) {
        const struct opq_qtarget *tg = &f->pl.targets[t];
        if (tg->role == OPQ_QROLE_WEIGHT) {
            int n = (int)tg->value->t.shape[1];
            f->qp[t]   = calloc((size_t)n, sizeof(**f->qp));
            f->n_ch[t] = n;
            f->axis[t] = 1;
            assert_int_equal(opq_weight_qparams(tg->value->t.data, (size_t)(D * n), (size_t)n,
                                                1, -8, 7, true, OPQ_WCALIB_MINMAX, f->qp[t]),
                             OPQ_OK);
            continue;
        }
        const char *nm = tg->value->name;
        const float *x = !strcmp(nm, "h") ? f->a.h : !strcmp(nm, "p") ? f->a.p : f->a.v;
        float lo = 0.0f, hi = 0.0f;
        for (int i = 0; i < NS * T * D; i++) {
            lo = fminf(lo, x[i]);
            hi = fmaxf(hi, x[i]);
        }
        f->qp[t]     = calloc(1, sizeof(**f->qp));
        f->n_ch[t]   = 1;
        f->search[t] = true;
        assert_true(opq_qparams_from_range(lo, hi, 0, 15, false, f->qp[t]));
        n_act++;
    }
    assert_int_equal(n_act, 3); // h, p and v
}

static void fixture_deinit(struct fixture *f) {
    for (int t = 0; t < f->pl.n_targets; t++)
        free(f->qp[t]);
    free(f->qp);
    free(f->n_ch);
    free(f->axis);
    free(f->search);
    opq_calib_close(f->src);
    opq_model_free(f->m);
    opq_ctx_free(f->ctx);
}

// W and W2 and the quantized copies the search uses (per column, minmax, 4 bits).
static void weights(const struct fixture *f, const float **w, float *wq, float *wq2) {
    for (int t = 0; t < f->pl.n_targets; t++) {
        const struct opq_value *v = f->pl.targets[t].value;
        if (f->pl.targets[t].role != OPQ_QROLE_WEIGHT)
            continue;
        int k = !strcmp(v->name, "W2"), n = k ? N2 : N;
        w[k] = v->t.data;
        for (int i = 0; i < D * n; i++)
            (k ? wq2 : wq)[i] = opq_fq(w[k][i], &f->qp[t][i % n]);
    }
}

static void test_never_worse(void **state) {
    (void)state;
    struct fixture f;
    fixture_init(&f);
    const float *w[2] = {NULL, NULL};
    float wq[D * N], wq2[D * N2];
    weights(&f, w, wq, wq2);
    assert_non_null(w[0]);
    assert_non_null(w[1]);
    const float *wqs[2] = {wq, wq2};
    int nt = f.pl.n_targets;
    struct opq_qparams start[8];
    double e0[8], e1[8];
    assert_true(nt <= 8);
    for (int t = 0; t < nt; t++)
        start[t] = f.qp[t][0];
    struct opq_act_search_opts o = {.n_samples = NS, .batch = 8, .symmetric = false};
    // unweighted: the search's objective is exactly what measure() computes
    assert_int_equal(opq_act_search(f.ctx, f.m, NULL, f.src, &f.pl, f.qp, f.n_ch, f.axis,
                                    f.search, &o, e0, e1),
                     OPQ_OK);
    int improved = 0;
    for (int t = 0; t < nt; t++) {
        if (!f.search[t])
            continue;
        const char *nm = f.pl.targets[t].value->name;
        double before = measure(&f.a, nm, &start[t], w, wqs);
        double after  = measure(&f.a, nm, &f.qp[t][0], w, wqs);
        assert_true(after <= before * (1.0 + 1e-6));
        assert_true(fabs(e0[t] - before) <= 1e-4 * before + 1e-9);
        assert_true(fabs(e1[t] - after) <= 1e-4 * before + 1e-9);
        improved += after < 0.99 * before;
    }
    assert_true(improved >= 1); // 4-bit minmax ranges leave room: the search must find it
    // loss-weighted: the reported error of the chosen range is at most the starting one's
    for (int t = 0; t < nt; t++)
        if (f.search[t])
            f.qp[t][0] = start[t];
    assert_int_equal(opq_act_search(f.ctx, f.m, f.m, f.src, &f.pl, f.qp, f.n_ch, f.axis,
                                    f.search, &o, e0, e1),
                     OPQ_OK);
    // (the weights come from the first output, y: p and v do not reach it and weigh 0)
    for (int t = 0; t < nt; t++)
        if (f.search[t]) {
            bool on_path = !strcmp(f.pl.targets[t].value->name, "h");
            assert_true(on_path ? e0[t] > 0.0 : e0[t] == 0.0);
            assert_true(e1[t] <= e0[t]);
        }
    fixture_deinit(&f);
}

static void test_deterministic(void **state) {
    (void)state;
    struct opq_qparams res[3][8];
    for (int run = 0; run < 3; run++) {
        struct fixture f;
        fixture_init(&f);
        opq_ctx_set_threads(f.ctx, run == 2 ? 2 : 1);
        struct opq_act_search_opts o = {.n_samples = NS, .batch = 8};
        assert_int_equal(opq_act_search(f.ctx, f.m, f.m, f.src, &f.pl, f.qp, f.n_ch, f.axis,
                                        f.search, &o, NULL, NULL),
                         OPQ_OK);
        assert_true(f.pl.n_targets <= 8);
        for (int t = 0; t < f.pl.n_targets; t++)
            res[run][t] = f.qp[t][0];
        if (run > 0)
            for (int t = 0; t < f.pl.n_targets; t++) {
                // a repeat (run 1) and two threads (run 2) give the same ranges bit for bit
                assert_true(res[run][t].scale == res[0][t].scale);
                assert_int_equal(res[run][t].zero_point, res[0][t].zero_point);
            }
        fixture_deinit(&f);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_never_worse),
        cmocka_unit_test(test_deterministic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
