//! The backward pass, a constant number of dispatches whatever the number of experts, each
//! output element summed by one invocation in a fixed order (the same bits on every run),
//! over the training forward's workspace, the backward's scratch and the forward's weight
//! textures, into the gradient buffers; the four matmuls on the core of grouped_matmul.wgsl:
//!
//! 1. gate_backward: dL/dh of the router logits per token, the slots' gate scales
//! 2. stage_tokens on dy: dy's rows as a texture, as the matmuls read them
//! 3. expert_hidden_backward: dA (and dV) per kept slot, dy·W2
//! 4. expert_down_backward: dW2 over each expert's own rows
//! 5. expert_up_backward: dW1 (dW3) over each expert's own rows
//! 6. expert_input_backward: each slot's input gradient, dA·W1 (+ dV·W3)
//! 7. expert_bias_backward: db1, db2 (db3) over each expert's own rows
//! 8. gate_input_backward (`gate_on: input` only): the gates' part of dL/dh, from the
//!    slots' input gradients
//! 9. router_backward: dWr, dbr over the tokens
//! 10. combine_backward: dx gathered per token
//!
//! Steps 3 to 7 run once per weight shard: 3 and 6 read the shard's weight textures, 4, 5
//! and 7 write the shard's gradient buffer. With `gate_on: input` the slots' inputs were
//! g·x: expert_up_backward scales x's rows by the slots' gates, combine_backward their input
//! gradients, and gate_backward leaves the gates' dg to step 8.
//!
//! Semantics: SPEC "Backward"; the CPU reference is `cpu_backward::backward`.

use std::ops::Range;

use crate::gpu::device::encode::encode_writes;
use crate::gpu::kernels::params::BackwardParams;
use crate::gpu::kernels::{bind_resources, Kernels, TrainingKernels};
use crate::gpu::plan::backward::BackwardGrids;
use crate::gpu::plan::forward::ForwardPlan;
use crate::gpu::resources::backward_scratch::BackwardScratch;
use crate::gpu::resources::weights::GpuWeights;
use crate::gpu::resources::workspace::Workspace;

/// What a backward reads besides the training forward's workspace.
pub(crate) struct BackwardInputs<'a> {
    pub(crate) params: &'a BackwardParams,
    /// `[N]`: the caller's gradient of route_prob_sum (zeros when it has none).
    pub(crate) prob_sum_grad: &'a [f32],
    /// A buffer (`COPY_SRC`) holding `dy` (T·D floats) from a byte offset, copied in inside
    /// the command stream; `None` when `dy` was written to the scratch through the queue.
    pub(crate) dy: Option<(&'a wgpu::Buffer, u64)>,
    /// The batch's counts for the aux loss: `None` takes the forward's (its expert table's
    /// head), a chunked batch gives its totals.
    pub(crate) batch_counts: Option<&'a [u32]>,
}

/// The pipelines the backward runs: training's, and the forward's stage_tokens.
pub(crate) struct BackwardKernels<'a> {
    pub(crate) forward: &'a Kernels,
    pub(crate) training: &'a TrainingKernels,
}

/// How a dispatch of the backward is launched.
enum Launch {
    Direct((u32, u32, u32)),
    /// The training forward's indirect arguments at this byte offset.
    Indirect(u64),
}

