//! The optimizer step: one dispatch of optimizer_step over the flat parameter buffer with
//! the last backward's gradients (and AdamW's moments), its `Params` inside the command
//! stream.

use crate::gpu::device::encode::{dispatch, encode_writes};
use crate::gpu::kernels::params::OptimizerParams;
use crate::gpu::kernels::Kernel;
use crate::gpu::resources::optimizer_state::OptimizerState;

/// Records one step of `params` with `state`'s bindings into `encoder`, over `grid`.
pub(crate) fn encode(
    encoder: &mut wgpu::CommandEncoder,
    (device, optimizer_step): (&wgpu::Device, &Kernel),
    state: &OptimizerState,
    params: &OptimizerParams,
    grid: (u32, u32),
) {
    encode_writes(
        device,
        encoder,
        "optimizer params",
        &[(&state.params, bytemuck::bytes_of(params))],
    );
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("optimizer step"),
        timestamp_writes: None,
    });
    dispatch(&mut pass, &optimizer_step.pipeline, &state.bind_group, grid);
}
