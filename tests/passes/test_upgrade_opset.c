/* test_upgrade_opset.c: the upgrade-opset pass moves ReduceMean's axes attribute to an input (one
 * shared initializer for equal axes) and the result computes the same, gives Split without a
 * split input its num_outputs, repeats GroupNormalization's per-group scale/bias per channel,
 * leaves ops whose change lies above the target and other domains alone, sets the opset and IR
 * version, and refuses (naming the node, without changing the model) an op it cannot convert,
 * an unknown op, and a target below the model's opset. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <cmocka.h>

#include "exec.h"
#include "gb.h"
#include "pass.h"

static const float xs[2 * 3 * 4] = {1, 2,  3,  4,  -1, 0,  5, 9,  2,  2, 2, 2,
                                    0, -4, 8, 12, 7,  -7, 1, -1, .5f, 1, 3, 6};

// x[2,3,4] -> ReduceMean(axes -1) -> a; ReduceMean(axes -1, keepdims 0) -> b; Sub(x, a) -> y.
static struct opq_model *reduce_model(struct opq_ctx *ctx, int64_t opset) {
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, opset);
    m->ir_version = 7;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3, 4));
    struct opq_node *r1 = gb_node(m, "ReduceMean", "x", "a");
    gb_attr_ints(m, r1, "axes", 1, (const int64_t[]){-1});
    struct opq_node *r2 = gb_node(m, "ReduceMean", "x", "b");
    gb_attr_ints(m, r2, "axes", 1, (const int64_t[]){-1});
    gb_attr_int(m, r2, "keepdims", 0);
    gb_node(m, "Sub", "x,a", "y");
    gb_output(m, "y");
    gb_output(m, "b");
    return m;
}

static enum opq_status upgrade(struct opq_ctx *ctx, struct opq_model *m, int target) {
    const char *names[] = {"upgrade-opset"};
    struct opq_pipeline_opts o = {.verify = true, .opset = target};
    return opq_pipeline_run(ctx, m, names, 1, &o);
}

static struct opq_node *find_node(struct opq_model *m, const char *op_type, int nth) {
    for (int i = 0; i < m->graph->n_nodes; i++)
        if (strcmp(m->graph->nodes[i]->op_type, op_type) == 0 && nth-- == 0)
            return m->graph->nodes[i];
    fail_msg("no %s node", op_type);
    return NULL;
}

// Runs m on xs; out[0] receives y (24 floats), out[1] b (6 floats).
static void run_reduce(struct opq_ctx *ctx, struct opq_model *m, float *y, float *b) {
    struct opq_named_tensor in = {.name = "x", .t = {.dtype = OPQ_DTYPE_FLOAT, .ndim = 3,
                                                     .shape = {2, 3, 4}, .data = (void *)xs,
                                                     .nbytes = sizeof(xs)}};
    struct opq_exec *ex = NULL;
    if (opq_exec_plan(ctx, m, &in, 1, NULL, &ex) != OPQ_OK)
        fail_msg("plan: %s", opq_ctx_errmsg(ctx));
    struct opq_tensor out[2];
    assert_int_equal(opq_exec_run(ex, &in, 1, out, 2), OPQ_OK);
    assert_int_equal(out[0].nbytes, 24 * sizeof(float));
    assert_int_equal(out[1].nbytes, 6 * sizeof(float));
    memcpy(y, out[0].data, out[0].nbytes);
    memcpy(b, out[1].data, out[1].nbytes);
    opq_exec_free(ex);
}

static void test_reduce_axes_to_input(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = reduce_model(ctx, 13);
    float y0[24], b0[6], y1[24], b1[6];
    run_reduce(ctx, m, y0, b0);
    assert_int_equal(upgrade(ctx, m, 0), OPQ_OK);
    assert_int_equal(opq_model_opset(m, ""), 21);
    assert_int_equal(m->ir_version, 10);
    struct opq_node *r1 = find_node(m, "ReduceMean", 0);
    struct opq_node *r2 = find_node(m, "ReduceMean", 1);
    assert_null(opq_node_attr(r1, "axes"));
    assert_null(opq_node_attr(r2, "axes"));
    assert_int_equal(opq_node_attr_int(r2, "keepdims", 1), 0); // other attributes kept
    assert_int_equal(r1->n_inputs, 2);
    const struct opq_value *ax = r1->inputs[1];
    assert_non_null(ax);
    assert_true(ax->kind & OPQ_VK_INIT);
    assert_int_equal(ax->t.dtype, OPQ_DTYPE_INT64);
    assert_int_equal(ax->t.ndim, 1);
    assert_int_equal(ax->t.shape[0], 1);
    assert_int_equal(((const int64_t *)ax->t.data)[0], -1);
    assert_ptr_equal(r2->inputs[1], ax); // equal axes share one initializer
    run_reduce(ctx, m, y1, b1);
    assert_memory_equal(y0, y1, sizeof(y0));
    assert_memory_equal(b0, b1, sizeof(b0));
    assert_float_equal(b1[0], 2.5f, 0.0f); // mean of 1,2,3,4
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_target_below_reduce_change(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = reduce_model(ctx, 13);
    assert_int_equal(upgrade(ctx, m, 17), OPQ_OK);
    assert_int_equal(opq_model_opset(m, ""), 17);
    assert_int_equal(m->ir_version, 8);
    assert_non_null(opq_node_attr(find_node(m, "ReduceMean", 0), "axes")); // 18's change
    assert_int_equal(find_node(m, "ReduceMean", 0)->n_inputs, 1);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_split_num_outputs(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, 17);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 6));
    gb_init_i64(m, "sizes", GB_SHAPE(2), (const int64_t[]){2, 4});
    struct opq_node *even = gb_node(m, "Split", "x", "p,q,r");
    gb_attr_int(m, even, "axis", 1);
    struct opq_node *given = gb_node(m, "Split", "x,sizes", "s,t");
    gb_attr_int(m, given, "axis", 1);
    gb_node_full(m, "com.example", "Frobnicate", "custom", "x", "z"); // another domain
    gb_output(m, "p");
    gb_output(m, "q");
    gb_output(m, "r");
    gb_output(m, "s");
    gb_output(m, "t");
    gb_output(m, "z");
    assert_int_equal(upgrade(ctx, m, 21), OPQ_OK);
    assert_int_equal(opq_node_attr_int(even, "num_outputs", 0), 3);
    assert_null(opq_node_attr(given, "num_outputs"));
    assert_int_equal(opq_model_opset(m, ""), 21);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_groupnorm_per_channel(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, 18);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1, 4, 3));
    gb_init_f32(m, "gamma", GB_SHAPE(2), (const float[]){2.0f, 3.0f});
    gb_init_f32(m, "beta", GB_SHAPE(2), (const float[]){-1.0f, 1.0f});
    struct opq_node *gn = gb_node(m, "GroupNormalization", "x,gamma,beta", "y");
    gb_attr_int(m, gn, "num_groups", 2);
    gb_output(m, "y");
    assert_int_equal(upgrade(ctx, m, 21), OPQ_OK);
    const struct opq_value *s = gn->inputs[1], *b = gn->inputs[2];
    assert_int_equal(s->t.shape[0], 4);
    assert_int_equal(b->t.shape[0], 4);
    const float want_s[4] = {2, 2, 3, 3}, want_b[4] = {-1, -1, 1, 1};
    assert_memory_equal(s->t.data, want_s, sizeof(want_s));
    assert_memory_equal(b->t.data, want_b, sizeof(want_b));
    opq_model_free(m);
    opq_ctx_free(ctx);
}

// A refusal names the node and op, and leaves the model as it was (checked before any rewrite).
static void expect_refusal(struct opq_ctx *ctx, struct opq_model *m, const char *want) {
    assert_int_equal(upgrade(ctx, m, 21), OPQ_ERR_UNSUPPORTED);
    const char *msg = opq_ctx_errmsg(ctx);
    if (!strstr(msg, want))
        fail_msg("message '%s' lacks '%s'", msg, want);
    assert_int_equal(opq_model_opset(m, ""), 13);
    assert_non_null(opq_node_attr(find_node(m, "ReduceMean", 0), "axes"));
    assert_int_equal(find_node(m, "ReduceMean", 0)->n_inputs, 1);
}

static void test_refusals(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = reduce_model(ctx, 13);
    gb_node_full(m, "", "Frobnicate", "frob", "y", "w");
    gb_output(m, "w");
    expect_refusal(ctx, m, "node 'frob' (Frobnicate): cannot upgrade from opset 13 to 21: not an "
                           "ai.onnx operator");
    opq_model_free(m);

    opq_ctx_clear_error(ctx);
    m = reduce_model(ctx, 13);
    gb_init_f32(m, "bn_s", GB_SHAPE(3), (const float[]){1, 1, 1});
    gb_init_f32(m, "bn_b", GB_SHAPE(3), (const float[]){0, 0, 0});
    gb_node_full(m, "", "BatchNormalization", "bn", "y,bn_s,bn_b,bn_b,bn_s", "w,mean");
    gb_output(m, "w");
    gb_output(m, "mean");
    expect_refusal(ctx, m, "node 'bn' (BatchNormalization): cannot upgrade from opset 13 to 21: "
                           "training-mode outputs");
    opq_model_free(m);

    opq_ctx_clear_error(ctx);
    m = reduce_model(ctx, 13);
    gb_init_i64(m, "cond_in", GB_SCALAR, (const int64_t[]){1});
    gb_node_full(m, "", "If", "branch", "cond_in", "w");
    gb_output(m, "w");
    expect_refusal(ctx, m, "node 'branch' (If): cannot upgrade from opset 13 to 21: its subgraphs");
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_target_below_model(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = reduce_model(ctx, 17);
    assert_int_equal(upgrade(ctx, m, 15), OPQ_ERR_USAGE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "below the model's opset 17"));
    assert_int_equal(opq_model_opset(m, ""), 17);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reduce_axes_to_input),
        cmocka_unit_test(test_target_below_reduce_change),
        cmocka_unit_test(test_split_num_outputs),
        cmocka_unit_test(test_groupnorm_per_channel),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_target_below_model),
    };
    return cmocka_run_group_tests_name("upgrade_opset", tests, NULL, NULL);
}
