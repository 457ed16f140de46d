//! `switch_moe._native`: the crate's layer for Python. Arrays cross as numpy arrays, one
//! host copy each way (wgpu buffers cannot be shared with torch's); the GIL is released
//! while the GPU works; errors raise the `switch_moe` exception for their kind with the
//! crate's message.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};
use switch_moe::forward_files::{load_layer_with, ConfigSource};
use switch_moe::tensor_io::{serialize_tensors, OwnedTensor};
use switch_moe::{
    GpuContext, Gradients, LayerOptions, LayerShape, LossCoefficients, MoeConfig, MoeError,
    MoeLayer, MoeOutput, MoeWeights, WeightFormat,
};

/// The process's GPU: opened on first use and shared by every layer.
fn context() -> Result<&'static GpuContext, MoeError> {
    static CONTEXT: OnceLock<Result<GpuContext, String>> = OnceLock::new();
    CONTEXT
        .get_or_init(|| GpuContext::new().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|message| MoeError::NoAdapter {
            message: message.clone(),
        })
}

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
fn to_py(py: Python<'_>, error: MoeError) -> PyErr {
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
fn value_error(message: impl Into<String>) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(message.into())
}

/// The config dict as JSON text (`None`: every key at its default).
fn config_json(py: Python<'_>, config: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    match config {
        None => Ok("{}".to_string()),
        Some(dict) => py
            .import("json")?
            .call_method1("dumps", (dict,))?
            .extract::<String>(),
    }
}

/// A dict of numpy arrays (any naming) as safetensors bytes, f32.
fn dict_to_safetensors(weights: &Bound<'_, PyDict>) -> PyResult<Vec<u8>> {
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
fn load(
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
fn array<'py, T: numpy::Element>(
    py: Python<'py>,
    values: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, values).reshape(shape)?.into_any())
}

/// What the last forward needs for its backward.
struct LastForward {
    shape: Vec<usize>,
    /// Whether the layer kept it (a trainable layer, a batch of one pass).
    trained: bool,
}

/// A Mixture-of-Experts layer on the GPU.
#[pyclass(module = "switch_moe._native", name = "MoeLayer", frozen)]
struct PyMoeLayer {
    layer: MoeLayer,
    shape: LayerShape,
    config: MoeConfig,
    last: Mutex<Option<LastForward>>,
}

#[pymethods]
impl PyMoeLayer {
    /// `weights`: a path (safetensors or GGUF) or a dict of numpy arrays in any naming;
    /// `config`: a dict with the config JSON's keys; `prefix`: the layer's prefix in a
    /// whole model's state dict or GGUF file.
    #[new]
    #[pyo3(signature = (weights, config = None, *, prefix = None))]
    fn new(
        py: Python<'_>,
        weights: &Bound<'_, PyAny>,
        config: Option<&Bound<'_, PyDict>>,
        prefix: Option<String>,
    ) -> PyResult<Self> {
        let json = config_json(py, config)?;
        let (config, weights) = load(py, weights, &json, prefix.as_deref())?;
        let built = py.detach(|| {
            let context = context()?;
            // f32 weights train; stored formats run forward only.
            let trainable = weights.check_trainable().is_ok();
            let options = LayerOptions {
                trainable,
                ..LayerOptions::default()
            };
            MoeLayer::with_options(context, config.clone(), &weights, options)
        });
        let layer = built.map_err(|e| to_py(py, e))?;
        Ok(PyMoeLayer {
            shape: weights.shape,
            layer,
            config,
            last: Mutex::new(None),
        })
    }

    /// Experts N.
    #[getter]
    fn num_experts(&self) -> usize {
        self.shape.num_experts
    }

    #[getter]
    fn d_model(&self) -> usize {
        self.shape.d_model
    }

    #[getter]
    fn d_ff(&self) -> usize {
        self.shape.d_ff
    }

