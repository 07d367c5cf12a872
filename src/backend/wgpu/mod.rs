//! The WGSL backend on wgpu: native (Vulkan, Metal, DX12) and browsers (WebGPU). Every op records
//! compute passes into one command encoder; nothing is submitted until a readback, so a whole
//! step is one submission. Pipelines are cached by (shader, entry, defines); buffers come from a
//! pool keyed by size.

mod shader;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use half::f16;
use wgpu::util::DeviceExt;

use super::{decode_ops, gate_out_ops, split, Backend, Decode, Pack, Params, States};
use crate::config::MAX_D_CONV;
use crate::error::{Error, Result};
use crate::tensors::{Data, HostTensor};

const WG: u32 = 64;
/// The decode kernel keeps eight state columns per lane of 32.
const MAX_D_STATE: usize = 256;
/// Up to this many rows (and k a multiple of 4), a matmul is a matrix-vector product (decode).
const MATVEC_ROWS: usize = 4;
/// Most (row, group) pairs of the fused decode pass (the out_proj kernel's factors).
const MAX_NORM_FACTORS: usize = 64;
/// Rows per thread of conv.wgsl's conv_seq (its RB).
const CONV_ROWS: usize = 8;
/// ssd.wgsl's tiles: ssd_mm's threads per workgroup, the same for C B^T, the chunk states and the
/// chunk outputs (half as many output rows, 64 columns). H200, 2.7b 1x8192, 256 threads against
/// 128: chunk outputs 1246, 1145 us (130m: 411, 380); C B^T 34.6, 32.6; the chunk states 382, 352
/// since their loads have no branches (before: 600, 634).
const SSD_THREADS: usize = 128;
const SSD_TJ: usize = 64;
/// Threads per head of chunk_dt (dt's segments of a chunk), in the C B^T dispatch.
const SSD_DT_SEGS: usize = 32;
/// Most workgroups along one dispatch dimension.
const MAX_GROUPS: u32 = 65535;

fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "wgpu",
        msg: msg.into(),
    }
}

/// One of the shader files (`matmul`, `mma`, `matvec`, `conv`, `ssd`, `state_update`,
/// `gated_norm`) expanded under `defines` as its pipelines build it, for tools that compile the
/// kernels on their own (`examples/pipeline_stats.rs`).
pub fn shader_source(name: &str, defines: &[(&str, u32)]) -> Option<String> {
    let all = [
        shader::MATMUL,
        shader::MMA,
        shader::MATVEC,
        shader::CONV,
        shader::SSD,
        shader::STATE_UPDATE,
        shader::GATED_NORM,
    ];
    all.iter()
        .find(|s| s.0 == name)
        .map(|s| shader::expand(s.1, defines))
}

/// Which optional adapter features to use when present (tests turn them off to run the
/// fallbacks).
#[derive(Debug, Clone, Copy)]
pub struct WgpuOptions {
    pub use_f16: bool,
    pub use_subgroups: bool,
    /// Cooperative matrices (tensor cores) for the matmuls of more than a few rows with 16-bit
    /// weights, where the adapter has 16x16x16 f16 products into f32 and subgroups of 32 (wgpu's
    /// experimental feature; native only).
    pub use_coop: bool,
    /// Kernels without wgpu's runtime checks (index clamps, loop counters, zeroed workgroup
    /// memory): ours stay in bounds by construction. Browsers always check.
    pub trusted: bool,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        WgpuOptions {
            use_f16: true,
            use_subgroups: true,
            use_coop: true,
            trusted: true,
        }
    }
}

/// Free buffers by byte size, for reuse.
#[derive(Default)]
struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
}

/// A device buffer of f32 (or i32) values; it goes back to the pool when dropped.
pub struct GpuBuf {
    buf: wgpu::Buffer,
    len: usize,
    pool: Rc<RefCell<Pool>>,
}

impl GpuBuf {
    fn raw(&self) -> &wgpu::Buffer {
        &self.buf
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        // A handle clone: the pool keeps the buffer alive for the next user.
        let b = self.buf.clone();
        self.pool
            .borrow_mut()
            .free
            .entry(b.size())
            .or_default()
            .push(b);
    }
}

/// State rows per warp of the decode update: one where the (request, head, 8 rows) workgroups
/// are few (2.7b batch 1, 640 of them: more rows per warp measured slower), two or four for
/// batches. H200, 2.7b batch 64 (40960 of them): 132.0 us with one, 120.6 with two, 109.6 with
/// four, 123.0 with eight; batch 16 of 1+3 tokens (10240): 75.6 with two, 72.7 with four, 85.2
/// with eight (since the columns past 128 are a define; before it two were best). Measured with 8
/// warps a workgroup; with 2 (`update_warps`), four still beat eight at batch 64 (98.9 against 103.3).
fn rows_per_warp(requests: usize, nh: usize, hd: usize) -> usize {
    match requests * nh * hd.div_ceil(8) {
        n if n > 8192 => 4,
        n if n > 1024 => 2,
        _ => 1,
    }
}

/// Warps per workgroup of the decode update: 8 in the fused pass (its sums of squares come one
/// per workgroup, which out_proj's pass adds), 2 otherwise (H200, 2.7b batch 64: 111.8 us with
/// 8, 102.1 with 4, 98.9 with 2; batch 16 of 1+3 tokens: 71.8, 68.2, 67.5).
fn update_warps(fused: bool) -> usize {
    if fused {
        8
    } else {
        2
    }
}

/// mma.wgsl's tiles (rows, columns) and k step: x is padded to whole tiles of rows, the weights
/// to whole tiles of columns and steps of k.
const MMA_ROWS: usize = 64;
const MMA_COLS: usize = 128;
const MMA_K: usize = 32;

/// Split-K (splits, k per split) for tiled products whose tiles alone are too few workgroups to
/// fill a big GPU (decode batches): about `target` workgroups, each over at least 256 of k, in
/// whole steps of `step`. mma.wgsl's target is 256, two of its workgroups a multiprocessor on the
/// H200 (2.7b batch 64, back to back: 173.7 us; aimed at 192 / 384 / 512 with two k steps a load,
/// 211.6 / 213.7 / 200.6 against 179.3; BENCHMARKS.md, sixth session).
fn split_k(tiles: usize, k: usize, step: usize, target: usize) -> (usize, usize) {
    let splits = (target / tiles.max(1)).clamp(1, (k / 256).max(1));
    let k_per = k.div_ceil(splits).next_multiple_of(step).max(step);
    (k.div_ceil(k_per).max(1), k_per)
}

/// Split-K partial products, summed by matmul_sum or conv_update: `splits` blocks of `len`
/// values in rows of `row`; `scaled`: mma.wgsl's (rows and columns padded to whole tiles), then
/// x's row scales, which each row's sum is still to be divided by.
struct Partials {
    buf: GpuBuf,
    splits: usize,
    row: usize,
    len: usize,
    scaled: bool,
}

