//! One forward on the GPU: a leased workspace, `x` and the small `Params` written, a fixed
//! sequence of dispatches encoded (their number depends on the weight shards, never on the
//! number of experts), one submit and one read-back. The same recorded into a caller's
//! encoder with caller-owned buffers (`encode_forward`) is in encoded.rs.

use crate::error::{MoeError, Result};
use crate::gpu::buffers::padded_to_vec4;
use crate::gpu::kernels::Kernel;
use crate::gpu::layer::MoeLayer;
use crate::gpu::plan::{grid_2d, ForwardPlan};
use crate::gpu::readback::{map_for_reading, Wait};
use crate::gpu::workspace::{Lease, Workspace};
use crate::output::{num_tokens_of, MoeOutput};

/// Intermediate buffers of one forward, read back for tests and debugging.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardTrace {
    /// `[T, k]`: the slot of every assignment, or `u32::MAX` if dropped.
    pub assignment_slot: Vec<u32>,
    /// `[slots]`: the token of every slot (padding slots hold stale values).
    pub slot_token: Vec<u32>,
    /// `[N + 1]`: first row tile of each expert's segment; slots are `tile·row_tile + i`.
    pub tile_start: Vec<u32>,
    /// Rows of a matmul tile in this forward.
    pub row_tile: u32,
    /// `[slots, F]`: expert hidden activations (valid rows only).
    pub hidden: Vec<f32>,
    /// `[slots, D]`: expert outputs (valid rows only).
    pub expert_out: Vec<f32>,
}

/// Where [`MoeLayer::encode_forward`] writes each statistic in the caller's buffer, in
/// 4-byte words (u32 or f32 bit patterns): routes [T·k], gates [T·k], route_prob_max [T],
/// counts [N], kept [N], n_dropped, route_prob_sum [N], aux_loss, z_loss,
/// first_non_finite_token (`u32::MAX` when every token is finite).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatisticsLayout {
    pub routes: usize,
    pub gates: usize,
    pub route_prob_max: usize,
    pub counts: usize,
    pub kept: usize,
    pub n_dropped: usize,
    pub route_prob_sum: usize,
    pub aux_loss: usize,
    pub z_loss: usize,
    pub first_non_finite_token: usize,
    /// Words in all.
    pub words: usize,
}

impl StatisticsLayout {
    pub fn new(num_tokens: usize, top_k: usize, num_experts: usize) -> Self {
        let assignments = num_tokens * top_k;
        let routes = 0;
        let gates = routes + assignments;
        let route_prob_max = gates + assignments;
        let counts = route_prob_max + num_tokens;
        let kept = counts + num_experts;
        let n_dropped = kept + num_experts;
        let route_prob_sum = n_dropped + 1;
        let aux_loss = route_prob_sum + num_experts;
        let z_loss = aux_loss + 1;
        let first_non_finite_token = z_loss + 1;
        StatisticsLayout {
            routes,
            gates,
            route_prob_max,
            counts,
            kept,
            n_dropped,
            route_prob_sum,
            aux_loss,
            z_loss,
            first_non_finite_token,
            words: first_non_finite_token + 1,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.words as u64 * 4
    }
}

/// Who chose each token's experts: the layer's router, or the caller (`forward_experts`:
/// the routes and weights are written to the workspace, and the router's two dispatches,
/// route_tokens and reduce_router_stats, are left out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Routing {
    Router,
    PreRouted,
}

/// What one forward produced (the browser API reads only the output).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(super) struct Run {
    pub(super) output: MoeOutput,
    pub(super) trace: Option<ForwardTrace>,
    pub(super) gpu_seconds: Option<f64>,
}

impl MoeLayer {
    pub(super) async fn run(
        &self,
        x: &[f32],
        shape: &[usize],
        with_trace: bool,
        wait: Wait,
    ) -> Result<Run> {
        let plan = self.plan(num_tokens_of(shape, x.len(), self.shape.d_model)?)?;
        let idle = self.pool.lock().ok().and_then(|mut pool| pool.pop());
        let mut lease = Lease {
            workspace: None,
            pool: &self.pool,
        };
        self.run_in(
            &mut lease.workspace,
            idle,
            &plan,
            x,
            shape,
            with_trace,
            wait,
        )
        .await
    }

