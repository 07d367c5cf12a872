//! What the Vulkan driver reports about one of our kernels once compiled (registers, local memory,
//! instruction counts: whatever VK_KHR_pipeline_executable_properties gives on the device), for
//! kernels whose speed depends on code generation that timings alone can't show. On NVIDIA's
//! driver, `tools/nv_sass.py` disassembles the pipeline this builds (tools/README.md).
//!
//! ```sh
//! cargo run --release --example pipeline_stats -- mma mma COOP=1 F8=0 SG=32 DIRECT=1
//! cargo run --release --example pipeline_stats -- ssd ssd_mm MODE_OUT=1 THREADS=128 --ir /tmp/ir
//! ```
//!
//! Arguments: the shader file, the entry point, its defines (NAME=VALUE, as the backend passes
//! them), and `--ir DIR` to also write the driver's internal representations. The WGSL is
//! expanded as the backend expands it and translated by naga without runtime checks, as the
//! backend's trusted kernels are; the pipeline is built on the first Vulkan device that has the
//! extension (else on the first device, with nothing to report: lavapipe), with every feature
//! that device offers.

// Vulkan only: a browser build has nothing to inspect.
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> Result<(), vulkan::Failure> {
    vulkan::run()
}

#[cfg(not(target_arch = "wasm32"))]
mod vulkan {
    use ash::{khr, vk};
    use std::ffi::CStr;
    use wgpu::naga;

    pub type Failure = Box<dyn std::error::Error>;

    pub fn run() -> Result<(), Failure> {
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        let ir = match args.iter().position(|a| a == "--ir") {
            Some(i) if i + 1 < args.len() => {
                let dir = args.remove(i + 1);
                args.remove(i);
                Some(dir)
            }
            Some(_) => return Err("--ir needs a directory".into()),
            None => None,
        };
        let [file, entry, defs @ ..] = args.as_slice() else {
            return Err("usage: pipeline_stats SHADER ENTRY [NAME=VALUE ...] [--ir DIR]".into());
        };
        let mut defines = vec![];
        for d in defs {
            let (name, value) = d
                .split_once('=')
                .ok_or(format!("define {d:?} is not NAME=VALUE"))?;
            defines.push((name, value.parse::<u32>()?));
        }
        let source = mamba_mixer::backend::wgpu::shader_source(file, &defines)
            .ok_or(format!("no shader named {file:?}"))?;
        let (words, bindings) = spirv(&source, entry)?;
        // SAFETY: plain Vulkan calls on objects created here, destroyed before returning.
        unsafe { report(&words, &bindings, entry, ir.as_deref()) }
    }

    /// Group 0's bindings: (binding, is a uniform buffer).
    type Bindings = Vec<(u32, bool)>;

