//! A trainable layer's training state, and the training forward: the forward that keeps
//! its workspace for the backward (backward.rs), host or recorded into the caller's
//! encoder.

use crate::error::{MoeError, Result};
use crate::gpu::device::readback::Wait;
use crate::gpu::layer::chunked_training::released_workspaces;
use crate::gpu::layer::moe_layer::MoeLayer;
use crate::gpu::passes;
use crate::gpu::plan::forward::Routing;
use crate::gpu::resources::backward_scratch::BackwardScratch;
use crate::gpu::resources::training::{Training, TrainingRecord, TrainingState};
use crate::output::{num_tokens_of, MoeOutput};

impl MoeLayer {
    pub(crate) fn training(&self) -> Result<&Training> {
        self.training.as_ref().ok_or_else(|| MoeError::Training {
            message: "the layer was built without `LayerOptions::trainable`".to_string(),
        })
    }

    pub(crate) fn training_state(&self) -> Result<std::sync::MutexGuard<'_, TrainingState>> {
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

    /// Bytes the last training forward keeps for the backward (0 before one): each pass's
    /// workspace (routing tables, x, logits, hidden rows, expert outputs) and, within them,
    /// the pre-activations A (and V) it stored: (all of it, the pre-activations).
    pub fn training_forward_bytes(&self) -> (u64, u64) {
        let Ok(state) = self.training_state() else {
            return (0, 0);
        };
        let passes = state
            .record
            .iter()
            .chain(state.chunks.iter().flat_map(|batch| batch.passes.iter()));
        passes.fold((0, 0), |(all, pre), pass| {
            let sizes = pass.workspace.scratch.sizes;
            (
                all + sizes.total_bytes(),
                pre + sizes.pre_activations as u64 * 4,
            )
        })
    }

    /// Dispatches of one backward, whatever the number of experts: gate, the staging of
    /// dy, the router and the combine, and once per weight shard the two per-slot
    /// matmuls, the two weight-gradient ones and the bias sums; one more with `gate_on:
    /// input` (gate_input_backward).
    pub fn dispatches_per_backward(&self) -> usize {
        let shards = self.weights.shards.len();
        passes::backward::launch_names(shards, self.config.gates_input()).len()
    }

    /// A forward that keeps what the backward needs (the layer keeps the last one; the
    /// next [`MoeLayer::backward`] differentiates it); the layer must be trainable. A batch
    /// beyond one pass ([`MoeLayer::max_tokens_per_pass`]) runs in chunks of whole capacity
    /// groups, as [`MoeLayer::forward`] does, and keeps every chunk's pass: its backward
    /// then gives the whole batch's gradients.
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
        let num_tokens = num_tokens_of(shape, x.len(), self.shape.d_model)?;
        let chunk = self.chunk_tokens(num_tokens)?;
        if chunk < num_tokens {
            return self
                .forward_train_chunked(x, shape, (num_tokens, chunk), wait)
                .await;
        }
        let plan = self.plan(num_tokens)?;
        // The previous record's workspace is reused; a failed forward keeps no record. No
        // lock is held while the GPU works.
        let previous = {
            let mut state = self.training_state()?;
            state.has_gradients = false;
            released_workspaces(&mut state).pop()
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
        let previous = released_workspaces(&mut state).pop();
        let workspace = self.fitted(previous, &plan);
        let recorded = self.encode_forward_in(encoder, &workspace, &plan, x, y, statistics);
        state.record = Some(TrainingRecord {
            workspace,
            plan,
            routing: Routing::Router,
        });
        recorded
    }
}
