//! The serving engine against the float64 oracle: random schedules of mixed prefill and decode
//! steps, chunked prefill, speculative decode with random accept counts, prefix snapshots and
//! restores, padding; and every kind of bad request refused with the pool unchanged.

mod common;

use pollster::block_on;

use common::{oracle, randn, random_weights, rel_l2, rng, BACKENDS};
use mamba_mixer::backend::Backend;
use mamba_mixer::tensors::FloatType;
use mamba_mixer::{Cpu, Engine, EngineConfig, Input, Mixer, MixerConfig, Request, Weights, Work};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

const TOL: f64 = 1e-4;

fn config(text: &str) -> MixerConfig {
    MixerConfig::from_json(text).unwrap()
}

/// The oracle's output rows `from..` and final states for a whole token stream from zero state.
fn reference(cfg: &MixerConfig, w: &Weights, stream: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let l = stream.len() / cfg.d_model;
    let r = oracle(
        cfg,
        w,
        &Input {
            hidden: stream,
            seq_len: l,
            batch: 1,
            cu_seqlens: None,
            conv_state: None,
            ssm_state: None,
        },
    );
    (r.output, r.conv_state, r.ssm_state)
}

/// One simulated request of a schedule.
struct Sim {
    slot: i32,
    /// The accepted tokens so far (what the slot's state must reflect).
    stream: Vec<f32>,
    prompt_left: usize,
    decode_left: usize,
}

#[test]
fn random_schedules_match_the_per_request_full_sequence_reference() {
    let configs = [
        r#"{"d_model": 32, "d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 8}"#,
        r#"{"d_model": 32, "d_state": 8, "headdim": 8, "ngroups": 2, "d_conv": 3, "chunk_size": 4, "D_has_hdim": true}"#,
        r#"{"d_model": 32, "d_state": 16, "headdim": 8, "ngroups": 4, "d_conv": 2, "chunk_size": 16, "norm_before_gate": true, "bias": true}"#,
    ];
    for backend in BACKENDS {
        let mut seen = [0usize; 5];
        for trial in 0..12u64 {
            let cfg = config(configs[trial as usize % configs.len()]);
            let counts = match backend {
                "cpu" => schedule(Cpu, &cfg, trial),
                "wgpu" => schedule(common::wgpu(), &cfg, trial),
                "wgpu-basic" => schedule(common::wgpu_basic(), &cfg, trial),
                other => panic!("unknown backend {other}"),
            };
            seen.iter_mut().zip(counts).for_each(|(s, c)| *s += c);
        }
        // Outputs, speculative steps, restores, restores of evicted snapshots, padding requests.
        assert!(
            seen.iter().all(|&c| c > 0),
            "{backend}: a feature was never exercised: {seen:?}"
        );
    }
}

