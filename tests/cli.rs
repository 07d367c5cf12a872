//! The command-line contract: `init` and `forward` end to end, and every kind of bad input giving
//! a non-zero exit, a message that names the problem, and no output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{oracle, randn, rel_l2, rng, widen};
use mamba_mixer::tensors::{write_atomic, FloatType, HostTensor, Raw, TensorFile};
use mamba_mixer::{Input, MixerConfig, Weights};

const TOL: f64 = 1e-4;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mamba-mixer"))
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/tiny")
        .join(name)
}

struct Run {
    ok: bool,
    code: Option<i32>,
    stderr: String,
}

fn run(args: &[&str]) -> Run {
    let out = bin().args(args).output().expect("run mamba-mixer");
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `forward` on the example with the given files, defaults for the rest.
fn forward(dir: &Path, cfg: &Path, weights: &Path, input: &Path, extra: &[&str]) -> (Run, PathBuf) {
    let out = dir.join("out.safetensors");
    let mut args = vec![
        "forward",
        "--config",
        s(cfg),
        "--weights",
        s(weights),
        "--input",
        s(input),
        "--output",
        s(&out),
    ];
    args.extend_from_slice(extra);
    (run(&args), out)
}

fn read_out(path: &Path) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let f = TensorFile::read(path).expect("output file");
    let get = |n: &str| f.f32_exact(n, &f.shape(n).expect(n)).unwrap().unwrap();
    (get("output"), get("conv_state"), get("ssm_state"))
}

/// hidden_states, its shape, cu_seqlens, conv_state and ssm_state of the bundled example.
type ExampleInput = (Vec<f32>, Vec<usize>, Option<Vec<i32>>, Vec<f32>, Vec<f32>);

fn example_input() -> ExampleInput {
    let f = TensorFile::read(&example("input.safetensors")).unwrap();
    let get = |n: &str| f.f32_exact(n, &f.shape(n).unwrap()).unwrap().unwrap();
    (
        get("hidden_states"),
        f.shape("hidden_states").unwrap(),
        f.i32_vector("cu_seqlens").unwrap(),
        get("conv_state"),
        get("ssm_state"),
    )
}

#[test]
fn forward_on_the_example_matches_float64_on_both_paths_and_every_prefix_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = example("config.json");
    let cfg = MixerConfig::from_json(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let (hidden, shape, cu, conv, ssm) = example_input();
    let input = Input {
        hidden: &hidden,
        seq_len: shape[0],
        batch: shape[1],
        cu_seqlens: cu.as_deref(),
        conv_state: Some(&conv),
        ssm_state: Some(&ssm),
    };
    // Weights as the user makes them: `init`, optionally in 16 bits and under a model prefix.
    for (dtype, prefix) in [
        ("f32", ""),
        ("bf16", "backbone.layers.3.mixer."),
        ("f16", "decoder.layers.3.mixer."),
    ] {
        let w_path = dir.path().join(format!("w_{dtype}.safetensors"));
        let r = run(&[
            "init",
            "--config",
            s(&cfg_path),
            "--seed",
            "11",
            "--dtype",
            dtype,
            "--prefix",
            prefix,
            "--output",
            s(&w_path),
        ]);
        assert!(r.ok, "init failed: {}", r.stderr);
        let w = Weights::load(&w_path, &cfg, prefix).unwrap();
        let want = oracle(&cfg, &w, &input);
        for (path, backend) in ["full", "decode", "chunked=5", "spec=2"]
            .into_iter()
            .flat_map(|p| ["cpu", "wgpu"].map(|b| (p, b)))
        {
            let (r, out) = forward(
                dir.path(),
                &cfg_path,
                &w_path,
                &example("input.safetensors"),
                &["--prefix", prefix, "--path", path, "--backend", backend],
            );
            assert!(
                r.ok,
                "forward {dtype} {path} {backend} failed: {}",
                r.stderr
            );
            let (o, c, st) = read_out(&out);
            for (what, e) in [
                ("output", rel_l2(&o, &want.output)),
                ("conv_state", rel_l2(&c, &want.conv_state)),
                ("ssm_state", rel_l2(&st, &want.ssm_state)),
            ] {
                assert!(e <= TOL, "{dtype} {path} {backend}: {what} error {e:.3e}");
            }
        }
    }
}

