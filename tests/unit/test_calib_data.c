/* test_calib_data.c: calibration sources: .npy streaming, .npz (stored and deflated), image
 * folders, random, and the clear errors for wrong shape, dtype, input name, empty folder,
 * undecodable image. Files are written by the test into a fresh temporary folder. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <cmocka.h>

#include <stb/stb_image_write.h>

#include "calib_data.h"
#include "gb.h"

static char tmpdir[256];

static int setup(void **state) {
    (void)state;
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/opq_calib_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

// A .npy image in memory: header for `descr` and `shape`, then the data bytes.
static size_t npy_bytes(uint8_t *out, const char *descr, const char *shape, const void *data,
                        size_t nbytes) {
    char h[256];
    int  n = snprintf(h, sizeof(h), "{'descr': '%s', 'fortran_order': False, 'shape': %s, }",
                      descr, shape);
    int  total = 10 + n + 1;
    int  pad   = (64 - total % 64) % 64;
    memcpy(out, "\x93NUMPY\x01\x00", 8);
    uint16_t hl = (uint16_t)(n + pad + 1);
    out[8]      = (uint8_t)(hl & 0xff);
    out[9]      = (uint8_t)(hl >> 8);
    memcpy(out + 10, h, (size_t)n);
    memset(out + 10 + n, ' ', (size_t)pad);
    out[10 + n + pad] = '\n';
    memcpy(out + 10 + n + pad + 1, data, nbytes);
    return (size_t)(10 + n + pad + 1) + nbytes;
}

static void write_file(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    fclose(f);
}

static void put16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put32(uint8_t *p, uint32_t v) {
    put16(p, v & 0xffff);
    put16(p + 2, v >> 16);
}

// Writes a zip with the given members; method 0 (stored) or 8 (raw deflate).
static void write_zip(const char *path, int n, const char *const *names, uint8_t *const *data,
                      const size_t *sizes, int method) {
    uint8_t *buf = malloc(1 << 20);
    size_t   off = 0, offs[8], csizes[8];
    for (int i = 0; i < n; i++) {
        uint8_t *payload = data[i];
        size_t   csize   = sizes[i];
        uint8_t *comp    = NULL;
        if (method == 8) {
            comp = malloc(sizes[i] + 1024);
            z_stream zs;
            memset(&zs, 0, sizeof(zs));
            assert_int_equal(deflateInit2(&zs, 6, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY),
                             Z_OK);
            zs.next_in   = data[i];
            zs.avail_in  = (uInt)sizes[i];
            zs.next_out  = comp;
            zs.avail_out = (uInt)(sizes[i] + 1024);
            assert_int_equal(deflate(&zs, Z_FINISH), Z_STREAM_END);
            csize = zs.total_out;
            deflateEnd(&zs);
            payload = comp;
        }
        uint32_t crc = (uint32_t)crc32(0, data[i], (uInt)sizes[i]);
        size_t   nl  = strlen(names[i]);
        offs[i]      = off;
        csizes[i]    = csize;
        uint8_t *h   = buf + off;
        memset(h, 0, 30);
        put32(h, 0x04034b50u);
        put16(h + 4, 20);
        put16(h + 8, (unsigned)method);
        put32(h + 14, crc);
        put32(h + 18, (uint32_t)csize);
        put32(h + 22, (uint32_t)sizes[i]);
        put16(h + 26, (unsigned)nl);
        memcpy(h + 30, names[i], nl);
        memcpy(h + 30 + nl, payload, csize);
        off += 30 + nl + csize;
        free(comp);
    }
    size_t cd = off;
    for (int i = 0; i < n; i++) {
        uint8_t *h  = buf + off;
        size_t   nl = strlen(names[i]);
        memset(h, 0, 46);
        put32(h, 0x02014b50u);
        put16(h + 4, 20);
        put16(h + 6, 20);
        put16(h + 10, (unsigned)method);
        put32(h + 16, (uint32_t)crc32(0, data[i], (uInt)sizes[i]));
        put32(h + 20, (uint32_t)csizes[i]);
        put32(h + 24, (uint32_t)sizes[i]);
        put16(h + 28, (unsigned)nl);
        put32(h + 42, (uint32_t)offs[i]);
        memcpy(h + 46, names[i], nl);
        off += 46 + nl;
    }
    uint8_t *e = buf + off;
    memset(e, 0, 22);
    put32(e, 0x06054b50u);
    put16(e + 8, (unsigned)n);
    put16(e + 10, (unsigned)n);
    put32(e + 12, (uint32_t)(off - cd));
    put32(e + 16, (uint32_t)cd);
    off += 22;
    write_file(path, buf, off);
    free(buf);
}

// Model: input "x" float [N,2,3], input "ids" int64 [N,4] (optional second input).
static struct opq_model *model(struct opq_ctx *ctx, bool two_inputs) {
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 2, 3));
    if (two_inputs)
        gb_input(m, "ids", OPQ_DTYPE_INT64, GB_SHAPE(-1, 4));
    gb_node(m, "Relu", "x", "y");
    gb_output(m, "y");
    return m;
}

static void path_of(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", tmpdir, name);
}

static void test_npy(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = model(ctx, false);
    float data[5 * 6];
    for (int i = 0; i < 30; i++)
        data[i] = (float)i * 0.5f;
    uint8_t buf[4096];
    char p[512];
    path_of(p, sizeof(p), "x.npy");
    write_file(p, buf, npy_bytes(buf, "<f4", "(5, 2, 3)", data, sizeof(data)));
    struct opq_calib_spec spec = {.path = p};
    struct opq_calib_src *s = NULL;
    assert_int_equal(opq_calib_open(ctx, m, &spec, &s), OPQ_OK);
    assert_int_equal(opq_calib_count(s), 5);
    assert_int_equal(opq_calib_sample_numel(s, 0), 6);
    float got[12];
    assert_int_equal(opq_calib_read(s, 0, 3, 2, got), OPQ_OK);
    for (int i = 0; i < 12; i++)
        assert_float_equal(got[i], data[18 + i], 0.0f);
    assert_int_equal(opq_calib_read(s, 0, 4, 2, got), OPQ_ERR_USAGE); // past the end
    opq_calib_close(s);
    // --calib-count limits
    spec.count = 2;
    assert_int_equal(opq_calib_open(ctx, m, &spec, &s), OPQ_OK);
    assert_int_equal(opq_calib_count(s), 2);
    opq_calib_close(s);
    // uint8 converts to float
    uint8_t u8[2 * 6] = {0, 1, 2, 3, 4, 5, 255, 7, 8, 9, 10, 11};
    path_of(p, sizeof(p), "u8.npy");
    write_file(p, buf, npy_bytes(buf, "|u1", "(2, 2, 3)", u8, sizeof(u8)));
    spec.count = 0;
    assert_int_equal(opq_calib_open(ctx, m, &spec, &s), OPQ_OK);
    assert_int_equal(opq_calib_read(s, 0, 1, 1, got), OPQ_OK);
    assert_float_equal(got[0], 255.0f, 0.0f);
    opq_calib_close(s);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void expect_error(struct opq_ctx *ctx, struct opq_model *m, const char *path,
                         enum opq_status want, const char *needle) {
    struct opq_calib_spec spec = {.path = path};
    struct opq_calib_src *s = NULL;
    opq_ctx_clear_error(ctx);
    assert_int_equal(opq_calib_open(ctx, m, &spec, &s), want);
    assert_null(s);
    if (!strstr(opq_ctx_errmsg(ctx), needle))
        fail_msg("error '%s' lacks '%s'", opq_ctx_errmsg(ctx), needle);
}

static void test_npy_errors(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = model(ctx, false);
    float data[4 * 6] = {0};
    uint8_t buf[4096];
    char p[512];
    path_of(p, sizeof(p), "shape.npy");
    write_file(p, buf, npy_bytes(buf, "<f4", "(4, 3, 2)", data, sizeof(data)));
    expect_error(ctx, m, p, OPQ_ERR_SHAPE, "does not match input 'x'");
    path_of(p, sizeof(p), "rank.npy");
    write_file(p, buf, npy_bytes(buf, "<f4", "(24,)", data, sizeof(data)));
    expect_error(ctx, m, p, OPQ_ERR_SHAPE, "rank.npy: sample shape ()");
    path_of(p, sizeof(p), "dtype.npy");
    write_file(p, buf, npy_bytes(buf, "<c8", "(4, 2, 3)", data, sizeof(data)));
    expect_error(ctx, m, p, OPQ_ERR_UNSUPPORTED, "dtype '<c8'");
    path_of(p, sizeof(p), "trunc.npy");
    size_t n = npy_bytes(buf, "<f4", "(4, 2, 3)", data, sizeof(data));
    write_file(p, buf, n - 10);
    expect_error(ctx, m, p, OPQ_ERR_PARSE, "trunc.npy: truncated");
    path_of(p, sizeof(p), "junk.npy");
    write_file(p, "hello world, not numpy", 22);
    expect_error(ctx, m, p, OPQ_ERR_PARSE, "junk.npy: not a .npy");
    path_of(p, sizeof(p), "missing.npy");
    expect_error(ctx, m, p, OPQ_ERR_IO, "missing.npy");
    path_of(p, sizeof(p), "data.txt");
    write_file(p, "x", 1);
    expect_error(ctx, m, p, OPQ_ERR_USAGE, "must be a .npy");
    opq_model_free(m);
    // a .npy cannot feed a two-input model
    m = model(ctx, true);
    path_of(p, sizeof(p), "x.npy");
    write_file(p, buf, npy_bytes(buf, "<f4", "(4, 2, 3)", data, sizeof(data)));
    expect_error(ctx, m, p, OPQ_ERR_USAGE, "single-input");
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_npz(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = model(ctx, true);
    float x[3 * 6];
    int64_t ids[3 * 4];
    for (int i = 0; i < 18; i++)
        x[i] = (float)i;
    for (int i = 0; i < 12; i++)
        ids[i] = 100 + i;
    static uint8_t a[4096], b[4096];
    size_t sizes[2] = {npy_bytes(a, "<f4", "(3, 2, 3)", x, sizeof(x)),
                       npy_bytes(b, "<i8", "(3, 4)", ids, sizeof(ids))};
    const char *names[2] = {"x.npy", "ids.npy"};
    uint8_t *data[2] = {a, b};
    for (int method = 0; method <= 8; method += 8) {
        char p[512];
        path_of(p, sizeof(p), method ? "deflated.npz" : "stored.npz");
        write_zip(p, 2, names, data, sizes, method);
        struct opq_calib_spec spec = {.path = p};
        struct opq_calib_src *s = NULL;
        assert_int_equal(opq_calib_open(ctx, m, &spec, &s), OPQ_OK);
        assert_int_equal(opq_calib_count(s), 3);
        assert_int_equal(opq_calib_n_inputs(s), 2);
        float gx[6];
        int64_t gi[8];
        assert_int_equal(opq_calib_read(s, 0, 2, 1, gx), OPQ_OK);
        assert_float_equal(gx[5], 17.0f, 0.0f);
        assert_int_equal(opq_calib_read(s, 1, 1, 2, gi), OPQ_OK);
        assert_int_equal(gi[0], 104);
        assert_int_equal(gi[7], 111);
        opq_calib_close(s);
    }
    // a key that is not an input, and a missing input
    char p[512];
    const char *bad[2] = {"x.npy", "tokens.npy"};
    path_of(p, sizeof(p), "badkey.npz");
    write_zip(p, 2, bad, data, sizes, 0);
    expect_error(ctx, m, p, OPQ_ERR_USAGE, "key 'tokens' is not a model input");
    path_of(p, sizeof(p), "onlyx.npz");
    write_zip(p, 1, names, data, sizes, 8);
    expect_error(ctx, m, p, OPQ_ERR_USAGE, "no array for input 'ids'");
    path_of(p, sizeof(p), "notzip.npz");
    write_file(p, "definitely not a zip file at all", 32);
    expect_error(ctx, m, p, OPQ_ERR_PARSE, "not a .npz");
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_images(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = gb_new(ctx);
    gb_input(m, "img", OPQ_DTYPE_FLOAT, GB_SHAPE(-1, 3, 4, 4));
    gb_node(m, "Relu", "img", "y");
    gb_output(m, "y");
    char dir[512], p[600];
    path_of(dir, sizeof(dir), "imgs");
    mkdir(dir, 0755);
    // an 8x6 RGB image of constant colour (200, 100, 50) and a 4x4 gradient
    unsigned char px[8 * 6 * 3];
    for (int i = 0; i < 8 * 6; i++) {
        px[3 * i] = 200;
        px[3 * i + 1] = 100;
        px[3 * i + 2] = 50;
    }
    snprintf(p, sizeof(p), "%s/a.png", dir);
    assert_true(stbi_write_png(p, 8, 6, 3, px, 8 * 3));
    unsigned char g[4 * 4 * 3];
    for (int i = 0; i < 16; i++)
        g[3 * i] = g[3 * i + 1] = g[3 * i + 2] = (unsigned char)(i * 16);
    snprintf(p, sizeof(p), "%s/b.png", dir);
    assert_true(stbi_write_png(p, 4, 4, 3, g, 4 * 3));
    snprintf(p, sizeof(p), "%s/notes.txt", dir);
    write_file(p, "ignored", 7);
    struct opq_calib_spec spec = {.path = dir, .n_mean = 3, .n_std = 1,
                                  .mean = {0.5f, 0.5f, 0.5f}, .std = {0.5f}};
    struct opq_calib_src *s = NULL;
    assert_int_equal(opq_calib_open(ctx, m, &spec, &s), OPQ_OK);
    assert_int_equal(opq_calib_count(s), 2);
    float out[2 * 48];
    assert_int_equal(opq_calib_read(s, 0, 0, 2, out), OPQ_OK);
    // constant image survives resize + crop exactly; NCHW: channel 0 first
    for (int i = 0; i < 16; i++) {
        assert_float_equal(out[i], (200 / 255.0f - 0.5f) / 0.5f, 1e-5f);
        assert_float_equal(out[16 + i], (100 / 255.0f - 0.5f) / 0.5f, 1e-5f);
        assert_float_equal(out[32 + i], (50 / 255.0f - 0.5f) / 0.5f, 1e-5f);
    }
    // the 4x4 image needs no resize: pixel (1,2) of channel 1 is (1*4+2)*16
    assert_float_equal(out[48 + 16 + 6], (96 / 255.0f - 0.5f) / 0.5f, 1e-5f);
    opq_calib_close(s);
    // an undecodable image names the file
    snprintf(p, sizeof(p), "%s/c.jpg", dir);
    write_file(p, "not a jpeg", 10);
    assert_int_equal(opq_calib_open(ctx, m, &spec, &s), OPQ_OK);
    opq_ctx_clear_error(ctx);
    assert_int_equal(opq_calib_read(s, 0, 2, 1, out), OPQ_ERR_PARSE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "c.jpg: cannot decode image"));
    opq_calib_close(s);
    // empty folder
    path_of(dir, sizeof(dir), "empty");
    mkdir(dir, 0755);
    expect_error(ctx, m, dir, OPQ_ERR_USAGE, "no .png");
    opq_model_free(m);
    opq_ctx_free(ctx);
}

static void test_random(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_model *m = model(ctx, false);
    struct opq_calib_spec spec = {.path = "random"};
    struct opq_calib_src *s = NULL;
    assert_int_equal(opq_calib_open(ctx, m, &spec, &s), OPQ_ERR_USAGE); // needs a count
    spec.count = 4;
    spec.seed  = 9;
    assert_int_equal(opq_calib_open(ctx, m, &spec, &s), OPQ_OK);
    float a[4 * 6], b[6];
    assert_int_equal(opq_calib_read(s, 0, 0, 4, a), OPQ_OK);
    assert_int_equal(opq_calib_read(s, 0, 2, 1, b), OPQ_OK);
    assert_memory_equal(a + 12, b, sizeof(b)); // same sample whatever the batching
    opq_calib_close(s);
    opq_model_free(m);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_npy),    cmocka_unit_test(test_npy_errors),
        cmocka_unit_test(test_npz),    cmocka_unit_test(test_images),
        cmocka_unit_test(test_random),
    };
    return cmocka_run_group_tests_name("calib_data", tests, setup, teardown);
}
