//! Training on the GPU: a training forward that keeps its workspace (the routing tables,
//! logits, hidden rows and expert outputs the backward reads), then the backward as seven
//! dispatches whatever the number of experts, each output element summed by one invocation
//! in a fixed order (the same bits on every run):
//!
//! 1. gate_backward: dL/dh of the router logits per token, the slots' gate scales
//! 2. expert_hidden_backward: dA (and dV) per kept slot, pre-activations recomputed
//! 3. expert_down_backward: dW2, db2 over each expert's own rows
//! 4. expert_up_backward: dW1, db1 (dW3, db3) over each expert's own rows
//! 5. expert_input_backward: each slot's input gradient through W1ᵀ (and W3ᵀ)
//! 6. router_backward: dWr, dbr over the tokens
//! 7. combine_backward: dx gathered per token
//!
//! Semantics: SPEC "Backward"; the CPU reference is `cpu_backward::backward`.

use crate::cpu_backward::{Gradients, LossCoefficients};
use crate::error::{MoeError, Result};
use crate::gpu::buffers::{padded_to_vec4, storage_buffer, uniform_buffer};
use crate::gpu::forward::{dispatch, read_mapped};
use crate::gpu::layer::MoeLayer;
use crate::gpu::parameters::{ParameterLayout, Training, TrainingRecord, TrainingState};
use crate::gpu::params::BackwardParams;
use crate::gpu::plan::{div_ceil, grid_2d, ForwardPlan};
use crate::gpu::readback::Wait;
use crate::gpu::shaders::TRAINING_WORKGROUP;
use crate::gpu::workspace::Workspace;
use crate::output::{num_tokens_of, MoeOutput};
use crate::weights::LayerShape;

/// The backward's own buffers, sized for the largest batch seen.
pub(super) struct BackwardScratch {
    /// (tokens, slots) they hold room for.
    capacity: (usize, usize),
    dy: wgpu::Buffer,
    dx: wgpu::Buffer,
    d_logits: wgpu::Buffer,
    slot_scale: wgpu::Buffer,
    pass_scale: wgpu::Buffer,
    d_a: wgpu::Buffer,
    d_v: wgpu::Buffer,
    d_x_slot: wgpu::Buffer,
    params: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// The seven bind groups and the id of the workspace they were built over (rebuilt
    /// only when the training forward needed a new workspace).
    bound: Option<(usize, Vec<wgpu::BindGroup>)>,
}

impl BackwardScratch {
    /// Room for `tokens` and `slots`, and `parameters` floats of gradients to read back.
    fn new(
        device: &wgpu::Device,
        shape: LayerShape,
        gated: bool,
        (tokens, slots): (usize, usize),
        parameters: usize,
    ) -> Self {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = shape;
        let none = wgpu::BufferUsages::empty();
        let buffer = |label: &str, floats: usize, usage| {
            storage_buffer(device, label, floats as u64 * 4, usage)
        };
        BackwardScratch {
            capacity: (tokens, slots),
            dy: buffer("dy", tokens * d, wgpu::BufferUsages::COPY_DST),
            dx: buffer("dx", tokens * d, wgpu::BufferUsages::COPY_SRC),
            d_logits: buffer("d_logits", tokens * n, none),
            slot_scale: buffer("slot_scale", slots, none),
            pass_scale: buffer("pass_scale", tokens, none),
            d_a: buffer("d_a", slots * f, none),
            d_v: buffer("d_v", if gated { slots * f } else { 1 }, none),
            d_x_slot: buffer("d_x_slot", slots * d, none),
            params: uniform_buffer(device, "backward params", &BackwardParams::default()),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("backward readback"),
                size: ((tokens * d + parameters).max(1) * 4) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            bound: None,
        }
    }
}

