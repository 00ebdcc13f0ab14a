/* quant_opts.c: the quantization options of the main form, the report table printed on stderr,
 * and the progress display (a bar with ETA on a terminal, plain lines otherwise). */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "quant/placement.h"
#include "quantize.h"

const char cli_quant_usage[] =
    "quantization (methods that quantize, e.g. the default rtn):\n"
    "  --calib PATH        calibration data: X.npy (N,...) for one input, X.npz keyed by input\n"
    "                      name, a folder of test_data_set_*/input_*.pb, a folder of images,\n"
    "                      or 'random' (seeded noise: smoke tests only)\n"
    "  --calib-count N     use the first N samples (default: all)\n"
    "  --batch B           calibration batch (default 16)\n"
    "  --holdout N         samples kept out of calibration for the report (default: auto)\n"
    "  --resize N --crop N --mean A[,B,C] --std A[,B,C] --layout nchw|nhwc --channels 1|3\n"
    "                      image folders: shorter side to N, centre crop, (x/255-mean)/std\n"
    "  --wbits N --abits N weight / activation bits, 2..8 (default 8)\n"
    "  --input-bits N      bits of activations fed by the model input alone, e.g. the image\n"
    "                      into the patch embedding: max(abits, N) (default 8)\n"
    "  --weight-granularity channel|tensor   (default channel)\n"
    "  --weight-scheme sym|asym              (default sym)\n"
    "  --act-scheme asym|sym                 (default asym; trt: sym)\n"

    "  --calibrator minmax|percentile|mse|entropy   activation ranges (default mse)\n"
    "  --percentile P      for --calibrator percentile (default 99.99)\n"
    "  --act-search auto|output|tensor   output: starting from the calibrator's range, each\n"
    "                      activation read by a MatMul/Gemm takes the candidate range\n"
    "                      (0.3x..2x) that minimises its consumers' loss-weighted output\n"
    "                      error in the quantized model; tensor: the calibrator's range;\n"
    "                      auto (default): output for activations below 8 bits\n"
    "  --act-search-samples N   calibration samples the search measures on (default 64)\n"
    "  --weight-calibrator minmax|mse        (default mse)\n"
    "  --exclude LIST      comma list of op types or node-name regexes to keep float\n"
    "  --keep-float LIST   positions to keep float: first,last,head,patch-embed\n"
    "  --target ort|trt    ort (default) or TensorRT's explicit-quantization rules (8-bit)\n"
    "  --reparam auto|on|off  post-LayerNorm range reparameterization (default auto)\n"
    "  --reparam-alpha A   its migration strength, 0..1 (default 1)\n"
    "  --defer-softmax auto|on|off  normalize attention after softmax.V, so quantized\n"
    "                      rows peak at 1 (default auto: activations below 8 bits)\n"
    "  --report FILE.json  write the quantization report as JSON\n"
    "ERQ (--method erq; the paper uses --weight-scheme asym):\n"
    "  --erq-lambda L      ridge strength per calibration token, lambda = L * tokens\n"
    "                      (default 0.16: the paper's coe 10000 at 32 ViT images)\n"
    "  --erq-steps N       rounding-refinement steps per output channel (default 100; 0 off)\n"
    "  --erq-duq on|off    dual uniform weights where input columns are outliers (default on)\n"
    "  --erq-duq-ratio R   ... when the largest column max |w| is >= R x the median\n"
    "                      (default 1: every linear layer; measured better than qkv/fc1 only)\n"
    "  --erq-ri on|off|flow  reparameterization initialization: LayerNorm reparameterization\n"
    "                      with alpha 1 (default on); flow: as --reparam / --reparam-alpha\n"
    "  --erq-aqer on|off --erq-wqer on|off   the two stages (default on; ablations)\n"
    "  --erq-mem MB        statistics held per calibration pass (default 512)\n"
    "  --erq-inputs quant|float  each layer's statistics from the quantized model's inputs\n"
    "                      (activations quantized, the layers before it already done;\n"
    "                      one calibration pass per layer input), regressed onto the float\n"
    "                      model's, or from the float model's alone (default quant)\n"
    ;
