//! `MoeLayer`: the GPU forward pass. Weights are uploaded and pipelines built once; a
//! forward leases a set of scratch buffers, writes `x` and the small `Params`, encodes a
//! fixed sequence of dispatches (their number depends on the weight shards, never on the
//! number of experts), submits once and reads back once — per chunk, for batches beyond a
//! device limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::config::{DropPolicy, MoeConfig};
use crate::error::{MoeError, Result};
use crate::formats::WeightFormat;
use crate::gpu::buffers::{
    max_x_rows, padded_to_vec4, uniform_buffer, GpuWeights, Scratch, ScratchSizes,
};
use crate::gpu::context::GpuContext;
use crate::gpu::kernels::{bind_resources, Kernel, Kernels};
use crate::gpu::params::{AssignParams, CombineParams, RouteParams, StatsParams};
use crate::gpu::plan::{div_ceil, grid_2d, ForwardPlan};
use crate::gpu::readback::{map_for_reading, Wait};
use crate::gpu::shaders::{MATMUL_BLOCKS, MATMUL_BLOCK_ROWS, MAX_EXPERTS, ROW_LANES_CHOICES};
use crate::output::{num_tokens_of, MoeOutput};
use crate::weights::{LayerShape, MoeWeights};

/// Knobs for building a layer; the defaults suit every use.
#[derive(Clone, Debug, Default)]
pub struct LayerOptions {
    /// Caps the experts per weight shard below what the device allows (its texture array
    /// layers), which splits the expert weights over more shards, each with its own up and
    /// down dispatch (used by tests of the split path, and by the bench's per-expert loop).
    pub max_experts_per_shard: Option<usize>,
    /// Caps the bytes of one activation binding below the device's limit, which makes
    /// large batches run in chunks (used by tests of the chunked path).
    pub max_activation_binding_bytes: Option<u64>,
    /// Forces the lanes along the rows of the expert matmuls' tiles (`ROW_LANES`: 1, 2, 4 or
    /// 8) instead of choosing them from the tokens per expert (for tests and tuning).
    pub row_lanes: Option<u32>,
    /// Forces the rows of each matmul invocation's output block (4, 8 or 16, at most its
    /// side) instead of choosing them from the tokens per expert (for tests and tuning).
    pub block_rows: Option<u32>,
    /// Forces the side of each matmul invocation's output block (8 or 16) instead of
    /// choosing it from the adapter: 16 on CPU adapters, 8 elsewhere (for tests and tuning).
    pub matmul_block: Option<u32>,
    /// Converts f32, f16 and bf16 expert weights to this format at upload (quantizing as
    /// ggml does), so that they take its size on the device. Quantized weights convert only
    /// to their own format.
    pub weight_format: Option<WeightFormat>,
}

/// The matmul block for a device: CPU adapters (lavapipe, llvmpipe, SwiftShader) run each
/// storage load as a loop over their SIMD lanes, so they want the larger block, which
/// feeds twice the FMAs per load; GPUs want the smaller one, which fits in registers.
fn default_matmul_block(device: &wgpu::Device) -> u32 {
    if device.adapter_info().device_type == wgpu::DeviceType::Cpu {
        16
    } else {
        8
    }
}

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

