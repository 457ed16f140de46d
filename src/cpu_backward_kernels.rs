//! The CPU twins of the backward's kernels, one function per shader of the same name, in
//! f32 with each sum in the shader's order: they take the tables and buffers a kernel
//! reads (a traced backward's, in tests) and return what it writes, so each kernel is
//! judged alone. `cpu_backward::backward` is the reference of the whole (in f64).

// Index loops over several arrays at once read like the shaders they mirror.
#![allow(clippy::needless_range_loop)]

use crate::config::{DropPolicy, MoeConfig, RouterScore};
use crate::cpu_backward::LossCoefficients;
use crate::cpu_math::{activate, activation_derivative, gate_derivative, gate_value};
use crate::gpu::params::OptimizerParams;
use crate::weights::{LayerShape, MoeWeights};

/// A slot's mark in `assignment_slot` when its assignment was dropped.
const DROPPED: u32 = u32::MAX;

/// The training forward's slot tables: which expert and token each slot holds.
#[derive(Clone, Copy, Debug)]
pub struct SlotTables<'a> {
    pub num_experts: usize,
    /// `[slots]`.
    pub slot_token: &'a [u32],
    /// counts [N] | kept [N] | tile_start [N + 1] | n_dropped | tile_expert [tiles].
    pub expert_table: &'a [u32],
    pub row_tile: usize,
}

impl SlotTables<'_> {
    /// Expert `e`'s kept slots.
    pub fn expert_slots(&self, e: usize) -> std::ops::Range<usize> {
        let n = self.num_experts;
        let first = self.expert_table[2 * n + e] as usize * self.row_tile;
        first..first + self.expert_table[n + e] as usize
    }

    /// The expert owning `slot`, or `None` for a padding slot (backward_slots.wgsl).
    pub fn slot_expert(&self, slot: usize) -> Option<usize> {
        let n = self.num_experts;
        let tile = slot / self.row_tile;
        if tile >= self.expert_table[3 * n] as usize {
            return None;
        }
        let e = self.expert_table[3 * n + 2 + tile] as usize;
        self.expert_slots(e).contains(&slot).then_some(e)
    }
}

/// What gate_backward writes.
#[derive(Clone, Debug, PartialEq)]
pub struct GateGradients {
    /// `[T, R]`: dL/dh of the router logits (R: the routed experts, and a shared
    /// expert's gate).
    pub d_logits: Vec<f32>,
    /// `[slots]`: each kept slot's gate scale (0 where no kept assignment wrote one).
    pub slot_scale: Vec<f32>,
    /// `[T]`: π of a token that passed through, else 0.
    pub pass_scale: Vec<f32>,
}

