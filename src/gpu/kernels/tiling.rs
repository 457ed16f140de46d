//! The shape of the expert matmuls' workgroup tile, as the kernels are built for it. Which
//! tile a batch gets is the plan's choice (`plan::tiling`).

use crate::gpu::kernels::shaders::{
    MATMUL_BLOCKS, MATMUL_BLOCK_ROWS, MATMUL_LANES, ROW_LANES_CHOICES,
};

/// Tile shapes the matmuls can be built for: every `ROW_LANES` with every block and
/// block height (those taller than wide are never built).
pub const TILINGS: usize = ROW_LANES_CHOICES.len() * MATMUL_BLOCKS.len() * MATMUL_BLOCK_ROWS.len();

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

    /// Which of the TILINGS this is (the slot of its pipelines); a value no tiling has
    /// counts as the first choice.
    pub fn variant(self) -> usize {
        let position =
            |choices: &[u32], value: u32| choices.iter().position(|&c| c == value).unwrap_or(0);
        let lanes_index = position(&ROW_LANES_CHOICES, self.row_lanes);
        let block_index = position(&MATMUL_BLOCKS, self.block);
        let rows_index = position(&MATMUL_BLOCK_ROWS, self.block_rows);
        (lanes_index * MATMUL_BLOCKS.len() + block_index) * MATMUL_BLOCK_ROWS.len() + rows_index
    }

    /// The overrides every matmul kernel takes for this tiling: ROW_LANES, QUADS,
    /// ROW_QUADS and LANES.
    pub fn constants(self) -> [(&'static str, f64); 4] {
        [
            ("ROW_LANES", self.row_lanes as f64),
            ("QUADS", (self.block / 4) as f64),
            ("ROW_QUADS", (self.block_rows / 4) as f64),
            ("LANES", self.lanes() as f64),
        ]
    }
}
