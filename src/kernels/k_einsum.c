/* k_einsum.c: Einsum  https://onnx.ai/onnx/operators/onnx__Einsum.html  (opset 12+).
 *
 * Equation "lhs->rhs" or implicit (output = ellipsis dims, then labels used once, in ASCII order).
 * Labels are a-z/A-Z; "..." stands for the same broadcast dims in every term (right-aligned).
 *
 * Y[out labels] = sum over the other labels of prod_i X_i[labels of term i].
 *
 * Two float32 operands whose labels each appear at most once per term, with equal sizes wherever
 * they appear (the attention patterns exporters emit: "bhid,bhjd->bhij", "bhij,bhjd->bhid",
 * "...ij,...jk->...ik") take the fast path: classify labels into batch (both inputs and output),
 * contracted (both inputs only), left (A and output) and right (B and output), permute A to
 * [batch, left, contracted] and B to [batch, contracted, right], run one GEMM per batch, and
 * permute [batch, left, right] to the output order. Everything else (diagonals, one or 3+
 * operands, size-1 broadcasting, sums over a label of one operand) runs the general loop over
 * all labels, accumulating in double. No VJP. */
#include <string.h>

#include "arena.h"
#include "blas.h"
#include "graph.h"
#include "k_lutil.h"

#define EIN_MAX_OPS    8
#define EIN_LABELS     (52 + OPQ_MAX_DIMS) // a-z, A-Z, then one per ellipsis dim
#define EIN_MAX_LABELS 16

struct ein_plan {
    int     n_ops;
    int     n_lab[EIN_MAX_OPS];
    int     lab[EIN_MAX_OPS][OPQ_MAX_DIMS];
    int     n_out;
    int     out[OPQ_MAX_DIMS];
    int     n_all;                 // out labels first, then the summed ones
    int     all[EIN_MAX_LABELS];
    int64_t size[EIN_LABELS];      // -1 = label unused
};

static int label_id(char c) {
    if (c >= 'a' && c <= 'z')
        return c - 'a';
    if (c >= 'A' && c <= 'Z')
        return 26 + (c - 'A');
    return -1;
}

static enum opq_status ein_err(struct opq_kctx *k, const struct opq_node *n, const char *what) {
    return opq_set_error(k->ctx, OPQ_ERR_SHAPE, OPQ_KL_NODE_FMT ": %s", OPQ_KL_NODE(n), what);
}

// Parses one term [s, e) into labels; ell_rank dims replace "..." (global rank g).
static enum opq_status parse_term(struct opq_kctx *k, const struct opq_node *n, const char *s,
                                  const char *e, int ell_rank, int g, int *lab, int *n_lab) {
    int cnt = 0;
    for (const char *p = s; p < e; p++) {
        if (*p == ' ')
            continue;
        if (*p == '.') {
            if (e - p < 3 || p[1] != '.' || p[2] != '.')
                return ein_err(k, n, "malformed ellipsis");
            for (int j = 0; j < ell_rank; j++) {
                if (cnt >= OPQ_MAX_DIMS)
                    return ein_err(k, n, "term has too many dims");
                lab[cnt++] = 52 + (g - ell_rank + j);
            }
            p += 2;
            continue;
        }
        int id = label_id(*p);
        if (id < 0)
            return ein_err(k, n, "bad character in equation");
        if (cnt >= OPQ_MAX_DIMS)
            return ein_err(k, n, "term has too many dims");
        lab[cnt++] = id;
    }
    *n_lab = cnt;
    return OPQ_OK;
}

static int count_letters(const char *s, const char *e, bool *ell) {
    int c = 0;
    *ell = false;
    for (const char *p = s; p < e; p++) {
        if (label_id(*p) >= 0)
            c++;
        else if (*p == '.')
            *ell = true;
    }
    return c;
}

