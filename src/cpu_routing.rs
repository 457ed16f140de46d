//! The CPU reference router (twin of `shaders/route_tokens.wgsl`): logits, scores (softmax or
//! sigmoid), the choice of experts (plain top-k, or on `p + score_bias` within the best
//! groups of experts: DeepSeek-V3's group-limited top-k) and the gates (the UNBIASED scores of
//! the choices, normalised when asked, times the routed scaling factor). SPEC "The families
//! people run" defines each variant.

use crate::config::{ExpertGroups, GroupScore, Router, RouterScore};
use crate::cpu_math::dot;
use crate::weights::{LayerShape, MoeWeights};

/// Router results for every token.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// `[T, N]`: the router logits `h = x·Wrᵀ + br`.
    pub logits: Vec<f32>,
    /// `[T, N]`: the scores `p`: softmax of the logits, or their sigmoid.
    pub probs: Vec<f32>,
    /// `[T]`: `logsumexp_e h[t, e]` (the z-loss's, whatever the scores).
    pub logsumexp: Vec<f32>,
    /// `[T, k]`: chosen experts, best first.
    pub routes: Vec<u32>,
    /// `[T, k]`: gate weights (renormalised when asked, then scaled).
    pub gates: Vec<f32>,
    /// `[T]`: the score of the first choice.
    pub route_prob_max: Vec<f32>,
}

/// The experts in order of preference by `scores`: highest first, ties to the lower expert
/// index; the first `top_k` of them.
pub fn select_top_k(scores: &[f32], top_k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    // A stable sort by descending score keeps lower indices first among equals.
    order.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
    order.truncate(top_k);
    order
}

/// A group's score: the sum of its two highest selection scores (the highest plus the
/// next, in f32) or its highest.
fn group_score(selection: &[f32], score: GroupScore) -> f32 {
    let order = select_top_k(selection, 2);
    let first = selection[order[0] as usize];
    match score {
        GroupScore::Max => first,
        GroupScore::Top2Sum => first + selection[order[1] as usize],
    }
}

/// Excludes (sets to −∞) the selection scores of every expert outside the `groups.kept`
/// best groups (ties to the lower group).
fn keep_best_groups(selection: &mut [f32], groups: ExpertGroups) {
    let size = selection.len() / groups.count;
    let scores: Vec<f32> = selection
        .chunks_exact(size)
        .map(|group| group_score(group, groups.score))
        .collect();
    let kept = select_top_k(&scores, groups.kept);
    for (group, members) in selection.chunks_exact_mut(size).enumerate() {
        if !kept.contains(&(group as u32)) {
            members.fill(f32::NEG_INFINITY);
        }
    }
}

/// The experts one token chooses from its scores `p`: top-k of `p + score_bias`, within
/// the best groups when the router has groups.
pub fn choose_experts(probs: &[f32], score_bias: Option<&[f32]>, router: &Router) -> Vec<u32> {
    let mut selection: Vec<f32> = match score_bias {
        Some(bias) => probs.iter().zip(bias).map(|(p, b)| p + b).collect(),
        None => probs.to_vec(),
    };
    if let Some(groups) = router.groups {
        keep_best_groups(&mut selection, groups);
    }
    select_top_k(&selection, router.top_k)
}

/// `p` of one token's logits: a stable softmax (the largest logit subtracted, so that exp
/// never overflows), or the sigmoid of each in f64; and the logits' logsumexp.
fn scores(logits: &[f32], score: RouterScore) -> (Vec<f32>, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|h| (h - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let probs = match score {
        RouterScore::Softmax => exps.iter().map(|e| e / sum).collect(),
        RouterScore::Sigmoid => logits
            .iter()
            .map(|&h| (1.0 / (1.0 + (-(h as f64)).exp())) as f32)
            .collect(),
    };
    (probs, max + sum.ln())
}

/// Router matmul, scores, choices and gate weights for every token.
pub fn route_tokens(x: &[f32], weights: &MoeWeights, router: impl Into<Router>) -> Routing {
    let router = router.into();
    let LayerShape {
        num_experts,
        d_model,
        ..
    } = weights.shape;
    let top_k = router.top_k;
    let num_tokens = x.len() / d_model;
    let mut routing = Routing {
        logits: Vec::with_capacity(num_tokens * num_experts),
        probs: Vec::with_capacity(num_tokens * num_experts),
        logsumexp: Vec::with_capacity(num_tokens),
        routes: Vec::with_capacity(num_tokens * top_k),
        gates: Vec::with_capacity(num_tokens * top_k),
        route_prob_max: Vec::with_capacity(num_tokens),
    };
    for x_row in x.chunks_exact(d_model) {
        // h[t, e] = x[t]·Wr[e] + br[e]
        let logits: Vec<f32> = (0..num_experts)
            .map(|e| {
                let bias = weights.router_bias.as_ref().map_or(0.0, |b| b[e]);
                dot(
                    x_row,
                    MoeWeights::expert_slice(&weights.router_weight, e, d_model),
                ) + bias
            })
            .collect();
        let (probs, logsumexp) = scores(&logits, router.score);
        let chosen = choose_experts(&probs, weights.score_bias.as_deref(), &router);
        let gates: Vec<f32> = chosen.iter().map(|&e| probs[e as usize]).collect();
        let gate_sum: f32 = gates.iter().sum();
        routing.route_prob_max.push(gates[0]);
        routing.gates.extend(gates.iter().map(|&g| {
            let g = if router.normalize_top_k {
                g / gate_sum
            } else {
                g
            };
            g * router.routed_scaling_factor
        }));
        routing.routes.extend(&chosen);
        routing.logits.extend(&logits);
        routing.probs.extend(&probs);
        routing.logsumexp.push(logsumexp);
    }
    routing
}

/// DeepSeek-V3's balancing without an aux loss, one step: `score_bias[e] += γ·sign(mean −
/// counts[e])` (sign 0 at the mean), so that overloaded experts are chosen less and idle
/// ones more; `mean` is Σ counts / N in f64, the update in f32.
pub fn balance_score_bias(score_bias: &mut [f32], counts: &[u32], gamma: f32) {
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len().max(1) as f64;
    for (bias, &count) in score_bias.iter_mut().zip(counts) {
        let step = match (count as f64).partial_cmp(&mean) {
            Some(std::cmp::Ordering::Less) => gamma,
            Some(std::cmp::Ordering::Greater) => -gamma,
            _ => 0.0,
        };
        *bias += step;
    }
}
