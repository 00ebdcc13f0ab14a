/* test_k_layout_fast.c: the fast paths of Transpose and Slice (merged dims, whole-row copies,
 * tiled 2-D transposes, work split over a thread pool) against a naive element-by-element
 * reference, over seeded random shapes, permutations and slices (positive and negative steps),
 * for 1-, 2-, 4- and 8-byte elements, with no pool and with a 2-thread pool. */
#include "kl_harness.h"
#include "threadpool.h"

#define IN(...) ((const struct opq_tensor *const[]){__VA_ARGS__})

static uint32_t next_u32(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

// Fills x with distinct-ish byte patterns (element i gets bytes of i * 2654435761).
static void fill_pattern(struct opq_tensor *x) {
    unsigned char *p = x->data;
    for (size_t i = 0; i < x->nbytes; i++)
        p[i] = (unsigned char)((i * 2654435761u) >> 13);
}

static enum opq_dtype dtype_of_size(int es) {
    return es == 1 ? OPQ_DTYPE_UINT8 : es == 4 ? OPQ_DTYPE_FLOAT : OPQ_DTYPE_INT64;
}

static void random_shape(uint64_t *s, int r, int64_t *shape) {
    for (int d = 0; d < r; d++) {
        uint32_t u = next_u32(s) % 10;
        // mostly small dims, some 1s (merged away) and some large ones (several tiles)
        shape[d] = u < 2 ? 1 : u < 8 ? 2 + next_u32(s) % 7 : 17 + next_u32(s) % 40;
    }
}

static void check_transpose(struct opq_threadpool *pool, uint64_t *s) {
    int r = 1 + (int)(next_u32(s) % 5);
    int es_choice[] = {1, 4, 8};
    int es = es_choice[next_u32(s) % 3];
    int64_t shape[OPQ_MAX_DIMS];
    int64_t perm[OPQ_MAX_DIMS];
    random_shape(s, r, shape);
    for (int d = 0; d < r; d++)
        perm[d] = d;
    for (int d = r - 1; d > 0; d--) {
        int j = (int)(next_u32(s) % (uint32_t)(d + 1));
        int64_t tmp = perm[d];
        perm[d] = perm[j];
        perm[j] = tmp;
    }
    struct kt *t = kt_new("Transpose", 1, 1);
    t->k.pool = pool;
    t->k.n_threads = opq_threadpool_size(pool);
    kt_attr_ints(t, "perm", perm, r);
    struct opq_tensor x = kt_tensor(t, dtype_of_size(es), r, shape, NULL);
    x.data = opq_arena_alloc(t->arena, x.nbytes + 1);
    fill_pattern(&x);
    assert_int_equal(kt_run(t, &opq_kernel_transpose, IN(&x)), OPQ_OK);
    // reference: walk the output in order, compute the input offset from the index
    int64_t istr[OPQ_MAX_DIMS];
    int64_t acc = 1;
    for (int d = r - 1; d >= 0; d--) {
        istr[d] = acc;
        acc *= shape[d];
    }
    int64_t oshape[OPQ_MAX_DIMS];
    for (int d = 0; d < r; d++)
        oshape[d] = shape[perm[d]];
    const unsigned char *in = x.data;
    const unsigned char *out = t->out[0].data;
    int64_t idx[OPQ_MAX_DIMS] = {0};
    for (int64_t i = 0; i < acc; i++) {
        int64_t off = 0;
        for (int d = 0; d < r; d++)
            off += idx[d] * istr[perm[d]];
        if (memcmp(out + i * es, in + off * es, (size_t)es) != 0) {
            print_error("transpose rank %d es %d: element %lld differs\n", r, es, (long long)i);
            fail();
        }
        for (int d = r - 1; d >= 0; d--) {
            if (++idx[d] < oshape[d])
                break;
            idx[d] = 0;
        }
    }
    kt_free(t);
}

static void check_slice(struct opq_threadpool *pool, uint64_t *s) {
    int r = 1 + (int)(next_u32(s) % 4);
    int es_choice[] = {1, 4, 8};
    int es = es_choice[next_u32(s) % 3];
    int64_t shape[OPQ_MAX_DIMS];
    int64_t starts[OPQ_MAX_DIMS];
    int64_t ends[OPQ_MAX_DIMS];
    int64_t steps[OPQ_MAX_DIMS];
    int64_t count[OPQ_MAX_DIMS];
    random_shape(s, r, shape);
    for (int d = 0; d < r; d++) {
        int64_t n = shape[d];
        uint32_t kind = next_u32(s) % 4;
        if (kind == 0) { // whole dim
            starts[d] = 0;
            ends[d] = n;
            steps[d] = 1;
        } else if (kind == 1) { // a contiguous part
            starts[d] = next_u32(s) % (uint32_t)n;
            ends[d] = starts[d] + 1 + next_u32(s) % (uint32_t)(n - starts[d]);
            steps[d] = 1;
        } else if (kind == 2) { // a positive step
            starts[d] = next_u32(s) % (uint32_t)n;
            ends[d] = n;
            steps[d] = 2 + next_u32(s) % 3;
        } else { // reversed
            starts[d] = n - 1;
            ends[d] = -n - 1;
            steps[d] = -1 - (int64_t)(next_u32(s) % 2);
        }
        int64_t e = ends[d] < -n ? -1 : ends[d];
        count[d] = steps[d] > 0 ? (ends[d] - starts[d] + steps[d] - 1) / steps[d]
                                : (starts[d] - e + (-steps[d]) - 1) / (-steps[d]);
    }
    struct kt *t = kt_new("Slice", 5, 1);
    t->k.pool = pool;
    t->k.n_threads = opq_threadpool_size(pool);
    struct opq_tensor x = kt_tensor(t, dtype_of_size(es), r, shape, NULL);
    x.data = opq_arena_alloc(t->arena, x.nbytes + 1);
    fill_pattern(&x);
    int64_t axes[OPQ_MAX_DIMS];
    for (int d = 0; d < r; d++)
        axes[d] = d;
    struct opq_tensor st = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){r}, starts);
    struct opq_tensor en = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){r}, ends);
    struct opq_tensor ax = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){r}, axes);
    struct opq_tensor sp = kt_tensor(t, OPQ_DTYPE_INT64, 1, (int64_t[]){r}, steps);
    assert_int_equal(kt_run(t, &opq_kernel_slice, IN(&x, &st, &en, &ax, &sp)), OPQ_OK);
    kt_expect_shape(&t->out[0], r, count);
    int64_t istr[OPQ_MAX_DIMS];
    int64_t total = 1;
    int64_t acc = 1;
    for (int d = r - 1; d >= 0; d--) {
        istr[d] = acc;
        acc *= shape[d];
        total *= count[d];
    }
    const unsigned char *in = x.data;
    const unsigned char *out = t->out[0].data;
    int64_t idx[OPQ_MAX_DIMS] = {0};
    for (int64_t i = 0; i < total; i++) {
        int64_t off = 0;
        for (int d = 0; d < r; d++)
            off += (starts[d] + idx[d] * steps[d]) * istr[d];
        if (memcmp(out + i * es, in + off * es, (size_t)es) != 0) {
            print_error("slice rank %d es %d: element %lld differs\n", r, es, (long long)i);
            fail();
        }
        for (int d = r - 1; d >= 0; d--) {
            if (++idx[d] < count[d])
                break;
            idx[d] = 0;
        }
    }
    kt_free(t);
}

