//! The experts alone on pre-routed tokens (`forward_experts`) against the CPU reference:
//! shapes off every tile, T = 1, N = 1, top-1..3, gated and every activation, repeated
//! experts in a token, a quantized format, reruns; and bad routes giving errors. Bound:
//! each output sums k products of an expert's output, itself a dot of F terms over
//! activations of dots of D terms: |error| ≤ 8·(D + F)·u·M with M the same computation
//! on absolute values (the CPU reference on |x|, |W|, |w|). Its backward
//! (`forward_experts_train`, `backward_experts`) against `cpu_backward::backward_experts`
//! (f64) on the same shapes, with the bound of the layer's backward (gpu_backward.rs).

mod common;

use common::*;
use switch_moe::rng::SeededRng;
use switch_moe::{cpu_backward, cpu_reference};
use switch_moe::{
    Activation, LayerOptions, LossCoefficients, MoeConfig, MoeError, MoeLayer, MoeWeights,
    Optimizer, WeightFormat,
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
    let cpu = cpu_reference::forward_experts(config.hidden_unit(), weights, &x, &index, &gate);
    let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
    let magnitude = cpu_reference::forward_experts(
        magnitude_unit(config),
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

/// Every activation, gated or not, on shapes off every tile, T = 1 and N = 1 (biases on
/// every other case): `check(config, weights, T, k, seed)` for each.
fn for_each_case(mut seed: u64, mut check: impl FnMut(&MoeConfig, &MoeWeights, usize, usize, u64)) {
    let activations = [
        Activation::Relu,
        Activation::Gelu,
        Activation::Silu,
        Activation::Relu2,
        Activation::SwigluOai,
    ];
    for activation in activations {
        // swiglu_oai is gated only.
        for gated in [false, true]
            .into_iter()
            .filter(|&gated| gated || activation != Activation::SwigluOai)
        {
            // The families' activations on one shape (GL compiles each pipeline slowly).
            let shapes: &[(usize, usize, usize, usize, usize)] = match activation {
                Activation::Relu2 | Activation::SwigluOai => &[(4, 12, 20, 33, 2)],
                _ => &[(4, 12, 20, 33, 2), (1, 5, 3, 1, 1), (6, 13, 35, 17, 3)],
            };
            for &(n, d, f, t, k) in shapes {
                seed += 1;
                let config = MoeConfig {
                    activation,
                    gated,
                    // The layer's own routing settings play no part.
                    scale_by_prob: false,
                    capacity_factor: 0.1,
                    ..config(1)
                };
                let weights =
                    MoeWeights::random(shape(n, d, f), gated, seed.is_multiple_of(2), seed);
                check(&config, &weights, t, k, seed);
            }
        }
    }
}

#[test]
fn forward_experts_matches_the_reference() {
    for_each_case(500, |config, weights, t, k, seed| {
        check(config, weights, LayerOptions::default(), t, k, seed)
    });
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

fn trainable(config: &MoeConfig, weights: &MoeWeights) -> MoeLayer {
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    MoeLayer::with_options(&gpu(), config.clone(), weights, options).unwrap()
}

fn check_backward(
    config: &MoeConfig,
    weights: &MoeWeights,
    num_tokens: usize,
    k: usize,
    seed: u64,
) {
    let shape = weights.shape;
    let what = format!("{shape:?} T={num_tokens} k={k} {config:?}");
    let layer = trainable(config, weights);
    let x = tokens(num_tokens, shape.d_model, seed);
    let x_shape = [num_tokens, shape.d_model];
    let (index, gate) = routes(num_tokens, k, shape.num_experts, seed);
    let dy = SeededRng::new(seed ^ 0xD1).normal_vec(x.len());
    let y = layer
        .forward_experts_train(&x, &x_shape, &index, &gate)
        .unwrap();
    assert_eq!(
        y,
        layer.forward_experts(&x, &x_shape, &index, &gate).unwrap(),
        "{what}: the training forward is the forward"
    );
    let gpu = layer.backward_experts(&dy).unwrap();
    let cpu = cpu_backward::backward_experts(
        config.hidden_unit(),
        weights,
        (&x, &x_shape),
        (&index, &gate),
        &dy,
    )
    .unwrap();
    let depth = shape.d_model + shape.d_ff + num_tokens * k;
    assert_gradients_close(&what, &gpu.gradients, &cpu.gradients, depth);
    // The router is not in the graph: its gradients are exactly zero.
    assert!(
        gpu.gradients.router_weight.iter().all(|&g| g == 0.0),
        "{what}"
    );
    let largest = cpu
        .top_k_weights
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let tolerance = 8.0 * depth as f64 * U * largest + 1e-30;
    assert_close(
        &format!("{what}: top_k_weights"),
        &gpu.top_k_weights,
        &cpu.top_k_weights,
        |_| tolerance,
    );
    assert_eq!(layer.backward_experts(&dy).unwrap(), gpu, "{what}: rerun");
}

#[test]
fn backward_experts_matches_the_reference() {
    for_each_case(700, check_backward);
    // 128 experts.
    let weights = MoeWeights::random(shape(128, 8, 8), false, true, 801);
    check_backward(&config(2), &weights, 70, 2, 801);
}

#[test]
fn backward_experts_with_every_token_on_one_expert() {
    let config = MoeConfig {
        gated: true,
        ..config(1)
    };
    let weights = MoeWeights::random(shape(4, 16, 24), true, true, 810);
    let layer = trainable(&config, &weights);
    let (t, d) = (37, 16);
    let x = tokens(t, d, 810);
    let index = vec![2u32; t];
    let gate: Vec<f32> = (0..t).map(|i| 0.5 + i as f32 / t as f32).collect();
    let dy = SeededRng::new(811).normal_vec(x.len());
    layer
        .forward_experts_train(&x, &[t, d], &index, &gate)
        .unwrap();
    let gpu = layer.backward_experts(&dy).unwrap();
    let routes = (&index[..], &gate[..]);
    let cpu =
        cpu_backward::backward_experts(config.hidden_unit(), &weights, (&x, &[t, d]), routes, &dy)
            .unwrap();
    assert_gradients_close("one expert", &gpu.gradients, &cpu.gradients, d + 24 + t);
    // The other experts got no token: their gradients are exactly zero.
    let (f, rows) = (24, 24 * 16);
    for e in [0, 1, 3] {
        assert!(gpu.gradients.w1[e * rows..(e + 1) * rows]
            .iter()
            .all(|&g| g == 0.0));
        assert!(gpu.gradients.b1.as_ref().unwrap()[e * f..(e + 1) * f]
            .iter()
            .all(|&g| g == 0.0));
    }
}

#[test]
fn an_sgd_step_after_backward_experts_moves_the_experts_not_the_router() {
    let config = config(1);
    let weights = MoeWeights::random(shape(3, 8, 12), false, true, 820);
    let layer = trainable(&config, &weights);
    let x = tokens(9, 8, 820);
    let (index, gate) = routes(9, 2, 3, 820);
    let dy = SeededRng::new(821).normal_vec(x.len());
    layer
        .forward_experts_train(&x, &[9, 8], &index, &gate)
        .unwrap();
    let gradients = layer.backward_experts(&dy).unwrap().gradients;
    let learning_rate = 0.5f32;
    layer
        .step(&Optimizer::Sgd {
            learning_rate,
            weight_decay: 0.0,
        })
        .unwrap();
    let trained = layer.trained_weights().unwrap();
    assert_eq!(trained.router_weight, weights.router_weight);
    // p − lr·g, element by element (within an FMA's rounding).
    let expected: Vec<f32> = weights
        .w1
        .to_f32()
        .iter()
        .zip(&gradients.w1)
        .map(|(&p, &g)| p - learning_rate * g)
        .collect();
    assert_close("w1 after SGD", &trained.w1.to_f32(), &expected, |i| {
        4.0 * U * (expected[i].abs() as f64 + 1.0)
    });
    // The forward after the step equals a fresh layer's on the trained weights, bit for bit.
    let fresh = MoeLayer::new(&gpu(), config.clone(), &trained).unwrap();
    assert_eq!(
        layer.forward_experts(&x, &[9, 8], &index, &gate).unwrap(),
        fresh.forward_experts(&x, &[9, 8], &index, &gate).unwrap()
    );
}

#[test]
fn experts_training_out_of_turn_is_an_error() {
    let config = config(1);
    let weights = MoeWeights::random(shape(3, 8, 8), false, true, 830);
    let x = tokens(4, 8, 830);
    let (index, gate) = routes(4, 1, 3, 830);
    let untrainable = MoeLayer::new(&gpu(), config.clone(), &weights).unwrap();
    let error = untrainable
        .forward_experts_train(&x, &[4, 8], &index, &gate)
        .unwrap_err();
    assert!(error.to_string().contains("trainable"), "{error}");
    let layer = trainable(&config, &weights);
    let error = layer.backward_experts(&x).unwrap_err();
    assert!(
        error.to_string().contains("forward_experts_train first"),
        "{error}"
    );
    layer.forward_train(&x, &[4, 8]).unwrap();
    let error = layer.backward_experts(&x).unwrap_err();
    assert!(
        error.to_string().contains("its backward is backward"),
        "{error}"
    );
    layer
        .forward_experts_train(&x, &[4, 8], &index, &gate)
        .unwrap();
    let error = layer.backward(&x, LossCoefficients::default()).unwrap_err();
    assert!(error.to_string().contains("backward_experts"), "{error}");
    let error = layer.backward_experts(&x[..8]).unwrap_err();
    assert!(error.to_string().contains("`dy`"), "{error}");
}
