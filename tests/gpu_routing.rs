//! The router's variants on the GPU against the CPU reference (SPEC "The families people
//! run"): sigmoid scores, the score bias, group-limited top-k with either group score, the
//! routed scaling factor, on DeepSeek-V3's shape (N = 256, k = 8, 8 groups of which 4 are
//! kept) and awkward ones (T = 1, sizes off every tile, heavy dropping, softmax with a
//! score bias as ERNIE 4.5 routes); and dispatches that do not depend on them.

mod common;

use common::*;
use switch_moe::rng::SeededRng;
use switch_moe::{GroupScore, MoeConfig, MoeLayer, MoeWeights, RouterScore};

/// Seeded weights with biases and a score bias of ±0.2.
fn weights_with_score_bias(n: usize, d: usize, f: usize, gated: bool, seed: u64) -> MoeWeights {
    let mut weights = MoeWeights::random(shape(n, d, f), gated, true, seed);
    weights.score_bias = Some(SeededRng::new(seed ^ 0x5B).uniform_vec(n, 0.2));
    weights
}

fn check(config: &MoeConfig, weights: &MoeWeights, num_tokens: usize, seed: u64) {
    let d = weights.shape.d_model;
    let x = tokens(num_tokens, d, seed);
    let layer = MoeLayer::new(&gpu(), config.clone(), weights).expect("layer");
    let gpu_output = layer.forward(&x, &[num_tokens, d]).expect("GPU forward");
    let cpu_output = cpu_forward(config, weights, &x, &[num_tokens, d]);
    assert_matches_reference(config, weights, &x, &gpu_output, &cpu_output);
    assert_eq!(
        layer.forward(&x, &[num_tokens, d]).unwrap(),
        gpu_output,
        "rerun"
    );
}

/// DeepSeek-V3's router: sigmoid, score bias, 8 groups keep 4 by top-2 sums, normalised
/// and scaled by 2.5, dropless.
fn deepseek_v3(top_k: usize) -> MoeConfig {
    MoeConfig {
        top_k,
        router_score: RouterScore::Sigmoid,
        n_group: Some(8),
        topk_group: Some(4),
        normalize_top_k: true,
        routed_scaling_factor: 2.5,
        drop_tokens: false,
        gated: true,
        activation: switch_moe::Activation::Silu,
        ..MoeConfig::default()
    }
}

#[test]
fn deepseek_v3_routing_with_256_experts() {
    let weights = weights_with_score_bias(256, 24, 20, true, 31);
    check(&deepseek_v3(8), &weights, 150, 31);
    // One token; and DeepSeek-V2's max group score over softmax scores.
    check(&deepseek_v3(8), &weights, 1, 32);
    let v2 = MoeConfig {
        router_score: RouterScore::Softmax,
        group_score: GroupScore::Max,
        topk_group: Some(3),
        normalize_top_k: false,
        routed_scaling_factor: 16.0,
        ..deepseek_v3(6)
    };
    check(&v2, &weights, 70, 33);
}

#[test]
fn sigmoid_routing_with_dropping_and_groups_of_one() {
    // Heavy dropping and pass-through with sigmoid gates; k = 2.
    let weights = weights_with_score_bias(8, 13, 35, false, 34);
    let dropping = MoeConfig {
        top_k: 2,
        router_score: RouterScore::Sigmoid,
        capacity_factor: 0.5,
        routed_scaling_factor: 1.5,
        ..MoeConfig::default()
    };
    check(&dropping, &weights, 90, 34);
    // Eight groups of one expert each, by their maxima: plain top-k among the kept.
    let singles = MoeConfig {
        n_group: Some(8),
        topk_group: Some(3),
        group_score: GroupScore::Max,
        ..dropping.clone()
    };
    check(&singles, &weights, 90, 35);
    // Top-1 sigmoid without a score bias (Llama 4's routing, the gate on the output).
    let mut plain = weights.clone();
    plain.score_bias = None;
    let top1 = MoeConfig {
        top_k: 1,
        router_score: RouterScore::Sigmoid,
        drop_tokens: false,
        ..MoeConfig::default()
    };
    check(&top1, &plain, 33, 36);
}

#[test]
fn softmax_with_a_score_bias() {
    let weights = weights_with_score_bias(16, 20, 24, true, 37);
    let ernie = MoeConfig {
        top_k: 4,
        normalize_top_k: true,
        gated: true,
        n_group: Some(4),
        topk_group: Some(2),
        drop_tokens: false,
        ..MoeConfig::default()
    };
    check(&ernie, &weights, 129, 37);
}

