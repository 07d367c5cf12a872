// The causal depthwise conv + SiLU over packed sequences (conv_seq), the states it leaves
// (conv_snap: at snapshot positions; conv_final: at each sequence's end, into its slot), and the
// decode update over one or more tokens per request (conv_update; PARTS: it also sums in_proj's
// split-K partials, so decode batches need no summing pass of their own; SCALED: mma.wgsl's,
// whose row scales follow them). Defines: DC, the conv width, and (PARTS) SPLITS, the partials:
// constants, so that the loops over them have fixed counts and their loads go out together
// (H200, 2.7b batch 64: conv_update 19.6 -> 15.0 us).

struct Params {
    rows: u32,      // rows of this pass
    cd: u32,        // conv channels
    dip: u32,       // in_proj row width
    off: u32,       // column of xBC in an in_proj row
    seqs: u32,      // sequences (or requests)
    has_bias: u32,
    count: u32,     // threads that do work
    nsnaps: u32,
    stride: u32,    // intermediate entries per record index
    has_in_bias: u32,  // PARTS: in_proj's bias
    part_row: u32,     // PARTS: the partials' row length and split length (values)
    part_len: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> zxbcdt: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> cu: array<i32>;
@group(0) @binding(5) var<storage, read> slots: array<i32>;
@group(0) @binding(6) var<storage, read_write> pool: array<f32>;
@group(0) @binding(7) var<storage, read_write> xbc: array<f32>;
// (seq, pos, chunk, dest) per snapshot; for conv_update: cu (n + 1) | slots (n) | record (n).
@group(0) @binding(8) var<storage, read> info: array<i32>;
@group(0) @binding(9) var<storage, read_write> saved: array<f32>;
#if PARTS
@group(0) @binding(10) var<storage, read> in_bias: array<f32>;
#endif

const MAX_DC: u32 = 8u;

fn silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * 64u + lid.x;
}

// The sequence that owns row r: the last s with cu[s] <= r.
fn seq_of(r: u32) -> u32 {
    var lo = 0u;
    var hi = p.seqs;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (u32(cu[mid]) <= r) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

fn bias_of(c: u32) -> f32 {
    if (p.has_bias != 0u) {
        return bias[c];
    }
    return 0.0;
}

// Column i (0..dc) of the state after `pos` tokens of sequence s: the last dc columns of
// [the slot's old state | the sequence's xBC columns].
fn state_col(s: u32, pos: u32, c: u32, i: u32) -> f32 {
    let e = pos + i;
    if (e >= DC) {
        return zxbcdt[(u32(cu[s]) + e - DC) * p.dip + p.off + c];
    }
    let slot = slots[s];
    if (slot < 0) {
        return 0.0;
    }
    return pool[(u32(slot) * p.cd + c) * DC + e];
}

// A thread per (block of RB rows, conv channel; RB a define): each input is read once into the
// window of the last DC inputs, not DC times (H200, 2.7b prefill 2048: a row a thread, 129 us;
// 8 rows, 43).
@compute @workgroup_size(64, 1, 1)
fn conv_seq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let c = id % p.cd;
    let first = id / p.cd * RB;
    let last = min(first + RB, p.rows);
    var wt: Window;
    for (var j = 0u; j < DC; j++) {
        wt = push(wt, weight[c * DC + j]);
    }
    let b = bias_of(c);
    var s = seq_of(first);
    var win: Window;
    for (var r = first; r < last; r++) {
        var fresh = r == first;
        while (s + 1u < p.seqs && r >= u32(cu[s + 1u])) {
            s += 1u;
            fresh = true;
        }
        if (fresh) {
            // A new window: the DC - 1 inputs before r, rows of its sequence or columns of the
            // sequence's old state.
            let start = u32(cu[s]);
            for (var j = 0u; j + 1u < DC; j++) {
                let src = i32(r + j + 1u) - i32(DC);
                var v = 0.0;
                if (src >= i32(start)) {
                    v = zxbcdt[u32(src) * p.dip + p.off + c];
                } else {
                    v = state_col(s, 0u, c, u32(i32(DC) + src - i32(start)));
                }
                win = push(win, v);
            }
        }
        win = push(win, zxbcdt[r * p.dip + p.off + c]);
        xbc[r * p.cd + c] = silu(dot(win.lo, wt.lo) + dot(win.hi, wt.hi) + b);
    }
}

