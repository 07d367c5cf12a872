//! Shared test support: a float64 oracle of the mixer (token-by-token recurrence, independent of
//! the chunked algorithm), random draws, and the error measure of DESIGN.md section 4.

#![allow(dead_code)]

use mamba_mixer::backend::wgpu::{Wgpu, WgpuOptions};
use mamba_mixer::tensors::{FloatType, HostTensor};
use mamba_mixer::{Input, MixerConfig, Weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn open_wgpu(opts: WgpuOptions) -> &'static Wgpu {
    // Leaked: a device dropped during thread teardown would touch wgpu's own thread-locals
    // after they are gone.
    Box::leak(Box::new(pollster::block_on(Wgpu::new(opts)).expect(
        "the wgpu tests need a GPU adapter (tools/test.sh installs Mesa's lavapipe)",
    )))
}

/// The full-featured device; with `MAMBA_MIXER_EXPECT_COOP=1` (tools/test.sh's run on Mesa 26's
/// lavapipe, which has cooperative matrices) it must use them, so that those kernels cannot be
/// skipped unnoticed.
fn open_full() -> &'static Wgpu {
    let w = open_wgpu(WgpuOptions::default());
    if std::env::var("MAMBA_MIXER_EXPECT_COOP").is_ok_and(|v| v == "1") {
        assert!(
            w.uses_coop(),
            "MAMBA_MIXER_EXPECT_COOP=1, but {} offers no cooperative matrices to use",
            w.adapter_name()
        );
    }
    w
}

thread_local! {
    static WGPU: &'static Wgpu = open_full();
    // The fallbacks, and every kernel with wgpu's runtime checks.
    static WGPU_BASIC: &'static Wgpu = open_wgpu(WgpuOptions {
        use_f16: false,
        use_subgroups: false,
        use_coop: false,
        trusted: false,
    });
}

/// This thread's wgpu device with every optional feature the adapter has (one per test thread,
/// shared by its mixers).
pub fn wgpu() -> Wgpu {
    WGPU.with(|w| (*w).clone())
}

/// The same adapter without SHADER_F16 and SUBGROUP: the fallbacks that some browsers take.
pub fn wgpu_basic() -> Wgpu {
    WGPU_BASIC.with(|w| (*w).clone())
}

/// Every backend built here; a new backend joins every suite by joining this list.
pub const BACKENDS: [&str; 3] = ["cpu", "wgpu", "wgpu-basic"];

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x: f32 = StandardNormal.sample(rng);
            scale * x
        })
        .collect()
}

pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Random weights with realistic ranges (never the trivial init values D = 1, norm = 1, bias = 0).
pub fn random_weights(cfg: &MixerConfig, seed: u64, ty: FloatType) -> Weights {
    let mut r = rng(seed);
    let t = |shape: Vec<usize>, v: Vec<f32>| HostTensor::f32(shape, v).cast(ty);
    let (n_in, d, di, h) = (cfg.d_in_proj(), cfg.d_model, cfg.d_inner(), cfg.nheads());
    let (cd, dc) = (cfg.conv_dim(), cfg.d_conv);
    let a = 1.0 / (d as f32).sqrt();
    let dt: Vec<f32> = uniform(&mut r, h, (0.001f32).ln(), (0.1f32).ln())
        .into_iter()
        .map(|l| {
            let dt = l.exp() as f64;
            (dt + (-(-dt).exp_m1()).ln()) as f32
        })
        .collect();
    Weights {
        in_proj: t(vec![n_in, d], uniform(&mut r, n_in * d, -a, a)),
        in_proj_bias: cfg
            .bias
            .then(|| t(vec![n_in], uniform(&mut r, n_in, -0.1, 0.1))),
        conv_weight: t(vec![cd, 1, dc], uniform(&mut r, cd * dc, -0.5, 0.5)),
        conv_bias: cfg
            .conv_bias
            .then(|| t(vec![cd], uniform(&mut r, cd, -0.5, 0.5))),
        dt_bias: t(vec![h], dt),
        a_log: t(
            vec![h],
            uniform(&mut r, h, 1.0, 16.0)
                .iter()
                .map(|a| a.ln())
                .collect(),
        ),
        d: t(
            vec![cfg.d_len()],
            randn(&mut r, cfg.d_len(), 0.5)
                .iter()
                .map(|x| 1.0 + x)
                .collect(),
        ),
        norm_weight: cfg.rmsnorm.then(|| {
            t(
                vec![di],
                randn(&mut r, di, 0.2).iter().map(|x| 1.0 + x).collect(),
            )
        }),
        out_proj: t(
            vec![d, di],
            uniform(&mut r, d * di, -1.0, 1.0)
                .iter()
                .map(|x| x / (di as f32).sqrt())
                .collect(),
        ),
        out_proj_bias: cfg.bias.then(|| t(vec![d], uniform(&mut r, d, -0.1, 0.1))),
    }
}

