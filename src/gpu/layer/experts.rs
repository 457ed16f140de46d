//! The experts alone on pre-routed tokens (`forward_experts`): the caller's router chose
//! each token's experts and weights (transformers' experts interface, expert parallelism),
//! so the layer's pipeline runs without its router and without capacity — stage, count,
//! scan, scatter, the expert matmuls, and combine with the caller's weights:
//! `y[t] = Σ_j w[t, j]·E_{e[t, j]}(x[t])`; and its training forward and backward (the
//! backward's dispatches with the router's terms left out, gate_backward writing
//! dL/dw_j = dy[t]·E_{e[t, j]}(x[t]) instead).

use crate::cpu_backward::LossCoefficients;
use crate::error::{MoeError, Result};
use crate::gpu::device::readback::{copy_and_submit, read_mapped, Wait};
use crate::gpu::layer::chunked_training::released_workspaces;
use crate::gpu::layer::moe_layer::MoeLayer;
use crate::gpu::layer::trace::BackwardTrace;
use crate::gpu::passes;
use crate::gpu::plan::forward::{ForwardPlan, Routing};
use crate::gpu::resources::training::TrainingRecord;
use crate::gpu::resources::workspace::{Lease, Workspace};
use crate::gradients::ExpertsGradients;
use crate::output::{check_routes, num_tokens_of};

