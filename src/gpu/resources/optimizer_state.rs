//! The optimizer's moments on the device (AdamW; 4-byte stand-ins for SGD), its AdamW step
//! count (for the bias corrections), and the step's params and bind group, built once.

use crate::gpu::device::allocate::{storage_buffer, uniform_buffer};
use crate::gpu::kernels::params::OptimizerParams;
use crate::gpu::kernels::Kernel;

/// The moments and the step's bindings over a layer's parameters and gradients.
pub(crate) struct OptimizerState {
    pub(crate) first_moments: wgpu::Buffer,
    pub(crate) second_moments: wgpu::Buffer,
    pub(crate) adam_w_steps: u64,
    pub(crate) params: wgpu::Buffer,
    pub(crate) bind_group: wgpu::BindGroup,
}

/// The buffers optimizer_step updates in place, and reads: the parameters, their gradients.
pub(crate) struct StepTargets<'a> {
    pub(crate) kernel: &'a Kernel,
    pub(crate) parameters: &'a wgpu::Buffer,
    pub(crate) gradients: &'a wgpu::Buffer,
}

impl OptimizerState {
    /// Zero moments of `floats` floats each.
    pub(crate) fn new(
        (device, queue): (&wgpu::Device, &wgpu::Queue),
        targets: StepTargets<'_>,
        floats: usize,
    ) -> Self {
        let zeros = vec![0.0f32; floats];
        Self::with_moments((device, queue), targets, (&zeros, &zeros), 0)
    }

    /// The given moments, after `adam_w_steps` AdamW steps.
    pub(crate) fn with_moments(
        (device, queue): (&wgpu::Device, &wgpu::Queue),
        targets: StepTargets<'_>,
        (first, second): (&[f32], &[f32]),
        adam_w_steps: u64,
    ) -> Self {
        let holding = |label, values: &[f32]| {
            let usage = wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
            let buffer = storage_buffer(device, label, values.len() as u64 * 4, usage);
            queue.write_buffer(&buffer, 0, bytemuck::cast_slice(values));
            buffer
        };
        let first_moments = holding("first moments", first);
        let second_moments = holding("second moments", second);
        let params = uniform_buffer(device, "optimizer params", &OptimizerParams::default());
        let bind_group = targets.kernel.bind(
            device,
            &[
                &params,
                targets.parameters,
                targets.gradients,
                &first_moments,
                &second_moments,
            ],
        );
        OptimizerState {
            first_moments,
            second_moments,
            adam_w_steps,
            params,
            bind_group,
        }
    }
}
