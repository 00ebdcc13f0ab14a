/* test_defer_softmax.c: the defer-softmax pass rewrites Softmax -> MatMul(P, V) into
 * Exp(S - ReduceMax(S)) -> MatMul -> Div(ReduceSum) for every MatMul reading P, in the opset's
 * form of the Reduce ops (axes attribute / input); the outputs keep their names and values (to
 * float rounding); the recognizer still finds the attention core; Softmaxes over another axis or
 * read by anything but a MatMul's first operand are left alone; the quantization options'
 * defer_softmax (auto = below 8 bits) decides in the presets. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "exec.h"
#include "gb.h"
#include "pass.h"
#include "quant/placement.h"
#include "quantize.h"
#include "recognize.h"

#define NQ (2 * 2 * 4 * 3) // q, k, v: [B=2, H=2, N=4, d=3]

static float qkv[3][NQ];

// Attention core q, k, v -> MatMul(q, kT) * 0.5 -> Softmax(axis) -> MatMul(P, v) -> y, and a
// second MatMul(P, v2) -> y2 with v2 = -v. extra: 1 = P also read by a Neg (graph output z),
// 2 = P as a MatMul's second operand.
static struct opq_model *attention(struct opq_ctx *ctx, int opset, int64_t axis, int extra) {
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, opset);
    gb_input(m, "q", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 2, 4, 3));
    gb_input(m, "k", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 2, 4, 3));
    gb_input(m, "v", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 2, 4, 3));
    gb_init_f32(m, "scale", GB_SCALAR, (const float[]){0.5f});
    struct opq_node *t = gb_node(m, "Transpose", "k", "kt");
    gb_attr_ints(m, t, "perm", 4, (const int64_t[]){0, 1, 3, 2});
    gb_node(m, "MatMul", "q,kt", "s0");
    gb_node(m, "Mul", "s0,scale", "s");
    struct opq_node *sm = gb_node(m, "Softmax", "s", "p");
    if (axis != 99)
        gb_attr_int(m, sm, "axis", axis);
    gb_node(m, "MatMul", "p,v", "y");
    gb_node(m, "Neg", "v", "v2");
    gb_node(m, "MatMul", "p,v2", "y2");
    gb_output(m, "y");
    gb_output(m, "y2");
    if (extra == 1) {
        gb_node(m, "Neg", "p", "z");
        gb_output(m, "z");
    } else if (extra == 2) {
        gb_node(m, "MatMul", "s,p", "z");
        gb_output(m, "z");
    }
    return m;
}

// The graph outputs y, y2 on the fixed inputs, into out[2 * NQ].
static void run(struct opq_ctx *ctx, struct opq_model *m, float *out) {
    struct opq_named_tensor in[3];
    const char *names[3] = {"q", "k", "v"};
    for (int i = 0; i < 3; i++)
        in[i] = (struct opq_named_tensor){.name = names[i],
                                          .t = {.dtype = OPQ_DTYPE_FLOAT, .ndim = 4,
                                                .shape = {2, 2, 4, 3}, .data = qkv[i],
                                                .nbytes = sizeof(qkv[i])}};
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, in, 3, NULL, &ex), OPQ_OK);
    struct opq_tensor y[2];
    assert_int_equal(opq_exec_run(ex, in, 3, y, 2), OPQ_OK);
    for (int o = 0; o < 2; o++) {
        assert_int_equal(y[o].ndim, 4);
        assert_int_equal(y[o].shape[3], 3);
        memcpy(out + o * NQ, y[o].data, sizeof(float) * NQ);
    }
    opq_exec_free(ex);
}

static void setup_inputs(void) {
    uint32_t s = 12345u;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < NQ; j++) {
            s = s * 1664525u + 1013904223u;
            qkv[i][j] = (float)((double)(s >> 8) / (double)(1u << 24) * 8.0 - 4.0);
        }
}

// Runs defer-softmax (opts: quantization options or NULL) and returns its rewrite count.
static int run_pass(struct opq_ctx *ctx, struct opq_model *m, const struct opq_quant_opts *q) {
    const char *names[] = {"defer-softmax", "cleanup-dead"};
    struct opq_pipeline_opts o = {.verify = true, .quant = q};
    int before = gb_count_op(m, "Softmax");
    assert_int_equal(opq_pipeline_run(ctx, m, names, 2, &o), OPQ_OK);
    assert_int_equal(opq_graph_verify(m->graph), OPQ_OK);
    return before - gb_count_op(m, "Softmax");
}

static void check_rewritten(int opset) {
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = attention(ctx, opset, opset >= 13 ? 99 : 3, 0);
    float ref[2 * NQ], got[2 * NQ];
    run(ctx, m, ref);
    assert_int_equal(run_pass(ctx, m, NULL), 1);
    assert_int_equal(gb_count_op(m, "ReduceMax"), 1);
    assert_int_equal(gb_count_op(m, "Exp"), 1);
    assert_int_equal(gb_count_op(m, "ReduceSum"), 1);
    assert_int_equal(gb_count_op(m, "Div"), 2);
    assert_int_equal(gb_count_op(m, "MatMul"), 3);
    for (int i = 0; i < m->graph->n_nodes; i++) { // axes as the opset wants them
        const struct opq_node *n = m->graph->nodes[i];
        if (!strcmp(n->op_type, "ReduceMax"))
            assert_int_equal(n->n_inputs, opset >= 18 ? 2 : 1);
        if (!strcmp(n->op_type, "ReduceSum"))
            assert_int_equal(n->n_inputs, opset >= 13 ? 2 : 1);
    }
    assert_string_equal(m->graph->outputs[0]->name, "y");
    assert_string_equal(m->graph->outputs[1]->name, "y2");
    assert_string_equal(m->graph->outputs[0]->producer->op_type, "Div");
    run(ctx, m, got);
    for (int i = 0; i < 2 * NQ; i++)
        assert_true(fabsf(got[i] - ref[i]) <= 1e-5f * (1.0f + fabsf(ref[i])));
    // the attention core is still recognised (reconstruction units depend on it)
    struct opq_recognized *r = NULL;
    assert_int_equal(opq_recognize(ctx, m->graph, &r), OPQ_OK);
    assert_int_equal(r->n_by_kind[OPQ_PAT_ATTENTION], 1);
    for (int i = 0; i < r->n_items; i++)
        if (r->items[i].kind == OPQ_PAT_ATTENTION) {
            assert_string_equal(r->items[i].softmax->op_type, "Exp");
            assert_string_equal(r->items[i].qk->outputs[0]->name, "s0");
        }
    opq_recognized_free(r);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

// With norm_readers the row sum reads the quantized E (the target's reader); without, it does
// not; nothing else is a reader.
static void test_readers(void **state) {
    (void)state;
    for (int on = 0; on <= 1; on++) {
        struct opq_ctx *ctx = opq_ctx_new();
        struct opq_model *m = attention(ctx, 17, -1, 0);
        assert_int_equal(run_pass(ctx, m, NULL), 1);
        for (int i = 0; i < m->graph->n_values; i++) // typed, as the quantize flow does first
            if (m->graph->values[i]->t.dtype == OPQ_DTYPE_UNDEF)
                m->graph->values[i]->t.dtype = OPQ_DTYPE_FLOAT;
        struct opq_placement_opts po = {.norm_readers = on};
        struct opq_placement pl;
        assert_int_equal(opq_placement_find(ctx, m->graph, &po, &pl), OPQ_OK);
        int found = 0;
        for (int t = 0; t < pl.n_targets; t++) {
            const struct opq_qtarget *tg = &pl.targets[t];
            bool exp = tg->value->producer && !strcmp(tg->value->producer->op_type, "Exp");
            if (!exp) {
                assert_int_equal(tg->n_readers, 0);
                continue;
            }
            found++;
            assert_int_equal(tg->n_consumers, 2); // the two P.V MatMuls
            assert_int_equal(tg->n_readers, on);
            if (on)
                assert_string_equal(tg->readers[0]->op_type, "ReduceSum");
        }
        assert_int_equal(found, 1);
        opq_model_free(m);
        opq_ctx_free(ctx);
    }
}

static void test_opset17(void **state) {
    (void)state;
    check_rewritten(17);
}

static void test_opset18(void **state) {
    (void)state;
    check_rewritten(18);
}

static void test_opset11(void **state) {
    (void)state;
    check_rewritten(11);
}

static void test_left_alone(void **state) {
    (void)state;
    struct {
        int opset;
        int64_t axis;
        int extra;
    } cases[] = {
        {17, 1, 0},  // not the last axis
        {17, -2, 0}, // not the last axis
        {11, 99, 0}, // opset 11 default axis 1 of a rank-4 input
        {17, 99, 1}, // P also read by a Neg
        {17, 99, 2}, // P as a MatMul's second operand
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        struct opq_ctx *ctx = opq_ctx_new();
        struct opq_model *m = attention(ctx, cases[c].opset, cases[c].axis, cases[c].extra);
        assert_int_equal(run_pass(ctx, m, NULL), 0);
        assert_int_equal(gb_count_op(m, "Exp"), 0);
        opq_model_free(m);
        opq_ctx_free(ctx);
    }
}

static void test_options(void **state) {
    (void)state;
    struct {
        int abits, defer, want;
    } cases[] = {{8, -1, 0}, {4, -1, 1}, {8, 1, 1}, {4, 0, 0}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        struct opq_ctx *ctx = opq_ctx_new();
        struct opq_model *m = attention(ctx, 17, 99, 0);
        struct opq_quant_opts q;
        opq_quant_opts_default(&q);
        q.abits = cases[c].abits;
        q.defer_softmax = cases[c].defer;
        assert_int_equal(run_pass(ctx, m, &q), cases[c].want);
        opq_model_free(m);
        opq_ctx_free(ctx);
    }
}

int main(void) {
    setup_inputs();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_opset17),     cmocka_unit_test(test_opset18),
        cmocka_unit_test(test_opset11),     cmocka_unit_test(test_left_alone),
        cmocka_unit_test(test_options),     cmocka_unit_test(test_readers),
    };
    return cmocka_run_group_tests_name("defer_softmax", tests, NULL, NULL);
}