@compute @workgroup_size(64, 1, 1)
fn conv_snap(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let k = id / p.cd;
    let c = id % p.cd;
    let s = u32(info[k * 4u]);
    let pos = u32(info[k * 4u + 1u]);
    let dest = u32(info[k * 4u + 3u]);
    for (var i = 0u; i < DC; i++) {
        saved[(dest * p.cd + c) * DC + i] = state_col(s, pos, c, i);
    }
}

@compute @workgroup_size(64, 1, 1)
fn conv_final(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
    let s = id / p.cd;
    let c = id % p.cd;
    let slot = slots[s];
    if (slot < 0) {
        return;
    }
    let len = u32(cu[s + 1u] - cu[s]);
    // Read every column first: the new state may take columns of the old one.
    var col: array<f32, MAX_DC>;
    for (var i = 0u; i < DC; i++) {
        col[i] = state_col(s, len, c, i);
    }
    for (var i = 0u; i < DC; i++) {
        pool[(u32(slot) * p.cd + c) * DC + i] = col[i];
    }
}

// The window of the last dc inputs, oldest first, in two vec4 registers (dc <= 8).
struct Window {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// Shifts the window left by one and puts v at position dc - 1.
fn push(w: Window, v: f32) -> Window {
    var n: Window;
    n.lo = vec4<f32>(w.lo.yzw, w.hi.x);
    n.hi = vec4<f32>(w.hi.yzw, 0.0);
    let at = DC - 1u;
    let i = vec4<u32>(0u, 1u, 2u, 3u);
    n.lo = select(n.lo, vec4<f32>(v), i == vec4<u32>(at));
    n.hi = select(n.hi, vec4<f32>(v), i + 4u == vec4<u32>(at));
    return n;
}

fn col(w: Window, j: u32) -> f32 {
    if (j < 4u) {
        return w.lo[j];
    }
    return w.hi[j - 4u];
}

// in_proj's output at (row r, column c): read, or (PARTS) summed from its split-K partials.
fn in_proj_at(r: u32, c: u32) -> f32 {
#if PARTS
    var v = 0.0;
    for (var s = 0u; s < SPLITS; s++) {
        v += zxbcdt[s * p.part_len + r * p.part_row + c];
    }
#if SCALED
    // mma.wgsl's partials end with x's row scales.
    v /= zxbcdt[SPLITS * p.part_len + r];
#endif
    if (p.has_in_bias != 0u) {
        v += in_bias[c];
    }
    return v;
#else
    return zxbcdt[r * p.dip + c];
#endif
}

// A thread per (request, conv channel); PARTS: per (request, in_proj column), those outside xBC
// only summed, and the output is zxbcdt whole (rows, dip) with xBC convolved in place.
@compute @workgroup_size(64, 1, 1)
fn conv_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let id = index(wid, nwg, lid);
    if (id >= p.count) {
        return;
    }
#if PARTS
    let i = id / p.dip;
    let oc = id % p.dip;
    let r0 = u32(info[i]);
    let r1 = u32(info[i + 1u]);
    if (oc < p.off || oc >= p.off + p.cd) {
        for (var r = r0; r < r1; r++) {
            xbc[r * p.dip + oc] = in_proj_at(r, oc);
        }
        return;
    }
    let c = oc - p.off;
    let width = p.dip;
#else
    let i = id / p.cd;
    let c = id % p.cd;
    let r0 = u32(info[i]);
    let r1 = u32(info[i + 1u]);
    let oc = c;
    let width = p.cd;
#endif
    let slot = info[p.seqs + 1u + i];
    let rec = info[2u * p.seqs + 1u + i];
    let at = (u32(max(slot, 0)) * p.cd + c) * DC;
    var win: Window;
    var wt: Window;
    for (var j = 0u; j < DC; j++) {
        var v = 0.0;
        if (slot >= 0) {
            v = pool[at + j];
        }
        win = push(win, v);
        wt = push(wt, weight[c * DC + j]);
    }
    for (var r = r0; r < r1; r++) {
        win = push(win, in_proj_at(r, p.off + c));
        let acc = dot(win.lo, wt.lo) + dot(win.hi, wt.hi) + bias_of(c);
        xbc[r * width + oc] = silu(acc);
        if (rec >= 0) {
            let o = ((u32(rec) * p.stride + (r - r0)) * p.cd + c) * DC;
            for (var j = 0u; j < DC; j++) {
                saved[o + j] = col(win, j);
            }
        }
    }
    if (rec < 0 && slot >= 0) {
        for (var j = 0u; j < DC; j++) {
            pool[at + j] = col(win, j);
        }
    }
}
