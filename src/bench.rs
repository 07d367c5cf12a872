//! `mamba-mixer bench`: steps of the engine timed by wall clock and, where the backend can, by
//! the device's own timestamps around every kernel.

use std::str::FromStr;
use std::time::Instant;

use crate::backend::{in_proj, Backend, Decode, Pack, States};
use crate::config::MixerConfig;
use crate::error::{Error, Result};
use crate::graph::{decode, decode_batch, pack, prefill, Engine, EngineConfig, Request, Work};
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
    /// The SSD chunked scan alone over one sequence of this many tokens (what mamba_ssm's
    /// `mamba_chunk_scan_combined` does), its inputs from one in_proj and conv.
    Scan(usize),
}

impl FromStr for Case {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let num = |v: &str| v.parse::<usize>().ok().filter(|&n| n > 0);
        let bad = || format!("expected prefill:N, scan:N, decode:B or spec:BxK, got {s:?}");
        match s.split_once(':') {
            Some(("prefill", n)) => num(n).map(Case::Prefill).ok_or_else(bad),
            Some(("scan", n)) => num(n).map(Case::Scan).ok_or_else(bad),
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
            Case::Scan(n) => write!(f, "scan 1x{n}"),
            Case::Decode { batch, spec: 0 } => write!(f, "decode batch {batch}"),
            Case::Decode { batch, spec } => write!(f, "decode batch {batch}, 1+{spec} tokens"),
        }
    }
}

/// Per step: wall-clock microseconds of an engine step (upload, kernels, readback), the device
/// microseconds of an engine step (first kernel to last, barriers included; the GPU idles between
/// steps while the host works), the device microseconds of a step when steps run back to back,
/// and the kernels of the back-to-back run, each timed on its own. A scan has no engine step: its
/// wall time is that of scans back to back, with the readback that ends them.
#[derive(Debug, Clone)]
pub struct Measured {
    pub case: Case,
    pub wall_us: f64,
    pub step_us: Option<f64>,
    pub device_us: Option<f64>,
    /// In the order of a step; a kernel dispatched more than once per step is named with its
    /// turn ("mma #2").
    pub kernels: Vec<(String, f64)>,
}

/// Runs `case` `iters` times after a warm-up and averages per step.
pub async fn measure<B: Backend>(m: &Mixer<B>, case: Case, iters: usize) -> Result<Measured> {
    let d = m.config().d_model;
    let (batch, tokens) = match case {
        Case::Prefill(n) | Case::Scan(n) => (1, n),
        Case::Decode { batch, spec } => (batch, 1 + spec),
    };
    // Deterministic, non-trivial inputs.
    let hidden: Vec<Vec<f32>> = (0..batch)
        .map(|b| {
            (0..tokens * d)
                .map(|i| ((i * 7919 + b * 104729) % 2003) as f32 / 1001.5 - 1.0)
                .collect()
        })
        .collect();
    let warmup = 3;
    let flat: Vec<f32> = hidden.concat();
    let (wall_us, step_us) = match case {
        Case::Scan(_) => {
            replay(m, case, &flat, warmup, false).await?;
            let (_, wall) = replay(m, case, &flat, iters, false).await?;
            (wall * 1e6 / iters.max(1) as f64, None)
        }
        _ => engine_steps(m, case, &hidden, warmup, iters).await?,
    };
    // The same work back to back in one submission (the GPU never waits for the host, as in a
    // CUDA-graph replay), after a second of such replays of about 50 ms each: that brings the GPU
    // to its sustained clocks (it idles at half of them between engine steps). Then a few steps
    // with every kernel timed on its own for the breakdown (few: the query set is bounded).
    let mut device_us = None;
    let mut kernels: Vec<(String, f64)> = vec![];
    if let Some(first) = replay(m, case, &flat, warmup, false).await?.0.first() {
        let reps = ((50e6 / (first.1 / warmup as f64).max(1.0)) as usize).clamp(iters, 20_000);
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < 1.0 {
            replay(m, case, &flat, reps, false).await?;
        }
        device_us = replay(m, case, &flat, reps, false)
            .await?
            .0
            .first()
            .map(|e| e.1 / 1e3 / reps as f64);
    }
    // One step's dispatches name the entries; a step that the bounded query set cut short is
    // left out of the averages.
    let step: Vec<&str> = replay(m, case, &flat, 1, true)
        .await?
        .0
        .iter()
        .map(|e| e.0)
        .collect();
    for (at, name) in step.iter().enumerate() {
        let turn = 1 + step[..at].iter().filter(|n| *n == name).count();
        kernels.push(match turn {
            1 => (name.to_string(), 0.0),
            t => (format!("{name} #{t}"), 0.0),
        });
    }
    let timed = replay(m, case, &flat, iters.min(8), true).await?.0;
    let steps = timed.len() / step.len().max(1);
    for (i, (_, ns)) in timed.iter().take(steps * step.len()).enumerate() {
        kernels[i % step.len()].1 += ns / (1e3 * steps as f64);
    }
    Ok(Measured {
        case,
        wall_us,
        step_us,
        device_us,
        kernels,
    })
}

