//! The GPU backward against the CPU reference backward (f64) on awkward shapes, every
//! activation, gating, top-k with and without normalisation, heavy dropping with both drop
//! policies, unscaled gates, gates on the experts' input, the aux and z losses; reruns
//! bit-identical; the optimizer step and the refreshed forward; and the errors of training
//! out of turn.

mod common;

use common::*;
use switch_moe::cpu_backward::{self, LossCoefficients};
use switch_moe::rng::SeededRng;
use switch_moe::{
    Activation, DropPolicy, GateOn, LayerOptions, MoeConfig, MoeError, MoeLayer, MoeWeights,
    Optimizer, WeightFormat,
};

fn trainable(
    context: &switch_moe::GpuContext,
    config: &MoeConfig,
    weights: &MoeWeights,
) -> MoeLayer {
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    MoeLayer::with_options(context, config.clone(), weights, options).unwrap()
}

struct Case {
    config: MoeConfig,
    num_experts: usize,
    d_model: usize,
    d_ff: usize,
    num_tokens: usize,
    biases: bool,
    coefficients: LossCoefficients,
}

fn case(config: MoeConfig, (n, d, f): (usize, usize, usize), t: usize) -> Case {
    Case {
        config,
        num_experts: n,
        d_model: d,
        d_ff: f,
        num_tokens: t,
        biases: true,
        coefficients: LossCoefficients {
            aux: 0.01,
            z: 0.001,
        },
    }
}

fn run_case(context: &switch_moe::GpuContext, c: &Case, seed: u64) {
    let what = format!(
        "N={} D={} F={} T={} k={} {:?} gated={} normalize={} scale={} drop={:?}/{} bias={}",
        c.num_experts,
        c.d_model,
        c.d_ff,
        c.num_tokens,
        c.config.top_k,
        c.config.activation,
        c.config.gated,
        c.config.normalize_top_k,
        c.config.scale_by_prob,
        c.config.drop_policy,
        c.config.drop_tokens,
        c.biases
    );
    let weights = MoeWeights::random(
        shape(c.num_experts, c.d_model, c.d_ff),
        c.config.gated,
        c.biases,
        seed,
    );
    let x = tokens(c.num_tokens, c.d_model, seed);
    let dy = SeededRng::new(seed ^ 0xD1).normal_vec(x.len());
    let shape = [c.num_tokens, c.d_model];
    let layer = trainable(context, &c.config, &weights);
    let output = layer.forward_train(&x, &shape).unwrap();
    let reference = cpu_forward(&c.config, &weights, &x, &shape);
    assert_eq!(output.routes, reference.routes, "{what}: routes");
    assert_eq!(output.kept, reference.kept, "{what}: kept");
    let gpu = layer
        .backward(&dy, c.coefficients)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let cpu = cpu_backward::backward(&c.config, &weights, &x, &shape, &dy, c.coefficients).unwrap();
    let depth = c.d_model + c.d_ff + c.num_tokens * c.config.top_k + c.num_experts;
    assert_gradients_close(&what, &gpu, &cpu, depth);
    // The same backward again, and a fresh forward and backward: the same bits.
    assert_eq!(
        layer.backward(&dy, c.coefficients).unwrap(),
        gpu,
        "{what}: rerun"
    );
    layer.forward_train(&x, &shape).unwrap();
    assert_eq!(
        layer.backward(&dy, c.coefficients).unwrap(),
        gpu,
        "{what}: rerun after a new forward"
    );
}

