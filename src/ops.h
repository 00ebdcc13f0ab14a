/* ops.h: the operator enum, expanded from ops.def, and op_type <-> enum lookup. */
#ifndef OPQ_OPS_H
#define OPQ_OPS_H

enum opq_op {
    OPQ_OP_UNKNOWN = 0,
#define OPQ_OP(tag, name, prefix) OPQ_OP_##tag,
#include "ops.def"
#undef OPQ_OP
    OPQ_OP_COUNT
};

// Enum of a default-domain ("" or "ai.onnx") op type; OPQ_OP_UNKNOWN for anything else.
enum opq_op opq_op_from_type(const char *domain, const char *op_type);
// ONNX op_type of an op ("?" for OPQ_OP_UNKNOWN).
const char *opq_op_name(enum opq_op op);

#endif
