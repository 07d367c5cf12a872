// The decode recurrence: each request's tokens in order on its slot's ssm state. One workgroup per
// (request, head, WARPS x RPW rows p of the state); 32 lanes per row, each holding columns lane + 32 i
// (d_state <= 256) in two vec4 registers, or (V4: d_state a multiple of 4, so that rows start on
// whole vectors) columns 4 lane .. 4 lane + 3 and 128 + those, read and written as vectors (2.7b
// on the H200: batch 64 136 to 133 us, batch 16 of 1+3 tokens 90 to 85), with no check of the
// column where the lanes cover whole rows (WHOLE: d_state 128 or 256; the driver had put each
// checked load of the read-write state in a branch region of its own: batch 64 99.5 to 94.6 us,
// the load and store of the state alone take 88.5); RPW rows per warp (big
// batches: more loads in flight, fewer workgroups, B and C loaded once for several rows). With
// record[i] >= 0 the state after each token goes to the intermediates and the slot is kept.
//
// FUSED (the decode pass of matvec.wgsl's CONV and GATED variants): x, B and C come from the conv
// output left in place in zxbcdt, and instead of y the kernel stores the gated, weighted u that
// out_proj reads, with each workgroup's sum of squares for the group RMSNorm in `part`:
// norm_before_gate = 0: v = y * silu(z), u = v * w;  1: v = y, u = v * w * silu(z); sums of v^2.
// Without the norm, u = y * silu(z).

