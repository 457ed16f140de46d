//! `bench --train`: a training step's two halves timed side by side in one run, for the
//! same weights and tokens:
//! - `grouped`: the real layer's training forward (`forward_train`) and `backward`;
//! - `dense`: one FFN (the same kernels, one expert) over the T·k tokens: the same expert
//!   FLOPs forward and backward with no routing spread, the floor an MoE layer should reach.
//!
//! Both run through the encoded calls (`encode_forward_train`, `encode_backward`) on
//! tensors already on the device, timed on the wall clock from encoding to the GPU being
//! done, with nothing read back (the host `backward` would also read back every weight's
//! gradient: N experts' for the MoE, one for the dense FFN). Every case runs dropless, so
//! both do the same expert FLOPs. The five timings (grouped forward, backward and AdamW
//! step, dense forward and backward) take turns, run by run. Then each kernel
//! of the grouped step alone (`MoeLayer::profile_training`), with the GFLOP/s of the
//! matmuls: the forward's two beside the backward's four.

use std::time::Instant;

use switch_moe::gpu::KernelTime;
use switch_moe::rng::SeededRng;
use switch_moe::{
    GpuContext, LayerOptions, LayerShape, LossCoefficients, MoeConfig, MoeLayer, MoeWeights,
    Optimizer,
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
    /// Median ms of the grouped training forward, backward, AdamW step; the dense ones.
    grouped_forward_ms: f64,
    grouped_backward_ms: f64,
    grouped_step_ms: f64,
    dense_forward_ms: f64,
    dense_backward_ms: f64,
    /// Bytes of the activations training keeps: the training forward's workspace and the
    /// backward's scratch; and of the pre-activations within the first.
    scratch_bytes: u64,
    pre_activation_bytes: u64,
    dispatches_per_backward: usize,
    /// Each kernel of the grouped step alone: name, ms, GFLOP/s (matmuls only).
    kernels: Vec<KernelRecord>,
}

/// One kernel of `MoeLayer::profile_training`.
#[derive(serde::Serialize)]
pub struct KernelRecord {
    name: &'static str,
    ms: f64,
    /// 2·multiply-adds per second / 1e9; absent for the kernels that are not matmuls.
    gflops: Option<f64>,
}

/// The grouped step's kernels, each the median of `runs` profiles (at least one).
fn kernel_records(
    layer: &MoeLayer,
    (tokens, d_model): (usize, usize),
    coefficients: LossCoefficients,
    runs: usize,
) -> Vec<KernelRecord> {
    let x = SeededRng::new(11).normal_vec(tokens * d_model);
    let dy = SeededRng::new(12).normal_vec(tokens * d_model);
    let profiles: Vec<Vec<KernelTime>> = (0..runs.max(1))
        .map(|_| {
            layer
                .profile_training(&x, &[tokens, d_model], &dy, coefficients)
                .unwrap_or_else(|e| panic!("profiling: {e}"))
        })
        .collect();
    (0..profiles[0].len())
        .map(|i| {
            let mut seconds: Vec<f64> = profiles.iter().map(|p| p[i].seconds).collect();
            seconds.sort_by(f64::total_cmp);
            let median = seconds[seconds.len() / 2];
            let kernel = &profiles[0][i];
            KernelRecord {
                name: kernel.name,
                ms: median * 1e3,
                gflops: (kernel.multiply_adds > 0)
                    .then(|| 2.0 * kernel.multiply_adds as f64 / median / 1e9),
            }
        })
        .collect()
}

fn print_kernels(kernels: &[KernelRecord]) {
    let line: Vec<String> = kernels
        .iter()
        .map(|k| match k.gflops {
            Some(g) => format!("{} {:.1} ms {:.1} GFLOP/s", k.name, k.ms, g),
            None => format!("{} {:.1} ms", k.name, k.ms),
        })
        .collect();
    println!("        kernels: {}", line.join(" | "));
}

/// A trainable layer, or the error saying why this device cannot hold one.
fn trainable(
    context: &GpuContext,
    config: &MoeConfig,
    weights: &MoeWeights,
) -> switch_moe::Result<MoeLayer> {
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    MoeLayer::with_options(context, config.clone(), weights, options)
}

/// A layer's training calls recorded into an encoder of the bench's own, with its tensors
/// on the device: a timing is encoding, submitting and waiting, with nothing read back.
struct Encoded<'a> {
    context: &'a GpuContext,
    layer: &'a MoeLayer,
    tokens: usize,
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    dy: wgpu::Buffer,
    dx: wgpu::Buffer,
}

impl<'a> Encoded<'a> {
    fn new(
        context: &'a GpuContext,
        layer: &'a MoeLayer,
        tokens: usize,
        d_model: usize,
        seed: u64,
    ) -> Self {
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let buffer = |values: Vec<f32>| {
            wgpu::util::DeviceExt::create_buffer_init(
                &context.device,
                &wgpu::util::BufferInitDescriptor {
                    label: Some("bench tensor"),
                    contents: bytemuck::cast_slice(&values),
                    usage,
                },
            )
        };
        let values = tokens * d_model;
        Encoded {
            context,
            layer,
            tokens,
            x: buffer(SeededRng::new(seed).normal_vec(values)),
            y: buffer(vec![0.0; values]),
            dy: buffer(SeededRng::new(seed + 1).normal_vec(values)),
            dx: buffer(vec![0.0; values]),
        }
    }

