//! A trainable layer's tensors as one flat f32 layout on the host, in the native names'
//! order, which its gradients, its weights and AdamW's saved state follow:
//! `ParameterLayout` is where each tensor starts, and the conversions between it and the
//! host's tensors. On the device the same values sit in one buffer per weight shard
//! (`parameter_shards`).

use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;
use crate::gradients::Gradients;
use crate::weights::{LayerShape, MoeWeights};

/// Where each tensor starts in the flat buffer (in floats; `None`: the layer has none).
/// Order: router.weight, router.bias, w1, b1, w2, b2, w3, b3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterLayout {
    pub shape: LayerShape,
    /// The router's rows: the experts, or with a shared expert riding the dispatch (see
    /// `shared_experts`) the routed ones and its gate.
    pub router_rows: usize,
    pub router_weight: usize,
    pub router_bias: Option<usize>,
    pub w1: usize,
    pub b1: Option<usize>,
    pub w2: usize,
    pub b2: Option<usize>,
    pub w3: Option<usize>,
    pub b3: Option<usize>,
    /// Floats in all.
    pub total: usize,
}

impl ParameterLayout {
    /// The layout of `weights`' tensors; training needs f32 expert matrices.
    pub fn new(weights: &MoeWeights) -> Result<Self> {
        weights.check_trainable()?;
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = weights.shape;
        let router_rows = weights.router_weight.len() / d.max(1);
        let mut total = 0usize;
        let mut take = |present: bool, len: usize| {
            present.then(|| {
                let at = total;
                total += len;
                at
            })
        };
        let router_weight = take(true, router_rows * d).unwrap_or(0);
        let router_bias = take(weights.router_bias.is_some(), router_rows);
        let w1 = take(true, n * f * d).unwrap_or(0);
        let b1 = take(weights.b1.is_some(), n * f);
        let w2 = take(true, n * d * f).unwrap_or(0);
        let b2 = take(weights.b2.is_some(), n * d);
        let w3 = take(weights.w3.is_some(), n * f * d);
        let b3 = take(weights.b3.is_some(), n * f);
        if total >= u32::MAX as usize {
            return Err(MoeError::DeviceLimit {
                limit: "trainable parameters (u32 offsets)",
                needed: total as u64,
                allowed: u32::MAX as u64 - 1,
            });
        }
        Ok(ParameterLayout {
            shape: weights.shape,
            router_rows,
            router_weight,
            router_bias,
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
            total,
        })
    }

    /// Bytes of the flat buffer.
    pub fn bytes(&self) -> u64 {
        self.total as u64 * 4
    }

    /// `weights`' values in this layout.
    pub fn flatten(&self, weights: &MoeWeights) -> Vec<f32> {
        let mut flat = Vec::with_capacity(self.total);
        let matrix = |m: &ExpertMatrices| m.f32_values().unwrap_or_default().to_vec();
        flat.extend_from_slice(&weights.router_weight);
        flat.extend(weights.router_bias.iter().flatten());
        flat.extend(matrix(&weights.w1));
        flat.extend(weights.b1.iter().flatten());
        flat.extend(matrix(&weights.w2));
        flat.extend(weights.b2.iter().flatten());
        flat.extend(weights.w3.as_ref().map(matrix).unwrap_or_default());
        flat.extend(weights.b3.iter().flatten());
        flat
    }

    fn slice(flat: &[f32], at: usize, len: usize) -> Vec<f32> {
        flat[at..at + len].to_vec()
    }

    /// Gradients read back in this layout, with `x`'s.
    pub fn gradients(&self, flat: &[f32], x: Vec<f32>) -> Gradients {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        let part = |at: Option<usize>, len: usize| at.map(|at| Self::slice(flat, at, len));
        Gradients {
            x,
            router_weight: Self::slice(flat, self.router_weight, self.router_rows * d),
            router_bias: part(self.router_bias, self.router_rows),
            w1: Self::slice(flat, self.w1, n * f * d),
            b1: part(self.b1, n * f),
            w2: Self::slice(flat, self.w2, n * d * f),
            b2: part(self.b2, n * d),
            w3: part(self.w3, n * f * d),
            b3: part(self.b3, n * f),
            shared: None,
        }
    }

    /// The layer's weights from values in this layout (f32 expert matrices).
    pub fn weights(&self, flat: &[f32]) -> MoeWeights {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        let part = |at: Option<usize>, len: usize| at.map(|at| Self::slice(flat, at, len));
        let matrices = |at: usize, rows: usize, cols: usize| {
            ExpertMatrices::from_f32(n, rows, cols, Self::slice(flat, at, n * rows * cols))
        };
        MoeWeights {
            shape: self.shape,
            router_weight: Self::slice(flat, self.router_weight, self.router_rows * d),
            router_bias: part(self.router_bias, self.router_rows),
            // Not a parameter: the layer adds it back (see `MoeLayer::trained_weights`).
            score_bias: None,
            w1: matrices(self.w1, f, d),
            b1: part(self.b1, n * f),
            w2: matrices(self.w2, d, f),
            b2: part(self.b2, n * d),
            w3: self.w3.map(|at| matrices(at, f, d)),
            b3: part(self.b3, n * f),
            // A shared expert is among the experts here (see `MoeLayer::trained_weights`).
            shared: None,
        }
    }
}
