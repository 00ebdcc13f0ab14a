#!/usr/bin/env bash
# cli_test.sh: end-to-end tests of the onnx-ptq program, one function per case.
#   usage: cli_test.sh /path/to/onnx-ptq CASE
# Each case runs in a fresh temporary folder and exits 0 on success, 77 when skipped (a tool it
# needs is missing), anything else on failure with a message on stderr.
set -u

BIN=${1:?usage: cli_test.sh BIN CASE}
CASE=${2:?usage: cli_test.sh BIN CASE}
TESTDATA=${OPQ_TESTDATA_DIR:-/usr/share/libonnx-testdata/data}
ADD_MODEL=$TESTDATA/node/test_add/model.onnx
PY=/usr/bin/python3 # Debian python with the onnx package (the PATH python may lack it)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/opq-e2e.XXXXXX")
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1

fail() {
    echo "FAIL [$CASE]: $*" >&2
    for f in out.txt err.txt; do
        [ -s "$f" ] && { echo "--- $f:" >&2; head -n 20 "$f" >&2; }
    done
    exit 1
}

# run EXPECTED_EXIT ARGS...: runs the binary, stdout -> out.txt, stderr -> err.txt.
run() {
    local want=$1
    shift
    "$BIN" "$@" >out.txt 2>err.txt
    local got=$?
    [ "$got" -eq "$want" ] || fail "onnx-ptq $* exited $got, expected $want"
}

# An error is exactly one stderr line "onnx-ptq: <message>" containing $1.
expect_one_error_line() {
    [ "$(wc -l <err.txt)" -eq 1 ] || fail "expected one stderr line, got $(wc -l <err.txt)"
    grep -q '^onnx-ptq: ' err.txt || fail "stderr line lacks the 'onnx-ptq: ' prefix"
    [ -z "${1:-}" ] || grep -qF -- "$1" err.txt || fail "stderr lacks '$1'"
}

need_add_model() {
    [ -f "$ADD_MODEL" ] || { echo "skip: $ADD_MODEL missing" >&2; exit 77; }
    cp "$ADD_MODEL" in.onnx
}

need_onnx_python() {
    "$PY" -c 'import onnx' 2>/dev/null || { echo "skip: $PY lacks onnx" >&2; exit 77; }
}

# A small model with an initializer, a symbolic batch dim, an Identity and a Dropout.
make_mlp() {
    need_onnx_python
    "$PY" - <<'PYEOF' || fail "could not build mlp.onnx"
import numpy as np, onnx
from onnx import helper as h, TensorProto as T
w = h.make_tensor("w", T.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
b = h.make_tensor("b", T.FLOAT, [3], [0.5, -1.0, 2.0])
nodes = [
    h.make_node("Identity", ["x"], ["x_id"], name="id0"),
    h.make_node("MatMul", ["x_id", "w"], ["mm"], name="mm0"),
    h.make_node("Add", ["mm", "b"], ["a"], name="add0"),
    h.make_node("Dropout", ["a"], ["d"], name="drop0"),
    h.make_node("Relu", ["d"], ["y"], name="relu0"),
]
g = h.make_graph(nodes, "mlp",
                 [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])],
                 [h.make_tensor_value_info("y", T.FLOAT, ["batch", 3])], [w, b])
m = h.make_model(g, producer_name="cli_test", opset_imports=[h.make_opsetid("", 13)])
onnx.checker.check_model(m)
onnx.save(m, "mlp.onnx")
PYEOF
}

# ---- cases --------------------------------------------------------------------------------------

case_help() {
    run 0 --help
    grep -q '^usage: onnx-ptq IN.onnx OUT.onnx' out.txt || fail "--help lacks the usage line"
    grep -q -- '--list-passes' out.txt || fail "--help lacks --list-passes"
    [ -s err.txt ] && fail "--help wrote to stderr"
    run 0 inspect --help
    grep -q 'usage: onnx-ptq inspect' out.txt || fail "inspect --help lacks its usage"
}

case_version() {
    run 0 --version
    grep -Eq '^onnx-ptq [0-9]+\.[0-9]+\.[0-9]+$' out.txt || fail "bad version line: $(cat out.txt)"
}

case_list_passes() {
    run 0 --list-passes
    for p in remove-identity cleanup-dead none; do
        grep -Eq "^  $p +[a-z]" out.txt || fail "--list-passes lacks '$p' with its doc"
    done
}

