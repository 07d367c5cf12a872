// out (rows, n) = x (rows, k) . w^T + bias, w stored (n, k) row-major, each row padded to
// `row_words` words. Defines: W_F32 (w is f32), W_F16 (two f16 per u32, or read as f16 pairs with
// F16_NATIVE), W_BF16 (two bf16 per u32). matmul: tiles of 64x64 outputs, 16x16 threads of 4x4.

struct Params {
    rows: u32,
    n: u32,
    k: u32,
    row_words: u32,
    has_bias: u32,
    tiles_n: u32,
    groups: u32,
    // matmul: the k range of each workgroup (split-K; k itself when not split). With more than
    // one split each writes its partial product to its own (rows, n) block of `out` (a scratch
    // buffer) and matmul_sum adds them.
    k_per: u32,
    splits: u32,
    // matmul_sum: the partials' row length and split length (values).
    part_row: u32,
    part_len: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
#if W_F32
@group(0) @binding(2) var<storage, read> w: array<f32>;
#else
#if F16_NATIVE
// SHADER_F16: the f16 pairs are read as what they are.
@group(0) @binding(2) var<storage, read> w: array<vec2<f16>>;
#else
@group(0) @binding(2) var<storage, read> w: array<u32>;
#endif
#endif
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;


fn wload(j: u32, kk: u32) -> f32 {
#if W_F32
    return w[j * p.row_words + kk];
#else
#if F16_NATIVE
    let v = vec2<f32>(w[j * p.row_words + kk / 2u]);
    return select(v.x, v.y, (kk & 1u) == 1u);
#else
    let word = w[j * p.row_words + kk / 2u];
#if W_F16
    let v = unpack2x16float(word);
    return select(v.x, v.y, (kk & 1u) == 1u);
#else
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (kk & 1u) == 1u));
#endif
#endif
#endif
}

const TILE: u32 = 64u;
const KT: u32 = 16u;

var<workgroup> xs: array<array<f32, 65>, 16>;
var<workgroup> ws: array<array<f32, 65>, 16>;

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let g = wid.x + wid.y * nwg.x;
    if (g >= p.groups) {
        return;
    }
    let tiles = p.groups / p.splits;
    let split = g / tiles;
    let r0 = (g % tiles / p.tiles_n) * TILE;
    let j0 = (g % p.tiles_n) * TILE;
    let k_start = split * p.k_per;
    let k_end = min(p.k, k_start + p.k_per);
    let t = lid.y * 16u + lid.x;
    // One vec4 of 4 columns per output row: registers, no private arrays (drivers spill those).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = k_start; k0 < k_end; k0 += KT) {
        // 256 threads load 64x16 of x and of w: 4 values each.
        for (var i = 0u; i < 4u; i++) {
            let e = t + i * 256u;
            let row = e / KT;
            let kk = e % KT;
            let gk = k0 + kk;
            let gr = r0 + row;
            let gj = j0 + row;
            var xv = 0.0;
            if (gr < p.rows && gk < k_end) {
                xv = x[gr * p.k + gk];
            }
            var wv = 0.0;
            if (gj < p.n && gk < k_end) {
                wv = wload(gj, gk);
            }
            xs[kk][row] = xv;
            ws[kk][row] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            let a = vec4<f32>(xs[kk][lid.y], xs[kk][lid.y + 16u], xs[kk][lid.y + 32u], xs[kk][lid.y + 48u]);
            let b = vec4<f32>(ws[kk][lid.x], ws[kk][lid.x + 16u], ws[kk][lid.x + 32u], ws[kk][lid.x + 48u]);
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }
        workgroupBarrier();
    }
    let at = split * p.rows * p.n;
    store_row(at, r0 + lid.y, j0 + lid.x, acc0);
    store_row(at, r0 + lid.y + 16u, j0 + lid.x, acc1);
    store_row(at, r0 + lid.y + 32u, j0 + lid.x, acc2);
    store_row(at, r0 + lid.y + 48u, j0 + lid.x, acc3);
}

// Columns j, j+16, j+32, j+48 of row r, into the block at `at` (the bias only when not split).
fn store_row(at: u32, r: u32, j: u32, v: vec4<f32>) {
    if (r >= p.rows) {
        return;
    }
    for (var f = 0u; f < 4u; f++) {
        let c = j + f * 16u;
        if (c < p.n) {
            var o = v[f];
            if (p.has_bias != 0u && p.splits == 1u) {
                o += bias[c];
            }
            out[at + r * p.n + c] = o;
        }
    }
}

// Split-K partials summed, plus the bias: `x` holds `splits` blocks of part_len values, rows of
// part_row (matmul's: (rows, n); SCALED: mma.wgsl's, padded, then x's row scales, which divide).
@compute @workgroup_size(256, 1, 1)
fn matmul_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid.x;
    if (i >= p.rows * p.n) {
        return;
    }
    let r = i / p.n;
    let j = i % p.n;
    var o = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        o += x[s * p.part_len + r * p.part_row + j];
    }
#if SCALED
    o /= x[p.splits * p.part_len + r];
#endif
    if (p.has_bias != 0u) {
        o += bias[j];
    }
    out[i] = o;
}

