/* test_onnx_io.c: ONNX load/save (src/onnx_io.c). Round trip over every libonnx-testdata
 * model.onnx (IR equality and byte-stable re-serialization), file saving (temp + rename),
 * external data, every attribute and initializer data type, symbolic dims, unknown-field
 * preservation, node order, and OOM sweeps of load and save. Bad inputs are in
 * test_bad_model.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "base.h"
#include "graph.h"
#include "io_pbw.h"
#include "io_util.h"
#include "onnx_io.h"

static struct opq_ctx *new_ctx(void) {
    struct opq_ctx *ctx = opq_ctx_new();
    assert_non_null(ctx);
    return ctx;
}

// load(buf) -> save_buffer -> load -> equal IR -> save_buffer again -> identical bytes.
// Returns the first model (caller frees) when keep is set.
static struct opq_model *check_roundtrip(struct opq_ctx *ctx, const void *buf, size_t len,
                                         const char *name, const char *dir, bool keep) {
    struct opq_model *a = NULL;
    struct opq_model *b = NULL;
    void *s1;
    void *s2;
    size_t n1;
    size_t n2;
    char why[512];
    enum opq_status st = opq_model_load_buffer(ctx, buf, len, name, dir, &a);
    if (st != OPQ_OK)
        fail_msg("%s: load failed: %s", name, opq_ctx_errmsg(ctx));
    st = opq_model_save_buffer(ctx, a, &s1, &n1);
    if (st != OPQ_OK)
        fail_msg("%s: save failed: %s", name, opq_ctx_errmsg(ctx));
    st = opq_model_load_buffer(ctx, s1, n1, name, NULL, &b);
    if (st != OPQ_OK)
        fail_msg("%s: reload failed: %s", name, opq_ctx_errmsg(ctx));
    if (!io_model_equal(a, b, why, sizeof(why)))
        fail_msg("%s: IR changed by save+load: %s", name, why);
    assert_int_equal(opq_graph_verify(b->graph), OPQ_OK);
    st = opq_model_save_buffer(ctx, b, &s2, &n2);
    assert_int_equal(st, OPQ_OK);
    if (n1 != n2 || memcmp(s1, s2, n1) != 0)
        fail_msg("%s: second save differs (%zu vs %zu bytes)", name, n1, n2);
    opq_buffer_free(ctx, s1);
    opq_buffer_free(ctx, s2);
    opq_model_free(b);
    if (keep)
        return a;
    opq_model_free(a);
    return NULL;
}

static void test_roundtrip_testdata(void **state) {
    (void)state;
    char **paths;
    int n = io_find_files(OPQ_TESTDATA_DIR, "model.onnx", &paths);
    assert_true(n > 500); // libonnx-testdata ships about a thousand
    struct opq_ctx *ctx = new_ctx();
    for (int i = 0; i < n; i++) {
        void *buf;
        size_t len;
        assert_true(io_read_file(paths[i], &buf, &len));
        // through the file API too, for the first model of each folder family
        struct opq_model *f = NULL;
        if (opq_model_load(ctx, paths[i], &f) != OPQ_OK)
            fail_msg("%s: %s", paths[i], opq_ctx_errmsg(ctx));
        assert_string_equal(f->path, paths[i]);
        struct opq_model *a = check_roundtrip(ctx, buf, len, paths[i], NULL, true);
        char why[512];
        if (!io_model_equal(a, f, why, sizeof(why)))
            fail_msg("%s: file and buffer loads differ: %s", paths[i], why);
        opq_model_free(a);
        opq_model_free(f);
        free(buf);
    }
    assert_int_equal(ctx->cur_bytes, 0);
    opq_ctx_free(ctx);
    io_free_paths(paths, n);
}

static const char *model_path(const char *rel) {
    static char buf[512];
    snprintf(buf, sizeof(buf), "%s/%s", OPQ_TESTDATA_DIR, rel);
    return buf;
}

// Saving to a file writes the same bytes as save_buffer and leaves no temporary behind.
static void test_save_file(void **state) {
    (void)state;
    struct opq_ctx *ctx = new_ctx();
    struct opq_model *m = NULL;
    assert_int_equal(
        opq_model_load(ctx, model_path("pytorch-operator/test_operator_conv/model.onnx"), &m),
        OPQ_OK);
    char *dir = io_tempdir();
    assert_non_null(dir);
    char out[512];
    snprintf(out, sizeof(out), "%s/out.onnx", dir);
    assert_int_equal(opq_model_save(ctx, m, out, NULL), OPQ_OK);
    assert_int_equal(io_count_entries(dir), 1);
    // overwrite in place
    assert_int_equal(opq_model_save(ctx, m, out, NULL), OPQ_OK);
    assert_int_equal(io_count_entries(dir), 1);
    void *a;
    void *b;
    size_t na;
    size_t nb;
    assert_true(io_read_file(out, &a, &na));
    assert_int_equal(opq_model_save_buffer(ctx, m, &b, &nb), OPQ_OK);
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, na);
    free(a);
    opq_buffer_free(ctx, b);

    // A failing rename (the target is a folder) leaves the folder as it was.
    char sub[512];
    snprintf(sub, sizeof(sub), "%s/sub", dir);
    assert_true(io_mkdir(sub));
    assert_int_equal(opq_model_save(ctx, m, sub, NULL), OPQ_ERR_IO);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), sub));
    assert_int_equal(io_count_entries(dir), 2);
    opq_ctx_clear_error(ctx);

    io_rmtree(dir);
    free(dir);
    opq_model_free(m);
    assert_int_equal(ctx->cur_bytes, 0);
    opq_ctx_free(ctx);
}

// ---- crafted models -----------------------------------------------------------------------------

static bool contains(const void *hay, size_t n, const void *needle, size_t m) {
    const uint8_t *h = hay;
    for (size_t i = 0; m <= n && i <= n - m; i++)
        if (memcmp(h + i, needle, m) == 0)
            return true;
    return false;
}

// An unknown length-delimited field (number 1000 + k) with a recognisable payload.
static void add_unknown(struct pbw *w, int k, const char *payload) {
    pbw_str(w, 1000 + k, payload);
}

static bool has_unknown(const void *buf, size_t n, int k, const char *payload) {
    struct pbw w = {0};
    add_unknown(&w, k, payload);
    bool found = contains(buf, n, w.b, w.n);
    pbw_free(&w);
    return found;
}

// Unknown fields in every modelled message type come back out, in a re-save too.
static void test_unknown_fields(void **state) {
    (void)state;
    struct pbw g = {0};
    struct pbw n = pbw_node("Relu", "relu0", "x", "y");
    struct pbw a = {0};
    pbw_str(&a, PBW_A_NAME, "alpha");
    pbw_int(&a, PBW_A_TYPE, 1);
    pbw_f32(&a, PBW_A_F, 0.5f);
    add_unknown(&a, 3, "in-attr");
    pbw_msg(&n, PBW_N_ATTR, &a);
    add_unknown(&n, 2, "in-node");
    pbw_msg(&g, PBW_G_NODE, &n);
    struct pbw n2 = pbw_node("Add", "add0", "y,w", "z");
    pbw_msg(&g, PBW_G_NODE, &n2);
    const float w[2] = {1, 2};
    struct pbw t = pbw_tensor_raw("w", 1, 1, (const int64_t[]){2}, w, sizeof(w));
    add_unknown(&t, 4, "in-tensor");
    pbw_msg(&g, PBW_G_INIT, &t);
    pbw_str(&g, PBW_G_NAME, "g");
    struct pbw vi = pbw_value_info("x", 1, 1, (const int64_t[]){2}, 0);
    add_unknown(&vi, 5, "in-value-info");
    pbw_msg(&g, PBW_G_INPUT, &vi);
    struct pbw vo = pbw_value_info("z", 1, 1, (const int64_t[]){2}, 0);
    pbw_msg(&g, PBW_G_OUTPUT, &vo);
    add_unknown(&g, 6, "in-graph");
    struct pbw m = pbw_model(&g);
    add_unknown(&m, 1, "in-model");
    pbw_int(&m, 1001, 12345); // an unknown varint field as well

    struct opq_ctx *ctx = new_ctx();
    struct opq_model *mm = check_roundtrip(ctx, m.b, m.n, "unknown-fields", NULL, true);
    void *out;
    size_t nout;
    assert_int_equal(opq_model_save_buffer(ctx, mm, &out, &nout), OPQ_OK);
    const char *where[] = {"in-model",  "in-node",       "in-attr",
                           "in-tensor", "in-value-info", "in-graph"};
    const int ks[] = {1, 2, 3, 4, 5, 6};
    for (size_t i = 0; i < ARRAY_SIZE(ks); i++)
        if (!has_unknown(out, nout, ks[i], where[i]))
            fail_msg("unknown field %s lost", where[i]);
    struct pbw v = {0};
    pbw_int(&v, 1001, 12345);
    assert_true(contains(out, nout, v.b, v.n));
    pbw_free(&v);

    // A pass changing the input's shape rebuilds its ValueInfoProto but keeps its unknown field.
    struct opq_value *x = opq_graph_value(mm->graph, "x");
    x->t.shape[0] = 3;
    opq_buffer_free(ctx, out);
    assert_int_equal(opq_model_save_buffer(ctx, mm, &out, &nout), OPQ_OK);
    assert_true(has_unknown(out, nout, 5, "in-value-info"));
    struct opq_model *r = NULL;
    assert_int_equal(opq_model_load_buffer(ctx, out, nout, "re", NULL, &r), OPQ_OK);
    assert_int_equal(opq_graph_value(r->graph, "x")->t.shape[0], 3);
    opq_model_free(r);
    opq_buffer_free(ctx, out);
    opq_model_free(mm);
    pbw_free(&m);
    assert_int_equal(ctx->cur_bytes, 0);
    opq_ctx_free(ctx);
}

// A subgraph for GRAPH attributes: y = Identity(x).
static struct pbw tiny_graph(const char *name) {
    struct pbw g = {0};
    struct pbw n = pbw_node("Identity", NULL, "x", "y");
    struct pbw vi = pbw_value_info("x", 1, 0, NULL, 0);
    struct pbw vo = pbw_value_info("y", 1, 0, NULL, 0);
    pbw_msg(&g, PBW_G_NODE, &n);
    pbw_str(&g, PBW_G_NAME, name);
    pbw_msg(&g, PBW_G_INPUT, &vi);
    pbw_msg(&g, PBW_G_OUTPUT, &vo);
    return g;
}

// Every attribute type loads into the IR (or is kept opaque) and survives a round trip.
static void test_attr_types(void **state) {
    (void)state;
    struct pbw n = pbw_node("Custom", "c0", "x", "y");
    pbw_str(&n, PBW_N_DOMAIN, "com.example");
    pbw_str(&n, PBW_N_DOC, "a doc string");
    struct pbw a;
#define ATTR_BEGIN(nm, ty)                                                                         \
    (a = (struct pbw){0}, pbw_str(&a, PBW_A_NAME, nm), pbw_int(&a, PBW_A_TYPE, ty))
#define ATTR_END() pbw_msg(&n, PBW_N_ATTR, &a)
    ATTR_BEGIN("f", 1);
    pbw_f32(&a, PBW_A_F, -1.25f);
    ATTR_END();
    ATTR_BEGIN("i", 2);
    pbw_int(&a, PBW_A_I, -7);
    ATTR_END();
    ATTR_BEGIN("s", 3);
    pbw_str(&a, PBW_A_S, "hello");
    ATTR_END();
    const int32_t tv[3] = {1, -2, 3};
    struct pbw t = pbw_tensor_raw("tv", 6, 1, (const int64_t[]){3}, tv, sizeof(tv));
    ATTR_BEGIN("t", 4);
    pbw_msg(&a, PBW_A_T, &t);
    ATTR_END();
    struct pbw sub = tiny_graph("body");
    ATTR_BEGIN("g", 5);
    pbw_msg(&a, PBW_A_G, &sub);
    ATTR_END();
    ATTR_BEGIN("floats", 6);
    pbw_f32(&a, PBW_A_FLOATS, 1.5f);
    pbw_f32(&a, PBW_A_FLOATS, 2.5f);
    ATTR_END();
    ATTR_BEGIN("ints", 7);
    pbw_int(&a, PBW_A_INTS, 4);
    pbw_int(&a, PBW_A_INTS, -5);
    pbw_int(&a, PBW_A_INTS, 6);
    ATTR_END();
    ATTR_BEGIN("strings", 8);
    pbw_str(&a, PBW_A_STRINGS, "a");
    pbw_str(&a, PBW_A_STRINGS, "");
    ATTR_END();
    ATTR_BEGIN("tensors", 9);
    for (int k = 0; k < 2; k++) {
        const float fv[2] = {(float)k, 2.0f};
        struct pbw tt = pbw_tensor_raw("", 1, 1, (const int64_t[]){2}, fv, sizeof(fv));
        pbw_msg(&a, PBW_A_TENSORS, &tt);
    }
    ATTR_END();
    ATTR_BEGIN("graphs", 10);
    sub = tiny_graph("g1");
    pbw_msg(&a, PBW_A_GRAPHS, &sub);
    sub = tiny_graph("g2");
    pbw_msg(&a, PBW_A_GRAPHS, &sub);
    ATTR_END();
    const float sv[1] = {9};
    const int64_t si[1] = {3};
    struct pbw sp = {0};
    struct pbw spv = pbw_tensor_raw("spv", 1, 1, (const int64_t[]){1}, sv, sizeof(sv));
    struct pbw spi = pbw_tensor_raw("spi", 7, 1, (const int64_t[]){1}, si, sizeof(si));
    pbw_msg(&sp, PBW_SP_VALUES, &spv);
    pbw_msg(&sp, PBW_SP_INDICES, &spi);
    pbw_int(&sp, PBW_SP_DIMS, 5);
    ATTR_BEGIN("sparse", 11);
    pbw_msg(&a, PBW_A_SPARSE, &sp);
    ATTR_END();
    struct pbw tp = {0}, tt2 = {0};
    pbw_int(&tt2, PBW_TT_ELEM, 10);
    pbw_msg(&tp, PBW_TP_TENSOR, &tt2);
    pbw_str(&tp, PBW_TP_DENOTATION, "IMAGE");
    ATTR_BEGIN("tp", 13);
    pbw_msg(&a, PBW_A_TP, &tp);
    ATTR_END();
    // IR version 1 style: no type field, the set field tells the type
    a = (struct pbw){0};
    pbw_str(&a, PBW_A_NAME, "untyped");
    pbw_int(&a, PBW_A_I, 42);
    ATTR_END();
#undef ATTR_BEGIN
#undef ATTR_END
    struct pbw g = {0};
    pbw_msg(&g, PBW_G_NODE, &n);
    pbw_str(&g, PBW_G_NAME, "attrs");
    pbw_str(&g, PBW_G_DOC, "graph doc");
    struct pbw vi = pbw_value_info("x", 1, 1, (const int64_t[]){2}, 0);
    struct pbw vo = pbw_value_info("y", 1, -1, NULL, 0);
    pbw_msg(&g, PBW_G_INPUT, &vi);
    pbw_msg(&g, PBW_G_OUTPUT, &vo);
    struct pbw m = pbw_model(&g);
    struct pbw kv = {0};
    pbw_str(&kv, PBW_KV_KEY, "author");
    pbw_str(&kv, PBW_KV_VALUE, "tests");
    pbw_msg(&m, PBW_M_METADATA, &kv);
    pbw_str(&m, PBW_M_DOC, "model doc");

    struct opq_ctx *ctx = new_ctx();
    struct opq_model *mm = check_roundtrip(ctx, m.b, m.n, "attrs", NULL, true);
    assert_int_equal(mm->graph->n_nodes, 1);
    const struct opq_node *nd = mm->graph->nodes[0];
    assert_int_equal(nd->op, OPQ_OP_UNKNOWN);
    assert_string_equal(nd->domain, "com.example");
    assert_int_equal(nd->n_attrs, 13);
    assert_true(opq_node_attr_float(nd, "f", 0) == -1.25f);
    assert_int_equal(opq_node_attr_int(nd, "i", 0), -7);
    assert_int_equal(opq_node_attr_int(nd, "untyped", 0), 42);
    const struct opq_attr *at = opq_node_attr(nd, "s");
    assert_int_equal(at->s.len, 5);
    assert_memory_equal(at->s.data, "hello", 5);
    at = opq_node_attr(nd, "t");
    assert_int_equal(at->t->dtype, OPQ_DTYPE_INT32);
    assert_memory_equal(at->t->data, tv, sizeof(tv));
    at = opq_node_attr(nd, "ints");
    assert_int_equal(at->n, 3);
    assert_int_equal(at->ints[1], -5);
    at = opq_node_attr(nd, "floats");
    assert_true(at->n == 2 && at->floats[1] == 2.5f);
    at = opq_node_attr(nd, "strings");
    assert_true(at->n == 2 && at->strings[0].len == 1 && at->strings[1].len == 0);
    at = opq_node_attr(nd, "tensors");
    assert_true(at->n == 2 && ((const float *)at->tensors[1]->data)[0] == 1.0f);
    assert_int_equal(opq_node_attr(nd, "g")->type, OPQ_ATTR_GRAPH);
    assert_int_equal(opq_node_attr(nd, "graphs")->n, 2);
    assert_int_equal(opq_node_attr(nd, "sparse")->type, OPQ_ATTR_SPARSE_TENSOR);
    assert_int_equal(opq_node_attr(nd, "tp")->type, OPQ_ATTR_TYPE_PROTO);
    assert_int_equal(mm->n_metadata, 1);
    assert_string_equal(mm->metadata[0].value, "tests");
    assert_int_equal(mm->graph->outputs[0]->t.ndim, -1);

    void *out;
    size_t nout;
    assert_int_equal(opq_model_save_buffer(ctx, mm, &out, &nout), OPQ_OK);
    assert_true(contains(out, nout, "body", 4) && contains(out, nout, "g2", 2));
    assert_true(contains(out, nout, "IMAGE", 5) && contains(out, nout, "model doc", 9));
    assert_true(contains(out, nout, "graph doc", 9) && contains(out, nout, "a doc string", 12));
    opq_buffer_free(ctx, out);
    opq_model_free(mm);
    pbw_free(&m);
    assert_int_equal(ctx->cur_bytes, 0);
    opq_ctx_free(ctx);
}

// Adds initializer `name` of data type dt, shape [n], carried in a typed field.
static void typed_init(struct pbw *g, const char *name, int dt, int64_t n, int field,
                       const void *vals, size_t count) {
    struct pbw t = {0};
    pbw_int(&t, PBW_T_DIMS, n);
    pbw_int(&t, PBW_T_DATA_TYPE, dt);
    pbw_str(&t, PBW_T_NAME, name);
    if (field == PBW_T_FLOAT_DATA)
        pbw_packed_f32(&t, field, vals, count);
    else if (field == PBW_T_DOUBLE_DATA)
        pbw_packed_f64(&t, field, vals, count);
    else if (field == PBW_T_STRING_DATA)
        for (size_t i = 0; i < count; i++)
            pbw_str(&t, field, ((const char *const *)vals)[i]);
    else
        pbw_packed_varint(&t, field, vals, count);
    pbw_msg(g, PBW_G_INIT, &t);
    struct pbw o = pbw_value_info(name, dt, 1, (const int64_t[]){n}, 0);
    pbw_msg(g, PBW_G_OUTPUT, &o);
}

static const struct opq_tensor *init_of(const struct opq_model *m, const char *name) {
    const struct opq_value *v = opq_graph_value(m->graph, name);
    assert_non_null(v);
    assert_true(v->kind & OPQ_VK_INIT);
    return &v->t;
}

// Initializers in float_data/int32_data/int64_data/double_data/uint64_data/string_data for every
// data type become the IR's dense little-endian bytes, and are saved as raw_data.
static void test_typed_initializers(void **state) {
    (void)state;
    struct pbw g = {0};
    const float f[3] = {1.5f, -2, 3};
    const double d[2] = {0.25, -8};
    const int64_t i8[3] = {-128, 127, -1};
    const int64_t u16[2] = {65535, 1};
    const int64_t f16[2] = {0x3c00, 0xc000}; // 1.0, -2.0
    const int64_t i4[2] = {0x21, 0x0f};      // packed: 1, 2, -1 (third nibble), odd count 3
    const int64_t big[2] = {INT64_MIN, 5};
    const int64_t u32[2] = {4294967295LL, 7};
    const int64_t b[3] = {1, 0, 1};
    const int64_t f8[2] = {0x38, 0xb8};
    const char *s[2] = {"ab", "xyz"};
    typed_init(&g, "f", 1, 3, PBW_T_FLOAT_DATA, f, 3);
    typed_init(&g, "c64", 14, 1, PBW_T_FLOAT_DATA, f, 2);
    typed_init(&g, "d", 11, 2, PBW_T_DOUBLE_DATA, d, 2);
    typed_init(&g, "i8", 3, 3, PBW_T_INT32_DATA, i8, 3);
    typed_init(&g, "u16", 4, 2, PBW_T_INT32_DATA, u16, 2);
    typed_init(&g, "f16", 10, 2, PBW_T_INT32_DATA, f16, 2);
    typed_init(&g, "bf16", 16, 2, PBW_T_INT32_DATA, f16, 2);
    typed_init(&g, "i4", 22, 3, PBW_T_INT32_DATA, i4, 2);
    typed_init(&g, "u4", 21, 3, PBW_T_INT32_DATA, (const int64_t[]){1, 2, 15}, 3);
    typed_init(&g, "i64", 7, 2, PBW_T_INT64_DATA, big, 2);
    typed_init(&g, "u32", 12, 2, PBW_T_UINT64_DATA, u32, 2);
    typed_init(&g, "u64", 13, 2, PBW_T_UINT64_DATA, u32, 2);
    typed_init(&g, "bool", 9, 3, PBW_T_INT32_DATA, b, 3);
    typed_init(&g, "f8", 17, 2, PBW_T_INT32_DATA, f8, 2);
    typed_init(&g, "i32", 6, 3, PBW_T_INT32_DATA, i8, 3);
    typed_init(&g, "str", 8, 2, PBW_T_STRING_DATA, s, 2);
    pbw_str(&g, PBW_G_NAME, "typed");
    struct pbw m = pbw_model(&g);

    struct opq_ctx *ctx = new_ctx();
    struct opq_model *mm = check_roundtrip(ctx, m.b, m.n, "typed", NULL, true);
    assert_memory_equal(init_of(mm, "f")->data, f, sizeof(f));
    assert_memory_equal(init_of(mm, "c64")->data, f, 8);
    assert_memory_equal(init_of(mm, "d")->data, d, sizeof(d));
    assert_memory_equal(init_of(mm, "i8")->data, ((const int8_t[]){-128, 127, -1}), 3);
    assert_memory_equal(init_of(mm, "u16")->data, ((const uint16_t[]){65535, 1}), 4);
    assert_memory_equal(init_of(mm, "f16")->data, ((const uint16_t[]){0x3c00, 0xc000}), 4);
    assert_memory_equal(init_of(mm, "bf16")->data, ((const uint16_t[]){0x3c00, 0xc000}), 4);
    assert_int_equal(init_of(mm, "i4")->nbytes, 2);
    assert_memory_equal(init_of(mm, "i4")->data, ((const uint8_t[]){0x21, 0x0f}), 2);
    assert_memory_equal(init_of(mm, "u4")->data, ((const uint8_t[]){0x21, 0x0f}), 2);
    assert_memory_equal(init_of(mm, "i64")->data, big, sizeof(big));
    assert_memory_equal(init_of(mm, "u32")->data, ((const uint32_t[]){4294967295u, 7}), 8);
    assert_memory_equal(init_of(mm, "u64")->data, ((const uint64_t[]){4294967295u, 7}), 16);
    assert_memory_equal(init_of(mm, "bool")->data, ((const uint8_t[]){1, 0, 1}), 3);
    assert_memory_equal(init_of(mm, "f8")->data, ((const uint8_t[]){0x38, 0xb8}), 2);
    assert_memory_equal(init_of(mm, "i32")->data, ((const int32_t[]){-128, 127, -1}), 12);
    const struct opq_bytes *sb = init_of(mm, "str")->data;
    assert_true(sb[0].len == 2 && sb[1].len == 3 && memcmp(sb[1].data, "xyz", 3) == 0);

    // saved as raw_data: the float tensor's bytes appear as one run in the output
    void *out;
    size_t nout;
    assert_int_equal(opq_model_save_buffer(ctx, mm, &out, &nout), OPQ_OK);
    struct pbw raw = {0};
    pbw_bytes(&raw, PBW_T_RAW, big, sizeof(big));
    assert_true(contains(out, nout, raw.b, raw.n));
    pbw_free(&raw);
    opq_buffer_free(ctx, out);
    opq_model_free(mm);
    pbw_free(&m);
    opq_ctx_free(ctx);
}

// Symbolic and unknown dims, missing shapes; an edited value gets a fresh ValueInfoProto while
// untouched ones (with their denotations) are re-emitted verbatim.
static void test_value_types(void **state) {
    (void)state;
    struct pbw g = {0};
    struct pbw n = pbw_node("Relu", "r", "x", "y");
    struct pbw n2 = pbw_node("Relu", "r2", "y", "z");
    pbw_msg(&g, PBW_G_NODE, &n);
    pbw_msg(&g, PBW_G_NODE, &n2);
    struct pbw vi = pbw_value_info("x", 1, 3, (const int64_t[]){-1, 3, -1}, 1); // N0, 3, N2
    pbw_msg(&g, PBW_G_INPUT, &vi);
    // y: second dim neither value nor param, and a denotation on the type
    struct pbw y = {0}, tp = {0}, tt = {0}, sh = {0}, d0 = {0}, d1 = {0};
    pbw_int(&d0, PBW_DIM_VALUE, 4);
    pbw_str(&d0, PBW_DIM_DENOTATION, "DATA_BATCH");
    pbw_msg(&sh, PBW_SHAPE_DIM, &d0);
    pbw_msg(&sh, PBW_SHAPE_DIM, &d1);
    pbw_int(&tt, PBW_TT_ELEM, 1);
    pbw_msg(&tt, PBW_TT_SHAPE, &sh);
    pbw_msg(&tp, PBW_TP_TENSOR, &tt);
    pbw_str(&tp, PBW_TP_DENOTATION, "TENSOR");
    pbw_str(&y, PBW_VI_NAME, "y");
    pbw_msg(&y, PBW_VI_TYPE, &tp);
    pbw_msg(&g, PBW_G_VALUE_INFO, &y);
    struct pbw vz = pbw_value_info("z", 1, -1, NULL, 0); // no shape at all
    pbw_msg(&g, PBW_G_OUTPUT, &vz);
    // a sequence-typed value_info is kept verbatim
    struct pbw sq = {0}, stp = {0}, seq = {0}, etp = {0}, ett = {0};
    pbw_int(&ett, PBW_TT_ELEM, 1);
    pbw_msg(&etp, PBW_TP_TENSOR, &ett);
    pbw_msg(&seq, 1, &etp);
    pbw_msg(&stp, PBW_TP_SEQUENCE, &seq);
    pbw_str(&sq, PBW_VI_NAME, "unused_seq");
    pbw_msg(&sq, PBW_VI_TYPE, &stp);
    pbw_msg(&g, PBW_G_VALUE_INFO, &sq);
    struct pbw m = pbw_model(&g);

    struct opq_ctx *ctx = new_ctx();
    struct opq_model *mm = check_roundtrip(ctx, m.b, m.n, "types", NULL, true);
    const struct opq_value *x = opq_graph_value(mm->graph, "x");
    assert_int_equal(x->t.ndim, 3);
    assert_int_equal(x->t.shape[0], -1);
    assert_int_equal(x->t.shape[1], 3);
    assert_string_equal(x->dim_param[0], "N0");
    assert_null(x->dim_param[1]);
    assert_string_equal(x->dim_param[2], "N2");
    struct opq_value *yv = opq_graph_value(mm->graph, "y");
    assert_true(yv->kind & OPQ_VK_INFO);
    assert_int_equal(yv->t.ndim, 2);
    assert_int_equal(yv->t.shape[1], -1);
    assert_null(yv->dim_param[1]);
    assert_int_equal(opq_graph_value(mm->graph, "z")->t.ndim, -1);
    assert_int_equal(opq_graph_value(mm->graph, "unused_seq")->t.dtype, OPQ_DTYPE_UNDEF);

    void *out;
    size_t nout;
    assert_int_equal(opq_model_save_buffer(ctx, mm, &out, &nout), OPQ_OK);
    assert_true(contains(out, nout, "DATA_BATCH", 10) && contains(out, nout, "TENSOR", 6));
    opq_buffer_free(ctx, out);
    // a pass changes y's shape: its denotations go, the new shape is written
    yv->t.shape[1] = 8;
    assert_int_equal(opq_model_save_buffer(ctx, mm, &out, &nout), OPQ_OK);
    assert_false(contains(out, nout, "DATA_BATCH", 10));
    struct opq_model *r = NULL;
    assert_int_equal(opq_model_load_buffer(ctx, out, nout, "edited", NULL, &r), OPQ_OK);
    assert_int_equal(opq_graph_value(r->graph, "y")->t.shape[1], 8);
    assert_string_equal(opq_graph_value(r->graph, "x")->dim_param[2], "N2");
    assert_true(contains(out, nout, "unused_seq", 10));
    opq_model_free(r);
    opq_buffer_free(ctx, out);
    opq_model_free(mm);
    pbw_free(&m);
    opq_ctx_free(ctx);
}

// Nodes stored out of topological order are sorted at load; omitted optional inputs/outputs
// are NULL; an initializer also listed as a graph input keeps both kinds.
static void test_order_and_optionals(void **state) {
    (void)state;
    struct pbw g = {0};
    struct pbw n1 = pbw_node("Relu", "second", "t", "y");
    struct pbw n0 = pbw_node("Dropout", "first", "x,,", "t,");
    pbw_msg(&g, PBW_G_NODE, &n1);
    pbw_msg(&g, PBW_G_NODE, &n0);
    struct pbw vi = pbw_value_info("x", 1, 1, (const int64_t[]){2}, 0);
    struct pbw vw = pbw_value_info("w", 1, 1, (const int64_t[]){2}, 0);
    const float w[2] = {3, 4};
    struct pbw t = pbw_tensor_raw("w", 1, 1, (const int64_t[]){2}, w, sizeof(w));
    struct pbw vo = pbw_value_info("y", 1, 1, (const int64_t[]){2}, 0);
    pbw_msg(&g, PBW_G_INPUT, &vi);
    pbw_msg(&g, PBW_G_INPUT, &vw);
    pbw_msg(&g, PBW_G_INIT, &t);
    pbw_msg(&g, PBW_G_OUTPUT, &vo);
    struct pbw m = pbw_model(&g);

    struct opq_ctx *ctx = new_ctx();
    struct opq_model *mm = check_roundtrip(ctx, m.b, m.n, "order", NULL, true);
    assert_string_equal(mm->graph->nodes[0]->name, "first");
    assert_string_equal(mm->graph->nodes[1]->name, "second");
    const struct opq_node *d = mm->graph->nodes[0];
    assert_int_equal(d->n_inputs, 3);
    assert_null(d->inputs[1]);
    assert_null(d->inputs[2]);
    assert_int_equal(d->n_outputs, 2);
    assert_null(d->outputs[1]);
    const struct opq_value *wv = opq_graph_value(mm->graph, "w");
    assert_int_equal(wv->kind & (OPQ_VK_INPUT | OPQ_VK_INIT), OPQ_VK_INPUT | OPQ_VK_INIT);
    assert_int_equal(mm->graph->n_inputs, 2);
    assert_int_equal(opq_graph_verify(mm->graph), OPQ_OK);
    opq_model_free(mm);
    pbw_free(&m);
    opq_ctx_free(ctx);
}

static int n_warnings;
static char last_warning[512];

static void log_sink(void *user, enum opq_log_level lvl, const char *msg) {
    (void)user;
    if (lvl == OPQ_LOG_WARN) {
        n_warnings++;
        snprintf(last_warning, sizeof(last_warning), "%s", msg);
    }
}

// External data: explicit option, automatic switch past the size limit, reload equality.
static void test_external_data(void **state) {
    (void)state;
    struct opq_ctx *ctx = new_ctx();
    struct opq_model *m = NULL;
    assert_int_equal(
        opq_model_load(ctx, model_path("pytorch-operator/test_operator_conv/model.onnx"), &m),
        OPQ_OK);
    char *dir = io_tempdir();
    char out[512];
    char data[512];
    char why[512];
    snprintf(out, sizeof(out), "%s/m.onnx", dir);
    snprintf(data, sizeof(data), "%s/m.onnx.data", dir);
    struct opq_save_opts o = {.external_data = true, .external_min_bytes = 16};
    assert_int_equal(opq_model_save(ctx, m, out, &o), OPQ_OK);
    assert_true(io_file_exists(data));
    assert_int_equal(io_count_entries(dir), 2);
    struct opq_model *r = NULL;
    if (opq_model_load(ctx, out, &r) != OPQ_OK)
        fail_msg("%s", opq_ctx_errmsg(ctx));
    if (!io_model_equal(m, r, why, sizeof(why)))
        fail_msg("external round trip: %s", why);
    // saving the reloaded model again gives the same two files
    void *a1, *a2, *d1, *d2;
    size_t n1, n2, m1, m2;
    assert_true(io_read_file(out, &a1, &n1) && io_read_file(data, &d1, &m1));
    assert_int_equal(opq_model_save(ctx, r, out, &o), OPQ_OK);
    assert_true(io_read_file(out, &a2, &n2) && io_read_file(data, &d2, &m2));
    assert_true(n1 == n2 && m1 == m2 && memcmp(a1, a2, n1) == 0 && memcmp(d1, d2, m1) == 0);
    free(a1), free(a2), free(d1), free(d2);
    // external data cannot be resolved from memory without a base folder
    assert_true(io_read_file(out, &a1, &n1));
    struct opq_model *bad = NULL;
    assert_int_equal(opq_model_load_buffer(ctx, a1, n1, "mem", NULL, &bad), OPQ_ERR_UNSUPPORTED);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "external data"));
    opq_ctx_clear_error(ctx);
    assert_int_equal(opq_model_load_buffer(ctx, a1, n1, "mem", dir, &bad), OPQ_OK);
    opq_model_free(bad);
    free(a1);
    opq_model_free(r);
    io_rmtree(dir);
    free(dir);

    // a custom side-file name
    dir = io_tempdir();
    snprintf(out, sizeof(out), "%s/m.onnx", dir);
    o.external_name = "weights.bin";
    assert_int_equal(opq_model_save(ctx, m, out, &o), OPQ_OK);
    snprintf(data, sizeof(data), "%s/weights.bin", dir);
    assert_true(io_file_exists(data));
    o.external_name = "../escape.bin";
    assert_int_equal(opq_model_save(ctx, m, out, &o), OPQ_ERR_USAGE);
    opq_ctx_clear_error(ctx);
    io_rmtree(dir);
    free(dir);

    // past the inline limit the save switches to external data by itself, with a warning
    dir = io_tempdir();
    snprintf(out, sizeof(out), "%s/big.onnx", dir);
    snprintf(data, sizeof(data), "%s/big.onnx.data", dir);
    opq_ctx_set_log(ctx, log_sink, NULL, OPQ_LOG_WARN);
    n_warnings = 0;
    opq_io_set_inline_limit(1000);
    assert_int_equal(opq_model_save(ctx, m, out, NULL), OPQ_OK);
    void *buf;
    size_t nbuf;
    assert_int_equal(opq_model_save_buffer(ctx, m, &buf, &nbuf), OPQ_ERR_UNSUPPORTED);
    opq_ctx_clear_error(ctx);
    opq_io_set_inline_limit(0);
    assert_int_equal(n_warnings, 1);
    assert_non_null(strstr(last_warning, "external data"));
    assert_true(io_file_exists(data));
    assert_int_equal(opq_model_load(ctx, out, &r), OPQ_OK);
    assert_true(io_model_equal(m, r, why, sizeof(why)));
    opq_model_free(r);
    io_rmtree(dir);
    free(dir);
    opq_model_free(m);
    assert_int_equal(ctx->cur_bytes, 0);
    opq_ctx_free(ctx);
}

// Test-data tensors (input_0.pb) load through opq_tensor_load_pb.
static void test_tensor_pb(void **state) {
    (void)state;
    struct opq_ctx *ctx = new_ctx();
    struct opq_arena *a = opq_arena_new(ctx);
    struct opq_tensor t;
    const char *name = NULL;
    assert_int_equal(opq_tensor_load_pb(ctx, a,
                                        model_path("node/test_relu/test_data_set_0/input_0.pb"), &t,
                                        &name),
                     OPQ_OK);
    assert_int_equal(t.dtype, OPQ_DTYPE_FLOAT);
    assert_int_equal(t.ndim, 3);
    assert_int_equal(t.nbytes, 3 * 4 * 5 * 4);
    assert_string_equal(name, "x");
    assert_int_equal(opq_tensor_load_pb(ctx, a, model_path("node/test_relu/model.onnx"), &t, NULL),
                     OPQ_ERR_PARSE);
    opq_arena_free(a);
    opq_ctx_free(ctx);
}

// Fail the i-th allocation for i = 0.. until the call succeeds: every failure must be a clean
// OPQ_ERR_NOMEM, leaving nothing allocated (ASan checks the rest).
static void test_oom_sweep(void **state) {
    (void)state;
    void *buf;
    size_t len;
    assert_true(
        io_read_file(model_path("pytorch-operator/test_operator_conv/model.onnx"), &buf, &len));
    struct opq_ctx *ctx = new_ctx();
    int i;
    struct opq_model *m = NULL;
    for (i = 0; i < 10000; i++) {
        ctx->fail_at = i;
        ctx->n_allocs = 0;
        enum opq_status st = opq_model_load_buffer(ctx, buf, len, "oom", NULL, &m);
        if (st == OPQ_OK)
            break;
        assert_int_equal(st, OPQ_ERR_NOMEM);
        assert_null(m);
        assert_int_equal(ctx->cur_bytes, 0);
        opq_ctx_clear_error(ctx);
    }
    assert_true(i > 3);
    // the same through the file API (mapping, folder name)
    const char *path = model_path("pytorch-operator/test_operator_conv/model.onnx");
    size_t      held = ctx->cur_bytes; // the model loaded above
    for (int k = 0; k < 10000; k++) {
        struct opq_model *fm = NULL;
        ctx->fail_at         = k;
        ctx->n_allocs        = 0;
        enum opq_status st   = opq_model_load(ctx, path, &fm);
        if (st == OPQ_OK) {
            opq_model_free(fm);
            break;
        }
        assert_int_equal(st, OPQ_ERR_NOMEM);
        assert_non_null(strstr(opq_ctx_errmsg(ctx), path));
        assert_int_equal(ctx->cur_bytes, held);
        opq_ctx_clear_error(ctx);
    }
    ctx->fail_at = -1;
    char *dir = io_tempdir();
    char out[512];
    snprintf(out, sizeof(out), "%s/o.onnx", dir);
    size_t base = ctx->cur_bytes;
    for (i = 0; i < 10000; i++) {
        void *sb;
        size_t sn;
        ctx->fail_at = i;
        ctx->n_allocs = 0;
        enum opq_status st = opq_model_save_buffer(ctx, m, &sb, &sn);
        if (st == OPQ_OK) {
            opq_buffer_free(ctx, sb);
            break;
        }
        assert_int_equal(st, OPQ_ERR_NOMEM);
        assert_int_equal(ctx->cur_bytes, base);
        opq_ctx_clear_error(ctx);
    }
    for (i = 0; i < 10000; i++) {
        ctx->fail_at = i;
        ctx->n_allocs = 0;
        struct opq_save_opts o = {.external_data = true, .external_min_bytes = 16};
        enum opq_status st = opq_model_save(ctx, m, out, &o);
        if (st == OPQ_OK)
            break;
        assert_int_equal(st, OPQ_ERR_NOMEM);
        assert_int_equal(ctx->cur_bytes, base);
        assert_int_equal(io_count_entries(dir), 0);
        opq_ctx_clear_error(ctx);
    }
    ctx->fail_at = -1;
    assert_int_equal(io_count_entries(dir), 2);
    io_rmtree(dir);
    free(dir);
    opq_model_free(m);
    assert_int_equal(ctx->cur_bytes, 0);
    opq_ctx_free(ctx);
    free(buf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_testdata),  cmocka_unit_test(test_save_file),
        cmocka_unit_test(test_unknown_fields),      cmocka_unit_test(test_attr_types),
        cmocka_unit_test(test_typed_initializers),  cmocka_unit_test(test_value_types),
        cmocka_unit_test(test_order_and_optionals), cmocka_unit_test(test_external_data),
        cmocka_unit_test(test_tensor_pb),           cmocka_unit_test(test_oom_sweep),
    };
    return cmocka_run_group_tests_name("onnx_io", tests, NULL, NULL);
}
