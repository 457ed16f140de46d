//! The twins of the expert kernels: the per-slot matmuls (expert_hidden_backward,
//! expert_input_backward), the weight-gradient ones (expert_down_backward,
//! expert_up_backward) and the bias sums, each over the training forward's slot tables.

// Index loops over several arrays at once read like the shaders they mirror.
#![allow(clippy::needless_range_loop)]

use crate::config::MoeConfig;
use crate::cpu_backward_kernels::SlotTables;
use crate::cpu_math::{activate, activation_derivative, gate_derivative, gate_value};
use crate::weights::{LayerShape, MoeWeights};

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
/// gradient is `d_pre` (dA for W1, dV for W3), over each expert's kept slots in slot order;
/// with `gate_on: input` each slot's x row scaled by its gate (`slot_gate`).
pub fn expert_up_backward(
    shape: LayerShape,
    tables: SlotTables<'_>,
    (x, slot_gate): (&[f32], Option<&[f32]>),
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
            let gate = slot_gate.map_or(1.0, |gates| gates[slot]);
            for unit in 0..f {
                let g = d_pre[slot * f + unit];
                for dd in 0..d {
                    dw[(e * f + unit) * d + dd] += g * (gate * x[token * d + dd]);
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