impl MoeLayer {
    /// The experts on `x` (`[T, D]`, or any shape ending in D) routed by the caller:
    /// `top_k_index` and `top_k_weights` are `[T, k]` (expert ids below N, finite
    /// weights); returns y, the shape of x. No router, no capacity, no statistics.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_experts(
        &self,
        x: &[f32],
        shape: &[usize],
        top_k_index: &[u32],
        top_k_weights: &[f32],
    ) -> Result<Vec<f32>> {
        pollster::block_on(self.forward_experts_with(
            x,
            shape,
            top_k_index,
            top_k_weights,
            false,
            Wait::Block,
        ))
    }

    /// [`MoeLayer::forward_experts`] without blocking.
    pub async fn forward_experts_async(
        &self,
        x: &[f32],
        shape: &[usize],
        top_k_index: &[u32],
        top_k_weights: &[f32],
    ) -> Result<Vec<f32>> {
        self.forward_experts_with(x, shape, top_k_index, top_k_weights, false, Wait::Yield)
            .await
    }

    /// [`MoeLayer::forward_experts`] that keeps what its backward needs (the layer keeps
    /// the last training forward; the next [`MoeLayer::backward_experts`] differentiates
    /// it). The layer must be trainable.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_experts_train(
        &self,
        x: &[f32],
        shape: &[usize],
        top_k_index: &[u32],
        top_k_weights: &[f32],
    ) -> Result<Vec<f32>> {
        let run =
            self.forward_experts_with(x, shape, top_k_index, top_k_weights, true, Wait::Block);
        pollster::block_on(run)
    }

    /// [`MoeLayer::forward_experts_train`] without blocking.
    pub async fn forward_experts_train_async(
        &self,
        x: &[f32],
        shape: &[usize],
        top_k_index: &[u32],
        top_k_weights: &[f32],
    ) -> Result<Vec<f32>> {
        self.forward_experts_with(x, shape, top_k_index, top_k_weights, true, Wait::Yield)
            .await
    }

    /// The gradients of `L = Σ dy ⊙ y` for the last [`MoeLayer::forward_experts_train`]:
    /// `x`, every expert tensor (native names and shapes; the router's are zeros, as it is
    /// not in the graph) and the caller's `top_k_weights`. They also stay on the device for
    /// [`MoeLayer::step`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward_experts(&self, dy: &[f32]) -> Result<ExpertsGradients> {
        Ok(pollster::block_on(self.backward_experts_with(dy, false, Wait::Block))?.0)
    }

    /// Like [`MoeLayer::backward_experts`], also reading back the backward's intermediate
    /// buffers and the training forward's tables they used.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward_experts_with_trace(
        &self,
        dy: &[f32],
    ) -> Result<(ExpertsGradients, BackwardTrace)> {
        let (gradients, trace) =
            pollster::block_on(self.backward_experts_with(dy, true, Wait::Block))?;
        let trace = trace.ok_or_else(|| MoeError::Device {
            message: "trace requested but not read back".to_string(),
        })?;
        Ok((gradients, trace))
    }

    /// [`MoeLayer::backward_experts`] without blocking.
    pub async fn backward_experts_async(&self, dy: &[f32]) -> Result<ExpertsGradients> {
        Ok(self.backward_experts_with(dy, false, Wait::Yield).await?.0)
    }

    async fn backward_experts_with(
        &self,
        dy: &[f32],
        with_trace: bool,
        wait: Wait,
    ) -> Result<(ExpertsGradients, Option<BackwardTrace>)> {
        let coefficients = LossCoefficients::default();
        let routing = Routing::PreRouted;
        let read = self
            .run_backward(dy, routing, None, coefficients, with_trace, wait)
            .await?;
        let gradients = ExpertsGradients {
            gradients: read.gradients,
            top_k_weights: read.top_k_weights.unwrap_or_default(),
        };
        Ok((gradients, read.trace))
    }

    async fn forward_experts_with(
        &self,
        x: &[f32],
        shape: &[usize],
        top_k_index: &[u32],
        top_k_weights: &[f32],
        train: bool,
        wait: Wait,
    ) -> Result<Vec<f32>> {
        if self.shared.is_some() {
            return Err(MoeError::tensor(
                "shared.w1",
                "forward_experts runs the routed experts alone: build the experts-only layer \
                 without the shared expert (add it yourself, as transformers' blocks do)",
            ));
        }
        if self.config.gates_input() {
            return Err(MoeError::config(
                "gate_on",
                "forward_experts weighs the experts' outputs by the caller's weights: build \
                 the experts-only layer with gate_on: output",
            ));
        }
        let num_tokens = num_tokens_of(shape, x.len(), self.shape.d_model)?;
        let n = self.shape.num_experts;
        let top_k = check_routes(n, num_tokens, top_k_index, top_k_weights)?;
        // Every assignment kept (no capacity), one group, the caller's weights scaling the
        // outputs as gates (not normalised; nothing passes through).
        let config = crate::config::MoeConfig {
            top_k,
            drop_tokens: false,
            group_size: None,
            n_experts: None,
            scale_by_prob: true,
            normalize_top_k: false,
            drop_policy: crate::config::DropPolicy::Zero,
            ..self.config.clone()
        };
        let plan = self.plan_with(&config, num_tokens)?;
        let mut lease = Lease {
            workspace: None,
            pool: &self.pool,
        };
        // A training forward reuses the previous record's workspace and keeps its own; no
        // lock is held while the GPU works.
        let idle = if train {
            let mut state = self.training_state()?;
            state.has_gradients = false;
            released_workspaces(&mut state).pop()
        } else {
            self.pool.lock().ok().and_then(|mut pool| pool.pop())
        };
        let routes = (top_k_index, top_k_weights);
        let y = self
            .run_experts_in(&mut lease.workspace, idle, &plan, x, routes, wait)
            .await?;
        if let (true, Some(workspace)) = (train, lease.workspace.take()) {
            self.training_state()?.record = Some(TrainingRecord {
                workspace,
                plan,
                routing: Routing::PreRouted,
            });
        }
        Ok(y)
    }

    /// One experts-only pass of `plan` in the workspace `idle` (or a new one) fitted to
    /// it, left in `kept`.
    async fn run_experts_in(
        &self,
        kept: &mut Option<Workspace>,
        idle: Option<Workspace>,
        plan: &ForwardPlan,
        x: &[f32],
        (top_k_index, top_k_weights): (&[u32], &[f32]),
        wait: Wait,
    ) -> Result<Vec<f32>> {
        let oom_scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let workspace = &*kept.insert(self.fitted(idle, plan));
        let grids = match plan.grids(self.limits.max_compute_workgroups_per_dimension) {
            Ok(grids) => grids,
            Err(error) => {
                drop((validation_scope.pop(), oom_scope.pop()));
                return Err(error);
            }
        };
        let scratch = &workspace.scratch;
        let params = plan.kernel_params(self.weights.shards.len());
        workspace.write_inputs(&self.queue, &params, x);
        self.queue
            .write_buffer(&scratch.routes, 0, bytemuck::cast_slice(top_k_index));
        self.queue
            .write_buffer(&scratch.gates, 0, bytemuck::cast_slice(top_k_weights));
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moe experts"),
            });
        let kernels = (&self.device, &*self.kernels);
        let plans = (plan, &grids);
        passes::forward::encode(&mut encoder, kernels, workspace, plans, Routing::PreRouted);
        let values = x.len();
        let sources = [(&scratch.y, values), (&scratch.flags, 1)];
        let total = copy_and_submit(&self.queue, encoder, &scratch.readback, &sources);
        let validation = validation_scope.pop();
        let oom = oom_scope.pop();
        let words = read_mapped(&self.device, &scratch.readback, total, wait).await;
        if let Some(error) = validation.await.or(oom.await) {
            return Err(MoeError::Device {
                message: format!("forward_experts failed: {error}"),
            });
        }
        let words = words?;
        if words[values] != u32::MAX {
            return Err(MoeError::NonFiniteInput {
                token: words[values] as usize,
            });
        }
        Ok(words[..values].iter().map(|&w| f32::from_bits(w)).collect())
    }
}