/// Records the backward of the training forward (of `plan`) in `workspace` into `encoder`:
/// the `Params` and the route_prob_sum gradient inside the command stream, `dy`, then the
/// dispatches `launches` selects (all of them, `0..launch_names(shards).len()`, for a
/// backward; one at a time to time them). `dx` lands in `scratch.dx`, the weights'
/// gradients in `gradients`. Every dispatch overwrites what it writes, so any may run again.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode(
    encoder: &mut wgpu::CommandEncoder,
    (device, kernels): (&wgpu::Device, BackwardKernels<'_>),
    (workspace, scratch): (&Workspace, &mut BackwardScratch),
    weights: &GpuWeights,
    (gradients, shard_params): (&[wgpu::Buffer], &[wgpu::Buffer]),
    (plan, grids): (&ForwardPlan, &BackwardGrids),
    inputs: BackwardInputs<'_>,
    launches: Range<usize>,
) {
    let mut writes = vec![
        (&scratch.params, bytemuck::bytes_of(inputs.params)),
        (
            &scratch.prob_sum_grad,
            bytemuck::cast_slice(inputs.prob_sum_grad),
        ),
    ];
    match inputs.batch_counts {
        Some(counts) => writes.push((&scratch.batch_counts, bytemuck::cast_slice(counts))),
        None => {
            // The routed experts' counts (a shared expert's slices have none to balance).
            let bytes = inputs.params.routed_experts as u64 * 4;
            let table = &workspace.scratch.expert_table;
            encoder.copy_buffer_to_buffer(table, 0, &scratch.batch_counts, 0, bytes);
        }
    }
    encode_writes(device, encoder, "backward params", &writes);
    if let Some((dy, offset)) = inputs.dy {
        let params = inputs.params;
        let bytes = (params.num_tokens as usize * params.d_model as usize * 4) as u64;
        encoder.copy_buffer_to_buffer(dy, offset, &scratch.dy, 0, bytes);
    }
    let fresh = scratch
        .bound
        .as_ref()
        .is_some_and(|(id, _)| *id == workspace.id);
    if !fresh {
        let shard_gradients = (gradients, shard_params);
        let groups = bind_groups(
            device,
            &kernels,
            workspace,
            scratch,
            weights,
            shard_gradients,
        );
        scratch.bound = Some((workspace.id, groups));
    }
    let k = kernels.training;
    let slot_matmuls = k.slot_matmuls.pipelines(device, plan.tiling);
    let planar = |(x, y): (u32, u32)| Launch::Direct((x, y, 1));
    let shards = weights.shards.len();
    let mut all: Vec<(&wgpu::ComputePipeline, Launch)> = vec![
        (&k.gate_backward.pipeline, planar(grids.gate_backward)),
        (
            &kernels.forward.stage_tokens.pipeline,
            planar(grids.stage_dy),
        ),
    ];
    for shard in 0..shards {
        let args = Launch::Indirect((shard * 24) as u64);
        all.push((&slot_matmuls.hidden, args));
    }
    for &grid in &grids.expert_down_backward {
        all.push((&k.expert_down_backward.pipeline, Launch::Direct(grid)));
    }
    for &grid in &grids.expert_up_backward {
        all.push((&k.expert_up_backward.pipeline, Launch::Direct(grid)));
    }
    for shard in 0..shards {
        let args = Launch::Indirect((shard * 24 + 12) as u64);
        all.push((&slot_matmuls.input, args));
    }
    for &grid in &grids.expert_bias_backward {
        all.push((&k.expert_bias_backward.pipeline, planar(grid)));
    }
    if let Some(kernel) = &k.gate_input_backward {
        // One invocation per token, as gate_backward.
        all.push((&kernel.pipeline, planar(grids.gate_backward)));
    }
    all.extend([
        (
            &k.router_backward.pipeline,
            Launch::Direct(grids.router_backward),
        ),
        (
            &k.combine_backward.pipeline,
            Launch::Direct(grids.combine_backward),
        ),
    ]);
    let groups = scratch
        .bound
        .as_ref()
        .map_or(&[][..], |(_, g)| g.as_slice());
    let args = &workspace.scratch.dispatch_args;
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("moe backward"),
        timestamp_writes: None,
    });
    let selected = all.into_iter().zip(groups).enumerate();
    for (_, ((pipeline, launch), bind_group)) in selected.filter(|(i, _)| launches.contains(i)) {
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        match launch {
            Launch::Direct((x, y, z)) => pass.dispatch_workgroups(x, y, z),
            Launch::Indirect(offset) => pass.dispatch_workgroups_indirect(args, offset),
        }
    }
}

/// The kernels of the backward's dispatches, in order, for weights in `shards` shards (and
/// `gate_input`: a layer whose gates scale the experts' inputs).
// Profiling names them; `MoeLayer::dispatches_per_backward` counts them.
pub(crate) fn launch_names(shards: usize, gate_input: bool) -> Vec<&'static str> {
    let mut names = vec!["gate_backward", "stage_tokens (dy)"];
    for name in [
        "expert_hidden_backward",
        "expert_down_backward",
        "expert_up_backward",
        "expert_input_backward",
        "expert_bias_backward",
    ] {
        names.extend(std::iter::repeat_n(name, shards));
    }
    if gate_input {
        names.push("gate_input_backward");
    }
    names.extend(["router_backward", "combine_backward"]);
    names
}

