/* upgrade_opset.c: raises the model's ai.onnx opset (13..20) to a target (default 21, at most 21)
 * so that later passes may write what only the newer opset has, above all INT4/UINT4
 * QuantizeLinear/DequantizeLinear at 21.
 *
 * Matches: every default-domain node ("" or "ai.onnx"); other domains are left alone.
 * Rewrites, for each op whose signature changed in (model opset, target] (ONNX Changelog.md):
 *   - ReduceMean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare (18): the `axes` attribute becomes
 *     the int64 `axes` input (an initializer, shared between nodes with equal axes);
 *   - Split (18): without a `split` input, num_outputs = the output count (13 requires an even
 *     split, so the chunks are the same);
 *   - RoiAlign (16): coordinate_transformation_mode = output_half_pixel, the behaviour of 10;
 *   - GridSample (20): mode bilinear/bicubic renamed linear/cubic;
 *   - DFT (20): the `axis` attribute becomes the scalar `axis` input (its default 1 written out,
 *     since the input's default is -2);
 *   - GroupNormalization (21): per-group scale/bias initializers repeated per channel.
 * Every other version change in 14..21 only adds types, attributes whose defaults keep the old
 * behaviour, or new ops, and needs nothing.
 * Refuses (OPQ_ERR_UNSUPPORTED, naming the node and op): ops with subgraphs (If, Loop, Scan,
 * SequenceMap, or any graph attribute: their bodies are not modelled), BatchNormalization with
 * training outputs across 14, GroupNormalization whose scale/bias are not initializers or whose
 * channel count is unknown, and default-domain ops it does not know. A target below the model's
 * opset is a usage error; models below opset 13 are refused.
 * Then sets the ai.onnx opset import to the target and the IR version to at least the one the
 * target needs (10 for 21). Nothing is changed when it fails. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "pass.h"

#define UPGRADE_MAX_OPSET 21
#define UPGRADE_MIN_OPSET 13

enum rule {
    R_SAME,     // no change needed for existing nodes (types, defaulted attributes, new op)
    R_REDUCE,   // 18: axes attribute -> input 1
    R_SPLIT,    // 18: num_outputs when there is no split input
    R_ROIALIGN, // 16: the old coordinate mode made explicit
    R_GRIDSMP,  // 20: mode names
    R_DFT,      // 20: axis attribute -> input 2
    R_GROUPNRM, // 21: scale/bias per channel
    R_BATCHNRM, // 14: training outputs dropped
    R_SUBGRAPH, // bodies not modelled
};

struct op_rule {
    const char *op;
    enum rule   rule;
    int         since; // the version that needs the rewrite (rules other than R_SAME)
};

// Every ai.onnx op up to opset 21, sorted by name for bsearch (strcmp order).
static const struct op_rule rules[] = {
    {"Abs", R_SAME, 0}, {"Acos", R_SAME, 0}, {"Acosh", R_SAME, 0}, {"Add", R_SAME, 0},
    {"AffineGrid", R_SAME, 0}, {"And", R_SAME, 0}, {"ArgMax", R_SAME, 0}, {"ArgMin", R_SAME, 0},
    {"Asin", R_SAME, 0}, {"Asinh", R_SAME, 0}, {"Atan", R_SAME, 0}, {"Atanh", R_SAME, 0},
    {"AveragePool", R_SAME, 0}, {"BatchNormalization", R_BATCHNRM, 14}, {"Bernoulli", R_SAME, 0},
    {"BitShift", R_SAME, 0}, {"BitwiseAnd", R_SAME, 0}, {"BitwiseNot", R_SAME, 0},
    {"BitwiseOr", R_SAME, 0}, {"BitwiseXor", R_SAME, 0}, {"BlackmanWindow", R_SAME, 0},
    {"Cast", R_SAME, 0}, {"CastLike", R_SAME, 0}, {"Ceil", R_SAME, 0}, {"Celu", R_SAME, 0},
    {"CenterCropPad", R_SAME, 0}, {"Clip", R_SAME, 0}, {"Col2Im", R_SAME, 0},
    {"Compress", R_SAME, 0}, {"Concat", R_SAME, 0}, {"ConcatFromSequence", R_SAME, 0},
    {"Constant", R_SAME, 0}, {"ConstantOfShape", R_SAME, 0}, {"Conv", R_SAME, 0},
    {"ConvInteger", R_SAME, 0}, {"ConvTranspose", R_SAME, 0}, {"Cos", R_SAME, 0},
    {"Cosh", R_SAME, 0}, {"CumSum", R_SAME, 0}, {"DFT", R_DFT, 20}, {"DeformConv", R_SAME, 0},
    {"DepthToSpace", R_SAME, 0}, {"DequantizeLinear", R_SAME, 0}, {"Det", R_SAME, 0},
    {"Div", R_SAME, 0}, {"Dropout", R_SAME, 0}, {"DynamicQuantizeLinear", R_SAME, 0},
    {"Einsum", R_SAME, 0}, {"Elu", R_SAME, 0}, {"Equal", R_SAME, 0}, {"Erf", R_SAME, 0},
    {"Exp", R_SAME, 0}, {"Expand", R_SAME, 0}, {"EyeLike", R_SAME, 0}, {"Flatten", R_SAME, 0},
    {"Floor", R_SAME, 0}, {"GRU", R_SAME, 0}, {"Gather", R_SAME, 0},
    {"GatherElements", R_SAME, 0}, {"GatherND", R_SAME, 0}, {"Gelu", R_SAME, 0},
    {"Gemm", R_SAME, 0}, {"GlobalAveragePool", R_SAME, 0}, {"GlobalLpPool", R_SAME, 0},
    {"GlobalMaxPool", R_SAME, 0}, {"Greater", R_SAME, 0}, {"GreaterOrEqual", R_SAME, 0},
    {"GridSample", R_GRIDSMP, 20}, {"GroupNormalization", R_GROUPNRM, 21},
    {"HammingWindow", R_SAME, 0}, {"HannWindow", R_SAME, 0}, {"HardSigmoid", R_SAME, 0},
    {"HardSwish", R_SAME, 0}, {"Hardmax", R_SAME, 0}, {"Identity", R_SAME, 0},
    {"If", R_SUBGRAPH, 0}, {"ImageDecoder", R_SAME, 0}, {"InstanceNormalization", R_SAME, 0},
    {"IsInf", R_SAME, 0}, {"IsNaN", R_SAME, 0}, {"LRN", R_SAME, 0}, {"LSTM", R_SAME, 0},
    {"LayerNormalization", R_SAME, 0}, {"LeakyRelu", R_SAME, 0}, {"Less", R_SAME, 0},
    {"LessOrEqual", R_SAME, 0}, {"Log", R_SAME, 0}, {"LogSoftmax", R_SAME, 0},
    {"Loop", R_SUBGRAPH, 0}, {"LpNormalization", R_SAME, 0}, {"LpPool", R_SAME, 0},
    {"MatMul", R_SAME, 0}, {"MatMulInteger", R_SAME, 0}, {"Max", R_SAME, 0},
    {"MaxPool", R_SAME, 0}, {"MaxRoiPool", R_SAME, 0}, {"MaxUnpool", R_SAME, 0},
    {"Mean", R_SAME, 0}, {"MeanVarianceNormalization", R_SAME, 0},
    {"MelWeightMatrix", R_SAME, 0}, {"Min", R_SAME, 0}, {"Mish", R_SAME, 0}, {"Mod", R_SAME, 0},
    {"Mul", R_SAME, 0}, {"Multinomial", R_SAME, 0}, {"Neg", R_SAME, 0},
    {"NegativeLogLikelihoodLoss", R_SAME, 0}, {"NonMaxSuppression", R_SAME, 0},
    {"NonZero", R_SAME, 0}, {"Not", R_SAME, 0}, {"OneHot", R_SAME, 0}, {"Optional", R_SAME, 0},
    {"OptionalGetElement", R_SAME, 0}, {"OptionalHasElement", R_SAME, 0}, {"Or", R_SAME, 0},
    {"PRelu", R_SAME, 0}, {"Pad", R_SAME, 0}, {"Pow", R_SAME, 0}, {"QLinearConv", R_SAME, 0},
    {"QLinearMatMul", R_SAME, 0}, {"QuantizeLinear", R_SAME, 0}, {"RNN", R_SAME, 0},
    {"RandomNormal", R_SAME, 0}, {"RandomNormalLike", R_SAME, 0}, {"RandomUniform", R_SAME, 0},
    {"RandomUniformLike", R_SAME, 0}, {"Range", R_SAME, 0}, {"Reciprocal", R_SAME, 0},
    {"ReduceL1", R_REDUCE, 18}, {"ReduceL2", R_REDUCE, 18}, {"ReduceLogSum", R_REDUCE, 18},
    {"ReduceLogSumExp", R_REDUCE, 18}, {"ReduceMax", R_REDUCE, 18},
    {"ReduceMean", R_REDUCE, 18}, {"ReduceMin", R_REDUCE, 18}, {"ReduceProd", R_REDUCE, 18},
    {"ReduceSum", R_SAME, 0}, {"ReduceSumSquare", R_REDUCE, 18},
    {"RegexFullMatch", R_SAME, 0}, {"Relu", R_SAME, 0}, {"Reshape", R_SAME, 0},
    {"Resize", R_SAME, 0}, {"ReverseSequence", R_SAME, 0}, {"RoiAlign", R_ROIALIGN, 16},
    {"Round", R_SAME, 0}, {"STFT", R_SAME, 0}, {"Scan", R_SUBGRAPH, 0},
    {"ScatterElements", R_SAME, 0}, {"ScatterND", R_SAME, 0}, {"Selu", R_SAME, 0},
    {"SequenceAt", R_SAME, 0}, {"SequenceConstruct", R_SAME, 0}, {"SequenceEmpty", R_SAME, 0},
    {"SequenceErase", R_SAME, 0}, {"SequenceInsert", R_SAME, 0}, {"SequenceLength", R_SAME, 0},
    {"SequenceMap", R_SUBGRAPH, 0}, {"Shape", R_SAME, 0}, {"Shrink", R_SAME, 0},
    {"Sigmoid", R_SAME, 0}, {"Sign", R_SAME, 0}, {"Sin", R_SAME, 0}, {"Sinh", R_SAME, 0},
    {"Size", R_SAME, 0}, {"Slice", R_SAME, 0}, {"Softmax", R_SAME, 0},
    {"SoftmaxCrossEntropyLoss", R_SAME, 0}, {"Softplus", R_SAME, 0}, {"Softsign", R_SAME, 0},
    {"SpaceToDepth", R_SAME, 0}, {"Split", R_SPLIT, 18}, {"SplitToSequence", R_SAME, 0},
    {"Sqrt", R_SAME, 0}, {"Squeeze", R_SAME, 0}, {"StringConcat", R_SAME, 0},
    {"StringNormalizer", R_SAME, 0}, {"StringSplit", R_SAME, 0}, {"Sub", R_SAME, 0},
    {"Sum", R_SAME, 0}, {"Tan", R_SAME, 0}, {"Tanh", R_SAME, 0}, {"TfIdfVectorizer", R_SAME, 0},
    {"ThresholdedRelu", R_SAME, 0}, {"Tile", R_SAME, 0}, {"TopK", R_SAME, 0},
    {"Transpose", R_SAME, 0}, {"Trilu", R_SAME, 0}, {"Unique", R_SAME, 0},
    {"Unsqueeze", R_SAME, 0}, {"Where", R_SAME, 0}, {"Xor", R_SAME, 0},
};

static int rule_cmp(const void *key, const void *elem) {
    return strcmp(key, ((const struct op_rule *)elem)->op);
}

static const struct op_rule *rule_find(const char *op) {
    return bsearch(op, rules, ARRAY_SIZE(rules), sizeof(rules[0]), rule_cmp);
}

// The lowest IR version a model at this ai.onnx opset needs (ONNX Versioning.md).
static int64_t ir_for_opset(int64_t opset) {
    return opset >= 21 ? 10 : opset >= 19 ? 9 : opset >= 15 ? 8 : 7;
}

static bool default_domain(const char *d) {
    return !d || !*d || strcmp(d, "ai.onnx") == 0;
}

static struct opq_opset *default_opset(struct opq_model *m) {
    for (int i = 0; i < m->n_opsets; i++)
        if (default_domain(m->opsets[i].domain))
            return &m->opsets[i];
    return NULL;
}

struct upgrade {
    struct opq_pass_ctx *pc;
    struct opq_graph    *g;
    int64_t              from, to;
    // int64 initializers made here, for reuse by nodes with equal contents
    struct opq_value    *made[32];
    int                  n_made;
};

static const char *label(const struct opq_node *n) {
    return n->name[0] ? n->name : "(unnamed)";
}

static enum opq_status refuse(struct upgrade *u, const struct opq_node *n, const char *why) {
    return opq_set_error(u->pc->ctx, OPQ_ERR_UNSUPPORTED,
                         "node '%s' (%s): cannot upgrade from opset %lld to %lld: %s", label(n),
                         n->op_type, (long long)u->from, (long long)u->to, why);
}

// An int64 initializer holding vals (rank 1 of length cnt, or a scalar if scalar), reused if
// an equal one was made before.
static struct opq_value *int64_init(struct upgrade *u, const struct opq_node *n, const char *what,
                                    const int64_t *vals, int cnt, bool scalar) {
    for (int i = 0; i < u->n_made; i++) {
        const struct opq_tensor *t = &u->made[i]->t;
        if (t->ndim == (scalar ? 0 : 1) && t->nbytes == (size_t)cnt * sizeof(int64_t) &&
            (cnt == 0 || memcmp(t->data, vals, t->nbytes) == 0))
            return u->made[i];
    }
    char hint[256];
    snprintf(hint, sizeof(hint), "%s_%s", n->name[0] ? n->name : n->op_type, what);
    struct opq_value *v = opq_graph_value_new_unique(u->g, hint);
    if (!v)
        return NULL;
    struct opq_tensor t = {.dtype = OPQ_DTYPE_INT64, .ndim = scalar ? 0 : 1,
                           .shape = {cnt}, .data = (void *)vals,
                           .nbytes = (size_t)cnt * sizeof(int64_t)};
    if (opq_graph_set_initializer(u->g, v, &t) != OPQ_OK)
        return NULL;
    if (u->n_made < (int)ARRAY_SIZE(u->made))
        u->made[u->n_made++] = v;
    return v;
}

static enum opq_status nomem(struct upgrade *u, const struct opq_node *n) {
    return opq_set_error(u->pc->ctx, OPQ_ERR_NOMEM, "node '%s' (%s): out of memory", label(n),
                         n->op_type);
}

// Moves an INT(S) attribute to input slot `slot` as an int64 initializer. An absent attribute
// gives no input when def_cnt is 0, else the default values.
static enum opq_status attr_to_input(struct upgrade *u, struct opq_node *n, const char *attr,
                                     int slot, bool scalar, const int64_t *def, int def_cnt) {
    const struct opq_attr *a = opq_node_attr(n, attr);
    if (n->n_inputs > slot && n->inputs[slot])
        return refuse(u, n, a ? "has both the attribute and the input" : "unexpected input");
    const int64_t *vals = def;
    int            cnt  = def_cnt;
    if (a) {
        bool ok = scalar ? a->type == OPQ_ATTR_INT : a->type == OPQ_ATTR_INTS;
        if (!ok) {
            char why[96];
            snprintf(why, sizeof(why), "attribute '%s' is not of type %s", attr,
                     scalar ? "int" : "ints");
            return refuse(u, n, why);
        }
        vals = scalar ? &a->i : a->ints;
        cnt  = scalar ? 1 : a->n;
    }
    if (!a && def_cnt == 0)
        return OPQ_OK;
    struct opq_value *v = int64_init(u, n, attr, vals, cnt, scalar);
    enum opq_status   st;
    if (!v)
        return nomem(u, n);
    if (n->n_inputs <= slot && (st = opq_node_resize_inputs(u->g, n, slot + 1)) != OPQ_OK)
        return nomem(u, n);
    if ((st = opq_node_set_input(u->g, n, slot, v)) != OPQ_OK)
        return nomem(u, n);
    opq_node_remove_attr(n, attr);
    return OPQ_OK;
}

static enum opq_status add_attr(struct upgrade *u, struct opq_node *n, struct opq_attr a) {
    return opq_node_add_attr(u->g, n, &a) == OPQ_OK ? OPQ_OK : nomem(u, n);
}

static enum opq_status set_string_attr(struct upgrade *u, struct opq_node *n, const char *name,
                                       const char *val) {
    opq_node_remove_attr(n, name);
    char *s = opq_arena_strdup(u->g->arena, val);
    if (!s)
        return nomem(u, n);
    return add_attr(u, n, (struct opq_attr){.name = name, .type = OPQ_ATTR_STRING,
                                            .s = {strlen(s), (uint8_t *)s}});
}

static bool attr_is(const struct opq_attr *a, const char *s) {
    return a && a->type == OPQ_ATTR_STRING && a->s.len == strlen(s) &&
           memcmp(a->s.data, s, a->s.len) == 0;
}

// GroupNormalization 18 -> 21 needs float initializers scale and bias of shape [G] and a known
// channel count C divisible by G.
static enum opq_status groupnorm_check(struct upgrade *u, const struct opq_node *n) {
    const struct opq_value *x = n->n_inputs > 0 ? n->inputs[0] : NULL;
    int64_t groups = opq_node_attr_int(n, "num_groups", 0);
    if (!x || x->t.ndim < 2 || x->t.shape[1] <= 0)
        return refuse(u, n, "the channel count of the input is unknown");
    if (groups <= 0 || x->t.shape[1] % groups != 0)
        return refuse(u, n, "num_groups does not divide the channel count");
    for (int slot = 1; slot <= 2; slot++) {
        const struct opq_value *p = n->n_inputs > slot ? n->inputs[slot] : NULL;
        if (!p || !(p->kind & OPQ_VK_INIT) || (p->kind & OPQ_VK_INPUT) ||
            p->t.dtype != OPQ_DTYPE_FLOAT || p->t.ndim != 1 || p->t.shape[0] != groups)
            return refuse(u, n, "scale and bias must be float initializers of shape [num_groups]");
    }
    return OPQ_OK;
}

// ... and then gets them as [C], each group's value repeated over its C/G channels.
static enum opq_status groupnorm_apply(struct upgrade *u, struct opq_node *n) {
    int64_t c      = n->inputs[0]->t.shape[1];
    int64_t per    = c / opq_node_attr_int(n, "num_groups", 0);
    for (int slot = 1; slot <= 2; slot++) {
        const struct opq_value *p = n->inputs[slot];
        float *w = opq_arena_alloc_raw(u->g->arena, (size_t)c * sizeof(float));
        char   hint[256];
        snprintf(hint, sizeof(hint), "%s_per_channel", p->name);
        struct opq_value *v = w ? opq_graph_value_new_unique(u->g, hint) : NULL;
        if (!v)
            return nomem(u, n);
        for (int64_t i = 0; i < c; i++)
            w[i] = ((const float *)p->t.data)[i / per];
        struct opq_tensor t = {.dtype = OPQ_DTYPE_FLOAT, .ndim = 1, .shape = {c}, .data = w,
                               .nbytes = (size_t)c * sizeof(float)};
        if (opq_graph_set_initializer(u->g, v, &t) != OPQ_OK ||
            opq_node_set_input(u->g, n, slot, v) != OPQ_OK)
            return nomem(u, n);
    }
    return OPQ_OK;
}

// Checks one node (dry run) or rewrites it. Returns whether it was changed through *changed.
static enum opq_status upgrade_node(struct upgrade *u, struct opq_node *n, bool apply,
                                    bool *changed) {
    *changed = false;
    const struct op_rule *r = rule_find(n->op_type);
    if (!r)
        return refuse(u, n, "not an ai.onnx operator onnx-ptq knows");
    for (int i = 0; i < n->n_attrs; i++)
        if (n->attrs[i].type == OPQ_ATTR_GRAPH || n->attrs[i].type == OPQ_ATTR_GRAPHS)
            return refuse(u, n, "its subgraphs are not upgraded");
    if (r->rule == R_SUBGRAPH)
        return refuse(u, n, "its subgraphs are not upgraded");
    if (r->rule == R_SAME || !(u->from < r->since && r->since <= u->to))
        return OPQ_OK;
    static const int64_t one = 1;
    switch (r->rule) {
    case R_BATCHNRM:
        for (int o = 1; o < n->n_outputs; o++)
            if (n->outputs[o])
                return refuse(u, n, "training-mode outputs changed meaning at opset 14");
        return OPQ_OK;
    case R_GROUPNRM:
        *changed = true;
        return apply ? groupnorm_apply(u, n) : groupnorm_check(u, n);
    case R_REDUCE: {
        const struct opq_attr *a = opq_node_attr(n, "axes");
        if (!a)
            return OPQ_OK;
        *changed = true;
        if (!apply && n->n_inputs > 1 && n->inputs[1])
            return refuse(u, n, "has both the axes attribute and the axes input");
        if (!apply)
            return a->type == OPQ_ATTR_INTS ? OPQ_OK : refuse(u, n, "axes is not a list of ints");
        return attr_to_input(u, n, "axes", 1, false, NULL, 0);
    }
    case R_DFT:
        *changed = true;
        if (!apply && n->n_inputs > 2 && n->inputs[2])
            return refuse(u, n, "unexpected third input");
        if (!apply) {
            const struct opq_attr *a = opq_node_attr(n, "axis");
            return !a || a->type == OPQ_ATTR_INT ? OPQ_OK : refuse(u, n, "axis is not an int");
        }
        return attr_to_input(u, n, "axis", 2, true, &one, 1);
    case R_SPLIT:
        if ((n->n_inputs > 1 && n->inputs[1]) || opq_node_attr(n, "num_outputs"))
            return OPQ_OK;
        *changed = true;
        return apply ? add_attr(u, n, (struct opq_attr){.name = "num_outputs",
                                                        .type = OPQ_ATTR_INT,
                                                        .i = n->n_outputs})
                     : OPQ_OK;
    case R_ROIALIGN:
        if (opq_node_attr(n, "coordinate_transformation_mode"))
            return OPQ_OK;
        *changed = true;
        return apply ? set_string_attr(u, n, "coordinate_transformation_mode",
                                       "output_half_pixel")
                     : OPQ_OK;
    case R_GRIDSMP: {
        const struct opq_attr *a = opq_node_attr(n, "mode");
        const char *to = attr_is(a, "bilinear") ? "linear" : attr_is(a, "bicubic") ? "cubic" : NULL;
        if (!to)
            return OPQ_OK;
        *changed = true;
        return apply ? set_string_attr(u, n, "mode", to) : OPQ_OK;
    }
    default:
        return OPQ_OK;
    }
}

enum opq_status opq_pass_run_upgrade_opset(struct opq_pass_ctx *pc, struct opq_graph *g) {
    struct opq_model *m      = pc->model;
    struct opq_opset *os     = default_opset(m);
    int64_t           target = pc->opts->opset ? pc->opts->opset : UPGRADE_MAX_OPSET;
    if (!os)
        return opq_set_error(pc->ctx, OPQ_ERR_UNSUPPORTED, "%s: the model imports no ai.onnx "
                             "opset", m->path);
    if (target > UPGRADE_MAX_OPSET)
        return opq_set_error(pc->ctx, OPQ_ERR_USAGE, "target opset %lld: onnx-ptq upgrades to "
                             "opset %d at most", (long long)target, UPGRADE_MAX_OPSET);
    if (target < os->version)
        return opq_set_error(pc->ctx, OPQ_ERR_USAGE, "target opset %lld is below the model's "
                             "opset %lld (only upgrades are done)", (long long)target,
                             (long long)os->version);
    if (target == os->version)
        return OPQ_OK;
    if (os->version < UPGRADE_MIN_OPSET)
        return opq_set_error(pc->ctx, OPQ_ERR_UNSUPPORTED, "%s: opset %lld: onnx-ptq upgrades "
                             "models from opset %d on", m->path, (long long)os->version,
                             UPGRADE_MIN_OPSET);
    struct upgrade u = {.pc = pc, .g = g, .from = os->version, .to = target};
    // Check every node first so that a refusal leaves the model as it was.
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < g->n_nodes; i++) {
            struct opq_node *n = g->nodes[i];
            bool             changed;
            if ((n->flags & OPQ_NF_DEAD) || !default_domain(n->domain))
                continue;
            enum opq_status st = upgrade_node(&u, n, pass == 1, &changed);
            if (st != OPQ_OK)
                return st;
            pc->stats.n_rewrites += pass == 1 && changed;
        }
    }
    opq_log(pc->ctx, OPQ_LOG_INFO, "upgrade-opset: opset %lld -> %lld, %ld node(s) rewritten",
            (long long)u.from, (long long)u.to, pc->stats.n_rewrites);
    os->version = target;
    if (m->ir_version < ir_for_opset(target))
        m->ir_version = ir_for_opset(target);
    return OPQ_OK;
}
