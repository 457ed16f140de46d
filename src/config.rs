//! `MoeConfig`: every key of the layer's JSON config, its defaults, and its validation.
//!
//! The JSON form is the one of the `forward` tool (see README): all keys optional,
//! unknown keys rejected. Parsing goes key by key so that every error names its key.

use serde::{Deserialize, Serialize};

pub use crate::activation::{Activation, HiddenUnit};
use crate::error::{MoeError, Result};
use crate::weights::MoeWeights;

/// How the router turns logits into scores `p` (SPEC "The families people run").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterScore {
    /// `p = softmax(h)` over the experts (Switch, Mixtral, Qwen, OLMoE).
    Softmax,
    /// `p[e] = σ(h[e])` per expert (DeepSeek-V3, GLM-4.5, Kimi K2, Llama 4).
    Sigmoid,
}

impl std::str::FromStr for RouterScore {
    type Err = String;

    /// The config JSON's name (`softmax`, `sigmoid`).
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(text.to_string()))
            .map_err(|_| format!("{text:?}: the router's scores are softmax or sigmoid"))
    }
}

/// A group's score in group-limited top-k.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// The sum of its two highest selection scores (DeepSeek-V3).
    Top2Sum,
    /// Its highest selection score (DeepSeek-V2).
    Max,
}

/// Group-limited top-k: the experts form `count` consecutive groups; only the experts of
/// the `kept` best groups (by [`GroupScore`], ties to the lower group) may be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertGroups {
    pub count: usize,
    pub kept: usize,
    pub score: GroupScore,
}

/// Everything the router needs besides its weights (steps 1–4 of the forward).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Router {
    pub top_k: usize,
    pub normalize_top_k: bool,
    pub score: RouterScore,
    pub groups: Option<ExpertGroups>,
    /// Multiplies the gates after normalisation.
    pub routed_scaling_factor: f32,
}

impl Router {
    /// Switch's and Mixtral's router: softmax, plain top-k, no scaling.
    pub fn softmax(top_k: usize, normalize_top_k: bool) -> Self {
        Router {
            top_k,
            normalize_top_k,
            score: RouterScore::Softmax,
            groups: None,
            routed_scaling_factor: 1.0,
        }
    }
}

impl From<&MoeConfig> for Router {
    fn from(config: &MoeConfig) -> Self {
        config.router()
    }
}

/// The most expert groups of group-limited top-k (the GPU keeps a token's groups in one
/// 32-bit mask).
pub const MAX_EXPERT_GROUPS: usize = 32;

/// What the gate of a choice multiplies (with `scale_by_prob`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOn {
    /// The expert's output, `g·E(x)` (every family but Llama 4).
    Output,
    /// The expert's input, `E(g·x)` (Llama 4).
    Input,
}

impl std::str::FromStr for GateOn {
    type Err = String;

    /// The config JSON's name (`output`, `input`).
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(text.to_string()))
            .map_err(|_| format!("{text:?}: the gates multiply the experts' output or input"))
    }
}

/// What a token gets when every one of its assignments was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// `y = x` (times `route_prob_max` when `scale_by_prob`), as labml_nn and
    /// Hugging Face transformers ≤ 4.51 do.
    PassThrough,
    /// `y = 0`: the residual connection carries the token (transformers ≥ 4.52).
    Zero,
}

/// Which tensor names a weight file uses (see README, "Weight files").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    /// Detect from the tensor names.
    Auto,
    Native,
    Labml,
    HfSwitch,
    /// Mixtral, either the per-expert layout of transformers 4.x or the stacked one of 5.x.
    HfMixtral,
    /// llama.cpp's GGUF (`blk.N.ffn_gate_inp.weight`, `ffn_{gate,up,down}_exps.weight`),
    /// recognised by the file's magic.
    Gguf,
}

