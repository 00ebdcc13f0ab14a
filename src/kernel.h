/* kernel.h: the contract between the executor and op kernels (STYLE 8.4).
 *
 * Every op in ops.def has one `const struct opq_kernel opq_kernel_<prefix>` defined in
 * src/kernels/k_<file>.c (families may share a file). The executor (exec.c) owns all buffers:
 *   - parse    digests attributes once into node->params (allocate from g->arena). Validates
 *              attributes; errors name the node. May be NULL (no attributes).
 *   - infer    fills out[i].dtype/ndim/shape from the inputs. Inputs that are constant or were
 *              computed at plan time (shape arithmetic) have .data set; others have data == NULL,
 *              so data-dependent ops (Reshape, Expand, Slice with input starts...) read in[k]->data
 *              and fail with OPQ_ERR_UNSUPPORTED naming the node if it is NULL.
 *   - forward  computes outputs into out[i].data (allocated by the executor to out[i].nbytes
 *              as given by infer). Missing optional inputs are NULL pointers in `in`; outputs the
 *              graph omits have out[i].data == NULL and must be skipped.
 *   - backward vector-Jacobian product: given the forward inputs/outputs and dout (gradient of
 *              the loss w.r.t. each output; NULL data = zero), it WRITES (not accumulates)
 *              din[i] for every input whose din[i].data != NULL (the executor sums over multiple
 *              users). Weights are ordinary inputs, so weight gradients come out the same way.
 *              NULL = not differentiable. A kernel with `backward_adds` set may instead be
 *              told (bit i of k->din_add) that din[i] already holds the gradient from the other
 *              users: it then ADDS its contribution, element by element as din[i] + c (the
 *              bytes the executor's own sum would give), and touches only the elements it
 *              contributes to (a slice, a row maximum).
 * All float compute is float32; reductions accumulate in double or pairwise. Kernels never see
 * protobuf types and never print; errors go through opq_set_error(k->ctx, ...) naming the node. */
#ifndef OPQ_KERNEL_H
#define OPQ_KERNEL_H

#include "base.h"
#include "ir.h"

struct opq_arena;
struct opq_threadpool;

// What a kernel may use while running.
struct opq_kctx {
    struct opq_ctx   *ctx;
    struct opq_arena *scratch;   // reset by the executor after every node: temporary buffers
    int               n_threads; // >= 1
    int64_t           opset;     // default-domain opset of the model
    struct opq_threadpool *pool; // n_threads workers for opq_parallel_for (NULL: run inline)
    uint32_t          din_add;   // backward: bit i set = add into din[i] (see backward_adds)
};

struct opq_kernel {
    int min_opset; // model opsets below this: OPQ_ERR_UNSUPPORTED at plan time (0 = any)
    enum opq_status (*parse)(struct opq_kctx *k, struct opq_graph *g, struct opq_node *n);
    enum opq_status (*infer)(struct opq_kctx *k, const struct opq_node *n,
                             const struct opq_tensor *const *in, struct opq_tensor *out);
    enum opq_status (*forward)(struct opq_kctx *k, const struct opq_node *n,
                               const struct opq_tensor *const *in, struct opq_tensor *out);
    enum opq_status (*backward)(struct opq_kctx *k, const struct opq_node *n,
                                const struct opq_tensor *const *in, const struct opq_tensor *out,
                                const struct opq_tensor *dout, struct opq_tensor *din);
    bool backward_adds; // backward honours k->din_add (else the executor sums gradients)
};

// One extern per ops.def line (ORDER: ops.def); opq_kernel_for() indexes the table in kernels.c.
#define OPQ_OP(tag, name, prefix) extern const struct opq_kernel opq_kernel_##prefix;
#include "ops.def"
#undef OPQ_OP

const struct opq_kernel *opq_kernel_for(enum opq_op op);

// Shape helpers shared by kernels (kernels/common.c).
// Multidirectional (numpy) broadcast of a and b into out; OPQ_ERR_SHAPE if incompatible.
enum opq_status opq_broadcast_shape(const struct opq_tensor *a, const struct opq_tensor *b,
                                    struct opq_tensor *out);
// Sets out->nbytes from dtype and shape (false on overflow/unknown dims).
bool opq_tensor_set_nbytes(struct opq_tensor *t);
// Normalises an axis in [-r, r-1] to [0, r-1]; false if out of range.
bool opq_axis_norm(int64_t axis, int rank, int *out);

#endif