case_usage_errors() {
    need_add_model
    run 1
    expect_one_error_line "expected an input and an output model"
    run 1 in.onnx
    expect_one_error_line "expected an input and an output model"
    run 1 in.onnx out.onnx extra.onnx
    expect_one_error_line "unexpected argument 'extra.onnx'"
    run 1 in.onnx ''
    expect_one_error_line "empty output file name"
    run 1 in.onnx out.onnx --frobnicate
    expect_one_error_line "unknown option '--frobnicate'"
    run 1 in.onnx out.onnx --passes remove-identity,nope
    expect_one_error_line "unknown pass 'nope'"
    grep -q 'cleanup-dead' err.txt || fail "unknown pass message does not list valid passes"
    run 1 in.onnx out.onnx --passes remove-identity,,cleanup-dead
    expect_one_error_line "empty pass name"
    run 1 in.onnx out.onnx --method bogus
    expect_one_error_line "unknown method 'bogus'"
    grep -q 'none' err.txt || fail "unknown method message does not list valid methods"
    run 1 in.onnx out.onnx --passes cleanup-dead --gelu-to-relu
    expect_one_error_line "--gelu-to-relu and --mlp-recon go with a method"
    run 1 in.onnx out.onnx --method none --passes cleanup-dead
    expect_one_error_line "exclude each other"
    run 1 in.onnx out.onnx --threads 0
    expect_one_error_line "--threads"
    run 1 in.onnx out.onnx --threads 4x
    expect_one_error_line "--threads"
    run 1 in.onnx out.onnx --seed -3
    expect_one_error_line "--seed"
    run 1 in.onnx out.onnx --seed
    expect_one_error_line "--seed needs a value"
    [ -e out.onnx ] && fail "a usage error left out.onnx behind"
    return 0
}

case_roundtrip() {
    need_add_model
    run 0 in.onnx out.onnx --method none -q
    [ -s out.onnx ] || fail "no output model"
    [ -s err.txt ] && fail "-q still printed: $(cat err.txt)"
    cmp -s "$ADD_MODEL" in.onnx || fail "the input model changed"
    run 0 inspect out.onnx
    grep -q '^  Add  ' out.txt || fail "output model lacks the Add node"
    # Same input, same options: byte-identical output.
    run 0 in.onnx out2.onnx --method none --verify --threads 2 --seed 7
    cmp -s out.onnx out2.onnx || fail "two runs gave different bytes"
    if "$PY" -c 'import onnx' 2>/dev/null; then
        "$PY" -c 'import onnx,sys; onnx.checker.check_model(onnx.load(sys.argv[1]))' out.onnx \
            2>err.txt || fail "onnx.checker rejects the output"
    fi
}

case_passes() {
    make_mlp
    run 0 mlp.onnx out.onnx --passes remove-identity,cleanup-dead --verify
    grep -q 'pass remove-identity: 2 rewrite' err.txt || fail "no info line for remove-identity"
    "$PY" - <<'PYEOF' || fail "output structure is wrong"
import onnx
m = onnx.load("out.onnx")
onnx.checker.check_model(m)
ops = [n.op_type for n in m.graph.node]
assert ops == ["MatMul", "Add", "Relu"], ops
assert m.graph.node[0].input[0] == "x", m.graph.node[0].input
assert m.graph.node[2].input[0] == "a", m.graph.node[2].input
assert [i.name for i in m.graph.initializer] == ["w", "b"]
PYEOF
}

case_same_file() {
    need_add_model
    run 1 in.onnx in.onnx
    expect_one_error_line "is the input model"
    cmp -s "$ADD_MODEL" in.onnx || fail "the input model changed"
    run 1 in.onnx ./in.onnx --force
    expect_one_error_line "is the input model"
    ln -s in.onnx link.onnx
    run 1 in.onnx link.onnx --force
    expect_one_error_line "is the input model"
    ln in.onnx hard.onnx
    run 1 hard.onnx in.onnx --force
    expect_one_error_line "is the input model"
    cmp -s "$ADD_MODEL" in.onnx || fail "the input model changed"
}