const char cli_recon_usage[] =
    "block reconstruction (--method aphq: AdaRound weights; --method flexround: FlexRound):\n"
    "  --recon-iters N     iterations per unit (default 2000)\n"
    "  --recon-batch B     samples per iteration (default 32)\n"
    "  --recon-loss aph|mse|fisher   output weighting of the unit loss (default aph)\n"
    "  --recon-qdrop on|off          QDrop input mixing and quantizer dropping (default on)\n"
    "  --recon-aph-floor F every APH output weight of a unit gets F x their mean added, so\n"
    "                      outputs the head does not read still count (default 0: plain APH)\n"
    "  --adaround-lr LR    Adam learning rate of AdaRound's rounding variables (default:\n"
    "                      the paper's 0.001 over its 20000 iterations, scaled to the same\n"
    "                      total step: 20/iterations, within 0.001..0.01)\n"
    "  --recon-act-lr LR   Adam learning rate of the LSQ activation step sizes, cosine\n"
    "                      to 0 over each unit (default 4e-5)\n"
    "  --flexround-lr LR   Adam learning rate of FlexRound's log grid and divisors, decayed\n"
    "                      to 0 along a cosine over each unit (default 0.001)\n"
    "  --time-budget MIN   minutes for the whole run from loading the model: each unit gets\n"
    "                      fewer iterations where its measured cost needs it (with\n"
    "                      --mlp-recon, MLP reconstruction gets a fifth of what is left)\n"
    "  --checkpoint DIR    save each finished unit in DIR; a re-run resumes from it\n"
    "MLP reconstruction (--mlp-recon, before the method's quantization):\n"
    "  --mr-iters N        Adam steps per MLP (default 2000; batch = --recon-batch)\n"
    "  --mr-lr LR          Adam learning rate, cosine to 0 (default 4e-4)\n";

