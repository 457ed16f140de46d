//! Training on the GPU: a training forward that keeps its workspace (the routing tables,
//! logits, hidden rows and expert outputs the backward reads), then the backward as seven
//! dispatches whatever the number of experts, each output element summed by one invocation
//! in a fixed order (the same bits on every run):
//!
//! 1. gate_backward: dL/dh of the router logits per token, the slots' gate scales
//! 2. expert_hidden_backward: dA (and dV) per kept slot, pre-activations recomputed
//! 3. expert_down_backward: dW2, db2 over each expert's own rows
//! 4. expert_up_backward: dW1, db1 (dW3, db3) over each expert's own rows
//! 5. expert_input_backward: each slot's input gradient through W1ᵀ (and W3ᵀ)
//! 6. router_backward: dWr, dbr over the tokens
//! 7. combine_backward: dx gathered per token
//!
//! Semantics: SPEC "Backward"; the CPU reference is `cpu_backward::backward`.

use crate::cpu_backward::{Gradients, LossCoefficients};
use crate::error::{MoeError, Result};
use crate::gpu::backward_passes::{BackwardScratch, DyFrom};
use crate::gpu::forward::{read_mapped, too_small};
use crate::gpu::layer::MoeLayer;
use crate::gpu::parameters::{Training, TrainingRecord, TrainingState};
use crate::gpu::readback::Wait;
use crate::output::{num_tokens_of, MoeOutput};

impl MoeLayer {
    pub(super) fn training(&self) -> Result<&Training> {
        self.training.as_ref().ok_or_else(|| MoeError::Training {
            message: "the layer was built without `LayerOptions::trainable`".to_string(),
        })
    }

