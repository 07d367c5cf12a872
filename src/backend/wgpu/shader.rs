//! WGSL sources with defines: `#if NAME` / `#else` / `#endif` lines select code, and every define
//! with a value also becomes a `const NAME: u32 = value;`. Pipelines are cached by
//! (shader, entry point, defines).

/// The shaders, one file per op family.
pub const MATMUL: (&str, &str) = ("matmul", include_str!("../../../shaders/matmul.wgsl"));
pub const MMA: (&str, &str) = ("mma", include_str!("../../../shaders/mma.wgsl"));
pub const MATVEC: (&str, &str) = ("matvec", include_str!("../../../shaders/matvec.wgsl"));
pub const CONV: (&str, &str) = ("conv", include_str!("../../../shaders/conv.wgsl"));
pub const SSD: (&str, &str) = (
    "ssd",
    concat!(
        include_str!("../../../shaders/ssd.wgsl"),
        include_str!("../../../shaders/dt.wgsl")
    ),
);
pub const STATE_UPDATE: (&str, &str) = (
    "state_update",
    concat!(
        include_str!("../../../shaders/state_update.wgsl"),
        include_str!("../../../shaders/dt.wgsl")
    ),
);
pub const GATED_NORM: (&str, &str) = (
    "gated_norm",
    include_str!("../../../shaders/gated_norm.wgsl"),
);

/// Expands `source` under `defines` (name, value; value 0 means off for `#if`). `F16_NATIVE`
/// and `SUBGROUPS` also put their `enable` directive first where WGSL asks for it: `f16` always,
/// `subgroups` in browsers only (naga takes subgroups from the device's features and refuses
/// the directive).
pub fn expand(source: &str, defines: &[(&str, u32)]) -> String {
    let on = |name: &str| defines.iter().any(|&(n, v)| n == name && v != 0);
    let mut out = String::with_capacity(source.len() + 256);
    if on("F16_NATIVE") || on("COOP") {
        out.push_str("enable f16;\n");
    }
    if on("COOP") {
        out.push_str("enable wgpu_cooperative_matrix;\n");
    }
    if on("SUBGROUPS") && cfg!(target_arch = "wasm32") {
        out.push_str("enable subgroups;\n");
    }
    for (name, value) in defines {
        out.push_str(&format!("const {name}: u32 = {value}u;\n"));
    }
    // A stack of (this branch is taken, the enclosing code is live).
    let mut stack: Vec<(bool, bool)> = vec![];
    let live = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(taken, outer)| taken && outer);
    for line in source.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("#if ") {
            let outer = live(&stack);
            stack.push((on(name.trim()), outer));
        } else if t == "#else" {
            if let Some(top) = stack.last_mut() {
                top.0 = !top.0;
            }
        } else if t == "#endif" {
            stack.pop();
        } else if live(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn nested_conditions_and_constants() {
        let src = "a\n#if X\nb\n#if Y\nc\n#else\nd\n#endif\n#else\ne\n#endif\nf\n";
        let got = expand(src, &[("X", 1), ("Y", 0)]);
        assert_eq!(got, "const X: u32 = 1u;\nconst Y: u32 = 0u;\na\nb\nd\nf\n");
        let got = expand(src, &[]);
        assert_eq!(got, "a\ne\nf\n");
    }

    /// The tensor-core kernels run only where the adapter has cooperative matrices (not on
    /// lavapipe): naga must at least accept them everywhere, and write SPIR-V for them.
    #[test]
    fn the_cooperative_matrix_kernels_compile() {
        use wgpu::naga;
        let cases = [
            (0, 0, 0, 32, 0),
            (0, 0, 0, 32, 1),
            (0, 0, 1, 8, 0),
            (0, 0, 1, 8, 1),
            (1, 0, 0, 0, 0),
            (1, 1, 0, 0, 0),
        ];
        for (split, gate, f8, sg, direct) in cases {
            let defines = [
                ("SPLIT", split),
                ("GATE", gate),
                ("COOP", 1),
                ("F8", f8),
                ("SG", sg),
                ("DIRECT", direct),
                ("ST", 256),
                ("NV", 3),
            ];
            let src = expand(super::MMA.1, &defines);
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
            let info = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
            let spv = naga::back::spv::write_vec(&module, &info, &Default::default(), None)
                .unwrap_or_else(|e| panic!("SPIR-V of mma.wgsl ({defines:?}): {e}"));
            assert!(spv.len() > 100);
        }
    }
}