struct Params {
    nh: u32,
    hd: u32,
    ds: u32,
    ng: u32,
    cd: u32,
    dip: u32,
    dt_col: u32,
    reqs: u32,
    stride: u32,
    d_hdim: u32,
    has_lo: u32,
    has_hi: u32,
    dt_lo: f32,
    dt_hi: f32,
    groups: u32,
    // Where x, B and C of a row start: row * xs + xo of `xbc` (FUSED: of zxbcdt).
    xs: u32,
    xo: u32,
    before: u32,
    has_norm: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> zxbcdt: array<f32>;
#if FUSED
@group(0) @binding(4) var<storage, read> norm_w: array<f32>;
// (rows, nh, blocks of ROWS state rows)
@group(0) @binding(5) var<storage, read_write> part: array<f32>;
#else
@group(0) @binding(2) var<storage, read> xbc: array<f32>;
#endif
// dt_bias (nh) | A_log (nh) | D (nh, or nh * hd with d_hdim)
@group(0) @binding(3) var<storage, read> heads: array<f32>;
// cu (reqs + 1) | slots (reqs) | record (reqs)
@group(0) @binding(6) var<storage, read> info: array<i32>;
#if V4
@group(0) @binding(9) var<storage, read_write> pool: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> saved: array<vec4<f32>>;
#else
@group(0) @binding(9) var<storage, read_write> pool: array<f32>;
@group(0) @binding(10) var<storage, read_write> saved: array<f32>;
#endif
@group(0) @binding(11) var<storage, read_write> y: array<f32>;

const LANES: u32 = 32u;
const WG: u32 = WARPS * LANES;
// State rows (p) per workgroup: RPW per warp.
const ROWS: u32 = WARPS * RPW;

var<workgroup> partial: array<f32, WG>;
#if FUSED
var<workgroup> squares: array<f32, WARPS>;
#endif

fn xin(i: u32) -> f32 {
#if FUSED
    return zxbcdt[i];
#else
    return xbc[i];
#endif
}

// Columns lane, lane + 32, lane + 64, lane + 96 (V4: 4 lane .. 4 lane + 3), plus `first`, of a row
// at `base` of xbc or of a state buffer, zero past d_state.
fn load4(buf: u32, base: u32, lane: u32, first: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
#if V4
    let s0 = first + 4u * lane;
    if (WHOLE != 0u || s0 < p.ds) {
        if (buf == 0u) {
            v = vec4<f32>(xin(base + s0), xin(base + s0 + 1u), xin(base + s0 + 2u),
                          xin(base + s0 + 3u));
        } else {
            v = pool[(base + s0) / 4u];
        }
    }
#else
    for (var i = 0u; i < 4u; i++) {
        let s = first + lane + i * LANES;
        if (s < p.ds) {
            if (buf == 0u) {
                v[i] = xin(base + s);
            } else {
                v[i] = pool[base + s];
            }
        }
    }
#endif
    return v;
}

fn store4(to_pool: bool, base: u32, lane: u32, first: u32, v: vec4<f32>) {
#if V4
    let s0 = first + 4u * lane;
    if (WHOLE != 0u || s0 < p.ds) {
        if (to_pool) {
            pool[(base + s0) / 4u] = v;
        } else {
            saved[(base + s0) / 4u] = v;
        }
    }
#else
    for (var i = 0u; i < 4u; i++) {
        let s = first + lane + i * LANES;
        if (s < p.ds) {
            if (to_pool) {
                pool[base + s] = v[i];
            } else {
                saved[base + s] = v[i];
            }
        }
    }
#endif
}

// The sum over the 32 lanes of a state row, in every lane: subgroup shuffles where subgroups
// are at least 32 wide, a tree in workgroup memory otherwise.
fn lane_sum(v: f32, t: u32, lane: u32, width: u32) -> f32 {
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
    partial[t] = v;
    workgroupBarrier();
    for (var off = LANES / 2u; off > 0u; off /= 2u) {
        if (lane < off) {
            partial[t] += partial[t + off];
        }
        workgroupBarrier();
    }
    let total = partial[t - lane];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(WG, 1, 1)
fn state_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
#if SUBGROUPS
                @builtin(subgroup_size) width: u32,
#endif
                @builtin(local_invocation_id) lid: vec3<u32>) {
#if SUBGROUPS
#else
    let width = 1u;
#endif
    let gid = wid.x + wid.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay uniform.
    if (gid >= p.groups) {
        return;
    }
    let t = lid.x;
    let lane = t % LANES;
    let warp = t / LANES;
    let blocks = (p.hd + ROWS - 1u) / ROWS;
    let i = gid / (p.nh * blocks);
    let h = (gid / blocks) % p.nh;
    // The warp's rows: p = first + WARPS k, k < RPW.
    let first = (gid % blocks) * ROWS + warp;
    let g = h / (p.nh / p.ng);
    let slot = info[p.reqs + 1u + i];
    let rec = info[2u * p.reqs + 1u + i];
    let sl = p.hd * p.ds;
    // Columns past 128 (WIDE: d_state > 128) as a define, so that without them their registers
    // are not allocated (H200, 2.7b batch 64: 134 -> 121 us).
    let wide = WIDE != 0u;
    // Every row's state is loaded before any is used, so that the loads are in flight together.
    var lo: array<vec4<f32>, RPW>;
    var hi: array<vec4<f32>, RPW>;
    for (var k = 0u; k < RPW; k++) {
        let pr = min(first + WARPS * k, p.hd - 1u);
        let row = u32(max(slot, 0)) * p.nh * sl + (h * p.hd + pr) * p.ds;
        lo[k] = vec4<f32>(0.0);
        hi[k] = vec4<f32>(0.0);
        if (slot >= 0) {
            lo[k] = load4(1u, row, lane, 0u);
            if (wide) {
                hi[k] = load4(1u, row, lane, 4u * LANES);
            }
        }
    }
    let a = -exp(heads[p.nh + h]);
    // D of each of the warp's rows.
    var dvs: array<f32, RPW>;
    for (var k = 0u; k < RPW; k++) {
        dvs[k] = heads[2u * p.nh + h];
        if (p.d_hdim != 0u) {
            dvs[k] = heads[2u * p.nh + h * p.hd + min(first + WARPS * k, p.hd - 1u)];
        }
    }
    let r0 = u32(info[i]);
    let r1 = u32(info[i + 1u]);
    let boff = p.xo + p.nh * p.hd + g * p.ds;
    let coff = p.xo + p.nh * p.hd + (p.ng + g) * p.ds;
    for (var r = r0; r < r1; r++) {
        let d = dt_of(zxbcdt[r * p.dip + p.dt_col + h], h);
        let decay = vec4<f32>(exp(d * a));
        let xr = r * p.xs;
        // B and C are the head's, shared by its rows.
        let b_lo = load4(0u, xr + boff, lane, 0u);
        let c_lo = load4(0u, xr + coff, lane, 0u);
        var b_hi = vec4<f32>(0.0);
        var c_hi = vec4<f32>(0.0);
        if (wide) {
            b_hi = load4(0u, xr + boff, lane, 4u * LANES);
            c_hi = load4(0u, xr + coff, lane, 4u * LANES);
        }
#if FUSED
        var sq = 0.0;
#endif
        for (var k = 0u; k < RPW; k++) {
            let pi = first + WARPS * k;
            let live = pi < p.hd;
            let pr = min(pi, p.hd - 1u);
            let x = xin(xr + p.xo + h * p.hd + pr);
            let dx = vec4<f32>(d * x);
            lo[k] = fma(decay, lo[k], dx * b_lo);
            var acc = dot(lo[k], c_lo);
            if (wide) {
                hi[k] = fma(decay, hi[k], dx * b_hi);
                acc += dot(hi[k], c_hi);
            }
            if (rec >= 0 && live) {
                let at = (u32(rec) * p.stride + (r - r0)) * p.nh * sl + (h * p.hd + pr) * p.ds;
                store4(false, at, lane, 0u, lo[k]);
                if (wide) {
                    store4(false, at, lane, 4u * LANES, hi[k]);
                }
            }
            let total = lane_sum(acc, t, lane, width);
            let yv = fma(dvs[k], x, total);
#if FUSED
            let zv = zxbcdt[r * p.dip + h * p.hd + pr];
            let gate = zv / (1.0 + exp(-zv));
            var u = yv * gate;
            if (p.has_norm != 0u) {
                var v = yv;
                if (p.before == 0u) {
                    v = u;
                }
                u = v * norm_w[h * p.hd + pr];
                if (p.before != 0u) {
                    u *= gate;
                }
                sq += select(0.0, v * v, live);
            }
            if (lane == 0u && live) {
                y[r * p.nh * p.hd + h * p.hd + pr] = u;
            }
#else
            if (lane == 0u && live) {
                y[r * p.nh * p.hd + h * p.hd + pr] = yv;
            }
#endif
        }
#if FUSED
        if (lane == 0u) {
            squares[warp] = sq;
        }
        workgroupBarrier();
        if (t == 0u) {
            var s = 0.0;
            for (var w = 0u; w < WARPS; w++) {
                s += squares[w];
            }
            part[(r * p.nh + h) * blocks + first / ROWS] = s;
        }
        workgroupBarrier();
#endif
    }
    if (rec < 0 && slot >= 0) {
        for (var k = 0u; k < RPW; k++) {
            let pi = first + WARPS * k;
            if (pi < p.hd) {
                let row = u32(slot) * p.nh * sl + (h * p.hd + pi) * p.ds;
                store4(true, row, lane, 0u, lo[k]);
                if (wide) {
                    store4(true, row, lane, 4u * LANES, hi[k]);
                }
            }
        }
    }
}
