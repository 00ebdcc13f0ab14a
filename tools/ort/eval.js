#!/usr/bin/env node
/*
 * eval.js: top-1 / top-5 accuracy of a classifier in ONNX Runtime.
 *
 *   node tools/ort/eval.js MODEL --data X.npy --labels Y.npy [--batch B] [--threads N]
 *                         [--opt disabled|basic|extended|all] [--output NAME]
 *
 * X is float32 [N, ...] fed to the model's single input in batches of B (default 100; a model
 * with a fixed batch dimension uses that size and N must be a multiple of it). Y holds N int64
 * (or int32) labels. The logits are the output named "logits" if present, else the first output
 * (or --output NAME), shaped [batch, classes].
 * Rank rule (shared with `onnx-ptq eval`): the rank of a sample is the number of classes whose
 * logit is greater than the label's, plus those with an equal logit and a lower class index;
 * top-k counts samples with rank < k. Prints exactly two lines: "top1: 0.xxxx", "top5: 0.xxxx".
 */
'use strict';

const npy = require('./npy');
const common = require('./common');

const TOOL = 'eval.js';
const USAGE = 'usage: node eval.js MODEL --data X.npy --labels Y.npy [--batch B] [--threads N] ' +
              '[--opt LEVEL] [--output NAME]';

// Rank of class `label` among row `r` of logits (see the rule above).
function rankOf(logits, r, classes, label) {
    const base = r * classes;
    const v = logits[base + label];
    let rank = 0;
    for (let c = 0; c < classes; c++) {
        const x = logits[base + c];
        if (x > v || (x === v && c < label)) {
            rank++;
        }
    }
    return rank;
}

async function main() {
    const {positional, opts} = common.parseArgs(process.argv.slice(2), {
        positional: ['MODEL'],
        options: {'--data': 'string', '--labels': 'string', '--batch': 'int', '--threads': 'int',
                  '--opt': 'string', '--output': 'string'},
    }, USAGE);
    const model = positional[0];
    if (!opts['--data'] || !opts['--labels']) {
        throw new Error('need --data X.npy and --labels Y.npy');
    }
    const dataFile = opts['--data'];
    const labelFile = opts['--labels'];
    const x = npy.readNpy(dataFile);
    const y = npy.readNpy(labelFile);
    if (x.shape.length < 1 || x.shape[0] === 0) {
        throw new Error(`${dataFile}: need a non-empty [N, ...] array, got [${x.shape.join(',')}]`);
    }
    const n = x.shape[0];
    if (y.dtype !== 'int64' && y.dtype !== 'int32') {
        throw new Error(`${labelFile}: labels must be int64 or int32, got ${y.dtype}`);
    }
    if (y.shape.length !== 1 || y.shape[0] !== n) {
        throw new Error(`${labelFile}: labels shape [${y.shape.join(',')}] does not match ` +
                        `${n} samples in ${dataFile}`);
    }
    const session = await common.createSession(model, opts['--threads'] || 1,
                                               opts['--opt'] || 'all');
    if (session.inputNames.length !== 1) {
        throw new Error(`${model}: expected one input, model has ` +
                        `${session.inputNames.length} (${session.inputNames.join(', ')})`);
    }
    const inName = session.inputNames[0];
    common.checkInput(session, inName, {dtype: x.dtype, shape: [1].concat(x.shape.slice(1))},
                      dataFile + ' (per sample)');
    let outName = opts['--output'];
    if (outName === undefined) {
        outName = session.outputNames.includes('logits') ? 'logits' : session.outputNames[0];
    } else if (!session.outputNames.includes(outName)) {
        throw new Error(`${model}: no output '${outName}' (outputs: ` +
                        `${session.outputNames.join(', ')})`);
    }
    let batch = opts['--batch'] || 100;
    const meta = common.inputMeta(session, inName);
    if (meta && meta.isTensor && typeof meta.shape[0] === 'number' && meta.shape[0] > 0) {
        batch = meta.shape[0];
        if (n % batch !== 0) {
            throw new Error(`${model}: fixed batch ${batch} does not divide ${n} samples`);
        }
    }
    const per = npy.numel(x.shape.slice(1));
    let top1 = 0;
    let top5 = 0;
    for (let s = 0; s < n; s += batch) {
        const b = Math.min(batch, n - s);
        const chunk = x.data.slice(s * per, (s + b) * per);
        const feeds = {};
        feeds[inName] = common.makeTensor(x.dtype, chunk, [b].concat(x.shape.slice(1)));
        const res = await common.runSession(session, feeds);
        const t = res[outName];
        const dims = t.dims.map(Number);
        if (dims.length !== 2 || dims[0] !== b) {
            throw new Error(`${model}: output '${outName}' has shape [${dims.join(',')}], ` +
                            `expected [${b}, classes]`);
        }
        if (t.type !== 'float32') {
            throw new Error(`${model}: output '${outName}' is ${t.type}, expected float32`);
        }
        const classes = dims[1];
        for (let r = 0; r < b; r++) {
            const label = Number(y.data[s + r]);
            if (!Number.isInteger(label) || label < 0 || label >= classes) {
                throw new Error(`${labelFile}: label ${label} at index ${s + r} is outside ` +
                                `[0, ${classes})`);
            }
            const rank = rankOf(t.data, r, classes, label);
            if (rank < 1) {
                top1++;
            }
            if (rank < 5) {
                top5++;
            }
        }
    }
    process.stdout.write(`top1: ${(top1 / n).toFixed(4)}\ntop5: ${(top5 / n).toFixed(4)}\n`);
    return 0;
}

common.runMain(TOOL, main);
