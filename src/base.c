/* base.c: contexts, status strings, the sticky error buffer, logging and allocation tracking. */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE // madvise, MADV_POPULATE_WRITE (Linux)
#include "base.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <time.h>

// Each allocation carries a small header with its size so that peak memory can be tracked
// without help from the user's allocator.
struct alloc_hdr {
    size_t size;
    size_t pad; // keeps the payload 16-byte aligned
};

_Noreturn void opq_abort(const char *file, int line, const char *what) {
    fprintf(stderr, "onnx-ptq: internal error: %s:%d: %s\n", file, line, what);
    abort();
}

const char *opq_status_str(enum opq_status st) {
    switch (st) {
    case OPQ_OK: return "ok";
    case OPQ_ERR_NOMEM: return "out of memory";
    case OPQ_ERR_IO: return "I/O error";
    case OPQ_ERR_PARSE: return "parse error";
    case OPQ_ERR_INVALID_MODEL: return "invalid model";
    case OPQ_ERR_UNSUPPORTED: return "unsupported";
    case OPQ_ERR_SHAPE: return "shape mismatch";
    case OPQ_ERR_NUMERIC: return "numeric error";
    case OPQ_ERR_INTERNAL: return "internal error";
    case OPQ_ERR_USAGE: return "bad usage";
    }
    return "unknown status";
}

static void *libc_malloc(void *u, size_t n) {
    (void)u;
    return malloc(n);
}
static void *libc_realloc(void *u, void *p, size_t n) {
    (void)u;
    return realloc(p, n);
}
static void libc_free(void *u, void *p) {
    (void)u;
    free(p);
}

struct opq_ctx *opq_ctx_new_with_allocator(const struct opq_allocator *alloc) {
    struct opq_allocator a = {libc_malloc, libc_realloc, libc_free, NULL};
    if (alloc) {
        if (alloc->malloc)
            a.malloc = alloc->malloc;
        if (alloc->realloc)
            a.realloc = alloc->realloc;
        if (alloc->free)
            a.free = alloc->free;
        a.user = alloc->user;
    }
    struct opq_ctx *ctx = a.malloc(a.user, sizeof(*ctx));
    if (!ctx)
        return NULL;
    memset(ctx, 0, sizeof(*ctx));
    ctx->alloc     = a;
    ctx->n_threads = 1;
    ctx->log_level = OPQ_LOG_INFO;
    ctx->fail_at   = -1;
    return ctx;
}

struct opq_ctx *opq_ctx_new(void) {
    return opq_ctx_new_with_allocator(NULL);
}

void opq_ctx_free(struct opq_ctx *ctx) {
    if (ctx)
        ctx->alloc.free(ctx->alloc.user, ctx);
}

const char *opq_ctx_errmsg(const struct opq_ctx *ctx) {
    return ctx ? ctx->errmsg : "no context";
}

enum opq_status opq_ctx_status(const struct opq_ctx *ctx) {
    return ctx ? ctx->status : OPQ_ERR_INTERNAL;
}

void opq_ctx_clear_error(struct opq_ctx *ctx) {
    ctx->status    = OPQ_OK;
    ctx->errmsg[0] = '\0';
}

void opq_ctx_set_log(struct opq_ctx *ctx, opq_log_fn fn, void *user, enum opq_log_level max_level) {
    ctx->log_fn    = fn;
    ctx->log_user  = user;
    ctx->log_level = max_level;
}

void opq_ctx_set_progress(struct opq_ctx *ctx, opq_progress_fn fn, void *user) {
    ctx->progress_fn   = fn;
    ctx->progress_user = user;
}

void opq_progress(struct opq_ctx *ctx, const char *phase, long done, long total) {
    if (ctx && ctx->progress_fn)
        ctx->progress_fn(ctx->progress_user, phase, done, total);
}

void opq_ctx_set_threads(struct opq_ctx *ctx, int n_threads) {
    ctx->n_threads = n_threads < 1 ? 1 : n_threads;
}

int opq_ctx_threads(const struct opq_ctx *ctx) {
    return ctx ? ctx->n_threads : 1;
}