#[test]
fn gpu_backward_matches_the_reference_across_configs() {
    let context = gpu();
    let mut cases = Vec::new();
    for activation in [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
    ] {
        for gated in [false, true] {
            let config = MoeConfig {
                activation,
                gated,
                ..config(1)
            };
            cases.push(case(config, (4, 12, 20), 24));
        }
    }
    // relu2 as Nemotron-H runs it (ungated), quick_gelu as ERNIE 4.5 VL (gated): each
    // activation's pipelines cost GL's compiler seconds, so one case each.
    for (activation, gated) in [(Activation::Relu2, false), (Activation::QuickGelu, true)] {
        let config = MoeConfig {
            activation,
            gated,
            ..config(1)
        };
        cases.push(case(config, (4, 12, 20), 24));
    }
    // swiglu_oai with a limit its pre-activations cross on both sides (zero derivatives).
    let swiglu_oai = MoeConfig {
        activation: Activation::SwigluOai,
        gated: true,
        swiglu_limit: 0.4,
        normalize_top_k: true,
        ..config(2)
    };
    cases.push(case(swiglu_oai, (4, 12, 20), 24));
    // DeepSeek-V3's router (the score bias and groups only choose), and sigmoid top-1
    // with heavy dropping.
    let deepseek = MoeConfig {
        router_score: switch_moe::RouterScore::Sigmoid,
        n_group: Some(4),
        topk_group: Some(2),
        normalize_top_k: true,
        routed_scaling_factor: 2.5,
        drop_tokens: false,
        gated: true,
        activation: Activation::Silu,
        ..config(4)
    };
    cases.push(case(deepseek, (16, 12, 20), 24));
    let sigmoid_dropping = MoeConfig {
        router_score: switch_moe::RouterScore::Sigmoid,
        capacity_factor: 0.5,
        routed_scaling_factor: 1.5,
        ..config(1)
    };
    cases.push(case(sigmoid_dropping, (4, 12, 20), 33));
    // Llama 4's gate on the experts' input (sigmoid top-1, E(g·x)); then on softmax
    // scores, normalised top-2 and scaled, with biases and heavy dropping.
    let llama4 = MoeConfig {
        router_score: switch_moe::RouterScore::Sigmoid,
        gate_on: GateOn::Input,
        drop_tokens: false,
        gated: true,
        activation: Activation::Silu,
        ..config(1)
    };
    cases.push(case(llama4.clone(), (4, 12, 20), 24));
    cases.push(case(llama4, (1, 5, 3), 1));
    cases.push(case(
        MoeConfig {
            gate_on: GateOn::Input,
            normalize_top_k: true,
            routed_scaling_factor: 1.5,
            capacity_factor: 0.5,
            drop_policy: DropPolicy::PassThrough,
            ..config(2)
        },
        (5, 9, 7),
        33,
    ));
    // Top-k, normalised or not, with heavy dropping and both policies; unscaled gates.
    for (top_k, normalize) in [(2, true), (2, false), (3, true)] {
        for policy in [DropPolicy::PassThrough, DropPolicy::Zero] {
            cases.push(case(
                MoeConfig {
                    normalize_top_k: normalize,
                    drop_tokens: true,
                    capacity_factor: 0.5,
                    drop_policy: policy,
                    gated: true,
                    activation: Activation::Silu,
                    ..config(top_k)
                },
                (5, 9, 7),
                33,
            ));
        }
    }
    cases.push(case(
        MoeConfig {
            scale_by_prob: false,
            drop_tokens: true,
            capacity_factor: 0.7,
            ..config(1)
        },
        (3, 10, 6),
        17,
    ));
    // Awkward sizes: T = 1, N = 1, dims off every tile, no biases, losses off.
    cases.push(case(config(1), (1, 5, 3), 1));
    cases.push(case(config(1), (6, 13, 35), 1));
    let mut plain = case(config(2), (7, 17, 9), 50);
    plain.biases = false;
    plain.coefficients = LossCoefficients::default();
    cases.push(plain);
    for (i, c) in cases.iter().enumerate() {
        run_case(&context, c, 100 + i as u64);
    }
}

