/* io_util.c: see io_util.h. */
#define _POSIX_C_SOURCE 200809L

#include "io_util.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

bool io_read_file(const char *path, void **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    bool ok = false;
    *buf = NULL;
    *len = 0;
    if (!f)
        return false;
    if (fseek(f, 0, SEEK_END) != 0)
        goto out;
    long sz = ftell(f);
    if (sz < 0 || fseek(f, 0, SEEK_SET) != 0)
        goto out;
    *buf = malloc(sz ? (size_t)sz : 1);
    if (!*buf)
        goto out;
    if (fread(*buf, 1, (size_t)sz, f) != (size_t)sz) {
        free(*buf);
        *buf = NULL;
        goto out;
    }
    *len = (size_t)sz;
    ok = true;
out:
    fclose(f);
    return ok;
}

bool io_write_file(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f)
        return false;
    bool ok = fwrite(buf, 1, len, f) == len;
    return fclose(f) == 0 && ok;
}

bool io_file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

bool io_mkdir(const char *path) {
    return mkdir(path, 0755) == 0;
}

char *io_tempdir(void) {
    const char *base = getenv("TMPDIR");
    if (!base || !*base)
        base = "/tmp";
    size_t n = strlen(base) + 32;
    char *p = malloc(n);
    if (!p)
        return NULL;
    snprintf(p, n, "%s/opq-test-XXXXXX", base);
    if (!mkdtemp(p)) {
        free(p);
        return NULL;
    }
    return p;
}

void io_rmtree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        size_t n = strlen(dir) + strlen(e->d_name) + 2;
        char *p = malloc(n);
        if (!p)
            continue;
        snprintf(p, n, "%s/%s", dir, e->d_name);
        struct stat sb;
        if (lstat(p, &sb) == 0 && S_ISDIR(sb.st_mode)) {
            chmod(p, 0700);
            io_rmtree(p);
        } else {
            unlink(p);
        }
        free(p);
    }
    closedir(d);
    rmdir(dir);
}

int io_count_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

struct path_list {
    char **v;
    int n, cap;
};

static void find_rec(const char *root, const char *name, struct path_list *pl) {
    DIR *d = opendir(root);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        size_t n = strlen(root) + strlen(e->d_name) + 2;
        char *p = malloc(n);
        if (!p)
            continue;
        snprintf(p, n, "%s/%s", root, e->d_name);
        struct stat sb;
        if (stat(p, &sb) != 0) {
            free(p);
        } else if (S_ISDIR(sb.st_mode)) {
            find_rec(p, name, pl);
            free(p);
        } else if (strcmp(e->d_name, name) == 0) {
            if (pl->n == pl->cap) {
                int nc = pl->cap ? pl->cap * 2 : 64;
                char **nv = realloc(pl->v, (size_t)nc * sizeof(*nv));
                if (!nv) {
                    free(p);
                    continue;
                }
                pl->v = nv;
                pl->cap = nc;
            }
            pl->v[pl->n++] = p;
        } else {
            free(p);
        }
    }
    closedir(d);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int io_find_files(const char *root, const char *name, char ***paths) {
    struct path_list pl = {NULL, 0, 0};
    find_rec(root, name, &pl);
    if (pl.n)
        qsort(pl.v, (size_t)pl.n, sizeof(*pl.v), cmp_str);
    *paths = pl.v;
    return pl.n;
}

void io_free_paths(char **paths, int n) {
    for (int i = 0; i < n; i++)
        free(paths[i]);
    free(paths);
}

// ---- IR comparison ------------------------------------------------------------------------------

struct cmp {
    char *why;
    size_t n;
};

static bool differ(struct cmp *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool differ(struct cmp *c, const char *fmt, ...) {
    if (c->why && c->n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->why, c->n, fmt, ap);
        va_end(ap);
    }
    return false;
}

static bool str_eq(const char *a, const char *b) {
    return strcmp(a ? a : "", b ? b : "") == 0;
}

static bool bytes_eq(const struct opq_bytes *a, const struct opq_bytes *b) {
    return a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0);
}

