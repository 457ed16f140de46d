//! The CPU reference's shared expert (SPEC "The families people run"): every token's
//! `σ(x·gateᵀ)·S(x)` (or `S(x)` without a gate), added to the routed experts' output, and its
//! backward: a dense FFN over every token plus the gate by the chain rule. The forward runs in
//! f32 as the routed experts do; the backward recomputes it and sums in f64.

// Index loops over several arrays at once read like the formulas they implement.
#![allow(clippy::needless_range_loop)]

use crate::config::HiddenUnit;
use crate::cpu_math::{activate, activation_derivative, dot, gate_derivative, gate_value};
use crate::weights::SharedExpert;

/// One token through the shared expert: its pre-activations `a` (and `v` when gated), its
/// hidden row `h`, its output `S(x)` and its gate weight (1 without a gate).
struct Pass {
    a: Vec<f32>,
    v: Option<Vec<f32>>,
    h: Vec<f32>,
    out: Vec<f32>,
    gate: f32,
}

fn pass(shared: &SharedExpert, unit: HiddenUnit, x_row: &[f32]) -> Pass {
    let (d, f) = (x_row.len(), shared.d_ff);
    let projection = |w: &[f32], b: &Option<Vec<f32>>| -> Vec<f32> {
        (0..f)
            .map(|row| dot(x_row, &w[row * d..(row + 1) * d]) + b.as_ref().map_or(0.0, |b| b[row]))
            .collect()
    };
    let a = projection(&shared.w1, &shared.b1);
    let v = shared.w3.as_ref().map(|w3| projection(w3, &shared.b3));
    let h: Vec<f32> = (0..f)
        .map(|row| {
            let act = activate(unit, a[row]);
            v.as_ref().map_or(act, |v| act * gate_value(unit, v[row]))
        })
        .collect();
    let out: Vec<f32> = (0..d)
        .map(|dd| {
            dot(&h, &shared.w2[dd * f..(dd + 1) * f]) + shared.b2.as_ref().map_or(0.0, |b| b[dd])
        })
        .collect();
    let gate = shared.gate.as_ref().map_or(1.0, |gate| {
        let z = dot(x_row, gate) as f64;
        (1.0 / (1.0 + (-z).exp())) as f32
    });
    Pass { a, v, h, out, gate }
}

/// Adds `σ(x[t]·gateᵀ)·S(x[t])` (or `S(x[t])`) to every row of `y`.
pub fn add_shared_expert(y: &mut [f32], x: &[f32], shared: &SharedExpert, unit: HiddenUnit) {
    let d_model = shared.w1.len() / shared.d_ff;
    for (y_row, x_row) in y.chunks_exact_mut(d_model).zip(x.chunks_exact(d_model)) {
        let Pass { out, gate, .. } = pass(shared, unit, x_row);
        for (y, o) in y_row.iter_mut().zip(out) {
            *y += gate * o;
        }
    }
}

/// The shared expert's gradient sums in f64, shaped like its tensors.
pub struct SharedSums {
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    b2: Vec<f64>,
    w3: Vec<f64>,
    b3: Vec<f64>,
    gate: Vec<f64>,
}

impl SharedSums {
    pub fn zeros(shared: &SharedExpert) -> Self {
        let (f, d) = (shared.d_ff, shared.w1.len() / shared.d_ff);
        SharedSums {
            w1: vec![0.0; f * d],
            b1: vec![0.0; f],
            w2: vec![0.0; d * f],
            b2: vec![0.0; d],
            w3: vec![0.0; f * d],
            b3: vec![0.0; f],
            gate: vec![0.0; d],
        }
    }

    /// In f32, the tensors `shared` has.
    pub fn into_gradients(self, shared: &SharedExpert) -> SharedExpert {
        let f32s = |v: &[f64]| v.iter().map(|&s| s as f32).collect::<Vec<_>>();
        let present = |tensor: &Option<Vec<f32>>, sums: &[f64]| tensor.as_ref().map(|_| f32s(sums));
        SharedExpert {
            d_ff: shared.d_ff,
            w1: f32s(&self.w1),
            b1: present(&shared.b1, &self.b1),
            w2: f32s(&self.w2),
            b2: present(&shared.b2, &self.b2),
            w3: present(&shared.w3, &self.w3),
            b3: present(&shared.b3, &self.b3),
            gate: present(&shared.gate, &self.gate),
        }
    }
}

/// One token's backward through the shared expert: its tensors' gradients into `sums`, its
/// input's into `dx` (f64, added).
pub fn shared_expert_backward(
    sums: &mut SharedSums,
    shared: &SharedExpert,
    unit: HiddenUnit,
    (x_row, dy_row): (&[f32], &[f32]),
    dx: &mut [f64],
) {
    let (d, f) = (x_row.len(), shared.d_ff);
    let Pass { a, v, h, out, gate } = pass(shared, unit, x_row);
    let g = gate as f64;
    if let Some(gate_w) = &shared.gate {
        // y += σ(z)·S(x), z = x·gate: dz = ⟨dy, S(x)⟩·σ(z)·(1 − σ(z)).
        let dot_dy_out: f64 = dy_row
            .iter()
            .zip(&out)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        let dz = dot_dy_out * g * (1.0 - g);
        for dd in 0..d {
            sums.gate[dd] += dz * x_row[dd] as f64;
            dx[dd] += dz * gate_w[dd] as f64;
        }
    }
    // dS = g·dy; dh = dSᵀ·W2; dW2 += dS ⊗ h; db2 += dS.
    let mut dh = vec![0.0f64; f];
    for dd in 0..d {
        let ds = g * dy_row[dd] as f64;
        sums.b2[dd] += ds;
        for ff in 0..f {
            sums.w2[dd * f + ff] += ds * h[ff] as f64;
            dh[ff] += ds * shared.w2[dd * f + ff] as f64;
        }
    }
    for ff in 0..f {
        let act = activate(unit, a[ff]) as f64;
        let slope = activation_derivative(unit, a[ff]) as f64;
        let gate_factor = v.as_ref().map_or(1.0, |v| gate_value(unit, v[ff]) as f64);
        let da = dh[ff] * gate_factor * slope;
        sums.b1[ff] += da;
        for dd in 0..d {
            sums.w1[ff * d + dd] += da * x_row[dd] as f64;
            dx[dd] += da * shared.w1[ff * d + dd] as f64;
        }
        if let (Some(v), Some(w3)) = (&v, &shared.w3) {
            let dv = dh[ff] * act * gate_derivative(unit, v[ff]) as f64;
            sums.b3[ff] += dv;
            for dd in 0..d {
                sums.w3[ff * d + dd] += dv * x_row[dd] as f64;
                dx[dd] += dv * w3[ff * d + dd] as f64;
            }
        }
    }
}
