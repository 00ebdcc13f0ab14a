/* arena.c: chunked bump allocator (see arena.h). Large requests get a chunk of their own so
 * that a big initializer does not waste the remainder of a regular chunk. */
#include "arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base.h"

#define ARENA_ALIGN 64
#define ARENA_CHUNK (1u << 20)

struct chunk {
    struct chunk *next;
    size_t        size; // usable bytes after the header
    size_t        used;
    // data follows, aligned
};

struct opq_arena {
    struct opq_ctx *ctx;
    struct chunk   *head;
    struct chunk   *spare; // chunks kept by opq_arena_rewind for reuse
    size_t          total;
};

static size_t header_size(void) {
    return (sizeof(struct chunk) + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
}

static unsigned char *chunk_data(struct chunk *c) {
    return (unsigned char *)c + header_size();
}

struct opq_arena *opq_arena_new(struct opq_ctx *ctx) {
    struct opq_arena *a = opq_calloc(ctx, 1, sizeof(*a));
    if (!a)
        return NULL;
    a->ctx = ctx;
    return a;
}

static void free_list(struct opq_arena *a, struct chunk *c) {
    while (c) {
        struct chunk *n = c->next;
        opq_free(a->ctx, c);
        c = n;
    }
}

void opq_arena_free(struct opq_arena *a) {
    if (!a)
        return;
    free_list(a, a->head);
    free_list(a, a->spare);
    opq_free(a->ctx, a);
}

void opq_arena_rewind(struct opq_arena *a) {
    if (!a || !a->head)
        return;
    struct chunk *c = a->head->next;
    while (c) {
        struct chunk *n = c->next;
        c->next  = a->spare;
        a->spare = c;
        c        = n;
    }
    a->head->next = NULL;
    a->head->used = 0;
    a->total      = 0;
}

void opq_arena_reset(struct opq_arena *a) {
    if (!a || !a->head)
        return;
    struct chunk *c = a->head->next;
    while (c) {
        struct chunk *n = c->next;
        opq_free(a->ctx, c);
        c = n;
    }
    a->head->next = NULL;
    a->head->used = 0;
    a->total      = 0;
}

static struct chunk *chunk_new(struct opq_arena *a, size_t size) {
    // a spare chunk from opq_arena_rewind: the smallest that fits
    struct chunk **best = NULL;
    for (struct chunk **pp = &a->spare; *pp; pp = &(*pp)->next)
        if ((*pp)->size >= size && (!best || (*pp)->size < (*best)->size))
            best = pp;
    if (best) {
        struct chunk *c = *best;
        *best           = c->next;
        c->next         = NULL;
        c->used         = 0;
        return c;
    }
    size_t bytes;
    if (!opq_add_size(header_size(), size, &bytes) || !opq_add_size(bytes, ARENA_ALIGN, &bytes))
        return NULL;
    // The allocator gives no 64-byte promise: each chunk keeps ARENA_ALIGN bytes of slack and
    // every allocation is aligned up explicitly inside it.
    void *raw = opq_malloc(a->ctx, bytes);
    if (!raw)
        return NULL;
    if (size > ARENA_CHUNK)
        opq_prefault(raw, bytes); // a dedicated chunk: one big block, written soon
    struct chunk *c = raw;
    c->next         = NULL;
    c->size         = size;
    c->used         = 0;
    return c;
}

static void *arena_take(struct opq_arena *a, size_t n) {
    if (n == 0)
        n = 1;
    size_t need;
    if (!opq_add_size(n, ARENA_ALIGN - 1, &need))
        return NULL;
    need &= ~(size_t)(ARENA_ALIGN - 1);
    struct chunk *c = a->head;
    if (!c || c->size - c->used < need + ARENA_ALIGN) {
        size_t size = need + ARENA_ALIGN > ARENA_CHUNK ? need + ARENA_ALIGN : ARENA_CHUNK;
        struct chunk *nc = chunk_new(a, size);
        if (!nc)
            return NULL;
        if (c && size > ARENA_CHUNK) {
            // a dedicated chunk: keep the current head for small allocations
            nc->next = c->next;
            c->next  = nc;
            c        = nc;
        } else {
            nc->next = c;
            a->head  = nc;
            c        = nc;
        }
    }
    uintptr_t base = (uintptr_t)chunk_data(c) + c->used;
    uintptr_t p    = (base + ARENA_ALIGN - 1) & ~(uintptr_t)(ARENA_ALIGN - 1);
    size_t    pad  = (size_t)(p - base);
    c->used += pad + need;
    a->total += need;
    return (void *)p;
}

void *opq_arena_alloc(struct opq_arena *a, size_t n) {
    void *p = arena_take(a, n);
    if (p)
        memset(p, 0, n);
    return p;
}

void *opq_arena_alloc_raw(struct opq_arena *a, size_t n) {
    return arena_take(a, n);
}

char *opq_arena_strndup(struct opq_arena *a, const char *s, size_t n) {
    if (!s)
        return NULL;
    char *d = arena_take(a, n + 1);
    if (!d)
        return NULL;
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *opq_arena_strdup(struct opq_arena *a, const char *s) {
    return s ? opq_arena_strndup(a, s, strlen(s)) : NULL;
}

void *opq_arena_memdup(struct opq_arena *a, const void *p, size_t n) {
    void *d = arena_take(a, n);
    if (d && n)
        memcpy(d, p, n);
    return d;
}

size_t opq_arena_used(const struct opq_arena *a) {
    return a ? a->total : 0;
}
