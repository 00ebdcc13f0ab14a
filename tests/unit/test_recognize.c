/* test_recognize.c: pattern recognition on hand-built graphs: a pre-LN transformer block with a
 * decomposed LayerNorm, a scaled+masked attention core and an Erf GELU written in a shuffled
 * operand order; a Tanh GELU; and the summary text. The block's node range, run alone through
 * the executor from its input, reproduces the full run. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "exec.h"
#include "gb.h"
#include "recognize.h"

static void fill(float *x, size_t n, uint32_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = ((float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f) * 0.5f;
    }
}

static void ln_chain(struct opq_model *m, const char *x, const char *p, const char *out) {
    char n[8][64];
    for (int i = 0; i < 8; i++)
        snprintf(n[i], sizeof(n[i]), "%s_%d", p, i);
    char buf[256];
    struct opq_node *r1 = gb_node(m, "ReduceMean", x, n[0]);
    gb_attr_ints(m, r1, "axes", 1, (const int64_t[]){-1});
    snprintf(buf, sizeof(buf), "%s,%s", x, n[0]);
    gb_node(m, "Sub", buf, n[1]);
    snprintf(buf, sizeof(buf), "%s,two", n[1]);
    gb_node(m, "Pow", buf, n[2]);
    struct opq_node *r2 = gb_node(m, "ReduceMean", n[2], n[3]);
    gb_attr_ints(m, r2, "axes", 1, (const int64_t[]){-1});
    snprintf(buf, sizeof(buf), "%s,eps", n[3]);
    gb_node(m, "Add", buf, n[4]);
    gb_node(m, "Sqrt", n[4], n[5]);
    snprintf(buf, sizeof(buf), "%s,%s", n[1], n[5]);
    gb_node(m, "Div", buf, n[6]);
    snprintf(buf, sizeof(buf), "%s_g,%s", p, n[6]); // gamma first: operand order varies
    gb_node(m, "Mul", buf, n[7]);
    snprintf(buf, sizeof(buf), "%s,%s_b", n[7], p);
    gb_node(m, "Add", buf, out);
}

static struct opq_model *block_model(struct opq_ctx *ctx) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 5, 8));
    float w[8 * 32];
    fill(w, 256, 1);
    gb_init_f32(m, "two", GB_SCALAR, (const float[]){2});
    gb_init_f32(m, "eps", GB_SCALAR, (const float[]){1e-5f});
    gb_init_f32(m, "one", GB_SCALAR, (const float[]){1});
    gb_init_f32(m, "half", GB_SCALAR, (const float[]){0.5f});
    gb_init_f32(m, "sqrt2", GB_SCALAR, (const float[]){1.4142135f});
    gb_init_f32(m, "scale", GB_SCALAR, (const float[]){0.35355339f});
    gb_init_f32(m, "mask", GB_SHAPE(5, 5), (const float[25]){0});
    gb_init_f32(m, "ln1_g", GB_SHAPE(8), w);
    gb_init_f32(m, "ln1_b", GB_SHAPE(8), w + 8);
    gb_init_f32(m, "ln2_g", GB_SHAPE(8), w + 16);
    gb_init_f32(m, "ln2_b", GB_SHAPE(8), w + 24);
    gb_init_f32(m, "wq", GB_SHAPE(8, 8), w + 32);
    gb_init_f32(m, "wk", GB_SHAPE(8, 8), w + 96);
    gb_init_f32(m, "wv", GB_SHAPE(8, 8), w + 160);
    gb_init_f32(m, "w1", GB_SHAPE(8, 16), w + 64);
    gb_init_f32(m, "w2", GB_SHAPE(16, 8), w + 128);
    ln_chain(m, "x", "ln1", "h");
    gb_node(m, "MatMul", "h,wq", "q");
    gb_node(m, "MatMul", "h,wk", "k");
    gb_node(m, "MatMul", "h,wv", "v");
    struct opq_node *t = gb_node(m, "Transpose", "k", "kt");
    gb_attr_ints(m, t, "perm", 3, (const int64_t[]){0, 2, 1});
    gb_node(m, "MatMul", "q,kt", "s");
    gb_node(m, "Mul", "s,scale", "ss");
    gb_node(m, "Add", "ss,mask", "sm");
    gb_node(m, "Softmax", "sm", "p");
    gb_node(m, "MatMul", "p,v", "att");
    gb_node(m, "Add", "x,att", "r1");
    ln_chain(m, "r1", "ln2", "h2");
    gb_node(m, "MatMul", "h2,w1", "u");
    gb_node(m, "Div", "u,sqrt2", "ud");
    gb_node(m, "Erf", "ud", "ue");
    gb_node(m, "Add", "one,ue", "ua"); // 1 + erf
    gb_node(m, "Mul", "half,u", "uh"); // 0.5 x first
    gb_node(m, "Mul", "ua,uh", "g");
    gb_node(m, "MatMul", "g,w2", "mlp");
    gb_node(m, "Add", "mlp,r1", "y");
    gb_output(m, "y");
    gb_verify(m);
    return m;
}

static void test_block(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = block_model(ctx);
    struct opq_recognized *r = NULL;
    assert_int_equal(opq_recognize(ctx, m->graph, &r), OPQ_OK);
    assert_int_equal(r->n_by_kind[OPQ_PAT_LAYERNORM], 2);
    assert_int_equal(r->n_by_kind[OPQ_PAT_GELU], 1);
    assert_int_equal(r->n_by_kind[OPQ_PAT_ATTENTION], 1);
    assert_int_equal(r->n_by_kind[OPQ_PAT_BLOCK], 1);
    const struct opq_pattern *blk = NULL;
    for (int i = 0; i < r->n_items; i++) {
        const struct opq_pattern *p = &r->items[i];
        if (p->kind == OPQ_PAT_LAYERNORM) {
            assert_int_equal(p->variant, OPQ_PV_DECOMPOSED);
            assert_int_equal(p->n_nodes, 9);
        } else if (p->kind == OPQ_PAT_GELU) {
            assert_int_equal(p->variant, OPQ_PV_ERF);
            assert_string_equal(p->input->name, "u");
            assert_string_equal(p->output->name, "g");
            assert_int_equal(p->n_nodes, 5);
        } else if (p->kind == OPQ_PAT_ATTENTION) {
            assert_int_equal(p->n_nodes, 5);
            assert_string_equal(p->softmax->outputs[0]->name, "p");
        } else {
            blk = p;
        }
    }
    assert_non_null(blk);
    assert_string_equal(blk->input->name, "x");
    assert_string_equal(blk->output->name, "y");
    char buf[512];
    size_t need = opq_recognize_describe(r, buf, sizeof(buf));
    assert_true(need < sizeof(buf));
    assert_non_null(strstr(buf, "LayerNorm  2 (2 decomposed)"));
    assert_non_null(strstr(buf, "GELU       1 (1 erf chain)"));
    assert_non_null(strstr(buf, "block 0:"));
    assert_int_equal(opq_recognize_describe(r, buf, 8), need); // truncation keeps the length
    assert_int_equal(strlen(buf), 7);
    // the block range run alone from its input equals the full run
    float x[80];
    fill(x, 80, 7);
    struct opq_named_tensor in = {.name = "x"};
    in.t = (struct opq_tensor){
        .dtype = OPQ_DTYPE_FLOAT, .ndim = 3, .shape = {2, 5, 8}, .data = x, .nbytes = sizeof(x)};
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    struct opq_tensor y;
    assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
    float full[80];
    memcpy(full, y.data, sizeof(full));
    memset(y.data, 0, sizeof(full));
    assert_int_equal(opq_exec_run_range(ex, blk->first, blk->last, &in, 1), OPQ_OK);
    assert_memory_equal(opq_exec_value(ex, "y")->data, full, sizeof(full));
    opq_exec_free(ex);
    opq_recognized_free(r);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_gelu_variants(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, 20);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(4));
    gb_init_f32(m, "three", GB_SCALAR, (const float[]){3});
    gb_init_f32(m, "c", GB_SCALAR, (const float[]){0.044715f});
    gb_init_f32(m, "k", GB_SCALAR, (const float[]){0.7978846f});
    gb_init_f32(m, "one", GB_SCALAR, (const float[]){1});
    gb_init_f32(m, "half", GB_SCALAR, (const float[]){0.5f});
    gb_node(m, "Pow", "x,three", "x3");
    gb_node(m, "Mul", "c,x3", "cx3");
    gb_node(m, "Add", "x,cx3", "in");
    gb_node(m, "Mul", "in,k", "kin");
    gb_node(m, "Tanh", "kin", "t");
    gb_node(m, "Add", "t,one", "t1");
    gb_node(m, "Mul", "x,t1", "xt");
    gb_node(m, "Mul", "xt,half", "y");
    gb_node(m, "Gelu", "y", "z");
    gb_output(m, "z");
    struct opq_recognized *r = NULL;
    assert_int_equal(opq_recognize(ctx, m->graph, &r), OPQ_OK);
    assert_int_equal(r->n_by_kind[OPQ_PAT_GELU], 2);
    int tanh_seen = 0, op_seen = 0;
    for (int i = 0; i < r->n_items; i++) {
        tanh_seen += r->items[i].variant == OPQ_PV_TANH && r->items[i].n_nodes == 8;
        op_seen += r->items[i].variant == OPQ_PV_OP;
    }
    assert_int_equal(tanh_seen, 1);
    assert_int_equal(op_seen, 1);
    opq_recognized_free(r);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_block),
        cmocka_unit_test(test_gelu_variants),
    };
    return cmocka_run_group_tests_name("recognize", tests, NULL, NULL);
}
