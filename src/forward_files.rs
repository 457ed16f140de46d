//! The file contract of the `forward` tool: weights, input and config files in, every
//! output statistic to one safetensors file out, written only when everything succeeded.

use std::path::{Path, PathBuf};

use crate::config::{MoeConfig, Naming};
use crate::cpu_backward::{self, LossCoefficients};
use crate::cpu_reference;
use crate::error::{MoeError, Result};
use crate::gguf_config::config_from_gguf;
use crate::gpu::{GpuContext, LayerOptions, MoeLayer};
use crate::hf_config::{config_from_transformers, is_transformers_config};
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
    /// The config JSON (the layer's own, or a transformers model config); optional for a
    /// GGUF file, whose metadata gives the config it does not.
    pub config: Option<PathBuf>,
    pub output: PathBuf,
    /// Prefix of the layer's tensor names inside a whole model's state dict, or of the
    /// layer in a GGUF file (`blk.3.`).
    pub prefix: Option<String>,
    pub device: Device,
    /// Also differentiate: read `dy` and write the gradients (SPEC "Backward").
    pub gradients: Option<GradientRequest>,
}

/// The backward part of a `forward` run.
#[derive(Clone, Debug)]
pub struct GradientRequest {
    /// safetensors with the tensor `dy`, the shape of `x`.
    pub grad_output: PathBuf,
    /// Where to write `x`'s and every weight tensor's gradient (native names, f32).
    pub grads_output: PathBuf,
    pub coefficients: LossCoefficients,
}

/// Reads tensor `x` of an input file.
pub fn read_input(path: &Path) -> Result<F32Tensor> {
    read_named(path, "x")
}

/// Reads the f32 tensor `name` of a safetensors file.
fn read_named(path: &Path, name: &str) -> Result<F32Tensor> {
    let bytes = std::fs::read(path).map_err(|e| MoeError::file(path, e))?;
    let file = parse_safetensors(&bytes, &path.display().to_string())?;
    let view = file
        .tensor(name)
        .map_err(|_| MoeError::tensor(name, format!("missing from {}", path.display())))?;
    read_f32_values(&view, name)
}

/// Where a layer's config comes from.
#[derive(Clone, Copy, Debug)]
pub enum ConfigSource<'a> {
    /// A config JSON file (errors name it).
    File(&'a Path),
    /// Config JSON text.
    Json(&'a str),
    /// None given: a GGUF file's metadata is the whole config (safetensors need one).
    Metadata,
}

impl ConfigSource<'_> {
    /// The layer's config JSON over `defaults`, or, given a transformers model config
    /// (it has `model_type`), the config derived from it for the layer `prefix` names.
    fn parse_over(self, defaults: MoeConfig, prefix: Option<&str>) -> Result<MoeConfig> {
        let (text, origin) = match self {
            ConfigSource::Metadata => return Ok(defaults),
            ConfigSource::File(path) => (
                std::fs::read_to_string(path).map_err(|e| MoeError::file(path, e))?,
                Some(path),
            ),
            ConfigSource::Json(text) => (text.to_string(), None),
        };
        let in_file = |error: MoeError| match origin {
            Some(path) => error.in_file(path),
            None => error,
        };
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(value) if is_transformers_config(&value) => {
                config_from_transformers(&value, prefix).map_err(in_file)
            }
            _ => MoeConfig::from_json_str_over(&text, defaults).map_err(in_file),
        }
    }
}

/// Reads the config and the weights of a layer: a GGUF file (recognised by its magic),
/// whose metadata gives the family's config where the config JSON does not (see
/// `gguf_config`; the JSON's keys win, a transformers config replaces it), or safetensors
/// in any naming, which need the config.
pub fn load_layer(
    weights_path: &Path,
    config_path: Option<&Path>,
    prefix: Option<&str>,
) -> Result<(MoeConfig, MoeWeights)> {
    let config = config_path.map_or(ConfigSource::Metadata, ConfigSource::File);
    load_layer_with(weights_path, config, prefix)
}

/// [`load_layer`] with the config from `config`.
pub fn load_layer_with(
    weights_path: &Path,
    config: ConfigSource<'_>,
    prefix: Option<&str>,
) -> Result<(MoeConfig, MoeWeights)> {
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(weights_path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
        .map(|()| is_gguf(&magic))
        .unwrap_or(false);
    if !is_gguf {
        if matches!(config, ConfigSource::Metadata) {
            return Err(MoeError::file(
                weights_path,
                "is safetensors, which carry no config: give the layer's config JSON or the \
                 model's transformers config.json (--config)",
            ));
        }
        let config = config.parse_over(MoeConfig::default(), prefix)?;
        let weights = MoeWeights::from_safetensors(weights_path, config.naming, prefix)?;
        return Ok((config, weights));
    }
    let (weights, info) = MoeWeights::from_gguf(weights_path, prefix)?;
    let defaults = config_from_gguf(&info, &weights).map_err(|e| e.in_file(weights_path))?;
    let config = config.parse_over(defaults, prefix)?;
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

/// Runs the request and writes its output file (and the gradients' file, when asked); on
/// any error nothing is written.
pub fn run_forward_files(request: &ForwardRequest) -> Result<MoeOutput> {
    let (config, weights) = load_layer(
        &request.weights,
        request.config.as_deref(),
        request.prefix.as_deref(),
    )?;
    let input = read_input(&request.input)?;
    let dy = match &request.gradients {
        Some(g) => {
            let dy = read_named(&g.grad_output, "dy")?;
            if dy.shape != input.shape {
                return Err(MoeError::tensor(
                    "dy",
                    format!(
                        "shape {:?} in {}, expected x's {:?}",
                        dy.shape,
                        g.grad_output.display(),
                        input.shape
                    ),
                ));
            }
            Some((dy, g))
        }
        None => None,
    };
    let (x, shape) = (&input.data, &input.shape);
    let (output, gradients) = match request.device {
        Device::Cpu => {
            let output = cpu_reference::forward(&config, &weights, x, shape)?;
            let gradients = match &dy {
                Some((dy, g)) => Some(cpu_backward::backward(
                    &config,
                    &weights,
                    x,
                    shape,
                    &dy.data,
                    g.coefficients,
                )?),
                None => None,
            };
            (output, gradients)
        }
        Device::Gpu => {
            let context = GpuContext::new()?;
            let options = LayerOptions {
                trainable: dy.is_some(),
                ..LayerOptions::default()
            };
            let layer = MoeLayer::with_options(&context, config, &weights, options)?;
            match &dy {
                Some((dy, g)) => {
                    let output = layer.forward_train(x, shape)?;
                    let gradients = layer.backward(&dy.data, g.coefficients)?;
                    (output, Some(gradients))
                }
                None => (layer.forward(x, shape)?, None),
            }
        }
    };
    let output_bytes = output.to_safetensors_bytes()?;
    if let (Some(gradients), Some((_, g))) = (gradients, &dy) {
        let bytes = gradients.to_safetensors_bytes(shape, weights.shape)?;
        write_file_atomically(&g.grads_output, &bytes)?;
        // Both files or neither.
        if let Err(error) = write_file_atomically(&request.output, &output_bytes) {
            let _ = std::fs::remove_file(&g.grads_output);
            return Err(error);
        }
        return Ok(output);
    }
    write_file_atomically(&request.output, &output_bytes)?;
    Ok(output)
}
