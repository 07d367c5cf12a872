//! Whole inputs through the engine: the `(L, B, d_model)` layout of Megatron, packed sequences,
//! initial and final states, and the four ways to feed the tokens.

use std::path::Path as FsPath;
use std::str::FromStr;

use super::engine::{Engine, EngineConfig, Request, Work};
use crate::backend::Backend;
use crate::config::MixerConfig;
use crate::error::{Error, Result};
use crate::model::Mixer;
use crate::tensors::TensorFile;

/// A full-sequence input as Megatron lays it out: `hidden (L, B, d_model)`, optionally packed
/// (`cu_seqlens`, then B = 1) and optionally with per-sequence initial states.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub hidden: &'a [f32],
    pub seq_len: usize,
    pub batch: usize,
    /// `(N+1)`: sequence i is tokens `cu[i]..cu[i+1]` of the single batch row.
    pub cu_seqlens: Option<&'a [i32]>,
    /// `(N, conv_dim, d_conv)`; zeros when absent.
    pub conv_state: Option<&'a [f32]>,
    /// `(N, nheads, headdim, d_state)`; zeros when absent.
    pub ssm_state: Option<&'a [f32]>,
}

/// The output `(L, B, d_model)` and each sequence's final states.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub output: Vec<f32>,
    pub conv_state: Vec<f32>,
    pub ssm_state: Vec<f32>,
}

/// How the tokens are fed; every way gives the same result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Every sequence whole, in one prefill step (the SSD chunked scan).
    Full,
    /// One token per sequence per step (the decode pass).
    Decode,
    /// Prefill in pieces of this many tokens, one piece of each sequence per step.
    Chunked(usize),
    /// Decode in groups of 1 + this many speculative tokens, all accepted.
    Spec(usize),
}

impl FromStr for Path {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let num = |v: &str, min: usize| match v.parse::<usize>() {
            Ok(n) if n >= min => Ok(n),
            _ => Err(format!("expected an integer >= {min} in {s:?}")),
        };
        match s.split_once('=') {
            None if s == "full" => Ok(Path::Full),
            None if s == "decode" => Ok(Path::Decode),
            Some(("chunked", n)) => num(n, 1).map(Path::Chunked),
            Some(("spec", k)) => num(k, 0).map(Path::Spec),
            _ => Err(format!(
                "expected full, decode, chunked=N or spec=K, got {s:?}"
            )),
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Full => write!(f, "full"),
            Path::Decode => write!(f, "decode"),
            Path::Chunked(n) => write!(f, "chunked={n}"),
            Path::Spec(k) => write!(f, "spec={k}"),
        }
    }
}

impl Input<'_> {
    /// Which rows of `hidden` form each sequence, in order; checks every length against the
    /// config, and the errors name the tensor.
    fn sequences(&self, cfg: &MixerConfig) -> Result<Vec<Vec<usize>>> {
        let (l, b, d) = (self.seq_len, self.batch, cfg.d_model);
        if self.hidden.len() != l * b * d {
            return Err(Error::tensor(
                "hidden_states",
                format!(
                    "expected (L, B, d_model) = ({l}, {b}, {d}) = {} values, got {}",
                    l * b * d,
                    self.hidden.len()
                ),
            ));
        }
        let rows: Vec<Vec<usize>> = match self.cu_seqlens {
            None => (0..b)
                .map(|s| (0..l).map(|t| t * b + s).collect())
                .collect(),
            Some(cu) => {
                check_cu_seqlens(cu, l, b)?;
                cu.windows(2)
                    .map(|w| (w[0] as usize..w[1] as usize).collect())
                    .collect()
            }
        };
        let n = rows.len();
        let (conv, ssm) = cfg.state_shapes_per_request();
        let check = |name: &str, got: Option<&[f32]>, shape: &[usize]| match got {
            Some(v) if v.len() != n * shape.iter().product::<usize>() => {
                let full = [&[n], shape].concat();
                Err(Error::tensor(
                    name,
                    format!(
                        "expected shape {full:?} ({} values, one state per sequence), got {} values",
                        full.iter().product::<usize>(),
                        v.len()
                    ),
                ))
            }
            _ => Ok(()),
        };
        check("conv_state", self.conv_state, &conv)?;
        check("ssm_state", self.ssm_state, &ssm)?;
        Ok(rows)
    }
}

