//! The browser API (wasm32 with WebGPU): build a layer from safetensors bytes or a seed,
//! run forwards on the browser's GPU and on the CPU reference compiled into the same
//! module, and read the statistics. Everything that waits is async: a browser must never
//! block.

use std::rc::Rc;

use wasm_bindgen::prelude::*;

use crate::config::MoeConfig;
use crate::cpu_reference;
use crate::gpu::{GpuContext, LayerOptions, MoeLayer};
use crate::output::MoeOutput;
use crate::rng::SeededRng;
use crate::weights::{LayerShape, MoeWeights};

fn js_error(error: impl std::fmt::Display) -> JsError {
    JsError::new(&error.to_string())
}

/// A layer on the browser's GPU, with its weights kept for the CPU reference.
#[wasm_bindgen]
pub struct WebMoeLayer {
    layer: Rc<MoeLayer>,
    config: MoeConfig,
    weights: Rc<MoeWeights>,
    adapter: String,
}

/// One forward's output and statistics.
#[wasm_bindgen]
pub struct WebMoeOutput {
    inner: MoeOutput,
}

#[wasm_bindgen]
impl WebMoeLayer {
    /// A seeded random layer (`nn.Linear`-style init, with biases).
    #[wasm_bindgen(js_name = random)]
    pub async fn random(
        num_experts: usize,
        d_model: usize,
        d_ff: usize,
        config_json: String,
        seed: u32,
    ) -> Result<WebMoeLayer, JsError> {
        let config = MoeConfig::from_json_str(&config_json).map_err(js_error)?;
        let shape = LayerShape {
            num_experts,
            d_model,
            d_ff,
        };
        let weights = MoeWeights::random(shape, config.gated, true, seed as u64);
        Self::build(config, weights).await
    }

    /// A layer from safetensors bytes in any supported naming.
    #[wasm_bindgen(js_name = fromSafetensors)]
    pub async fn from_safetensors(
        bytes: Vec<u8>,
        config_json: String,
    ) -> Result<WebMoeLayer, JsError> {
        let config = MoeConfig::from_json_str(&config_json).map_err(js_error)?;
        let weights = MoeWeights::from_safetensors_bytes(&bytes, config.naming, None, "weights")
            .map_err(js_error)?;
        Self::build(config, weights).await
    }

    async fn build(config: MoeConfig, weights: MoeWeights) -> Result<WebMoeLayer, JsError> {
        let context = GpuContext::new_async().await.map_err(js_error)?;
        let adapter = context.adapter_summary().to_string();
        let layer =
            MoeLayer::new_async(&context, config.clone(), &weights, LayerOptions::default())
                .await
                .map_err(js_error)?;
        Ok(WebMoeLayer {
            layer: Rc::new(layer),
            config,
            weights: Rc::new(weights),
            adapter,
        })
    }

    /// The adapter's name, backend and type.
    #[wasm_bindgen(getter)]
    pub fn adapter(&self) -> String {
        self.adapter.clone()
    }

    #[wasm_bindgen(getter, js_name = dModel)]
    pub fn d_model(&self) -> usize {
        self.weights.shape.d_model
    }

    /// The forward on the GPU; `x` holds `num_tokens × d_model` values.
    pub fn forward(&self, x: Vec<f32>, num_tokens: usize) -> js_sys::Promise {
        let layer = Rc::clone(&self.layer);
        let d_model = self.weights.shape.d_model;
        wasm_bindgen_futures::future_to_promise(async move {
            let output = layer
                .forward_async(&x, &[num_tokens, d_model])
                .await
                .map_err(|e| JsValue::from(js_error(e)))?;
            Ok(JsValue::from(WebMoeOutput { inner: output }))
        })
    }

    /// The same forward on the CPU reference.
    #[wasm_bindgen(js_name = forwardCpu)]
    pub fn forward_cpu(&self, x: Vec<f32>, num_tokens: usize) -> Result<WebMoeOutput, JsError> {
        let shape = [num_tokens, self.weights.shape.d_model];
        cpu_reference::forward(&self.config, &self.weights, &x, &shape)
            .map(|inner| WebMoeOutput { inner })
            .map_err(js_error)
    }
}

#[wasm_bindgen]
impl WebMoeOutput {
    #[wasm_bindgen(getter)]
    pub fn y(&self) -> Vec<f32> {
        self.inner.y.clone()
    }

    #[wasm_bindgen(getter)]
    pub fn routes(&self) -> Vec<u32> {
        self.inner.routes.clone()
    }

    #[wasm_bindgen(getter)]
    pub fn counts(&self) -> Vec<u32> {
        self.inner.counts.clone()
    }

    #[wasm_bindgen(getter)]
    pub fn kept(&self) -> Vec<u32> {
        self.inner.kept.clone()
    }

    #[wasm_bindgen(getter, js_name = nDropped)]
    pub fn n_dropped(&self) -> u32 {
        self.inner.n_dropped
    }

    #[wasm_bindgen(getter, js_name = auxLoss)]
    pub fn aux_loss(&self) -> f32 {
        self.inner.aux_loss
    }

    #[wasm_bindgen(getter, js_name = zLoss)]
    pub fn z_loss(&self) -> f32 {
        self.inner.z_loss
    }

    /// Whether `other` (the CPU reference) agrees: the same routes and counts, and y within
    /// `tolerance` relative to the largest |y|. Returns the max abs difference of y, or a
    /// negative number when integers differ.
    #[wasm_bindgen(js_name = compareWith)]
    pub fn compare_with(&self, other: &WebMoeOutput) -> f32 {
        let (a, b) = (&self.inner, &other.inner);
        if a.routes != b.routes
            || a.counts != b.counts
            || a.kept != b.kept
            || a.n_dropped != b.n_dropped
        {
            return -1.0;
        }
        a.y.iter()
            .zip(&b.y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max)
    }
}

/// Seeded standard-normal tokens, `num_tokens × d_model` values.
#[wasm_bindgen(js_name = randomTokens)]
pub fn random_tokens(num_tokens: usize, d_model: usize, seed: u32) -> Vec<f32> {
    SeededRng::new(seed as u64).normal_vec(num_tokens * d_model)
}

/// The default config JSON with `top_k` and `capacity_factor` set.
#[wasm_bindgen(js_name = configJson)]
pub fn config_json(top_k: usize, capacity_factor: f64) -> String {
    let config = MoeConfig {
        top_k,
        capacity_factor,
        ..MoeConfig::default()
    };
    serde_json::to_string(&config).unwrap_or_else(|_| "{}".to_string())
}
