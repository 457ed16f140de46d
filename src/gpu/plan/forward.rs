//! `ForwardPlan`: every size a forward of `T` tokens derives from the config and the
//! layer shape (blocks, groups, capacity, slot and tile bounds, buffer lengths), the grids
//! of its direct dispatches and its kernels' `Params`. Pure arithmetic, computed on the
//! host before anything is encoded.

use crate::config::{DropPolicy, GroupScore, MoeConfig, Router, RouterScore};
use crate::error::{MoeError, Result};
use crate::gpu::device::allocate::padded_to_vec4;
use crate::gpu::device::encode::{div_ceil, grid_2d};
use crate::gpu::kernels::params::{AssignParams, CombineParams, RouteParams, StatsParams};
use crate::gpu::kernels::shaders::{
    BLOCK_TOKENS, COMBINE_WORKGROUP, MATMUL_BLOCK_ROWS, ROW_LANES_CHOICES,
};
use crate::gpu::kernels::tiling::MatmulTiling;
use crate::gpu::plan::shared_experts::SharedExperts;
use crate::weights::LayerShape;

/// The sizes of one forward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForwardPlan {
    pub num_tokens: usize,
    /// Choices per token: the routed `k`, then the shared expert's slices.
    pub top_k: usize,
    /// The experts the kernels run: the routed ones, then the shared expert's slices.
    pub shape: LayerShape,
    /// The routed experts (the router's, and what the output reports; their choices per
    /// token are `router.top_k`).
    pub routed_experts: usize,
    /// The shared expert's slices and gate, when the layer has one.
    pub shared: Option<SharedExperts>,
    pub group_size: usize,
    pub num_groups: usize,
    /// Blocks of BLOCK_TOKENS per group (count_experts, scatter_assignments).
    pub chunks_per_group: usize,
    pub num_assign_blocks: usize,
    /// Blocks of BLOCK_TOKENS over all tokens (stage_tokens, route_tokens).
    pub num_route_blocks: usize,
    /// Assignments kept per group and expert; `None` when nothing is dropped.
    pub capacity: Option<usize>,
    /// How the gates combine the outputs (the config's, or the experts-only pass's:
    /// the caller's weights scale, nothing passes through).
    pub normalize_top_k: bool,
    /// The router's scores, groups and scaling (route_tokens).
    pub router: Router,
    pub scale_by_prob: bool,
    /// `gate_on: input`: the gates multiply the experts' inputs (expert_up), not outputs.
    pub gate_input: bool,
    pub pass_through: bool,
    /// The expert matmuls' tiling for this batch.
    pub tiling: MatmulTiling,
    /// An upper bound of the row tiles of all experts' padded segments.
    pub max_tiles: usize,
    /// The same bound for the shortest row tile any tiling has: what the expert table
    /// holds room for, so that a smaller batch (whose tiles may be shorter) never needs a
    /// larger table.
    pub max_tiles_any_tiling: usize,
    /// Floats per slot of the pre-activations a trainable layer's forward keeps for the
    /// backward (a, then v when gated, each F4 long); 0 when none are kept.
    pub pre_activation_stride: usize,
}

impl ForwardPlan {
    /// The plan for `num_tokens` tokens with matmul blocks `block` wide over the routed
    /// experts of `routed` (and `shared`'s slices); `row_lanes` and `block_rows` force those
    /// of the matmul tiling; `keep_pre_activations` for a trainable layer.
    pub fn new(
        config: &MoeConfig,
        (routed, shared): (LayerShape, Option<SharedExperts>),
        num_tokens: usize,
        block: u32,
        (row_lanes, block_rows): (Option<u32>, Option<u32>),
        keep_pre_activations: bool,
    ) -> Result<Self> {
        let group_size = config.group_size_for(num_tokens)?;
        let num_groups = num_tokens / group_size;
        let chunks_per_group = div_ceil(group_size, BLOCK_TOKENS as usize);
        let capacity = config.capacity(group_size, routed.num_experts);
        let shared_experts = shared.map_or(0, |s| s.experts);
        let top_k = config.top_k + shared_experts;
        let shape = LayerShape {
            num_experts: routed.num_experts + shared_experts,
            ..routed
        };
        num_tokens
            .checked_mul(top_k)
            .filter(|&a| a < u32::MAX as usize)
            .ok_or(MoeError::DeviceLimit {
                limit: "assignments per forward (T·k, u32 indices)",
                needed: (num_tokens as u64).saturating_mul(top_k as u64),
                allowed: u32::MAX as u64 - 1,
            })?;
        // Kept routed assignments cannot exceed T·k, nor capacity per group and expert;
        // the shared expert's T·m are always kept.
        let routed_assignments = num_tokens * config.top_k;
        let kept_bound = match capacity {
            Some(c) => routed_assignments.min(
                num_groups
                    .saturating_mul(routed.num_experts)
                    .saturating_mul(c),
            ),
            None => routed_assignments,
        } + num_tokens * shared_experts;
        let tiling = MatmulTiling::for_shape(
            kept_bound as f64 / shape.num_experts as f64,
            shape.d_model,
            shape.d_ff,
            block,
            row_lanes,
            block_rows,
        );
        // Each expert's segment is padded to whole row tiles: at most one extra per expert.
        let tile_bound =
            |row_tile: usize| div_ceil(kept_bound, row_tile) + shape.num_experts.min(kept_bound);
        let shortest_row_tile = (ROW_LANES_CHOICES[0] * MATMUL_BLOCK_ROWS[0]) as usize;
        Ok(ForwardPlan {
            num_tokens,
            top_k,
            shape,
            routed_experts: routed.num_experts,
            shared,
            group_size,
            num_groups,
            chunks_per_group,
            num_assign_blocks: num_groups * chunks_per_group,
            num_route_blocks: div_ceil(num_tokens, BLOCK_TOKENS as usize),
            capacity,
            normalize_top_k: config.normalize_top_k,
            router: config.router(),
            scale_by_prob: config.scale_by_prob,
            gate_input: config.gates_input(),
            pass_through: config.drop_policy == DropPolicy::PassThrough,
            tiling,
            max_tiles: tile_bound(tiling.row_tile()),
            max_tiles_any_tiling: tile_bound(shortest_row_tile),
            pre_activation_stride: if keep_pre_activations {
                padded_to_vec4(shape.d_ff) * if config.gated { 2 } else { 1 }
            } else {
                0
            },
        })
    }

