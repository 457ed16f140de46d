//! The whole GPU forward against the CPU reference on seeded shapes, including awkward
//! ones (sizes that are no multiple of any tile, one token, one expert, 128 experts,
//! everything to one expert, capacity 0, heavy dropping, several groups).

mod common;

use common::*;
use switch_moe::{
    Activation, DropPolicy, LayerOptions, MoeConfig, MoeError, MoeLayer, MoeOutput, MoeWeights,
};

/// Builds a seeded layer (with biases), runs it on the GPU and the CPU, and compares.
fn check(
    config: MoeConfig,
    num_experts: usize,
    d_model: usize,
    d_ff: usize,
    num_tokens: usize,
    seed: u64,
) -> MoeOutput {
    let weights = MoeWeights::random(shape(num_experts, d_model, d_ff), config.gated, true, seed);
    check_weights(config, &weights, num_tokens, seed)
}

fn check_weights(
    config: MoeConfig,
    weights: &MoeWeights,
    num_tokens: usize,
    seed: u64,
) -> MoeOutput {
    check_with_options(config, weights, num_tokens, seed, LayerOptions::default())
}

fn check_with_options(
    config: MoeConfig,
    weights: &MoeWeights,
    num_tokens: usize,
    seed: u64,
    options: LayerOptions,
) -> MoeOutput {
    let d_model = weights.shape.d_model;
    let x = tokens(num_tokens, d_model, seed);
    let shape = [num_tokens, d_model];
    let layer = MoeLayer::with_options(&gpu(), config.clone(), weights, options).expect("layer");
    let gpu_output = layer.forward(&x, &shape).expect("GPU forward");
    let cpu_output = cpu_forward(&config, weights, &x, &shape);
    assert_matches_reference(&config, weights, &x, &gpu_output, &cpu_output);
    gpu_output
}

/// Weights whose router sends (almost) every token to `expert`.
fn skewed_to(
    expert: usize,
    num_experts: usize,
    d_model: usize,
    d_ff: usize,
    seed: u64,
) -> MoeWeights {
    let mut weights = MoeWeights::random(shape(num_experts, d_model, d_ff), false, true, seed);
    weights.router_bias.as_mut().unwrap()[expert] = 50.0;
    weights
}

#[test]
fn small_top1() {
    check(config(1), 4, 16, 32, 64, 1);
}

#[test]
fn sizes_not_multiple_of_any_tile() {
    check(config(1), 5, 33, 77, 257, 2);
    check(config(2), 7, 37, 45, 131, 3);
}

#[test]
fn one_token() {
    check(config(1), 8, 24, 40, 1, 4);
    check(config(3), 8, 24, 40, 1, 5);
}

#[test]
fn one_expert() {
    // Capacity floor(1.25·T) ≥ T: nothing dropped.
    let output = check(config(1), 1, 16, 48, 100, 6);
    assert_eq!(output.n_dropped, 0);
}

#[test]
fn weight_textures_of_every_layer_count() {
    // One expert, and square W2 layers (D = 16 rows of F / 4 = 16 texels) in a multiple of 6
    // experts: sizes from which GL drivers' texture-kind guesses go wrong.
    check(config(1), 1, 16, 64, 40, 41);
    check(config(1), 6, 16, 64, 60, 42);
    check(config(2), 12, 16, 64, 60, 43);
}

#[test]
fn many_experts() {
    check(config(1), 128, 16, 24, 300, 7);
    check(config(2), 128, 8, 12, 200, 8);
}

#[test]
fn top2_and_top4_with_renormalisation() {
    check(config(2), 8, 32, 64, 200, 9);
    let normalized = MoeConfig {
        top_k: 4,
        normalize_top_k: true,
        ..MoeConfig::default()
    };
    check(normalized, 8, 32, 64, 200, 10);
}

#[test]
fn all_tokens_to_one_expert() {
    let weights = skewed_to(3, 8, 16, 32, 11);
    let output = check_weights(config(1), &weights, 160, 11);
    assert_eq!(output.counts[3], 160);
    // Capacity floor(1.25·160/8) = 25 kept, the rest passes through.
    assert_eq!(output.kept[3], 25);
    assert_eq!(output.n_dropped, 135);
    let no_drop = MoeConfig {
        drop_tokens: false,
        ..config(1)
    };
    let output = check_weights(no_drop, &weights, 160, 11);
    assert_eq!(output.kept[3], 160);
}

#[test]
fn capacity_zero_drops_everything() {
    for policy in [DropPolicy::PassThrough, DropPolicy::Zero] {
        let config = MoeConfig {
            expert_capacity: Some(0),
            drop_policy: policy,
            ..config(2)
        };
        let output = check(config, 4, 16, 32, 50, 12);
        assert_eq!(output.n_dropped, 100);
        assert!(output.kept.iter().all(|&k| k == 0));
    }
}

#[test]
fn heavy_dropping() {
    let config = MoeConfig {
        capacity_factor: 0.3,
        ..config(2)
    };
    let output = check(config, 8, 16, 32, 300, 13);
    assert!(
        output.n_dropped > 300,
        "expected heavy dropping, got {}",
        output.n_dropped
    );
}

