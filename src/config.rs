//! The mixer's configuration: every field of Megatron-LM's `MambaMixer`, with its defaults and names.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Configuration of one Mamba-2 mixer. JSON field names are exactly Megatron's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixerConfig {
    pub d_model: usize,
    #[serde(default = "defaults::d_state")]
    pub d_state: usize,
    #[serde(default = "defaults::d_conv")]
    pub d_conv: usize,
    /// Conv weights are drawn from U(-conv_init, conv_init) when set.
    #[serde(default)]
    pub conv_init: Option<f64>,
    #[serde(default = "defaults::expand")]
    pub expand: usize,
    #[serde(default = "defaults::headdim")]
    pub headdim: usize,
    #[serde(default = "defaults::ngroups")]
    pub ngroups: usize,
    #[serde(rename = "A_init_range", default = "defaults::a_init_range")]
    pub a_init_range: (f64, f64),
    /// D has one value per channel (nheads * headdim) instead of one per head.
    #[serde(rename = "D_has_hdim", default)]
    pub d_has_hdim: bool,
    #[serde(default = "defaults::yes")]
    pub rmsnorm: bool,
    #[serde(default)]
    pub norm_before_gate: bool,
    #[serde(default = "defaults::dt_min")]
    pub dt_min: f64,
    #[serde(default = "defaults::dt_max")]
    pub dt_max: f64,
    /// Kept for Megatron compatibility; Mamba-2 draws dt_bias from dt_min..dt_max either way.
    #[serde(default = "defaults::dt_init")]
    pub dt_init: String,
    /// Kept for Megatron compatibility; unused by Mamba-2's initialisation.
    #[serde(default = "defaults::dt_scale")]
    pub dt_scale: f64,
    #[serde(default = "defaults::dt_init_floor")]
    pub dt_init_floor: f64,
    #[serde(default)]
    pub bias: bool,
    #[serde(default = "defaults::yes")]
    pub conv_bias: bool,
    #[serde(default = "defaults::chunk_size")]
    pub chunk_size: usize,
    /// Clamp of dt after softplus; `null` as upper bound (None) means unbounded.
    #[serde(default = "defaults::dt_limit")]
    pub dt_limit: (f64, Option<f64>),
    #[serde(default = "defaults::norm_eps")]
    pub norm_eps: f64,
}

mod defaults {
    pub fn d_state() -> usize {
        128
    }
    pub fn d_conv() -> usize {
        4
    }
    pub fn expand() -> usize {
        2
    }
    pub fn headdim() -> usize {
        64
    }
    pub fn ngroups() -> usize {
        8
    }
    pub fn a_init_range() -> (f64, f64) {
        (1.0, 16.0)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn dt_min() -> f64 {
        0.001
    }
    pub fn dt_max() -> f64 {
        0.1
    }
    pub fn dt_init() -> String {
        "random".into()
    }
    pub fn dt_scale() -> f64 {
        1.0
    }
    pub fn dt_init_floor() -> f64 {
        1e-4
    }
    pub fn chunk_size() -> usize {
        128
    }
    pub fn dt_limit() -> (f64, Option<f64>) {
        (0.0, None)
    }
    pub fn norm_eps() -> f64 {
        1e-5
    }
}

/// The largest conv width the kernels support (the conv state keeps this many columns).
pub const MAX_D_CONV: usize = 8;

impl MixerConfig {
    /// A configuration with Megatron's defaults for the given width.
    pub fn new(d_model: usize) -> Self {
        MixerConfig {
            d_model,
            d_state: defaults::d_state(),
            d_conv: defaults::d_conv(),
            conv_init: None,
            expand: defaults::expand(),
            headdim: defaults::headdim(),
            ngroups: defaults::ngroups(),
            a_init_range: defaults::a_init_range(),
            d_has_hdim: false,
            rmsnorm: true,
            norm_before_gate: false,
            dt_min: defaults::dt_min(),
            dt_max: defaults::dt_max(),
            dt_init: defaults::dt_init(),
            dt_scale: defaults::dt_scale(),
            dt_init_floor: defaults::dt_init_floor(),
            bias: false,
            conv_bias: true,
            chunk_size: defaults::chunk_size(),
            dt_limit: defaults::dt_limit(),
            norm_eps: defaults::norm_eps(),
        }
    }

