#!/usr/bin/env node
/*
 * run.js: run an ONNX model once in ONNX Runtime and write every output as a .npy file.
 *
 *   node tools/ort/run.js MODEL --input NAME=FILE.npy [--input ...] --output-dir DIR
 *                        [--threads N] [--opt disabled|basic|extended|all]
 *
 * Every model input must be given. Outputs go to DIR/<name>.npy, with characters other than
 * [A-Za-z0-9._-] in <name> replaced by '_'. Floating outputs (float32/float16/float64) are
 * written as float32; integer and bool outputs keep their type. One line per output is printed:
 * "<name> <file> <dtype> [dims]". Session settings are deterministic (see common.js).
 */
'use strict';

const fs = require('fs');
const path = require('path');
const npy = require('./npy');
const common = require('./common');

const TOOL = 'run.js';
const USAGE = 'usage: node run.js MODEL --input NAME=FILE.npy [...] --output-dir DIR ' +
              '[--threads N] [--opt disabled|basic|extended|all]';

function toFloat32(t) {
    if (t.type === 'float32') {
        return t.data;
    }
    if (t.type === 'float16') {
        return npy.halfToFloat32(t.data instanceof Uint16Array ? t.data
                                 : new Uint16Array(t.data.buffer, t.data.byteOffset,
                                                   t.data.length));
    }
    return Float32Array.from(t.data);
}

async function main() {
    const {positional, opts} = common.parseArgs(process.argv.slice(2), {
        positional: ['MODEL'],
        options: {'--input': 'list', '--output-dir': 'string', '--threads': 'int',
                  '--opt': 'string'},
    }, USAGE);
    const model = positional[0];
    const outDir = opts['--output-dir'];
    if (!outDir) {
        throw new Error('missing --output-dir DIR');
    }
    const session = await common.createSession(model, opts['--threads'] || 1,
                                               opts['--opt'] || 'all');
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
    for (const name of session.inputNames) {
        if (!feeds[name]) {
            throw new Error(`${model}: input '${name}' not given (use --input ${name}=FILE.npy)`);
        }
    }
    const results = await common.runSession(session, feeds);
    try {
        fs.mkdirSync(outDir, {recursive: true});
    } catch (e) {
        throw new Error(`${outDir}: cannot create output folder: ${e.code || e.message}`);
    }
    const used = new Set();
    for (const name of session.outputNames) {
        const t = results[name];
        let base = name.replace(/[^A-Za-z0-9._-]/g, '_');
        if (base === '' || base === '.' || base === '..') {
            base = '_' + base;
        }
        if (used.has(base)) {
            throw new Error(`outputs collide on file name '${base}.npy'`);
        }
        used.add(base);
        const file = path.join(outDir, base + '.npy');
        let dtype = t.type;
        let data = t.data;
        if (dtype === 'float32' || dtype === 'float16' || dtype === 'float64') {
            data = toFloat32(t);
            dtype = 'float32';
        } else if (!npy.DTYPES[dtype]) {
            throw new Error(`output '${name}': unsupported type ${dtype}`);
        }
        const shape = t.dims.map(Number);
        npy.writeNpy(file, dtype, shape, data);
        process.stdout.write(`${name} ${file} ${dtype} [${shape.join(',')}]\n`);
    }
    return 0;
}

common.runMain(TOOL, main);
