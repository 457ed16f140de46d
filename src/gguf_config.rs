//! The layer's config from a GGUF file's metadata (SPEC "The families people run"): what
//! llama.cpp runs for the file's `general.architecture` (llama, i.e. Mixtral, qwen2moe,
//! qwen3moe, olmoe, deepseek2, glm4moe, gpt-oss, ernie4_5-moe, llama4), with the
//! `{arch}.expert_*` keys over each family's defaults — the router's scores, groups,
//! renormalisation and scale, the experts' activation, dropless as llama.cpp runs them. Whether the experts are gated,
//! the shared expert, its gate and the score bias come with the tensors.
//!
//! An architecture outside the families keeps the plain layer's defaults with the experts
//! and top-k the metadata gives (a layer config JSON supplies the rest).

use crate::config::{Activation, GateOn, GroupScore, MoeConfig, RouterScore};
use crate::error::{MoeError, Result};
use crate::weights::{GgufLayerInfo, MoeWeights};

/// llama.cpp's `expert_gating_func` values.
const GATING_SOFTMAX: u64 = 1;
const GATING_SIGMOID: u64 = 2;
/// A softmax over the chosen logits only: the same weights as softmax, top-k, renormalise.
const GATING_SOFTMAX_WEIGHT: u64 = 3;

/// The layer's config for `weights` as the file's metadata `info` describes it.
pub fn config_from_gguf(info: &GgufLayerInfo, weights: &MoeWeights) -> Result<MoeConfig> {
    let arch = info.architecture.as_deref().unwrap_or("");
    let plain = MoeConfig {
        n_experts: info.expert_count,
        top_k: info.expert_used_count.unwrap_or(1),
        ..MoeConfig::default()
    };
    // llama.cpp runs every family's experts with SiLU but gpt-oss's.
    let dropless = MoeConfig {
        drop_tokens: false,
        gated: weights.w3.is_some(),
        activation: Activation::Silu,
        ..plain.clone()
    };
    let mut config = match arch {
        "llama" | "mixtral" | "qwen3moe" | "ernie4_5-moe" => MoeConfig {
            normalize_top_k: true,
            ..dropless
        },
        "qwen2moe" | "olmoe" => dropless,
        "deepseek2" | "glm4moe" => MoeConfig {
            // DeepSeek-V2's files name no gating function: a softmax, groups by their best.
            router_score: if arch == "glm4moe" {
                RouterScore::Sigmoid
            } else {
                RouterScore::Softmax
            },
            normalize_top_k: arch == "glm4moe",
            routed_scaling_factor: info.expert_weights_scale.unwrap_or(1.0) as f32,
            ..dropless
        },
        "gpt-oss" => MoeConfig {
            normalize_top_k: true,
            // llama.cpp's constants for gpt-oss, as transformers' config defaults.
            activation: Activation::SwigluOai,
            swiglu_alpha: 1.702,
            swiglu_limit: 7.0,
            ..dropless
        },
        // llama.cpp weighs Llama 4's experts' input by the sigmoid of the chosen logit.
        "llama4" => MoeConfig {
            router_score: RouterScore::Sigmoid,
            gate_on: GateOn::Input,
            ..dropless
        },
        _ => return Ok(plain),
    };
    match info.expert_gating_func {
        None | Some(0) => {}
        Some(GATING_SOFTMAX) => config.router_score = RouterScore::Softmax,
        Some(GATING_SIGMOID) => config.router_score = RouterScore::Sigmoid,
        Some(GATING_SOFTMAX_WEIGHT) => {
            config.router_score = RouterScore::Softmax;
            config.normalize_top_k = true;
        }
        Some(other) => {
            return Err(MoeError::config(
                &format!("{arch}.expert_gating_func"),
                format!("{other} is none of llama.cpp's 1 (softmax), 2 (sigmoid), 3 (softmax of the chosen)"),
            ))
        }
    }
    if let Some(norm) = info.expert_weights_norm {
        config.normalize_top_k = norm || info.expert_gating_func == Some(GATING_SOFTMAX_WEIGHT);
    }
    if let Some(groups) = info.expert_group_count.filter(|&g| g > 1) {
        config.n_group = Some(groups);
        config.topk_group = info.expert_group_used_count;
        // DeepSeek-V3's sum of each group's two best for sigmoid scores, V2's best for
        // softmax ones.
        config.group_score = match config.router_score {
            RouterScore::Sigmoid => GroupScore::Top2Sum,
            RouterScore::Softmax => GroupScore::Max,
        };
    }
    config.validate()?;
    Ok(config)
}
