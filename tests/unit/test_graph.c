/* test_graph.c: the graph mutation API (graph.h): users lists stay consistent through add,
 * set_input, replace_uses, mark_dead and cleanup; the sort is stable and detects cycles; verify
 * catches each kind of broken invariant (broken on purpose by poking the IR directly). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gb.h"
#include "base.h"

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

static int n_uses(const struct opq_value *v, const struct opq_node *n) {
    int c = 0;
    for (int i = 0; i < v->n_users; i++)
        c += v->users[i] == n;
    return c;
}

// x -> Relu -> a -> Add(a, a) -> b -> Neg -> y
static struct opq_model *chain(struct fix *f) {
    f->m = gb_new(f->ctx);
    gb_input(f->m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3));
    gb_node(f->m, "Relu", "x", "a");
    gb_node(f->m, "Add", "a,a", "b");
    gb_node(f->m, "Neg", "b", "y");
    gb_output(f->m, "y");
    return f->m;
}

static void expect_verify_fails(struct fix *f, const char *needle) {
    opq_ctx_clear_error(f->ctx);
    assert_int_equal(opq_graph_verify(f->m->graph), OPQ_ERR_INVALID_MODEL);
    const char *msg = opq_ctx_errmsg(f->ctx);
    if (!strstr(msg, needle))
        fail_msg("message '%s' lacks '%s'", msg, needle);
}

static void test_users_on_add(void **state) {
    struct fix       *f   = *state;
    struct opq_model *m   = chain(f);
    struct opq_node  *add = m->graph->nodes[1];
    assert_int_equal(gb_value(m, "a")->n_users, 2); // one entry per input slot
    assert_int_equal(n_uses(gb_value(m, "a"), add), 2);
    assert_ptr_equal(gb_value(m, "b")->producer, add);
    assert_null(gb_value(m, "x")->producer);
    gb_verify(m);
}

static void test_add_node_rejects_second_producer(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    struct opq_value *in[1]  = {gb_value(m, "x")};
    struct opq_value *out[1] = {gb_value(m, "a")};
    assert_int_equal(opq_graph_add_node(m->graph, "Abs", "", "dup", in, 1, out, 1, NULL),
                     OPQ_ERR_INVALID_MODEL);
    assert_non_null(strstr(opq_ctx_errmsg(f->ctx), "'a'"));
    out[0] = gb_value(m, "x"); // a graph input cannot be produced either
    opq_ctx_clear_error(f->ctx);
    assert_int_equal(opq_graph_add_node(m->graph, "Abs", "", "dup", in, 1, out, 1, NULL),
                     OPQ_ERR_INVALID_MODEL);
    assert_int_equal(m->graph->n_nodes, 3);
    gb_verify(m);
}

static void test_set_input(void **state) {
    struct fix       *f   = *state;
    struct opq_model *m   = chain(f);
    struct opq_node  *add = m->graph->nodes[1];
    assert_int_equal(opq_node_set_input(m->graph, add, 1, gb_value(m, "x")), OPQ_OK);
    assert_int_equal(n_uses(gb_value(m, "a"), add), 1);
    assert_int_equal(n_uses(gb_value(m, "x"), add), 1);
    assert_int_equal(opq_node_set_input(m->graph, add, 0, NULL), OPQ_OK);
    assert_int_equal(gb_value(m, "a")->n_users, 0);
    gb_verify(m);
}

// Growing adds omitted slots; shrinking drops the node from the removed inputs' users.
static void test_resize_inputs(void **state) {
    struct fix       *f   = *state;
    struct opq_model *m   = chain(f);
    struct opq_node  *add = m->graph->nodes[1];
    struct opq_value *in1 = add->inputs[1];
    assert_int_equal(opq_node_resize_inputs(m->graph, add, 4), OPQ_OK);
    assert_int_equal(add->n_inputs, 4);
    assert_null(add->inputs[2]);
    assert_null(add->inputs[3]);
    assert_int_equal(n_uses(in1, add), 2); // Add(a, a)
    assert_int_equal(opq_node_set_input(m->graph, add, 3, gb_value(m, "x")), OPQ_OK);
    assert_int_equal(opq_node_resize_inputs(m->graph, add, 1), OPQ_OK);
    assert_int_equal(add->n_inputs, 1);
    assert_int_equal(n_uses(in1, add), 1);
    assert_int_equal(n_uses(gb_value(m, "x"), add), 0);
    gb_verify(m);
}

static void test_remove_attr(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = gb_new(f->ctx);
    f->m                = m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2));
    struct opq_node *n = gb_node(m, "Relu", "x", "y");
    gb_attr_int(m, n, "a", 1);
    gb_attr_int(m, n, "b", 2);
    gb_attr_int(m, n, "c", 3);
    assert_true(opq_node_remove_attr(n, "b"));
    assert_false(opq_node_remove_attr(n, "b"));
    assert_int_equal(n->n_attrs, 2);
    assert_int_equal(opq_node_attr_int(n, "a", 0), 1);
    assert_int_equal(opq_node_attr_int(n, "c", 0), 3);
    assert_null(opq_node_attr(n, "b"));
}

static void test_replace_uses(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    // Bypass Relu: every use of a becomes a use of x.
    assert_int_equal(opq_graph_replace_uses(m->graph, gb_value(m, "a"), gb_value(m, "x")), OPQ_OK);
    struct opq_node *add = m->graph->nodes[1];
    assert_ptr_equal(add->inputs[0], gb_value(m, "x"));
    assert_ptr_equal(add->inputs[1], gb_value(m, "x"));
    assert_int_equal(gb_value(m, "a")->n_users, 0);
    assert_int_equal(n_uses(gb_value(m, "x"), add), 2);
    assert_int_equal(gb_value(m, "x")->n_users, 3); // Relu + Add twice
    gb_verify(m);
    // Graph outputs keep their names: replacing them is refused.
    assert_int_equal(opq_graph_replace_uses(m->graph, gb_value(m, "y"), gb_value(m, "b")),
                     OPQ_ERR_INTERNAL);
    // Replacing a value by itself changes nothing.
    assert_int_equal(opq_graph_replace_uses(m->graph, gb_value(m, "b"), gb_value(m, "b")), OPQ_OK);
    assert_int_equal(gb_value(m, "b")->n_users, 1);
}

static void test_mark_dead_and_cleanup(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    gb_init_f32(m, "unused_w", GB_SHAPE(2), (const float[]){1, 2});
    gb_shape(m, "a", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 3));
    assert_int_equal(opq_graph_add_info(m->graph, gb_value(m, "a")), OPQ_OK);
    struct opq_node *relu = m->graph->nodes[0];
    assert_int_equal(opq_graph_replace_uses(m->graph, gb_value(m, "a"), gb_value(m, "x")), OPQ_OK);
    opq_graph_mark_dead(m->graph, relu);
    opq_graph_mark_dead(m->graph, relu); // idempotent
    assert_true(relu->flags & OPQ_NF_DEAD);
    assert_null(gb_value(m, "a")->producer);
    assert_int_equal(n_uses(gb_value(m, "x"), relu), 0);
    gb_verify(m); // dead nodes are ignored
    int n_values = m->graph->n_values;
    assert_int_equal(opq_graph_cleanup(m->graph), OPQ_OK);
    assert_int_equal(m->graph->n_nodes, 2);
    assert_string_equal(m->graph->nodes[0]->op_type, "Add");
    assert_int_equal(m->graph->nodes[0]->index, 0);
    // 'a' and the unused initializer are gone (also from the name map and their lists).
    assert_int_equal(m->graph->n_values, n_values - 2);
    assert_null(opq_graph_value(m->graph, "a"));
    assert_null(opq_graph_value(m->graph, "unused_w"));
    assert_int_equal(m->graph->n_inits, 0);
    assert_int_equal(m->graph->n_infos, 0);
    for (int i = 0; i < m->graph->n_values; i++)
        assert_int_equal(m->graph->values[i]->index, i);
    gb_verify(m);
}

static void test_cleanup_keeps_io_and_live_outputs(void **state) {
    struct fix       *f = *state;
    f->m                = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(4));
    gb_input(m, "unused_in", OPQ_DTYPE_FLOAT, GB_SHAPE(4));
    gb_node(m, "Split", "x", "p,q"); // q has no users but its producer is live
    gb_output(m, "p");
    assert_int_equal(opq_graph_cleanup(m->graph), OPQ_OK);
    assert_non_null(opq_graph_value(m->graph, "unused_in"));
    assert_non_null(opq_graph_value(m->graph, "q"));
    assert_int_equal(m->graph->n_nodes, 1);
    gb_verify(m);
}

static void test_dead_node_output_can_be_reproduced(void **state) {
    struct fix       *f    = *state;
    struct opq_model *m    = chain(f);
    struct opq_node  *relu = m->graph->nodes[0];
    opq_graph_mark_dead(m->graph, relu);
    expect_verify_fails(f, "'a' is not defined");
    struct opq_node *n = gb_node(m, "Sigmoid", "x", "a");
    assert_ptr_equal(gb_value(m, "a")->producer, n);
    expect_verify_fails(f, "topological"); // appended after its users
    opq_graph_move_before(m->graph, n, m->graph->nodes[1]);
    gb_verify(m);
    assert_int_equal(opq_graph_cleanup(m->graph), OPQ_OK);
    assert_string_equal(m->graph->nodes[0]->op_type, "Sigmoid");
    gb_verify(m);
}

static void test_move(void **state) {
    struct fix       *f = *state;
    f->m                = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1));
    struct opq_node *n[4];
    for (int i = 0; i < 4; i++) {
        char out[8];
        snprintf(out, sizeof(out), "o%d", i);
        n[i] = gb_node(m, "Relu", "x", out);
    }
    struct opq_graph *g = m->graph;
    opq_graph_move_after(g, n[0], n[2]); // 1 2 0 3
    assert_ptr_equal(g->nodes[2], n[0]);
    opq_graph_move_before(g, n[3], n[1]); // 3 1 2 0
    assert_ptr_equal(g->nodes[0], n[3]);
    assert_ptr_equal(g->nodes[3], n[0]);
    opq_graph_move_after(g, n[3], n[0]); // 1 2 0 3
    assert_ptr_equal(g->nodes[3], n[3]);
    opq_graph_move_before(g, n[0], n[1]); // 0 1 2 3
    for (int i = 0; i < 4; i++) {
        assert_ptr_equal(g->nodes[i], n[i]);
        assert_int_equal(n[i]->index, i);
    }
}

static void test_sort_stable(void **state) {
    struct fix       *f = *state;
    f->m                = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1));
    // Appended out of order: c needs b needs a; the independent r0/r1 keep their order.
    struct opq_node *c  = gb_node(m, "Add", "b,r0", "c");
    struct opq_node *r0 = gb_node(m, "Relu", "x", "r0");
    struct opq_node *b  = gb_node(m, "Neg", "a", "b");
    struct opq_node *r1 = gb_node(m, "Relu", "x", "r1");
    struct opq_node *a  = gb_node(m, "Abs", "x", "a");
    gb_output(m, "c");
    gb_output(m, "r1");
    expect_verify_fails(f, "topological");
    assert_int_equal(opq_graph_sort(m->graph), OPQ_OK);
    struct opq_node *want[] = {r0, r1, a, b, c};
    for (int i = 0; i < 5; i++) {
        assert_ptr_equal(m->graph->nodes[i], want[i]);
        assert_int_equal(m->graph->nodes[i]->index, i);
    }
    gb_verify(m);
    // A sorted graph is left exactly as it is.
    assert_int_equal(opq_graph_sort(m->graph), OPQ_OK);
    for (int i = 0; i < 5; i++)
        assert_ptr_equal(m->graph->nodes[i], want[i]);
}

static void test_sort_cycle(void **state) {
    struct fix       *f = *state;
    f->m                = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1));
    gb_node(m, "Relu", "x", "pre");
    gb_node_full(m, "", "Add", "loop_a", "pre,q", "p");
    gb_node_full(m, "", "Neg", "loop_b", "p", "q");
    gb_node_full(m, "", "Abs", "after", "q", "y"); // downstream of the cycle, not on it
    gb_output(m, "y");
    assert_int_equal(opq_graph_sort(m->graph), OPQ_ERR_INVALID_MODEL);
    const char *msg = opq_ctx_errmsg(f->ctx);
    assert_non_null(strstr(msg, "cycle"));
    assert_true(strstr(msg, "loop_a") || strstr(msg, "loop_b"));
    assert_null(strstr(msg, "after"));
}

static void test_sort_self_loop(void **state) {
    struct fix       *f = *state;
    f->m                = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_node_full(m, "", "Neg", "self", "s", "s");
    assert_int_equal(opq_graph_sort(m->graph), OPQ_ERR_INVALID_MODEL);
    assert_non_null(strstr(opq_ctx_errmsg(f->ctx), "self"));
}

static void test_sort_ignores_dead(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    struct opq_node  *n = gb_node(m, "Relu", "y", "z");
    opq_graph_move_before(m->graph, n, m->graph->nodes[0]);
    opq_graph_mark_dead(m->graph, n);
    assert_int_equal(opq_graph_sort(m->graph), OPQ_OK);
    assert_ptr_equal(m->graph->nodes[3], n); // dead nodes go last
    gb_verify(m);
}

static void test_verify_undefined_input(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    gb_node(m, "Relu", "ghost", "g2");
    expect_verify_fails(f, "'ghost' is not defined");
}

static void test_verify_undefined_output(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    opq_graph_value_get_or_add(m->graph, "nowhere");
    gb_output(m, "nowhere");
    expect_verify_fails(f, "graph output 'nowhere'");
}

static void test_verify_two_producers(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    // Bypass the API check by pointing a second node's output at 'a'.
    struct opq_node *n = gb_node(m, "Relu", "x", "tmp");
    n->outputs[0]      = gb_value(m, "a");
    expect_verify_fails(f, "two producers");
}

static void test_verify_users_inconsistent(void **state) {
    struct fix       *f   = *state;
    struct opq_model *m   = chain(f);
    struct opq_value *a   = gb_value(m, "a");
    a->n_users--; // forget one of Add's two uses
    expect_verify_fails(f, "users list");
    a->n_users++;
    gb_verify(m);
    m->graph->nodes[2]->inputs[0] = gb_value(m, "x"); // Neg now reads x, b still lists Neg
    expect_verify_fails(f, "users list");
}

static void test_verify_order(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    opq_graph_move_after(m->graph, m->graph->nodes[0], m->graph->nodes[2]);
    expect_verify_fails(f, "before its producer");
}

static void test_verify_duplicate_name(void **state) {
    struct fix       *f   = *state;
    struct opq_model *m   = chain(f);
    struct opq_value *dup = opq_graph_value_new_unique(m->graph, "a");
    assert_string_equal(dup->name, "a_1");
    gb_verify(m);
    dup->name = gb_value(m, "a")->name;
    expect_verify_fails(f, "two values");
}

static void test_verify_produced_input(void **state) {
    struct fix       *f = *state;
    struct opq_model *m = chain(f);
    gb_value(m, "b")->kind |= OPQ_VK_INIT;
    expect_verify_fails(f, "also produced");
}

// Out of memory in the sort's scratch arrays: OPQ_ERR_NOMEM, graph untouched; then it succeeds.
static void test_sort_oom(void **state) {
    struct fix       *f = *state;
    f->m                = gb_new(f->ctx);
    struct opq_model *m = f->m;
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1));
    struct opq_node *b = gb_node(m, "Neg", "a", "b");
    struct opq_node *a = gb_node(m, "Abs", "x", "a");
    gb_output(m, "b");
    int failures = 0;
    for (long i = 0;; i++) {
        f->ctx->fail_at  = i;
        f->ctx->n_allocs = 0;
        opq_ctx_clear_error(f->ctx);
        enum opq_status st = opq_graph_sort(m->graph);
        if (st == OPQ_OK)
            break;
        assert_int_equal(st, OPQ_ERR_NOMEM);
        assert_non_null(strstr(opq_ctx_errmsg(f->ctx), "out of memory"));
        assert_ptr_equal(m->graph->nodes[0], b);
        failures++;
        assert_true(i < 100);
    }
    f->ctx->fail_at = -1;
    assert_true(failures >= 1);
    assert_ptr_equal(m->graph->nodes[0], a);
    gb_verify(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_users_on_add, setup, teardown),
        cmocka_unit_test_setup_teardown(test_add_node_rejects_second_producer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_input, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resize_inputs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_remove_attr, setup, teardown),
        cmocka_unit_test_setup_teardown(test_replace_uses, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mark_dead_and_cleanup, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cleanup_keeps_io_and_live_outputs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dead_node_output_can_be_reproduced, setup, teardown),
        cmocka_unit_test_setup_teardown(test_move, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sort_stable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sort_cycle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sort_self_loop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sort_ignores_dead, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sort_oom, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_undefined_input, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_undefined_output, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_two_producers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_users_inconsistent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_duplicate_name, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_produced_input, setup, teardown),
    };
    return cmocka_run_group_tests_name("graph", tests, NULL, NULL);
}
