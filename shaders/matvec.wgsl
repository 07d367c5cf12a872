// out (rows, n) = x (rows, k) . w^T + bias for few rows (decode): R rows (a define, at most 4),
// k a multiple of 4 (x read as vec4), w stored (n, k) with each row padded to a whole number of
// 16-byte vectors (`row_vecs` of them). Defines: W_F32, W_F16 or W_BF16. One workgroup per 32
// output columns: 8 groups of 32 lanes, each lane 4 columns, so every x vector loaded serves four
// weight vectors; the weights are read once, 16 bytes per lane, coalesced.

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
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
#if W_F32
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
#else
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
#endif
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const LANES: u32 = 32u;
const CPT: u32 = 4u;
const COLS: u32 = 32u;

var<workgroup> red: array<vec4<f32>, 256>;

fn widen(word: u32) -> vec2<f32> {
#if W_F16
    return unpack2x16float(word);
#else
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
#endif
}

// Vector v (of 4 x values) of row r; rows past the last read as zero. Past the row's end the
// weights are zero, so whatever lies there contributes nothing.
fn xv(r: u32, v: u32) -> vec4<f32> {
    if (r >= p.rows) {
        return vec4<f32>(0.0);
    }
    return x[min(r * (p.k / 4u) + v, arrayLength(&x) - 1u)];
}

// Column j against rows 0..3 at weight vector i, given the x vectors of that span.
fn col(j: u32, i: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>,
       y0: vec4<f32>, y1: vec4<f32>, y2: vec4<f32>, y3: vec4<f32>) -> vec4<f32> {
    if (j >= p.n) {
        return vec4<f32>(0.0);
    }
    let q = w[j * p.row_vecs + i];
#if W_F32
    return vec4<f32>(dot(q, x0), dot(q, x1), dot(q, x2), dot(q, x3));
#else
    let a = vec4<f32>(widen(q.x), widen(q.y));
    let b = vec4<f32>(widen(q.z), widen(q.w));
    return vec4<f32>(dot(a, x0) + dot(b, y0), dot(a, x1) + dot(b, y1),
                     dot(a, x2) + dot(b, y2), dot(a, x3) + dot(b, y3));
#endif
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
    let j0 = g * COLS + (t / LANES) * CPT;
    // One vec4 over the rows per column.
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
#if W_F32
    let per = 1u;
#else
    let per = 2u;
#endif
    for (var i = lane; i < p.row_vecs; i += LANES) {
        let v = i * per;
        let x0 = xv(0u, v);
        var x1 = vec4<f32>(0.0);
        var x2 = vec4<f32>(0.0);
        var x3 = vec4<f32>(0.0);
        if (R > 1u) { x1 = xv(1u, v); }
        if (R > 2u) { x2 = xv(2u, v); }
        if (R > 3u) { x3 = xv(3u, v); }
        var y0 = vec4<f32>(0.0);
        var y1 = vec4<f32>(0.0);
        var y2 = vec4<f32>(0.0);
        var y3 = vec4<f32>(0.0);
#if W_F32
#else
        y0 = xv(0u, v + 1u);
        if (R > 1u) { y1 = xv(1u, v + 1u); }
        if (R > 2u) { y2 = xv(2u, v + 1u); }
        if (R > 3u) { y3 = xv(3u, v + 1u); }
#endif
        a0 += col(j0, i, x0, x1, x2, x3, y0, y1, y2, y3);
        a1 += col(j0 + 1u, i, x0, x1, x2, x3, y0, y1, y2, y3);
        a2 += col(j0 + 2u, i, x0, x1, x2, x3, y0, y1, y2, y3);
        a3 += col(j0 + 3u, i, x0, x1, x2, x3, y0, y1, y2, y3);
    }
    let accs = array<vec4<f32>, 4>(a0, a1, a2, a3);
    for (var c = 0u; c < CPT; c++) {
        red[t] = accs[c];
        workgroupBarrier();
        for (var off = LANES / 2u; off > 0u; off /= 2u) {
            if (lane < off) {
                red[t] += red[t + off];
            }
            workgroupBarrier();
        }
        let j = j0 + c;
        if (lane == 0u && j < p.n) {
            var b = 0.0;
            if (p.has_bias != 0u) {
                b = bias[j];
            }
            let sum = red[t];
            for (var r = 0u; r < p.rows; r++) {
                out[r * p.n + j] = sum[r] + b;
            }
        }
        workgroupBarrier();
    }
}
