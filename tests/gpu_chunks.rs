//! Batches larger than the device allows run in exact chunks: of whole capacity groups, or
//! of any tokens when nothing is dropped. Tested with a lowered binding limit on small
//! data, and with a million tokens against the CPU reference.

mod common;

use common::*;
use switch_moe::{LayerOptions, MoeConfig, MoeError, MoeLayer, MoeWeights};

fn capped(bytes: u64) -> LayerOptions {
    LayerOptions {
        max_activation_binding_bytes: Some(bytes),
        ..Default::default()
    }
}

fn check_chunked(config: MoeConfig, num_tokens: usize, cap: u64, seed: u64) {
    let weights = MoeWeights::random(shape(6, 16, 24), false, true, seed);
    let x = tokens(num_tokens, 16, seed);
    let layer = MoeLayer::with_options(&gpu(), config.clone(), &weights, capped(cap)).unwrap();
    let output = layer.forward(&x, &[num_tokens, 16]).unwrap();
    let reference = cpu_forward(&config, &weights, &x, &[num_tokens, 16]);
    assert_matches_reference(&config, &weights, &x, &output, &reference);
    // The chunked path really ran: the scratch holds a chunk, not the whole batch.
    let whole = MoeLayer::new(&gpu(), config, &weights).unwrap();
    whole.forward(&x, &[num_tokens, 16]).unwrap();
    assert!(
        2 * layer.scratch_bytes() <= whole.scratch_bytes(),
        "scratch {} bytes against {} unchunked: the batch was not chunked",
        layer.scratch_bytes(),
        whole.scratch_bytes()
    );
}

#[test]
fn dropless_batches_chunk_anywhere() {
    let config = MoeConfig {
        drop_tokens: false,
        ..config(2)
    };
    // x alone is 1000·16·4 = 64000 bytes; 16 KiB bindings force chunks of ~250 tokens.
    check_chunked(config, 1000, 16 << 10, 1);
}

#[test]
fn dropping_batches_chunk_at_group_boundaries() {
    let config = MoeConfig {
        group_size: Some(100),
        capacity_factor: 0.8,
        ..config(2)
    };
    // One group of 100 needs ~55 KB of expert rows (tall tiles for these narrow widths).
    check_chunked(config, 1000, 64 << 10, 2);
}

#[test]
fn a_single_capacity_group_too_large_is_an_error() {
    let weights = MoeWeights::random(shape(6, 16, 24), false, true, 3);
    let x = tokens(1000, 16, 3);
    let layer = MoeLayer::with_options(&gpu(), config(1), &weights, capped(16 << 10)).unwrap();
    match layer.forward(&x, &[1000, 16]) {
        Err(error @ MoeError::DeviceLimit { .. }) => assert!(error.is_device_error()),
        other => panic!("expected a device limit error, got {other:?}"),
    }
}

#[test]
fn non_finite_token_is_found_in_a_later_chunk() {
    let weights = MoeWeights::random(shape(6, 16, 24), false, true, 4);
    let mut x = tokens(1000, 16, 4);
    x[777 * 16 + 3] = f32::NAN;
    let config = MoeConfig {
        drop_tokens: false,
        ..config(1)
    };
    let layer = MoeLayer::with_options(&gpu(), config, &weights, capped(16 << 10)).unwrap();
    assert!(matches!(
        layer.forward(&x, &[1000, 16]),
        Err(MoeError::NonFiniteInput { token: 777 })
    ));
}

#[test]
fn a_million_tokens() {
    // D = 64, F = 128, N = 16: x alone is 256 MB, beyond a 128 MiB binding, so this runs in
    // chunks of whole groups of 1000 tokens on most adapters.
    let num_tokens = 1_000_000;
    let weights = MoeWeights::random(shape(16, 64, 128), false, true, 5);
    let x = tokens(num_tokens, 64, 5);
    let config = MoeConfig {
        group_size: Some(1000),
        ..config(1)
    };
    let layer = MoeLayer::new(&gpu(), config.clone(), &weights).unwrap();
    let output = layer.forward(&x, &[num_tokens, 64]).unwrap();
    let reference = cpu_forward(&config, &weights, &x, &[num_tokens, 64]);

    // Among a million tokens a few are near-ties that f32 rounding may send either way:
    // every disagreement must be one (within 1e-5 relative), and rare.
    let disagreements: Vec<usize> = (0..num_tokens)
        .filter(|&t| output.routes[t] != reference.routes[t])
        .collect();
    assert!(
        disagreements.len() <= 10,
        "{} tokens routed differently",
        disagreements.len()
    );
    for &t in &disagreements {
        let routing = switch_moe::cpu_reference::route_tokens(
            &x[t * 64..(t + 1) * 64],
            &weights,
            switch_moe::Router::softmax(1, false),
        );
        let (gpu_choice, cpu_choice) = (output.routes[t] as usize, reference.routes[t] as usize);
        let (p_gpu, p_cpu) = (routing.probs[gpu_choice], routing.probs[cpu_choice]);
        assert!(
            (p_cpu - p_gpu).abs() <= 1e-5 * p_cpu,
            "token {t}: {p_gpu} vs {p_cpu} is no near-tie"
        );
    }
    let moved: u32 = output
        .counts
        .iter()
        .zip(&reference.counts)
        .map(|(a, b)| a.abs_diff(*b))
        .sum();
    assert!(
        moved as usize <= 2 * disagreements.len(),
        "counts differ by more than the near-ties explain"
    );
    assert_eq!(output.counts.iter().sum::<u32>(), num_tokens as u32);

    // Every 997th token outside the groups with a near-tie: y within the usual bound.
    let tainted_groups: Vec<usize> = disagreements.iter().map(|t| t / 1000).collect();
    let sample: Vec<usize> = (0..num_tokens)
        .step_by(997)
        .filter(|t| !tainted_groups.contains(&(t / 1000)))
        .collect();
    let pick = |values: &[f32]| -> Vec<f32> {
        sample
            .iter()
            .flat_map(|&t| values[t * 64..(t + 1) * 64].to_vec())
            .collect()
    };
    let (y_gpu, y_cpu) = (pick(&output.y), pick(&reference.y));
    let bound = (2.0 * ACTIVATION_LIPSCHITZ * 66.0 + 2.0 * 130.0 + 16.0) * U;
    let scale = y_cpu.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    assert_close("y (sampled tokens)", &y_gpu, &y_cpu, |_| {
        8.0 * bound * scale
    });
    let relative = (num_tokens as f64) * U * 64.0;
    assert_close(
        "route_prob_sum",
        &output.route_prob_sum,
        &reference.route_prob_sum,
        |e| relative * reference.route_prob_sum[e] as f64,
    );
}

