/* ir.h: onnx-ptq's in-memory graph IR. Internal (the public API is opq.h).
 *
 * DIMENSIONS ARE IN ONNX ORDER: shape[0] is the outermost dimension (the batch for activations),
 * shape[ndim-1] the innermost, contiguous one. Tensors are dense and row-major; there are no
 * strides anywhere in the IR or the executor.
 *
 * Ownership: one arena per model (model->arena == graph->arena) owns every node, value, name,
 * attribute and tensor byte, including initializers copied out of the protobuf and the weights
 * passes create. Nothing here is freed one by one; opq_model_free() drops the arena.
 *
 * Structure is changed only through graph.c, which keeps value->producer and value->users right by
 * construction (STYLE 8.5). Protobuf types never appear here: what the IR does not model is kept
 * by onnx_io.c behind the opaque `struct opq_pb_extra` pointers and re-emitted verbatim on save. */
#ifndef OPQ_IR_H
#define OPQ_IR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ops.h"

#define OPQ_MAX_DIMS 8 // ViT needs <= 5 (the qkv reshape); deeper ranks are refused at load

// Values equal ONNX TensorProto.DataType, so conversion is a cast. INT4/UINT4/FLOAT4E2M1 are
// stored packed two per byte, low nibble first, exactly as in ONNX raw_data.
enum opq_dtype {
    OPQ_DTYPE_UNDEF          = 0,
    OPQ_DTYPE_FLOAT          = 1,
    OPQ_DTYPE_UINT8          = 2,
    OPQ_DTYPE_INT8           = 3,
    OPQ_DTYPE_UINT16         = 4,
    OPQ_DTYPE_INT16          = 5,
    OPQ_DTYPE_INT32          = 6,
    OPQ_DTYPE_INT64          = 7,
    OPQ_DTYPE_STRING         = 8,
    OPQ_DTYPE_BOOL           = 9,
    OPQ_DTYPE_FLOAT16        = 10,
    OPQ_DTYPE_DOUBLE         = 11,
    OPQ_DTYPE_UINT32         = 12,
    OPQ_DTYPE_UINT64         = 13,
    OPQ_DTYPE_COMPLEX64      = 14,
    OPQ_DTYPE_COMPLEX128     = 15,
    OPQ_DTYPE_BFLOAT16       = 16,
    OPQ_DTYPE_FLOAT8E4M3FN   = 17,
    OPQ_DTYPE_FLOAT8E4M3FNUZ = 18,
    OPQ_DTYPE_FLOAT8E5M2     = 19,
    OPQ_DTYPE_FLOAT8E5M2FNUZ = 20,
    OPQ_DTYPE_UINT4          = 21,
    OPQ_DTYPE_INT4           = 22,
    OPQ_DTYPE_FLOAT4E2M1     = 23,
    OPQ_DTYPE_COUNT
};

// A length-delimited byte string (ONNX `bytes`/`string` fields; not NUL-terminated).
struct opq_bytes {
    size_t   len;
    uint8_t *data;
};

// Round-trip data onnx_io.c keeps for a message (unknown fields, fields the IR does not model).
struct opq_pb_extra;

struct opq_tensor {
    enum opq_dtype dtype;
    int            ndim;                 // -1: rank unknown (no shape in the model)
    int64_t        shape[OPQ_MAX_DIMS];  // -1: unknown or symbolic dimension
    void          *data;                 // NULL while only the shape is known.
                                         // STRING tensors: struct opq_bytes[numel].
    size_t         nbytes;               // bytes at data
};

enum opq_value_kind {
    OPQ_VK_INPUT  = 1u << 0, // listed in graph.input
    OPQ_VK_OUTPUT = 1u << 1, // listed in graph.output
    OPQ_VK_INIT   = 1u << 2, // an initializer (t.data holds it)
    OPQ_VK_INFO   = 1u << 3, // listed in graph.value_info
    OPQ_VK_PARAM  = 1u << 4, // a trainable parameter during reconstruction
};

// An SSA edge: one ONNX value name.
struct opq_value {
    const char         *name;                    // interned in the graph arena
    struct opq_tensor   t;                       // dtype/shape (+ data for initializers)
    const char         *dim_param[OPQ_MAX_DIMS]; // symbolic dim names, NULL where none
    struct opq_node    *producer;                // NULL for graph inputs and initializers
    struct opq_node   **users;                   // maintained by graph.c only; one entry per
    int                 n_users, cap_users;      //   (node, input slot) use
    uint32_t            kind;                    // enum opq_value_kind bits
    int                 index;                   // position in graph->values
    struct opq_pb_extra *pb;                     // value_info/initializer round-trip data
    struct opq_pb_extra *pb_init;                // initializer-specific round-trip data
};

