//! A forward's workspace: the scratch buffers (sized for the largest batch seen, then
//! reused), the bind groups that reference them, their own `Params` uniforms, and the pool
//! lease that returns them; plus what is written into them before a forward.

use std::sync::Mutex;

use crate::gpu::device::allocate::uniform_buffer;
use crate::gpu::kernels::params::{AssignParams, CombineParams, RouteParams, StatsParams};
use crate::gpu::kernels::{bind_resources, Kernels};
use crate::gpu::plan::forward::KernelParams;
use crate::gpu::plan::sizes::ScratchSizes;
use crate::gpu::resources::scratch::Scratch;
use crate::gpu::resources::weights::GpuWeights;
use crate::weights::LayerShape;

/// Scratch buffers with the bind groups that reference them.
pub(crate) struct Workspace {
    /// Unique per allocation: bind groups built over this workspace elsewhere (the
    /// backward's) know whether they still refer to it.
    pub(crate) id: usize,
    pub(crate) scratch: Scratch,
    pub(crate) stage_tokens: wgpu::BindGroup,
    pub(crate) route_tokens: wgpu::BindGroup,
    pub(crate) count_experts: wgpu::BindGroup,
    pub(crate) scan_expert_offsets: wgpu::BindGroup,
    pub(crate) reduce_router_stats: wgpu::BindGroup,
    pub(crate) scatter_assignments: wgpu::BindGroup,
    pub(crate) expert_up: Vec<wgpu::BindGroup>,
    pub(crate) expert_down: Vec<wgpu::BindGroup>,
    pub(crate) combine_outputs: wgpu::BindGroup,
    /// The `Params` this workspace's bind groups read: forwards in flight at the same time
    /// each have their own.
    pub(crate) uniforms: Uniforms,
    pub(crate) timer: Option<PassTimer>,
}

/// A workspace taken from the pool for one forward (filled in once fitted to the batch);
/// dropping the lease puts it back, on success and on every error path alike.
pub(crate) struct Lease<'a> {
    pub(crate) workspace: Option<Workspace>,
    pub(crate) pool: &'a Mutex<Vec<Workspace>>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(workspace), Ok(mut pool)) = (self.workspace.take(), self.pool.lock()) {
            pool.push(workspace);
        }
    }
}

/// GPU timestamps around the forward's compute pass, when the device has them.
pub(crate) struct PassTimer {
    pub(crate) query_set: wgpu::QuerySet,
    pub(crate) resolved: wgpu::Buffer,
    pub(crate) nanoseconds_per_tick: f64,
}

/// Uniform buffers, one per `Params` struct written per forward.
pub(crate) struct Uniforms {
    pub(crate) route: wgpu::Buffer,
    pub(crate) assign: wgpu::Buffer,
    pub(crate) combine: wgpu::Buffer,
    pub(crate) stats: wgpu::Buffer,
}

