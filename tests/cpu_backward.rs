//! The CPU reference backward against central finite differences of the loss, computed by
//! an independent f64 forward written here (routing decisions and `counts` held constant,
//! as SPEC "Backward" says, and `stop_gradient` values held at the unperturbed point), on
//! tiny shapes across activations, gating, top-k, normalisation, dropping, both drop
//! policies, scaling and the aux and z losses; plus hand-worked cases of the rules.

// Index loops over several arrays at once read like the formulas they implement.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

mod common;

use common::*;
use switch_moe::cpu_backward::{
    activation_derivative, backward, gate_derivative, Gradients, LossCoefficients,
};
use switch_moe::cpu_reference;
use switch_moe::cpu_reference::gate_value;
use switch_moe::weights::SharedExpert;
use switch_moe::{
    Activation, DropPolicy, ExpertMatrices, HiddenUnit, LayerShape, MoeConfig, MoeError,
    MoeWeights, RouterScore, WeightFormat,
};

/// Every tensor the loss depends on, in f64, in native layout.
#[derive(Clone)]
struct Params {
    x: Vec<f64>,
    router_weight: Vec<f64>,
    router_bias: Option<Vec<f64>>,
    w1: Vec<f64>,
    b1: Option<Vec<f64>>,
    w2: Vec<f64>,
    b2: Option<Vec<f64>>,
    w3: Option<Vec<f64>>,
    b3: Option<Vec<f64>>,
    /// The shared expert's tensors by native name, and its width Fs.
    shared: Vec<(&'static str, Vec<f64>)>,
    shared_d_ff: usize,
}

fn f64s(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

impl Params {
    fn new(weights: &MoeWeights, x: &[f32]) -> Self {
        Params {
            x: f64s(x),
            router_weight: f64s(&weights.router_weight),
            router_bias: weights.router_bias.as_deref().map(f64s),
            w1: f64s(&weights.w1.to_f32()),
            b1: weights.b1.as_deref().map(f64s),
            w2: f64s(&weights.w2.to_f32()),
            b2: weights.b2.as_deref().map(f64s),
            w3: weights.w3.as_ref().map(|w| f64s(&w.to_f32())),
            b3: weights.b3.as_deref().map(f64s),
            shared: weights
                .shared
                .iter()
                .flat_map(|s| s.tensors())
                .map(|(n, v)| (n, f64s(v)))
                .collect(),
            shared_d_ff: weights.shared.as_ref().map_or(0, |s| s.d_ff),
        }
    }

    /// A shared tensor by name, if the layer has it.
    fn shared(&self, name: &str) -> Option<&[f64]> {
        self.shared
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Each tensor, named, mutable.
    fn tensors(&mut self) -> Vec<(&'static str, &mut Vec<f64>)> {
        let mut out: Vec<(&'static str, &mut Vec<f64>)> = vec![
            ("x", &mut self.x),
            ("router.weight", &mut self.router_weight),
            ("experts.w1", &mut self.w1),
            ("experts.w2", &mut self.w2),
        ];
        for (name, tensor) in [
            ("router.bias", self.router_bias.as_mut()),
            ("experts.b1", self.b1.as_mut()),
            ("experts.b2", self.b2.as_mut()),
            ("experts.w3", self.w3.as_mut()),
            ("experts.b3", self.b3.as_mut()),
        ] {
            if let Some(tensor) = tensor {
                out.push((name, tensor));
            }
        }
        out.extend(self.shared.iter_mut().map(|(name, tensor)| (*name, tensor)));
        out
    }
}

/// The gradient of a named tensor.
fn gradient<'g>(gradients: &'g Gradients, name: &str) -> &'g [f32] {
    match name {
        "x" => &gradients.x,
        "router.weight" => &gradients.router_weight,
        "router.bias" => gradients.router_bias.as_deref().unwrap(),
        "experts.w1" => &gradients.w1,
        "experts.b1" => gradients.b1.as_deref().unwrap(),
        "experts.w2" => &gradients.w2,
        "experts.b2" => gradients.b2.as_deref().unwrap(),
        "experts.w3" => gradients.w3.as_deref().unwrap(),
        "experts.b3" => gradients.b3.as_deref().unwrap(),
        shared if shared.starts_with("shared.") => gradients
            .shared
            .as_ref()
            .and_then(|s| s.tensors().into_iter().find(|(n, _)| *n == shared))
            .map(|(_, v)| v)
            .unwrap(),
        other => panic!("no tensor {other}"),
    }
}

fn act(unit: impl Into<HiddenUnit>, a: f64) -> f64 {
    let unit = unit.into();
    match unit.activation {
        Activation::Relu => a.max(0.0),
        Activation::Gelu => 0.5 * a * (1.0 + libm::erf(a / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * a * (1.0 + (k * (a + 0.044715 * a * a * a)).tanh())
        }
        Activation::Silu => a / (1.0 + (-a).exp()),
        Activation::Relu2 => a.max(0.0).powi(2),
        Activation::QuickGelu => a / (1.0 + (-1.702 * a).exp()),
        Activation::SwigluOai => {
            let a = a.min(unit.swiglu_limit as f64);
            a / (1.0 + (-(unit.swiglu_alpha as f64) * a).exp())
        }
    }
}

/// What a gated FFN's `v` contributes: `v`, or swiglu_oai's `clamp(v, −L, L) + 1`.
fn gate(unit: HiddenUnit, v: f64) -> f64 {
    match unit.activation {
        Activation::SwigluOai => {
            let limit = unit.swiglu_limit as f64;
            v.clamp(-limit, limit) + 1.0
        }
        _ => v,
    }
}

/// The points where the hidden unit's derivative jumps: of `a`, and of `v` when gated.
fn kinks(unit: HiddenUnit) -> (Vec<f64>, Vec<f64>) {
    let limit = unit.swiglu_limit as f64;
    match unit.activation {
        Activation::Relu | Activation::Relu2 => (vec![0.0], vec![]),
        Activation::SwigluOai => (vec![limit], vec![-limit, limit]),
        _ => (vec![], vec![]),
    }
}

/// What the forward decided (constants of the backward) and the stop-gradient values.
struct Decisions {
    routes: Vec<u32>,
    kept: Vec<bool>,
    counts: Vec<u32>,
    /// g at the unperturbed point, per assignment (for g / stop_gradient(g)).
    gates: Vec<f64>,
    /// q_0 at the unperturbed point, per token.
    first: Vec<f64>,
}

struct Layer {
    config: MoeConfig,
    n: usize,
    d: usize,
    f: usize,
}

impl Layer {
    /// Router scores (softmax or sigmoid) and logsumexp of every token, in f64.
    fn route(&self, p: &Params) -> (Vec<f64>, Vec<f64>) {
        let (n, d) = (self.n, self.d);
        let tokens = p.x.len() / d;
        let mut probs = vec![0.0; tokens * n];
        let mut lse = vec![0.0; tokens];
        for t in 0..tokens {
            let logits: Vec<f64> = (0..n)
                .map(|e| {
                    let dot: f64 = (0..d)
                        .map(|i| p.x[t * d + i] * p.router_weight[e * d + i])
                        .sum();
                    dot + p.router_bias.as_ref().map_or(0.0, |b| b[e])
                })
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|h| (h - max).exp()).sum();
            for e in 0..n {
                probs[t * n + e] = match self.config.router_score {
                    RouterScore::Softmax => (logits[e] - max).exp() / sum,
                    RouterScore::Sigmoid => 1.0 / (1.0 + (-logits[e]).exp()),
                };
            }
            lse[t] = max + sum.ln();
        }
        (probs, lse)
    }

    /// Gates g of the decided routes from `probs` (normalised when asked, then scaled), and
    /// each token's q_0.
    fn gates(&self, probs: &[f64], routes: &[u32]) -> (Vec<f64>, Vec<f64>) {
        let k = self.config.top_k;
        let mut gates = Vec::new();
        let mut first = Vec::new();
        for (t, chosen) in routes.chunks(k).enumerate() {
            let q: Vec<f64> = chosen
                .iter()
                .map(|&e| probs[t * self.n + e as usize])
                .collect();
            let total: f64 = q.iter().sum();
            first.push(q[0]);
            let scaling = self.config.routed_scaling_factor as f64;
            gates.extend(q.iter().map(|v| {
                scaling
                    * if self.config.normalize_top_k {
                        v / total
                    } else {
                        *v
                    }
            }));
        }
        (gates, first)
    }

    /// One expert on one token: E(x) = act(x·W1ᵀ + b1) (⊙ (x·W3ᵀ + b3)) · W2ᵀ + b2.
    /// Expert e on token t's row times `input_scale` (gate_on: input's gate, or 1).
    fn expert(&self, p: &Params, e: usize, t: usize, input_scale: f64) -> Vec<f64> {
        let (d, f) = (self.d, self.f);
        let x = &p.x[t * d..(t + 1) * d];
        let linear = |w: &[f64], b: &Option<Vec<f64>>, row: usize| -> f64 {
            (0..d)
                .map(|i| input_scale * x[i] * w[(e * f + row) * d + i])
                .sum::<f64>()
                + b.as_ref().map_or(0.0, |b| b[e * f + row])
        };
        let h: Vec<f64> = (0..f)
            .map(|j| {
                let unit = self.config.hidden_unit();
                let a = act(unit, linear(&p.w1, &p.b1, j));
                match &p.w3 {
                    Some(w3) => a * gate(unit, linear(w3, &p.b3, j)),
                    None => a,
                }
            })
            .collect();
        (0..d)
            .map(|i| {
                (0..f)
                    .map(|j| h[j] * p.w2[(e * d + i) * f + j])
                    .sum::<f64>()
                    + p.b2.as_ref().map_or(0.0, |b| b[e * d + i])
            })
            .collect()
    }

    /// σ(x·gate)·S(x) (or S(x)) of token t: zeros without a shared expert.
    fn shared_expert(&self, p: &Params, t: usize) -> Vec<f64> {
        let (d, f) = (self.d, p.shared_d_ff);
        let Some(w1) = p.shared("shared.w1") else {
            return vec![0.0; d];
        };
        let x = &p.x[t * d..(t + 1) * d];
        let unit = self.config.hidden_unit();
        let linear = |w: &[f64], b: Option<&[f64]>, row: usize| -> f64 {
            (0..d).map(|i| x[i] * w[row * d + i]).sum::<f64>() + b.map_or(0.0, |b| b[row])
        };
        let h: Vec<f64> = (0..f)
            .map(|j| {
                let a = act(unit, linear(w1, p.shared("shared.b1"), j));
                match p.shared("shared.w3") {
                    Some(w3) => a * gate(unit, linear(w3, p.shared("shared.b3"), j)),
                    None => a,
                }
            })
            .collect();
        let w2 = p.shared("shared.w2").unwrap();
        let g = p.shared("shared.gate").map_or(1.0, |gate| {
            let z: f64 = (0..d).map(|i| x[i] * gate[i]).sum();
            1.0 / (1.0 + (-z).exp())
        });
        (0..d)
            .map(|i| {
                let o = (0..f).map(|j| h[j] * w2[i * f + j]).sum::<f64>()
                    + p.shared("shared.b2").map_or(0.0, |b| b[i]);
                g * o
            })
            .collect()
    }

    /// L = Σ dy ⊙ y + α·aux + β·z with the decisions held constant.
    fn loss(
        &self,
        p: &Params,
        decisions: &Decisions,
        dy: &[f64],
        coefficients: LossCoefficients,
    ) -> f64 {
        let (n, d, k) = (self.n, self.d, self.config.top_k);
        let tokens = p.x.len() / d;
        let (probs, lse) = self.route(p);
        let (gates, first) = self.gates(&probs, &decisions.routes);
        let mut loss = 0.0;
        for t in 0..tokens {
            let mut y = vec![0.0; d];
            let mut any_kept = false;
            for j in 0..k {
                let assignment = t * k + j;
                if !decisions.kept[assignment] {
                    continue;
                }
                any_kept = true;
                let s = if self.config.scale_by_prob {
                    gates[assignment]
                } else {
                    gates[assignment] / decisions.gates[assignment]
                };
                let expert = decisions.routes[assignment] as usize;
                let (input_scale, output_scale) = if self.config.gates_input() {
                    (s, 1.0)
                } else {
                    (1.0, s)
                };
                let out = self.expert(p, expert, t, input_scale);
                for i in 0..d {
                    y[i] += output_scale * out[i];
                }
            }
            if !any_kept && self.config.drop_policy == DropPolicy::PassThrough {
                let pi = if self.config.scale_by_prob {
                    first[t]
                } else {
                    first[t] / decisions.first[t]
                };
                for i in 0..d {
                    y[i] = pi * p.x[t * d + i];
                }
            }
            for (y, s) in y.iter_mut().zip(self.shared_expert(p, t)) {
                *y += s;
            }
            loss += (0..d).map(|i| dy[t * d + i] * y[i]).sum::<f64>();
        }
        let tokens_f = tokens as f64;
        let aux: f64 = (0..n)
            .map(|e| {
                let prob_sum: f64 = (0..tokens).map(|t| probs[t * n + e]).sum();
                decisions.counts[e] as f64 / tokens_f * prob_sum / tokens_f
            })
            .sum::<f64>()
            * n as f64;
        let z: f64 = lse.iter().map(|l| l * l).sum::<f64>() / tokens_f;
        loss + coefficients.aux as f64 * aux + coefficients.z as f64 * z
    }
}

/// Seeded weights rounded to f32 (the loss reads them in f64 exactly).
fn setup(
    config: &MoeConfig,
    n: usize,
    d: usize,
    f: usize,
    t: usize,
    biases: bool,
    seed: u64,
) -> (MoeWeights, Vec<f32>, Vec<f32>) {
    let mut weights = MoeWeights::random(shape(n, d, f), config.gated, biases, seed);
    // Scale the router up so that probabilities are far from uniform.
    weights.router_weight.iter_mut().for_each(|w| *w *= 3.0);
    // Sigmoid routers get DeepSeek-V3's selection bias (a constant of the backward).
    if config.router_score == RouterScore::Sigmoid {
        weights.score_bias = Some(switch_moe::rng::SeededRng::new(seed ^ 0x5B).uniform_vec(n, 0.1));
    }
    let x = tokens(t, d, seed);
    let dy = tokens(t, d, seed + 1000);
    (weights, x, dy)
}

/// One hidden unit's pre-activations a and (gated) v.
type PreActivation = (f64, Option<f64>);

/// Checks every element of every gradient against central differences of the f64 loss.
fn check_finite_differences(
    config: MoeConfig,
    n: usize,
    d: usize,
    f: usize,
    t: usize,
    biases: bool,
    coefficients: LossCoefficients,
    seed: u64,
) -> Vec<PreActivation> {
    let (weights, x, dy) = setup(&config, n, d, f, t, biases, seed);
    check_differences(config, &weights, (&x, &dy), coefficients)
}

/// [`check_finite_differences`] on given weights, input and dy.
fn check_differences(
    config: MoeConfig,
    weights: &MoeWeights,
    (x, dy): (&[f32], &[f32]),
    coefficients: LossCoefficients,
) -> Vec<PreActivation> {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = weights.shape;
    let t = x.len() / d;
    let shape = [t, d];
    let gradients = backward(&config, weights, x, &shape, dy, coefficients).expect("backward");
    let reference = cpu_forward(&config, weights, x, &shape);
    let group_size = config.group_size_for(t).unwrap();
    let (_, positions) = cpu_reference::assign_positions(&config, &reference.routes, n, group_size);
    let layer = Layer {
        config: config.clone(),
        n,
        d,
        f,
    };
    let base = Params::new(weights, x);
    let (probs, _) = layer.route(&base);
    let (gates, first) = layer.gates(&probs, &reference.routes);
    let decisions = Decisions {
        routes: reference.routes.clone(),
        kept: positions.iter().map(|p| p.is_some()).collect(),
        counts: reference.counts.clone(),
        gates,
        first,
    };
    // No pre-activation near a kink of the hidden unit: a step of ε = 1e-5 moves one by far
    // less than 1e-3.
    let (a_kinks, v_kinks) = kinks(config.hidden_unit());
    let mut pre_activations = Vec::new();
    for (assignment, _) in decisions.kept.iter().enumerate().filter(|(_, kept)| **kept) {
        let (t, e) = (
            assignment / config.top_k,
            decisions.routes[assignment] as usize,
        );
        let linear = |w: &[f64], b: &Option<Vec<f64>>, row: usize| -> f64 {
            (0..d)
                .map(|i| base.x[t * d + i] * w[(e * f + row) * d + i])
                .sum::<f64>()
                + b.as_ref().map_or(0.0, |b| b[e * f + row])
        };
        for row in 0..f {
            let a = linear(&base.w1, &base.b1, row);
            let v = base.w3.as_ref().map(|w3| linear(w3, &base.b3, row));
            pre_activations.push((a, v));
            let near = |value: f64, kinks: &[f64]| kinks.iter().any(|k| (value - k).abs() <= 1e-3);
            assert!(
                !near(a, &a_kinks) && !v.is_some_and(|v| near(v, &v_kinks)),
                "pre-activation {a} or {v:?} too close to a kink of {:?}: pick another seed",
                config.activation
            );
        }
    }
    let dy64 = f64s(dy);
    let epsilon = 1e-5;
    let mut params = base.clone();
    let mut checked = 0;
    let names: Vec<&'static str> = params.tensors().into_iter().map(|(n, _)| n).collect();
    for name in names {
        let analytic = gradient(&gradients, name).to_vec();
        let mut numeric = vec![0.0f64; analytic.len()];
        for (i, value) in numeric.iter_mut().enumerate() {
            let original = tensor_of(&mut params, name)[i];
            tensor_of(&mut params, name)[i] = original + epsilon;
            let plus = layer.loss(&params, &decisions, &dy64, coefficients);
            tensor_of(&mut params, name)[i] = original - epsilon;
            let minus = layer.loss(&params, &decisions, &dy64, coefficients);
            tensor_of(&mut params, name)[i] = original;
            *value = (plus - minus) / (2.0 * epsilon);
        }
        // The f32 backward reads p, a, h and o as the f32 forward computes them: each is off
        // by at most (D + F + N)·2⁻²⁴ relative to the magnitudes summed, and products of up
        // to four such factors enter each term, so 1e-5 of the tensor's largest gradient
        // bounds the difference; central differences in f64 with ε = 1e-5 err by ~1e-10.
        let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (&a, &fd)) in analytic.iter().zip(&numeric).enumerate() {
            let tolerance = 1e-5 * scale + 1e-7;
            assert!(
                (a as f64 - fd).abs() <= tolerance,
                "{name}[{i}]: backward {a} vs finite differences {fd} (tolerance {tolerance:e}), config {config:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
    pre_activations
}

fn tensor_of<'p>(params: &'p mut Params, name: &str) -> &'p mut Vec<f64> {
    params
        .tensors()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| t)
        .unwrap()
}