static enum opq_status ein_plan(struct opq_kctx *k, const struct opq_node *n,
                                const struct opq_tensor *const *in, struct ein_plan *p) {
    const struct opq_attr *a = opq_node_attr(n, "equation");
    if (!a || a->type != OPQ_ATTR_STRING || !a->s.data)
        return ein_err(k, n, "needs attribute 'equation'");
    const char *eq = (const char *)a->s.data;
    const char *end = eq + a->s.len;
    const char *arrow = NULL;
    for (const char *q = eq; q + 1 < end; q++)
        if (q[0] == '-' && q[1] == '>')
            arrow = q;
    const char *lhs_end = arrow ? arrow : end;
    memset(p, 0, sizeof(*p));
    for (int i = 0; i < EIN_LABELS; i++)
        p->size[i] = -1;
    if (n->n_inputs < 1 || n->n_inputs > EIN_MAX_OPS)
        return ein_err(k, n, "1 to 8 operands supported");
    p->n_ops = n->n_inputs;
    // Terms, and the global ellipsis rank.
    const char *ts[EIN_MAX_OPS];
    const char *te[EIN_MAX_OPS];
    int ell[EIN_MAX_OPS];
    int g = 0;
    int t = 0;
    for (const char *q = eq, *start = eq;; q++) {
        if (q == lhs_end || *q == ',') {
            if (t >= p->n_ops)
                return ein_err(k, n, "more terms than inputs");
            ts[t] = start;
            te[t] = q;
            t++;
            start = q + 1;
            if (q == lhs_end)
                break;
        }
    }
    if (t != p->n_ops)
        return ein_err(k, n, "fewer terms than inputs");
    for (int i = 0; i < t; i++) {
        bool has_ell = false;
        int letters = count_letters(ts[i], te[i], &has_ell);
        const struct opq_tensor *x = in[i];
        if (!x || x->ndim < 0)
            return ein_err(k, n, "operand rank unknown");
        ell[i] = x->ndim - letters;
        if (ell[i] < 0 || (!has_ell && ell[i] != 0))
            return ein_err(k, n, "term does not match its operand's rank");
        g = ell[i] > g ? ell[i] : g;
    }
    int count[EIN_LABELS] = {0};
    for (int i = 0; i < t; i++) {
        enum opq_status st = parse_term(k, n, ts[i], te[i], ell[i], g, p->lab[i], &p->n_lab[i]);
        if (st)
            return st;
        for (int d = 0; d < p->n_lab[i]; d++) {
            int l = p->lab[i][d];
            int64_t s = in[i]->shape[d];
            if (s < 0)
                return ein_err(k, n, "operand dims must be known");
            if (p->size[l] < 0 || p->size[l] == 1)
                p->size[l] = s;
            else if (s != p->size[l] && s != 1)
                return ein_err(k, n, "a label has different sizes in different operands");
            count[l]++;
        }
    }
    if (arrow) {
        int tmp[OPQ_MAX_DIMS];
        enum opq_status st = parse_term(k, n, arrow + 2, end, g, g, tmp, &p->n_out);
        if (st)
            return st;
        memcpy(p->out, tmp, sizeof(tmp));
        for (int d = 0; d < p->n_out; d++) {
            if (p->size[p->out[d]] < 0)
                return ein_err(k, n, "output label not in any input");
            for (int e2 = 0; e2 < d; e2++)
                if (p->out[e2] == p->out[d])
                    return ein_err(k, n, "output label repeated");
        }
    } else {
        for (int j = 0; j < g; j++)
            p->out[p->n_out++] = 52 + j;
        // ASCII order: 'A'..'Z' (ids 26..51) before 'a'..'z' (ids 0..25).
        for (int pass = 0; pass < 2; pass++)
            for (int l = pass ? 0 : 26; l < (pass ? 26 : 52); l++)
                if (count[l] == 1) {
                    if (p->n_out >= OPQ_MAX_DIMS)
                        return ein_err(k, n, "output rank too large");
                    p->out[p->n_out++] = l;
                }
    }
    bool in_out[EIN_LABELS] = {false};
    for (int d = 0; d < p->n_out; d++) {
        in_out[p->out[d]] = true;
        p->all[p->n_all++] = p->out[d];
    }
    for (int l = 0; l < EIN_LABELS; l++)
        if (p->size[l] >= 0 && !in_out[l]) {
            if (p->n_all >= EIN_MAX_LABELS)
                return ein_err(k, n, "too many labels");
            p->all[p->n_all++] = l;
        }
    return OPQ_OK;
}

static enum opq_status einsum_infer(struct opq_kctx *k, const struct opq_node *n,
                                    const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct ein_plan p;
    enum opq_status st = ein_plan(k, n, in, &p);
    if (st)
        return st;
    for (int i = 1; i < p.n_ops; i++)
        if (in[i]->dtype != in[0]->dtype)
            return ein_err(k, n, "operands differ in dtype");
    if (!opq_kl_dtype_is_float(in[0]->dtype) && !opq_kl_dtype_is_int(in[0]->dtype))
        return opq_set_error(k->ctx, OPQ_ERR_UNSUPPORTED, OPQ_KL_NODE_FMT ": dtype %s",
                             OPQ_KL_NODE(n), opq_dtype_name(in[0]->dtype));
    out->dtype = in[0]->dtype;
    out->ndim = p.n_out;
    for (int d = 0; d < p.n_out; d++)
        out->shape[d] = p.size[p.out[d]];
    return opq_kl_finish(k, n, out);
}

