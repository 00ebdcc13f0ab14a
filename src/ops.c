/* ops.c: op name tables built from ops.def, and a binary-search lookup by op_type. */
#include "ops.h"

#include <stdlib.h>
#include <string.h>

#include "base.h"

static const char *const op_names[OPQ_OP_COUNT] = { // ORDER: ops.def
    [OPQ_OP_UNKNOWN] = "?",
#define OPQ_OP(tag, name, prefix) [OPQ_OP_##tag] = name,
#include "ops.def"
#undef OPQ_OP
};

const char *opq_op_name(enum opq_op op) {
    return (op > OPQ_OP_UNKNOWN && op < OPQ_OP_COUNT) ? op_names[op] : "?";
}

enum opq_op opq_op_from_type(const char *domain, const char *op_type) {
    if (!op_type)
        return OPQ_OP_UNKNOWN;
    if (domain && domain[0] && strcmp(domain, "ai.onnx") != 0)
        return OPQ_OP_UNKNOWN;
    // ~60 ops: a linear scan costs nothing next to loading a model, and stays obviously right.
    for (int i = 1; i < OPQ_OP_COUNT; i++)
        if (strcmp(op_names[i], op_type) == 0)
            return (enum opq_op)i;
    return OPQ_OP_UNKNOWN;
}