#[test]
fn init_is_reproducible_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example("config.json");
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("w{i}.safetensors")))
        .collect();
    for (p, seed) in paths.iter().zip(["5", "5", "6"]) {
        let r = run(&[
            "init",
            "--config",
            s(&cfg),
            "--seed",
            seed,
            "--output",
            s(p),
        ]);
        assert!(r.ok, "{}", r.stderr);
    }
    let bytes: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(bytes[0], bytes[1], "the same seed must give the same file");
    assert_ne!(bytes[0], bytes[2], "another seed must give other weights");
}

/// A valid setup to break one piece at a time.
struct Setup {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    weights: PathBuf,
    input: PathBuf,
    cfg_value: MixerConfig,
    made: std::cell::Cell<usize>,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg_value =
            MixerConfig::from_json(&std::fs::read_to_string(example("config.json")).unwrap())
                .unwrap();
        Setup {
            cfg: example("config.json"),
            weights: example("weights.safetensors"),
            input: example("input.safetensors"),
            dir,
            cfg_value,
            made: std::cell::Cell::new(0),
        }
    }

    /// A fresh file name, so that the files of one table of cases never overwrite each other.
    fn fresh(&self, name: &str) -> PathBuf {
        self.made.set(self.made.get() + 1);
        self.dir.path().join(format!("{}_{name}", self.made.get()))
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.fresh(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn tensors(&self, name: &str, tensors: Vec<(&str, Raw)>) -> PathBuf {
        let p = self.fresh(name);
        let t: Vec<(String, Raw)> = tensors
            .into_iter()
            .map(|(n, r)| (n.to_string(), r))
            .collect();
        write_atomic(&p, &t, None).unwrap();
        p
    }

    /// The example's weights with one tensor changed (None: removed).
    fn weights_with(&self, name: &str, replace: Option<Raw>) -> PathBuf {
        let w = Weights::load(&self.weights, &self.cfg_value, "").unwrap();
        let mut t: Vec<(&str, Raw)> = w
            .named()
            .into_iter()
            .filter(|(n, _)| *n != name)
            .map(|(n, t)| (n, Raw::from(t)))
            .collect();
        if let Some(r) = replace {
            t.push((name, r));
        }
        self.tensors("bad_weights.safetensors", t)
    }

    /// An input of `l` tokens with the given extra tensors.
    fn input_with(&self, hidden_shape: &[usize], extra: Vec<(&str, Raw)>) -> PathBuf {
        let n: usize = hidden_shape.iter().product();
        let mut t = vec![(
            "hidden_states",
            Raw::f32(hidden_shape, &randn(&mut rng(1), n, 1.0)),
        )];
        t.extend(extra);
        self.tensors("bad_input.safetensors", t)
    }

    fn config(&self, text: &str) -> PathBuf {
        self.file("bad_config.json", text.as_bytes())
    }
}

/// Runs `forward` and checks the failure contract: exit code 1, every fragment in the message,
/// no output file and no temporary file left in the output folder.
fn expect_failure(
    label: &str,
    st: &Setup,
    cfg: &Path,
    weights: &Path,
    input: &Path,
    extra: &[&str],
    fragments: &[&str],
) {
    let out_dir = st
        .dir
        .path()
        .join(format!("out_{}", label.replace(' ', "_")));
    std::fs::create_dir_all(&out_dir).unwrap();
    let (r, out) = forward(&out_dir, cfg, weights, input, extra);
    assert!(!r.ok, "{label}: forward succeeded on bad input");
    assert_eq!(r.code, Some(1), "{label}: exit code (stderr: {})", r.stderr);
    assert!(
        !r.stderr.contains("panicked"),
        "{label}: panicked: {}",
        r.stderr
    );
    for f in fragments {
        assert!(
            r.stderr.contains(f),
            "{label}: message {:?} lacks {f:?}",
            r.stderr.trim()
        );
    }
    assert!(!out.exists(), "{label}: an output file was left behind");
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
    assert!(
        left.is_empty(),
        "{label}: files left in the output folder: {left:?}"
    );
}

#[test]
fn bad_weights_files_are_refused_with_the_tensor_named() {
    let st = Setup::new();
    let good = std::fs::read(&st.weights).unwrap();
    let truncated = st.file("truncated.safetensors", &good[..good.len() / 2]);
    let text = st.file("text.safetensors", b"this is not a safetensors file at all");
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        (
            "truncated",
            truncated.clone(),
            vec!["truncated.safetensors", "not a valid safetensors"],
        ),
        (
            "not safetensors",
            text.clone(),
            vec!["text.safetensors", "not a valid safetensors"],
        ),
        (
            "missing tensor",
            st.weights_with("D", None),
            vec!["`D`", "missing", "[8]"],
        ),
        (
            "wrong shape",
            st.weights_with("in_proj.weight", Some(Raw::f32(&[10, 64], &[0.5; 640]))),
            vec!["in_proj.weight", "expected shape [328, 64]", "got [10, 64]"],
        ),
        (
            "wrong dtype",
            st.weights_with("A_log", Some(Raw::i32(&[1; 8]))),
            vec!["A_log", "I32"],
        ),
        (
            "unused tensor",
            st.weights_with("in_proj.bias", Some(Raw::f32(&[328], &[0.1; 328]))),
            vec!["in_proj.bias", "does not use"],
        ),
        (
            "missing file",
            st.dir.path().join("nope.safetensors"),
            vec!["nope.safetensors"],
        ),
    ];
    for (label, w, frags) in cases {
        expect_failure(label, &st, &st.cfg, &w, &st.input, &[], &frags);
    }
    expect_failure(
        "wrong prefix",
        &st,
        &st.cfg,
        &st.weights,
        &st.input,
        &["--prefix", "backbone.layers.0.mixer."],
        &["backbone.layers.0.mixer.in_proj.weight", "missing"],
    );
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    let st = Setup::new();
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        (
            "not json",
            "d_model = 64",
            vec!["bad_config.json", "config"],
        ),
        (
            "unknown field",
            r#"{"d_model": 64, "d_modle": 3}"#,
            vec!["unknown field `d_modle`"],
        ),
        (
            "missing d_model",
            r#"{"d_state": 16}"#,
            vec!["missing field `d_model`"],
        ),
        (
            "headdim",
            r#"{"d_model": 64, "headdim": 48}"#,
            vec!["headdim 48", "d_inner"],
        ),
        (
            "ngroups",
            r#"{"d_model": 64, "headdim": 16, "ngroups": 3}"#,
            vec!["ngroups 3", "nheads"],
        ),
        (
            "chunk",
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "chunk_size": 100}"#,
            vec!["chunk_size", "power of two"],
        ),
        (
            "zero",
            r#"{"d_model": 0}"#,
            vec!["d_model must be positive"],
        ),
        (
            "A range",
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "A_init_range": [0, 16]}"#,
            vec!["A_init_range"],
        ),
        (
            "dt_limit",
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "dt_limit": [0.1, 0.01]}"#,
            vec!["dt_limit"],
        ),
        (
            "wrong type",
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "rmsnorm": "yes"}"#,
            vec!["rmsnorm: invalid type"],
        ),
    ];
    for (label, text, frags) in cases {
        let cfg = st.config(text);
        expect_failure(label, &st, &cfg, &st.weights, &st.input, &[], &frags);
    }
    // A valid config that disagrees with the checkpoint names the tensor whose shape is off.
    let other = st.config(r#"{"d_model": 64, "d_state": 16, "headdim": 16, "ngroups": 4}"#);
    expect_failure(
        "config vs weights",
        &st,
        &other,
        &st.weights,
        &st.input,
        &[],
        &["in_proj.weight", "expected shape"],
    );
}

