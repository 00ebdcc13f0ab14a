/* quantize.h: post-training quantization of a model in place (round to nearest with calibrated
 * ranges). The steps: placement (quant/placement.h) -> optional post-LayerNorm reparameterization
 * (quant/reparam.h) -> streamed calibration through the executor's capture hook -> activation
 * ranges (quant/qparams.h) and per-channel weight ranges -> Q/DQ encoding (quant/qdq.h) ->
 * clean-up and verification -> a report measured on calibration samples held out from
 * calibration. Reconstruction methods (ERQ, APHQ, FlexRound) refine what this produces. */
#ifndef OPQ_QUANTIZE_H
#define OPQ_QUANTIZE_H

#include "calib_data.h"
#include "exec.h"
#include "graph.h"
#include "quant/qparams.h"
#include "recon/erq.h"
#include "recon/mr.h"
#include "recon/recon.h"

enum opq_target { OPQ_TARGET_ORT = 0, OPQ_TARGET_TRT = 1 };

struct opq_quant_opts;
struct opq_placement;

// What a refinement step (ERQ, block reconstruction) sees between range calibration and
// encoding. Target t of pl: qp[t] holds n_ch[t] qparams (weights: per channel along axis[t];
// activations: 1). A refine step may change the float weights and biases in the model, the
// weight qparams (the encoder then rounds each weight to nearest on them, so weights a refine
// step leaves exactly on their grid keep the codes it chose) and the activation qparams. It must
// not change the graph's structure. Samples [0, n_calib) of src are the calibration set.
struct opq_refine_ctx {
    struct opq_ctx              *ctx;
    struct opq_model            *model;
    const struct opq_quant_opts *opts;
    struct opq_placement        *pl;
    struct opq_qparams         **qp;
    const int                   *n_ch;
    const int                   *axis;
    struct opq_calib_src        *src;
    int                          n_calib;
    // With opts->refine_qmodel: a copy of model with Q/DQ at every activation target (qp as
    // they are on entry) and its float weights untouched, for the refine step to set (value
    // names read the copy's tensors before their own quantizer). Owned by the flow (the refine
    // step may change its initializers' data); NULL otherwise.
    struct opq_model            *qmodel;
};
typedef enum opq_status (*opq_refine_fn)(void *user, struct opq_refine_ctx *rc);

struct opq_quant_opts {
    int                   wbits, abits;   // 2..8 (TRT: 8)
    // Bits of the activations that the model input reaches without passing a MatMul, Gemm or
    // Conv (the image feeding the patch embedding): max(abits, input_bits). Default 8, as in
    // the RepQ-ViT/APHQ-ViT protocol, where the image is never quantized below 8 bits.
    int                   input_bits;
    bool                  w_per_tensor;   // default: per output channel
    bool                  w_asym;         // default: symmetric weights
    bool                  a_sym;          // default: asymmetric activations (TRT: symmetric)
    // One scale per head for the attention-matmul inputs (per-axis Q/DQ on axis 1). Off by
    // default and not offered by the CLI: ONNX Runtime's CPU optimizer fuses DQ -> MatMul into
    // MatMulIntegerToFloat, which rejects per-axis activation zero points (measured with
    // onnxruntime-node 1.30), and at W4A4 it did not beat per-tensor scales on the fixtures.
    bool                  act_per_head;
    enum opq_calibrator   calibrator;     // activation ranges
    // Output-aware range search after the calibrator (quant/actsearch.h): an activation read by
    // a MatMul/Gemm gets the candidate range that minimises its consumers' output error over the
    // first act_search_samples calibration samples. -1 (default): activations below 8 bits,
    // whatever the method (block reconstruction's LSQ step sizes start from the searched ranges:
    // FlexRound W4A4 +0.3 / +0.4 pt on vit_tiny / tv_vit; ERQ's ridge updates see them: ERQ W4A4
    // tv_vit 85.56 against 84.96 with --act-search tensor), not at 8 bits (no gain on the
    // fixtures, a forward per candidate); 0: none (the calibrator's ranges), 1: every activation.
    int                   act_search;
    int                   act_search_samples;
    double                percentile;     // for OPQ_CALIB_PERCENTILE
    enum opq_wcalib       wcalib;         // weight ranges
    const char           *exclude;        // see placement.h
    unsigned              keep_float;     // enum opq_keep_float bits
    enum opq_target       target;
    int                   reparam;        // -1: where it helps, 0: off, 1: every LayerNorm
    // The defer-softmax pass of the presets (passes/defer_softmax.c): -1 (default) when
    // activations are below 8 bits, 0 off, 1 on. Read by that pass, not by opq_quantize.
    int                   defer_softmax;
    float                 reparam_alpha;  // migration strength (reparam.h)
    int                   batch;          // calibration batch
    int                   holdout;        // samples kept out for the report (-1: automatic)
    struct opq_calib_spec calib;
    opq_refine_fn         refine;         // optional refinement step (ERQ, reconstruction)
    void                 *refine_user;
    bool                  refine_qmodel;  // the refine step wants opq_refine_ctx.qmodel
    struct opq_erq_opts   erq;            // --method erq hyperparameters (recon/erq.h)
    struct opq_recon_opts recon;          // block reconstruction (recon/recon.h: --method aphq)
    struct opq_mr_opts    mr;             // MLP reconstruction (recon/mr.h: the mlp-recon pass)
};

