//! The conformance suite: one table of cases (configs x input shapes), run through every path of
//! every backend built here, each checked against the float64 oracle (tests/common) and, for the
//! golden files, against mamba_ssm's own results (tools/make_golden.py).

mod common;

use pollster::block_on;

use common::{oracle, randn, random_weights, rel_l2, rng, widen, BACKENDS};
use mamba_mixer::backend::Backend;
use mamba_mixer::tensors::{FloatType, TensorFile};
use mamba_mixer::{forward, Cpu, Input, Mixer, MixerConfig, Output, Path, Weights};
use serde_json::json;

/// DESIGN.md section 4: f32 against float64.
const TOL: f64 = 1e-4;

/// Every way of feeding the tokens: whole, one at a time, in pieces shorter than d_conv and
/// longer than a chunk, and in speculative groups.
const PATHS: [Path; 6] = [
    Path::Full,
    Path::Decode,
    Path::Chunked(3),
    Path::Chunked(17),
    Path::Spec(1),
    Path::Spec(3),
];

#[derive(Clone, Copy)]
enum Tokens {
    /// `(L, B)`: B sequences of L tokens.
    Batch(usize, usize),
    /// One row of packed sequences of these lengths.
    Packed(&'static [usize]),
}

struct Case {
    name: &'static str,
    /// Fields over the base config.
    cfg: serde_json::Value,
    tokens: Tokens,
    initial_states: bool,
    dtype: FloatType,
}

fn case(name: &'static str, cfg: serde_json::Value, tokens: Tokens, init: bool) -> Case {
    Case {
        name,
        cfg,
        tokens,
        initial_states: init,
        dtype: FloatType::F32,
    }
}

fn cases() -> Vec<Case> {
    use Tokens::*;
    let mut v = vec![
        case("base", json!({}), Batch(37, 1), false),
        case(
            "ngroups2_batch2_init",
            json!({"ngroups": 2}),
            Batch(50, 2),
            true,
        ),
        case(
            "ngroups4",
            json!({"d_model": 64, "headdim": 8, "ngroups": 4}),
            Batch(45, 1),
            true,
        ),
        case(
            "ngroups8",
            json!({"d_model": 64, "headdim": 8, "ngroups": 8}),
            Batch(33, 2),
            false,
        ),
        case(
            "D_has_hdim",
            json!({"D_has_hdim": true, "ngroups": 2}),
            Batch(40, 1),
            true,
        ),
        case(
            "norm_before_gate",
            json!({"norm_before_gate": true, "ngroups": 2}),
            Batch(29, 2),
            true,
        ),
        case("no_rmsnorm", json!({"rmsnorm": false}), Batch(31, 1), true),
        case("bias", json!({"bias": true}), Batch(23, 2), false),
        case(
            "no_conv_bias",
            json!({"conv_bias": false}),
            Batch(27, 1),
            true,
        ),
        case("d_conv1", json!({"d_conv": 1}), Batch(19, 2), true),
        case("d_conv2", json!({"d_conv": 2}), Batch(21, 1), true),
        case(
            "d_conv3",
            json!({"d_conv": 3, "ngroups": 2}),
            Batch(22, 2),
            true,
        ),
        case("chunk1", json!({"chunk_size": 1}), Batch(9, 2), true),
        case("chunk4", json!({"chunk_size": 4}), Batch(30, 1), true),
        case("chunk8_long", json!({"chunk_size": 8}), Batch(130, 1), true),
        case(
            "chunk64_over_len",
            json!({"chunk_size": 64}),
            Batch(50, 1),
            true,
        ),
        case(
            "dt_limit",
            json!({"dt_limit": [0.01, 0.05]}),
            Batch(26, 2),
            true,
        ),
        case(
            "dstate24_headdim4",
            json!({"d_state": 24, "headdim": 4, "ngroups": 4}),
            Batch(20, 1),
            true,
        ),
        case(
            "expand1",
            json!({"expand": 1, "headdim": 8}),
            Batch(18, 1),
            false,
        ),
        case(
            "packed_init",
            json!({"chunk_size": 8, "ngroups": 2}),
            Packed(&[1, 2, 3, 0, 37, 16, 11]),
            true,
        ),
        case(
            "packed_no_init",
            json!({"chunk_size": 16}),
            Packed(&[5, 1, 40, 2]),
            false,
        ),
        case(
            "packed_all_options",
            json!({"d_model": 64, "headdim": 8, "ngroups": 4, "D_has_hdim": true,
                   "norm_before_gate": true, "bias": true, "d_conv": 3, "chunk_size": 4}),
            Packed(&[2, 1, 9, 0, 3]),
            true,
        ),
        case("packed_single_token", json!({}), Packed(&[1]), true),
        case("empty", json!({}), Batch(0, 2), true),
    ];
    for (name, ty) in [
        ("f16_weights", FloatType::F16),
        ("bf16_weights", FloatType::Bf16),
    ] {
        let mut c = case(
            name,
            json!({"ngroups": 2, "bias": true}),
            Batch(35, 2),
            true,
        );
        c.dtype = ty;
        v.push(c);
    }
    v
}

fn config(overrides: &serde_json::Value) -> MixerConfig {
    let mut base =
        json!({"d_model": 32, "d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 16});
    for (k, v) in overrides.as_object().expect("object") {
        base[k] = v.clone();
    }
    MixerConfig::from_json(&base.to_string()).expect("valid test config")
}

/// Random inputs for a case: hidden states, cu_seqlens and initial states.
struct Inputs {
    hidden: Vec<f32>,
    l: usize,
    b: usize,
    cu: Option<Vec<i32>>,
    conv: Option<Vec<f32>>,
    ssm: Option<Vec<f32>>,
}

impl Inputs {
    fn draw(cfg: &MixerConfig, c: &Case, seed: u64) -> Self {
        let mut r = rng(seed);
        let (l, b, cu) = match c.tokens {
            Tokens::Batch(l, b) => (l, b, None),
            Tokens::Packed(lens) => {
                let mut cu = vec![0i32];
                for &n in lens {
                    cu.push(cu[cu.len() - 1] + n as i32);
                }
                (cu[cu.len() - 1] as usize, 1, Some(cu))
            }
        };
        let n = cu.as_ref().map_or(b, |cu| cu.len() - 1);
        let hidden = randn(&mut r, l * b * cfg.d_model, 1.0);
        let (conv, ssm) = if c.initial_states {
            (
                Some(randn(&mut r, n * cfg.conv_state_len(), 1.0)),
                Some(randn(&mut r, n * cfg.ssm_state_len(), 0.5)),
            )
        } else {
            (None, None)
        };
        Inputs {
            hidden,
            l,
            b,
            cu,
            conv,
            ssm,
        }
    }

    fn input(&self) -> Input<'_> {
        Input {
            hidden: &self.hidden,
            seq_len: self.l,
            batch: self.b,
            cu_seqlens: self.cu.as_deref(),
            conv_state: self.conv.as_deref(),
            ssm_state: self.ssm.as_deref(),
        }
    }
}

fn run<B: Backend>(
    backend: B,
    cfg: &MixerConfig,
    w: &Weights,
    input: &Input,
    path: Path,
) -> Output {
    let m = Mixer::new(backend, cfg, w).expect("mixer");
    block_on(forward(&m, input, path)).expect("forward")
}

fn run_on(backend: &str, cfg: &MixerConfig, w: &Weights, input: &Input, path: Path) -> Output {
    match backend {
        "cpu" => run(Cpu, cfg, w, input, path),
        "wgpu" => run(common::wgpu(), cfg, w, input, path),
        "wgpu-basic" => run(common::wgpu_basic(), cfg, w, input, path),
        other => panic!("unknown backend {other}"),
    }
}

fn check(
    label: &str,
    got: &Output,
    out: &[f64],
    conv: &[f64],
    ssm: &[f64],
    tol: f64,
) -> Vec<String> {
    let errs = [
        ("output", rel_l2(&got.output, out)),
        ("conv_state", rel_l2(&got.conv_state, conv)),
        ("ssm_state", rel_l2(&got.ssm_state, ssm)),
    ];
    errs.iter()
        .filter(|(_, e)| e.is_nan() || *e > tol)
        .map(|(what, e)| format!("{label}: {what} relative L2 error {e:.3e} > {tol:.0e}"))
        .collect()
}

#[test]
fn every_case_every_path_every_backend_matches_float64() {
    let mut failures = vec![];
    let mut ran = 0;
    for (i, c) in cases().iter().enumerate() {
        let cfg = config(&c.cfg);
        let w = random_weights(&cfg, 1000 + i as u64, c.dtype);
        let inputs = Inputs::draw(&cfg, c, 2000 + i as u64);
        let input = inputs.input();
        let want = oracle(&cfg, &w, &input);
        assert!(
            want.output.iter().any(|&x| x != 0.0) || input.hidden.is_empty(),
            "{}: the oracle output is all zeros: the case proves nothing",
            c.name
        );
        for backend in BACKENDS {
            for path in PATHS {
                let got = run_on(backend, &cfg, &w, &input, path);
                let label = format!("{} / {backend} / {path}", c.name);
                failures.extend(check(
                    &label,
                    &got,
                    &want.output,
                    &want.conv_state,
                    &want.ssm_state,
                    TOL,
                ));
                ran += 1;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(ran, cases().len() * BACKENDS.len() * PATHS.len());
}

#[test]
fn every_path_equals_the_full_path() {
    // The contract of DESIGN.md section 4, checked directly (not only through the oracle).
    for (i, c) in cases().iter().enumerate() {
        let cfg = config(&c.cfg);
        let w = random_weights(&cfg, 3000 + i as u64, c.dtype);
        let inputs = Inputs::draw(&cfg, c, 4000 + i as u64);
        for backend in BACKENDS {
            let full = run_on(backend, &cfg, &w, &inputs.input(), Path::Full);
            for path in &PATHS[1..] {
                let other = run_on(backend, &cfg, &w, &inputs.input(), *path);
                let errs = check(
                    &format!("{} / {backend} / {path}", c.name),
                    &other,
                    &widen(&full.output),
                    &widen(&full.conv_state),
                    &widen(&full.ssm_state),
                    TOL,
                );
                assert!(errs.is_empty(), "{}", errs.join("\n"));
            }
        }
    }
}

/// The golden files of tests/golden, made by tools/make_golden.py from mamba_ssm on an H200.
#[test]
fn golden_files_from_mamba_ssm() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/golden")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 18,
        "expected the 18 golden files, found {}",
        files.len()
    );
    let mut failures = vec![];
    for path in &files {
        let file = TensorFile::read(path).expect("golden file");
        let cfg = MixerConfig::from_json(&file.metadata("config").expect("config metadata"))
            .expect("config");
        let w = Weights::from_file(&file, &cfg, "").expect("weights");
        let hidden_shape = file.shape("hidden_states").expect("hidden_states");
        let (l, b) = (hidden_shape[0], hidden_shape[1]);
        let f32_any = |name: &str| {
            file.shape(name)
                .map(|s| file.f32_exact(name, &s).unwrap().unwrap())
        };
        let cu = file.i32_vector("cu_seqlens").unwrap();
        let hidden = f32_any("hidden_states").unwrap();
        let (conv, ssm) = (f32_any("conv_state"), f32_any("ssm_state"));
        let input = Input {
            hidden: &hidden,
            seq_len: l,
            batch: b,
            cu_seqlens: cu.as_deref(),
            conv_state: conv.as_deref(),
            ssm_state: ssm.as_deref(),
        };
        let expect = |name: &str| widen(&f32_any(name).expect(name));
        let (eo, ec, es) = (
            expect("expected.output"),
            expect("expected.conv_state"),
            expect("expected.ssm_state"),
        );
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        // The golden values themselves are within 2.2e-6 of float64 (tools/README.md).
        let own = oracle(&cfg, &w, &input);
        failures.extend(check(
            &format!("{name} / oracle"),
            &Output {
                output: own.output.iter().map(|&x| x as f32).collect(),
                conv_state: own.conv_state.iter().map(|&x| x as f32).collect(),
                ssm_state: own.ssm_state.iter().map(|&x| x as f32).collect(),
            },
            &eo,
            &ec,
            &es,
            1e-5,
        ));
        for backend in BACKENDS {
            for p in PATHS {
                let got = run_on(backend, &cfg, &w, &input, p);
                failures.extend(check(
                    &format!("{name} / {backend} / {p:?}"),
                    &got,
                    &eo,
                    &ec,
                    &es,
                    TOL,
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
