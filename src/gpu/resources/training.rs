//! What a trainable layer holds besides the forward's state: the flat parameters and
//! their gradients (laid out as `plan::parameters::ParameterLayout`), the training
//! kernels, the prepared weight refresh, and the state between calls (the last training
//! forward, the backward's scratch, the optimizer's moments).

use std::sync::{Arc, Mutex};

use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::gpu::device::allocate::{storage_buffer, uniform_buffer};
use crate::gpu::device::shared_values::SharedValues;
use crate::gpu::kernels::{TrainingKernels, TrainingKey};
use crate::gpu::plan::backward::weight_gradient_tiling;
use crate::gpu::plan::forward::{ForwardPlan, Routing};
use crate::gpu::plan::parameter_shards::ParameterShards;
use crate::gpu::plan::parameters::ParameterLayout;
use crate::gpu::plan::shared_experts::SharedExperts;
use crate::gpu::resources::backward_scratch::BackwardScratch;
use crate::gpu::resources::optimizer_state::{OptimizerState, StepTargets};
use crate::gpu::resources::weight_refresh::WeightRefresh;
use crate::gpu::resources::weights::GpuWeights;
use crate::gpu::resources::workspace::Workspace;
use crate::weights::MoeWeights;

/// What a trainable layer holds besides the forward's state.
pub(crate) struct Training {
    /// The training pipelines, shared with the context's other layers of the same key.
    pub(crate) kernels: Arc<TrainingKernels>,
    /// How the parameters sit in `parameters` (and alike in `gradients`), and the host's
    /// flat layout.
    pub(crate) shards: ParameterShards,
    /// Every trainable tensor: the router's buffer, then each weight shard's.
    pub(crate) parameters: Vec<wgpu::Buffer>,
    /// Their gradients from the last backward, laid out alike.
    pub(crate) gradients: Vec<wgpu::Buffer>,
    /// Each weight shard's `ShardParams`, for the weight-gradient kernels.
    pub(crate) shard_params: Vec<wgpu::Buffer>,
    /// What a step records to rewrite the forward's operands from `parameters`.
    pub(crate) refresh: WeightRefresh,
    pub(crate) state: Mutex<TrainingState>,
}

#[derive(Default)]
pub(crate) struct TrainingState {
    /// The last training forward, which the next backward differentiates (one pass).
    pub(crate) record: Option<TrainingRecord>,
    /// Or the last training forward of a batch beyond one pass, in chunks.
    pub(crate) chunks: Option<ChunkedBatch>,
    pub(crate) scratch: Option<BackwardScratch>,
    /// The optimizer's moments and step count (see optimizer_state.rs).
    pub(crate) optimizer: Option<OptimizerState>,
    /// Whether `gradients` holds a backward's result (an optimizer step needs one).
    pub(crate) has_gradients: bool,
}

/// A training forward that ran in chunks (a batch beyond one pass): each chunk's pass, and
/// the batch's totals its backward needs.
pub(crate) struct ChunkedBatch {
    pub(crate) passes: Vec<TrainingRecord>,
    /// `[N]`: the batch's counts (the aux loss's).
    pub(crate) counts: Vec<u32>,
    pub(crate) num_tokens: usize,
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
        (device, queue, shared_values): (&wgpu::Device, &wgpu::Queue, &SharedValues),
        config: &MoeConfig,
        (weights, shared): (&MoeWeights, Option<SharedExperts>),
        on_device: &GpuWeights,
        (max_binding_bytes, matmul_block): (u64, u32),
    ) -> Result<Self> {
        let layout = ParameterLayout::new(weights, shared)?;
        let experts: Vec<(usize, usize)> = on_device
            .shards
            .iter()
            .map(|shard| (shard.first_expert, shard.num_experts))
            .collect();
        let shards = ParameterShards::new(layout, &experts);
        // The weight shards were cut so that each shard's parameters fit one binding.
        for (buffer, floats) in shards.buffer_floats().into_iter().enumerate() {
            let bytes = floats as u64 * 4;
            if bytes > max_binding_bytes || floats >= u32::MAX as usize {
                return Err(MoeError::DeviceLimit {
                    limit: if buffer == 0 {
                        "max_storage_buffer_binding_size (the router's trainable parameters)"
                    } else {
                        "max_storage_buffer_binding_size (one weight shard's trainable parameters)"
                    },
                    needed: bytes,
                    allowed: max_binding_bytes.min(u32::MAX as u64 - 1),
                });
            }
        }
        let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffers = |label: &str| -> Vec<wgpu::Buffer> {
            shards
                .buffer_floats()
                .into_iter()
                .map(|floats| storage_buffer(device, label, floats as u64 * 4, usage))
                .collect()
        };
        let parameters = buffers("parameters");
        for (buffer, values) in parameters
            .iter()
            .zip(shards.split(&layout.flatten(weights)))
        {
            queue.write_buffer(buffer, 0, bytemuck::cast_slice(&values));
        }
        let shard_params = shards
            .kernel_params()
            .iter()
            .map(|params| uniform_buffer(device, "shard params", params))
            .collect();
        let tiling = weight_gradient_tiling(weights.shape, matmul_block);
        let key = TrainingKey::new(config, tiling);
        let kernels = TrainingKernels::shared(shared_values, device, &key);
        let max_dim = device.limits().max_compute_workgroups_per_dimension;
        let refresh =
            WeightRefresh::new(device, &kernels, (&shards, &parameters), on_device, max_dim)?;
        Ok(Training {
            kernels,
            gradients: buffers("gradients"),
            shards,
            parameters,
            shard_params,
            refresh,
            state: Mutex::new(TrainingState::default()),
        })
    }

    /// The host's flat layout of the parameters.
    pub(crate) fn layout(&self) -> &ParameterLayout {
        &self.shards.layout
    }

    /// Writes `flat` (the host's layout) into the parameter buffers through the queue.
    pub(crate) fn write_parameters(&self, queue: &wgpu::Queue, flat: &[f32]) {
        for (buffer, values) in self.parameters.iter().zip(self.shards.split(flat)) {
            queue.write_buffer(buffer, 0, bytemuck::cast_slice(&values));
        }
    }

    /// What optimizer_step updates and reads, for its bind groups.
    pub(crate) fn step_targets(&self) -> StepTargets<'_> {
        StepTargets {
            kernel: &self.kernels.optimizer_step,
            parameters: &self.parameters,
            gradients: &self.gradients,
        }
    }
}
