//! Every op of every device backend against the CPU backend (llama.cpp's test-backend-ops): shapes
//! drawn at random, non-multiples of the tile sizes included, packed sequences with padding slots
//! and snapshots, decodes of several tokens with intermediate states.

mod common;

use common::{randn, random_weights, rel_l2, rng, widen};
use mamba_mixer::backend::{Backend, Decode, Pack, States};
use mamba_mixer::graph::{decode_batch, pack};
use mamba_mixer::tensors::{FloatType, HostTensor};
use mamba_mixer::{Cpu, Mixer, MixerConfig};
use pollster::block_on;
use rand::seq::IndexedRandom;
use rand::Rng;

const TOL: f64 = 1e-5;

fn read<B: Backend>(b: &B, buf: &B::Buf, len: usize) -> Vec<f32> {
    block_on(b.read(&[(buf, 0, len)])).unwrap().remove(0)
}

fn same(label: &str, got: &[f32], want: &[f32]) {
    let e = rel_l2(got, &widen(want));
    assert!(e <= TOL, "{label}: relative L2 error {e:.3e}");
}

/// A random small config whose sizes are not multiples of the kernels' tiles.
fn random_config(r: &mut rand_chacha::ChaCha8Rng) -> MixerConfig {
    // Sizes past the kernels' tiles too: headdim 64 (a group's heads past 128 state rows), d_state
    // 130 and 132 (past the decode update's 128 columns per lane set; 132 and 16 a multiple of 4,
    // which it reads as vectors), chunks of 256 (past 128 rows).
    let headdim = *[3usize, 8, 16, 24, 64].choose(r).unwrap();
    let ngroups = *[1usize, 2, 3].choose(r).unwrap();
    let heads_per_group = r.random_range(1..=3);
    let nheads = ngroups * heads_per_group;
    let d_inner = nheads * headdim;
    // expand 1 keeps d_model = d_inner, any size.
    let text = format!(
        r#"{{"d_model": {d_inner}, "expand": 1, "headdim": {headdim}, "ngroups": {ngroups},
            "d_state": {}, "d_conv": {}, "chunk_size": {}, "D_has_hdim": {}, "bias": {},
            "conv_bias": {}, "rmsnorm": {}, "norm_before_gate": {}, "dt_limit": [{}, {}]}}"#,
        [5usize, 16, 33, 70, 130, 132].choose(r).unwrap(),
        r.random_range(1..=4),
        [1usize, 4, 16, 64, 128, 256].choose(r).unwrap(),
        r.random_bool(0.5),
        r.random_bool(0.5),
        r.random_bool(0.5),
        r.random_bool(0.7),
        r.random_bool(0.5),
        if r.random_bool(0.3) { 0.01 } else { 0.0 },
        if r.random_bool(0.3) { "0.2" } else { "null" },
    );
    MixerConfig::from_json(&text).unwrap()
}

/// A layer past every kernel tile (trial 0): a group of three heads of 64 (192 state rows per
/// chunk product), d_state 130 (past the decode update's 128 columns per set of lanes), chunks of
/// 256 (past the scan's 128-row tiles).
fn big_config() -> MixerConfig {
    MixerConfig::from_json(
        r#"{"d_model": 192, "expand": 1, "headdim": 64, "ngroups": 1, "d_state": 130,
            "d_conv": 4, "chunk_size": 256, "rmsnorm": true}"#,
    )
    .unwrap()
}

/// A layer whose scan products have whole tiles (trial 1): two heads of 64 in one group, d_state
/// 128, chunks of 256, so that the kernels' paths without bounds checks run too.
fn whole_config() -> MixerConfig {
    MixerConfig::from_json(
        r#"{"d_model": 128, "expand": 1, "headdim": 64, "ngroups": 1, "d_state": 128,
            "d_conv": 4, "chunk_size": 256, "rmsnorm": true}"#,
    )
    .unwrap()
}

/// cu_seqlens, the slot of each sequence, and the snapshots (sequence, position, entry).
type Packing = (Vec<i32>, Vec<i32>, Vec<(usize, usize, usize)>);