    pub(super) fn training_state(&self) -> Result<std::sync::MutexGuard<'_, TrainingState>> {
        self.training()?
            .state
            .lock()
            .map_err(|_| MoeError::Training {
                message: "a previous training call panicked".to_string(),
            })
    }

    /// Bytes of the backward's own scratch (0 before the first backward): dy, dx and the
    /// per-token router gradients, and per slot the gate scale, dA (dV) and the input
    /// gradient: O(T·(D + N) + T·k·(D + F)).
    pub fn training_scratch_bytes(&self) -> u64 {
        let Ok(state) = self.training_state() else {
            return 0;
        };
        state.scratch.as_ref().map_or(0, BackwardScratch::bytes)
    }

    /// Dispatches of one backward: seven, whatever the number of experts.
    pub fn dispatches_per_backward(&self) -> usize {
        7
    }

    /// A forward that keeps what the backward needs (the layer keeps the last one; the
    /// next [`MoeLayer::backward`] differentiates it). The batch must fit one pass
    /// ([`MoeLayer::max_tokens_per_pass`]); the layer must be trainable.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_train(&self, x: &[f32], shape: &[usize]) -> Result<MoeOutput> {
        pollster::block_on(self.forward_train_with(x, shape, Wait::Block))
    }

    /// [`MoeLayer::forward_train`] without blocking.
    pub async fn forward_train_async(&self, x: &[f32], shape: &[usize]) -> Result<MoeOutput> {
        self.forward_train_with(x, shape, Wait::Yield).await
    }

    async fn forward_train_with(
        &self,
        x: &[f32],
        shape: &[usize],
        wait: Wait,
    ) -> Result<MoeOutput> {
        let plan = self.plan(num_tokens_of(shape, x.len(), self.shape.d_model)?)?;
        // The previous record's workspace is reused; a failed forward keeps no record. No
        // lock is held while the GPU works.
        let previous = {
            let mut state = self.training_state()?;
            state.has_gradients = false;
            state.record.take().map(|record| record.workspace)
        };
        let mut kept = None;
        let run = self
            .run_in(&mut kept, previous, &plan, x, shape, false, wait)
            .await?;
        if let Some(workspace) = kept {
            self.training_state()?.record = Some(TrainingRecord { workspace, plan });
        }
        Ok(run.output)
    }

    /// The gradients of `L = Σ dy ⊙ y + α·aux_loss + β·z_loss` (SPEC "Backward") for the
    /// last [`MoeLayer::forward_train`], with respect to `x` and every weight tensor
    /// (native names and shapes). They also stay on the device for [`MoeLayer::step`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward(&self, dy: &[f32], coefficients: LossCoefficients) -> Result<Gradients> {
        pollster::block_on(self.backward_with(dy, coefficients, Wait::Block))
    }

    /// [`MoeLayer::backward`] without blocking.
    pub async fn backward_async(
        &self,
        dy: &[f32],
        coefficients: LossCoefficients,
    ) -> Result<Gradients> {
        self.backward_with(dy, coefficients, Wait::Yield).await
    }

    async fn backward_with(
        &self,
        dy: &[f32],
        coefficients: LossCoefficients,
        wait: Wait,
    ) -> Result<Gradients> {
        let training = self.training()?;
        // The lock is held while encoding, not while the GPU works: the submitted commands
        // keep their buffers.
        let (scratch, validation, values) = {
            let mut state = self.training_state()?;
            let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("moe backward"),
                });
            let recorded = self.record_backward(
                training,
                &mut state,
                &mut encoder,
                DyFrom::Host(dy),
                coefficients,
            );
            let validation = validation_scope.pop();
            let (scratch, values) = recorded?;
            let dx_bytes = (values * 4) as u64;
            encoder.copy_buffer_to_buffer(&scratch.dx, 0, &scratch.readback, 0, dx_bytes);
            encoder.copy_buffer_to_buffer(
                &training.gradients,
                0,
                &scratch.readback,
                dx_bytes,
                training.layout.bytes(),
            );
            self.queue.submit([encoder.finish()]);
            (scratch, validation, values)
        };
        let total = (values * 4) as u64 + training.layout.bytes();
        let words = read_mapped(&self.device, &scratch.readback, total, wait).await;
        if let Some(error) = validation.await {
            return Err(MoeError::Device {
                message: format!("backward failed: {error}"),
            });
        }
        let floats: Vec<f32> = bytemuck::cast_slice(&words?).to_vec();
        let (dx, flat) = floats.split_at(values);
        let mut state = self.training_state()?;
        state.scratch = Some(scratch);
        state.has_gradients = true;
        Ok(training.layout.gradients(flat, dx.to_vec()))
    }

    /// [`MoeLayer::forward_train`] recorded into the caller's encoder, like
    /// [`MoeLayer::encode_forward`] (caller-owned `x`, `y` and statistics buffers, nothing
    /// read back). The layer keeps the pass for the next backward; a non-finite input shows
    /// only in the statistics, and its backward is then meaningless.
    pub fn encode_forward_train(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        statistics: Option<&wgpu::Buffer>,
        num_tokens: usize,
    ) -> Result<()> {
        let plan = self.plan_encoded(x, y, statistics, num_tokens)?;
        let mut state = self.training_state()?;
        state.has_gradients = false;
        let previous = state.record.take().map(|record| record.workspace);
        let workspace = self.fitted(previous, &plan);
        let recorded = self.encode_forward_in(encoder, &workspace, &plan, x, y, statistics);
        state.record = Some(TrainingRecord { workspace, plan });
        recorded
    }

    /// [`MoeLayer::backward`] recorded into the caller's encoder after an encoded (or host)
    /// training forward: `dy` (`[T, D]` f32, `COPY_SRC`) in, `x`'s gradient to `dx`
    /// (`COPY_DST`); the weights' gradients stay on the device for
    /// [`MoeLayer::encode_step`]. Nothing is read back.
    pub fn encode_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        coefficients: LossCoefficients,
    ) -> Result<()> {
        let training = self.training()?;
        let mut state = self.training_state()?;
        if let Some(plan) = state.record.as_ref().map(|record| record.plan) {
            let bytes = (plan.num_tokens * self.shape.d_model * 4) as u64;
            if let Some(error) = too_small("dx", dx, bytes) {
                return Err(error);
            }
        }
        let (scratch, values) = self.record_backward(
            training,
            &mut state,
            encoder,
            DyFrom::Buffer(dy),
            coefficients,
        )?;
        encoder.copy_buffer_to_buffer(&scratch.dx, 0, dx, 0, (values * 4) as u64);
        state.scratch = Some(scratch);
        state.has_gradients = true;
        Ok(())
    }
}
