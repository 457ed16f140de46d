//! The twins of the kernels that carry the gates' gradients to the router logits:
//! gate_backward (before the expert kernels; also after a pre-routed forward) and
//! gate_input_backward (after them, with `gate_on: input`).

use crate::config::{DropPolicy, MoeConfig, RouterScore};
use crate::cpu_backward::LossCoefficients;
use crate::cpu_backward_kernels::DROPPED;

/// A token's router scores as route_tokens computes them, from its routed logits `row`
/// (gate_scores.wgsl).
struct RowScores<'a> {
    row: &'a [f32],
    max_logit: f32,
    /// Σ exp(h − max): the softmax's, which the z-loss needs whatever the scores.
    sum: f32,
    sigmoid: bool,
}

impl<'a> RowScores<'a> {
    fn new(row: &'a [f32], config: &MoeConfig) -> Self {
        let max_logit = row[1..].iter().fold(row[0], |m, &v| m.max(v));
        let sum = row.iter().fold(0.0f32, |s, &h| s + (h - max_logit).exp());
        let sigmoid = config.router_score == RouterScore::Sigmoid;
        RowScores {
            row,
            max_logit,
            sum,
            sigmoid,
        }
    }

    fn softmax(&self, e: usize) -> f32 {
        (self.row[e] - self.max_logit).exp() / self.sum
    }

    /// p[e]: σ(h[e]) or softmax(h)[e].
    fn score(&self, e: usize) -> f32 {
        if self.sigmoid {
            1.0 / (1.0 + (-self.row[e]).exp())
        } else {
            self.softmax(e)
        }
    }

    fn log_sum_exp(&self) -> f32 {
        self.max_logit + self.sum.ln()
    }

    /// Σ_j q_j over `choices` and the factor the top-k normalisation divides by it
    /// (1 without it).
    fn choices_total(&self, choices: &[u32], normalize: bool) -> (f32, f32) {
        let total = choices
            .iter()
            .fold(0.0f32, |s, &e| s + self.score(e as usize));
        (total, if normalize { 1.0 / total } else { 1.0 })
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
        let scores = RowScores::new(row, config);
        let (p, softmax) = (|e| scores.score(e), |e| scores.softmax(e));
        let scaling = config.routed_scaling_factor;
        let dp = &mut out.d_logits[token * rows..(token + 1) * rows];
        let aux_scale = coefficients.aux * n as f32 / (tokens * tokens);
        for e in 0..n {
            dp[e] = aux_scale * counts[e] as f32 + prob_sum_grad[e];
        }
        let choices = &routes[token * stride..token * stride + k];
        let (_, inverse_total) = scores.choices_total(choices, config.normalize_top_k);
        let mut weighted = 0.0f32;
        let mut any_kept = false;
        for j in 0..k {
            let slot = assignment_slot[token * stride + j];
            if slot == DROPPED {
                continue;
            }
            any_kept = true;
            let slot = slot as usize;
            if config.gates_input() {
                // The gates scaled the inputs: their dg is gate_input_backward's.
                out.slot_scale[slot] = 1.0;
                continue;
            }
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
        let z_scale = coefficients.z * 2.0 * scores.log_sum_exp() / tokens;
        if scores.sigmoid {
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

/// gate_input_backward.wgsl: with `gate_on: input`, adds the gates' part of dL/dh to
/// `d_logits` `[T, R]` (gate_backward's): per token, dg_j = s·⟨x[t], dU[slot_j]⟩ of each kept
/// routed choice (`d_x_slot`: the slots' input gradients at g·x), through the top-k
/// normalisation and the scores, in the kernel's order of terms.
pub fn gate_input_backward(
    config: &MoeConfig,
    (x, d_model): (&[f32], usize),
    logits: &[f32],
    (routes, assignment_slot): (&[u32], &[u32]),
    d_x_slot: &[f32],
    (routed_experts, shared_slices): (usize, usize),
    d_logits: &mut [f32],
) {
    let n = routed_experts;
    let k = config.top_k;
    let stride = k + shared_slices;
    let rows = logits.len() / (x.len() / d_model).max(1);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0.0f32, |s, (p, q)| s + p * q);
    for token in 0..x.len() / d_model {
        let row = &logits[token * rows..token * rows + n];
        let dh = &mut d_logits[token * rows..token * rows + n];
        let x_row = &x[token * d_model..(token + 1) * d_model];
        let scores = RowScores::new(row, config);
        let p = |e| scores.score(e);
        let slope = |q: f32| if scores.sigmoid { q * (1.0 - q) } else { q };
        let choices = &routes[token * stride..token * stride + k];
        let (q_total, inverse_total) = scores.choices_total(choices, config.normalize_top_k);
        let mut weighted = 0.0f32;
        for (j, &e) in choices.iter().enumerate() {
            let slot = assignment_slot[token * stride + j];
            if slot == DROPPED {
                continue;
            }
            let (e, slot) = (e as usize, slot as usize);
            let q = p(e);
            let d_input = &d_x_slot[slot * d_model..(slot + 1) * d_model];
            let dg = config.routed_scaling_factor * dot(x_row, d_input);
            dh[e] += dg * inverse_total * slope(q);
            weighted += dg * q;
        }
        let shift = if config.normalize_top_k {
            weighted * inverse_total * inverse_total
        } else {
            0.0
        };
        if config.normalize_top_k {
            for &e in choices {
                dh[e as usize] -= shift * slope(p(e as usize));
            }
        }
        if !scores.sigmoid {
            let mean = weighted * inverse_total - shift * q_total;
            for e in 0..n {
                dh[e] -= scores.softmax(e) * mean;
            }
        }
    }
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