#[test]
fn bad_inputs_are_refused_with_the_tensor_named() {
    let st = Setup::new();
    let c = &st.cfg_value;
    let (cd, dc) = (c.conv_dim(), c.d_conv);
    let ssm = [c.nheads(), c.headdim, c.d_state];
    let zeros = |n: usize| vec![0.25f32; n];
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        (
            "width",
            st.input_with(&[5, 2, 63], vec![]),
            vec!["hidden_states", "d_model=64", "[5, 2, 63]"],
        ),
        (
            "rank",
            st.input_with(&[5, 64], vec![]),
            vec!["hidden_states", "[5, 64]"],
        ),
        (
            "hidden dtype",
            st.tensors(
                "h16.safetensors",
                vec![(
                    "hidden_states",
                    Raw::from(&HostTensor::f32(vec![1, 1, 64], vec![0.5; 64]).cast(FloatType::F16)),
                )],
            ),
            vec!["hidden_states", "expected dtype F32, got F16"],
        ),
        (
            "no hidden",
            st.tensors("none.safetensors", vec![("cu_seqlens", Raw::i32(&[0, 1]))]),
            vec!["hidden_states", "missing"],
        ),
        (
            "unexpected tensor",
            st.input_with(
                &[3, 1, 64],
                vec![("conv_states", Raw::f32(&[1, cd, dc], &zeros(cd * dc)))],
            ),
            vec!["conv_states", "unexpected"],
        ),
        (
            "cu start",
            st.input_with(&[6, 1, 64], vec![("cu_seqlens", Raw::i32(&[1, 6]))]),
            vec!["cu_seqlens", "start at 0"],
        ),
        (
            "cu order",
            st.input_with(&[6, 1, 64], vec![("cu_seqlens", Raw::i32(&[0, 4, 2, 6]))]),
            vec!["cu_seqlens", "non-decreasing"],
        ),
        (
            "cu end",
            st.input_with(&[6, 1, 64], vec![("cu_seqlens", Raw::i32(&[0, 2, 5]))]),
            vec!["cu_seqlens", "end at L = 6", "got 5"],
        ),
        (
            "cu batch",
            st.input_with(&[3, 2, 64], vec![("cu_seqlens", Raw::i32(&[0, 3]))]),
            vec!["cu_seqlens", "batch 1", "got batch 2"],
        ),
        (
            "cu short",
            st.input_with(&[3, 1, 64], vec![("cu_seqlens", Raw::i32(&[0]))]),
            vec!["cu_seqlens", "at least 2"],
        ),
        (
            "cu dtype",
            st.input_with(
                &[3, 1, 64],
                vec![("cu_seqlens", Raw::f32(&[2], &[0.0, 3.0]))],
            ),
            vec!["cu_seqlens", "I32"],
        ),
        (
            "conv shape",
            st.input_with(
                &[3, 2, 64],
                vec![(
                    "conv_state",
                    Raw::f32(&[2, cd, dc - 1], &zeros(2 * cd * (dc - 1))),
                )],
            ),
            vec![
                "conv_state",
                "expected shape [2, 192, 4]",
                "got [2, 192, 3]",
            ],
        ),
        (
            "ssm count",
            st.input_with(
                &[6, 1, 64],
                vec![
                    ("cu_seqlens", Raw::i32(&[0, 2, 6])),
                    (
                        "ssm_state",
                        Raw::f32(&[3, ssm[0], ssm[1], ssm[2]], &zeros(3 * c.ssm_state_len())),
                    ),
                ],
            ),
            vec![
                "ssm_state",
                "expected shape [2, 8, 16, 16]",
                "got [3, 8, 16, 16]",
            ],
        ),
        (
            "input not safetensors",
            st.file("in.txt", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
            vec!["in.txt", "not a valid safetensors"],
        ),
    ];
    for (label, input, frags) in cases {
        expect_failure(label, &st, &st.cfg, &st.weights, &input, &[], &frags);
    }
}

