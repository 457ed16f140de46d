//! The CPU reference: the layer's specification in code (README, "What the layer computes").
//!
//! Every step is a small function named like the GPU kernel that does the same work
//! (`route_tokens` ↔ `shaders/route_tokens.wgsl`, ...), written as plain loops that read
//! like the math. Clarity comes first; the only concession to speed is that each expert
//! runs on all of its kept tokens at once (labml's `experts[i](x[indexes_list[i]])`), so a
//! weight row is read once per expert rather than once per token, and dot products keep
//! eight partial sums so that the compiler can vectorize them.

use std::borrow::Cow;

use crate::config::{DropPolicy, HiddenUnit, MoeConfig};
use crate::error::{MoeError, Result};
use crate::output::{num_tokens_of, MoeOutput};
use crate::weights::{LayerShape, MoeWeights};

pub use crate::cpu_math::{activate, dot, gate_value, QUICK_GELU_SLOPE};
pub use crate::cpu_routing::{route_tokens, select_top_k, Routing};
use crate::cpu_shared_expert::add_shared_expert;

/// `[groups, N]`: assignments routed to each expert in each group, before dropping.
pub fn count_experts(
    routes: &[u32],
    num_experts: usize,
    top_k: usize,
    group_size: usize,
) -> Vec<u32> {
    let num_groups = routes.len() / top_k / group_size;
    let mut group_counts = vec![0u32; num_groups * num_experts];
    for (token, chosen) in routes.chunks_exact(top_k).enumerate() {
        let group = token / group_size;
        for &expert in chosen {
            group_counts[group * num_experts + expert as usize] += 1;
        }
    }
    group_counts
}

/// What each expert keeps under capacity.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertLoads {
    /// `[N]`: assignments routed to each expert (all groups).
    pub counts: Vec<u32>,
    /// `[N]`: assignments kept by each expert (all groups).
    pub kept: Vec<u32>,
    /// `[groups, N]`: assignments kept by each expert in each group.
    pub group_kept: Vec<u32>,
}

/// Caps each group's per-expert count at the capacity (`None`: no dropping) and sums.
pub fn scan_expert_offsets(
    group_counts: &[u32],
    num_experts: usize,
    capacity: Option<usize>,
) -> ExpertLoads {
    let cap = |count: u32| capacity.map_or(count, |c| count.min(c.min(u32::MAX as usize) as u32));
    let group_kept: Vec<u32> = group_counts.iter().map(|&c| cap(c)).collect();
    let mut counts = vec![0u32; num_experts];
    let mut kept = vec![0u32; num_experts];
    for (group_count, group_kept) in group_counts
        .chunks_exact(num_experts)
        .zip(group_kept.chunks_exact(num_experts))
    {
        for expert in 0..num_experts {
            counts[expert] += group_count[expert];
            kept[expert] += group_kept[expert];
        }
    }
    ExpertLoads {
        counts,
        kept,
        group_kept,
    }
}

/// For every assignment `(t, j)` (index `t·k + j`), its position in its expert's list of
/// kept assignments, or `None` if dropped. Priority: within each group, all choice-0
/// assignments in token order, then all choice-1 ones, and so on; an assignment finding
/// its expert already holding `capacity` assignments of its group is dropped. An expert's
/// list holds its group-0 assignments first, then group 1's, each group in priority order.
pub fn scatter_assignments(
    routes: &[u32],
    loads: &ExpertLoads,
    num_experts: usize,
    top_k: usize,
    group_size: usize,
    capacity: Option<usize>,
) -> Vec<Option<u32>> {
    let num_tokens = routes.len() / top_k;
    let mut position = vec![None; routes.len()];
    // Kept assignments of the earlier groups, per expert.
    let mut earlier_groups_kept = vec![0u32; num_experts];
    for (group, group_start) in (0..num_tokens).step_by(group_size).enumerate() {
        let mut rank = vec![0usize; num_experts];
        for choice in 0..top_k {
            for token in group_start..group_start + group_size {
                let assignment = token * top_k + choice;
                let expert = routes[assignment] as usize;
                if capacity.is_none_or(|c| rank[expert] < c) {
                    position[assignment] = Some(earlier_groups_kept[expert] + rank[expert] as u32);
                }
                rank[expert] += 1;
            }
        }
        let kept_here = &loads.group_kept[group * num_experts..(group + 1) * num_experts];
        for (earlier, kept) in earlier_groups_kept.iter_mut().zip(kept_here) {
            *earlier += kept;
        }
    }
    position
}

/// Counting, capacity and priority for `routes` (`[T, k]`): each expert's loads and every
/// assignment's position in its expert's kept list (`None`: dropped).
pub fn assign_positions(
    config: &MoeConfig,
    routes: &[u32],
    num_experts: usize,
    group_size: usize,
) -> (ExpertLoads, Vec<Option<u32>>) {
    let top_k = config.top_k;
    let capacity = config.capacity(group_size, num_experts);
    let group_counts = count_experts(routes, num_experts, top_k, group_size);
    let loads = scan_expert_offsets(&group_counts, num_experts, capacity);
    let positions = scatter_assignments(routes, &loads, num_experts, top_k, group_size, capacity);
    (loads, positions)
}

