/* graph.h: the only way to build and change the IR (STYLE 8.5). Every function here keeps
 * value->producer and value->users consistent; passes never touch those fields directly.
 * All memory comes from the graph's arena (borrowed pointers, freed with the model). */
#ifndef OPQ_GRAPH_H
#define OPQ_GRAPH_H

#include "base.h"
#include "ir.h"

// ---- models and graphs --------------------------------------------------------------------------

// An empty model with an empty graph, arena and name map. NULL on out-of-memory.
struct opq_model *opq_model_new(struct opq_ctx *ctx);

// ---- values -------------------------------------------------------------------------------------

// The value named `name`, or NULL.
struct opq_value *opq_graph_value(const struct opq_graph *g, const char *name);
// The value named `name`, created (dtype UNDEF, rank unknown) if absent. NULL on out-of-memory.
struct opq_value *opq_graph_value_get_or_add(struct opq_graph *g, const char *name);
// A new value with a fresh name derived from `hint` (hint, hint_1, hint_2, ...). NULL on OOM.
struct opq_value *opq_graph_value_new_unique(struct opq_graph *g, const char *hint);
// Makes v an initializer holding a copy of t (data copied into the arena) and appends it to the
// initializer list if it is not there yet.
enum opq_status   opq_graph_set_initializer(struct opq_graph *g, struct opq_value *v,
                                            const struct opq_tensor *t);
// Appends v to graph.input / graph.output / graph.value_info (sets the kind bit).
enum opq_status   opq_graph_add_input(struct opq_graph *g, struct opq_value *v);
enum opq_status   opq_graph_add_output(struct opq_graph *g, struct opq_value *v);
enum opq_status   opq_graph_add_info(struct opq_graph *g, struct opq_value *v);

// ---- nodes --------------------------------------------------------------------------------------

// Appends a node. inputs/outputs may contain NULL (omitted optional). Names are copied into the
// arena; `domain` NULL means "". Each output gets this node as producer: it is an error
// (OPQ_ERR_INVALID_MODEL, message names the value) for an output to already have a producer or
// to be a graph input or initializer. *out (optional) receives the node.
enum opq_status opq_graph_add_node(struct opq_graph *g, const char *op_type, const char *domain,
                                   const char *name, struct opq_value *const *inputs, int n_inputs,
                                   struct opq_value *const *outputs, int n_outputs,
                                   struct opq_node **out);
// Adds an attribute copy (shallow for arrays: they must already live in the arena).
enum opq_status opq_node_add_attr(struct opq_graph *g, struct opq_node *n,
                                  const struct opq_attr *a);
// Removes the attribute `name` from n; false if n has none of that name.
bool            opq_node_remove_attr(struct opq_node *n, const char *name);
// Attribute lookup by name (NULL if absent) and typed getters with defaults.
const struct opq_attr *opq_node_attr(const struct opq_node *n, const char *name);
int64_t opq_node_attr_int(const struct opq_node *n, const char *name, int64_t def);
float   opq_node_attr_float(const struct opq_node *n, const char *name, float def);

// Replaces input slot i of n by v (v may be NULL), updating users lists.
enum opq_status opq_node_set_input(struct opq_graph *g, struct opq_node *n, int i,
                                   struct opq_value *v);
// Grows n's input list to n_inputs slots (the new ones omitted, NULL) or shrinks it (the dropped
// inputs lose n as a user). Used when an op version moves an attribute to an input.
enum opq_status opq_node_resize_inputs(struct opq_graph *g, struct opq_node *n, int n_inputs);
// Every use of `from` (node inputs and graph outputs) becomes a use of `to`. Graph outputs keep
// their names: if `from` is a graph output, `to` must be producible under that name, so callers
// rewriting outputs must insert an Identity instead (rule 3); this returns OPQ_ERR_INTERNAL then.
enum opq_status opq_graph_replace_uses(struct opq_graph *g, struct opq_value *from,
                                       struct opq_value *to);
// Marks n dead and detaches it: its inputs lose it as a user, its outputs lose their producer.
void            opq_graph_mark_dead(struct opq_graph *g, struct opq_node *n);
// Drops dead nodes from g->nodes (values are kept); returns how many were dropped.
int             opq_graph_compact(struct opq_graph *g);
// Drops dead nodes and values nobody uses (not graph inputs/outputs); keeps order otherwise.
enum opq_status opq_graph_cleanup(struct opq_graph *g);
// Moves n (already in g) to just before / just after `anchor` in g->nodes, keeping the order of
// all other nodes. Passes use these after opq_graph_add_node (which appends) to put a new node
// next to the one it feeds or follows, so the graph stays topological without a full sort.
void            opq_graph_move_before(struct opq_graph *g, struct opq_node *n,
                                      struct opq_node *anchor);
void            opq_graph_move_after(struct opq_graph *g, struct opq_node *n,
                                     struct opq_node *anchor);
// Topological sort, stable with respect to the current order. OPQ_ERR_INVALID_MODEL on a cycle
// (message names a node on it).
enum opq_status opq_graph_sort(struct opq_graph *g);
// Checks every invariant (single producer, users consistent, topological order, every node input
// defined, no duplicate names, graph outputs produced); OPQ_ERR_INVALID_MODEL naming the first
// violation.
enum opq_status opq_graph_verify(struct opq_graph *g);

#endif
