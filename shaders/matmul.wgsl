// out (rows, n) = x (rows, k) . w^T + bias, w stored (n, k) row-major, each row padded to
// `row_words` words. Defines: W_F32 (w is f32), W_F16 (two f16 per u32, or read as f16 pairs with
// F16_NATIVE), W_BF16 (two bf16 per u32). Tiles of 64x64 outputs, 16x16 threads of 4x4.

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
    let r0 = (g / p.tiles_n) * TILE;
    let j0 = (g % p.tiles_n) * TILE;
    let t = lid.y * 16u + lid.x;
    // One vec4 of 4 columns per output row: registers, no private arrays (drivers spill those).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
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
            let a = vec4<f32>(xs[kk][lid.y], xs[kk][lid.y + 16u], xs[kk][lid.y + 32u], xs[kk][lid.y + 48u]);
            let b = vec4<f32>(ws[kk][lid.x], ws[kk][lid.x + 16u], ws[kk][lid.x + 32u], ws[kk][lid.x + 48u]);
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }
        workgroupBarrier();
    }
    store_row(r0 + lid.y, j0 + lid.x, acc0);
    store_row(r0 + lid.y + 16u, j0 + lid.x, acc1);
    store_row(r0 + lid.y + 32u, j0 + lid.x, acc2);
    store_row(r0 + lid.y + 48u, j0 + lid.x, acc3);
}

// Columns j, j+16, j+32, j+48 of row r.
fn store_row(r: u32, j: u32, v: vec4<f32>) {
    if (r >= p.rows) {
        return;
    }
    for (var f = 0u; f < 4u; f++) {
        let c = j + f * 16u;
        if (c < p.n) {
            var o = v[f];
            if (p.has_bias != 0u) {
                o += bias[c];
            }
            out[r * p.n + c] = o;
        }
    }
}
