//! GPU memory: the layer's weights (the expert matrices as texture arrays, split into shards
//! of whole experts that each fit the device's limits) and the scratch buffers of a
//! forward, sized for the largest batch seen and then reused.

use wgpu::util::DeviceExt;

use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;
use crate::gpu::params::ExpertParams;
use crate::gpu::plan::{div_ceil, ForwardPlan};
use crate::gpu::shaders::MAX_EXPERTS;
use crate::gpu::weight_textures::{upload_weight_textures, widest_row, WeightTextures};
use crate::weights::{LayerShape, MoeWeights};

/// A storage buffer of at least `bytes` (never empty: wgpu cannot bind an empty buffer).
pub fn storage_buffer(
    device: &wgpu::Device,
    label: &str,
    bytes: u64,
    extra_usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4).next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE | extra_usage,
        mapped_at_creation: false,
    })
}

/// A storage buffer holding `values` (a single 0 if `values` is empty).
pub fn storage_buffer_init<T: bytemuck::Pod + Default>(
    device: &wgpu::Device,
    label: &str,
    values: &[T],
    extra_usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    let fallback = [T::default()];
    let values = if values.is_empty() {
        &fallback[..]
    } else {
        values
    };
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::cast_slice(values),
        usage: wgpu::BufferUsages::STORAGE | extra_usage,
    })
}

/// A uniform buffer for a `Params` struct, written before each use.
pub fn uniform_buffer<T: bytemuck::Pod>(
    device: &wgpu::Device,
    label: &str,
    value: &T,
) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::bytes_of(value),
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    })
}

/// Layers `array_layers` may add to those needed.
const SPARE_LAYERS: u32 = 1;

/// Layers of content a texture array can hold on a device with `limits`.
fn usable_layers(limits: &wgpu::Limits) -> u32 {
    limits.max_texture_array_layers.saturating_sub(SPARE_LAYERS)
}

/// The most tokens the x-rows texture can hold on a device with `limits`: larger batches
/// run in chunks.
pub fn max_x_rows(limits: &wgpu::Limits) -> u64 {
    limits.max_texture_dimension_2d as u64 * usable_layers(limits) as u64
}

/// Layers for a texture array of `needed` layers of `width` × `height` texels. wgpu's GL
/// backend guesses a texture's kind from its size: one layer makes a plain 2D texture and
/// square layers in multiples of 6 a cube map, and a 2D-array view can read neither; a
/// spare layer keeps it a 2D array (at most SPARE_LAYERS more than needed).
pub fn array_layers(needed: usize, width: usize, height: usize) -> usize {
    let mut layers = needed.max(2);
    if width == height && layers.is_multiple_of(6) {
        layers += 1;
    }
    layers
}

