/* pass.h: graph passes and the pipeline that runs them (STYLE 8.5). Internal for now: the CLI and
 * the tests include it; the parts marked PUBLIC are meant to move to opq.h.
 *
 * A pass is a function over one graph. It changes structure only through graph.h (add_node,
 * set_input, replace_uses, mark_dead, move_*), never renames or retypes graph inputs/outputs, and
 * leaves dead nodes marked: the pipeline compacts them after the pass. It reports what it did in
 * pc->stats and errors through opq_set_error(pc->ctx, ...), naming the node at fault.
 *
 * The pipeline runs an ordered list of passes by name. With verification on (always in builds
 * without NDEBUG, else opq_pipeline_opts.verify / --verify) it checks opq_graph_verify() on the
 * input graph and after every pass, and fails naming the pass that broke an invariant. */
#ifndef OPQ_PASS_H
#define OPQ_PASS_H

#include <stdbool.h>
#include <stdint.h>

#include "graph.h"

// PUBLIC: options of a pipeline run. Zero-initialize and set what you need.
struct opq_quant_opts;
struct opq_report;

struct opq_pipeline_opts {
    int      bits_w;  // weight bits for quantizing passes (0: the pass's default)
    int      bits_a;  // activation bits (0: the pass's default)
    int      opset;   // upgrade-opset: the target ai.onnx opset (0: 21)
    uint64_t seed;    // for passes with randomness (seeded PCG32, never rand())
    bool     verify;  // opq_graph_verify() after every pass (forced on without NDEBUG)
    // Quantizing passes: their options (required by them) and where to put their report
    // (optional; the caller frees it with opq_report_free).
    const struct opq_quant_opts *quant;
    struct opq_report          **report;
};

// Counters a pass fills in; the pipeline logs them (info level) and sums them.
struct opq_pass_stats {
    long n_rewrites;      // matches rewritten / nodes removed by the pass itself
    long n_nodes_before;  // filled by the pipeline
    long n_nodes_after;   // filled by the pipeline
};

struct opq_pass;

// What a running pass sees. Borrowed pointers, valid during the run.
struct opq_pass_ctx {
    struct opq_ctx                 *ctx;
    struct opq_model               *model;
    const struct opq_pipeline_opts *opts;
    const struct opq_pass          *pass;  // the pass being run
    struct opq_pass_stats           stats; // reset before each pass
};

// The gelu-to-relu rewrite without its report (mlp-recon runs it on the model it already copied):
// every GELU becomes a Relu in its place; pc->stats.n_rewrites counts them.
enum opq_status opq_pass_gelu_swap(struct opq_pass_ctx *pc, struct opq_graph *g);

// Logs (info) how far pc->model's logits moved from `before`'s on up to 256 calibration samples
// (top-1 agreement, logits SQNR), prefixed by the pass name and `what`. Best effort: without
// calibration data or float logits it logs nothing.
void opq_pass_log_float_change(struct opq_pass_ctx *pc, struct opq_model *before,
                               const char *what);

// The quantizing passes' common tail: runs opq_quantize with `o` on pc->model and hands its
// report to pc->opts->report (when asked); n_rewrites = quantized nodes.
struct opq_quant_opts;
enum opq_status opq_pass_quantize_with(struct opq_pass_ctx *pc, const struct opq_quant_opts *o);

typedef enum opq_status (*opq_pass_fn)(struct opq_pass_ctx *pc, struct opq_graph *g);

struct opq_pass {
    const char *name; // CLI name, e.g. "remove-identity"
    const char *doc;  // one line
    opq_pass_fn run;
};

// The run function of every registered pass (one per passes/<ident>.c).
#define OPQ_PASS(ident, name, doc)                                                                \
    enum opq_status opq_pass_run_##ident(struct opq_pass_ctx *pc, struct opq_graph *g);
#include "passes.def"
#undef OPQ_PASS

// ---- registry -----------------------------------------------------------------------------------

// Registered passes in passes.def order; the pointers are static.
int                    opq_pass_count(void);
const struct opq_pass *opq_pass_at(int i);
// The pass named `name`, or NULL.
const struct opq_pass *opq_pass_find(const char *name);

// Methods (presets): a named list of passes. `--method none` runs only the function-preserving
// clean-up passes.
int         opq_method_count(void);
const char *opq_method_name(int i);
const char *opq_method_doc(int i);
// The pass names of a method (at most cap, static strings); -1 if the method is unknown.
int         opq_method_passes(const char *name, const char **out, int cap);
// True if the method quantizes (and so needs calibration data).
bool        opq_method_quantizes(const char *name);

// ---- pipeline (PUBLIC) ----------------------------------------------------------------------------

// OPQ_OK if every name is a registered pass / if `method` is a known method, else OPQ_ERR_USAGE
// with a message listing the valid names (lets a program reject bad options before loading).
enum opq_status opq_pipeline_check_names(struct opq_ctx *ctx, const char *const *names, int n);
enum opq_status opq_pipeline_check_method(struct opq_ctx *ctx, const char *method);
// Runs the passes named in names[0..n) in order on model's graph. Every name is checked before
// anything runs: an unknown one gives OPQ_ERR_USAGE with a message listing the valid names.
// opts may be NULL (defaults).
enum opq_status opq_pipeline_run(struct opq_ctx *ctx, struct opq_model *model,
                                 const char *const *names, int n,
                                 const struct opq_pipeline_opts *opts);
// Runs the passes of a method (preset); unknown method -> OPQ_ERR_USAGE listing the valid ones.
enum opq_status opq_pipeline_run_method(struct opq_ctx *ctx, struct opq_model *model,
                                        const char *method, const struct opq_pipeline_opts *opts);
// Runs already looked-up passes (also lets tests run passes that are not registered).
enum opq_status opq_pipeline_run_passes(struct opq_ctx *ctx, struct opq_model *model,
                                        const struct opq_pass *const *passes, int n,
                                        const struct opq_pipeline_opts *opts);

#endif
