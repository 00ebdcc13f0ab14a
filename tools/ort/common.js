/*
 * common.js: shared pieces of the ONNX Runtime harness (run.js, eval.js, bench.js):
 * command-line parsing, deterministic session creation, input checking against the model's
 * metadata, and the one-line-error-then-exit convention.
 */
'use strict';

const fs = require('fs');
const path = require('path');

let ort = null;

function loadOrt() {
    if (ort === null) {
        try {
            ort = require('onnxruntime-node');
        } catch (e) {
            throw new Error('cannot load onnxruntime-node (run `npm ci` in tools/ort): ' +
                            firstLine(e.message));
        }
    }
    return ort;
}

function firstLine(msg) {
    const s = String(msg).split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
    return s.length ? s[0] : 'unknown error';
}

// Print "<tool>: <message>" on one line to stderr and exit with status 1.
function fail(tool, msg) {
    process.stderr.write(`${tool}: ${firstLine(msg)}\n`);
    process.exit(1);
}

// Run an async main(), turning any thrown error into a one-line message and exit status 1.
function runMain(tool, main) {
    main().then((code) => {
        process.exitCode = code || 0;
    }, (e) => fail(tool, e && e.message ? e.message : e));
}

/*
 * Parse argv against a spec: {positional: ['MODEL'], options: {'--data': 'string',
 * '--batch': 'int', '--input': 'list'}}. Returns {positional: [...], opts: {...}}.
 */
function parseArgs(argv, spec, usage) {
    const opts = {};
    const positional = [];
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === '-h' || a === '--help') {
            process.stdout.write(usage + '\n');
            process.exit(0);
        }
        if (a.startsWith('--')) {
            let key = a;
            let val = null;
            const eq = a.indexOf('=');
            if (eq > 0) {
                key = a.slice(0, eq);
                val = a.slice(eq + 1);
            }
            const kind = spec.options[key];
            if (!kind) {
                throw new Error(`unknown option ${key} (${usage.split("\n")[0]})`);
            }
            if (val === null) {
                if (i + 1 >= argv.length) {
                    throw new Error(`option ${key} needs a value`);
                }
                val = argv[++i];
            }
            if (kind === 'int') {
                if (!/^\d+$/.test(val) || Number(val) <= 0) {
                    throw new Error(`option ${key} needs a positive integer, got '${val}'`);
                }
                opts[key] = Number(val);
            } else if (kind === 'list') {
                (opts[key] = opts[key] || []).push(val);
            } else {
                opts[key] = val;
            }
        } else {
            positional.push(a);
        }
    }
    if (positional.length !== spec.positional.length) {
        throw new Error(`expected ${spec.positional.join(" ")} (${usage.split("\n")[0]})`);
    }
    return {positional, opts};
}

// Split "NAME=VALUE" (the name may itself contain '=' only if quoted away: we split on the last).
function splitNameValue(arg, opt) {
    const eq = arg.lastIndexOf('=');
    if (eq <= 0 || eq === arg.length - 1) {
        throw new Error(`${opt} expects NAME=VALUE, got '${arg}'`);
    }
    return [arg.slice(0, eq), arg.slice(eq + 1)];
}

const OPT_LEVELS = ['disabled', 'basic', 'extended', 'all'];

/*
 * Create a session with deterministic settings: sequential execution, a fixed number of
 * intra-op threads (default 1) and one inter-op thread, so the same inputs give the same bits.
 */
async function createSession(modelPath, threads, optLevel) {
    const o = loadOrt();
    if (!fs.existsSync(modelPath)) {
        throw new Error(`${modelPath}: no such file`);
    }
    if (!OPT_LEVELS.includes(optLevel)) {
        throw new Error(`bad --opt '${optLevel}' (one of ${OPT_LEVELS.join(', ')})`);
    }
    const options = {
        executionProviders: ['cpu'],
        intraOpNumThreads: threads,
        interOpNumThreads: 1,
        executionMode: 'sequential',
        graphOptimizationLevel: optLevel,
        logSeverityLevel: 3,
    };
    try {
        return await o.InferenceSession.create(path.resolve(modelPath), options);
    } catch (e) {
        throw new Error(`${modelPath}: cannot load model: ${firstLine(e.message)}`);
    }
}

function inputMeta(session, name) {
    const list = session.inputMetadata || [];
    for (const m of list) {
        if (m.name === name) {
            return m;
        }
    }
    return null;
}

// Check a loaded .npy array against the model input's declared type and shape.
function checkInput(session, name, arr, file) {
    if (!session.inputNames.includes(name)) {
        throw new Error(`model has no input '${name}' (inputs: ${session.inputNames.join(', ')})`);
    }
    const m = inputMeta(session, name);
    if (!m || !m.isTensor) {
        return;
    }
    if (m.type !== arr.dtype) {
        throw new Error(`input '${name}': model expects ${m.type}, ${file} holds ${arr.dtype}`);
    }
    if (m.shape.length > 0) {
        if (m.shape.length !== arr.shape.length) {
            throw new Error(`input '${name}': model expects rank ${m.shape.length} ` +
                            `[${m.shape.join(',')}], ${file} has shape [${arr.shape.join(',')}]`);
        }
        for (let i = 0; i < m.shape.length; i++) {
            const d = m.shape[i];
            if (typeof d === 'number' && d >= 0 && d !== arr.shape[i]) {
                throw new Error(`input '${name}': dim ${i} must be ${d}, ${file} has shape ` +
                                `[${arr.shape.join(',')}]`);
            }
        }
    }
}

function makeTensor(dtype, data, shape) {
    const o = loadOrt();
    return new o.Tensor(dtype, data, shape);
}

async function runSession(session, feeds) {
    try {
        return await session.run(feeds);
    } catch (e) {
        throw new Error(`inference failed: ${firstLine(e.message)}`);
    }
}

module.exports = {
    loadOrt, fail, runMain, parseArgs, splitNameValue, createSession, inputMeta, checkInput,
    makeTensor, runSession, firstLine, OPT_LEVELS,
};
