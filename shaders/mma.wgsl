// out (rows, n) = x (rows, k) . w^T + bias on cooperative matrices (tensor cores): 16x16x16 f16
// products accumulated in f32. The weights are f16 (16-bit checkpoints converted once at upload:
// bf16 values are exact in f16 but for those below f16's normal range, which move by at most
// 3e-8), stored (n, k) with rows padded to a multiple of 32 values and n to a multiple of 128.
//
// f16 alone would lose f32's accuracy, so mma_split writes each row of x scaled by a power of
// two s_r (its largest value just under 2^15) as two f16 parts, hi = x s_r with 11 significant
// bits (cut by a mask, so no conversion rounding is involved) and lo = x s_r - hi: every product
// hi.w + lo.w is exact and the sum is x.w s_r to about 2^-21 of the row's largest value, which
// the epilogue divides out. Split over k (DIRECT), each split stores its raw partial products,
// followed by the row scales, and the summing pass (matmul_sum, or conv_update for in_proj in
// decode) divides. k is the padded row length, `rows` the real rows (mma_split pads x with zero
// rows to whole tiles of TR rows, one workgroup per row). mma_split's GATE variant splits
// out_proj's input computed on the way, the gate and group RMSNorm of the scan's output (no pass
// of its own).

struct Params {
    rows: u32,
    n: u32,
    k: u32,
    row_words: u32,
    has_bias: u32,
    tiles_n: u32,
    groups: u32,
    k_per: u32,
    splits: u32,
    // x's own row length (k unpadded).
    x_k: u32,
    // GATE: zxbcdt's row width, groups, norm_before_gate, has_norm, eps.
    dip: u32,
    ng: u32,
    before: u32,
    has_norm: u32,
    eps: f32,
    // DIRECT: the partials' row length (n padded to whole tiles).
    np: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Rows of a tile; x's parts are padded with zero rows to whole tiles.
const TR: u32 = 64u;
// k per step of the products. x's parts are stored as the products read them, one block per row
// tile and step: its TR hi rows, then its TR lo rows, KS values each, so a step's loads are one
// contiguous run.
const KS: u32 = 32u;

// Where pair `i` (values 2i, 2i + 1) of row r's hi part lies in the parts (u32 units; the lo
// part's pair follows TR rows later).
fn pair_at(r: u32, i: u32) -> u32 {
    let block = (r / TR) * (p.k / KS) + i / (KS / 2u);
    return (block * 2u * TR + r % TR) * (KS / 2u) + i % (KS / 2u);
}

fn padded_rows() -> u32 {
    return (p.rows + TR - 1u) / TR * TR;
}
#if SPLIT
@group(0) @binding(1) var<storage, read> x: array<f32>;
// Pairs of f16 in blocks (pair_at).
@group(0) @binding(2) var<storage, read_write> parts: array<u32>;
@group(0) @binding(3) var<storage, read_write> scale: array<f32>;
#if GATE
@group(0) @binding(4) var<storage, read> zxbcdt: array<f32>;
@group(0) @binding(5) var<storage, read> norm_w: array<f32>;
#endif
#else
@group(0) @binding(1) var<storage, read> parts: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> scale: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
#if DIRECT
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;
#else
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
#endif
#endif

#if SPLIT
// One partial per subgroup.
var<workgroup> peak: array<f32, ST>;

// The workgroup's maximum (op 0) or sum (op 1) of v, in every thread.
fn reduce(v: f32, op: u32, sg: u32, lane: u32, nsg: u32) -> f32 {
    var s = subgroupAdd(v);
    if (op == 0u) {
        s = subgroupMax(v);
    }
    workgroupBarrier();
    if (lane == 0u) {
        peak[sg] = s;
    }
    workgroupBarrier();
    var total = peak[0];
    for (var i = 1u; i < nsg; i++) {
        if (op == 0u) {
            total = max(total, peak[i]);
        } else {
            total += peak[i];
        }
    }
    return total;
}

#if GATE
// GATE: x is the scan's y, and the row split is gated_norm.wgsl's output, computed here:
// norm_before_gate = 0: rmsnorm_g(y silu(z)) w;  1: rmsnorm_g(y) w silu(z);  no norm: y silu(z).
var<workgroup> inv: array<f32, 256>;

fn silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}
#endif

