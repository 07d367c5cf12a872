//! Configuration and weights: Megatron's names and defaults, derived sizes, initialisation rules,
//! and safetensors round trips in every storage type.

use mamba_mixer::tensors::FloatType;
use mamba_mixer::{MixerConfig, Weights};

#[test]
fn defaults_and_names_are_megatrons() {
    let c = MixerConfig::from_json(r#"{"d_model": 2560}"#).unwrap();
    assert_eq!(
        (c.d_state, c.d_conv, c.expand, c.headdim, c.ngroups),
        (128, 4, 2, 64, 8)
    );
    assert_eq!(c.conv_init, None);
    assert_eq!(c.a_init_range, (1.0, 16.0));
    assert!(!c.d_has_hdim && c.rmsnorm && !c.norm_before_gate && !c.bias && c.conv_bias);
    assert_eq!(
        (
            c.dt_min,
            c.dt_max,
            c.dt_init.as_str(),
            c.dt_scale,
            c.dt_init_floor
        ),
        (0.001, 0.1, "random", 1.0, 1e-4)
    );
    assert_eq!(
        (c.chunk_size, c.dt_limit, c.norm_eps),
        (128, (0.0, None), 1e-5)
    );
    assert_eq!(c, MixerConfig::new(2560));
    let json: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    let mut want = vec![
        "d_model",
        "d_state",
        "d_conv",
        "conv_init",
        "expand",
        "headdim",
        "ngroups",
        "A_init_range",
        "D_has_hdim",
        "rmsnorm",
        "norm_before_gate",
        "dt_min",
        "dt_max",
        "dt_init",
        "dt_scale",
        "dt_init_floor",
        "bias",
        "conv_bias",
        "chunk_size",
        "dt_limit",
        "norm_eps",
    ];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(json["dt_limit"], serde_json::json!([0.0, null]));
}

#[test]
fn every_field_reads_and_round_trips() {
    let text = r#"{"d_model": 96, "d_state": 32, "d_conv": 3, "conv_init": 0.3, "expand": 2, "headdim": 16,
        "ngroups": 3, "A_init_range": [2, 8], "D_has_hdim": true, "rmsnorm": false, "norm_before_gate": true,
        "dt_min": 0.002, "dt_max": 0.2, "dt_init": "constant", "dt_scale": 2.0, "dt_init_floor": 0.001,
        "bias": true, "conv_bias": false, "chunk_size": 64, "dt_limit": [0.001, 0.5], "norm_eps": 1e-6}"#;
    let c = MixerConfig::from_json(text).unwrap();
    assert_eq!(
        (c.d_model, c.d_state, c.d_conv, c.conv_init, c.ngroups),
        (96, 32, 3, Some(0.3), 3)
    );
    assert_eq!(
        (c.a_init_range, c.d_has_hdim, c.dt_limit),
        ((2.0, 8.0), true, (0.001, Some(0.5)))
    );
    assert_eq!(MixerConfig::from_json(&c.to_json()).unwrap(), c);
}

#[test]
fn derived_sizes_and_state_shapes() {
    // The "2.7B" layer of shared/GPU.md.
    let c =
        MixerConfig::from_json(r#"{"d_model": 2560, "ngroups": 1, "chunk_size": 256}"#).unwrap();
    assert_eq!(
        (c.d_inner(), c.nheads(), c.conv_dim(), c.d_in_proj()),
        (5120, 80, 5376, 10576)
    );
    assert_eq!(c.state_shapes_per_request(), ([5376, 4], [80, 64, 128]));
    let g = MixerConfig::from_json(
        r#"{"d_model": 64, "headdim": 16, "ngroups": 4, "d_state": 8, "D_has_hdim": true}"#,
    )
    .unwrap();
    assert_eq!(
        (
            g.d_inner(),
            g.nheads(),
            g.conv_dim(),
            g.d_in_proj(),
            g.d_len()
        ),
        (128, 8, 192, 328, 128)
    );
}

#[test]
fn invalid_values_name_their_field() {
    let bad = [
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "d_state": 0}"#,
            "d_state",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "d_conv": 0}"#,
            "d_conv",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "d_conv": 9}"#,
            "d_conv",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "expand": 0}"#,
            "expand",
        ),
        (r#"{"d_model": 64, "headdim": 0}"#, "headdim"),
        (r#"{"d_model": 64, "headdim": 16, "ngroups": 0}"#, "ngroups"),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "dt_min": 0.5}"#,
            "dt_min",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "dt_init": "zero"}"#,
            "dt_init",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "dt_scale": -1}"#,
            "dt_scale",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "dt_init_floor": -1}"#,
            "dt_init_floor",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "conv_init": 0}"#,
            "conv_init",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "norm_eps": 0}"#,
            "norm_eps",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "dt_limit": [-1, null]}"#,
            "dt_limit",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "A_init_range": [4, 2]}"#,
            "A_init_range",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "A_init_range": [1]}"#,
            "A_init_range",
        ),
        (
            r#"{"d_model": 64, "headdim": 16, "ngroups": 2, "chunk_size": 0}"#,
            "chunk_size",
        ),
        (r#"{"d_model": 64, "bogus": 1}"#, "bogus"),
    ];
    for (text, field) in bad {
        let e = MixerConfig::from_json(text).expect_err(text).to_string();
        assert!(
            e.contains(field),
            "{text}: error {e:?} does not name {field}"
        );
    }
}

