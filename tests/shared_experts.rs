//! Shared experts: their tensors through safetensors and back, bad tensors named, and the
//! GPU forward (the shared expert riding the grouped dispatch as extra experts every token
//! visits) against the CPU reference on DeepSeek- and Qwen2-MoE-shaped layers and awkward
//! ones (a width no multiple of F, narrower than F, T = 1, heavy dropping with
//! pass-through, biases on one side only); the dispatch count unchanged; what the GPU layer
//! refuses (training, the experts-only pass, quantized experts) named. The backward is
//! checked in cpu_backward.rs (finite differences) and family_fixtures.rs.

mod common;

use common::*;
use switch_moe::weights::SharedExpert;
use switch_moe::{
    Activation, LayerOptions, MoeConfig, MoeError, MoeLayer, MoeWeights, Naming, RouterScore,
    WeightFormat,
};

fn layer_with_shared(gated: bool) -> MoeWeights {
    let mut weights = MoeWeights::random(shape(4, 8, 6), gated, true, 51);
    weights.shared = Some(SharedExpert::random((8, 10), gated, true, true, 52));
    weights
}

#[test]
fn shared_tensors_round_trip_through_safetensors() {
    let weights = layer_with_shared(true);
    let bytes = weights.to_safetensors_bytes().unwrap();
    let read = MoeWeights::from_safetensors_bytes(&bytes, Naming::Auto, None, "mem").unwrap();
    assert_eq!(read, weights);
    let st = switch_moe::tensor_io::parse_safetensors(&bytes, "mem").unwrap();
    assert_eq!(st.tensor("shared.gate").unwrap().shape(), &[1, 8]);
    assert_eq!(st.tensor("shared.w2").unwrap().shape(), &[8, 10]);
}

#[test]
fn bad_shared_tensors_are_errors_naming_them() {
    let mut weights = layer_with_shared(true);
    weights.shared.as_mut().unwrap().w3 = None;
    match weights.check() {
        Err(MoeError::Tensor { name, message }) => {
            assert_eq!(name, "shared.w3");
            assert!(message.contains("gated"), "{message}");
        }
        other => panic!("expected a shared.w3 error, got {other:?}"),
    }
    let mut weights = layer_with_shared(false);
    weights.shared.as_mut().unwrap().w2.pop();
    assert!(matches!(weights.check(), Err(MoeError::Tensor { name, .. }) if name == "shared.w2"));
    let mut weights = layer_with_shared(false);
    weights.shared.as_mut().unwrap().gate.as_mut().unwrap()[3] = f32::NAN;
    assert!(matches!(weights.check(), Err(MoeError::Tensor { name, .. }) if name == "shared.gate"));
}

/// The GPU forward against the reference, and again (the same bits).
fn check(config: &MoeConfig, weights: &MoeWeights, num_tokens: usize, seed: u64) {
    let d = weights.shape.d_model;
    let x = tokens(num_tokens, d, seed);
    let layer = MoeLayer::new(&gpu(), config.clone(), weights).expect("layer");
    let out = layer.forward(&x, &[num_tokens, d]).expect("GPU forward");
    let reference = cpu_forward(config, weights, &x, &[num_tokens, d]);
    assert_matches_reference(config, weights, &x, &out, &reference);
    assert_eq!(layer.forward(&x, &[num_tokens, d]).unwrap(), out, "rerun");
}

fn with_shared(
    weights: MoeWeights,
    d_ff: usize,
    (gated, biases, gate): (bool, bool, bool),
    seed: u64,
) -> MoeWeights {
    let d = weights.shape.d_model;
    MoeWeights {
        shared: Some(SharedExpert::random((d, d_ff), gated, biases, gate, seed)),
        ..weights
    }
}

