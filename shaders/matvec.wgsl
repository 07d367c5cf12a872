// out (rows, n) = x (rows, k) . w^T + bias for few rows (decode): R rows (a define, at most 4),
// k a multiple of 4, w stored (n, k) with each row padded to a whole number of 16-byte vectors
// (`row_vecs` of them). Defines: W_F32, W_F16 or W_BF16; SUBGROUPS; SPLIT; CONV (with the conv
// width DC) or GATED (with FACTORS, the most (row, group) norm factors). A workgroup is 8 warps of 32
// lanes; each warp owns one output column (SPLIT warps share one, each over a slice of k, where
// columns are too few to keep the memory busy) and its lanes stream the weight row 16 bytes at a
// time (coalesced, read once), two loads in flight per lane (four measured no faster). One column
// per warp measured fastest on the H200 (more warps in flight beat x vectors shared by several
// columns), up to 4 rows.
//
// Two variants make the decode pass three dispatches:
// CONV (in_proj, no bias): each xBC column (off .. off + cd) is one conv channel, owned by one
// lane, which runs the causal depthwise conv + bias + SiLU over each request's tokens, updates the
// channel's conv state (or records it after every token) and stores the conv's output in place.
// GATED (out_proj): x holds the gated, weighted values u of the decode update (state_update.wgsl,
// FUSED), which also left a sum of squares per (row, head, block of state rows); each group's
// partial dot product is scaled by its RMSNorm factor 1 / sqrt(mean + eps), summed here from those
// partials.

struct Params {
    rows: u32,
    n: u32,
    k: u32,
    row_vecs: u32,
    has_bias: u32,
    groups: u32,
    // CONV
    off: u32,
    cd: u32,
    _dc: u32,
    reqs: u32,
    stride: u32,
    has_cbias: u32,
    // GATED: groups of the norm, partials per group, values per group, eps.
    ng: u32,
    parts: u32,
    gs: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
#if W_F32
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
#else
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
#endif
#if CONV
@group(0) @binding(3) var<storage, read> conv_w: array<f32>;
#else
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
#if CONV
@group(0) @binding(5) var<storage, read> conv_b: array<f32>;
// cu (reqs + 1) | slots (reqs) | record (reqs)
@group(0) @binding(6) var<storage, read> info: array<i32>;
@group(0) @binding(7) var<storage, read_write> pool: array<f32>;
@group(0) @binding(8) var<storage, read_write> saved: array<f32>;
#endif
#if GATED
// (rows, heads, blocks) sums of squares, a group's partials contiguous.
@group(0) @binding(5) var<storage, read> part: array<f32>;
#endif

const LANES: u32 = 32u;
const WARPS: u32 = 8u;
const WG: u32 = 256u;
#if W_F32
// x vectors per weight vector.
const XPW: u32 = 1u;
#else
const XPW: u32 = 2u;
#endif

var<workgroup> red: array<vec4<f32>, WG>;
// Each warp's share of its column, when SPLIT warps share one.
var<workgroup> shares: array<vec4<f32>, WARPS>;
#if GATED
// Per (row, group): the RMSNorm factor.
var<workgroup> scale: array<f32, FACTORS>;
#endif

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

// The x values under one weight vector, per row: a (first 4), b (next 4 with 16-bit weights).
// Plain variables rather than arrays, so that nothing lands in local memory.
struct Span {
    a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>,
    b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>,
}

fn span(i: u32) -> Span {
    var s: Span;
    let v = i * XPW;
    s.a0 = xv(0u, v);
    if (R > 1u) { s.a1 = xv(1u, v); }
    if (R > 2u) { s.a2 = xv(2u, v); }
    if (R > 3u) { s.a3 = xv(3u, v); }
    if (XPW > 1u) {
        s.b0 = xv(0u, v + 1u);
        if (R > 1u) { s.b1 = xv(1u, v + 1u); }
        if (R > 2u) { s.b2 = xv(2u, v + 1u); }
        if (R > 3u) { s.b3 = xv(3u, v + 1u); }
    }
    return s;
}

#if W_F32
alias WVec = vec4<f32>;
#else
alias WVec = vec4<u32>;
#endif

// Weight vector i of column j (zero past the last column).
fn wload(j: u32, i: u32) -> WVec {
    if (j >= p.n) {
        return WVec();
    }
    return w[j * p.row_vecs + i];
}

// Piece `piece` of SPLIT of the weight vectors start..end of column j.
fn k_part(start: u32, end: u32, piece: u32, lane: u32, j: u32) -> vec4<f32> {
    let len = end - start;
    return stream(start + len * piece / SPLIT, start + len * (piece + 1u) / SPLIT, lane, j);
}

// The weight vectors that hold k.
fn vecs_of_k() -> u32 {
    return (p.k + 4u * XPW - 1u) / (4u * XPW);
}

// One weight vector against the rows of `s`: one value per row.
fn dots(q: WVec, s: Span) -> vec4<f32> {
#if W_F32
    return vec4<f32>(dot(q, s.a0), dot(q, s.a1), dot(q, s.a2), dot(q, s.a3));
#else
    let qa = vec4<f32>(widen(q.x), widen(q.y));
    let qb = vec4<f32>(widen(q.z), widen(q.w));
    return vec4<f32>(dot(qa, s.a0) + dot(qb, s.b0), dot(qa, s.a1) + dot(qb, s.b1),
                     dot(qa, s.a2) + dot(qb, s.b2), dot(qa, s.a3) + dot(qb, s.b3));
#endif
}

// This lane's share of weight vectors start..end of column j: two spans a step, both weight
// vectors loaded before either is used, so each lane keeps two loads in flight.
fn stream(start: u32, end: u32, lane: u32, j: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var i = start + lane; i < end; i += 2u * LANES) {
        let i2 = min(i + LANES, end - 1u);
        let q = wload(j, i);
        let q2 = wload(j, i2);
        let keep = select(0.0, 1.0, i + LANES < end);
        acc += dots(q, span(i)) + keep * dots(q2, span(i2));
    }
    return acc;
}