/// A trainable layer with bindings capped at `cap` bytes, which chunks batches.
fn trainable_capped(config: &MoeConfig, weights: &MoeWeights, cap: Option<u64>) -> MoeLayer {
    let options = LayerOptions {
        trainable: true,
        max_activation_binding_bytes: cap,
        ..Default::default()
    };
    MoeLayer::with_options(&gpu(), config.clone(), weights, options).unwrap()
}

fn check_chunked_training(config: MoeConfig, num_tokens: usize, cap: u64, seed: u64) {
    use switch_moe::cpu_backward::{self, LossCoefficients};
    use switch_moe::rng::SeededRng;
    let weights = MoeWeights::random(shape(6, 16, 24), config.gated, true, seed);
    let x = tokens(num_tokens, 16, seed);
    let dy = SeededRng::new(seed ^ 0xC4).normal_vec(x.len());
    // The aux and z losses need the whole batch's counts and T in every chunk.
    let coefficients = LossCoefficients { aux: 0.05, z: 0.01 };
    let shape = [num_tokens, 16];
    let chunked = trainable_capped(&config, &weights, Some(cap));
    let output = chunked.forward_train(&x, &shape).unwrap();
    let reference = cpu_forward(&config, &weights, &x, &shape);
    assert_matches_reference(&config, &weights, &x, &output, &reference);
    let gradients = chunked.backward(&dy, coefficients).unwrap();
    let cpu = cpu_backward::backward(&config, &weights, &x, &shape, &dy, coefficients).unwrap();
    let depth = 16 + 24 + num_tokens * config.top_k + 6;
    assert_gradients_close("chunked backward", &gradients, &cpu, depth);
    // Equal to one pass within the same bounds, and rerun bit for bit.
    let whole = trainable_capped(&config, &weights, None);
    whole.forward_train(&x, &shape).unwrap();
    let one_pass = whole.backward(&dy, coefficients).unwrap();
    assert_gradients_close("chunked against one pass", &gradients, &one_pass, depth);
    chunked.forward_train(&x, &shape).unwrap();
    assert_eq!(
        chunked.backward(&dy, coefficients).unwrap(),
        gradients,
        "rerun"
    );
    // The chunked path really ran: the backward's scratch holds a chunk, not the batch.
    assert!(
        2 * chunked.training_scratch_bytes() <= whole.training_scratch_bytes(),
        "backward scratch {} bytes against {} in one pass: the batch was not chunked",
        chunked.training_scratch_bytes(),
        whole.training_scratch_bytes()
    );
    // A step after the chunked backward moves the weights as after the one-pass one.
    chunked.step(&switch_moe::Optimizer::adam_w(0.01)).unwrap();
    whole.step(&switch_moe::Optimizer::adam_w(0.01)).unwrap();
    let (a, b) = (
        chunked.trained_weights().unwrap(),
        whole.trained_weights().unwrap(),
    );
    let moved = |w: &MoeWeights| w.router_weight.clone();
    assert_close("router after a step", &moved(&a), &moved(&b), |_| 1e-5);
    // Traces and the encoded backward cover one pass: clear errors.
    chunked.forward_train(&x, &shape).unwrap();
    assert!(matches!(
        chunked.backward_with_trace(&dy, coefficients),
        Err(MoeError::Training { .. })
    ));
}

#[test]
fn training_batches_beyond_one_pass_run_in_chunks() {
    // Dropless, top-2, gated: chunks anywhere.
    let dropless = MoeConfig {
        drop_tokens: false,
        gated: true,
        ..config(2)
    };
    check_chunked_training(dropless, 400, 16 << 10, 11);
    // With capacity groups of 100 and dropping: chunks of whole groups.
    let grouped = MoeConfig {
        group_size: Some(100),
        capacity_factor: 0.8,
        ..config(2)
    };
    check_chunked_training(grouped, 400, 64 << 10, 12);
}
