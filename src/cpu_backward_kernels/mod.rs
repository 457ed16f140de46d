//! The CPU twins of the backward's kernels, one function per shader of the same name, in
//! f32 with each sum in the shader's order: they take the tables and buffers a kernel
//! reads (a traced backward's, in tests) and return what it writes, so each kernel is
//! judged alone. `cpu_backward::backward` is the reference of the whole (in f64).

// Index loops over several arrays at once read like the shaders they mirror.
#![allow(clippy::needless_range_loop)]

mod experts;
mod gates;

pub use experts::{
    expert_bias_backward, expert_down_backward, expert_hidden_backward, expert_input_backward,
    expert_up_backward, BiasGradients,
};
pub use gates::{gate_backward, gate_backward_pre_routed, gate_input_backward, GateGradients};

use crate::gpu::params::OptimizerParams;

/// A slot's mark in `assignment_slot` when its assignment was dropped.
pub(crate) const DROPPED: u32 = u32::MAX;

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
/// choices in choice order (with `gate_on: input`, each slot's input gradient times its
/// gate, `slot_gate`), then the pass-through.
pub fn combine_backward(
    router: Option<(&[f32], &[f32])>,
    (assignment_slot, top_k): (&[u32], usize),
    (d_x_slot, slot_gate): (&[f32], Option<&[f32]>),
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
                    let slot = slot as usize;
                    let gate = slot_gate.map_or(1.0, |gates| gates[slot]);
                    sum += gate * d_x_slot[slot * d + dd];
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