/// A texture of `format`, `width` × `height` texels in `layers` layers (`texture_2d` when
/// `array` is false, else a 2D array), uploaded through the queue with `contents` (texel
/// bytes, layer after layer) when given.
fn texture(
    device: &wgpu::Device,
    label: &str,
    format: wgpu::TextureFormat,
    (width, height, layers): (usize, usize, usize),
    array: bool,
    usage: wgpu::TextureUsages,
    contents: Option<(&wgpu::Queue, &[u8])>,
) -> wgpu::TextureView {
    let descriptor = wgpu::TextureDescriptor {
        label: Some(label),
        size: wgpu::Extent3d {
            width: width as u32,
            height: height as u32,
            depth_or_array_layers: layers as u32,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage,
        view_formats: &[],
    };
    let texture = match contents {
        Some((queue, data)) => device.create_texture_with_data(
            queue,
            &descriptor,
            wgpu::util::TextureDataOrder::LayerMajor,
            data,
        ),
        None => device.create_texture(&descriptor),
    };
    texture.create_view(&wgpu::TextureViewDescriptor {
        label: Some(label),
        dimension: Some(if array {
            wgpu::TextureViewDimension::D2Array
        } else {
            wgpu::TextureViewDimension::D2
        }),
        ..Default::default()
    })
}

/// A texture array of `format` holding `data` (see `texture`), read by the kernels and,
/// when `writable`, also written (a trainable layer's weights after an optimizer step).
pub fn texture_array(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    format: wgpu::TextureFormat,
    extent: (usize, usize, usize),
    data: &[u8],
    writable: bool,
) -> wgpu::TextureView {
    let usage = wgpu::TextureUsages::TEXTURE_BINDING
        | wgpu::TextureUsages::COPY_DST
        | written_usage(writable);
    texture(
        device,
        label,
        format,
        extent,
        true,
        usage,
        Some((queue, data)),
    )
}

/// x's rows as an rgba32float texture array (written by stage_tokens, read by route_tokens
/// and expert_up): D4 / 4 texels per row, token t at row t % height of layer t / height,
/// layers of at most max_texture_dimension_2d rows.
fn x_rows_texture(device: &wgpu::Device, d_model: usize, tokens: usize) -> wgpu::TextureView {
    let texels_per_row = padded_to_vec4(d_model) / 4;
    let height = tokens.clamp(1, device.limits().max_texture_dimension_2d.max(1) as usize);
    let layers = array_layers(tokens.div_ceil(height), texels_per_row, height);
    let usage = wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::TEXTURE_BINDING;
    let extent = (texels_per_row, height, layers);
    texture(
        device,
        "x rows",
        wgpu::TextureFormat::Rgba32Float,
        extent,
        true,
        usage,
        None,
    )
}

/// STORAGE_BINDING for textures the kernels write, nothing otherwise.
fn written_usage(writable: bool) -> wgpu::TextureUsages {
    if writable {
        wgpu::TextureUsages::STORAGE_BINDING
    } else {
        wgpu::TextureUsages::empty()
    }
}

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
    /// b1 `[experts, F]`, then b3 `[experts, F]` when gated (zeros for absent biases).
    pub up_bias: wgpu::Buffer,
    /// W2 `[experts, D, F]` in its stored format.
    pub w2: WeightTextures,
    pub down_bias: wgpu::Buffer,
    pub params: wgpu::Buffer,
}

/// All weights on the device.
#[derive(Debug)]
pub struct GpuWeights {
    /// Router weight, `[N][D4 / 4]` rgba32float texels (rows zero-padded).
    pub router: wgpu::TextureView,
    /// Router bias, a uniform array of MAX_EXPERTS floats (zero-padded).
    pub router_bias: wgpu::Buffer,
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
        let bias_bytes = (2 * d_ff.max(d_model) * 4) as u64;
        let experts_per_shard = (max_binding_bytes / bias_bytes)
            .min(usable_layers(&limits) as u64)
            .min(max_experts_per_shard.unwrap_or(usize::MAX) as u64)
            .max(1) as usize;
        let router = router_texture(
            device,
            queue,
            &weights.router_weight,
            (num_experts, d_model),
            writable,
        );
        let mut router_bias = vec![0.0f32; MAX_EXPERTS as usize];
        if let Some(bias) = &weights.router_bias {
            router_bias[..num_experts].copy_from_slice(bias);
        }
        let router_bias = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("router bias"),
            contents: bytemuck::cast_slice(&router_bias),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        });

        let num_shards = div_ceil(num_experts, experts_per_shard);
        // The router texture and its bias, then each shard's matrices and biases.
        let mut bytes =
            (4 * padded_to_vec4(d_model) * num_experts + 4 * MAX_EXPERTS as usize) as u64;
        let mut shards = Vec::with_capacity(num_shards);
        let mut shard_first_expert = Vec::with_capacity(num_shards + 1);
        for shard in 0..num_shards {
            let first = shard * experts_per_shard;
            let end = (first + experts_per_shard).min(num_experts);
            let count = end - first;
            let range = |per_expert: usize| first * per_expert..end * per_expert;
            let bias_or_zeros = |bias: &Option<Vec<f32>>, per_expert: usize| match bias {
                Some(b) => b[range(per_expert)].to_vec(),
                None => vec![0.0; count * per_expert],
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

/// `n` rounded up to a multiple of 4: the row length of matrices the matmuls read as vec4s.
pub fn padded_to_vec4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Rows of `width` floats, each zero-padded to `padded_to_vec4(width)`.
fn pad_rows(data: &[f32], width: usize) -> std::borrow::Cow<'_, [f32]> {
    let padded = padded_to_vec4(width);
    if padded == width {
        return data.into();
    }
    let mut out = Vec::with_capacity(data.len() / width * padded);
    for row in data.chunks(width) {
        out.extend_from_slice(row);
        out.resize(out.len() + padded - width, 0.0);
    }
    out.into()
}

/// Lengths (in 4-byte elements) of every scratch buffer; a forward fits the scratch when
/// each of its lengths is at most the allocated one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScratchSizes {
    pub x: usize,
    pub logits: usize,
    pub assignments: usize,
    pub tokens: usize,
    pub block_router_sums: usize,
    pub block_counts: usize,
    pub group_kept_prefix: usize,
    pub expert_table: usize,
    pub slots: usize,
    pub hidden: usize,
    pub expert_out: usize,
    pub readback: usize,
}

