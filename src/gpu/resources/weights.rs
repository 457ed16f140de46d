//! The layer's weights on the device: the router as a texture (and its bias as a uniform
//! array), and the expert matrices as texture arrays in their stored format, split into
//! shards of whole experts that each fit the device's limits.

use wgpu::util::DeviceExt;

use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;
use crate::gpu::device::allocate::{
    pad_rows, padded_to_vec4, storage_buffer_init, texture, uniform_buffer, usable_layers,
    written_usage,
};
use crate::gpu::device::encode::div_ceil;
use crate::gpu::kernels::params::ExpertParams;
use crate::gpu::kernels::shaders::MAX_EXPERTS;
use crate::gpu::resources::weight_textures::{upload_weight_textures, widest_row, WeightTextures};
use crate::weights::{LayerShape, MoeWeights};

/// The router weight `[experts, d_model]` as an rgba32float texture (one row per expert,
/// rows zero-padded to whole texels); `writable` for a trainable layer.
fn router_texture(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    router_weight: &[f32],
    (num_experts, d_model): (usize, usize),
    writable: bool,
) -> wgpu::TextureView {
    let extent = (padded_to_vec4(d_model) / 4, num_experts, 1);
    let usage = wgpu::TextureUsages::TEXTURE_BINDING
        | wgpu::TextureUsages::COPY_DST
        | written_usage(writable);
    let data = pad_rows(router_weight, d_model);
    let contents = Some((queue, bytemuck::cast_slice(&data)));
    texture(
        device,
        "router",
        wgpu::TextureFormat::Rgba32Float,
        extent,
        false,
        usage,
        contents,
    )
}

/// The weights of a contiguous range of experts.
#[derive(Debug)]
pub struct WeightShard {
    pub first_expert: usize,
    pub num_experts: usize,
    /// W1 `[experts, F, D]` in its stored format (see weight_textures).
    pub w1: WeightTextures,
    /// W3 like W1 for gated FFNs, 1-texel dummies otherwise.
    pub w3: WeightTextures,
    /// b1 `[experts, F4]`, then b3 `[experts, F4]` when gated (zeros for absent biases, and
    /// in each row's padding).
    pub up_bias: wgpu::Buffer,
    /// W2 `[experts, D, F]` in its stored format.
    pub w2: WeightTextures,
    /// b2 `[experts, D4]` (zeros for an absent bias, and in each row's padding).
    pub down_bias: wgpu::Buffer,
    pub params: wgpu::Buffer,
}

/// The score bias as the uniform array holds it: MAX_EXPERTS floats, zero-padded.
pub fn score_bias_values(weights: &MoeWeights) -> Vec<f32> {
    let mut values = vec![0.0f32; MAX_EXPERTS as usize];
    if let Some(bias) = &weights.score_bias {
        values[..bias.len()].copy_from_slice(bias);
    }
    values
}

/// All weights on the device.
#[derive(Debug)]
pub struct GpuWeights {
    /// Router weight, `[N][D4 / 4]` rgba32float texels (rows zero-padded).
    pub router: wgpu::TextureView,
    /// Router bias, a uniform array of MAX_EXPERTS floats (zero-padded).
    pub router_bias: wgpu::Buffer,
    /// The selection's score bias, a uniform array of MAX_EXPERTS floats (zeros when the
    /// layer has none: p + 0 is p exactly); the layer keeps a host copy.
    pub score_bias: wgpu::Buffer,
    pub has_score_bias: bool,
    pub shards: Vec<WeightShard>,
    /// First expert of every shard, then N.
    pub shard_first_expert: wgpu::Buffer,
    /// Device bytes of the router, the biases and the expert matrices.
    pub bytes: u64,
}

