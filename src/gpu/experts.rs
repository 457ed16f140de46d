//! The experts alone on pre-routed tokens (`forward_experts`): the caller's router chose
//! each token's experts and weights (transformers' experts interface, expert parallelism),
//! so the layer's pipeline runs without its router and without capacity — stage, count,
//! scan, scatter, the expert matmuls, and combine with the caller's weights:
//! `y[t] = Σ_j w[t, j]·E_{e[t, j]}(x[t])`.

use crate::error::{MoeError, Result};
use crate::gpu::forward::{read_mapped, Routing};
use crate::gpu::layer::MoeLayer;
use crate::gpu::readback::Wait;
use crate::gpu::workspace::{initial_writes, Lease};
use crate::output::num_tokens_of;

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
        self.forward_experts_with(x, shape, top_k_index, top_k_weights, Wait::Yield)
            .await
    }

    async fn forward_experts_with(
        &self,
        x: &[f32],
        shape: &[usize],
        top_k_index: &[u32],
        top_k_weights: &[f32],
        wait: Wait,
    ) -> Result<Vec<f32>> {
        let num_tokens = num_tokens_of(shape, x.len(), self.shape.d_model)?;
        let top_k = self.check_routes(num_tokens, top_k_index, top_k_weights)?;
        // Every assignment kept (no capacity), one group, the caller's weights as gates.
        let config = crate::config::MoeConfig {
            top_k,
            drop_tokens: false,
            group_size: None,
            n_experts: None,
            ..self.config.clone()
        };
        let plan = self.plan_with(&config, num_tokens)?;
        let idle = self.pool.lock().ok().and_then(|mut pool| pool.pop());
        let mut lease = Lease {
            workspace: None,
            pool: &self.pool,
        };
        let oom_scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let workspace = &*lease.workspace.insert(self.fitted(idle, &plan));
        let scratch = &workspace.scratch;
        let mut params = self.params_for(&plan);
        params.combine.scale_by_prob = 1;
        params.combine.pass_through = 0;
        self.queue
            .write_buffer(&scratch.x, 0, bytemuck::cast_slice(x));
        for (target, bytes) in initial_writes(workspace, &params) {
            self.queue.write_buffer(target, 0, bytes);
        }
        self.queue
            .write_buffer(&scratch.routes, 0, bytemuck::cast_slice(top_k_index));
        self.queue
            .write_buffer(&scratch.gates, 0, bytemuck::cast_slice(top_k_weights));
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moe experts"),
            });
        let encoded = self.encode(&mut encoder, workspace, &plan, Routing::PreRouted);
        let values = num_tokens * self.shape.d_model;
        let sources = [(&scratch.y, values), (&scratch.flags, 1)];
        let total = match encoded {
            Ok(()) => Some(self.copy_and_submit(encoder, &scratch.readback, &sources)),
            Err(_) => None,
        };
        let validation = validation_scope.pop();
        let oom = oom_scope.pop();
        encoded?;
        let total = total.unwrap_or(0);
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

    /// Checks the caller's routes for `num_tokens` tokens; returns k.
    fn check_routes(
        &self,
        num_tokens: usize,
        top_k_index: &[u32],
        top_k_weights: &[f32],
    ) -> Result<usize> {
        let n = self.shape.num_experts;
        if top_k_index.len() != top_k_weights.len() {
            return Err(MoeError::tensor(
                "top_k_weights",
                format!(
                    "{} values, but top_k_index holds {}",
                    top_k_weights.len(),
                    top_k_index.len()
                ),
            ));
        }
        let top_k = top_k_index.len() / num_tokens.max(1);
        if num_tokens == 0 || top_k == 0 || top_k * num_tokens != top_k_index.len() || top_k > n {
            return Err(MoeError::tensor(
                "top_k_index",
                format!(
                    "{} values for {num_tokens} tokens: expected [T, k] with 1 ≤ k ≤ {n}",
                    top_k_index.len()
                ),
            ));
        }
        if let Some(at) = top_k_index.iter().position(|&e| e as usize >= n) {
            return Err(MoeError::tensor(
                "top_k_index",
                format!(
                    "expert {} at flat index {at}; the layer has {n} experts",
                    top_k_index[at]
                ),
            ));
        }
        if let Some(at) = top_k_weights.iter().position(|w| !w.is_finite()) {
            return Err(MoeError::tensor(
                "top_k_weights",
                format!("non-finite value at flat index {at}"),
            ));
        }
        Ok(top_k)
    }
}
