//! `MoeLayer` for Python: forward, the experts on pre-routed tokens, and their backwards.

use std::sync::Mutex;

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use switch_moe::{
    LayerOptions, LayerShape, LossCoefficients, MoeConfig, MoeError, MoeLayer, MoeWeights,
    WeightFormat,
};

use crate::context;
use crate::convert::{
    array, config_json, dict_to_safetensors, float32, gradients_dict, load, num_tokens,
    output_dict, to_py, value_error,
};

/// What the last forward needs for its backward.
struct LastForward {
    shape: Vec<usize>,
    /// Whether the layer kept it (a trainable layer, a batch of one pass).
    trained: bool,
    /// Whether it was `forward_experts` (its backward is `backward_experts`).
    experts: bool,
    /// Its k (`forward_experts`).
    top_k: usize,
}

/// A Mixture-of-Experts layer on the GPU.
#[pyclass(module = "switch_moe._native", name = "MoeLayer", frozen)]
pub(crate) struct PyMoeLayer {
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
            // f32 weights train; stored formats run forward only on the GPU.
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
        self.layer.is_trainable()
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
        let trained = self.trains(&shape);
        let run = py.detach(|| {
            if trained {
                self.layer.forward_train(&values, &shape)
            } else {
                self.layer.forward(&values, &shape)
            }
        });
        let output = run.map_err(|e| to_py(py, e))?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(LastForward {
                shape,
                trained,
                experts: false,
                top_k: self.config.top_k,
            });
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
        let trained = self.trains(&shape);
        let run = py.detach(|| {
            if trained {
                self.layer
                    .forward_experts_train(&values, &shape, &index, &weights)
            } else {
                self.layer
                    .forward_experts(&values, &shape, &index, &weights)
            }
        });
        let y = run.map_err(|e| to_py(py, e))?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(LastForward {
                top_k: index.len() / num_tokens(&shape).max(1),
                shape: shape.clone(),
                trained,
                experts: true,
            });
        }
        array(py, y, &shape)
    }

    /// The gradients of `Σ dy ⊙ y` for the last `forward_experts`: `x`, `top_k_weights`
    /// (`[T, k]`) and every expert tensor under its native name (the router is not in
    /// its graph).
    fn backward_experts<'py>(
        &self,
        py: Python<'py>,
        dy: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let dy = float32(dy, "dy")?;
        let (shape, top_k) = self.last_trained(py, true, dy.shape())?;
        let values: Vec<f32> = dy.as_array().iter().copied().collect();
        let run = py.detach(|| self.layer.backward_experts(&values));
        let gradients = run.map_err(|e| to_py(py, e))?;
        let dict = gradients_dict(py, gradients.gradients, &shape, self.shape)?;
        for router in ["router.weight", "router.bias"] {
            if dict.contains(router)? {
                dict.del_item(router)?;
            }
        }
        let t = num_tokens(&shape);
        dict.set_item(
            "top_k_weights",
            array(py, gradients.top_k_weights, &[t, top_k])?,
        )?;
        Ok(dict)
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
        let (shape, _) = self.last_trained(py, false, dy.shape())?;
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

impl PyMoeLayer {
    /// Whether a forward of `shape` keeps what a backward needs: a trainable layer, one
    /// pass.
    fn trains(&self, shape: &[usize]) -> bool {
        self.layer.is_trainable() && num_tokens(shape) <= self.layer.max_tokens_per_pass()
    }

    /// The shape and k of the last forward, which the backward asked for (`experts`:
    /// `backward_experts`) differentiates, with `dy` of `dy_shape`; else the error that
    /// says why not.
    fn last_trained(
        &self,
        py: Python<'_>,
        experts: bool,
        dy_shape: &[usize],
    ) -> PyResult<(Vec<usize>, usize)> {
        let (backward, forward) = if experts {
            ("backward_experts", "forward_experts")
        } else {
            ("backward", "forward")
        };
        let last = self
            .last
            .lock()
            .map_err(|_| value_error("a forward panicked"))?;
        let training = |message: String| to_py(py, MoeError::Training { message });
        let last = match last.as_ref() {
            None => return Err(training(format!("{backward} needs a {forward} first"))),
            Some(last) if last.experts != experts => {
                let other = if last.experts {
                    "backward_experts"
                } else {
                    "backward"
                };
                return Err(training(format!(
                    "the last forward's backward is {other}, not {backward}"
                )));
            }
            Some(last) => last,
        };
        if !last.trained {
            // The forward ran without keeping what the backward needs: say why.
            let why = self.layer.weight_formats().iter().find_map(|f| {
                (*f != WeightFormat::F32).then(|| MoeError::TrainingNeedsF32 {
                    tensor: "experts".to_string(),
                    format: f.name().to_string(),
                })
            });
            let error = why.unwrap_or_else(|| MoeError::Training {
                message: format!(
                    "the last forward's batch ({} tokens) ran in chunks; {backward} takes \
                     batches of at most {} tokens",
                    num_tokens(&last.shape),
                    self.layer.max_tokens_per_pass()
                ),
            });
            return Err(to_py(py, error));
        }
        if dy_shape != last.shape.as_slice() {
            return Err(value_error(format!(
                "dy: shape {dy_shape:?}, expected the shape of y {:?}",
                last.shape
            )));
        }
        Ok((last.shape.clone(), last.top_k))
    }
}
