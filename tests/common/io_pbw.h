/* io_pbw.h: a minimal protobuf wire-format writer for tests that craft ONNX messages byte by
 * byte (bad models, unknown fields, every attribute and data type) without going through the
 * library under test. Field numbers are the ones of onnx.proto; see the PBW_* names below.
 * Allocation failures abort the test program (tests only). */
#ifndef OPQ_TEST_IO_PBW_H
#define OPQ_TEST_IO_PBW_H

#include <stddef.h>
#include <stdint.h>

struct pbw {
    uint8_t *b;
    size_t n, cap;
};

// onnx.proto field numbers used by the tests.
enum {
    // ModelProto
    PBW_M_IR_VERSION = 1,
    PBW_M_PRODUCER = 2,
    PBW_M_GRAPH = 7,
    PBW_M_OPSET = 8,
    PBW_M_DOC = 6,
    PBW_M_METADATA = 14,
    PBW_M_FUNCTIONS = 25,
    // OperatorSetIdProto, StringStringEntryProto
    PBW_OPSET_DOMAIN = 1,
    PBW_OPSET_VERSION = 2,
    PBW_KV_KEY = 1,
    PBW_KV_VALUE = 2,
    // GraphProto
    PBW_G_NODE = 1,
    PBW_G_NAME = 2,
    PBW_G_INIT = 5,
    PBW_G_DOC = 10,
    PBW_G_INPUT = 11,
    PBW_G_OUTPUT = 12,
    PBW_G_VALUE_INFO = 13,
    PBW_G_SPARSE_INIT = 15,
    // NodeProto
    PBW_N_INPUT = 1,
    PBW_N_OUTPUT = 2,
    PBW_N_NAME = 3,
    PBW_N_OP_TYPE = 4,
    PBW_N_ATTR = 5,
    PBW_N_DOC = 6,
    PBW_N_DOMAIN = 7,
    // AttributeProto
    PBW_A_NAME = 1,
    PBW_A_F = 2,
    PBW_A_I = 3,
    PBW_A_S = 4,
    PBW_A_T = 5,
    PBW_A_G = 6,
    PBW_A_FLOATS = 7,
    PBW_A_INTS = 8,
    PBW_A_STRINGS = 9,
    PBW_A_TENSORS = 10,
    PBW_A_GRAPHS = 11,
    PBW_A_DOC = 13,
    PBW_A_TP = 14,
    PBW_A_TYPE_PROTOS = 15,
    PBW_A_TYPE = 20,
    PBW_A_SPARSE = 22,
    PBW_A_SPARSES = 23,
    // TensorProto
    PBW_T_DIMS = 1,
    PBW_T_DATA_TYPE = 2,
    PBW_T_FLOAT_DATA = 4,
    PBW_T_INT32_DATA = 5,
    PBW_T_STRING_DATA = 6,
    PBW_T_INT64_DATA = 7,
    PBW_T_NAME = 8,
    PBW_T_RAW = 9,
    PBW_T_DOUBLE_DATA = 10,
    PBW_T_UINT64_DATA = 11,
    PBW_T_DOC = 12,
    PBW_T_EXTERNAL = 13,
    PBW_T_LOCATION = 14,
    // SparseTensorProto
    PBW_SP_VALUES = 1,
    PBW_SP_INDICES = 2,
    PBW_SP_DIMS = 3,
    // ValueInfoProto, TypeProto, TypeProto.Tensor, TensorShapeProto(.Dimension)
    PBW_VI_NAME = 1,
    PBW_VI_TYPE = 2,
    PBW_VI_DOC = 3,
    PBW_TP_TENSOR = 1,
    PBW_TP_SEQUENCE = 4,
    PBW_TP_DENOTATION = 6,
    PBW_TT_ELEM = 1,
    PBW_TT_SHAPE = 2,
    PBW_SHAPE_DIM = 1,
    PBW_DIM_VALUE = 1,
    PBW_DIM_PARAM = 2,
    PBW_DIM_DENOTATION = 3,
};

void pbw_free(struct pbw *w);
void pbw_raw(struct pbw *w, const void *p, size_t n);
void pbw_varint(struct pbw *w, uint64_t v);
// Field writers (tag + payload).
void pbw_int(struct pbw *w, int field, int64_t v);                 // varint
void pbw_f32(struct pbw *w, int field, float v);                   // fixed32
void pbw_bytes(struct pbw *w, int field, const void *p, size_t n); // length-delimited
void pbw_str(struct pbw *w, int field, const char *s);
// Embeds `sub` as a length-delimited field and frees it.
void pbw_msg(struct pbw *w, int field, struct pbw *sub);
// Packed repeated fields.
void pbw_packed_f32(struct pbw *w, int field, const float *v, size_t n);
void pbw_packed_f64(struct pbw *w, int field, const double *v, size_t n);
void pbw_packed_varint(struct pbw *w, int field, const int64_t *v, size_t n);

// Convenience builders for ONNX messages (each returns a fresh writer to embed with pbw_msg).
// A tensor ValueInfoProto: elem type and dims (dims < 0 written as dim_param "N<i>" if
// sym != 0, else as an empty Dimension); ndim < 0: no shape.
struct pbw pbw_value_info(const char *name, int elem_type, int ndim, const int64_t *dims, int sym);
// A NodeProto with comma-separated input/output lists ("" entries allowed) and no attributes.
struct pbw pbw_node(const char *op_type, const char *name, const char *inputs, const char *outputs);
// A TensorProto with raw_data.
struct pbw pbw_tensor_raw(const char *name, int dt, int ndim, const int64_t *dims, const void *raw,
                          size_t n);
// A ModelProto around a finished GraphProto: ir_version 8, opset ("", 17), producer "pbw".
struct pbw pbw_model(struct pbw *graph);

#endif
