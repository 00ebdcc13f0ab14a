#!/usr/bin/python3
"""list_conformance.py: choose the ONNX backend node tests the conformance suite runs.

Scans /usr/share/libonnx-testdata/data/node/test_*/model.onnx (Debian libonnx-testdata) with the
onnx package (Debian python3-onnx: run with /usr/bin/python3) and writes
  tests/conformance/node_tests.cmake  one opq_onnx_node_test(<name>) line per runnable test
  tests/conformance/EXCLUDED.md       every other test with the reason, and counts per reason
A test is runnable when every node is a default-domain op listed in src/ops.def, every graph
input/output is a tensor of a dtype the reference executor computes, and it is not in KNOWN below
(features of supported ops we deliberately do not implement, each with its reason).

usage: /usr/bin/python3 tools/scripts/list_conformance.py [--data DIR]
"""
import argparse
import collections
import os
import re
import sys

import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Executor dtypes: float32 compute; integer and bool tensors for shape arithmetic, indices,
# comparisons and quantized data (int4/uint4 packed).
SUPPORTED = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT16, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
    onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
}
# Data-movement and conversion kernels (Cast, layout ops, comparisons, Einsum's general loop)
# also handle these; arithmetic kernels do not (see FLOAT_ONLY).
SUPPORTED |= {onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
              onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}
for _n in ("INT4", "UINT4"):
    if hasattr(onnx.TensorProto, _n):
        SUPPORTED.add(getattr(onnx.TensorProto, _n))

# Tests of supported ops that exercise features outside the reference executor's scope.
KNOWN = {
    # Dropout in training mode draws random masks; the executor is inference-only.
    "dropout_default_mask_ratio": "Dropout training_mode=1 (random mask; inference only)",
    "training_dropout": "Dropout training_mode=1 (random mask; inference only)",
    "training_dropout_default": "Dropout training_mode=1 (random mask; inference only)",
    "training_dropout_default_mask": "Dropout training_mode=1 (random mask; inference only)",
    "training_dropout_mask": "Dropout training_mode=1 (random mask; inference only)",
    "training_dropout_zero_ratio": "Dropout training_mode=1 (random mask; inference only)",
    "training_dropout_zero_ratio_mask": "Dropout training_mode=1 (random mask; inference only)",
    # The 'like' input's data is a [1] uint16 tensor where the model declares bfloat16 [3, 4].
    "castlike_BFLOAT16_to_FLOAT_expanded": "test data disagrees with the model's input shape",
    "castlike_FLOAT_to_BFLOAT16_expanded": "test data disagrees with the model's input shape",
}


# Ops the reference executor computes in float32 only (integer arithmetic is out of scope).
FLOAT_ONLY = {
    "Abs", "Add", "BatchNormalization", "Clip", "Conv", "Div", "Erf", "Exp", "Gelu", "Gemm",
    "GlobalAveragePool", "LayerNormalization", "MatMul", "Max", "Min", "Mul", "Neg", "Pow",
    "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Sigmoid", "Softmax", "Sqrt",
    "Sub", "Tanh",
}
# Inputs of FLOAT_ONLY ops that are integer by definition (axes, ...), by position.
INT_SLOTS = {("ReduceMax", 1), ("ReduceMean", 1), ("ReduceSum", 1)}

# Per-test tolerances, each with its reason (written as a comment next to the test).
OVERRIDES = {
    # onnx 1.12 made the expected values by truncating float32 to bfloat16; the spec (and we)
    # round to nearest even, so results may differ by one bfloat16 ulp (2^-7 relative).
    "cast_FLOAT_to_BFLOAT16": ("RTOL 0.008", "expected data truncates, the spec rounds"),
}