#[test]
fn gpu_backward_with_all_tokens_on_one_expert_and_many_experts() {
    let context = gpu();
    // A router that sends every token to expert 2: one hot expert, the rest empty.
    let mut weights = MoeWeights::random(shape(4, 8, 12), false, true, 7);
    weights.router_weight.iter_mut().for_each(|w| *w = 0.0);
    if let Some(bias) = weights.router_bias.as_mut() {
        bias.copy_from_slice(&[0.0, 0.0, 5.0, 0.0]);
    }
    let config = config(1);
    let x = tokens(40, 8, 7);
    let dy = SeededRng::new(71).normal_vec(x.len());
    let layer = trainable(&context, &config, &weights);
    let output = layer.forward_train(&x, &[40, 8]).unwrap();
    assert_eq!(output.counts, vec![0, 0, 40, 0]);
    let coefficients = LossCoefficients { aux: 0.1, z: 0.01 };
    let gpu = layer.backward(&dy, coefficients).unwrap();
    let cpu = cpu_backward::backward(&config, &weights, &x, &[40, 8], &dy, coefficients).unwrap();
    assert_gradients_close("one hot expert", &gpu, &cpu, 8 + 12 + 40 + 4);

    // N = 128 experts, top-2, 3-D input.
    let config = MoeConfig {
        normalize_top_k: true,
        ..common::config(2)
    };
    let weights = MoeWeights::random(shape(128, 8, 8), false, true, 9);
    let x = tokens(64, 8, 9);
    let dy = SeededRng::new(91).normal_vec(x.len());
    let layer = trainable(&context, &config, &weights);
    layer.forward_train(&x, &[16, 4, 8]).unwrap();
    let gpu = layer.backward(&dy, coefficients).unwrap();
    let cpu =
        cpu_backward::backward(&config, &weights, &x, &[16, 4, 8], &dy, coefficients).unwrap();
    assert_gradients_close("N = 128", &gpu, &cpu, 8 + 8 + 128 + 128);
}

#[test]
fn an_sgd_step_updates_the_weights_and_the_forward_uses_them() {
    let context = gpu();
    let config = MoeConfig {
        gated: true,
        ..common::config(2)
    };
    let weights = MoeWeights::random(shape(4, 10, 6), true, true, 21);
    let x = tokens(20, 10, 21);
    let dy = SeededRng::new(22).normal_vec(x.len());
    let layer = trainable(&context, &config, &weights);
    layer.forward_train(&x, &[20, 10]).unwrap();
    let gradients = layer.backward(&dy, LossCoefficients::default()).unwrap();
    let (learning_rate, weight_decay) = (0.1f32, 0.01f32);
    layer
        .step(&Optimizer::Sgd {
            learning_rate,
            weight_decay,
        })
        .unwrap();
    let trained = layer.trained_weights().unwrap();
    // p − lr·(g + wd·p), element by element (within an FMA's rounding).
    let expected: Vec<f32> = weights
        .router_weight
        .iter()
        .zip(&gradients.router_weight)
        .map(|(&p, &g)| p - learning_rate * (g + weight_decay * p))
        .collect();
    assert_close(
        "router.weight after SGD",
        &trained.router_weight,
        &expected,
        |i| 4.0 * U * (expected[i].abs() as f64 + 1.0),
    );
    let expected_w2: Vec<f32> = weights
        .w2
        .to_f32()
        .iter()
        .zip(&gradients.w2)
        .map(|(&p, &g)| p - learning_rate * (g + weight_decay * p))
        .collect();
    assert_close("w2 after SGD", &trained.w2.to_f32(), &expected_w2, |i| {
        4.0 * U * (expected_w2[i].abs() as f64 + 1.0)
    });
    // The forward after the step equals a fresh layer built from the trained weights, bit
    // for bit: the refreshed textures and biases are the upload's.
    let fresh = MoeLayer::new(&context, config.clone(), &trained).unwrap();
    assert_eq!(
        layer.forward(&x, &[20, 10]).unwrap(),
        fresh.forward(&x, &[20, 10]).unwrap()
    );
}

