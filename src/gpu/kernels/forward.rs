//! The forward's pipelines: the routing kernels, built when the layer is created, and the
//! expert matmuls, one variant per tile shape, each built the first time a batch needs it
//! and kept.

use std::sync::{Arc, OnceLock};

use crate::config::MoeConfig;
use crate::formats::WeightFormat;
use crate::gpu::device::shared_values::SharedValues;
use crate::gpu::kernels::pipeline::{
    bind_group_layout, compute_pipeline, flag, shader_module, Binding, Kernel,
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
    /// What the pipelines are specialised for.
    key: ForwardKey,
    variants: [OnceLock<MatmulPipelines>; TILINGS],
}

/// Everything a layer's forward pipelines depend on: the layers of one context with equal
/// keys share their pipelines (`device::shared_values`).
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardKey {
    activation: u32,
    gated: bool,
    /// swiglu_oai's limit and slope.
    swiglu: (f32, f32),
    /// `gate_on: input`: expert_up and scatter_assignments scale by the gates.
    gate_input: bool,
    /// A trainable layer's expert_up stores the pre-activations.
    keep_pre_activations: bool,
    /// The shader codes of W1's, W3's (W1's when not gated) and W2's stored formats.
    formats: [u32; 3],
}

impl ForwardKey {
    pub fn new(config: &MoeConfig, formats: [WeightFormat; 3], keep_pre_activations: bool) -> Self {
        ForwardKey {
            activation: config.activation.shader_code(),
            gated: config.gated,
            swiglu: (config.swiglu_limit, config.swiglu_alpha),
            gate_input: config.gates_input(),
            keep_pre_activations,
            formats: formats.map(WeightFormat::shader_code),
        }
    }
}

impl ExpertMatmuls {
    fn new(device: &wgpu::Device, key: &ForwardKey) -> Self {
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
            key: key.clone(),
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
            let key = &self.key;
            let up_constants = constants(&[
                ("ACTIVATION", key.activation as f64),
                ("SWIGLU_LIMIT", key.swiglu.0 as f64),
                ("SWIGLU_ALPHA", key.swiglu.1 as f64),
                ("GATED", flag(key.gated)),
                ("KEEP_PRE_ACTIVATIONS", flag(key.keep_pre_activations)),
                ("GATE_INPUT", flag(key.gate_input)),
                ("W1_FORMAT", key.formats[0] as f64),
                ("W3_FORMAT", key.formats[1] as f64),
            ]);
            let down_constants = constants(&[("W2_FORMAT", key.formats[2] as f64)]);
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
    /// The pipelines of `key` on `device`: those a layer of its context (`shared`) already
    /// holds for an equal key, or new ones.
    pub fn shared(shared: &SharedValues, device: &wgpu::Device, key: &ForwardKey) -> Arc<Self> {
        shared.get_or_build(key, || Kernels::new(device, key))
    }

    /// Builds the pipelines of `key` (see `ForwardKey`).
    pub fn new(device: &wgpu::Device, key: &ForwardKey) -> Self {
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
                &[("GATE_INPUT", flag(key.gate_input))],
            ),
            expert_matmuls: ExpertMatmuls::new(device, key),
            combine_outputs: Kernel::new(
                device,
                shaders::COMBINE_OUTPUTS,
                &[U, Ro, Ro, Ro, Ro, Ro, Rw],
            ),
        }
    }
}