/// What the decode conv update reads: in_proj's output, or its split-K partials.
enum InProj<'a> {
    Out(&'a GpuBuf),
    Parts(&'a Partials),
}

/// A bind group's pipeline (its address in the cache, which keeps it) and buffers by binding.
type BindKey = (usize, Vec<(u32, wgpu::Buffer)>);

/// Bind groups (and uniform buffers) cached before the caches start over.
const MAX_BIND_GROUPS: usize = 4096;

/// A matmul weight `(n, k)`: f32, or two 16-bit values per u32 word (rows padded to even k).
pub struct GpuWeight {
    buf: GpuBuf,
    n: usize,
    k: usize,
    row_words: usize,
    kind: WeightKind,
    /// f16 in mma.wgsl's layout: rows of a multiple of 32 values, a multiple of 128 rows.
    mma: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightKind {
    F32,
    F16,
    Bf16,
}

impl WeightKind {
    /// The shader define that selects this storage.
    fn define(self) -> &'static str {
        match self {
            WeightKind::F32 => "W_F32",
            WeightKind::F16 => "W_F16",
            WeightKind::Bf16 => "W_BF16",
        }
    }
}

/// A handle on one GPU device; clones share the device, its pipelines and its buffer pool (so
/// the layers of a model can share one device).
#[derive(Clone)]
pub struct Wgpu {
    inner: Rc<Inner>,
}

impl std::ops::Deref for Wgpu {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

pub struct Inner {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter_name: String,
    software: bool,
    /// SHADER_F16 is on: f16 weights are read as f16 pairs.
    f16: bool,
    /// SUBGROUP is on: reductions use subgroup sums.
    subgroups: bool,
    /// EXPERIMENTAL_COOPERATIVE_MATRIX is on, with 16x16x16 f16 products into f32, or with
    /// 8x8x8 ones only (`coop_f8`).
    coop: bool,
    coop_f8: bool,
    /// The adapter's subgroup size where it is fixed (min = max), else 0.
    subgroup: u32,
    /// Kernels built without runtime checks.
    trusted: bool,
    limits: wgpu::Limits,
    pipelines: RefCell<HashMap<String, Rc<wgpu::ComputePipeline>>>,
    /// Uniform buffers by content, bind groups by (pipeline, buffers), readback buffers by size:
    /// the steps of a decode loop repeat the same ones, and creating them cost the host more than
    /// recording the dispatches.
    uniforms: RefCell<HashMap<Vec<u32>, wgpu::Buffer>>,
    binds: RefCell<HashMap<BindKey, wgpu::BindGroup>>,
    stages: Rc<RefCell<HashMap<u64, Vec<wgpu::Buffer>>>>,
    encoder: RefCell<Option<wgpu::CommandEncoder>>,
    /// The compute pass that dispatches go into; a copy, a clear or a submission ends it, so a
    /// step is few passes (the pass boundaries cost more than the barriers between dispatches).
    pass: RefCell<Option<wgpu::ComputePass<'static>>>,
    pool: Rc<RefCell<Pool>>,
    /// A device error caught by the uncaptured-error handler, reported at the next readback.
    lost: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// 16-byte buffers bound where an op has no tensor: one for read-only bindings (a missing
    /// bias), one for writable ones (no snapshots); a dispatch may not use one buffer both ways.
    dummy: GpuBuf,
    dummy_rw: GpuBuf,
    /// GPU timestamps around every dispatch, when profiling (adapters with TIMESTAMP_QUERY).
    profiler: RefCell<Option<Profiler>>,
    /// Per dispatch (entry point, nanoseconds) of the readbacks since the last `profile_take`.
    profile: Rc<RefCell<Vec<(&'static str, f64)>>>,
}

/// Timestamp queries recorded since the last readback: a pair around every dispatch, or (per
/// step) one pair around everything recorded between two readbacks.
struct Profiler {
    set: wgpu::QuerySet,
    capacity: u32,
    entries: Vec<&'static str>,
    per_kernel: bool,
    /// Per step: the step's first timestamp is written, its last is not yet.
    open: bool,
}

impl Wgpu {
    /// The first adapter wgpu offers (high performance preferred).
    pub async fn new(opts: WgpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| err(format!("no GPU adapter: {e}")))?;
        let have = adapter.features();
        let mut features = wgpu::Features::empty();
        if opts.use_subgroups && have.contains(wgpu::Features::SUBGROUP) {
            features |= wgpu::Features::SUBGROUP;
        }
        if opts.use_f16 && have.contains(wgpu::Features::SHADER_F16) {
            features |= wgpu::Features::SHADER_F16;
        }
        features |= have
            & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
        // Square f16 products into f32: 16x16x16 (NVIDIA), else 8x8x8 (Mesa 26's lavapipe), of
        // which the kernel makes its 16x16 fragments.
        let f16_into_f32 = |size: u32| {
            adapter.cooperative_matrix_properties().iter().any(|c| {
                use wgpu::CooperativeScalarType as T;
                (c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type)
                    == (size, size, size, T::F16, T::F32)
            })
        };
        let coop_f8 = !f16_into_f32(16);
        let info = adapter.get_info();
        // The kernel places its matrices by subgroup: their size must be fixed.
        let subgroup = if info.subgroup_min_size == info.subgroup_max_size {
            info.subgroup_min_size
        } else {
            0
        };
        // mma.wgsl's workgroup: 2x4 subgroups.
        let mma_threads = 8 * subgroup;
        let adapter_limits = adapter.limits();
        let coop = opts.use_coop
            && features.contains(wgpu::Features::SHADER_F16)
            && features.contains(wgpu::Features::SUBGROUP)
            && [8, 16, 32, 64].contains(&subgroup)
            && mma_threads <= adapter_limits.max_compute_invocations_per_workgroup
            && mma_threads <= adapter_limits.max_compute_workgroup_size_x
            && have.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && (f16_into_f32(16) || f16_into_f32(8));
        if coop {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        // Everything the adapter offers, but no more storage buffers per shader than WebGPU
        // guarantees everywhere (8), so that a native run catches a kernel that browsers refuse.
        let mut limits = adapter_limits;
        limits.max_storage_buffers_per_shader_stage =
            limits.max_storage_buffers_per_shader_stage.min(8);
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("mamba-mixer"),
                required_features: features,
                required_limits: limits.clone(),
                // SAFETY: the one experimental feature requested is cooperative matrices, used by
                // one kernel (mma.wgsl) in the configuration the adapter reports.
                experimental_features: if coop {
                    unsafe { wgpu::ExperimentalFeatures::enabled() }
                } else {
                    wgpu::ExperimentalFeatures::disabled()
                },
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| err(format!("cannot open the device: {e}")))?;
        let lost = std::sync::Arc::new(std::sync::Mutex::new(None));
        let sink = lost.clone();
        device.on_uncaptured_error(std::sync::Arc::new(move |e: wgpu::Error| {
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert(e.to_string());
            }
        }));
        let pool = Rc::new(RefCell::new(Pool::default()));
        let dummy = |label| GpuBuf {
            buf: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
            len: 4,
            pool: pool.clone(),
        };
        let (dummy, dummy_rw) = (dummy("dummy"), dummy("dummy_rw"));
        let inner = Inner {
            f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            coop,
            coop_f8,
            subgroup,
            trusted: opts.trusted,
            adapter_name: info.name,
            software: info.device_type == wgpu::DeviceType::Cpu,
            device,
            queue,
            limits,
            pipelines: RefCell::new(HashMap::new()),
            uniforms: RefCell::new(HashMap::new()),
            binds: RefCell::new(HashMap::new()),
            stages: Rc::new(RefCell::new(HashMap::new())),
            encoder: RefCell::new(None),
            pass: RefCell::new(None),
            pool,
            lost,
            dummy,
            dummy_rw,
            profiler: RefCell::new(None),
            profile: Rc::new(RefCell::new(vec![])),
        };
        Ok(Wgpu {
            inner: Rc::new(inner),
        })
    }
}

impl Inner {
    /// The adapter's name, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub fn adapter_name(&self) -> &str {
        &self.adapter_name
    }

    /// The optional features in use: (SHADER_F16, SUBGROUP).
    pub fn features_in_use(&self) -> (bool, bool) {
        (self.f16, self.subgroups)
    }

    /// Whether the matmuls run on cooperative matrices (tensor cores).
    pub fn uses_coop(&self) -> bool {
        self.coop
    }

    /// Whether the adapter runs on the CPU (lavapipe, SwiftShader, WARP).
    pub fn is_software(&self) -> bool {
        self.software
    }

    fn buffer(&self, bytes: u64) -> Result<GpuBuf> {
        // At least one word: zero-sized bindings are not allowed.
        let size = bytes.max(16).next_multiple_of(16);
        if size > self.limits.max_storage_buffer_binding_size || size > self.limits.max_buffer_size
        {
            return Err(err(format!(
                "a buffer of {size} bytes exceeds the adapter's limit (max_storage_buffer_binding_size {}, max_buffer_size {})",
                self.limits.max_storage_buffer_binding_size, self.limits.max_buffer_size
            )));
        }
        let reused = self
            .pool
            .borrow_mut()
            .free
            .get_mut(&size)
            .and_then(Vec::pop);
        let buf = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        Ok(GpuBuf {
            buf,
            len: (bytes / 4) as usize,
            pool: self.pool.clone(),
        })
    }

    /// Submits what has been recorded, so that a queue write lands after it.
    fn flush(&self) {
        self.pass.borrow_mut().take();
        if let Some(enc) = self.encoder.borrow_mut().take() {
            self.queue.submit([enc.finish()]);
        }
    }

    fn with_encoder<T>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> T) -> T {
        // Copies and clears go outside compute passes: end the open one.
        self.pass.borrow_mut().take();
        let mut slot = self.encoder.borrow_mut();
        let enc = slot.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        f(enc)
    }

    fn bytes_to_buf(&self, bytes: &[u8]) -> Result<GpuBuf> {
        let buf = self.buffer(bytes.len() as u64)?;
        if !bytes.is_empty() {
            // The pool may hand back a buffer that recorded work still reads: submit that first.
            self.flush();
            self.queue.write_buffer(buf.raw(), 0, bytes);
        }
        Ok(buf)
    }

    fn pipeline(
        &self,
        shader: (&str, &str),
        entry: &str,
        defines: &[(&str, u32)],
    ) -> Rc<wgpu::ComputePipeline> {
        let key = format!("{}:{entry}:{defines:?}", shader.0);
        if let Some(p) = self.pipelines.borrow().get(&key) {
            return p.clone();
        }
        let source = shader::expand(shader.1, defines);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(shader.0),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let module = if self.trusted {
            // SAFETY: every index of these kernels stays within the sizes that the host checked
            // and passed them, and every loop ends; that rests on their construction (the checks
            // would clamp, not report: the `wgpu-basic` test device runs the fallback variants
            // checked, and every device's results are compared with the CPU's). The checks cost
            // the hot loops a clamp per index and a counter per loop.
            unsafe {
                self.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            self.device.create_shader_module(desc)
        };
        let pipeline = Rc::new(self.device.create_compute_pipeline(
            &wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                // Every kernel writes its workgroup memory before reading it.
                compilation_options: wgpu::PipelineCompilationOptions {
                    zero_initialize_workgroup_memory: !self.trusted,
                    ..Default::default()
                },
                cache: None,
            },
        ));
        self.pipelines.borrow_mut().insert(key, pipeline.clone());
        pipeline
    }

    /// Records one dispatch of `groups` workgroups (spread over x and y when there are more than
    /// 65535), binding `params` as a uniform at 0 and `bufs` at their binding numbers.
    fn dispatch(
        &self,
        shader: (&str, &str),
        entry: &'static str,
        defines: &[(&str, u32)],
        params: &[u32],
        bufs: &[(u32, &wgpu::Buffer)],
        groups: u32,
    ) -> Result<()> {
        if groups == 0 {
            return Ok(());
        }
        let pipeline = self.pipeline(shader, entry, defines);
        if self.binds.borrow().len() >= MAX_BIND_GROUPS {
            // Bounded: shapes that change every step would otherwise grow these without end.
            self.binds.borrow_mut().clear();
            self.uniforms.borrow_mut().clear();
        }
        let cached = self.uniforms.borrow().get(params).cloned();
        let uniform = cached.unwrap_or_else(|| {
            let b = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("params"),
                    contents: bytemuck::cast_slice(params),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            self.uniforms
                .borrow_mut()
                .insert(params.to_vec(), b.clone());
            b
        });
        let mut all = vec![(0, uniform)];
        all.extend(bufs.iter().map(|&(binding, b)| (binding, b.clone())));
        let key = (Rc::as_ptr(&pipeline) as usize, all);
        let bind = self
            .binds
            .borrow_mut()
            .entry(key)
            .or_insert_with_key(|(_, all)| {
                let entries: Vec<_> = all
                    .iter()
                    .map(|(binding, b)| wgpu::BindGroupEntry {
                        binding: *binding,
                        resource: b.as_entire_binding(),
                    })
                    .collect();
                self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipeline.get_bind_group_layout(0),
                    entries: &entries,
                })
            })
            .clone();
        let (x, y) = if groups <= MAX_GROUPS {
            (groups, 1)
        } else {
            (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
        };
        if y > MAX_GROUPS {
            return Err(err(format!(
                "{entry}: {groups} workgroups is too many for one dispatch"
            )));
        }
        let timing = self.profiler.borrow_mut().as_mut().and_then(|p| {
            let at = 2 * p.entries.len() as u32;
            if !p.per_kernel {
                return None;
            }
            (at + 2 <= p.capacity).then(|| {
                p.entries.push(entry);
                (p.set.clone(), at)
            })
        });
        let inside = self
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
        if timing.is_some() && !inside {
            // Timestamps only at pass boundaries: this dispatch gets a pass of its own.
            self.pass.borrow_mut().take();
        }
        if self.pass.borrow().is_none() {
            let pass = self.with_encoder(|enc| {
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: timing.as_ref().filter(|_| !inside).map(|(set, at)| {
                        wgpu::ComputePassTimestampWrites {
                            query_set: set,
                            beginning_of_pass_write_index: Some(*at),
                            end_of_pass_write_index: Some(at + 1),
                        }
                    }),
                })
                .forget_lifetime()
            });
            *self.pass.borrow_mut() = Some(pass);
        }
        let mut slot = self.pass.borrow_mut();
        let Some(pass) = slot.as_mut() else {
            return Err(err("no compute pass"));
        };
        if let (Some((set, at)), true) = (&timing, inside) {
            pass.write_timestamp(set, *at);
        }
        if let Some(p) = self.profiler.borrow_mut().as_mut() {
            let at = 2 * p.entries.len() as u32;
            if !p.per_kernel && !p.open && at + 2 <= p.capacity {
                pass.write_timestamp(&p.set, at);
                p.entries.push("step");
                p.open = true;
            }
        }
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(x, y, 1);
        if let (Some((set, at)), true) = (&timing, inside) {
            pass.write_timestamp(set, at + 1);
        }
        if timing.is_some() && !inside {
            slot.take();
        }
        Ok(())
    }

    /// Per step: the step's last timestamp, after everything recorded so far.
    fn end_step_timing(&self) {
        let mut guard = self.profiler.borrow_mut();
        let Some(p) = guard.as_mut().filter(|p| p.open) else {
            return;
        };
        p.open = false;
        let at = 2 * p.entries.len() as u32 - 1;
        if self.pass.borrow().is_none() {
            let pass = self.with_encoder(|enc| {
                enc.begin_compute_pass(&Default::default())
                    .forget_lifetime()
            });
            *self.pass.borrow_mut() = Some(pass);
        }
        if let Some(pass) = self.pass.borrow_mut().as_mut() {
            pass.write_timestamp(&p.set, at);
        }
    }

    /// Records the resolve of this submission's timestamps into a buffer to map, if profiling.
    fn resolve_profile(&self) -> Option<(wgpu::Buffer, Vec<&'static str>)> {
        let mut guard = self.profiler.borrow_mut();
        let p = guard.as_mut()?;
        if p.entries.is_empty() {
            return None;
        }
        let entries = std::mem::take(&mut p.entries);
        let bytes = 16 * entries.len() as u64;
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let stage = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let set = p.set.clone();
        drop(guard);
        self.with_encoder(|enc| {
            enc.resolve_query_set(&set, 0..2 * entries.len() as u32, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &stage, 0, bytes);
        });
        Some((stage, entries))
    }

    /// `matmul` on tensor cores (mma.wgsl): x split into scaled f16 parts, the products in tiles
    /// of 64x128, split over k (partials summed by matmul_sum) where the tiles alone are too few
    /// workgroups to fill a big GPU.
    fn mma(
        &self,
        src: MmaSrc,
        w: &GpuWeight,
        bias: Option<&GpuBuf>,
        rows: usize,
        out: &mut GpuBuf,
    ) -> Result<()> {
        if rows == 0 || w.n == 0 {
            return Ok(());
        }
        if let Some(parts) = self.mma_run(src, w, bias, rows, Some(&mut *out))? {
            self.sum_splits(&parts, w, bias, rows, out)?;
        }
        Ok(())
    }

    /// mma.wgsl's split of `rows` rows of `k` values (from `src`) into f16 parts, rows padded to
    /// whole tiles and to `kp` values: (parts, per-row scales).
    fn mma_split(&self, src: MmaSrc, k: usize, kp: usize, rows: usize) -> Result<(GpuBuf, GpuBuf)> {
        let padded = rows.next_multiple_of(MMA_ROWS);
        // Threads per row: 1024 (where the adapter allows) for the gated split, and for few rows,
        // which would leave most of a big GPU idle; 256 otherwise (H200, 2.7b: the gated split of
        // batch 64 28.1 -> 14.6 us, of prefill 2048 108 -> 78; the plain one of prefill 2048 with
        // 1024 threads 29.5 against 20.9).
        let gated = matches!(src, MmaSrc::Gated { .. });
        let wide = self.limits.max_compute_invocations_per_workgroup >= 1024
            && self.limits.max_compute_workgroup_size_x >= 1024;
        let st = if wide && (gated || rows < 256) {
            1024
        } else {
            256
        };
        let parts = self.buffer((padded * kp * 4) as u64)?;
        let scale = self.buffer((padded * 4) as u64)?;
        let mut params = [0u32; 16];
        params[..3].copy_from_slice(&[u(rows)?, 0, u(kp)?]);
        params[6] = u(padded)?;
        params[9] = u(k)?;
        let mut binds = vec![(2, parts.raw()), (3, scale.raw())];
        let gate = match src {
            MmaSrc::Plain(x) => {
                binds.push((1, x.raw()));
                0
            }
            MmaSrc::Gated { p, zxbcdt, y } => {
                let cfg = &p.cfg;
                params[10..15].copy_from_slice(&[
                    u(cfg.d_in_proj())?,
                    u(cfg.ngroups)?,
                    cfg.norm_before_gate as u32,
                    p.norm_weight.is_some() as u32,
                    (cfg.norm_eps as f32).to_bits(),
                ]);
                binds.extend([
                    (1, y.raw()),
                    (4, zxbcdt.raw()),
                    (5, self.opt(p.norm_weight.as_ref())),
                ]);
                1
            }
        };
        self.dispatch(
            shader::MMA,
            "mma_split",
            &[
                ("SPLIT", 1),
                ("GATE", gate),
                ("ST", u(st)?),
                ("NV", u((kp / 2).div_ceil(st))?),
            ],
            &params,
            &binds,
            u(padded)?,
        )?;
        Ok((parts, scale))
    }

    /// Partials of `splits` blocks of `len` values in rows of `row` (plus `scales` values): none
    /// where the products go straight to the caller's output (`to_out`, one split).
    fn partials(
        &self,
        to_out: bool,
        splits: usize,
        [row, len, scales]: [usize; 3],
    ) -> Result<Option<Partials>> {
        if to_out && splits == 1 {
            return Ok(None);
        }
        let buf = self.buffer(((splits * len + scales) * 4) as u64)?;
        Ok(Some(Partials {
            buf,
            splits,
            row,
            len,
            scaled: scales > 0,
        }))
    }

    /// The split of x and the products: into `out` when k is not split, else (always, `out`
    /// being None) into partials, returned, without the bias.
    fn mma_run(
        &self,
        src: MmaSrc,
        w: &GpuWeight,
        bias: Option<&GpuBuf>,
        rows: usize,
        out: Option<&mut GpuBuf>,
    ) -> Result<Option<Partials>> {
        let kp = 2 * w.row_words;
        let padded = rows.next_multiple_of(MMA_ROWS);
        let (parts, scale) = self.mma_split(src, w.k, kp, rows)?;
        let tiles_n = w.n.div_ceil(MMA_COLS);
        let tiles = padded / MMA_ROWS * tiles_n;
        let (splits, k_per) = split_k(tiles, kp, MMA_K, 256);
        let bias = bias.filter(|_| out.is_some());
        let groups = tiles * splits;
        // Partials hold whole tiles: padded rows, columns of whole tiles.
        let np = tiles_n * MMA_COLS;
        let params = [
            u(rows)?,
            u(w.n)?,
            u(kp)?,
            u(w.row_words)?,
            bias.is_some() as u32,
            u(tiles_n)?,
            u(groups)?,
            u(k_per)?,
            u(splits)?,
            u(w.k)?,
            0,
            0,
            0,
            0,
            0,
            u(np)?,
        ];
        let scratch = self.partials(out.is_some(), splits, [np, padded * np, padded])?;
        let mut binds = vec![(1, parts.raw()), (2, w.buf.raw()), (3, scale.raw())];
        match (&scratch, out) {
            (Some(s), _) => binds.push((5, s.buf.raw())),
            (None, Some(o)) => binds.extend([(4, self.opt(bias)), (5, o.raw())]),
            (None, None) => return Err(err("products without an output")),
        }
        self.dispatch(
            shader::MMA,
            "mma",
            &[
                ("COOP", 1),
                ("F8", self.coop_f8 as u32),
                ("SG", self.subgroup),
                ("DIRECT", scratch.is_some() as u32),
            ],
            &params,
            &binds,
            u(groups)?,
        )?;
        Ok(scratch)
    }

    /// Split-K partials summed into `out` (rows, n), plus the bias.
    fn sum_splits(
        &self,
        parts: &Partials,
        w: &GpuWeight,
        bias: Option<&GpuBuf>,
        rows: usize,
        out: &mut GpuBuf,
    ) -> Result<()> {
        let mut params = [0u32; 12];
        params[..2].copy_from_slice(&[u(rows)?, u(w.n)?]);
        params[4] = bias.is_some() as u32;
        params[8..11].copy_from_slice(&[u(parts.splits)?, u(parts.row)?, u(parts.len)?]);
        let binds = [(1, parts.buf.raw()), (3, self.opt(bias)), (4, out.raw())];
        self.dispatch(
            shader::MATMUL,
            "matmul_sum",
            &[(w.kind.define(), 1), ("SCALED", parts.scaled as u32)],
            &params,
            &binds,
            u((rows * w.n).div_ceil(256))?,
        )
    }

    /// A matrix-vector product of few rows (`rows <= MATVEC_ROWS`, `k` a multiple of 4), plain or
    /// as a part of the fused decode pass.
    fn matvec(
        &self,
        x: &GpuBuf,
        w: &GpuWeight,
        bias: Option<&GpuBuf>,
        rows: usize,
        out: &mut GpuBuf,
        fuse: Fuse,
    ) -> Result<()> {
        let define = w.kind.define();
        // One column per warp, eight warps per workgroup; two warps per column where columns
        // are few (out_proj: 2560 columns of the 2.7b layer measured 39.8 against 42.6 us per
        // decode step; four warps, or two on in_proj's 10576 columns, were slower).
        let split = if w.n < 4096 { 2 } else { 1 };
        let groups = w.n.div_ceil(8 / split);
        let mut params = [
            u(rows)?,
            u(w.n)?,
            u(w.k)?,
            // Four words to a 16-byte vector.
            u(w.row_words / 4)?,
            bias.is_some() as u32,
            u(groups)?,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let mut binds = vec![(1, x.raw()), (2, w.buf.raw()), (4, out.raw())];
        let (mut conv, mut gated, mut dc) = (0, 0, 1);
        match fuse {
            Fuse::None => binds.push((3, self.opt(bias))),
            Fuse::Conv {
                p,
                dec,
                pool,
                inter,
            } => {
                conv = 1;
                let cfg = &p.cfg;
                dc = u(cfg.d_conv)?;
                params[6..12].copy_from_slice(&[
                    u(cfg.d_inner())?,
                    u(cfg.conv_dim())?,
                    0, // the conv width is the DC define
                    u(dec.requests())?,
                    u(dec.stride)?,
                    p.conv_bias.is_some() as u32,
                ]);
                binds.extend([
                    (3, p.conv_weight.raw()),
                    (5, self.opt(p.conv_bias.as_ref())),
                    (6, dec.dev.raw()),
                    (7, pool.raw()),
                    (8, inter.map_or(self.dummy_rw.raw(), |b| b.raw())),
                ]);
            }
            Fuse::Gated {
                part,
                ng,
                parts,
                gs,
                eps,
            } => {
                gated = 1;
                params[12..16].copy_from_slice(&[u(ng)?, u(parts)?, u(gs)?, eps.to_bits()]);
                binds.extend([(3, self.opt(bias)), (5, part.raw())]);
            }
        }
        self.dispatch(
            shader::MATVEC,
            "matvec",
            &[
                (define, 1),
                ("R", u(rows.max(1))?),
                ("SUBGROUPS", self.subgroups as u32),
                ("CONV", conv),
                ("GATED", gated),
                ("FACTORS", u(MAX_NORM_FACTORS)?),
                ("SPLIT", u(split)?),
                ("DC", dc),
            ],
            &params,
            &binds,
            u(groups)?,
        )
    }

    /// The decode recurrence; `fused`: x, B and C come from zxbcdt (in place after the conv of
    /// `matvec`'s CONV variant) and `y` receives the gated values, with the norm's partial sums
    /// of squares in the given buffer.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        p: &Params<Wgpu>,
        zxbcdt: &GpuBuf,
        xbc: XSrc,
        dec: &Decode<Wgpu>,
        pool: &mut GpuBuf,
        inter: Option<&mut GpuBuf>,
        y: &mut GpuBuf,
        part: Option<&mut GpuBuf>,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (nh, hd, ds) = (cfg.nheads(), cfg.headdim, cfg.d_state);
        if ds > MAX_D_STATE {
            return Err(err(format!(
                "d_state {ds} is larger than the decode kernel's {MAX_D_STATE}"
            )));
        }
        let rpw = rows_per_warp(dec.requests(), nh, hd);
        let warps = update_warps(part.is_some());
        let groups = dec.requests() * nh * hd.div_ceil(warps * rpw);
        let lim = dt_limits(cfg);
        let (xs, xo) = match xbc {
            XSrc::Conv(_) => (cfg.conv_dim(), 0),
            XSrc::InPlace => (cfg.d_in_proj(), cfg.d_inner()),
        };
        let params = [
            u(nh)?,
            u(hd)?,
            u(ds)?,
            u(cfg.ngroups)?,
            u(cfg.conv_dim())?,
            u(cfg.d_in_proj())?,
            u(cfg.d_inner() + cfg.conv_dim())?,
            u(dec.requests())?,
            u(dec.stride)?,
            cfg.d_has_hdim as u32,
            lim[0],
            lim[1],
            lim[2],
            lim[3],
            u(groups)?,
            u(xs)?,
            u(xo)?,
            cfg.norm_before_gate as u32,
            p.norm_weight.is_some() as u32,
            0,
        ];
        let saved = inter.map_or(self.dummy_rw.raw(), |b| b.raw());
        let mut binds = vec![
            (1, zxbcdt.raw()),
            (3, p.heads.raw()),
            (6, dec.dev.raw()),
            (9, pool.raw()),
            (10, saved),
            (11, y.raw()),
        ];
        let fused = part.is_some();
        match (xbc, part) {
            (XSrc::Conv(xbc), None) => binds.push((2, xbc.raw())),
            (XSrc::InPlace, None) => binds.push((2, zxbcdt.raw())),
            (XSrc::InPlace, Some(part)) => {
                binds.extend([(4, self.opt(p.norm_weight.as_ref())), (5, part.raw())])
            }
            (XSrc::Conv(_), Some(_)) => return Err(err("update: the fused pass reads zxbcdt")),
        }
        self.dispatch(
            shader::STATE_UPDATE,
            "state_update",
            &[
                ("SUBGROUPS", self.subgroups as u32),
                ("FUSED", fused as u32),
                ("RPW", u(rpw)?),
                ("WARPS", u(warps)?),
                ("V4", (ds % 4 == 0) as u32),
                ("WIDE", (ds > 128) as u32),
                ("WHOLE", (ds % 128 == 0) as u32),
            ],
            &params,
            &binds,
            u(groups)?,
        )
    }

    /// matmul.wgsl's tiled products: into `out` when k is not split, else (always, `out` being
    /// None) into partials, returned, without the bias.
    fn tiled_run(
        &self,
        x: &GpuBuf,
        w: &GpuWeight,
        bias: Option<&GpuBuf>,
        rows: usize,
        out: Option<&mut GpuBuf>,
    ) -> Result<Option<Partials>> {
        let define = w.kind.define();
        // 128x128 tiles where there are rows enough to fill them; 64x64 below (decode batches).
        let (entry, tile) = if rows > 64 {
            ("matmul_wide", 128)
        } else {
            ("matmul", 64)
        };
        let tiles_n = w.n.div_ceil(tile);
        let tiles = rows.div_ceil(tile) * tiles_n;
        let (splits, k_per) = if entry == "matmul" {
            split_k(tiles, w.k, 16, 512)
        } else {
            (1, w.k.next_multiple_of(16))
        };
        let bias = bias.filter(|_| out.is_some());
        let groups = tiles * splits;
        let params = [
            u(rows)?,
            u(w.n)?,
            u(w.k)?,
            u(w.row_words)?,
            bias.is_some() as u32,
            u(tiles_n)?,
            u(groups)?,
            u(k_per)?,
            u(splits)?,
            0,
            0,
            0,
        ];
        let native = (w.kind == WeightKind::F16 && self.f16) as u32;
        let defines = [(define, 1), ("F16_NATIVE", native)];
        let scratch = self.partials(out.is_some(), splits, [w.n, rows * w.n, 0])?;
        let target = match (&scratch, out) {
            (Some(s), _) => s.buf.raw(),
            (None, Some(o)) => o.raw(),
            (None, None) => return Err(err("products without an output")),
        };
        let binds = [
            (1, x.raw()),
            (2, w.buf.raw()),
            (3, self.opt(bias)),
            (4, target),
        ];
        self.dispatch(shader::MATMUL, entry, &defines, &params, &binds, u(groups)?)?;
        Ok(scratch)
    }

    /// The conv update of a decode pass (conv.wgsl's conv_update) from in_proj's output, or from
    /// its split-K partials: then `out` receives all of zxbcdt, summed, with the xBC columns
    /// convolved in place.
    fn conv_step(
        &self,
        p: &Params<Wgpu>,
        src: InProj,
        dec: &Decode<Wgpu>,
        pool: &mut GpuBuf,
        inter: Option<&mut GpuBuf>,
        out: &mut GpuBuf,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (cd, dip) = (cfg.conv_dim(), cfg.d_in_proj());
        let (src, parts) = match src {
            InProj::Parts(q) => (&q.buf, Some(q)),
            InProj::Out(b) => (b, None),
        };
        let n = dec.requests() * if parts.is_some() { dip } else { cd };
        let params = [
            u(dec.rows())?,
            u(cd)?,
            u(dip)?,
            u(cfg.d_inner())?,
            u(dec.requests())?,
            p.conv_bias.is_some() as u32,
            u(n)?,
            0,
            u(dec.stride)?,
            p.in_proj_bias.is_some() as u32,
            u(parts.map_or(0, |q| q.row))?,
            u(parts.map_or(0, |q| q.len))?,
        ];
        let saved = inter.map_or(self.dummy_rw.raw(), |b| b.raw());
        let mut binds = vec![
            (1, src.raw()),
            (2, p.conv_weight.raw()),
            (3, self.opt(p.conv_bias.as_ref())),
            (6, pool.raw()),
            (7, out.raw()),
            (8, dec.dev.raw()),
            (9, saved),
        ];
        if parts.is_some() {
            binds.push((10, self.opt(p.in_proj_bias.as_ref())));
        }
        let [dc, rb] = conv_defines(cfg.d_conv)?;
        self.dispatch(
            shader::CONV,
            "conv_update",
            &[
                ("PARTS", parts.is_some() as u32),
                ("SPLITS", u(parts.map_or(0, |q| q.splits))?),
                ("SCALED", parts.is_some_and(|q| q.scaled) as u32),
                dc,
                rb,
            ],
            &params,
            &binds,
            groups_for(n)?,
        )
    }

    fn opt<'a>(&'a self, b: Option<&'a GpuBuf>) -> &'a wgpu::Buffer {
        b.map_or(self.dummy.raw(), GpuBuf::raw)
    }
}