#[test]
fn gated_with_biases_every_activation() {
    for (i, activation) in [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
    ]
    .into_iter()
    .enumerate()
    {
        for gated in [false, true] {
            let config = MoeConfig {
                activation,
                gated,
                ..config(2)
            };
            check(config, 6, 20, 36, 90, 14 + i as u64);
        }
    }
    // The families' activations as they run them (each one's pipelines cost GL's compiler
    // seconds): relu2 ungated (Nemotron-H), quick_gelu gated (ERNIE 4.5 VL), swiglu_oai
    // gated only, with a limit of 0.5 that puts pre-activations beyond both clamps.
    for (activation, gated, seed) in [
        (Activation::Relu2, false, 18),
        (Activation::QuickGelu, true, 19),
        (Activation::SwigluOai, true, 20),
    ] {
        let config = MoeConfig {
            activation,
            gated,
            swiglu_limit: 0.5,
            ..config(2)
        };
        check(config, 6, 20, 36, 90, seed);
    }
}

#[test]
fn no_biases() {
    let weights = MoeWeights::random(shape(6, 16, 32), true, false, 20);
    let config = MoeConfig {
        gated: true,
        activation: Activation::Silu,
        normalize_top_k: true,
        ..config(2)
    };
    check_weights(config, &weights, 70, 20);
}

#[test]
fn several_groups() {
    for (group_size, num_tokens) in [(64, 256), (100, 300), (1, 40), (300, 600)] {
        let config = MoeConfig {
            group_size: Some(group_size),
            capacity_factor: 1.0,
            ..config(2)
        };
        check(config, 4, 16, 24, num_tokens, 21 + group_size as u64);
    }
}

#[test]
fn policies_and_scaling() {
    for policy in [DropPolicy::PassThrough, DropPolicy::Zero] {
        for scale_by_prob in [true, false] {
            let config = MoeConfig {
                drop_policy: policy,
                scale_by_prob,
                capacity_factor: 0.5,
                ..config(1)
            };
            check(config, 4, 16, 24, 100, 30);
        }
    }
}

#[test]
fn sequence_batch_input_shape() {
    let weights = MoeWeights::random(shape(4, 16, 32), false, true, 31);
    let x = tokens(6 * 5, 16, 31);
    let layer = MoeLayer::new(&gpu(), config(1), &weights).unwrap();
    let output = layer.forward(&x, &[6, 5, 16]).unwrap();
    assert_eq!(output.shape, vec![6, 5, 16]);
    let reference = cpu_forward(&config(1), &weights, &x, &[6, 5, 16]);
    assert_matches_reference(&config(1), &weights, &x, &output, &reference);
}

#[test]
fn weights_split_over_several_shards() {
    // Shards of at most 2 experts: 7 experts make 4 shards, the last with one expert.
    let weights = MoeWeights::random(shape(7, 16, 32), true, true, 32);
    let config = MoeConfig {
        gated: true,
        activation: Activation::Gelu,
        ..config(2)
    };
    let options = LayerOptions {
        max_experts_per_shard: Some(2),
        ..Default::default()
    };
    let layer = MoeLayer::with_options(&gpu(), config.clone(), &weights, options.clone()).unwrap();
    assert_eq!(layer.num_weight_shards(), 4);
    assert_eq!(layer.dispatches_per_forward(), 7 + 2 * 4);
    check_with_options(config, &weights, 20, 32, options);
}

#[test]
fn every_matmul_tile_shape() {
    // Shapes off every tile, gated, with dropping: each tile shape must give the same answer,
    // with x rows off vec4 alignment (D = 37, F = 83) and on it (D = 40, F = 76).
    let weights = MoeWeights::random(shape(5, 37, 83), true, true, 33);
    let aligned = MoeWeights::random(shape(5, 40, 76), true, true, 34);
    let config = MoeConfig {
        gated: true,
        activation: Activation::GeluTanh,
        capacity_factor: 0.9,
        ..config(2)
    };
    use switch_moe::gpu::shaders::{MATMUL_BLOCKS, MATMUL_BLOCK_ROWS, ROW_LANES_CHOICES};
    for row_lanes in ROW_LANES_CHOICES {
        for block in MATMUL_BLOCKS {
            for rows in MATMUL_BLOCK_ROWS.into_iter().filter(|&rows| rows <= block) {
                let options = LayerOptions {
                    row_lanes: Some(row_lanes),
                    block_rows: Some(rows),
                    matmul_block: Some(block),
                    ..Default::default()
                };
                check_with_options(config.clone(), &weights, 290, 33, options.clone());
                check_with_options(config.clone(), &aligned, 290, 35, options);
            }
        }
    }
    let bad_lanes = LayerOptions {
        row_lanes: Some(3),
        ..Default::default()
    };
    assert!(MoeLayer::with_options(&gpu(), config.clone(), &weights, bad_lanes).is_err());
    let bad_block = LayerOptions {
        matmul_block: Some(12),
        ..Default::default()
    };
    assert!(MoeLayer::with_options(&gpu(), config.clone(), &weights, bad_block).is_err());
    let rows_past_block = LayerOptions {
        matmul_block: Some(8),
        block_rows: Some(16),
        ..Default::default()
    };
    assert!(MoeLayer::with_options(&gpu(), config, &weights, rows_past_block).is_err());
}

