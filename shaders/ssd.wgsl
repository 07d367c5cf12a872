// The SSD chunked scan over packed sequences, in five kernels:
//   ssd_dt      per (chunk, head): dt = softplus(dt + dt_bias) clamped, and the chunk's cumulative
//               dA = cumsum(dt * A);
//   ssd_mm MODE=1 (cb)      per (chunk, group): CB = C B^T, a (Q x d_state)(d_state x Q) product;
//   ssd_mm MODE=2 (states)  per (chunk, head): the chunk's own state
//               S[p, s] = sum_k exp(dA_last - dA_k) dt_k x_k[p] B_k[s];
//   ssd_pass    per (sequence, head, p, s): the state entering each chunk, passed chunk to chunk from
//               the slot's state; the final state back to the slot, snapshots on the way;
//   ssd_mm MODE=3 (out)     per (chunk, head):
//               y_m = exp(dA_m) C_m . s_in + sum_{k<=m} CB[m,k] exp(dA_m - dA_k) dt_k x_k + D x_m.
// The three products share one tiled kernel: 64x64 outputs per workgroup, 16x16 threads of 4x4.

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
// dt_bias (nh) | A_log (nh) | D (nh, or nh * hd with d_hdim)
@group(0) @binding(3) var<storage, read> heads: array<f32>;
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
    let a = -exp(heads[p.nh + h]);
    var acc = 0.0;
    for (var r = u32(chunk_rows[c]); r < u32(chunk_rows[c + 1u]); r++) {
        let d = dt_of(zxbcdt[r * p.dip + p.dt_col + h], h);
        acc += d * a;
        dt[r * p.nh + h] = d;
        cum[r * p.nh + h] = acc;
    }
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

const TILE: u32 = 64u;
const KT: u32 = 16u;

var<workgroup> at: array<array<f32, 65>, 16>;
var<workgroup> bt: array<array<f32, 65>, 16>;

// What one workgroup computes: chunk c, head h (group g), the tile's first output row i0 and
// column j0, and its sizes.
struct Tile {
    c: u32,
    h: u32,
    g: u32,
    i0: u32,
    j0: u32,
    r0: u32,
    len: u32,
}

fn tile_of(gid: u32) -> Tile {
    var t: Tile;
    // Tiles along i and j of one (chunk, head or group) product.
#if MODE_CB
    let ti = (p.q + TILE - 1u) / TILE;
    let tj = ti;
    let per = p.ng;
#else
#if MODE_STATES
    let ti = (p.hd + TILE - 1u) / TILE;
    let tj = (p.ds + TILE - 1u) / TILE;
#else
    let ti = (p.q + TILE - 1u) / TILE;
    let tj = (p.hd + TILE - 1u) / TILE;
#endif
    let per = p.nh;
#endif
    let tiles = ti * tj;
    t.c = gid / (per * tiles);
    let hg = (gid / tiles) % per;
    t.i0 = ((gid % tiles) / tj) * TILE;
    t.j0 = (gid % tj) * TILE;
#if MODE_CB
    t.g = hg;
    t.h = 0u;
#else
    t.h = hg;
    t.g = hg / (p.nh / p.ng);
#endif
    t.r0 = u32(chunk_rows[t.c]);
    t.len = u32(chunk_rows[t.c + 1u]) - t.r0;
    return t;
}

// The K extent of the product, and of its second phase (MODE_OUT: the inter-chunk term over
// d_state first, then the intra-chunk term over the chunk's rows up to the tile's last row).
fn k_extent(t: Tile, phase: u32) -> u32 {
#if MODE_CB
    return p.ds;
#else
#if MODE_STATES
    return t.len;
#else
    if (phase == 0u) {
        return p.ds;
    }
    return min(t.len, t.i0 + TILE);
#endif
#endif
}

