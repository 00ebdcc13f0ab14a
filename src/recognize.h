/* recognize.h: finds the structures of a transformer in an ONNX graph, whatever way it was
 * exported, so passes and the reconstruction engine can reason in terms of blocks:
 *   - LayerNorm: the LayerNormalization op, or the decomposed chain
 *       ReduceMean -> Sub -> Pow(2) | Mul(d,d) -> ReduceMean -> Add(eps) -> Sqrt -> Div
 *       [-> Mul(gamma)] [-> Add(beta)]
 *   - GELU: the Gelu op; the Erf chain Div(sqrt2) | Mul(1/sqrt2) -> Erf -> Add(1) -> Mul(x) ->
 *       Mul(0.5) in any operand order (0.5 may also be applied to x first); the Tanh chain
 *       (x + 0.044715 x^3) * sqrt(2/pi) -> Tanh -> Add(1) -> Mul(x) -> Mul(0.5).
 *   - attention cores: MatMul -> [Mul|Div scale] -> [Add mask] -> Softmax -> MatMul.
 *   - transformer blocks: LN -> (attention) -> residual Add, LN -> (MLP) -> residual Add.
 * Results only reference the graph (borrowed node/value pointers): the graph must not change
 * while they are used. The library never prints: opq_recognize_describe() formats a summary
 * into a caller buffer (used by `onnx-ptq inspect`). */
#ifndef OPQ_RECOGNIZE_H
#define OPQ_RECOGNIZE_H

#include "base.h"
#include "ir.h"

enum opq_pattern_kind {
    OPQ_PAT_LAYERNORM = 0,
    OPQ_PAT_GELU = 1,
    OPQ_PAT_ATTENTION = 2,
    OPQ_PAT_BLOCK = 3,
};

enum opq_pattern_variant {
    OPQ_PV_OP = 0,         // the single ONNX op (LayerNormalization, Gelu)
    OPQ_PV_DECOMPOSED = 1, // LayerNorm chain
    OPQ_PV_ERF = 2,        // GELU via Erf
    OPQ_PV_TANH = 3,       // GELU via Tanh
    OPQ_PV_NONE = 4,       // attention, blocks
};

struct opq_pattern {
    enum opq_pattern_kind kind;
    enum opq_pattern_variant variant;
    struct opq_node **nodes; // members, in graph order (blocks: every node in the range)
    int n_nodes;
    struct opq_value *input;  // main data input (x)
    struct opq_value *output; // the value the structure produces
    int first, last;          // node index range covered (inclusive)
    // attention: the Q.K^T MatMul, the Softmax and the P.V MatMul; blocks: the two LayerNorms'
    // pattern indices and the two residual Adds.
    struct opq_node *qk, *softmax, *pv; // softmax: the Exp in the deferred form
    int ln1, ln2;
    struct opq_node *res1, *res2;
};

struct opq_recognized {
    struct opq_arena *arena;
    struct opq_pattern *items; // LayerNorms first, then GELUs, attention cores, blocks
    int n_items;
    int n_by_kind[4];
};

// Analyses g (borrowed). On success *out is owned by the caller (opq_recognized_free).
enum opq_status opq_recognize(struct opq_ctx *ctx, const struct opq_graph *g,
                              struct opq_recognized **out);
void opq_recognized_free(struct opq_recognized *r);

// Writes a human-readable summary (one line per kind, then one per block) into buf, snprintf
// style: returns the length the full text needs, writes at most cap bytes including the NUL.
size_t opq_recognize_describe(const struct opq_recognized *r, char *buf, size_t cap);

#endif
