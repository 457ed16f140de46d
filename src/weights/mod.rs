//! `MoeWeights`: the layer's tensors in the native layout, the expert matrices in the
//! format they were stored in, loaded from the namings people's checkpoints use (native,
//! labml_nn, Hugging Face Switch, Mixtral and the families in safetensors: `namings`,
//! gpt-oss's and Llama 4's transposed experts: `transposed`; llama.cpp's GGUF:
//! `gguf_layer`), or initialised from a seed.
//!
//! Native layout (`nn.Linear`'s `[out, in]` per expert, experts stacked first):
//! router `[N, D]` (+ bias `[N]`, + `score_bias [N]`), `w1 [N, F, D]` (+ `b1 [N, F]`), `w2 [N, D, F]`
//! (+ `b2 [N, D]`), and for gated FFNs `w3 [N, F, D]` (+ `b3 [N, F]`).

mod gguf_layer;
mod namings;
mod per_expert;
mod shared;
mod tensor_source;
mod transposed;

pub use gguf_layer::{is_gguf, GgufLayerInfo};
pub use shared::{SharedExpert, SHARED_NAMES};

use std::collections::BTreeMap;

use crate::error::{MoeError, Result};
use crate::formats::{ExpertMatrices, WeightFormat};
use crate::rng::SeededRng;
use crate::tensor_io::{serialize_tensors, OwnedTensor};

/// The sizes that define a layer's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub num_experts: usize,
    pub d_model: usize,
    pub d_ff: usize,
}

/// All weights of one MoE layer, native layout: the expert matrices in the format they
/// were stored in (f32, f16, bf16 or a ggml quantization), the router and the biases in
/// f32 (they are a few per mille of the bytes, and the router's softmax wants them exact).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeWeights {
    pub shape: LayerShape,
    pub router_weight: Vec<f32>,
    pub router_bias: Option<Vec<f32>>,
    /// `[N]` (`router.score_bias`; DeepSeek-V3's `e_score_correction_bias`): added to the
    /// scores to choose the experts, never to the gates; not trained by gradient.
    pub score_bias: Option<Vec<f32>>,
    /// `[N, F, D]`.
    pub w1: ExpertMatrices,
    pub b1: Option<Vec<f32>>,
    /// `[N, D, F]`.
    pub w2: ExpertMatrices,
    pub b2: Option<Vec<f32>>,
    /// `[N, F, D]`, gated FFNs only.
    pub w3: Option<ExpertMatrices>,
    pub b3: Option<Vec<f32>>,
    /// The shared expert every token goes through (DeepSeek, Qwen2-MoE, GLM-4.5, Llama 4).
    pub shared: Option<SharedExpert>,
}

/// An error naming `name` at its first non-finite value.
fn check_finite(name: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(MoeError::tensor(
            name,
            format!("non-finite value {} at flat index {index}", values[index]),
        )),
        None => Ok(()),
    }
}

impl MoeWeights {
    /// Seeded weights drawn like `nn.Linear`'s default init: uniform in ±1/√fan_in.
    pub fn random(shape: LayerShape, gated: bool, with_biases: bool, seed: u64) -> Self {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = shape;
        let mut rng = SeededRng::new(seed);
        let bound_d = 1.0 / (d as f32).sqrt();
        let bound_f = 1.0 / (f as f32).sqrt();
        // One stream, drawn in a fixed order, so a seed names one layer.
        let router_weight = rng.uniform_vec(n * d, bound_d);
        let router_bias = with_biases.then(|| rng.uniform_vec(n, bound_d));
        let w1 = ExpertMatrices::from_f32(n, f, d, rng.uniform_vec(n * f * d, bound_d));
        let b1 = with_biases.then(|| rng.uniform_vec(n * f, bound_d));
        let w2 = ExpertMatrices::from_f32(n, d, f, rng.uniform_vec(n * d * f, bound_f));
        let b2 = with_biases.then(|| rng.uniform_vec(n * d, bound_f));
        let w3 =
            gated.then(|| ExpertMatrices::from_f32(n, f, d, rng.uniform_vec(n * f * d, bound_d)));
        let b3 = (gated && with_biases).then(|| rng.uniform_vec(n * f, bound_d));
        MoeWeights {
            shape,
            router_weight,
            router_bias,
            score_bias: None,
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
            shared: None,
        }
    }