// Per-label element strides of operand i (0 where the operand lacks the label or is size 1).
static void label_strides(const struct ein_plan *p, const struct opq_tensor *x, int i,
                          int64_t *ls) {
    int64_t s[OPQ_MAX_DIMS];
    opq_kl_strides(x->ndim, x->shape, s);
    memset(ls, 0, sizeof(int64_t) * EIN_LABELS);
    for (int d = 0; d < p->n_lab[i]; d++)
        if (x->shape[d] != 1)
            ls[p->lab[i][d]] += s[d]; // repeated labels walk the diagonal
}

static enum opq_status einsum_general(struct opq_kctx *k, const struct opq_node *n,
                                      const struct ein_plan *p,
                                      const struct opq_tensor *const *in,
                                      struct opq_tensor *out) {
    int64_t str[EIN_MAX_OPS][EIN_MAX_LABELS];
    int64_t off[EIN_MAX_OPS] = {0};
    int64_t idx[EIN_MAX_LABELS] = {0};
    int64_t osz[EIN_MAX_LABELS];
    size_t n_outel = opq_kl_numel(out);
    size_t total = 1;
    for (int i = 0; i < p->n_ops; i++) {
        int64_t ls[EIN_LABELS];
        label_strides(p, in[i], i, ls);
        for (int j = 0; j < p->n_all; j++)
            str[i][j] = ls[p->all[j]];
    }
    for (int j = 0; j < p->n_all; j++) {
        osz[j] = p->size[p->all[j]];
        total *= (size_t)osz[j];
    }
    double *acc = opq_arena_alloc(k->scratch, (n_outel ? n_outel : 1) * sizeof(double));
    if (!acc)
        return opq_set_error(k->ctx, OPQ_ERR_NOMEM, OPQ_KL_NODE_FMT ": out of memory",
                             OPQ_KL_NODE(n));
    size_t per_out = n_outel ? total / n_outel : 0; // summed labels vary fastest
    for (size_t it = 0; it < total; it++) {
        double v = 1.0;
        for (int i = 0; i < p->n_ops; i++)
            v *= opq_kl_get_f64(in[i]->data, in[i]->dtype, (size_t)off[i]);
        acc[it / per_out] += v;
        for (int j = p->n_all - 1; j >= 0; j--) {
            idx[j]++;
            for (int i = 0; i < p->n_ops; i++)
                off[i] += str[i][j];
            if (idx[j] < osz[j])
                break;
            for (int i = 0; i < p->n_ops; i++)
                off[i] -= str[i][j] * osz[j];
            idx[j] = 0;
        }
    }
    for (size_t i = 0; i < n_outel; i++)
        opq_kl_set_f64(out->data, out->dtype, i, acc[i]);
    return OPQ_OK;
}

// Gathers x (labels lab[0..nl), dims = sizes) into dst ordered by `order` labels.
static void permute_labels(float *dst, const float *src, const struct ein_plan *p,
                           const struct opq_tensor *x, int i, const int *order, int n_order) {
    int64_t ls[EIN_LABELS];
    int64_t idx[OPQ_MAX_DIMS] = {0};
    int64_t str[OPQ_MAX_DIMS];
    int64_t sz[OPQ_MAX_DIMS];
    size_t total = 1;
    label_strides(p, x, i, ls);
    for (int d = 0; d < n_order; d++) {
        str[d] = ls[order[d]];
        sz[d] = p->size[order[d]];
        total *= (size_t)sz[d];
    }
    int64_t off = 0;
    for (size_t e = 0; e < total; e++) {
        dst[e] = src[off];
        for (int d = n_order - 1; d >= 0; d--) {
            idx[d]++;
            off += str[d];
            if (idx[d] < sz[d])
                break;
            off -= str[d] * sz[d];
            idx[d] = 0;
        }
    }
}

static bool has_label(const int *lab, int nl, int l) {
    for (int d = 0; d < nl; d++)
        if (lab[d] == l)
            return true;
    return false;
}