/// gate_backward.wgsl: per token, dL/dh from the gates, pass-through, aux and z losses;
/// `shared`: the shared expert's slices after each token's routed choices and whether its
/// gate is the router's row N (`(0, false)` without one).
#[allow(clippy::too_many_arguments)]
pub fn gate_backward(
    config: &MoeConfig,
    coefficients: LossCoefficients,
    (x, dy): (&[f32], &[f32]),
    logits: &[f32],
    (routes, gates): (&[u32], &[f32]),
    assignment_slot: &[u32],
    expert_out: &[f32],
    (counts, prob_sum_grad): (&[u32], &[f32]),
    (d_model, num_slots): (usize, usize),
    shared: (usize, bool),
) -> GateGradients {
    let n = counts.len();
    let rows = n + shared.1 as usize;
    let k = config.top_k;
    let stride = k + shared.0;
    let num_tokens = x.len() / d_model;
    let tokens = num_tokens as f32;
    let mut out = GateGradients {
        d_logits: vec![0.0; num_tokens * rows],
        slot_scale: vec![0.0; num_slots],
        pass_scale: vec![0.0; num_tokens],
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0.0f32, |s, (p, q)| s + p * q);
    for token in 0..num_tokens {
        let all_logits = &logits[token * rows..(token + 1) * rows];
        let row = &all_logits[..n];
        let dy_row = &dy[token * d_model..(token + 1) * d_model];
        let max_logit = row[1..].iter().fold(row[0], |m, &v| m.max(v));
        let sum = row.iter().fold(0.0f32, |s, &h| s + (h - max_logit).exp());
        let lse = max_logit + sum.ln();
        let softmax = |e: usize| (row[e] - max_logit).exp() / sum;
        let sigmoid = config.router_score == RouterScore::Sigmoid;
        let p = |e: usize| {
            if sigmoid {
                1.0 / (1.0 + (-row[e]).exp())
            } else {
                softmax(e)
            }
        };
        let scaling = config.routed_scaling_factor;
        let dp = &mut out.d_logits[token * rows..(token + 1) * rows];
        let aux_scale = coefficients.aux * n as f32 / (tokens * tokens);
        for e in 0..n {
            dp[e] = aux_scale * counts[e] as f32 + prob_sum_grad[e];
        }
        let choices = &routes[token * stride..token * stride + k];
        let q_total = choices.iter().fold(0.0f32, |s, &e| s + p(e as usize));
        let inverse_total = if config.normalize_top_k {
            1.0 / q_total
        } else {
            1.0
        };
        let mut weighted = 0.0f32;
        let mut any_kept = false;
        for j in 0..k {
            let slot = assignment_slot[token * stride + j];
            if slot == DROPPED {
                continue;
            }
            any_kept = true;
            let slot = slot as usize;
            let gate = gates[token * stride + j];
            let e = choices[j] as usize;
            let g_dot = dot(dy_row, &expert_out[slot * d_model..(slot + 1) * d_model]);
            let dg = scaling
                * if config.scale_by_prob {
                    g_dot
                } else {
                    g_dot / gate
                };
            out.slot_scale[slot] = if config.scale_by_prob { gate } else { 1.0 };
            dp[e] += dg * inverse_total;
            weighted += dg * p(e);
        }
        if config.normalize_top_k {
            let shift = weighted * inverse_total * inverse_total;
            for &e in choices {
                dp[e as usize] -= shift;
            }
        }
        if !any_kept && config.drop_policy == DropPolicy::PassThrough {
            let e0 = choices[0] as usize;
            let q0 = p(e0);
            out.pass_scale[token] = if config.scale_by_prob { q0 } else { 1.0 };
            let g_dot = dot(dy_row, &x[token * d_model..(token + 1) * d_model]);
            dp[e0] += if config.scale_by_prob {
                g_dot
            } else {
                g_dot / q0
            };
        }
        let mut d_shared = 0.0f32;
        for j in k..stride {
            let slot = assignment_slot[token * stride + j] as usize;
            out.slot_scale[slot] = gates[token * stride + j];
            d_shared += dot(dy_row, &expert_out[slot * d_model..(slot + 1) * d_model]);
        }
        if shared.1 {
            let s = 1.0 / (1.0 + (-all_logits[n]).exp());
            dp[n] = d_shared * s * (1.0 - s);
        }
        let z_scale = coefficients.z * 2.0 * lse / tokens;
        if sigmoid {
            for e in 0..n {
                dp[e] = dp[e] * p(e) * (1.0 - p(e)) + z_scale * softmax(e);
            }
        } else {
            let mean = (0..n).fold(0.0f32, |s, e| s + p(e) * dp[e]);
            for e in 0..n {
                dp[e] = p(e) * (dp[e] - mean) + z_scale * p(e);
            }
        }
    }
    out
}

/// gate_backward.wgsl after a pre-routed forward (`forward_experts`): per token, dL/dw_j =
/// dy[t]·O[slot_j] in the first k columns of its `[T, N]` d_logits row (the rest left 0
/// here, unwritten there), the slots' scales w_j, and no pass-through.
pub fn gate_backward_pre_routed(
    dy: &[f32],
    (gates, assignment_slot): (&[f32], &[u32]),
    expert_out: &[f32],
    (num_experts, top_k, d_model, num_slots): (usize, usize, usize, usize),
) -> GateGradients {
    let num_tokens = dy.len() / d_model;
    let mut out = GateGradients {
        d_logits: vec![0.0; num_tokens * num_experts],
        slot_scale: vec![0.0; num_slots],
        pass_scale: vec![0.0; num_tokens],
    };
    for token in 0..num_tokens {
        let dy_row = &dy[token * d_model..(token + 1) * d_model];
        for j in 0..top_k {
            let assignment = token * top_k + j;
            let slot = assignment_slot[assignment];
            let mut d_weight = 0.0f32;
            if slot != DROPPED {
                let slot = slot as usize;
                out.slot_scale[slot] = gates[assignment];
                let row = &expert_out[slot * d_model..(slot + 1) * d_model];
                d_weight = dy_row.iter().zip(row).fold(0.0f32, |s, (a, b)| s + a * b);
            }
            out.d_logits[token * num_experts + j] = d_weight;
        }
    }
    out
}

/// f32 expert matrices in place (training weights are f32).
fn values(m: &crate::formats::ExpertMatrices) -> &[f32] {
    m.f32_values().unwrap_or_default()
}