/// Runs one random schedule; returns how often each feature was exercised.
fn schedule<B: Backend>(backend: B, cfg: &MixerConfig, trial: u64) -> [usize; 5] {
    let d = cfg.d_model;
    let w = random_weights(cfg, 50 + trial, FloatType::F32);
    let m = Mixer::new(backend, cfg, &w).unwrap();
    let mut r = rng(7000 + trial);
    let max_spec = 3;
    let mut engine = Engine::new(
        &m,
        EngineConfig {
            max_requests: 5,
            max_spec,
            max_snapshots: 3,
        },
    )
    .unwrap();
    let mut sims: Vec<Sim> = vec![];
    // Snapshots recorded so far: id -> the stream prefix it holds.
    let mut snapshots: Vec<(u64, Vec<f32>)> = vec![];
    let (mut checked, mut restored, mut evicted_tries, mut padded, mut spec_steps) =
        (0, 0, 0, 0, 0);
    let interesting = [
        1,
        cfg.d_conv.saturating_sub(1).max(1),
        cfg.chunk_size,
        cfg.chunk_size + 1,
    ];
    for step in 0..40 {
        // Start new requests while slots are free, some from a snapshot.
        while engine.free_slots() > 0 && sims.len() < 4 && r.random_bool(0.5) {
            let slot = engine.alloc().unwrap();
            let mut stream = vec![];
            if !snapshots.is_empty() && r.random_bool(0.5) {
                let (id, prefix) = snapshots.choose(&mut r).unwrap().clone();
                if engine.has_snapshot(id) {
                    engine.restore(slot, id).unwrap();
                    stream = prefix;
                    restored += 1;
                } else {
                    let e = engine.restore(slot, id).unwrap_err().to_string();
                    assert!(e.contains("not held"), "{e}");
                    evicted_tries += 1;
                }
            }
            sims.push(Sim {
                slot,
                stream,
                prompt_left: r.random_range(1..30),
                decode_left: r.random_range(0..10),
            });
        }
        // Each running request takes part in this step with some probability.
        let mut chosen: Vec<usize> = (0..sims.len()).filter(|_| r.random_bool(0.8)).collect();
        chosen.shuffle(&mut r);
        struct Piece {
            sim: Option<usize>,
            tokens: Vec<f32>,
            work: Work,
        }
        let mut pieces: Vec<Piece> = vec![];
        // The store holds 3 snapshots; a step may record no more than that.
        let mut snap_budget = 3;
        for &i in &chosen {
            let s = &sims[i];
            if s.prompt_left > 0 {
                let n = if r.random_bool(0.5) {
                    *interesting.choose(&mut r).unwrap()
                } else {
                    r.random_range(1..=s.prompt_left)
                }
                .min(s.prompt_left);
                let mut snaps = vec![];
                while snap_budget > 0 && r.random_bool(0.3) {
                    snaps.push(r.random_range(1..=n));
                    snap_budget -= 1;
                }
                pieces.push(Piece {
                    sim: Some(i),
                    tokens: randn(&mut r, n * d, 1.0),
                    work: Work::Prefill { snapshots: snaps },
                });
            } else {
                let spec = r.random_range(0..=max_spec);
                pieces.push(Piece {
                    sim: Some(i),
                    tokens: randn(&mut r, (1 + spec) * d, 1.0),
                    work: Work::Decode { spec },
                });
            }
        }
        if r.random_bool(0.3) {
            let (n, work) = if r.random_bool(0.5) {
                (3, Work::Prefill { snapshots: vec![] })
            } else {
                (2, Work::Decode { spec: 1 })
            };
            let at = r.random_range(0..=pieces.len());
            pieces.insert(
                at,
                Piece {
                    sim: None,
                    tokens: randn(&mut r, n * d, 1.0),
                    work,
                },
            );
            padded += 1;
        }
        let requests: Vec<Request> = pieces
            .iter()
            .map(|p| Request {
                slot: p.sim.map_or(-1, |i| sims[i].slot),
                tokens: &p.tokens,
                work: p.work.clone(),
            })
            .collect();
        let outs = block_on(engine.step(&requests))
            .unwrap_or_else(|e| panic!("trial {trial} step {step}: {e}"));
        for (p, out) in pieces.iter().zip(&outs) {
            let n = p.tokens.len() / d;
            let Some(i) = p.sim else {
                assert!(
                    out.output.iter().all(|&x| x == 0.0),
                    "padding rows must be zero"
                );
                continue;
            };
            let label = format!("trial {trial} step {step} slot {}", sims[i].slot);
            let before = sims[i].stream.len() / d;
            let mut stream = sims[i].stream.clone();
            stream.extend_from_slice(&p.tokens);
            let (want, _, _) = reference(cfg, &w, &stream);
            let e = rel_l2(&out.output, &want[before * d..]);
            assert!(e <= TOL, "{label}: {:?} output error {e:.3e}", p.work);
            checked += 1;
            match &p.work {
                Work::Prefill { snapshots: at } => {
                    assert_eq!(out.snapshots.len(), at.len());
                    for (&pos, &id) in at.iter().zip(&out.snapshots) {
                        snapshots.push((id, stream[..(before + pos) * d].to_vec()));
                    }
                    sims[i].stream = stream;
                    sims[i].prompt_left -= n;
                }
                Work::Decode { spec } => {
                    let keep = if *spec > 0 {
                        spec_steps += 1;
                        let j = r.random_range(0..=1 + spec);
                        engine.accept(sims[i].slot, j).unwrap();
                        j
                    } else {
                        1
                    };
                    sims[i].stream = stream[..(before + keep) * d].to_vec();
                    sims[i].decode_left = sims[i].decode_left.saturating_sub(keep.max(1));
                }
            }
            // The slot now holds the state after exactly the accepted stream.
            let (_, conv, ssm) = reference(cfg, &w, &sims[i].stream);
            let (gc, gs) = block_on(engine.state(sims[i].slot)).unwrap();
            assert!(
                rel_l2(&gc, &conv) <= TOL,
                "{label}: conv state error {:.3e}",
                rel_l2(&gc, &conv)
            );
            assert!(
                rel_l2(&gs, &ssm) <= TOL,
                "{label}: ssm state error {:.3e}",
                rel_l2(&gs, &ssm)
            );
        }
        // Finished requests give their slot back.
        let mut k = 0;
        while k < sims.len() {
            if sims[k].prompt_left == 0 && sims[k].decode_left == 0 {
                engine.free(sims[k].slot).unwrap();
                sims.remove(k);
            } else {
                k += 1;
            }
        }
    }
    assert!(
        checked > 40,
        "trial {trial}: only {checked} outputs checked"
    );
    [checked, spec_steps, restored, evicted_tries, padded]
}

