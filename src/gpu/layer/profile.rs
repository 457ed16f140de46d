//! Each kernel of a training step timed alone, for benchmarks: after a training forward and
//! backward, the forward's expert matmuls and every dispatch of the backward run again one
//! at a time, each in a submission of its own that is waited for. Every one of them
//! overwrites what it writes from inputs the others leave alone, so the reruns compute what
//! the step did.

use std::time::Instant;

use crate::cpu_backward::LossCoefficients;
use crate::error::{MoeError, Result};
use crate::gpu::layer::backward::DyFrom;
use crate::gpu::layer::moe_layer::MoeLayer;
use crate::gpu::passes;
use crate::gpu::passes::forward::Projection;

/// One kernel's time in [`MoeLayer::profile_training`].
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The shader's name (a dispatch per weight shard appears once per shard).
    pub name: &'static str,
    /// Wall-clock seconds from submitting the dispatch alone to the GPU being done (one
    /// submission's overhead included).
    pub seconds: f64,
    /// Multiply-adds of the dispatch when it is one of the matmuls, else 0.
    pub multiply_adds: u64,
}

impl MoeLayer {
    /// Times the kernels of a training step on `x` (of `shape`) and `dy` one at a time:
    /// the forward's two expert matmuls, then every dispatch of the backward in order (see
    /// `passes::backward`). The layer keeps the training forward it ran, as
    /// [`MoeLayer::forward_train`] does. For benchmarks: it blocks, and each time includes
    /// a submission's overhead.
    pub fn profile_training(
        &self,
        x: &[f32],
        shape: &[usize],
        dy: &[f32],
        coefficients: LossCoefficients,
    ) -> Result<Vec<KernelTime>> {
        let output = self.forward_train(x, shape)?;
        self.backward(dy, coefficients)?;
        let training = self.training()?;
        let mut state = self.training_state()?;
        let Some((workspace_plan, routing)) = state.record.as_ref().map(|r| (r.plan, r.routing))
        else {
            return Err(MoeError::Training {
                message: "profiling needs a training forward".to_string(),
            });
        };
        let (d, f) = (self.shape.d_model as u64, self.shape.d_ff as u64);
        let projections = if self.config.gated { 2 } else { 1 };
        // Kept rows per weight shard: each shard's matmul dispatch does their work.
        let shard_rows: Vec<u64> = self
            .weights
            .shards
            .iter()
            .map(|shard| {
                let experts = shard.first_expert..shard.first_expert + shard.num_experts;
                output.kept[experts].iter().map(|&k| k as u64).sum()
            })
            .collect();
        let time = |record: &mut dyn FnMut(&mut wgpu::CommandEncoder) -> Result<()>| {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("profile"),
                });
            record(&mut encoder)?;
            let start = Instant::now();
            self.queue.submit([encoder.finish()]);
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| MoeError::Device {
                    message: format!("waiting for the GPU: {e}"),
                })?;
            Ok::<f64, MoeError>(start.elapsed().as_secs_f64())
        };
        let mut times = Vec::new();
        for (name, projection, work) in [
            ("expert_up", Projection::Up, d * f * projections),
            ("expert_down", Projection::Down, d * f),
        ] {
            for (shard, rows) in shard_rows.iter().enumerate() {
                let workspace = state.record.as_ref().map(|r| &r.workspace).ok_or_else(|| {
                    MoeError::Training {
                        message: "profiling lost its training forward".to_string(),
                    }
                })?;
                let seconds = time(&mut |encoder| {
                    let kernels = (&self.device, &*self.kernels);
                    passes::forward::encode_matmul_shard(
                        encoder,
                        kernels,
                        workspace,
                        &workspace_plan,
                        (projection, shard),
                    );
                    Ok(())
                })?;
                times.push(KernelTime {
                    name,
                    seconds,
                    multiply_adds: rows * work,
                });
            }
        }
        let names =
            passes::backward::launch_names(self.weights.shards.len(), self.config.gates_input());
        // The matmuls and the bias sums run once per weight shard, in shard order.
        let mut seen = std::collections::BTreeMap::<&str, usize>::new();
        for (index, name) in names.into_iter().enumerate() {
            let shard = *seen.entry(name).and_modify(|n| *n += 1).or_insert(0);
            let rows = shard_rows.get(shard).copied().unwrap_or(0);
            let multiply_adds = match name {
                "expert_hidden_backward" | "expert_down_backward" => rows * d * f,
                "expert_input_backward" | "expert_up_backward" => rows * d * f * projections,
                _ => 0,
            };
            let mut recorded = None;
            let seconds = time(&mut |encoder| {
                let (scratch, _) = self.record_backward(
                    training,
                    &mut state,
                    encoder,
                    (DyFrom::Kept, routing),
                    (None, coefficients),
                    index..index + 1,
                )?;
                recorded = Some(scratch);
                Ok(())
            })?;
            state.scratch = recorded;
            times.push(KernelTime {
                name,
                seconds,
                multiply_adds,
            });
        }
        Ok(times)
    }
}
