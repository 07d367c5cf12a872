//! The graph: every execution path, written once over the `Backend` trait. Two passes do all the
//! work — a packed prefill pass (chunked SSD scan) and a decode pass (the recurrence, one or more
//! tokens per request) — over a pool of state slots; the `Engine` schedules them, and `forward`
//! runs whole inputs through it.

mod engine;
mod paths;

pub use engine::{Engine, EngineConfig, Request, RequestOutput, SnapshotId, Work};
pub use paths::{check_cu_seqlens, forward, Input, InputFile, Output, Path};

use crate::backend::{in_proj, split, Backend, Decode, Pack, Snap, States};
use crate::error::Result;
use crate::model::Mixer;

/// Builds the host metadata of one prefill pass and uploads it once. Chunks start at every
/// sequence start and every `chunk_size` tokens after it, and also end at every snapshot position
/// `(seq, pos, dest)`, so that the scan's state at a chunk end is the snapshot.
pub fn pack<B: Backend>(
    backend: &B,
    cu: Vec<i32>,
    slots: Vec<i32>,
    snapshots: &[(usize, usize, usize)],
    chunk_size: usize,
) -> Result<Pack<B>> {
    let mut seq_chunks = vec![0i32];
    let mut chunk_rows = vec![0i32];
    let mut snaps = vec![];
    for (seq, w) in cu.windows(2).enumerate() {
        let (start, end) = (w[0] as usize, w[1] as usize);
        let mut cuts: Vec<usize> = (1..)
            .map(|k| start + k * chunk_size)
            .take_while(|&r| r < end)
            .chain(std::iter::once(end).filter(|&e| e > start))
            .chain(snapshots.iter().filter(|s| s.0 == seq).map(|s| start + s.1))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let first = chunk_rows.len() - 1;
        chunk_rows.extend(cuts.iter().map(|&r| r as i32));
        for &(_, pos, dest) in snapshots.iter().filter(|s| s.0 == seq) {
            let chunk = first + cuts.partition_point(|&r| r < start + pos);
            snaps.push(Snap {
                seq,
                pos,
                chunk,
                dest,
            });
        }
        seq_chunks.push(chunk_rows.len() as i32 - 1);
    }
    let flat: Vec<i32> = snaps
        .iter()
        .flat_map(|s| [s.seq, s.pos, s.chunk, s.dest].map(|v| v as i32))
        .collect();
    Ok(Pack {
        dev_cu: backend.upload_idx(&cu)?,
        dev_slots: backend.upload_idx(&slots)?,
        dev_seq_chunks: backend.upload_idx(&seq_chunks)?,
        dev_chunk_rows: backend.upload_idx(&chunk_rows)?,
        dev_snaps: backend.upload_idx(&flat)?,
        cu,
        slots,
        seq_chunks,
        chunk_rows,
        snaps,
    })
}

/// Builds and uploads the metadata of one decode pass.
pub fn decode_batch<B: Backend>(
    backend: &B,
    cu: Vec<i32>,
    slots: Vec<i32>,
    record: Vec<i32>,
    stride: usize,
) -> Result<Decode<B>> {
    let dev = backend.upload_idx(&[&cu[..], &slots, &record].concat())?;
    Ok(Decode {
        dev,
        slots,
        cu,
        record,
        stride,
    })
}

/// One prefill pass: `hidden (rows, d_model)` packed as `pack` says; returns `(rows, d_model)`.
pub fn prefill<B: Backend>(
    m: &Mixer<B>,
    hidden: &B::Buf,
    pack: &Pack<B>,
    pool: &mut States<B>,
    snaps: Option<&mut States<B>>,
) -> Result<B::Buf> {
    let (b, p) = (&m.backend, &m.params);
    let cfg = &p.cfg;
    let rows = pack.rows();
    let (snap_conv, snap_ssm) = split(snaps);
    let zxbcdt = in_proj(b, p, hidden, rows)?;
    let mut xbc = b.alloc(rows * cfg.conv_dim())?;
    b.conv(p, &zxbcdt, pack, &mut pool.conv, snap_conv, &mut xbc)?;
    let mut y = b.alloc(rows * cfg.d_inner())?;
    b.ssd_scan(p, &zxbcdt, &xbc, pack, &mut pool.ssm, snap_ssm, &mut y)?;
    b.gate_out(p, &zxbcdt, &y, rows)
}

/// One decode pass: each request's tokens through the recurrence; returns `(rows, d_model)`.
pub fn decode<B: Backend>(
    m: &Mixer<B>,
    hidden: &B::Buf,
    dec: &Decode<B>,
    pool: &mut States<B>,
    inter: Option<&mut States<B>>,
) -> Result<B::Buf> {
    m.backend.decode(&m.params, hidden, dec, pool, inter)
}
