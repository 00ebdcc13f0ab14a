/* base.h: status codes, the sticky error buffer, assertions, logging hooks and checked size
 * arithmetic shared by every translation unit of the library. Internal header. */
#ifndef OPQ_BASE_H
#define OPQ_BASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "opq.h"

#define OPQ_ERRMSG_MAX 1024

// The context (opaque in opq.h). Fields are read by the library; set them through the API.
struct opq_ctx {
    struct opq_allocator alloc;
    opq_log_fn           log_fn;
    void                *log_user;
    enum opq_log_level   log_level;
    opq_progress_fn      progress_fn;
    void                *progress_user;
    int                  n_threads;
    uint64_t             seed;
    enum opq_status      status;                  // sticky: first error wins
    char                 errmsg[OPQ_ERRMSG_MAX];
    size_t               cur_bytes, peak_bytes;   // tracked through opq_malloc & co
    // Fault injection for OOM sweeps in tests: fail the allocation numbered fail_at (0-based,
    // counted from when it was set); -1 disables.
    long                 fail_at;
    long                 n_allocs;
};

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

// Always-on invariant check (ggml style). Only for conditions the code itself guarantees;
// anything that comes from a file, the CLI or calibration data must yield a status instead.
#define OPQ_ASSERT(x)                                                                             \
    do {                                                                                          \
        if (!(x))                                                                                 \
            opq_abort(__FILE__, __LINE__, #x);                                                    \
    } while (0)
#define OPQ_ABORT(msg) opq_abort(__FILE__, __LINE__, msg)

_Noreturn void opq_abort(const char *file, int line, const char *what);

// Sticky error (SQLite style): the first error set on a context wins until opq_ctx_clear_error().
// Returns `st` so callers can write `return opq_set_error(ctx, OPQ_ERR_SHAPE, "...")`.
enum opq_status opq_set_error(struct opq_ctx *ctx, enum opq_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

// Logging through the context's sink (the CLI installs one; the library never prints itself).
void opq_log(struct opq_ctx *ctx, enum opq_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

// Reports progress through the context's hook (no-op without one).
void opq_progress(struct opq_ctx *ctx, const char *phase, long done, long total);

// Allocation through the context's allocator (so tests can inject failures).
void *opq_malloc(struct opq_ctx *ctx, size_t n);
void *opq_calloc(struct opq_ctx *ctx, size_t n, size_t size);
void *opq_realloc(struct opq_ctx *ctx, void *p, size_t n);
void  opq_free(struct opq_ctx *ctx, void *p);

// Maps the pages of a large block that is about to be written in full, in one system call
// (Linux MADV_POPULATE_WRITE; elsewhere, or when it fails, nothing happens and the pages fault
// one by one on first touch as usual). A speed hint only: contents and results are unchanged. On
// virtual machines a page fault is an exit to the hypervisor, and the executor's buffers, packed
// GEMM operands and the model's tensor bytes are hundreds of MB of freshly allocated memory.
void opq_prefault(void *p, size_t n);

// Monotonic clock in seconds, and the process's peak resident memory so far in KiB (0 if
// unknown): the time and memory figures of reports and progress displays.
double opq_now_s(void);
long   opq_peak_rss_kb(void);

// Checked arithmetic for sizes derived from untrusted shapes: false on overflow.
bool opq_mul_size(size_t a, size_t b, size_t *out);
bool opq_add_size(size_t a, size_t b, size_t *out);

#endif