/// Random packed sequences (some empty, some padding) with snapshots at random positions; `long`:
/// the first sequence has 300 rows, its snapshot (if any) past row 256, so that a whole chunk of
/// 256 rows stays (snapshots end chunks).
fn random_pack(r: &mut rand_chacha::ChaCha8Rng, slots: usize, long: bool) -> Packing {
    let n = r.random_range(1..=slots.min(4));
    let mut cu = vec![0i32];
    let mut ids: Vec<i32> = (0..slots as i32).collect();
    let mut seq_slots = vec![];
    let mut snaps = vec![];
    for s in 0..n {
        let len = if long && s == 0 {
            300
        } else {
            *[0usize, 1, 2, 3, 7, 40, 130, 300].choose(r).unwrap()
        };
        cu.push(cu[s] + len as i32);
        let slot = if r.random_bool(0.2) {
            -1
        } else {
            ids.remove(r.random_range(0..ids.len()))
        };
        seq_slots.push(slot);
        if len > 0 && slot >= 0 && r.random_bool(0.5) {
            let first = if long && s == 0 { 257 } else { 1 };
            snaps.push((s, r.random_range(first..=len), snaps.len()));
        }
    }
    (cu, seq_slots, snaps)
}

fn ops_match_the_cpu<B: Backend + Clone>(dev: B, trials: u64) {
    for trial in 0..trials {
        let mut r = rng(900 + trial);
        let cfg = match trial {
            0 => big_config(),
            1 => whole_config(),
            _ => random_config(&mut r),
        };
        let label = format!("trial {trial} ({})", serde_json::to_string(&cfg).unwrap());
        let ty = *[FloatType::F32, FloatType::F16, FloatType::Bf16]
            .choose(&mut r)
            .unwrap();
        let w = random_weights(&cfg, 40 + trial, ty);
        let cpu = Mixer::new(Cpu, &cfg, &w).unwrap();
        let gpu = Mixer::new(dev.clone(), &cfg, &w).unwrap();
        let (cp, gp) = (&cpu.params, &gpu.params);
        let (c, g) = (&cpu.backend, &gpu.backend);
        let (dip, cd) = (cfg.d_in_proj(), cfg.conv_dim());
        let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());

        // matmul: a random (n, k) weight in a random storage type, few and many rows; the last
        // case is a decode batch with a long k, which the tiled kernel splits over k.
        let batch = r.random_range(5..=64);
        for rows in [1usize, r.random_range(2..=4), r.random_range(5..200), batch] {
            // k a multiple of 4 half of the time: the matrix-vector kernel takes only those.
            let k = if rows == batch {
                r.random_range(512..1500)
            } else {
                r.random_range(1..300)
            };
            let (n, k) = (
                r.random_range(1..300),
                if r.random_bool(0.5) && rows != batch {
                    k * 4
                } else {
                    k
                },
            );
            let wt = HostTensor::f32(vec![n, k], randn(&mut r, n * k, 0.1)).cast(ty);
            // Rows of very different magnitudes (the tensor-core kernel scales each row).
            let mut x = randn(&mut r, rows * k, 1.0);
            for row in x.chunks_mut(k) {
                let m = 10f32.powf(r.random_range(-3.0..3.0));
                row.iter_mut().for_each(|v| *v *= m);
            }
            let bias = randn(&mut r, n, 0.1);
            let with_bias = r.random_bool(0.5);
            fn matmul<B: Backend>(
                b: &B,
                wt: &HostTensor,
                x: &[f32],
                bias: Option<&[f32]>,
                rows: usize,
            ) -> Vec<f32> {
                let n = wt.shape[0];
                let mut out = b.zeros(rows * n).unwrap();
                let bias = bias.map(|v| b.upload(v).unwrap());
                let (x, w) = (b.upload(x).unwrap(), b.upload_weight(wt).unwrap());
                b.matmul(&x, &w, bias.as_ref(), rows, &mut out).unwrap();
                read(b, &out, rows * n)
            }
            let bias = with_bias.then_some(&bias[..]);
            same(
                &format!("{label} matmul {rows}x{n}x{k} {ty:?}"),
                &matmul(g, &wt, &x, bias, rows),
                &matmul(c, &wt, &x, bias, rows),
            );
        }

        // conv and ssd_scan over a random packing, starting from random pools; trial 0 has slots
        // enough for a decode batch that the update runs with several state rows per warp, trials
        // 0 and 1 a first sequence of 300 rows (a whole chunk of 256).
        let slots = if trial == 0 { 64 } else { 4 };
        let (cu, seq_slots, snaps) = random_pack(&mut r, slots, trial < 2);
        let rows = cu[cu.len() - 1] as usize;
        let zx = randn(&mut r, rows * dip, 1.0);
        let xbc_in = randn(&mut r, rows * cd, 1.0);
        let pool_conv = randn(&mut r, slots * cl, 1.0);
        let pool_ssm = randn(&mut r, slots * sl, 0.5);
        let nsnap = snaps.len().max(1);
        type Run = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
        #[allow(clippy::too_many_arguments)]
        fn prefill_ops<B: Backend>(
            b: &B,
            p: &mamba_mixer::backend::Params<B>,
            pk: &Pack<B>,
            zx: &[f32],
            xbc_in: &[f32],
            pools: (&[f32], &[f32]),
            nsnap: usize,
            rows: usize,
        ) -> Run {
            let cfg = &p.cfg;
            let (cd, di) = (cfg.conv_dim(), cfg.d_inner());
            let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
            let zxb = b.upload(zx).unwrap();
            let mut pool: States<B> = States {
                conv: b.upload(pools.0).unwrap(),
                ssm: b.upload(pools.1).unwrap(),
            };
            let mut snap: States<B> = States {
                conv: b.zeros(nsnap * cl).unwrap(),
                ssm: b.zeros(nsnap * sl).unwrap(),
            };
            let mut xbc = b.zeros(rows * cd).unwrap();
            b.conv(p, &zxb, pk, &mut pool.conv, Some(&mut snap.conv), &mut xbc)
                .unwrap();
            // The scan reads an independent random xBC so that its check does not lean on the conv.
            let xin = b.upload(xbc_in).unwrap();
            let mut y = b.zeros(rows * di).unwrap();
            b.ssd_scan(
                p,
                &zxb,
                &xin,
                pk,
                &mut pool.ssm,
                Some(&mut snap.ssm),
                &mut y,
            )
            .unwrap();
            let slots = pools.0.len() / cl;
            (
                read(b, &xbc, rows * cd),
                read(b, &pool.conv, slots * cl),
                read(b, &snap.conv, nsnap * cl),
                read(b, &y, rows * di),
                read(b, &pool.ssm, slots * sl),
                read(b, &snap.ssm, nsnap * sl),
            )
        }
        let cpk = pack(c, cu.clone(), seq_slots.clone(), &snaps, cfg.chunk_size).unwrap();
        let gpk = pack(g, cu.clone(), seq_slots.clone(), &snaps, cfg.chunk_size).unwrap();
        let want = prefill_ops(
            c,
            cp,
            &cpk,
            &zx,
            &xbc_in,
            (&pool_conv, &pool_ssm),
            nsnap,
            rows,
        );
        let got = prefill_ops(
            g,
            gp,
            &gpk,
            &zx,
            &xbc_in,
            (&pool_conv, &pool_ssm),
            nsnap,
            rows,
        );
        let l = format!("{label} prefill cu {cu:?} slots {seq_slots:?} snaps {snaps:?}");
        same(&format!("{l}: conv out"), &got.0, &want.0);
        same(&format!("{l}: conv pool"), &got.1, &want.1);
        same(&format!("{l}: conv snapshots"), &got.2, &want.2);
        same(&format!("{l}: scan y"), &got.3, &want.3);
        same(&format!("{l}: ssm pool"), &got.4, &want.4);
        same(&format!("{l}: ssm snapshots"), &got.5, &want.5);

        // conv_update and state_update: requests of 1..4 tokens, some recording intermediates.
        let stride = 4;
        let n = if trial == 0 {
            slots
        } else {
            r.random_range(1..=slots)
        };
        let mut dcu = vec![0i32];
        let mut dslots = vec![];
        let mut record = vec![];
        let mut free: Vec<i32> = (0..slots as i32).collect();
        for i in 0..n {
            dcu.push(dcu[i] + r.random_range(1..=stride as i32));
            let slot = if r.random_bool(0.2) {
                -1
            } else {
                free.remove(r.random_range(0..free.len()))
            };
            dslots.push(slot);
            record.push(if slot >= 0 && r.random_bool(0.5) {
                slot
            } else {
                -1
            });
        }
        let drows = dcu[n] as usize;
        let dzx = randn(&mut r, drows * dip, 1.0);
        let dxbc = randn(&mut r, drows * cd, 1.0);
        fn decode_ops<B: Backend>(
            b: &B,
            p: &mamba_mixer::backend::Params<B>,
            dec: &Decode<B>,
            zx: &[f32],
            xbc_in: &[f32],
            pools: (&[f32], &[f32]),
            rows: usize,
        ) -> (Run, Vec<f32>) {
            let cfg = &p.cfg;
            let (cd, di) = (cfg.conv_dim(), cfg.d_inner());
            let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
            let slots = pools.0.len() / cl;
            let entries = slots * dec.stride;
            let zxb = b.upload(zx).unwrap();
            let mut pool: States<B> = States {
                conv: b.upload(pools.0).unwrap(),
                ssm: b.upload(pools.1).unwrap(),
            };
            let mut inter: States<B> = States {
                conv: b.zeros(entries * cl).unwrap(),
                ssm: b.zeros(entries * sl).unwrap(),
            };
            let mut xbc = b.zeros(rows * cd).unwrap();
            b.conv_update(
                p,
                &zxb,
                dec,
                &mut pool.conv,
                Some(&mut inter.conv),
                &mut xbc,
            )
            .unwrap();
            let xin = b.upload(xbc_in).unwrap();
            let mut y = b.zeros(rows * di).unwrap();
            b.state_update(
                p,
                &zxb,
                &xin,
                dec,
                &mut pool.ssm,
                Some(&mut inter.ssm),
                &mut y,
            )
            .unwrap();
            let mut gated = b.zeros(rows * di).unwrap();
            b.gated_norm(p, &zxb, &y, rows, &mut gated).unwrap();
            // Gate, norm and out_proj as the backend runs them (which may fuse them).
            let out = b.gate_out(p, &zxb, &y, rows).unwrap();
            (
                (
                    read(b, &xbc, rows * cd),
                    read(b, &pool.conv, slots * cl),
                    read(b, &inter.conv, entries * cl),
                    read(b, &y, rows * di),
                    read(b, &pool.ssm, slots * sl),
                    read(b, &gated, rows * di),
                ),
                read(b, &out, rows * cfg.d_model),
            )
        }
        let cdec = decode_batch(c, dcu.clone(), dslots.clone(), record.clone(), stride).unwrap();
        let gdec = decode_batch(g, dcu.clone(), dslots.clone(), record.clone(), stride).unwrap();
        let (want, want_out) =
            decode_ops(c, cp, &cdec, &dzx, &dxbc, (&pool_conv, &pool_ssm), drows);
        let (got, got_out) = decode_ops(g, gp, &gdec, &dzx, &dxbc, (&pool_conv, &pool_ssm), drows);
        let l = format!("{label} decode cu {dcu:?} slots {dslots:?} record {record:?}");
        same(&format!("{l}: conv_update out"), &got.0, &want.0);
        same(&format!("{l}: conv_update pool"), &got.1, &want.1);
        same(&format!("{l}: conv_update intermediates"), &got.2, &want.2);
        same(&format!("{l}: state_update y"), &got.3, &want.3);
        same(&format!("{l}: state_update pool"), &got.4, &want.4);
        same(&format!("{l}: gated_norm"), &got.5, &want.5);
        same(&format!("{l}: gate_out"), &got_out, &want_out);
    }
}

