//! The optimizer step: one dispatch of optimizer_step per parameter buffer (the router's,
//! then each weight shard's) with the last backward's gradients (and AdamW's moments), its
//! `Params` inside the command stream.

use crate::gpu::device::encode::{dispatch, encode_writes};
use crate::gpu::kernels::params::OptimizerParams;
use crate::gpu::kernels::Kernel;
use crate::gpu::resources::optimizer_state::OptimizerState;

/// Records one step with `state`'s bindings into `encoder`: buffer i with `params[i]` over
/// `grids[i]`.
pub(crate) fn encode(
    encoder: &mut wgpu::CommandEncoder,
    (device, optimizer_step): (&wgpu::Device, &Kernel),
    state: &OptimizerState,
    params: &[OptimizerParams],
    grids: &[(u32, u32)],
) {
    let writes: Vec<(&wgpu::Buffer, &[u8])> = state
        .buffers
        .iter()
        .zip(params)
        .map(|(buffers, params)| (&buffers.params, bytemuck::bytes_of(params)))
        .collect();
    encode_writes(device, encoder, "optimizer params", &writes);
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("optimizer step"),
        timestamp_writes: None,
    });
    for (buffers, &grid) in state.buffers.iter().zip(grids) {
        dispatch(
            &mut pass,
            &optimizer_step.pipeline,
            &buffers.bind_group,
            grid,
        );
    }
}
