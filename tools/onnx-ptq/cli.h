/* cli.h: shared pieces of the onnx-ptq command-line program. The program is split by
 * subcommand: main.c (dispatch, the quantize form), inspect.c, cmd_run.c (run, eval).
 * Each cmd_* returns the process exit code (see README: 0 ok, 1 usage, 2 bad input, 3 I/O,
 * 4 internal). */
#ifndef OPQ_CLI_H
#define OPQ_CLI_H

#include "opq.h"

enum cli_exit {
    CLI_EXIT_OK       = 0,
    CLI_EXIT_USAGE    = 1,
    CLI_EXIT_INPUT    = 2,
    CLI_EXIT_IO       = 3,
    CLI_EXIT_INTERNAL = 4,
};

// Maps a library status to the documented exit code.
int cli_exit_code(enum opq_status st);
// Prints "onnx-ptq: <msg>" (one line) to stderr.
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// Prints the context's error message (or `what: <status>` when it is empty) and returns the exit
// code of st.
int cli_fail(struct opq_ctx *ctx, enum opq_status st, const char *what);

// Subcommands; argv[0] is the subcommand word. ctx is configured (threads, log) by main.c.
int cmd_run(struct opq_ctx *ctx, int argc, char **argv);
int cmd_eval(struct opq_ctx *ctx, int argc, char **argv);
int cmd_inspect(struct opq_ctx *ctx, int argc, char **argv); // inspect.c

// Quantization options (quant_opts.c). cli_quant_option: 1 if `opt` was one (value applied),
// 0 if not, -1 after printing a usage error. report_path receives --report's value.
struct opq_quant_opts;
struct opq_report;
extern const char cli_quant_usage[]; // split in two: C caps string literals at 4095 bytes
extern const char cli_recon_usage[];
bool cli_quant_takes_value(const char *opt);
int  cli_quant_option(const char *opt, const char *val, struct opq_quant_opts *q,
                      const char **report_path);
void cli_report_print(const struct opq_report *r);
// Installs the progress display unless quiet.
void cli_progress_install(struct opq_ctx *ctx, bool quiet);

#endif