/// The whole decode pass (`Backend::decode`, which a backend may fuse) against the CPU's: two
/// batches of 48 and 80 rows, then total rows 1..=6 (the fused kernels take up to 4), requests of
/// 1..=3 tokens from random or zero states, some recording intermediates; outputs, pools and
/// intermediates compared.
fn decode_pass_matches_the_cpu<B: Backend + Clone>(dev: B, trials: u64) {
    for trial in 0..trials {
        let mut r = rng(700 + trial);
        let mut cfg = random_config(&mut r);
        // Trials 0 and 1: batches of 80 and 48 rows with in_proj's k of 512, which the batched
        // pass splits over k (its conv update sums the partials), from a tiled product of more
        // than 64 rows (one split on SIMT) and of fewer; trial 1 with in_proj's bias.
        let big = trial < 2;
        if big {
            cfg = MixerConfig::from_json(&format!(
                r#"{{"d_model": 512, "expand": 2, "headdim": 64, "ngroups": 2, "d_state": 16,
                    "d_conv": 4, "norm_before_gate": {}, "bias": {}}}"#,
                trial == 1,
                trial == 1,
            ))
            .unwrap();
        } else if r.random_bool(0.8) {
            // Mostly shapes the fused kernels take: head sizes a multiple of 8, no in_proj bias.
            let headdim = *[8usize, 16, 64].choose(&mut r).unwrap();
            let ngroups = *[1usize, 2].choose(&mut r).unwrap();
            cfg = MixerConfig::from_json(&format!(
                r#"{{"d_model": {}, "expand": 1, "headdim": {headdim}, "ngroups": {ngroups},
                    "d_state": {}, "d_conv": {}, "rmsnorm": {}, "norm_before_gate": {},
                    "D_has_hdim": {}, "conv_bias": {}}}"#,
                headdim * ngroups * r.random_range(1..=3),
                [16usize, 33, 128, 136].choose(&mut r).unwrap(),
                r.random_range(1..=4),
                r.random_bool(0.8),
                r.random_bool(0.5),
                r.random_bool(0.5),
                r.random_bool(0.5),
            ))
            .unwrap();
        }
        let label = format!("trial {trial} ({})", serde_json::to_string(&cfg).unwrap());
        let ty = *[FloatType::F32, FloatType::F16, FloatType::Bf16]
            .choose(&mut r)
            .unwrap();
        let w = random_weights(&cfg, 70 + trial, ty);
        let cpu = Mixer::new(Cpu, &cfg, &w).unwrap();
        let gpu = Mixer::new(dev.clone(), &cfg, &w).unwrap();
        let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
        // Trial 0: 80 requests of one token (the decode update's widest rows per warp: more
        // than 8192 (request, head, 8 rows)); trial 1: 24 of two.
        let requests = match trial {
            0 => 80,
            1 => 24,
            _ => r.random_range(1..=3),
        };
        let (slots, stride) = (requests + 1, 3);
        let mut cu = vec![0i32];
        let (mut dslots, mut record) = (vec![], vec![]);
        let mut free: Vec<i32> = (0..slots as i32).collect();
        for i in 0..requests {
            let tokens = if big {
                1 + trial as i32
            } else {
                r.random_range(1..=stride as i32)
            };
            cu.push(cu[i] + tokens);
            let slot = if r.random_bool(0.15) {
                -1
            } else {
                free.remove(r.random_range(0..free.len()))
            };
            dslots.push(slot);
            record.push(if slot >= 0 && r.random_bool(0.4) {
                slot
            } else {
                -1
            });
        }
        let rows = *cu.last().unwrap() as usize;
        let hidden = randn(&mut r, rows * cfg.d_model, 1.0);
        let pools = (
            randn(&mut r, slots * cl, 1.0),
            randn(&mut r, slots * sl, 0.5),
        );
        /// Output, pools and intermediates of one decode pass from `pools`.
        fn run<X: Backend>(
            m: &Mixer<X>,
            dec: (&[i32], &[i32], &[i32], usize),
            hidden: &[f32],
            pools: &(Vec<f32>, Vec<f32>),
        ) -> [Vec<f32>; 5] {
            let (b, cfg) = (&m.backend, m.config());
            let (cu, slots, record, stride) = dec;
            let dec =
                decode_batch(b, cu.to_vec(), slots.to_vec(), record.to_vec(), stride).unwrap();
            let (cl, sl) = (cfg.conv_state_len(), cfg.ssm_state_len());
            let n = pools.0.len() / cl;
            let mut pool: States<X> = States {
                conv: b.upload(&pools.0).unwrap(),
                ssm: b.upload(&pools.1).unwrap(),
            };
            let entries = n * stride;
            let mut inter: States<X> = States {
                conv: b.zeros(entries * cl).unwrap(),
                ssm: b.zeros(entries * sl).unwrap(),
            };
            let x = b.upload(hidden).unwrap();
            let out = b
                .decode(&m.params, &x, &dec, &mut pool, Some(&mut inter))
                .unwrap();
            [
                read(b, &out, hidden.len()),
                read(b, &pool.conv, n * cl),
                read(b, &pool.ssm, n * sl),
                read(b, &inter.conv, entries * cl),
                read(b, &inter.ssm, entries * sl),
            ]
        }
        let dec = (&cu[..], &dslots[..], &record[..], stride);
        let (got, want) = (
            run(&gpu, dec, &hidden, &pools),
            run(&cpu, dec, &hidden, &pools),
        );
        let l = format!("{label} {ty:?} decode pass cu {cu:?} slots {dslots:?} record {record:?}");
        for (i, what) in ["out", "conv pool", "ssm pool", "conv inter", "ssm inter"]
            .iter()
            .enumerate()
        {
            same(&format!("{l}: {what}"), &got[i], &want[i]);
        }
    }
}

#[test]
fn the_decode_pass_of_every_device_backend_matches_the_cpu() {
    for backend in common::BACKENDS {
        match backend {
            "cpu" => {}
            "wgpu" => decode_pass_matches_the_cpu(common::wgpu(), 24),
            "wgpu-basic" => decode_pass_matches_the_cpu(common::wgpu_basic(), 24),
            other => panic!("unknown backend {other}"),
        }
    }
}

#[test]
fn every_op_of_every_device_backend_matches_the_cpu() {
    for backend in common::BACKENDS {
        match backend {
            "cpu" => {}
            "wgpu" => ops_match_the_cpu(common::wgpu(), 12),
            "wgpu-basic" => ops_match_the_cpu(common::wgpu_basic(), 12),
            other => panic!("unknown backend {other}"),
        }
    }
}