// The row's value at k (0 past x_k); GATE: the value that the norm sees, and in `gate` the gate
// applied after the norm (1 where none is).
fn load(r: u32, k: u32, gate: ptr<function, f32>) -> f32 {
    *gate = 1.0;
    if (k >= p.x_k) {
        return 0.0;
    }
    let v = x[r * p.x_k + k];
#if GATE
    let g = silu(zxbcdt[r * p.dip + k]);
    if (p.before == 0u || p.has_norm == 0u) {
        return v * g;
    }
    *gate = g;
#endif
    return v;
}

// One workgroup of ST threads per padded row, each holding NV pairs of the row's values in
// registers: all loads are issued at once and the row is read once (H200, 2.7b batch 64,
// out_proj's split: 28.1 us with 256 threads looping over the row three times, 17.7 with 1024,
// 14.6 with 1024 holding it).
@compute @workgroup_size(ST, 1, 1)
fn mma_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>,
             @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
             @builtin(num_subgroups) nsg: u32) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.groups) {
        return;
    }
    let t = lid.x;
    let live = r < p.rows;
    let half = p.k / 2u;
    // Pair j: values k = 2 (t + ST j) and the next.
    var v: array<vec2<f32>, NV>;
#if GATE
    var gate: array<vec2<f32>, NV>;
#endif
    for (var j = 0u; j < NV; j++) {
        let k = 2u * (t + ST * j);
        var g0 = 1.0;
        var g1 = 1.0;
        if (live) {
            v[j] = vec2<f32>(load(r, k, &g0), load(r, k + 1u, &g1));
        } else {
            v[j] = vec2<f32>(0.0);
        }
#if GATE
        gate[j] = vec2<f32>(g0, g1);
#endif
    }
#if GATE
    // The group factors 1 / rms (uniform loop: p.ng <= 256, checked by the host).
    if (p.has_norm != 0u) {
        let gs = p.x_k / p.ng;
        for (var g = 0u; g < p.ng; g++) {
            var acc = 0.0;
            for (var j = 0u; j < NV; j++) {
                let k = 2u * (t + ST * j);
                let a = select(0.0, v[j].x, k / gs == g);
                let b = select(0.0, v[j].y, (k + 1u) / gs == g);
                acc = fma(a, a, fma(b, b, acc));
            }
            let total = reduce(acc, 1u, sg, lane, nsg);
            if (t == 0u) {
                inv[g] = inverseSqrt(total / f32(gs) + p.eps);
            }
        }
        workgroupBarrier();
        for (var j = 0u; j < NV; j++) {
            let k = 2u * (t + ST * j);
            if (k < p.x_k) {
                v[j].x *= inv[k / gs] * norm_w[k] * gate[j].x;
            }
            if (k + 1u < p.x_k) {
                v[j].y *= inv[(k + 1u) / gs] * norm_w[k + 1u] * gate[j].y;
            }
        }
    }
#endif
    var m = 0.0;
    for (var j = 0u; j < NV; j++) {
        m = max(m, max(abs(v[j].x), abs(v[j].y)));
    }
    let top = reduce(m, 0u, sg, lane, nsg);
    // 2^(141 - e) for a peak in [2^(e-127), 2^(e-126)): the scaled peak stays below 2^15.
    let e = (bitcast<u32>(top) >> 23u) & 0xffu;
    let s = bitcast<f32>(u32(clamp(268 - i32(e), 1, 254)) << 23u);
    if (t == 0u) {
        scale[r] = s;
    }
    for (var j = 0u; j < NV; j++) {
        let i = t + ST * j;
        if (i < half) {
            let u = v[j] * s;
            // 11 significant bits: exact in f16 for the scaled range (below 2^15; values under
            // f16's normal range round, by at most 2^-25, negligible beside the row's peak).
            let hi = bitcast<vec2<f32>>(bitcast<vec2<u32>>(u) & vec2<u32>(0xffffe000u));
            let at = pair_at(r, i);
            parts[at] = pack2x16float(hi);
            parts[at + TR * KS / 2u] = pack2x16float(u - hi);
        }
    }
}
#else

// 16x16 fragments: the hardware's own (NVIDIA), or (F8) each made of 2x2 8x8 matrices where the
// adapter offers only those (Mesa 26's lavapipe).
#if F8
alias M8A = coop_mat8x8<f16, A>;
alias M8B = coop_mat8x8<f16, B>;
alias M8C = coop_mat8x8<f32, C>;
struct FragA {
    m00: M8A,
    m01: M8A,
    m10: M8A,
    m11: M8A,
}
struct FragB {
    m00: M8B,
    m01: M8B,
    m10: M8B,
    m11: M8B,
}
struct Acc {
    m00: M8C,
    m01: M8C,
    m10: M8C,
    m11: M8C,
}

