//! The experts' activations (`"activation"` of the config JSON) and what one hidden unit
//! computes with them.

use serde::{Deserialize, Serialize};

/// The expert FFN's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))` (PyTorch's default `nn.GELU()`).
    Gelu,
    /// Tanh-approximated GELU (`nn.GELU(approximate="tanh")`, T5's `gelu_new`).
    GeluTanh,
    /// `x·sigmoid(x)` (Mixtral's SwiGLU gate).
    Silu,
    /// `relu(x)²` (Nemotron-H).
    Relu2,
    /// `x·sigmoid(1.702·x)` (transformers' QuickGELU; ERNIE 4.5 VL's experts).
    QuickGelu,
    /// gpt-oss's clamped SwiGLU, gated only: with `a' = min(a, L)` and
    /// `v' = clamp(v, −L, L)`, `h = a'·σ(α·a') ⊙ (v' + 1)` (`L = swiglu_limit`,
    /// `α = swiglu_alpha`).
    SwigluOai,
}

impl Activation {
    /// The code the expert kernels use for it (see `shaders/expert_up.wgsl`).
    pub(crate) fn shader_code(self) -> u32 {
        match self {
            Activation::Relu => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
            Activation::Silu => 3,
            Activation::Relu2 => 4,
            Activation::SwigluOai => 5,
            Activation::QuickGelu => 6,
        }
    }
}

/// What one hidden unit of an expert computes from its pre-activations: the activation of
/// `a` and, for gated FFNs, the factor `v` contributes (`v` itself, or gpt-oss's
/// `clamp(v, −L, L) + 1`), with swiglu_oai's limit and slope.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HiddenUnit {
    pub activation: Activation,
    pub swiglu_limit: f32,
    pub swiglu_alpha: f32,
}

impl From<Activation> for HiddenUnit {
    /// The activation with gpt-oss's swiglu_oai constants (L = 7, α = 1.702).
    fn from(activation: Activation) -> Self {
        HiddenUnit {
            activation,
            swiglu_limit: 7.0,
            swiglu_alpha: 1.702,
        }
    }
}
