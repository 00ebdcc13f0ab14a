/* threadpool.c: persistent workers with a dynamically shared chunk counter (see threadpool.h).
 *
 * A job is split into fixed chunks (boundaries depend only on n and the chunk count); the caller
 * and the workers claim chunk indices from one atomic counter, so when a thread is descheduled
 * (a shared, loaded machine) the others finish its share instead of waiting for it. The counter
 * carries the job's generation in its high 32 bits: a worker that woke for an old job fails its
 * compare-and-swap and never runs chunks of a newer one with stale arguments. */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>

#include "base.h"

#define CHUNKS_PER_THREAD 4

struct job {
    opq_range_fn fn;
    void *user;
    int64_t n;
    uint32_t n_chunks;
    uint32_t gen;
};

struct opq_threadpool {
    struct opq_ctx *ctx;
    int n_threads;
    pthread_t *workers; // n_threads - 1
    int n_started;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    pthread_cond_t done_cv;
    uint64_t generation; // bumped per job (under mu)
    bool quit;
    struct job job;        // current job (written under mu before the bump)
    _Atomic uint64_t next; // (generation << 32) | next chunk index
    _Atomic uint32_t done; // chunks finished in the current job
    void *ws;              // opq_threadpool_workspace
    size_t ws_bytes;
};

static void run_chunks(struct opq_threadpool *pool, const struct job *j) {
    for (;;) {
        uint64_t cur = atomic_load(&pool->next);
        if ((uint32_t)(cur >> 32) != j->gen || (uint32_t)cur >= j->n_chunks)
            return;
        if (!atomic_compare_exchange_weak(&pool->next, &cur, cur + 1))
            continue;
        uint32_t i = (uint32_t)cur;
        int64_t b = j->n * (int64_t)i / j->n_chunks;
        int64_t e = j->n * (int64_t)(i + 1) / j->n_chunks;
        j->fn(j->user, b, e);
        if (atomic_fetch_add(&pool->done, 1) + 1 == j->n_chunks) {
            pthread_mutex_lock(&pool->mu);
            pthread_cond_signal(&pool->done_cv);
            pthread_mutex_unlock(&pool->mu);
        }
    }
}

static void *worker_main(void *p) {
    struct opq_threadpool *pool = p;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        while (!pool->quit && pool->generation == seen)
            pthread_cond_wait(&pool->wake, &pool->mu);
        if (pool->quit)
            break;
        seen = pool->generation;
        struct job j = pool->job;
        pthread_mutex_unlock(&pool->mu);
        run_chunks(pool, &j);
        pthread_mutex_lock(&pool->mu);
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

struct opq_threadpool *opq_threadpool_new(struct opq_ctx *ctx, int n_threads) {
    struct opq_threadpool *pool = opq_calloc(ctx, 1, sizeof(*pool));
    if (!pool) {
        opq_set_error(ctx, OPQ_ERR_NOMEM, "thread pool: out of memory");
        return NULL;
    }
    pool->ctx = ctx;
    pool->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done_cv, NULL);
    atomic_init(&pool->next, 0);
    atomic_init(&pool->done, 0);
    int nw = pool->n_threads - 1;
    if (nw == 0)
        return pool;
    pool->workers = opq_malloc(ctx, (size_t)nw * sizeof(pthread_t));
    if (!pool->workers) {
        opq_set_error(ctx, OPQ_ERR_NOMEM, "thread pool: out of memory");
        goto out_fail;
    }
    for (int i = 0; i < nw; i++) {
        if (pthread_create(&pool->workers[i], NULL, worker_main, pool) != 0) {
            opq_set_error(ctx, OPQ_ERR_INTERNAL, "thread pool: cannot start thread %d", i + 1);
            goto out_fail;
        }
        pool->n_started++;
    }
    return pool;
out_fail:
    opq_threadpool_free(pool);
    return NULL;
}

void opq_threadpool_free(struct opq_threadpool *pool) {
    if (!pool)
        return;
    pthread_mutex_lock(&pool->mu);
    pool->quit = true;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 0; i < pool->n_started; i++)
        pthread_join(pool->workers[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done_cv);
    opq_free(pool->ctx, pool->workers);
    opq_free(pool->ctx, pool->ws);
    opq_free(pool->ctx, pool);
}

void *opq_threadpool_workspace(struct opq_threadpool *pool, size_t bytes) {
    if (!pool)
        return NULL;
    if (bytes > pool->ws_bytes) {
        opq_free(pool->ctx, pool->ws);
        pool->ws_bytes = 0;
        pool->ws = opq_malloc(pool->ctx, bytes);
        if (!pool->ws)
            return NULL;
        opq_prefault(pool->ws, bytes);
        pool->ws_bytes = bytes;
    }
    return pool->ws;
}

int opq_threadpool_size(const struct opq_threadpool *pool) {
    return pool ? pool->n_threads : 1;
}

void opq_parallel_for(struct opq_threadpool *pool, int64_t n, int64_t grain, opq_range_fn fn,
                      void *user) {
    if (n <= 0)
        return;
    if (grain < 1)
        grain = 1;
    int64_t chunks = pool ? (int64_t)pool->n_threads * CHUNKS_PER_THREAD : 1;
    if (chunks > n / grain)
        chunks = n / grain;
    if (chunks <= 1 || !pool || pool->n_threads == 1) {
        fn(user, 0, n);
        return;
    }
    pthread_mutex_lock(&pool->mu);
    pool->generation++;
    struct job j = {fn, user, n, (uint32_t)chunks, (uint32_t)pool->generation};
    pool->job = j;
    atomic_store(&pool->done, 0);
    atomic_store(&pool->next, (uint64_t)j.gen << 32);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    run_chunks(pool, &j);
    pthread_mutex_lock(&pool->mu);
    while (atomic_load(&pool->done) < j.n_chunks)
        pthread_cond_wait(&pool->done_cv, &pool->mu);
    pthread_mutex_unlock(&pool->mu);
}
