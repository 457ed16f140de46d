//! A trainable layer's tensors as ONE flat f32 buffer on the device, with its gradients
//! (and the optimizer's moments) laid out alike: one binding for every backward kernel,
//! one dispatch for an optimizer step, one copy to read the gradients back. The forward
//! keeps reading its own operands (the weight textures); an optimizer step rewrites them
//! from this buffer. Also what a trainable layer holds: those buffers, the training
//! kernels, and the state between calls (the last training forward, the backward's
//! scratch, the optimizer's moments).

use std::sync::Mutex;

use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;
use crate::gpu::backward_passes::BackwardScratch;
use crate::gpu::buffers::{storage_buffer, GpuWeights};
use crate::gpu::forward::Routing;
use crate::gpu::kernels::TrainingKernels;
use crate::gpu::params::BackwardParams;
use crate::gpu::plan::ForwardPlan;
use crate::gpu::refresh::WeightRefresh;
use crate::gpu::workspace::Workspace;
use crate::gradients::Gradients;
use crate::weights::{LayerShape, MoeWeights};

/// Where each tensor starts in the flat buffer (in floats; `None`: the layer has none).
/// Order: router.weight, router.bias, w1, b1, w2, b2, w3, b3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterLayout {
    pub shape: LayerShape,
    pub router_weight: usize,
    pub router_bias: Option<usize>,
    pub w1: usize,
    pub b1: Option<usize>,
    pub w2: usize,
    pub b2: Option<usize>,
    pub w3: Option<usize>,
    pub b3: Option<usize>,
    /// Floats in all.
    pub total: usize,
}

/// The offset the kernels take for a tensor (`u32::MAX` when absent).
fn kernel_offset(at: Option<usize>) -> u32 {
    at.map_or(u32::MAX, |at| at as u32)
}

impl ParameterLayout {
    /// The layout of `weights`' tensors; training needs f32 expert matrices.
    pub fn new(weights: &MoeWeights) -> Result<Self> {
        weights.check_trainable()?;
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = weights.shape;
        let mut total = 0usize;
        let mut take = |present: bool, len: usize| {
            present.then(|| {
                let at = total;
                total += len;
                at
            })
        };
        let router_weight = take(true, n * d).unwrap_or(0);
        let router_bias = take(weights.router_bias.is_some(), n);
        let w1 = take(true, n * f * d).unwrap_or(0);
        let b1 = take(weights.b1.is_some(), n * f);
        let w2 = take(true, n * d * f).unwrap_or(0);
        let b2 = take(weights.b2.is_some(), n * d);
        let w3 = take(weights.w3.is_some(), n * f * d);
        let b3 = take(weights.b3.is_some(), n * f);
        if total >= u32::MAX as usize {
            return Err(MoeError::DeviceLimit {
                limit: "trainable parameters (u32 offsets)",
                needed: total as u64,
                allowed: u32::MAX as u64 - 1,
            });
        }
        Ok(ParameterLayout {
            shape: weights.shape,
            router_weight,
            router_bias,
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
            total,
        })
    }

    /// Bytes of the flat buffer.
    pub fn bytes(&self) -> u64 {
        self.total as u64 * 4
    }

    /// `weights`' values in this layout.
    pub fn flatten(&self, weights: &MoeWeights) -> Vec<f32> {
        let mut flat = Vec::with_capacity(self.total);
        let matrix = |m: &ExpertMatrices| m.f32_values().unwrap_or_default().to_vec();
        flat.extend_from_slice(&weights.router_weight);
        flat.extend(weights.router_bias.iter().flatten());
        flat.extend(matrix(&weights.w1));
        flat.extend(weights.b1.iter().flatten());
        flat.extend(matrix(&weights.w2));
        flat.extend(weights.b2.iter().flatten());
        flat.extend(weights.w3.as_ref().map(matrix).unwrap_or_default());
        flat.extend(weights.b3.iter().flatten());
        flat
    }