    /// One pass of `plan` over `x` in the workspace `idle` (or a new one) fitted to the
    /// plan, left in `kept` whatever happens: the pool lease puts it back, a training
    /// forward keeps it for the backward.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_in(
        &self,
        kept: &mut Option<Workspace>,
        idle: Option<Workspace>,
        plan: &ForwardPlan,
        x: &[f32],
        shape: &[usize],
        with_trace: bool,
        wait: Wait,
    ) -> Result<Run> {
        let plan = *plan;
        let oom_scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let workspace = &*kept.insert(self.fitted(idle, &plan));
        self.write_inputs(workspace, &plan, x);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moe forward"),
            });
        self.encode(&mut encoder, workspace, &plan, Routing::Router)?;
        let scratch = &workspace.scratch;
        let n = plan.shape.num_experts;
        let t = plan.num_tokens;
        let timestamps = workspace.timer.as_ref().map_or(0, |_| 4);
        let mut sources: Vec<(&wgpu::Buffer, usize)> = vec![
            (&scratch.y, t * plan.shape.d_model),
            (&scratch.routes, plan.num_assignments()),
            (&scratch.gates, plan.num_assignments()),
            (&scratch.route_prob_max, t),
            (&scratch.expert_table, 3 * n + 2),
            (&scratch.router_stats, n + 2),
            (&scratch.flags, 1),
            (
                workspace
                    .timer
                    .as_ref()
                    .map_or(&scratch.flags, |t| &t.resolved),
                timestamps,
            ),
        ];
        // A trace reads the intermediate buffers too, through a staging buffer of its own.
        let slots = plan.max_slots();
        let trace_staging = with_trace.then(|| {
            sources.extend([
                (&scratch.assignment_slot, plan.num_assignments()),
                (&scratch.slot_token, slots),
                (&scratch.expert_table, 3 * n + 1),
                (&scratch.hidden, slots * padded_to_vec4(plan.shape.d_ff)),
                (&scratch.expert_out, slots * plan.shape.d_model),
            ]);
            let words: usize = sources.iter().map(|(_, w)| w).sum();
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("trace readback"),
                size: (words.max(1) * 4) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        let staging = trace_staging.as_ref().unwrap_or(&scratch.readback);
        let total = self.copy_and_submit(encoder, staging, &sources);
        // Error scopes form one stack per thread: pop them before the first await, so
        // that forwards interleaved on one thread never pop each other's.
        let validation = validation_scope.pop();
        let oom = oom_scope.pop();
        let words = read_mapped(&self.device, staging, total, wait).await;
        if let Some(error) = validation.await.or(oom.await) {
            return Err(MoeError::Device {
                message: format!("forward failed: {error}"),
            });
        }
        let words = words?;
        let lengths: Vec<usize> = sources.iter().map(|(_, length)| *length).collect();
        let parts = split_words(&words, &lengths);
        let (y, routes, gates, route_prob_max) = (parts[0], parts[1], parts[2], parts[3]);
        let (table, stats, flags, ticks) = (parts[4], parts[5], parts[6], parts[7]);
        let floats = |words: &[u32]| words.iter().map(|&w| f32::from_bits(w)).collect::<Vec<_>>();
        let trace = with_trace.then(|| ForwardTrace {
            assignment_slot: parts[8].to_vec(),
            slot_token: parts[9].to_vec(),
            tile_start: parts[10][2 * n..3 * n + 1].to_vec(),
            row_tile: plan.tiling.row_tile() as u32,
            hidden: floats(parts[11])
                .chunks(padded_to_vec4(plan.shape.d_ff))
                .flat_map(|row| &row[..plan.shape.d_ff])
                .copied()
                .collect(),
            expert_out: floats(parts[12]),
        });
        if flags[0] != u32::MAX {
            return Err(MoeError::NonFiniteInput {
                token: flags[0] as usize,
            });
        }
        let output = MoeOutput {
            shape: shape.to_vec(),
            num_experts: n,
            top_k: plan.top_k,
            y: floats(y),
            routes: routes.to_vec(),
            gates: floats(gates),
            route_prob_max: floats(route_prob_max),
            counts: table[..n].to_vec(),
            kept: table[n..2 * n].to_vec(),
            route_prob_sum: floats(&stats[..n]),
            n_dropped: table[3 * n + 1],
            aux_loss: f32::from_bits(stats[n]),
            z_loss: f32::from_bits(stats[n + 1]),
        };
        // Some drivers (lavapipe among them) resolve pass timestamps to zeros: no time then.
        let gpu_seconds = workspace.timer.as_ref().and_then(|timer| {
            let begin = ticks[0] as u64 | (ticks[1] as u64) << 32;
            let end = ticks[2] as u64 | (ticks[3] as u64) << 32;
            (end > begin).then(|| (end - begin) as f64 * timer.nanoseconds_per_tick * 1e-9)
        });
        Ok(Run {
            output,
            trace,
            gpu_seconds,
        })
    }

    pub(super) fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &Workspace,
        plan: &ForwardPlan,
        routing: Routing,
    ) -> Result<()> {
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let route_grid = grid_2d(plan.num_route_blocks, max_dim)?;
        let assign_grid = grid_2d(plan.num_assign_blocks, max_dim)?;
        let combine_grid = grid_2d(plan.combine_workgroups(), max_dim)?;
        let k = &self.kernels;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("moe forward"),
            timestamp_writes: workspace.timer.as_ref().map(|timer| {
                wgpu::ComputePassTimestampWrites {
                    query_set: &timer.query_set,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }
            }),
        });
        dispatch(
            &mut pass,
            &k.stage_tokens,
            &workspace.stage_tokens,
            route_grid,
        );
        if routing == Routing::Router {
            dispatch(
                &mut pass,
                &k.route_tokens,
                &workspace.route_tokens,
                route_grid,
            );
        }
        dispatch(
            &mut pass,
            &k.count_experts,
            &workspace.count_experts,
            assign_grid,
        );
        dispatch(
            &mut pass,
            &k.scan_expert_offsets,
            &workspace.scan_expert_offsets,
            (1, 1),
        );
        if routing == Routing::Router {
            dispatch(
                &mut pass,
                &k.reduce_router_stats,
                &workspace.reduce_router_stats,
                (1, 1),
            );
        }
        dispatch(
            &mut pass,
            &k.scatter_assignments,
            &workspace.scatter_assignments,
            assign_grid,
        );
        // Row tiles per shard are known only on the device: the scan wrote the arguments,
        // one (x, y, z) triple per shard for each projection.
        let args = &workspace.scratch.dispatch_args;
        let matmuls = k.expert_matmuls.pipelines(&self.device, plan.tiling);
        for (shard, bind_group) in workspace.expert_up.iter().enumerate() {
            pass.set_pipeline(&matmuls.up);
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups_indirect(args, (shard * 24) as u64);
        }
        for (shard, bind_group) in workspace.expert_down.iter().enumerate() {
            pass.set_pipeline(&matmuls.down);
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups_indirect(args, (shard * 24 + 12) as u64);
        }
        dispatch(
            &mut pass,
            &k.combine_outputs,
            &workspace.combine_outputs,
            combine_grid,
        );
        Ok(())
    }

    /// Copies `sources` (buffer, 4-byte words from its start) one after the other into
    /// `staging` and submits; returns the bytes copied.
    pub(super) fn copy_and_submit(
        &self,
        mut encoder: wgpu::CommandEncoder,
        staging: &wgpu::Buffer,
        sources: &[(&wgpu::Buffer, usize)],
    ) -> u64 {
        let mut offset = 0u64;
        for (buffer, words) in sources {
            let bytes = (*words * 4) as u64;
            if bytes > 0 {
                encoder.copy_buffer_to_buffer(buffer, 0, staging, offset, bytes);
            }
            offset += bytes;
        }
        self.queue.submit([encoder.finish()]);
        offset
    }
}

