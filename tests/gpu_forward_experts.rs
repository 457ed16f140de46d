//! The experts alone on pre-routed tokens (`forward_experts`) against the CPU reference:
//! shapes off every tile, T = 1, N = 1, top-1..3, gated and every activation, repeated
//! experts in a token, a quantized format, reruns; and bad routes giving errors. Bound:
//! each output sums k products of an expert's output, itself a dot of F terms over
//! activations of dots of D terms: |error| ≤ 8·(D + F)·u·M with M the same computation
//! on absolute values (the CPU reference on |x|, |W|, |w|).

mod common;

use common::*;
use switch_moe::cpu_reference;
use switch_moe::rng::SeededRng;
use switch_moe::{
    Activation, LayerOptions, MoeConfig, MoeError, MoeLayer, MoeWeights, WeightFormat,
};

fn routes(num_tokens: usize, k: usize, n: usize, seed: u64) -> (Vec<u32>, Vec<f32>) {
    let mut rng = SeededRng::new(seed);
    let index = (0..num_tokens * k)
        .map(|_| (rng.next_u64() % n as u64) as u32)
        .collect();
    let weights = (0..num_tokens * k).map(|_| rng.uniform(1.0)).collect();
    (index, weights)
}

fn check(
    config: &MoeConfig,
    weights: &MoeWeights,
    options: LayerOptions,
    num_tokens: usize,
    k: usize,
    seed: u64,
) {
    let context = gpu();
    let shape = weights.shape;
    let what = format!("{shape:?} T={num_tokens} k={k} {config:?}");
    let layer = MoeLayer::with_options(&context, config.clone(), weights, options).unwrap();
    let x = tokens(num_tokens, shape.d_model, seed);
    let (index, gate) = routes(num_tokens, k, shape.num_experts, seed);
    let gpu = layer
        .forward_experts(&x, &[num_tokens, shape.d_model], &index, &gate)
        .unwrap();
    let cpu = cpu_reference::forward_experts(config.activation, weights, &x, &index, &gate);
    let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
    let magnitude = cpu_reference::forward_experts(
        config.activation,
        &absolute(weights),
        &abs(&x),
        &index,
        &abs(&gate),
    );
    let length = (shape.d_model + shape.d_ff) as f64;
    assert_close(&what, &gpu, &cpu, |i| {
        8.0 * length * U * ACTIVATION_LIPSCHITZ * magnitude[i] as f64 + 1e-30
    });
    let again = layer
        .forward_experts(&x, &[num_tokens, shape.d_model], &index, &gate)
        .unwrap();
    assert_eq!(again, gpu, "{what}: rerun");
}

#[test]
fn forward_experts_matches_the_reference() {
    let mut seed = 500;
    for activation in [Activation::Relu, Activation::Gelu, Activation::Silu] {
        for gated in [false, true] {
            for (n, d, f, t, k) in [(4, 12, 20, 33, 2), (1, 5, 3, 1, 1), (6, 13, 35, 17, 3)] {
                seed += 1;
                let config = MoeConfig {
                    activation,
                    gated,
                    // The layer's own routing settings play no part.
                    scale_by_prob: false,
                    capacity_factor: 0.1,
                    ..config(1)
                };
                let weights = MoeWeights::random(shape(n, d, f), gated, true, seed);
                check(&config, &weights, LayerOptions::default(), t, k, seed);
            }
        }
    }
    // 128 experts; a quantized layer.
    let weights = MoeWeights::random(shape(128, 8, 8), false, true, 601);
    check(&config(2), &weights, LayerOptions::default(), 70, 2, 601);
    let weights = MoeWeights::random(shape(4, 64, 64), true, true, 602);
    let q8 = LayerOptions {
        weight_format: Some(WeightFormat::Q8_0),
        ..LayerOptions::default()
    };
    let config = MoeConfig {
        gated: true,
        ..config(2)
    };
    let quantized = weights.converted(WeightFormat::Q8_0).unwrap();
    check(&config, &quantized, q8, 20, 2, 602);
}

#[test]
fn bad_routes_are_errors_naming_them() {
    let context = gpu();
    let weights = MoeWeights::random(shape(4, 8, 8), false, true, 610);
    let layer = MoeLayer::new(&context, config(1), &weights).unwrap();
    let x = tokens(3, 8, 610);
    let call = |index: &[u32], gate: &[f32]| layer.forward_experts(&x, &[3, 8], index, gate);
    let tensor_named = |error: MoeError, name: &str| {
        assert!(
            matches!(&error, MoeError::Tensor { name: n, .. } if n == name),
            "{error}"
        );
    };
    tensor_named(call(&[0, 1, 4], &[1.0; 3]).unwrap_err(), "top_k_index");
    tensor_named(call(&[0, 1], &[1.0; 2]).unwrap_err(), "top_k_index");
    tensor_named(call(&[0, 1, 2], &[1.0; 2]).unwrap_err(), "top_k_weights");
    tensor_named(
        call(&[0, 1, 2], &[1.0, f32::NAN, 1.0]).unwrap_err(),
        "top_k_weights",
    );
    let mut bad = x.clone();
    bad[9] = f32::INFINITY;
    let error = layer
        .forward_experts(&bad, &[3, 8], &[0, 1, 2], &[1.0; 3])
        .unwrap_err();
    assert!(
        matches!(error, MoeError::NonFiniteInput { token: 1 }),
        "{error}"
    );
}
