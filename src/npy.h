/* npy.h: reading and writing NumPy .npy files (format versions 1.0, 2.0 and 3.0).
 *
 * Supported: little-endian (or byte-order free) float32, float64, uint8, int32, int64 and bool
 * arrays in C order, any rank up to OPQ_MAX_DIMS (rank 0 included). Anything else (Fortran
 * order, big-endian data, other dtypes, truncated files) is an error whose message names the
 * file and the problem. */
#ifndef OPQ_NPY_H
#define OPQ_NPY_H

#include "base.h"
#include "ir.h"

struct opq_arena;

// Reads `path` into *out (dtype FLOAT/DOUBLE/UINT8/INT32/INT64/BOOL as stored; data allocated
// from `arena`, owned by it). Errors: OPQ_ERR_IO, OPQ_ERR_PARSE, OPQ_ERR_UNSUPPORTED.
enum opq_status opq_npy_load(struct opq_ctx *ctx, struct opq_arena *arena, const char *path,
                             struct opq_tensor *out);
// Parses an in-memory .npy image (`name` is used in messages). Data is copied into `arena`.
enum opq_status opq_npy_parse(struct opq_ctx *ctx, struct opq_arena *arena, const void *buf,
                              size_t len, const char *name, struct opq_tensor *out);
// Writes t (one of the dtypes above, data and shape set) to `path` as format 1.0.
enum opq_status opq_npy_save(struct opq_ctx *ctx, const char *path, const struct opq_tensor *t);

#endif