impl ScratchSizes {
    pub fn for_plan(plan: &ForwardPlan) -> Self {
        let LayerShape {
            num_experts,
            d_model,
            d_ff,
        } = plan.shape;
        let t = plan.num_tokens;
        ScratchSizes {
            // Whole vec4s, at least one: stage_tokens binds x, expert_down hidden, as vec4
            // arrays.
            x: padded_to_vec4(t * d_model).max(4),
            logits: t * num_experts,
            assignments: plan.num_assignments(),
            tokens: t,
            block_router_sums: plan.num_route_blocks * (num_experts + 1),
            block_counts: plan.num_assign_blocks * plan.top_k * num_experts,
            group_kept_prefix: plan.num_groups * num_experts,
            expert_table: plan.expert_table_len(),
            slots: plan.max_slots(),
            hidden: (plan.max_slots() * padded_to_vec4(d_ff)).max(4),
            expert_out: plan.max_slots() * d_model,
            readback: readback_len(plan),
        }
    }

    /// The element-wise maximum.
    pub fn max(self, other: Self) -> Self {
        ScratchSizes {
            x: self.x.max(other.x),
            logits: self.logits.max(other.logits),
            assignments: self.assignments.max(other.assignments),
            tokens: self.tokens.max(other.tokens),
            block_router_sums: self.block_router_sums.max(other.block_router_sums),
            block_counts: self.block_counts.max(other.block_counts),
            group_kept_prefix: self.group_kept_prefix.max(other.group_kept_prefix),
            expert_table: self.expert_table.max(other.expert_table),
            slots: self.slots.max(other.slots),
            hidden: self.hidden.max(other.hidden),
            expert_out: self.expert_out.max(other.expert_out),
            readback: self.readback.max(other.readback),
        }
    }