case_overwrite() {
    need_add_model
    echo "precious" >out.onnx
    run 1 in.onnx out.onnx --method none
    expect_one_error_line "use --force"
    [ "$(cat out.onnx)" = precious ] || fail "existing output overwritten without --force"
    run 0 in.onnx out.onnx --method none --force -q
    grep -q precious out.onnx && fail "--force did not replace the existing output"
    run 0 inspect out.onnx
    mkdir dir.onnx
    run 1 in.onnx dir.onnx --force
    expect_one_error_line "is a folder"
}

case_missing_input() {
    run 3 nothere.onnx out.onnx --method none
    expect_one_error_line "nothere.onnx"
    [ -e out.onnx ] && fail "output created"
    run 3 inspect nothere.onnx
    expect_one_error_line "nothere.onnx"
}

case_empty_file() {
    : >empty.onnx
    run 2 empty.onnx out.onnx --method none
    expect_one_error_line "empty.onnx"
    [ -e out.onnx ] && fail "output created"
    run 2 inspect empty.onnx
    expect_one_error_line "empty.onnx"
}

case_random_bytes() {
    # Deterministic garbage (awk's seeded generator), several sizes.
    for n in 1 7 100 4096; do
        awk -v n=$n 'BEGIN { srand(42); for (i = 0; i < n; i++) printf "%c", 1 + int(rand() * 255) }' \
            >rand.onnx
        run 2 rand.onnx out.onnx --method none
        expect_one_error_line "rand.onnx"
        [ -e out.onnx ] && fail "output created for $n random bytes"
    done
    # A text file is not a model either.
    printf 'ir_version: 7\ngraph { }\n' >text.onnx
    run 2 text.onnx out.onnx --method none
    expect_one_error_line "text.onnx"
}

case_truncated() {
    make_mlp
    local size
    size=$(stat -c %s mlp.onnx)
    for cut in $((size / 2)) $((size - 1)) 20; do
        head -c "$cut" mlp.onnx >trunc.onnx
        run 2 trunc.onnx out.onnx --method none
        expect_one_error_line "trunc.onnx"
        [ -e out.onnx ] && fail "output created for a model cut at $cut bytes"
    done
    return 0
}

case_unwritable_output() {
    need_add_model
    run 3 in.onnx no/such/folder/out.onnx
    expect_one_error_line "no/such/folder"
    [ -e no ] && fail "a folder was created"
    echo x >plainfile
    run 3 in.onnx plainfile/out.onnx
    expect_one_error_line "plainfile"
    if [ "$(id -u)" != 0 ]; then # root ignores permission bits
        mkdir ro && chmod 555 ro
        run 3 in.onnx ro/out.onnx
        expect_one_error_line "ro"
        [ -z "$(ls -A ro)" ] || fail "files left in the read-only folder: $(ls -A ro)"
    fi
    return 0
}

case_inspect() {
    make_mlp
    run 0 inspect mlp.onnx
    for want in 'model: mlp.onnx' 'producer: cli_test' 'ir_version: ' 'opsets: ai.onnx 13' \
        'graph: mlp' 'inputs: 1' '  x: float32 [batch, 4]' 'outputs: 1' '  y: float32 [batch, 3]' \
        'nodes: 5 (5 op types)' 'parameters: 15 in 2 initializers, 60 bytes'; do
        grep -qF -- "$want" out.txt || fail "inspect output lacks '$want'"
    done
    grep -Eq '^  MatMul +1$' out.txt || fail "inspect lacks the MatMul count"
    grep -Eq '^  float32 +15 elements +60 bytes +\(2 tensors\)$' out.txt ||
        fail "inspect lacks the float32 parameter line"
    [ -s err.txt ] && fail "inspect wrote to stderr: $(cat err.txt)"
    run 1 inspect
    expect_one_error_line "expected a model"
    run 1 inspect a.onnx b.onnx
    expect_one_error_line "one model at a time"
    # Global options are accepted after the subcommand word.
    run 0 inspect -q mlp.onnx --threads 2
}

case_external_data() {
    make_mlp
    run 0 mlp.onnx out.onnx --method none --external-data -q
    [ -s out.onnx ] || fail "no output model"
    run 0 inspect out.onnx
    grep -qF 'parameters: 15 in 2 initializers, 60 bytes' out.txt || fail "weights not read back"
}

# Quantizing needs calibration data: without --calib the main form stops before loading.
case_no_calib() {
    make_mlp
    run 1 mlp.onnx out.onnx
    expect_one_error_line "no calibration data: give --calib"
    [ ! -e out.onnx ] || fail "an output was written"
}

