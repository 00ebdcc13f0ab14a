/* test_pipeline.c: the pass registry, the pipeline driver (unknown names, verify after each pass,
 * error prefixes) and the canonical clean-up passes remove-identity and cleanup-dead. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "gb.h"
#include "pass.h"
#include "quantize.h"

struct fix {
    struct opq_ctx   *ctx;
    struct opq_model *m;
};

static int setup(void **state) {
    struct fix *f = calloc(1, sizeof(*f));
    f->ctx        = opq_ctx_new();
    *state        = f;
    return f->ctx ? 0 : -1;
}

static int teardown(void **state) {
    struct fix *f = *state;
    opq_model_free(f->m);
    opq_ctx_free(f->ctx);
    free(f);
    return 0;
}

static const struct opq_pipeline_opts verify_on = {.verify = true};

static void assert_msg_has(struct fix *f, const char *needle) {
    const char *msg = opq_ctx_errmsg(f->ctx);
    if (!strstr(msg, needle))
        fail_msg("message '%s' lacks '%s'", msg, needle);
}

static void run_ok(struct fix *f, const char *name) {
    const char *names[] = {name};
    enum opq_status st = opq_pipeline_run(f->ctx, f->m, names, 1, &verify_on);
    if (st != OPQ_OK)
        fail_msg("%s: %s", name, opq_ctx_errmsg(f->ctx));
}

static void test_registry(void **state) {
    (void)state;
    assert_true(opq_pass_count() >= 2);
    for (int i = 0; i < opq_pass_count(); i++) {
        const struct opq_pass *p = opq_pass_at(i);
        assert_non_null(p->run);
        assert_true(strlen(p->doc) > 10);
        assert_ptr_equal(opq_pass_find(p->name), p);
        for (int j = 0; j < i; j++)
            assert_true(strcmp(opq_pass_at(j)->name, p->name) != 0);
    }
    assert_non_null(opq_pass_find("remove-identity"));
    assert_non_null(opq_pass_find("cleanup-dead"));
    assert_null(opq_pass_find("cleanup_dead"));
    assert_null(opq_pass_at(opq_pass_count()));
    assert_true(opq_method_count() >= 1);
    assert_string_equal(opq_method_name(0), "none");
}

// Every method runs on a small valid graph (so each preset only names registered passes).
static void test_methods_run(void **state) {
    struct fix *f = *state;
    for (int i = 0; i < opq_method_count(); i++) {
        f->m = gb_new(f->ctx);
        gb_input(f->m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1, 4));
        gb_node(f->m, "Relu", "x", "y");
        gb_output(f->m, "y");
        // quantizing methods get seeded random calibration data
        struct opq_quant_opts q;
        opq_quant_opts_default(&q);
        q.calib.path                  = "random";
        q.calib.count                 = 4;
        struct opq_pipeline_opts opts = verify_on;
        opts.quant                    = &q;
        enum opq_status st = opq_pipeline_run_method(f->ctx, f->m, opq_method_name(i), &opts);
        if (st != OPQ_OK)
            fail_msg("method %s: %s", opq_method_name(i), opq_ctx_errmsg(f->ctx));
        opq_model_free(f->m);
        f->m = NULL;
    }
}

static void test_unknown_names(void **state) {
    struct fix *f = *state;
    f->m          = gb_new(f->ctx);
    gb_input(f->m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1));
    gb_node(f->m, "Identity", "x", "a");
    gb_node(f->m, "Relu", "a", "y");
    gb_output(f->m, "y");
    const char *names[] = {"remove-identity", "no-such-pass"};
    assert_int_equal(opq_pipeline_run(f->ctx, f->m, names, 2, NULL), OPQ_ERR_USAGE);
    assert_msg_has(f, "unknown pass 'no-such-pass'");
    assert_msg_has(f, "remove-identity");
    assert_msg_has(f, "cleanup-dead");
    assert_int_equal(gb_count_op(f->m, "Identity"), 1); // nothing ran
    opq_ctx_clear_error(f->ctx);
    assert_int_equal(opq_pipeline_run_method(f->ctx, f->m, "bogus", NULL), OPQ_ERR_USAGE);
    assert_msg_has(f, "unknown method 'bogus'");
    assert_msg_has(f, "none");
}

// A deliberately broken pass: rewires an input slot behind graph.c's back.
static enum opq_status break_users(struct opq_pass_ctx *pc, struct opq_graph *g) {
    (void)pc;
    g->nodes[g->n_nodes - 1]->inputs[0] = g->inputs[0];
    return OPQ_OK;
}

static enum opq_status fail_pass(struct opq_pass_ctx *pc, struct opq_graph *g) {
    return opq_set_error(pc->ctx, OPQ_ERR_SHAPE, "node '%s': bad shape", g->nodes[0]->name);
}

static void chain(struct fix *f) {
    f->m = gb_new(f->ctx);
    gb_input(f->m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1));
    gb_node(f->m, "Relu", "x", "a");
    gb_node(f->m, "Neg", "a", "y");
    gb_output(f->m, "y");
}

static void test_verify_after_pass(void **state) {
    struct fix           *f        = *state;
    const struct opq_pass broken   = {"test-broken", "breaks the users lists on purpose",
                                      break_users};
    const struct opq_pass *list[2] = {opq_pass_find("remove-identity"), &broken};
    chain(f);
    assert_int_equal(opq_pipeline_run_passes(f->ctx, f->m, list, 2, &verify_on), OPQ_ERR_INTERNAL);
    assert_msg_has(f, "pass test-broken left an invalid graph");
}

static void test_pass_error_prefixed(void **state) {
    struct fix           *f       = *state;
    const struct opq_pass failing = {"test-fail", "fails", fail_pass};
    const struct opq_pass *list[] = {&failing};
    chain(f);
    assert_int_equal(opq_pipeline_run_passes(f->ctx, f->m, list, 1, NULL), OPQ_ERR_SHAPE);
    assert_msg_has(f, "pass test-fail: node 'Relu_0': bad shape");
}

static void test_invalid_input_graph(void **state) {
    struct fix *f = *state;
    chain(f);
    gb_node(f->m, "Relu", "ghost", "z");
    assert_int_equal(opq_pipeline_run_method(f->ctx, f->m, "none", &verify_on),
                     OPQ_ERR_INVALID_MODEL);
    assert_msg_has(f, "before the first pass");
    assert_msg_has(f, "'ghost'");
}

static void test_remove_identity(void **state) {
    struct fix *f = *state;
    f->m          = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 2));
    gb_node(m, "Identity", "x", "a");                 // removed: Relu reads x
    gb_node(m, "Relu", "a", "b");
    gb_node(m, "Dropout", "b", "c");                  // removed (no training_mode, no mask)
    gb_init(m, "t", OPQ_DTYPE_BOOL, GB_SCALAR, (const uint8_t[]){1});
    gb_node(m, "Dropout", "c,,t", "d");               // kept: training_mode = true
    gb_init(m, "f", OPQ_DTYPE_BOOL, GB_SCALAR, (const uint8_t[]){0});
    gb_node(m, "Dropout", "d,,f", "e,mask");          // kept: mask is a graph output
    gb_node(m, "Dropout", "e,,f", "g,unused_mask");   // removed: training_mode false, mask unused
    gb_node(m, "Add", "g,a", "h");                    // two uses of a
    gb_node(m, "Identity", "h", "y");                 // kept: y is a graph output
    gb_output(m, "y");
    gb_output(m, "mask");
    gb_verify(m);
    run_ok(f, "remove-identity");
    assert_int_equal(gb_count_op(m, "Identity"), 1);
    assert_int_equal(gb_count_op(m, "Dropout"), 2);
    assert_int_equal(m->graph->n_nodes, 5);
    struct opq_node *relu = m->graph->nodes[0];
    assert_string_equal(relu->op_type, "Relu");
    assert_ptr_equal(relu->inputs[0], gb_value(m, "x"));
    struct opq_node *add = gb_value(m, "h")->producer;
    assert_ptr_equal(add->inputs[0], gb_value(m, "e"));
    assert_ptr_equal(add->inputs[1], gb_value(m, "x"));
    assert_ptr_equal(gb_value(m, "d")->producer->inputs[0], gb_value(m, "b"));
    assert_int_equal(gb_value(m, "a")->n_users, 0);
    gb_verify(m);
    // Running it again changes nothing.
    run_ok(f, "remove-identity");
    assert_int_equal(m->graph->n_nodes, 5);
}

static void test_cleanup_dead(void **state) {
    struct fix *f = *state;
    f->m          = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(4));
    gb_input(m, "spare", OPQ_DTYPE_FLOAT, GB_SHAPE(4)); // unused input: kept
    gb_init_f32(m, "w", GB_SHAPE(4), (const float[]){1, 2, 3, 4});
    gb_init_f32(m, "w_dead", GB_SHAPE(4), (const float[]){5, 6, 7, 8});
    gb_init_f32(m, "w_unused", GB_SHAPE(1), (const float[]){9});
    gb_node(m, "Mul", "x,w_dead", "d1");  // dead chain: d1 -> d2 -> d3, nobody reads d3
    gb_node(m, "Relu", "d1", "d2");
    gb_node(m, "Split", "x", "s0,s1");    // s1 unused but s0 used: node kept
    gb_node(m, "Neg", "d2", "d3");
    gb_node(m, "Add", "s0,w", "y");
    gb_node(m, "Abs", "y", "z");          // reads a graph output, z unused: dead
    gb_output(m, "y");
    run_ok(f, "cleanup-dead");
    assert_int_equal(m->graph->n_nodes, 2);
    assert_string_equal(m->graph->nodes[0]->op_type, "Split");
    assert_string_equal(m->graph->nodes[1]->op_type, "Add");
    assert_null(opq_graph_value(m->graph, "w_dead"));
    assert_null(opq_graph_value(m->graph, "w_unused"));
    assert_null(opq_graph_value(m->graph, "d1"));
    assert_null(opq_graph_value(m->graph, "z"));
    assert_non_null(opq_graph_value(m->graph, "s1"));
    assert_non_null(opq_graph_value(m->graph, "spare"));
    assert_int_equal(m->graph->n_inits, 1);
    assert_ptr_equal(m->graph->inits[0], gb_value(m, "w"));
    assert_int_equal(m->graph->n_inputs, 2);
    gb_verify(m);
}

static void test_method_none(void **state) {
    struct fix *f = *state;
    f->m          = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(3));
    gb_init_f32(m, "k", GB_SHAPE(3), (const float[]){1, 2, 3});
    gb_node(m, "Identity", "k", "k_id"); // Identity of an initializer: Mul reads k directly
    gb_node(m, "Mul", "x,k_id", "y");
    gb_output(m, "y");
    assert_int_equal(opq_pipeline_run_method(f->ctx, m, "none", &verify_on), OPQ_OK);
    assert_int_equal(m->graph->n_nodes, 1);
    assert_ptr_equal(m->graph->nodes[0]->inputs[1], gb_value(m, "k"));
    assert_null(opq_graph_value(m->graph, "k_id")); // cleanup-dead dropped the orphan value
    assert_int_equal(m->graph->n_inits, 1);
    gb_verify(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_registry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_methods_run, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_after_pass, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pass_error_prefixed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_input_graph, setup, teardown),
        cmocka_unit_test_setup_teardown(test_remove_identity, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cleanup_dead, setup, teardown),
        cmocka_unit_test_setup_teardown(test_method_none, setup, teardown),
    };
    return cmocka_run_group_tests_name("pipeline", tests, NULL, NULL);
}