impl Workspace {
    /// A workspace for `sizes` over the layer's `kernels` and `weights`; `id` tells it
    /// apart from every other of the layer.
    pub(crate) fn new(
        (device, queue): (&wgpu::Device, &wgpu::Queue),
        (kernels, weights): (&Kernels, &GpuWeights),
        shape: LayerShape,
        sizes: ScratchSizes,
        id: usize,
    ) -> Workspace {
        let scratch = Scratch::new(device, sizes, shape, weights.shards.len());
        let k = kernels;
        let s = &scratch;
        let uniforms = Uniforms {
            route: uniform_buffer(device, "route params", &RouteParams::default()),
            assign: uniform_buffer(device, "assign params", &AssignParams::default()),
            combine: uniform_buffer(device, "combine params", &CombineParams::default()),
            stats: uniform_buffer(device, "stats params", &StatsParams::default()),
        };
        let timer = device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| PassTimer {
                query_set: device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("forward timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                }),
                resolved: device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("resolved timestamps"),
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }),
                nanoseconds_per_tick: queue.get_timestamp_period() as f64,
            });
        let u = &uniforms;
        Workspace {
            id,
            stage_tokens: bind_resources(
                device,
                k.stage_tokens.name,
                &k.stage_tokens.layout,
                vec![
                    u.route.as_entire_binding(),
                    s.x.as_entire_binding(),
                    s.flags.as_entire_binding(),
                    wgpu::BindingResource::TextureView(&s.x_rows),
                ],
            ),
            route_tokens: bind_resources(
                device,
                k.route_tokens.name,
                &k.route_tokens.layout,
                vec![
                    u.route.as_entire_binding(),
                    wgpu::BindingResource::TextureView(&s.x_rows),
                    wgpu::BindingResource::TextureView(&weights.router),
                    s.logits.as_entire_binding(),
                    s.routes.as_entire_binding(),
                    s.gates.as_entire_binding(),
                    s.route_prob_max.as_entire_binding(),
                    s.block_router_sums.as_entire_binding(),
                    s.flags.as_entire_binding(),
                    weights.router_bias.as_entire_binding(),
                    weights.score_bias.as_entire_binding(),
                ],
            ),
            count_experts: k
                .count_experts
                .bind(device, &[&u.assign, &s.routes, &s.block_counts]),
            scan_expert_offsets: k.scan_expert_offsets.bind(
                device,
                &[
                    &u.assign,
                    &s.block_counts,
                    &s.block_offsets,
                    &s.group_kept_prefix,
                    &s.expert_table,
                    &s.dispatch_args,
                    &weights.shard_first_expert,
                ],
            ),
            reduce_router_stats: k.reduce_router_stats.bind(
                device,
                &[
                    &u.stats,
                    &s.block_router_sums,
                    &s.expert_table,
                    &s.router_stats,
                ],
            ),
            scatter_assignments: k.scatter_assignments.bind(
                device,
                &[
                    &u.assign,
                    &s.routes,
                    &s.block_offsets,
                    &s.group_kept_prefix,
                    &s.expert_table,
                    &s.slot_token,
                    &s.assignment_slot,
                    &s.gates,
                    &s.slot_gate,
                ],
            ),
            expert_up: weights
                .shards
                .iter()
                .map(|shard| {
                    bind_resources(
                        device,
                        "expert_up",
                        &k.expert_matmuls.up_layout,
                        [
                            shard.params.as_entire_binding(),
                            wgpu::BindingResource::TextureView(&s.x_rows),
                            s.slot_token.as_entire_binding(),
                            s.expert_table.as_entire_binding(),
                        ]
                        .into_iter()
                        .chain(shard.w1.bindings())
                        .chain(shard.w3.bindings())
                        .chain([
                            shard.up_bias.as_entire_binding(),
                            s.hidden.as_entire_binding(),
                            s.pre_activations.as_entire_binding(),
                            s.slot_gate.as_entire_binding(),
                        ])
                        .collect(),
                    )
                })
                .collect(),
            expert_down: weights
                .shards
                .iter()
                .map(|shard| {
                    bind_resources(
                        device,
                        "expert_down",
                        &k.expert_matmuls.down_layout,
                        [
                            shard.params.as_entire_binding(),
                            s.hidden.as_entire_binding(),
                            s.expert_table.as_entire_binding(),
                        ]
                        .into_iter()
                        .chain(shard.w2.bindings())
                        .chain([
                            shard.down_bias.as_entire_binding(),
                            s.expert_out.as_entire_binding(),
                        ])
                        .collect(),
                    )
                })
                .collect(),
            combine_outputs: k.combine_outputs.bind(
                device,
                &[
                    &u.combine,
                    &s.x,
                    &s.assignment_slot,
                    &s.gates,
                    &s.route_prob_max,
                    &s.expert_out,
                    &s.y,
                ],
            ),
            scratch,
            uniforms,
            timer,
        }
    }

    /// Writes `x` and the forward's `params` through the queue (they land before the next
    /// submission's commands).
    pub(crate) fn write_inputs(&self, queue: &wgpu::Queue, params: &KernelParams, x: &[f32]) {
        queue.write_buffer(&self.scratch.x, 0, bytemuck::cast_slice(x));
        for (target, bytes) in self.initial_writes(params) {
            queue.write_buffer(target, 0, bytes);
        }
    }

    /// What every forward writes before its dispatches: each kernel's `Params` into its
    /// uniform buffer, and the non-finite flag's initial value (no such token).
    pub(crate) fn initial_writes<'a>(
        &'a self,
        params: &'a KernelParams,
    ) -> [(&'a wgpu::Buffer, &'a [u8]); 5] {
        let u = &self.uniforms;
        [
            (&u.route, bytemuck::bytes_of(&params.route)),
            (&u.assign, bytemuck::bytes_of(&params.assign)),
            (&u.combine, bytemuck::bytes_of(&params.combine)),
            (&u.stats, bytemuck::bytes_of(&params.stats)),
            (&self.scratch.flags, bytemuck::bytes_of(&u32::MAX)),
        ]
    }
}
