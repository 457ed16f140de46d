//! The CPU reference of the backward pass: the gradients of
//! `L = Σ dy ⊙ y + α·aux_loss + β·z_loss` with respect to `x` and every weight tensor, as
//! SPEC "Backward" states them, written as plain loops in the order a reader derives them.
//!
//! Routing decisions (top-k choices, capacity, dropping) and `counts` are constants. Per
//! kept assignment the expert's activations are recomputed from `x`, as the GPU backward
//! recomputes them. Every sum runs in f64, so the reference is more accurate than any f32
//! order of summation.

// Index loops over several arrays at once read like the formulas they implement.
#![allow(clippy::needless_range_loop)]

use crate::config::{Activation, DropPolicy, MoeConfig};
use crate::cpu_reference::{activate, assign_positions, dot, first_non_finite_token, route_tokens};
use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;
use crate::output::num_tokens_of;
use crate::tensor_io::{serialize_tensors, OwnedTensor};
use crate::weights::{LayerShape, MoeWeights};

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
        tensors
            .into_iter()
            .filter_map(|(name, tensor)| tensor.map(|t| (name, t.as_slice())))
            .collect()
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

/// The loss terms beyond `Σ dy ⊙ y`: `α·aux_loss + β·z_loss`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossCoefficients {
    /// α, the weight of the Switch load-balancing loss.
    pub aux: f32,
    /// β, the weight of the router z-loss.
    pub z: f32,
}

/// `act′(a)`, in f64: relu′(0) = 0; gelu the exact erf form; gelu_tanh and silu as torch
/// differentiates them.
pub fn activation_derivative(activation: Activation, a: f32) -> f32 {
    let a = a as f64;
    let derivative = match activation {
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
    };
    derivative as f32
}

/// Gradients in f64 while they are summed.
struct Sums {
    x: Vec<f64>,
    router_weight: Vec<f64>,
    router_bias: Vec<f64>,
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    b2: Vec<f64>,
    w3: Vec<f64>,
    b3: Vec<f64>,
}

/// An upstream gradient of `route_prob_sum` must hold N finite values.
pub(crate) fn check_prob_sum_grad(gradient: Option<&[f32]>, num_experts: usize) -> Result<()> {
    let Some(gradient) = gradient else {
        return Ok(());
    };
    if gradient.len() != num_experts {
        return Err(MoeError::tensor(
            "route_prob_sum_grad",
            format!(
                "{} values, expected {num_experts} (one per expert)",
                gradient.len()
            ),
        ));
    }
    match gradient.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(MoeError::tensor(
            "route_prob_sum_grad",
            format!("non-finite value at index {index}"),
        )),
        None => Ok(()),
    }
}

/// The values of f32 matrices (training checks the format first).
fn f32_values(matrices: &ExpertMatrices) -> &[f32] {
    matrices.f32_values().unwrap_or_default()
}

fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

/// The expert of one kept assignment, recomputed from its token: the pre-activations `a`
/// (and `v` when gated), `h`, and the output `o`.
struct ExpertPass {
    a: Vec<f32>,
    v: Option<Vec<f32>>,
    h: Vec<f32>,
    o: Vec<f32>,
}

fn expert_pass(
    x_row: &[f32],
    weights: &MoeWeights,
    w1: &[f32],
    w2: &[f32],
    w3: Option<&[f32]>,
    expert: usize,
    activation: Activation,
) -> ExpertPass {
    let LayerShape { d_model, d_ff, .. } = weights.shape;
    let bias = |b: &Option<Vec<f32>>, i: usize| b.as_ref().map_or(0.0, |b| b[i]);
    let a: Vec<f32> = (0..d_ff)
        .map(|f| {
            dot(x_row, &w1[f * d_model..(f + 1) * d_model]) + bias(&weights.b1, expert * d_ff + f)
        })
        .collect();
    let v: Option<Vec<f32>> = w3.map(|w3| {
        (0..d_ff)
            .map(|f| {
                dot(x_row, &w3[f * d_model..(f + 1) * d_model])
                    + bias(&weights.b3, expert * d_ff + f)
            })
            .collect()
    });
    let h: Vec<f32> = (0..d_ff)
        .map(|f| {
            let act = activate(activation, a[f]);
            v.as_ref().map_or(act, |v| act * v[f])
        })
        .collect();
    let o: Vec<f32> = (0..d_model)
        .map(|d| dot(&h, &w2[d * d_ff..(d + 1) * d_ff]) + bias(&weights.b2, expert * d_model + d))
        .collect();
    ExpertPass { a, v, h, o }
}