const BOTH: LossCoefficients = LossCoefficients { aux: 0.3, z: 0.2 };

#[test]
fn sigmoid_top2_grouped_normalised_scaled_with_dropping() {
    let config = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Silu,
        router_score: RouterScore::Sigmoid,
        n_group: Some(3),
        topk_group: Some(2),
        normalize_top_k: true,
        routed_scaling_factor: 2.5,
        capacity_factor: 0.75,
        ..MoeConfig::default()
    };
    check_finite_differences(config, 6, 5, 4, 9, true, BOTH, 7);
}

#[test]
fn shared_experts_gated_or_not_with_and_without_their_gate() {
    // DeepSeek-V3: sigmoid routing, a gated shared expert of its own width, no gate.
    let deepseek = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Silu,
        router_score: RouterScore::Sigmoid,
        normalize_top_k: true,
        routed_scaling_factor: 2.5,
        drop_tokens: false,
        ..MoeConfig::default()
    };
    let (mut weights, x, dy) = setup(&deepseek, 4, 5, 6, 7, false, 9);
    weights.shared = Some(SharedExpert::random((5, 7), true, false, false, 10));
    check_differences(deepseek, &weights, (&x, &dy), BOTH);
    // Qwen2-MoE: softmax routing, a shared expert weighed by σ(x·gate); ungated relu with
    // biases and heavy dropping (the shared expert is never dropped).
    let qwen = MoeConfig {
        capacity_factor: 0.5,
        ..config(1)
    };
    let (mut weights, x, dy) = setup(&qwen, 3, 5, 4, 8, true, 11);
    weights.shared = Some(SharedExpert::random((5, 3), false, true, true, 12));
    check_differences(qwen, &weights, (&x, &dy), BOTH);
}

