//! What a backward derives from its training forward's plan: the `Params` every backward
//! kernel reads, the weight-gradient matmuls' tiling, and the grids of its dispatches.
//! Pure arithmetic.

use crate::config::RouterScore;
use crate::cpu_backward::LossCoefficients;
use crate::error::{MoeError, Result};
use crate::gpu::device::allocate::padded_to_vec4;
use crate::gpu::device::encode::{div_ceil, grid_2d};
use crate::gpu::kernels::params::BackwardParams;
use crate::gpu::kernels::shaders::{MATMUL_BLOCK_ROWS, TRAINING_WORKGROUP};
use crate::gpu::kernels::tiling::MatmulTiling;
use crate::gpu::plan::forward::{ForwardPlan, Routing};
use crate::gpu::plan::parameter_shards::ParameterShards;
use crate::weights::LayerShape;

// The per-slot matmuls take row quads of one row tile (so of one expert): every row tile
// must be a whole number of quads.
const _: () = {
    let mut i = 0;
    while i < MATMUL_BLOCK_ROWS.len() {
        assert!(MATMUL_BLOCK_ROWS[i].is_multiple_of(4));
        i += 1;
    }
};

/// Which part of a batch a backward pass is: the batch's tokens (the losses' T) and whether
/// earlier chunks of it already wrote gradients to add to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPart {
    pub loss_tokens: usize,
    pub accumulate: bool,
}

impl BatchPart {
    /// A batch in one pass of `plan`.
    pub fn whole(plan: &ForwardPlan) -> Self {
        BatchPart {
            loss_tokens: plan.num_tokens,
            accumulate: false,
        }
    }
}

/// The `BackwardParams` of the backward of `plan` (a forward of `routing`, `part` of its
/// batch) for a layer of `gated` experts whose parameters sit on the device as `shards`.
pub fn backward_params(
    (plan, part): (&ForwardPlan, BatchPart),
    gated: bool,
    routing: Routing,
    coefficients: LossCoefficients,
    shards: &ParameterShards,
) -> BackwardParams {
    let shape = plan.shape;
    BackwardParams {
        num_tokens: plan.num_tokens as u32,
        d_model: shape.d_model as u32,
        d_ff: shape.d_ff as u32,
        num_experts: shape.num_experts as u32,
        top_k: plan.top_k as u32,
        row_tile: plan.tiling.row_tile() as u32,
        max_slots: plan.max_slots() as u32,
        gated: gated as u32,
        scale_by_prob: plan.scale_by_prob as u32,
        normalize_top_k: plan.normalize_top_k as u32,
        pass_through: plan.pass_through as u32,
        hidden_stride: padded_to_vec4(shape.d_ff) as u32,
        aux_coef: coefficients.aux,
        z_coef: coefficients.z,
        router_weight_at: 0,
        router_bias_at: shards.router_bias_at(),
        pre_routed: (routing == Routing::PreRouted) as u32,
        loss_tokens: part.loss_tokens as u32,
        accumulate: part.accumulate as u32,
        sigmoid_scores: (plan.router.score == RouterScore::Sigmoid) as u32,
        routed_scaling_factor: plan.router.routed_scaling_factor,
        router_rows: plan.router_rows() as u32,
        routed_experts: plan.routed_experts as u32,
        routed_top_k: plan.router.top_k as u32,
    }
}

/// The weight-gradient matmuls' tiling for a layer of `shape` with matmul blocks `block`
/// wide: their rows are D (dW2) or F (dW1, dW3), not slots, so the cost model sees whole
/// rows, and its columns the other of D and F.
pub fn weight_gradient_tiling(shape: LayerShape, block: u32) -> MatmulTiling {
    let rows = shape.d_model.max(shape.d_ff) as f64;
    MatmulTiling::for_shape(rows, shape.d_model, shape.d_ff, block, None, None)
}

/// The grids of the backward's direct dispatches (see `passes::backward`; the per-slot
/// matmuls are indirect, with the training forward's arguments): each kernel but the
/// matmuls runs one invocation per output element (or per 4×4 block of them),
/// TRAINING_WORKGROUP to a workgroup; the weight-gradient matmuls one workgroup per
/// output tile of each expert (x: column tiles, y: row tiles, z: the shard's experts). The
/// kernels that write the experts' gradients run once per weight shard (its gradient
/// buffer): one grid per shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackwardGrids {
    pub gate_backward: (u32, u32),
    /// stage_tokens on dy: the forward's route grid.
    pub stage_dy: (u32, u32),
    pub expert_down_backward: Vec<(u32, u32, u32)>,
    pub expert_up_backward: Vec<(u32, u32, u32)>,
    pub expert_bias_backward: Vec<(u32, u32)>,
    pub router_backward: (u32, u32, u32),
    pub combine_backward: (u32, u32, u32),
}

impl BackwardGrids {
    /// The grids for the backward of `plan` with weight-gradient tiles `tiling`, weight
    /// shards of `shard_experts` experts each, on a device allowing `max_dim` workgroups
    /// per dimension.
    pub fn new(
        plan: &ForwardPlan,
        (gated, shard_experts): (bool, &[usize]),
        tiling: MatmulTiling,
        max_dim: u32,
    ) -> Result<Self> {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = plan.shape;
        let t = plan.num_tokens;
        debug_assert_eq!(shard_experts.iter().sum::<usize>(), n);
        let projections = if gated { 2 } else { 1 };
        let grid = |invocations| training_grid(invocations, max_dim);
        let tiles = |rows: usize, cols: usize, experts: usize| {
            let grid = (
                div_ceil(cols, tiling.col_tile()),
                div_ceil(rows, tiling.row_tile()),
                experts,
            );
            let largest = grid.0.max(grid.1).max(grid.2);
            if largest > max_dim as usize {
                return Err(MoeError::DeviceLimit {
                    limit: "max_compute_workgroups_per_dimension (weight-gradient tiles)",
                    needed: largest as u64,
                    allowed: max_dim as u64,
                });
            }
            Ok((grid.0 as u32, grid.1 as u32, grid.2 as u32))
        };
        Ok(BackwardGrids {
            gate_backward: grid(t)?,
            stage_dy: grid_2d(plan.num_route_blocks, max_dim)?,
            expert_down_backward: shard_experts
                .iter()
                .map(|&count| tiles(d, f, count))
                .collect::<Result<_>>()?,
            expert_up_backward: shard_experts
                .iter()
                .map(|&count| tiles(f, d, projections * count))
                .collect::<Result<_>>()?,
            expert_bias_backward: shard_experts
                .iter()
                .map(|&count| grid(count * (2 * f.div_ceil(4) + d.div_ceil(4))))
                .collect::<Result<_>>()?,
            router_backward: tiles(plan.router_rows(), d, 1)?,
            combine_backward: tiles(t, d, 1)?,
        })
    }
}

/// Workgroups of TRAINING_WORKGROUP for `invocations`, laid out in 2-D.
fn training_grid(invocations: usize, max_dim: u32) -> Result<(u32, u32)> {
    if invocations > u32::MAX as usize {
        return Err(MoeError::DeviceLimit {
            limit: "invocations of one backward dispatch (u32 indices)",
            needed: invocations as u64,
            allowed: u32::MAX as u64,
        });
    }
    grid_2d(div_ceil(invocations, TRAINING_WORKGROUP as usize), max_dim)
}
