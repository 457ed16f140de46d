//! `train`: trains a Switch layer (top-1, capacity 1.25, dropping with pass-through) on the
//! GPU on a task where routing matters, with the load-balancing and z losses on.
//!
//! cargo run --release --example train [-- --steps 400 --resume trained_moe.safetensors]
//!
//! The task: tokens come from a mixture of `--experts` Gaussian clusters, and each cluster
//! has its own target map (`target = A_c·x`, with A_c random per cluster): one expert per
//! cluster can fit it, a layer that mixes clusters cannot. The loss is
//! `½·mean((y − target)²) + α·aux_loss + β·z_loss`, optimised with AdamW on the GPU
//! (forward_train, backward, step). At the end: the per-expert load of a held-out batch, the
//! loss curve as SVG, and the trained weights as native safetensors with their config
//! JSON, which the `forward` example loads. The LAST line is `loss: first A last B`.
//!
//! `--resume FILE` starts from saved weights, with their shape (the data is regenerated
//! from `--seed`). AdamW's moments are not saved: they start afresh, so the first resumed
//! steps take larger updates than an unbroken run would.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use switch_moe::rng::SeededRng;
use switch_moe::{
    GpuContext, LayerOptions, LayerShape, LossCoefficients, MoeConfig, MoeLayer, MoeWeights,
    Naming, Optimizer,
};

#[derive(Parser)]
#[command(about = "Trains a Switch MoE layer on the GPU on a routing task")]
struct Args {
    /// Optimizer steps.
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Tokens per batch.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    #[arg(long, default_value_t = 128)]
    d_ff: usize,
    /// Experts, and clusters of the task.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// AdamW's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f32,
    /// α, the weight of the load-balancing loss.
    #[arg(long, default_value_t = 0.01)]
    aux_loss_coef: f32,
    /// β, the weight of the router z-loss.
    #[arg(long, default_value_t = 0.001)]
    z_loss_coef: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Start from these weights (native safetensors, as this example saves them).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Where to save the trained weights (their config goes next to them, `.json`).
    #[arg(long, default_value = "trained_moe.safetensors")]
    output: PathBuf,
    /// The loss curve.
    #[arg(long, default_value = "train_loss.svg")]
    svg: PathBuf,
}

/// The task: cluster centres, per-cluster target maps, and a sampler of batches.
struct Task {
    d_model: usize,
    centres: Vec<Vec<f32>>,
    maps: Vec<Vec<f32>>,
    rng: SeededRng,
}

impl Task {
    fn new(clusters: usize, d_model: usize, seed: u64) -> Self {
        let mut rng = SeededRng::new(seed);
        let centres = (0..clusters)
            .map(|_| rng.normal_vec(d_model).iter().map(|v| 2.0 * v).collect())
            .collect();
        // Maps scaled so that targets have about unit variance per element.
        let scale = 1.0 / (5.0 * d_model as f32).sqrt();
        let maps = (0..clusters)
            .map(|_| {
                rng.normal_vec(d_model * d_model)
                    .iter()
                    .map(|v| v * scale)
                    .collect()
            })
            .collect();
        Task {
            d_model,
            centres,
            maps,
            rng,
        }
    }

    /// `tokens` tokens (x) and their targets, clusters drawn uniformly.
    fn batch(&mut self, tokens: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.d_model;
        let (mut x, mut target) = (
            Vec::with_capacity(tokens * d),
            Vec::with_capacity(tokens * d),
        );
        for _ in 0..tokens {
            let cluster = (self.rng.next_u64() % self.centres.len() as u64) as usize;
            let noise = self.rng.normal_vec(d);
            let token: Vec<f32> = self.centres[cluster]
                .iter()
                .zip(&noise)
                .map(|(c, n)| c + 0.5 * n)
                .collect();
            let map = &self.maps[cluster];
            target.extend((0..d).map(|row| {
                (0..d)
                    .map(|col| map[row * d + col] * token[col])
                    .sum::<f32>()
            }));
            x.extend(token);
        }
        (x, target)
    }
}

/// `½·mean((y − target)²)` and its gradient `(y − target) / (T·D)`.
fn squared_error(y: &[f32], target: &[f32]) -> (f32, Vec<f32>) {
    let count = y.len() as f32;
    let diff: Vec<f32> = y.iter().zip(target).map(|(a, b)| a - b).collect();
    let loss = diff.iter().map(|d| 0.5 * d * d).sum::<f32>() / count;
    (loss, diff.iter().map(|d| d / count).collect())
}