/// Engine steps of `case` (a prefill or a decode) as a caller runs them, after `warmup` of them:
/// wall-clock us per step, and the device us per step where the backend can time it.
async fn engine_steps<B: Backend>(
    m: &Mixer<B>,
    case: Case,
    hidden: &[Vec<f32>],
    warmup: usize,
    iters: usize,
) -> Result<(f64, Option<f64>)> {
    let (batch, spec) = match case {
        Case::Decode { batch, spec } => (batch, spec),
        _ => (1, 0),
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
    let work = match case {
        Case::Decode { spec, .. } => Work::Decode { spec },
        _ => Work::Prefill { snapshots: vec![] },
    };
    let requests: Vec<Request> = slots
        .iter()
        .zip(hidden)
        .map(|(&slot, h)| Request {
            slot,
            tokens: h,
            work: work.clone(),
        })
        .collect();
    run(&mut engine, &requests, case, warmup).await?;
    // Engine steps as a caller runs them: wall clock, and the device time of each step.
    let timed = m.backend.profile_start(false)?;
    let wall_us = run(&mut engine, &requests, case, iters).await?;
    let steps: Vec<f64> = m.backend.profile_take().iter().map(|e| e.1).collect();
    let step_us =
        (timed && !steps.is_empty()).then(|| steps.iter().sum::<f64>() / 1e3 / steps.len() as f64);
    Ok((wall_us, step_us))
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

/// Records the passes of `n` steps of `case` into one submission (a prefill of one sequence, or a
/// decode pass of `batch` requests of 1 + spec tokens over their own slots, recording
/// intermediates when speculative; a scan alone after one in_proj and conv) and returns the
/// device profile of that submission, one "step" entry for all of it or every kernel
/// (`per_kernel`), and the wall seconds of the steps and their readback. Where the backend has no
/// timer: an empty profile, and nothing run but scans (their only wall time).
async fn replay<B: Backend>(
    m: &Mixer<B>,
    case: Case,
    hidden: &[f32],
    n: usize,
    per_kernel: bool,
) -> Result<(Vec<(&'static str, f64)>, f64)> {
    let (b, cfg) = (&m.backend, m.config());
    let (batch, spec) = match case {
        Case::Prefill(_) | Case::Scan(_) => (1, 0),
        Case::Decode { batch, spec } => (batch, spec),
    };
    let states = |entries: usize| -> Result<States<B>> {
        Ok(States {
            conv: b.zeros(entries * cfg.conv_state_len())?,
            ssm: b.zeros(entries * cfg.ssm_state_len())?,
        })
    };
    let mut pool = states(batch)?;
    let x = b.upload(hidden)?;
    let slots: Vec<i32> = (0..batch as i32).collect();
    let rows = hidden.len() / cfg.d_model;
    enum Pass<B: Backend> {
        Prefill(Pack<B>),
        // The scan's inputs (zxbcdt, xbc) and its output.
        Scan(Pack<B>, B::Buf, B::Buf, B::Buf),
        Decode(Decode<B>, Option<States<B>>),
    }
    let pass = match case {
        Case::Prefill(_) => {
            Pass::Prefill(pack(b, vec![0, rows as i32], slots, &[], cfg.chunk_size)?)
        }
        Case::Scan(_) => {
            let pk = pack(b, vec![0, rows as i32], slots, &[], cfg.chunk_size)?;
            let zxbcdt = in_proj(b, &m.params, &x, rows)?;
            let mut xbc = b.alloc(rows * cfg.conv_dim())?;
            b.conv(&m.params, &zxbcdt, &pk, &mut pool.conv, None, &mut xbc)?;
            let y = b.alloc(rows * cfg.d_inner())?;
            // Run now, so that neither the timestamps nor the wall clock below include them.
            b.read(&[(&xbc, 0, 1)]).await?;
            Pass::Scan(pk, zxbcdt, xbc, y)
        }
        Case::Decode { .. } => {
            let cu = (0..=batch).map(|i| (i * (1 + spec)) as i32).collect();
            let record = if spec > 0 {
                slots.clone()
            } else {
                vec![-1; batch]
            };
            let inter = if spec > 0 {
                Some(states(batch * (1 + spec))?)
            } else {
                None
            };
            Pass::Decode(decode_batch(b, cu, slots, record, 1 + spec)?, inter)
        }
    };
    let timed = b.profile_start(per_kernel)?;
    if !timed && !matches!(case, Case::Scan(_)) {
        return Ok((vec![], 0.0));
    }
    let mut pass = pass;
    let t = Instant::now();
    for _ in 0..n {
        match &mut pass {
            Pass::Prefill(pk) => drop(prefill(m, &x, pk, &mut pool, None)?),
            Pass::Scan(pk, zxbcdt, xbc, y) => {
                b.ssd_scan(&m.params, zxbcdt, xbc, pk, &mut pool.ssm, None, y)?
            }
            Pass::Decode(dec, inter) => drop(decode(m, &x, dec, &mut pool, inter.as_mut())?),
        }
    }
    b.read(&[(&pool.ssm, 0, 1)]).await?;
    let wall = t.elapsed().as_secs_f64();
    Ok((if timed { b.profile_take() } else { vec![] }, wall))
}