/// A decode pass of more rows than the fused one takes: in_proj's (split-K) partials summed by
/// the conv update (which leaves zxbcdt whole, xBC convolved in place), the update reading x, B
/// and C there, then the gate and norm (on tensor cores: in out_proj's split) and out_proj.
fn decode_rows(
    b: &Wgpu,
    p: &Params<Wgpu>,
    hidden: &GpuBuf,
    dec: &Decode<Wgpu>,
    pool: &mut States<Wgpu>,
    inter: Option<&mut States<Wgpu>>,
) -> Result<GpuBuf> {
    let cfg = &p.cfg;
    let rows = dec.rows();
    if hidden.len < rows * cfg.d_model {
        return Err(err(format!(
            "decode: hidden holds {} values, {rows} rows of d_model {} need {}",
            hidden.len,
            cfg.d_model,
            rows * cfg.d_model
        )));
    }
    let (inter_conv, inter_ssm) = split(inter);
    let w = &p.in_proj;
    let run = if w.mma {
        b.mma_run(MmaSrc::Plain(hidden), w, None, rows, None)?
    } else {
        b.tiled_run(hidden, w, None, rows, None)?
    };
    let Some(partials) = run else {
        return Err(err("decode: in_proj's partials are missing"));
    };
    let mut zxbcdt = b.alloc(rows * cfg.d_in_proj())?;
    b.conv_step(
        p,
        InProj::Parts(&partials),
        dec,
        &mut pool.conv,
        inter_conv,
        &mut zxbcdt,
    )?;
    let mut y = b.alloc(rows * cfg.d_inner())?;
    b.update(
        p,
        &zxbcdt,
        XSrc::InPlace,
        dec,
        &mut pool.ssm,
        inter_ssm,
        &mut y,
        None,
    )?;
    b.gate_out(p, &zxbcdt, &y, rows)
}

