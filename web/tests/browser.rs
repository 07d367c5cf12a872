//! The mixer in a browser (wasm32 only; natively this file is empty): the WebGPU backend in
//! headless Chromium against the CPU backend in the same module and against the float64 oracle,
//! on the full and decode paths and through the engine with a speculative decode. No WebGPU
//! adapter is a failure, not a skip.
//!
//! Run by tools/test.sh:
//! `cargo test --target wasm32-unknown-unknown --test web` with `wasm-bindgen-test-runner` as the
//! runner (.cargo/config.toml), CHROMEDRIVER set and webdriver.json giving Chromium's flags.

#![cfg(target_arch = "wasm32")]

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{oracle, randn, random_weights, rng, widen};
use mamba_mixer::backend::wgpu::{Wgpu, WgpuOptions};
use mamba_mixer::backend::Backend;
use mamba_mixer::tensors::FloatType;
use mamba_mixer::{
    forward, Cpu, Engine, EngineConfig, Input, Mixer, MixerConfig, Output, Path, Request, Weights,
    Work,
};
use mamba_mixer_web::{max_rel_l2, now_ms, rel_l2};
use wasm_bindgen::JsValue;
use wasm_bindgen_test::{console_log, wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

/// DESIGN.md section 4: f32 against float64, and one f32 backend against another.
const TOL: f64 = 1e-4;

async fn webgpu(opts: WgpuOptions) -> Wgpu {
    match Wgpu::new(opts).await {
        Ok(w) => w,
        Err(e) => panic!(
            "WebGPU: no adapter or device in this browser ({e}); start Chromium with --enable-unsafe-webgpu"
        ),
    }
}

fn config(text: &str) -> MixerConfig {
    MixerConfig::from_json(text).expect("valid test config")
}

struct Case {
    name: &'static str,
    cfg: MixerConfig,
    dtype: FloatType,
    /// Lengths of the packed sequences (one batch row).
    lens: &'static [usize],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "packed_init",
            cfg: config(
                r#"{"d_model": 64, "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8}"#,
            ),
            dtype: FloatType::F32,
            lens: &[1, 3, 0, 37, 16, 11],
        },
        Case {
            name: "all_options_bf16",
            cfg: config(
                r#"{"d_model": 32, "d_state": 8, "headdim": 8, "ngroups": 4, "D_has_hdim": true,
                    "norm_before_gate": true, "bias": true, "d_conv": 3, "chunk_size": 4,
                    "dt_limit": [0.01, 0.08]}"#,
            ),
            dtype: FloatType::Bf16,
            lens: &[2, 9, 5],
        },
        Case {
            name: "f16_weights",
            cfg: config(
                r#"{"d_model": 32, "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}"#,
            ),
            dtype: FloatType::F16,
            lens: &[20, 7],
        },
    ]
}

struct Data {
    hidden: Vec<f32>,
    cu: Vec<i32>,
    conv: Vec<f32>,
    ssm: Vec<f32>,
}

impl Data {
    fn draw(cfg: &MixerConfig, lens: &[usize], seed: u64) -> Self {
        let mut r = rng(seed);
        let mut cu = vec![0i32];
        for &n in lens {
            cu.push(cu[cu.len() - 1] + n as i32);
        }
        let (l, n) = (cu[cu.len() - 1] as usize, lens.len());
        Data {
            hidden: randn(&mut r, l * cfg.d_model, 1.0),
            conv: randn(&mut r, n * cfg.conv_state_len(), 1.0),
            ssm: randn(&mut r, n * cfg.ssm_state_len(), 0.5),
            cu,
        }
    }

    fn input(&self) -> Input<'_> {
        Input {
            hidden: &self.hidden,
            seq_len: self.cu[self.cu.len() - 1] as usize,
            batch: 1,
            cu_seqlens: Some(&self.cu),
            conv_state: Some(&self.conv),
            ssm_state: Some(&self.ssm),
        }
    }
}

async fn run<B: Backend>(
    b: B,
    cfg: &MixerConfig,
    w: &Weights,
    input: &Input<'_>,
    path: Path,
) -> Result<Output, String> {
    let m = Mixer::new(b, cfg, w).map_err(|e| e.to_string())?;
    forward(&m, input, path).await.map_err(|e| e.to_string())
}

