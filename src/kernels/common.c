/* common.c: shape helpers shared by the kernels (declared in kernel.h). */
#include "kernel.h"

enum opq_status opq_broadcast_shape(const struct opq_tensor *a, const struct opq_tensor *b,
                                    struct opq_tensor *out) {
    if (a->ndim < 0 || b->ndim < 0)
        return OPQ_ERR_SHAPE;
    int r = a->ndim > b->ndim ? a->ndim : b->ndim;
    int64_t shape[OPQ_MAX_DIMS];
    for (int i = 0; i < r; i++) {
        int ia = i - (r - a->ndim);
        int ib = i - (r - b->ndim);
        int64_t da = ia >= 0 ? a->shape[ia] : 1;
        int64_t db = ib >= 0 ? b->shape[ib] : 1;
        if (da == db || db == 1)
            shape[i] = da;
        else if (da == 1)
            shape[i] = db;
        else
            return OPQ_ERR_SHAPE;
    }
    out->ndim = r;
    for (int i = 0; i < r; i++)
        out->shape[i] = shape[i];
    return OPQ_OK;
}

bool opq_tensor_set_nbytes(struct opq_tensor *t) {
    size_t n = 0;
    size_t bytes = 0;
    if (!opq_tensor_numel(t, &n) || !opq_dtype_nbytes(t->dtype, n, &bytes))
        return false;
    t->nbytes = bytes;
    return true;
}

bool opq_axis_norm(int64_t axis, int rank, int *out) {
    if (axis < -(int64_t)rank || axis >= (int64_t)rank)
        return false;
    *out = (int)(axis < 0 ? axis + rank : axis);
    return true;
}