# The default method quantizes: Q/DQ appear, the report is written, bad options are refused.
case_quantize_mlp() {
    make_mlp
    run 0 mlp.onnx q.onnx --calib random --calib-count 16 --holdout 4 --report r.json -q
    "$PY" - <<'PYEOF' || fail "quantized model is not what was expected"
import json, onnx
m = onnx.load("q.onnx")
ops = [n.op_type for n in m.graph.node]
assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2, ops
onnx.checker.check_model(m)
r = json.load(open("r.json"))
assert r["quantized_nodes"] == 1 and len(r["tensors"]) == 2, r
assert r["end_to_end"]["samples"] == 4 and r["calibration_samples"] == 12, r
PYEOF
    run 1 mlp.onnx q2.onnx --calib random --calib-count 8 --wbits 9
    expect_one_error_line "--wbits: '9' is not a bit width from 2 to 8"
    run 1 mlp.onnx q2.onnx --calib random --calib-count 8 --target trt --abits 4
    expect_one_error_line "TensorRT's explicit quantization is 8-bit only"
    [ ! -e q2.onnx ] || fail "an output was written after an error"
    run 3 mlp.onnx q3.onnx --calib nothere.npy
    expect_one_error_line "nothere.npy"
}

case_fixture_vit() {
    local vit=${OPQ_SOURCE_DIR:-}/fixtures/models/vit_tiny_op17.onnx
    [ -f "$vit" ] || { echo "skip: $vit missing (tools/scripts/make_fixtures.py)" >&2; exit 77; }
    run 0 inspect "$vit"
    grep -Eq '^parameters: [1-9][0-9]* in [1-9]' out.txt || fail "inspect shows no parameters"
    grep -Eq '^  (MatMul|Gemm) ' out.txt || fail "inspect shows no MatMul/Gemm"
    run 0 "$vit" a.onnx --method none --verify -q
    run 0 "$vit" b.onnx --method none -q
    cmp -s a.onnx b.onnx || fail "two runs gave different bytes"
    if "$PY" -c 'import onnx' 2>/dev/null; then
        "$PY" -c 'import onnx,sys; onnx.checker.check_model(onnx.load(sys.argv[1]))' a.onnx \
            2>err.txt || fail "onnx.checker rejects the output"
    fi
}

# defer-softmax on the two attention exports (fused qkv + Gather, torchvision's MHA with Slice)
# and on Swin's windows: every Softmax goes, the logits stay within float rounding.
case_defer_softmax() {
    "$PY" -c 'import numpy' 2>/dev/null || { echo "skip: $PY lacks numpy" >&2; exit 77; }
    "$PY" -c 'import numpy as np; np.save("x.npy", np.random.default_rng(1).random((8, 1, 28, 28), dtype=np.float32))' \
        || fail "could not write x.npy"
    local f
    for f in vit_tiny tv_vit swin_tiny; do
        local m=${OPQ_SOURCE_DIR:-}/fixtures/models/${f}_op17.onnx
        [ -f "$m" ] || { echo "skip: $m missing (tools/scripts/make_fixtures.py)" >&2; exit 77; }
        run 0 "$m" d.onnx --passes defer-softmax --defer-softmax on --verify --force -q
        run 0 inspect d.onnx
        grep -q '^  Softmax ' out.txt && fail "$f: a Softmax is left"
        grep -Eq '^  ReduceMax +4$' out.txt || fail "$f: not 4 ReduceMax nodes"
        rm -rf o1 o2
        run 0 run "$m" --input input=x.npy --output-dir o1
        run 0 run d.onnx --input input=x.npy --output-dir o2
        "$PY" -c 'import numpy as np, sys; a = np.load("o1/logits.npy"); b = np.load("o2/logits.npy"); sys.exit(0 if np.abs(a - b).max() <= 1e-5 * np.abs(a).max() else 1)' \
            || fail "$f: logits changed beyond 1e-5 relative"
    done
    run 1 "$m" e.onnx --calib random --defer-softmax maybe
    expect_one_error_line "--defer-softmax"
    [ ! -e e.onnx ] || fail "an output was written after an error"
    run 1 "$m" e.onnx --calib random --method erq --erq-inputs both
    expect_one_error_line "--erq-inputs"
    [ ! -e e.onnx ] || fail "an output was written after an error"
}

