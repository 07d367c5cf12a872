//! `mamba-mixer bench`: steps of the engine timed by wall clock and, where the backend can, by
//! the device's own timestamps around every kernel.

use std::str::FromStr;
use std::time::Instant;

use crate::backend::Backend;
use crate::config::MixerConfig;
use crate::error::{Error, Result};
use crate::graph::{Engine, EngineConfig, Request, Work};
use crate::model::Mixer;

/// The layers of shared/GPU.md: Mamba-2 2.7B and 130m.
pub fn layer(name: &str) -> Result<MixerConfig> {
    let d_model = match name {
        "2.7b" => 2560,
        "130m" => 768,
        _ => {
            return Err(Error::invalid(format!(
                "layer must be 2.7b or 130m, got {name:?}"
            )))
        }
    };
    let mut cfg = MixerConfig::new(d_model);
    cfg.ngroups = 1;
    cfg.chunk_size = 256;
    cfg.validate()?;
    Ok(cfg)
}

/// One measured workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// One request of this many prompt tokens.
    Prefill(usize),
    /// `batch` requests of 1 + `spec` tokens each (all accepted).
    Decode { batch: usize, spec: usize },
}

impl FromStr for Case {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let num = |v: &str| v.parse::<usize>().ok().filter(|&n| n > 0);
        let bad = || format!("expected prefill:N, decode:B or spec:BxK, got {s:?}");
        match s.split_once(':') {
            Some(("prefill", n)) => num(n).map(Case::Prefill).ok_or_else(bad),
            Some(("decode", b)) => num(b)
                .map(|batch| Case::Decode { batch, spec: 0 })
                .ok_or_else(bad),
            Some(("spec", bk)) => {
                let (b, k) = bk.split_once('x').ok_or_else(bad)?;
                match (num(b), num(k)) {
                    (Some(batch), Some(spec)) => Ok(Case::Decode { batch, spec }),
                    _ => Err(bad()),
                }
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Case::Prefill(n) => write!(f, "prefill 1x{n}"),
            Case::Decode { batch, spec: 0 } => write!(f, "decode batch {batch}"),
            Case::Decode { batch, spec } => write!(f, "decode batch {batch}, 1+{spec} tokens"),
        }
    }
}

/// Per step: wall-clock microseconds (upload, kernels, readback), device microseconds (from the
/// step's first kernel to its last, barriers included) and the kernels by total time, each timed
/// on its own in a second run.
#[derive(Debug, Clone)]
pub struct Measured {
    pub case: Case,
    pub wall_us: f64,
    pub device_us: Option<f64>,
    pub kernels: Vec<(&'static str, f64)>,
}

/// Runs `case` `iters` times after a warm-up and averages per step.
pub async fn measure<B: Backend>(m: &Mixer<B>, case: Case, iters: usize) -> Result<Measured> {
    let d = m.config().d_model;
    let (batch, spec, tokens) = match case {
        Case::Prefill(n) => (1, 0, n),
        Case::Decode { batch, spec } => (batch, spec, 1 + spec),
    };
    let mut engine = Engine::new(
        m,
        EngineConfig {
            max_requests: batch,
            max_spec: spec,
            max_snapshots: 0,
        },
    )?;
    let slots: Vec<i32> = (0..batch).map(|_| engine.alloc()).collect::<Result<_>>()?;
    // Deterministic, non-trivial inputs.
    let hidden: Vec<Vec<f32>> = (0..batch)
        .map(|b| {
            (0..tokens * d)
                .map(|i| ((i * 7919 + b * 104729) % 2003) as f32 / 1001.5 - 1.0)
                .collect()
        })
        .collect();
    let work = match case {
        Case::Prefill(_) => Work::Prefill { snapshots: vec![] },
        Case::Decode { spec, .. } => Work::Decode { spec },
    };
    let requests: Vec<Request> = slots
        .iter()
        .zip(&hidden)
        .map(|(&slot, h)| Request {
            slot,
            tokens: h,
            work: work.clone(),
        })
        .collect();
    let warmup = 3;
    run(&mut engine, &requests, case, warmup).await?;
    // Whole steps first (the honest device time: barriers and gaps between kernels included),
    // then every kernel on its own for the breakdown.
    let timed = m.backend.profile_start(false)?;
    let wall_us = run(&mut engine, &requests, case, iters).await?;
    let steps: Vec<f64> = m.backend.profile_take().iter().map(|e| e.1).collect();
    let device_us =
        (timed && !steps.is_empty()).then(|| steps.iter().sum::<f64>() / 1e3 / steps.len() as f64);
    let mut kernels: Vec<(&'static str, f64)> = vec![];
    if m.backend.profile_start(true)? {
        run(&mut engine, &requests, case, iters).await?;
        for (name, ns) in m.backend.profile_take() {
            match kernels.iter_mut().find(|(n, _)| *n == name) {
                Some(k) => k.1 += ns,
                None => kernels.push((name, ns)),
            }
        }
    }
    kernels.iter_mut().for_each(|k| k.1 /= 1e3 * iters as f64);
    kernels.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Measured {
        case,
        wall_us,
        device_us,
        kernels,
    })
}

/// Runs `n` steps of `requests` (accepting every speculative token); wall-clock us per step.
async fn run<B: Backend>(
    engine: &mut Engine<'_, B>,
    requests: &[Request<'_>],
    case: Case,
    n: usize,
) -> Result<f64> {
    let mut wall = 0.0;
    for _ in 0..n {
        if matches!(case, Case::Prefill(_)) {
            for r in requests {
                engine.reset(r.slot)?;
            }
        }
        let t = Instant::now();
        engine.step(requests).await?;
        wall += t.elapsed().as_secs_f64();
        if let Case::Decode { spec, .. } = case {
            if spec > 0 {
                for r in requests {
                    engine.accept(r.slot, 1 + spec)?;
                }
            }
        }
    }
    Ok(wall * 1e6 / n.max(1) as f64)
}