static void run_cases(struct opq_threadpool *pool) {
    uint64_t s = 12345;
    for (int i = 0; i < 300; i++) {
        check_transpose(pool, &s);
        check_slice(pool, &s);
    }
}

static void test_layout_fast_single(void **state) {
    (void)state;
    run_cases(NULL);
}

static void test_layout_fast_pool(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    assert_non_null(ctx);
    struct opq_threadpool *pool = opq_threadpool_new(ctx, 2);
    assert_non_null(pool);
    run_cases(pool);
    opq_threadpool_free(pool);
    opq_ctx_free(ctx);
}

// The ViT attention layouts at full size: [L, B*H, D] -> [B*H, D, L] and [B*H, L, D] and back.
static void test_layout_vit_shapes(void **state) {
    (void)state;
    struct opq_ctx *ctx = opq_ctx_new();
    struct opq_threadpool *pool = opq_threadpool_new(ctx, 2);
    assert_non_null(pool);
    const int64_t perms[3][3] = {{1, 2, 0}, {1, 0, 2}, {2, 0, 1}};
    for (int p = 0; p < 3; p++) {
        struct kt *t = kt_new("Transpose", 1, 1);
        t->k.pool = pool;
        kt_attr_ints(t, "perm", perms[p], 3);
        struct opq_tensor x = kt_tensor(t, OPQ_DTYPE_FLOAT, 3, (int64_t[]){197, 48, 64}, NULL);
        x.data = opq_arena_alloc(t->arena, x.nbytes);
        float *xv = x.data;
        for (int64_t i = 0; i < 197 * 48 * 64; i++)
            xv[i] = (float)i;
        assert_int_equal(kt_run(t, &opq_kernel_transpose, IN(&x)), OPQ_OK);
        const float *y = t->out[0].data;
        const int64_t *os = t->out[0].shape;
        int64_t istr[3] = {48 * 64, 64, 1};
        int64_t i = 0;
        for (int64_t a = 0; a < os[0]; a++)
            for (int64_t b = 0; b < os[1]; b++)
                for (int64_t c = 0; c < os[2]; c++, i++) {
                    int64_t off = a * istr[perms[p][0]] + b * istr[perms[p][1]] +
                                  c * istr[perms[p][2]];
                    assert_true(y[i] == (float)off);
                }
        kt_free(t);
    }
    opq_threadpool_free(pool);
    opq_ctx_free(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_fast_single),
        cmocka_unit_test(test_layout_fast_pool),
        cmocka_unit_test(test_layout_vit_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
