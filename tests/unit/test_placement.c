/* test_placement.c: which tensors get quantized; exclusions by op type, name regex and position. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <cmocka.h>

#include "gb.h"
#include "quant/placement.h"

// img -> Conv(patch) -> Flatten -> t ; t -> LN -> MatMul(w1) -> Relu -> MatMul(w2) -> Add(t) -> h
// h -> MatMul(h, hT) -> s -> Softmax -> a ; MatMul(a, h) -> o ; Add(o, h) -> h2
// h2 -> Gemm(head, transB=1) -> logits
static struct opq_model *build(struct opq_ctx *ctx) {
    struct opq_model *m = gb_new(ctx);
    static const float z[64] = {0};
    gb_input(m, "img", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 1, 4, 4));
    gb_init_f32(m, "pw", GB_SHAPE(4, 1, 2, 2), z);
    gb_init_f32(m, "w1", GB_SHAPE(4, 8), z);
    gb_init_f32(m, "w2", GB_SHAPE(8, 4), z);
    gb_init_f32(m, "hw", GB_SHAPE(3, 4), z);
    gb_init_f32(m, "g", GB_SHAPE(4), z);
    gb_node_full(m, "", "Conv", "patch_embed.proj", "img,pw", "c");
    gb_node(m, "Flatten", "c", "t");
    gb_node(m, "LayerNormalization", "t,g", "ln");
    gb_node_full(m, "", "MatMul", "blocks.0.mlp.fc1", "ln,w1", "f1");
    gb_node(m, "Relu", "f1", "r");
    gb_node_full(m, "", "MatMul", "blocks.0.mlp.fc2", "r,w2", "f2");
    gb_node(m, "Add", "f2,t", "h");
    gb_node(m, "Transpose", "h", "hT");
    gb_node_full(m, "", "MatMul", "attn.qk", "h,hT", "s");
    gb_node(m, "Softmax", "s", "a");
    gb_node_full(m, "", "MatMul", "attn.pv", "a,h", "o");
    gb_node(m, "Add", "o,h", "h2");
    struct opq_node *head = gb_node_full(m, "", "Gemm", "head", "h2,hw", "logits");
    gb_attr_int(m, head, "transB", 1);
    gb_output(m, "logits");
    for (int i = 0; i < m->graph->n_values; i++)
        if (m->graph->values[i]->t.dtype == OPQ_DTYPE_UNDEF)
            m->graph->values[i]->t.dtype = OPQ_DTYPE_FLOAT;
    assert_int_equal(opq_graph_sort(m->graph), OPQ_OK);
    return m;
}

static const struct opq_qtarget *target(const struct opq_placement *p, const char *name) {
    for (int i = 0; i < p->n_targets; i++)
        if (strcmp(p->targets[i].value->name, name) == 0)
            return &p->targets[i];
    return NULL;
}

static void test_default(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = build(ctx);
    struct opq_placement p;
    assert_int_equal(opq_placement_find(ctx, m->graph, NULL, &p), OPQ_OK);
    assert_int_equal(p.n_qnodes, 6);
    assert_int_equal(p.n_excluded, 0);
    // activations: img, ln, r, h (shared by qk and pv), hT, a, h2; weights: pw, w1, w2, hw
    assert_int_equal(p.n_targets, 11);
    assert_int_equal(target(&p, "img")->role, OPQ_QROLE_ACT);
    assert_int_equal(target(&p, "h")->n_consumers, 2);
    assert_non_null(target(&p, "hT")); // both inputs of the attention matmul
    assert_non_null(target(&p, "a"));  // the softmax output feeding softmax.V
    assert_null(target(&p, "s"));      // the Softmax input stays float
    assert_null(target(&p, "t"));      // the residual Add stays float
    assert_null(target(&p, "f2"));
    assert_int_equal(target(&p, "pw")->axis, 0); // Conv: output channels
    assert_int_equal(target(&p, "w1")->axis, 1); // MatMul [K,N]: columns
    assert_int_equal(target(&p, "hw")->axis, 0); // Gemm transB: rows
    assert_int_equal(target(&p, "w2")->role, OPQ_QROLE_WEIGHT);
    // activations come first
    for (int i = 0; i < 7; i++)
        assert_int_equal(p.targets[i].role, OPQ_QROLE_ACT);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_keep_float_and_exclude(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = build(ctx);
    struct opq_placement p;
    struct opq_placement_opts o = {0};
    assert_int_equal(opq_keep_float_parse(ctx, "patch-embed,head", &o.keep_float), OPQ_OK);
    assert_int_equal(opq_placement_find(ctx, m->graph, &o, &p), OPQ_OK);
    assert_int_equal(p.n_excluded, 2);
    assert_null(target(&p, "pw"));
    assert_null(target(&p, "hw"));
    assert_non_null(target(&p, "w1"));
    assert_null(target(&p, "h2"));
    assert_int_equal(target(&p, "h")->n_consumers, 2);
    o.keep_float = 0;
    assert_int_equal(opq_keep_float_parse(ctx, "first,last", &o.keep_float), OPQ_OK);
    assert_int_equal(opq_placement_find(ctx, m->graph, &o, &p), OPQ_OK);
    assert_int_equal(p.n_excluded, 2);
    assert_null(target(&p, "pw"));
    assert_null(target(&p, "hw"));
    o.keep_float = 0;
    o.exclude    = "Conv,mlp\\.fc[0-9]";
    assert_int_equal(opq_placement_find(ctx, m->graph, &o, &p), OPQ_OK);
    assert_int_equal(p.n_qnodes, 3);
    assert_null(target(&p, "w1"));
    assert_null(target(&p, "w2"));
    assert_non_null(target(&p, "hT"));
    // errors
    opq_ctx_clear_error(ctx);
    o.exclude = "blocks.(";
    assert_int_equal(opq_placement_find(ctx, m->graph, &o, &p), OPQ_ERR_USAGE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "bad regex 'blocks.('"));
    opq_ctx_clear_error(ctx);
    assert_int_equal(opq_keep_float_parse(ctx, "first,middle", &o.keep_float), OPQ_ERR_USAGE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "'middle'"));
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default),
        cmocka_unit_test(test_keep_float_and_exclude),
    };
    return cmocka_run_group_tests_name("placement", tests, NULL, NULL);
}
