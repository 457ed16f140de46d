//! Property test: the GPU layer equals the CPU reference over random configs and shapes.
//! Small shapes keep a few hundred cases within CI's budget on the software adapter;
//! `PROPTEST_CASES` sets the number (default 200, and 24 on the GL backend: each case builds
//! its own matmul variant, and llvmpipe's GL compiler takes ~10 s for a 16×16-block one
//! where its Vulkan driver takes ~1.8 s, which made this test alone 6 minutes of a fresh
//! GL-only `cargo test`; the Vulkan run, CI's, keeps all 200).

mod common;

use common::*;
use proptest::prelude::*;
use switch_moe::{
    Activation, DropPolicy, GpuContext, LayerOptions, MoeConfig, MoeLayer, MoeWeights,
};

/// One random case: layer shape, config, tokens and seed.
#[derive(Clone, Debug)]
struct Case {
    num_experts: usize,
    d_model: usize,
    d_ff: usize,
    num_tokens: usize,
    config: MoeConfig,
    with_biases: bool,
    row_lanes: Option<u32>,
    seed: u64,
}

fn activation() -> impl Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::Relu),
        Just(Activation::Gelu),
        Just(Activation::GeluTanh),
        Just(Activation::Silu)
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=16, 1usize..=40, 1usize..=48, 1usize..=260)
        .prop_flat_map(|(num_experts, d_model, d_ff, num_tokens)| {
            // Group sizes that divide T: T itself or one of its divisors.
            let divisors: Vec<usize> = (1..=num_tokens).filter(|g| num_tokens % g == 0).collect();
            (
                Just((num_experts, d_model, d_ff, num_tokens)),
                1usize..=num_experts.min(4),
                proptest::option::of(proptest::sample::select(divisors)),
                (
                    0.05f64..3.0,
                    proptest::option::of(0usize..20),
                    any::<bool>(),
                ),
                (
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>(),
                    activation(),
                ),
                (
                    any::<bool>(),
                    proptest::option::of(proptest::sample::select(vec![1u32, 2, 4, 8])),
                    any::<u64>(),
                ),
            )
        })
        .prop_map(
            |(
                (num_experts, d_model, d_ff, num_tokens),
                top_k,
                group_size,
                (capacity_factor, expert_capacity, drop_tokens),
                (zero_policy, scale_by_prob, gated, normalize_top_k, activation),
                (with_biases, row_lanes, seed),
            )| Case {
                num_experts,
                d_model,
                d_ff,
                num_tokens,
                config: MoeConfig {
                    top_k,
                    capacity_factor,
                    expert_capacity,
                    group_size,
                    drop_tokens,
                    drop_policy: if zero_policy {
                        DropPolicy::Zero
                    } else {
                        DropPolicy::PassThrough
                    },
                    scale_by_prob,
                    activation,
                    gated,
                    normalize_top_k,
                    ..MoeConfig::default()
                },
                with_biases,
                row_lanes,
                seed,
            },
        )
}

/// Whether some token's top-k choice is a near-tie (probabilities within 1e-5 relative)
/// with the next expert in line: there the GPU may round the other way and both answers
/// are right, so such cases say nothing.
fn has_near_tie(case: &Case, weights: &MoeWeights, x: &[f32]) -> bool {
    let routing = switch_moe::cpu_reference::route_tokens(
        x,
        weights,
        switch_moe::Router::softmax(case.num_experts, false),
    );
    routing.gates.chunks_exact(case.num_experts).any(|sorted| {
        let k = case.config.top_k;
        (0..k.min(case.num_experts - 1)).any(|j| sorted[j] - sorted[j + 1] <= 1e-5 * sorted[j])
    })
}

/// Runs one case; returns false when it was skipped for a near-tie.
fn run_case(context: &GpuContext, case: &Case) -> bool {
    let weights = MoeWeights::random(
        shape(case.num_experts, case.d_model, case.d_ff),
        case.config.gated,
        case.with_biases,
        case.seed,
    );
    let x = tokens(case.num_tokens, case.d_model, case.seed);
    if has_near_tie(case, &weights, &x) {
        return false;
    }
    let shape = [case.num_tokens, case.d_model];
    // Both matmul blocks, whatever the adapter would pick: half the cases each.
    let blocks = switch_moe::gpu::shaders::MATMUL_BLOCKS;
    let options = LayerOptions {
        row_lanes: case.row_lanes,
        matmul_block: Some(blocks[(case.seed % blocks.len() as u64) as usize]),
        ..Default::default()
    };
    let layer =
        MoeLayer::with_options(context, case.config.clone(), &weights, options).expect("layer");
    let gpu_output = layer.forward(&x, &shape).expect("GPU forward");
    let cpu_output = cpu_forward(&case.config, &weights, &x, &shape);
    assert_matches_reference(&case.config, &weights, &x, &gpu_output, &cpu_output);
    true
}

#[test]
fn gpu_equals_cpu_on_random_configs_and_shapes() {
    let context = gpu();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if context.adapter.get_info().backend == wgpu::Backend::Gl {
            24
        } else {
            200
        });
    // A fixed generator: CI runs the same cases every time, so a pass is reproducible.
    let rng = proptest::test_runner::TestRng::deterministic_rng(
        proptest::test_runner::RngAlgorithm::ChaCha,
    );
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(config, rng);
    let run = std::cell::Cell::new(0u32);
    let skipped = std::cell::Cell::new(0u32);
    runner
        .run(&case(), |case| {
            run.set(run.get() + 1);
            if !run_case(&context, &case) {
                skipped.set(skipped.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    println!(
        "{} cases run, {} skipped for near-ties",
        run.get(),
        skipped.get()
    );
    assert!(
        skipped.get() * 10 <= run.get(),
        "too many near-tie cases: {} of {}",
        skipped.get(),
        run.get()
    );
}
