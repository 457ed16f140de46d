//! The refresh of the forward's own operands from the parameter buffers after a step
//! (or `set_weights`): the prepared dispatches of `resources::weight_refresh` (router and
//! f32 expert textures), then the bias copies.

use crate::gpu::device::encode::dispatch;
use crate::gpu::kernels::TrainingKernels;
use crate::gpu::resources::weight_refresh::WeightRefresh;

/// Records `refresh` (which holds the parameter buffers it reads) into `encoder`.
pub(crate) fn encode(
    encoder: &mut wgpu::CommandEncoder,
    kernels: &TrainingKernels,
    refresh: &WeightRefresh,
) {
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("refresh weights"),
            timestamp_writes: None,
        });
        for d in &refresh.dispatches {
            let kernel = WeightRefresh::kernel(kernels, d.target);
            dispatch(&mut pass, &kernel.pipeline, &d.bind_group, d.grid);
        }
    }
    let bytes = |floats: usize| (floats * 4) as u64;
    for copy in &refresh.bias_copies {
        encoder.copy_buffer_to_buffer(
            &copy.source,
            bytes(copy.from),
            &copy.buffer,
            bytes(copy.to),
            bytes(copy.floats),
        );
    }
}
