// The SSD chunked scan over packed sequences, in four dispatches of two kernels:
//   ssd_mm MODE_CB      per (chunk, group): CB = C B^T, a (Q x d_state)(d_state x Q) product;
//               beside it, per (chunk, head): dt = softplus(dt + dt_bias) clamped, the chunk's
//               cumulative dA = cumsum(dt * A), each row's weight exp(dA_last - dA_r) dt_r in the
//               chunk's own state, and the chunk's decay exp(dA_last) (chunk_dt);
//   ssd_mm MODE_STATES  per (chunk, group): the chunk's own states of all the group's heads
//               S[h, p, s] = sum_k exp(dA_last - dA_k) dt_k x_k[h, p] B_k[s];
//   ssd_pass    per (sequence, head, p, s): the state entering each chunk, passed chunk to chunk
//               from the slot's state; the final state back to the slot, snapshots on the way;
//   ssd_mm MODE_OUT     per (chunk, head):
//               y_m = exp(dA_m) C_m . s_in + sum_{k<=m} CB[m,k] exp(dA_m - dA_k) dt_k x_k + D x_m.
// The three products share one tiled kernel (defined with THREADS): THREADS / 2 x 64 outputs per
// workgroup, THREADS threads of 8x4.

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
    count: u32,     // threads that do work (ssd_pass) or tiles (ssd_mm)
    nsnaps: u32,
    d_hdim: u32,    // D per channel instead of per head
    has_lo: u32,
    has_hi: u32,
    dt_lo: f32,
    dt_hi: f32,
    dt_groups: u32, // MODE_CB: the workgroups before the tiles, which compute dt
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// V4 (headdim and d_state multiples of 4): the states the products write, the state passing and
// the outputs move whole 16-byte vectors, four consecutive values of a row.
#if V4
alias S = vec4<f32>;
const W: u32 = 4u;
#else
alias S = f32;
const W: u32 = 1u;
#endif
@group(0) @binding(1) var<storage, read> zxbcdt: array<f32>;
@group(0) @binding(2) var<storage, read> xbc: array<f32>;
// dt_bias (nh) | A_log (nh) | D (nh, or nh * hd with d_hdim)
@group(0) @binding(3) var<storage, read> heads: array<f32>;
// The products bind what they only read as read-only: the driver guards read-write loads with a
// branch each (robust buffer access), read-only ones with a predicate.
// decay: (rows, nh): exp(dA_last - dA_r) dt_r, row r's weight in its chunk's own state; then
// (chunks, nh): exp(dA_last), the decay over the whole chunk.
#if MODE_STATES
@group(0) @binding(4) var<storage, read> decay: array<f32>;
#else
@group(0) @binding(4) var<storage, read_write> decay: array<f32>;
#endif
@group(0) @binding(7) var<storage, read> slots: array<i32>;
@group(0) @binding(8) var<storage, read> seq_chunks: array<i32>;
@group(0) @binding(9) var<storage, read> chunk_rows: array<i32>;
@group(0) @binding(10) var<storage, read> snaps: array<i32>;
#if MODE_OUT
@group(0) @binding(11) var<storage, read> dt: array<f32>;           // (rows, nh)
@group(0) @binding(12) var<storage, read> cum: array<f32>;          // (rows, nh)
@group(0) @binding(13) var<storage, read> cb: array<f32>;           // (chunks, ng, q, q)
@group(0) @binding(14) var<storage, read> states: array<f32>;       // (chunks, nh, hd, ds)
#else
@group(0) @binding(11) var<storage, read_write> dt: array<f32>;      // (rows, nh)
@group(0) @binding(12) var<storage, read_write> cum: array<f32>;     // (rows, nh)
@group(0) @binding(13) var<storage, read_write> cb: array<f32>;      // (chunks, ng, q, q)
@group(0) @binding(14) var<storage, read_write> states: array<S>;    // (chunks, nh, hd, ds)
#endif
@group(0) @binding(15) var<storage, read_write> pool: array<S>;
@group(0) @binding(16) var<storage, read_write> saved: array<S>;
@group(0) @binding(17) var<storage, read_write> y: array<S>;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * 64u + lid.x;
}

