// The gate and the group-wise RMSNorm, one workgroup per (row, group):
// norm_before_gate = 0: out = rmsnorm_g(y * silu(z)) * w;  1: out = rmsnorm_g(y) * w * silu(z);
// rmsnorm off (has_norm = 0): out = y * silu(z).

struct Params {
    di: u32,
    dip: u32,
    ng: u32,
    before: u32,
    has_norm: u32,
    eps: f32,
    groups: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> zxbcdt: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

var<workgroup> partial: array<f32, WG>;

fn silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

fn value(r: u32, i: u32) -> f32 {
    let v = y[r * p.di + i];
    if (p.before == 0u) {
        return v * silu(zxbcdt[r * p.dip + i]);
    }
    return v;
}

@compute @workgroup_size(256, 1, 1)
fn gated_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
#if SUBGROUPS
              @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) width: u32,
#endif
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let gid = wid.x + wid.y * nwg.x;
    if (gid >= p.groups) {
        return;
    }
    let t = lid.x;
    let r = gid / p.ng;
    let g = gid % p.ng;
    let gs = p.di / p.ng;
    let i0 = g * gs;
    if (p.has_norm == 0u) {
        for (var i = i0 + t; i < i0 + gs; i += WG) {
            out[r * p.di + i] = y[r * p.di + i] * silu(zxbcdt[r * p.dip + i]);
        }
        return;
    }
    var acc = 0.0;
    for (var i = i0 + t; i < i0 + gs; i += WG) {
        let v = value(r, i);
        acc = fma(v, v, acc);
    }
#if SUBGROUPS
    // Subgroup sums, then one value per subgroup.
    let part = subgroupAdd(acc);
    if (lane == 0u) {
        partial[t / width] = part;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < WG / width; i++) {
        total += partial[i];
    }
#else
    partial[t] = acc;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (t < half) {
            partial[t] += partial[t + half];
        }
        workgroupBarrier();
    }
    let total = partial[0];
#endif
    let inv = inverseSqrt(total / f32(gs) + p.eps);
    for (var i = i0 + t; i < i0 + gs; i += WG) {
        let n = value(r, i) * inv * weight[i];
        if (p.before == 0u) {
            out[r * p.di + i] = n;
        } else {
            out[r * p.di + i] = n * silu(zxbcdt[r * p.dip + i]);
        }
    }
}