#[test]
fn gates_on_the_input_sigmoid_top2_with_biases_dropping_and_a_shared_expert() {
    // Llama 4's routing (sigmoid gates on the experts' input), with biases, a scale and
    // dropping (pass-through) beyond it.
    let llama4 = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Silu,
        router_score: RouterScore::Sigmoid,
        gate_on: switch_moe::GateOn::Input,
        routed_scaling_factor: 1.5,
        capacity_factor: 0.75,
        ..MoeConfig::default()
    };
    let (mut weights, x, dy) = setup(&llama4, 4, 5, 6, 9, true, 13);
    weights.shared = Some(SharedExpert::random((5, 6), true, true, false, 14));
    check_differences(llama4, &weights, (&x, &dy), BOTH);
}

#[test]
fn sigmoid_top1_unscaled_gates_passing_through() {
    for scale_by_prob in [true, false] {
        let config = MoeConfig {
            router_score: RouterScore::Sigmoid,
            routed_scaling_factor: 1.5,
            capacity_factor: 0.5,
            scale_by_prob,
            ..MoeConfig::default()
        };
        check_finite_differences(config, 4, 5, 6, 9, true, BOTH, 8);
    }
}

#[test]
fn relu_top1_with_dropping_and_both_losses() {
    let config = MoeConfig {
        capacity_factor: 1.0,
        ..config(1)
    };
    check_finite_differences(config, 4, 5, 6, 9, true, BOTH, 1);
}

