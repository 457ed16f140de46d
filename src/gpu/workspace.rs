//! A forward's workspace: the scratch buffers (sized for the largest batch seen, then
//! reused), the bind groups that reference them, their own `Params` uniforms, and the pool
//! lease that returns them; plus what is written into them before a forward.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::gpu::buffers::{uniform_buffer, Scratch, ScratchSizes};
use crate::gpu::kernels::bind_resources;
use crate::gpu::layer::MoeLayer;
use crate::gpu::params::{AssignParams, CombineParams, RouteParams, StatsParams};
use crate::gpu::plan::{div_ceil, ForwardPlan};
use crate::weights::LayerShape;

/// Every kernel's `Params` for one forward.
pub(super) struct KernelParams {
    pub(super) route: RouteParams,
    pub(super) assign: AssignParams,
    pub(super) combine: CombineParams,
    pub(super) stats: StatsParams,
}

/// Scratch buffers with the bind groups that reference them.
pub(super) struct Workspace {
    /// Unique per allocation: bind groups built over this workspace elsewhere (the
    /// backward's) know whether they still refer to it.
    pub(super) id: usize,
    pub(super) scratch: Scratch,
    pub(super) stage_tokens: wgpu::BindGroup,
    pub(super) route_tokens: wgpu::BindGroup,
    pub(super) count_experts: wgpu::BindGroup,
    pub(super) scan_expert_offsets: wgpu::BindGroup,
    pub(super) reduce_router_stats: wgpu::BindGroup,
    pub(super) scatter_assignments: wgpu::BindGroup,
    pub(super) expert_up: Vec<wgpu::BindGroup>,
    pub(super) expert_down: Vec<wgpu::BindGroup>,
    pub(super) combine_outputs: wgpu::BindGroup,
    /// The `Params` this workspace's bind groups read: forwards in flight at the same time
    /// each have their own.
    pub(super) uniforms: Uniforms,
    pub(super) timer: Option<PassTimer>,
}

/// A workspace taken from the pool for one forward (filled in once fitted to the batch);
/// dropping the lease puts it back, on success and on every error path alike.
pub(super) struct Lease<'a> {
    pub(super) workspace: Option<Workspace>,
    pub(super) pool: &'a Mutex<Vec<Workspace>>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(workspace), Ok(mut pool)) = (self.workspace.take(), self.pool.lock()) {
            pool.push(workspace);
        }
    }
}

/// GPU timestamps around the forward's compute pass, when the device has them.
pub(super) struct PassTimer {
    pub(super) query_set: wgpu::QuerySet,
    pub(super) resolved: wgpu::Buffer,
    pub(super) nanoseconds_per_tick: f64,
}

/// Uniform buffers, one per `Params` struct written per forward.
pub(super) struct Uniforms {
    pub(super) route: wgpu::Buffer,
    pub(super) assign: wgpu::Buffer,
    pub(super) combine: wgpu::Buffer,
    pub(super) stats: wgpu::Buffer,
}

impl MoeLayer {
    /// `workspace` if its buffers are large enough for `plan`, else one that is (sized for
    /// the larger of the two; `None` builds a first one).
    pub(super) fn fitted(&self, workspace: Option<Workspace>, plan: &ForwardPlan) -> Workspace {
        let needed = ScratchSizes::for_plan(plan);
        match workspace {
            Some(w) if w.scratch.sizes.max(needed) == w.scratch.sizes => w,
            previous => {
                let sizes = previous.map_or(needed, |w| w.scratch.sizes.max(needed));
                let id = self.scratch_allocations.fetch_add(1, Ordering::Relaxed);
                self.build_workspace(sizes, id)
            }
        }
    }

    /// A workspace for `sizes`; `id` tells it apart from every other of the layer.
    pub(super) fn build_workspace(&self, sizes: ScratchSizes, id: usize) -> Workspace {
        let device = &self.device;
        let scratch = Scratch::new(device, sizes, self.shape, self.weights.shards.len());
        let k = &self.kernels;
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
                nanoseconds_per_tick: self.queue.get_timestamp_period() as f64,
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
                    wgpu::BindingResource::TextureView(&self.weights.router),
                    s.logits.as_entire_binding(),
                    s.routes.as_entire_binding(),
                    s.gates.as_entire_binding(),
                    s.route_prob_max.as_entire_binding(),
                    s.block_router_sums.as_entire_binding(),
                    s.flags.as_entire_binding(),
                    self.weights.router_bias.as_entire_binding(),
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
                    &self.weights.shard_first_expert,
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
                ],
            ),
            expert_up: self
                .weights
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
                        ])
                        .collect(),
                    )
                })
                .collect(),
            expert_down: self
                .weights
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

    pub(super) fn write_inputs(&self, workspace: &Workspace, plan: &ForwardPlan, x: &[f32]) {
        self.queue
            .write_buffer(&workspace.scratch.x, 0, bytemuck::cast_slice(x));
        let params = self.params_for(plan);
        for (target, bytes) in initial_writes(workspace, &params) {
            self.queue.write_buffer(target, 0, bytes);
        }
    }

    /// Every kernel's `Params` for `plan`.
    pub(super) fn params_for(&self, plan: &ForwardPlan) -> KernelParams {
        let LayerShape {
            num_experts,
            d_model,
            d_ff,
        } = plan.shape;
        KernelParams {
            route: RouteParams {
                num_tokens: plan.num_tokens as u32,
                d_model: d_model as u32,
                num_experts: num_experts as u32,
                top_k: plan.top_k as u32,
                normalize_top_k: plan.normalize_top_k as u32,
                _pad: [0; 3],
            },
            assign: AssignParams {
                num_tokens: plan.num_tokens as u32,
                num_experts: num_experts as u32,
                top_k: plan.top_k as u32,
                group_size: plan.group_size as u32,
                chunks_per_group: plan.chunks_per_group as u32,
                num_blocks: plan.num_assign_blocks as u32,
                capacity: plan.capacity_u32(),
                row_tile: plan.tiling.row_tile() as u32,
                num_shards: self.weights.shards.len() as u32,
                up_tiles_x: div_ceil(d_ff, plan.tiling.col_tile()) as u32,
                down_tiles_x: div_ceil(d_model, plan.tiling.col_tile()) as u32,
                _pad: 0,
            },
            combine: CombineParams {
                num_tokens: plan.num_tokens as u32,
                d_model: d_model as u32,
                top_k: plan.top_k as u32,
                scale_by_prob: plan.scale_by_prob as u32,
                pass_through: plan.pass_through as u32,
                _pad: [0; 3],
            },
            stats: StatsParams {
                num_tokens: plan.num_tokens as u32,
                num_experts: num_experts as u32,
                num_blocks: plan.num_route_blocks as u32,
                _pad: 0,
            },
        }
    }
}

/// What every forward writes before its dispatches: each kernel's `Params` into its
/// uniform buffer, and the non-finite flag's initial value (no such token).
pub(super) fn initial_writes<'a>(
    workspace: &'a Workspace,
    params: &'a KernelParams,
) -> [(&'a wgpu::Buffer, &'a [u8]); 5] {
    let u = &workspace.uniforms;
    [
        (&u.route, bytemuck::bytes_of(&params.route)),
        (&u.assign, bytemuck::bytes_of(&params.assign)),
        (&u.combine, bytemuck::bytes_of(&params.combine)),
        (&u.stats, bytemuck::bytes_of(&params.stats)),
        (&workspace.scratch.flags, bytemuck::bytes_of(&u32::MAX)),
    ]
}
