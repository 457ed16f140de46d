//! Shared experts: their tensors through safetensors and back, bad tensors named, and the
//! GPU forward (the shared expert riding the grouped dispatch as extra experts every token
//! visits) against the CPU reference on DeepSeek- and Qwen2-MoE-shaped layers and awkward
//! ones (a width no multiple of F, narrower than F, T = 1, heavy dropping with
//! pass-through, biases on one side only); the dispatch count unchanged; the GPU backward
//! and training against the CPU reference's (cpu_backward.rs checks that one by finite
//! differences, family_fixtures.rs against torch autograd); what the GPU layer refuses
//! (training with biases on one side only, the experts-only pass, quantized experts) named.

mod common;

use common::*;
use switch_moe::cpu_backward::{self, LossCoefficients};
use switch_moe::rng::SeededRng;
use switch_moe::weights::SharedExpert;
use switch_moe::{
    Activation, DropPolicy, LayerOptions, MoeConfig, MoeError, MoeLayer, MoeWeights, Naming,
    Optimizer, RouterScore, WeightFormat,
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

/// DeepSeek-V3's routing: sigmoid scores, top-4 of 4 groups keeping 2, scaling, dropless.
fn deepseek_config() -> MoeConfig {
    MoeConfig {
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
    }
}

#[test]
fn the_gpu_runs_deepseek_shaped_shared_experts() {
    // Sigmoid groups, top-4 of 16, a gated shared expert twice as wide as the routed ones
    // (two slices), no gate, dropless.
    let config = deepseek_config();
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
    let mut one_sided = weights.clone();
    one_sided.shared.as_mut().unwrap().b2 = None;
    let (name, message) = match MoeLayer::with_options(
        &context,
        MoeConfig::default(),
        &one_sided,
        LayerOptions {
            trainable: true,
            ..LayerOptions::default()
        },
    ) {
        Err(MoeError::Tensor { name, message }) => (name, message),
        Err(other) => panic!("expected a tensor error, got {other}"),
        Ok(_) => panic!("the GPU layer trains a b2 only the routed experts have"),
    };
    assert_eq!(name, "shared.b2");
    assert!(message.contains("on both"), "{message}");
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

/// The GPU backward of a layer with a shared expert against the reference's, both losses
/// on: the chain of f32 sums behind each gradient is at most D + F + Fs + T·(k + m) + N
/// long (assert_gradients_close's argument).
fn check_backward(config: &MoeConfig, weights: &MoeWeights, num_tokens: usize, seed: u64) {
    check_backward_capped(config, weights, num_tokens, seed, None);
}

/// [`check_backward`] with activation bindings capped at `cap` bytes (chunked batches).
fn check_backward_capped(
    config: &MoeConfig,
    weights: &MoeWeights,
    num_tokens: usize,
    seed: u64,
    cap: Option<u64>,
) {
    let shape = weights.shape;
    let d = shape.d_model;
    let x = tokens(num_tokens, d, seed);
    let dy = SeededRng::new(seed ^ 0xD5).normal_vec(x.len());
    let coefficients = LossCoefficients {
        aux: 0.02,
        z: 0.003,
    };
    let options = LayerOptions {
        trainable: true,
        max_activation_binding_bytes: cap,
        ..LayerOptions::default()
    };
    let layer = MoeLayer::with_options(&gpu(), config.clone(), weights, options).unwrap();
    if cap.is_some() {
        assert!(
            layer.max_tokens_per_pass() < num_tokens,
            "the batch runs in chunks"
        );
    }
    let out = layer.forward_train(&x, &[num_tokens, d]).unwrap();
    let reference = cpu_forward(config, weights, &x, &[num_tokens, d]);
    assert_matches_reference(config, weights, &x, &out, &reference);
    let gpu = layer.backward(&dy, coefficients).unwrap();
    let cpu =
        cpu_backward::backward(config, weights, &x, &[num_tokens, d], &dy, coefficients).unwrap();
    let fs = weights.shared.as_ref().unwrap().d_ff;
    let m = fs.div_ceil(shape.d_ff);
    let depth = d + shape.d_ff + fs + num_tokens * (config.top_k + m) + shape.num_experts;
    let what = format!(
        "N={} D={d} F={} Fs={fs} T={num_tokens}",
        shape.num_experts, shape.d_ff
    );
    assert_gradients_close(&what, &gpu, &cpu, depth);
    // Deterministic: the same bits again.
    layer.forward_train(&x, &[num_tokens, d]).unwrap();
    assert_eq!(
        layer.backward(&dy, coefficients).unwrap(),
        gpu,
        "{what}: rerun"
    );
}

#[test]
fn the_gpu_backward_of_shared_experts_matches_the_reference() {
    // DeepSeek-shaped: sigmoid groups and scaling, a gated shared expert two slices wide,
    // no gate, no biases.
    let deepseek = deepseek_config();
    let mut weights = MoeWeights::random(shape(16, 12, 8), true, false, 81);
    weights.score_bias = Some(SeededRng::new(82).uniform_vec(16, 0.1));
    check_backward(
        &deepseek,
        &with_shared(weights, 16, (true, false, false), 83),
        37,
        84,
    );
    // Qwen2-shaped: softmax top-2 with its sigmoid shared gate, a width off F (padding
    // rows), biases everywhere (b2 once, on the first slice; the gate has no bias),
    // heavy dropping with pass-through; then T = 1.
    let qwen2 = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Silu,
        capacity_factor: 0.5,
        drop_policy: DropPolicy::PassThrough,
        ..MoeConfig::default()
    };
    let weights = with_shared(
        MoeWeights::random(shape(6, 10, 12), true, true, 85),
        20,
        (true, true, true),
        86,
    );
    check_backward(&qwen2, &weights, 45, 87);
    check_backward(&qwen2, &weights, 1, 88);
    // Ungated gelu, N = 1, a shared expert narrower than F with a gate.
    let narrow = MoeConfig {
        activation: Activation::Gelu,
        ..config(1)
    };
    let weights = with_shared(
        MoeWeights::random(shape(1, 7, 9), false, true, 89),
        5,
        (false, true, true),
        90,
    );
    check_backward(&narrow, &weights, 13, 91);
    // A batch in chunks: the losses over the whole batch's counts, the gradients summed.
    let weights = with_shared(
        MoeWeights::random(shape(6, 16, 24), true, false, 96),
        24,
        (true, false, true),
        97,
    );
    let gated = MoeConfig {
        gated: true,
        drop_tokens: false,
        ..config(2)
    };
    check_backward_capped(&gated, &weights, 400, 98, Some(16 << 10));
    // Llama 4: sigmoid top-1 gates on the routed experts' input, an ungated shared expert
    // (dropless); then top-2 with biases and Qwen's gate on the shared one, through heavy
    // dropping, and dropless in chunks.
    let llama4 = MoeConfig {
        router_score: switch_moe::RouterScore::Sigmoid,
        gate_on: switch_moe::GateOn::Input,
        drop_tokens: false,
        gated: true,
        activation: Activation::Silu,
        ..config(1)
    };
    let weights = with_shared(
        MoeWeights::random(shape(8, 12, 10), true, false, 99),
        10,
        (true, false, false),
        100,
    );
    check_backward(&llama4, &weights, 29, 101);
    let top2 = MoeConfig { top_k: 2, ..llama4 };
    let dropping = MoeConfig {
        drop_tokens: true,
        capacity_factor: 0.5,
        ..top2.clone()
    };
    let weights = with_shared(
        MoeWeights::random(shape(6, 16, 24), true, true, 102),
        24,
        (true, true, true),
        103,
    );
    check_backward(&dropping, &weights, 45, 104);
    check_backward_capped(&top2, &weights, 400, 105, Some(16 << 10));
}

#[test]
fn a_shared_expert_trains_on_the_gpu_as_on_the_reference() {
    // Three SGD steps on the GPU against three on the host with the reference's
    // gradients: the trained weights (routed and shared) agree, its padding rows and the
    // gate's place in the router bias never enter.
    let config = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Silu,
        ..MoeConfig::default()
    };
    let mut weights = with_shared(
        MoeWeights::random(shape(4, 8, 6), true, true, 92),
        9,
        (true, true, true),
        93,
    );
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    let layer = MoeLayer::with_options(&gpu(), config.clone(), &weights, options).unwrap();
    let optimizer = Optimizer::Sgd {
        learning_rate: 0.05,
        weight_decay: 0.0,
    };
    let x = tokens(20, 8, 94);
    let dy = SeededRng::new(95).normal_vec(x.len());
    let losses = LossCoefficients::default();
    for _ in 0..3 {
        layer.forward_train(&x, &[20, 8]).unwrap();
        layer.backward(&dy, losses).unwrap();
        layer.step(&optimizer).unwrap();
        let grads = cpu_backward::backward(&config, &weights, &x, &[20, 8], &dy, losses).unwrap();
        weights = sgd_step(&weights, &grads, 0.05);
    }
    let trained = layer.trained_weights().unwrap();
    assert_eq!(trained.shared.as_ref().unwrap().d_ff, 9);
    let named = |w: &MoeWeights| -> Vec<(String, Vec<f32>)> {
        let mut all = vec![("router.weight".to_string(), w.router_weight.clone())];
        all.push(("router.bias".into(), w.router_bias.clone().unwrap()));
        all.push(("experts.w1".into(), w.w1.f32_values().unwrap().to_vec()));
        all.push(("experts.w2".into(), w.w2.f32_values().unwrap().to_vec()));
        for (name, values) in w.shared.as_ref().unwrap().tensors() {
            all.push((name.to_string(), values.to_vec()));
        }
        all
    };
    for ((name, gpu), (_, host)) in named(&trained).iter().zip(named(&weights)) {
        let largest = host.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        // Three steps of learning rate 0.05 on gradients within 1e-5 of their largest.
        assert_close(name, gpu, &host, |_| 1e-5 * largest.max(1.0));
    }
}