/// Workgroups of TRAINING_WORKGROUP for `invocations`, laid out in 2-D.
fn training_grid(invocations: usize, max_dim: u32) -> Result<(u32, u32)> {
    if invocations > u32::MAX as usize {
        return Err(MoeError::DeviceLimit {
            limit: "invocations of one backward dispatch (u32 indices)",
            needed: invocations as u64,
            allowed: u32::MAX as u64,
        });
    }
    grid_2d(div_ceil(invocations, TRAINING_WORKGROUP as usize), max_dim)
}

impl MoeLayer {
    pub(super) fn training(&self) -> Result<&Training> {
        self.training.as_ref().ok_or_else(|| MoeError::Training {
            message: "the layer was built without `LayerOptions::trainable`".to_string(),
        })
    }

    pub(super) fn training_state(&self) -> Result<std::sync::MutexGuard<'_, TrainingState>> {
        self.training()?
            .state
            .lock()
            .map_err(|_| MoeError::Training {
                message: "a previous training call panicked".to_string(),
            })
    }

    /// Bytes of the backward's own scratch (0 before the first backward): dy, dx and the
    /// per-token router gradients, and per slot the gate scale, dA (dV) and the input
    /// gradient: O(T·(D + N) + T·k·(D + F)).
    pub fn training_scratch_bytes(&self) -> u64 {
        let Ok(state) = self.training_state() else {
            return 0;
        };
        state.scratch.as_ref().map_or(0, |s| {
            [
                &s.dy,
                &s.dx,
                &s.d_logits,
                &s.slot_scale,
                &s.pass_scale,
                &s.d_a,
                &s.d_v,
                &s.d_x_slot,
            ]
            .iter()
            .map(|b| b.size())
            .sum()
        })
    }

    /// Dispatches of one backward: seven, whatever the number of experts.
    pub fn dispatches_per_backward(&self) -> usize {
        7
    }

    /// A forward that keeps what the backward needs (the layer keeps the last one; the
    /// next [`MoeLayer::backward`] differentiates it). The batch must fit one pass
    /// ([`MoeLayer::max_tokens_per_pass`]); the layer must be trainable.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_train(&self, x: &[f32], shape: &[usize]) -> Result<MoeOutput> {
        pollster::block_on(self.forward_train_with(x, shape, Wait::Block))
    }

    /// [`MoeLayer::forward_train`] without blocking.
    pub async fn forward_train_async(&self, x: &[f32], shape: &[usize]) -> Result<MoeOutput> {
        self.forward_train_with(x, shape, Wait::Yield).await
    }

    async fn forward_train_with(
        &self,
        x: &[f32],
        shape: &[usize],
        wait: Wait,
    ) -> Result<MoeOutput> {
        let plan = self.plan(num_tokens_of(shape, x.len(), self.shape.d_model)?)?;
        // The previous record's workspace is reused; a failed forward keeps no record. No
        // lock is held while the GPU works.
        let previous = {
            let mut state = self.training_state()?;
            state.has_gradients = false;
            state.record.take().map(|record| record.workspace)
        };
        let mut kept = None;
        let run = self
            .run_in(&mut kept, previous, &plan, x, shape, false, wait)
            .await?;
        if let Some(workspace) = kept {
            self.training_state()?.record = Some(TrainingRecord { workspace, plan });
        }
        Ok(run.output)
    }

    /// The gradients of `L = Σ dy ⊙ y + α·aux_loss + β·z_loss` (SPEC "Backward") for the
    /// last [`MoeLayer::forward_train`], with respect to `x` and every weight tensor
    /// (native names and shapes). They also stay on the device for [`MoeLayer::step`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward(&self, dy: &[f32], coefficients: LossCoefficients) -> Result<Gradients> {
        pollster::block_on(self.backward_with(dy, coefficients, Wait::Block))
    }

    /// [`MoeLayer::backward`] without blocking.
    pub async fn backward_async(
        &self,
        dy: &[f32],
        coefficients: LossCoefficients,
    ) -> Result<Gradients> {
        self.backward_with(dy, coefficients, Wait::Yield).await
    }

    async fn backward_with(
        &self,
        dy: &[f32],
        coefficients: LossCoefficients,
        wait: Wait,
    ) -> Result<Gradients> {
        let training = self.training()?;
        // The lock is held while encoding, not while the GPU works: the submitted commands
        // keep their buffers.
        let (scratch, validation, values) = {
            let mut guard = self.training_state()?;
            let state = &mut *guard;
            let record = state.record.as_ref().ok_or_else(|| MoeError::Training {
                message: "backward needs a forward_train first".to_string(),
            })?;
            let plan = record.plan;
            let values = plan.num_tokens * self.shape.d_model;
            if dy.len() != values {
                return Err(MoeError::tensor(
                    "dy",
                    format!("{} values, expected {values} (the shape of y)", dy.len()),
                ));
            }
            if let Some(index) = dy.iter().position(|v| !v.is_finite()) {
                return Err(MoeError::tensor(
                    "dy",
                    format!("non-finite value at flat index {index}"),
                ));
            }
            for (key, value) in [
                ("aux_loss_coef", coefficients.aux),
                ("z_loss_coef", coefficients.z),
            ] {
                if !value.is_finite() {
                    return Err(MoeError::config(key, format!("{value} is not finite")));
                }
            }
            let needed = (plan.num_tokens, plan.max_slots());
            let gated = self.config.gated;
            let mut scratch = match state.scratch.take() {
                Some(s) if s.capacity.0 >= needed.0 && s.capacity.1 >= needed.1 => s,
                previous => {
                    let capacity = previous.map_or(needed, |s| {
                        (s.capacity.0.max(needed.0), s.capacity.1.max(needed.1))
                    });
                    let parameters = training.layout.total;
                    BackwardScratch::new(&self.device, self.shape, gated, capacity, parameters)
                }
            };
            let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            self.queue
                .write_buffer(&scratch.dy, 0, bytemuck::cast_slice(dy));
            let params = self.backward_params(&plan, coefficients, &training.layout);
            self.queue
                .write_buffer(&scratch.params, 0, bytemuck::bytes_of(&params));
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("moe backward"),
                });
            self.encode_backward_passes(
                &mut encoder,
                training,
                &record.workspace,
                &mut scratch,
                &plan,
            )?;
            let dx_bytes = (values * 4) as u64;
            encoder.copy_buffer_to_buffer(&scratch.dx, 0, &scratch.readback, 0, dx_bytes);
            encoder.copy_buffer_to_buffer(
                &training.gradients,
                0,
                &scratch.readback,
                dx_bytes,
                training.layout.bytes(),
            );
            self.queue.submit([encoder.finish()]);
            let validation = validation_scope.pop();
            (scratch, validation, values)
        };
        let total = (values * 4) as u64 + training.layout.bytes();
        let words = read_mapped(&self.device, &scratch.readback, total, wait).await;
        if let Some(error) = validation.await {
            return Err(MoeError::Device {
                message: format!("backward failed: {error}"),
            });
        }
        let floats: Vec<f32> = bytemuck::cast_slice(&words?).to_vec();
        let (dx, flat) = floats.split_at(values);
        let mut state = self.training_state()?;
        state.scratch = Some(scratch);
        state.has_gradients = true;
        Ok(training.layout.gradients(flat, dx.to_vec()))
    }

    fn backward_params(
        &self,
        plan: &ForwardPlan,
        coefficients: LossCoefficients,
        layout: &ParameterLayout,
    ) -> BackwardParams {
        let config = &self.config;
        let mut params = BackwardParams {
            num_tokens: plan.num_tokens as u32,
            d_model: self.shape.d_model as u32,
            d_ff: self.shape.d_ff as u32,
            num_experts: self.shape.num_experts as u32,
            top_k: plan.top_k as u32,
            row_tile: plan.tiling.row_tile() as u32,
            max_slots: plan.max_slots() as u32,
            gated: config.gated as u32,
            scale_by_prob: config.scale_by_prob as u32,
            normalize_top_k: config.normalize_top_k as u32,
            pass_through: (config.drop_policy == crate::config::DropPolicy::PassThrough) as u32,
            hidden_stride: padded_to_vec4(self.shape.d_ff) as u32,
            aux_coef: coefficients.aux,
            z_coef: coefficients.z,
            ..Default::default()
        };
        layout.kernel_offsets(&mut params);
        params
    }

    /// The seven dispatches of a backward, in one compute pass.
    fn encode_backward_passes(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        training: &Training,
        workspace: &Workspace,
        scratch: &mut BackwardScratch,
        plan: &ForwardPlan,
    ) -> Result<()> {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        let (t, slots) = (plan.num_tokens, plan.max_slots());
        let projections = if self.config.gated { 2 } else { 1 };
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let k = &training.kernels;
        let w = &workspace.scratch;
        let s = &*scratch;
        let device = &self.device;
        let steps = [
            (
                &k.gate_backward,
                vec![
                    &s.params,
                    &s.dy,
                    &w.x,
                    &w.logits,
                    &w.routes,
                    &w.gates,
                    &w.assignment_slot,
                    &w.expert_out,
                    &w.expert_table,
                    &s.d_logits,
                    &s.slot_scale,
                    &s.pass_scale,
                ],
                t,
            ),
            (
                &k.expert_hidden_backward,
                vec![
                    &s.params,
                    &s.dy,
                    &w.x,
                    &w.slot_token,
                    &w.expert_table,
                    &s.slot_scale,
                    &training.parameters,
                    &s.d_a,
                    &s.d_v,
                ],
                slots * f,
            ),
            (
                &k.expert_down_backward,
                vec![
                    &s.params,
                    &s.dy,
                    &w.slot_token,
                    &w.expert_table,
                    &s.slot_scale,
                    &w.hidden,
                    &training.gradients,
                ],
                n * d * (f + 1),
            ),
            (
                &k.expert_up_backward,
                vec![
                    &s.params,
                    &w.x,
                    &w.slot_token,
                    &w.expert_table,
                    &s.d_a,
                    &s.d_v,
                    &training.gradients,
                ],
                projections * n * f * (d + 1),
            ),
            (
                &k.expert_input_backward,
                vec![
                    &s.params,
                    &w.expert_table,
                    &s.d_a,
                    &s.d_v,
                    &training.parameters,
                    &s.d_x_slot,
                ],
                slots * d,
            ),
            (
                &k.router_backward,
                vec![&s.params, &w.x, &s.d_logits, &training.gradients],
                n * (d + 1),
            ),
            (
                &k.combine_backward,
                vec![
                    &s.params,
                    &s.dy,
                    &s.d_logits,
                    &w.assignment_slot,
                    &s.d_x_slot,
                    &s.pass_scale,
                    &training.parameters,
                    &s.dx,
                ],
                t * d,
            ),
        ];
        let fresh = s.bound.as_ref().is_some_and(|(id, _)| *id == workspace.id);
        let rebound: Option<Vec<wgpu::BindGroup>> = (!fresh).then(|| {
            steps
                .iter()
                .map(|(kernel, buffers, _)| kernel.bind(device, buffers))
                .collect()
        });
        let mut dispatches = Vec::with_capacity(steps.len());
        for (kernel, _, invocations) in &steps {
            dispatches.push((*kernel, training_grid(*invocations, max_dim)?));
        }
        if let Some(groups) = rebound {
            scratch.bound = Some((workspace.id, groups));
        }
        let groups = scratch
            .bound
            .as_ref()
            .map_or(&[][..], |(_, g)| g.as_slice());
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("moe backward"),
            timestamp_writes: None,
        });
        for ((kernel, grid), bind_group) in dispatches.into_iter().zip(groups) {
            dispatch(&mut pass, kernel, bind_group, grid);
        }
        Ok(())
    }
}
