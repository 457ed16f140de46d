//! How a trainable layer's parameters (and alike their gradients and the optimizer's
//! moments) sit on the device: the router's tensors in one buffer, then the experts of each
//! weight shard in a buffer of their own, laid out within it as `ParameterLayout` lays out
//! the whole layer (w1, b1, w2, b2, w3, b3 of the shard's experts) but with every row of an
//! expert tensor padded with zeros to a whole number of vec4s, so that the kernels write
//! their gradients four at a time. Every buffer is one binding, so a layer trains whatever
//! its size as long as one shard fits one binding; the host keeps `ParameterLayout`'s
//! order (for `AdamWState`, the gradients, the weights), and `split` and `join` convert
//! between the two.

use std::ops::Range;

use crate::gpu::device::allocate::padded_to_vec4;
use crate::gpu::kernels::params::ShardParams;
use crate::gpu::plan::parameters::ParameterLayout;
use crate::weights::LayerShape;

/// Where each expert tensor starts in a shard's buffer (floats, multiples of 4; `None`:
/// absent). Rows are padded: w1 and w3 rows are D4 long, w2 rows F4, b1 and b3 F4, b2 D4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertOffsets {
    pub w1: usize,
    pub b1: Option<usize>,
    pub w2: usize,
    pub b2: Option<usize>,
    pub w3: Option<usize>,
    pub b3: Option<usize>,
    /// Floats in the shard's buffer.
    pub total: usize,
}

/// The experts of one weight shard and where their tensors sit in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterShard {
    pub first_expert: usize,
    pub num_experts: usize,
    pub offsets: ExpertOffsets,
}

/// The device buffers of a trainable layer's parameters: buffer 0 the router (weight
/// `[N, D]`, then its bias `[N]`), buffer 1 + s weight shard s's experts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParameterShards {
    pub layout: ParameterLayout,
    pub shards: Vec<ParameterShard>,
}

/// The offset the kernels take for a tensor (`u32::MAX` when absent).
fn kernel_offset(at: Option<usize>) -> u32 {
    at.map_or(u32::MAX, |at| at as u32)
}

impl ParameterShards {
    /// The buffers for `layout`'s tensors with the experts split as `shards` (first
    /// expert, count).
    pub fn new(layout: ParameterLayout, shards: &[(usize, usize)]) -> Self {
        let (d4, f4) = padded_rows(layout.shape);
        let shards = shards
            .iter()
            .map(|&(first_expert, num_experts)| {
                let (d, f) = (layout.shape.d_model, layout.shape.d_ff);
                let mut total = 0usize;
                let mut take = |present: bool, per_expert: usize| {
                    present.then(|| {
                        let at = total;
                        total += num_experts * per_expert;
                        at
                    })
                };
                let w1 = take(true, f * d4).unwrap_or(0);
                let b1 = take(layout.b1.is_some(), f4);
                let w2 = take(true, d * f4).unwrap_or(0);
                let b2 = take(layout.b2.is_some(), d4);
                let w3 = take(layout.w3.is_some(), f * d4);
                let b3 = take(layout.b3.is_some(), f4);
                ParameterShard {
                    first_expert,
                    num_experts,
                    offsets: ExpertOffsets {
                        w1,
                        b1,
                        w2,
                        b2,
                        w3,
                        b3,
                        total,
                    },
                }
            })
            .collect();
        ParameterShards { layout, shards }
    }

    /// Floats of one expert's tensors in a shard's buffer (rows padded).
    pub fn expert_floats(layout: &ParameterLayout) -> usize {
        let LayerShape {
            d_model: d,
            d_ff: f,
            ..
        } = layout.shape;
        let (d4, f4) = padded_rows(layout.shape);
        let bias = |present: Option<usize>, len: usize| present.map_or(0, |_| len);
        f * d4
            + d * f4
            + layout.w3.map_or(0, |_| f * d4)
            + bias(layout.b1, f4)
            + bias(layout.b2, d4)
            + bias(layout.b3, f4)
    }

    /// Floats of the router's buffer: its weight, then its bias, then zeros to a whole
    /// vec4 (the optimizer steps four at a time).
    pub fn router_floats(&self) -> usize {
        let (n, d) = (self.layout.router_rows(), self.layout.shape.d_model);
        padded_to_vec4(n * d + self.layout.router_bias.map_or(0, |_| n))
    }

    /// Floats of every buffer: the router's, then each shard's.
    pub fn buffer_floats(&self) -> Vec<usize> {
        std::iter::once(self.router_floats())
            .chain(self.shards.iter().map(|s| s.offsets.total))
            .collect()
    }

    /// Where the router's bias starts in its buffer (`u32::MAX` when absent).
    pub fn router_bias_at(&self) -> u32 {
        let n = self.layout.router_rows();
        kernel_offset(
            self.layout
                .router_bias
                .map(|_| n * self.layout.shape.d_model),
        )
    }

