//! The compute pipelines of a layer, each with its explicit bind group layout, built once
//! when the layer is created.

use crate::config::MoeConfig;
use crate::gpu::shaders::{self, ShaderSource};

/// How a kernel's binding is declared in WGSL.
#[derive(Clone, Copy, Debug)]
pub enum Binding {
    Uniform,
    Storage,
    StorageReadOnly,
}

/// One compute pipeline and the layout of its only bind group (group 0).
#[derive(Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub layout: wgpu::BindGroupLayout,
    pub pipeline: wgpu::ComputePipeline,
}

impl Kernel {
    /// Builds the pipeline of `shader`'s `main` with `bindings` in binding order and the
    /// given pipeline-overridable constants.
    pub fn new(
        device: &wgpu::Device,
        shader: ShaderSource,
        bindings: &[Binding],
        constants: &[(&str, f64)],
    ) -> Self {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .enumerate()
            .map(|(index, binding)| wgpu::BindGroupLayoutEntry {
                binding: index as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match binding {
                    Binding::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    Binding::Storage | Binding::StorageReadOnly => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: matches!(binding, Binding::StorageReadOnly),
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(shader.name),
            entries: &entries,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.name),
            source: wgpu::ShaderSource::Wgsl(shader.source.into()),
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(shader.name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(shader.name),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                // Every kernel writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        Kernel {
            name: shader.name,
            layout,
            pipeline,
        }
    }

    /// A bind group binding `buffers` whole, in binding order.
    pub fn bind(&self, device: &wgpu::Device, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(index, buffer)| wgpu::BindGroupEntry {
                binding: index as u32,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(self.name),
            layout: &self.layout,
            entries: &entries,
        })
    }
}

/// Every pipeline of a layer.
#[derive(Debug)]
pub struct Kernels {
    pub route_tokens: Kernel,
    pub count_experts: Kernel,
    pub scan_expert_offsets: Kernel,
    pub reduce_router_stats: Kernel,
    pub scatter_assignments: Kernel,
    pub expert_up: Kernel,
    pub expert_down: Kernel,
    pub combine_outputs: Kernel,
}

impl Kernels {
    pub fn new(device: &wgpu::Device, config: &MoeConfig) -> Self {
        use Binding::{Storage as Rw, StorageReadOnly as Ro, Uniform as U};
        let expert_up_constants = [
            ("ACTIVATION", config.activation.shader_code() as f64),
            ("GATED", if config.gated { 1.0 } else { 0.0 }),
        ];
        Kernels {
            route_tokens: Kernel::new(
                device,
                shaders::ROUTE_TOKENS,
                &[U, Ro, Ro, Rw, Rw, Rw, Rw, Rw, Rw],
                &[],
            ),
            count_experts: Kernel::new(device, shaders::COUNT_EXPERTS, &[U, Ro, Rw], &[]),
            scan_expert_offsets: Kernel::new(
                device,
                shaders::SCAN_EXPERT_OFFSETS,
                &[U, Ro, Rw, Rw, Rw, Rw, Ro],
                &[],
            ),
            reduce_router_stats: Kernel::new(
                device,
                shaders::REDUCE_ROUTER_STATS,
                &[U, Ro, Ro, Rw],
                &[],
            ),
            scatter_assignments: Kernel::new(
                device,
                shaders::SCATTER_ASSIGNMENTS,
                &[U, Ro, Ro, Ro, Ro, Rw, Rw],
                &[],
            ),
            expert_up: Kernel::new(
                device,
                shaders::EXPERT_UP,
                &[U, Ro, Ro, Ro, Ro, Ro, Ro, Rw],
                &expert_up_constants,
            ),
            expert_down: Kernel::new(device, shaders::EXPERT_DOWN, &[U, Ro, Ro, Ro, Ro, Rw], &[]),
            combine_outputs: Kernel::new(
                device,
                shaders::COMBINE_OUTPUTS,
                &[U, Ro, Ro, Ro, Ro, Ro, Rw],
                &[],
            ),
        }
    }
}
