// The SSD chunked scan over packed sequences, in five kernels:
//   ssd_dt      per (chunk, head): dt = softplus(dt + dt_bias) clamped, and the chunk's cumulative
//               dA = cumsum(dt * A);
//   ssd_cb      per (chunk, group, m, k): CB[m, k] = C_m . B_k (k <= m);
//   ssd_states  per (chunk, head, p, s): the chunk's own state sum_k exp(dA_last - dA_k) dt_k x_k B_k;
//   ssd_pass    per (sequence, head, p, s): the state entering each chunk, passed chunk to chunk from
//               the slot's state; the final state back to the slot, snapshots on the way;
//   ssd_out     per (row, head, p): y = exp(dA_m) C_m . s_in + sum_k CB[m,k] exp(dA_m - dA_k) dt_k x_k + D x_m.

struct Params {
    rows: u32,
    nh: u32,        // heads
    hd: u32,        // headdim
    ds: u32,        // d_state
    ng: u32,        // groups
    cd: u32,        // conv channels (row width of xbc)
    dip: u32,       // in_proj row width
    dt_col: u32,    // column of dt in an in_proj row
    q: u32,         // chunk size
    chunks: u32,
    seqs: u32,
    count: u32,     // threads that do work
    nsnaps: u32,
    d_hdim: u32,    // D per channel instead of per head
    has_lo: u32,
    has_hi: u32,
    dt_lo: f32,
    dt_hi: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> zxbcdt: array<f32>;
@group(0) @binding(2) var<storage, read> xbc: array<f32>;
@group(0) @binding(3) var<storage, read> dt_bias: array<f32>;
@group(0) @binding(4) var<storage, read> a_log: array<f32>;
@group(0) @binding(5) var<storage, read> dvec: array<f32>;
@group(0) @binding(6) var<storage, read> cu: array<i32>;
@group(0) @binding(7) var<storage, read> slots: array<i32>;
@group(0) @binding(8) var<storage, read> seq_chunks: array<i32>;
@group(0) @binding(9) var<storage, read> chunk_rows: array<i32>;
@group(0) @binding(10) var<storage, read> snaps: array<i32>;
@group(0) @binding(11) var<storage, read_write> dt: array<f32>;      // (rows, nh)
@group(0) @binding(12) var<storage, read_write> cum: array<f32>;     // (rows, nh)
@group(0) @binding(13) var<storage, read_write> cb: array<f32>;      // (chunks, ng, q, q)
@group(0) @binding(14) var<storage, read_write> states: array<f32>;  // (chunks, nh, hd, ds)
@group(0) @binding(15) var<storage, read_write> pool: array<f32>;
@group(0) @binding(16) var<storage, read_write> saved: array<f32>;
@group(0) @binding(17) var<storage, read_write> y: array<f32>;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * 64u + lid.x;
}

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