static bool parse_int(const char *s, long lo, long hi, long *out) {
    char *e;
    errno  = 0;
    long v = strtol(s, &e, 10);
    if (errno || e == s || *e || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static bool parse_float(const char *s, double lo, double hi, double *out) {
    char *e;
    errno    = 0;
    double v = strtod(s, &e);
    if (errno || e == s || *e || !(v >= lo && v <= hi))
        return false;
    *out = v;
    return true;
}

// "a,b,c" -> up to 4 floats.
static bool parse_floats(const char *s, float *out, int *n) {
    *n = 0;
    const char *p = s;
    while (*p && *n < 4) {
        char *e;
        errno    = 0;
        double v = strtod(p, &e);
        if (errno || e == p || !isfinite(v))
            return false;
        out[(*n)++] = (float)v;
        if (*e == '\0')
            return true;
        if (*e != ',')
            return false;
        p = e + 1;
    }
    return false;
}

static int bad(const char *opt, const char *val, const char *want) {
    cli_error("%s: '%s' is not %s", opt, val, want);
    return -1;
}

int cli_quant_option(const char *opt, const char *val, struct opq_quant_opts *q,
                     const char **report_path) {
    long   n;
    double d;
    if (strcmp(opt, "--calib") == 0) {
        q->calib.path = val;
    } else if (strcmp(opt, "--calib-count") == 0) {
        if (!parse_int(val, 1, 100000000, &n))
            return bad(opt, val, "a positive count");
        q->calib.count = (int)n;
    } else if (strcmp(opt, "--batch") == 0) {
        if (!parse_int(val, 1, 4096, &n))
            return bad(opt, val, "a batch size from 1 to 4096");
        q->batch = (int)n;
    } else if (strcmp(opt, "--holdout") == 0) {
        if (!parse_int(val, 0, 100000000, &n))
            return bad(opt, val, "a count");
        q->holdout = (int)n;
    } else if (strcmp(opt, "--resize") == 0 || strcmp(opt, "--crop") == 0) {
        if (!parse_int(val, 1, 16384, &n))
            return bad(opt, val, "a size in pixels");
        *(opt[2] == 'r' ? &q->calib.resize : &q->calib.crop) = (int)n;
    } else if (strcmp(opt, "--mean") == 0 || strcmp(opt, "--std") == 0) {
        bool is_mean = opt[2] == 'm';
        if (!parse_floats(val, is_mean ? q->calib.mean : q->calib.std,
                          is_mean ? &q->calib.n_mean : &q->calib.n_std))
            return bad(opt, val, "1 to 4 comma-separated numbers");
    } else if (strcmp(opt, "--layout") == 0) {
        if (strcmp(val, "nchw") && strcmp(val, "nhwc"))
            return bad(opt, val, "nchw or nhwc");
        q->calib.nhwc = strcmp(val, "nhwc") == 0;
    } else if (strcmp(opt, "--channels") == 0) {
        if (!parse_int(val, 1, 3, &n) || n == 2)
            return bad(opt, val, "1 or 3");
        q->calib.channels = (int)n;
    } else if (strcmp(opt, "--input-bits") == 0) {
        if (!parse_int(val, 2, 8, &n))
            return bad(opt, val, "a bit width from 2 to 8");
        q->input_bits = (int)n;
    } else if (strcmp(opt, "--wbits") == 0 || strcmp(opt, "--abits") == 0) {
        if (!parse_int(val, 2, 8, &n))
            return bad(opt, val, "a bit width from 2 to 8");
        *(opt[2] == 'w' ? &q->wbits : &q->abits) = (int)n;
    } else if (strcmp(opt, "--weight-granularity") == 0) {
        if (strcmp(val, "channel") && strcmp(val, "tensor"))
            return bad(opt, val, "channel or tensor");
        q->w_per_tensor = strcmp(val, "tensor") == 0;
    } else if (strcmp(opt, "--weight-scheme") == 0 || strcmp(opt, "--act-scheme") == 0) {
        if (strcmp(val, "sym") && strcmp(val, "asym"))
            return bad(opt, val, "sym or asym");
        if (opt[2] == 'w')
            q->w_asym = strcmp(val, "asym") == 0;
        else
            q->a_sym = strcmp(val, "sym") == 0;
    } else if (strcmp(opt, "--calibrator") == 0) {
        int c = opq_calibrator_from_name(val);
        if (c < 0)
            return bad(opt, val, "minmax, percentile, mse or entropy");
        q->calibrator = (enum opq_calibrator)c;
    } else if (strcmp(opt, "--percentile") == 0) {
        if (!parse_float(val, 50.0, 100.0, &d) || d >= 100.0)
            return bad(opt, val, "a percentile in [50, 100)");
        q->percentile = d;
    } else if (strcmp(opt, "--act-search") == 0) {
        if (strcmp(val, "auto") && strcmp(val, "output") && strcmp(val, "tensor"))
            return bad(opt, val, "auto, output or tensor");
        q->act_search = !strcmp(val, "auto") ? -1 : !strcmp(val, "output");
    } else if (strcmp(opt, "--act-search-samples") == 0) {
        if (!parse_int(val, 1, 1000000, &n))
            return bad(opt, val, "a sample count >= 1");
        q->act_search_samples = (int)n;
    } else if (strcmp(opt, "--weight-calibrator") == 0) {
        if (strcmp(val, "minmax") && strcmp(val, "mse"))
            return bad(opt, val, "minmax or mse");
        q->wcalib = strcmp(val, "mse") == 0 ? OPQ_WCALIB_MSE : OPQ_WCALIB_MINMAX;
    } else if (strcmp(opt, "--exclude") == 0) {
        q->exclude = val;
    } else if (strcmp(opt, "--keep-float") == 0) {
        struct opq_ctx *tmp = opq_ctx_new();
        if (!tmp)
            return -1;
        unsigned bits;
        enum opq_status st = opq_keep_float_parse(tmp, val, &bits);
        if (st != OPQ_OK)
            cli_error("%s", opq_ctx_errmsg(tmp));
        opq_ctx_free(tmp);
        if (st != OPQ_OK)
            return -1;
        q->keep_float = bits;
    } else if (strcmp(opt, "--target") == 0) {
        if (strcmp(val, "ort") && strcmp(val, "trt"))
            return bad(opt, val, "ort or trt");
        q->target = strcmp(val, "trt") == 0 ? OPQ_TARGET_TRT : OPQ_TARGET_ORT;
    } else if (strcmp(opt, "--reparam") == 0) {
        if (strcmp(val, "auto") == 0)
            q->reparam = -1;
        else if (strcmp(val, "on") == 0)
            q->reparam = 1;
        else if (strcmp(val, "off") == 0)
            q->reparam = 0;
        else
            return bad(opt, val, "auto, on or off");
    } else if (strcmp(opt, "--defer-softmax") == 0) {
        if (strcmp(val, "auto") == 0)
            q->defer_softmax = -1;
        else if (strcmp(val, "on") == 0)
            q->defer_softmax = 1;
        else if (strcmp(val, "off") == 0)
            q->defer_softmax = 0;
        else
            return bad(opt, val, "auto, on or off");
    } else if (strcmp(opt, "--reparam-alpha") == 0) {
        if (!parse_float(val, 0.0, 1.0, &d))
            return bad(opt, val, "a number in [0, 1]");
        q->reparam_alpha = (float)d;
    } else if (strcmp(opt, "--erq-lambda") == 0) {
        if (!parse_float(val, 0.0, 1e9, &d))
            return bad(opt, val, "a non-negative number");
        q->erq.lambda = d;
    } else if (strcmp(opt, "--erq-steps") == 0) {
        if (!parse_int(val, 0, 1000000, &n))
            return bad(opt, val, "a step count");
        q->erq.steps = (int)n;
    } else if (strcmp(opt, "--erq-duq-ratio") == 0) {
        if (!parse_float(val, 1.0, 1e9, &d))
            return bad(opt, val, "a ratio >= 1");
        q->erq.duq_ratio = d;
    } else if (strcmp(opt, "--erq-mem") == 0) {
        if (!parse_int(val, 1, 1048576, &n))
            return bad(opt, val, "a size in MiB");
        q->erq.mem_mb = (int)n;
    } else if (strcmp(opt, "--erq-duq") == 0 || strcmp(opt, "--erq-aqer") == 0 ||
               strcmp(opt, "--erq-wqer") == 0) {
        if (strcmp(val, "on") && strcmp(val, "off"))
            return bad(opt, val, "on or off");
        bool on = strcmp(val, "on") == 0;
        if (opt[6] == 'd')
            q->erq.duq = on;
        else if (opt[6] == 'a')
            q->erq.aqer = on;
        else
            q->erq.wqer = on;
    } else if (strcmp(opt, "--erq-ri") == 0) {
        if (strcmp(val, "on") == 0)
            q->erq.ri = 1;
        else if (strcmp(val, "off") == 0)
            q->erq.ri = 0;
        else if (strcmp(val, "flow") == 0)
            q->erq.ri = -1;
        else
            return bad(opt, val, "on, off or flow");
    } else if (strcmp(opt, "--erq-inputs") == 0) {
        if (strcmp(val, "float") == 0)
            q->erq.qinputs = false;
        else if (strcmp(val, "quant") == 0)
            q->erq.qinputs = true;
        else
            return bad(opt, val, "float or quant");
    } else if (strcmp(opt, "--mr-iters") == 0) {
        if (!parse_int(val, 1, 100000000, &n))
            return bad(opt, val, "a positive count");
        q->mr.iters = (int)n;
    } else if (strcmp(opt, "--mr-lr") == 0) {
        if (!parse_float(val, 1e-9, 1.0, &d))
            return bad(opt, val, "a learning rate in (0, 1]");
        q->mr.lr = (float)d;
    } else if (strcmp(opt, "--recon-iters") == 0 || strcmp(opt, "--recon-batch") == 0) {
        if (!parse_int(val, 1, 100000000, &n))
            return bad(opt, val, "a positive count");
        if (opt[8] == 'i')
            q->recon.iters = (int)n;
        else
            q->recon.batch = (int)n;
    } else if (strcmp(opt, "--recon-loss") == 0) {
        int l = opq_recon_loss_from_name(val);
        if (l < 0)
            return bad(opt, val, "aph, mse or fisher");
        q->recon.loss = (enum opq_recon_loss)l;
    } else if (strcmp(opt, "--recon-qdrop") == 0) {
        if (strcmp(val, "on") && strcmp(val, "off"))
            return bad(opt, val, "on or off");
        q->recon.qdrop = strcmp(val, "on") == 0;
    } else if (strcmp(opt, "--recon-aph-floor") == 0) {
        if (!parse_float(val, 0.0, 1e6, &d))
            return bad(opt, val, "a non-negative factor");
        q->recon.aph_floor = (float)d;
    } else if (strcmp(opt, "--adaround-lr") == 0) {
        if (!parse_float(val, 1e-9, 1.0, &d))
            return bad(opt, val, "a learning rate in (0, 1]");
        q->recon.lr_round = (float)d;
    } else if (strcmp(opt, "--recon-act-lr") == 0) {
        if (!parse_float(val, 1e-12, 1.0, &d))
            return bad(opt, val, "a learning rate in (0, 1]");
        q->recon.lr_act = (float)d;
    } else if (strcmp(opt, "--flexround-lr") == 0) {
        if (!parse_float(val, 1e-9, 1.0, &d))
            return bad(opt, val, "a learning rate in (0, 1]");
        q->recon.lr_flex = (float)d;
    } else if (strcmp(opt, "--time-budget") == 0) {
        if (!parse_float(val, 0.0, 1e6, &d))
            return bad(opt, val, "minutes (0: none)");
        q->recon.time_budget = d;
    } else if (strcmp(opt, "--checkpoint") == 0) {
        q->recon.checkpoint = val;
    } else if (strcmp(opt, "--report") == 0) {
        *report_path = val;
    } else {
        return 0;
    }
    return 1;
}

bool cli_quant_takes_value(const char *opt) {
    static const char *const names[] = {
        "--calib", "--calib-count", "--batch", "--holdout", "--resize", "--crop", "--mean",
        "--std", "--layout", "--channels", "--wbits", "--abits", "--input-bits", "--weight-granularity",
        "--weight-scheme", "--act-scheme", "--calibrator", "--percentile", "--act-search",
        "--act-search-samples", "--weight-calibrator",
        "--exclude", "--keep-float", "--target", "--reparam", "--reparam-alpha", "--report",
        "--defer-softmax",
        "--erq-lambda", "--erq-steps", "--erq-duq", "--erq-duq-ratio", "--erq-ri", "--erq-aqer",
        "--erq-wqer", "--erq-mem", "--erq-inputs", "--recon-iters", "--recon-batch", "--recon-loss",
        "--recon-qdrop", "--recon-aph-floor", "--adaround-lr", "--recon-act-lr", "--flexround-lr",
        "--mr-iters", "--mr-lr", "--time-budget",
        "--checkpoint"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(opt, names[i]) == 0)
            return true;
    return false;
}

void cli_report_print(const struct opq_report *r) {
    fprintf(stderr, "onnx-ptq: %s\n", r->settings);
    fprintf(stderr, "onnx-ptq: %d quantized nodes, %d kept float, %d LayerNorms reparameterized, "
                    "%d calibration samples\n",
            r->n_qnodes, r->n_excluded, r->n_reparam, r->n_calib);
    fprintf(stderr, "  %-48s %-6s %4s %5s %11s %11s %5s %8s\n", "tensor", "kind", "bits", "ch",
            "scale_min", "scale_max", "zp", "SQNR dB");
    for (int i = 0; i < r->n_tensors; i++) {
        const struct opq_report_tensor *t = &r->tensors[i];
        const char *name = t->name;
        size_t len = strlen(name);
        fprintf(stderr, "  %s%-*s %-6s %4d %5d %11.4g %11.4g %5d %8.2f\n", len > 48 ? "..." : "",
                len > 48 ? 45 : 48, len > 48 ? name + len - 45 : name,
                t->weight ? "weight" : "act", t->bits, t->n_ch, (double)t->scale_min,
                (double)t->scale_max, t->zero_point, t->sqnr_db);
    }
    if (r->n_blocks) {
        fprintf(stderr, "  %-48s %8s\n", "block output (held-out samples)", "SQNR dB");
        for (int i = 0; i < r->n_blocks; i++)
            fprintf(stderr, "  %-48s %8.2f\n", r->blocks[i].name, r->blocks[i].sqnr_db);
    }
    if (r->n_layers) {
        fprintf(stderr, "  %-40s %9s %4s %10s %10s %10s %10s\n", "layer (relative output error)",
                "in->out", "duq", "before", "aqer", "wqer", "rtn");
        for (int i = 0; i < r->n_layers; i++) {
            const struct opq_report_layer *l = &r->layers[i];
            size_t len = strlen(l->name);
            char io[32];
            snprintf(io, sizeof(io), "%d->%d", l->d_in, l->d_out);
            fprintf(stderr, "  %s%-*s %9s %4d %10.3e %10.3e %10.3e %10.3e\n", len > 40 ? "..." : "",
                    len > 40 ? 37 : 40, len > 40 ? l->name + len - 37 : l->name, io,
                    l->n_outliers, l->err_before, l->err_aqer, l->err_wqer, l->err_rtn);
        }
    }
    if (r->have_eval)
        fprintf(stderr, "onnx-ptq: end to end on %d held-out samples: logits SQNR %.2f dB, "
                        "KL %.5f, top-1 agreement %.4f\n",
                r->n_eval, r->logits_sqnr_db, r->logits_kl, r->top1_agreement);
    for (int i = 0; i < r->n_phases; i++)
        fprintf(stderr, "onnx-ptq: phase %-12s %8.2f s, peak RSS %ld MiB\n", r->phases[i].name,
                r->phases[i].seconds, r->phases[i].peak_rss_kb / 1024);
}

// ---- progress ----------------------------------------------------------------------------------

struct progress_state {
    bool        tty;
    const char *phase;
    double      start;
    int         last_decile;
};

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void progress_cb(void *user, const char *phase, long done, long total) {
    struct progress_state *p = user;
    if (p->phase != phase && (!p->phase || strcmp(p->phase, phase) != 0)) {
        p->phase       = phase;
        p->start       = mono();
        p->last_decile = -1;
    }
    double el  = mono() - p->start;
    double eta = done > 0 && total > done ? el * (double)(total - done) / (double)done : 0.0;
    if (p->tty) {
        int w = 30, fill = total > 0 ? (int)(w * done / total) : 0;
        char bar[64];
        for (int i = 0; i < w; i++)
            bar[i] = i < fill ? '#' : '.';
        bar[w] = '\0';
        fprintf(stderr, "\r%-20s [%s] %ld/%ld  %5.1fs  ETA %5.1fs", phase, bar, done, total, el,
                eta);
        if (done >= total)
            fputc('\n', stderr);
        fflush(stderr);
    } else {
        int dec = total > 0 ? (int)(10 * done / total) : 0;
        if (dec != p->last_decile || done >= total) {
            p->last_decile = dec;
            fprintf(stderr, "onnx-ptq: %s %ld/%ld (%.1fs, ETA %.1fs)\n", phase, done, total, el,
                    eta);
        }
    }
}

static struct progress_state g_progress;

void cli_progress_install(struct opq_ctx *ctx, bool quiet) {
    if (quiet)
        return;
    g_progress.tty = isatty(fileno(stderr));
    opq_ctx_set_progress(ctx, progress_cb, &g_progress);
}
