//! The reference backend: f32 on the host, threaded with rayon, GEMM by matrixmultiply.
//! Exponents of decays are summed in f64 so long chunks lose no precision.

use rayon::prelude::*;

use super::{Backend, Decode, Pack, Params};
use crate::config::MixerConfig;
use crate::error::{Error, Result};
use crate::tensors::HostTensor;

#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

/// A matmul weight `(n, k)` widened to f32.
pub struct CpuWeight {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `softplus(raw + bias)` clamped to dt_limit, as mamba_ssm (linear above 20).
fn dt_of(cfg: &MixerConfig, raw: f32, bias: f32) -> f32 {
    let v = raw + bias;
    let dt = if v > 20.0 { v } else { v.exp().ln_1p() };
    let (lo, hi) = cfg.dt_limit;
    let dt = dt.max(lo as f32);
    match hi {
        Some(hi) => dt.min(hi as f32),
        None => dt,
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn check_len(what: &str, len: usize, need: usize) -> Result<()> {
    if len < need {
        Err(Error::Backend {
            backend: "cpu",
            msg: format!("buffer {what} holds {len} values, the op needs {need}"),
        })
    } else {
        Ok(())
    }
}

/// Every slot (but -1, padding) must index a whole state of `len` values in `pool_len`.
fn check_slots(op: &str, slots: &[i32], pool_len: usize, len: usize) -> Result<()> {
    match slots
        .iter()
        .find(|&&s| s < -1 || (s >= 0 && (s as usize + 1) * len > pool_len))
    {
        Some(s) => Err(Error::Backend {
            backend: "cpu",
            msg: format!(
                "{op}: slot {s} is outside the state pool of {} slots",
                pool_len / len
            ),
        }),
        None => Ok(()),
    }
}

/// What one (sequence, head) task of a scan produces.
struct Scanned {
    out: Vec<f32>,
    state: Vec<f32>,
    /// States to record: (entry, state).
    recorded: Vec<(usize, Vec<f32>)>,
}

/// Writes what the (group, head) tasks of a scan produced, task `g * nh + h`: the group's rows
/// of y from row `start(g)`, its final state into slot `keep(g)` if any, and the states it
/// recorded into `saved` (entry `e` of `saved` holds one state of every head).
#[allow(clippy::too_many_arguments)]
fn write_back(
    what: &str,
    results: Vec<Scanned>,
    (nh, hd, di): (usize, usize, usize),
    start: impl Fn(usize) -> usize,
    keep: impl Fn(usize) -> Option<usize>,
    y: &mut [f32],
    pool: &mut [f32],
    mut saved: Option<&mut Vec<f32>>,
) -> Result<()> {
    for (task, res) in results.into_iter().enumerate() {
        let (g, h) = (task / nh, task % nh);
        let sl = res.state.len();
        for (i, row) in res.out.chunks(hd).enumerate() {
            y[(start(g) + i) * di + h * hd..][..hd].copy_from_slice(row);
        }
        if let Some(slot) = keep(g) {
            pool[(slot * nh + h) * sl..][..sl].copy_from_slice(&res.state);
        }
        if let Some(buf) = saved.as_deref_mut() {
            for (entry, st) in res.recorded {
                let at = (entry * nh + h) * sl;
                check_len(what, buf.len(), at + sl)?;
                buf[at..at + sl].copy_from_slice(&st);
            }
        }
    }
    Ok(())
}

/// Column offsets inside one row of in_proj's output and of the conv's output.
struct Cols {
    /// in_proj row: xBC starts here (after z).
    xbc: usize,
    /// in_proj row: dt starts here.
    dt: usize,
    /// conv row: B starts here (after x); C follows the ngroups B blocks.
    b: usize,
    c: usize,
}

impl Cols {
    fn new(cfg: &MixerConfig) -> Self {
        let di = cfg.d_inner();
        let gs = cfg.ngroups * cfg.d_state;
        Cols {
            xbc: di,
            dt: di + cfg.conv_dim(),
            b: di,
            c: di + gs,
        }
    }
}

/// The per-head constants of the scan.
struct Head<'a> {
    cfg: &'a MixerConfig,
    h: usize,
    a: f64,
    dt_bias: f32,
    d: &'a [f32],
    x_off: usize,
    b_off: usize,
    c_off: usize,
}

impl<'a> Head<'a> {
    fn new(cfg: &'a MixerConfig, p: &'a Params<Cpu>, h: usize) -> Self {
        let cols = Cols::new(cfg);
        let (hd, ds) = (cfg.headdim, cfg.d_state);
        let g = h / cfg.heads_per_group();
        let nh = cfg.nheads();
        let (dt_bias, rest) = p.heads.split_at(nh);
        let (a_log, d_all) = rest.split_at(nh);
        let d = if cfg.d_has_hdim {
            &d_all[h * hd..(h + 1) * hd]
        } else {
            &d_all[h..h + 1]
        };
        Head {
            cfg,
            h,
            a: -(a_log[h] as f64).exp(),
            dt_bias: dt_bias[h],
            d,
            x_off: h * hd,
            b_off: cols.b + g * ds,
            c_off: cols.c + g * ds,
        }
    }

    fn d_at(&self, i: usize) -> f32 {
        if self.cfg.d_has_hdim {
            self.d[i]
        } else {
            self.d[0]
        }
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Idx = Vec<i32>;
    type Weight = CpuWeight;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn upload_idx(&self, data: &[i32]) -> Result<Vec<i32>> {
        Ok(data.to_vec())
    }

    fn upload_weight(&self, w: &HostTensor) -> Result<CpuWeight> {
        let [n, k] = w.shape[..] else {
            return Err(Error::Backend {
                backend: "cpu",
                msg: format!("a matmul weight must be 2-D, got shape {:?}", w.shape),
            });
        };
        Ok(CpuWeight {
            n,
            k,
            data: w.to_f32(),
        })
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn read(
        &self,
        ranges: &[(&Vec<f32>, usize, usize)],
    ) -> impl std::future::Future<Output = Result<Vec<Vec<f32>>>> {
        let read = |&(src, off, len): &(&Vec<f32>, usize, usize)| {
            check_len("read source", src.len(), off + len)?;
            Ok(src[off..off + len].to_vec())
        };
        std::future::ready(ranges.iter().map(read).collect())
    }

    fn write(&self, dst: &mut Vec<f32>, off: usize, data: &[f32]) -> Result<()> {
        check_len("write destination", dst.len(), off + data.len())?;
        dst[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn copy(
        &self,
        src: &Vec<f32>,
        src_off: usize,
        dst: &mut Vec<f32>,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        check_len("copy source", src.len(), src_off + len)?;
        check_len("copy destination", dst.len(), dst_off + len)?;
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
        Ok(())
    }

    fn matmul(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        bias: Option<&Vec<f32>>,
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (n, k) = (w.n, w.k);
        check_len("matmul x", x.len(), rows * k)?;
        check_len("matmul out", out.len(), rows * n)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        // SAFETY: the slices hold rows*k, n*k and rows*n values (checked above), and the strides
        // describe x and out row-major and w transposed, all inside those bounds.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                w.data.as_ptr(),
                1,
                k as isize,
                0.0,
                out.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        if let Some(b) = bias {
            check_len("matmul bias", b.len(), n)?;
            out[..rows * n]
                .par_chunks_mut(n)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        }
        Ok(())
    }

    fn conv(
        &self,
        p: &Params<Self>,
        zxbcdt: &Vec<f32>,
        pack: &Pack<Self>,
        pool: &mut Vec<f32>,
        snaps: Option<&mut Vec<f32>>,
        xbc: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (cd, dc, dip) = (cfg.conv_dim(), cfg.d_conv, cfg.d_in_proj());
        let off = Cols::new(cfg).xbc;
        let rows = pack.rows();
        check_len("conv zxbcdt", zxbcdt.len(), rows * dip)?;
        check_len("conv xbc", xbc.len(), rows * cd)?;
        check_slots("conv", &pack.slots, pool.len(), cd * dc)?;
        let w = &p.conv_weight;
        let old = &*pool;
        xbc[..rows * cd]
            .par_chunks_mut(cd)
            .enumerate()
            .for_each(|(r, out)| {
                let seq = pack.cu.partition_point(|&c| c as usize <= r) - 1;
                let start = pack.cu[seq] as usize;
                let slot = pack.slots[seq];
                for (c, o) in out.iter_mut().enumerate() {
                    let mut acc = p.conv_bias.as_ref().map_or(0.0, |b| b[c]);
                    for j in 0..dc {
                        // Input r - (dc-1) + j: a row of this sequence, or a state column.
                        let src = (r + j + 1) as isize - dc as isize;
                        let v = if src >= start as isize {
                            zxbcdt[src as usize * dip + off + c]
                        } else if slot < 0 {
                            0.0
                        } else {
                            let col = (dc as isize + src - start as isize) as usize;
                            old[(slot as usize * cd + c) * dc + col]
                        };
                        acc += w[c * dc + j] * v;
                    }
                    *o = silu(acc);
                }
            });
        // The state after `pos` tokens is the last dc columns of [old state | the first pos
        // xBC columns]. Snapshots first: they read the old state that the final write replaces.
        let state_at = |seq: usize, pos: usize, c: usize, i: usize| {
            let e = pos + i;
            if e >= dc {
                zxbcdt[(pack.cu[seq] as usize + e - dc) * dip + off + c]
            } else if pack.slots[seq] < 0 {
                0.0
            } else {
                old[(pack.slots[seq] as usize * cd + c) * dc + e]
            }
        };
        let mut finals = vec![];
        if let Some(buf) = snaps {
            for snap in &pack.snaps {
                check_len("conv snapshots", buf.len(), (snap.dest + 1) * cd * dc)?;
                for c in 0..cd {
                    for i in 0..dc {
                        buf[(snap.dest * cd + c) * dc + i] = state_at(snap.seq, snap.pos, c, i);
                    }
                }
            }
        }
        for seq in 0..pack.seqs() {
            if pack.slots[seq] >= 0 {
                let len = (pack.cu[seq + 1] - pack.cu[seq]) as usize;
                let st: Vec<f32> = (0..cd * dc)
                    .map(|k| state_at(seq, len, k / dc, k % dc))
                    .collect();
                finals.push((pack.slots[seq] as usize, st));
            }
        }
        for (slot, st) in finals {
            pool[slot * cd * dc..(slot + 1) * cd * dc].copy_from_slice(&st);
        }
        Ok(())
    }

    fn conv_update(
        &self,
        p: &Params<Self>,
        zxbcdt: &Vec<f32>,
        dec: &Decode<Self>,
        pool: &mut Vec<f32>,
        mut inter: Option<&mut Vec<f32>>,
        xbc: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (cd, dc, dip) = (cfg.conv_dim(), cfg.d_conv, cfg.d_in_proj());
        let sl = cd * dc;
        let off = Cols::new(cfg).xbc;
        let rows = dec.rows();
        check_len("conv_update zxbcdt", zxbcdt.len(), rows * dip)?;
        check_len("conv_update xbc", xbc.len(), rows * cd)?;
        check_slots("conv_update", &dec.slots, pool.len(), sl)?;
        for i in 0..dec.requests() {
            let (slot, rec) = (dec.slots[i], dec.record[i]);
            let (r0, r1) = (dec.cu[i] as usize, dec.cu[i + 1] as usize);
            let mut st = if slot >= 0 {
                pool[slot as usize * sl..][..sl].to_vec()
            } else {
                vec![0.0; sl]
            };
            for (t, r) in (r0..r1).enumerate() {
                for c in 0..cd {
                    let win = &mut st[c * dc..(c + 1) * dc];
                    win.rotate_left(1);
                    win[dc - 1] = zxbcdt[r * dip + off + c];
                    let acc = p.conv_bias.as_ref().map_or(0.0, |b| b[c])
                        + dot(&p.conv_weight[c * dc..(c + 1) * dc], win);
                    xbc[r * cd + c] = silu(acc);
                }
                if let (true, Some(buf)) = (rec >= 0, inter.as_deref_mut()) {
                    let at = (rec as usize * dec.stride + t) * sl;
                    check_len("conv_update intermediates", buf.len(), at + sl)?;
                    buf[at..at + sl].copy_from_slice(&st);
                }
            }
            if rec < 0 && slot >= 0 {
                pool[slot as usize * sl..][..sl].copy_from_slice(&st);
            }
        }
        Ok(())
    }

    fn ssd_scan(
        &self,
        p: &Params<Self>,
        zxbcdt: &Vec<f32>,
        xbc: &Vec<f32>,
        pack: &Pack<Self>,
        pool: &mut Vec<f32>,
        snaps: Option<&mut Vec<f32>>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (nh, hd, ds) = (cfg.nheads(), cfg.headdim, cfg.d_state);
        let (cd, dip, di) = (cfg.conv_dim(), cfg.d_in_proj(), cfg.d_inner());
        let dt_col = Cols::new(cfg).dt;
        let rows = pack.rows();
        let sl = hd * ds;
        check_len("ssd_scan zxbcdt", zxbcdt.len(), rows * dip)?;
        check_len("ssd_scan xbc", xbc.len(), rows * cd)?;
        check_len("ssd_scan y", y.len(), rows * di)?;
        check_slots("ssd_scan", &pack.slots, pool.len(), nh * sl)?;
        let old = &*pool;
        // One task per (sequence, head): chunks in order, the state passed from one to the next.
        let results: Vec<Scanned> = (0..pack.seqs() * nh)
            .into_par_iter()
            .map(|task| {
                let (seq, h) = (task / nh, task % nh);
                let head = Head::new(cfg, p, h);
                let slot = pack.slots[seq];
                let mut st = if slot >= 0 {
                    old[(slot as usize * nh + h) * sl..][..sl].to_vec()
                } else {
                    vec![0.0; sl]
                };
                let start = pack.cu[seq] as usize;
                let len = (pack.cu[seq + 1] as usize) - start;
                let mut out = vec![0.0; len * hd];
                let mut recorded = vec![];
                let (c0, c1) = (pack.seq_chunks[seq], pack.seq_chunks[seq + 1]);
                for chunk in c0 as usize..c1 as usize {
                    let (r0, r1) = (
                        pack.chunk_rows[chunk] as usize,
                        pack.chunk_rows[chunk + 1] as usize,
                    );
                    let ys = &mut out[(r0 - start) * hd..(r1 - start) * hd];
                    scan_chunk(&head, zxbcdt, xbc, dt_col, r0, r1, &mut st, ys);
                    for snap in pack.snaps.iter().filter(|s| s.chunk == chunk) {
                        recorded.push((snap.dest, st.clone()));
                    }
                }
                Scanned {
                    out,
                    state: st,
                    recorded,
                }
            })
            .collect();
        let start = |seq: usize| pack.cu[seq] as usize;
        let keep = |seq: usize| usize::try_from(pack.slots[seq]).ok();
        let dims = (nh, hd, di);
        write_back(
            "ssd_scan snapshots",
            results,
            dims,
            start,
            keep,
            y,
            pool,
            snaps,
        )?;
        Ok(())
    }

    fn state_update(
        &self,
        p: &Params<Self>,
        zxbcdt: &Vec<f32>,
        xbc: &Vec<f32>,
        dec: &Decode<Self>,
        pool: &mut Vec<f32>,
        inter: Option<&mut Vec<f32>>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (nh, hd, ds) = (cfg.nheads(), cfg.headdim, cfg.d_state);
        let (cd, dip, di) = (cfg.conv_dim(), cfg.d_in_proj(), cfg.d_inner());
        let dt_col = Cols::new(cfg).dt;
        let rows = dec.rows();
        let sl = hd * ds;
        check_len("state_update zxbcdt", zxbcdt.len(), rows * dip)?;
        check_len("state_update xbc", xbc.len(), rows * cd)?;
        check_len("state_update y", y.len(), rows * di)?;
        check_slots("state_update", &dec.slots, pool.len(), nh * sl)?;
        let old = &*pool;
        let record = inter.is_some();
        let results: Vec<Scanned> = (0..dec.requests() * nh)
            .into_par_iter()
            .map(|task| {
                let (i, h) = (task / nh, task % nh);
                let head = Head::new(cfg, p, h);
                let slot = dec.slots[i];
                let mut st = if slot >= 0 {
                    old[(slot as usize * nh + h) * sl..][..sl].to_vec()
                } else {
                    vec![0.0; sl]
                };
                let (r0, r1) = (dec.cu[i] as usize, dec.cu[i + 1] as usize);
                let mut out = vec![0.0; (r1 - r0) * hd];
                let mut recorded = vec![];
                for (t, r) in (r0..r1).enumerate() {
                    let ys = &mut out[t * hd..(t + 1) * hd];
                    scan_chunk(&head, zxbcdt, xbc, dt_col, r, r + 1, &mut st, ys);
                    if record && dec.record[i] >= 0 {
                        recorded.push((dec.record[i] as usize * dec.stride + t, st.clone()));
                    }
                }
                Scanned {
                    out,
                    state: st,
                    recorded,
                }
            })
            .collect();
        let start = |i: usize| dec.cu[i] as usize;
        // A recording request leaves its slot alone.
        let keep = |i: usize| {
            (dec.record[i] < 0)
                .then_some(dec.slots[i])
                .and_then(|s| usize::try_from(s).ok())
        };
        let dims = (nh, hd, di);
        write_back(
            "state_update intermediates",
            results,
            dims,
            start,
            keep,
            y,
            pool,
            inter,
        )?;
        Ok(())
    }

    fn gated_norm(
        &self,
        p: &Params<Self>,
        zxbcdt: &Vec<f32>,
        y: &Vec<f32>,
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (di, dip) = (cfg.d_inner(), cfg.d_in_proj());
        let gs = di / cfg.ngroups;
        check_len("gated_norm zxbcdt", zxbcdt.len(), rows * dip)?;
        check_len("gated_norm y", y.len(), rows * di)?;
        check_len("gated_norm out", out.len(), rows * di)?;
        let eps = cfg.norm_eps;
        out[..rows * di]
            .par_chunks_mut(di)
            .enumerate()
            .for_each(|(r, o)| {
                let z = &zxbcdt[r * dip..r * dip + di];
                let yr = &y[r * di..(r + 1) * di];
                let Some(w) = &p.norm_weight else {
                    for i in 0..di {
                        o[i] = yr[i] * silu(z[i]);
                    }
                    return;
                };
                for g in 0..cfg.ngroups {
                    let span = g * gs..(g + 1) * gs;
                    let gate_first = !cfg.norm_before_gate;
                    let v = |i: usize| {
                        if gate_first {
                            yr[i] * silu(z[i])
                        } else {
                            yr[i]
                        }
                    };
                    let ms = span.clone().map(|i| (v(i) as f64).powi(2)).sum::<f64>() / gs as f64;
                    let inv = (1.0 / (ms + eps).sqrt()) as f32;
                    for i in span {
                        let n = v(i) * inv * w[i];
                        o[i] = if gate_first { n } else { n * silu(z[i]) };
                    }
                }
            });
        Ok(())
    }
}

/// Rows r0..r1 (one chunk of one sequence) of one head: adds the chunk's outputs to `ys`
/// (`(r1-r0, headdim)`) and advances `st` (`(headdim, d_state)`) past the chunk.
/// y_m = exp(cum_m) C_m . st + sum_{k<=m} (C_m . B_k) exp(cum_m - cum_k) dt_k x_k + D x_m,
/// st' = exp(cum_last) st + sum_k exp(cum_last - cum_k) dt_k x_k B_k^T.
#[allow(clippy::too_many_arguments)]
fn scan_chunk(
    head: &Head,
    zxbcdt: &[f32],
    xbc: &[f32],
    dt_col: usize,
    r0: usize,
    r1: usize,
    st: &mut [f32],
    ys: &mut [f32],
) {
    let cfg = head.cfg;
    let (hd, ds, cd, dip) = (cfg.headdim, cfg.d_state, cfg.conv_dim(), cfg.d_in_proj());
    let q = r1 - r0;
    let row = |r: usize| &xbc[r * cd..(r + 1) * cd];
    let xs: Vec<&[f32]> = (r0..r1).map(|r| &row(r)[head.x_off..][..hd]).collect();
    let bs: Vec<&[f32]> = (r0..r1).map(|r| &row(r)[head.b_off..][..ds]).collect();
    let cs: Vec<&[f32]> = (r0..r1).map(|r| &row(r)[head.c_off..][..ds]).collect();
    let dts: Vec<f32> = (r0..r1)
        .map(|r| dt_of(cfg, zxbcdt[r * dip + dt_col + head.h], head.dt_bias))
        .collect();
    let mut cum = Vec::with_capacity(q);
    let mut acc = 0.0f64;
    for &dt in &dts {
        acc += dt as f64 * head.a;
        cum.push(acc);
    }
    for m in 0..q {
        let y = &mut ys[m * hd..(m + 1) * hd];
        let decay_in = cum[m].exp() as f32;
        for (pi, yp) in y.iter_mut().enumerate() {
            *yp = decay_in * dot(cs[m], &st[pi * ds..(pi + 1) * ds]) + head.d_at(pi) * xs[m][pi];
        }
        for k in 0..=m {
            let w = dot(cs[m], bs[k]) * (cum[m] - cum[k]).exp() as f32 * dts[k];
            y.iter_mut().zip(xs[k]).for_each(|(yp, x)| *yp += w * x);
        }
    }
    let last = cum[q - 1];
    let decay_all = last.exp() as f32;
    st.iter_mut().for_each(|s| *s *= decay_all);
    for k in 0..q {
        let w = (last - cum[k]).exp() as f32 * dts[k];
        for (pi, srow) in st.chunks_mut(ds).enumerate() {
            let wx = w * xs[k][pi];
            srow.iter_mut().zip(bs[k]).for_each(|(s, b)| *s += wx * b);
        }
    }
}
