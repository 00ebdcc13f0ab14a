/* test_bad_model.c: every malformed input the ONNX loader must refuse, each with its status and
 * a one-line message naming the file and the node/value/tensor at fault: missing, empty,
 * truncated and random files; protobufs that are not models; broken graphs (undefined inputs,
 * two producers, duplicates, cycles); bad initializers (size/shape/dtype/rank) and bad external
 * data; unwritable save targets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base.h"
#include "graph.h"
#include "io_pbw.h"
#include "io_util.h"

static struct opq_ctx *ctx;

static int setup(void **state) {
    (void)state;
    ctx = opq_ctx_new();
    return ctx ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    opq_ctx_free(ctx);
    return 0;
}

// Loads buf and expects status `want` with a message containing every NULL-terminated needle.
static void expect_fail(const void *buf, size_t len, const char *name, const char *dir,
                        enum opq_status want, ...) {
    struct opq_model *m = NULL;
    enum opq_status st = opq_model_load_buffer(ctx, buf, len, name, dir, &m);
    const char *msg = opq_ctx_errmsg(ctx);
    if (getenv("OPQ_TEST_VERBOSE"))
        print_message("%s\n", msg);
    if (st != want)
        fail_msg("%s: status %d (%s), expected %d", name, st, msg, want);
    assert_null(m);
    assert_null(strchr(msg, '\n'));
    assert_non_null(strstr(msg, name));
    va_list ap;
    va_start(ap, want);
    for (const char *needle; (needle = va_arg(ap, const char *));)
        if (!strstr(msg, needle))
            fail_msg("%s: message '%s' lacks '%s'", name, msg, needle);
    va_end(ap);
    assert_int_equal(ctx->cur_bytes, 0);
    opq_ctx_clear_error(ctx);
}

static void expect_fail_pbw(struct pbw *model, const char *name, enum opq_status want,
                            const char *n1, const char *n2) {
    expect_fail(model->b, model->n, name, NULL, want, n1, n2, (const char *)NULL);
    pbw_free(model);
}

static const char *testdata(const char *rel) {
    static char buf[512];
    snprintf(buf, sizeof(buf), "%s/%s", OPQ_TESTDATA_DIR, rel);
    return buf;
}

static void test_missing_and_empty_files(void **state) {
    (void)state;
    struct opq_model *m = NULL;
    assert_int_equal(opq_model_load(ctx, "/nonexistent/dir/model.onnx", &m), OPQ_ERR_IO);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "/nonexistent/dir/model.onnx"));
    opq_ctx_clear_error(ctx);
    assert_int_equal(opq_model_load(ctx, OPQ_TESTDATA_DIR, &m), OPQ_ERR_IO);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "directory"));
    opq_ctx_clear_error(ctx);

    char *dir = io_tempdir();
    char path[512];
    snprintf(path, sizeof(path), "%s/empty.onnx", dir);
    assert_true(io_write_file(path, "", 0));
    assert_int_equal(opq_model_load(ctx, path, &m), OPQ_ERR_PARSE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), path));
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "not a valid ONNX protobuf"));
    assert_null(m);
    opq_ctx_clear_error(ctx);
    io_rmtree(dir);
    free(dir);
}

static void test_truncated_and_random(void **state) {
    (void)state;
    void *buf;
    size_t len;
    assert_true(
        io_read_file(testdata("pytorch-operator/test_operator_conv/model.onnx"), &buf, &len));
    // every truncation point that cuts a field must be refused; a cut exactly between two
    // top-level fields gives a valid but partial message, caught by the model checks or a
    // graph check, never a crash
    for (size_t cut = 1; cut < len; cut += 7) {
        struct opq_model *m = NULL;
        enum opq_status st = opq_model_load_buffer(ctx, buf, cut, "truncated.onnx", NULL, &m);
        assert_true(st != OPQ_OK || m != NULL);
        if (st == OPQ_OK) {
            opq_model_free(m);
            continue;
        }
        assert_true(st == OPQ_ERR_PARSE || st == OPQ_ERR_INVALID_MODEL);
        assert_non_null(strstr(opq_ctx_errmsg(ctx), "truncated.onnx"));
        opq_ctx_clear_error(ctx);
    }
    expect_fail(buf, len / 2, "half.onnx", NULL, OPQ_ERR_PARSE, "not a valid ONNX protobuf",
                "truncated or corrupt", (const char *)NULL);
    free(buf);

    uint8_t rnd[4096];
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (int trial = 0; trial < 200; trial++) {
        for (size_t i = 0; i < sizeof(rnd); i++) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            rnd[i] = (uint8_t)s;
        }
        expect_fail(rnd, 64 + (size_t)trial * 16, "random.bin", NULL, OPQ_ERR_PARSE,
                    (const char *)NULL);
    }
    // a test-data TensorProto is a protobuf but not a model
    assert_true(io_read_file(testdata("node/test_relu/test_data_set_0/input_0.pb"), &buf, &len));
    expect_fail(buf, len, "input_0.pb", NULL, OPQ_ERR_PARSE, (const char *)NULL);
    free(buf);
}

static void test_not_a_model(void **state) {
    (void)state;
    struct pbw m = {0};
    pbw_str(&m, PBW_M_PRODUCER, "only a producer");
    expect_fail_pbw(&m, "producer-only", OPQ_ERR_PARSE, "is not an ONNX model", NULL);
    m = (struct pbw){0};
    pbw_int(&m, PBW_M_IR_VERSION, 8);
    expect_fail_pbw(&m, "no-graph", OPQ_ERR_PARSE, "is not an ONNX model", "no graph");
    struct pbw g = {0};
    pbw_str(&g, PBW_G_NAME, "g");
    m = (struct pbw){0};
    pbw_msg(&m, PBW_M_GRAPH, &g);
    expect_fail_pbw(&m, "no-version", OPQ_ERR_PARSE, "is not an ONNX model", NULL);
}

// A graph with input x [2] float, the given nodes (op,name,inputs,outputs quadruples) and
// output `out`, wrapped in a model.
static struct pbw model_with(const char *const *nodes, int n_nodes, const char *out) {
    struct pbw g = {0};
    for (int i = 0; i < n_nodes; i++) {
        struct pbw n = pbw_node(nodes[4 * i], nodes[4 * i + 1], nodes[4 * i + 2], nodes[4 * i + 3]);
        pbw_msg(&g, PBW_G_NODE, &n);
    }
    pbw_str(&g, PBW_G_NAME, "g");
    struct pbw vi = pbw_value_info("x", 1, 1, (const int64_t[]){2}, 0);
    pbw_msg(&g, PBW_G_INPUT, &vi);
    struct pbw vo = pbw_value_info(out, 1, 1, (const int64_t[]){2}, 0);
    pbw_msg(&g, PBW_G_OUTPUT, &vo);
    return pbw_model(&g);
}

static void test_broken_graphs(void **state) {
    (void)state;
    const char *undef[] = {"Add", "adder", "x,ghost", "y"};
    struct pbw m = model_with(undef, 1, "y");
    expect_fail_pbw(&m, "undef.onnx", OPQ_ERR_INVALID_MODEL, "adder", "ghost");

    const char *two[] = {"Relu", "r1", "x", "y", "Relu", "r2", "x", "y"};
    m = model_with(two, 2, "y");
    expect_fail_pbw(&m, "two-producers.onnx", OPQ_ERR_INVALID_MODEL, "r2", "'y'");

    const char *onin[] = {"Relu", "r1", "x", "x"};
    m = model_with(onin, 1, "x");
    expect_fail_pbw(&m, "writes-input.onnx", OPQ_ERR_INVALID_MODEL, "r1", "graph input");

    const char *cyc[] = {"Relu", "a", "c", "b", "Relu", "b", "b", "c", "Add", "c", "x,c", "y"};
    m = model_with(cyc, 3, "y");
    expect_fail_pbw(&m, "cycle.onnx", OPQ_ERR_INVALID_MODEL, "cycle", NULL);

    const char *self[] = {"Add", "loop", "x,y", "y"};
    m = model_with(self, 1, "y");
    expect_fail_pbw(&m, "self-loop.onnx", OPQ_ERR_INVALID_MODEL, "loop", NULL);

    const char *none[] = {"Relu", "r", "x", "y"};
    m = model_with(none, 1, "nowhere");
    expect_fail_pbw(&m, "dangling-output.onnx", OPQ_ERR_INVALID_MODEL, "nowhere", NULL);

    const char *noop[] = {"", "nameless-op", "x", "y"};
    m = model_with(noop, 1, "y");
    expect_fail_pbw(&m, "no-op-type.onnx", OPQ_ERR_INVALID_MODEL, "nameless-op", "op_type");

    // an attribute with neither a type nor a value
    struct pbw n = pbw_node("Relu", "valueless", "x", "y");
    struct pbw a = {0};
    pbw_str(&a, PBW_A_NAME, "alpha");
    pbw_msg(&n, PBW_N_ATTR, &a);
    struct pbw g = {0};
    pbw_msg(&g, PBW_G_NODE, &n);
    struct pbw vx = pbw_value_info("x", 1, 0, NULL, 0);
    pbw_msg(&g, PBW_G_INPUT, &vx);
    m = pbw_model(&g);
    expect_fail_pbw(&m, "attr-novalue.onnx", OPQ_ERR_INVALID_MODEL, "valueless", "'alpha'");

    // duplicate graph inputs
    g = (struct pbw){0};
    struct pbw v1 = pbw_value_info("x", 1, 0, NULL, 0);
    struct pbw v2 = pbw_value_info("x", 1, 0, NULL, 0);
    pbw_msg(&g, PBW_G_INPUT, &v1);
    pbw_msg(&g, PBW_G_INPUT, &v2);
    m = pbw_model(&g);
    expect_fail_pbw(&m, "dup-input.onnx", OPQ_ERR_INVALID_MODEL, "'x'", "twice");
}

// A model whose only content is initializer `t` (also the graph output).
static struct pbw model_with_init(struct pbw *t, const char *name) {
    struct pbw g = {0};
    pbw_msg(&g, PBW_G_INIT, t);
    struct pbw vo = pbw_value_info(name, 1, -1, NULL, 0);
    pbw_msg(&g, PBW_G_OUTPUT, &vo);
    return pbw_model(&g);
}

static void test_bad_initializers(void **state) {
    (void)state;
    const float f[4] = {1, 2, 3, 4};
    struct pbw t = pbw_tensor_raw("w_short", 1, 2, (const int64_t[]){2, 3}, f, sizeof(f));
    struct pbw m = model_with_init(&t, "w_short");
    expect_fail_pbw(&m, "short.onnx", OPQ_ERR_INVALID_MODEL, "w_short", "16 data bytes");

    t = pbw_tensor_raw("w_neg", 1, 2, (const int64_t[]){-2, 2}, f, sizeof(f));
    m = model_with_init(&t, "w_neg");
    expect_fail_pbw(&m, "neg.onnx", OPQ_ERR_INVALID_MODEL, "w_neg", "shape");

    t = pbw_tensor_raw("w_huge", 1, 3, (const int64_t[]){1ll << 40, 1ll << 40, 1ll << 20}, f,
                       sizeof(f));
    m = model_with_init(&t, "w_huge");
    expect_fail_pbw(&m, "overflow.onnx", OPQ_ERR_INVALID_MODEL, "w_huge", NULL);

    const int64_t nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 4};
    t = pbw_tensor_raw("w_rank9", 1, 9, nine, f, sizeof(f));
    m = model_with_init(&t, "w_rank9");
    expect_fail_pbw(&m, "rank9.onnx", OPQ_ERR_UNSUPPORTED, "w_rank9", "rank 9");

    t = pbw_tensor_raw("w_dtype", 99, 1, (const int64_t[]){4}, f, sizeof(f));
    m = model_with_init(&t, "w_dtype");
    expect_fail_pbw(&m, "dtype.onnx", OPQ_ERR_UNSUPPORTED, "w_dtype", "data type 99");

    t = (struct pbw){0};
    pbw_int(&t, PBW_T_DIMS, 3);
    pbw_int(&t, PBW_T_DATA_TYPE, 1);
    pbw_str(&t, PBW_T_NAME, "w_typed");
    pbw_packed_f32(&t, PBW_T_FLOAT_DATA, f, 2);
    m = model_with_init(&t, "w_typed");
    expect_fail_pbw(&m, "typed-count.onnx", OPQ_ERR_INVALID_MODEL, "w_typed", "float_data");

    t = (struct pbw){0};
    pbw_int(&t, PBW_T_DIMS, 3);
    pbw_int(&t, PBW_T_DATA_TYPE, 1);
    pbw_str(&t, PBW_T_NAME, "w_empty");
    m = model_with_init(&t, "w_empty");
    expect_fail_pbw(&m, "no-data.onnx", OPQ_ERR_INVALID_MODEL, "w_empty", NULL);

    // the same initializer twice
    struct pbw g = {0};
    struct pbw t1 = pbw_tensor_raw("dup", 1, 1, (const int64_t[]){1}, f, 4);
    struct pbw t2 = pbw_tensor_raw("dup", 1, 1, (const int64_t[]){1}, f, 4);
    pbw_msg(&g, PBW_G_INIT, &t1);
    pbw_msg(&g, PBW_G_INIT, &t2);
    m = pbw_model(&g);
    expect_fail_pbw(&m, "dup-init.onnx", OPQ_ERR_INVALID_MODEL, "'dup'", "twice");

    // a node writing over an initializer
    g = (struct pbw){0};
    t1 = pbw_tensor_raw("w", 1, 1, (const int64_t[]){1}, f, 4);
    struct pbw n = pbw_node("Relu", "clobber", "w", "w");
    pbw_msg(&g, PBW_G_INIT, &t1);
    pbw_msg(&g, PBW_G_NODE, &n);
    m = pbw_model(&g);
    expect_fail_pbw(&m, "clobber.onnx", OPQ_ERR_INVALID_MODEL, "clobber", "initializer");

    // sparse initializers are refused by name
    g = (struct pbw){0};
    struct pbw sp = {0};
    struct pbw vals = pbw_tensor_raw("sparse_w", 1, 1, (const int64_t[]){1}, f, 4);
    pbw_msg(&sp, PBW_SP_VALUES, &vals);
    pbw_int(&sp, PBW_SP_DIMS, 4);
    pbw_msg(&g, PBW_G_SPARSE_INIT, &sp);
    m = pbw_model(&g);
    expect_fail_pbw(&m, "sparse.onnx", OPQ_ERR_UNSUPPORTED, "sparse_w", "sparse");

    // a value_info of rank 9
    g = (struct pbw){0};
    struct pbw vi = pbw_value_info("deep", 1, 9, nine, 0);
    pbw_msg(&g, PBW_G_INPUT, &vi);
    m = pbw_model(&g);
    expect_fail_pbw(&m, "rank9-value.onnx", OPQ_ERR_UNSUPPORTED, "deep", "rank 9");
}

// A model with one float[4] initializer "w" in external data with the given entries.
static struct pbw model_external(const char *location, const char *offset, const char *length) {
    struct pbw t = {0};
    pbw_int(&t, PBW_T_DIMS, 4);
    pbw_int(&t, PBW_T_DATA_TYPE, 1);
    pbw_str(&t, PBW_T_NAME, "w");
    const char *keys[] = {"location", "offset", "length"};
    const char *vals[] = {location, offset, length};
    for (int i = 0; i < 3; i++) {
        if (!vals[i])
            continue;
        struct pbw kv = {0};
        pbw_str(&kv, PBW_KV_KEY, keys[i]);
        pbw_str(&kv, PBW_KV_VALUE, vals[i]);
        pbw_msg(&t, PBW_T_EXTERNAL, &kv);
    }
    pbw_int(&t, PBW_T_LOCATION, 1);
    return model_with_init(&t, "w");
}

static void test_bad_external_data(void **state) {
    (void)state;
    char *dir = io_tempdir();
    char path[512];
    snprintf(path, sizeof(path), "%s/w.bin", dir);
    const float f[6] = {1, 2, 3, 4, 5, 6};
    assert_true(io_write_file(path, f, sizeof(f)));

    struct pbw m = model_external("w.bin", "8", "16");
    struct opq_model *ok = NULL;
    assert_int_equal(opq_model_load_buffer(ctx, m.b, m.n, "ext.onnx", dir, &ok), OPQ_OK);
    assert_memory_equal(ok->graph->inits[0]->t.data, f + 2, 16);
    opq_model_free(ok);
    pbw_free(&m);
    m = model_external("w.bin", NULL, NULL); // no offset/length: from 0
    assert_int_equal(opq_model_load_buffer(ctx, m.b, m.n, "ext.onnx", dir, &ok), OPQ_OK);
    opq_model_free(ok);
    pbw_free(&m);

    m = model_external("missing.bin", NULL, NULL);
    expect_fail(m.b, m.n, "ext-missing.onnx", dir, OPQ_ERR_IO, "'w'", "missing.bin",
                (const char *)NULL);
    pbw_free(&m);
    m = model_external("w.bin", "16", "16");
    expect_fail(m.b, m.n, "ext-oob.onnx", dir, OPQ_ERR_INVALID_MODEL, "'w'", "out of bounds",
                (const char *)NULL);
    pbw_free(&m);
    m = model_external("w.bin", "0", "12");
    expect_fail(m.b, m.n, "ext-len.onnx", dir, OPQ_ERR_INVALID_MODEL, "'w'", "length 12",
                (const char *)NULL);
    pbw_free(&m);
    m = model_external("w.bin", "x1", NULL);
    expect_fail(m.b, m.n, "ext-num.onnx", dir, OPQ_ERR_INVALID_MODEL, "'w'", "offset",
                (const char *)NULL);
    pbw_free(&m);
    m = model_external("/etc/passwd", NULL, NULL);
    expect_fail(m.b, m.n, "ext-abs.onnx", dir, OPQ_ERR_INVALID_MODEL, "'w'", "/etc/passwd",
                (const char *)NULL);
    pbw_free(&m);
    m = model_external("sub/../../w.bin", NULL, NULL);
    expect_fail(m.b, m.n, "ext-dotdot.onnx", dir, OPQ_ERR_INVALID_MODEL, "'w'", "..",
                (const char *)NULL);
    pbw_free(&m);
    m = model_external("w.bin", NULL, NULL);
    expect_fail(m.b, m.n, "ext-nodir.onnx", NULL, OPQ_ERR_UNSUPPORTED, "'w'", "w.bin",
                (const char *)NULL);
    pbw_free(&m);
    io_rmtree(dir);
    free(dir);
}

static void test_unwritable_target(void **state) {
    (void)state;
    struct opq_model *m = NULL;
    assert_int_equal(opq_model_load(ctx, testdata("node/test_relu/model.onnx"), &m), OPQ_OK);
    const char *bad = "/nonexistent-folder/out.onnx";
    assert_int_equal(opq_model_save(ctx, m, bad, NULL), OPQ_ERR_IO);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), bad));
    opq_ctx_clear_error(ctx);
    struct opq_save_opts o = {.external_data = true, .external_min_bytes = 1};
    assert_int_equal(opq_model_save(ctx, m, bad, &o), OPQ_ERR_IO);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "/nonexistent-folder/"));
    opq_ctx_clear_error(ctx);
    opq_model_free(m);
}

// Deeply nested messages are refused before protobuf-c's recursive unpacker sees them.
static void test_deep_nesting(void **state) {
    (void)state;
    // attribute g -> graph -> node -> attribute g -> ... 5000 levels
    struct pbw inner = {0};
    pbw_str(&inner, PBW_G_NAME, "leaf");
    for (int i = 0; i < 2500; i++) {
        struct pbw a = {0};
        struct pbw n = {0};
        struct pbw g = {0};
        pbw_str(&a, PBW_A_NAME, "g");
        pbw_msg(&a, PBW_A_G, &inner);
        pbw_msg(&n, PBW_N_ATTR, &a);
        pbw_msg(&g, PBW_G_NODE, &n);
        inner = g;
    }
    struct pbw m = pbw_model(&inner);
    expect_fail_pbw(&m, "deep.onnx", OPQ_ERR_PARSE, "not a valid ONNX protobuf", NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_missing_and_empty_files),
        cmocka_unit_test(test_truncated_and_random),
        cmocka_unit_test(test_not_a_model),
        cmocka_unit_test(test_broken_graphs),
        cmocka_unit_test(test_bad_initializers),
        cmocka_unit_test(test_bad_external_data),
        cmocka_unit_test(test_unwritable_target),
        cmocka_unit_test(test_deep_nesting),
    };
    return cmocka_run_group_tests_name("bad_model", tests, setup, teardown);
}
