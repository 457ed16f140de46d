//! Optimizer steps on a trainable layer's own parameters, in place on the GPU: the
//! optimizer pass over every parameter buffer (the router's, each shard's) with the last
//! backward's gradients, then the refresh pass rewriting the forward's operands from them,
//! all in one submission; and the optimizer's state and the weights read back or replaced.

use crate::cpu_routing::balance_score_bias;
use crate::error::{MoeError, Result};
use crate::gpu::device::encode::{div_ceil, grid_2d};
use crate::gpu::device::readback::{read_floats, Wait};
use crate::gpu::kernels::shaders::TRAINING_WORKGROUP;
use crate::gpu::layer::moe_layer::MoeLayer;
use crate::gpu::passes;
use crate::gpu::plan::optimizer::{AdamWState, Optimizer};
use crate::gpu::plan::parameters::ParameterLayout;
use crate::gpu::plan::shared_experts::with_shared_as_experts;
use crate::gpu::resources::optimizer_state::OptimizerState;
use crate::gpu::resources::weights::score_bias_values;
use crate::weights::MoeWeights;

impl MoeLayer {
    /// One optimizer step with the last backward's gradients, on the layer's own f32
    /// parameters in place; later forwards use the updated weights. AdamW's moments live
    /// on the device with the layer (zeros before the first step).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step(&self, optimizer: &Optimizer) -> Result<()> {
        pollster::block_on(self.step_async(optimizer))
    }

    /// [`MoeLayer::step`] without blocking on the host (the work is submitted; the next
    /// forward runs after it).
    pub async fn step_async(&self, optimizer: &Optimizer) -> Result<()> {
        // The lock is held while encoding, not while waiting.
        let scope = {
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("optimizer step"),
                });
            let recorded = self.encode_step(&mut encoder, optimizer);
            if recorded.is_ok() {
                self.queue.submit([encoder.finish()]);
            }
            let scope = scope.pop();
            recorded?;
            scope
        };
        if let Some(error) = scope.await {
            return Err(MoeError::Device {
                message: format!("optimizer step failed: {error}"),
            });
        }
        Ok(())
    }

    /// [`MoeLayer::step`] recorded into the caller's encoder (after an encoded or host
    /// backward): its Params travel inside the command stream, so it runs in the order
    /// the caller submits.
    pub fn encode_step(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        optimizer: &Optimizer,
    ) -> Result<()> {
        optimizer.check()?;
        let training = self.training()?;
        let mut state = self.training_state()?;
        if !state.has_gradients {
            return Err(MoeError::Training {
                message: "an optimizer step needs a backward first".to_string(),
            });
        }
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let counts = training.shards.buffer_floats();
        let grids = counts
            .iter()
            .map(|&count| grid_2d(div_ceil(count / 4, TRAINING_WORKGROUP as usize), max_dim))
            .collect::<Result<Vec<_>>>()?;
        // AdamW keeps two moments per parameter; SGD none (one-vec4 stand-ins for the
        // bindings). Switching to AdamW starts its moments and step count afresh.
        let floats: Vec<usize> = match optimizer {
            Optimizer::AdamW { .. } => counts.clone(),
            Optimizer::Sgd { .. } => vec![4; counts.len()],
        };
        if state.optimizer.as_ref().is_some_and(|m| {
            m.buffers
                .iter()
                .zip(&floats)
                .any(|(b, &floats)| b.first_moments.size() < floats as u64 * 4)
        }) {
            state.optimizer = None;
        }
        let device = (&self.device, &self.queue);
        let moments = state
            .optimizer
            .get_or_insert_with(|| OptimizerState::new(device, training.step_targets(), &floats));
        if matches!(optimizer, Optimizer::AdamW { .. }) {
            moments.adam_w_steps += 1;
        }
        let params: Vec<_> = counts
            .iter()
            .map(|&count| optimizer.kernel_params(moments.adam_w_steps, count))
            .collect();
        let step_kernel = (&self.device, &training.kernels.optimizer_step);
        passes::optimizer::encode(encoder, step_kernel, moments, &params, &grids);
        passes::refresh::encode(encoder, &training.kernels, &training.refresh);
        Ok(())
    }

    /// AdamW's state (`None` before the first AdamW step), read back from the device.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn adam_w_state(&self) -> Result<Option<AdamWState>> {
        pollster::block_on(self.adam_w_state_with(Wait::Block))
    }

    /// [`MoeLayer::adam_w_state`] without blocking.
    pub async fn adam_w_state_async(&self) -> Result<Option<AdamWState>> {
        self.adam_w_state_with(Wait::Yield).await
    }

    async fn adam_w_state_with(&self, wait: Wait) -> Result<Option<AdamWState>> {
        let training = self.training()?;
        let (moments, steps) = {
            let state = self.training_state()?;
            match state.optimizer.as_ref() {
                Some(m) if m.adam_w_steps > 0 => (
                    m.buffers
                        .iter()
                        .map(|b| (b.first_moments.clone(), b.second_moments.clone()))
                        .collect::<Vec<_>>(),
                    m.adam_w_steps,
                ),
                _ => return Ok(None),
            }
        };
        let counts = training.shards.buffer_floats();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for ((first_buffer, second_buffer), &count) in moments.iter().zip(&counts) {
            first.push(read_floats(&self.device, &self.queue, first_buffer, count, wait).await?);
            second.push(read_floats(&self.device, &self.queue, second_buffer, count, wait).await?);
        }
        Ok(Some(AdamWState {
            first_moments: training.shards.join(&first),
            second_moments: training.shards.join(&second),
            steps,
        }))
    }

    /// Resumes AdamW from a saved state: the next AdamW step continues it exactly.
    pub fn set_adam_w_state(&self, saved: &AdamWState) -> Result<()> {
        let training = self.training()?;
        let total = training.layout().total;
        for (name, moments) in [
            ("first_moments", &saved.first_moments),
            ("second_moments", &saved.second_moments),
        ] {
            if moments.len() != total {
                return Err(MoeError::Training {
                    message: format!(
                        "AdamW state: {name} holds {} values, the layer has {total} parameters",
                        moments.len()
                    ),
                });
            }
        }
        let first = training.shards.split(&saved.first_moments);
        let second = training.shards.split(&saved.second_moments);
        let device = (&self.device, &self.queue);
        let targets = training.step_targets();
        let state = OptimizerState::with_moments(device, targets, (&first, &second), saved.steps);
        self.training_state()?.optimizer = Some(state);
        Ok(())
    }

    /// Replaces a trainable layer's weights in place (the same shape and tensors): the
    /// flat parameters uploaded and the forward's operands rewritten from them, as after
    /// a step. For training driven by another optimizer (a torch one, say).
    pub fn set_weights(&self, weights: &MoeWeights) -> Result<()> {
        let training = self.training()?;
        weights.check()?;
        if weights.shared.is_some() != self.shared.is_some() {
            return Err(MoeError::tensor(
                "shared.w1",
                "present in only one of the new weights and the layer's",
            ));
        }
        // On the device a shared expert rides as experts after the routed ones.
        let expanded = with_shared_as_experts(weights)?;
        let weights = expanded.as_ref().map_or(weights, |(expanded, _)| expanded);
        let layout = ParameterLayout::new(weights, expanded.as_ref().map(|(_, s)| *s))?;
        let held = training.layout();
        if layout != *held {
            return Err(MoeError::tensor(
                "weights",
                format!(
                    "{:?} with {} parameters, but the layer holds {:?} with {}",
                    layout.shape, layout.total, held.shape, held.total
                ),
            ));
        }
        if weights.score_bias.is_some() != self.weights.has_score_bias {
            return Err(MoeError::tensor(
                "router.score_bias",
                "present in only one of the new weights and the layer's",
            ));
        }
        training.write_parameters(&self.queue, &layout.flatten(weights));
        let score_bias = score_bias_values(weights);
        self.queue.write_buffer(
            &self.weights.score_bias,
            0,
            bytemuck::cast_slice(&score_bias),
        );
        if let (Some(bias), Ok(mut held)) = (&weights.score_bias, self.score_bias.lock()) {
            held.clone_from(bias);
        }
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("set weights"),
            });
        passes::refresh::encode(&mut encoder, &training.kernels, &training.refresh);
        self.queue.submit([encoder.finish()]);
        Ok(())
    }

    /// DeepSeek-V3's aux-loss-free balancing, one step (after an optimizer step, with the
    /// `counts` of the batch it trained on): `score_bias[e] += γ·sign(mean(counts) −
    /// counts[e])` (cpu_routing::balance_score_bias), on the device before the next
    /// forward. The layer needs a `router.score_bias` (zeros to start); `γ = 0` is off.
    pub fn balance_score_bias(&self, counts: &[u32], gamma: f32) -> Result<()> {
        if !self.weights.has_score_bias {
            return Err(MoeError::tensor(
                "router.score_bias",
                "balancing moves the score bias: give the layer one (zeros to start)",
            ));
        }
        if !(gamma.is_finite() && gamma >= 0.0) {
            return Err(MoeError::config(
                "bias_balancing",
                format!("{gamma}: must be finite and ≥ 0"),
            ));
        }
        let n = self.shape.num_experts;
        if counts.len() != n {
            return Err(MoeError::tensor(
                "counts",
                format!("{} values, expected one per expert ({n})", counts.len()),
            ));
        }
        let mut bias = self.score_bias.lock().map_err(|_| MoeError::Device {
            message: "a previous balance_score_bias panicked".to_string(),
        })?;
        balance_score_bias(&mut bias, counts, gamma);
        // The first N of the uniform array's MAX_EXPERTS floats (the rest stay zeros).
        self.queue
            .write_buffer(&self.weights.score_bias, 0, bytemuck::cast_slice(&bias));
        Ok(())
    }

    /// The layer's current weights (after any optimizer steps), read back from the device.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn trained_weights(&self) -> Result<MoeWeights> {
        pollster::block_on(self.trained_weights_with(Wait::Block))
    }

    /// [`MoeLayer::trained_weights`] without blocking.
    pub async fn trained_weights_async(&self) -> Result<MoeWeights> {
        self.trained_weights_with(Wait::Yield).await
    }

    async fn trained_weights_with(&self, wait: Wait) -> Result<MoeWeights> {
        let training = self.training()?;
        let mut buffers = Vec::with_capacity(training.parameters.len());
        for (buffer, count) in training
            .parameters
            .iter()
            .zip(training.shards.buffer_floats())
        {
            buffers.push(read_floats(&self.device, &self.queue, buffer, count, wait).await?);
        }
        let mut weights = training.layout().weights(&training.shards.join(&buffers));
        // The score bias is no parameter: the layer's host copy is what the device holds.
        if self.weights.has_score_bias {
            let bias = self.score_bias.lock().map_err(|_| MoeError::Device {
                message: "a previous balance_score_bias panicked".to_string(),
            })?;
            weights.score_bias = Some(bias.clone());
        }
        Ok(weights)
    }
}
