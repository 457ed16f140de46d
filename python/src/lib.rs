//! `switch_moe._native`: the crate's layer for Python. Arrays cross as numpy arrays, one
//! host copy each way (wgpu buffers cannot be shared with torch's); the GIL is released
//! while the GPU works; errors raise the `switch_moe` exception for their kind with the
//! crate's message.

mod convert;
mod layer;

use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use switch_moe::{GpuContext, LayerShape, MoeError};

use convert::{array, config_json, load, to_py};
use layer::PyMoeLayer;

/// The process's GPU: opened on first use and shared by every layer.
pub(crate) fn context() -> Result<&'static GpuContext, MoeError> {
    static CONTEXT: OnceLock<Result<GpuContext, String>> = OnceLock::new();
    CONTEXT
        .get_or_init(|| GpuContext::new().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|message| MoeError::NoAdapter {
            message: message.clone(),
        })
}

/// The layer's weights in the native naming (`router.weight`, `experts.w1`, ...; f32
/// numpy arrays), from a dict of numpy arrays in any naming (or a path): the layout the
/// torch modules keep their parameters in.
#[pyfunction]
#[pyo3(signature = (weights, config = None, *, prefix = None))]
fn native_weights<'py>(
    py: Python<'py>,
    weights: &Bound<'py, PyAny>,
    config: Option<&Bound<'py, PyDict>>,
    prefix: Option<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let json = config_json(py, config)?;
    let (_, weights) = load(py, weights, &json, prefix.as_deref())?;
    let LayerShape {
        num_experts: n,
        d_model: d,
        d_ff: f,
    } = weights.shape;
    let dict = PyDict::new(py);
    let put = |name: &str, values: Option<Vec<f32>>, dims: &[usize]| -> PyResult<()> {
        if let Some(values) = values {
            dict.set_item(name, array(py, values, dims)?)?;
        }
        Ok(())
    };
    put(
        "router.weight",
        Some(weights.router_weight.clone()),
        &[n, d],
    )?;
    put("router.bias", weights.router_bias.clone(), &[n])?;
    put("experts.w1", Some(weights.w1.to_f32()), &[n, f, d])?;
    put("experts.b1", weights.b1.clone(), &[n, f])?;
    put("experts.w2", Some(weights.w2.to_f32()), &[n, d, f])?;
    put("experts.b2", weights.b2.clone(), &[n, d])?;
    put(
        "experts.w3",
        weights.w3.as_ref().map(|w| w.to_f32()),
        &[n, f, d],
    )?;
    put("experts.b3", weights.b3.clone(), &[n, f])?;
    put("router.score_bias", weights.score_bias.clone(), &[n])?;
    if let Some(shared) = &weights.shared {
        for (name, values, dims) in shared.named(d) {
            dict.set_item(name, array(py, values.to_vec(), &dims)?)?;
        }
    }
    Ok(dict)
}

/// The GPU adapter the layers run on: `{"name", "backend", "device_type", "driver"}`.
#[pyfunction]
fn adapter<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let summary = py
        .detach(|| context().map(|c| c.adapter_summary()))
        .map_err(|e| to_py(py, e))?;
    let dict = PyDict::new(py);
    dict.set_item("name", summary.name)?;
    dict.set_item("backend", summary.backend)?;
    dict.set_item("device_type", summary.device_type)?;
    dict.set_item("driver", summary.driver)?;
    Ok(dict)
}

/// The layer's config (config JSON text) derived from a transformers model config (JSON
/// text with `model_type`) for the layer `prefix` names (`model.layers.3.mlp.`; any MoE
/// layer without one), with the family's semantics (SPEC "The families people run").
#[pyfunction]
#[pyo3(signature = (model_config, prefix = None))]
fn layer_config_from_transformers(
    py: Python<'_>,
    model_config: &str,
    prefix: Option<String>,
) -> PyResult<String> {
    let config =
        switch_moe::hf_config::config_from_transformers_json(model_config, prefix.as_deref())
            .map_err(|e| to_py(py, e))?;
    Ok(config.to_json_string())
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<PyMoeLayer>()?;
    module.add_function(wrap_pyfunction!(adapter, module)?)?;
    module.add_function(wrap_pyfunction!(native_weights, module)?)?;
    module.add_function(wrap_pyfunction!(layer_config_from_transformers, module)?)?;
    Ok(())
}
