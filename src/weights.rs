//! The mixer's parameters on the host: Megatron initialisation, safetensors load and save.

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::MixerConfig;
use crate::error::{Error, Result};
use crate::tensors::{FloatType, HostTensor, Raw, TensorFile};

/// Megatron's default `init_method_std` for the two projections.
const PROJ_INIT_STD: f64 = 0.02;

/// The parameters of one mixer, under the mixer-local names of mamba_ssm, HF and Megatron.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// `in_proj.weight (d_in_proj, d_model)`
    pub in_proj: HostTensor,
    /// `in_proj.bias (d_in_proj)`, with `bias`
    pub in_proj_bias: Option<HostTensor>,
    /// `conv1d.weight (conv_dim, 1, d_conv)`
    pub conv_weight: HostTensor,
    /// `conv1d.bias (conv_dim)`, with `conv_bias`
    pub conv_bias: Option<HostTensor>,
    /// `dt_bias (nheads)`
    pub dt_bias: HostTensor,
    /// `A_log (nheads)`
    pub a_log: HostTensor,
    /// `D (nheads)`, or `(d_inner)` with `D_has_hdim`
    pub d: HostTensor,
    /// `norm.weight (d_inner)`, with `rmsnorm`
    pub norm_weight: Option<HostTensor>,
    /// `out_proj.weight (d_model, d_inner)`
    pub out_proj: HostTensor,
    /// `out_proj.bias (d_model)`, with `bias`
    pub out_proj_bias: Option<HostTensor>,
}

/// One parameter: its name, its shape under a config, and whether the config has it.
struct Spec {
    name: &'static str,
    shape: Vec<usize>,
    present: bool,
}

fn specs(cfg: &MixerConfig) -> [Spec; 10] {
    let s = |name, shape: &[usize], present| Spec {
        name,
        shape: shape.to_vec(),
        present,
    };
    let (n_in, d, di, h) = (cfg.d_in_proj(), cfg.d_model, cfg.d_inner(), cfg.nheads());
    [
        s("in_proj.weight", &[n_in, d], true),
        s("in_proj.bias", &[n_in], cfg.bias),
        s("conv1d.weight", &[cfg.conv_dim(), 1, cfg.d_conv], true),
        s("conv1d.bias", &[cfg.conv_dim()], cfg.conv_bias),
        s("dt_bias", &[h], true),
        s("A_log", &[h], true),
        s("D", &[cfg.d_len()], true),
        s("norm.weight", &[di], cfg.rmsnorm),
        s("out_proj.weight", &[d, di], true),
        s("out_proj.bias", &[d], cfg.bias),
    ]
}

impl Weights {
    /// Megatron's initialisation, reproducible from `seed`: projections N(0, 0.02) with zero
    /// biases; conv weight U(+-conv_init), or kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(d_conv));
    /// conv bias U(+-1/sqrt(d_conv)); dt log-uniform in [dt_min, dt_max], floored, stored as its
    /// inverse softplus; A_log = log U(A_init_range); D = 1; norm weight = 1.
    pub fn init(cfg: &MixerConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0, PROJ_INIT_STD).map_err(|e| Error::config(e.to_string()))?;
        let gaussian = |shape: Vec<usize>, rng: &mut ChaCha8Rng| {
            let n = shape.iter().product();
            let v = (0..n).map(|_| normal.sample(rng) as f32).collect();
            HostTensor::f32(shape, v)
        };
        let uniform = |shape: Vec<usize>, lo: f64, hi: f64, rng: &mut ChaCha8Rng| {
            let n = shape.iter().product();
            let v = (0..n).map(|_| rng.random_range(lo..=hi) as f32).collect();
            HostTensor::f32(shape, v)
        };
        let fill = |shape: Vec<usize>, x: f32| {
            let n = shape.iter().product();
            HostTensor::f32(shape, vec![x; n])
        };
        let (n_in, d, di, h) = (cfg.d_in_proj(), cfg.d_model, cfg.d_inner(), cfg.nheads());
        let conv_bound = 1.0 / (cfg.d_conv as f64).sqrt();

