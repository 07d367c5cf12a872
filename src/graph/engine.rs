//! The serving engine: a pool of state slots on the device, mixed prefill + decode steps,
//! chunked prefill, prefix snapshots and speculative decode with rollback — Megatron's dynamic
//! inference and vLLM's Mamba-2 batches, over any `Backend`.

use super::{decode, decode_batch, pack, prefill};
use crate::backend::{Backend, States};
use crate::error::{Error, Result};
use crate::model::Mixer;

/// Sizes fixed when the engine is made; every buffer is allocated then, once.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// State slots (conv + ssm state pairs), one per request in flight.
    pub max_requests: usize,
    /// The most speculative tokens a decode request may carry (its intermediate states are kept
    /// per slot: `max_requests * (1 + max_spec)` state pairs).
    pub max_spec: usize,
    /// Prefix snapshots kept; the least recently used one is evicted to make room.
    pub max_snapshots: usize,
}

/// What a request asks of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// New prompt tokens, continuing from the slot's state (so a prompt may come in pieces of
    /// any size: chunked prefill). `snapshots` lists positions `p` (1 ≤ p ≤ tokens of this piece)
    /// after which to record the state for later requests with the same prefix.
    Prefill { snapshots: Vec<usize> },
    /// `1 + spec` tokens: the next token and `spec` speculative ones. With `spec > 0` the slot is
    /// left as it was and the state after every token is kept until `Engine::accept`.
    Decode { spec: usize },
}

/// One request of a step: its slot (-1 for padding: a zero state, nothing written, zero output),
/// its new tokens `(n, d_model)` row-major, and what to do with them.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub slot: i32,
    pub tokens: &'a [f32],
    pub work: Work,
}

/// Names one recorded prefix snapshot.
pub type SnapshotId = u64;

/// A request's result: its output rows `(n, d_model)` and the ids of the snapshots it recorded,
/// in the order of its positions.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub output: Vec<f32>,
    pub snapshots: Vec<SnapshotId>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    used: bool,
    /// Tokens of a speculative decode awaiting `accept` (0: none).
    pending: usize,
}

/// Recorded snapshots: a bounded set of state pairs with least-recently-used eviction.
struct Snapshots<B: Backend> {
    states: Option<States<B>>,
    /// Per entry: (id, last use), or None when free.
    entries: Vec<Option<(SnapshotId, u64)>>,
    next_id: SnapshotId,
    clock: u64,
}

impl<B: Backend> Snapshots<B> {
    /// An entry for a new snapshot: a free one, else the least recently used.
    fn reserve(&mut self) -> (usize, SnapshotId) {
        let slot = self
            .entries
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                (0..self.entries.len())
                    .min_by_key(|&i| self.entries[i].map_or(0, |e| e.1))
                    .unwrap_or(0)
            });
        let id = self.next_id;
        self.next_id += 1;
        self.clock += 1;
        self.entries[slot] = Some((id, self.clock));
        (slot, id)
    }

    fn find(&self, id: SnapshotId) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.is_some_and(|(eid, _)| eid == id))
    }

    fn touch(&mut self, entry: usize) {
        self.clock += 1;
        if let Some(e) = &mut self.entries[entry] {
            e.1 = self.clock;
        }
    }
}

/// The engine: a mixer, its slot pool and its snapshot store.
pub struct Engine<'m, B: Backend> {
    m: &'m Mixer<B>,
    pool: States<B>,
    /// Speculative intermediates: entry `slot * (1 + max_spec) + t` holds the state after token t.
    inter: Option<States<B>>,
    snaps: Snapshots<B>,
    slots: Vec<Slot>,
    max_spec: usize,
}