#[test]
fn unavailable_backends_and_unwritable_outputs_are_clear_errors() {
    let st = Setup::new();
    expect_failure(
        "cuda",
        &st,
        &st.cfg,
        &st.weights,
        &st.input,
        &["--backend", "cuda"],
        &["cuda", "not available"],
    );
    let missing_dir = st.dir.path().join("no/such/dir/out.safetensors");
    let r = run(&[
        "forward",
        "--config",
        s(&st.cfg),
        "--weights",
        s(&st.weights),
        "--input",
        s(&st.input),
        "--output",
        s(&missing_dir),
    ]);
    assert!(!r.ok && r.code == Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("no/such/dir"), "{}", r.stderr);
    // A malformed flag is a usage error (clap's exit code 2).
    let (r, out) = forward(
        st.dir.path(),
        &st.cfg,
        &st.weights,
        &st.input,
        &["--path", "sideways"],
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("sideways") && !out.exists());
}

#[test]
fn example_output_is_the_same_on_every_path_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = vec![];
    let paths = [
        "full",
        "decode",
        "chunked=1",
        "chunked=3",
        "chunked=33",
        "spec=1",
        "spec=3",
    ];
    for path in paths {
        let sub = dir.path().join(path);
        std::fs::create_dir(&sub).unwrap();
        let (r, out) = forward(
            &sub,
            &example("config.json"),
            &example("weights.safetensors"),
            &example("input.safetensors"),
            &["--path", path],
        );
        assert!(r.ok, "{}", r.stderr);
        outs.push(read_out(&out));
    }
    let a = &outs[0];
    for (b, path) in outs.iter().zip(paths).skip(1) {
        assert!(rel_l2(&b.0, &widen(&a.0)) <= TOL, "{path}: output");
        assert!(rel_l2(&b.1, &widen(&a.1)) <= TOL, "{path}: conv_state");
        assert!(rel_l2(&b.2, &widen(&a.2)) <= TOL, "{path}: ssm_state");
    }
}

