/* strmap.h: open-addressing hash map from NUL-terminated strings to pointers. Keys are borrowed
 * (the caller keeps them alive, normally in a graph arena); the table itself is heap memory. */
#ifndef OPQ_STRMAP_H
#define OPQ_STRMAP_H

#include <stddef.h>

struct opq_ctx;
struct opq_strmap;

struct opq_strmap *opq_strmap_new(struct opq_ctx *ctx);
void               opq_strmap_free(struct opq_strmap *m);
// Inserts or replaces; OPQ_OK or OPQ_ERR_NOMEM (as int to keep this header light).
int                opq_strmap_put(struct opq_strmap *m, const char *key, void *val);
void              *opq_strmap_get(const struct opq_strmap *m, const char *key);
// Removes key if present.
void               opq_strmap_del(struct opq_strmap *m, const char *key);
size_t             opq_strmap_count(const struct opq_strmap *m);

#endif
