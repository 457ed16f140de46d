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

use crate::cpu_backward::LossCoefficients;
use crate::error::{MoeError, Result};
use crate::gpu::backward_passes::{BackwardScratch, DyFrom};
use crate::gpu::buffers::padded_to_vec4;
use crate::gpu::encoded::too_small;
use crate::gpu::forward::{read_mapped, split_words, Routing};
use crate::gpu::layer::MoeLayer;
use crate::gpu::parameters::{Training, TrainingRecord, TrainingState};
use crate::gpu::readback::Wait;
use crate::gradients::Gradients;
use crate::output::{num_tokens_of, MoeOutput};

/// The buffers one backward read and wrote, read back for tests and debugging (slots:
/// the training forward's slot bound; only kept slots hold meaningful values).
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardTrace {
    /// Of the training forward: `[T, N]` router logits (unwritten, so stale, after a
    /// pre-routed forward).
    pub logits: Vec<f32>,
    /// `[T, k]`: the slot of every assignment, or `u32::MAX` if dropped.
    pub assignment_slot: Vec<u32>,
    /// `[slots]`: the token of every slot.
    pub slot_token: Vec<u32>,
    /// counts [N] | kept [N] | tile_start [N + 1] | n_dropped | tile_expert [tiles].
    pub expert_table: Vec<u32>,
    /// Rows of a matmul tile: expert e's slots are `tile_start[e]·row_tile + [0, kept[e])`.
    pub row_tile: usize,
    /// `[slots, F]`: the expert hidden rows H.
    pub hidden: Vec<f32>,
    /// `[slots, D]`: the expert outputs O (before the gate).
    pub expert_out: Vec<f32>,
    /// Of the backward: `[T, N]` dL/dh of the logits (gate_backward); after a pre-routed
    /// forward, dL/dw of the caller's weights in each row's first k columns.
    pub d_logits: Vec<f32>,
    /// `[slots]`: each kept slot's gate scale s (dO = s·dy).
    pub slot_scale: Vec<f32>,
    /// `[T]`: π of a token that passed through, else 0.
    pub pass_scale: Vec<f32>,
    /// `[slots, F]`: dA (expert_hidden_backward), and dV when gated.
    pub d_a: Vec<f32>,
    pub d_v: Option<Vec<f32>>,
    /// `[slots, D]`: each slot's input gradient (expert_input_backward).
    pub d_x_slot: Vec<f32>,
}

