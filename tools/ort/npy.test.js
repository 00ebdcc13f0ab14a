/*
 * npy.test.js: tests of the .npy reader/writer (node --test tools/ort/npy.test.js).
 * Round-trips every dtype, checks the header layout numpy expects, reads the committed
 * numpy-written fixtures, and checks that malformed files fail with a message naming the file.
 */
'use strict';

const assert = require('node:assert');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const test = require('node:test');
const npy = require('./npy');

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'npy-test-'));
const FIXTURES = path.join(__dirname, '..', '..', 'fixtures', 'data');

test('round trip of every dtype', () => {
    const cases = {
        float32: Float32Array.from([1.5, -2.25, 3e-8, Infinity, 0, 7]),
        float64: Float64Array.from([1e300, -0.5, 2, 3, 4, 5]),
        float16: Uint16Array.from([0x3c00, 0xc000, 0, 1, 2, 3]),
        int8: Int8Array.from([-128, 127, 0, 1, 2, 3]),
        uint8: Uint8Array.from([0, 255, 1, 2, 3, 4]),
        int16: Int16Array.from([-32768, 32767, 0, 1, 2, 3]),
        uint16: Uint16Array.from([65535, 0, 1, 2, 3, 4]),
        int32: Int32Array.from([-2147483648, 2147483647, 0, 1, 2, 3]),
        uint32: Uint32Array.from([4294967295, 0, 1, 2, 3, 4]),
        int64: BigInt64Array.from([-(2n ** 63n), 2n ** 63n - 1n, 0n, 1n, 2n, 3n]),
        uint64: BigUint64Array.from([2n ** 64n - 1n, 0n, 1n, 2n, 3n, 4n]),
        bool: Uint8Array.from([1, 0, 1, 1, 0, 0]),
    };
    for (const [dtype, data] of Object.entries(cases)) {
        const file = path.join(TMP, dtype + '.npy');
        npy.writeNpy(file, dtype, [2, 3], data);
        const back = npy.readNpy(file);
        assert.strictEqual(back.dtype, dtype);
        assert.deepStrictEqual(back.shape, [2, 3]);
        assert.deepStrictEqual(Array.from(back.data), Array.from(data), dtype);
    }
});

test('header is padded to 64 bytes and shapes use Python tuple syntax', () => {
    for (const [shape, repr] of [[[], '()'], [[5], '(5,)'], [[2, 0, 4], '(2, 0, 4)']]) {
        const n = npy.numel(shape);
        const buf = npy.encodeNpy('float32', shape, new Float32Array(n));
        const hlen = buf.readUInt16LE(8);
        assert.strictEqual((10 + hlen) % 64, 0);
        assert.strictEqual(buf[10 + hlen - 1], 0x0a);
        assert.ok(buf.toString('latin1', 10, 10 + hlen).includes(`'shape': ${repr}`));
        assert.strictEqual(buf.length, 10 + hlen + 4 * n);
    }
});

test('reads the numpy-written fixtures', () => {
    const x = npy.readNpy(path.join(FIXTURES, 'test32_x.npy'));
    const y = npy.readNpy(path.join(FIXTURES, 'test32_y.npy'));
    assert.strictEqual(x.dtype, 'float32');
    assert.deepStrictEqual(x.shape, [32, 1, 28, 28]);
    assert.strictEqual(y.dtype, 'int64');
    assert.deepStrictEqual(y.shape, [32]);
    for (const v of y.data) {
        assert.ok(v >= 0n && v < 10n);
    }
    // (0/255 - 0.2860) / 0.3530 is the value of a black pixel after normalization.
    assert.ok(Math.abs(x.data[0] - (-0.2860 / 0.3530)) < 1e-6);
});

test('reads a version 2.0 header', () => {
    const header = "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }";
    const pad = ' '.repeat((64 - ((12 + header.length + 1) % 64)) % 64);
    const h = Buffer.from(header + pad + '\n', 'latin1');
    const pre = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 2, 0, 0, 0, 0, 0]);
    pre.writeUInt32LE(h.length, 8);
    const body = Buffer.from(Int32Array.from([7, -8, 9]).buffer);
    const file = path.join(TMP, 'v2.npy');
    fs.writeFileSync(file, Buffer.concat([pre, h, body]));
    const a = npy.readNpy(file);
    assert.deepStrictEqual(Array.from(a.data), [7, -8, 9]);
});

test('malformed files fail with a one-line message naming the file', () => {
    const good = npy.encodeNpy('float32', [4], new Float32Array(4));
    const bad = {
        'magic.npy': Buffer.from('hello world, not npy'),
        'trunc.npy': good.subarray(0, good.length - 3),
        'fortran.npy': Buffer.from(good.toString('latin1').replace('False', 'True '), 'latin1'),
        'bigend.npy': Buffer.from(good.toString('latin1').replace('<f4', '>f4'), 'latin1'),
        'object.npy': Buffer.from(good.toString('latin1').replace('<f4', '|O8'), 'latin1'),
    };
    for (const [name, bytes] of Object.entries(bad)) {
        const file = path.join(TMP, name);
        fs.writeFileSync(file, bytes);
        assert.throws(() => npy.readNpy(file), (e) => {
            return e.message.startsWith(file + ':') && !e.message.includes('\n');
        }, name);
    }
    assert.throws(() => npy.readNpy(path.join(TMP, 'missing.npy')), /cannot read/);
    assert.throws(() => npy.encodeNpy('float32', [3], new Float32Array(4)), /needs a/);
});

test('half to float conversion', () => {
    const f = npy.halfToFloat32(Uint16Array.from([0x3c00, 0xc000, 0x0001, 0x7c00, 0x7e00]));
    assert.strictEqual(f[0], 1);
    assert.strictEqual(f[1], -2);
    assert.strictEqual(f[2], Math.fround(Math.pow(2, -24)));
    assert.strictEqual(f[3], Infinity);
    assert.ok(Number.isNaN(f[4]));
});
