//! The layer's forward on the host: the plan of one pass and the device limits it must
//! fit; a leased workspace, `x` and the small `Params` written through the queue, the
//! forward pass recorded, one submit and one read-back, the statistics (and, on request,
//! the intermediate buffers) assembled from it; and batches beyond a device limit split
//! into exact chunks (whole capacity groups, or any tokens when nothing is dropped) whose
//! statistics are merged.

use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::gpu::device::allocate::{max_x_rows, padded_to_vec4, staging_buffer};
use crate::gpu::device::readback::{copy_and_submit, read_mapped, split_words, Wait};
use crate::gpu::layer::moe_layer::MoeLayer;
use crate::gpu::layer::trace::ForwardTrace;
use crate::gpu::passes;
use crate::gpu::plan::forward::{ForwardPlan, Routing};
use crate::gpu::plan::sizes::ScratchSizes;
use crate::gpu::resources::workspace::{Lease, Workspace};
use crate::output::{num_tokens_of, MoeOutput};

/// What one forward produced (the browser API reads only the output).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) struct Run {
    pub(crate) output: MoeOutput,
    pub(crate) trace: Option<ForwardTrace>,
    pub(crate) gpu_seconds: Option<f64>,
}

impl MoeLayer {
    pub(crate) async fn run(
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
    pub(crate) async fn run_in(
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
        let grids = match plan.grids(self.limits.max_compute_workgroups_per_dimension) {
            Ok(grids) => grids,
            Err(error) => {
                drop((validation_scope.pop(), oom_scope.pop()));
                return Err(error);
            }
        };
        let params = plan.kernel_params(self.weights.shards.len());
        workspace.write_inputs(&self.queue, &params, x);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moe forward"),
            });
        let kernels = (&self.device, &*self.kernels);
        let plans = (&plan, &grids);
        passes::forward::encode(&mut encoder, kernels, workspace, plans, Routing::Router);
        let scratch = &workspace.scratch;
        // Expert tables span every expert the matmuls run; the statistics the routed ones.
        let n = plan.shape.num_experts;
        let routed = plan.routed_experts;
        let t = plan.num_tokens;
        let timestamps = workspace.timer.as_ref().map_or(0, |_| 4);
        let mut sources: Vec<(&wgpu::Buffer, usize)> = vec![
            (&scratch.y, t * plan.shape.d_model),
            (&scratch.routes, plan.num_assignments()),
            (&scratch.gates, plan.num_assignments()),
            (&scratch.route_prob_max, t),
            (&scratch.expert_table, 3 * n + 2),
            (&scratch.router_stats, routed + 2),
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
            staging_buffer(&self.device, "trace readback", (words * 4) as u64)
        });
        let staging = trace_staging.as_ref().unwrap_or(&scratch.readback);
        let total = copy_and_submit(&self.queue, encoder, staging, &sources);
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
        // The routed choices of each token (the shared expert's follow them).
        let routed_choices = |words: &[u32]| -> Vec<u32> {
            words
                .chunks(plan.top_k)
                .flat_map(|row| &row[..plan.router.top_k])
                .copied()
                .collect()
        };
        let output = MoeOutput {
            shape: shape.to_vec(),
            num_experts: routed,
            top_k: plan.router.top_k,
            y: floats(y),
            routes: routed_choices(routes),
            gates: floats(&routed_choices(gates)),
            route_prob_max: floats(route_prob_max),
            counts: table[..routed].to_vec(),
            kept: table[n..n + routed].to_vec(),
            route_prob_sum: floats(&stats[..routed]),
            n_dropped: table[3 * n + 1],
            aux_loss: f32::from_bits(stats[routed]),
            z_loss: f32::from_bits(stats[routed + 1]),
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

    /// Runs the layer on `x` of `shape` (`[T, D]` or `[S, B, D]`).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward(&self, x: &[f32], shape: &[usize]) -> Result<MoeOutput> {
        pollster::block_on(self.run_chunked(x, shape, Wait::Block)).map(|run| run.output)
    }

    /// Like [`MoeLayer::forward`], without blocking: the future yields until the GPU is
    /// done. Concurrent forwards on one layer take turns (see the README's guarantees).
    pub async fn forward_async(&self, x: &[f32], shape: &[usize]) -> Result<MoeOutput> {
        self.run_chunked(x, shape, Wait::Yield)
            .await
            .map(|run| run.output)
    }

    /// Like [`MoeLayer::forward`], also returning the GPU time of the forward's compute
    /// pass in seconds (from timestamp queries; `None` when the device has none).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_timed(&self, x: &[f32], shape: &[usize]) -> Result<(MoeOutput, Option<f64>)> {
        let run = pollster::block_on(self.run_chunked(x, shape, Wait::Block))?;
        Ok((run.output, run.gpu_seconds))
    }

    /// Like [`MoeLayer::forward`], also reading back the intermediate buffers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_with_trace(
        &self,
        x: &[f32],
        shape: &[usize],
    ) -> Result<(MoeOutput, ForwardTrace)> {
        let Run { output, trace, .. } = pollster::block_on(self.run(x, shape, true, Wait::Block))?;
        let trace = trace.ok_or_else(|| MoeError::Device {
            message: "trace requested but not read back".to_string(),
        })?;
        Ok((output, trace))
    }
}