#[test]
fn the_gpu_runs_deepseek_shaped_shared_experts() {
    // Sigmoid groups, top-4 of 16, a gated shared expert twice as wide as the routed ones
    // (two slices), no gate, dropless.
    let config = MoeConfig {
        top_k: 4,
        gated: true,
        activation: Activation::Silu,
        router_score: RouterScore::Sigmoid,
        n_group: Some(4),
        topk_group: Some(2),
        normalize_top_k: true,
        routed_scaling_factor: 2.5,
        drop_tokens: false,
        ..MoeConfig::default()
    };
    let mut weights = MoeWeights::random(shape(16, 24, 20), true, false, 61);
    weights.score_bias = Some(switch_moe::rng::SeededRng::new(62).uniform_vec(16, 0.1));
    let weights = with_shared(weights, 40, (true, false, false), 63);
    check(&config, &weights, 50, 64);
    check(&config, &weights, 1, 65);
}

#[test]
fn the_gpu_runs_qwen2_shaped_shared_experts_through_dropping() {
    // Softmax top-2, a gated shared expert of width 20 over F = 12 (two slices, the second
    // half zeros) weighed by σ(x·gate); heavy dropping passes tokens through, and the
    // shared expert still adds to them.
    let config = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Silu,
        capacity_factor: 0.5,
        ..MoeConfig::default()
    };
    let weights = with_shared(
        MoeWeights::random(shape(6, 16, 12), true, true, 66),
        20,
        (true, true, true),
        67,
    );
    check(&config, &weights, 70, 68);
}

#[test]
fn the_gpu_runs_narrow_shared_experts_with_biases_on_one_side() {
    // Ungated relu: routed experts without biases and a shared expert (narrower than F)
    // with them; then the other way round.
    let config = config(1);
    let routed = MoeWeights::random(shape(5, 13, 35), false, false, 69);
    check(
        &config,
        &with_shared(routed, 9, (false, true, true), 70),
        33,
        71,
    );
    let routed = MoeWeights::random(shape(5, 13, 35), false, true, 72);
    check(
        &config,
        &with_shared(routed, 9, (false, false, false), 73),
        33,
        74,
    );
}

#[test]
fn a_shared_expert_adds_no_dispatch() {
    let context = gpu();
    let plain = MoeWeights::random(shape(8, 16, 16), true, true, 75);
    let shared = with_shared(plain.clone(), 48, (true, true, true), 76);
    let config = MoeConfig {
        gated: true,
        ..config(2)
    };
    let count = |w: &MoeWeights| {
        MoeLayer::new(&context, config.clone(), w)
            .unwrap()
            .dispatches_per_forward()
    };
    assert_eq!(count(&shared), count(&plain));
}

#[test]
fn what_the_gpu_layer_refuses_of_shared_experts_is_named() {
    let context = gpu();
    let weights = layer_with_shared(false);
    let refusal = |options: LayerOptions| match MoeLayer::with_options(
        &context,
        MoeConfig::default(),
        &weights,
        options,
    ) {
        Err(MoeError::Tensor { name, message }) => (name, message),
        Err(other) => panic!("expected a tensor error, got {other}"),
        Ok(_) => panic!("the GPU layer took it"),
    };
    let (name, message) = refusal(LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    });
    assert_eq!(name, "shared.w1");
    assert!(message.contains("CPU reference"), "{message}");
    let (name, message) = refusal(LayerOptions {
        weight_format: Some(WeightFormat::F16),
        ..LayerOptions::default()
    });
    assert_eq!(name, "experts.w1");
    assert!(message.contains("must be f32"), "{message}");
    let layer = MoeLayer::new(&context, MoeConfig::default(), &weights).unwrap();
    let x = tokens(3, 8, 77);
    match layer.forward_experts(&x, &[3, 8], &[0, 1, 2], &[1.0; 3]) {
        Err(MoeError::Tensor { name, .. }) => assert_eq!(name, "shared.w1"),
        other => panic!("expected a shared.w1 error, got {other:?}"),
    }
}
