//! `forward`: runs the layer on files.
//!
//! cargo run --release --example forward -- --weights W.safetensors --input X.safetensors \
//!     --config C.json --output Y.safetensors [--prefix P] [--device gpu|cpu]
//!
//! Any error prints one line naming the file, tensor or key, exits with code 2, and
//! writes nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use switch_moe::forward_files::{run_forward_files, Device, ForwardRequest};

const USAGE: &str = "usage: forward --weights W.safetensors --input X.safetensors --config C.json \
                     --output Y.safetensors [--prefix P] [--device gpu|cpu]";

fn parse_args(args: &[String]) -> Result<ForwardRequest, String> {
    let mut weights = None;
    let mut input = None;
    let mut config = None;
    let mut output = None;
    let mut prefix = None;
    let mut device = Device::Gpu;
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let mut value = || {
            rest.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--weights" => weights = Some(PathBuf::from(value()?)),
            "--input" => input = Some(PathBuf::from(value()?)),
            "--config" => config = Some(PathBuf::from(value()?)),
            "--output" => output = Some(PathBuf::from(value()?)),
            "--prefix" => prefix = Some(value()?),
            "--device" => {
                device = match value()?.as_str() {
                    "gpu" => Device::Gpu,
                    "cpu" => Device::Cpu,
                    other => return Err(format!("--device must be gpu or cpu, not {other:?}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let need =
        |value: Option<PathBuf>, flag: &str| value.ok_or_else(|| format!("{flag} is required"));
    Ok(ForwardRequest {
        weights: need(weights, "--weights")?,
        input: need(input, "--input")?,
        config: need(config, "--config")?,
        output: need(output, "--output")?,
        prefix,
        device,
    })
}

fn main() -> ExitCode {
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let request = match parse_args(&args) {
        Ok(request) => request,
        Err(message) => {
            eprintln!("error: {message} ({USAGE})");
            return ExitCode::from(2);
        }
    };
    match run_forward_files(&request) {
        Ok(output) => {
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
