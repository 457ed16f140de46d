//! Optimizer steps on a trainable layer's own parameters, in place on the GPU: one
//! dispatch of optimizer_step over the flat parameter buffer with the last backward's
//! gradients, then the forward's operands rewritten from it (the router texture, each f32
//! expert texture, the bias buffers), all in one submission.

use crate::error::{MoeError, Result};
use crate::gpu::buffers::{padded_to_vec4, storage_buffer, uniform_buffer};
use crate::gpu::forward::{dispatch, read_mapped};
use crate::gpu::layer::MoeLayer;
use crate::gpu::parameters::Training;
use crate::gpu::params::{OptimizerParams, RefreshParams};
use crate::gpu::plan::{div_ceil, grid_2d};
use crate::gpu::readback::Wait;
use crate::gpu::shaders::TRAINING_WORKGROUP;
use crate::weights::{LayerShape, MoeWeights};

/// An optimizer and its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `p ← p − lr·(g + weight_decay·p)`.
    Sgd {
        learning_rate: f32,
        weight_decay: f32,
    },
    /// AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias-corrected
    /// moments).
    AdamW {
        learning_rate: f32,
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
    },
}

impl Optimizer {
    /// AdamW with torch's defaults but the learning rate (β = (0.9, 0.999), ε = 1e-8,
    /// weight decay 0.01).
    pub fn adam_w(learning_rate: f32) -> Self {
        Optimizer::AdamW {
            learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.01,
        }
    }