#[test]
fn bench_times_every_case_on_every_backend() {
    let cfg = example("config.json");
    for backend in ["cpu", "wgpu"] {
        let out = bin()
            .args([
                "bench",
                "--backend",
                backend,
                "--config",
                s(&cfg),
                "--cases",
                "decode:1,spec:2x1,prefill:40,scan:40",
                "--iters",
                "2",
            ])
            .output()
            .expect("run mamba-mixer");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (case, kernel) in [
            ("decode batch 1 |", "matvec"),
            ("decode batch 2, 1+1 tokens |", "state_update"),
            ("prefill 1x40 |", "ssd_mm"),
            ("scan 1x40 |", "ssd_mm"),
        ] {
            let row = text
                .lines()
                .find(|l| l.starts_with(&format!("| {case}")))
                .unwrap_or_else(|| panic!("{backend}: no row for {case}\n{text}"));
            let cols: Vec<&str> = row.split('|').map(str::trim).collect();
            // | case | back to back | engine step | wall | kernels |; a scan has no engine step.
            let scan = case.starts_with("scan");
            let wall: f64 = cols[4].parse().expect("wall us");
            assert!(wall > 0.0, "{row}");
            if scan {
                assert_eq!(cols[3], "-", "{row}");
            }
            if backend == "wgpu" {
                // The scan's kernels only: nothing of the projections, the conv or the norm.
                if scan {
                    assert!(cols[5].split(", ").all(|k| k.starts_with("ssd_")), "{row}");
                }
                for c in [2, 3].into_iter().filter(|&c| !(scan && c == 3)) {
                    let us: f64 = cols[c]
                        .parse()
                        .unwrap_or_else(|_| panic!("device us: {row}"));
                    assert!(us > 0.0, "{row}");
                }
                assert!(cols[5].contains(kernel), "{row}");
            } else {
                assert_eq!((cols[2], cols[3]), ("-", "-"), "{row}");
            }
        }
    }
    let r = run(&["bench", "--config", s(&cfg), "--cases", "decode:0"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("decode:0"), "{}", r.stderr);
}
