//! The CPU reference on hand-worked cases: ties, capacity and priority, drop policies,
//! scaling, gating, every activation, groups, and the statistics.

#![allow(clippy::needless_range_loop)] // index loops read like the math here

use approx::assert_relative_eq;
use switch_moe::config::{Activation, DropPolicy};
use switch_moe::cpu_reference::{self, activate, select_top_k};
use switch_moe::{ExpertMatrices, LayerShape, MoeConfig, MoeError, MoeOutput, MoeWeights};

const N: usize = 3;

/// N = D = F = 3. The router is the identity (logits = x), W1[e] = I, W2[e] = (e + 1)·I and
/// W3[e] = 2·I, so that expert e maps x to (e + 1)·act(x) (times 2x when gated).
fn hand_layer(gated: bool) -> MoeWeights {
    let identity: Vec<f32> = (0..N * N)
        .map(|i| if i % (N + 1) == 0 { 1.0 } else { 0.0 })
        .collect();
    let repeat = |scale: &dyn Fn(usize) -> f32| -> Vec<f32> {
        (0..N)
            .flat_map(|e| identity.iter().map(move |v| v * scale(e)))
            .collect()
    };
    MoeWeights {
        shape: LayerShape {
            num_experts: N,
            d_model: N,
            d_ff: N,
        },
        router_weight: identity.clone(),
        router_bias: None,
        score_bias: None,
        w1: ExpertMatrices::from_f32(N, N, N, repeat(&|_| 1.0)),
        b1: None,
        w2: ExpertMatrices::from_f32(N, N, N, repeat(&|e| (e + 1) as f32)),
        b2: None,
        w3: gated.then(|| ExpertMatrices::from_f32(N, N, N, repeat(&|_| 2.0))),
        b3: None,
        shared: None,
    }
}

