//! The shape of the expert matmuls' workgroup tile, as the kernels are built for it. Which
//! tile a batch gets is the plan's choice (`plan::tiling`).

use crate::gpu::kernels::shaders::{MATMUL_BLOCKS, MATMUL_LANES};

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
}
