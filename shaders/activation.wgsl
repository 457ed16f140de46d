// activation: the FFN activations and their derivatives, shared by expert_up (forward) and
// expert_hidden_backward (the shader registry prepends this file to both). CPU twins:
// cpu_math::activate, gate_value, activation_derivative and gate_derivative.

// Activation codes: 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu, 4 relu2, 5 swiglu_oai
// (gated only: min(a, L)·σ(α·min(a, L)), its gate clamp(v, −L, L) + 1), 6 quick_gelu
// (a·σ(1.702·a)).
override ACTIVATION: u32 = 0u;
override SWIGLU_LIMIT: f32 = 7.0;
override SWIGLU_ALPHA: f32 = 1.702;

// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, below f32 resolution of 1 + erf).
fn erf_approx(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
        + t * (-1.453152027 + t * 1.061405429))));
    return sign(v) * (1.0 - poly * exp(-a * a));
}

// gelu_tanh's inner argument, clamped: tanh saturates to ±1 in f32 beyond |u| = 9, and the
// clamp keeps exp-based tanh implementations from producing inf/inf.
fn gelu_tanh_argument(a: f32) -> f32 {
    return clamp(0.7978845608 * (a + 0.044715 * a * a * a), -9.0, 9.0);
}

fn activate(a: f32) -> f32 {
    switch ACTIVATION {
        case 1u: {
            return 0.5 * a * (1.0 + erf_approx(a * 0.70710678));
        }
        case 2u: {
            return 0.5 * a * (1.0 + tanh(gelu_tanh_argument(a)));
        }
        case 3u: {
            return a / (1.0 + exp(-a));
        }
        case 4u: {
            return max(a, 0.0) * max(a, 0.0);
        }
        case 5u: {
            let clamped = min(a, SWIGLU_LIMIT);
            return clamped / (1.0 + exp(-SWIGLU_ALPHA * clamped));
        }
        case 6u: {
            return a / (1.0 + exp(-1.702 * a));
        }
        default: {
            return max(a, 0.0);
        }
    }
}

// What a gated FFN's gate projection v contributes: v, or swiglu_oai's clamp(v, −L, L) + 1.
fn gate_value(v: f32) -> f32 {
    if (ACTIVATION == 5u) {
        return clamp(v, -SWIGLU_LIMIT, SWIGLU_LIMIT) + 1.0;
    }
    return v;
}

// gate_value′(v): 1, or 0 where swiglu_oai's clamp is active (|v| > L, as torch.clamp).
fn gate_derivative(v: f32) -> f32 {
    if (ACTIVATION == 5u) {
        return select(1.0, 0.0, abs(v) > SWIGLU_LIMIT);
    }
    return 1.0;
}

// act′(a), as torch differentiates each activation; relu′(0) = 0.
fn activation_derivative(a: f32) -> f32 {
    switch ACTIVATION {
        case 1u: {
            // Φ(a) + a·φ(a).
            let pdf = exp(-0.5 * a * a) * 0.39894228;
            return 0.5 * (1.0 + erf_approx(a * 0.70710678)) + a * pdf;
        }
        case 2u: {
            let t = tanh(gelu_tanh_argument(a));
            return 0.5 * (1.0 + t)
                + 0.5 * a * (1.0 - t * t) * 0.7978845608 * (1.0 + 3.0 * 0.044715 * a * a);
        }
        case 3u: {
            let sigmoid = 1.0 / (1.0 + exp(-a));
            return sigmoid * (1.0 + a * (1.0 - sigmoid));
        }
        case 4u: {
            return 2.0 * max(a, 0.0);
        }
        case 5u: {
            // No gradient where min(a, L) clamps (a > L), as torch.clamp.
            let sigmoid = 1.0 / (1.0 + exp(-SWIGLU_ALPHA * a));
            return select(sigmoid * (1.0 + SWIGLU_ALPHA * a * (1.0 - sigmoid)), 0.0,
                a > SWIGLU_LIMIT);
        }
        case 6u: {
            let sigmoid = 1.0 / (1.0 + exp(-1.702 * a));
            return sigmoid * (1.0 + 1.702 * a * (1.0 - sigmoid));
        }
        default: {
            return select(0.0, 1.0, a > 0.0);
        }
    }
}
