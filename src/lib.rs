//! mamba-mixer: the Mamba-2 mixer (Megatron-LM's `MambaMixer`) with one graph over several
//! backends. Data flows one way: `config` -> `weights` -> `model` (weights on a backend) ->
//! `graph` (the execution paths) -> `backend` ops.

pub mod backend;
#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
#[cfg(not(target_arch = "wasm32"))]
pub mod cli;
pub mod config;
pub mod error;
pub mod graph;
pub mod model;
pub mod tensors;
pub mod weights;

pub use backend::{cpu::Cpu, Backend};
pub use config::MixerConfig;
pub use error::{Error, Result};
pub use graph::{forward, Engine, EngineConfig, Input, Output, Path, Request, RequestOutput, Work};
pub use model::Mixer;
pub use weights::Weights;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;
