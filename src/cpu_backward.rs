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

use crate::config::{DropPolicy, HiddenUnit, MoeConfig, RouterScore};
use crate::cpu_reference::{
    activate, assign_positions, dot, first_non_finite_token, gate_value, route_tokens,
};
use crate::cpu_shared_expert::{shared_expert_backward, SharedSums};
use crate::error::{MoeError, Result};
use crate::formats::ExpertMatrices;
pub use crate::gradients::{ExpertsGradients, Gradients};
use crate::output::{check_routes, num_tokens_of};
use crate::weights::{LayerShape, MoeWeights};

/// The loss terms beyond `Σ dy ⊙ y`: `α·aux_loss + β·z_loss`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossCoefficients {
    /// α, the weight of the Switch load-balancing loss.
    pub aux: f32,
    /// β, the weight of the router z-loss.
    pub z: f32,
}

pub use crate::cpu_math::{activation_derivative, gate_derivative};

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

impl Sums {
    /// Zeros for a layer of `shape` and an `x` of `x_len` values.
    fn zeros(shape: LayerShape, x_len: usize) -> Self {
        let LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        } = shape;
        Sums {
            x: vec![0.0; x_len],
            router_weight: vec![0.0; n * d],
            router_bias: vec![0.0; n],
            w1: vec![0.0; n * f * d],
            b1: vec![0.0; n * f],
            w2: vec![0.0; n * d * f],
            b2: vec![0.0; n * d],
            w3: vec![0.0; n * f * d],
            b3: vec![0.0; n * f],
        }
    }

    /// In f32, the tensors `weights` has.
    fn into_gradients(self, weights: &MoeWeights) -> Gradients {
        let present =
            |tensor: &Option<Vec<f32>>, sums: &[f64]| tensor.as_ref().map(|_| to_f32(sums));
        Gradients {
            x: to_f32(&self.x),
            router_weight: to_f32(&self.router_weight),
            router_bias: present(&weights.router_bias, &self.router_bias),
            w1: to_f32(&self.w1),
            b1: present(&weights.b1, &self.b1),
            w2: to_f32(&self.w2),
            b2: present(&weights.b2, &self.b2),
            w3: weights.w3.as_ref().map(|_| to_f32(&self.w3)),
            b3: present(&weights.b3, &self.b3),
            shared: None,
        }
    }
}

/// An upstream gradient of `route_prob_sum` must hold N finite values.
pub(crate) fn check_prob_sum_grad(gradient: Option<&[f32]>, num_experts: usize) -> Result<()> {
    gradient.map_or(Ok(()), |g| {
        check_finite("route_prob_sum_grad", g, num_experts, "one per expert")
    })
}

/// `dy` must hold `len` finite values (the shape of y).
pub(crate) fn check_dy(dy: &[f32], len: usize) -> Result<()> {
    check_finite("dy", dy, len, "the shape of y")
}

/// The caller's tensor `name` must hold `len` finite values (`len_is` says what `len` is).
fn check_finite(name: &str, values: &[f32], len: usize, len_is: &str) -> Result<()> {
    if values.len() != len {
        let message = format!("{} values, expected {len} ({len_is})", values.len());
        return Err(MoeError::tensor(name, message));
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(MoeError::tensor(
            name,
            format!("non-finite value at flat index {index}"),
        )),
        None => Ok(()),
    }
}

/// The values of f32 matrices (training checks the format first).
fn f32_values(matrices: &ExpertMatrices) -> &[f32] {
    matrices.f32_values().unwrap_or_default()
}

/// `sums += values`, elementwise.
fn add(sums: &mut [f64], values: &[f64]) {
    for (sum, value) in sums.iter_mut().zip(values) {
        *sum += value;
    }
}

fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

/// The experts' f32 matrices (training checks the format first), read in place.
struct Experts<'a> {
    weights: &'a MoeWeights,
    w1: &'a [f32],
    w2: &'a [f32],
    w3: Option<&'a [f32]>,
    unit: HiddenUnit,
}

impl<'a> Experts<'a> {
    fn new(weights: &'a MoeWeights, unit: HiddenUnit) -> Self {
        Experts {
            weights,
            w1: f32_values(&weights.w1),
            w2: f32_values(&weights.w2),
            w3: weights.w3.as_ref().map(f32_values),
            unit,
        }
    }
}

