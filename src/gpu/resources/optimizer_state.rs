//! The optimizer's moments on the device (AdamW; one-vec4 stand-ins for SGD), one pair per
//! parameter buffer, its AdamW step count (for the bias corrections), and each buffer's
//! step params and bind group, built once.

use crate::gpu::device::allocate::{storage_buffer, uniform_buffer};
use crate::gpu::kernels::params::OptimizerParams;
use crate::gpu::kernels::Kernel;

/// One parameter buffer's moments and the bindings of its step.
pub(crate) struct MomentBuffers {
    pub(crate) first_moments: wgpu::Buffer,
    pub(crate) second_moments: wgpu::Buffer,
    pub(crate) params: wgpu::Buffer,
    pub(crate) bind_group: wgpu::BindGroup,
}

/// The moments and the step's bindings over a layer's parameters and gradients.
pub(crate) struct OptimizerState {
    /// One per parameter buffer, in their order.
    pub(crate) buffers: Vec<MomentBuffers>,
    pub(crate) adam_w_steps: u64,
}

/// The buffers optimizer_step updates in place, and reads: the parameters and their
/// gradients, buffer by buffer.
pub(crate) struct StepTargets<'a> {
    pub(crate) kernel: &'a Kernel,
    pub(crate) parameters: &'a [wgpu::Buffer],
    pub(crate) gradients: &'a [wgpu::Buffer],
}

impl OptimizerState {
    /// Zero moments of `floats[i]` floats for parameter buffer i.
    pub(crate) fn new(
        (device, queue): (&wgpu::Device, &wgpu::Queue),
        targets: StepTargets<'_>,
        floats: &[usize],
    ) -> Self {
        let zeros: Vec<Vec<f32>> = floats.iter().map(|&n| vec![0.0f32; n]).collect();
        Self::with_moments((device, queue), targets, (&zeros, &zeros), 0)
    }

    /// The given moments (one vector per parameter buffer), after `adam_w_steps` AdamW
    /// steps.
    pub(crate) fn with_moments(
        (device, queue): (&wgpu::Device, &wgpu::Queue),
        targets: StepTargets<'_>,
        (first, second): (&[Vec<f32>], &[Vec<f32>]),
        adam_w_steps: u64,
    ) -> Self {
        let holding = |label, values: &[f32]| {
            let usage = wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
            let buffer = storage_buffer(device, label, values.len() as u64 * 4, usage);
            queue.write_buffer(&buffer, 0, bytemuck::cast_slice(values));
            buffer
        };
        let buffers = targets
            .parameters
            .iter()
            .zip(targets.gradients)
            .zip(first.iter().zip(second))
            .map(|((parameters, gradients), (first, second))| {
                let first_moments = holding("first moments", first);
                let second_moments = holding("second moments", second);
                let params =
                    uniform_buffer(device, "optimizer params", &OptimizerParams::default());
                let bind_group = targets.kernel.bind(
                    device,
                    &[
                        &params,
                        parameters,
                        gradients,
                        &first_moments,
                        &second_moments,
                    ],
                );
                MomentBuffers {
                    first_moments,
                    second_moments,
                    params,
                    bind_group,
                }
            })
            .collect();
        OptimizerState {
            buffers,
            adam_w_steps,
        }
    }
}
