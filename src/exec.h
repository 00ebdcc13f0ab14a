/* exec.h: the reference executor (STYLE 8.7). Plans a model once for fixed input shapes, then
 * runs it many times: forward over the whole graph or a node range, streaming of intermediate
 * values to a capture callback, and reverse-mode gradients over a node range.
 *
 * Planning resolves every node's kernel (an unknown op or too-old opset fails HERE, naming node,
 * op and opset), digests attributes (kernel parse), infers every shape, evaluates shape
 * arithmetic whose inputs are all known (Shape -> Gather -> Concat -> Reshape with a dynamic
 * batch), and assigns activation buffers by lifetime so that peak memory stays near the live set.
 *
 * Memory: tensors handed out (outputs, opq_exec_value) point into executor-owned buffers that
 * stay valid until the next run/backward call on the same executor, or its free; gradients stay
 * valid until the next opq_exec_backward (forward runs in between do not touch them).
 * Threads: the executor runs ctx->n_threads threads (kernels parallel-for, GEMMs split by rows)
 * and sets the BLAS library to one thread, so the two never oversubscribe the cores.
 * Input data passed to a run is borrowed for the duration of the call only.
 * The model must outlive the executor and must not be changed structurally while planned.
 * Initializers are constants: nodes computing only from them are evaluated once at plan time.
 * Values marked OPQ_VK_PARAM are the exception: their data may change in place between runs
 * (reconstruction does that) and nothing depending on them is folded. */
#ifndef OPQ_EXEC_H
#define OPQ_EXEC_H

#include "base.h"
#include "ir.h"

struct opq_exec;
struct opq_threadpool;

// A tensor with a value name (inputs, seeds and results of the calls below).
struct opq_named_tensor {
    const char *name;
    struct opq_tensor t;
};

struct opq_exec_opts {
    // Unknown (-1 / symbolic) dims of graph inputs that `shapes` does not give become `batch`
    // when they are the leading dim; any other unknown dim is an error. 0: no default.
    int64_t batch;
    // Values whose data must survive the whole run (their buffers are never reused), e.g.
    // block inputs/outputs read back with opq_exec_value() after a run.
    const char *const *pinned;
    int n_pinned;
    // Keep every value (no buffer reuse at all): debugging and tests.
    bool keep_all;
    // Plan-time folding is limited to shape arithmetic and tiny tensors (by default every node
    // whose inputs are all constant is folded, except nodes reading OPQ_VK_PARAM values).
    bool fold_small_only;
};

// Plans `model` (borrowed) for the given input shapes (data may be NULL; names must be graph
// inputs). opts may be NULL. On success *out owns the plan; free with opq_exec_free().
// Errors: OPQ_ERR_UNSUPPORTED (node, op, opset named), OPQ_ERR_SHAPE, OPQ_ERR_INVALID_MODEL.
enum opq_status opq_exec_plan(struct opq_ctx *ctx, struct opq_model *model,
                              const struct opq_named_tensor *shapes, int n_shapes,
                              const struct opq_exec_opts *opts, struct opq_exec **out);
void opq_exec_free(struct opq_exec *exec);

// Runs the whole graph. `inputs` must give every graph input without an initializer, with the
// planned shape and dtype. outputs[i] (n_outputs <= graph outputs, graph output order) receives
// the dtype/shape and a borrowed data pointer. outputs may be NULL.
enum opq_status opq_exec_run(struct opq_exec *exec, const struct opq_named_tensor *inputs,
                             int n_inputs, struct opq_tensor *outputs, int n_outputs);

// Runs the graph only as far as the captured values need (opq_exec_set_capture): nodes after the
// last one producing a captured value are skipped, so graph outputs are not computed. With
// capture-all or no capture hook, the whole graph runs. Captured values are the same as in
// opq_exec_run.
enum opq_status opq_exec_run_captured(struct opq_exec *exec,
                                      const struct opq_named_tensor *inputs, int n_inputs);

// Runs nodes first..last (indices into graph->nodes, inclusive). Every value those nodes read
// and do not produce must be given in `provided`, be constant, or be pinned and computed by an
// earlier run. Read results with opq_exec_value() (pin them, or they may be overwritten).
enum opq_status opq_exec_run_range(struct opq_exec *exec, int first, int last,
                                   const struct opq_named_tensor *provided, int n_provided);

