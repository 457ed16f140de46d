//! The main job: builds a seeded Switch layer (or loads one from safetensors or GGUF), runs
//! it on the best GPU adapter in the weight format asked for, checks it against the CPU
//! reference, and prints routing statistics, weight memory and timings.
//!
//! cargo run --release --example switch_layer -- [--experts 8] [--tokens 4096]
//!     [--d-model 512] [--d-ff 2048] [--top-k 1] [--capacity-factor 1.25]
//!     [--weight-format f32|f16|bf16|q8_0|q4_0|q4_k|q6_k] [--weights FILE [--prefix P]]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use switch_moe::rng::SeededRng;
use switch_moe::{
    cpu_reference, GpuContext, LayerShape, MoeConfig, MoeLayer, MoeOutput, MoeWeights, Naming,
    WeightFormat,
};

/// Expert FLOPs up to which the CPU reference checks the whole batch (a few seconds here);
/// beyond, it checks the first tokens, run as a batch of their own on both sides.
const FULL_CHECK_FLOPS: f64 = 2e10;
/// GPU forwards are timed until three have run or this many seconds have passed.
const TIMING_SECONDS: f64 = 10.0;

#[derive(Parser)]
#[command(
    about = "Runs a seeded (or loaded) MoE layer on the GPU and checks it against the CPU reference"
)]
struct Args {
    /// Experts of the seeded layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Tokens in the batch, one capacity group [default: 4096, or the most one pass of
    /// the device holds when fewer]
    #[arg(long)]
    tokens: Option<usize>,
    /// d_model of the seeded layer.
    #[arg(long, default_value_t = 512)]
    d_model: usize,
    /// d_ff of the seeded layer.
    #[arg(long, default_value_t = 2048)]
    d_ff: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 1)]
    top_k: usize,
    #[arg(long, default_value_t = 1.25)]
    capacity_factor: f64,
    /// The expert weights' format on the GPU: f32 weights are converted (quantized as ggml
    /// does); weights loaded in another format keep it unless this names one.
    #[arg(long)]
    weight_format: Option<WeightFormat>,
    /// A weight file (safetensors in any naming, or GGUF) instead of the seeded layer.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The layer's prefix in the weight file (`blk.3.` in a GGUF model).
    #[arg(long)]
    prefix: Option<String>,
}

