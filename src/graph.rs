//! The execution paths, written once over the `Backend` trait: the full-sequence (prefill) pass
//! over packed sequences and the decode step, both reading and writing per-sequence state slots.

use crate::backend::{Backend, Pack, Slots};
use crate::config::MixerConfig;
use crate::error::{Error, Result};
use crate::model::Mixer;

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

/// How the input's rows form sequences: `rows[i]` lists sequence i's rows of `hidden` in order.
struct Layout {
    rows: Vec<Vec<usize>>,
}

impl Input<'_> {
    /// Checks every length against the config; errors name the tensor.
    fn layout(&self, cfg: &MixerConfig) -> Result<Layout> {
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
                let mut full = vec![n];
                full.extend_from_slice(shape);
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
        Ok(Layout { rows })
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

/// Builds the host metadata of one prefill pass (chunks cut at every sequence start and every
/// `chunk_size` tokens after it) and uploads it once.
pub fn pack<B: Backend>(
    backend: &B,
    cu: Vec<i32>,
    slots: Vec<i32>,
    chunk_size: usize,
) -> Result<Pack<B>> {
    let mut seq_chunks = vec![0i32];
    let mut chunk_rows = vec![0i32];
    for w in cu.windows(2) {
        let mut r = w[0];
        while r < w[1] {
            r = (r + chunk_size as i32).min(w[1]);
            chunk_rows.push(r);
        }
        seq_chunks.push(chunk_rows.len() as i32 - 1);
    }
    Ok(Pack {
        dev_cu: backend.upload_idx(&cu)?,
        dev_slots: backend.upload_idx(&slots)?,
        dev_seq_chunks: backend.upload_idx(&seq_chunks)?,
        dev_chunk_rows: backend.upload_idx(&chunk_rows)?,
        cu,
        slots,
        seq_chunks,
        chunk_rows,
    })
}

/// Per-slot state pools on the device.
pub struct States<B: Backend> {
    pub conv: B::Buf,
    pub ssm: B::Buf,
}

/// One prefill pass: `hidden (rows, d_model)` packed as `pack` says; returns `(rows, d_model)`.
pub fn prefill<B: Backend>(
    m: &Mixer<B>,
    hidden: &B::Buf,
    pack: &Pack<B>,
    states: &mut States<B>,
) -> Result<B::Buf> {
    let (b, p) = (&m.backend, &m.params);
    let cfg = &p.cfg;
    let rows = pack.rows();
    let mut zxbcdt = b.zeros(rows * cfg.d_in_proj())?;
    b.matmul(
        hidden,
        &p.in_proj,
        p.in_proj_bias.as_ref(),
        rows,
        &mut zxbcdt,
    )?;
    let mut xbc = b.zeros(rows * cfg.conv_dim())?;
    b.conv(p, &zxbcdt, pack, &mut states.conv, &mut xbc)?;
    let mut y = b.zeros(rows * cfg.d_inner())?;
    b.ssd_scan(p, &zxbcdt, &xbc, pack, &mut states.ssm, &mut y)?;
    finish(m, &zxbcdt, &y, rows)
}

/// One decode step: one token per request, `hidden (rows, d_model)`; returns `(rows, d_model)`.
pub fn decode<B: Backend>(
    m: &Mixer<B>,
    hidden: &B::Buf,
    slots: &Slots<B>,
    states: &mut States<B>,
) -> Result<B::Buf> {
    let (b, p) = (&m.backend, &m.params);
    let cfg = &p.cfg;
    let rows = slots.slots.len();
    let mut zxbcdt = b.zeros(rows * cfg.d_in_proj())?;
    b.matmul(
        hidden,
        &p.in_proj,
        p.in_proj_bias.as_ref(),
        rows,
        &mut zxbcdt,
    )?;
    let mut xbc = b.zeros(rows * cfg.conv_dim())?;
    b.conv_update(p, &zxbcdt, slots, &mut states.conv, &mut xbc)?;
    let mut y = b.zeros(rows * cfg.d_inner())?;
    b.state_update(p, &zxbcdt, &xbc, slots, &mut states.ssm, &mut y)?;
    finish(m, &zxbcdt, &y, rows)
}

/// Gate, norm and out_proj: the tail shared by every path.
fn finish<B: Backend>(m: &Mixer<B>, zxbcdt: &B::Buf, y: &B::Buf, rows: usize) -> Result<B::Buf> {
    let (b, p) = (&m.backend, &m.params);
    let cfg = &p.cfg;
    let mut gated = b.zeros(rows * cfg.d_inner())?;
    b.gated_norm(p, zxbcdt, y, rows, &mut gated)?;
    let mut out = b.zeros(rows * cfg.d_model)?;
    b.matmul(
        &gated,
        &p.out_proj,
        p.out_proj_bias.as_ref(),
        rows,
        &mut out,
    )?;
    Ok(out)
}

/// Uploads the input's initial states (zeros where absent) as pools with one slot per sequence.
fn initial_states<B: Backend>(m: &Mixer<B>, input: &Input, n: usize) -> Result<States<B>> {
    let cfg = m.config();
    let load = |given: Option<&[f32]>, len: usize| match given {
        Some(v) => m.backend.upload(v),
        None => m.backend.zeros(n * len),
    };
    Ok(States {
        conv: load(input.conv_state, cfg.conv_state_len())?,
        ssm: load(input.ssm_state, cfg.ssm_state_len())?,
    })
}

fn output<B: Backend>(m: &Mixer<B>, out: Vec<f32>, states: &States<B>) -> Result<Output> {
    Ok(Output {
        output: out,
        conv_state: m.backend.download(&states.conv)?,
        ssm_state: m.backend.download(&states.ssm)?,
    })
}

/// The full-sequence path: every sequence in one packed prefill pass (chunked SSD scan).
pub fn forward_full<B: Backend>(m: &Mixer<B>, input: &Input) -> Result<Output> {
    let cfg = m.config();
    let d = cfg.d_model;
    let layout = input.layout(cfg)?;
    let n = layout.rows.len();
    let mut states = initial_states(m, input, n)?;
    // Sequence-major rows: each sequence contiguous, as the packed kernels expect.
    let order: Vec<usize> = layout.rows.iter().flatten().copied().collect();
    let mut packed = Vec::with_capacity(order.len() * d);
    for &r in &order {
        packed.extend_from_slice(&input.hidden[r * d..(r + 1) * d]);
    }
    let mut cu = vec![0i32];
    for rows in &layout.rows {
        cu.push(cu[cu.len() - 1] + rows.len() as i32);
    }
    let pk = pack(&m.backend, cu, (0..n as i32).collect(), cfg.chunk_size)?;
    let hidden = m.backend.upload(&packed)?;
    let out = m
        .backend
        .download(&prefill(m, &hidden, &pk, &mut states)?)?;
    let mut result = vec![0.0; input.hidden.len()];
    for (i, &r) in order.iter().enumerate() {
        result[r * d..(r + 1) * d].copy_from_slice(&out[i * d..(i + 1) * d]);
    }
    output(m, result, &states)
}

/// The decode path: the tokens fed one step at a time, every sequence with a token left
/// advancing by one token per step.
pub fn forward_decode<B: Backend>(m: &Mixer<B>, input: &Input) -> Result<Output> {
    let d = m.config().d_model;
    let layout = input.layout(m.config())?;
    let n = layout.rows.len();
    let mut states = initial_states(m, input, n)?;
    let mut result = vec![0.0; input.hidden.len()];
    let steps = layout.rows.iter().map(Vec::len).max().unwrap_or(0);
    for t in 0..steps {
        let active: Vec<usize> = (0..n).filter(|&s| layout.rows[s].len() > t).collect();
        let mut rows = Vec::with_capacity(active.len() * d);
        for &s in &active {
            let r = layout.rows[s][t];
            rows.extend_from_slice(&input.hidden[r * d..(r + 1) * d]);
        }
        let slot_ids: Vec<i32> = active.iter().map(|&s| s as i32).collect();
        let slots = Slots {
            dev: m.backend.upload_idx(&slot_ids)?,
            slots: slot_ids,
        };
        let hidden = m.backend.upload(&rows)?;
        let out = m
            .backend
            .download(&decode(m, &hidden, &slots, &mut states)?)?;
        for (i, &s) in active.iter().enumerate() {
            let r = layout.rows[s][t];
            result[r * d..(r + 1) * d].copy_from_slice(&out[i * d..(i + 1) * d]);
        }
    }
    output(m, result, &states)
}
