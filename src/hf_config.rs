//! The layer's config from a transformers model `config.json` (one with `model_type`), for
//! the layer a prefix such as `model.layers.3.mlp.` names, with each family's semantics
//! (SPEC "The families people run"): the router's scores, groups and scaling, the experts'
//! activation, dropless as transformers runs them. The shared expert, the score bias and
//! the router bias come with the weights. A dense layer, an unknown `model_type` or a family
//! the layer cannot express is a one-line error saying so.

use serde_json::Value;

use crate::config::{Activation, GateOn, MoeConfig, RouterScore};
use crate::error::{MoeError, Result};

/// The families derived, for the errors.
const FAMILIES: &str =
    "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, glm4_moe, gpt_oss, ernie4_5_moe, llama4";

/// Whether `value` is a transformers model config rather than the layer's own.
pub fn is_transformers_config(value: &Value) -> bool {
    value.get("model_type").is_some_and(Value::is_string)
}

fn error(message: String) -> MoeError {
    MoeError::config("model_type", message)
}

/// The first of `keys` present as an unsigned integer.
fn count(config: &Value, keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|key| config.get(*key)?.as_u64())
        .map(|v| v as usize)
}

fn required(config: &Value, keys: &[&str], family: &str) -> Result<usize> {
    count(config, keys).ok_or_else(|| error(format!("{family}: the config has none of {keys:?}")))
}

fn flag(config: &Value, key: &str, default: bool) -> bool {
    config.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn number(config: &Value, key: &str, default: f64) -> f64 {
    config.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// The experts' activation from `hidden_act`.
fn activation(config: &Value, family: &str) -> Result<Activation> {
    let name = config
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    Ok(match name {
        "silu" | "swish" => Activation::Silu,
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "relu" => Activation::Relu,
        "relu2" => Activation::Relu2,
        "quick_gelu" => Activation::QuickGelu,
        other => {
            return Err(error(format!(
                "{family}: hidden_act {other:?} is none switch_moe has"
            )))
        }
    })
}

/// The layer index a prefix names (`model.layers.3.mlp.` → 3).
fn layer_index(prefix: Option<&str>) -> Option<usize> {
    let prefix = prefix?;
    let (_, rest) = prefix.split_once("layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Whether layer `layer` is dense (no experts) in this family's config.
fn is_dense(config: &Value, family: &str, layer: usize) -> bool {
    match family {
        "deepseek_v3" | "glm4_moe" => {
            let dense = count(config, &["first_k_dense_replace"]).unwrap_or(0);
            let every = count(config, &["moe_layer_freq"]).unwrap_or(1).max(1);
            layer < dense || !layer.is_multiple_of(every)
        }
        "qwen2_moe" | "qwen3_moe" => {
            let only = config.get("mlp_only_layers").and_then(Value::as_array);
            let step = count(config, &["decoder_sparse_step"]).unwrap_or(1).max(1);
            only.is_some_and(|l| l.iter().any(|v| v.as_u64() == Some(layer as u64)))
                || !(layer + 1).is_multiple_of(step)
        }
        "ernie4_5_moe" => {
            let start = count(config, &["moe_layer_start_index"]).unwrap_or(0);
            let end = count(config, &["moe_layer_end_index"]).unwrap_or(usize::MAX);
            let every = count(config, &["moe_layer_interval"]).unwrap_or(1).max(1);
            layer < start || layer > end || !(layer - start).is_multiple_of(every)
        }
        // Llama 4: the layers moe_layers lists, or every interleave_moe_layer_step-th.
        "llama4" | "llama4_text" => match config.get("moe_layers").and_then(Value::as_array) {
            Some(moe) => !moe.iter().any(|v| v.as_u64() == Some(layer as u64)),
            None => {
                let step = count(config, &["interleave_moe_layer_step"])
                    .unwrap_or(1)
                    .max(1);
                !(layer + 1).is_multiple_of(step)
            }
        },
        _ => false,
    }
}

/// [`config_from_transformers`] of a model config given as JSON text.
pub fn config_from_transformers_json(text: &str, prefix: Option<&str>) -> Result<MoeConfig> {
    let model: Value = serde_json::from_str(text)
        .map_err(|e| MoeError::config("<json>", format!("not valid JSON: {e}")))?;
    config_from_transformers(&model, prefix)
}

/// The layer's config from a transformers model config, for the layer `prefix` names (any
/// MoE layer of the model without one).
pub fn config_from_transformers(model: &Value, prefix: Option<&str>) -> Result<MoeConfig> {
    let family = model
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    // Composite models keep the language model's config in text_config.
    let config = match model.get("text_config") {
        Some(text) if text.is_object() => text,
        _ => model,
    };
    if family == "phimoe" {
        return Err(error(
            "phimoe: Phi-3.5-MoE's sparsemixer routing is not expressible by the layer".into(),
        ));
    }
    if let Some(layer) = layer_index(prefix) {
        if is_dense(config, family, layer) {
            return Err(error(format!(
                "{family}: layer {layer} is a dense MLP, not a mixture of experts"
            )));
        }
    }
    let experts = [
        "n_routed_experts",
        "num_local_experts",
        "num_experts",
        "moe_num_experts",
    ];
    let chosen = ["num_experts_per_tok", "moe_k", "experts_per_token"];
    let dropless = MoeConfig {
        drop_tokens: false,
        gated: true,
        ..MoeConfig::default()
    };
    let mut layer = match family {
        "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" => MoeConfig {
            // Mixtral always renormalises; the others as their flag says.
            normalize_top_k: family == "mixtral" || flag(config, "norm_topk_prob", false),
            activation: activation(config, family)?,
            ..dropless
        },
        "deepseek_v3" | "glm4_moe" => {
            let groups = count(config, &["n_group"]).filter(|&g| g > 1);
            MoeConfig {
                router_score: RouterScore::Sigmoid,
                n_group: groups,
                topk_group: groups.and(count(config, &["topk_group"])),
                normalize_top_k: flag(config, "norm_topk_prob", true),
                routed_scaling_factor: number(config, "routed_scaling_factor", 1.0) as f32,
                activation: activation(config, family)?,
                ..dropless
            }
        }
        // Top-k of the logits, then a softmax over the k: softmax, top-k, normalised.
        "gpt_oss" => MoeConfig {
            normalize_top_k: true,
            activation: Activation::SwigluOai,
            swiglu_limit: number(config, "swiglu_limit", 7.0) as f32,
            swiglu_alpha: number(config, "swiglu_alpha", 1.702) as f32,
            ..dropless
        },
        "ernie4_5_moe" => MoeConfig {
            normalize_top_k: true,
            activation: activation(config, family)?,
            ..dropless
        },
        // The top-k of the logits, their sigmoids multiplying the experts' inputs.
        "llama4" | "llama4_text" => MoeConfig {
            router_score: RouterScore::Sigmoid,
            gate_on: GateOn::Input,
            activation: activation(config, family)?,
            ..dropless
        },
        other => {
            return Err(error(format!(
                "{other:?}: switch_moe derives the layer of {FAMILIES}; give the layer's own \
                 config JSON instead"
            )))
        }
    };
    layer.n_experts = Some(required(config, &experts, family)?);
    layer.top_k = required(config, &chosen, family)?;
    layer.validate()?;
    Ok(layer)
}
