//! Optimizer steps on a trainable layer's own parameters, in place on the GPU: one
//! dispatch of optimizer_step over the flat parameter buffer with the last backward's
//! gradients, then the forward's operands rewritten from it (the router texture, each f32
//! expert texture, the bias buffers), all in one submission.

use crate::error::{MoeError, Result};
use crate::gpu::buffers::{storage_buffer, uniform_buffer};
use crate::gpu::encoded::encode_writes;
use crate::gpu::forward::{dispatch, read_mapped};
use crate::gpu::layer::MoeLayer;
use crate::gpu::parameters::{ParameterLayout, Training};
use crate::gpu::params::OptimizerParams;
use crate::gpu::plan::{div_ceil, grid_2d};
use crate::gpu::readback::Wait;
use crate::gpu::shaders::TRAINING_WORKGROUP;
use crate::weights::MoeWeights;

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

    /// optimizer_step's params for AdamW step `step` (1-based) over `count` parameters:
    /// the bias corrections computed here, in f64, once per step.
    pub fn kernel_params(&self, step: u64, count: usize) -> OptimizerParams {
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

/// AdamW's state on a layer, to save and to resume training exactly: both moments in the
/// layer's flat parameter order (router.weight, router.bias, w1, b1, w2, b2, w3, b3, each
/// present tensor in its native layout: `gpu::parameters::ParameterLayout`) and the steps
/// taken (for the bias corrections).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    pub first_moments: Vec<f32>,
    pub second_moments: Vec<f32>,
    pub steps: u64,
}

/// The optimizer's moments (AdamW; dummies for SGD), its AdamW step count (for the bias
/// corrections), and the step's params and bind group, built once.
pub(super) struct OptimizerState {
    first_moments: wgpu::Buffer,
    second_moments: wgpu::Buffer,
    adam_w_steps: u64,
    params: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
}

impl OptimizerState {
    /// Zero moments of `floats` floats each.
    fn new(layer: &MoeLayer, training: &Training, floats: usize) -> Self {
        let zeros = vec![0.0f32; floats];
        Self::with_moments(layer, training, (&zeros, &zeros), 0)
    }

    /// The given moments, after `adam_w_steps` AdamW steps.
    fn with_moments(
        layer: &MoeLayer,
        training: &Training,
        (first, second): (&[f32], &[f32]),
        adam_w_steps: u64,
    ) -> Self {
        let device = &layer.device;
        let holding = |label, values: &[f32]| {
            let usage = wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
            let buffer = storage_buffer(device, label, values.len() as u64 * 4, usage);
            layer
                .queue
                .write_buffer(&buffer, 0, bytemuck::cast_slice(values));
            buffer
        };
        let first_moments = holding("first moments", first);
        let second_moments = holding("second moments", second);
        let params = uniform_buffer(device, "optimizer params", &OptimizerParams::default());
        let bind_group = training.kernels.optimizer_step.bind(
            device,
            &[
                &params,
                &training.parameters,
                &training.gradients,
                &first_moments,
                &second_moments,
            ],
        );
        OptimizerState {
            first_moments,
            second_moments,
            adam_w_steps,
            params,
            bind_group,
        }
    }
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
        let count = training.layout.total;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let grid = grid_2d(div_ceil(count, TRAINING_WORKGROUP as usize), max_dim)?;
        // AdamW keeps two moments per parameter; SGD none (4-byte stand-ins for the
        // bindings). Switching to AdamW starts its moments and step count afresh.
        let floats = match optimizer {
            Optimizer::AdamW { .. } => count,
            Optimizer::Sgd { .. } => 1,
        };
        if state
            .optimizer
            .as_ref()
            .is_some_and(|m| m.first_moments.size() < floats as u64 * 4)
        {
            state.optimizer = None;
        }
        let moments = state
            .optimizer
            .get_or_insert_with(|| OptimizerState::new(self, training, floats));
        if matches!(optimizer, Optimizer::AdamW { .. }) {
            moments.adam_w_steps += 1;
        }
        let params = optimizer.kernel_params(moments.adam_w_steps, count);
        encode_writes(
            &self.device,
            encoder,
            "optimizer params",
            &[(&moments.params, bytemuck::bytes_of(&params))],
        );
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("optimizer step"),
                timestamp_writes: None,
            });
            dispatch(
                &mut pass,
                &training.kernels.optimizer_step,
                &moments.bind_group,
                grid,
            );
        }
        training
            .refresh
            .encode(encoder, &training.kernels, &training.parameters);
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
        let (first, second, steps) = {
            let state = self.training_state()?;
            match state.optimizer.as_ref() {
                Some(m) if m.adam_w_steps > 0 => (
                    m.first_moments.clone(),
                    m.second_moments.clone(),
                    m.adam_w_steps,
                ),
                _ => return Ok(None),
            }
        };
        let total = training.layout.total;
        Ok(Some(AdamWState {
            first_moments: self.read_floats(&first, total, wait).await?,
            second_moments: self.read_floats(&second, total, wait).await?,
            steps,
        }))
    }

    /// Resumes AdamW from a saved state: the next AdamW step continues it exactly.
    pub fn set_adam_w_state(&self, saved: &AdamWState) -> Result<()> {
        let training = self.training()?;
        let total = training.layout.total;
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
        let moments = (&saved.first_moments[..], &saved.second_moments[..]);
        let state = OptimizerState::with_moments(self, training, moments, saved.steps);
        self.training_state()?.optimizer = Some(state);
        Ok(())
    }

    /// The first `floats` floats of `buffer` (which needs COPY_SRC), read back.
    async fn read_floats(
        &self,
        buffer: &wgpu::Buffer,
        floats: usize,
        wait: Wait,
    ) -> Result<Vec<f32>> {
        let bytes = (floats * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("training read-back"),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("training read-back"),
            });
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let words = read_mapped(&self.device, &staging, bytes, wait).await?;
        Ok(bytemuck::cast_slice(&words).to_vec())
    }

    /// Replaces a trainable layer's weights in place (the same shape and tensors): the
    /// flat parameters uploaded and the forward's operands rewritten from them, as after
    /// a step. For training driven by another optimizer (a torch one, say).
    pub fn set_weights(&self, weights: &MoeWeights) -> Result<()> {
        let training = self.training()?;
        weights.check()?;
        let layout = ParameterLayout::new(weights)?;
        if layout != training.layout {
            return Err(MoeError::tensor(
                "weights",
                format!(
                    "{:?} with {} parameters, but the layer holds {:?} with {}",
                    layout.shape, layout.total, training.layout.shape, training.layout.total
                ),
            ));
        }
        self.queue.write_buffer(
            &training.parameters,
            0,
            bytemuck::cast_slice(&layout.flatten(weights)),
        );
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("set weights"),
            });
        training
            .refresh
            .encode(&mut encoder, &training.kernels, &training.parameters);
        self.queue.submit([encoder.finish()]);
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
        let flat = self
            .read_floats(&training.parameters, training.layout.total, wait)
            .await?;
        Ok(training.layout.weights(&flat))
    }
}