/// expert_hidden_backward.wgsl: dA (and dV when gated) `[slots, F]` of each kept slot, from
/// dy·W2 (summed along D in order) and the pre-activations a (and v) the training forward
/// kept (`[slots, F]` each); padding slots stay zero.
pub fn expert_hidden_backward(
    config: &MoeConfig,
    weights: &MoeWeights,
    tables: SlotTables<'_>,
    dy: &[f32],
    slot_scale: &[f32],
    (pre_activations, pre_gates): (&[f32], Option<&[f32]>),
) -> (Vec<f32>, Option<Vec<f32>>) {
    let LayerShape {
        d_model: d,
        d_ff: f,
        ..
    } = weights.shape;
    let slots = tables.slot_token.len();
    let mut d_a = vec![0.0f32; slots * f];
    let mut d_v = pre_gates.map(|_| vec![0.0f32; slots * f]);
    let w2 = values(&weights.w2);
    for slot in 0..slots {
        let Some(e) = tables.slot_expert(slot) else {
            continue;
        };
        let token = tables.slot_token[slot] as usize;
        for unit in 0..f {
            let mut dh = 0.0f32;
            for dd in 0..d {
                dh += dy[token * d + dd] * w2[(e * d + dd) * f + unit];
            }
            dh *= slot_scale[slot];
            let at = slot * f + unit;
            let a = pre_activations[at];
            let unit = config.hidden_unit();
            let slope = activation_derivative(unit, a);
            match (&mut d_v, pre_gates) {
                (Some(d_v), Some(v)) => {
                    d_a[at] = dh * gate_value(unit, v[at]) * slope;
                    d_v[at] = dh * activate(unit, a) * gate_derivative(unit, v[at]);
                }
                _ => d_a[at] = dh * slope,
            }
        }
    }
    (d_a, d_v)
}

/// expert_down_backward.wgsl: dW2 `[N, D, F]` over each expert's kept slots, in slot order.
pub fn expert_down_backward(
    shape: LayerShape,
    tables: SlotTables<'_>,
    dy: &[f32],
    slot_scale: &[f32],
    hidden: &[f32],
) -> Vec<f32> {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = shape;
    let mut dw2 = vec![0.0f32; n * d * f];
    for e in 0..n {
        for slot in tables.expert_slots(e) {
            let token = tables.slot_token[slot] as usize;
            for dd in 0..d {
                let d_out = slot_scale[slot] * dy[token * d + dd];
                for unit in 0..f {
                    dw2[(e * d + dd) * f + unit] += d_out * hidden[slot * f + unit];
                }
            }
        }
    }
    dw2
}

/// expert_up_backward.wgsl: dW `[N, F, D]` of the up-projection whose pre-activation
/// gradient is `d_pre` (dA for W1, dV for W3), over each expert's kept slots in slot order.
pub fn expert_up_backward(
    shape: LayerShape,
    tables: SlotTables<'_>,
    x: &[f32],
    d_pre: &[f32],
) -> Vec<f32> {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = shape;
    let mut dw = vec![0.0f32; n * f * d];
    for e in 0..n {
        for slot in tables.expert_slots(e) {
            let token = tables.slot_token[slot] as usize;
            for unit in 0..f {
                let g = d_pre[slot * f + unit];
                for dd in 0..d {
                    dw[(e * f + unit) * d + dd] += g * x[token * d + dd];
                }
            }
        }
    }
    dw
}

/// What expert_bias_backward writes: each expert's bias gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct BiasGradients {
    /// `[N, F]`.
    pub b1: Vec<f32>,
    /// `[N, D]`.
    pub b2: Vec<f32>,
    /// `[N, F]` when gated.
    pub b3: Option<Vec<f32>>,
}

/// expert_bias_backward.wgsl: db1 = Σ dA, db3 = Σ dV and db2 = Σ s·dy over each expert's
/// kept slots, in slot order; db2 is 0 for experts past `routed_experts` + 1 (a shared
/// expert's slices after its first, which holds its b2).
pub fn expert_bias_backward(
    (shape, routed_experts): (LayerShape, usize),
    tables: SlotTables<'_>,
    (dy, slot_scale): (&[f32], &[f32]),
    (d_a, d_v): (&[f32], Option<&[f32]>),
) -> BiasGradients {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = shape;
    let column_sums = |values: &[f32]| {
        let mut sums = vec![0.0f32; n * f];
        for e in 0..n {
            for slot in tables.expert_slots(e) {
                for unit in 0..f {
                    sums[e * f + unit] += values[slot * f + unit];
                }
            }
        }
        sums
    };
    let mut b2 = vec![0.0f32; n * d];
    for e in 0..n.min(routed_experts + 1) {
        for slot in tables.expert_slots(e) {
            let token = tables.slot_token[slot] as usize;
            for dd in 0..d {
                b2[e * d + dd] += slot_scale[slot] * dy[token * d + dd];
            }
        }
    }
    BiasGradients {
        b1: column_sums(d_a),
        b2,
        b3: d_v.map(column_sums),
    }
}