// Defaults: W8A8, per-channel symmetric weights (MSE ranges), asymmetric activations with the
// default calibrator, ORT target, reparameterization where it helps, batch 16.
void opq_quant_opts_default(struct opq_quant_opts *o);

// Samples of `total` calibration samples kept out of calibration for the report (the last ones).
int opq_quant_holdout(const struct opq_quant_opts *o, int total);

// Checks the options that do not depend on the model (bit widths, target rules, batch, that
// calibration data is named), so a program can refuse bad combinations before loading.
enum opq_status opq_quant_opts_check(struct opq_ctx *ctx, const struct opq_quant_opts *o);

struct opq_report_tensor {
    const char *name;                 // owned by the report (copied)
    bool        weight;
    int         bits;
    int         n_ch;
    float       scale_min, scale_max; // equal for per-tensor
    int32_t     zero_point;           // of channel 0
    double      sqnr_db;              // quantize-dequantize error of this tensor alone
};

struct opq_report_block {
    const char *name;     // the value at the block's output (owned by the report)
    double      sqnr_db;  // quantized vs float model, held-out samples
};

struct opq_report_phase {
    const char *name;
    double      seconds;
    long        peak_rss_kb; // process peak so far
};

// Relative output error of one linear layer on the calibration set (ERQ: erq.h).
struct opq_report_layer {
    char   name[128];
    int    d_in, d_out, n_outliers;
    double err_before, err_aqer, err_wqer, err_rtn;
};

struct opq_report {
    struct opq_report_tensor *tensors;
    int                       n_tensors;
    struct opq_report_block  *blocks;
    int                       n_blocks;
    struct opq_report_phase   phases[8];
    int                       n_phases;
    int                       n_qnodes, n_excluded, n_reparam;
    int                       n_calib, n_eval;
    double                    logits_sqnr_db, logits_kl, top1_agreement;
    bool                      have_eval;
    char                      settings[256];
    struct opq_report_layer  *layers;    // per-layer errors of a refinement method (ERQ); owned
    int                       n_layers;
};

// Quantizes `model` in place. *report (optional) receives a report owned by the caller
// (opq_report_free). Errors name the tensor, node or file at fault.
enum opq_status opq_quantize(struct opq_ctx *ctx, struct opq_model *model,
                             const struct opq_quant_opts *opts, struct opq_report **report);

// Streams samples [first, first + count) of src through model in batches of `batch`, calling
// fn(user, name, tensor) for each value in capture[0..n_capture) as it is computed (graph inputs
// included; n_capture < 0: every value). Tensors are borrowed for the call. phase: progress label
// (NULL: none).
enum opq_status opq_calib_stream(struct opq_ctx *ctx, struct opq_model *model,
                                 struct opq_calib_src *src, int first, int count, int batch,
                                 const char *const *capture, int n_capture, opq_capture_fn fn,
                                 void *user, const char *phase);

enum opq_status opq_report_write_json(struct opq_ctx *ctx, const struct opq_report *r,
                                      const char *path);
void            opq_report_free(struct opq_report *r);

#endif
