//! The backward of the last training forward: recorded (checks, the backward's scratch
//! fitted to the batch, its `Params` and grids, the backward pass) into the caller's
//! encoder, or on the host: submitted, and `dx` and the weights' gradients read back (with
//! the intermediate buffers when traced, or dL/dw of the caller's weights after a
//! pre-routed forward).

use std::ops::Range;

use crate::cpu_backward::{check_dy, check_prob_sum_grad, LossCoefficients};
use crate::error::{MoeError, Result};
use crate::gpu::device::allocate::{padded_to_vec4, staging_buffer};
use crate::gpu::device::encode::too_small;
use crate::gpu::device::readback::{copy_and_submit, read_mapped, split_words, Wait};
use crate::gpu::layer::moe_layer::MoeLayer;
use crate::gpu::layer::trace::BackwardTrace;
use crate::gpu::passes;
use crate::gpu::passes::backward::{BackwardInputs, BackwardKernels};
use crate::gpu::plan::backward::{backward_params, BackwardGrids, BatchPart};
use crate::gpu::plan::forward::Routing;
use crate::gpu::resources::backward_scratch::BackwardScratch;
use crate::gpu::resources::training::{Training, TrainingRecord, TrainingState};
use crate::gradients::Gradients;

/// Where a backward's `dy` comes from.
pub(crate) enum DyFrom<'a> {
    /// Host values, checked (length, finiteness) and written through the queue.
    Host(&'a [f32]),
    /// A caller's buffer (`COPY_SRC`, at least T·D floats), copied in the encoder.
    Buffer(&'a wgpu::Buffer),
    /// The one the last backward left in the backward's scratch (profiling reruns,
    /// native only).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    Kept,
}

/// Where one pass of a backward takes dy from.
pub(crate) enum PassDy<'a> {
    /// Host values (checked), written through the queue.
    Queue(&'a [f32]),
    /// A buffer, from a byte offset, copied in the encoder.
    Buffer(&'a wgpu::Buffer, u64),
    /// What the scratch holds already.
    Kept,
}

/// Every dispatch of a backward.
pub(crate) const ALL_LAUNCHES: Range<usize> = 0..usize::MAX;

/// What a host backward read back.
pub(crate) struct BackwardRead {
    pub(crate) gradients: Gradients,
    pub(crate) trace: Option<BackwardTrace>,
    /// `[T, k]` after a pre-routed forward: dL/dw of the caller's weights.
    pub(crate) top_k_weights: Option<Vec<f32>>,
}

impl MoeLayer {
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
    pub(crate) async fn run_backward(
        &self,
        dy: &[f32],
        routing: Routing,
        route_prob_sum_grad: Option<&[f32]>,
        coefficients: LossCoefficients,
        with_trace: bool,
        wait: Wait,
    ) -> Result<BackwardRead> {
        let training = self.training()?;
        if routing == Routing::Router && self.training_state()?.chunks.is_some() {
            if with_trace {
                return Err(MoeError::Training {
                    message: "a backward trace covers one pass: the last training forward \
                              ran in chunks (a batch beyond one pass)"
                        .to_string(),
                });
            }
            let gradients = self
                .run_backward_chunked(dy, route_prob_sum_grad, coefficients, wait)
                .await?;
            return Ok(BackwardRead {
                gradients,
                trace: None,
                top_k_weights: None,
            });
        }
        let gradient_floats = training.shards.buffer_floats();
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
                ALL_LAUNCHES,
            );
            let (scratch, values) = match recorded {
                Ok(recorded) => recorded,
                Err(error) => {
                    drop(validation_scope.pop());
                    return Err(error);
                }
            };
            let mut sources = vec![(&scratch.dx, values)];
            sources.extend(
                training
                    .gradients
                    .iter()
                    .zip(gradient_floats.iter().copied()),
            );
            let record = state.record.as_ref();
            let plan = record.map(|r| r.plan);
            if let (true, Some(record), Some(plan)) = (with_trace, record, plan) {
                let w = &record.workspace.scratch;
                // The router's rows: with a shared expert's gate, one past the experts.
                let n = plan.router_rows();
                let (t, slots) = (plan.num_tokens, plan.max_slots());
                let (d, f4) = (self.shape.d_model, padded_to_vec4(self.shape.d_ff));
                let gated = if self.config.gated { slots * f4 } else { 0 };
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
                    (&scratch.d_a, slots * f4),
                    (&scratch.d_v, gated),
                    (&scratch.d_x_slot, slots * d),
                    (&w.pre_activations, slots * plan.pre_activation_stride),
                    (&w.slot_gate, if plan.gate_input { slots } else { 0 }),
                ]);
            }
            if let (Routing::PreRouted, false, Some(plan)) = (routing, with_trace, plan) {
                // dL/dw in the first k columns of each token's row (a trace holds them too).
                let n = self.shape.num_experts;
                sources.push((&scratch.d_logits, plan.num_tokens * n));
            }
            let lengths: Vec<usize> = sources.iter().map(|(_, words)| *words).collect();
            let all: usize = lengths.iter().sum();
            let staging = with_trace
                .then(|| staging_buffer(&self.device, "backward trace readback", (all * 4) as u64));
            let target = staging.as_ref().unwrap_or(&scratch.readback);
            let total = copy_and_submit(&self.queue, encoder, target, &sources);
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
        let all_parts = split_words(&read, &lengths);
        let floats = |words: &[u32]| words.iter().map(|&w| f32::from_bits(w)).collect::<Vec<_>>();
        // dx, each gradient buffer, then what the trace (or a pre-routed backward) reads.
        let buffers = gradient_floats.len();
        let gradient_buffers: Vec<Vec<f32>> = all_parts[1..1 + buffers]
            .iter()
            .map(|p| floats(p))
            .collect();
        let flat = training.shards.join(&gradient_buffers);
        let gradients = training.layout().gradients(&flat, floats(all_parts[0]));
        let parts = &all_parts[1 + buffers..];
        let top_k_weights = match (routing, plan) {
            (Routing::PreRouted, Some(plan)) => Some(
                // d_logits: the trace's, or the one part after dx and the gradients.
                floats(parts[if with_trace { 6 } else { 0 }])
                    .chunks(self.shape.num_experts)
                    .flat_map(|row| row[..plan.top_k].to_vec())
                    .collect(),
            ),
            _ => None,
        };
        // Rows of F4 floats (F rounded up to whole vec4s) as rows of F.
        let f = self.shape.d_ff;
        let f4 = padded_to_vec4(f).max(1);
        let unpadded = |words: &[u32]| -> Vec<f32> {
            floats(words)
                .chunks(f4)
                .flat_map(|row| row[..f].to_vec())
                .collect()
        };
        // The pre-activations: a slot's a, then its v when gated, each F4 long.
        let per_slot = if self.config.gated { 2 } else { 1 };
        let pre_activations = |words: &[u32], which: usize| -> Vec<f32> {
            floats(words)
                .chunks(f4)
                .skip(which)
                .step_by(per_slot)
                .flat_map(|row| row[..f].to_vec())
                .collect()
        };
        let trace = match (with_trace, plan) {
            (true, Some(plan)) => Some(BackwardTrace {
                logits: floats(parts[0]),
                assignment_slot: parts[1].to_vec(),
                slot_token: parts[2].to_vec(),
                expert_table: parts[3].to_vec(),
                row_tile: plan.tiling.row_tile(),
                hidden: unpadded(parts[4]),
                expert_out: floats(parts[5]),
                d_logits: floats(parts[6]),
                slot_scale: floats(parts[7]),
                pass_scale: floats(parts[8]),
                d_a: unpadded(parts[9]),
                d_v: self.config.gated.then(|| unpadded(parts[10])),
                d_x_slot: floats(parts[11]),
                pre_activations: pre_activations(parts[12], 0),
                pre_gates: self.config.gated.then(|| pre_activations(parts[12], 1)),
                slot_gate: plan.gate_input.then(|| floats(parts[13])),
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

    /// Records the backward of the last training forward (which `routing` names) into
    /// `encoder`, with the loss's terms beyond `dy`: checks, the scratch fitted to its
    /// batch, the Params (inside the command stream), `dy`, the dispatches. Returns
    /// the scratch (to go back into `state` once the caller is done with it; `dx` is in
    /// `scratch.dx`) and the values of `x`.
    pub(crate) fn record_backward(
        &self,
        training: &Training,
        state: &mut TrainingState,
        encoder: &mut wgpu::CommandEncoder,
        (dy, routing): (DyFrom<'_>, Routing),
        (route_prob_sum_grad, coefficients): (Option<&[f32]>, LossCoefficients),
        launches: Range<usize>,
    ) -> Result<(BackwardScratch, usize)> {
        let record = state.record.as_ref().ok_or_else(|| MoeError::Training {
            message: match (routing, state.chunks.is_some()) {
                (Routing::Router, true) => {
                    "the last training forward ran in chunks (a batch beyond one pass): its \
                     backward is the host backward"
                }
                (Routing::Router, false) => "backward needs a forward_train first",
                (Routing::PreRouted, _) => "backward_experts needs a forward_experts_train first",
            }
            .to_string(),
        })?;
        match (routing, record.routing) {
            (Routing::Router, Routing::PreRouted) => {
                return Err(MoeError::Training {
                    message: "the last training forward was forward_experts_train: its \
                              backward is backward_experts"
                        .to_string(),
                })
            }
            (Routing::PreRouted, Routing::Router) => {
                return Err(MoeError::Training {
                    message: "the last training forward was forward_train: its backward is \
                              backward"
                        .to_string(),
                })
            }
            _ => {}
        }
        let plan = record.plan;
        let values = plan.num_tokens * self.shape.d_model;
        match dy {
            DyFrom::Host(dy) => check_dy(dy, values)?,
            DyFrom::Buffer(dy) => {
                if let Some(error) = too_small("dy", dy, (values * 4) as u64) {
                    return Err(error);
                }
            }
            DyFrom::Kept => {
                if state.scratch.is_none() {
                    return Err(MoeError::Training {
                        message: "no backward has run to keep its dy".to_string(),
                    });
                }
            }
        }
        self.check_loss_terms(route_prob_sum_grad, coefficients)?;
        let dy = match dy {
            DyFrom::Host(dy) => PassDy::Queue(dy),
            DyFrom::Buffer(dy) => PassDy::Buffer(dy, 0),
            DyFrom::Kept => PassDy::Kept,
        };
        let scratch = self.record_pass(
            training,
            (state.scratch.take(), record),
            encoder,
            (dy, routing, BatchPart::whole(&record.plan), None),
            (route_prob_sum_grad, coefficients),
            launches,
        )?;
        Ok((scratch, values))
    }

    /// The loss's terms beyond dy: a caller's gradient of route_prob_sum `[N]` (finite)
    /// and finite coefficients.
    pub(crate) fn check_loss_terms(
        &self,
        route_prob_sum_grad: Option<&[f32]>,
        coefficients: LossCoefficients,
    ) -> Result<()> {
        check_prob_sum_grad(route_prob_sum_grad, self.shape.num_experts)?;
        for (key, value) in [
            ("aux_loss_coef", coefficients.aux),
            ("z_loss_coef", coefficients.z),
        ] {
            if !value.is_finite() {
                return Err(MoeError::config(key, format!("{value} is not finite")));
            }
        }
        Ok(())
    }

    /// Records the backward of one training pass (`record`, `part` of its batch) with the
    /// backward's scratch `scratch` fitted to it (returned), dy from `dy`, and the batch's
    /// counts (`None`: the pass's own).
    #[allow(clippy::type_complexity)]
    pub(crate) fn record_pass(
        &self,
        training: &Training,
        (scratch, record): (Option<BackwardScratch>, &TrainingRecord),
        encoder: &mut wgpu::CommandEncoder,
        (dy, routing, part, batch_counts): (PassDy<'_>, Routing, BatchPart, Option<&[u32]>),
        (route_prob_sum_grad, coefficients): (Option<&[f32]>, LossCoefficients),
        launches: Range<usize>,
    ) -> Result<BackwardScratch> {
        let plan = record.plan;
        let gated = self.config.gated;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let tiling = training.kernels.weight_gradient_tiling;
        let shard_experts: Vec<usize> = self.weights.shards.iter().map(|s| s.num_experts).collect();
        let grids = BackwardGrids::new(&plan, (gated, &shard_experts), tiling, max_dim)?;
        // The plan's shape: with a shared expert, its slices are among the experts (and its
        // gate among d_logits' columns).
        let mut scratch = BackwardScratch::fitted(
            scratch,
            &self.device,
            (plan.shape, gated),
            (plan.num_tokens, plan.max_slots()),
            training.shards.buffer_floats().iter().sum(),
        );
        let params = backward_params(
            (&plan, part),
            gated,
            routing,
            coefficients,
            &training.shards,
        );
        let zeros = vec![0.0f32; self.shape.num_experts];
        let dy = match dy {
            PassDy::Queue(dy) => {
                self.queue
                    .write_buffer(&scratch.dy, 0, bytemuck::cast_slice(dy));
                None
            }
            PassDy::Buffer(dy, offset) => Some((dy, offset)),
            PassDy::Kept => None,
        };
        let inputs = BackwardInputs {
            params: &params,
            prob_sum_grad: route_prob_sum_grad.unwrap_or(&zeros),
            dy,
            batch_counts,
        };
        let kernels = BackwardKernels {
            forward: &self.kernels,
            training: &training.kernels,
        };
        passes::backward::encode(
            encoder,
            (&self.device, kernels),
            (&record.workspace, &mut scratch),
            &self.weights,
            (&training.gradients, &training.shard_params),
            (&plan, &grids),
            inputs,
            launches,
        );
        Ok(scratch)
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
            ALL_LAUNCHES,
        )?;
        encoder.copy_buffer_to_buffer(&scratch.dx, 0, dx, 0, (values * 4) as u64);
        state.scratch = Some(scratch);
        state.has_gradients = true;
        Ok(())
    }
}
