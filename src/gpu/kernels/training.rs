//! The pipelines of training (trainable layers only): the backward's kernels, the optimizer
//! step and the refresh of the forward's weight textures. The backward's matmuls run on
//! the core of `grouped_matmul.wgsl`: the two over slots (expert_hidden_backward,
//! expert_input_backward) take the training forward's tiling, one variant per tile shape
//! built the first time a batch needs it; the two weight-gradient ones one tiling per
//! layer, built with it.

use std::sync::{Arc, OnceLock};

use crate::config::MoeConfig;
use crate::gpu::device::shared_values::SharedValues;
use crate::gpu::kernels::pipeline::{
    bind_group_layout, compute_pipeline, flag, shader_module, Binding, Kernel,
};
use crate::gpu::kernels::shaders;
use crate::gpu::kernels::tiling::{MatmulTiling, TILINGS};

/// The per-slot matmuls of the backward for one tile shape.
#[derive(Debug)]
pub struct SlotMatmulPipelines {
    pub hidden: wgpu::ComputePipeline,
    pub input: wgpu::ComputePipeline,
}

/// expert_hidden_backward and expert_input_backward: layouts and modules built once, one
/// pipeline pair per tile shape of the training forward.
#[derive(Debug)]
pub struct SlotMatmuls {
    pub hidden_layout: wgpu::BindGroupLayout,
    pub input_layout: wgpu::BindGroupLayout,
    hidden_module: wgpu::ShaderModule,
    input_module: wgpu::ShaderModule,
    /// What the pipelines are specialised for (the activation, swiglu_oai's clamp).
    key: TrainingKey,
    variants: [OnceLock<SlotMatmulPipelines>; TILINGS],
}

/// Everything a trainable layer's training pipelines depend on: the layers of one context
/// with equal keys share them (`device::shared_values`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingKey {
    activation: u32,
    gated: bool,
    /// swiglu_oai's limit and slope.
    swiglu: (f32, f32),
    /// `gate_on: input`: gate_input_backward, and the slot gates in expert_up_backward and
    /// combine_backward.
    gate_input: bool,
    weight_gradient_tiling: MatmulTiling,
}

impl TrainingKey {
    pub fn new(config: &MoeConfig, weight_gradient_tiling: MatmulTiling) -> Self {
        TrainingKey {
            activation: config.activation.shader_code(),
            gated: config.gated,
            swiglu: (config.swiglu_limit, config.swiglu_alpha),
            gate_input: config.gates_input(),
            weight_gradient_tiling,
        }
    }
}

impl SlotMatmuls {
    fn new(device: &wgpu::Device, key: &TrainingKey) -> Self {
        use Binding::{
            Storage as Rw, StorageReadOnly as Ro, TextureArray as Ta, UintTextureArray as W,
            Uniform as U,
        };
        SlotMatmuls {
            hidden_layout: bind_group_layout(
                device,
                "expert_hidden_backward",
                &[U, U, Ta, Ro, Ro, Ro, W, Ro, Rw, Rw],
            ),
            input_layout: bind_group_layout(
                device,
                "expert_input_backward",
                &[U, U, Ro, Ro, Ro, W, W, Rw],
            ),
            hidden_module: shader_module(device, shaders::EXPERT_HIDDEN_BACKWARD),
            input_module: shader_module(device, shaders::EXPERT_INPUT_BACKWARD),
            key: key.clone(),
            variants: Default::default(),
        }
    }

    /// The pipelines for `tiling`, built on first use.
    pub fn pipelines(&self, device: &wgpu::Device, tiling: MatmulTiling) -> &SlotMatmulPipelines {
        self.variants[tiling.variant()].get_or_init(|| {
            let key = &self.key;
            let mut hidden_constants = tiling.constants().to_vec();
            hidden_constants.extend([
                ("ACTIVATION", key.activation as f64),
                ("SWIGLU_LIMIT", key.swiglu.0 as f64),
                ("SWIGLU_ALPHA", key.swiglu.1 as f64),
            ]);
            SlotMatmulPipelines {
                hidden: compute_pipeline(
                    device,
                    "expert_hidden_backward",
                    &self.hidden_module,
                    &self.hidden_layout,
                    &hidden_constants,
                ),
                input: compute_pipeline(
                    device,
                    "expert_input_backward",
                    &self.input_module,
                    &self.input_layout,
                    &tiling.constants(),
                ),
            }
        })
    }
}