    /// The largest storage buffer, in bytes (the readback buffer is not a binding).
    pub fn largest_binding_bytes(&self) -> u64 {
        let largest = [
            self.x,
            self.logits,
            self.assignments,
            self.block_router_sums,
            self.block_counts,
            self.expert_table,
            self.hidden,
            self.expert_out,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        largest as u64 * 4
    }

    /// Total bytes of the scratch buffers (for memory reports).
    pub fn total_bytes(&self) -> u64 {
        let elements = 3 * self.x // x, its rows texture (about as large), y
            + self.logits
            + 3 * self.assignments // routes, gates, assignment_slot
            + self.tokens
            + self.block_router_sums
            + 2 * self.block_counts
            + self.group_kept_prefix
            + self.expert_table
            + self.slots
            + self.hidden
            + self.expert_out
            + self.readback;
        elements as u64 * 4
    }
}

/// Elements read back after a forward: y, routes, gates, route_prob_max, the expert table's
/// head (counts, kept, tile_start, n_dropped), router_stats, flags, two u64 timestamps.
pub fn readback_len(plan: &ForwardPlan) -> usize {
    let n = plan.shape.num_experts;
    plan.num_tokens * plan.shape.d_model
        + 2 * plan.num_assignments()
        + plan.num_tokens
        + (3 * n + 2)
        + (n + 2)
        + 1
        + 4
}

/// The scratch buffers of a forward.
#[derive(Debug)]
pub struct Scratch {
    pub sizes: ScratchSizes,
    pub x: wgpu::Buffer,
    /// x's rows as a texture array, for route_tokens and expert_up.
    pub x_rows: wgpu::TextureView,
    pub logits: wgpu::Buffer,
    pub routes: wgpu::Buffer,
    pub gates: wgpu::Buffer,
    pub route_prob_max: wgpu::Buffer,
    pub block_router_sums: wgpu::Buffer,
    pub flags: wgpu::Buffer,
    pub block_counts: wgpu::Buffer,
    pub block_offsets: wgpu::Buffer,
    pub group_kept_prefix: wgpu::Buffer,
    pub expert_table: wgpu::Buffer,
    pub dispatch_args: wgpu::Buffer,
    pub slot_token: wgpu::Buffer,
    pub assignment_slot: wgpu::Buffer,
    pub hidden: wgpu::Buffer,
    pub expert_out: wgpu::Buffer,
    pub y: wgpu::Buffer,
    pub router_stats: wgpu::Buffer,
    pub readback: wgpu::Buffer,
}

impl Scratch {
    pub fn new(
        device: &wgpu::Device,
        sizes: ScratchSizes,
        shape: LayerShape,
        num_shards: usize,
    ) -> Self {
        let num_experts = shape.num_experts;
        let copy_dst = wgpu::BufferUsages::COPY_DST;
        let copy_src = wgpu::BufferUsages::COPY_SRC;
        let none = wgpu::BufferUsages::empty();
        let buffer = |label: &str, elements: usize, usage| {
            storage_buffer(device, label, elements as u64 * 4, usage)
        };
        Scratch {
            sizes,
            x: buffer("x", sizes.x, copy_dst),
            x_rows: x_rows_texture(device, shape.d_model, sizes.tokens),
            logits: buffer("logits", sizes.logits, copy_src),
            routes: buffer("routes", sizes.assignments, copy_src | copy_dst),
            gates: buffer("gates", sizes.assignments, copy_src | copy_dst),
            route_prob_max: buffer("route_prob_max", sizes.tokens, copy_src),
            block_router_sums: buffer("block_router_sums", sizes.block_router_sums, none),
            flags: buffer("flags", 1, copy_dst | copy_src),
            block_counts: buffer("block_counts", sizes.block_counts, none),
            block_offsets: buffer("block_offsets", sizes.block_counts, none),
            group_kept_prefix: buffer("group_kept_prefix", sizes.group_kept_prefix, none),
            expert_table: buffer("expert_table", sizes.expert_table, copy_src),
            dispatch_args: buffer(
                "dispatch_args",
                6 * num_shards,
                wgpu::BufferUsages::INDIRECT,
            ),
            slot_token: buffer("slot_token", sizes.slots, copy_src),
            assignment_slot: buffer("assignment_slot", sizes.assignments, copy_src),
            hidden: buffer("hidden", sizes.hidden, copy_src),
            expert_out: buffer("expert_out", sizes.expert_out, copy_src),
            y: buffer("y", sizes.x, copy_src),
            router_stats: buffer("router_stats", num_experts + 2, copy_src),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: (sizes.readback.max(1) * 4) as u64,
                usage: wgpu::BufferUsages::MAP_READ | copy_dst,
                mapped_at_creation: false,
            }),
        }
    }
}
