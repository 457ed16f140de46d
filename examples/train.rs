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
//! `--router sigmoid --bias-balancing 0.001 --aux-loss-coef 0` trains DeepSeek-V3's way: sigmoid
//! scores, a score bias that only chooses, moved after every step towards an even load;
//! the run prints how uneven the load was over its first and last tenth of steps.
//! `--shared-experts 1` adds DeepSeek's shared expert (width d_ff), trained with the rest.
//! `--router sigmoid --gate-on input --shared-experts 1` trains Llama 4's way: each token's
//! sigmoid gate multiplies its expert's input, `E(g·x)`, beside a shared expert.
//!
//! Beside the weights it saves AdamW's state and how many tokens the run drew
//! (`FILE.optimizer.safetensors`). `--resume FILE` continues from them, with the weights'
//! shape: the data is regenerated from `--seed` and the tokens already drawn are skipped,
//! so `--steps 200` then `--resume … --steps 200` ends with the same weights, bit for bit,
//! as `--steps 400`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use switch_moe::gpu::AdamWState;
use switch_moe::rng::SeededRng;
use switch_moe::tensor_io::{parse_safetensors, read_f32, serialize_tensors, OwnedTensor};
use switch_moe::weights::SharedExpert;
use switch_moe::{
    GateOn, GpuContext, LayerOptions, LayerShape, LossCoefficients, MoeConfig, MoeLayer,
    MoeWeights, Naming, Optimizer, RouterScore,
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
    /// The router's scores: softmax (Switch) or sigmoid (DeepSeek-V3).
    #[arg(long, default_value = "softmax")]
    router: RouterScore,
    /// What the gates multiply: the experts' output (Switch) or input (Llama 4, `E(g·x)`).
    #[arg(long, default_value = "output")]
    gate_on: GateOn,
    /// γ of DeepSeek-V3's balancing without an aux loss: after each step, every expert's
    /// score bias moves by γ towards an even load (0: off; try with --aux-loss-coef 0).
    #[arg(long, default_value_t = 0.0)]
    bias_balancing: f32,
    /// DeepSeek's shared experts: this many of width d_ff, which every token goes through
    /// beside its routed ones (one FFN of their summed width).
    #[arg(long, default_value_t = 0)]
    shared_experts: usize,
    /// Continue from these weights (native safetensors, as this example saves them) and
    /// the optimizer state saved beside them.
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
        }
    }

    /// `tokens` tokens (x) and their targets drawn from `rng`, one token after another
    /// (so drawing a + b tokens is drawing a, then b), clusters uniformly.
    fn batch(&self, rng: &mut SeededRng, tokens: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.d_model;
        let (mut x, mut target) = (
            Vec::with_capacity(tokens * d),
            Vec::with_capacity(tokens * d),
        );
        for _ in 0..tokens {
            let cluster = (rng.next_u64() % self.centres.len() as u64) as usize;
            let noise = rng.normal_vec(d);
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
        router_score: args.router,
        gate_on: args.gate_on,
        ..MoeConfig::default()
    };
    let shape = LayerShape {
        num_experts: args.experts,
        d_model: args.d_model,
        d_ff: args.d_ff,
    };
    let mut weights = match &args.resume {
        Some(path) => MoeWeights::from_safetensors(path, Naming::Auto, None).map_err(error)?,
        None => {
            let mut weights = MoeWeights::random(shape, false, true, args.seed ^ 0x7EA1);
            weights.shared = (args.shared_experts > 0).then(|| {
                let width = args.shared_experts * args.d_ff;
                SharedExpert::random((args.d_model, width), false, true, false, args.seed ^ 0x5EA)
            });
            weights
        }
    };
    // Balancing moves a score bias: start it at zeros.
    if args.bias_balancing > 0.0 && weights.score_bias.is_none() {
        weights.score_bias = Some(vec![0.0; weights.shape.num_experts]);
    }
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
        "training a Switch layer: {} experts{}, d_model {}, d_ff {}, batch {}, {} steps on {}",
        num_experts,
        match &weights.shared {
            Some(shared) => format!(" and a shared one of width {}", shared.d_ff),
            None => String::new(),
        },
        d_model,
        d_ff,
        args.batch,
        args.steps,
        context.adapter_summary()
    );
    let task = Task::new(num_experts, d_model, args.seed);
    let mut batches = SeededRng::new(args.seed ^ 0xDA7A);
    // A resumed run skips the tokens its predecessors drew and continues AdamW.
    let mut tokens_drawn = 0u64;
    if let Some(path) = &args.resume {
        let saved = load_optimizer_state(&optimizer_path(path))?;
        layer.set_adam_w_state(&saved.0).map_err(error)?;
        tokens_drawn = saved.1;
        task.batch(&mut batches, tokens_drawn as usize);
    }
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
    // max / mean of each step's counts: 1 is an even load.
    let mut imbalance = Vec::with_capacity(args.steps);
    for step in 0..args.steps {
        let (x, target) = task.batch(&mut batches, args.batch);
        tokens_drawn += args.batch as u64;
        let output = layer
            .forward_train(&x, &[args.batch, d_model])
            .map_err(error)?;
        let (squared, dy) = squared_error(&output.y, &target);
        let loss = squared + coefficients.aux * output.aux_loss + coefficients.z * output.z_loss;
        layer.backward(&dy, coefficients).map_err(error)?;
        layer.step(&optimizer).map_err(error)?;
        if args.bias_balancing > 0.0 {
            layer
                .balance_score_bias(&output.counts, args.bias_balancing)
                .map_err(error)?;
        }
        let mean = output.counts.iter().sum::<u32>() as f32 / output.counts.len() as f32;
        imbalance.push(output.counts.iter().copied().max().unwrap_or(0) as f32 / mean);
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
    let (x, _) = task.batch(&mut SeededRng::new(args.seed ^ 0x4E1D), args.batch);
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
    std::fs::write(&config_path, config.to_json_string())
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let state = layer
        .adam_w_state()
        .map_err(error)?
        .ok_or("no AdamW step was taken")?;
    save_optimizer_state(&optimizer_path(&args.output), &state, tokens_drawn)?;
    println!(
        "saved {} (config {}, optimizer state {}); the forward example loads them",
        args.output.display(),
        config_path.display(),
        optimizer_path(&args.output).display()
    );
    plot(&args.svg, &losses, "training loss")?;
    println!("loss curve: {}", args.svg.display());
    let tenth = (imbalance.len() / 10).max(1);
    let average = |values: &[f32]| values.iter().sum::<f32>() / values.len() as f32;
    println!(
        "load (max / mean of the counts): first tenth {:.3}, last tenth {:.3}",
        average(&imbalance[..tenth]),
        average(&imbalance[imbalance.len() - tenth..])
    );
    println!(
        "loss: first {:.6} last {:.6}",
        losses[0],
        losses[losses.len() - 1]
    );
    Ok(())
}