    /// Parses and validates a JSON configuration.
    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: MixerConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            // Name the field whose value is wrong, not only the line and column.
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || inner.is_syntax() || inner.is_eof() {
                Error::config(inner.to_string())
            } else {
                Error::config(format!("{path}: {inner}"))
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        // Plain fields only: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every field and every derived size; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::config(format!("{name} must be positive, got 0")))
            } else {
                Ok(())
            }
        };
        positive("d_model", self.d_model)?;
        positive("d_state", self.d_state)?;
        positive("expand", self.expand)?;
        positive("headdim", self.headdim)?;
        positive("ngroups", self.ngroups)?;
        if !(1..=MAX_D_CONV).contains(&self.d_conv) {
            return Err(Error::config(format!(
                "d_conv must be in 1..={MAX_D_CONV}, got {}",
                self.d_conv
            )));
        }
        if !self.chunk_size.is_power_of_two() {
            return Err(Error::config(format!(
                "chunk_size must be a power of two, got {}",
                self.chunk_size
            )));
        }
        let d_inner = self.d_inner();
        if !d_inner.is_multiple_of(self.headdim) {
            return Err(Error::config(format!(
                "headdim {} does not divide d_inner = expand * d_model = {d_inner}",
                self.headdim
            )));
        }
        let nheads = self.nheads();
        if !nheads.is_multiple_of(self.ngroups) {
            return Err(Error::config(format!(
                "ngroups {} does not divide nheads = d_inner / headdim = {nheads}",
                self.ngroups
            )));
        }
        let finite = |name: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::config(format!("{name} must be finite, got {v}")))
            }
        };
        let (a_lo, a_hi) = self.a_init_range;
        finite("A_init_range", a_lo)?;
        finite("A_init_range", a_hi)?;
        if !(a_lo > 0.0 && a_hi >= a_lo) {
            return Err(Error::config(format!(
                "A_init_range must satisfy 0 < low <= high, got [{a_lo}, {a_hi}]"
            )));
        }
        finite("dt_min", self.dt_min)?;
        finite("dt_max", self.dt_max)?;
        if !(self.dt_min > 0.0 && self.dt_max >= self.dt_min) {
            return Err(Error::config(format!(
                "dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {} and {}",
                self.dt_min, self.dt_max
            )));
        }
        finite("dt_init_floor", self.dt_init_floor)?;
        if self.dt_init_floor < 0.0 {
            return Err(Error::config(format!(
                "dt_init_floor must be >= 0, got {}",
                self.dt_init_floor
            )));
        }
        if self.dt_init != "random" && self.dt_init != "constant" {
            return Err(Error::config(format!(
                "dt_init must be \"random\" or \"constant\", got {:?}",
                self.dt_init
            )));
        }
        finite("dt_scale", self.dt_scale)?;
        if self.dt_scale <= 0.0 {
            return Err(Error::config(format!(
                "dt_scale must be positive, got {}",
                self.dt_scale
            )));
        }
        if let Some(c) = self.conv_init {
            finite("conv_init", c)?;
            if c <= 0.0 {
                return Err(Error::config(format!(
                    "conv_init must be positive or null, got {c}"
                )));
            }
        }
        let (lo, hi) = self.dt_limit;
        finite("dt_limit", lo)?;
        if hi.is_some_and(f64::is_nan) || lo < 0.0 || hi.is_some_and(|hi| hi <= lo) {
            return Err(Error::config(format!(
                "dt_limit must satisfy 0 <= low < high (high null for no bound), got [{lo}, {hi:?}]"
            )));
        }
        finite("norm_eps", self.norm_eps)?;
        if self.norm_eps <= 0.0 {
            return Err(Error::config(format!(
                "norm_eps must be positive, got {}",
                self.norm_eps
            )));
        }
        Ok(())
    }

    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    pub fn nheads(&self) -> usize {
        self.d_inner() / self.headdim
    }

    /// Channels of the causal conv: x, B and C.
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.ngroups * self.d_state
    }

    /// Rows of in_proj: z, xBC and dt.
    pub fn d_in_proj(&self) -> usize {
        2 * self.d_inner() + 2 * self.ngroups * self.d_state + self.nheads()
    }

    /// Heads that share one group's B and C.
    pub fn heads_per_group(&self) -> usize {
        self.nheads() / self.ngroups
    }

    /// Length of D: one value per head, or per channel with D_has_hdim.
    pub fn d_len(&self) -> usize {
        if self.d_has_hdim {
            self.d_inner()
        } else {
            self.nheads()
        }
    }

    /// Megatron's `mamba_state_shapes_per_request`: the conv state `(conv_dim, d_conv)` and the
    /// ssm state `(nheads, headdim, d_state)` that one request carries.
    pub fn state_shapes_per_request(&self) -> ([usize; 2], [usize; 3]) {
        (
            [self.conv_dim(), self.d_conv],
            [self.nheads(), self.headdim, self.d_state],
        )
    }

    pub fn conv_state_len(&self) -> usize {
        self.conv_dim() * self.d_conv
    }

    pub fn ssm_state_len(&self) -> usize {
        self.nheads() * self.headdim * self.d_state
    }
}
