//! Loading `MoeWeights` from safetensors in every naming people's checkpoints use: the
//! naming is detected from the tensor names, an optional prefix picks one layer out of a
//! whole model, F32/F16/BF16 expert tensors are kept as stored (read through
//! `tensor_source`).

use std::collections::{BTreeMap, BTreeSet};

use super::tensor_source::{rank2, rank3, TensorSource};
use super::transposed::{Transposed, TRANSPOSED_KEYS};
use super::{LayerShape, MoeWeights, SharedExpert, SHARED_NAMES};
use crate::config::Naming;
use crate::error::{MoeError, Result};
#[cfg(not(target_arch = "wasm32"))]
use crate::tensor_io::map_file;
use crate::tensor_io::parse_safetensors;

/// The naming (and for Mixtral, the layout) a weight file was found to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layout {
    Native,
    Labml,
    HfSwitch,
    /// transformers 4.x and published checkpoints: `experts.{i}.w1|w2|w3.weight`.
    HfMixtralPerExpert,
    /// transformers 5.x: `experts.gate_up_proj`, `experts.down_proj`.
    HfMixtralStacked,
    /// `gate.weight`: Mixtral's router, shared by both Mixtral layouts.
    HfMixtralRouter,
    /// transformers' gpt-oss: `router.*` with `experts.gate_up_proj [N, D, 2F]` and biases.
    HfGptOss,
    /// transformers' Llama 4: `router.weight` with `experts.gate_up_proj [N, D, 2F]`, no
    /// biases, and `shared_expert.*`.
    HfLlama4,
}

impl Layout {
    fn naming(self) -> Naming {
        match self {
            Layout::Native => Naming::Native,
            Layout::Labml => Naming::Labml,
            Layout::HfSwitch => Naming::HfSwitch,
            Layout::HfMixtralPerExpert
            | Layout::HfMixtralStacked
            | Layout::HfMixtralRouter
            | Layout::HfGptOss
            | Layout::HfLlama4 => Naming::HfMixtral,
        }
    }
}

/// Splits `experts.{i}.{rest}` (or `experts.expert_{i}.{rest}` with `marker = "expert_"`).
fn expert_key<'k>(key: &'k str, marker: &str) -> Option<(usize, &'k str)> {
    let tail = key.strip_prefix("experts.")?.strip_prefix(marker)?;
    let (index, rest) = tail.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((index.parse().ok()?, rest))
}

/// Which layout a (prefix-stripped) tensor name belongs to, if any.
fn layout_of(key: &str) -> Option<Layout> {
    const NATIVE: [&str; 9] = [
        "router.weight",
        "router.bias",
        "router.score_bias",
        "experts.w1",
        "experts.b1",
        "experts.w2",
        "experts.b2",
        "experts.w3",
        "experts.b3",
    ];
    if NATIVE.contains(&key) || SHARED_NAMES.contains(&key) {
        return Some(Layout::Native);
    }
    match key {
        "switch.weight" | "switch.bias" => return Some(Layout::Labml),
        "router.classifier.weight" | "router.classifier.bias" => return Some(Layout::HfSwitch),
        "gate.weight"
        | "gate.e_score_correction_bias"
        | "gate.moe_statics.e_score_correction_bias"
        | "shared_expert_gate.weight" => return Some(Layout::HfMixtralRouter),
        "experts.gate_up_proj" | "experts.down_proj" => return Some(Layout::HfMixtralStacked),
        _ => {}
    }
    // transformers 5.x's shared expert (DeepSeek, GLM, ERNIE: shared_experts; Qwen2-MoE:
    // shared_expert), read with the stacked experts.
    if let Some(projection) = key
        .strip_prefix("shared_experts.")
        .or_else(|| key.strip_prefix("shared_expert."))
    {
        if matches!(
            projection,
            "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
        ) {
            return Some(Layout::HfMixtralRouter);
        }
    }
    if let Some((_, rest)) = expert_key(key, "expert_") {
        if matches!(rest, "wi.weight" | "wi.bias" | "wo.weight" | "wo.bias") {
            return Some(Layout::HfSwitch);
        }
    }
    if let Some((_, rest)) = expert_key(key, "") {
        let labml = [
            "layer1.weight",
            "layer1.bias",
            "layer2.weight",
            "layer2.bias",
            "linear_v.weight",
            "linear_v.bias",
        ];
        if labml.contains(&rest) {
            return Some(Layout::Labml);
        }
        if matches!(rest, "w1.weight" | "w2.weight" | "w3.weight") {
            return Some(Layout::HfMixtralPerExpert);
        }
    }
    None
}

