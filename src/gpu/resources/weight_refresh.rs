//! What an optimizer step (or `set_weights`) records to rewrite the forward's own operands
//! from the parameter buffers (the router's, each shard's): the router texture
//! (refresh_router_weights), each shard's f32 expert textures (refresh_expert_weights),
//! and the bias buffers (copies).
//! Everything here is fixed by the layer, so it is prepared once, when the layer is built;
//! `passes::refresh` records it.

use crate::error::Result;
use crate::gpu::device::allocate::{padded_to_vec4, uniform_buffer};
use crate::gpu::device::encode::{div_ceil, grid_2d};
use crate::gpu::kernels::params::RefreshParams;
use crate::gpu::kernels::shaders::TRAINING_WORKGROUP;
use crate::gpu::kernels::{bind_resources, Kernel, TrainingKernels};
use crate::gpu::plan::parameter_shards::ParameterShards;
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

/// A copy of `floats` floats from `from` in the parameter buffer `source` to `to` in
/// `buffer`.
pub(crate) struct BiasCopy {
    pub(crate) source: wgpu::Buffer,
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
        (shards, parameters): (&ParameterShards, &[wgpu::Buffer]),
        weights: &GpuWeights,
        max_dim: u32,
    ) -> Result<Self> {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = shards.layout.shape;
        let router_parameters = &parameters[0];
        // The router's rows: the experts', or the routed ones' and a shared expert's gate.
        let rows = shards.layout.router_rows();
        // (target, params, parameter buffer, texture, texels)
        let mut jobs = vec![(
            Target::Router,
            RefreshParams {
                rows: rows as u32,
                cols: d as u32,
                width: padded_to_vec4(d) as u32,
                num_experts: n as u32,
                tensor_at: 0,
                ..Default::default()
            },
            router_parameters,
            &weights.router,
            rows * padded_to_vec4(d) / 4,
        )];
        let mut bias_copies = Vec::new();
        if shards.layout.router_bias.is_some() {
            bias_copies.push(BiasCopy {
                source: router_parameters.clone(),
                from: rows * d,
                buffer: weights.router_bias.clone(),
                to: 0,
                floats: rows,
            });
        }
        // Each shard's tensors sit in its own parameter buffer, its experts from 0 there.
        for ((shard, parameter_shard), source) in weights
            .shards
            .iter()
            .zip(&shards.shards)
            .zip(&parameters[1..])
        {
            let count = shard.num_experts;
            let o = &parameter_shard.offsets;
            let tensors = [
                (Some(o.w1), &shard.w1, f, d),
                (o.w3, &shard.w3, f, d),
                (Some(o.w2), &shard.w2, d, f),
            ];
            for (at, textures, rows, cols) in tensors {
                let Some(at) = at else { continue };
                let (width, quads) = (padded_to_vec4(cols), padded_to_vec4(rows) / 4);
                let params = RefreshParams {
                    rows: rows as u32,
                    cols: cols as u32,
                    width: width as u32,
                    quads: quads as u32,
                    first_expert: 0,
                    num_experts: count as u32,
                    tensor_at: at as u32,
                    _pad: 0,
                };
                jobs.push((
                    Target::Experts,
                    params,
                    source,
                    &textures.quants,
                    count * quads * width,
                ));
            }
            // b1, and b3 after it, in the shard's up bias; b2 in its down bias; rows
            // padded to whole vec4s on both sides.
            let (d4, f4) = (padded_to_vec4(d), padded_to_vec4(f));
            let biases = [
                (o.b1, &shard.up_bias, 0, f4),
                (o.b3, &shard.up_bias, count * f4, f4),
                (o.b2, &shard.down_bias, 0, d4),
            ];
            for (at, buffer, to, per_expert) in biases {
                if let Some(at) = at {
                    bias_copies.push(BiasCopy {
                        source: source.clone(),
                        from: at,
                        buffer: buffer.clone(),
                        to,
                        floats: count * per_expert,
                    });
                }
            }
        }
        let mut dispatches = Vec::with_capacity(jobs.len());
        for (target, params, parameters, texture, texels) in jobs {
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
