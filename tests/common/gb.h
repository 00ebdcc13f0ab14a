/* gb.h: a tiny graph builder for tests. Builds an opq_model through the graph API (graph.h) so
 * that tests never touch producer/users fields. Values are named; they are created on first
 * mention. Every function fails the running cmocka test (fail_msg) on error instead of returning
 * a status, so test bodies stay short:
 *
 *     struct opq_model *m = gb_new(ctx);
 *     gb_input(m, "x", OPQ_DTYPE_FLOAT, GB_SHAPE(1, 4));
 *     gb_init_f32(m, "w", GB_SHAPE(4, 2), (const float[]){1, 2, 3, 4, 5, 6, 7, 8});
 *     struct opq_node *mm = gb_node(m, "MatMul", "x,w", "y");
 *     gb_output(m, "y");
 *     gb_verify(m);                                   // opq_graph_verify must pass
 *     ...
 *     opq_model_free(m);
 *
 * Name lists are comma separated; an empty entry is an omitted optional input/output ("x,,z").
 * Returned pointers are owned by the model. */
#ifndef OPQ_TEST_GB_H
#define OPQ_TEST_GB_H

#include <stdint.h>

#include "graph.h"

// Expands to `ndim, shape` arguments: GB_SHAPE(2, 3) -> 2, (const int64_t[]){2, 3}.
// Use GB_SCALAR for rank 0.
#define GB_SHAPE(...)                                                                             \
    (int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (const int64_t[]) {          \
        __VA_ARGS__                                                                               \
    }
#define GB_SCALAR 0, NULL

// A new empty model: ir_version 8, producer "gb", default-domain opset 17.
struct opq_model *gb_new(struct opq_ctx *ctx);
// Sets the default-domain ("") opset version.
void gb_set_opset(struct opq_model *m, int64_t version);

// Graph input with dtype and shape (dims < 0 are unknown). Returns the value.
struct opq_value *gb_input(struct opq_model *m, const char *name, enum opq_dtype dt, int ndim,
                           const int64_t *shape);
// Initializer holding a copy of `data` (numel * dtype size bytes).
struct opq_value *gb_init(struct opq_model *m, const char *name, enum opq_dtype dt, int ndim,
                          const int64_t *shape, const void *data);
struct opq_value *gb_init_f32(struct opq_model *m, const char *name, int ndim,
                              const int64_t *shape, const float *data);
struct opq_value *gb_init_i64(struct opq_model *m, const char *name, int ndim,
                              const int64_t *shape, const int64_t *data);
// Sets dtype/shape of a (typically intermediate) value, creating it if needed.
struct opq_value *gb_shape(struct opq_model *m, const char *name, enum opq_dtype dt, int ndim,
                           const int64_t *shape);

// Appends a default-domain node; its name is "<op_type>_<index>". inputs/outputs: "a,b".
struct opq_node *gb_node(struct opq_model *m, const char *op_type, const char *inputs,
                         const char *outputs);
// Same with an explicit domain and node name.
struct opq_node *gb_node_full(struct opq_model *m, const char *domain, const char *op_type,
                              const char *name, const char *inputs, const char *outputs);

// Attributes (copied into the model's arena).
void gb_attr_int(struct opq_model *m, struct opq_node *n, const char *name, int64_t v);
void gb_attr_float(struct opq_model *m, struct opq_node *n, const char *name, float v);
void gb_attr_string(struct opq_model *m, struct opq_node *n, const char *name, const char *v);
void gb_attr_ints(struct opq_model *m, struct opq_node *n, const char *name, int count,
                  const int64_t *v);
void gb_attr_floats(struct opq_model *m, struct opq_node *n, const char *name, int count,
                    const float *v);

// Marks an existing value as a graph output.
struct opq_value *gb_output(struct opq_model *m, const char *name);
// The value named `name`; fails the test if absent.
struct opq_value *gb_value(struct opq_model *m, const char *name);
// The number of live nodes with this op_type.
int gb_count_op(const struct opq_model *m, const char *op_type);
// Asserts opq_graph_verify() succeeds (prints the message otherwise).
void gb_verify(struct opq_model *m);

#endif