#[test]
fn adam_w_steps_lower_the_loss_and_rerun_bit_identically() {
    let context = gpu();
    let config = common::config(1);
    let weights = MoeWeights::random(shape(4, 8, 16), false, true, 31);
    let x = tokens(32, 8, 31);
    let target = SeededRng::new(32).normal_vec(x.len());
    let train = || {
        let layer = trainable(&context, &config, &weights);
        let mut losses = Vec::new();
        for _ in 0..20 {
            let y = layer.forward_train(&x, &[32, 8]).unwrap().y;
            // L = ½‖y − target‖²: dy = y − target.
            let dy: Vec<f32> = y.iter().zip(&target).map(|(a, b)| a - b).collect();
            losses.push(dy.iter().map(|v| 0.5 * v * v).sum::<f32>());
            layer.backward(&dy, LossCoefficients::default()).unwrap();
            layer.step(&Optimizer::adam_w(0.01)).unwrap();
        }
        (losses, layer.trained_weights().unwrap())
    };
    let (losses, trained) = train();
    assert!(
        losses[19] < 0.8 * losses[0],
        "loss should fall: {:?}",
        losses
    );
    let (again, trained_again) = train();
    assert_eq!(losses, again, "losses differ between identical runs");
    assert_eq!(
        trained, trained_again,
        "weights differ between identical runs"
    );
}

#[test]
fn training_out_of_turn_is_an_error() {
    let context = gpu();
    let config = common::config(1);
    let weights = MoeWeights::random(shape(2, 4, 4), false, true, 41);
    let x = tokens(3, 4, 41);
    // Not trainable.
    let layer = MoeLayer::new(&context, config.clone(), &weights).unwrap();
    let error = layer.forward_train(&x, &[3, 4]).unwrap_err();
    assert!(matches!(error, MoeError::Training { .. }), "{error}");
    assert!(error.to_string().contains("trainable"), "{error}");
    // Backward before forward_train, step before backward, dy of the wrong size.
    let layer = trainable(&context, &config, &weights);
    let error = layer.backward(&x, LossCoefficients::default()).unwrap_err();
    assert!(error.to_string().contains("forward_train first"), "{error}");
    layer.forward_train(&x, &[3, 4]).unwrap();
    let error = layer.step(&Optimizer::adam_w(0.1)).unwrap_err();
    assert!(error.to_string().contains("backward first"), "{error}");
    let error = layer
        .backward(&x[..8], LossCoefficients::default())
        .unwrap_err();
    assert!(error.to_string().contains("`dy`"), "{error}");
    let mut bad = x.clone();
    bad[5] = f32::NAN;
    let error = layer
        .backward(&bad, LossCoefficients::default())
        .unwrap_err();
    assert!(error.to_string().contains("non-finite"), "{error}");
    // Quantized weights cannot train.
    let options = LayerOptions {
        trainable: true,
        weight_format: Some(WeightFormat::Q8_0),
        ..LayerOptions::default()
    };
    let weights = MoeWeights::random(shape(2, 32, 32), false, true, 42);
    let error = MoeLayer::with_options(&context, config, &weights, options)
        .err()
        .expect("a Q8_0 layer cannot be trainable");
    assert!(
        matches!(error, MoeError::TrainingNeedsF32 { .. }),
        "{error}"
    );
}

