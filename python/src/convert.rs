//! Values crossing the boundary: the crate's errors as `switch_moe` exceptions, config
//! dicts and weight dicts in, numpy arrays and dicts of them out.

use std::collections::BTreeMap;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};
use switch_moe::forward_files::{load_layer_with, ConfigSource};
use switch_moe::tensor_io::{serialize_tensors, OwnedTensor};
use switch_moe::{Gradients, LayerShape, MoeConfig, MoeError, MoeOutput, MoeWeights};

/// The `switch_moe` exception class for an error of the crate (see `_errors.py`).
fn exception_class(error: &MoeError) -> &'static str {
    match error {
        MoeError::Config { .. } => "ConfigError",
        MoeError::Tensor { .. } | MoeError::Naming { .. } => "TensorError",
        MoeError::InputShape { .. } | MoeError::NonFiniteInput { .. } => "InputError",
        MoeError::TrainingNeedsF32 { .. } | MoeError::Training { .. } => "TrainingError",
        MoeError::File { .. } => "FileError",
        MoeError::NoAdapter { .. } | MoeError::DeviceLimit { .. } | MoeError::Device { .. } => {
            "DeviceError"
        }
    }
}

/// The crate's error as the Python exception of its kind.
pub(crate) fn to_py(py: Python<'_>, error: MoeError) -> PyErr {
    let message = error.to_string();
    let class = py
        .import("switch_moe._errors")
        .and_then(|module| module.getattr(exception_class(&error)))
        .and_then(|class| class.cast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(class) => PyErr::from_type(class, message),
        Err(import_error) => import_error,
    }
}

/// A `ValueError` for a bad argument.
pub(crate) fn value_error(message: impl Into<String>) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(message.into())
}

/// The config dict as JSON text (`None`: every key at its default).
pub(crate) fn config_json(py: Python<'_>, config: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    match config {
        None => Ok("{}".to_string()),
        Some(dict) => py
            .import("json")?
            .call_method1("dumps", (dict,))?
            .extract::<String>(),
    }
}

/// A dict of numpy arrays (any naming) as safetensors bytes, f32.
pub(crate) fn dict_to_safetensors(weights: &Bound<'_, PyDict>) -> PyResult<Vec<u8>> {
    let mut tensors = BTreeMap::new();
    for (name, value) in weights.iter() {
        let name: String = name
            .extract()
            .map_err(|_| value_error("weights: every key must be a tensor name (str)"))?;
        let array = value
            .call_method1("astype", ("float32",))
            .and_then(|a| a.extract::<PyReadonlyArrayDyn<'_, f32>>())
            .map_err(|_| value_error(format!("weights[{name:?}]: not a numpy array")))?;
        let shape = array.shape().to_vec();
        let values: Vec<f32> = array.as_array().iter().copied().collect();
        tensors.insert(name, OwnedTensor::f32(shape, &values));
    }
    serialize_tensors(&tensors).map_err(|e| value_error(e.to_string()))
}

/// A layer's config (from `json`) and weights: a path (safetensors or GGUF, read with the
/// GIL released) or a dict of numpy arrays in any naming.
pub(crate) fn load(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    json: &str,
    prefix: Option<&str>,
) -> PyResult<(MoeConfig, MoeWeights)> {
    let loaded = if let Ok(dict) = weights.cast::<PyDict>() {
        let bytes = dict_to_safetensors(dict)?;
        MoeConfig::from_json_str(json).and_then(|config| {
            let weights =
                MoeWeights::from_safetensors_bytes(&bytes, config.naming, prefix, "weights dict")?;
            Ok((config, weights))
        })
    } else {
        let path: std::path::PathBuf = weights.extract().map_err(|_| {
            value_error("weights: a path (str or os.PathLike) or a dict of numpy arrays")
        })?;
        py.detach(|| load_layer_with(&path, ConfigSource::Json(json), prefix))
    };
    loaded.map_err(|e| to_py(py, e))
}

/// `values` as a numpy array of `shape`.
pub(crate) fn array<'py, T: numpy::Element>(
    py: Python<'py>,
    values: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, values).reshape(shape)?.into_any())
}

pub(crate) fn num_tokens(shape: &[usize]) -> usize {
    shape[..shape.len().saturating_sub(1)].iter().product()
}

/// `value` as a float32 numpy array (other float dtypes converted; anything else a
/// `ValueError` naming `what`).
pub(crate) fn float32<'py>(
    value: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let converted = value
        .py()
        .import("numpy")?
        .call_method1("asarray", (value, "float32"))
        .map_err(|e| value_error(format!("{what}: not convertible to a float32 array ({e})")))?;
    converted
        .extract::<PyReadonlyArrayDyn<'py, f32>>()
        .map_err(|e| value_error(format!("{what}: {e}")))
}

pub(crate) fn output_dict<'py>(
    py: Python<'py>,
    output: &MoeOutput,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let (t, k, n) = (output.num_tokens(), output.top_k, output.num_experts);
    let ints = |values: &[u32]| values.iter().map(|&v| v as i64).collect::<Vec<_>>();
    dict.set_item("y", array(py, output.y.clone(), &output.shape)?)?;
    dict.set_item("routes", array(py, ints(&output.routes), &[t, k])?)?;
    dict.set_item("gates", array(py, output.gates.clone(), &[t, k])?)?;
    dict.set_item(
        "route_prob_max",
        array(py, output.route_prob_max.clone(), &[t])?,
    )?;
    dict.set_item("counts", array(py, ints(&output.counts), &[n])?)?;
    dict.set_item("kept", array(py, ints(&output.kept), &[n])?)?;
    dict.set_item(
        "route_prob_sum",
        array(py, output.route_prob_sum.clone(), &[n])?,
    )?;
    dict.set_item("n_dropped", output.n_dropped as i64)?;
    dict.set_item("aux_loss", output.aux_loss as f64)?;
    dict.set_item("z_loss", output.z_loss as f64)?;
    Ok(dict)
}

pub(crate) fn gradients_dict<'py>(
    py: Python<'py>,
    gradients: Gradients,
    x_shape: &[usize],
    shape: LayerShape,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, values, dims) in gradients.named_with_shapes(x_shape, shape) {
        dict.set_item(name, array(py, values.to_vec(), &dims)?)?;
    }
    Ok(dict)
}
