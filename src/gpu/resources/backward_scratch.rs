//! The backward's own buffers, sized for the largest batch seen: dy (and its rows as a
//! texture, as the matmuls read it) and dx, the per-token router gradients, and per slot
//! the gate scale, dA (dV) and the input gradient; plus the bind groups of the backward's
//! dispatches over them and the training forward's workspace.

use crate::gpu::device::allocate::{
    padded_to_vec4, staging_buffer, storage_buffer, uniform_buffer,
};
use crate::gpu::kernels::params::BackwardParams;
use crate::gpu::resources::scratch::x_rows_texture;
use crate::weights::LayerShape;

/// The backward's own buffers, sized for the largest batch seen.
pub(crate) struct BackwardScratch {
    /// (tokens, slots) they hold room for.
    pub(crate) capacity: (usize, usize),
    /// `[T, D]` in whole vec4s (stage_tokens reads it so).
    pub(crate) dy: wgpu::Buffer,
    /// dy's rows as an rgba32float texture array laid out like the forward's x rows.
    pub(crate) dy_rows: wgpu::TextureView,
    /// stage_tokens' non-finite flag for dy (unread: a host dy is checked before).
    pub(crate) dy_flags: wgpu::Buffer,
    pub(crate) dx: wgpu::Buffer,
    pub(crate) d_logits: wgpu::Buffer,
    pub(crate) slot_scale: wgpu::Buffer,
    pub(crate) pass_scale: wgpu::Buffer,
    /// `[slots, F4]` (padding columns zero), and dV likewise when gated.
    pub(crate) d_a: wgpu::Buffer,
    pub(crate) d_v: wgpu::Buffer,
    pub(crate) d_x_slot: wgpu::Buffer,
    /// `[N]`: the caller's gradient of route_prob_sum (zeros when none).
    pub(crate) prob_sum_grad: wgpu::Buffer,
    /// `[N]` u32: the batch's counts for the aux loss (the forward's, or a chunked batch's
    /// totals).
    pub(crate) batch_counts: wgpu::Buffer,
    pub(crate) params: wgpu::Buffer,
    pub(crate) readback: wgpu::Buffer,
    /// The bind groups of the backward's dispatches and the id of the workspace they were
    /// built over (rebuilt only when the training forward needed a new workspace).
    pub(crate) bound: Option<(usize, Vec<wgpu::BindGroup>)>,
}

impl BackwardScratch {
    /// `previous` if it holds room for `needed` (tokens, slots), else a new one with room
    /// for the larger of the two (`parameters`: floats of gradients to read back).
    pub(crate) fn fitted(
        previous: Option<Self>,
        device: &wgpu::Device,
        (shape, gated): (LayerShape, bool),
        needed: (usize, usize),
        parameters: usize,
    ) -> Self {
        match previous {
            Some(s) if s.capacity.0 >= needed.0 && s.capacity.1 >= needed.1 => s,
            previous => {
                let capacity = previous.map_or(needed, |s| {
                    (s.capacity.0.max(needed.0), s.capacity.1.max(needed.1))
                });
                Self::new(device, shape, gated, capacity, parameters)
            }
        }
    }

    /// Room for `tokens` and `slots`, and `parameters` floats of gradients to read back.
    fn new(
        device: &wgpu::Device,
        shape: LayerShape,
        gated: bool,
        (tokens, slots): (usize, usize),
        parameters: usize,
    ) -> Self {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = shape;
        let pre_floats = (slots * padded_to_vec4(f)).max(4);
        // COPY_SRC: a traced backward reads them back.
        let traced = wgpu::BufferUsages::COPY_SRC;
        let buffer = |label: &str, floats: usize, usage| {
            storage_buffer(device, label, floats as u64 * 4, usage)
        };
        BackwardScratch {
            capacity: (tokens, slots),
            dy: buffer(
                "dy",
                padded_to_vec4(tokens * d),
                wgpu::BufferUsages::COPY_DST,
            ),
            dy_rows: x_rows_texture(device, d, tokens),
            dy_flags: buffer("dy flags", 1, wgpu::BufferUsages::empty()),
            dx: buffer("dx", tokens * d, wgpu::BufferUsages::COPY_SRC),
            d_logits: buffer("d_logits", tokens * n, traced),
            slot_scale: buffer("slot_scale", slots, traced),
            pass_scale: buffer("pass_scale", tokens, traced),
            // Whole vec4s, at least one: the matmuls bind them as vec4 arrays.
            d_a: buffer("d_a", pre_floats, traced),
            d_v: buffer("d_v", if gated { pre_floats } else { 4 }, traced),
            d_x_slot: buffer("d_x_slot", slots * d, traced),
            prob_sum_grad: buffer("prob_sum_grad", n, wgpu::BufferUsages::COPY_DST),
            batch_counts: buffer("batch_counts", n, wgpu::BufferUsages::COPY_DST),
            params: uniform_buffer(device, "backward params", &BackwardParams::default()),
            // dx, the gradients, and after a pre-routed forward dL/dw (in d_logits).
            readback: staging_buffer(
                device,
                "backward readback",
                ((tokens * (d + n) + parameters) * 4) as u64,
            ),
            bound: None,
        }
    }

    /// Bytes of its activation buffers (not the read-back staging).
    pub(crate) fn bytes(&self) -> u64 {
        [
            &self.dy,
            &self.dx,
            &self.d_logits,
            &self.slot_scale,
            &self.pass_scale,
            &self.d_a,
            &self.d_v,
            &self.d_x_slot,
        ]
        .iter()
        .map(|b| b.size())
        .sum()
    }
}
