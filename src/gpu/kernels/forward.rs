//! The forward's pipelines: the routing kernels, built when the layer is created, and the
//! expert matmuls, one variant per tile shape, each built the first time a batch needs it
//! and kept.

use std::sync::OnceLock;

use crate::config::MoeConfig;
use crate::formats::WeightFormat;
use crate::gpu::kernels::pipeline::{
    bind_group_layout, compute_pipeline, shader_module, Binding, Kernel,
};
use crate::gpu::kernels::shaders;
use crate::gpu::kernels::tiling::{MatmulTiling, TILINGS};

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
    /// swiglu_oai's limit and slope (see activation.wgsl).
    swiglu: (f64, f64),
    /// 1 in a trainable layer: expert_up also stores the pre-activations.
    keep_pre_activations: f64,
    /// 1 with `gate_on: input`: expert_up scales each slot's projections by its gate.
    gate_input: f64,
    /// The shader codes of W1's, W3's and W2's stored formats.
    formats: [f64; 3],
    variants: [OnceLock<MatmulPipelines>; TILINGS],
}

impl ExpertMatmuls {
    fn new(
        device: &wgpu::Device,
        config: &MoeConfig,
        formats: [WeightFormat; 3],
        keep_pre_activations: bool,
    ) -> Self {
        use Binding::{
            Storage as Rw, StorageReadOnly as Ro, TextureArray as T, UintTextureArray as W,
            Uniform as U,
        };
        // Each weight tensor is three planes (quants, high bits, scales): W, W, W; the last
        // binding takes the pre-activations.
        ExpertMatmuls {
            up_layout: bind_group_layout(
                device,
                "expert_up",
                &[U, T, Ro, Ro, W, W, W, W, W, W, Ro, Rw, Rw, Ro],
            ),
            down_layout: bind_group_layout(device, "expert_down", &[U, Ro, Ro, W, W, W, Ro, Rw]),
            up_module: shader_module(device, shaders::EXPERT_UP),
            down_module: shader_module(device, shaders::EXPERT_DOWN),
            activation: config.activation.shader_code() as f64,
            gated: if config.gated { 1.0 } else { 0.0 },
            swiglu: (config.swiglu_limit as f64, config.swiglu_alpha as f64),
            keep_pre_activations: if keep_pre_activations { 1.0 } else { 0.0 },
            gate_input: if config.gates_input() { 1.0 } else { 0.0 },
            formats: formats.map(|f| f.shader_code() as f64),
            variants: Default::default(),
        }
    }

    /// The pipelines for `tiling`, built on first use.
    pub fn pipelines(&self, device: &wgpu::Device, tiling: MatmulTiling) -> &MatmulPipelines {
        self.variants[tiling.variant()].get_or_init(|| {
            let constants = |extra: &[(&'static str, f64)]| -> Vec<(&'static str, f64)> {
                tiling
                    .constants()
                    .into_iter()
                    .chain(extra.iter().copied())
                    .collect()
            };
            let up_constants = constants(&[
                ("ACTIVATION", self.activation),
                ("SWIGLU_LIMIT", self.swiglu.0),
                ("SWIGLU_ALPHA", self.swiglu.1),
                ("GATED", self.gated),
                ("KEEP_PRE_ACTIVATIONS", self.keep_pre_activations),
                ("GATE_INPUT", self.gate_input),
                ("W1_FORMAT", self.formats[0]),
                ("W3_FORMAT", self.formats[1]),
            ]);
            let down_constants = constants(&[("W2_FORMAT", self.formats[2])]);
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
                    &down_constants,
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
    /// `formats`: the stored formats of W1, W3 (W1's when not gated) and W2;
    /// `keep_pre_activations` for a trainable layer (see expert_up.wgsl).
    pub fn new(
        device: &wgpu::Device,
        config: &MoeConfig,
        formats: [WeightFormat; 3],
        keep_pre_activations: bool,
    ) -> Self {
        use Binding::{
            Storage as Rw, StorageReadOnly as Ro, StorageTextureArray as St, Texture as T,
            TextureArray as Ta, Uniform as U,
        };
        Kernels {
            stage_tokens: Kernel::new(device, shaders::STAGE_TOKENS, &[U, Ro, Rw, St]),
            route_tokens: Kernel::new(
                device,
                shaders::ROUTE_TOKENS,
                &[U, Ta, T, Rw, Rw, Rw, Rw, Rw, Rw, U, U],
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
            scatter_assignments: Kernel::with_constants(
                device,
                shaders::SCATTER_ASSIGNMENTS,
                &[U, Ro, Ro, Ro, Ro, Rw, Rw, Ro, Rw],
                &[("GATE_INPUT", if config.gates_input() { 1.0 } else { 0.0 })],
            ),
            expert_matmuls: ExpertMatmuls::new(device, config, formats, keep_pre_activations),
            combine_outputs: Kernel::new(
                device,
                shaders::COMBINE_OUTPUTS,
                &[U, Ro, Ro, Ro, Ro, Ro, Rw],
            ),
        }
    }
}