// The chunk that owns row r: the last c with chunk_rows[c] <= r.
fn chunk_of(r: u32) -> u32 {
    var lo = 0u;
    var hi = p.chunks;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (u32(chunk_rows[mid]) <= r) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

fn b_at(r: u32, g: u32, s: u32) -> f32 {
    return xbc[r * p.cd + p.nh * p.hd + g * p.ds + s];
}

fn c_at(r: u32, g: u32, s: u32) -> f32 {
    return xbc[r * p.cd + p.nh * p.hd + (p.ng + g) * p.ds + s];
}

@compute @workgroup_size(64, 1, 1)
fn ssd_dt(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let c = id / p.nh;
    let h = id % p.nh;
    let a = -exp(a_log[h]);
    var acc = 0.0;
    for (var r = u32(chunk_rows[c]); r < u32(chunk_rows[c + 1u]); r++) {
        let d = dt_of(zxbcdt[r * p.dip + p.dt_col + h], h);
        acc += d * a;
        dt[r * p.nh + h] = d;
        cum[r * p.nh + h] = acc;
    }
}

@compute @workgroup_size(64, 1, 1)
fn ssd_cb(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let qq = p.q * p.q;
    let c = id / (p.ng * qq);
    let g = (id / qq) % p.ng;
    let m = (id % qq) / p.q;
    let k = id % p.q;
    let r0 = u32(chunk_rows[c]);
    let len = u32(chunk_rows[c + 1u]) - r0;
    var acc = 0.0;
    if (k <= m && m < len) {
        for (var s = 0u; s < p.ds; s++) {
            acc = fma(c_at(r0 + m, g, s), b_at(r0 + k, g, s), acc);
        }
    }
    cb[id] = acc;
}

@compute @workgroup_size(64, 1, 1)
fn ssd_states(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let sl = p.hd * p.ds;
    let c = id / (p.nh * sl);
    let h = (id / sl) % p.nh;
    let pi = (id % sl) / p.ds;
    let s = id % p.ds;
    let g = h / (p.nh / p.ng);
    let r0 = u32(chunk_rows[c]);
    let r1 = u32(chunk_rows[c + 1u]);
    let last = cum[(r1 - 1u) * p.nh + h];
    var acc = 0.0;
    for (var r = r0; r < r1; r++) {
        let w = exp(last - cum[r * p.nh + h]) * dt[r * p.nh + h];
        acc = fma(w * xbc[r * p.cd + h * p.hd + pi], b_at(r, g, s), acc);
    }
    states[id] = acc;
}

@compute @workgroup_size(64, 1, 1)
fn ssd_pass(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let sl = p.hd * p.ds;
    let seq = id / (p.nh * sl);
    let e = id % (p.nh * sl);  // (h, p, s) within one state
    let h = e / sl;
    let slot = slots[seq];
    var st = 0.0;
    if (slot >= 0) {
        st = pool[u32(slot) * p.nh * sl + e];
    }
    for (var c = u32(seq_chunks[seq]); c < u32(seq_chunks[seq + 1u]); c++) {
        let at = c * p.nh * sl + e;
        let own = states[at];
        states[at] = st;
        let total = cum[(u32(chunk_rows[c + 1u]) - 1u) * p.nh + h];
        st = fma(exp(total), st, own);
        for (var k = 0u; k < p.nsnaps; k++) {
            if (u32(snaps[k * 4u + 2u]) == c) {
                saved[u32(snaps[k * 4u + 3u]) * p.nh * sl + e] = st;
            }
        }
    }
    if (slot >= 0) {
        pool[u32(slot) * p.nh * sl + e] = st;
    }
}

@compute @workgroup_size(64, 1, 1)
fn ssd_out(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let di = p.nh * p.hd;
    let r = id / di;
    let h = (id % di) / p.hd;
    let pi = id % p.hd;
    let g = h / (p.nh / p.ng);
    let c = chunk_of(r);
    let r0 = u32(chunk_rows[c]);
    let cm = cum[r * p.nh + h];
    // The state entering the chunk, seen through C_m.
    let sbase = ((c * p.nh + h) * p.hd + pi) * p.ds;
    var inter = 0.0;
    for (var s = 0u; s < p.ds; s++) {
        inter = fma(c_at(r, g, s), states[sbase + s], inter);
    }
    var acc = exp(cm) * inter;
    let cbase = ((c * p.ng + g) * p.q + (r - r0)) * p.q;
    for (var k = r0; k <= r; k++) {
        let w = cb[cbase + (k - r0)] * exp(cm - cum[k * p.nh + h]) * dt[k * p.nh + h];
        acc = fma(w, xbc[k * p.cd + h * p.hd + pi], acc);
    }
    var dv = dvec[h];
    if (p.d_hdim != 0u) {
        dv = dvec[h * p.hd + pi];
    }
    y[r * di + h * p.hd + pi] = fma(dv, xbc[r * p.cd + h * p.hd + pi], acc);
}
