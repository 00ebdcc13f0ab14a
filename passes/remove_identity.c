/* remove_identity.c: removes no-op nodes.
 *
 * Matches: Identity, and Dropout in inference mode: training_mode input absent or an initializer
 * holding false, no legacy is_test=0 attribute, and the optional mask output unused.
 * Rewrites: every use of the node's output becomes a use of its input; the node is marked dead.
 * Preserves: graph outputs keep their names, so a node whose output is a graph output stays (ONNX
 * gives no other way to name a graph input or another node's result as that output). */
#include "pass.h"

// Dropout is an identity at inference: ratio is ignored unless training_mode is true.
static bool dropout_is_identity(const struct opq_node *n) {
    if (opq_node_attr_int(n, "is_test", 1) == 0) // opsets < 7: is_test=0 means training
        return false;
    if (n->n_inputs > 2 && n->inputs[2]) {
        const struct opq_value *tm = n->inputs[2];
        if (!(tm->kind & OPQ_VK_INIT) || (tm->kind & OPQ_VK_INPUT) || tm->t.dtype != OPQ_DTYPE_BOOL
            || tm->t.nbytes != 1 || ((const uint8_t *)tm->t.data)[0] != 0)
            return false;
    }
    if (n->n_outputs > 1 && n->outputs[1]) {
        const struct opq_value *mask = n->outputs[1];
        if (mask->n_users > 0 || (mask->kind & OPQ_VK_OUTPUT))
            return false;
    }
    return true;
}

enum opq_status opq_pass_run_remove_identity(struct opq_pass_ctx *pc, struct opq_graph *g) {
    for (int i = 0; i < g->n_nodes; i++) {
        struct opq_node *n = g->nodes[i];
        if (n->flags & OPQ_NF_DEAD)
            continue;
        if (n->op != OPQ_OP_IDENTITY && !(n->op == OPQ_OP_DROPOUT && dropout_is_identity(n)))
            continue;
        if (n->n_inputs < 1 || !n->inputs[0] || n->n_outputs < 1 || !n->outputs[0])
            continue;
        struct opq_value *in  = n->inputs[0];
        struct opq_value *out = n->outputs[0];
        if (out->kind & OPQ_VK_OUTPUT)
            continue;
        enum opq_status st = opq_graph_replace_uses(g, out, in);
        if (st != OPQ_OK)
            return st;
        opq_graph_mark_dead(g, n);
        pc->stats.n_rewrites++;
    }
    return OPQ_OK;
}