#[test]
fn gelu_gated_top2_normalised_unscaled_with_dropped_choices() {
    let config = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Gelu,
        normalize_top_k: true,
        scale_by_prob: false,
        capacity_factor: 0.75,
        ..MoeConfig::default()
    };
    check_finite_differences(config, 4, 5, 6, 8, true, BOTH, 2);
}

#[test]
fn silu_gated_top2_zero_policy_without_biases() {
    let config = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Silu,
        drop_policy: DropPolicy::Zero,
        capacity_factor: 0.5,
        ..MoeConfig::default()
    };
    check_finite_differences(config, 3, 4, 5, 7, false, BOTH, 3);
}

#[test]
fn gelu_tanh_top3_groups_and_pass_through_of_everything() {
    let grouped = MoeConfig {
        top_k: 3,
        activation: Activation::GeluTanh,
        normalize_top_k: true,
        group_size: Some(3),
        capacity_factor: 1.0,
        ..MoeConfig::default()
    };
    check_finite_differences(grouped, 4, 4, 5, 6, true, BOTH, 4);
    for scale_by_prob in [true, false] {
        let everything_dropped = MoeConfig {
            expert_capacity: Some(0),
            scale_by_prob,
            ..config(2)
        };
        check_finite_differences(everything_dropped, 3, 4, 5, 5, true, BOTH, 5);
    }
}

