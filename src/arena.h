/* arena.h: chunked bump allocator. One arena owns all IR metadata and tensor data of a graph;
 * nothing inside it is freed one by one, opq_arena_free() releases every chunk (O(chunks)). */
#ifndef OPQ_ARENA_H
#define OPQ_ARENA_H

#include <stddef.h>

struct opq_ctx;
struct opq_arena;

// Creates an arena whose chunks come from ctx's allocator (ctx may be NULL: plain malloc).
// Returns NULL on out-of-memory. Caller frees with opq_arena_free().
struct opq_arena *opq_arena_new(struct opq_ctx *ctx);
void              opq_arena_free(struct opq_arena *a);
// Drops every allocation but keeps the first chunk for reuse.
void              opq_arena_reset(struct opq_arena *a);
// Drops every allocation but keeps all chunks, reused by later allocations that fit (for
// arenas refilled with the same sizes again and again, e.g. executor tapes: no malloc, no
// page faults after the first round).
void              opq_arena_rewind(struct opq_arena *a);

// 64-byte aligned, zero-filled memory owned by the arena; NULL on out-of-memory.
void *opq_arena_alloc(struct opq_arena *a, size_t n);
// Same, without zero-filling (for buffers the caller overwrites at once, e.g. weights).
void *opq_arena_alloc_raw(struct opq_arena *a, size_t n);
// Arena copies: NULL in gives NULL out (strdup) / n == 0 gives a valid empty block (memdup).
char *opq_arena_strdup(struct opq_arena *a, const char *s);
char *opq_arena_strndup(struct opq_arena *a, const char *s, size_t n);
void *opq_arena_memdup(struct opq_arena *a, const void *p, size_t n);
// Bytes handed out so far (for memory statistics).
size_t opq_arena_used(const struct opq_arena *a);

#endif