    /// Checks that every tensor has the length its shape implies and holds only finite
    /// values; errors use the native tensor names.
    pub fn check(&self) -> Result<()> {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        if n == 0 || d == 0 || f == 0 {
            return Err(MoeError::tensor(
                "router.weight",
                format!("empty layer shape {:?}", self.shape),
            ));
        }
        let vectors: [(&str, Option<&Vec<f32>>, usize); 6] = [
            ("router.weight", Some(&self.router_weight), n * d),
            ("router.bias", self.router_bias.as_ref(), n),
            ("router.score_bias", self.score_bias.as_ref(), n),
            ("experts.b1", self.b1.as_ref(), n * f),
            ("experts.b2", self.b2.as_ref(), n * d),
            ("experts.b3", self.b3.as_ref(), n * f),
        ];
        for (name, data, len) in vectors {
            let Some(data) = data else { continue };
            if data.len() != len {
                return Err(MoeError::tensor(
                    name,
                    format!("{} values, expected {len} for {:?}", data.len(), self.shape),
                ));
            }
            check_finite(name, data)?;
        }
        let matrices = [
            ("experts.w1", Some(&self.w1), [n, f, d]),
            ("experts.w2", Some(&self.w2), [n, d, f]),
            ("experts.w3", self.w3.as_ref(), [n, f, d]),
        ];
        for (name, matrices, dims) in matrices {
            let Some(m) = matrices else { continue };
            let (held, len) = (m.len(), dims.iter().product::<usize>());
            if [m.count, m.rows, m.cols] != dims || held != len {
                return Err(MoeError::tensor(
                    name,
                    format!(
                        "[{}, {}, {}] holding {held} values, expected {dims:?} for {:?}",
                        m.count, m.rows, m.cols, self.shape
                    ),
                ));
            }
            if let Some(values) = m.f32_values() {
                check_finite(name, values)?;
            }
        }
        if self.b3.is_some() && self.w3.is_none() {
            return Err(MoeError::tensor("experts.b3", "present without experts.w3"));
        }
        match &self.shared {
            Some(shared) => shared.check(d, self.w3.is_some()),
            None => Ok(()),
        }
    }

    /// The same weights with the expert matrices converted to `format` (see
    /// [`ExpertMatrices::convert`]); router and biases stay f32.
    pub fn converted(&self, format: WeightFormat) -> Result<Self> {
        Ok(MoeWeights {
            w1: self.w1.convert(format, "experts.w1")?,
            w2: self.w2.convert(format, "experts.w2")?,
            w3: match &self.w3 {
                Some(w3) => Some(w3.convert(format, "experts.w3")?),
                None => None,
            },
            shape: self.shape,
            router_weight: self.router_weight.clone(),
            router_bias: self.router_bias.clone(),
            score_bias: self.score_bias.clone(),
            b1: self.b1.clone(),
            b2: self.b2.clone(),
            b3: self.b3.clone(),
            shared: self.shared.clone(),
        })
    }

    /// Training needs f32 expert matrices: the first one stored otherwise is an error
    /// naming the tensor and its format.
    pub fn check_trainable(&self) -> Result<()> {
        for (tensor, matrices) in [
            ("experts.w1", Some(&self.w1)),
            ("experts.w2", Some(&self.w2)),
            ("experts.w3", self.w3.as_ref()),
        ] {
            if let Some(m) = matrices.filter(|m| m.format != crate::formats::WeightFormat::F32) {
                return Err(MoeError::TrainingNeedsF32 {
                    tensor: tensor.to_string(),
                    format: m.format.name().to_string(),
                });
            }
        }
        Ok(())
    }

    /// The weights as safetensors bytes in the native naming, expert matrices in their
    /// stored dtype (F32, F16 or BF16; a quantized format is an error naming the tensor).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = self.shape;
        let mut tensors = BTreeMap::new();
        let mut put = |name: &str, shape: Vec<usize>, data: Option<&Vec<f32>>| {
            if let Some(data) = data {
                tensors.insert(name.to_string(), OwnedTensor::f32(shape, data));
            }
        };
        put("router.weight", vec![n, d], Some(&self.router_weight));
        put("router.bias", vec![n], self.router_bias.as_ref());
        put("router.score_bias", vec![n], self.score_bias.as_ref());
        put("experts.b1", vec![n, f], self.b1.as_ref());
        put("experts.b2", vec![n, d], self.b2.as_ref());
        put("experts.b3", vec![n, f], self.b3.as_ref());
        for (name, values, dims) in self.shared.iter().flat_map(|s| s.named(d)) {
            tensors.insert(name.to_string(), OwnedTensor::f32(dims, values));
        }
        for (name, matrices) in [
            ("experts.w1", Some(&self.w1)),
            ("experts.w2", Some(&self.w2)),
            ("experts.w3", self.w3.as_ref()),
        ] {
            let Some(m) = matrices else { continue };
            let shape = vec![m.count, m.rows, m.cols];
            let tensor = OwnedTensor::stored(name, shape, m.format, m.stored_vec())?;
            tensors.insert(name.to_string(), tensor);
        }
        serialize_tensors(&tensors)
    }

    /// Expert `e`'s slice of a stacked per-expert tensor of `per_expert` values each.
    pub fn expert_slice(tensor: &[f32], expert: usize, per_expert: usize) -> &[f32] {
        &tensor[expert * per_expert..(expert + 1) * per_expert]
    }
}