enum opq_attr_type {
    OPQ_ATTR_UNDEFINED      = 0,
    OPQ_ATTR_FLOAT          = 1,
    OPQ_ATTR_INT            = 2,
    OPQ_ATTR_STRING         = 3,
    OPQ_ATTR_TENSOR         = 4,
    OPQ_ATTR_GRAPH          = 5,
    OPQ_ATTR_FLOATS         = 6,
    OPQ_ATTR_INTS           = 7,
    OPQ_ATTR_STRINGS        = 8,
    OPQ_ATTR_TENSORS        = 9,
    OPQ_ATTR_GRAPHS         = 10,
    OPQ_ATTR_SPARSE_TENSOR  = 11,
    OPQ_ATTR_SPARSE_TENSORS = 12,
    OPQ_ATTR_TYPE_PROTO     = 13,
    OPQ_ATTR_TYPE_PROTOS    = 14,
};

// A node attribute. Scalar and list forms of FLOAT/INT/STRING/TENSOR are modelled; GRAPH(S),
// SPARSE_TENSOR(S) and TYPE_PROTO(S) are kept verbatim in `pb` (subgraphs are not executed).
struct opq_attr {
    const char          *name;
    enum opq_attr_type   type;
    float                f;
    int64_t              i;
    struct opq_bytes     s;
    struct opq_tensor   *t;
    int                  n;        // element count of the list forms below
    float               *floats;
    int64_t             *ints;
    struct opq_bytes    *strings;
    struct opq_tensor  **tensors;
    const char          *ref_attr_name; // attribute reference inside functions (kept)
    struct opq_pb_extra *pb;
};

enum opq_node_flag {
    OPQ_NF_DEAD      = 1u << 0, // marked by a pass; compacted by opq_graph_cleanup()
    OPQ_NF_QUANTIZED = 1u << 1,
};

struct opq_node {
    enum opq_op          op;       // OPQ_OP_UNKNOWN: passes through untouched
    const char          *op_type;
    const char          *domain;   // "" for the default ONNX domain
    const char          *name;     // may be "" in the model; never NULL
    struct opq_value   **inputs;   // NULL entry = omitted optional input
    int                  n_inputs;
    struct opq_value   **outputs;  // NULL entry = omitted optional output
    int                  n_outputs;
    struct opq_attr     *attrs;    // verbatim, for serialization and kernels' parse()
    int                  n_attrs;
    void                *params;   // kernel-digested attributes (arena)
    uint32_t             flags;    // enum opq_node_flag bits
    int                  index;    // position in graph->nodes
    struct opq_pb_extra *pb;
};

struct opq_strmap; // name -> pointer hash map (strmap.h)

struct opq_graph {
    struct opq_arena   *arena;
    struct opq_ctx     *ctx;
    const char         *name;
    struct opq_node   **nodes;   int n_nodes,  cap_nodes;  // topological after opq_graph_sort()
    struct opq_value  **values;  int n_values, cap_values;
    struct opq_value  **inputs;  int n_inputs,  cap_inputs;  // graph.input order
    struct opq_value  **outputs; int n_outputs, cap_outputs; // graph.output order
    struct opq_value  **inits;   int n_inits,   cap_inits;   // graph.initializer order
    struct opq_value  **infos;   int n_infos,   cap_infos;   // graph.value_info order
    struct opq_strmap  *by_name;
    struct opq_pb_extra *pb;     // doc_string, sparse initializers, quantization annotations...
};

struct opq_opset {
    const char *domain; // "" = ai.onnx
    int64_t     version;
};

struct opq_kv {
    const char *key;
    const char *value;
};

struct opq_model {
    struct opq_ctx     *ctx;
    struct opq_arena   *arena;
    int64_t             ir_version;
    const char         *producer_name;
    const char         *producer_version;
    const char         *domain;
    int64_t             model_version;
    struct opq_opset   *opsets;   int n_opsets;
    struct opq_kv      *metadata; int n_metadata;
    struct opq_graph   *graph;
    const char         *path;     // file it was loaded from ("" for buffers), for messages
    const char         *dir;      // its folder, for external data
    struct opq_pb_extra *pb;      // doc_string, functions, training_info, unknown fields
};

// ---- tensor helpers (tensor.c) ------------------------------------------------------------------

// Bytes per element; 0 for sub-byte (INT4/UINT4/FLOAT4) and STRING; -1 never.
size_t      opq_dtype_size(enum opq_dtype dt);
bool        opq_dtype_is_packed4(enum opq_dtype dt);
const char *opq_dtype_name(enum opq_dtype dt); // "float32", "int8", ... ("?" if unknown)
// Element count of a fully known shape; false if a dim is unknown/negative or it overflows.
bool        opq_tensor_numel(const struct opq_tensor *t, size_t *out);
// Storage bytes for `numel` elements of dt (packed types round up); false on overflow/STRING.
bool        opq_dtype_nbytes(enum opq_dtype dt, size_t numel, size_t *out);
// ONNX default-domain opset version of the model (0 if absent).
int64_t     opq_model_opset(const struct opq_model *m, const char *domain);

#endif
