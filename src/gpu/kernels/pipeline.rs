//! Compute pipelines and their explicit bind group layouts: how a kernel's bindings are
//! declared, the pipeline of one shader's `main` with its overrides, and bind groups in
//! binding order.

use crate::gpu::kernels::shaders::ShaderSource;

/// How a kernel's binding is declared in WGSL.
#[derive(Clone, Copy, Debug)]
pub enum Binding {
    Uniform,
    Storage,
    StorageReadOnly,
    /// `texture_2d<f32>` read with `textureLoad` (the router weights).
    Texture,
    /// `texture_2d_array<f32>` read with `textureLoad` (x's rows).
    TextureArray,
    /// `texture_2d_array<u32>` read with `textureLoad` (the expert weights' planes).
    UintTextureArray,
    /// `texture_storage_2d_array<rgba32float, write>` (x's rows, written by stage_tokens).
    StorageTextureArray,
    /// `texture_storage_2d_array<rgba32uint, write>` (an f32 expert tensor's plane, written
    /// by refresh_expert_weights).
    UintStorageTextureArray,
    /// `texture_storage_2d<rgba32float, write>` (the router, written by
    /// refresh_router_weights).
    StorageTexture,
}

fn buffer_binding(ty: wgpu::BufferBindingType) -> wgpu::BindingType {
    wgpu::BindingType::Buffer {
        ty,
        has_dynamic_offset: false,
        min_binding_size: None,
    }
}

/// A float texture read with `textureLoad` (no sampler, so not filterable).
fn texture_binding(view_dimension: wgpu::TextureViewDimension) -> wgpu::BindingType {
    wgpu::BindingType::Texture {
        sample_type: wgpu::TextureSampleType::Float { filterable: false },
        view_dimension,
        multisampled: false,
    }
}

pub(crate) fn bind_group_layout(
    device: &wgpu::Device,
    label: &str,
    bindings: &[Binding],
) -> wgpu::BindGroupLayout {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
        .iter()
        .enumerate()
        .map(|(index, binding)| wgpu::BindGroupLayoutEntry {
            binding: index as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: match binding {
                Binding::Uniform => buffer_binding(wgpu::BufferBindingType::Uniform),
                Binding::Storage => {
                    buffer_binding(wgpu::BufferBindingType::Storage { read_only: false })
                }
                Binding::StorageReadOnly => {
                    buffer_binding(wgpu::BufferBindingType::Storage { read_only: true })
                }
                Binding::Texture => texture_binding(wgpu::TextureViewDimension::D2),
                Binding::TextureArray => texture_binding(wgpu::TextureViewDimension::D2Array),
                Binding::UintTextureArray => wgpu::BindingType::Texture {
                    sample_type: wgpu::TextureSampleType::Uint,
                    view_dimension: wgpu::TextureViewDimension::D2Array,
                    multisampled: false,
                },
                Binding::StorageTextureArray => wgpu::BindingType::StorageTexture {
                    access: wgpu::StorageTextureAccess::WriteOnly,
                    format: wgpu::TextureFormat::Rgba32Float,
                    view_dimension: wgpu::TextureViewDimension::D2Array,
                },
                Binding::UintStorageTextureArray => wgpu::BindingType::StorageTexture {
                    access: wgpu::StorageTextureAccess::WriteOnly,
                    format: wgpu::TextureFormat::Rgba32Uint,
                    view_dimension: wgpu::TextureViewDimension::D2Array,
                },
                Binding::StorageTexture => wgpu::BindingType::StorageTexture {
                    access: wgpu::StorageTextureAccess::WriteOnly,
                    format: wgpu::TextureFormat::Rgba32Float,
                    view_dimension: wgpu::TextureViewDimension::D2,
                },
            },
            count: None,
        })
        .collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    })
}

pub(crate) fn shader_module(device: &wgpu::Device, shader: ShaderSource) -> wgpu::ShaderModule {
    device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(shader.name),
        source: wgpu::ShaderSource::Wgsl(shader.source.into()),
    })
}

pub(crate) fn compute_pipeline(
    device: &wgpu::Device,
    label: &str,
    module: &wgpu::ShaderModule,
    layout: &wgpu::BindGroupLayout,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(label),
        bind_group_layouts: &[Some(layout)],
        immediate_size: 0,
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: Some(&pipeline_layout),
        module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants,
            // Every kernel writes its workgroup memory before reading it.
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    })
}

/// A bind group binding `buffers` whole, in binding order.
pub fn bind_buffers(
    device: &wgpu::Device,
    label: &str,
    layout: &wgpu::BindGroupLayout,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let resources: Vec<wgpu::BindingResource> =
        buffers.iter().map(|b| b.as_entire_binding()).collect();
    bind_resources(device, label, layout, resources)
}

/// A boolean override's value (WGSL overrides are set as f64).
pub(crate) fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

/// A bind group binding `resources` (whole buffers, texture views) in binding order.
pub fn bind_resources(
    device: &wgpu::Device,
    label: &str,
    layout: &wgpu::BindGroupLayout,
    resources: Vec<wgpu::BindingResource>,
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = resources
        .into_iter()
        .enumerate()
        .map(|(index, resource)| wgpu::BindGroupEntry {
            binding: index as u32,
            resource,
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout,
        entries: &entries,
    })
}

/// One compute pipeline and the layout of its only bind group (group 0).
#[derive(Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub layout: wgpu::BindGroupLayout,
    pub pipeline: wgpu::ComputePipeline,
}

impl Kernel {
    /// Builds the pipeline of `shader`'s `main` with `bindings` in binding order.
    pub fn new(device: &wgpu::Device, shader: ShaderSource, bindings: &[Binding]) -> Self {
        Self::with_constants(device, shader, bindings, &[])
    }

    /// Like [`Kernel::new`], with the shader's overrides set to `constants`.
    pub fn with_constants(
        device: &wgpu::Device,
        shader: ShaderSource,
        bindings: &[Binding],
        constants: &[(&str, f64)],
    ) -> Self {
        let layout = bind_group_layout(device, shader.name, bindings);
        let module = shader_module(device, shader);
        let pipeline = compute_pipeline(device, shader.name, &module, &layout, constants);
        Kernel {
            name: shader.name,
            layout,
            pipeline,
        }
    }

    pub fn bind(&self, device: &wgpu::Device, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        bind_buffers(device, self.name, &self.layout, buffers)
    }
}