/// Where the decode update reads x, B and C: the conv's output `(rows, conv_dim)`, or in place
/// in zxbcdt `(rows, d_in_proj)` (convolved there).
enum XSrc<'a> {
    Conv(&'a GpuBuf),
    InPlace,
}

/// The rows that mma.wgsl's split makes f16 parts of: x itself, or (GATE) the gate and the
/// group RMSNorm of the scan's y with z of zxbcdt (gated_norm.wgsl's output, not stored).
enum MmaSrc<'a> {
    Plain(&'a GpuBuf),
    Gated {
        p: &'a Params<Wgpu>,
        zxbcdt: &'a GpuBuf,
        y: &'a GpuBuf,
    },
}

/// What a matrix-vector product fuses (see shaders/matvec.wgsl).
enum Fuse<'a> {
    None,
    /// in_proj of a decode pass: the conv update of the xBC columns.
    Conv {
        p: &'a Params<Wgpu>,
        dec: &'a Decode<Wgpu>,
        pool: &'a mut GpuBuf,
        inter: Option<&'a mut GpuBuf>,
    },
    /// out_proj of a decode pass: the group RMSNorm factors from partial sums of squares (`parts`
    /// per (row, group); 0 without the norm).
    Gated {
        part: &'a GpuBuf,
        ng: usize,
        parts: usize,
        gs: usize,
        eps: f32,
    },
}