    /// Seconds of recording with `record`, submitting and waiting.
    fn run(&self, record: impl FnOnce(&mut wgpu::CommandEncoder)) -> f64 {
        let start = Instant::now();
        let mut encoder = self
            .context
            .device
            .create_command_encoder(&Default::default());
        record(&mut encoder);
        self.context.queue.submit([encoder.finish()]);
        self.context
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap_or_else(|e| panic!("waiting for the GPU: {e}"));
        start.elapsed().as_secs_f64()
    }

    fn forward_seconds(&self) -> f64 {
        self.run(|encoder| {
            self.layer
                .encode_forward_train(encoder, &self.x, &self.y, None, self.tokens)
                .unwrap_or_else(|e| panic!("forward_train: {e}"));
        })
    }

    /// A training forward (not timed), then the backward (timed).
    fn backward_seconds(&self, coefficients: LossCoefficients) -> f64 {
        self.forward_seconds();
        self.run(|encoder| {
            self.layer
                .encode_backward(encoder, &self.dy, &self.dx, coefficients)
                .unwrap_or_else(|e| panic!("backward: {e}"));
        })
    }

    /// A training forward and backward (not timed), then an AdamW step (timed: the
    /// optimizer over every parameter and the refresh of the forward's weights).
    fn step_seconds(&self, coefficients: LossCoefficients) -> f64 {
        self.backward_seconds(coefficients);
        self.run(|encoder| {
            self.layer
                .encode_step(encoder, &Optimizer::adam_w(1e-4))
                .unwrap_or_else(|e| panic!("step: {e}"));
        })
    }
}

pub fn train_sweep(context: &GpuContext, args: &Args) -> Vec<TrainRecord> {
    let (d_model, d_ff) = (args.d_model, args.d_ff);
    println!(
        "training step: encoded forward_train, backward and AdamW step (submit to done, nothing \
         read back), dropless; dense = one expert over T·k tokens; step/fwd = (fwd + bwd + step) / fwd"
    );
    println!(
        "{:>5} {:>6} {:>3} | {:>10} {:>10} {:>8} {:>9} {:>8} | {:>10} {:>10} | {:>12} {:>24}",
        "N",
        "T",
        "k",
        "fwd ms",
        "bwd ms",
        "bwd/fwd",
        "step ms",
        "step/fwd",
        "dense fwd",
        "dense bwd",
        "MoE / dense",
        "activations (pre-act.)"
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
                let layer = match trainable(context, &config, &weights) {
                    Ok(layer) => layer,
                    Err(error) => {
                        println!("{n:>5} {tokens:>6} {top_k:>3} | not trainable here: {error}");
                        continue;
                    }
                };
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
                let dense = trainable(context, &dense_config, &dense_weights)
                    .unwrap_or_else(|e| panic!("the dense FFN: {e}"));
                let coefficients = LossCoefficients {
                    aux: 0.01,
                    z: 0.001,
                };
                let grouped = Encoded::new(context, &layer, tokens, d_model, 7);
                let floor = Encoded::new(context, &dense, tokens * top_k, d_model, 9);
                let mut times = {
                    let mut forward = || grouped.forward_seconds();
                    let mut backward = || grouped.backward_seconds(coefficients);
                    let mut step = || grouped.step_seconds(coefficients);
                    let mut dense_forward = || floor.forward_seconds();
                    let mut dense_backward = || floor.backward_seconds(coefficients);
                    time_interleaved(
                        args.runs,
                        &mut [
                            &mut forward,
                            &mut backward,
                            &mut step,
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
                    grouped_step_ms: next(),
                    dense_forward_ms: next(),
                    dense_backward_ms: next(),
                    scratch_bytes: layer.training_forward_bytes().0
                        + layer.training_scratch_bytes(),
                    pre_activation_bytes: layer.training_forward_bytes().1,
                    dispatches_per_backward: layer.dispatches_per_backward(),
                    kernels: kernel_records(&layer, (tokens, d_model), coefficients, args.runs),
                };
                let grouped = record.grouped_forward_ms + record.grouped_backward_ms;
                let floor = record.dense_forward_ms + record.dense_backward_ms;
                let step = grouped + record.grouped_step_ms;
                println!(
                    "{:>5} {:>6} {:>3} | {:>10.2} {:>10.2} {:>8.2} {:>9.2} {:>8.2} | {:>10.2} {:>10.2} | {:>12.2} {:>10.1} MiB ({:.1} MiB)",
                    n,
                    tokens,
                    top_k,
                    record.grouped_forward_ms,
                    record.grouped_backward_ms,
                    record.grouped_backward_ms / record.grouped_forward_ms,
                    record.grouped_step_ms,
                    step / record.grouped_forward_ms,
                    record.dense_forward_ms,
                    record.dense_backward_ms,
                    grouped / floor,
                    record.scratch_bytes as f64 / (1 << 20) as f64,
                    record.pre_activation_bytes as f64 / (1 << 20) as f64
                );
                print_kernels(&record.kernels);
                records.push(record);
            }
        }
    }
    records
}