impl GpuWeights {
    /// Uploads `weights`, splitting the experts into shards of at most
    /// `max_experts_per_shard`, and no more than the device's texture array layers allow
    /// or than fit one bias binding of `max_binding_bytes`. `writable`: a trainable layer,
    /// whose textures and biases an optimizer step rewrites.
    pub fn upload(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        weights: &MoeWeights,
        max_binding_bytes: u64,
        max_experts_per_shard: Option<usize>,
        writable: bool,
    ) -> Result<Self> {
        let LayerShape {
            num_experts,
            d_model,
            d_ff,
        } = weights.shape;
        let limits = device.limits();
        let max_side = limits.max_texture_dimension_2d as u64;
        // Weight textures are as wide as their rows need (weight_textures::widest_row), a
        // quarter as high as their rows.
        for (limit, matrices) in [
            (
                "max_texture_dimension_2d (texels per W1 row quad)",
                &weights.w1,
            ),
            (
                "max_texture_dimension_2d (texels per W2 row quad)",
                &weights.w2,
            ),
        ] {
            let needed = widest_row(matrices.format, matrices.cols) as u64;
            if needed > max_side {
                return Err(MoeError::DeviceLimit {
                    limit,
                    needed,
                    allowed: max_side,
                });
            }
        }
        // Biases are buffers of [experts, F] (twice when gated) and [experts, D].
        let bias_bytes = (2 * padded_to_vec4(d_ff.max(d_model)) * 4) as u64;
        let experts_per_shard = (max_binding_bytes / bias_bytes)
            .min(usable_layers(&limits) as u64)
            .min(max_experts_per_shard.unwrap_or(usize::MAX) as u64)
            .max(1) as usize;
        // N rows, and the shared expert's gate as row N when it rides the router.
        let router_rows = weights.router_weight.len() / d_model;
        let router = router_texture(
            device,
            queue,
            &weights.router_weight,
            (router_rows, d_model),
            writable,
        );
        let mut router_bias = vec![0.0f32; MAX_EXPERTS as usize];
        if let Some(bias) = &weights.router_bias {
            router_bias[..bias.len()].copy_from_slice(bias);
        }
        let router_bias = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("router bias"),
            contents: bytemuck::cast_slice(&router_bias),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        });
        let score_bias = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("score bias"),
            contents: bytemuck::cast_slice(&score_bias_values(weights)),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        });

        let num_shards = div_ceil(num_experts, experts_per_shard);
        // The router texture and its bias, then each shard's matrices and biases.
        let mut bytes =
            (4 * padded_to_vec4(d_model) * num_experts + 8 * MAX_EXPERTS as usize) as u64;
        let mut shards = Vec::with_capacity(num_shards);
        let mut shard_first_expert = Vec::with_capacity(num_shards + 1);
        for shard in 0..num_shards {
            let first = shard * experts_per_shard;
            let end = (first + experts_per_shard).min(num_experts);
            let count = end - first;
            let range = |per_expert: usize| first * per_expert..end * per_expert;
            // Each expert's bias row zero-padded to whole vec4s (as the trainable
            // parameters keep them, so an optimizer step copies them whole).
            let bias_or_zeros = |bias: &Option<Vec<f32>>, per_expert: usize| match bias {
                Some(b) => pad_rows(&b[range(per_expert)], per_expert).into_owned(),
                None => vec![0.0; count * padded_to_vec4(per_expert)],
            };
            let mut up_bias = bias_or_zeros(&weights.b1, d_ff);
            if weights.w3.is_some() {
                up_bias.extend(bias_or_zeros(&weights.b3, d_ff));
            }
            let bias_usage = wgpu::BufferUsages::COPY_DST;
            let experts = first..end;
            let w3 = match &weights.w3 {
                Some(w3) => {
                    upload_weight_textures(device, queue, "w3", w3, experts.clone(), writable)
                }
                None => {
                    let unused = ExpertMatrices::from_f32(1, 1, 4, vec![0.0; 4]);
                    upload_weight_textures(device, queue, "w3 (unused)", &unused, 0..1, false)
                }
            };
            let params = ExpertParams {
                d_model: d_model as u32,
                d_ff: d_ff as u32,
                num_experts: num_experts as u32,
                shard_first_expert: first as u32,
                shard_num_experts: count as u32,
                _pad: [0; 3],
            };
            let down_bias = bias_or_zeros(&weights.b2, d_model);
            let shard = WeightShard {
                first_expert: first,
                num_experts: count,
                w1: upload_weight_textures(
                    device,
                    queue,
                    "w1",
                    &weights.w1,
                    experts.clone(),
                    writable,
                ),
                w3,
                up_bias: storage_buffer_init(device, "up_bias", &up_bias, bias_usage),
                w2: upload_weight_textures(device, queue, "w2", &weights.w2, experts, writable),
                down_bias: storage_buffer_init(device, "down_bias", &down_bias, bias_usage),
                params: uniform_buffer(device, "expert params", &params),
            };
            bytes += shard.w1.bytes + shard.w2.bytes + 4 * (up_bias.len() + down_bias.len()) as u64;
            if weights.w3.is_some() {
                bytes += shard.w3.bytes;
            }
            shards.push(shard);
            shard_first_expert.push(first as u32);
        }
        shard_first_expert.push(num_experts as u32);
        Ok(GpuWeights {
            router,
            router_bias,
            score_bias,
            has_score_bias: weights.score_bias.is_some(),
            shards,
            shard_first_expert: storage_buffer_init(
                device,
                "shard_first_expert",
                &shard_first_expert,
                wgpu::BufferUsages::empty(),
            ),
            bytes,
        })
    }
}
