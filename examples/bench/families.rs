//! `bench --families`: the families' variants timed in one run (SPEC "The families people
//! run"), each against the same layer without the variant, the variants taking turns run by
//! run:
//! - routing share: a forward against `forward_experts` on the routes and gates that forward
//!   chose (the same experts' work without route_tokens and reduce_router_stats), for a
//!   DeepSeek-V3-shaped router (N = 256, k = 8, sigmoid, score bias, 8 groups keep 4,
//!   normalised × 2.5) and a gpt-oss-shaped layer (N = 32, k = 4, router and expert
//!   biases, swiglu_oai);
//! - the shared expert: DeepSeek's layer with its shared expert against without, and the
//!   bound `1.1 · (1 + shared FLOPs / routed FLOPs)`;
//! - Llama 4's gate on the experts' input in training: a training step (forward_train and
//!   backward) of a Llama-4-shaped layer (N = 16, k = 1, sigmoid, a shared expert) with the
//!   gate on the input against the same layer gating the outputs.
//!
//! Every time is the wall time of the blocking call, the upload of x and the read-back of
//! y included, alike for all variants (a layer with a shared expert does not encode into
//! caller buffers, so this is the one method every variant shares).

use std::time::Instant;

use switch_moe::rng::SeededRng;
use switch_moe::weights::SharedExpert;
use switch_moe::{
    Activation, GateOn, GpuContext, LayerOptions, LayerShape, LossCoefficients, MoeConfig,
    MoeLayer, MoeWeights, RouterScore,
};

use crate::{time_interleaved, Args};

fn deepseek_config() -> MoeConfig {
    MoeConfig {
        top_k: 8,
        router_score: RouterScore::Sigmoid,
        n_group: Some(8),
        topk_group: Some(4),
        normalize_top_k: true,
        routed_scaling_factor: 2.5,
        drop_tokens: false,
        gated: true,
        activation: Activation::Silu,
        ..MoeConfig::default()
    }
}

fn gpt_oss_config() -> MoeConfig {
    MoeConfig {
        top_k: 4,
        normalize_top_k: true,
        drop_tokens: false,
        gated: true,
        activation: Activation::SwigluOai,
        ..MoeConfig::default()
    }
}

/// Llama 4's MoE layer (Scout: 16 experts, top-1 sigmoid gates on the experts' input).
fn llama4_config() -> MoeConfig {
    MoeConfig {
        top_k: 1,
        router_score: RouterScore::Sigmoid,
        gate_on: GateOn::Input,
        drop_tokens: false,
        gated: true,
        activation: Activation::Silu,
        ..MoeConfig::default()
    }
}

fn seconds(run: impl FnOnce()) -> f64 {
    let start = Instant::now();
    run();
    start.elapsed().as_secs_f64()
}

/// Forward and forward_experts (on the forward's own routes) of one layer: ms (median, min)
/// of each and the routing share `1 − experts / forward`.
fn routing_share(
    context: &GpuContext,
    config: &MoeConfig,
    weights: &MoeWeights,
    tokens: usize,
    runs: usize,
) -> ((f64, f64), (f64, f64), f64) {
    let d = weights.shape.d_model;
    let x = SeededRng::new(91).normal_vec(tokens * d);
    let layer = MoeLayer::new(context, config.clone(), weights).expect("layer");
    let routed = layer.forward(&x, &[tokens, d]).expect("forward");
    let shape = [tokens, d];
    let mut forward = || seconds(|| drop(layer.forward(&x, &shape).expect("forward")));
    let mut experts = || {
        seconds(|| {
            drop(
                layer
                    .forward_experts(&x, &shape, &routed.routes, &routed.gates)
                    .expect("forward_experts"),
            )
        })
    };
    let times = time_interleaved(runs, &mut [&mut forward, &mut experts]);
    let share = 1.0 - times[1].0 / times[0].0;
    (times[0], times[1], share)
}

