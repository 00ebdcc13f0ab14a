#!/usr/bin/python3
"""Write the Fashion-MNIST arrays that onnx-ptq tests, calibration and benchmarks read.

Source: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/*.gz, IDX format).
Preprocessing (identical to the training in make_fixtures.py, which imports this module):
    x = (uint8_pixel / 255 - MEAN) / STD,  float32, NCHW [N, 1, 28, 28], MEAN=0.2860, STD=0.3530
Labels are int64 [N].

Files written to OUT_DIR (default: <repo>/.data, git-ignored):
    calib_x.npy  calib_y.npy   1024 training images picked with numpy RandomState(CALIB_SEED)
    test_x.npy   test_y.npy    the full 10,000-image test set, in file order
With --small DIR N it also writes DIR/test{N}_x.npy, DIR/test{N}_y.npy (the first N test images),
the small committed set under fixtures/data/.

Usage: /usr/bin/python3 tools/scripts/make_data.py [--out-dir DIR] [--src DIR]
                                                  [--calib-count 1024] [--small DIR N]
"""
import argparse
import gzip
import hashlib
import os
import struct
import sys

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
DEFAULT_OUT = os.path.join(REPO, ".data")
MEAN = np.float32(0.2860)
STD = np.float32(0.3530)
CALIB_SEED = 1234
CALIB_COUNT = 1024


def read_idx(path):
    """Read a gzip'd IDX file (uint8 payload) and return a numpy array of its shape."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SystemExit("make_data: cannot read %s: %s" % (path, e))
    if len(raw) < 4:
        raise SystemExit("make_data: %s: truncated IDX header" % path)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SystemExit("make_data: %s: not a uint8 IDX file (code 0x%02x)" % (path, dtype_code))
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SystemExit("make_data: %s: truncated IDX dims" % path)
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise SystemExit("make_data: %s: payload is %d bytes, dims %s need %d"
                         % (path, len(raw) - header, dims, count))
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def preprocess(images_u8):
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], normalized with the fixed MEAN/STD."""
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)


def load_split(split, src=DEFAULT_SRC):
    """Return (x float32 [N,1,28,28], y int64 [N]) for split 'train' or 't10k'."""
    imgs = read_idx(os.path.join(src, "%s-images-idx3-ubyte.gz" % split))
    labels = read_idx(os.path.join(src, "%s-labels-idx1-ubyte.gz" % split))
    if imgs.ndim != 3 or imgs.shape[1:] != (28, 28) or labels.shape != (imgs.shape[0],):
        raise SystemExit("make_data: %s split: unexpected shapes %s / %s"
                         % (split, imgs.shape, labels.shape))
    return preprocess(imgs), labels.astype(np.int64)


def calib_indices(n_train, count=CALIB_COUNT, seed=CALIB_SEED):
    rng = np.random.RandomState(seed)
    return rng.permutation(n_train)[:count]


def _save(path, arr):
    # Write under a temporary name and rename, so concurrent writers never expose a torn file.
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    print("wrote %s %s %s sha256:%s" % (path, arr.dtype, list(arr.shape), digest))


def write_all(out_dir, src=DEFAULT_SRC, calib_count=CALIB_COUNT, small=None):
    os.makedirs(out_dir, exist_ok=True)
    xtr, ytr = load_split("train", src)
    idx = calib_indices(xtr.shape[0], calib_count)
    _save(os.path.join(out_dir, "calib_x.npy"), np.ascontiguousarray(xtr[idx]))
    _save(os.path.join(out_dir, "calib_y.npy"), np.ascontiguousarray(ytr[idx]))
    xte, yte = load_split("t10k", src)
    _save(os.path.join(out_dir, "test_x.npy"), xte)
    _save(os.path.join(out_dir, "test_y.npy"), yte)
    if small is not None:
        sdir, n = small
        os.makedirs(sdir, exist_ok=True)
        _save(os.path.join(sdir, "test%d_x.npy" % n), np.ascontiguousarray(xte[:n]))
        _save(os.path.join(sdir, "test%d_y.npy" % n), np.ascontiguousarray(yte[:n]))


def main(argv):
    ap = argparse.ArgumentParser(description="Write Fashion-MNIST calibration/test .npy files")
    ap.add_argument("--out-dir", default=DEFAULT_OUT)
    ap.add_argument("--src", default=DEFAULT_SRC)
    ap.add_argument("--calib-count", type=int, default=CALIB_COUNT)
    ap.add_argument("--small", nargs=2, metavar=("DIR", "N"),
                    help="also write the first N test images to DIR/test{N}_{x,y}.npy")
    args = ap.parse_args(argv)
    small = None
    if args.small:
        try:
            n = int(args.small[1])
        except ValueError:
            raise SystemExit("make_data: --small N must be an integer, got %r" % args.small[1])
        if n <= 0 or n > 10000:
            raise SystemExit("make_data: --small N must be in 1..10000, got %d" % n)
        small = (args.small[0], n)
    if args.calib_count <= 0 or args.calib_count > 60000:
        raise SystemExit("make_data: --calib-count must be in 1..60000")
    write_all(args.out_dir, args.src, args.calib_count, small)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