fn small() -> (MixerConfig, Weights) {
    let cfg =
        config(r#"{"d_model": 32, "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 8}"#);
    let w = random_weights(&cfg, 9, FloatType::F32);
    (cfg, w)
}

#[test]
fn a_prompt_in_pieces_of_any_size_equals_the_whole_prompt() {
    for backend in BACKENDS {
        match backend {
            "cpu" => a_prompt_in_pieces_of_any_size_equals_the_whole_prompt_on(Cpu),
            "wgpu" => a_prompt_in_pieces_of_any_size_equals_the_whole_prompt_on(common::wgpu()),
            "wgpu-basic" => {
                a_prompt_in_pieces_of_any_size_equals_the_whole_prompt_on(common::wgpu_basic())
            }
            other => panic!("unknown backend {other}"),
        }
    }
}

fn a_prompt_in_pieces_of_any_size_equals_the_whole_prompt_on<B: Backend>(backend: B) {
    let (cfg, w) = small();
    let d = cfg.d_model;
    let m = Mixer::new(backend, &cfg, &w).unwrap();
    let prompt = randn(&mut rng(3), 60 * d, 1.0);
    let (want, conv, ssm) = reference(&cfg, &w, &prompt);
    // 1, d_conv - 1, chunk_size, chunk_size + 1, and what is left.
    for pieces in [
        vec![1, 3, 8, 9, 39],
        vec![2, 1, 1, 56],
        vec![60],
        vec![7; 9],
    ] {
        let mut e = Engine::new(
            &m,
            EngineConfig {
                max_requests: 1,
                max_spec: 0,
                max_snapshots: 0,
            },
        )
        .unwrap();
        let slot = e.alloc().unwrap();
        let mut got = vec![];
        let mut at = 0;
        for &n in &pieces {
            let n = n.min(60 - at);
            if n == 0 {
                break;
            }
            let req = Request {
                slot,
                tokens: &prompt[at * d..(at + n) * d],
                work: Work::Prefill { snapshots: vec![] },
            };
            got.extend(block_on(e.step(&[req])).unwrap().remove(0).output);
            at += n;
        }
        assert_eq!(at, 60);
        assert!(rel_l2(&got, &want) <= TOL, "{pieces:?}");
        let (c, s) = block_on(e.state(slot)).unwrap();
        assert!(
            rel_l2(&c, &conv) <= TOL && rel_l2(&s, &ssm) <= TOL,
            "{pieces:?}"
        );
    }
}

#[test]
fn starting_from_a_snapshot_equals_recomputing_the_prefix() {
    for backend in BACKENDS {
        match backend {
            "cpu" => starting_from_a_snapshot_equals_recomputing_the_prefix_on(Cpu),
            "wgpu" => starting_from_a_snapshot_equals_recomputing_the_prefix_on(common::wgpu()),
            "wgpu-basic" => {
                starting_from_a_snapshot_equals_recomputing_the_prefix_on(common::wgpu_basic())
            }
            other => panic!("unknown backend {other}"),
        }
    }
}

fn starting_from_a_snapshot_equals_recomputing_the_prefix_on<B: Backend>(backend: B) {
    let (cfg, w) = small();
    let d = cfg.d_model;
    let m = Mixer::new(backend, &cfg, &w).unwrap();
    let prefix = randn(&mut rng(4), 21 * d, 1.0);
    let suffix = randn(&mut rng(5), 13 * d, 1.0);
    let mut e = Engine::new(
        &m,
        EngineConfig {
            max_requests: 2,
            max_spec: 0,
            max_snapshots: 4,
        },
    )
    .unwrap();
    let a = e.alloc().unwrap();
    // Record after 2 tokens (shorter than d_conv), after 8 (a chunk end) and after 21 (the end).
    let out = block_on(e.step(&[Request {
        slot: a,
        tokens: &prefix,
        work: Work::Prefill {
            snapshots: vec![2, 8, 21],
        },
    }]))
    .unwrap()
    .remove(0);
    assert_eq!(out.snapshots.len(), 3);
    for (&pos, &id) in [2usize, 8, 21].iter().zip(&out.snapshots) {
        let b = e.alloc().unwrap();
        e.restore(b, id).unwrap();
        let got = block_on(e.step(&[Request {
            slot: b,
            tokens: &suffix,
            work: Work::Prefill { snapshots: vec![] },
        }]))
        .unwrap()
        .remove(0)
        .output;
        let mut stream = prefix[..pos * d].to_vec();
        stream.extend_from_slice(&suffix);
        let (want, conv, ssm) = reference(&cfg, &w, &stream);
        assert!(rel_l2(&got, &want[pos * d..]) <= TOL, "snapshot at {pos}");
        let (c, s) = block_on(e.state(b)).unwrap();
        assert!(
            rel_l2(&c, &conv) <= TOL && rel_l2(&s, &ssm) <= TOL,
            "snapshot at {pos}"
        );
        e.free(b).unwrap();
    }
}

/// Every slot's state and the engine's answers, to compare before and after a refused call.
fn pool_image<B: Backend>(e: &Engine<B>, slots: &[i32]) -> Vec<(Vec<f32>, Vec<f32>)> {
    slots
        .iter()
        .map(|&s| block_on(e.state(s)).unwrap())
        .collect()
}

#[test]
fn bad_requests_are_refused_and_leave_the_pool_unchanged() {
    for backend in BACKENDS {
        match backend {
            "cpu" => bad_requests_are_refused_and_leave_the_pool_unchanged_on(Cpu),
            "wgpu" => bad_requests_are_refused_and_leave_the_pool_unchanged_on(common::wgpu()),
            "wgpu-basic" => {
                bad_requests_are_refused_and_leave_the_pool_unchanged_on(common::wgpu_basic())
            }
            other => panic!("unknown backend {other}"),
        }
    }
}

fn bad_requests_are_refused_and_leave_the_pool_unchanged_on<B: Backend>(backend: B) {
    let (cfg, w) = small();
    let d = cfg.d_model;
    let m = Mixer::new(backend, &cfg, &w).unwrap();
    let mut e = Engine::new(
        &m,
        EngineConfig {
            max_requests: 3,
            max_spec: 2,
            max_snapshots: 1,
        },
    )
    .unwrap();
    let (a, b) = (e.alloc().unwrap(), e.alloc().unwrap());
    let t5 = randn(&mut rng(6), 5 * d, 1.0);
    let t3 = randn(&mut rng(7), 3 * d, 1.0);
    let t1 = &t5[..d];
    let pre = |slot, tokens| Request {
        slot,
        tokens,
        work: Work::Prefill { snapshots: vec![] },
    };
    let first = block_on(e.step(&[
        Request {
            slot: a,
            tokens: &t5,
            work: Work::Prefill { snapshots: vec![4] },
        },
        pre(b, &t3[..]),
    ]))
    .unwrap();
    let evicted = first[0].snapshots[0];
    // A second snapshot evicts the first from the one-entry store.
    block_on(e.step(&[Request {
        slot: b,
        tokens: &t3,
        work: Work::Prefill { snapshots: vec![1] },
    }]))
    .unwrap();
    assert!(!e.has_snapshot(evicted));

    let image = pool_image(&e, &[a, b]);
    let spec = |slot, tokens, spec| Request {
        slot,
        tokens,
        work: Work::Decode { spec },
    };
    let refused: Vec<(&str, Vec<Request>, &str)> = vec![
        (
            "slot out of range",
            vec![pre(7, t1)],
            "slot 7 is out of range",
        ),
        (
            "negative slot",
            vec![pre(-2, t1)],
            "slot -2 is out of range",
        ),
        (
            "unallocated slot",
            vec![pre(2, t1)],
            "slot 2 is not allocated",
        ),
        (
            "duplicated slot",
            vec![pre(a, t1), spec(a, t1, 0)],
            "slot 0 appears twice",
        ),
        (
            "snapshot beyond tokens",
            vec![Request {
                slot: a,
                tokens: &t3,
                work: Work::Prefill { snapshots: vec![4] },
            }],
            "snapshot position 4 is outside the 3 tokens",
        ),
        (
            "snapshot at 0",
            vec![Request {
                slot: a,
                tokens: &t3,
                work: Work::Prefill { snapshots: vec![0] },
            }],
            "snapshot position 0",
        ),
        (
            "too many snapshots",
            vec![Request {
                slot: a,
                tokens: &t3,
                work: Work::Prefill {
                    snapshots: vec![1, 2],
                },
            }],
            "store holds 1",
        ),
        (
            "snapshot on padding",
            vec![Request {
                slot: -1,
                tokens: &t3,
                work: Work::Prefill { snapshots: vec![1] },
            }],
            "padding",
        ),
        (
            "spec beyond max",
            vec![spec(a, &t5[..4 * d], 3)],
            "at most 2",
        ),
        ("decode rows", vec![spec(a, &t3, 1)], "needs 2 rows, got 3"),
        (
            "ragged tokens",
            vec![pre(a, &t5[..d + 3])],
            "not a whole number of rows",
        ),
        (
            "bad one among good",
            vec![pre(b, t1), pre(a, t1), pre(9, t1)],
            "request 2",
        ),
    ];
    for (label, reqs, fragment) in refused {
        let msg = block_on(e.step(&reqs)).expect_err(label).to_string();
        assert!(
            msg.contains(fragment),
            "{label}: {msg:?} lacks {fragment:?}"
        );
        assert_eq!(pool_image(&e, &[a, b]), image, "{label}: the pool changed");
    }
    let msg = e.restore(b, evicted).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("snapshot {evicted} is not held")),
        "{msg}"
    );
    assert_eq!(pool_image(&e, &[a, b]), image);
    let msg = e.accept(a, 1).unwrap_err().to_string();
    assert!(msg.contains("no speculative decode pending"), "{msg}");

    // A speculative decode leaves the slot alone until accept; accept beyond 1 + k is refused.
    block_on(e.step(&[spec(a, &t3, 2)])).unwrap();
    assert_eq!(
        pool_image(&e, &[a, b]),
        image,
        "a pending speculation must not touch the slot"
    );
    let msg = e.accept(a, 4).unwrap_err().to_string();
    assert!(msg.contains("cannot accept 4"), "{msg}");
    let msg = block_on(e.step(&[pre(a, t1)])).unwrap_err().to_string();
    assert!(msg.contains("pending"), "{msg}");
    assert_eq!(pool_image(&e, &[a, b]), image);
    e.accept(a, 0).unwrap();
    assert_eq!(
        pool_image(&e, &[a, b]),
        image,
        "accepting nothing keeps the old state"
    );

    // The pool is full after one more; reset zeroes; free makes room.
    let c = e.alloc().unwrap();
    assert!(e
        .alloc()
        .unwrap_err()
        .to_string()
        .contains("all 3 state slots are in use"));
    e.reset(a).unwrap();
    let (ca, sa) = block_on(e.state(a)).unwrap();
    assert!(ca.iter().chain(&sa).all(|&x| x == 0.0));
    e.free(c).unwrap();
    assert!(block_on(e.state(c))
        .unwrap_err()
        .to_string()
        .contains("not allocated"));
    assert_eq!(e.alloc().unwrap(), c);
}