// The sum over the 32 lanes of a warp, in every lane: subgroup shuffles where subgroups are at
// least 32 wide, a tree in workgroup memory otherwise (called by every invocation alike).
fn lane_sum(v: vec4<f32>, t: u32, width: u32) -> vec4<f32> {
#if SUBGROUPS
    if (width >= LANES) {
        var s = v;
        s += subgroupShuffleXor(s, 16u);
        s += subgroupShuffleXor(s, 8u);
        s += subgroupShuffleXor(s, 4u);
        s += subgroupShuffleXor(s, 2u);
        s += subgroupShuffleXor(s, 1u);
        return s;
    }
#endif
    let lane = t % LANES;
    red[t] = v;
    workgroupBarrier();
    for (var off = LANES / 2u; off > 0u; off /= 2u) {
        if (lane < off) {
            red[t] += red[t + off];
        }
        workgroupBarrier();
    }
    let total = red[t - lane];
    workgroupBarrier();
    return total;
}

#if CONV
// What a conv channel's lane loads before streaming its weights, so that these loads do not
// wait behind the stream: the bias, the kernel, and the first request's window (DC, the conv
// width, is a define: constant loops keep the window in registers).
struct ConvStart {
    bias: f32,
    w: array<f32, DC>,
    win: array<f32, DC>,
}

fn window(c: u32, slot: i32) -> array<f32, DC> {
    var win: array<f32, DC>;
    let at = (u32(max(slot, 0)) * p.cd + c) * DC;
    for (var t = 0u; t < DC; t++) {
        win[t] = 0.0;
        if (slot >= 0) {
            win[t] = pool[at + t];
        }
    }
    return win;
}

fn conv_start(j: u32) -> ConvStart {
    var s: ConvStart;
    let c = j - p.off;
    s.bias = 0.0;
    if (p.has_cbias != 0u) {
        s.bias = conv_b[c];
    }
    for (var t = 0u; t < DC; t++) {
        s.w[t] = conv_w[c * DC + t];
    }
    s.win = window(c, info[p.reqs + 1u]);
    return s;
}

