/* cleanup_dead.c: dead-code elimination.
 *
 * Matches: live nodes none of whose outputs is used by another node or listed as a graph output
 * (removing one can make its producers dead too, so the sweep runs from the last node backwards
 * and repeats until nothing changes); then values left without producer and users, i.e. unused
 * initializers and value_info entries.
 * Rewrites: marks those nodes dead and drops them and the values (opq_graph_cleanup).
 * Preserves: graph inputs and outputs (even unused inputs), node order, every computed output. */
#include "pass.h"

static bool node_needed(const struct opq_node *n) {
    for (int i = 0; i < n->n_outputs; i++) {
        const struct opq_value *o = n->outputs[i];
        if (o && (o->n_users > 0 || (o->kind & OPQ_VK_OUTPUT)))
            return true;
    }
    return false;
}

enum opq_status opq_pass_run_cleanup_dead(struct opq_pass_ctx *pc, struct opq_graph *g) {
    bool changed = true;
    while (changed) {
        changed = false;
        for (int i = g->n_nodes - 1; i >= 0; i--) {
            struct opq_node *n = g->nodes[i];
            if ((n->flags & OPQ_NF_DEAD) || node_needed(n))
                continue;
            opq_log(pc->ctx, OPQ_LOG_DEBUG, "cleanup-dead: node '%s' (%s) is unused", n->name,
                    n->op_type);
            opq_graph_mark_dead(g, n);
            pc->stats.n_rewrites++;
            changed = true;
        }
    }
    int n_values = g->n_values;
    enum opq_status st = opq_graph_cleanup(g);
    pc->stats.n_rewrites += n_values - g->n_values;
    return st;
}