    pub fn num_assignments(&self) -> usize {
        self.num_tokens * self.top_k
    }

    /// Rows of the router (and columns of the logits): the routed experts, and the shared
    /// expert's gate.
    pub fn router_rows(&self) -> usize {
        self.routed_experts + self.shared.is_some_and(|s| s.gate) as usize
    }

    /// Rows of the `hidden` and `expert_out` buffers: whole row tiles.
    pub fn max_slots(&self) -> usize {
        self.max_tiles * self.tiling.row_tile()
    }

    /// Capacity as the kernels take it (`u32::MAX`: no dropping).
    pub fn capacity_u32(&self) -> u32 {
        self.capacity
            .map_or(u32::MAX, |c| c.min(u32::MAX as usize) as u32)
    }

    /// Length of the expert table: counts, kept, tile_start, n_dropped, tile_expert.
    pub fn expert_table_len(&self) -> usize {
        3 * self.shape.num_experts + 2 + self.max_tiles_any_tiling
    }

    /// Workgroups of combine_outputs.
    pub fn combine_workgroups(&self) -> usize {
        div_ceil(
            self.num_tokens * self.shape.d_model,
            COMBINE_WORKGROUP as usize,
        )
    }
}

/// Who chose each token's experts: the layer's router, or the caller (`forward_experts`:
/// the routes and weights are written to the workspace, and the router's two dispatches,
/// route_tokens and reduce_router_stats, are left out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    Router,
    PreRouted,
}

/// The 2-D grids of a forward's direct dispatches (the expert matmuls' are indirect: the
/// scan writes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardGrids {
    /// stage_tokens and route_tokens: one workgroup per block of tokens.
    pub route: (u32, u32),
    /// count_experts and scatter_assignments: one per block of a capacity group.
    pub assign: (u32, u32),
    pub combine: (u32, u32),
}

/// Every kernel's `Params` for one forward.
pub struct KernelParams {
    pub route: RouteParams,
    pub assign: AssignParams,
    pub combine: CombineParams,
    pub stats: StatsParams,
}

impl ForwardPlan {
    /// The grids on a device allowing `max_per_dimension` workgroups per dimension.
    pub fn grids(&self, max_per_dimension: u32) -> Result<ForwardGrids> {
        Ok(ForwardGrids {
            route: grid_2d(self.num_route_blocks, max_per_dimension)?,
            assign: grid_2d(self.num_assign_blocks, max_per_dimension)?,
            combine: grid_2d(self.combine_workgroups(), max_per_dimension)?,
        })
    }

    /// Every kernel's `Params` for this plan over weights in `num_shards` shards.
    pub fn kernel_params(&self, num_shards: usize) -> KernelParams {
        let LayerShape {
            num_experts,
            d_model,
            d_ff,
        } = self.shape;
        let shared_experts = self.shared.map_or(0, |s| s.experts) as u32;
        KernelParams {
            route: RouteParams {
                num_tokens: self.num_tokens as u32,
                d_model: d_model as u32,
                num_experts: self.routed_experts as u32,
                top_k: self.router.top_k as u32,
                normalize_top_k: self.normalize_top_k as u32,
                sigmoid_scores: (self.router.score == RouterScore::Sigmoid) as u32,
                n_group: self.router.groups.map_or(0, |g| g.count as u32),
                topk_group: self.router.groups.map_or(0, |g| g.kept as u32),
                group_score_max: self
                    .router
                    .groups
                    .is_some_and(|g| g.score == GroupScore::Max)
                    as u32,
                routed_scaling_factor: self.router.routed_scaling_factor,
                shared_experts,
                shared_gate: self.shared.is_some_and(|s| s.gate) as u32,
            },
            assign: AssignParams {
                num_tokens: self.num_tokens as u32,
                num_experts: num_experts as u32,
                top_k: self.top_k as u32,
                group_size: self.group_size as u32,
                chunks_per_group: self.chunks_per_group as u32,
                num_blocks: self.num_assign_blocks as u32,
                capacity: self.capacity_u32(),
                row_tile: self.tiling.row_tile() as u32,
                num_shards: num_shards as u32,
                up_tiles_x: div_ceil(d_ff, self.tiling.col_tile()) as u32,
                down_tiles_x: div_ceil(d_model, self.tiling.col_tile()) as u32,
                routed_experts: self.routed_experts as u32,
            },
            combine: CombineParams {
                num_tokens: self.num_tokens as u32,
                d_model: d_model as u32,
                top_k: self.top_k as u32,
                scale_by_prob: self.scale_by_prob as u32,
                pass_through: self.pass_through as u32,
                routed_top_k: self.router.top_k as u32,
                gate_input: self.gate_input as u32,
                _pad: 0,
            },
            stats: StatsParams {
                num_tokens: self.num_tokens as u32,
                num_experts: self.routed_experts as u32,
                num_blocks: self.num_route_blocks as u32,
                _pad: 0,
            },
        }
    }
}