fn u(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| err(format!("size {v} does not fit the shaders' 32-bit indices")))
}

/// The defines of every conv.wgsl pipeline: the conv width and conv_seq's rows per thread.
fn conv_defines(dc: usize) -> Result<[(&'static str, u32); 2]> {
    Ok([("DC", u(dc)?), ("RB", u(CONV_ROWS)?)])
}

/// Threads of `WG` per workgroup needed for `n` items.
fn groups_for(n: usize) -> Result<u32> {
    u(n.div_ceil(WG as usize))
}

fn dt_limits(cfg: &crate::config::MixerConfig) -> [u32; 4] {
    let (lo, hi) = cfg.dt_limit;
    [
        (lo > 0.0) as u32,
        hi.is_some() as u32,
        (lo as f32).to_bits(),
        (hi.unwrap_or(0.0) as f32).to_bits(),
    ]
}

impl Backend for Wgpu {
    type Buf = GpuBuf;
    type Idx = GpuBuf;
    type Weight = GpuWeight;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn upload(&self, data: &[f32]) -> Result<GpuBuf> {
        self.bytes_to_buf(bytemuck::cast_slice(data))
    }

    fn upload_idx(&self, data: &[i32]) -> Result<GpuBuf> {
        self.bytes_to_buf(bytemuck::cast_slice(data))
    }

    fn upload_weight(&self, w: &HostTensor) -> Result<GpuWeight> {
        let [n, k] = w.shape[..] else {
            return Err(err(format!(
                "a matmul weight must be 2-D, got shape {:?}",
                w.shape
            )));
        };
        // Rows are padded with zeros to whole 16-byte vectors (4 f32 or 8 16-bit values), so
        // that every row starts aligned for the vector loads of the matrix-vector kernel.
        // With tensor cores, 16-bit weights become f16 in mma.wgsl's layout (bf16 ones only if
        // they fit f16's range; below its normal range they move by at most 3e-8).
        let mma = self.coop
            && match &w.data {
                Data::F32(_) => false,
                Data::F16(_) => true,
                Data::Bf16(v) => v.iter().all(|x| x.to_f32().abs() <= f16::MAX.to_f32()),
            };
        let per_vec = match (&w.data, mma) {
            (Data::F32(_), _) => 4,
            (_, true) => MMA_K,
            _ => 8,
        };
        let padded = k.div_ceil(per_vec) * per_vec;
        let rows = if mma { n.next_multiple_of(MMA_COLS) } else { n };
        fn pad<T: Copy + Default>(v: &[T], rows: usize, k: usize, padded: usize) -> Vec<T> {
            let mut out = vec![T::default(); rows * padded];
            for (r, row) in v.chunks_exact(k.max(1)).enumerate() {
                out[r * padded..r * padded + row.len()].copy_from_slice(row);
            }
            out
        }
        let (bytes, kind): (Vec<u8>, WeightKind) = match &w.data {
            Data::F32(v) => (
                bytemuck::cast_slice(&pad(v, rows, k, padded)).to_vec(),
                WeightKind::F32,
            ),
            Data::F16(v) => (
                bytemuck::cast_slice(&pad(v, rows, k, padded)).to_vec(),
                WeightKind::F16,
            ),
            Data::Bf16(v) if mma => {
                let v: Vec<f16> = v.iter().map(|x| f16::from_f32(x.to_f32())).collect();
                (
                    bytemuck::cast_slice(&pad(&v, rows, k, padded)).to_vec(),
                    WeightKind::F16,
                )
            }
            Data::Bf16(v) => (
                bytemuck::cast_slice(&pad(v, rows, k, padded)).to_vec(),
                WeightKind::Bf16,
            ),
        };
        // Words (f32 values, or pairs of 16-bit values) per padded row.
        let row_words = if kind == WeightKind::F32 {
            padded
        } else {
            padded / 2
        };
        let buf = self.bytes_to_buf(&bytes).map_err(|e| {
            err(format!(
                "weight ({n}, {k}) of {} bytes: {e}; the adapter cannot bind it whole",
                bytes.len()
            ))
        })?;
        Ok(GpuWeight {
            buf,
            n,
            k,
            row_words,
            kind,
            mma,
        })
    }

    /// Times every dispatch (`per_kernel`), or every step as a whole, from its first dispatch to
    /// the readback that ends it, barriers and gaps included (entries named "step"). False where
    /// the adapter has no timestamps (per step: none inside passes).
    fn profile_start(&self, per_kernel: bool) -> Result<bool> {
        let need = if per_kernel {
            wgpu::Features::TIMESTAMP_QUERY
        } else {
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
        };
        if !self.device.features().contains(need) {
            return Ok(false);
        }
        let capacity = 4096;
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: capacity,
        });
        *self.profiler.borrow_mut() = Some(Profiler {
            set,
            capacity,
            entries: vec![],
            per_kernel,
            open: false,
        });
        self.profile.borrow_mut().clear();
        Ok(true)
    }

    fn profile_take(&self) -> Vec<(&'static str, f64)> {
        std::mem::take(&mut *self.profile.borrow_mut())
    }

    fn alloc(&self, len: usize) -> Result<GpuBuf> {
        self.buffer(len as u64 * 4)
    }

    fn zeros(&self, len: usize) -> Result<GpuBuf> {
        let buf = self.buffer(len as u64 * 4)?;
        self.with_encoder(|enc| enc.clear_buffer(buf.raw(), 0, None));
        Ok(buf)
    }

    fn read(
        &self,
        ranges: &[(&GpuBuf, usize, usize)],
    ) -> impl std::future::Future<Output = Result<Vec<Vec<f32>>>> {
        self.end_step_timing();
        let mut staged = vec![];
        for &(src, off, len) in ranges {
            if off + len > src.len {
                return futures_ready(Err(err(format!(
                    "read of {len} values at {off} from a buffer of {}",
                    src.len
                ))));
            }
            let size = (len as u64 * 4).max(4);
            let reused = self.stages.borrow_mut().get_mut(&size).and_then(Vec::pop);
            let stage = reused.unwrap_or_else(|| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            });
            if len > 0 {
                self.with_encoder(|enc| {
                    enc.copy_buffer_to_buffer(src.raw(), off as u64 * 4, &stage, 0, len as u64 * 4)
                });
            }
            staged.push((stage, len));
        }
        let timed = self.resolve_profile();
        self.flush();
        #[cfg(not(target_arch = "wasm32"))]
        let device = self.device.clone();
        let lost = self.lost.clone();
        let profile = self.profile.clone();
        let stages = self.stages.clone();
        let period = self.queue.get_timestamp_period() as f64;
        Box::pin(async move {
            let mut out = Vec::with_capacity(staged.len());
            for (stage, len) in staged {
                let mut words: Vec<f32> = map_read(
                    &stage,
                    #[cfg(not(target_arch = "wasm32"))]
                    &device,
                )
                .await?;
                words.truncate(len);
                out.push(words);
                // A few per size and few sizes: prefills of changing lengths would otherwise
                // pile them up.
                let mut stages = stages.borrow_mut();
                if stages.len() > 64 {
                    stages.clear();
                }
                let free = stages.entry(stage.size()).or_default();
                if free.len() < 4 {
                    free.push(stage);
                }
            }
            if let Some((stage, entries)) = timed {
                let ticks: Vec<u64> = map_read(
                    &stage,
                    #[cfg(not(target_arch = "wasm32"))]
                    &device,
                )
                .await?;
                let mut out = profile.borrow_mut();
                for (i, entry) in entries.into_iter().enumerate() {
                    let ns = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
                    out.push((entry, ns));
                }
            }
            if let Some(e) = lost.lock().ok().and_then(|mut l| l.take()) {
                return Err(err(format!("device error: {e}")));
            }
            Ok(out)
        }) as Readback
    }

    fn write(&self, dst: &mut GpuBuf, off: usize, data: &[f32]) -> Result<()> {
        if off + data.len() > dst.len {
            return Err(err(format!(
                "write of {} values at {off} into a buffer of {}",
                data.len(),
                dst.len
            )));
        }
        if !data.is_empty() {
            self.flush();
            self.queue
                .write_buffer(dst.raw(), off as u64 * 4, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    fn copy(
        &self,
        src: &GpuBuf,
        src_off: usize,
        dst: &mut GpuBuf,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        if src_off + len > src.len || dst_off + len > dst.len {
            return Err(err("copy out of bounds"));
        }
        if len > 0 {
            self.with_encoder(|enc| {
                enc.copy_buffer_to_buffer(
                    src.raw(),
                    src_off as u64 * 4,
                    dst.raw(),
                    dst_off as u64 * 4,
                    len as u64 * 4,
                )
            });
        }
        Ok(())
    }

    fn matmul(
        &self,
        x: &GpuBuf,
        w: &GpuWeight,
        bias: Option<&GpuBuf>,
        rows: usize,
        out: &mut GpuBuf,
    ) -> Result<()> {
        if x.len < rows * w.k || out.len < rows * w.n {
            return Err(err("matmul: buffers too small"));
        }
        // Few rows read the weight once with a reduction per column; more rows share tiles.
        if rows <= MATVEC_ROWS && w.k.is_multiple_of(4) {
            return self.matvec(x, w, bias, rows, out, Fuse::None);
        }
        if w.mma {
            return self.mma(MmaSrc::Plain(x), w, bias, rows, out);
        }
        if let Some(parts) = self.tiled_run(x, w, bias, rows, Some(&mut *out))? {
            self.sum_splits(&parts, w, bias, rows, out)?;
        }
        Ok(())
    }

    fn conv(
        &self,
        p: &Params<Self>,
        zxbcdt: &GpuBuf,
        pack: &Pack<Self>,
        pool: &mut GpuBuf,
        snaps: Option<&mut GpuBuf>,
        xbc: &mut GpuBuf,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (cd, dc) = (cfg.conv_dim(), cfg.d_conv);
        debug_assert!(dc <= MAX_D_CONV);
        let rows = pack.rows();
        let params = |count: usize| -> Result<[u32; 12]> {
            Ok([
                u(rows)?,
                u(cd)?,
                u(cfg.d_in_proj())?,
                u(cfg.d_inner())?,
                u(pack.seqs())?,
                p.conv_bias.is_some() as u32,
                u(count)?,
                u(pack.snaps.len())?,
                0,
                0,
                0,
                0,
            ])
        };
        let saved = snaps.map_or(self.dummy_rw.raw(), |b| b.raw());
        let binds = [
            (1, zxbcdt.raw()),
            (2, p.conv_weight.raw()),
            (3, self.opt(p.conv_bias.as_ref())),
            (4, pack.dev_cu.raw()),
            (5, pack.dev_slots.raw()),
            (6, pool.raw()),
            (7, xbc.raw()),
            (8, pack.dev_snaps.raw()),
            (9, saved),
        ];
        // conv_seq's threads: blocks of CONV_ROWS rows by channels.
        let n = rows.div_ceil(CONV_ROWS) * cd;
        self.dispatch(
            shader::CONV,
            "conv_seq",
            &conv_defines(dc)?,
            &params(n)?,
            &pick(&binds, &[1, 2, 3, 4, 5, 6, 7]),
            groups_for(n)?,
        )?;
        if !pack.snaps.is_empty() && !std::ptr::eq(saved, self.dummy_rw.raw()) {
            let n = pack.snaps.len() * cd;
            self.dispatch(
                shader::CONV,
                "conv_snap",
                &conv_defines(dc)?,
                &params(n)?,
                &pick(&binds, &[1, 4, 5, 6, 8, 9]),
                groups_for(n)?,
            )?;
        }
        let n = pack.seqs() * cd;
        self.dispatch(
            shader::CONV,
            "conv_final",
            &conv_defines(dc)?,
            &params(n)?,
            &pick(&binds, &[1, 4, 5, 6]),
            groups_for(n)?,
        )
    }

    fn conv_update(
        &self,
        p: &Params<Self>,
        zxbcdt: &GpuBuf,
        dec: &Decode<Self>,
        pool: &mut GpuBuf,
        inter: Option<&mut GpuBuf>,
        xbc: &mut GpuBuf,
    ) -> Result<()> {
        self.conv_step(p, InProj::Out(zxbcdt), dec, pool, inter, xbc)
    }

    fn ssd_scan(
        &self,
        p: &Params<Self>,
        zxbcdt: &GpuBuf,
        xbc: &GpuBuf,
        pack: &Pack<Self>,
        pool: &mut GpuBuf,
        snaps: Option<&mut GpuBuf>,
        y: &mut GpuBuf,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let (nh, hd, ds, ng) = (cfg.nheads(), cfg.headdim, cfg.d_state, cfg.ngroups);
        let (rows, chunks, q) = (pack.rows(), pack.chunks(), cfg.chunk_size);
        if rows == 0 {
            // Nothing to scan: every sequence is empty and keeps its state.
            return Ok(());
        }
        let dt = self.buffer((rows * nh * 4) as u64)?;
        let cum = self.buffer((rows * nh * 4) as u64)?;
        let decay = self.buffer(((rows + chunks) * nh * 4) as u64)?;
        let cb = self.buffer((chunks * ng * q * q * 4) as u64)?;
        let states = self.buffer((chunks * nh * hd * ds * 4) as u64)?;
        let lim = dt_limits(cfg);
        // Workgroups of the C B^T dispatch that compute dt first.
        let dt_groups = chunks * nh.div_ceil(SSD_THREADS / SSD_DT_SEGS);
        let params = |count: usize| -> Result<[u32; 20]> {
            Ok([
                u(rows)?,
                u(nh)?,
                u(hd)?,
                u(ds)?,
                u(ng)?,
                u(cfg.conv_dim())?,
                u(cfg.d_in_proj())?,
                u(cfg.d_inner() + cfg.conv_dim())?,
                u(q)?,
                u(chunks)?,
                u(pack.seqs())?,
                u(count)?,
                u(pack.snaps.len())?,
                cfg.d_has_hdim as u32,
                lim[0],
                lim[1],
                lim[2],
                lim[3],
                u(dt_groups)?,
                0,
            ])
        };
        let saved = snaps.map_or(self.dummy_rw.raw(), |b| b.raw());
        let all: [(u32, &wgpu::Buffer); 15] = [
            (1, zxbcdt.raw()),
            (2, xbc.raw()),
            (3, p.heads.raw()),
            (4, decay.raw()),
            (7, pack.dev_slots.raw()),
            (8, pack.dev_seq_chunks.raw()),
            (9, pack.dev_chunk_rows.raw()),
            (10, pack.dev_snaps.raw()),
            (11, dt.raw()),
            (12, cum.raw()),
            (13, cb.raw()),
            (14, states.raw()),
            (15, pool.raw()),
            (16, saved),
            (17, y.raw()),
        ];
        // Workgroups of ssd_mm: `extra` (dt) before the n tiles, which the kernel is told.
        let groups = |defines: &[(&str, u32)], extra: usize, n: usize, keep: &[u32]| {
            self.dispatch(
                shader::SSD,
                "ssd_mm",
                defines,
                &params(n)?,
                &pick(&all, keep),
                u(extra + n)?,
            )
        };
        let th = u(SSD_THREADS)?;
        let ti = |n: usize| n.div_ceil(SSD_THREADS / 2);
        let tj = |n: usize| n.div_ceil(SSD_TJ);
        // Whole vectors of four along the states' and the output's rows.
        let v4 = (hd % 4 == 0 && ds % 4 == 0) as u32;
        groups(
            &[
                ("MODE_CB", 1),
                ("THREADS", th),
                ("DT_SEGS", u(SSD_DT_SEGS)?),
            ],
            dt_groups,
            chunks * ng * ti(q) * tj(q),
            &[1, 2, 3, 4, 9, 11, 12, 13],
        )?;
        groups(
            &[("MODE_STATES", 1), ("THREADS", th), ("V4", v4)],
            0,
            chunks * ng * ti(nh / ng * hd) * tj(ds),
            &[2, 4, 9, 14],
        )?;
        // ssd_pass: a thread per state value, or per vector of four with V4.
        let n = pack.seqs() * nh * hd * ds / if v4 == 1 { 4 } else { 1 };
        self.dispatch(
            shader::SSD,
            "ssd_pass",
            &[("V4", v4)],
            &params(n)?,
            &pick(&all, &[4, 7, 8, 10, 14, 15, 16]),
            groups_for(n)?,
        )?;
        groups(
            &[("MODE_OUT", 1), ("THREADS", th), ("V4", v4)],
            0,
            chunks * nh * ti(q) * tj(hd),
            &[2, 3, 9, 11, 12, 13, 14, 17],
        )
    }

    fn state_update(
        &self,
        p: &Params<Self>,
        zxbcdt: &GpuBuf,
        xbc: &GpuBuf,
        dec: &Decode<Self>,
        pool: &mut GpuBuf,
        inter: Option<&mut GpuBuf>,
        y: &mut GpuBuf,
    ) -> Result<()> {
        self.update(p, zxbcdt, XSrc::Conv(xbc), dec, pool, inter, y, None)
    }

    /// Three dispatches where the shapes allow: in_proj with the conv update in its epilogue,
    /// the state update with the gate (and the norm's sums of squares), out_proj with the norm.
    fn decode(
        &self,
        p: &Params<Self>,
        hidden: &GpuBuf,
        dec: &Decode<Self>,
        pool: &mut States<Self>,
        inter: Option<&mut States<Self>>,
    ) -> Result<GpuBuf> {
        let cfg = &p.cfg;
        let rows = dec.rows();
        let per_vec = if p.out_proj.kind == WeightKind::F32 {
            4
        } else {
            8
        };
        let gs = cfg.d_inner() / cfg.ngroups;
        let fusable = (1..=MATVEC_ROWS).contains(&rows)
            && p.in_proj_bias.is_none()
            && p.in_proj.k.is_multiple_of(4)
            && gs.is_multiple_of(per_vec)
            && rows * cfg.ngroups <= MAX_NORM_FACTORS;
        if !fusable {
            if rows > MATVEC_ROWS {
                return decode_rows(self, p, hidden, dec, pool, inter);
            }
            return decode_ops(self, p, hidden, dec, pool, inter);
        }
        let (inter_conv, inter_ssm) = split(inter);
        let mut zxbcdt = self.alloc(rows * cfg.d_in_proj())?;
        let fuse = Fuse::Conv {
            p,
            dec,
            pool: &mut pool.conv,
            inter: inter_conv,
        };
        self.matvec(hidden, &p.in_proj, None, rows, &mut zxbcdt, fuse)?;
        let mut u = self.alloc(rows * cfg.d_inner())?;
        let rpw = rows_per_warp(dec.requests(), cfg.nheads(), cfg.headdim);
        let blocks = cfg.headdim.div_ceil(update_warps(true) * rpw);
        let mut part = self.alloc(rows * cfg.nheads() * blocks)?;
        self.update(
            p,
            &zxbcdt,
            XSrc::InPlace,
            dec,
            &mut pool.ssm,
            inter_ssm,
            &mut u,
            Some(&mut part),
        )?;
        let mut out = self.alloc(rows * cfg.d_model)?;
        let parts = if p.norm_weight.is_some() {
            cfg.nheads() / cfg.ngroups * blocks
        } else {
            0
        };
        let fuse = Fuse::Gated {
            part: &part,
            ng: cfg.ngroups,
            parts,
            gs,
            eps: cfg.norm_eps as f32,
        };
        self.matvec(
            &u,
            &p.out_proj,
            p.out_proj_bias.as_ref(),
            rows,
            &mut out,
            fuse,
        )?;
        Ok(out)
    }

    /// On tensor cores, the gate and the norm are computed by the split of out_proj's rows.
    fn gate_out(
        &self,
        p: &Params<Self>,
        zxbcdt: &GpuBuf,
        y: &GpuBuf,
        rows: usize,
    ) -> Result<GpuBuf> {
        let w = &p.out_proj;
        // mma_split keeps the group factors in 256 slots of workgroup memory.
        if !w.mma || rows <= MATVEC_ROWS || p.cfg.ngroups > 256 {
            return gate_out_ops(self, p, zxbcdt, y, rows);
        }
        let mut out = self.alloc(rows * p.cfg.d_model)?;
        let src = MmaSrc::Gated { p, zxbcdt, y };
        self.mma(src, w, p.out_proj_bias.as_ref(), rows, &mut out)?;
        Ok(out)
    }

    fn gated_norm(
        &self,
        p: &Params<Self>,
        zxbcdt: &GpuBuf,
        y: &GpuBuf,
        rows: usize,
        out: &mut GpuBuf,
    ) -> Result<()> {
        let cfg = &p.cfg;
        let groups = rows * cfg.ngroups;
        let params = [
            u(cfg.d_inner())?,
            u(cfg.d_in_proj())?,
            u(cfg.ngroups)?,
            cfg.norm_before_gate as u32,
            p.norm_weight.is_some() as u32,
            (cfg.norm_eps as f32).to_bits(),
            u(groups)?,
            0,
        ];
        self.dispatch(
            shader::GATED_NORM,
            "gated_norm",
            &[("SUBGROUPS", self.subgroups as u32)],
            &params,
            &[
                (1, zxbcdt.raw()),
                (2, y.raw()),
                (3, self.opt(p.norm_weight.as_ref())),
                (4, out.raw()),
            ],
            u(groups)?,
        )
    }
}

/// Maps a readback buffer and copies its contents out. Natively this waits for the GPU; in a
/// browser the map resolves from the event loop.
async fn map_read<T: bytemuck::Pod>(
    stage: &wgpu::Buffer,
    #[cfg(not(target_arch = "wasm32"))] device: &wgpu::Device,
) -> Result<Vec<T>> {
    let (tx, rx) = futures_channel::oneshot::channel();
    stage.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    #[cfg(not(target_arch = "wasm32"))]
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| err(format!("device poll failed: {e}")))?;
    rx.await
        .map_err(|_| err("the readback was dropped"))?
        .map_err(|e| err(format!("readback failed: {e}")))?;
    let view = stage
        .slice(..)
        .get_mapped_range()
        .map_err(|e| err(format!("readback failed: {e}")))?;
    let out = bytemuck::pod_collect_to_vec(&view);
    drop(view);
    stage.unmap();
    Ok(out)
}

/// The bindings of `all` that an entry point uses (auto layouts hold only those).
fn pick<'a>(all: &[(u32, &'a wgpu::Buffer)], keep: &[u32]) -> Vec<(u32, &'a wgpu::Buffer)> {
    all.iter()
        .filter(|(b, _)| keep.contains(b))
        .copied()
        .collect()
}