    fn slice(flat: &[f32], at: usize, len: usize) -> Vec<f32> {
        flat[at..at + len].to_vec()
    }

    /// Gradients read back in this layout, with `x`'s.
    pub fn gradients(&self, flat: &[f32], x: Vec<f32>) -> Gradients {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        let part = |at: Option<usize>, len: usize| at.map(|at| Self::slice(flat, at, len));
        Gradients {
            x,
            router_weight: Self::slice(flat, self.router_weight, n * d),
            router_bias: part(self.router_bias, n),
            w1: Self::slice(flat, self.w1, n * f * d),
            b1: part(self.b1, n * f),
            w2: Self::slice(flat, self.w2, n * d * f),
            b2: part(self.b2, n * d),
            w3: part(self.w3, n * f * d),
            b3: part(self.b3, n * f),
        }
    }

    /// The layer's weights from values in this layout (f32 expert matrices).
    pub fn weights(&self, flat: &[f32]) -> MoeWeights {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        let part = |at: Option<usize>, len: usize| at.map(|at| Self::slice(flat, at, len));
        let matrices = |at: usize, rows: usize, cols: usize| {
            ExpertMatrices::from_f32(n, rows, cols, Self::slice(flat, at, n * rows * cols))
        };
        MoeWeights {
            shape: self.shape,
            router_weight: Self::slice(flat, self.router_weight, n * d),
            router_bias: part(self.router_bias, n),
            w1: matrices(self.w1, f, d),
            b1: part(self.b1, n * f),
            w2: matrices(self.w2, d, f),
            b2: part(self.b2, n * d),
            w3: self.w3.map(|at| matrices(at, f, d)),
            b3: part(self.b3, n * f),
        }
    }

    /// The offsets of `BackwardParams`.
    pub(super) fn kernel_offsets(&self, params: &mut BackwardParams) {
        params.router_weight_at = self.router_weight as u32;
        params.router_bias_at = kernel_offset(self.router_bias);
        params.w1_at = self.w1 as u32;
        params.b1_at = kernel_offset(self.b1);
        params.w2_at = self.w2 as u32;
        params.b2_at = kernel_offset(self.b2);
        params.w3_at = kernel_offset(self.w3);
        params.b3_at = kernel_offset(self.b3);
    }
}

/// What a trainable layer holds besides the forward's state.
pub(super) struct Training {
    pub(super) kernels: TrainingKernels,
    pub(super) layout: ParameterLayout,
    /// Every trainable tensor, flat (see parameters.rs).
    pub(super) parameters: wgpu::Buffer,
    /// Their gradients from the last backward, laid out alike.
    pub(super) gradients: wgpu::Buffer,
    /// What a step records to rewrite the forward's operands from `parameters`.
    pub(super) refresh: WeightRefresh,
    pub(super) state: Mutex<TrainingState>,
}

#[derive(Default)]
pub(super) struct TrainingState {
    /// The last training forward, which the next backward differentiates.
    pub(super) record: Option<TrainingRecord>,
    pub(super) scratch: Option<BackwardScratch>,
    /// The optimizer's moments and step count (see optimizer.rs).
    pub(super) optimizer: Option<crate::gpu::optimizer::OptimizerState>,
    /// Whether `gradients` holds a backward's result (an optimizer step needs one).
    pub(super) has_gradients: bool,
}

/// A training forward's workspace, kept for its backward.
pub(super) struct TrainingRecord {
    pub(super) workspace: Workspace,
    pub(super) plan: ForwardPlan,
    /// `Routing::PreRouted` after `forward_experts_train` (its backward is
    /// `backward_experts`).
    pub(super) routing: Routing,
}

impl Training {
    pub(super) fn new(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        config: &crate::config::MoeConfig,
        weights: &MoeWeights,
        on_device: &GpuWeights,
        max_binding_bytes: u64,
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
        let kernels = TrainingKernels::new(device, config);
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