    /// SPIR-V of `entry` and its module's bindings.
    fn spirv(source: &str, entry: &str) -> Result<(Vec<u32>, Bindings), Failure> {
        let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;
        if !module.entry_points.iter().any(|e| e.name == entry) {
            return Err(format!("no entry point {entry:?} under these defines").into());
        }
        let unchecked = naga::proc::BoundsCheckPolicy::Unchecked;
        let options = naga::back::spv::Options {
            lang_version: (1, 6),
            bounds_check_policies: naga::proc::BoundsCheckPolicies {
                index: unchecked,
                buffer: unchecked,
                image_load: unchecked,
                binding_array: unchecked,
            },
            zero_initialize_workgroup_memory:
                naga::back::spv::ZeroInitializeWorkgroupMemoryMode::None,
            force_loop_bounding: false,
            ..Default::default()
        };
        let pipeline = naga::back::spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: entry.to_string(),
        };
        let words = naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))?;
        let bindings = module
            .global_variables
            .iter()
            .filter_map(|(_, g)| {
                let b = g.binding.as_ref()?;
                let uniform = matches!(g.space, naga::AddressSpace::Uniform);
                (b.group == 0).then_some((b.binding, uniform))
            })
            .collect();
        Ok((words, bindings))
    }

    fn text(chars: &[std::ffi::c_char]) -> String {
        // SAFETY: the driver fills these arrays with NUL-terminated strings.
        unsafe { CStr::from_ptr(chars.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    unsafe fn report(
        words: &[u32],
        bindings: &[(u32, bool)],
        entry: &str,
        ir: Option<&str>,
    ) -> Result<(), Failure> {
        let loader = ash::Entry::load()?;
        let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_3);
        let instance = loader.create_instance(
            &vk::InstanceCreateInfo::default().application_info(&app),
            None,
        )?;
        let has = |pd: vk::PhysicalDevice, ext: &CStr| {
            instance
                .enumerate_device_extension_properties(pd)
                .unwrap_or_default()
                .iter()
                .any(|e| e.extension_name_as_c_str() == Ok(ext))
        };
        // The first device with the extension, else the first device: the kernel is still built
        // (its SPIR-V checked by the driver), with nothing to report.
        let devices = instance.enumerate_physical_devices()?;
        let pd = devices
            .iter()
            .copied()
            .find(|&pd| has(pd, khr::pipeline_executable_properties::NAME))
            .or(devices.first().copied())
            .ok_or("no Vulkan device")?;
        let props = instance.get_physical_device_properties(pd);
        println!("device: {}", text(&props.device_name));
        let stats_ext = has(pd, khr::pipeline_executable_properties::NAME);
        let mut exts = vec![];
        if stats_ext {
            exts.push(khr::pipeline_executable_properties::NAME.as_ptr());
        }
        let coop = has(pd, khr::cooperative_matrix::NAME);
        if coop {
            exts.push(khr::cooperative_matrix::NAME.as_ptr());
        }
        // Every feature the device has, so that any of our kernels builds.
        let mut v11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut v13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut stats = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
        let mut cm = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
        let mut features = vk::PhysicalDeviceFeatures2::default()
            .push_next(&mut v11)
            .push_next(&mut v12)
            .push_next(&mut v13);
        if stats_ext {
            features = features.push_next(&mut stats);
        }
        if coop {
            features = features.push_next(&mut cm);
        }
        instance.get_physical_device_features2(pd, &mut features);
        let family = instance
            .get_physical_device_queue_family_properties(pd)
            .iter()
            .position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or("no compute queue")? as u32;
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&[1.0])];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&exts)
            .push_next(&mut features);
        let device = instance.create_device(pd, &info, None)?;
        let report = stats_ext.then_some(ir);
        let result = build_and_report(&instance, &device, words, bindings, entry, report);
        device.destroy_device(None);
        instance.destroy_instance(None);
        result
    }

    unsafe fn build_and_report(
        instance: &ash::Instance,
        device: &ash::Device,
        words: &[u32],
        bindings: &[(u32, bool)],
        entry: &str,
        report: Option<Option<&str>>,
    ) -> Result<(), Failure> {
        let layout_bindings: Vec<_> = bindings
            .iter()
            .map(|&(binding, uniform)| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(binding)
                    .descriptor_type(if uniform {
                        vk::DescriptorType::UNIFORM_BUFFER
                    } else {
                        vk::DescriptorType::STORAGE_BUFFER
                    })
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        let set = device.create_descriptor_set_layout(
            &vk::DescriptorSetLayoutCreateInfo::default().bindings(&layout_bindings),
            None,
        )?;
        let sets = [set];
        let layout = device.create_pipeline_layout(
            &vk::PipelineLayoutCreateInfo::default().set_layouts(&sets),
            None,
        )?;
        let shader = device
            .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(words), None)?;
        let name = std::ffi::CString::new(entry)?;
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(shader)
            .name(&name);
        let flags = if report.is_some() {
            vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR
                | vk::PipelineCreateFlags::CAPTURE_INTERNAL_REPRESENTATIONS_KHR
        } else {
            vk::PipelineCreateFlags::empty()
        };
        let create = vk::ComputePipelineCreateInfo::default()
            .stage(stage)
            .layout(layout)
            .flags(flags);
        let pipeline = device
            .create_compute_pipelines(vk::PipelineCache::null(), &[create], None)
            .map_err(|(_, e)| e)?[0];
        let result = match report {
            Some(ir) => print_executables(instance, device, pipeline, ir),
            None => {
                println!(
                    "built; the device has no VK_KHR_pipeline_executable_properties to report"
                );
                Ok(())
            }
        };
        device.destroy_pipeline(pipeline, None);
        device.destroy_shader_module(shader, None);
        device.destroy_pipeline_layout(layout, None);
        device.destroy_descriptor_set_layout(set, None);
        result
    }

    unsafe fn print_executables(
        instance: &ash::Instance,
        device: &ash::Device,
        pipeline: vk::Pipeline,
        ir: Option<&str>,
    ) -> Result<(), Failure> {
        let ext = khr::pipeline_executable_properties::Device::new(instance, device);
        let executables = ext.get_pipeline_executable_properties(
            &vk::PipelineInfoKHR::default().pipeline(pipeline),
        )?;
        for (i, e) in executables.iter().enumerate() {
            println!(
                "executable {i}: {} ({}), subgroup size {}",
                text(&e.name),
                text(&e.description),
                e.subgroup_size
            );
            let which = vk::PipelineExecutableInfoKHR::default()
                .pipeline(pipeline)
                .executable_index(i as u32);
            for s in ext.get_pipeline_executable_statistics(&which)? {
                let value = match s.format {
                    vk::PipelineExecutableStatisticFormatKHR::BOOL32 => {
                        (s.value.b32 != 0).to_string()
                    }
                    vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64.to_string(),
                    vk::PipelineExecutableStatisticFormatKHR::UINT64 => s.value.u64.to_string(),
                    _ => s.value.f64.to_string(),
                };
                println!("  {}: {value}  ({})", text(&s.name), text(&s.description));
            }
            if let Some(dir) = ir {
                write_representations(&ext, &which, dir, i)?;
            }
        }
        Ok(())
    }

    /// The driver's internal representations of one executable, a file each (the usual two calls:
    /// sizes, then the data).
    unsafe fn write_representations(
        ext: &khr::pipeline_executable_properties::Device,
        which: &vk::PipelineExecutableInfoKHR,
        dir: &str,
        index: usize,
    ) -> Result<(), Failure> {
        let mut reps = ext.get_pipeline_executable_internal_representations(which)?;
        let mut data: Vec<Vec<u8>> = reps.iter().map(|r| vec![0u8; r.data_size]).collect();
        for (r, d) in reps.iter_mut().zip(data.iter_mut()) {
            r.p_data = d.as_mut_ptr().cast();
        }
        let mut count = reps.len() as u32;
        (ext.fp()
            .get_pipeline_executable_internal_representations_khr)(
            ext.device(),
            which,
            &mut count,
            reps.as_mut_ptr(),
        )
        .result()?;
        std::fs::create_dir_all(dir)?;
        for (r, d) in reps.iter().zip(&data) {
            let file = format!(
                "{dir}/{index}-{}.txt",
                text(&r.name).replace(['/', ' '], "_")
            );
            let len = if r.is_text != 0 {
                d.iter().position(|&b| b == 0).unwrap_or(d.len())
            } else {
                d.len()
            };
            std::fs::write(&file, &d[..len])?;
            println!("  wrote {file} ({})", text(&r.description));
        }
        Ok(())
    }
}