# --opset N: upgrades an opset-13 fixture (its ReduceMeans get an axes input), refuses a target
# below the model's, one above 21, and --passes without upgrade-opset.
case_opset() {
    local vit=${OPQ_SOURCE_DIR:-}/fixtures/models/vit_tiny_op13.onnx
    [ -f "$vit" ] || { echo "skip: $vit missing (tools/scripts/make_fixtures.py)" >&2; exit 77; }
    run 0 "$vit" up.onnx --method none --opset 21 -q
    run 0 inspect up.onnx
    grep -q '^ir_version: 10$' out.txt || fail "upgraded model's IR version is not 10"
    grep -q '^opsets: ai.onnx 21$' out.txt || fail "upgraded model is not at opset 21"
    run 0 up.onnx up2.onnx --method none --opset 21 -q # already there: nothing to do
    cmp -s up.onnx up2.onnx || fail "upgrading an opset-21 model to 21 changed it"
    run 1 up.onnx low.onnx --method none --opset 17
    expect_one_error_line "target opset 17 is below the model's opset 21"
    [ ! -e low.onnx ] || fail "an output was written after an error"
    run 1 "$vit" x.onnx --method none --opset 22
    expect_one_error_line "--opset: '22' is not an opset from 13 to 21"
    run 1 "$vit" x.onnx --passes cleanup-dead --opset 21
    expect_one_error_line "list upgrade-opset there"
    run 0 "$vit" p.onnx --passes upgrade-opset,cleanup-dead --opset 18 -q
    run 0 inspect p.onnx
    grep -q '^opsets: ai.onnx 18$' out.txt || fail "upgrade-opset with --opset 18 gave another opset"
}

# --method flexround on the ViT fixture (few iterations, random calibration data): listed, runs,
# deterministic, and every weight DequantizeLinear holds integers in the 4-bit range.
case_flexround() {
    local vit=${OPQ_SOURCE_DIR:-}/fixtures/models/vit_tiny_op17.onnx
    [ -f "$vit" ] || { echo "skip: $vit missing (tools/scripts/make_fixtures.py)" >&2; exit 77; }
    run 0 --list-passes
    grep -q '^  flexround ' out.txt || fail "--list-passes does not list the flexround method"
    local args=(--calib random --calib-count 24 --batch 8 --recon-batch 8 --recon-iters 4
                --wbits 4 --abits 4 --method flexround --threads 1 -q)
    run 0 "$vit" a.onnx "${args[@]}"
    run 0 "$vit" b.onnx "${args[@]}"
    cmp -s a.onnx b.onnx || fail "two flexround runs gave different bytes"
    run 1 "$vit" c.onnx "${args[@]}" --flexround-lr 0
    expect_one_error_line "--flexround-lr"
    if "$PY" -c 'import onnx' 2>/dev/null; then
        "$PY" - <<'PYEOF' || fail "flexround output weights are not 4-bit integers"
import onnx
from onnx import numpy_helper
m = onnx.load("a.onnx")
onnx.checker.check_model(m)
inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
n = 0
for node in m.graph.node:
    if node.op_type == "DequantizeLinear" and node.input[0] in inits:
        q = inits[node.input[0]]
        assert q.dtype.kind == "i" and q.min() >= -8 and q.max() <= 7, node.input[0]
        n += 1
assert n > 0
PYEOF
    fi
}