    /// The `ShardParams` the backward's weight-gradient kernels read for each shard.
    pub fn kernel_params(&self) -> Vec<ShardParams> {
        self.shards
            .iter()
            .map(|shard| {
                let o = &shard.offsets;
                ShardParams {
                    first_expert: shard.first_expert as u32,
                    num_experts: shard.num_experts as u32,
                    w1_at: o.w1 as u32,
                    b1_at: kernel_offset(o.b1),
                    w2_at: o.w2 as u32,
                    b2_at: kernel_offset(o.b2),
                    w3_at: kernel_offset(o.w3),
                    b3_at: kernel_offset(o.b3),
                }
            })
            .collect()
    }

    /// For every buffer, its pieces in the buffer's order.
    fn pieces(&self) -> Vec<Vec<Piece>> {
        let LayerShape {
            d_model: d,
            d_ff: f,
            ..
        } = self.layout.shape;
        let (d4, f4) = padded_rows(self.layout.shape);
        let l = &self.layout;
        let unpadded = |host: usize, device: usize, len: usize| Piece {
            host,
            device,
            rows: 1,
            cols: len,
            stride: len,
        };
        let rows = l.router_rows();
        let mut router = vec![unpadded(l.router_weight, 0, rows * d)];
        if let Some(at) = l.router_bias {
            router.push(unpadded(at, rows * d, rows));
        }
        let mut all = vec![router];
        for shard in &self.shards {
            let (first, count) = (shard.first_expert, shard.num_experts);
            let o = &shard.offsets;
            // (host tensor, device tensor, rows per expert, columns, padded columns)
            let tensors = [
                (Some(l.w1), Some(o.w1), f, d, d4),
                (l.b1, o.b1, 1, f, f4),
                (Some(l.w2), Some(o.w2), d, f, f4),
                (l.b2, o.b2, 1, d, d4),
                (l.w3, o.w3, f, d, d4),
                (l.b3, o.b3, 1, f, f4),
            ];
            all.push(
                tensors
                    .into_iter()
                    .filter_map(|(host, device, rows, cols, stride)| {
                        Some(Piece {
                            host: host? + first * rows * cols,
                            device: device?,
                            rows: count * rows,
                            cols,
                            stride,
                        })
                    })
                    .collect(),
            );
        }
        all
    }

    /// Values in the host's flat layout, as the device buffers hold them (padding zero).
    pub fn split(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        self.pieces()
            .into_iter()
            .zip(self.buffer_floats())
            .map(|(pieces, floats)| {
                let mut buffer = vec![0.0f32; floats];
                for piece in pieces {
                    for row in 0..piece.rows {
                        let (host, device) = piece.row(row);
                        buffer[device].copy_from_slice(&flat[host]);
                    }
                }
                buffer
            })
            .collect()
    }

    /// The device buffers' values in the host's flat layout.
    pub fn join(&self, buffers: &[Vec<f32>]) -> Vec<f32> {
        let mut flat = vec![0.0f32; self.layout.total];
        for (pieces, buffer) in self.pieces().into_iter().zip(buffers) {
            for piece in pieces {
                for row in 0..piece.rows {
                    let (host, device) = piece.row(row);
                    flat[host].copy_from_slice(&buffer[device]);
                }
            }
        }
        flat
    }
}

/// D and F rounded up to whole vec4s: the padded rows of the shard buffers.
fn padded_rows(shape: LayerShape) -> (usize, usize) {
    (padded_to_vec4(shape.d_model), padded_to_vec4(shape.d_ff))
}

/// `rows` rows of `cols` values, contiguous from `host` in the host's layout and `stride`
/// apart from `device` in a device buffer.
struct Piece {
    host: usize,
    device: usize,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Piece {
    /// Row `row`'s (host range, device range).
    fn row(&self, row: usize) -> (Range<usize>, Range<usize>) {
        let host = self.host + row * self.cols;
        let device = self.device + row * self.stride;
        (host..host + self.cols, device..device + self.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::MoeWeights;

    #[test]
    fn split_and_join_are_inverse_over_uneven_shards() {
        for (gated, biases) in [(false, false), (true, true), (false, true)] {
            let shape = LayerShape {
                num_experts: 5,
                d_model: 3,
                d_ff: 2,
            };
            let weights = MoeWeights::random(shape, gated, biases, 7);
            let layout = ParameterLayout::new(&weights, None).unwrap();
            let shards = ParameterShards::new(layout, &[(0, 2), (2, 2), (4, 1)]);
            let flat: Vec<f32> = (0..layout.total).map(|i| i as f32).collect();
            let buffers = shards.split(&flat);
            assert_eq!(buffers.len(), 4);
            assert_eq!(shards.join(&buffers), flat);
            // Shard 1's w1 holds experts 2 and 3's rows (D = 3 padded to 4), in order.
            let w1 = &buffers[2][..2 * 2 * 4];
            let row = |r: usize| {
                let at = layout.w1 + (2 * 2 + r) * 3;
                [at as f32, (at + 1) as f32, (at + 2) as f32, 0.0]
            };
            let expected: Vec<f32> = (0..4).flat_map(row).collect();
            assert_eq!(w1, &expected[..]);
            // Every tensor starts on a vec4.
            for shard in &shards.shards {
                let o = shard.offsets;
                for at in [Some(o.w1), o.b1, Some(o.w2), o.b2, o.w3, o.b3]
                    .into_iter()
                    .flatten()
                {
                    assert_eq!(at % 4, 0);
                }
            }
        }
    }
}