/// The gradients of `L = Σ dy ⊙ y + α·aux_loss + β·z_loss` (SPEC "Backward") for the
/// forward of `x` (shape `shape`) through the layer. Training needs f32 weights.
pub fn backward(
    config: &MoeConfig,
    weights: &MoeWeights,
    x: &[f32],
    shape: &[usize],
    dy: &[f32],
    coefficients: LossCoefficients,
) -> Result<Gradients> {
    backward_with_prob_sum_grad(config, weights, x, shape, dy, None, coefficients)
}

/// [`backward`] with an upstream gradient of `route_prob_sum` too (`[N]`, when the caller's
/// own loss uses it, as a torch graph does): `L` gains `Σ_e g[e]·route_prob_sum[e]`.
pub fn backward_with_prob_sum_grad(
    config: &MoeConfig,
    weights: &MoeWeights,
    x: &[f32],
    shape: &[usize],
    dy: &[f32],
    route_prob_sum_grad: Option<&[f32]>,
    coefficients: LossCoefficients,
) -> Result<Gradients> {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = weights.shape;
    weights.check()?;
    config.validate_for_weights(weights)?;
    weights.check_trainable()?;
    let num_tokens = num_tokens_of(shape, x.len(), d)?;
    if dy.len() != x.len() {
        return Err(MoeError::tensor(
            "dy",
            format!(
                "{} values, expected {} (the shape of y, {shape:?})",
                dy.len(),
                x.len()
            ),
        ));
    }
    check_prob_sum_grad(route_prob_sum_grad, n)?;
    if let Some(token) = first_non_finite_token(x, d) {
        return Err(MoeError::NonFiniteInput { token });
    }
    if let Some(index) = dy.iter().position(|v| !v.is_finite()) {
        return Err(MoeError::tensor(
            "dy",
            format!("non-finite value at flat index {index}"),
        ));
    }
    let group_size = config.group_size_for(num_tokens)?;
    let k = config.top_k;
    let routing = route_tokens(x, weights, k, config.normalize_top_k);
    if let Some(token) = routing.logsumexp.iter().position(|l| !l.is_finite()) {
        return Err(MoeError::NonFiniteInput { token });
    }
    let (loads, positions) = assign_positions(config, &routing.routes, n, group_size);
    // f32 weights (checked above) are read in place.
    let (w1, w2) = (f32_values(&weights.w1), f32_values(&weights.w2));
    let w3 = weights.w3.as_ref().map(f32_values);

    let mut sums = Sums {
        x: vec![0.0; x.len()],
        router_weight: vec![0.0; n * d],
        router_bias: vec![0.0; n],
        w1: vec![0.0; n * f * d],
        b1: vec![0.0; n * f],
        w2: vec![0.0; n * d * f],
        b2: vec![0.0; n * d],
        w3: vec![0.0; n * f * d],
        b3: vec![0.0; n * f],
    };
    // dL/dp for every token and expert, from the gates, pass-through and the aux loss.
    let mut dp = vec![0.0f64; num_tokens * n];
    for token in 0..num_tokens {
        let x_row = &x[token * d..(token + 1) * d];
        let dy_row = &dy[token * d..(token + 1) * d];
        let probs = &routing.probs[token * n..(token + 1) * n];
        let routes = &routing.routes[token * k..(token + 1) * k];
        // q_j = p[route_j] before any normalisation; dL/dg_j of each choice.
        let q: Vec<f64> = routes.iter().map(|&e| probs[e as usize] as f64).collect();
        let mut dg = vec![0.0f64; k];
        let mut any_kept = false;
        for choice in 0..k {
            if positions[token * k + choice].is_none() {
                continue;
            }
            any_kept = true;
            let expert = routes[choice] as usize;
            let gate = routing.gates[token * k + choice];
            let w1_e = &w1[expert * f * d..(expert + 1) * f * d];
            let w2_e = &w2[expert * d * f..(expert + 1) * d * f];
            let w3_e = w3
                .as_ref()
                .map(|w3| &w3[expert * f * d..(expert + 1) * f * d]);
            let pass = expert_pass(x_row, weights, w1_e, w2_e, w3_e, expert, config.activation);
            // s = g, or g / stop_gradient(g) (value 1, gradient 1/g) without scaling.
            let s = if config.scale_by_prob {
                gate as f64
            } else {
                1.0
            };
            let ds: f64 = dy_row
                .iter()
                .zip(&pass.o)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            dg[choice] = if config.scale_by_prob {
                ds
            } else {
                ds / gate as f64
            };
            // The expert's backward with dO = s·dy.
            let d_out: Vec<f64> = dy_row.iter().map(|&v| s * v as f64).collect();
            let mut dh = vec![0.0f64; f];
            for (dd, &g_out) in d_out.iter().enumerate() {
                sums.b2[expert * d + dd] += g_out;
                for ff in 0..f {
                    sums.w2[(expert * d + dd) * f + ff] += g_out * pass.h[ff] as f64;
                    dh[ff] += g_out * w2_e[dd * f + ff] as f64;
                }
            }
            for ff in 0..f {
                let act = activate(config.activation, pass.a[ff]) as f64;
                let slope = activation_derivative(config.activation, pass.a[ff]) as f64;
                let value = pass.v.as_ref().map_or(1.0, |v| v[ff] as f64);
                let da = dh[ff] * value * slope;
                sums.b1[expert * f + ff] += da;
                let row = (expert * f + ff) * d;
                for dd in 0..d {
                    sums.w1[row + dd] += da * x_row[dd] as f64;
                    sums.x[token * d + dd] += da * w1_e[ff * d + dd] as f64;
                }
                if let Some(w3_e) = w3_e {
                    let dv = dh[ff] * act;
                    sums.b3[expert * f + ff] += dv;
                    for dd in 0..d {
                        sums.w3[row + dd] += dv * x_row[dd] as f64;
                        sums.x[token * d + dd] += dv * w3_e[ff * d + dd] as f64;
                    }
                }
            }
        }
        // dL/dq: through the normalisation over ALL top-k choices (dropped ones too).
        let mut dq = if config.normalize_top_k {
            let total: f64 = q.iter().sum();
            let weighted: f64 = dg.iter().zip(&q).map(|(g, q)| g * q).sum();
            dg.iter()
                .map(|g| g / total - weighted / (total * total))
                .collect()
        } else {
            dg
        };
        // A token with every choice dropped: y = π·x, π = q_0 (or q_0 / stop_gradient(q_0)).
        if !any_kept && config.drop_policy == DropPolicy::PassThrough {
            let pi = if config.scale_by_prob { q[0] } else { 1.0 };
            let dot_dy_x: f64 = dy_row
                .iter()
                .zip(x_row)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            dq[0] += if config.scale_by_prob {
                dot_dy_x
            } else {
                dot_dy_x / q[0]
            };
            for (sum, &g) in sums.x[token * d..(token + 1) * d].iter_mut().zip(dy_row) {
                *sum += pi * g as f64;
            }
        }
        for (choice, &expert) in routes.iter().enumerate() {
            dp[token * n + expert as usize] += dq[choice];
        }
    }
    // aux = N·Σ_e (counts[e]/T)·(Σ_t p[t,e] / T): ∂/∂p[t,e] = N·counts[e] / T²; and
    // route_prob_sum[e] = Σ_t p[t,e] passes its upstream gradient to every p[t,e].
    let tokens = num_tokens as f64;
    for token in 0..num_tokens {
        for e in 0..n {
            dp[token * n + e] += coefficients.aux as f64 * n as f64 * loads.counts[e] as f64
                / (tokens * tokens)
                + route_prob_sum_grad.map_or(0.0, |g| g[e] as f64);
        }
    }
    // Softmax backward, plus z = mean_t lse_t²: ∂/∂h[t,e] = 2·lse_t·p[t,e] / T.
    for token in 0..num_tokens {
        let probs = &routing.probs[token * n..(token + 1) * n];
        let dp_row = &dp[token * n..(token + 1) * n];
        let mean: f64 = probs.iter().zip(dp_row).map(|(&p, &g)| p as f64 * g).sum();
        let lse = routing.logsumexp[token] as f64;
        let x_row = &x[token * d..(token + 1) * d];
        for e in 0..n {
            let p = probs[e] as f64;
            let dh = p * (dp_row[e] - mean) + coefficients.z as f64 * 2.0 * lse * p / tokens;
            sums.router_bias[e] += dh;
            for dd in 0..d {
                sums.router_weight[e * d + dd] += dh * x_row[dd] as f64;
                sums.x[token * d + dd] += dh * weights.router_weight[e * d + dd] as f64;
            }
        }
    }
    let gated = weights.w3.is_some();
    Ok(Gradients {
        x: to_f32(&sums.x),
        router_weight: to_f32(&sums.router_weight),
        router_bias: weights
            .router_bias
            .as_ref()
            .map(|_| to_f32(&sums.router_bias)),
        w1: to_f32(&sums.w1),
        b1: weights.b1.as_ref().map(|_| to_f32(&sums.b1)),
        w2: to_f32(&sums.w2),
        b2: weights.b2.as_ref().map(|_| to_f32(&sums.b2)),
        w3: gated.then(|| to_f32(&sums.w3)),
        b3: weights.b3.as_ref().map(|_| to_f32(&sums.b3)),
    })
}