// Operand A (i, k) and B (k, j) of the product.
fn load_a(t: Tile, phase: u32, i: u32, k: u32) -> f32 {
#if MODE_CB
    if (i >= t.len) {
        return 0.0;
    }
    return c_at(t.r0 + i, t.g, k);
#else
#if MODE_STATES
    if (i >= p.hd) {
        return 0.0;
    }
    let r = t.r0 + k;
    let last = cum[(t.r0 + t.len - 1u) * p.nh + t.h];
    let w = exp(last - cum[r * p.nh + t.h]) * dt[r * p.nh + t.h];
    return w * xbc[r * p.cd + t.h * p.hd + i];
#else
    if (i >= t.len) {
        return 0.0;
    }
    let cm = cum[(t.r0 + i) * p.nh + t.h];
    if (phase == 0u) {
        return exp(cm) * c_at(t.r0 + i, t.g, k);
    }
    if (k > i) {
        return 0.0;
    }
    let cbv = cb[((t.c * p.ng + t.g) * p.q + i) * p.q + k];
    return cbv * exp(cm - cum[(t.r0 + k) * p.nh + t.h]) * dt[(t.r0 + k) * p.nh + t.h];
#endif
#endif
}

fn load_b(t: Tile, phase: u32, k: u32, j: u32) -> f32 {
#if MODE_CB
    if (j >= t.len) {
        return 0.0;
    }
    return b_at(t.r0 + j, t.g, k);
#else
#if MODE_STATES
    if (j >= p.ds) {
        return 0.0;
    }
    return b_at(t.r0 + k, t.g, j);
#else
    if (j >= p.hd) {
        return 0.0;
    }
    if (phase == 0u) {
        // The state entering the chunk, (p, s) at (j, k).
        return states[((t.c * p.nh + t.h) * p.hd + j) * p.ds + k];
    }
    return xbc[(t.r0 + k) * p.cd + t.h * p.hd + j];
#endif
#endif
}

fn store(t: Tile, i: u32, j: u32, v: f32) {
#if MODE_CB
    if (i < p.q && j < p.q) {
        cb[((t.c * p.ng + t.g) * p.q + i) * p.q + j] = v;
    }
#else
#if MODE_STATES
    if (i < p.hd && j < p.ds) {
        states[((t.c * p.nh + t.h) * p.hd + i) * p.ds + j] = v;
    }
#else
    if (i < t.len && j < p.hd) {
        let r = t.r0 + i;
        var dv = heads[2u * p.nh + t.h];
        if (p.d_hdim != 0u) {
            dv = heads[2u * p.nh + t.h * p.hd + j];
        }
        let x = xbc[r * p.cd + t.h * p.hd + j];
        y[r * p.nh * p.hd + t.h * p.hd + j] = fma(dv, x, v);
    }
#endif
#endif
}

@compute @workgroup_size(16, 16, 1)
fn ssd_mm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let gid = wid.x + wid.y * nwg.x;
    if (gid >= p.count) {
        return;
    }
    let t = tile_of(gid);
    let th = lid.y * 16u + lid.x;
    // One vec4 of 4 columns per output row: registers, no private arrays (drivers spill those).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
#if MODE_OUT
    let phases = 2u;
#else
    let phases = 1u;
#endif
    for (var phase = 0u; phase < phases; phase++) {
        let kn = k_extent(t, phase);
        for (var k0 = 0u; k0 < kn; k0 += KT) {
            for (var e = 0u; e < 4u; e++) {
                let idx = th + e * 256u;
                let row = idx / KT;
                let kk = idx % KT;
                var av = 0.0;
                var bv = 0.0;
                if (k0 + kk < kn) {
                    av = load_a(t, phase, t.i0 + row, k0 + kk);
                    bv = load_b(t, phase, k0 + kk, t.j0 + row);
                }
                at[kk][row] = av;
                bt[kk][row] = bv;
            }
            workgroupBarrier();
            for (var kk = 0u; kk < KT; kk++) {
                let a = vec4<f32>(at[kk][lid.y], at[kk][lid.y + 16u], at[kk][lid.y + 32u], at[kk][lid.y + 48u]);
                let b = vec4<f32>(bt[kk][lid.x], bt[kk][lid.x + 16u], bt[kk][lid.x + 32u], bt[kk][lid.x + 48u]);
                acc0 = fma(vec4<f32>(a.x), b, acc0);
                acc1 = fma(vec4<f32>(a.y), b, acc1);
                acc2 = fma(vec4<f32>(a.z), b, acc2);
                acc3 = fma(vec4<f32>(a.w), b, acc3);
            }
            workgroupBarrier();
        }
    }
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var e = 0u; e < 4u; e++) {
        for (var f = 0u; f < 4u; f++) {
            store(t, t.i0 + lid.y + e * 16u, t.j0 + lid.x + f * 16u, accs[e][f]);
        }
    }
}