/// Every kernel's `Params` for one forward.
struct KernelParams {
    route: RouteParams,
    assign: AssignParams,
    combine: CombineParams,
    stats: StatsParams,
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

/// What one forward produced (the browser API reads only the output).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
struct Run {
    output: MoeOutput,
    trace: Option<ForwardTrace>,
    gpu_seconds: Option<f64>,
}

/// Scratch buffers with the bind groups that reference them.
struct Workspace {
    scratch: Scratch,
    stage_tokens: wgpu::BindGroup,
    route_tokens: wgpu::BindGroup,
    count_experts: wgpu::BindGroup,
    scan_expert_offsets: wgpu::BindGroup,
    reduce_router_stats: wgpu::BindGroup,
    scatter_assignments: wgpu::BindGroup,
    expert_up: Vec<wgpu::BindGroup>,
    expert_down: Vec<wgpu::BindGroup>,
    combine_outputs: wgpu::BindGroup,
    /// The `Params` this workspace's bind groups read: forwards in flight at the same time
    /// each have their own.
    uniforms: Uniforms,
    timer: Option<PassTimer>,
}

/// A workspace taken from the pool for one forward; dropping it puts it back, on success
/// and on every error path alike.
struct Lease<'a> {
    workspace: Option<Workspace>,
    pool: &'a Mutex<Vec<Workspace>>,
}

impl Lease<'_> {
    fn get(&self) -> &Workspace {
        // Present from construction until drop.
        self.workspace
            .as_ref()
            .expect("a lease holds its workspace until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(workspace), Ok(mut pool)) = (self.workspace.take(), self.pool.lock()) {
            pool.push(workspace);
        }
    }
}

/// GPU timestamps around the forward's compute pass, when the device has them.
struct PassTimer {
    query_set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    nanoseconds_per_tick: f64,
}

/// Uniform buffers, one per `Params` struct written per forward.
struct Uniforms {
    route: wgpu::Buffer,
    assign: wgpu::Buffer,
    combine: wgpu::Buffer,
    stats: wgpu::Buffer,
}

/// A Mixture-of-Experts layer on the GPU.
pub struct MoeLayer {
    device: wgpu::Device,
    queue: wgpu::Queue,
    config: MoeConfig,
    shape: LayerShape,
    limits: wgpu::Limits,
    max_binding_bytes: u64,
    forced_row_lanes: Option<u32>,
    forced_block_rows: Option<u32>,
    matmul_block: u32,
    kernels: Kernels,
    weights: GpuWeights,
    /// The stored formats of W1, W3 and W2 on the device.
    weight_formats: [WeightFormat; 3],
    /// Idle workspaces of `forward` and `forward_async`: a forward takes one (or builds
    /// one when all are in use) and puts it back, so concurrent forwards never share
    /// buffers and no lock is held while the GPU works.
    pool: Mutex<Vec<Workspace>>,
    /// The workspace of `encode_forward`, whose command buffers carry their own Params.
    encoded: Mutex<Option<Workspace>>,
    /// How many times the scratch buffers were (re)allocated.
    scratch_allocations: AtomicUsize,
}

impl MoeLayer {
    /// Uploads `weights` and builds every pipeline on `context`'s device.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(context: &GpuContext, config: MoeConfig, weights: &MoeWeights) -> Result<Self> {
        Self::with_options(context, config, weights, LayerOptions::default())
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_options(
        context: &GpuContext,
        config: MoeConfig,
        weights: &MoeWeights,
        options: LayerOptions,
    ) -> Result<Self> {
        Self::from_device(&context.device, &context.queue, config, weights, options)
    }