impl MoeLayer {
    /// The plan for `num_tokens` tokens, or the device limit it would exceed.
    pub(crate) fn plan(&self, num_tokens: usize) -> Result<ForwardPlan> {
        self.plan_with(&self.config, num_tokens)
    }

    /// [`MoeLayer::plan`] under `config` (the experts-only pass plans with its own).
    pub(crate) fn plan_with(&self, config: &MoeConfig, num_tokens: usize) -> Result<ForwardPlan> {
        let plan = ForwardPlan::new(
            config,
            (self.shape, self.shared),
            num_tokens,
            self.matmul_block,
            (self.forced_row_lanes, self.forced_block_rows),
            self.training.is_some(),
        )?;
        let sizes = ScratchSizes::for_plan(&plan);
        if sizes.largest_binding_bytes() > self.max_binding_bytes {
            return Err(MoeError::DeviceLimit {
                limit: "max_storage_buffer_binding_size (activations of this batch)",
                needed: sizes.largest_binding_bytes(),
                allowed: self.max_binding_bytes,
            });
        }
        let max_rows = max_x_rows(&self.limits);
        if num_tokens as u64 > max_rows {
            return Err(MoeError::DeviceLimit {
                limit: "max_texture_array_layers × max_texture_dimension_2d (token rows of x)",
                needed: num_tokens as u64,
                allowed: max_rows,
            });
        }
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        if plan.max_tiles > max_dim as usize {
            return Err(MoeError::DeviceLimit {
                limit: "max_compute_workgroups_per_dimension (expert row tiles)",
                needed: plan.max_tiles as u64,
                allowed: max_dim as u64,
            });
        }
        Ok(plan)
    }

    /// The most tokens one pass can hold on this device (its binding limits and workgroup
    /// counts): larger dropless batches, or batches of several capacity groups, run in
    /// chunks; a single capacity group larger than this is an error.
    pub fn max_tokens_per_pass(&self) -> usize {
        // No pass holds more tokens than the x rows texture.
        let rows = max_x_rows(&self.limits).saturating_add(1);
        let (mut fits, mut too_many) = (0usize, usize::try_from(rows).unwrap_or(usize::MAX));
        while too_many - fits > 1 {
            let middle = fits + (too_many - fits) / 2;
            if self.plan(middle).is_ok() {
                fits = middle;
            } else {
                too_many = middle;
            }
        }
        fits
    }

