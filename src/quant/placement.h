/* placement.h: where quantization goes. Every MatMul, Gemm and Conv gets its float inputs
 * quantized: weights (initializers) per output channel, activations per tensor -- including both
 * inputs of the attention matmuls (Q.K^T and softmax.V), the patch embedding and the head.
 * LayerNorm, Softmax, GELU and residual Adds stay float: they are never consumers of a Q/DQ pair
 * (a value that feeds both a quantized op and a float op is quantized for the former only).
 *
 * Exclusions: `exclude` is a comma-separated list; an item equal to an op type ("Conv") excludes
 * that type, anything else is a POSIX extended regex matched against node names. keep_float
 * excludes structural positions: the first or last quantizable node, the head (quantizable nodes
 * that reach a graph output without passing another quantizable node) and the patch embedding
 * (those reached from a graph input likewise). */
#ifndef OPQ_PLACEMENT_H
#define OPQ_PLACEMENT_H

#include "graph.h"

enum opq_qrole { OPQ_QROLE_ACT = 0, OPQ_QROLE_WEIGHT = 1 };

enum opq_keep_float {
    OPQ_KEEP_FIRST       = 1u << 0,
    OPQ_KEEP_LAST        = 1u << 1,
    OPQ_KEEP_HEAD        = 1u << 2,
    OPQ_KEEP_PATCH_EMBED = 1u << 3,
};

struct opq_qtarget {
    struct opq_value  *value;
    enum opq_qrole     role;
    int                axis;        // weights: output-channel axis; -1 = per tensor
    int                head_axis;   // activations read only by attention matmuls (rank 4,
                                    // [B, heads, ., .]): 1, else -1 (per-head scales option)
    struct opq_node  **consumers;   // the quantized nodes that read it (graph arena)
    int                n_consumers;
    // Float nodes that read the quantized value too (graph arena): the row sum z of a deferred
    // softmax (passes/defer_softmax.c), Y = MatMul(E, V) / ReduceSum(E), so that z sums the same
    // quantized E the MatMul multiplies and every row of the effective attention sums to 1.
    struct opq_node  **readers;
    int                n_readers;
};

struct opq_placement {
    struct opq_qtarget *targets;   // activations first (graph order), then weights
    int                 n_targets;
    struct opq_node   **qnodes;    // quantized nodes, graph order
    int                 n_qnodes;
    int                 n_excluded; // quantizable nodes left float by the options
};

struct opq_placement_opts {
    const char *exclude;     // may be NULL
    unsigned    keep_float;  // enum opq_keep_float bits
    // Fill opq_qtarget.readers (the row sums of deferred softmaxes read the quantized E). The
    // reconstruction engine needs it: every reader of a quantized value inside a unit sees that
    // value fake-quantized. Round to nearest keeps the float row sum; the two measured the same
    // on average at W4A4 RTN over the four fixtures (README).
    bool        norm_readers;
};

// Parses "first,last,head,patch-embed" into bits; OPQ_ERR_USAGE naming a bad word.
enum opq_status opq_keep_float_parse(struct opq_ctx *ctx, const char *list, unsigned *bits);

// Finds the targets in g (which must be topologically sorted). Arrays live in g's arena.
enum opq_status opq_placement_find(struct opq_ctx *ctx, struct opq_graph *g,
                                   const struct opq_placement_opts *opts,
                                   struct opq_placement *out);

// True for the ops whose inputs are quantized.
bool opq_placement_is_quantizable(const struct opq_node *n);

#endif
