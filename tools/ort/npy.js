/*
 * npy.js: reader and writer for NumPy .npy files (format versions 1.0, 2.0 and 3.0),
 * little-endian C-order arrays only. No dependencies.
 *
 *   const npy = require('./npy');
 *   const a = npy.readNpy('x.npy');   // {dtype: 'float32', shape: [2, 3], data: Float32Array}
 *   npy.writeNpy('y.npy', 'int64', [4], BigInt64Array.from([1n, 2n, 3n, 4n]));
 *
 * dtype names follow onnxruntime's tensor types: float32 float64 float16 int8 uint8 int16 uint16
 * int32 uint32 int64 uint64 bool. float16 data is kept as raw Uint16Array bits.
 * Errors are thrown as Error objects with a one-line message naming the file.
 */
'use strict';

const fs = require('fs');

const MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // \x93NUMPY

// dtype name -> [npy descr, bytes per element, typed array constructor]
const DTYPES = {
    float32: ['<f4', 4, Float32Array],
    float64: ['<f8', 8, Float64Array],
    float16: ['<f2', 2, Uint16Array],
    int8: ['|i1', 1, Int8Array],
    uint8: ['|u1', 1, Uint8Array],
    int16: ['<i2', 2, Int16Array],
    uint16: ['<u2', 2, Uint16Array],
    int32: ['<i4', 4, Int32Array],
    uint32: ['<u4', 4, Uint32Array],
    int64: ['<i8', 8, BigInt64Array],
    uint64: ['<u8', 8, BigUint64Array],
    bool: ['|b1', 1, Uint8Array],
};

const DESCR_TO_DTYPE = {};
for (const [name, [descr]] of Object.entries(DTYPES)) {
    DESCR_TO_DTYPE[descr] = name;
    // '=' (native) and '<' are the same on the little-endian hosts we support; one-byte
    // types may be written with any byte-order mark.
    DESCR_TO_DTYPE['=' + descr.slice(1)] = name;
    if (descr[0] === '|') {
        DESCR_TO_DTYPE['<' + descr.slice(1)] = name;
        DESCR_TO_DTYPE['=' + descr.slice(1)] = name;
    }
}

function numel(shape) {
    let n = 1;
    for (const d of shape) {
        n *= d;
    }
    return n;
}

// Parse the Python-literal header dict, e.g.
// {'descr': '<f4', 'fortran_order': False, 'shape': (10000, 1, 28, 28), }
function parseHeader(text, path) {
    const descr = /'descr'\s*:\s*'([^']*)'/.exec(text);
    const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(text);
    const shape = /'shape'\s*:\s*\(([^)]*)\)/.exec(text);
    if (!descr || !fortran || !shape) {
        throw new Error(`${path}: malformed .npy header: ${JSON.stringify(text.trim())}`);
    }
    if (fortran[1] === 'True') {
        throw new Error(`${path}: Fortran-order arrays are not supported`);
    }
    const dtype = DESCR_TO_DTYPE[descr[1]];
    if (!dtype) {
        throw new Error(`${path}: unsupported dtype '${descr[1]}' (little-endian numeric only)`);
    }
    const dims = [];
    for (const part of shape[1].split(',')) {
        const s = part.trim();
        if (s === '') {
            continue;
        }
        if (!/^\d+$/.test(s)) {
            throw new Error(`${path}: bad dimension '${s}' in .npy shape`);
        }
        dims.push(Number(s));
    }
    return {dtype, shape: dims};
}