impl MoeWeights {
    /// Loads a safetensors file, mapped rather than read (host memory holds the layer's
    /// tensors once, as stored); see [`MoeWeights::from_safetensors_bytes`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_safetensors(
        path: impl AsRef<std::path::Path>,
        naming: Naming,
        prefix: Option<&str>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bytes = map_file(path)?;
        Self::from_safetensors_bytes(&bytes, naming, prefix, &path.display().to_string())
    }

    /// Loads weights from safetensors bytes in any supported naming (`Naming::Auto`
    /// detects it). With a `prefix`, only tensors whose names start with it are read
    /// (a whole model's state dict); without one, every tensor must belong to the layer.
    /// `origin` names the bytes in errors.
    pub fn from_safetensors_bytes(
        bytes: &[u8],
        naming: Naming,
        prefix: Option<&str>,
        origin: &str,
    ) -> Result<Self> {
        let file = parse_safetensors(bytes, origin)?;
        let prefix = prefix.unwrap_or("");
        let mut layouts: BTreeMap<Layout, String> = BTreeMap::new();
        let mut names = file.names();
        names.sort();
        let mut considered = 0;
        let has = |key: &str| file.tensor(&format!("{prefix}{key}")).is_ok();
        let transposed = Transposed::of(has);
        for name in names {
            let Some(key) = name.strip_prefix(prefix) else {
                continue;
            };
            considered += 1;
            let layout = match transposed {
                Some(Transposed::GptOss) if TRANSPOSED_KEYS.contains(&key) => {
                    Some(Layout::HfGptOss)
                }
                Some(Transposed::Llama4) if TRANSPOSED_KEYS.contains(&key) => {
                    Some(Layout::HfLlama4)
                }
                _ => layout_of(key),
            };
            let layout = layout.ok_or_else(|| {
                MoeError::tensor(
                    name,
                    "not a tensor of any known MoE naming (native, labml, hf_switch, hf_mixtral \
                     and the families' transformers names); for a whole model's state dict, \
                     give the layer's prefix",
                )
            })?;
            layouts.entry(layout).or_insert_with(|| name.to_string());
        }
        if considered == 0 {
            return Err(MoeError::Naming {
                message: if prefix.is_empty() {
                    format!("`{origin}` holds no tensors")
                } else {
                    format!("no tensor in `{origin}` starts with the prefix `{prefix}`")
                },
            });
        }
        let layout = Self::single_layout(&layouts)?;
        if naming == Naming::Gguf {
            return Err(MoeError::Naming {
                message: format!("the config asks for gguf, but `{origin}` is a safetensors file"),
            });
        }
        if naming != Naming::Auto && naming != layout.naming() {
            return Err(MoeError::Naming {
                message: format!(
                    "the config asks for {naming:?} but the tensors use {:?} (e.g. `{}`)",
                    layout.naming(),
                    layouts.values().next().map(String::as_str).unwrap_or("")
                ),
            });
        }
        let mut source = TensorSource {
            file: &file,
            prefix,
            used: BTreeSet::new(),
            dims_from: String::new(),
        };
        let weights = match layout {
            Layout::Native => Self::read_native(&mut source)?,
            Layout::Labml => Self::read_per_expert(&mut source, &LABML_KEYS)?,
            Layout::HfSwitch => Self::read_per_expert(&mut source, &HF_SWITCH_KEYS)?,
            Layout::HfMixtralPerExpert | Layout::HfMixtralRouter => {
                Self::read_per_expert(&mut source, &HF_MIXTRAL_KEYS)?
            }
            Layout::HfMixtralStacked => Self::read_mixtral_stacked(&mut source)?,
            Layout::HfGptOss => Self::read_gpt_oss(&mut source)?,
            Layout::HfLlama4 => Self::read_llama4(&mut source)?,
        };
        // Everything of the layer must have been used: an extra expert or tensor is an error.
        for name in file.names() {
            if name.starts_with(prefix) && !source.used.contains(name) {
                return Err(MoeError::tensor(
                    name,
                    format!(
                        "unexpected for a {:?} layer with {} experts",
                        layout.naming(),
                        weights.shape.num_experts
                    ),
                ));
            }
        }
        weights.check()?;
        Ok(weights)
    }

    /// The one layout the names agree on, or an error naming two names that disagree.
    fn single_layout(layouts: &BTreeMap<Layout, String>) -> Result<Layout> {
        let mut found: Vec<(Layout, &String)> = layouts.iter().map(|(l, n)| (*l, n)).collect();
        // Mixtral's router name is shared by both Mixtral layouts.
        if found.len() > 1 {
            found.retain(|(l, _)| *l != Layout::HfMixtralRouter);
        }
        match found.as_slice() {
            [(layout, _)] => Ok(*layout),
            [(a, name_a), (b, name_b), ..] => Err(MoeError::Naming {
                message: format!("mixed namings: `{name_a}` is {a:?} but `{name_b}` is {b:?}"),
            }),
            [] => Err(MoeError::Naming {
                message: "no tensors".to_string(),
            }),
        }
    }

    fn read_native(source: &mut TensorSource<'_>) -> Result<Self> {
        let router_shape = source.shape_of("router.weight")?;
        let (n, d) = rank2(&source.full_name("router.weight"), &router_shape, "[N, D]")?;
        let w1_shape = source.shape_of("experts.w1")?;
        let (_, f, _) = rank3(&source.full_name("experts.w1"), &w1_shape, "[N, F, D]")?;
        source.dims_from = format!(
            "N, D from `{}` {router_shape:?}, F from `{}` {w1_shape:?}",
            source.full_name("router.weight"),
            source.full_name("experts.w1")
        );
        let shape = LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        };
        let missing = |source: &TensorSource<'_>, key: &str| {
            MoeError::tensor(&source.full_name(key), "missing")
        };
        Ok(MoeWeights {
            shape,
            router_weight: source.required("router.weight", &[n, d], "[N, D]")?,
            router_bias: source.optional("router.bias", &[n], "[N]")?,
            score_bias: source.optional("router.score_bias", &[n], "[N]")?,
            w1: source
                .experts("experts.w1", [n, f, d], "[N, F, D]")?
                .ok_or_else(|| missing(source, "experts.w1"))?,
            b1: source.optional("experts.b1", &[n, f], "[N, F]")?,
            w2: source
                .experts("experts.w2", [n, d, f], "[N, D, F]")?
                .ok_or_else(|| missing(source, "experts.w2"))?,
            b2: source.optional("experts.b2", &[n, d], "[N, D]")?,
            w3: source.experts("experts.w3", [n, f, d], "[N, F, D]")?,
            b3: source.optional("experts.b3", &[n, f], "[N, F]")?,
            shared: Self::read_native_shared(source, d)?,
        })
    }

    /// transformers 5.x's shared expert, if there: `shared_experts.*` (DeepSeek, GLM, ERNIE)
    /// or `shared_expert.*` with `shared_expert_gate.weight` (Qwen2-MoE), each an MLP of
    /// `gate_proj [Fs, D]`, `up_proj [Fs, D]`, `down_proj [D, Fs]`.
    pub(super) fn read_hf_shared(
        source: &mut TensorSource<'_>,
        d: usize,
    ) -> Result<Option<SharedExpert>> {
        let Some(base) = ["shared_experts", "shared_expert"]
            .into_iter()
            .find(|base| source.shape_of(&format!("{base}.gate_proj.weight")).is_ok())
        else {
            return Ok(None);
        };
        let key = |projection: &str| format!("{base}.{projection}.weight");
        let gate_shape = source.shape_of(&key("gate_proj"))?;
        let (fs, _) = rank2(&source.full_name(&key("gate_proj")), &gate_shape, "[Fs, D]")?;
        Ok(Some(SharedExpert {
            d_ff: fs,
            w1: source.required(&key("gate_proj"), &[fs, d], "[Fs, D]")?,
            b1: None,
            w2: source.required(&key("down_proj"), &[d, fs], "[D, Fs]")?,
            b2: None,
            w3: Some(source.required(&key("up_proj"), &[fs, d], "[Fs, D]")?),
            b3: None,
            gate: source.optional("shared_expert_gate.weight", &[1, d], "[1, D]")?,
        }))
    }

    /// The native `shared.*` tensors, if `shared.w1` is there (any other without it is
    /// left unused, hence an error naming it).
    fn read_native_shared(source: &mut TensorSource<'_>, d: usize) -> Result<Option<SharedExpert>> {
        let Ok(w1_shape) = source.shape_of("shared.w1") else {
            return Ok(None);
        };
        let (fs, _) = rank2(&source.full_name("shared.w1"), &w1_shape, "[Fs, D]")?;
        Ok(Some(SharedExpert {
            d_ff: fs,
            w1: source.required("shared.w1", &[fs, d], "[Fs, D]")?,
            b1: source.optional("shared.b1", &[fs], "[Fs]")?,
            w2: source.required("shared.w2", &[d, fs], "[D, Fs]")?,
            b2: source.optional("shared.b2", &[d], "[D]")?,
            w3: source.optional("shared.w3", &[fs, d], "[Fs, D]")?,
            b3: source.optional("shared.b3", &[fs], "[Fs]")?,
            gate: source.optional("shared.gate", &[1, d], "[1, D]")?,
        }))
    }

    fn read_per_expert(source: &mut TensorSource<'_>, keys: &PerExpertKeys) -> Result<Self> {
        let router_shape = source.shape_of(keys.router_weight)?;
        let router_name = source.full_name(keys.router_weight);
        let (n, d) = rank2(&router_name, &router_shape, "[N, D]")?;
        let first_w1 = source.full_name(&keys.expert(0, keys.w1));
        let w1_shape = source.shape_of(&keys.expert(0, keys.w1))?;
        let (f, _) = rank2(&first_w1, &w1_shape, "[F, D]")?;
        source.dims_from =
            format!("N, D from `{router_name}` {router_shape:?}, F from `{first_w1}` {w1_shape:?}");
        let shape = LayerShape {
            num_experts: n,
            d_model: d,
            d_ff: f,
        };
        let required = |source: &mut TensorSource<'_>, part: &str, dims: [usize; 2], meaning| {
            source
                .per_expert(n, |i| keys.expert(i, part), dims, meaning)?
                .ok_or_else(|| {
                    MoeError::tensor(&source.full_name(&keys.expert(0, part)), "missing")
                })
        };
        let w1 = required(source, keys.w1, [f, d], "[F, D]")?;
        let w2 = required(source, keys.w2, [d, f], "[D, F]")?;
        let w3 = match keys.w3 {
            Some(part) => source.per_expert(n, |i| keys.expert(i, part), [f, d], "[F, D]")?,
            None => None,
        };
        let optional = |source: &mut TensorSource<'_>, part: Option<&str>, len: usize| match part {
            Some(part) => source.per_expert_vector(n, |i| keys.expert(i, part), len),
            None => Ok(None),
        };
        Ok(MoeWeights {
            shape,
            router_weight: source.required(keys.router_weight, &[n, d], "[N, D]")?,
            router_bias: match keys.router_bias {
                Some(key) => source.optional(key, &[n], "[N]")?,
                None => None,
            },
            score_bias: None,
            w1,
            b1: optional(source, keys.b1, f)?,
            w2,
            b2: optional(source, keys.b2, d)?,
            w3,
            b3: optional(source, keys.b3, f)?,
            shared: None,
        })
    }

    fn read_mixtral_stacked(source: &mut TensorSource<'_>) -> Result<Self> {
        let router_shape = source.shape_of("gate.weight")?;
        let (n, d) = rank2(&source.full_name("gate.weight"), &router_shape, "[N, D]")?;
        let gate_up_shape = source.shape_of("experts.gate_up_proj")?;
        let name = source.full_name("experts.gate_up_proj");
        let (_, two_f, _) = rank3(&name, &gate_up_shape, "[N, 2F, D]")?;
        if two_f % 2 != 0 {
            return Err(MoeError::tensor(
                &name,
                format!("shape {gate_up_shape:?}: the middle dimension 2F must be even"),
            ));
        }
        let f = two_f / 2;
        source.dims_from = format!(
            "N, D from `{}` {router_shape:?}, 2F from `{name}` {gate_up_shape:?}",
            source.full_name("gate.weight")
        );
        let gate_up = source
            .experts("experts.gate_up_proj", [n, two_f, d], "[N, 2F, D]")?
            .ok_or_else(|| MoeError::tensor(&name, "missing"))?;
        // Rows :F of each expert are the activated gate (w1), rows F: the up projection (w3).
        let (w1, w3) = gate_up.split_rows(f, &name)?;
        let down_name = source.full_name("experts.down_proj");
        Ok(MoeWeights {
            shape: LayerShape {
                num_experts: n,
                d_model: d,
                d_ff: f,
            },
            router_weight: source.required("gate.weight", &[n, d], "[N, D]")?,
            router_bias: None,
            // DeepSeek-V3's and GLM-4.5's selection bias (transformers 5.x names it so).
            score_bias: match source.optional("gate.e_score_correction_bias", &[n], "[N]")? {
                Some(bias) => Some(bias),
                // ERNIE 4.5 keeps it as [1, N] in the router's moe_statics.
                None => source.optional(
                    "gate.moe_statics.e_score_correction_bias",
                    &[1, n],
                    "[1, N]",
                )?,
            },
            shared: Self::read_hf_shared(source, d)?,
            w1,
            b1: None,
            w2: source
                .experts("experts.down_proj", [n, d, f], "[N, D, F]")?
                .ok_or_else(|| MoeError::tensor(&down_name, "missing"))?,
            b2: None,
            w3: Some(w3),
            b3: None,
        })
    }
}

