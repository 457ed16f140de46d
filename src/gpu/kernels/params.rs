//! The uniform `Params` structs of the kernels, mirrored field by field from the WGSL
//! (`#[repr(C)]`, u32 fields, padded to 16 bytes); a test checks the sizes through naga.

use bytemuck::{Pod, Zeroable};

/// `RouteParams` of route_tokens.wgsl (and stage_tokens.wgsl, which reads two of them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct RouteParams {
    pub num_tokens: u32,
    pub d_model: u32,
    pub num_experts: u32,
    pub top_k: u32,
    pub normalize_top_k: u32,
    /// 1: sigmoid scores; 0: softmax.
    pub sigmoid_scores: u32,
    /// Expert groups of group-limited top-k (0: none), the groups kept, and the group
    /// score (0 top2_sum, 1 max).
    pub n_group: u32,
    pub topk_group: u32,
    pub group_score_max: u32,
    pub routed_scaling_factor: f32,
    /// The shared expert's slices, chosen by every token after its top_k (0: none), and
    /// 1 when its gate is the router's row num_experts.
    pub shared_experts: u32,
    pub shared_gate: u32,
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
    /// Experts under capacity (the shared expert's slices after them never drop).
    pub routed_experts: u32,
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
    /// The routed choices (the first of top_k): a token passes through when all of them
    /// dropped; the shared expert's after them are always weighed by their gates.
    pub routed_top_k: u32,
    /// 1 with `gate_on: input`: the gates scaled the experts' inputs instead.
    pub gate_input: u32,
    pub _pad: u32,
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

/// `BackwardParams` of every backward kernel (backward_common.wgsl). The router's offsets
/// are in floats into its parameter (gradient) buffer, `u32::MAX` for an absent bias.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct BackwardParams {
    pub num_tokens: u32,
    pub d_model: u32,
    pub d_ff: u32,
    pub num_experts: u32,
    pub top_k: u32,
    pub row_tile: u32,
    pub max_slots: u32,
    pub gated: u32,
    pub scale_by_prob: u32,
    pub normalize_top_k: u32,
    pub pass_through: u32,
    pub hidden_stride: u32,
    pub aux_coef: f32,
    pub z_coef: f32,
    pub router_weight_at: u32,
    pub router_bias_at: u32,
    /// 1 after `forward_experts_train`: no router in the graph (see gate_backward.wgsl).
    pub pre_routed: u32,
    /// The whole batch's tokens (the aux and z losses' T), when it runs in chunks.
    pub loss_tokens: u32,
    /// 1 for a batch's chunks after the first: the gradients add up in chunk order.
    pub accumulate: u32,
    /// 1: the router's scores are sigmoids.
    pub sigmoid_scores: u32,
    pub routed_scaling_factor: f32,
    /// The router's rows (d_logits' columns): the routed experts, and a shared expert's
    /// gate; the routed experts and each token's routed choices (num_experts and top_k
    /// beyond them are the shared expert's slices).
    pub router_rows: u32,
    pub routed_experts: u32,
    pub routed_top_k: u32,
}

/// `ShardParams` of the backward's weight-gradient kernels (backward_common.wgsl): a weight
/// shard's experts and where each tensor starts in its parameter buffer (floats,
/// `u32::MAX` when absent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ShardParams {
    pub first_expert: u32,
    pub num_experts: u32,
    pub w1_at: u32,
    pub b1_at: u32,
    pub w2_at: u32,
    pub b2_at: u32,
    pub w3_at: u32,
    pub b3_at: u32,
}

/// `OptimizerParams` of optimizer_step.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct OptimizerParams {
    pub count: u32,
    /// 0 SGD, 1 AdamW.
    pub kind: u32,
    pub learning_rate: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// lr / (1 − β1^t).
    pub step_size: f32,
    /// √(1 − β2^t).
    pub second_moment_correction: f32,
    pub _pad: [u32; 3],
}

/// `RefreshParams` of refresh_expert_weights.wgsl and refresh_router_weights.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RefreshParams {
    pub rows: u32,
    pub cols: u32,
    /// Texels per row quad (experts) or 4 × texels per row (router): `cols` rounded up
    /// to a multiple of 4.
    pub width: u32,
    pub quads: u32,
    pub first_expert: u32,
    pub num_experts: u32,
    pub tensor_at: u32,
    pub _pad: u32,
}
