//! `bench`: the seed's question, measured. In one process, on one adapter, for the same
//! weights and tokens, times:
//! - `grouped` — the real layer: every expert in one dispatch per projection;
//! - `loop` — the seed's approach on the GPU: the same kernels dispatched once per expert
//!   (the weights split into one shard per expert, so N up and N down dispatches);
//! - `dense` — one FFN (the same kernels, one expert) over T·k tokens: the same FLOPs with
//!   no routing spread, the floor an MoE layer should approach;
//! - `copy` — a plain buffer copy of the weights the experts read, for bandwidth;
//! - `cpu` — the CPU reference (when it would take under 10 s).
//!
//! Every variant runs dropless (`drop_tokens: false`) so all do the same expert FLOPs.
//! `grouped`, `loop` and `dense` take turns run by run (a slow spell of a shared machine
//! then lands on all three rather than on one).
//! GPU times come from timestamp queries when the adapter has them; otherwise from the wall
//! time of encoding, submitting and waiting for a forward of a batch already on the device.
//!
//! With `--formats f32,bf16,q8_0,q4_0,q4_k`, it times instead the same weights stored in
//! each format (see `format_sweep`); with `--train`, a training step's forward and backward
//! against a dense FFN's (see train.rs); with `--families`, the families' routing share of
//! the forward and the shared expert's cost (see families.rs); with `--model-layers L`, L
//! identical layers built on one context against each with its own pipelines (layers.rs).
//!
//! cargo run --release --example bench -- [--quick] [--json FILE] [--svg FILE]
//!     [--experts 1,8,32,64,128] [--tokens 512,4096,16384] [--top-k 1,2] [--skew 1,4]
//!     [--d-model 512] [--d-ff 2048] [--runs 5] [--formats f32,bf16,q8_0,q4_0,q4_k] [--train]
//!     [--families] [--model-layers 24]
//! cargo run --release --example bench -- --replot FILE.json --svg FILE.svg

mod families;
mod layers;
mod train;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::Parser;
use plotters::prelude::*;
use switch_moe::rng::SeededRng;
use switch_moe::{
    cpu_reference, GpuContext, LayerOptions, LayerShape, MoeConfig, MoeLayer, MoeWeights,
    WeightFormat,
};

#[derive(Parser)]
#[command(
    about = "Times the grouped layer against the per-expert loop, a dense FFN, a buffer \
                   copy and the CPU reference; or, with --formats, each stored weight format"
)]
struct Args {
    /// A short run (N = 8, 64; T = 2048; d_model 256, d_ff 1024).
    #[arg(long)]
    quick: bool,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128")]
    experts: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "512,4096,16384")]
    tokens: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    top_k: Vec<usize>,
    /// Expert 0 gets about this many times its share of first choices.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    skew: Vec<usize>,
    #[arg(long, default_value_t = 512)]
    d_model: usize,
    #[arg(long, default_value_t = 2048)]
    d_ff: usize,
    /// Timed runs per variant (after a warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Instead of the sweep: the same weights in each of these formats (f32 first as the
    /// baseline), decode (T = 1, 4, 16, 64 with N = 8 and 64) and prefill (128 tokens per
    /// expert) against a buffer copy.
    #[arg(long, value_delimiter = ',')]
    formats: Option<Vec<WeightFormat>>,
    /// Instead of the sweep: forward_train and backward against a dense FFN's (train.rs).
    #[arg(long)]
    train: bool,
    /// Instead of the sweep: the families' routing share of the forward and the shared
    /// expert's cost (families.rs; T 2048, D 512, F 512 unless given).
    #[arg(long)]
    families: bool,
    /// Instead of the sweep: this many identical layers built and run once, on one context
    /// (pipelines shared) and each with its own (layers.rs).
    #[arg(long)]
    model_layers: Option<usize>,
    #[arg(long)]
    json: Option<String>,
    #[arg(long)]
    svg: Option<String>,
    /// Plot the records of this JSON file instead of measuring.
    #[arg(long)]
    replot: Option<String>,
}

