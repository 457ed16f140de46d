//! The forward pass: a fixed sequence of dispatches in one compute pass over a workspace
//! (their number depends on the weight shards, never on the number of experts), and the
//! same with caller-owned `x`, `y` and statistics buffers, its `Params` carried inside the
//! command stream.

use crate::gpu::device::encode::{dispatch, encode_writes};
use crate::gpu::kernels::Kernels;
use crate::gpu::plan::forward::{ForwardGrids, ForwardPlan, Routing};
use crate::gpu::plan::sizes::StatisticsLayout;
use crate::gpu::resources::workspace::Workspace;

/// Records the forward of `plan` (routed by `routing`) over `workspace`, whose inputs and
/// `Params` are written, into `encoder`.
pub(crate) fn encode(
    encoder: &mut wgpu::CommandEncoder,
    (device, kernels): (&wgpu::Device, &Kernels),
    workspace: &Workspace,
    (plan, grids): (&ForwardPlan, &ForwardGrids),
    routing: Routing,
) {
    let k = kernels;
    let w = workspace;
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("moe forward"),
        timestamp_writes: w
            .timer
            .as_ref()
            .map(|timer| wgpu::ComputePassTimestampWrites {
                query_set: &timer.query_set,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            }),
    });
    dispatch(
        &mut pass,
        &k.stage_tokens.pipeline,
        &w.stage_tokens,
        grids.route,
    );
    if routing == Routing::Router {
        dispatch(
            &mut pass,
            &k.route_tokens.pipeline,
            &w.route_tokens,
            grids.route,
        );
    }
    dispatch(
        &mut pass,
        &k.count_experts.pipeline,
        &w.count_experts,
        grids.assign,
    );
    let scan = &k.scan_expert_offsets.pipeline;
    dispatch(&mut pass, scan, &w.scan_expert_offsets, (1, 1));
    if routing == Routing::Router {
        let stats = &k.reduce_router_stats.pipeline;
        dispatch(&mut pass, stats, &w.reduce_router_stats, (1, 1));
    }
    let scatter = &k.scatter_assignments.pipeline;
    dispatch(&mut pass, scatter, &w.scatter_assignments, grids.assign);
    for projection in [Projection::Up, Projection::Down] {
        dispatch_matmuls(&mut pass, (device, kernels), workspace, plan, projection);
    }
    let combine = &k.combine_outputs.pipeline;
    dispatch(&mut pass, combine, &w.combine_outputs, grids.combine);
}

/// One of the two expert matmuls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Projection {
    Up,
    Down,
}

/// The dispatches of one expert matmul, one per weight shard. Row tiles per shard are known
/// only on the device: the scan wrote the arguments, one (x, y, z) triple per shard for
/// each projection.
fn dispatch_matmuls(
    pass: &mut wgpu::ComputePass<'_>,
    (device, kernels): (&wgpu::Device, &Kernels),
    workspace: &Workspace,
    plan: &ForwardPlan,
    projection: Projection,
) {
    let args = &workspace.scratch.dispatch_args;
    let matmuls = kernels.expert_matmuls.pipelines(device, plan.tiling);
    let (pipeline, groups, at) = match projection {
        Projection::Up => (&matmuls.up, &workspace.expert_up, 0),
        Projection::Down => (&matmuls.down, &workspace.expert_down, 12),
    };
    for (shard, bind_group) in groups.iter().enumerate() {
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups_indirect(args, (shard * 24 + at) as u64);
    }
}

/// Records `projection`'s matmul over one weight shard alone, in a workspace whose forward
/// has run (to time it: it overwrites what it writes from the same inputs).
// Profiling (native only) times them.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn encode_matmul_shard(
    encoder: &mut wgpu::CommandEncoder,
    (device, kernels): (&wgpu::Device, &Kernels),
    workspace: &Workspace,
    plan: &ForwardPlan,
    (projection, shard): (Projection, usize),
) {
    let args = &workspace.scratch.dispatch_args;
    let matmuls = kernels.expert_matmuls.pipelines(device, plan.tiling);
    let (pipeline, groups, at) = match projection {
        Projection::Up => (&matmuls.up, &workspace.expert_up, 0),
        Projection::Down => (&matmuls.down, &workspace.expert_down, 12),
    };
    let Some(bind_group) = groups.get(shard) else {
        return;
    };
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("moe expert matmul"),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    pass.dispatch_workgroups_indirect(args, (shard * 24 + at) as u64);
}

/// The caller's buffers of an encoded forward: `x` read, `y` and, if given, every
/// statistic (layout: [`StatisticsLayout`]) written.
pub(crate) struct CallerBuffers<'a> {
    pub(crate) x: &'a wgpu::Buffer,
    pub(crate) y: &'a wgpu::Buffer,
    pub(crate) statistics: Option<&'a wgpu::Buffer>,
}

/// Records a forward of `plan` over `workspace` into the caller's encoder, from and to the
/// caller's (checked) buffers: the `Params` (`initial_writes`) copied in inside the command
/// stream, `x` copied in, the forward, `y` and the statistics copied out.
pub(crate) fn encode_with_buffers(
    encoder: &mut wgpu::CommandEncoder,
    (device, kernels): (&wgpu::Device, &Kernels),
    (workspace, initial_writes): (&Workspace, &[(&wgpu::Buffer, &[u8])]),
    (plan, grids): (&ForwardPlan, &ForwardGrids),
    caller: CallerBuffers<'_>,
) {
    let num_tokens = plan.num_tokens;
    let values = (num_tokens * plan.shape.d_model * 4) as u64;
    let n = plan.shape.num_experts;
    let layout = StatisticsLayout::new(num_tokens, plan.top_k, n);
    encode_writes(device, encoder, "encoded forward params", initial_writes);
    let scratch = &workspace.scratch;
    encoder.copy_buffer_to_buffer(caller.x, 0, &scratch.x, 0, values);
    encode(
        encoder,
        (device, kernels),
        workspace,
        (plan, grids),
        Routing::Router,
    );
    encoder.copy_buffer_to_buffer(&scratch.y, 0, caller.y, 0, values);
    if let Some(statistics) = caller.statistics {
        let n = n as u64;
        let assignments = plan.num_assignments() as u64;
        let copies = [
            (&scratch.routes, 0, layout.routes, assignments),
            (&scratch.gates, 0, layout.gates, assignments),
            (
                &scratch.route_prob_max,
                0,
                layout.route_prob_max,
                num_tokens as u64,
            ),
            (&scratch.expert_table, 0, layout.counts, n),
            (&scratch.expert_table, n, layout.kept, n),
            (&scratch.expert_table, 3 * n + 1, layout.n_dropped, 1),
            (&scratch.router_stats, 0, layout.route_prob_sum, n + 2),
            (&scratch.flags, 0, layout.first_non_finite_token, 1),
        ];
        for (source, from, to, words) in copies {
            encoder.copy_buffer_to_buffer(source, from * 4, statistics, to as u64 * 4, words * 4);
        }
    }
}
