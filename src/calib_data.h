/* calib_data.h: calibration input sources. Streams samples to the calibration loop one batch at
 * a time; never holds every activation, and for .npy and image folders never holds every input
 * either (rows are read from the file per batch).
 *
 * Sources (opq_calib_spec.path):
 *   X.npy         a single-input model; array (N, ...) with the input's non-batch dims
 *   X.npz         arrays keyed by input name (stored or deflate-compressed members)
 *   DIR/          ONNX test data: DIR/test_data_set_N/input_K.pb (each file holds a batch)
 *   DIR/          a folder of PNG/JPEG/BMP images (single image input): decoded, resized so the
 *                 shorter side is `resize`, centre-cropped to `crop`, scaled to [0,1], normalised
 *                 with mean/std per channel, laid out NCHW or NHWC
 *   "random"      explicit opt-in: seeded standard-normal inputs (smoke tests only)
 * Every error names the file and, where it applies, the input. */
#ifndef OPQ_CALIB_DATA_H
#define OPQ_CALIB_DATA_H

#include "base.h"
#include "exec.h"
#include "ir.h"

struct opq_calib_spec {
    const char *path;
    int         count;       // samples to use (0: all; for "random": required)
    // image folders
    int         resize;      // shorter side after resize (0: crop size, or the input's size)
    int         crop;        // centre crop (0: the model input's spatial size)
    float       mean[4], std[4];
    int         n_mean, n_std; // 0: mean 0 / std 1; 1: same for every channel
    bool        nhwc;        // layout of the model input
    int         channels;    // 1 or 3 (0: the model input's channel dim)
    uint64_t    seed;        // for "random"
};

struct opq_calib_src;

// Opens the source and checks it against the model's graph inputs (names, dtypes, non-batch dims).
// On success *out is owned by the caller (opq_calib_close).
enum opq_status opq_calib_open(struct opq_ctx *ctx, const struct opq_model *model,
                               const struct opq_calib_spec *spec, struct opq_calib_src **out);
void            opq_calib_close(struct opq_calib_src *src);

// Number of samples the source will give, and the number of model inputs it feeds.
int             opq_calib_count(const struct opq_calib_src *src);
int             opq_calib_n_inputs(const struct opq_calib_src *src);
// Name of input k (graph input order, initializer-backed inputs excluded). Borrowed.
const char     *opq_calib_input_name(const struct opq_calib_src *src, int k);

// Fills samples [first, first + n) for input k into dst (n * sample_numel elements of the input's
// dtype: float32 for float inputs, int64 for integer inputs). Random access, so callers may
// shuffle or split. sample_numel is reported by opq_calib_sample_numel.
enum opq_status opq_calib_read(struct opq_calib_src *src, int k, int first, int n, void *dst);
size_t          opq_calib_sample_numel(const struct opq_calib_src *src, int k);
// Bytes of one sample of input k in the dtype opq_calib_read writes.
size_t          opq_calib_sample_bytes(const struct opq_calib_src *src, int k);
// Reads samples [first, first + n) of every input k into bufs[k] (room for n samples each) and
// describes them in in[k] as the batch the executor takes: name, dtype, shape [n, ...], data.
// bufs NULL: shapes only, nothing is read (for planning).
enum opq_status opq_calib_batch(struct opq_calib_src *src, int first, int n, void *const *bufs,
                                struct opq_named_tensor *in);
// The per-sample shape of input k (without the batch dim). Borrowed.
const struct opq_tensor *opq_calib_sample_shape(const struct opq_calib_src *src, int k);

#endif
