//! The compute pipelines of a layer, each with its explicit bind group layout. Routing
//! kernels are built when the layer is created; the expert matmuls come in one variant per
//! tile shape, each built the first time a batch needs it and kept.

use std::sync::OnceLock;

use crate::config::MoeConfig;
use crate::formats::WeightFormat;
use crate::gpu::plan::MatmulTiling;
use crate::gpu::shaders::{
    self, ShaderSource, MATMUL_BLOCKS, MATMUL_BLOCK_ROWS, MATMUL_LANES, ROW_LANES_CHOICES,
};

/// Tile shapes the matmuls can be built for: every `ROW_LANES` with every block and
/// block height (those taller than wide are never built).
const TILINGS: usize = ROW_LANES_CHOICES.len() * MATMUL_BLOCKS.len() * MATMUL_BLOCK_ROWS.len();

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

fn bind_group_layout(
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

fn shader_module(device: &wgpu::Device, shader: ShaderSource) -> wgpu::ShaderModule {
    device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(shader.name),
        source: wgpu::ShaderSource::Wgsl(shader.source.into()),
    })
}

fn compute_pipeline(
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

/// The up- and down-projection pipelines for one tile shape.
#[derive(Debug)]
pub struct MatmulPipelines {
    pub up: wgpu::ComputePipeline,
    pub down: wgpu::ComputePipeline,
}

/// expert_up and expert_down: layouts and modules built once, one pipeline pair per tile
/// shape (`ROW_LANES`, `ROW_QUADS`, `QUADS` with its `LANES`), specialised for the layer's
/// activation, gating and weight formats.
#[derive(Debug)]
pub struct ExpertMatmuls {
    pub up_layout: wgpu::BindGroupLayout,
    pub down_layout: wgpu::BindGroupLayout,
    up_module: wgpu::ShaderModule,
    down_module: wgpu::ShaderModule,
    activation: f64,
    gated: f64,
    /// The shader codes of W1's, W3's and W2's stored formats.
    formats: [f64; 3],
    variants: [OnceLock<MatmulPipelines>; TILINGS],
}

impl ExpertMatmuls {
    fn new(device: &wgpu::Device, config: &MoeConfig, formats: [WeightFormat; 3]) -> Self {
        use Binding::{
            Storage as Rw, StorageReadOnly as Ro, TextureArray as T, UintTextureArray as W,
            Uniform as U,
        };
        // Each weight tensor is three planes (quants, high bits, scales): W, W, W.
        ExpertMatmuls {
            up_layout: bind_group_layout(
                device,
                "expert_up",
                &[U, T, Ro, Ro, W, W, W, W, W, W, Ro, Rw],
            ),
            down_layout: bind_group_layout(device, "expert_down", &[U, Ro, Ro, W, W, W, Ro, Rw]),
            up_module: shader_module(device, shaders::EXPERT_UP),
            down_module: shader_module(device, shaders::EXPERT_DOWN),
            activation: config.activation.shader_code() as f64,
            gated: if config.gated { 1.0 } else { 0.0 },
            formats: formats.map(|f| f.shader_code() as f64),
            variants: Default::default(),
        }
    }

    /// The pipelines for `tiling`, built on first use.
    pub fn pipelines(&self, device: &wgpu::Device, tiling: MatmulTiling) -> &MatmulPipelines {
        let position =
            |choices: &[u32], value: u32| choices.iter().position(|&c| c == value).unwrap_or(0);
        let lanes_index = position(&ROW_LANES_CHOICES, tiling.row_lanes);
        let block_index = position(&MATMUL_BLOCKS, tiling.block);
        let rows_index = position(&MATMUL_BLOCK_ROWS, tiling.block_rows);
        let variant = (lanes_index * MATMUL_BLOCKS.len() + block_index) * MATMUL_BLOCK_ROWS.len()
            + rows_index;
        self.variants[variant].get_or_init(|| {
            let row_lanes = ROW_LANES_CHOICES[lanes_index] as f64;
            let quads = (MATMUL_BLOCKS[block_index] / 4) as f64;
            let row_quads = (MATMUL_BLOCK_ROWS[rows_index] / 4) as f64;
            let lanes = MATMUL_LANES[block_index] as f64;
            let up_constants = [
                ("ACTIVATION", self.activation),
                ("GATED", self.gated),
                ("ROW_LANES", row_lanes),
                ("QUADS", quads),
                ("ROW_QUADS", row_quads),
                ("LANES", lanes),
                ("W1_FORMAT", self.formats[0]),
                ("W3_FORMAT", self.formats[1]),
            ];
            MatmulPipelines {
                up: compute_pipeline(
                    device,
                    "expert_up",
                    &self.up_module,
                    &self.up_layout,
                    &up_constants,
                ),
                down: compute_pipeline(
                    device,
                    "expert_down",
                    &self.down_module,
                    &self.down_layout,
                    &[
                        ("ROW_LANES", row_lanes),
                        ("QUADS", quads),
                        ("ROW_QUADS", row_quads),
                        ("LANES", lanes),
                        ("W2_FORMAT", self.formats[2]),
                    ],
                ),
            }
        })
    }
}

/// Every pipeline of a layer.
#[derive(Debug)]
pub struct Kernels {
    pub stage_tokens: Kernel,
    pub route_tokens: Kernel,
    pub count_experts: Kernel,
    pub scan_expert_offsets: Kernel,
    pub reduce_router_stats: Kernel,
    pub scatter_assignments: Kernel,
    pub expert_matmuls: ExpertMatmuls,
    pub combine_outputs: Kernel,
}

impl Kernels {
    /// `formats`: the stored formats of W1, W3 (W1's when not gated) and W2.
    pub fn new(device: &wgpu::Device, config: &MoeConfig, formats: [WeightFormat; 3]) -> Self {
        use Binding::{
            Storage as Rw, StorageReadOnly as Ro, StorageTextureArray as St, Texture as T,
            TextureArray as Ta, Uniform as U,
        };
        Kernels {
            stage_tokens: Kernel::new(device, shaders::STAGE_TOKENS, &[U, Ro, Rw, St]),
            route_tokens: Kernel::new(
                device,
                shaders::ROUTE_TOKENS,
                &[U, Ta, T, Rw, Rw, Rw, Rw, Rw, Rw, U],
            ),
            count_experts: Kernel::new(device, shaders::COUNT_EXPERTS, &[U, Ro, Rw]),
            scan_expert_offsets: Kernel::new(
                device,
                shaders::SCAN_EXPERT_OFFSETS,
                &[U, Ro, Rw, Rw, Rw, Rw, Ro],
            ),
            reduce_router_stats: Kernel::new(
                device,
                shaders::REDUCE_ROUTER_STATS,
                &[U, Ro, Ro, Rw],
            ),
            scatter_assignments: Kernel::new(
                device,
                shaders::SCATTER_ASSIGNMENTS,
                &[U, Ro, Ro, Ro, Ro, Rw, Rw],
            ),
            expert_matmuls: ExpertMatmuls::new(device, config, formats),
            combine_outputs: Kernel::new(
                device,
                shaders::COMBINE_OUTPUTS,
                &[U, Ro, Ro, Ro, Ro, Ro, Rw],
            ),
        }
    }
}

/// The pipelines of training (trainable layers only): the backward's seven kernels in
/// dispatch order, the optimizer step and the refresh of the forward's weight textures.
#[derive(Debug)]
pub struct TrainingKernels {
    pub gate_backward: Kernel,
    pub expert_hidden_backward: Kernel,
    pub expert_down_backward: Kernel,
    pub expert_up_backward: Kernel,
    pub expert_input_backward: Kernel,
    pub router_backward: Kernel,
    pub combine_backward: Kernel,
    pub optimizer_step: Kernel,
    pub refresh_expert_weights: Kernel,
    pub refresh_router_weights: Kernel,
}

impl TrainingKernels {
    pub fn new(device: &wgpu::Device, config: &MoeConfig) -> Self {
        use Binding::{
            Storage as Rw, StorageReadOnly as Ro, StorageTexture as St,
            UintStorageTextureArray as Su, Uniform as U,
        };
        let activation = [("ACTIVATION", config.activation.shader_code() as f64)];
        TrainingKernels {
            gate_backward: Kernel::new(
                device,
                shaders::GATE_BACKWARD,
                &[U, Ro, Ro, Ro, Ro, Ro, Ro, Ro, Ro, Rw, Rw, Rw, Ro],
            ),
            expert_hidden_backward: Kernel::with_constants(
                device,
                shaders::EXPERT_HIDDEN_BACKWARD,
                &[U, Ro, Ro, Ro, Ro, Ro, Ro, Rw, Rw],
                &activation,
            ),
            expert_down_backward: Kernel::new(
                device,
                shaders::EXPERT_DOWN_BACKWARD,
                &[U, Ro, Ro, Ro, Ro, Ro, Rw],
            ),
            expert_up_backward: Kernel::new(
                device,
                shaders::EXPERT_UP_BACKWARD,
                &[U, Ro, Ro, Ro, Ro, Ro, Rw],
            ),
            expert_input_backward: Kernel::new(
                device,
                shaders::EXPERT_INPUT_BACKWARD,
                &[U, Ro, Ro, Ro, Ro, Rw],
            ),
            router_backward: Kernel::new(device, shaders::ROUTER_BACKWARD, &[U, Ro, Ro, Rw]),
            combine_backward: Kernel::new(
                device,
                shaders::COMBINE_BACKWARD,
                &[U, Ro, Ro, Ro, Ro, Ro, Ro, Rw],
            ),
            optimizer_step: Kernel::new(device, shaders::OPTIMIZER_STEP, &[U, Rw, Ro, Rw, Rw]),
            refresh_expert_weights: Kernel::new(
                device,
                shaders::REFRESH_EXPERT_WEIGHTS,
                &[U, Ro, Su],
            ),
            refresh_router_weights: Kernel::new(
                device,
                shaders::REFRESH_ROUTER_WEIGHTS,
                &[U, Ro, St],
            ),
        }
    }
}