function readNpy(path) {
    let buf;
    try {
        buf = fs.readFileSync(path);
    } catch (e) {
        throw new Error(`${path}: cannot read: ${e.code || e.message}`);
    }
    if (buf.length < 10 || !buf.subarray(0, 6).equals(MAGIC)) {
        throw new Error(`${path}: not a .npy file (bad magic)`);
    }
    const major = buf[6];
    let hlen;
    let hstart;
    if (major === 1) {
        hlen = buf.readUInt16LE(8);
        hstart = 10;
    } else if (major === 2 || major === 3) {
        if (buf.length < 12) {
            throw new Error(`${path}: truncated .npy header`);
        }
        hlen = buf.readUInt32LE(8);
        hstart = 12;
    } else {
        throw new Error(`${path}: unsupported .npy version ${major}.${buf[7]}`);
    }
    if (hstart + hlen > buf.length) {
        throw new Error(`${path}: truncated .npy header`);
    }
    const text = buf.toString(major === 3 ? 'utf8' : 'latin1', hstart, hstart + hlen);
    const {dtype, shape} = parseHeader(text, path);
    const [, size, Ctor] = DTYPES[dtype];
    const n = numel(shape);
    const off = hstart + hlen;
    const need = n * size;
    if (buf.length - off !== need) {
        throw new Error(`${path}: payload is ${buf.length - off} bytes, ${dtype} ` +
                        `[${shape.join(',')}] needs ${need}`);
    }
    // Copy into a fresh, aligned buffer (the payload offset need not be element-aligned).
    const ab = new ArrayBuffer(need);
    buf.copy(Buffer.from(ab), 0, off, off + need);
    return {dtype, shape, data: new Ctor(ab)};
}

function shapeRepr(shape) {
    if (shape.length === 0) {
        return '()';
    }
    if (shape.length === 1) {
        return `(${shape[0]},)`;
    }
    return `(${shape.join(', ')})`;
}

// Serialize to a Buffer (version 1.0 header padded so the payload starts at a multiple of 64).
function encodeNpy(dtype, shape, data) {
    const info = DTYPES[dtype];
    if (!info) {
        throw new Error(`encodeNpy: unsupported dtype '${dtype}'`);
    }
    const [descr, size, Ctor] = info;
    for (const d of shape) {
        if (!Number.isInteger(d) || d < 0) {
            throw new Error(`encodeNpy: bad dimension ${d}`);
        }
    }
    const n = numel(shape);
    if (!(data instanceof Ctor) || data.length !== n) {
        throw new Error(`encodeNpy: ${dtype} [${shape.join(',')}] needs a ${Ctor.name} of ` +
                        `${n} elements`);
    }
    let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shapeRepr(shape)}, }`;
    const total = 10 + header.length + 1;
    header += ' '.repeat((64 - (total % 64)) % 64) + '\n';
    if (header.length > 65535) {
        throw new Error('encodeNpy: header too long');
    }
    const out = Buffer.alloc(10 + header.length + n * size);
    MAGIC.copy(out, 0);
    out[6] = 1;
    out[7] = 0;
    out.writeUInt16LE(header.length, 8);
    out.write(header, 10, 'latin1');
    Buffer.from(data.buffer, data.byteOffset, n * size).copy(out, 10 + header.length);
    return out;
}

function writeNpy(path, dtype, shape, data) {
    const bytes = encodeNpy(dtype, shape, data);
    try {
        fs.writeFileSync(path, bytes);
    } catch (e) {
        throw new Error(`${path}: cannot write: ${e.code || e.message}`);
    }
}

// IEEE half bits -> float32 array.
function halfToFloat32(bits) {
    const out = new Float32Array(bits.length);
    for (let i = 0; i < bits.length; i++) {
        const h = bits[i];
        const sign = h & 0x8000 ? -1 : 1;
        const exp = (h >> 10) & 0x1f;
        const frac = h & 0x3ff;
        if (exp === 0) {
            out[i] = sign * frac * Math.pow(2, -24);
        } else if (exp === 31) {
            out[i] = frac ? NaN : sign * Infinity;
        } else {
            out[i] = sign * (1 + frac / 1024) * Math.pow(2, exp - 15);
        }
    }
    return out;
}

module.exports = {DTYPES, readNpy, writeNpy, encodeNpy, numel, halfToFloat32};
