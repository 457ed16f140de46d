//! A forward's scratch buffers (and x's rows as a texture array), sized by a plan's
//! `ScratchSizes` for the largest batch seen, then reused.

use crate::gpu::device::allocate::{array_layers, padded_to_vec4, storage_buffer, texture};
use crate::gpu::plan::sizes::ScratchSizes;
use crate::weights::LayerShape;

/// x's rows as an rgba32float texture array (written by stage_tokens, read by route_tokens
/// and expert_up): D4 / 4 texels per row, token t at row t % height of layer t / height,
/// layers of at most max_texture_dimension_2d rows.
pub(crate) fn x_rows_texture(
    device: &wgpu::Device,
    d_model: usize,
    tokens: usize,
) -> wgpu::TextureView {
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
    /// Each slot's gate with `gate_on: input` (scatter_assignments; read by expert_up, and
    /// by expert_up_backward and combine_backward).
    pub slot_gate: wgpu::Buffer,
    pub hidden: wgpu::Buffer,
    pub expert_out: wgpu::Buffer,
    /// The pre-activations of a trainable layer's forward (expert_up.wgsl).
    pub pre_activations: wgpu::Buffer,
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
            slot_gate: buffer("slot_gate", sizes.slot_gates, copy_src),
            hidden: buffer("hidden", sizes.hidden, copy_src),
            expert_out: buffer("expert_out", sizes.expert_out, copy_src),
            pre_activations: buffer("pre_activations", sizes.pre_activations, copy_src),
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