/// The backward of `expert` on one input row, its output scaled by `s` (dO = s·dy): adds
/// its terms to the expert's sums and returns dL/ds = dy·O and dL/d(input row). The
/// pre-activations `a` (and `v` when gated), `h` and `o` are recomputed from the input.
fn expert_backward(
    sums: &mut Sums,
    experts: &Experts<'_>,
    expert: usize,
    (x_row, dy_row): (&[f32], &[f32]),
    s: f64,
) -> (f64, Vec<f64>) {
    let weights = experts.weights;
    let LayerShape {
        d_model: d,
        d_ff: f,
        ..
    } = weights.shape;
    let w1_e = &experts.w1[expert * f * d..(expert + 1) * f * d];
    let w2_e = &experts.w2[expert * d * f..(expert + 1) * d * f];
    let w3_e = experts
        .w3
        .map(|w3| &w3[expert * f * d..(expert + 1) * f * d]);
    let bias = |b: &Option<Vec<f32>>, i: usize| b.as_ref().map_or(0.0, |b| b[i]);
    let projection = |w: &[f32], b: &Option<Vec<f32>>| -> Vec<f32> {
        (0..f)
            .map(|ff| dot(x_row, &w[ff * d..(ff + 1) * d]) + bias(b, expert * f + ff))
            .collect()
    };
    let a = projection(w1_e, &weights.b1);
    let v = w3_e.map(|w3_e| projection(w3_e, &weights.b3));
    let h: Vec<f32> = (0..f)
        .map(|ff| {
            let act = activate(experts.unit, a[ff]);
            v.as_ref()
                .map_or(act, |v| act * gate_value(experts.unit, v[ff]))
        })
        .collect();
    let o: Vec<f32> = (0..d)
        .map(|dd| dot(&h, &w2_e[dd * f..(dd + 1) * f]) + bias(&weights.b2, expert * d + dd))
        .collect();
    let ds: f64 = dy_row
        .iter()
        .zip(&o)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    let d_out: Vec<f64> = dy_row.iter().map(|&v| s * v as f64).collect();
    let mut dx = vec![0.0f64; d];
    let mut dh = vec![0.0f64; f];
    for (dd, &g_out) in d_out.iter().enumerate() {
        sums.b2[expert * d + dd] += g_out;
        for ff in 0..f {
            sums.w2[(expert * d + dd) * f + ff] += g_out * h[ff] as f64;
            dh[ff] += g_out * w2_e[dd * f + ff] as f64;
        }
    }
    for ff in 0..f {
        let act = activate(experts.unit, a[ff]) as f64;
        let slope = activation_derivative(experts.unit, a[ff]) as f64;
        let value = v
            .as_ref()
            .map_or(1.0, |v| gate_value(experts.unit, v[ff]) as f64);
        let da = dh[ff] * value * slope;
        sums.b1[expert * f + ff] += da;
        let row = (expert * f + ff) * d;
        for dd in 0..d {
            sums.w1[row + dd] += da * x_row[dd] as f64;
            dx[dd] += da * w1_e[ff * d + dd] as f64;
        }
        if let Some(w3_e) = w3_e {
            let dv = dh[ff]
                * act
                * v.as_ref()
                    .map_or(1.0, |v| gate_derivative(experts.unit, v[ff]) as f64);
            sums.b3[expert * f + ff] += dv;
            for dd in 0..d {
                sums.w3[row + dd] += dv * x_row[dd] as f64;
                dx[dd] += dv * w3_e[ff * d + dd] as f64;
            }
        }
    }
    (ds, dx)
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
        ..
    } = weights.shape;
    weights.check()?;
    config.validate_for_weights(weights)?;
    weights.check_trainable()?;
    let num_tokens = num_tokens_of(shape, x.len(), d)?;
    check_dy(dy, x.len())?;
    check_prob_sum_grad(route_prob_sum_grad, n)?;
    if let Some(token) = first_non_finite_token(x, d) {
        return Err(MoeError::NonFiniteInput { token });
    }
    let group_size = config.group_size_for(num_tokens)?;
    let k = config.top_k;
    let routing = route_tokens(x, weights, config);
    if let Some(token) = routing.logsumexp.iter().position(|l| !l.is_finite()) {
        return Err(MoeError::NonFiniteInput { token });
    }
    let (loads, positions) = assign_positions(config, &routing.routes, n, group_size);
    let experts = Experts::new(weights, config.hidden_unit());
    let mut sums = Sums::zeros(weights.shape, x.len());
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
            if config.gates_input() {
                // y += E(g·x): dx += g·∇E, dg = ⟨∇E, x⟩ (the input the forward scaled).
                let input: Vec<f32> = x_row.iter().map(|v| gate * v).collect();
                let (_, dx) = expert_backward(&mut sums, &experts, expert, (&input, dy_row), 1.0);
                let dx_sums = &mut sums.x[token * d..(token + 1) * d];
                for (sum, (&g, &x)) in dx_sums.iter_mut().zip(dx.iter().zip(x_row)) {
                    *sum += gate as f64 * g;
                    dg[choice] += g * x as f64;
                }
                continue;
            }
            // s = g, or g / stop_gradient(g) (value 1, gradient 1/g) without scaling.
            let s = if config.scale_by_prob {
                gate as f64
            } else {
                1.0
            };
            let (ds, dx) = expert_backward(&mut sums, &experts, expert, (x_row, dy_row), s);
            add(&mut sums.x[token * d..(token + 1) * d], &dx);
            dg[choice] = if config.scale_by_prob {
                ds
            } else {
                ds / gate as f64
            };
        }
        // g = s·normalised(q): the routed scaling factor s first.
        for value in dg.iter_mut() {
            *value *= config.routed_scaling_factor as f64;
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
    // The scores' backward (softmax: p ⊙ (dp − ⟨p, dp⟩); sigmoid: dp ⊙ p ⊙ (1 − p)), plus
    // z = mean_t lse_t²: ∂/∂h[t,e] = 2·lse_t·softmax(h_t)[e] / T.
    for token in 0..num_tokens {
        let probs = &routing.probs[token * n..(token + 1) * n];
        let logits = &routing.logits[token * n..(token + 1) * n];
        let dp_row = &dp[token * n..(token + 1) * n];
        let mean: f64 = probs.iter().zip(dp_row).map(|(&p, &g)| p as f64 * g).sum();
        let lse = routing.logsumexp[token] as f64;
        let x_row = &x[token * d..(token + 1) * d];
        for e in 0..n {
            let p = probs[e] as f64;
            let (d_score, softmax) = match config.router_score {
                RouterScore::Softmax => (p * (dp_row[e] - mean), p),
                RouterScore::Sigmoid => (dp_row[e] * p * (1.0 - p), (logits[e] as f64 - lse).exp()),
            };
            let dh = d_score + coefficients.z as f64 * 2.0 * lse * softmax / tokens;
            sums.router_bias[e] += dh;
            for dd in 0..d {
                sums.router_weight[e * d + dd] += dh * x_row[dd] as f64;
                sums.x[token * d + dd] += dh * weights.router_weight[e * d + dd] as f64;
            }
        }
    }
    // The shared expert: a dense FFN over every token (never dropped), its gate.
    let shared = weights.shared.as_ref().map(|shared| {
        let mut shared_sums = SharedSums::zeros(shared);
        for token in 0..num_tokens {
            let rows = (
                &x[token * d..(token + 1) * d],
                &dy[token * d..(token + 1) * d],
            );
            let dx = &mut sums.x[token * d..(token + 1) * d];
            shared_expert_backward(&mut shared_sums, shared, config.hidden_unit(), rows, dx);
        }
        shared_sums.into_gradients(shared)
    });
    Ok(Gradients {
        shared,
        ..sums.into_gradients(weights)
    })
}