/// The layer's hyper-parameters, as in the config JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Number of experts; if given, it must agree with the weights.
    pub n_experts: Option<usize>,
    /// Experts per token (1 for Switch).
    pub top_k: usize,
    /// Capacity per expert and group, relative to a perfectly balanced load.
    pub capacity_factor: f64,
    /// A fixed capacity per expert and group; overrides `capacity_factor`.
    pub expert_capacity: Option<usize>,
    /// Tokens per capacity group; `None` means all tokens form one group.
    pub group_size: Option<usize>,
    /// Whether experts drop assignments beyond their capacity.
    pub drop_tokens: bool,
    pub drop_policy: DropPolicy,
    /// Multiply expert outputs (or, with `gate_on: input`, inputs) by their gate weight.
    pub scale_by_prob: bool,
    pub gate_on: GateOn,
    pub activation: Activation,
    /// swiglu_oai's clamp L (gpt-oss: 7).
    pub swiglu_limit: f32,
    /// swiglu_oai's sigmoid slope α (gpt-oss: 1.702).
    pub swiglu_alpha: f32,
    /// Gated FFN: `act(x·W1ᵀ + b1) ⊙ (x·W3ᵀ + b3)`.
    pub gated: bool,
    /// Divide the top-k gate weights by their sum (Mixtral).
    pub normalize_top_k: bool,
    /// Softmax or sigmoid scores.
    pub router_score: RouterScore,
    /// Expert groups for group-limited top-k (DeepSeek-V3: 8); `None`: no groups.
    pub n_group: Option<usize>,
    /// Groups kept per token (DeepSeek-V3: 4); needs `n_group`.
    pub topk_group: Option<usize>,
    pub group_score: GroupScore,
    /// Multiplies the gates after normalisation (DeepSeek-V3: 2.5).
    pub routed_scaling_factor: f32,
    pub naming: Naming,
}

impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            n_experts: None,
            top_k: 1,
            capacity_factor: 1.25,
            expert_capacity: None,
            group_size: None,
            drop_tokens: true,
            drop_policy: DropPolicy::PassThrough,
            scale_by_prob: true,
            gate_on: GateOn::Output,
            activation: Activation::Relu,
            swiglu_limit: 7.0,
            swiglu_alpha: 1.702,
            gated: false,
            normalize_top_k: false,
            router_score: RouterScore::Softmax,
            n_group: None,
            topk_group: None,
            group_score: GroupScore::Top2Sum,
            routed_scaling_factor: 1.0,
            naming: Naming::Auto,
        }
    }
}

/// Every key of the config JSON.
const KEYS: [&str; 20] = [
    "n_experts",
    "top_k",
    "capacity_factor",
    "expert_capacity",
    "group_size",
    "drop_tokens",
    "drop_policy",
    "scale_by_prob",
    "gate_on",
    "activation",
    "swiglu_limit",
    "swiglu_alpha",
    "gated",
    "normalize_top_k",
    "router_score",
    "n_group",
    "topk_group",
    "group_score",
    "routed_scaling_factor",
    "naming",
];

/// Deserializes one key's value, naming the key on failure.
fn parse_value<T: serde::de::DeserializeOwned>(key: &str, value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| MoeError::config(key, e.to_string()))
}