/// Where the optimizer state of the weights at `weights` goes.
fn optimizer_path(weights: &Path) -> PathBuf {
    weights.with_extension("optimizer.safetensors")
}

fn save_optimizer_state(path: &Path, state: &AdamWState, tokens_drawn: u64) -> Result<(), String> {
    let floats = |values: &[f32]| OwnedTensor::f32(vec![values.len()], values);
    let tensors = [
        ("first_moments".to_string(), floats(&state.first_moments)),
        ("second_moments".to_string(), floats(&state.second_moments)),
        (
            "steps".to_string(),
            OwnedTensor::i64(vec![], [state.steps as i64]),
        ),
        (
            "tokens_drawn".to_string(),
            OwnedTensor::i64(vec![], [tokens_drawn as i64]),
        ),
    ]
    .into();
    let bytes = serialize_tensors(&tensors).map_err(|e| e.to_string())?;
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// AdamW's state and the tokens drawn, as `save_optimizer_state` wrote them.
fn load_optimizer_state(path: &Path) -> Result<(AdamWState, u64), String> {
    let error = |message: String| format!("{}: {message}", path.display());
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let file = parse_safetensors(&bytes, &path.display().to_string()).map_err(|e| e.to_string())?;
    let floats = |name: &str| {
        let view = file
            .tensor(name)
            .map_err(|_| error(format!("no tensor `{name}`")))?;
        read_f32(&view, name)
            .map(|t| t.data)
            .map_err(|e| e.to_string())
    };
    let count = |name: &str| {
        let view = file
            .tensor(name)
            .map_err(|_| error(format!("no tensor `{name}`")))?;
        let data: [u8; 8] = view
            .data()
            .try_into()
            .map_err(|_| error(format!("`{name}` is not one i64")))?;
        u64::try_from(i64::from_le_bytes(data)).map_err(|_| error(format!("`{name}` < 0")))
    };
    let state = AdamWState {
        first_moments: floats("first_moments")?,
        second_moments: floats("second_moments")?,
        steps: count("steps")?,
    };
    Ok((state, count("tokens_drawn")?))
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
