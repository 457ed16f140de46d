//! Training on batches beyond one pass: the training forward runs in chunks (whole
//! capacity groups, as the inference forward chunks) and keeps every chunk's pass; the
//! backward runs each chunk's pass in order in one submission, with the whole batch's
//! counts and token count in the aux and z losses, the weights' gradients accumulating
//! chunk after chunk (the same order every run, so the same bits), and dx gathered.

use crate::cpu_backward::{check_dy, LossCoefficients};
use crate::error::{MoeError, Result};
use crate::gpu::device::allocate::staging_buffer;
use crate::gpu::device::readback::{read_mapped, Wait};
use crate::gpu::layer::backward::{PassDy, ALL_LAUNCHES};
use crate::gpu::layer::inference::{in_batch, merge_chunks};
use crate::gpu::layer::moe_layer::MoeLayer;
use crate::gpu::plan::backward::BatchPart;
use crate::gpu::plan::forward::Routing;
use crate::gpu::resources::training::{ChunkedBatch, TrainingRecord, TrainingState};
use crate::gpu::resources::workspace::Workspace;
use crate::gradients::Gradients;
use crate::output::MoeOutput;

impl MoeLayer {
    /// The training forward of `x` (`num_tokens` tokens) in chunks of `chunk` tokens, each
    /// pass kept for the backward; the statistics merged over the batch.
    pub(crate) async fn forward_train_chunked(
        &self,
        x: &[f32],
        shape: &[usize],
        (num_tokens, chunk): (usize, usize),
        wait: Wait,
    ) -> Result<MoeOutput> {
        let d_model = self.shape.d_model;
        // The last training forward's workspaces are reused; no lock is held while the GPU
        // works.
        let mut idle: Vec<Workspace> = {
            let mut state = self.training_state()?;
            state.has_gradients = false;
            released_workspaces(&mut state)
        };
        let mut passes = Vec::with_capacity(num_tokens.div_ceil(chunk));
        let mut runs = Vec::with_capacity(passes.capacity());
        for (index, part) in x.chunks(chunk * d_model).enumerate() {
            let tokens = part.len() / d_model;
            let plan = self.plan(tokens)?;
            let mut kept = None;
            let run = self
                .run_in(
                    &mut kept,
                    idle.pop(),
                    &plan,
                    part,
                    &[tokens, d_model],
                    false,
                    wait,
                )
                .await
                .map_err(|e| in_batch(e, index * chunk))?;
            if let Some(workspace) = kept {
                passes.push(TrainingRecord {
                    workspace,
                    plan,
                    routing: Routing::Router,
                });
            }
            runs.push(run);
        }
        let merged = merge_chunks(runs, shape, self.shape.num_experts).output;
        self.training_state()?.chunks = Some(ChunkedBatch {
            passes,
            counts: merged.counts.clone(),
            num_tokens,
        });
        Ok(merged)
    }

    /// The host backward of a chunked training forward: every chunk's pass recorded in
    /// order into one submission, then `dx` and the weights' gradients read back.
    pub(crate) async fn run_backward_chunked(
        &self,
        dy: &[f32],
        route_prob_sum_grad: Option<&[f32]>,
        coefficients: LossCoefficients,
        wait: Wait,
    ) -> Result<Gradients> {
        let training = self.training()?;
        let gradient_floats = training.shards.buffer_floats();
        let d_model = self.shape.d_model;
        // The lock is held while encoding, not while the GPU works.
        let (staging, validation, values, total) = {
            let mut guard = self.training_state()?;
            let TrainingState {
                chunks, scratch, ..
            } = &mut *guard;
            let Some(batch) = chunks.as_ref() else {
                return Err(MoeError::Training {
                    message: "backward needs a forward_train first".to_string(),
                });
            };
            let values = batch.num_tokens * d_model;
            check_dy(dy, values)?;
            self.check_loss_terms(route_prob_sum_grad, coefficients)?;
            let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let dy_buffer = wgpu::util::DeviceExt::create_buffer_init(
                &self.device,
                &wgpu::util::BufferInitDescriptor {
                    label: Some("chunked dy"),
                    contents: bytemuck::cast_slice(dy),
                    usage: wgpu::BufferUsages::COPY_SRC,
                },
            );
            let total = values + gradient_floats.iter().sum::<usize>();
            let staging =
                staging_buffer(&self.device, "chunked backward readback", total as u64 * 4);
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("moe chunked backward"),
                });
            let mut token = 0usize;
            let mut recorded = Ok(());
            for (index, pass) in batch.passes.iter().enumerate() {
                let part = BatchPart {
                    loss_tokens: batch.num_tokens,
                    accumulate: index > 0,
                };
                let bytes = |tokens: usize| (tokens * d_model * 4) as u64;
                let dy_part = PassDy::Buffer(&dy_buffer, bytes(token));
                let pass_scratch = self.record_pass(
                    training,
                    (scratch.take(), pass),
                    &mut encoder,
                    (dy_part, Routing::Router, part, Some(&batch.counts)),
                    (route_prob_sum_grad, coefficients),
                    ALL_LAUNCHES,
                );
                match pass_scratch {
                    Ok(pass_scratch) => {
                        let tokens = pass.plan.num_tokens;
                        encoder.copy_buffer_to_buffer(
                            &pass_scratch.dx,
                            0,
                            &staging,
                            bytes(token),
                            bytes(tokens),
                        );
                        token += tokens;
                        *scratch = Some(pass_scratch);
                    }
                    Err(error) => {
                        recorded = Err(error);
                        break;
                    }
                }
            }
            if let Err(error) = recorded {
                drop(validation_scope.pop());
                return Err(error);
            }
            let mut offset = values as u64 * 4;
            for (buffer, floats) in training.gradients.iter().zip(&gradient_floats) {
                let bytes = *floats as u64 * 4;
                encoder.copy_buffer_to_buffer(buffer, 0, &staging, offset, bytes);
                offset += bytes;
            }
            self.queue.submit([encoder.finish()]);
            (staging, validation_scope.pop(), values, total)
        };
        let read = read_mapped(&self.device, &staging, total as u64 * 4, wait).await;
        if let Some(error) = validation.await {
            return Err(MoeError::Device {
                message: format!("backward failed: {error}"),
            });
        }
        let words = read?;
        let floats: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
        let mut buffers = Vec::with_capacity(gradient_floats.len());
        let mut at = values;
        for floats_in_buffer in &gradient_floats {
            buffers.push(floats[at..at + floats_in_buffer].to_vec());
            at += floats_in_buffer;
        }
        let flat = training.shards.join(&buffers);
        self.training_state()?.has_gradients = true;
        Ok(training
            .layout()
            .gradients(&flat, floats[..values].to_vec()))
    }
}

/// The workspaces of the last training forward, one pass or chunked, given up for the next.
pub(crate) fn released_workspaces(state: &mut TrainingState) -> Vec<Workspace> {
    let mut workspaces: Vec<Workspace> = state
        .chunks
        .take()
        .map(|batch| batch.passes.into_iter().map(|p| p.workspace).collect())
        .unwrap_or_default();
    workspaces.extend(state.record.take().map(|record| record.workspace));
    workspaces
}