/// The gradients of `L = Σ dy ⊙ y` for the experts alone on pre-routed tokens
/// (`cpu_reference::forward_experts`, `y[t] = Σ_j w[t, j]·E_{e[t, j]}(x[t])`): `x`, every
/// expert tensor, the router's as zeros (it is not in the graph), and `top_k_weights`'
/// (dL/dw[t, j] = dy[t]·E_{e[t, j]}(x[t])). Training needs f32 weights.
pub fn backward_experts(
    unit: impl Into<HiddenUnit>,
    weights: &MoeWeights,
    (x, shape): (&[f32], &[usize]),
    (top_k_index, top_k_weights): (&[u32], &[f32]),
    dy: &[f32],
) -> Result<ExpertsGradients> {
    weights.check()?;
    weights.check_trainable()?;
    let d = weights.shape.d_model;
    let num_tokens = num_tokens_of(shape, x.len(), d)?;
    let k = check_routes(
        weights.shape.num_experts,
        num_tokens,
        top_k_index,
        top_k_weights,
    )?;
    check_dy(dy, x.len())?;
    if let Some(token) = first_non_finite_token(x, d) {
        return Err(MoeError::NonFiniteInput { token });
    }
    let experts = Experts::new(weights, unit.into());
    let mut sums = Sums::zeros(weights.shape, x.len());
    let mut d_weights = vec![0.0f32; top_k_index.len()];
    for token in 0..num_tokens {
        let rows = (
            &x[token * d..(token + 1) * d],
            &dy[token * d..(token + 1) * d],
        );
        for j in 0..k {
            let expert = top_k_index[token * k + j] as usize;
            let w = top_k_weights[token * k + j] as f64;
            let (ds, dx) = expert_backward(&mut sums, &experts, expert, rows, w);
            add(&mut sums.x[token * d..(token + 1) * d], &dx);
            d_weights[token * k + j] = ds as f32;
        }
    }
    Ok(ExpertsGradients {
        gradients: sums.into_gradients(weights),
        top_k_weights: d_weights,
    })
}