#[test]
fn batches_of_changing_size_reuse_or_grow_the_workspace_and_stay_exact() {
    let context = gpu();
    let config = common::config(2);
    let weights = MoeWeights::random(shape(5, 12, 10), false, true, 51);
    let layer = trainable(&context, &config, &weights);
    let coefficients = LossCoefficients {
        aux: 0.01,
        z: 0.001,
    };
    // Small, larger (new buffers), small again (the larger ones reused), then after a
    // failed training forward (which keeps no workspace: the next one builds its own while
    // the backward's scratch stays): each backward against the reference of its own batch.
    for (i, num_tokens) in [9usize, 60, 9, 33, 0, 20].into_iter().enumerate() {
        if num_tokens == 0 {
            let mut bad = tokens(40, 12, 50);
            bad[7] = f32::NAN;
            let error = layer.forward_train(&bad, &[40, 12]).unwrap_err();
            assert!(
                matches!(error, MoeError::NonFiniteInput { token: 0 }),
                "{error}"
            );
            let error = layer.backward(&bad, coefficients).unwrap_err();
            assert!(error.to_string().contains("forward_train first"), "{error}");
            continue;
        }
        let x = tokens(num_tokens, 12, 52 + i as u64);
        let dy = SeededRng::new(53 + i as u64).normal_vec(x.len());
        let shape = [num_tokens, 12];
        layer.forward_train(&x, &shape).unwrap();
        let gpu = layer.backward(&dy, coefficients).unwrap();
        let cpu = cpu_backward::backward(&config, &weights, &x, &shape, &dy, coefficients).unwrap();
        let depth = 12 + 10 + num_tokens * 2 + 5;
        assert_gradients_close(&format!("T = {num_tokens}"), &gpu, &cpu, depth);
    }
}

#[test]
fn encoded_training_steps_equal_the_host_ones_bit_for_bit() {
    let context = gpu();
    let config = MoeConfig {
        gated: true,
        ..common::config(2)
    };
    let weights = MoeWeights::random(shape(4, 12, 8), true, true, 61);
    let (t, d) = (30usize, 12usize);
    let x_values = tokens(t, d, 61);
    let dy_values = SeededRng::new(62).normal_vec(t * d);
    let coefficients = LossCoefficients {
        aux: 0.01,
        z: 0.001,
    };
    let optimizer = Optimizer::adam_w(0.01);

    // Two steps through the host API.
    let host = trainable(&context, &config, &weights);
    let mut host_steps = Vec::new();
    for _ in 0..2 {
        let y = host.forward_train(&x_values, &[t, d]).unwrap().y;
        let dx = host.backward(&dy_values, coefficients).unwrap().x;
        host.step(&optimizer).unwrap();
        host_steps.push((y, dx));
    }

    // The same two steps recorded into ONE caller encoder: each forward must see the
    // weights the step before it wrote.
    let encoded = trainable(&context, &config, &weights);
    let usage =
        wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::STORAGE;
    let x = buffer_with(&context, &x_values, usage);
    let dy = buffer_with(&context, &dy_values, usage);
    let outputs: Vec<(wgpu::Buffer, wgpu::Buffer)> = (0..2)
        .map(|_| {
            (
                buffer_with(&context, &vec![0.0; t * d], usage),
                buffer_with(&context, &vec![0.0; t * d], usage),
            )
        })
        .collect();
    let mut encoder = context.device.create_command_encoder(&Default::default());
    for (y, dx) in &outputs {
        encoded
            .encode_forward_train(&mut encoder, &x, y, None, t)
            .unwrap();
        encoded
            .encode_backward(&mut encoder, &dy, dx, coefficients)
            .unwrap();
        encoded.encode_step(&mut encoder, &optimizer).unwrap();
    }
    context.queue.submit([encoder.finish()]);
    let floats = |b: &wgpu::Buffer| {
        read_words(&context, b)
            .into_iter()
            .map(f32::from_bits)
            .collect::<Vec<_>>()
    };
    for (step, ((y, dx), (host_y, host_dx))) in outputs.iter().zip(&host_steps).enumerate() {
        assert_eq!(&floats(y), host_y, "step {step}: y");
        assert_eq!(&floats(dx), host_dx, "step {step}: dx");
    }
    assert_eq!(
        encoded.trained_weights().unwrap(),
        host.trained_weights().unwrap()
    );

    // Caller buffers too small are errors naming them.
    let small = buffer_with(&context, &[0.0; 4], usage);
    let mut encoder = context.device.create_command_encoder(&Default::default());
    encoded
        .encode_forward_train(&mut encoder, &x, &outputs[0].0, None, t)
        .unwrap();
    let error = encoded
        .encode_backward(&mut encoder, &small, &outputs[0].1, coefficients)
        .unwrap_err();
    assert!(error.to_string().contains("`dy`"), "{error}");
    let error = encoded
        .encode_backward(&mut encoder, &dy, &small, coefficients)
        .unwrap_err();
    assert!(error.to_string().contains("`dx`"), "{error}");
}

