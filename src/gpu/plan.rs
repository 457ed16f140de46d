//! `ForwardPlan`: every size a forward of `T` tokens derives from the config and the
//! layer shape (blocks, groups, capacity, slot and tile bounds, buffer lengths). Pure
//! arithmetic, computed on the host before anything is encoded.

use crate::config::{DropPolicy, MoeConfig};
use crate::error::{MoeError, Result};
use crate::gpu::shaders::{
    BLOCK_TOKENS, COMBINE_WORKGROUP, MATMUL_BLOCKS, MATMUL_BLOCK_ROWS, MATMUL_LANES,
    ROW_LANES_CHOICES,
};
use crate::weights::LayerShape;

/// The sizes of one forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardPlan {
    pub num_tokens: usize,
    pub top_k: usize,
    pub shape: LayerShape,
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
    pub scale_by_prob: bool,
    pub pass_through: bool,
    /// The expert matmuls' tiling for this batch.
    pub tiling: MatmulTiling,
    /// An upper bound of the row tiles of all experts' padded segments.
    pub max_tiles: usize,
    /// The same bound for the shortest row tile any tiling has: what the expert table
    /// holds room for, so that a smaller batch (whose tiles may be shorter) never needs a
    /// larger table.
    pub max_tiles_any_tiling: usize,
}

/// The shape of the expert matmuls' workgroup tile: `row_lanes` × (lanes / `row_lanes`)
/// invocations with a `block_rows` × `block` output block each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulTiling {
    pub row_lanes: u32,
    /// Rows of an invocation's block (one of MATMUL_BLOCK_ROWS, at most `block`).
    pub block_rows: u32,
    /// Columns of an invocation's block (one of MATMUL_BLOCKS); fixes the lanes.
    pub block: u32,
}

impl MatmulTiling {
    /// Rows of a tile; expert segments are padded to a multiple of it.
    pub fn row_tile(self) -> usize {
        (self.row_lanes * self.block_rows) as usize
    }

    /// Columns of a tile.
    pub fn col_tile(self) -> usize {
        (self.lanes() / self.row_lanes * self.block) as usize
    }

    /// Invocations per workgroup (`LANES`), fixed by the block.
    pub fn lanes(self) -> u32 {
        let index = MATMUL_BLOCKS.iter().position(|&b| b == self.block);
        MATMUL_LANES[index.unwrap_or(0)]
    }

    /// Time per multiply-add relative to a square block's. An invocation's block of r × c
    /// 4×4 quads loads r + c operand quads per step along k for r·c quad products; on
    /// lavapipe about half a square block's time goes to the products and half to the
    /// loads (measured with one expert, T = 4096, D = 256, F = 1024: 4-, 8- and 16-row
    /// blocks 16 wide take 1.69, 1.19 and 1 times as long).
    fn relative_cost(self) -> f64 {
        let r = (self.block_rows / 4) as f64;
        let c = (self.block / 4) as f64;
        let loads_per_product = (r + c) / (r * c);
        let square = 2.0 / c;
        0.5 + 0.5 * loads_per_product / square
    }

    /// The tiling with blocks `block` wide for `rows_per_expert` rows on average, with
    /// output widths `d_ff` (up) and `d_model` (down); `row_lanes` and `block_rows`, when
    /// given, are kept. Small experts want short row tiles (each expert's last tile is half
    /// empty on average), which short blocks give at a higher cost per multiply-add;
    /// narrow outputs want narrow column tiles (lanes past the last column idle); among
    /// equals the shortest tile wins (on lavapipe it is also the fastest: 16-row tiles beat
    /// 32-, 64- and 128-row ones by 3–24% at 128 tokens per expert). The cost is the
    /// product of the wastes.
    pub fn for_shape(
        rows_per_expert: f64,
        d_model: usize,
        d_ff: usize,
        block: u32,
        row_lanes: Option<u32>,
        block_rows: Option<u32>,
    ) -> Self {
        let rows = rows_per_expert.max(1.0);
        let cost = |tiling: MatmulTiling| {
            let row_tile = tiling.row_tile() as f64;
            let padded_rows = if rows >= row_tile {
                rows + row_tile / 2.0
            } else {
                row_tile
            };
            let col_tile = tiling.col_tile();
            let columns =
                |width: usize| (width.div_ceil(col_tile) * col_tile) as f64 / width as f64;
            padded_rows / rows * (columns(d_ff) + columns(d_model)) / 2.0 * tiling.relative_cost()
        };
        let candidates = ROW_LANES_CHOICES
            .iter()
            .filter(|&&lanes| row_lanes.is_none_or(|forced| forced == lanes))
            .flat_map(|&row_lanes| {
                MATMUL_BLOCK_ROWS
                    .iter()
                    .filter(|&&rows| {
                        rows <= block && block_rows.is_none_or(|forced| forced == rows)
                    })
                    .map(move |&block_rows| MatmulTiling {
                        row_lanes,
                        block_rows,
                        block,
                    })
            });
        let mut best: Option<(MatmulTiling, f64)> = None;
        for candidate in candidates {
            let candidate_cost = cost(candidate);
            if best.is_none_or(|(_, best_cost)| candidate_cost < best_cost * 0.9999) {
                best = Some((candidate, candidate_cost));
            }
        }
        // Forced values no tiling has (MoeLayer rejects them up front) leave no candidate:
        // then a square block on one row lane, which every block has.
        best.map_or(
            MatmulTiling {
                row_lanes: ROW_LANES_CHOICES[0],
                block_rows: block,
                block,
            },
            |(tiling, _)| tiling,
        )
    }
}

