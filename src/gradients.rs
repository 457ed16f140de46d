//! What a backward returns: the gradients of every tensor the layer holds and of `x`
//! (native names and shapes, SPEC "Backward"), the same for the CPU reference and the GPU.

use crate::error::Result;
use crate::tensor_io::{serialize_tensors, OwnedTensor};
use crate::weights::{LayerShape, SharedExpert};

/// dL/d of every tensor the layer holds (native names and shapes), and of `x`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    /// The shape of `x`.
    pub x: Vec<f32>,
    /// `[N, D]`.
    pub router_weight: Vec<f32>,
    /// `[N]`, when the layer has a router bias.
    pub router_bias: Option<Vec<f32>>,
    /// `[N, F, D]`.
    pub w1: Vec<f32>,
    pub b1: Option<Vec<f32>>,
    /// `[N, D, F]`.
    pub w2: Vec<f32>,
    pub b2: Option<Vec<f32>>,
    /// `[N, F, D]`, gated layers.
    pub w3: Option<Vec<f32>>,
    pub b3: Option<Vec<f32>>,
    /// dL/d of each shared-expert tensor, when the layer has one.
    pub shared: Option<SharedExpert>,
}

/// The gradients of the experts alone on pre-routed tokens (`forward_experts`).
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertsGradients {
    /// `x` and every tensor of the layer (the router's are zeros: it is not in the graph).
    pub gradients: Gradients,
    /// `[T, k]`: of the caller's `top_k_weights`.
    pub top_k_weights: Vec<f32>,
}

impl Gradients {
    /// Every gradient under its native name (SPEC "Backward"), `x` first, absent biases
    /// and `experts.w3` of ungated layers left out.
    pub fn named(&self) -> Vec<(&'static str, &[f32])> {
        let tensors: [(&'static str, Option<&Vec<f32>>); 9] = [
            ("x", Some(&self.x)),
            ("router.weight", Some(&self.router_weight)),
            ("router.bias", self.router_bias.as_ref()),
            ("experts.w1", Some(&self.w1)),
            ("experts.b1", self.b1.as_ref()),
            ("experts.w2", Some(&self.w2)),
            ("experts.b2", self.b2.as_ref()),
            ("experts.w3", self.w3.as_ref()),
            ("experts.b3", self.b3.as_ref()),
        ];
        let mut named: Vec<(&'static str, &[f32])> = tensors
            .into_iter()
            .filter_map(|(name, tensor)| tensor.map(|t| (name, t.as_slice())))
            .collect();
        if let Some(shared) = &self.shared {
            named.extend(shared.tensors());
        }
        named
    }

    /// Every gradient as [`Gradients::named`] lists them, with its shape (`x`'s is
    /// `x_shape`; the weights' are the native ones).
    pub fn named_with_shapes(
        &self,
        x_shape: &[usize],
        shape: LayerShape,
    ) -> Vec<(&'static str, &[f32], Vec<usize>)> {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = shape;
        self.named()
            .into_iter()
            .map(|(name, values)| {
                if let Some(shared) = self.shared.as_ref().filter(|_| name.starts_with("shared.")) {
                    let dims = shared
                        .named(d)
                        .into_iter()
                        .find(|(n, _, _)| *n == name)
                        .map(|(_, _, dims)| dims)
                        .unwrap_or_default();
                    return (name, values, dims);
                }
                let dims = match name {
                    "x" => x_shape.to_vec(),
                    "router.weight" => vec![n, d],
                    "router.bias" => vec![n],
                    "experts.w1" | "experts.w3" => vec![n, f, d],
                    "experts.w2" => vec![n, d, f],
                    "experts.b2" => vec![n, d],
                    _ => vec![n, f],
                };
                (name, values, dims)
            })
            .collect()
    }

    /// The gradients as safetensors bytes (f32, native names; `x` of `x_shape`).
    pub fn to_safetensors_bytes(&self, x_shape: &[usize], shape: LayerShape) -> Result<Vec<u8>> {
        let tensors = self
            .named_with_shapes(x_shape, shape)
            .into_iter()
            .map(|(name, values, dims)| (name.to_string(), OwnedTensor::f32(dims, values)))
            .collect();
        serialize_tensors(&tensors)
    }
}
