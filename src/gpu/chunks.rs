//! Batches beyond a device limit: the plan of one pass and its limits, and the split of a
//! batch into exact chunks (whole capacity groups, or any tokens when nothing is dropped)
//! whose statistics are merged.

use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::gpu::buffers::{max_x_rows, ScratchSizes};
use crate::gpu::forward::Run;
use crate::gpu::layer::MoeLayer;
use crate::gpu::plan::ForwardPlan;
use crate::gpu::readback::Wait;
use crate::output::{num_tokens_of, MoeOutput};

impl MoeLayer {
    /// The plan for `num_tokens` tokens, or the device limit it would exceed.
    pub(super) fn plan(&self, num_tokens: usize) -> Result<ForwardPlan> {
        self.plan_with(&self.config, num_tokens)
    }

    /// [`MoeLayer::plan`] under `config` (the experts-only pass plans with its own).
    pub(super) fn plan_with(&self, config: &MoeConfig, num_tokens: usize) -> Result<ForwardPlan> {
        let plan = ForwardPlan::new(
            config,
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
    pub(super) fn chunk_tokens(&self, num_tokens: usize) -> Result<usize> {
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
    pub(super) async fn run_chunked(&self, x: &[f32], shape: &[usize], wait: Wait) -> Result<Run> {
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
}

/// One output from the chunks of a batch: tensors concatenated, counts and probability
/// sums added in chunk order (deterministic), the aux loss recomputed from the totals as
/// reduce_router_stats does, the z-loss as the token-weighted mean.
pub(super) fn merge_chunks(runs: Vec<Run>, shape: &[usize], num_experts: usize) -> Run {
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