/// One direct dispatch of `kernel` over a 2-D grid of workgroups.
pub(super) fn dispatch(
    pass: &mut wgpu::ComputePass<'_>,
    kernel: &Kernel,
    bind_group: &wgpu::BindGroup,
    grid: (u32, u32),
) {
    pass.set_pipeline(&kernel.pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    pass.dispatch_workgroups(grid.0, grid.1, 1);
}

/// Splits `words` into consecutive pieces of `lengths`.
pub(super) fn split_words<'a>(words: &'a [u32], lengths: &[usize]) -> Vec<&'a [u32]> {
    let mut rest = words;
    lengths
        .iter()
        .map(|length| {
            let (head, tail) = rest.split_at((*length).min(rest.len()));
            rest = tail;
            head
        })
        .collect()
}

/// Waits until the first `bytes` of `staging` are mapped and returns them as words.
pub(super) async fn read_mapped(
    device: &wgpu::Device,
    staging: &wgpu::Buffer,
    bytes: u64,
    wait: Wait,
) -> Result<Vec<u32>> {
    let slice = staging.slice(..bytes.max(4));
    map_for_reading(device, slice, wait).await?;
    let words = {
        let view = slice.get_mapped_range().map_err(|e| MoeError::Device {
            message: format!("reading the read-back buffer: {e}"),
        })?;
        bytemuck::pod_collect_to_vec::<u8, u32>(&view[..bytes as usize])
    };
    staging.unmap();
    Ok(words)
}