/// The future of a readback.
type Readback = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Vec<f32>>>>>>;

fn futures_ready(r: Result<Vec<Vec<f32>>>) -> Readback {
    Box::pin(std::future::ready(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MixerConfig;
    use crate::model::Mixer;
    use crate::weights::Weights;

    /// A deterministic spread of values in [-1, 1).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect()
    }

    /// mma.wgsl's split (which needs no tensor cores: it runs on lavapipe) against a float64
    /// reference: hi + lo over the row scale gives each value to 2^-20 of its row's largest,
    /// plain rows of mixed magnitudes and the gate and norm of every kind; zeros in the padding.
    #[test]
    fn the_split_into_f16_parts_keeps_f32_accuracy() {
        let b = pollster::block_on(Wgpu::new(WgpuOptions::default()))
            .expect("this test needs a GPU adapter (tools/test.sh installs Mesa's lavapipe)");
        let rows = 5;
        // d_inner 144: rows padded from 144 values to 160; 1200 (to 1216): values of a row in
        // groups of 1200 and 600 as well as 240 and 48.
        let cases = [
            (72, 1, false, true),
            (72, 4, true, true),
            (72, 2, false, false),
            (600, 2, true, true),
            (600, 1, false, true),
            (600, 5, true, false),
        ];
        for (d_model, ng, before, norm) in cases {
            let mut cfg = MixerConfig::new(d_model);
            cfg.headdim = if d_model == 72 { 18 } else { 24 };
            cfg.ngroups = ng;
            cfg.norm_before_gate = before;
            cfg.rmsnorm = norm;
            cfg.validate().unwrap();
            let mut m = Mixer::new(b.clone(), &cfg, &Weights::init(&cfg, 1).unwrap()).unwrap();
            let (di, dip) = (cfg.d_inner(), cfg.d_in_proj());
            let nw: Vec<f32> = values(di, 3).iter().map(|v| 1.0 + v).collect();
            if let Some(w) = m.params.norm_weight.as_mut() {
                b.write(w, 0, &nw).unwrap();
            }
            // Rows of magnitudes 1e-3 .. 1e3.
            let y: Vec<f32> = values(rows * di, 1)
                .iter()
                .enumerate()
                .map(|(i, v)| v * 10f32.powi((i / di) as i32 * 3 / 2 - 3))
                .collect();
            let z = values(rows * dip, 2);
            let (yb, zb) = (b.upload(&y).unwrap(), b.upload(&z).unwrap());
            let silu = |v: f64| v / (1.0 + (-v).exp());
            let gs = di / ng;
            let mut gated = vec![0f64; rows * di];
            for r in 0..rows {
                for g in 0..ng {
                    let at = |i: usize| (r * di + g * gs + i, r * dip + g * gs + i);
                    let seen = |i: usize| {
                        let (yi, zi) = at(i);
                        let v = y[yi] as f64;
                        if before && norm {
                            v
                        } else {
                            v * silu(z[zi] as f64)
                        }
                    };
                    let ms = (0..gs).map(|i| seen(i).powi(2)).sum::<f64>() / gs as f64;
                    let inv = 1.0 / (ms + cfg.norm_eps).sqrt();
                    for i in 0..gs {
                        let (yi, zi) = at(i);
                        gated[yi] = match (norm, before) {
                            (false, _) => seen(i),
                            (true, false) => seen(i) * inv * nw[g * gs + i] as f64,
                            (true, true) => {
                                seen(i) * inv * nw[g * gs + i] as f64 * silu(z[zi] as f64)
                            }
                        };
                    }
                }
            }
            let plain = y.iter().map(|&v| v as f64).collect();
            let src = [
                (
                    MmaSrc::Gated {
                        p: &m.params,
                        zxbcdt: &zb,
                        y: &yb,
                    },
                    gated,
                ),
                (MmaSrc::Plain(&yb), plain),
            ];
            for (i, (src, want)) in src.into_iter().enumerate() {
                let kp = di.next_multiple_of(32);
                let (parts, scale) = b.mma_split(src, di, kp, rows).unwrap();
                let padded = rows.next_multiple_of(MMA_ROWS);
                let got =
                    pollster::block_on(b.read(&[(&parts, 0, padded * kp), (&scale, 0, padded)]))
                        .unwrap();
                let half = |word: usize, c: usize| {
                    let bits = got[0][word].to_bits() >> (16 * (c % 2));
                    f16::from_bits(bits as u16).to_f64()
                };
                for r in 0..padded {
                    let peak = (0..di)
                        .filter(|_| r < rows)
                        .map(|c| want[r * di + c].abs())
                        .fold(0.0, f64::max);
                    for c in 0..kp {
                        // Blocks of one row tile by MMA_K values: its hi rows, then its lo rows.
                        let block = r / MMA_ROWS * (kp / MMA_K) + c / MMA_K;
                        let hi = (block * 2 * MMA_ROWS + r % MMA_ROWS) * MMA_K / 2 + c % MMA_K / 2;
                        let lo = hi + MMA_ROWS * MMA_K / 2;
                        let v = (half(hi, c) + half(lo, c)) / got[1][r] as f64;
                        let w = if r < rows && c < di {
                            want[r * di + c]
                        } else {
                            0.0
                        };
                        let label = format!(
                            "d_model {d_model} ng {ng} before {before} norm {norm} src {i}"
                        );
                        assert!(
                            (v - w).abs() <= peak * 2f64.powi(-20),
                            "{label}: row {r} column {c}: {v} against {w} (row peak {peak})"
                        );
                    }
                }
            }
        }
    }
}
