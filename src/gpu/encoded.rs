//! Passes recorded into the caller's `CommandEncoder` (`encode_forward`, and the training
//! calls that share its pieces): the caller's buffers checked, the `Params` carried inside
//! the command stream, nothing read back.

use crate::error::{MoeError, Result};
use crate::gpu::forward::{Routing, StatisticsLayout};
use crate::gpu::layer::MoeLayer;
use crate::gpu::plan::ForwardPlan;
use crate::gpu::workspace::{initial_writes, Workspace};

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
    pub(super) fn plan_encoded(
        &self,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        statistics: Option<&wgpu::Buffer>,
        num_tokens: usize,
    ) -> Result<ForwardPlan> {
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
    pub(super) fn encode_forward_in(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &Workspace,
        plan: &ForwardPlan,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        statistics: Option<&wgpu::Buffer>,
    ) -> Result<()> {
        let num_tokens = plan.num_tokens;
        let values = (num_tokens * self.shape.d_model * 4) as u64;
        let layout = StatisticsLayout::new(num_tokens, self.config.top_k, self.shape.num_experts);
        // The Params: route, assign, combine, stats, then the flag's initial value.
        let params = self.params_for(plan);
        encode_writes(
            &self.device,
            encoder,
            "encoded forward params",
            &initial_writes(workspace, &params),
        );
        let scratch = &workspace.scratch;
        encoder.copy_buffer_to_buffer(x, 0, &scratch.x, 0, values);
        self.encode(encoder, workspace, plan, Routing::Router)?;
        encoder.copy_buffer_to_buffer(&scratch.y, 0, y, 0, values);
        if let Some(statistics) = statistics {
            let n = self.shape.num_experts as u64;
            let assignments = plan.num_assignments() as u64;
            let copies = [
                (&scratch.routes, 0, layout.routes, assignments),
                (&scratch.gates, 0, layout.gates, assignments),
                (
                    &scratch.route_prob_max,
                    0,
                    layout.route_prob_max,
                    num_tokens as u64,
                ),
                (&scratch.expert_table, 0, layout.counts, n),
                (&scratch.expert_table, n, layout.kept, n),
                (&scratch.expert_table, 3 * n + 1, layout.n_dropped, 1),
                (&scratch.router_stats, 0, layout.route_prob_sum, n + 2),
                (&scratch.flags, 0, layout.first_non_finite_token, 1),
            ];
            for (source, from, to, words) in copies {
                encoder.copy_buffer_to_buffer(
                    source,
                    from * 4,
                    statistics,
                    to as u64 * 4,
                    words * 4,
                );
            }
        }
        Ok(())
    }
}

/// A caller's buffer smaller than what an encoded pass needs, as an error.
pub(super) fn too_small(name: &str, buffer: &wgpu::Buffer, bytes: u64) -> Option<MoeError> {
    (buffer.size() < bytes).then(|| MoeError::InputShape {
        message: format!(
            "buffer `{name}` holds {} bytes, the pass needs {bytes}",
            buffer.size()
        ),
    })
}

/// Records `writes` (target buffer, bytes at its start) into `encoder` as copies from one
/// small staging buffer: an encoded pass's Params travel inside the caller's command stream
/// (a queue write would land at the next submit, whoever makes it).
pub(super) fn encode_writes(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    label: &str,
    writes: &[(&wgpu::Buffer, &[u8])],
) {
    let contents: Vec<u8> = writes
        .iter()
        .flat_map(|(_, bytes)| bytes.iter().copied())
        .collect();
    let staging = wgpu::util::DeviceExt::create_buffer_init(
        device,
        &wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &contents,
            usage: wgpu::BufferUsages::COPY_SRC,
        },
    );
    let mut offset = 0u64;
    for (target, bytes) in writes {
        let size = bytes.len() as u64;
        encoder.copy_buffer_to_buffer(&staging, offset, target, 0, size);
        offset += size;
    }
}