// The GEMM path; returns false (nothing written) when the pattern does not fit it.
static bool einsum_fast(struct opq_kctx *k, const struct ein_plan *p,
                        const struct opq_tensor *const *in, struct opq_tensor *out,
                        enum opq_status *st) {
    int bl[OPQ_MAX_DIMS], ml[OPQ_MAX_DIMS], kl[OPQ_MAX_DIMS], nl[OPQ_MAX_DIMS];
    int nb = 0, nm = 0, nk = 0, nn = 0;
    *st = OPQ_OK;
    if (p->n_ops != 2 || in[0]->dtype != OPQ_DTYPE_FLOAT)
        return false;
    for (int i = 0; i < 2; i++)
        for (int d = 0; d < p->n_lab[i]; d++) {
            if (in[i]->shape[d] != p->size[p->lab[i][d]])
                return false; // size-1 broadcasting
            for (int e = 0; e < d; e++)
                if (p->lab[i][e] == p->lab[i][d])
                    return false; // diagonal
        }
    for (int j = 0; j < p->n_all; j++) {
        int l = p->all[j];
        bool a = has_label(p->lab[0], p->n_lab[0], l);
        bool b = has_label(p->lab[1], p->n_lab[1], l);
        bool o = has_label(p->out, p->n_out, l);
        if (a && b && o)
            bl[nb++] = l;
        else if (a && b)
            kl[nk++] = l;
        else if (a && o)
            ml[nm++] = l;
        else if (b && o)
            nl[nn++] = l;
        else
            return false; // a label summed within one operand
    }
    int64_t B = 1, M = 1, N = 1, K = 1;
    int oa[OPQ_MAX_DIMS * 2], ob[OPQ_MAX_DIMS * 2], oc[OPQ_MAX_DIMS * 2];
    int na = 0, nbb = 0, nc = 0;
    for (int j = 0; j < nb; j++) {
        B *= p->size[bl[j]];
        oa[na++] = bl[j];
        ob[nbb++] = bl[j];
        oc[nc++] = bl[j];
    }
    for (int j = 0; j < nm; j++) {
        M *= p->size[ml[j]];
        oa[na++] = ml[j];
        oc[nc++] = ml[j];
    }
    for (int j = 0; j < nk; j++) {
        K *= p->size[kl[j]];
        oa[na++] = kl[j];
        ob[nbb++] = kl[j];
    }
    for (int j = 0; j < nn; j++) {
        N *= p->size[nl[j]];
        ob[nbb++] = nl[j];
        oc[nc++] = nl[j];
    }
    size_t bytes = sizeof(float) * (size_t)(B * M * K + B * K * N + B * M * N) + 3;
    float *buf = opq_arena_alloc_raw(k->scratch, bytes);
    if (!buf) {
        *st = OPQ_ERR_NOMEM;
        return true;
    }
    float *A = buf;
    float *Bm = A + B * M * K;
    float *C = Bm + B * K * N;
    permute_labels(A, in[0]->data, p, in[0], 0, oa, na);
    permute_labels(Bm, in[1]->data, p, in[1], 1, ob, nbb);
    for (int64_t b = 0; b < B; b++) {
        if (K == 0)
            memset(C + b * M * N, 0, sizeof(float) * (size_t)(M * N));
        else
            opq_sgemm(false, false, M, N, K, 1.0f, A + b * M * K, K, Bm + b * K * N, N, 0.0f,
                      C + b * M * N, N);
    }
    // C is ordered [batch, left, right]; bring it to the output order.
    struct ein_plan q = *p;
    struct opq_tensor ct = {.dtype = OPQ_DTYPE_FLOAT, .ndim = nc};
    q.n_lab[0] = nc;
    for (int d = 0; d < nc; d++) {
        q.lab[0][d] = oc[d];
        ct.shape[d] = p->size[oc[d]];
    }
    permute_labels(out->data, C, &q, &ct, 0, p->out, p->n_out);
    return true;
}

static enum opq_status einsum_forward(struct opq_kctx *k, const struct opq_node *n,
                                      const struct opq_tensor *const *in, struct opq_tensor *out) {
    struct ein_plan p;
    enum opq_status st = ein_plan(k, n, in, &p);
    if (st)
        return st;
    if (einsum_fast(k, &p, in, out, &st)) {
        if (st)
            return opq_set_error(k->ctx, st, OPQ_KL_NODE_FMT ": out of memory", OPQ_KL_NODE(n));
        return OPQ_OK;
    }
    return einsum_general(k, n, &p, in, out);
}

const struct opq_kernel opq_kernel_einsum = {
    .min_opset = 12,
    .infer     = einsum_infer,
    .forward   = einsum_forward,
};
