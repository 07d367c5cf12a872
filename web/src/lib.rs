//! mamba-mixer in the browser (wasm32-unknown-unknown): the entry point of the demo page
//! (`web/index.html`), which runs the tiny example of `examples/tiny` on the browser's WebGPU
//! (the wgpu backend) and on the CPU backend in the same module and reports the relative error
//! between the two and the timings; and the helpers of the browser test (`tests/browser.rs`).
//!
//! Nothing here blocks: the GPU is awaited through the browser's event loop.

use std::path::Path as FsPath;

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use mamba_mixer::backend::wgpu::{Wgpu, WgpuOptions};
use mamba_mixer::backend::Backend;
use mamba_mixer::graph::InputFile;
use mamba_mixer::tensors::TensorFile;
use mamba_mixer::{forward, Cpu, Error, Input, Mixer, MixerConfig, Output, Path, Result, Weights};

const TINY_CONFIG: &str = include_str!("../../examples/tiny/config.json");
const TINY_WEIGHTS: &[u8] = include_bytes!("../../examples/tiny/weights.safetensors");
const TINY_INPUT: &[u8] = include_bytes!("../../examples/tiny/input.safetensors");

/// Milliseconds from the page's (or worker's) `performance.now()`; 0 where there is none.
pub fn now_ms() -> f64 {
    js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("performance"))
        .ok()
        .and_then(|p| p.dyn_into::<web_sys::Performance>().ok())
        .map_or(0.0, |p| p.now())
}

/// `||a - b|| / ||b||` in f64; infinite when either holds a NaN or an infinity.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// The largest of the relative errors of the output and the two final states.
pub fn max_rel_l2(a: &Output, b: &Output) -> f64 {
    rel_l2(&a.output, &b.output)
        .max(rel_l2(&a.conv_state, &b.conv_state))
        .max(rel_l2(&a.ssm_state, &b.ssm_state))
}

/// The browser's WebGPU through wgpu; an error (never a silent CPU fallback) when the browser
/// offers no adapter.
pub async fn webgpu() -> Result<Wgpu> {
    Wgpu::new(WgpuOptions::default()).await
}

/// What the browser tells of its WebGPU adapter (wgpu's adapter name is the often empty
/// `description`): "vendor architecture [description] (fallback adapter)" and the limit that
/// matters most to the kernels, `maxStorageBuffersPerShaderStage`.
pub async fn browser_adapter() -> std::result::Result<String, JsValue> {
    use js_sys::Reflect;
    let get = |o: &JsValue, k: &str| Reflect::get(o, &JsValue::from_str(k));
    let gpu = get(&get(&js_sys::global(), "navigator")?, "gpu")?;
    if gpu.is_undefined() {
        return Err("this browser has no WebGPU (navigator.gpu is missing)".into());
    }
    let request: js_sys::Function = get(&gpu, "requestAdapter")?.dyn_into()?;
    let promise: js_sys::Promise = request.call0(&gpu)?.dyn_into()?;
    let adapter = wasm_bindgen_futures::JsFuture::from(promise).await?;
    if adapter.is_null() || adapter.is_undefined() {
        return Err("navigator.gpu.requestAdapter() gave no adapter".into());
    }
    let info = get(&adapter, "info")?;
    let text = |k: &str| {
        get(&info, k)
            .ok()
            .and_then(|v| v.as_string())
            .unwrap_or_default()
    };
    let mut out = [text("vendor"), text("architecture"), text("description")]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if get(&info, "isFallbackAdapter")?.as_bool() == Some(true) {
        out.push_str(" (fallback adapter)");
    }
    let limit = get(&get(&adapter, "limits")?, "maxStorageBuffersPerShaderStage")?;
    if let Some(n) = limit.as_f64() {
        out.push_str(&format!(", maxStorageBuffersPerShaderStage {n}"));
    }
    Ok(out)
}

async fn timed<B: Backend>(m: &Mixer<B>, input: &Input<'_>, path: Path) -> Result<(Output, f64)> {
    let t0 = now_ms();
    let out = forward(m, input, path).await?;
    Ok((out, now_ms() - t0))
}

/// The tiny example on one path: the result, as a JSON string.
async fn tiny(path: &str) -> Result<String> {
    let path: Path = path.parse().map_err(Error::Invalid)?;
    let cfg = MixerConfig::from_json(TINY_CONFIG)?;
    let file = TensorFile::from_bytes(FsPath::new("weights.safetensors"), TINY_WEIGHTS.to_vec())?;
    let weights = Weights::from_file(&file, &cfg, "")?;
    let file = TensorFile::from_bytes(FsPath::new("input.safetensors"), TINY_INPUT.to_vec())?;
    let data = InputFile::from_file(&file, &cfg)?;
    let input = data.as_input();

    let gpu = webgpu().await?;
    let software = gpu.is_software();
    let adapter = browser_adapter()
        .await
        .unwrap_or_else(|_| gpu.adapter_name().to_string());
    let on_gpu = Mixer::new(gpu, &cfg, &weights)?;
    // The first run compiles the pipelines; the second is the steady state.
    let (_, gpu_first_ms) = timed(&on_gpu, &input, path).await?;
    let (gpu_out, gpu_ms) = timed(&on_gpu, &input, path).await?;
    let on_cpu = Mixer::new(Cpu, &cfg, &weights)?;
    let (cpu_out, cpu_ms) = timed(&on_cpu, &input, path).await?;

    Ok(serde_json::json!({
        "path": path.to_string(),
        "tokens": data.seq_len * data.batch,
        "sequences": data.sequences(),
        "adapter": adapter,
        "software_adapter": software,
        "rel_l2_output": rel_l2(&gpu_out.output, &cpu_out.output),
        "rel_l2_conv_state": rel_l2(&gpu_out.conv_state, &cpu_out.conv_state),
        "rel_l2_ssm_state": rel_l2(&gpu_out.ssm_state, &cpu_out.ssm_state),
        "webgpu_first_ms": gpu_first_ms,
        "webgpu_ms": gpu_ms,
        "cpu_ms": cpu_ms,
    })
    .to_string())
}

/// Runs `examples/tiny` (three packed sequences with initial states) on `path` (`full`, `decode`,
/// `chunked=N` or `spec=K`) on WebGPU and on the CPU backend. Resolves to an object with
/// `adapter`, `rel_l2_output`, `rel_l2_conv_state`, `rel_l2_ssm_state` (WebGPU against the
/// CPU), and `webgpu_first_ms` (with pipeline compilation), `webgpu_ms` and `cpu_ms`; rejects
/// with the error's message (for one, when the browser offers no WebGPU adapter).
#[wasm_bindgen(js_name = runTiny)]
pub async fn run_tiny(path: String) -> std::result::Result<JsValue, JsValue> {
    let json = tiny(&path)
        .await
        .map_err(|e| JsValue::from_str(&e.to_string()))?;
    js_sys::JSON::parse(&json)
}