/// The tensors of a `forward` input file, checked against the config.
pub struct InputFile {
    pub hidden: Vec<f32>,
    pub seq_len: usize,
    pub batch: usize,
    pub cu_seqlens: Option<Vec<i32>>,
    pub conv_state: Option<Vec<f32>>,
    pub ssm_state: Option<Vec<f32>>,
}

const INPUT_NAMES: [&str; 4] = ["hidden_states", "cu_seqlens", "conv_state", "ssm_state"];

impl InputFile {
    pub fn read(path: &FsPath, cfg: &MixerConfig) -> Result<Self> {
        Self::from_file(&TensorFile::read(path)?, cfg)
    }

    /// The input tensors of an already read file (a browser has no paths, only bytes).
    pub fn from_file(file: &TensorFile, cfg: &MixerConfig) -> Result<Self> {
        let at = || file.path().display();
        if let Some(extra) = file
            .names()
            .into_iter()
            .find(|n| !INPUT_NAMES.contains(&n.as_str()))
        {
            return Err(Error::tensor(
                extra,
                format!("unexpected in {} (an input holds {INPUT_NAMES:?})", at()),
            ));
        }
        let shape = file
            .shape("hidden_states")
            .ok_or_else(|| Error::tensor("hidden_states", format!("missing from {}", at())))?;
        let [l, b, d] = shape[..] else {
            return Err(Error::tensor(
                "hidden_states",
                format!(
                    "in {}: expected shape (L, B, {}), got {shape:?}",
                    at(),
                    cfg.d_model
                ),
            ));
        };
        if d != cfg.d_model {
            return Err(Error::tensor(
                "hidden_states",
                format!(
                    "in {}: expected shape (L, B, d_model={}), got {shape:?}",
                    at(),
                    cfg.d_model
                ),
            ));
        }
        let hidden = file.f32_exact("hidden_states", &shape)?.unwrap_or_default();
        let cu_seqlens = file.i32_vector("cu_seqlens")?;
        if let Some(cu) = &cu_seqlens {
            check_cu_seqlens(cu, l, b)?;
        }
        let n = cu_seqlens.as_ref().map_or(b, |cu| cu.len() - 1);
        let (conv, ssm) = cfg.state_shapes_per_request();
        let with_n = |s: &[usize]| [&[n], s].concat();
        Ok(InputFile {
            hidden,
            seq_len: l,
            batch: b,
            conv_state: file.f32_exact("conv_state", &with_n(&conv))?,
            ssm_state: file.f32_exact("ssm_state", &with_n(&ssm))?,
            cu_seqlens,
        })
    }

    pub fn as_input(&self) -> Input<'_> {
        Input {
            hidden: &self.hidden,
            seq_len: self.seq_len,
            batch: self.batch,
            cu_seqlens: self.cu_seqlens.as_deref(),
            conv_state: self.conv_state.as_deref(),
            ssm_state: self.ssm_state.as_deref(),
        }
    }

    /// N: the batch, or the packed sequences.
    pub fn sequences(&self) -> usize {
        self.cu_seqlens
            .as_ref()
            .map_or(self.batch, |cu| cu.len() - 1)
    }
}