    /// Tokens per chunk for a batch of `num_tokens`: all of them when the batch fits the
    /// device, else the largest halving that fits. Chunks are exact: they hold whole
    /// capacity groups, or any tokens when nothing is dropped (tokens are then
    /// independent). A single capacity group that does not fit stays an error.
    pub(crate) fn chunk_tokens(&self, num_tokens: usize) -> Result<usize> {
        let whole = match self.plan(num_tokens) {
            Ok(_) => return Ok(num_tokens),
            Err(error) => error,
        };
        let group_size = self.config.group_size_for(num_tokens)?;
        let unit = match (self.config.drop_tokens, group_size < num_tokens) {
            (false, _) => 1,
            (true, true) => group_size,
            (true, false) => return Err(whole),
        };
        let mut chunk = num_tokens;
        while chunk > unit {
            chunk = (chunk / 2).div_ceil(unit).max(1) * unit;
            if self.plan(chunk).is_ok() {
                return Ok(chunk);
            }
        }
        Err(whole)
    }

    /// A forward in chunks of whole capacity groups when the batch exceeds a device limit
    /// (see [`MoeLayer::chunk_tokens`]); statistics are summed over the chunks.
    pub(crate) async fn run_chunked(&self, x: &[f32], shape: &[usize], wait: Wait) -> Result<Run> {
        let d_model = self.shape.d_model;
        let num_tokens = num_tokens_of(shape, x.len(), d_model)?;
        let chunk = self.chunk_tokens(num_tokens)?;
        if chunk == num_tokens {
            return self.run(x, shape, false, wait).await;
        }
        let mut runs = Vec::with_capacity(num_tokens.div_ceil(chunk));
        for (index, part) in x.chunks(chunk * d_model).enumerate() {
            let tokens = part.len() / d_model;
            let run = self
                .run(part, &[tokens, d_model], false, wait)
                .await
                .map_err(|e| in_batch(e, index * chunk))?;
            runs.push(run);
        }
        Ok(merge_chunks(runs, shape, self.shape.num_experts))
    }
}

/// A chunk's error as the batch's: a non-finite token counted from the batch's start.
pub(crate) fn in_batch(error: MoeError, first_token: usize) -> MoeError {
    match error {
        MoeError::NonFiniteInput { token } => MoeError::NonFiniteInput {
            token: first_token + token,
        },
        other => other,
    }
}

/// One output from the chunks of a batch: tensors concatenated, counts and probability
/// sums added in chunk order (deterministic), the aux loss recomputed from the totals as
/// reduce_router_stats does, the z-loss as the token-weighted mean.
pub(crate) fn merge_chunks(runs: Vec<Run>, shape: &[usize], num_experts: usize) -> Run {
    let num_tokens: usize = runs.iter().map(|r| r.output.num_tokens()).sum();
    let top_k = runs.first().map_or(1, |r| r.output.top_k);
    let mut merged = MoeOutput {
        shape: shape.to_vec(),
        num_experts,
        top_k,
        y: Vec::new(),
        routes: Vec::new(),
        gates: Vec::new(),
        route_prob_max: Vec::new(),
        counts: vec![0; num_experts],
        kept: vec![0; num_experts],
        route_prob_sum: vec![0.0; num_experts],
        n_dropped: 0,
        aux_loss: 0.0,
        z_loss: 0.0,
    };
    let mut z_sum = 0.0f32;
    let mut gpu_seconds = Some(0.0);
    for run in runs {
        let chunk = run.output;
        merged.y.extend(chunk.y);
        merged.routes.extend(chunk.routes);
        merged.gates.extend(chunk.gates);
        merged.route_prob_max.extend(&chunk.route_prob_max);
        for e in 0..num_experts {
            merged.counts[e] += chunk.counts[e];
            merged.kept[e] += chunk.kept[e];
            merged.route_prob_sum[e] += chunk.route_prob_sum[e];
        }
        merged.n_dropped += chunk.n_dropped;
        z_sum += chunk.z_loss * chunk.route_prob_max.len() as f32;
        gpu_seconds = gpu_seconds.zip(run.gpu_seconds).map(|(a, b)| a + b);
    }
    let t = num_tokens as f32;
    let aux: f32 = (0..num_experts)
        .map(|e| (merged.counts[e] as f32 / t) * (merged.route_prob_sum[e] / t))
        .sum();
    merged.aux_loss = num_experts as f32 * aux;
    merged.z_loss = z_sum / t;
    Run {
        output: merged,
        trace: None,
        gpu_seconds,
    }
}