/// The bind groups of the backward's dispatches, in their order (see the module docs).
fn bind_groups(
    device: &wgpu::Device,
    kernels: &BackwardKernels<'_>,
    workspace: &Workspace,
    scratch: &BackwardScratch,
    weights: &GpuWeights,
    (gradients, shard_params): (&[wgpu::Buffer], &[wgpu::Buffer]),
) -> Vec<wgpu::BindGroup> {
    let k = kernels.training;
    let w = &workspace.scratch;
    let s = scratch;
    let view = wgpu::BindingResource::TextureView;
    let mut groups = vec![
        k.gate_backward.bind(
            device,
            &[
                &s.params,
                &s.dy,
                &w.x,
                &w.logits,
                &w.routes,
                &w.gates,
                &w.assignment_slot,
                &w.expert_out,
                &s.batch_counts,
                &s.d_logits,
                &s.slot_scale,
                &s.pass_scale,
                &s.prob_sum_grad,
            ],
        ),
        bind_resources(
            device,
            "stage dy",
            &kernels.forward.stage_tokens.layout,
            vec![
                workspace.uniforms.route.as_entire_binding(),
                s.dy.as_entire_binding(),
                s.dy_flags.as_entire_binding(),
                view(&s.dy_rows),
            ],
        ),
    ];
    let matmuls = &k.slot_matmuls;
    for shard in &weights.shards {
        groups.push(bind_resources(
            device,
            "expert_hidden_backward",
            &matmuls.hidden_layout,
            vec![
                s.params.as_entire_binding(),
                shard.params.as_entire_binding(),
                view(&s.dy_rows),
                w.slot_token.as_entire_binding(),
                w.expert_table.as_entire_binding(),
                s.slot_scale.as_entire_binding(),
                view(&shard.w2.quants),
                w.pre_activations.as_entire_binding(),
                s.d_a.as_entire_binding(),
                s.d_v.as_entire_binding(),
            ],
        ));
    }
    // Shard s's experts write their gradients into buffer 1 + s (buffer 0 is the router's).
    let expert_gradients = || gradients[1..].iter().zip(shard_params);
    for (shard_gradients, shard) in expert_gradients() {
        groups.push(bind_resources(
            device,
            "expert_down_backward",
            &k.expert_down_backward.layout,
            vec![
                s.params.as_entire_binding(),
                view(&s.dy_rows),
                w.slot_token.as_entire_binding(),
                w.expert_table.as_entire_binding(),
                s.slot_scale.as_entire_binding(),
                w.hidden.as_entire_binding(),
                shard.as_entire_binding(),
                shard_gradients.as_entire_binding(),
            ],
        ));
    }
    for (shard_gradients, shard) in expert_gradients() {
        groups.push(bind_resources(
            device,
            "expert_up_backward",
            &k.expert_up_backward.layout,
            vec![
                s.params.as_entire_binding(),
                view(&w.x_rows),
                w.slot_token.as_entire_binding(),
                w.expert_table.as_entire_binding(),
                s.d_a.as_entire_binding(),
                s.d_v.as_entire_binding(),
                shard.as_entire_binding(),
                shard_gradients.as_entire_binding(),
                w.slot_gate.as_entire_binding(),
            ],
        ));
    }
    for shard in &weights.shards {
        // W3's planes are 1-texel dummies when not gated: W1's stand in (never read).
        let w3 = if k.gated { &shard.w3 } else { &shard.w1 };
        groups.push(bind_resources(
            device,
            "expert_input_backward",
            &matmuls.input_layout,
            vec![
                s.params.as_entire_binding(),
                shard.params.as_entire_binding(),
                w.expert_table.as_entire_binding(),
                s.d_a.as_entire_binding(),
                s.d_v.as_entire_binding(),
                view(&shard.w1.quants),
                view(&w3.quants),
                s.d_x_slot.as_entire_binding(),
            ],
        ));
    }
    for (shard_gradients, shard) in expert_gradients() {
        groups.push(bind_resources(
            device,
            "expert_bias_backward",
            &k.expert_bias_backward.layout,
            vec![
                s.params.as_entire_binding(),
                view(&s.dy_rows),
                w.slot_token.as_entire_binding(),
                w.expert_table.as_entire_binding(),
                s.slot_scale.as_entire_binding(),
                s.d_a.as_entire_binding(),
                s.d_v.as_entire_binding(),
                shard.as_entire_binding(),
                shard_gradients.as_entire_binding(),
            ],
        ));
    }
    if let Some(kernel) = &k.gate_input_backward {
        groups.push(kernel.bind(
            device,
            &[
                &s.params,
                &w.x,
                &w.logits,
                &w.routes,
                &w.assignment_slot,
                &s.d_x_slot,
                &s.d_logits,
            ],
        ));
    }
    groups.push(bind_resources(
        device,
        "router_backward",
        &k.router_backward.layout,
        vec![
            s.params.as_entire_binding(),
            view(&w.x_rows),
            s.d_logits.as_entire_binding(),
            gradients[0].as_entire_binding(),
        ],
    ));
    groups.push(bind_resources(
        device,
        "combine_backward",
        &k.combine_backward.layout,
        vec![
            s.params.as_entire_binding(),
            s.dy.as_entire_binding(),
            s.d_logits.as_entire_binding(),
            w.assignment_slot.as_entire_binding(),
            s.d_x_slot.as_entire_binding(),
            s.pass_scale.as_entire_binding(),
            view(&weights.router),
            s.dx.as_entire_binding(),
            w.slot_gate.as_entire_binding(),
        ],
    ));
    groups
}
