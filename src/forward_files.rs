//! The file contract of the `forward` tool: weights, input and config files in, every
//! output statistic to one safetensors file out, written only when everything succeeded.

use std::path::{Path, PathBuf};

use crate::config::{MoeConfig, Naming};
use crate::cpu_reference;
use crate::error::{MoeError, Result};
use crate::gpu::{GpuContext, MoeLayer};
use crate::output::MoeOutput;
use crate::tensor_io::{parse_safetensors, read_f32_values, write_file_atomically, F32Tensor};
use crate::weights::{is_gguf, MoeWeights};

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
    /// Prefix of the layer's tensor names inside a whole model's state dict, or of the
    /// layer in a GGUF file (`blk.3.`).
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

/// Reads the config and the weights of a layer: a GGUF file (recognised by its magic),
/// whose metadata gives `n_experts` and `top_k` where the config does not, or safetensors
/// in any naming.
pub fn load_layer(
    weights_path: &Path,
    config_path: &Path,
    prefix: Option<&str>,
) -> Result<(MoeConfig, MoeWeights)> {
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(weights_path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
        .map(|()| is_gguf(&magic))
        .unwrap_or(false);
    if !is_gguf {
        let config = MoeConfig::from_json_file(config_path)?;
        let weights = MoeWeights::from_safetensors(weights_path, config.naming, prefix)?;
        return Ok((config, weights));
    }
    let (weights, info) = MoeWeights::from_gguf(weights_path, prefix)?;
    let defaults = MoeConfig {
        n_experts: info.expert_count,
        top_k: info.expert_used_count.unwrap_or(1),
        ..MoeConfig::default()
    };
    let config = MoeConfig::from_json_file_over(config_path, defaults)?;
    if !matches!(config.naming, Naming::Auto | Naming::Gguf) {
        return Err(MoeError::Naming {
            message: format!(
                "the config asks for {:?}, but `{}` is a GGUF file",
                config.naming,
                weights_path.display()
            ),
        });
    }
    Ok((config, weights))
}

/// Runs the request and writes its output file; on any error nothing is written.
pub fn run_forward_files(request: &ForwardRequest) -> Result<MoeOutput> {
    let (config, weights) =
        load_layer(&request.weights, &request.config, request.prefix.as_deref())?;
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