    /// Builds the layer on a caller's device and queue.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_device(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        config: MoeConfig,
        weights: &MoeWeights,
        options: LayerOptions,
    ) -> Result<Self> {
        pollster::block_on(Self::from_device_async(
            device, queue, config, weights, options,
        ))
    }

    /// [`MoeLayer::with_options`] without blocking (the only way in a browser).
    pub async fn new_async(
        context: &GpuContext,
        config: MoeConfig,
        weights: &MoeWeights,
        options: LayerOptions,
    ) -> Result<Self> {
        Self::from_device_async(&context.device, &context.queue, config, weights, options).await
    }

    /// [`MoeLayer::from_device`] without blocking.
    pub async fn from_device_async(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        config: MoeConfig,
        weights: &MoeWeights,
        options: LayerOptions,
    ) -> Result<Self> {
        weights.check()?;
        let converted;
        let weights = match options.weight_format {
            Some(format) => {
                converted = weights.converted(format)?;
                &converted
            }
            None => weights,
        };
        let shape = weights.shape;
        config.validate_for_weights(weights)?;
        if let Some(lanes) = options.row_lanes.filter(|l| !ROW_LANES_CHOICES.contains(l)) {
            return Err(MoeError::config(
                "row_lanes",
                format!("{lanes}; the matmul tiles take one of {ROW_LANES_CHOICES:?}"),
            ));
        }
        if let Some(block) = options.matmul_block.filter(|b| !MATMUL_BLOCKS.contains(b)) {
            return Err(MoeError::config(
                "matmul_block",
                format!("{block}; the matmul blocks take one of {MATMUL_BLOCKS:?}"),
            ));
        }
        let matmul_block = options
            .matmul_block
            .unwrap_or_else(|| default_matmul_block(device));
        if let Some(rows) = options
            .block_rows
            .filter(|r| !MATMUL_BLOCK_ROWS.contains(r) || *r > matmul_block)
        {
            return Err(MoeError::config(
                "block_rows",
                format!(
                    "{rows}; the matmul blocks' rows take one of {MATMUL_BLOCK_ROWS:?}, \
                     at most the block's side ({matmul_block})"
                ),
            ));
        }
        if shape.num_experts > MAX_EXPERTS as usize {
            return Err(MoeError::config(
                "n_experts",
                format!(
                    "{} experts; the GPU layer supports at most {MAX_EXPERTS}",
                    shape.num_experts
                ),
            ));
        }
        let limits = device.limits();
        check_required_limits(&limits)?;
        let device_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding_bytes = options
            .max_activation_binding_bytes
            .map_or(device_binding, |cap| cap.min(device_binding));
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let weight_formats = [
            weights.w1.format,
            weights
                .w3
                .as_ref()
                .map_or(weights.w1.format, |w3| w3.format),
            weights.w2.format,
        ];
        let kernels = Kernels::new(device, &config, weight_formats);
        let weights_on_device = GpuWeights::upload(
            device,
            queue,
            weights,
            device_binding,
            options.max_experts_per_shard,
        )?;
        if let Some(error) = scope.pop().await {
            return Err(MoeError::Device {
                message: format!("building the layer: {error}"),
            });
        }
        Ok(MoeLayer {
            device: device.clone(),
            queue: queue.clone(),
            config,
            shape,
            limits,
            max_binding_bytes,
            forced_row_lanes: options.row_lanes,
            forced_block_rows: options.block_rows,
            matmul_block,
            kernels,
            weights: weights_on_device,
            weight_formats,
            pool: Mutex::new(Vec::new()),
            encoded: Mutex::new(None),
            scratch_allocations: AtomicUsize::new(0),
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    pub fn shape(&self) -> LayerShape {
        self.shape
    }

    /// Weight shards (1 unless there are more experts than the device's texture array
    /// layers allow, or `LayerOptions::max_experts_per_shard` asks for fewer).
    /// Device bytes of the weights: the expert matrices in their stored format (with the
    /// few percent of layout padding of `shaders/expert_matmul.wgsl`), the router and the
    /// biases.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes
    }

    /// The stored formats of the expert matrices W1, W3 (W1's when not gated) and W2 on
    /// the device.
    pub fn weight_formats(&self) -> [WeightFormat; 3] {
        self.weight_formats
    }

    pub fn num_weight_shards(&self) -> usize {
        self.weights.shards.len()
    }

    /// Compute dispatches per forward: stage, route, count, scan, stats, scatter, combine,
    /// and one up- and one down-projection per weight shard. It does not depend on the
    /// number of experts.
    pub fn dispatches_per_forward(&self) -> usize {
        7 + 2 * self.weights.shards.len()
    }

    /// How many times forwards had to allocate scratch buffers (a larger batch than any
    /// before); constant in steady state.
    pub fn scratch_allocations(&self) -> usize {
        self.scratch_allocations.load(Ordering::Relaxed)
    }

    /// Bytes of the scratch buffers of the idle workspaces (0 before the first forward).
    pub fn scratch_bytes(&self) -> u64 {
        let pooled: u64 = self
            .pool
            .lock()
            .map(|pool| pool.iter().map(|w| w.scratch.sizes.total_bytes()).sum())
            .unwrap_or(0);
        let encoded = self
            .encoded
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(|w| w.scratch.sizes.total_bytes()))
            .unwrap_or(0);
        pooled + encoded
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

    /// The plan for `num_tokens` tokens, or the device limit it would exceed.
    fn plan(&self, num_tokens: usize) -> Result<ForwardPlan> {
        let plan = ForwardPlan::new(
            &self.config,
            self.shape,
            num_tokens,
            self.matmul_block,
            self.forced_row_lanes,
            self.forced_block_rows,
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
    fn chunk_tokens(&self, num_tokens: usize) -> Result<usize> {
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
    async fn run_chunked(&self, x: &[f32], shape: &[usize], wait: Wait) -> Result<Run> {
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
                .map_err(|e| match e {
                    MoeError::NonFiniteInput { token } => MoeError::NonFiniteInput {
                        token: index * chunk + token,
                    },
                    other => other,
                })?;
            runs.push(run);
        }
        Ok(merge_chunks(runs, shape, self.shape.num_experts))
    }

    async fn run(&self, x: &[f32], shape: &[usize], with_trace: bool, wait: Wait) -> Result<Run> {
        let plan = self.plan(num_tokens_of(shape, x.len(), self.shape.d_model)?)?;
        let oom_scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let idle = self.pool.lock().ok().and_then(|mut pool| pool.pop());
        let lease = Lease {
            workspace: Some(self.fitted(idle, &plan)),
            pool: &self.pool,
        };
        let workspace = lease.get();
        self.write_inputs(workspace, &plan, x);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moe forward"),
            });
        self.encode(&mut encoder, workspace, &plan)?;
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
        let parts = split_words(&words, &sources);
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

    /// `workspace` if its buffers are large enough for `plan`, else one that is (sized for
    /// the larger of the two; `None` builds a first one).
    fn fitted(&self, workspace: Option<Workspace>, plan: &ForwardPlan) -> Workspace {
        let needed = ScratchSizes::for_plan(plan);
        match workspace {
            Some(w) if w.scratch.sizes.max(needed) == w.scratch.sizes => w,
            previous => {
                let sizes = previous.map_or(needed, |w| w.scratch.sizes.max(needed));
                self.scratch_allocations.fetch_add(1, Ordering::Relaxed);
                self.build_workspace(sizes)
            }
        }
    }

    fn build_workspace(&self, sizes: ScratchSizes) -> Workspace {
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
                        vec![
                            shard.params.as_entire_binding(),
                            wgpu::BindingResource::TextureView(&s.x_rows),
                            s.slot_token.as_entire_binding(),
                            s.expert_table.as_entire_binding(),
                            wgpu::BindingResource::TextureView(&shard.w1.quants),
                            wgpu::BindingResource::TextureView(&shard.w1.high),
                            wgpu::BindingResource::TextureView(&shard.w1.scales),
                            wgpu::BindingResource::TextureView(&shard.w3.quants),
                            wgpu::BindingResource::TextureView(&shard.w3.high),
                            wgpu::BindingResource::TextureView(&shard.w3.scales),
                            shard.up_bias.as_entire_binding(),
                            s.hidden.as_entire_binding(),
                        ],
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
                        vec![
                            shard.params.as_entire_binding(),
                            s.hidden.as_entire_binding(),
                            s.expert_table.as_entire_binding(),
                            wgpu::BindingResource::TextureView(&shard.w2.quants),
                            wgpu::BindingResource::TextureView(&shard.w2.high),
                            wgpu::BindingResource::TextureView(&shard.w2.scales),
                            shard.down_bias.as_entire_binding(),
                            s.expert_out.as_entire_binding(),
                        ],
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

    fn write_inputs(&self, workspace: &Workspace, plan: &ForwardPlan, x: &[f32]) {
        self.queue
            .write_buffer(&workspace.scratch.x, 0, bytemuck::cast_slice(x));
        let params = self.params_for(plan);
        for (target, bytes) in initial_writes(workspace, &params) {
            self.queue.write_buffer(target, 0, bytes);
        }
    }

    /// Every kernel's `Params` for `plan`.
    fn params_for(&self, plan: &ForwardPlan) -> KernelParams {
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
                normalize_top_k: self.config.normalize_top_k as u32,
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
                scale_by_prob: self.config.scale_by_prob as u32,
                pass_through: (self.config.drop_policy == DropPolicy::PassThrough) as u32,
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

    /// Encodes a forward of `num_tokens` tokens into the caller's `encoder`, reading `x`
    /// (`[T, D]` f32) from and writing `y` to caller-owned buffers, and, if given, every
    /// statistic to `statistics` (layout: [`StatisticsLayout`]). Nothing is read back: the
    /// caller submits when it likes and finds the first non-finite token, if any, in the
    /// statistics. `x` needs `COPY_SRC`, `y` and `statistics` `COPY_DST`. Batches too large
    /// for one pass are an error here (the blocking forward chunks them).
    pub fn encode_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        statistics: Option<&wgpu::Buffer>,
        num_tokens: usize,
    ) -> Result<()> {
        let plan = self.plan(num_tokens)?;
        let values = (num_tokens * self.shape.d_model * 4) as u64;
        let layout = StatisticsLayout::new(num_tokens, self.config.top_k, self.shape.num_experts);
        let too_small = |name: &str, buffer: &wgpu::Buffer, bytes: u64| {
            (buffer.size() < bytes).then(|| MoeError::InputShape {
                message: format!(
                    "buffer `{name}` holds {} bytes, the forward needs {bytes}",
                    buffer.size()
                ),
            })
        };
        let statistics_error = statistics.and_then(|s| too_small("statistics", s, layout.bytes()));
        if let Some(error) = too_small("x", x, values)
            .or(too_small("y", y, values))
            .or(statistics_error)
        {
            return Err(error);
        }
        let mut guard = self.encoded.lock().map_err(|_| MoeError::Device {
            message: "a previous encode_forward panicked while holding its workspace".to_string(),
        })?;
        let fitted = self.fitted(guard.take(), &plan);
        let workspace = guard.insert(fitted);
        // The Params travel inside the caller's command stream (a queue write would land at
        // the next submit, whoever makes it), from one small buffer: route, assign, combine,
        // stats, then the flag's initial value.
        let params = self.params_for(&plan);
        let writes = initial_writes(workspace, &params);
        let staging = wgpu::util::DeviceExt::create_buffer_init(
            &self.device,
            &wgpu::util::BufferInitDescriptor {
                label: Some("encoded forward params"),
                contents: &writes.map(|(_, bytes)| bytes).concat(),
                usage: wgpu::BufferUsages::COPY_SRC,
            },
        );
        let mut offset = 0u64;
        for (target, bytes) in writes {
            let size = bytes.len() as u64;
            encoder.copy_buffer_to_buffer(&staging, offset, target, 0, size);
            offset += size;
        }
        let scratch = &workspace.scratch;
        encoder.copy_buffer_to_buffer(x, 0, &scratch.x, 0, values);
        self.encode(encoder, workspace, &plan)?;
        encoder.copy_buffer_to_buffer(&scratch.y, 0, y, 0, values);
        if let Some(statistics) = statistics {
            let n = self.shape.num_experts as u64;
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
                encoder.copy_buffer_to_buffer(
                    source,
                    from * 4,
                    statistics,
                    to as u64 * 4,
                    words * 4,
                );
            }
        }
        Ok(())
    }

    fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &Workspace,
        plan: &ForwardPlan,
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
        dispatch(
            &mut pass,
            &k.route_tokens,
            &workspace.route_tokens,
            route_grid,
        );
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
        dispatch(
            &mut pass,
            &k.reduce_router_stats,
            &workspace.reduce_router_stats,
            (1, 1),
        );
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
    fn copy_and_submit(
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

/// One output from the chunks of a batch: tensors concatenated, counts and probability
/// sums added in chunk order (deterministic), the aux loss recomputed from the totals as
/// reduce_router_stats does, the z-loss as the token-weighted mean.
fn merge_chunks(runs: Vec<Run>, shape: &[usize], num_experts: usize) -> Run {
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

/// What every forward writes before its dispatches: each kernel's `Params` into its
/// uniform buffer, and the non-finite flag's initial value (no such token).
fn initial_writes<'a>(
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

/// The limits the kernels rely on (all within WebGPU's defaults), checked up front so that a
/// caller's device with lower ones gets an error naming the limit rather than a pipeline
/// validation error.
fn check_required_limits(limits: &wgpu::Limits) -> Result<()> {
    let required: [(&'static str, u64, u64); 7] = [
        // route_tokens, scan_expert_offsets, scatter_assignments and combine_outputs bind 6
        // storage buffers each.
        (
            "max_storage_buffers_per_shader_stage",
            6,
            limits.max_storage_buffers_per_shader_stage as u64,
        ),
        // The single-workgroup scan and statistics kernels run 256 invocations.
        (
            "max_compute_invocations_per_workgroup",
            256,
            limits.max_compute_invocations_per_workgroup as u64,
        ),
        (
            "max_compute_workgroup_size_x",
            256,
            limits.max_compute_workgroup_size_x as u64,
        ),
        // count_experts' histogram of MAX_EXPERTS u32.
        (
            "max_compute_workgroup_storage_size",
            MAX_EXPERTS as u64 * 4,
            limits.max_compute_workgroup_storage_size as u64,
        ),
        // route_tokens: its params and the router bias.
        (
            "max_uniform_buffers_per_shader_stage",
            2,
            limits.max_uniform_buffers_per_shader_stage as u64,
        ),
        // expert_up binds x's rows, W1 and W3 as textures (route_tokens x's rows and the
        // router).
        (
            "max_sampled_textures_per_shader_stage",
            3,
            limits.max_sampled_textures_per_shader_stage as u64,
        ),
        // stage_tokens writes x's rows.
        (
            "max_storage_textures_per_shader_stage",
            1,
            limits.max_storage_textures_per_shader_stage as u64,
        ),
    ];
    for (limit, needed, allowed) in required {
        if allowed < needed {
            return Err(MoeError::DeviceLimit {
                limit,
                needed,
                allowed,
            });
        }
    }
    Ok(())
}

/// One direct dispatch of `kernel` over a 2-D grid of workgroups.
fn dispatch(
    pass: &mut wgpu::ComputePass<'_>,
    kernel: &Kernel,
    bind_group: &wgpu::BindGroup,
    grid: (u32, u32),
) {
    pass.set_pipeline(&kernel.pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    pass.dispatch_workgroups(grid.0, grid.1, 1);
}

/// Splits `words` into consecutive pieces of the sources' lengths.
fn split_words<'a>(words: &'a [u32], sources: &[(&wgpu::Buffer, usize)]) -> Vec<&'a [u32]> {
    let mut rest = words;
    sources
        .iter()
        .map(|(_, length)| {
            let (head, tail) = rest.split_at((*length).min(rest.len()));
            rest = tail;
            head
        })
        .collect()
}

/// Waits until the first `bytes` of `staging` are mapped and returns them as words.
async fn read_mapped(
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