# --method aphq (few iterations, random calibration data): deterministic, --adaround-lr,
# --recon-act-lr, --recon-aph-floor and --seed reach the engine (other values give other codes),
# bad values are one usage error each.
case_aphq() {
    local vit=${OPQ_SOURCE_DIR:-}/fixtures/models/vit_tiny_op17.onnx
    [ -f "$vit" ] || { echo "skip: $vit missing (tools/scripts/make_fixtures.py)" >&2; exit 77; }
    local args=(--calib random --calib-count 24 --batch 8 --recon-batch 8 --recon-iters 20
                --wbits 4 --abits 4 --method aphq --threads 1 -q)
    run 0 "$vit" a.onnx "${args[@]}"
    # the default learning rate at 20 iterations: 0.001 x 20000 / 20, kept at most 0.01
    run 0 "$vit" b.onnx "${args[@]}" --adaround-lr 0.01
    cmp -s a.onnx b.onnx || fail "--adaround-lr 0.01 (the default here) gave different bytes"
    run 0 "$vit" c.onnx "${args[@]}" --adaround-lr 0.001
    ! cmp -s a.onnx c.onnx || fail "--adaround-lr 0.001 gave the default's bytes"
    run 0 "$vit" g.onnx "${args[@]}" --recon-act-lr 4e-5
    cmp -s a.onnx g.onnx || fail "--recon-act-lr 4e-5 (the default) gave different bytes"
    run 0 "$vit" h.onnx "${args[@]}" --recon-act-lr 4e-3
    ! cmp -s a.onnx h.onnx || fail "--recon-act-lr 4e-3 gave the default's bytes"
    run 0 "$vit" i.onnx "${args[@]}" --seed 0
    cmp -s a.onnx i.onnx || fail "--seed 0 (the default) gave different bytes"
    run 0 "$vit" j.onnx "${args[@]}" --seed 1
    ! cmp -s a.onnx j.onnx || fail "--seed 1 gave the default's bytes (batches and QDrop draws)"
    run 0 "$vit" e.onnx "${args[@]}" --recon-aph-floor 0
    cmp -s a.onnx e.onnx || fail "--recon-aph-floor 0 (the default) gave different bytes"
    run 0 "$vit" f.onnx "${args[@]}" --recon-aph-floor 0.3
    ! cmp -s a.onnx f.onnx || fail "--recon-aph-floor 0.3 gave the default's bytes"
    run 1 "$vit" d.onnx "${args[@]}" --recon-aph-floor -1
    expect_one_error_line "--recon-aph-floor"
    run 1 "$vit" d.onnx "${args[@]}" --adaround-lr 0
    expect_one_error_line "--adaround-lr"
    run 1 "$vit" d.onnx "${args[@]}" --recon-act-lr x
    expect_one_error_line "--recon-act-lr"
    [ ! -e d.onnx ] || fail "an output was written after an error"
}

# --mlp-recon: GELU -> ReLU, every MLP retrained (its loss goes down), deterministic, no Erf left.
case_mlp_recon() {
    local vit=${OPQ_SOURCE_DIR:-}/fixtures/models/vit_tiny_op17.onnx
    [ -f "$vit" ] || { echo "skip: $vit missing (tools/scripts/make_fixtures.py)" >&2; exit 77; }
    local args=(--method none --mlp-recon --calib random --calib-count 40 --recon-batch 8
                --mr-iters 30 --threads 1)
    run 0 "$vit" a.onnx "${args[@]}"
    local n
    n=$(grep -c "MLP reconstruction /blocks" err.txt || true)
    [ "$n" = 4 ] || fail "expected 4 retrained MLPs, log has $n"
    awk '/MLP reconstruction \/blocks/ { for (i = 1; i <= NF; i++) if ($i == "loss") \
         { if (!($(i + 3) < $(i + 1))) bad = 1 } } END { exit bad }' err.txt ||
        fail "an MLP's loss did not go down"
    run 0 "$vit" b.onnx "${args[@]}" -q
    cmp -s a.onnx b.onnx || fail "two --mlp-recon runs gave different bytes"
    run 0 inspect a.onnx
    grep -q "Relu" out.txt || fail "no Relu in the output"
    ! grep -q "Erf" out.txt || fail "an Erf GELU is left"
    run 1 "$vit" c.onnx --mlp-recon --gelu-to-relu --calib random
    expect_one_error_line "--mlp-recon already swaps GELU for ReLU"
    run 1 "$vit" c.onnx --method none --mlp-recon
    expect_one_error_line "no calibration data"
    run 1 "$vit" c.onnx --passes mlp-recon,quantize-aphq
    expect_one_error_line "no calibration data"
    run 1 "$vit" c.onnx "${args[@]}" --mr-iters 0
    expect_one_error_line "--mr-iters"
    run 1 "$vit" c.onnx "${args[@]}" --mr-lr 0
    expect_one_error_line "--mr-lr"
    run 1 "$vit" c.onnx --calib random --input-bits 9
    expect_one_error_line "--input-bits"
    [ ! -e c.onnx ] || fail "an output was written after an error"
}

fn="case_$CASE"
declare -F "$fn" >/dev/null || { echo "unknown case '$CASE'" >&2; exit 2; }
"$fn"
echo "ok [$CASE]"