void opq_ctx_set_seed(struct opq_ctx *ctx, uint64_t seed) {
    ctx->seed = seed;
}

uint64_t opq_ctx_seed(const struct opq_ctx *ctx) {
    return ctx ? ctx->seed : 0;
}

size_t opq_ctx_peak_bytes(const struct opq_ctx *ctx) {
    return ctx ? ctx->peak_bytes : 0;
}

enum opq_status opq_set_error(struct opq_ctx *ctx, enum opq_status st, const char *fmt, ...) {
    if (!ctx || ctx->status != OPQ_OK)
        return st;
    ctx->status = st;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->errmsg, sizeof(ctx->errmsg), fmt, ap);
    va_end(ap);
    // one line only: the CLI prints it as such
    for (char *p = ctx->errmsg; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    return st;
}

void opq_log(struct opq_ctx *ctx, enum opq_log_level lvl, const char *fmt, ...) {
    if (!ctx || !ctx->log_fn || lvl > ctx->log_level)
        return;
    char    buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    ctx->log_fn(ctx->log_user, lvl, buf);
}

static bool inject_failure(struct opq_ctx *ctx) {
    if (ctx->fail_at < 0)
        return false;
    return ctx->n_allocs++ == ctx->fail_at;
}

void *opq_malloc(struct opq_ctx *ctx, size_t n) {
    if (!ctx)
        return malloc(n);
    size_t total;
    if (!opq_add_size(n, sizeof(struct alloc_hdr), &total) || inject_failure(ctx))
        return NULL;
    struct alloc_hdr *h = ctx->alloc.malloc(ctx->alloc.user, total);
    if (!h)
        return NULL;
    h->size = n;
    ctx->cur_bytes += n;
    if (ctx->cur_bytes > ctx->peak_bytes)
        ctx->peak_bytes = ctx->cur_bytes;
    return h + 1;
}

void *opq_calloc(struct opq_ctx *ctx, size_t n, size_t size) {
    size_t bytes;
    if (!opq_mul_size(n, size, &bytes))
        return NULL;
    void *p = opq_malloc(ctx, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

void *opq_realloc(struct opq_ctx *ctx, void *p, size_t n) {
    if (!ctx)
        return realloc(p, n);
    if (!p)
        return opq_malloc(ctx, n);
    size_t total;
    if (!opq_add_size(n, sizeof(struct alloc_hdr), &total) || inject_failure(ctx))
        return NULL;
    struct alloc_hdr *h   = (struct alloc_hdr *)p - 1;
    size_t            old = h->size;
    struct alloc_hdr *nh  = ctx->alloc.realloc(ctx->alloc.user, h, total);
    if (!nh)
        return NULL;
    nh->size = n;
    ctx->cur_bytes = ctx->cur_bytes - old + n;
    if (ctx->cur_bytes > ctx->peak_bytes)
        ctx->peak_bytes = ctx->cur_bytes;
    return nh + 1;
}

void opq_free(struct opq_ctx *ctx, void *p) {
    if (!p)
        return;
    if (!ctx) {
        free(p);
        return;
    }
    struct alloc_hdr *h = (struct alloc_hdr *)p - 1;
    ctx->cur_bytes -= h->size;
    ctx->alloc.free(ctx->alloc.user, h);
}

#define PREFAULT_MIN ((size_t)1 << 18) // smaller blocks are not worth a system call

void opq_prefault(void *p, size_t n) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
    if (!p || n < PREFAULT_MIN)
        return;
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0)
        return;
    uintptr_t a = ((uintptr_t)p + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1);
    uintptr_t e = ((uintptr_t)p + n) & ~((uintptr_t)pg - 1);
    if (e > a)
        (void)madvise((void *)a, e - a, MADV_POPULATE_WRITE);
#else
    (void)p;
    (void)n;
#endif
}

bool opq_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a)
        return false;
    *out = a * b;
    return true;
}

bool opq_add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a)
        return false;
    *out = a + b;
    return true;
}

double opq_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

long opq_peak_rss_kb(void) {
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_maxrss : 0;
}
