/* strmap.c: linear-probing hash map with tombstones (FNV-1a hash). */
#include "strmap.h"

#include <stdint.h>
#include <string.h>

#include "base.h"

struct slot {
    const char *key; // NULL = empty, TOMB = deleted
    void       *val;
};

struct opq_strmap {
    struct opq_ctx *ctx;
    struct slot    *slots;
    size_t          cap, count, used; // used = count + tombstones
};

static const char tomb_marker;
#define TOMB (&tomb_marker)

static uint64_t hash(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

struct opq_strmap *opq_strmap_new(struct opq_ctx *ctx) {
    struct opq_strmap *m = opq_calloc(ctx, 1, sizeof(*m));
    if (!m)
        return NULL;
    m->ctx   = ctx;
    m->cap   = 64;
    m->slots = opq_calloc(ctx, m->cap, sizeof(*m->slots));
    if (!m->slots) {
        opq_free(ctx, m);
        return NULL;
    }
    return m;
}

void opq_strmap_free(struct opq_strmap *m) {
    if (!m)
        return;
    opq_free(m->ctx, m->slots);
    opq_free(m->ctx, m);
}

static struct slot *find(const struct opq_strmap *m, const char *key) {
    size_t mask = m->cap - 1;
    for (size_t i = hash(key) & mask;; i = (i + 1) & mask) {
        struct slot *s = &m->slots[i];
        if (!s->key)
            return s;
        if (s->key != TOMB && strcmp(s->key, key) == 0)
            return s;
    }
}

static int grow(struct opq_strmap *m) {
    size_t       ncap = m->cap * 2;
    struct slot *old  = m->slots;
    size_t       ocap = m->cap;
    struct slot *ns   = opq_calloc(m->ctx, ncap, sizeof(*ns));
    if (!ns)
        return OPQ_ERR_NOMEM;
    m->slots = ns;
    m->cap   = ncap;
    m->used  = m->count;
    for (size_t i = 0; i < ocap; i++)
        if (old[i].key && old[i].key != TOMB)
            *find(m, old[i].key) = old[i];
    opq_free(m->ctx, old);
    return OPQ_OK;
}

int opq_strmap_put(struct opq_strmap *m, const char *key, void *val) {
    if ((m->used + 1) * 4 >= m->cap * 3 && grow(m) != OPQ_OK)
        return OPQ_ERR_NOMEM;
    struct slot *s = find(m, key);
    if (!s->key) {
        m->count++;
        m->used++;
        s->key = key;
    }
    s->val = val;
    return OPQ_OK;
}

void *opq_strmap_get(const struct opq_strmap *m, const char *key) {
    struct slot *s = find(m, key);
    return s->key ? s->val : NULL;
}

void opq_strmap_del(struct opq_strmap *m, const char *key) {
    struct slot *s = find(m, key);
    if (s->key) {
        s->key = TOMB;
        s->val = NULL;
        m->count--;
    }
}

size_t opq_strmap_count(const struct opq_strmap *m) {
    return m->count;
}
