/* io_pbw.c: see io_pbw.h. */
#include "io_pbw.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void reserve(struct pbw *w, size_t extra) {
    if (w->n + extra <= w->cap)
        return;
    size_t nc = w->cap ? w->cap * 2 : 64;
    while (nc < w->n + extra)
        nc *= 2;
    uint8_t *nb = realloc(w->b, nc);
    if (!nb) {
        fprintf(stderr, "io_pbw: out of memory\n");
        abort();
    }
    w->b = nb;
    w->cap = nc;
}

void pbw_free(struct pbw *w) {
    free(w->b);
    w->b = NULL;
    w->n = 0;
    w->cap = 0;
}

void pbw_raw(struct pbw *w, const void *p, size_t n) {
    reserve(w, n);
    if (n)
        memcpy(w->b + w->n, p, n);
    w->n += n;
}

void pbw_varint(struct pbw *w, uint64_t v) {
    uint8_t tmp[10];
    size_t n = 0;
    do {
        tmp[n] = (uint8_t)(v & 0x7f);
        v >>= 7;
        if (v)
            tmp[n] |= 0x80;
        n++;
    } while (v);
    pbw_raw(w, tmp, n);
}

static void key(struct pbw *w, int field, int wt) {
    pbw_varint(w, ((uint64_t)field << 3) | (uint64_t)wt);
}

void pbw_int(struct pbw *w, int field, int64_t v) {
    key(w, field, 0);
    pbw_varint(w, (uint64_t)v);
}

void pbw_f32(struct pbw *w, int field, float v) {
    key(w, field, 5);
    pbw_raw(w, &v, 4);
}

void pbw_bytes(struct pbw *w, int field, const void *p, size_t n) {
    key(w, field, 2);
    pbw_varint(w, n);
    pbw_raw(w, p, n);
}

void pbw_str(struct pbw *w, int field, const char *s) {
    pbw_bytes(w, field, s, strlen(s));
}

void pbw_msg(struct pbw *w, int field, struct pbw *sub) {
    pbw_bytes(w, field, sub->b, sub->n);
    pbw_free(sub);
}

void pbw_packed_f32(struct pbw *w, int field, const float *v, size_t n) {
    pbw_bytes(w, field, v, n * sizeof(*v));
}

void pbw_packed_f64(struct pbw *w, int field, const double *v, size_t n) {
    pbw_bytes(w, field, v, n * sizeof(*v));
}

void pbw_packed_varint(struct pbw *w, int field, const int64_t *v, size_t n) {
    struct pbw sub = {0};
    for (size_t i = 0; i < n; i++)
        pbw_varint(&sub, (uint64_t)v[i]);
    pbw_msg(w, field, &sub);
}

struct pbw pbw_value_info(const char *name, int elem_type, int ndim, const int64_t *dims, int sym) {
    struct pbw vi = {0}, tp = {0}, tt = {0}, sh = {0};
    pbw_str(&vi, PBW_VI_NAME, name);
    if (elem_type)
        pbw_int(&tt, PBW_TT_ELEM, elem_type);
    if (ndim >= 0) {
        for (int i = 0; i < ndim; i++) {
            struct pbw d = {0};
            if (dims[i] >= 0) {
                pbw_int(&d, PBW_DIM_VALUE, dims[i]);
            } else if (sym) {
                char p[16];
                snprintf(p, sizeof(p), "N%d", i);
                pbw_str(&d, PBW_DIM_PARAM, p);
            }
            pbw_msg(&sh, PBW_SHAPE_DIM, &d);
        }
        pbw_msg(&tt, PBW_TT_SHAPE, &sh);
    }
    pbw_msg(&tp, PBW_TP_TENSOR, &tt);
    pbw_msg(&vi, PBW_VI_TYPE, &tp);
    pbw_free(&sh);
    return vi;
}

static void str_list(struct pbw *w, int field, const char *list) {
    if (!list || !*list)
        return;
    const char *p = list;
    for (;;) {
        const char *c = strchr(p, ',');
        size_t n = c ? (size_t)(c - p) : strlen(p);
        pbw_bytes(w, field, p, n);
        if (!c)
            break;
        p = c + 1;
    }
}

struct pbw pbw_node(const char *op_type, const char *name, const char *inputs,
                    const char *outputs) {
    struct pbw n = {0};
    str_list(&n, PBW_N_INPUT, inputs);
    str_list(&n, PBW_N_OUTPUT, outputs);
    if (name)
        pbw_str(&n, PBW_N_NAME, name);
    pbw_str(&n, PBW_N_OP_TYPE, op_type);
    return n;
}

struct pbw pbw_tensor_raw(const char *name, int dt, int ndim, const int64_t *dims, const void *raw,
                          size_t n) {
    struct pbw t = {0};
    for (int i = 0; i < ndim; i++)
        pbw_int(&t, PBW_T_DIMS, dims[i]);
    pbw_int(&t, PBW_T_DATA_TYPE, dt);
    pbw_str(&t, PBW_T_NAME, name);
    pbw_bytes(&t, PBW_T_RAW, raw, n);
    return t;
}

struct pbw pbw_model(struct pbw *graph) {
    struct pbw m = {0}, os = {0};
    pbw_int(&m, PBW_M_IR_VERSION, 8);
    pbw_str(&m, PBW_M_PRODUCER, "pbw");
    pbw_msg(&m, PBW_M_GRAPH, graph);
    pbw_str(&os, PBW_OPSET_DOMAIN, "");
    pbw_int(&os, PBW_OPSET_VERSION, 17);
    pbw_msg(&m, PBW_M_OPSET, &os);
    return m;
}