/// One SGD step of the host: every tensor minus the learning rate times its gradient.
fn sgd_step(weights: &MoeWeights, grads: &switch_moe::Gradients, rate: f32) -> MoeWeights {
    let step =
        |w: &[f32], g: &[f32]| -> Vec<f32> { w.iter().zip(g).map(|(w, g)| w - rate * g).collect() };
    let step_opt = |w: &Option<Vec<f32>>, g: &Option<Vec<f32>>| match (w, g) {
        (Some(w), Some(g)) => Some(step(w, g)),
        _ => None,
    };
    let matrices = |m: &switch_moe::formats::ExpertMatrices, g: &[f32]| {
        switch_moe::formats::ExpertMatrices::from_f32(
            m.count,
            m.rows,
            m.cols,
            step(m.f32_values().unwrap(), g),
        )
    };
    let shared = weights.shared.as_ref().unwrap();
    let g = grads.shared.as_ref().unwrap();
    MoeWeights {
        shape: weights.shape,
        router_weight: step(&weights.router_weight, &grads.router_weight),
        router_bias: step_opt(&weights.router_bias, &grads.router_bias),
        score_bias: weights.score_bias.clone(),
        w1: matrices(&weights.w1, &grads.w1),
        b1: step_opt(&weights.b1, &grads.b1),
        w2: matrices(&weights.w2, &grads.w2),
        b2: step_opt(&weights.b2, &grads.b2),
        w3: weights
            .w3
            .as_ref()
            .zip(grads.w3.as_ref())
            .map(|(m, g)| matrices(m, g)),
        b3: step_opt(&weights.b3, &grads.b3),
        shared: Some(SharedExpert {
            d_ff: shared.d_ff,
            w1: step(&shared.w1, &g.w1),
            b1: step_opt(&shared.b1, &g.b1),
            w2: step(&shared.w2, &g.w2),
            b2: step_opt(&shared.b2, &g.b2),
            w3: step_opt(&shared.w3, &g.w3),
            b3: step_opt(&shared.b3, &g.b3),
            gate: step_opt(&shared.gate, &g.gate),
        }),
    }
}
