/* threadpool.h: a small persistent pthread pool with a parallel-for.
 *
 * opq_parallel_for splits [0, n) into a few contiguous chunks per thread, which the calling
 * thread and the workers claim dynamically, and returns when all are done. Chunk boundaries
 * depend only on n, grain and the thread count (never on timing), so work whose chunks write
 * disjoint outputs is deterministic. Not reentrant: fn must not call opq_parallel_for on the
 * same pool. A NULL pool runs fn(user, 0, n) inline. */
#ifndef OPQ_THREADPOOL_H
#define OPQ_THREADPOOL_H

#include <stddef.h>
#include <stdint.h>

struct opq_ctx;
struct opq_threadpool;

typedef void (*opq_range_fn)(void *user, int64_t begin, int64_t end);

// A pool running n_threads (>= 1) workers including the caller; NULL on failure (error set).
// Caller frees with opq_threadpool_free.
struct opq_threadpool *opq_threadpool_new(struct opq_ctx *ctx, int n_threads);
void opq_threadpool_free(struct opq_threadpool *pool);
int opq_threadpool_size(const struct opq_threadpool *pool);

// A grow-only scratch buffer owned by the pool (valid until the next call or the pool's free),
// for data shared by the chunks of one parallel-for (e.g. a GEMM's packed operands). NULL on
// failure (or for a NULL pool). Like opq_parallel_for, not for concurrent callers.
void *opq_threadpool_workspace(struct opq_threadpool *pool, size_t bytes);

// Runs fn over [0, n) in chunks of at least `grain` items (grain < 1 means 1).
void opq_parallel_for(struct opq_threadpool *pool, int64_t n, int64_t grain, opq_range_fn fn,
                      void *user);

#endif