// matmul_wide: the same product in tiles of 128x128 outputs for many rows (prefill): 256
// threads of 8x8 outputs each (rows ty*4.. and 64 + ty*4.., columns tx*4.. and 64 + tx*4..), k in
// steps of 8 through workgroup memory as vec4 rows, so each step is 4 vector reads and 64 FMAs.

const WIDE: u32 = 128u;
const WK: u32 = 8u;
// Vec4s per k row of a tile; the weight tile's rows are padded by one against bank conflicts.
const XROW: u32 = 32u;
const WROW: u32 = 33u;

var<workgroup> xt: array<vec4<f32>, 256>;
var<workgroup> wt: array<vec4<f32>, 264>;

// Weights k and k + 1 (k even) of column j; rows are padded with zeros to whole 16-byte vectors,
// so k + 1 is in the row.
fn wpair(j: u32, k: u32) -> vec2<f32> {
#if W_F32
    return vec2<f32>(w[j * p.row_words + k], w[j * p.row_words + k + 1u]);
#else
#if F16_NATIVE
    return vec2<f32>(w[j * p.row_words + k / 2u]);
#else
    let word = w[j * p.row_words + k / 2u];
#if W_F16
    return unpack2x16float(word);
#else
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
#endif
#endif
#endif
}

// Eight outputs of one row: columns tx*4.. (lo) and 64 + tx*4.. (hi).
struct Row8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn mac(c: Row8, a: f32, b0: vec4<f32>, b1: vec4<f32>) -> Row8 {
    return Row8(fma(vec4<f32>(a), b0, c.lo), fma(vec4<f32>(a), b1, c.hi));
}

fn store8(r: u32, j: u32, c: Row8) {
    if (r >= p.rows) {
        return;
    }
    for (var f = 0u; f < 8u; f++) {
        let col = j + (f % 4u) + (f / 4u) * 64u;
        if (col < p.n) {
            var o = select(c.lo[f % 4u], c.hi[f % 4u], f >= 4u);
            if (p.has_bias != 0u) {
                o += bias[col];
            }
            out[r * p.n + col] = o;
        }
    }
}

@compute @workgroup_size(256, 1, 1)
fn matmul_wide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let g = wid.x + wid.y * nwg.x;
    if (g >= p.groups) {
        return;
    }
    let r0 = (g / p.tiles_n) * WIDE;
    let j0 = (g % p.tiles_n) * WIDE;
    let t = lid.x;
    let tx = t % 16u;
    let ty = t / 16u;
    var c0: Row8;
    var c1: Row8;
    var c2: Row8;
    var c3: Row8;
    var c4: Row8;
    var c5: Row8;
    var c6: Row8;
    var c7: Row8;
    // Loads: x as 4 consecutive k of one row per thread, w as 2 pairs of one column.
    let xr = t / 2u;
    let xk = (t % 2u) * 4u;
    for (var k0 = 0u; k0 < p.k; k0 += WK) {
        let gr = r0 + xr;
        for (var u = 0u; u < 4u; u++) {
            let gk = k0 + xk + u;
            var v = 0.0;
            if (gr < p.rows && gk < p.k) {
                v = x[gr * p.k + gk];
            }
            xt[(xk + u) * XROW + xr / 4u][xr % 4u] = v;
        }
        for (var i = 0u; i < 2u; i++) {
            let e = t + i * 256u;
            let col = e / 4u;
            let kk = (e % 4u) * 2u;
            let gj = j0 + col;
            let gk = k0 + kk;
            var v = vec2<f32>(0.0);
            if (gj < p.n && gk < p.k) {
                v = wpair(gj, gk);
            }
            wt[kk * WROW + col / 4u][col % 4u] = v.x;
            wt[(kk + 1u) * WROW + col / 4u][col % 4u] = v.y;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < WK; kk++) {
            let a0 = xt[kk * XROW + ty];
            let a1 = xt[kk * XROW + 16u + ty];
            let b0 = wt[kk * WROW + tx];
            let b1 = wt[kk * WROW + 16u + tx];
            c0 = mac(c0, a0.x, b0, b1);
            c1 = mac(c1, a0.y, b0, b1);
            c2 = mac(c2, a0.z, b0, b1);
            c3 = mac(c3, a0.w, b0, b1);
            c4 = mac(c4, a1.x, b0, b1);
            c5 = mac(c5, a1.y, b0, b1);
            c6 = mac(c6, a1.z, b0, b1);
            c7 = mac(c7, a1.w, b0, b1);
        }
        workgroupBarrier();
    }
    let j = j0 + tx * 4u;
    store8(r0 + ty * 4u, j, c0);
    store8(r0 + ty * 4u + 1u, j, c1);
    store8(r0 + ty * 4u + 2u, j, c2);
    store8(r0 + ty * 4u + 3u, j, c3);
    store8(r0 + 64u + ty * 4u, j, c4);
    store8(r0 + 64u + ty * 4u + 1u, j, c5);
    store8(r0 + 64u + ty * 4u + 2u, j, c6);
    store8(r0 + 64u + ty * 4u + 3u, j, c7);
}
