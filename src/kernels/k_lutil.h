/* k_lutil.h: helpers shared by the shape/layout/logic/cast/einsum/QDQ kernel files (k_lutil.c).
 *
 * Element access by dtype, int-list reading from shape tensors, numpy broadcasting of any number
 * of inputs, and the error helpers every kernel uses so messages name the op and the node.
 * Internal to src/kernels; nothing here allocates except through the scratch arena given. */
#ifndef OPQ_K_LUTIL_H
#define OPQ_K_LUTIL_H

#include "kernel.h"

// "<op_type> '<name>'" for messages; nameless nodes are named by their first output.
#define OPQ_KL_NODE_FMT "%s '%s'"
#define OPQ_KL_NODE(n)  (n)->op_type, opq_kl_label(n)

const char *opq_kl_label(const struct opq_node *n);

// Element count of a tensor whose shape is fully known (0 if any dim is unknown).
size_t opq_kl_numel(const struct opq_tensor *t);
// Sets t->nbytes from dtype and shape (0 when a dim is unknown). Returns false on overflow.
bool opq_kl_set_nbytes(struct opq_tensor *t);
// Finishes infer for out: sets nbytes, OPQ_ERR_SHAPE naming the node on overflow.
enum opq_status opq_kl_finish(struct opq_kctx *k, const struct opq_node *n, struct opq_tensor *out);

// Fails with OPQ_ERR_UNSUPPORTED naming the node when `t` (a shape-like input) has no data yet.
enum opq_status opq_kl_need_data(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *t, const char *what);
// Copies the integer elements (int32/int64/int8/uint8/int16/bool) of t into dst[0..max).
// *count receives numel. Errors (wrong dtype, too many) name the node and `what`.
enum opq_status opq_kl_read_ints(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *t, const char *what, int64_t *dst,
                                 size_t max, size_t *count);
// Same for a list attribute of ints (absent: *count = 0, returns OPQ_OK, *present = false).
enum opq_status opq_kl_attr_ints(struct opq_kctx *k, const struct opq_node *n, const char *name,
                                 int64_t *dst, size_t max, size_t *count, bool *present);

bool opq_kl_dtype_is_int(enum opq_dtype dt);   // integer or bool, non-packed
bool opq_kl_dtype_is_float(enum opq_dtype dt); // float32/float16/bfloat16/double
// Element i of a non-packed numeric tensor buffer, as int64 or double.
int64_t opq_kl_get_i64(const void *p, enum opq_dtype dt, size_t i);
double  opq_kl_get_f64(const void *p, enum opq_dtype dt, size_t i);
// Stores v as element i: float16/bfloat16 round to nearest even, floating values stored to
// integers truncate toward zero, int64 values stored to narrower integers wrap (C casts).
void opq_kl_set_f64(void *p, enum opq_dtype dt, size_t i, double v);
void opq_kl_set_i64(void *p, enum opq_dtype dt, size_t i, int64_t v);
uint16_t opq_kl_f32_to_f16(float f);
float    opq_kl_f16_to_f32(uint16_t h);
uint16_t opq_kl_f32_to_bf16(float f);
float    opq_kl_bf16_to_f32(uint16_t h);

// Broadcasting: strides (in elements) of `t` seen through output shape `oshape` of rank `ndim`
// (0 for broadcast dimensions), right-aligned like numpy.
void opq_kl_bstrides(const struct opq_tensor *t, int ndim, const int64_t *oshape, int64_t *strides);
// Numpy broadcast of n shapes into out (ndim/shape only). OPQ_ERR_SHAPE naming the node.
enum opq_status opq_kl_broadcast(struct opq_kctx *k, const struct opq_node *n,
                                 const struct opq_tensor *const *ts, int count,
                                 struct opq_tensor *out);
// Odometer over an output shape with up to 3 strided inputs: call opq_kl_iter_next after each
// element; off[j] holds the current element offset of input j.
struct opq_kl_iter {
    int     ndim;
    int     n_in;
    int64_t shape[OPQ_MAX_DIMS];
    int64_t idx[OPQ_MAX_DIMS];
    int64_t strides[3][OPQ_MAX_DIMS];
    int64_t off[3];
};
void opq_kl_iter_init(struct opq_kl_iter *it, int ndim, const int64_t *shape, int n_in,
                      const struct opq_tensor *const *ins);
void opq_kl_iter_next(struct opq_kl_iter *it);

// Row-major strides (elements) of a shape.
void opq_kl_strides(int ndim, const int64_t *shape, int64_t *strides);
// Writes zeros to a gradient buffer, or copies `src` when it has data (dout may be NULL data).
void opq_kl_copy_or_zero(struct opq_tensor *dst, const struct opq_tensor *src);

#endif
