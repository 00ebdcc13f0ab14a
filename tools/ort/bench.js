#!/usr/bin/env node
/*
 * bench.js: median forward time of an ONNX model in ONNX Runtime.
 *
 *   node tools/ort/bench.js MODEL [--input NAME=FILE.npy ...] [--shape NAME=1x3x224x224 ...]
 *                          [--threads N] [--repeat R] [--warmup W] [--opt LEVEL]
 *
 * Each model input comes from a .npy file (--input) or is synthesized with the given shape
 * (--shape): floats are filled from a fixed-seed generator in [-1, 1), integers and bools with 0.
 * An input given neither way is synthesized from the model's declared shape when it is fully
 * static. Sessions use N intra-op threads (default 1), one inter-op thread, sequential
 * execution and graphOptimizationLevel 'all' (change with --opt). After W warm-up runs
 * (default 3), R timed runs (default 20) are made; the last stdout line is
 *   {"forward_ms_median": X, "runs": R}
 * preceded by a human-readable summary line.
 */
'use strict';

const npy = require('./npy');
const common = require('./common');

const TOOL = 'bench.js';
const USAGE = 'usage: node bench.js MODEL [--input NAME=FILE.npy] [--shape NAME=1x3x224x224] ' +
              '[--threads N] [--repeat R] [--warmup W] [--opt LEVEL]';

const TYPED = {
    float32: Float32Array, float64: Float64Array, int8: Int8Array, uint8: Uint8Array,
    int16: Int16Array, uint16: Uint16Array, int32: Int32Array, uint32: Uint32Array,
    int64: BigInt64Array, uint64: BigUint64Array, bool: Uint8Array,
};

function parseShape(text, name) {
    if (!/^\d+(x\d+)*$/.test(text)) {
        throw new Error(`--shape ${name}: expected dims like 1x3x224x224, got '${text}'`);
    }
    return text.split('x').map(Number);
}

// Deterministic fill: 32-bit LCG mapped to [-1, 1).
function synthesize(dtype, shape, name) {
    const Ctor = TYPED[dtype];
    if (!Ctor) {
        throw new Error(`input '${name}': cannot synthesize data of type ${dtype}`);
    }
    const n = npy.numel(shape);
    const data = new Ctor(n);
    if (dtype === 'float32' || dtype === 'float64') {
        let s = 0x12345678 >>> 0;
        for (let i = 0; i < n; i++) {
            s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
            data[i] = s / 2147483648 - 1;
        }
    }
    return data;
}

async function main() {
    const {positional, opts} = common.parseArgs(process.argv.slice(2), {
        positional: ['MODEL'],
        options: {'--input': 'list', '--shape': 'list', '--threads': 'int', '--repeat': 'int',
                  '--warmup': 'string', '--opt': 'string'},
    }, USAGE);
    const model = positional[0];
    const threads = opts['--threads'] || 1;
    const repeat = opts['--repeat'] || 20;
    const warmupText = opts['--warmup'] === undefined ? '3' : opts['--warmup'];
    if (!/^\d+$/.test(warmupText)) {
        throw new Error(`option --warmup needs a non-negative integer, got '${warmupText}'`);
    }
    const warmup = Number(warmupText);
    const session = await common.createSession(model, threads, opts['--opt'] || 'all');
    const feeds = {};
    for (const spec of opts['--input'] || []) {
        const [name, file] = common.splitNameValue(spec, '--input');
        if (feeds[name]) {
            throw new Error(`input '${name}' given twice`);
        }
        const arr = npy.readNpy(file);
        common.checkInput(session, name, arr, file);
        feeds[name] = common.makeTensor(arr.dtype, arr.data, arr.shape);
    }
    for (const spec of opts['--shape'] || []) {
        const [name, text] = common.splitNameValue(spec, '--shape');
        if (feeds[name]) {
            throw new Error(`input '${name}' given twice`);
        }
        const shape = parseShape(text, name);
        const meta = common.inputMeta(session, name);
        const dtype = meta && meta.isTensor ? meta.type : 'float32';
        common.checkInput(session, name, {dtype, shape}, `--shape ${name}`);
        feeds[name] = common.makeTensor(dtype, synthesize(dtype, shape, name), shape);
    }
    for (const name of session.inputNames) {
        if (feeds[name]) {
            continue;
        }
        const meta = common.inputMeta(session, name);
        if (!meta || !meta.isTensor || meta.shape.length === 0 ||
            !meta.shape.every((d) => typeof d === 'number' && d > 0)) {
            throw new Error(`${model}: input '${name}' has no static shape: give ` +
                            `--shape ${name}=DIMS or --input ${name}=FILE.npy`);
        }
        const shape = meta.shape.slice();
        feeds[name] = common.makeTensor(meta.type, synthesize(meta.type, shape, name), shape);
    }
    for (let i = 0; i < warmup; i++) {
        await common.runSession(session, feeds);
    }
    const times = [];
    for (let i = 0; i < repeat; i++) {
        const t0 = process.hrtime.bigint();
        await common.runSession(session, feeds);
        times.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
    times.sort((a, b) => a - b);
    const mid = times.length >> 1;
    const median = times.length % 2 ? times[mid] : (times[mid - 1] + times[mid]) / 2;
    const round = (v) => Math.round(v * 1000) / 1000;
    process.stdout.write(`model ${model} threads ${threads} warmup ${warmup} runs ${repeat} ` +
                         `min_ms ${round(times[0])} max_ms ${round(times[times.length - 1])}\n`);
    process.stdout.write(JSON.stringify({forward_ms_median: round(median), runs: repeat}) + '\n');
    return 0;
}

common.runMain(TOOL, main);