// 16 rows by 16 of k of x's block (xa: row-major, k contiguous) from element `at`.
fn load_a(at: u32) -> FragA {
    return FragA(coopLoadT<M8A>(&xa[at / 4u], LV), coopLoadT<M8A>(&xa[(at + 8u) / 4u], LV),
                 coopLoadT<M8A>(&xa[(at + 8u * LD) / 4u], LV),
                 coopLoadT<M8A>(&xa[(at + 8u * LD + 8u) / 4u], LV));
}

// 16 of k by 16 columns of the weights (wb: column j is weight row j, its k contiguous).
fn load_b(at: u32) -> FragB {
    return FragB(coopLoad<M8B>(&wb[at / 4u], LV), coopLoad<M8B>(&wb[(at + 8u * LD) / 4u], LV),
                 coopLoad<M8B>(&wb[(at + 8u) / 4u], LV),
                 coopLoad<M8B>(&wb[(at + 8u * LD + 8u) / 4u], LV));
}

fn madd(a: FragA, b: FragB, c: Acc) -> Acc {
    return Acc(coopMultiplyAdd(a.m01, b.m10, coopMultiplyAdd(a.m00, b.m00, c.m00)),
               coopMultiplyAdd(a.m01, b.m11, coopMultiplyAdd(a.m00, b.m01, c.m01)),
               coopMultiplyAdd(a.m11, b.m10, coopMultiplyAdd(a.m10, b.m00, c.m10)),
               coopMultiplyAdd(a.m11, b.m11, coopMultiplyAdd(a.m10, b.m01, c.m11)));
}

// Row-major, 4 vectors to a row, into `staged` from vector `at`.
fn store_c(c: Acc, at: u32) {
    coopStoreT(c.m00, &staged[at], 4u);
    coopStoreT(c.m01, &staged[at + 2u], 4u);
    coopStoreT(c.m10, &staged[at + 32u], 4u);
    coopStoreT(c.m11, &staged[at + 34u], 4u);
}
#else
alias FragA = coop_mat16x16<f16, A>;
alias FragB = coop_mat16x16<f16, B>;
alias Acc = coop_mat16x16<f32, C>;

fn load_a(at: u32) -> FragA {
    return coopLoadT<FragA>(&xa[at / 4u], LV);
}

fn load_b(at: u32) -> FragB {
    return coopLoad<FragB>(&wb[at / 4u], LV);
}

fn madd(a: FragA, b: FragB, c: Acc) -> Acc {
    return coopMultiplyAdd(a, b, c);
}

fn store_c(c: Acc, at: u32) {
    coopStoreT(c, &staged[at], 4u);
}
#endif

// A workgroup is WR x WC subgroups of SG lanes (32 on NVIDIA), each a block of 32 rows x 32 columns
// (2x2 matrices of 16x16): tiles of TR x TC outputs, k in steps of 32 through workgroup memory (x's
// hi rows, then its lo rows, and the weight rows, each padded from 32 values to 40 against bank
// conflicts), STEPS steps loaded at once. The loads bound these products: NVIDIA's driver puts all
// of a thread's loads on one scoreboard and waits for all of them at their first use, so each round
// trip to memory is paid per batch of loads (register prefetch of the next step gained nothing),
// and only registers grow the batch; blocks of 32x32 leave room for three steps (120 registers, two
// workgroups of 256 threads a multiprocessor; a fourth step would leave one). H200, 2.7b, against
// 2x2 subgroups of 32x64 loading one step at a time: batch 64 in_proj 54.2 -> 44.4 us, out_proj
// 36.0 -> 29.5; prefill 2048 1132 -> 956 and 578 -> 468 (BENCHMARKS.md, sixth session).
const WR: u32 = 2u;
const WC: u32 = 4u;  // (TR = 32 WR)
const THREADS: u32 = SG * WR * WC;
const TC: u32 = 32u * WC;
const LD: u32 = 40u;
// Rows of a step that the threads move at once: 8 vectors of 4 f16 each.
const STRIDE: u32 = THREADS / 8u;
// Vectors a thread loads for one k step; k steps loaded at once (v0, v1, v2 in `mma`).
const LOADS: u32 = (2u * TR + TC) / STRIDE;
const STEPS: u32 = 3u;