fn run(config: &MoeConfig, weights: &MoeWeights, x: &[f32]) -> MoeOutput {
    cpu_reference::forward(config, weights, x, &[x.len() / N, N]).unwrap()
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

#[test]
fn ties_go_to_the_lower_expert_index() {
    assert_eq!(select_top_k(&[0.25, 0.5, 0.25], 3), vec![1, 0, 2]);
    assert_eq!(select_top_k(&[0.4, 0.4, 0.2], 1), vec![0]);
    assert_eq!(select_top_k(&[0.2, 0.4, 0.4], 2), vec![1, 2]);
    assert_eq!(select_top_k(&[1.0 / 3.0; 3], 3), vec![0, 1, 2]);
    let config = MoeConfig {
        top_k: 2,
        drop_tokens: false,
        ..MoeConfig::default()
    };
    let output = run(&config, &hand_layer(false), &[1.0, 1.0, 0.0, 0.0, 2.0, 2.0]);
    assert_eq!(output.routes, vec![0, 1, 1, 2]);
}

#[test]
fn capacity_zero_drops_every_assignment() {
    let x = [1.0, 0.0, 0.0, 0.0, 3.0, 0.0];
    for (policy, scale_by_prob) in [
        (DropPolicy::PassThrough, true),
        (DropPolicy::PassThrough, false),
        (DropPolicy::Zero, true),
    ] {
        let config = MoeConfig {
            expert_capacity: Some(0),
            drop_policy: policy,
            scale_by_prob,
            ..MoeConfig::default()
        };
        let output = run(&config, &hand_layer(false), &x);
        assert_eq!(output.n_dropped, 2);
        assert_eq!(output.kept, vec![0, 0, 0]);
        assert_eq!(output.counts, vec![1, 1, 0]);
        for t in 0..2 {
            for d in 0..N {
                let expected = match (policy, scale_by_prob) {
                    (DropPolicy::Zero, _) => 0.0,
                    (_, true) => x[t * N + d] * output.route_prob_max[t],
                    (_, false) => x[t * N + d],
                };
                assert_eq!(output.y[t * N + d], expected, "token {t} dim {d}");
            }
        }
    }
}

#[test]
fn overflow_keeps_the_earliest_tokens() {
    // Five tokens all prefer expert 0; capacity 2 keeps tokens 0 and 1.
    let x: Vec<f32> = (0..5).flat_map(|t| [2.0 + t as f32, 0.0, 0.0]).collect();
    let config = MoeConfig {
        expert_capacity: Some(2),
        scale_by_prob: false,
        ..MoeConfig::default()
    };
    let output = run(&config, &hand_layer(false), &x);
    assert_eq!(output.counts, vec![5, 0, 0]);
    assert_eq!(output.kept, vec![2, 0, 0]);
    assert_eq!(output.n_dropped, 3);
    // Kept tokens get 1·relu(x), dropped ones pass through: a negative coordinate tells.
    let x: Vec<f32> = (0..5).flat_map(|t| [2.0 + t as f32, -1.0, -1.0]).collect();
    let output = run(&config, &hand_layer(false), &x);
    for t in 0..5 {
        let expected_second = if t < 2 { 0.0 } else { -1.0 };
        assert_eq!(output.y[t * N + 1], expected_second, "token {t}");
    }
}

#[test]
fn first_choices_are_served_before_second_choices() {
    // Preferences: t0 (0, 1), t1 (1, 0), t2 (0, 1); capacity 2 per expert.
    // First choices: expert 0 ← t0, t2; expert 1 ← t1. Second choices in token order:
    // t0 → 1 kept (expert 1 now full), t1 → 0 dropped (full), t2 → 1 dropped (full).
    let x = [3.0, 2.0, 0.0, 2.0, 3.0, 0.0, 3.0, 2.0, 0.0];
    let config = MoeConfig {
        top_k: 2,
        expert_capacity: Some(2),
        scale_by_prob: false,
        ..MoeConfig::default()
    };
    let weights = hand_layer(false);
    let output = run(&config, &weights, &x);
    assert_eq!(output.routes, vec![0, 1, 1, 0, 0, 1]);
    assert_eq!(output.counts, vec![3, 3, 0]);
    assert_eq!(output.kept, vec![2, 2, 0]);
    assert_eq!(output.n_dropped, 2);
    let (_, positions) = cpu_reference::assign_positions(&config, &output.routes, N, 3);
    assert_eq!(
        positions,
        vec![Some(0), Some(1), Some(0), None, Some(1), None]
    );
    // y = Σ kept (e + 1)·relu(x): t0 = 1·x + 2·x, t1 = 2·x, t2 = 1·x.
    let expected = [9.0, 6.0, 0.0, 4.0, 6.0, 0.0, 3.0, 2.0, 0.0];
    assert_eq!(output.y, expected);
}

#[test]
fn scale_by_prob_multiplies_by_the_gate() {
    let x = [0.5, 2.0, -1.0];
    let weights = hand_layer(false);
    // One token and three experts: the default capacity would be 0, so no dropping here.
    let keep_all = MoeConfig {
        drop_tokens: false,
        ..MoeConfig::default()
    };
    let unscaled = run(
        &MoeConfig {
            scale_by_prob: false,
            ..keep_all.clone()
        },
        &weights,
        &x,
    );
    let scaled = run(&keep_all, &weights, &x);
    let p = softmax(&x);
    assert_eq!(scaled.routes, vec![1]);
    assert_relative_eq!(scaled.gates[0], p[1], max_relative = 1e-6);
    // Expert 1: 2·relu(x).
    assert_eq!(unscaled.y, vec![1.0, 4.0, 0.0]);
    for d in 0..N {
        assert_relative_eq!(scaled.y[d], p[1] * unscaled.y[d], max_relative = 1e-6);
    }
}

#[test]
fn gated_experts_multiply_by_the_value_projection() {
    let x = [0.5, 2.0, -1.0];
    let config = MoeConfig {
        gated: true,
        scale_by_prob: false,
        drop_tokens: false,
        activation: Activation::Silu,
        ..MoeConfig::default()
    };
    let output = run(&config, &hand_layer(true), &x);
    // Expert 1: 2·(silu(x) ⊙ 2x).
    for d in 0..N {
        let expected = 2.0 * activate(Activation::Silu, x[d]) * 2.0 * x[d];
        assert_relative_eq!(output.y[d], expected, max_relative = 1e-6);
    }
    let mismatch = MoeConfig {
        gated: false,
        ..config.clone()
    };
    assert!(matches!(
        cpu_reference::forward(&mismatch, &hand_layer(true), &x, &[1, 3]),
        Err(MoeError::Config { ref key, .. }) if key == "gated"
    ));
    assert!(matches!(
        cpu_reference::forward(&config, &hand_layer(false), &x, &[1, 3]),
        Err(MoeError::Config { ref key, .. }) if key == "gated"
    ));
}

#[test]
fn every_activation_at_known_points() {
    let cases = [
        (Activation::Relu, -1.0, 0.0),
        (Activation::Relu, 1.5, 1.5),
        (Activation::Gelu, 1.0, 0.841_344_7),
        (Activation::Gelu, -1.0, -0.158_655_25),
        (Activation::GeluTanh, 1.0, 0.841_192),
        (Activation::GeluTanh, -1.0, -0.158_808),
        (Activation::Silu, 1.0, 0.731_058_6),
        (Activation::Silu, -2.0, -0.238_405_84),
        (Activation::Relu2, -1.0, 0.0),
        (Activation::Relu2, 1.5, 2.25),
        (Activation::QuickGelu, 1.0, 0.845_795_8),
        (Activation::QuickGelu, -2.0, -0.064_341_38),
        // swiglu_oai's activation half: a·σ(1.702·a) up to a = 7, then 7·σ(7·1.702).
        (Activation::SwigluOai, 1.0, 0.845_795_8),
        (Activation::SwigluOai, 9.0, 6.999_953),
    ];
    for (activation, a, expected) in cases {
        assert_relative_eq!(activate(activation, a), expected, max_relative = 1e-5);
    }
    // Through the layer: expert 2 (x[2] largest) gives 3·act(x).
    let x = [-0.5, 0.25, 1.0];
    for activation in [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
    ] {
        let config = MoeConfig {
            activation,
            scale_by_prob: false,
            drop_tokens: false,
            ..MoeConfig::default()
        };
        let output = run(&config, &hand_layer(false), &x);
        for d in 0..N {
            assert_relative_eq!(
                output.y[d],
                3.0 * activate(activation, x[d]),
                max_relative = 1e-6
            );
        }
    }
}

#[test]
fn capacity_applies_per_group() {
    // Four tokens to expert 0, groups of 2, capacity 1: tokens 0 and 2 are kept.
    let x: Vec<f32> = (0..4).flat_map(|_| [5.0, -1.0, -1.0]).collect();
    let config = MoeConfig {
        group_size: Some(2),
        expert_capacity: Some(1),
        scale_by_prob: false,
        ..MoeConfig::default()
    };
    let output = run(&config, &hand_layer(false), &x);
    assert_eq!(output.kept, vec![2, 0, 0]);
    let second: Vec<f32> = (0..4).map(|t| output.y[t * N + 1]).collect();
    assert_eq!(second, vec![0.0, -1.0, 0.0, -1.0]);
    // Default capacity per group: floor(1.25·1·2/3) = 0.
    let by_factor = MoeConfig {
        expert_capacity: None,
        ..config
    };
    assert_eq!(by_factor.capacity(2, 3), Some(0));
    assert_eq!(run(&by_factor, &hand_layer(false), &x).n_dropped, 4);
}

#[test]
fn capacity_formula() {
    let config = MoeConfig::default();
    assert_eq!(config.capacity(100, 8), Some(15)); // floor(1.25·100/8) = 15
    let top2 = MoeConfig {
        top_k: 2,
        capacity_factor: 1.0,
        ..MoeConfig::default()
    };
    assert_eq!(top2.capacity(10, 4), Some(5));
    let no_drop = MoeConfig {
        drop_tokens: false,
        ..MoeConfig::default()
    };
    assert_eq!(no_drop.capacity(100, 8), None);
}

#[test]
fn statistics_by_hand() {
    // One token with logits (0, 0, ln 2): p = (1/4, 1/4, 1/2).
    let x = [0.0, 0.0, std::f32::consts::LN_2];
    let config = MoeConfig {
        top_k: 2,
        drop_tokens: false,
        normalize_top_k: true,
        ..MoeConfig::default()
    };
    let output = run(&config, &hand_layer(false), &x);
    assert_eq!(output.routes, vec![2, 0]);
    assert_relative_eq!(output.route_prob_max[0], 0.5, max_relative = 1e-6);
    // Renormalised gates: 0.5/0.75 and 0.25/0.75.
    assert_relative_eq!(output.gates[0], 2.0 / 3.0, max_relative = 1e-6);
    assert_relative_eq!(output.gates[1], 1.0 / 3.0, max_relative = 1e-6);
    assert_eq!(output.counts, vec![1, 0, 1]);
    for (s, e) in output.route_prob_sum.iter().zip([0.25, 0.25, 0.5]) {
        assert_relative_eq!(*s, e, max_relative = 1e-6);
    }
    // aux = N·Σ (counts/T)(p_sum/T) = 3·(0.25 + 0.5) = 2.25; z = (ln 4)².
    assert_relative_eq!(output.aux_loss, 2.25, max_relative = 1e-6);
    assert_relative_eq!(output.z_loss, (4.0f32).ln().powi(2), max_relative = 1e-5);
}

#[test]
fn sequence_batch_input_is_flattened_row_major() {
    let weights = MoeWeights::random(
        LayerShape {
            num_experts: 4,
            d_model: 8,
            d_ff: 16,
        },
        false,
        true,
        3,
    );
    let x = switch_moe::rng::SeededRng::new(3).normal_vec(3 * 2 * 8);
    let flat = cpu_reference::forward(&MoeConfig::default(), &weights, &x, &[6, 8]).unwrap();
    let seq_batch =
        cpu_reference::forward(&MoeConfig::default(), &weights, &x, &[3, 2, 8]).unwrap();
    assert_eq!(seq_batch.y, flat.y);
    assert_eq!(seq_batch.shape, vec![3, 2, 8]);
}

#[test]
fn non_finite_input_names_the_token() {
    let mut x = vec![0.5; 4 * N];
    x[2 * N + 1] = f32::NAN;
    let result = cpu_reference::forward(&MoeConfig::default(), &hand_layer(false), &x, &[4, N]);
    assert!(matches!(result, Err(MoeError::NonFiniteInput { token: 2 })));
}

#[test]
fn large_layer_runs_in_seconds() {
    // T = 4096, D = 512, F = 2048, N = 8: the default layer of the main example.
    let weights = MoeWeights::random(
        LayerShape {
            num_experts: 8,
            d_model: 512,
            d_ff: 2048,
        },
        false,
        true,
        1,
    );
    let x = switch_moe::rng::SeededRng::new(1).normal_vec(4096 * 512);
    let start = std::time::Instant::now();
    let output = cpu_reference::forward(&MoeConfig::default(), &weights, &x, &[4096, 512]).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(output.counts.iter().sum::<u32>(), 4096);
    // Not a speed assertion: a generous bound against an accidental quadratic slowdown.
    assert!(elapsed.as_secs() < 120, "CPU reference took {elapsed:?}");
}