fn cfg() -> MixerConfig {
    MixerConfig::from_json(
        r#"{"d_model": 256, "headdim": 16, "ngroups": 4, "d_state": 32, "bias": true}"#,
    )
    .unwrap()
}

#[test]
fn initialisation_follows_megatron() {
    let c = cfg();
    let w = Weights::init(&c, 42).unwrap();
    w.check(&c).unwrap();
    assert_eq!(w, Weights::init(&c, 42).unwrap(), "same seed, same weights");
    assert_ne!(
        w,
        Weights::init(&c, 43).unwrap(),
        "another seed, other weights"
    );
    let softplus = |x: f32| (x as f64).exp().ln_1p();
    let dt: Vec<f64> = w.dt_bias.to_f32().iter().map(|&x| softplus(x)).collect();
    assert!(
        dt.iter()
            .all(|&d| (c.dt_min * 0.999..=c.dt_max * 1.001).contains(&d)),
        "{dt:?}"
    );
    let spread =
        dt.iter().cloned().fold(f64::MIN, f64::max) / dt.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread > 5.0,
        "dt should be log-uniform over two decades, got spread {spread}"
    );
    let a: Vec<f32> = w.a_log.to_f32().iter().map(|x| x.exp()).collect();
    assert!(a.iter().all(|&a| (1.0..=16.0 + 1e-4).contains(&a)), "{a:?}");
    let bound = 1.0 / (c.d_conv as f32).sqrt();
    assert!(w.conv_weight.to_f32().iter().all(|x| x.abs() <= bound));
    assert!(w
        .conv_bias
        .as_ref()
        .unwrap()
        .to_f32()
        .iter()
        .all(|x| x.abs() <= bound));
    assert!(w.d.to_f32().iter().all(|&x| x == 1.0));
    assert!(w
        .norm_weight
        .as_ref()
        .unwrap()
        .to_f32()
        .iter()
        .all(|&x| x == 1.0));
    assert!(w
        .in_proj_bias
        .as_ref()
        .unwrap()
        .to_f32()
        .iter()
        .all(|&x| x == 0.0));
    let p = w.in_proj.to_f32();
    let std = (p.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / p.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.001, "in_proj std {std}");
    let mut ci = c.clone();
    ci.conv_init = Some(0.05);
    let wi = Weights::init(&ci, 1).unwrap();
    let max = wi
        .conv_weight
        .to_f32()
        .iter()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(max <= 0.05 && max > 0.04, "conv_init bound: max {max}");
}

#[test]
fn weights_round_trip_in_every_dtype_and_under_a_prefix() {
    let c = cfg();
    let w = Weights::init(&c, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for ty in [FloatType::F32, FloatType::F16, FloatType::Bf16] {
        for prefix in ["", "backbone.layers.7.mixer."] {
            let p = dir.path().join("w.safetensors");
            let stored = w.cast(ty);
            stored.save(&p, prefix).unwrap();
            let back = Weights::load(&p, &c, prefix).unwrap();
            assert_eq!(back, stored, "{ty:?} {prefix:?}");
            assert!(back.named().iter().all(|(_, t)| t.float_type() == ty));
        }
    }
}