/// expert_input_backward.wgsl: each kept slot's input gradient `[slots, D]`.
pub fn expert_input_backward(
    weights: &MoeWeights,
    tables: SlotTables<'_>,
    d_a: &[f32],
    d_v: Option<&[f32]>,
) -> Vec<f32> {
    let LayerShape {
        d_model: d,
        d_ff: f,
        ..
    } = weights.shape;
    let slots = tables.slot_token.len();
    let mut out = vec![0.0f32; slots * d];
    let w1 = values(&weights.w1);
    let w3 = weights.w3.as_ref().map(values);
    for slot in 0..slots {
        let Some(e) = tables.slot_expert(slot) else {
            continue;
        };
        for dd in 0..d {
            let mut sum = 0.0f32;
            for unit in 0..f {
                sum += d_a[slot * f + unit] * w1[(e * f + unit) * d + dd];
            }
            if let (Some(d_v), Some(w3)) = (d_v, w3) {
                for unit in 0..f {
                    sum += d_v[slot * f + unit] * w3[(e * f + unit) * d + dd];
                }
            }
            out[slot * d + dd] = sum;
        }
    }
    out
}

/// router_backward.wgsl: dWr `[R, D]` and dbr `[R]` over the tokens, for a router of
/// `rows` (the routed experts, and a shared expert's gate: its bias gradient is 0).
pub fn router_backward(
    x: &[f32],
    d_logits: &[f32],
    (rows, routed_experts): (usize, usize),
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let num_tokens = x.len() / d;
    let n = rows;
    let (mut dw, mut db) = (vec![0.0f32; n * d], vec![0.0f32; n]);
    for t in 0..num_tokens {
        for e in 0..n {
            let dh = d_logits[t * n + e];
            if e < routed_experts {
                db[e] += dh;
            }
            for dd in 0..d {
                dw[e * d + dd] += dh * x[t * d + dd];
            }
        }
    }
    (dw, db)
}

/// combine_backward.wgsl: dx `[T, D]` gathered per token — the router's term in expert
/// order (`router`: its weight and d_logits; `None` after a pre-routed forward), the kept
/// choices in choice order, then the pass-through.
pub fn combine_backward(
    router: Option<(&[f32], &[f32])>,
    (assignment_slot, top_k): (&[u32], usize),
    d_x_slot: &[f32],
    pass_scale: &[f32],
    dy: &[f32],
) -> Vec<f32> {
    let num_tokens = pass_scale.len();
    let d = dy.len() / num_tokens.max(1);
    let mut dx = vec![0.0f32; num_tokens * d];
    for t in 0..num_tokens {
        for dd in 0..d {
            let mut sum = 0.0f32;
            if let Some((router_weight, d_logits)) = router {
                let n = router_weight.len() / d.max(1);
                for e in 0..n {
                    sum += router_weight[e * d + dd] * d_logits[t * n + e];
                }
            }
            for j in 0..top_k {
                let slot = assignment_slot[t * top_k + j];
                if slot != DROPPED {
                    sum += d_x_slot[slot as usize * d + dd];
                }
            }
            dx[t * d + dd] = sum + pass_scale[t] * dy[t * d + dd];
        }
    }
    dx
}

/// optimizer_step.wgsl: one step on `parameters` in place, with the kernel's `params`
/// (SGD, or AdamW with its moments `first` and `second`, updated in place too).
pub fn optimizer_step(
    params: &OptimizerParams,
    parameters: &mut [f32],
    gradients: &[f32],
    (first, second): (&mut [f32], &mut [f32]),
) {
    for (i, (p, &g)) in parameters.iter_mut().zip(gradients).enumerate() {
        if params.kind == 0 {
            *p -= params.learning_rate * (g + params.weight_decay * *p);
            continue;
        }
        let decayed = *p * (1.0 - params.learning_rate * params.weight_decay);
        let m = params.beta1 * first[i] + (1.0 - params.beta1) * g;
        let v = params.beta2 * second[i] + (1.0 - params.beta2) * g * g;
        first[i] = m;
        second[i] = v;
        let denominator = v.sqrt() / params.second_moment_correction + params.epsilon;
        *p = decayed - params.step_size * m / denominator;
    }
}
