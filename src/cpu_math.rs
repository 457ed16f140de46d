//! The arithmetic the CPU reference's modules share: the dot product of every matmul, and
//! each hidden unit's activation, gate factor and their derivatives (in f64), as SPEC
//! defines them. GPU twins: the matmul cores' loops and `shaders/activation.wgsl`.

use crate::config::{Activation, HiddenUnit};

/// `Σ a[i]·b[i]` with eight partial sums (vectorizable), added pairwise at the end.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks_a = a.chunks_exact(8);
    let mut chunks_b = b.chunks_exact(8);
    for (ca, cb) in (&mut chunks_a).zip(&mut chunks_b) {
        for lane in 0..8 {
            lanes[lane] += ca[lane] * cb[lane];
        }
    }
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let quads = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    (quads[0] + quads[2]) + (quads[1] + quads[3]) + tail
}

/// quick_gelu's sigmoid slope: `a·σ(1.702·a)`, as transformers' QuickGELUActivation.
pub const QUICK_GELU_SLOPE: f64 = 1.702;

/// The activation `act(a)`, evaluated in f64 for a reference-grade result.
pub fn activate(unit: impl Into<HiddenUnit>, a: f32) -> f32 {
    let unit = unit.into();
    let a = a as f64;
    let h = match unit.activation {
        Activation::Relu => a.max(0.0),
        Activation::Gelu => 0.5 * a * (1.0 + libm::erf(a / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (a + 0.044715 * a * a * a);
            0.5 * a * (1.0 + inner.tanh())
        }
        Activation::Silu => a / (1.0 + (-a).exp()),
        Activation::Relu2 => a.max(0.0) * a.max(0.0),
        Activation::QuickGelu => a / (1.0 + (-QUICK_GELU_SLOPE * a).exp()),
        Activation::SwigluOai => {
            let a = a.min(unit.swiglu_limit as f64);
            a / (1.0 + (-(unit.swiglu_alpha as f64) * a).exp())
        }
    };
    h as f32
}

/// What the gate projection `v` of a gated FFN contributes: `v`, or for swiglu_oai
/// `clamp(v, −L, L) + 1`.
pub fn gate_value(unit: impl Into<HiddenUnit>, v: f32) -> f32 {
    let unit = unit.into();
    match unit.activation {
        Activation::SwigluOai => {
            let limit = unit.swiglu_limit;
            v.clamp(-limit, limit) + 1.0
        }
        _ => v,
    }
}

/// `act′(a)`, in f64: relu′(0) = 0; gelu the exact erf form; gelu_tanh and silu as torch
/// differentiates them.
pub fn activation_derivative(unit: impl Into<HiddenUnit>, a: f32) -> f32 {
    let unit = unit.into();
    let a = a as f64;
    let derivative = match unit.activation {
        Activation::Relu => {
            if a > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(a / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * a * a).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + a * pdf
        }
        Activation::GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let t = (k * (a + 0.044715 * a * a * a)).tanh();
            0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * a * a)
        }
        Activation::Silu => {
            let sigmoid = 1.0 / (1.0 + (-a).exp());
            sigmoid * (1.0 + a * (1.0 - sigmoid))
        }
        Activation::Relu2 => 2.0 * a.max(0.0),
        Activation::QuickGelu => {
            let slope = QUICK_GELU_SLOPE;
            let sigmoid = 1.0 / (1.0 + (-slope * a).exp());
            sigmoid * (1.0 + slope * a * (1.0 - sigmoid))
        }
        // min(a, L): no gradient where the clamp is active (a > L), as torch.clamp.
        Activation::SwigluOai if a > unit.swiglu_limit as f64 => 0.0,
        Activation::SwigluOai => {
            let alpha = unit.swiglu_alpha as f64;
            let sigmoid = 1.0 / (1.0 + (-alpha * a).exp());
            sigmoid * (1.0 + alpha * a * (1.0 - sigmoid))
        }
    };
    derivative as f32
}

/// The derivative of [`gate_value`] with respect to v: 1, or for swiglu_oai 0 where the
/// clamp is active (|v| > L, as torch.clamp).
pub fn gate_derivative(unit: impl Into<HiddenUnit>, v: f32) -> f32 {
    let unit = unit.into();
    match unit.activation {
        Activation::SwigluOai if v.abs() > unit.swiglu_limit => 0.0,
        _ => 1.0,
    }
}