impl Args {
    /// The arguments with `--quick` applied.
    fn resolved(mut self) -> Self {
        if self.families {
            let quick = self.quick;
            self.tokens = vec![if quick { 512 } else { 2048 }];
            self.d_model = if quick { 128 } else { 512 };
            self.d_ff = if quick { 128 } else { 512 };
        } else if self.quick && self.train {
            self.experts = vec![8];
            self.tokens = vec![512];
            self.top_k = vec![1];
            self.d_model = 128;
            self.d_ff = 512;
        } else if self.quick {
            self.experts = vec![8, 64];
            self.tokens = vec![2048];
            self.d_model = 256;
            self.d_ff = 1024;
        }
        self.runs = self.runs.max(1);
        self
    }
}

/// One measured variant of one case.
struct Record {
    variant: &'static str,
    /// The expert weights' stored format.
    format: WeightFormat,
    n_experts: usize,
    tokens: usize,
    top_k: usize,
    skew: usize,
    ms_median: f64,
    ms_min: f64,
    gflops: f64,
    dispatches: usize,
}

/// Median and min of `runs` timings after one warm-up, in ms.
fn time_runs(runs: usize, mut once: impl FnMut() -> f64) -> (f64, f64) {
    once();
    let times: Vec<f64> = (0..runs).map(|_| once() * 1e3).collect();
    median_and_min(times)
}

/// Median and min of `runs` timings of each of `variants` after one warm-up each, in ms.
/// The variants take turns run by run, so that a slow spell of a shared machine lands on
/// all of them rather than on one.
pub(crate) fn time_interleaved(
    runs: usize,
    variants: &mut [&mut dyn FnMut() -> f64],
) -> Vec<(f64, f64)> {
    let mut times = vec![Vec::with_capacity(runs); variants.len()];
    for variant in variants.iter_mut() {
        variant();
    }
    for _ in 0..runs {
        for (variant, times) in variants.iter_mut().zip(&mut times) {
            times.push(variant() * 1e3);
        }
    }
    times.into_iter().map(median_and_min).collect()
}

fn median_and_min(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

/// Set once a forward came back without GPU timestamps: later ones skip asking for them.
static NO_TIMESTAMPS: AtomicBool = AtomicBool::new(false);
/// Which of the three ways of timing a forward were used, for the footer.
static TIMED_BY_TIMESTAMPS: AtomicBool = AtomicBool::new(false);
static TIMED_BY_SUBMIT: AtomicBool = AtomicBool::new(false);
static TIMED_BY_FORWARD: AtomicBool = AtomicBool::new(false);

/// A batch of tokens already on the device, and room for its output.
struct DeviceBatch {
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    tokens: usize,
}

fn device_batch(context: &GpuContext, x: &[f32], tokens: usize) -> DeviceBatch {
    use wgpu::util::DeviceExt;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let x = context
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bench x"),
            contents: bytemuck::cast_slice(x),
            usage,
        });
    let y = context.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench y"),
        size: x.size(),
        usage,
        mapped_at_creation: false,
    });
    DeviceBatch { x, y, tokens }
}

/// Seconds of one forward: GPU timestamps around its compute pass where the driver gives
/// them; otherwise the wall time of encoding it for a batch already on the device,
/// submitting and waiting (like the copy it is compared with); for a batch the layer can
/// only run in chunks, the wall time of `forward()`, upload and read-back included.
fn time_forward(
    context: &GpuContext,
    layer: &MoeLayer,
    x: &[f32],
    shape: &[usize],
    batch: &DeviceBatch,
) -> f64 {
    if !NO_TIMESTAMPS.load(Ordering::Relaxed) {
        let (_, gpu_seconds) = layer.forward_timed(x, shape).expect("forward");
        if let Some(seconds) = gpu_seconds {
            TIMED_BY_TIMESTAMPS.store(true, Ordering::Relaxed);
            return seconds;
        }
        NO_TIMESTAMPS.store(true, Ordering::Relaxed);
    }
    let start = Instant::now();
    let mut encoder = context.device.create_command_encoder(&Default::default());
    if layer
        .encode_forward(&mut encoder, &batch.x, &batch.y, None, batch.tokens)
        .is_ok()
    {
        context.queue.submit([encoder.finish()]);
        context
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("poll");
        TIMED_BY_SUBMIT.store(true, Ordering::Relaxed);
        return start.elapsed().as_secs_f64();
    }
    let start = Instant::now();
    layer.forward(x, shape).expect("forward");
    TIMED_BY_FORWARD.store(true, Ordering::Relaxed);
    start.elapsed().as_secs_f64()
}