// The current content of a value (shape/dtype always; data may be stale unless pinned, a graph
// output, or a constant). NULL if the name is unknown. Borrowed.
const struct opq_tensor *opq_exec_value(const struct opq_exec *exec, const char *name);

// Capture: during runs, fn(user, value, tensor) is called right after the value is computed,
// for each value listed in `names` (n_names < 0: every computed value). The tensor is borrowed for
// the call only. Replaces any previous capture; fn NULL disables. Return non-OK to abort the run
// (that status is returned by the run).
typedef enum opq_status (*opq_capture_fn)(void *user, const char *name, const struct opq_tensor *t);
enum opq_status opq_exec_set_capture(struct opq_exec *exec, const char *const *names, int n_names,
                                     opq_capture_fn fn, void *user);

// Gradients over nodes first..last: recomputes the range forward (inputs as for run_range),
// seeds dL/d(value) for each `seeds` entry (float tensors shaped like the value), and writes
// grads[i] = dL/d(wrt[i]) for each requested value (range inputs, initializers or intermediate
// values; zeros if L does not depend on it). grads[] data is executor-owned (see top).
// OPQ_ERR_UNSUPPORTED names a node on the gradient path whose op has no backward.
enum opq_status opq_exec_backward(struct opq_exec *exec, int first, int last,
                                  const struct opq_named_tensor *provided, int n_provided,
                                  const struct opq_named_tensor *seeds, int n_seeds,
                                  const char *const *wrt, int n_wrt, struct opq_tensor *grads);

// A tape: the forward half of opq_exec_backward kept for several reverse sweeps (e.g. one per
// class, or one per training step of a sub-range after the step's own forward). A tape holds
// every value its range computes; values it reads from outside the range (provided data,
// initializers, earlier runs' results) are borrowed and must stay unchanged until its last
// sweep. OPQ_VK_PARAM data read by the range must not change between record and sweeps.
struct opq_exec_tape;
enum opq_status opq_exec_tape_new(struct opq_exec *exec, struct opq_exec_tape **out);
void opq_exec_tape_free(struct opq_exec_tape *tape);
// Runs nodes first..last (as opq_exec_run_range) and records them; gradients will be computed
// for the n_wrt values named (they define which nodes are on a gradient path).
enum opq_status opq_exec_tape_record(struct opq_exec_tape *tape, int first, int last,
                                     const struct opq_named_tensor *provided, int n_provided,
                                     const char *const *wrt, int n_wrt);
// A value the recorded range computed or read (NULL if none); valid until the next record.
const struct opq_tensor *opq_exec_tape_value(const struct opq_exec_tape *tape, const char *name);
// One reverse sweep from the seeds down to node `stop` (nodes below it are skipped: pass the
// range's first node for complete gradients). grads[i] receives d/d(wrt[i]) of the record,
// valid until the next sweep of this tape.
enum opq_status opq_exec_tape_backward(struct opq_exec_tape *tape, int stop,
                                       const struct opq_named_tensor *seeds, int n_seeds,
                                       struct opq_tensor *grads);
// The same sweep starting in the seeds' own buffers (no copy): their contents are destroyed
// (they may end up holding any gradient of the sweep, including a grads[i] result), so the
// caller must not need them afterwards, nor free them while grads are in use.
enum opq_status opq_exec_tape_backward_in_place(struct opq_exec_tape *tape, int stop,
                                                const struct opq_named_tensor *seeds, int n_seeds,
                                                struct opq_tensor *grads);

// Planning statistics: bytes of all activation buffers (what a run holds) vs the sum of every
// planned activation value (what a no-reuse executor would hold).
struct opq_exec_stats {
    size_t buffer_bytes;
    size_t value_bytes;
    int n_buffers;
    int n_folded; // nodes evaluated at plan time
};
void opq_exec_get_stats(const struct opq_exec *exec, struct opq_exec_stats *st);

// The executor's thread pool (borrowed; NULL with one thread), for callers that run their own
// parallel loops between executor calls (never from inside a capture callback).
struct opq_threadpool *opq_exec_pool(const struct opq_exec *exec);

// Index of the node producing `name` (-1 for inputs, initializers, unknown names).
int opq_exec_producer_index(const struct opq_exec *exec, const char *name);

#endif