#[test]
fn dropless_without_losses() {
    let config = MoeConfig {
        drop_tokens: false,
        activation: Activation::Silu,
        ..config(2)
    };
    check_finite_differences(config, 4, 6, 7, 6, true, LossCoefficients::default(), 6);
}

/// N = 2, D = 2, a zero router (p = ½ each, ties to expert 0), capacity 0: every token
/// passes through. Scaled: y = q₀·x, so dx = q₀·dy and dq₀ = ⟨dy, x⟩; unscaled:
/// y = x·q₀/sg(q₀), so dx = dy and dq₀ = ⟨dy, x⟩/q₀. Then dh = p ⊙ (dp − ⟨p, dp⟩).
#[test]
fn pass_through_by_hand() {
    let weights = MoeWeights {
        shape: shape(2, 2, 1),
        router_weight: vec![0.0; 4],
        router_bias: Some(vec![0.0; 2]),
        score_bias: None,
        w1: ExpertMatrices::from_f32(2, 1, 2, vec![1.0; 4]),
        b1: None,
        w2: ExpertMatrices::from_f32(2, 2, 1, vec![1.0; 4]),
        b2: None,
        w3: None,
        b3: None,
        shared: None,
    };
    let (x, dy) = ([1.0f32, 2.0], [1.0f32, 1.0]);
    for (scale_by_prob, dx, dh0) in [(true, 0.5, 0.75), (false, 1.0, 1.5)] {
        let config = MoeConfig {
            expert_capacity: Some(0),
            scale_by_prob,
            ..config(1)
        };
        let g = backward(
            &config,
            &weights,
            &x,
            &[1, 2],
            &dy,
            LossCoefficients::default(),
        )
        .unwrap();
        assert_eq!(g.x, vec![dx, dx], "scale_by_prob {scale_by_prob}");
        assert_eq!(g.router_bias, Some(vec![dh0, -dh0]));
        assert_eq!(g.router_weight, vec![dh0, 2.0 * dh0, -dh0, -2.0 * dh0]);
        assert!(
            g.w1.iter().chain(&g.w2).all(|&v| v == 0.0),
            "dropped: no expert gradient"
        );
    }
}