/// Wall seconds of copying `bytes` between two device buffers.
fn time_copy(
    context: &GpuContext,
    source: &wgpu::Buffer,
    target: &wgpu::Buffer,
    bytes: u64,
) -> f64 {
    let start = Instant::now();
    let mut encoder = context.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(source, 0, target, 0, bytes);
    context.queue.submit([encoder.finish()]);
    context
        .device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    start.elapsed().as_secs_f64()
}

/// A router bias on expert 0 that gives it about `skew` times its share of first choices.
fn skew_router(weights: &mut MoeWeights, x: &[f32], skew: usize) {
    let n = weights.shape.num_experts;
    if skew <= 1 || n < 2 {
        return;
    }
    let target = (skew as f64 / n as f64).min(1.0);
    let d = weights.shape.d_model;
    let sample = &x[..x.len().min(512 * d)];
    let share = |weights: &MoeWeights| {
        let routing =
            cpu_reference::route_tokens(sample, weights, switch_moe::Router::softmax(1, false));
        routing.routes.iter().filter(|&&e| e == 0).count() as f64 / routing.routes.len() as f64
    };
    let (mut low, mut high) = (0.0f32, 30.0f32);
    for _ in 0..24 {
        let mid = 0.5 * (low + high);
        weights
            .router_bias
            .as_mut()
            .expect("random weights have biases")[0] = mid;
        if share(weights) < target {
            low = mid;
        } else {
            high = mid;
        }
    }
}

fn main() {
    env_logger::init();
    let args = Args::parse().resolved();
    if let Some(json) = &args.replot {
        let svg = args.svg.as_deref().unwrap_or("bench.svg");
        let (records, adapter) = read_records(json);
        write_plot(svg, &records, &adapter).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("wrote {svg} from {json}");
        return;
    }
    let context = GpuContext::new().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2);
    });
    let adapter = context.adapter_summary();
    println!(
        "adapter: {adapter}; median and min of {} runs after a warm-up",
        args.runs
    );
    println!(
        "d_model {}, d_ff {}, dropless, relu FFN",
        args.d_model, args.d_ff
    );

    if args.families {
        families::families_sweep(&context, &args);
        return;
    }
    if let Some(layers) = args.model_layers {
        layers::model_layers(&context, &args, layers);
        return;
    }
    if args.train {
        let records = train::train_sweep(&context, &args);
        if let Some(path) = &args.json {
            let json = serde_json::json!({ "adapter": adapter.to_string(), "train": records });
            std::fs::write(
                path,
                serde_json::to_string_pretty(&json).unwrap_or_default(),
            )
            .unwrap_or_else(|e| panic!("{path}: {e}"));
            println!("wrote {path}");
        }
        return;
    }
    let records = match &args.formats {
        Some(formats) => format_sweep(&context, &args, formats),
        None => sweep(&context, &args),
    };
    let (d_model, d_ff) = (args.d_model, args.d_ff);

    let methods = [
        (
            &TIMED_BY_TIMESTAMPS,
            "GPU timestamps around the forward's compute pass",
        ),
        (
            &TIMED_BY_SUBMIT,
            "the driver gave no GPU timestamps: wall time of encoding, submitting and waiting \
             for a forward of a batch already on the device (as the copy is timed)",
        ),
        (
            &TIMED_BY_FORWARD,
            "batches the layer runs in chunks: wall time of forward(), upload of x and \
             read-back included",
        ),
    ];
    for (used, method) in methods {
        if used.load(Ordering::Relaxed) {
            println!("times: {method}");
        }
    }
    if let Some(path) = &args.json {
        let list: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "variant": r.variant, "format": r.format.name(), "n_experts": r.n_experts,
                    "tokens": r.tokens,
                    "d_model": d_model, "d_ff": d_ff, "top_k": r.top_k, "skew": r.skew,
                    "ms_median": r.ms_median, "ms_min": r.ms_min, "gflops": r.gflops,
                    "dispatches": r.dispatches, "adapter": adapter.name, "backend": adapter.backend,
                })
            })
            .collect();
        let json = serde_json::to_string_pretty(&list).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::fs::write(path, json).unwrap_or_else(|e| panic!("{path}: {e}"));
        eprintln!("wrote {path}");
    }
    if let Some(path) = &args.svg {
        write_plot(path, &records, &adapter.name).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("wrote {path}");
    }
}