#[test]
fn resuming_from_saved_weights_and_adam_w_state_continues_exactly() {
    let context = gpu();
    let config = common::config(1);
    let weights = MoeWeights::random(shape(4, 8, 12), false, true, 71);
    let x = tokens(24, 8, 71);
    let dy = SeededRng::new(72).normal_vec(x.len());
    let optimizer = Optimizer::adam_w(0.01);
    let step = |layer: &MoeLayer| {
        layer.forward_train(&x, &[24, 8]).unwrap();
        layer.backward(&dy, LossCoefficients::default()).unwrap();
        layer.step(&optimizer).unwrap();
    };
    let unbroken = trainable(&context, &config, &weights);
    assert_eq!(unbroken.adam_w_state().unwrap(), None);
    for _ in 0..3 {
        step(&unbroken);
    }
    let saved = unbroken
        .adam_w_state()
        .unwrap()
        .expect("AdamW steps were taken");
    assert_eq!(saved.steps, 3);
    let resumed = trainable(&context, &config, &unbroken.trained_weights().unwrap());
    resumed.set_adam_w_state(&saved).unwrap();
    for _ in 0..2 {
        step(&unbroken);
        step(&resumed);
    }
    assert_eq!(
        resumed.trained_weights().unwrap(),
        unbroken.trained_weights().unwrap()
    );
    assert_eq!(
        resumed.adam_w_state().unwrap(),
        unbroken.adam_w_state().unwrap()
    );
    // A state of another layer's size is an error naming it.
    let mut wrong = saved.clone();
    wrong.first_moments.pop();
    let error = resumed.set_adam_w_state(&wrong).unwrap_err();
    assert!(error.to_string().contains("first_moments"), "{error}");
}

#[test]
fn an_upstream_gradient_of_route_prob_sum_reaches_the_router() {
    let context = gpu();
    let config = MoeConfig {
        capacity_factor: 0.8,
        ..common::config(2)
    };
    let weights = MoeWeights::random(shape(5, 9, 7), false, true, 91);
    let x = tokens(30, 9, 91);
    let dy = SeededRng::new(92).normal_vec(x.len());
    let g = [0.3f32, -1.2, 0.0, 2.5, -0.4];
    let coefficients = LossCoefficients { aux: 0.01, z: 0.0 };
    let layer = trainable(&context, &config, &weights);
    layer.forward_train(&x, &[30, 9]).unwrap();
    let gpu = layer
        .backward_with_prob_sum_grad(&dy, &g, coefficients)
        .unwrap();
    let cpu = cpu_backward::backward_with_prob_sum_grad(
        &config,
        &weights,
        &x,
        &[30, 9],
        &dy,
        Some(&g),
        coefficients,
    )
    .unwrap();
    assert_gradients_close("route_prob_sum gradient", &gpu, &cpu, 9 + 7 + 60 + 5);
    // It changes the router's and x's gradients (and nothing else).
    let without = layer.backward(&dy, coefficients).unwrap();
    assert_ne!(gpu.router_weight, without.router_weight);
    assert_ne!(gpu.x, without.x);
    assert_eq!(gpu.w1, without.w1);
    // One value per expert, finite.
    let error = layer
        .backward_with_prob_sum_grad(&dy, &g[..4], coefficients)
        .unwrap_err();
    assert!(error.to_string().contains("route_prob_sum_grad"), "{error}");
}

