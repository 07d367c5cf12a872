//! The command line: thin wrappers that read files, call the graph and write files.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::backend::{Backend, Kind, Opened};
use crate::config::MixerConfig;
use crate::error::{Error, Result};
use crate::graph::{forward as run_forward, InputFile, Output, Path as ExecPath};
use crate::model::Mixer;
use crate::tensors::{write_atomic, FloatType, Raw};
use crate::weights::Weights;

#[derive(Parser, Debug)]
#[command(
    name = "mamba-mixer",
    version,
    about = "The Mamba-2 mixer (Megatron-LM MambaMixer)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the mixer over an input file and write the output and final states.
    Forward(ForwardArgs),
    /// Write Megatron-initialised weights for a config.
    Init(InitArgs),
    /// Time prefill and decode steps (device timestamps where the backend has them).
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A layer of shared/GPU.md: 2.7b or 130m (ignored with --config).
    #[arg(long, default_value = "2.7b")]
    pub layer: String,
    /// A mixer config instead of --layer.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Kind,
    /// Storage type of the weights: f32, f16 or bf16.
    #[arg(long, default_value = "bf16", value_parser = FloatType::parse)]
    pub dtype: FloatType,
    /// Workloads: prefill:N (one request of N tokens), scan:N (the SSD scan alone over N tokens),
    /// decode:B (B requests, one token), spec:BxK (B requests of 1+K tokens).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "prefill:2048,prefill:8192,scan:2048,scan:8192,decode:1,decode:64,spec:16x3"
    )]
    pub cases: Vec<crate::bench::Case>,
    /// Timed steps per case (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Mixer config (JSON, Megatron field names).
    #[arg(long)]
    pub config: PathBuf,
    /// Weights (safetensors; f32, f16 or bf16).
    #[arg(long)]
    pub weights: PathBuf,
    /// Input: hidden_states f32 (L, B, d_model); optional cu_seqlens i32 (N+1), conv_state f32
    /// (N, conv_dim, d_conv), ssm_state f32 (N, nheads, headdim, d_state).
    #[arg(long)]
    pub input: PathBuf,
    /// Output: output (L, B, d_model), conv_state and ssm_state (final states).
    #[arg(long)]
    pub output: PathBuf,
    /// Name prefix of the mixer's tensors in the weights file, e.g. `backbone.layers.3.mixer.`.
    #[arg(long, default_value = "")]
    pub prefix: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Kind,
    /// `full` (whole sequences, chunked scan), `decode` (one token per step), `chunked=N`
    /// (prefill in pieces of N tokens) or `spec=K` (decode in groups of 1+K tokens, all accepted).
    #[arg(long, default_value = "full")]
    pub path: ExecPath,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub output: PathBuf,
    /// Storage type of the written tensors: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = FloatType::parse)]
    pub dtype: FloatType,
    /// Name prefix of the written tensors.
    #[arg(long, default_value = "")]
    pub prefix: String,
}

pub fn run(cli: Cli) -> Result<String> {
    match cli.command {
        Command::Forward(a) => forward(&a),
        Command::Init(a) => init(&a),
        Command::Bench(a) => bench(&a),
    }
}

pub fn read_config(path: &Path) -> Result<MixerConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    MixerConfig::from_json(&text).map_err(|e| match e {
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        other => other,
    })
}

fn init(a: &InitArgs) -> Result<String> {
    let cfg = read_config(&a.config)?;
    Weights::init(&cfg, a.seed)?
        .cast(a.dtype)
        .save(&a.output, &a.prefix)?;
    Ok(format!("wrote {}", a.output.display()))
}

fn forward(a: &ForwardArgs) -> Result<String> {
    let cfg = read_config(&a.config)?;
    let weights = Weights::load(&a.weights, &cfg, &a.prefix)?;
    let input = InputFile::read(&a.input, &cfg)?;
    // Files are checked before a device is opened.
    let backend = pollster::block_on(a.backend.open())?;
    let name = backend.name();
    let out = match backend {
        Opened::Cpu(b) => run_path(b, &cfg, &weights, &input, a.path)?,
        Opened::Wgpu(b) => run_path(b, &cfg, &weights, &input, a.path)?,
    };
    let n = input.sequences();
    let (conv, ssm) = cfg.state_shapes_per_request();
    let tensors = [
        (
            "output".to_string(),
            Raw::f32(&[input.seq_len, input.batch, cfg.d_model], &out.output),
        ),
        (
            "conv_state".to_string(),
            Raw::f32(&[&[n], &conv[..]].concat(), &out.conv_state),
        ),
        (
            "ssm_state".to_string(),
            Raw::f32(&[&[n], &ssm[..]].concat(), &out.ssm_state),
        ),
    ];
    write_atomic(&a.output, &tensors, None)?;
    Ok(format!(
        "wrote {} (backend {}, path {}, {} tokens in {n} sequences)",
        a.output.display(),
        name,
        a.path,
        input.seq_len * input.batch
    ))
}

fn bench(a: &BenchArgs) -> Result<String> {
    let (cfg, name) = match &a.config {
        Some(path) => (read_config(path)?, path.display().to_string()),
        None => (crate::bench::layer(&a.layer)?, a.layer.clone()),
    };
    let weights = Weights::init(&cfg, 0)?.cast(a.dtype);
    let backend = pollster::block_on(a.backend.open())?;
    let device = backend.name();
    let rows = match backend {
        Opened::Cpu(b) => bench_on(b, &cfg, &weights, a)?,
        Opened::Wgpu(b) => bench_on(b, &cfg, &weights, a)?,
    };
    let mut out = format!(
        "layer {name}, {:?} weights, backend {device}, {} timed steps per case\n\n\
         | case | device us per step, back to back | device us per engine step | wall us per engine step | kernels, each timed alone (device us) |\n|---|---|---|---|---|\n",
        a.dtype, a.iters
    );
    for m in rows {
        let kernels: Vec<String> = m
            .kernels
            .iter()
            .map(|(k, us)| format!("{k} {us:.1}"))
            .collect();
        let us = |v: Option<f64>| v.map_or("-".into(), |us| format!("{us:.1}"));
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} |\n",
            m.case,
            us(m.device_us),
            us(m.step_us),
            m.wall_us,
            kernels.join(", ")
        ));
    }
    Ok(out)
}

fn bench_on<B: Backend>(
    backend: B,
    cfg: &MixerConfig,
    w: &Weights,
    a: &BenchArgs,
) -> Result<Vec<crate::bench::Measured>> {
    let m = Mixer::new(backend, cfg, w)?;
    a.cases
        .iter()
        .map(|&case| pollster::block_on(crate::bench::measure(&m, case, a.iters)))
        .collect()
}

fn run_path<B: Backend>(
    backend: B,
    cfg: &MixerConfig,
    w: &Weights,
    input: &InputFile,
    path: ExecPath,
) -> Result<Output> {
    let m = Mixer::new(backend, cfg, w)?;
    pollster::block_on(run_forward(&m, &input.as_input(), path))
}
