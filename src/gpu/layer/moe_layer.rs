//! `MoeLayer`: a layer on the GPU, built once (weights uploaded, pipelines compiled, the
//! device's limits checked), what it reports of itself, and the workspaces it leases to
//! its passes. The calls that run it are in this folder's other files: `inference.rs`
//! (forward, its plan, chunks beyond a device limit), `encoded.rs` (a forward into the
//! caller's encoder), `experts.rs` (the experts alone), `training.rs` (the training
//! forward), `backward.rs` (the backward), `optimizer.rs` (steps and weights).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::formats::WeightFormat;
use crate::gpu::device::context::GpuContext;
use crate::gpu::device::shared_values::SharedValues;
use crate::gpu::kernels::shaders::{
    MATMUL_BLOCKS, MATMUL_BLOCK_ROWS, MAX_EXPERTS, ROW_LANES_CHOICES,
};
use crate::gpu::kernels::{ForwardKey, Kernels};
use crate::gpu::plan::forward::ForwardPlan;
use crate::gpu::plan::parameter_shards::ParameterShards;
use crate::gpu::plan::parameters::ParameterLayout;
use crate::gpu::plan::shared_experts::{
    check_trainable as check_trainable_shared, with_shared_as_experts, SharedExperts,
};
use crate::gpu::plan::sizes::ScratchSizes;
use crate::gpu::resources::training::Training;
use crate::gpu::resources::weights::GpuWeights;
use crate::gpu::resources::workspace::Workspace;
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
    /// Keeps the layer's parameters trainable on the device: a flat f32 copy of every
    /// tensor (and as much again for the gradients) that `forward_train`, `backward` and
    /// `step` use, and forward weights an optimizer step can rewrite. Needs f32 expert
    /// weights.
    pub trainable: bool,
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