// Channel c's conv over each request's tokens, whose in_proj values are v (one per row).
fn conv_channel(j: u32, v: vec4<f32>, s: ConvStart) {
    let c = j - p.off;
    for (var i = 0u; i < p.reqs; i++) {
        let slot = info[p.reqs + 1u + i];
        let rec = info[2u * p.reqs + 1u + i];
        // The window of the last DC inputs, oldest first.
        var win = s.win;
        if (i > 0u) {
            win = window(c, slot);
        }
        let r0 = u32(info[i]);
        let r1 = u32(info[i + 1u]);
        for (var r = r0; r < r1; r++) {
            var acc = s.bias;
            for (var t = 0u; t + 1u < DC; t++) {
                win[t] = win[t + 1u];
                acc = fma(win[t], s.w[t], acc);
            }
            win[DC - 1u] = v[r];
            acc = fma(v[r], s.w[DC - 1u], acc);
            out[r * p.n + j] = acc / (1.0 + exp(-acc));
            if (rec >= 0) {
                let o = ((u32(rec) * p.stride + (r - r0)) * p.cd + c) * DC;
                for (var t = 0u; t < DC; t++) {
                    saved[o + t] = win[t];
                }
            }
        }
        if (rec < 0 && slot >= 0) {
            let at = (u32(slot) * p.cd + c) * DC;
            for (var t = 0u; t < DC; t++) {
                pool[at + t] = win[t];
            }
        }
    }
}
#endif

@compute @workgroup_size(256, 1, 1)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
#if SUBGROUPS
          @builtin(subgroup_size) width: u32,
#endif
          @builtin(local_invocation_id) lid: vec3<u32>) {
#if SUBGROUPS
#else
    let width = 1u;
#endif
    let g = wid.x + wid.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay uniform.
    if (g >= p.groups) {
        return;
    }
    let t = lid.x;
    let lane = t % LANES;
    // SPLIT warps share a column, each over its own slice of k.
    let j = g * (WARPS / SPLIT) + t / LANES / SPLIT;
    let piece = t / LANES % SPLIT;
#if GATED
    // One group: the weights stream before the norm factors are summed, so that their loads do
    // not wait behind that chain.
    var acc = vec4<f32>(0.0);
    let one = p.ng == 1u;
    if (one) {
        acc = k_part(0u, vecs_of_k(), piece, lane, j);
    }
    // Each (row, group)'s factor from its partial sums of squares (all 1 without a norm).
    for (var q = 0u; q < p.rows * p.ng; q++) {
        var s = 0.0;
        for (var i = t; i < p.parts; i += WG) {
            s += part[q * p.parts + i];
        }
        let total = lane_sum(vec4<f32>(s, 0.0, 0.0, 0.0), t, width).x;
        if (lane == 0u) {
            red[t].x = total;
        }
        workgroupBarrier();
        if (t == 0u) {
            var all = 0.0;
            for (var u = 0u; u < WARPS; u++) {
                all += red[u * LANES].x;
            }
            scale[q] = 1.0;
            if (p.parts > 0u) {
                scale[q] = inverseSqrt(all / f32(p.gs) + p.eps);
            }
        }
        workgroupBarrier();
    }
    // Weight vectors per group: the group of each span is uniform. (Rows may be padded past
    // the last vector of k, for the tensor-core kernel.)
    let gv = vecs_of_k() / p.ng;
    for (var grp = 0u; grp < p.ng; grp++) {
        var f = vec4<f32>(0.0);
        for (var r = 0u; r < R; r++) {
            if (r < p.rows) {
                f[r] = scale[r * p.ng + grp];
            }
        }
        if (one) {
            acc *= f;
        } else {
            acc = fma(k_part(grp * gv, (grp + 1u) * gv, piece, lane, j), f, acc);
        }
    }
#else
#if CONV
    let conv = lane == 0u && piece == 0u && j >= p.off && j < p.off + p.cd;
    var start: ConvStart;
    if (conv) {
        start = conv_start(j);
    }
#endif
    let acc = k_part(0u, vecs_of_k(), piece, lane, j);
#endif
    var sum = lane_sum(acc, t, width);
    if (SPLIT > 1u) {
        if (lane == 0u) {
            shares[t / LANES] = sum;
        }
        workgroupBarrier();
        if (piece == 0u) {
            for (var i = 1u; i < SPLIT; i++) {
                sum += shares[t / LANES + i];
            }
        }
    }
    if (lane != 0u || piece != 0u || j >= p.n) {
        return;
    }
#if CONV
    if (conv) {
        conv_channel(j, sum, start);
        return;
    }
    let b = 0.0;
#else
    var b = 0.0;
    if (p.has_bias != 0u) {
        b = bias[j];
    }
#endif
    for (var r = 0u; r < p.rows; r++) {
        out[r * p.n + j] = sum[r] + b;
    }
}
