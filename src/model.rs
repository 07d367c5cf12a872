//! A mixer ready to run: its config and its parameters uploaded to one backend.

use crate::backend::{Backend, Params};
use crate::config::MixerConfig;
use crate::error::Result;
use crate::weights::Weights;

pub struct Mixer<B: Backend> {
    pub backend: B,
    pub params: Params<B>,
}

impl<B: Backend> Mixer<B> {
    /// Checks the weights against the config, then uploads them.
    pub fn new(backend: B, cfg: &MixerConfig, w: &Weights) -> Result<Self> {
        w.check(cfg)?;
        let up = |t: &crate::tensors::HostTensor| backend.upload(&t.to_f32());
        let up_opt = |t: &Option<crate::tensors::HostTensor>| t.as_ref().map(up).transpose();
        let params = Params {
            cfg: cfg.clone(),
            in_proj: backend.upload_weight(&w.in_proj)?,
            in_proj_bias: up_opt(&w.in_proj_bias)?,
            conv_weight: up(&w.conv_weight)?,
            conv_bias: up_opt(&w.conv_bias)?,
            heads: backend
                .upload(&[w.dt_bias.to_f32(), w.a_log.to_f32(), w.d.to_f32()].concat())?,
            norm_weight: up_opt(&w.norm_weight)?,
            out_proj: backend.upload_weight(&w.out_proj)?,
            out_proj_bias: up_opt(&w.out_proj_bias)?,
        };
        Ok(Mixer { backend, params })
    }

    pub fn config(&self) -> &MixerConfig {
        &self.params.cfg
    }
}
