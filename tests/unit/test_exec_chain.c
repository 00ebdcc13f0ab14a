/* test_exec_chain.c: the executor's fused element-wise chains (bias Add -> GELU Erf chain ->
 * residual Add, run tile by tile) and view aliasing (Reshape sharing its input's buffer) give
 * the same bytes as node-by-node execution: a run capturing every value (which disables fusion)
 * against a plain run, with 1 and 2 threads; a captured temporary is really computed; a sub-range
 * run starting inside a chain still works; an intermediate that is also a graph output stays
 * materialized. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base.h"
#include "exec.h"
#include "gb.h"

#define ROWS 203
#define COLS 96

static void fill(float *x, size_t n, uint32_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)((seed >> 8) & 0xffff) / 16384.0f - 2.0f;
    }
}

// x [ROWS, COLS] -> MatMul w -> Add b -> Div sqrt2 -> Erf -> Add 1 -> Mul (x) -> Mul 0.5
//   -> Add residual x -> Reshape [ROWS*COLS] -> y ; "e" (Erf output) optionally a graph output
static struct opq_model *gelu_model(struct opq_ctx *ctx, bool e_out) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(ROWS, COLS));
    static float w[COLS * COLS];
    static float b[COLS];
    fill(w, COLS * COLS, 3);
    fill(b, COLS, 4);
    for (int i = 0; i < COLS * COLS; i++)
        w[i] *= 0.05f;
    gb_init_f32(m, "w", GB_SHAPE(COLS, COLS), w);
    gb_init_f32(m, "b", GB_SHAPE(COLS), b);
    gb_init_f32(m, "s2", GB_SCALAR, (const float[]){1.41421354f});
    gb_init_f32(m, "one", GB_SHAPE(1), (const float[]){1.0f});
    gb_init_f32(m, "half", GB_SHAPE(1, 1), (const float[]){0.5f});
    gb_init_i64(m, "flat", GB_SHAPE(1), (const int64_t[]){ROWS * COLS});
    gb_node(m, "MatMul", "x,w", "h");
    gb_node(m, "Add", "b,h", "hb");
    gb_node(m, "Div", "hb,s2", "d");
    gb_node(m, "Erf", "d", "e");
    gb_node(m, "Add", "e,one", "a");
    gb_node(m, "Mul", "hb,a", "p");
    gb_node(m, "Mul", "p,half", "g");
    gb_node(m, "Add", "g,x", "r");
    gb_node(m, "Reshape", "r,flat", "y");
    gb_output(m, "y");
    if (e_out)
        gb_output(m, "e");
    return m;
}

static enum opq_status count_cb(void *user, const char *name, const struct opq_tensor *t) {
    (void)name;
    (void)t;
    (*(int *)user)++;
    return OPQ_OK;
}

static struct opq_named_tensor input_x(float *x) {
    struct opq_named_tensor in = {.name = "x"};
    in.t = (struct opq_tensor){.dtype = OPQ_DTYPE_FLOAT,
                               .ndim = 2,
                               .shape = {ROWS, COLS},
                               .data = x,
                               .nbytes = sizeof(float) * ROWS * COLS};
    return in;
}

static void test_chain_same_bytes(void **state) {
    (void)state;
    static float x[ROWS * COLS];
    static float ref[ROWS * COLS];
    fill(x, ROWS * COLS, 7);
    struct opq_named_tensor in = input_x(x);
    for (int e_out = 0; e_out <= 1; e_out++) {
        struct opq_ctx *ctx = opq_ctx_new();
        struct opq_model *m = gelu_model(ctx, e_out);
        for (int t = 1; t <= 2; t++) {
            opq_ctx_set_threads(ctx, t);
            struct opq_exec *ex = NULL;
            assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
            // node by node: capturing every value disables fusion
            int seen = 0;
            assert_int_equal(opq_exec_set_capture(ex, NULL, -1, count_cb, &seen), OPQ_OK);
            struct opq_tensor y;
            assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
            assert_int_equal(seen, 9); // every node's output
            if (t == 1 && e_out == 0)
                memcpy(ref, y.data, sizeof(ref));
            else
                assert_memory_equal(ref, y.data, sizeof(ref));
            // fused
            assert_int_equal(opq_exec_set_capture(ex, NULL, 0, NULL, NULL), OPQ_OK);
            assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
            assert_memory_equal(ref, y.data, sizeof(ref));
            // the fused run left the temporaries (here the Erf chain's "a") without data
            int mul = opq_exec_producer_index(ex, "p");
            assert_true(mul > 0);
            assert_int_equal(opq_exec_run_range(ex, mul, mul, NULL, 0), OPQ_ERR_USAGE);
            opq_ctx_clear_error(ctx);
            // capturing a chain result that is materialized anyway keeps fusion, and sees it
            const char *names[] = {"g"};
            seen = 0;
            assert_int_equal(opq_exec_set_capture(ex, names, 1, count_cb, &seen), OPQ_OK);
            assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
            assert_int_equal(seen, 1);
            assert_memory_equal(ref, y.data, sizeof(ref));
            if (e_out) { // the Erf output is a graph output: materialized
                struct opq_tensor outs[2];
                assert_int_equal(opq_exec_set_capture(ex, NULL, 0, NULL, NULL), OPQ_OK);
                assert_int_equal(opq_exec_run(ex, &in, 1, outs, 2), OPQ_OK);
                const float *ev = outs[1].data;
                assert_true(ev[0] >= -1.0f && ev[0] <= 1.0f);
                assert_true(ev[ROWS * COLS - 1] >= -1.0f && ev[ROWS * COLS - 1] <= 1.0f);
            }
            opq_exec_free(ex);
        }
        opq_model_free(m);
        opq_ctx_free(ctx);
    }
}

// A range starting inside the chain (at the Erf, given d) matches the full run's result.
static void test_chain_range_inside(void **state) {
    (void)state;
    static float x[ROWS * COLS];
    static float yfull[ROWS * COLS];
    static float dcopy[ROWS * COLS];
    static float hbcopy[ROWS * COLS];
    fill(x, ROWS * COLS, 9);
    struct opq_named_tensor in = input_x(x);
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gelu_model(ctx, false);
    opq_ctx_set_threads(ctx, 2);
    const char *pinned[] = {"d", "hb", "y"};
    struct opq_exec_opts opts = {.pinned = pinned, .n_pinned = 3};
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, &opts, &ex), OPQ_OK);
    struct opq_tensor y;
    assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
    memcpy(yfull, y.data, sizeof(yfull));
    memcpy(dcopy, opq_exec_value(ex, "d")->data, sizeof(dcopy));
    memcpy(hbcopy, opq_exec_value(ex, "hb")->data, sizeof(hbcopy));
    int erf = opq_exec_producer_index(ex, "e");
    int last = opq_exec_producer_index(ex, "y");
    assert_true(erf > 0 && last > erf);
    struct opq_named_tensor given[3] = {input_x(x), input_x(dcopy), input_x(hbcopy)};
    given[1].name = "d";
    given[2].name = "hb";
    assert_int_equal(opq_exec_run_range(ex, erf, last, given, 3), OPQ_OK);
    assert_memory_equal(yfull, opq_exec_value(ex, "y")->data, sizeof(yfull));
    opq_exec_free(ex);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chain_same_bytes),
        cmocka_unit_test(test_chain_range_inside),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
