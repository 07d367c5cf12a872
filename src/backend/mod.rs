//! The `Backend` trait: device buffers and the mixer's kernels. The graph (`crate::graph`) drives
//! every path through this trait only, so a backend that implements it runs every path.

pub mod cpu;
pub mod wgpu;

use crate::config::MixerConfig;
use crate::error::{Error, Result};
use crate::tensors::HostTensor;

/// The device-side parameters of one mixer. Small per-channel tensors are widened to f32; the
/// two projections keep the backend's own weight format (which may stay 16-bit).
pub struct Params<B: Backend> {
    pub cfg: MixerConfig,
    pub in_proj: B::Weight,
    pub in_proj_bias: Option<B::Buf>,
    /// `(conv_dim, d_conv)`
    pub conv_weight: B::Buf,
    pub conv_bias: Option<B::Buf>,
    /// The per-head parameters in one buffer (fewer bindings: browsers allow 8 storage buffers
    /// per shader): `dt_bias (nheads) | A_log (nheads) | D (nheads, or d_inner with D_has_hdim)`.
    pub heads: B::Buf,
    pub norm_weight: Option<B::Buf>,
    pub out_proj: B::Weight,
    pub out_proj_bias: Option<B::Buf>,
}

/// A pair of state buffers: one conv state `(conv_dim, d_conv)` and one ssm state
/// `(nheads, headdim, d_state)` per entry. The slot pool, the prefix snapshots and the speculative
/// intermediates are all of this form.
pub struct States<B: Backend> {
    pub conv: B::Buf,
    pub ssm: B::Buf,
}

/// A state recorded inside a prefill pass: sequence `seq` after `pos` of its tokens (`pos >= 1`),
/// which is the end of chunk `chunk`, goes to entry `dest` of the snapshot buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snap {
    pub seq: usize,
    pub pos: usize,
    pub chunk: usize,
    pub dest: usize,
}

/// Packed sequences of one prefill pass, described on the host and mirrored on the device.
/// Sequence `i` owns rows `cu[i]..cu[i+1]` and reads and writes state slot `slots[i]` (-1: starts
/// from zero and writes nothing). Chunks never straddle two sequences: sequence `i` owns chunks
/// `seq_chunks[i]..seq_chunks[i+1]`, and chunk `c` owns rows `chunk_rows[c]..chunk_rows[c+1]`.
/// Every snapshot position ends a chunk.
pub struct Pack<B: Backend> {
    pub cu: Vec<i32>,
    pub slots: Vec<i32>,
    pub seq_chunks: Vec<i32>,
    pub chunk_rows: Vec<i32>,
    pub snaps: Vec<Snap>,
    pub dev_cu: B::Idx,
    pub dev_slots: B::Idx,
    pub dev_seq_chunks: B::Idx,
    pub dev_chunk_rows: B::Idx,
    /// `snaps` flattened as `(seq, pos, chunk, dest)` quadruples.
    pub dev_snaps: B::Idx,
}

impl<B: Backend> Pack<B> {
    pub fn rows(&self) -> usize {
        self.cu.last().map_or(0, |&r| r as usize)
    }

    pub fn seqs(&self) -> usize {
        self.slots.len()
    }

    pub fn chunks(&self) -> usize {
        self.chunk_rows.len() - 1
    }
}

/// Requests of one decode pass, each of one or more tokens run through the recurrence in order:
/// request `i` owns rows `cu[i]..cu[i+1]` and starts from slot `slots[i]` (-1: zero state,
/// nothing written). With `record[i] = -1` its final state goes back to the slot; otherwise the
/// state after each of its tokens `t` goes to entry `record[i] * stride + t` of the intermediate
/// buffers and the slot is left as it was. On the device the three are one buffer,
/// `cu (n+1) | slots (n) | record (n)`.
pub struct Decode<B: Backend> {
    pub slots: Vec<i32>,
    pub cu: Vec<i32>,
    pub record: Vec<i32>,
    pub stride: usize,
    pub dev: B::Idx,
}

impl<B: Backend> Decode<B> {
    pub fn rows(&self) -> usize {
        self.cu.last().map_or(0, |&r| r as usize)
    }

    pub fn requests(&self) -> usize {
        self.slots.len()
    }
}

/// Buffers and kernels. Row-major layouts throughout; `zxbcdt` is in_proj's output
/// `(rows, d_in_proj)` = `z | xBC | dt`, `xbc` the conv's output `(rows, conv_dim)`, `y` the scan's
/// output `(rows, d_inner)`.
pub trait Backend: Sized {
    /// An f32 device buffer.
    type Buf;
    /// An i32 device buffer (metadata).
    type Idx;
    /// A matmul weight `(n, k)` in the backend's storage format.
    type Weight;

