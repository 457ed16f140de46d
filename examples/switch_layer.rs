//! The main job: builds a seeded Switch layer (or loads one), runs it on the best GPU
//! adapter, checks it against the CPU reference, and prints routing statistics and timings.
//!
//! cargo run --release --example switch_layer -- [--experts 8] [--tokens 4096]
//!     [--d-model 512] [--d-ff 2048] [--top-k 1] [--capacity-factor 1.25] [--weights FILE]

use std::process::ExitCode;
use std::time::Instant;

use switch_moe::rng::SeededRng;
use switch_moe::{
    cpu_reference, GpuContext, LayerShape, MoeConfig, MoeLayer, MoeOutput, MoeWeights, Naming,
};

const USAGE: &str = "usage: switch_layer [--experts 8] [--tokens 4096] [--d-model 512] \
                     [--d-ff 2048] [--top-k 1] [--capacity-factor 1.25] [--weights FILE]";

struct Args {
    shape: LayerShape,
    tokens: usize,
    top_k: usize,
    capacity_factor: f64,
    weights: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        shape: LayerShape {
            num_experts: 8,
            d_model: 512,
            d_ff: 2048,
        },
        tokens: 4096,
        top_k: 1,
        capacity_factor: 1.25,
        weights: None,
    };
    let mut rest = std::env::args().skip(1);
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--experts" => args.shape.num_experts = number()?,
            "--tokens" => args.tokens = number()?,
            "--d-model" => args.shape.d_model = number()?,
            "--d-ff" => args.shape.d_ff = number()?,
            "--top-k" => args.top_k = number()?,
            "--capacity-factor" => {
                args.capacity_factor = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?
            }
            "--weights" => args.weights = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
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
    if std::env::args().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message} ({USAGE})");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> switch_moe::Result<bool> {
    let weights = match &args.weights {
        Some(path) => MoeWeights::from_safetensors(path, Naming::Auto, None)?,
        None => MoeWeights::random(args.shape, false, true, 2024),
    };
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
    let x = SeededRng::new(7).normal_vec(args.tokens * d_model);
    let shape = [args.tokens, d_model];

    let context = GpuContext::new()?;
    println!("adapter: {}", context.adapter_summary());
    println!(
        "layer: {num_experts} experts, d_model {d_model}, d_ff {d_ff}, {} tokens, top-{}, capacity factor {}",
        args.tokens, config.top_k, config.capacity_factor
    );
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

    // The first forward allocates the scratch buffers and warms the pipelines.
    let gpu = layer.forward(&x, &shape)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let again = layer.forward(&x, &shape)?;
        times.push(start.elapsed().as_secs_f64());
        assert_eq!(again, gpu, "GPU forward is not deterministic");
    }
    times.sort_by(f64::total_cmp);
    let gpu_seconds = times[times.len() / 2];

    let start = Instant::now();
    let cpu = cpu_reference::forward(&config, &weights, &x, &shape)?;
    let cpu_seconds = start.elapsed().as_secs_f64();

    println!("\nexpert   routed     kept");
    let widest = gpu.counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    for e in 0..num_experts {
        let bar = "#".repeat((40.0 * gpu.counts[e] as f64 / widest).round() as usize);
        println!("{e:>6} {:>8} {:>8}  {bar}", gpu.counts[e], gpu.kept[e]);
    }
    let assignments = args.tokens * config.top_k;
    println!(
        "dropped: {} of {assignments} assignments ({:.2}%)",
        gpu.n_dropped,
        100.0 * gpu.n_dropped as f64 / assignments as f64
    );
    println!(
        "aux_loss: {:.6} (CPU {:.6})   z_loss: {:.6} (CPU {:.6})",
        gpu.aux_loss, cpu.aux_loss, gpu.z_loss, cpu.z_loss
    );

    let flops = 2.0
        * assignments as f64
        * d_model as f64
        * d_ff as f64
        * if config.gated { 3.0 } else { 2.0 };
    println!(
        "time per forward: GPU {:.2} ms (median of 3, {:.1} GFLOP/s in the experts), CPU reference {:.2} ms",
        gpu_seconds * 1e3,
        flops / gpu_seconds / 1e9,
        cpu_seconds * 1e3
    );
    println!("dispatches per forward: {}", layer.dispatches_per_forward());
    println!(
        "GPU scratch memory: {:.1} MiB",
        layer.scratch_bytes() as f64 / (1 << 20) as f64
    );

    let (max_abs, max_rel, route_mismatches) = compare(&gpu, &cpu);
    // Worst-case f32 accumulation error is about (2·D·1.13·(1 or 2) + 2·F)·2⁻²⁴ relative to
    // the magnitudes involved; allow that, times 4 for magnitudes above max |y|.
    let gated = if config.gated { 2.0 } else { 1.0 };
    let tolerance =
        4.0 * (2.26 * gated * d_model as f64 + 2.0 * d_ff as f64 + 16.0) * f32::EPSILON as f64
            / 2.0;
    let ok = route_mismatches == 0
        && gpu.counts == cpu.counts
        && gpu.kept == cpu.kept
        && gpu.n_dropped == cpu.n_dropped
        && (max_rel as f64) <= tolerance;
    println!(
        "check against the CPU reference: max abs error {max_abs:.3e}, max rel error {max_rel:.3e} (tolerance {tolerance:.1e}), \
         route mismatches {route_mismatches}: {}",
        if ok { "OK" } else { "MISMATCH" }
    );
    Ok(ok)
}
