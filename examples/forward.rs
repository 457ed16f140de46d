//! `forward`: runs the layer on files.
//!
//! cargo run --release --example forward -- --weights W.safetensors|W.gguf --input X.safetensors \
//!     [--config C.json] --output Y.safetensors [--prefix P] [--device gpu|cpu] \
//!     [--grad-output DY.safetensors --grads-output G.safetensors [--aux-loss-coef A] \
//!      [--z-loss-coef B]]
//!
//! With `--grad-output` it also differentiates `L = Σ dy ⊙ y + A·aux_loss + B·z_loss` and
//! writes `x`'s and every weight tensor's gradient (native names, f32) to `--grads-output`.
//! `--config` is the layer's config JSON or a transformers model `config.json`; a GGUF
//! file's metadata gives its family's config without one (the JSON's keys win).
//! Any error prints one line naming the file, tensor or key, exits with code 2, and
//! writes nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use switch_moe::forward_files::{run_forward_files, Device, ForwardRequest, GradientRequest};
use switch_moe::LossCoefficients;

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// The best GPU adapter.
    Gpu,
    /// The CPU reference.
    Cpu,
}

#[derive(Parser)]
#[command(
    about = "Runs the MoE layer on files: weights, input x and config in, every statistic out"
)]
struct Args {
    /// Weights: safetensors (f32, f16 or bf16; any naming) or GGUF (llama.cpp).
    #[arg(long)]
    weights: PathBuf,
    /// safetensors with the tensor `x`, [T, D] or [S, B, D].
    #[arg(long)]
    input: PathBuf,
    /// The config JSON: the layer's own, or a transformers model config.json. Optional
    /// for GGUF, whose metadata gives the family's config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to write every output statistic (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// The layer's prefix: in a whole model's state dict, or `blk.N.` in a GGUF file.
    #[arg(long)]
    prefix: Option<String>,
    #[arg(long, value_enum, default_value = "gpu")]
    device: DeviceArg,
    /// safetensors with the tensor `dy` (the shape of x): also run the backward.
    #[arg(long, requires = "grads_output")]
    grad_output: Option<PathBuf>,
    /// Where to write the gradients (safetensors; with --grad-output).
    #[arg(long, requires = "grad_output")]
    grads_output: Option<PathBuf>,
    /// α, the weight of aux_loss in the differentiated loss.
    #[arg(long, default_value_t = 0.0, requires = "grad_output")]
    aux_loss_coef: f32,
    /// β, the weight of z_loss in the differentiated loss.
    #[arg(long, default_value_t = 0.0, requires = "grad_output")]
    z_loss_coef: f32,
}

fn main() -> ExitCode {
    env_logger::init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        // --help prints and succeeds.
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        // A bad command line is one line, like every other error of the tool.
        Err(error) => {
            let text = error.to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
                .collect();
            eprintln!("{} (see --help)", parts.join(" "));
            return ExitCode::from(2);
        }
    };
    let request = ForwardRequest {
        weights: args.weights,
        input: args.input,
        config: args.config,
        output: args.output,
        prefix: args.prefix,
        device: match args.device {
            DeviceArg::Gpu => Device::Gpu,
            DeviceArg::Cpu => Device::Cpu,
        },
        gradients: args
            .grad_output
            .zip(args.grads_output)
            .map(|(grad_output, grads_output)| GradientRequest {
                grad_output,
                grads_output,
                coefficients: LossCoefficients {
                    aux: args.aux_loss_coef,
                    z: args.z_loss_coef,
                },
            }),
    };
    match run_forward_files(&request) {
        Ok(output) => {
            if let Some(g) = &request.gradients {
                println!(
                    "wrote {}: gradients of x and every weight",
                    g.grads_output.display()
                );
            }
            println!(
                "wrote {}: {} tokens, {} experts, top-{}, {} dropped, aux_loss {:.6}, z_loss {:.6}",
                request.output.display(),
                output.num_tokens(),
                output.num_experts,
                output.top_k,
                output.n_dropped,
                output.aux_loss,
                output.z_loss
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}
