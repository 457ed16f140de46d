//! The uniform `Params` structs of the kernels, mirrored field by field from the WGSL
//! (`#[repr(C)]`, u32 fields, padded to 16 bytes); a test checks the sizes through naga.

use bytemuck::{Pod, Zeroable};

/// `RouteParams` of route_tokens.wgsl (and stage_tokens.wgsl, which reads two of them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RouteParams {
    pub num_tokens: u32,
    pub d_model: u32,
    pub num_experts: u32,
    pub top_k: u32,
    pub normalize_top_k: u32,
    pub _pad: [u32; 3],
}

/// `AssignParams` of count_experts, scan_expert_offsets and scatter_assignments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AssignParams {
    pub num_tokens: u32,
    pub num_experts: u32,
    pub top_k: u32,
    pub group_size: u32,
    pub chunks_per_group: u32,
    pub num_blocks: u32,
    /// Assignments kept per group and expert; `u32::MAX` when nothing is dropped.
    pub capacity: u32,
    pub row_tile: u32,
    pub num_shards: u32,
    pub up_tiles_x: u32,
    pub down_tiles_x: u32,
    pub _pad: u32,
}

/// `ExpertParams` of expert_up and expert_down (one per weight shard).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ExpertParams {
    pub d_model: u32,
    pub d_ff: u32,
    pub num_experts: u32,
    pub shard_first_expert: u32,
    pub shard_num_experts: u32,
    pub _pad: [u32; 3],
}

/// `CombineParams` of combine_outputs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CombineParams {
    pub num_tokens: u32,
    pub d_model: u32,
    pub top_k: u32,
    pub scale_by_prob: u32,
    pub pass_through: u32,
    pub _pad: [u32; 3],
}

/// `StatsParams` of reduce_router_stats.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct StatsParams {
    pub num_tokens: u32,
    pub num_experts: u32,
    pub num_blocks: u32,
    pub _pad: u32,
}
