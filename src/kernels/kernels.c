/* kernels.c: the op -> kernel table, built from ops.def (STYLE 8.4).
 *
 * Every ops.def line has exactly one `opq_kernel_<prefix>` defined in some k_*.c file; the
 * static_assert below catches a table that drifted from the enum. */
#include <assert.h>

#include "kernel.h"

static const struct opq_kernel *const kernels[] = {
    // ORDER: ops.def
    [OPQ_OP_UNKNOWN] = NULL,
#define OPQ_OP(tag, name, prefix) [OPQ_OP_##tag] = &opq_kernel_##prefix,
#include "ops.def"
#undef OPQ_OP
};

static_assert(ARRAY_SIZE(kernels) == OPQ_OP_COUNT, "kernel table out of sync with ops.def");

const struct opq_kernel *opq_kernel_for(enum opq_op op) {
    if ((int)op <= OPQ_OP_UNKNOWN || op >= OPQ_OP_COUNT)
        return NULL;
    return kernels[op];
}