// Vectors of 4 f16, so that staging stores 4 values at once (the matrices' loads count their
// strides in vectors: LV of them to a row).
const LV: u32 = LD / 4u;
var<workgroup> xa: array<vec4<f16>, 2u * TR * LV>;
var<workgroup> wb: array<vec4<f16>, TC * LV>;
// Accumulators on their way out, one per subgroup of OUT_SGS at a time (the eight subgroups take
// turns). The workgroup memory stays at 24 KB: with room for all eight (28 KB) in_proj took 63.6
// us instead of 45.8 (H200, 2.7b batch 64), although two workgroups a multiprocessor fit either
// way; 28 or 32 KB had sunk earlier designs the same way (k steps of 64, tiles of 256 columns,
// double-buffered staging).
const OUT_SGS: u32 = 4u;
var<workgroup> staged: array<vec4<f32>, 64u * OUT_SGS>;

#if DIRECT
// One accumulator (rows r0.., columns j0..) of a split-K partial from `staged`, stored as it is:
// rows padded to whole tiles, p.np values to a row, the row scales divided out by the summing
// pass. Through workgroup memory so that whole 16-byte vectors go out, 4 lanes to a row (the
// accumulator's own stores to memory were 4-byte and half a sector each: H200, 2.7b batch 64,
// in_proj 57.5 -> 54.5 us, out_proj 39.3 -> 36.9; the epilogue alone 8.3 -> 2.3).
fn emit_one(base: u32, lane: u32, r0: u32, j0: u32, at: u32) {
    for (var m = 0u; m < 64u / SG; m++) {
        let e = lane + m * SG;
        out[(at + (r0 + e / 4u) * p.np + j0) / 4u + e % 4u] = staged[base + e];
    }
}
#else
// One accumulator (rows r0.., columns j0..) from `staged`: the lane's 256 / SG of its 256 values,
// divided by the row scale, plus the bias.
fn emit_one(base: u32, lane: u32, r0: u32, j0: u32, at: u32) {
    for (var m = 0u; m < 256u / SG; m++) {
        let e = lane + m * SG;
        let r = r0 + e / 16u;
        let j = j0 + e % 16u;
        if (r < p.rows && j < p.n) {
            var o = staged[base + e / 4u][e % 4u] / scale[r];
            if (p.has_bias != 0u) {
                o += bias[j];
            }
            out[at + r * p.n + j] = o;
        }
    }
}
#endif

// Every subgroup's accumulator c (rows r0.., columns j0..) out, in turns of OUT_SGS subgroups.
fn emit(c: Acc, sg: u32, lane: u32, r0: u32, j0: u32, at: u32) {
    for (var turn = 0u; turn < WR * WC / OUT_SGS; turn++) {
        let mine = sg / OUT_SGS == turn;
        let base = (sg % OUT_SGS) * 64u;
        if (mine) {
            store_c(c, base);
        }
        workgroupBarrier();
        if (mine) {
            emit_one(base, lane, r0, j0, at);
        }
        workgroupBarrier();
    }
}

// A subgroup's 32x32 block.
struct Block {
    c00: Acc,
    c01: Acc,
    c10: Acc,
    c11: Acc,
}

// The thread's share of k step k: x's parts, then the weights.
fn fetch(k: u32, xb: u32, j0: u32, kv: u32, row: u32, c: u32) -> array<vec4<f16>, LOADS> {
    var v: array<vec4<f16>, LOADS>;
    let xv = (xb + k / KS) * 2u * TR * (KS / 4u) + c;
    for (var i = 0u; i < 2u * TR / STRIDE; i++) {
        v[i] = parts[xv + (row + STRIDE * i) * (KS / 4u)];
    }
    for (var i = 0u; i < TC / STRIDE; i++) {
        v[2u * TR / STRIDE + i] = w[(j0 + row + STRIDE * i) * kv + k / 4u + c];
    }
    return v;
}

