//! What an optimizer step (or `set_weights`) records to rewrite the forward's own operands
//! from the flat parameter buffer: the router texture (refresh_router_weights), each
//! shard's f32 expert textures (refresh_expert_weights), and the bias buffers (copies).
//! Everything here is fixed by the layer, so it is prepared once, when the layer is built;
//! `passes::refresh` records it.

use crate::error::Result;
use crate::gpu::device::allocate::{padded_to_vec4, uniform_buffer};
use crate::gpu::device::encode::{div_ceil, grid_2d};
use crate::gpu::kernels::params::RefreshParams;
use crate::gpu::kernels::shaders::TRAINING_WORKGROUP;
use crate::gpu::kernels::{bind_resources, Kernel, TrainingKernels};
use crate::gpu::plan::parameters::ParameterLayout;
use crate::gpu::resources::weights::GpuWeights;
use crate::weights::LayerShape;

/// Which refresh kernel a dispatch runs.
#[derive(Clone, Copy)]
pub(crate) enum Target {
    Router,
    Experts,
}

/// One refresh dispatch: its bind group (which holds its `RefreshParams`) and grid.
pub(crate) struct RefreshDispatch {
    pub(crate) target: Target,
    pub(crate) bind_group: wgpu::BindGroup,
    pub(crate) grid: (u32, u32),
}

/// A copy of `floats` floats from `from` in the parameter buffer to `to` in `buffer`.
pub(crate) struct BiasCopy {
    pub(crate) from: usize,
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) to: usize,
    pub(crate) floats: usize,
}

/// Everything a step records to bring the forward's operands up to date.
pub(crate) struct WeightRefresh {
    pub(crate) dispatches: Vec<RefreshDispatch>,
    pub(crate) bias_copies: Vec<BiasCopy>,
}

impl WeightRefresh {
    pub(crate) fn new(
        device: &wgpu::Device,
        kernels: &TrainingKernels,
        layout: &ParameterLayout,
        parameters: &wgpu::Buffer,
        weights: &GpuWeights,
        max_dim: u32,
    ) -> Result<Self> {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = layout.shape;
        // (target, params, texture, texels)
        let mut jobs = vec![(
            Target::Router,
            RefreshParams {
                rows: n as u32,
                cols: d as u32,
                width: padded_to_vec4(d) as u32,
                num_experts: n as u32,
                tensor_at: layout.router_weight as u32,
                ..Default::default()
            },
            &weights.router,
            n * padded_to_vec4(d) / 4,
        )];
        let mut bias_copies = Vec::new();
        if let Some(at) = layout.router_bias {
            bias_copies.push(BiasCopy {
                from: at,
                buffer: weights.router_bias.clone(),
                to: 0,
                floats: n,
            });
        }
        for shard in &weights.shards {
            let (first, count) = (shard.first_expert, shard.num_experts);
            let tensors = [
                (Some(layout.w1), &shard.w1, f, d),
                (layout.w3, &shard.w3, f, d),
                (Some(layout.w2), &shard.w2, d, f),
            ];
            for (at, textures, rows, cols) in tensors {
                let Some(at) = at else { continue };
                let (width, quads) = (padded_to_vec4(cols), padded_to_vec4(rows) / 4);
                let params = RefreshParams {
                    rows: rows as u32,
                    cols: cols as u32,
                    width: width as u32,
                    quads: quads as u32,
                    first_expert: first as u32,
                    num_experts: count as u32,
                    tensor_at: at as u32,
                    _pad: 0,
                };
                jobs.push((
                    Target::Experts,
                    params,
                    &textures.quants,
                    count * quads * width,
                ));
            }
            // b1, and b3 after it, in the shard's up bias; b2 in its down bias.
            let biases = [
                (layout.b1, &shard.up_bias, 0, f),
                (layout.b3, &shard.up_bias, count * f, f),
                (layout.b2, &shard.down_bias, 0, d),
            ];
            for (at, buffer, to, per_expert) in biases {
                if let Some(at) = at {
                    bias_copies.push(BiasCopy {
                        from: at + first * per_expert,
                        buffer: buffer.clone(),
                        to,
                        floats: count * per_expert,
                    });
                }
            }
        }
        let mut dispatches = Vec::with_capacity(jobs.len());
        for (target, params, texture, texels) in jobs {
            let kernel = Self::kernel(kernels, target);
            let bind_group = bind_resources(
                device,
                kernel.name,
                &kernel.layout,
                vec![
                    uniform_buffer(device, "refresh params", &params).as_entire_binding(),
                    parameters.as_entire_binding(),
                    wgpu::BindingResource::TextureView(texture),
                ],
            );
            let grid = grid_2d(div_ceil(texels, TRAINING_WORKGROUP as usize), max_dim)?;
            dispatches.push(RefreshDispatch {
                target,
                bind_group,
                grid,
            });
        }
        Ok(WeightRefresh {
            dispatches,
            bias_copies,
        })
    }

    /// The refresh kernel of `target`.
    pub(crate) fn kernel(kernels: &TrainingKernels, target: Target) -> &Kernel {
        match target {
            Target::Router => &kernels.refresh_router_weights,
            Target::Experts => &kernels.refresh_expert_weights,
        }
    }
}
