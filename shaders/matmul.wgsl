// out (rows, n) = x (rows, k) . w^T + bias, w stored (n, k) row-major.
// Defines: W_F32 (w is f32), W_F16 (two f16 per u32), W_BF16 (two bf16 per u32); the 16-bit
// rows hold ceil(k/2) words. Tiles of 64x64 outputs, 16x16 threads with 4x4 outputs each.

struct Params {
    rows: u32,
    n: u32,
    k: u32,
    row_words: u32,
    has_bias: u32,
    tiles_n: u32,
    groups: u32,
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
    return w[j * p.k + kk];
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
    let r0 = (g / p.tiles_n) * TILE;
    let j0 = (g % p.tiles_n) * TILE;
    let t = lid.y * 16u + lid.x;
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += KT) {
        // 256 threads load 64x16 of x and of w: 4 values each.
        for (var i = 0u; i < 4u; i++) {
            let e = t + i * 256u;
            let row = e / KT;
            let kk = e % KT;
            let gk = k0 + kk;
            let gr = r0 + row;
            let gj = j0 + row;
            var xv = 0.0;
            if (gr < p.rows && gk < p.k) {
                xv = x[gr * p.k + gk];
            }
            var wv = 0.0;
            if (gj < p.n && gk < p.k) {
                wv = wload(gj, gk);
            }
            xs[kk][row] = xv;
            ws[kk][row] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[kk][lid.y + i * 16u];
                b[i] = ws[kk][lid.x + i * 16u];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var jj = 0u; jj < 4u; jj++) {
                    acc[i][jj] = fma(a[i], b[jj], acc[i][jj]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = r0 + lid.y + i * 16u;
        for (var jj = 0u; jj < 4u; jj++) {
            let j = j0 + lid.x + jj * 16u;
            if (r < p.rows && j < p.n) {
                var v = acc[i][jj];
                if (p.has_bias != 0u) {
                    v += bias[j];
                }
                out[r * p.n + j] = v;
            }
        }
    }
}

// Few rows (decode): one workgroup per 8 output columns, 32 threads per column striding over k
// (a weight row is read once, coalesced), R rows (a define, at most 8) accumulated together.
const COLS: u32 = 8u;
const LANES: u32 = 32u;

var<workgroup> red: array<array<f32, 256>, R>;

@compute @workgroup_size(256, 1, 1)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let g = wid.x + wid.y * nwg.x;
    if (g >= p.groups) {
        return;
    }
    let t = lid.x;
    let lane = t % LANES;
    let j = g * COLS + t / LANES;
    var acc: array<f32, R>;
    if (j < p.n) {
#if W_F32
        for (var kk = lane; kk < p.k; kk += LANES) {
            let wv = w[j * p.k + kk];
            for (var r = 0u; r < R; r++) {
                acc[r] = fma(wv, x[r * p.k + kk], acc[r]);
            }
        }
#else
        for (var i = lane; i < p.row_words; i += LANES) {
#if F16_NATIVE
            let v = vec2<f32>(w[j * p.row_words + i]);
#else
            let word = w[j * p.row_words + i];
#if W_F16
            let v = unpack2x16float(word);
#else
            let v = vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
#endif
#endif
            let k0 = 2u * i;
            for (var r = 0u; r < R; r++) {
                // Rows of odd k are padded with a zero weight; x must not be read past its end.
                let x1 = select(0.0, x[r * p.k + k0 + 1u], k0 + 1u < p.k);
                acc[r] = fma(v.x, x[r * p.k + k0], fma(v.y, x1, acc[r]));
            }
        }
#endif
    }
    for (var r = 0u; r < R; r++) {
        red[r][t] = acc[r];
    }
    workgroupBarrier();
    for (var off = LANES / 2u; off > 0u; off /= 2u) {
        if (lane < off) {
            for (var r = 0u; r < R; r++) {
                red[r][t] += red[r][t + off];
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u && j < p.n) {
        for (var r = 0u; r < p.rows; r++) {
            var v = red[r][t];
            if (p.has_bias != 0u) {
                v += bias[j];
            }
            out[r * p.n + j] = v;
        }
    }
}