/// Tensor names of a naming that stores one tensor per expert.
struct PerExpertKeys {
    router_weight: &'static str,
    router_bias: Option<&'static str>,
    /// `experts.{i}.` or `experts.expert_{i}.` before the part name.
    expert_marker: &'static str,
    w1: &'static str,
    b1: Option<&'static str>,
    w2: &'static str,
    b2: Option<&'static str>,
    w3: Option<&'static str>,
    b3: Option<&'static str>,
}

impl PerExpertKeys {
    fn expert(&self, index: usize, part: &str) -> String {
        format!("experts.{}{index}.{part}", self.expert_marker)
    }
}

const LABML_KEYS: PerExpertKeys = PerExpertKeys {
    router_weight: "switch.weight",
    router_bias: Some("switch.bias"),
    expert_marker: "",
    w1: "layer1.weight",
    b1: Some("layer1.bias"),
    w2: "layer2.weight",
    b2: Some("layer2.bias"),
    w3: Some("linear_v.weight"),
    b3: Some("linear_v.bias"),
};

const HF_SWITCH_KEYS: PerExpertKeys = PerExpertKeys {
    router_weight: "router.classifier.weight",
    router_bias: Some("router.classifier.bias"),
    expert_marker: "expert_",
    w1: "wi.weight",
    b1: Some("wi.bias"),
    w2: "wo.weight",
    b2: Some("wo.bias"),
    w3: None,
    b3: None,
};

const HF_MIXTRAL_KEYS: PerExpertKeys = PerExpertKeys {
    router_weight: "gate.weight",
    router_bias: None,
    expert_marker: "",
    w1: "w1.weight",
    b1: None,
    w2: "w2.weight",
    b2: None,
    w3: Some("w3.weight"),
    b3: None,
};