#[test]
fn set_weights_replaces_a_trainable_layers_weights_in_place() {
    let context = gpu();
    let config = MoeConfig {
        gated: true,
        ..common::config(2)
    };
    let first = MoeWeights::random(shape(4, 10, 6), true, true, 101);
    let second = MoeWeights::random(shape(4, 10, 6), true, true, 102);
    let x = tokens(25, 10, 103);
    let layer = trainable(&context, &config, &first);
    layer.forward(&x, &[25, 10]).unwrap();
    layer.set_weights(&second).unwrap();
    let fresh = MoeLayer::new(&context, config.clone(), &second).unwrap();
    assert_eq!(
        layer.forward(&x, &[25, 10]).unwrap(),
        fresh.forward(&x, &[25, 10]).unwrap()
    );
    assert_eq!(layer.trained_weights().unwrap(), second);
    // Another shape or another set of tensors is an error naming the weights.
    let other = MoeWeights::random(shape(4, 10, 8), true, true, 104);
    let error = layer.set_weights(&other).unwrap_err();
    assert!(error.to_string().contains("`weights`"), "{error}");
    let no_biases = MoeWeights::random(shape(4, 10, 6), true, false, 105);
    assert!(layer.set_weights(&no_biases).is_err());
}

#[test]
fn training_over_several_weight_shards_equals_one_shard_bit_for_bit() {
    // Uneven shards (2 + 2 + 1 experts), each with its own parameter, gradient and moment
    // buffers: the same sums in the same order as one shard, so the same bits; with the
    // gates on the outputs, then on the inputs (sigmoid, as Llama 4).
    let context = gpu();
    let on_output = MoeConfig {
        gated: true,
        activation: Activation::Silu,
        normalize_top_k: true,
        ..common::config(2)
    };
    let on_input = MoeConfig {
        gate_on: GateOn::Input,
        router_score: switch_moe::RouterScore::Sigmoid,
        ..on_output.clone()
    };
    for config in [on_output, on_input] {
        sharded_training_case(&context, &config);
    }
}

fn sharded_training_case(context: &switch_moe::GpuContext, config: &MoeConfig) {
    let weights = MoeWeights::random(shape(5, 10, 14), true, true, 61);
    let x = tokens(29, 10, 61);
    let dy = SeededRng::new(62).normal_vec(x.len());
    let coefficients = LossCoefficients {
        aux: 0.01,
        z: 0.002,
    };
    let train = |max_experts_per_shard: Option<usize>| {
        let options = LayerOptions {
            trainable: true,
            max_experts_per_shard,
            ..LayerOptions::default()
        };
        let layer = MoeLayer::with_options(context, config.clone(), &weights, options).unwrap();
        let mut gradients = Vec::new();
        for _ in 0..3 {
            layer.forward_train(&x, &[29, 10]).unwrap();
            gradients.push(layer.backward(&dy, coefficients).unwrap());
            layer.step(&Optimizer::adam_w(0.02)).unwrap();
        }
        let shards = layer.num_weight_shards();
        let state = layer.adam_w_state().unwrap();
        (shards, gradients, layer.trained_weights().unwrap(), state)
    };
    let (one, gradients, trained, state) = train(None);
    let (three, sharded_gradients, sharded_trained, sharded_state) = train(Some(2));
    let what = format!("{:?}", config.gate_on);
    assert_eq!((one, three), (1, 3));
    assert_eq!(gradients, sharded_gradients, "{what}: gradients");
    assert_eq!(trained, sharded_trained, "{what}: trained weights");
    assert_eq!(state, sharded_state, "{what}: AdamW state");
    // And the first backward equals the reference.
    let cpu = cpu_backward::backward(config, &weights, &x, &[29, 10], &dy, coefficients).unwrap();
    let depth = 10 + 14 + 29 * 2 + 5;
    let what = format!("{what}: three shards");
    assert_gradients_close(&what, &sharded_gradients[0], &cpu, depth);
}
