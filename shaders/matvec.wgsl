// out (rows, n) = x (rows, k) . w^T + bias for few rows (decode), w stored (n, k) with each row
// padded to a whole number of 16-byte vectors (`row_vecs` of them). Defines: W_F32, W_F16 or W_BF16;
// R (1..8), the rows. One workgroup per 8 output columns, 32 threads per column each reading
// 16 bytes of the weight row per step (coalesced), so the weights are read once at full width.

struct Params {
    rows: u32,
    n: u32,
    k: u32,
    row_vecs: u32,
    has_bias: u32,
    groups: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
#if W_F32
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
#else
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
#endif
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const COLS: u32 = 8u;
const LANES: u32 = 32u;

var<workgroup> red: array<array<vec4<f32>, 256>, 2>;

// x[r, k0..k0+4] . wv; columns past k meet zero weights, so they read a clamped column.
fn dot4(r: u32, k0: u32, wv: vec4<f32>) -> f32 {
    if (r >= p.rows) {
        return 0.0;
    }
    let last = p.k - 1u;
    let b = r * p.k;
    let xv = vec4<f32>(x[b + min(k0, last)], x[b + min(k0 + 1u, last)],
                       x[b + min(k0 + 2u, last)], x[b + min(k0 + 3u, last)]);
    return dot(xv, wv);
}

fn widen(word: u32) -> vec2<f32> {
#if W_F16
    return unpack2x16float(word);
#else
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
#endif
}

// Adds the products of rows 0..7 with 4 weights at k0 to (lo, hi).
fn accumulate(k0: u32, wv: vec4<f32>, lo: ptr<function, vec4<f32>>, hi: ptr<function, vec4<f32>>) {
    (*lo).x += dot4(0u, k0, wv);
    if (R > 1u) { (*lo).y += dot4(1u, k0, wv); }
    if (R > 2u) { (*lo).z += dot4(2u, k0, wv); }
    if (R > 3u) { (*lo).w += dot4(3u, k0, wv); }
    if (R > 4u) {
        (*hi).x += dot4(4u, k0, wv);
        (*hi).y += dot4(5u, k0, wv);
        (*hi).z += dot4(6u, k0, wv);
        (*hi).w += dot4(7u, k0, wv);
    }
}

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
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    if (j < p.n) {
        for (var i = lane; i < p.row_vecs; i += LANES) {
            let q = w[j * p.row_vecs + i];
#if W_F32
            accumulate(4u * i, q, &lo, &hi);
#else
            let a = widen(q.x);
            let b = widen(q.y);
            let c = widen(q.z);
            let d = widen(q.w);
            accumulate(8u * i, vec4<f32>(a, b), &lo, &hi);
            accumulate(8u * i + 4u, vec4<f32>(c, d), &lo, &hi);
#endif
        }
    }
    red[0][t] = lo;
    red[1][t] = hi;
    workgroupBarrier();
    for (var off = LANES / 2u; off > 0u; off /= 2u) {
        if (lane < off) {
            red[0][t] += red[0][t + off];
            red[1][t] += red[1][t + off];
        }
        workgroupBarrier();
    }
    if (lane == 0u && j < p.n) {
        var b = 0.0;
        if (p.has_bias != 0u) {
            b = bias[j];
        }
        let l = red[0][t];
        let h = red[1][t];
        let rows = array<f32, 8>(l.x, l.y, l.z, l.w, h.x, h.y, h.z, h.w);
        for (var r = 0u; r < p.rows; r++) {
            out[r * p.n + j] = rows[r] + b;
        }
    }
}
