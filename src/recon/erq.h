/* erq.h: ERQ (Error Reduction for post-training Quantization of ViTs, TPAMI 2025 version; the
 * specification is ../shared/research/erq.md), run as the refinement step of the quantization
 * flow (quantize.h, struct opq_refine_ctx).
 *
 * Per linear layer y = W x + b (MatMul + bias Add, or Gemm), with x~ = [x; 1], its own
 * activation quantizer Q_a and xq~ = [Q_a(x); 1], statistics are streamed over the calibration
 * set in double (never the activations themselves):
 *     G = sum xq~ xq~^T,   E = sum xq~ (x~ - xq~)^T,   F = sum (x~ - xq~)(x~ - xq~)^T.
 * 1. Aqer: the float weights Theta = [W b] get the ridge update that makes the layer fed with
 *    quantized inputs reproduce the float outputs:  dTheta^T = (G + l1 I)^-1 E Theta^T
 *    (Cholesky in double through LAPACK). The reparameterization initialization ("RI") is the
 *    flow's post-LayerNorm reparameterization with alpha = 1.
 * 2. The weight grids are re-fitted on the updated weights. Layers with outlier input columns
 *    (the paper: qkv and fc1, whose columns RI scales; here every layer by default, which
 *    measured better) use dual uniform quantization (DUQ): the input columns most often flagged
 *    as per-row outliers form a set O, and each output channel has one grid for the columns in
 *    O and one for the rest.
 * 3. Wqer: progressively, half of the remaining input columns are quantized: round to nearest,
 *    then rounding refinement per output channel (greedy single flips on the proxy
 *    d^T H_S d, H_S the second moment of the quantized inputs, never increasing it), then the
 *    still-float columns and the bias absorb the error by ridge regression:
 *        d_R^T = -(G_RR + l2 I)^-1 G_RS d_S^T.
 * Quantized weights are left exactly on their grid, so the encoder keeps the chosen codes.
 * Inputs (opts.qinputs, the default): the paper takes every layer's x from the float model, so
 * each layer corrects only its own input quantizer. Here x^ = the layer's input in the quantized
 * model (activations fake-quantized, the layers before it with their final ERQ weights, the
 * others round to nearest), and xq~ = [Q_a(x^); 1] is regressed onto the float model's x~ in G,
 * E and F, so Aqer and Wqer also absorb the error the layers before it leave (GPTQ-style
 * sequential statistics; one calibration pass per layer input, in graph order). Taking x^ from
 * the round-to-nearest model for every layer at once instead counts the upstream error twice
 * (the upstream layers correct it themselves) and measured far worse (swin_tiny W4A4 77.35). On
 * swin_tiny at W3A4 the paper's float inputs made ERQ end to end worse than round to nearest
 * (logits KL 0.039 against 0.025 without reparameterization) although every layer's own error
 * fell: the patch embedding's and earlier layers' errors are as large as a layer's own there.
 * Errors reported per layer are relative output errors sum ||Theta' xq~ - Theta x~||^2 /
 * sum ||Theta x~||^2 on the calibration set, computed from the same statistics (so with
 * qinputs, "before" includes the upstream error). */
#ifndef OPQ_ERQ_H
#define OPQ_ERQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base.h"
#include "quant/qparams.h"

// Hyperparameters. Defaults are the paper's (README settings: coe = 10000 with 32 ViT images,
// i.e. l1 = l2 = 1000 against unnormalised Gram sums of N = 6304 tokens), expressed per
// calibration token so they carry over to other calibration sizes: l = lambda * N.
struct opq_erq_opts {
    double lambda;       // ridge strength per token (default 0.16); 2-D (head) inputs in Aqer
                         // use lambda / 50 (the paper's 0.1 over 32 images)
    int    steps;        // rounding-refinement steps per output channel (100; 0: off)
    bool   duq;          // dual uniform quantization of layers with outlier columns (on)
    double duq_frac;     // outlier columns per DUQ layer: floor(duq_frac * D_out) (0.05)
    double duq_ratio;    // DUQ where the largest input column's max |w| is at least this many
                         // times the median column's (1: every layer; the paper: qkv, fc1)
    int    ri;           // reparameterization initialization: 1 on (default), 0 off, -1 auto
    bool   aqer, wqer;   // the two stages (both on; off for ablations)
    int    mem_mb;       // Gram statistics held per calibration pass (MiB, default 512)
    bool   qinputs;      // statistics on the quantized model's inputs (default; see top)
};

void opq_erq_opts_default(struct opq_erq_opts *o);