    /// The layer's config as a dict of the config JSON's keys.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = self.config.to_json_string();
        py.import("json")?.call_method1("loads", (text,))
    }

    /// The stored formats of the expert matrices W1, W3 and W2 on the device.
    #[getter]
    fn weight_formats(&self) -> Vec<&'static str> {
        self.layer
            .weight_formats()
            .iter()
            .map(|f: &WeightFormat| f.name())
            .collect()
    }

    /// Whether the layer trains (f32 weights): `backward` and `set_weights` work.
    #[getter]
    fn trainable(&self) -> bool {
        self.layer.weight_formats() == [WeightFormat::F32; 3]
    }

    /// Replaces the weights of a trainable layer in place (a dict of numpy arrays in any
    /// naming, the same shapes and tensors).
    fn set_weights(&self, py: Python<'_>, weights: &Bound<'_, PyDict>) -> PyResult<()> {
        let bytes = dict_to_safetensors(weights)?;
        let naming = self.config.naming;
        let run = py.detach(|| {
            let weights = MoeWeights::from_safetensors_bytes(&bytes, naming, None, "weights dict")?;
            self.layer.set_weights(&weights)
        });
        run.map_err(|e| to_py(py, e))
    }

    /// Runs the layer on `x` (`[T, D]` or `[S, B, D]`, float32) and returns every output
    /// (SPEC): y, routes, gates, route_prob_max, counts, kept, route_prob_sum, n_dropped,
    /// aux_loss, z_loss.
    fn forward<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let x = float32(x, "x")?;
        let shape = x.shape().to_vec();
        let values: Vec<f32> = x.as_array().iter().copied().collect();
        let fits = num_tokens(&shape) <= self.layer.max_tokens_per_pass();
        let trained = fits && self.layer.weight_formats() == [WeightFormat::F32; 3];
        let run = py.detach(|| {
            if trained {
                self.layer.forward_train(&values, &shape)
            } else {
                self.layer.forward(&values, &shape)
            }
        });
        let output = run.map_err(|e| to_py(py, e))?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(LastForward { shape, trained });
        }
        output_dict(py, &output)
    }

    /// The experts alone on pre-routed tokens: `x [T, D]`, `top_k_index [T, k]` (expert
    /// ids), `top_k_weights [T, k]` → `y [T, D] = Σ_j w[t, j]·E_{e[t, j]}(x[t])`. No router,
    /// no capacity, no statistics.
    fn forward_experts<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        top_k_index: &Bound<'py, PyAny>,
        top_k_weights: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let x = float32(x, "x")?;
        let shape = x.shape().to_vec();
        let values: Vec<f32> = x.as_array().iter().copied().collect();
        let index: Vec<u32> = py
            .import("numpy")?
            .call_method1("asarray", (top_k_index, "int64"))
            .and_then(|a| a.extract::<PyReadonlyArrayDyn<'_, i64>>())
            .map_err(|e| value_error(format!("top_k_index: {e}")))?
            .as_array()
            .iter()
            .map(|&e| u32::try_from(e).unwrap_or(u32::MAX))
            .collect();
        let weights: Vec<f32> = float32(top_k_weights, "top_k_weights")?
            .as_array()
            .iter()
            .copied()
            .collect();
        let run = py.detach(|| {
            self.layer
                .forward_experts(&values, &shape, &index, &weights)
        });
        let y = run.map_err(|e| to_py(py, e))?;
        array(py, y, &shape)
    }

    /// The gradients of `Σ dy ⊙ y + aux_loss_coef·aux_loss + z_loss_coef·z_loss` (plus
    /// `Σ route_prob_sum_grad ⊙ route_prob_sum` when given) for the last forward (SPEC
    /// "Backward"): `x`, and every weight tensor under its native name.
    #[pyo3(signature = (dy, aux_loss_coef = 0.0, z_loss_coef = 0.0, route_prob_sum_grad = None))]
    fn backward<'py>(
        &self,
        py: Python<'py>,
        dy: &Bound<'py, PyAny>,
        aux_loss_coef: f32,
        z_loss_coef: f32,
        route_prob_sum_grad: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let dy = float32(dy, "dy")?;
        let prob_sum_grad: Option<Vec<f32>> = match route_prob_sum_grad {
            Some(g) => Some(
                float32(g, "route_prob_sum_grad")?
                    .as_array()
                    .iter()
                    .copied()
                    .collect(),
            ),
            None => None,
        };
        let shape = {
            let last = self
                .last
                .lock()
                .map_err(|_| value_error("a forward panicked"))?;
            match last.as_ref() {
                None => {
                    let error = MoeError::Training {
                        message: "backward needs a forward first".to_string(),
                    };
                    return Err(to_py(py, error));
                }
                Some(last) if !last.trained => {
                    // The forward ran without keeping what the backward needs: say why.
                    let why = self.layer.weight_formats().iter().find_map(|f| {
                        (*f != WeightFormat::F32).then(|| MoeError::TrainingNeedsF32 {
                            tensor: "experts".to_string(),
                            format: f.name().to_string(),
                        })
                    });
                    let error = why.unwrap_or_else(|| MoeError::Training {
                        message: format!(
                            "the last forward's batch ({} tokens) ran in chunks; backward \
                             takes batches of at most {} tokens",
                            num_tokens(&last.shape),
                            self.layer.max_tokens_per_pass()
                        ),
                    });
                    return Err(to_py(py, error));
                }
                Some(last) => last.shape.clone(),
            }
        };
        if dy.shape() != shape.as_slice() {
            return Err(value_error(format!(
                "dy: shape {:?}, expected the shape of y {shape:?}",
                dy.shape()
            )));
        }
        let values: Vec<f32> = dy.as_array().iter().copied().collect();
        let coefficients = LossCoefficients {
            aux: aux_loss_coef,
            z: z_loss_coef,
        };
        let run = py.detach(|| match &prob_sum_grad {
            Some(g) => self
                .layer
                .backward_with_prob_sum_grad(&values, g, coefficients),
            None => self.layer.backward(&values, coefficients),
        });
        let gradients = run.map_err(|e| to_py(py, e))?;
        gradients_dict(py, gradients, &shape, self.shape)
    }

    fn __repr__(&self) -> String {
        format!(
            "MoeLayer(num_experts={}, d_model={}, d_ff={}, top_k={})",
            self.shape.num_experts, self.shape.d_model, self.shape.d_ff, self.config.top_k
        )
    }
}

fn num_tokens(shape: &[usize]) -> usize {
    shape[..shape.len().saturating_sub(1)].iter().product()
}

/// `value` as a float32 numpy array (other float dtypes converted; anything else a
/// `ValueError` naming `what`).
fn float32<'py>(value: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let converted = value
        .py()
        .import("numpy")?
        .call_method1("asarray", (value, "float32"))
        .map_err(|e| value_error(format!("{what}: not convertible to a float32 array ({e})")))?;
    converted
        .extract::<PyReadonlyArrayDyn<'py, f32>>()
        .map_err(|e| value_error(format!("{what}: {e}")))
}

fn output_dict<'py>(py: Python<'py>, output: &MoeOutput) -> PyResult<Bound<'py, PyDict>> {
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

fn gradients_dict<'py>(
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

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<PyMoeLayer>()?;
    module.add_function(wrap_pyfunction!(adapter, module)?)?;
    module.add_function(wrap_pyfunction!(native_weights, module)?)?;
    Ok(())
}
