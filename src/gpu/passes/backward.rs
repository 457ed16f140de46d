//! The backward pass: seven dispatches whatever the number of experts, each output element
//! summed by one invocation in a fixed order (the same bits on every run), over the
//! training forward's workspace, the backward's scratch and the flat parameters:
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

use crate::gpu::device::encode::{dispatch, encode_writes};
use crate::gpu::kernels::params::BackwardParams;
use crate::gpu::kernels::TrainingKernels;
use crate::gpu::plan::backward::BackwardGrids;
use crate::gpu::resources::backward_scratch::BackwardScratch;
use crate::gpu::resources::workspace::Workspace;

/// The flat parameters the backward reads and the gradients it writes.
pub(crate) struct ParameterBuffers<'a> {
    pub(crate) parameters: &'a wgpu::Buffer,
    pub(crate) gradients: &'a wgpu::Buffer,
}

/// What a backward reads besides the training forward's workspace.
pub(crate) struct BackwardInputs<'a> {
    pub(crate) params: &'a BackwardParams,
    /// `[N]`: the caller's gradient of route_prob_sum (zeros when it has none).
    pub(crate) prob_sum_grad: &'a [f32],
    /// A caller's `dy` buffer (`COPY_SRC`, at least T·D floats) copied in inside the
    /// command stream; `None` when `dy` was written to the scratch through the queue.
    pub(crate) dy: Option<&'a wgpu::Buffer>,
}

/// Records the backward of the training forward in `workspace` into `encoder`: the
/// `Params` and the route_prob_sum gradient inside the command stream, `dy`, then the
/// seven dispatches. `dx` lands in `scratch.dx`, the weights' gradients in `gradients`.
pub(crate) fn encode(
    encoder: &mut wgpu::CommandEncoder,
    (device, kernels): (&wgpu::Device, &TrainingKernels),
    (workspace, scratch): (&Workspace, &mut BackwardScratch),
    flat: ParameterBuffers<'_>,
    grids: &BackwardGrids,
    inputs: BackwardInputs<'_>,
) {
    encode_writes(
        device,
        encoder,
        "backward params",
        &[
            (&scratch.params, bytemuck::bytes_of(inputs.params)),
            (
                &scratch.prob_sum_grad,
                bytemuck::cast_slice(inputs.prob_sum_grad),
            ),
        ],
    );
    if let Some(dy) = inputs.dy {
        let params = inputs.params;
        let bytes = (params.num_tokens as usize * params.d_model as usize * 4) as u64;
        encoder.copy_buffer_to_buffer(dy, 0, &scratch.dy, 0, bytes);
    }
    let k = kernels;
    let w = &workspace.scratch;
    let s = &*scratch;
    let ParameterBuffers {
        parameters,
        gradients,
    } = flat;
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
            grids.gate_backward,
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
                parameters,
                &s.d_a,
                &s.d_v,
            ],
            grids.expert_hidden_backward,
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
                gradients,
            ],
            grids.expert_down_backward,
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
                gradients,
            ],
            grids.expert_up_backward,
        ),
        (
            &k.expert_input_backward,
            vec![
                &s.params,
                &w.expert_table,
                &s.d_a,
                &s.d_v,
                parameters,
                &s.d_x_slot,
            ],
            grids.expert_input_backward,
        ),
        (
            &k.router_backward,
            vec![&s.params, &w.x, &s.d_logits, gradients],
            grids.router_backward,
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
                parameters,
                &s.dx,
            ],
            grids.combine_backward,
        ),
    ];
    // The bind groups are rebuilt only when the training forward needed a new workspace.
    let fresh = s.bound.as_ref().is_some_and(|(id, _)| *id == workspace.id);
    let rebound: Option<Vec<wgpu::BindGroup>> = (!fresh).then(|| {
        steps
            .iter()
            .map(|(kernel, buffers, _)| kernel.bind(device, buffers))
            .collect()
    });
    let dispatches: Vec<_> = steps
        .iter()
        .map(|(kernel, _, grid)| (&kernel.pipeline, *grid))
        .collect();
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
    for ((pipeline, grid), bind_group) in dispatches.into_iter().zip(groups) {
        dispatch(&mut pass, pipeline, bind_group, grid);
    }
}
