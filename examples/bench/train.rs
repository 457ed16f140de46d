//! `bench --train`: a training step's two halves timed side by side in one run, for the
//! same weights and tokens:
//! - `grouped`: the real layer's training forward (`forward_train`) and `backward`;
//! - `dense`: one FFN (the same kernels, one expert) over the T·k tokens: the same expert
//!   FLOPs forward and backward with no routing spread, the floor an MoE layer should reach.
//!
//! Both are host calls timed on the wall clock: x or dy uploaded, the dispatches, and the
//! read-back (y and the statistics; x's and every weight's gradient), so the grouped
//! backward reads back N experts' gradients where the dense one reads back one. Every case
//! runs dropless, so both do the same expert FLOPs. Each variant's forward and backward
//! take turns with the other's, run by run.

use std::time::Instant;

use switch_moe::rng::SeededRng;
use switch_moe::{
    GpuContext, LayerOptions, LayerShape, LossCoefficients, MoeConfig, MoeLayer, MoeWeights,
};

use crate::{time_interleaved, Args};

/// One measured case of `bench --train`.
#[derive(serde::Serialize)]
pub struct TrainRecord {
    n_experts: usize,
    tokens: usize,
    top_k: usize,
    d_model: usize,
    d_ff: usize,
    /// Median ms of the grouped training forward, backward; the dense ones.
    grouped_forward_ms: f64,
    grouped_backward_ms: f64,
    dense_forward_ms: f64,
    dense_backward_ms: f64,
    /// Bytes of the forward's and the backward's scratch (activation memory).
    scratch_bytes: u64,
    dispatches_per_backward: usize,
}

fn trainable(context: &GpuContext, config: &MoeConfig, weights: &MoeWeights) -> MoeLayer {
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    MoeLayer::with_options(context, config.clone(), weights, options)
        .unwrap_or_else(|e| panic!("building a trainable layer: {e}"))
}

pub fn train_sweep(context: &GpuContext, args: &Args) -> Vec<TrainRecord> {
    let (d_model, d_ff) = (args.d_model, args.d_ff);
    println!(
        "training step: forward_train and backward (wall time with transfers), dropless; \
         dense = one expert over T·k tokens"
    );
    println!(
        "{:>5} {:>6} {:>3} | {:>10} {:>10} {:>8} | {:>10} {:>10} | {:>12} {:>10}",
        "N",
        "T",
        "k",
        "fwd ms",
        "bwd ms",
        "bwd/fwd",
        "dense fwd",
        "dense bwd",
        "MoE / dense",
        "scratch"
    );
    let mut records = Vec::new();
    for &n in &args.experts {
        for &tokens in &args.tokens {
            for &top_k in args.top_k.iter().filter(|&&k| k <= n) {
                let config = MoeConfig {
                    top_k,
                    drop_tokens: false,
                    ..MoeConfig::default()
                };
                let shape = LayerShape {
                    num_experts: n,
                    d_model,
                    d_ff,
                };
                let weights = MoeWeights::random(shape, false, true, 5);
                let layer = trainable(context, &config, &weights);
                let dense_config = MoeConfig {
                    top_k: 1,
                    drop_tokens: false,
                    ..MoeConfig::default()
                };
                let dense_weights = MoeWeights::random(
                    LayerShape {
                        num_experts: 1,
                        ..shape
                    },
                    false,
                    true,
                    6,
                );
                let dense = trainable(context, &dense_config, &dense_weights);
                let x = SeededRng::new(7).normal_vec(tokens * d_model);
                let dy = SeededRng::new(8).normal_vec(tokens * d_model);
                let dense_tokens = tokens * top_k;
                let dense_x = SeededRng::new(9).normal_vec(dense_tokens * d_model);
                let dense_dy = SeededRng::new(10).normal_vec(dense_tokens * d_model);
                let coefficients = LossCoefficients {
                    aux: 0.01,
                    z: 0.001,
                };
                let seconds = |run: &mut dyn FnMut()| {
                    let start = Instant::now();
                    run();
                    start.elapsed().as_secs_f64()
                };
                let shape_of = |t: usize| [t, d_model];
                let mut times = {
                    let mut forward = || {
                        seconds(&mut || {
                            layer.forward_train(&x, &shape_of(tokens)).unwrap();
                        })
                    };
                    // Each backward needs its own forward just before it: timed apart.
                    let mut backward = || {
                        layer.forward_train(&x, &shape_of(tokens)).unwrap();
                        seconds(&mut || {
                            layer.backward(&dy, coefficients).unwrap();
                        })
                    };
                    let mut dense_forward = || {
                        seconds(&mut || {
                            dense
                                .forward_train(&dense_x, &shape_of(dense_tokens))
                                .unwrap();
                        })
                    };
                    let mut dense_backward = || {
                        dense
                            .forward_train(&dense_x, &shape_of(dense_tokens))
                            .unwrap();
                        seconds(&mut || {
                            dense.backward(&dense_dy, coefficients).unwrap();
                        })
                    };
                    time_interleaved(
                        args.runs,
                        &mut [
                            &mut forward,
                            &mut backward,
                            &mut dense_forward,
                            &mut dense_backward,
                        ],
                    )
                }
                .into_iter()
                .map(|(median, _)| median);
                let mut next = || times.next().unwrap_or(f64::NAN);
                let record = TrainRecord {
                    n_experts: n,
                    tokens,
                    top_k,
                    d_model,
                    d_ff,
                    grouped_forward_ms: next(),
                    grouped_backward_ms: next(),
                    dense_forward_ms: next(),
                    dense_backward_ms: next(),
                    scratch_bytes: layer.scratch_bytes() + layer.training_scratch_bytes(),
                    dispatches_per_backward: layer.dispatches_per_backward(),
                };
                let grouped = record.grouped_forward_ms + record.grouped_backward_ms;
                let floor = record.dense_forward_ms + record.dense_backward_ms;
                println!(
                    "{:>5} {:>6} {:>3} | {:>10.2} {:>10.2} {:>8.2} | {:>10.2} {:>10.2} | {:>12.2} {:>8.1} MiB",
                    n,
                    tokens,
                    top_k,
                    record.grouped_forward_ms,
                    record.grouped_backward_ms,
                    record.grouped_backward_ms / record.grouped_forward_ms,
                    record.dense_forward_ms,
                    record.dense_backward_ms,
                    grouped / floor,
                    record.scratch_bytes as f64 / (1 << 20) as f64
                );
                records.push(record);
            }
        }
    }
    records
}