impl MoeConfig {
    /// Parses the config JSON: an object whose keys are all optional (`null` means the
    /// default); unknown keys are an error.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::from_json_str_over(text, MoeConfig::default())
    }

    /// Parses the config JSON over `defaults`: keys absent or `null` keep their value there
    /// (a GGUF file's metadata gives `n_experts` and `top_k` when the config does not).
    pub fn from_json_str_over(text: &str, defaults: MoeConfig) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| MoeError::config("<json>", format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(MoeError::config(
                "<json>",
                "the config must be a JSON object",
            ));
        };
        let mut config = defaults;
        for (key, value) in map {
            // `null` means the key's default (Python's `json.dump` writes `None` as null).
            if value.is_null() && KEYS.contains(&key.as_str()) {
                continue;
            }
            match key.as_str() {
                "n_experts" => config.n_experts = parse_value(&key, value)?,
                "top_k" => config.top_k = parse_value(&key, value)?,
                "capacity_factor" => config.capacity_factor = parse_value(&key, value)?,
                "expert_capacity" => config.expert_capacity = parse_value(&key, value)?,
                "group_size" => config.group_size = parse_value(&key, value)?,
                "drop_tokens" => config.drop_tokens = parse_value(&key, value)?,
                "drop_policy" => config.drop_policy = parse_value(&key, value)?,
                "scale_by_prob" => config.scale_by_prob = parse_value(&key, value)?,
                "gate_on" => config.gate_on = parse_value(&key, value)?,
                "activation" => config.activation = parse_value(&key, value)?,
                "swiglu_limit" => config.swiglu_limit = parse_value(&key, value)?,
                "swiglu_alpha" => config.swiglu_alpha = parse_value(&key, value)?,
                "gated" => config.gated = parse_value(&key, value)?,
                "normalize_top_k" => config.normalize_top_k = parse_value(&key, value)?,
                "router_score" => config.router_score = parse_value(&key, value)?,
                "n_group" => config.n_group = parse_value(&key, value)?,
                "topk_group" => config.topk_group = parse_value(&key, value)?,
                "group_score" => config.group_score = parse_value(&key, value)?,
                "routed_scaling_factor" => config.routed_scaling_factor = parse_value(&key, value)?,
                "naming" => config.naming = parse_value(&key, value)?,
                _ => return Err(MoeError::config(&key, "unknown key")),
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The config as JSON text with every key (what `from_json_str` reads back).
    pub fn to_json_string(&self) -> String {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads and parses a config file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_json_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::from_json_file_over(path, MoeConfig::default())
    }

    /// Reads and parses a config file over `defaults` (see [`MoeConfig::from_json_str_over`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_json_file_over(
        path: impl AsRef<std::path::Path>,
        defaults: MoeConfig,
    ) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| MoeError::file(path, e))?;
        Self::from_json_str_over(&text, defaults).map_err(|e| e.in_file(path))
    }

    /// Checks what can be checked without the weights and the input.
    pub fn validate(&self) -> Result<()> {
        if self.n_experts == Some(0) {
            return Err(MoeError::config("n_experts", "must be at least 1"));
        }
        if self.top_k == 0 {
            return Err(MoeError::config("top_k", "must be at least 1"));
        }
        if let Some(n) = self.n_experts {
            if self.top_k > n {
                return Err(MoeError::config(
                    "top_k",
                    format!("{} is more than n_experts = {n}", self.top_k),
                ));
            }
        }
        if self.drop_tokens
            && self.expert_capacity.is_none()
            && !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0)
        {
            return Err(MoeError::config(
                "capacity_factor",
                format!(
                    "must be a finite number > 0 when dropping tokens, got {}",
                    self.capacity_factor
                ),
            ));
        }
        if self.group_size == Some(0) {
            return Err(MoeError::config("group_size", "must be at least 1"));
        }
        if self.activation == Activation::SwigluOai && !self.gated {
            return Err(MoeError::config(
                "activation",
                "swiglu_oai is a gated activation (its v is the W3 projection): set \"gated\": true",
            ));
        }
        if !(self.swiglu_limit.is_finite() && self.swiglu_limit > 0.0) {
            return Err(MoeError::config(
                "swiglu_limit",
                format!("must be a finite number > 0, got {}", self.swiglu_limit),
            ));
        }
        if !self.swiglu_alpha.is_finite() {
            return Err(MoeError::config(
                "swiglu_alpha",
                format!("must be finite, got {}", self.swiglu_alpha),
            ));
        }
        self.validate_routing()
    }

    fn validate_routing(&self) -> Result<()> {
        let factor = self.routed_scaling_factor;
        if !(factor.is_finite() && factor > 0.0) {
            return Err(MoeError::config(
                "routed_scaling_factor",
                format!("must be a finite number > 0, got {factor}"),
            ));
        }
        match (self.n_group, self.topk_group) {
            (Some(groups), _) if groups == 0 || groups > MAX_EXPERT_GROUPS => {
                Err(MoeError::config(
                    "n_group",
                    format!("{groups}: must be 1 to {MAX_EXPERT_GROUPS}"),
                ))
            }
            (None, Some(_)) => Err(MoeError::config(
                "topk_group",
                "needs n_group (the number of expert groups)",
            )),
            (Some(groups), Some(kept)) if kept == 0 || kept > groups => Err(MoeError::config(
                "topk_group",
                format!("{kept}: must be 1 to n_group ({groups})"),
            )),
            _ => Ok(()),
        }
    }

    /// The router's settings.
    pub fn router(&self) -> Router {
        Router {
            top_k: self.top_k,
            normalize_top_k: self.normalize_top_k,
            score: self.router_score,
            groups: self.n_group.map(|count| ExpertGroups {
                count,
                kept: self.topk_group.unwrap_or(count),
                score: self.group_score,
            }),
            routed_scaling_factor: self.routed_scaling_factor,
        }
    }

    /// Whether the gates multiply the experts' inputs rather than their outputs.
    pub fn gates_input(&self) -> bool {
        self.scale_by_prob && self.gate_on == GateOn::Input
    }

    /// What the experts' hidden units compute.
    pub fn hidden_unit(&self) -> HiddenUnit {
        HiddenUnit {
            activation: self.activation,
            swiglu_limit: self.swiglu_limit,
            swiglu_alpha: self.swiglu_alpha,
        }
    }

    /// Checks the config against the number of experts of the weights.
    pub fn validate_for_experts(&self, num_experts: usize) -> Result<()> {
        self.validate()?;
        if let Some(n) = self.n_experts {
            if n != num_experts {
                return Err(MoeError::config(
                    "n_experts",
                    format!("{n} disagrees with the weights, which hold {num_experts} experts"),
                ));
            }
        }
        if self.top_k > num_experts {
            return Err(MoeError::config(
                "top_k",
                format!("{} is more than the {num_experts} experts", self.top_k),
            ));
        }
        if let Some(groups) = self.router().groups {
            if !num_experts.is_multiple_of(groups.count) {
                return Err(MoeError::config(
                    "n_group",
                    format!("{} does not divide the {num_experts} experts", groups.count),
                ));
            }
            let size = num_experts / groups.count;
            if groups.score == GroupScore::Top2Sum && size < 2 {
                return Err(MoeError::config(
                    "group_score",
                    format!("top2_sum needs 2 experts per group; {} groups of {num_experts} experts have {size}", groups.count),
                ));
            }
            if self.top_k > groups.kept * size {
                return Err(MoeError::config(
                    "top_k",
                    format!(
                        "{} is more than the {} experts of the topk_group = {} groups kept",
                        self.top_k,
                        groups.kept * size,
                        groups.kept
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the config against the weights: the number of experts, and `gated` against
    /// the presence of `w3` (ignoring a `w3`, or gating without one, would be a silent
    /// wrong answer).
    pub fn validate_for_weights(&self, weights: &MoeWeights) -> Result<()> {
        self.validate_for_experts(weights.shape.num_experts)?;
        match (self.gated, weights.w3.is_some()) {
            (true, false) => Err(MoeError::config(
                "gated",
                "true, but the weights have no w3 (gate/value) tensor",
            )),
            (false, true) => Err(MoeError::config(
                "gated",
                "false, but the weights hold a w3 (gate/value) tensor; set \"gated\": true",
            )),
            _ => Ok(()),
        }
    }

    /// The capacity group size for `num_tokens` tokens, checking that it divides them.
    pub fn group_size_for(&self, num_tokens: usize) -> Result<usize> {
        match self.group_size {
            None => Ok(num_tokens),
            Some(g) if g > 0 && num_tokens.is_multiple_of(g) => Ok(g),
            Some(g) => Err(MoeError::config(
                "group_size",
                format!("{g} does not divide the {num_tokens} tokens of the input"),
            )),
        }
    }

    /// Assignments each expert may keep per group of `group_size` tokens, or `None`
    /// when nothing is dropped. `floor(capacity_factor · k · G / N)`, evaluated in f64.
    pub fn capacity(&self, group_size: usize, num_experts: usize) -> Option<usize> {
        if !self.drop_tokens {
            return None;
        }
        Some(self.expert_capacity.unwrap_or_else(|| {
            (self.capacity_factor * self.top_k as f64 * group_size as f64 / num_experts as f64)
                .floor() as usize
        }))
    }
}