/// `H = act(X·W1[e]ᵀ + b1[e])`, or `act(X·W1[e]ᵀ + b1[e]) ⊙ (X·W3[e]ᵀ + b3[e])` when
/// gated, for the rows `x_rows` (each `[D]`) of one expert; returns `[rows, F]`.
pub fn expert_up(
    x_rows: &[&[f32]],
    weights: &MoeWeights,
    expert: usize,
    unit: impl Into<HiddenUnit>,
) -> Vec<f32> {
    let unit = unit.into();
    let LayerShape { d_model, d_ff, .. } = weights.shape;
    // Stored formats decode as the GPU's operand loads do (formats::decode).
    let w1 = weights.w1.matrix_f32(expert);
    let w3 = weights.w3.as_ref().map(|w| w.matrix_f32(expert));
    let mut h = vec![0.0; x_rows.len() * d_ff];
    for f in 0..d_ff {
        let w1_row = &w1[f * d_model..(f + 1) * d_model];
        let b1 = weights.b1.as_ref().map_or(0.0, |b| b[expert * d_ff + f]);
        let b3 = weights.b3.as_ref().map_or(0.0, |b| b[expert * d_ff + f]);
        for (row, x_row) in x_rows.iter().enumerate() {
            let mut value = activate(unit, dot(x_row, w1_row) + b1);
            if let Some(w3) = &w3 {
                value *= gate_value(unit, dot(x_row, &w3[f * d_model..(f + 1) * d_model]) + b3);
            }
            h[row * d_ff + f] = value;
        }
    }
    h
}

/// `O = H·W2[e]ᵀ + b2[e]` for the rows of `h` (`[rows, F]`); returns `[rows, D]`.
pub fn expert_down(h: &[f32], weights: &MoeWeights, expert: usize) -> Vec<f32> {
    let LayerShape { d_model, d_ff, .. } = weights.shape;
    let w2 = weights.w2.matrix_f32(expert);
    let rows = h.len() / d_ff;
    let mut out = vec![0.0; rows * d_model];
    for d in 0..d_model {
        let w2_row = &w2[d * d_ff..(d + 1) * d_ff];
        let b2 = weights.b2.as_ref().map_or(0.0, |b| b[expert * d_model + d]);
        for (row, h_row) in h.chunks_exact(d_ff).enumerate() {
            out[row * d_model + d] = dot(h_row, w2_row) + b2;
        }
    }
    out
}

/// `y[t] = Σ_{kept j} s[t,j]·E_{route[t,j]}(x[t])` in choice order; a token with no kept
/// assignment passes through (`x[t]`, times `route_prob_max[t]` when scaling) or is zero.
/// `expert_outputs[e]` holds expert `e`'s outputs in the order of its kept list.
#[allow(clippy::too_many_arguments)]
pub fn combine_outputs(
    x: &[f32],
    routing: &Routing,
    positions: &[Option<u32>],
    expert_outputs: &[Vec<f32>],
    top_k: usize,
    d_model: usize,
    config: &MoeConfig,
) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for (token, y_row) in y.chunks_exact_mut(d_model).enumerate() {
        let mut any_kept = false;
        for choice in 0..top_k {
            let assignment = token * top_k + choice;
            let Some(position) = positions[assignment] else {
                continue;
            };
            any_kept = true;
            let expert = routing.routes[assignment] as usize;
            // With gate_on: input the gate scaled the expert's input instead.
            let scale = if config.scale_by_prob && !config.gates_input() {
                routing.gates[assignment]
            } else {
                1.0
            };
            let start = position as usize * d_model;
            let out_row = &expert_outputs[expert][start..start + d_model];
            for (y, o) in y_row.iter_mut().zip(out_row) {
                *y += scale * o;
            }
        }
        if !any_kept && config.drop_policy == DropPolicy::PassThrough {
            let scale = if config.scale_by_prob {
                routing.route_prob_max[token]
            } else {
                1.0
            };
            let x_row = &x[token * d_model..(token + 1) * d_model];
            for (y, x) in y_row.iter_mut().zip(x_row) {
                *y = scale * x;
            }
        }
    }
    y
}

/// Router statistics: `route_prob_sum [N]`, the Switch aux loss and the z-loss.
/// Sums run in f64, so the reference is more accurate than any f32 ordering.
pub fn reduce_router_stats(
    routing: &Routing,
    counts: &[u32],
    num_tokens: usize,
) -> (Vec<f32>, f32, f32) {
    let num_experts = counts.len();
    let mut route_prob_sum = vec![0.0f64; num_experts];
    for probs in routing.probs.chunks_exact(num_experts) {
        for (sum, p) in route_prob_sum.iter_mut().zip(probs) {
            *sum += *p as f64;
        }
    }
    let t = num_tokens as f64;
    let aux_loss = num_experts as f64
        * counts
            .iter()
            .zip(&route_prob_sum)
            .map(|(&c, &p)| (c as f64 / t) * (p / t))
            .sum::<f64>();
    let z_loss = routing
        .logsumexp
        .iter()
        .map(|&l| (l as f64) * (l as f64))
        .sum::<f64>()
        / t;
    (
        route_prob_sum.iter().map(|&s| s as f32).collect(),
        aux_loss as f32,
        z_loss as f32,
    )
}