/// With dy = 0 only the router losses remain: the aux loss gives
/// dh[t,e] = p·(a − ⟨p, a⟩) with a[e] = α·N·counts[e]/T², the z-loss dh[t,e] = β·2·lse·p/T.
#[test]
fn aux_and_z_losses_by_hand() {
    let config = config(1);
    let (weights, x, _) = setup(&config, 3, 4, 5, 6, true, 7);
    let dy = vec![0.0; x.len()];
    let routing = cpu_reference::route_tokens(&x, &weights, switch_moe::Router::softmax(1, false));
    let forward = cpu_forward(&config, &weights, &x, &[6, 4]);
    let (n, tokens) = (3usize, 6.0f64);
    for (alpha, beta) in [(0.5f32, 0.0f32), (0.0, 0.25)] {
        let coefficients = LossCoefficients {
            aux: alpha,
            z: beta,
        };
        let g = backward(&config, &weights, &x, &[6, 4], &dy, coefficients).unwrap();
        let mut expected = vec![0.0f64; n];
        for t in 0..6 {
            let p = &routing.probs[t * n..(t + 1) * n];
            let a: Vec<f64> = (0..n)
                .map(|e| alpha as f64 * n as f64 * forward.counts[e] as f64 / (tokens * tokens))
                .collect();
            let mean: f64 = (0..n).map(|e| p[e] as f64 * a[e]).sum();
            for e in 0..n {
                expected[e] += p[e] as f64 * (a[e] - mean)
                    + beta as f64 * 2.0 * routing.logsumexp[t] as f64 * p[e] as f64 / tokens;
            }
        }
        let bias = g.router_bias.unwrap();
        for e in 0..n {
            assert!(
                (bias[e] as f64 - expected[e]).abs() <= 1e-6 * expected[e].abs().max(1e-3),
                "{e}: {} vs {}",
                bias[e],
                expected[e]
            );
        }
        assert!(g.w1.iter().chain(&g.w2).all(|&v| v == 0.0));
    }
}