// One k step through workgroup memory (once the previous step's reads are done) into a
// subgroup's block at rows sa, columns sb of the tile.
fn staged_step(a: Block, v: array<vec4<f16>, LOADS>, row: u32, c: u32, sa: u32, sb: u32) -> Block {
    workgroupBarrier();
    for (var i = 0u; i < 2u * TR / STRIDE; i++) {
        xa[(row + STRIDE * i) * LV + c] = v[i];
    }
    for (var i = 0u; i < TC / STRIDE; i++) {
        wb[(row + STRIDE * i) * LV + c] = v[2u * TR / STRIDE + i];
    }
    workgroupBarrier();
    var o = a;
    for (var ks = 0u; ks < KS; ks += 16u) {
        let h0 = load_a(sa * LD + ks);
        let h1 = load_a((sa + 16u) * LD + ks);
        let l0 = load_a((TR + sa) * LD + ks);
        let l1 = load_a((TR + sa + 16u) * LD + ks);
        let b0 = load_b(sb * LD + ks);
        let b1 = load_b((sb + 16u) * LD + ks);
        o.c00 = madd(l0, b0, madd(h0, b0, o.c00));
        o.c01 = madd(l0, b1, madd(h0, b1, o.c01));
        o.c10 = madd(l1, b0, madd(h1, b0, o.c10));
        o.c11 = madd(l1, b1, madd(h1, b1, o.c11));
    }
    return o;
}

@compute @workgroup_size(THREADS, 1, 1)
fn mma(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_id) lid: vec3<u32>,
       @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let g = wid.x + wid.y * nwg.x;
    if (g >= p.groups) {
        return;
    }
    let tiles = p.groups / p.splits;
    let split = g / tiles;
    let r0 = (g % tiles / p.tiles_n) * TR;
    let j0 = (g % p.tiles_n) * TC;
    // The subgroup's block within the tile.
    let sa = (sg / WC) * 32u;
    let sb = (sg % WC) * 32u;
    let k_start = split * p.k_per;
    let k_end = min(p.k, k_start + p.k_per);
    // Weight vectors per row; x's first block of the row tile.
    let kv = p.k / 4u;
    let xb = (r0 / TR) * (p.k / KS);
    // Each thread moves vector c of rows `row` + STRIDE i of each step. Eight threads fill a
    // row; the two eights of a half-warp take rows four apart (4 LD values: 64 bytes apart in the
    // banks), which store without bank conflicts where adjacent rows (LD apart) would collide.
    // With x in blocks, H200, 2.7b prefill 2048: in_proj 1224 -> 1128 us, out_proj 629 -> 572.
    let eight = lid.x / 8u;
    var row = eight;
    if (STRIDE % 8u == 0u) {
        row = eight / 8u * 8u + eight % 4u / 2u + eight / 4u % 2u * 2u + eight % 2u * 4u;
    }
    let c = lid.x % 8u;
    var acc = Block(Acc(), Acc(), Acc(), Acc());
    for (var k = k_start; k < k_end; k += STEPS * KS) {
        // STEPS k steps loaded at once, all unconditionally (past the end, the first again): a
        // branch would end one step's loads before the next one's start.
        let v0 = fetch(k, xb, j0, kv, row, c);
        let v1 = fetch(select(k, k + KS, k + KS < k_end), xb, j0, kv, row, c);
        let v2 = fetch(select(k, k + 2u * KS, k + 2u * KS < k_end), xb, j0, kv, row, c);
        acc = staged_step(acc, v0, row, c, sa, sb);
        if (k + KS < k_end) {
            acc = staged_step(acc, v1, row, c, sa, sb);
        }
        if (k + 2u * KS < k_end) {
            acc = staged_step(acc, v2, row, c, sa, sb);
        }
    }
    let at = split * padded_rows() * p.np;
#if DIRECT
    // The row scales after the partials, for the summing pass (one binding fewer there).
    if (split == 0u && j0 == 0u) {
        for (var i = lid.x; i < TR / 4u; i += THREADS) {
            let r = r0 + 4u * i;
            out[(p.splits * padded_rows() * p.np + r) / 4u] =
                vec4<f32>(scale[r], scale[r + 1u], scale[r + 2u], scale[r + 3u]);
        }
    }
#endif
    let rr = r0 + sa;
    let cc = j0 + sb;
    emit(acc.c00, sg, lane, rr, cc, at);
    emit(acc.c01, sg, lane, rr, cc + 16u, at);
    emit(acc.c10, sg, lane, rr + 16u, cc, at);
    emit(acc.c11, sg, lane, rr + 16u, cc + 16u, at);
}
#endif
