// The decode recurrence: each request's tokens in order on its slot's ssm state. One workgroup per
// (request, head, p) row of the state; its 128 threads hold columns t and t + 128 (d_state <= 256)
// in registers. With record[i] >= 0 the state after each token goes to the intermediates and the
// slot is kept.

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
@group(0) @binding(3) var<storage, read> dt_bias: array<f32>;
@group(0) @binding(4) var<storage, read> a_log: array<f32>;
@group(0) @binding(5) var<storage, read> dvec: array<f32>;
@group(0) @binding(6) var<storage, read> cu: array<i32>;
@group(0) @binding(7) var<storage, read> slots: array<i32>;
@group(0) @binding(8) var<storage, read> record: array<i32>;
@group(0) @binding(9) var<storage, read_write> pool: array<f32>;
@group(0) @binding(10) var<storage, read_write> saved: array<f32>;
@group(0) @binding(11) var<storage, read_write> y: array<f32>;

const WG: u32 = 128u;

var<workgroup> partial: array<f32, WG>;

fn dt_of(raw: f32, h: u32) -> f32 {
    let v = raw + dt_bias[h];
    var d = v;
    if (v <= 20.0) {
        d = log(1.0 + exp(v));
    }
    if (p.has_lo != 0u) {
        d = max(d, p.dt_lo);
    }
    if (p.has_hi != 0u) {
        d = min(d, p.dt_hi);
    }
    return d;
}

// The sum over the workgroup (every thread gets it): subgroup sums and then one value per
// subgroup where the adapter has subgroups, a tree in workgroup memory where it has not.
fn reduce(v: f32, t: u32, lane: u32, width: u32) -> f32 {
#if SUBGROUPS
    let part = subgroupAdd(v);
    if (lane == 0u) {
        partial[t / width] = part;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < WG / width; i++) {
        total += partial[i];
    }
#else
    partial[t] = v;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (t < half) {
            partial[t] += partial[t + half];
        }
        workgroupBarrier();
    }
    let total = partial[0];
#endif
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(128, 1, 1)
fn state_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
#if SUBGROUPS
                @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) width: u32,
#endif
                @builtin(local_invocation_id) lid: vec3<u32>) {
#if SUBGROUPS
#else
    let lane = 0u;
    let width = 1u;
#endif
    let gid = wid.x + wid.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay uniform.
    if (gid >= p.groups) {
        return;
    }
    let t = lid.x;
    let i = gid / (p.nh * p.hd);
    let h = (gid / p.hd) % p.nh;
    let pi = gid % p.hd;
    let g = h / (p.nh / p.ng);
    let slot = slots[i];
    let rec = record[i];
    let sl = p.hd * p.ds;
    let base = (h * p.hd + pi) * p.ds;
    let s0 = t;
    let s1 = t + WG;
    let has0 = s0 < p.ds;
    let has1 = s1 < p.ds;
    let row = u32(max(slot, 0)) * p.nh * sl + base;
    var st0 = 0.0;
    var st1 = 0.0;
    if (slot >= 0 && has0) {
        st0 = pool[row + s0];
    }
    if (slot >= 0 && has1) {
        st1 = pool[row + s1];
    }
    let a = -exp(a_log[h]);
    var dv = dvec[h];
    if (p.d_hdim != 0u) {
        dv = dvec[h * p.hd + pi];
    }
    let r0 = u32(cu[i]);
    let r1 = u32(cu[i + 1u]);
    let boff = p.nh * p.hd + g * p.ds;
    let coff = p.nh * p.hd + (p.ng + g) * p.ds;
    for (var r = r0; r < r1; r++) {
        let d = dt_of(zxbcdt[r * p.dip + p.dt_col + h], h);
        let decay = exp(d * a);
        let x = xbc[r * p.cd + h * p.hd + pi];
        var acc = 0.0;
        let at = (u32(max(rec, 0)) * p.stride + (r - r0)) * p.nh * sl + base;
        if (has0) {
            st0 = fma(decay, st0, d * x * xbc[r * p.cd + boff + s0]);
            acc = st0 * xbc[r * p.cd + coff + s0];
            if (rec >= 0) {
                saved[at + s0] = st0;
            }
        }
        if (has1) {
            st1 = fma(decay, st1, d * x * xbc[r * p.cd + boff + s1]);
            acc = fma(st1, xbc[r * p.cd + coff + s1], acc);
            if (rec >= 0) {
                saved[at + s1] = st1;
            }
        }
        let total = reduce(acc, t, lane, width);
        if (t == 0u) {
            y[r * p.nh * p.hd + h * p.hd + pi] = fma(dv, x, total);
        }
    }
    if (rec < 0 && slot >= 0) {
        if (has0) {
            pool[row + s0] = st0;
        }
        if (has1) {
            pool[row + s1] = st1;
        }
    }
}