// Per-layer outcome (relative output errors, see top).
struct opq_erq_layer {
    char    name[128];   // the linear node
    int     d_in, d_out;
    int     n_outliers;  // DUQ columns (0: single grid)
    double  err_before;  // float weights, quantized input (before Aqer)
    double  err_aqer;    // after Aqer
    double  err_rtn;     // round to nearest of the flow's original grids (reference)
    double  err_wqer;    // final quantized weights (after Wqer)
    // DUQ encoding data (n_outliers > 0), used by the structural rewrite after encoding.
    struct opq_node     *node;      // the consumer (weight at input 1)
    float               *w;         // final on-grid weights in the initializer's layout
    uint8_t             *outlier;   // [d_in] 1 for columns in O
    struct opq_qparams  *qp_in, *qp_out; // [d_out] grids of the inlier / outlier columns
    int                  axis, n_ch;
    int64_t              shape[2];
    bool                 rows_are_in;   // layout [d_in][d_out] (MatMul, Gemm transB=0)
};

// State shared between the refine step and the pass that encodes DUQ layers afterwards.
struct opq_erq_state {
    struct opq_erq_opts   opts;
    struct opq_erq_layer *layers;
    int                   n_layers;
    double                t_stats, t_aqer, t_wqer; // seconds per phase
    double                t_gram;  // of t_stats: the Gram products (the rest is the forward)
    double                t_err;   // the per-layer error figures (part of no phase above)
};

void opq_erq_state_free(struct opq_erq_state *s);

// The refine hook (opq_refine_fn): `user` is a struct opq_erq_state with opts set.
struct opq_refine_ctx;
enum opq_status opq_erq_refine(void *user, struct opq_refine_ctx *rc);

// Replaces, for every DUQ layer of s, the single weight DequantizeLinear the encoder wrote by
// two (inlier codes, outlier codes; each with its own per-channel scales, zero codes elsewhere)
// summed by an Add. The graph must be sorted afterwards (opq_graph_sort).
struct opq_graph;
enum opq_status opq_erq_encode_duq(struct opq_graph *g, const struct opq_erq_state *s,
                                   int wbits, int64_t opset);

// ---- numerical kernels (exported for tests) --------------------------------------------------------

// Solves (A + lambda I) X = B for symmetric positive (semi)definite A (n x n, row-major, only
// read) and B (n x m, row-major), X (n x m) may alias B. Cholesky in double (LAPACK dpotrf/dpotrs
// with OpenBLAS). OPQ_ERR_NUMERIC if the matrix is not positive definite.
enum opq_status opq_erq_ridge_solve(struct opq_ctx *ctx, const double *A, int n, double lambda,
                                    const double *B, int m, double *X);

// Rounding refinement of one output channel over k columns: H (k x k, symmetric PSD, row-major),
// delta[k] the current errors (round-to-nearest on entry), e_floor/e_ceil[k] the errors of the
// floor / ceil choices. Greedy single flips (at most `steps`), each accepted only if
// delta^T H delta does not increase. Returns the final proxy value; *n_flips (optional) counts
// accepted changes. scratch: k doubles.
double opq_erq_refine_row(const double *H, int k, double *delta, const double *e_floor,
                          const double *e_ceil, int steps, double *scratch, int *n_flips);

// Streamed statistics of one layer input (see top). x: rows x d float inputs, qa their
// activation quantizer (NULL: not quantized, then E and F get nothing). Adds to the upper
// triangles of G and F and to all of E ((d+1) x (d+1), row-major). Blocks of
// opq_erq_stats_block(qa) rows are multiplied in float and added to the double sums: the block
// products of G are formed from the integer codes (q - z) and are exact (every partial sum is an
// integer below 2^24), those of E and F from the float rounding errors x - Q_a(x). The block
// product is split into fixed column panels over pool (NULL: inline), so the sums are the same
// for any thread count. work: opq_erq_stats_work(d, qa) floats.
struct opq_threadpool;
int opq_erq_stats_block(const struct opq_qparams *qa);
size_t opq_erq_stats_work(int d, const struct opq_qparams *qa, bool paired);
void opq_erq_stats_add(struct opq_threadpool *pool, const float *x, const float *xref,
                       size_t rows, int d, const struct opq_qparams *qa, double *G, double *E,
                       double *F, float *work);

// Dual uniform quantization's outlier columns of a weight Theta (d_out x ld row-major, first
// d_in columns): per row the entries above the 99th percentile of its positive entries or below
// the 1st percentile of its negative ones are flagged; the k columns flagged most often (ties:
// first seen) are marked in outlier[d_in]. Returns how many were marked.
int opq_erq_duq_outliers(const double *theta, int d_out, int d_in, int ld, int k,
                         uint8_t *outlier);

#endif