/// `||a - b|| / ||b||`; infinite when either holds a NaN or an infinity (NaN never passes).
pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    if a.iter().any(|x| !x.is_finite()) || b.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub struct Reference {
    pub output: Vec<f64>,
    pub conv_state: Vec<f64>,
    pub ssm_state: Vec<f64>,
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// The mixer in float64, one token at a time, straight from DESIGN.md section 1.
pub fn oracle(cfg: &MixerConfig, w: &Weights, input: &Input) -> Reference {
    let f = |t: &HostTensor| widen(&t.to_f32());
    let fo = |t: &Option<HostTensor>| t.as_ref().map(f);
    let (in_w, in_b, conv_w, conv_b) = (
        f(&w.in_proj),
        fo(&w.in_proj_bias),
        f(&w.conv_weight),
        fo(&w.conv_bias),
    );
    let (dt_bias, a_log, dd, norm_w) = (f(&w.dt_bias), f(&w.a_log), f(&w.d), fo(&w.norm_weight));
    let (out_w, out_b) = (f(&w.out_proj), fo(&w.out_proj_bias));
    let (d, di, nh, hd, ds) = (
        cfg.d_model,
        cfg.d_inner(),
        cfg.nheads(),
        cfg.headdim,
        cfg.d_state,
    );
    let (cd, dc, g, nin) = (cfg.conv_dim(), cfg.d_conv, cfg.ngroups, cfg.d_in_proj());
    let (l, b) = (input.seq_len, input.batch);
    let seqs: Vec<Vec<usize>> = match input.cu_seqlens {
        None => (0..b)
            .map(|s| (0..l).map(|t| t * b + s).collect())
            .collect(),
        Some(cu) => cu
            .windows(2)
            .map(|w| (w[0] as usize..w[1] as usize).collect())
            .collect(),
    };
    let n = seqs.len();
    let mut conv_state = input.conv_state.map_or(vec![0.0; n * cd * dc], widen);
    let mut ssm_state = input.ssm_state.map_or(vec![0.0; n * nh * hd * ds], widen);
    let mut output = vec![0.0; l * b * d];
    let (lo, hi) = cfg.dt_limit;
    for (s, rows) in seqs.iter().enumerate() {
        let cs = &mut conv_state[s * cd * dc..(s + 1) * cd * dc];
        let ss = &mut ssm_state[s * nh * hd * ds..(s + 1) * nh * hd * ds];
        for &r in rows {
            let u = &input.hidden[r * d..(r + 1) * d];
            let proj: Vec<f64> = (0..nin)
                .map(|o| {
                    in_b.as_ref().map_or(0.0, |b| b[o])
                        + (0..d).map(|k| in_w[o * d + k] * u[k] as f64).sum::<f64>()
                })
                .collect();
            let (z, xbc_raw, dt_raw) = (&proj[..di], &proj[di..di + cd], &proj[di + cd..]);
            let mut xbc = vec![0.0; cd];
            for c in 0..cd {
                let st = &mut cs[c * dc..(c + 1) * dc];
                st.rotate_left(1);
                st[dc - 1] = xbc_raw[c];
                let acc: f64 = (0..dc).map(|j| conv_w[c * dc + j] * st[j]).sum::<f64>()
                    + conv_b.as_ref().map_or(0.0, |b| b[c]);
                xbc[c] = silu(acc);
            }
            let mut y = vec![0.0; di];
            for h in 0..nh {
                let v = dt_raw[h] + dt_bias[h];
                let mut dt = if v > 20.0 { v } else { v.exp().ln_1p() };
                dt = dt.max(lo);
                if let Some(hi) = hi {
                    dt = dt.min(hi);
                }
                let decay = (dt * -a_log[h].exp()).exp();
                let grp = h / (nh / g);
                let bv = &xbc[di + grp * ds..di + (grp + 1) * ds];
                let cv = &xbc[di + g * ds + grp * ds..di + g * ds + (grp + 1) * ds];
                for p in 0..hd {
                    let x = xbc[h * hd + p];
                    let st = &mut ss[(h * hd + p) * ds..(h * hd + p + 1) * ds];
                    let mut acc = 0.0;
                    for k in 0..ds {
                        st[k] = decay * st[k] + dt * x * bv[k];
                        acc += st[k] * cv[k];
                    }
                    let dv = if cfg.d_has_hdim {
                        dd[h * hd + p]
                    } else {
                        dd[h]
                    };
                    y[h * hd + p] = acc + dv * x;
                }
            }
            let gs = di / g;
            let mut gated = vec![0.0; di];
            match &norm_w {
                None => (0..di).for_each(|i| gated[i] = y[i] * silu(z[i])),
                Some(nw) => {
                    for grp in 0..g {
                        let span = grp * gs..(grp + 1) * gs;
                        let v: Vec<f64> = span
                            .clone()
                            .map(|i| {
                                if cfg.norm_before_gate {
                                    y[i]
                                } else {
                                    y[i] * silu(z[i])
                                }
                            })
                            .collect();
                        let ms = v.iter().map(|x| x * x).sum::<f64>() / gs as f64;
                        let inv = 1.0 / (ms + cfg.norm_eps).sqrt();
                        for (j, i) in span.enumerate() {
                            let nv = v[j] * inv * nw[i];
                            gated[i] = if cfg.norm_before_gate {
                                nv * silu(z[i])
                            } else {
                                nv
                            };
                        }
                    }
                }
            }
            for o in 0..d {
                output[r * d + o] = out_b.as_ref().map_or(0.0, |b| b[o])
                    + (0..di).map(|k| out_w[o * di + k] * gated[k]).sum::<f64>();
            }
        }
    }
    Reference {
        output,
        conv_state,
        ssm_state,
    }
}