/// A Mixture-of-Experts layer on the GPU.
pub struct MoeLayer {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) config: MoeConfig,
    /// The routed experts' shape (what the caller gave).
    pub(crate) shape: LayerShape,
    /// The shared expert's slices after the routed experts on the device, if any.
    pub(crate) shared: Option<SharedExperts>,
    pub(crate) limits: wgpu::Limits,
    pub(crate) max_binding_bytes: u64,
    pub(crate) forced_row_lanes: Option<u32>,
    pub(crate) forced_block_rows: Option<u32>,
    pub(crate) matmul_block: u32,
    /// The layer's pipelines, shared with the device's other layers of the same key.
    pub(crate) kernels: Arc<Kernels>,
    pub(crate) weights: GpuWeights,
    /// The stored formats of W1, W3 and W2 on the device.
    pub(crate) weight_formats: [WeightFormat; 3],
    /// Idle workspaces of `forward` and `forward_async`: a forward takes one (or builds
    /// one when all are in use) and puts it back, so concurrent forwards never share
    /// buffers and no lock is held while the GPU works.
    pub(crate) pool: Mutex<Vec<Workspace>>,
    /// The workspace of `encode_forward`, whose command buffers carry their own Params.
    pub(crate) encoded: Mutex<Option<Workspace>>,
    /// How many times the scratch buffers were (re)allocated.
    pub(crate) scratch_allocations: AtomicUsize,
    /// The parameters, gradients and state of training (trainable layers only).
    pub(crate) training: Option<Training>,
    /// The host's copy of the score bias the device holds (balance_score_bias updates
    /// both), zeros when the layer has none.
    pub(crate) score_bias: Mutex<Vec<f32>>,
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
        pollster::block_on(Self::new_async(context, config, weights, options))
    }

    /// Builds the layer on a caller's device and queue (its pipelines its own: layers
    /// built on one `GpuContext` share theirs).
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
        let (device, queue) = (&context.device, &context.queue);
        Self::build((device, queue, &context.shared), config, weights, options).await
    }

    /// [`MoeLayer::from_device`] without blocking.
    pub async fn from_device_async(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        config: MoeConfig,
        weights: &MoeWeights,
        options: LayerOptions,
    ) -> Result<Self> {
        let shared = SharedValues::new();
        Self::build((device, queue, &shared), config, weights, options).await
    }

    /// The layer on `device`, with the pipelines its context's layers share.
    async fn build(
        (device, queue, shared_values): (&wgpu::Device, &wgpu::Queue, &SharedValues),
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
        if options.trainable {
            check_trainable_shared(weights)?;
        }
        // The shared expert rides the grouped dispatch as experts after the routed ones.
        let expanded = with_shared_as_experts(weights)?;
        let shared = expanded.as_ref().map(|(_, shared)| *shared);
        let weights = expanded.as_ref().map_or(weights, |(expanded, _)| expanded);
        if weights.shape.num_experts > MAX_EXPERTS as usize {
            return Err(MoeError::config(
                "n_experts",
                format!(
                    "{} experts (with the shared expert's slices); the GPU layer supports at \
                     most {MAX_EXPERTS}",
                    weights.shape.num_experts
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
        // A trainable layer keeps each weight shard's parameters (and gradients, and
        // AdamW's moments) in one binding: shards hold no more experts than fit.
        let mut max_experts_per_shard = options.max_experts_per_shard;
        if options.trainable {
            let layout = ParameterLayout::new(weights, shared)?;
            let expert_bytes = ParameterShards::expert_floats(&layout) as u64 * 4;
            if expert_bytes > device_binding {
                return Err(MoeError::DeviceLimit {
                    limit: "max_storage_buffer_binding_size (one expert's trainable parameters)",
                    needed: expert_bytes,
                    allowed: device_binding,
                });
            }
            let fitting = (device_binding / expert_bytes.max(1)) as usize;
            max_experts_per_shard = Some(max_experts_per_shard.map_or(fitting, |m| m.min(fitting)));
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let weight_formats = [
            weights.w1.format,
            weights
                .w3
                .as_ref()
                .map_or(weights.w1.format, |w3| w3.format),
            weights.w2.format,
        ];
        let key = ForwardKey::new(&config, weight_formats, options.trainable);
        let kernels = Kernels::shared(shared_values, device, &key);
        let weights_on_device = GpuWeights::upload(
            device,
            queue,
            weights,
            device_binding,
            max_experts_per_shard,
            options.trainable,
        )?;
        let training = if options.trainable {
            Some(Training::new(
                (device, queue, shared_values),
                &config,
                (weights, shared),
                &weights_on_device,
                (device_binding, matmul_block),
            )?)
        } else {
            None
        };
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
            shared,
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
            training,
            score_bias: Mutex::new(
                weights
                    .score_bias
                    .clone()
                    .unwrap_or_else(|| vec![0.0; shape.num_experts]),
            ),
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    pub fn shape(&self) -> LayerShape {
        self.shape
    }

    /// Device bytes of the weights: the expert matrices in their stored format (with the
    /// few percent of layout padding of `shaders/expert_matmul.wgsl`), the router and the
    /// biases.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes
    }

    /// Whether the layer was built trainable (`LayerOptions::trainable`).
    pub fn is_trainable(&self) -> bool {
        self.training.is_some()
    }

    /// The stored formats of the expert matrices W1, W3 (W1's when not gated) and W2 on
    /// the device.
    pub fn weight_formats(&self) -> [WeightFormat; 3] {
        self.weight_formats
    }

    /// Weight shards (1 unless there are more experts than the device's texture array
    /// layers allow, or `LayerOptions::max_experts_per_shard` asks for fewer).
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

    /// `workspace` if its buffers are large enough for `plan`, else one that is (sized for
    /// the larger of the two; `None` builds a first one).
    pub(crate) fn fitted(&self, workspace: Option<Workspace>, plan: &ForwardPlan) -> Workspace {
        let needed = ScratchSizes::for_plan(plan);
        match workspace {
            Some(w) if w.scratch.sizes.max(needed) == w.scratch.sizes => w,
            previous => {
                let sizes = previous.map_or(needed, |w| w.scratch.sizes.max(needed));
                let id = self.scratch_allocations.fetch_add(1, Ordering::Relaxed);
                Workspace::new(
                    (&self.device, &self.queue),
                    (&*self.kernels, &self.weights),
                    self.shape,
                    sizes,
                    id,
                )
            }
        }
    }
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
        // route_tokens: its params, the router bias and the score bias.
        (
            "max_uniform_buffers_per_shader_stage",
            3,
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