/// The largest relative error of an output against the float64 oracle.
fn against_oracle(got: &Output, want: &common::Reference) -> f64 {
    common::rel_l2(&got.output, &want.output)
        .max(common::rel_l2(&got.conv_state, &want.conv_state))
        .max(common::rel_l2(&got.ssm_state, &want.ssm_state))
}

#[wasm_bindgen_test]
async fn webgpu_matches_cpu_on_the_full_and_decode_paths() {
    let t0 = now_ms();
    let gpu = webgpu(WgpuOptions::default()).await;
    // Without the optional features too (subgroups, shader-f16): the fallback kernels.
    let plain = webgpu(WgpuOptions {
        use_f16: false,
        use_subgroups: false,
        use_coop: false,
        trusted: false,
    })
    .await;
    console_log!(
        "WebGPU adapter: {} (wgpu: software {})",
        mamba_mixer_web::browser_adapter()
            .await
            .unwrap_or_else(|e| format!("{e:?}")),
        gpu.is_software()
    );
    let mut worst: f64 = 0.0;
    let mut failures = vec![];
    let mut runs = 0;
    for (i, c) in cases().iter().enumerate() {
        let w = random_weights(&c.cfg, 100 + i as u64, c.dtype);
        let data = Data::draw(&c.cfg, c.lens, 200 + i as u64);
        let input = data.input();
        let want = oracle(&c.cfg, &w, &input);
        assert!(
            want.output.iter().any(|&x| x != 0.0),
            "{}: the oracle output is all zeros",
            c.name
        );
        for path in [Path::Full, Path::Decode, Path::Chunked(5), Path::Spec(2)] {
            let cpu = run(Cpu, &c.cfg, &w, &input, path)
                .await
                .unwrap_or_else(|e| panic!("{} / {path} / cpu: {e}", c.name));
            let name = c.name;
            let check = |failures: &mut Vec<String>, worst: &mut f64, what: &str, e: f64| {
                *worst = worst.max(e);
                if e.is_nan() || e > TOL {
                    failures.push(format!(
                        "{name} / {path} / {what}: relative L2 error {e:.3e} > {TOL:.0e}"
                    ));
                }
            };
            check(
                &mut failures,
                &mut worst,
                "cpu vs float64",
                against_oracle(&cpu, &want),
            );
            for (label, dev) in [("webgpu", &gpu), ("webgpu-plain", &plain)] {
                runs += 1;
                match run(dev.clone(), &c.cfg, &w, &input, path).await {
                    Ok(got) => {
                        check(
                            &mut failures,
                            &mut worst,
                            &format!("{label} vs cpu"),
                            max_rel_l2(&got, &cpu),
                        );
                        check(
                            &mut failures,
                            &mut worst,
                            &format!("{label} vs float64"),
                            against_oracle(&got, &want),
                        );
                    }
                    Err(e) => failures.push(format!("{} / {path} / {label}: {e}", c.name)),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "FAIL wasm32 forward: {} of {runs} WebGPU runs:\n{}",
        failures.len(),
        failures.join("\n")
    );
    console_log!(
        "PASS wasm32 forward: {runs} WebGPU runs ({} cases x full/decode/chunked=5/spec=2, with and without optional features) match the CPU backend and float64, worst relative L2 error {worst:.2e} <= {TOL:.0e} ({:.0} ms)",
        cases().len(),
        now_ms() - t0
    );
}

/// One schedule through the engine: a chunked prefill with a snapshot, a speculative decode of
/// 1 + 3 tokens with 2 accepted, a decode from the accepted state, and a restore of the snapshot.
async fn schedule<B: Backend>(b: B, cfg: &MixerConfig, w: &Weights) -> Vec<Vec<f32>> {
    let m = Mixer::new(b, cfg, w).expect("mixer");
    let mut e = Engine::new(
        &m,
        EngineConfig {
            max_requests: 4,
            max_spec: 3,
            max_snapshots: 2,
        },
    )
    .expect("engine");
    let d = cfg.d_model;
    let mut r = rng(7);
    let prompt = randn(&mut r, 30 * d, 1.0);
    let other = randn(&mut r, 12 * d, 1.0);
    let spec = randn(&mut r, 4 * d, 1.0);
    let next = randn(&mut r, d, 1.0);
    let (a, b2) = (e.alloc().expect("slot"), e.alloc().expect("slot"));
    let mut outs = vec![];
    let out = e
        .step(&[
            Request {
                slot: a,
                tokens: &prompt[..20 * d],
                work: Work::Prefill { snapshots: vec![9] },
            },
            Request {
                slot: b2,
                tokens: &other,
                work: Work::Prefill { snapshots: vec![] },
            },
        ])
        .await
        .expect("step 1");
    let snap = out[0].snapshots[0];
    outs.extend(out.into_iter().map(|o| o.output));
    let out = e
        .step(&[
            Request {
                slot: a,
                tokens: &prompt[20 * d..],
                work: Work::Prefill { snapshots: vec![] },
            },
            Request {
                slot: b2,
                tokens: &spec,
                work: Work::Decode { spec: 3 },
            },
        ])
        .await
        .expect("step 2");
    outs.extend(out.into_iter().map(|o| o.output));
    e.accept(b2, 2).expect("accept");
    let c = e.alloc().expect("slot");
    e.restore(c, snap).expect("restore");
    let out = e
        .step(&[
            Request {
                slot: b2,
                tokens: &next,
                work: Work::Decode { spec: 0 },
            },
            Request {
                slot: -1,
                tokens: &next,
                work: Work::Decode { spec: 0 },
            },
            Request {
                slot: c,
                tokens: &prompt[9 * d..13 * d],
                work: Work::Prefill { snapshots: vec![] },
            },
        ])
        .await
        .expect("step 3");
    outs.extend(out.into_iter().map(|o| o.output));
    outs
}

#[wasm_bindgen_test]
async fn webgpu_engine_with_speculative_decode_matches_cpu() {
    let cfg =
        config(r#"{"d_model": 32, "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 8}"#);
    let w = random_weights(&cfg, 300, FloatType::F32);
    let gpu = webgpu(WgpuOptions::default()).await;
    let want = schedule(Cpu, &cfg, &w).await;
    let got = schedule(gpu, &cfg, &w).await;
    assert_eq!(got.len(), want.len());
    let mut worst: f64 = 0.0;
    for (i, (g, c)) in got.iter().zip(&want).enumerate() {
        let e = rel_l2(g, c);
        assert!(
            e <= TOL,
            "engine output {i}: WebGPU vs CPU relative L2 error {e:.3e} > {TOL:.0e}"
        );
        worst = worst.max(e);
    }
    // The restored snapshot continues the prompt: rows 9..13 equal those of the first prefill.
    let d = cfg.d_model;
    let e = common::rel_l2(&got[6], &widen(&want[0][9 * d..13 * d]));
    assert!(e <= TOL, "restored snapshot: relative L2 error {e:.3e}");
    console_log!(
        "PASS wasm32 engine: chunked prefill + snapshot, spec decode 1+3 with accept 2, padding, restore: {} outputs on WebGPU match the CPU backend, worst relative L2 error {worst:.2e} <= {TOL:.0e}",
        got.len()
    );
}

#[wasm_bindgen_test]
async fn demo_entry_point_runs_the_tiny_example() {
    for path in ["full", "decode"] {
        let r = mamba_mixer_web::run_tiny(path.into())
            .await
            .unwrap_or_else(|e| panic!("runTiny({path}): {}", e.as_string().unwrap_or_default()));
        let get = |k: &str| js_sys::Reflect::get(&r, &JsValue::from_str(k)).expect(k);
        let num = |k: &str| get(k).as_f64().unwrap_or(f64::NAN);
        for k in ["rel_l2_output", "rel_l2_conv_state", "rel_l2_ssm_state"] {
            assert!(num(k) <= TOL, "runTiny({path}): {k} = {:e}", num(k));
        }
        console_log!(
            "PASS wasm32 demo runTiny({path}): {}",
            js_sys::JSON::stringify(&r)
                .ok()
                .and_then(|s| s.as_string())
                .unwrap_or_default()
        );
    }
}