/// The grouped layer against the loop, dense, copy and CPU variants, case by case.
fn sweep(context: &GpuContext, args: &Args) -> Vec<Record> {
    let (d_model, d_ff) = (args.d_model, args.d_ff);
    let mut records = Vec::new();
    let cases: Vec<(usize, usize, usize, usize)> = args
        .tokens
        .iter()
        .flat_map(|&t| args.experts.iter().map(move |&n| (t, n)))
        .flat_map(|(t, n)| {
            args.top_k
                .iter()
                .filter(move |&&k| k <= n)
                .map(move |&k| (t, n, k))
        })
        .flat_map(|(t, n, k)| {
            args.skew
                .iter()
                .filter(move |&&s| s == 1 || n >= 2 * s)
                .map(move |&s| (t, n, k, s))
        })
        .collect();
    println!(
        "\n{:>8} {:>4} {:>6} {:>2} {:>4} {:>10} {:>10} {:>9} {:>5} {:>8}",
        "variant", "N", "T", "k", "skew", "median ms", "min ms", "GFLOP/s", "disp", "/ dense"
    );
    for (index, &(tokens, n_experts, top_k, skew)) in cases.iter().enumerate() {
        eprintln!(
            "[{}/{}] N={n_experts} T={tokens} k={top_k} skew={skew}",
            index + 1,
            cases.len()
        );
        let x = SeededRng::new(tokens as u64).normal_vec(tokens * d_model);
        let shape = LayerShape {
            num_experts: n_experts,
            d_model,
            d_ff,
        };
        let mut weights = MoeWeights::random(shape, false, true, 17);
        skew_router(&mut weights, &x, skew);
        let config = MoeConfig {
            top_k,
            drop_tokens: false,
            ..MoeConfig::default()
        };
        let flops = 2.0 * 2.0 * (tokens * top_k) as f64 * d_model as f64 * d_ff as f64;
        let mut case_records = Vec::new();
        let mut record = |variant, (ms_median, ms_min): (f64, f64), dispatches| {
            case_records.push(Record {
                variant,
                format: WeightFormat::F32,
                n_experts,
                tokens,
                top_k,
                skew,
                ms_median,
                ms_min,
                gflops: flops / (ms_median * 1e-3) / 1e9,
                dispatches,
            });
        };

        let grouped = MoeLayer::new(context, config.clone(), &weights).expect("grouped layer");
        let per_expert = LayerOptions {
            max_experts_per_shard: Some(1),
            ..Default::default()
        };
        let looped = MoeLayer::with_options(context, config.clone(), &weights, per_expert)
            .expect("loop layer");
        let dense_weights = MoeWeights::random(
            LayerShape {
                num_experts: 1,
                d_model,
                d_ff,
            },
            false,
            true,
            17,
        );
        let dense_config = MoeConfig {
            top_k: 1,
            drop_tokens: false,
            ..MoeConfig::default()
        };
        let dense = MoeLayer::new(context, dense_config, &dense_weights).expect("dense layer");

        let xs = [tokens, d_model];
        let batch = device_batch(context, &x, tokens);
        let dense_x = SeededRng::new(5).normal_vec(tokens * top_k * d_model);
        let dense_shape = [tokens * top_k, d_model];
        let dense_batch = device_batch(context, &dense_x, tokens * top_k);
        // Before the timed runs, whose batches on the device take a second set of buffers.
        let output = grouped.forward(&x, &xs).expect("forward");
        let scratch_mib = grouped.scratch_bytes() as f64 / (1 << 20) as f64;
        let timings = time_interleaved(
            args.runs,
            &mut [
                &mut || time_forward(context, &grouped, &x, &xs, &batch),
                &mut || time_forward(context, &looped, &x, &xs, &batch),
                &mut || time_forward(context, &dense, &dense_x, &dense_shape, &dense_batch),
            ],
        );
        record("grouped", timings[0], grouped.dispatches_per_forward());
        record("loop", timings[1], looped.dispatches_per_forward());
        record("dense", timings[2], dense.dispatches_per_forward());
        drop((grouped, looped, dense));

        // The weights the grouped layer must read: W1 and W2 of every expert that got tokens.
        let used = output.kept.iter().filter(|&&k| k > 0).count();
        let one_expert = (d_model * d_ff * 4) as u64;
        let bytes = 2 * used as u64 * one_expert;
        let buffer = |label| {
            context.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let (source, target) = (buffer("copy source"), buffer("copy target"));
        let copy = time_runs(args.runs, || time_copy(context, &source, &target, bytes));

        let cpu_estimate_s = flops / 10e9;
        if cpu_estimate_s < 10.0 {
            record(
                "cpu",
                time_runs(args.runs.min(3), || {
                    let start = Instant::now();
                    cpu_reference::forward(&config, &weights, &x, &xs).expect("cpu forward");
                    start.elapsed().as_secs_f64()
                }),
                0,
            );
        } else {
            eprintln!("  cpu skipped: about {cpu_estimate_s:.0} s per forward");
        }

        let dense_ms = case_records
            .iter()
            .find(|r| r.variant == "dense")
            .map_or(f64::NAN, |r| r.ms_median);
        for r in &case_records {
            println!(
                "{:>8} {:>4} {:>6} {:>2} {:>4} {:>10.2} {:>10.2} {:>9.1} {:>5} {:>8.2}",
                r.variant,
                r.n_experts,
                r.tokens,
                r.top_k,
                r.skew,
                r.ms_median,
                r.ms_min,
                r.gflops,
                r.dispatches,
                r.ms_median / dense_ms
            );
        }
        let grouped_ms = case_records[0].ms_median;
        println!(
            "{:>8}  weights read {:.1} MiB: copy {:.2} ms ({:.1} GB/s), grouped reads them at {:.1} GB/s; \
             {} tokens per used expert; scratch {:.1} MiB",
            "copy",
            bytes as f64 / (1 << 20) as f64,
            copy.0,
            bytes as f64 / (copy.0 * 1e-3) / 1e9,
            bytes as f64 / (grouped_ms * 1e-3) / 1e9,
            tokens * top_k / used.max(1),
            scratch_mib,
        );
        records.extend(case_records);
    }
    records
}

/// Bytes of one expert's W1 and W2 as stored in `format`.
fn stored_expert_bytes(format: WeightFormat, d_model: usize, d_ff: usize) -> u64 {
    (2 * d_model * d_ff / format.block_values() * format.block_bytes()) as u64
}

/// The same layer with its expert weights in each of `formats` (quantized on upload from
/// one f32 layer; f32 always runs, as the baseline), formats taking turns run by run:
/// - decode: T = 1, 4, 16, 64 tokens with N = 8 and 64 (few tokens per expert: a forward
///   reads each used expert's weights once, so time follows stored bytes), against a copy
///   of the used experts' f32 bytes timed in the same run;
/// - prefill: 128 tokens per expert (N = 8, T = 1024): arithmetic-bound, where decoding
///   must cost little.
fn format_sweep(context: &GpuContext, args: &Args, formats: &[WeightFormat]) -> Vec<Record> {
    let (d_model, d_ff) = (args.d_model, args.d_ff);
    let mut formats = formats.to_vec();
    formats.retain(|&f| f != WeightFormat::F32);
    formats.insert(0, WeightFormat::F32);
    let (experts, tokens): (&[usize], &[usize]) = if args.quick {
        (&[8], &[1, 16])
    } else {
        (&[8, 64], &[1, 4, 16, 64])
    };
    let mut cases: Vec<(&'static str, usize, usize)> = experts
        .iter()
        .flat_map(|&n| tokens.iter().map(move |&t| ("decode", n, t)))
        .collect();
    cases.push(("prefill", 8, 1024));
    println!(
        "\n{:>8} {:>4} {:>5} {:>6} {:>6} {:>10} {:>10} {:>9} {:>10} {:>11} {:>7}",
        "phase",
        "N",
        "T",
        "T/exp",
        "format",
        "median ms",
        "min ms",
        "read MiB",
        "read GB/s",
        "copy GB/s",
        "/ f32"
    );
    let mut records = Vec::new();
    for (index, &(phase, n_experts, tokens)) in cases.iter().enumerate() {
        eprintln!(
            "[{}/{}] {phase} N={n_experts} T={tokens}",
            index + 1,
            cases.len()
        );
        let shape = LayerShape {
            num_experts: n_experts,
            d_model,
            d_ff,
        };
        let weights = MoeWeights::random(shape, false, true, 17);
        let x = SeededRng::new(tokens as u64).normal_vec(tokens * d_model);
        let config = MoeConfig {
            drop_tokens: false,
            ..MoeConfig::default()
        };
        let layers: Vec<MoeLayer> = formats
            .iter()
            .map(|&format| {
                let options = LayerOptions {
                    weight_format: Some(format),
                    ..Default::default()
                };
                MoeLayer::with_options(context, config.clone(), &weights, options)
                    .unwrap_or_else(|e| panic!("{format} layer: {e}"))
            })
            .collect();
        let xs = [tokens, d_model];
        let batch = device_batch(context, &x, tokens);
        let output = layers[0].forward(&x, &xs).expect("forward");
        let used = output.kept.iter().filter(|&&k| k > 0).count() as u64;
        let mut variants: Vec<Box<dyn FnMut() -> f64 + '_>> = layers
            .iter()
            .map(|layer| {
                let (x, xs, batch) = (&x, &xs, &batch);
                Box::new(move || time_forward(context, layer, x, xs, batch))
                    as Box<dyn FnMut() -> f64>
            })
            .collect();
        let mut refs: Vec<&mut dyn FnMut() -> f64> = variants
            .iter_mut()
            .map(|v| v.as_mut() as &mut dyn FnMut() -> f64)
            .collect();
        let timings = time_interleaved(args.runs, &mut refs);
        drop(refs);
        drop(variants);

        let f32_bytes = used * stored_expert_bytes(WeightFormat::F32, d_model, d_ff);
        let buffer = |label| {
            context.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: f32_bytes,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let (source, target) = (buffer("copy source"), buffer("copy target"));
        let copy = time_runs(args.runs, || {
            time_copy(context, &source, &target, f32_bytes)
        });
        let copy_gbs = f32_bytes as f64 / (copy.0 * 1e-3) / 1e9;

        let flops = 2.0 * 2.0 * tokens as f64 * d_model as f64 * d_ff as f64;
        let f32_ms = timings[0].0;
        for ((&format, layer), &(ms_median, ms_min)) in formats.iter().zip(&layers).zip(&timings) {
            let read = used * stored_expert_bytes(format, d_model, d_ff);
            println!(
                "{phase:>8} {n_experts:>4} {tokens:>5} {:>6} {:>6} {ms_median:>10.2} {ms_min:>10.2} {:>9.1} {:>10.2} {copy_gbs:>11.2} {:>7.2}",
                tokens as u64 / used.max(1),
                format.name(),
                read as f64 / (1 << 20) as f64,
                read as f64 / (ms_median * 1e-3) / 1e9,
                ms_median / f32_ms
            );
            records.push(Record {
                variant: phase,
                format,
                n_experts,
                tokens,
                top_k: 1,
                skew: 1,
                ms_median,
                ms_min,
                gflops: flops / (ms_median * 1e-3) / 1e9,
                dispatches: layer.dispatches_per_forward(),
            });
        }
    }
    records
}

/// Records and adapter name from a `--json` file.
fn read_records(path: &str) -> (Vec<Record>, String) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let values: Vec<serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let number = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let variant = |name: &str| -> &'static str {
        ["grouped", "loop", "dense", "cpu", "decode", "prefill"]
            .into_iter()
            .find(|v| *v == name)
            .unwrap_or("other")
    };
    let adapter = values
        .first()
        .and_then(|v| v["adapter"].as_str())
        .unwrap_or("")
        .to_string();
    let records = values
        .iter()
        .map(|v| Record {
            variant: variant(v["variant"].as_str().unwrap_or("")),
            format: v["format"]
                .as_str()
                .and_then(|f| f.parse().ok())
                .unwrap_or(WeightFormat::F32),
            n_experts: number(v, "n_experts") as usize,
            tokens: number(v, "tokens") as usize,
            top_k: number(v, "top_k") as usize,
            skew: number(v, "skew") as usize,
            ms_median: number(v, "ms_median"),
            ms_min: number(v, "ms_min"),
            gflops: number(v, "gflops"),
            dispatches: number(v, "dispatches") as usize,
        })
        .collect();
    (records, adapter)
}

/// The records as a log-log chart of time per forward: for a format sweep, against tokens
/// (decode cases), one line per format and N; otherwise against N, one line per variant
/// and token count (top-1 uniform routing, or the first top-k/skew measured).
fn write_plot(path: &str, records: &[Record], adapter: &str) -> Result<(), String> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut add =
        |label: String, x: f64, ms: f64| match series.iter_mut().find(|(l, _)| *l == label) {
            Some((_, points)) => points.push((x, ms)),
            None => series.push((label, vec![(x, ms)])),
        };
    let Some(first) = records.first() else {
        return Err("no records to plot".to_string());
    };
    let (title, x_label) = if records.iter().any(|r| r.variant == "decode") {
        for r in records.iter().filter(|r| r.variant == "decode") {
            add(
                format!("{} N={}", r.format.name(), r.n_experts),
                r.tokens as f64,
                r.ms_median,
            );
        }
        (
            "Decode: time per forward by weight format",
            "tokens T (log)",
        )
    } else {
        let shown = records.iter().filter(|r| {
            r.top_k == first.top_k && r.skew == first.skew && !matches!(r.variant, "cpu" | "other")
        });
        for r in shown {
            add(
                format!("{} T={}", r.variant, r.tokens),
                r.n_experts as f64,
                r.ms_median,
            );
        }
        ("Time per forward against experts", "experts N (log)")
    };
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (x_min, x_max, y_min, y_max) = points.fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    let error = |e: &dyn std::fmt::Display| format!("{path}: {e}");
    let root = SVGBackend::new(path, (960, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let caption = format!(
        "{title} ({}, top-{}, skew {}) — {adapter}",
        first.variant, first.top_k, first.skew
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_min * 0.9..x_max * 1.1).log_scale(),
            (y_min * 0.8..y_max * 1.25).log_scale(),
        )
        .map_err(|e| error(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("ms per forward (log)")
        .y_labels(12)
        .light_line_style(WHITE)
        .y_label_formatter(&|ms| format!("{ms:.2}"))
        .draw()
        .map_err(|e| error(&e))?;
    for (index, (label, points)) in series.iter_mut().enumerate() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(
                LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(3),
            )
            .map_err(|e| error(&e))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))
}
