/* opq.h: the public API of libopq (onnx-ptq's library). The only header a program needs.
 *
 * A context (struct opq_ctx) carries the allocator, the log sink, the thread count, the seed and a
 * sticky error buffer: every call that can fail returns enum opq_status and leaves a one-line
 * message, naming the file, node or tensor at fault, in opq_ctx_errmsg(). The library never prints
 * and never exits; the CLI (tools/onnx-ptq) does.
 *
 * Ownership: objects returned through `**out` belong to the caller and are freed with the matching
 * _free(); strings returned as `const char *` are borrowed from the object that returned them. */
#ifndef OPQ_H
#define OPQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum opq_status {
    OPQ_OK                = 0,
    OPQ_ERR_NOMEM         = -1,
    OPQ_ERR_IO            = -2, // file missing, unreadable, unwritable
    OPQ_ERR_PARSE         = -3, // not a protobuf / truncated / not an ONNX model
    OPQ_ERR_INVALID_MODEL = -4, // well-formed protobuf, broken graph (undefined value, cycle...)
    OPQ_ERR_UNSUPPORTED   = -5, // op, opset, dtype or feature we do not handle
    OPQ_ERR_SHAPE         = -6, // shape or dtype mismatch
    OPQ_ERR_NUMERIC       = -7, // NaN/Inf weights, singular systems
    OPQ_ERR_INTERNAL      = -8, // a bug: please report
    OPQ_ERR_USAGE         = -9, // bad option values given to the library
};

// Static English name of a status ("shape mismatch", ...).
const char *opq_status_str(enum opq_status st);

enum opq_log_level { OPQ_LOG_ERROR = 0, OPQ_LOG_WARN = 1, OPQ_LOG_INFO = 2, OPQ_LOG_DEBUG = 3 };

typedef void (*opq_log_fn)(void *user, enum opq_log_level lvl, const char *msg);

// Allocator seam (Lua's lua_Alloc): all library memory goes through it. NULL fields = libc.
struct opq_allocator {
    void *(*malloc)(void *user, size_t n);
    void *(*realloc)(void *user, void *p, size_t n);
    void (*free)(void *user, void *p);
    void *user;
};

struct opq_ctx;

// A new context with libc allocation, no log sink, 1 thread, seed 0. NULL on out-of-memory.
struct opq_ctx *opq_ctx_new(void);
// Same with a custom allocator (copied).
struct opq_ctx *opq_ctx_new_with_allocator(const struct opq_allocator *alloc);
void            opq_ctx_free(struct opq_ctx *ctx);

// The first error message since the last clear ("" when none), and its status.
const char     *opq_ctx_errmsg(const struct opq_ctx *ctx);
enum opq_status opq_ctx_status(const struct opq_ctx *ctx);
void            opq_ctx_clear_error(struct opq_ctx *ctx);

// Messages at or below `max_level` go to fn(user, level, msg); msg has no trailing newline.
void opq_ctx_set_log(struct opq_ctx *ctx, opq_log_fn fn, void *user, enum opq_log_level max_level);
void opq_ctx_set_threads(struct opq_ctx *ctx, int n_threads);
int  opq_ctx_threads(const struct opq_ctx *ctx);
void opq_ctx_set_seed(struct opq_ctx *ctx, uint64_t seed);
uint64_t opq_ctx_seed(const struct opq_ctx *ctx);

// Progress of long phases: fn(user, phase, done, total) after each step (total may be 0 when
// unknown). The CLI draws a bar with ETA on a terminal and plain lines otherwise.
typedef void (*opq_progress_fn)(void *user, const char *phase, long done, long total);
void opq_ctx_set_progress(struct opq_ctx *ctx, opq_progress_fn fn, void *user);

// Peak bytes held through the context's allocator since creation (memory statistics).
size_t opq_ctx_peak_bytes(const struct opq_ctx *ctx);

// ---------------------------------------------------------------------------------------------
// Models: load and save

struct opq_model;

// Loads an ONNX ModelProto from `path`; external data is resolved relative to the model's folder
// and read into memory. On success *out owns everything (free with opq_model_free).
enum opq_status opq_model_load(struct opq_ctx *ctx, const char *path, struct opq_model **out);
// Same from memory. `name` is used in error messages; `base_dir` resolves external data (NULL:
// external data is an error).
enum opq_status opq_model_load_buffer(struct opq_ctx *ctx, const void *buf, size_t len,
                                      const char *name, const char *base_dir,
                                      struct opq_model **out);
void            opq_model_free(struct opq_model *model);

struct opq_save_opts {
    bool        external_data;      // weights to a side file (`external_name`, next to the model)
    const char *external_name;      // NULL: "<model file name>.data"
    size_t      external_min_bytes; // tensors smaller than this stay inline (0: default 1024)
};

// Writes the model to `path` via a temporary file in the same folder and an atomic rename, so a
// failure leaves no partial output. A model whose protobuf would pass 2 GiB is written with
// external data automatically (a notice is logged). opts may be NULL (defaults).
enum opq_status opq_model_save(struct opq_ctx *ctx, const struct opq_model *model, const char *path,
                               const struct opq_save_opts *opts);
// Serializes to memory (inline data only). *buf is allocated with the context's allocator and
// freed by the caller with opq_buffer_free().
enum opq_status opq_model_save_buffer(struct opq_ctx *ctx, const struct opq_model *model,
                                      void **buf, size_t *len);
void            opq_buffer_free(struct opq_ctx *ctx, void *buf);
// A deep copy through a serialize/parse round trip in memory (so models past protobuf's 2 GiB
// limit are refused like opq_model_save_buffer). The caller frees *out with opq_model_free.
enum opq_status opq_model_clone(struct opq_ctx *ctx, const struct opq_model *model,
                                struct opq_model **out);

#ifdef __cplusplus
}
#endif
#endif
