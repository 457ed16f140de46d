//! What a trainable layer holds besides the forward's state: the flat parameters and
//! their gradients (laid out as `plan::parameters::ParameterLayout`), the training
//! kernels, the prepared weight refresh, and the state between calls (the last training
//! forward, the backward's scratch, the optimizer's moments).

use std::sync::Mutex;

use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::gpu::device::allocate::storage_buffer;
use crate::gpu::kernels::TrainingKernels;
use crate::gpu::plan::backward::weight_gradient_tiling;
use crate::gpu::plan::forward::{ForwardPlan, Routing};
use crate::gpu::plan::parameters::ParameterLayout;
use crate::gpu::resources::backward_scratch::BackwardScratch;
use crate::gpu::resources::optimizer_state::{OptimizerState, StepTargets};
use crate::gpu::resources::weight_refresh::WeightRefresh;
use crate::gpu::resources::weights::GpuWeights;
use crate::gpu::resources::workspace::Workspace;
use crate::weights::MoeWeights;

/// What a trainable layer holds besides the forward's state.
pub(crate) struct Training {
    pub(crate) kernels: TrainingKernels,
    pub(crate) layout: ParameterLayout,
    /// Every trainable tensor, flat (see plan::parameters).
    pub(crate) parameters: wgpu::Buffer,
    /// Their gradients from the last backward, laid out alike.
    pub(crate) gradients: wgpu::Buffer,
    /// What a step records to rewrite the forward's operands from `parameters`.
    pub(crate) refresh: WeightRefresh,
    pub(crate) state: Mutex<TrainingState>,
}

#[derive(Default)]
pub(crate) struct TrainingState {
    /// The last training forward, which the next backward differentiates.
    pub(crate) record: Option<TrainingRecord>,
    pub(crate) scratch: Option<BackwardScratch>,
    /// The optimizer's moments and step count (see optimizer_state.rs).
    pub(crate) optimizer: Option<OptimizerState>,
    /// Whether `gradients` holds a backward's result (an optimizer step needs one).
    pub(crate) has_gradients: bool,
}

/// A training forward's workspace, kept for its backward.
pub(crate) struct TrainingRecord {
    pub(crate) workspace: Workspace,
    pub(crate) plan: ForwardPlan,
    /// `Routing::PreRouted` after `forward_experts_train` (its backward is
    /// `backward_experts`).
    pub(crate) routing: Routing,
}

impl Training {
    pub(crate) fn new(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        config: &MoeConfig,
        weights: &MoeWeights,
        on_device: &GpuWeights,
        (max_binding_bytes, matmul_block): (u64, u32),
    ) -> Result<Self> {
        let layout = ParameterLayout::new(weights)?;
        if layout.bytes() > max_binding_bytes {
            return Err(MoeError::DeviceLimit {
                limit: "max_storage_buffer_binding_size (the trainable parameters)",
                needed: layout.bytes(),
                allowed: max_binding_bytes,
            });
        }
        let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let parameters = storage_buffer(device, "parameters", layout.bytes(), usage);
        queue.write_buffer(
            &parameters,
            0,
            bytemuck::cast_slice(&layout.flatten(weights)),
        );
        let tiling = weight_gradient_tiling(weights.shape, matmul_block);
        let kernels = TrainingKernels::new(device, config, tiling);
        let max_dim = device.limits().max_compute_workgroups_per_dimension;
        let refresh =
            WeightRefresh::new(device, &kernels, &layout, &parameters, on_device, max_dim)?;
        Ok(Training {
            kernels,
            layout,
            parameters,
            gradients: storage_buffer(device, "gradients", layout.bytes(), usage),
            refresh,
            state: Mutex::new(TrainingState::default()),
        })
    }
}

impl Training {
    /// What optimizer_step updates and reads, for its bind group.
    pub(crate) fn step_targets(&self) -> StepTargets<'_> {
        StepTargets {
            kernel: &self.kernels.optimizer_step,
            parameters: &self.parameters,
            gradients: &self.gradients,
        }
    }
}