/// What a host backward read back.
pub(super) struct BackwardRead {
    pub(super) gradients: Gradients,
    pub(super) trace: Option<BackwardTrace>,
    /// `[T, k]` after a pre-routed forward: dL/dw of the caller's weights.
    pub(super) top_k_weights: Option<Vec<f32>>,
}

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
            self.training_state()?.record = Some(TrainingRecord {
                workspace,
                plan,
                routing: Routing::Router,
            });
        }
        Ok(run.output)
    }

    /// The gradients of `L = Σ dy ⊙ y + α·aux_loss + β·z_loss` (SPEC "Backward") for the
    /// last [`MoeLayer::forward_train`], with respect to `x` and every weight tensor
    /// (native names and shapes). They also stay on the device for [`MoeLayer::step`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward(&self, dy: &[f32], coefficients: LossCoefficients) -> Result<Gradients> {
        let run = self.run_backward(dy, Routing::Router, None, coefficients, false, Wait::Block);
        Ok(pollster::block_on(run)?.gradients)
    }

    /// [`MoeLayer::backward`] with the caller's gradient of `route_prob_sum` too (`[N]`:
    /// `L` gains `Σ_e g[e]·route_prob_sum[e]`), as a torch graph that uses it passes it.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward_with_prob_sum_grad(
        &self,
        dy: &[f32],
        route_prob_sum_grad: &[f32],
        coefficients: LossCoefficients,
    ) -> Result<Gradients> {
        let gradient = Some(route_prob_sum_grad);
        let routing = Routing::Router;
        let run = self.run_backward(dy, routing, gradient, coefficients, false, Wait::Block);
        Ok(pollster::block_on(run)?.gradients)
    }

    /// [`MoeLayer::backward`] without blocking.
    pub async fn backward_async(
        &self,
        dy: &[f32],
        coefficients: LossCoefficients,
    ) -> Result<Gradients> {
        let run = self.run_backward(dy, Routing::Router, None, coefficients, false, Wait::Yield);
        Ok(run.await?.gradients)
    }

    /// Like [`MoeLayer::backward`], also reading back the backward's intermediate buffers
    /// and the training forward's tables they used.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward_with_trace(
        &self,
        dy: &[f32],
        coefficients: LossCoefficients,
    ) -> Result<(Gradients, BackwardTrace)> {
        let run = self.run_backward(dy, Routing::Router, None, coefficients, true, Wait::Block);
        let BackwardRead {
            gradients, trace, ..
        } = pollster::block_on(run)?;
        let trace = trace.ok_or_else(|| MoeError::Device {
            message: "trace requested but not read back".to_string(),
        })?;
        Ok((gradients, trace))
    }

    /// The host backward: records, submits, reads back `dx` and the weights' gradients,
    /// and the trace (`with_trace`) or, after a pre-routed forward, dL/dw.
    pub(super) async fn run_backward(
        &self,
        dy: &[f32],
        routing: Routing,
        route_prob_sum_grad: Option<&[f32]>,
        coefficients: LossCoefficients,
        with_trace: bool,
        wait: Wait,
    ) -> Result<BackwardRead> {
        let training = self.training()?;
        let words = training.layout.total;
        // The lock is held while encoding, not while the GPU works: the submitted commands
        // keep their buffers.
        let (scratch, staging, validation, plan, lengths, total) = {
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
                (DyFrom::Host(dy), routing),
                (route_prob_sum_grad, coefficients),
            );
            let (scratch, values) = match recorded {
                Ok(recorded) => recorded,
                Err(error) => {
                    drop(validation_scope.pop());
                    return Err(error);
                }
            };
            let mut sources = vec![(&scratch.dx, values), (&training.gradients, words)];
            let record = state.record.as_ref();
            let plan = record.map(|r| r.plan);
            if let (true, Some(record), Some(plan)) = (with_trace, record, plan) {
                let w = &record.workspace.scratch;
                let n = self.shape.num_experts;
                let (t, slots) = (plan.num_tokens, plan.max_slots());
                let (d, f4) = (self.shape.d_model, padded_to_vec4(self.shape.d_ff));
                let f = self.shape.d_ff;
                let gated = if self.config.gated { slots * f } else { 0 };
                sources.extend([
                    (&w.logits, t * n),
                    (&w.assignment_slot, plan.num_assignments()),
                    (&w.slot_token, slots),
                    (&w.expert_table, plan.expert_table_len()),
                    (&w.hidden, slots * f4),
                    (&w.expert_out, slots * d),
                    (&scratch.d_logits, t * n),
                    (&scratch.slot_scale, slots),
                    (&scratch.pass_scale, t),
                    (&scratch.d_a, slots * f),
                    (&scratch.d_v, gated),
                    (&scratch.d_x_slot, slots * d),
                ]);
            }
            if let (Routing::PreRouted, false, Some(plan)) = (routing, with_trace, plan) {
                // dL/dw in the first k columns of each token's row (a trace holds them too).
                let n = self.shape.num_experts;
                sources.push((&scratch.d_logits, plan.num_tokens * n));
            }
            let lengths: Vec<usize> = sources.iter().map(|(_, words)| *words).collect();
            let all: usize = lengths.iter().sum();
            let staging = with_trace.then(|| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("backward trace readback"),
                    size: (all.max(1) * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            });
            let target = staging.as_ref().unwrap_or(&scratch.readback);
            let total = self.copy_and_submit(encoder, target, &sources);
            // Popped after the read-back copies, so that their errors are caught too.
            let validation = validation_scope.pop();
            drop(sources);
            (scratch, staging, validation, plan, lengths, total)
        };
        let target = staging.as_ref().unwrap_or(&scratch.readback);
        let read = read_mapped(&self.device, target, total, wait).await;
        if let Some(error) = validation.await {
            return Err(MoeError::Device {
                message: format!("backward failed: {error}"),
            });
        }
        let read = read?;
        let parts = split_words(&read, &lengths);
        let floats = |words: &[u32]| words.iter().map(|&w| f32::from_bits(w)).collect::<Vec<_>>();
        let gradients = training
            .layout
            .gradients(&floats(parts[1]), floats(parts[0]));
        let top_k_weights = match (routing, plan) {
            (Routing::PreRouted, Some(plan)) => Some(
                // d_logits: the trace's, or the one part after dx and the gradients.
                floats(parts[if with_trace { 8 } else { 2 }])
                    .chunks(self.shape.num_experts)
                    .flat_map(|row| row[..plan.top_k].to_vec())
                    .collect(),
            ),
            _ => None,
        };
        let trace = match (with_trace, plan) {
            (true, Some(plan)) => Some(BackwardTrace {
                logits: floats(parts[2]),
                assignment_slot: parts[3].to_vec(),
                slot_token: parts[4].to_vec(),
                expert_table: parts[5].to_vec(),
                row_tile: plan.tiling.row_tile(),
                hidden: floats(parts[6])
                    .chunks(padded_to_vec4(self.shape.d_ff).max(1))
                    .flat_map(|row| row[..self.shape.d_ff].to_vec())
                    .collect(),
                expert_out: floats(parts[7]),
                d_logits: floats(parts[8]),
                slot_scale: floats(parts[9]),
                pass_scale: floats(parts[10]),
                d_a: floats(parts[11]),
                d_v: self.config.gated.then(|| floats(parts[12])),
                d_x_slot: floats(parts[13]),
            }),
            _ => None,
        };
        let mut state = self.training_state()?;
        state.scratch = Some(scratch);
        state.has_gradients = true;
        Ok(BackwardRead {
            gradients,
            trace,
            top_k_weights,
        })
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
        state.record = Some(TrainingRecord {
            workspace,
            plan,
            routing: Routing::Router,
        });
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
            (DyFrom::Buffer(dy), Routing::Router),
            (None, coefficients),
        )?;
        encoder.copy_buffer_to_buffer(&scratch.dx, 0, dx, 0, (values * 4) as u64);
        state.scratch = Some(scratch);
        state.has_gradients = true;
        Ok(())
    }
}
