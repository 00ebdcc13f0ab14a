/*
 * harness.test.js: end-to-end tests of run.js, eval.js and bench.js on the committed fixtures
 * (node --test tools/ort/harness.test.js). Checks that run.js writes deterministic, well-formed
 * .npy outputs that agree with eval.js, that eval.js and bench.js print their contracted lines,
 * and that bad input gives a one-line error and a non-zero exit.
 */
'use strict';

const assert = require('node:assert');
const {spawnSync} = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const test = require('node:test');
const npy = require('./npy');

const ROOT = path.join(__dirname, '..', '..');
const MODEL = path.join(ROOT, 'fixtures', 'models', 'vit_tiny_op13.onnx');
const X = path.join(ROOT, 'fixtures', 'data', 'test32_x.npy');
const Y = path.join(ROOT, 'fixtures', 'data', 'test32_y.npy');
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'ort-harness-'));

function node(script, args) {
    const r = spawnSync(process.execPath, [path.join(__dirname, script)].concat(args),
                        {encoding: 'utf8'});
    return {code: r.status, out: r.stdout, err: r.stderr};
}

test('run.js writes float32 logits, byte-identical across runs', () => {
    const a = node('run.js', [MODEL, '--input', `input=${X}`, '--output-dir', TMP + '/a']);
    const b = node('run.js', [MODEL, '--input', `input=${X}`, '--output-dir', TMP + '/b']);
    assert.strictEqual(a.code, 0, a.err);
    assert.strictEqual(b.code, 0, b.err);
    assert.match(a.out, /^logits .*logits\.npy float32 \[32,10\]\n$/);
    const fa = fs.readFileSync(path.join(TMP, 'a', 'logits.npy'));
    const fb = fs.readFileSync(path.join(TMP, 'b', 'logits.npy'));
    assert.ok(fa.equals(fb));
    const l = npy.readNpy(path.join(TMP, 'a', 'logits.npy'));
    assert.deepStrictEqual(l.shape, [32, 10]);
    assert.ok(l.data.every(Number.isFinite));
});

test('eval.js top-1 agrees with the argmax of run.js logits', () => {
    const r = node('run.js', [MODEL, '--input', `input=${X}`, '--output-dir', TMP + '/c']);
    assert.strictEqual(r.code, 0, r.err);
    const l = npy.readNpy(path.join(TMP, 'c', 'logits.npy')).data;
    const y = npy.readNpy(Y).data;
    let hits = 0;
    for (let i = 0; i < 32; i++) {
        let best = 0;
        for (let c = 1; c < 10; c++) {
            if (l[i * 10 + c] > l[i * 10 + best]) {
                best = c;
            }
        }
        hits += BigInt(best) === y[i] ? 1 : 0;
    }
    for (const batch of ['32', '5']) {
        const e = node('eval.js', [MODEL, '--data', X, '--labels', Y, '--batch', batch]);
        assert.strictEqual(e.code, 0, e.err);
        assert.strictEqual(e.out, `top1: ${(hits / 32).toFixed(4)}\n` +
                                  `top5: ${e.out.split('\n')[1].slice(6)}\n`);
        const top5 = Number(e.out.split('\n')[1].slice(6));
        assert.ok(top5 >= hits / 32 && top5 <= 1);
    }
    // A trained fixture must be far above chance on these 32 images.
    assert.ok(hits >= 24, `only ${hits}/32 correct`);
});

test('bench.js ends with the JSON line', () => {
    for (const args of [['--shape', 'input=2x1x28x28'], ['--input', `input=${X}`]]) {
        const r = node('bench.js', [MODEL, ...args, '--threads', '1', '--repeat', '3']);
        assert.strictEqual(r.code, 0, r.err);
        const last = r.out.trim().split('\n').pop();
        const j = JSON.parse(last);
        assert.deepStrictEqual(Object.keys(j), ['forward_ms_median', 'runs']);
        assert.strictEqual(j.runs, 3);
        assert.ok(j.forward_ms_median > 0);
    }
});

test('bad input: one-line error, non-zero exit', () => {
    const cases = [
        ['run.js', [MODEL, '--output-dir', TMP + '/d']],
        ['run.js', [MODEL, '--input', `input=${Y}`, '--output-dir', TMP + '/d']],
        ['run.js', [MODEL, '--input', `nope=${X}`, '--output-dir', TMP + '/d']],
        ['run.js', [path.join(TMP, 'missing.onnx'), '--output-dir', TMP + '/d']],
        ['run.js', [X, '--output-dir', TMP + '/d']],
        ['eval.js', [MODEL, '--data', X]],
        ['eval.js', [MODEL, '--data', X, '--labels', X]],
        ['eval.js', [MODEL, '--data', X, '--labels', Y, '--batch', 'x']],
        ['bench.js', [MODEL]],
        ['bench.js', [MODEL, '--shape', 'input=1x3x28x28']],
        ['bench.js', [MODEL, '--shape', 'input=1,1,28,28']],
    ];
    for (const [script, args] of cases) {
        const r = node(script, args);
        assert.notStrictEqual(r.code, 0, `${script} ${args.join(' ')}`);
        assert.match(r.err, new RegExp(`^${script.replace('.', '\\.')}: [^\\n]+\\n$`), r.err);
    }
});