#[test]
fn relu2_top2_with_dropping() {
    let config = MoeConfig {
        top_k: 2,
        activation: Activation::Relu2,
        capacity_factor: 0.75,
        ..MoeConfig::default()
    };
    check_finite_differences(config, 4, 5, 6, 8, true, BOTH, 5);
}

#[test]
fn swiglu_oai_top2_with_biases_in_and_beyond_both_clamps() {
    // A limit of 0.3 puts pre-activations on both sides of min(a, L) and clamp(v, −L, L).
    let config = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::SwigluOai,
        swiglu_limit: 0.3,
        swiglu_alpha: 1.702,
        normalize_top_k: true,
        ..MoeConfig::default()
    };
    let pre = check_finite_differences(config, 4, 5, 6, 8, true, BOTH, 6);
    let limit = 0.3;
    let count = |keep: &dyn Fn(&PreActivation) -> bool| pre.iter().filter(|p| keep(p)).count();
    assert!(count(&|(a, _)| *a > limit) > 0 && count(&|(a, _)| *a < limit) > 0);
    assert!(count(&|(_, v)| v.unwrap() > limit) > 0 && count(&|(_, v)| v.unwrap() < -limit) > 0);
    assert!(count(&|(_, v)| v.unwrap().abs() < limit) > 0);
}

