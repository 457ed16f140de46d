// activation: the FFN activations and their derivatives, shared by expert_up (forward) and
// expert_hidden_backward (the shader registry prepends this file to both). CPU twins:
// cpu_reference::activate and cpu_backward::activation_derivative.

// Activation codes: 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu.
override ACTIVATION: u32 = 0u;

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
        default: {
            return max(a, 0.0);
        }
    }
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
        default: {
            return select(0.0, 1.0, a > 0.0);
        }
    }
}