fn plot(path: &PathBuf, losses: &[f32], title: &str) -> Result<(), String> {
    let error = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let lowest = losses
        .iter()
        .copied()
        .fold(f32::INFINITY, f32::min)
        .max(1e-6);
    let highest = losses
        .iter()
        .copied()
        .fold(0.0f32, f32::max)
        .max(lowest * 1.01);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..losses.len(), (lowest * 0.8..highest * 1.25).log_scale())
        .map_err(|e| error(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (log)")
        .y_labels(10)
        .y_label_formatter(&|loss| format!("{loss:.3}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| error(&e))?;
    chart
        .draw_series(LineSeries::new(
            losses.iter().enumerate().map(|(i, &l)| (i, l)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))
}

fn train(args: &Args) -> Result<(), String> {
    let error = |e: switch_moe::MoeError| e.to_string();
    let config = MoeConfig {
        n_experts: Some(args.experts),
        ..MoeConfig::default()
    };
    let shape = LayerShape {
        num_experts: args.experts,
        d_model: args.d_model,
        d_ff: args.d_ff,
    };
    let weights = match &args.resume {
        Some(path) => MoeWeights::from_safetensors(path, Naming::Auto, None).map_err(error)?,
        None => MoeWeights::random(shape, false, true, args.seed ^ 0x7EA1),
    };
    // Resumed weights bring their own shape.
    let LayerShape {
        num_experts,
        d_model,
        d_ff,
    } = weights.shape;
    let config = MoeConfig {
        n_experts: Some(num_experts),
        ..config
    };
    let context = GpuContext::new().map_err(error)?;
    let options = LayerOptions {
        trainable: true,
        ..LayerOptions::default()
    };
    let layer =
        MoeLayer::with_options(&context, config.clone(), &weights, options).map_err(error)?;
    println!(
        "training a Switch layer: {} experts, d_model {}, d_ff {}, batch {}, {} steps on {}",
        num_experts,
        d_model,
        d_ff,
        args.batch,
        args.steps,
        context.adapter_summary()
    );
    let mut task = Task::new(num_experts, d_model, args.seed);
    let coefficients = LossCoefficients {
        aux: args.aux_loss_coef,
        z: args.z_loss_coef,
    };
    let optimizer = Optimizer::adam_w(args.learning_rate);
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed_precise}]")
            .map_err(|e| e.to_string())?,
    );
    let mut losses = Vec::with_capacity(args.steps);
    for step in 0..args.steps {
        let (x, target) = task.batch(args.batch);
        let output = layer
            .forward_train(&x, &[args.batch, d_model])
            .map_err(error)?;
        let (squared, dy) = squared_error(&output.y, &target);
        let loss = squared + coefficients.aux * output.aux_loss + coefficients.z * output.z_loss;
        layer.backward(&dy, coefficients).map_err(error)?;
        layer.step(&optimizer).map_err(error)?;
        losses.push(loss);
        let dropped = output.n_dropped as f32 / args.batch as f32;
        bar.set_message(format!("loss {loss:.4} dropped {:.1}%", 100.0 * dropped));
        bar.inc(1);
        if !bar.is_hidden() {
            continue;
        }
        // Without a terminal, a line every tenth of the run.
        if (step + 1) % (args.steps / 10).max(1) == 0 {
            println!(
                "step {:>5}: loss {loss:.4}, dropped {:.1}%",
                step + 1,
                100.0 * dropped
            );
        }
    }
    bar.finish_and_clear();
    if losses.is_empty() {
        return Err("--steps must be at least 1".to_string());
    }

    // The load of a held-out batch, per expert.
    let (x, _) = task.batch(args.batch);
    let output = layer.forward(&x, &[args.batch, d_model]).map_err(error)?;
    println!(
        "per-expert load of a held-out batch ({} tokens):",
        args.batch
    );
    let most = output.counts.iter().copied().max().unwrap_or(1).max(1);
    for (expert, (&count, &kept)) in output.counts.iter().zip(&output.kept).enumerate() {
        let bar = "#".repeat((40 * count as usize).div_ceil(most as usize));
        println!("  expert {expert:>3} {bar:<40} {count:>5} routed, {kept:>5} kept");
    }

    let trained = layer.trained_weights().map_err(error)?;
    let bytes = trained.to_safetensors_bytes().map_err(error)?;
    std::fs::write(&args.output, bytes).map_err(|e| format!("{}: {e}", args.output.display()))?;
    let config_path = args.output.with_extension("json");
    let config_json = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
    std::fs::write(&config_path, config_json)
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    println!(
        "saved {} (config {}); the forward example loads them",
        args.output.display(),
        config_path.display()
    );
    plot(&args.svg, &losses, "training loss")?;
    println!("loss curve: {}", args.svg.display());
    println!(
        "loss: first {:.6} last {:.6}",
        losses[0],
        losses[losses.len() - 1]
    );
    Ok(())
}

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    match train(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}
