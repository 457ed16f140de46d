//! Which tile shape of the expert matmuls a batch gets: a cost model of padding and
//! operand loads measured on lavapipe, from the average tokens per expert and the output
//! widths.

use crate::gpu::kernels::shaders::{MATMUL_BLOCK_ROWS, ROW_LANES_CHOICES};
use crate::gpu::kernels::tiling::MatmulTiling;

impl MatmulTiling {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::shaders::MATMUL_BLOCKS;

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
