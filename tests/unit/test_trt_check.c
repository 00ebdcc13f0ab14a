/* test_trt_check.c: the TensorRT rule checker accepts what --target trt writes and names each
 * broken rule. Graphs are built with the Q/DQ encoder (quant/qdq.h) and then broken by hand. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <cmocka.h>

#include "gb.h"
#include "quant/qdq.h"
#include "quant/trt_check.h"

// x[N,4] -> Q/DQ -> MatMul(w[4,3], per-channel int8 DQ) -> y
static struct opq_model *build(struct opq_ctx *ctx, int64_t opset, bool act_sym, int wbits,
                               int abits, int w_axis_override) {
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, opset);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 4));
    gb_init_f32(m, "w", GB_SHAPE(4, 3),
                (const float[]){1, -2, 3, 4, -5, 6, 7, 8, -9, 1, 2, 3});
    gb_node(m, "MatMul", "x,w", "y");
    gb_output(m, "y");
    struct opq_graph *g = m->graph;
    struct opq_value *w = opq_graph_value(g, "w");
    struct opq_qparams wp[3];
    int32_t lo, hi;
    opq_qgrid(wbits, true, true, &lo, &hi);
    assert_int_equal(opq_weight_qparams(w->t.data, 12, 3, 1, lo, hi, true, OPQ_WCALIB_MINMAX, wp),
                     OPQ_OK);
    struct opq_qdq_spec ws = {.bits = wbits, .is_signed = true, .opset = opset,
                              .axis = w_axis_override, .n_ch = 3, .p = wp};
    assert_int_equal(opq_qdq_quantize_weight(g, w, &ws, NULL), OPQ_OK);
    struct opq_qparams ap;
    opq_qgrid(abits, act_sym, false, &lo, &hi);
    assert_true(opq_qparams_from_range(-1.0f, 2.0f, lo, hi, act_sym, &ap));
    struct opq_qdq_spec as = {.bits = abits, .is_signed = act_sym, .opset = opset, .n_ch = 1,
                              .p = &ap};
    assert_int_equal(opq_qdq_insert_activation(g, opq_graph_value(g, "x"), &as, NULL, NULL, 0,
                                               NULL),
                     OPQ_OK);
    assert_int_equal(opq_graph_cleanup(g), OPQ_OK);
    assert_int_equal(opq_graph_sort(g), OPQ_OK);
    return m;
}

static void expect(struct opq_ctx *ctx, struct opq_model *m, const char *needle) {
    opq_ctx_clear_error(ctx);
    enum opq_status st = opq_trt_check(ctx, m);
    if (!needle) {
        if (st != OPQ_OK)
            fail_msg("unexpected: %s", opq_ctx_errmsg(ctx));
    } else {
        assert_int_equal(st, OPQ_ERR_UNSUPPORTED);
        if (!strstr(opq_ctx_errmsg(ctx), needle))
            fail_msg("'%s' lacks '%s'", opq_ctx_errmsg(ctx), needle);
    }
    opq_model_free(m);
}

static void test_rules(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    expect(ctx, build(ctx, 17, true, 8, 8, 1), NULL);
    expect(ctx, build(ctx, 17, false, 8, 8, 1), "must be int8");             // uint8 asym
    // an int8 zero point that is not 0
    struct opq_model *z = build(ctx, 17, true, 8, 8, 1);
    for (int i = 0; i < z->graph->n_values; i++)
        if (strcmp(z->graph->values[i]->name, "x_zero_point") == 0)
            *(int8_t *)z->graph->values[i]->t.data = 3;
    expect(ctx, z, "zero point must be 0");
    expect(ctx, build(ctx, 17, true, 8, 4, 1), "feed DequantizeLinear only"); // Clip emulation
    expect(ctx, build(ctx, 21, true, 4, 8, 1), "must be int8");               // int4 weights
    // a weight quantized with -128 (full signed range) breaks the [-127, 127] rule
    struct opq_model *m = build(ctx, 17, true, 8, 8, 1);
    struct opq_graph *g = m->graph;
    for (int i = 0; i < g->n_values; i++)
        if (strcmp(g->values[i]->name, "w_quantized") == 0)
            ((int8_t *)g->values[i]->t.data)[0] = -128;
    expect(ctx, m, "[-127, 127]");
    // per-channel along the input axis: 4 rows, so build a square weight instead
    m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 3));
    gb_init_f32(m, "w", GB_SHAPE(3, 3), (const float[]){1, 2, 3, 4, 5, 6, 7, 8, 9});
    gb_node(m, "MatMul", "x,w", "y");
    gb_output(m, "y");
    struct opq_qparams wp[3];
    assert_int_equal(opq_weight_qparams(opq_graph_value(m->graph, "w")->t.data, 9, 3, 3, -127, 127,
                                        true, OPQ_WCALIB_MINMAX, wp),
                     OPQ_OK);
    struct opq_qdq_spec ws = {.bits = 8, .is_signed = true, .opset = 17, .axis = 0, .n_ch = 3,
                              .p = wp};
    assert_int_equal(opq_qdq_quantize_weight(m->graph, opq_graph_value(m->graph, "w"), &ws, NULL),
                     OPQ_OK);
    expect(ctx, m, "output-channel axis");
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_rules)};
    return cmocka_run_group_tests_name("trt_check", tests, NULL, NULL);
}