    fn name(&self) -> &'static str;

    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    fn upload_idx(&self, data: &[i32]) -> Result<Self::Idx>;
    fn upload_weight(&self, w: &HostTensor) -> Result<Self::Weight>;
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer whose contents are unspecified, for outputs that an op writes whole.
    fn alloc(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// Reads ranges `(buffer, offset, len)` back to the host. Everything recorded so far is
    /// submitted once and awaited (asynchronously: browsers cannot block).
    fn read(
        &self,
        ranges: &[(&Self::Buf, usize, usize)],
    ) -> impl std::future::Future<Output = Result<Vec<Vec<f32>>>>;
    /// Writes `data` into `dst[off..]`.
    fn write(&self, dst: &mut Self::Buf, off: usize, data: &[f32]) -> Result<()>;
    /// Copies `len` values from `src[src_off..]` into `dst[dst_off..]`.
    fn copy(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_off: usize,
        len: usize,
    ) -> Result<()>;

    /// `out (rows, n) = x (rows, k) . w^T + bias`.
    fn matmul(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        bias: Option<&Self::Buf>,
        rows: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// Causal depthwise conv + SiLU over packed sequences: `xbc = silu(conv(xBC of zxbcdt))`,
    /// each sequence continuing from its slot's conv state, whose final state is written back;
    /// the conv state at each of `pack.snaps` goes to `snaps`.
    fn conv(
        &self,
        p: &Params<Self>,
        zxbcdt: &Self::Buf,
        pack: &Pack<Self>,
        pool: &mut Self::Buf,
        snaps: Option<&mut Self::Buf>,
        xbc: &mut Self::Buf,
    ) -> Result<()>;

    /// The conv of a decode pass: per token, shift the conv state by one column, append the new
    /// xBC column and convolve.
    fn conv_update(
        &self,
        p: &Params<Self>,
        zxbcdt: &Self::Buf,
        dec: &Decode<Self>,
        pool: &mut Self::Buf,
        inter: Option<&mut Self::Buf>,
        xbc: &mut Self::Buf,
    ) -> Result<()>;

    /// The SSD chunked scan over packed sequences, `y = ssm(x, dt, B, C) + D x`, each sequence
    /// starting from its slot's ssm state, whose final state is written back; the state at each
    /// of `pack.snaps` goes to `snaps`.
    #[allow(clippy::too_many_arguments)]
    fn ssd_scan(
        &self,
        p: &Params<Self>,
        zxbcdt: &Self::Buf,
        xbc: &Self::Buf,
        pack: &Pack<Self>,
        pool: &mut Self::Buf,
        snaps: Option<&mut Self::Buf>,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// The recurrence of a decode pass, token by token, on each request's ssm state.
    #[allow(clippy::too_many_arguments)]
    fn state_update(
        &self,
        p: &Params<Self>,
        zxbcdt: &Self::Buf,
        xbc: &Self::Buf,
        dec: &Decode<Self>,
        pool: &mut Self::Buf,
        inter: Option<&mut Self::Buf>,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// A whole decode pass, `(rows, d_model)` from `hidden (rows, d_model)`: in_proj, conv update,
    /// state update, gate and norm, out_proj. The default runs the ops one by one; a backend may
    /// fuse them.
    fn decode(
        &self,
        p: &Params<Self>,
        hidden: &Self::Buf,
        dec: &Decode<Self>,
        pool: &mut States<Self>,
        inter: Option<&mut States<Self>>,
    ) -> Result<Self::Buf> {
        decode_ops(self, p, hidden, dec, pool, inter)
    }

    /// Gate, norm and out_proj, the tail of both passes: `(rows, d_model)` from in_proj's
    /// `zxbcdt` and the scan's `y`. The default runs gated_norm, then matmul; a backend may fuse
    /// them.
    fn gate_out(
        &self,
        p: &Params<Self>,
        zxbcdt: &Self::Buf,
        y: &Self::Buf,
        rows: usize,
    ) -> Result<Self::Buf> {
        gate_out_ops(self, p, zxbcdt, y, rows)
    }

    /// Starts timing on the device, every kernel (`per_kernel`) or every step (all that is recorded
    /// between two readbacks, as one entry "step"); false when the backend cannot.
    fn profile_start(&self, _per_kernel: bool) -> Result<bool> {
        Ok(false)
    }

    /// The device time of each kernel read back since `profile_start` or the last call:
    /// (kernel, nanoseconds).
    fn profile_take(&self) -> Vec<(&'static str, f64)> {
        vec![]
    }

    /// The gate and the group-wise RMSNorm (in the configured order): `out (rows, d_inner)`.
    fn gated_norm(
        &self,
        p: &Params<Self>,
        zxbcdt: &Self::Buf,
        y: &Self::Buf,
        rows: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
}

/// The decode pass op by op (`Backend::decode`'s default).
pub fn decode_ops<B: Backend>(
    b: &B,
    p: &Params<B>,
    hidden: &B::Buf,
    dec: &Decode<B>,
    pool: &mut States<B>,
    inter: Option<&mut States<B>>,
) -> Result<B::Buf> {
    let cfg = &p.cfg;
    let rows = dec.rows();
    let (inter_conv, inter_ssm) = split(inter);
    let zxbcdt = in_proj(b, p, hidden, rows)?;
    let mut xbc = b.alloc(rows * cfg.conv_dim())?;
    b.conv_update(p, &zxbcdt, dec, &mut pool.conv, inter_conv, &mut xbc)?;
    let mut y = b.alloc(rows * cfg.d_inner())?;
    b.state_update(p, &zxbcdt, &xbc, dec, &mut pool.ssm, inter_ssm, &mut y)?;
    b.gate_out(p, &zxbcdt, &y, rows)
}

/// The conv and ssm halves of an optional pair of state buffers.
pub fn split<B: Backend>(s: Option<&mut States<B>>) -> (Option<&mut B::Buf>, Option<&mut B::Buf>) {
    match s {
        Some(s) => (Some(&mut s.conv), Some(&mut s.ssm)),
        None => (None, None),
    }
}

/// in_proj: the head of both passes, `zxbcdt (rows, d_in_proj)`.
pub fn in_proj<B: Backend>(b: &B, p: &Params<B>, hidden: &B::Buf, rows: usize) -> Result<B::Buf> {
    let mut zxbcdt = b.alloc(rows * p.cfg.d_in_proj())?;
    b.matmul(
        hidden,
        &p.in_proj,
        p.in_proj_bias.as_ref(),
        rows,
        &mut zxbcdt,
    )?;
    Ok(zxbcdt)
}

/// Gate, norm and out_proj op by op (`Backend::gate_out`'s default).
pub fn gate_out_ops<B: Backend>(
    b: &B,
    p: &Params<B>,
    zxbcdt: &B::Buf,
    y: &B::Buf,
    rows: usize,
) -> Result<B::Buf> {
    let cfg = &p.cfg;
    let mut gated = b.alloc(rows * cfg.d_inner())?;
    b.gated_norm(p, zxbcdt, y, rows, &mut gated)?;
    let mut out = b.alloc(rows * cfg.d_model)?;
    b.matmul(
        &gated,
        &p.out_proj,
        p.out_proj_bias.as_ref(),
        rows,
        &mut out,
    )?;
    Ok(out)
}

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// wgpu on a hardware GPU when there is one, else the CPU.
    Auto,
    Cpu,
    Wgpu,
    Cuda,
}

/// An opened backend, chosen at run time.
pub enum Opened {
    Cpu(cpu::Cpu),
    Wgpu(wgpu::Wgpu),
}

impl Opened {
    pub fn name(&self) -> String {
        match self {
            Opened::Cpu(_) => "cpu".into(),
            Opened::Wgpu(w) => {
                let (f16, subgroups) = w.features_in_use();
                let mut name = format!("wgpu ({}", w.adapter_name());
                let coop = w.uses_coop();
                for (on, feature) in [
                    (f16, "shader-f16"),
                    (subgroups, "subgroups"),
                    (coop, "cooperative matrices"),
                ] {
                    if on {
                        name.push_str(", ");
                        name.push_str(feature);
                    }
                }
                name + ")"
            }
        }
    }
}

impl Kind {
    /// Opens the backend. `Auto` takes a hardware GPU through wgpu when there is one (a software
    /// rasteriser such as lavapipe is slower than the CPU backend), else the CPU.
    pub async fn open(self) -> Result<Opened> {
        match self {
            Kind::Cpu => Ok(Opened::Cpu(cpu::Cpu)),
            Kind::Wgpu => Ok(Opened::Wgpu(
                wgpu::Wgpu::new(wgpu::WgpuOptions::default()).await?,
            )),
            Kind::Auto => match wgpu::Wgpu::new(wgpu::WgpuOptions::default()).await {
                Ok(w) if !w.is_software() => Ok(Opened::Wgpu(w)),
                _ => Ok(Opened::Cpu(cpu::Cpu)),
            },
            Kind::Cuda => Err(Error::Backend {
                backend: "cuda",
                msg: "not available in this build (built without the cuda backend)".into(),
            }),
        }
    }
}