/// `ceil(a / b)`.
pub fn div_ceil(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

impl ForwardPlan {
    /// The plan for `num_tokens` tokens with matmul blocks `block` wide; `row_lanes` and
    /// `block_rows` force those of the matmul tiling.
    pub fn new(
        config: &MoeConfig,
        shape: LayerShape,
        num_tokens: usize,
        block: u32,
        row_lanes: Option<u32>,
        block_rows: Option<u32>,
    ) -> Result<Self> {
        let group_size = config.group_size_for(num_tokens)?;
        let num_groups = num_tokens / group_size;
        let chunks_per_group = div_ceil(group_size, BLOCK_TOKENS as usize);
        let capacity = config.capacity(group_size, shape.num_experts);
        let assignments = num_tokens
            .checked_mul(config.top_k)
            .filter(|&a| a < u32::MAX as usize)
            .ok_or(MoeError::DeviceLimit {
                limit: "assignments per forward (T·k, u32 indices)",
                needed: (num_tokens as u64).saturating_mul(config.top_k as u64),
                allowed: u32::MAX as u64 - 1,
            })?;
        // Kept assignments cannot exceed T·k, nor capacity per group and expert.
        let kept_bound = match capacity {
            Some(c) => assignments.min(
                num_groups
                    .saturating_mul(shape.num_experts)
                    .saturating_mul(c),
            ),
            None => assignments,
        };
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
            top_k: config.top_k,
            shape,
            group_size,
            num_groups,
            chunks_per_group,
            num_assign_blocks: num_groups * chunks_per_group,
            num_route_blocks: div_ceil(num_tokens, BLOCK_TOKENS as usize),
            capacity,
            normalize_top_k: config.normalize_top_k,
            scale_by_prob: config.scale_by_prob,
            pass_through: config.drop_policy == DropPolicy::PassThrough,
            tiling,
            max_tiles: tile_bound(tiling.row_tile()),
            max_tiles_any_tiling: tile_bound(shortest_row_tile),
        })
    }

    pub fn num_assignments(&self) -> usize {
        self.num_tokens * self.top_k
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

/// Lays `workgroups` out as (x, y) with x at most `max_per_dimension`; kernels rebuild the
/// linear index as `x + y·num_workgroups.x` and skip the surplus of the last row.
pub fn grid_2d(workgroups: usize, max_per_dimension: u32) -> Result<(u32, u32)> {
    let max = max_per_dimension.max(1) as usize;
    if workgroups == 0 {
        return Ok((0, 1));
    }
    let x = workgroups.min(max);
    let y = div_ceil(workgroups, x);
    if y > max {
        return Err(MoeError::DeviceLimit {
            limit: "max_compute_workgroups_per_dimension (squared)",
            needed: workgroups as u64,
            allowed: (max * max) as u64,
        });
    }
    Ok((x as u32, y as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiling(rows_per_expert: f64, block: u32) -> MatmulTiling {
        MatmulTiling::for_shape(rows_per_expert, 256, 1024, block, None, None)
    }

    #[test]
    fn row_tiles_follow_the_tokens_per_expert() {
        // Few rows per expert: short blocks; many: square 16-row blocks.
        assert_eq!(tiling(4.0, 16).row_tile(), 8);
        assert_eq!(tiling(8.0, 16).row_tile(), 8);
        assert_eq!(tiling(4096.0, 16).block_rows, 16);
        assert_eq!(tiling(4.0, 8).block_rows, 4);
        assert_eq!(tiling(4096.0, 8).block_rows, 8);
        for rows in [1.0, 3.0, 17.0, 100.0, 1e6] {
            for block in MATMUL_BLOCKS {
                let t = tiling(rows, block);
                assert!(t.block_rows <= block && MATMUL_BLOCK_ROWS.contains(&t.block_rows));
                assert_eq!(t.block, block);
            }
        }
    }

    #[test]
    fn forced_choices_are_kept() {
        let t = MatmulTiling::for_shape(4.0, 256, 1024, 16, Some(8), None);
        assert_eq!(t.row_lanes, 8);
        let t = MatmulTiling::for_shape(4096.0, 256, 1024, 16, None, Some(4));
        assert_eq!(t.block_rows, 4);
        let t = MatmulTiling::for_shape(4096.0, 256, 1024, 8, Some(2), Some(8));
        assert_eq!((t.row_lanes, t.block_rows, t.block), (2, 8, 8));
        // Rows past the block's side: no such tiling.
        let t = MatmulTiling::for_shape(4.0, 256, 1024, 8, None, Some(16));
        assert_eq!((t.row_lanes, t.block_rows, t.block), (1, 8, 8));
    }
}
