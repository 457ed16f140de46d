//! A trainable layer's tensors as one flat f32 layout on the host, in the native names'
//! order, which its gradients, its weights and AdamW's saved state follow:
//! `ParameterLayout` is where each tensor starts, and the conversions between it and the
//! host's tensors. On the device the same values sit in one buffer per weight shard
//! (`parameter_shards`). With a shared expert the layout is the device's (its slices
//! among the experts, its gate among the router's rows: `shared_experts`), and what is
//! read out of it comes back under the layer's own names.

use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;
use crate::gpu::plan::shared_experts::{routed_and_shared, LayerTensors, SharedExperts};
use crate::gradients::Gradients;
use crate::weights::{LayerShape, MoeWeights, SharedExpert};

/// Where each tensor starts in the flat buffer (in floats; `None`: the layer has none).
/// Order: router.weight, router.bias, w1, b1, w2, b2, w3, b3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterLayout {
    /// The device's: with a shared expert, its slices are among the experts.
    pub shape: LayerShape,
    /// The shared expert's slices and gate, when the layer has one.
    pub shared: Option<SharedExperts>,
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
    /// The layout of `weights`' tensors as the device holds them (`shared`: the shared
    /// expert they hold among their experts, see `with_shared_as_experts`); training needs
    /// f32 expert matrices.
    pub fn new(weights: &MoeWeights, shared: Option<SharedExperts>) -> Result<Self> {
        weights.check_trainable()?;
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = weights.shape;
        let router_rows = router_rows(n, shared);
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
            shared,
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

    /// The router's rows: the experts, or the routed ones and a shared expert's gate.
    pub fn router_rows(&self) -> usize {
        router_rows(self.shape.num_experts, self.shared)
    }

    /// The layer's own shape: the routed experts, without a shared expert's slices.
    fn routed_shape(&self) -> LayerShape {
        LayerShape {
            num_experts: self.shape.num_experts - self.shared.map_or(0, |s| s.experts),
            ..self.shape
        }
    }

    /// The tensors of values in this layout under the layer's own names: the routed ones,
    /// and the shared expert's split back out of the experts it rides as.
    fn own_tensors(&self, flat: &[f32]) -> (LayerTensors, Option<SharedExpert>) {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        let slice = |at: usize, len: usize| flat[at..at + len].to_vec();
        let part = |at: Option<usize>, len: usize| at.map(|at| slice(at, len));
        let rows = self.router_rows();
        let tensors = LayerTensors {
            router_weight: slice(self.router_weight, rows * d),
            router_bias: part(self.router_bias, rows),
            w1: slice(self.w1, n * f * d),
            b1: part(self.b1, n * f),
            w2: slice(self.w2, n * d * f),
            b2: part(self.b2, n * d),
            w3: part(self.w3, n * f * d),
            b3: part(self.b3, n * f),
        };
        match self.shared {
            Some(shared) => {
                let (routed, shared) = routed_and_shared(tensors, self.routed_shape(), shared);
                (routed, Some(shared))
            }
            None => (tensors, None),
        }
    }

    /// Gradients read back in this layout, with `x`'s.
    pub fn gradients(&self, flat: &[f32], x: Vec<f32>) -> Gradients {
        let (t, shared) = self.own_tensors(flat);
        Gradients {
            x,
            router_weight: t.router_weight,
            router_bias: t.router_bias,
            w1: t.w1,
            b1: t.b1,
            w2: t.w2,
            b2: t.b2,
            w3: t.w3,
            b3: t.b3,
            shared,
        }
    }

    /// The layer's weights from values in this layout (f32 expert matrices).
    pub fn weights(&self, flat: &[f32]) -> MoeWeights {
        let shape = self.routed_shape();
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = shape;
        let (t, shared) = self.own_tensors(flat);
        MoeWeights {
            shape,
            router_weight: t.router_weight,
            router_bias: t.router_bias,
            // Not a parameter: the layer adds it back (see `MoeLayer::trained_weights`).
            score_bias: None,
            w1: ExpertMatrices::from_f32(n, f, d, t.w1),
            b1: t.b1,
            w2: ExpertMatrices::from_f32(n, d, f, t.w2),
            b2: t.b2,
            w3: t.w3.map(|w3| ExpertMatrices::from_f32(n, f, d, w3)),
            b3: t.b3,
            shared,
        }
    }
}

/// Rows of the router of `experts` (with a shared expert's slices among them): one per
/// routed expert, and one for the shared expert's gate.
fn router_rows(experts: usize, shared: Option<SharedExperts>) -> usize {
    shared.map_or(experts, |s| experts - s.experts + s.gate as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::plan::shared_experts::with_shared_as_experts;

    /// Expanding, flattening as training holds it and reading back gives the layer's own
    /// tensors, for a width off F (padding), with biases and a gate.
    #[test]
    fn the_split_inverts_the_expansion() {
        let (n, d, f, fs) = (3, 5, 4, 10);
        let mut weights = MoeWeights::random(
            LayerShape {
                num_experts: n,
                d_model: d,
                d_ff: f,
            },
            true,
            true,
            7,
        );
        weights.shared = Some(SharedExpert::random((d, fs), true, true, true, 9));
        let (expanded, slices) = with_shared_as_experts(&weights).unwrap().unwrap();
        assert_eq!(slices.experts, 3);
        let layout = ParameterLayout::new(&expanded, Some(slices)).unwrap();
        assert_eq!(layout.weights(&layout.flatten(&expanded)), weights);
    }
}