/// The first token (flattened index) holding a NaN or an infinity, if any.
pub fn first_non_finite_token(x: &[f32], d_model: usize) -> Option<usize> {
    x.chunks_exact(d_model)
        .position(|row| row.iter().any(|v| !v.is_finite()))
}

/// The whole layer on the CPU: `x` of `shape` (`[T, D]` or `[S, B, D]`) to `MoeOutput`.
pub fn forward(
    config: &MoeConfig,
    weights: &MoeWeights,
    x: &[f32],
    shape: &[usize],
) -> Result<MoeOutput> {
    let LayerShape {
        num_experts,
        d_model,
        ..
    } = weights.shape;
    weights.check()?;
    config.validate_for_weights(weights)?;
    let num_tokens = num_tokens_of(shape, x.len(), d_model)?;
    let group_size = config.group_size_for(num_tokens)?;
    if let Some(token) = first_non_finite_token(x, d_model) {
        return Err(MoeError::NonFiniteInput { token });
    }
    let top_k = config.top_k;

    let routing = route_tokens(x, weights, config);
    if let Some(token) = routing.logsumexp.iter().position(|l| !l.is_finite()) {
        return Err(MoeError::NonFiniteInput { token });
    }
    let (loads, positions) = assign_positions(config, &routing.routes, num_experts, group_size);

    // Each expert's kept tokens (times their gates with gate_on: input), in the order of
    // its kept list.
    let mut expert_tokens: Vec<Vec<Cow<'_, [f32]>>> = loads
        .kept
        .iter()
        .map(|&n| vec![Cow::Borrowed(&x[..0]); n as usize])
        .collect();
    for (assignment, position) in positions.iter().enumerate() {
        if let Some(position) = position {
            let token = assignment / top_k;
            let expert = routing.routes[assignment] as usize;
            let row = &x[token * d_model..(token + 1) * d_model];
            expert_tokens[expert][*position as usize] = if config.gates_input() {
                let gate = routing.gates[assignment];
                Cow::Owned(row.iter().map(|v| gate * v).collect())
            } else {
                Cow::Borrowed(row)
            };
        }
    }
    let expert_outputs: Vec<Vec<f32>> = expert_tokens
        .iter()
        .enumerate()
        .map(|(expert, rows)| {
            let rows: Vec<&[f32]> = rows.iter().map(|row| &row[..]).collect();
            let h = expert_up(&rows, weights, expert, config.hidden_unit());
            expert_down(&h, weights, expert)
        })
        .collect();

    let mut y = combine_outputs(
        x,
        &routing,
        &positions,
        &expert_outputs,
        top_k,
        d_model,
        config,
    );
    if let Some(shared) = &weights.shared {
        add_shared_expert(&mut y, x, shared, config.hidden_unit());
    }
    let (route_prob_sum, aux_loss, z_loss) =
        reduce_router_stats(&routing, &loads.counts, num_tokens);
    let n_dropped = positions.iter().filter(|p| p.is_none()).count() as u32;
    Ok(MoeOutput {
        shape: shape.to_vec(),
        num_experts,
        top_k,
        y,
        routes: routing.routes,
        gates: routing.gates,
        route_prob_max: routing.route_prob_max,
        counts: loads.counts,
        kept: loads.kept,
        route_prob_sum,
        n_dropped,
        aux_loss,
        z_loss,
    })
}

/// The experts alone on pre-routed tokens (`MoeLayer::forward_experts`):
/// `y[t] = Σ_j w[t, j]·E_{e[t, j]}(x[t])` in choice order, no router, no capacity.
pub fn forward_experts(
    unit: impl Into<HiddenUnit>,
    weights: &MoeWeights,
    x: &[f32],
    top_k_index: &[u32],
    top_k_weights: &[f32],
) -> Vec<f32> {
    let unit = unit.into();
    let d = weights.shape.d_model;
    let num_tokens = x.len() / d;
    let k = top_k_index.len() / num_tokens.max(1);
    let mut y = vec![0.0f32; x.len()];
    for t in 0..num_tokens {
        let x_row = &x[t * d..(t + 1) * d];
        for j in 0..k {
            let e = top_k_index[t * k + j] as usize;
            let h = expert_up(&[x_row], weights, e, unit);
            let out = expert_down(&h, weights, e);
            for (acc, o) in y[t * d..(t + 1) * d].iter_mut().zip(out) {
                *acc += top_k_weights[t * k + j] * o;
            }
        }
    }
    y
}
