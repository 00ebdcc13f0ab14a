/* main.c: the onnx-ptq program: argument parsing, the log sink, exit codes, subcommand dispatch
 * and the main form `onnx-ptq IN.onnx OUT.onnx [options]` (load, run a pipeline, save).
 * Everything else is the library's job; this file only maps its statuses to exit codes and prints
 * its one-line messages. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "pass.h"
#include "quantize.h"

#ifndef OPQ_VERSION_STRING
#define OPQ_VERSION_STRING "unknown"
#endif

int cli_exit_code(enum opq_status st) {
    switch (st) {
    case OPQ_OK: return CLI_EXIT_OK;
    case OPQ_ERR_USAGE: return CLI_EXIT_USAGE;
    case OPQ_ERR_IO: return CLI_EXIT_IO;
    case OPQ_ERR_PARSE:
    case OPQ_ERR_INVALID_MODEL:
    case OPQ_ERR_UNSUPPORTED:
    case OPQ_ERR_SHAPE:
    case OPQ_ERR_NUMERIC: return CLI_EXIT_INPUT;
    case OPQ_ERR_NOMEM:
    case OPQ_ERR_INTERNAL: return CLI_EXIT_INTERNAL;
    }
    return CLI_EXIT_INTERNAL;
}

void cli_error(const char *fmt, ...) {
    char    msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++) // one line, whatever the message holds
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    fprintf(stderr, "onnx-ptq: %s\n", msg);
}

int cli_fail(struct opq_ctx *ctx, enum opq_status st, const char *what) {
    const char *msg = opq_ctx_errmsg(ctx);
    if (msg && *msg)
        cli_error("%s", msg);
    else
        cli_error("%s: %s", what, opq_status_str(st));
    return cli_exit_code(st);
}

static void log_sink(void *user, enum opq_log_level lvl, const char *msg) {
    (void)user;
    static const char *const tags[] = {"error: ", "warning: ", "", "debug: "};
    fprintf(stderr, "onnx-ptq: %s%s\n", tags[lvl <= OPQ_LOG_DEBUG ? lvl : OPQ_LOG_DEBUG], msg);
}

static const char usage_text[] =
    "usage: onnx-ptq IN.onnx OUT.onnx [options]   quantize a model (or run another pipeline)\n"
    "       onnx-ptq inspect MODEL.onnx           print a model summary\n"
    "       onnx-ptq run MODEL.onnx [options]     execute a model (onnx-ptq run --help)\n"
    "       onnx-ptq eval MODEL.onnx [options]    evaluate a model (onnx-ptq eval --help)\n"
    "A file named like a subcommand is given as ./run.\n"
    "\n"
    "options of the main form:\n"
    "  --method NAME     pass preset to run: rtn (default), erq, aphq, flexround, none;\n"
    "                    see --list-passes\n"
    "  --passes A,B,...  run these passes in this order instead of a method\n"
    "  --gelu-to-relu    swap every GELU for ReLU before quantizing (logs the float change)\n"
    "  --mlp-recon       MLP reconstruction before quantizing: GELU -> ReLU, then each MLP's\n"
    "                    float fc1/fc2 retrained against the GELU model (APHQ-ViT; --mr-*)\n"
    "  --opset N         first upgrade the model's ai.onnx opset (13..20) to N (up to 21),\n"
    "                    converting the ops whose signature changed, or refuse naming the node;\n"
    "                    at 21, 2..4-bit quantization writes INT4/UINT4 Q/DQ instead of the\n"
    "                    int8 Q -> Clip -> DQ emulation (with --passes: the target of upgrade-opset)\n"
    "  --verify          check the graph's invariants after every pass\n"
    "  --force           overwrite OUT if it exists (never when OUT is IN)\n"
    "  --external-data   write weights to OUT.data next to OUT\n"
    "  --seed N          seed of passes that use randomness (default 0)\n"
    "%s%s"
    "common options:\n"
    "  --threads N       worker threads (default 1)\n"
    "  -q, --quiet       only errors\n"
    "  -v, --verbose     also debug messages\n"
    "  --list-passes     list passes and methods\n"
    "  -h, --help        this text\n"
    "  --version         print the version\n"
    "\n"
    "exit status: 0 ok, 1 bad usage, 2 bad or unsupported input, 3 I/O error, 4 internal error\n";

struct main_opts {
    const char              *in, *out;
    const char              *method;
    char                    *passes;  // comma list, owned (strdup)
    bool                     force;
    bool                     external_data;
    bool                     gelu_to_relu;
    bool                     mlp_recon;
    bool                     upgrade;  // --opset given: the target is in pipe.opset
    struct opq_pipeline_opts pipe;
    struct opq_quant_opts    quant;
    const char              *report_path;
    int                      log_level;
};

static void list_passes(void) {
    printf("passes:\n");
    for (int i = 0; i < opq_pass_count(); i++)
        printf("  %-20s %s\n", opq_pass_at(i)->name, opq_pass_at(i)->doc);
    printf("methods (--method):\n");
    for (int i = 0; i < opq_method_count(); i++)
        printf("  %-20s %s\n", opq_method_name(i), opq_method_doc(i));
}

// Strict decimal parse of an option value into [lo, hi].
static bool parse_u64(const char *s, uint64_t lo, uint64_t hi, uint64_t *out) {
    if (!s || !*s || *s == '-' || *s == '+' || *s == ' ')
        return false;
    errno               = 0;
    char              *e = NULL;
    unsigned long long v = strtoull(s, &e, 10);
    if (errno || *e || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

// Option table shared by the main form and the subcommand pre-scan: the global options main.c
// applies to the context.
struct global_opts {
    int      log_level;
    uint64_t threads;
    uint64_t seed;
    bool     seed_set;
};

// If argv[*i] is a global option, consumes it (and its value) and returns 1; 0 if it is not one;
// -1 after printing a usage error.
static int take_global(int argc, char **argv, int *i, struct global_opts *g) {
    const char *a   = argv[*i];
    const char *val = NULL;
    bool        is_threads = false;
    if (strcmp(a, "-q") == 0 || strcmp(a, "--quiet") == 0) {
        g->log_level = OPQ_LOG_ERROR;
        return 1;
    }
    if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
        g->log_level = OPQ_LOG_DEBUG;
        return 1;
    }
    if (strncmp(a, "--threads", 9) == 0 && (a[9] == '\0' || a[9] == '='))
        is_threads = true;
    else if (!(strncmp(a, "--seed", 6) == 0 && (a[6] == '\0' || a[6] == '=')))
        return 0;
    const char *name = is_threads ? "--threads" : "--seed";
    size_t      nl   = strlen(name);
    if (a[nl] == '=') {
        val = a + nl + 1;
    } else if (*i + 1 < argc) {
        val = argv[++*i];
    } else {
        cli_error("%s needs a value", name);
        return -1;
    }
    bool ok = is_threads ? parse_u64(val, 1, 1024, &g->threads)
                         : parse_u64(val, 0, UINT64_MAX, &g->seed);
    if (!ok) {
        cli_error("%s: '%s' is not %s", name, val,
                  is_threads ? "a thread count from 1 to 1024" : "a non-negative integer");
        return -1;
    }
    g->seed_set |= !is_threads;
    return 1;
}

// Value of `--name VALUE` or `--name=VALUE` at argv[*i]; NULL if argv[*i] is another option.
// Sets *err on a missing value.
static const char *opt_value(int argc, char **argv, int *i, const char *name, bool *err) {
    const char *a  = argv[*i];
    size_t      nl = strlen(name);
    if (strncmp(a, name, nl) != 0)
        return NULL;
    if (a[nl] == '=')
        return a + nl + 1;
    if (a[nl] != '\0')
        return NULL;
    if (*i + 1 >= argc) {
        cli_error("%s needs a value", name);
        *err = true;
        return NULL;
    }
    return argv[++*i];
}

// The option name of "--name" or "--name=value" (a static buffer, valid until the next call).
static const char *option_name(const char *a) {
    static char buf[64];
    size_t      nl = strcspn(a, "=");
    snprintf(buf, sizeof(buf), "%.*s", (int)(nl < 63 ? nl : 63), a);
    return buf;
}

// Parses the main form. Returns -1 to continue, else an exit code (help, version, errors).
static int parse_main(int argc, char **argv, struct main_opts *o, struct global_opts *g) {
    bool only_positional = false;
    for (int i = 1; i < argc; i++) {
        const char *a   = argv[i];
        bool        err = false;
        const char *v;
        if (only_positional || a[0] != '-' || a[1] == '\0') {
            if (!o->in) {
                o->in = a;
            } else if (!o->out) {
                o->out = a;
            } else {
                cli_error("unexpected argument '%s' (one input and one output model)", a);
                return CLI_EXIT_USAGE;
            }
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_positional = true;
            continue;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            printf(usage_text, cli_quant_usage, cli_recon_usage);
            return CLI_EXIT_OK;
        }
        if (strcmp(a, "--version") == 0) {
            printf("onnx-ptq %s\n", OPQ_VERSION_STRING);
            return CLI_EXIT_OK;
        }
        if (strcmp(a, "--list-passes") == 0) {
            list_passes();
            return CLI_EXIT_OK;
        }
        int t = take_global(argc, argv, &i, g);
        if (t < 0)
            return CLI_EXIT_USAGE;
        if (t > 0)
            continue;
        if (strcmp(a, "--verify") == 0) {
            o->pipe.verify = true;
        } else if (strcmp(a, "--force") == 0) {
            o->force = true;
        } else if (strcmp(a, "--external-data") == 0) {
            o->external_data = true;
        } else if (strcmp(a, "--gelu-to-relu") == 0) {
            o->gelu_to_relu = true;
        } else if (strcmp(a, "--mlp-recon") == 0) {
            o->mlp_recon = true;
        } else if ((v = opt_value(argc, argv, &i, "--opset", &err)) || err) {
            uint64_t n;
            if (err)
                return CLI_EXIT_USAGE;
            if (!parse_u64(v, 1, 21, &n)) {
                cli_error("--opset: '%s' is not an opset from 13 to 21", v);
                return CLI_EXIT_USAGE;
            }
            o->upgrade    = true;
            o->pipe.opset = (int)n;
        } else if ((v = opt_value(argc, argv, &i, "--method", &err)) || err) {
            if (err)
                return CLI_EXIT_USAGE;
            o->method = v;
        } else if (cli_quant_takes_value(option_name(a))) {
            const char *name = option_name(a);
            v = opt_value(argc, argv, &i, name, &err);
            if (err || !v)
                return CLI_EXIT_USAGE;
            if (cli_quant_option(name, v, &o->quant, &o->report_path) < 0)
                return CLI_EXIT_USAGE;
        } else if ((v = opt_value(argc, argv, &i, "--passes", &err)) || err) {
            if (err)
                return CLI_EXIT_USAGE;
            free(o->passes);
            o->passes = strdup(v);
            if (!o->passes) {
                cli_error("out of memory");
                return CLI_EXIT_INTERNAL;
            }
        } else {
            cli_error("unknown option '%s' (see onnx-ptq --help)", a);
            return CLI_EXIT_USAGE;
        }
    }
    if (!o->in || !o->out) {
        cli_error("expected an input and an output model (see onnx-ptq --help)");
        return CLI_EXIT_USAGE;
    }
    if (!*o->in || !*o->out) {
        cli_error("empty %s file name", *o->in ? "output" : "input");
        return CLI_EXIT_USAGE;
    }
    if (o->method && o->passes) {
        cli_error("--method and --passes exclude each other");
        return CLI_EXIT_USAGE;
    }
    if ((o->gelu_to_relu || o->mlp_recon) && o->passes) {
        cli_error("--gelu-to-relu and --mlp-recon go with a method; with --passes, list "
                  "gelu-to-relu or mlp-recon there");
        return CLI_EXIT_USAGE;
    }
    if (o->gelu_to_relu && o->mlp_recon) {
        cli_error("--mlp-recon already swaps GELU for ReLU: drop --gelu-to-relu");
        return CLI_EXIT_USAGE;
    }
    return -1;
}

// Refuses OUT == IN (also through links) and an existing OUT without --force, and fails early
// when OUT's folder cannot be written (before a long pipeline runs).
static int check_output(const struct main_opts *o) {
    struct stat si, so;
    bool        in_ok = stat(o->in, &si) == 0;
    if (strcmp(o->in, o->out) == 0
        || (in_ok && stat(o->out, &so) == 0 && si.st_dev == so.st_dev && si.st_ino == so.st_ino)) {
        cli_error("output '%s' is the input model; choose another output file", o->out);
        return CLI_EXIT_USAGE;
    }
    if (stat(o->out, &so) == 0) {
        if (S_ISDIR(so.st_mode)) {
            cli_error("output '%s' is a folder", o->out);
            return CLI_EXIT_USAGE;
        }
        if (!o->force) {
            cli_error("output '%s' exists; use --force to overwrite it", o->out);
            return CLI_EXIT_USAGE;
        }
    }
    const char *slash = strrchr(o->out, '/');
    char       *dir   = slash ? strndup(o->out, (size_t)(slash - o->out)) : strdup(".");
    if (!dir) {
        cli_error("out of memory");
        return CLI_EXIT_INTERNAL;
    }
    const char *d  = *dir ? dir : "/";
    int         rc = -1;
    struct stat sd;
    if (stat(d, &sd) != 0) {
        cli_error("cannot write '%s': folder '%s': %s", o->out, d, strerror(errno));
        rc = CLI_EXIT_IO;
    } else if (!S_ISDIR(sd.st_mode)) {
        cli_error("cannot write '%s': '%s' is not a folder", o->out, d);
        rc = CLI_EXIT_IO;
    } else if (access(d, W_OK) != 0) {
        cli_error("cannot write '%s': folder '%s': %s", o->out, d, strerror(errno));
        rc = CLI_EXIT_IO;
    }
    free(dir);
    return rc;
}

// Splits the --passes list in place; empty entries are a usage error.
static int split_passes(char *list, const char **names, int cap, int *n) {
    *n = 0;
    for (char *p = list;;) {
        char *e = strchr(p, ',');
        if (e)
            *e = '\0';
        if (!*p) {
            cli_error("--passes: empty pass name in the list");
            return CLI_EXIT_USAGE;
        }
        if (*n == cap) {
            cli_error("--passes: more than %d passes", cap);
            return CLI_EXIT_USAGE;
        }
        names[(*n)++] = p;
        if (!e)
            return -1;
        p = e + 1;
    }
}

static int run_main(struct opq_ctx *ctx, struct main_opts *o) {
    struct opq_model *model = NULL;
    const char       *names[64];
    int               n_names = 0;
    int               rc      = check_output(o);
    if (rc >= 0)
        goto out;
    if (o->passes && (rc = split_passes(o->passes, names, 64, &n_names)) >= 0)
        goto out;
    // Check names before the (possibly long) load.
    const char     *method = o->method ? o->method : "rtn";
    enum opq_status st     = o->passes ? opq_pipeline_check_names(ctx, names, n_names)
                                       : opq_pipeline_check_method(ctx, method);
    if (st != OPQ_OK) {
        rc = cli_fail(ctx, st, o->passes ? "--passes" : "--method");
        goto out;
    }
    bool quantizes = o->passes ? false : opq_method_quantizes(method);
    if (o->passes && o->upgrade) {
        bool listed = false;
        for (int i = 0; i < n_names; i++)
            listed |= strcmp(names[i], "upgrade-opset") == 0;
        if (!listed) {
            cli_error("--opset with --passes: list upgrade-opset there (it upgrades to --opset N)");
            rc = CLI_EXIT_USAGE;
            goto out;
        }
    }
    if (!o->passes && (o->gelu_to_relu || o->mlp_recon || o->upgrade)) {
        // upgrade-opset first, then the method's passes with gelu-to-relu or mlp-recon in front
        // of the first quantizing one
        const char *mp[32];
        int nm = opq_method_passes(method, mp, 30);
        int at = nm;
        for (int i = 0; i < nm; i++)
            if (strncmp(mp[i], "quantize", 8) == 0 && at == nm)
                at = i;
        if (o->upgrade)
            names[n_names++] = "upgrade-opset";
        for (int i = 0; i < nm; i++) {
            if (i == at && (o->gelu_to_relu || o->mlp_recon))
                names[n_names++] = o->mlp_recon ? "mlp-recon" : "gelu-to-relu";
            names[n_names++] = mp[i];
        }
        if (at == nm && (o->gelu_to_relu || o->mlp_recon))
            names[n_names++] = o->mlp_recon ? "mlp-recon" : "gelu-to-relu";
        o->method = NULL;
    }
    // every quantizing pass (quantize, quantize-erq, -aphq, -flexround) and mlp-recon reads the
    // calibration data: refuse before loading when it is missing
    for (int i = 0; i < n_names; i++)
        quantizes |= strncmp(names[i], "quantize", 8) == 0 || strcmp(names[i], "mlp-recon") == 0;
    if (quantizes && !o->quant.calib.path) {
        cli_error("no calibration data: give --calib FILE.npy|FILE.npz|FOLDER (or --calib random "
                  "for a smoke test without real data; --method none skips quantization)");
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    if (quantizes && (st = opq_quant_opts_check(ctx, &o->quant)) != OPQ_OK) {
        rc = cli_fail(ctx, st, "options");
        goto out;
    }
    struct stat sc;
    if (quantizes && strcmp(o->quant.calib.path, "random") != 0 && stat(o->quant.calib.path, &sc) != 0) {
        cli_error("%s: %s", o->quant.calib.path, strerror(errno));
        rc = CLI_EXIT_IO;
        goto out;
    }
    struct opq_report *report = NULL;
    o->pipe.quant  = &o->quant;
    o->pipe.report = &report;
    cli_progress_install(ctx, o->log_level <= OPQ_LOG_ERROR);
    o->quant.recon.budget_start = opq_now_s(); // --time-budget counts from here
    st = opq_model_load(ctx, o->in, &model);
    if (st != OPQ_OK) {
        rc = cli_fail(ctx, st, o->in);
        goto out;
    }
    st = n_names ? opq_pipeline_run(ctx, model, names, n_names, &o->pipe)
                 : opq_pipeline_run_method(ctx, model, method, &o->pipe);
    if (st != OPQ_OK) {
        rc = cli_fail(ctx, st, o->in);
        goto out;
    }
    if (report && o->log_level >= OPQ_LOG_INFO)
        cli_report_print(report);
    if (report && o->report_path) {
        st = opq_report_write_json(ctx, report, o->report_path);
        if (st != OPQ_OK) {
            opq_report_free(report);
            rc = cli_fail(ctx, st, o->report_path);
            goto out;
        }
    }
    opq_report_free(report);
    struct opq_save_opts so = {.external_data = o->external_data};
    st                      = opq_model_save(ctx, model, o->out, &so);
    if (st != OPQ_OK) {
        rc = cli_fail(ctx, st, o->out);
        goto out;
    }
    opq_log(ctx, OPQ_LOG_INFO, "wrote %s", o->out);
    rc = CLI_EXIT_OK;
out:
    opq_model_free(model);
    return rc;
}

// Removes the global options from a subcommand's arguments (argv[0] is the subcommand word);
// returns the new argc, or -1 after a usage error. Everything after "--" is left alone.
static int strip_globals(int argc, char **argv, struct global_opts *g) {
    int k = 1;
    int i = 1;
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        int t = take_global(argc, argv, &i, g);
        if (t < 0)
            return -1;
        if (t == 0)
            argv[k++] = argv[i];
    }
    for (; i < argc; i++)
        argv[k++] = argv[i];
    argv[k] = NULL;
    return k;
}

int main(int argc, char **argv) {
    struct global_opts g   = {.log_level = OPQ_LOG_INFO, .threads = 1};
    struct main_opts   o   = {0};
    opq_quant_opts_default(&o.quant);
    int                rc  = CLI_EXIT_INTERNAL;
    struct opq_ctx    *ctx = opq_ctx_new();
    if (!ctx) {
        cli_error("out of memory");
        return CLI_EXIT_INTERNAL;
    }
    const char *sub = argc > 1 ? argv[1] : "";
    bool is_sub = strcmp(sub, "run") == 0 || strcmp(sub, "eval") == 0 || strcmp(sub, "inspect") == 0;
    int  sub_argc = 0;
    if (is_sub) {
        sub_argc = strip_globals(argc - 1, argv + 1, &g);
        if (sub_argc < 0) {
            rc = CLI_EXIT_USAGE;
            goto out;
        }
    } else {
        rc = parse_main(argc, argv, &o, &g);
        if (rc >= 0)
            goto out;
    }
    opq_ctx_set_log(ctx, log_sink, NULL, (enum opq_log_level)g.log_level);
    opq_ctx_set_threads(ctx, (int)g.threads);
    opq_ctx_set_seed(ctx, g.seed);
    o.pipe.seed      = g.seed;
    o.quant.calib.seed = g.seed;
    o.log_level      = g.log_level;
    if (strcmp(sub, "run") == 0)
        rc = cmd_run(ctx, sub_argc, argv + 1);
    else if (strcmp(sub, "eval") == 0)
        rc = cmd_eval(ctx, sub_argc, argv + 1);
    else if (strcmp(sub, "inspect") == 0)
        rc = cmd_inspect(ctx, sub_argc, argv + 1);
    else
        rc = run_main(ctx, &o);
out:
    free(o.passes);
    opq_ctx_free(ctx);
    return rc;
}
