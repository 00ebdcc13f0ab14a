/* opq_io_bench.c: times libopq's model load and save of one file and reports peak memory.
 *
 *     opq-io-bench IN.onnx OUT.onnx [--external] [--repeat N]
 *
 * Prints one line per phase ("load 0.123 s", "save 0.045 s") and finally
 * "total <s> peak_rss_kb <kb> file_bytes <n> ratio_rss <peak/file>", the best total of N runs.
 * Peak RSS comes from getrusage(RUSAGE_SELF) and covers the whole process. Used by
 * tools/bench/bench_io.sh, which compares it with Python's onnx.load + onnx.save. */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include "opq.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    const char *in = NULL;
    const char *out = NULL;
    bool external = false;
    int repeat = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--external") == 0)
            external = true;
        else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc)
            repeat = atoi(argv[++i]);
        else if (!in)
            in = argv[i];
        else if (!out)
            out = argv[i];
        else
            in = NULL, i = argc; // too many arguments
    }
    if (!in || !out || repeat < 1) {
        fprintf(stderr, "usage: opq-io-bench IN.onnx OUT.onnx [--external] [--repeat N]\n");
        return 1;
    }
    struct opq_ctx *ctx = opq_ctx_new();
    if (!ctx)
        return 4;
    double best = -1;
    for (int r = 0; r < repeat; r++) {
        struct opq_model *m = NULL;
        struct opq_save_opts opts = {.external_data = external};
        double t0 = now();
        if (opq_model_load(ctx, in, &m) != OPQ_OK) {
            fprintf(stderr, "opq-io-bench: %s\n", opq_ctx_errmsg(ctx));
            return 2;
        }
        double t1 = now();
        if (opq_model_save(ctx, m, out, &opts) != OPQ_OK) {
            fprintf(stderr, "opq-io-bench: %s\n", opq_ctx_errmsg(ctx));
            return 3;
        }
        double t2 = now();
        opq_model_free(m);
        printf("load %.4f s\nsave %.4f s\n", t1 - t0, t2 - t1);
        if (best < 0 || t2 - t0 < best)
            best = t2 - t0;
    }
    struct rusage ru;
    struct stat sb;
    getrusage(RUSAGE_SELF, &ru);
    long long fsize = stat(in, &sb) == 0 ? (long long)sb.st_size : 0;
    printf("total %.4f peak_rss_kb %ld file_bytes %lld ratio_rss %.3f\n", best, ru.ru_maxrss, fsize,
           fsize ? (double)ru.ru_maxrss * 1024.0 / (double)fsize : 0.0);
    opq_ctx_free(ctx);
    return 0;
}