static bool tensor_eq(struct cmp *c, const char *what, const struct opq_tensor *a,
                      const struct opq_tensor *b, bool data) {
    if (a->dtype != b->dtype)
        return differ(c, "%s: dtype %d vs %d", what, a->dtype, b->dtype);
    if (a->ndim != b->ndim)
        return differ(c, "%s: rank %d vs %d", what, a->ndim, b->ndim);
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i])
            return differ(c, "%s: dim %d is %lld vs %lld", what, i, (long long)a->shape[i],
                          (long long)b->shape[i]);
    if (!data)
        return true;
    if (a->nbytes != b->nbytes)
        return differ(c, "%s: %zu vs %zu bytes", what, a->nbytes, b->nbytes);
    if (a->dtype == OPQ_DTYPE_STRING) {
        const struct opq_bytes *sa = a->data;
        const struct opq_bytes *sb = b->data;
        for (size_t i = 0; i < a->nbytes / sizeof(*sa); i++)
            if (!bytes_eq(&sa[i], &sb[i]))
                return differ(c, "%s: string %zu differs", what, i);
        return true;
    }
    if (a->nbytes && memcmp(a->data, b->data, a->nbytes) != 0)
        return differ(c, "%s: data bytes differ", what);
    return true;
}

static bool value_eq(struct cmp *c, const char *list, const struct opq_value *a,
                     const struct opq_value *b) {
    char what[256];
    snprintf(what, sizeof(what), "%s '%s'", list, a->name);
    if (!str_eq(a->name, b->name))
        return differ(c, "%s: named '%s' on the other side", what, b->name);
    if (a->kind != b->kind)
        return differ(c, "%s: kind 0x%x vs 0x%x", what, a->kind, b->kind);
    if (!tensor_eq(c, what, &a->t, &b->t, (a->kind & OPQ_VK_INIT) != 0))
        return false;
    for (int i = 0; i < a->t.ndim; i++)
        if (!str_eq(a->dim_param[i], b->dim_param[i]))
            return differ(c, "%s: symbolic dim %d '%s' vs '%s'", what, i,
                          a->dim_param[i] ? a->dim_param[i] : "",
                          b->dim_param[i] ? b->dim_param[i] : "");
    return true;
}

static bool value_list_eq(struct cmp *c, const char *list, struct opq_value *const *a, int na,
                          struct opq_value *const *b, int nb) {
    if (na != nb)
        return differ(c, "%s: %d vs %d entries", list, na, nb);
    for (int i = 0; i < na; i++)
        if (!value_eq(c, list, a[i], b[i]))
            return false;
    return true;
}

static bool attr_eq(struct cmp *c, const struct opq_node *n, const struct opq_attr *a,
                    const struct opq_attr *b) {
    char what[256];
    snprintf(what, sizeof(what), "node '%s' attribute '%s'", n->name, a->name);
    if (!str_eq(a->name, b->name) || a->type != b->type || a->n != b->n)
        return differ(c, "%s: name/type/count differ ('%s' type %d n %d vs type %d n %d)", what,
                      b->name, a->type, a->n, b->type, b->n);
    if (!str_eq(a->ref_attr_name, b->ref_attr_name))
        return differ(c, "%s: ref_attr_name differs", what);
    switch (a->type) {
    case OPQ_ATTR_FLOAT:
        if (memcmp(&a->f, &b->f, sizeof(a->f)) != 0)
            return differ(c, "%s: float differs", what);
        break;
    case OPQ_ATTR_INT:
        if (a->i != b->i)
            return differ(c, "%s: %lld vs %lld", what, (long long)a->i, (long long)b->i);
        break;
    case OPQ_ATTR_STRING:
        if (!bytes_eq(&a->s, &b->s))
            return differ(c, "%s: string differs", what);
        break;
    case OPQ_ATTR_TENSOR:
        return tensor_eq(c, what, a->t, b->t, true);
    case OPQ_ATTR_FLOATS:
        if (a->n && memcmp(a->floats, b->floats, (size_t)a->n * sizeof(float)) != 0)
            return differ(c, "%s: floats differ", what);
        break;
    case OPQ_ATTR_INTS:
        if (a->n && memcmp(a->ints, b->ints, (size_t)a->n * sizeof(int64_t)) != 0)
            return differ(c, "%s: ints differ", what);
        break;
    case OPQ_ATTR_STRINGS:
        for (int i = 0; i < a->n; i++)
            if (!bytes_eq(&a->strings[i], &b->strings[i]))
                return differ(c, "%s: string %d differs", what, i);
        break;
    case OPQ_ATTR_TENSORS:
        for (int i = 0; i < a->n; i++)
            if (!tensor_eq(c, what, a->tensors[i], b->tensors[i], true))
                return false;
        break;
    default: // graphs, sparse tensors, type protos: opaque to the IR, compared by count above
        break;
    }
    return true;
}

