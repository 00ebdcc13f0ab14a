/* test_npy.c: .npy round trips for every supported dtype and rank, and clear errors for Fortran
 * order, big-endian data, unsupported dtypes and truncated files. */
#define _POSIX_C_SOURCE 200809L

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "arena.h"
#include "npy.h"

static void test_round_trip(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_arena *a = opq_arena_new(ctx);
    const enum opq_dtype dts[] = {OPQ_DTYPE_FLOAT, OPQ_DTYPE_DOUBLE, OPQ_DTYPE_UINT8,
                                  OPQ_DTYPE_INT32, OPQ_DTYPE_INT64,  OPQ_DTYPE_BOOL};
    unsigned char data[8 * 24];
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (unsigned char)(i * 7 % 2 ? 1 : 0) | (unsigned char)(i % 5 == 0);
    char path[] = "/tmp/opq_test_npy_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    for (size_t d = 0; d < sizeof(dts) / sizeof(dts[0]); d++) {
        for (int rank = 0; rank <= 4; rank++) {
            struct opq_tensor t = {.dtype = dts[d], .ndim = rank, .data = data};
            size_t n = 1;
            for (int i = 0; i < rank; i++) {
                t.shape[i] = i + 1;
                n *= (size_t)(i + 1);
            }
            t.nbytes = n * opq_dtype_size(dts[d]);
            assert_int_equal(opq_npy_save(ctx, path, &t), OPQ_OK);
            struct opq_tensor r;
            assert_int_equal(opq_npy_load(ctx, a, path, &r), OPQ_OK);
            assert_int_equal(r.dtype, dts[d]);
            assert_int_equal(r.ndim, rank);
            for (int i = 0; i < rank; i++)
                assert_int_equal(r.shape[i], i + 1);
            assert_int_equal(r.nbytes, t.nbytes);
            assert_memory_equal(r.data, data, t.nbytes);
            // the header is padded to a multiple of 64 bytes, as NumPy does
            FILE *f = fopen(path, "rb");
            fseek(f, 0, SEEK_END);
            assert_int_equal((ftell(f) - (long)t.nbytes) % 64, 0);
            fclose(f);
        }
    }
    remove(path);
    opq_arena_free(a);
    opq_ctx_free(ctx);
}

static enum opq_status parse_hdr(struct opq_ctx *ctx, struct opq_arena *a, const char *hdr,
                                 size_t data_bytes) {
    unsigned char buf[256] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
    size_t hl = strlen(hdr);
    buf[8] = (unsigned char)hl;
    memcpy(buf + 10, hdr, hl);
    struct opq_tensor t;
    opq_ctx_clear_error(ctx);
    return opq_npy_parse(ctx, a, buf, 10 + hl + data_bytes, "x.npy", &t);
}

static void test_errors(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_arena *a = opq_arena_new(ctx);
    assert_int_equal(
        parse_hdr(ctx, a, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 8), OPQ_OK);
    assert_int_equal(
        parse_hdr(ctx, a, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24),
        OPQ_ERR_UNSUPPORTED);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "Fortran"));
    assert_int_equal(
        parse_hdr(ctx, a, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8),
        OPQ_ERR_UNSUPPORTED);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "big-endian"));
    assert_int_equal(
        parse_hdr(ctx, a, "{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", 16),
        OPQ_ERR_UNSUPPORTED);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "<c8"));
    assert_int_equal(
        parse_hdr(ctx, a, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 20),
        OPQ_ERR_PARSE);
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "truncated"));
    assert_non_null(strstr(opq_ctx_errmsg(ctx), "x.npy"));
    assert_int_equal(parse_hdr(ctx, a, "{'descr': '<f4', 'shape': (2,), }", 8), OPQ_ERR_PARSE);
    struct opq_tensor t;
    assert_int_equal(opq_npy_parse(ctx, a, "PK\x03\x04 not npy", 14, "z.npy", &t), OPQ_ERR_PARSE);
    assert_int_equal(opq_npy_load(ctx, a, "/nonexistent/dir/file.npy", &t), OPQ_ERR_IO);
    opq_arena_free(a);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests_name("npy", tests, NULL, NULL);
}