// Where B and C of row r, group g, state s lie in xbc.
fn b_idx(r: u32, g: u32, s: u32) -> u32 {
    return r * p.cd + p.nh * p.hd + g * p.ds + s;
}

fn c_idx(r: u32, g: u32, s: u32) -> u32 {
    return r * p.cd + p.nh * p.hd + (p.ng + g) * p.ds + s;
}

#if MODE_STATES
// The chunk states' loads without branches: an element outside the product reads index 0 and is
// 0 (H200, 2.7b 1x8192, 256 threads, every tile checked: 611 us with an `if` around each load, 434
// so; the driver puts each guarded load in a branch region of its own). C B^T and the outputs keep
// the `if`s on tiles that need checks (there the selects measured slower: outputs 1146 -> 1563).
fn xbc_or0(at: u32, ok: bool) -> f32 {
    return select(0.0, xbc[select(0u, at, ok)], ok);
}

fn decay_or0(at: u32, ok: bool) -> f32 {
    return select(0.0, decay[select(0u, at, ok)], ok);
}
#endif

// ssd_pass (ssd_mm's modules leave it out: there decay and the states may be bound read-only).
#if THREADS
#else
// Chunk c's own state at e (in units of S) and its decay; chunks past `last` read `last`'s.
fn own_at(c: u32, last: u32, e: u32) -> S {
    return states[min(c, last) * (p.nh * p.hd * p.ds / W) + e];
}

fn decay_at(c: u32, last: u32, h: u32) -> f32 {
    return decay[(p.rows + min(c, last)) * p.nh + h];
}