static bool node_eq(struct cmp *c, const struct opq_node *a, const struct opq_node *b) {
    if (!str_eq(a->op_type, b->op_type) || !str_eq(a->domain, b->domain) ||
        !str_eq(a->name, b->name) || a->op != b->op)
        return differ(c, "node %d: '%s' %s/%s vs '%s' %s/%s", a->index, a->name, a->domain,
                      a->op_type, b->name, b->domain, b->op_type);
    if (a->n_inputs != b->n_inputs || a->n_outputs != b->n_outputs || a->n_attrs != b->n_attrs)
        return differ(c, "node '%s': input/output/attribute counts differ", a->name);
    for (int i = 0; i < a->n_inputs; i++) {
        const char *x = a->inputs[i] ? a->inputs[i]->name : NULL;
        const char *y = b->inputs[i] ? b->inputs[i]->name : NULL;
        if (!x != !y || (x && strcmp(x, y) != 0))
            return differ(c, "node '%s': input %d differs", a->name, i);
    }
    for (int i = 0; i < a->n_outputs; i++) {
        const char *x = a->outputs[i] ? a->outputs[i]->name : NULL;
        const char *y = b->outputs[i] ? b->outputs[i]->name : NULL;
        if (!x != !y || (x && strcmp(x, y) != 0))
            return differ(c, "node '%s': output %d differs", a->name, i);
    }
    for (int i = 0; i < a->n_attrs; i++)
        if (!attr_eq(c, a, &a->attrs[i], &b->attrs[i]))
            return false;
    return true;
}

bool io_model_equal(const struct opq_model *a, const struct opq_model *b, char *why, size_t n) {
    struct cmp c = {why, n};
    if (why && n)
        why[0] = '\0';
    if (a->ir_version != b->ir_version || a->model_version != b->model_version)
        return differ(&c, "ir_version/model_version differ");
    if (!str_eq(a->producer_name, b->producer_name) ||
        !str_eq(a->producer_version, b->producer_version) || !str_eq(a->domain, b->domain))
        return differ(&c, "producer or domain differ");
    if (a->n_opsets != b->n_opsets)
        return differ(&c, "%d vs %d opsets", a->n_opsets, b->n_opsets);
    for (int i = 0; i < a->n_opsets; i++)
        if (!str_eq(a->opsets[i].domain, b->opsets[i].domain) ||
            a->opsets[i].version != b->opsets[i].version)
            return differ(&c, "opset %d differs", i);
    if (a->n_metadata != b->n_metadata)
        return differ(&c, "%d vs %d metadata entries", a->n_metadata, b->n_metadata);
    for (int i = 0; i < a->n_metadata; i++)
        if (!str_eq(a->metadata[i].key, b->metadata[i].key) ||
            !str_eq(a->metadata[i].value, b->metadata[i].value))
            return differ(&c, "metadata %d differs", i);
    const struct opq_graph *ga = a->graph;
    const struct opq_graph *gb = b->graph;
    if (!str_eq(ga->name, gb->name))
        return differ(&c, "graph name '%s' vs '%s'", ga->name, gb->name);
    if (!value_list_eq(&c, "input", ga->inputs, ga->n_inputs, gb->inputs, gb->n_inputs) ||
        !value_list_eq(&c, "output", ga->outputs, ga->n_outputs, gb->outputs, gb->n_outputs) ||
        !value_list_eq(&c, "initializer", ga->inits, ga->n_inits, gb->inits, gb->n_inits) ||
        !value_list_eq(&c, "value_info", ga->infos, ga->n_infos, gb->infos, gb->n_infos))
        return false;
    if (ga->n_nodes != gb->n_nodes)
        return differ(&c, "%d vs %d nodes", ga->n_nodes, gb->n_nodes);
    for (int i = 0; i < ga->n_nodes; i++)
        if (!node_eq(&c, ga->nodes[i], gb->nodes[i]))
            return false;
    return true;
}