/// The pipelines of training, in the backward's dispatch order, then the optimizer step and
/// the refresh of the forward's weight textures.
#[derive(Debug)]
pub struct TrainingKernels {
    pub gate_backward: Kernel,
    /// With `gate_on: input` only: the gates' part of the logits' gradient, after the
    /// slots' input gradients.
    pub gate_input_backward: Option<Kernel>,
    pub slot_matmuls: SlotMatmuls,
    pub expert_down_backward: Kernel,
    pub expert_up_backward: Kernel,
    pub expert_bias_backward: Kernel,
    pub router_backward: Kernel,
    pub combine_backward: Kernel,
    pub optimizer_step: Kernel,
    pub refresh_expert_weights: Kernel,
    pub refresh_router_weights: Kernel,
    /// The tiling of the weight-gradient matmuls (expert_down_backward and
    /// expert_up_backward).
    pub weight_gradient_tiling: MatmulTiling,
    /// Whether the layer's FFNs are gated (W3 and dV exist).
    pub gated: bool,
}

impl TrainingKernels {
    /// The pipelines of `key` on `device`: those a layer of its context (`shared`) already
    /// holds for an equal key, or new ones.
    pub fn shared(shared: &SharedValues, device: &wgpu::Device, key: &TrainingKey) -> Arc<Self> {
        shared.get_or_build(key, || TrainingKernels::new(device, key))
    }

    /// Builds the pipelines of `key` (see `TrainingKey`).
    pub fn new(device: &wgpu::Device, key: &TrainingKey) -> Self {
        use Binding::{
            Storage as Rw, StorageReadOnly as Ro, StorageTexture as St, Texture as T,
            TextureArray as Ta, UintStorageTextureArray as Su, Uniform as U,
        };
        let weight_gradient_tiling = key.weight_gradient_tiling;
        let tiling = weight_gradient_tiling.constants();
        // gate_on: input's kernels read the forward's slot gates (see gate_input_backward).
        let gate_input = [("GATE_INPUT", flag(key.gate_input))];
        let tiling_and_gate = [&tiling[..], &gate_input].concat();
        TrainingKernels {
            gate_backward: Kernel::with_constants(
                device,
                shaders::GATE_BACKWARD,
                &[U, Ro, Ro, Ro, Ro, Ro, Ro, Ro, Ro, Rw, Rw, Rw, Ro],
                &gate_input,
            ),
            gate_input_backward: key.gate_input.then(|| {
                Kernel::new(
                    device,
                    shaders::GATE_INPUT_BACKWARD,
                    &[U, Ro, Ro, Ro, Ro, Ro, Rw],
                )
            }),
            slot_matmuls: SlotMatmuls::new(device, key),
            expert_down_backward: Kernel::with_constants(
                device,
                shaders::EXPERT_DOWN_BACKWARD,
                &[U, Ta, Ro, Ro, Ro, Ro, U, Rw],
                &tiling,
            ),
            expert_up_backward: Kernel::with_constants(
                device,
                shaders::EXPERT_UP_BACKWARD,
                &[U, Ta, Ro, Ro, Ro, Ro, U, Rw, Ro],
                &tiling_and_gate,
            ),
            expert_bias_backward: Kernel::new(
                device,
                shaders::EXPERT_BIAS_BACKWARD,
                &[U, Ta, Ro, Ro, Ro, Ro, Ro, U, Rw],
            ),
            router_backward: Kernel::with_constants(
                device,
                shaders::ROUTER_BACKWARD,
                &[U, Ta, Ro, Rw],
                &tiling,
            ),
            combine_backward: Kernel::with_constants(
                device,
                shaders::COMBINE_BACKWARD,
                &[U, Ro, Ro, Ro, Ro, Ro, T, Rw, Ro],
                &tiling_and_gate,
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
            weight_gradient_tiling,
            gated: key.gated,
        }
    }
}