/// Max |gpu - cpu| over y and its normwise relative size, with route disagreements.
fn compare(gpu: &MoeOutput, cpu: &MoeOutput) -> (f32, f32, usize) {
    let max_abs = gpu
        .y
        .iter()
        .zip(&cpu.y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let scale = cpu
        .y
        .iter()
        .map(|v| v.abs())
        .fold(0.0, f32::max)
        .max(f32::MIN_POSITIVE);
    let route_mismatches = gpu
        .routes
        .iter()
        .zip(&cpu.routes)
        .filter(|(a, b)| a != b)
        .count();
    (max_abs, max_abs / scale, route_mismatches)
}

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

fn load_weights(args: &Args) -> switch_moe::Result<MoeWeights> {
    let Some(path) = &args.weights else {
        let shape = LayerShape {
            num_experts: args.experts,
            d_model: args.d_model,
            d_ff: args.d_ff,
        };
        return Ok(MoeWeights::random(shape, false, true, 2024));
    };
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
        .is_ok_and(|()| switch_moe::weights::is_gguf(&magic));
    if is_gguf {
        Ok(MoeWeights::from_gguf(path, args.prefix.as_deref())?.0)
    } else {
        MoeWeights::from_safetensors(path, Naming::Auto, args.prefix.as_deref())
    }
}

fn run(args: Args) -> switch_moe::Result<bool> {
    let start = Instant::now();
    let weights = load_weights(&args)?;
    // Quantize once here, so that the CPU reference decodes the very weights the GPU holds.
    let weights = match args.weight_format {
        Some(format) if format != weights.w1.format => weights.converted(format)?,
        _ => weights,
    };
    let prepare_seconds = start.elapsed().as_secs_f64();
    let LayerShape {
        num_experts,
        d_model,
        d_ff,
    } = weights.shape;
    let config = MoeConfig {
        top_k: args.top_k,
        capacity_factor: args.capacity_factor,
        gated: weights.w3.is_some(),
        ..MoeConfig::default()
    };
    let context = GpuContext::new()?;
    println!("adapter: {}", context.adapter_summary());
    // SWITCH_MOE_ROW_LANES, SWITCH_MOE_BLOCK_ROWS and SWITCH_MOE_MATMUL_BLOCK force the
    // matmul tile shape, for tuning.
    let knob = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let options = switch_moe::LayerOptions {
        row_lanes: knob("SWITCH_MOE_ROW_LANES"),
        block_rows: knob("SWITCH_MOE_BLOCK_ROWS"),
        matmul_block: knob("SWITCH_MOE_MATMUL_BLOCK"),
        ..Default::default()
    };
    let layer = MoeLayer::with_options(&context, config.clone(), &weights, options)?;
    // All tokens form one capacity group, which cannot be split into chunks: by default,
    // as many as one pass holds.
    let tokens = match args.tokens {
        Some(tokens) => tokens,
        None => {
            let fits = layer.max_tokens_per_pass();
            if fits < 4096 {
                let tokens = 1 << fits.max(1).ilog2();
                println!(
                    "tokens: {tokens} (a capacity group of 4096 would not fit one pass of this device)"
                );
                tokens
            } else {
                4096
            }
        }
    };
    println!(
        "layer: {num_experts} experts, d_model {d_model}, d_ff {d_ff}, {tokens} tokens, top-{}, capacity factor {}",
        config.top_k, config.capacity_factor
    );
    let x = SeededRng::new(7).normal_vec(tokens * d_model);
    let shape = [tokens, d_model];
    let [w1_format, _, w2_format] = layer.weight_formats();
    let formats = if w1_format == w2_format {
        w1_format.to_string()
    } else {
        format!("{w1_format}, w2 {w2_format}")
    };
    println!(
        "weight memory: {:.1} MiB ({formats}; f32 would take {:.1} MiB); prepared in {prepare_seconds:.1} s",
        layer.weight_bytes() as f64 / (1 << 20) as f64,
        f32_weight_bytes(&weights) as f64 / (1 << 20) as f64
    );

    // The first forward allocates the scratch buffers and warms the pipelines.
    let gpu = layer.forward(&x, &shape)?;
    let mut times = Vec::new();
    let timing = Instant::now();
    while times.len() < 3 && (times.is_empty() || timing.elapsed().as_secs_f64() < TIMING_SECONDS) {
        let start = Instant::now();
        let again = layer.forward(&x, &shape)?;
        times.push(start.elapsed().as_secs_f64());
        assert_eq!(again, gpu, "GPU forward is not deterministic");
    }
    times.sort_by(f64::total_cmp);
    let gpu_seconds = times[times.len() / 2];

    println!("\nexpert   routed     kept");
    let widest = gpu.counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    for e in 0..num_experts {
        let bar = "#".repeat((40.0 * gpu.counts[e] as f64 / widest).round() as usize);
        println!("{e:>6} {:>8} {:>8}  {bar}", gpu.counts[e], gpu.kept[e]);
    }
    let assignments = tokens * config.top_k;
    println!(
        "dropped: {} of {assignments} assignments ({:.2}%)",
        gpu.n_dropped,
        100.0 * gpu.n_dropped as f64 / assignments as f64
    );

    let flops_per_token = 2.0
        * config.top_k as f64
        * d_model as f64
        * d_ff as f64
        * if config.gated { 3.0 } else { 2.0 };
    // The whole batch when the CPU reference can afford it; else its first tokens as a
    // batch of their own (capacity then counts that batch), on the GPU and the CPU alike.
    let check_tokens = ((FULL_CHECK_FLOPS / flops_per_token) as usize).clamp(1, tokens);
    let (checked, check_x) = if check_tokens == tokens {
        (gpu.clone(), &x[..])
    } else {
        let check_x = &x[..check_tokens * d_model];
        (layer.forward(check_x, &[check_tokens, d_model])?, check_x)
    };
    let start = Instant::now();
    let cpu = cpu_reference::forward(&config, &weights, check_x, &[check_tokens, d_model])?;
    let cpu_seconds = start.elapsed().as_secs_f64();
    if check_tokens == tokens {
        println!(
            "aux_loss: {:.6} (CPU {:.6})   z_loss: {:.6} (CPU {:.6})",
            gpu.aux_loss, cpu.aux_loss, gpu.z_loss, cpu.z_loss
        );
    } else {
        println!("aux_loss: {:.6}   z_loss: {:.6}", gpu.aux_loss, gpu.z_loss);
    }
    let cpu_per_batch = cpu_seconds * tokens as f64 / check_tokens as f64;
    println!(
        "time per forward: GPU {:.2} ms ({} of {}, {:.1} GFLOP/s in the experts), CPU reference {:.2} ms{}",
        gpu_seconds * 1e3,
        if times.len() == 3 { "median" } else { "min" },
        times.len(),
        flops_per_token * tokens as f64 / gpu_seconds / 1e9,
        cpu_per_batch * 1e3,
        if check_tokens == tokens { "" } else { " (scaled from the checked tokens)" }
    );
    println!("dispatches per forward: {}", layer.dispatches_per_forward());
    println!(
        "GPU scratch memory: {:.1} MiB",
        layer.scratch_bytes() as f64 / (1 << 20) as f64
    );

    let (max_abs, max_rel, route_mismatches) = compare(&checked, &cpu);
    // Worst-case f32 accumulation error is about (2·D·1.13·(1 or 2) + 2·F)·2⁻²⁴ relative to
    // the magnitudes involved; allow that, times 4 for magnitudes above max |y|.
    let gated = if config.gated { 2.0 } else { 1.0 };
    let tolerance =
        4.0 * (2.26 * gated * d_model as f64 + 2.0 * d_ff as f64 + 16.0) * f32::EPSILON as f64
            / 2.0;
    let ok = route_mismatches == 0
        && checked.counts == cpu.counts
        && checked.kept == cpu.kept
        && checked.n_dropped == cpu.n_dropped
        && (max_rel as f64) <= tolerance;
    let what = if check_tokens == tokens {
        String::from("check against the CPU reference")
    } else {
        format!(
            "check against the CPU reference (first {check_tokens} tokens, a batch of their own)"
        )
    };
    println!(
        "{what}: max abs error {max_abs:.3e}, max rel error {max_rel:.3e} (tolerance {tolerance:.1e}), \
         route mismatches {route_mismatches}: {}",
        if ok { "OK" } else { "MISMATCH" }
    );
    Ok(ok)
}

/// Bytes the expert matrices, router and biases would take in f32.
fn f32_weight_bytes(weights: &MoeWeights) -> usize {
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = weights.shape;
    let matrices = if weights.w3.is_some() { 3 } else { 2 };
    let biases = [&weights.router_bias, &weights.b1, &weights.b2, &weights.b3];
    4 * (matrices * n * d * f + n * d)
        + 4 * biases
            .iter()
            .map(|b| b.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}
