/* test_qdq.c: Q/DQ encoding: activation pairs (int8, Clip emulation below 8 bits before opset 21,
 * int4 at opset 21), per-channel weight codes and axis, int32 bias, consumers rewired, graph
 * still valid. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <cmocka.h>

#include "gb.h"
#include "quant/qdq.h"

// x[N,4] @ w[4,3] + b[3] -> y ; x also feeds a Relu whose output is a second graph output.
static struct opq_model *build(struct opq_ctx *ctx, int64_t opset) {
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, opset);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 4));
    gb_init_f32(m, "w", GB_SHAPE(4, 3),
                (const float[]){0.5f, -1.0f, 0.25f, 0.1f, 2.0f, -0.25f, -0.5f, 0.3f, 0.125f, 0.0f,
                                -2.0f, 0.0625f});
    gb_init_f32(m, "b", GB_SHAPE(3), (const float[]){0.1f, -0.2f, 0.3f});
    gb_node(m, "MatMul", "x,w", "xw");
    gb_node(m, "Add", "xw,b", "y");
    gb_node(m, "Relu", "x", "r");
    gb_output(m, "y");
    gb_output(m, "r");
    gb_shape(m, "xw", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 3));
    gb_shape(m, "y", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 3));
    gb_shape(m, "r", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 4));
    return m;
}

static int count_op(const struct opq_graph *g, const char *op) {
    int c = 0;
    for (int i = 0; i < g->n_nodes; i++)
        c += strcmp(g->nodes[i]->op_type, op) == 0 && !(g->nodes[i]->flags & OPQ_NF_DEAD);
    return c;
}

static const struct opq_node *find_op(const struct opq_graph *g, const char *op) {
    for (int i = 0; i < g->n_nodes; i++)
        if (strcmp(g->nodes[i]->op_type, op) == 0)
            return g->nodes[i];
    return NULL;
}

static void test_activation_int8(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = build(ctx, 17);
    struct opq_graph *g = m->graph;
    struct opq_qparams p;
    assert_true(opq_qparams_from_range(-1.0f, 3.0f, 0, 255, false, &p));
    struct opq_qdq_spec s = {.bits = 8, .is_signed = false, .opset = 17, .n_ch = 1, .p = &p};
    struct opq_value *dq = NULL;
    assert_int_equal(opq_qdq_insert_activation(g, opq_graph_value(g, "x"), &s, NULL, NULL, 0, &dq),
                     OPQ_OK);
    assert_int_equal(opq_graph_sort(g), OPQ_OK);
    assert_int_equal(opq_graph_verify(g), OPQ_OK);
    assert_int_equal(count_op(g, "QuantizeLinear"), 1);
    assert_int_equal(count_op(g, "DequantizeLinear"), 1);
    assert_int_equal(count_op(g, "Clip"), 0);
    // both consumers of x now read the one DQ output
    assert_ptr_equal(find_op(g, "MatMul")->inputs[0], dq);
    assert_ptr_equal(find_op(g, "Relu")->inputs[0], dq);
    const struct opq_node *q = find_op(g, "QuantizeLinear");
    assert_ptr_equal(q->inputs[0], opq_graph_value(g, "x"));
    assert_int_equal(q->inputs[2]->t.dtype, OPQ_DTYPE_UINT8);
    assert_int_equal(q->inputs[2]->t.ndim, 0);
    assert_int_equal(*(uint8_t *)q->inputs[2]->t.data, p.zero_point);
    assert_float_equal(*(float *)q->inputs[1]->t.data, p.scale, 0.0f);
    assert_int_equal(dq->t.dtype, OPQ_DTYPE_FLOAT);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_activation_low_bits(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    for (int64_t opset = 17; opset <= 21; opset += 4) {
        struct opq_model *m = build(ctx, opset);
        struct opq_graph *g = m->graph;
        struct opq_qparams p;
        assert_true(opq_qparams_from_range(-1.0f, 1.0f, -8, 7, true, &p));
        struct opq_qdq_spec s = {.bits = 4, .is_signed = true, .opset = opset, .n_ch = 1, .p = &p};
        // only the MatMul reads the quantized x; the float Relu keeps the float x
        struct opq_node *mm = (struct opq_node *)find_op(g, "MatMul");
        assert_int_equal(opq_qdq_insert_activation(g, opq_graph_value(g, "x"), &s, "act", &mm, 1,
                                                   NULL),
                         OPQ_OK);
        assert_ptr_equal(find_op(g, "Relu")->inputs[0], opq_graph_value(g, "x"));
        assert_ptr_equal(mm->inputs[0], find_op(g, "DequantizeLinear")->outputs[0]);
        assert_int_equal(opq_graph_sort(g), OPQ_OK);
        assert_int_equal(opq_graph_verify(g), OPQ_OK);
        const struct opq_node *q = find_op(g, "QuantizeLinear");
        if (opset < 21) {
            // exact emulation: int8 codes clipped to the 4-bit grid
            const struct opq_node *c = find_op(g, "Clip");
            assert_non_null(c);
            assert_int_equal(q->outputs[0]->t.dtype, OPQ_DTYPE_INT8);
            assert_int_equal(*(int8_t *)c->inputs[1]->t.data, -8);
            assert_int_equal(*(int8_t *)c->inputs[2]->t.data, 7);
            assert_ptr_equal(find_op(g, "DequantizeLinear")->inputs[0], c->outputs[0]);
        } else {
            assert_null(find_op(g, "Clip"));
            assert_int_equal(q->outputs[0]->t.dtype, OPQ_DTYPE_INT4);
            assert_int_equal(q->inputs[2]->t.dtype, OPQ_DTYPE_INT4);
        }
        assert_non_null(opq_graph_value(g, "act_scale"));
        opq_model_free(m);
    }
    opq_ctx_free(ctx);
}

static void test_weight_per_channel(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    for (int64_t opset = 17; opset <= 21; opset += 4) {
        struct opq_model *m = build(ctx, opset);
        struct opq_graph *g = m->graph;
        struct opq_value *w = opq_graph_value(g, "w");
        struct opq_qparams p[3];
        assert_int_equal(opq_weight_qparams(w->t.data, 12, 3, 1, -8, 7, true, OPQ_WCALIB_MINMAX, p),
                         OPQ_OK);
        struct opq_qdq_spec s = {.bits = 4, .is_signed = true, .opset = opset, .axis = 1,
                                 .n_ch = 3, .p = p};
        struct opq_value *dq = NULL;
        assert_int_equal(opq_qdq_quantize_weight(g, w, &s, &dq), OPQ_OK);
        assert_int_equal(opq_graph_cleanup(g), OPQ_OK);
        assert_int_equal(opq_graph_sort(g), OPQ_OK);
        assert_int_equal(opq_graph_verify(g), OPQ_OK);
        assert_null(opq_graph_value(g, "w")); // the float weight is gone
        const struct opq_node *d = find_op(g, "DequantizeLinear");
        assert_int_equal(opq_node_attr_int(d, "axis", -99), 1);
        assert_ptr_equal(find_op(g, "MatMul")->inputs[1], dq);
        const struct opq_value *qw = d->inputs[0];
        assert_int_equal(qw->t.ndim, 2);
        assert_int_equal(d->inputs[1]->t.ndim, 1);
        assert_int_equal(d->inputs[1]->t.shape[0], 3);
        // column 1 = {-1, 2, 0.3, -2}: amax 2 -> scale 2/7; codes round half to even
        const float col[4] = {-1.0f, 2.0f, 0.3f, -2.0f};
        for (int k = 0; k < 4; k++) {
            int want = (int)nearbyintf(col[k] / (2.0f / 7.0f));
            int got;
            if (opset < 21) {
                assert_int_equal(qw->t.dtype, OPQ_DTYPE_INT8);
                got = ((const int8_t *)qw->t.data)[k * 3 + 1];
            } else {
                assert_int_equal(qw->t.dtype, OPQ_DTYPE_INT4);
                assert_int_equal(qw->t.nbytes, 6);
                size_t i = (size_t)k * 3 + 1;
                uint8_t byte = ((const uint8_t *)qw->t.data)[i / 2];
                int nib = (i & 1) ? byte >> 4 : byte & 0xF;
                got = nib >= 8 ? nib - 16 : nib;
            }
            assert_int_equal(got, want);
        }
        opq_model_free(m);
    }
    opq_ctx_free(ctx);
}

static void test_bias_and_errors(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = build(ctx, 17);
    struct opq_graph *g = m->graph;
    const float scales[3] = {0.01f, 0.02f, 0.001f};
    struct opq_value *dq;
    assert_int_equal(opq_qdq_quantize_bias(g, opq_graph_value(g, "b"), scales, 3, &dq), OPQ_OK);
    const struct opq_node *d = find_op(g, "DequantizeLinear");
    const int32_t *q = d->inputs[0]->t.data;
    assert_int_equal(q[0], 10);
    assert_int_equal(q[1], -10);
    assert_int_equal(q[2], 300);
    assert_int_equal(d->inputs[2]->t.dtype, OPQ_DTYPE_INT32);
    assert_int_equal(opq_graph_sort(g), OPQ_OK);
    assert_int_equal(opq_graph_verify(g), OPQ_OK);
    // a bias that overflows int32 at a tiny scale is refused, naming it
    struct opq_model *m2 = build(ctx, 17);
    const float tiny[1] = {1e-12f};
    opq_ctx_clear_error(ctx);
    assert_int_equal(opq_qdq_quantize_bias(m2->graph, opq_graph_value(m2->graph, "b"), tiny, 1,
                                           NULL),
                     OPQ_ERR_NUMERIC);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "bias 'b'"));
    // NaN weights are refused, naming the weight
    struct opq_value *w = opq_graph_value(m2->graph, "w");
    ((float *)w->t.data)[5] = NAN;
    struct opq_qparams p = {.scale = 0.1f, .zero_point = 0, .qmin = -128, .qmax = 127};
    struct opq_qdq_spec s = {.bits = 8, .is_signed = true, .opset = 17, .n_ch = 1, .p = &p};
    opq_ctx_clear_error(ctx);
    assert_int_equal(opq_qdq_quantize_weight(m2->graph, w, &s, NULL), OPQ_ERR_NUMERIC);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "'w' has NaN"));
    opq_model_free(m2);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_activation_int8),
        cmocka_unit_test(test_activation_low_bits),
        cmocka_unit_test(test_weight_per_channel),
        cmocka_unit_test(test_bias_and_errors),
    };
    return cmocka_run_group_tests_name("qdq", tests, NULL, NULL);
}
