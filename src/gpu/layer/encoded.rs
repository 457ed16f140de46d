//! A forward recorded into the caller's `CommandEncoder` (`encode_forward`, and the
//! training calls that share its pieces): the caller's buffers checked, the `Params`
//! carried inside the command stream, nothing read back.

use crate::error::{MoeError, Result};
use crate::gpu::device::encode::too_small;
use crate::gpu::layer::moe_layer::MoeLayer;
use crate::gpu::passes;
use crate::gpu::passes::forward::CallerBuffers;
use crate::gpu::plan::forward::ForwardPlan;
use crate::gpu::plan::sizes::StatisticsLayout;
use crate::gpu::resources::workspace::Workspace;

impl MoeLayer {
    /// Encodes a forward of `num_tokens` tokens into the caller's `encoder`, reading `x`
    /// (`[T, D]` f32) from and writing `y` to caller-owned buffers, and, if given, every
    /// statistic to `statistics` (layout: [`StatisticsLayout`]). Nothing is read back: the
    /// caller submits when it likes and finds the first non-finite token, if any, in the
    /// statistics. `x` needs `COPY_SRC`, `y` and `statistics` `COPY_DST`. Batches too large
    /// for one pass are an error here (the blocking forward chunks them).
    pub fn encode_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        statistics: Option<&wgpu::Buffer>,
        num_tokens: usize,
    ) -> Result<()> {
        let plan = self.plan_encoded(x, y, statistics, num_tokens)?;
        let mut guard = self.encoded.lock().map_err(|_| MoeError::Device {
            message: "a previous encode_forward panicked while holding its workspace".to_string(),
        })?;
        let fitted = self.fitted(guard.take(), &plan);
        let workspace = guard.insert(fitted);
        self.encode_forward_in(encoder, workspace, &plan, x, y, statistics)
    }

    /// Checks the caller's buffers of an encoded forward of `num_tokens` tokens and returns
    /// its plan.
    pub(crate) fn plan_encoded(
        &self,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        statistics: Option<&wgpu::Buffer>,
        num_tokens: usize,
    ) -> Result<ForwardPlan> {
        if self.shared.is_some() {
            return Err(MoeError::tensor(
                "shared.w1",
                "encode_forward does not run a layer with a shared expert yet (forward does)",
            ));
        }
        let plan = self.plan(num_tokens)?;
        let values = (num_tokens * self.shape.d_model * 4) as u64;
        let layout = StatisticsLayout::new(num_tokens, self.config.top_k, self.shape.num_experts);
        let statistics_error = statistics.and_then(|s| too_small("statistics", s, layout.bytes()));
        match too_small("x", x, values)
            .or(too_small("y", y, values))
            .or(statistics_error)
        {
            Some(error) => Err(error),
            None => Ok(plan),
        }
    }

    /// Records a forward of `plan` in `workspace` into the caller's encoder (see
    /// [`MoeLayer::encode_forward`]; the buffers are checked).
    pub(crate) fn encode_forward_in(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &Workspace,
        plan: &ForwardPlan,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        statistics: Option<&wgpu::Buffer>,
    ) -> Result<()> {
        let grids = plan.grids(self.limits.max_compute_workgroups_per_dimension)?;
        let params = plan.kernel_params(self.weights.shards.len());
        passes::forward::encode_with_buffers(
            encoder,
            (&self.device, &*self.kernels),
            (workspace, &workspace.initial_writes(&params)),
            (plan, &grids),
            CallerBuffers { x, y, statistics },
        );
        Ok(())
    }
}