/// `cu_seqlens` must be `(N+1)` with N >= 1, start at 0, never decrease and end at L (B = 1).
pub fn check_cu_seqlens(cu: &[i32], seq_len: usize, batch: usize) -> Result<()> {
    let bad = |msg: String| Err(Error::tensor("cu_seqlens", msg));
    if batch != 1 {
        return bad(format!(
            "packed sequences need hidden_states of batch 1, got batch {batch}"
        ));
    }
    if cu.len() < 2 {
        return bad(format!(
            "expected at least 2 entries (N+1 for N sequences), got {}",
            cu.len()
        ));
    }
    if cu[0] != 0 {
        return bad(format!("must start at 0, got {}", cu[0]));
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return bad(format!(
            "must be non-decreasing, but entry {} ({}) < entry {} ({})",
            i + 1,
            cu[i + 1],
            i,
            cu[i]
        ));
    }
    let last = cu[cu.len() - 1];
    if last as i64 != seq_len as i64 {
        return bad(format!(
            "must end at L = {seq_len} (the tokens of hidden_states), got {last}"
        ));
    }
    Ok(())
}

/// Runs a whole input: one slot per sequence, holding its initial state, then steps of pieces
/// as `path` says; returns the output in the input's layout and every sequence's final state.
pub async fn forward<B: Backend>(m: &Mixer<B>, input: &Input<'_>, path: Path) -> Result<Output> {
    let cfg = m.config();
    let d = cfg.d_model;
    let seqs = input.sequences(cfg)?;
    let n = seqs.len();
    let (conv_len, ssm_len) = (cfg.conv_state_len(), cfg.ssm_state_len());
    let (piece, max_spec) = match path {
        Path::Full => (usize::MAX, 0),
        Path::Decode => (1, 0),
        Path::Chunked(p) => (p, 0),
        Path::Spec(k) => (k + 1, k),
    };
    let mut engine = Engine::new(
        m,
        EngineConfig {
            max_requests: n,
            max_spec,
            max_snapshots: 0,
        },
    )?;
    let mut slots = Vec::with_capacity(n);
    for s in 0..n {
        let slot = engine.alloc()?;
        let conv = input
            .conv_state
            .map(|v| &v[s * conv_len..(s + 1) * conv_len]);
        let ssm = input.ssm_state.map(|v| &v[s * ssm_len..(s + 1) * ssm_len]);
        engine.write_state(slot, conv, ssm)?;
        slots.push(slot);
    }
    let mut done = vec![0usize; n];
    let mut result = vec![0.0; input.hidden.len()];
    loop {
        // (sequence, first token, token count) of this step's pieces.
        let pieces: Vec<(usize, usize, usize)> = (0..n)
            .filter(|&s| done[s] < seqs[s].len())
            .map(|s| (s, done[s], (seqs[s].len() - done[s]).min(piece)))
            .collect();
        if pieces.is_empty() {
            break;
        }
        let tokens: Vec<Vec<f32>> = pieces
            .iter()
            .map(|&(s, t0, len)| {
                seqs[s][t0..t0 + len]
                    .iter()
                    .flat_map(|&r| &input.hidden[r * d..(r + 1) * d])
                    .copied()
                    .collect()
            })
            .collect();
        let requests: Vec<Request> = pieces
            .iter()
            .zip(&tokens)
            .map(|(&(s, _, len), tokens)| Request {
                slot: slots[s],
                tokens,
                work: match path {
                    Path::Full | Path::Chunked(_) => Work::Prefill { snapshots: vec![] },
                    Path::Decode | Path::Spec(_) => Work::Decode { spec: len - 1 },
                },
            })
            .collect();
        let outs = engine.step(&requests).await?;
        for (&(s, t0, len), out) in pieces.iter().zip(&outs) {
            for (i, &r) in seqs[s][t0..t0 + len].iter().enumerate() {
                result[r * d..(r + 1) * d].copy_from_slice(&out.output[i * d..(i + 1) * d]);
            }
            if len > 1 && matches!(path, Path::Spec(_)) {
                engine.accept(slots[s], len)?;
            }
            done[s] += len;
        }
    }
    let mut conv_state = Vec::with_capacity(n * conv_len);
    let mut ssm_state = Vec::with_capacity(n * ssm_len);
    for &slot in &slots {
        let (c, s) = engine.state(slot).await?;
        conv_state.extend(c);
        ssm_state.extend(s);
    }
    Ok(Output {
        output: result,
        conv_state,
        ssm_state,
    })
}
