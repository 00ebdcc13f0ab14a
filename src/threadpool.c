/* threadpool.c: persistent workers woken by a condition variable per job (see threadpool.h). */
#include "threadpool.h"

#include <pthread.h>

#include "base.h"

struct opq_threadpool {
    struct opq_ctx *ctx;
    int             n_threads;
    pthread_t      *workers; // n_threads - 1
    int             n_started;
    pthread_mutex_t mu;
    pthread_cond_t  wake;
    pthread_cond_t  done;
    uint64_t        generation; // bumped per job
    int             pending;    // workers still running the current job
    bool            quit;
    // current job
    opq_range_fn fn;
    void        *user;
    int64_t      n;
    int          n_chunks;
};

struct worker_arg {
    struct opq_threadpool *pool;
    int                    id; // 1..n_threads-1
};

static void chunk_bounds(int64_t n, int n_chunks, int i, int64_t *b, int64_t *e) {
    *b = n * i / n_chunks;
    *e = n * (i + 1) / n_chunks;
}

static void *worker_main(void *p) {
    struct opq_threadpool *pool = ((struct worker_arg *)p)->pool;
    int                    id   = ((struct worker_arg *)p)->id;
    uint64_t               seen = 0;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        while (!pool->quit && pool->generation == seen)
            pthread_cond_wait(&pool->wake, &pool->mu);
        if (pool->quit)
            break;
        seen = pool->generation;
        if (id < pool->n_chunks) {
            opq_range_fn fn   = pool->fn;
            void        *user = pool->user;
            int64_t      b;
            int64_t      e;
            chunk_bounds(pool->n, pool->n_chunks, id, &b, &e);
            pthread_mutex_unlock(&pool->mu);
            fn(user, b, e);
            pthread_mutex_lock(&pool->mu);
            if (--pool->pending == 0)
                pthread_cond_signal(&pool->done);
        }
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

// Worker args live right after the pthread_t array, in the same allocation.
struct opq_threadpool *opq_threadpool_new(struct opq_ctx *ctx, int n_threads) {
    struct opq_threadpool *pool = opq_calloc(ctx, 1, sizeof(*pool));
    if (!pool) {
        opq_set_error(ctx, OPQ_ERR_NOMEM, "thread pool: out of memory");
        return NULL;
    }
    pool->ctx       = ctx;
    pool->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    int nw = pool->n_threads - 1;
    if (nw == 0)
        return pool;
    size_t bytes = (size_t)nw * (sizeof(pthread_t) + sizeof(struct worker_arg));
    pool->workers = opq_malloc(ctx, bytes);
    if (!pool->workers) {
        opq_set_error(ctx, OPQ_ERR_NOMEM, "thread pool: out of memory");
        goto out_fail;
    }
    struct worker_arg *args = (struct worker_arg *)(pool->workers + nw);
    for (int i = 0; i < nw; i++) {
        args[i].pool = pool;
        args[i].id   = i + 1;
        if (pthread_create(&pool->workers[i], NULL, worker_main, &args[i]) != 0) {
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
    pthread_cond_destroy(&pool->done);
    opq_free(pool->ctx, pool->workers);
    opq_free(pool->ctx, pool);
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
    int64_t chunks = pool ? pool->n_threads : 1;
    if (chunks > n / grain)
        chunks = n / grain;
    if (chunks <= 1) {
        fn(user, 0, n);
        return;
    }
    pthread_mutex_lock(&pool->mu);
    pool->fn       = fn;
    pool->user     = user;
    pool->n        = n;
    pool->n_chunks = (int)chunks;
    pool->pending  = (int)chunks - 1;
    pool->generation++;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    int64_t b;
    int64_t e;
    chunk_bounds(n, (int)chunks, 0, &b, &e);
    fn(user, b, e);
    pthread_mutex_lock(&pool->mu);
    while (pool->pending > 0)
        pthread_cond_wait(&pool->done, &pool->mu);
    pthread_mutex_unlock(&pool->mu);
}
