// The decode recurrence: each request's tokens in order on its slot's ssm state. One workgroup per
// (request, head, 8 rows p of the state); 32 lanes per row, each holding columns lane + 32 i
// (d_state <= 256) in two vec4 registers. With record[i] >= 0 the state after each token goes to
// the intermediates and the slot is kept.

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
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> zxbcdt: array<f32>;
@group(0) @binding(2) var<storage, read> xbc: array<f32>;
// dt_bias (nh) | A_log (nh) | D (nh, or nh * hd with d_hdim)
@group(0) @binding(3) var<storage, read> heads: array<f32>;
// cu (reqs + 1) | slots (reqs) | record (reqs)
@group(0) @binding(6) var<storage, read> info: array<i32>;
@group(0) @binding(9) var<storage, read_write> pool: array<f32>;
@group(0) @binding(10) var<storage, read_write> saved: array<f32>;
@group(0) @binding(11) var<storage, read_write> y: array<f32>;

const WG: u32 = 256u;
const LANES: u32 = 32u;
// State rows (p) per workgroup: 32 lanes each.
const ROWS: u32 = 8u;

var<workgroup> partial: array<f32, WG>;

// Columns lane, lane + 32, lane + 64, lane + 96 (plus `first`) of a row at `base` of xbc or of a
// state buffer, zero past d_state.
fn load4(buf: u32, base: u32, lane: u32, first: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let s = first + lane + i * LANES;
        if (s < p.ds) {
            if (buf == 0u) {
                v[i] = xbc[base + s];
            } else {
                v[i] = pool[base + s];
            }
        }
    }
    return v;
}

fn store4(to_pool: bool, base: u32, lane: u32, first: u32, v: vec4<f32>) {
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

@compute @workgroup_size(256, 1, 1)
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
    let blocks = (p.hd + ROWS - 1u) / ROWS;
    let i = gid / (p.nh * blocks);
    let h = (gid / blocks) % p.nh;
    let pi = (gid % blocks) * ROWS + t / LANES;
    let live = pi < p.hd;
    let pr = min(pi, p.hd - 1u);
    let g = h / (p.nh / p.ng);
    let slot = info[p.reqs + 1u + i];
    let rec = info[2u * p.reqs + 1u + i];
    let sl = p.hd * p.ds;
    let base = (h * p.hd + pr) * p.ds;
    let row = u32(max(slot, 0)) * p.nh * sl + base;
    let wide = p.ds > 4u * LANES;
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    if (slot >= 0) {
        lo = load4(1u, row, lane, 0u);
        if (wide) {
            hi = load4(1u, row, lane, 4u * LANES);
        }
    }
    let a = -exp(heads[p.nh + h]);
    var dv = heads[2u * p.nh + h];
    if (p.d_hdim != 0u) {
        dv = heads[2u * p.nh + h * p.hd + pr];
    }
    let r0 = u32(info[i]);
    let r1 = u32(info[i + 1u]);
    let boff = p.nh * p.hd + g * p.ds;
    let coff = p.nh * p.hd + (p.ng + g) * p.ds;
    for (var r = r0; r < r1; r++) {
        let d = dt_of(zxbcdt[r * p.dip + p.dt_col + h], h);
        let decay = vec4<f32>(exp(d * a));
        let x = xbc[r * p.cd + h * p.hd + pr];
        let dx = vec4<f32>(d * x);
        lo = fma(decay, lo, dx * load4(0u, r * p.cd + boff, lane, 0u));
        var acc = dot(lo, load4(0u, r * p.cd + coff, lane, 0u));
        if (wide) {
            hi = fma(decay, hi, dx * load4(0u, r * p.cd + boff, lane, 4u * LANES));
            acc += dot(hi, load4(0u, r * p.cd + coff, lane, 4u * LANES));
        }
        if (rec >= 0 && live) {
            let at = (u32(rec) * p.stride + (r - r0)) * p.nh * sl + base;
            store4(false, at, lane, 0u, lo);
            if (wide) {
                store4(false, at, lane, 4u * LANES, hi);
            }
        }
        let total = lane_sum(acc, t, lane, width);
        if (lane == 0u && live) {
            y[r * p.nh * p.hd + h * p.hd + pr] = fma(dv, x, total);
        }
    }
    if (rec < 0 && slot >= 0 && live) {
        store4(true, row, lane, 0u, lo);
        if (wide) {
            store4(true, row, lane, 4u * LANES, hi);
        }
    }
}
