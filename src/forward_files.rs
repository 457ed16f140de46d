//! The file contract of the `forward` tool: weights, input and config files in, every
//! output statistic to one safetensors file out, written only when everything succeeded.

use std::path::{Path, PathBuf};

use crate::config::MoeConfig;
use crate::cpu_reference;
use crate::error::{MoeError, Result};
use crate::gpu::{GpuContext, MoeLayer};
use crate::output::MoeOutput;
use crate::tensor_io::{parse_safetensors, read_f32_values, write_file_atomically, F32Tensor};
use crate::weights::MoeWeights;

/// Where the forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The best GPU adapter (see `GpuContext::new`).
    Gpu,
    /// The CPU reference.
    Cpu,
}

/// One run of the `forward` tool.
#[derive(Clone, Debug)]
pub struct ForwardRequest {
    pub weights: PathBuf,
    pub input: PathBuf,
    pub config: PathBuf,
    pub output: PathBuf,
    /// Prefix of the layer's tensor names inside a whole model's state dict.
    pub prefix: Option<String>,
    pub device: Device,
}

/// Reads tensor `x` of an input file.
pub fn read_input(path: &Path) -> Result<F32Tensor> {
    let bytes = std::fs::read(path).map_err(|e| MoeError::file(path, e))?;
    let file = parse_safetensors(&bytes, &path.display().to_string())?;
    let view = file
        .tensor("x")
        .map_err(|_| MoeError::tensor("x", format!("missing from {}", path.display())))?;
    read_f32_values(&view, "x")
}

/// Runs the request and writes its output file; on any error nothing is written.
pub fn run_forward_files(request: &ForwardRequest) -> Result<MoeOutput> {
    let config = MoeConfig::from_json_file(&request.config)?;
    let weights =
        MoeWeights::from_safetensors(&request.weights, config.naming, request.prefix.as_deref())?;
    let input = read_input(&request.input)?;
    let output = match request.device {
        Device::Cpu => cpu_reference::forward(&config, &weights, &input.data, &input.shape)?,
        Device::Gpu => {
            let context = GpuContext::new()?;
            MoeLayer::new(&context, config, &weights)?.forward(&input.data, &input.shape)?
        }
    };
    write_file_atomically(&request.output, &output.to_safetensors_bytes()?)?;
    Ok(output)
}
