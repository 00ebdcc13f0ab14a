/* tensor.c: dtype sizes and names, element counts with overflow checks. */
#include <string.h>

#include "base.h"
#include "ir.h"

static const struct {
    const char *name;
    size_t      size; // bytes per element; 0 = packed 4-bit or STRING
} dtypes[OPQ_DTYPE_COUNT] = {
    [OPQ_DTYPE_UNDEF] = {"undefined", 0},          [OPQ_DTYPE_FLOAT] = {"float32", 4},
    [OPQ_DTYPE_UINT8] = {"uint8", 1},              [OPQ_DTYPE_INT8] = {"int8", 1},
    [OPQ_DTYPE_UINT16] = {"uint16", 2},            [OPQ_DTYPE_INT16] = {"int16", 2},
    [OPQ_DTYPE_INT32] = {"int32", 4},              [OPQ_DTYPE_INT64] = {"int64", 8},
    [OPQ_DTYPE_STRING] = {"string", 0},            [OPQ_DTYPE_BOOL] = {"bool", 1},
    [OPQ_DTYPE_FLOAT16] = {"float16", 2},          [OPQ_DTYPE_DOUBLE] = {"float64", 8},
    [OPQ_DTYPE_UINT32] = {"uint32", 4},            [OPQ_DTYPE_UINT64] = {"uint64", 8},
    [OPQ_DTYPE_COMPLEX64] = {"complex64", 8},      [OPQ_DTYPE_COMPLEX128] = {"complex128", 16},
    [OPQ_DTYPE_BFLOAT16] = {"bfloat16", 2},        [OPQ_DTYPE_FLOAT8E4M3FN] = {"float8e4m3fn", 1},
    [OPQ_DTYPE_FLOAT8E4M3FNUZ] = {"float8e4m3fnuz", 1},
    [OPQ_DTYPE_FLOAT8E5M2] = {"float8e5m2", 1},    [OPQ_DTYPE_FLOAT8E5M2FNUZ] = {"float8e5m2fnuz", 1},
    [OPQ_DTYPE_UINT4] = {"uint4", 0},              [OPQ_DTYPE_INT4] = {"int4", 0},
    [OPQ_DTYPE_FLOAT4E2M1] = {"float4e2m1", 0},
};

size_t opq_dtype_size(enum opq_dtype dt) {
    return ((int)dt >= 0 && dt < OPQ_DTYPE_COUNT) ? dtypes[dt].size : 0;
}

bool opq_dtype_is_packed4(enum opq_dtype dt) {
    return dt == OPQ_DTYPE_INT4 || dt == OPQ_DTYPE_UINT4 || dt == OPQ_DTYPE_FLOAT4E2M1;
}

const char *opq_dtype_name(enum opq_dtype dt) {
    return ((int)dt >= 0 && dt < OPQ_DTYPE_COUNT && dtypes[dt].name) ? dtypes[dt].name : "?";
}

bool opq_tensor_numel(const struct opq_tensor *t, size_t *out) {
    size_t n = 1;
    if (t->ndim < 0)
        return false;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0 || !opq_mul_size(n, (size_t)t->shape[i], &n))
            return false;
    }
    *out = n;
    return true;
}

bool opq_dtype_nbytes(enum opq_dtype dt, size_t numel, size_t *out) {
    if (opq_dtype_is_packed4(dt)) {
        *out = numel / 2 + (numel & 1);
        return true;
    }
    size_t sz = opq_dtype_size(dt);
    if (!sz)
        return false;
    return opq_mul_size(numel, sz, out);
}

int64_t opq_model_opset(const struct opq_model *m, const char *domain) {
    for (int i = 0; i < m->n_opsets; i++) {
        const char *d = m->opsets[i].domain ? m->opsets[i].domain : "";
        if (strcmp(d, domain) == 0 || (!domain[0] && strcmp(d, "ai.onnx") == 0))
            return m->opsets[i].version;
    }
    return 0;
}
