/* fuzz_load.c: libFuzzer target for the ONNX loader (built with -DOPQ_FUZZ=ON and clang; run by
 * tools/scripts/fuzz_loader.sh). Any input must either be refused with a status, or load into
 * an IR that serializes, loads again, and re-serializes to the very same bytes. Memory held by
 * the context must return to zero after every input (ASan catches the rest). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base.h"
#include "opq.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static struct opq_ctx *ctx;
    if (!ctx && !(ctx = opq_ctx_new()))
        abort();
    struct opq_model *m = NULL;
    if (opq_model_load_buffer(ctx, data, size, "fuzz", NULL, &m) == OPQ_OK) {
        void *a = NULL;
        void *b = NULL;
        size_t na = 0;
        size_t nb = 0;
        struct opq_model *m2 = NULL;
        if (opq_model_save_buffer(ctx, m, &a, &na) != OPQ_OK)
            OPQ_ABORT(opq_ctx_errmsg(ctx)); // a loaded model must be savable
        if (opq_model_load_buffer(ctx, a, na, "fuzz-resave", NULL, &m2) != OPQ_OK)
            OPQ_ABORT(opq_ctx_errmsg(ctx)); // ... and our own output must load
        if (opq_model_save_buffer(ctx, m2, &b, &nb) != OPQ_OK)
            OPQ_ABORT(opq_ctx_errmsg(ctx));
        if (na != nb || memcmp(a, b, na) != 0)
            OPQ_ABORT("save(load(save(x))) differs from save(x)");
        opq_buffer_free(ctx, a);
        opq_buffer_free(ctx, b);
        opq_model_free(m2);
        opq_model_free(m);
    } else if (m) {
        OPQ_ABORT("failed load returned a model");
    }
    opq_ctx_clear_error(ctx);
    if (ctx->cur_bytes != 0)
        OPQ_ABORT("memory still held after the input");
    return 0;
}
