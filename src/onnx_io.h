/* onnx_io.h: internal entry points of onnx_io.c beyond the public load/save in opq.h. */
#ifndef OPQ_ONNX_IO_H
#define OPQ_ONNX_IO_H

#include "base.h"
#include "ir.h"

struct opq_arena;

// Reads one serialized TensorProto file (ONNX test data: test_data_set_*/input_0.pb) into *out,
// with its data copied into `arena` in the IR's dense representation. *name (optional) receives
// the tensor's name, arena-owned ("" if none). Errors name the file.
enum opq_status opq_tensor_load_pb(struct opq_ctx *ctx, struct opq_arena *arena, const char *path,
                                   struct opq_tensor *out, const char **name);

// Test hook: the serialized size above which opq_model_save switches to external data and
// opq_model_save_buffer refuses (default and 0: 2 GiB - 1, protobuf's limit).
void opq_io_set_inline_limit(size_t bytes);

#endif
