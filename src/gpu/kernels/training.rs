//! The pipelines of training (trainable layers only).

use crate::config::MoeConfig;
use crate::gpu::kernels::pipeline::{Binding, Kernel};
use crate::gpu::kernels::shaders;

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