#[test]
fn routing_variants_add_no_dispatch() {
    let context = gpu();
    let weights = weights_with_score_bias(256, 16, 16, true, 38);
    let plain = MoeLayer::new(
        &context,
        MoeConfig {
            top_k: 8,
            gated: true,
            drop_tokens: false,
            ..MoeConfig::default()
        },
        &weights,
    )
    .unwrap();
    let grouped = MoeLayer::new(&context, deepseek_v3(8), &weights).unwrap();
    assert_eq!(
        grouped.dispatches_per_forward(),
        plain.dispatches_per_forward()
    );
    assert_eq!(grouped.dispatches_per_forward(), 9);
}

#[test]
fn bias_balancing_moves_the_score_bias_by_the_rule_and_the_next_forward_uses_it() {
    let context = gpu();
    let config = MoeConfig {
        top_k: 2,
        router_score: RouterScore::Sigmoid,
        drop_tokens: false,
        ..MoeConfig::default()
    };
    let mut weights = MoeWeights::random(shape(8, 16, 24), false, true, 39);
    weights.score_bias = Some(vec![0.0; 8]);
    let options = switch_moe::LayerOptions {
        trainable: true,
        ..switch_moe::LayerOptions::default()
    };
    let layer = MoeLayer::with_options(&context, config.clone(), &weights, options).unwrap();
    let x = tokens(64, 16, 40);
    let mut expected = vec![0.0f32; 8];
    for _ in 0..3 {
        let out = layer.forward_train(&x, &[64, 16]).unwrap();
        layer.balance_score_bias(&out.counts, 0.05).unwrap();
        switch_moe::cpu_routing::balance_score_bias(&mut expected, &out.counts, 0.05);
        let trained = layer.trained_weights().unwrap();
        assert_eq!(trained.score_bias.as_deref(), Some(&expected[..]));
        // The next forward chooses with the moved bias, as the reference does.
        let next = layer.forward(&x, &[64, 16]).unwrap();
        assert_eq!(
            next.routes,
            cpu_forward(&config, &trained, &x, &[64, 16]).routes
        );
    }
    assert!(expected.iter().any(|&b| b != 0.0));
    // What it refuses, by name.
    let named = |result: switch_moe::Result<()>| match result {
        Err(switch_moe::MoeError::Tensor { name, .. })
        | Err(switch_moe::MoeError::Config { key: name, .. }) => name,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(named(layer.balance_score_bias(&[1, 2], 0.05)), "counts");
    assert_eq!(
        named(layer.balance_score_bias(&[0; 8], -1.0)),
        "bias_balancing"
    );
    weights.score_bias = None;
    let plain = MoeLayer::new(&context, config, &weights).unwrap();
    assert_eq!(
        named(plain.balance_score_bias(&[0; 8], 0.05)),
        "router.score_bias"
    );
}

/// Llama 4's routing: top-k sigmoid gates multiplying the experts' input, `E(g·x)`, with
/// a shared expert (ungated, as Llama 4's; and with Qwen's sigmoid gate, which still weighs
/// its output), biases, scaling, heavy dropping with pass-through, T = 1, N = 1, sizes off
/// every tile (its backward: gpu_backward.rs and shared_experts.rs).
#[test]
fn gates_on_the_experts_input() {
    let llama4 = MoeConfig {
        top_k: 1,
        router_score: RouterScore::Sigmoid,
        gate_on: switch_moe::GateOn::Input,
        drop_tokens: false,
        gated: true,
        activation: switch_moe::Activation::Silu,
        ..MoeConfig::default()
    };
    let mut weights = MoeWeights::random(shape(16, 40, 36), true, false, 41);
    weights.shared = Some(switch_moe::weights::SharedExpert::random(
        (40, 36),
        true,
        false,
        false,
        42,
    ));
    check(&llama4, &weights, 77, 41);
    check(&llama4, &weights, 1, 42);
    let mut gated_shared = weights.clone();
    gated_shared.shared = Some(switch_moe::weights::SharedExpert::random(
        (40, 20),
        true,
        false,
        true,
        43,
    ));
    let top2 = MoeConfig {
        top_k: 2,
        routed_scaling_factor: 1.5,
        ..llama4.clone()
    };
    check(&top2, &gated_shared, 50, 43);
    // Ungated relu with biases, heavy dropping and pass-through; one expert.
    let dropping = MoeConfig {
        top_k: 2,
        router_score: RouterScore::Sigmoid,
        gate_on: switch_moe::GateOn::Input,
        capacity_factor: 0.5,
        ..MoeConfig::default()
    };
    check(
        &dropping,
        &MoeWeights::random(shape(6, 13, 35), false, true, 44),
        90,
        44,
    );
    let one = MoeConfig {
        top_k: 1,
        ..dropping.clone()
    };
    check(
        &one,
        &MoeWeights::random(shape(1, 9, 5), false, true, 45),
        33,
        45,
    );
}