        let in_proj = gaussian(vec![n_in, d], &mut rng);
        let conv_lim = cfg.conv_init.unwrap_or(conv_bound);
        let conv_weight = uniform(
            vec![cfg.conv_dim(), 1, cfg.d_conv],
            -conv_lim,
            conv_lim,
            &mut rng,
        );
        let conv_bias = cfg
            .conv_bias
            .then(|| uniform(vec![cfg.conv_dim()], -conv_bound, conv_bound, &mut rng));
        let (lmin, lmax) = (cfg.dt_min.ln(), cfg.dt_max.ln());
        let dt_bias = (0..h)
            .map(|_| {
                let dt = rng.random_range(lmin..=lmax).exp().max(cfg.dt_init_floor);
                // Inverse of softplus: softplus(dt + log(-expm1(-dt))) = dt.
                (dt + (-(-dt).exp_m1()).ln()) as f32
            })
            .collect();
        let (alo, ahi) = cfg.a_init_range;
        let a_log = (0..h)
            .map(|_| rng.random_range(alo..=ahi).ln() as f32)
            .collect();
        let out_proj = gaussian(vec![d, di], &mut rng);
        Ok(Weights {
            in_proj,
            in_proj_bias: cfg.bias.then(|| fill(vec![n_in], 0.0)),
            conv_weight,
            conv_bias,
            dt_bias: HostTensor::f32(vec![h], dt_bias),
            a_log: HostTensor::f32(vec![h], a_log),
            d: fill(vec![cfg.d_len()], 1.0),
            norm_weight: cfg.rmsnorm.then(|| fill(vec![di], 1.0)),
            out_proj,
            out_proj_bias: cfg.bias.then(|| fill(vec![d], 0.0)),
        })
    }

    /// Loads the mixer's tensors from a safetensors file, each named `prefix + name`.
    pub fn load(path: &Path, cfg: &MixerConfig, prefix: &str) -> Result<Self> {
        Self::from_file(&TensorFile::read(path)?, cfg, prefix)
    }

    /// Every tensor's presence, dtype and shape is checked before anything is returned. Tensors
    /// outside the prefix are ignored (a model file holds many layers); a mixer tensor that the
    /// config does not have (a bias with `bias=false`) is an error, since it means the config and
    /// the checkpoint disagree.
    pub fn from_file(file: &TensorFile, cfg: &MixerConfig, prefix: &str) -> Result<Self> {
        cfg.validate()?;
        let mut found: HashMap<&'static str, HostTensor> = HashMap::new();
        for spec in specs(cfg) {
            let full = format!("{prefix}{}", spec.name);
            let tensor = file.float(&full)?;
            match (tensor, spec.present) {
                (Some(t), true) => {
                    if t.shape != spec.shape {
                        return Err(Error::tensor(
                            &full,
                            format!(
                                "in {}: expected shape {:?}, got {:?}",
                                file.path().display(),
                                spec.shape,
                                t.shape
                            ),
                        ));
                    }
                    found.insert(spec.name, t);
                }
                (None, true) => {
                    return Err(Error::tensor(
                        &full,
                        format!(
                            "missing from {} (expected shape {:?}{})",
                            file.path().display(),
                            spec.shape,
                            if prefix.is_empty() {
                                ""
                            } else {
                                "; is --prefix right?"
                            }
                        ),
                    ))
                }
                (Some(_), false) => {
                    return Err(Error::tensor(
                        &full,
                        format!(
                            "present in {} but the config does not use it (check bias, conv_bias, rmsnorm)",
                            file.path().display()
                        ),
                    ))
                }
                (None, false) => {}
            }
        }
        let mut take = |name: &str| found.remove(name);
        let mut need = |name: &str| {
            take(name).ok_or_else(|| Error::tensor(format!("{prefix}{name}"), "missing"))
        };
        Ok(Weights {
            in_proj: need("in_proj.weight")?,
            conv_weight: need("conv1d.weight")?,
            dt_bias: need("dt_bias")?,
            a_log: need("A_log")?,
            d: need("D")?,
            out_proj: need("out_proj.weight")?,
            in_proj_bias: take("in_proj.bias"),
            conv_bias: take("conv1d.bias"),
            norm_weight: take("norm.weight"),
            out_proj_bias: take("out_proj.bias"),
        })
    }

    /// Checks that the tensors present, and their shapes, are those the config asks for.
    pub fn check(&self, cfg: &MixerConfig) -> Result<()> {
        cfg.validate()?;
        let have: HashMap<&str, &HostTensor> = self.named().into_iter().collect();
        for spec in specs(cfg) {
            match (have.get(spec.name), spec.present) {
                (Some(t), true) if t.shape != spec.shape => {
                    return Err(Error::shape(spec.name, &spec.shape, &t.shape))
                }
                (None, true) => return Err(Error::tensor(spec.name, "missing")),
                (Some(_), false) => {
                    return Err(Error::tensor(
                        spec.name,
                        "present but the config does not use it",
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The tensors with their mixer-local names.
    pub fn named(&self) -> Vec<(&'static str, &HostTensor)> {
        let all = [
            ("in_proj.weight", Some(&self.in_proj)),
            ("in_proj.bias", self.in_proj_bias.as_ref()),
            ("conv1d.weight", Some(&self.conv_weight)),
            ("conv1d.bias", self.conv_bias.as_ref()),
            ("dt_bias", Some(&self.dt_bias)),
            ("A_log", Some(&self.a_log)),
            ("D", Some(&self.d)),
            ("norm.weight", self.norm_weight.as_ref()),
            ("out_proj.weight", Some(&self.out_proj)),
            ("out_proj.bias", self.out_proj_bias.as_ref()),
        ];
        all.into_iter()
            .filter_map(|(n, t)| t.map(|t| (n, t)))
            .collect()
    }

    /// Every tensor stored as `ty`.
    pub fn cast(&self, ty: FloatType) -> Weights {
        let c = |t: &HostTensor| t.cast(ty);
        let co = |t: &Option<HostTensor>| t.as_ref().map(c);
        Weights {
            in_proj: c(&self.in_proj),
            in_proj_bias: co(&self.in_proj_bias),
            conv_weight: c(&self.conv_weight),
            conv_bias: co(&self.conv_bias),
            dt_bias: c(&self.dt_bias),
            a_log: c(&self.a_log),
            d: c(&self.d),
            norm_weight: co(&self.norm_weight),
            out_proj: c(&self.out_proj),
            out_proj_bias: co(&self.out_proj_bias),
        }
    }

    /// Writes the tensors (named `prefix + name`) atomically.
    pub fn save(&self, path: &Path, prefix: &str) -> Result<()> {
        let tensors: Vec<(String, Raw)> = self
            .named()
            .into_iter()
            .map(|(n, t)| (format!("{prefix}{n}"), Raw::from(t)))
            .collect();
        crate::tensors::write_atomic(path, &tensors, None)
    }
}