pub fn families_sweep(context: &GpuContext, args: &Args) {
    let tokens = *args.tokens.first().unwrap_or(&2048);
    let (d, f) = (args.d_model, args.d_ff);
    println!(
        "families: T {tokens}, D {d}, expert F {f}; wall time of the blocking call (upload and \
         read-back included), median (min) of {} runs",
        args.runs
    );

    // DeepSeek-V3's router over 256 experts, and its shared expert (Fs = F).
    let deepseek_shape = LayerShape {
        num_experts: 256,
        d_model: d,
        d_ff: f,
    };
    let mut routed = MoeWeights::random(deepseek_shape, true, false, 92);
    routed.score_bias = Some(SeededRng::new(93).uniform_vec(256, 0.05));
    let (fwd, experts, share) =
        routing_share(context, &deepseek_config(), &routed, tokens, args.runs);
    println!(
        "deepseek-v3 routing (N 256, k 8, 8 groups keep 4): forward {:.1} ({:.1}) ms, experts \
         alone {:.1} ({:.1}) ms: routing {:.1}% of the forward",
        fwd.0,
        fwd.1,
        experts.0,
        experts.1,
        100.0 * share
    );
    let mut with_shared = routed.clone();
    with_shared.shared = Some(SharedExpert::random((d, f), true, false, false, 94));
    let x = SeededRng::new(95).normal_vec(tokens * d);
    let shape = [tokens, d];
    let plain = MoeLayer::new(context, deepseek_config(), &routed).expect("layer");
    let shared = MoeLayer::new(context, deepseek_config(), &with_shared).expect("layer");
    let mut without = || seconds(|| drop(plain.forward(&x, &shape).expect("forward")));
    let mut with = || seconds(|| drop(shared.forward(&x, &shape).expect("forward")));
    let times = time_interleaved(args.runs, &mut [&mut without, &mut with]);
    // FLOPs per token: routed k·F (times the three projections), shared Fs.
    let bound = 1.1 * (1.0 + f as f64 / (8 * f) as f64);
    println!(
        "deepseek-v3 shared expert (Fs = F): without {:.1} ({:.1}) ms, with {:.1} ({:.1}) ms: \
         {:.3}× (bound {:.3}×)",
        times[0].0,
        times[0].1,
        times[1].0,
        times[1].1,
        times[1].0 / times[0].0,
        bound
    );

    // gpt-oss: 32 experts, top-4, biases everywhere, swiglu_oai.
    let gpt_oss_shape = LayerShape {
        num_experts: 32,
        d_model: d,
        d_ff: f,
    };
    let weights = MoeWeights::random(gpt_oss_shape, true, true, 96);
    let (fwd, experts, share) =
        routing_share(context, &gpt_oss_config(), &weights, tokens, args.runs);
    println!(
        "gpt-oss routing (N 32, k 4, swiglu_oai, biases): forward {:.1} ({:.1}) ms, experts \
         alone {:.1} ({:.1}) ms: routing {:.1}% of the forward",
        fwd.0,
        fwd.1,
        experts.0,
        experts.1,
        100.0 * share
    );

    // Llama 4 in training: the gate on the experts' input against on their outputs.
    let llama4_shape = LayerShape {
        num_experts: 16,
        d_model: d,
        d_ff: f,
    };
    let mut weights = MoeWeights::random(llama4_shape, true, false, 97);
    weights.shared = Some(SharedExpert::random((d, f), true, false, false, 98));
    let dy = SeededRng::new(99).normal_vec(tokens * d);
    let trainable = |config: MoeConfig| {
        let options = LayerOptions {
            trainable: true,
            ..LayerOptions::default()
        };
        MoeLayer::with_options(context, config, &weights, options).expect("layer")
    };
    let on_input = trainable(llama4_config());
    let on_output = trainable(MoeConfig {
        gate_on: GateOn::Output,
        ..llama4_config()
    });
    let step = |layer: &MoeLayer| {
        seconds(|| {
            layer.forward_train(&x, &shape).expect("forward_train");
            drop(
                layer
                    .backward(&dy, LossCoefficients::default())
                    .expect("backward"),
            );
        })
    };
    let mut output_gate = || step(&on_output);
    let mut input_gate = || step(&on_input);
    let times = time_interleaved(args.runs, &mut [&mut output_gate, &mut input_gate]);
    println!(
        "llama 4 training step (N 16, k 1, sigmoid, shared expert): gate on the outputs \
         {:.1} ({:.1}) ms, on the inputs {:.1} ({:.1}) ms: {:.3}×",
        times[0].0,
        times[0].1,
        times[1].0,
        times[1].1,
        times[1].0 / times[0].0
    );
}