def dtypes_of(model):
    """name -> elem_type for every value onnx shape inference can type."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass
    types = {}
    for v in (list(model.graph.input) + list(model.graph.output) +
              list(model.graph.value_info)):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types


def opq_int(dt):
    return dt in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
                  onnx.TensorProto.INT16, onnx.TensorProto.BOOL)


def ops_from_def():
    ops = set()
    with open(os.path.join(ROOT, "src", "ops.def")) as f:
        for line in f:
            m = re.match(r'\s*OPQ_OP\(\s*\w+\s*,\s*"(\w+)"', line)
            if m:
                ops.add(m.group(1))
    return ops


def dtype_name(dt):
    return onnx.TensorProto.DataType.Name(dt).lower()


def reason_for(name, model, ops):
    if name in KNOWN:
        return KNOWN[name]
    missing = sorted({n.op_type for n in model.graph.node
                      if n.domain not in ("", "ai.onnx") or n.op_type not in ops})
    if missing:
        return "op not implemented: " + ", ".join(missing)
    for n in model.graph.node:
        if n.op_type == "BatchNormalization" and (
                len(n.output) > 1 or any(a.name == "training_mode" and a.i for a in n.attribute)):
            return "BatchNormalization training mode (inference only)"
    types = dtypes_of(model)
    for n in model.graph.node:
        if n.op_type not in FLOAT_ONLY:
            continue
        for k, x in enumerate(list(n.input) + list(n.output)):
            dt = types.get(x)
            if not x or (n.op_type, k) in INT_SLOTS or dt is None:
                continue
            if dt not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                          onnx.TensorProto.INT32) and not opq_int(dt):
                return "dtype %s in %s (arithmetic kernels compute float32 only)" % (
                    dtype_name(dt), n.op_type)
            # int64/int32 are computed for shape arithmetic, except by Pow (base int).
            narrow = dt not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                                onnx.TensorProto.INT32)
            if narrow or (n.op_type == "Pow" and k == 0 and dt != onnx.TensorProto.FLOAT):
                return "integer arithmetic in %s (the executor computes float32, and int32/int64 " \
                       "for shape arithmetic only)" % n.op_type
    for v in list(model.graph.input) + list(model.graph.output):
        if not v.type.HasField("tensor_type"):
            return "non-tensor graph input/output (sequence/optional/map)"
        dt = v.type.tensor_type.elem_type
        if dt not in SUPPORTED:
            return "dtype %s not computed by the executor" % dtype_name(dt)
    return None


def category(reason):
    if reason.startswith("op not implemented"):
        return "op not implemented"
    if reason.startswith("dtype ") and " in " in reason:
        return "non-float32 dtype in an arithmetic op (%s)" % reason.split()[1]
    if reason.startswith("integer arithmetic"):
        return "integer arithmetic (float32 compute; int32/int64 only for shape arithmetic)"
    return reason


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/libonnx-testdata/data/node")
    args = ap.parse_args()
    ops = ops_from_def()
    runnable = []
    excluded = []
    for d in sorted(os.listdir(args.data)):
        path = os.path.join(args.data, d, "model.onnx")
        if not d.startswith("test_") or not os.path.exists(path):
            continue
        name = d[len("test_"):]
        try:
            model = onnx.load(path)
        except Exception as e:  # a model the onnx package cannot read
            excluded.append((name, "unreadable model: %s" % e))
            continue
        r = reason_for(name, model, ops)
        if r:
            excluded.append((name, r))
        else:
            runnable.append(name)
    out = os.path.join(ROOT, "tests", "conformance")
    with open(os.path.join(out, "node_tests.cmake"), "w") as f:
        f.write("# Generated by tools/scripts/list_conformance.py: do not edit by hand.\n")
        f.write("# %d ONNX node tests whose ops are all in src/ops.def.\n" % len(runnable))
        for n in runnable:
            if n in OVERRIDES:
                f.write("# %s\nopq_onnx_node_test(%s %s)\n" % (OVERRIDES[n][1], n, OVERRIDES[n][0]))
            else:
                f.write("opq_onnx_node_test(%s)\n" % n)
    counts = collections.Counter(category(r) for _, r in excluded)
    with open(os.path.join(out, "EXCLUDED.md"), "w") as f:
        f.write("# ONNX node tests not run by the conformance suite\n\n")
        f.write("Generated by `tools/scripts/list_conformance.py` from %s.\n\n" % args.data)
        f.write("%d tests in total: %d run (tests/conformance/node_tests.cmake), %d excluded.\n\n"
                % (len(runnable) + len(excluded), len(runnable), len(excluded)))
        f.write("| reason | tests |\n|---|---|\n")
        for c, k in counts.most_common():
            f.write("| %s | %d |\n" % (c, k))
        f.write("\nThe runner exits 77 (skip) only for the dtype reason, should a data set feed a "
                "dtype the model's declared types did not announce.\n\n## Per test\n\n")
        for n, r in excluded:
            f.write("- `%s`: %s\n" % (n, r))
    print("%d runnable, %d excluded" % (len(runnable), len(excluded)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
