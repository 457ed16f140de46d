//! `bench --model-layers L`: what a model's worth of identical layers costs to build and run
//! once, built on one `GpuContext` (its layers share their pipelines) against each built with
//! `MoeLayer::from_device` (each compiling its own). The shared run goes first, so a
//! driver's shader cache can only favour the other.

use std::time::Instant;

use switch_moe::rng::SeededRng;
use switch_moe::{
    Activation, GpuContext, LayerOptions, LayerShape, MoeConfig, MoeLayer, MoeWeights,
};

use crate::Args;

/// Seconds to build `layers` layers (N 8, top-2 gated silu, D and F of `args`) and run each
/// once on T 256, with their pipelines shared or not.
fn build_and_run(context: &GpuContext, args: &Args, layers: usize, shared: bool) -> f64 {
    let config = MoeConfig {
        top_k: 2,
        gated: true,
        activation: Activation::Silu,
        drop_tokens: false,
        ..MoeConfig::default()
    };
    let shape = LayerShape {
        num_experts: 8,
        d_model: args.d_model,
        d_ff: args.d_ff,
    };
    let tokens = 256;
    let x = SeededRng::new(71).normal_vec(tokens * args.d_model);
    let start = Instant::now();
    let mut built = Vec::with_capacity(layers);
    for layer in 0..layers {
        let weights = MoeWeights::random(shape, true, true, layer as u64);
        let options = LayerOptions::default();
        let layer = if shared {
            MoeLayer::with_options(context, config.clone(), &weights, options)
        } else {
            let (device, queue) = (&context.device, &context.queue);
            MoeLayer::from_device(device, queue, config.clone(), &weights, options)
        }
        .expect("layer");
        drop(layer.forward(&x, &[tokens, args.d_model]).expect("forward"));
        // Kept, as a model keeps its layers.
        built.push(layer);
    }
    start.elapsed().as_secs_f64()
}

pub fn model_layers(context: &GpuContext, args: &Args, layers: usize) {
    println!(
        "{layers} identical layers (N 8, top-2 gated silu, D {}, F {}), each built and run \
         once on T 256:",
        args.d_model, args.d_ff
    );
    let shared = build_and_run(context, args, layers, true);
    let own = build_and_run(context, args, layers, false);
    println!(
        "on one context (pipelines shared) {shared:.2} s, each with its own pipelines \
         {own:.2} s: {:.1}×",
        own / shared
    );
}