    fn check(&self) -> Result<()> {
        let values: &[(&str, f32)] = match self {
            Optimizer::Sgd {
                learning_rate,
                weight_decay,
            } => &[
                ("learning_rate", *learning_rate),
                ("weight_decay", *weight_decay),
            ],
            Optimizer::AdamW {
                learning_rate,
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => &[
                ("learning_rate", *learning_rate),
                ("beta1", *beta1),
                ("beta2", *beta2),
                ("epsilon", *epsilon),
                ("weight_decay", *weight_decay),
            ],
        };
        for (key, value) in values {
            if !value.is_finite() || *value < 0.0 {
                return Err(MoeError::config(
                    key,
                    format!("{value}: must be finite and ≥ 0"),
                ));
            }
        }
        if let Optimizer::AdamW { beta1, beta2, .. } = self {
            if *beta1 >= 1.0 || *beta2 >= 1.0 {
                return Err(MoeError::config("beta", "β1 and β2 must be below 1"));
            }
        }
        Ok(())
    }

    /// The kernel's params for step `step` (1-based) over `count` parameters.
    fn params(&self, step: u64, count: usize) -> OptimizerParams {
        match *self {
            Optimizer::Sgd {
                learning_rate,
                weight_decay,
            } => OptimizerParams {
                count: count as u32,
                kind: 0,
                learning_rate,
                weight_decay,
                ..Default::default()
            },
            Optimizer::AdamW {
                learning_rate,
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => {
                let step = step.min(i32::MAX as u64) as i32;
                let first_correction = 1.0 - (beta1 as f64).powi(step);
                let second_correction = 1.0 - (beta2 as f64).powi(step);
                OptimizerParams {
                    count: count as u32,
                    kind: 1,
                    learning_rate,
                    weight_decay,
                    beta1,
                    beta2,
                    epsilon,
                    step_size: (learning_rate as f64 / first_correction) as f32,
                    second_moment_correction: second_correction.sqrt() as f32,
                    _pad: [0; 3],
                }
            }
        }
    }
}

/// The optimizer's moments (AdamW; dummies for SGD) and its step count.
pub(super) struct OptimizerState {
    first_moments: wgpu::Buffer,
    second_moments: wgpu::Buffer,
    steps: u64,
    params: wgpu::Buffer,
}

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
        optimizer.check()?;
        let training = self.training()?;
        // The lock is held while encoding, not while waiting.
        let scope = {
            let mut state = self.training_state()?;
            if !state.has_gradients {
                return Err(MoeError::Training {
                    message: "an optimizer step needs a backward first".to_string(),
                });
            }
            let count = training.layout.total;
            let device = &self.device;
            // AdamW keeps two moments per parameter; SGD none (4-byte stand-ins for the
            // bindings). Switching to AdamW starts its moments and step count afresh.
            let floats = match optimizer {
                Optimizer::AdamW { .. } => count,
                Optimizer::Sgd { .. } => 1,
            };
            if state
                .optimizer
                .as_ref()
                .is_none_or(|m| m.first_moments.size() < floats as u64 * 4)
            {
                let zeros = |label| {
                    let usage = wgpu::BufferUsages::COPY_DST;
                    let buffer = storage_buffer(device, label, floats as u64 * 4, usage);
                    let values = vec![0.0f32; floats];
                    self.queue
                        .write_buffer(&buffer, 0, bytemuck::cast_slice(&values));
                    buffer
                };
                state.optimizer = Some(OptimizerState {
                    first_moments: zeros("first moments"),
                    second_moments: zeros("second moments"),
                    steps: 0,
                    params: uniform_buffer(device, "optimizer params", &OptimizerParams::default()),
                });
            }
            let Some(moments) = state.optimizer.as_mut() else {
                return Err(MoeError::Training {
                    message: "optimizer state missing".to_string(),
                });
            };
            moments.steps += 1;
            let params = optimizer.params(moments.steps, count);
            self.queue
                .write_buffer(&moments.params, 0, bytemuck::bytes_of(&params));
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("optimizer step"),
            });
            let max_dim = self.limits.max_compute_workgroups_per_dimension;
            let k = &training.kernels;
            let step_group = k.optimizer_step.bind(
                device,
                &[
                    &moments.params,
                    &training.parameters,
                    &training.gradients,
                    &moments.first_moments,
                    &moments.second_moments,
                ],
            );
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("optimizer step"),
                    timestamp_writes: None,
                });
                let grid = grid_2d(div_ceil(count, TRAINING_WORKGROUP as usize), max_dim)?;
                dispatch(&mut pass, &k.optimizer_step, &step_group, grid);
            }
            self.encode_refresh(&mut encoder, training)?;
            self.queue.submit([encoder.finish()]);
            scope
        };
        if let Some(error) = scope.pop().await {
            return Err(MoeError::Device {
                message: format!("optimizer step failed: {error}"),
            });
        }
        Ok(())
    }

    /// Rewrites the forward's operands from the parameter buffer: the router texture and
    /// bias, each shard's expert textures, and its bias buffers.
    fn encode_refresh(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        training: &Training,
    ) -> Result<()> {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        let layout = &training.layout;
        let device = &self.device;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let k = &training.kernels;
        // (kernel, params, target texture, texels)
        let mut jobs: Vec<(
            &crate::gpu::kernels::Kernel,
            RefreshParams,
            &wgpu::TextureView,
            usize,
        )> = vec![(
            &k.refresh_router_weights,
            RefreshParams {
                rows: n as u32,
                cols: d as u32,
                width: padded_to_vec4(d) as u32,
                num_experts: n as u32,
                tensor_at: layout.router_weight as u32,
                ..Default::default()
            },
            &self.weights.router,
            n * padded_to_vec4(d) / 4,
        )];
        for shard in &self.weights.shards {
            let tensors = [
                (Some(layout.w1), &shard.w1, f, d),
                (layout.w3, &shard.w3, f, d),
                (Some(layout.w2), &shard.w2, d, f),
            ];
            for (at, textures, rows, cols) in tensors {
                let Some(at) = at else { continue };
                let (width, quads) = (padded_to_vec4(cols), padded_to_vec4(rows) / 4);
                let params = RefreshParams {
                    rows: rows as u32,
                    cols: cols as u32,
                    width: width as u32,
                    quads: quads as u32,
                    first_expert: shard.first_expert as u32,
                    num_experts: shard.num_experts as u32,
                    tensor_at: at as u32,
                    _pad: 0,
                };
                let texels = shard.num_experts * quads * width;
                jobs.push((&k.refresh_expert_weights, params, &textures.quants, texels));
            }
        }
        let mut prepared = Vec::with_capacity(jobs.len());
        for (kernel, params, texture, texels) in jobs {
            let uniform = uniform_buffer(device, "refresh params", &params);
            let bind_group = crate::gpu::kernels::bind_resources(
                device,
                kernel.name,
                &kernel.layout,
                vec![
                    uniform.as_entire_binding(),
                    training.parameters.as_entire_binding(),
                    wgpu::BindingResource::TextureView(texture),
                ],
            );
            let grid = grid_2d(div_ceil(texels, TRAINING_WORKGROUP as usize), max_dim)?;
            prepared.push((kernel, bind_group, grid, uniform));
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("refresh weights"),
                timestamp_writes: None,
            });
            for (kernel, bind_group, grid, _) in &prepared {
                dispatch(&mut pass, kernel, bind_group, *grid);
            }
        }
        // Biases: the router's, then per shard b1 (and b3 after it) and b2.
        let floats = |count: usize| (count * 4) as u64;
        if let Some(at) = layout.router_bias {
            encoder.copy_buffer_to_buffer(
                &training.parameters,
                floats(at),
                &self.weights.router_bias,
                0,
                floats(n),
            );
        }
        for shard in &self.weights.shards {
            let (first, count) = (shard.first_expert, shard.num_experts);
            let copies = [
                (layout.b1, &shard.up_bias, 0, f),
                (layout.b3, &shard.up_bias, count * f, f),
                (layout.b2, &shard.down_bias, 0, d),
            ];
            for (at, target, offset, per_expert) in copies {
                if let Some(at) = at {
                    encoder.copy_buffer_to_buffer(
                        &training.parameters,
                        floats(at + first * per_expert),
                        target,
                        floats(offset),
                        floats(count * per_expert),
                    );
                }
            }
        }
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
        let bytes = training.layout.bytes();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("parameters readback"),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("parameters readback"),
            });
        encoder.copy_buffer_to_buffer(&training.parameters, 0, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let words = read_mapped(&self.device, &staging, bytes, wait).await?;
        Ok(training.layout.weights(bytemuck::cast_slice(&words)))
    }
}
