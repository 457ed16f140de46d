//! The backward's recording: its own scratch buffers, its Params, and the seven dispatches
//! (see backward.rs for the order and what each computes), shared by the host backward and
//! the encoded one.

use crate::cpu_backward::{check_dy, check_prob_sum_grad, LossCoefficients};
use crate::error::{MoeError, Result};
use crate::gpu::buffers::{padded_to_vec4, storage_buffer, uniform_buffer};
use crate::gpu::encoded::{encode_writes, too_small};
use crate::gpu::forward::{dispatch, Routing};
use crate::gpu::layer::MoeLayer;
use crate::gpu::parameters::{ParameterLayout, Training, TrainingState};
use crate::gpu::params::BackwardParams;
use crate::gpu::plan::{div_ceil, grid_2d, ForwardPlan};
use crate::gpu::shaders::{MATMUL_BLOCK_ROWS, TRAINING_WORKGROUP};
use crate::gpu::workspace::Workspace;
use crate::weights::LayerShape;

/// The backward's own buffers, sized for the largest batch seen.
pub(super) struct BackwardScratch {
    /// (tokens, slots) they hold room for.
    capacity: (usize, usize),
    dy: wgpu::Buffer,
    pub(super) dx: wgpu::Buffer,
    pub(super) d_logits: wgpu::Buffer,
    pub(super) slot_scale: wgpu::Buffer,
    pub(super) pass_scale: wgpu::Buffer,
    pub(super) d_a: wgpu::Buffer,
    pub(super) d_v: wgpu::Buffer,
    pub(super) d_x_slot: wgpu::Buffer,
    /// `[N]`: the caller's gradient of route_prob_sum (zeros when none).
    prob_sum_grad: wgpu::Buffer,
    params: wgpu::Buffer,
    pub(super) readback: wgpu::Buffer,
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
        // COPY_SRC: a traced backward reads them back.
        let traced = wgpu::BufferUsages::COPY_SRC;
        let buffer = |label: &str, floats: usize, usage| {
            storage_buffer(device, label, floats as u64 * 4, usage)
        };
        BackwardScratch {
            capacity: (tokens, slots),
            dy: buffer("dy", tokens * d, wgpu::BufferUsages::COPY_DST),
            dx: buffer("dx", tokens * d, wgpu::BufferUsages::COPY_SRC),
            d_logits: buffer("d_logits", tokens * n, traced),
            slot_scale: buffer("slot_scale", slots, traced),
            pass_scale: buffer("pass_scale", tokens, traced),
            d_a: buffer("d_a", slots * f, traced),
            d_v: buffer("d_v", if gated { slots * f } else { 1 }, traced),
            d_x_slot: buffer("d_x_slot", slots * d, traced),
            prob_sum_grad: buffer("prob_sum_grad", n, wgpu::BufferUsages::COPY_DST),
            params: uniform_buffer(device, "backward params", &BackwardParams::default()),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("backward readback"),
                // dx, the gradients, and after a pre-routed forward dL/dw (in d_logits).
                size: ((tokens * (d + n) + parameters).max(1) * 4) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            bound: None,
        }
    }

    /// Bytes of its activation buffers (not the read-back staging).
    pub(super) fn bytes(&self) -> u64 {
        [
            &self.dy,
            &self.dx,
            &self.d_logits,
            &self.slot_scale,
            &self.pass_scale,
            &self.d_a,
            &self.d_v,
            &self.d_x_slot,
        ]
        .iter()
        .map(|b| b.size())
        .sum()
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

// expert_hidden_backward and expert_input_backward take 4 slots of one row tile at a time:
// every row tile must be a whole number of 4-slot blocks.
const _: () = {
    let mut i = 0;
    while i < MATMUL_BLOCK_ROWS.len() {
        assert!(MATMUL_BLOCK_ROWS[i].is_multiple_of(4));
        i += 1;
    }
};

/// Where a backward's `dy` comes from.
pub(super) enum DyFrom<'a> {
    /// Host values, checked (length, finiteness) and written through the queue.
    Host(&'a [f32]),
    /// A caller's buffer (`COPY_SRC`, at least T·D floats), copied in the encoder.
    Buffer(&'a wgpu::Buffer),
}

impl MoeLayer {
    /// Records the backward of the last training forward (which `routing` names) into
    /// `encoder`, with the loss's terms beyond `dy`: checks, the scratch fitted to its
    /// batch, the Params (inside the command stream), `dy`, the seven dispatches. Returns
    /// the scratch (to go back into `state` once the caller is done with it; `dx` is in
    /// `scratch.dx`) and the values of `x`.
    pub(super) fn record_backward(
        &self,
        training: &Training,
        state: &mut TrainingState,
        encoder: &mut wgpu::CommandEncoder,
        (dy, routing): (DyFrom<'_>, Routing),
        (route_prob_sum_grad, coefficients): (Option<&[f32]>, LossCoefficients),
    ) -> Result<(BackwardScratch, usize)> {
        let record = state.record.as_ref().ok_or_else(|| MoeError::Training {
            message: match routing {
                Routing::Router => "backward needs a forward_train first",
                Routing::PreRouted => "backward_experts needs a forward_experts_train first",
            }
            .to_string(),
        })?;
        match (routing, record.routing) {
            (Routing::Router, Routing::PreRouted) => {
                return Err(MoeError::Training {
                    message: "the last training forward was forward_experts_train: its \
                              backward is backward_experts"
                        .to_string(),
                })
            }
            (Routing::PreRouted, Routing::Router) => {
                return Err(MoeError::Training {
                    message: "the last training forward was forward_train: its backward is \
                              backward"
                        .to_string(),
                })
            }
            _ => {}
        }
        let plan = record.plan;
        let values = plan.num_tokens * self.shape.d_model;
        match dy {
            DyFrom::Host(dy) => check_dy(dy, values)?,
            DyFrom::Buffer(dy) => {
                if let Some(error) = too_small("dy", dy, (values * 4) as u64) {
                    return Err(error);
                }
            }
        }
        check_prob_sum_grad(route_prob_sum_grad, self.shape.num_experts)?;
        for (key, value) in [
            ("aux_loss_coef", coefficients.aux),
            ("z_loss_coef", coefficients.z),
        ] {
            if !value.is_finite() {
                return Err(MoeError::config(key, format!("{value} is not finite")));
            }
        }
        let needed = (plan.num_tokens, plan.max_slots());
        let mut scratch = match state.scratch.take() {
            Some(s) if s.capacity.0 >= needed.0 && s.capacity.1 >= needed.1 => s,
            previous => {
                let capacity = previous.map_or(needed, |s| {
                    (s.capacity.0.max(needed.0), s.capacity.1.max(needed.1))
                });
                let (gated, parameters) = (self.config.gated, training.layout.total);
                BackwardScratch::new(&self.device, self.shape, gated, capacity, parameters)
            }
        };
        let params = self.backward_params(&plan, routing, coefficients, &training.layout);
        let zeros = vec![0.0f32; self.shape.num_experts];
        let prob_sum_grad = route_prob_sum_grad.unwrap_or(&zeros);
        encode_writes(
            &self.device,
            encoder,
            "backward params",
            &[
                (&scratch.params, bytemuck::bytes_of(&params)),
                (&scratch.prob_sum_grad, bytemuck::cast_slice(prob_sum_grad)),
            ],
        );
        match dy {
            DyFrom::Host(dy) => self
                .queue
                .write_buffer(&scratch.dy, 0, bytemuck::cast_slice(dy)),
            DyFrom::Buffer(dy) => {
                encoder.copy_buffer_to_buffer(dy, 0, &scratch.dy, 0, (values * 4) as u64)
            }
        }
        let recorded =
            self.encode_backward_passes(encoder, training, &record.workspace, &mut scratch, &plan);
        match recorded {
            Ok(()) => Ok((scratch, values)),
            Err(error) => {
                state.scratch = Some(scratch);
                Err(error)
            }
        }
    }

    fn backward_params(
        &self,
        plan: &ForwardPlan,
        routing: Routing,
        coefficients: LossCoefficients,
        layout: &ParameterLayout,
    ) -> BackwardParams {
        let config = &self.config;
        let pre_routed = routing == Routing::PreRouted;
        let mut params = BackwardParams {
            num_tokens: plan.num_tokens as u32,
            d_model: self.shape.d_model as u32,
            d_ff: self.shape.d_ff as u32,
            num_experts: self.shape.num_experts as u32,
            top_k: plan.top_k as u32,
            row_tile: plan.tiling.row_tile() as u32,
            max_slots: plan.max_slots() as u32,
            gated: config.gated as u32,
            scale_by_prob: plan.scale_by_prob as u32,
            normalize_top_k: plan.normalize_top_k as u32,
            pass_through: plan.pass_through as u32,
            hidden_stride: padded_to_vec4(self.shape.d_ff) as u32,
            aux_coef: coefficients.aux,
            z_coef: coefficients.z,
            pre_routed: pre_routed as u32,
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
                    &s.prob_sum_grad,
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
                slots / 4 * f.div_ceil(4),
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
                n * d.div_ceil(4) * (f.div_ceil(4) + 1),
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
                projections * n * f.div_ceil(4) * (d.div_ceil(4) + 1),
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
                slots / 4 * d.div_ceil(4),
            ),
            (
                &k.router_backward,
                vec![&s.params, &w.x, &s.d_logits, &training.gradients],
                n.div_ceil(4) * (d.div_ceil(4) + 1),
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