// Chunk c of the pass (none past `end`): the state entering it stored in place of its own
// state, then carried over it.
fn pass_step(c: u32, end: u32, e: u32, st: ptr<function, S>, own: S, dec: f32) {
    if (c >= end) {
        return;
    }
    let n = p.nh * p.hd * p.ds / W;
    states[c * n + e] = *st;
    *st = fma(S(dec), *st, own);
    for (var k = 0u; k < p.nsnaps; k++) {
        if (u32(snaps[k * 4u + 2u]) == c) {
            saved[u32(snaps[k * 4u + 3u]) * n + e] = *st;
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn ssd_pass(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let n = p.nh * p.hd * p.ds / W;  // one state
    let seq = id / n;
    let e = id % n;  // (h, p, s) within it
    let h = e * W / (p.hd * p.ds);
    let slot = slots[seq];
    var st = S(0.0);
    if (slot >= 0) {
        st = pool[u32(slot) * n + e];
    }
    let end = u32(seq_chunks[seq + 1u]);
    // Eight chunks' own states and decays are loaded before their chain of fmas: the stores to
    // `states` in the chain keep the compiler from moving later loads of `states` above them.
    for (var c = u32(seq_chunks[seq]); c < end; c += 8u) {
        let o0 = own_at(c, end - 1u, e);
        let o1 = own_at(c + 1u, end - 1u, e);
        let o2 = own_at(c + 2u, end - 1u, e);
        let o3 = own_at(c + 3u, end - 1u, e);
        let o4 = own_at(c + 4u, end - 1u, e);
        let o5 = own_at(c + 5u, end - 1u, e);
        let o6 = own_at(c + 6u, end - 1u, e);
        let o7 = own_at(c + 7u, end - 1u, e);
        let d0 = decay_at(c, end - 1u, h);
        let d1 = decay_at(c + 1u, end - 1u, h);
        let d2 = decay_at(c + 2u, end - 1u, h);
        let d3 = decay_at(c + 3u, end - 1u, h);
        let d4 = decay_at(c + 4u, end - 1u, h);
        let d5 = decay_at(c + 5u, end - 1u, h);
        let d6 = decay_at(c + 6u, end - 1u, h);
        let d7 = decay_at(c + 7u, end - 1u, h);
        pass_step(c, end, e, &st, o0, d0);
        pass_step(c + 1u, end, e, &st, o1, d1);
        pass_step(c + 2u, end, e, &st, o2, d2);
        pass_step(c + 3u, end, e, &st, o3, d3);
        pass_step(c + 4u, end, e, &st, o4, d4);
        pass_step(c + 5u, end, e, &st, o5, d5);
        pass_step(c + 6u, end, e, &st, o6, d6);
        pass_step(c + 7u, end, e, &st, o7, d7);
    }
    if (slot >= 0) {
        pool[u32(slot) * n + e] = st;
    }
}
#endif

#if THREADS
const TH: u32 = THREADS;  // threads of 8x4 outputs
const TI: u32 = TH / 2u;  // output rows per workgroup
const TJ: u32 = 64u;      // output columns per workgroup
const WK: u32 = 16u;      // k per step through workgroup memory
// vec4s per k row of the operand tiles, one more than the rows need against bank conflicts.
const AROW: u32 = TI / 4u + 1u;
const BROW: u32 = 17u;

var<workgroup> at: array<vec4<f32>, WK * AROW>;  // (WK, AROW): A's rows i at each k, four to a vec4
var<workgroup> bt: array<vec4<f32>, WK * BROW>;  // (WK, BROW): B's columns j at each k
var<workgroup> cum_i: array<f32, TI>;            // MODE_OUT: dA of the tile's rows

// What one workgroup computes: chunk c, head h (group g), the tile's first output row i0 and
// column j0, the chunk's first row r0 and its length.
struct Tile {
    c: u32,
    h: u32,
    g: u32,
    i0: u32,
    j0: u32,
    r0: u32,
    len: u32,
}

// Channels (head, p) of one group.
fn group_channels() -> u32 {
    return p.nh / p.ng * p.hd;
}

fn tile_of(gid: u32) -> Tile {
    var t: Tile;
    // Tiles along i and j of one (chunk, head or group) product.
#if MODE_CB
    let ti = (p.q + TI - 1u) / TI;
    let tj = (p.q + TJ - 1u) / TJ;
    let per = p.ng;
#else
#if MODE_STATES
    // Rows i: all the group's channels, whose heads share B.
    let ti = (group_channels() + TI - 1u) / TI;
    let tj = (p.ds + TJ - 1u) / TJ;
    let per = p.ng;
#else
    let ti = (p.q + TI - 1u) / TI;
    let tj = (p.hd + TJ - 1u) / TJ;
    let per = p.nh;
#endif
#endif
    let tiles = ti * tj;
    t.c = gid / (per * tiles);
    let hg = (gid / tiles) % per;
    t.i0 = ((gid % tiles) / tj) * TI;
    t.j0 = (gid % tj) * TJ;
#if MODE_OUT
    t.h = hg;
    t.g = hg / (p.nh / p.ng);
#else
    t.h = 0u;
    t.g = hg;
#endif
    t.r0 = u32(chunk_rows[t.c]);
    t.len = u32(chunk_rows[t.c + 1u]) - t.r0;
    return t;
}

// Tiles with nothing to do: rows past the chunk's end, and CB above the diagonal (MODE_OUT reads
// CB[i, k] only for k <= i < len).
fn idle(t: Tile) -> bool {
#if MODE_CB
    return t.i0 >= t.len || t.j0 >= t.len || t.j0 >= t.i0 + TI;
#else
#if MODE_STATES
    return false;
#else
    return t.i0 >= t.len;
#endif
#endif
}

// Tiles whose operands lie inside the product at every step: their loads skip the bounds checks
// (the same code with `checked` constant, so the driver drops the comparisons; H200, 2.7b 1x8192,
// chunk states at 256 threads: 611 -> 385 us, chunk outputs 1146 -> 1028, C B^T 33 -> 32).
fn is_full(t: Tile) -> bool {
#if MODE_CB
    return t.i0 + TI <= t.len && t.j0 + TJ <= t.len && p.ds % WK == 0u;
#else
#if MODE_STATES
    return t.len % WK == 0u && t.i0 + TI <= group_channels() && t.j0 + TJ <= p.ds;
#else
    return t.i0 + TI <= t.len && t.j0 + TJ <= p.hd && p.ds % WK == 0u;
#endif
#endif
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
    return min(t.len, t.i0 + TI);
#endif
#endif
}

#if MODE_STATES
// MODE_STATES: operand A (TI rows i by WK: x weighted by the row's decay) into `at` and B (WK by
// TJ columns j) into `bt`, zero outside the product, for k0 + kk; consecutive threads on
// consecutive i or j (x and B are stored by k). Loaded and stored in one go: prefetching the next
// step as CB and OUT do (fetch, put) measured slower here (H200, 2.7b 1x8192: 367 us against 343).
fn fill(t: Tile, k0: u32, kn: u32, th: u32, checked: bool) {
    let cpg = group_channels();
    let i = th % TI;
    let ch = t.g * cpg + t.i0 + i;  // h * hd + p
    let h = ch / p.hd;
    for (var e = 0u; e < TI * WK / TH; e++) {
        let kk = th / TI + e * (TH / TI);
        let r = t.r0 + k0 + kk;
        let ok = !checked || (k0 + kk < kn && t.i0 + i < cpg);
        at[kk * AROW + i / 4u][i % 4u] = xbc_or0(r * p.cd + ch, ok) * decay_or0(r * p.nh + h, ok);
    }
    let j = th % TJ;
    for (var e = 0u; e < TJ * WK / TH; e++) {
        let kk = th / TJ + e * (TH / TJ);
        let ok = !checked || (k0 + kk < kn && t.j0 + j < p.ds);
        bt[kk * BROW + j / 4u][j % 4u] = xbc_or0(b_idx(t.r0 + k0 + kk, t.g, t.j0 + j), ok);
    }
}
#else
// A's and B's elements per thread and step (8, and 4 or 8 with 256 or 128 threads).
const NA: u32 = TI * WK / TH;
const NB: u32 = TJ * WK / TH;

// CB and OUT: a step's operands as loaded (fetch) apart from their arithmetic and their stores into
// workgroup memory (put), so that the next step's loads are in flight while this step runs its
// products (H200 1x8192: OUT 1409 -> 1245 us, CB 37 -> 35). Consecutive threads read consecutive
// addresses: along k for operands stored by i or j (C and B rows in CB, C and the states in OUT
// phase 0, CB in phase 1), along j for x (OUT phase 1). a0, a1: A's 8 elements of the thread; b0,
// b1: B's NB (set_b, get_b); ck, dk: OUT phase 1's dA_k and dt_k.
struct Raw {
    a0: vec4<f32>,
    a1: vec4<f32>,
    b0: vec4<f32>,
    b1: vec4<f32>,
    ck: f32,
    dk: f32,
}

fn set_b(w: ptr<function, Raw>, e: u32, v: f32) {
    if (e < 4u) {
        (*w).b0[e] = v;
    } else {
        (*w).b1[e - 4u] = v;
    }
}

fn get_b(w: Raw, e: u32) -> f32 {
    if (e < 4u) {
        return w.b0[e];
    }
    return w.b1[e - 4u];
}

fn fetch(t: Tile, phase: u32, k0: u32, kn: u32, th: u32, checked: bool) -> Raw {
    var w: Raw;
    let kk = th % WK;
    let k = k0 + kk;
#if MODE_OUT
    if (phase == 1u && (!checked || k < kn)) {
        w.ck = cum[(t.r0 + k) * p.nh + t.h];
        w.dk = dt[(t.r0 + k) * p.nh + t.h];
    }
#endif
    // The thread's elements are TH / WK rows (of A) or columns (of B) apart: their addresses are
    // the first one's plus a multiple of a uniform stride.
    let i0 = t.i0 + th / WK;
#if MODE_OUT
    var a_at = c_idx(t.r0 + i0, t.g, k);
    var a_step = (TH / WK) * p.cd;
    if (phase == 1u) {
        a_at = ((t.c * p.ng + t.g) * p.q + i0) * p.q + k;
        a_step = (TH / WK) * p.q;
    }
#else
    let a_at = c_idx(t.r0 + i0, t.g, k);
    let a_step = (TH / WK) * p.cd;
#endif
    for (var e = 0u; e < NA; e++) {
        let ci = i0 + e * (TH / WK);
        var v = 0.0;
        if (!checked || (k < kn && ci < t.len)) {
#if MODE_OUT
            if (phase == 0u) {
                v = xbc[a_at + e * a_step];
            } else if (!checked || k <= ci) {
                // Whole tiles read CB above the diagonal too (its diagonal tiles are whole):
                // put drops it.
                v = cb[a_at + e * a_step];
            }
#else
            v = xbc[a_at + e * a_step];
#endif
        }
        if (e < 4u) {
            w.a0[e] = v;
        } else {
            w.a1[e - 4u] = v;
        }
    }
#if MODE_OUT
    if (phase == 1u) {
        let j = th % TJ;
        let kj0 = k0 + th / TJ;
        let x_at = (t.r0 + kj0) * p.cd + t.h * p.hd + t.j0 + j;
        for (var e = 0u; e < NB; e++) {
            let kj = kj0 + e * (TH / TJ);
            var v = 0.0;
            if (!checked || (kj < kn && t.j0 + j < p.hd)) {
                v = xbc[x_at + e * (TH / TJ) * p.cd];
            }
            set_b(&w, e, v);
        }
        return w;
    }
#endif
    let jf = t.j0 + th / WK;
#if MODE_OUT
    // The state entering the chunk, (p, s) at (j, k).
    let b_at = ((t.c * p.nh + t.h) * p.hd + jf) * p.ds + k;
    let b_step = (TH / WK) * p.ds;
#else
    let b_at = b_idx(t.r0 + jf, t.g, k);
    let b_step = (TH / WK) * p.cd;
#endif
    for (var e = 0u; e < NB; e++) {
        let cj = jf + e * (TH / WK);
        var v = 0.0;
#if MODE_OUT
        if (!checked || (k < kn && cj < p.hd)) {
            v = states[b_at + e * b_step];
        }
#else
        if (!checked || (k < kn && cj < t.len)) {
            v = xbc[b_at + e * b_step];
        }
#endif
        set_b(&w, e, v);
    }
    return w;
}

fn put(t: Tile, phase: u32, k0: u32, kn: u32, th: u32, w: Raw, checked: bool) {
    let kk = th % WK;
    let k = k0 + kk;
    for (var e = 0u; e < NA; e++) {
        let i = th / WK + e * (TH / WK);
        var v = w.a1[e % 4u];
        if (e < 4u) {
            v = w.a0[e];
        }
#if MODE_OUT
        // Phase 1: A = CB[i, k] exp(dA_i - dA_k) dt_k for k <= i, zero above (where the exp
        // may overflow: the select drops it).
        if (phase == 1u) {
            let ok = (!checked || (k < kn && t.i0 + i < t.len)) && k <= t.i0 + i;
            v = select(0.0, v * (exp(cum_i[i] - w.ck) * w.dk), ok);
        }
#endif
        at[kk * AROW + i / 4u][i % 4u] = v;
    }
#if MODE_OUT
    if (phase == 1u) {
        let j = th % TJ;
        for (var e = 0u; e < NB; e++) {
            let kj = th / TJ + e * (TH / TJ);
            bt[kj * BROW + j / 4u][j % 4u] = get_b(w, e);
        }
        return;
    }
#endif
    for (var e = 0u; e < NB; e++) {
        let j = th / WK + e * (TH / WK);
        bt[kk * BROW + j / 4u][j % 4u] = get_b(w, e);
    }
}
#endif

#if V4
// Row i, columns j..j+3 of the tile, as one vector (rows are whole vectors: j + 3 is inside
// whenever j is).
fn store4(t: Tile, i: u32, j: u32, v: vec4<f32>) {
    let ti = t.i0 + i;
    let tj = t.j0 + j;
#if MODE_STATES
    let cpg = group_channels();
    if (ti < cpg && tj < p.ds) {
        states[((t.c * p.nh * p.hd + t.g * cpg + ti) * p.ds + tj) / 4u] = v;
    }
#else
    if (ti < t.len && tj < p.hd) {
        let r = t.r0 + ti;
        let xa = r * p.cd + t.h * p.hd + tj;
        let x = vec4<f32>(xbc[xa], xbc[xa + 1u], xbc[xa + 2u], xbc[xa + 3u]);
        var dv = vec4<f32>(heads[2u * p.nh + t.h]);
        if (p.d_hdim != 0u) {
            let d = 2u * p.nh + t.h * p.hd + tj;
            dv = vec4<f32>(heads[d], heads[d + 1u], heads[d + 2u], heads[d + 3u]);
        }
        y[(r * p.nh * p.hd + t.h * p.hd + tj) / 4u] = fma(dv, x, v);
    }
#endif
}
#else
fn store(t: Tile, i: u32, j: u32, v: f32) {
#if MODE_CB
    if (i < p.q && j < p.q) {
        cb[((t.c * p.ng + t.g) * p.q + i) * p.q + j] = v;
    }
#else
#if MODE_STATES
    let cpg = group_channels();
    if (i < cpg && j < p.ds) {
        states[(t.c * p.nh * p.hd + t.g * cpg + i) * p.ds + j] = v;
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

// Row i, columns j..j+3 of the tile.
fn store4(t: Tile, i: u32, j: u32, v: vec4<f32>) {
    for (var f = 0u; f < 4u; f++) {
        store(t, t.i0 + i, t.j0 + j + f, v[f]);
    }
}
#endif

#if MODE_CB
// The chunks' dt, run by the first workgroups of the C B^T dispatch (which does not need it, so
// that the two overlap): a workgroup per (chunk, DT_HEADS heads) computes dt = softplus(dt +
// dt_bias) clamped, dA = cumsum(dt * A) over the chunk, each row's weight exp(dA_last - dA_r) dt_r
// in the chunk's own state, and the chunk's decay exp(dA_last). A serial scan over a chunk's rows
// is a chain of dependent loads and exps, so each head's rows are cut into DT_SEGS segments,
// scanned by a thread each, then offset by the sums of the segments before them.
// DT_SEGS: a define (the host counts the workgroups).
const DT_HEADS: u32 = TH / DT_SEGS;

var<workgroup> seg_sums: array<f32, TH>;  // (segment, head)

fn chunk_dt(gid: u32, th: u32) {
    let blocks = (p.nh + DT_HEADS - 1u) / DT_HEADS;
    let c = gid / blocks;
    // Consecutive threads on consecutive heads: they read a row's dt values together.
    let hl = th % DT_HEADS;
    let h = (gid % blocks) * DT_HEADS + hl;
    let seg = th / DT_HEADS;
    let r0 = u32(chunk_rows[c]);
    let len = u32(chunk_rows[c + 1u]) - r0;
    let per = (len + DT_SEGS - 1u) / DT_SEGS;
    let lo = r0 + min(seg * per, len);
    let hi = r0 + min(seg * per + per, len);
    let live = h < p.nh;
    var acc = 0.0;
    if (live) {
        let a = -exp(heads[p.nh + h]);
        for (var r = lo; r < hi; r++) {
            let d = dt_of(zxbcdt[r * p.dip + p.dt_col + h], h);
            acc += d * a;
            dt[r * p.nh + h] = d;
            cum[r * p.nh + h] = acc;
        }
    }
    seg_sums[th] = acc;
    workgroupBarrier();
    // Summed in segment order, so that `total` is exactly the last row's dA.
    var before = 0.0;
    var total = 0.0;
    for (var s = 0u; s < DT_SEGS; s++) {
        let v = seg_sums[s * DT_HEADS + hl];
        before += select(0.0, v, s < seg);
        total += v;
    }
    if (!live) {
        return;
    }
    for (var r = lo; r < hi; r++) {
        let cm = cum[r * p.nh + h] + before;
        cum[r * p.nh + h] = cm;
        decay[r * p.nh + h] = exp(total - cm) * dt[r * p.nh + h];
    }
    if (seg == 0u) {
        decay[(p.rows + c) * p.nh + h] = exp(total);
    }
}
#endif

// The thread's outputs: rows row_a.. and row_b.., four each, columns tx*4.. (tx = th % 16), as
// one vec4 per row in registers (no private arrays: drivers spill those).
struct Acc {
    c0: vec4<f32>,
    c1: vec4<f32>,
    c2: vec4<f32>,
    c3: vec4<f32>,
    c4: vec4<f32>,
    c5: vec4<f32>,
    c6: vec4<f32>,
    c7: vec4<f32>,
}

// The products of one k of a step staged in workgroup memory: 3 vector reads for 32 FMAs.
fn product(acc: ptr<function, Acc>, kk: u32, tx: u32, ra: u32, rb: u32) {
    let a0 = at[kk * AROW + ra];
    let a1 = at[kk * AROW + rb];
    let b = bt[kk * BROW + tx];
    (*acc).c0 = fma(vec4<f32>(a0.x), b, (*acc).c0);
    (*acc).c1 = fma(vec4<f32>(a0.y), b, (*acc).c1);
    (*acc).c2 = fma(vec4<f32>(a0.z), b, (*acc).c2);
    (*acc).c3 = fma(vec4<f32>(a0.w), b, (*acc).c3);
    (*acc).c4 = fma(vec4<f32>(a1.x), b, (*acc).c4);
    (*acc).c5 = fma(vec4<f32>(a1.y), b, (*acc).c5);
    (*acc).c6 = fma(vec4<f32>(a1.z), b, (*acc).c6);
    (*acc).c7 = fma(vec4<f32>(a1.w), b, (*acc).c7);
}

// The thread's first rows of c0..c3 and of c4..c7: each warp of 32 threads holds 16 consecutive
// rows (so that whole warps skip the k steps past their rows in the chunk outputs' diagonal
// tiles), its half-warps rows 4..7 apart.
fn row_a(th: u32) -> u32 {
    return (th / 32u) * 16u + ((th / 16u) % 2u) * 4u;
}

fn row_b(th: u32) -> u32 {
    return row_a(th) + 8u;
}

// A step's products, written out k by k (WK of them): the driver's loop unrolled by five measured
// ~1 % slower.
fn products(acc: ptr<function, Acc>, th: u32) {
    let tx = th % 16u;
    let ra = row_a(th) / 4u;
    let rb = row_b(th) / 4u;
    product(acc, 0u, tx, ra, rb);
    product(acc, 1u, tx, ra, rb);
    product(acc, 2u, tx, ra, rb);
    product(acc, 3u, tx, ra, rb);
    product(acc, 4u, tx, ra, rb);
    product(acc, 5u, tx, ra, rb);
    product(acc, 6u, tx, ra, rb);
    product(acc, 7u, tx, ra, rb);
    product(acc, 8u, tx, ra, rb);
    product(acc, 9u, tx, ra, rb);
    product(acc, 10u, tx, ra, rb);
    product(acc, 11u, tx, ra, rb);
    product(acc, 12u, tx, ra, rb);
    product(acc, 13u, tx, ra, rb);
    product(acc, 14u, tx, ra, rb);
    product(acc, 15u, tx, ra, rb);
}

// The k steps of one phase of the product.
fn steps(t: Tile, phase: u32, th: u32, checked: bool, acc: ptr<function, Acc>) {
    let kn = k_extent(t, phase);
#if MODE_STATES
    for (var k0 = 0u; k0 < kn; k0 += WK) {
        fill(t, k0, kn, th, checked);
        workgroupBarrier();
        products(acc, th);
        workgroupBarrier();
    }
#else
    var raw = fetch(t, phase, 0u, kn, th, checked);
    for (var k0 = 0u; k0 < kn; k0 += WK) {
        put(t, phase, k0, kn, th, raw, checked);
        workgroupBarrier();
        if (k0 + WK < kn) {
            raw = fetch(t, phase, k0 + WK, kn, th, checked);
        }
        // Phase 1: rows before k0 have nothing from this step (k > i). Exact per thread whatever
        // the subgroup size; saves work where a warp of 32 holds only such rows.
        if (phase == 0u || k0 <= t.i0 + (th / 32u) * 16u + 15u) {
            products(acc, th);
        }
        workgroupBarrier();
    }
#endif
}

@compute @workgroup_size(TH, 1, 1)
fn ssd_mm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let gid = wid.x + wid.y * nwg.x;
#if MODE_CB
    // The first dt_groups workgroups compute the chunks' dt, the rest C B^T.
    if (gid < p.dt_groups) {
        chunk_dt(gid, lid.x);
        return;
    }
    let tile = gid - p.dt_groups;
#else
    let tile = gid;
#endif
    if (tile >= p.count) {
        return;
    }
    let t = tile_of(tile);
    if (idle(t)) {
        return;
    }
    let full = is_full(t);
    let th = lid.x;
    let tx = th % 16u;  // columns tx*4..tx*4+3
    let ra = row_a(th);
    let rb = row_b(th);
#if MODE_OUT
    if (th < TI) {
        var v = 0.0;
        if (t.i0 + th < t.len) {
            v = cum[(t.r0 + t.i0 + th) * p.nh + t.h];
        }
        cum_i[th] = v;
    }
    workgroupBarrier();
#endif
    var acc: Acc;
#if MODE_OUT
    // Each (phase, full) its own call with constants: a phase chosen at run time left a branch
    // per element in the driver's code.
    if (full) {
        steps(t, 0u, th, false, &acc);
    } else {
        steps(t, 0u, th, true, &acc);
    }
    // The inter-chunk term is exp(dA_i) (C_i . s_in): the factor once per output row.
    acc.c0 *= exp(cum_i[ra]);
    acc.c1 *= exp(cum_i[ra + 1u]);
    acc.c2 *= exp(cum_i[ra + 2u]);
    acc.c3 *= exp(cum_i[ra + 3u]);
    acc.c4 *= exp(cum_i[rb]);
    acc.c5 *= exp(cum_i[rb + 1u]);
    acc.c6 *= exp(cum_i[rb + 2u]);
    acc.c7 *= exp(cum_i[rb + 3u]);
    if (full) {
        steps(t, 1u, th, false, &acc);
    } else {
        steps(t, 1u, th, true, &acc);
    }
#else
    if (full) {
        steps(t, 0u, th, false, &acc);
    } else {
        steps(t, 0u, th, true, &acc);
    }
#endif
    store4(t, ra, tx * 4u, acc.c0);
    store4(t, ra + 1u, tx * 4u, acc.c1);
    store4(t, ra + 2u, tx * 4u, acc.c2);
    store4(t, ra + 3u, tx * 4u, acc.c3);
    store4(t, rb, tx * 4u, acc.c4);
    store4(t, rb + 1u, tx * 4u, acc.c5);
    store4(t, rb + 2u, tx * 4u, acc.c6);
    store4(t, rb + 3u, tx * 4u, acc.c7);
}
#endif