#[test]
fn dispatch_count_does_not_depend_on_experts() {
    let context = gpu();
    let small = MoeLayer::new(
        &context,
        config(1),
        &MoeWeights::random(shape(1, 8, 8), false, false, 1),
    )
    .unwrap();
    let large = MoeLayer::new(
        &context,
        config(1),
        &MoeWeights::random(shape(128, 8, 8), false, false, 1),
    )
    .unwrap();
    assert_eq!(
        small.dispatches_per_forward(),
        large.dispatches_per_forward()
    );
    assert_eq!(small.dispatches_per_forward(), 9);
}

#[test]
fn bit_identical_across_runs_and_layers() {
    let weights = MoeWeights::random(shape(8, 32, 48), false, true, 40);
    let config = MoeConfig {
        capacity_factor: 0.8,
        ..config(2)
    };
    let x = tokens(300, 32, 40);
    let context = gpu();
    let first = MoeLayer::new(&context, config.clone(), &weights).unwrap();
    let second = MoeLayer::new(&context, config, &weights).unwrap();
    let expected = first.forward(&x, &[300, 32]).unwrap();
    for _ in 0..20 {
        let again = first.forward(&x, &[300, 32]).unwrap();
        assert_eq!(bits(&again.y), bits(&expected.y));
        assert_eq!(again, expected);
    }
    let other = second.forward(&x, &[300, 32]).unwrap();
    assert_eq!(bits(&other.y), bits(&expected.y));
    assert_eq!(bits(&other.route_prob_sum), bits(&expected.route_prob_sum));
    assert_eq!(other, expected);
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn batches_of_changing_size_reuse_the_layer() {
    let weights = MoeWeights::random(shape(6, 16, 24), false, true, 50);
    let layer = MoeLayer::new(&gpu(), config(2), &weights).unwrap();
    for (i, num_tokens) in [300usize, 17, 300, 1, 500, 64].into_iter().enumerate() {
        let x = tokens(num_tokens, 16, 50 + i as u64);
        let output = layer.forward(&x, &[num_tokens, 16]).unwrap();
        let reference = cpu_forward(&config(2), &weights, &x, &[num_tokens, 16]);
        assert_matches_reference(&config(2), &weights, &x, &output, &reference);
    }
}

#[test]
fn non_finite_input_names_the_first_bad_token() {
    let weights = MoeWeights::random(shape(4, 8, 16), false, true, 60);
    let layer = MoeLayer::new(&gpu(), config(1), &weights).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = tokens(200, 8, 60);
        x[150 * 8 + 3] = bad;
        x[170 * 8] = bad;
        match layer.forward(&x, &[200, 8]) {
            Err(MoeError::NonFiniteInput { token }) => assert_eq!(token, 150),
            other => panic!("expected NonFiniteInput, got {other:?}"),
        }
    }
    // Finite input whose router logits overflow is rejected too, as by the CPU reference.
    let mut x = tokens(200, 8, 62);
    x[120 * 8..121 * 8].fill(3.0e38);
    let reference = switch_moe::cpu_reference::forward(&config(1), &weights, &x, &[200, 8]);
    assert!(
        matches!(reference, Err(MoeError::NonFiniteInput { token: 120 })),
        "the CPU reference should reject token 120, got {:?}",
        reference.map(|_| ())
    );
    match layer.forward(&x, &[200, 8]) {
        Err(MoeError::NonFiniteInput { token }) => assert_eq!(token, 120),
        other => panic!(
            "expected NonFiniteInput for overflowing logits, got {:?}",
            other.map(|_| ())
        ),
    }
    // The layer stays usable afterwards.
    let x = tokens(10, 8, 61);
    assert!(layer.forward(&x, &[10, 8]).is_ok());
}

#[test]
fn bad_shapes_are_errors() {
    let weights = MoeWeights::random(shape(4, 8, 16), false, true, 70);
    let layer = MoeLayer::new(&gpu(), config(1), &weights).unwrap();
    let x = tokens(10, 8, 70);
    for shape in [&[10usize, 9][..], &[80], &[5, 8], &[0, 8], &[2, 5, 8, 1]] {
        assert!(
            matches!(layer.forward(&x, shape), Err(MoeError::InputShape { .. })),
            "shape {shape:?} accepted"
        );
    }
    let grouped = MoeLayer::new(
        &gpu(),
        MoeConfig {
            group_size: Some(3),
            ..config(1)
        },
        &weights,
    )
    .unwrap();
    assert!(
        matches!(grouped.forward(&x, &[10, 8]), Err(MoeError::Config { ref key, .. }) if key == "group_size")
    );
}
