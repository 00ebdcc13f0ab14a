/* test_gelu_to_relu.c: the gelu-to-relu pass swaps the Erf chain and the Gelu op for Relu, leaves
 * a chain whose intermediate values are read elsewhere alone, keeps the graph valid, and the
 * result computes relu(x). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <cmocka.h>

#include "exec.h"
#include "gb.h"
#include "pass.h"

static const float xs[8] = {-2.0f, -0.5f, -0.01f, 0.0f, 0.3f, 1.0f, 2.5f, -4.0f};

// x[2,4] -> GELU (Erf chain) -> Identity -> y; if leak, the Erf output also feeds a second graph output.
static struct opq_model *erf_chain(struct opq_ctx *ctx, bool leak) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 4));
    gb_init_f32(m, "sqrt2", GB_SCALAR, (const float[]){1.4142135f});
    gb_init_f32(m, "one", GB_SCALAR, (const float[]){1.0f});
    gb_init_f32(m, "half", GB_SCALAR, (const float[]){0.5f});
    gb_node(m, "Div", "x,sqrt2", "d");
    gb_node(m, "Erf", "d", "e");
    gb_node(m, "Add", "e,one", "a");
    gb_node(m, "Mul", "x,a", "p");
    gb_node(m, "Mul", "p,half", "g");
    gb_node(m, "Identity", "g", "y"); // a consumer, as fc2 is in an MLP
    gb_output(m, "y");
    if (leak) {
        gb_node(m, "Neg", "e", "z");
        gb_output(m, "z");
    }
    return m;
}

static void run_and_check_relu(struct opq_ctx *ctx, struct opq_model *m) {
    struct opq_named_tensor in = {.name = "x", .t = {.dtype = OPQ_DTYPE_FLOAT, .ndim = 2,
                                                     .shape = {2, 4}, .data = (void *)xs,
                                                     .nbytes = sizeof(xs)}};
    struct opq_exec *ex = NULL;
    assert_int_equal(opq_exec_plan(ctx, m, &in, 1, NULL, &ex), OPQ_OK);
    struct opq_tensor y;
    assert_int_equal(opq_exec_run(ex, &in, 1, &y, 1), OPQ_OK);
    for (int i = 0; i < 8; i++)
        assert_float_equal(((const float *)y.data)[i], xs[i] > 0.0f ? xs[i] : 0.0f, 0.0f);
    opq_exec_free(ex);
}

static void test_erf_chain(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = erf_chain(ctx, false);
    const char *names[] = {"gelu-to-relu", "cleanup-dead"};
    struct opq_pipeline_opts o = {.verify = true};
    assert_int_equal(opq_pipeline_run(ctx, m, names, 2, &o), OPQ_OK);
    assert_int_equal(gb_count_op(m, "Relu"), 1);
    assert_int_equal(gb_count_op(m, "Erf"), 0);
    assert_int_equal(gb_count_op(m, "Mul"), 0);
    assert_null(opq_graph_value(m->graph, "sqrt2")); // constants only the chain used are gone
    assert_int_equal(opq_graph_verify(m->graph), OPQ_OK);
    if (strcmp(m->graph->outputs[0]->name, "y") != 0) // the graph output keeps its name
        fail_msg("graph output is now %s", m->graph->outputs[0]->name);
    run_and_check_relu(ctx, m);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_gelu_op(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_set_opset(m, 20);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(2, 4));
    gb_node(m, "Gelu", "x", "g");
    gb_node(m, "Identity", "g", "y");
    gb_output(m, "y");
    const char *names[] = {"gelu-to-relu"};
    struct opq_pipeline_opts o = {.verify = true};
    assert_int_equal(opq_pipeline_run(ctx, m, names, 1, &o), OPQ_OK);
    assert_int_equal(gb_count_op(m, "Gelu"), 0);
    assert_int_equal(gb_count_op(m, "Relu"), 1);
    run_and_check_relu(ctx, m);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_leaky_chain_kept(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = erf_chain(ctx, true);
    const char *names[] = {"gelu-to-relu"};
    struct opq_pipeline_opts o = {.verify = true};
    assert_int_equal(opq_pipeline_run(ctx, m, names, 1, &o), OPQ_OK);
    assert_int_equal(gb_count_op(m, "Relu"), 0);
    assert_int_equal(gb_count_op(m, "Erf"), 1);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_erf_chain),
        cmocka_unit_test(test_gelu_op),
        cmocka_unit_test(test_leaky_chain_kept),
    };
    return cmocka_run_group_tests_name("gelu_to_relu", tests, NULL, NULL);
}