#[test]
fn activation_derivatives_match_differences() {
    for activation in [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
        Activation::Relu2,
        Activation::SwigluOai,
        Activation::QuickGelu,
    ] {
        // 8.5 lies beyond swiglu_oai's limit of 7, where min(a, 7) has no gradient.
        for a in [-3.0f32, -0.7, -0.01, 0.02, 0.5, 2.5, 8.5] {
            let h = 1e-3f64;
            let numeric =
                (act(activation, a as f64 + h) - act(activation, a as f64 - h)) / (2.0 * h);
            let analytic = activation_derivative(activation, a) as f64;
            assert!(
                (analytic - numeric).abs() < 1e-5,
                "{activation:?}({a}): {analytic} vs {numeric}"
            );
        }
    }
    assert_eq!(activation_derivative(Activation::Relu, 0.0), 0.0);
    assert_eq!(activation_derivative(Activation::SwigluOai, 8.5), 0.0);
    // swiglu_oai's gate factor clamp(v, −7, 7) + 1 and its derivative, by hand.
    let unit = HiddenUnit::from(Activation::SwigluOai);
    for (v, value, slope) in [
        (-9.0, -6.0, 0.0),
        (-2.0, -1.0, 1.0),
        (3.0, 4.0, 1.0),
        (7.5, 8.0, 0.0),
    ] {
        assert_eq!(gate_value(unit, v), value);
        assert_eq!(gate_derivative(unit, v), slope);
    }
    assert_eq!(gate_value(Activation::Silu, -9.0), -9.0);
    // h(a = 1, v = 0.5) = σ(1.702)·1.5, h(a = 9) = 7σ(7·1.702).
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    let h = cpu_reference::activate(unit, 1.0) as f64;
    assert!((h - sigmoid(1.702)).abs() < 1e-7);
    let h = cpu_reference::activate(unit, 9.0) as f64;
    assert!((h - 7.0 * sigmoid(7.0 * 1.702)).abs() < 1e-6);
}

#[test]
fn training_needs_f32_weights_and_a_matching_dy() {
    let config = config(1);
    let (weights, x, dy) = setup(&config, 2, 32, 32, 3, true, 8);
    let quantized = weights.converted(WeightFormat::Q8_0).unwrap();
    match backward(&config, &quantized, &x, &[3, 32], &dy, BOTH) {
        Err(MoeError::TrainingNeedsF32 { tensor, format }) => {
            assert_eq!((tensor.as_str(), format.as_str()), ("experts.w1", "q8_0"));
        }
        other => panic!("expected TrainingNeedsF32, got {other:?}"),
    }
    match backward(&config, &weights, &x, &[3, 32], &dy[..10], BOTH) {
        Err(MoeError::Tensor { name, .. }) => assert_eq!(name, "dy"),
        other => panic!("expected a dy error, got {other:?}"),
    }
}