impl<'m, B: Backend> Engine<'m, B> {
    pub fn new(m: &'m Mixer<B>, c: EngineConfig) -> Result<Self> {
        let cfg = m.config();
        let b = &m.backend;
        let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
        let states = |n: usize| -> Result<States<B>> {
            Ok(States {
                conv: b.zeros(n * cl)?,
                ssm: b.zeros(n * sl)?,
            })
        };
        let inter_n = c.max_requests * (1 + c.max_spec);
        Ok(Engine {
            m,
            pool: states(c.max_requests)?,
            inter: (c.max_spec > 0).then(|| states(inter_n)).transpose()?,
            snaps: Snapshots {
                states: (c.max_snapshots > 0)
                    .then(|| states(c.max_snapshots))
                    .transpose()?,
                entries: vec![None; c.max_snapshots],
                next_id: 0,
                clock: 0,
            },
            slots: vec![Slot::default(); c.max_requests],
            max_spec: c.max_spec,
        })
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slots not in use.
    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| !s.used).count()
    }

    /// Takes the lowest free slot, with a zero state.
    pub fn alloc(&mut self) -> Result<i32> {
        let slot = self.slots.iter().position(|s| !s.used).ok_or_else(|| {
            Error::invalid(format!("all {} state slots are in use", self.slots.len()))
        })?;
        self.zero(slot)?;
        self.slots[slot] = Slot {
            used: true,
            pending: 0,
        };
        Ok(slot as i32)
    }

    pub fn free(&mut self, slot: i32) -> Result<()> {
        let s = self.used_slot(slot)?;
        self.slots[s] = Slot::default();
        Ok(())
    }

    /// Zeroes a slot's state and drops any speculation pending on it.
    pub fn reset(&mut self, slot: i32) -> Result<()> {
        let s = self.used_slot(slot)?;
        self.zero(s)?;
        self.slots[s].pending = 0;
        Ok(())
    }

    /// Sets a slot's state (None leaves that half as it is).
    pub fn write_state(
        &mut self,
        slot: i32,
        conv: Option<&[f32]>,
        ssm: Option<&[f32]>,
    ) -> Result<()> {
        let s = self.used_slot(slot)?;
        let cfg = self.m.config();
        let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
        for (name, v, len) in [("conv_state", conv, cl), ("ssm_state", ssm, sl)] {
            if let Some(v) = v.filter(|v| v.len() != len) {
                return Err(Error::tensor(
                    name,
                    format!("a slot's state holds {len} values, got {}", v.len()),
                ));
            }
        }
        let b = &self.m.backend;
        if let Some(v) = conv {
            b.write(&mut self.pool.conv, s * cl, v)?;
        }
        if let Some(v) = ssm {
            b.write(&mut self.pool.ssm, s * sl, v)?;
        }
        Ok(())
    }

    /// Reads a slot's conv state `(conv_dim, d_conv)` and ssm state `(nheads, headdim, d_state)`.
    pub async fn state(&self, slot: i32) -> Result<(Vec<f32>, Vec<f32>)> {
        let s = self.used_slot(slot)?;
        let cfg = self.m.config();
        let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
        let mut got = self
            .m
            .backend
            .read(&[(&self.pool.conv, s * cl, cl), (&self.pool.ssm, s * sl, sl)])
            .await?;
        let ssm = got.pop().unwrap_or_default();
        Ok((got.pop().unwrap_or_default(), ssm))
    }

    /// Ends the speculative decode pending on `slot`, keeping its first `accepted` tokens
    /// (0 ≤ accepted ≤ 1 + spec): the slot becomes the state after that many tokens, copied from
    /// the intermediates the step recorded; the rejected tokens leave no trace.
    pub fn accept(&mut self, slot: i32, accepted: usize) -> Result<()> {
        let s = self.used_slot(slot)?;
        let pending = self.slots[s].pending;
        if pending == 0 {
            return Err(Error::invalid(format!(
                "accept: slot {slot} has no speculative decode pending"
            )));
        }
        if accepted > pending {
            return Err(Error::invalid(format!(
                "accept: slot {slot} ran {pending} tokens (1 + {} speculative), cannot accept {accepted}",
                pending - 1
            )));
        }
        if accepted > 0 {
            let entry = s * (1 + self.max_spec) + accepted - 1;
            if let Some(inter) = &self.inter {
                copy_state(self.m, inter, entry, &mut self.pool, s)?;
            }
        }
        self.slots[s].pending = 0;
        Ok(())
    }

    /// Sets `slot` to a recorded snapshot, so that the request continues after that prefix.
    pub fn restore(&mut self, slot: i32, id: SnapshotId) -> Result<()> {
        let s = self.ready_slot(slot, "restore")?;
        let entry = self.snaps.find(id).ok_or_else(|| {
            Error::invalid(format!(
                "restore: snapshot {id} is not held (evicted, or never recorded)"
            ))
        })?;
        if let Some(states) = &self.snaps.states {
            copy_state(self.m, states, entry, &mut self.pool, s)?;
        }
        self.snaps.touch(entry);
        Ok(())
    }

    /// Whether a snapshot is still held.
    pub fn has_snapshot(&self, id: SnapshotId) -> bool {
        self.snaps.find(id).is_some()
    }

    /// Runs one step: the prefill requests as one packed pass, the decode requests as one
    /// batched pass, both recorded before one readback of their outputs; returns one output per
    /// request, in the order given. Every request is checked before any work is done, so a
    /// refused step leaves the engine as it was.
    pub async fn step(&mut self, requests: &[Request<'_>]) -> Result<Vec<RequestOutput>> {
        self.check(requests)?;
        let m = self.m;
        let d = m.config().d_model;
        let mut outs: Vec<RequestOutput> = requests
            .iter()
            .map(|r| RequestOutput {
                output: vec![0.0; r.tokens.len()],
                snapshots: vec![],
            })
            .collect();
        let (pre, dec): (Vec<usize>, Vec<usize>) =
            (0..requests.len()).partition(|&i| matches!(requests[i].work, Work::Prefill { .. }));

        // Host metadata for both passes, computed once and uploaded once per pass.
        let gather = |idx: &[usize]| {
            let mut cu = vec![0i32];
            let mut hidden =
                Vec::with_capacity(idx.iter().map(|&i| requests[i].tokens.len()).sum());
            for &i in idx {
                hidden.extend_from_slice(requests[i].tokens);
                cu.push(cu[cu.len() - 1] + (requests[i].tokens.len() / d) as i32);
            }
            (cu, hidden)
        };
        // Everything is uploaded before any pass is recorded, so that the whole step is one
        // submission (a queue write must not overtake recorded work).
        let prefill_in = if pre.is_empty() {
            None
        } else {
            let (cu, hidden) = gather(&pre);
            let mut snaps = vec![];
            for (seq, &i) in pre.iter().enumerate() {
                if let Work::Prefill { snapshots } = &requests[i].work {
                    for &pos in snapshots {
                        let (entry, id) = self.snaps.reserve();
                        snaps.push((seq, pos, entry));
                        outs[i].snapshots.push(id);
                    }
                }
            }
            let slots = pre.iter().map(|&i| requests[i].slot).collect();
            let pk = pack(&m.backend, cu, slots, &snaps, m.config().chunk_size)?;
            Some((pk, m.backend.upload(&hidden)?))
        };
        let spec = |i: usize| match requests[i].work {
            Work::Decode { spec } => spec,
            Work::Prefill { .. } => 0,
        };
        let decode_in = if dec.is_empty() {
            None
        } else {
            let (cu, hidden) = gather(&dec);
            let slots: Vec<i32> = dec.iter().map(|&i| requests[i].slot).collect();
            let record = dec
                .iter()
                .map(|&i| if spec(i) > 0 { requests[i].slot } else { -1 })
                .collect();
            let db = decode_batch(&m.backend, cu, slots, record, 1 + self.max_spec)?;
            Some((db, m.backend.upload(&hidden)?))
        };

        // (requests, their row boundaries, the pass's output buffer) of each pass that ran.
        let mut passes = vec![];
        if let Some((pk, h)) = prefill_in {
            let out = prefill(m, &h, &pk, &mut self.pool, self.snaps.states.as_mut())?;
            passes.push((&pre, pk.cu, out));
        }
        if let Some((db, h)) = decode_in {
            let out = decode(m, &h, &db, &mut self.pool, self.inter.as_mut())?;
            for &i in &dec {
                if spec(i) > 0 && requests[i].slot >= 0 {
                    self.slots[requests[i].slot as usize].pending = 1 + spec(i);
                }
            }
            passes.push((&dec, db.cu, out));
        }
        let ranges: Vec<_> = passes
            .iter()
            .map(|(_, cu, out)| (out, 0, cu[cu.len() - 1] as usize * d))
            .collect();
        let read = m.backend.read(&ranges).await?;
        for ((idx, cu, _), out) in passes.iter().zip(read) {
            for (k, &i) in idx.iter().enumerate() {
                if requests[i].slot >= 0 {
                    let rows = cu[k] as usize * d..cu[k + 1] as usize * d;
                    outs[i].output.copy_from_slice(&out[rows]);
                }
            }
        }
        Ok(outs)
    }

    /// Every check of a step, before anything changes.
    fn check(&self, requests: &[Request]) -> Result<()> {
        let d = self.m.config().d_model;
        let mut seen = vec![false; self.slots.len()];
        let mut snapshots = 0;
        for (i, r) in requests.iter().enumerate() {
            let bad = |msg: String| Err(Error::invalid(format!("request {i}: {msg}")));
            if r.slot != -1 {
                let s = self
                    .ready_slot(r.slot, "step")
                    .map_err(|e| Error::invalid(format!("request {i}: {e}")))?;
                if std::mem::replace(&mut seen[s], true) {
                    return bad(format!("slot {} appears twice in one step", r.slot));
                }
            }
            if r.tokens.len() % d != 0 {
                return bad(format!(
                    "tokens hold {} values, not a whole number of rows of d_model = {d}",
                    r.tokens.len()
                ));
            }
            let n = r.tokens.len() / d;
            match &r.work {
                Work::Decode { spec } => {
                    if *spec > self.max_spec {
                        return bad(format!(
                            "{spec} speculative tokens, but the engine keeps at most {}",
                            self.max_spec
                        ));
                    }
                    if n != 1 + spec {
                        return bad(format!(
                            "a decode of 1 + {spec} tokens needs {} rows, got {n}",
                            1 + spec
                        ));
                    }
                }
                Work::Prefill { snapshots: at } => {
                    if let Some(p) = at.iter().find(|&&p| p == 0 || p > n) {
                        return bad(format!(
                            "snapshot position {p} is outside the {n} tokens given (1..={n})"
                        ));
                    }
                    if !at.is_empty() && r.slot == -1 {
                        return bad("a padding request (slot -1) records no snapshots".into());
                    }
                    snapshots += at.len();
                }
            }
        }
        if snapshots > self.snaps.entries.len() {
            return Err(Error::invalid(format!(
                "the step records {snapshots} snapshots, but the store holds {}",
                self.snaps.entries.len()
            )));
        }
        Ok(())
    }

    /// A slot that is in range and allocated.
    fn used_slot(&self, slot: i32) -> Result<usize> {
        let n = self.slots.len();
        match usize::try_from(slot) {
            Ok(s) if s < n && self.slots[s].used => Ok(s),
            Ok(s) if s < n => Err(Error::invalid(format!("slot {slot} is not allocated"))),
            _ => Err(Error::invalid(format!(
                "slot {slot} is out of range (the pool has {n} slots)"
            ))),
        }
    }

    /// A slot that may run: allocated, with no speculation awaiting `accept`.
    fn ready_slot(&self, slot: i32, op: &str) -> Result<usize> {
        let s = self.used_slot(slot)?;
        if self.slots[s].pending > 0 {
            return Err(Error::invalid(format!(
                "{op}: slot {slot} has a speculative decode pending; call accept first"
            )));
        }
        Ok(s)
    }

    fn zero(&mut self, s: usize) -> Result<()> {
        let cfg = self.m.config();
        let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
        let b = &self.m.backend;
        b.write(&mut self.pool.conv, s * cl, &vec![0.0; cl])?;
        b.write(&mut self.pool.ssm, s * sl, &vec![0.0; sl])
    }
}

/// Copies entry `from` of `src` over entry `to` of `dst` (both halves).
fn copy_state<B: Backend>(
    m: &Mixer<B>,
    src: &States<B>,
    from: usize,
    dst: &mut States<B>,
    to: usize,
) -> Result<()> {
    let cfg = m.config();
    let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
    m.backend
        .copy(&src.conv, from * cl, &mut dst.conv, to * cl, cl)?;
    m.backend
        .copy(&src.ssm, from * sl, &mut dst.ssm, to * sl, sl)
}
